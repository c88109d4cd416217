//! Per-user message history, so that a client can resume after a reconnect: the
//! [`MessageStore`] trait here, one file per backend below it ([`memory`]: the embedded
//! [`MemoryStore`]; [`redis`]: the Redis family), and [`crate::open_store`] to pick one.
//!
//! The store is the single source of message IDs: a message gets its per-user ID when it is
//! appended, once, whichever node or processor appends it, so the same message carries the
//! same ID on every device and every connection, and IDs keep increasing across reconnects,
//! node restarts and moves between nodes. The resume rule is [`crate::buffer::UserBuffer::since`].

use async_trait::async_trait;

use crate::buffer::{Appended, BufferLimits, Buffered, NewMessage, Resume};
use crate::Result;

pub mod memory;
pub mod redis;
mod redis_model;

pub use crate::buffer::{first_id_now, now_ms};
pub use memory::MemoryStore;
pub use redis::{ClusterStore, RedisStore, RingStore};

/// Where users' recent messages are kept. Implemented by `memory` and the Redis-family
/// backends; see [`crate::open_store`].
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
