//! The delivery engine shared by every connector: one event to one function,
//! with retries, holds (no ready replica), wake-ups and dead letters. A source
//! adds only how it acks, delays, extends and terminates its messages
//! ([`Delivery`]) and where dead letters go ([`DeadLetterSink`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ebb_model::{FunctionSpec, refusal};
use ebb_runtime::Retrying;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::event::{Event, Signer, delivery_headers, printable_prefix};
use crate::metrics::{FunctionLabels, Metrics, OutcomeLabels, ReasonLabels};
use crate::retry::{self, Backoff, Failure, Next};

/// A held event is tried again after 25 ms, doubling to 1 s between tries.
const HOLD_PAUSE_FIRST: Duration = Duration::from_millis(25);
const HOLD_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Why a call was not taken by a replica. Not a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Nothing listens: the function is scaled to zero or starting.
    NoReplica,
    /// The worker answered 429 `ebb-worker: busy`.
    Busy,
    /// The worker answered 503 `ebb-worker: draining`.
    Draining,
}

impl Hold {
    fn label(self) -> &'static str {
        match self {
            Hold::NoReplica => "no_replica",
            Hold::Busy => "busy",
            Hold::Draining => "draining",
        }
    }
}

/// The result of one call.
#[derive(Debug)]
pub enum CallResult {
    Delivered { status: u16, body: Bytes },
    Failed { failure: Failure, body: Bytes },
    Hold(Hold),
}

