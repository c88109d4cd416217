//! A user's recent messages, kept so that a client can resume after a reconnect: the
//! bounded buffer and the resume rule, as pure logic with `now` passed in.
//!
//! This is the in-memory form behind the embedded default; the Redis-family backends keep
//! the same shape in a sorted set (score = ID) with an `INCR` counter, using only
//! Dynomite-supported commands. The rule that both must follow is [`UserBuffer::since`]:
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffered {
    /// Per-user ID, increasing.
    pub id: u64,
    /// When it was appended, milliseconds (the caller's clock).
    pub at_ms: u64,
    /// The payload as the client receives it (already encoded by the caller).
    pub payload: Bytes,
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

    /// Appends a message, gives it the next ID, and trims to the limits.
    pub fn append(&mut self, payload: Bytes, now_ms: u64, limits: BufferLimits) -> u64 {
        self.last_id += 1;
        self.messages.push_back(Buffered {
            id: self.last_id,
            at_ms: now_ms,
            payload,
        });
        self.trim(now_ms, limits);
        self.last_id
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
        let oldest = live.messages.front().map_or(live.last_id + 1, |m| m.id);
        let messages: Vec<Buffered> = live
            .messages
            .iter()
            .filter(|m| m.id > after)
            .cloned()
            .collect();
        let gap = (after + 1 < oldest).then_some(oldest);
        Resume { messages, gap }
    }
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
            b.append(Bytes::from(format!("m{i}")), i * 1000, LIMITS);
        }
        b
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
        let b = buffer_with(2); // m1 at 1 s, m2 at 2 s
        let r = b.since(0, 61_500, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![2], Some(2)), "m1 is past 60 s");
        let r = b.since(0, 70_000, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![], Some(3)), "all aged out: next ID");
        let r = b.since(2, 70_000, LIMITS);
        assert_eq!(
            (ids(&r), r.gap),
            (vec![], None),
            "the client saw everything"
        );
    }

    #[test]
    fn ids_continue_after_a_restart_point() {
        let mut b = UserBuffer::starting_after(41);
        assert_eq!(b.append(Bytes::from_static(b"x"), 0, LIMITS), 42);
        let r = b.since(40, 0, LIMITS);
        assert_eq!((ids(&r), r.gap), (vec![42], Some(42)));
    }
}
