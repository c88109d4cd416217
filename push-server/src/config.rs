//! Configuration in two stages (as ripgrep does): raw values from flags, `PUSH_*` environment
//! variables and an optional TOML file, then one validated [`Config`].
//!
//! Precedence, highest first: command-line flag, environment variable, `--config` file,
//! built-in default. Every flag has an environment variable: `--max-connections` is
//! `PUSH_MAX_CONNECTIONS`, and the file key is `max_connections`.
//!
//! Each setting is declared once, in the `settings!` list below: its doc comment is its
//! `--help` text, its `#[arg]` names the flag and the variable, its name is the TOML key, and
//! `= default` is its built-in value. [`Settings`] (every value optional: what one source gave)
//! derives both the clap parser and the TOML deserializer; flags over file over defaults
//! gives every value, which [`Config`] then groups and parses (the registry URL into a
//! [`Registry`]) and [`Config::validate`] checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::hub::SlowConsumerPolicy;
use crate::lifecycle::Policy;

/// Log output format (human or JSON lines), as every binary of the platform has it.
pub use telemetry::LogFormat;

/// Where a node registers its connections and keeps its history, parsed once from the
/// `registry` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registry {
    /// `none`: register nowhere; pushes reach the node only through its own admin API, and
    /// the history stays in memory. Saves the registry's memory on a single node without a
    /// message processor.
    None,
    /// A push-registry backend: `memory`, `redis://…`, `redis-cluster://…` or `ring://…`.
    Backend {
        /// The URL as given, for [`push_registry::open`] and [`push_registry::open_store`].
        url: String,
        /// The backend it names.
        backend: push_registry::url::BackendUrl,
    },
}

impl Registry {
    /// The URL to open, unless the node registers nowhere.
    pub fn url(&self) -> Option<&str> {
        match self {
            Registry::None => None,
            Registry::Backend { url, .. } => Some(url),
        }
    }
}

impl std::str::FromStr for Registry {
    type Err = push_registry::Error;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        if url == "none" {
            return Ok(Registry::None);
        }
        Ok(Registry::Backend {
            backend: push_registry::url::parse(url)?,
            url: url.to_owned(),
        })
    }
}

/// Settings of a push-server node, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client port (WebSocket and SSE).
    pub listen: SocketAddr,
    /// Admin port (push API, metrics, health).
    pub admin_listen: SocketAddr,
    /// This node's ID in logs, metrics and its registry records.
    pub node_id: String,
    /// HS256 secret for client tokens. `None`: the server makes one at start and prints it.
    pub auth_secret: Option<String>,
    /// Refuse tokens without `exp` (true unless `--allow-tokens-without-exp`).
    pub require_exp: bool,
    /// Bearer token for the admin API's `/v1/*` routes.
    pub admin_token: Option<String>,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Let several processes bind the same client port (SO_REUSEPORT).
    pub reuse_port: bool,
    /// Park idle connections: no task of their own until they have something to do.
    pub park_idle: bool,
    /// Listen backlog of the client port.
    pub backlog: u32,
    /// Lifetimes, heartbeats and drain.
    pub lifecycle: Policy,
    /// How long a client may take to send its request head.
    pub handshake_timeout: Duration,
    /// Largest request head accepted, bytes.
    pub max_head_bytes: usize,
    /// Largest message accepted (client frame, assembled message, admin payload), bytes.
    pub max_message_bytes: usize,
    /// Most frames queued for one slow connection.
    pub max_queue: usize,
    /// Most bytes queued for one slow connection.
    pub max_queue_bytes: usize,
    /// What to do when a connection's queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// How long a push waits for room in a connection's full queue and for its frame to be
    /// written before the connection is a slow consumer.
    pub slow_consumer_timeout: Duration,
    /// Acknowledgements per second one connection (or one `POST /ack` token) may send.
    pub ack_rate: u32,
    /// Connects per second allowed per client IP (0 disables).
    pub per_ip_rate: f64,
    /// Burst of connects allowed per client IP.
    pub per_ip_burst: u32,
    /// Most connections in their handshake at once.
    pub max_pending_handshakes: usize,
    /// How often the sweeper runs lifecycle checks.
    pub sweep_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Where the node registers its connections and keeps its history.
    pub registry: Registry,
    /// Lifetime of a registry record without refresh; records are refreshed every third.
    pub registry_ttl: Duration,
    /// Address other components use to deliver to this node (`host:port` of the admin port).
    /// Default: the bound admin address.
    pub advertise_addr: Option<String>,
    /// Most messages kept per user for resume (in the registry's store).
    pub history_messages: usize,
    /// How long a message is kept for resume.
    pub history_age: Duration,
    /// Kafka bootstrap servers to publish delivery receipts to; none: receipts go only to
    /// the admin API's waiters.
    pub receipts_brokers: Option<String>,
    /// Kafka topic for delivery receipts.
    pub receipts_topic: String,
    /// Serve the demo page at `/demo` on the admin port (off by default: docs/clients.md).
    pub demo: bool,
    /// Test-only (feature `autobahn-echo`, never a flag): WebSocket data messages are echoed
    /// and no `hello` is sent, for the Autobahn conformance suite. See `crate::autobahn`.
    #[cfg(feature = "autobahn-echo")]
    pub echo: bool,
    // Admission limits (issue 14; docs/security.md "Admission limits"). 0 disables a cap.
    /// Most connections of one source (IPv4 address, IPv6 /64) in their handshake at once.
    pub max_pending_per_ip: usize,
    /// How long a new connection may stay silent before its first byte.
    pub first_byte_timeout: Duration,
    /// Most connections of one user on this node (the newest is refused beyond).
    pub max_connections_per_user: usize,
    /// Most connections of one source (IPv4 address, IPv6 /64) on this node.
    pub max_connections_per_ip: usize,
    /// Admin port and secrets hardening (docs/security.md).
    pub admin_security: AdminSecurity,
}

