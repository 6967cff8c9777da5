//! The one lifecycle of every source's consumers.
//!
//! A [`Source`] says only what is particular to its broker: which functions
//! it takes, how it connects and sets up what its consumers share, how one
//! function's consumer starts, whether its topics can change in place, and
//! what is cleaned up when a function goes. The supervisor owns the rest,
//! once for NATS, RabbitMQ, Kafka, cron and the `ebb dev` bus:
//!
//! - the catalog loop and the diff ([`change`]): only what delivery depends
//!   on restarts a consumer; `max-inflight` and ready replicas resize its
//!   live limit; topics are re-filtered in place where the broker allows;
//!   scaling settings never reach a consumer;
//! - stopping a consumer, always the same way ([`wind_down`]): stop taking,
//!   wait for the consumer's loop, give back held and waiting events, let
//!   calls in flight finish within the drain timeout, then the source's
//!   finishing step (a last commit);
//! - readiness: ready once every function's consumer started or reported why
//!   it cannot; not ready while reconnecting or stopping;
//! - reconnects and retries with one back-off ([`Retrying`]);
//! - the drain on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ebb_model::{Catalog, Function, FunctionKey, FunctionSpec};
use ebb_runtime::Retrying;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::admin::Readiness;
use crate::engine::{DeadLetterSink, Delivery, Engine, Target};
use crate::event::Event;
use crate::limit::{Limit, Permit};
use crate::metrics::{FunctionLabels, Metrics};

/// What a consumer leaves to do once its calls have drained (Kafka's last
/// commit and leaving the group), or `None`.
pub type Finish = Option<BoxFuture<'static, ()>>;

/// A running consumer: the future the supervisor spawns. It returns when
/// its `stop` is cancelled (or it cannot go on), having stopped taking.
pub type ConsumerTask = BoxFuture<'static, Finish>;

/// What is particular to one broker (or schedule, or in-memory bus).
pub trait Source: Send + 'static {
    /// For log lines: `nats`, `amqp`, `kafka`, `cron`, `dev`.
    fn name(&self) -> &'static str;

    /// Whether this source serves `spec`: `None` when it is not for this
    /// source, `Some(Err(why))` when its settings do not fit the source
    /// (reported, not served), `Some(Ok(()))` when it is served.
    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>>;

    /// Connects (again, after [`Source::lost`]). A [`Error::Config`] stops
    /// the process; other errors are tried again with back-off.
    fn connect(&mut self) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }

    /// Resolves when the connection is lost and every consumer must start
    /// over on a new one (a client that reconnects by itself never resolves).
    fn lost(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    /// Sets up what the consumers of `functions` share (stream subjects,
    /// exchange, dead-letter queues), before any of them starts or changes.
    fn prepare(
        &mut self,
        _functions: &[Function],
    ) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }

    /// The limit a function's consumer uses, when the source keeps its own
    /// (`ebb dev`'s replicas); `None` for one sized by [`limit_for`].
    fn own_limit(&self, _f: &Function) -> Option<Arc<Limit>> {
        None
    }

    /// Starts one function's consumer; returns once it is consuming.
    fn start(&mut self, c: Consumer) -> impl Future<Output = Result<ConsumerTask, Error>> + Send;

    /// Changes the topics of a running consumer from `old`'s to `new`'s in
    /// place; `Ok(false)` when the broker cannot (then it is restarted).
    fn refilter(
        &mut self,
        _old: &FunctionSpec,
        _new: &FunctionSpec,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        async { Ok(false) }
    }

    /// A consumer stopped and drained: cleans up what the function's new
    /// settings do not use (bindings, an empty queue), or what it used when
    /// it is gone.
    fn retire(&mut self, _r: Retired<'_>) -> impl Future<Output = Result<(), Error>> + Send {
        async { Ok(()) }
    }

    /// A removed function's retention passed: moves what its consumer or
    /// queue still holds to its dead-letter destination (reason
    /// [`REMOVED_REASON`], dropped and counted with `dead-letter: none`),
    /// then deletes the consumer or queue, never while it still holds
    /// messages. Returns how many messages were moved. By default (a source
    /// that holds nothing for a function) it is [`Source::retire`].
    fn expire(
        &mut self,
        engine: &Engine,
        spec: &FunctionSpec,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        let _ = engine;
        async move {
            self.retire(Retired {
                old: spec,
                now: None,
            })
            .await
            .map(|()| 0)
        }
    }

    /// The process stops: every consumer has drained.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// The `ebb-dead-letter-reason` of what a removed function still held when
