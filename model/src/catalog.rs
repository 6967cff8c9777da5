//! The set of functions a process currently serves, as discovery sources
//! (a stack file, Kubernetes) publish it.

use std::sync::Arc;

#[cfg(test)]
use crate::DEFAULT_NAMESPACE;
use crate::{ConfigError, FunctionSpec};

/// One function as discovered now: its settings and how many replicas are
/// ready to take calls.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub spec: Arc<FunctionSpec>,
    /// Ready replicas (from the workload's status; `None` when the source
    /// cannot tell, e.g. a stack-file function served elsewhere).
    pub ready_replicas: Option<u32>,
}

impl Function {
    /// `namespace/name`, unique within a catalog.
    pub fn key(&self) -> FunctionKey {
        self.spec.key()
    }
}

/// A function's identity across ebb: its namespace and name, written
/// `namespace/name` (in logs, metric labels, wake-up paths and Events).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl FunctionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PartialEq<&str> for FunctionKey {
    fn eq(&self, other: &&str) -> bool {
        other.split_once('/') == Some((self.namespace.as_str(), self.name.as_str()))
    }
}

impl FunctionSpec {
    /// Its [`FunctionKey`].
    pub fn key(&self) -> FunctionKey {
        FunctionKey::new(&self.namespace, &self.name)
    }
}

/// A snapshot of every function a discovery source knows, plus the functions
/// it had to skip and why. Discovery publishes a new snapshot on every change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub functions: Vec<Function>,
    /// Functions skipped for bad settings; the others keep being served.
    pub errors: Vec<ConfigError>,
}

impl Catalog {
    /// This catalog, with every function of `previous` whose settings are now
    /// invalid (listed in [`Catalog::errors`]) served on its settings from
    /// `previous`: an edit that breaks a function reports the mistake and
    /// tears nothing down.
    pub fn keeping_last_good(mut self, previous: &Catalog) -> Catalog {
        let broken: Vec<FunctionKey> = self
            .errors
            .iter()
            .filter(|e| !matches!(e, ConfigError::DuplicateFunction { .. }))
            .filter_map(ConfigError::function_key)
            .collect();
        for f in &previous.functions {
            let key = f.key();
            if broken.contains(&key) && self.get(&key.namespace, &key.name).is_none() {
                self.functions.push(f.clone());
            }
        }
        self
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Function> {
        self.functions
            .iter()
            .find(|f| f.spec.namespace == namespace && f.spec.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stack;

    fn catalog(text: &str) -> Catalog {
        let (stack, errors) = Stack::parse_lenient(text);
        Catalog {
            functions: stack
                .functions
                .into_iter()
                .map(|spec| Function {
                    spec: Arc::new(spec),
                    ready_replicas: None,
                })
                .collect(),
            errors,
        }
    }

    const GOOD: &str = "functions:\n  - name: f\n    url: http://127.0.0.1:1\n    topics: [a]\n    max-replicas: 3\n  - name: g\n    url: http://127.0.0.1:2\n    topics: [b]\n";

    #[test]
    fn a_broken_function_keeps_its_last_good_settings() {
        let good = catalog(GOOD);
        let broken = catalog(&GOOD.replace("max-replicas: 3", "max-replicas: ten"));
        assert_eq!(broken.functions.len(), 1, "f alone is broken");
        let kept = broken.keeping_last_good(&good);
        assert_eq!(kept.errors.len(), 1, "still reported");
        let f = kept.get(DEFAULT_NAMESPACE, "f").expect("f kept");
        assert_eq!(f.spec.max_replicas, 3);
        assert!(kept.get(DEFAULT_NAMESPACE, "g").is_some());
    }

    #[test]
    fn a_removed_or_never_valid_function_is_not_kept() {
        let good = catalog(GOOD);
        let removed =
            catalog("functions:\n  - name: g\n    url: http://127.0.0.1:2\n    topics: [b]\n");
        assert!(
            removed
                .keeping_last_good(&good)
                .get(DEFAULT_NAMESPACE, "f")
                .is_none()
        );
        let never = catalog("functions:\n  - name: h\n    topics: [c]\n    max-replicas: ten\n");
        let kept = never.keeping_last_good(&good);
        assert!(kept.get(DEFAULT_NAMESPACE, "h").is_none());
        assert!(!kept.errors.is_empty());
    }
}
