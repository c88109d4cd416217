//! Measures the collector and the store (docs/BENCHMARKS.md has the figures and the command):
//! OTLP/HTTP protobuf ingest in spans/s (accepted, then stored), the store's bytes per million
//! spans, a trace looked up by ID through the Jaeger API, and the shipped SQL scripts' time
//! over all the spans.
//!
//! ```sh
//! cargo run -p traces --example bench -- [SPANS] [CLIENTS]     # defaults 1000000 4
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use rand::Rng;
use traces::query;
use traces::server::{self, Settings};
use traces::store::SpanStore;

/// OTLP exporters send batches of 512 spans by default.
const BATCH: usize = 512;
/// Spans per trace: the push path's hops.
const HOPS: [(&str, &str); 8] = [
    ("push-lib", "send"),
    ("msg-processor", "consume"),
    ("msg-processor", "registry lookup"),
    ("msg-processor", "deliver batch"),
    ("push-server", "POST /internal/v1/deliver"),
    ("push-server", "history append"),
    ("push-server", "socket write"),
    ("browser", "receive"),
];

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// One exporter batch: 64 traces of 8 spans, one service per resource as SDKs send them.
fn batch(rng: &mut impl Rng, t0: u64) -> Vec<u8> {
    let mut per_service: Vec<(&str, Vec<Span>)> = Vec::new();
    for _ in 0..BATCH / HOPS.len() {
        let trace: [u8; 16] = rng.random();
        let mut parent = Vec::new();
        let mut start = t0 + rng.random_range(0..1_000_000_000u64);
        for (service, name) in HOPS {
            let id: [u8; 8] = rng.random();
            let dur = rng.random_range(10_000..5_000_000u64);
            let span = Span {
                trace_id: trace.to_vec(),
                span_id: id.to_vec(),
                parent_span_id: parent.clone(),
                name: name.into(),
                kind: 2,
                start_time_unix_nano: start,
                end_time_unix_nano: start + dur,
                attributes: vec![
                    kv(
                        "user",
                        Value::StringValue(format!("u{}", rng.random_range(0..10_000))),
                    ),
                    kv("bytes", Value::IntValue(rng.random_range(10..4_000))),
                ],
                ..Default::default()
            };
            match per_service.iter_mut().find(|(s, _)| *s == service) {
                Some((_, spans)) => spans.push(span),
                None => per_service.push((service, vec![span])),
            }
            parent = id.to_vec();
            start += dur / 10;
        }
    }
    ExportTraceServiceRequest {
        resource_spans: per_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue(service.into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
    .encode_to_vec()
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let spans: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let clients: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let requests = spans.div_ceil(BATCH);
    let spans = requests * BATCH;

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    // Ten minutes ago, so every span lies in the hours the queries read.
    let t0 = u64::try_from(now.as_nanos())? - 600_000_000_000;
    let mut rng = rand::rng();
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..requests)
            .map(|_| Bytes::from(batch(&mut rng, t0)))
            .collect(),
    );
    let body_bytes: usize = bodies.iter().map(Bytes::len).sum();

    let dir = tempfile::tempdir()?;
    let store = SpanStore::open(dir.path().to_str().unwrap_or("."))?;
    let running = server::start(
        Settings {
            listen: "127.0.0.1:0".parse()?,
            retention: None,
            ..Settings::default()
        },
        store.clone(),
    )
    .await?;
    let base = format!("http://{}", running.addr);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

    let next = Arc::new(AtomicUsize::new(0));
    let throttled = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, base, bodies) = (client.clone(), base.clone(), Arc::clone(&bodies));
            let (next, throttled) = (Arc::clone(&next), Arc::clone(&throttled));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { return };
                    loop {
                        let req = hyper::Request::post(format!("{base}/v1/traces"))
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(body.clone()))
                            .expect("a request");
                        let resp = client.request(req).await.expect("the collector answers");
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        if status == 503 {
                            // What an OTLP exporter does with Retry-After, but sooner.
                            throttled.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        assert_eq!(status, 200);
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let accepted_in = started.elapsed();
    let stored_in = loop {
        let req = hyper::Request::get(format!("{base}/metrics")).body(Full::new(Bytes::new()))?;
        let text = client
            .request(req)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        let stored = String::from_utf8_lossy(&text)
            .lines()
            .find_map(|l| {
                l.strip_prefix("traces_spans_stored_total ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0usize);
        if stored >= spans {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let store_bytes = dir_bytes(dir.path());

    // One trace by ID through the Jaeger API (index lookup, then its files).
    let files = store.files(i64::MIN, i64::MAX).await?;
    let some_trace = files[files.len() / 2]
        .1
        .trace_ids
        .iter()
        .next()
        .cloned()
        .unwrap_or_default();
    let lookup = Instant::now();
    let req = hyper::Request::get(format!("{base}/api/traces/{some_trace}"))
        .body(Full::new(Bytes::new()))?;
    let answer = client.request(req).await?;
    anyhow::ensure!(answer.status() == 200, "trace lookup: {}", answer.status());
    let _ = answer.into_body().collect().await?;
    let lookup_in = lookup.elapsed();
    running.shutdown().await;

    println!("spans: {spans} in {requests} OTLP/HTTP protobuf requests of {BATCH} ({:.0} MiB of bodies), {clients} clients", body_bytes as f64 / 1048576.0);
    println!(
        "accepted: {:.2} s, {:.0} spans/s ({} requests throttled with 503 and retried)",
        accepted_in.as_secs_f64(),
        spans as f64 / accepted_in.as_secs_f64(),
        throttled.load(Ordering::Relaxed)
    );
    println!(
        "stored:   {:.2} s, {:.0} spans/s",
        stored_in.as_secs_f64(),
        spans as f64 / stored_in.as_secs_f64()
    );
    println!(
        "store: {} files, {:.1} MiB, {:.1} MiB per million spans",
        files.len(),
        store_bytes as f64 / 1048576.0,
        store_bytes as f64 / 1048576.0 / (spans as f64 / 1e6)
    );
    println!(
        "trace by ID (Jaeger API): {:.1} ms",
        lookup_in.as_secs_f64() * 1e3
    );

    let from = i64::try_from(t0)? - 3_600_000_000_000;
    let to = i64::try_from(now.as_nanos())? + 3_600_000_000_000;
    for script in [
        "per_hop_latency.sql",
        "slowest_traces.sql",
        "error_rate.sql",
        "late_messages.sql",
    ] {
        let sql =
            std::fs::read_to_string(format!("{}/queries/{script}", env!("CARGO_MANIFEST_DIR")))?;
        let t = Instant::now();
        let batches = query::run(&store, &sql, from, to, query::DEFAULT_MEMORY_LIMIT).await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        println!(
            "query {script}: {:.2} s over {spans} spans ({rows} rows)",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
