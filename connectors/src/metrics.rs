//! The connectors' Prometheus metrics, registered into the registry that the
//! admin server's `/metrics` serves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub function: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub function: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
}

/// Handles of every connector metric.
#[derive(Clone)]
pub struct Metrics {
    /// `ebb_deliveries_total{function,outcome}`: events finished, by outcome
    /// (`delivered`, `dead_lettered`, `dropped` = given up without a
    /// dead-letter destination).
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// `ebb_delivery_attempts_total{function,outcome}`: calls, by result
    /// (`ok`, `failed`, `hold`).
    pub attempts: Family<OutcomeLabels, Counter>,
    /// `ebb_delivery_duration_seconds{function}`: time of one call.
    pub duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    /// `ebb_delivery_inflight{function}`: events being delivered (calls and holds).
    pub inflight: Family<FunctionLabels, Gauge>,
    /// `ebb_retries_total{function}`: failed attempts that will be retried.
    pub retries: Family<FunctionLabels, Counter>,
    /// `ebb_dead_letters_total{function}`: events published to a dead-letter destination.
    pub dead_letters: Family<FunctionLabels, Counter>,
    /// `ebb_holds_total{function,reason}`: calls not taken by a replica
    /// (`no_replica`, `busy`, `draining`).
    pub holds: Family<ReasonLabels, Counter>,
    /// `ebb_wakeups_total{function}`: wake-ups sent to the autoscaler.
    pub wakeups: Family<FunctionLabels, Counter>,
    /// `ebb_errors_total{error}`: errors by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// `ebb_consumer_starts_total{function}`: consumers started (a restart
    /// after a delivery setting changed, or a reconnect, counts again).
    pub consumer_starts: Family<FunctionLabels, Counter>,
    /// `ebb_delivery_limit{function}`: deliveries the function may have in
    /// flight now (`max-inflight` × ready replicas, at least one replica's).
    pub delivery_limit: Family<FunctionLabels, Gauge>,
    /// `ebb_functions`: functions routed to.
    pub functions: Gauge,
    /// `ebb_function_config_errors`: functions with invalid settings (served
    /// on their last valid ones, or skipped when they never had any).
    pub config_errors: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            deliveries: Family::default(),
            attempts: Family::default(),
            duration: Family::new_with_constructor(latency),
            inflight: Family::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            holds: Family::default(),
            wakeups: Family::default(),
            errors: Family::default(),
            consumer_starts: Family::default(),
            delivery_limit: Family::default(),
            functions: Gauge::default(),
            config_errors: Gauge::default(),
        };
        registry.register(
            "ebb_deliveries",
            "Events finished, by outcome (delivered, dead_lettered, dropped)",
            m.deliveries.clone(),
        );
        registry.register(
            "ebb_delivery_attempts",
            "Calls to functions, by result (ok, failed, hold)",
            m.attempts.clone(),
        );
        registry.register(
            "ebb_delivery_duration_seconds",
            "Duration of one call to a function",
            m.duration.clone(),
        );
        registry.register(
            "ebb_delivery_inflight",
            "Events being delivered now (calls and holds)",
            m.inflight.clone(),
        );
        registry.register(
            "ebb_retries",
            "Failed attempts that will be retried",
            m.retries.clone(),
        );
        registry.register(
            "ebb_dead_letters",
            "Events published to a dead-letter destination",
            m.dead_letters.clone(),
        );
        registry.register(
            "ebb_holds",
            "Calls not taken by a replica (no_replica, busy, draining)",
            m.holds.clone(),
        );
        registry.register(
            "ebb_wakeups",
            "Wake-ups sent to the autoscaler",
            m.wakeups.clone(),
        );
        registry.register("ebb_errors", "Errors by kind", m.errors.clone());
        registry.register(
            "ebb_consumer_starts",
            "Consumers started per function (restarts and reconnects count again)",
            m.consumer_starts.clone(),
        );
        registry.register(
            "ebb_delivery_limit",
            "Deliveries a function may have in flight now",
            m.delivery_limit.clone(),
        );
        registry.register("ebb_functions", "Functions routed to", m.functions.clone());
        registry.register(
            "ebb_function_config_errors",
            "Functions with invalid settings (served on their last valid ones, or skipped)",
            m.config_errors.clone(),
        );
        m
    }

    pub fn error(&self, error: &'static str) {
        self.errors.get_or_create(&ErrorLabels { error }).inc();
    }
}
