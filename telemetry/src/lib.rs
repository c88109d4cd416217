//! telemetry: the one way the platform's binaries (push-server, msg-processor, push-send and
//! the data tools) set up their logs and their Prometheus recorder, so that every process
//! behaves the same for an operator: logs on stderr (stdout is left to the line scripts
//! read), `RUST_LOG` honoured, metrics rendered by the handle each `/metrics` route holds.
//!
//! | item | role |
//! |---|---|
//! | [`LogFormat`], [`init_logging`] | the tracing subscriber: human or JSON lines on stderr, `RUST_LOG` or a default filter |
//! | [`init_logging_with_traces`], [`otel`] | the same, plus span export over OTLP/HTTP when `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT` is set |
//! | [`trace_dispatch`] | span export alone, as a per-thread subscriber: several services with their own names in one process |
//! | [`propagation`] | W3C `traceparent`/`tracestate` and B3 headers ↔ [`propagation::TraceContext`] (pure); [`otel::set_parent`] and [`otel::outgoing`] join it to `tracing` spans |
//! | [`install_recorder`] | the process-wide Prometheus recorder, installed once per binary's cell, with its descriptions |
//!
//! Each binary keeps its own metric names, buckets and descriptions in its own `metrics`
//! module; only the set-up lives here.

pub mod otel;
pub mod propagation;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

pub use otel::{OtlpArgs, TraceError, TraceExport, TraceGuard};

/// Log output format: a `--log-format` flag (clap) and a `log_format` file key (serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: expected human or json")),
        }
    }
}

/// Installs the global tracing subscriber: `format` lines on stderr, filtered by `RUST_LOG`
/// when set, else by `default_filter` (e.g. `"info"`, `"datamon=info"`).
///
/// # Panics
/// If a global subscriber is already installed (call it once, first thing in `main`).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// [`init_logging`] plus span export when `traces` has an endpoint: the returned guard keeps
/// the export thread alive (hold it for the life of `main`; dropping it flushes). Without an
/// endpoint no OpenTelemetry object is built and logging is exactly [`init_logging`]'s.
///
/// # Panics
/// If a global subscriber is already installed (call it once, first thing in `main`).
pub fn init_logging_with_traces(
    format: LogFormat,
    default_filter: &str,
    traces: &TraceExport,
) -> Result<Option<TraceGuard>, TraceError> {
    if traces.endpoint.is_none() {
        init_logging(format, default_filter);
        return Ok(None);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let (otel, guard) = match otel::layer(traces)? {
        // Spans at INFO and above are exported whatever the log filter says (a quiet
        // `warn` CLI still reports its spans); DEBUG spans stay local.
        Some((layer, guard)) => (
            Some(layer.with_filter(tracing_subscriber::filter::LevelFilter::INFO)),
            Some(guard),
        ),
        None => (None, None),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(otel).with(fmt).init();
    Ok(guard)
}

/// A subscriber that exports spans (INFO and above, as [`init_logging_with_traces`] does)
/// and logs nothing, for running several services in one process with one `service.name`
/// each (tests of a whole pipeline, an embedding program): make it a thread's default with
/// `tracing::dispatcher::set_default` (e.g. in a tokio runtime's `on_thread_start`) rather
/// than the global one. `None` when `traces` has no endpoint.
pub fn trace_dispatch(
    traces: &TraceExport,
) -> Result<Option<(tracing::Dispatch, TraceGuard)>, TraceError> {
    let Some((layer, guard)) = otel::layer(traces)? else {
        return Ok(None);
    };
    let subscriber = tracing_subscriber::registry()
        .with(layer.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    Ok(Some((tracing::Dispatch::new(subscriber), guard)))
}

/// Builds the recorder from `builder`, makes it the process's global recorder, runs
/// `describe` (the binary's `describe_*!` calls) and returns its handle; later calls with
/// the same `cell` return the same handle.
///
/// Several components may run in one process (tests, benches, an embedding program): only
/// the first recorder becomes global. A later one keeps its handle, and its `/metrics` then
/// renders what that recorder saw; the components' counters still go to the global one.
pub fn install_recorder(
    cell: &'static OnceLock<PrometheusHandle>,
    builder: impl FnOnce() -> PrometheusBuilder,
    describe: fn(),
) -> PrometheusHandle {
    cell.get_or_init(|| {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is already global (see above).
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_the_two_names_and_names_a_bad_one() {
        assert_eq!("human".parse::<LogFormat>(), Ok(LogFormat::Human));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(
            "xml".parse::<LogFormat>(),
            Err("\"xml\": expected human or json".to_string())
        );
    }

    #[test]
    fn the_recorder_is_installed_once_and_renders_what_it_counted() {
        static CELL: OnceLock<PrometheusHandle> = OnceLock::new();
        fn describe() {
            metrics::describe_counter!("telemetry_test_total", "A test counter.");
        }
        let a = install_recorder(&CELL, PrometheusBuilder::new, describe);
        metrics::counter!("telemetry_test_total").increment(3);
        // The second call builds nothing: its builder would panic if it ran.
        let b = install_recorder(&CELL, || unreachable!("built twice"), describe);
        let text = b.render();
        assert!(
            text.contains("# HELP telemetry_test_total A test counter."),
            "{text}"
        );
        assert!(text.contains("telemetry_test_total 3"), "{text}");
        assert_eq!(a.render(), text);
    }
}
