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

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use ebb_model::Catalog;
use futures::StreamExt;
use http::HeaderMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::admin::Readiness;
use crate::consumers::{Running, limit_for, routable};
use crate::engine::{DeadLetterSink, Delivery, Engine, InProcess, Reply, Target};
use crate::event::Event;
use crate::limit::{Limit, Permit};
use crate::routing::{covers, minimal_subjects, validate_subject};

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
    let mut delay = Duration::from_millis(100);
    loop {
        match connect_once(cfg, name).await {
            Ok(c) => return Ok(c),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(url = %cfg.url, error = %e, ?delay, "cannot connect to NATS; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Err(e),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
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
        .map_err(|e| Error::Broker(format!("cannot connect to {}: {e}", cfg.url)))
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
    async fn publish(
        &self,
        destination: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), Error> {
        let ack = self
            .js
            .publish_with_headers(destination.to_string(), nats_headers(&headers), body)
            .await
            .map_err(|e| Error::DeadLetter(format!("publish to {destination}: {e}")))?;
        ack.await.map_err(|e| {
            Error::DeadLetter(format!(
                "no stream stored the dead letter on {destination}: {e}"
            ))
        })?;
        Ok(())
    }
}

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
        self.msg.ack().await.map_err(|e| Error::Ack(e.to_string()))
    }
    async fn retry_later(&mut self, delay: Duration) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| Error::Ack(e.to_string()))
    }
    async fn in_progress(&mut self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| Error::Ack(e.to_string()))
    }
    async fn release(&mut self) -> Result<(), Error> {
        self.msg
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| Error::Ack(e.to_string()))
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        self.msg
            .double_ack_with(AckKind::Term)
            .await
            .map_err(|e| Error::Ack(e.to_string()))
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
            .map_err(|e| Error::Broker(format!("reply: {e}")))
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

