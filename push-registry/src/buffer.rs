//! A user's recent messages, kept so that a client can resume after a reconnect: the
//! bounded buffer and the resume rule, as pure logic with `now` passed in.
//!
//! This is the in-memory form behind the embedded default; the Redis-family backends keep
//! the same shape in a sorted set (score = ID) whose reserved member holds the counter, so
//! one single-key script appends atomically (`history/redis_model.rs`, `docs/history.md`). The rule
//! that both must follow is [`UserBuffer::since`]:
//! a client that saw up to `after` gets exactly the messages with a larger ID, oldest first;
//! if the buffer no longer holds the message right after `after`, it is told so with the
//! oldest ID still available (a *gap*), never silently.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

/// How much of a user's history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Most messages kept per user.
    pub max_messages: usize,
    /// Messages older than this are dropped.
    pub max_age: Duration,
}

impl Default for BufferLimits {
    fn default() -> Self {
        // A few minutes covers a rotation's grace period and a mobile network drop; 100
        // messages covers a burst without letting one user's history grow large.
        Self {
            max_messages: 100,
            max_age: Duration::from_secs(300),
        }
    }
}

/// One kept message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Buffered {
    /// Per-user ID, increasing.
    pub id: u64,
    /// When it was appended, milliseconds since the Unix epoch (the caller's clock).
    pub at_ms: u64,
    /// The queue's message ID (push-lib envelope ID), used to drop redeliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
    /// Only this device may receive it, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The W3C `traceparent` its clients were shown (55 bytes; kept only when the message
    /// had one), shown again when it is replayed on resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// `data` is a JSON document (embedded as-is in WebSocket messages) rather than text.
    pub json: bool,
    /// The payload, UTF-8.
    #[serde(serialize_with = "as_str")]
    pub data: Bytes,
}

fn as_str<S: serde::Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}

/// A message to append: what [`Buffered`] holds except the ID and time, which the buffer
/// gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewMessage<'a> {
    /// The user whose history it joins.
    pub user: &'a str,
    /// The queue's message ID, if any: an append whose `mid` is already kept is a duplicate.
    pub mid: Option<&'a str>,
    /// Only this device may receive it, if set.
    pub device: Option<&'a str>,
    /// The W3C `traceparent` its clients are shown, if any.
    pub traceparent: Option<&'a str>,
    /// `data` is JSON rather than text.
    pub json: bool,
    /// The payload, UTF-8.
    pub data: &'a [u8],
}

/// The outcome of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The message's ID (the earlier one, for a duplicate).
    pub id: u64,
    /// The same `mid` was already kept: nothing was added.
    pub duplicate: bool,
}

/// What a resuming client is owed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Messages after the client's last ID, oldest first.
    pub messages: Vec<Buffered>,
    /// Set when messages between the client's last ID and the first of `messages` are no
    /// longer kept: the oldest ID still available (what the `gap` control message carries).
    pub gap: Option<u64>,
}

/// The buffer of one user. Empty (no allocation) until the first message.
#[derive(Debug, Default, Clone)]
pub struct UserBuffer {
    last_id: u64,
    messages: VecDeque<Buffered>,
}

impl UserBuffer {
    /// A buffer whose next ID is `last_id + 1`.
    pub fn starting_after(last_id: u64) -> Self {
        Self {
            last_id,
            messages: VecDeque::new(),
        }
    }

    /// The last ID given out.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Messages kept now.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether no message is kept.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Appends a message, gives it the next ID, and trims to the limits. A message whose
    /// `mid` is still kept is not added again; its ID is returned as a duplicate.
    pub fn append(&mut self, msg: &NewMessage<'_>, now_ms: u64, limits: BufferLimits) -> Appended {
        self.trim(now_ms, limits);
        if let Some(mid) = msg.mid {
            if let Some(m) = self.messages.iter().find(|m| m.mid.as_deref() == Some(mid)) {
                return Appended {
                    id: m.id,
                    duplicate: true,
                };
            }
        }
        self.last_id += 1;
        self.messages.push_back(Buffered {
            id: self.last_id,
            at_ms: now_ms,
            mid: msg.mid.map(str::to_owned),
            device: msg.device.map(str::to_owned),
            traceparent: msg.traceparent.map(str::to_owned),
            json: msg.json,
            data: Bytes::copy_from_slice(msg.data),
        });
        self.trim(now_ms, limits);
        Appended {
            id: self.last_id,
            duplicate: false,
        }
    }

    /// The kept message with this ID.
    pub fn get(&self, id: u64) -> Option<&Buffered> {
        let first = self.messages.front()?.id;
        // IDs in one buffer are consecutive.
        self.messages
            .get(usize::try_from(id.checked_sub(first)?).ok()?)
            .filter(|m| m.id == id)
    }

    /// When the newest message was appended, if any is kept.
    pub fn newest_at_ms(&self) -> Option<u64> {
        self.messages.back().map(|m| m.at_ms)
    }

    /// Drops messages beyond the count limit or older than the age limit.
    pub fn trim(&mut self, now_ms: u64, limits: BufferLimits) {
        let max_age = u64::try_from(limits.max_age.as_millis()).unwrap_or(u64::MAX);
        while self.messages.len() > limits.max_messages
            || self
                .messages
                .front()
                .is_some_and(|m| now_ms.saturating_sub(m.at_ms) > max_age)
        {
            self.messages.pop_front();
        }
    }

