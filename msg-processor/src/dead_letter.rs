//! The dead-letter topic: messages that will never be delivered, kept for a human.
//!
//! Each dead letter is the original record's key and bytes, unchanged (so it can be fixed and
//! replayed onto the main topic), with headers that say why and where it came from:
//! `push-dlq-reason` (free text, starting with `malformed` or `invalid`) and
//! `push-dlq-source` (`topic/partition/offset`).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Where a dead letter came from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    /// Topic read.
    pub topic: &'a str,
    /// Partition read.
    pub partition: i32,
    /// Offset read.
    pub offset: i64,
}

/// A producer for the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// An idempotent producer (`acks=all`) for `topic`.
    pub fn new(brokers: &str, topic: &str, extra: &[(String, String)]) -> Result<Self, KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in extra {
            cc.set(k, v);
        }
        Ok(Self {
            producer: cc.create()?,
            topic: topic.to_owned(),
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes one dead letter and waits for the broker's acknowledgement: the original offset
    /// is committed only after this returns `Ok`.
    pub async fn send(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        reason: &str,
        source: &Source<'_>,
    ) -> Result<(), KafkaError> {
        let origin = format!("{}/{}/{}", source.topic, source.partition, source.offset);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "push-dlq-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "push-dlq-source",
                value: Some(&origin),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}
