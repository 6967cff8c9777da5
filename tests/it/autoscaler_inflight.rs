//! `ebb autoscaler --worker-inflight`: the workers' in-flight calls
//! (`ebb_worker_inflight` of real `ebb worker` processes) summed over a
//! function's ready pods, as one more input; pods come from the Kubernetes
//! API double, each pointing at a worker on 127.0.0.1.

use std::time::Duration;

use crate::autoscaler_stub::MetricsStub;
use crate::support::{ChildGuard, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;

/// `ebb worker` on a free loopback port whose handler blocks until `gate`
/// exists.
async fn gated_worker(gate: &std::path::Path) -> (ChildGuard, u16) {
    let port = free_port();
    let script = format!(
        "cat >/dev/null; while [ ! -e '{}' ]; do sleep 0.02; done; echo done",
        gate.display()
    );
    let mut cmd = ebb_command();
    cmd.args(["worker", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--", "sh", "-c", &script]);
    let worker = ChildGuard::spawn("worker", &mut cmd);
    within(Duration::from_secs(20), "worker healthy", async {
        loop {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/_/health")).await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (worker, port)
}

/// Starts `n` calls to the worker on `port` (they block on the gate) and
/// waits until it reports them in flight.
async fn calls_in_flight(port: u16, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let calls = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let _ = reqwest::Client::new()
                    .post(format!("http://127.0.0.1:{port}/"))
                    .body("x")
                    .send()
                    .await;
            })
        })
        .collect();
    within(Duration::from_secs(10), "calls in flight", async {
        while inflight_of(port).await != Some(n as f64) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    calls
}

async fn inflight_of(port: u16) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    sample(&text, "ebb_worker_inflight")
}

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn metrics_text(admin: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A Deployment (pod label `app: NAME`) scaled by a Prometheus series that
/// reads 0, target 1, so the in-flight input decides.
fn function(api: &KubeApi, stub: &MetricsStub, name: &str, extra: &[(&str, &str)], replicas: i32) {
    let url = stub.url("/zero");
    let mut annotations = vec![
        ("ebb.io/prometheus-url", url.as_str()),
        ("ebb.io/prometheus-metric", "queue_depth"),
        ("ebb.io/target", "1"),
        ("ebb.io/max-replicas", "10"),
    ];
    annotations.extend_from_slice(extra);
    api.apply_deployment("default", name, &annotations, &[], replicas);
}

fn autoscaler(api: &KubeApi, dir: &std::path::Path, admin: u16, extra: &[&str]) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--no-leader-election"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--interval", "100ms", "--worker-inflight"])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig(dir));
    ChildGuard::spawn("autoscaler", &mut cmd)
}

