//! `ebb dev`'s side of the autoscaler's poll ([`ebb_autoscaler::poll`]):
//! the inputs read in process, besides the autoscaler's own scalers of a
//! broker source and Prometheus. The scale target is the local
//! [`Replicas`](crate::replicas::Replicas).
//!
//! - The in-memory bus's backlog ([`InProcess::Bus`], input `bus`): events
//!   waiting and in delivery.
//! - A broker source's queue, read as the autoscaler reads it; its finished
//!   count is the engine's ([`EngineFinished`]).
//! - Calls in flight ([`InProcess::Inflight`], input `inflight`), as the
//!   autoscaler's `--worker-inflight`: the engine's deliveries in progress.

use std::sync::Arc;
use std::time::Duration;

use ebb_autoscaler::poll::{self, Poller};
use ebb_autoscaler::scalers::prometheus::{HttpAuth, PrometheusScaler};
use ebb_autoscaler::scalers::{ReadFuture, Reading, Role, Scaler};
use ebb_connectors::engine::Engine;
use ebb_connectors::metrics::{FunctionLabels, OutcomeLabels};
use ebb_model::FunctionSpec;

use crate::bus::Bus;

/// Functions read, decided and applied at the same time.
const CONCURRENCY: usize = 16;

/// The poll of `ebb dev`: `source`, the scaler of the stack's broker (none:
/// the in-memory bus), then Prometheus, then calls in flight.
pub(crate) fn poller(
    source: Option<Box<dyn Scaler<()>>>,
    bus: Arc<Bus>,
    engine: Arc<Engine>,
    timeout: Duration,
    metrics: poll::Metrics,
) -> Poller<()> {
    let queue: Box<dyn Scaler<()>> = match source {
        Some(scaler) => Box::new(EngineFinished {
            scaler,
            engine: engine.clone(),
        }),
        None => Box::new(InProcess::Bus {
            bus,
            engine: engine.clone(),
        }),
    };
    let auth = HttpAuth::default();
    let http = auth.build_client().unwrap_or_default();
    let scalers: Vec<Box<dyn Scaler<()>>> = vec![
        queue,
        Box::new(PrometheusScaler::new(http, auth, timeout)),
        Box::new(InProcess::Inflight { engine }),
    ];
    Poller::new(scalers, metrics, CONCURRENCY)
}

fn key(f: &FunctionSpec) -> String {
    f.key().to_string()
}

/// Events the engine finished for `f`: delivered, dead-lettered or given up.
fn finished(engine: &Engine, f: &FunctionSpec) -> u64 {
    ["delivered", "dead_lettered", "dropped"]
        .into_iter()
        .map(|outcome| {
            engine
                .metrics()
                .deliveries
                .get_or_create(&OutcomeLabels {
                    function: key(f),
                    outcome,
                })
                .get()
        })
        .sum()
}

/// An input ebb dev reads in its own process.
enum InProcess {
    /// The in-memory bus's backlog of a function: events waiting and in
    /// delivery; finished are those the engine finished.
    Bus { bus: Arc<Bus>, engine: Arc<Engine> },
    /// Calls in flight to a function (deliveries in progress, holds
    /// included).
    Inflight { engine: Arc<Engine> },
}

impl Scaler<()> for InProcess {
    fn name(&self) -> &'static str {
        match self {
            Self::Bus { .. } => "bus",
            Self::Inflight { .. } => "inflight",
        }
    }

    fn role(&self) -> Role {
        match self {
            Self::Bus { .. } => Role::Queue,
            Self::Inflight { .. } => Role::InFlight,
        }
    }

    fn serves(&self, f: &FunctionSpec) -> bool {
        match self {
            Self::Bus { bus, .. } => bus.backlog(&f.name).is_some(),
            Self::Inflight { .. } => true,
        }
    }

    fn read<'a>(&'a self, f: &'a FunctionSpec, _: &'a ()) -> ReadFuture<'a> {
        Box::pin(async move {
            Ok(match self {
                Self::Bus { bus, engine } => Reading {
                    value: bus.backlog(&f.name).unwrap_or(0) as f64,
                    finished: Some(finished(engine, f)),
                    ..Reading::default()
                },
                Self::Inflight { engine } => {
                    let inflight = engine
                        .metrics()
                        .inflight
                        .get_or_create(&FunctionLabels { function: key(f) })
                        .get();
                    Reading::value(inflight.max(0) as f64)
                }
            })
        })
    }
}

/// A broker's queue, with the engine's finished count in place of the
/// broker's: ebb dev's connector is the queue's only consumer, so its count
/// is exact, where the broker's is sometimes unknown (a passive declare
/// cannot tell).
struct EngineFinished {
    scaler: Box<dyn Scaler<()>>,
    engine: Arc<Engine>,
}

impl Scaler<()> for EngineFinished {
    fn name(&self) -> &'static str {
        self.scaler.name()
    }

    fn role(&self) -> Role {
        self.scaler.role()
    }

    fn serves(&self, f: &FunctionSpec) -> bool {
        self.scaler.serves(f)
    }

    fn read<'a>(&'a self, f: &'a FunctionSpec, w: &'a ()) -> ReadFuture<'a> {
        Box::pin(async move {
            let reading = self.scaler.read(f, w).await?;
            Ok(Reading {
                finished: Some(finished(&self.engine, f)),
                ..reading
            })
        })
    }

    fn retain(&self, live: &[(&FunctionSpec, Option<&()>)]) {
        self.scaler.retain(live);
    }
}
