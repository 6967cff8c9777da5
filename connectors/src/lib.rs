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

/// An error of a broker client (or anything else) kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the connectors. Failures of a broker call keep the client's
/// error as their [`source`](std::error::Error::source); their message reads
/// `what was being done: why`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("broker: {0}")]
    Broker(String),
    #[error("broker: {what}: {source}")]
    BrokerCall {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("dead letter: {0}")]
    DeadLetter(String),
    #[error("dead letter: {what}: {source}")]
    DeadLetterCall {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("ack: {0}")]
    Ack(String),
    #[error("ack: {0}")]
    AckCall(#[source] BoxError),
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
    /// A failed broker call: `what` was being done, `source` is why.
    pub fn broker(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::BrokerCall {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A dead letter that could not be stored.
    pub fn dead_letter(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::DeadLetterCall {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A settlement (ack, nak, term) the broker did not take.
    pub fn ack(source: impl Into<BoxError>) -> Self {
        Self::AckCall(source.into())
    }

    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Broker(_) | Self::BrokerCall { .. } => "broker",
            Self::DeadLetter(_) | Self::DeadLetterCall { .. } => "dead_letter",
            Self::Ack(_) | Self::AckCall(_) => "ack",
            Self::Read { .. } => "read",
            Self::Bind { .. } => "bind",
        }
    }

    /// Whether this is a configuration mistake (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Read { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_broker_call_reads_what_and_why_and_keeps_its_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::broker("declare queue q", io);
        assert_eq!(e.to_string(), "broker: declare queue q: refused");
        assert_eq!(e.metric_label(), "broker");
        let source = std::error::Error::source(&e).expect("the client's error is kept");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert!(!e.is_config());
    }
}
