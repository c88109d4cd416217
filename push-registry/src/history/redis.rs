//! Message history on the Redis family: [`RedisStore`] (`redis://`, one Redis or a Dynomite
//! proxy), [`ClusterStore`] (`redis-cluster://`) and [`RingStore`] (`ring://`). The data
//! model and scripts are in `redis_model.rs`; this is the I/O around them.
//!
//! Every operation on a user is one single-key EVAL on the user's key, so it is atomic on the
//! node that holds the key and Dynomite can route it. Batches are pipelines (never
//! MULTI/EXEC): one round trip per node.
//!
//! Retries: `Node` sends a pipeline once more when the connection turns out to have dropped
//! (typically a node that restarted since the last call, where nothing of the first attempt
//! ran). Should a node have run an append and then lost the connection before answering, the
//! retry appends again: a message with a `mid` is then found as a duplicate (same ID), one
//! without could be kept twice. Hence appenders should pass the envelope ID as `mid`
//! (push-lib gives every envelope one).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::Value;

use super::redis_model as model;
use super::MessageStore;
use crate::buffer::{first_id_now, now_ms, Appended, BufferLimits, Buffered, NewMessage, Resume};
use crate::node::{Node, Timeouts};
use crate::ring::RingRegistry;
use crate::script::Scripts;
use crate::{Error, Result};

fn appended(r: &model::AppendReply) -> Appended {
    Appended {
        id: r.id,
        duplicate: r.duplicate,
    }
}

/// `redis://`: the history of every user on one Redis (or behind one Dynomite proxy).
#[derive(Debug)]
pub struct RedisStore {
    node: Node,
    limits: BufferLimits,
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://[user:pass@]host:port[/db]`), its scripts sent
    /// as `scripts` says. Does not connect until first used.
    pub fn new(
        url: &str,
        timeouts: Timeouts,
        scripts: Scripts,
        limits: BufferLimits,
    ) -> Result<Self> {
        Ok(RedisStore {
            node: crate::redis_single::node_for_url(url, timeouts, scripts)?,
            limits,
        })
    }
}

#[async_trait]
impl MessageStore for RedisStore {
    async fn append(&self, messages: &[NewMessage<'_>]) -> Result<Vec<Appended>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let (now, seed) = (now_ms(), first_id_now());
        let mut pipe = redis::pipe();
        for m in messages {
            pipe.add_command(model::append_cmd(m, now, seed, 0, self.limits));
        }
        let replies: Vec<Value> = self.node.pipeline(&pipe).await?;
        messages
            .iter()
            .zip(&replies)
            .map(|(m, v)| Ok(appended(&model::decode_append(&self.node.addr, m.user, v)?)))
            .collect()
    }

    async fn since(&self, user: &str, after: u64) -> Result<Resume> {
        let v: Value = self
            .node
            .query(&model::since_cmd(user, after, now_ms(), self.limits))
            .await?;
        model::decode_since(&self.node.addr, user, after, first_id_now(), &v)
    }

    async fn get(&self, user: &str, ids: &[u64]) -> Result<Vec<Buffered>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let v: Value = self
            .node
            .query(&model::get_cmd(user, ids, now_ms(), self.limits))
            .await?;
        model::decode_members(&self.node.addr, user, &v)
    }

    fn limits(&self) -> BufferLimits {
        self.limits
    }
}

/// `redis-cluster://`: the same scripts; the `{user}` hash tag puts a user's key on one slot.
pub struct ClusterStore {
    conn: ClusterConnection,
    seeds: String,
    limits: BufferLimits,
}

impl std::fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStore")
            .field("seeds", &self.seeds)
            .finish()
    }
}

impl ClusterStore {
    /// Connects to the cluster through any of `nodes` (`host:port`) and loads its slot map.
    pub async fn connect(
        nodes: &[String],
        timeouts: Timeouts,
        limits: BufferLimits,
    ) -> Result<Self> {
        let (conn, seeds) = crate::cluster::connect(nodes, timeouts).await?;
        Ok(ClusterStore {
            conn,
            seeds,
            limits,
        })
    }