/// its retention passed.
pub const REMOVED_REASON: &str = "function removed";

/// A stopped consumer's function: the settings it ran with (`old`) and, when
/// it is restarted rather than gone, its new ones (`now`).
#[derive(Debug, Clone, Copy)]
pub struct Retired<'a> {
    pub old: &'a FunctionSpec,
    pub now: Option<&'a FunctionSpec>,
}

/// Everything one function's consumer works with.
pub struct Consumer {
    pub spec: Arc<FunctionSpec>,
    /// The function as the engine delivers to it.
    pub target: Arc<Target>,
    /// Deliveries of this function in flight (resized live).
    pub limit: Arc<Limit>,
    /// Deliveries in flight across the process.
    pub global: Arc<Limit>,
    /// Bytes of the messages the process holds (in flight, held, waiting
    /// to retry): `--max-inflight-bytes`.
    pub bytes: Arc<Limit>,
    pub engine: Arc<Engine>,
    /// Where its deliveries run; drained when it stops.
    pub tracker: TaskTracker,
    /// Cancelled when it must stop taking messages.
    pub stop: CancellationToken,
    /// Cancelled when its connection was lost: its deliveries end at once,
    /// their slots freed and their outcome dropped (the broker gives their
    /// messages to a consumer again).
    pub abandoned: CancellationToken,
}

/// A slot of the function and one of the process, held for one delivery,
/// and once its message is in hand, the message's bytes.
pub struct Slots {
    _function: Permit,
    _process: Permit,
    bytes: Option<Permit>,
}

impl Slots {
    pub fn new(function: Permit, process: Permit) -> Self {
        Self {
            _function: function,
            _process: process,
            bytes: None,
        }
    }
}

impl Consumer {
    /// `namespace/name`.
    pub fn key(&self) -> &str {
        &self.target.key
    }

    /// A slot of the function; `None` once stopped.
    pub async fn function_slot(&self) -> Option<Permit> {
        tokio::select! {
            p = self.limit.acquire() => Some(p),
            () = self.stop.cancelled() => None,
        }
    }

    /// A slot of the process; `None` once stopped.
    pub async fn process_slot(&self) -> Option<Permit> {
        tokio::select! {
            p = self.global.acquire() => Some(p),
            () = self.stop.cancelled() => None,
        }
    }

    /// Both slots, the function's first; `None` once stopped.
    pub async fn slots(&self) -> Option<Slots> {
        let function = self.function_slot().await?;
        let process = self.process_slot().await?;
        Some(Slots::new(function, process))
    }

    /// Takes `len` bytes of the process's byte budget for the message
    /// `slots` were taken for; waits while the budget is spent (the message
    /// waits with its source meanwhile). `false` once stopped: give the
    /// message back.
    pub async fn admit(&self, slots: &mut Slots, len: usize) -> bool {
        tokio::select! {
            p = self.bytes.acquire_n(len) => {
                slots.bytes = Some(p);
                true
            }
            () = self.stop.cancelled() => false,
        }
    }

    /// Bytes the process may still take in (for byte-bounded pulls).
    pub fn bytes_available(&self) -> usize {
        self.bytes.available()
    }

    /// Both slots if free now.
    pub fn try_slots(&self) -> Option<Slots> {
        let function = self.limit.try_acquire()?;
        let process = self.global.try_acquire()?;
        Some(Slots::new(function, process))
    }

    /// The delivery of `event`, holding `slots` until it is settled.
    pub fn delivery<D, S>(
        &self,
        slots: Slots,
        event: Event,
        delivery: D,
        sink: Arc<S>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        D: Delivery + 'static,
        S: DeadLetterSink + 'static,
    {
        let (engine, target) = (self.engine.clone(), self.target.clone());
        let abandoned = self.abandoned.clone();
        async move {
            let _slots = slots;
            tokio::select! {
                () = engine.deliver(&target, &event, delivery, sink.as_ref()) => {}
                () = abandoned.cancelled() => {
                    tracing::debug!(function = %target.key, position = %event.position, "delivery abandoned with its connection");
                }
            }
        }
    }

    /// Delivers `event` in a task of its own.
    pub fn deliver<D, S>(&self, slots: Slots, event: Event, delivery: D, sink: Arc<S>)
    where
        D: Delivery + 'static,
        S: DeadLetterSink + 'static,
    {
        self.tracker
            .spawn(self.delivery(slots, event, delivery, sink));
    }
}

/// What most brokers' [`Source::accepts`] says: a function with topics is
/// served when each name in `names` (its topics, and whatever else the
/// broker must accept) passes `valid`.
pub fn accepts_names<'a>(
    spec: &FunctionSpec,
    names: impl IntoIterator<Item = &'a String>,
    valid: impl Fn(&str) -> Result<(), String>,
) -> Option<Result<(), String>> {
    (!spec.topics.is_empty()).then(|| names.into_iter().try_for_each(|t| valid(t)))
}