/// How a source handles one of its messages. Every method that settles the
/// message consumes the delivery's right to settle it once.
pub trait Delivery: Send {
    /// The 1-based attempt number of this delivery (1 where the source
    /// does not count).
    fn attempt(&self) -> u32 {
        1
    }
    /// Whether the source redelivers a message given back with a delay
    /// (JetStream NAK): then a retry is left to the broker; otherwise (the
    /// default) the engine waits and calls again itself.
    fn redelivers(&self) -> bool {
        false
    }
    /// How often to extend the broker's deadline while a call or hold
    /// lasts; `None` (the default) for a source without a deadline.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }
    /// Delivered: remove the message from the source.
    fn ack(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Failed, retry after `delay` (only called when [`Delivery::redelivers`]).
    fn retry_later(&mut self, _delay: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }
    /// Still working on it: extend the deadline (only called with a
    /// [`Delivery::progress_interval`]).
    fn in_progress(&mut self) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }
    /// Shutting down: give it back for redelivery now.
    fn release(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Dead-lettered (or given up): never redeliver.
    fn terminate(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// The function's answer to a delivered event (request/reply sources).
    fn reply(&mut self, _body: Bytes) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }
    /// Whether the function's answer goes somewhere ([`Delivery::reply`]):
    /// then it is read up to [`EngineConfig::max_response`], otherwise only
    /// the first [`KEPT_RESPONSE`] bytes (what a dead letter keeps).
    fn replies(&self) -> bool {
        false
    }
    /// How long the source lets a message stay unacked (RabbitMQ closes
    /// the channel of a consumer past its `consumer_timeout`); a hold or a
    /// retry pause that would last longer hands the message back with
    /// [`Delivery::requeue`] instead. `None` (the default): no limit.
    fn max_unacked(&self) -> Option<Duration> {
        None
    }
    /// How long to wait before the first call: what was left of a retry
    /// pause when the message was requeued. `None` (the default): call now.
    fn not_before(&self) -> Option<Duration> {
        None
    }
    /// Puts the message back in its queue, to be delivered again as
    /// attempt `attempt` no sooner than `after` from now, then removes this
    /// copy (only called with a [`Delivery::max_unacked`]).
    fn requeue(
        &mut self,
        _attempt: u32,
        _after: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async { Err(Error::Broker("this source cannot requeue".into())) }
    }
}

/// Where the answer of a delivered event goes (request/reply sources).
pub trait Reply: Send {
    fn send(self, body: Bytes) -> impl Future<Output = Result<(), Error>> + Send;
}

/// No reply: the source did not ask for one.
pub enum NoReply {}

impl Reply for NoReply {
    async fn send(self, _: Bytes) -> Result<(), Error> {
        match self {}
    }
}

/// A delivery whose source keeps nothing to settle (core NATS, cron): no
/// ack, no redelivery, retries wait in the engine; a delivered event's answer
/// goes to `reply` when the source asked for one.
pub struct InProcess<R: Reply = NoReply> {
    reply: Option<R>,
}

impl<R: Reply> InProcess<R> {
    pub fn new(reply: Option<R>) -> Self {
        Self { reply }
    }
}

impl<R: Reply> Delivery for InProcess<R> {
    fn replies(&self) -> bool {
        self.reply.is_some()
    }
    async fn ack(&mut self) -> Result<(), Error> {
        Ok(())
    }
    async fn release(&mut self) -> Result<(), Error> {
        Ok(())
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        Ok(())
    }
    async fn reply(&mut self, body: Bytes) -> Result<(), Error> {
        match self.reply.take() {
            Some(r) => r.send(body).await,
            None => Ok(()),
        }
    }
}

/// Where a source publishes dead letters.
pub trait DeadLetterSink: Send + Sync {
    /// Publishes durably to `topic`; `Ok` only once the broker has the message.
    fn publish(
        &self,
        topic: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Whether a failed publish may succeed when tried again (`false` for
    /// a sink that can never store one).
    fn can_retry(&self) -> bool {
        true
    }
    /// Whether this sink stores dead letters at all; `false` for a source
    /// that has nowhere to put them (cron), whose exhausted events are
    /// dropped and counted like those of `dead-letter: none`.
    fn stores(&self) -> bool {
        true
    }
}

/// The sink of sources without dead-letter support (cron): exhausted events
/// are dropped and counted; a publish, never attempted, fails.
pub struct NoDeadLetters;

impl DeadLetterSink for NoDeadLetters {
    async fn publish(&self, topic: &str, _: HeaderMap, _: Bytes) -> Result<(), Error> {
        Err(Error::DeadLetter(format!(
            "this source cannot publish dead letters (to {topic})"
        )))
    }
    fn can_retry(&self) -> bool {
        false
    }
    fn stores(&self) -> bool {
        false
    }
}

/// Sends wake-ups to the autoscaler, at most one per function per second
/// while its events stay held; a hold that follows a delivery is a new
/// cold start and wakes at once ([`Waker::forget`]).
pub struct Waker {
    url: Option<String>,
    client: reqwest::Client,
    last: Mutex<HashMap<String, Instant>>,
    metrics: Metrics,
}

impl Waker {
    pub fn new(url: Option<String>, client: reqwest::Client, metrics: Metrics) -> Self {
        Self {
            url: url.map(|u| u.trim_end_matches('/').to_string()),
            client,
            last: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The function took an event since its last wake-up: the next hold
    /// wakes it at once.
    pub fn forget(&self, f: &FunctionSpec) {
        if let Ok(mut last) = self.last.lock() {
            last.remove(&f.key().to_string());
        }
    }

    pub fn wake(&self, f: &FunctionSpec) {
        let Some(base) = &self.url else { return };
        let key = f.key().to_string();
        let now = Instant::now();
        if let Ok(mut last) = self.last.lock() {
            if last
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
            {
                return;
            }
            last.insert(key.clone(), now);
        }
        self.metrics
            .wakeups
            .get_or_create(&FunctionLabels {
                function: key.clone(),
            })
            .inc();
        let url = format!("{base}/wake/{}/{}", f.namespace, f.name);
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            match client
                .post(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!(function = %key, "wake-up sent");
                }
                Ok(r) => {
                    metrics.error("wakeup");
                    tracing::warn!(function = %key, status = %r.status(), %url, "autoscaler refused the wake-up");
                }
                Err(e) => {
                    metrics.error("wakeup");
                    tracing::warn!(function = %key, error = %e, %url, "cannot reach the autoscaler for a wake-up");
                }
            }
        });
    }
}

/// The replicas of one function when the engine picks among them itself
/// (`ebb dev`'s local replicas) instead of calling one Service address.
pub trait Endpoints: Send + Sync {
    /// The address of a ready replica, or `None` when none is ready (a hold,
    /// exactly as a Service without endpoints refuses connections).
    fn pick(&self) -> Option<http::Uri>;
    /// A call of this function failed, for status displays.
    fn failed(&self, _reason: &str) {}
    /// Resolves once a replica is ready, so a held event goes out at once
    /// instead of at its next pause's end.
    fn ready(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// Finds the [`Endpoints`] of a function; `None` calls its URL.
pub trait Resolve: Send + Sync {
    fn endpoints(&self, spec: &FunctionSpec) -> Option<Arc<dyn Endpoints>>;
}

/// A shared [`Resolve`], for options that are `Debug` and `Clone`.
#[derive(Clone)]
pub struct Resolver(pub Arc<dyn Resolve>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver(…)")
    }
}

/// A function as the engine delivers to it: its settings, its parsed URL and
/// its metric handles, built once per function rather than per event.
pub struct Target {
    pub spec: Arc<FunctionSpec>,
    /// `namespace/name`.
    pub key: String,
    pub uri: http::Uri,
    /// Where its exhausted events go ([`FunctionSpec::dead_letter_topic`]).
    pub dead_letter: Option<String>,
    /// Replicas picked per call, when a resolver knows them.
    endpoints: Option<Arc<dyn Endpoints>>,
    /// A wake-up was sent since the last delivery.
    woken: std::sync::atomic::AtomicBool,
    /// Cancelled when this function's consumer stops (or the process does):
    /// its held and waiting events are given back to the source.
    release: CancellationToken,
    m: TargetMetrics,
}

impl Target {
    /// Gives back this target's held and waiting events (calls in flight
    /// finish). Done when its consumer stops, after it stopped taking.
    pub fn release(&self) {
        self.release.cancel();
    }
}

struct TargetMetrics {
    ok: prometheus_client::metrics::counter::Counter,
    failed: prometheus_client::metrics::counter::Counter,
    hold: prometheus_client::metrics::counter::Counter,
    duration: prometheus_client::metrics::histogram::Histogram,
    inflight: prometheus_client::metrics::gauge::Gauge,
    retries: prometheus_client::metrics::counter::Counter,
    delivered: prometheus_client::metrics::counter::Counter,
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub backoff: Backoff,
    /// How long an event may wait for a ready replica before that counts as a failed attempt.
    pub hold_timeout: Duration,
    pub signer: Option<Signer>,
    /// Largest response body read for a reply (core NATS request/reply);
    /// other responses are read up to [`KEPT_RESPONSE`].
    pub max_response: usize,
    /// Local replicas picked by the engine (`ebb dev`); `None` calls URLs.
    pub resolver: Option<Resolver>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            hold_timeout: Duration::from_secs(300),
            signer: None,
            max_response: 1 << 20,
            resolver: None,
        }
    }
}

/// Delivers events to functions over HTTP.
pub struct Engine {
    http: Client<HttpConnector, Full<Bytes>>,
    config: EngineConfig,
    waker: Waker,
    metrics: Metrics,
    /// Cancelled when the process stops: holds give their messages back.
    stopping: CancellationToken,
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        autoscaler_url: Option<String>,
        metrics: Metrics,
        stopping: CancellationToken,
    ) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Self {
            waker: Waker::new(autoscaler_url, client, metrics.clone()),
            http,
            config,
            metrics,
            stopping,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// Prepares delivery to `spec`: parses its URL (`ebb.io/url` or the
    /// Service default) and creates its metric series.
    pub fn target(&self, spec: Arc<FunctionSpec>) -> Result<Arc<Target>, Error> {
        let key = spec.key().to_string();
        let endpoints = self
            .config
            .resolver
            .as_ref()
            .and_then(|r| r.0.endpoints(&spec));
        let raw = match &endpoints {
            // Replicas are picked per call; this placeholder is never called.
            Some(_) => "http://127.0.0.1/".to_string(),
            None => function_url(&spec),
        };
        let uri: http::Uri = raw.parse().map_err(|e| {
            Error::Config(format!(
                "function {key}: url `{raw}` is not a valid URL ({e}); set ebb.io/url to http://host:port"
            ))
        })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(Error::Config(format!(
                "function {key}: url `{raw}` must be http://host[:port][/path] (https is not supported yet)"
            )));
        }
        let outcome = |outcome| {
            self.metrics
                .attempts
                .get_or_create(&OutcomeLabels {
                    function: key.clone(),
                    outcome,
                })
                .clone()
        };
        let labels = FunctionLabels {
            function: key.clone(),
        };
        let m = TargetMetrics {
            ok: outcome("ok"),
            failed: outcome("failed"),
            hold: outcome("hold"),
            duration: self.metrics.duration.get_or_create(&labels).clone(),
            inflight: self.metrics.inflight.get_or_create(&labels).clone(),
            retries: self.metrics.retries.get_or_create(&labels).clone(),
            delivered: self
                .metrics
                .deliveries
                .get_or_create(&OutcomeLabels {
                    function: key.clone(),
                    outcome: "delivered",
                })
                .clone(),
        };
        Ok(Arc::new(Target {
            dead_letter: spec.dead_letter_topic(),
            spec,
            key,
            uri,
            endpoints,
            woken: std::sync::atomic::AtomicBool::new(false),
            release: self.stopping.child_token(),
            m,
        }))
    }