/// Shortest admin token or internal secret accepted: 16 bytes of a random secret cannot be
/// guessed over the network, and a shorter one is likely a word someone typed.
pub const MIN_SECRET_LEN: usize = 16;

/// Settings of the admin port's protection and of the secrets between components.
#[derive(Debug, Clone)]
pub struct AdminSecurity {
    /// Secret of `/internal/v1/deliver` and of node-to-node forwarding. Only a caller with it
    /// may set a message's `id`; without one configured, ids are checked against the history.
    pub internal_secret: Option<String>,
    /// Start although the admin port binds a non-loopback address without an admin token.
    pub admin_insecure: bool,
    /// Host names (besides IP literals, `localhost` and the advertised host) accepted in the
    /// admin requests' `Host` header: a DNS-rebinding page sends its own name.
    pub admin_allowed_hosts: Vec<String>,
    /// Most admin connections open at once.
    pub admin_max_connections: usize,
    /// Time allowed for an admin request's head.
    pub admin_header_timeout: Duration,
    /// Time allowed for an admin request's body.
    pub admin_body_timeout: Duration,
    /// Networks that registry records may name as nodes to forward to.
    pub peer_nets: push_registry::PeerNets,
    /// Required `iss` claim of client tokens.
    pub token_issuer: Option<String>,
    /// Required `aud` claim of client tokens.
    pub token_audience: Option<String>,
}

/// Declares the settings: per entry, its doc comment (the `--help` text), its `#[arg]` (flag
/// and environment variable) and `#[serde]` attributes, its name (the TOML key), its type and,
/// unless it defaults to unset, `= default`. Expands to [`Settings`] (every field optional)
/// and `Values` (every field resolved: flag, else file, else default).
macro_rules! settings {
    (@resolved $ty:ty;) => { Option<$ty> };
    (@resolved $ty:ty; $default:expr) => { $ty };
    (@or_default $value:expr;) => { $value };
    (@or_default $value:expr; $default:expr) => { $value.unwrap_or_else(|| $default) };
    ($( $(#[$attr:meta])* $name:ident: $ty:ty $(= $default:expr)?, )*) => {
        /// The settings as one source gives them (flags and `PUSH_*` variables, or the
        /// `--config` file): each is unset unless that source names it. Unknown file keys
        /// are an error, so a typo does not silently leave a default in place.
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$attr])* pub $name: Option<$ty>, )*
        }

        /// Every setting with its value: the flag's, else the file's, else the default.
        struct Values {
            $( $name: settings!(@resolved $ty; $($default)?), )*
        }

        impl Settings {
            /// These values over `file`'s over the defaults.
            fn over(self, file: Settings) -> Values {
                Values {
                    $( $name: settings!(@or_default self.$name.or(file.$name); $($default)?), )*
                }
            }
        }
    };
}

