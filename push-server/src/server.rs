//! The node: binds both ports, runs the accept loop, the admin API and the sweeper, and
//! drains on request.
//!
//! [`Server::start`] returns once both ports are bound, so tests can read the addresses of
//! ports bound to 0. [`Server::drain`] starts a drain; [`Server::drained`] resolves when the
//! last client has gone or the drain deadline has passed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;

use push_registry::{BufferLimits, MemoryStore, MessageStore};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::{ConnHandle, Hub, Outbound, QueueLimits, Transport};
use crate::lifecycle::{Action, Millis};
use crate::metrics as m;
use crate::protocol::message::{ReconnectReason, ServerMessage};
use crate::protocol::{sse, ws};
use crate::ratelimit::{PerSource, RateLimiter};
use crate::{admin, listener};

/// The `--registry` value for a node that registers nowhere: pushes reach it only through its
/// own admin API. Saves the registry's memory on a single node without a message processor.
pub const NO_REGISTRY: &str = "none";

/// Most IPs the per-IP rate limiter tracks at once (about 64 bytes each).
const RATE_LIMIT_MAX_IPS: usize = 100_000;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A port could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which port: "client" or "admin".
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The registry could not be opened.
    #[error("cannot open the registry: {0}")]
    Registry(#[from] push_registry::Error),
    /// The Kafka producer for receipts could not be created.
    #[error("cannot create the receipts producer for {brokers}: {source}")]
    Receipts {
        /// The configured brokers.
        brokers: String,
        /// librdkafka's complaint.
        source: rdkafka::error::KafkaError,
    },
}

/// Metric handles used on the hot path, resolved once instead of per message.
#[derive(Debug)]
pub(crate) struct HotMetrics {
    pub delivered: [metrics::Counter; 2],
    pub latency: metrics::Histogram,
    pub open: [metrics::Gauge; 2],
}

/// State shared by every task of a node.
#[derive(Debug)]
pub struct Shared {
    /// The node's settings.
    pub config: Config,
    /// Local connections by user.
    pub hub: Hub,
    /// Token verification.
    pub auth: Authenticator,
    pub(crate) limits: QueueLimits,
    pub(crate) epoch: tokio::time::Instant,
    /// `u64::MAX` while not draining, else the drain's start in [`Millis`].
    drain_started: AtomicU64,
    pub(crate) rate_limiter: Mutex<RateLimiter>,
    /// Handshakes in progress per source (`--max-pending-per-ip`).
    pub(crate) pending_per_ip: Mutex<PerSource>,
    /// Open connections (and reservations) per source (`--max-connections-per-ip`).
    pub(crate) conns_per_ip: Mutex<PerSource>,
    /// Connections in their handshake now.
    pub pending_handshakes: AtomicUsize,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) hot: HotMetrics,
    /// The registry link.
    pub presence: Option<crate::presence::Presence>,
    /// Users' recent messages, for resume; the source of message IDs.
    pub store: Arc<dyn MessageStore>,
    /// Per-user order of appends and queueing.
    pub(crate) sequencer: crate::push::Sequencer,
    /// Acknowledgements and receipt waiters.
    pub receipts: Arc<crate::receipts::Receipts>,
    /// Hands admin pushes to the nodes that hold their users.
    pub(crate) forwarder: crate::forward::Forwarder,
    /// Prebuilt frames: `[reason][transport]` for `reconnect`.
    reconnect_frames: [[Bytes; 2]; 2],
}

impl Shared {
    fn new(
        config: Config,
        secret: &str,
        presence: Option<crate::presence::Presence>,
        store: Arc<dyn MessageStore>,
    ) -> Self {
        let prometheus = m::install();
        let grace_ms = config.lifecycle.reconnect_grace.as_millis() as u64;
        let frames = |reason| {
            let msg = ServerMessage::Reconnect { reason, grace_ms };
            [msg.ws_frame(), msg.sse_event()]
        };
        metrics::gauge!(m::CONNECTIONS_CAPACITY).set(config.max_connections as f64);
        metrics::gauge!(m::DRAINING).set(0.0);
        Self {
            auth: Authenticator::new(secret.as_bytes(), config.require_exp).with_issuer_audience(
                config.admin_security.token_issuer.as_deref(),
                config.admin_security.token_audience.as_deref(),
            ),
            limits: QueueLimits {
                max_frames: config.max_queue,
                max_bytes: config.max_queue_bytes,
                policy: config.slow_consumer,
                slow_after: config.slow_consumer_timeout,
            },
            rate_limiter: Mutex::new(RateLimiter::new(
                config.per_ip_rate,
                config.per_ip_burst,
                RATE_LIMIT_MAX_IPS,
            )),
            pending_per_ip: Mutex::new(PerSource::new(config.max_pending_per_ip)),
            conns_per_ip: Mutex::new(PerSource::new(config.max_connections_per_ip)),
            reconnect_frames: [
                frames(ReconnectReason::Rotate),
                frames(ReconnectReason::Drain),
            ],
            hot: HotMetrics {
                delivered: [
                    metrics::counter!(m::MESSAGES_DELIVERED, "transport" => "ws"),
                    metrics::counter!(m::MESSAGES_DELIVERED, "transport" => "sse"),
                ],
                latency: metrics::histogram!(m::DELIVERY_LATENCY),
                open: [
                    metrics::gauge!(m::CONNECTIONS_OPEN, "transport" => "ws"),
                    metrics::gauge!(m::CONNECTIONS_OPEN, "transport" => "sse"),
                ],
            },
            presence,
            store,
            sequencer: crate::push::Sequencer::new(),
            receipts: Arc::new(crate::receipts::Receipts::new()),
            forwarder: crate::forward::Forwarder::new(
                config
                    .admin_security
                    .internal_secret
                    .as_deref()
                    .or(config.admin_token.as_deref()),
                config.admin_security.peer_nets.clone(),
            ),
            config,
            hub: Hub::new(),
            epoch: tokio::time::Instant::now(),
            drain_started: AtomicU64::new(u64::MAX),
            pending_handshakes: AtomicUsize::new(0),
            prometheus,
        }
    }

