//! Cold-start telemetry of `ebb autoscaler`: for every scale from zero,
//! work seen → scale patched → first replica ready, against the Kubernetes
//! API double, which sets `readyReplicas` a fixed delay after a change of
//! `spec.replicas` (`KubeApi::auto_ready`).

use std::time::Duration;

use crate::autoscaler_stub::MetricsStub;
use crate::support::{ChildGuard, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;

const READY_AFTER: Duration = Duration::from_millis(700);

pub(crate) fn autoscaler(
    api: &KubeApi,
    dir: &std::path::Path,
    admin: u16,
    extra: &[&str],
) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--no-leader-election"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig(dir));
    ChildGuard::spawn("autoscaler", &mut cmd)
}

pub(crate) async fn metrics_text(admin: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub(crate) async fn wait_ready(admin: u16) {
    within(Duration::from_secs(20), "autoscaler ready", async {
        loop {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{admin}/_/ready")).await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until the sample `name` reads `want`; returns the metrics text.
pub(crate) async fn sample_becomes(admin: u16, name: &str, want: f64) -> String {
    within(
        Duration::from_secs(20),
        &format!("{name} = {want}"),
        async {
            loop {
                let text = metrics_text(admin).await;
                if sample(&text, name) == Some(want) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await
}

/// A wake-up and a poll that sees work each scale a function from zero; the
/// first replica is ready 700 ms after the patch. Both cold starts are timed
/// from the work seen and from the patch to the first ready replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_starts_are_timed_until_the_first_replica_is_ready() {
    let api = KubeApi::start();
    api.auto_ready(Some(READY_AFTER));
    let stub = MetricsStub::start();
    stub.set_gauge("/metrics", "queue_depth", 3.0);
    let dir = tempfile::tempdir().unwrap();
    // No input the autoscaler reads: only a wake-up scales it.
    api.apply_deployment(
        "default",
        "sleepy",
        &[("ebb.io/topics", "cold.sleepy")],
        &[],
        0,
    );
    // Work seen by the poll.
    api.apply_deployment(
        "default",
        "lazy",
        &[
            ("ebb.io/prometheus-url", &stub.url("/metrics")),
            ("ebb.io/prometheus-metric", "queue_depth"),
        ],
        &[],
        0,
    );
    let admin = free_port();
    let _a = autoscaler(&api, dir.path(), admin, &["--interval", "200ms"]);
    wait_ready(admin).await;

    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin}/wake/default/sleepy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let text = sample_becomes(
        admin,
        "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"wakeup\"}",
        1.0,
    )
    .await;
    let text = if sample(
        &text,
        "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"poll\"}",
    ) == Some(1.0)
    {
        text
    } else {
        sample_becomes(
            admin,
            "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"poll\"}",
            1.0,
        )
        .await
    };
    assert_eq!(api.replicas("default", "sleepy"), Some(1));
    assert!(api.replicas("default", "lazy").is_some_and(|r| r >= 1));
    let ready_after = READY_AFTER.as_secs_f64();
    for trigger in ["wakeup", "poll"] {
        let total = sample(
            &text,
            &format!("ebb_autoscaler_wake_to_ready_seconds_sum{{trigger=\"{trigger}\"}}"),
        )
        .unwrap();
        let kube = sample(
            &text,
            &format!("ebb_autoscaler_patch_to_ready_seconds_sum{{trigger=\"{trigger}\"}}"),
        )
        .unwrap();
        assert!(
            kube >= ready_after - 0.05 && kube < ready_after + 2.0,
            "{trigger}: patch → ready {kube} s"
        );
        assert!(
            total >= kube && total < kube + 2.0,
            "{trigger}: work seen → ready {total} s, patch → ready {kube} s"
        );
    }
    assert_eq!(
        sample(&text, "ebb_autoscaler_wake_to_patch_seconds_count"),
        Some(1.0)
    );
    // A second wake-up of a running function is not a cold start.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin}/wake/default/sleepy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(READY_AFTER * 2).await;
    let text = metrics_text(admin).await;
    assert_eq!(
        sample(
            &text,
            "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"wakeup\"}"
        ),
        Some(1.0)
    );
}

/// No replica ever becomes ready: after `--cold-start-timeout` the cold
/// start counts as a timeout and is not observed as ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_that_never_gets_ready_times_out() {
    let api = KubeApi::start();
    let dir = tempfile::tempdir().unwrap();
    api.apply_deployment(
        "default",
        "stuck",
        &[("ebb.io/topics", "cold.stuck")],
        &[],
        0,
    );
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        admin,
        &["--interval", "1h", "--cold-start-timeout", "1s"],
    );
    wait_ready(admin).await;
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin}/wake/default/stuck"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let text = sample_becomes(
        admin,
        "ebb_autoscaler_cold_start_timeouts_total{trigger=\"wakeup\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"wakeup\"}"
        ),
        None,
        "{text}"
    );
    // Ready late: still not observed as a cold start.
    api.set_ready_replicas("default", "stuck", 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics_text(admin).await;
    assert_eq!(
        sample(
            &text,
            "ebb_autoscaler_wake_to_ready_seconds_count{trigger=\"wakeup\"}"
        ),
        None
    );
}
