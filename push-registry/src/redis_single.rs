//! `redis://host:port`: one Redis, or a Dynomite proxy in front of many (see `store.rs`
//! for the data model and why every command it sends is one Dynomite proxies, and
//! `script.rs` for why its scripts go as text unless the URL says `scripts=hash`).

use std::time::Duration;

use async_trait::async_trait;

use crate::node::{Node, Timeouts};
use crate::record::{field_name, now_ms};
use crate::script::Scripts;
use crate::store::{self, Removal};
use crate::{NodePing, Record, RefreshOutcome, Registry, Result, Stats};

/// Users per pipeline when `stats` reads everything: bounds one reply's size.
const STATS_BATCH: usize = 500;

/// The single-endpoint Redis (or Dynomite) backend.
#[derive(Debug)]
pub struct RedisRegistry {
    node: Node,
}

impl RedisRegistry {
    /// A backend for the Redis at `url` (`redis://[user:pass@]host:port[/db]`), sending its
    /// scripts as text (safe behind Dynomite, see `script.rs`). Does not connect until first
    /// used.
    pub fn new(url: &str) -> Result<Self> {
        Self::with_options(url, Timeouts::default(), Scripts::Text)
    }

    pub(crate) fn with_options(url: &str, timeouts: Timeouts, scripts: Scripts) -> Result<Self> {
        Ok(RedisRegistry {
            node: node_for_url(url, timeouts, scripts)?,
        })
    }
}

/// The node a `redis://` URL names, called by its `host:port` (without credentials) in
/// errors. Shared with the message store.
pub(crate) fn node_for_url(url: &str, timeouts: Timeouts, scripts: Scripts) -> Result<Node> {
    let addr = url
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_string();
    Node::new(addr, url, timeouts, scripts)
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn register(&self, record: &Record, ttl: Duration) -> Result<()> {
        let _: i64 = self
            .node
            .query(&store::register_cmd(record, ttl, now_ms()))
            .await?;
        Ok(())
    }

    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for r in records {
            pipe.add_command(store::refresh_cmd(r, ttl, now));
        }
        let owned: Vec<i64> = self.node.pipeline(&pipe).await?;
        Ok(owned
            .into_iter()
            .map(|o| {
                if o == 1 {
                    RefreshOutcome::Owned
                } else {
                    RefreshOutcome::Superseded
                }
            })
            .collect())
    }

    async fn lookup(&self, user: &str) -> Result<Vec<Record>> {
        let raw: store::RawSlots = self.node.query(&store::lookup_cmd(user)).await?;
        let now = now_ms();
        let slots = store::decode_slots(&self.node.addr, user, raw, now)?;
        Ok(store::live_records(&slots, now))
    }

    async fn lookup_many(&self, users: &[String]) -> Result<Vec<Vec<Record>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in users {
            pipe.add_command(store::lookup_cmd(u));
        }
        let raws: Vec<store::RawSlots> = self.node.pipeline(&pipe).await?;
        let now = now_ms();
        users
            .iter()
            .zip(raws)
            .map(|(u, raw)| {
                let slots = store::decode_slots(&self.node.addr, u, raw, now)?;
                Ok(store::live_records(&slots, now))
            })
            .collect()
    }

    async fn unregister(&self, user: &str, device: Option<&str>, conn_id: &str) -> Result<bool> {
        let field = field_name(device, conn_id);
        let cmd = store::unregister_cmd(user, &field, conn_id, now_ms(), Removal::Delete);
        let removed: i64 = self.node.query(&cmd).await?;
        Ok(removed == 1)
    }

    async fn stats(&self) -> Result<Stats> {
        let mut users = self.node.scan_users().await?;
        // SCAN may return a key more than once while the keyspace is rehashing.
        users.sort();
        users.dedup();
        let mut stats = Stats::default();
        for batch in users.chunks(STATS_BATCH) {
            for records in self.lookup_many(batch).await? {
                stats.add(&records);
            }
        }
        Ok(stats)
    }

    async fn ping(&self) -> Vec<NodePing> {
        vec![self.node.ping().await]
    }
}
