//! The embedded message store: users' buffers in process memory, sharded by user.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::MessageStore;
use crate::buffer::{
    first_id_now, now_ms, Appended, BufferLimits, Buffered, NewMessage, Resume, UserBuffer,
};
use crate::Result;

/// Number of lock shards of the memory store: well above the core count, so appends for
/// different users rarely wait on each other.
const SHARDS: usize = 64;

/// One lock shard: users' buffers by user ID.
type Shard = Mutex<HashMap<Box<str>, UserBuffer>>;

/// The embedded store: one [`UserBuffer`] per user with a kept message, in process memory.
/// A user costs nothing until their first message; [`MemoryStore::sweep`] forgets users
/// whose messages all aged out.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Shard]>,
    limits: BufferLimits,
}

impl MemoryStore {
    /// An empty store keeping to `limits`.
    pub fn new(limits: BufferLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limits,
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, UserBuffer>> {
        self.shards[crate::shard::shard_of(user, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// [`MessageStore::append`] at a given time (tests pass their own clock).
    pub fn append_at(&self, messages: &[NewMessage<'_>], now_ms: u64) -> Vec<Appended> {
        messages
            .iter()
            .map(|m| {
                let mut shard = self.shard(m.user);
                let buf = match shard.get_mut(m.user) {
                    Some(b) => b,
                    None => shard
                        .entry(m.user.into())
                        .or_insert_with(|| UserBuffer::starting_after(first_id_now())),
                };
                buf.append(m, now_ms, self.limits)
            })
            .collect()
    }

    /// [`MessageStore::since`] at a given time.
    pub fn since_at(&self, user: &str, after: u64, now_ms: u64) -> Resume {
        match self.shard(user).get(user) {
            Some(b) => b.since(after, now_ms, self.limits),
            // Unknown user: nothing kept. A client that saw something was served by a store
            // that has since forgotten it (restart, expiry): say so.
            None => Resume {
                messages: Vec::new(),
                gap: (after != 0).then(|| first_id_now().max(after.saturating_add(1))),
            },
        }
    }

    /// Forgets users whose messages all aged out, at `now_ms`. Returns how many users are
    /// still kept.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let max_age = u64::try_from(self.limits.max_age.as_millis()).unwrap_or(u64::MAX);
        let mut kept = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, b| {
                b.trim(now_ms, self.limits);
                b.newest_at_ms()
                    .is_some_and(|at| now_ms.saturating_sub(at) <= max_age)
            });
            kept += shard.len();
        }
        kept
    }
}

#[async_trait]
impl MessageStore for MemoryStore {
    async fn append(&self, messages: &[NewMessage<'_>]) -> Result<Vec<Appended>> {
        Ok(self.append_at(messages, now_ms()))
    }

    async fn since(&self, user: &str, after: u64) -> Result<Resume> {
        Ok(self.since_at(user, after, now_ms()))
    }

    async fn get(&self, user: &str, ids: &[u64]) -> Result<Vec<Buffered>> {
        let shard = self.shard(user);
        let Some(b) = shard.get(user) else {
            return Ok(Vec::new());
        };
        // Trim a copy first: a message past its age is no longer kept even if no append has
        // dropped it yet (the Redis stores answer the same way).
        let mut b = b.clone();
        b.trim(now_ms(), self.limits);
        let mut found: Vec<Buffered> = ids.iter().filter_map(|&id| b.get(id).cloned()).collect();
        found.sort_by_key(|m| m.id);
        found.dedup_by_key(|m| m.id);
        Ok(found)
    }

    fn limits(&self) -> BufferLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: BufferLimits = BufferLimits {
        max_messages: 2,
        max_age: Duration::from_secs(10),
    };

    fn msg<'a>(user: &'a str, data: &'a [u8]) -> NewMessage<'a> {
        NewMessage {
            user,
            mid: None,
            device: None,
            traceparent: None,
            json: false,
            data,
        }
    }

    #[test]
    fn users_have_their_own_increasing_ids_above_the_clock() {
        let s = MemoryStore::new(LIMITS);
        let before = first_id_now();
        let a = s.append_at(&[msg("a", b"1"), msg("b", b"1"), msg("a", b"2")], 0);
        assert!(a[0].id > before);
        assert_eq!(a[2].id, a[0].id + 1);
        let r = s.since_at("a", a[0].id, 0);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(&r.messages[0].data[..], b"2");
    }

    #[test]
    fn an_unknown_user_with_a_last_id_gets_a_gap() {
        let s = MemoryStore::new(LIMITS);
        let r = s.since_at("nobody", 5, 0);
        assert!(r.messages.is_empty());
        assert!(r.gap.is_some_and(|g| g > 5));
        assert_eq!(s.since_at("nobody", 0, 0).gap, None);
    }

    #[test]
    fn sweep_forgets_users_whose_messages_aged_out() {
        let s = MemoryStore::new(LIMITS);
        s.append_at(&[msg("old", b"x")], 1_000);
        s.append_at(&[msg("new", b"x")], 9_000);
        assert_eq!(s.sweep(12_000), 1);
        assert!(s.shard("old").get("old").is_none());
    }
}
