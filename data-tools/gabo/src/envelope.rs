//! What travels and what is stored, without I/O: the gateway's request body → validated events
//! (the pure half of the gateway), the Kafka record (one per accepted request), and the staging
//! line (one per event).
//!
//! One request becomes **one** Kafka record holding all its accepted events. Kafka acks a
//! record whole or not at all, so a request is never half-accepted, even when the broker fails
//! in the middle of a batch; and the writer's redelivery after a crash repeats whole records,
//! which the dedup recognises by their source position (`src` = partition:offset:index).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Longest client-given event ID: it is the dedup key and a Parquet column; 128 bytes hold any
/// UUID, ULID or hash with room to spare.
pub const MAX_ID_LEN: usize = 128;

/// Limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes in one body. The whole request becomes one Kafka record, and Kafka's default
    /// `message.max.bytes` is about 1 MB: 512 KiB of events plus their IDs stays under it.
    pub max_body: usize,
    /// Most events in one request (each is validated and answered individually).
    pub max_events: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 512 * 1024,
            max_events: 1000,
        }
    }
}

/// An event that passed validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The dedup key: the client's `id` field, or one the gateway made.
    pub id: String,
    /// The event as the client sent it (with `id` added when it had none).
    pub payload: serde_json::Value,
}

/// One refused event: its 0-based index in the request and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reject {
    /// Position in the array or NDJSON line (blank lines not counted).
    pub index: usize,
    /// Why it was refused.
    pub reason: String,
}

/// The body as a whole is unusable (answered 400 or 413, nothing accepted).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More than `max_events` events.
    #[error("{0} events in one request; the limit is {1}")]
    TooManyEvents(usize, usize),
    /// A body starting with `[` that is not a JSON array.
    #[error("body is not a JSON array: {0}")]
    NotAnArray(String),
    /// No events at all.
    #[error("no events in the body")]
    Empty,
}

/// Splits a body into events (JSON array, or newline-delimited JSON), validates each one and
/// gives it an ID. `new_id` makes IDs for events without one.
pub fn prepare(
    body: &[u8],
    limits: Limits,
    validator: &jsonschema::Validator,
    mut new_id: impl FnMut() -> String,
) -> Result<(Vec<Event>, Vec<Reject>), BodyError> {
    let items: Vec<Result<serde_json::Value, String>> = split(body)?;
    if items.is_empty() {
        return Err(BodyError::Empty);
    }
    if items.len() > limits.max_events {
        return Err(BodyError::TooManyEvents(items.len(), limits.max_events));
    }
    let mut ok = Vec::with_capacity(items.len());
    let mut rejects = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match item.and_then(|v| check(v, validator, &mut new_id)) {
            Ok(e) => ok.push(e),
            Err(reason) => rejects.push(Reject { index, reason }),
        }
    }
    Ok((ok, rejects))
}

fn split(body: &[u8]) -> Result<Vec<Result<serde_json::Value, String>>, BodyError> {
    let trimmed = body.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_slice(trimmed).map_err(|e| BodyError::NotAnArray(e.to_string()))?;
        return Ok(v.into_iter().map(Ok).collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| format!("not JSON: {e}")))
        .collect())
}

fn check(
    mut v: serde_json::Value,
    validator: &jsonschema::Validator,
    new_id: &mut impl FnMut() -> String,
) -> Result<Event, String> {
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "an event must be a JSON object".to_string())?;
    let id = match obj.get("id") {
        None | Some(serde_json::Value::Null) => {
            let id = new_id();
            obj.insert("id".into(), serde_json::Value::String(id.clone()));
            id
        }
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => s.clone(),
        Some(_) => return Err(format!("`id` must be a string of 1..={MAX_ID_LEN} bytes")),
    };
    if let Some(e) = validator.iter_errors(&v).next() {
        let at = e.instance_path.to_string();
        let at = if at.is_empty() { "/".into() } else { at };
        return Err(format!("schema: at {at}: {e}"));
    }
    Ok(Event { id, payload: v })
}

/// A fresh event ID: 128 random bits in hex.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The Kafka record of one accepted request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The event type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// When the gateway received the request (decides the hour).
    pub received_at: DateTime<Utc>,
    /// The accepted events.
    pub events: Vec<Event>,
}

