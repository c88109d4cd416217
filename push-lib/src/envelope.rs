//! The message envelope: what a backend writes to the queue and the message processor reads.
//!
//! Wire form (version 1), one JSON object per Kafka record, documented in `docs/envelope.md`:
//!
//! ```json
//! {"v":1,"id":"0190f3c2a1b24e6f9d0c7a5e3b1f8d2c","user":"alice","device":"phone",
//!  "data":"your download is ready","created_at":1712345678901,"ttl_ms":60000,
//!  "collapse_key":"download","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
//! ```
//!
//! Decoding is tolerant where it can be and strict where it must be: unknown fields are
//! ignored (so a producer may add fields without bumping `v`), optional fields may be absent
//! or `null`, but a missing or unknown `v`, a missing `id`, `user` or `data`, or an ID out of
//! its bounds is an error that names the field, so the dead-letter topic says what is wrong.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The envelope version this crate writes, and the only one it reads.
pub const VERSION: u64 = 1;

/// Longest user or device ID, in bytes: the same bound push-server puts on token claims, so
/// an envelope that decodes can always be delivered.
pub const MAX_ID_LEN: usize = 256;

/// Longest message ID, in bytes. Generated IDs are 32; callers may bring their own (an
/// idempotency key from their database, say), but it is repeated in every client message.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// Longest collapse key, in bytes.
pub const MAX_COLLAPSE_KEY_LEN: usize = 256;

/// Longest `traceparent`, in bytes. W3C version 00 is 55; later versions may append fields.
pub const MAX_TRACEPARENT_LEN: usize = 512;

/// Largest payload, in bytes as a client receives it (a text payload's UTF-8, else the
/// JSON): push-server's default `--max-message-bytes`. Bounded here so that an oversized
/// message is refused at the sender and never reaches the queue, the history or a node
/// (which would refuse it anyway, after the history had kept it).
pub const MAX_DATA_BYTES: usize = 64 * 1024;

