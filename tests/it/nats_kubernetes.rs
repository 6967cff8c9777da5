//! `ebb connector nats --kubernetes`: functions come from annotated
//! Deployments on the Kubernetes API (the test double in `support`), and
//! routing follows them live.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};
use async_nats::jetstream;
use ebb_kube_double::KubeApi;

/// An HTTP function that records `(path, body)` of each call.
async fn recording_function() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let calls: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let rec = calls.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let rec = rec.clone();
        async move {
            let path = req.uri().path().to_string();
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default();
            rec.lock()
                .unwrap()
                .push((path, String::from_utf8_lossy(&body).into_owned()));
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, calls)
}

async fn consumer_exists(js: &jetstream::Context, name: &str) -> bool {
    match js.get_stream("EBB").await {
        Ok(s) => s.consumer_info(name).await.is_ok(),
        Err(_) => false,
    }
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    within(Duration::from_secs(20), what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_deployments_live() {
    let api = KubeApi::start();
    let nats = NatsServer::start_local().await;
    let (base, calls) = recording_function().await;
    let dir = tempfile::tempdir().unwrap();
    let url_a = format!("{base}/a");
    api.apply_deployment(
        "shop",
        "alpha",
        &[("ebb.io/topics", "k8s.a"), ("ebb.io/url", &url_a)],
        &[],
        1,
    );
    api.set_ready_replicas("shop", "alpha", 1);
    api.apply_deployment(
        "shop",
        "broken",
        &[("ebb.io/topics", "k8s.x"), ("ebb.io/max-replicas", "ten")],
        &[],
        1,
    );
    api.apply_deployment("shop", "plain", &[], &[], 1);

    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args(["connector", "nats", "--kubernetes", "--url", nats.url()])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--retain-removed", "1s"])
        .env("KUBECONFIG", api.kubeconfig(dir.path()));
    let mut connector = ChildGuard::spawn("connector", &mut cmd);

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    wait_for("consumer of shop/alpha", async || {
        consumer_exists(&js, "ebb-shop-alpha").await
    })
    .await;
    js.publish("k8s.a", "to alpha".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("delivery to alpha", async || {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|(p, b)| p == "/a" && b == "to alpha")
    })
    .await;

    // The bad annotation is reported on its Deployment and skipped; the
    // plain Deployment is never touched.
    let events = api.events();
    let bad = events
        .iter()
        .find(|e| e.object_name == "broken")
        .unwrap_or_else(|| panic!("no Event for shop/broken: {events:?}"));
    assert_eq!(bad.type_, "Warning");
    assert_eq!(bad.reason, "InvalidConfig");
    assert!(bad.message.contains("max-replicas"), "{}", bad.message);
    assert!(!consumer_exists(&js, "ebb-shop-broken").await);
    assert!(!consumer_exists(&js, "ebb-shop-plain").await);
    assert!(events.iter().all(|e| e.object_name != "plain"));

    // A new Deployment starts receiving without a restart.
    let url_b = format!("{base}/b");
    api.apply_deployment(
        "shop",
        "beta",
        &[("ebb.io/topics", "k8s.b"), ("ebb.io/url", &url_b)],
        &[],
        1,
    );
    wait_for("consumer of shop/beta", async || {
        consumer_exists(&js, "ebb-shop-beta").await
    })
    .await;
    js.publish("k8s.b", "to beta".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("delivery to beta", async || {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|(p, b)| p == "/b" && b == "to beta")
    })
    .await;

    // A removed Deployment stops receiving: its consumer goes away once its
    // retention passed.
    assert!(api.delete_deployment("shop", "alpha"));
    wait_for("consumer of shop/alpha removed", async || {
        !consumer_exists(&js, "ebb-shop-alpha").await
    })
    .await;

    let status = connector.terminate(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "connector exited with {status}: {}",
        connector.output()
    );
}
