//! What discovery lists and watches, request by request ([`Scenario`]), and
//! what the Recorder writes (against the API double, [`KubeApi`]).

use std::sync::Arc;
use std::time::Duration;

use ebb_kube_double::{KubeApi, Match, Scenario};
use ebb_model::Catalog;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
use kube::Api;
use kube::api::DeleteParams;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{Discovery, Recorder, first_catalog};

fn deployment(ns: &str, name: &str, annotations: Value, ready: Option<i32>) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "resourceVersion": "5", "annotations": annotations,
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}},
        },
        "status": {"readyReplicas": ready},
    })
}

fn list(kind: &str, resource_version: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"resourceVersion": resource_version},
        "items": items,
    })
}

#[tokio::test]
async fn discovery_lists_watches_and_reports_bad_settings_once() {
    crate::install_crypto_provider();
    let (client, mut api) = Scenario::client();
    let recorder = Recorder::with_instance(client.clone(), "ebb-test", "ebb-test-0");
    let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
    let discovery = tokio::spawn(Discovery::new(client).recorder(recorder).run(tx));

    let mut uris = Vec::new();
    let mut watches = Vec::new();
    let mut event = None;
    while uris.len() < 5 {
        let (seen, reply) = api.next().await;
        uris.push((seen.method.to_string(), seen.uri.clone()));
        match (seen.method.as_str(), seen.uri.as_str()) {
            ("GET", "/apis/apps/v1/deployments?&limit=500") => {
                let items = vec![
                    deployment("shop", "echo", json!({"ebb.io/topics": "orders"}), Some(2)),
                    deployment("shop", "bad", json!({"ebb.io/max-replicas": "ten"}), None),
                    deployment("shop", "plain", json!({}), None),
                ];
                reply.json(200, &list("DeploymentList", "10", items));
            }
            ("GET", "/apis/apps/v1/statefulsets?&limit=500") => {
                reply.json(200, &list("StatefulSetList", "11", vec![]));
            }
            ("POST", "/api/v1/namespaces/shop/events?") => {
                assert_eq!(seen.content_type.as_deref(), Some("application/json"));
                reply.json(201, &seen.body);
                event = Some(seen.body);
            }
            // Watches stay open (unanswered) for the rest of the test.
            _ => watches.push(reply),
        }
    }
    uris.sort();
    assert_eq!(
        uris,
        [
            ("GET", "/apis/apps/v1/deployments?&limit=500"),
            (
                "GET",
                "/apis/apps/v1/deployments?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=10"
            ),
            ("GET", "/apis/apps/v1/statefulsets?&limit=500"),
            (
                "GET",
                "/apis/apps/v1/statefulsets?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=11"
            ),
            ("POST", "/api/v1/namespaces/shop/events?"),
        ]
        .map(|(method, uri)| (method.to_owned(), uri.to_owned()))
    );

    let catalog = first_catalog(&mut rx).await.expect("a catalog");
    assert_eq!(catalog.functions.len(), 1);
    assert_eq!(catalog.functions[0].key(), "shop/echo");
    assert_eq!(catalog.functions[0].ready_replicas, Some(2));
    assert_eq!(catalog.errors.len(), 1);
    let message = catalog.errors[0].to_string();

    let event = event.expect("an Event");
    assert_eq!(event["apiVersion"], "v1");
    assert_eq!(event["kind"], "Event");
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert!(
        event["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("bad.")),
        "{event}"
    );
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidConfig");
    assert_eq!(event["message"], message.as_str());
    assert_eq!(event["count"], 1);
    assert_eq!(
        event["involvedObject"],
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop",
            "name": "bad", "uid": "uid-bad", "resourceVersion": "5",
        })
    );
    assert_eq!(event["source"], json!({"component": "ebb-test"}));
    assert_eq!(event["reportingComponent"], "ebb-test");
    assert_eq!(event["reportingInstance"], "ebb-test-0");
    assert!(event["firstTimestamp"].is_string() && event["lastTimestamp"].is_string());

    // No further request: the error is not reported again, nothing re-lists.
    api.quiet(Duration::from_millis(200)).await;
    discovery.abort();
}

