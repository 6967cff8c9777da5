//! `ebb autoscaler` as a process against the Kubernetes API double and a real
//! nats-server: JetStream backlog in, scale patches out.

use std::time::Duration;

use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};
use async_nats::jetstream::{self, consumer, stream};
use ebb_kube_double::KubeApi;
use futures::StreamExt;
use tokio::time::Instant;

/// The stream and durable consumer the NATS connector would create.
async fn connector_objects(js: &jetstream::Context, topic: &str, durable: &str) {
    let s = js
        .create_or_update_stream(stream::Config {
            name: "EBB".into(),
            subjects: vec![topic.into()],
            retention: stream::RetentionPolicy::Interest,
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = s;
    js.get_stream("EBB")
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some(durable.into()),
            filter_subjects: vec![topic.into()],
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn autoscaler(
    api: &KubeApi,
    dir: &std::path::Path,
    nats: &str,
    admin: u16,
    extra: &[&str],
) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--nats", nats])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig(dir));
    ChildGuard::spawn("autoscaler", &mut cmd)
}

async fn replicas_become(api: &KubeApi, name: &str, want: i64, limit: Duration) -> Duration {
    let start = Instant::now();
    within(limit, &format!("{name} scaled to {want}"), async {
        while api.replicas("default", name) != Some(want) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_scales_up_stays_for_the_window_then_idles_to_zero() {
    let api = KubeApi::start();
    // Pods become ready 100 ms after each scale, as a Deployment's would:
    // the policy waits for starting replicas before asking for more.
    api.auto_ready(Some(Duration::from_millis(100)));
    let nats = NatsServer::start_local().await;
    let dir = tempfile::tempdir().unwrap();
    api.apply_deployment(
        "default",
        "work",
        &[
            ("ebb.io/topics", "auto.work"),
            ("ebb.io/target", "20"),
            ("ebb.io/max-replicas", "8"),
            ("ebb.io/scale-down-window", "3s"),
            ("ebb.io/scale-to-zero-after", "5s"),
        ],
        &[],
        1,
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    connector_objects(&js, "auto.work", "ebb-default-work").await;
    for i in 0..200 {
        js.publish("auto.work", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        nats.url(),
        admin,
        &["--interval", "200ms", "--no-leader-election"],
    );
    // 200 / 20 = 10, clamped to max 8; from 1 the rate cap allows +4, then ×2.
    replicas_become(&api, "work", 8, Duration::from_secs(20)).await;
    let patches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/deployments/work/scale"))
        .collect();
    assert!(!patches.is_empty());
    for p in &patches {
        let body = p.json();
        assert!(body["spec"]["replicas"].is_number(), "{body}");
    }

    // Drain the backlog.
    let consumer: consumer::PullConsumer = js
        .get_stream("EBB")
        .await
        .unwrap()
        .get_consumer("ebb-default-work")
        .await
        .unwrap();
    let mut acked = 0;
    while acked < 200 {
        let mut batch = consumer.fetch().max_messages(100).messages().await.unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap().double_ack().await.unwrap();
            acked += 1;
        }
    }
    let drained = Instant::now();
    // Stays up for the stabilization window, then steps down, then zero
    // once idle for scale-to-zero-after.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        api.replicas("default", "work"),
        Some(8),
        "stepped down inside the window"
    );
    replicas_become(&api, "work", 0, Duration::from_secs(20)).await;
    let idle_for = drained.elapsed();
    assert!(
        idle_for >= Duration::from_secs(5),
        "to zero after only {idle_for:?}"
    );
    let events = api.events();
    assert!(
        events
            .iter()
            .any(|e| e.object_name == "work" && e.reason == "Scaled"),
        "no Scaled event: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_cannot_be_read_never_scales_to_zero() {
    let api = KubeApi::start();
    let nats = NatsServer::start_local().await;
    let dir = tempfile::tempdir().unwrap();
    // No stream, no consumer: the backlog is unknown, not zero.
    api.apply_deployment(
        "default",
        "blind",
        &[
            ("ebb.io/topics", "auto.blind"),
            ("ebb.io/scale-to-zero-after", "1s"),
            ("ebb.io/scale-down-window", "1s"),
        ],
        &[],
        3,
    );
    let admin = free_port();
    let a = autoscaler(
        &api,
        dir.path(),
        nats.url(),
        admin,
        &["--interval", "100ms", "--no-leader-election"],
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(api.replicas("default", "blind"), Some(3));
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "ebb_autoscaler_scaler_errors_total{function=\"default/blind\",scaler=\"nats\""
        ),
        "{metrics}"
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_patches_to_one_without_waiting_for_a_poll() {
    let api = KubeApi::start();
    let nats = NatsServer::start_local().await;
    let dir = tempfile::tempdir().unwrap();
    api.apply_deployment(
        "default",
        "sleepy",
        &[("ebb.io/topics", "auto.sleepy")],
        &[],
        0,
    );
    let admin = free_port();
    let _a = autoscaler(
        &api,
        dir.path(),
        nats.url(),
        admin,
        &["--interval", "1h", "--no-leader-election"],
    );
    let client = reqwest::Client::new();
    within(Duration::from_secs(10), "autoscaler ready", async {
        loop {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{admin}/_/ready"))
                .send()
                .await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let started = Instant::now();
    let r = client
        .post(format!("http://127.0.0.1:{admin}/wake/default/sleepy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    replicas_become(&api, "sleepy", 1, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "wake took {:?}",
        started.elapsed()
    );
    // Idempotent: a second wake does not patch again.
    let before = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    let r = client
        .post(format!("http://127.0.0.1:{admin}/wake/default/sleepy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let after = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(before, after);
    assert_eq!(api.replicas("default", "sleepy"), Some(1));
}