    /// One call of `event` to `f`.
    pub async fn call(&self, t: &Target, event: &Event, attempt: u32, keep: usize) -> CallResult {
        let f = &*t.spec;
        let uri = match &t.endpoints {
            None => t.uri.clone(),
            Some(e) => match e.pick() {
                Some(uri) => uri,
                None => {
                    t.m.hold.inc();
                    return CallResult::Hold(Hold::NoReplica);
                }
            },
        };
        let now_unix = chrono::Utc::now().timestamp();
        let headers = delivery_headers(event, attempt, self.config.signer.as_ref(), now_unix);
        let started = Instant::now();
        let mut req = http::Request::new(Full::new(event.body.clone()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let max_response = keep;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(CallError::Send)?;
            let (parts, body) = resp.into_parts();
            let status = parts.status.as_u16();
            let worker_refusal = matches!(
                (status, refusal_tag(&parts.headers)),
                (429, Some(refusal::BUSY)) | (503, Some(refusal::DRAINING))
            );
            // A worker's own refusal has nothing worth reading.
            let body = if worker_refusal {
                Ok(Bytes::new())
            } else {
                read_body(body, max_response).await
            };
            Ok::<_, CallError>((parts, body))
        };
        let result = match tokio::time::timeout(f.timeout, exchange).await {
            Err(_) => CallResult::Failed {
                failure: Failure::Timeout,
                body: Bytes::new(),
            },
            Ok(Err(CallError::Send(e))) if e.is_connect() => CallResult::Hold(Hold::NoReplica),
            Ok(Err(CallError::Send(e))) => CallResult::Failed {
                failure: Failure::Connection,
                body: Bytes::from(error_chain(&e)),
            },
            Ok(Ok((parts, body))) => {
                let status = parts.status.as_u16();
                let worker = refusal_tag(&parts.headers);
                let retry_after = parts
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, chrono::Utc::now()));
                let ok = (200..300).contains(&status);
                match (status, worker, body) {
                    (429, Some(refusal::BUSY), _) => CallResult::Hold(Hold::Busy),
                    (503, Some(refusal::DRAINING), _) => CallResult::Hold(Hold::Draining),
                    (_, _, Ok(body)) if ok => CallResult::Delivered { status, body },
                    // The function did the work but its answer broke off:
                    // delivered (at-least-once allows a repeat).
                    (_, _, Err(_)) if ok => CallResult::Delivered {
                        status,
                        body: Bytes::new(),
                    },
                    (_, _, body) => CallResult::Failed {
                        failure: Failure::Status {
                            status,
                            retry_after,
                        },
                        body: body.unwrap_or_default(),
                    },
                }
            }
        };
        match &result {
            CallResult::Delivered { .. } => t.m.ok.inc(),
            CallResult::Failed { .. } => t.m.failed.inc(),
            CallResult::Hold(_) => t.m.hold.inc(),
        };
        if !matches!(result, CallResult::Hold(_)) {
            t.m.duration.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Delivers `event` to `f` until it is delivered, dead-lettered, given
    /// back for a later retry, or released because the process stops.
    pub async fn deliver<D: Delivery, S: DeadLetterSink>(
        &self,
        t: &Target,
        event: &Event,
        mut d: D,
        dead_letters: &S,
    ) {
        let f = &*t.spec;
        let function = t.key.as_str();
        let inflight = t.m.inflight.clone();
        inflight.inc();
        let _dec = scopeguard(move || {
            inflight.dec();
        });

        let mut attempt = d.attempt().max(1);
        if attempt > f.max_attempts {
            // Delivered again past its budget (an ack wait ran out, or its
            // dead letter could not be stored last time): no further call.
            let made = attempt - 1;
            let info = DeadLetterInfo {
                reason: format!("attempts exhausted ({made} of {})", f.max_attempts),
                attempts: made,
                last_status: None,
                last_response: Bytes::new(),
            };
            self.dead_letter(t, function, event, &mut d, dead_letters, info)
                .await;
            return;
        }
        // When the broker's deadline was last extended (or the event taken):
        // calls and pauses extend it once a progress interval has passed
        // since, however short each of them is.
        let taken = Instant::now();
        let mut extended = taken;
        let mut hold_since: Option<Instant> = None;
        let mut hold_pauses = Retrying::new(HOLD_PAUSE_FIRST, HOLD_PAUSE_MAX);
        // What was left of a retry pause when the message was requeued.
        if let Some(wait) = d.not_before().filter(|w| !w.is_zero()) {
            match self
                .wait(t, &mut d, taken, &mut extended, wait, attempt)
                .await
            {
                Waited::Done => {}
                Waited::Released => return self.release(&mut d, function, event).await,
                Waited::Requeued => return,
            }
        }
        loop {
            let result = self
                .call_extending(&mut d, &mut extended, t, event, attempt)
                .await;
            let (failure, body) = match result {
                CallResult::Delivered { body, .. } => {
                    if let Err(e) = d.reply(body).await {
                        tracing::warn!(function = %function, error = %e, "cannot publish the reply");
                    }
                    if let Err(e) = d.ack().await {
                        // Not acked: the broker redelivers, the function sees it
                        // twice (at-least-once), nothing is lost.
                        self.metrics.error("ack");
                        tracing::warn!(function = %function, position = %event.position, error = %e, "ack failed; the event will be redelivered");
                    }
                    t.m.delivered.inc();
                    if t.woken.load(std::sync::atomic::Ordering::Relaxed)
                        && t.woken.swap(false, std::sync::atomic::Ordering::Relaxed)
                    {
                        self.waker.forget(f);
                    }
                    return;
                }
                CallResult::Hold(hold) => {
                    self.metrics
                        .holds
                        .get_or_create(&ReasonLabels {
                            function: function.to_string(),
                            reason: hold.label(),
                        })
                        .inc();
                    if hold != Hold::Busy {
                        // Only a function with no replica is a cold start
                        // whose wake-up a later delivery may reset; a
                        // draining pod among serving ones is not.
                        if hold == Hold::NoReplica {
                            t.woken.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        self.waker.wake(f);
                    }
                    let since = *hold_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < self.config.hold_timeout {
                        if t.release.is_cancelled() {
                            self.release(&mut d, function, event).await;
                            return;
                        }
                        let pause = hold_pauses.next_pause();
                        // A hold costs no attempt: requeued, it comes back
                        // as the same one.
                        if self
                            .requeued_instead(&mut d, taken, pause, attempt, function)
                            .await
                        {
                            return;
                        }
                        let paused = match (&t.endpoints, hold) {
                            // None ready: go as soon as one is. (A listed
                            // replica that refused the connection waits the
                            // pause, or this would spin until it is removed.)
                            (Some(e), Hold::NoReplica) if e.pick().is_none() => {
                                tokio::select! {
                                    r = self.pause_extending(t, &mut d, &mut extended, pause) => r,
                                    () = e.ready() => !t.release.is_cancelled(),
                                }
                            }
                            _ => self.pause_extending(t, &mut d, &mut extended, pause).await,
                        };
                        if !paused {
                            self.release(&mut d, function, event).await;
                            return;
                        }
                        continue;
                    }
                    tracing::warn!(function = %function, position = %event.position, hold_timeout = ?self.config.hold_timeout, "no replica took the event within the hold timeout");
                    (Failure::HoldTimeout, Bytes::new())
                }
                CallResult::Failed { failure, body } => {
                    if let Some(e) = &t.endpoints {
                        e.failed(&failure.reason());
                    }
                    (failure, body)
                }
            };
            hold_since = None;
            hold_pauses.reset();

            let next = retry::next(
                attempt,
                f.max_attempts,
                &failure,
                self.config.backoff,
                rand::random(),
            );
            match next {
                Next::Retry(delay) => {
                    t.m.retries.inc();
                    tracing::info!(function = %function, attempt, failure = %failure.reason(), ?delay, "call failed; will retry");
                    if d.redelivers() {
                        if let Err(e) = d.retry_later(delay).await {
                            self.metrics.error("nak");
                            tracing::warn!(function = %function, error = %e, "cannot give the event back; the broker redelivers it after its ack wait");
                        }
                        return;
                    }
                    match self
                        .wait(t, &mut d, taken, &mut extended, delay, attempt + 1)
                        .await
                    {
                        Waited::Done => {}
                        Waited::Released => return self.release(&mut d, function, event).await,
                        Waited::Requeued => return,
                    }
                    attempt += 1;
                }
                Next::DeadLetter(reason) => {
                    self.dead_letter(
                        t,
                        function,
                        event,
                        &mut d,
                        dead_letters,
                        DeadLetterInfo {
                            reason,
                            attempts: attempt,
                            last_status: failure.status(),
                            last_response: body,
                        },
                    )
                    .await;
                    return;
                }
            }
        }
    }

    async fn release<D: Delivery>(&self, d: &mut D, function: &str, event: &Event) {
        if let Err(e) = d.release().await {
            tracing::warn!(function = %function, position = %event.position, error = %e, "cannot release the event; the broker redelivers it after its ack wait");
        }
    }

    /// Dead-letters (or, without a destination, drops) one message that a
    /// removed function still held when its retention passed. `Ok` once it
    /// is stored (or dropped): then the source may remove it.
    pub async fn expire_one<S: DeadLetterSink>(
        &self,
        spec: &FunctionSpec,
        event: &Event,
        sink: &S,
    ) -> Result<(), Error> {
        let function = spec.key().to_string();
        let Some(destination) = spec.dead_letter_topic().filter(|_| sink.stores()) else {
            self.outcome(&function, "dropped");
            return Ok(());
        };
        let info = DeadLetterInfo {
            reason: crate::supervisor::REMOVED_REASON.into(),
            attempts: 0,
            last_status: None,
            last_response: Bytes::new(),
        };
        sink.publish(
            &destination,
            dead_letter_headers(event, &info),
            event.body.clone(),
        )
        .await?;
        self.metrics
            .dead_letters
            .get_or_create(&FunctionLabels {
                function: function.clone(),
            })
            .inc();
        self.outcome(&function, "dead_lettered");
        Ok(())
    }

    fn outcome(&self, function: &str, outcome: &'static str) {
        self.metrics
            .deliveries
            .get_or_create(&OutcomeLabels {
                function: function.to_string(),
                outcome,
            })
            .inc();
    }

    async fn dead_letter<D: Delivery, S: DeadLetterSink>(
        &self,
        t: &Target,
        function: &str,
        event: &Event,
        d: &mut D,
        sink: &S,
        info: DeadLetterInfo,
    ) {
        let Some(destination) = t.dead_letter.as_deref().filter(|_| sink.stores()) else {
            tracing::warn!(
                function = %function,
                position = %event.position,
                topic = %event.topic,
                reason = %info.reason,
                attempts = info.attempts,
                "giving up on the event; dead letters are off (ebb.io/dead-letter: none) or this source has none"
            );
            if let Err(e) = d.terminate().await {
                tracing::warn!(function = %function, error = %e, "cannot terminate the event");
            }
            self.outcome(function, "dropped");
            return;
        };
        let headers = dead_letter_headers(event, &info);
        let mut published = sink
            .publish(destination, headers.clone(), event.body.clone())
            .await;
        // A source that does not redeliver keeps the event here: try the
        // dead letter again (doubling pauses up to the backoff cap) until
        // it is stored or the process stops. Giving the event back would
        // have it come straight back (or, on Kafka, stall its partition).
        let mut retry = Retrying::new(self.config.backoff.base, self.config.backoff.cap);
        while let Err(e) = &published {
            if d.redelivers() || !sink.can_retry() || t.release.is_cancelled() {
                break;
            }
            let pause = retry.next_pause();
            self.metrics.error("dead_letter");
            tracing::error!(function = %function, position = %event.position, %destination, error = %e, retry_in = ?pause, "cannot publish the dead letter; trying again");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = t.release.cancelled() => break,
            }
            published = sink
                .publish(destination, headers.clone(), event.body.clone())
                .await;
        }
        match published {
            Ok(()) => {
                if let Err(e) = d.terminate().await {
                    tracing::warn!(function = %function, error = %e, "dead-lettered, but cannot terminate the original; it may be delivered again");
                }
                self.metrics
                    .dead_letters
                    .get_or_create(&FunctionLabels {
                        function: function.to_string(),
                    })
                    .inc();
                self.outcome(function, "dead_lettered");
                tracing::info!(function = %function, position = %event.position, %destination, reason = %info.reason, "dead-lettered");
            }
            Err(e) => {
                // Never ack what was neither delivered nor dead-lettered.
                self.metrics.error("dead_letter");
                tracing::error!(function = %function, position = %event.position, %destination, error = %e, "cannot publish the dead letter; the event stays in the source");
                let delay = self.config.backoff.cap;
                if d.redelivers() {
                    let _ = d.retry_later(delay).await;
                } else {
                    let _ = d.release().await;
                }
            }
        }
    }

    /// A call, extending the broker's deadline while it lasts. `extended`
    /// is when the deadline was last extended; updated here.
    async fn call_extending<D: Delivery>(
        &self,
        d: &mut D,
        extended: &mut Instant,
        t: &Target,
        event: &Event,
        attempt: u32,
    ) -> CallResult {
        let keep = if d.replies() {
            self.config.max_response
        } else {
            KEPT_RESPONSE
        };
        let Some(every) = d.progress_interval() else {
            return self.call(t, event, attempt, keep).await;
        };
        let call = self.call(t, event, attempt, keep);
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return r,
                () = tokio::time::sleep_until(*extended + every) => {
                    extend(d, extended).await;
                }
            }
        }
    }

    /// Waits `pause`, extending the deadline whenever a progress interval has
    /// passed since `extended`; `false` when the target is released first.
    ///
    /// A hold is many short pauses (25 ms doubling to 1 s) between calls, so
    /// the interval is counted across pauses, not within each one: else no
    /// pause shorter than the interval would ever extend, and the broker
    /// would redeliver a held event after its ack wait.
    /// Waits `pause` before the call numbered `attempt`, unless that would
    /// keep the message unacked past its source's limit: then it is
    /// requeued.
    async fn wait<D: Delivery>(
        &self,
        t: &Target,
        d: &mut D,
        taken: Instant,
        extended: &mut Instant,
        pause: Duration,
        attempt: u32,
    ) -> Waited {
        if self
            .requeued_instead(d, taken, pause, attempt, &t.key)
            .await
        {
            return Waited::Requeued;
        }
        if self.pause_extending(t, d, extended, pause).await {
            Waited::Done
        } else {
            Waited::Released
        }
    }

    /// Whether `d`, taken at `taken`, was handed back to its source to be
    /// called as `attempt` after `pause`, because waiting here would keep it
    /// unacked past the source's limit. When the requeue fails it is not:
    /// the wait goes on (the broker gives it back if it closes the channel).
    async fn requeued_instead<D: Delivery>(
        &self,
        d: &mut D,
        taken: Instant,
        pause: Duration,
        attempt: u32,
        function: &str,
    ) -> bool {
        let Some(max) = d.max_unacked() else {
            return false;
        };
        if taken.elapsed() + pause <= max {
            return false;
        }
        match d.requeue(attempt, pause).await {
            Ok(()) => {
                self.outcome(function, "requeued");
                tracing::info!(function = %function, attempt, ?pause, ?max, "requeued: the wait would keep it unacked past --max-unacked");
                true
            }
            Err(e) => {
                self.metrics.error("requeue");
                tracing::warn!(function = %function, error = %e, "cannot requeue; waiting with the message unacked");
                false
            }
        }
    }

    async fn pause_extending<D: Delivery>(
        &self,
        t: &Target,
        d: &mut D,
        extended: &mut Instant,
        pause: Duration,
    ) -> bool {
        let until = Instant::now() + pause;
        loop {
            let every = d.progress_interval();
            let wake = every.map_or(until, |every| until.min(*extended + every));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = t.release.cancelled() => return false,
            }
            if every.is_some_and(|every| Instant::now() >= *extended + every) {
                extend(d, extended).await;
            }
            if Instant::now() >= until {
                return true;
            }
        }
    }
}

