//! The Kubernetes scale target: reads and writes the `scale` subresource of
//! Deployments and StatefulSets (see DESIGN.md, "Scaling contract").
//!
//! - [`KubeTarget::get`]: `GET …/{deployments|statefulsets}/NAME/scale`.
//! - [`KubeTarget::set`]: a merge patch `{"spec":{"replicas":N}}` of the scale
//!   subresource, only when the count read differs; 409 and 5xx are retried
//!   (bounded, with backoff) after re-reading the scale; a `Normal` Event
//!   `Scaled` ("scaled from A to B: reason") is written on the workload.
//! - [`KubeTarget::set_from`]: the same patch guarded by the
//!   `resourceVersion` the count was decided from: a workload changed since
//!   answers 409 and is [`SetOutcome::Stale`], nothing written, for the
//!   caller to decide again (the poll does, [`Applied::Stale`]).
//! - [`KubeTarget::wake`]: 0 → N only while the count is still 0, guarded by
//!   the `resourceVersion` read, so concurrent wakes patch once.
//! - [`KubeTarget::hpa_targets`] / [`KubeTarget::warn_hpa`]: workloads also
//!   scaled by a HorizontalPodAutoscaler are left alone, with one `Warning`
//!   Event `HPAConflict` each.
//!
//! RBAC: `get` and `patch` on `deployments/scale` and `statefulsets/scale`
//! (group `apps`), `list` on `horizontalpodautoscalers` (group
//! `autoscaling`), and, for Events, `create`/`patch` on `events`.
//!
//! [`ScaleTarget`] is what the poll step ([`crate::poll`]) scales through:
//! `ebb autoscaler` implements it over [`KubeTarget`], `ebb dev` over its
//! local replicas.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_model::FunctionSpec;
use tokio::time::Instant;

use crate::policy::Reason;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale as ApiScale;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, core::Status};
use serde_json::json;

pub use ebb_kube::WorkloadKind;

/// Reason of the `Normal` Event written after a change of the count.
pub const SCALED_REASON: &str = "Scaled";
/// Reason of the `Warning` Event on a workload also targeted by an HPA.
pub const HPA_CONFLICT_REASON: &str = "HPAConflict";

/// Attempts of a write (the first included) before giving up.
const DEFAULT_ATTEMPTS: u32 = 5;
/// The first retry waits this long, doubling up to [`MAX_BACKOFF`].
const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A function's replica counts, as its scale target sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCounts {
    /// Replicas asked for (Kubernetes: the scale's `spec.replicas`).
    pub current: u32,
    /// Of those, ready to serve; `None` counts every current replica as
    /// ready.
    pub ready: Option<u32>,
}

/// A new count decided for a function.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The count decided from.
    pub from: u32,
    pub to: u32,
    pub reason: &'a Reason,
    /// When the poll began to read the function's inputs.
    pub seen: Instant,
}

/// What [`ScaleTarget::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The count is set.
    Done,
    /// The target declined, without error (another controller, such as an
    /// HPA, scales the workload).
    LeftAlone,
    /// Nothing written: the workload changed since it was read (on
    /// Kubernetes, the patch's resourceVersion answered 409), so the count
    /// was decided from stale data. Read it again
    /// ([`ScaleTarget::reread`]) and decide anew.
    Stale,
}

/// Where functions' replicas are counted and changed.
pub trait ScaleTarget: Sync {
    /// What scalers may read of a function's workload (see
    /// [`crate::scalers::Scaler`]).
    type Workload: Send + Sync;
    type Error: std::fmt::Display + Send;

    /// The workload of `f` and its counts now, or `None` when `f` has none
    /// here (it is not scaled).
    fn workload(
        &self,
        f: &Arc<FunctionSpec>,
    ) -> impl Future<Output = Option<(Self::Workload, ReplicaCounts)>> + Send;

    /// The workload of `f` and its counts read again from the source of
    /// truth, after [`Applied::Stale`]; `None` when it cannot be read.
    fn reread(
        &self,
        f: &Arc<FunctionSpec>,
        w: &Self::Workload,
    ) -> impl Future<Output = Option<(Self::Workload, ReplicaCounts)>> + Send;

