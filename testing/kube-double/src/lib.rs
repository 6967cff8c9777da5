//! Test doubles of the Kubernetes API, for ebb's tests only (a
//! `[dev-dependencies]` entry, never a normal one):
//!
//! - [`KubeApi`]: an in-process HTTP API server, close enough to the real API
//!   for kube-rs and so for whole `ebb` processes pointed at it with
//!   `KUBECONFIG`;
//! - [`Scenario`]: exact-request checks, where the test answers each request
//!   of a kube [`Client`](kube::Client) by hand, in order (over `tower-test`,
//!   no socket).
//!
//! # The API server
//!
//! ```ignore
//! let api = KubeApi::start();
//! api.apply_deployment("shop", "echo", &[("ebb.io/topics", "orders")], &[], 1);
//! let client = api.client();                       // in-process, inside a tokio runtime
//! let kubeconfig = api.kubeconfig(dir.path());     // for a spawned `ebb` (KUBECONFIG=…)
//! api.fail_next(1, 500, Match::path("/apis/apps/v1/deployments").watch());
//! api.set_ready_replicas("shop", "echo", 1);
//! let events = api.events();
//! ```
//!
//! What it serves (JSON only, plain HTTP on 127.0.0.1, no auth):
//!
//! | resource | path | verbs |
//! |---|---|---|
//! | Deployments, StatefulSets | `/apis/apps/v1[/namespaces/NS]/{deployments,statefulsets}[/NAME]` | list, watch, get, create, replace, merge patch, delete |
//! | their `scale` and `status` | `…/NAME/scale`, `…/NAME/status` | get, replace, merge patch |
//! | Leases | `/apis/coordination.k8s.io/v1[/namespaces/NS]/leases[/NAME]` | as above |
//! | Events | `/api/v1[/namespaces/NS]/events`, `/apis/events.k8s.io/v1[/namespaces/NS]/events` | as above |
//! | HorizontalPodAutoscalers | `/apis/autoscaling/v2[/namespaces/NS]/horizontalpodautoscalers[/NAME]` | as above (no controller: stored only; create one with [`KubeApi::put_object`]) |
//! | Pods | `/api/v1[/namespaces/NS]/pods[/NAME]` | as above (no controller: stored only; create one with [`KubeApi::apply_pod`]) |
//! | version | `/version` | get |
//!
//! Semantics it keeps: one global, monotonically increasing
//! `resourceVersion` (set on every write, not on no-op patches); a stale
//! `metadata.resourceVersion` in a replace or patch answers 409 `Conflict`;
//! missing objects 404 `NotFound`, duplicates 409 `AlreadyExists`, each with
//! a `Status` body; writes to the main resource keep `status` and writes to
//! `status` keep the rest; `spec.replicas` defaults to 1; `generation` counts
//! spec changes. Watches replay history after `resourceVersion` (synthetic
//! `ADDED` for everything when it is absent or `0`, or with
//! `sendInitialEvents=true` plus the `k8s.io/initial-events-end` bookmark),
//! send `BOOKMARK`s when `allowWatchBookmarks=true`, and end after
//! `timeoutSeconds`; after [`KubeApi::compact`] an older version gets a 410
//! `Expired` ERROR event, as after etcd compaction. `labelSelector` (`k=v`,
//! `k!=v`, `k`, `!k`) and `fieldSelector` (`a.b=v`, `a.b!=v` on any field
//! path) filter lists and watches.
//!
//! Not modelled: pagination (`limit` is ignored: one page), JSON patch (415),
//! server-side apply (treated as a merge patch that may create), label
//! selector changes turning `MODIFIED` into `ADDED`/`DELETED`, admission,
//! RBAC, controllers (Pods are only stored, never created for a workload:
//! `readyReplicas` moves only by
//! [`KubeApi::set_ready_replicas`] or [`KubeApi::auto_ready`]).
//!
//! The server runs on its own thread and runtime, so it serves while a test
//! blocks, and stops when the [`KubeApi`] is dropped.
//!
//! Pitfall: kube's client retries 429, 503 and 504 by itself (up to 15
//! times), so an injected 503 is invisible to the code under test; inject
//! 500, 403 or 409 to make a failure reach it.

mod scenario;
mod server;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

