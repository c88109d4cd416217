//! `ring://`: Dynomite's replication model run from the client over plain Redis nodes.
//!
//! Every rack holds a full copy. Within a rack, node `i` of `k` owns the token `i * 2^32 / k`
//! and a user belongs to the node with the greatest token not above `murmur3_32(user)`: the
//! rack's token ring. An operation goes to the user's owner in every rack at once; it succeeds
//! when enough of them answer for its [`Consistency`] (reads and writes each have their own).
//!
//! Replicas can diverge (a node was down for a write, or restarted empty). Quorum reads merge
//! the replicas' answers slot by slot, newest version winning (`Entry::version`: connected-at,
//! connection ID, tombstone, expiry), and write the winner back to every replica that answered
//! with something older or nothing: read repair. Deletes leave tombstones (until the entry
//! would have expired) so that a replica that missed an unregister cannot win a merge and
//! bring the record back.
//!
//! Differences from Dynomite, on purpose: there is no "local" rack, so `one` tries racks in
//! the order given and falls over to the next on failure; and a quorum operation waits for
//! every replica (bounded by the node timeouts) rather than only the first quorum, so that read
//! repair is done before the call returns and the caller sees a settled state.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::Value;

use crate::murmur3::murmur3_32;
use crate::node::{Node, Timeouts};
use crate::record::{field_name, now_ms, Entry};
use crate::script::Scripts;
use crate::store::{self, Removal};
use crate::{Error, NodePing, Record, RefreshOutcome, Registry, Result, Stats};

/// How many replicas must answer (and, for `safe_quorum`, agree) for an operation to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// DC_ONE: one replica. Reads try racks in order; no read repair.
    One,
    /// DC_QUORUM: a majority of the racks.
    Quorum,
    /// DC_SAFE_QUORUM: a majority, and the majority's answers must be identical.
    SafeQuorum,
}

impl Consistency {
    pub(crate) fn needed(self, replicas: usize) -> usize {
        match self {
            Consistency::One => 1,
            Consistency::Quorum | Consistency::SafeQuorum => replicas / 2 + 1,
        }
    }
}

impl FromStr for Consistency {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        match s.to_ascii_lowercase().as_str() {
            "one" | "dc_one" => Ok(Consistency::One),
            "quorum" | "dc_quorum" => Ok(Consistency::Quorum),
            "safe_quorum" | "dc_safe_quorum" => Ok(Consistency::SafeQuorum),
            _ => Err(()),
        }
    }
}

/// One rack: a full replica spread over its nodes by token.
#[derive(Debug)]
struct Rack {
    nodes: Vec<Arc<Node>>,
    /// Ascending; `tokens[i]` belongs to `nodes[i]`, and `tokens[0]` is 0.
    tokens: Vec<u32>,
}

impl Rack {
    fn owner(&self, user: &str) -> &Arc<Node> {
        let hash = murmur3_32(user.as_bytes(), 0);
        // tokens[0] == 0 ≤ hash, so the partition point is at least 1.
        let i = self.tokens.partition_point(|t| *t <= hash) - 1;
        &self.nodes[i]
    }
}

/// One replica's answer for one item: the node, and what it said or why it failed.
type Answer<T> = (String, std::result::Result<T, ReplicaError>);

/// Why one replica's answer for one item is missing or unusable. Shared (`Arc`) because one
/// failed pipeline fails every item it carried; written out only in [`Error::Quorum`].
#[derive(Debug, Clone, thiserror::Error)]
enum ReplicaError {
    /// The node's pipeline failed: refused, timed out or answered an error.
    #[error("{}", node_failure(.0))]
    Node(Arc<Error>),
    /// A reply of another type than the command returns.
    #[error("unexpected reply {0:?}")]
    UnexpectedReply(Value),
    /// The stored value is not the registry's slot map.
    #[error("{0}")]
    Parse(Arc<redis::ParsingError>),
    /// The slot map holds an entry that does not decode.
    #[error("{0}")]
    Corrupt(Arc<Error>),
}

