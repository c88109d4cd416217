//! Metric names and the Prometheus recorder. Every count carries the label `type`; the
//! gateway serves them on `GET /metrics` (and `gabo serve --metrics` on its own port when the
//! gateway does not run).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: events the gateway acknowledged (broker acked).
pub const ACCEPTED: &str = "gabo_accepted_total";
/// Counter: events the gateway refused (schema, shape, atomic batch).
pub const REJECTED: &str = "gabo_rejected_total";
/// Counter: events written to staging (redelivered copies included).
pub const STAGED: &str = "gabo_staged_total";
/// Counter: events in closed buckets.
pub const UNIQUE: &str = "gabo_unique_total";
/// Counter: duplicates removed by the dedup.
pub const DUPLICATES: &str = "gabo_duplicates_total";
/// Counter: events that reached the writer after their hour closed (late bucket).
pub const LATE: &str = "gabo_late_total";
/// Counter: hours closed (bucket + marker written).
pub const HOURS_CLOSED: &str = "gabo_hours_closed_total";
/// Gauge (seconds): now minus the slowest partition's watermark (how far the writer lags).
pub const LAG: &str = "gabo_lag_seconds";
/// Histogram (seconds): gateway request to answer (broker ack included).
pub const GATEWAY_LATENCY: &str = "gabo_gateway_request_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    telemetry::install_recorder(
        &HANDLE,
        || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(GATEWAY_LATENCY.into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
        },
        || {},
    )
}