/// Deliveries a function may have in flight: `max-inflight` per ready
/// replica, at least one replica's worth (a function at zero is woken by
/// its first held event).
pub fn limit_for(spec: &FunctionSpec, ready: Option<u32>) -> usize {
    spec.max_inflight as usize * ready.unwrap_or(1).max(1) as usize
}

/// How a function's settings changed, as far as its consumer cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing delivery depends on (the limit may still follow
    /// `max-inflight` and ready replicas).
    Same,
    /// Only its topics: re-filter the running consumer where possible.
    Topics,
    /// Something a running consumer was built from: restart it.
    Restart,
}

/// The part of a function's settings its delivery depends on: everything
/// but the scaling settings (which only the autoscaler reads), the topics
/// (re-filtered in place) and `max-inflight` (a live limit). A setting added
/// later counts as delivery's until it is listed here.
fn delivery_part(spec: &FunctionSpec) -> FunctionSpec {
    let mut d = spec.clone();
    d.topics = Vec::new();
    d.max_inflight = 0;
    d.min_replicas = 0;
    d.max_replicas = 0;
    d.target = 0.0;
    d.scale_to_zero_after = Duration::ZERO;
    d.scale_down_window = Duration::ZERO;
    d.activation = 0.0;
    d.prometheus = None;
    d.paused = false;
    d.fallback_replicas = None;
    d
}

/// How `new` differs from `old` for the consumer built from `old`.
pub fn change(old: &FunctionSpec, new: &FunctionSpec) -> Change {
    if delivery_part(old) != delivery_part(new) {
        Change::Restart
    } else if old.topics != new.topics {
        Change::Topics
    } else {
        Change::Same
    }
}

/// Settings of the supervisor.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Deliveries in flight across all functions.
    pub max_inflight_total: usize,
    /// How long a stopping consumer's calls may take to finish.
    pub drain_timeout: Duration,
    /// How long a removed function's consumer, queue or offsets are kept
    /// (with what it holds) in case it comes back.
    pub retain_removed: Duration,
    /// Bytes of all messages the process holds at once.
    pub max_inflight_bytes: usize,
}

impl Settings {
    /// Removed functions are retained for [`Settings::RETAIN_REMOVED`].
    pub fn new(max_inflight_total: usize, drain_timeout: Duration) -> Self {
        Self {
            max_inflight_total,
            drain_timeout,
            retain_removed: Self::RETAIN_REMOVED,
            max_inflight_bytes: Self::MAX_INFLIGHT_BYTES,
        }
    }

    /// The default of [`Settings::max_inflight_bytes`]: 64 MiB.
    pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;

    /// The default of [`Settings::retain_removed`]: a day.
    pub const RETAIN_REMOVED: Duration = Duration::from_secs(24 * 3600);
}

/// How long a consumer's loop may take to stop taking.
const LOOP_STOP: Duration = Duration::from_secs(5);

/// How long after a failed expiry it is tried again.
const EXPIRE_AGAIN: Duration = Duration::from_secs(30);

struct Running {
    spec: Arc<FunctionSpec>,
    target: Arc<Target>,
    limit: Arc<Limit>,
    stop: CancellationToken,
    abandoned: CancellationToken,
    tracker: TaskTracker,
    task: JoinHandle<Finish>,
}

