//! The cron connector: invokes functions on their `schedule`.
//!
//! Each scheduled function has one task that waits for its next instant and
//! fires one delivery through the shared [`Engine`]: retries, dead letters
//! and wake-ups from zero work as for broker events. Functions due at the
//! same instant share one timer, which sleeps until shortly before it and
//! yields for the last few milliseconds (tokio's timers alone wake 1–2 ms
//! late); each tick's event is built before its instant.
//! The event's `ce-id` is `{namespace}/{function}@{scheduled instant}`, its
//! `ce-time` the scheduled instant, so a repeat after a failover is
//! recognisable.
//!
//! - `concurrency`: `forbid` skips a tick while the previous fire runs,
//!   `allow` runs them side by side, `replace` cancels the running one.
//! - A tick fires when it can fire within 1 s of its time, or within
//!   `starting-deadline` when that is longer; after downtime only the latest
//!   missed tick within the deadline fires, once; the others are counted as
//!   missed, never fired in a burst.
//! - The last fired tick of each function goes to a [`TickStore`] (the
//!   leader's Lease in Kubernetes), so a new leader continues where the old
//!   one stopped.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use ebb_model::{Catalog, Concurrency, FunctionSpec};
use http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::admin::Readiness;
use crate::engine::{Delivery, Engine, NoDeadLetters, Target};
use crate::event::Event;
use crate::schedule::Schedule;
use crate::supervisor::{self, Consumer, ConsumerTask, Settings, Source};

/// A tick that cannot fire within this of its time is missed (unless the
/// function's starting deadline is longer).
pub const ON_TIME: Duration = Duration::from_secs(1);

/// Wall-clock time as the scheduler sees it.
///
/// In production it is the system clock. Tests anchor it to tokio's clock, so
/// that a paused runtime moves wall time too and an hour passes in
/// microseconds.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    Anchored { at: DateTime<Utc>, base: Instant },
}

impl Clock {
    /// A clock reading `at` now and advancing with tokio's clock.
    pub fn anchored(at: DateTime<Utc>) -> Self {
        Clock::Anchored {
            at,
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Anchored { at, base } => {
                *at + chrono::Duration::from_std(base.elapsed()).unwrap_or_default()
            }
        }
    }

    /// Sleeps until `when` on this clock.
    pub async fn sleep_until(&self, when: DateTime<Utc>) {
        loop {
            let now = self.now();
            if now >= when {
                return;
            }
            let d = (when - now).to_std().unwrap_or_default();
            tokio::time::sleep(d).await;
            if matches!(self, Clock::Anchored { .. }) {
                return;
            }
            // The system clock may have stepped while sleeping: check again.
        }
    }
}

/// How much earlier than an instant the scheduler's timer wakes: tokio's
/// timers have millisecond granularity and round up (and the worker's wait
/// is in whole milliseconds too), so a timer set for the instant itself fires
/// up to about 2 ms after it; with 2 ms early the first call of an instant
/// still sometimes went out 2 ms late, with 4 ms it goes out within 0.5 ms.
/// The price is yielding for up to 4 ms before each instant.
const WAKE_EARLY: Duration = Duration::from_millis(4);