/// A message ID: the deduplication key from the producer to the client.
///
/// Generated IDs are 32 lowercase hex digits: 48 bits of milliseconds since the Unix epoch,
/// then 80 random bits. They sort by creation time (handy when reading a topic or a log) and
/// collide only if two producers draw the same 80 bits in the same millisecond.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// A new time-ordered random ID.
    pub fn generate() -> Self {
        let ms = now_ms() & 0xFFFF_FFFF_FFFF;
        let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
        MessageId(format!("{:032x}", (u128::from(ms) << 80) | random))
    }

    /// Wraps a caller-chosen ID (1 to [`MAX_MESSAGE_ID_LEN`] bytes, no control characters).
    pub fn new(id: impl Into<String>) -> Result<Self, EnvelopeError> {
        let id = id.into();
        check_id("id", &id, MAX_MESSAGE_ID_LEN)?;
        Ok(MessageId(id))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One message to one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    /// Envelope version, [`VERSION`].
    pub v: u64,
    /// Deduplication key: the same on every redelivery, shown to clients as `mid`.
    pub id: MessageId,
    /// The user to reach.
    pub user: String,
    /// Only this device of the user; `None` reaches all of the user's connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The payload: a JSON string is a text payload, any other JSON value is sent as JSON.
    pub data: Value,
    /// When the producer created the message, milliseconds since the Unix epoch. The message
    /// processor measures end-to-end latency from it.
    pub created_at: u64,
    /// How long the message is worth delivering after `created_at`, in milliseconds. `None`:
    /// for ever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Messages with the same user and collapse key supersede each other (only the newest
    /// matters). Carried end to end; stored-message collapsing builds on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    /// W3C Trace Context `traceparent` of the producing span, so traces can cross the queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Envelope {
    /// A message to `user` with a fresh ID, created now, without expiry.
    ///
    /// Panics never; an invalid user is reported by [`Envelope::validate`] (called by every
    /// transport before sending) so builders can be chained.
    pub fn new(user: impl Into<String>, data: impl Into<Value>) -> Self {
        Envelope {
            v: VERSION,
            id: MessageId::generate(),
            user: user.into(),
            device: None,
            data: data.into(),
            created_at: now_ms(),
            ttl_ms: None,
            collapse_key: None,
            traceparent: None,
        }
    }

    /// Addresses one device of the user only.
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    /// Sets the time to live (rounded down to milliseconds).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets the collapse key.
    pub fn collapse_key(mut self, key: impl Into<String>) -> Self {
        self.collapse_key = Some(key.into());
        self
    }

    /// Sets the W3C `traceparent`.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Uses a caller-chosen message ID, e.g. an idempotency key, instead of a generated one.
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Checks every bound a decoder checks, so what a transport sends always decodes.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.v != VERSION {
            return Err(EnvelopeError::UnsupportedVersion(self.v));
        }
        check_id("id", self.id.as_str(), MAX_MESSAGE_ID_LEN)?;
        check_id("user", &self.user, MAX_ID_LEN)?;
        if let Some(d) = &self.device {
            check_id("device", d, MAX_ID_LEN)?;
        }
        if let Some(k) = &self.collapse_key {
            check_id("collapse_key", k, MAX_COLLAPSE_KEY_LEN)?;
        }
        if let Some(t) = &self.traceparent {
            check_id("traceparent", t, MAX_TRACEPARENT_LEN)?;
        }
        let size = self.data_len();
        if size > MAX_DATA_BYTES {
            return Err(EnvelopeError::TooLarge {
                size,
                max: MAX_DATA_BYTES,
            });
        }
        Ok(())
    }

    /// The payload's size as a client receives it: a text payload's UTF-8 bytes, else the
    /// compact JSON.
    pub fn data_len(&self) -> usize {
        match &self.data {
            Value::String(text) => text.len(),
            other => {
                let mut count = ByteCount(0);
                serde_json::to_writer(&mut count, other).expect("JSON values serialize");
                count.0
            }
        }
    }

    /// The JSON wire form. Validates first.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        self.validate()?;
        Ok(serde_json::to_vec(self).expect("an Envelope always serializes"))
    }

    /// Reads the JSON wire form; see the module docs for what is tolerated.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(EnvelopeError::Json)?;
        let v = wire.v.ok_or(EnvelopeError::Missing("v"))?;
        if v != VERSION {
            return Err(EnvelopeError::UnsupportedVersion(v));
        }
        let env = Envelope {
            v,
            id: MessageId(wire.id.ok_or(EnvelopeError::Missing("id"))?),
            user: wire.user.ok_or(EnvelopeError::Missing("user"))?,
            device: wire.device,
            data: wire.data.ok_or(EnvelopeError::Missing("data"))?,
            // A producer without a clock still gets its message through; latency for it is
            // then meaningless, which the processor detects (created_at 0) and skips.
            created_at: wire.created_at.unwrap_or(0),
            ttl_ms: wire.ttl_ms,
            collapse_key: wire.collapse_key,
            traceparent: wire.traceparent,
        };
        env.validate()?;
        Ok(env)
    }

    /// Whether the message's time to live has passed at `now_ms`. A message without TTL, or
    /// without `created_at`, never expires.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        match self.ttl_ms {
            Some(ttl) if self.created_at > 0 => now_ms >= self.created_at.saturating_add(ttl),
            _ => false,
        }
    }
}

/// Counts bytes written, to size a JSON value without keeping its text.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The decoder's view: every field optional, so a missing one gets a named error rather than
/// serde's generic one, and `null` reads as absent.
#[derive(Deserialize)]
struct Wire {
    v: Option<u64>,
    id: Option<String>,
    user: Option<String>,
    device: Option<String>,
    data: Option<Value>,
    created_at: Option<u64>,
    ttl_ms: Option<u64>,
    collapse_key: Option<String>,
    traceparent: Option<String>,
}

