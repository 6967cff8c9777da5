//! The scaling policy: a pure decision over plain data.
//!
//! Every poll (and every wake-up) the autoscaler reads each input of a
//! function (queue depth, Prometheus values, the workers' in-flight calls)
//! and asks [`decide`] for a replica count:
//!
//! - each input gives `ceil(value / target)`; the recommendation is the
//!   largest, clamped to `[min, max]` and, for Kafka, to the partition count;
//! - up at once, at most to `max(2 × current, current + 4)` per step;
//! - down only to the largest recommendation of the whole stabilization
//!   window, so a dip does not shed replicas that the next burst needs;
//! - to zero only when every input and the in-flight count were zero for
//!   `scale-to-zero-after`; from zero as soon as work exceeds `activation`;
//! - an input that cannot be read holds the current count (missing data never
//!   scales a function to zero), or after [`FALLBACK_AFTER`] unknown polls
//!   uses `fallback-replicas` when set; `paused` freezes the count.
//!
//! When the autoscaler can also tell how many replicas are ready and how many
//! messages were delivered ([`Serving`], optional), the policy measures the
//! arrival rate (backlog change plus deliveries), what one replica serves a
//! second and how long a new replica takes to be ready, and asks for fewer
//! replicas than `ceil(backlog / target)` when fewer suffice: enough to keep
//! up with arrivals and to start the backlog present now within a cold start
//! plus the time a replica takes for [`DRAIN_TARGETS`] × `target` messages,
//! counting replicas still starting from when they will be ready. Backlog
//! that piles up while replicas start is then not answered with yet more
//! replicas, which the stabilization window would keep for a whole window.
//! It never asks for more than the backlog rule does.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive polls with an unknown input before `fallback-replicas` applies.
pub const FALLBACK_AFTER: u32 = 3;

/// With rates measured, the backlog present now should be started within a
/// cold start plus the time one replica takes for this many `target`s of
/// messages (2 s with the defaults, target 10 at 10 messages a second).
pub const DRAIN_TARGETS: f64 = 2.0;

/// With rates measured, capacity kept above the arrival rate.
pub const HEADROOM: f64 = 0.1;

/// The settings of one function that the policy needs (from its `FunctionSpec`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSpec {
    pub min: u32,
    pub max: u32,
    /// Backlog per replica aimed for.
    pub target: f64,
    /// Work above which a function at zero wakes.
    pub activation: f64,
    pub scale_to_zero_after: Duration,
    pub scale_down_window: Duration,
    pub paused: bool,
    pub fallback: Option<u32>,
    /// An input that cannot see messages handed to the replicas and not yet
    /// acknowledged (RabbitMQ read by passive declare), when no in-flight
    /// input is read: its zero is no evidence that no call runs, so the
    /// function is never taken to zero while it has replicas.
    pub in_flight_unseen: Option<&'static str>,
}

impl ScaleSpec {
    pub fn from_function(f: &ebb_model::FunctionSpec) -> Self {
        Self {
            min: f.min_replicas,
            max: f.max_replicas,
            target: f.target,
            activation: f.activation,
            scale_to_zero_after: f.scale_to_zero_after,
            scale_down_window: f.scale_down_window,
            paused: f.paused,
            fallback: f.fallback_replicas,
            in_flight_unseen: None,
        }
    }
}

/// A function's default scaling settings.
impl Default for ScaleSpec {
    fn default() -> Self {
        Self::from_function(&ebb_model::FunctionSpec::new("", ""))
    }
}

/// One scaling input as read this poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// What it is, for the reason (`nats`, `prometheus`, `inflight`, …).
    pub name: &'static str,
    /// `None` when it could not be read (error, timeout, missing series…).
    pub value: Option<f64>,
}

/// What the autoscaler observed for one function.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub inputs: Vec<Input>,
    /// Replicas the workload has now (its scale subresource).
    pub current: u32,
    /// Upper bound from the source (Kafka: partitions of the topics).
    pub cap: Option<u32>,
    /// Work was done since the last poll (events delivered), even if nothing
    /// is pending now: a steady trickle served between polls is not idle.
    pub activity: bool,
}

/// What the autoscaler can tell of the replicas' serving, besides the inputs.
/// Every part is optional: without them the policy sizes by backlog alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Serving {
    /// Replicas ready to serve (a Deployment's `status.readyReplicas`);
    /// `None` counts every current replica as ready.
    pub ready: Option<u32>,
    /// Messages handed to the function so far, a counter that only grows
    /// (e.g. a JetStream consumer's delivered consumer sequence); it must
    /// count what drains the inputs. `None` when unknown.
    pub delivered: Option<u64>,
}

/// The finished count for [`Serving::delivered`], from `(backlog, finished)`
/// of each queue input read, in the order read: that of the input with the
/// largest backlog, the one the policy sizes by, since the count must be
/// what drains that backlog; on a tie the later input's. `None` when that
/// input cannot tell (a passive declare, statistics not reported, a Kafka
/// partition's commit gained or moved back), even if a smaller input could:
/// a count of another queue would not match the backlog measured.
pub fn finished_of(queues: &[(f64, Option<u64>)]) -> Option<u64> {
    queues
        .iter()
        .copied()
        .reduce(|best, next| if next.0 >= best.0 { next } else { best })
        .and_then(|(_, finished)| finished)
}

/// The activity rule ([`Observed::activity`]): work was done since the last
/// poll when `position` (a queue's delivered position, or else the finished
/// count of [`finished_of`]) moved since the last poll that read one, kept
/// in `last`. Unknown (`None`) is no evidence of work and keeps the last
/// position; the first reading only sets it.
pub fn moved(last: &mut Option<u64>, position: Option<u64>) -> bool {
    match position {
        Some(p) => last.replace(p).is_some_and(|before| before != p),
        None => false,
    }
}

/// What the policy remembers of a function between polls.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    /// Recommendations within the stabilization window, oldest first.
    history: VecDeque<Rec>,
    /// Since when every input has been zero.
    idle_since: Option<Instant>,
    unknown_streak: u32,
    /// The count seen at the previous decision.
    last_current: Option<u32>,
    /// A wake went beyond the usual rate cap before any rate was measured:
    /// recommendations are kept for [`PolicyState::revise`] until one is.
    leap: bool,
    rates: Rates,
}

