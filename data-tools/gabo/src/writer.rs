//! The writer: one consumer (group `gabo-writer.{type}`, so writers scale with partitions) per
//! type, appending each record's events to the staging file of their receive hour, fsyncing,
//! and only then committing offsets. A crash between the fsync and the commit re-delivers
//! records, never loses them; the copies carry the same `src` and the dedup drops them.
//!
//! After each commit it records the partitions' watermarks ([`crate::completeness`]): the
//! newest receive time consumed, or, for a partition read to its end, the time of the flush.
//! Events of an hour that is already closed go to the late bucket (`{type}/_late/…`) in the
//! output store, one object per partition and first offset, and are counted.
//!
//! A type with `source_topic` is *ingested*: each record of that topic is one event (the
//! platform's receipts), validated against the type's schema, stamped with the record's Kafka
//! timestamp, with its ID made from `id_fields`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::envelope::{Event, Record};
use crate::gateway::Clock;
use crate::hour::Hour;
use crate::staging::{Appended, Staging};
use crate::store::Store;
use crate::types::EventType;

/// Writer settings.
#[derive(Clone)]
pub struct WriterSettings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Extra librdkafka settings.
    pub kafka: Vec<(String, String)>,
    /// Longest time a consumed record waits before it is staged and committed. Shorter means
    /// more fsyncs; 200 ms keeps the gateway → staging delay well under a second.
    pub flush_interval: Duration,
    /// Flush earlier once this many events are buffered (bounds the writer's memory).
    pub flush_events: usize,
    /// The time used for watermarks of partitions read to their end.
    pub clock: Clock,
}

impl std::fmt::Debug for WriterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterSettings")
            .field("brokers", &self.brokers)
            .field("flush_interval", &self.flush_interval)
            .field("flush_events", &self.flush_events)
            .finish_non_exhaustive()
    }
}

impl WriterSettings {
    /// Defaults for `brokers`.
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.into(),
            kafka: Vec::new(),
            flush_interval: Duration::from_millis(200),
            flush_events: 10_000,
            clock: crate::gateway::system_clock(),
        }
    }
}

/// A running writer for one type; stops when dropped (uncommitted records are re-delivered
/// to the next writer).
#[derive(Debug)]
pub struct Writer {
    task: JoinHandle<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Writer {
    /// Subscribes to the type's topic and starts writing.
    pub fn start(
        ty: EventType,
        staging: Staging,
        store: Store,
        settings: WriterSettings,
    ) -> anyhow::Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &settings.brokers)
            .set("group.id", ty.group())
            // Offsets are committed by hand, after the fsync.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A new group starts from the oldest record: nothing produced before the writer
            // first ran is skipped.
            .set("auto.offset.reset", "earliest")
            // End-of-partition events tell the writer a partition is caught up (watermark).
            .set("enable.partition.eof", "true");
        for (k, v) in &settings.kafka {
            cc.set(k, v);
        }
        let consumer: StreamConsumer = cc.create()?;
        consumer.subscribe(&[&ty.topic()])?;
        let consumer = Arc::new(consumer);
        let task = tokio::spawn(run(ty, staging, store, settings, consumer));
        Ok(Self { task })
    }
}

#[derive(Default)]
struct Pending {
    /// Staging lines per (hour, partition), with the first offset they came from.
    lines: HashMap<(Hour, i32), (i64, Vec<u8>)>,
    events: usize,
    /// Next offset to commit per partition.
    next: HashMap<i32, i64>,
    /// Newest receive time per partition in this batch.
    newest: HashMap<i32, DateTime<Utc>>,
}