/// One line of a staging file (and of a late bucket file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedLine {
    /// The dedup key.
    pub id: String,
    /// Receive time, RFC 3339 with milliseconds (sorts as text).
    pub received_at: String,
    /// Where the event came from: `partition:offset:index`; equal for a redelivered copy.
    pub src: String,
    /// The event as JSON text (one string column for the dedup, whatever the schema).
    pub payload: String,
}

impl Record {
    /// The staging lines of this record, read from `partition` at `offset`.
    pub fn lines(&self, partition: i32, offset: i64) -> impl Iterator<Item = StagedLine> + '_ {
        let at = self
            .received_at
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        self.events
            .iter()
            .enumerate()
            .map(move |(i, e)| StagedLine {
                id: e.id.clone(),
                received_at: at.clone(),
                src: format!("{partition}:{offset}:{i}"),
                payload: e.payload.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator() -> jsonschema::Validator {
        jsonschema::validator_for(&serde_json::json!({
            "type": "object", "required": ["user"],
            "properties": {"user": {"type": "string"}}
        }))
        .unwrap()
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("gen-{n}")
        }
    }

    #[test]
    fn array_and_ndjson_give_the_same_events() {
        let v = validator();
        let a = prepare(
            br#"[{"user":"a"},{"user":"b","id":"x"}]"#,
            Limits::default(),
            &v,
            ids(),
        );
        let n = prepare(
            b"{\"user\":\"a\"}\n\n{\"user\":\"b\",\"id\":\"x\"}\n",
            Limits::default(),
            &v,
            ids(),
        );
        assert_eq!(a, n);
        let (ok, rej) = a.unwrap();
        assert!(rej.is_empty());
        assert_eq!(ok[0].id, "gen-1", "an ID is made when absent");
        assert_eq!(ok[0].payload["id"], "gen-1");
        assert_eq!(ok[1].id, "x", "a client ID is kept");
    }

    #[test]
    fn rejects_carry_index_and_reason_and_spare_the_rest() {
        let v = validator();
        let body = b"{\"user\":\"a\"}\n{\"user\":1}\nnope\n[1]\n{\"user\":\"b\",\"id\":7}\n";
        let (ok, rej) = prepare(body, Limits::default(), &v, ids()).unwrap();
        assert_eq!(ok.len(), 1);
        let idx: Vec<usize> = rej.iter().map(|r| r.index).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert!(rej[0].reason.contains("/user"), "{}", rej[0].reason);
        assert!(rej[1].reason.contains("not JSON"));
        assert!(rej[2].reason.contains("JSON object"));
        assert!(rej[3].reason.contains("`id`"));
    }

    #[test]
    fn batch_limits_refuse_the_whole_body() {
        let v = validator();
        let lim = Limits {
            max_body: 1 << 20,
            max_events: 2,
        };
        let body = br#"[{"user":"a"},{"user":"b"},{"user":"c"}]"#;
        assert_eq!(
            prepare(body, lim, &v, ids()),
            Err(BodyError::TooManyEvents(3, 2))
        );
        assert_eq!(prepare(b"\n \n", lim, &v, ids()), Err(BodyError::Empty));
        assert!(matches!(
            prepare(b"[{\"user\"", lim, &v, ids()),
            Err(BodyError::NotAnArray(_))
        ));
    }

    #[test]
    fn staged_lines_name_their_source_position() {
        let r = Record {
            type_name: "t".into(),
            received_at: DateTime::parse_from_rfc3339("2026-11-29T14:05:00Z")
                .unwrap()
                .with_timezone(&Utc),
            events: vec![
                Event {
                    id: "a".into(),
                    payload: serde_json::json!({"id":"a"}),
                },
                Event {
                    id: "b".into(),
                    payload: serde_json::json!({"id":"b"}),
                },
            ],
        };
        let lines: Vec<StagedLine> = r.lines(2, 40).collect();
        assert_eq!(lines[1].src, "2:40:1");
        assert_eq!(lines[0].received_at, "2026-11-29T14:05:00.000Z");
        assert_eq!(lines[0].payload, r#"{"id":"a"}"#);
    }
}