impl PolicyState {
    /// Adds a recommendation and forgets those older than the window,
    /// keeping one from before it: it says what was recommended when the
    /// window began.
    fn remember(&mut self, now: Instant, replicas: u32, blind: Option<f64>, window: Duration) {
        self.history.push_back(Rec {
            at: now,
            replicas,
            blind,
        });
        while self.history.len() >= 2 && now.duration_since(self.history[1].at) >= window {
            self.history.pop_front();
        }
    }

    /// Once the rates are measured, caps each recommendation made without
    /// them since a wake's leap at what they ask for the backlog seen then,
    /// started from zero. The wake is the one step not rate-capped, so a
    /// first burst sized by `backlog / target` before any replica's
    /// throughput was known would otherwise be held at that size for a
    /// whole window after the rates showed it was more than needed; the
    /// window holds what the load needed, by the best estimate there is.
    /// Capped steps are left as they are: the window is there to hold them.
    fn revise(&mut self, now: Instant, target: f64, upper: u32, floor: impl Fn(u32) -> u32) {
        if self.rates.arrivals.is_none() || self.rates.per_replica.is_none() {
            return;
        }
        self.leap = false;
        for i in 0..self.history.len() {
            let Some(backlog) = self.history[i].blind else {
                continue;
            };
            let Some(r) = self.rates.recommend(now, backlog, target, 0, 0, upper) else {
                return;
            };
            let rec = &mut self.history[i];
            rec.replicas = rec.replicas.min(floor(r.replicas));
            rec.blind = None;
        }
    }

    /// Marks the window before a wake as known: the function was at zero
    /// (the history was cleared when it went there), so the wake's
    /// recommendations are the window's, with nothing older to wait for.
    fn woke(&mut self, now: Instant, window: Duration) {
        if let Some(before) = now.checked_sub(window)
            && self.history.front().is_none_or(|r| r.at > before)
        {
            self.history.push_front(Rec {
                at: before,
                replicas: 0,
                blind: None,
            });
        }
    }

    /// Measured arrivals (messages a second), if any.
    pub fn arrivals(&self) -> Option<f64> {
        self.rates.arrivals
    }

    /// Measured messages a second that one ready replica serves, if any.
    pub fn per_replica(&self) -> Option<f64> {
        self.rates.per_replica
    }

    /// Measured time from asking for a replica until it is ready, if any.
    pub fn cold_start(&self) -> Option<Duration> {
        self.rates.cold_start.map(Duration::from_secs_f64)
    }
}

/// One recommendation in the stabilization window.
#[derive(Debug, Clone, Copy)]
struct Rec {
    at: Instant,
    replicas: u32,
    /// The backlog it was sized for, while it was sized without measured
    /// rates (until [`PolicyState::revise`]).
    blind: Option<f64>,
}

/// One poll as the rate estimates remember it.
#[derive(Debug, Clone, Copy)]
struct Poll {
    at: Instant,
    backlog: f64,
    delivered: u64,
    ready: u32,
}

/// Arrival rate, throughput per replica and cold start, measured from
/// successive polls when [`Serving`] is known.
#[derive(Debug, Clone, Default)]
struct Rates {
    last: Option<Poll>,
    /// Arrivals a second over the last interval.
    last_arrivals: Option<f64>,
    /// The smaller of the last two intervals' arrival rates: one jump may
    /// be a batch published at once, two in a row are a rate.
    arrivals: Option<f64>,
    per_replica: Option<f64>,
    /// Seconds.
    cold_start: Option<f64>,
    /// Counts asked for and not yet seen ready, oldest first.
    orders: VecDeque<(Instant, u32)>,
}

impl Rates {
    /// Forgets the last poll (an input was unknown, or the count frozen):
    /// the next interval would not be comparable.
    fn forget(&mut self) {
        self.last = None;
        self.last_arrivals = None;
        self.arrivals = None;
    }

    fn observe(&mut self, now: Instant, backlog: f64, current: u32, serving: Serving) {
        let ready = serving.ready.unwrap_or(current);
        // Cold start: from asking for a count until that many are ready.
        let done = if serving.ready.is_some() {
            let done = self.orders.iter().take_while(|&&(_, n)| ready >= n).count();
            let took = self
                .orders
                .iter()
                .take(done)
                .map(|&(at, _)| now.duration_since(at).as_secs_f64())
                .reduce(f64::min);
            if let Some(took) = took {
                self.cold_start = Some(self.cold_start.map_or(took, |c| (c + took) / 2.0));
            }
            done
        } else {
            self.orders.len()
        };
        match (self.last, serving.delivered) {
            (Some(p), Some(delivered)) if delivered >= p.delivered => {
                let dt = now.duration_since(p.at).as_secs_f64();
                if dt > 0.0 {
                    let served = (delivered - p.delivered) as f64;
                    self.measure(p, dt, backlog, served, ready);
                }
            }
            _ => {
                self.last_arrivals = None;
                self.arrivals = None;
            }
        }
        self.orders.drain(..done);
        self.last = serving.delivered.map(|delivered| Poll {
            at: now,
            backlog,
            delivered,
            ready,
        });
    }

    /// Arrival rate and, if every ready replica had work throughout, what
    /// one serves a second, over the `dt` seconds since poll `p`.
    fn measure(&mut self, p: Poll, dt: f64, backlog: f64, served: f64, ready: u32) {
        let arrived = ((backlog - p.backlog + served) / dt).max(0.0);
        self.arrivals = Some(self.last_arrivals.map_or(arrived, |l| l.min(arrived)));
        self.last_arrivals = Some(arrived);
        if !(p.backlog > f64::from(p.ready) && backlog > f64::from(ready)) {
            return;
        }
        // Replica-seconds of serving: those ready at `p` throughout; those
        // ready since, from when their cold start says (half the interval
        // when it is not known yet); those gone, half the interval.
        let mut serving = f64::from(p.ready.min(ready)) * dt;
        let mut counted = p.ready;
        if let Some(cold) = self.cold_start {
            for &(at, n) in &self.orders {
                let n = n.min(ready);
                if n <= counted {
                    continue;
                }
                // When they became ready, in seconds after `p`.
                let ready_at = signed_secs(p.at, at) + cold;
                serving += f64::from(n - counted) * (dt - ready_at).clamp(0.0, dt);
                counted = n;
            }
        }
        serving += f64::from(ready.saturating_sub(counted)) * dt / 2.0;
        serving += f64::from(p.ready.saturating_sub(ready)) * dt / 2.0;
        // Nothing served by replicas that had work: no measure (and none
        // to divide by).
        if serving <= 0.0 || served <= 0.0 {
            return;
        }
        let rate = served / serving;
        self.per_replica = Some(self.per_replica.map_or(rate, |m| m + 0.3 * (rate - m)));
    }

