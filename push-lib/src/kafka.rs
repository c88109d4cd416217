//! The Kafka transport: one record per envelope, keyed by user ID.
//!
//! Keying by user puts all of a user's messages in one partition, where Kafka keeps them in
//! order and the message processor reads them in order. The producer is idempotent with
//! `acks=all`, so librdkafka's retries neither duplicate nor reorder records within a
//! partition, and an acknowledged record survives the loss of the partition leader.

use std::future::Future;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// The Kafka record header carrying the envelope's W3C `traceparent`.
pub const TRACEPARENT_HEADER: &str = "traceparent";

use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// Where and how to produce.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// The topic the message processors consume.
    pub topic: String,
    /// How long the broker may take to acknowledge, retries included (`message.timeout.ms`).
    pub message_timeout: Duration,
    /// Extra librdkafka properties (`linger.ms`, `compression.type`, `security.protocol`,
    /// ...), applied last so they override the defaults above.
    pub extra: Vec<(String, String)>,
    /// The topic push-server publishes delivery receipts to (`--receipts-topic`), read by
    /// [`PushClient::send_and_wait_receipt`](crate::PushClient::send_and_wait_receipt).
    pub receipts_topic: String,
}

impl KafkaConfig {
    /// Defaults for `brokers` and `topic`: 30 s to acknowledge, no extra properties.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            message_timeout: Duration::from_secs(30),
            extra: Vec::new(),
            receipts_topic: "push-receipts".into(),
        }
    }

    /// Adds one librdkafka property.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), value.into()));
        self
    }
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaAck {
    /// Partition of the topic.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// A Kafka producer for envelopes.
#[derive(Clone)]
pub struct KafkaTransport {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// How long to wait before offering a record again when librdkafka's local queue is full.
/// The queue drains at broker speed; a millisecond is a few hundred records at most.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(1);

impl KafkaTransport {
    /// Creates the producer. Connecting happens in the background; a broker that is down
    /// shows up as send errors after `message_timeout`, not here.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.message_timeout.as_millis().to_string(),
            )
            // A few milliseconds of batching turns a stream of small sends into one request
            // per partition; the ack still comes well inside a typical push latency budget.
            .set("linger.ms", "5");
        for (k, v) in &config.extra {
            cc.set(k, v);
        }
        let producer: FutureProducer = cc.create().map_err(Error::KafkaConfig)?;
        Ok(Self {
            producer,
            topic: config.topic.clone(),
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Puts the envelope in librdkafka's queue (waiting while the queue is full) and returns
    /// a future of the broker's acknowledgement. Records enqueued one after another keep
    /// that order per user, so callers pipeline by enqueueing in order and awaiting later.
    pub async fn enqueue(
        &self,
        env: &Envelope,
    ) -> Result<impl Future<Output = Result<KafkaAck>> + Send + 'static> {
        let payload = env.encode()?;
        let mut record = FutureRecord::to(&self.topic)
            .key(env.user.as_bytes())
            .payload(&payload);
        if let Some(tp) = &env.traceparent {
            // Also a record header, W3C's name for it: consumers and Kafka tooling find the
            // trace without decoding the payload.
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(tp.as_bytes()),
            }));
        }
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((source, _)) => {
                    return Err(Error::Kafka {
                        topic: self.topic.clone(),
                        source,
                    })
                }
            }
        };
        let topic = self.topic.clone();
        Ok(async move {
            match delivery.await {
                Ok(Ok(d)) => Ok(KafkaAck {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((source, _))) => Err(Error::Kafka { topic, source }),
                Err(_canceled) => Err(Error::Canceled),
            }
        })
    }

    /// Sends one envelope and waits for the broker's acknowledgement.
    pub async fn send(&self, env: &Envelope) -> Result<KafkaAck> {
        self.enqueue(env).await?.await
    }

    /// Waits until every enqueued record is acknowledged or failed, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).map_err(|source| Error::Kafka {
            topic: self.topic.clone(),
            source,
        })
    }
}
