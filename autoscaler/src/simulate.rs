//! A policy simulator: replays an arrival trace through a queue model under
//! ebb's real [`policy::decide`] and under models of KEDA+HPA and Knative's
//! KPA, and measures what each costs (replica-seconds) and what it delivers
//! (how long a message waits).
//!
//! Time is discrete: every whole second each autoscaler may look at the
//! queue and set a replica count; the `n` arrivals of second `t` come at
//! `t + i/n`; each ready replica serves `mu` messages a second, first in
//! first out; a replica added at `t` is ready at `t + cold start`; a removed
//! replica stops taking work at once (its message in service completes).
//!
//! The models follow the documented defaults:
//!
//! - **KEDA+HPA**: KEDA polls the queue every 30 s, activates 0 → 1 when it
//!   sees work and deactivates 1 → 0 after a 300 s cooldown since the last
//!   active poll; the HPA (disabled at 0, minimum 1) syncs every 15 s with an
//!   `AverageValue` target of `target` per replica: inside a 10 % tolerance it
//!   keeps the count, else it wants `ceil(backlog / target)`; up at most
//!   `max(+4, ×2)` per 15 s, down to the largest recommendation of the last
//!   300 s.
//! - **KPA**: concurrency (queued + in service) sampled every second; every
//!   2 s it wants `ceil(avg / target)` over a 60 s stable window or, in
//!   panic, a 6 s window; panic starts when the panic want is ≥ 200 % of the
//!   ready pods, lasts until 60 s pass without that, and never scales down;
//!   scale-down at most halves the ready pods per tick; a want of 0 is
//!   applied after a 30 s grace; at zero the activator buffers the first
//!   message and pokes the autoscaler, which scales to 1 at once.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::{self, Input, Observed, PolicyState, ScaleSpec, Serving};

/// An arrival trace: `arrivals[t]` messages arrive during second `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    pub arrivals: Vec<u32>,
}

impl Trace {
    /// Parses CSV `t,arrivals` (a header line and `#` comments are skipped;
    /// missing seconds have no arrivals).
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let mut arrivals = Vec::new();
        for (no, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("t,") {
                continue;
            }
            let bad = || format!("{name}:{}: expected `t,arrivals`: {line}", no + 1);
            let (t, n) = line.split_once(',').ok_or_else(bad)?;
            let t: usize = t.trim().parse().map_err(|_| bad())?;
            let n: u32 = n.trim().parse().map_err(|_| bad())?;
            if t >= 1_000_000 {
                return Err(format!("{name}:{}: t too large: {t}", no + 1));
            }
            if arrivals.len() <= t {
                arrivals.resize(t + 1, 0);
            }
            arrivals[t] += n;
        }
        Ok(Self {
            name: name.to_string(),
            arrivals,
        })
    }
}

/// Settings of a simulation run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Messages a second one ready replica serves.
    pub mu: f64,
    /// From a replica's creation until it serves.
    pub cold_start: Duration,
    /// Most replicas any policy may run.
    pub max: u32,
    /// Backlog per replica aimed for (ebb's target, HPA's AverageValue,
    /// KPA's concurrency target).
    pub target: f64,
    /// Seconds simulated after the trace ends.
    pub tail: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            mu: 10.0,
            cold_start: Duration::from_secs(2),
            max: 50,
            target: 10.0,
            tail: 600,
        }
    }
}

/// What an autoscaler sees of the queue at a whole second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Queued plus in service (JetStream pending + ack-pending).
    pub backlog: u32,
    pub in_service: u32,
    /// Replicas past their cold start.
    pub ready: u32,
    /// Messages taken into service so far (the consumer's delivered count).
    pub delivered: u64,
    /// Queued plus in service averaged over the last second (what Knative's
    /// queue-proxy and activator report), not a point-in-time count.
    pub concurrency: f64,
}

/// An autoscaler under simulation.
pub trait Autoscaler {
    fn name(&self) -> &'static str;
    /// Called every whole second `t` with the queue as it is then; returns a
    /// new replica count, or `None` to keep `current`.
    fn poll(&mut self, t: u64, s: Sample, current: u32) -> Option<u32>;
    /// Called at `t` when messages arrive while at zero (the connector or
    /// activator noticing the first one).
    fn wake(&mut self, t: u64, s: Sample, current: u32) -> Option<u32>;
}

/// ebb's own policy, with the function's default settings.
pub struct Ebb {
    pub spec: ScaleSpec,
    state: PolicyState,
    base: Instant,
}

impl Ebb {
    pub fn new(cfg: &SimConfig) -> Self {
        Self {
            spec: ScaleSpec {
                max: cfg.max,
                target: cfg.target,
                ..ScaleSpec::default()
            },
            state: PolicyState::default(),
            base: Instant::now(),
        }
    }