    /// Records that the count went from `current` to `to` at `now`.
    fn ordered(&mut self, now: Instant, current: u32, to: u32) {
        // A count asked for again (its patch did not land) is one order,
        // not another entry each poll.
        if to > current && self.orders.back().is_none_or(|&(_, n)| n < to) {
            self.orders.push_back((now, to));
        } else if to < current {
            self.orders.retain(|&(_, n)| n <= to);
        }
    }

    /// The fewest replicas that keep up with arrivals and start `backlog`
    /// within the budget, or `None` before the rates are measured.
    fn recommend(
        &self,
        now: Instant,
        backlog: f64,
        target: f64,
        current: u32,
        ready: u32,
        upper: u32,
    ) -> Option<RateRec> {
        let arrivals = self.arrivals?;
        let per_replica = self.per_replica?;
        let cold = self.cold_start.unwrap_or(0.0);
        let budget = cold + DRAIN_TARGETS * target / per_replica;
        let upper_f = f64::from(upper);
        let keep_up = ceil(arrivals * (1.0 + HEADROOM) / per_replica).min(upper_f) as u32;
        // Replicas start serving when ready: those ready now first, then
        // those starting (from when their count was asked for; a cold start
        // from now if it was not asked for here), then new ones a cold start
        // from now. Take the fewest, soonest first, that start the backlog
        // within the budget.
        let ready = ready.min(current);
        let mut groups = vec![(ready, 0.0)];
        let mut counted = ready;
        for &(at, n) in &self.orders {
            let n = n.min(current);
            if n > counted {
                let left = (cold - now.duration_since(at).as_secs_f64()).max(0.0);
                groups.push((n - counted, left));
                counted = n;
            }
        }
        groups.push((current - counted, cold));
        groups.push((upper, cold));
        let mut n = 0u32;
        let mut started = 0.0;
        for (count, offset) in groups {
            let each = per_replica * (budget - offset).max(0.0);
            if started >= backlog || each <= 0.0 {
                continue;
            }
            let wanted = ceil((backlog - started) / each).min(f64::from(count)) as u32;
            started += f64::from(wanted) * each;
            n = n.saturating_add(wanted);
        }
        Some(RateRec {
            replicas: n.max(keep_up).min(upper),
            arrivals,
            per_replica,
        })
    }
}

/// Rounds up, forgiving floating-point error (200 × 1.1 is 220.00000000000003).
fn ceil(x: f64) -> f64 {
    (x - 1e-9).ceil()
}

/// `to - from` in seconds, negative when `to` is earlier.
fn signed_secs(from: Instant, to: Instant) -> f64 {
    if to >= from {
        to.duration_since(from).as_secs_f64()
    } else {
        -from.duration_since(to).as_secs_f64()
    }
}

/// What the rates ask for.
#[derive(Debug, Clone, Copy)]
struct RateRec {
    replicas: u32,
    arrivals: f64,
    per_replica: f64,
}

/// Why the policy decided what it did: logged, and a metric label.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Scale to `replicas` for this much work on `input`.
    Work {
        input: &'static str,
        value: f64,
        target: f64,
        replicas: u32,
        capped: bool,
    },
    /// Scale to `replicas` for the measured rates, fewer than the backlog
    /// alone would ask for.
    Rate {
        input: &'static str,
        value: f64,
        /// Messages arriving a second.
        arrivals: f64,
        /// Messages a second one replica serves.
        per_replica: f64,
        replicas: u32,
        capped: bool,
    },
    /// Work arrived at zero.
    Wake {
        input: &'static str,
        value: f64,
        replicas: u32,
    },
    /// At zero with `min-replicas` above zero and no work: up to the minimum.
    Minimum {
        replicas: u32,
    },
    /// Idle at zero, or work at most `activation`.
    Idle,
    /// Idle for `scale-to-zero-after`.
    IdleToZero {
        after: Duration,
    },
    /// Lower recommendations not yet lasting the whole window.
    Stabilizing {
        window_max: u32,
    },
    /// Steady: the recommendation equals the current count.
    Steady,
    /// Every input reads zero, but `input` cannot see calls in flight and
    /// no in-flight input is read: not idle, the replicas are kept.
    InFlightUnseen {
        input: &'static str,
    },
    /// More backlog, but replicas asked for still start and what one serves
    /// is not measured yet: wait for them before asking for more.
    Starting {
        ready: u32,
        replicas: u32,
    },
    Paused,
    Unknown {
        input: &'static str,
    },
    Fallback {
        input: &'static str,
        replicas: u32,
    },
}

impl Reason {
    /// A bounded label for `ebb_autoscaler_decisions_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Work { capped: false, .. } => "work",
            Reason::Work { capped: true, .. } => "work_rate_capped",
            Reason::Rate { capped: false, .. } => "rate",
            Reason::Rate { capped: true, .. } => "rate_capped",
            Reason::Wake { .. } => "wake",
            Reason::Minimum { .. } => "min_replicas",
            Reason::Idle => "idle",
            Reason::IdleToZero { .. } => "idle_to_zero",
            Reason::Stabilizing { .. } => "stabilizing",
            Reason::Steady => "steady",
            Reason::InFlightUnseen { .. } => "in_flight_unseen",
            Reason::Starting { .. } => "starting",
            Reason::Paused => "paused",
            Reason::Unknown { .. } => "unknown",
            Reason::Fallback { .. } => "fallback",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Work {
                input,
                value,
                target,
                replicas,
                ..
            } => write!(f, "{input} {value}/{target} → {replicas}"),
            Reason::Rate {
                input,
                value,
                arrivals,
                per_replica,
                replicas,
                ..
            } => write!(
                f,
                "{input} {value}, arriving {arrivals:.1}/s, {per_replica:.1}/s a replica → {replicas}"
            ),
            Reason::Wake {
                input,
                value,
                replicas,
            } => write!(f, "work at zero ({input} {value}) → {replicas}"),
            Reason::Minimum { replicas } => write!(f, "min-replicas → {replicas}"),
            Reason::Idle => write!(f, "idle"),
            Reason::IdleToZero { after } => {
                write!(f, "idle {} → 0", humantime::format_duration(*after))
            }
            Reason::Stabilizing { window_max } => {
                write!(f, "stabilizing (window max {window_max}) → hold")
            }
            Reason::Steady => write!(f, "steady"),
            Reason::InFlightUnseen { input } => write!(
                f,
                "{input} 0 but blind to calls in flight, no in-flight input → hold"
            ),
            Reason::Starting { ready, replicas } => {
                write!(f, "{ready} of {replicas} ready, throughput unknown → hold")
            }
            Reason::Paused => write!(f, "paused → hold"),
            Reason::Unknown { input } => write!(f, "{input} unknown → hold"),
            Reason::Fallback { input, replicas } => {
                write!(f, "{input} unknown {FALLBACK_AFTER}× → fallback {replicas}")
            }
        }?;
        if let Reason::Work { capped: true, .. } | Reason::Rate { capped: true, .. } = self {
            write!(f, " (rate-capped)")?;
        }
        Ok(())
    }
}