impl Clock {
    /// Sleeps until `when`, waking on time rather than up to two timer ticks
    /// late: on the system clock the timer wakes [`WAKE_EARLY`] before, then
    /// the task yields to others until the instant.
    async fn sleep_until_precisely(&self, when: DateTime<Utc>) {
        if matches!(self, Clock::Anchored { .. }) {
            return self.sleep_until(when).await;
        }
        let early = chrono::Duration::from_std(WAKE_EARLY).unwrap_or_default();
        loop {
            self.sleep_until(when - early).await;
            loop {
                let left = when - self.now();
                if left <= chrono::Duration::zero() {
                    return;
                }
                if left > early * 2 {
                    // The system clock stepped back: sleep again.
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

/// One timer per scheduled instant, shared by every function due then: the
/// instant wakes them all at once instead of each on its own timer.
struct Alarms {
    clock: Clock,
    pending: Mutex<HashMap<DateTime<Utc>, CancellationToken>>,
    stop: CancellationToken,
}

impl Alarms {
    /// A token cancelled at `when` (or never, once the scheduler stops).
    fn at(self: &Arc<Self>, when: DateTime<Utc>) -> CancellationToken {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = pending.get(&when) {
            return t.clone();
        }
        let alarm = CancellationToken::new();
        pending.insert(when, alarm.clone());
        drop(pending);
        let this = self.clone();
        let ring = alarm.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = this.clock.sleep_until_precisely(when) => {}
                () = this.stop.cancelled() => return,
            }
            this.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&when);
            ring.cancel();
        });
        alarm
    }
}

/// Where each function's ticks are recorded: the last one whose fire
/// finished, and the earliest one whose fire started and has not finished
/// (fired again by whoever takes over).
pub trait TickStore: Send + Sync {
    /// The last tick of the function `key` (`namespace/name`) whose fire
    /// finished, if recorded.
    fn last(&self, key: &str) -> Option<DateTime<Utc>>;
    /// Records that `key`'s fire of the tick `at` finished: delivered,
    /// exhausted, or skipped or replaced by the overlap policy (may be
    /// written later, batched). Never moves [`TickStore::last`] back.
    fn record(&self, key: &str, at: DateTime<Utc>);
    /// The earliest tick of `key` whose fire started and did not finish.
    fn unfinished(&self, key: &str) -> Option<DateTime<Utc>>;
    /// Sets (`None`: clears) [`TickStore::unfinished`].
    fn set_unfinished(&self, key: &str, at: Option<DateTime<Utc>>);
}

/// Ticks kept on the leader's Lease as annotations
/// `ebb.io/last-fired.{namespace}.{name}` and `ebb.io/firing.{namespace}.{name}`,
/// written with its renewals (at most once a second), read by the next leader.
pub struct LeaseTicks(pub ebb_kube::LeaderHandle);

fn tick_annotation(key: &str) -> String {
    ebb_kube::lease::annotation_key("ebb.io/last-fired", key)
}

fn firing_annotation(key: &str) -> String {
    ebb_kube::lease::annotation_key("ebb.io/firing", key)
}

fn parse_tick(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn tick_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl TickStore for LeaseTicks {
    fn last(&self, key: &str) -> Option<DateTime<Utc>> {
        parse_tick(&self.0.annotations().remove(&tick_annotation(key))?)
    }
    fn record(&self, key: &str, at: DateTime<Utc>) {
        if self.last(key).is_some_and(|last| last >= at) {
            return;
        }
        if let Err(e) = self.0.set_annotation(tick_annotation(key), tick_text(at)) {
            tracing::debug!(function = %key, error = %e, "tick not recorded");
        }
    }
    fn unfinished(&self, key: &str) -> Option<DateTime<Utc>> {
        parse_tick(&self.0.annotations().remove(&firing_annotation(key))?)
    }
    fn set_unfinished(&self, key: &str, at: Option<DateTime<Utc>>) {
        let r = match at {
            Some(at) => self.0.set_annotation(firing_annotation(key), tick_text(at)),
            None => self.0.remove_annotation(firing_annotation(key)),
        };
        if let Err(e) = r {
            tracing::debug!(function = %key, error = %e, "unfinished tick not recorded");
        }
    }
}

/// A store in memory: one process, nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemoryTicks {
    last: Mutex<BTreeMap<String, DateTime<Utc>>>,
    unfinished: Mutex<BTreeMap<String, DateTime<Utc>>>,
}

impl TickStore for MemoryTicks {
    fn last(&self, key: &str) -> Option<DateTime<Utc>> {
        self.last.lock().ok()?.get(key).copied()
    }
    fn record(&self, key: &str, at: DateTime<Utc>) {
        if let Ok(mut m) = self.last.lock() {
            let last = m.entry(key.to_string()).or_insert(at);
            *last = (*last).max(at);
        }
    }
    fn unfinished(&self, key: &str) -> Option<DateTime<Utc>> {
        self.unfinished.lock().ok()?.get(key).copied()
    }
    fn set_unfinished(&self, key: &str, at: Option<DateTime<Utc>>) {
        if let Ok(mut m) = self.unfinished.lock() {
            match at {
                Some(at) => m.insert(key.to_string(), at),
                None => m.remove(key),
            };
        }
    }
}

/// The fires of one function still running, kept in its [`TickStore`] as
/// the earliest unfinished tick.
struct InFlight {
    key: String,
    ticks: Arc<dyn TickStore>,
    running: Mutex<std::collections::BTreeSet<DateTime<Utc>>>,
}

impl InFlight {
    fn started(&self, at: DateTime<Utc>) {
        if let Ok(mut r) = self.running.lock() {
            r.insert(at);
            self.ticks.set_unfinished(&self.key, r.first().copied());
        }
    }

