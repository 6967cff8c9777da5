//! An in-process Kubernetes API server double, close enough to the real API
//! for kube-rs (and so for whole `ebb` processes pointed at it with
//! `KUBECONFIG`).
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

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// Watches without `timeoutSeconds` end after this long (the real API picks
/// 30–60 min at random).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// Request bodies above this are refused.
const MAX_BODY: usize = 16 << 20;

// ---------------------------------------------------------------------------
// Public types

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
        parse_query(&self.query)
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

    fn matches(&self, method: &str, path: &str, is_watch: bool) -> bool {
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
                    let app = axum::Router::new().fallback(handle).with_state(inner);
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
        ebb_kube::install_crypto_provider();
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

// ---------------------------------------------------------------------------
// State

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Res {
    Deployment,
    StatefulSet,
    Lease,
    CoreEvent,
    Event,
    Hpa,
    Pod,
}

impl Res {
    const ALL: [Res; 7] = [
        Res::Deployment,
        Res::StatefulSet,
        Res::Lease,
        Res::CoreEvent,
        Res::Event,
        Res::Hpa,
        Res::Pod,
    ];

    fn api_version(self) -> &'static str {
        match self {
            Res::Deployment | Res::StatefulSet => "apps/v1",
            Res::Lease => "coordination.k8s.io/v1",
            Res::CoreEvent | Res::Pod => "v1",
            Res::Event => "events.k8s.io/v1",
            Res::Hpa => "autoscaling/v2",
        }
    }

    fn group(self) -> &'static str {
        match self.api_version().split_once('/') {
            Some((group, _)) => group,
            None => "",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Res::Deployment => "deployments",
            Res::StatefulSet => "statefulsets",
            Res::Lease => "leases",
            Res::CoreEvent | Res::Event => "events",
            Res::Hpa => "horizontalpodautoscalers",
            Res::Pod => "pods",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Deployment => "Deployment",
            Res::StatefulSet => "StatefulSet",
            Res::Lease => "Lease",
            Res::CoreEvent | Res::Event => "Event",
            Res::Hpa => "HorizontalPodAutoscaler",
            Res::Pod => "Pod",
        }
    }

    /// `deployments.apps`, as in API error messages.
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    fn is_workload(self) -> bool {
        matches!(self, Res::Deployment | Res::StatefulSet)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjKey {
    res: Res,
    namespace: String,
    name: String,
}

impl ObjKey {
    fn new(res: Res, namespace: &str, name: &str) -> Self {
        Self {
            res,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct Stored {
    /// resourceVersion at creation, for creation order.
    created: u64,
    object: Value,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    res: Res,
    namespace: String,
    type_: &'static str,
    object: Value,
}

#[derive(Debug, Clone)]
struct Fault {
    matching: Match,
    remaining: usize,
    status: u16,
}

/// Which part of a workload a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Everything but `status` (the main resource).
    Main,
    /// Only `status` (the status subresource).
    Status,
    /// Everything (test helpers).
    All,
}

/// An API error: HTTP status and message.
#[derive(Debug, Clone)]
struct ApiError {
    code: u16,
    message: String,
    details: Option<(Res, String)>,
}

impl ApiError {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    fn not_found(res: Res, name: &str) -> Self {
        Self {
            code: 404,
            message: format!("{} \"{name}\" not found", res.qualified()),
            details: Some((res, name.to_owned())),
        }
    }

    fn conflict(res: Res, name: &str) -> Self {
        Self {
            code: 409,
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                res.qualified()
            ),
            details: Some((res, name.to_owned())),
        }
    }

    fn already_exists(res: Res, name: &str) -> Self {
        Self {
            code: 409,
            message: format!("{} \"{name}\" already exists", res.qualified()),
            details: Some((res, name.to_owned())),
        }
    }

    fn reason(&self) -> &'static str {
        if self.code == 409 && self.message.ends_with("already exists") {
            return "AlreadyExists";
        }
        reason_for(self.code)
    }

    fn status_body(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason(),
            "code": self.code,
        });
        if let Some((res, name)) = &self.details {
            status["details"] = json!({"name": name, "group": res.group(), "kind": res.plural()});
        }
        status
    }

    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status_body())
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

