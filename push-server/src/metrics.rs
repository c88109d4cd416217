//! Metric names and the Prometheus recorder.
//!
//! Operators autoscale on `push_connections_open` against `push_connections_capacity`:
//! a push node is bound by open connections, not by requests per second or CPU.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge, label `transport` (`ws`, `sse`): connections open now.
pub const CONNECTIONS_OPEN: &str = "push_connections_open";
/// Gauge: open connections parked now (idle, without a task: `--park-idle`); part of
/// [`CONNECTIONS_OPEN`].
pub const CONNECTIONS_PARKED: &str = "push_connections_parked";
/// Gauge: the node's `--max-connections`.
pub const CONNECTIONS_CAPACITY: &str = "push_connections_capacity";
/// Gauge: 1 while the node drains.
pub const DRAINING: &str = "push_draining";
/// Counter, label `result`: connection attempts by outcome: `ok`, `closed_early`, and each
/// refusal's code. The admission limits (docs/security.md) add `rate_limited` (connect rate
/// per source), `pending_ip_limit` (`--max-pending-per-ip`), `first_byte_timeout`,
/// `ip_limit` (`--max-connections-per-ip`) and `user_limit` (`--max-connections-per-user`).
pub const CONNECTS: &str = "push_connects_total";
/// Counter, label `reason`: closed connections by reason.
pub const DISCONNECTS: &str = "push_disconnects_total";
/// Counter, label `transport`: messages written to client sockets.
pub const MESSAGES_DELIVERED: &str = "push_messages_delivered_total";
/// Counter, label `reason`: messages not delivered.
pub const MESSAGES_DROPPED: &str = "push_messages_dropped_total";
/// Counter: pushes accepted on the admin API.
pub const PUSHES: &str = "push_admin_pushes_total";
/// Counter: acks received from WebSocket clients.
pub const ACKS: &str = "push_acks_total";
/// Counter, label `kind`: client messages that could not be understood.
pub const BAD_CLIENT_MESSAGES: &str = "push_bad_client_messages_total";
/// Histogram (seconds): admin request received to message written to the socket.
pub const DELIVERY_LATENCY: &str = "push_delivery_latency_seconds";
/// Counter, label `op` (`register`, `unregister`, `refresh`, `register_retry`: a failed
/// registration tried again): registry calls made.
pub const REGISTRY_OPS: &str = "push_registry_ops_total";
/// Counter, label `op`: registry calls that failed (a registration is tried again after 1, 2,
/// 4… s, then by the next refresh).
pub const REGISTRY_ERRORS: &str = "push_registry_errors_total";
/// Counter: messages kept in the history for a user with no connection on this node (they
/// get them when they resume).
pub const MESSAGES_STORED: &str = "push_messages_stored_total";
/// Counter, label `op` (`append`, `since`, `get`): history store calls that failed.
pub const HISTORY_ERRORS: &str = "push_history_errors_total";
/// Counter, label `result` (`complete`, `gap`, `unavailable`): resumes by clients.
pub const RESUMES: &str = "push_resumes_total";
/// Counter: messages sent from the history to resuming clients.
pub const RESUMED_MESSAGES: &str = "push_resumed_messages_total";
/// Counter, label `result` (`filled`, `nothing`, `gap`, `unavailable`): catch-ups, when a
/// live message would have skipped IDs on a connection (push.rs reads them from the history).
pub const CATCH_UPS: &str = "push_catch_ups_total";
/// Counter: messages a catch-up found missing on a connection and queued before the live one.
pub const CAUGHT_UP_MESSAGES: &str = "push_caught_up_messages_total";
/// Counter, label `transport`: delivery receipts (client acknowledgements) published.
pub const RECEIPTS: &str = "push_receipts_total";
/// Histogram (seconds): message appended to the history to the client's acknowledgement.
pub const RECEIPT_SECONDS: &str = "push_receipt_seconds";
/// Counter, label `reason`: acknowledgements not turned into receipts.
pub const RECEIPTS_DROPPED: &str = "push_receipts_dropped_total";
/// Counter: admin pushes handed to the nodes that hold their users.
pub const FORWARDED: &str = "push_forwarded_total";
/// Counter, label `reason` (`registry`, `node`): forwards that failed (message kept).
pub const FORWARD_ERRORS: &str = "push_forward_errors_total";
/// Counter: accept() failures (for example out of file descriptors).
pub const ACCEPT_ERRORS: &str = "push_accept_errors_total";