/// Runs the connector until `shutdown` resolves, then drains.
pub async fn run(
    cfg: NatsConfig,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    ready: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let stopping = engine.stopping().clone();
    let client = connect(&cfg, "ebb-connector-nats", &stopping).await?;
    let js = jetstream::new(client.clone());
    let sink = Arc::new(NatsDeadLetters { js: js.clone() });
    let global = Limit::new(cfg.max_inflight_total.max(1));
    let tracker = TaskTracker::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut retry_in: Option<Duration> = None;

    loop {
        let snapshot = catalog.borrow_and_update().clone();
        let functions = routable(&snapshot, engine.metrics(), |spec| {
            (!spec.topics.is_empty()).then(|| {
                spec.topics
                    .iter()
                    .try_for_each(|t| validate_subject(t))
                    .map_err(|e| format!("its topics are not valid NATS subjects: {e}"))
            })
        });
        match reconcile(
            &cfg,
            &client,
            &js,
            &functions,
            &mut running,
            &engine,
            &sink,
            &global,
            &tracker,
        )
        .await
        {
            Ok(()) => {
                ready.set(true);
                retry_in = None;
            }
            Err(e) => {
                engine.metrics().error(e.metric_label());
                let d = retry_in.map_or(Duration::from_millis(500), |d| {
                    (d * 2).min(Duration::from_secs(10))
                });
                tracing::error!(error = %e, retry_in = ?d, "cannot set up streams and consumers");
                retry_in = Some(d);
            }
        }
        let wait = retry_in.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            r = catalog.changed() => {
                if r.is_err() {
                    // The catalog source ended (only at shutdown).
                    shutdown.as_mut().await;
                    break;
                }
            }
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => break,
        }
    }

    // Drain: stop pulling, let calls finish, give back what is held.
    tracing::info!(drain_timeout = ?cfg.drain_timeout, inflight = global.in_use(), "stopping: no more pulls; finishing in-flight calls");
    ready.set(false);
    for r in running.values() {
        r.stop.cancel();
    }
    // Held events are given back (NAK) only once every pull loop has ended
    // and dropped its pull subscription: a NAK that reached the server before
    // that unsubscribe would be handed straight to this process's still-open
    // pull request and then lost with it, so the event would come back only
    // after the ack wait instead of at once.
    for r in running.values_mut() {
        if tokio::time::timeout(Duration::from_secs(5), &mut r.task)
            .await
            .is_err()
        {
            tracing::warn!("a pull loop did not stop within 5s");
        }
    }
    stopping.cancel();
    tracker.close();
    let drained = tokio::time::timeout(cfg.drain_timeout, tracker.wait())
        .await
        .is_ok();
    for (_, r) in running.drain() {
        r.task.abort();
    }
    if !drained {
        tracing::warn!(
            left = global.in_use(),
            "drain timeout passed; unfinished events are redelivered by the broker"
        );
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "cannot flush the last acks");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn reconcile(
    cfg: &NatsConfig,
    client: &async_nats::Client,
    js: &jetstream::Context,
    functions: &[ebb_model::Function],
    running: &mut HashMap<String, Running>,
    engine: &Arc<Engine>,
    sink: &Arc<NatsDeadLetters>,
    global: &Arc<Limit>,
    tracker: &TaskTracker,
) -> Result<(), Error> {
    let subjects = minimal_subjects(
        functions
            .iter()
            .flat_map(|f| f.spec.topics.iter().map(String::as_str)),
    );
    let dead: Vec<String> = minimal_subjects(
        functions
            .iter()
            .filter_map(|f| f.spec.dead_letter.as_deref()),
    )
    .into_iter()
    .filter(|d| !subjects.iter().any(|s| covers(s, d)))
    .collect();

    let js_stream = if cfg.mode == Mode::JetStream && !subjects.is_empty() {
        let info = js
            .create_or_update_stream(stream::Config {
                name: cfg.stream.clone(),
                subjects: subjects.clone(),
                retention: stream::RetentionPolicy::Interest,
                storage: stream::StorageType::File,
                max_age: cfg.stream_max_age,
                max_bytes: if cfg.stream_max_bytes > 0 {
                    cfg.stream_max_bytes
                } else {
                    -1
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Broker(format!("stream {}: {e}", cfg.stream)))?;
        tracing::debug!(stream = %info.config.name, subjects = ?info.config.subjects, "stream ready");
        Some(
            js.get_stream(&cfg.stream)
                .await
                .map_err(|e| Error::Broker(format!("stream {}: {e}", cfg.stream)))?,
        )
    } else {
        None
    };
    if !dead.is_empty() {
        js.create_or_update_stream(stream::Config {
            name: cfg.dead_stream.clone(),
            subjects: dead.clone(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: cfg.dead_max_age,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Broker(format!("dead-letter stream {}: {e}", cfg.dead_stream)))?;
    }

    // Stop what is gone or changed.
    let wanted: HashMap<String, &ebb_model::Function> =
        functions.iter().map(|f| (f.key(), f)).collect();
    let gone: Vec<String> = running
        .iter()
        .filter(|(k, r)| wanted.get(*k).is_none_or(|f| f.spec != r.spec))
        .map(|(k, _)| k.clone())
        .collect();
    for key in gone {
        if let Some(r) = running.remove(&key) {
            r.stop.cancel();
            let removed = !wanted.contains_key(&key);
            tracing::info!(function = %key, removed, "stopping consumer");
            if removed && let Some(s) = &js_stream {
                // Its undelivered messages can never be delivered now; keeping
                // the consumer would pin them in the stream forever.
                if let Err(e) = s.delete_consumer(&r.spec.durable_name()).await {
                    tracing::warn!(function = %key, error = %e, "cannot delete the consumer");
                }
            }
        }
    }

    // Start what is new; resize the rest.
    for f in functions {
        let key = f.key();
        let limit = limit_for(&f.spec, f.ready_replicas);
        if let Some(r) = running.get(&key) {
            r.limit.set_max(limit);
            continue;
        }
        let target = match engine.target(f.spec.clone()) {
            Ok(t) => t,
            Err(e) => {
                engine.metrics().config_errors.inc();
                tracing::error!(function = %key, error = %e, "skipping function");
                continue;
            }
        };
        let stop = CancellationToken::new();
        let flimit = Limit::new(limit);
        let task = match (&js_stream, cfg.mode) {
            (Some(s), Mode::JetStream) => {
                let consumer = s
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(f.spec.durable_name()),
                        description: Some(format!("ebb: delivers to function {key}")),
                        filter_subjects: f.spec.topics.clone(),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: cfg.ack_wait,
                        deliver_policy: consumer::DeliverPolicy::New,
                        max_deliver: -1,
                        max_ack_pending: (limit.max(64) * 4) as i64,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| Error::Broker(format!("consumer for {key}: {e}")))?;
                tokio::spawn(consume_js(
                    consumer,
                    target,
                    cfg.stream.clone(),
                    cfg.ack_wait,
                    flimit.clone(),
                    global.clone(),
                    engine.clone(),
                    sink.clone(),
                    tracker.clone(),
                    stop.clone(),
                ))
            }
            _ => {
                let mut subs = Vec::new();
                for t in &f.spec.topics {
                    subs.push(
                        client
                            .queue_subscribe(t.clone(), f.spec.durable_name())
                            .await
                            .map_err(|e| Error::Broker(format!("subscribe {t} for {key}: {e}")))?,
                    );
                }
                tokio::spawn(consume_core(
                    client.clone(),
                    subs,
                    target,
                    flimit.clone(),
                    global.clone(),
                    engine.clone(),
                    sink.clone(),
                    tracker.clone(),
                    stop.clone(),
                ))
            }
        };
        tracing::info!(function = %key, topics = ?f.spec.topics, limit, mode = ?cfg.mode, "consuming");
        running.insert(
            key,
            Running {
                spec: f.spec.clone(),
                limit: flimit,
                stop,
                task,
            },
        );
    }
    Ok(())
}

/// Takes one slot of the function and one of the process, or `None` on stop.
async fn slot(
    limit: &Arc<Limit>,
    global: &Arc<Limit>,
    stop: &CancellationToken,
) -> Option<(Permit, Permit)> {
    let a = tokio::select! { p = limit.acquire() => p, () = stop.cancelled() => return None };
    let b = tokio::select! { p = global.acquire() => p, () = stop.cancelled() => return None };
    Some((a, b))
}

#[allow(clippy::too_many_arguments)]
async fn consume_js(
    consumer: consumer::Consumer<consumer::pull::Config>,
    target: Arc<Target>,
    stream_name: String,
    ack_wait: Duration,
    limit: Arc<Limit>,
    global: Arc<Limit>,
    engine: Arc<Engine>,
    sink: Arc<NatsDeadLetters>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let key = target.key.clone();
    let mut error_delay = Duration::from_millis(100);
    'pull: loop {
        // Pull only as many messages as there are free slots: when the
        // function is saturated, nothing is pulled (backpressure).
        let Some(first) = slot(&limit, &global, &stop).await else {
            break;
        };
        let mut slots = vec![first];
        while slots.len() < 256 {
            let (Some(a), Some(b)) = (limit.try_acquire(), global.try_acquire()) else {
                break;
            };
            slots.push((a, b));
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
                engine.metrics().error("pull");
                tracing::warn!(function = %key, error = %e, "pull failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(error_delay) => {}
                    () = stop.cancelled() => break,
                }
                error_delay = (error_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        error_delay = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                // A message already received is taken before giving up.
                biased;
                () = stop.cancelled() => break 'pull,
                m = batch.next() => m,
                () = tokio::time::sleep_until(give_up) => None,
            };
            let Some(m) = next else { break };
            let msg = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(function = %key, error = %e, "pull ended early");
                    break;
                }
            };
            let Some(permits) = slots.pop() else {
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
            let (target, engine, sink) = (target.clone(), engine.clone(), sink.clone());
            tracker.spawn(async move {
                let _permits = permits;
                engine
                    .deliver(&target, &event, delivery, sink.as_ref())
                    .await;
            });
        }
    }
    tracing::debug!(function = %key, "consumer stopped");
}

#[allow(clippy::too_many_arguments)]
async fn consume_core(
    client: async_nats::Client,
    subs: Vec<async_nats::Subscriber>,
    target: Arc<Target>,
    limit: Arc<Limit>,
    global: Arc<Limit>,
    engine: Arc<Engine>,
    sink: Arc<NatsDeadLetters>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let key = target.key.clone();
    let mut messages = futures::stream::select_all(subs);
    loop {
        let Some(permits) = slot(&limit, &global, &stop).await else {
            break;
        };
        let next = tokio::select! {
            m = messages.next() => m,
            () = stop.cancelled() => break,
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
        let (target, engine, sink) = (target.clone(), engine.clone(), sink.clone());
        tracker.spawn(async move {
            let _permits = permits;
            engine
                .deliver(&target, &event, delivery, sink.as_ref())
                .await;
        });
    }
    tracing::debug!(function = %key, "subscription stopped");
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
            .map_err(|e| Error::Broker(format!("publish to {topic}: {e}")))?;
        client
            .flush()
            .await
            .map_err(|e| Error::Broker(format!("flush: {e}")))?;
        return Ok(None);
    }
    let js = jetstream::new(client.clone());
    let ack = js
        .publish_with_headers(topic.to_string(), nats_headers(headers), body)
        .await
        .map_err(|e| Error::Broker(format!("publish to {topic}: {e}")))?
        .await
        .map_err(|e| {
            Error::Broker(format!(
                "no JetStream stream stored the message on {topic} ({e}); is a connector routing this topic? (use --core for a plain NATS publish)"
            ))
        })?;
    Ok(Some(ack.sequence))
}
