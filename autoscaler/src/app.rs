//! The autoscaler process: discovery, the poll loop (leader only), the
//! wake-up endpoint (every replica) and the admin server.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use ebb_kube::{Discovery, Workloads};
use ebb_model::{Catalog, FunctionSpec};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::poll::{self, Poller};
use crate::scalers::Scaler;
use crate::scalers::nats::NatsScaler;
use crate::scalers::prometheus::{HttpAuth, PrometheusScaler};
use crate::target::{
    Applied, Change, KubeTarget, ReplicaCounts, ScaleTarget, WorkloadKind, WorkloadRef,
};

/// Settings of `ebb autoscaler`.
#[derive(Debug, Clone)]
pub struct AutoscalerConfig {
    pub admin_addr: SocketAddr,
    pub namespace: Option<String>,
    pub interval: Duration,
    /// NATS URL and stream for JetStream backlogs.
    pub nats: Option<(String, String)>,
    /// RabbitMQ queue depths: the management API, or an AMQP URL (ready only).
    pub rabbitmq: Option<RabbitSource>,
    /// Kafka consumer lag: bootstrap servers and where a new group starts.
    pub kafka: Option<(String, crate::scalers::kafka::OffsetReset)>,
    /// Timeout of one scaler read.
    pub scaler_timeout: Duration,
    /// Functions whose inputs are read (and whose count is decided and
    /// applied) at the same time during one poll; at least 1.
    pub max_concurrent_reads: usize,
    /// Credentials and CA of Prometheus endpoints and servers
    /// (`--prometheus-*` flags).
    pub prometheus_auth: HttpAuth,
    /// Credentials and CA of the RabbitMQ management API, replacing those of
    /// the AMQP URL when set (`--amqp-management-*` flags).
    pub amqp_management_auth: HttpAuth,
    /// Read the workers' in-flight calls (`ebb_worker_inflight` summed over
    /// the ready pods) as an input, scraping this port of pods without a
    /// container port named `http`; `None` does not read them.
    pub worker_inflight: Option<u16>,
    /// How long a cold start (0 → N) is followed until the first replica is
    /// ready, for `ebb_autoscaler_wake_to_ready_seconds`.
    pub cold_start_timeout: Duration,
    /// Leader election; `None` runs the poll loop unconditionally.
    pub lease: Option<ebb_kube::LeaseConfig>,
}

