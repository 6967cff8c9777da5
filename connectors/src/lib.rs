//! ebb's connectors: take events from a source (NATS, RabbitMQ, Kafka, cron)
//! and deliver each one to every function subscribed to its topic, at least
//! once, with retries, holds while a function has no ready replica,
//! wake-ups and dead letters.
//!
//! The broker-independent parts live here once: the [`engine`] (calls,
//! retries, holds, dead letters), the [`retry`] policy, [`routing`], the
//! CloudEvents [`event`] headers, concurrency [`limit`]s, the function
//! [`catalog`] sources and the [`admin`] server. Each source adds only its
//! broker-specific part ([`nats`], [`amqp`], [`kafka`], [`cron`]).
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod admin;
pub mod amqp;
pub mod app;
pub mod catalog;
pub mod cron;
pub mod engine;
pub mod event;
pub mod kafka;
pub mod limit;
pub mod metrics;
pub mod nats;
pub mod retry;
pub mod routing;
pub mod supervisor;
pub use ebb_model::schedule;

/// Errors of the connectors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("broker: {0}")]
    Broker(String),
    #[error("dead letter: {0}")]
    DeadLetter(String),
    #[error("ack: {0}")]
    Ack(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Broker(_) => "broker",
            Self::DeadLetter(_) => "dead_letter",
            Self::Ack(_) => "ack",
            Self::Read { .. } => "read",
            Self::Bind { .. } => "bind",
        }
    }

    /// Whether this is a configuration mistake (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Read { .. })
    }
}
