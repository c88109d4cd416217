//! push-registry: who is connected where. Each push-server registers its connections here; the
//! message processor looks users up to find the node that holds them.
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`record`] | [`Record`], its stored form with an absolute expiry, the clock |
//! | [`error`] | [`Error`]: which storage node failed and why |
//! | [`registry`] | the [`Registry`] trait every backend implements, [`Stats`], [`NodePing`] |
//! | [`buffer`] | a user's recent messages for resume: bounded buffer, the resume rule, first IDs (pure) |
//! | [`shard`] | [`shard_of`]: a key's lock shard, for in-process sharding |
//! | [`murmur3`] | MurmurHash3 x86 32-bit, for the ring's token placement |
//! | `script` | Lua scripts called by hash (`EVALSHA`) or by text (`EVAL`), and [`Scripts`]: which a backend sends |
//! | `store` | the Redis data model: keys, Lua scripts, command builders and decoders (no I/O) |
//! | `node` | one standalone Redis connection with timeouts, reconnecting after failures |
//! | [`memory`] | `memory`: in-process map with lazy expiry and a bound |
//! | [`redis_single`] | `redis://`: one Redis or a Dynomite proxy |
//! | [`cluster`] | `redis-cluster://`: Redis Cluster |
//! | [`ring`] | `ring://`: Dynomite's racks, token ring and quorums, run client-side |
//! | [`url`] | registry URL → [`url::BackendUrl`] |
//! | [`peer_nets`] | [`PeerNets`]: which record `node_addr`s may receive secrets and payloads |
//! | [`history`] | [`MessageStore`]: where users' recent messages are kept, one file per backend: |
//! | ↳ [`history::memory`] | [`MemoryStore`]: the embedded form, in process memory |
//! | ↳ `history::redis_model` | the Redis data model of history: sorted set per user, scripts, decoders (no I/O) |
//! | ↳ [`history::redis`] | [`MessageStore`] on `redis://`, `redis-cluster://` and `ring://` (see `docs/history.md`) |
//!
//! [`open`] and [`open_store`] (this file) turn a URL into a registry backend and the message
//! store on the same storage. The `push-registry` binary (`src/main.rs`) is the operator CLI
//! on top.

pub mod buffer;
pub mod cluster;
pub mod error;
pub mod history;
pub mod memory;
pub mod murmur3;
pub mod peer_nets;
pub mod record;
pub mod redis_single;
pub mod registry;
pub mod ring;
pub mod shard;
pub mod url;

mod node;
mod script;
mod store;

use std::sync::Arc;

pub use buffer::{Appended, BufferLimits, Buffered, NewMessage, Resume};
pub use cluster::ClusterRegistry;
pub use error::{Error, Result};
pub use history::{ClusterStore, MemoryStore, MessageStore, RedisStore, RingStore};
pub use memory::MemoryRegistry;
pub use node::Timeouts;
pub use peer_nets::{PeerNets, PeerNetsError};
pub use record::{now_ms, Record};
pub use redis_single::RedisRegistry;
pub use registry::{NodePing, RefreshOutcome, Registry, Stats};
pub use ring::{Consistency, RingRegistry};
pub use script::Scripts;
pub use shard::shard_of;
pub use store::PRUNE_AT;

/// Opens the backend a registry URL names (see [`url`] for the forms). Only the
/// `redis-cluster` backend connects here (it needs the slot map); the others connect on first
/// use, so a storage node that is down at start-up does not stop the caller from starting.
pub async fn open(url: &str) -> Result<Arc<dyn Registry>> {
    Ok(match url::parse(url)? {
        url::BackendUrl::Memory { max_entries } => Arc::new(MemoryRegistry::new(max_entries)),
        url::BackendUrl::Redis {
            url,
            timeout_ms,
            scripts,
        } => Arc::new(RedisRegistry::with_options(
            &url,
            url::timeouts(timeout_ms),
            scripts,
        )?),
        url::BackendUrl::Cluster { nodes, timeout_ms } => {
            Arc::new(ClusterRegistry::connect(&nodes, url::timeouts(timeout_ms)).await?)
        }
        url::BackendUrl::Ring {
            racks,
            read,
            write,
            timeout_ms,
        } => Arc::new(RingRegistry::new(
            &racks,
            read,
            write,
            url::timeouts(timeout_ms),
        )?),
    })
}

/// Opens the message store for a registry URL: the same storage as the registry (memory for
/// `memory`, the same Redis for `redis://`, the same cluster or ring), with the same options
/// (`timeout_ms`, the ring's racks and write consistency), keeping to `limits`. Only
/// `redis-cluster` connects here (it needs the slot map); the others connect on first use.
pub async fn open_store(url: &str, limits: BufferLimits) -> Result<Arc<dyn MessageStore>> {
    Ok(match url::parse(url)? {
        url::BackendUrl::Memory { .. } => Arc::new(MemoryStore::new(limits)),
        url::BackendUrl::Redis {
            url,
            timeout_ms,
            scripts,
        } => Arc::new(RedisStore::new(
            &url,
            url::timeouts(timeout_ms),
            scripts,
            limits,
        )?),
        url::BackendUrl::Cluster { nodes, timeout_ms } => {
            Arc::new(ClusterStore::connect(&nodes, url::timeouts(timeout_ms), limits).await?)
        }
        url::BackendUrl::Ring {
            racks,
            read,
            write,
            timeout_ms,
        } => Arc::new(RingStore::new(
            RingRegistry::new(&racks, read, write, url::timeouts(timeout_ms))?,
            limits,
        )),
    })
}
