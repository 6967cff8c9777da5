//! The double's own contract, through kube's client: scale subresource,
//! conflicts, Leases, Events, faults, watches, kubeconfig; and a scenario.

use std::future::IntoFuture;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event as CoreEvent;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::{KubeApi, Match, Scenario};

const LIMIT: Duration = Duration::from_secs(10);
const TOPICS: (&str, &str) = ("ebb.io/topics", "orders");

async fn within<T>(limit: Duration, what: &str, fut: impl IntoFuture<Output = T>) -> T {
    tokio::time::timeout(limit, fut.into_future())
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

#[tokio::test]
async fn scale_subresource_with_resource_version_guard() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 0);
    let client = api.client();
    let deployments: Api<Deployment> = Api::namespaced(client, "shop");

    let scale = deployments.get_scale("echo").await.expect("get scale");
    assert_eq!(scale.spec.as_ref().and_then(|s| s.replicas), Some(0));
    let version = scale
        .metadata
        .resource_version
        .clone()
        .expect("resourceVersion");

    let rv: String = deployments
        .get("echo")
        .await
        .expect("get")
        .metadata
        .resource_version
        .expect("rv");
    let mut watch = Box::pin(
        deployments
            .watch(&WatchParams::default().timeout(10), &rv)
            .await
            .expect("watch"),
    );

    let patch = json!({"metadata": {"resourceVersion": version}, "spec": {"replicas": 1}});
    let scaled = deployments
        .patch_scale("echo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch scale");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(1));
    assert_eq!(api.replicas("shop", "echo"), Some(1));
    let new_version: u64 = scaled
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .expect("numeric resourceVersion");
    assert!(new_version > version.parse::<u64>().expect("numeric"));

    let event = within(LIMIT, "MODIFIED", watch.next())
        .await
        .expect("an event")
        .expect("ok");
    match event {
        WatchEvent::Modified(d) => {
            assert_eq!(d.spec.and_then(|s| s.replicas), Some(1));
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // The same guarded patch again: stale now.
    let err = deployments
        .patch_scale("echo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("stale resourceVersion");
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409);
            assert_eq!(status.reason, "Conflict");
        }
        other => panic!("expected a Status, got {other:?}"),
    }
    // An unchanged count is no write.
    let before = api.resource_version();
    deployments
        .patch_scale(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("no-op patch");
    assert_eq!(api.resource_version(), before);

    let missing = deployments.get_scale("nope").await.expect_err("404");
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"));

    let patches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(
        patches[0].path,
        "/apis/apps/v1/namespaces/shop/deployments/echo/scale"
    );
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(patches[0].json()["spec"]["replicas"], 1);
}

#[tokio::test]
async fn auto_ready_follows_the_replica_count() {
    let api = KubeApi::start();
    api.auto_ready(Some(Duration::from_millis(20)));
    api.apply_statefulset("shop", "ledger", &[TOPICS], &[], 0);
    let client = api.client();
    let statefulsets: Api<StatefulSet> = Api::namespaced(client, "shop");
    statefulsets
        .patch_scale(
            "ledger",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("patch scale");
    api.until(LIMIT, "two ready replicas", |api| {
        let ready = api.statefulset("shop", "ledger")?["status"]["readyReplicas"].as_i64();
        (ready == Some(2)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn leases_faults_and_kubeconfig() {
    let api = KubeApi::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = api.kubeconfig(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kubeconfig usable");
    assert_eq!(config.default_namespace, "default");
    crate::install_crypto_provider();
    let client = kube::Client::try_from(config).expect("client from kubeconfig");
    let leases: Api<Lease> = Api::default_namespaced(client);

    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "ebb-autoscaler"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect_err("exists");
    assert!(matches!(again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));

    // Replace guarded by resourceVersion.
    let mut mine = created.clone();
    mine.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    let replaced = leases
        .replace("ebb-autoscaler", &PostParams::default(), &mine)
        .await
        .expect("replace");
    assert_eq!(
        replaced
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("b")
    );
    let stale = leases
        .replace("ebb-autoscaler", &PostParams::default(), &mine)
        .await
        .expect_err("stale");
    assert!(matches!(stale, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"));

    let patched = leases
        .patch(
            "ebb-autoscaler",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "c"}})),
        )
        .await
        .expect("patch");
    assert_eq!(
        patched.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("c")
    );
    assert_eq!(
        api.lease("default", "ebb-autoscaler").expect("stored")["spec"]["holderIdentity"],
        "c"
    );

    // Faults: the next matching request fails with a Status, then it is served.
    let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases/ebb-autoscaler";
    api.fail_next(1, 403, Match::path(path).method("GET"));
    api.fail_next(
        1,
        500,
        Match::prefix("/apis/coordination.k8s.io/").method("GET"),
    );
    let err = leases.get("ebb-autoscaler").await.expect_err("403");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403 && s.reason == "Forbidden"),
        "{err:?}"
    );
    let err = leases.get("ebb-autoscaler").await.expect_err("500");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 500 && s.reason == "InternalError"),
        "{err:?}"
    );
    leases.get("ebb-autoscaler").await.expect("served again");
    // kube's client retries 429, 503 and 504 by itself: a single 503 is invisible.
    api.clear_requests();
    api.fail_next(1, 503, Match::path(path));
    leases
        .get("ebb-autoscaler")
        .await
        .expect("retried by the client");
    let faults: Vec<_> = api.requests().into_iter().map(|r| r.fault).collect();
    assert_eq!(faults, [Some(503), None]);

    // Events through both APIs are recorded; first core/v1.
    let reference = kube::Resource::object_ref(&patched_lease(&api), &());
    let event: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "ebb-autoscaler.1", "namespace": "default"},
        "type": "Warning", "reason": "Elected", "message": "hello",
        "reportingComponent": "ebb-test", "count": 1,
    }))
    .expect("an Event");
    let event = CoreEvent {
        involved_object: reference,
        ..event
    };
    Api::<CoreEvent>::default_namespaced(api.client())
        .create(&PostParams::default(), &event)
        .await
        .expect("event");
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].object_kind.as_str(), events[0].reason.as_str()),
        ("Lease", "Elected")
    );
    let request = api
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/events"));
    let request = request.expect("an Event POST");
    assert_eq!(request.path, "/api/v1/namespaces/default/events");
    assert_eq!(request.json()["reason"], "Elected");
}