async fn replicas_become(api: &KubeApi, name: &str, want: i64, limit: Duration) {
    within(limit, &format!("{name} scaled to {want}"), async {
        while api.replicas("default", name) != Some(want) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Two ready pods with 2 and 1 calls in flight: 3 in flight, target 1 → 3
/// replicas. A pod that is not ready (its port is closed) and a pod of
/// another workload are not counted. Once the calls finish, the count steps
/// down again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_of_ready_pods_scale_the_function() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_gauge("/zero", "queue_depth", 0.0);
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let (_wa, pa) = gated_worker(&gate).await;
    let (_wb, pb) = gated_worker(&gate).await;
    let calls_a = calls_in_flight(pa, 2).await;
    let calls_b = calls_in_flight(pb, 1).await;

    function(
        &api,
        &stub,
        "busy",
        &[("ebb.io/scale-down-window", "1s")],
        1,
    );
    api.set_ready_replicas("default", "busy", 2);
    let app = [("app", "busy")];
    let ip = Some("127.0.0.1");
    // Its port is named `http`.
    api.apply_pod("default", "busy-a", &app, ip, &[("http", pa)], true);
    // No `http` port: --worker-port.
    api.apply_pod("default", "busy-b", &app, ip, &[("admin", 1)], true);
    api.apply_pod(
        "default",
        "busy-c",
        &app,
        ip,
        &[("http", free_port())],
        false,
    );
    api.apply_pod(
        "default",
        "other-a",
        &[("app", "other")],
        ip,
        &[("http", pa)],
        true,
    );

    let admin = free_port();
    let _a = autoscaler(&api, dir.path(), admin, &["--worker-port", &pb.to_string()]);
    replicas_become(&api, "busy", 3, Duration::from_secs(20)).await;
    let text = metrics_text(admin).await;
    assert_eq!(
        sample(
            &text,
            "ebb_autoscaler_metric_value{function=\"default/busy\",input=\"inflight\"}"
        ),
        Some(3.0),
        "{text}"
    );
    let pod_lists: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces/default/pods")
        .collect();
    assert!(!pod_lists.is_empty());
    assert!(
        pod_lists
            .iter()
            .all(|r| r.param("labelSelector").as_deref() == Some("app=busy")),
        "{pod_lists:?}"
    );

    std::fs::write(&gate, "").unwrap();
    for call in calls_a.into_iter().chain(calls_b) {
        call.await.unwrap();
    }
    // 0 in flight: down after the 1 s window (to 1: scale-to-zero-after is
    // the default 5 min).
    replicas_become(&api, "busy", 1, Duration::from_secs(20)).await;
}

/// No ready pods means 0 in flight, not unknown: both a workload whose
/// status has no ready replicas and one whose only pod is not ready idle to
/// zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_pods_is_zero_in_flight() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_gauge("/zero", "queue_depth", 0.0);
    let dir = tempfile::tempdir().unwrap();
    let idle = [
        ("ebb.io/scale-down-window", "1s"),
        ("ebb.io/scale-to-zero-after", "1s"),
    ];
    function(&api, &stub, "asleep", &idle, 1);
    function(&api, &stub, "starting", &idle, 1);
    api.set_ready_replicas("default", "starting", 1);
    api.apply_pod(
        "default",
        "starting-a",
        &[("app", "starting")],
        Some("127.0.0.1"),
        &[("http", free_port())],
        false,
    );
    let admin = free_port();
    let _a = autoscaler(&api, dir.path(), admin, &[]);
    replicas_become(&api, "asleep", 0, Duration::from_secs(20)).await;
    replicas_become(&api, "starting", 0, Duration::from_secs(20)).await;
    let text = metrics_text(admin).await;
    assert!(
        !text.contains("scaler=\"inflight\""),
        "no in-flight errors expected: {text}"
    );
}

/// A ready pod that cannot be scraped makes in-flight unknown: the function
/// holds its count instead of idling to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_be_scraped_holds_the_count() {
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    stub.set_gauge("/zero", "queue_depth", 0.0);
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let (_w, port) = gated_worker(&gate).await;
    function(
        &api,
        &stub,
        "broken",
        &[
            ("ebb.io/scale-down-window", "1s"),
            ("ebb.io/scale-to-zero-after", "1s"),
        ],
        2,
    );
    api.set_ready_replicas("default", "broken", 2);
    let app = [("app", "broken")];
    let ip = Some("127.0.0.1");
    api.apply_pod("default", "broken-a", &app, ip, &[("http", port)], true);
    api.apply_pod(
        "default",
        "broken-b",
        &app,
        ip,
        &[("http", free_port())],
        true,
    );
    let admin = free_port();
    let _a = autoscaler(&api, dir.path(), admin, &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(api.replicas("default", "broken"), Some(2));
    let text = metrics_text(admin).await;
    assert!(
        text.contains(
            "ebb_autoscaler_scaler_errors_total{function=\"default/broken\",scaler=\"inflight\""
        ),
        "{text}"
    );
    // The pod goes away: in flight is readable again (0), and the function
    // idles to zero.
    assert!(api.delete_pod("default", "broken-b"));
    replicas_become(&api, "broken", 0, Duration::from_secs(20)).await;
}
