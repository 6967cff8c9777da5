//! What keeps `ebb autoscaler` from scaling on what it cannot see, against
//! the Kubernetes API double: a RabbitMQ passive declare that reads 0 while
//! every message is in flight, and a count decided from a resourceVersion
//! that is no longer current.

use std::time::Duration;

use ebb_kube_double::{KubeApi, Match};

use crate::autoscaler_cold_start::{autoscaler, metrics_text, sample, sample_becomes, wait_ready};
use crate::autoscaler_rabbitmq::{channel, hold, queue_with};
use crate::autoscaler_stub::MetricsStub;
use crate::support::RabbitMq;

const SCALE: &str = "/apis/apps/v1/namespaces/default/deployments/busy/scale";

/// Scale requests other than reads.
fn scale_writes(api: &KubeApi) -> Vec<ebb_kube_double::KubeRequest> {
    let requests = api.requests().into_iter();
    requests
        .filter(|r| r.path == SCALE && r.method != "GET")
        .collect()
}

/// Acceptance: a function at full capacity — its replica holds every
/// message, none is ready — read by passive declare (`--amqp`, no in-flight
/// input) is never scaled to zero.
///
/// The contract says 3 minutes at the defaults (60 s idle time). The rule
/// does not depend on how long: a zero from an input blind to calls in
/// flight never starts the idle timer, so every poll decides as the first
/// did. Here scale-to-zero-after is 2 s and the window 1 s, so 20 s covers
/// ten idle periods and twenty windows (3 minutes at the defaults covers
/// three idle periods), at five polls a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_function_read_by_passive_declare_is_never_scaled_to_zero() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (connection, publishing) = channel(&vhost).await;
    queue_with(&publishing, "held", 10).await;
    let _in_flight = hold(&connection, "held", 10).await;

    let api = KubeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let annotations = [
        ("ebb.io/topics", "busy.jobs"),
        ("ebb.io/queue", "held"),
        ("ebb.io/scale-to-zero-after", "2s"),
        ("ebb.io/scale-down-window", "1s"),
    ];
    api.apply_deployment("default", "busy", &annotations, &[], 1);
    api.set_ready_replicas("default", "busy", 1);
    let admin = crate::support::free_port();
    let flags = ["--amqp", vhost.url(), "--interval", "200ms"];
    let _a = autoscaler(&api, dir.path(), admin, &flags);
    wait_ready(admin).await;

    let in_flight_unseen =
        r#"ebb_autoscaler_decisions_total{function="default/busy",reason="in_flight_unseen"}"#;
    let mut decisions = 0.0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            api.replicas("default", "busy"),
            Some(1),
            "still one replica"
        );
        decisions = sample(&metrics_text(admin).await, in_flight_unseen).unwrap_or(0.0);
    }
    let text = metrics_text(admin).await;
    let value = r#"ebb_autoscaler_metric_value{function="default/busy",input="rabbitmq"}"#;
    assert_eq!(sample(&text, value), Some(0.0), "the queue read 0 ready");
    assert!(
        decisions >= 50.0,
        "held for calls in flight: {decisions} polls"
    );
    assert!(scale_writes(&api).is_empty(), "{:?}", scale_writes(&api));
    drop(connection);
}

/// Acceptance: a count decided from a stale resourceVersion is decided
/// again. The autoscaler's view of the Deployment is frozen at 1 replica
/// (its watch fails), someone scales it to 5, then work for 3 arrives: the
/// poll decides 1 → 3, its patch carries the old resourceVersion and the
/// API double answers 409; read again, 5 is more than 3 needs within the
/// window, so nothing is written. Unguarded, the patch would have taken
/// the 5 replicas down to 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_decided_from_a_stale_version_is_decided_again() {
    let dir = tempfile::tempdir().unwrap();
    let stub = MetricsStub::start();
    stub.set_gauge("/metrics", "queue_depth", 0.0);
    let url = stub.url("/metrics");
    let api = KubeApi::start();
    let annotations = [
        ("ebb.io/prometheus-url", url.as_str()),
        ("ebb.io/prometheus-metric", "queue_depth"),
        ("ebb.io/scale-to-zero-after", "1h"),
    ];
    api.apply_deployment("default", "busy", &annotations, &[], 1);
    api.set_ready_replicas("default", "busy", 1);
    let admin = crate::support::free_port();
    let _a = autoscaler(&api, dir.path(), admin, &["--interval", "200ms"]);
    wait_ready(admin).await;

    // Freeze the autoscaler's view, then scale behind its back.
    let watches = Match::path("/apis/apps/v1/deployments").watch();
    api.fail_next(usize::MAX, 500, watches);
    api.close_watches();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.apply_deployment("default", "busy", &annotations, &[], 5);
    api.set_ready_replicas("default", "busy", 5);
    let version = api.deployment("default", "busy").unwrap()["metadata"]["resourceVersion"].clone();
    stub.set_gauge("/metrics", "queue_depth", 30.0);

    let stale = r#"ebb_autoscaler_stale_decisions_total{function="default/busy"}"#;
    sample_becomes(admin, stale, 1.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.replicas("default", "busy"), Some(5), "not taken down");
    let writes = scale_writes(&api);
    assert!(!writes.is_empty(), "a patch was tried");
    for w in &writes {
        let body = w.json();
        assert_eq!(body["spec"]["replicas"], 3, "{body}");
        assert_ne!(
            body["metadata"]["resourceVersion"], version,
            "only stale patches: {body}"
        );
    }
    // Read again after the 409.
    let requests = api.requests();
    let first = requests
        .iter()
        .position(|r| r.path == SCALE && r.method == "PATCH");
    let reread = requests[first.unwrap()..]
        .iter()
        .any(|r| r.path == SCALE && r.method == "GET");
    assert!(reread, "the scale was read again");
    // Each poll decides from the frozen view, finds it stale, decides again.
    let text = metrics_text(admin).await;
    let decided_again = sample(&text, stale).unwrap_or(0.0);
    assert!(
        decided_again >= 1.0 && decided_again <= writes.len() as f64,
        "{decided_again}"
    );
}
