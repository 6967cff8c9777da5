//! `ebb dev`: the whole of ebb on one machine. The real dispatcher, retry
//! policy, cron scheduler, scaling policy and `ebb worker` run as they do on
//! Kubernetes; only the broker (an in-memory bus unless the stack names
//! `sources`) and the scale target (local `ebb worker` processes) are
//! swapped for local ones.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod bus;
pub mod console;
pub mod replicas;
mod scaling;
mod server;
pub mod stack;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ebb_autoscaler::poll::Poller;
use ebb_autoscaler::scalers::Scaler;
use ebb_connectors::engine::{Engine, EngineConfig, Resolver};
use ebb_connectors::metrics::{FunctionLabels, Metrics, OutcomeLabels};
use ebb_model::{Catalog, FunctionSpec};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::console::Console;
use crate::replicas::Replicas;
use crate::stack::DevStack;

/// How long deliveries of the bus may take to finish when `ebb dev` stops.
const BUS_DRAIN: Duration = Duration::from_secs(30);

/// Largest event accepted by `POST /publish`, as `ebb worker` accepts by default.
pub const MAX_EVENT: usize = 6 << 20;

/// Errors of `ebb dev`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mistake in the stack file or the flags (exit 2).
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Run(String),
}

impl Error {
    /// A bounded label for error counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Run(_) => "run",
        }
    }
}

/// Settings of `ebb dev`.
#[derive(Debug, Clone)]
pub struct DevConfig {
    pub stack: PathBuf,
    /// Where `/publish`, `/wake`, `/_/status` and `/metrics` are served.
    pub listen: SocketAddr,
    /// The `ebb` binary, run as `ebb worker` for each replica.
    pub exe: PathBuf,
    /// How often the scaling policy runs.
    pub interval: Duration,
    /// Events waiting per function before a publish is refused.
    pub max_backlog: usize,
    /// How often the stack file is checked for changes.
    pub reload_every: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FnLabel {
    function: String,
}

/// What every part of `ebb dev` shares.
pub(crate) struct Dev {
    pub(crate) cfg: DevConfig,
    pub(crate) stack: RwLock<DevStack>,
    pub(crate) engine: Arc<Engine>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) replicas: Arc<Replicas>,
    pub(crate) registry: Registry,
    pub(crate) decisions: Mutex<HashMap<String, String>>,
    pub(crate) reload_error: Mutex<Option<String>>,
    /// The stack's NATS source, where `POST /publish` publishes.
    pub(crate) nats: Option<async_nats::Client>,
    /// `sources.amqp`: publishes go to RabbitMQ.
    pub(crate) amqp: Option<String>,
    /// `sources.kafka`: publishes go to Kafka.
    pub(crate) kafka: Option<String>,
    replicas_gauge: Family<FnLabel, Gauge>,
    backlog_gauge: Family<FnLabel, Gauge>,
}

impl Dev {
    fn key(name: &str) -> String {
        ebb_model::FunctionKey::new(ebb_model::DEFAULT_NAMESPACE, name).to_string()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        self.engine.metrics()
    }

    pub(crate) fn counter(&self, name: &str, outcome: &'static str) -> u64 {
        self.metrics()
            .deliveries
            .get_or_create(&OutcomeLabels {
                function: Self::key(name),
                outcome,
            })
            .get()
    }

    pub(crate) fn retries(&self, name: &str) -> u64 {
        self.metrics()
            .retries
            .get_or_create(&FunctionLabels {
                function: Self::key(name),
            })
            .get()
    }

    pub(crate) fn inflight(&self, name: &str) -> i64 {
        self.metrics()
            .inflight
            .get_or_create(&FunctionLabels {
                function: Self::key(name),
            })
            .get()
    }

