//! Presence: keeps the registry (push-registry) in step with this node's connections, so
//! that the message processor can find which node holds a user.
//!
//! - A connection is registered when it is accepted and unregistered when it closes
//!   (compare-and-delete: a closing connection never removes its successor's entry).
//! - Writes go through one writer task fed by a bounded channel: the connect path only
//!   enqueues, a burst of connects becomes concurrent registry calls, and a connection that
//!   comes and goes within one batch costs no registry call at all.
//! - Every record is refreshed on a jittered schedule well inside its TTL, so that the records
//!   of a node that crashes expire by themselves. A pass is spread over half the period, a
//!   chunk at a time, so that a fleet's refreshes reach the registry as a steady flow. A
//!   refresh that finds a newer connection in a slot (the client moved to another node)
//!   retires the local one like a local takeover: no more messages, and the reconnect grace
//!   period to close.
//! - Registry failures never refuse or drop clients: they are logged and counted. A failed
//!   registration is tried again after 1, 2, 4… seconds (as a refresh, which never takes a
//!   slot from another live connection) until it is written, the connection closes, or the
//!   next periodic refresh, which writes every missing entry, comes first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use push_registry::{Record, RefreshOutcome, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::NodeClock;
use crate::hub::{ConnHandle, Hub};
use crate::metrics as m;

/// Events waiting for the writer. At about 200 bytes each, a full queue is 13 MB: enough for
/// a reconnect storm of a whole node while the registry is slow, and still bounded.
const QUEUE: usize = 65_536;

/// Registry calls the writer has in flight at once.
const BATCH: usize = 512;

/// Records per refresh call: one round trip per storage node each.
const REFRESH_CHUNK: usize = 1000;

/// Share of the refresh period over which one pass is spread. Sent at once, 60 nodes of
/// 17,000 connections each queued ~60,000 refreshes in one Redis within seconds, and the
/// registrations of new connections queued behind them timed out (docs/BENCHMARKS.md, the
/// million, run 12). A record is then refreshed at most 1.2 + 0.5 periods apart (the
/// period's jitter, then its place in the pass): well inside the TTL of three periods.
const REFRESH_SPREAD: f64 = 0.5;

enum Event {
    /// A new connection's record; the sender, if any, hears when the write was attempted.
    Register(Record, Option<oneshot::Sender<()>>),
    Unregister {
        user: String,
        device: Option<String>,
        conn_id: String,
    },
}

/// This node's link to the registry.
pub struct Presence {
    registry: Arc<dyn Registry>,
    tx: mpsc::Sender<Event>,
    node_id: String,
    node_addr: String,
    /// Makes connection IDs unique across nodes and restarts of one node.
    boot: String,
    ttl: Duration,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("registry", &self.registry)
            .field("node_addr", &self.node_addr)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Presence {
    /// Starts the writer task; the refresher is started by [`Presence::spawn_refresher`].
    pub fn start(
        registry: Arc<dyn Registry>,
        node_id: &str,
        node_addr: String,
        ttl: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(rx, registry.clone(), ttl));
        Self {
            registry,
            tx,
            node_id: node_id.to_owned(),
            node_addr,
            boot: format!("{node_id}-{:08x}", rand::random::<u32>()),
            ttl,
        }
    }

    /// The registry behind this presence.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// The connection ID under which `handle` is registered.
    pub fn conn_id(&self, handle: &ConnHandle) -> String {
        format!("{}-{}", self.boot, handle.id)
    }

    fn record(&self, handle: &ConnHandle) -> Record {
        Record {
            user: handle.user.to_string(),
            device: handle.device.as_deref().map(str::to_owned),
            node_id: self.node_id.clone(),
            node_addr: self.node_addr.clone(),
            conn_id: self.conn_id(handle),
            connected_at: handle.connected_at_unix_ms,
        }
    }

    /// Queues the registration of a new connection. Waits only if the queue is full.
    pub async fn register(&self, handle: &ConnHandle) {
        self.send_register(handle, None).await;
    }