    fn fail(&self, source: redis::RedisError) -> Error {
        Error::Node {
            node: format!("cluster {}", self.seeds),
            source,
        }
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value> {
        crate::cluster::query(&self.conn, cmd)
            .await
            .map_err(|e| self.fail(e))
    }
}

#[async_trait]
impl MessageStore for ClusterStore {
    async fn append(&self, messages: &[NewMessage<'_>]) -> Result<Vec<Appended>> {
        let (now, seed) = (now_ms(), first_id_now());
        // One pipeline per user: the cluster client sends a pipeline to one slot only, and a
        // user's messages must be appended in order. Users go at once, so the pipelines to one
        // node share its socket.
        let mut per_user: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, m) in messages.iter().enumerate() {
            per_user.entry(m.user).or_default().push(i);
        }
        let groups: Vec<(&str, Vec<usize>)> = per_user.into_iter().collect();
        let replies = join_all(groups.iter().map(|(_, items)| {
            let mut pipe = redis::pipe();
            for &i in items {
                pipe.add_command(model::append_cmd(&messages[i], now, seed, 0, self.limits));
            }
            async move { crate::cluster::query::<_, Vec<Value>>(&self.conn, &pipe).await }
        }))
        .await;
        let mut out = vec![None; messages.len()];
        for ((user, items), reply) in groups.iter().zip(replies) {
            let values = reply.map_err(|e| self.fail(e))?;
            for (&i, v) in items.iter().zip(&values) {
                out[i] = Some(appended(&model::decode_append(&self.seeds, user, v)?));
            }
        }
        out.into_iter()
            .map(|a| {
                a.ok_or_else(|| Error::Corrupt {
                    node: format!("cluster {}", self.seeds),
                    user: String::new(),
                    reason: "a pipeline answered fewer replies than commands".to_owned(),
                })
            })
            .collect()
    }

    async fn since(&self, user: &str, after: u64) -> Result<Resume> {
        let v = self
            .query(&model::since_cmd(user, after, now_ms(), self.limits))
            .await?;
        model::decode_since(&self.seeds, user, after, first_id_now(), &v)
    }

    async fn get(&self, user: &str, ids: &[u64]) -> Result<Vec<Buffered>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let v = self
            .query(&model::get_cmd(user, ids, now_ms(), self.limits))
            .await?;
        model::decode_members(&self.seeds, user, &v)
    }

    fn limits(&self) -> BufferLimits {
        self.limits
    }
}

/// `ring://`: history on the registry's token ring.
///
/// - **Append**: on the user's owner in the first rack that answers, in rack order. That node
///   alone gives the ID (its script allocates, deduplicates and trims atomically), so there is
///   one writer per user at a time and IDs never fork while it is up. The resulting member is
///   then copied to the owner in every other rack with the idempotent `apply` script (counter
///   only moves up, an ID already kept is left alone). The append succeeds when the copies
///   plus the appending rack reach the write consistency: `one` needs no copy, `quorum` and
///   `safe_quorum` a majority of racks (there is nothing for `safe_quorum` to compare: every
///   copy carries the same member, so it counts as `quorum`). Copies go to every rack at once
///   and the call waits for all (bounded by the node timeouts), as the registry's writes do.
/// - **Fallback**: when a rack's owner fails, the next rack appends. Before that, it reads the
///   counters of the racks after it and raises its own counter to the highest, so IDs keep
///   increasing even when the fallback rack missed the last copy, as long as one rack that
///   took it answers (guaranteed under `quorum` with one rack down).
/// - **Reads** (`since`, `get`): from the first rack that answers. Appends go to that same
///   rack first, so it holds the newest history; merging histories across racks would need
///   every rack's full history on every resume, for little gain.
///
/// Limits, said plainly: a rack that lost its data (restarted empty) and answers first again
/// serves an empty history (clients are told of a gap, never given wrong messages) and seeds
/// new IDs from the clock (above all earlier ones). A rack that comes back from a partition
/// with an old counter may give an ID again; the copies then keep the other racks' message
/// under that ID.
#[derive(Debug)]
pub struct RingStore {
    ring: RingRegistry,
    limits: BufferLimits,
}