    fn decide(&mut self, t: u64, s: Sample, current: u32) -> Option<u32> {
        let obs = Observed {
            inputs: vec![
                Input {
                    name: "nats",
                    value: Some(f64::from(s.backlog)),
                },
                Input {
                    name: "inflight",
                    value: Some(f64::from(s.in_service)),
                },
            ],
            current,
            cap: None,
            // Messages served during the last second count as activity,
            // as the connector's delivered count moving does in production.
            activity: s.concurrency > 0.0,
        };
        // What a Deployment's status (ready replicas) and the consumer's
        // delivered count can tell the autoscaler.
        let serving = Serving {
            ready: Some(s.ready),
            delivered: Some(s.delivered),
        };
        let now = self.base + Duration::from_secs(t);
        policy::decide_with(&obs, serving, &self.spec, &mut self.state, now).replicas
    }
}

impl Autoscaler for Ebb {
    fn name(&self) -> &'static str {
        "ebb"
    }
    fn poll(&mut self, t: u64, s: Sample, current: u32) -> Option<u32> {
        self.decide(t, s, current)
    }
    fn wake(&mut self, t: u64, s: Sample, current: u32) -> Option<u32> {
        self.decide(t, s, current)
    }
}

/// KEDA (30 s polls, 300 s cooldown) driving an HPA (15 s syncs).
pub struct KedaHpa {
    max: u32,
    target: f64,
    last_active: Option<u64>,
    /// HPA recommendations within the down-stabilization window.
    recs: VecDeque<(u64, u32)>,
}

pub const KEDA_POLL: u64 = 30;
pub const KEDA_COOLDOWN: u64 = 300;
pub const HPA_SYNC: u64 = 15;
pub const HPA_TOLERANCE: f64 = 0.1;
pub const HPA_DOWN_WINDOW: u64 = 300;

impl KedaHpa {
    pub fn new(cfg: &SimConfig) -> Self {
        Self {
            max: cfg.max,
            target: cfg.target,
            last_active: None,
            recs: VecDeque::new(),
        }
    }
}

/// The HPA's replica calculation for an `AverageValue` external metric:
/// the current count when usage is within the tolerance of the target,
/// else `ceil(usage / target per replica)`.
pub fn hpa_replicas(usage: f64, target_per_replica: f64, current: u32) -> u32 {
    let ratio = usage / (target_per_replica * f64::from(current.max(1)));
    if (ratio - 1.0).abs() <= HPA_TOLERANCE {
        current
    } else {
        (usage / target_per_replica).ceil() as u32
    }
}

impl Autoscaler for KedaHpa {
    fn name(&self) -> &'static str {
        "keda+hpa"
    }

    fn poll(&mut self, t: u64, s: Sample, current: u32) -> Option<u32> {
        let mut next = current;
        if t.is_multiple_of(KEDA_POLL) {
            let active = s.backlog > 0;
            if active {
                self.last_active = Some(t);
            }
            if current == 0 && active {
                next = 1;
            } else if current > 0
                && !active
                && self.last_active.is_none_or(|la| t - la >= KEDA_COOLDOWN)
            {
                next = 0;
                self.recs.clear();
            }
        }
        // The HPA is disabled while KEDA holds the target at zero.
        if t.is_multiple_of(HPA_SYNC) && current > 0 && next > 0 {
            let rec = hpa_replicas(f64::from(s.backlog), self.target, current).clamp(1, self.max);
            self.recs.push_back((t, rec));
            while self
                .recs
                .front()
                .is_some_and(|&(at, _)| t - at >= HPA_DOWN_WINDOW)
            {
                self.recs.pop_front();
            }
            // Up: no stabilization; down: the window's largest recommendation.
            let down = self.recs.iter().map(|&(_, r)| r).max().unwrap_or(rec);
            let desired = if rec > current {
                rec.min((current + 4).max(current * 2))
            } else if down < current {
                down
            } else {
                current
            };
            next = desired.min(self.max);
        }
        (next != current).then_some(next)
    }

    fn wake(&mut self, _t: u64, _s: Sample, _current: u32) -> Option<u32> {
        // KEDA only notices work when it polls.
        None
    }
}

/// Knative's KPA.
pub struct Kpa {
    max: u32,
    target: f64,
    /// Concurrency samples, one a second, newest last.
    samples: VecDeque<f64>,
    panic_since: Option<u64>,
    max_panic_pods: u32,
    zero_since: Option<u64>,
}

pub const KPA_TICK: u64 = 2;
pub const KPA_STABLE_WINDOW: u64 = 60;
pub const KPA_PANIC_WINDOW: u64 = 6;
pub const KPA_PANIC_THRESHOLD: f64 = 2.0;
pub const KPA_MAX_SCALE_DOWN_RATE: f64 = 2.0;
pub const KPA_MAX_SCALE_UP_RATE: f64 = 1000.0;
pub const KPA_ZERO_GRACE: u64 = 30;

/// What one KPA tick wants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KpaWant {
    pub desired: u32,
    pub panicking: bool,
}

impl Kpa {
    pub fn new(cfg: &SimConfig) -> Self {
        Self {
            max: cfg.max,
            target: cfg.target,
            samples: VecDeque::new(),
            panic_since: None,
            max_panic_pods: 0,
            zero_since: None,
        }
    }

    fn avg(&self, window: u64) -> f64 {
        let n = window as usize;
        self.samples.iter().rev().take(n).sum::<f64>() / n as f64
    }