    /// Sets the count of `f` to `change.to`.
    fn apply(
        &self,
        f: &Arc<FunctionSpec>,
        w: &Self::Workload,
        change: Change<'_>,
    ) -> impl Future<Output = Applying<Self>> + Send;
}

/// What [`ScaleTarget::apply`] of `T` returns.
pub type Applying<T> = Result<Applied, <T as ScaleTarget>::Error>;

/// The workload a function runs as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl WorkloadRef {
    pub fn new(kind: WorkloadKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A Deployment.
    pub fn deployment(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(WorkloadKind::Deployment, namespace, name)
    }

    /// A StatefulSet.
    pub fn statefulset(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(WorkloadKind::StatefulSet, namespace, name)
    }

    /// `/apis/apps/v1/namespaces/NS/{deployments|statefulsets}/NAME/scale`.
    pub fn scale_path(&self) -> String {
        format!(
            "/apis/{}/namespaces/{}/{}/{}/scale",
            self.kind.api_version(),
            self.namespace,
            self.kind.plural(),
            self.name
        )
    }

    /// A reference for Events about the workload (`uid` lets `kubectl
    /// describe` find them; the scale subresource carries it).
    pub fn object_ref(&self, uid: Option<String>) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.kind.api_version().to_owned()),
            kind: Some(self.kind.as_str().to_owned()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid,
            ..ObjectReference::default()
        }
    }
}

impl std::fmt::Display for WorkloadRef {
    /// `Deployment shop/echo`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl From<&ebb_kube::Workload> for WorkloadRef {
    fn from(w: &ebb_kube::Workload) -> Self {
        Self::new(w.kind, w.namespace.clone(), w.name.clone())
    }
}

/// The scale subresource as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scale {
    /// `spec.replicas` (the desired count).
    pub replicas: u32,
    /// `metadata.resourceVersion` of the workload.
    pub resource_version: String,
    /// `metadata.uid` of the workload, when the server sent it.
    pub uid: Option<String>,
}

impl Scale {
    fn from_api(scale: ApiScale) -> Self {
        let replicas = scale
            .spec
            .and_then(|s| s.replicas)
            .map_or(0, |r| u32::try_from(r).unwrap_or(0));
        Self {
            replicas,
            resource_version: scale.metadata.resource_version.unwrap_or_default(),
            uid: scale.metadata.uid,
        }
    }
}

/// What [`KubeTarget::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// The count was already `replicas`: nothing written.
    Unchanged { replicas: u32 },
    /// Patched from `from` (the count read just before) to `to`.
    Scaled { from: u32, to: u32 },
    /// Nothing written: the workload changed since the scale it was
    /// decided from ([`KubeTarget::set_from`], a 409).
    Stale,
}

/// What [`KubeTarget::wake`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// This call patched 0 → `to`.
    Woken { to: u32 },
    /// The count was (or concurrently became) `replicas` > 0: nothing written.
    AlreadyUp { replicas: u32 },
}

impl WakeOutcome {
    /// The count after the call (> 0 either way).
    pub fn replicas(self) -> u32 {
        match self {
            Self::Woken { to } => to,
            Self::AlreadyUp { replicas } => replicas,
        }
    }
}

/// A failure of the scale target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The workload (or its scale subresource) does not exist.
    #[error("{workload} not found (its scale subresource answered 404)")]
    NotFound { workload: String },
    /// RBAC refused a request; never retried.
    #[error(
        "forbidden: ebb's service account needs RBAC `{verb}` on `{resource}` in API group `{group}` \
         (namespace {namespace}): {message}"
    )]
    Forbidden {
        verb: &'static str,
        /// `deployments/scale`, `statefulsets/scale` or `horizontalpodautoscalers`.
        resource: String,
        group: &'static str,
        namespace: String,
        message: String,
    },
    /// Still conflicting (409) after every attempt.
    #[error(
        "{workload}: the scale kept changing concurrently (409 Conflict after {attempts} attempts)"
    )]
    Conflict { workload: String, attempts: u32 },
    /// Any other API or transport failure (5xx after every attempt included).
    #[error("kubernetes API: {0}")]
    Api(#[source] kube::Error),
}

