//! Function discovery (`ebb_kube::Discovery`) against the Kubernetes API
//! double.

use std::sync::Arc;
use std::time::Duration;

use crate::support::within;
use ebb_kube::{Discovery, Recorder, WorkloadKind, Workloads, first_catalog};
use ebb_kube_double::{KubeApi, Match};
use ebb_model::Catalog;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(10);

struct Running {
    catalog: watch::Receiver<Arc<Catalog>>,
    workloads: watch::Receiver<Arc<Workloads>>,
    task: JoinHandle<Result<(), ebb_kube::Error>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(api: &KubeApi, namespace: Option<&str>) -> Running {
    let client = api.client();
    let recorder = Recorder::with_instance(client.clone(), "ebb-test", "ebb-test-0");
    let (tx, catalog) = watch::channel(Arc::new(Catalog::default()));
    let (workloads_tx, workloads) = watch::channel(Arc::new(Workloads::new()));
    let discovery = Discovery::new(client)
        .namespace(namespace.map(str::to_owned))
        .recorder(recorder)
        .workloads(workloads_tx);
    let task = tokio::spawn(discovery.run(tx));
    Running {
        catalog,
        workloads,
        task,
    }
}

impl Running {
    async fn first(&mut self) -> Arc<Catalog> {
        within(LIMIT, "the first catalog", first_catalog(&mut self.catalog))
            .await
            .expect("discovery ended")
    }

    async fn until(&mut self, what: &str, mut f: impl FnMut(&Catalog) -> bool) -> Arc<Catalog> {
        let catalog = within(LIMIT, what, self.catalog.wait_for(|c| f(c)))
            .await
            .expect("discovery ended");
        catalog.clone()
    }
}

fn keys(catalog: &Catalog) -> Vec<String> {
    catalog
        .functions
        .iter()
        .map(|f| f.key().to_string())
        .collect()
}

const TOPICS: (&str, &str) = ("ebb.io/topics", "orders");

#[tokio::test]
async fn initial_catalog_holds_ebb_and_openfaas_functions_only() {
    let api = KubeApi::start();
    api.apply_deployment(
        "shop",
        "echo",
        &[TOPICS, ("ebb.io/max-replicas", "4")],
        &[],
        1,
    );
    api.apply_statefulset("shop", "ledger", &[("ebb.io/topics", "payments")], &[], 1);
    api.apply_deployment(
        "shop",
        "faas",
        &[("topic", "legacy")],
        &[("com.openfaas.scale.min", "2")],
        2,
    );
    api.apply_deployment(
        "shop",
        "plain",
        &[("unrelated", "x")],
        &[("app", "plain")],
        1,
    );
    api.apply_deployment("other", "far", &[TOPICS], &[], 1);
    api.set_ready_replicas("shop", "faas", 2);

    let mut running = start(&api, None);
    let catalog = running.first().await;
    assert_eq!(
        keys(&catalog),
        ["other/far", "shop/echo", "shop/faas", "shop/ledger"]
    );
    assert!(catalog.errors.is_empty(), "{:?}", catalog.errors);
    let echo = catalog.get("shop", "echo").expect("echo");
    assert_eq!(echo.spec.topics, ["orders"]);
    assert_eq!(echo.spec.max_replicas, 4);
    assert_eq!(echo.ready_replicas, Some(0));
    let faas = catalog.get("shop", "faas").expect("faas");
    assert_eq!(faas.spec.topics, ["legacy"]);
    assert_eq!(faas.spec.min_replicas, 2);
    assert_eq!(faas.ready_replicas, Some(2));

    let workloads = running.workloads.borrow().clone();
    assert_eq!(workloads["shop/ledger"].kind, WorkloadKind::StatefulSet);
    assert_eq!(workloads["shop/echo"].kind, WorkloadKind::Deployment);
    assert_eq!(workloads["shop/echo"].replicas, Some(1));
    assert!(workloads["shop/echo"].resource_version.is_some());
    assert!(!workloads.contains_key("shop/plain"));
    assert!(api.events().is_empty());
}

#[tokio::test]
async fn one_namespace_only() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    api.apply_deployment("other", "far", &[TOPICS], &[], 1);
    let mut running = start(&api, Some("shop"));
    assert_eq!(keys(&*running.first().await), ["shop/echo"]);
    let paths: Vec<String> = api.requests().into_iter().map(|r| r.path).collect();
    assert!(
        paths.contains(&"/apis/apps/v1/namespaces/shop/deployments".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/apis/apps/v1/namespaces/shop/statefulsets".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.iter().all(|p| p.contains("/namespaces/shop/")),
        "{paths:?}"
    );
}

#[tokio::test]
async fn an_empty_cluster_still_publishes_a_first_catalog() {
    let api = KubeApi::start();
    let mut running = start(&api, None);
    let catalog = running.first().await;
    assert!(catalog.functions.is_empty() && catalog.errors.is_empty());
}

#[tokio::test]
async fn nothing_is_published_before_the_initial_list_completed() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    // The StatefulSet list fails twice: the Deployment list alone must not
    // produce a catalog.
    api.fail_next(
        2,
        500,
        Match::path("/apis/apps/v1/statefulsets").not_watch(),
    );
    let mut running = start(&api, None);
    let catalog = running.first().await;
    assert_eq!(keys(&catalog), ["shop/echo"]);
    let failed = api
        .requests()
        .iter()
        .filter(|r| r.fault == Some(500))
        .count();
    assert_eq!(failed, 2);
}

