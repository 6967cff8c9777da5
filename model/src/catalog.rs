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
    pub fn key(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
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