impl TargetError {
    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "scale_not_found",
            Self::Forbidden { .. } => "scale_forbidden",
            Self::Conflict { .. } => "scale_conflict",
            Self::Api(_) => "kube_api",
        }
    }

    /// Worth another attempt: 409, 5xx, 429 and transport failures.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Conflict { .. } => true,
            Self::Api(kube::Error::Api(status)) => status.code == 429 || status.code >= 500,
            Self::Api(kube::Error::HyperError(_) | kube::Error::Service(_)) => true,
            _ => false,
        }
    }
}

/// Scales Deployments and StatefulSets through their scale subresource.
/// Cheap to clone; clones share the "HPA warned" memory.
#[derive(Clone)]
pub struct KubeTarget {
    client: Client,
    recorder: Option<ebb_kube::Recorder>,
    attempts: u32,
    backoff: Duration,
    hpa_warned: Arc<Mutex<HashSet<WorkloadRef>>>,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget")
            .field("recorder", &self.recorder)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl KubeTarget {
    /// A target writing Events with `recorder` (none when `None`).
    pub fn new(client: Client, recorder: Option<ebb_kube::Recorder>) -> Self {
        Self {
            client,
            recorder,
            attempts: DEFAULT_ATTEMPTS,
            backoff: DEFAULT_BACKOFF,
            hpa_warned: Arc::default(),
        }
    }

    /// At most `attempts` tries per write (at least 1), the first retry after
    /// `backoff`, doubling (capped at 2 s). Default 5 and 100 ms.
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    /// Reads the scale subresource.
    pub async fn get(&self, w: &WorkloadRef) -> Result<Scale, TargetError> {
        let result = match w.kind {
            WorkloadKind::Deployment => self.api::<Deployment>(w).get_scale(&w.name).await,
            WorkloadKind::StatefulSet => self.api::<StatefulSet>(w).get_scale(&w.name).await,
        };
        result
            .map(Scale::from_api)
            .map_err(|err| classify(err, w, "get"))
    }

    /// Sets `spec.replicas` to `to` when it differs from the count read
    /// (one `GET`, then a merge patch). `from` is the count the caller
    /// decided from; the Event and the outcome report the count actually
    /// read. 409, 5xx and transport failures are retried after a backoff,
    /// re-reading first; 403 and 404 are not.
    pub async fn set(
        &self,
        w: &WorkloadRef,
        from: u32,
        to: u32,
        reason: &str,
    ) -> Result<SetOutcome, TargetError> {
        let outcome = self
            .retrying(w, || async {
                let current = self.get(w).await?;
                if current.replicas == to {
                    return Ok((SetOutcome::Unchanged { replicas: to }, current.uid));
                }
                let patch = json!({"spec": {"replicas": to}});
                self.patch_scale(w, &patch).await?;
                Ok((
                    SetOutcome::Scaled {
                        from: current.replicas,
                        to,
                    },
                    current.uid,
                ))
            })
            .await?;
        if let (SetOutcome::Scaled { from: read, to }, uid) = &outcome {
            if *read != from {
                tracing::debug!(workload = %w, expected = from, read, "scale count differed from the caller's");
            }
            let message = format!("scaled from {read} to {to}: {reason}");
            tracing::info!(workload = %w, from = read, to, reason, "scaled");
            self.event(w, uid.clone(), false, SCALED_REASON, &message)
                .await;
        }
        Ok(outcome.0)
    }

    /// Sets `spec.replicas` to `to` only if the workload is still as in
    /// `from`, the scale the count was decided from: the merge patch carries
    /// its `resourceVersion`, so a change since (the count, or the
    /// workload's status) answers 409 and is [`SetOutcome::Stale`], with
    /// nothing written and not retried. 5xx and transport failures are
    /// retried after a backoff with the same version; 403 and 404 are not.
    pub async fn set_from(
        &self,
        w: &WorkloadRef,
        from: &Scale,
        to: u32,
        reason: &str,
    ) -> Result<SetOutcome, TargetError> {
        if from.replicas == to {
            return Ok(SetOutcome::Unchanged { replicas: to });
        }
        let patch = json!({
            "metadata": {"resourceVersion": from.resource_version},
            "spec": {"replicas": to},
        });
        let patched = self
            .retrying(w, || async {
                match self.patch_scale(w, &patch).await {
                    Err(TargetError::Conflict { .. }) => Ok(false),
                    other => other.map(|()| true),
                }
            })
            .await?;
        if !patched {
            tracing::debug!(workload = %w, version = %from.resource_version, "scale decided from a stale version");
            return Ok(SetOutcome::Stale);
        }
        let message = format!("scaled from {} to {to}: {reason}", from.replicas);
        tracing::info!(workload = %w, from = from.replicas, to, reason, "scaled");
        self.event(w, from.uid.clone(), false, SCALED_REASON, &message)
            .await;
        Ok(SetOutcome::Scaled {
            from: from.replicas,
            to,
        })
    }

    /// Scales 0 → `to` (at least 1), only while the count is still 0: the
    /// patch carries the `resourceVersion` read, so a concurrent change
    /// answers 409 and is re-read. Idempotent: a count > 0 is
    /// [`WakeOutcome::AlreadyUp`] and writes nothing.
    pub async fn wake(&self, w: &WorkloadRef, to: u32) -> Result<WakeOutcome, TargetError> {
        let to = to.max(1);
        let (outcome, uid) = self
            .retrying(w, || async {
                let current = self.get(w).await?;
                if current.replicas > 0 {
                    return Ok((
                        WakeOutcome::AlreadyUp {
                            replicas: current.replicas,
                        },
                        current.uid,
                    ));
                }
                let patch = json!({
                    "metadata": {"resourceVersion": current.resource_version},
                    "spec": {"replicas": to},
                });
                self.patch_scale(w, &patch).await?;
                Ok((WakeOutcome::Woken { to }, current.uid))
            })
            .await?;
        if let WakeOutcome::Woken { to } = outcome {
            tracing::info!(workload = %w, to, "woken from zero");
            let message = format!("scaled from 0 to {to}: work arrived");
            self.event(w, uid, false, SCALED_REASON, &message).await;
        }
        Ok(outcome)
    }

    /// The workloads (kind, name) in `namespace` that an `autoscaling/v2`
    /// HorizontalPodAutoscaler scales: ebb leaves them alone.
    pub async fn hpa_targets(
        &self,
        namespace: &str,
    ) -> Result<HashSet<(WorkloadKind, String)>, TargetError> {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(self.client.clone(), namespace);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|err| match err {
                kube::Error::Api(status) if status.is_forbidden() => TargetError::Forbidden {
                    verb: "list",
                    resource: "horizontalpodautoscalers".to_owned(),
                    group: "autoscaling",
                    namespace: namespace.to_owned(),
                    message: status.message.clone(),
                },
                err => TargetError::Api(err),
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|hpa| {
                let target = hpa.spec?.scale_target_ref;
                let in_apps = target
                    .api_version
                    .as_deref()
                    .is_none_or(|v| v.starts_with("apps/"));
                let kind = match target.kind.as_str() {
                    "Deployment" => WorkloadKind::Deployment,
                    "StatefulSet" => WorkloadKind::StatefulSet,
                    _ => return None,
                };
                in_apps.then_some((kind, target.name))
            })
            .collect())
    }

