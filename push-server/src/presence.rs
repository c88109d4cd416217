//! Presence: keeps the registry (push-registry) in step with this node's connections, so
//! that the message processor can find which node holds a user.
//!
//! - A connection is registered when it is accepted and unregistered when it closes
//!   (compare-and-delete: a closing connection never removes its successor's entry).
//! - Writes go through one writer task fed by a bounded channel: the connect path only
//!   enqueues, a burst of connects becomes concurrent registry calls, and a connection that
//!   comes and goes within one batch costs no registry call at all.
//! - Every record is refreshed on a jittered schedule well inside its TTL, so that the records
//!   of a node that crashes expire by themselves. A refresh that finds a newer connection in a
//!   slot (the client moved to another node) retires the local one like a local takeover:
//!   no more messages, and the reconnect grace period to close.
//! - Registry failures never refuse or drop clients: they are logged and counted, and the
//!   next refresh writes the missing entries again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use push_registry::{Record, RefreshOutcome, Registry};
use tokio::sync::{mpsc, oneshot};

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
                refresh_all(&hub, clock, &presence).await;
            }
        })
    }
}

async fn writer(mut rx: mpsc::Receiver<Event>, registry: Arc<dyn Registry>, ttl: Duration) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
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
                dyn std::future::Future<Output = (&'static str, push_registry::Result<()>)>
                    + Send
                    + 'a,
            >,
        >;
        let mut calls: Vec<Call<'_>> = Vec::with_capacity(batch.len());
        for (i, e) in batch.iter().enumerate() {
            match e {
                Event::Register(r, _) if !skip(i, &r.conn_id) => {
                    let registry = &registry;
                    calls.push(Box::pin(async move {
                        ("register", registry.register(r, ttl).await)
                    }));
                }
                Event::Unregister {
                    user,
                    device,
                    conn_id,
                } if !skip(i, conn_id) => {
                    let registry = &registry;
                    calls.push(Box::pin(async move {
                        let res = registry.unregister(user, device.as_deref(), conn_id).await;
                        ("unregister", res.map(|_| ()))
                    }));
                }
                _ => {}
            }
        }
        for (op, res) in futures_util::future::join_all(calls).await {
            metrics::counter!(m::REGISTRY_OPS, "op" => op).increment(1);
            if let Err(e) = res {
                metrics::counter!(m::REGISTRY_ERRORS, "op" => op).increment(1);
                tracing::warn!(op, error = %e, "registry write failed; the next refresh retries");
            }
        }
        for e in batch.drain(..) {
            if let Event::Register(_, Some(done)) = e {
                let _ = done.send(());
            }
        }
    }
}

async fn refresh_all(hub: &Hub, clock: NodeClock, presence: &Presence) {
    let mut handles = Vec::new();
    hub.for_each(|c| {
        if !c.state().superseded {
            handles.push(c.clone());
        }
    });
    for chunk in handles.chunks(REFRESH_CHUNK) {
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
