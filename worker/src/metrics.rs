//! The worker's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: u16,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    Busy,
    Draining,
    TooLarge,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::TooLarge => "too_large",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

/// Handles of the worker's metrics, registered into the registry that its
/// `/metrics` endpoint serves.
#[derive(Clone)]
pub struct Metrics {
    /// `ebb_worker_inflight`: calls being served now (the autoscaler reads it).
    pub inflight: Gauge,
    /// `ebb_worker_requests_total{status}`: calls answered, by status.
    pub requests: Family<StatusLabels, Counter>,
    /// `ebb_worker_refused_total{reason}`: calls the worker itself refused.
    pub refused: Family<RefusalLabels, Counter>,
    /// `ebb_worker_request_duration_seconds`: time to answer a call.
    pub duration: Histogram,
    /// `ebb_worker_max_inflight`: the configured bound.
    pub max_inflight: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            inflight: Gauge::default(),
            requests: Family::default(),
            refused: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_5, 2.0, 18)),
            max_inflight: Gauge::default(),
        };
        registry.register(
            "ebb_worker_inflight",
            "Function calls being served now",
            m.inflight.clone(),
        );
        registry.register(
            "ebb_worker_max_inflight",
            "Configured bound of concurrent calls",
            m.max_inflight.clone(),
        );
        registry.register(
            "ebb_worker_requests",
            "Function calls answered, by HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "ebb_worker_refused",
            "Calls refused by the worker itself (busy, draining, too large)",
            m.refused.clone(),
        );
        registry.register(
            "ebb_worker_request_duration_seconds",
            "Time to answer a function call",
            m.duration.clone(),
        );
        m
    }
}
