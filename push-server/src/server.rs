//! The node: binds both ports, runs the accept loop, the admin API and the sweeper, and
//! drains on request.
//!
//! [`Server::start`] returns once both ports are bound, so tests can read the addresses of
//! ports bound to 0. [`Server::drain`] starts a drain; [`Server::drained`] resolves when the
//! last client has gone or the drain deadline has passed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use push_registry::url::BackendUrl;
use push_registry::{BufferLimits, MemoryStore, MessageStore};

use crate::auth::Authenticator;
use crate::clock::NodeClock;
use crate::config::{Config, Registry};
use crate::drain::{self, Drain};
use crate::forward::Forwarder;
use crate::hub::Hub;
use crate::metrics as m;
use crate::presence::Presence;
use crate::push::Pusher;
use crate::receipts::{KafkaReceipts, Receipts};
use crate::state::{queue_limits, Parts, Shared};
use crate::sweeper::Sweeper;
use crate::{admin, listener};

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

/// A running node.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    sweeper: Arc<Sweeper>,
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
        let presence = match config.registry.url() {
            None => None,
            Some(url) => {
                let registry = push_registry::open(url).await?;
                let node_addr = config
                    .advertise_addr
                    .clone()
                    .unwrap_or_else(|| admin_addr.to_string());
                Some(Presence::start(
                    registry,
                    &config.node_id,
                    node_addr,
                    config.registry_ttl,
                ))
            }
        };
        let limits = BufferLimits {
            max_messages: config.history_messages,
            max_age: config.history_age,
        };
        // The history lives in the registry's storage; a node without a registry keeps it
        // in memory, like the embedded default.
        let (store, memory_store): (Arc<dyn MessageStore>, _) = match &config.registry {
            Registry::None
            | Registry::Backend {
                backend: BackendUrl::Memory { .. },
                ..
            } => {
                let m = Arc::new(MemoryStore::new(limits));
                (m.clone(), Some(m))
            }
            Registry::Backend { url, .. } => (push_registry::open_store(url, limits).await?, None),
        };
        let kafka = match &config.receipts_brokers {
            None => None,
            Some(brokers) => Some(KafkaReceipts::new(brokers, &config.receipts_topic).map_err(
                |source| StartError::Receipts {
                    brokers: brokers.clone(),
                    source,
                },
            )?),
        };
        let prometheus = m::install();
        metrics::gauge!(m::CONNECTIONS_CAPACITY).set(config.max_connections as f64);
        let presence = presence.map(Arc::new);
        let hub = Arc::new(Hub::new());
        let clock = NodeClock::start();
        let drain = Arc::new(Drain::new());
        let receipts = Arc::new(Receipts::new());
        let limits = queue_limits(&config);
        let forwarder = Forwarder::new(
            config
                .admin_security
                .internal_secret
                .as_deref()
                .or(config.admin_token.as_deref()),
            config.admin_security.peer_nets.clone(),
            presence.clone(),
            config.node_id.clone(),
        );
        let pusher = Pusher::new(
            hub.clone(),
            store.clone(),
            receipts.clone(),
            forwarder,
            limits,
        );
        let sweeper = Arc::new(Sweeper::new(
            hub.clone(),
            config.lifecycle.clone(),
            drain.clone(),
            clock,
            limits,
        ));
        let auth = Authenticator::new(secret.as_bytes(), config.require_exp).with_issuer_audience(
            config.admin_security.token_issuer.as_deref(),
            config.admin_security.token_audience.as_deref(),
        );
        let mut tasks = vec![
            receipts.spawn(store.clone(), config.node_id.clone(), kafka),
            tokio::spawn(sweeper.clone().run(config.sweep_interval)),
        ];
        if let Some(p) = &presence {
            tasks.push(Presence::spawn_refresher(p.clone(), hub.clone(), clock));
        }
        if let Some(m) = memory_store {
            tasks.push(tokio::spawn(history_sweep_loop(m)));
        }
        let shared = Arc::new(Shared::new(Parts {
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
        }));
        tasks.push(tokio::spawn(listener::accept_loop(client, shared.clone())));
        tasks.push(tokio::spawn(admin::serve(admin, shared.clone())));
        tracing::info!(%client_addr, %admin_addr, node = %shared.config.node_id, "push-server started");
        Ok(Self {
            shared,
            sweeper,
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

    /// The node's settings (validated; the secret taken out: see [`Server::secret`]).
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The node's local connections by user.
    pub fn hub(&self) -> &Hub {
        &self.shared.hub
    }

    /// Connections in their handshake now.
    pub fn pending_handshakes(&self) -> usize {
        self.shared
            .pending_handshakes
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Open connections parked now: idle, held by a reactor without a task of their own
    /// (`--park-idle`; also the `push_connections_parked` gauge).
    pub fn parked_connections(&self) -> usize {
        self.shared
            .parked
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The shared state, for the crate's own unit tests.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Mints a client token with this node's secret.
    pub fn mint_token(&self, user: &str, device: Option<&str>, ttl: Duration) -> String {
        self.shared.auth.mint(user, device, ttl)
    }

    /// Starts draining: readiness fails, new clients are refused, and every client is asked
    /// to reconnect at its own point in the drain window.
    pub fn drain(&self) {
        self.sweeper.begin_drain();
    }

    /// Resolves when a drain has finished: every client has gone, or the window and the
    /// grace period are over (the remaining connections are then dropped by [`Server::stop`]).
    pub async fn drained(&self) {
        let poll = Duration::from_millis(50);
        loop {
            if let Some(started) = self.shared.draining() {
                if self.shared.hub.open_total() == 0
                    || self.shared.now() >= drain::deadline(&self.shared.config.lifecycle, started)
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
