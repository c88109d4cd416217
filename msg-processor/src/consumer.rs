//! Group membership and offsets: reads the topic, hands each partition's records to that
//! partition's worker, and stores an offset only once every record below it has an outcome.
//!
//! - **One worker task per assigned partition**, processing one batch at a time. A user's
//!   records are all in one partition (push-lib keys by user ID), so sequential batches keep
//!   each user's messages in order; partitions proceed in parallel (bounded by
//!   `--concurrency`). Throughput grows with partitions and processors.
//! - **Offsets**: `enable.auto.offset.store=false`; a worker stores `next offset` after its
//!   batch (see [`crate::offsets`]), and librdkafka's auto-commit commits what is stored every
//!   second, on revoke and on close. Nothing is committed that has no outcome: at-least-once.
//! - **Rebalances**: on revoke the stored offsets are committed synchronously, then the
//!   revoked partitions' workers are stopped (their batch in flight is redelivered to the new
//!   owner: duplicates carry the same message ID, which the nodes drop). A worker is started
//!   lazily on a partition's first record after an assignment.
//! - Each partition's buffer is bounded (`--partition-buffer`): when a worker falls behind
//!   (a node being retried), the loop waits rather than reading the topic into memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::metrics::{self as m, Stats};
use crate::offsets::PartitionOffsets;

/// The consumer this crate runs.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// A change of assignment, from librdkafka's rebalance callback to the loop.
#[derive(Debug)]
pub enum Rebalanced {
    /// Partitions now ours.
    Assigned(Vec<i32>),
    /// Partitions no longer ours.
    Revoked(Vec<i32>),
}

/// Callbacks librdkafka runs on the thread that polls the consumer.
#[derive(Debug)]
pub struct GroupContext {
    events: mpsc::UnboundedSender<Rebalanced>,
    stats: Arc<Stats>,
}

impl GroupContext {
    /// A context that reports rebalances to `events` and counts partitions in `stats`.
    pub fn new(events: mpsc::UnboundedSender<Rebalanced>, stats: Arc<Stats>) -> Self {
        Self { events, stats }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for GroupContext {
    /// Lag per partition from librdkafka's statistics (`statistics.interval.ms`).
    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (p, part) in t.partitions {
                if p < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                // Partitions this consumer does not fetch report stale or -1 lag: show 0 so
                // that summing the gauge over processors counts each partition once.
                let lag = if part.fetch_state == "active" && part.consumer_lag >= 0 {
                    part.consumer_lag as f64
                } else {
                    0.0
                };
                metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => p.to_string())
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions(tpl);
            tracing::info!(?revoked, "partitions revoked; committing what is done");
            // Commit what is finished before the partitions move, so the next owner
            // redelivers as little as possible. Sync: this callback must not return before.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => tracing::warn!(error = %e, "commit on revoke failed"),
            }
            let n = revoked.len() as u64;
            let _ = self.stats.partitions.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |p| Some(p.saturating_sub(n)),
            );
            let _ = self.events.send(Rebalanced::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                tracing::info!(?assigned, "partitions assigned");
                Stats::add(&self.stats.partitions, assigned.len() as u64);
                let _ = self.events.send(Rebalanced::Assigned(assigned));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "offset commit failed (retried at the next)"),
        }
    }
}

/// A task that is aborted when its handle is dropped: a worker must never outlive the loop
/// that owns its partition, or it could deliver after the partition moved.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Worker {
    tx: mpsc::Sender<OwnedMessage>,
    task: AbortOnDrop,
}