/// Stops one consumer the one way: stop taking; once its loop ended, give
/// back what is held or waiting (not before: a message given back while
/// the loop still had a pull open could be handed straight back to it);
/// calls in flight finish within `drain`; then its finishing step.
async fn wind_down(mut r: Running, drain: Duration) {
    r.stop.cancel();
    let finish = match tokio::time::timeout(LOOP_STOP, &mut r.task).await {
        Ok(Ok(finish)) => finish,
        Ok(Err(e)) => {
            tracing::error!(function = %r.target.key, error = %e, "consumer task failed");
            None
        }
        Err(_) => {
            tracing::warn!(function = %r.target.key, "a consumer did not stop taking within {LOOP_STOP:?}");
            r.task.abort();
            None
        }
    };
    r.target.release();
    r.tracker.close();
    if tokio::time::timeout(drain, r.tracker.wait()).await.is_err() {
        tracing::warn!(function = %r.target.key, left = r.limit.in_use(), ?drain, "drain timeout passed; unfinished events go back to the source");
    }
    if let Some(f) = finish {
        f.await;
    }
}

/// Which functions of `catalog` `source` serves; reports the others'
/// errors and sets the `functions` and `config_errors` gauges. A function
/// whose new settings do not fit the source keeps those it was served with
/// (in `previous`) until they are fixed.
fn served<S: Source>(
    source: &S,
    catalog: &Catalog,
    previous: &[Function],
    metrics: &Metrics,
) -> Vec<Function> {
    let mut out = Vec::new();
    let mut bad = catalog.errors.len();
    for f in &catalog.functions {
        match source.accepts(&f.spec) {
            None => {}
            Some(Ok(())) => out.push(f.clone()),
            Some(Err(why)) => {
                bad += 1;
                let key = f.key();
                match previous.iter().find(|p| p.key() == key) {
                    Some(last) => {
                        tracing::error!(function = %key, source = source.name(), error = %why, "invalid function settings; served on its last valid ones until fixed");
                        out.push(Function {
                            spec: last.spec.clone(),
                            ready_replicas: f.ready_replicas,
                        });
                    }
                    None => {
                        tracing::error!(function = %key, source = source.name(), error = %why, "skipping function");
                    }
                }
            }
        }
    }
    metrics.config_errors.set(bad as i64);
    metrics.functions.set(out.len() as i64);
    out
}

/// The supervisor's state between passes.
struct Supervisor<S: Source> {
    source: S,
    engine: Arc<Engine>,
    global: Arc<Limit>,
    bytes: Arc<Limit>,
    settings: Settings,
    running: HashMap<FunctionKey, Running>,
    /// Consumers winding down in the background, by function.
    stopping: HashMap<FunctionKey, JoinHandle<()>>,
    /// Told the key of each consumer that finished winding down.
    stopped_tx: mpsc::UnboundedSender<(FunctionKey, Arc<FunctionSpec>)>,
    /// Removed functions whose consumer, queue or offsets are kept.
    kept: HashMap<FunctionKey, Kept>,
}

/// A removed function, retained until `until`.
struct Kept {
    spec: Arc<FunctionSpec>,
    until: tokio::time::Instant,
}