settings! {
    /// Client port address (WebSocket `/ws`, SSE `/sse`). Default 127.0.0.1:8080.
    #[arg(long, env = "PUSH_LISTEN")]
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
    /// Admin port address (push API, /metrics, /healthz, /readyz). Default 127.0.0.1:9090.
    #[arg(long, env = "PUSH_ADMIN_LISTEN")]
    admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9090)),
    /// Node ID. Default: hostname-pid.
    #[arg(long, env = "PUSH_NODE_ID")]
    node_id: String = default_node_id(),
    /// HS256 secret for client tokens. Without one, a random secret is made and printed.
    #[arg(long, env = "PUSH_AUTH_SECRET", hide_env_values = true)]
    auth_secret: String,
    /// Bearer token required on the admin API's /v1/* routes (at least 16 bytes).
    #[arg(long, env = "PUSH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Most client connections open at once; readiness fails and new clients get 503 beyond.
    #[arg(long, env = "PUSH_MAX_CONNECTIONS")]
    max_connections: usize = 100_000,
    /// Set SO_REUSEPORT so several processes can share the client port.
    #[arg(long, env = "PUSH_REUSE_PORT", num_args = 0..=1, default_missing_value = "true")]
    reuse_port: bool = false,
    /// Park idle connections: a connection with nothing to write or read gives up its task
    /// and its socket's registration, and is served by a reactor per worker until it has
    /// (about 0.75 KiB less per idle connection). `false` keeps a task per connection.
    #[arg(long, env = "PUSH_PARK_IDLE", num_args = 0..=1, default_missing_value = "true")]
    park_idle: bool = true,
    /// Listen backlog for the client port (capped by net.core.somaxconn).
    #[arg(long, env = "PUSH_BACKLOG")]
    // Reconnect storms (a peer node dies, its clients all come here) arrive faster than
    // accept() drains; the kernel caps this at net.core.somaxconn.
    backlog: u32 = 4096,
    /// Mean connection lifetime before `reconnect`, e.g. 30m.
    #[arg(long, env = "PUSH_LIFETIME", value_parser = parse_duration)]
    #[serde(with = "duration")]
    lifetime: Duration = Policy::default().lifetime,
    /// Lifetime jitter as a fraction, e.g. 0.25 for ±25 %.
    #[arg(long, env = "PUSH_LIFETIME_JITTER")]
    lifetime_jitter: f64 = Policy::default().lifetime_jitter,
    /// Time a client has to close after `reconnect` before the server closes, e.g. 30s.
    #[arg(long, env = "PUSH_RECONNECT_GRACE", value_parser = parse_duration)]
    #[serde(with = "duration")]
    reconnect_grace: Duration = Policy::default().reconnect_grace,
    /// Heartbeat interval (WebSocket ping, SSE comment), e.g. 30s.
    #[arg(long, env = "PUSH_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    #[serde(with = "duration")]
    heartbeat_interval: Duration = Policy::default().heartbeat_interval,
    /// Silence after which a WebSocket client is taken for dead, e.g. 75s.
    #[arg(long, env = "PUSH_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    heartbeat_timeout: Duration = Policy::default().heartbeat_timeout,
    /// Window over which SIGTERM spreads `reconnect` to all clients, e.g. 60s.
    #[arg(long, env = "PUSH_DRAIN_WINDOW", value_parser = parse_duration)]
    #[serde(with = "duration")]
    drain_window: Duration = Policy::default().drain_window,
    /// Time allowed for a client's request head (slowloris guard), e.g. 10s.
    #[arg(long, env = "PUSH_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    handshake_timeout: Duration = Duration::from_secs(10),
    /// Largest request head, bytes.
    #[arg(long, env = "PUSH_MAX_HEAD_BYTES")]
    max_head_bytes: usize = 8 * 1024,
    /// Largest message (client frame or admin payload), bytes.
    #[arg(long, env = "PUSH_MAX_MESSAGE_BYTES")]
    max_message_bytes: usize = 64 * 1024,
    /// Most frames queued for one connection that reads slowly.
    #[arg(long, env = "PUSH_MAX_QUEUE")]
    max_queue: usize = 64,
    /// Most bytes queued for one connection that reads slowly.
    #[arg(long, env = "PUSH_MAX_QUEUE_BYTES")]
    // 16 messages of the largest size: a slow reader costs at most this much.
    max_queue_bytes: usize = 1024 * 1024,
    /// What to do with a connection whose queue is full.
    #[arg(long, env = "PUSH_SLOW_CONSUMER", value_enum)]
    slow_consumer: SlowConsumerPolicy = SlowConsumerPolicy::Disconnect,
    /// How long a client may leave a full queue undrained before it is a slow consumer, e.g. 2s.
    #[arg(long, env = "PUSH_SLOW_CONSUMER_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    // Below the message processor's 5 s deliver timeout, so that a slow consumer holding
    // back a batch is cut off before the batch times out and is retried.
    slow_consumer_timeout: Duration = Duration::from_secs(2),
    /// Acknowledgements per second allowed per connection.
    #[arg(long, env = "PUSH_ACK_RATE")]
    // A client acks what it is sent; 100/s is above any real user's message rate and keeps
    // one client's share of the receipts queue small.
    ack_rate: u32 = 100,
    /// Connects per second allowed per client IP (0 disables the limit).
    #[arg(long, env = "PUSH_PER_IP_RATE")]
    per_ip_rate: f64 = 200.0,
    /// Burst of connects allowed per client IP.
    #[arg(long, env = "PUSH_PER_IP_BURST")]
    per_ip_burst: u32 = 1000,
    /// Most connections in their handshake at once.
    #[arg(long, env = "PUSH_MAX_PENDING_HANDSHAKES")]
    max_pending_handshakes: usize = 4096,
    /// How often lifecycle checks run, e.g. 500ms.
    #[arg(long, env = "PUSH_SWEEP_INTERVAL", value_parser = parse_duration)]
    #[serde(with = "duration")]
    sweep_interval: Duration = Duration::from_millis(500),
    /// Log format.
    #[arg(long, env = "PUSH_LOG_FORMAT", value_enum)]
    log_format: LogFormat = LogFormat::Human,
    /// Registry URL: memory, redis://host:port, redis-cluster://h1:p1,h2:p2,
    /// ring://h1:p1,…?racks=3&read=quorum&write=quorum, or none (pushes only through this
    /// node's admin API).
    #[arg(long, env = "PUSH_REGISTRY")]
    // A string here, parsed into a `Registry` when the sources are merged, so that a bad
    // value from a flag or the file is reported the same way, as this setting's error.
    registry: String = "memory".into(),
    /// Registry record TTL without refresh, e.g. 90s (refreshed every third of it).
    #[arg(long, env = "PUSH_REGISTRY_TTL", value_parser = parse_duration)]
    #[serde(with = "duration")]
    registry_ttl: Duration = Duration::from_secs(90),
    /// host:port at which the message processor reaches this node's admin port.
    #[arg(long, env = "PUSH_ADVERTISE_ADDR")]
    advertise_addr: String,
    /// Most messages kept per user for resume (`?since=`, `Last-Event-ID`); 0 keeps none.
    #[arg(long, env = "PUSH_HISTORY_MESSAGES")]
    // A few minutes covers a rotation's grace period, a deploy's drain window and a mobile
    // network drop; 100 messages covers a burst for one user without letting one user's
    // history grow large.
    history_messages: usize = 100,
    /// How long messages are kept for resume, e.g. 5m.
    #[arg(long, env = "PUSH_HISTORY_AGE", value_parser = parse_duration)]
    #[serde(with = "duration")]
    history_age: Duration = Duration::from_secs(300),
    /// Kafka bootstrap servers (host:port,…) to publish delivery receipts to.
    #[arg(long, env = "PUSH_RECEIPTS_BROKERS")]
    receipts_brokers: String,
    /// Kafka topic for delivery receipts.
    #[arg(long, env = "PUSH_RECEIPTS_TOPIC")]
    receipts_topic: String = "push-receipts".into(),
    /// Serve a demo page at `/demo` on the admin port, built on the JavaScript client.
    #[arg(long, env = "PUSH_DEMO", num_args = 0..=1, default_missing_value = "true")]
    demo: bool = false,
    // Admission limits (issue 14).
    /// Most connections of one IPv4 address or IPv6 /64 in their handshake at once (0: no cap).
    #[arg(long, env = "PUSH_MAX_PENDING_PER_IP")]
    // A handshake takes one round trip; 32 at once from one address is a burst of clients
    // behind one NAT reconnecting together, while 4,096 slots shared by all need 128
    // addresses to fill.
    max_pending_per_ip: usize = 32,
    /// Time a new connection may stay silent before its first byte, e.g. 3s.
    #[arg(long, env = "PUSH_FIRST_BYTE_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    // A real client sends its request right after TCP connects; only a silent connection
    // waits longer. Short, so an idle connect holds a slot for 3 s, not for the whole
    // handshake timeout.
    first_byte_timeout: Duration = Duration::from_secs(3),
    /// Most connections of one user on this node; newer ones get 429 (0: no cap).
    #[arg(long, env = "PUSH_MAX_CONNECTIONS_PER_USER")]
    // A user runs a few apps and tabs; 16 is plenty, and bounds the user's entry in the hub
    // (and its registry hash) that every push and unregister walks.
    max_connections_per_user: usize = 16,
    /// Most connections of one IPv4 address or IPv6 /64 on this node (0: no cap).
    #[arg(long, env = "PUSH_MAX_CONNECTIONS_PER_IP")]
    // Carrier-grade and corporate NATs put hundreds of users, each with a few connections,
    // behind one address; 4,096 leaves them room while one address still cannot take more
    // than 4 % of a default node.
    max_connections_per_ip: usize = 4096,
    // Admin port and secrets (issue 14, harden-admin): `Config::admin_security`.
    /// Secret of /internal/v1/deliver and node-to-node forwarding (at least 16 bytes); the
    /// message processor sends the same. Only callers with it may set message IDs.
    #[arg(long, env = "PUSH_INTERNAL_SECRET", hide_env_values = true)]
    internal_secret: String,
    /// Start even though the admin port binds a non-loopback address without --admin-token.
    #[arg(long, env = "PUSH_ADMIN_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    admin_insecure: bool = false,
    /// Host names accepted in admin requests' Host header, comma-separated (IP literals,
    /// localhost and the advertised host always are).
    #[arg(long, env = "PUSH_ADMIN_ALLOWED_HOSTS", value_delimiter = ',')]
    admin_allowed_hosts: Vec<String> = Vec::new(),
    /// Most admin connections open at once (default 256).
    #[arg(long, env = "PUSH_ADMIN_MAX_CONNECTIONS")]
    // The message processors keep a few keep-alive connections each; scrapers and operators
    // a handful. 256 leaves room for both and bounds what a flood holds.
    admin_max_connections: usize = 256,
    /// Time allowed for an admin request's head, e.g. 10s.
    #[arg(long, env = "PUSH_ADMIN_HEADER_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    // Real callers send a head in one packet; 10 s covers a loaded machine.
    admin_header_timeout: Duration = Duration::from_secs(10),
    /// Time allowed for an admin request's body, e.g. 30s.
    #[arg(long, env = "PUSH_ADMIN_BODY_TIMEOUT", value_parser = parse_duration)]
    #[serde(with = "duration")]
    // A batch is at most 64 messages of the largest size: 30 s is slow even on a bad link,
    // and bounds how long a trickling body holds a connection.
    admin_body_timeout: Duration = Duration::from_secs(30),
    /// Networks (CIDRs, comma-separated, or `any`) that registry records may name as nodes
    /// to forward to. Default: loopback only.
    #[arg(long, env = "PUSH_PEER_NETS")]
    peer_nets: String = push_registry::peer_nets::DEFAULT_PEER_NETS.into(),
    /// Accept client tokens without an `exp` claim (they never expire).
    #[arg(long, env = "PUSH_ALLOW_TOKENS_WITHOUT_EXP", num_args = 0..=1, default_missing_value = "true")]
    allow_tokens_without_exp: bool = false,
    /// Required `iss` claim of client tokens.
    #[arg(long, env = "PUSH_TOKEN_ISSUER")]
    token_issuer: String,
    /// Required `aud` claim of client tokens.
    #[arg(long, env = "PUSH_TOKEN_AUDIENCE")]
    token_audience: String,
}