    /// Registers a new connection and waits until the registry write was attempted (written,
    /// or failed and counted). A resuming connection reads the history only after this: a
    /// message appended later is then routed to this connection by whoever looks the user
    /// up after appending (the message processor, or a node forwarding an admin push).
    pub async fn register_and_wait(&self, handle: &ConnHandle) {
        let (tx, rx) = oneshot::channel();
        self.send_register(handle, Some(tx)).await;
        let _ = rx.await;
    }

    async fn send_register(&self, handle: &ConnHandle, done: Option<oneshot::Sender<()>>) {
        if self
            .tx
            .send(Event::Register(self.record(handle), done))
            .await
            .is_err()
        {
            metrics::counter!(m::REGISTRY_ERRORS, "op" => "register").increment(1);
        }
    }

    /// Queues the removal of a closed connection's entry. Never blocks (it runs in `Drop`).
    pub fn unregister(&self, handle: &ConnHandle) {
        let event = Event::Unregister {
            user: handle.user.to_string(),
            device: handle.device.as_deref().map(str::to_owned),
            conn_id: self.conn_id(handle),
        };
        if let Err(mpsc::error::TrySendError::Full(event)) = self.tx.try_send(event) {
            // Rare (the registry is stalled): wait for room off the caller's path.
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(event).await;
            });
        }
    }

    /// Starts the periodic refresh of every local connection's record.
    pub fn spawn_refresher(
        presence: Arc<Self>,
        hub: Arc<Hub>,
        clock: NodeClock,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // A third of the TTL leaves two more tries before a record lapses.
            let base = presence.ttl / 3;
            loop {
                // Jittered so that the nodes of a fleet started together do not refresh in step.
                let jitter = 0.8 + 0.4 * rand::random::<f64>();
                tokio::time::sleep(base.mul_f64(jitter)).await;
                refresh_all(&hub, clock, &presence, base.mul_f64(REFRESH_SPREAD)).await;
            }
        })
    }
}

/// A registration that failed, tried again until it is written, its connection closes, or
/// the next periodic refresh would come before the next try.
struct Retry {
    at: Instant,
    record: Record,
    /// The wait before the next try, should this one fail too.
    backoff: Duration,
}

async fn writer(mut rx: mpsc::Receiver<Event>, registry: Arc<dyn Registry>, ttl: Duration) {
    let mut batch = Vec::with_capacity(BATCH);
    // By connection ID. Without a retry, a connection whose registration failed cannot be
    // found (a message for its user is only stored) until the next refresh, a third of the
    // TTL later (run 12 of the million: 1,466 such failures in its 10-minute hold).
    let mut retries: HashMap<String, Retry> = HashMap::new();
    let refresh_period = ttl / 3;
    loop {
        let due = retries.values().map(|r| r.at).min();
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        // A connection that closed is not written again.
        for e in &batch {
            if let Event::Unregister { conn_id, .. } = e {
                retries.remove(conn_id);
            }
        }
        let failed = write_batch(&batch, &registry, ttl).await;
        let now = Instant::now();
        for i in failed {
            if let Event::Register(r, _) = &batch[i] {
                let retry = Retry {
                    at: now + RETRY_FIRST,
                    record: r.clone(),
                    backoff: RETRY_FIRST * 2,
                };
                retries.insert(r.conn_id.clone(), retry);
            }
        }
        for e in batch.drain(..) {
            if let Event::Register(_, Some(done)) = e {
                let _ = done.send(());
            }
        }
        retry_due(&mut retries, &registry, ttl, refresh_period).await;
    }
}