/// Per item: what a node answered, or the node and why it failed.
type Answers = Vec<std::result::Result<Value, (String, String)>>;

impl RingStore {
    /// A store over `ring`'s racks and nodes. Does not connect yet.
    pub(crate) fn new(ring: RingRegistry, limits: BufferLimits) -> Self {
        RingStore { ring, limits }
    }

    /// Sends item `i`'s command to the owner of `users[i]` in `rack`: one pipeline per node,
    /// all nodes at once, items in order within a node.
    async fn ask(&self, rack: usize, users: &[&str], cmds: Vec<redis::Cmd>) -> Answers {
        let mut batches: Vec<(Arc<Node>, redis::Pipeline, Vec<usize>)> = Vec::new();
        let mut per_node: HashMap<String, usize> = HashMap::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let node = self.ring.owner(rack, users[i]);
            let b = *per_node.entry(node.addr.clone()).or_insert_with(|| {
                batches.push((Arc::clone(node), redis::pipe(), Vec::new()));
                batches.len() - 1
            });
            batches[b].1.add_command(cmd);
            batches[b].2.push(i);
        }
        let replies = join_all(
            batches
                .iter()
                .map(|(node, pipe, _)| node.pipeline::<Vec<Value>>(pipe)),
        )
        .await;
        let mut out: Answers = (0..users.len())
            .map(|_| Err((String::new(), "not asked".to_owned())))
            .collect();
        for ((node, _, items), reply) in batches.iter().zip(replies) {
            match reply {
                Ok(values) => {
                    for (&i, v) in items.iter().zip(values) {
                        out[i] = Ok(v);
                    }
                }
                Err(e) => {
                    let why = match &e {
                        Error::Node { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    for &i in items {
                        out[i] = Err((node.addr.clone(), why.clone()));
                    }
                }
            }
        }
        out
    }

    /// The highest counter the racks after `rack` hold for each user (0 when none answers).
    async fn floors(&self, rack: usize, users: &[&str], now: u64) -> Result<Vec<u64>> {
        let later: Vec<usize> = (rack + 1..self.ring.rack_count()).collect();
        let answers = join_all(later.iter().map(|&r| {
            let cmds = users
                .iter()
                .map(|u| model::last_cmd(u, now, self.limits))
                .collect();
            self.ask(r, users, cmds)
        }))
        .await;
        let mut floors = vec![0; users.len()];
        for (&r, answers) in later.iter().zip(answers) {
            for (i, a) in answers.into_iter().enumerate() {
                // A rack that fails here is simply not counted: this is a best effort on
                // top of the copies, which are what guarantee the counters.
                if let Ok(v) = a {
                    let addr = &self.ring.owner(r, users[i]).addr;
                    if let Some(last) = model::decode_last(addr, users[i], &v)? {
                        floors[i] = floors[i].max(last);
                    }
                }
            }
        }
        Ok(floors)
    }

    /// A read from the first rack that answers.
    async fn read_first<T>(
        &self,
        op: &'static str,
        user: &str,
        cmd: redis::Cmd,
        decode: impl Fn(&str, &Value) -> Result<T>,
    ) -> Result<T> {
        let mut failures = Vec::new();
        for rack in 0..self.ring.rack_count() {
            match self.ask(rack, &[user], vec![cmd.clone()]).await.pop() {
                Some(Ok(v)) => return decode(&self.ring.owner(rack, user).addr, &v),
                Some(Err(f)) => failures.push(f),
                None => {}
            }
        }
        Err(Error::Quorum {
            op,
            needed: 1,
            total: self.ring.rack_count(),
            succeeded: 0,
            failures,
        })
    }
}

#[async_trait]
impl MessageStore for RingStore {
    async fn append(&self, messages: &[NewMessage<'_>]) -> Result<Vec<Appended>> {
        let (now, seed) = (now_ms(), first_id_now());
        let racks = self.ring.rack_count();
        // Per message: the rack that appended it and its reply.
        let mut done: Vec<Option<(usize, model::AppendReply)>> = vec![None; messages.len()];
        let mut failures: Vec<Vec<(String, String)>> = vec![Vec::new(); messages.len()];
        for rack in 0..racks {
            let pending: Vec<usize> = (0..messages.len()).filter(|&i| done[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            let users: Vec<&str> = pending.iter().map(|&i| messages[i].user).collect();
            // The first rack is the users' usual writer: its counter is the truth. A later one
            // is standing in and may have missed copies: raise it to what the others hold.
            let floors = if rack == 0 {
                vec![0; pending.len()]
            } else {
                self.floors(rack, &users, now).await?
            };
            let cmds = pending
                .iter()
                .zip(&floors)
                .map(|(&i, &floor)| model::append_cmd(&messages[i], now, seed, floor, self.limits))
                .collect();
            // A user's messages all go to one node, in one pipeline: they succeed or fail
            // together and move to the next rack in order.
            for (&i, answer) in pending.iter().zip(self.ask(rack, &users, cmds).await) {
                match answer {
                    Ok(v) => {
                        let addr = &self.ring.owner(rack, messages[i].user).addr;
                        done[i] = Some((rack, model::decode_append(addr, messages[i].user, &v)?));
                    }
                    Err(f) => failures[i].push(f),
                }
            }
        }
        // Messages no rack took.
        if let Some(i) = done.iter().position(Option::is_none) {
            return Err(Error::Quorum {
                op: "append",
                needed: self.ring.write_consistency().needed(racks),
                total: racks,
                succeeded: 0,
                failures: std::mem::take(&mut failures[i]),
            });
        }
        let done: Vec<(usize, model::AppendReply)> = done.into_iter().flatten().collect();

        // Copies, every other rack at once. Duplicates are copied too: the first attempt may
        // have appended and then failed its copies, and this retry is what completes them.
        let copies = join_all((0..racks).map(|rack| {
            let items: Vec<usize> = (0..done.len()).filter(|&i| done[i].0 != rack).collect();
            let users: Vec<&str> = items.iter().map(|&i| messages[i].user).collect();
            let cmds = items
                .iter()
                .map(|&i| {
                    let r = &done[i].1;
                    model::apply_cmd(messages[i].user, r.id, &r.member, now, self.limits)
                })
                .collect();
            async move { (items, self.ask(rack, &users, cmds).await) }
        }))
        .await;
        let mut took = vec![1usize; done.len()]; // the appending rack
        for (items, answers) in copies {
            for (i, a) in items.into_iter().zip(answers) {
                match a {
                    Ok(_) => took[i] += 1,
                    Err(f) => failures[i].push(f),
                }
            }
        }
        let needed = self.ring.write_consistency().needed(racks);
        if let Some(i) = (0..done.len()).find(|&i| took[i] < needed) {
            // The message is kept on the racks that took it, under its ID; a retry with the
            // same mid finds it as a duplicate and copies it again.
            return Err(Error::Quorum {
                op: "append",
                needed,
                total: racks,
                succeeded: took[i],
                failures: std::mem::take(&mut failures[i]),
            });
        }
        Ok(done.iter().map(|(_, r)| appended(r)).collect())
    }

    async fn since(&self, user: &str, after: u64) -> Result<Resume> {
        let cmd = model::since_cmd(user, after, now_ms(), self.limits);
        let now_us = first_id_now();
        self.read_first("since", user, cmd, |node, v| {
            model::decode_since(node, user, after, now_us, v)
        })
        .await
    }

    async fn get(&self, user: &str, ids: &[u64]) -> Result<Vec<Buffered>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmd = model::get_cmd(user, ids, now_ms(), self.limits);
        self.read_first("get", user, cmd, |node, v| {
            model::decode_members(node, user, v)
        })
        .await
    }

    fn limits(&self) -> BufferLimits {
        self.limits
    }
}
