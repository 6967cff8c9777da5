//! `ebb autoscaler` with Prometheus scrape inputs served by a stub endpoint,
//! against the Kubernetes API double: bounded concurrency across functions
//! within one poll, and scrape credentials.

use std::time::Duration;

use crate::autoscaler_stub::MetricsStub;
use crate::support::{ChildGuard, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;

fn autoscaler(api: &KubeApi, dir: &std::path::Path, admin: u16, extra: &[&str]) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--no-leader-election"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig(dir));
    ChildGuard::spawn("autoscaler", &mut cmd)
}

/// A Deployment scaled by the series `queue_depth` at `url`, target 10.
fn prometheus_function(api: &KubeApi, name: &str, url: &str, replicas: i32) {
    api.apply_deployment(
        "default",
        name,
        &[
            ("ebb.io/prometheus-url", url),
            ("ebb.io/prometheus-metric", "queue_depth"),
            ("ebb.io/target", "10"),
            ("ebb.io/max-replicas", "20"),
        ],
        &[],
        replicas,
    );
}

async fn metrics_text(admin: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The value of the sample `name` (a full series, labels included).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls observed (count) and their mean duration.
async fn polls(admin: u16) -> (f64, f64) {
    let text = metrics_text(admin).await.unwrap_or_default();
    let count = sample(&text, "ebb_autoscaler_poll_duration_seconds_count").unwrap_or(0.0);
    let sum = sample(&text, "ebb_autoscaler_poll_duration_seconds_sum").unwrap_or(0.0);
    (count, if count > 0.0 { sum / count } else { 0.0 })
}

/// Eight functions behind a scrape endpoint that takes 1 s to answer: all
/// eight are read at once, so a poll takes about one delay (sequential
/// reads would take eight), and each function still gets its own count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_poll_reads_every_function_at_once() {
    const N: usize = 8;
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_delay(Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    for i in 0..N {
        let path = format!("/metrics/f{i}");
        // f{i} asks for i + 1 replicas.
        stub.set_gauge(&path, "queue_depth", 10.0 * (i as f64 + 1.0));
        prometheus_function(&api, &format!("f{i}"), &stub.url(&path), 1);
    }
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        admin,
        &["--interval", "100ms", "--scaler-timeout", "5s"],
    );
    within(Duration::from_secs(20), "every function scaled", async {
        loop {
            let done =
                (0..N).all(|i| api.replicas("default", &format!("f{i}")) == Some(i as i64 + 1));
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within(Duration::from_secs(20), "two polls done", async {
        while polls(admin).await.0 < 2.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (count, mean) = polls(admin).await;
    assert!(
        mean < 2.5,
        "{count} polls took {mean:.2} s on average: reads are not concurrent"
    );
    assert_eq!(stub.max_inflight(), N, "all {N} reads at once");
    for i in 0..N {
        assert_eq!(
            api.replicas("default", &format!("f{i}")),
            Some(i as i64 + 1),
            "f{i}"
        );
    }
}

/// `--max-concurrent-reads 3`: never more than three reads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_reads_bounds_the_reads_of_a_poll() {
    const N: usize = 8;
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    for i in 0..N {
        let path = format!("/metrics/f{i}");
        stub.set_gauge(&path, "queue_depth", 30.0);
        prometheus_function(&api, &format!("f{i}"), &stub.url(&path), 1);
    }
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        admin,
        &["--interval", "100ms", "--max-concurrent-reads", "3"],
    );
    within(
        Duration::from_secs(20),
        "every function scaled to 3",
        async {
            while !(0..N).all(|i| api.replicas("default", &format!("f{i}")) == Some(3)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let max = stub.max_inflight();
    assert!((2..=3).contains(&max), "{max} reads at once");
    // A poll of 8 reads 3 at a time takes three rounds of 300 ms.
    let (_, mean) = polls(admin).await;
    assert!(
        mean >= 0.85,
        "a poll took {mean:.2} s: more than 3 at once?"
    );
}

/// `--prometheus-bearer-token-file`: the scrape carries the token (the stub
/// answers 401 without it, which would hold the count at 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_carries_the_bearer_token_from_its_file() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.require_bearer(Some("s3cret"));
    stub.set_gauge("/metrics", "queue_depth", 30.0);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    prometheus_function(&api, "guarded", &stub.url("/metrics"), 1);
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        admin,
        &[
            "--interval",
            "100ms",
            "--prometheus-bearer-token-file",
            token.to_str().unwrap(),
        ],
    );
    within(Duration::from_secs(20), "guarded scaled to 3", async {
        while api.replicas("default", "guarded") != Some(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let seen = stub.authorizations();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| a.as_deref() == Some("Bearer s3cret")),
        "{seen:?}"
    );
}

/// The same through the environment, with basic auth: `EBB_PROMETHEUS_USER`
/// and `EBB_PROMETHEUS_PASSWORD_FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_comes_from_the_environment() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_gauge("/metrics", "queue_depth", 20.0);
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "pa55\n").unwrap();
    prometheus_function(&api, "basic", &stub.url("/metrics"), 1);
    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--no-leader-election"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--interval", "100ms"])
        .env("KUBECONFIG", api.kubeconfig(dir.path()))
        .env("EBB_PROMETHEUS_USER", "ops")
        .env("EBB_PROMETHEUS_PASSWORD_FILE", &password);
    let _a = ChildGuard::spawn("autoscaler", &mut cmd);
    within(Duration::from_secs(20), "basic scaled to 2", async {
        while api.replicas("default", "basic") != Some(2) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // base64("ops:pa55")
    assert_eq!(
        stub.authorizations().first().cloned().flatten().as_deref(),
        Some("Basic b3BzOnBhNTU=")
    );
}

/// Runs `ebb autoscaler ARGS` and expects a config error (exit 2) whose
/// output contains every one of `needles`.
async fn config_error(args: &[&str], needles: &[&str]) {
    let api = KubeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--no-leader-election"])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env("KUBECONFIG", api.kubeconfig(dir.path()));
    let mut child = ChildGuard::spawn("autoscaler", &mut cmd);
    let status = child.wait(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let output = child.output();
    assert_eq!(status.code(), Some(2), "{args:?}: {output}");
    for needle in needles {
        assert!(
            output.contains(needle),
            "{args:?}: {needle:?} not in {output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unreadable_credential_file_is_a_config_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-token");
    let missing = missing.to_str().unwrap();
    config_error(
        &["--prometheus-bearer-token-file", missing],
        &["--prometheus-bearer-token-file", missing],
    )
    .await;
    // A directory cannot be read as a file.
    let unreadable = dir.path().to_str().unwrap();
    config_error(
        &[
            "--prometheus-user",
            "ops",
            "--prometheus-password-file",
            unreadable,
        ],
        &["--prometheus-password-file", unreadable],
    )
    .await;
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    config_error(
        &["--prometheus-bearer-token-file", empty.to_str().unwrap()],
        &["--prometheus-bearer-token-file", "empty"],
    )
    .await;
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    config_error(
        &["--prometheus-ca-file", not_pem.to_str().unwrap()],
        &["--prometheus-ca-file", "ca.pem"],
    )
    .await;
    config_error(
        &[
            "--amqp",
            "amqp://guest:guest@127.0.0.1:1/%2F",
            "--amqp-management",
            "http://127.0.0.1:1",
            "--amqp-management-bearer-token-file",
            missing,
        ],
        &["--amqp-management-bearer-token-file", missing],
    )
    .await;
    // clap: a user without its password file.
    config_error(
        &["--prometheus-user", "ops"],
        &["--prometheus-password-file"],
    )
    .await;
}

/// `--amqp-management-bearer-token-file`: the management API request carries
/// the token instead of the AMQP URL's user (the stub plays the API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_gets_the_bearer_token_from_its_file() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.require_bearer(Some("mgmt-token"));
    stub.set(
        "/api/queues/%2F/ebb-default-rabbit",
        r#"{"name":"ebb-default-rabbit","messages_ready":25,"messages_unacknowledged":5}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "mgmt-token").unwrap();
    api.apply_deployment(
        "default",
        "rabbit",
        &[
            ("ebb.io/topics", "orders"),
            ("ebb.io/target", "10"),
            ("ebb.io/max-replicas", "20"),
        ],
        &[],
        1,
    );
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        admin,
        &[
            "--interval",
            "100ms",
            "--amqp",
            "amqp://nobody:wrong@127.0.0.1:1/%2F",
            "--amqp-management",
            &stub.url(""),
            "--amqp-management-bearer-token-file",
            token.to_str().unwrap(),
        ],
    );
    // 25 ready + 5 unacked = 30, target 10.
    within(Duration::from_secs(20), "rabbit scaled to 3", async {
        while api.replicas("default", "rabbit") != Some(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        stub.authorizations()
            .iter()
            .all(|a| a.as_deref() == Some("Bearer mgmt-token")),
        "{:?}",
        stub.authorizations()
    );
}
