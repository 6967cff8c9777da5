//! The delivery engine shared by every connector: one event to one function,
//! with retries, holds (no ready replica), wake-ups and dead letters. A source
//! adds only how it acks, delays, extends and terminates its messages
//! ([`Delivery`]) and where dead letters go ([`DeadLetterSink`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ebb_model::FunctionSpec;
use http::HeaderMap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::event::{Event, Signer, delivery_headers, printable_prefix};
use crate::metrics::{FunctionLabels, Metrics, OutcomeLabels, ReasonLabels};
use crate::retry::{self, Backoff, Failure, Next};

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
    /// The 1-based attempt number of this delivery.
    fn attempt(&self) -> u32;
    /// Whether the source redelivers a message given back with a delay
    /// (JetStream NAK): then a retry is left to the broker; otherwise the
    /// engine waits and calls again itself.
    fn redelivers(&self) -> bool;
    /// How often to extend the broker's deadline while a call or hold lasts.
    fn progress_interval(&self) -> Option<Duration>;
    /// Delivered: remove the message from the source.
    fn ack(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Failed, retry after `delay`.
    fn retry_later(&mut self, delay: Duration) -> impl Future<Output = Result<(), Error>> + Send;
    /// Still working on it: extend the deadline.
    fn in_progress(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Shutting down: give it back for redelivery now.
    fn release(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// Dead-lettered (or given up): never redeliver.
    fn terminate(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// The function's answer to a delivered event (request/reply sources).
    fn reply(&mut self, _body: Bytes) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }
}

/// Where a source publishes dead letters.
pub trait DeadLetterSink: Send + Sync {
    /// Publishes durably; `Ok` only once the broker has the message.
    fn publish(
        &self,
        destination: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A sink for sources without dead-letter support: every publish fails, so
/// nothing is acked on its account.
pub struct NoDeadLetters;

impl DeadLetterSink for NoDeadLetters {
    async fn publish(&self, destination: &str, _: HeaderMap, _: Bytes) -> Result<(), Error> {
        Err(Error::DeadLetter(format!(
            "this source cannot publish dead letters (to {destination})"
        )))
    }
}

/// Sends wake-ups to the autoscaler, at most one per function per second.
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

    pub fn wake(&self, f: &FunctionSpec) {
        let Some(base) = &self.url else { return };
        let key = format!("{}/{}", f.namespace, f.name);
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

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub backoff: Backoff,
    /// How long an event may wait for a ready replica before that counts as a failed attempt.
    pub hold_timeout: Duration,
    pub signer: Option<Signer>,
    /// Largest response body kept (for replies and dead letters).
    pub max_response: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            hold_timeout: Duration::from_secs(300),
            signer: None,
            max_response: 1 << 20,
        }
    }
}

/// Delivers events to functions over HTTP.
pub struct Engine {
    client: reqwest::Client,
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
        Ok(Self {
            waker: Waker::new(autoscaler_url, client.clone(), metrics.clone()),
            client,
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

    /// One call of `event` to `f`.
    pub async fn call(
        &self,
        f: &FunctionSpec,
        url: &str,
        event: &Event,
        attempt: u32,
    ) -> CallResult {
        let now_unix = chrono::Utc::now().timestamp();
        let headers = delivery_headers(event, attempt, self.config.signer.as_ref(), now_unix);
        let started = Instant::now();
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .timeout(f.timeout)
            .body(event.body.clone())
            .send()
            .await;
        let result = match sent {
            Err(e) if e.is_connect() => CallResult::Hold(Hold::NoReplica),
            Err(e) if e.is_timeout() => CallResult::Failed {
                failure: Failure::Timeout,
                body: Bytes::new(),
            },
            Err(e) => CallResult::Failed {
                failure: Failure::Connection,
                body: Bytes::from(e.to_string()),
            },
            Ok(resp) => {
                let status = resp.status().as_u16();
                let worker = resp
                    .headers()
                    .get("ebb-worker")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let retry_after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, chrono::Utc::now()));
                match (status, worker.as_deref()) {
                    (429, Some("busy")) => CallResult::Hold(Hold::Busy),
                    (503, Some("draining")) => CallResult::Hold(Hold::Draining),
                    _ => {
                        let ok = (200..300).contains(&status);
                        match read_body(resp, self.config.max_response).await {
                            Ok(body) if ok => CallResult::Delivered { status, body },
                            Ok(body) => CallResult::Failed {
                                failure: Failure::Status {
                                    status,
                                    retry_after,
                                },
                                body,
                            },
                            // The function did the work but its answer broke
                            // off: delivered (at-least-once allows a repeat).
                            Err(_) if ok => CallResult::Delivered {
                                status,
                                body: Bytes::new(),
                            },
                            Err(e) if e.is_timeout() => CallResult::Failed {
                                failure: Failure::Timeout,
                                body: Bytes::new(),
                            },
                            Err(_) => CallResult::Failed {
                                failure: Failure::Status {
                                    status,
                                    retry_after,
                                },
                                body: Bytes::new(),
                            },
                        }
                    }
                }
            }
        };
        let function = format!("{}/{}", f.namespace, f.name);
        let outcome = match &result {
            CallResult::Delivered { .. } => "ok",
            CallResult::Failed { .. } => "failed",
            CallResult::Hold(_) => "hold",
        };
        self.metrics
            .attempts
            .get_or_create(&OutcomeLabels {
                function: function.clone(),
                outcome,
            })
            .inc();
        if !matches!(result, CallResult::Hold(_)) {
            self.metrics
                .duration
                .get_or_create(&FunctionLabels { function })
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Delivers `event` to `f` until it is delivered, dead-lettered, given
    /// back for a later retry, or released because the process stops.
    pub async fn deliver<D: Delivery, S: DeadLetterSink>(
        &self,
        f: &FunctionSpec,
        url: &str,
        event: &Event,
        mut d: D,
        dead_letters: &S,
    ) {
        let function = format!("{}/{}", f.namespace, f.name);
        let labels = FunctionLabels {
            function: function.clone(),
        };
        let inflight = self.metrics.inflight.get_or_create(&labels).clone();
        inflight.inc();
        let _dec = scopeguard(move || {
            inflight.dec();
        });

        let mut attempt = d.attempt().max(1);
        let mut hold_since: Option<Instant> = None;
        let mut hold_delay = Duration::from_millis(25);
        loop {
            let result = self.call_extending(&mut d, f, url, event, attempt).await;
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
                    self.outcome(&function, "delivered");
                    return;
                }
                CallResult::Hold(hold) => {
                    self.metrics
                        .holds
                        .get_or_create(&ReasonLabels {
                            function: function.clone(),
                            reason: hold.label(),
                        })
                        .inc();
                    if hold != Hold::Busy {
                        self.waker.wake(f);
                    }
                    let since = *hold_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < self.config.hold_timeout {
                        if self.stopping.is_cancelled() {
                            self.release(&mut d, &function, event).await;
                            return;
                        }
                        let pause = hold_delay;
                        hold_delay = (hold_delay * 2).min(Duration::from_secs(1));
                        if !self.pause_extending(&mut d, pause).await {
                            self.release(&mut d, &function, event).await;
                            return;
                        }
                        continue;
                    }
                    tracing::warn!(function = %function, position = %event.position, hold_timeout = ?self.config.hold_timeout, "no replica took the event within the hold timeout");
                    (Failure::HoldTimeout, Bytes::new())
                }
                CallResult::Failed { failure, body } => (failure, body),
            };
            hold_since = None;
            hold_delay = Duration::from_millis(25);

            let next = retry::next(
                attempt,
                f.max_attempts,
                &failure,
                self.config.backoff,
                rand::random(),
            );
            match next {
                Next::Retry(delay) => {
                    self.metrics.retries.get_or_create(&labels).inc();
                    tracing::info!(function = %function, attempt, failure = %failure.reason(), ?delay, "call failed; will retry");
                    if d.redelivers() {
                        if let Err(e) = d.retry_later(delay).await {
                            self.metrics.error("nak");
                            tracing::warn!(function = %function, error = %e, "cannot give the event back; the broker redelivers it after its ack wait");
                        }
                        return;
                    }
                    if !self.pause_extending(&mut d, delay).await {
                        self.release(&mut d, &function, event).await;
                        return;
                    }
                    attempt += 1;
                }
                Next::DeadLetter(reason) => {
                    self.dead_letter(
                        f,
                        &function,
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
        f: &FunctionSpec,
        function: &str,
        event: &Event,
        d: &mut D,
        sink: &S,
        info: DeadLetterInfo,
    ) {
        let Some(destination) = &f.dead_letter else {
            tracing::warn!(
                function = %function,
                position = %event.position,
                topic = %event.topic,
                reason = %info.reason,
                attempts = info.attempts,
                "giving up on the event; no dead-letter destination (set ebb.io/dead-letter to keep such events)"
            );
            if let Err(e) = d.terminate().await {
                tracing::warn!(function = %function, error = %e, "cannot terminate the event");
            }
            self.outcome(function, "dropped");
            return;
        };
        let headers = dead_letter_headers(event, &info);
        match sink.publish(destination, headers, event.body.clone()).await {
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

    /// A call, extending the broker's deadline while it lasts.
    async fn call_extending<D: Delivery>(
        &self,
        d: &mut D,
        f: &FunctionSpec,
        url: &str,
        event: &Event,
        attempt: u32,
    ) -> CallResult {
        let Some(every) = d.progress_interval() else {
            return self.call(f, url, event, attempt).await;
        };
        let call = self.call(f, url, event, attempt);
        tokio::pin!(call);
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = tick.tick() => {
                    if let Err(e) = d.in_progress().await {
                        tracing::debug!(error = %e, "cannot extend the ack deadline");
                    }
                }
            }
        }
    }

    /// Waits `pause`, extending the deadline; `false` when the process stops first.
    async fn pause_extending<D: Delivery>(&self, d: &mut D, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            let step = match d.progress_interval() {
                Some(every) => every.min(until.saturating_duration_since(Instant::now())),
                None => until.saturating_duration_since(Instant::now()),
            };
            tokio::select! {
                () = tokio::time::sleep(step) => {}
                () = self.stopping.cancelled() => return false,
            }
            if Instant::now() >= until {
                return true;
            }
            if let Err(e) = d.in_progress().await {
                tracing::debug!(error = %e, "cannot extend the ack deadline");
            }
        }
    }
}

async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Bytes, reqwest::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
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