fn patched_lease(api: &KubeApi) -> Lease {
    serde_json::from_value(api.lease("default", "ebb-autoscaler").expect("lease")).expect("a Lease")
}

#[tokio::test]
async fn watch_bookmarks_timeout_and_events_api() {
    let api = KubeApi::start();
    api.bookmark_interval(Duration::from_millis(50));
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    let client = api.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");

    // From "0": a synthetic ADDED per object, then bookmarks, then the end
    // of the stream after timeoutSeconds.
    let params = WatchParams::default().timeout(1);
    let events: Vec<_> = within(LIMIT, "the watch to time out", async {
        deployments
            .watch(&params, "0")
            .await
            .expect("watch")
            .collect::<Vec<_>>()
            .await
    })
    .await;
    assert!(
        matches!(events.first(), Some(Ok(WatchEvent::Added(d))) if d.metadata.name.as_deref() == Some("echo"))
    );
    let bookmarks = events
        .iter()
        .filter(|e| matches!(e, Ok(WatchEvent::Bookmark(_))))
        .count();
    assert!(bookmarks >= 3, "{events:?}");

    // After compaction an old version is 410 Expired.
    api.compact();
    let mut stale = Box::pin(deployments.watch(&params, "1").await.expect("watch"));
    match within(LIMIT, "the ERROR event", stale.next()).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // kube-runtime's own Recorder writes events.k8s.io/v1 Events.
    use kube::runtime::events::{Event, EventType, Recorder as KubeRecorder, Reporter};
    let deployment = deployments.get("echo").await.expect("get");
    let recorder = KubeRecorder::new(
        client,
        Reporter {
            controller: "ebb-test".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Scaled".into(),
        note: Some("1 → 2".into()),
        action: "Scale".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &kube::Resource::object_ref(&deployment, &()))
        .await
        .expect("publish");
    let events = api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].api_version, "events.k8s.io/v1");
    assert_eq!(
        (
            events[0].reason.as_str(),
            events[0].message.as_str(),
            events[0].object_name.as_str()
        ),
        ("Scaled", "1 → 2", "echo")
    );
    assert_eq!(events[0].reporter, "ebb-test");
}

#[tokio::test]
async fn a_scenario_answers_each_request_in_order() {
    let (client, mut api) = Scenario::client();
    let leases: Api<Lease> = Api::namespaced(client, "ebb");
    let call = tokio::spawn(async move {
        let first = leases.get_opt("cron").await;
        let second = leases
            .patch(
                "cron",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"holderIdentity": "a"}})),
            )
            .await;
        (first, second)
    });

    let (seen, reply) = api.next().await;
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str(), &seen.body),
        (
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/cron",
            &serde_json::Value::Null
        )
    );
    reply.status(
        404,
        "NotFound",
        "leases.coordination.k8s.io \"cron\" not found",
    );
    let (seen, reply) = api.next().await;
    assert_eq!(
        seen.uri,
        "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/cron?"
    );
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(seen.body, json!({"spec": {"holderIdentity": "a"}}));
    reply.status(409, "Conflict", "the object has been modified");

    let (first, second) = call.await.expect("no panic");
    assert!(first.expect("a 404 is None").is_none());
    assert!(matches!(second, Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict"));
    api.closed(LIMIT).await;
}