    /// The fire of `at` finished: recorded as done.
    fn finished(&self, at: DateTime<Utc>) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(&at);
            self.ticks.set_unfinished(&self.key, r.first().copied());
        }
        self.ticks.record(&self.key, at);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

/// Ticks per function.
type Ticks = Family<FunctionLabel, Counter>;

ebb_runtime::metrics! {
    /// The cron connector's own metrics.
    #[derive(Clone)]
    pub struct CronMetrics {
        /// Ticks fired.
        fires: Ticks as "ebb_cron_fires",
        /// Ticks that could not fire in time (downtime, failover) and were not fired late.
        missed: Ticks as "ebb_cron_missed",
        /// Ticks skipped because the previous fire still ran (concurrency: forbid).
        skipped: Ticks as "ebb_cron_skipped",
        /// Running fires cancelled by the next tick (concurrency: replace).
        replaced: Ticks as "ebb_cron_replaced",
        /// How late a fire started after its scheduled instant.
        ///
        /// Fire start − scheduled instant.
        firing_error: Histogram as "ebb_cron_firing_error_seconds"
            = Histogram::new(exponential_buckets(0.000_125, 2.0, 16)),
    }
}

/// What to do with the ticks between the last one handled and now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    /// The one tick to fire now, if any.
    pub fire: Option<DateTime<Utc>>,
    /// Ticks counted as missed.
    pub missed: usize,
}

/// Decides which of the ticks due since `last` (exclusive) up to `now`
/// (inclusive) fires: only the latest, and only when it is no later than the
/// allowance (`max(1 s, starting deadline)`); the others are missed.
pub fn catch_up(
    schedule: &Schedule,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    starting_deadline: Duration,
) -> CatchUp {
    let allowance = chrono::Duration::from_std(ON_TIME.max(starting_deadline)).unwrap_or_default();
    // Only a tick within the allowance may fire: look for the latest one
    // there, in windows growing backwards from now so that a long deadline
    // on a per-second schedule stays cheap.
    // A huge starting deadline reaches back past chrono's range: the
    // earliest representable instant then.
    let window_start = last.max(
        now.checked_sub_signed(allowance)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
    );
    let mut fire = None;
    let mut width = chrono::Duration::seconds(2);
    for _ in 0..64 {
        let from = window_start.max(now - width);
        let found = schedule.fires_between(from, now, 4096);
        if found.len() < 4096 && !found.is_empty() {
            fire = found.last().copied();
            break;
        }
        if found.len() >= 4096 {
            // More than fit: narrow down from the end instead.
            width = width / 2;
            continue;
        }
        if from == window_start {
            break;
        }
        width = width * 4;
    }
    // Every other due tick is missed (counted up to a bound after very long
    // outages).
    let due = schedule.fires_between(last, now, 100_000).len();
    CatchUp {
        fire,
        missed: due - usize::from(fire.is_some()).min(due),
    }
}

/// The event of one fire.
pub fn tick_event(spec: &FunctionSpec, at: DateTime<Utc>) -> Event {
    let key = spec.key();
    let when = at.to_rfc3339_opts(SecondsFormat::Millis, true);
    Event {
        id: format!("{key}@{when}"),
        source: format!("/ebb/cron/{key}"),
        kind: "io.ebb.cron.tick".into(),
        topic: format!("cron.{}.{}", spec.namespace, spec.name),
        time: at,
        headers: HeaderMap::new(),
        body: spec.payload.clone().map(Bytes::from).unwrap_or_default(),
        position: format!(
            "schedule {} tick {when}",
            spec.schedule.as_deref().unwrap_or("")
        ),
    }
}

/// What a fire does: deliver the tick's event to the function. The engine in
/// production; tests substitute a recorder to run schedules on a paused clock.
pub trait Fire: Send + Sync + 'static {
    fn fire(&self, target: Arc<Target>, event: Event) -> impl Future<Output = Fired> + Send;
}

/// How a fire ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// Delivered, or given up on (exhausted, not retryable).
    Done,
    /// Given back unfinished (its function's consumer stopped while it was
    /// held or waiting): whoever fires next fires it again.
    Released,
}

/// A fire's delivery: settled when acked or given up on.
struct TickDelivery(Arc<std::sync::atomic::AtomicBool>);

