//! Scalers: one per kind of scaling input (NATS JetStream, RabbitMQ, Kafka,
//! Prometheus, the workers' in-flight calls). Each reads one function's input
//! and answers a [`Reading`] or why it could not ([`ReadError`], "unknown":
//! the policy holds). The poll step ([`crate::poll`]) reads every scaler that
//! serves a function, in the order given, and hands the readings to the
//! policy.
//!
//! `W` is what the scale target knows of the function's workload (on
//! Kubernetes, [`ebb_kube::Workload`]); only inputs read from the replicas
//! themselves need it.

pub mod inflight;
pub mod kafka;
pub mod nats;
pub mod prometheus;
pub mod rabbitmq;

use std::future::Future;

use ebb_model::FunctionSpec;
use futures::future::BoxFuture;

/// One read of one input of a function.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// The work measured: a queue's backlog (messages waiting and in
    /// flight), a Prometheus value, calls in flight.
    pub value: f64,
    /// Messages of this queue the function finished so far, a counter that
    /// only grows; `None` when the input cannot tell this time.
    pub finished: Option<u64>,
    /// A position that moves whenever the queue hands out work (JetStream's
    /// delivered stream sequence); `None` when the input has none.
    pub position: Option<u64>,
    /// More replicas than this would idle (Kafka: the partitions).
    pub cap: Option<u32>,
    /// The value leaves out messages handed to the replicas and not yet
    /// acknowledged (RabbitMQ read by passive declare): a zero is no
    /// evidence that no call runs.
    pub in_flight_unseen: bool,
}

impl Reading {
    /// A value and nothing else.
    pub fn value(value: f64) -> Self {
        Self {
            value,
            ..Self::default()
        }
    }
}

/// What an input is to the poll step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A queue's backlog. Its finished count and position tell whether work
    /// was done between polls and how fast the replicas serve.
    Queue,
    /// Any other measure of work (a Prometheus value).
    Metric,
    /// Calls in flight in the replicas: read only for a function that some
    /// other input scales, never the sole input of a function.
    InFlight,
}

/// What [`Scaler::read`] answers.
pub type ReadFuture<'a> = BoxFuture<'a, Result<Reading, ReadError>>;

/// Why an input could not be read: the policy holds the current count.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Nats(#[from] nats::NatsScalerError),
    #[error(transparent)]
    RabbitMq(#[from] rabbitmq::RabbitMqScalerError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaScalerError),
    #[error(transparent)]
    Prometheus(#[from] prometheus::ScalerError),
    #[error(transparent)]
    Inflight(#[from] inflight::InflightError),
    /// A scaler of another crate (`label` is bounded, for metrics).
    #[error("{message}")]
    Other {
        label: &'static str,
        message: String,
    },
}

impl ReadError {
    /// A bounded label for `ebb_autoscaler_scaler_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Nats(e) => e.metric_label(),
            Self::RabbitMq(e) => e.metric_label(),
            Self::Kafka(e) => e.metric_label(),
            Self::Prometheus(e) => e.metric_label(),
            Self::Inflight(e) => e.metric_label(),
            Self::Other { label, .. } => label,
        }
    }
}

/// One kind of scaling input.
pub trait Scaler<W>: Send + Sync {
    /// The input's name: the policy's and the metrics' label (`nats`,
    /// `rabbitmq`, `kafka`, `prometheus`, `inflight`, …).
    fn name(&self) -> &'static str;

    fn role(&self) -> Role;

    /// Whether `f` has this input (a broker input needs topics, a
    /// Prometheus input its settings).
    fn serves(&self, f: &FunctionSpec) -> bool;

    /// Reads the input of `f`, whose workload is `w`, within the scaler's
    /// timeout.
    fn read<'a>(&'a self, f: &'a FunctionSpec, w: &'a W) -> ReadFuture<'a>;

    /// After each poll: forgets what the scaler keeps for functions other
    /// than `live` (each with its workload, if it has one).
    fn retain(&self, live: &[(&FunctionSpec, Option<&W>)]) {
        let _ = live;
    }
}

/// A broker's queue of a function's messages (NATS JetStream, RabbitMQ,
/// Kafka): every function with topics has one, and its backlog is read
/// without the workload. Each such scaler is a [`Scaler`] through this.
pub trait QueueScaler: Send + Sync {
    /// The input's name (`nats`, `rabbitmq`, `kafka`).
    const NAME: &'static str;

    /// Reads the queue of `f` within the scaler's timeout.
    fn read_backlog(
        &self,
        f: &FunctionSpec,
    ) -> impl Future<Output = Result<Reading, ReadError>> + Send;

    /// After each poll: forgets what the scaler keeps for functions other
    /// than `live`.
    fn retain_backlogs<W>(&self, live: &[(&FunctionSpec, Option<&W>)]) {
        let _ = live;
    }
}

impl<W: Sync, Q: QueueScaler> Scaler<W> for Q {
    fn name(&self) -> &'static str {
        Q::NAME
    }

    fn role(&self) -> Role {
        Role::Queue
    }

    fn serves(&self, f: &FunctionSpec) -> bool {
        !f.topics.is_empty()
    }

    fn read<'a>(&'a self, f: &'a FunctionSpec, _: &'a W) -> ReadFuture<'a> {
        Box::pin(self.read_backlog(f))
    }

    fn retain(&self, live: &[(&FunctionSpec, Option<&W>)]) {
        self.retain_backlogs(live);
    }
}