impl Values {
    /// Groups the values as the server reads them and parses the structured ones.
    fn into_config(self) -> Result<Config, ConfigError> {
        let invalid = |name, message| ConfigError::Invalid { name, message };
        let peer_nets = push_registry::PeerNets::parse(&self.peer_nets)
            .map_err(|e| invalid("peer_nets", e.to_string()))?;
        let registry = self
            .registry
            .parse()
            .map_err(|e: push_registry::Error| invalid("registry", e.to_string()))?;
        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            node_id: self.node_id,
            auth_secret: self.auth_secret,
            require_exp: !self.allow_tokens_without_exp,
            admin_token: self.admin_token,
            max_connections: self.max_connections,
            reuse_port: self.reuse_port,
            park_idle: self.park_idle,
            backlog: self.backlog,
            lifecycle: Policy {
                lifetime: self.lifetime,
                lifetime_jitter: self.lifetime_jitter,
                reconnect_grace: self.reconnect_grace,
                heartbeat_interval: self.heartbeat_interval,
                heartbeat_timeout: self.heartbeat_timeout,
                drain_window: self.drain_window,
            },
            handshake_timeout: self.handshake_timeout,
            max_head_bytes: self.max_head_bytes,
            max_message_bytes: self.max_message_bytes,
            max_queue: self.max_queue,
            max_queue_bytes: self.max_queue_bytes,
            slow_consumer: self.slow_consumer,
            slow_consumer_timeout: self.slow_consumer_timeout,
            ack_rate: self.ack_rate,
            per_ip_rate: self.per_ip_rate,
            per_ip_burst: self.per_ip_burst,
            max_pending_handshakes: self.max_pending_handshakes,
            sweep_interval: self.sweep_interval,
            log_format: self.log_format,
            registry,
            registry_ttl: self.registry_ttl,
            advertise_addr: self.advertise_addr,
            history_messages: self.history_messages,
            history_age: self.history_age,
            receipts_brokers: self.receipts_brokers,
            receipts_topic: self.receipts_topic,
            demo: self.demo,
            #[cfg(feature = "autobahn-echo")]
            echo: false,
            max_pending_per_ip: self.max_pending_per_ip,
            first_byte_timeout: self.first_byte_timeout,
            max_connections_per_user: self.max_connections_per_user,
            max_connections_per_ip: self.max_connections_per_ip,
            admin_security: AdminSecurity {
                internal_secret: self.internal_secret,
                admin_insecure: self.admin_insecure,
                admin_allowed_hosts: self.admin_allowed_hosts,
                admin_max_connections: self.admin_max_connections,
                admin_header_timeout: self.admin_header_timeout,
                admin_body_timeout: self.admin_body_timeout,
                peer_nets,
                token_issuer: self.token_issuer,
                token_audience: self.token_audience,
            },
        })
    }
}

