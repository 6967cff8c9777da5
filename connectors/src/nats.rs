//! The NATS connector: JetStream (at-least-once, the default) or core NATS
//! (at-most-once, request/reply).
//!
//! JetStream: one stream (`EBB`, file storage, Interest retention) captures
//! every topic of the routing table; each function has its own durable pull
//! consumer filtered to its topics, so a message shared by two functions stays
//! until both acked it. A consumer pulls only as many messages as the
//! function has free delivery slots (backpressure). A message is acked after
//! a 2xx, NAKed with the retry policy's delay after a failure, kept in
//! progress (`+WPI`) while a call or a hold outlasts half the ack wait, and
//! terminated only after its dead letter was stored by the `EBB_DEAD` stream.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use ebb_model::{Function, FunctionSpec, NO_DEAD_LETTER};
use ebb_runtime::Retrying;
use futures::StreamExt;
use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::engine::{DeadLetterSink, Delivery, Engine, InProcess, Reply};
use crate::event::Event;
use crate::routing::{covers, minimal_subjects, validate_subject};
use crate::supervisor::{Consumer, ConsumerTask, Settings, Source, accepts_names};

/// JetStream (at-least-once) or core NATS (at-most-once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    JetStream,
    Core,
}

/// How to reach and authenticate to NATS.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub creds_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
}

/// Settings of the NATS connector.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    pub mode: Mode,
    pub auth: Auth,
    /// The stream capturing every topic.
    pub stream: String,
    /// Limits of that stream (0 = unlimited).
    pub stream_max_age: Duration,
    pub stream_max_bytes: i64,
    /// The stream capturing dead-letter subjects.
    pub dead_stream: String,
    pub dead_max_age: Duration,
    /// Replicas of the streams ebb creates (an existing stream keeps its own).
    pub stream_replicas: usize,
    /// The consumers' ack wait.
    pub ack_wait: Duration,
    /// Deliveries in flight across all functions.
    pub max_inflight_total: usize,
    /// How long in-flight calls may take to finish on shutdown.
    pub drain_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            mode: Mode::JetStream,
            auth: Auth::default(),
            stream: "EBB".into(),
            stream_max_age: Duration::ZERO,
            stream_max_bytes: 0,
            dead_stream: "EBB_DEAD".into(),
            dead_max_age: Duration::from_secs(14 * 24 * 3600),
            stream_replicas: 1,
            ack_wait: Duration::from_secs(30),
            max_inflight_total: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Connects with the configured options; retries until connected or `stop`.
pub async fn connect(
    cfg: &NatsConfig,
    name: &str,
    stop: &CancellationToken,
) -> Result<async_nats::Client, Error> {
    let mut retry = Retrying::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match connect_once(cfg, name).await {
            Ok(c) => return Ok(c),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                let delay = retry.next_pause();
                tracing::warn!(url = %cfg.url, error = %e, ?delay, "cannot connect to NATS; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Err(e),
                }
            }
        }
    }
}

async fn connect_once(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let a = &cfg.auth;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(path) = &a.creds_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            Error::Config(format!(
                "--nats-creds {}: cannot read the credentials file: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(t) = &a.token {
        opts = opts.token(t.clone());
    }
    match (&a.user, &a.password) {
        (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "--nats-user and --nats-password go together".into(),
            ));
        }
    }
    if let Some(ca) = &a.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => opts = opts.add_client_certificate(c.clone(), k.clone()),
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "--nats-tls-cert and --nats-tls-key go together".into(),
            ));
        }
    }
    if a.tls_required {
        opts = opts.require_tls(true);
    }
    opts.connect(cfg.url.as_str())
        .await
        .map_err(|e| Error::broker(format!("cannot connect to {}", cfg.url), e))
}

/// Converts NATS headers to HTTP headers (names that are not valid HTTP
/// header names are skipped).
pub fn http_headers(h: Option<&async_nats::HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    let Some(h) = h else { return out };
    for (name, values) in h.iter() {
        let Ok(name) = http::HeaderName::from_bytes(AsRef::<[u8]>::as_ref(name)) else {
            continue;
        };
        for v in values {
            if let Ok(v) = http::HeaderValue::from_str(v.as_str()) {
                out.append(name.clone(), v);
            }
        }
    }
    out
}

