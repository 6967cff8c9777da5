//! ebb's autoscaler: reads each function's backlog and in-flight work,
//! decides a replica count with a pure policy ([`policy`]) and applies it.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod app;
pub mod policy;
pub mod poll;
pub mod prewarm;
pub mod scalers;
pub mod simulate;
pub mod target;

/// Errors of the autoscaler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
        }
    }
}