struct Inner {
    state: Mutex<State>,
    /// The last written resourceVersion; watches wake on it.
    changed: watch::Sender<u64>,
    /// Bumped by `close_watches`.
    close: watch::Sender<u64>,
    runtime: tokio::runtime::Handle,
}

impl Inner {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        Self {
            state: Mutex::new(State {
                rv: 1,
                uid: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                faults: Vec::new(),
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(2),
                auto_ready: None,
            }),
            changed: watch::Sender::new(1),
            close: watch::Sender::new(0),
            runtime,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<ObjKey, Stored>,
    history: Vec<Change>,
    /// Watches from below this resourceVersion get 410.
    compacted: u64,
    faults: Vec<Fault>,
    requests: Vec<KubeRequest>,
    bookmark_interval: Duration,
    auto_ready: Option<Duration>,
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        type_: &'static str,
        object: &Value,
    ) {
        let mut object = object.clone();
        // Watch events carry apiVersion and kind.
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind());
        self.history.push(Change {
            rv: self.rv,
            res,
            namespace: namespace.to_owned(),
            type_,
            object,
        });
        inner.changed.send_replace(self.rv);
    }

    fn create(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::new(400, "the body must be a JSON object"));
        }
        if let Some(given) = object["apiVersion"].as_str()
            && given != res.api_version()
        {
            return Err(ApiError::new(
                400,
                format!("apiVersion {given} does not match {}", res.api_version()),
            ));
        }
        let meta = object["metadata"].take();
        let mut meta = match meta {
            Value::Object(meta) => meta,
            Value::Null => Map::new(),
            _ => return Err(ApiError::new(400, "metadata must be an object")),
        };
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if ns != namespace => {
                return Err(ApiError::new(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        self.uid += 1;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", self.uid),
                None => return Err(ApiError::new(422, "name or generateName is required")),
            },
        };
        let key = ObjKey::new(res, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        let rv = self.next_rv();
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(namespace));
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        object["metadata"] = Value::Object(meta);
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind());
        if res.is_workload() {
            object["metadata"]["generation"] = json!(1);
            if object["spec"]["replicas"].is_null() {
                object["spec"]["replicas"] = json!(1);
            }
            if object["status"].is_null() {
                object["status"] = json!({});
            }
        }
        self.objects.insert(
            key,
            Stored {
                created: rv,
                object: object.clone(),
            },
        );
        self.record(inner, res, namespace, "ADDED", &object);
        self.after_replicas_change(inner, res, namespace, &name, None, &object);
        Ok(object)
    }

    /// Replaces `namespace/name` by `new` (only the `part` it may change),
    /// after checking a resourceVersion in `new` against the stored one.
    fn update(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
        mut new: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.get(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        let current = stored.object.clone();
        let created = stored.created;
        if !new.is_object() {
            return Err(ApiError::new(400, "the body must be a JSON object"));
        }
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(res, name));
        }
        if let Some(given) = new["metadata"]["name"].as_str()
            && given != name
        {
            return Err(ApiError::new(
                400,
                "the name of the object does not match the name on the URL",
            ));
        }
        // Server-owned metadata stays.
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
        ] {
            new["metadata"][field] = current["metadata"][field].clone();
        }
        new["apiVersion"] = json!(res.api_version());
        new["kind"] = json!(res.kind());
        if res.is_workload() {
            match part {
                Part::Main => new["status"] = current["status"].clone(),
                Part::Status => {
                    let status = new["status"].take();
                    new = current.clone();
                    new["status"] = status;
                }
                Part::All => {}
            }
            if new["spec"]["replicas"].is_null() {
                new["spec"]["replicas"] = json!(1);
            }
            if new["spec"] != current["spec"] {
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(0);
                new["metadata"]["generation"] = json!(generation + 1);
            }
        }
        strip_nulls(&mut new);
        if new == current {
            return Ok(current);
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(
            key,
            Stored {
                created,
                object: new.clone(),
            },
        );
        self.record(inner, res, namespace, "MODIFIED", &new);
        self.after_replicas_change(inner, res, namespace, name, Some(&current), &new);
        Ok(new)
    }

    fn delete(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.remove(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        let mut object = stored.object;
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(inner, res, namespace, "DELETED", &object);
        Ok(object)
    }

    fn set_ready(&mut self, inner: &Arc<Inner>, res: Res, namespace: &str, name: &str, ready: i32) {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.get(&key) else {
            return;
        };
        let mut object = stored.object.clone();
        object["status"]["readyReplicas"] = json!(ready);
        object["status"]["availableReplicas"] = json!(ready);
        object["status"]["replicas"] = object["spec"]["replicas"].clone();
        object["status"]["observedGeneration"] = object["metadata"]["generation"].clone();
        object["metadata"]["resourceVersion"] = Value::Null;
        let _ = self.update(inner, res, namespace, name, object, Part::All);
    }

    /// With `auto_ready`, schedules readiness to follow `spec.replicas`.
    fn after_replicas_change(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
        before: Option<&Value>,
        after: &Value,
    ) {
        let (Some(delay), true) = (self.auto_ready, res.is_workload()) else {
            return;
        };
        let target = after["spec"]["replicas"].as_i64().unwrap_or(1);
        if before.is_some_and(|b| b["spec"]["replicas"].as_i64() == Some(target)) {
            return;
        }
        let inner = inner.clone();
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        inner.runtime.clone().spawn(async move {
            tokio::time::sleep(delay).await;
            let mut state = inner.lock();
            let key = ObjKey::new(res, &namespace, &name);
            let still = state
                .objects
                .get(&key)
                .is_some_and(|s| s.object["spec"]["replicas"].as_i64() == Some(target));
            if still {
                let ready = i32::try_from(target).unwrap_or(i32::MAX);
                state.set_ready(&inner, res, &namespace, &name, ready);
            }
        });
    }
}

fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(target) = target {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(key);
                    } else {
                        merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn normalize_event(object: &Value) -> KubeEvent {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let core = object["apiVersion"] == "v1";
    let regarding = if core {
        &object["involvedObject"]
    } else {
        &object["regarding"]
    };
    KubeEvent {
        api_version: text(&object["apiVersion"]),
        namespace: text(&object["metadata"]["namespace"]),
        name: text(&object["metadata"]["name"]),
        type_: text(&object["type"]),
        reason: text(&object["reason"]),
        message: if core {
            text(&object["message"])
        } else {
            text(&object["note"])
        },
        object_kind: text(&regarding["kind"]),
        object_namespace: text(&regarding["namespace"]),
        object_name: text(&regarding["name"]),
        reporter: if core {
            object["reportingComponent"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map_or_else(|| text(&object["source"]["component"]), str::to_owned)
        } else {
            text(&object["reportingController"])
        },
        count: if core {
            object["count"].as_i64().unwrap_or(1)
        } else {
            object["series"]["count"]
                .as_i64()
                .or_else(|| object["deprecatedCount"].as_i64())
                .unwrap_or(1)
        },
        raw: object.clone(),
    }
}

// ---------------------------------------------------------------------------
// Routing

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    res: Res,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<Sub>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Scale,
    Status,
}

fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] if namespace.is_some() => (*plural, Some((*name).to_owned()), None),
        [plural, name, "scale"] if namespace.is_some() => {
            (*plural, Some((*name).to_owned()), Some(Sub::Scale))
        }
        [plural, name, "status"] if namespace.is_some() => {
            (*plural, Some((*name).to_owned()), Some(Sub::Status))
        }
        _ => return None,
    };
    let res = Res::ALL
        .into_iter()
        .find(|r| r.api_version() == api_version && r.plural() == plural)?;
    if sub == Some(Sub::Scale) && !res.is_workload()
        || sub == Some(Sub::Status) && !res.is_workload()
    {
        return None;
    }
    Some(Route {
        res,
        namespace,
        name,
        sub,
    })
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    let uri: Uri = match format!("/?{query}").parse() {
        Ok(uri) => uri,
        Err(_) => return Vec::new(),
    };
    Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(AxumState(inner): AxumState<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(err) => {
            return ApiError::new(400, format!("cannot read the body: {err}")).into_response();
        }
    };
    let params: HashMap<String, String> = parse_query(&query).into_iter().collect();
    let is_watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));

    let fault = {
        let mut state = inner.lock();
        let fault = state
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.matching.matches(&method, &path, is_watch))
            .map(|f| {
                f.remaining -= 1;
                f.status
            });
        state.faults.retain(|f| f.remaining > 0);
        state.requests.push(KubeRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
            fault,
        });
        fault
    };
    if let Some(code) = fault {
        return ApiError::new(code, format!("injected fault: {method} {path}")).into_response();
    }

    if path == "/version" && parts.method == Method::GET {
        return json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-ebb-double",
                "platform": "linux/amd64",
            }),
        );
    }
    let Some(route) = route(&path) else {
        return ApiError::new(404, "the server could not find the requested resource")
            .into_response();
    };
    let result = match (&parts.method, &route.name, route.sub) {
        (&Method::GET, None, _) if is_watch => return start_watch(&inner, &route, &params),
        (&Method::GET, None, _) => list(&inner, &route, &params),
        (&Method::POST, None, _) => match route.namespace.as_deref() {
            Some(namespace) => parse_body(&body).and_then(|object| {
                inner
                    .lock()
                    .create(&inner, route.res, namespace, object)
                    .map(|o| (StatusCode::CREATED, o))
            }),
            None => Err(ApiError::new(405, "create needs a namespace in the path")),
        },
        (&Method::GET, Some(name), None) => get(&inner, &route, name).map(|o| (StatusCode::OK, o)),
        (&Method::GET, Some(name), Some(Sub::Scale)) => get(&inner, &route, name)
            .and_then(|o| scale_of(&o))
            .map(|s| (StatusCode::OK, s)),
        (&Method::GET, Some(name), Some(Sub::Status)) => {
            get(&inner, &route, name).map(|o| (StatusCode::OK, o))
        }
        (&Method::PUT, Some(name), sub) => parse_body(&body)
            .and_then(|object| write(&inner, &route, name, sub, Write::Replace(object)))
            .map(|o| (StatusCode::OK, o)),
        (&Method::PATCH, Some(name), sub) => patch_kind(content_type.as_deref())
            .and_then(|kind| Ok((kind, parse_body(&body)?)))
            .and_then(|(kind, patch)| write(&inner, &route, name, sub, Write::Patch(kind, patch)))
            .map(|o| (StatusCode::OK, o)),
        (&Method::DELETE, Some(name), None) => {
            let namespace = route.namespace.clone().unwrap_or_default();
            inner
                .lock()
                .delete(&inner, route.res, &namespace, name)
                .map(|o| (StatusCode::OK, o))
        }
        _ => Err(ApiError::new(
            405,
            format!("{method} is not supported on {path}"),
        )),
    };
    match result {
        Ok((code, body)) => json_response(code, &body),
        Err(err) => err.into_response(),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::new(400, format!("invalid JSON body: {err}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatchKind {
    Merge,
    Apply,
}

fn patch_kind(content_type: Option<&str>) -> Result<PatchKind, ApiError> {
    let mime = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    match mime {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchKind::Merge)
        }
        "application/apply-patch+yaml" => Ok(PatchKind::Apply),
        other => Err(ApiError::new(
            415,
            format!("the body of the request was in an unknown format: {other}"),
        )),
    }
}