    /// Knative's decider (`autoscaler.go` Scale) over the samples so far.
    pub fn tick(&mut self, t: u64, ready: u32) -> KpaWant {
        let ready = f64::from(ready.max(1));
        let max_up = (KPA_MAX_SCALE_UP_RATE * ready).ceil();
        let max_down = (ready / KPA_MAX_SCALE_DOWN_RATE).floor();
        let dspc = (self.avg(KPA_STABLE_WINDOW) / self.target).ceil();
        let dppc = (self.avg(KPA_PANIC_WINDOW) / self.target).ceil();
        let stable = dspc.max(max_down).min(max_up) as u32;
        let panic = dppc.max(max_down).min(max_up) as u32;
        let over = dppc / ready >= KPA_PANIC_THRESHOLD;
        if over {
            self.panic_since = Some(t);
        } else if self.panic_since.is_some_and(|p| p + KPA_STABLE_WINDOW <= t) {
            self.panic_since = None;
            self.max_panic_pods = 0;
        }
        if self.panic_since.is_some() {
            self.max_panic_pods = self.max_panic_pods.max(panic);
            KpaWant {
                desired: self.max_panic_pods.min(self.max),
                panicking: true,
            }
        } else {
            KpaWant {
                desired: stable.min(self.max),
                panicking: false,
            }
        }
    }
}

impl Autoscaler for Kpa {
    fn name(&self) -> &'static str {
        "kpa"
    }

    fn poll(&mut self, t: u64, s: Sample, current: u32) -> Option<u32> {
        self.samples.push_back(s.concurrency);
        while self.samples.len() > KPA_STABLE_WINDOW as usize {
            self.samples.pop_front();
        }
        if !t.is_multiple_of(KPA_TICK) {
            return None;
        }
        let want = self.tick(t, s.ready);
        if want.desired == 0 {
            if current == 0 {
                return None;
            }
            let since = *self.zero_since.get_or_insert(t);
            return (t - since >= KPA_ZERO_GRACE).then_some(0);
        }
        self.zero_since = None;
        (want.desired != current).then_some(want.desired)
    }

    fn wake(&mut self, _t: u64, _s: Sample, current: u32) -> Option<u32> {
        // The activator's poke: one pod at once.
        self.zero_since = None;
        (current == 0).then_some(1)
    }
}

