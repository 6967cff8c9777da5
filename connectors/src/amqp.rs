//! The AMQP connector (RabbitMQ, AMQP 0-9-1): at-least-once.
//!
//! Topics are routing keys on one durable topic exchange (`ebb` unless
//! `--exchange` says otherwise). Each function has its own durable queue
//! (`ebb-{namespace}-{function}`, or the existing queue its `queue` setting
//! names) bound to the exchange with its topics, so a message for two
//! functions is a copy in each queue and each is acked on its own. A queue's
//! consumer has a prefetch of a few times the function's delivery slots and
//! takes a message into a call only when a slot is free (backpressure). A
//! message is acked after a 2xx; a failed call is retried by the connector
//! while the message stays unacked (RabbitMQ cannot requeue with a delay);
//! a dead letter is published to the exchange with publisher confirms and
//! `mandatory`, into a durable queue the connector binds for each
//! dead-letter topic, and only then is the original acked. Unacked messages
//! go back to their queue when the connection closes, so a crash loses
//! nothing.
//!
//! NATS-style topics are translated into AMQP binding keys: `*` is one word
//! in both, `>` becomes `#` (which in AMQP also matches zero words).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ebb_model::{Function, FunctionSpec};
use futures::StreamExt;
use futures::future::BoxFuture;
use http::HeaderMap;
use lapin::Confirmation;
use lapin::message::Delivery as AmqpMessage;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Notify;

use ebb_runtime::redact_url;

use crate::Error;
use crate::engine::{DeadLetterSink, Delivery, Engine};
use crate::event::Event;
use crate::routing::validate_subject;
use crate::supervisor::{Consumer, ConsumerTask, Retired, Settings, Slots, Source};

/// The topic exchange topics are published to, unless configured.
pub const DEFAULT_EXCHANGE: &str = "ebb";

/// Settings of the AMQP connector.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:5672/vhost`.
    pub url: String,
    /// The topic exchange topics are published to.
    pub exchange: String,
    /// Deliveries in flight across all functions.
    pub max_inflight_total: usize,
    /// How long in-flight calls may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// How long a message may stay unacked (held, or waiting for a retry)
    /// before it is requeued with its attempt count; below RabbitMQ's
    /// `consumer_timeout` (30 min by default), past which the broker closes
    /// the channel.
    pub max_unacked: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: DEFAULT_EXCHANGE.into(),
            max_inflight_total: 1024,
            drain_timeout: Duration::from_secs(30),
            max_unacked: DEFAULT_MAX_UNACKED,
        }
    }
}

/// The default of [`AmqpConfig::max_unacked`]: 25 minutes.
pub const DEFAULT_MAX_UNACKED: Duration = Duration::from_secs(25 * 60);

/// Headers ebb writes on a message it requeues: the attempt it comes back
/// as, no call before this instant (Unix milliseconds), and the topic it
/// was published to (a requeued message is routed to its queue directly).
const ATTEMPT_HEADER: &str = "ebb-attempt";
const RETRY_AT_HEADER: &str = "ebb-retry-at";
const TOPIC_HEADER: &str = "ebb-topic";

/// The AMQP binding key of a (NATS-style) topic.
pub fn binding_key(topic: &str) -> String {
    topic
        .split('.')
        .map(|w| if w == ">" { "#" } else { w })
        .collect::<Vec<_>>()
        .join(".")
}

/// The durable queue that keeps the dead letters of `destination` when no
/// function subscribes to it: `ebb-dead-letters-{destination}`, every
/// character outside `[A-Za-z0-9_.-]` replaced by `_`.
pub fn dead_letter_queue(destination: &str) -> String {
    let clean: String = destination
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("ebb-dead-letters-{clean}")
}

/// Where `spec`'s dead letters go: the routing key and the durable queue
/// that keeps them (`None` with `dead-letter: none`). The default
/// destination has a queue of the function's own,
/// `ebb-dead-{namespace}-{function}`.
pub fn dead_letter_binding(spec: &FunctionSpec) -> Option<(String, String)> {
    let topic = spec.dead_letter_topic()?;
    let queue = match spec.dead_letter {
        None => spec.default_dead_letter_queue(),
        Some(_) => dead_letter_queue(&topic),
    };
    Some((topic, queue))
}