fn check_id(field: &'static str, value: &str, max: usize) -> Result<(), EnvelopeError> {
    if value.is_empty() || value.len() > max {
        return Err(EnvelopeError::Invalid {
            field,
            reason: format!("must be 1 to {max} bytes, is {}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(EnvelopeError::Invalid {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

/// Why an envelope cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or a field has the wrong JSON type (serde's message names it and the position).
    #[error("envelope is not valid JSON of the expected shape: {0}")]
    Json(#[source] serde_json::Error),
    /// A required field is absent or `null`.
    #[error("envelope has no `{0}`")]
    Missing(&'static str),
    /// The envelope was written by a newer (or broken) producer.
    #[error("envelope version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u64),
    /// The payload is larger than [`MAX_DATA_BYTES`].
    #[error("envelope data is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// The payload's size as a client would receive it.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A field is present but out of its bounds.
    #[error("envelope field `{field}` {reason}")]
    Invalid {
        /// The field's wire name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_every_field() {
        let env = Envelope::new("alice", json!({"n": 1}))
            .device("phone")
            .ttl(Duration::from_secs(60))
            .collapse_key("k")
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let bytes = env.encode().unwrap();
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }

    #[test]
    fn optional_fields_are_omitted_and_text_stays_a_string() {
        let env = Envelope::new("bob", "hello");
        let v: Value = serde_json::from_slice(&env.encode().unwrap()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj["v"], 1);
        assert_eq!(obj["data"], "hello");
        for absent in ["device", "ttl_ms", "collapse_key", "traceparent"] {
            assert!(!obj.contains_key(absent), "{absent} should be omitted");
        }
    }

    #[test]
    fn generated_ids_are_32_hex_and_time_ordered() {
        let a = MessageId::generate();
        std::thread::sleep(Duration::from_millis(2));
        let b = MessageId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a < b, "{a} then {b}");
    }

    #[test]
    fn unknown_fields_and_nulls_are_tolerated() {
        let env = Envelope::decode(
            br#"{"v":1,"id":"m1","user":"u","data":"x","created_at":5,"device":null,"future":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(env.user, "u");
        assert_eq!(env.device, None);
        assert_eq!(env.created_at, 5);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = |b: &[u8]| Envelope::decode(b).unwrap_err().to_string();
        assert!(err(b"not json").contains("not valid JSON"));
        assert!(err(br#"{"id":"m","user":"u","data":1}"#).contains("no `v`"));
        assert!(err(br#"{"v":2,"id":"m","user":"u","data":1}"#).contains("version 2"));
        assert!(err(br#"{"v":1,"id":"m","data":1}"#).contains("no `user`"));
        assert!(err(br#"{"v":1,"id":"m","user":"u"}"#).contains("no `data`"));
        assert!(err(br#"{"v":1,"id":"","user":"u","data":1}"#).contains("`id`"));
        let long = format!(
            r#"{{"v":1,"id":"m","user":"{}","data":1}}"#,
            "u".repeat(257)
        );
        assert!(err(long.as_bytes()).contains("`user`"));
        assert!(err(br#"{"v":1,"id":"m","user":7,"data":1}"#).contains("expected a string"));
    }

    #[test]
    fn oversized_data_is_refused_with_a_typed_error() {
        let at_limit = Envelope::new("u", "x".repeat(MAX_DATA_BYTES));
        assert!(at_limit.encode().is_ok());
        let over = Envelope::new("u", "x".repeat(MAX_DATA_BYTES + 1));
        assert!(matches!(
            over.encode(),
            Err(EnvelopeError::TooLarge { size, max: MAX_DATA_BYTES }) if size == MAX_DATA_BYTES + 1
        ));
        // JSON payloads count as their compact JSON text.
        let json = Envelope::new("u", json!({ "k": "y".repeat(MAX_DATA_BYTES) }));
        assert!(matches!(
            json.validate(),
            Err(EnvelopeError::TooLarge { .. })
        ));
        // The decoder refuses what a producer without this check wrote.
        let raw = format!(
            r#"{{"v":1,"id":"m","user":"u","data":"{}"}}"#,
            "z".repeat(MAX_DATA_BYTES + 1)
        );
        let err = Envelope::decode(raw.as_bytes()).unwrap_err();
        assert!(matches!(err, EnvelopeError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains("over the 65536-byte limit"),
            "{err}"
        );
    }

    #[test]
    fn expiry_counts_from_created_at() {
        let mut env = Envelope::new("u", 1).ttl(Duration::from_millis(100));
        env.created_at = 1_000;
        assert!(!env.is_expired(1_099));
        assert!(env.is_expired(1_100));
        env.ttl_ms = None;
        assert!(!env.is_expired(u64::MAX));
    }
}