#[derive(Debug, Clone)]
struct Replica {
    created: f64,
    ready_at: f64,
    busy_until: f64,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub policy: &'static str,
    pub replica_seconds: f64,
    pub wait_p50: f64,
    pub wait_p99: f64,
    pub wait_max: f64,
    pub direction_changes: u32,
    pub seconds_at_zero: u64,
    /// Messages still queued when the run ended (counted in the waits with
    /// the time they had waited so far).
    pub unserved: usize,
    /// Replicas at the end of each second.
    pub replicas: Vec<u32>,
    /// Backlog (queued + in service) at the start of each second.
    pub backlog: Vec<u32>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Replays `trace` under `scaler`.
pub fn run(trace: &Trace, cfg: &SimConfig, scaler: &mut dyn Autoscaler) -> Outcome {
    let service = 1.0 / cfg.mu;
    let cold = cfg.cold_start.as_secs_f64();
    let horizon = trace.arrivals.len() as u64 + cfg.tail;
    let mut replicas: Vec<Replica> = Vec::new();
    let mut queue: VecDeque<f64> = VecDeque::new();
    let mut waits: Vec<f64> = Vec::new();
    let mut replica_seconds = 0.0;
    let mut last_dir = 0i8;
    let mut direction_changes = 0;
    let mut seconds_at_zero = 0;
    let mut series = Vec::with_capacity(horizon as usize);
    let mut backlogs = Vec::with_capacity(horizon as usize);
    // Message-seconds present (queued or in service) during each second.
    let mut area = vec![0.0; horizon as usize + 2];
    let add_area = |area: &mut [f64], from: f64, to: f64| {
        let mut a = from;
        while a < to {
            let sec = a.floor();
            let b = to.min(sec + 1.0);
            if let Some(x) = area.get_mut(sec as usize) {
                *x += b - a;
            }
            a = b;
        }
    };

    let mut apply = |replicas: &mut Vec<Replica>, n: u32, now: f64, rs: &mut f64| {
        let n = n.min(cfg.max) as usize;
        if n == replicas.len() {
            return;
        }
        let dir = if n > replicas.len() { 1 } else { -1 };
        if last_dir != 0 && dir != last_dir {
            direction_changes += 1;
        }
        last_dir = dir;
        while replicas.len() < n {
            replicas.push(Replica {
                created: now,
                ready_at: now + cold,
                busy_until: 0.0,
            });
        }
        if replicas.len() > n {
            // Remove pods not yet ready first, then idle ones, then the
            // newest (ReplicaSet's order).
            replicas.sort_by(|a, b| {
                let key = |r: &Replica| (r.ready_at <= now, r.busy_until > now);
                key(a).cmp(&key(b)).then(b.created.total_cmp(&a.created))
            });
            for r in replicas.drain(..replicas.len() - n) {
                *rs += now - r.created;
            }
        }
    };

    for t in 0..horizon {
        let now = t as f64;
        let concurrency = if t == 0 { 0.0 } else { area[t as usize - 1] };
        let delivered = waits.len() as u64;
        let sample = |replicas: &[Replica], queue: &VecDeque<f64>| {
            let in_service = replicas.iter().filter(|r| r.busy_until > now).count() as u32;
            Sample {
                backlog: queue.len() as u32 + in_service,
                in_service,
                ready: replicas.iter().filter(|r| r.ready_at <= now).count() as u32,
                delivered,
                concurrency,
            }
        };
        let s = sample(&replicas, &queue);
        backlogs.push(s.backlog);
        let current = replicas.len() as u32;
        if let Some(n) = scaler.poll(t, s, current) {
            apply(&mut replicas, n, now, &mut replica_seconds);
        }
        let n = trace.arrivals.get(t as usize).copied().unwrap_or(0);
        for i in 0..n {
            queue.push_back(now + f64::from(i) / f64::from(n));
        }
        if n > 0 && replicas.is_empty() {
            // The first arrival at `t` wakes the autoscaler at once.
            let mut s = sample(&replicas, &queue);
            s.backlog = 1;
            if let Some(n) = scaler.wake(t, s, 0) {
                apply(&mut replicas, n, now, &mut replica_seconds);
            }
        }
        // Serve during [t, t+1).
        let end = now + 1.0;
        while let Some(&arrived) = queue.front() {
            let Some(r) = replicas.iter_mut().min_by(|a, b| {
                a.ready_at
                    .max(a.busy_until)
                    .total_cmp(&b.ready_at.max(b.busy_until))
            }) else {
                break;
            };
            let start = r.ready_at.max(r.busy_until).max(arrived).max(now);
            if start >= end {
                break;
            }
            queue.pop_front();
            waits.push(start - arrived);
            r.busy_until = start + service;
            // Earlier seconds of its wait were counted while it queued.
            add_area(&mut area, arrived.max(now), start + service);
        }
        for &arrived in &queue {
            add_area(&mut area, arrived.max(now), end);
        }
        if replicas.is_empty() {
            seconds_at_zero += 1;
        }
        series.push(replicas.len() as u32);
    }
    let end = horizon as f64;
    replica_seconds += replicas.iter().map(|r| end - r.created).sum::<f64>();
    let unserved = queue.len();
    waits.extend(queue.iter().map(|a| end - a));
    waits.sort_by(f64::total_cmp);
    Outcome {
        policy: scaler.name(),
        replica_seconds,
        wait_p50: percentile(&waits, 50.0),
        wait_p99: percentile(&waits, 99.0),
        wait_max: waits.last().copied().unwrap_or(0.0),
        direction_changes,
        seconds_at_zero,
        unserved,
        replicas: series,
        backlog: backlogs,
    }
}

/// Runs ebb, KEDA+HPA and KPA over `trace`, in that order.
pub fn compare(trace: &Trace, cfg: &SimConfig) -> Vec<Outcome> {
    vec![
        run(trace, cfg, &mut Ebb::new(cfg)),
        run(trace, cfg, &mut KedaHpa::new(cfg)),
        run(trace, cfg, &mut Kpa::new(cfg)),
    ]
}

/// The goals for ebb against the models, each with whether it holds.
pub fn goals(outcomes: &[Outcome], cfg: &SimConfig) -> Vec<(String, bool)> {
    let [ebb, keda, kpa] = outcomes else {
        return Vec::new();
    };
    let p99_bound = cfg.cold_start.as_secs_f64() + 3.0;
    vec![
        (
            format!(
                "replica-seconds {:.0} < keda+hpa {:.0} and kpa {:.0}",
                ebb.replica_seconds, keda.replica_seconds, kpa.replica_seconds
            ),
            ebb.replica_seconds < keda.replica_seconds && ebb.replica_seconds < kpa.replica_seconds,
        ),
        (
            format!("p99 wait {:.2}s <= {p99_bound:.2}s", ebb.wait_p99),
            ebb.wait_p99 <= p99_bound,
        ),
        (
            format!(
                "direction changes {} <= kpa {}",
                ebb.direction_changes, kpa.direction_changes
            ),
            ebb.direction_changes <= kpa.direction_changes,
        ),
    ]
}

/// The results of one trace as a text table, with the goals.
pub fn table(trace: &Trace, outcomes: &[Outcome], cfg: &SimConfig) -> String {
    let total: u64 = trace.arrivals.iter().map(|&n| u64::from(n)).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== {} ({} s, {} messages, mu {}/s, cold start {}) ==",
        trace.name,
        trace.arrivals.len(),
        total,
        cfg.mu,
        humantime::format_duration(cfg.cold_start)
    );
    let _ = writeln!(
        s,
        "{:<10} {:>14} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "policy", "replica-s", "p50 (s)", "p99 (s)", "max (s)", "dir-chg", "zero (s)"
    );
    for o in outcomes {
        let _ = write!(
            s,
            "{:<10} {:>14.1} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>9}",
            o.policy,
            o.replica_seconds,
            o.wait_p50,
            o.wait_p99,
            o.wait_max,
            o.direction_changes,
            o.seconds_at_zero
        );
        if o.unserved > 0 {
            let _ = write!(s, "  ({} unserved at the end)", o.unserved);
        }
        s.push('\n');
    }
    for (goal, ok) in goals(outcomes, cfg) {
        let _ = writeln!(s, "  ebb {}: {goal}", if ok { "PASS" } else { "FAIL" });
    }
    s
}