/// How long the expiry of a removed function may take to empty its queue
/// before it is tried again later.
const EXPIRE_WITHIN: Duration = Duration::from_secs(120);

/// A name the broker accepts (at most 255 bytes), or a clear error.
fn short(what: &str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|_| {
        Error::Config(format!(
            "{what} `{}…` is longer than AMQP's 255 bytes; use a shorter one",
            s.chars().take(40).collect::<String>()
        ))
    })
}

/// Connects once; a malformed URL is a configuration error.
async fn connect_once(url: &str, name: &str) -> Result<Connection, Error> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|e| {
        Error::Config(format!(
            "--url {}: not an AMQP URL ({e}); expected amqp://user:password@host:5672/vhost",
            redact_url(url)
        ))
    })?;
    let props = ConnectionProperties::default()
        .with_client_property("connection_name".into(), LongString::from(name));
    Connection::connect_uri(uri, props)
        .await
        .map_err(|e| Error::broker(format!("connect to {}", redact_url(url)), e))
}

/// HTTP headers from an AMQP message's headers and properties. Strings and
/// numbers pass; tables, arrays and byte arrays are left out.
pub fn http_headers(props: &BasicProperties) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(table) = props.headers() {
        for (name, value) in table {
            let Ok(name) = http::HeaderName::from_bytes(name.as_str().as_bytes()) else {
                continue;
            };
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                AMQPValue::Boolean(b) => b.to_string(),
                AMQPValue::ShortShortInt(n) => n.to_string(),
                AMQPValue::ShortShortUInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                AMQPValue::Timestamp(n) => n.to_string(),
                AMQPValue::Float(n) => n.to_string(),
                AMQPValue::Double(n) => n.to_string(),
                _ => continue,
            };
            if let Ok(v) = http::HeaderValue::from_str(&text) {
                out.append(name, v);
            }
        }
    }
    if let Some(ct) = props.content_type()
        && !out.contains_key(http::header::CONTENT_TYPE)
        && let Ok(v) = http::HeaderValue::from_str(ct.as_str())
    {
        out.insert(http::header::CONTENT_TYPE, v);
    }
    out
}

/// AMQP headers (and the content type property) from HTTP headers.
pub fn amqp_properties(h: &HeaderMap) -> BasicProperties {
    let mut table = BTreeMap::new();
    let mut props = BasicProperties::default().with_delivery_mode(2);
    for (name, value) in h {
        if name == http::header::CONTENT_TYPE {
            if let Ok(v) = value.to_str()
                && let Ok(ct) = ShortString::try_new(v)
            {
                props = props.with_content_type(ct);
            }
            continue;
        }
        let Ok(key) = ShortString::try_new(name.as_str()) else {
            continue;
        };
        table.insert(
            key,
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    }
    props.with_headers(FieldTable::from(table))
}

/// Where the event entered RabbitMQ: the `timestamp` property (seconds) when
/// the publisher set one, else now (first receipt).
fn event_time(props: &BasicProperties) -> DateTime<Utc> {
    props
        .timestamp()
        .and_then(|t| i64::try_from(t).ok())
        .and_then(|t| DateTime::from_timestamp(t, 0))
        .unwrap_or_else(Utc::now)
}

/// `ce-id`: the publisher's `message-id`, else a digest of what a
/// redelivery repeats (routing key, timestamp, body), so the id is the same
/// each time the message comes.
fn event_id(msg: &AmqpMessage) -> String {
    if let Some(id) = msg.properties.message_id()
        && !id.as_str().is_empty()
    {
        return id.as_str().to_owned();
    }
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(msg.routing_key.as_str().as_bytes());
    h.update([0]);
    h.update(msg.properties.timestamp().unwrap_or(0).to_be_bytes());
    h.update(&msg.data);
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The event of an AMQP message taken from `queue`.
fn amqp_event(msg: &AmqpMessage, queue: &str) -> Event {
    let mut headers = http_headers(&msg.properties);
    for internal in [ATTEMPT_HEADER, RETRY_AT_HEADER, TOPIC_HEADER] {
        headers.remove(internal);
    }
    Event {
        id: event_id(msg),
        source: format!("/ebb/amqp/{queue}"),
        kind: "io.ebb.amqp.message".into(),
        topic: header_text(&msg.properties, TOPIC_HEADER)
            .unwrap_or_else(|| msg.routing_key.as_str().to_owned()),
        time: event_time(&msg.properties),
        headers,
        body: Bytes::from(msg.data.clone()),
        position: format!("queue {queue} delivery tag {}", msg.delivery_tag),
    }
}

/// The attempt number of a message: the one it was requeued as
/// (`ebb-attempt`, else 1) plus its earlier deliveries as quorum queues count
/// them in `x-delivery-count` (classic queues only say whether it is a
/// redelivery, which the connector's own retries do not need).
fn attempt_of(msg: &AmqpMessage) -> u32 {
    let base = header_text(&msg.properties, ATTEMPT_HEADER)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let count = msg
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get("x-delivery-count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            _ => None,
        })
        .unwrap_or(0);
    base.saturating_add(count)
}

/// An AMQP message being delivered. Retries wait in the engine while the
/// message stays unacked, up to [`AmqpConfig::max_unacked`]; a longer wait
/// requeues it (RabbitMQ's consumer timeout is 30 minutes by default).
struct AmqpDelivery {
    msg: AmqpMessage,
    attempt: u32,
    /// Keeps the channel open until the message is settled (closing it
    /// would requeue the message while its call still runs).
    settling: Arc<Settling>,
}

/// What a function's consumer settles its messages with.
struct Settling {
    /// The channel its messages come on.
    channel: Channel,
    /// Where dead letters and requeued messages are published (confirmed).
    sink: Arc<AmqpDeadLetters>,
    queue: ShortString,
    max_unacked: Duration,
}

/// An ack or nack that reached the channel; `Ok(false)` means the channel
/// was gone (the broker has requeued the message) or it was settled.
fn settled(r: Result<bool, lapin::Error>) -> Result<(), Error> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Ack(
            "the channel closed first; the broker delivers the message again".into(),
        )),
        Err(e) => Err(Error::ack(e)),
    }
}