/// Reads the topic until `shutdown` turns true, then lets the workers finish their buffers
/// (at most `shutdown_timeout`) and commits.
pub async fn run(
    engine: Arc<Engine>,
    consumer: Arc<GroupConsumer>,
    mut events: mpsc::UnboundedReceiver<Rebalanced>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut workers: HashMap<i32, Worker> = HashMap::new();
    'read: loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(ev) = events.recv() => on_rebalance(ev, &mut workers).await,
            msg = consumer.recv() => {
                // Rebalance callbacks ran inside that poll: apply them before dispatching,
                // so no record reaches a worker of a revoked partition.
                while let Ok(ev) = events.try_recv() {
                    on_rebalance(ev, &mut workers).await;
                }
                let msg = match msg {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        continue;
                    }
                };
                metrics::counter!(m::CONSUMED).increment(1);
                Stats::add(&engine.stats.consumed, 1);
                let partition = msg.partition();
                let worker = workers.entry(partition).or_insert_with(|| {
                    spawn_worker(engine.clone(), consumer.clone(), partition)
                });
                tokio::select! {
                    sent = worker.tx.send(msg) => {
                        if sent.is_err() {
                            tracing::error!(partition, "partition worker ended unexpectedly");
                            workers.remove(&partition);
                        }
                    }
                    _ = shutdown.changed() => break 'read,
                }
            }
        }
    }
    // Graceful: no more records; the workers finish what they hold, then we commit.
    let tasks: Vec<AbortOnDrop> = workers.into_values().map(|w| w.task).collect();
    let finish = async {
        for mut t in tasks {
            let _ = (&mut t.0).await;
        }
    };
    if tokio::time::timeout(engine.settings.shutdown_timeout, finish)
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: abandoning batches in flight (they will be redelivered)");
    }
    let c = consumer.clone();
    let _ = tokio::task::spawn_blocking(move || match c.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed"),
    })
    .await;
}

async fn on_rebalance(ev: Rebalanced, workers: &mut HashMap<i32, Worker>) {
    if let Rebalanced::Revoked(parts) = ev {
        for p in parts {
            if let Some(w) = workers.remove(&p) {
                // Wait for the abort to land: the partition's next worker must not run
                // alongside this one, or a user's messages could be delivered out of order.
                let mut task = w.task;
                task.0.abort();
                let _ = (&mut task.0).await;
            }
        }
    }
}

fn spawn_worker(engine: Arc<Engine>, consumer: Arc<GroupConsumer>, partition: i32) -> Worker {
    let (tx, rx) = mpsc::channel(engine.settings.partition_buffer);
    let task = tokio::spawn(partition_worker(engine, consumer, partition, rx));
    Worker {
        tx,
        task: AbortOnDrop(task),
    }
}

/// Processes one partition's records, a batch at a time, and stores the offsets.
async fn partition_worker(
    engine: Arc<Engine>,
    consumer: Arc<GroupConsumer>,
    partition: i32,
    mut rx: mpsc::Receiver<OwnedMessage>,
) {
    let topic = engine.settings.topic.clone();
    let max = engine.settings.batch_size;
    let linger = engine.settings.batch_linger;
    let mut offsets = PartitionOffsets::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        fill(&mut rx, &mut batch, max, linger).await;
        let permit = engine
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        for msg in &batch {
            offsets.start(msg.offset());
        }
        engine.process(&batch).await;
        drop(permit);
        let mut next = None;
        for msg in &batch {
            if let Some(n) = offsets.finish(msg.offset()) {
                next = Some(n);
            }
        }
        if let Some(next) = next {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(&topic, partition, Offset::Offset(next))
                .is_ok()
            {
                if let Err(e) = consumer.store_offsets(&tpl) {
                    // The partition was revoked meanwhile: the new owner redelivers.
                    tracing::debug!(partition, error = %e, "could not store offset");
                }
            }
        }
    }
}

/// Adds to `batch` what has arrived, then waits up to `linger` for more, up to `max`.
async fn fill(
    rx: &mut mpsc::Receiver<OwnedMessage>,
    batch: &mut Vec<OwnedMessage>,
    max: usize,
    linger: Duration,
) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
    if linger.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => batch.push(m),
            _ => break,
        }
    }
}
