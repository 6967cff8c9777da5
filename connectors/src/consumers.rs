//! What the broker connectors (NATS, AMQP, Kafka) share about their
//! per-function consumers: which functions they serve, how many deliveries
//! each may have in flight, and the handle of a running consumer.

use std::sync::Arc;

use ebb_model::{Catalog, Function, FunctionSpec};
use tokio_util::sync::CancellationToken;

use crate::limit::Limit;
use crate::metrics::Metrics;

/// One function's consumer task.
pub(crate) struct Running {
    pub spec: Arc<FunctionSpec>,
    pub limit: Arc<Limit>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

/// Deliveries a function may have in flight: `max-inflight` per ready
/// replica, at least one replica's worth (a function at zero is woken by
/// its first held event).
pub(crate) fn limit_for(spec: &FunctionSpec, ready: Option<u32>) -> usize {
    spec.max_inflight as usize * ready.unwrap_or(1).max(1) as usize
}

/// The functions a connector serves. `check` says of each function: `None`
/// when it is not for this source (nothing to consume), `Some(Err(why))`
/// when its settings do not fit the source (skipped with an error line and
/// counted), `Some(Ok(()))` when it is served. Sets the connector's
/// `functions` and `config_errors` gauges.
pub(crate) fn routable(
    catalog: &Catalog,
    metrics: &Metrics,
    check: impl Fn(&FunctionSpec) -> Option<Result<(), String>>,
) -> Vec<Function> {
    let mut out = Vec::new();
    let mut bad = catalog.errors.len();
    for f in &catalog.functions {
        match check(&f.spec) {
            None => {}
            Some(Ok(())) => out.push(f.clone()),
            Some(Err(why)) => {
                bad += 1;
                tracing::error!(function = %f.key(), error = %why, "skipping function");
            }
        }
    }
    metrics.config_errors.set(bad as i64);
    metrics.functions.set(out.len() as i64);
    out
}