impl Delivery for AmqpDelivery {
    fn attempt(&self) -> u32 {
        self.attempt
    }
    async fn ack(&mut self) -> Result<(), Error> {
        // A lost ack (connection drop) means a redelivery, never a loss.
        settled(self.msg.acker.ack(BasicAckOptions::default()).await)
    }
    async fn release(&mut self) -> Result<(), Error> {
        settled(
            self.msg
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await,
        )
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        // Dead-lettered (stored, confirmed) or given up: remove it.
        self.ack().await
    }
    fn max_unacked(&self) -> Option<Duration> {
        Some(self.settling.max_unacked)
    }
    fn not_before(&self) -> Option<Duration> {
        let at = header_text(&self.msg.properties, RETRY_AT_HEADER)?
            .parse::<i64>()
            .ok()?;
        let left = at - Utc::now().timestamp_millis();
        u64::try_from(left).ok().map(Duration::from_millis)
    }
    async fn requeue(&mut self, attempt: u32, after: Duration) -> Result<(), Error> {
        // A copy at the end of its own queue (straight to it: no other
        // function's queue gets it), with what the next delivery needs,
        // confirmed before the original goes.
        let props = &self.msg.properties;
        let mut table = props
            .headers()
            .as_ref()
            .map(|t| t.inner().clone())
            .unwrap_or_default();
        let mut text = |name: &str, value: String| {
            table.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        };
        text(ATTEMPT_HEADER, attempt.to_string());
        let at = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
        text(RETRY_AT_HEADER, at.timestamp_millis().to_string());
        if header_text(props, TOPIC_HEADER).is_none() {
            text(TOPIC_HEADER, self.msg.routing_key.as_str().to_owned());
        }
        // The same `ce-id` and `ce-time` when it comes back.
        let copy = props
            .clone()
            .with_headers(FieldTable::from(table))
            .with_message_id(event_id(&self.msg).into())
            .with_timestamp(
                props
                    .timestamp()
                    .unwrap_or_else(|| u64::try_from(Utc::now().timestamp()).unwrap_or(0)),
            )
            .with_delivery_mode(2);
        let s = &self.settling;
        publish_props(
            &s.sink.channel,
            &ShortString::from(""),
            s.queue.clone(),
            copy,
            &self.msg.data,
        )
        .await
        .map_err(|e| Error::broker(format!("requeue to {}", s.queue), e))?;
        self.ack().await
    }
}

