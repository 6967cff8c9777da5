//! ebb's function model: one function's settings ([`FunctionSpec`]), read
//! from a Deployment's annotations ([`FunctionSpec::from_annotations`]) or a
//! stack file ([`Stack::parse`]) by one parser, and the names ebb derives
//! from a function ([`resource_name`]).
//!
//! Pure code: no I/O, no clocks. Every mistake is a [`ConfigError`] that names
//! the function, the key as written and what was expected.
//!
//! ```
//! use std::collections::BTreeMap;
//! use ebb_model::{FunctionSpec, Stack};
//!
//! let stack = Stack::parse("functions:\n  - name: echo\n    command: [cat]\n    topics: [orders]\n")?;
//! assert_eq!(stack.functions[0].topics, ["orders"]);
//! assert_eq!(stack.functions[0].durable_name(), "ebb-default-echo");
//!
//! let annotations = BTreeMap::from([("ebb.io/max-replicas".to_owned(), "ten".to_owned())]);
//! let error = FunctionSpec::from_annotations("echo", "shop", &annotations, &BTreeMap::new()).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     r#"function "shop/echo": key "ebb.io/max-replicas": expected a whole number ≥ 1, got "ten""#
//! );
//! # Ok::<(), ebb_model::StackError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

mod catalog;
mod error;
mod keys;
pub mod refusal;
pub mod schedule;
mod spec;
mod stack;
mod values;

pub use catalog::{Catalog, Function, FunctionKey};
pub use error::{ConfigError, StackError};
pub use spec::{
    ANNOTATION_PREFIX, Concurrency, DEFAULT_NAMESPACE, FunctionSpec, KafkaOrdering, NO_DEAD_LETTER,
    Prometheus, resource_name,
};
pub use stack::{Sources, Stack};
pub use values::MetricSelector;
