//! The API types crates exchange over HTTP and Kafka: the internal deliver endpoint's item
//! and outcome (push-lib and msg-processor → push-server, push-server → push-server when it
//! forwards), and the delivery receipt (push-server → Kafka and admin answers → push-lib).
//!
//! One definition each, so that a field added on one side cannot be forgotten on the other.
//! The wire forms are documented in `docs/protocol.md`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::MAX_ID_LEN;
use crate::message::Payload;
use crate::transport::Transport;

/// The path of the internal deliver endpoint on a node's admin port.
pub const DELIVER_PATH: &str = "/internal/v1/deliver";

/// One message of a deliver (or admin push) batch: a JSON object in the array the endpoint
/// takes. Borrows from the request body where it can: a batch is parsed once and dropped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliverItem<'a> {
    /// The user.
    #[serde(borrow)]
    pub user: Cow<'a, str>,
    /// Only this device's connection, if set.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub device: Option<Cow<'a, str>>,
    /// The queue's message ID (push-lib envelope), for deduplication.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<Cow<'a, str>>,
    /// The payload: a JSON string is a text payload, any other JSON value a JSON payload.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// The per-user ID, when the sender took it from the history already (the message
    /// processor does; only a caller with the internal secret may set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// W3C `traceparent` of the sender's span: the receiving node's spans continue that
    /// trace, and WebSocket clients see it with the message.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Cow<'a, str>>,
}

/// Why one item of a batch can never be delivered (its outcome is `invalid`).
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// The user ID is empty or longer than [`MAX_ID_LEN`].
    #[error("user ID must be 1 to {MAX_ID_LEN} bytes")]
    UserId,
    /// `data` is not a JSON string nor a JSON document.
    #[error("{0}")]
    Data(#[from] serde_json::Error),
    /// A text payload that is not UTF-8.
    #[error("{0}")]
    Utf8(#[from] std::str::Utf8Error),
    /// The item sets an `id` that the node's history does not keep for this user with the
    /// same content, and the caller does not hold the internal secret.
    #[error("`id` is not a message the history keeps for this user; only callers with the internal secret may set ids that are not")]
    UntrustedId,
    /// The payload is larger than the node accepts.
    #[error("data exceeds {limit} bytes")]
    TooBig {
        /// The node's `--max-message-bytes`.
        limit: usize,
    },
}

impl DeliverItem<'_> {
    /// The item's payload, or why it cannot be sent. A JSON string is a text payload (SSE
    /// clients get the string itself); any other JSON value is a JSON payload.
    pub fn payload(&self, max_bytes: usize) -> Result<Payload, ItemError> {
        if self.user.is_empty() || self.user.len() > MAX_ID_LEN {
            return Err(ItemError::UserId);
        }
        let raw = self.data.get();
        let payload = if raw.starts_with('"') {
            let text: String = serde_json::from_str(raw)?;
            Payload::text(bytes::Bytes::from(text))?
        } else {
            Payload::json(bytes::Bytes::copy_from_slice(raw.as_bytes()))?
        };
        if payload.bytes.len() > max_bytes {
            return Err(ItemError::TooBig { limit: max_bytes });
        }
        Ok(payload)
    }
}

/// What the node did with one item, as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverOutcome {
    /// Written to `connections` of the user's connections; `id` is the per-user message ID.
    Delivered {
        /// The per-user message ID the clients saw.
        id: Option<u64>,
        /// How many connections it was written to.
        connections: u64,
    },
    /// Already delivered under this message ID (a redelivery): as good as delivered.
    Duplicate,
    /// The user (or device) has no connection on that node; the message is kept in the
    /// user's history, and their clients get it when they resume.
    Stored {
        /// The per-user message ID it was kept under.
        id: Option<u64>,
    },
    /// The user (or device) has no connection on that node (nodes that keep no history).
    NotConnected,
    /// The node refused the item (bad user ID, payload too large, ...): it never will.
    Invalid {
        /// The node's reason.
        reason: String,
    },
}

impl DeliverOutcome {
    /// Delivered now or earlier.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered { .. } | Self::Duplicate)
    }
}

/// The outcome names on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// Written to at least one connection.
    Delivered,
    /// Kept before under the same `message_id`.
    Duplicate,
    /// No connection here: kept in the history for the user's resume.
    Stored,
    /// No connection here, and no history.
    NotConnected,
    /// Never deliverable: dead-letter it.
    Invalid,
}

/// One item's answer on the wire: `{"outcome":…,"id":…,"delivered":…,"reason":…,"receipt":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverResult {
    /// What happened.
    pub outcome: OutcomeKind,
    /// The per-user message ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Connections whose socket took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    /// Why an `invalid` item was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The delivery receipt, when the sender asked to wait for one (`?wait_receipt_ms=`) and
    /// it came in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

