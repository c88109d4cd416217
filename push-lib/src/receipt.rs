//! Delivery receipts: a client's acknowledgement of a message, as push-server publishes it
//! (`docs/protocol.md`), and the Kafka listener behind
//! [`PushClient::send_and_wait_receipt`](crate::PushClient::send_and_wait_receipt).
//!
//! The listener reads the receipts topic from its end at start-up: it sees receipts of
//! messages sent after it started, which is what a waiting sender needs. It joins no consumer
//! group (it assigns itself every partition), so any number of senders can listen without
//! taking receipts from each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;

/// A delivery receipt: a device of the user acknowledged the message (the wire type from
/// push-proto, as push-server publishes it).
pub use push_proto::api::Receipt as DeliveryReceipt;

type Waiters = Arc<Mutex<HashMap<String, Vec<oneshot::Sender<DeliveryReceipt>>>>>;

/// Reads the receipts topic and hands each receipt to whoever waits for its message ID.
pub(crate) struct ReceiptListener {
    waiters: Waiters,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ReceiptListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptListener").finish_non_exhaustive()
    }
}

impl Drop for ReceiptListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long start-up may take to find the topic's partitions and their ends.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

impl ReceiptListener {
    /// Assigns every partition of `topic` at its current end and starts reading.
    pub(crate) async fn start(config: &KafkaConfig, topic: &str) -> Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers)
            // Required by librdkafka even without subscribing; never used to commit.
            .set("group.id", "push-lib-receipts")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (k, v) in &config.extra {
            // Producer-only settings would make the consumer refuse to start.
            if !PRODUCER_ONLY.contains(&k.as_str()) {
                cc.set(k, v);
            }
        }
        let consumer: StreamConsumer = cc.create().map_err(Error::KafkaConfig)?;
        let consumer = Arc::new(consumer);
        let topic_owned = topic.to_owned();
        let c = consumer.clone();
        // Metadata and watermark calls block: keep them off the runtime's workers.
        let assignment = tokio::task::spawn_blocking(move || {
            let md = c.fetch_metadata(Some(&topic_owned), METADATA_TIMEOUT)?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .filter(|t| t.name() == topic_owned && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                let (_, high) = c.fetch_watermarks(&topic_owned, *p, METADATA_TIMEOUT)?;
                tpl.add_partition_offset(&topic_owned, *p, Offset::Offset(high))?;
            }
            c.assign(&tpl)?;
            Ok::<usize, rdkafka::error::KafkaError>(partitions.len())
        })
        .await
        .map_err(|e| Error::NotSent(format!("receipt listener start-up failed: {e}")))?;
        let kafka_err = |source| Error::Kafka {
            topic: topic.to_owned(),
            source,
        };
        if assignment.map_err(kafka_err)? == 0 {
            return Err(Error::NotSent(format!(
                "receipts topic {topic:?} has no partitions (does it exist? push-server publishes receipts with --receipts-brokers and --receipts-topic)"
            )));
        }
        let waiters: Waiters = Arc::default();
        let task = tokio::spawn(read(consumer, waiters.clone()));
        Ok(Self { waiters, task })
    }

    /// Resolves with the first receipt for message `mid`. Register before sending.
    pub(crate) fn wait(&self, mid: &str) -> oneshot::Receiver<DeliveryReceipt> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(mid.to_owned()).or_default().push(tx);
        rx
    }

    /// Forgets waiters of `mid` that gave up.
    pub(crate) fn forget(&self, mid: &str) {
        let mut w = self.lock();
        if let Some(list) = w.get_mut(mid) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                w.remove(mid);
            }
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<DeliveryReceipt>>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// librdkafka producer properties a consumer refuses.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "enable.idempotence",
    "linger.ms",
    "message.timeout.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "batch.num.messages",
    "compression.type",
];

async fn read(consumer: Arc<StreamConsumer>, waiters: Waiters) {
    loop {
        match consumer.recv().await {
            Ok(msg) => {
                let Some(receipt) = msg
                    .payload()
                    .and_then(|p| serde_json::from_slice::<DeliveryReceipt>(p).ok())
                else {
                    tracing::debug!(
                        "skipping a record of the receipts topic that is not a receipt"
                    );
                    continue;
                };
                let Some(mid) = receipt.mid.clone() else {
                    continue;
                };
                let list = waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&mid);
                for tx in list.into_iter().flatten() {
                    let _ = tx.send(receipt.clone());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "receipts topic read failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
