//! `redis-cluster://h1:p1,h2:p2,…`: Redis Cluster through redis-rs's cluster client, which
//! follows MOVED/ASK redirects and refreshes its slot map after a failover.
//!
//! Same data model and scripts as the single-Redis backend (`store.rs`); the `{user}`
//! hash tag in every key puts one user's hash, and so each single-key script, on one slot.
//! Batches are concurrent single-slot requests on the multiplexed cluster connection (they are
//! pipelined on each node's socket), because a cross-slot pipeline would have to be split per
//! node anyway.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::IntoConnectionInfo;

use crate::node::{Node, Request, Timeouts};
use crate::record::{field_name, now_ms};
use crate::script::{self, Scripts};
use crate::store::{self, Removal};
use crate::{Error, NodePing, Record, RefreshOutcome, Registry, Result, Stats};

/// The Redis Cluster backend.
pub struct ClusterRegistry {
    conn: ClusterConnection,
    /// The seed list, named in errors: the client does not say which node a failure was on.
    seeds: String,
    timeouts: Timeouts,
}

impl std::fmt::Debug for ClusterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRegistry")
            .field("seeds", &self.seeds)
            .finish()
    }
}

impl ClusterRegistry {
    /// Connects to the cluster through any of `nodes` (`host:port`) and loads its slot map.
    pub async fn connect(nodes: &[String], timeouts: Timeouts) -> Result<Self> {
        let (conn, seeds) = connect(nodes, timeouts).await?;
        Ok(ClusterRegistry {
            conn,
            seeds,
            timeouts,
        })
    }

    fn fail(&self, source: redis::RedisError) -> Error {
        Error::Node {
            node: format!("cluster {}", self.seeds),
            source,
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        query(&self.conn, cmd).await.map_err(|e| self.fail(e))
    }

    /// The masters as the cluster lists them (`CLUSTER NODES` on any node), as standalone
    /// nodes: SCAN and PING are per node, not per slot.
    async fn masters(&self) -> Result<Vec<Node>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let table = conn
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await
            .map_err(|e| self.fail(e))?;
        let table: String =
            redis::FromRedisValue::from_redis_value(table).map_err(|e| self.fail(e.into()))?;
        table
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let flags = *fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                // `ip:port@busport[,hostname]`
                let addr = fields.get(1)?.split('@').next()?.to_string();
                Some(addr)
            })
            .map(|addr| {
                Node::new(
                    addr.clone(),
                    &format!("redis://{addr}"),
                    self.timeouts,
                    Scripts::Hash,
                )
            })
            .collect()
    }
}

/// Runs a command or a single-slot pipeline on the cluster; scripts the owning master does not
/// hold (after a restart or a failover) are sent again with their text, which caches them
/// there. Shared with the message store.
pub(crate) async fn query<R: Request, T: redis::FromRedisValue>(
    conn: &ClusterConnection,
    request: &R,
) -> redis::RedisResult<T> {
    let mut conn = conn.clone();
    match request.send(&mut conn).await {
        Err(e) if script::is_no_script(&e) => request.with_text().send(&mut conn).await,
        other => other,
    }
}

/// A cluster connection through any of `nodes`, with the slot map loaded, and the seed list
/// that errors name (the client does not say which node a failure was on). Shared with the
/// message store, which keeps its own connection.
pub(crate) async fn connect(
    nodes: &[String],
    timeouts: Timeouts,
) -> Result<(ClusterConnection, String)> {
    let seeds = nodes.join(",");
    let fail = |source| Error::Node {
        node: format!("cluster {seeds}"),
        source,
    };
    let infos = nodes
        .iter()
        .map(|n| format!("redis://{n}").into_connection_info())
        .collect::<redis::RedisResult<Vec<_>>>()
        .map_err(fail)?;
    let client = ClusterClientBuilder::new(infos)
        .connection_timeout(timeouts.connect)
        .response_timeout(timeouts.response)
        // A failover takes the cluster a few seconds; retries with backoff ride it out
        // instead of failing every request in that window.
        .retries(8)
        .build()
        .map_err(fail)?;
    let conn = client.get_async_connection().await.map_err(fail)?;
    Ok((conn, seeds))
}

#[async_trait]
impl Registry for ClusterRegistry {
    async fn register(&self, record: &Record, ttl: Duration) -> Result<()> {
        let _: i64 = self
            .query(&store::register_cmd(record, ttl, now_ms()))
            .await?;
        Ok(())
    }

    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>> {
        let now = now_ms();
        let cmds: Vec<redis::Cmd> = records
            .iter()
            .map(|r| store::refresh_cmd(r, ttl, now))
            .collect();
        join_all(cmds.iter().map(|c| self.query::<i64>(c)))
            .await
            .into_iter()
            .map(|o| {
                o.map(|o| {
                    if o == 1 {
                        RefreshOutcome::Owned
                    } else {
                        RefreshOutcome::Superseded
                    }
                })
            })
            .collect()
    }

    async fn lookup(&self, user: &str) -> Result<Vec<Record>> {
        let raw: store::RawSlots = self.query(&store::lookup_cmd(user)).await?;
        let now = now_ms();
        let slots = store::decode_slots(&self.seeds, user, raw, now)?;
        Ok(store::live_records(&slots, now))
    }

    async fn lookup_many(&self, users: &[String]) -> Result<Vec<Vec<Record>>> {
        let cmds: Vec<redis::Cmd> = users.iter().map(|u| store::lookup_cmd(u)).collect();
        let raws = join_all(cmds.iter().map(|c| self.query::<store::RawSlots>(c))).await;
        let now = now_ms();
        users
            .iter()
            .zip(raws)
            .map(|(u, raw)| {
                let slots = store::decode_slots(&self.seeds, u, raw?, now)?;
                Ok(store::live_records(&slots, now))
            })
            .collect()
    }

    async fn unregister(&self, user: &str, device: Option<&str>, conn_id: &str) -> Result<bool> {
        let field = field_name(device, conn_id);
        let cmd = store::unregister_cmd(user, &field, conn_id, now_ms(), Removal::Delete);
        Ok(self.query::<i64>(&cmd).await? == 1)
    }

    async fn stats(&self) -> Result<Stats> {
        let mut users = Vec::new();
        for master in self.masters().await? {
            users.extend(master.scan_users().await?);
        }
        users.sort();
        users.dedup();
        let mut stats = Stats::default();
        for batch in users.chunks(500) {
            for records in self.lookup_many(batch).await? {
                stats.add(&records);
            }
        }
        Ok(stats)
    }

    async fn ping(&self) -> Vec<NodePing> {
        match self.masters().await {
            Ok(masters) => join_all(masters.iter().map(Node::ping)).await,
            Err(e) => vec![NodePing {
                node: self.seeds.clone(),
                result: Err(e),
            }],
        }
    }
}