/// First wait before a failed registration is tried again; doubled after each failure.
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// Writes one batch of events; returns the indices of the registrations that failed.
async fn write_batch(batch: &[Event], registry: &Arc<dyn Registry>, ttl: Duration) -> Vec<usize> {
    // A connection registered and gone within one batch needs no registry call.
    let mut net: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, e) in batch.iter().enumerate() {
        match e {
            Event::Register(r, _) => {
                net.entry(&r.conn_id).or_insert((usize::MAX, usize::MAX)).0 = i
            }
            Event::Unregister { conn_id, .. } => {
                net.entry(conn_id).or_insert((usize::MAX, usize::MAX)).1 = i
            }
        }
    }
    let skip = |i: usize, conn_id: &str| {
        let (reg, unreg) = net[conn_id];
        reg != usize::MAX && unreg != usize::MAX && (i == reg || i == unreg)
    };
    type Call<'a> = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = (usize, &'static str, push_registry::Result<()>)>
                + Send
                + 'a,
        >,
    >;
    let mut calls: Vec<Call<'_>> = Vec::with_capacity(batch.len());
    for (i, e) in batch.iter().enumerate() {
        match e {
            Event::Register(r, _) if !skip(i, &r.conn_id) => {
                calls.push(Box::pin(async move {
                    (i, "register", registry.register(r, ttl).await)
                }));
            }
            Event::Unregister {
                user,
                device,
                conn_id,
            } if !skip(i, conn_id) => {
                calls.push(Box::pin(async move {
                    let res = registry.unregister(user, device.as_deref(), conn_id).await;
                    (i, "unregister", res.map(|_| ()))
                }));
            }
            _ => {}
        }
    }
    let mut failed = Vec::new();
    for (i, op, res) in futures_util::future::join_all(calls).await {
        metrics::counter!(m::REGISTRY_OPS, "op" => op).increment(1);
        if let Err(e) = res {
            metrics::counter!(m::REGISTRY_ERRORS, "op" => op).increment(1);
            if op == "register" {
                tracing::warn!(op, error = %e, retry_in = ?RETRY_FIRST, "registry write failed");
                failed.push(i);
            } else {
                // A record left behind expires, and a newer registration replaces it.
                tracing::warn!(op, error = %e, "registry write failed; the record expires by itself");
            }
        }
    }
    failed
}

/// Tries the registrations that are due again, as a refresh: it writes a record whose slot
/// is empty and never takes a slot from another live connection (the newer connection of
/// the same device, or the older one still closing: then it is tried again later).
async fn retry_due(
    retries: &mut HashMap<String, Retry>,
    registry: &Arc<dyn Registry>,
    ttl: Duration,
    refresh_period: Duration,
) {
    let now = Instant::now();
    let ids: Vec<String> = retries
        .iter()
        .filter(|(_, r)| r.at <= now)
        .map(|(id, _)| id.clone())
        .collect();
    if ids.is_empty() {
        return;
    }
    let due: Vec<Retry> = ids.iter().filter_map(|id| retries.remove(id)).collect();
    for chunk in due.chunks(REFRESH_CHUNK) {
        let records: Vec<Record> = chunk.iter().map(|r| r.record.clone()).collect();
        metrics::counter!(m::REGISTRY_OPS, "op" => "register_retry").increment(1);
        let written: Vec<bool> = match registry.refresh(&records, ttl).await {
            Ok(outcomes) => outcomes
                .into_iter()
                .map(|o| o == RefreshOutcome::Owned)
                .collect(),
            Err(e) => {
                metrics::counter!(m::REGISTRY_ERRORS, "op" => "register_retry").increment(1);
                tracing::warn!(error = %e, records = records.len(), "registry write failed again");
                vec![false; records.len()]
            }
        };
        let now = Instant::now();
        for (r, written) in chunk.iter().zip(written) {
            if written {
                continue;
            }
            // The periodic refresh comes first: it takes over.
            if r.backoff > refresh_period {
                continue;
            }
            let retry = Retry {
                at: now + r.backoff,
                record: r.record.clone(),
                backoff: r.backoff * 2,
            };
            retries.insert(r.record.conn_id.clone(), retry);
        }
    }
}