/// A header of `props` as text (a string or an integer), if present.
fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Publishes dead letters to the exchange with confirms and `mandatory`:
/// `Ok` only when the broker stored the message in a queue.
pub struct AmqpDeadLetters {
    channel: Channel,
    exchange: ShortString,
}

impl DeadLetterSink for AmqpDeadLetters {
    async fn publish(&self, topic: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        let key = ShortString::try_new(topic)
            .map_err(|e| Error::dead_letter(format!("dead-letter topic {topic}"), e))?;
        publish_confirmed(&self.channel, &self.exchange, key, &headers, &body)
            .await
            .map_err(|e| Error::dead_letter(format!("publish to {topic}"), e))
    }
}

/// Publishes persistently and waits for the broker's confirm; a message no
/// queue took is an error.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &ShortString,
    key: ShortString,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let id = format!("{:032x}", rand::random::<u128>());
    let props = amqp_properties(headers)
        .with_message_id(id.as_str().into())
        .with_timestamp(u64::try_from(Utc::now().timestamp()).unwrap_or(0));
    publish_props(channel, exchange, key, props, body).await
}

/// Publishes `body` with `props` (mandatory) and waits for the broker's
/// confirm; a message no queue took is an error.
async fn publish_props(
    channel: &Channel,
    exchange: &ShortString,
    key: ShortString,
    props: BasicProperties,
    body: &[u8],
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            exchange.clone(),
            key.clone(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(format!(
            "no queue is bound to `{key}` on exchange `{exchange}`, so the message was not stored"
        )),
        Confirmation::Nack(_) => Err("the broker refused to store it (nack)".into()),
        Confirmation::NotRequested => Err("publisher confirms are off".into()),
    }
}

/// Whether the connector serves `spec` (topics that are valid routing keys,
/// or an existing queue), and names that fit AMQP's 255 bytes.
fn check(spec: &FunctionSpec) -> Option<Result<(), String>> {
    if spec.topics.is_empty() && spec.queue.is_none() {
        return None;
    }
    let topic_error = spec.topics.iter().find_map(|t| {
        validate_subject(t)
            .err()
            .or_else(|| (t.len() > 255).then(|| format!("topic `{t}` is longer than 255 bytes")))
    });
    if let Some(err) = topic_error {
        return Some(Err(format!("its topics are not valid routing keys: {err}")));
    }
    if let Some((topic, queue)) = dead_letter_binding(spec)
        && (topic.len() > 255 || queue.len() > 255)
    {
        return Some(Err(
            "its dead-letter topic is too long for AMQP (at most 238 bytes); use a shorter one"
                .into(),
        ));
    }
    if spec.queue_name().len() > 255 {
        return Some(Err(
            "its queue name is longer than 255 bytes; set a shorter `queue`".into(),
        ));
    }
    Some(Ok(()))
}

/// A new channel on `conn` whose publishes the broker confirms.
async fn confirming_channel(conn: &Connection) -> Result<Channel, Error> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("open a channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::broker("publisher confirms", e))?;
    Ok(channel)
}

/// The connection and what was set up on it.
struct Session {
    conn: Connection,
    setup: Channel,
    sink: Arc<AmqpDeadLetters>,
    /// Dead-letter queues declared on this connection.
    dead_queues: std::collections::HashSet<String>,
    /// Fired when the connection or a consumer fails.
    lost: Arc<Notify>,
}

async fn open_session(cfg: &AmqpConfig, exchange: &ShortString) -> Result<Session, Error> {
    let conn = connect_once(&cfg.url, "ebb-connector-amqp").await?;
    let lost = Arc::new(Notify::new());
    {
        let lost = lost.clone();
        let status = conn.status().clone();
        let mut events = conn.events_listener();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                // lapin reports a channel the broker closed (a refused
                // declare, say) here too: only a lost connection counts.
                if let lapin::Event::Error(e) = event {
                    if status.connected() {
                        tracing::debug!(error = %e, "RabbitMQ closed a channel");
                        continue;
                    }
                    tracing::warn!(error = %e, "RabbitMQ connection failed");
                    lost.notify_one();
                    break;
                }
            }
        });
    }
    let setup = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("open a channel", e))?;
    setup
        .exchange_declare(
            exchange.clone(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::broker(format!("declare exchange {exchange}"), e))?;
    let publisher = confirming_channel(&conn).await?;
    Ok(Session {
        conn,
        setup,
        sink: Arc::new(AmqpDeadLetters {
            channel: publisher,
            exchange: exchange.clone(),
        }),
        dead_queues: Default::default(),
        lost,
    })
}

