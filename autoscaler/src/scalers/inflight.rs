//! Workers' in-flight calls: `ebb_worker_inflight` (served by `ebb worker` on
//! `GET /metrics` of its main port) summed over the ready pods of a
//! function's workload.
//!
//! - The pods are those matching the workload's `spec.selector` (read once
//!   per workload uid: the selector of a Deployment or StatefulSet cannot
//!   change), listed with a `labelSelector`; only pods whose `Ready`
//!   condition is `True` count.
//! - Each is scraped at `http://{status.podIP}:{port}/metrics`, where `port`
//!   is the container port named `http` if there is one, else the default
//!   (`--worker-port`, 8080).
//! - A workload with no ready replicas (per its status, as discovery last saw
//!   it) or no ready pods has 0 in flight, without any request: that is not
//!   "unknown" (DESIGN, "Contract details").
//! - Any failure (the selector or the pods cannot be read, a ready pod
//!   without an IP, a scrape that fails or lacks the series) is an error:
//!   the caller treats it as unknown and holds the count.
//!
//! RBAC: `get` on `deployments` and `statefulsets` (group `apps`), `list` on
//! `pods`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use ebb_kube::{Workload, WorkloadKind};
use ebb_model::MetricSelector;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams};

use crate::scalers::prometheus::{HttpAuth, ScalerError};

/// The gauge `ebb worker` exposes.
pub const METRIC: &str = "ebb_worker_inflight";
/// The container port scraped when a pod declares one by this name.
pub const PORT_NAME: &str = "http";
/// The port scraped otherwise, unless configured (`ebb worker`'s default).
pub const DEFAULT_PORT: u16 = 8080;

/// Why the in-flight count of a function could not be read. The caller
/// treats every error as "unknown" (hold), never as 0.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum InflightError {
    #[error("cannot read the pod selector of {workload}: {source}")]
    Workload {
        workload: String,
        #[source]
        source: kube::Error,
    },
    #[error("{workload}: spec.selector selects nothing usable ({reason})")]
    Selector { workload: String, reason: String },
    #[error(
        "cannot list the pods of {workload} (ebb's service account needs `list` on `pods`): {source}"
    )]
    Pods {
        workload: String,
        #[source]
        source: kube::Error,
    },
    #[error("pod {namespace}/{pod} is ready but has no status.podIP")]
    NoPodIp { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} ({url}): {source}")]
    Scrape {
        namespace: String,
        pod: String,
        url: String,
        #[source]
        source: Box<ScalerError>,
    },
    #[error("the pods and their in-flight calls were not read within {0:?}")]
    Timeout(Duration),
    #[error("HTTP client: {0}")]
    Client(String),
}

impl InflightError {
    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            // A scrape's own failure tells more than that it failed.
            Self::Scrape { source, .. } => match **source {
                ScalerError::Timeout(_) => "scrape_timeout",
                ScalerError::MissingSeries(_) => "missing_series",
                _ => "scrape",
            },
            other => other.into(),
        }
    }
}

/// Where one ready pod's metrics are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEndpoint {
    pub name: String,
    /// `http://IP:PORT/metrics`.
    pub url: String,
}

/// Reads the in-flight count of functions from their workers.
pub struct InflightScaler {
    kube: kube::Client,
    http: reqwest::Client,
    default_port: u16,
    timeout: Duration,
    selectors: Mutex<Selectors>,
}

/// Label selector per workload (kind, namespace, name), with the uid it was
/// read for.
type Selectors = HashMap<(WorkloadKind, String, String), (Option<String>, String)>;