/// Converts HTTP headers to NATS headers.
pub fn nats_headers(h: &HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, value) in h {
        if let Ok(v) = value.to_str() {
            out.append(name.as_str(), v);
        }
    }
    out
}

/// Publishes dead letters with a JetStream publish, so `Ok` means a stream
/// stored them.
pub struct NatsDeadLetters {
    js: jetstream::Context,
}

impl DeadLetterSink for NatsDeadLetters {
    async fn publish(&self, topic: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        let ack = self
            .js
            .publish_with_headers(topic.to_string(), nats_headers(&headers), body)
            .await
            .map_err(|e| Error::dead_letter(format!("publish to {topic}"), e))?;
        ack.await.map_err(|e| {
            Error::dead_letter(format!("no stream stored the dead letter on {topic}"), e)
        })?;
        Ok(())
    }
}

/// How long the expiry of a removed function may take to empty its consumer
/// before it is tried again later (its unacked messages come back after the
/// ack wait).
const EXPIRE_WITHIN: Duration = Duration::from_secs(120);

/// How long one pull request waits at the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long past its expiry a pull is waited for before it is taken as lost.
const PULL_GRACE: Duration = Duration::from_millis(500);

/// A JetStream message being delivered.
struct JsDelivery {
    msg: jetstream::Message,
    attempt: u32,
    progress: Duration,
}

impl Delivery for JsDelivery {
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn redelivers(&self) -> bool {
        true
    }
    fn progress_interval(&self) -> Option<Duration> {
        Some(self.progress)
    }
    async fn ack(&mut self) -> Result<(), Error> {
        // A plain ack: if it is lost (connection drop), the broker redelivers
        // after the ack wait and the function sees a repeat; nothing is lost.
        // A confirmed ack would cost a round trip per event.
        self.msg.ack().await.map_err(Error::ack)
    }
    async fn retry_later(&mut self, delay: Duration) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(Error::ack)
    }
    async fn in_progress(&mut self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(Error::ack)
    }
    async fn release(&mut self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(Error::ack)
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        self.msg
            .double_ack_with(AckKind::Term)
            .await
            .map_err(Error::ack)
    }
}

/// The reply subject of a core NATS request.
struct NatsReply {
    client: async_nats::Client,
    subject: async_nats::Subject,
}

impl Reply for NatsReply {
    async fn send(self, body: Bytes) -> Result<(), Error> {
        self.client
            .publish(self.subject, body)
            .await
            .map_err(|e| Error::broker("reply", e))
    }
}

/// The event of a JetStream message.
fn js_event(msg: &jetstream::Message, stream_name: &str) -> Event {
    let (seq, time) = match msg.info() {
        Ok(i) => (i.stream_sequence, i.published),
        Err(_) => (0, Utc::now()),
    };
    Event {
        id: seq.to_string(),
        source: format!("/ebb/nats/{stream_name}"),
        kind: "io.ebb.nats.message".into(),
        topic: msg.subject.to_string(),
        time: time_utc(time),
        headers: http_headers(msg.headers.as_ref()),
        body: msg.payload.clone(),
        position: format!("stream {stream_name} sequence {seq}"),
    }
}

fn time_utc(t: DateTime<Utc>) -> DateTime<Utc> {
    t
}

/// The subject under which every default dead-letter destination
/// (`ebb.dead.{namespace}.{function}`) is captured.
const DEFAULT_DEAD_LETTERS: &str = "ebb.dead.>";

/// The stream `want` names, created as `want` when missing. One that exists
/// is the operator's as much as ebb's: only its subjects are changed (to
/// `want`'s), never its retention, limits or replicas.
async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<stream::Stream, Error> {
    let name = want.name.clone();
    let failed = |e: crate::BoxError| Error::broker(format!("stream {name}"), e);
    match js.get_stream(&name).await {
        Ok(stream) => {
            let mut config = stream.cached_info().config.clone();
            if same_subjects(&config.subjects, &want.subjects) {
                return Ok(stream);
            }
            tracing::info!(stream = %name, from = ?config.subjects, to = ?want.subjects, "changing the stream's subjects");
            config.subjects = want.subjects;
            js.update_stream(&config)
                .await
                .map_err(|e| failed(e.into()))?;
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            tracing::info!(stream = %name, subjects = ?want.subjects, replicas = want.num_replicas, "creating the stream");
            js.create_stream(want).await.map_err(|e| failed(e.into()))?;
        }
        Err(e) => return Err(failed(e.into())),
    }
    js.get_stream(&name).await.map_err(|e| failed(e.into()))
}

