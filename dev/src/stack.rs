//! The stack file as `ebb dev` reads it: strictly (any mistake refuses the
//! file, naming function and key), with dev's shorter idle default.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ebb_model::{Catalog, Function, FunctionSpec, Sources, Stack};
use serde_norway::Value;

use crate::Error;

/// Idle time before 1 → 0 when a function does not set `scale-to-zero-after`:
/// shorter than on Kubernetes, so scaling to zero is seen while trying ebb out.
pub const DEV_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(30);

/// A stack file accepted by `ebb dev`.
#[derive(Debug, Clone, PartialEq)]
pub struct DevStack {
    pub functions: Vec<Arc<FunctionSpec>>,
    pub sources: Sources,
}

impl DevStack {
    /// The catalog the connectors read.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            functions: self
                .functions
                .iter()
                .map(|spec| Function {
                    spec: spec.clone(),
                    ready_replicas: None,
                })
                .collect(),
            errors: Vec::new(),
        }
    }

    /// The function named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<FunctionSpec>> {
        self.functions.iter().find(|f| f.name == name)
    }
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<DevStack, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "{}: cannot read the stack file ({e}); pass the path of a stack file such as examples/stack.yaml",
            path.display()
        ))
    })?;
    parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Parses stack-file text: every mistake is an error (one line, naming the
/// function and key), unlike connectors, which skip a bad function.
pub fn parse(text: &str) -> Result<DevStack, ebb_model::StackError> {
    let stack = Stack::parse(text)?;
    let written = idle_written(text);
    let functions = stack
        .functions
        .into_iter()
        .map(|mut f| {
            if !written.contains(&f.name) {
                f.scale_to_zero_after = DEV_SCALE_TO_ZERO_AFTER;
            }
            Arc::new(f)
        })
        .collect();
    Ok(DevStack {
        functions,
        sources: stack.sources,
    })
}

/// Names of the functions whose entry sets `scale-to-zero-after` itself.
fn idle_written(text: &str) -> Vec<String> {
    let Ok(doc) = serde_norway::from_str::<Value>(text) else {
        return Vec::new();
    };
    let Some(Value::Sequence(functions)) = doc.get("functions") else {
        return Vec::new();
    };
    functions
        .iter()
        .filter(|f| f.get("scale-to-zero-after").is_some())
        .filter_map(|f| f.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_shortens_the_idle_default_only_where_unset() {
        let s = parse(
            "functions:\n  - name: a\n    command: cat\n    topics: [t]\n  - name: b\n    command: cat\n    topics: [t]\n    scale-to-zero-after: 2m\n",
        )
        .unwrap();
        assert_eq!(
            s.get("a").unwrap().scale_to_zero_after,
            DEV_SCALE_TO_ZERO_AFTER
        );
        assert_eq!(
            s.get("b").unwrap().scale_to_zero_after,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn every_mistake_refuses_the_file_with_one_line_naming_function_and_key() {
        let cases = [
            (
                "functions:\n  - name: a\n    command: cat\n    topcis: [t]\n",
                &["\"a\"", "topcis"][..],
            ),
            (
                "functions:\n  - name: a\n    command: cat\n    schedule: \"61 * * * *\"\n",
                &["\"a\"", "schedule"],
            ),
            (
                "functions:\n  - name: a\n    topics: [t]\n",
                &["\"a\"", "url"],
            ),
            (
                "functions:\n  - name: a\n    command: cat\n  - name: a\n    command: cat\n",
                &["\"a\""],
            ),
        ];
        for (text, needles) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            for n in needles {
                assert!(e.contains(n), "{e:?} should name {n}");
            }
        }
    }

    #[test]
    fn the_catalog_lists_every_function() {
        let s = parse("functions:\n  - name: a\n    url: http://127.0.0.1:1\n    topics: [t]\nsources:\n  nats: nats://127.0.0.1:4222\n").unwrap();
        assert_eq!(s.catalog().functions.len(), 1);
        assert_eq!(s.sources.nats.as_deref(), Some("nats://127.0.0.1:4222"));
    }
}