impl DeliverResult {
    /// The outcome as the sender acts on it, and the receipt if there is one.
    pub fn into_outcome(self) -> (DeliverOutcome, Option<Receipt>) {
        let outcome = match self.outcome {
            OutcomeKind::Delivered => DeliverOutcome::Delivered {
                id: self.id,
                connections: self.delivered.unwrap_or(0),
            },
            OutcomeKind::Duplicate => DeliverOutcome::Duplicate,
            OutcomeKind::Stored => DeliverOutcome::Stored { id: self.id },
            OutcomeKind::NotConnected => DeliverOutcome::NotConnected,
            OutcomeKind::Invalid => DeliverOutcome::Invalid {
                reason: self.reason.unwrap_or_default(),
            },
        };
        (outcome, self.receipt)
    }
}

/// The deliver endpoint's answer: one result per item, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverAnswer {
    /// One per item of the batch, in the batch's order.
    pub results: Vec<DeliverResult>,
}

/// A delivery receipt: a device of the user acknowledged the message. Published as JSON on
/// the receipts Kafka topic and in admin API answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The user.
    pub user: String,
    /// The device that acknowledged, if its token names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The message's per-user ID, as the client saw it.
    pub id: u64,
    /// The queue's message ID (push-lib envelope ID), if the message had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
    /// The node that received the acknowledgement.
    pub node: String,
    /// How the acknowledgement arrived.
    pub transport: Transport,
    /// When the message was appended to the history, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// When the acknowledgement arrived, milliseconds since the Unix epoch.
    pub acked_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_round_trips_through_its_payload() {
        for payload in [
            Payload::text(bytes::Bytes::from_static(b"hi \"there\"\n")).unwrap(),
            Payload::json(bytes::Bytes::from_static(br#"{"a":[1,2]}"#)).unwrap(),
        ] {
            let data = payload.to_raw_json();
            let item = DeliverItem {
                user: "u".into(),
                device: None,
                message_id: Some("m-1".into()),
                data: &data,
                id: Some(7),
                traceparent: None,
            };
            let wire = serde_json::to_string(&[&item]).unwrap();
            assert!(
                !wire.contains("device"),
                "absent fields are left out: {wire}"
            );
            let back: Vec<DeliverItem<'_>> = serde_json::from_str(&wire).unwrap();
            let again = back[0].payload(1024).unwrap();
            assert_eq!(
                (again.bytes, again.is_json),
                (payload.bytes, payload.is_json)
            );
            assert_eq!(back[0].message_id.as_deref(), Some("m-1"));
            assert_eq!(back[0].id, Some(7));
        }
    }

    #[test]
    fn bad_items_say_why() {
        let items: Vec<DeliverItem<'_>> =
            serde_json::from_str(r#"[{"user":"","data":1},{"user":"u","data":"abcdef"}]"#).unwrap();
        assert!(matches!(items[0].payload(10), Err(ItemError::UserId)));
        let e = items[1].payload(3).unwrap_err();
        assert_eq!(e.to_string(), "data exceeds 3 bytes");
        // Nulls (as older senders write them) are the same as absent fields.
        let items: Vec<DeliverItem<'_>> = serde_json::from_str(
            r#"[{"user":"u","device":null,"message_id":null,"data":{},"id":null}]"#,
        )
        .unwrap();
        assert!(items[0].device.is_none() && items[0].id.is_none());
    }

    #[test]
    fn results_as_the_node_writes_them() {
        let answer: DeliverAnswer = serde_json::from_str(
            r#"{"results":[
                {"outcome":"delivered","id":3,"delivered":2,"receipt":null},
                {"outcome":"stored","id":null,"delivered":0},
                {"outcome":"duplicate","id":4,"delivered":1},
                {"outcome":"invalid","reason":"data exceeds 3 bytes"},
                {"outcome":"not_connected"}]}"#,
        )
        .unwrap();
        let outcomes: Vec<_> = answer
            .results
            .into_iter()
            .map(|r| r.into_outcome().0)
            .collect();
        assert_eq!(
            outcomes,
            vec![
                DeliverOutcome::Delivered {
                    id: Some(3),
                    connections: 2
                },
                DeliverOutcome::Stored { id: None },
                DeliverOutcome::Duplicate,
                DeliverOutcome::Invalid {
                    reason: "data exceeds 3 bytes".into()
                },
                DeliverOutcome::NotConnected,
            ]
        );
        assert!(outcomes[0].is_delivered() && outcomes[2].is_delivered());
        assert!(!outcomes[1].is_delivered());
        assert!(serde_json::from_str::<DeliverResult>(r#"{"outcome":"lost"}"#).is_err());
    }

    #[test]
    fn receipts_round_trip() {
        let r = Receipt {
            user: "u".into(),
            device: None,
            id: 9,
            mid: Some("m".into()),
            node: "n1".into(),
            transport: Transport::Sse,
            sent_at_ms: 1,
            acked_at_ms: 2,
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["transport"], "sse");
        assert!(json.get("device").is_none());
        assert_eq!(serde_json::from_value::<Receipt>(json).unwrap(), r);
    }
}