impl Delivery for TickDelivery {
    async fn ack(&mut self) -> Result<(), Error> {
        self.0.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
    async fn release(&mut self) -> Result<(), Error> {
        Ok(())
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        self.ack().await
    }
}

impl Fire for Engine {
    async fn fire(&self, target: Arc<Target>, event: Event) -> Fired {
        // Cron has no broker: a fire that exhausts its attempts is logged
        // with its reason by the engine (there is nowhere to dead-letter it).
        let settled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.deliver(
            &target,
            &event,
            TickDelivery(settled.clone()),
            &NoDeadLetters,
        )
        .await;
        if settled.load(std::sync::atomic::Ordering::Acquire) {
            Fired::Done
        } else {
            Fired::Released
        }
    }
}

/// Shared by every function task.
struct Shared<F> {
    firer: Arc<F>,
    clock: Clock,
    alarms: Arc<Alarms>,
    ticks: Arc<dyn TickStore>,
    metrics: CronMetrics,
}

/// One function's schedule loop: its "consumer". Fires run in the
/// consumer's tracker, so stopping it lets them finish.
async fn run_function<F: Fire>(
    shared: Arc<Shared<F>>,
    c: Consumer,
    schedule: Schedule,
    mut last: Option<DateTime<Utc>>,
    mut unfinished: Option<DateTime<Utc>>,
) {
    let (target, stop) = (c.target.clone(), c.stop.clone());
    let spec = target.spec.clone();
    let label = FunctionLabel {
        function: target.key.clone(),
    };
    let fires = shared.metrics.fires.get_or_create(&label).clone();
    let missed = shared.metrics.missed.get_or_create(&label).clone();
    let skipped = shared.metrics.skipped.get_or_create(&label).clone();
    let replaced = shared.metrics.replaced.get_or_create(&label).clone();
    let mut running: Vec<(CancellationToken, tokio::task::JoinHandle<()>)> = Vec::new();
    let in_flight = Arc::new(InFlight {
        key: target.key.clone(),
        ticks: shared.ticks.clone(),
        running: Mutex::default(),
    });

    loop {
        // A tick whose fire was cut off (a leader stopped during its call)
        // fires again first, with the same `ce-id`, however late.
        if let Some(at) = unfinished.take() {
            tracing::info!(function = %target.key, tick = %at, "firing again a tick whose fire did not finish");
            last = last.max(Some(at));
            let cancel = CancellationToken::new();
            let task = spawn_fire(&c, &shared, &in_flight, &cancel, at, tick_event(&spec, at));
            running.push((cancel, task));
            fires.inc();
            continue;
        }
        let now = shared.clock.now();
        // Ticks due since the last one handled: after a start, a failover or
        // a slow wake-up. (Usually none: the next tick is still ahead.)
        let due = match last {
            Some(l) if schedule.next_after(l).is_some_and(|n| n <= now) => {
                catch_up(&schedule, l, now, spec.starting_deadline)
            }
            _ => CatchUp {
                fire: None,
                missed: 0,
            },
        };
        if due.missed > 0 {
            missed.inc_by(due.missed as u64);
            tracing::warn!(function = %target.key, missed = due.missed, "ticks missed; not fired late");
        }
        let (at, event) = match due.fire {
            Some(at) => (at, tick_event(&spec, at)),
            None => {
                let from = last.map_or(now, |l| l.max(now));
                let Some(next) = schedule.next_after(from) else {
                    tracing::info!(function = %target.key, "schedule has no further ticks");
                    stop.cancelled().await;
                    break;
                };
                // Built while waiting, so the instant only has to send it.
                let event = tick_event(&spec, next);
                let alarm = shared.alarms.at(next);
                tokio::select! {
                    () = alarm.cancelled() => {}
                    () = stop.cancelled() => break,
                }
                let late = shared.clock.now() - next;
                let allowance = chrono::Duration::from_std(ON_TIME.max(spec.starting_deadline))
                    .unwrap_or_default();
                if late > allowance {
                    // Woke too late (suspended, overloaded): count it, move on.
                    missed.inc();
                    tracing::warn!(function = %target.key, tick = %next, late = %late, "tick missed; not fired late");
                    last = Some(next);
                    continue;
                }
                (next, event)
            }
        };
        last = Some(at);

        running.retain(|(_, h)| !h.is_finished());
        match spec.concurrency {
            Concurrency::Forbid if !running.is_empty() => {
                skipped.inc();
                tracing::info!(function = %target.key, tick = %at, "previous fire still running; tick skipped (concurrency: forbid)");
                shared.ticks.record(&target.key, at);
                continue;
            }
            Concurrency::Replace if !running.is_empty() => {
                for (cancel, _) in running.drain(..) {
                    cancel.cancel();
                    replaced.inc();
                }
                tracing::info!(function = %target.key, tick = %at, "cancelled the running fire (concurrency: replace)");
            }
            _ => {}
        }
        let error = (shared.clock.now() - at).to_std().unwrap_or_default();
        let cancel = CancellationToken::new();
        let task = spawn_fire(&c, &shared, &in_flight, &cancel, at, event);
        running.push((cancel, task));
        // The rest waits until the other functions due now have fired too.
        tokio::task::yield_now().await;
        shared.metrics.firing_error.observe(error.as_secs_f64());
        fires.inc();
    }
}

/// Fires the tick `at` in the consumer's tracker: marked unfinished until
/// its delivery finished (or was replaced), then recorded as done. A fire
/// given back unfinished stays marked, for whoever fires next.
fn spawn_fire<F: Fire>(
    c: &Consumer,
    shared: &Arc<Shared<F>>,
    in_flight: &Arc<InFlight>,
    cancel: &CancellationToken,
    at: DateTime<Utc>,
    event: Event,
) -> tokio::task::JoinHandle<()> {
    in_flight.started(at);
    let (shared, target, cancel, in_flight) = (
        shared.clone(),
        c.target.clone(),
        cancel.clone(),
        in_flight.clone(),
    );
    c.tracker.spawn(async move {
        let fired = tokio::select! {
            fired = shared.firer.fire(target, event) => fired,
            // Replaced (concurrency: replace) counts as finished.
            () = cancel.cancelled() => Fired::Done,
        };
        if fired == Fired::Done {
            in_flight.finished(at);
        }
    })
}

/// How long [`run_schedules`] lets running fires finish once stopped when
/// its caller does not bound it sooner.
const FIRES_FINISH: Duration = Duration::from_secs(24 * 3600);

/// Cron as a source: a function's "consumer" is its schedule loop.
struct CronSource<F> {
    shared: Arc<Shared<F>>,
}

impl<F: Fire> Source for CronSource<F> {
    fn name(&self) -> &'static str {
        "cron"
    }

    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>> {
        let expr = spec.schedule.as_ref()?;
        Some(
            Schedule::parse(expr, &spec.timezone)
                .map(|_| ())
                .map_err(|e| format!("bad schedule: {e}")),
        )
    }