#[tokio::test]
async fn live_changes_update_the_catalog() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    let mut running = start(&api, None);
    assert_eq!(keys(&*running.first().await), ["shop/echo"]);

    api.apply_deployment("shop", "added", &[TOPICS], &[], 1);
    running
        .until("the added Deployment", |c| {
            keys(c) == ["shop/added", "shop/echo"]
        })
        .await;

    api.apply_deployment(
        "shop",
        "echo",
        &[("ebb.io/topics", "orders,refunds")],
        &[],
        1,
    );
    running
        .until("echo's new topics", |c| {
            c.get("shop", "echo")
                .is_some_and(|f| f.spec.topics == ["orders", "refunds"])
        })
        .await;

    api.set_ready_replicas("shop", "echo", 3);
    running
        .until("echo's ready replicas", |c| {
            c.get("shop", "echo")
                .is_some_and(|f| f.ready_replicas == Some(3))
        })
        .await;

    // Annotations removed: no longer a function.
    api.apply_deployment("shop", "added", &[], &[], 1);
    running
        .until("added no longer a function", |c| keys(c) == ["shop/echo"])
        .await;

    assert!(api.delete_deployment("shop", "echo"));
    running
        .until("echo deleted", |c| c.functions.is_empty())
        .await;
}

#[tokio::test]
async fn unchanged_catalogs_are_not_republished() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    api.apply_deployment("shop", "plain", &[], &[], 1);
    let mut running = start(&api, None);
    running.first().await;
    // A change to a Deployment that is not a function, and a spec change
    // that does not touch the catalog.
    api.apply_deployment("shop", "plain", &[], &[], 3);
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 2);
    // Then one that does, so we know discovery has seen the others.
    api.set_ready_replicas("shop", "echo", 1);
    running
        .until("echo ready", |c| {
            c.get("shop", "echo")
                .is_some_and(|f| f.ready_replicas == Some(1))
        })
        .await;
    let changed = running.catalog.has_changed().expect("discovery running");
    assert!(!changed, "a second publication without a change");
}