impl Default for Config {
    /// Every setting at its default (not validated: the defaults pass).
    fn default() -> Self {
        Settings::default()
            .over(Settings::default())
            .into_config()
            .expect("the default registry URL and peer networks parse")
    }
}

impl Config {
    /// A configuration for tests and benchmarks: both ports on 127.0.0.1 port 0, a fixed
    /// secret, no per-IP limit.
    pub fn local_test(secret: &str) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            admin_listen: "127.0.0.1:0".parse().expect("literal address"),
            node_id: "test".into(),
            auth_secret: Some(secret.into()),
            per_ip_rate: 0.0,
            max_pending_per_ip: 0,
            max_connections_per_ip: 0,
            ..Self::default()
        }
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}

/// The command line of a node: the settings' flags and the file to read the others from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "PUSH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The settings given as flags or `PUSH_*` variables.
    #[command(flatten)]
    pub settings: Settings,
}

/// Durations in the file are strings like the flags' (`"30s"`, `"1h 30m"`).
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| super::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Why the settings are not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting `{name}`: {message}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Parses a duration like `30s`, `250ms`, `30m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}`: {e}"))
}

impl ServeArgs {
    /// Reads the config file (if any) and merges everything into a validated [`Config`].
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<Settings>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => Settings::default(),
        };
        self.settings.clone().merge(file)
    }
}

impl Settings {
    /// Merges these values over `file` over the defaults, then validates.
    pub fn merge(self, file: Settings) -> Result<Config, ConfigError> {
        let cfg = self.over(file).into_config()?;
        cfg.validate()?;
        Ok(cfg)
    }
}