/// Where RabbitMQ queue depths come from.
#[derive(Debug, Clone)]
pub enum RabbitSource {
    /// `amqp://user:pass@host:port/vhost`: passive declares (ready messages only).
    Amqp(String),
    /// The management API (ready + unacked).
    Management(crate::scalers::rabbitmq::Management),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FnLabel {
    function: String,
}

/// What started a cold start: `wakeup` (`POST /wake/…`) or `poll` (the
/// poll loop saw work at zero).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

type ColdStartHistograms = Family<TriggerLabel, Histogram, fn() -> Histogram>;

fn cold_start_histogram() -> Histogram {
    // 50 ms … ~7 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

ebb_runtime::metrics! {
    /// The wake-up and cold-start metrics; the poll's are [`poll::Metrics`].
    #[derive(Clone)]
    struct Metrics {
        /// Wake-ups received.
        wakeups: Family<FnLabel, Counter> as "ebb_autoscaler_wakeups",
        /// From a wake-up received to the scale patched.
        wake_to_patch: Histogram as "ebb_autoscaler_wake_to_patch_seconds"
            = Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
        /// Cold starts (0 → N): from work seen (a wake-up received, or the poll) to the first replica ready.
        wake_to_ready: ColdStartHistograms as "ebb_autoscaler_wake_to_ready_seconds"
            = Family::new_with_constructor(cold_start_histogram),
        /// Cold starts (0 → N): from the scale patched to the first replica ready.
        patch_to_ready: ColdStartHistograms as "ebb_autoscaler_patch_to_ready_seconds"
            = Family::new_with_constructor(cold_start_histogram),
        /// Cold starts with no replica ready within --cold-start-timeout.
        cold_start_timeouts: Family<TriggerLabel, Counter> as "ebb_autoscaler_cold_start_timeouts",
    }
}

struct Shared {
    catalog: watch::Receiver<Arc<Catalog>>,
    workloads: watch::Receiver<Arc<Workloads>>,
    target: KubeTarget,
    metrics: Metrics,
    registry: Registry,
    ready: std::sync::atomic::AtomicBool,
    cold_start_timeout: Duration,
}

/// Follows a cold start of `key` (patched 0 → N at `patched`, for work seen
/// at `seen`) until the workload reports a ready replica, then records how
/// long each part took; gives up after `--cold-start-timeout`.
fn time_cold_start(
    s: &Shared,
    key: String,
    trigger: &'static str,
    seen: Instant,
    patched: Instant,
) {
    let mut workloads = s.workloads.clone();
    let metrics = s.metrics.clone();
    let limit = s.cold_start_timeout;
    tokio::spawn(async move {
        // Ready once the snapshot is one after the patch (replicas > 0), so a
        // stale status from before the scale to zero does not count.
        let ready = tokio::time::timeout(
            limit,
            workloads.wait_for(|ws| {
                ws.get(&key)
                    .is_some_and(|w| w.replicas.unwrap_or(1) > 0 && w.ready_replicas > 0)
            }),
        )
        .await
        .map(|r| r.is_ok());
        let label = TriggerLabel { trigger };
        match ready {
            Ok(true) => {
                let (total, kube) = (seen.elapsed(), patched.elapsed());
                metrics
                    .wake_to_ready
                    .get_or_create(&label)
                    .observe(total.as_secs_f64());
                metrics
                    .patch_to_ready
                    .get_or_create(&label)
                    .observe(kube.as_secs_f64());
                tracing::info!(function = %key, trigger, ?total, patch_to_ready = ?kube, "cold start: first replica ready");
            }
            Ok(false) => {} // discovery stopped: shutting down
            Err(_) => {
                metrics.cold_start_timeouts.get_or_create(&label).inc();
                tracing::warn!(function = %key, trigger, ?limit, "cold start: no replica ready in time");
            }
        }
    });
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_/health", get(|| async { "ok\n" }))
        .route(
            "/_/ready",
            get(|State(s): State<Arc<Shared>>| async move {
                if s.ready.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<Shared>>| async move {
                (
                    [(header::CONTENT_TYPE, ebb_runtime::METRICS_CONTENT_TYPE)],
                    ebb_runtime::encode_metrics(&s.registry),
                )
                    .into_response()
            }),
        )
        .route("/wake/{namespace}/{function}", post(wake))
        .with_state(shared)
}

/// `POST /wake/{namespace}/{function}`: 0 → max(1, min) at once, idempotent,
/// on any replica (the patch is guarded by resourceVersion).
async fn wake(
    State(s): State<Arc<Shared>>,
    Path((namespace, function)): Path<(String, String)>,
) -> impl IntoResponse {
    let started = Instant::now();
    let key = format!("{namespace}/{function}");
    s.metrics
        .wakeups
        .get_or_create(&FnLabel {
            function: key.clone(),
        })
        .inc();
    let spec = s
        .catalog
        .borrow()
        .get(&namespace, &function)
        .map(|f| f.spec.clone());
    let Some(spec) = spec else {
        return (StatusCode::NOT_FOUND, format!("no function {key}\n"));
    };
    let Some(w) = s.workloads.borrow().get(&key).map(WorkloadRef::from) else {
        return (StatusCode::NOT_FOUND, format!("no workload for {key}\n"));
    };
    if spec.paused {
        return (StatusCode::ACCEPTED, "paused\n".to_string());
    }
    let to = spec.min_replicas.max(1).min(spec.max_replicas.max(1));
    match s.target.wake(&w, to).await {
        Ok(outcome) => {
            s.metrics
                .wake_to_patch
                .observe(started.elapsed().as_secs_f64());
            if let crate::target::WakeOutcome::Woken { .. } = outcome {
                time_cold_start(&s, key.clone(), "wakeup", started, Instant::now());
            }
            tracing::info!(function = %key, ?outcome, "wake-up");
            (StatusCode::ACCEPTED, format!("{outcome:?}\n"))
        }
        Err(e) => {
            tracing::warn!(function = %key, error = %e, "wake-up failed");
            (StatusCode::BAD_GATEWAY, format!("{e}\n"))
        }
    }
}

/// HPA targets per namespace, listed at most once per poll (and only when a
/// function of that namespace is about to be scaled).
type HpaCache = Mutex<HashMap<String, Arc<tokio::sync::OnceCell<HashSet<(WorkloadKind, String)>>>>>;

/// The Kubernetes side of one poll: the workloads discovery last saw,
/// scaled through their scale subresource.
struct Kube<'a> {
    shared: &'a Shared,
    workloads: Arc<Workloads>,
    hpas: HpaCache,
}

impl ScaleTarget for Kube<'_> {
    type Workload = ebb_kube::Workload;
    type Error = crate::target::TargetError;

    async fn workload(&self, f: &Arc<FunctionSpec>) -> Option<(ebb_kube::Workload, ReplicaCounts)> {
        let w = self.workloads.get(&f.key().to_string())?;
        let counts = ReplicaCounts {
            current: w.replicas.unwrap_or(1),
            ready: Some(w.ready_replicas),
        };
        Some((w.clone(), counts))
    }

    async fn reread(
        &self,
        f: &Arc<FunctionSpec>,
        w: &ebb_kube::Workload,
    ) -> Option<(ebb_kube::Workload, ReplicaCounts)> {
        let scale = match self.shared.target.get(&WorkloadRef::from(w)).await {
            Ok(scale) => scale,
            Err(e) => {
                tracing::warn!(function = %f.key(), error = %e, "cannot read the scale again");
                return None;
            }
        };
        let fresh = ebb_kube::Workload {
            replicas: Some(scale.replicas),
            resource_version: Some(scale.resource_version),
            uid: scale.uid.or_else(|| w.uid.clone()),
            ..w.clone()
        };
        // The scale has no ready count: the one discovery saw stays.
        let counts = ReplicaCounts {
            current: scale.replicas,
            ready: Some(w.ready_replicas),
        };
        Some((fresh, counts))
    }

    async fn apply(
        &self,
        _: &Arc<FunctionSpec>,
        w: &ebb_kube::Workload,
        change: Change<'_>,
    ) -> Result<Applied, Self::Error> {
        let s = self.shared;
        let key = w.key();
        // Two controllers must never fight over one workload.
        let cell = self
            .hpas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(w.namespace.clone())
            .or_default()
            .clone();
        let targets = cell
            .get_or_init(|| async {
                // If HPAs cannot be listed (e.g. RBAC), scale anyway but say so:
                // holding every function on a missing permission would be worse.
                match s.target.hpa_targets(&w.namespace).await {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(namespace = %w.namespace, error = %e, "cannot list HorizontalPodAutoscalers; not checking for conflicts");
                        Default::default()
                    }
                }
            })
            .await;
        let wr = WorkloadRef::from(w);
        if targets.contains(&(wr.kind, wr.name.clone())) {
            s.target.warn_hpa(&wr).await;
            return Ok(Applied::LeftAlone);
        }
        let (from, to) = (change.from, change.to);
        let reason = change.reason.to_string();
        tracing::info!(function = %key, from, to, %reason, "scaling");
        // Guarded by the version the count was decided from.
        let decided_from = match &w.resource_version {
            Some(version) => crate::target::Scale {
                replicas: from,
                resource_version: version.clone(),
                uid: w.uid.clone(),
            },
            None => s.target.get(&wr).await?,
        };
        if decided_from.replicas != from {
            return Ok(Applied::Stale);
        }
        match s.target.set_from(&wr, &decided_from, to, &reason).await? {
            crate::target::SetOutcome::Stale => return Ok(Applied::Stale),
            crate::target::SetOutcome::Scaled { from: 0, .. } => {
                time_cold_start(s, key, "poll", change.seen, Instant::now());
            }
            _ => {}
        }
        Ok(Applied::Done)
    }
}