#[tokio::test]
async fn a_bad_annotation_is_reported_once_and_others_keep_serving() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    api.apply_deployment(
        "shop",
        "bad",
        &[TOPICS, ("ebb.io/max-replicas", "ten")],
        &[],
        1,
    );
    let mut running = start(&api, None);
    let catalog = running.first().await;
    assert_eq!(keys(&catalog), ["shop/echo"]);
    assert_eq!(catalog.errors.len(), 1);
    let error = &catalog.errors[0];
    assert_eq!(error.function(), Some("shop/bad"));
    assert_eq!(error.key(), Some("ebb.io/max-replicas"));
    let message = error.to_string();

    let events = api
        .until(LIMIT, "the InvalidConfig Event", |api| {
            let events = api.events();
            (!events.is_empty()).then_some(events)
        })
        .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!(event.api_version, "v1");
    assert_eq!(event.type_, "Warning");
    assert_eq!(event.reason, "InvalidConfig");
    assert_eq!(event.message, message);
    assert_eq!(
        (
            event.object_kind.as_str(),
            event.object_namespace.as_str(),
            event.object_name.as_str()
        ),
        ("Deployment", "shop", "bad")
    );
    assert_eq!(event.namespace, "shop");
    assert_eq!(event.reporter, "ebb-test");
    assert_eq!(event.count, 1);

    // Status updates, a dropped watch and a full re-list do not report it again.
    api.set_ready_replicas("shop", "bad", 1);
    api.close_watches();
    api.compact();
    api.close_watches();
    api.apply_deployment("shop", "later", &[TOPICS], &[], 1);
    running
        .until("the later Deployment", |c| {
            keys(c) == ["shop/echo", "shop/later"]
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.events().len(), 1, "{:#?}", api.events());
    let posts = api
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .count();
    assert_eq!(posts, 1);

    // A different mistake on the same object is a new Event.
    api.apply_deployment("shop", "bad", &[TOPICS, ("ebb.io/target", "lots")], &[], 1);
    running
        .until("the new error", |c| {
            c.errors.iter().any(|e| e.key() == Some("ebb.io/target"))
        })
        .await;
    let events = api
        .until(LIMIT, "a second Event", |api| {
            let events = api.events();
            (events.len() == 2).then_some(events)
        })
        .await;
    assert!(
        events[1].message.contains("ebb.io/target"),
        "{:?}",
        events[1]
    );

    // Fixed: it joins the catalog and the error goes.
    api.apply_deployment("shop", "bad", &[TOPICS], &[], 1);
    let catalog = running
        .until("bad fixed", |c| {
            c.errors.is_empty() && c.get("shop", "bad").is_some()
        })
        .await;
    assert_eq!(keys(&catalog), ["shop/bad", "shop/echo", "shop/later"]);
}

#[tokio::test]
async fn a_failing_watch_is_retried_and_changes_are_not_lost() {
    let api = KubeApi::start();
    api.apply_deployment("shop", "echo", &[TOPICS], &[], 1);
    let mut running = start(&api, None);
    running.first().await;

    // The next Deployment watch fails with 500; the watcher backs off and
    // resumes from its resourceVersion, so a change made meanwhile arrives.
    api.fail_next(1, 500, Match::path("/apis/apps/v1/deployments").watch());
    api.close_watches();
    api.apply_deployment("shop", "during", &[TOPICS], &[], 1);
    running
        .until("the Deployment added during the outage", |c| {
            keys(c) == ["shop/during", "shop/echo"]
        })
        .await;
    let requests = api.requests();
    let failed: Vec<_> = requests.iter().filter(|r| r.fault.is_some()).collect();
    assert_eq!(failed.len(), 1, "{requests:#?}");
    assert!(failed[0].is_watch());
    let failed_at = requests
        .iter()
        .position(|r| r.fault.is_some())
        .unwrap_or_default();
    let resumed = requests[failed_at..]
        .iter()
        .any(|r| r.path == "/apis/apps/v1/deployments" && r.is_watch() && r.fault.is_none());
    assert!(resumed, "{requests:#?}");

    // 410 Expired: the watcher re-lists and still sees deletions made meanwhile.
    api.compact();
    api.fail_next(1, 403, Match::path("/apis/apps/v1/deployments").not_watch());
    api.close_watches();
    assert!(api.delete_deployment("shop", "during"));
    running
        .until("the deletion after a re-list", |c| keys(c) == ["shop/echo"])
        .await;
    assert!(!running.task.is_finished());
}