/// Whether a consumer-info error says the consumer does not exist.
fn consumer_missing(kind: jetstream::context::ConsumerInfoErrorKind) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match kind {
        K::NotFound => true,
        K::JetStream(e) => e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// Whether two subject lists hold the same subjects, in any order.
fn same_subjects(a: &[String], b: &[String]) -> bool {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}

/// The NATS source of `cfg`, with its supervisor settings.
pub fn source(cfg: NatsConfig) -> (NatsSource, Settings) {
    let settings = Settings::new(cfg.max_inflight_total, cfg.drain_timeout);
    let source = NatsSource {
        cfg,
        conn: None,
        stream: None,
    };
    (source, settings)
}

/// The NATS source: one stream, a durable pull consumer per function
/// (JetStream), or a queue subscription per topic (core NATS).
pub struct NatsSource {
    cfg: NatsConfig,
    conn: Option<Conn>,
    /// The stream capturing every topic, once set up (JetStream).
    stream: Option<stream::Stream>,
}

struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    sink: Arc<NatsDeadLetters>,
}

impl NatsSource {
    fn consumer_config(&self, spec: &FunctionSpec, limit: usize) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(spec.durable_name()),
            description: Some(format!(
                "ebb: delivers to function {}/{}",
                spec.namespace, spec.name
            )),
            filter_subjects: spec.topics.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            deliver_policy: consumer::DeliverPolicy::New,
            max_deliver: -1,
            max_ack_pending: (limit.max(64) * 4) as i64,
            ..Default::default()
        }
    }
}

impl Source for NatsSource {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>> {
        accepts_names(spec, &spec.topics, |t| {
            validate_subject(t).map_err(|e| format!("its topics are not valid NATS subjects: {e}"))
        })
    }

    async fn connect(&mut self) -> Result<(), Error> {
        // The client reconnects by itself once connected.
        let client = connect_once(&self.cfg, "ebb-connector-nats").await?;
        let js = jetstream::new(client.clone());
        self.conn = Some(Conn {
            sink: Arc::new(NatsDeadLetters { js: js.clone() }),
            client,
            js,
        });
        Ok(())
    }