/// Escapes text for SVG.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// A round axis maximum at or above `v`: 1, 2 or 5 × a power of ten.
fn nice_max(v: u32) -> u32 {
    let mut m = 1u32;
    loop {
        for k in [1, 2, 5] {
            if m.saturating_mul(k) >= v {
                return m.saturating_mul(k);
            }
        }
        if m > u32::MAX / 10 {
            return u32::MAX;
        }
        m *= 10;
    }
}

/// Chart geometry: where each panel is drawn.
const SVG_W: f64 = 1000.0;
const SVG_H: f64 = 570.0;
const SVG_LEFT: f64 = 60.0;
const SVG_RIGHT: f64 = 970.0;
/// Top and bottom of the messages panel, then of the replicas panel.
const SVG_MSG: (f64, f64) = (50.0, 210.0);
const SVG_REP: (f64, f64) = (260.0, 470.0);
/// Colours of ebb, KEDA+HPA, KPA (and any further policy).
const SVG_COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];

/// The x of second `t` of `len`.
fn svg_x(t: usize, len: usize) -> f64 {
    SVG_LEFT + (SVG_RIGHT - SVG_LEFT) * t as f64 / len.max(1) as f64
}

/// The y of `v` on a panel `(top, bottom)` whose axis ends at `max`.
fn svg_y(v: u32, max: u32, (top, bottom): (f64, f64)) -> f64 {
    bottom - (bottom - top) * f64::from(v) / f64::from(max.max(1))
}

/// Polyline points of a per-second series as steps: each value holds from
/// its second to the next one (one point per change, two at each step).
fn svg_steps(vals: &[u32], len: usize, max: u32, panel: (f64, f64)) -> String {
    let mut p = String::new();
    let mut prev: Option<u32> = None;
    for (t, &v) in vals.iter().enumerate() {
        if let Some(pv) = prev
            && pv != v
        {
            let _ = write!(p, "{:.1},{:.1} ", svg_x(t, len), svg_y(pv, max, panel));
        }
        if prev != Some(v) {
            let _ = write!(p, "{:.1},{:.1} ", svg_x(t, len), svg_y(v, max, panel));
        }
        prev = Some(v);
    }
    if let Some(v) = prev {
        let _ = write!(
            p,
            "{:.1},{:.1}",
            svg_x(vals.len(), len),
            svg_y(v, max, panel)
        );
    }
    p
}

