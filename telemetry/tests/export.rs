//! The export pipeline against a stand-in collector on 127.0.0.1 (a plain HTTP/1.1 server on
//! a thread): spans arrive as OTLP protobuf, the sampler follows the rules it fetches, and a
//! dead collector's spans are counted as dropped. One test (one process): the Prometheus
//! recorder is process-global.

use std::time::{Duration, Instant};

use opentelemetry::trace::{Tracer as _, TracerProvider as _};
use telemetry::{OtlpArgs, TraceExport};
use testkit::otlp::StandInCollector;
use testkit::RefusedPort;

fn config(endpoint: &str) -> TraceExport {
    let mut cfg = TraceExport::from_args(
        &OtlpArgs {
            otlp_endpoint: Some(endpoint.to_string()),
        },
        "export-test",
    );
    cfg.export_timeout = Duration::from_secs(1);
    cfg
}

#[test]
fn spans_reach_the_collector_follow_its_rules_and_a_dead_one_counts_drops() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    // Sampled at the root by the initial ratio until rules arrive: ratio 1 exports.
    let collector = StandInCollector::start(1.0);
    let base = collector.base.clone();
    let provider = telemetry::otel::provider(
        &{
            let mut c = config(&base);
            c.initial_ratio = 1.0;
            c.sampling_refresh = Duration::from_secs(3600);
            c
        },
        &base,
    )
    .unwrap();
    provider.tracer("t").in_span("first", |_| {});
    provider.force_flush().unwrap();
    let got = collector
        .requests
        .recv_timeout(Duration::from_secs(60))
        .unwrap();
    assert_eq!(got.line, "POST /v1/traces");
    assert!(!got.body.is_empty(), "an empty export");
    drop(provider);

    // Ratio 0 at start: nothing sampled until the collector's rules (probability 1) are
    // fetched, after which spans are exported.
    let collector = StandInCollector::start(1.0);
    let base = collector.base.clone();
    let provider = telemetry::otel::provider(
        &{
            let mut c = config(&base);
            c.initial_ratio = 0.0;
            c.sampling_refresh = Duration::from_millis(200);
            c
        },
        &base,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "POST /v1/traces") {
        assert!(Instant::now() < deadline, "never exported: {seen:?}");
        provider.tracer("t").in_span("later", |_| {});
        provider.force_flush().unwrap();
        while let Ok(r) = collector.requests.recv_timeout(Duration::from_millis(100)) {
            seen.push(r.line);
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("GET /sampling?service=export-test")),
        "{seen:?}"
    );
    drop(provider);

    // A collector that is not there: the span is dropped and counted, the caller unharmed.
    // The port stays held (refusing) to the end, so no other test's server can take it.
    let refused = RefusedPort::new();
    let dead = format!("http://{}", refused.addr);
    let provider = telemetry::otel::provider(
        &{
            let mut c = config(&dead);
            c.initial_ratio = 1.0;
            c
        },
        &dead,
    )
    .unwrap();
    provider.tracer("t").in_span("lost", |_| {});
    let _ = provider.force_flush();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = handle.render();
        if text.contains("telemetry_spans_dropped_total{reason=\"export_failed\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
