//! The connectors' Prometheus metrics, registered into the registry that the
//! admin server's `/metrics` serves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

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

type Latencies = Family<FunctionLabels, Histogram, fn() -> Histogram>;

ebb_runtime::metrics! {
    /// Handles of every connector metric.
    #[derive(Clone)]
    pub struct Metrics {
        /// Events finished, by outcome (delivered, dead_lettered, dropped, requeued).
        ///
        /// `dropped`: given up with `dead-letter: none`; `requeued`: handed
        /// back to its queue with its attempt count (`--max-unacked`).
        pub deliveries: Family<OutcomeLabels, Counter> as "ebb_deliveries",
        /// Calls to functions, by result (ok, failed, hold).
        pub attempts: Family<OutcomeLabels, Counter> as "ebb_delivery_attempts",
        /// Duration of one call to a function.
        pub duration: Latencies as "ebb_delivery_duration_seconds"
            = Family::new_with_constructor(latency),
        /// Events being delivered now (calls and holds).
        pub inflight: Family<FunctionLabels, Gauge> as "ebb_delivery_inflight",
        /// Failed attempts that will be retried.
        pub retries: Family<FunctionLabels, Counter> as "ebb_retries",
        /// Events published to a dead-letter destination.
        pub dead_letters: Family<FunctionLabels, Counter> as "ebb_dead_letters",
        /// Calls not taken by a replica (no_replica, busy, draining).
        pub holds: Family<ReasonLabels, Counter> as "ebb_holds",
        /// Wake-ups sent to the autoscaler.
        pub wakeups: Family<FunctionLabels, Counter> as "ebb_wakeups",
        /// Errors by kind.
        pub errors: Family<ErrorLabels, Counter> as "ebb_errors",
        /// Consumers started per function (restarts and reconnects count again).
        ///
        /// A restart after a delivery setting changed, or a reconnect.
        pub consumer_starts: Family<FunctionLabels, Counter> as "ebb_consumer_starts",
        /// Deliveries a function may have in flight now.
        ///
        /// `max-inflight` × ready replicas, at least one replica's.
        pub delivery_limit: Family<FunctionLabels, Gauge> as "ebb_delivery_limit",
        /// Functions routed to.
        pub functions: Gauge as "ebb_functions",
        /// Functions with invalid settings (served on their last valid ones, or skipped).
        pub config_errors: Gauge as "ebb_function_config_errors",
    }
}

impl Metrics {
    pub fn error(&self, error: &'static str) {
        self.errors.get_or_create(&ErrorLabels { error }).inc();
    }
}
