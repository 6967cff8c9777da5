//! The NATS JetStream scaler: a function's backlog is its durable consumer's
//! `num_pending` (not yet delivered) plus `num_ack_pending` (delivered, not
//! yet acked), as the consumer's leader reports it.

use std::time::Duration;

use async_nats::jetstream;
use ebb_model::FunctionSpec;

/// Why a backlog could not be read. The policy treats every error as
/// "unknown" (hold), never as 0.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum NatsScalerError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("stream {stream} not found: is a NATS connector routing this function's topics?")]
    #[strum(serialize = "missing_stream")]
    NoStream { stream: String },
    #[error(
        "consumer {consumer} not found on stream {stream}: the NATS connector creates it when it routes the function"
    )]
    #[strum(serialize = "missing_consumer")]
    NoConsumer { stream: String, consumer: String },
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("NATS: {0}")]
    Request(String),
}

impl NatsScalerError {
    pub fn metric_label(&self) -> &'static str {
        self.into()
    }
}

/// One read of a consumer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Pending + ack-pending.
    pub backlog: f64,
    /// The last stream sequence delivered to the consumer.
    pub delivered: u64,
    /// Deliveries no longer waiting for their ack (the consumer's delivered
    /// count less its ack-pending): a counter of what drained the backlog,
    /// for the policy's rate estimate. Redeliveries count again.
    pub finished: u64,
}

impl From<Reading> for super::Reading {
    fn from(r: Reading) -> Self {
        Self {
            value: r.backlog,
            finished: Some(r.finished),
            position: Some(r.delivered),
            cap: None,
            // Pending + ack-pending: in flight included.
            in_flight_unseen: false,
        }
    }
}

impl super::QueueScaler for NatsScaler {
    const NAME: &'static str = "nats";

    async fn read_backlog(&self, f: &FunctionSpec) -> Result<super::Reading, super::ReadError> {
        Ok(self.read(f).await?.into())
    }
}

/// Reads JetStream consumer backlogs.
#[derive(Clone)]
pub struct NatsScaler {
    js: jetstream::Context,
    stream: String,
    timeout: Duration,
}

impl NatsScaler {
    pub async fn connect(
        url: &str,
        stream: &str,
        timeout: Duration,
    ) -> Result<Self, NatsScalerError> {
        let client = async_nats::ConnectOptions::new()
            .name("ebb-autoscaler")
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| NatsScalerError::Connect {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self::new(jetstream::new(client), stream, timeout))
    }

    pub fn new(js: jetstream::Context, stream: &str, timeout: Duration) -> Self {
        Self {
            js,
            stream: stream.to_string(),
            timeout,
        }
    }

    /// The backlog of `f`: pending + ack-pending of its durable consumer.
    pub async fn backlog(&self, f: &FunctionSpec) -> Result<f64, NatsScalerError> {
        self.read(f).await.map(|r| r.backlog)
    }

    /// The backlog and how far the consumer has delivered.
    pub async fn read(&self, f: &FunctionSpec) -> Result<Reading, NatsScalerError> {
        let consumer = f.durable_name();
        let read = async {
            let stream = self.js.get_stream(&self.stream).await.map_err(|e| {
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(_)
                ) && e.to_string().contains("not found")
                {
                    NatsScalerError::NoStream {
                        stream: self.stream.clone(),
                    }
                } else {
                    NatsScalerError::Request(e.to_string())
                }
            })?;
            let info = stream.consumer_info(&consumer).await.map_err(|e| {
                let text = e.to_string();
                if text.contains("not found") {
                    NatsScalerError::NoConsumer {
                        stream: self.stream.clone(),
                        consumer: consumer.clone(),
                    }
                } else {
                    NatsScalerError::Request(text)
                }
            })?;
            Ok::<_, NatsScalerError>(Reading {
                backlog: info.num_pending as f64 + info.num_ack_pending as f64,
                delivered: info.delivered.stream_sequence,
                finished: info
                    .delivered
                    .consumer_sequence
                    .saturating_sub(info.num_ack_pending as u64),
            })
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| NatsScalerError::Timeout(self.timeout))?
    }
}
