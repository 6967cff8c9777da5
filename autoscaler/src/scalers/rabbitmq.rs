//! The RabbitMQ scaler: a function's backlog is the message count of its queue
//! ([`FunctionSpec::queue_name`]), read one of two ways:
//!
//! * **Management HTTP API** ([`RabbitMqScaler::management`]), preferred:
//!   `GET {url}/api/queues/{vhost}/{queue}` with basic auth, backlog =
//!   `messages_ready` + `messages_unacknowledged`. These counters are
//!   statistics: they lag the queue by ~1–5 s and are *missing* for the first
//!   seconds of a new queue. Missing counters are an error
//!   ([`RabbitMqScalerError::NoStats`]), never 0.
//! * **AMQP passive `queue.declare`** ([`RabbitMqScaler::amqp`]): exact and
//!   immediate, but `message_count` counts **ready messages only**: messages
//!   delivered to a consumer and not yet acked are not included, so a busy
//!   function's backlog reads low (down to 0 while every message is in
//!   flight). Use the management API when it is available.
//!
//! The management API also tells how many messages the queue's consumers
//! finished ([`Reading::finished`]): the queue's cumulative
//! `message_stats.ack`, plus the messages taken without acknowledgement
//! (`deliver_no_ack`, `get_no_ack`), which leave the queue on delivery.
//! RabbitMQ leaves counters that are still zero out of `message_stats`, and
//! `message_stats` out of a queue without statistics (a new queue, or with
//! `management.rates_mode = none`): the count is `None` ("unknown"), never
//! 0, until `ack` is present, so a count that was merely not reported never
//! reads as a jump later. The counters restart when the queue is re-created
//! or the node loses its statistics; the policy reads that decrease as
//! "unknown". `deliver_get` is not used: it counts hand-outs, redeliveries
//! included, which grow as the consumers' prefetch fills rather than as the
//! function finishes. A passive declare cannot tell: `None`.
//!
//! A missing queue (HTTP 404, or the broker closing the channel with
//! `NOT_FOUND`) is an error ([`RabbitMqScalerError::NoQueue`]), never 0. The
//! policy treats every error as "unknown" and holds the current replica count.

use std::time::Duration;

use ebb_model::FunctionSpec;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ErrorKind, options::QueueDeclareOptions};
use reqwest::{Client, StatusCode};
use serde_json::Value as Json;
use tokio::sync::Mutex;

use crate::scalers::prometheus::HttpAuth;

/// The largest management API answer read: 1 MiB (a queue object is a few KiB).
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The longest excerpt of an error body kept in an error.
const BODY_EXCERPT_CHARS: usize = 200;

/// Why a backlog could not be read. The policy treats every error as
/// "unknown" (hold), never as 0.
#[derive(Debug, thiserror::Error)]
pub enum RabbitMqScalerError {
    #[error("cannot connect to RabbitMQ at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("RabbitMQ refused the credentials or permissions: {0}")]
    Auth(String),
    /// A token or password file cannot be read.
    #[error("RabbitMQ management API credentials: {0}")]
    Credentials(String),
    #[error(
        "queue {queue} not found in vhost {vhost}: is a RabbitMQ connector routing this function?"
    )]
    NoQueue { vhost: String, queue: String },
    #[error(
        "queue {queue} in vhost {vhost} has no message statistics yet (the management API lags a new queue by a few seconds)"
    )]
    NoStats { vhost: String, queue: String },
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ management API answered {status}: {body}")]
    HttpStatus { status: u16, body: String },
    #[error("RabbitMQ management API answer is not usable: {0}")]
    Body(String),
    #[error("RabbitMQ: {0}")]
    Request(String),
}

impl RabbitMqScalerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Auth(_) => "auth",
            Self::Credentials(_) => "credentials",
            Self::NoQueue { .. } => "missing_queue",
            Self::NoStats { .. } => "missing_stats",
            Self::Timeout(_) => "timeout",
            Self::HttpStatus { .. } => "http_status",
            Self::Body(_) => "body",
            Self::Request(_) => "request",
        }
    }
}

