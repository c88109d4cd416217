//! One traced push through the whole pipeline in one process: push-lib → Kafka (librdkafka's
//! mock cluster) → msg-processor → push-server node (Redis registry) → a WebSocket client,
//! with span export on (to testkit's stand-in OTLP collector, decoded with the OTLP protobuf
//! types). The spans of every hop land in the caller's trace with the right parents, and the
//! client sees the node's span as the message's `traceparent`. One test: the tracing
//! subscriber is process-global, so every hop reports as one service here; the parent links
//! are what a multi-process run shares.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use push_lib::SendOptions;
use testkit::otlp::StandInCollector;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_push_is_one_trace_from_push_lib_to_the_client() {
    let collector = StandInCollector::start(1.0);
    let mut cfg = telemetry::TraceExport::from_args(
        &telemetry::OtlpArgs {
            otlp_endpoint: Some(collector.base.clone()),
        },
        "pipeline-test",
    );
    cfg.initial_ratio = 1.0;
    let guard = telemetry::init_logging_with_traces(telemetry::LogFormat::Human, "warn", &cfg)
        .unwrap()
        .expect("export is on");

    let kafka = MockKafka::start();
    kafka.create_topic("push", 1);
    kafka.create_topic("push-dlq", 1);
    let redis = testkit::RedisServer::start();
    let node_a = node("node-a", &redis.url(), None).await;
    let mut ws = connect_ws(&node_a, "trudy").await;
    wait_registered(&redis.url(), &[("trudy".into(), "node-a".into())]).await;
    let p = processor(settings(&kafka.brokers(), "push", &redis.url())).await;

    let opts = SendOptions {
        traceparent: Some(format!("00-{TRACE}-{CALLER_SPAN}-01")),
        ..SendOptions::default()
    };
    producer(&kafka.brokers(), "push")
        .send("trudy", "traced", &opts)
        .await
        .expect("broker acknowledges");
    let msg = next_message(&mut ws).await;
    assert_eq!(msg["data"], "traced");
    let seen = msg["traceparent"]
        .as_str()
        .expect("a traceparent")
        .to_owned();

    // Every hop's span, by name, until all are in (the node's receive span ends when the
    // message is queued, before the deliver batch that sent it is answered).
    guard.flush();
    let mut by_name: HashMap<String, Span> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let hops = [
        "push send",
        "consume",
        "history append",
        "registry lookup",
        "deliver batch",
        "internal receive",
        "queue",
        "socket write",
    ];
    while !hops.iter().all(|h| by_name.contains_key(*h)) {
        assert!(
            Instant::now() < deadline,
            "spans so far: {:?}",
            by_name.keys()
        );
        guard.flush();
        while let Ok(r) = collector.requests.recv_timeout(Duration::from_millis(200)) {
            if r.line != "POST /v1/traces" {
                continue;
            }
            let req = ExportTraceServiceRequest::decode(r.body.as_slice()).unwrap();
            for span in req
                .resource_spans
                .into_iter()
                .flat_map(|rs| rs.scope_spans)
                .flat_map(|ss| ss.spans)
            {
                if hex(&span.trace_id) == TRACE {
                    by_name.insert(span.name.clone(), span);
                }
            }
        }
    }
    let parent_of = |name: &str| hex(&by_name[name].parent_span_id);
    let id_of = |name: &str| hex(&by_name[name].span_id);
    assert_eq!(parent_of("push send"), CALLER_SPAN);
    assert_eq!(parent_of("consume"), id_of("push send"));
    for child in ["history append", "registry lookup", "deliver batch"] {
        assert_eq!(parent_of(child), id_of("consume"), "{child}");
    }
    assert_eq!(parent_of("internal receive"), id_of("deliver batch"));
    for child in ["queue", "socket write"] {
        assert_eq!(parent_of(child), id_of("internal receive"), "{child}");
    }
    assert_eq!(
        seen,
        format!("00-{TRACE}-{}-01", id_of("internal receive")),
        "the client's parent is the node's receive span"
    );
    p.shutdown().await;
}
