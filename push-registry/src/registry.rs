//! The [`Registry`] trait every backend implements, and the small types it returns.
//!
//! The trait uses `async-trait` (boxed `Send` futures) rather than native `async fn` in traits:
//! callers hold backends as `Arc<dyn Registry>` chosen at run time from a URL, and native async
//! trait methods are not object safe. One allocation per call is noise next to a network
//! round trip.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::{Record, Result};

/// What a refresh found for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshOutcome {
    /// The connection still owns its entry (or the entry had vanished, e.g. a storage node
    /// restarted empty, and was written again); its expiry is pushed out.
    Owned,
    /// A newer connection for the same (user, device) owns the entry now; nothing was written.
    /// The holder of this connection should tell it to go.
    Superseded,
}

/// Connections per node, as the operator CLI's `stats` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Users with at least one live connection.
    pub users: usize,
    /// Live connections in total.
    pub connections: usize,
    /// Live connections per push-server node ID.
    pub per_node: BTreeMap<String, usize>,
}

impl Stats {
    /// Counts `records` into the totals.
    pub fn add(&mut self, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        self.users += 1;
        self.connections += records.len();
        for r in records {
            *self.per_node.entry(r.node_id.clone()).or_default() += 1;
        }
    }
}

/// One storage node's answer to a ping.
#[derive(Debug)]
pub struct NodePing {
    /// `host:port`, or `memory`.
    pub node: String,
    /// Round-trip time in microseconds, or why the ping failed.
    pub result: Result<u64>,
}

/// Who is connected where. Implemented by every backend; see [`crate::open`].
///
/// Semantics shared by all backends (the behavioural suite checks them):
/// - one entry per (user, device); device-less connections get one entry each;
/// - [`register`](Registry::register) overwrites: the newest registration wins;
/// - entries expire `ttl` after their last register or refresh;
/// - [`unregister`](Registry::unregister) deletes only if the entry still belongs to that
///   connection, so an old connection closing cannot remove its successor.
#[async_trait]
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// Registers a connection for `ttl`, replacing whatever held its (user, device) slot.
    async fn register(&self, record: &Record, ttl: Duration) -> Result<()>;

    /// Extends each record's expiry to `ttl` from now if its connection still owns the slot,
    /// writing it again if the slot is empty; leaves slots that a newer connection took.
    /// Returns one outcome per record, in order. Batched: one round trip per storage node.
    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>>;

    /// The live connections of one user.
    async fn lookup(&self, user: &str) -> Result<Vec<Record>>;

    /// The live connections of many users, in the order given. Pipelined: one round trip per
    /// storage node rather than per user.
    async fn lookup_many(&self, users: &[String]) -> Result<Vec<Vec<Record>>>;

    /// Removes the (user, device) entry if connection `conn_id` still owns it. Returns whether
    /// it removed something. `device` is `None` for device-less connections.
    async fn unregister(&self, user: &str, device: Option<&str>, conn_id: &str) -> Result<bool>;

    /// Connections per node over the whole registry. Scans everything: for operators, not for
    /// the message path.
    async fn stats(&self) -> Result<Stats>;

    /// Pings every storage node.
    async fn ping(&self) -> Vec<NodePing>;
}
