//! The retry policy: what to do after a failed call. Pure: the caller gives
//! the randomness, so every branch is testable.

use std::time::Duration;

/// Why a call failed, as far as the retry policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The function answered with this status.
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The call did not finish within the function's timeout.
    Timeout,
    /// The connection broke or could not be made.
    Connection,
    /// No replica took the call for the whole hold timeout.
    HoldTimeout,
}

impl Failure {
    /// Whether another attempt might succeed: 408, 429, 5xx, timeouts and
    /// connection errors are worth retrying; other 4xx are the event's fault.
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..=599).contains(status)
            }
            Failure::Timeout | Failure::Connection | Failure::HoldTimeout => true,
        }
    }

    /// The `ebb-dead-letter-reason` for an event that will not be retried.
    pub fn reason(&self) -> String {
        match self {
            Failure::Status { status, .. } => format!("status {status}"),
            Failure::Timeout => "timeout".into(),
            Failure::Connection => "connection error".into(),
            Failure::HoldTimeout => "no ready replica within the hold timeout".into(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Backoff settings: delay before retry n is uniformly random in
/// `[0, min(cap, base × 2^(n-1))]` ("full jitter"), and never shorter than a
/// `Retry-After` the function asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(60),
        }
    }
}

/// What to do with the event after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Call again after this delay.
    Retry(Duration),
    /// Give up: publish to the dead-letter destination with this reason.
    DeadLetter(String),
}

/// Decides after attempt `attempt` (1-based) of at most `max_attempts` failed.
/// `random` is any uniformly random `u64`.
pub fn next(
    attempt: u32,
    max_attempts: u32,
    failure: &Failure,
    backoff: Backoff,
    random: u64,
) -> Next {
    if !failure.retryable() {
        return Next::DeadLetter(failure.reason());
    }
    if attempt >= max_attempts {
        return Next::DeadLetter(format!(
            "attempts exhausted ({attempt} of {max_attempts}, last: {})",
            failure.reason()
        ));
    }
    let ceiling = backoff_ceiling(attempt, backoff);
    let jittered = jitter(ceiling, random);
    let delay = match failure {
        Failure::Status {
            retry_after: Some(ra),
            ..
        } => jittered.max(*ra).min(backoff.cap.max(*ra)),
        _ => jittered,
    };
    Next::Retry(delay)
}

/// `min(cap, base × 2^(attempt-1))`, without overflow.
fn backoff_ceiling(attempt: u32, b: Backoff) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    b.base
        .checked_mul(1u32 << exp.min(31))
        .map_or(b.cap, |d| d.min(b.cap))
}

fn jitter(ceiling: Duration, random: u64) -> Duration {
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Scale rather than take a remainder: `random` spans [0, u64::MAX]
    // uniformly, so the delay spans [0, ceiling] uniformly.
    Duration::from_nanos((u128::from(nanos) * u128::from(random) / u128::from(u64::MAX)) as u64)
}

/// Parses a `Retry-After` header: delay-seconds, or an HTTP date relative to `now`.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - now;
    Some(
        delta
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(24 * 3600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(10),
    };

    fn status(s: u16) -> Failure {
        Failure::Status {
            status: s,
            retry_after: None,
        }
    }

    fn status_after(s: u16, retry_after: Duration) -> Failure {
        Failure::Status {
            status: s,
            retry_after: Some(retry_after),
        }
    }

    fn retry_ms(ms: u64) -> Next {
        Next::Retry(Duration::from_millis(ms))
    }

    fn dead(reason: &str) -> Next {
        Next::DeadLetter(reason.into())
    }

    #[test]
    fn table() {
        let max = u64::MAX;
        // (attempt, max attempts, failure, randomness, next)
        let rows: Vec<(u32, u32, Failure, u64, Next)> = vec![
            // Retryable failures back off with the attempt number.
            (1, 5, status(500), max, retry_ms(100)),
            (2, 5, status(503), max, retry_ms(200)),
            (3, 5, status(502), max, retry_ms(400)),
            (1, 5, status(408), max, retry_ms(100)),
            (1, 5, status(429), max, retry_ms(100)),
            (1, 5, Failure::Timeout, max, retry_ms(100)),
            (1, 5, Failure::Connection, max, retry_ms(100)),
            (1, 5, Failure::HoldTimeout, max, retry_ms(100)),
            // Full jitter: zero randomness, zero delay.
            (3, 5, status(500), 0, Next::Retry(Duration::ZERO)),
            // Capped.
            (
                20,
                50,
                status(500),
                max,
                Next::Retry(Duration::from_secs(10)),
            ),
            // Other 4xx: dead letter at once, whatever the budget.
            (1, 5, status(400), max, dead("status 400")),
            (1, 5, status(404), max, dead("status 404")),
            (1, 5, status(422), max, dead("status 422")),
            // Budget spent.
            (
                5,
                5,
                status(500),
                max,
                dead("attempts exhausted (5 of 5, last: status 500)"),
            ),
            (
                1,
                1,
                Failure::Timeout,
                max,
                dead("attempts exhausted (1 of 1, last: timeout)"),
            ),
        ];
        for (attempt, max_attempts, failure, random, want) in rows {
            assert_eq!(
                next(attempt, max_attempts, &failure, B, random),
                want,
                "attempt {attempt}/{max_attempts} after {failure:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let f = status_after(429, Duration::from_secs(1));
        for random in [0, 1, 12345, u64::MAX] {
            let Next::Retry(d) = next(1, 5, &f, B, random) else {
                panic!("429 must retry");
            };
            assert!(d >= Duration::from_secs(1), "{d:?}");
        }
        // A Retry-After beyond the cap is still honoured.
        let f = status_after(503, Duration::from_secs(30));
        assert_eq!(next(1, 5, &f, B, 0), Next::Retry(Duration::from_secs(30)));
    }

    #[test]
    fn retry_after_header_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    proptest! {
        #[test]
        fn delay_is_bounded(attempt in 1u32..100, random: u64, base_ms in 1u64..5_000, cap_ms in 1u64..600_000) {
            let b = Backoff { base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms) };
            match next(attempt, u32::MAX, &status(500), b, random) {
                Next::Retry(d) => {
                    prop_assert!(d <= b.cap);
                    let ceiling = b.base.saturating_mul(1u32 << (attempt - 1).min(31)).min(b.cap);
                    prop_assert!(d <= ceiling);
                }
                Next::DeadLetter(r) => prop_assert!(false, "dead letter {}", r),
            }
        }

        #[test]
        fn never_retries_past_the_budget(attempt in 1u32..50, max in 1u32..50, s in 100u16..600) {
            let n = next(attempt, max, &status(s), B, 7);
            if attempt >= max {
                prop_assert!(matches!(n, Next::DeadLetter(_)));
            }
        }
    }
}