impl Config {
    /// Checks ranges and relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                name,
                message: message.into(),
            }
        }
        let l = &self.lifecycle;
        if !(0.0..1.0).contains(&l.lifetime_jitter) {
            return Err(invalid("lifetime_jitter", "must be in [0, 1)"));
        }
        if l.lifetime.is_zero() {
            return Err(invalid("lifetime", "must be above zero"));
        }
        if l.heartbeat_interval.is_zero() {
            return Err(invalid("heartbeat_interval", "must be above zero"));
        }
        if l.heartbeat_timeout <= l.heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout",
                format!(
                    "must be longer than heartbeat_interval ({:?}), or every client would time out",
                    l.heartbeat_interval
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_message_bytes < 128 {
            return Err(invalid("max_message_bytes", "must be at least 128"));
        }
        if self.max_head_bytes < 512 {
            return Err(invalid("max_head_bytes", "must be at least 512"));
        }
        if self.max_queue == 0 {
            return Err(invalid("max_queue", "must be at least 1"));
        }
        if self.max_queue_bytes < self.max_message_bytes {
            return Err(invalid(
                "max_queue_bytes",
                format!(
                    "must be at least max_message_bytes ({})",
                    self.max_message_bytes
                ),
            ));
        }
        if self.slow_consumer_timeout.is_zero() {
            return Err(invalid("slow_consumer_timeout", "must be above zero"));
        }
        if self.ack_rate == 0 {
            return Err(invalid("ack_rate", "must be at least 1"));
        }
        if self.registry_ttl < Duration::from_secs(3) {
            return Err(invalid("registry_ttl", "must be at least 3s"));
        }
        if self.history_messages > 10_000 {
            return Err(invalid(
                "history_messages",
                "must be at most 10000 (a resume sends them all at once)",
            ));
        }
        if self.history_age < Duration::from_secs(1) {
            return Err(invalid("history_age", "must be at least 1s"));
        }
        if self.receipts_topic.is_empty() {
            return Err(invalid("receipts_topic", "must not be empty"));
        }
        if self.sweep_interval.is_zero() {
            return Err(invalid("sweep_interval", "must be above zero"));
        }
        // Above handshake_timeout it has no effect (the handshake timeout ends the wait
        // first), so a short handshake timeout alone stays a valid setting.
        if self.first_byte_timeout.is_zero() {
            return Err(invalid("first_byte_timeout", "must be above zero"));
        }
        if self.auth_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(invalid(
                "auth_secret",
                "must be at least 16 bytes (HS256 keys shorter than that are guessable)",
            ));
        }
        self.validate_admin_security()
    }
}

