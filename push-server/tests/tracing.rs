//! Span export from a node, end to end in one process: the node's spans reach an OTLP
//! collector (testkit's stand-in, decoded with the OTLP protobuf types) under the caller's
//! trace, the WebSocket client sees the node's span as the message's parent, the message's
//! `queue`, `socket write` and `receipt` spans follow its receive span, and when the
//! collector dies pushes still arrive while the dropped spans are counted. One test: the
//! tracing subscriber is process-global.

mod common;

use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use testkit::otlp::StandInCollector;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every span exported so far, with its service name.
fn spans(collector: &StandInCollector, into: &mut Vec<(String, Span)>) {
    while let Ok(r) = collector.requests.try_recv() {
        if r.line != "POST /v1/traces" {
            continue;
        }
        let req = ExportTraceServiceRequest::decode(r.body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    into.push((service.clone(), span));
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_spans_continue_the_callers_trace_and_a_dead_collector_costs_no_push() {
    let collector = StandInCollector::start(1.0);
    let mut cfg = telemetry::TraceExport::from_args(
        &telemetry::OtlpArgs {
            otlp_endpoint: Some(collector.base.clone()),
        },
        "push-server-test",
    );
    cfg.export_timeout = Duration::from_secs(1);
    let guard = telemetry::init_logging_with_traces(telemetry::LogFormat::Human, "warn", &cfg)
        .unwrap()
        .expect("export is on");

    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "tess", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/tess",
        &[("traceparent", &traceparent)],
        b"traced",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let msg = ws_next_json(&mut ws).await;
    let seen = msg["traceparent"]
        .as_str()
        .expect("a traceparent")
        .to_owned();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts[1], TRACE, "same trace: {seen}");
    assert_ne!(parts[2], CALLER_SPAN, "the node's own span: {seen}");
    // The client acks it: the node's `receipt` span.
    let id = msg["id"].as_u64().expect("a message id");
    ws_send_json(&mut ws, serde_json::json!({"type": "ack", "id": id})).await;

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let node_spans = ["admin receive", "queue", "socket write", "receipt"];
    let [receive, queue, write, receipt] = loop {
        guard.flush();
        spans(&collector, &mut got);
        let found = node_spans.map(|name| got.iter().find(|(_, s)| s.name == name).cloned());
        if found.iter().all(Option::is_some) {
            break found.map(Option::unwrap);
        }
        assert!(Instant::now() < deadline, "missing node spans: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (service, receive) = receive;
    // Queue, socket write and receipt are children of the receive span, one after the other:
    // the receive span ends when the message is handed to the queue.
    for (_, child) in [&queue, &write, &receipt] {
        assert_eq!(child.trace_id, receive.trace_id, "{}", child.name);
        assert_eq!(child.parent_span_id, receive.span_id, "{}", child.name);
    }
    let (queue, write, receipt) = (queue.1, write.1, receipt.1);
    assert!(
        queue.start_time_unix_nano >= receive.end_time_unix_nano,
        "queue starts after receive ends: {receive:?} {queue:?}"
    );
    assert!(
        write.start_time_unix_nano >= queue.end_time_unix_nano,
        "socket write after queue: {queue:?} {write:?}"
    );
    assert!(
        receipt.start_time_unix_nano >= write.end_time_unix_nano,
        "receipt after socket write: {write:?} {receipt:?}"
    );
    assert!(service.contains("push-server-test"), "{service}");
    assert_eq!(hex(&receive.trace_id), TRACE);
    assert_eq!(hex(&receive.parent_span_id), CALLER_SPAN);
    assert_eq!(hex(&receive.span_id), parts[2], "the client's parent");
    let append = got
        .iter()
        .find(|(_, s)| s.name == "history append")
        .map(|(_, s)| s)
        .expect("a history append span");
    assert_eq!(append.parent_span_id, receive.span_id);

    // The collector dies: pushes are delivered as before, spans are counted as dropped.
    collector.set_down(true);
    for n in 0..3 {
        let r = http(
            server.admin_addr(),
            "POST",
            "/v1/push/tess",
            &[("traceparent", &traceparent)],
            format!("after {n}").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(ws_next_json(&mut ws).await["data"], format!("after {n}"));
    }
    guard.flush();
    let sample = r#"telemetry_spans_dropped_total{reason="export_failed"}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&server, sample).await < 1.0 {
        assert!(Instant::now() < deadline, "{sample} never rose");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
