//! Push outcomes: one JSON record per finished message on `--outcomes-topic`, for GABO's
//! `outcomes` type (`data-tools/gabo/types/platform.yaml`, which ingests the topic).
//!
//! A record: `{"id":"{mid}:{outcome}","mid":…,"user":…,"outcome":…,"at_ms":…}` with
//! `outcome` one of `delivered`, `stored`, `expired`, `dead_lettered`, keyed by the user. The
//! ID is the same for a redelivered message that ends the same way, so GABO's dedup keeps one.
//! A record that could not be decoded has no envelope: its `mid` is its position
//! (`topic/partition/offset`) and its `user` empty, unless the bytes still name them.
//!
//! Outcomes are a side channel: they never slow or fail a delivery. [`Outcomes::send`] only
//! queues the record in librdkafka (which batches it with others, `linger.ms`) and returns at
//! once; a full queue (`--outcomes-queue` records, e.g. while the broker is down) drops the
//! record, and so does a record the broker did not take within its timeout. Both are counted
//! in `msgproc_outcomes_dropped_total`.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;
use serde::Serialize;

use crate::metrics::{self as m, Stats};

/// How a message ended, as GABO's `outcomes` schema names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A node took it.
    Delivered,
    /// In the user's history, for their next resume.
    Stored,
    /// Past its TTL.
    Expired,
    /// Sent to the dead-letter topic (or dropped without one).
    DeadLettered,
}

impl Kind {
    /// The schema's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Stored => "stored",
            Kind::Expired => "expired",
            Kind::DeadLettered => "dead_lettered",
        }
    }
}

/// One outcome record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome<'a> {
    /// `{mid}:{outcome}`: GABO's dedup key.
    pub id: String,
    /// The envelope's ID.
    pub mid: &'a str,
    /// The user addressed.
    pub user: &'a str,
    /// How it ended.
    pub outcome: Kind,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl<'a> Outcome<'a> {
    /// The record for `mid` ending as `outcome` at `at_ms`.
    pub fn new(mid: &'a str, user: &'a str, outcome: Kind, at_ms: u64) -> Self {
        Self {
            id: format!("{mid}:{}", outcome.as_str()),
            mid,
            user,
            outcome,
            at_ms,
        }
    }
}

/// `(mid, user)` of a record whose envelope did not decode: the `id` and `user` strings of
/// its JSON when it has them, else its position and an empty user.
pub fn undecoded_names(payload: Option<&[u8]>, position: String) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Names {
        id: Option<String>,
        user: Option<String>,
    }
    let names = payload.and_then(|p| serde_json::from_slice::<Names>(p).ok());
    let (id, user) = names.map_or((None, None), |n| (n.id, n.user));
    (
        id.filter(|s| !s.is_empty()).unwrap_or(position),
        user.unwrap_or_default(),
    )
}

/// Counts delivery failures reported by librdkafka.
struct Context {
    stats: Arc<Stats>,
}

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            dropped(&self.stats, "undelivered");
        }
    }
}

fn dropped(stats: &Stats, reason: &'static str) {
    metrics::counter!(m::OUTCOMES_DROPPED, "reason" => reason).increment(1);
    Stats::add(&stats.outcomes_dropped, 1);
}

/// The outcomes producer.
#[derive(Clone)]
pub struct Outcomes {
    producer: ThreadedProducer<Context>,
    topic: String,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcomes")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Outcomes {
    /// A producer for `topic` on `brokers` holding at most `queue` records. Connects lazily:
    /// a broker that is down does not stop the processor.
    pub fn new(
        brokers: &str,
        topic: &str,
        queue: usize,
        extra: &[(String, String)],
        stats: Arc<Stats>,
    ) -> Result<Self, KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            // Batches: one request carries many outcomes (they are small and come in bursts,
            // a batch of messages at a time); 100 ms of delay costs a report nothing.
            .set("linger.ms", "100")
            // The bound: a dead broker fills this queue and then outcomes are dropped, never
            // waited for. librdkafka's default (100,000) holds ~20 MB of outcome records.
            .set("queue.buffering.max.messages", queue.to_string())
            // A record the broker does not take in this time is dropped (and counted).
            .set("message.timeout.ms", "30000")
            // Copies are harmless (the ID dedups them); acks from the leader are enough.
            .set("acks", "1");
        for (k, v) in extra {
            cc.set(k, v);
        }
        Ok(Self {
            producer: cc.create_with_context(Context {
                stats: stats.clone(),
            })?,
            topic: topic.to_owned(),
            stats,
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Queues one outcome without waiting; a full queue drops it (counted).
    pub fn send(&self, outcome: &Outcome<'_>) {
        let json = serde_json::to_vec(outcome).expect("outcomes serialize");
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&self.topic).payload(&json);
        if !outcome.user.is_empty() {
            record = record.key(outcome.user);
        }
        match self.producer.send(record) {
            Ok(()) => Stats::add(&self.stats.outcomes_queued, 1),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                dropped(&self.stats, "queue_full");
            }
            Err((e, _)) => {
                tracing::debug!(error = %e, "outcome not queued");
                dropped(&self.stats, "refused");
            }
        }
    }

    /// Waits up to `timeout` for queued outcomes to reach the broker (at shutdown); what is
    /// left is dropped with the producer.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_keyed_by_mid_and_outcome() {
        let o = Outcome::new("m-1", "alice", Kind::DeadLettered, 17);
        let v: serde_json::Value = serde_json::to_value(&o).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"m-1:dead_lettered","mid":"m-1","user":"alice",
                "outcome":"dead_lettered","at_ms":17})
        );
        for k in [
            Kind::Delivered,
            Kind::Stored,
            Kind::Expired,
            Kind::DeadLettered,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }

    #[test]
    fn an_undecoded_record_is_named_by_its_json_else_its_position() {
        let pos = || "push/0/7".to_owned();
        assert_eq!(
            undecoded_names(Some(br#"{"v":9,"id":"m","user":"u"}"#), pos()),
            ("m".into(), "u".into())
        );
        assert_eq!(
            undecoded_names(Some(b"not json"), pos()),
            ("push/0/7".into(), String::new())
        );
        assert_eq!(undecoded_names(None, pos()), ("push/0/7".into(), "".into()));
        assert_eq!(
            undecoded_names(Some(br#"{"id":"","user":3}"#), pos()),
            ("push/0/7".into(), "".into()),
            "a wrong type names nothing"
        );
    }

    #[tokio::test]
    async fn a_dead_broker_drops_outcomes_at_once() {
        let stats = Arc::new(Stats::default());
        // Nothing listens on port 1; a queue of 2 records.
        let o = Outcomes::new("127.0.0.1:1", "push-outcomes", 2, &[], stats.clone()).unwrap();
        for i in 0..50 {
            let mid = format!("m{i}");
            o.send(&Outcome::new(&mid, "u", Kind::Delivered, 1));
        }
        assert_eq!(Stats::get(&stats.outcomes_queued), 2);
        assert_eq!(Stats::get(&stats.outcomes_dropped), 48);
    }
}