impl Config {
    /// Checks the admin port's exposure and the secrets' lengths.
    fn validate_admin_security(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: String| ConfigError::Invalid { name, message };
        let sec = &self.admin_security;
        for (name, secret) in [
            ("admin_token", &self.admin_token),
            ("internal_secret", &sec.internal_secret),
        ] {
            if secret.as_deref().is_some_and(|s| s.len() < MIN_SECRET_LEN) {
                return Err(invalid(
                    name,
                    format!(
                        "must be at least {MIN_SECRET_LEN} bytes (e.g. `openssl rand -hex 16`)"
                    ),
                ));
            }
            if secret
                .as_deref()
                .is_some_and(|s| !s.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(invalid(name, "must be visible ASCII (no spaces)".into()));
            }
        }
        if !self.admin_listen.ip().is_loopback()
            && self.admin_token.is_none()
            && !sec.admin_insecure
        {
            return Err(invalid(
                "admin_listen",
                format!(
                    "{} is not a loopback address: anyone who reaches it could push to any user; set --admin-token (and --internal-secret), or pass --admin-insecure to accept that",
                    self.admin_listen
                ),
            ));
        }
        if sec.admin_max_connections == 0 {
            return Err(invalid(
                "admin_max_connections",
                "must be at least 1".into(),
            ));
        }
        if sec.admin_header_timeout.is_zero() || sec.admin_body_timeout.is_zero() {
            return Err(invalid(
                "admin_header_timeout",
                "admin header and body timeouts must be above zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(a: &[&str]) -> Settings {
        Cli::try_parse_from(std::iter::once("push-server").chain(a.iter().copied()))
            .unwrap()
            .serve
            .settings
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file: Settings = toml::from_str(
            r#"
            max_connections = 10
            lifetime = "5m"
            heartbeat_interval = "10s"
            listen = "127.0.0.1:7000"
            "#,
        )
        .unwrap();
        let cfg = args(&["--max-connections", "20"]).merge(file).unwrap();
        assert_eq!(cfg.max_connections, 20);
        assert_eq!(cfg.lifecycle.lifetime, Duration::from_secs(300));
        assert_eq!(cfg.lifecycle.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(cfg.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(cfg.admin_listen, "127.0.0.1:9090".parse().unwrap());
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("max_conections = 1").is_err());
    }

    #[test]
    fn invalid_relations_are_refused() {
        let err = args(&["--heartbeat-interval", "60s", "--heartbeat-timeout", "30s"])
            .merge(Settings::default())
            .unwrap_err();
        assert!(err.to_string().contains("heartbeat_timeout"), "{err}");
        assert!(args(&["--auth-secret", "short"])
            .merge(Settings::default())
            .is_err());
        assert!(args(&["--lifetime-jitter", "1.5"])
            .merge(Settings::default())
            .is_err());
    }

    #[test]
    fn history_and_receipt_settings() {
        let file: Settings = toml::from_str(
            r#"
            history_messages = 50
            history_age = "2m"
            receipts_brokers = "k1:9092"
            "#,
        )
        .unwrap();
        let cfg = args(&["--receipts-topic", "acks"]).merge(file).unwrap();
        assert_eq!(cfg.history_messages, 50);
        assert_eq!(cfg.history_age, Duration::from_secs(120));
        assert_eq!(cfg.receipts_brokers.as_deref(), Some("k1:9092"));
        assert_eq!(cfg.receipts_topic, "acks");
        let err = args(&["--history-messages", "20000"])
            .merge(Settings::default())
            .unwrap_err();
        assert!(err.to_string().contains("history_messages"), "{err}");
        assert!(args(&["--history-age", "0s"])
            .merge(Settings::default())
            .is_err());
    }

    #[test]
    fn delivery_limits() {
        let d = Config::default();
        assert_eq!(d.slow_consumer_timeout, Duration::from_secs(2));
        assert_eq!(d.ack_rate, 100);
        let file: Settings =
            toml::from_str("slow_consumer_timeout = \"500ms\"\nack_rate = 7").unwrap();
        let cfg = args(&[]).merge(file).unwrap();
        assert_eq!(cfg.slow_consumer_timeout, Duration::from_millis(500));
        assert_eq!(cfg.ack_rate, 7);
        let cfg = args(&["--slow-consumer-timeout", "3s", "--ack-rate", "9"])
            .merge(Settings::default())
            .unwrap();
        assert_eq!(cfg.slow_consumer_timeout, Duration::from_secs(3));
        assert_eq!(cfg.ack_rate, 9);
        assert!(args(&["--slow-consumer-timeout", "0s"])
            .merge(Settings::default())
            .is_err());
        assert!(args(&["--ack-rate", "0"])
            .merge(Settings::default())
            .is_err());
    }

    #[test]
    fn admission_limits_have_defaults_flags_env_and_file_keys() {
        let d = Config::default();
        assert_eq!(d.max_pending_per_ip, 32);
        assert_eq!(d.first_byte_timeout, Duration::from_secs(3));
        assert_eq!(d.max_connections_per_user, 16);
        assert_eq!(d.max_connections_per_ip, 4096);
        let file: Settings = toml::from_str(
            r#"
            max_pending_per_ip = 4
            first_byte_timeout = "1s"
            max_connections_per_user = 3
            max_connections_per_ip = 100
            "#,
        )
        .unwrap();
        let cfg = args(&["--max-connections-per-user", "5"])
            .merge(file)
            .unwrap();
        assert_eq!(cfg.max_pending_per_ip, 4);
        assert_eq!(cfg.first_byte_timeout, Duration::from_secs(1));
        assert_eq!(cfg.max_connections_per_user, 5);
        assert_eq!(cfg.max_connections_per_ip, 100);
        let err = args(&["--first-byte-timeout", "0s"])
            .merge(Settings::default())
            .unwrap_err();
        assert!(err.to_string().contains("first_byte_timeout"), "{err}");
    }

    #[test]
    fn admin_security_settings() {
        let file: Settings = toml::from_str(
            r#"
            internal_secret = "internal-secret-0123456789"
            admin_allowed_hosts = ["push.internal"]
            admin_body_timeout = "5s"
            peer_nets = "10.0.0.0/8"
            "#,
        )
        .unwrap();
        let cfg = args(&["--admin-max-connections", "9", "--token-issuer", "auth"])
            .merge(file)
            .unwrap();
        let sec = &cfg.admin_security;
        assert_eq!(
            sec.internal_secret.as_deref(),
            Some("internal-secret-0123456789")
        );
        assert_eq!(sec.admin_allowed_hosts, ["push.internal"]);
        assert_eq!(sec.admin_body_timeout, Duration::from_secs(5));
        assert_eq!(sec.admin_header_timeout, Duration::from_secs(10));
        assert_eq!(sec.admin_max_connections, 9);
        assert!(sec.peer_nets.contains("10.1.2.3".parse().unwrap()));
        assert_eq!(sec.token_issuer.as_deref(), Some("auth"));
        assert!(cfg.require_exp, "exp is required by default");
        let lax = args(&["--allow-tokens-without-exp"])
            .merge(Settings::default())
            .unwrap();
        assert!(!lax.require_exp);
        let d = Config::default().admin_security;
        assert_eq!(d.admin_max_connections, 256);
        assert!(!d.peer_nets.contains("10.1.2.3".parse().unwrap()));
        // A public admin port needs a token or the explicit opt-out.
        let err = args(&["--admin-listen", "0.0.0.0:9090"])
            .merge(Settings::default())
            .unwrap_err();
        assert!(err.to_string().contains("--admin-insecure"), "{err}");
        assert!(
            args(&["--admin-listen", "0.0.0.0:9090", "--admin-insecure"])
                .merge(Settings::default())
                .is_ok()
        );
        assert!(args(&[
            "--admin-listen",
            "0.0.0.0:9090",
            "--admin-token",
            "admin-token-0123456789"
        ])
        .merge(Settings::default())
        .is_ok());
        for short in [["--admin-token", "short"], ["--internal-secret", "short"]] {
            let err = args(&short).merge(Settings::default()).unwrap_err();
            assert!(err.to_string().contains("at least 16"), "{err}");
        }
        assert!(args(&["--peer-nets", "10.0.0.0/40"])
            .merge(Settings::default())
            .is_err());
    }

    /// A `--config` file in a fresh directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("push-server-config-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("push.toml");
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        fn resolve(&self, flags: &[&str]) -> Result<Config, ConfigError> {
            ServeArgs {
                config: Some(self.0.clone()),
                settings: args(flags),
            }
            .resolve()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn a_flag_overrides_the_config_file_which_overrides_the_default() {
        let file = TempFile::new(
            "precedence",
            "max_queue = 10\nregistry = \"none\"\nadmin_allowed_hosts = [\"a.internal\"]\n",
        );
        let cfg = file
            .resolve(&["--max-queue", "20", "--admin-allowed-hosts", "b.internal,c"])
            .unwrap();
        assert_eq!(cfg.max_queue, 20, "the flag wins over the file");
        assert_eq!(cfg.admin_security.admin_allowed_hosts, ["b.internal", "c"]);
        assert_eq!(
            cfg.registry,
            Registry::None,
            "the file wins over the default"
        );
        assert_eq!(cfg.max_queue_bytes, 1024 * 1024, "neither: the default");
        let cfg = file.resolve(&[]).unwrap();
        assert_eq!(cfg.max_queue, 10);
        assert_eq!(cfg.admin_security.admin_allowed_hosts, ["a.internal"]);
    }

    #[test]
    fn an_unknown_config_file_key_is_refused_with_its_name() {
        let file = TempFile::new("unknown", "max_queue = 10\nmax_conections = 5\n");
        let err = file.resolve(&[]).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("unknown field `max_conections`"), "{msg}");
        assert!(msg.contains("push.toml"), "the file is named: {msg}");
        // `config` is a flag, not a setting: a file cannot name another file.
        let file = TempFile::new("nested", "config = \"other.toml\"\n");
        let msg = file.resolve(&[]).unwrap_err().to_string();
        assert!(msg.contains("unknown field `config`"), "{msg}");
    }

    #[test]
    fn the_registry_is_parsed_once_into_its_backend() {
        use push_registry::url::BackendUrl;
        assert_eq!(
            args(&["--registry", "none"])
                .merge(Settings::default())
                .unwrap()
                .registry,
            Registry::None
        );
        let cfg = args(&["--registry", "redis://127.0.0.1:6379?timeout_ms=500"])
            .merge(Settings::default())
            .unwrap();
        assert_eq!(
            cfg.registry.url(),
            Some("redis://127.0.0.1:6379?timeout_ms=500")
        );
        assert!(matches!(
            cfg.registry,
            Registry::Backend {
                backend: BackendUrl::Redis {
                    timeout_ms: Some(500),
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn a_bad_registry_is_refused_with_a_clear_message() {
        let err = args(&["--registry", "postgres://db:5432"])
            .merge(Settings::default())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting `registry`: invalid registry URL \"postgres://db:5432\": unknown scheme \"postgres\""
        );
        // The same from the file, and the password never appears in the message.
        let file = TempFile::new(
            "registry",
            "registry = \"ring://u:hunter2@a:1,b:2?racks=3\"\n",
        );
        let msg = file.resolve(&[]).unwrap_err().to_string();
        assert!(msg.starts_with("invalid setting `registry`:"), "{msg}");
        assert!(msg.contains("cannot be split into 3 equal racks"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn every_setting_has_its_default() {
        let d = Config::default();
        assert_eq!(d.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(d.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(d.node_id, default_node_id());
        assert_eq!(d.auth_secret, None);
        assert!(d.require_exp);
        assert_eq!(d.admin_token, None);
        assert_eq!(d.max_connections, 100_000);
        assert!(!d.reuse_port);
        assert_eq!(d.backlog, 4096);
        let l = &d.lifecycle;
        assert_eq!(l.lifetime, Duration::from_secs(30 * 60));
        assert_eq!(l.lifetime_jitter, 0.25);
        assert_eq!(l.reconnect_grace, Duration::from_secs(30));
        assert_eq!(l.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(l.heartbeat_timeout, Duration::from_secs(75));
        assert_eq!(l.drain_window, Duration::from_secs(60));
        assert_eq!(d.handshake_timeout, Duration::from_secs(10));
        assert_eq!(d.max_head_bytes, 8 * 1024);
        assert_eq!(d.max_message_bytes, 64 * 1024);
        assert_eq!(d.max_queue, 64);
        assert_eq!(d.max_queue_bytes, 1024 * 1024);
        assert_eq!(d.slow_consumer, SlowConsumerPolicy::Disconnect);
        assert_eq!(d.slow_consumer_timeout, Duration::from_secs(2));
        assert_eq!(d.ack_rate, 100);
        assert_eq!(d.per_ip_rate, 200.0);
        assert_eq!(d.per_ip_burst, 1000);
        assert_eq!(d.max_pending_handshakes, 4096);
        assert_eq!(d.sweep_interval, Duration::from_millis(500));
        assert_eq!(d.log_format, LogFormat::Human);
        assert_eq!(d.registry, "memory".parse().unwrap());
        assert_eq!(d.registry_ttl, Duration::from_secs(90));
        assert_eq!(d.advertise_addr, None);
        assert_eq!(d.history_messages, 100);
        assert_eq!(d.history_age, Duration::from_secs(300));
        assert_eq!(d.receipts_brokers, None);
        assert_eq!(d.receipts_topic, "push-receipts");
        assert!(!d.demo);
        assert_eq!(d.max_pending_per_ip, 32);
        assert_eq!(d.first_byte_timeout, Duration::from_secs(3));
        assert_eq!(d.max_connections_per_user, 16);
        assert_eq!(d.max_connections_per_ip, 4096);
        let s = &d.admin_security;
        assert_eq!(s.internal_secret, None);
        assert!(!s.admin_insecure);
        assert!(s.admin_allowed_hosts.is_empty());
        assert_eq!(s.admin_max_connections, 256);
        assert_eq!(s.admin_header_timeout, Duration::from_secs(10));
        assert_eq!(s.admin_body_timeout, Duration::from_secs(30));
        assert!(s.peer_nets.contains("127.0.0.1".parse().unwrap()));
        assert!(s.peer_nets.contains("::1".parse().unwrap()));
        assert!(!s.peer_nets.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(s.token_issuer, None);
        assert_eq!(s.token_audience, None);
        // No flag and no file give the same settings, and they pass validation.
        let empty = args(&[]).merge(Settings::default()).unwrap();
        assert_eq!(format!("{empty:?}"), format!("{d:?}"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
    }
}
