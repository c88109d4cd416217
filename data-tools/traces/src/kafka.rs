//! The Kafka transport, for more spans than one writer takes: the collector produces each span
//! to a topic, keyed by its trace ID (a trace's spans share a partition, so they meet in one
//! writer's files), and any number of store writers in one consumer group share the
//! partitions, write Parquet files to the common store, and only then commit their offsets.
//!
//! At least once: a writer that stops between its write and its commit has those spans
//! delivered again, so the store may hold a span twice; [`crate::store::SpanStore::trace`]
//! drops such duplicates (same trace and span ID, same start).

use std::fmt;
use std::time::Duration;

use metrics::counter;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::watch;

use crate::model::SpanRow;
use crate::store::{SpanStore, StoreError};

/// Where spans travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The spans topic.
    pub topic: String,
}

/// The transport failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// librdkafka refused a setting or a call (the message names it).
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The store writer could not write: it stops without committing, so the spans it held
    /// are delivered again to whichever writer takes the partitions.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The collector's side: produces spans.
pub struct SpanProducer {
    producer: FutureProducer,
    topic: String,
}

impl fmt::Debug for SpanProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl SpanProducer {
    /// A producer for `settings.topic`.
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            // Spans are telemetry: brokers away for 30 s cost those spans (counted), never a
            // collector that waits or a queue that grows without bound.
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "500000")
            // Batches of spans arrive together; a few ms of linger makes fewer, larger requests.
            .set("linger.ms", "10")
            .create()?;
        Ok(Self {
            producer,
            topic: settings.topic.clone(),
        })
    }

    /// Produces the spans, each keyed by its trace ID, and waits for the brokers' answers.
    /// Returns how many were not delivered.
    pub async fn send(&self, rows: &[SpanRow]) -> usize {
        let mut pending = Vec::with_capacity(rows.len());
        let mut failed = 0;
        for row in rows {
            let value = serde_json::to_vec(row).expect("a row serialises");
            let record = FutureRecord::to(&self.topic)
                .key(row.trace_id.as_str())
                .payload(&value);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                // The local queue is full: the brokers are far behind.
                Err(_) => failed += 1,
            }
        }
        for delivery in pending {
            if !matches!(delivery.await, Ok(Ok(_))) {
                failed += 1;
            }
        }
        failed
    }
}

/// What a store writer runs with.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Brokers and topic.
    pub kafka: KafkaSettings,
    /// Consumer group shared by all writers of one store.
    pub group: String,
    /// How often consumed spans are written (and their offsets committed).
    pub flush_interval: Duration,
    /// Write earlier once this many spans wait.
    pub flush_spans: usize,
}

/// One store writer: consumes spans, writes them to `store` every `flush_interval` (or at
/// `flush_spans`), then commits. Returns when `stop` turns true, after a last write and
/// commit; returns an error (without committing) when the store cannot be written.
pub async fn run_writer(
    settings: WriterSettings,
    store: SpanStore,
    mut stop: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("group.id", &settings.group)
        // Offsets are committed by hand, after the spans are in the store.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[settings.kafka.topic.as_str()])?;
    let mut pending: Vec<SpanRow> = Vec::new();
    let mut uncommitted = false;
    let mut tick = tokio::time::interval(settings.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            m = consumer.recv() => {
                match m {
                    Ok(m) => {
                        uncommitted = true;
                        match m.payload().map(serde_json::from_slice::<SpanRow>) {
                            Some(Ok(row)) => pending.push(row),
                            // Not ours: skipped (and committed past), never a stuck partition.
                            _ => counter!("traces_kafka_records_skipped_total").increment(1),
                        }
                        if pending.len() < settings.flush_spans {
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka consume failed");
                        continue;
                    }
                }
                false
            }
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        if !pending.is_empty() {
            let rows = std::mem::take(&mut pending);
            let n = rows.len();
            store.write(rows, chrono::Utc::now()).await?;
            counter!("traces_spans_stored_total").increment(n as u64);
        }
        if uncommitted {
            // A failed commit (a rebalance took the partitions meanwhile) only means those
            // spans are delivered again: they are already stored, and reads drop duplicates.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::warn!(error = %e, "kafka commit failed; those spans will come again");
            }
            uncommitted = false;
        }
        if stopping {
            return Ok(());
        }
    }
}