impl std::fmt::Debug for InflightScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightScaler")
            .field("default_port", &self.default_port)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl InflightScaler {
    /// Scrapes port `default_port` of pods without an `http` container port;
    /// `timeout` bounds one read (the pod list and every scrape).
    pub fn new(
        kube: kube::Client,
        default_port: u16,
        timeout: Duration,
    ) -> Result<Self, InflightError> {
        let http = HttpAuth::default()
            .client_builder()
            .map_err(|e| InflightError::Client(e.to_string()))?
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| InflightError::Client(e.to_string()))?;
        Ok(Self {
            kube,
            http,
            default_port,
            timeout,
            selectors: Mutex::default(),
        })
    }

    /// Calls in flight over the ready pods of `w`.
    pub async fn read(&self, w: &Workload) -> Result<f64, InflightError> {
        if w.ready_replicas == 0 {
            return Ok(0.0);
        }
        let work = async {
            let pods = self.ready_pods(w).await?;
            let selector = MetricSelector {
                name: METRIC.to_owned(),
                labels: BTreeMap::new(),
            };
            let scrapes = pods.iter().map(|pod| async {
                crate::scalers::prometheus::scrape(
                    &self.http,
                    &HttpAuth::default(),
                    &pod.url,
                    &selector,
                    self.timeout,
                )
                .await
                .map_err(|source| InflightError::Scrape {
                    namespace: w.namespace.clone(),
                    pod: pod.name.clone(),
                    url: pod.url.clone(),
                    source: Box::new(source),
                })
            });
            let mut total = 0.0;
            for value in futures::future::join_all(scrapes).await {
                total += value?;
            }
            Ok(total)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(InflightError::Timeout(self.timeout)),
        }
    }

    /// The ready pods of `w` and where to scrape them.
    pub async fn ready_pods(&self, w: &Workload) -> Result<Vec<PodEndpoint>, InflightError> {
        let selector = self.selector(w).await?;
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &w.namespace);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| InflightError::Pods {
                workload: describe(w),
                source,
            })?;
        let mut endpoints = Vec::new();
        for pod in &list.items {
            if let Some(endpoint) = endpoint(pod, self.default_port)? {
                endpoints.push(endpoint);
            }
        }
        Ok(endpoints)
    }

    /// The label selector of `w`, read once per uid.
    async fn selector(&self, w: &Workload) -> Result<String, InflightError> {
        let key = (w.kind, w.namespace.clone(), w.name.clone());
        if let Some((uid, selector)) = self.lock().get(&key)
            && *uid == w.uid
        {
            return Ok(selector.clone());
        }
        let label_selector = match w.kind {
            WorkloadKind::Deployment => {
                let api: Api<Deployment> = Api::namespaced(self.kube.clone(), &w.namespace);
                api.get(&w.name).await.map(|d| d.spec.map(|s| s.selector))
            }
            WorkloadKind::StatefulSet => {
                let api: Api<StatefulSet> = Api::namespaced(self.kube.clone(), &w.namespace);
                api.get(&w.name).await.map(|s| s.spec.map(|s| s.selector))
            }
        }
        .map_err(|source| InflightError::Workload {
            workload: describe(w),
            source,
        })?
        .unwrap_or_default();
        let selector =
            selector_string(&label_selector).map_err(|reason| InflightError::Selector {
                workload: describe(w),
                reason,
            })?;
        self.lock().insert(key, (w.uid.clone(), selector.clone()));
        Ok(selector)
    }

    /// Forgets the selectors of workloads for which `keep` is false.
    pub fn retain(&self, mut keep: impl FnMut(WorkloadKind, &str, &str) -> bool) {
        self.lock()
            .retain(|(kind, namespace, name), _| keep(*kind, namespace, name));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Selectors> {
        self.selectors.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl super::Scaler<Workload> for InflightScaler {
    fn name(&self) -> &'static str {
        "inflight"
    }

    fn role(&self) -> super::Role {
        super::Role::InFlight
    }

    fn serves(&self, _: &ebb_model::FunctionSpec) -> bool {
        true
    }

    fn read<'a>(
        &'a self,
        _: &'a ebb_model::FunctionSpec,
        w: &'a Workload,
    ) -> super::ReadFuture<'a> {
        Box::pin(async move { Ok(super::Reading::value(self.read(w).await?)) })
    }

    fn retain(&self, live: &[(&ebb_model::FunctionSpec, Option<&Workload>)]) {
        let live: std::collections::HashSet<(WorkloadKind, &str, &str)> = live
            .iter()
            .filter_map(|(_, w)| *w)
            .map(|w| (w.kind, w.namespace.as_str(), w.name.as_str()))
            .collect();
        InflightScaler::retain(self, |kind, namespace, name| {
            live.contains(&(kind, namespace, name))
        });
    }
}

fn describe(w: &Workload) -> String {
    format!("{} {}/{}", w.kind, w.namespace, w.name)
}

