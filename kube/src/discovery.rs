//! Function discovery: watches Deployments and StatefulSets and publishes the
//! [`Catalog`] of functions they declare (annotations `ebb.io/…`, OpenFaaS
//! annotations and labels).
//!
//! The I/O shell ([`Discovery::run`]) feeds watch events into a plain state
//! ([`State`]) that computes snapshots; which configuration errors are new
//! is decided by [`Reported`]. Both are unit-tested without a server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use ebb_model::{Catalog, ConfigError, Function, FunctionSpec};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::{Error, Recorder};

/// The Event reason for a function skipped for bad settings.
pub const INVALID_CONFIG_REASON: &str = "InvalidConfig";

/// The kind of workload that backs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
}

impl WorkloadKind {
    /// `Deployment` or `StatefulSet`, as in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
        }
    }

    /// The resource name in API paths: `deployments` or `statefulsets`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::StatefulSet => "statefulsets",
        }
    }

    /// `apps/v1` for both.
    pub fn api_version(self) -> &'static str {
        "apps/v1"
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workload behind a discovered function, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.resourceVersion` of the workload (changes on every update,
    /// status included).
    pub resource_version: Option<String>,
    pub uid: Option<String>,
    /// `spec.replicas` (Kubernetes defaults it to 1 when absent).
    pub replicas: Option<u32>,
    /// `status.readyReplicas`, 0 when absent.
    pub ready_replicas: u32,
}

impl Workload {
    /// `namespace/name`, the same key as [`Function::key`].
    pub fn key(&self) -> String {
        ebb_model::FunctionKey::new(&self.namespace, &self.name).to_string()
    }

    /// The path of its scale subresource:
    /// `/apis/apps/v1/namespaces/NS/deployments/NAME/scale`.
    pub fn scale_path(&self) -> String {
        format!(
            "/apis/{}/namespaces/{}/{}/{}/scale",
            self.kind.api_version(),
            self.namespace,
            self.kind.plural(),
            self.name
        )
    }

    /// A reference for Events about this workload.
    pub fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.kind.api_version().to_owned()),
            kind: Some(self.kind.as_str().to_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            resource_version: self.resource_version.clone(),
            ..ObjectReference::default()
        }
    }
}

/// The workloads behind the functions of the current catalog, by
/// [`Function::key`] (`namespace/name`).
pub type Workloads = BTreeMap<String, Workload>;

/// Watches Deployments and StatefulSets in `namespace` (all when `None`) and
/// publishes the [`Catalog`] of functions on `tx`. See [`Discovery`].
pub async fn discover(
    client: Client,
    namespace: Option<String>,
    tx: watch::Sender<Arc<Catalog>>,
    recorder: Option<Recorder>,
) -> Result<(), Error> {
    let mut discovery = Discovery::new(client).namespace(namespace);
    if let Some(recorder) = recorder {
        discovery = discovery.recorder(recorder);
    }
    discovery.run(tx).await
}

/// Waits for the first catalog `discover` publishes (after the initial list of
/// both Deployments and StatefulSets). `None` when discovery ended first.
///
/// Use a receiver that has not seen a value yet: the one from the
/// `watch::channel` whose sender went to `discover`, or a clone of it made
/// before the first publication.
pub async fn first_catalog(rx: &mut watch::Receiver<Arc<Catalog>>) -> Option<Arc<Catalog>> {
    rx.changed().await.ok()?;
    Some(rx.borrow_and_update().clone())
}

/// Function discovery with its options; [`discover`] is the short form.
///
/// - Publishes only after the initial list of both kinds completed, then on
///   every change that alters the catalog (never an equal one again).
///   The first publication always notifies, even when the catalog is empty.
/// - Functions are sorted by `namespace/name`. A Deployment and a
///   StatefulSet with the same name: the Deployment wins, the StatefulSet is
///   reported as a duplicate.
/// - A function whose settings are invalid is reported: its error is in
///   [`Catalog::errors`], logged once and, with a [`Recorder`], a `Warning`
///   Event with reason [`INVALID_CONFIG_REASON`] is written on the object —
///   once per distinct error, not on every resync. Until they are fixed it
///   is served on its last valid settings (skipped when it never had any).
/// - List and watch failures are logged and retried with kube-runtime's
///   default backoff (0.8 s doubling to 30 s); discovery never gives up.
///
/// Runs until dropped; returns `Ok(())` when every receiver of the catalog
/// channel is gone (noticed at the next change).
#[derive(Clone)]
pub struct Discovery {
    client: Client,
    namespace: Option<String>,
    recorder: Option<Recorder>,
    workloads: Option<watch::Sender<Arc<Workloads>>>,
    config: watcher::Config,
}

impl Discovery {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            namespace: None,
            recorder: None,
            workloads: None,
            config: watcher::Config::default(),
        }
    }

    /// Watch one namespace only (`None`: all namespaces).
    pub fn namespace(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    /// Write an Event on each object with bad settings.
    pub fn recorder(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Also publish the workload behind each function (kind, resource
    /// version, replicas), at the same moments as the catalog, when it
    /// changed.
    pub fn workloads(mut self, tx: watch::Sender<Arc<Workloads>>) -> Self {
        self.workloads = Some(tx);
        self
    }

    /// Watcher settings (label selector, watch timeout, …).
    pub fn watcher_config(mut self, config: watcher::Config) -> Self {
        self.config = config;
        self
    }

    /// Runs discovery; see the type's documentation.
    pub async fn run(self, tx: watch::Sender<Arc<Catalog>>) -> Result<(), Error> {
        let deployments: Api<Deployment> = api(&self.client, self.namespace.as_deref());
        let statefulsets: Api<StatefulSet> = api(&self.client, self.namespace.as_deref());
        let deployments = watcher(deployments, self.config.clone())
            .default_backoff()
            .boxed()
            .map(|event| Change::from_watch(WorkloadKind::Deployment, event, observe_deployment));
        let statefulsets = watcher(statefulsets, self.config.clone())
            .default_backoff()
            .boxed()
            .map(|event| Change::from_watch(WorkloadKind::StatefulSet, event, observe_statefulset));
        let mut changes = futures::stream::select(deployments, statefulsets);

        let scope = self
            .namespace
            .as_deref()
            .unwrap_or("all namespaces")
            .to_owned();
        tracing::info!(namespace = %scope, "discovering functions from Deployments and StatefulSets");

        let mut state = State::default();
        let mut reported = Reported::default();
        let mut published = false;
        while let Some(change) = changes.next().await {
            self.apply(&mut state, change);
            // Take whatever else is already there before publishing once.
            while let Some(Some(change)) = changes.next().now_or_never() {
                self.apply(&mut state, change);
            }
            if !state.synced() {
                continue;
            }
            let snapshot = state.snapshot();
            for failure in reported.news(&snapshot.failures) {
                self.report(failure);
            }
            if !published {
                tracing::info!(
                    namespace = %scope,
                    functions = snapshot.catalog.functions.len(),
                    errors = snapshot.catalog.errors.len(),
                    "initial function discovery complete"
                );
            }
            let catalog = snapshot.catalog;
            if published {
                tx.send_if_modified(|current| {
                    if **current == catalog {
                        return false;
                    }
                    *current = Arc::new(catalog);
                    true
                });
            } else {
                tx.send_replace(Arc::new(catalog));
            }
            if let Some(workloads_tx) = &self.workloads {
                let workloads = snapshot.workloads;
                if published {
                    workloads_tx.send_if_modified(|current| {
                        if **current == workloads {
                            return false;
                        }
                        *current = Arc::new(workloads);
                        true
                    });
                } else {
                    workloads_tx.send_replace(Arc::new(workloads));
                }
            }
            published = true;
            if tx.is_closed() {
                tracing::debug!("every catalog receiver is gone; discovery stops");
                return Ok(());
            }
        }
        // The watchers retry forever, so their streams do not end.
        Ok(())
    }

    fn apply(&self, state: &mut State, change: Change) {
        match change {
            Change::Failed(kind, err) => {
                let err = Error::Watch(err);
                tracing::warn!(
                    kind = kind.as_str(),
                    error = %err,
                    error_kind = err.metric_label(),
                    "watching {} failed; retrying with backoff",
                    kind.plural()
                );
            }
            change => state.apply(change),
        }
    }

    fn report(&self, failure: &Failure) {
        let key = failure.workload.key();
        tracing::warn!(
            function = %key,
            kind = failure.workload.kind.as_str(),
            error = %failure.error,
            error_kind = failure.error.metric_label(),
            "invalid function settings; served on its last valid ones until fixed (skipped if it never had any)"
        );
        if let Some(recorder) = self.recorder.clone() {
            let reference = failure.workload.object_ref();
            let message = failure.error.to_string();
            tokio::spawn(async move {
                if let Err(err) = recorder
                    .warning(&reference, INVALID_CONFIG_REASON, &message)
                    .await
                {
                    tracing::warn!(function = %key, error = %err, "cannot write the InvalidConfig Event");
                }
            });
        }
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One workload as ebb sees it.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    workload: Workload,
    /// `Ok(None)`: not a function (no ebb or OpenFaaS settings).
    setting: Result<Option<Arc<FunctionSpec>>, ConfigError>,
}

fn observe(
    kind: WorkloadKind,
    meta: &ObjectMeta,
    replicas: Option<i32>,
    ready: Option<i32>,
) -> Observed {
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let setting = FunctionSpec::from_annotations(&name, &namespace, annotations, labels)
        .map(|spec| spec.map(Arc::new));
    Observed {
        workload: Workload {
            kind,
            namespace,
            name,
            resource_version: meta.resource_version.clone(),
            uid: meta.uid.clone(),
            replicas: replicas.and_then(|r| u32::try_from(r).ok()),
            ready_replicas: ready.and_then(|r| u32::try_from(r).ok()).unwrap_or(0),
        },
        setting,
    }
}

fn observe_deployment(d: &Deployment) -> Observed {
    observe(
        WorkloadKind::Deployment,
        &d.metadata,
        d.spec.as_ref().and_then(|s| s.replicas),
        d.status.as_ref().and_then(|s| s.ready_replicas),
    )
}

fn observe_statefulset(s: &StatefulSet) -> Observed {
    observe(
        WorkloadKind::StatefulSet,
        &s.metadata,
        s.spec.as_ref().and_then(|s| s.replicas),
        s.status.as_ref().and_then(|s| s.ready_replicas),
    )
}

/// A watch event, reduced to what discovery needs.
#[derive(Debug)]
enum Change {
    /// A (re-)list starts.
    Init(WorkloadKind),
    InitApply(Observed),
    /// The (re-)list is complete: it replaces what was known of this kind.
    InitDone(WorkloadKind),
    Apply(Observed),
    Delete(WorkloadKind, String, String),
    Failed(WorkloadKind, watcher::Error),
}

impl Change {
    fn from_watch<K: Resource>(
        kind: WorkloadKind,
        event: Result<watcher::Event<K>, watcher::Error>,
        observe: fn(&K) -> Observed,
    ) -> Self {
        match event {
            Ok(watcher::Event::Init) => Self::Init(kind),
            Ok(watcher::Event::InitApply(obj)) => Self::InitApply(observe(&obj)),
            Ok(watcher::Event::InitDone) => Self::InitDone(kind),
            Ok(watcher::Event::Apply(obj)) => Self::Apply(observe(&obj)),
            Ok(watcher::Event::Delete(obj)) => {
                let meta = obj.meta();
                Self::Delete(
                    kind,
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                )
            }
            Err(err) => Self::Failed(kind, err),
        }
    }
}

type ObjectKey = (String, String);

#[derive(Debug, Default)]
struct KindState {
    live: BTreeMap<ObjectKey, Observed>,
    /// Objects of a list in progress; replaces `live` at `InitDone`.
    relist: Option<BTreeMap<ObjectKey, Observed>>,
    synced: bool,
    /// The last valid settings of each function: one whose settings become
    /// invalid is served on these until they are fixed.
    last_good: BTreeMap<ObjectKey, Arc<FunctionSpec>>,
}

impl KindState {
    fn remember(&mut self, key: &ObjectKey, observed: &Observed) {
        match &observed.setting {
            Ok(Some(spec)) => {
                self.last_good.insert(key.clone(), spec.clone());
            }
            Ok(None) => {
                self.last_good.remove(key);
            }
            Err(_) => {}
        }
    }
}

/// Everything discovery knows, fed by watch events.
#[derive(Debug, Default)]
struct State {
    deployments: KindState,
    statefulsets: KindState,
}

/// A workload skipped for bad settings.
#[derive(Debug, Clone, PartialEq)]
struct Failure {
    workload: Workload,
    error: ConfigError,
}

#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    catalog: Catalog,
    workloads: Workloads,
    failures: Vec<Failure>,
}

impl State {
    fn kind_mut(&mut self, kind: WorkloadKind) -> &mut KindState {
        match kind {
            WorkloadKind::Deployment => &mut self.deployments,
            WorkloadKind::StatefulSet => &mut self.statefulsets,
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Init(kind) => self.kind_mut(kind).relist = Some(BTreeMap::new()),
            Change::InitApply(observed) => {
                let state = self.kind_mut(observed.workload.kind);
                let key = (
                    observed.workload.namespace.clone(),
                    observed.workload.name.clone(),
                );
                state.remember(&key, &observed);
                state
                    .relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, observed);
            }
            Change::InitDone(kind) => {
                let state = self.kind_mut(kind);
                state.live = state.relist.take().unwrap_or_default();
                let live = &state.live;
                state.last_good.retain(|key, _| live.contains_key(key));
                state.synced = true;
            }
            Change::Apply(observed) => {
                let state = self.kind_mut(observed.workload.kind);
                let key = (
                    observed.workload.namespace.clone(),
                    observed.workload.name.clone(),
                );
                state.remember(&key, &observed);
                state.live.insert(key, observed);
            }
            Change::Delete(kind, namespace, name) => {
                let state = self.kind_mut(kind);
                let key = (namespace, name);
                state.live.remove(&key);
                state.last_good.remove(&key);
            }
            Change::Failed(..) => {}
        }
    }

    /// Both kinds have completed their initial list.
    fn synced(&self) -> bool {
        self.deployments.synced && self.statefulsets.synced
    }

    fn snapshot<'a>(&'a self) -> Snapshot {
        let mut functions = Vec::new();
        let mut workloads = Workloads::new();
        let mut failures = Vec::new();
        let mut claimed: HashSet<&ObjectKey> = HashSet::new();
        // Deployments first: they win a name shared with a StatefulSet.
        let in_kind = |k: &'a KindState| k.live.iter().map(move |(key, o)| (key, o, &k.last_good));
        let all = in_kind(&self.deployments).chain(in_kind(&self.statefulsets));
        for (key, observed, last_good) in all {
            let is_function = !matches!(observed.setting, Ok(None));
            if !is_function {
                continue;
            }
            if !claimed.insert(key) {
                failures.push(Failure {
                    workload: observed.workload.clone(),
                    error: ConfigError::DuplicateFunction {
                        function: observed.workload.key(),
                        first_line: None,
                        line: None,
                    },
                });
                continue;
            }
            match &observed.setting {
                Ok(Some(spec)) => {
                    functions.push(Function {
                        spec: spec.clone(),
                        ready_replicas: Some(observed.workload.ready_replicas),
                    });
                    workloads.insert(observed.workload.key(), observed.workload.clone());
                }
                Err(error) => {
                    // Reported, and served on its last valid settings.
                    failures.push(Failure {
                        workload: observed.workload.clone(),
                        error: error.clone(),
                    });
                    if let Some(spec) = last_good.get(key) {
                        functions.push(Function {
                            spec: spec.clone(),
                            ready_replicas: Some(observed.workload.ready_replicas),
                        });
                        workloads.insert(observed.workload.key(), observed.workload.clone());
                    }
                }
                Ok(None) => {}
            }
        }
        let by_object = |w: &Workload| (w.namespace.clone(), w.name.clone(), w.kind);
        functions.sort_by(|a, b| {
            (&a.spec.namespace, &a.spec.name).cmp(&(&b.spec.namespace, &b.spec.name))
        });
        failures.sort_by_key(|f| by_object(&f.workload));
        Snapshot {
            catalog: Catalog {
                functions,
                errors: failures.iter().map(|f| f.error.clone()).collect(),
            },
            workloads,
            failures,
        }
    }
}

/// Which configuration errors were already reported, so each distinct error
/// of an object is reported once (again only after it was fixed in between).
#[derive(Debug, Default)]
struct Reported {
    errors: HashMap<(WorkloadKind, String, String), ConfigError>,
}

impl Reported {
    /// The failures not reported yet; forgets objects that no longer fail.
    fn news<'a>(&mut self, failures: &'a [Failure]) -> Vec<&'a Failure> {
        let mut news = Vec::new();
        let mut current = HashSet::new();
        for failure in failures {
            let id = (
                failure.workload.kind,
                failure.workload.namespace.clone(),
                failure.workload.name.clone(),
            );
            if self.errors.get(&id) != Some(&failure.error) {
                self.errors.insert(id.clone(), failure.error.clone());
                news.push(failure);
            }
            current.insert(id);
        }
        self.errors.retain(|id, _| current.contains(id));
        news
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
    ) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            annotations: Some(map(annotations)),
            labels: Some(map(labels)),
            resource_version: Some("1".to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn dep(ns: &str, name: &str, annotations: &[(&str, &str)], ready: Option<i32>) -> Observed {
        observe(
            WorkloadKind::Deployment,
            &meta(ns, name, annotations, &[]),
            Some(1),
            ready,
        )
    }

    fn sts(ns: &str, name: &str, annotations: &[(&str, &str)]) -> Observed {
        observe(
            WorkloadKind::StatefulSet,
            &meta(ns, name, annotations, &[]),
            None,
            None,
        )
    }

    fn synced(deployments: Vec<Observed>, statefulsets: Vec<Observed>) -> State {
        let mut state = State::default();
        for kind in [WorkloadKind::Deployment, WorkloadKind::StatefulSet] {
            state.apply(Change::Init(kind));
        }
        for o in deployments.into_iter().chain(statefulsets) {
            state.apply(Change::InitApply(o));
        }
        for kind in [WorkloadKind::Deployment, WorkloadKind::StatefulSet] {
            state.apply(Change::InitDone(kind));
        }
        state
    }

    fn names(catalog: &Catalog) -> Vec<String> {
        catalog
            .functions
            .iter()
            .map(|f| f.key().to_string())
            .collect()
    }

    const TOPIC: (&str, &str) = ("ebb.io/topics", "orders");
    const BAD: (&str, &str) = ("ebb.io/max-replicas", "ten");

    #[test]
    fn not_synced_until_both_kinds_listed() {
        let mut state = State::default();
        state.apply(Change::Init(WorkloadKind::Deployment));
        state.apply(Change::InitApply(dep("a", "f", &[TOPIC], None)));
        state.apply(Change::InitDone(WorkloadKind::Deployment));
        assert!(!state.synced());
        state.apply(Change::Init(WorkloadKind::StatefulSet));
        state.apply(Change::InitDone(WorkloadKind::StatefulSet));
        assert!(state.synced());
        assert_eq!(names(&state.snapshot().catalog), ["a/f"]);
    }

    #[test]
    fn sorts_skips_plain_and_collects_errors() {
        let state = synced(
            vec![
                dep("b", "z", &[TOPIC], Some(2)),
                dep("a", "plain", &[], None),
                dep("a", "bad", &[BAD], None),
            ],
            vec![sts("a", "y", &[TOPIC])],
        );
        let snap = state.snapshot();
        assert_eq!(names(&snap.catalog), ["a/y", "b/z"]);
        assert_eq!(snap.catalog.functions[1].ready_replicas, Some(2));
        assert_eq!(snap.catalog.functions[0].ready_replicas, Some(0));
        assert_eq!(snap.catalog.errors.len(), 1);
        assert_eq!(snap.catalog.errors[0].function(), Some("a/bad"));
        assert_eq!(snap.workloads["a/y"].kind, WorkloadKind::StatefulSet);
        assert_eq!(snap.workloads["b/z"].kind, WorkloadKind::Deployment);
        assert_eq!(
            snap.workloads["b/z"].scale_path(),
            "/apis/apps/v1/namespaces/b/deployments/z/scale"
        );
    }

    #[test]
    fn a_function_whose_settings_break_is_served_on_its_last_valid_ones() {
        let mut state = synced(vec![dep("a", "f", &[TOPIC], Some(1))], vec![]);
        let good = state.snapshot().catalog.functions[0].spec.clone();
        // Broken by an edit: reported, still served as it was, with the
        // replicas it has now.
        state.apply(Change::Apply(dep("a", "f", &[TOPIC, BAD], Some(2))));
        let snap = state.snapshot();
        assert_eq!(names(&snap.catalog), ["a/f"]);
        assert_eq!(snap.catalog.functions[0].spec, good);
        assert_eq!(snap.catalog.functions[0].ready_replicas, Some(2));
        assert_eq!(snap.catalog.errors.len(), 1);
        assert_eq!(snap.failures[0].workload.key(), "a/f");
        assert!(snap.workloads.contains_key("a/f"), "still scaled");
        // Across a re-list too.
        state.apply(Change::Init(WorkloadKind::Deployment));
        state.apply(Change::InitApply(dep("a", "f", &[TOPIC, BAD], Some(2))));
        state.apply(Change::InitDone(WorkloadKind::Deployment));
        assert_eq!(state.snapshot().catalog.functions[0].spec, good);
        // Deleted: gone, and broken when it comes back means not served.
        state.apply(Change::Delete(
            WorkloadKind::Deployment,
            "a".into(),
            "f".into(),
        ));
        state.apply(Change::Apply(dep("a", "f", &[TOPIC, BAD], None)));
        let snap = state.snapshot();
        assert!(snap.catalog.functions.is_empty());
        assert_eq!(snap.catalog.errors.len(), 1);
    }

    #[test]
    fn deployment_wins_a_shared_name() {
        let state = synced(
            vec![dep("a", "f", &[TOPIC], None)],
            vec![sts("a", "f", &[TOPIC])],
        );
        let snap = state.snapshot();
        assert_eq!(names(&snap.catalog), ["a/f"]);
        assert_eq!(snap.workloads["a/f"].kind, WorkloadKind::Deployment);
        assert_eq!(snap.failures.len(), 1);
        assert_eq!(snap.failures[0].workload.kind, WorkloadKind::StatefulSet);
        assert_eq!(snap.failures[0].error.metric_label(), "duplicate_function");
    }

    #[test]
    fn live_changes_and_relist_replace_state() {
        let mut state = synced(vec![dep("a", "f", &[TOPIC], None)], vec![]);
        state.apply(Change::Apply(dep("a", "g", &[TOPIC], None)));
        assert_eq!(names(&state.snapshot().catalog), ["a/f", "a/g"]);
        state.apply(Change::Apply(dep("a", "f", &[TOPIC], Some(3))));
        assert_eq!(
            state.snapshot().catalog.functions[0].ready_replicas,
            Some(3)
        );
        state.apply(Change::Delete(
            WorkloadKind::Deployment,
            "a".into(),
            "f".into(),
        ));
        assert_eq!(names(&state.snapshot().catalog), ["a/g"]);

        // A re-list keeps serving the old state until it is complete, then
        // drops what disappeared meanwhile.
        state.apply(Change::Init(WorkloadKind::Deployment));
        state.apply(Change::InitApply(dep("a", "h", &[TOPIC], None)));
        assert_eq!(names(&state.snapshot().catalog), ["a/g"]);
        state.apply(Change::InitDone(WorkloadKind::Deployment));
        assert_eq!(names(&state.snapshot().catalog), ["a/h"]);
    }

    #[test]
    fn each_distinct_error_is_reported_once() {
        let mut reported = Reported::default();
        let bad = synced(vec![dep("a", "bad", &[BAD], None)], vec![]).snapshot();
        assert_eq!(reported.news(&bad.failures).len(), 1);
        // Resync or status change: same error, nothing new.
        assert!(reported.news(&bad.failures).is_empty());
        // Another mistake on the same object is news.
        let worse = synced(
            vec![dep("a", "bad", &[("ebb.io/target", "x")], None)],
            vec![],
        )
        .snapshot();
        assert_eq!(reported.news(&worse.failures).len(), 1);
        // Fixed, then broken again the same way: reported again.
        assert!(reported.news(&[]).is_empty());
        assert_eq!(reported.news(&worse.failures).len(), 1);
    }
}