    /// The messages a client that last saw `after` is owed, at `now_ms`.
    ///
    /// - `after == 0` (a client that has seen nothing): every kept message, never a gap.
    /// - `after` at or past the last ID: nothing is owed.
    /// - the message `after + 1` is still kept (or nothing was ever dropped after `after`):
    ///   every kept message with a larger ID, no gap.
    /// - otherwise: what is kept, and a gap naming the oldest kept ID (or the next ID to be
    ///   given, when nothing is kept).
    pub fn since(&self, after: u64, now_ms: u64, limits: BufferLimits) -> Resume {
        let mut live = self.clone();
        live.trim(now_ms, limits);
        if after >= live.last_id {
            return Resume {
                messages: Vec::new(),
                gap: None,
            };
        }
        let oldest = live
            .messages
            .front()
            .map_or(live.last_id.saturating_add(1), |m| m.id);
        let messages: Vec<Buffered> = live
            .messages
            .iter()
            .filter(|m| m.id > after)
            .cloned()
            .collect();
        let gap = (after != 0 && after.saturating_add(1) < oldest).then_some(oldest);
        Resume { messages, gap }
    }
}

/// The clock the stores stamp messages with, milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::record::now_ms()
}

/// The first ID of a user the store does not know: the wall clock in microseconds.
///
/// Why: a store forgets a user whose history expired (memory, Redis `PEXPIRE`), and a
/// memory store forgets everyone on restart, but clients resume and deduplicate by ID, so a
/// new counter must start above every ID given before. One message per microsecond per
/// user is far above any real rate.
pub fn first_id_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BufferLimits = BufferLimits {
        max_messages: 3,
        max_age: Duration::from_secs(60),
    };

    fn buffer_with(n: u64) -> UserBuffer {
        let mut b = UserBuffer::default();
        for i in 1..=n {
            let data = format!("m{i}");
            b.append(&msg(data.as_bytes(), None), i * 1000, LIMITS);
        }
        b
    }

    fn msg<'a>(data: &'a [u8], mid: Option<&'a str>) -> NewMessage<'a> {
        NewMessage {
            user: "u",
            mid,
            device: None,
            traceparent: None,
            json: false,
            data,
        }
    }

    fn ids(r: &Resume) -> Vec<u64> {
        r.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn ids_increase_and_the_count_limit_holds() {
        let b = buffer_with(5);
        assert_eq!(b.last_id(), 5);
        assert_eq!(b.len(), 3);
        assert_eq!(ids(&b.since(0, 5_000, LIMITS)), vec![3, 4, 5]);
    }

    #[test]
    fn resume_at_the_edges_of_the_buffer() {
        let b = buffer_with(5); // keeps 3, 4, 5
        let now = 5_000;
        // Before the buffer: what is kept, and a gap at the oldest kept ID.
        let r = b.since(1, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], Some(3)));
        // Right before the oldest kept: exactly the rest, no gap (nothing was missed).
        let r = b.since(2, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], None));
        // At the oldest kept.
        let r = b.since(3, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![4, 5], None));
        // Inside.
        let r = b.since(4, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![5], None));
        // At the newest: nothing owed.
        let r = b.since(5, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![], None));
        // Past the newest (a client from another buffer's lifetime): nothing, no gap.
        let r = b.since(9, now, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![], None));
    }

    #[test]
    fn aged_out_messages_become_a_gap() {
        let mut b = UserBuffer::starting_after(10);
        b.append(&msg(b"m11", None), 1_000, LIMITS);
        b.append(&msg(b"m12", None), 2_000, LIMITS);
        let r = b.since(10, 61_500, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![12], Some(12)), "m11 is past 60 s");
        let r = b.since(10, 70_000, LIMITS);
        assert_eq!(
            (ids(&r), r.gap),
            (vec![], Some(13)),
            "all aged out: next ID"
        );
        let r = b.since(12, 70_000, LIMITS);
        assert_eq!(
            (ids(&r), r.gap),
            (vec![], None),
            "the client saw everything"
        );
        let r = b.since(0, 61_500, LIMITS);
        assert_eq!(
            (ids(&r), r.gap),
            (vec![12], None),
            "a client that saw nothing gets what is kept, no gap"
        );
    }

    #[test]
    fn a_kept_mid_is_a_duplicate_and_get_finds_by_id() {
        let mut b = UserBuffer::starting_after(100);
        let first = b.append(&msg(b"a", Some("m-1")), 0, LIMITS);
        assert_eq!(
            first,
            Appended {
                id: 101,
                duplicate: false
            }
        );
        b.append(&msg(b"b", None), 0, LIMITS);
        let again = b.append(&msg(b"a", Some("m-1")), 0, LIMITS);
        assert_eq!(
            again,
            Appended {
                id: 101,
                duplicate: true
            }
        );
        assert_eq!(b.last_id(), 102, "a duplicate takes no ID");
        assert_eq!(b.get(102).map(|m| &m.data[..]), Some(&b"b"[..]));
        assert_eq!(b.get(101).and_then(|m| m.mid.as_deref()), Some("m-1"));
        assert!(b.get(100).is_none() && b.get(103).is_none());
    }

    #[test]
    fn ids_continue_after_a_restart_point() {
        let mut b = UserBuffer::starting_after(41);
        assert_eq!(b.append(&msg(b"x", None), 0, LIMITS).id, 42);
        let r = b.since(40, 0, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![42], Some(42)));
    }
}
