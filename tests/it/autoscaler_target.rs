//! The Kubernetes scale target ([`ebb_autoscaler::target::KubeTarget`])
//! against the in-process API double: merge patches of the scale
//! subresource, retries, RBAC errors, wake-up from zero and HPA detection.

use std::collections::HashSet;
use std::time::Duration;

use ebb_autoscaler::target::{
    HPA_CONFLICT_REASON, KubeTarget, SCALED_REASON, SetOutcome, TargetError, WakeOutcome,
    WorkloadKind, WorkloadRef,
};
use ebb_kube_double::{KubeApi, Match};
use serde_json::json;

const NS: &str = "shop";

fn target(api: &KubeApi) -> KubeTarget {
    let client = api.client();
    let recorder = ebb_kube::Recorder::with_instance(client.clone(), "ebb-autoscaler", "test");
    KubeTarget::new(client, Some(recorder)).with_retries(4, Duration::from_millis(20))
}

fn scale_patches(api: &KubeApi, path: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == path && r.fault.is_none())
        .count()
}

#[tokio::test]
async fn set_patches_the_scale_and_writes_an_event() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "echo", &[], &[], 0);
    let target = target(&api);
    let w = WorkloadRef::deployment(NS, "echo");

    let outcome = target.set(&w, 0, 8, "backlog 80, target 10").await;
    assert_eq!(outcome.expect("set"), SetOutcome::Scaled { from: 0, to: 8 });
    assert_eq!(api.replicas(NS, "echo"), Some(8));

    let patch = api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path == w.scale_path())
        .expect("a scale PATCH");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(patch.json(), json!({"spec": {"replicas": 8}}));

    let events = api.events();
    let scaled: Vec<_> = events
        .iter()
        .filter(|e| e.reason == SCALED_REASON)
        .collect();
    assert_eq!(scaled.len(), 1, "{events:?}");
    assert_eq!(scaled[0].type_, "Normal");
    assert_eq!(
        scaled[0].message,
        "scaled from 0 to 8: backlog 80, target 10"
    );
    assert_eq!(
        (
            scaled[0].object_kind.as_str(),
            scaled[0].object_name.as_str()
        ),
        ("Deployment", "echo")
    );
    assert!(
        scaled[0].raw["involvedObject"]["uid"].is_string(),
        "the Event carries the workload's uid: {}",
        scaled[0].raw
    );

    // Unchanged: no second PATCH, no second Event.
    let again = target.set(&w, 8, 8, "steady").await.expect("set");
    assert_eq!(again, SetOutcome::Unchanged { replicas: 8 });
    assert_eq!(scale_patches(&api, &w.scale_path()), 1);
    assert_eq!(
        api.events()
            .iter()
            .filter(|e| e.reason == SCALED_REASON)
            .count(),
        1
    );
}

#[tokio::test]
async fn set_retries_a_conflict_and_a_server_error() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "echo", &[], &[], 2);
    let target = target(&api);
    let w = WorkloadRef::deployment(NS, "echo");

    api.fail_next(1, 409, Match::path(w.scale_path()).method("PATCH"));
    let outcome = target.set(&w, 2, 5, "more work").await.expect("set");
    assert_eq!(outcome, SetOutcome::Scaled { from: 2, to: 5 });
    assert_eq!(api.replicas(NS, "echo"), Some(5));
    let gets = api
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == w.scale_path())
        .count();
    assert_eq!(gets, 2, "the scale is re-read after the 409");

    api.fail_next(1, 500, Match::path(w.scale_path()).method("PATCH"));
    let outcome = target.set(&w, 5, 3, "less work").await.expect("set");
    assert_eq!(outcome, SetOutcome::Scaled { from: 5, to: 3 });
    assert_eq!(api.replicas(NS, "echo"), Some(3));
}

#[tokio::test]
async fn retries_are_bounded() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "echo", &[], &[], 1);
    let target = target(&api);
    let w = WorkloadRef::deployment(NS, "echo");

    api.fail_next(100, 409, Match::path(w.scale_path()).method("PATCH"));
    let err = target.set(&w, 1, 4, "r").await.expect_err("conflicts");
    assert!(
        matches!(err, TargetError::Conflict { attempts: 4, .. }),
        "{err}"
    );
    assert_eq!(err.metric_label(), "scale_conflict");
    assert_eq!(scale_patches(&api, &w.scale_path()), 0);
    assert_eq!(
        api.requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path == w.scale_path())
            .count(),
        4
    );
}

#[tokio::test]
async fn forbidden_names_the_missing_permission() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "echo", &[], &[], 1);
    let target = target(&api);
    let w = WorkloadRef::deployment(NS, "echo");

    api.fail_next(5, 403, Match::path(w.scale_path()).method("PATCH"));
    let err = target.set(&w, 1, 4, "r").await.expect_err("forbidden");
    assert_eq!(err.metric_label(), "scale_forbidden");
    let text = err.to_string();
    assert!(
        text.contains("`patch` on `deployments/scale` in API group `apps`"),
        "{text}"
    );
    assert!(text.contains(NS), "{text}");
    let patches = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == w.scale_path())
        .count();
    assert_eq!(patches, 1, "a 403 is not retried");
    assert_eq!(api.replicas(NS, "echo"), Some(1));
}

#[tokio::test]
async fn a_missing_workload_is_a_clear_error() {
    let api = KubeApi::start();
    let target = target(&api);
    let w = WorkloadRef::deployment(NS, "gone");
    let err = target.set(&w, 0, 1, "r").await.expect_err("not found");
    assert_eq!(err.metric_label(), "scale_not_found");
    assert!(err.to_string().contains("Deployment shop/gone"), "{err}");
    let err = target.wake(&w, 1).await.expect_err("not found");
    assert_eq!(err.metric_label(), "scale_not_found");
}