pub use scenario::{Reply, Scenario, Seen};
use store::{Fault, Inner, ObjKey, Part, Res, Stored, normalize_event};

/// kube's client needs a rustls provider, also for plain HTTP: the one the
/// product installs (aws-lc-rs).
fn install_crypto_provider() {
    // `Err` only means a provider is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A `Status` failure body as the API server sends it, e.g.
/// `status(409, "Conflict", "the object has been modified")`.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// One request as the double received it.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string (`""` when none).
    pub query: String,
    pub content_type: Option<String>,
    /// The body, as text (lossy UTF-8).
    pub body: String,
    /// The status of an injected fault that answered it.
    pub fault: Option<u16>,
}

impl KubeRequest {
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A query parameter, URL-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        server::parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// A watch (`watch=true` or `watch=1`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }
}

/// Which requests an injected fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    method: Option<String>,
    path: String,
    prefix: bool,
    watch: Option<bool>,
}

impl Match {
    /// Requests to exactly this path (query aside), e.g.
    /// `/apis/apps/v1/namespaces/shop/deployments/echo/scale`.
    pub fn path(path: impl Into<String>) -> Self {
        Self {
            method: None,
            path: path.into(),
            prefix: false,
            watch: None,
        }
    }

    /// Requests to any path starting with this.
    pub fn prefix(path: impl Into<String>) -> Self {
        Self {
            prefix: true,
            ..Self::path(path)
        }
    }

    /// Only this HTTP method (`GET`, `PATCH`, …).
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only watches.
    pub fn watch(mut self) -> Self {
        self.watch = Some(true);
        self
    }

    /// Everything but watches (e.g. only the list on a collection path).
    pub fn not_watch(mut self) -> Self {
        self.watch = Some(false);
        self
    }

    pub(crate) fn matches(&self, method: &str, path: &str, is_watch: bool) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(&self.path)
            } else {
                path == self.path
            }
            && self.watch.is_none_or(|w| w == is_watch)
    }
}

/// An Event written through either Events API, normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeEvent {
    /// `v1` or `events.k8s.io/v1`.
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    /// `Normal` or `Warning`.
    pub type_: String,
    pub reason: String,
    /// `message` (core/v1) or `note` (events.k8s.io/v1).
    pub message: String,
    /// `involvedObject` / `regarding`: kind, namespace, name.
    pub object_kind: String,
    pub object_namespace: String,
    pub object_name: String,
    /// `reportingComponent`/`source.component` or `reportingController`.
    pub reporter: String,
    /// `count` or `series.count`, 1 when absent.
    pub count: i64,
    /// The object as stored.
    pub raw: Value,
}

/// Which workload a helper acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

impl WorkloadKind {
    fn resource(self) -> Res {
        match self {
            Self::Deployment => Res::Deployment,
            Self::StatefulSet => Res::StatefulSet,
        }
    }
}

/// The running double. Dropping it stops the server.
pub struct KubeApi {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl KubeApi {
    /// Starts the double on 127.0.0.1 on a free port. Works inside or outside
    /// a tokio runtime.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|err| panic!("kube double: cannot bind 127.0.0.1:0: {err}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("kube double: local_addr: {err}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|err| panic!("kube double: set_nonblocking: {err}"));
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("kube-double-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|err| panic!("kube double: runtime: {err}"));
                let inner = Arc::new(Inner::new(runtime.handle().clone()));
                let _ = handle_tx.send(inner.clone());
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => panic!("kube double: listener: {err}"),
                    };
                    let app = axum::Router::new()
                        .fallback(server::handle)
                        .with_state(inner);
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            if let Err(err) = result {
                                eprintln!("kube double: server stopped: {err}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime here ends every open watch stream.
            })
            .unwrap_or_else(|err| panic!("kube double: cannot spawn its thread: {err}"));
        let inner = handle_rx
            .recv()
            .unwrap_or_else(|err| panic!("kube double: thread died at start: {err}"));
        Self {
            addr,
            inner,
            shutdown: Some(shutdown_tx),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for in-process use, default namespace `default`.
    /// Call inside a tokio runtime (the client spawns a task).
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        let uri: axum::http::Uri = self
            .url()
            .parse()
            .unwrap_or_else(|err| panic!("kube double url: {err}"));
        let config = kube::Config::new(uri);
        kube::Client::try_from(config)
            .unwrap_or_else(|err| panic!("kube client for the double: {err}"))
    }

