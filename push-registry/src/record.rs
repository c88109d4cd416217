//! The record a connection registers, and the form it is stored in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One registered connection: which node holds which user's device, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The user ID (JWT `sub`).
    pub user: String,
    /// The device or client ID (JWT `did`). `None` for clients that give none: each such
    /// connection is then its own entry, keyed by its connection ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The push-server node that holds the connection.
    pub node_id: String,
    /// Where that node accepts deliveries (its internal HTTP address).
    pub node_addr: String,
    /// The connection's ID, unique across nodes: the owner token for compare-and-delete.
    pub conn_id: String,
    /// When the connection was accepted, in milliseconds since the Unix epoch. The ring backend
    /// uses it to pick the newest of diverging replicas.
    pub connected_at: u64,
}

impl Record {
    /// The slot this record occupies under its user: one per device, or one per connection
    /// for device-less clients. Prefixed so a device called like a connection cannot collide.
    pub fn field(&self) -> String {
        field_name(self.device.as_deref(), &self.conn_id)
    }
}

/// The per-user slot name for a device, or for a connection without a device.
pub(crate) fn field_name(device: Option<&str>, conn_id: &str) -> String {
    match device {
        Some(d) => format!("d:{d}"),
        None => format!("c:{conn_id}"),
    }
}

/// A record as stored: the record, when it expires, and (ring only) whether it is a tombstone.
///
/// The expiry is an absolute wall-clock time computed once by the writer and sent to every
/// replica, so replicas that took the same write hold byte-identical values: the ring's
/// `safe_quorum` compares them, and read repair can copy them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    #[serde(flatten)]
    pub record: Record,
    /// Expiry, milliseconds since the Unix epoch.
    pub exp: u64,
    /// A tombstone: the connection unregistered. Only the ring writes these, so that a replica
    /// that missed the unregister cannot bring the record back through read repair.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub del: bool,
}

impl Entry {
    pub fn new(record: &Record, ttl: Duration, now: u64) -> Self {
        Entry {
            record: record.clone(),
            exp: now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            del: false,
        }
    }

    pub fn is_live(&self, now: u64) -> bool {
        !self.del && self.exp > now
    }

    /// Orders two versions of one slot: the later connection wins; for the same connection a
    /// tombstone wins over the live record, then the later expiry (a refresh).
    pub fn version(&self) -> (u64, &str, bool, u64) {
        (
            self.record.connected_at,
            &self.record.conn_id,
            self.del,
            self.exp,
        )
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("an Entry always serializes")
    }
}

/// Milliseconds since the Unix epoch on this machine's clock.
///
/// Expiry uses the writers' and readers' wall clocks, so clock skew between machines shifts
/// expiry by that much; with TTLs of minutes and NTP-synced hosts that is noise.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