    /// Sets the replica gauges to the scale at this moment (the backlog
    /// gauge is what the policy last saw, set by its loop).
    pub(crate) async fn refresh_gauges(&self) {
        for f in self.functions().iter().filter(|f| !f.command.is_empty()) {
            let n = self.replicas.count(&f.name).await;
            self.replicas_gauge
                .get_or_create(&FnLabel {
                    function: f.name.clone(),
                })
                .set(i64::from(n));
        }
    }

    /// The functions of the running stack.
    pub(crate) fn functions(&self) -> Vec<Arc<FunctionSpec>> {
        self.stack
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .functions
            .clone()
    }

    fn spec(&self, name: &str) -> Option<Arc<FunctionSpec>> {
        self.stack
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

/// Runs `ebb dev` until `shutdown`, then stops every replica.
pub async fn run(cfg: DevConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let stack = stack::load(&cfg.stack)?;
    let src = &stack.sources;
    if [src.nats.is_some(), src.amqp.is_some(), src.kafka.is_some()]
        .iter()
        .filter(|b| **b)
        .count()
        > 1
    {
        return Err(Error::Config(format!(
            "{}: sources: give one of nats, amqp and kafka (or none for the in-memory bus)",
            cfg.stack.display()
        )));
    }
    let dir = cfg
        .stack
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let console = console::global();
    let replicas = Arc::new(Replicas::new(cfg.exe.clone(), dir, console.clone()));

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Config(format!("--listen {}: {e}", cfg.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Run(format!("--listen {}: {e}", cfg.listen)))?;
    let wake_host = if bound.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], bound.port()))
    } else {
        bound
    };

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let cron_metrics = ebb_connectors::cron::CronMetrics::register(&mut registry);
    let replicas_gauge = Family::<FnLabel, Gauge>::default();
    let backlog_gauge = Family::<FnLabel, Gauge>::default();
    registry.register(
        "ebb_dev_replicas",
        "Local replicas of each function (running or starting)",
        replicas_gauge.clone(),
    );
    registry.register(
        "ebb_dev_backlog",
        "Backlog the scaling policy last saw, per function",
        backlog_gauge.clone(),
    );
    let poll_metrics = ebb_autoscaler::poll::Metrics::register(&mut registry);
    let engine = Arc::new(
        Engine::new(
            EngineConfig {
                resolver: Some(Resolver(replicas.clone())),
                ..EngineConfig::default()
            },
            Some(format!("http://{wake_host}")),
            metrics,
            CancellationToken::new(),
        )
        .map_err(|e| Error::Run(e.to_string()))?,
    );
    let bus = Bus::new(replicas.clone(), cfg.max_backlog);
    let nats = match &stack.sources.nats {
        Some(url) => Some(
            tokio::time::timeout(
                Duration::from_secs(10),
                ebb_connectors::nats::connect(
                    &ebb_connectors::nats::NatsConfig {
                        url: url.clone(),
                        ..Default::default()
                    },
                    "ebb-dev",
                    &CancellationToken::new(),
                ),
            )
            .await
            .map_err(|_| Error::Run(format!("sources.nats: cannot connect to {url} within 10s")))?
            .map_err(|e| Error::Run(format!("sources.nats: {e}")))?,
        ),
        None => None,
    };
    let (ctx, crx) = watch::channel(Arc::new(stack.catalog()));
    let dev = Arc::new(Dev {
        cfg: cfg.clone(),
        stack: RwLock::new(stack.clone()),
        engine: engine.clone(),
        bus: bus.clone(),
        replicas: replicas.clone(),
        registry,
        decisions: Mutex::new(HashMap::new()),
        reload_error: Mutex::new(None),
        nats,
        amqp: stack.sources.amqp.clone(),
        kafka: stack.sources.kafka.clone(),
        replicas_gauge,
        backlog_gauge,
    });

    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    // Cron: the connector's scheduler, delivering through the same engine.
    tasks.push(tokio::spawn(ebb_connectors::cron::run_schedules(
        crx.clone(),
        engine.clone(),
        engine.clone(),
        cron_metrics,
        ebb_connectors::cron::Clock::System,
        Arc::new(ebb_connectors::cron::MemoryTicks::default()),
        stop.clone(),
    )));
    // The events' source, run by the connectors' supervisor in process:
    // the stack's broker with the real connector, else the in-memory bus.
    let source_ctx = (crx.clone(), engine.clone(), stop.clone());
    let source_task = if let Some(url) = &stack.sources.nats {
        let (source, settings) = ebb_connectors::nats::source(ebb_connectors::nats::NatsConfig {
            url: url.clone(),
            ..Default::default()
        });
        tokio::spawn(run_source(source, settings, source_ctx.clone()))
    } else if let Some(url) = &stack.sources.amqp {
        let (source, settings) = ebb_connectors::amqp::source(ebb_connectors::amqp::AmqpConfig {
            url: url.clone(),
            ..Default::default()
        })
        .map_err(|e| Error::Config(format!("sources.amqp: {e}")))?;
        tokio::spawn(run_source(source, settings, source_ctx.clone()))
    } else if let Some(brokers) = &stack.sources.kafka {
        let (source, settings) =
            ebb_connectors::kafka::source(ebb_connectors::kafka::KafkaConfig {
                brokers: brokers.clone(),
                ..Default::default()
            })
            .map_err(|e| Error::Config(format!("sources.kafka: {e}")))?;
        tokio::spawn(run_source(source, settings, source_ctx.clone()))
    } else {
        let settings = ebb_connectors::supervisor::Settings::new(usize::MAX, BUS_DRAIN);
        tokio::spawn(run_source(bus.source(), settings, source_ctx.clone()))
    };
    let timeout = Duration::from_secs(2);
    let source: Option<Box<dyn Scaler<()>>> = if let Some(url) = &stack.sources.nats {
        Some(Box::new(
            ebb_autoscaler::scalers::nats::NatsScaler::connect(url, "EBB", timeout)
                .await
                .map_err(|e| Error::Run(format!("sources.nats: {e}")))?,
        ))
    } else if let Some(url) = &stack.sources.amqp {
        Some(Box::new(
            ebb_autoscaler::scalers::rabbitmq::RabbitMqScaler::amqp(url, timeout)
                .map_err(|e| Error::Config(format!("sources.amqp: {e}")))?,
        ))
    } else {
        stack.sources.kafka.as_ref().map(|b| {
            Box::new(ebb_autoscaler::scalers::kafka::KafkaScaler::new(
                b,
                ebb_autoscaler::scalers::kafka::OffsetReset::Latest,
                timeout,
            )) as Box<dyn Scaler<()>>
        })
    };
    let poller = scaling::poller(source, bus.clone(), engine.clone(), timeout, poll_metrics);
    tasks.push(tokio::spawn(scale_loop(dev.clone(), poller, stop.clone())));
    tasks.push(tokio::spawn(reload_loop(dev.clone(), ctx, stop.clone())));
    tasks.push(tokio::spawn(view_loop(
        dev.clone(),
        console.clone(),
        stop.clone(),
    )));

    let server_stop = CancellationToken::new();
    let app = server::router(dev.clone());
    let ss = server_stop.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { ss.cancelled().await })
            .await;
    });
    tracing::info!(addr = %bound, stack = %cfg.stack.display(), "ebb dev is running; publish with `ebb publish --dev http://{bound} TOPIC DATA`");

    shutdown.await;
    tracing::info!("stopping: finishing deliveries, then draining replicas");
    bus.close();
    stop.cancel();
    // Each source gives back what its consumers hold once they stopped
    // taking (a NATS pull still open would be handed a NAK straight back).
    let _ = source_task.await;
    for t in tasks {
        let _ = t.await;
    }
    engine.stopping().cancel();
    replicas.shutdown().await;
    server_stop.cancel();
    let _ = server.await;
    console.draw("");
    tracing::info!("stopped");
    Ok(())
}

