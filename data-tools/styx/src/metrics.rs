//! Metric names and the Prometheus recorder (served at `/metrics` by the API).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge, label `state`: active runs per state.
pub const RUNS: &str = "styx_runs";
/// Counter, label `event`: transitions applied per event type.
pub const TRANSITIONS: &str = "styx_transitions_total";
/// Histogram (seconds): time a run waited in `QUEUED` before its dequeue.
pub const QUEUE_WAIT: &str = "styx_queue_wait_seconds";
/// Histogram (seconds): `RUNNING` to exit.
pub const RUN_DURATION: &str = "styx_run_duration_seconds";
/// Counter, label `exit_code` (a number, `run_error` or `timeout`): failed tries.
pub const FAILURES: &str = "styx_failures_total";

/// Jobs run from seconds to a day: buckets from 1 s to 24 h.
const SECONDS_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    telemetry::install_recorder(
        &HANDLE,
        || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("bucket list is not empty")
        },
        describe,
    )
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(RUNS, "Active runs per state.");
    describe_counter!(TRANSITIONS, "Transitions applied, by event type.");
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, "Time in QUEUED before dequeue.");
    describe_histogram!(RUN_DURATION, Unit::Seconds, "RUNNING to exit.");
    describe_counter!(FAILURES, "Failed tries by exit code (run_error, timeout).");
}
