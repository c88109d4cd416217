//! msg-processor: consumes the push topic (a Kafka consumer group), looks each user up in
//! the registry and hands the message to the push-server node that holds the connection.
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`offsets`] | per-partition contiguous completion → the offset that may be committed (pure) |
//! | [`route`] | delivery rules per message: targets, answers, retry or finish (pure) |
//! | [`config`] | flags and `MSGPROC_*` environment → [`Settings`] |
//! | [`metrics`] | metric names, `/metrics`, [`Stats`] |
//! | [`dead_letter`] | the dead-letter producer |
//! | [`outcomes`] | push outcomes for GABO: one record per finished message, never waited for |
//! | [`engine`] | one partition's batch: decode, TTL, `lookup_many`, deliver rounds, dead letters |
//! | [`consumer`] | group membership, per-partition workers, offsets, rebalances |
//! | this file | [`Processor`]: wires them, starts and stops |
//!
//! The envelope it reads is push-lib's (`docs/envelope.md`); the node endpoint it calls is
//! push-server's `POST /internal/v1/deliver` (`docs/protocol.md`).

pub mod config;
pub mod consumer;
pub mod dead_letter;
pub mod engine;
pub mod metrics;
pub mod offsets;
pub mod outcomes;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;

use push_lib::{DeliverClient, DeliverConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer as _;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

pub use config::{Args, Settings, SettingsError};
pub use metrics::Stats;

use consumer::{GroupConsumer, GroupContext};
use dead_letter::DeadLetters;
use engine::Engine;
use outcomes::Outcomes;

/// Why a processor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is out of bounds.
    #[error("invalid settings: {0}")]
    Settings(#[from] SettingsError),
    /// The registry URL is not usable.
    #[error("registry: {0}")]
    Registry(#[from] push_registry::Error),
    /// librdkafka refused the consumer or producer configuration, or the subscription.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The node HTTP client could not be built (bad admin token).
    #[error("node client: {0}")]
    Nodes(#[from] push_lib::Error),
    /// The metrics port could not be bound.
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running processor: one consumer-group member.
#[derive(Debug)]
pub struct Processor {
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    outcomes: Option<Outcomes>,
}

impl Processor {
    /// Opens the registry, joins the consumer group and starts consuming.
    pub async fn start(settings: Settings) -> Result<Self, StartError> {
        settings.validate()?;
        let registry = push_registry::open(&settings.registry).await?;
        let history = push_registry::open_store(&settings.registry, settings.history).await?;
        let nodes = DeliverClient::new(&DeliverConfig {
            admin_token: settings.admin_token.clone(),
            internal_secret: settings.internal_secret.clone(),
            timeout: settings.deliver_timeout,
            max_idle_per_node: settings.node_connections,
            ..DeliverConfig::default()
        })?;
        let dead_letters = match &settings.dead_letter_topic {
            Some(t) => Some(DeadLetters::new(&settings.brokers, t, &settings.kafka)?),
            None => None,
        };
        let stats = Arc::new(Stats::default());
        let outcomes = match &settings.outcomes_topic {
            Some(t) => Some(Outcomes::new(
                settings
                    .outcomes_brokers
                    .as_deref()
                    .unwrap_or(&settings.brokers),
                t,
                settings.outcomes_queue,
                &settings.kafka,
                stats.clone(),
            )?),
            None => None,
        };
        let handle = metrics::install();
        let (metrics_task, metrics_addr) = match settings.metrics_listen {
            Some(addr) => {
                let listener = metrics::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = listener.local_addr().ok();
                (Some(tokio::spawn(metrics::serve(listener, handle))), bound)
            }
            None => (None, None),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let consumer = Arc::new(
            consumer_config(&settings).create_with_context::<_, GroupConsumer>(
                GroupContext::new(events_tx, stats.clone()),
            )?,
        );
        consumer.subscribe(&[&settings.topic])?;
        let engine = Arc::new(Engine {
            permits: Semaphore::new(settings.concurrency),
            settings,
            registry,
            history,
            nodes,
            dead_letters,
            outcomes: outcomes.clone(),
            stats: stats.clone(),
        });
        tracing::info!(
            topic = %engine.settings.topic,
            group = %engine.settings.group,
            metrics = ?metrics_addr,
            "msg-processor started"
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(consumer::run(engine, consumer, events_rx, shutdown_rx));
        Ok(Self {
            shutdown,
            task: Some(task),
            metrics_task,
            metrics_addr,
            stats,
            outcomes,
        })
    }

    /// Counts since start.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops reading, lets batches in flight finish (up to the shutdown timeout), commits and
    /// leaves the group; then gives queued push outcomes up to 5 s to reach the broker.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(o) = &self.outcomes {
            // Bounded: a dead broker must not hold the shutdown (what is left is dropped).
            o.flush(std::time::Duration::from_secs(5)).await;
        }
    }

    /// Stops at once, as a crash would: batches in flight are abandoned, and only offsets
    /// already stored are committed as the consumer closes. Their records are redelivered to
    /// whichever processor takes the partitions over.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Resolves when the processor stops by itself (it only does on a panic).
    pub async fn stopped(&mut self) {
        if let Some(task) = &mut self.task {
            let _ = task.await;
            self.task = None;
        }
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(t) = &self.metrics_task {
            t.abort();
        }
    }
}

fn consumer_config(s: &Settings) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &s.brokers)
        .set("group.id", &s.group)
        // Offsets are stored by the workers once a batch has its outcomes, and committed by
        // librdkafka every second, on revoke and on close: nothing unfinished is committed.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the beginning: messages queued before the first processor
        // came up are still worth delivering (their TTL decides).
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            s.session_timeout.as_millis().to_string(),
        )
        // Incremental rebalancing: when a processor joins or leaves, only the partitions that
        // move are revoked. With the eager protocol every member stops every partition, and
        // each batch in flight is delivered twice.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Feeds the lag gauge.
        .set("statistics.interval.ms", "5000");
    for (k, v) in &s.kafka {
        cc.set(k, v);
    }
    cc
}