    /// Milliseconds since the node started (tokio's clock, so paused time applies).
    pub fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    /// When the drain started, if one is in progress.
    pub fn draining(&self) -> Option<Millis> {
        match self.drain_started.load(Ordering::Acquire) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    /// Gives back a connection's place: its transport's reservation and its source's count.
    pub(crate) fn release_slot(&self, transport: Transport, ip: std::net::IpAddr) {
        self.hub.release(transport);
        self.conns_per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(ip);
    }

    /// Whether the node is at capacity.
    pub fn at_capacity(&self) -> bool {
        self.hub.open_total() >= self.config.max_connections
    }

    /// Starts a drain now (idempotent).
    pub fn begin_drain(&self) {
        let now = self.now();
        if self
            .drain_started
            .compare_exchange(u64::MAX, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            metrics::gauge!(m::DRAINING).set(1.0);
            tracing::info!(
                connections = self.hub.open_total(),
                window = ?self.config.lifecycle.drain_window,
                "drain started: spreading reconnect over the window"
            );
            // Every connection must be looked at again to get its drain slot.
            self.hub
                .for_each(|c| c.next_due.store(0, Ordering::Relaxed));
        }
    }

    /// Time after which a drain stops waiting for clients.
    fn drain_deadline(&self, started: Millis) -> Millis {
        let l = &self.config.lifecycle;
        started
            + (l.drain_window + l.reconnect_grace + Duration::from_secs(1)).as_millis() as Millis
    }

    pub(crate) fn reconnect_frame(&self, reason: ReconnectReason, t: Transport) -> Bytes {
        let r = match reason {
            ReconnectReason::Rotate => 0,
            ReconnectReason::Drain => 1,
        };
        let i = t.index();
        self.reconnect_frames[r][i].clone()
    }

    /// One pass of lifecycle checks over every connection.
    pub(crate) fn sweep(&self) {
        let now = self.now();
        let drain = self.draining();
        let policy = &self.config.lifecycle;
        self.hub.for_each(|c| {
            if now < c.next_due.load(Ordering::Relaxed) {
                return;
            }
            let hears = c.transport == Transport::Ws;
            let slot = drain.map(|d| policy.drain_slot(c.id, d));
            let action = {
                let mut st = c.state();
                let action = policy.on_tick(&mut st.clock, now, slot, hears);
                c.next_due
                    .store(policy.next_due(&st.clock, slot, hears), Ordering::Relaxed);
                action
            };
            self.apply(c, action);
        });
    }

    fn apply(&self, c: &ConnHandle, action: Action) {
        let bytes = match action {
            Action::Nothing => return,
            Action::Close(reason) => return c.close(reason),
            Action::Heartbeat => match c.transport {
                Transport::Ws => Bytes::from_static(PING_FRAME),
                Transport::Sse => Bytes::from_static(sse::HEARTBEAT),
            },
            Action::AskReconnect(reason) => self.reconnect_frame(reason, c.transport),
        };
        c.enqueue(Outbound::control(bytes), self.limits);
    }
}

/// An empty WebSocket ping: `0x89 0x00`.
const PING_FRAME: &[u8] = &[0x89, 0x00];

/// A running node.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
    secret: String,
    secret_generated: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Validates `config`, binds both ports and starts serving.
    pub async fn start(mut config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let (secret, secret_generated) = match config.auth_secret.take() {
            Some(s) => (s, false),
            None => (random_secret(), true),
        };
        let client =
            listener::bind(config.listen, config.reuse_port, config.backlog).map_err(|source| {
                StartError::Bind {
                    addr: config.listen,
                    what: "client",
                    source,
                }
            })?;
        let admin = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.admin_listen,
                what: "admin",
                source,
            })?;
        let client_addr = client.local_addr().expect("bound socket has an address");
        let admin_addr = admin.local_addr().expect("bound socket has an address");
        let presence = if config.registry == NO_REGISTRY {
            None
        } else {
            let registry = push_registry::open(&config.registry).await?;
            let node_addr = config
                .advertise_addr
                .clone()
                .unwrap_or_else(|| admin_addr.to_string());
            Some(crate::presence::Presence::start(
                registry,
                &config.node_id,
                node_addr,
                config.registry_ttl,
            ))
        };
        let limits = BufferLimits {
            max_messages: config.history_messages,
            max_age: config.history_age,
        };
        // The history lives in the registry's storage; a node without a registry keeps it
        // in memory, like the embedded default.
        let (store, memory_store): (Arc<dyn MessageStore>, _) =
            if config.registry == NO_REGISTRY || config.registry.starts_with("memory") {
                let m = Arc::new(MemoryStore::new(limits));
                (m.clone(), Some(m))
            } else {
                (
                    push_registry::open_store(&config.registry, limits).await?,
                    None,
                )
            };
        let kafka = match &config.receipts_brokers {
            None => None,
            Some(brokers) => Some(
                crate::receipts::KafkaReceipts::new(brokers, &config.receipts_topic).map_err(
                    |source| StartError::Receipts {
                        brokers: brokers.clone(),
                        source,
                    },
                )?,
            ),
        };
        let shared = Arc::new(Shared::new(config, &secret, presence, store));
        let mut tasks = vec![
            crate::presence::Presence::spawn_refresher(shared.clone()),
            tokio::spawn(listener::accept_loop(client, shared.clone())),
            tokio::spawn(admin::serve(admin, shared.clone())),
            tokio::spawn(sweep_loop(shared.clone())),
            shared
                .receipts
                .spawn(shared.store.clone(), shared.config.node_id.clone(), kafka),
        ];
        if let Some(m) = memory_store {
            tasks.push(tokio::spawn(history_sweep_loop(m)));
        }
        tracing::info!(%client_addr, %admin_addr, node = %shared.config.node_id, "push-server started");
        Ok(Self {
            shared,
            client_addr,
            admin_addr,
            secret,
            secret_generated,
            tasks,
        })
    }

    /// The bound client port.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The bound admin port.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The token secret in use, and whether it was generated at start.
    pub fn secret(&self) -> (&str, bool) {
        (&self.secret, self.secret_generated)
    }

    /// The node's shared state (hub, authenticator, settings).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Mints a client token with this node's secret.
    pub fn mint_token(&self, user: &str, device: Option<&str>, ttl: Duration) -> String {
        self.shared.auth.mint(user, device, ttl)
    }

    /// Starts draining: readiness fails, new clients are refused, and every client is asked
    /// to reconnect at its own point in the drain window.
    pub fn drain(&self) {
        self.shared.begin_drain();
    }

    /// Resolves when a drain has finished: every client has gone, or the window and the
    /// grace period are over (the remaining connections are then dropped by [`Server::stop`]).
    pub async fn drained(&self) {
        let poll = Duration::from_millis(50);
        loop {
            if let Some(started) = self.shared.draining() {
                if self.shared.hub.open_total() == 0
                    || self.shared.now() >= self.shared.drain_deadline(started)
                {
                    return;
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Stops accepting and serving. Open connections' tasks end when their sockets close
    /// with the runtime, or when the process exits.
    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Close what is left: drivers see the close request and end their connections.
        self.shared
            .hub
            .for_each(|c| c.close(crate::lifecycle::DisconnectReason::Drain));
    }
}

async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.sweep();
    }
}

/// Forgets users whose kept messages all aged out, every few seconds: the memory store trims
/// a user's messages on every append and read, so this only returns the memory of users who
/// stopped getting messages.
async fn history_sweep_loop(store: Arc<MemoryStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        store.sweep(push_registry::now_ms());
    }
}

fn random_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The close frame for a server-initiated close of `reason`, if one is sent.
pub(crate) fn close_frame_for(reason: crate::lifecycle::DisconnectReason) -> Option<Bytes> {
    use crate::lifecycle::DisconnectReason as R;
    let (code, text) = match reason {
        R::ForcedAfterGrace => (ws::close_code::RECONNECT_TIMEOUT, "reconnect grace expired"),
        R::HeartbeatTimeout => (ws::close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout"),
        R::SlowConsumer => (ws::close_code::SLOW_CONSUMER, "slow consumer"),
        R::Drain => (ws::close_code::GOING_AWAY, "node shutting down"),
        _ => return None,
    };
    Some(ws::close_frame(code, text))
}