impl<S: Source> Supervisor<S> {
    /// One pass: shared set-up, then every consumer brought in line with
    /// `functions`. `Ok(true)` when every function is consuming; `Ok(false)`
    /// when some could not start (each reported) or wait for their old
    /// consumer to stop; `Err` when the shared set-up failed.
    async fn reconcile(&mut self, functions: &[Function]) -> Result<bool, Error> {
        // A retained function that is back resumes on what was kept.
        for f in functions {
            let key = f.key();
            let Some(kept) = self.kept.remove(&key) else {
                continue;
            };
            tracing::info!(function = %key, source = self.source.name(), "a removed function is back; resuming where it left off");
            if change(&kept.spec, &f.spec) != Change::Same {
                let back = Retired {
                    old: &kept.spec,
                    now: Some(&f.spec),
                };
                if let Err(e) = self.source.retire(back).await {
                    self.engine.metrics().error(e.metric_label());
                    tracing::warn!(function = %key, error = %e, "cannot clean up what its old settings used");
                }
            }
        }
        // What is shared (stream subjects, bindings) stays for the retained.
        let mut shared = functions.to_vec();
        shared.extend(self.kept.values().map(|k| Function {
            spec: k.spec.clone(),
            ready_replicas: None,
        }));
        self.source.prepare(&shared).await?;
        let wanted: HashMap<FunctionKey, &Function> =
            functions.iter().map(|f| (f.key(), f)).collect();

        // Gone, or changed in what delivery depends on: wind down, in the
        // background; a restart starts once the old consumer is gone.
        let mut to_stop = Vec::new();
        for (key, r) in &self.running {
            let why = match wanted.get(key) {
                None => "removed",
                Some(f) => match change(&r.spec, &f.spec) {
                    Change::Restart => "settings changed",
                    Change::Topics | Change::Same => continue,
                },
            };
            to_stop.push((key.clone(), why));
        }
        for (key, why) in to_stop {
            self.stop_in_background(&key, why);
        }

        let mut complete = true;
        for f in functions {
            let key = f.key();
            if let Some(old) = self.running.get(&key).map(|r| r.spec.clone()) {
                if change(&old, &f.spec) == Change::Topics {
                    match self.source.refilter(&old, &f.spec).await {
                        Ok(true) => {
                            tracing::info!(function = %key, topics = ?f.spec.topics, "topics changed in place");
                        }
                        Ok(false) => {
                            // Started again once it has stopped.
                            self.stop_in_background(&key, "topics changed");
                            complete = false;
                            continue;
                        }
                        Err(e) => {
                            self.engine.metrics().error(e.metric_label());
                            tracing::error!(function = %key, error = %e, "cannot change the topics; trying again");
                            complete = false;
                            continue;
                        }
                    }
                }
                let Some(r) = self.running.get_mut(&key) else {
                    continue;
                };
                // Scaling settings ride along (delivery's part is the same);
                // the limit follows `max-inflight` and ready replicas.
                r.spec = f.spec.clone();
                if self.source.own_limit(f).is_none() {
                    r.limit.set_max(limit_for(&f.spec, f.ready_replicas));
                }
                let max = r.limit.max();
                self.limit_gauge(&key).set(max as i64);
                continue;
            }
            if self.stopping.contains_key(&key) {
                // Its old consumer is still finishing.
                complete = false;
                continue;
            }
            let target = match self.engine.target(f.spec.clone()) {
                Ok(t) => t,
                Err(e) => {
                    self.engine.metrics().config_errors.inc();
                    tracing::error!(function = %key, error = %e, "skipping function");
                    continue;
                }
            };
            let limit = self
                .source
                .own_limit(f)
                .unwrap_or_else(|| Limit::new(limit_for(&f.spec, f.ready_replicas)));
            let stop = CancellationToken::new();
            let abandoned = CancellationToken::new();
            let tracker = TaskTracker::new();
            let consumer = Consumer {
                spec: f.spec.clone(),
                target: target.clone(),
                limit: limit.clone(),
                global: self.global.clone(),
                bytes: self.bytes.clone(),
                engine: self.engine.clone(),
                tracker: tracker.clone(),
                stop: stop.clone(),
                abandoned: abandoned.clone(),
            };
            match self.source.start(consumer).await {
                Ok(task) => {
                    tracing::info!(function = %key, source = self.source.name(), topics = ?f.spec.topics, limit = limit.max(), "consuming");
                    self.engine
                        .metrics()
                        .consumer_starts
                        .get_or_create(&FunctionLabels {
                            function: key.to_string(),
                        })
                        .inc();
                    self.limit_gauge(&key).set(limit.max() as i64);
                    self.running.insert(
                        key,
                        Running {
                            spec: f.spec.clone(),
                            target,
                            limit,
                            stop,
                            abandoned,
                            tracker,
                            task: tokio::spawn(task),
                        },
                    );
                }
                Err(e @ Error::Config(_)) => {
                    // Nothing to try again until its settings change.
                    self.engine.metrics().config_errors.inc();
                    tracing::error!(function = %key, error = %e, "skipping function");
                }
                Err(e) => {
                    // One function's consumer (a `queue` that does not
                    // exist, say) does not keep the others from being
                    // served; it is tried again.
                    self.engine.metrics().error(e.metric_label());
                    tracing::error!(function = %key, source = self.source.name(), error = %e, "cannot consume for this function; trying again");
                    complete = false;
                }
            }
        }
        Ok(complete)
    }

    fn limit_gauge(&self, key: &FunctionKey) -> prometheus_client::metrics::gauge::Gauge {
        self.engine
            .metrics()
            .delivery_limit
            .get_or_create(&FunctionLabels {
                function: key.to_string(),
            })
            .clone()
    }

