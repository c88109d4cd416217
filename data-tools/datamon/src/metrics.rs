//! Metric names and the Prometheus recorder.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::checker::Snapshot;

/// Gauge: partitions in the window per dataset and status.
pub const PARTITIONS: &str = "datamon_partitions";
/// Gauge: per dataset, the worst lateness in the window (late by, or overdue by), seconds.
pub const LATENESS: &str = "datamon_lateness_seconds";
/// Gauge: wall time of the last checker pass.
pub const RUN_SECONDS: &str = "datamon_check_duration_seconds";
/// Counter: passes run.
pub const PASSES: &str = "datamon_checks_total";
/// Counter: notifications delivered, by `state` (firing, resolved).
pub const ALERTS_SENT: &str = "datamon_alerts_sent_total";
/// Counter: failed delivery attempts (each is retried).
pub const ALERT_FAILURES: &str = "datamon_alert_delivery_failures_total";
/// Gauge: 1 when the declaration files last read were valid, 0 when the previous set is kept.
pub const DECLARATIONS_VALID: &str = "datamon_declarations_valid";

/// Installs the process-wide recorder (once) and returns its handle for `/metrics`.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    telemetry::install_recorder(&HANDLE, PrometheusBuilder::new, || {})
}

/// Publishes a pass's figures.
pub fn record_pass(s: &Snapshot) {
    metrics::gauge!(RUN_SECONDS).set(s.run_seconds);
    metrics::counter!(PASSES).increment(1);
    for row in s.rows.values() {
        for status in ["on_time", "late", "missing", "pending"] {
            let n = row
                .cells
                .iter()
                .filter(|c| c.status.name() == status)
                .count();
            metrics::gauge!(PARTITIONS, "dataset" => row.dataset.clone(), "status" => status)
                .set(n as f64);
        }
        let worst = row
            .cells
            .iter()
            .map(|c| c.status.lateness_seconds())
            .max()
            .unwrap_or(0);
        metrics::gauge!(LATENESS, "dataset" => row.dataset.clone()).set(worst as f64);
    }
}