    async fn start(&mut self, c: Consumer) -> Result<ConsumerTask, Error> {
        let expr = c.spec.schedule.clone().unwrap_or_default();
        let schedule = Schedule::parse(&expr, &c.spec.timezone)
            .map_err(|e| Error::Config(format!("function {}: {e}", c.key())))?;
        let last = self.shared.ticks.last(c.key());
        let unfinished = self.shared.ticks.unfinished(c.key());
        tracing::info!(function = %c.key(), schedule = %expr, timezone = %c.spec.timezone, last_fired = ?last, ?unfinished, "scheduling");
        let shared = self.shared.clone();
        Ok(Box::pin(async move {
            run_function(shared, c, schedule, last, unfinished).await;
            None
        }))
    }
}

/// Runs the schedules of `catalog` until `stop`: starts, restarts and stops
/// function tasks as the catalog changes. `ticks` supplies the last fired
/// tick of each function (for catch-up) and records new ones. Fires already
/// started finish before it returns (callers bound how long they wait).
pub async fn run_schedules<F: Fire>(
    catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    firer: Arc<F>,
    metrics: CronMetrics,
    clock: Clock,
    ticks: Arc<dyn TickStore>,
    stop: CancellationToken,
) {
    let shared = Arc::new(Shared {
        firer,
        clock,
        alarms: Arc::new(Alarms {
            clock,
            pending: Mutex::default(),
            stop: stop.clone(),
        }),
        ticks,
        metrics,
    });
    // A schedule holds nothing for a removed function.
    let settings = Settings::new(usize::MAX, FIRES_FINISH);
    // The connector's readiness is its caller's (followers are ready too).
    let ready = Arc::new(Readiness::default());
    if let Err(e) = supervisor::run(
        CronSource { shared },
        catalog,
        engine,
        ready,
        settings,
        stop.cancelled(),
    )
    .await
    {
        tracing::error!(error = %e, "the schedules stopped");
    }
}