async fn run(
    ty: EventType,
    staging: Staging,
    store: Store,
    settings: WriterSettings,
    consumer: Arc<StreamConsumer>,
) {
    let topic = ty.topic();
    let validator = ty.validator();
    let mut partitions = 0;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut pending = Pending::default();
    let mut tick = tokio::time::interval(settings.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = consumer.recv() => match m {
                Ok(msg) => {
                    at_end.remove(&msg.partition());
                    add(&ty, &validator, &msg, &mut pending);
                    if pending.events < settings.flush_events {
                        continue;
                    }
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%e, r#type = %ty.name, "consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = tick.tick() => {}
        }
        if partitions == 0 {
            partitions = partition_count(&consumer, &topic).await.unwrap_or(0);
        }
        // A partition taken away by a rebalance is no longer ours to vouch for.
        let assigned: HashSet<i32> = consumer
            .assignment()
            .map(|t| t.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        at_end.retain(|p| assigned.contains(p));
        let batch = std::mem::take(&mut pending);
        if let Err(e) = flush(
            &ty, &staging, &store, &consumer, &topic, batch, partitions, &at_end, &settings,
        )
        .await
        {
            // Staged but not committed (or not staged): the records come again; nothing is
            // lost, at worst staged twice and deduplicated.
            tracing::error!(%e, r#type = %ty.name, "flush failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn add(
    ty: &EventType,
    validator: &jsonschema::Validator,
    msg: &BorrowedMessage<'_>,
    pending: &mut Pending,
) {
    let (p, o) = (msg.partition(), msg.offset());
    pending.next.insert(p, o + 1);
    let record = match decode(ty, validator, msg) {
        Ok(r) => r,
        Err(why) => {
            // Committed past, but visible: counted and logged with its position.
            metrics::counter!(crate::metrics::REJECTED, "type" => ty.name.clone()).increment(1);
            tracing::warn!(r#type = %ty.name, partition = p, offset = o, %why, "record skipped");
            return;
        }
    };
    let hour = Hour::containing(record.received_at);
    let entry = pending
        .lines
        .entry((hour, p))
        .or_insert_with(|| (o, Vec::new()));
    for line in record.lines(p, o) {
        serde_json::to_writer(&mut entry.1, &line).expect("a staged line serialises");
        entry.1.push(b'\n');
        pending.events += 1;
    }
    let newest = pending.newest.entry(p).or_insert(record.received_at);
    *newest = (*newest).max(record.received_at);
}

fn decode(
    ty: &EventType,
    validator: &jsonschema::Validator,
    msg: &BorrowedMessage<'_>,
) -> Result<Record, String> {
    let bytes = msg.payload().ok_or("empty record")?;
    if ty.source_topic.is_none() {
        return serde_json::from_slice(bytes).map_err(|e| format!("not a GABO record: {e}"));
    }
    let payload: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(e) = validator.iter_errors(&payload).next() {
        return Err(format!("schema: at {}: {e}", e.instance_path));
    }
    let id = if ty.id_fields.is_empty() {
        format!("{}:{}:{}", msg.topic(), msg.partition(), msg.offset())
    } else {
        ty.id_fields
            .iter()
            .map(|f| match payload.get(f) {
                Some(serde_json::Value::String(s)) => s.clone(),
                None | Some(serde_json::Value::Null) => String::new(),
                Some(v) => v.to_string(),
            })
            .collect::<Vec<_>>()
            .join(":")
    };
    let received_at = msg
        .timestamp()
        .to_millis()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or_else(Utc::now);
    Ok(Record {
        type_name: ty.name.clone(),
        received_at,
        events: vec![Event { id, payload }],
    })
}

async fn partition_count(consumer: &Arc<StreamConsumer>, topic: &str) -> Option<i32> {
    let c = consumer.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = c
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .ok()?;
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        Some(t.partitions().len() as i32)
    })
    .await
    .ok()
    .flatten()
}

#[allow(clippy::too_many_arguments)]
async fn flush(
    ty: &EventType,
    staging: &Staging,
    store: &Store,
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    batch: Pending,
    partitions: i32,
    at_end: &HashSet<i32>,
    settings: &WriterSettings,
) -> anyhow::Result<()> {
    // 1. Stage (append + fsync) under each hour's lock; closed hours come back as late.
    let staged_batch = batch.lines;
    let st = staging.clone();
    let name = ty.name.clone();
    let (staged, late) = tokio::task::spawn_blocking(move || {
        let mut staged = 0u64;
        let mut late = Vec::new();
        for ((hour, p), (first, bytes)) in staged_batch {
            match st.append(&name, hour, p, &bytes)? {
                Appended::Staged => staged += count_lines(&bytes),
                Appended::Closed => late.push((hour, p, first, bytes)),
            }
        }
        Ok::<_, std::io::Error>((staged, late))
    })
    .await??;
    metrics::counter!(crate::metrics::STAGED, "type" => ty.name.clone()).increment(staged);
    // 2. Late events to the late bucket (named by position: a redelivery overwrites).
    for (hour, p, first, bytes) in late {
        let n = count_lines(&bytes);
        let path = format!("{}/p{p}-o{first}.ndjson", hour.late_path(&ty.name));
        store.put(&path, bytes).await?;
        metrics::counter!(crate::metrics::LATE, "type" => ty.name.clone()).increment(n);
        tracing::warn!(r#type = %ty.name, %hour, events = n, "late events after the hour closed");
    }
    // 3. Only now commit.
    if !batch.next.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &batch.next {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
        }
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await??;
    }
    // 4. Watermarks: what is staged and committed is behind us.
    let now = (settings.clock)();
    let mut marks: Vec<(i32, DateTime<Utc>)> = batch.newest.into_iter().collect();
    marks.extend(at_end.iter().map(|p| (*p, now)));
    if partitions > 0 && !marks.is_empty() {
        let st = staging.clone();
        let name = ty.name.clone();
        tokio::task::spawn_blocking(move || {
            for (p, t) in marks {
                st.set_watermark(&name, partitions, p, t)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await??;
        if let Some((_, marks)) = staging.watermarks(&ty.name) {
            if marks.len() == partitions as usize {
                if let Some(min) = marks.iter().map(|m| m.reached).min() {
                    let lag = (now - min).num_milliseconds().max(0) as f64 / 1000.0;
                    metrics::gauge!(crate::metrics::LAG, "type" => ty.name.clone()).set(lag);
                }
            }
        }
    }
    Ok(())
}

fn count_lines(b: &[u8]) -> u64 {
    b.iter().filter(|c| **c == b'\n').count() as u64
}
