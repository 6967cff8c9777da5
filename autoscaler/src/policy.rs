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

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

/// Consecutive polls with an unknown input before `fallback-replicas` applies.
pub const FALLBACK_AFTER: u32 = 3;

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
        }
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

/// What the policy remembers of a function between polls.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    /// Recommendations within the stabilization window, oldest first.
    history: VecDeque<(Instant, u32)>,
    /// Since when every input has been zero.
    idle_since: Option<Instant>,
    unknown_streak: u32,
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
    /// Work arrived at zero.
    Wake {
        input: &'static str,
        value: f64,
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
            Reason::Wake { .. } => "wake",
            Reason::Idle => "idle",
            Reason::IdleToZero { .. } => "idle_to_zero",
            Reason::Stabilizing { .. } => "stabilizing",
            Reason::Steady => "steady",
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
                capped,
            } => {
                write!(f, "{input} {value}/{target} → {replicas}")?;
                if *capped {
                    write!(f, " (rate-capped)")?;
                }
                Ok(())
            }
            Reason::Wake {
                input,
                value,
                replicas,
            } => write!(f, "work at zero ({input} {value}) → {replicas}"),
            Reason::Idle => write!(f, "idle"),
            Reason::IdleToZero { after } => {
                write!(f, "idle {} → 0", humantime::format_duration(*after))
            }
            Reason::Stabilizing { window_max } => {
                write!(f, "stabilizing (window max {window_max}) → hold")
            }
            Reason::Steady => write!(f, "steady"),
            Reason::Paused => write!(f, "paused → hold"),
            Reason::Unknown { input } => write!(f, "{input} unknown → hold"),
            Reason::Fallback { input, replicas } => {
                write!(f, "{input} unknown {FALLBACK_AFTER}× → fallback {replicas}")
            }
        }
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

/// Decides the replica count of one function at `now`.
pub fn decide(obs: &Observed, spec: &ScaleSpec, st: &mut PolicyState, now: Instant) -> Decision {
    let current = obs.current;
    let upper = obs.cap.map_or(spec.max, |c| spec.max.min(c.max(1)));
    let clamp = |n: u32| n.max(spec.min).min(upper.max(spec.min));

    if spec.paused {
        return hold(Reason::Paused);
    }

    // Missing data never scales down: hold, or fall back after a while.
    if let Some(unknown) = obs.inputs.iter().find(|i| i.value.is_none()) {
        st.unknown_streak = st.unknown_streak.saturating_add(1);
        st.idle_since = None;
        if let Some(fb) = spec.fallback
            && st.unknown_streak >= FALLBACK_AFTER
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
    st.unknown_streak = 0;

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
    let idle = !obs.activity && obs.inputs.iter().all(|i| i.value == Some(0.0));
    if idle {
        st.idle_since.get_or_insert(now);
    } else {
        st.idle_since = None;
    }

    // At zero: wake at the first sign of work above the activation level.
    if current == 0 {
        let max_value = obs
            .inputs
            .iter()
            .map(|i| i.value.unwrap_or(0.0))
            .fold(0.0, f64::max);
        if max_value > spec.activation.max(0.0) || spec.min > 0 {
            let replicas = clamp(want.max(1));
            st.history.push_back((now, replicas));
            return set(
                current,
                replicas,
                Reason::Wake {
                    input,
                    value,
                    replicas,
                },
            );
        }
        return hold(Reason::Idle);
    }

    // While replicas run, the recommendation never drops below one: only
    // the idle timer takes a function to zero.
    let rec = clamp(want).max(1.min(upper));
    st.history.push_back((now, rec));
    // Keep one entry from before the window: it says what was recommended
    // when the window began.
    while st.history.len() >= 2 && now.duration_since(st.history[1].0) >= spec.scale_down_window {
        st.history.pop_front();
    }

    if spec.min == 0
        && let Some(since) = st.idle_since
        && now.duration_since(since) >= spec.scale_to_zero_after
    {
        st.history.clear();
        return set(
            current,
            0,
            Reason::IdleToZero {
                after: spec.scale_to_zero_after,
            },
        );
    }

    if rec > current {
        let cap = current.saturating_mul(2).max(current.saturating_add(4));
        let replicas = rec.min(cap);
        return set(
            current,
            replicas,
            Reason::Work {
                input,
                value,
                target,
                replicas,
                capped: replicas < rec,
            },
        );
    }
    if rec < current {
        let window_max = st.history.iter().map(|(_, r)| *r).max().unwrap_or(rec);
        let window_full = st
            .history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= spec.scale_down_window);
        if window_max < current && window_full {
            return set(
                current,
                window_max,
                Reason::Work {
                    input,
                    value,
                    target,
                    replicas: window_max,
                    capped: false,
                },
            );
        }
        return hold(Reason::Stabilizing { window_max });
    }
    // Out-of-bounds counts (a user edited the Deployment) come back in range.
    let bounded = clamp(current);
    if bounded != current {
        return set(
            current,
            bounded,
            Reason::Work {
                input,
                value,
                target,
                replicas: bounded,
                capped: false,
            },
        );
    }
    hold(Reason::Steady)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScaleSpec {
        ScaleSpec {
            min: 0,
            max: 8,
            target: 20.0,
            activation: 0.0,
            scale_to_zero_after: Duration::from_secs(60),
            scale_down_window: Duration::from_secs(60),
            paused: false,
            fallback: None,
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

    /// Walks rows `(t seconds, backlog, inflight) -> (replicas after, reason label)`,
    /// applying each decision to the current count.
    /// `(t seconds, backlog, inflight, replicas after, reason label)`.
    type Row<'a> = (u64, Option<f64>, Option<f64>, u32, &'a str);

    fn walk(spec: &ScaleSpec, start: u32, rows: &[Row<'_>]) {
        let base = Instant::now();
        let mut st = PolicyState::default();
        let mut current = start;
        for &(t, backlog, inflight, want, label) in rows {
            let d = decide(
                &obs(backlog, inflight, current),
                spec,
                &mut st,
                base + Duration::from_secs(t),
            );
            if let Some(n) = d.replicas {
                current = n;
            }
            assert_eq!(
                (current, d.reason.label()),
                (want, label),
                "t={t}s backlog {backlog:?} inflight {inflight:?}: {}",
                d.reason
            );
        }
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