/// The RabbitMQ source of `cfg`, with its supervisor settings; a malformed
/// URL or exchange name is refused here.
pub fn source(cfg: AmqpConfig) -> Result<(AmqpSource, Settings), Error> {
    let exchange = short("--exchange", &cfg.exchange)?;
    let _: lapin::uri::AMQPUri = cfg.url.parse().map_err(|e| {
        Error::Config(format!(
            "--url {}: not an AMQP URL ({e}); expected amqp://user:password@host:5672/vhost",
            redact_url(&cfg.url)
        ))
    })?;
    let settings = Settings::new(cfg.max_inflight_total, cfg.drain_timeout);
    let source = AmqpSource {
        cfg,
        exchange,
        session: None,
    };
    Ok((source, settings))
}

/// The RabbitMQ source: a durable queue per function, bound to the topic
/// exchange with its topics (or an existing queue), consumed on a channel
/// of its own.
pub struct AmqpSource {
    cfg: AmqpConfig,
    exchange: ShortString,
    session: Option<Session>,
}

impl AmqpSource {
    fn session(&self) -> Result<&Session, Error> {
        self.session
            .as_ref()
            .ok_or_else(|| Error::Broker("not connected to RabbitMQ".into()))
    }

    async fn bind(&self, queue: &ShortString, topic: &str, bind: bool) -> Result<(), Error> {
        let s = self.session()?;
        let k = short("topic", &binding_key(topic))?;
        if bind {
            s.setup
                .queue_bind(
                    queue.clone(),
                    self.exchange.clone(),
                    k,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::broker(format!("bind {topic} to {queue}"), e))
        } else {
            s.setup
                .queue_unbind(
                    queue.clone(),
                    self.exchange.clone(),
                    k,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::broker(format!("unbind {topic} from {queue}"), e))
        }
    }
}

impl Source for AmqpSource {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>> {
        check(spec)
    }

