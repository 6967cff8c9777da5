//! The Kubernetes manifests in `deploy/kubernetes/` and
//! `examples/kubernetes/`: every container's arguments parse with the real
//! binary, and the RBAC rules allow every request the autoscaler makes
//! (recorded by the API double while it polls, scales, wakes and leads).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::support::{ChildGuard, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;
use serde::Deserialize;
use serde_norway::Value;

fn docs(path: &str) -> Vec<Value> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

/// (apiGroup, resource, verb) a role allows.
fn allowed(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        for g in rule["apiGroups"].as_sequence().unwrap() {
            for r in rule["resources"].as_sequence().unwrap() {
                for v in rule["verbs"].as_sequence().unwrap() {
                    out.insert((
                        g.as_str().unwrap().to_string(),
                        r.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// What RBAC calls a request: (apiGroup, resource[/subresource], verb).
fn rbac_of(method: &str, path: &str, query: &str) -> (String, String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => panic!("not a Kubernetes API path: {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected path {path}"),
    };
    let verb = match method {
        "GET" if named => "get",
        "GET"
            if query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1") =>
        {
            "watch"
        }
        "GET" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => panic!("unexpected method {other}"),
    };
    (group, resource, verb.to_string())
}

/// What the service account `account` may do: its ClusterRole of the same
/// name, plus the Lease Role in the namespace the Deployments pass as
/// --lease-namespace, which must be bound to it.
fn account_rules(account: &str) -> BTreeSet<(String, String, String)> {
    let manifests = docs("deploy/kubernetes/ebb.yaml");
    let find = |k: &str, n: &str| {
        manifests
            .iter()
            .find(|d| kind(d) == k && name(d) == n)
            .unwrap_or_else(|| panic!("no {k} {n}"))
            .clone()
    };
    let mut rules = allowed(&find("ClusterRole", account));
    assert!(
        find("RoleBinding", "ebb-leases")["subjects"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|s| s["name"] == account),
        "the Lease Role is not bound to {account}"
    );
    rules.extend(allowed(&find("Role", "ebb-leases")));
    rules
}

/// Every request the double recorded is allowed by `rules`; returns what
/// they needed.
fn check_requests(
    api: &KubeApi,
    rules: &BTreeSet<(String, String, String)>,
) -> BTreeSet<(String, String, String)> {
    let mut seen = BTreeSet::new();
    for r in api.requests() {
        let need = rbac_of(&r.method, &r.path, &r.query);
        assert!(
            rules.contains(&need),
            "the manifests do not allow {need:?} ({} {}?{})",
            r.method,
            r.path,
            r.query
        );
        seen.insert(need);
    }
    seen
}

#[test]
fn the_kustomize_base_lists_files_that_exist() {
    let base = &docs("deploy/kubernetes/kustomization.yaml")[0];
    let resources = base["resources"].as_sequence().unwrap();
    assert!(!resources.is_empty());
    for r in resources {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(r.as_str().unwrap());
        assert!(path.is_file(), "{}", path.display());
    }
}

#[test]
fn request_paths_map_to_rbac_rules() {
    let cases = [
        (
            "GET",
            "/apis/apps/v1/deployments",
            "watch=true&resourceVersion=3",
            ("apps", "deployments", "watch"),
        ),
        (
            "GET",
            "/apis/apps/v1/namespaces/a/deployments",
            "",
            ("apps", "deployments", "list"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/f/scale",
            "",
            ("apps", "deployments/scale", "patch"),
        ),
        (
            "POST",
            "/api/v1/namespaces/a/events",
            "",
            ("", "events", "create"),
        ),
        (
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/l",
            "",
            ("coordination.k8s.io", "leases", "get"),
        ),
        (
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/l",
            "",
            ("coordination.k8s.io", "leases", "update"),
        ),
    ];
    for (method, path, query, (g, r, v)) in cases {
        assert_eq!(
            rbac_of(method, path, query),
            (g.to_string(), r.to_string(), v.to_string()),
            "{method} {path}?{query}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_argument_list_parses() {
    let mut checked = 0;
    for file in [
        "deploy/kubernetes/ebb.yaml",
        "deploy/kubernetes/connectors/amqp.yaml",
        "deploy/kubernetes/connectors/kafka.yaml",
        "examples/kubernetes/echo.yaml",
    ] {
        for d in docs(file).iter().filter(|d| kind(d) == "Deployment") {
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .unwrap()
            {
                let mut args: Vec<String> = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                // Only loopback here: a worker listens on a free local port.
                for a in &mut args {
                    if a.starts_with("--listen=") {
                        *a = format!("--listen=127.0.0.1:{}", free_port());
                    }
                }
                let what = format!("{file} {}: ebb {}", name(d), args.join(" "));
                let mut cmd = ebb_command();
                cmd.args(&args)
                    .env("KUBECONFIG", "/nonexistent/kubeconfig")
                    .env("KUBERNETES_SERVICE_HOST", "")
                    .env("EBB_LOG", "info");
                let mut child = ChildGuard::spawn(name(d), &mut cmd);
                if args[0] == "worker" {
                    // A worker that parsed its flags serves; then stop it.
                    child
                        .wait_for_output("worker listening", Duration::from_secs(20))
                        .await;
                    assert!(
                        child.terminate(Duration::from_secs(10)).await.success(),
                        "{what}"
                    );
                } else {
                    // Without a cluster the process stops after parsing,
                    // saying it cannot reach Kubernetes, not misusing a flag.
                    let status = child.wait(Duration::from_secs(30)).await;
                    let out = child.output();
                    assert!(!status.success(), "{what}: {out}");
                    assert!(
                        !out.contains("Usage:"),
                        "{what}: a flag does not parse:\n{out}"
                    );
                    assert!(out.contains("--kubernetes"), "{what}: {out}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked, 6,
        "autoscaler, four connectors, the example function"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_role_allows_every_request_it_makes() {
    let rules = account_rules("ebb-autoscaler");

    // A function scaled by a Prometheus value, with a pod whose workers'
    // in-flight count is read.
    let api = KubeApi::start();
    api.auto_ready(Some(Duration::from_millis(50)));
    let scrape = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = scrape.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|| async {
        "# TYPE queue_depth gauge\nqueue_depth 30\n# TYPE ebb_worker_inflight gauge\nebb_worker_inflight 0\n"
    });
    tokio::spawn(async move { axum::serve(scrape, app).await.unwrap() });
    let url = format!("http://127.0.0.1:{port}/metrics");
    api.apply_deployment(
        "default",
        "work",
        &[
            ("ebb.io/prometheus-url", &url),
            ("ebb.io/prometheus-metric", "queue_depth"),
            ("ebb.io/target", "10"),
        ],
        &[],
        0,
    );
    api.apply_pod(
        "default",
        "work-1",
        &[("app", "work")],
        Some("127.0.0.1"),
        &[("http", port)],
        true,
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args(["autoscaler", "--kubernetes", "--worker-inflight"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--interval", "200ms", "--lease-namespace", "ebb"])
        .env("KUBECONFIG", api.kubeconfig(dir.path()));
    let _autoscaler = ChildGuard::spawn("autoscaler", &mut cmd);
    // 30 / 10 → 3 replicas: discovery, lease, HPA check, pods, patch, Event.
    within(Duration::from_secs(30), "work scaled to 3", async {
        while api.replicas("default", "work") != Some(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A few more polls read the pods of a running function.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let seen = check_requests(&api, &rules);
    for (g, r, v) in [
        ("apps", "deployments/scale", "patch"),
        ("autoscaling", "horizontalpodautoscalers", "list"),
        ("", "pods", "list"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "create"),
    ] {
        assert!(
            seen.contains(&(g.to_string(), r.to_string(), v.to_string())),
            "the scenario should exercise {g}/{r} {v}; saw {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_role_allows_every_request_the_cron_connector_makes() {
    let rules = account_rules("ebb-connector");

    // A function on a schedule, and one with a bad schedule (a Warning Event).
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = sink.local_addr().unwrap().port();
    let fired = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = fired.clone();
    let app = axum::Router::new().fallback(move || {
        f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "ok" }
    });
    tokio::spawn(async move { axum::serve(sink, app).await.unwrap() });
    let api = KubeApi::start();
    let url = format!("http://127.0.0.1:{port}/");
    api.apply_deployment(
        "default",
        "tick",
        &[("ebb.io/schedule", "@every 1s"), ("ebb.io/url", &url)],
        &[],
        1,
    );
    api.apply_deployment(
        "default",
        "broken",
        &[("ebb.io/schedule", "61 * * * *"), ("ebb.io/url", &url)],
        &[],
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = ebb_command();
    cmd.args([
        "connector",
        "cron",
        "--kubernetes",
        "--lease-namespace",
        "ebb",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
    .env("KUBECONFIG", api.kubeconfig(dir.path()));
    let _cron = ChildGuard::spawn("cron", &mut cmd);
    within(Duration::from_secs(30), "two fires", async {
        while fired.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let seen = check_requests(&api, &rules);
    for (g, r, v) in [
        ("apps", "deployments", "watch"),
        ("", "events", "create"),
        ("coordination.k8s.io", "leases", "create"),
        ("coordination.k8s.io", "leases", "update"),
    ] {
        assert!(
            seen.contains(&(g.to_string(), r.to_string(), v.to_string())),
            "the scenario should exercise {g}/{r} {v}; saw {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebb_deploy_renders_the_example_stack_into_workers_that_start() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = within(
        Duration::from_secs(20),
        "ebb deploy",
        ebb_command()
            .args([
                "deploy",
                "--image",
                "registry.example/shop:1",
                "--namespace",
                "shop",
            ])
            .arg(root.join("examples/stack.yaml"))
            .output(),
    )
    .await
    .expect("run ebb deploy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect();
    let deployments: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Deployment").collect();
    let services = docs.iter().filter(|d| kind(d) == "Service").count();
    assert!(!deployments.is_empty());
    assert_eq!(deployments.len(), services, "a Service per Deployment");
    for d in deployments {
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("shop"));
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"].as_str(), Some("registry.example/shop:1"));
        // The worker's arguments parse and it serves (on loopback here).
        let mut args: Vec<String> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        args[1] = format!("--listen=127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.args(&args).current_dir(root.join("examples"));
        let mut child = ChildGuard::spawn(name(d), &mut cmd);
        child
            .wait_for_output("worker listening", Duration::from_secs(20))
            .await;
        assert!(child.terminate(Duration::from_secs(10)).await.success());
    }
    // A bad stack file: exit 2, naming the file.
    let out = within(
        Duration::from_secs(20),
        "ebb deploy",
        ebb_command()
            .args(["deploy", "--image", "i"])
            .arg(root.join("nonexistent.yaml"))
            .output(),
    )
    .await
    .expect("run ebb deploy");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent.yaml"));
}
