//! Shared setup for ebb's integration tests: real brokers on 127.0.0.1 and
//! helpers to run the `ebb` binary.
//!
//! Every module of the integration test binary uses it as `crate::support`.
//!
//! | broker    | how                                                        | use an existing one  |
//! |-----------|------------------------------------------------------------|----------------------|
//! | NATS      | [`NatsServer::start`]: one `nats-server -js` per test       | `EBB_TEST_NATS_URL`  |
//! | RabbitMQ  | [`RabbitMq::shared`]: one node per test run, a vhost per test | `EBB_TEST_AMQP_URL` + `EBB_TEST_RABBITMQ_MANAGEMENT_URL` |
//! | Kafka     | [`KafkaMock::new`]: librdkafka's in-process mock cluster   | —                    |
//!
//! Binaries come from `scripts/install-test-deps`; when one is missing the
//! panic says so. Everything listens on 127.0.0.1 only, and every wait is
//! bounded.

pub mod amqp;
pub mod connector;
pub mod http;
pub mod kafka;
pub mod nats;
pub mod ports;
pub mod proc_stat;
pub mod process;
pub mod sink;

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use amqp::{RabbitMq, Vhost};
pub use kafka::KafkaMock;
pub use nats::NatsServer;
pub use ports::free_port;
pub use process::{ChildGuard, ebb_bin, ebb_command};

/// Awaits `fut` for at most `limit`, panicking with `what` on timeout.
pub async fn within<T>(limit: Duration, what: &str, fut: impl IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(limit, fut.into_future()).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A name no other test (or test process) uses: `prefix-<pid>-<n>-<random>`.
///
/// Only `[a-z0-9-]` besides the prefix, so it is valid as a NATS stream or
/// subject token, a Kafka topic, a RabbitMQ queue or vhost name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{}-{n}-{:08x}",
        std::process::id(),
        random_u64() as u32
    )
}

/// A random number from std's per-process hash seed; enough for test names.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// The workspace root (the root package `ebb` lives there).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The last `max_lines` lines of a file, for panic messages.
pub(crate) fn tail_file(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            format!(
                "--- {} (last {} lines) ---\n{}",
                path.display(),
                lines.len() - start,
                lines[start..].join("\n")
            )
        }
        Err(err) => format!("--- {}: {err} ---", path.display()),
    }
}

/// Finds an executable: `$env_var` if set, then the given candidates, then
/// `name` on `PATH`. Panics with a hint to run `scripts/install-test-deps`.
pub(crate) fn find_executable(env_var: &str, candidates: &[PathBuf], name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "{env_var}={} is not an executable file",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut looked = Vec::new();
    for path in candidates.iter().chain(on_path.iter()) {
        if is_executable(path) {
            return path.clone();
        }
        looked.push(path.display().to_string());
    }
    panic!(
        "{name} not found: run scripts/install-test-deps (or set {env_var}); looked at {}",
        looked.join(", ")
    );
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