#[tokio::test]
async fn wake_scales_up_from_zero_only() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "idle", &[], &[], 0);
    api.apply_deployment(NS, "busy", &[], &[], 2);
    let target = target(&api);

    let idle = WorkloadRef::deployment(NS, "idle");
    let rv = api.deployment(NS, "idle").expect("idle")["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    assert_eq!(
        target.wake(&idle, 1).await.expect("wake"),
        WakeOutcome::Woken { to: 1 }
    );
    assert_eq!(api.replicas(NS, "idle"), Some(1));
    let patch = api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path == idle.scale_path())
        .expect("a scale PATCH");
    assert_eq!(
        patch.json(),
        json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": 1}})
    );
    // Idempotent.
    assert_eq!(
        target.wake(&idle, 1).await.expect("wake"),
        WakeOutcome::AlreadyUp { replicas: 1 }
    );
    assert_eq!(scale_patches(&api, &idle.scale_path()), 1);

    let busy = WorkloadRef::deployment(NS, "busy");
    assert_eq!(
        target.wake(&busy, 1).await.expect("wake"),
        WakeOutcome::AlreadyUp { replicas: 2 }
    );
    assert_eq!(api.replicas(NS, "busy"), Some(2));
    assert_eq!(scale_patches(&api, &busy.scale_path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wakes_patch_once() {
    let api = KubeApi::start();
    let target = target(&api);
    for i in 0..10 {
        let name = format!("fn-{i}");
        api.apply_deployment(NS, &name, &[], &[], 0);
        let w = WorkloadRef::deployment(NS, &name);
        let (a, b) = {
            let (ta, tb) = (target.clone(), target.clone());
            let (wa, wb) = (w.clone(), w.clone());
            let a = tokio::spawn(async move { ta.wake(&wa, 1).await });
            let b = tokio::spawn(async move { tb.wake(&wb, 1).await });
            (
                a.await.expect("join").expect("wake a"),
                b.await.expect("join").expect("wake b"),
            )
        };
        assert_eq!((a.replicas(), b.replicas()), (1, 1), "both report up");
        let woken = [a, b]
            .iter()
            .filter(|o| matches!(o, WakeOutcome::Woken { .. }))
            .count();
        assert_eq!(woken, 1, "exactly one wake patched: {a:?} {b:?}");
        assert_eq!(api.replicas(NS, &name), Some(1));
        let deployment = api.deployment(NS, &name).expect("deployment");
        assert_eq!(
            deployment["metadata"]["generation"],
            json!(2),
            "one spec change"
        );
    }
}

#[tokio::test]
async fn statefulsets_use_their_scale_path() {
    let api = KubeApi::start();
    api.apply_statefulset(NS, "db", &[], &[], 0);
    let target = target(&api);
    let w = WorkloadRef::statefulset(NS, "db");
    assert_eq!(
        w.scale_path(),
        "/apis/apps/v1/namespaces/shop/statefulsets/db/scale"
    );
    assert_eq!(target.get(&w).await.expect("get").replicas, 0);
    assert_eq!(
        target.wake(&w, 2).await.expect("wake"),
        WakeOutcome::Woken { to: 2 }
    );
    assert_eq!(
        target.set(&w, 2, 3, "r").await.expect("set"),
        SetOutcome::Scaled { from: 2, to: 3 }
    );
    let replicas = api.statefulset(NS, "db").expect("sts")["spec"]["replicas"].clone();
    assert_eq!(replicas, json!(3));
    assert!(
        api.events()
            .iter()
            .any(|e| e.object_kind == "StatefulSet" && e.message == "scaled from 2 to 3: r")
    );
}

#[tokio::test]
async fn workloads_targeted_by_an_hpa_are_detected_and_warned_once() {
    let api = KubeApi::start();
    api.apply_deployment(NS, "echo", &[], &[], 1);
    let hpa = |name: &str, kind: &str, target: &str| {
        json!({
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
                "minReplicas": 1,
                "maxReplicas": 5,
            },
        })
    };
    api.put_object(hpa("echo-hpa", "Deployment", "echo"));
    api.put_object(hpa("db-hpa", "StatefulSet", "db"));
    let mut other = hpa("elsewhere", "Deployment", "other");
    other["metadata"]["namespace"] = json!("elsewhere");
    api.put_object(other);
    let target = target(&api);

    let targets = target.hpa_targets(NS).await.expect("hpa list");
    let want: HashSet<_> = [
        (WorkloadKind::Deployment, "echo".to_owned()),
        (WorkloadKind::StatefulSet, "db".to_owned()),
    ]
    .into();
    assert_eq!(targets, want);
    assert!(api.requests().iter().any(|r| r.method == "GET"
        && r.path == "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers"));

    let w = WorkloadRef::deployment(NS, "echo");
    assert!(target.warn_hpa(&w).await);
    assert!(!target.warn_hpa(&w).await);
    let warnings: Vec<_> = api
        .events()
        .into_iter()
        .filter(|e| e.reason == HPA_CONFLICT_REASON)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].type_, "Warning");
    assert_eq!(warnings[0].object_name, "echo");
    assert_eq!(warnings[0].count, 1);

    // A forbidden list names the permission.
    api.fail_next(
        1,
        403,
        Match::path("/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers"),
    );
    let err = target.hpa_targets(NS).await.expect_err("forbidden");
    assert!(
        err.to_string()
            .contains("`list` on `horizontalpodautoscalers` in API group `autoscaling`"),
        "{err}"
    );
}