/// How a wait before a call ended.
enum Waited {
    Done,
    /// The function's consumer stopped: give the event back.
    Released,
    /// Handed back to the source ([`Delivery::requeue`]).
    Requeued,
}

/// Extends the broker's deadline of `d` and notes when.
async fn extend<D: Delivery>(d: &mut D, extended: &mut Instant) {
    if let Err(e) = d.in_progress().await {
        tracing::debug!(error = %e, "cannot extend the ack deadline");
    }
    *extended = Instant::now();
}

/// The worker's own refusal tag (`ebb-worker: busy|draining`), if any.
fn refusal_tag(headers: &HeaderMap) -> Option<&str> {
    headers.get(refusal::HEADER).and_then(|v| v.to_str().ok())
}

enum CallError {
    Send(hyper_util::client::legacy::Error),
}

/// An error with its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads a response body, keeping at most `max` bytes of it.
/// How much of a response is read when nothing but a dead letter can use
/// it (`ebb-last-response` keeps the first KiB).
pub const KEPT_RESPONSE: usize = 1024;

/// The first `max` bytes of `body`; the rest is read and dropped, so memory
/// stays bounded by `max` whatever the function answers.
async fn read_body(mut body: hyper::body::Incoming, max: usize) -> Result<Bytes, hyper::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            let room = max.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }
    Ok(out.freeze())
}

