//! The push path shared by the admin API and the message processor's deliveries: a message
//! takes its per-user ID from the history (it is appended there, so a client that is not
//! connected, or reconnecting, gets it when it resumes), then is queued for the user's live
//! connections on this node, and (admin pushes for users held elsewhere) forwarded to the
//! nodes that hold them (forward.rs).
//!
//! One user's messages must reach a connection in ID order, or a connection would skip the
//! lower ID (it never queues an ID below one it has queued). The history gives IDs in the
//! order of its appends, so appending and queueing for one user are done under one lock
//! (the [`Sequencer`]), held across the append's round trip to the store.
//!
//! Back-pressure: a full connection queue is waited on (the socket drains it) rather than
//! overflowed, and a push answers once its frames are written, so `delivered` counts what
//! reached the sockets. Both waits share one bound per request (`--slow-consumer-timeout`);
//! a connection that does not drain within it is a slow consumer.

use std::sync::Arc;
use tracing::Instrument as _;

use push_registry::{MessageStore, NewMessage};
use tokio::sync::{oneshot, MutexGuard};
use tokio::time::Instant;

use crate::forward::Forwarder;
use crate::hub::{ConnHandle, Hub, Outbound, PushOutcome, PushRequest, QueueLimits, Transport};
use crate::metrics as m;
use crate::protocol::message::ServerMessage;
use crate::receipts::{Receipt, Receipts};
use crate::trace::ReceiveSpans;

/// Lock shards for per-user order. Two users in one shard wait for each other's appends;
/// 256 shards keep that rare at the concurrency a node sees (the message processor sends a
/// few batches at a time, the admin API one request per connection).
const SHARDS: usize = 256;

/// Per-user order of appends and queueing on this node.
#[derive(Debug)]
pub struct Sequencer {
    locks: Box<[tokio::sync::Mutex<()>]>,
}

impl Default for Sequencer {
    fn default() -> Self {
        Self::new()
    }
}

impl Sequencer {
    /// Unlocked shards.
    pub fn new() -> Self {
        Self {
            locks: (0..SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// Locks the shards of these users, in ascending order so that two batches can never
    /// wait for each other.
    async fn lock<'a>(&'a self, users: impl Iterator<Item = &str>) -> Vec<MutexGuard<'a, ()>> {
        let mut shards: Vec<usize> = users.map(|u| push_registry::shard_of(u, SHARDS)).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut guards = Vec::with_capacity(shards.len());
        for s in shards {
            guards.push(self.locks[s].lock().await);
        }
        guards
    }
}

/// One message's result on this node.
#[derive(Debug)]
pub struct Pushed {
    /// ID, duplicate flag, connections reached here.
    pub outcome: PushOutcome,
    /// Resolves with the first receipt, when the caller asked to wait for one.
    pub receipt: Option<oneshot::Receiver<Receipt>>,
}

/// The handle the admin API pushes through: what the push path needs and nothing else.
#[derive(Debug)]
pub struct Pusher {
    hub: Arc<Hub>,
    store: Arc<dyn MessageStore>,
    sequencer: Sequencer,
    receipts: Arc<Receipts>,
    forwarder: Forwarder,
    limits: QueueLimits,
}

impl Pusher {
    /// Pushes to `hub`'s connections, taking IDs from `store`, forwarding with `forwarder`.
    pub fn new(
        hub: Arc<Hub>,
        store: Arc<dyn MessageStore>,
        receipts: Arc<Receipts>,
        forwarder: Forwarder,
        limits: QueueLimits,
    ) -> Self {
        Self {
            hub,
            store,
            sequencer: Sequencer::new(),
            receipts,
            forwarder,
            limits,
        }
    }