    async fn connect(&mut self) -> Result<(), Error> {
        if let Some(old) = self.session.take() {
            // The broker has already requeued every unacked message of it.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                old.conn.close(200, "reconnecting".into()),
            )
            .await;
        }
        self.session = Some(open_session(&self.cfg, &self.exchange).await?);
        Ok(())
    }

    fn lost(&self) -> BoxFuture<'static, ()> {
        match &self.session {
            Some(s) => {
                let lost = s.lost.clone();
                Box::pin(async move { lost.notified().await })
            }
            None => Box::pin(std::future::pending()),
        }
    }

    async fn prepare(&mut self, functions: &[Function]) -> Result<(), Error> {
        let exchange = self.exchange.clone();
        let Some(s) = self.session.as_mut() else {
            return Err(Error::Broker("not connected to RabbitMQ".into()));
        };
        // A channel error (e.g. a refused declare) closes the channel: open
        // another for the next steps.
        if !s.setup.status().connected() {
            s.setup = s
                .conn
                .create_channel()
                .await
                .map_err(|e| Error::broker("open a channel", e))?;
        }
        // Dead letters are kept in a queue of their own even before anyone
        // subscribes to them.
        for (dest, queue) in functions
            .iter()
            .filter_map(|f| dead_letter_binding(&f.spec))
        {
            if s.dead_queues.contains(&dest) {
                continue;
            }
            let queue = short("dead-letter queue", &queue)?;
            let key = short("dead-letter topic", &dest)?;
            declare_durable(&s.setup, &queue)
                .await
                .map_err(|e| Error::broker(format!("declare dead-letter queue {queue}"), e))?;
            s.setup
                .queue_bind(
                    queue.clone(),
                    exchange.clone(),
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::broker(format!("bind dead-letter queue {queue}"), e))?;
            s.dead_queues.insert(dest);
        }
        Ok(())
    }

    async fn start(&mut self, c: Consumer) -> Result<ConsumerTask, Error> {
        let s = self.session()?;
        let (channel, consumer, tag, queue) =
            start_consumer(&self.exchange, s, &c.spec, c.limit.max()).await?;
        let settling = Arc::new(Settling {
            channel,
            sink: s.sink.clone(),
            queue: short("queue", &queue)?,
            max_unacked: self.cfg.max_unacked,
        });
        let lost = s.lost.clone();
        Ok(Box::pin(async move {
            consume(consumer, tag, settling, c, lost).await;
            None
        }))
    }

    async fn refilter(&mut self, old: &FunctionSpec, new: &FunctionSpec) -> Result<bool, Error> {
        // Bindings change where they are; an existing queue is the user's.
        if old.queue.is_some() || new.queue.is_some() || old.queue_name() != new.queue_name() {
            return Ok(false);
        }
        let queue = short("queue", &new.queue_name())?;
        for t in new.topics.iter().filter(|t| !old.topics.contains(t)) {
            self.bind(&queue, t, true).await?;
        }
        for t in old.topics.iter().filter(|t| !new.topics.contains(t)) {
            self.bind(&queue, t, false).await?;
        }
        Ok(true)
    }

    async fn retire(&mut self, Retired { old, now }: Retired<'_>) -> Result<(), Error> {
        if old.queue.is_some() {
            // An existing queue is the user's: never unbound or deleted.
            return Ok(());
        }
        let key = old.key();
        let queue = short("queue", &old.queue_name())?;
        // Topics no longer routed to this queue: all of them when the
        // function is gone (or now consumes another queue), else those
        // dropped by the change.
        let moved = now.is_none_or(|spec| spec.queue_name() != old.queue_name());
        for t in old
            .topics
            .iter()
            .filter(|t| moved || now.is_some_and(|spec| !spec.topics.contains(t)))
        {
            self.bind(&queue, t, false).await?;
        }
        if moved {
            // Nothing new reaches it now. Deleted only when empty and
            // unused: a backlog is never thrown away (a function skipped
            // for a bad setting comes back to it once fixed). A refused
            // delete closes its channel, so it gets one of its own.
            let s = self.session()?;
            let deleted = match s.conn.create_channel().await {
                Ok(ch) => {
                    let r = ch
                        .queue_delete(
                            queue.clone(),
                            QueueDeleteOptions {
                                if_unused: true,
                                if_empty: true,
                                ..Default::default()
                            },
                        )
                        .await;
                    let _ = ch.close(200, "done".into()).await;
                    r.is_ok()
                }
                Err(_) => false,
            };
            if !deleted {
                tracing::warn!(function = %key, %queue, "the queue still holds messages: kept (unbound); delete it yourself if they are not needed");
            }
        }
        Ok(())
    }

    async fn expire(&mut self, engine: &Engine, spec: &FunctionSpec) -> Result<u64, Error> {
        if spec.queue.is_some() {
            // An existing queue is the user's: what it holds stays there.
            return Ok(0);
        }
        let queue = short("queue", &spec.queue_name())?;
        // Nothing new reaches it from now on.
        for t in &spec.topics {
            self.bind(&queue, t, false).await?;
        }
        let s = self.session()?;
        let ch = s
            .conn
            .create_channel()
            .await
            .map_err(|e| Error::broker("open a channel", e))?;
        let mut moved = 0;
        let give_up = tokio::time::Instant::now() + EXPIRE_WITHIN;
        let drained: Result<(), Error> = async {
            while tokio::time::Instant::now() < give_up {
                let got = ch
                    .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| Error::broker(format!("get from {queue}"), e))?;
                let Some(m) = got else {
                    return Ok(());
                };
                let event = amqp_event(&m.delivery, queue.as_str());
                engine.expire_one(spec, &event, s.sink.as_ref()).await?;
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| Error::broker(format!("ack on {queue}"), e))?;
                moved += 1;
            }
            Err(Error::Broker(format!(
                "{queue} still holds messages after {EXPIRE_WITHIN:?}"
            )))
        }
        .await;
        // Closing gives back a message taken but not yet moved.
        let _ = ch.close(200, "done".into()).await;
        drained?;
        self.retire(Retired {
            old: spec,
            now: None,
        })
        .await?;
        Ok(moved)
    }

    async fn close(self) {
        if let Some(s) = self.session {
            // Closing requeues whatever is still unacked. A connection that
            // failed on the way may never answer the close: the broker
            // requeues when the socket goes, with the process.
            match tokio::time::timeout(
                Duration::from_secs(5),
                s.conn.close(200, "ebb connector stopping".into()),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot close the RabbitMQ connection cleanly")
                }
                Err(_) => tracing::warn!("RabbitMQ did not answer the close within 5s"),
            }
        }
    }
}