/// A failed node as [`Error::Quorum`] lists it: the node is named beside it, so only the
/// client library's words for a node error.
fn node_failure(e: &Error) -> String {
    match e {
        Error::Node { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// The client-side replicated ring backend.
#[derive(Debug)]
pub struct RingRegistry {
    racks: Vec<Rack>,
    read: Consistency,
    write: Consistency,
}

impl RingRegistry {
    /// A ring over `racks` (name and `host:port` nodes each, nodes in token order), with the
    /// given consistency for reads and for writes. Does not connect yet.
    pub fn new(
        racks: &[(String, Vec<String>)],
        read: Consistency,
        write: Consistency,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let racks = racks
            .iter()
            .map(|(_, addrs)| {
                let k = addrs.len() as u64;
                let nodes = addrs
                    .iter()
                    .map(|a| {
                        // Each node is reached directly and its NOSCRIPT seen: by hash.
                        Node::new(a.clone(), &format!("redis://{a}"), timeouts, Scripts::Hash)
                            .map(Arc::new)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let tokens = (0..k)
                    .map(|i| u32::try_from((i << 32) / k).unwrap_or(u32::MAX))
                    .collect();
                Ok(Rack { nodes, tokens })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RingRegistry { racks, read, write })
    }

    /// Sends `build(item)` for every item to the item's owner in each of `racks`, one pipeline
    /// per node, all nodes at once. Returns, per item, one answer per rack asked.
    async fn ask(
        &self,
        racks: &[usize],
        users: &[&str],
        build: impl Fn(usize) -> redis::Cmd,
    ) -> Vec<Vec<Answer<Value>>> {
        // (node, item indices) per pipeline; nodes are keyed by address within a rack.
        let mut batches: Vec<(Arc<Node>, Vec<usize>)> = Vec::new();
        for &r in racks {
            let mut per_node: HashMap<&str, usize> = HashMap::new();
            for (item, user) in users.iter().enumerate() {
                let node = self.racks[r].owner(user);
                let b = *per_node.entry(node.addr.as_str()).or_insert_with(|| {
                    batches.push((Arc::clone(node), Vec::new()));
                    batches.len() - 1
                });
                batches[b].1.push(item);
            }
        }
        let replies = join_all(batches.iter().map(|(node, items)| {
            let mut pipe = redis::pipe();
            for &i in items {
                pipe.add_command(build(i));
            }
            async move { node.pipeline::<Vec<Value>>(&pipe).await }
        }))
        .await;
        let mut out: Vec<Vec<Answer<Value>>> = vec![Vec::new(); users.len()];
        for ((node, items), reply) in batches.iter().zip(replies) {
            match reply {
                Ok(values) => {
                    for (&i, v) in items.iter().zip(values) {
                        out[i].push((node.addr.clone(), Ok(v)));
                    }
                }
                Err(e) => {
                    let why = ReplicaError::Node(Arc::new(e));
                    for &i in items {
                        out[i].push((node.addr.clone(), Err(why.clone())));
                    }
                }
            }
        }
        out
    }

    fn all_racks(&self) -> Vec<usize> {
        (0..self.racks.len()).collect()
    }

    /// Checks one item's answers against `level`; returns the successful ones.
    fn settle<T: PartialEq>(
        &self,
        op: &'static str,
        level: Consistency,
        answers: Vec<Answer<T>>,
    ) -> Result<Vec<(String, T)>> {
        let total = self.racks.len();
        let needed = level.needed(total);
        let mut ok = Vec::new();
        let mut failures = Vec::new();
        for (node, a) in answers {
            match a {
                Ok(v) => ok.push((node, v)),
                Err(why) => failures.push((node, why.to_string())),
            }
        }
        if ok.len() < needed {
            return Err(Error::Quorum {
                op,
                needed,
                total,
                succeeded: ok.len(),
                failures,
            });
        }
        if level == Consistency::SafeQuorum {
            let agreeing = ok
                .iter()
                .map(|(_, v)| ok.iter().filter(|(_, w)| w == v).count())
                .max()
                .unwrap_or(0);
            if agreeing < needed {
                return Err(Error::Disagreement {
                    op,
                    agreeing,
                    needed,
                    nodes: ok.into_iter().map(|(n, _)| n).collect(),
                });
            }
        }
        Ok(ok)
    }

    /// A write to every replica of every item, settled at the write consistency; per item, the
    /// integer replies of the replicas that answered.
    async fn write(
        &self,
        op: &'static str,
        users: &[&str],
        build: impl Fn(usize) -> redis::Cmd,
    ) -> Result<Vec<Vec<i64>>> {
        let answers = self.ask(&self.all_racks(), users, build).await;
        answers
            .into_iter()
            .map(|a| {
                let a = a
                    .into_iter()
                    .map(|(n, r)| (n, r.and_then(|v| int(&v))))
                    .collect();
                Ok(self
                    .settle(op, self.write, a)?
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect())
            })
            .collect()
    }

    /// Reads users' slots at the read consistency, repairing replicas as it goes.
    async fn read(&self, users: &[String]) -> Result<Vec<Vec<Record>>> {
        let now = now_ms();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        if self.read == Consistency::One {
            return self.read_one(&names, now).await;
        }
        let answers = self
            .ask(&self.all_racks(), &names, |i| store::lookup_cmd(names[i]))
            .await;
        let mut results = Vec::with_capacity(users.len());
        let mut repairs: Vec<(Arc<Node>, redis::Cmd)> = Vec::new();
        let mut first_error = None;
        for (user, answers) in names.iter().zip(answers) {
            let decoded = answers
                .into_iter()
                .map(|(node, a)| (node.clone(), a.and_then(|v| decode(&node, user, v, now))))
                .collect();
            // Settle at plain quorum first: safe_quorum's agreement is judged after the merge,
            // so that disagreeing replicas get repaired even when the read fails.
            let ok = match self.settle("lookup", Consistency::Quorum, decoded) {
                Ok(ok) => ok,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let merged = merge(ok.iter().map(|(_, slots)| slots));
            for (node, slots) in &ok {
                for (field, winner) in &merged {
                    if slots.get(field) != Some(winner) {
                        repairs.push((self.node(node), store::repair_cmd(field, winner, now)));
                    }
                }
            }
            let agreeing = ok.iter().filter(|(_, s)| *s == merged).count();
            let needed = self.read.needed(self.racks.len());
            if self.read == Consistency::SafeQuorum && agreeing < needed {
                first_error.get_or_insert(Error::Disagreement {
                    op: "lookup",
                    agreeing,
                    needed,
                    nodes: ok.into_iter().map(|(n, _)| n).collect(),
                });
                continue;
            }
            results.push(store::live_records(&merged, now));
        }
        // Repair is best effort: the read has its answer already, and a replica that fails
        // now is repaired by a later read.
        join_all(
            repairs
                .iter()
                .map(|(node, cmd)| async move { node.query::<i64>(cmd).await }),
        )
        .await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// `one`: the first rack that answers for each user, in rack order.
    async fn read_one(&self, users: &[&str], now: u64) -> Result<Vec<Vec<Record>>> {
        let mut results: Vec<Option<Vec<Record>>> = vec![None; users.len()];
        let mut failures: Vec<Vec<(String, String)>> = vec![Vec::new(); users.len()];
        for rack in 0..self.racks.len() {
            let pending: Vec<usize> = (0..users.len()).filter(|&i| results[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            let names: Vec<&str> = pending.iter().map(|&i| users[i]).collect();
            let answers = self
                .ask(&[rack], &names, |i| store::lookup_cmd(names[i]))
                .await;
            for (&i, mut answer) in pending.iter().zip(answers) {
                let Some((node, a)) = answer.pop() else {
                    continue;
                };
                match a.and_then(|v| decode(&node, users[i], v, now)) {
                    Ok(slots) => results[i] = Some(store::live_records(&slots, now)),
                    Err(why) => failures[i].push((node, why.to_string())),
                }
            }
        }
        results
            .into_iter()
            .zip(failures)
            .map(|(r, failures)| {
                r.ok_or(Error::Quorum {
                    op: "lookup",
                    needed: 1,
                    total: self.racks.len(),
                    succeeded: 0,
                    failures,
                })
            })
            .collect()
    }

    /// Number of racks (every rack is a full replica).
    pub(crate) fn rack_count(&self) -> usize {
        self.racks.len()
    }

    /// The node of rack `rack` that owns `user`.
    pub(crate) fn owner(&self, rack: usize, user: &str) -> &Arc<Node> {
        self.racks[rack].owner(user)
    }

    /// The consistency writes are settled at.
    pub(crate) fn write_consistency(&self) -> Consistency {
        self.write
    }

    fn node(&self, addr: &str) -> Arc<Node> {
        self.racks
            .iter()
            .flat_map(|r| &r.nodes)
            .find(|n| n.addr == addr)
            .map(Arc::clone)
            .expect("answers come from ring nodes")
    }

    fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.racks.iter().flat_map(|r| &r.nodes)
    }
}

fn int(v: &Value) -> std::result::Result<i64, ReplicaError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(ReplicaError::UnexpectedReply(other.clone())),
    }
}

fn decode(
    node: &str,
    user: &str,
    v: Value,
    now: u64,
) -> std::result::Result<HashMap<String, Entry>, ReplicaError> {
    let raw: store::RawSlots =
        redis::FromRedisValue::from_redis_value(v).map_err(|e| ReplicaError::Parse(Arc::new(e)))?;
    store::decode_slots(node, user, raw, now).map_err(|e| ReplicaError::Corrupt(Arc::new(e)))
}

/// The newest version of every slot across replicas.
fn merge<'a>(replicas: impl Iterator<Item = &'a HashMap<String, Entry>>) -> HashMap<String, Entry> {
    let mut merged: HashMap<String, Entry> = HashMap::new();
    for slots in replicas {
        for (field, entry) in slots {
            match merged.get(field) {
                Some(have) if have.version() >= entry.version() => {}
                _ => {
                    merged.insert(field.clone(), entry.clone());
                }
            }
        }
    }
    merged
}

#[async_trait]
impl Registry for RingRegistry {
    async fn register(&self, record: &Record, ttl: Duration) -> Result<()> {
        let now = now_ms();
        self.write("register", &[&record.user], |_| {
            store::register_cmd(record, ttl, now)
        })
        .await?;
        Ok(())
    }

    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>> {
        let now = now_ms();
        let users: Vec<&str> = records.iter().map(|r| r.user.as_str()).collect();
        let replies = self
            .write("refresh", &users, |i| {
                store::refresh_cmd(&records[i], ttl, now)
            })
            .await?;
        // One replica that holds a newer connection is enough to know this one lost: the
        // others missed that registration (and read repair will bring it to them).
        Ok(replies
            .into_iter()
            .map(|r| {
                if r.contains(&0) {
                    RefreshOutcome::Superseded
                } else {
                    RefreshOutcome::Owned
                }
            })
            .collect())
    }

    async fn lookup(&self, user: &str) -> Result<Vec<Record>> {
        Ok(self
            .read(&[user.to_string()])
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn lookup_many(&self, users: &[String]) -> Result<Vec<Vec<Record>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        self.read(users).await
    }

    async fn unregister(&self, user: &str, device: Option<&str>, conn_id: &str) -> Result<bool> {
        let now = now_ms();
        let field = field_name(device, conn_id);
        let replies = self
            .write("unregister", &[user], |_| {
                store::unregister_cmd(user, &field, conn_id, now, Removal::Tombstone)
            })
            .await?;
        Ok(replies.iter().flatten().any(|&r| r == 1))
    }

    async fn stats(&self) -> Result<Stats> {
        // Every rack is a full copy, so the union of what any node holds is every user; nodes
        // that are down are skipped as long as some answer.
        let scans = join_all(self.nodes().map(|n| n.scan_users())).await;
        let mut users = Vec::new();
        let mut last_error = None;
        for scan in scans {
            match scan {
                Ok(u) => users.extend(u),
                Err(e) => last_error = Some(e),
            }
        }
        if users.is_empty() {
            if let Some(e) = last_error {
                return Err(e);
            }
        }
        users.sort();
        users.dedup();
        let mut stats = Stats::default();
        for batch in users.chunks(500) {
            for records in self.read(batch).await? {
                stats.add(&records);
            }
        }
        Ok(stats)
    }

    async fn ping(&self) -> Vec<NodePing> {
        join_all(self.nodes().map(|n| n.ping())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(nodes_per_rack: usize) -> RingRegistry {
        let racks: Vec<(String, Vec<String>)> = (0..3)
            .map(|r| {
                let nodes = (0..nodes_per_rack)
                    .map(|n| format!("127.0.0.1:{}", 1000 + r * 10 + n))
                    .collect();
                (format!("r{r}"), nodes)
            })
            .collect();
        RingRegistry::new(
            &racks,
            Consistency::Quorum,
            Consistency::Quorum,
            Timeouts::default(),
        )
        .unwrap()
    }

    #[test]
    fn users_spread_over_every_node_of_a_rack() {
        let ring = ring(4);
        let mut counts = HashMap::new();
        for u in 0..4000 {
            *counts
                .entry(ring.racks[0].owner(&format!("user-{u}")).addr.clone())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        // murmur3 spreads evenly: each node gets roughly a quarter.
        assert!(
            counts.values().all(|&c| (700..1300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!(Consistency::Quorum.needed(3), 2);
        assert_eq!(Consistency::SafeQuorum.needed(2), 2);
        assert_eq!(Consistency::One.needed(3), 1);
    }

    #[test]
    fn merge_takes_newest_and_tombstones_win_ties() {
        let rec = |conn: &str, at: u64| Record {
            user: "u".into(),
            device: Some("d".into()),
            node_id: "n".into(),
            node_addr: "a".into(),
            conn_id: conn.into(),
            connected_at: at,
        };
        let old = Entry::new(&rec("c1", 1), Duration::from_secs(60), 10);
        let new = Entry::new(&rec("c2", 2), Duration::from_secs(60), 10);
        let mut tomb = old.clone();
        tomb.del = true;
        let a = HashMap::from([("d:d".to_string(), old.clone())]);
        let b = HashMap::from([("d:d".to_string(), new.clone())]);
        let c = HashMap::from([("d:d".to_string(), tomb.clone())]);
        assert_eq!(merge([&a, &b].into_iter())["d:d"], new);
        assert_eq!(merge([&c, &a].into_iter())["d:d"], tomb);
        assert_eq!(merge([&a, &c].into_iter())["d:d"], tomb);
    }
}