/// Refreshes every live connection's record, `REFRESH_CHUNK` at a time, the chunks spread
/// evenly over `spread`.
async fn refresh_all(hub: &Hub, clock: NodeClock, presence: &Presence, spread: Duration) {
    let mut handles = Vec::new();
    hub.for_each(|c| {
        if !c.state().superseded {
            handles.push(c.clone());
        }
    });
    let chunks = handles.len().div_ceil(REFRESH_CHUNK);
    let start = tokio::time::Instant::now();
    for (i, chunk) in handles.chunks(REFRESH_CHUNK).enumerate() {
        if i > 0 {
            tokio::time::sleep_until(start + spread.mul_f64(i as f64 / chunks as f64)).await;
        }
        // Closed since the pass began: a refresh would write its record again.
        let chunk: Vec<&Arc<ConnHandle>> = chunk
            .iter()
            .filter(|h| !h.is_closing() && !h.state().superseded)
            .collect();
        if chunk.is_empty() {
            continue;
        }
        let records: Vec<Record> = chunk.iter().map(|h| presence.record(h)).collect();
        metrics::counter!(m::REGISTRY_OPS, "op" => "refresh").increment(1);
        match presence.registry.refresh(&records, presence.ttl).await {
            Ok(outcomes) => {
                for (handle, outcome) in chunk.iter().zip(outcomes) {
                    if outcome == RefreshOutcome::Superseded {
                        // The client opened a newer connection on another node.
                        handle.supersede(clock.now());
                    }
                }
            }
            Err(e) => {
                metrics::counter!(m::REGISTRY_ERRORS, "op" => "refresh").increment(1);
                tracing::warn!(error = %e, records = records.len(), "registry refresh failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Transport;
    use crate::lifecycle::Policy;
    use push_registry::{MemoryRegistry, NodePing, Stats};
    use std::sync::Mutex;

    /// The in-memory registry, noting when each refresh call reached it and its size.
    #[derive(Debug)]
    struct Noting {
        inner: MemoryRegistry,
        refreshes: Mutex<Vec<(Instant, usize)>>,
    }

    #[async_trait::async_trait]
    impl Registry for Noting {
        async fn register(&self, record: &Record, ttl: Duration) -> push_registry::Result<()> {
            self.inner.register(record, ttl).await
        }
        async fn refresh(
            &self,
            records: &[Record],
            ttl: Duration,
        ) -> push_registry::Result<Vec<RefreshOutcome>> {
            let at = (Instant::now(), records.len());
            self.refreshes.lock().unwrap().push(at);
            self.inner.refresh(records, ttl).await
        }
        async fn lookup(&self, user: &str) -> push_registry::Result<Vec<Record>> {
            self.inner.lookup(user).await
        }
        async fn lookup_many(&self, users: &[String]) -> push_registry::Result<Vec<Vec<Record>>> {
            self.inner.lookup_many(users).await
        }
        async fn unregister(
            &self,
            user: &str,
            device: Option<&str>,
            conn_id: &str,
        ) -> push_registry::Result<bool> {
            self.inner.unregister(user, device, conn_id).await
        }
        async fn stats(&self) -> push_registry::Result<Stats> {
            self.inner.stats().await
        }
        async fn ping(&self) -> Vec<NodePing> {
            self.inner.ping().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_pass_goes_out_a_chunk_at_a_time_and_skips_closed_connections() {
        let hub = Hub::new();
        let conns: Vec<Arc<ConnHandle>> = (0..2_500)
            .map(|i| {
                assert!(hub.reserve(Transport::Ws, 10_000));
                let h = Arc::new(ConnHandle::new(
                    hub.next_conn_id(),
                    format!("user-{i}").into(),
                    None,
                    Transport::Ws,
                    "127.0.0.1:1".parse().unwrap(),
                    Policy::default().new_clock(0, 0.5),
                    0,
                ));
                hub.register(h.clone(), 0).unwrap();
                h
            })
            .collect();
        let registry = Arc::new(Noting {
            inner: MemoryRegistry::new(10_000),
            refreshes: Mutex::new(Vec::new()),
        });
        let presence = Presence::start(
            registry.clone(),
            "n1",
            "127.0.0.1:1".into(),
            Duration::from_secs(600),
        );
        // Closed after the pass took its list: its record is not written again.
        conns[2_400].discard();
        let start = Instant::now();
        refresh_all(&hub, NodeClock::start(), &presence, Duration::from_secs(90)).await;

        let calls = registry.refreshes.lock().unwrap().clone();
        let sizes: usize = calls.iter().map(|c| c.1).sum();
        assert_eq!(sizes, 2_499, "every open connection once: {calls:?}");
        let offsets: Vec<u64> = calls.iter().map(|c| (c.0 - start).as_secs()).collect();
        assert_eq!(offsets, [0, 30, 60], "3 chunks spread over 90 s");
        let closed = &conns[2_400].user;
        assert!(registry.inner.lookup(closed).await.unwrap().is_empty());
        assert_eq!(registry.inner.lookup("user-2401").await.unwrap().len(), 1);
    }
}
