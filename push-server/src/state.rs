//! The state every task of a node shares, defined below its users (the connection driver,
//! the listener, the admin API) and above the parts it holds. Each part it holds gets only
//! the handle it needs: the push path a [`Pusher`], the sweeper and the presence refresher
//! their own handles, built in server.rs.

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use metrics_exporter_prometheus::PrometheusHandle;
use push_registry::MessageStore;

use crate::auth::Authenticator;
use crate::clock::NodeClock;
use crate::config::Config;
use crate::drain::Drain;
use crate::hub::{Hub, QueueLimits, Transport};
use crate::lifecycle::Millis;
use crate::metrics::HotMetrics;
use crate::presence::Presence;
use crate::push::Pusher;
use crate::ratelimit::{PerSource, RateLimiter};
use crate::receipts::Receipts;

/// Most IPs the per-IP rate limiter tracks at once (about 64 bytes each).
const RATE_LIMIT_MAX_IPS: usize = 100_000;

/// State shared by every task of a node.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The node's settings.
    pub config: Config,
    /// Local connections by user.
    pub hub: Arc<Hub>,
    /// Token verification.
    pub auth: Authenticator,
    pub limits: QueueLimits,
    pub clock: NodeClock,
    pub drain: Arc<Drain>,
    pub rate_limiter: Mutex<RateLimiter>,
    /// Handshakes in progress per source (`--max-pending-per-ip`).
    pub pending_per_ip: Mutex<PerSource>,
    /// Open connections (and reservations) per source (`--max-connections-per-ip`).
    pub conns_per_ip: Mutex<PerSource>,
    /// Connections in their handshake now.
    pub pending_handshakes: AtomicUsize,
    /// Connections parked now (idle, without a task: connection/park.rs).
    pub parked: AtomicUsize,
    pub prometheus: PrometheusHandle,
    pub hot: HotMetrics,
    /// The registry link.
    pub presence: Option<Arc<Presence>>,
    /// Users' recent messages, for resume; the source of message IDs.
    pub store: Arc<dyn MessageStore>,
    /// The push path: history, then the local queues, then other nodes.
    pub pusher: Pusher,
    /// Acknowledgements and receipt waiters.
    pub receipts: Arc<Receipts>,
}

/// The parts of a node that are built before its shared state.
#[derive(Debug)]
pub(crate) struct Parts {
    pub config: Config,
    pub auth: Authenticator,
    pub prometheus: PrometheusHandle,
    pub hub: Arc<Hub>,
    pub clock: NodeClock,
    pub drain: Arc<Drain>,
    pub presence: Option<Arc<Presence>>,
    pub store: Arc<dyn MessageStore>,
    pub pusher: Pusher,
    pub receipts: Arc<Receipts>,
}

impl Shared {
    /// The shared state around `parts`, with empty admission counters.
    pub fn new(parts: Parts) -> Self {
        let Parts {
            config,
            auth,
            prometheus,
            hub,
            clock,
            drain,
            presence,
            store,
            pusher,
            receipts,
        } = parts;
        Self {
            auth,
            limits: queue_limits(&config),
            rate_limiter: Mutex::new(RateLimiter::new(
                config.per_ip_rate,
                config.per_ip_burst,
                RATE_LIMIT_MAX_IPS,
            )),
            pending_per_ip: Mutex::new(PerSource::new(config.max_pending_per_ip)),
            conns_per_ip: Mutex::new(PerSource::new(config.max_connections_per_ip)),
            hot: HotMetrics::new(),
            presence,
            store,
            pusher,
            receipts,
            config,
            hub,
            clock,
            drain,
            pending_handshakes: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            prometheus,
        }
    }

    /// Milliseconds since the node started (tokio's clock, so paused time applies).
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// When the drain started, if one is in progress.
    pub fn draining(&self) -> Option<Millis> {
        self.drain.started()
    }

    /// Gives back a connection's place: its transport's reservation and its source's count.
    pub fn release_slot(&self, transport: Transport, ip: IpAddr) {
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
}

/// The per-connection queue bounds `config` sets.
pub(crate) fn queue_limits(config: &Config) -> QueueLimits {
    QueueLimits {
        max_frames: config.max_queue,
        max_bytes: config.max_queue_bytes,
        policy: config.slow_consumer,
        slow_after: config.slow_consumer_timeout,
    }
}
