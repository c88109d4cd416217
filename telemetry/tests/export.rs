//! The export pipeline against a stand-in collector on 127.0.0.1 (a plain HTTP/1.1 server on
//! a thread): spans arrive as OTLP protobuf, the sampler follows the rules it fetches, and a
//! dead collector's spans are counted as dropped. One test (one process): the Prometheus
//! recorder is process-global.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{Tracer as _, TracerProvider as _};
use telemetry::{OtlpArgs, TraceExport};

/// Serves `/sampling` with probability `1.0` and takes anything else with 200; reports each
/// request's line and body length.
fn collector() -> (String, mpsc::Receiver<(String, usize)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            let (line, body_len) = loop {
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break (String::new(), 0);
                }
                got.extend_from_slice(&buf[..n]);
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(head)) = req.parse(&got) {
                    let len = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |h| {
                            std::str::from_utf8(h.value).unwrap().parse().unwrap()
                        });
                    if got.len() >= head + len {
                        break (
                            format!("{} {}", req.method.unwrap(), req.path.unwrap()),
                            len,
                        );
                    }
                }
            };
            let body = if line.starts_with("GET /sampling") {
                r#"{"strategyType":"PROBABILISTIC","probabilisticSampling":{"samplingRate":1.0}}"#
            } else {
                ""
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tx.send((line, body_len));
        }
    });
    (base, rx)
}

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
    let (base, requests) = collector();
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
    let (line, len) = requests.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(line, "POST /v1/traces");
    assert!(len > 0, "an empty export");
    drop(provider);

    // Ratio 0 at start: nothing sampled until the collector's rules (probability 1) are
    // fetched, after which spans are exported.
    let (base, requests) = collector();
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
        while let Ok((line, _)) = requests.recv_timeout(Duration::from_millis(100)) {
            seen.push(line);
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.starts_with("GET /sampling?service=export-test")),
        "{seen:?}"
    );
    drop(provider);

    // A collector that is not there: the span is dropped and counted, the caller unharmed.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
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