    async fn prepare(&mut self, functions: &[Function]) -> Result<(), Error> {
        let Some(conn) = &self.conn else {
            return Err(Error::Broker("not connected".into()));
        };
        let cfg = &self.cfg;
        let subjects = minimal_subjects(
            functions
                .iter()
                .flat_map(|f| f.spec.topics.iter().map(String::as_str)),
        );
        let dead: Vec<String> = minimal_subjects(functions.iter().filter_map(|f| {
            // Every default destination is under one subject.
            match f.spec.dead_letter.as_deref() {
                None => Some(DEFAULT_DEAD_LETTERS),
                Some(NO_DEAD_LETTER) => None,
                Some(topic) => Some(topic),
            }
        }))
        .into_iter()
        .filter(|d| !subjects.iter().any(|s| covers(s, d)))
        .collect();
        if cfg.mode == Mode::JetStream && !subjects.is_empty() {
            let stream = ensure_stream(
                &conn.js,
                stream::Config {
                    name: cfg.stream.clone(),
                    subjects,
                    retention: stream::RetentionPolicy::Interest,
                    storage: stream::StorageType::File,
                    max_age: cfg.stream_max_age,
                    max_bytes: if cfg.stream_max_bytes > 0 {
                        cfg.stream_max_bytes
                    } else {
                        -1
                    },
                    num_replicas: cfg.stream_replicas,
                    ..Default::default()
                },
            )
            .await?;
            self.stream = Some(stream);
        }
        if !dead.is_empty() {
            ensure_stream(
                &conn.js,
                stream::Config {
                    name: cfg.dead_stream.clone(),
                    subjects: dead,
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    max_age: cfg.dead_max_age,
                    num_replicas: cfg.stream_replicas,
                    ..Default::default()
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn start(&mut self, c: Consumer) -> Result<ConsumerTask, Error> {
        let Some(conn) = &self.conn else {
            return Err(Error::Broker("not connected".into()));
        };
        let sink = conn.sink.clone();
        match (&self.stream, self.cfg.mode) {
            (Some(s), Mode::JetStream) => {
                let consumer = s
                    .create_consumer(self.consumer_config(&c.spec, c.limit.max()))
                    .await
                    .map_err(|e| Error::broker(format!("consumer for {}", c.key()), e))?;
                let (stream_name, ack_wait) = (self.cfg.stream.clone(), self.cfg.ack_wait);
                Ok(Box::pin(async move {
                    consume_js(consumer, c, sink, stream_name, ack_wait).await;
                    None
                }))
            }
            _ => {
                let mut subs = Vec::new();
                for t in &c.spec.topics {
                    subs.push(
                        conn.client
                            .queue_subscribe(t.clone(), c.spec.durable_name())
                            .await
                            .map_err(|e| {
                                Error::broker(format!("subscribe {t} for {}", c.key()), e)
                            })?,
                    );
                }
                let client = conn.client.clone();
                Ok(Box::pin(async move {
                    consume_core(client, subs, c, sink).await;
                    None
                }))
            }
        }
    }

    async fn refilter(&mut self, _old: &FunctionSpec, new: &FunctionSpec) -> Result<bool, Error> {
        // A JetStream consumer's filter is changed where it is: what it
        // holds and where it stands stay.
        let (Some(s), Mode::JetStream) = (&self.stream, self.cfg.mode) else {
            return Ok(false);
        };
        let name = new.durable_name();
        let mut info = s
            .consumer_info(&name)
            .await
            .map_err(|e| Error::broker(format!("consumer {name}"), e))?;
        info.config.filter_subjects = new.topics.clone();
        info.config.filter_subject = String::new();
        s.update_consumer(info.config)
            .await
            .map_err(|e| Error::broker(format!("change the topics of consumer {name}"), e))?;
        Ok(true)
    }

    async fn expire(&mut self, engine: &Engine, spec: &FunctionSpec) -> Result<u64, Error> {
        let (Some(conn), Some(stream)) = (&self.conn, &self.stream) else {
            return Ok(0);
        };
        let durable = spec.durable_name();
        let failed = |e: crate::BoxError| Error::broker(format!("consumer {durable}"), e);
        match stream.consumer_info(&durable).await {
            Ok(_) => {}
            Err(e) if consumer_missing(e.kind()) => return Ok(0),
            Err(e) => return Err(failed(e.into())),
        }
        let mut consumer: consumer::PullConsumer =
            stream.get_consumer(&durable).await.map_err(&failed)?;
        let mut moved = 0;
        let give_up = tokio::time::Instant::now() + EXPIRE_WITHIN;
        loop {
            let info = consumer.info().await.map_err(|e| failed(e.into()))?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(failed(
                    format!(
                        "{} messages still held after {EXPIRE_WITHIN:?}",
                        info.num_pending + info.num_ack_pending as u64
                    )
                    .into(),
                ));
            }
            // Messages handed out before the function went come back after
            // the ack wait; new ones come at once.
            let mut batch = consumer
                .fetch()
                .max_messages(256)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .map_err(|e| failed(e.into()))?;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(&failed)?;
                let event = js_event(&msg, &self.cfg.stream);
                engine.expire_one(spec, &event, conn.sink.as_ref()).await?;
                msg.double_ack_with(AckKind::Term).await.map_err(&failed)?;
                moved += 1;
            }
        }
        stream
            .delete_consumer(&durable)
            .await
            .map_err(|e| failed(e.into()))?;
        Ok(moved)
    }

    async fn close(self) {
        if let Some(conn) = self.conn
            && let Err(e) = conn.client.flush().await
        {
            tracing::warn!(error = %e, "cannot flush the last acks");
        }
    }
}

async fn consume_js(
    consumer: consumer::Consumer<consumer::pull::Config>,
    c: Consumer,
    sink: Arc<NatsDeadLetters>,
    stream_name: String,
    ack_wait: Duration,
) {
    let mut errors = Retrying::new(Duration::from_millis(100), Duration::from_secs(5));
    'pull: loop {
        // Pull only as many messages as there are free slots: when the
        // function is saturated, nothing is pulled (backpressure).
        let Some(first) = c.slots().await else {
            break;
        };
        let mut slots = vec![first];
        while slots.len() < 256 {
            let Some(more) = c.try_slots() else {
                break;
            };
            slots.push(more);
        }
        let batch = consumer
            .batch()
            .max_messages(slots.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        // The server ends a pull at its expiry. A pull lost with the
        // connection (server restart) never ends, and async-nats gives up on
        // it only 5 s after the expiry: stop waiting a little after the
        // expiry and pull again, so a reconnect does not stall delivery.
        let give_up = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                c.engine.metrics().error("pull");
                let pause = errors.next_pause();
                tracing::warn!(function = %c.key(), error = %e, retry_in = ?pause, "pull failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = c.stop.cancelled() => break,
                }
                continue;
            }
        };
        errors.reset();
        loop {
            let next = tokio::select! {
                // A message already received is taken before giving up.
                biased;
                () = c.stop.cancelled() => break 'pull,
                m = batch.next() => m,
                () = tokio::time::sleep_until(give_up) => None,
            };
            let Some(m) = next else { break };
            let msg = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(function = %c.key(), error = %e, "pull ended early");
                    break;
                }
            };
            let Some(slots) = slots.pop() else {
                // More than asked for cannot happen; give it back rather than
                // exceed the limit.
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            };
            let attempt = msg
                .info()
                .map(|i| u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX))
                .unwrap_or(1);
            let event = js_event(&msg, &stream_name);
            let delivery = JsDelivery {
                msg,
                attempt,
                progress: ack_wait / 2,
            };
            c.deliver(slots, event, delivery, sink.clone());
        }
    }
    tracing::debug!(function = %c.key(), "consumer stopped");
}

