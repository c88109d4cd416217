//! Metric names, the Prometheus recorder and the `/metrics` endpoint, plus [`Stats`]: the
//! same counts as plain atomics, which tests and the shutdown log read without a recorder.
//!
//! Operators watch `msgproc_consumer_lag` (messages behind, per partition) to scale the
//! processors, and `msgproc_end_to_end_latency_seconds` for what users feel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Counter: records read from the topic.
pub const CONSUMED: &str = "msgproc_consumed_total";
/// Counter, label `how` (`delivered`, `duplicate`): messages a node took.
pub const DELIVERED: &str = "msgproc_delivered_total";
/// Counter: messages for users with no live connection: kept in their history, sent when
/// they resume.
pub const STORED: &str = "msgproc_stored_total";
/// Counter: failed history appends (retried).
pub const HISTORY_ERRORS: &str = "msgproc_history_errors_total";
/// Counter: messages past their TTL.
pub const EXPIRED: &str = "msgproc_expired_total";
/// Counter, label `reason` (`malformed`, `invalid`): dead-lettered messages.
pub const DEAD_LETTERED: &str = "msgproc_dead_lettered_total";
/// Counter: messages sent again to a node after a failed round.
pub const RETRIES: &str = "msgproc_retries_total";
/// Counter, label `result` (`ok`, `error`): deliver requests to nodes.
pub const DELIVER_REQUESTS: &str = "msgproc_deliver_requests_total";
/// Counter: failed registry lookups (retried).
pub const REGISTRY_ERRORS: &str = "msgproc_registry_errors_total";
/// Counter: deliveries not sent because the registry record named a node outside
/// `--peer-nets` (the message stays in the history for the user's resume).
pub const PEER_REFUSED: &str = "msgproc_peer_refused_total";
/// Counter, label `reason` (`queue_full`, `undelivered`, `refused`): push outcomes not
/// published (`--outcomes-topic`): the queue was full or the broker did not take them in time.
pub const OUTCOMES_DROPPED: &str = "msgproc_outcomes_dropped_total";
/// Gauge, labels `topic`, `partition`: messages between this consumer's position and the
/// partition's end (from librdkafka statistics).
pub const CONSUMER_LAG: &str = "msgproc_consumer_lag";
/// Histogram: messages per processed batch (one partition's run).
pub const BATCH_SIZE: &str = "msgproc_batch_size";
/// Histogram: messages per deliver request to a node.
pub const NODE_BATCH_SIZE: &str = "msgproc_node_batch_size";
/// Histogram (seconds): envelope `created_at` to the node's answer "delivered".
pub const END_TO_END_LATENCY: &str = "msgproc_end_to_end_latency_seconds";

/// End-to-end latency spans queueing: milliseconds when idle, seconds under backlog.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    telemetry::install_recorder(
        &HANDLE,
        || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .set_buckets_for_metric(Matcher::Suffix("batch_size".into()), BATCH_BUCKETS)
                .expect("bucket list is not empty")
        },
        describe,
    )
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    telemetry::otel::describe_trace_metrics();
    describe_counter!(CONSUMED, "Records read from the topic.");
    describe_counter!(DELIVERED, "Messages a node took, by how.");
    describe_counter!(
        STORED,
        "Messages for users connected nowhere, kept for their resume."
    );
    describe_counter!(HISTORY_ERRORS, "Failed history appends.");
    describe_counter!(EXPIRED, "Messages past their TTL.");
    describe_counter!(
        DEAD_LETTERED,
        "Messages sent to the dead-letter topic, by reason."
    );
    describe_counter!(RETRIES, "Messages sent again after a failed round.");
    describe_counter!(DELIVER_REQUESTS, "Deliver requests to nodes, by result.");
    describe_counter!(REGISTRY_ERRORS, "Failed registry lookups.");
    describe_counter!(
        PEER_REFUSED,
        "Deliveries not sent to a node outside --peer-nets."
    );
    describe_counter!(
        OUTCOMES_DROPPED,
        "Push outcomes not published to --outcomes-topic, by reason."
    );
    describe_gauge!(CONSUMER_LAG, "Messages behind the partition's end.");
    describe_histogram!(BATCH_SIZE, "Messages per processed batch.");
    describe_histogram!(NODE_BATCH_SIZE, "Messages per deliver request.");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "Envelope created_at to delivered."
    );
}

/// The headline counts as atomics: read by tests, logged at shutdown.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records read.
    pub consumed: AtomicU64,
    /// Messages delivered (or duplicate).
    pub delivered: AtomicU64,
    /// Messages for users connected nowhere (kept in their history).
    pub stored: AtomicU64,
    /// Messages past their TTL.
    pub expired: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Messages sent again after a failed round.
    pub retries: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
    /// Partitions assigned to this processor now.
    pub partitions: AtomicU64,
    /// Push outcomes queued for `--outcomes-topic`.
    pub outcomes_queued: AtomicU64,
    /// Push outcomes dropped (queue full, or not taken by the broker in time).
    pub outcomes_dropped: AtomicU64,
}

impl Stats {
    /// Adds `n` to one count.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads one count.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => {
                            (StatusCode::OK, "text/plain; version=0.0.4", handle.render())
                        }
                        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found\n".to_owned(),
                        ),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