    /// Appends the messages that have no ID yet to the history, then queues every message
    /// for the live connections of its user here, in order. With `wait_receipts`, a receipt
    /// waiter is registered for each message before it can reach a client.
    ///
    /// Fails only if the history cannot be written: then nothing was queued, and the caller
    /// answers with an error so that the sender retries.
    ///
    /// `spans` holds each message's receive span (empty when not traced): each ends as its
    /// message is handed to the connections' queues.
    pub async fn push(
        &self,
        reqs: &[PushRequest<'_>],
        received_at: Instant,
        wait_receipts: bool,
        spans: ReceiveSpans,
    ) -> Result<Vec<Pushed>, push_registry::Error> {
        push(self, reqs, received_at, wait_receipts, spans).await
    }
}

async fn push(
    p: &Pusher,
    reqs: &[PushRequest<'_>],
    received_at: Instant,
    wait_receipts: bool,
    mut spans: ReceiveSpans,
) -> Result<Vec<Pushed>, push_registry::Error> {
    let new: Vec<NewMessage<'_>> = reqs
        .iter()
        .filter(|r| r.id.is_none())
        .map(|r| NewMessage {
            user: r.user,
            mid: r.message_id,
            device: r.device,
            // Only a well-formed one is kept: a sender's string of any length is not.
            traceparent: r
                .traceparent
                .filter(|t| t.len() == 55 && telemetry::propagation::parse_traceparent(t).is_ok()),
            json: r.payload.is_json,
            data: &r.payload.bytes,
        })
        .collect();
    let _order = p
        .sequencer
        .lock(reqs.iter().filter(|r| r.id.is_none()).map(|r| r.user))
        .await;
    let appended = if new.is_empty() {
        Vec::new()
    } else {
        let append = p.store.append(&new);
        // Under the receive span of a single message; a batch's append is for many receive
        // spans, and a root span here would be a trace of its own.
        let parent = spans.span(0).filter(|_| reqs.len() == 1);
        let append = match parent {
            Some(parent) => {
                append
                    .instrument(tracing::info_span!(parent: parent, "history append"))
                    .await
            }
            None => append.await,
        };
        append.inspect_err(|_| {
            metrics::counter!(m::HISTORY_ERRORS, "op" => "append").increment(1);
        })?
    };
    let mut appended = appended.into_iter();
    // One bound for the whole request: a burst to a client that reads is paced by its
    // socket; a client that does not read for this long is cut off, and the sender is
    // held back at most this long by it.
    let deadline = Instant::now() + p.limits.slow_after;
    let mut deliveries = Vec::with_capacity(reqs.len());
    let mut receipts = Vec::with_capacity(reqs.len());
    for (k, req) in reqs.iter().enumerate() {
        let (id, duplicate) = match req.id {
            Some(id) => (id, false),
            None => {
                let a = appended.next().expect("one outcome per appended message");
                (a.id, a.duplicate)
            }
        };
        for (conn, at) in p.hub.skipping(req, id) {
            catch_up(p, &conn, at, id, deadline).await;
        }
        let receipt = wait_receipts.then(|| p.receipts.wait(req.user, id));
        // Handed to the queues now: the receive span ends, `queue` spans start (hub.rs).
        spans.end(k);
        if let Some(cx) = req.trace {
            p.receipts.traces.remember(req.user, id, cx);
        }
        let delivery = p
            .hub
            .deliver(req, id, received_at, p.limits, deadline)
            .await;
        deliveries.push((delivery, duplicate));
        receipts.push(receipt);
    }
    // `delivered` means written to the socket: wait for the frames queued above.
    let mut outcomes = Vec::with_capacity(reqs.len());
    for (delivery, duplicate) in deliveries {
        let mut outcome = delivery.settle(deadline).await;
        outcome.duplicate = duplicate;
        outcomes.push(outcome);
    }
    // Still in per-user order: a user's next message waits until this one reached the
    // nodes that hold the user.
    p.forwarder.forward(reqs, &mut outcomes).await;
    let stored = outcomes.iter().filter(|o| o.delivered == 0).count();
    metrics::counter!(m::MESSAGES_STORED).increment(stored as u64);
    Ok(outcomes
        .into_iter()
        .zip(receipts)
        .map(|(outcome, receipt)| Pushed { outcome, receipt })
        .collect())
}

/// Queues on `conn` what its client is owed between the ID it stands at (`at`) and `id`, the
/// message about to be queued, read from the history. One user's IDs are consecutive, so a
/// step of more than one means the client may have missed messages: sent to a node it had
/// just left (a registry entry that had not caught up with a reconnect), or addressed to
/// another device. Without this, the client would see `id`, resume from it later, and never
/// get the ones before. A history that cannot answer in time costs a `gap` to the client,
/// never the message.
async fn catch_up(p: &Pusher, conn: &ConnHandle, at: u64, id: u64, deadline: Instant) {
    let read = tokio::time::timeout_at(deadline, p.store.since(&conn.user, at)).await;
    let resume = match read {
        Ok(Ok(r)) => r,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::warn!(user = %conn.user, conn = conn.id, error = %why, "catch-up without history");
            metrics::counter!(m::HISTORY_ERRORS, "op" => "since").increment(1);
            metrics::counter!(m::CATCH_UPS, "result" => "unavailable").increment(1);
            conn.untrack();
            let gap = ServerMessage::Gap {
                after: at,
                oldest: None,
            };
            conn.enqueue(Outbound::control(gap_frame(&gap, conn.transport)), p.limits);
            return;
        }
    };
    let owed: Vec<Outbound> = resume
        .messages
        .iter()
        .filter(|m| m.id < id && conn.wants(m.device.as_deref()))
        .map(|m| Outbound::stored(m, conn.transport))
        .collect();
    // The history no longer holds `at + 1`. If it holds something older than `id`, the
    // client missed what was trimmed, and a `gap` says so. If `id` is the oldest it holds, the
    // user's history expired while the client stayed connected and IDs restarted higher
    // (from the clock): nothing was missed, and a `gap` would send it to refresh for nothing.
    let gap = resume.gap.filter(|&oldest| oldest < id);
    let result = match (gap, owed.is_empty()) {
        (Some(_), _) => "gap",
        (None, true) => "nothing",
        (None, false) => "filled",
    };
    metrics::counter!(m::CATCH_UPS, "result" => result).increment(1);
    metrics::counter!(m::CAUGHT_UP_MESSAGES).increment(owed.len() as u64);
    if let Some(oldest) = gap {
        let gap = ServerMessage::Gap {
            after: at,
            oldest: Some(oldest),
        };
        conn.enqueue(Outbound::control(gap_frame(&gap, conn.transport)), p.limits);
    }
    for out in owed {
        conn.enqueue_message(out, p.limits, deadline).await;
    }
}

fn gap_frame(gap: &ServerMessage<'_>, transport: Transport) -> bytes::Bytes {
    match transport {
        Transport::Ws => gap.ws_frame(),
        Transport::Sse => gap.sse_event(),
    }
}