    /// Writes `DIR/kubeconfig` pointing at the double (plain HTTP, no auth,
    /// namespace `default`) and returns its path; give it to a spawned `ebb`
    /// as `KUBECONFIG`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: ebb-test\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: ebb-test\n  user: {{}}\n\
             contexts:\n\
             - name: ebb-test\n  context:\n    cluster: ebb-test\n    user: ebb-test\n    namespace: default\n\
             current-context: ebb-test\n",
            url = self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        path
    }

    // --- workloads ----------------------------------------------------------

    /// Creates or updates a Deployment with these annotations, labels and
    /// `spec.replicas` (status kept on update). Fires `ADDED`/`MODIFIED`.
    pub fn apply_deployment(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
        replicas: i32,
    ) -> Value {
        self.apply_workload(
            WorkloadKind::Deployment,
            namespace,
            name,
            annotations,
            labels,
            replicas,
        )
    }

    /// As [`Self::apply_deployment`], for a StatefulSet.
    pub fn apply_statefulset(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
        replicas: i32,
    ) -> Value {
        self.apply_workload(
            WorkloadKind::StatefulSet,
            namespace,
            name,
            annotations,
            labels,
            replicas,
        )
    }

    /// Creates or updates a workload; returns it as stored.
    pub fn apply_workload(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
        replicas: i32,
    ) -> Value {
        let res = kind.resource();
        let to_map = |kv: &[(&str, &str)]| {
            Value::Object(
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
                    .collect(),
            )
        };
        let mut object = json!({
            "apiVersion": res.api_version(),
            "kind": res.kind(),
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": to_map(annotations),
                "labels": to_map(labels),
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "function", "image": "example.org/fn:1"}]},
                },
            },
        });
        if kind == WorkloadKind::StatefulSet {
            object["spec"]["serviceName"] = json!(name);
        }
        let mut state = self.inner.lock();
        let key = ObjKey::new(res, namespace, name);
        let result = match state.objects.get(&key).map(|s| s.object.clone()) {
            Some(mut current) => {
                current["metadata"]["annotations"] = object["metadata"]["annotations"].take();
                current["metadata"]["labels"] = object["metadata"]["labels"].take();
                current["spec"] = object["spec"].take();
                state.update(&self.inner, res, namespace, name, current, Part::Main)
            }
            None => state.create(&self.inner, res, namespace, object),
        };
        match result {
            Ok(object) => object,
            Err(err) => panic!("apply {res:?} {namespace}/{name}: {err:?}"),
        }
    }

    /// Deletes a Deployment (fires `DELETED`); false when there was none.
    pub fn delete_deployment(&self, namespace: &str, name: &str) -> bool {
        self.delete(WorkloadKind::Deployment, namespace, name)
    }

    fn delete(&self, kind: WorkloadKind, namespace: &str, name: &str) -> bool {
        let mut state = self.inner.lock();
        state
            .delete(&self.inner, kind.resource(), namespace, name)
            .is_ok()
    }

    /// Sets `status.readyReplicas` (and `availableReplicas`) of the
    /// Deployment `namespace/name`, else of the StatefulSet of that name.
    /// Fires `MODIFIED` when it changed.
    pub fn set_ready_replicas(&self, namespace: &str, name: &str, ready: i32) {
        let mut state = self.inner.lock();
        let res = [Res::Deployment, Res::StatefulSet]
            .into_iter()
            .find(|res| {
                state
                    .objects
                    .contains_key(&ObjKey::new(*res, namespace, name))
            })
            .unwrap_or_else(|| panic!("set_ready_replicas: no workload {namespace}/{name}"));
        state.set_ready(&self.inner, res, namespace, name, ready);
    }

    /// When `Some(delay)`, a change of `spec.replicas` (through any API call
    /// or helper) sets `readyReplicas` to it `delay` later, like pods
    /// becoming ready; `None` (the default) leaves readiness to the test.
    pub fn auto_ready(&self, delay: Option<Duration>) {
        self.inner.lock().auto_ready = delay;
    }

    /// Creates or replaces the Pod `namespace/name` with these labels,
    /// `status.podIP` `ip` (none when `None`), a condition `Ready` that is
    /// `ready`, and one container whose ports are `ports` (`(name, port)`).
    /// Nothing runs it: the test serves its address.
    pub fn apply_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ip: Option<&str>,
        ports: &[(&str, u16)],
        ready: bool,
    ) -> Value {
        let labels: Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port_name, port)| {
                json!({"name": port_name, "containerPort": port, "protocol": "TCP"})
            })
            .collect();
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [
                {"name": "function", "image": "example.org/fn:1", "ports": ports}
            ]},
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": if ready { "True" } else { "False" }}
                ],
            },
        });
        if let Some(ip) = ip {
            pod["status"]["podIP"] = json!(ip);
        }
        self.put_object(pod)
    }

    /// Deletes the Pod `namespace/name`; false when there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut state = self.inner.lock();
        state.delete(&self.inner, Res::Pod, namespace, name).is_ok()
    }

    /// `spec.replicas` of the Deployment `namespace/name`.
    pub fn replicas(&self, namespace: &str, name: &str) -> Option<i64> {
        self.deployment(namespace, name)?["spec"]["replicas"].as_i64()
    }

    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("deployments", namespace, name)
    }

    pub fn statefulset(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("statefulsets", namespace, name)
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("leases", namespace, name)
    }

    /// Any stored object by resource plural (`deployments`, `leases`, …).
    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::ALL
            .into_iter()
            .find(|r| r.plural() == plural && *r != Res::Event)?;
        let state = self.inner.lock();
        state
            .objects
            .get(&ObjKey::new(res, namespace, name))
            .map(|s| s.object.clone())
    }

    /// Stores an object as given (e.g. a Lease held by someone else), as a
    /// create or a replace: `apiVersion`, `kind`, `metadata.name` and
    /// `metadata.namespace` are needed.
    pub fn put_object(&self, object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let res = Res::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
            .unwrap_or_else(|| panic!("put_object: unsupported {api_version} {kind}"));
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut state = self.inner.lock();
        let result = if state
            .objects
            .contains_key(&ObjKey::new(res, &namespace, &name))
        {
            state.update(&self.inner, res, &namespace, &name, object, Part::All)
        } else {
            state.create(&self.inner, res, &namespace, object)
        };
        result.unwrap_or_else(|err| panic!("put_object {namespace}/{name}: {err:?}"))
    }

    // --- observation ----------------------------------------------------------

    /// Every Event stored (core/v1 and events.k8s.io/v1), oldest first.
    pub fn events(&self) -> Vec<KubeEvent> {
        let state = self.inner.lock();
        let mut stored: Vec<&Stored> = state
            .objects
            .iter()
            .filter(|(key, _)| matches!(key.res, Res::CoreEvent | Res::Event))
            .map(|(_, stored)| stored)
            .collect();
        stored.sort_by_key(|s| s.created);
        stored
            .into_iter()
            .map(|s| normalize_event(&s.object))
            .collect()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.inner.lock().requests.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.inner.lock().requests.clear();
    }

    /// The current (last written) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// Polls `f` every 10 ms until it returns `Some`, for at most `limit`;
    /// panics naming `what` on timeout.
    pub async fn until<T>(
        &self,
        limit: Duration,
        what: &str,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(value) = f(self) {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for {what}; requests so far:\n{}",
                    self.requests()
                        .iter()
                        .map(|r| format!("  {} {}?{}", r.method, r.path, r.query))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // --- faults -----------------------------------------------------------------

    /// The next `n` requests matching `matching` are answered with `status`
    /// and a `Status` body (reason derived from the code) instead of being
    /// served. Faults are checked in the order they were added.
    pub fn fail_next(&self, n: usize, status: u16, matching: Match) {
        self.inner.lock().faults.push(Fault {
            matching,
            remaining: n,
            status,
        });
    }

    /// Removes every pending fault.
    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Forgets the history so far: a watch from an older resourceVersion gets
    /// a 410 `Expired` ERROR event (clients must re-list).
    pub fn compact(&self) {
        let mut state = self.inner.lock();
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Ends every open watch stream (as when an API server restarts);
    /// clients resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.inner.close.send_modify(|n| *n += 1);
    }

    /// How often open watches get a `BOOKMARK` (default 2 s) when they asked
    /// for them.
    pub fn bookmark_interval(&self, every: Duration) {
        self.inner.lock().bookmark_interval = every;
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