/// Runs the cron connector: with an `elector`, as one of several replicas
/// ([`run_elected`]); without, as the only instance ([`run_single`]).
pub async fn run(
    catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    metrics: CronMetrics,
    ready: Arc<Readiness>,
    elector: Option<ebb_kube::Elector>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    match elector {
        None => run_single(catalog, engine, metrics, ready, drain_timeout, shutdown).await,
        Some(elector) => {
            run_elected(
                catalog,
                engine,
                metrics,
                ready,
                elector,
                drain_timeout,
                shutdown,
            )
            .await
        }
    }
}

/// Runs the cron connector with one instance (stack file): schedules until
/// `shutdown`, then lets running fires finish within `drain_timeout`.
pub async fn run_single(
    catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    metrics: CronMetrics,
    ready: Arc<crate::admin::Readiness>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let stop = CancellationToken::new();
    let ticks: Arc<dyn TickStore> = Arc::new(MemoryTicks::default());
    let sched = tokio::spawn(run_schedules(
        catalog,
        engine.clone(),
        engine.clone(),
        metrics,
        Clock::System,
        ticks,
        stop.clone(),
    ));
    ready.set(true);
    shutdown.await;
    ready.set(false);
    stop.cancel();
    engine.stopping().cancel();
    if tokio::time::timeout(drain_timeout, sched).await.is_err() {
        tracing::warn!("drain timeout passed with fires still running; they are cut off");
    }
}