/// One read of a queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Ready + unacked (management API) or ready only (AMQP).
    pub backlog: f64,
    /// Messages waiting to be delivered.
    pub ready: u64,
    /// Messages delivered and not yet acked; `None` over AMQP, which cannot
    /// tell.
    pub unacked: Option<u64>,
    /// Messages the queue's consumers finished so far (acked, or taken
    /// without acknowledgement), a counter that only grows while the queue
    /// and its statistics live. `None` when unknown: over AMQP, and while
    /// the management API has no message statistics for the queue.
    pub finished: Option<u64>,
}

impl From<Reading> for super::Reading {
    fn from(r: Reading) -> Self {
        Self {
            value: r.backlog,
            finished: r.finished,
            in_flight_unseen: r.unacked.is_none(),
            ..Self::default()
        }
    }
}

impl super::QueueScaler for RabbitMqScaler {
    const NAME: &'static str = "rabbitmq";

    async fn read_backlog(&self, f: &FunctionSpec) -> Result<super::Reading, super::ReadError> {
        Ok(self.read(f).await?.into())
    }
}

/// Where the management API is and how to log in.
#[derive(Debug, Clone)]
pub struct Management {
    /// `http(s)://host:15672`, without `/api`; a trailing `/` is ignored.
    pub url: String,
    /// The vhost of the functions' queues, e.g. `/`.
    pub vhost: String,
    pub user: String,
    pub password: String,
}

enum Source {
    Management {
        client: Client,
        config: Management,
        /// Replaces `config.user`/`password` when it sets a token or user.
        auth: Option<HttpAuth>,
    },
    Amqp {
        url: String,
        /// The vhost, for error messages.
        vhost: String,
        /// Opened on first use, reopened when it is no longer connected.
        connection: Mutex<Option<Connection>>,
    },
}

/// Reads RabbitMQ queue backlogs.
pub struct RabbitMqScaler {
    source: Source,
    timeout: Duration,
}

impl RabbitMqScaler {
    /// Reads through the management HTTP API (ready + unacked).
    pub fn management(config: Management, timeout: Duration) -> Result<Self, RabbitMqScalerError> {
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent("ebb-autoscaler")
            .build()
            .map_err(|e| RabbitMqScalerError::Request(e.to_string()))?;
        let config = Management {
            url: config.url.trim_end_matches('/').to_string(),
            ..config
        };
        Ok(Self {
            source: Source::Management {
                client,
                config,
                auth: None,
            },
            timeout,
        })
    }

    /// As [`Self::management`], but authenticating with `auth` when it sets a
    /// bearer token (RabbitMQ's OAuth 2 plugin) or basic auth (the password
    /// file is read on every request, so a rotated secret takes effect
    /// without a restart) instead of `config.user`/`config.password`, and
    /// trusting only `auth.ca_file`, when set, for TLS.
    pub fn management_with_auth(
        config: Management,
        auth: HttpAuth,
        timeout: Duration,
    ) -> Result<Self, RabbitMqScalerError> {
        let client = auth
            .client_builder()
            .map_err(|e| RabbitMqScalerError::Credentials(e.to_string()))?
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| RabbitMqScalerError::Request(e.to_string()))?;
        let config = Management {
            url: config.url.trim_end_matches('/').to_string(),
            ..config
        };
        let sets_credentials = auth.bearer_token_file.is_some() || auth.basic_auth.is_some();
        Ok(Self {
            source: Source::Management {
                client,
                config,
                auth: sets_credentials.then_some(auth),
            },
            timeout,
        })
    }

    /// Reads with a passive `queue.declare` over AMQP (ready messages only;
    /// unacked are not included). `url` is `amqp(s)://user:pw@host:port/vhost`;
    /// the connection is opened on the first read and reopened after it drops.
    pub fn amqp(url: &str, timeout: Duration) -> Result<Self, RabbitMqScalerError> {
        let uri: lapin::uri::AMQPUri = url.parse().map_err(|e| RabbitMqScalerError::Connect {
            url: ebb_runtime::redact_url(url),
            message: format!("invalid AMQP URL: {e}"),
        })?;
        Ok(Self {
            source: Source::Amqp {
                url: url.to_string(),
                vhost: uri.vhost,
                connection: Mutex::new(None),
            },
            timeout,
        })
    }

    /// The backlog of `f`'s queue.
    pub async fn backlog(&self, f: &FunctionSpec) -> Result<f64, RabbitMqScalerError> {
        self.read(f).await.map(|r| r.backlog)
    }

    /// The backlog of `f`'s queue with its parts.
    pub async fn read(&self, f: &FunctionSpec) -> Result<Reading, RabbitMqScalerError> {
        self.read_queue(&f.queue_name()).await
    }

    /// The backlog of a queue by name.
    pub async fn read_queue(&self, queue: &str) -> Result<Reading, RabbitMqScalerError> {
        let read = async {
            match &self.source {
                Source::Management {
                    client,
                    config,
                    auth,
                } => read_management(client, config, auth.as_ref(), queue).await,
                Source::Amqp {
                    url,
                    vhost,
                    connection,
                } => read_amqp(url, vhost, connection, queue).await,
            }
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| RabbitMqScalerError::Timeout(self.timeout))?
    }
}

