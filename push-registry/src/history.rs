//! Per-user message history, so that a client can resume after a reconnect: the
//! [`MessageStore`] trait, its embedded in-memory form [`MemoryStore`], and [`open_store`].
//!
//! The store is the single source of message IDs: a message gets its per-user ID when it is
//! appended, once, whichever node or processor appends it, so the same message carries the
//! same ID on every device and every connection, and IDs keep increasing across reconnects,
//! node restarts and moves between nodes. The resume rule is [`UserBuffer::since`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::buffer::{Appended, BufferLimits, Buffered, NewMessage, Resume, UserBuffer};
use crate::Result;

/// Where users' recent messages are kept. Implemented by `memory` and the Redis-family
/// backends; see [`open_store`].
///
/// Semantics every backend follows:
/// - IDs per user increase by one per append. A user's first ID (and the first after their
///   history expired) is the wall clock in microseconds, so IDs keep increasing even when
///   the store forgets a user.
/// - A message whose `mid` is still kept for its user is not appended twice.
/// - At most [`BufferLimits::max_messages`] per user, none older than
///   [`BufferLimits::max_age`].
#[async_trait]
pub trait MessageStore: Send + Sync + std::fmt::Debug {
    /// Appends messages, in order, each to its user's history. One outcome per message.
    /// Batched: one round trip per storage node.
    async fn append(&self, messages: &[NewMessage<'_>]) -> Result<Vec<Appended>>;

    /// What a client of `user` that last saw ID `after` is owed: the kept messages with a
    /// larger ID, oldest first, and a gap when some of them are no longer kept. `after == 0`
    /// means the client saw nothing: every kept message, never a gap.
    async fn since(&self, user: &str, after: u64) -> Result<Resume>;

    /// The kept messages of `user` with these IDs, in ID order; IDs no longer kept are left
    /// out. Used to turn a client's acknowledgement into a receipt (message ID, send time).
    async fn get(&self, user: &str, ids: &[u64]) -> Result<Vec<Buffered>>;

    /// The limits this store keeps to.
    fn limits(&self) -> BufferLimits;
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
        self.shards[crate::shard_of(user, SHARDS)]
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

/// Opens the message store for a registry URL: the same storage as the registry (memory for
/// `memory`, the same Redis for `redis://`, the same cluster or ring), with the same options
/// (`timeout_ms`, the ring's racks and write consistency), keeping to `limits`. Only
/// `redis-cluster` connects here (it needs the slot map); the others connect on first use.
pub async fn open_store(url: &str, limits: BufferLimits) -> Result<Arc<dyn MessageStore>> {
    use crate::history_redis::{ClusterStore, RedisStore, RingStore};
    use crate::url::{self, BackendUrl};
    Ok(match url::parse(url)? {
        BackendUrl::Memory { .. } => Arc::new(MemoryStore::new(limits)),
        BackendUrl::Redis { url, timeout_ms } => {
            Arc::new(RedisStore::new(&url, url::timeouts(timeout_ms), limits)?)
        }
        BackendUrl::Cluster { nodes, timeout_ms } => {
            Arc::new(ClusterStore::connect(&nodes, url::timeouts(timeout_ms), limits).await?)
        }
        BackendUrl::Ring {
            racks,
            read,
            write,
            timeout_ms,
        } => Arc::new(RingStore::new(
            crate::RingRegistry::new(&racks, read, write, url::timeouts(timeout_ms))?,
            limits,
        )),
    })
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
