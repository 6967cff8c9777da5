//! Latency histogram, error tally and the run summary printed by `ebb-load`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histogram tracks exactly (one hour, in µs); larger
/// values are clamped to it.
pub const MAX_TRACKABLE_US: u64 = 3_600_000_000;

/// Latencies in microseconds, recorded in an HDR histogram with 3 significant
/// digits: values below 2048 µs are exact, larger ones are within 0.1 %.
#[derive(Clone, Debug)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Records one latency; sub-microsecond values count as 1 µs.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_us(us);
    }

    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.clamp(1, MAX_TRACKABLE_US));
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.hist
            .add(&other.hist)
            .expect("histograms with identical bounds always add");
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Nearest-rank percentile (`q` in 0..=100): the smallest recorded value
    /// such that at least `q` % of the samples are at or below it. 0 when empty.
    /// Values in the histogram's bucket are reported as the bucket's highest
    /// equivalent value (i.e. never understated).
    pub fn percentile(&self, q: f64) -> u64 {
        let rank = nearest_rank(q, self.count());
        if rank == 0 {
            return 0;
        }
        let mut seen = 0;
        for v in self.hist.iter_recorded() {
            seen += v.count_at_value();
            if seen >= rank {
                return v.value_iterated_to();
            }
        }
        self.max()
    }

    pub fn max(&self) -> u64 {
        if self.count() == 0 {
            0
        } else {
            self.hist.max()
        }
    }

    pub fn min(&self) -> u64 {
        if self.count() == 0 {
            0
        } else {
            self.hist.min()
        }
    }

    pub fn mean(&self) -> f64 {
        if self.count() == 0 {
            0.0
        } else {
            self.hist.mean()
        }
    }
}

/// The 1-based nearest rank of percentile `q` (0..=100) among `n` sorted
/// samples: `ceil(q / 100 * n)`, at least 1; 0 when `n == 0`.
///
/// Floating-point noise is discounted, so that e.g. p99.9 of 1000 samples is
/// rank 999 and not 1000 (`99.9 / 100.0 * 1000.0` is `999.0000000000001`).
pub fn nearest_rank(q: f64, n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let q = if q.is_nan() {
        100.0
    } else {
        q.clamp(0.0, 100.0)
    };
    let exact = q * n as f64 / 100.0;
    // A relative slack of 1e-12 shifts no genuine rank below n = 1e12.
    let rank = (exact - exact * 1e-12).ceil() as u64;
    rank.clamp(1, n)
}

/// Why a request did not produce a 2xx response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server answered with a non-2xx status.
    Status(u16),
    /// TCP connect or HTTP handshake failed.
    Connect,
    /// The connection failed while sending the request or reading the response.
    Io,
    /// No complete response within the per-request timeout.
    Timeout,
}

impl ErrorKind {
    pub fn key(self) -> String {
        match self {
            ErrorKind::Status(code) => format!("status_{code}"),
            ErrorKind::Connect => "connect".to_owned(),
            ErrorKind::Io => "io".to_owned(),
            ErrorKind::Timeout => "timeout".to_owned(),
        }
    }
}

/// Error counts by kind (`status_503`, `connect`, `io`, `timeout`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Errors(BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, kind: ErrorKind) {
        *self.0.entry(kind.key()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// What one connection (or the whole run, after merging) measured.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Latencies of 2xx responses only.
    pub latencies: Latencies,
    pub ok: u64,
    pub errors: Errors,
    /// TCP connections opened (during warmup too); more than `--connections`
    /// means connections were dropped and re-established.
    pub connects: u64,
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.latencies.merge(&other.latencies);
        self.ok += other.ok;
        self.errors.merge(&other.errors);
        self.connects += other.connects;
    }
}

/// The parameters a run was made with, echoed into the summary.
#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub url: String,
    pub method: String,
    pub connections: usize,
    pub body_size: usize,
    pub warmup_secs: f64,
    /// The exact command line that reproduces this run.
    pub command: String,
}

/// The result of a run. `requests` counts every request started in the
/// measured window (after warmup): `requests == ok + errors`. Throughput and
/// latency are over 2xx responses only.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub info: RunInfo,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_kinds: Errors,
    pub duration_secs: f64,
    pub requests_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub connects: u64,
}

/// `count` events over `elapsed`, per second; 0 for an empty interval.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

impl Summary {
    pub fn new(info: RunInfo, tally: &Tally, elapsed: Duration) -> Self {
        let lat = &tally.latencies;
        let errors = tally.errors.total();
        Self {
            info,
            requests: tally.ok + errors,
            ok: tally.ok,
            errors,
            error_kinds: tally.errors.clone(),
            duration_secs: elapsed.as_secs_f64(),
            requests_per_sec: rate(tally.ok, elapsed),
            p50_us: lat.percentile(50.0),
            p90_us: lat.percentile(90.0),
            p99_us: lat.percentile(99.0),
            p999_us: lat.percentile(99.9),
            max_us: lat.max(),
            min_us: lat.min(),
            mean_us: lat.mean(),
            connects: tally.connects,
        }
    }