/// Checks credentials given by the flags `{prefix}-bearer-token-file`,
/// `{prefix}-user` + `{prefix}-password-file` and `{prefix}-ca-file` once at
/// start (they are read again on every request, so a rotation needs no
/// restart) and builds the HTTP client trusting the CA file. Errors name the
/// flag.
fn check_credentials(auth: &HttpAuth, prefix: &str) -> Result<reqwest::Client, Error> {
    if auth.bearer_token_file.is_some() && auth.basic_auth.is_some() {
        return Err(Error::Config(format!(
            "{prefix}-bearer-token-file and {prefix}-user are exclusive"
        )));
    }
    let check = |flag: &str, path: &std::path::Path| match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(Error::Config(format!(
            "{prefix}-{flag} {}: the file is empty",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(Error::Config(format!(
            "{prefix}-{flag} {}: cannot read it: {e}",
            path.display()
        ))),
    };
    if let Some(path) = &auth.bearer_token_file {
        check("bearer-token-file", path)?;
    }
    if let Some((_, path)) = &auth.basic_auth {
        check("password-file", path)?;
    }
    auth.build_client().map_err(|e| {
        let path = auth.ca_file.as_deref().unwrap_or(std::path::Path::new(""));
        let reason = match e {
            crate::scalers::prometheus::ScalerError::Credentials { reason, .. }
            | crate::scalers::prometheus::ScalerError::Tls { reason, .. } => reason,
            e => e.to_string(),
        };
        Error::Config(format!("{prefix}-ca-file {}: {reason}", path.display()))
    })
}

/// Runs the autoscaler until `shutdown`.
pub async fn run(cfg: AutoscalerConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Bad credentials are a config error before anything starts.
    let http = check_credentials(&cfg.prometheus_auth, "--prometheus")?;
    if let Some(RabbitSource::Management(_)) = &cfg.rabbitmq {
        check_credentials(&cfg.amqp_management_auth, "--amqp-management")?;
    }
    let client = ebb_kube::client()
        .await
        .map_err(|e| Error::Config(format!("--kubernetes: {e}")))?;
    let recorder = ebb_kube::Recorder::new(client.clone(), "ebb-autoscaler");
    let (ctx, crx) = watch::channel(Arc::new(Catalog::default()));
    let (wtx, wrx) = watch::channel(Arc::new(Workloads::default()));
    let mut first = crx.clone();
    let mut first_workloads = wrx.clone();
    let stop = CancellationToken::new();
    let discovery = Discovery::new(client.clone())
        .namespace(cfg.namespace.clone())
        .recorder(recorder.clone())
        .workloads(wtx);
    let disc_stop = stop.clone();
    let disc = tokio::spawn(async move {
        tokio::select! {
            r = discovery.run(ctx) => if let Err(e) = r { tracing::error!(error = %e, "discovery stopped"); },
            () = disc_stop.cancelled() => {}
        }
    });
    let nats = match &cfg.nats {
        Some((url, stream)) => Some(
            NatsScaler::connect(url, stream, cfg.scaler_timeout)
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
        ),
        None => None,
    };
    let rabbitmq = match &cfg.rabbitmq {
        Some(RabbitSource::Amqp(url)) => Some(
            crate::scalers::rabbitmq::RabbitMqScaler::amqp(url, cfg.scaler_timeout)
                .map_err(|e| Error::Config(format!("--amqp: {e}")))?,
        ),
        Some(RabbitSource::Management(m)) => Some(
            crate::scalers::rabbitmq::RabbitMqScaler::management_with_auth(
                m.clone(),
                cfg.amqp_management_auth.clone(),
                cfg.scaler_timeout,
            )
            .map_err(|e| Error::Config(format!("--amqp-management: {e}")))?,
        ),
        None => None,
    };
    if matches!(cfg.rabbitmq, Some(RabbitSource::Amqp(_))) && cfg.worker_inflight.is_none() {
        tracing::warn!(
            "RabbitMQ read by passive declare counts ready messages only: its functions are not \
             scaled to zero (calls in flight are unseen); use --amqp-management or --worker-inflight"
        );
    }
    let kafka = cfg.kafka.as_ref().map(|(brokers, reset)| {
        crate::scalers::kafka::KafkaScaler::new(brokers, *reset, cfg.scaler_timeout)
    });
    let inflight = match cfg.worker_inflight {
        Some(port) => Some(
            crate::scalers::inflight::InflightScaler::new(client.clone(), port, cfg.scaler_timeout)
                .map_err(|e| Error::Config(format!("--worker-inflight: {e}")))?,
        ),
        None => None,
    };
    // Read in this order: it names the first unknown input and breaks ties.
    let mut scalers: Vec<Box<dyn Scaler<ebb_kube::Workload>>> = Vec::new();
    if let Some(s) = rabbitmq {
        scalers.push(Box::new(s));
    }
    if let Some(s) = kafka {
        scalers.push(Box::new(s));
    }
    if let Some(s) = nats {
        scalers.push(Box::new(s));
    }
    scalers.push(Box::new(PrometheusScaler::new(
        http,
        cfg.prometheus_auth.clone(),
        cfg.scaler_timeout,
    )));
    if let Some(s) = inflight {
        scalers.push(Box::new(s));
    }

    let mut registry = Registry::default();
    let poller = Poller::new(
        scalers,
        poll::Metrics::register(&mut registry),
        cfg.max_concurrent_reads,
    );
    let metrics = Metrics::register(&mut registry);
    let shared = Arc::new(Shared {
        catalog: crx,
        workloads: wrx,
        target: KubeTarget::new(client.clone(), Some(recorder)),
        metrics,
        registry,
        ready: std::sync::atomic::AtomicBool::new(false),
        cold_start_timeout: cfg.cold_start_timeout,
    });
    let listener = tokio::net::TcpListener::bind(cfg.admin_addr)
        .await
        .map_err(|e| Error::Config(format!("--admin-addr {}: {e}", cfg.admin_addr)))?;
    tracing::info!(addr = %cfg.admin_addr, "admin server listening");
    let admin_stop = stop.clone();
    let app = router(shared.clone());
    let admin = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { admin_stop.cancelled().await })
            .await;
    });
    // Discovery publishes the catalog, then its workloads: wait for both, so
    // neither the first poll nor a first wake-up finds functions without
    // their workloads.
    if ebb_kube::first_catalog(&mut first).await.is_none()
        || first_workloads.changed().await.is_err()
    {
        return Err(Error::Config(
            "function discovery ended before its first list".into(),
        ));
    }
    shared
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);

    // Leadership: only the leader polls; wake-ups are served by everyone.
    let (leader, elector_task, elector_stop) = match cfg.lease.clone() {
        Some(lc) => {
            let elector = ebb_kube::Elector::new(client.clone(), lc)
                .map_err(|e| Error::Config(format!("lease: {e}")))?;
            let leader = elector.handle().leader();
            let es = CancellationToken::new();
            (
                Some(leader),
                Some(tokio::spawn(elector.run(es.clone()))),
                Some(es),
            )
        }
        None => (None, None, None),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => break,
        }
        if leader.as_ref().is_some_and(|l| !*l.borrow()) {
            continue;
        }
        let functions: Vec<Arc<FunctionSpec>> = shared
            .catalog
            .borrow()
            .functions
            .iter()
            .map(|f| f.spec.clone())
            .collect();
        let kube = Kube {
            shared: &shared,
            workloads: shared.workloads.borrow().clone(),
            hpas: HpaCache::default(),
        };
        poller.poll(&kube, &functions).await;
    }
    shared
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    stop.cancel();
    if let Some(es) = elector_stop {
        es.cancel();
    }
    if let Some(t) = elector_task {
        let _ = t.await;
    }
    let _ = disc.await;
    let _ = admin.await;
    Ok(())
}