    /// Writes a `Warning` Event `HPAConflict` on `w` the first time it is
    /// called for it (true then); later calls do nothing (false). Without a
    /// recorder only logs.
    pub async fn warn_hpa(&self, w: &WorkloadRef) -> bool {
        let first = self
            .hpa_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(w.clone());
        if first {
            let message = format!(
                "not autoscaled by ebb: a HorizontalPodAutoscaler also scales this {}; \
                 remove the HPA or ebb's annotations",
                w.kind
            );
            tracing::warn!(workload = %w, "{message}");
            self.event(w, None, true, HPA_CONFLICT_REASON, &message)
                .await;
        }
        first
    }

    /// Forgets that `w` was warned about (its HPA went away), so a new
    /// conflict warns again.
    pub fn forget_hpa_warning(&self, w: &WorkloadRef) {
        self.hpa_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(w);
    }

    fn api<K>(&self, w: &WorkloadRef) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &w.namespace)
    }

    async fn patch_scale(
        &self,
        w: &WorkloadRef,
        patch: &serde_json::Value,
    ) -> Result<(), TargetError> {
        let params = PatchParams::default();
        let patch = Patch::Merge(patch);
        let result = match w.kind {
            WorkloadKind::Deployment => {
                self.api::<Deployment>(w)
                    .patch_scale(&w.name, &params, &patch)
                    .await
            }
            WorkloadKind::StatefulSet => {
                self.api::<StatefulSet>(w)
                    .patch_scale(&w.name, &params, &patch)
                    .await
            }
        };
        result.map(drop).map_err(|err| classify(err, w, "patch"))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts are
    /// spent; waits with exponential backoff in between.
    async fn retrying<T, F, Fut>(&self, w: &WorkloadRef, mut attempt: F) -> Result<T, TargetError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TargetError>>,
    {
        let mut delay = self.backoff;
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_retryable() && n < self.attempts => {
                    tracing::debug!(workload = %w, attempt = n, error = %err, "scale write retried");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    n += 1;
                }
                Err(TargetError::Conflict { workload, .. }) => {
                    return Err(TargetError::Conflict {
                        workload,
                        attempts: n,
                    });
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn event(
        &self,
        w: &WorkloadRef,
        uid: Option<String>,
        warning: bool,
        reason: &str,
        message: &str,
    ) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let regarding = w.object_ref(uid);
        let result = if warning {
            recorder.warning(&regarding, reason, message).await
        } else {
            recorder.normal(&regarding, reason, message).await
        };
        if let Err(err) = result {
            tracing::warn!(workload = %w, reason, error = %err, "cannot write an Event");
        }
    }
}

/// Maps an error of a scale request: 404, 403 (naming the permission) and 409
/// get their own variants.
fn classify(err: kube::Error, w: &WorkloadRef, verb: &'static str) -> TargetError {
    match err {
        kube::Error::Api(status) => classify_status(*status, w, verb),
        err => TargetError::Api(err),
    }
}

fn classify_status(status: Status, w: &WorkloadRef, verb: &'static str) -> TargetError {
    if status.is_not_found() {
        TargetError::NotFound {
            workload: w.to_string(),
        }
    } else if status.is_forbidden() {
        TargetError::Forbidden {
            verb,
            resource: format!("{}/scale", w.kind.plural()),
            group: "apps",
            namespace: w.namespace.clone(),
            message: status.message,
        }
    } else if status.is_conflict() {
        TargetError::Conflict {
            workload: w.to_string(),
            attempts: 1,
        }
    } else {
        TargetError::Api(kube::Error::Api(Box::new(status)))
    }
}

#[cfg(test)]
mod tests {
    //! Exact requests, answered one by one ([`Scenario`]).

    use std::time::Duration;

    use ebb_kube_double::Scenario;
    use serde_json::{Value, json};

    use super::*;

    fn mock_target() -> (KubeTarget, Scenario) {
        let (client, api) = Scenario::client();
        let target = KubeTarget::new(client, None).with_retries(3, Duration::from_millis(1));
        (target, api)
    }

    /// Runs `script` as the API server while `call` uses the target; the
    /// target is dropped before the server is awaited.
    async fn scripted<S, T>(
        script: impl FnOnce(Scenario) -> S,
        call: impl AsyncFnOnce(&KubeTarget) -> T,
    ) -> T
    where
        S: Future<Output = ()> + Send + 'static,
    {
        let (target, api) = mock_target();
        let server = tokio::spawn(script(api));
        let out = call(&target).await;
        drop(target);
        server.await.expect("server");
        out
    }

    fn scale(replicas: i32, rv: &str) -> Value {
        json!({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": "echo", "namespace": "shop", "resourceVersion": rv, "uid": "u-1"},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas},
        })
    }

    /// The next request is a GET of `path`: answers `replicas` at `rv`.
    async fn get_scale(api: &mut Scenario, path: &str, replicas: i32, rv: &str) {
        let (seen, reply) = api.next().await;
        assert_eq!((seen.method.as_str(), seen.uri.as_str()), ("GET", path));
        reply.json(200, &scale(replicas, rv));
    }

    /// The next request is a merge PATCH of `path` with `body`: answers
    /// `replicas` at `rv`.
    async fn merge_patch(api: &mut Scenario, path: &str, body: Value, replicas: i32, rv: &str) {
        let (seen, reply) = api.next().await;
        assert_eq!(seen.method, "PATCH");
        assert_eq!(seen.uri, format!("{path}?"));
        assert_eq!(
            seen.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(seen.body, body);
        reply.json(200, &scale(replicas, rv));
    }

    /// Answers the next request, whatever it is, with `replicas` at `rv`.
    async fn any_scale(api: &mut Scenario, replicas: i32, rv: &str) {
        let (_, reply) = api.next().await;
        reply.json(200, &scale(replicas, rv));
    }

    /// Answers a read with `before`, the next request with a conflict,
    /// then the re-read that must follow with `after` (replicas, version).
    async fn conflict_then_reread(api: &mut Scenario, before: (i32, &str), after: (i32, &str)) {
        any_scale(api, before.0, before.1).await;
        let (_, reply) = api.next().await;
        reply.status(409, "Conflict", "the object has been modified");
        let (seen, reply) = api.next().await;
        assert_eq!(seen.method, "GET", "re-read after 409");
        reply.json(200, &scale(after.0, after.1));
    }

    const DEPLOY_SCALE: &str = "/apis/apps/v1/namespaces/shop/deployments/echo/scale";

    fn deployment() -> WorkloadRef {
        WorkloadRef::deployment("shop", "echo")
    }

    /// Sets the [`deployment`] `from` → `to` while `script` answers.
    async fn set_deployment<S>(
        script: impl FnOnce(Scenario) -> S,
        (from, to): (u32, u32),
        reason: &str,
    ) -> Result<SetOutcome, TargetError>
    where
        S: Future<Output = ()> + Send + 'static,
    {
        let w = deployment();
        scripted(script, async |t| t.set(&w, from, to, reason).await).await
    }

    /// Wakes the [`deployment`] to one replica while `script` answers.
    async fn wake_deployment<S>(
        script: impl FnOnce(Scenario) -> S,
    ) -> Result<WakeOutcome, TargetError>
    where
        S: Future<Output = ()> + Send + 'static,
    {
        let w = deployment();
        scripted(script, async |t| t.wake(&w, 1).await).await
    }

    #[tokio::test]
    async fn get_reads_the_scale_subresource() {
        let w = deployment();
        assert_eq!(w.scale_path(), DEPLOY_SCALE);
        let got = scripted(
            async |mut api| get_scale(&mut api, DEPLOY_SCALE, 3, "42").await,
            async |t| t.get(&w).await.expect("get"),
        )
        .await;
        assert_eq!(
            got,
            Scale {
                replicas: 3,
                resource_version: "42".into(),
                uid: Some("u-1".into())
            }
        );
    }

    #[tokio::test]
    async fn set_merge_patches_spec_replicas() {
        let w = WorkloadRef::statefulset("shop", "echo");
        let path = "/apis/apps/v1/namespaces/shop/statefulsets/echo/scale";
        let script = async move |mut api| {
            get_scale(&mut api, path, 0, "7").await;
            let body = json!({"spec": {"replicas": 8}});
            merge_patch(&mut api, path, body, 8, "8").await;
        };
        let outcome = scripted(script, async |t| t.set(&w, 0, 8, "backlog 80").await).await;
        assert_eq!(outcome.expect("set"), SetOutcome::Scaled { from: 0, to: 8 });
    }

    #[tokio::test]
    async fn set_does_not_patch_an_unchanged_count() {
        let script = async |mut api| {
            get_scale(&mut api, DEPLOY_SCALE, 4, "7").await;
            // No further request: the client is dropped after `set`.
            api.closed(Duration::from_secs(1)).await;
        };
        let outcome = set_deployment(script, (3, 4), "same").await;
        assert_eq!(outcome.expect("set"), SetOutcome::Unchanged { replicas: 4 });
    }

    #[tokio::test]
    async fn set_retries_a_conflict_after_rereading() {
        let script = async |mut api| {
            conflict_then_reread(&mut api, (1, "7"), (2, "9")).await;
            let (seen, reply) = api.next().await;
            assert_eq!(seen.method, "PATCH");
            assert_eq!(seen.body, json!({"spec": {"replicas": 5}}));
            reply.json(200, &scale(5, "10"));
        };
        let outcome = set_deployment(script, (1, 5), "r").await;
        assert_eq!(outcome.expect("set"), SetOutcome::Scaled { from: 2, to: 5 });
    }

    #[tokio::test]
    async fn set_from_guards_the_patch_and_reports_a_stale_version() {
        let w = deployment();
        let from = Scale {
            replicas: 1,
            resource_version: "41".into(),
            uid: Some("u-1".into()),
        };
        let guarded =
            |to: u32| json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": to}});
        let script =
            async move |mut api| merge_patch(&mut api, DEPLOY_SCALE, guarded(0), 0, "42").await;
        let outcome = scripted(script, async |t| t.set_from(&w, &from, 0, "idle").await).await;
        assert_eq!(outcome.expect("set"), SetOutcome::Scaled { from: 1, to: 0 });
        // The workload changed since version 41: 409, nothing more sent.
        let script = async move |mut api: Scenario| {
            let (seen, reply) = api.next().await;
            assert_eq!(
                (seen.method.as_str(), seen.body.clone()),
                ("PATCH", guarded(3))
            );
            reply.status(409, "Conflict", "the object has been modified");
            api.closed(Duration::from_secs(1)).await;
        };
        let outcome = scripted(script, async |t| t.set_from(&w, &from, 3, "work").await).await;
        assert_eq!(outcome.expect("set"), SetOutcome::Stale);
    }

    #[tokio::test]
    async fn set_reports_a_forbidden_patch_without_retrying() {
        let script = async |mut api| {
            any_scale(&mut api, 1, "7").await;
            let (_, reply) = api.next().await;
            reply.status(403, "Forbidden", "cannot patch resource");
        };
        let err = set_deployment(script, (1, 5), "r")
            .await
            .expect_err("forbidden");
        assert_eq!(err.metric_label(), "scale_forbidden");
        let text = err.to_string();
        assert!(
            text.contains("`patch` on `deployments/scale` in API group `apps`"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn wake_patch_carries_the_resource_version() {
        let script = async |mut api| {
            get_scale(&mut api, DEPLOY_SCALE, 0, "123").await;
            let body = json!({"metadata": {"resourceVersion": "123"}, "spec": {"replicas": 1}});
            merge_patch(&mut api, DEPLOY_SCALE, body, 1, "124").await;
        };
        let outcome = wake_deployment(script).await;
        assert_eq!(outcome.expect("wake"), WakeOutcome::Woken { to: 1 });
    }

    #[tokio::test]
    async fn wake_after_a_conflict_sees_the_workload_up() {
        let script = async |mut api| {
            conflict_then_reread(&mut api, (0, "5"), (1, "6")).await;
        };
        let outcome = wake_deployment(script).await;
        assert_eq!(
            outcome.expect("wake"),
            WakeOutcome::AlreadyUp { replicas: 1 }
        );
    }

    #[tokio::test]
    async fn hpa_targets_lists_autoscaling_v2() {
        let script = async |mut api: Scenario| {
            let (seen, reply) = api.next().await;
            assert_eq!(seen.method, "GET");
            assert_eq!(
                seen.uri,
                "/apis/autoscaling/v2/namespaces/shop/horizontalpodautoscalers?"
            );
            let hpa = |name: &str, kind: &str, api: &str| {
                json!({"metadata": {"name": name, "namespace": "shop"},
                       "spec": {"scaleTargetRef": {"apiVersion": api, "kind": kind, "name": name},
                                "maxReplicas": 3}})
            };
            reply.json(
                200,
                &json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscalerList",
                        "metadata": {"resourceVersion": "1"},
                        "items": [hpa("a", "Deployment", "apps/v1"),
                                  hpa("b", "StatefulSet", "apps/v1"),
                                  hpa("c", "Rollout", "argoproj.io/v1alpha1")]}),
            );
        };
        let targets = scripted(script, async |t| t.hpa_targets("shop").await).await;
        let targets = targets.expect("list");
        let want: HashSet<_> = [
            (WorkloadKind::Deployment, "a".to_owned()),
            (WorkloadKind::StatefulSet, "b".to_owned()),
        ]
        .into();
        assert_eq!(targets, want);
    }

    #[test]
    fn metric_labels_are_bounded() {
        let w = WorkloadRef::deployment("shop", "echo");
        let err = classify_status(
            Status::failure("nope", "NotFound").with_code(404),
            &w,
            "get",
        );
        assert_eq!(err.metric_label(), "scale_not_found");
        assert!(err.to_string().contains("Deployment shop/echo"));
        let err = classify_status(
            Status::failure("boom", "InternalError").with_code(500),
            &w,
            "patch",
        );
        assert_eq!(err.metric_label(), "kube_api");
        assert!(err.is_retryable());
    }
}
