//! Delivery receipts: a client acknowledges a message ID (WebSocket `ack`, or `POST /ack` for
//! SSE clients); the node turns it into a [`Receipt`] — which message (its queue message ID
//! from the history), which device, when it was sent and when it was acknowledged — and
//! publishes it to the admin API's waiters and, with `--receipts-brokers`, to a Kafka topic.
//!
//! Acknowledgements travel through a bounded channel to one task, so a connection's driver
//! never waits for the history or Kafka: a flood of acks is counted and dropped rather than
//! slowing message delivery.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use push_registry::{Buffered, MessageStore};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, oneshot};

use crate::hub::{AckSlot, Transport};
use crate::metrics as m;
use crate::trace::ReceiptTraces;

/// Acknowledgements waiting for the receipt task. At 72 bytes each, 64 Ki of them is 4.5 MiB:
/// far more than a node receives between two passes of the task, unless it is overloaded.
const ACK_QUEUE: usize = 64 * 1024;

/// Acknowledgements the task handles per pass: one history read per user among them.
const BATCH: usize = 512;

/// (user, ID) pairs remembered as receipted, so that repeated acks of one message publish
/// one receipt. 64 Ki pairs is about 4 MiB and covers far more than the acks of one
/// history age on a busy node; an ack repeated after that long is rare and harmless.
const RECENT: usize = 64 * 1024;

/// A delivery receipt, as published (JSON on the Kafka topic and in admin API answers): the
/// wire type from push-proto, which push-lib reads.
pub use push_proto::api::Receipt;

/// One acknowledgement from a client.
#[derive(Debug)]
pub struct Ack {
    /// The connection's user.
    pub user: Arc<str>,
    /// The connection's device.
    pub device: Option<Box<str>>,
    /// How it arrived.
    pub transport: Transport,
    /// The acknowledged message ID.
    pub id: u64,
    /// When it arrived, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The connection's place in the queue (WebSocket acks), given back once handled.
    pub slot: Option<AckSlot>,
    /// The `receipt` span, when the message was sampled here ([`ReceiptTraces`]); it ends
    /// once the ack is handled. `None` (a null pointer) for every other ack.
    pub span: Option<Box<tracing::Span>>,
}

type WaiterKey = (Box<str>, u64);

/// The receipts side of a node: the acknowledgement queue and the waiters.
#[derive(Debug)]
pub struct Receipts {
    tx: mpsc::Sender<Ack>,
    rx: Mutex<Option<mpsc::Receiver<Ack>>>,
    waiters: Mutex<HashMap<WaiterKey, Vec<oneshot::Sender<Receipt>>>>,
    /// Sampled messages that may still be acked: the parents of their `receipt` spans.
    pub traces: ReceiptTraces,
}

impl Default for Receipts {
    fn default() -> Self {
        Self::new()
    }
}

impl Receipts {
    /// An empty queue; the server starts its task (`Receipts::spawn`).
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            waiters: Mutex::new(HashMap::new()),
            traces: ReceiptTraces::default(),
        }
    }

    /// Queues an acknowledgement; never waits. Counted and dropped when the queue is full.
    pub fn ack(&self, ack: Ack) -> bool {
        let queued = self.tx.try_send(ack).is_ok();
        if !queued {
            metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "overloaded").increment(1);
        }
        queued
    }

    /// Whether acks from `POST /ack` are taken now: only while at least half the queue is
    /// free. WebSocket acks are bounded per connection; these come from requests, so this
    /// keeps the other half for the connections' shares.
    pub fn room_for_posted(&self) -> bool {
        self.tx.capacity() > ACK_QUEUE / 2
    }

    /// Resolves with the first receipt for message `id` of `user` (from any device).
    /// Register before the message can reach a client, or its receipt may come first.
    pub fn wait(&self, user: &str, id: u64) -> oneshot::Receiver<Receipt> {
        let (tx, rx) = oneshot::channel();
        self.lock_waiters()
            .entry((user.into(), id))
            .or_default()
            .push(tx);
        rx
    }

    /// Forgets the waiters of message `id` of `user` whose receivers are gone (timed out).
    pub fn forget(&self, user: &str, id: u64) {
        let mut waiters = self.lock_waiters();
        let key: WaiterKey = (user.into(), id);
        if let Some(list) = waiters.get_mut(&key) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&key);
            }
        }
    }

    fn lock_waiters(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<WaiterKey, Vec<oneshot::Sender<Receipt>>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the task that turns acknowledgements into receipts. Called once per node.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        store: Arc<dyn MessageStore>,
        node: String,
        kafka: Option<KafkaReceipts>,
    ) -> tokio::task::JoinHandle<()> {
        let rx = self
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the receipt task is started once");
        tokio::spawn(run(self.clone(), rx, store, node, kafka))
    }

    fn publish_local(&self, receipt: &Receipt) {
        let key: WaiterKey = (receipt.user.as_str().into(), receipt.id);
        let Some(list) = self.lock_waiters().remove(&key) else {
            return;
        };
        for tx in list {
            let _ = tx.send(receipt.clone());
        }
    }
}