/// What a dead letter says about why it is one.
pub struct DeadLetterInfo {
    pub reason: String,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_response: Bytes,
}

/// The original headers plus `ebb-dead-letter-reason`, `ebb-attempts`,
/// `ebb-last-status`, `ebb-original-topic`, `ebb-source-position`, `ebb-last-response`.
pub fn dead_letter_headers(event: &Event, info: &DeadLetterInfo) -> HeaderMap {
    let mut h = event.headers.clone();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            h.insert(http::HeaderName::from_static(name), v);
        }
    };
    set("ebb-dead-letter-reason", info.reason.clone());
    set("ebb-attempts", info.attempts.to_string());
    set(
        "ebb-last-status",
        info.last_status
            .map_or_else(|| "none".to_string(), |s| s.to_string()),
    );
    set("ebb-original-topic", event.topic.clone());
    set("ebb-source-position", event.position.clone());
    set("ebb-event-id", event.id.clone());
    set("ebb-last-response", printable_prefix(&info.last_response));
    h
}

/// Runs `f` on drop.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A function's HTTP address: `ebb.io/url`, or the Kubernetes Service default.
pub fn function_url(f: &FunctionSpec) -> String {
    f.url
        .clone()
        .unwrap_or_else(|| format!("http://{}.{}.svc:8080", f.name, f.namespace))
}

/// Shared handle to the engine.
pub type SharedEngine = Arc<Engine>;

#[cfg(test)]
#[path = "engine_tests.rs"]
mod branch_tests;
