//! The schedule input: a function's `schedule` counts as work around each
//! tick, so the poll scales a scheduled function like any other — up ahead
//! of a tick (pre-warm) and down again after its fire, to zero when
//! `scale-to-zero-after` passed.
//!
//! The input reads 1 (one fire) from [`lead`] before each tick until
//! [`after_tick`] past it, else 0:
//!
//! - **lead**: the function's measured cold start (the policy's
//!   [`PolicyState::cold_start`](crate::policy::PolicyState::cold_start),
//!   from asking for a replica until it is ready; [`DEFAULT_COLD_START`]
//!   before the first measurement) plus a margin for the poll interval and
//!   the delay of seeing a replica ready, so the fire finds a ready replica
//!   instead of waiting for a wake-up. With `prewarm: false` the lead is 0:
//!   the fire wakes the function.
//! - **after the tick**: the fire still runs. With the workers' in-flight
//!   input read, that input sees the call, and [`HANDOVER`] covers the
//!   moment until it does; without it, the function's `timeout` (no call
//!   of the fire runs longer), since the schedule alone cannot tell when the
//!   fire finished.
//!
//! Pure functions over plain data: the poll gives the wall-clock time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_model::schedule::Schedule;

/// The input's name, in reasons and metrics.
pub const INPUT: &str = "schedule";

/// The cold start assumed before one is measured: a pod whose image is
/// cached is usually ready within it.
pub const DEFAULT_COLD_START: Duration = Duration::from_secs(10);

/// The smallest margin added to the cold start: a poll interval (1 s by
/// default) plus the time to see the replica ready.
pub const MIN_MARGIN: Duration = Duration::from_secs(2);

/// With the in-flight input read: how long after its tick a fire counts as
/// running before that input sees its call.
pub const HANDOVER: Duration = Duration::from_secs(5);

/// Wall-clock time for schedules: the system clock, or in tests a clock
/// that moves with tokio's.
pub type WallClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> WallClock {
    Arc::new(Utc::now)
}

/// How long before a tick the function is scaled up: `cold_start` (or
/// [`DEFAULT_COLD_START`] before one is measured) plus a quarter of it, at
/// least [`MIN_MARGIN`]; 0 when `prewarm` is off.
pub fn lead(prewarm: bool, cold_start: Option<Duration>) -> Duration {
    if !prewarm {
        return Duration::ZERO;
    }
    let cold = cold_start.unwrap_or(DEFAULT_COLD_START);
    cold + (cold / 4).max(MIN_MARGIN)
}

/// How long after its tick a fire counts as running: [`HANDOVER`] when the
/// in-flight input is read (it sees the call after), else the function's
/// call `timeout`, at least [`HANDOVER`].
pub fn after_tick(timeout: Duration, in_flight_read: bool) -> Duration {
    if in_flight_read {
        HANDOVER
    } else {
        timeout.max(HANDOVER)
    }
}

/// The schedule input at `now`: 1 when a tick falls within
/// `(now - after, now + lead]`, else 0.
pub fn demand(schedule: &Schedule, now: DateTime<Utc>, lead: Duration, after: Duration) -> f64 {
    let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let Some(from) = now.checked_sub_signed(span(after)) else {
        return 0.0;
    };
    match schedule.next_after(from) {
        Some(tick) if tick <= now + span(lead) => 1.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).expect("a valid instant")
    }

    #[test]
    fn the_lead_is_the_cold_start_and_a_margin() {
        let s = Duration::from_secs;
        let rows = [
            // (prewarm, measured cold start, lead)
            (true, None, s(10) + s(2) + Duration::from_millis(500)),
            (true, Some(s(2)), s(4)),
            (
                true,
                Some(Duration::from_millis(300)),
                Duration::from_millis(2300),
            ),
            (true, Some(s(40)), s(50)),
            (false, Some(s(2)), s(0)),
            (false, None, s(0)),
        ];
        for (prewarm, cold, want) in rows {
            assert_eq!(lead(prewarm, cold), want, "{prewarm} {cold:?}");
        }
        assert_eq!(after_tick(s(30), true), HANDOVER);
        assert_eq!(after_tick(s(30), false), s(30));
        assert_eq!(after_tick(s(1), false), HANDOVER);
    }

    /// `*/20 * * * * *` ticks at :00, :20, :40; lead 4 s, 5 s after.
    #[test]
    fn a_tick_is_work_from_the_lead_before_it_until_after_it() {
        let every_20s = Schedule::parse("*/20 * * * * *", "UTC").expect("schedule");
        let (lead, after) = (Duration::from_secs(4), Duration::from_secs(5));
        let rows = [
            // (seconds since a tick at 0, demand)
            (-30, 0.0),
            (-5, 0.0),
            (-4, 1.0),
            (-1, 1.0),
            (0, 1.0),
            (4, 1.0),
            (5, 0.0),
            (10, 0.0),
            (15, 0.0),
            (16, 1.0),
        ];
        let tick = 1_800_000_000; // a multiple of 20 s
        for (t, want) in rows {
            let got = demand(&every_20s, at(tick + t), lead, after);
            assert_eq!(got, want, "t = {t} s");
        }
        // No lead (prewarm off): work only from the tick.
        assert_eq!(demand(&every_20s, at(tick - 1), Duration::ZERO, after), 0.0);
        assert_eq!(demand(&every_20s, at(tick), Duration::ZERO, after), 1.0);
        // A schedule that never fires again is never work.
        let never = Schedule::parse("0 0 30 2 *", "UTC").expect("schedule");
        assert_eq!(demand(&never, at(tick), lead, after), 0.0);
    }
}