#[tokio::test(start_paused = true)]
async fn discovery_in_one_namespace_retries_a_failed_list() {
    let (client, mut api) = Scenario::client();
    let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
    let discovery = tokio::spawn(crate::discover(client, Some("shop".into()), tx, None));

    let mut deployment_lists = 0;
    let mut watches = Vec::new();
    let mut seen_watches = Vec::new();
    while seen_watches.len() < 2 {
        let (seen, reply) = api.next().await;
        match seen.uri.as_str() {
            "/apis/apps/v1/namespaces/shop/deployments?&limit=500" => {
                deployment_lists += 1;
                if deployment_lists == 1 {
                    reply.status(500, "InternalError", "etcd is sad");
                } else {
                    let items = vec![deployment(
                        "shop",
                        "echo",
                        json!({"ebb.io/topics": "a"}),
                        None,
                    )];
                    reply.json(200, &list("DeploymentList", "3", items));
                }
            }
            "/apis/apps/v1/namespaces/shop/statefulsets?&limit=500" => {
                reply.json(200, &list("StatefulSetList", "4", vec![]));
            }
            uri => {
                seen_watches.push(uri.to_owned());
                watches.push(reply);
            }
        }
    }
    seen_watches.sort();
    assert_eq!(
        seen_watches,
        [
            "/apis/apps/v1/namespaces/shop/deployments?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=3",
            "/apis/apps/v1/namespaces/shop/statefulsets?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=4",
        ]
    );
    assert_eq!(deployment_lists, 2);
    let catalog = first_catalog(&mut rx).await.expect("a catalog");
    assert_eq!(catalog.functions.len(), 1);
    assert!(catalog.errors.is_empty());
    discovery.abort();
}

fn echo() -> ObjectReference {
    ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        namespace: Some("shop".into()),
        name: Some("echo".into()),
        uid: Some("u1".into()),
        ..ObjectReference::default()
    }
}

#[tokio::test]
async fn recorder_aggregates_repeats_and_writes_new_messages() {
    let api = KubeApi::start();
    let recorder = Recorder::with_instance(api.client(), "ebb-autoscaler", "as-0");
    recorder
        .warning(&echo(), "ScaleFailed", "boom")
        .await
        .expect("first");
    recorder
        .warning(&echo(), "ScaleFailed", "boom")
        .await
        .expect("repeat");
    recorder
        .warning(&echo(), "ScaleFailed", "other")
        .await
        .expect("new message");
    let cluster_scoped = ObjectReference {
        namespace: None,
        ..echo()
    };
    recorder
        .normal(&cluster_scoped, "Scaled", "up")
        .await
        .expect("cluster-scoped object");

    let events = api.events();
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            let e = (&e.namespace, &e.type_, &e.reason, &e.message, e.count);
            (e.0.as_str(), e.1.as_str(), e.2.as_str(), e.3.as_str(), e.4)
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("shop", "Warning", "ScaleFailed", "boom", 2),
            ("shop", "Warning", "ScaleFailed", "other", 1),
            ("default", "Normal", "Scaled", "up", 1),
        ]
    );
    let first = &events[0];
    assert_eq!(
        (first.object_kind.as_str(), first.object_name.as_str()),
        ("Deployment", "echo")
    );
    assert_eq!(first.reporter, "ebb-autoscaler");
    assert_eq!(first.raw["reportingInstance"], "as-0");

    // The repeat is a merge patch of the count and last timestamp only.
    let requests = api.requests();
    let writes: Vec<_> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    let first_path = format!("/api/v1/namespaces/shop/events/{}", first.name);
    assert_eq!(
        writes,
        [
            ("POST", "/api/v1/namespaces/shop/events"),
            ("PATCH", first_path.as_str()),
            ("POST", "/api/v1/namespaces/shop/events"),
            ("POST", "/api/v1/namespaces/default/events"),
        ]
    );
    let patch = &requests[1];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let body = patch.json();
    assert_eq!(body["count"], 2);
    assert!(body["lastTimestamp"].is_string());
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
}