/// The policy's answer: a new count (`None` = keep the current one) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: Option<u32>,
    pub reason: Reason,
}

fn hold(reason: Reason) -> Decision {
    Decision {
        replicas: None,
        reason,
    }
}

fn set(current: u32, replicas: u32, reason: Reason) -> Decision {
    Decision {
        replicas: (replicas != current).then_some(replicas),
        reason,
    }
}

/// Decides the replica count of one function at `now` from its inputs
/// alone; [`decide_with`] when more of the replicas' serving is known.
pub fn decide(obs: &Observed, spec: &ScaleSpec, st: &mut PolicyState, now: Instant) -> Decision {
    decide_with(obs, Serving::default(), spec, st, now)
}

/// Decides the replica count of one function at `now`.
pub fn decide_with(
    obs: &Observed,
    serving: Serving,
    spec: &ScaleSpec,
    st: &mut PolicyState,
    now: Instant,
) -> Decision {
    let d = st.choose(obs, serving, spec, now);
    st.rates
        .ordered(now, obs.current, d.replicas.unwrap_or(obs.current));
    d
}

impl PolicyState {
    /// The decision at `now`; [`decide_with`] records the order it makes.
    fn choose(
        &mut self,
        obs: &Observed,
        serving: Serving,
        spec: &ScaleSpec,
        now: Instant,
    ) -> Decision {
        let current = obs.current;
        let upper = obs.cap.map_or(spec.max, |c| spec.max.min(c.max(1)));
        let clamp = |n: u32| n.max(spec.min).min(upper.max(spec.min));
        // Woken since the last decision (a connector's wake-up scales 0 → 1
        // knowing of one message): this decision finishes the wake, which is
        // not rate-capped either.
        let woken = self.last_current == Some(0) && current > 0;
        self.last_current = Some(current);

        if spec.paused {
            self.rates.forget();
            return hold(Reason::Paused);
        }

        // Missing data never scales down: hold, or fall back after a while.
        if let Some(unknown) = obs.inputs.iter().find(|i| i.value.is_none()) {
            self.unknown_streak = self.unknown_streak.saturating_add(1);
            self.idle_since = None;
            self.rates.forget();
            if let Some(fb) = spec.fallback
                && self.unknown_streak >= FALLBACK_AFTER
            {
                let replicas = clamp(fb);
                return set(
                    current,
                    replicas,
                    Reason::Fallback {
                        input: unknown.name,
                        replicas,
                    },
                );
            }
            return hold(Reason::Unknown {
                input: unknown.name,
            });
        }
        self.unknown_streak = 0;

        // Each input asks for ceil(value / target); the largest wins.
        let target = if spec.target > 0.0 { spec.target } else { 1.0 };
        let mut busiest: Option<(&'static str, f64, u32)> = None;
        for i in &obs.inputs {
            let v = i.value.unwrap_or(0.0).max(0.0);
            let want = (v / target).ceil().min(u32::MAX as f64) as u32;
            if busiest.is_none_or(|(_, bv, bw)| want > bw || (want == bw && v > bv)) {
                busiest = Some((i.name, v, want));
            }
        }
        let (input, value, want) = busiest.unwrap_or(("none", 0.0, 0));
        self.rates.observe(now, value, current, serving);
        let measured = self.rates.arrivals.is_some() && self.rates.per_replica.is_some();
        // The usual cap on a step up from `n`.
        let step_cap = |n: u32| n.saturating_mul(2).max(n.saturating_add(4));
        let zero = obs.inputs.iter().all(|i| i.value == Some(0.0));
        // A zero that cannot see calls in flight is no evidence of idleness.
        let idle = !obs.activity && zero && spec.in_flight_unseen.is_none();
        if idle {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }

        // At zero: wake at the first sign of work above the activation level.
        if current == 0 {
            let max_value = obs
                .inputs
                .iter()
                .map(|i| i.value.unwrap_or(0.0))
                .fold(0.0, f64::max);
            let work = max_value > spec.activation.max(0.0);
            if work || spec.min > 0 {
                let replicas = clamp(want.max(1));
                self.leap = !measured && replicas > step_cap(0);
                let blind = self.leap.then_some(value);
                self.remember(now, replicas, blind, spec.scale_down_window);
                let reason = if work {
                    Reason::Wake {
                        input,
                        value,
                        replicas,
                    }
                } else {
                    Reason::Minimum { replicas }
                };
                return set(current, replicas, reason);
            }
            return hold(Reason::Idle);
        }

        // While replicas run, the recommendation never drops below one: only
        // the idle timer takes a function to zero.
        let floor = |n: u32| clamp(n).max(1.min(upper));
        if woken {
            self.woke(now, spec.scale_down_window);
        }
        self.revise(now, target, upper, floor);
        let by_backlog = floor(want);
        let ready = serving.ready.unwrap_or(current);
        let by_rate = self
            .rates
            .recommend(now, value, target, current, ready, upper)
            .filter(|r| floor(r.replicas) < by_backlog);
        // Before a replica's throughput is measured (which takes deliveries),
        // backlog that piles up while the replicas asked for still start says
        // nothing about how many it needs: wait for them (one cold start)
        // before asking for more. Without deliveries it would never be
        // measured, so there every step goes by the backlog.
        let blind_starting = !woken
            && serving.delivered.is_some()
            && serving.ready.is_some_and(|r| r < current)
            && self.rates.per_replica.is_none()
            && by_backlog > current;
        if blind_starting {
            let blind = self.leap.then_some(value);
            self.remember(now, current, blind, spec.scale_down_window);
            return hold(Reason::Starting {
                ready: serving.ready.unwrap_or(current),
                replicas: current,
            });
        }
        let rec = by_rate.map_or(by_backlog, |r| floor(r.replicas));
        let reason = |replicas: u32, capped: bool| match by_rate {
            Some(r) => Reason::Rate {
                input,
                value,
                arrivals: r.arrivals,
                per_replica: r.per_replica,
                replicas,
                capped,
            },
            None => Reason::Work {
                input,
                value,
                target,
                replicas,
                capped,
            },
        };
        if woken && !measured && rec > step_cap(current) {
            self.leap = true;
        }
        let blind = self.leap.then_some(value);
        self.remember(now, rec, blind, spec.scale_down_window);

        if spec.min == 0
            && let Some(since) = self.idle_since
            && now.duration_since(since) >= spec.scale_to_zero_after
        {
            self.history.clear();
            self.leap = false;
            return set(
                current,
                0,
                Reason::IdleToZero {
                    after: spec.scale_to_zero_after,
                },
            );
        }

        if rec > current {
            let cap = if woken { u32::MAX } else { step_cap(current) };
            let replicas = rec.min(cap);
            return set(current, replicas, reason(replicas, replicas < rec));
        }
        if rec < current {
            let window_max = self.history.iter().map(|r| r.replicas).max().unwrap_or(rec);
            let window_full = self
                .history
                .front()
                .is_some_and(|r| now.duration_since(r.at) >= spec.scale_down_window);
            if window_max < current && window_full {
                return set(current, window_max, reason(window_max, false));
            }
            return hold(Reason::Stabilizing { window_max });
        }
        // Out-of-bounds counts (a user edited the Deployment) come back in range.
        let bounded = clamp(current);
        if bounded != current {
            return set(current, bounded, reason(bounded, false));
        }
        match spec.in_flight_unseen {
            Some(input) if zero && spec.min == 0 => hold(Reason::InFlightUnseen { input }),
            _ => hold(Reason::Steady),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_a_position_that_moved_and_unknown_is_no_evidence() {
        let mut last = None;
        // The first reading only sets the position.
        assert!(!moved(&mut last, Some(5)));
        assert!(!moved(&mut last, Some(5)));
        assert!(moved(&mut last, Some(8)));
        // Unknown keeps the last position: the next reading compares with 8.
        assert!(!moved(&mut last, None));
        assert!(moved(&mut last, Some(9)));
        let mut other = None;
        assert!(!moved(&mut other, None));
        assert_eq!(other, None);
    }

    #[test]
    fn the_finished_count_is_the_largest_inputs() {
        assert_eq!(finished_of(&[]), None);
        assert_eq!(finished_of(&[(5.0, Some(7))]), Some(7));
        // RabbitMQ 50, Kafka 20: RabbitMQ's count.
        assert_eq!(finished_of(&[(50.0, Some(3)), (20.0, Some(9))]), Some(3));
        assert_eq!(finished_of(&[(5.0, Some(3)), (20.0, Some(9))]), Some(9));
        // The largest cannot tell: unknown, not a smaller input's count.
        assert_eq!(finished_of(&[(50.0, None), (20.0, Some(9))]), None);
        // A tie: the later input (JetStream over Kafka over RabbitMQ).
        assert_eq!(
            finished_of(&[(0.0, Some(1)), (0.0, Some(2)), (0.0, Some(3))]),
            Some(3)
        );
    }

    fn spec() -> ScaleSpec {
        ScaleSpec {
            max: 8,
            target: 20.0,
            ..ScaleSpec::default()
        }
    }

    fn obs(backlog: Option<f64>, inflight: Option<f64>, current: u32) -> Observed {
        Observed {
            inputs: vec![
                Input {
                    name: "nats",
                    value: backlog,
                },
                Input {
                    name: "inflight",
                    value: inflight,
                },
            ],
            current,
            cap: None,
            activity: false,
        }
    }

    /// One input, "nats", with `backlog` waiting.
    fn queue(backlog: f64, current: u32, activity: bool) -> Observed {
        Observed {
            inputs: vec![Input {
                name: "nats",
                value: Some(backlog),
            }],
            current,
            cap: None,
            activity,
        }
    }

    /// Walks `rows` from `start` replicas: `step` makes of a row and the
    /// current count `(t seconds, observed, serving, replicas after, reason
    /// label)`, and each decision is applied to the count. Returns the
    /// state, for a look at the estimates.
    fn walk_steps<R: Copy + fmt::Debug>(
        spec: &ScaleSpec,
        start: u32,
        rows: &[R],
        step: impl Fn(R, u32) -> (u64, Observed, Serving, u32, &'static str),
    ) -> PolicyState {
        let base = Instant::now();
        let mut st = PolicyState::default();
        let mut current = start;
        for &row in rows {
            let (t, o, serving, want, label) = step(row, current);
            let d = decide_with(&o, serving, spec, &mut st, base + Duration::from_secs(t));
            current = d.replicas.unwrap_or(current);
            assert_eq!(
                (current, d.reason.label()),
                (want, label),
                "{row:?}: {}",
                d.reason
            );
        }
        st
    }

    /// `(t seconds, backlog, inflight, replicas after, reason label)`.
    type Row = (u64, Option<f64>, Option<f64>, u32, &'static str);

    /// Walks rows through [`decide`], which knows nothing of the serving.
    fn walk(spec: &ScaleSpec, start: u32, rows: &[Row]) {
        walk_steps(
            spec,
            start,
            rows,
            |(t, backlog, inflight, want, label), current| {
                let o = obs(backlog, inflight, current);
                (t, o, Serving::default(), want, label)
            },
        );
    }

    #[test]
    fn backlog_scales_up_then_stabilizes_down_then_idles_to_zero() {
        walk(
            &spec(),
            0,
            &[
                // 200 / 20 = 10, clamped to max 8, straight from zero.
                (0, Some(200.0), Some(0.0), 8, "wake"),
                (1, Some(200.0), Some(8.0), 8, "steady"),
                // Drained: stays up for the window.
                (2, Some(0.0), Some(0.0), 8, "stabilizing"),
                (30, Some(0.0), Some(0.0), 8, "stabilizing"),
                (61, Some(0.0), Some(0.0), 8, "stabilizing"),
                // The window's maximum is 1 once the last busy poll (t=1)
                // left it; idle only since t=2, so not yet to zero.
                (62, Some(0.0), Some(0.0), 0, "idle_to_zero"),
                (63, Some(0.0), Some(0.0), 0, "idle"),
            ],
        );
    }

    /// A function at full capacity read by passive declare: its replicas
    /// take every message at once, so the queue reads 0 ready for ten idle
    /// periods. Blind to calls in flight, it is never taken to zero (only
    /// down to one after the window); an input that sees them is.
    #[test]
    fn a_zero_blind_to_calls_in_flight_never_scales_to_zero() {
        let run = |unseen: Option<&'static str>| {
            let s = ScaleSpec {
                in_flight_unseen: unseen,
                ..spec()
            };
            let (base, mut st, mut current) = (Instant::now(), PolicyState::default(), 2);
            let mut seen = Vec::new();
            for t in 0..600 {
                let o = Observed {
                    inputs: vec![Input {
                        name: "rabbitmq",
                        value: Some(0.0),
                    }],
                    ..obs(None, None, current)
                };
                let d = decide(&o, &s, &mut st, base + Duration::from_secs(t));
                current = d.replicas.unwrap_or(current);
                seen.push((current, d.reason.label()));
            }
            seen
        };
        let blind = run(Some("rabbitmq"));
        assert!(blind.iter().all(|&(n, _)| n >= 1), "never 0");
        assert_eq!(blind[599], (1, "in_flight_unseen"));
        let seeing = run(None);
        assert_eq!(seeing[599], (0, "idle"));
        let mut st = PolicyState::default();
        let d = decide(
            &obs(Some(0.0), Some(0.0), 1),
            &ScaleSpec {
                in_flight_unseen: Some("rabbitmq"),
                ..spec()
            },
            &mut st,
            Instant::now(),
        );
        assert_eq!(
            d.reason.to_string(),
            "rabbitmq 0 but blind to calls in flight, no in-flight input → hold"
        );
    }

    #[test]
    fn a_scale_that_never_lands_does_not_grow_the_state() {
        // Backlog asks for 8 every second for an hour; the patch keeps
        // failing, so the count stays 1 and no replica gets ready.
        let s = spec();
        let mut st = PolicyState::default();
        let t0 = Instant::now();
        for i in 0..3600 {
            let serving = Serving {
                ready: Some(1),
                delivered: Some(i),
            };
            decide_with(
                &obs(Some(200.0), Some(0.0), 1),
                serving,
                &s,
                &mut st,
                t0 + Duration::from_secs(i),
            );
        }
        assert!(st.history.len() <= 62, "history {}", st.history.len());
        assert!(
            st.rates.orders.len() <= 1,
            "orders {}",
            st.rates.orders.len()
        );
    }

    #[test]
    fn a_minimum_above_zero_starts_replicas_without_work_and_says_so() {
        let s = ScaleSpec { min: 2, ..spec() };
        walk(
            &s,
            0,
            &[
                (0, Some(0.0), Some(0.0), 2, "min_replicas"),
                (1, Some(0.0), Some(0.0), 2, "steady"),
            ],
        );
        let mut st = PolicyState::default();
        let d = decide(&obs(Some(0.0), Some(0.0), 0), &s, &mut st, Instant::now());
        assert_eq!(d.reason.to_string(), "min-replicas → 2");
    }

    #[test]
    fn steps_down_to_the_window_maximum_not_below() {
        let s = ScaleSpec { max: 20, ..spec() };
        walk(
            &s,
            10,
            &[
                (0, Some(200.0), Some(0.0), 10, "steady"),
                (10, Some(100.0), Some(0.0), 10, "stabilizing"),
                (40, Some(60.0), Some(0.0), 10, "stabilizing"),
                // 200/20 = 10 was recommended until t=10: the window
                // still covers it at t=61.
                (61, Some(60.0), Some(0.0), 10, "stabilizing"),
                // From t=70 the window starts with 100/20 = 5.
                (71, Some(60.0), Some(0.0), 5, "work"),
                (90, Some(60.0), Some(0.0), 5, "stabilizing"),
                // From t=100 only 60/20 = 3 remains.
                (101, Some(60.0), Some(0.0), 3, "work"),
            ],
        );
    }

    #[test]
    fn a_dip_inside_the_window_sheds_no_replicas() {
        walk(
            &spec(),
            4,
            &[
                (0, Some(80.0), Some(0.0), 4, "steady"),
                (5, Some(20.0), Some(0.0), 4, "stabilizing"),
                (35, Some(20.0), Some(0.0), 4, "stabilizing"),
                (40, Some(80.0), Some(0.0), 4, "steady"),
            ],
        );
    }

    #[test]
    fn scale_up_is_rate_capped() {
        let s = ScaleSpec { max: 100, ..spec() };
        walk(
            &s,
            1,
            &[
                // 340/20 = 17, but at most max(2×1, 1+4) = 5 per step.
                (0, Some(340.0), Some(0.0), 5, "work_rate_capped"),
                (1, Some(340.0), Some(0.0), 10, "work_rate_capped"),
                (2, Some(340.0), Some(0.0), 17, "work"),
            ],
        );
    }

    #[test]
    fn unknown_input_holds_and_never_reaches_zero() {
        walk(
            &spec(),
            3,
            &[
                (0, Some(0.0), Some(0.0), 3, "stabilizing"),
                (30, None, Some(0.0), 3, "unknown"),
                (61, None, Some(0.0), 3, "unknown"),
                (200, None, None, 3, "unknown"),
                // Known again: the idle timer starts over.
                (201, Some(0.0), Some(0.0), 1, "work"),
                (230, Some(0.0), Some(0.0), 1, "steady"),
                (261, Some(0.0), Some(0.0), 0, "idle_to_zero"),
            ],
        );
    }

    #[test]
    fn fallback_after_consecutive_unknowns() {
        let s = ScaleSpec {
            fallback: Some(2),
            ..spec()
        };
        walk(
            &s,
            6,
            &[
                (0, None, Some(0.0), 6, "unknown"),
                (1, None, Some(0.0), 6, "unknown"),
                (2, None, Some(0.0), 2, "fallback"),
                (3, None, Some(0.0), 2, "fallback"),
            ],
        );
    }

    #[test]
    fn paused_freezes_the_count() {
        let s = ScaleSpec {
            paused: true,
            ..spec()
        };
        walk(
            &s,
            3,
            &[
                (0, Some(1000.0), Some(0.0), 3, "paused"),
                (500, Some(0.0), Some(0.0), 3, "paused"),
            ],
        );
        walk(&s, 0, &[(0, Some(1000.0), Some(0.0), 0, "paused")]);
    }

    #[test]
    fn activation_threshold_at_zero() {
        let s = ScaleSpec {
            activation: 10.0,
            ..spec()
        };
        walk(
            &s,
            0,
            &[
                (0, Some(5.0), Some(0.0), 0, "idle"),
                (1, Some(10.0), Some(0.0), 0, "idle"),
                (2, Some(11.0), Some(0.0), 1, "wake"),
            ],
        );
    }

    #[test]
    fn min_and_partition_caps() {
        let base = Instant::now();
        let s = ScaleSpec {
            max: 100,
            target: 10.0,
            ..spec()
        };
        let mut st = PolicyState::default();
        let mut o = obs(Some(1000.0), Some(0.0), 4);
        o.cap = Some(6);
        let d = decide(&o, &s, &mut st, base);
        assert_eq!(d.replicas, Some(6), "{}", d.reason);

        let s = ScaleSpec { min: 2, ..spec() };
        let mut st = PolicyState::default();
        let d = decide(&obs(Some(0.0), Some(0.0), 0), &s, &mut st, base);
        assert_eq!(d.replicas, Some(2), "min above zero wakes: {}", d.reason);
        // With min 2, idling never goes below 2.
        let mut st = PolicyState::default();
        for t in [0, 100, 200] {
            let d = decide(
                &obs(Some(0.0), Some(0.0), 2),
                &s,
                &mut st,
                base + Duration::from_secs(t),
            );
            assert_eq!(d.replicas, None, "{}", d.reason);
        }
    }

    #[test]
    fn a_trickle_served_between_polls_keeps_a_replica() {
        let base = Instant::now();
        let s = spec();
        let mut st = PolicyState::default();
        // Nothing pending at any poll, but a message was served every 15 s.
        for t in 0..300u64 {
            let mut o = obs(Some(0.0), Some(0.0), 1);
            o.activity = t % 15 == 0;
            let d = decide(&o, &s, &mut st, base + Duration::from_secs(t));
            assert_eq!(d.replicas, None, "t={t}: {}", d.reason);
        }
        // Once the trickle stops, the idle timer runs out.
        let d = decide(
            &obs(Some(0.0), Some(0.0), 1),
            &s,
            &mut st,
            base + Duration::from_secs(400),
        );
        assert_eq!(d.replicas, Some(0), "{}", d.reason);
    }

    /// `(t seconds, backlog, delivered so far, ready) -> (replicas after, reason label)`.
    type RateRow = (u64, f64, u64, u32, u32, &'static str);

    /// Walks rows with [`Serving`] known; returns the state for a look at
    /// the estimates.
    fn walk_rates(spec: &ScaleSpec, start: u32, rows: &[RateRow]) -> PolicyState {
        walk_steps(spec, start, rows, |row, current| {
            let (t, backlog, delivered, ready, want, label) = row;
            let serving = Serving {
                ready: Some(ready),
                delivered: Some(delivered),
            };
            (t, queue(backlog, current, false), serving, want, label)
        })
    }

    fn rate_spec() -> ScaleSpec {
        ScaleSpec {
            max: 50,
            target: 10.0,
            ..spec()
        }
    }

    #[test]
    fn measured_rates_ask_for_fewer_replicas_than_the_backlog() {
        // 60 messages a second arrive; a replica serves 10 a second; new
        // replicas are ready 2 s after they are asked for.
        let st = walk_rates(
            &rate_spec(),
            2,
            &[
                // Nothing measured yet: ceil(40 / 10) = 4.
                (0, 40.0, 0, 2, 4, "work"),
                // 20 served, backlog +40: 60/s arrive, 10/s a replica.
                // Keeping up takes ceil(60 × 1.1 / 10) = 7; the backlog
                // rule would ask for 8.
                (1, 80.0, 20, 2, 7, "rate"),
                // The two asked for at t=0 are ready (cold start 2 s). The
                // backlog rule would ask for 12, then 14, and the window
                // would keep that for a minute; 7 keep up.
                (2, 120.0, 40, 4, 7, "steady"),
                (3, 140.0, 80, 7, 7, "steady"),
                (4, 130.0, 150, 7, 7, "steady"),
                // Arrivals stop: fewer would do, but only after the window.
                (5, 60.0, 220, 7, 7, "stabilizing"),
                (40, 0.0, 280, 7, 7, "stabilizing"),
                // The window since t=5 holds 2 (60 left for 7 replicas).
                (66, 0.0, 280, 7, 2, "work"),
            ],
        );
        assert_eq!(st.per_replica(), Some(10.0));
        assert_eq!(st.cold_start(), Some(Duration::from_secs(2)));
        assert_eq!(st.arrivals(), Some(0.0));
    }

    #[test]
    fn a_wake_is_finished_uncapped_then_starting_replicas_are_awaited() {
        // 200 messages a second arrive at a function at zero.
        let st = walk_rates(
            &rate_spec(),
            0,
            &[
                // The first message wakes it (as a connector's wake-up does).
                (0, 1.0, 0, 0, 1, "wake"),
                // The next poll finishes the wake without the rate cap
                // (which would allow 5): ceil(200 / 10) = 20.
                (1, 200.0, 0, 0, 20, "work"),
                // The backlog doubled while the 20 start, and nothing tells
                // yet what a replica serves: wait for them, not 40.
                (2, 400.0, 0, 1, 20, "starting"),
                // They are ready; the one ready since t=2 served 10: 200/s
                // arrive, 10/s a replica: ceil(200 × 1.1 / 10) = 22, not
                // ceil(590 / 10) = 59.
                (3, 590.0, 10, 20, 22, "rate"),
                (4, 590.0, 210, 20, 22, "steady"),
            ],
        );
        assert_eq!(st.per_replica(), Some(10.0));
        assert_eq!(st.arrivals(), Some(200.0));
        assert_eq!(st.cold_start(), Some(Duration::from_secs(2)));

        // Without the wake, the same backlog at one replica is rate-capped.
        walk_rates(&rate_spec(), 1, &[(1, 200.0, 0, 1, 5, "work_rate_capped")]);
    }

    #[test]
    fn a_first_burst_sized_blind_is_held_at_what_the_rates_say_it_needed() {
        // 400 messages at once at a function at zero, nothing measured yet.
        walk_rates(
            &rate_spec(),
            0,
            &[
                (0, 1.0, 0, 0, 1, "wake"),
                // Sized by the backlog alone: ceil(400 / 10) = 40.
                (1, 400.0, 0, 0, 40, "work"),
                (2, 400.0, 0, 1, 40, "steady"),
                // Measured: 10/s a replica, ready 2 s after asked for, no
                // more arriving. From zero, 400 messages started within
                // 2 s + 2 × 10 / 10 s take 20 replicas, not 40: the window
                // holds 20 from now (it began at the wake; the function
                // was at zero before), not 40 for a minute.
                (3, 390.0, 10, 40, 20, "rate"),
                (4, 190.0, 210, 20, 20, "stabilizing"),
                (5, 0.0, 400, 20, 20, "stabilizing"),
                (62, 0.0, 400, 20, 20, "stabilizing"),
                (66, 0.0, 400, 20, 0, "idle_to_zero"),
            ],
        );
    }

    #[test]
    fn a_capped_step_after_a_wake_is_held_for_the_window() {
        // Only a wake's leap past the rate cap is revised: a step within
        // the cap is held as the window holds any, though the rates
        // measured later say one replica would do.
        walk_rates(
            &rate_spec(),
            0,
            &[
                (0, 1.0, 0, 0, 1, "wake"),
                (1, 5.0, 0, 0, 1, "steady"),
                (2, 15.0, 0, 1, 2, "work"),
                // 10/s a replica, 5/s arriving: one keeps up.
                (3, 10.0, 10, 1, 2, "stabilizing"),
                (4, 0.0, 20, 2, 2, "stabilizing"),
                (40, 0.0, 20, 2, 2, "stabilizing"),
            ],
        );
    }

    #[test]
    fn revision_only_ever_lowers_a_blind_recommendation() {
        let base = Instant::now();
        let mut st = PolicyState::default();
        let window = Duration::from_secs(60);
        st.remember(base, 4, Some(40.0), window);
        st.remember(base, 30, Some(400.0), window);
        // 100 messages a second arrive, a replica serves 10: keeping up
        // takes ceil(110 / 10) = 11, more than 4 and fewer than 30.
        st.rates.arrivals = Some(100.0);
        st.rates.per_replica = Some(10.0);
        st.rates.cold_start = Some(2.0);
        st.revise(base, 10.0, 50, |n| n.max(1));
        let kept: Vec<_> = st.history.iter().map(|r| (r.replicas, r.blind)).collect();
        assert_eq!(kept, [(4, None), (20, None)]);
    }

    #[test]
    fn without_deliveries_starting_replicas_do_not_hold_the_backlog_rule() {
        // Ready replicas known, deliveries not: nothing is ever measured,
        // so each step goes by the backlog, rate-capped as before.
        let base = Instant::now();
        let s = rate_spec();
        let mut st = PolicyState::default();
        let mut current = 1;
        for (t, backlog, want) in [(0, 200.0, 5), (1, 400.0, 10), (2, 600.0, 20)] {
            let d = decide_with(
                &obs(Some(backlog), Some(0.0), current),
                Serving {
                    ready: Some(0),
                    delivered: None,
                },
                &s,
                &mut st,
                base + Duration::from_secs(t),
            );
            current = d.replicas.unwrap_or(current);
            assert_eq!(current, want, "t={t}: {}", d.reason);
        }
        assert_eq!(st.per_replica(), None);
    }

    #[test]
    fn one_jump_is_not_taken_for_a_rate() {
        // A batch of 400 lands at once on 4 ready replicas that serve 10/s.
        let st = walk_rates(
            &rate_spec(),
            4,
            &[
                (0, 40.0, 0, 4, 4, "steady"),
                // 40/s arrive, 10/s a replica: keeping up would take 5,
                // more than the backlog rule's 4, which stands.
                (1, 40.0, 40, 4, 4, "steady"),
                // 440 arrived in one second: the smaller of the last two
                // rates (40/s) counts, so ceil(40 × 1.1 / 10) = 5 keep up.
                // Starting the backlog within 2 s takes the 4 ready ones
                // and 18 new ones (their cold start not measured yet, so
                // taken as 0): 22, not ceil(440 / 10) = 44; rate-capped to 8.
                (2, 440.0, 80, 4, 8, "rate_capped"),
            ],
        );
        assert_eq!(st.arrivals(), Some(40.0));
    }

    #[test]
    fn rates_never_ask_for_more_than_the_backlog_rule() {
        // A pseudo-random walk of backlogs, deliveries and ready counts.
        let base = Instant::now();
        let s = rate_spec();
        let mut st = PolicyState::default();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut current, mut delivered) = (1u32, 0u64);
        for t in 0..5_000u64 {
            let backlog = next(600) as f64;
            delivered += next(200);
            let ready = next(u64::from(current) + 1) as u32;
            let o = queue(backlog, current, true);
            let serving = Serving {
                ready: Some(ready),
                delivered: Some(delivered),
            };
            let d = decide_with(&o, serving, &s, &mut st, base + Duration::from_secs(t));
            if let Some(n) = d.replicas {
                let by_backlog = ((backlog / s.target).ceil() as u32).clamp(1, s.max);
                if n > current && matches!(d.reason, Reason::Rate { .. }) {
                    assert!(n <= by_backlog, "t={t}: {}", d.reason);
                }
                assert!(n <= s.max);
                current = n;
            }
        }
    }

    #[test]
    fn unknown_input_forgets_the_rates() {
        let base = Instant::now();
        let s = rate_spec();
        let mut st = PolicyState::default();
        let serving = |delivered| Serving {
            ready: Some(4),
            delivered: Some(delivered),
        };
        for (t, backlog, delivered) in [(0, Some(50.0), 0), (1, Some(60.0), 40)] {
            decide_with(
                &obs(backlog, Some(0.0), 4),
                serving(delivered),
                &s,
                &mut st,
                base + Duration::from_secs(t),
            );
        }
        assert_eq!(st.arrivals(), Some(50.0));
        decide_with(
            &obs(None, Some(0.0), 4),
            serving(80),
            &s,
            &mut st,
            base + Duration::from_secs(2),
        );
        assert_eq!(st.arrivals(), None);
    }

    #[test]
    fn reasons_read_well() {
        let r = Reason::Work {
            input: "nats",
            value: 340.0,
            target: 20.0,
            replicas: 17,
            capped: false,
        };
        assert_eq!(r.to_string(), "nats 340/20 → 17");
        let capped = Reason::Rate {
            input: "nats",
            value: 440.0,
            arrivals: 40.0,
            per_replica: 10.0,
            replicas: 8,
            capped: true,
        };
        assert_eq!(
            capped.to_string(),
            "nats 440, arriving 40.0/s, 10.0/s a replica → 8 (rate-capped)"
        );
        assert_eq!(
            Reason::IdleToZero {
                after: Duration::from_secs(300)
            }
            .to_string(),
            "idle 5m → 0"
        );
        assert_eq!(
            Reason::Unknown {
                input: "prometheus"
            }
            .to_string(),
            "prometheus unknown → hold"
        );
    }
}