async fn read_management(
    client: &Client,
    config: &Management,
    auth: Option<&HttpAuth>,
    queue: &str,
) -> Result<Reading, RabbitMqScalerError> {
    let url = format!(
        "{}/api/queues/{}/{}",
        config.url,
        encode_segment(&config.vhost),
        encode_segment(queue)
    );
    let request = client.get(&url);
    let (request, user) = match auth {
        Some(auth) => (
            auth.apply(request)
                .await
                .map_err(|e| RabbitMqScalerError::Credentials(e.to_string()))?,
            auth.basic_auth
                .as_ref()
                .map_or("(bearer token)", |(user, _)| user.as_str()),
        ),
        None => (
            request.basic_auth(&config.user, Some(&config.password)),
            config.user.as_str(),
        ),
    };
    let mut response = request.send().await.map_err(|e| request_error(e, config))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| request_error(e, config))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(RabbitMqScalerError::Body(format!(
                "larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(RabbitMqScalerError::NoQueue {
                vhost: config.vhost.clone(),
                queue: queue.to_string(),
            });
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(RabbitMqScalerError::Auth(format!(
                "management API answered {status} for user {user}"
            )));
        }
        _ => {
            return Err(RabbitMqScalerError::HttpStatus {
                status: status.as_u16(),
                body: excerpt(&String::from_utf8_lossy(&body)),
            });
        }
    }
    let json: Json = serde_json::from_slice(&body)
        .map_err(|e| RabbitMqScalerError::Body(format!("not JSON: {e}")))?;
    parse_queue(&json).ok_or_else(|| RabbitMqScalerError::NoStats {
        vhost: config.vhost.clone(),
        queue: queue.to_string(),
    })
}

/// `messages_ready` + `messages_unacknowledged` of a management API queue
/// object; `None` unless both are present non-negative integers. The
/// finished count is [`parse_finished`]'s.
pub fn parse_queue(json: &Json) -> Option<Reading> {
    let ready = json.get("messages_ready")?.as_u64()?;
    let unacked = json.get("messages_unacknowledged")?.as_u64()?;
    Some(Reading {
        backlog: ready as f64 + unacked as f64,
        ready,
        unacked: Some(unacked),
        finished: parse_finished(json),
    })
}

/// `message_stats.ack` + `deliver_no_ack` + `get_no_ack` of a management API
/// queue object: messages its consumers finished so far. `None` when
/// `message_stats.ack` is missing (RabbitMQ omits counters that are still
/// zero, and all of them while the queue has no statistics) or any of the
/// three is not a non-negative integer; the other two are 0 when missing
/// next to `ack`, as the API omits them while they are zero.
pub fn parse_finished(json: &Json) -> Option<u64> {
    let stats = json.get("message_stats")?;
    let mut finished = stats.get("ack")?.as_u64()?;
    for field in ["deliver_no_ack", "get_no_ack"] {
        if let Some(n) = stats.get(field) {
            finished = finished.checked_add(n.as_u64()?)?;
        }
    }
    Some(finished)
}

fn request_error(e: reqwest::Error, config: &Management) -> RabbitMqScalerError {
    if e.is_timeout() {
        // The caller's own timeout reports the same duration.
        RabbitMqScalerError::Request(format!("timed out: {}", e.without_url()))
    } else if e.is_connect() {
        RabbitMqScalerError::Connect {
            url: config.url.clone(),
            message: e.without_url().to_string(),
        }
    } else {
        RabbitMqScalerError::Request(e.without_url().to_string())
    }
}