/// Declares a durable queue (or finds it declared so).
async fn declare_durable(channel: &Channel, queue: &ShortString) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.clone(), options, FieldTable::default())
        .await
        .map(|_| ())
}

/// Declares (or checks) a function's queue, binds its topics and starts
/// consuming on a channel of its own.
async fn start_consumer(
    exchange: &ShortString,
    s: &Session,
    spec: &FunctionSpec,
    limit: usize,
) -> Result<(Channel, lapin::Consumer, String, String), Error> {
    let key = spec.key();
    let queue_name = spec.queue_name();
    let queue = short("queue", &queue_name)?;
    let channel = s
        .conn
        .create_channel()
        .await
        .map_err(|e| Error::broker(format!("open a channel for {key}"), e))?;
    if spec.queue.is_some() {
        // Consume an existing queue as it is: it must exist.
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                Error::broker(
                    format!("queue {queue_name} of {key} (it must exist, as `queue` names it)"),
                    e,
                )
            })?;
    } else {
        declare_durable(&channel, &queue)
            .await
            .map_err(|e| Error::broker(format!("declare queue {queue_name}"), e))?;
        for t in &spec.topics {
            let k = short("topic", &binding_key(t))?;
            channel
                .queue_bind(
                    queue.clone(),
                    exchange.clone(),
                    k,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::broker(format!("bind {t} to {queue_name}"), e))?;
        }
    }
    // Prefetch: what the function's slots take, and as many again
    // waiting, bounded (the broker counts them as unacked, the
    // autoscaler as backlog).
    let prefetch = u16::try_from(limit.saturating_mul(2).clamp(16, 4096)).unwrap_or(4096);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| Error::broker(format!("prefetch for {key}"), e))?;
    let tag = format!("ebb-{}", spec.durable_name());
    let consumer = channel
        .basic_consume(
            queue.clone(),
            short("consumer tag", &tag)?,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::broker(format!("consume {queue_name} for {key}"), e))?;
    Ok((channel, consumer, tag, queue_name))
}

async fn consume(
    mut consumer: lapin::Consumer,
    tag: String,
    settling: Arc<Settling>,
    c: Consumer,
    lost: Arc<Notify>,
) {
    let (channel, queue) = (&settling.channel, settling.queue.as_str());
    loop {
        // A message is taken into a call only when a slot of the function
        // is free, then one of the process; until then it waits in the
        // prefetch (backpressure). An idle function holds no process slot.
        let Some(own) = c.function_slot().await else {
            break;
        };
        let next = tokio::select! {
            biased;
            () = c.stop.cancelled() => break,
            m = consumer.next() => m,
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                c.engine.metrics().error("consume");
                tracing::warn!(function = %c.key(), error = %e, "consumer failed");
                lost.notify_one();
                break;
            }
            None => {
                tracing::warn!(function = %c.key(), "the broker cancelled the consumer (queue deleted?)");
                lost.notify_one();
                break;
            }
        };
        // A slot of the process, then the message's bytes; once stopped, it
        // goes back to the queue.
        let admitted = match c.process_slot().await {
            Some(any) => {
                let mut slots = Slots::new(own, any);
                c.admit(&mut slots, msg.data.len()).await.then_some(slots)
            }
            None => None,
        };
        let Some(slots) = admitted else {
            let _ = msg
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            break;
        };
        let event = amqp_event(&msg, queue);
        let delivery = AmqpDelivery {
            attempt: attempt_of(&msg),
            msg,
            settling: settling.clone(),
        };
        c.deliver(slots, event, delivery, settling.sink.clone());
    }
    // No more deliveries to this process: what the prefetch still holds
    // goes back to the queue (before any held event is given back, so the
    // order stays close to the queue's).
    if let Ok(tag) = ShortString::try_new(tag.as_str())
        && let Err(e) = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
    {
        tracing::debug!(function = %c.key(), error = %e, "cancel consumer");
    }
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
    {
        let _ = m
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
    }
    tracing::debug!(function = %c.key(), "consumer stopped");
}

