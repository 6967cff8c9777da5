//! The set of functions a process currently serves, as discovery sources
//! (a stack file, Kubernetes) publish it.

use std::sync::Arc;

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
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Function> {
        self.functions
            .iter()
            .find(|f| f.spec.namespace == namespace && f.spec.name == name)
    }
}
