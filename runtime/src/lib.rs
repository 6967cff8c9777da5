//! Process plumbing shared by every long-running ebb process: the shutdown
//! signal, logging set-up, flag parsers and the Prometheus text encoder.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::Duration;

use prometheus_client::registry::Registry;

mod metrics;
#[doc(hidden)]
pub use metrics::help;

/// Resolves on the first SIGTERM or SIGINT.
///
/// Kubernetes sends SIGTERM when it stops a pod; people press Ctrl-C. Both
/// mean "stop taking work, finish what you have, exit".
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            }
        }
        (term, int) => {
            // Installing a handler only fails when the runtime has no signal
            // driver; fall back to Ctrl-C so the process can still be stopped.
            tracing::warn!(
                term_ok = term.is_ok(),
                int_ok = int.is_ok(),
                "signal handlers unavailable; only Ctrl-C stops this process"
            );
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Pauses between tries of something that keeps failing (a connection, a
/// set-up, a read): `base`, doubling up to `cap`, back to `base` after a
/// success. The one back-off of ebb's reconnect and retry loops; a delivery's
/// retries have their own jittered policy.
#[derive(Debug, Clone)]
pub struct Retrying {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Retrying {
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            next: base,
        }
    }

    /// The pause before the next try; the one after it is twice as long (up to the cap).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next.min(self.cap);
        self.next = pause.saturating_mul(2).min(self.cap);
        pause
    }

    /// The last try worked: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

/// Installs the global tracing subscriber writing to stderr.
///
/// The filter comes from `RUST_LOG` (or `EBB_LOG`), defaulting to `info`.
pub fn init_tracing(format: LogFormat) {
    init_tracing_to(format, std::io::stderr);
}

/// As [`init_tracing`], writing to `writer` (`ebb dev` keeps log lines
/// above its live table).
pub fn init_tracing_to<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("EBB_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into pipes and files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    // A second initialisation (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A URL without its password (`scheme://user:***@host/…`), for logs and
/// error messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &url[scheme_end..scheme_end + at];
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    format!(
        "{}{user}:***{}",
        &url[..scheme_end],
        &url[scheme_end + at..]
    )
}

/// Parses a duration flag: `30s`, `500ms`, `5m`, `1h30m`, or a bare number of
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("expected a duration such as 30s, 500ms or 5m, got an empty value".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("expected a duration such as 30s, 500ms or 5m, got `{t}` ({e})"))
}

/// Parses a byte size flag: `1048576`, `512KiB`, `6MiB`, `1GiB` (also `k`, `M`, `KB`…, all
/// binary multiples).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a size such as 1048576, 512KiB or 6MiB, got `{t}`"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{t}`: use B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{t}` is too large"))
}

/// Encodes a registry in the Prometheus text format (OpenMetrics flavour).
pub fn encode_metrics(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The content type of [`encode_metrics`] output.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    #[test]
    fn retrying_doubles_to_the_cap_and_starts_over_after_a_reset() {
        use std::time::Duration;
        let mut r = super::Retrying::new(Duration::from_millis(100), Duration::from_millis(500));
        let pauses: Vec<u128> = (0..5).map(|_| r.next_pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 500, 500]);
        r.reset();
        assert_eq!(r.next_pause(), Duration::from_millis(100));
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/v"),
            "amqp://guest:***@127.0.0.1:5672/v"
        );
        assert_eq!(redact_url("amqp://127.0.0.1/v"), "amqp://127.0.0.1/v");
        assert_eq!(
            redact_url("amqp://host/a@b"),
            "amqp://host/a@b",
            "an @ in the path is not a user"
        );
        assert_eq!(redact_url("amqp://u:p@ss@host"), "amqp://u:***@host");
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("`soon`"), "{err}");
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("6MiB"), Ok(6 << 20));
        assert_eq!(parse_bytes("512k"), Ok(512 << 10));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("parsecs"));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }

    #[test]
    fn log_format() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