/// An SVG chart of one trace: arrivals and ebb's backlog on top, each
/// policy's replicas below, per second; hand-written, no dependencies.
pub fn svg(trace: &Trace, outcomes: &[Outcome]) -> String {
    let len = outcomes
        .iter()
        .map(|o| o.replicas.len())
        .max()
        .unwrap_or(0)
        .max(trace.arrivals.len())
        .max(1);
    let backlog = outcomes.first().map_or(&[][..], |o| o.backlog.as_slice());
    let msg_max = nice_max(
        backlog
            .iter()
            .chain(&trace.arrivals)
            .copied()
            .max()
            .unwrap_or(0)
            .max(1),
    );
    let rep_max = nice_max(
        outcomes
            .iter()
            .flat_map(|o| o.replicas.iter().copied())
            .max()
            .unwrap_or(0)
            .max(1),
    );
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="{SVG_W}" height="{SVG_H}" fill="white"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{SVG_LEFT}" y="24" font-size="15" font-weight="bold">{}: {} s, per second</text>"##,
        xml_escape(&trace.name),
        trace.arrivals.len()
    );
    // Axes, horizontal grid lines with their values, panel titles.
    for (panel, max, title) in [
        (
            SVG_MSG,
            msg_max,
            "messages: arrivals a second (light), backlog under ebb (dark)",
        ),
        (SVG_REP, rep_max, "replicas"),
    ] {
        let _ = writeln!(
            s,
            r##"<text x="{SVG_LEFT}" y="{:.1}" fill="#333">{title}</text>"##,
            panel.0 - 8.0
        );
        for v in [0, max / 2, max] {
            let y = svg_y(v, max, panel);
            let _ = writeln!(
                s,
                r##"<line x1="{SVG_LEFT}" y1="{y:.1}" x2="{SVG_RIGHT}" y2="{y:.1}" stroke="{}"/>"##,
                if v == 0 { "#000" } else { "#ddd" }
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
                SVG_LEFT - 6.0,
                y + 4.0
            );
        }
    }
    // Time ticks under the replicas panel, every round number of minutes.
    let minutes = len as f64 / 60.0;
    let step = [1usize, 2, 5, 10, 15, 30, 60, 120, 240]
        .into_iter()
        .find(|&m| minutes / m as f64 <= 12.0)
        .unwrap_or(480);
    let mut m = 0;
    while m * 60 <= len {
        let x = svg_x(m * 60, len);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#000"/>"##,
            SVG_REP.1,
            SVG_REP.1 + 5.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{m} min</text>"##,
            SVG_REP.1 + 18.0
        );
        m += step;
    }
    let _ = writeln!(
        s,
        r##"<polyline class="arrivals" fill="none" stroke="#bbb" stroke-width="1" points="{}"/>"##,
        svg_steps(&trace.arrivals, len, msg_max, SVG_MSG)
    );
    let _ = writeln!(
        s,
        r##"<polyline class="backlog" fill="none" stroke="#444" stroke-width="1.2" points="{}"/>"##,
        svg_steps(backlog, len, msg_max, SVG_MSG)
    );
    // The first policy (ebb) drawn last, on top.
    for (i, o) in outcomes.iter().enumerate().rev() {
        let _ = writeln!(
            s,
            r##"<polyline class="policy" data-policy="{}" fill="none" stroke="{}" stroke-width="{}" stroke-opacity="0.85" points="{}"/>"##,
            xml_escape(o.policy),
            SVG_COLORS[i % SVG_COLORS.len()],
            if i == 0 { 2.0 } else { 1.4 },
            svg_steps(&o.replicas, len, rep_max, SVG_REP)
        );
    }
    for (i, o) in outcomes.iter().enumerate() {
        let c = SVG_COLORS[i % SVG_COLORS.len()];
        let y = SVG_REP.1 + 40.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{SVG_LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="3"/>"##,
            y - 4.0,
            SVG_LEFT + 24.0,
            y - 4.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{y:.1}">{}: {:.0} replica-s, wait p99 {:.2} s, max {:.2} s, {} direction changes</text>"##,
            SVG_LEFT + 32.0,
            xml_escape(o.policy),
            o.replica_seconds,
            o.wait_p99,
            o.wait_max,
            o.direction_changes
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(arrivals: Vec<u32>) -> Trace {
        Trace {
            name: "test".into(),
            arrivals,
        }
    }

    /// The default settings with `tail` seconds after the trace.
    fn with_tail(tail: u64) -> SimConfig {
        SimConfig {
            tail,
            ..SimConfig::default()
        }
    }

    /// Arrivals a second: each `(rate, seconds)` in turn.
    fn steps(parts: &[(u32, usize)]) -> Vec<u32> {
        parts
            .iter()
            .flat_map(|&(rate, n)| [rate].repeat(n))
            .collect()
    }

    /// Holds a fixed count.
    struct Fixed(u32);
    impl Autoscaler for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn poll(&mut self, _: u64, _: Sample, current: u32) -> Option<u32> {
            (current != self.0).then_some(self.0)
        }
        fn wake(&mut self, _: u64, _: Sample, _: u32) -> Option<u32> {
            None
        }
    }

    #[test]
    fn simulate_parses_traces() {
        let t = Trace::parse("x", "# c\nt,arrivals\n0,3\n2, 5\n").unwrap();
        assert_eq!(t.arrivals, vec![3, 0, 5]);
        assert!(Trace::parse("x", "0;3").is_err());
    }

    #[test]
    fn simulate_queue_at_capacity_keeps_waits_bounded() {
        // 4 replicas × 10/s against 40/s for 10 minutes.
        let cfg = with_tail(0);
        let o = run(&trace(vec![40; 600]), &cfg, &mut Fixed(4));
        // Ready after the 2 s cold start; the 80 early messages then drain
        // only at the rate they keep arriving, so waits stay at ~2 s.
        assert!(o.wait_max <= 2.5, "max wait {}", o.wait_max);
        // At exactly capacity the early backlog never drains, nor grows.
        assert!(o.unserved <= 80, "unserved {}", o.unserved);
        assert!((o.replica_seconds - 2400.0).abs() < 1e-6);
        // Below capacity it is all but free of waits once ready.
        let o = run(&trace(vec![30; 600]), &cfg, &mut Fixed(4));
        assert!(o.wait_p50 < 0.2, "p50 {}", o.wait_p50);
    }

    #[test]
    fn simulate_overload_grows_waits() {
        let cfg = with_tail(0);
        let o = run(&trace(vec![50; 100]), &cfg, &mut Fixed(4));
        assert!(o.wait_max > 20.0, "max wait {}", o.wait_max);
    }

    #[test]
    fn simulate_hpa_tolerance() {
        // 10 % either side of the target keeps the count.
        assert_eq!(hpa_replicas(105.0, 10.0, 10), 10);
        assert_eq!(hpa_replicas(95.0, 10.0, 10), 10);
        // Exactly 10 % is outside in floating point, as in the HPA's Go code.
        assert_eq!(hpa_replicas(110.0, 10.0, 10), 11);
        // Beyond it: ceil(usage / target).
        assert_eq!(hpa_replicas(115.0, 10.0, 10), 12);
        assert_eq!(hpa_replicas(85.0, 10.0, 10), 9);
        assert_eq!(hpa_replicas(0.0, 10.0, 3), 0);
    }

    #[test]
    fn simulate_hpa_scale_up_is_limited_per_sync() {
        let cfg = SimConfig::default();
        let mut k = KedaHpa::new(&cfg);
        let s = |backlog| Sample {
            backlog,
            in_service: 0,
            ready: 0,
            delivered: 0,
            concurrency: 0.0,
        };
        // KEDA activates at its poll; the HPA then steps +4 / ×2 per 15 s.
        assert_eq!(k.poll(0, s(1000), 0), Some(1));
        assert_eq!(k.poll(15, s(1000), 1), Some(5));
        assert_eq!(k.poll(16, s(1000), 5), None);
        assert_eq!(k.poll(30, s(1000), 5), Some(10));
        assert_eq!(k.poll(45, s(1000), 10), Some(20));
        // Down only to the largest recommendation of the last 300 s: the
        // 50 recommended at t=45 holds until t=345.
        assert_eq!(k.poll(60, s(5), 20), None);
        assert_eq!(k.poll(330, s(5), 20), None);
        assert_eq!(k.poll(345, s(5), 20), Some(1));
        // KEDA takes 1 → 0 after 300 s without work at its polls.
        assert_eq!(k.poll(360, s(0), 1), None);
        // (last active at KEDA's poll at t=330).
        assert_eq!(k.poll(600, s(0), 1), None);
        assert_eq!(k.poll(630, s(0), 1), Some(0));
    }

    #[test]
    fn simulate_kpa_panic() {
        let cfg = SimConfig::default();
        let mut k = Kpa::new(&cfg);
        let want = |desired, panicking| KpaWant { desired, panicking };
        // 10 ready pods at their target of 10 each: stable.
        for _ in 0..60 {
            k.samples.push_back(100.0);
        }
        assert_eq!(k.tick(0, 10), want(10, false));
        // The 6 s window jumps to 20× target: panic, want 20 (≥ 200 %).
        for _ in 0..6 {
            k.samples.push_back(200.0);
        }
        while k.samples.len() > 60 {
            k.samples.pop_front();
        }
        assert_eq!(k.tick(2, 10), want(20, true));
        // Load gone: in panic it never scales down…
        for _ in 0..60 {
            k.samples.push_back(0.0);
            k.samples.pop_front();
        }
        assert_eq!(k.tick(30, 20), want(20, true));
        // …until 60 s pass without the threshold; then at most halving.
        assert_eq!(k.tick(62, 20), want(10, false));
        // 190 % is not panic.
        let mut k = Kpa::new(&cfg);
        for _ in 0..60 {
            k.samples.push_back(190.0);
        }
        assert!(!k.tick(0, 10).panicking);
        assert!(k.tick(0, 9).panicking);
    }

    #[test]
    fn simulate_ebb_scales_to_zero_on_an_idle_tail() {
        let cfg = with_tail(300);
        let tr = trace(steps(&[(0, 30), (40, 60)]));
        let o = run(&tr, &cfg, &mut Ebb::new(&cfg));
        assert_eq!(o.replicas[..30], [0; 30]);
        assert!(o.replicas[30] >= 1, "woken at the first arrival");
        assert!(o.replicas.iter().any(|&r| r >= 4));
        let last_busy = 90;
        let zero_at = o.replicas.iter().rposition(|&r| r > 0).unwrap() + 1;
        // Idle for scale-to-zero-after (60 s) after the backlog drained.
        assert!(
            zero_at > last_busy + 60 && zero_at <= last_busy + 70,
            "zero at {zero_at}"
        );
        assert_eq!(o.replicas.last(), Some(&0));
        assert!(o.seconds_at_zero >= 30 + 200);
        assert_eq!(o.unserved, 0);
    }

    /// The example traces, by name.
    fn example_traces() -> Vec<Trace> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/traces");
        let mut traces: Vec<Trace> = std::fs::read_dir(&dir)
            .expect("examples/traces")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .map(|p| {
                let name = p.file_stem().expect("stem").to_string_lossy().into_owned();
                Trace::parse(&name, &std::fs::read_to_string(&p).expect("read")).expect("parse")
            })
            .collect();
        traces.sort_by(|a, b| a.name.cmp(&b.name));
        traces
    }

    /// The issue's goals on every example trace, at ebb's defaults: p99
    /// wait within cold start + 3 s, no more direction changes than KPA,
    /// fewer replica-seconds than both models. On `trickle` no policy can
    /// have fewer than KEDA+HPA's under the other two goals and the
    /// scale-to-zero rule; there ebb must sit at that floor instead.
    #[test]
    fn simulate_ebb_meets_the_goals_on_the_example_traces() {
        let cfg = SimConfig::default();
        let traces = example_traces();
        let names: Vec<&str> = traces.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["batch", "bursty", "diurnal", "spike-after-idle", "trickle"]
        );
        for trace in &traces {
            let outcomes = compare(trace, &cfg);
            let [ebb, keda, kpa] = &outcomes[..] else {
                panic!("three outcomes");
            };
            assert_eq!(ebb.unserved, 0, "{}", trace.name);
            let goals = goals(&outcomes, &cfg);
            let table = table(trace, &outcomes, &cfg);
            assert!(goals[1].1 && goals[2].1, "{table}");
            if trace.name != "trickle" {
                assert!(goals[0].1, "{table}");
                continue;
            }
            // Fewer than 100 messages: the (nearest-rank) p99 is the
            // largest wait, so the first message is served within 5 s and
            // a replica is asked for by first + 5 − 2 s. With one direction
            // change (KPA's) the count never returns to zero in between, so
            // a replica runs from then until the last arrival and then
            // `scale-to-zero-after` (60 s) more.
            let total: u32 = trace.arrivals.iter().sum();
            assert!(total < 100 && kpa.direction_changes == 1, "{table}");
            let first = trace
                .arrivals
                .iter()
                .position(|&n| n > 0)
                .expect("arrivals") as f64;
            let last = trace
                .arrivals
                .iter()
                .rposition(|&n| n > 0)
                .expect("arrivals") as f64;
            let bound = cfg.cold_start.as_secs_f64() + 3.0;
            let floor = last - (first + bound - cfg.cold_start.as_secs_f64()) + 60.0;
            assert!(floor > keda.replica_seconds, "floor {floor}\n{table}");
            // KEDA+HPA is cheaper only by going to zero between messages,
            // making them wait far past the bound.
            assert!(keda.wait_p99 > 5.0 * bound, "{table}");
            assert!(
                ebb.replica_seconds <= floor + 5.0 && ebb.replica_seconds < kpa.replica_seconds,
                "floor {floor}\n{table}"
            );
        }
    }

    /// Checks that every tag of `xml` closes in order, attributes are
    /// quoted and text has no bare `<` or `&`.
    fn assert_well_formed(xml: &str) {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = xml;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            for (j, _) in text.match_indices('&') {
                let entity = &text[j..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;"]
                        .iter()
                        .any(|e| entity.starts_with(e)),
                    "bare & in {text:?}"
                );
            }
            let end = rest[i..].find('>').expect("tag closes") + i;
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<'), "< inside a tag: {tag}");
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "</{name}> closes the wrong tag");
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().expect("tag name"));
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "never closed: {open:?}");
        assert!(rest.trim().is_empty());
    }

    /// The value of attribute `name` in a tag.
    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = tag[start..].find('"')?;
        Some(&tag[start..start + len])
    }

    #[test]
    fn simulate_svg_is_well_formed() {
        let cfg = with_tail(120);
        let arrivals = steps(&[(0, 5), (40, 20), (0, 10), (200, 3)]);
        let tr = Trace {
            name: "a <b> & c".into(),
            arrivals,
        };
        let out = compare(&tr, &cfg);
        let s = svg(&tr, &out);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_well_formed(&s);
        assert!(s.contains("a &lt;b&gt; &amp; c"));
        let polylines: Vec<&str> = s
            .split("<polyline")
            .skip(1)
            .map(|p| &p[..p.find("/>").expect("polyline closes")])
            .collect();
        // Arrivals, backlog, and one per policy.
        assert_eq!(polylines.len(), 2 + out.len());
        let len = out[0].replicas.len();
        assert_eq!(len, tr.arrivals.len() + 120);
        let rep_max = nice_max(out.iter().flat_map(|o| o.replicas.clone()).max().unwrap());
        for o in &out {
            let tag = polylines
                .iter()
                .find(|p| attr(p, "data-policy") == Some(o.policy))
                .unwrap_or_else(|| panic!("no polyline for {}", o.policy));
            let points: Vec<(f64, f64)> = attr(tag, "points")
                .unwrap()
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect();
            // The steps span the whole run, and read back as the series:
            // at each second, the last point at or before it.
            assert_eq!(points.first().map(|p| p.0), Some(svg_x(0, len)));
            let last_x = points.last().unwrap().0;
            assert!((last_x - svg_x(len, len)).abs() < 0.06, "ends at {last_x}");
            for (t, &want) in o.replicas.iter().enumerate() {
                let x = svg_x(t, len);
                let &(_, y) = points.iter().rev().find(|p| p.0 <= x + 0.06).unwrap();
                let (top, bottom) = SVG_REP;
                let v = (bottom - y) / (bottom - top) * f64::from(rep_max);
                assert!(
                    (v - f64::from(want)).abs() < 0.5,
                    "{} at t={t}: chart {v:.2}, series {want}",
                    o.policy
                );
            }
        }
        assert!(table(&tr, &out, &cfg).contains("keda+hpa"));
    }

    #[test]
    fn simulate_svg_axis_maxima_are_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(1), 1);
        assert_eq!(nice_max(3), 5);
        assert_eq!(nice_max(43), 50);
        assert_eq!(nice_max(400), 500);
        assert_eq!(nice_max(501), 1000);
        assert_eq!(nice_max(u32::MAX), u32::MAX);
    }
}