/// Publishes one message (for `ebb publish --amqp`) to `exchange` with
/// routing key `topic`, persistent, and waits for the broker's confirm; a
/// topic no queue is bound to is an error.
pub async fn publish(
    url: &str,
    exchange: &str,
    topic: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(), Error> {
    let exchange = short("--exchange", exchange)?;
    let key = short("topic", topic)?;
    let conn = connect_once(url, "ebb-publish").await?;
    let channel = confirming_channel(&conn).await?;
    let r = publish_confirmed(&channel, &exchange, key, headers, &body).await;
    let _ = conn.close(200, "done".into()).await;
    r.map_err(|e| {
        if e.contains("NOT_FOUND") {
            Error::Broker(format!(
                "exchange `{exchange}` does not exist ({e}); start `ebb connector amqp` first, or pass the exchange it uses"
            ))
        } else if e.contains("no queue is bound") {
            Error::Broker(format!(
                "{e}; is a connector routing topic `{topic}`?"
            ))
        } else {
            Error::broker(format!("publish to {topic}"), e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_become_binding_keys() {
        for (topic, key) in [
            ("orders", "orders"),
            ("pay.*", "pay.*"),
            ("pay.>", "pay.#"),
            (">", "#"),
            // Only a whole word is a wildcard.
            ("a.>b", "a.>b"),
        ] {
            assert_eq!(binding_key(topic), key, "topic {topic}");
        }
    }

    #[test]
    fn dead_letter_queues_are_named_after_their_topic() {
        assert_eq!(
            dead_letter_queue("orders.dead"),
            "ebb-dead-letters-orders.dead"
        );
        assert_eq!(dead_letter_queue("a b/c"), "ebb-dead-letters-a_b_c");
    }

    #[test]
    fn headers_round_trip_and_content_type_is_a_property() {
        let mut h = HeaderMap::new();
        h.insert("x-order", "7".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let props = amqp_properties(&h);
        assert_eq!(
            props.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let back = http_headers(&props);
        assert_eq!(back.get("x-order").unwrap(), "7");
        assert_eq!(back.get("content-type").unwrap(), "application/json");
    }

    #[test]
    fn numbers_in_amqp_headers_pass_and_tables_do_not() {
        let mut t = FieldTable::default();
        t.insert("x-n".into(), AMQPValue::LongLongInt(-3));
        t.insert("x-t".into(), AMQPValue::FieldTable(FieldTable::default()));
        t.insert("x-bad".into(), AMQPValue::LongString("a\nb".into()));
        let h = http_headers(&BasicProperties::default().with_headers(t));
        assert_eq!(h.get("x-n").unwrap(), "-3");
        assert!(h.get("x-t").is_none());
        assert!(h.get("x-bad").is_none(), "not a valid header value");
    }

    #[test]
    fn too_long_names_are_a_clear_error() {
        let long = "q".repeat(300);
        let e = short("queue", &long).unwrap_err().to_string();
        assert!(e.contains("queue") && e.contains("255"), "{e}");
    }

    #[test]
    fn ids_are_the_message_id_or_stable() {
        let mk = |props: BasicProperties, tag: u64| {
            let mut d = AmqpMessage::mock(tag, "ebb".into(), "orders".into(), false, b"x".to_vec());
            d.properties = props;
            d
        };
        let a = mk(BasicProperties::default().with_message_id("m-1".into()), 1);
        assert_eq!(event_id(&a), "m-1");
        let b1 = mk(BasicProperties::default().with_timestamp(5), 1);
        let b2 = mk(BasicProperties::default().with_timestamp(5), 9);
        assert_eq!(event_id(&b1), event_id(&b2), "a redelivery has the same id");
        let c = mk(BasicProperties::default().with_timestamp(6), 1);
        assert_ne!(event_id(&b1), event_id(&c));
        assert_eq!(
            event_time(&b1.properties),
            DateTime::from_timestamp(5, 0).unwrap()
        );
    }

    #[test]
    fn quorum_delivery_count_gives_the_attempt() {
        let mut t = FieldTable::default();
        t.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        let mut d = AmqpMessage::mock(1, "ebb".into(), "orders".into(), true, Vec::new());
        d.properties = BasicProperties::default().with_headers(t);
        assert_eq!(attempt_of(&d), 3);
        d.properties = BasicProperties::default();
        assert_eq!(attempt_of(&d), 1);
    }
}