async fn consume_core(
    client: async_nats::Client,
    subs: Vec<async_nats::Subscriber>,
    c: Consumer,
    sink: Arc<NatsDeadLetters>,
) {
    let mut messages = futures::stream::select_all(subs);
    loop {
        let Some(slots) = c.slots().await else {
            break;
        };
        let next = tokio::select! {
            m = messages.next() => m,
            () = c.stop.cancelled() => break,
        };
        let Some(msg) = next else { break };
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let event = Event {
            id,
            source: "/ebb/nats/core".into(),
            kind: "io.ebb.nats.message".into(),
            topic: msg.subject.to_string(),
            time: Utc::now(),
            headers: http_headers(msg.headers.as_ref()),
            body: msg.payload.clone(),
            position: format!("core subject {}", msg.subject),
        };
        let delivery = InProcess::new(msg.reply.clone().map(|subject| NatsReply {
            client: client.clone(),
            subject,
        }));
        c.deliver(slots, event, delivery, sink.clone());
    }
    tracing::debug!(function = %c.key(), "subscription stopped");
}

/// Publishes one message (for `ebb publish --nats`): with JetStream, waits
/// for the stream's ack; without a stream capturing the subject, falls back
/// to a core publish only when `core` is set.
pub async fn publish(
    client: &async_nats::Client,
    topic: &str,
    headers: &HeaderMap,
    body: Bytes,
    core: bool,
) -> Result<Option<u64>, Error> {
    if core {
        client
            .publish_with_headers(topic.to_string(), nats_headers(headers), body)
            .await
            .map_err(|e| Error::broker(format!("publish to {topic}"), e))?;
        client
            .flush()
            .await
            .map_err(|e| Error::broker("flush", e))?;
        return Ok(None);
    }
    let js = jetstream::new(client.clone());
    let ack = js
        .publish_with_headers(topic.to_string(), nats_headers(headers), body)
        .await
        .map_err(|e| Error::broker(format!("publish to {topic}"), e))?
        .await
        .map_err(|e| {
            Error::Broker(format!(
                "no JetStream stream stored the message on {topic} ({e}); is a connector routing this topic? (use --core for a plain NATS publish)"
            ))
        })?;
    Ok(Some(ack.sequence))
}