/// The Kafka side: a producer and the topic.
pub(crate) struct KafkaReceipts {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaReceipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReceipts")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaReceipts {
    /// A producer for `brokers`. Connects lazily: a broker that is down at start-up does not
    /// stop the node; publishing errors are counted.
    pub(crate) fn new(brokers: &str, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // Receipts are small and bursty: a few milliseconds of batching costs little
            // latency and saves many requests.
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    async fn publish(&self, receipts: &[Receipt]) {
        let sends = receipts.iter().map(|r| {
            let json = serde_json::to_vec(r).expect("receipts serialize");
            let producer = &self.producer;
            let topic = &self.topic;
            async move {
                let record = FutureRecord::to(topic).key(&r.user).payload(&json);
                producer.send(record, Duration::from_secs(5)).await
            }
        });
        for result in futures_util::future::join_all(sends).await {
            if let Err((e, _)) = result {
                metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "kafka").increment(1);
                tracing::warn!(error = %e, topic = %self.topic, "receipt not published");
            }
        }
    }
}

async fn run(
    receipts: Arc<Receipts>,
    mut rx: mpsc::Receiver<Ack>,
    store: Arc<dyn MessageStore>,
    node: String,
    kafka: Option<KafkaReceipts>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut recent = Recent::default();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut by_user: HashMap<Arc<str>, Vec<Ack>> = HashMap::new();
        for mut ack in batch.drain(..) {
            // Handled: the connection's place in the queue is free again.
            ack.slot = None;
            by_user.entry(ack.user.clone()).or_default().push(ack);
        }
        // One history read per user, all users at once.
        let reads = by_user.into_values().map(|acks| {
            let store = store.clone();
            async move {
                let ids: Vec<u64> = acks.iter().map(|a| a.id).collect();
                let found = store.get(&acks[0].user, &ids).await;
                (acks, found)
            }
        });
        let mut out = Vec::new();
        for (acks, found) in futures_util::future::join_all(reads).await {
            match found {
                Ok(kept) => out.extend(
                    acks.iter()
                        .filter_map(|a| receipt(a, &kept, &node))
                        .filter(|r| recent.first(&r.user, r.id)),
                ),
                Err(e) => {
                    metrics::counter!(m::HISTORY_ERRORS, "op" => "get").increment(1);
                    metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "history_unavailable")
                        .increment(acks.len() as u64);
                    tracing::warn!(error = %e, "acknowledgements dropped: history unavailable");
                }
            }
        }
        for r in &out {
            metrics::counter!(m::RECEIPTS, "transport" => r.transport.as_str()).increment(1);
            let secs = r.acked_at_ms.saturating_sub(r.sent_at_ms) as f64 / 1000.0;
            metrics::histogram!(m::RECEIPT_SECONDS).record(secs);
            receipts.publish_local(r);
        }
        if let Some(k) = &kafka {
            k.publish(&out).await;
        }
    }
}

/// The (user, ID) pairs receipted lately, oldest first out.
#[derive(Default)]
struct Recent {
    set: HashSet<(Arc<str>, u64)>,
    order: VecDeque<(Arc<str>, u64)>,
}

impl Recent {
    /// True the first time a pair is seen (within the last [`RECENT`]).
    fn first(&mut self, user: &str, id: u64) -> bool {
        let key: (Arc<str>, u64) = (user.into(), id);
        if self.set.contains(&key) {
            metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "duplicate").increment(1);
            return false;
        }
        if self.order.len() >= RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }
}

/// The receipt for one acknowledgement, if the message is in the history and was for this
/// device. An ID that is not kept (never sent, or aged out) gets no receipt: a receipt
/// names the message it confirms.
fn receipt(ack: &Ack, kept: &[Buffered], node: &str) -> Option<Receipt> {
    let Some(msg) = kept.iter().find(|m| m.id == ack.id) else {
        metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "not_in_history").increment(1);
        return None;
    };
    if msg
        .device
        .as_deref()
        .is_some_and(|d| ack.device.as_deref() != Some(d))
    {
        metrics::counter!(m::RECEIPTS_DROPPED, "reason" => "other_device").increment(1);
        return None;
    }
    Some(Receipt {
        user: ack.user.to_string(),
        device: ack.device.as_deref().map(str::to_owned),
        id: ack.id,
        mid: msg.mid.clone(),
        node: node.to_owned(),
        transport: ack.transport,
        sent_at_ms: msg.at_ms,
        acked_at_ms: ack.at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_receipted_once_however_often_it_is_acked() {
        let mut recent = Recent::default();
        assert!(recent.first("u", 1));
        assert!(!recent.first("u", 1));
        assert!(recent.first("v", 1));
        assert!(recent.first("u", 2));
        // Bounded: the oldest pairs are forgotten first.
        for id in 10..10 + RECENT as u64 {
            recent.first("w", id);
        }
        assert_eq!(recent.set.len(), RECENT);
        assert_eq!(recent.order.len(), RECENT);
        assert!(recent.first("u", 1));
    }
}