enum Write {
    Replace(Value),
    Patch(PatchKind, Value),
}

fn get(inner: &Arc<Inner>, route: &Route, name: &str) -> Result<Value, ApiError> {
    let namespace = route.namespace.clone().unwrap_or_default();
    inner
        .lock()
        .objects
        .get(&ObjKey::new(route.res, &namespace, name))
        .map(|s| s.object.clone())
        .ok_or_else(|| ApiError::not_found(route.res, name))
}

/// The autoscaling/v1 Scale of a workload.
fn scale_of(object: &Value) -> Result<Value, ApiError> {
    let selector = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &object["metadata"];
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector,
        },
    }))
}

fn write(
    inner: &Arc<Inner>,
    route: &Route,
    name: &str,
    sub: Option<Sub>,
    write: Write,
) -> Result<Value, ApiError> {
    let res = route.res;
    let namespace = route.namespace.clone().unwrap_or_default();
    let mut state = inner.lock();
    let key = ObjKey::new(res, &namespace, name);
    let current = state.objects.get(&key).map(|s| s.object.clone());
    match sub {
        Some(Sub::Scale) => {
            let current = current.ok_or_else(|| ApiError::not_found(res, name))?;
            let scale = scale_of(&current)?;
            let desired = match write {
                Write::Replace(new) => new,
                Write::Patch(_, patch) => {
                    let mut scale = scale.clone();
                    merge_patch(&mut scale, &patch);
                    scale
                }
            };
            if let Some(rv) = desired["metadata"]["resourceVersion"].as_str()
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return Err(ApiError::conflict(res, name));
            }
            let replicas = desired["spec"]["replicas"]
                .as_i64()
                .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
                .ok_or_else(|| {
                    ApiError::new(422, format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas must be a whole number ≥ 0"))
                })?;
            let mut new = current.clone();
            new["spec"]["replicas"] = json!(replicas);
            new["metadata"]["resourceVersion"] = Value::Null;
            let updated = state.update(inner, res, &namespace, name, new, Part::Main)?;
            scale_of(&updated)
        }
        sub => {
            let part = if sub == Some(Sub::Status) {
                Part::Status
            } else {
                Part::Main
            };
            match (write, current) {
                (Write::Replace(new), Some(_)) => {
                    state.update(inner, res, &namespace, name, new, part)
                }
                (Write::Replace(_), None) => Err(ApiError::not_found(res, name)),
                (Write::Patch(_, patch), Some(mut current)) => {
                    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
                    {
                        return Err(ApiError::conflict(res, name));
                    }
                    merge_patch(&mut current, &patch);
                    current["metadata"]["resourceVersion"] = Value::Null;
                    state.update(inner, res, &namespace, name, current, part)
                }
                (Write::Patch(PatchKind::Apply, mut object), None) if sub.is_none() => {
                    object["metadata"]["name"] = json!(name);
                    state.create(inner, res, &namespace, object)
                }
                (Write::Patch(..), None) => Err(ApiError::not_found(res, name)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Lists and watches

/// Label and field selectors of a list or watch.
#[derive(Debug, Clone, Default)]
struct Filter {
    res: Option<Res>,
    namespace: Option<String>,
    labels: Vec<Term>,
    fields: Vec<Term>,
}

#[derive(Debug, Clone)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

fn parse_selector(selector: &str, fields: bool) -> Result<Vec<Term>, ApiError> {
    if selector.contains('(') {
        return Err(ApiError::new(
            400,
            format!("set-based selectors are not supported by the double: {selector}"),
        ));
    }
    let mut terms = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let parsed = if let Some((k, v)) = term.split_once("!=") {
            Term::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Term::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if fields {
            return Err(ApiError::new(
                400,
                format!("invalid field selector: {term}"),
            ));
        } else if let Some(k) = term.strip_prefix('!') {
            Term::NotExists(k.trim().to_owned())
        } else {
            Term::Exists(term.to_owned())
        };
        terms.push(parsed);
    }
    Ok(terms)
}

impl Filter {
    fn new(route: &Route, params: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(Self {
            res: Some(route.res),
            namespace: route.namespace.clone(),
            labels: parse_selector(
                params.get("labelSelector").map_or("", String::as_str),
                false,
            )?,
            fields: parse_selector(params.get("fieldSelector").map_or("", String::as_str), true)?,
        })
    }

    fn matches(&self, res: Res, namespace: &str, object: &Value) -> bool {
        if self.res.is_some_and(|r| r != res)
            || self.namespace.as_deref().is_some_and(|ns| ns != namespace)
        {
            return false;
        }
        let label = |k: &str| object["metadata"]["labels"][k].as_str().map(str::to_owned);
        let field = |path: &str| {
            let mut value = object;
            for part in path.split('.') {
                value = &value[part];
            }
            match value {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        let check = |terms: &[Term], get: &dyn Fn(&str) -> Option<String>| {
            terms.iter().all(|term| match term {
                Term::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
                // Like the real API, an absent field is "" for field selectors.
                Term::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
                Term::Exists(k) => get(k).is_some(),
                Term::NotExists(k) => get(k).is_none(),
            })
        };
        check(&self.labels, &label) && check(&self.fields, &field)
    }
}

fn list(
    inner: &Arc<Inner>,
    route: &Route,
    params: &HashMap<String, String>,
) -> Result<(StatusCode, Value), ApiError> {
    let filter = Filter::new(route, params)?;
    let state = inner.lock();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|(key, stored)| filter.matches(key.res, &key.namespace, &stored.object))
        .map(|(_, stored)| {
            // List items carry no apiVersion/kind, as from the real API.
            let mut item = stored.object.clone();
            if let Value::Object(map) = &mut item {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    Ok((
        StatusCode::OK,
        json!({
            "apiVersion": route.res.api_version(),
            "kind": format!("{}List", route.res.kind()),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }),
    ))
}

fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(res: Res, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"apiVersion": res.api_version(), "kind": res.kind(), "metadata": metadata}),
    )
}

fn start_watch(inner: &Arc<Inner>, route: &Route, params: &HashMap<String, String>) -> Response {
    let filter = match Filter::new(route, params) {
        Ok(filter) => filter,
        Err(err) => return err.into_response(),
    };
    let from = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return ApiError::new(400, format!("invalid resource version: {rv}"))
                    .into_response();
            }
        },
    };
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let initial_events = params.get("sendInitialEvents").is_some_and(|b| b == "true");

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let inner = inner.clone();
    let res = route.res;
    inner.runtime.clone().spawn(async move {
        let _ = run_watch(
            &inner,
            res,
            filter,
            from,
            timeout,
            bookmarks,
            initial_events,
            tx,
        )
        .await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::new(500, "cannot build the watch response").into_response())
}

/// Streams one watch until its timeout, a `close_watches`, or the client
/// going away. `Err` only means the client is gone.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all watch options"
)]
async fn run_watch(
    inner: &Arc<Inner>,
    res: Res,
    filter: Filter,
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    initial_events: bool,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), ()> {
    let mut changed = inner.changed.subscribe();
    let mut close = inner.close.subscribe();
    close.borrow_and_update();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);

    // Where to start, and what to send first.
    let (mut last, first, interval) = {
        changed.borrow_and_update();
        let state = inner.lock();
        let interval = state.bookmark_interval;
        match from {
            Some(rv) if rv < state.compacted => {
                let status = ApiError::new(
                    410,
                    format!("too old resource version: {rv} ({})", state.compacted),
                );
                // Send the ERROR event, then end the stream.
                (
                    u64::MAX,
                    vec![watch_line("ERROR", &status.status_body())],
                    interval,
                )
            }
            Some(rv) if !initial_events => (rv, Vec::new(), interval),
            _ => {
                let mut first: Vec<Bytes> = state
                    .objects
                    .iter()
                    .filter(|(key, stored)| filter.matches(key.res, &key.namespace, &stored.object))
                    .map(|(_, stored)| watch_line("ADDED", &stored.object))
                    .collect();
                if initial_events && bookmarks {
                    first.push(bookmark(res, state.rv, true));
                }
                (state.rv, first, interval)
            }
        }
    };
    for line in first {
        tx.send(line).await.map_err(drop)?;
    }
    if last == u64::MAX {
        return Ok(());
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        let lines: Vec<Bytes> = {
            changed.borrow_and_update();
            let state = inner.lock();
            // Writes made after `close_watches` never reach a closed stream.
            if close.has_changed().unwrap_or(true) {
                return Ok(());
            }
            let lines = state
                .history
                .iter()
                .filter(|c| c.rv > last && filter.matches(c.res, &c.namespace, &c.object))
                .map(|c| watch_line(c.type_, &c.object))
                .collect();
            last = last.max(state.rv);
            lines
        };
        for line in lines {
            tx.send(line).await.map_err(drop)?;
        }
        tokio::select! {
            biased;
            _ = close.changed() => return Ok(()),
            _ = changed.changed() => {}
            _ = ticker.tick(), if bookmarks => {
                tx.send(bookmark(res, last, false)).await.map_err(drop)?;
            }
            () = &mut deadline => return Ok(()),
            () = tx.closed() => return Err(()),
        }
    }
}