/// A `labelSelector` query value for `selector`: `matchLabels` as `k=v`,
/// `matchExpressions` as `k in (a,b)`, `k notin (a)`, `k`, `!k` (one value
/// of `In`/`NotIn` as `k=v`/`k!=v`). An empty selector, which would select
/// every pod of the namespace, is an error.
pub fn selector_string(selector: &LabelSelector) -> Result<String, String> {
    let mut terms = Vec::new();
    for (key, value) in selector.match_labels.iter().flatten() {
        terms.push(format!("{key}={value}"));
    }
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let term = match (e.operator.as_str(), values.as_slice()) {
            ("In", [one]) => format!("{}={one}", e.key),
            ("NotIn", [one]) => format!("{}!={one}", e.key),
            ("In", []) => return Err(format!("{} In with no values", e.key)),
            ("In", many) => format!("{} in ({})", e.key, many.join(",")),
            ("NotIn", many) => format!("{} notin ({})", e.key, many.join(",")),
            ("Exists", _) => e.key.clone(),
            ("DoesNotExist", _) => format!("!{}", e.key),
            (other, _) => return Err(format!("unknown operator {other:?}")),
        };
        terms.push(term);
    }
    if terms.is_empty() {
        return Err("the selector is empty".into());
    }
    Ok(terms.join(","))
}

/// Where to scrape `pod`, if it is ready: its IP and the container port named
/// [`PORT_NAME`], else `default_port`. A ready pod without an IP is an error.
pub fn endpoint(pod: &Pod, default_port: u16) -> Result<Option<PodEndpoint>, InflightError> {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Ok(None);
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| InflightError::NoPodIp {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: name.clone(),
        })?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(default_port);
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Ok(Some(PodEndpoint {
        name,
        url: format!("http://{host}:{port}/metrics"),
    }))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    #[test]
    fn selectors_become_label_selector_queries() {
        let s = LabelSelector {
            match_labels: Some([("app".to_owned(), "echo".to_owned())].into()),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
                LabelSelectorRequirement {
                    key: "zone".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["x".into()]),
                },
            ]),
        };
        assert_eq!(
            selector_string(&s).as_deref(),
            Ok("app=echo,tier in (a,b),!canary,zone!=x")
        );
        assert!(selector_string(&LabelSelector::default()).is_err());
    }

    #[test]
    fn only_ready_pods_are_scraped_on_their_http_port() {
        let ready = pod(json!({
            "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"containers": [
                {"name": "side", "ports": [{"name": "admin", "containerPort": 9000}]},
                {"name": "fn", "ports": [{"name": "http", "containerPort": 8081}]},
            ]},
            "status": {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
        }));
        assert_eq!(
            endpoint(&ready, 8080).unwrap(),
            Some(PodEndpoint {
                name: "a".into(),
                url: "http://10.0.0.7:8081/metrics".into()
            })
        );
        let unnamed = pod(json!({
            "metadata": {"name": "b"},
            "spec": {"containers": [{"name": "fn", "ports": [{"containerPort": 9999}]}]},
            "status": {"podIP": "fd00::1", "conditions": [{"type": "Ready", "status": "True"}]},
        }));
        assert_eq!(
            endpoint(&unnamed, 8080).unwrap().map(|e| e.url),
            Some("http://[fd00::1]:8080/metrics".into())
        );
        let not_ready = pod(json!({
            "metadata": {"name": "c"},
            "spec": {"containers": [{"name": "fn"}]},
            "status": {"podIP": "10.0.0.8", "conditions": [{"type": "Ready", "status": "False"}]},
        }));
        assert_eq!(endpoint(&not_ready, 8080).unwrap(), None);
        let pending = pod(json!({"metadata": {"name": "d"}, "spec": {"containers": []}}));
        assert_eq!(endpoint(&pending, 8080).unwrap(), None);
        let no_ip = pod(json!({
            "metadata": {"name": "e", "namespace": "shop"},
            "spec": {"containers": []},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }));
        let err = endpoint(&no_ip, 8080).unwrap_err();
        assert_eq!(err.metric_label(), "no_pod_ip");
        assert!(err.to_string().contains("shop/e"), "{err}");
    }
}