    /// Winds down `key`'s consumer in the background; the loop hears when
    /// it is done.
    fn stop_in_background(&mut self, key: &FunctionKey, why: &'static str) {
        let Some(r) = self.running.remove(key) else {
            return;
        };
        tracing::info!(function = %key, source = self.source.name(), why, "stopping consumer");
        let (drain, tx, spec) = (
            self.settings.drain_timeout,
            self.stopped_tx.clone(),
            r.spec.clone(),
        );
        let k = key.clone();
        let task = tokio::spawn(async move {
            wind_down(r, drain).await;
            let _ = tx.send((k, spec));
        });
        self.stopping.insert(key.clone(), task);
    }

    /// A consumer finished winding down: a removed function is retained;
    /// one restarted with new settings has what they no longer use cleaned up.
    async fn stopped(&mut self, key: FunctionKey, old: Arc<FunctionSpec>, now: Option<&Function>) {
        self.stopping.remove(&key);
        let Some(now) = now else {
            let retain = self.settings.retain_removed;
            tracing::info!(function = %key, source = self.source.name(), ?retain, "function removed; what it holds is kept for it");
            let until = tokio::time::Instant::now() + retain;
            self.kept.insert(key, Kept { spec: old, until });
            return;
        };
        let r = Retired {
            old: &old,
            now: Some(&now.spec),
        };
        if let Err(e) = self.source.retire(r).await {
            self.engine.metrics().error(e.metric_label());
            tracing::warn!(function = %key, error = %e, "cannot clean up after the stopped consumer");
        }
    }

    /// When the next retained function's retention passes.
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        self.kept.values().map(|k| k.until).min()
    }

    /// Expires every retained function whose retention passed; one that
    /// cannot be expired now is tried again later.
    async fn expire_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<FunctionKey> = self
            .kept
            .iter()
            .filter(|(_, k)| k.until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let Some(spec) = self.kept.get(&key).map(|k| k.spec.clone()) else {
                continue;
            };
            match self.source.expire(&self.engine, &spec).await {
                Ok(moved) => {
                    self.kept.remove(&key);
                    let destination = spec.dead_letter_topic();
                    tracing::info!(function = %key, source = self.source.name(), moved, destination = destination.as_deref().unwrap_or("none (dropped)"), "retention of a removed function passed; what it held was moved to its dead letters and its consumer deleted");
                }
                Err(e) => {
                    self.engine.metrics().error(e.metric_label());
                    let again = now + EXPIRE_AGAIN;
                    tracing::error!(function = %key, source = self.source.name(), error = %e, retry_in = ?EXPIRE_AGAIN, "cannot expire a removed function; nothing is deleted");
                    if let Some(k) = self.kept.get_mut(&key) {
                        k.until = again;
                    }
                }
            }
        }
    }

    /// After a failed connect or set-up: a configuration mistake stops
    /// everything (returned); anything else is reported and tried again
    /// after the returned pause.
    async fn failed(
        &mut self,
        e: Error,
        what: &str,
        retry: &mut Retrying,
    ) -> Result<Duration, Error> {
        if e.is_config() {
            self.stop_all().await;
            return Err(e);
        }
        self.engine.metrics().error(e.metric_label());
        let pause = retry.next_pause();
        tracing::error!(source = self.source.name(), error = %e, retry_in = ?pause, "{what}");
        Ok(pause)
    }

    /// Every running consumer winds down together; also waits for those
    /// already winding down.
    async fn stop_all(&mut self) {
        let drain = self.settings.drain_timeout;
        let all = self.running.drain().map(|(_, r)| wind_down(r, drain));
        futures::future::join_all(all).await;
        for (_, t) in self.stopping.drain() {
            let _ = t.await;
        }
    }

    /// After a lost connection: consumers stop taking, and their deliveries
    /// end at once (calls cut, slots freed, outcomes dropped): the broker
    /// already took their messages back, and an outcome would go to a
    /// closed channel.
    async fn abandon_all(&mut self) {
        for (_, r) in self.running.drain() {
            r.abandoned.cancel();
            let drain = self.settings.drain_timeout;
            tokio::spawn(wind_down(r, drain));
        }
    }
}

