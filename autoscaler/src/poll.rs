//! One poll over every function, the same for `ebb autoscaler` (Kubernetes)
//! and `ebb dev` (local replicas). For each function that has a workload
//! on the [`ScaleTarget`]:
//!
//! 1. read every [`Scaler`] that serves it, in the order given, then its
//!    schedule as an input ([`prewarm`]: work from its cold start before
//!    each tick until the fire is over); in-flight inputs
//!    ([`Role::InFlight`]) last, and only when another input serves it (a
//!    function with none is not autoscaled);
//! 2. the activity rule: work was done since the last poll when a queue's
//!    delivered position moved, or else the finished count of the queue
//!    with the largest backlog ([`policy::finished_of`], [`policy::moved`]);
//! 3. [`policy::decide_with`], with the target's ready count and that
//!    finished count, so the policy can size by measured rates;
//! 4. record the decision (metrics by reason) and apply a new count.
//!
//! Up to `concurrency` functions are read, decided and applied at the same
//! time, so one slow input (bounded by its scaler's timeout) delays only its
//! own function.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ebb_model::FunctionSpec;
use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::time::Instant;

use crate::policy::{self, Decision, Input, Observed, PolicyState, ScaleSpec, Serving};
use crate::prewarm::{self, WallClock};
use crate::scalers::{Role, Scaler};
use crate::target::{Applied, Change, ScaleTarget};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FnLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    function: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScalerLabel {
    function: String,
    scaler: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InputLabel {
    function: String,
    input: &'static str,
}

ebb_runtime::metrics! {
    /// The poll's metrics (`ebb_autoscaler_…`), labelled by function key
    /// (`namespace/name`).
    #[derive(Clone)]
    pub struct Metrics {
        /// Replicas the policy asks for.
        desired: Family<FnLabel, Gauge> as "ebb_autoscaler_desired_replicas",
        /// Replicas the workload has.
        current: Family<FnLabel, Gauge> as "ebb_autoscaler_current_replicas",
        /// Last value read per input.
        value: Family<InputLabel, Gauge<f64, std::sync::atomic::AtomicU64>>
            as "ebb_autoscaler_metric_value",
        /// Policy decisions by reason.
        decisions: Family<ReasonLabel, Counter> as "ebb_autoscaler_decisions",
        /// Inputs that could not be read.
        scaler_errors: Family<ScalerLabel, Counter> as "ebb_autoscaler_scaler_errors",
        /// Scale changes applied (on Kubernetes, scale subresource patches).
        patches: Family<FnLabel, Counter> as "ebb_autoscaler_scale_patches",
        /// Scale changes that failed.
        patch_errors: Family<FnLabel, Counter> as "ebb_autoscaler_scale_patch_errors",
        /// Counts decided from a workload that changed before the scale was written (409), decided again.
        stale: Family<FnLabel, Counter> as "ebb_autoscaler_stale_decisions",
        /// One poll: every function's inputs read, its count decided and applied.
        poll_duration: Histogram as "ebb_autoscaler_poll_duration_seconds"
            = Histogram::new(exponential_buckets(0.001, 2.0, 16)),
    }
}

/// Decisions found stale ([`Applied::Stale`]) that one poll decides again
/// for a function, after reading it afresh; past them it waits for the next
/// poll.
const REDECIDE: u32 = 3;

/// One function's step, as the policy saw and decided it.
#[derive(Debug, Clone)]
pub struct Step {
    pub function: Arc<FunctionSpec>,
    /// Every input read, in order (`None`: unknown).
    pub inputs: Vec<Input>,
    pub current: u32,
    pub decision: Decision,
}

/// What the poll keeps of a function between polls.
#[derive(Default, Clone)]
struct FnState {
    policy: PolicyState,
    /// The last position (or finished count) read, for the activity rule.
    position: Option<u64>,
}

/// What one function's inputs gave.
#[derive(Default)]
struct Read {
    inputs: Vec<Input>,
    /// `(backlog, finished)` of each queue input read.
    queues: Vec<(f64, Option<u64>)>,
    position: Option<u64>,
    cap: Option<u32>,
    /// A queue input blind to calls in flight, when no in-flight input is
    /// read ([`ScaleSpec::in_flight_unseen`]).
    in_flight_unseen: Option<&'static str>,
}

/// The poll loop's body: the scalers, the policy's memory and the metrics.
pub struct Poller<W> {
    scalers: Vec<Box<dyn Scaler<W>>>,
    metrics: Metrics,
    concurrency: usize,
    states: Mutex<HashMap<String, FnState>>,
    /// Wall-clock time, for schedules.
    wall: WallClock,
}

/// `namespace/name`, the key of metrics and of the policy's memory.
fn key(f: &FunctionSpec) -> String {
    f.key().to_string()
}

impl<W: Send + Sync> Poller<W> {
    /// `scalers` in the order their inputs are read (which names the first
    /// unknown input, and breaks ties); up to `concurrency` functions at a
    /// time (at least 1).
    pub fn new(scalers: Vec<Box<dyn Scaler<W>>>, metrics: Metrics, concurrency: usize) -> Self {
        Self {
            scalers,
            metrics,
            concurrency: concurrency.max(1),
            states: Mutex::default(),
            wall: prewarm::system_clock(),
        }
    }

    /// Reads schedules on `clock` instead of the system clock.
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.wall = clock;
        self
    }

    /// One poll over `functions`, scaled through `target`; returns the step
    /// of each function decided. Forgets functions no longer listed.
    pub async fn poll<T>(&self, target: &T, functions: &[Arc<FunctionSpec>]) -> Vec<Step>
    where
        T: ScaleTarget<Workload = W>,
    {
        let started = Instant::now();
        let mut workloads: Vec<Option<W>> = functions.iter().map(|_| None).collect();
        let mut steps = Vec::new();
        let one = |i: usize| async move { (i, self.step(target, &functions[i]).await) };
        let mut done = futures::stream::iter(0..functions.len())
            .map(one)
            .buffer_unordered(self.concurrency);
        while let Some((i, (w, step))) = done.next().await {
            workloads[i] = w;
            steps.extend(step);
        }
        drop(done);
        let live: Vec<(&FunctionSpec, Option<&W>)> = functions
            .iter()
            .zip(&workloads)
            .map(|(f, w)| (&**f, w.as_ref()))
            .collect();
        let keys: HashSet<String> = functions.iter().map(|f| key(f)).collect();
        self.lock().retain(|k, _| keys.contains(k));
        for s in &self.scalers {
            s.retain(&live);
        }
        self.metrics
            .poll_duration
            .observe(started.elapsed().as_secs_f64());
        steps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FnState>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads, decides and applies one function: its workload (if any) and
    /// its step (if it has inputs).
    async fn step<T>(&self, target: &T, f: &Arc<FunctionSpec>) -> (Option<W>, Option<Step>)
    where
        T: ScaleTarget<Workload = W>,
    {
        let Some((w, counts)) = target.workload(f).await else {
            return (None, None);
        };
        let seen = Instant::now();
        let key = key(f);
        let read = self.read(f, &w, &key).await;
        if read.inputs.is_empty() {
            return (Some(w), None); // nothing to scale by (e.g. a cron-only function)
        }
        let finished = policy::finished_of(&read.queues);
        let spec = ScaleSpec {
            in_flight_unseen: read.in_flight_unseen,
            ..ScaleSpec::from_function(f)
        };
        let now = Instant::now();
        let mut observed = Observed {
            inputs: read.inputs,
            current: counts.current,
            cap: read.cap,
            activity: false,
        };
        let label = FnLabel {
            function: key.clone(),
        };
        let (mut w, mut counts) = (w, counts);
        let mut redecided = 0;
        let decision = loop {
            observed.current = counts.current;
            let (decision, before) = {
                let mut states = self.lock();
                let st = states.entry(key.clone()).or_default();
                // Kept to decide again from a fresh read if this decision
                // turns out stale.
                let before = st.clone();
                // Work done since the last poll: a queue's delivered position,
                // or else the finished count, moved.
                observed.activity = policy::moved(&mut st.position, read.position.or(finished));
                let decision = policy::decide_with(
                    &observed,
                    // Ready replicas and finished messages let the policy size
                    // by measured rates instead of chasing a backlog that grows
                    // while replicas start.
                    Serving {
                        ready: counts.ready,
                        delivered: finished,
                    },
                    &spec,
                    &mut st.policy,
                    now,
                );
                (decision, before)
            };
            let Some(to) = decision.replicas else {
                break decision;
            };
            let change = Change {
                from: counts.current,
                to,
                reason: &decision.reason,
                seen,
            };
            match target.apply(f, &w, change).await {
                Ok(Applied::Done) => {
                    self.metrics.patches.get_or_create(&label).inc();
                }
                Ok(Applied::LeftAlone) => {}
                Ok(Applied::Stale) => {
                    // Decided from a count (or version) that changed since:
                    // forget this decision, read again, decide anew.
                    self.metrics.stale.get_or_create(&label).inc();
                    self.lock().insert(key.clone(), before);
                    redecided += 1;
                    let fresh = if redecided <= REDECIDE {
                        target.reread(f, &w).await
                    } else {
                        None
                    };
                    if let Some((fresh_w, fresh_counts)) = fresh {
                        (w, counts) = (fresh_w, fresh_counts);
                        continue;
                    }
                    tracing::warn!(function = %key, "the count kept changing; deciding at the next poll");
                    break policy::Decision {
                        replicas: None,
                        reason: decision.reason,
                    };
                }
                Err(e) => {
                    self.metrics.patch_errors.get_or_create(&label).inc();
                    tracing::warn!(function = %key, error = %e, "cannot scale");
                }
            }
            break decision;
        };
        let current = counts.current;
        self.record(&key, current, &decision);
        let step = Step {
            function: f.clone(),
            inputs: observed.inputs,
            current,
            decision,
        };
        (Some(w), Some(step))
    }

    /// Reads every input of `f`.
    async fn read(&self, f: &FunctionSpec, w: &W, key: &str) -> Read {
        let mut read = Read::default();
        let others = self.scalers.iter().filter(|s| s.role() != Role::InFlight);
        for s in others.filter(|s| s.serves(f)) {
            self.read_one(&mut read, &**s, f, w, key).await;
        }
        if let Some(value) = self.schedule_input(f, key) {
            read.inputs.push(Input {
                name: prewarm::INPUT,
                value: Some(value),
            });
        }
        if !read.inputs.is_empty() {
            let inflight = self.scalers.iter().filter(|s| s.role() == Role::InFlight);
            for s in inflight.filter(|s| s.serves(f)) {
                self.read_one(&mut read, &**s, f, w, key).await;
                read.in_flight_unseen = None; // the in-flight input sees them
            }
        }
        for i in &read.inputs {
            if let Some(v) = i.value {
                self.metrics
                    .value
                    .get_or_create(&InputLabel {
                        function: key.to_owned(),
                        input: i.name,
                    })
                    .set(v);
            }
        }
        read
    }

    /// The schedule input of `f` now, if it has a schedule.
    fn schedule_input(&self, f: &FunctionSpec, key: &str) -> Option<f64> {
        // A bad schedule is reported by discovery, which keeps it out.
        let schedule = ebb_model::schedule::Schedule::parse(f.schedule.as_deref()?, &f.timezone);
        let cold_start = self.lock().get(key).and_then(|s| s.policy.cold_start());
        let in_flight = self
            .scalers
            .iter()
            .any(|s| s.role() == Role::InFlight && s.serves(f));
        let lead = prewarm::lead(f.prewarm, cold_start);
        let after = prewarm::after_tick(f.timeout, in_flight);
        Some(prewarm::demand(&schedule.ok()?, (self.wall)(), lead, after))
    }

    async fn read_one(
        &self,
        read: &mut Read,
        s: &dyn Scaler<W>,
        f: &FunctionSpec,
        w: &W,
        key: &str,
    ) {
        let name = s.name();
        let value = match s.read(f, w).await {
            Ok(r) => {
                if s.role() == Role::Queue {
                    read.queues.push((r.value, r.finished));
                    read.position = read.position.or(r.position);
                    if r.in_flight_unseen {
                        read.in_flight_unseen = read.in_flight_unseen.or(Some(name));
                    }
                }
                if let Some(cap) = r.cap {
                    read.cap = Some(read.cap.map_or(cap, |c| c.min(cap)));
                }
                Some(r.value)
            }
            Err(e) => {
                self.metrics
                    .scaler_errors
                    .get_or_create(&ScalerLabel {
                        function: key.to_owned(),
                        scaler: name,
                        error: e.metric_label(),
                    })
                    .inc();
                tracing::debug!(function = %key, scaler = name, error = %e, "input unknown");
                None
            }
        };
        read.inputs.push(Input { name, value });
    }

    /// The decision's metrics.
    fn record(&self, key: &str, current: u32, decision: &Decision) {
        let label = FnLabel {
            function: key.to_owned(),
        };
        self.metrics
            .current
            .get_or_create(&label)
            .set(i64::from(current));
        self.metrics
            .desired
            .get_or_create(&label)
            .set(i64::from(decision.replicas.unwrap_or(current)));
        self.metrics
            .decisions
            .get_or_create(&ReasonLabel {
                function: key.to_owned(),
                reason: decision.reason.label(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use prometheus_client::registry::Registry;

    use crate::policy::Reason;
    use crate::scalers::{ReadError, ReadFuture, Reading};
    use crate::target::{Applying, ReplicaCounts};

    /// The next reading of a [`Fixed`] input (`Err`: unknown).
    type Next = Arc<Mutex<Result<Reading, &'static str>>>;

    /// An input whose next reading the test sets; it serves functions with
    /// topics (queues) or every function.
    struct Fixed {
        name: &'static str,
        role: Role,
        next: Next,
    }

    /// A [`Fixed`] input and the handle that sets its readings.
    fn fixed(name: &'static str, role: Role) -> (Box<dyn Scaler<()>>, Next) {
        let next = Next::new(Mutex::new(Ok(Reading::default())));
        let scaler = Fixed {
            name,
            role,
            next: next.clone(),
        };
        (Box::new(scaler), next)
    }

    impl Scaler<()> for Fixed {
        fn name(&self) -> &'static str {
            self.name
        }

        fn role(&self) -> Role {
            self.role
        }

        fn serves(&self, f: &FunctionSpec) -> bool {
            self.role == Role::InFlight || !f.topics.is_empty()
        }

        fn read<'a>(&'a self, _: &'a FunctionSpec, _: &'a ()) -> ReadFuture<'a> {
            let next = *self.next.lock().unwrap();
            Box::pin(async move {
                next.map_err(|message| ReadError::Other {
                    label: "test",
                    message: message.into(),
                })
            })
        }
    }

    /// Replicas of the functions it lists; records every change applied.
    /// A count in `lagging` is what a function's workload still reads as
    /// (a stale snapshot): a change decided from it is [`Applied::Stale`].
    #[derive(Default)]
    struct Target {
        counts: Mutex<HashMap<String, u32>>,
        lagging: Mutex<HashMap<String, u32>>,
        applied: Mutex<Vec<(String, u32, u32)>>,
    }

    impl Target {
        fn with(names: &[(&str, u32)]) -> Self {
            let t = Self::default();
            for (name, n) in names {
                t.counts.lock().unwrap().insert((*name).into(), *n);
            }
            t
        }

        fn applied(&self) -> Vec<(String, u32, u32)> {
            std::mem::take(&mut *self.applied.lock().unwrap())
        }
    }

    impl ScaleTarget for Target {
        type Workload = ();
        type Error = std::convert::Infallible;

        async fn workload(&self, f: &Arc<FunctionSpec>) -> Option<((), ReplicaCounts)> {
            let lagging = self.lagging.lock().unwrap().get(&f.name).copied();
            if let Some(current) = lagging {
                let ready = Some(current);
                return Some(((), ReplicaCounts { current, ready }));
            }
            self.reread(f, &()).await
        }

        async fn reread(&self, f: &Arc<FunctionSpec>, _: &()) -> Option<((), ReplicaCounts)> {
            let current = *self.counts.lock().unwrap().get(&f.name)?;
            Some((
                (),
                ReplicaCounts {
                    current,
                    ready: Some(current),
                },
            ))
        }

        async fn apply(&self, f: &Arc<FunctionSpec>, _: &(), change: Change<'_>) -> Applying<Self> {
            if self.counts.lock().unwrap().get(&f.name) != Some(&change.from) {
                return Ok(Applied::Stale);
            }
            self.lagging.lock().unwrap().remove(&f.name);
            self.counts
                .lock()
                .unwrap()
                .insert(f.name.clone(), change.to);
            self.applied
                .lock()
                .unwrap()
                .push((f.name.clone(), change.from, change.to));
            Ok(Applied::Done)
        }
    }

    fn function(name: &str, topics: &[&str]) -> Arc<FunctionSpec> {
        let mut f = FunctionSpec::new(name, "default");
        f.topics = topics.iter().map(|t| (*t).to_owned()).collect();
        f.scale_to_zero_after = Duration::from_secs(10);
        f.scale_down_window = Duration::from_secs(10);
        Arc::new(f)
    }

    fn poller(scalers: Vec<Box<dyn Scaler<()>>>) -> Poller<()> {
        Poller::new(scalers, Metrics::register(&mut Registry::default()), 4)
    }

    fn value(value: f64) -> Result<Reading, &'static str> {
        Ok(Reading::value(value))
    }

    /// Nothing waiting, `n` finished so far.
    fn finished(n: u64) -> Result<Reading, &'static str> {
        Ok(Reading {
            finished: Some(n),
            ..Reading::default()
        })
    }

    /// Polls, then lets a second pass.
    async fn poll_a_second(poller: &Poller<()>, target: &Target, functions: &[Arc<FunctionSpec>]) {
        poller.poll(target, functions).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }

    /// A poll of one queue input, `input`, for `functions` (each a name
    /// with a topic, and its replicas); with the handle that sets the
    /// input's readings.
    fn one_queue(
        input: &'static str,
        functions: &[(&str, u32)],
    ) -> (Poller<()>, Next, Target, Vec<Arc<FunctionSpec>>) {
        let (queue, q) = fixed(input, Role::Queue);
        let target = Target::with(functions);
        let functions = functions.iter().map(|(name, _)| function(name, &["t"]));
        (poller(vec![queue]), q, target, functions.collect())
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_are_read_in_order_and_in_flight_never_scales_alone() {
        let (queue, q) = fixed("queue", Role::Queue);
        let (inflight, i) = fixed("inflight", Role::InFlight);
        // In-flight first in the list is still read last.
        let poller = poller(vec![inflight, queue]);
        *q.lock().unwrap() = value(25.0);
        *i.lock().unwrap() = value(3.0);
        let target = Target::with(&[("orders", 0), ("cron", 0)]);
        let functions = [
            function("orders", &["o"]),
            function("cron", &[]),
            function("external", &["o"]),
        ];
        let steps = poller.poll(&target, &functions).await;
        // Only `orders` has a workload and an input besides in-flight.
        assert_eq!(steps.len(), 1);
        let names: Vec<_> = steps[0].inputs.iter().map(|i| i.name).collect();
        assert_eq!(names, ["queue", "inflight"]);
        assert_eq!(
            steps[0].decision.reason,
            Reason::Wake {
                input: "queue",
                value: 25.0,
                replicas: 3
            }
        );
        assert_eq!(target.applied(), [("orders".to_owned(), 0, 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_input_holds_and_the_partition_cap_applies() {
        let (poller, q, target, functions) = one_queue("kafka", &[("log", 0)]);
        *q.lock().unwrap() = Err("broker down");
        let steps = poller.poll(&target, &functions).await;
        assert_eq!(steps[0].inputs[0].value, None);
        assert_eq!(steps[0].decision.reason, Reason::Unknown { input: "kafka" });
        assert!(target.applied().is_empty());
        // 100 messages, target 10, but two partitions: two replicas.
        *q.lock().unwrap() = Ok(Reading {
            value: 100.0,
            cap: Some(2),
            ..Reading::default()
        });
        poller.poll(&target, &functions).await;
        assert_eq!(target.applied(), [("log".to_owned(), 0, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_count_that_moves_is_activity_and_keeps_replicas() {
        let (poller, q, target, functions) = one_queue("queue", &[("jobs", 1)]);
        // Nothing waits at any poll, but work is finished between polls.
        for n in 0..30 {
            *q.lock().unwrap() = finished(n);
            poll_a_second(&poller, &target, &functions).await;
        }
        assert!(target.applied().is_empty(), "a trickle is not idle");
        // The count stops moving: idle for scale-to-zero-after (10 s), then 0.
        for _ in 0..12 {
            poll_a_second(&poller, &target, &functions).await;
        }
        assert_eq!(target.applied(), [("jobs".to_owned(), 1, 0)]);
    }

    /// RabbitMQ by passive declare reads 0 ready while every message is
    /// in flight: never 1 → 0 on it alone; with the in-flight input read
    /// (here 0) the function goes to zero after scale-to-zero-after (10 s).
    #[tokio::test(start_paused = true)]
    async fn a_queue_blind_to_calls_in_flight_does_not_scale_to_zero_alone() {
        for (with_inflight, want) in [(false, vec![]), (true, vec![("busy".to_owned(), 1, 0)])] {
            let (queue, q) = fixed("rabbitmq", Role::Queue);
            let (inflight, i) = fixed("inflight", Role::InFlight);
            *q.lock().unwrap() = Ok(Reading {
                in_flight_unseen: true,
                ..Reading::default()
            });
            *i.lock().unwrap() = value(0.0);
            let scalers = if with_inflight {
                vec![queue, inflight]
            } else {
                vec![queue]
            };
            let poller = poller(scalers);
            let target = Target::with(&[("busy", 1)]);
            let functions = [function("busy", &["b"])];
            let mut last = None;
            for _ in 0..60 {
                last = poller.poll(&target, &functions).await.pop();
                tokio::time::advance(Duration::from_secs(1)).await;
            }
            assert_eq!(
                target.applied(),
                want,
                "in-flight input read: {with_inflight}"
            );
            let reason = last.expect("a step").decision.reason;
            let want = if with_inflight {
                "idle"
            } else {
                "in_flight_unseen"
            };
            assert_eq!(reason.label(), want);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_finished_count_is_that_of_the_largest_queue() {
        let (small, s) = fixed("small", Role::Queue);
        let (large, l) = fixed("large", Role::Queue);
        let (metric, m) = fixed("metric", Role::Metric);
        let poller = poller(vec![small, large, metric]);
        let target = Target::with(&[("f", 1)]);
        let functions = [function("f", &["t"])];
        *m.lock().unwrap() = value(0.0);
        *l.lock().unwrap() = value(0.0);
        for n in 0..30 {
            // Only the smaller queue's count moves: no evidence of work on
            // the queue the policy sizes by.
            *s.lock().unwrap() = finished(n);
            *l.lock().unwrap() = finished(7);
            poll_a_second(&poller, &target, &functions).await;
        }
        // On a tie the later queue counts: `large` never moved, so idle.
        assert_eq!(target.applied(), [("f".to_owned(), 1, 0)]);
    }

    /// The workload reads 1 replica but has 2: the change decided from 1
    /// (1 → 5, rate-capped) is stale; read again, 2 → 6 is decided and
    /// applied, with the policy's memory as if the stale one never was.
    #[tokio::test(start_paused = true)]
    async fn a_decision_from_a_stale_count_is_decided_again() {
        let (queue, q) = fixed("queue", Role::Queue);
        let poller = poller(vec![queue]);
        *q.lock().unwrap() = value(60.0);
        let target = Target::with(&[("f", 2)]);
        target.lagging.lock().unwrap().insert("f".into(), 1);
        let steps = poller.poll(&target, &[function("f", &["t"])]).await;
        assert_eq!(target.applied(), [("f".to_owned(), 2, 6)]);
        assert_eq!((steps[0].current, steps[0].decision.replicas), (2, Some(6)));
        assert_eq!(
            poller
                .metrics
                .stale
                .get_or_create(&FnLabel {
                    function: "default/f".into()
                })
                .get(),
            1
        );
        // Stale at every read: given up after REDECIDE reads, held.
        let poller = poller_of_one(value(60.0));
        let stuck = StuckTarget(Target::with(&[("g", 2)]));
        let steps = poller.poll(&stuck, &[function("g", &["t"])]).await;
        assert_eq!(steps[0].decision.replicas, None);
        assert!(stuck.0.applied().is_empty());
    }

    fn poller_of_one(reading: Result<Reading, &'static str>) -> Poller<()> {
        let (queue, q) = fixed("queue", Role::Queue);
        *q.lock().unwrap() = reading;
        poller(vec![queue])
    }

    /// A target whose every change is stale.
    struct StuckTarget(Target);

    impl ScaleTarget for StuckTarget {
        type Workload = ();
        type Error = std::convert::Infallible;

        async fn workload(&self, f: &Arc<FunctionSpec>) -> Option<((), ReplicaCounts)> {
            self.0.workload(f).await
        }

        async fn reread(&self, f: &Arc<FunctionSpec>, _: &()) -> Option<((), ReplicaCounts)> {
            self.0.workload(f).await
        }

        async fn apply(&self, _: &Arc<FunctionSpec>, _: &(), _: Change<'_>) -> Applying<Self> {
            Ok(Applied::Stale)
        }
    }

    /// A cron-only function at min 0, `*/20 * * * * *`, its call timeout
    /// 2 s and scale-to-zero-after 5 s, polled every second for four ticks:
    /// one replica before each tick (from the first measured cold start on,
    /// a cold start and a margin ahead), zero between fires. Without
    /// prewarm it is woken at the tick and still goes back to zero. No
    /// in-flight input: a fire counts as running for its timeout.
    #[tokio::test(start_paused = true)]
    async fn a_schedule_is_an_input_that_prewarms_and_lets_go() {
        const TICK: i64 = 1_800_000_000; // a multiple of 20 s
        for prewarm in [true, false] {
            let base = Instant::now();
            let start = chrono::DateTime::from_timestamp(TICK - 30, 0).unwrap();
            let clock: WallClock =
                Arc::new(move || start + chrono::Duration::from_std(base.elapsed()).unwrap());
            let poller = poller(vec![]).wall_clock(clock);
            let mut f = FunctionSpec::new("nightly", "default");
            f.schedule = Some("*/20 * * * * *".into());
            f.timeout = Duration::from_secs(2);
            f.scale_to_zero_after = Duration::from_secs(5);
            f.prewarm = prewarm;
            let functions = [Arc::new(f)];
            let target = Target::with(&[("nightly", 0)]);
            // Replicas after the poll at second t (t = 0 is TICK - 30 s).
            let mut after = Vec::new();
            for _ in 0..100 {
                let steps = poller.poll(&target, &functions).await;
                assert_eq!(steps.len(), 1, "a schedule is an input");
                after.push(steps[0].decision.replicas.unwrap_or(steps[0].current));
                tokio::time::advance(Duration::from_secs(1)).await;
            }
            for tick in [30, 50, 70, 90] {
                let before = after[tick - 1];
                assert_eq!(
                    before,
                    u32::from(prewarm),
                    "prewarm {prewarm}: before the tick at {tick} s: {after:?}"
                );
                assert_eq!(after[tick], 1, "at the tick at {tick} s: {after:?}");
            }
            for gap in [31..50, 51..70, 71..90] {
                assert!(
                    after[gap].contains(&0),
                    "prewarm {prewarm}: zero between fires: {after:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn removed_functions_are_forgotten() {
        let (poller, q, target, functions) = one_queue("queue", &[("a", 0), ("b", 0)]);
        *q.lock().unwrap() = value(0.0);
        poller.poll(&target, &functions).await;
        assert_eq!(poller.lock().len(), 2);
        poller.poll(&target, &functions[..1]).await;
        assert_eq!(
            poller.lock().keys().cloned().collect::<Vec<_>>(),
            ["default/a"]
        );
    }
}
