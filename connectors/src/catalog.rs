//! Function catalogs from a stack file, reloaded when the file changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ebb_model::{Catalog, Function, Stack};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Reads a stack file into a catalog. Bad functions are skipped and listed in
/// `Catalog::errors`; a file that cannot be read or is not YAML is an error.
pub fn load_stack(path: &Path) -> Result<Catalog, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(stack_catalog(&text))
}

/// A catalog from stack-file text: every good function, each ready (the
/// stack file cannot tell otherwise), and the errors of the others.
pub fn stack_catalog(text: &str) -> Catalog {
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

fn report(path: &Path, catalog: &Catalog) {
    for e in &catalog.errors {
        tracing::error!(file = %path.display(), error = %e, "invalid function settings; served on its last valid ones until fixed (skipped if it never had any)");
    }
    tracing::info!(file = %path.display(), functions = catalog.functions.len(), skipped = catalog.errors.len(), "functions loaded");
}

/// Loads `path` now (failing if it cannot be read), then polls it every
/// `every` and publishes a new catalog when its content changes. A file that
/// becomes unreadable keeps the last catalog, with an error in the log; a
/// function whose settings an edit breaks keeps its last valid ones.
pub async fn watch_stack(
    path: PathBuf,
    every: Duration,
    stop: CancellationToken,
) -> Result<(watch::Receiver<Arc<Catalog>>, tokio::task::JoinHandle<()>), Error> {
    let first = std::fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    let catalog = stack_catalog(&first);
    // A file that is not a stack file at all is refused at start (exit 2);
    // single bad functions are skipped. A later broken edit keeps the last
    // good catalog instead.
    if let Some(e) = catalog
        .errors
        .iter()
        .find(|e| matches!(e, ebb_model::ConfigError::Syntax { .. }))
    {
        return Err(Error::Config(format!("{}: {e}", path.display())));
    }
    report(&path, &catalog);
    let (tx, rx) = watch::channel(Arc::new(catalog));
    let task = tokio::spawn(async move {
        let mut last = first;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            match tokio::fs::read_to_string(&path).await {
                Ok(text) if text != last => {
                    let catalog = stack_catalog(&text);
                    if let Some(e) = catalog
                        .errors
                        .iter()
                        .find(|e| matches!(e, ebb_model::ConfigError::Syntax { .. }))
                    {
                        tracing::error!(file = %path.display(), error = %e, "the stack file is broken; keeping the last good functions");
                        last = text;
                        continue;
                    }
                    let catalog = catalog.keeping_last_good(&tx.borrow());
                    report(&path, &catalog);
                    last = text;
                    if tx.send(Arc::new(catalog)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read the stack file; keeping the last functions");
                }
            }
        }
    });
    Ok((rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_functions_are_skipped_not_fatal() {
        let c = stack_catalog(
            "functions:\n  - name: good\n    url: http://127.0.0.1:1\n    topics: [a]\n  - name: bad\n    url: http://127.0.0.1:2\n    max-replicas: ten\n",
        );
        assert_eq!(c.functions.len(), 1);
        assert_eq!(c.functions[0].spec.name, "good");
        assert_eq!(c.errors.len(), 1);
        assert!(c.errors[0].to_string().contains("max-replicas"));
    }

    #[tokio::test]
    async fn reloads_on_change() {
        let dir = std::env::temp_dir().join(format!("ebb-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stack.yaml");
        std::fs::write(
            &path,
            "functions:\n  - name: a\n    url: http://x\n    topics: [t]\n",
        )
        .unwrap();
        let stop = CancellationToken::new();
        let (mut rx, task) = watch_stack(path.clone(), Duration::from_millis(10), stop.clone())
            .await
            .unwrap();
        assert_eq!(rx.borrow().functions.len(), 1);
        std::fs::write(
            &path,
            "functions:\n  - name: a\n    url: http://x\n    topics: [t]\n  - name: b\n    url: http://y\n    topics: [u]\n",
        )
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().functions.len(), 2);
        stop.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
