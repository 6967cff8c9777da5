//! Exact-request checks against a `tower-test` mock API server: which paths
//! discovery lists and watches, and what the Recorder writes.

use std::sync::Arc;
use std::time::Duration;

use ebb_model::Catalog;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{self, SendResponse};

use crate::{Discovery, Recorder, first_catalog};

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (Client, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// One request as the API server saw it.
#[derive(Debug)]
struct Seen {
    method: Method,
    /// Path and query, exactly as sent.
    uri: String,
    content_type: Option<String>,
    body: Value,
}

async fn next_request(handle: &mut Handle) -> (Seen, SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("timed out waiting for a request")
        .expect("client dropped the service");
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.expect("request body").to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    let seen = Seen {
        method: parts.method,
        uri: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    };
    (seen, send)
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("serialize response");
    let response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .expect("response");
    send.send_response(response);
}

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
    let (client, mut handle) = mock_client();
    let recorder = Recorder::with_instance(client.clone(), "ebb-test", "ebb-test-0");
    let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
    let discovery = tokio::spawn(Discovery::new(client).recorder(recorder).run(tx));

    let mut uris = Vec::new();
    let mut watches = Vec::new();
    let mut event = None;
    while uris.len() < 5 {
        let (seen, send) = next_request(&mut handle).await;
        uris.push((seen.method.clone(), seen.uri.clone()));
        match (seen.method.as_str(), seen.uri.as_str()) {
            ("GET", "/apis/apps/v1/deployments?&limit=500") => {
                let items = vec![
                    deployment("shop", "echo", json!({"ebb.io/topics": "orders"}), Some(2)),
                    deployment("shop", "bad", json!({"ebb.io/max-replicas": "ten"}), None),
                    deployment("shop", "plain", json!({}), None),
                ];
                respond(send, StatusCode::OK, &list("DeploymentList", "10", items));
            }
            ("GET", "/apis/apps/v1/statefulsets?&limit=500") => {
                respond(send, StatusCode::OK, &list("StatefulSetList", "11", vec![]));
            }
            ("POST", "/api/v1/namespaces/shop/events?") => {
                assert_eq!(seen.content_type.as_deref(), Some("application/json"));
                respond(send, StatusCode::CREATED, &seen.body);
                event = Some(seen.body);
            }
            // Watches stay open (unanswered) for the rest of the test.
            _ => watches.push(send),
        }
    }
    uris.sort();
    assert_eq!(
        uris,
        [
            (Method::GET, "/apis/apps/v1/deployments?&limit=500".to_owned()),
            (
                Method::GET,
                "/apis/apps/v1/deployments?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=10"
                    .to_owned()
            ),
            (Method::GET, "/apis/apps/v1/statefulsets?&limit=500".to_owned()),
            (
                Method::GET,
                "/apis/apps/v1/statefulsets?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=11"
                    .to_owned()
            ),
            (Method::POST, "/api/v1/namespaces/shop/events?".to_owned()),
        ]
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
    let quiet = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    assert!(
        quiet.is_err(),
        "unexpected request: {:?}",
        quiet.ok().flatten().map(|(r, _)| r.uri().clone())
    );
    discovery.abort();
}

#[tokio::test(start_paused = true)]
async fn discovery_in_one_namespace_retries_a_failed_list() {
    let (client, mut handle) = mock_client();
    let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
    let discovery = tokio::spawn(crate::discover(client, Some("shop".into()), tx, None));

    let mut deployment_lists = 0;
    let mut watches = Vec::new();
    let mut seen_watches = Vec::new();
    while seen_watches.len() < 2 {
        let (seen, send) = next_request(&mut handle).await;
        match seen.uri.as_str() {
            "/apis/apps/v1/namespaces/shop/deployments?&limit=500" => {
                deployment_lists += 1;
                if deployment_lists == 1 {
                    let status = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "etcd is sad",
                        "reason": "InternalError", "code": 500,
                    });
                    respond(send, StatusCode::INTERNAL_SERVER_ERROR, &status);
                } else {
                    let items = vec![deployment(
                        "shop",
                        "echo",
                        json!({"ebb.io/topics": "a"}),
                        None,
                    )];
                    respond(send, StatusCode::OK, &list("DeploymentList", "3", items));
                }
            }
            "/apis/apps/v1/namespaces/shop/statefulsets?&limit=500" => {
                respond(send, StatusCode::OK, &list("StatefulSetList", "4", vec![]));
            }
            uri => {
                seen_watches.push(uri.to_owned());
                watches.push(send);
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

#[tokio::test]
async fn recorder_aggregates_repeats_and_writes_new_messages() {
    let (client, mut handle) = mock_client();
    let recorder = Recorder::with_instance(client, "ebb-autoscaler", "as-0");
    let regarding = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        namespace: Some("shop".into()),
        name: Some("echo".into()),
        uid: Some("u1".into()),
        ..ObjectReference::default()
    };

    let publish = {
        let (recorder, regarding) = (recorder.clone(), regarding.clone());
        tokio::spawn(async move {
            recorder.warning(&regarding, "ScaleFailed", "boom").await?;
            recorder.warning(&regarding, "ScaleFailed", "boom").await?;
            recorder.warning(&regarding, "ScaleFailed", "other").await?;
            recorder
                .normal(
                    &ObjectReference {
                        namespace: None,
                        ..regarding
                    },
                    "Scaled",
                    "up",
                )
                .await
        })
    };

    let (first, send) = next_request(&mut handle).await;
    assert_eq!(
        (first.method.as_str(), first.uri.as_str()),
        ("POST", "/api/v1/namespaces/shop/events?")
    );
    assert_eq!(first.body["message"], "boom");
    let name = first.body["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    respond(send, StatusCode::CREATED, &first.body);

    let (repeat, send) = next_request(&mut handle).await;
    assert_eq!(repeat.method, Method::PATCH);
    assert_eq!(
        repeat.uri,
        format!("/api/v1/namespaces/shop/events/{name}?")
    );
    assert_eq!(
        repeat.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(repeat.body["count"], 2);
    assert!(repeat.body["lastTimestamp"].is_string());
    assert_eq!(
        repeat.body.as_object().map(|o| o.len()),
        Some(2),
        "{}",
        repeat.body
    );
    let mut patched = first.body.clone();
    patched["count"] = json!(2);
    respond(send, StatusCode::OK, &patched);

    let (other, send) = next_request(&mut handle).await;
    assert_eq!(
        (other.method.as_str(), other.uri.as_str()),
        ("POST", "/api/v1/namespaces/shop/events?")
    );
    assert_eq!(other.body["message"], "other");
    assert_eq!(other.body["count"], 1);
    respond(send, StatusCode::CREATED, &other.body);

    let (cluster, send) = next_request(&mut handle).await;
    assert_eq!(cluster.uri, "/api/v1/namespaces/default/events?");
    assert_eq!(cluster.body["type"], "Normal");
    respond(send, StatusCode::CREATED, &cluster.body);

    publish.await.expect("task").expect("published");
}

#[tokio::test]
async fn recorder_rewrites_an_expired_event_and_surfaces_refusals() {
    let (client, mut handle) = mock_client();
    let recorder = Recorder::with_instance(client, "ebb-test", "t");
    let regarding = ObjectReference {
        kind: Some("Deployment".into()),
        namespace: Some("shop".into()),
        name: Some("echo".into()),
        ..ObjectReference::default()
    };
    let publish = {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            recorder.warning(&regarding, "R", "m").await?;
            recorder.warning(&regarding, "R", "m").await?;
            recorder.warning(&regarding, "Forbidden", "m").await
        })
    };
    let (first, send) = next_request(&mut handle).await;
    respond(send, StatusCode::CREATED, &first.body);
    let (patch, send) = next_request(&mut handle).await;
    assert_eq!(patch.method, Method::PATCH);
    let not_found = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "events \"x\" not found", "reason": "NotFound", "code": 404,
    });
    respond(send, StatusCode::NOT_FOUND, &not_found);
    let (again, send) = next_request(&mut handle).await;
    assert_eq!(again.method, Method::POST);
    respond(send, StatusCode::CREATED, &again.body);
    let (refused, send) = next_request(&mut handle).await;
    assert_eq!(refused.method, Method::POST);
    let forbidden = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "events is forbidden", "reason": "Forbidden", "code": 403,
    });
    respond(send, StatusCode::FORBIDDEN, &forbidden);
    let err = publish.await.expect("task").expect_err("403 surfaces");
    assert_eq!(err.metric_label(), "kube_api");
}
