//! Wiring of a connector process: catalog source, metrics, admin server,
//! engine and the source itself. The binary only maps flags onto these options.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ebb_model::Catalog;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::admin::{self, Readiness};
use crate::engine::{Engine, EngineConfig};
use crate::event::Signer;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::supervisor::{self, Settings, Source};

/// Where functions come from.
#[derive(Debug, Clone)]
pub enum FunctionsFrom {
    /// A stack file, reloaded when it changes.
    Stack {
        path: PathBuf,
        reload_every: Duration,
    },
    /// Annotated Deployments and StatefulSets, watched (all namespaces when `None`).
    Kubernetes {
        namespace: Option<String>,
        /// Reported as the source of Kubernetes Events, e.g. `ebb-connector-nats`.
        component: String,
    },
    /// A catalog published by the caller (`ebb dev`).
    Catalog(watch::Receiver<Arc<Catalog>>),
}

/// Options every connector shares.
#[derive(Debug, Clone)]
pub struct CommonOptions {
    pub functions: FunctionsFrom,
    pub admin_addr: Option<SocketAddr>,
    pub autoscaler_url: Option<String>,
    pub hold_timeout: Duration,
    pub signing_secret_file: Option<PathBuf>,
    pub backoff: Backoff,
    /// Local replicas the engine picks among (`ebb dev`); `None` calls URLs.
    pub resolver: Option<crate::engine::Resolver>,
    /// How long a removed function's consumer is kept ([`Settings::retain_removed`]).
    pub retain_removed: Duration,
    /// Bytes of all messages held at once ([`Settings::max_inflight_bytes`]).
    pub max_inflight_bytes: usize,
}

/// What a running connector shares with its source.
pub struct Parts {
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub engine: Arc<Engine>,
    pub ready: Arc<Readiness>,
    pub registry: Arc<Registry>,
    stop_background: CancellationToken,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Parts {
    /// Sets up catalog, metrics, engine and admin server.
    pub async fn start(opts: CommonOptions) -> Result<Parts, Error> {
        Ok(Self::start_with(opts, |_| ()).await?.0)
    }

    /// As [`Parts::start`], registering the source's own metrics with `extra`.
    pub async fn start_with<T>(
        opts: CommonOptions,
        extra: impl FnOnce(&mut Registry) -> T,
    ) -> Result<(Parts, T), Error> {
        let signer = match &opts.signing_secret_file {
            Some(p) => {
                let key = std::fs::read(p).map_err(|source| Error::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                let key = trim_ascii_end(key);
                if key.is_empty() {
                    return Err(Error::Config(format!(
                        "--signing-secret-file {}: the file is empty; put the shared secret in it",
                        p.display()
                    )));
                }
                Some(Signer::new(key))
            }
            None => None,
        };
        let stop_background = CancellationToken::new();
        let mut background = Vec::new();
        let catalog = match opts.functions {
            FunctionsFrom::Stack { path, reload_every } => {
                let (rx, task) =
                    crate::catalog::watch_stack(path, reload_every, stop_background.clone())
                        .await?;
                background.push(task);
                rx
            }
            FunctionsFrom::Kubernetes {
                namespace,
                component,
            } => {
                let client = ebb_kube::client()
                    .await
                    .map_err(|e| Error::Config(format!("--kubernetes: {e}")))?;
                let recorder = ebb_kube::Recorder::new(client.clone(), component);
                let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
                let mut first = rx.clone();
                let stop = stop_background.clone();
                background.push(tokio::spawn(async move {
                    tokio::select! {
                        r = ebb_kube::discover(client, namespace, tx, Some(recorder)) => {
                            if let Err(e) = r {
                                tracing::error!(error = %e, "function discovery stopped");
                            }
                        }
                        () = stop.cancelled() => {}
                    }
                }));
                tracing::info!("waiting for the first list of functions from Kubernetes");
                if ebb_kube::first_catalog(&mut first).await.is_none() {
                    return Err(Error::Broker(
                        "function discovery from Kubernetes ended before its first list".into(),
                    ));
                }
                rx.mark_changed();
                rx
            }
            FunctionsFrom::Catalog(rx) => rx,
        };
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let extra = extra(&mut registry);
        let registry = Arc::new(registry);
        let ready = Arc::new(Readiness::default());
        if let Some(addr) = opts.admin_addr {
            let router = admin::router(registry.clone(), ready.clone());
            background.push(admin::serve(addr, router, stop_background.clone()).await?);
        }
        let engine = Arc::new(Engine::new(
            EngineConfig {
                backoff: opts.backoff,
                hold_timeout: opts.hold_timeout,
                signer,
                resolver: opts.resolver,
                ..EngineConfig::default()
            },
            opts.autoscaler_url,
            metrics,
            CancellationToken::new(),
        )?);
        Ok((
            Parts {
                catalog,
                engine,
                ready,
                registry,
                stop_background,
                background,
            },
            extra,
        ))
    }

    /// Stops the admin server and the catalog source.
    pub async fn stop(self) {
        self.stop_background.cancel();
        for t in self.background {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

fn trim_ascii_end(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}

/// Runs a broker connector process until `shutdown`: the shared parts,
/// then the supervisor over `source` (`nats::source`, `amqp::source`,
/// `kafka::source`), then the parts stop.
pub async fn run_broker<S: Source>(
    common: CommonOptions,
    (source, mut settings): (S, Settings),
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    settings.retain_removed = common.retain_removed;
    settings.max_inflight_bytes = common.max_inflight_bytes;
    let parts = Parts::start(common).await?;
    let r = supervisor::run(
        source,
        parts.catalog.clone(),
        parts.engine.clone(),
        parts.ready.clone(),
        settings,
        shutdown,
    )
    .await;
    parts.stop().await;
    r
}

/// Runs the cron connector process until `shutdown`: one instance from a
/// stack file, or with Kubernetes discovery one of several replicas that
/// elect a leader (see [`crate::cron`]).
pub async fn run_cron(
    common: CommonOptions,
    lease: Option<ebb_kube::LeaseConfig>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (parts, metrics) = Parts::start_with(common, crate::cron::CronMetrics::register).await?;
    let elector = match lease {
        None => None,
        Some(cfg) => {
            let client = ebb_kube::client()
                .await
                .map_err(|e| Error::Config(format!("--kubernetes: {e}")))?;
            Some(
                ebb_kube::Elector::new(client, cfg)
                    .map_err(|e| Error::Config(format!("lease: {e}")))?,
            )
        }
    };
    crate::cron::run(
        parts.catalog.clone(),
        parts.engine.clone(),
        metrics,
        parts.ready.clone(),
        elector,
        drain_timeout,
        shutdown,
    )
    .await;
    parts.stop().await;
    Ok(())
}