/// Runs `source` under the connectors' supervisor until `stop`.
async fn run_source<S: ebb_connectors::supervisor::Source>(
    source: S,
    settings: ebb_connectors::supervisor::Settings,
    (catalog, engine, stop): (
        watch::Receiver<Arc<Catalog>>,
        Arc<Engine>,
        CancellationToken,
    ),
) {
    let name = source.name();
    let ready = Arc::new(ebb_connectors::admin::Readiness::default());
    let r = ebb_connectors::supervisor::run(
        source,
        catalog,
        engine,
        ready,
        settings,
        stop.cancelled_owned(),
    )
    .await;
    if let Err(e) = r {
        tracing::error!(source = name, error = %e, "the source stopped");
    }
}

/// Every interval: the autoscaler's poll over the local functions, applied
/// to their replicas.
async fn scale_loop(dev: Arc<Dev>, poller: Poller<()>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(dev.cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let functions = dev
            .stack
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .functions
            .clone();
        dev.replicas.reconcile_all().await;
        for step in poller.poll(&*dev.replicas, &functions).await {
            let name = &step.function.name;
            // The largest input the policy saw.
            let backlog = step.inputs.iter().filter_map(|i| i.value).reduce(f64::max);
            if let Some(b) = backlog {
                dev.backlog_gauge
                    .get_or_create(&FnLabel {
                        function: name.clone(),
                    })
                    .set(b as i64);
            }
            if step.decision.replicas.is_some()
                && let Ok(mut d) = dev.decisions.lock()
            {
                d.insert(name.clone(), step.decision.reason.to_string());
            }
        }
    }
}