async fn read_amqp(
    url: &str,
    vhost: &str,
    connection: &Mutex<Option<Connection>>,
    queue: &str,
) -> Result<Reading, RabbitMqScalerError> {
    let mut guard = connection.lock().await;
    if !guard.as_ref().is_some_and(|c| c.status().connected()) {
        *guard = None;
        let opened = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| match amqp_soft_error(&e) {
                Some(AMQPSoftError::ACCESSREFUSED) => RabbitMqScalerError::Auth(e.to_string()),
                _ => RabbitMqScalerError::Connect {
                    url: ebb_runtime::redact_url(url),
                    message: e.to_string(),
                },
            })?;
        *guard = Some(opened);
    }
    let Some(conn) = guard.as_ref() else {
        unreachable!("connection opened above");
    };
    // A fresh channel per read: a failed passive declare closes its channel.
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| RabbitMqScalerError::Request(e.to_string()))?;
    drop(guard);
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await;
    let declared = match declared {
        Ok(q) => q,
        Err(e) => {
            // The broker closed the channel already on a channel error.
            return Err(match amqp_soft_error(&e) {
                Some(AMQPSoftError::NOTFOUND) => RabbitMqScalerError::NoQueue {
                    vhost: vhost.to_string(),
                    queue: queue.to_string(),
                },
                Some(AMQPSoftError::ACCESSREFUSED) => RabbitMqScalerError::Auth(e.to_string()),
                _ => RabbitMqScalerError::Request(e.to_string()),
            });
        }
    };
    let ready = u64::from(declared.message_count());
    // Best effort: the count is read; a failed close does not change it.
    let _ = channel.close(200, "ebb-autoscaler read".into()).await;
    Ok(Reading {
        backlog: ready as f64,
        ready,
        unacked: None,
        finished: None,
    })
}

fn amqp_soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(err) => match err.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Percent-encodes one URL path segment (everything but RFC 3986 unreserved
/// characters), so the default vhost `/` becomes `%2F`.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(BODY_EXCERPT_CHARS).collect();
    if text.chars().count() > BODY_EXCERPT_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_default_vhost() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("ebb-1_a.b~"), "ebb-1_a.b~");
        assert_eq!(encode_segment("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn missing_stats_are_not_zero() {
        assert_eq!(parse_queue(&serde_json::json!({"name": "q"})), None);
        assert_eq!(parse_queue(&serde_json::json!({"messages_ready": 3})), None);
        assert_eq!(
            parse_queue(&serde_json::json!({"messages_ready": 3, "messages_unacknowledged": 2})),
            Some(Reading {
                backlog: 5.0,
                ready: 3,
                unacked: Some(2),
                finished: None,
            })
        );
    }

    #[test]
    fn finished_counts_acks_and_unacknowledged_takes() {
        let queue = |stats: serde_json::Value| {
            let mut q = serde_json::json!({"messages_ready": 3, "messages_unacknowledged": 2});
            q["message_stats"] = stats;
            q
        };
        // RabbitMQ 3.10 answers for a queue that has only been published to.
        let published = queue(serde_json::json!({
            "publish": 20, "publish_details": {"rate": 0.0}
        }));
        assert_eq!(parse_finished(&published), None);
        // A new or idle queue: no `message_stats` at all.
        assert_eq!(
            parse_finished(&serde_json::json!({"messages_ready": 0})),
            None
        );
        let acked = queue(serde_json::json!({
            "ack": 6, "ack_details": {"rate": 1.2},
            "deliver": 16, "deliver_get": 16, "publish": 20, "redeliver": 0
        }));
        assert_eq!(parse_finished(&acked), Some(6));
        assert_eq!(
            parse_queue(&acked).map(|r| r.finished),
            Some(Some(6)),
            "the reading carries it"
        );
        let mixed = queue(serde_json::json!({
            "ack": 6, "deliver_no_ack": 4, "get_no_ack": 1, "deliver_get": 30
        }));
        assert_eq!(parse_finished(&mixed), Some(11));
        // Not counters: unknown, never 0.
        for bad in [
            serde_json::json!({"ack": -1}),
            serde_json::json!({"ack": "6"}),
            serde_json::json!({"ack": 6, "get_no_ack": null}),
            serde_json::json!({"ack": u64::MAX, "deliver_no_ack": 1}),
            serde_json::json!([]),
        ] {
            assert_eq!(parse_finished(&queue(bad.clone())), None, "{bad}");
        }
    }
}