    /// Human-readable report.
    pub fn render_text(&self) -> String {
        let i = &self.info;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "target      {} {}  body {} B, {} connections, warmup {:.3}s",
            i.method, i.url, i.body_size, i.connections, i.warmup_secs
        );
        let _ = writeln!(
            s,
            "requests    {} in {:.3}s: {} ok (2xx), {} errors",
            self.requests, self.duration_secs, self.ok, self.errors
        );
        if self.errors > 0 {
            let kinds: Vec<String> = self
                .error_kinds
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "errors      {}", kinds.join(" "));
        }
        let _ = writeln!(s, "throughput  {:.1} req/s (2xx)", self.requests_per_sec);
        let _ = writeln!(
            s,
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (min {}, mean {:.1}; 2xx only)",
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.min_us,
            self.mean_us
        );
        let _ = writeln!(s, "connects    {}", self.connects);
        let _ = writeln!(s, "rerun       {}", i.command);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: impl IntoIterator<Item = u64>) -> Latencies {
        let mut h = Latencies::new();
        for v in values {
            h.record_us(v);
        }
        h
    }

    #[test]
    fn ranks() {
        assert_eq!(nearest_rank(50.0, 0), 0);
        assert_eq!(nearest_rank(0.0, 10), 1);
        assert_eq!(nearest_rank(50.0, 10), 5);
        assert_eq!(nearest_rank(50.0, 11), 6);
        assert_eq!(nearest_rank(90.0, 10), 9);
        assert_eq!(nearest_rank(99.0, 10), 10);
        assert_eq!(nearest_rank(100.0, 10), 10);
        assert_eq!(nearest_rank(250.0, 10), 10);
        assert_eq!(nearest_rank(-1.0, 10), 1);
        assert_eq!(nearest_rank(f64::NAN, 10), 10);
        // float noise must not push exact ranks up by one
        assert_eq!(nearest_rank(99.9, 1000), 999);
        assert_eq!(nearest_rank(99.0, 1000), 990);
        assert_eq!(nearest_rank(90.0, 1000), 900);
        assert_eq!(nearest_rank(99.99, 10_000), 9999);
        assert_eq!(nearest_rank(99.9, 1_000_000_000), 999_000_000);
        assert_eq!(nearest_rank(99.9, 1001), 1000);
        for n in 1..2000u64 {
            for q in [50.0, 90.0, 99.0, 99.9] {
                let r = nearest_rank(q, n);
                // r is the smallest rank with r / n >= q / 100 (checked in integers, q * 10 exact)
                let q10 = (q * 10.0).round() as u64;
                assert!(r * 1000 >= q10 * n, "q={q} n={n} r={r}");
                assert!(r == 1 || (r - 1) * 1000 < q10 * n, "q={q} n={n} r={r}");
            }
        }
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let h = Latencies::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(50.0), 0);
        assert_eq!(h.percentile(99.0), 0);
        assert_eq!(h.max(), 0);
        assert_eq!(h.min(), 0);
        assert_eq!(h.mean(), 0.0);
    }

    #[test]
    fn nearest_rank_percentiles_exact_below_2048us() {
        // 1..=1000 shuffled order must not matter.
        let h = hist((1..=1000).rev());
        assert_eq!(h.count(), 1000);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(50.0), 500);
        assert_eq!(h.percentile(90.0), 900);
        assert_eq!(h.percentile(99.0), 990);
        assert_eq!(h.percentile(99.9), 999);
        assert_eq!(h.percentile(100.0), 1000);
        assert_eq!(h.max(), 1000);
        assert_eq!(h.min(), 1);
        assert!((h.mean() - 500.5).abs() < 1e-9);
    }

    #[test]
    fn percentile_rounds_rank_up() {
        // 3 samples: p50 is the 2nd (ceil(1.5)), p34 the 2nd, p33 the 1st.
        let h = hist([10, 20, 30]);
        assert_eq!(h.percentile(50.0), 20);
        assert_eq!(h.percentile(33.0), 10);
        assert_eq!(h.percentile(34.0), 20);
        assert_eq!(h.percentile(67.0), 30);
        // a single sample is every percentile
        let one = hist([42]);
        for q in [0.0, 1.0, 50.0, 99.0, 100.0] {
            assert_eq!(one.percentile(q), 42);
        }
    }

    #[test]
    fn skewed_distribution_tail() {
        // 990 fast, 10 slow: p99 still fast, p99.9 and max slow.
        let h = hist(std::iter::repeat_n(100, 990).chain(std::iter::repeat_n(1500, 10)));
        assert_eq!(h.percentile(50.0), 100);
        assert_eq!(h.percentile(99.0), 100);
        assert_eq!(h.percentile(99.1), 1500);
        assert_eq!(h.percentile(99.9), 1500);
        assert_eq!(h.max(), 1500);
    }

    #[test]
    fn large_values_within_relative_precision() {
        let h = hist([123_456, 7_654_321, 2_000_000_000]);
        for (q, want) in [(0.0, 123_456u64), (50.0, 7_654_321), (100.0, 2_000_000_000)] {
            let got = h.percentile(q) as f64;
            let err = (got - want as f64).abs() / want as f64;
            assert!(err <= 0.001, "q={q}: got {got}, want {want}");
        }
    }

    #[test]
    fn record_clamps_and_converts_durations() {
        let mut h = Latencies::new();
        h.record(Duration::from_nanos(10)); // below 1 µs → 1
        h.record(Duration::from_micros(250));
        h.record(Duration::from_secs(10 * 3600)); // above max → clamped
        assert_eq!(h.count(), 3);
        assert_eq!(h.min(), 1);
        assert_eq!(h.percentile(50.0), 250);
        let max = h.max() as f64;
        assert!((max - MAX_TRACKABLE_US as f64).abs() / (MAX_TRACKABLE_US as f64) <= 0.001);
    }

    #[test]
    fn merging_equals_recording_together() {
        let mut a = hist(1..=500);
        let b = hist(501..=1000);
        a.merge(&b);
        let all = hist(1..=1000);
        for q in [0.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            assert_eq!(a.percentile(q), all.percentile(q), "q={q}");
        }
        assert_eq!(a.count(), 1000);
    }

    #[test]
    fn errors_by_kind() {
        let mut e = Errors::default();
        e.add(ErrorKind::Status(503));
        e.add(ErrorKind::Status(503));
        e.add(ErrorKind::Status(404));
        e.add(ErrorKind::Connect);
        let mut f = Errors::default();
        f.add(ErrorKind::Io);
        f.add(ErrorKind::Timeout);
        f.add(ErrorKind::Status(503));
        e.merge(&f);
        assert_eq!(e.total(), 7);
        assert_eq!(e.get("status_503"), 3);
        assert_eq!(e.get("status_404"), 1);
        assert_eq!(e.get("connect"), 1);
        assert_eq!(e.get("io"), 1);
        assert_eq!(e.get("timeout"), 1);
        assert_eq!(e.get("status_500"), 0);
        let keys: Vec<&str> = e.iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["connect", "io", "status_404", "status_503", "timeout"]
        );
    }

    #[test]
    fn rate_math() {
        assert_eq!(rate(1000, Duration::from_secs(2)), 500.0);
        assert_eq!(rate(3, Duration::from_millis(1500)), 2.0);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
        assert_eq!(rate(0, Duration::from_secs(1)), 0.0);
    }

    fn info() -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:1/".into(),
            method: "GET".into(),
            connections: 2,
            body_size: 0,
            warmup_secs: 0.0,
            command: "ebb-load --url http://127.0.0.1:1/".into(),
        }
    }

    #[test]
    fn summary_from_merged_tallies() {
        let mut t1 = Tally::default();
        let mut t2 = Tally::default();
        for v in 1..=600 {
            t1.latencies.record_us(v);
        }
        t1.ok = 600;
        t1.connects = 1;
        t1.errors.add(ErrorKind::Status(500));
        for v in 601..=1000 {
            t2.latencies.record_us(v);
        }
        t2.ok = 400;
        t2.connects = 2;
        t2.errors.add(ErrorKind::Io);
        let mut all = Tally::default();
        all.merge(&t1);
        all.merge(&t2);

        let s = Summary::new(info(), &all, Duration::from_millis(2500));
        assert_eq!(s.requests, 1002);
        assert_eq!(s.ok, 1000);
        assert_eq!(s.errors, 2);
        assert_eq!(s.connects, 3);
        assert_eq!(s.duration_secs, 2.5);
        assert_eq!(s.requests_per_sec, 400.0);
        assert_eq!(
            (s.p50_us, s.p90_us, s.p99_us, s.p999_us),
            (500, 900, 990, 999)
        );
        assert_eq!((s.min_us, s.max_us), (1, 1000));
        assert!((s.mean_us - 500.5).abs() < 1e-9);

        let text = s.render_text();
        assert!(
            text.contains("1002 in 2.500s: 1000 ok (2xx), 2 errors"),
            "{text}"
        );
        assert!(text.contains("errors      io=1 status_500=1"), "{text}");
        assert!(text.contains("400.0 req/s"), "{text}");
        assert!(text.contains("p50 500  p90 900  p99 990"), "{text}");
        assert!(text.contains("rerun       ebb-load --url"), "{text}");

        let json: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(json["requests_per_sec"], 400.0);
        assert_eq!(json["p99_us"], 990);
        assert_eq!(json["error_kinds"]["status_500"], 1);
        assert_eq!(json["url"], "http://127.0.0.1:1/");
        assert_eq!(json["command"], "ebb-load --url http://127.0.0.1:1/");
    }

    #[test]
    fn summary_of_nothing() {
        let s = Summary::new(info(), &Tally::default(), Duration::ZERO);
        assert_eq!((s.requests, s.ok, s.errors), (0, 0, 0));
        assert_eq!(s.requests_per_sec, 0.0);
        assert_eq!((s.p50_us, s.p99_us, s.max_us), (0, 0, 0));
        assert!(!s.render_text().contains("errors      "));
    }
}