/// Picks up edits of the stack file; a broken edit keeps the last good stack.
async fn reload_loop(dev: Arc<Dev>, catalog: watch::Sender<Arc<Catalog>>, stop: CancellationToken) {
    let path = dev.cfg.stack.clone();
    let mut last = tokio::fs::read_to_string(&path).await.unwrap_or_default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(dev.cfg.reload_every) => {}
            () = stop.cancelled() => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the stack file; keeping the running functions");
                continue;
            }
        };
        if text == last {
            continue;
        }
        last = text.clone();
        let new = match stack::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the stack file has a mistake; keeping the last good functions");
                if let Ok(mut r) = dev.reload_error.lock() {
                    *r = Some(e.to_string());
                }
                continue;
            }
        };
        if new.sources != dev.stack.read().unwrap_or_else(|p| p.into_inner()).sources {
            tracing::warn!(file = %path.display(), "a change of sources takes effect when ebb dev restarts");
        }
        if let Ok(mut r) = dev.reload_error.lock() {
            *r = None;
        }
        let old = std::mem::replace(
            &mut *dev.stack.write().unwrap_or_else(|p| p.into_inner()),
            new.clone(),
        );
        for f in &old.functions {
            match new.get(&f.name) {
                None => {
                    tracing::info!(function = %f.name, "function removed");
                    dev.replicas.remove(&f.name).await;
                }
                Some(n) if n != f => {
                    tracing::info!(function = %f.name, "function changed");
                    dev.replicas.update(n).await;
                }
                Some(_) => {}
            }
        }
        for f in &new.functions {
            if old.get(&f.name).is_none() {
                tracing::info!(function = %f.name, "function added");
            }
        }
        let _ = catalog.send(Arc::new(new.catalog()));
    }
}

/// The live table on a terminal; a status line per change otherwise.
async fn view_loop(dev: Arc<Dev>, console: Arc<Console>, stop: CancellationToken) {
    let every = if console.live() {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    let mut last = String::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let s = status::snapshot(&dev).await;
        if console.live() {
            console.draw(&status::table(&s));
        } else {
            let line = status::summary(&s);
            if line != last {
                tracing::info!("{line}");
                last = line;
            }
        }
    }
}