#[tokio::test]
async fn recorder_rewrites_an_expired_event_and_surfaces_refusals() {
    let api = KubeApi::start();
    let recorder = Recorder::with_instance(api.client(), "ebb-test", "t");
    recorder.warning(&echo(), "R", "m").await.expect("first");

    // The Event expires on the server: the repeat's patch is 404, so the
    // Recorder writes a fresh one.
    let expired = api.events()[0].name.clone();
    let events: Api<CoreEvent> = Api::namespaced(api.client(), "shop");
    events
        .delete(&expired, &DeleteParams::default())
        .await
        .expect("delete");
    api.clear_requests();
    recorder
        .warning(&echo(), "R", "m")
        .await
        .expect("rewritten");
    let seen: Vec<_> = api
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "PATCH".to_owned(),
                format!("/api/v1/namespaces/shop/events/{expired}")
            ),
            (
                "POST".to_owned(),
                "/api/v1/namespaces/shop/events".to_owned()
            ),
        ]
    );
    let written = api.events();
    assert_eq!(written.len(), 1);
    assert_ne!(written[0].name, expired);
    assert_eq!(written[0].count, 1);

    api.fail_next(
        1,
        403,
        Match::path("/api/v1/namespaces/shop/events").method("POST"),
    );
    let err = recorder
        .warning(&echo(), "Forbidden", "m")
        .await
        .expect_err("403 surfaces");
    assert_eq!(err.metric_label(), "kube_api");
}

/// Why ebb keeps its own [`Recorder`] rather than kube-runtime's
/// `events::Recorder` (kube 5.0): that one keys a series by type, action,
/// reason and object, not by the note, and its repeat re-sends the cached
/// first Event. So within its 6 min window a new message about the same
/// object only bumps the first Event's count, and `kubectl describe` keeps
/// showing the old text: the mistake already fixed instead of the new one,
/// "scaled from 0 to 8" after a scale to 3. And a series whose Event is gone
/// (deleted, or expired by a short `--event-ttl`) fails until the series
/// ages out instead of starting a new Event. If a kube upgrade fails this
/// test, kube's Recorder may now serve (issue 12).
#[tokio::test]
async fn kube_runtime_recorder_hides_a_new_message_in_the_first_event() {
    use k8s_openapi::api::events::v1::Event as SeriesEvent;
    use kube::runtime::events::{Event, EventType, Recorder as KubeRecorder, Reporter};

    let api = KubeApi::start();
    let theirs = KubeRecorder::new(
        api.client(),
        Reporter {
            controller: "ebb-autoscaler".into(),
            instance: Some("as-0".into()),
        },
    );
    let scaled = |note: &str| Event {
        type_: EventType::Normal,
        reason: "Scaled".into(),
        note: Some(note.into()),
        action: "Scale".into(),
        secondary: None,
    };
    for note in ["scaled from 0 to 8", "scaled from 8 to 3"] {
        theirs
            .publish(&scaled(note), &echo())
            .await
            .expect("publish");
    }
    let ours = Recorder::with_instance(api.client(), "ebb-autoscaler", "as-0");
    for message in ["scaled from 0 to 8", "scaled from 8 to 3"] {
        ours.normal(&echo(), "Scaled", message)
            .await
            .expect("publish");
    }

    let events = api.events();
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.api_version.as_str(), e.message.as_str(), e.count))
        .collect();
    assert_eq!(
        summary,
        [
            // kube-runtime: one Event, the second message lost.
            ("events.k8s.io/v1", "scaled from 0 to 8", 2),
            // ebb: each message its own Event.
            ("v1", "scaled from 0 to 8", 1),
            ("v1", "scaled from 8 to 3", 1),
        ]
    );

    // Its Event is gone: the next repeat is refused, not written anew.
    let series: Api<SeriesEvent> = Api::namespaced(api.client(), "shop");
    series
        .delete(&events[0].name, &DeleteParams::default())
        .await
        .expect("delete");
    let err = theirs
        .publish(&scaled("scaled from 0 to 8"), &echo())
        .await
        .expect_err("a patch of the deleted Event");
    assert!(
        matches!(&err, kube::Error::Api(status) if status.is_not_found()),
        "{err}"
    );
}