// Admin-port hardening (issue 14, harden-admin).
/// Counter, label `reason` (`not_canonical`, `unauthorized`, `bad_host`, `browser`,
/// `too_many_connections`, `body_timeout`, `bad_id`): admin requests refused.
pub const ADMIN_REFUSED: &str = "push_admin_refused_total";
/// Counter, label `reason` (`peer_not_allowed`): forwards not sent because the registry
/// record named a node outside `--peer-nets`.
pub const FORWARD_REFUSED: &str = "push_forward_refused_total";

/// Latency buckets: a push on loopback takes tens of microseconds; a loaded node, tens of
/// milliseconds; anything past a second is an incident.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Time-to-receipt buckets: a client on loopback acks in a millisecond; a phone on a mobile
/// network in hundreds; one that resumes after a drop, in seconds or minutes.
const RECEIPT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle. Several
/// servers in one process (tests, benches) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    telemetry::install_recorder(
        &HANDLE,
        || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY.into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(RECEIPT_SECONDS.into()), RECEIPT_BUCKETS)
                .expect("bucket list is not empty")
        },
        describe,
    )
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    telemetry::otel::describe_trace_metrics();
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Client connections open now, by transport."
    );
    describe_gauge!(
        CONNECTIONS_PARKED,
        "Open connections parked now: idle, held by a reactor without a task of their own."
    );
    describe_gauge!(
        CONNECTIONS_CAPACITY,
        "Most client connections this node accepts."
    );
    describe_gauge!(DRAINING, "1 while the node is draining.");
    describe_counter!(CONNECTS, "Connection attempts, by result.");
    describe_counter!(DISCONNECTS, "Closed client connections, by reason.");
    describe_counter!(MESSAGES_DELIVERED, "Messages written to client sockets.");
    describe_counter!(MESSAGES_DROPPED, "Messages not delivered, by reason.");
    describe_counter!(PUSHES, "Messages accepted on the admin API.");
    describe_counter!(ACKS, "Acks received from WebSocket clients.");
    describe_counter!(BAD_CLIENT_MESSAGES, "Client messages not understood.");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Admin receive to socket write, per message and connection."
    );
    describe_counter!(ACCEPT_ERRORS, "Failed accept() calls.");
    describe_counter!(ADMIN_REFUSED, "Admin requests refused, by reason.");
    describe_counter!(
        FORWARD_REFUSED,
        "Forwards not sent to a node outside --peer-nets."
    );
    describe_counter!(
        MESSAGES_STORED,
        "Messages kept for users with no connection on this node."
    );
    describe_counter!(HISTORY_ERRORS, "Failed history store calls, by operation.");
    describe_counter!(
        FORWARDED,
        "Admin pushes forwarded to the nodes holding their users."
    );
    describe_counter!(FORWARD_ERRORS, "Failed forwards, by reason.");
    describe_counter!(RESUMES, "Client resumes, by result.");
    describe_counter!(
        RESUMED_MESSAGES,
        "Messages sent from the history on resume."
    );
    describe_counter!(
        CATCH_UPS,
        "Live messages that would have skipped IDs on a connection, by result of the history read."
    );
    describe_counter!(
        CAUGHT_UP_MESSAGES,
        "Messages read from the history and queued before a live one that would have skipped them."
    );
    describe_counter!(RECEIPTS, "Delivery receipts published, by transport.");
    describe_histogram!(
        RECEIPT_SECONDS,
        Unit::Seconds,
        "Message appended to the history to the client's acknowledgement."
    );
    describe_counter!(
        RECEIPTS_DROPPED,
        "Acknowledgements not turned into receipts, by reason."
    );
    describe_counter!(REGISTRY_OPS, "Registry calls, by operation.");
    describe_counter!(REGISTRY_ERRORS, "Failed registry calls, by operation.");
}

/// Metric handles used on the hot path, resolved once instead of per message.
#[derive(Debug)]
pub(crate) struct HotMetrics {
    /// [`MESSAGES_DELIVERED`] by transport index.
    pub delivered: [metrics::Counter; 2],
    /// [`DELIVERY_LATENCY`].
    pub latency: metrics::Histogram,
    /// [`CONNECTIONS_OPEN`] by transport index.
    pub open: [metrics::Gauge; 2],
}

impl HotMetrics {
    /// Resolves the handles in the installed recorder.
    pub(crate) fn new() -> Self {
        Self {
            delivered: [
                metrics::counter!(MESSAGES_DELIVERED, "transport" => "ws"),
                metrics::counter!(MESSAGES_DELIVERED, "transport" => "sse"),
            ],
            latency: metrics::histogram!(DELIVERY_LATENCY),
            open: [
                metrics::gauge!(CONNECTIONS_OPEN, "transport" => "ws"),
                metrics::gauge!(CONNECTIONS_OPEN, "transport" => "sse"),
            ],
        }
    }
}