/// Runs the cron connector as one of several replicas: only the holder of
/// the Lease fires; the last fired tick of each function rides on the Lease,
/// so a new leader continues where the old one stopped (at-least-once: a
/// tick whose record was lost in a crash fires again, with the same `ce-id`).
#[allow(clippy::too_many_arguments)]
pub async fn run_elected(
    catalog: watch::Receiver<Arc<Catalog>>,
    engine: Arc<Engine>,
    metrics: CronMetrics,
    ready: Arc<crate::admin::Readiness>,
    elector: ebb_kube::Elector,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let handle = elector.handle();
    let mut leader = handle.leader();
    let elector_stop = CancellationToken::new();
    let elector_task = tokio::spawn(elector.run(elector_stop.clone()));
    ready.set(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Follow until elected.
        while !*leader.borrow_and_update() {
            tokio::select! {
                r = leader.changed() => if r.is_err() { break; },
                () = &mut shutdown => {
                    elector_stop.cancel();
                    let _ = elector_task.await;
                    return;
                }
            }
        }
        tracing::info!(identity = %handle.identity(), "elected: firing schedules");
        let stop = CancellationToken::new();
        let ticks: Arc<dyn TickStore> = Arc::new(LeaseTicks(handle.clone()));
        let mut sched = tokio::spawn(run_schedules(
            catalog.clone(),
            engine.clone(),
            engine.clone(),
            metrics.clone(),
            Clock::System,
            ticks,
            stop.clone(),
        ));
        let mut finished = false;
        let stopping = loop {
            tokio::select! {
                r = leader.changed() => {
                    if r.is_err() || !*leader.borrow_and_update() { break false; }
                }
                () = &mut shutdown => break true,
                _ = &mut sched => { finished = true; break false; }
            }
        };
        stop.cancel();
        if stopping {
            ready.set(false);
            engine.stopping().cancel();
            if !finished
                && tokio::time::timeout(drain_timeout, &mut sched)
                    .await
                    .is_err()
            {
                tracing::warn!("drain timeout passed with fires still running; they are cut off");
                sched.abort();
            }
            // Releasing after the last record lets the next leader take over
            // at once, with every tick fired so far.
            elector_stop.cancel();
            let _ = elector_task.await;
            return;
        }
        tracing::warn!("lost the lease: no longer firing");
        // Fires already started may finish; new ones are the new leader's.
        if !finished {
            let _ = tokio::time::timeout(drain_timeout, &mut sched).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::metrics::Metrics;
    use prometheus_client::registry::Registry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Records fires; each "call" takes `hold` of tokio time.
    struct Recorder {
        clock: Clock,
        hold: Duration,
        fires: Mutex<Vec<(DateTime<Utc>, DateTime<Utc>)>>,
        active: AtomicUsize,
        max_active: AtomicUsize,
        finished: AtomicUsize,
    }

    struct Active<'a>(&'a Recorder);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Fire for Recorder {
        async fn fire(&self, _target: Arc<Target>, event: Event) -> Fired {
            self.fires
                .lock()
                .unwrap()
                .push((event.time, self.clock.now()));
            let n = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(n, Ordering::SeqCst);
            let _active = Active(self);
            tokio::time::sleep(self.hold).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Fired::Done
        }
    }

    struct Run {
        recorder: Arc<Recorder>,
        metrics: CronMetrics,
        key: String,
    }

    impl Run {
        fn count(&self, f: &Family<FunctionLabel, Counter>) -> u64 {
            f.get_or_create(&FunctionLabel {
                function: self.key.clone(),
            })
            .get()
        }
    }

    /// Runs `stack` for `secs` seconds of paused time from `start`.
    async fn run(
        stack: &str,
        start: DateTime<Utc>,
        hold: Duration,
        ticks: Arc<dyn TickStore>,
        secs: u64,
    ) -> Run {
        let clock = Clock::anchored(start);
        let mut registry = Registry::default();
        let engine = Arc::new(
            Engine::new(
                EngineConfig::default(),
                None,
                Metrics::register(&mut registry),
                CancellationToken::new(),
            )
            .unwrap(),
        );
        let metrics = CronMetrics::register(&mut registry);
        let recorder = Arc::new(Recorder {
            clock,
            hold,
            fires: Mutex::default(),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
        });
        let catalog = crate::catalog::stack_catalog(stack);
        assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
        let key = catalog.functions[0].key().to_string();
        let (_tx, rx) = watch::channel(Arc::new(catalog));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_schedules(
            rx,
            engine,
            recorder.clone(),
            metrics.clone(),
            clock,
            ticks,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        Run {
            recorder,
            metrics,
            key,
        }
    }

    /// Ten seconds of a function ticking every second from :00.5, each
    /// fire taking `hold`.
    async fn ten_seconds(concurrency: &str, hold: Duration) -> Run {
        let stack = format!(
            "functions:\n  - name: tick\n    url: http://127.0.0.1:9\n    schedule: \"*/1 * * * * *\"\n    concurrency: {concurrency}\n"
        );
        let start = at("2026-11-25T10:00:00.500Z");
        run(&stack, start, hold, Arc::new(MemoryTicks::default()), 10).await
    }

    #[tokio::test(start_paused = true)]
    async fn fires_on_time_every_second() {
        let r = ten_seconds("allow", Duration::from_millis(10)).await;
        let fires = r.recorder.fires.lock().unwrap().clone();
        assert_eq!(fires.len(), 10, "{fires:?}");
        for (i, (scheduled, fired)) in fires.iter().enumerate() {
            assert_eq!(
                *scheduled,
                at("2026-11-25T10:00:01Z") + chrono::Duration::seconds(i as i64)
            );
            let error = *fired - *scheduled;
            assert!(
                error >= chrono::Duration::zero() && error < chrono::Duration::milliseconds(5),
                "{error}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_decides_what_a_tick_does_while_a_fire_runs() {
        let seconds = |s: &[i64]| -> Vec<_> {
            let first = at("2026-11-25T10:00:00Z");
            s.iter()
                .map(|&n| first + chrono::Duration::seconds(n))
                .collect()
        };
        let every = seconds(&(1..=10).collect::<Vec<_>>());
        // Each fire runs 2.5 s: (concurrency, ticks fired, most fires
        // running at once, ticks skipped, fires replaced).
        let rows = [
            // Fires at :01, :04, :07, :10; each blocks two ticks.
            ("forbid", seconds(&[1, 4, 7, 10]), 1, 6, 0),
            ("allow", every.clone(), 3, 0, 0),
            // Every fire but the last is cancelled by the next tick.
            ("replace", every, 1, 0, 9),
        ];
        for (concurrency, fired, max_active, skipped, replaced) in rows {
            let r = ten_seconds(concurrency, Duration::from_millis(2500)).await;
            let fires = r.recorder.fires.lock().unwrap().clone();
            let scheduled: Vec<_> = fires.iter().map(|f| f.0).collect();
            assert_eq!(scheduled, fired, "{concurrency}");
            let got = (
                r.recorder.max_active.load(Ordering::SeqCst),
                r.count(&r.metrics.skipped),
                r.count(&r.metrics.replaced),
            );
            assert_eq!(got, (max_active, skipped, replaced), "{concurrency}");
        }
    }

    fn every_minute(deadline: &str) -> String {
        format!(
            "functions:\n  - name: report\n    url: http://127.0.0.1:9\n    schedule: \"0 * * * * *\"\n    starting-deadline: {deadline}\n"
        )
    }

    /// `report`, every minute with starting deadline `deadline`, last fired
    /// at 10:00:00 and down until 10:10:30, then run for `secs` seconds.
    async fn back_from_an_outage(deadline: &str, secs: u64) -> (Run, Arc<MemoryTicks>) {
        let ticks = Arc::new(MemoryTicks::default());
        ticks.record("default/report", at("2026-11-25T10:00:00Z"));
        let start = at("2026-11-25T10:10:30Z");
        let hold = Duration::from_millis(10);
        let r = run(&every_minute(deadline), start, hold, ticks.clone(), secs).await;
        (r, ticks)
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_outage_only_the_latest_tick_within_the_deadline_fires() {
        let (r, ticks) = back_from_an_outage("5m", 5).await;
        let fires = r.recorder.fires.lock().unwrap().clone();
        assert_eq!(fires.len(), 1, "{fires:?}");
        assert_eq!(fires[0].0, at("2026-11-25T10:10:00Z"));
        assert_eq!(r.count(&r.metrics.missed), 9, "10:01 … 10:09 missed");
        assert_eq!(
            ticks.last("default/report"),
            Some(at("2026-11-25T10:10:00Z"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_missed_ticks_never_fire_late() {
        let (r, _) = back_from_an_outage("0s", 40).await;
        let fires = r.recorder.fires.lock().unwrap().clone();
        // Nothing from the outage; the next regular tick, 10:11, fires.
        assert_eq!(
            fires.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![at("2026-11-25T10:11:00Z")]
        );
        assert_eq!(r.count(&r.metrics.missed), 10);
    }

    #[test]
    fn catch_up_table() {
        let s = Schedule::parse("0 * * * * *", "UTC").unwrap();
        let t = |x: &str| at(x);
        let rows = [
            // last, now, deadline → fire, missed
            ("2026-11-25T10:00:00Z", "2026-11-25T10:00:30Z", 0, None, 0),
            (
                "2026-11-25T10:00:00Z",
                "2026-11-25T10:01:00.5Z",
                0,
                Some("2026-11-25T10:01:00Z"),
                0,
            ),
            ("2026-11-25T10:00:00Z", "2026-11-25T10:01:02Z", 0, None, 1),
            (
                "2026-11-25T10:00:00Z",
                "2026-11-25T10:01:02Z",
                5,
                Some("2026-11-25T10:01:00Z"),
                0,
            ),
            (
                "2026-11-25T10:00:00Z",
                "2026-11-25T10:03:02Z",
                5,
                Some("2026-11-25T10:03:00Z"),
                2,
            ),
            ("2026-11-25T10:00:00Z", "2026-11-25T10:03:59Z", 30, None, 3),
            // A starting deadline beyond the calendar does not panic.
            (
                "2026-11-25T10:00:00Z",
                "2026-11-25T10:03:00.5Z",
                10_000_000_000_000,
                Some("2026-11-25T10:03:00Z"),
                2,
            ),
        ];
        for (last, now, deadline, fire, missed) in rows {
            let got = catch_up(&s, t(last), t(now), Duration::from_secs(deadline));
            assert_eq!(
                got,
                CatchUp {
                    fire: fire.map(t),
                    missed
                },
                "last {last} now {now} deadline {deadline}s"
            );
        }
    }

    #[test]
    fn catch_up_after_a_long_outage_fires_the_latest_tick() {
        // A per-second schedule down for a day: far more ticks than any
        // single listing bound.
        let s = Schedule::parse("*/1 * * * * *", "UTC").unwrap();
        let got = catch_up(
            &s,
            at("2026-11-24T10:00:00Z"),
            at("2026-11-25T10:00:00.5Z"),
            Duration::from_secs(3600),
        );
        assert_eq!(got.fire, Some(at("2026-11-25T10:00:00Z")));
        assert!(
            got.missed >= 86_399 || got.missed == 99_999,
            "{}",
            got.missed
        );
    }

    #[test]
    fn tick_event_identifies_the_tick() {
        let c = crate::catalog::stack_catalog(
            "functions:\n  - name: nightly\n    url: http://x:1\n    schedule: \"@daily\"\n    payload: '{\"run\":1}'\n",
        );
        let e = tick_event(&c.functions[0].spec, at("2026-11-25T00:00:00Z"));
        assert_eq!(e.id, "default/nightly@2026-11-25T00:00:00.000Z");
        assert_eq!(e.kind, "io.ebb.cron.tick");
        assert_eq!(e.source, "/ebb/cron/default/nightly");
        assert_eq!(e.time, at("2026-11-25T00:00:00Z"));
        assert_eq!(&e.body[..], b"{\"run\":1}");
    }
}