/// Sleeps until `at` (forever without one).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `source`'s consumers for the functions of `catalog` until
/// `shutdown`, then drains: stop taking, give back what is held, let calls
/// finish within the drain timeout.
pub async fn run<S: Source>(
    source: S,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    ready: Arc<Readiness>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (stopped_tx, mut stopped_rx) = mpsc::unbounded_channel();
    let mut sv = Supervisor {
        source,
        global: Limit::new(settings.max_inflight_total.max(1)),
        bytes: Limit::new(settings.max_inflight_bytes.max(1)),
        engine,
        settings,
        running: HashMap::new(),
        stopping: HashMap::new(),
        stopped_tx,
        kept: HashMap::new(),
    };
    let name = sv.source.name();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut retry = Retrying::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut connected = false;
    let mut functions: Vec<Function> = Vec::new();
    let mut catalog_changed = true;

    loop {
        let mut again = None;
        if !connected {
            let attempt = tokio::select! {
                r = sv.source.connect() => r,
                () = &mut shutdown => break,
            };
            match attempt {
                Ok(()) => connected = true,
                Err(e) => again = Some(sv.failed(e, "cannot connect", &mut retry).await?),
            }
        }
        if connected {
            if catalog_changed {
                let snapshot = catalog.borrow_and_update().clone();
                functions = served(&sv.source, &snapshot, &functions, sv.engine.metrics());
                catalog_changed = false;
            }
            match sv.reconcile(&functions).await {
                Ok(complete) => {
                    ready.set(true);
                    if complete {
                        retry.reset();
                    } else {
                        again = Some(retry.next_pause());
                    }
                }
                Err(e) => {
                    let what = "cannot set up what the consumers share";
                    again = Some(sv.failed(e, what, &mut retry).await?);
                }
            }
        }
        let lost = sv.source.lost();
        let expiry = sv.next_expiry();
        tokio::select! {
            r = catalog.changed() => {
                if r.is_err() {
                    // The catalog's source ended (only at shutdown).
                    shutdown.as_mut().await;
                    break;
                }
                catalog_changed = true;
            }
            Some((key, old)) = stopped_rx.recv() => {
                let now = functions.iter().find(|f| f.key() == key);
                sv.stopped(key, old, now).await;
            }
            () = sleep_until(expiry), if connected && expiry.is_some() => {
                sv.expire_due().await;
            }
            () = tokio::time::sleep(again.unwrap_or(Duration::from_secs(3600))) => {}
            () = lost, if connected => {
                ready.set(false);
                tracing::warn!(source = name, "connection lost; starting over on a new one");
                sv.abandon_all().await;
                connected = false;
            }
            () = &mut shutdown => break,
        }
    }

    tracing::info!(source = name, drain_timeout = ?sv.settings.drain_timeout, inflight = sv.global.in_use(), "stopping: no more messages taken; finishing in-flight calls");
    ready.set(false);
    sv.stop_all().await;
    sv.source.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        let mut s = FunctionSpec::new("f", "default");
        s.topics = vec!["a".into()];
        s
    }

    #[test]
    fn scaling_settings_never_restart_a_consumer() {
        let old = spec();
        let mut new = old.clone();
        new.min_replicas = 1;
        new.max_replicas = 3;
        new.target = 2.5;
        new.scale_to_zero_after = Duration::from_secs(1);
        new.scale_down_window = Duration::from_secs(1);
        new.activation = 4.0;
        new.paused = true;
        new.fallback_replicas = Some(2);
        new.max_inflight = 99;
        assert_eq!(change(&old, &new), Change::Same);
    }

    #[test]
    fn topics_are_refiltered_and_delivery_settings_restart() {
        let old = spec();
        let mut topics = old.clone();
        topics.topics.push("b".into());
        assert_eq!(change(&old, &topics), Change::Topics);
        let edits: [fn(&mut FunctionSpec); 7] = [
            |s| s.url = Some("http://127.0.0.1:9".into()),
            |s| s.timeout = Duration::from_secs(1),
            |s| s.max_attempts = 9,
            |s| s.dead_letter = Some("dead".into()),
            |s| s.queue = Some("q".into()),
            |s| s.consumer_group = Some("g".into()),
            |s| s.schedule = Some("@every 1s".into()),
        ];
        for edit in edits {
            let mut new = old.clone();
            edit(&mut new);
            assert_eq!(change(&old, &new), Change::Restart, "{new:?}");
        }
    }

    #[test]
    fn limits_follow_ready_replicas_with_at_least_one() {
        let mut s = spec();
        s.max_inflight = 4;
        assert_eq!(limit_for(&s, None), 4);
        assert_eq!(limit_for(&s, Some(0)), 4);
        assert_eq!(limit_for(&s, Some(3)), 12);
    }
}
