//! Configuration in two stages (as ripgrep does): raw values from flags, `PUSH_*` environment
//! variables and an optional TOML file, then one validated [`Config`].
//!
//! Precedence, highest first: command-line flag, environment variable, `--config` file,
//! built-in default. Every flag has an environment variable: `--max-connections` is
//! `PUSH_MAX_CONNECTIONS`, and the file key is `max_connections`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::hub::SlowConsumerPolicy;
use crate::lifecycle::Policy;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
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
    // --- delivery hardening (issue 14, harden-delivery) ---
    /// How long a push waits for room in a connection's full queue and for its frame to be
    /// written before the connection is a slow consumer.
    pub slow_consumer_timeout: Duration,
    /// Acknowledgements per second one connection (or one `POST /ack` token) may send.
    pub ack_rate: u32,
    // --- end delivery hardening ---
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
    /// Registry URL (push-registry): `memory`, `redis://…`, `redis-cluster://…`, `ring://…`,
    /// or `none` to register nowhere.
    pub registry: String,
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

/// The `--registry` value for a node that registers nowhere: pushes reach it only through its
/// own admin API. Saves the registry's memory on a single node without a message processor.
pub const NO_REGISTRY: &str = "none";

// ---- Admin port and secrets (issue 14, harden-admin) ----

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

impl Default for AdminSecurity {
    fn default() -> Self {
        Self {
            internal_secret: None,
            admin_insecure: false,
            admin_allowed_hosts: Vec::new(),
            // The message processors keep a few keep-alive connections each; scrapers and
            // operators a handful. 256 leaves room for both and bounds what a flood holds.
            admin_max_connections: 256,
            // Real callers send a head in one packet; 10 s covers a loaded machine.
            admin_header_timeout: Duration::from_secs(10),
            // A batch is at most 64 messages of the largest size: 30 s is slow even on a bad
            // link, and bounds how long a trickling body holds a connection.
            admin_body_timeout: Duration::from_secs(30),
            peer_nets: push_registry::PeerNets::default(),
            token_issuer: None,
            token_audience: None,
        }
    }
}

/// Raw admin security flags (flattened into [`ServeArgs`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminSecurityArgs {
    /// Secret of /internal/v1/deliver and node-to-node forwarding (at least 16 bytes); the
    /// message processor sends the same. Only callers with it may set message IDs.
    #[arg(long, env = "PUSH_INTERNAL_SECRET", hide_env_values = true)]
    pub internal_secret: Option<String>,
    /// Start even though the admin port binds a non-loopback address without --admin-token.
    #[arg(long, env = "PUSH_ADMIN_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub admin_insecure: Option<bool>,
    /// Host names accepted in admin requests' Host header, comma-separated (IP literals,
    /// localhost and the advertised host always are).
    #[arg(long, env = "PUSH_ADMIN_ALLOWED_HOSTS", value_delimiter = ',')]
    pub admin_allowed_hosts: Option<Vec<String>>,
    /// Most admin connections open at once (default 256).
    #[arg(long, env = "PUSH_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,
    /// Time allowed for an admin request's head, e.g. 10s.
    #[arg(long, env = "PUSH_ADMIN_HEADER_TIMEOUT", value_parser = parse_duration)]
    pub admin_header_timeout: Option<Duration>,
    /// Time allowed for an admin request's body, e.g. 30s.
    #[arg(long, env = "PUSH_ADMIN_BODY_TIMEOUT", value_parser = parse_duration)]
    pub admin_body_timeout: Option<Duration>,
    /// Networks (CIDRs, comma-separated, or `any`) that registry records may name as nodes
    /// to forward to. Default: loopback only.
    #[arg(long, env = "PUSH_PEER_NETS")]
    pub peer_nets: Option<String>,
    /// Accept client tokens without an `exp` claim (they never expire).
    #[arg(long, env = "PUSH_ALLOW_TOKENS_WITHOUT_EXP", num_args = 0..=1, default_missing_value = "true")]
    pub allow_tokens_without_exp: Option<bool>,
    /// Required `iss` claim of client tokens.
    #[arg(long, env = "PUSH_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// Required `aud` claim of client tokens.
    #[arg(long, env = "PUSH_TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
}

impl AdminSecurityArgs {
    /// Merges flags over the file over the defaults; returns the settings and whether tokens
    /// without `exp` are allowed.
    fn merge(&self, file: &FileConfig) -> Result<(AdminSecurity, bool), ConfigError> {
        let d = AdminSecurity::default();
        macro_rules! pick {
            ($field:ident) => {
                self.$field.clone().or(file.$field.clone())
            };
        }
        let peer_nets = match pick!(peer_nets) {
            Some(s) => {
                push_registry::PeerNets::parse(&s).map_err(|message| ConfigError::Invalid {
                    name: "peer_nets",
                    message,
                })?
            }
            None => d.peer_nets,
        };
        let sec = AdminSecurity {
            internal_secret: pick!(internal_secret),
            admin_insecure: pick!(admin_insecure).unwrap_or(d.admin_insecure),
            admin_allowed_hosts: pick!(admin_allowed_hosts).unwrap_or(d.admin_allowed_hosts),
            admin_max_connections: pick!(admin_max_connections).unwrap_or(d.admin_max_connections),
            admin_header_timeout: pick!(admin_header_timeout).unwrap_or(d.admin_header_timeout),
            admin_body_timeout: pick!(admin_body_timeout).unwrap_or(d.admin_body_timeout),
            peer_nets,
            token_issuer: pick!(token_issuer),
            token_audience: pick!(token_audience),
        };
        Ok((sec, pick!(allow_tokens_without_exp).unwrap_or(false)))
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

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            admin_listen: "127.0.0.1:9090".parse().expect("literal address"),
            node_id: default_node_id(),
            auth_secret: None,
            require_exp: true,
            admin_token: None,
            max_connections: 100_000,
            reuse_port: false,
            // Reconnect storms (a peer node dies, its clients all come here) arrive faster
            // than accept() drains; the kernel caps this at net.core.somaxconn.
            backlog: 4096,
            lifecycle: Policy::default(),
            handshake_timeout: Duration::from_secs(10),
            max_head_bytes: 8 * 1024,
            max_message_bytes: 64 * 1024,
            max_queue: 64,
            // 16 messages of the largest size: a slow reader costs at most this much.
            max_queue_bytes: 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            // Below the message processor's 5 s deliver timeout, so that a slow consumer
            // holding back a batch is cut off before the batch times out and is retried.
            slow_consumer_timeout: Duration::from_secs(2),
            // A client acks what it is sent; 100/s is above any real user's message rate
            // and keeps one client's share of the receipts queue small.
            ack_rate: 100,
            per_ip_rate: 200.0,
            per_ip_burst: 1000,
            max_pending_handshakes: 4096,
            sweep_interval: Duration::from_millis(500),
            log_format: LogFormat::Human,
            registry: "memory".into(),
            registry_ttl: Duration::from_secs(90),
            advertise_addr: None,
            // A few minutes covers a rotation's grace period, a deploy's drain window and a
            // mobile network drop; 100 messages covers a burst for one user without letting
            // one user's history grow large.
            history_messages: 100,
            history_age: Duration::from_secs(300),
            receipts_brokers: None,
            receipts_topic: "push-receipts".into(),
            demo: false,
            #[cfg(feature = "autobahn-echo")]
            echo: false,
            // A handshake takes one round trip; 32 at once from one address is a burst of
            // clients behind one NAT reconnecting together, while 4,096 slots shared by all
            // need 128 addresses to fill.
            max_pending_per_ip: 32,
            // A real client sends its request right after TCP connects; only a silent
            // connection waits longer. Short, so an idle connect holds a slot for 3 s, not
            // for the whole handshake timeout.
            first_byte_timeout: Duration::from_secs(3),
            // A user runs a few apps and tabs; 16 is plenty, and bounds the user's entry in
            // the hub (and its registry hash) that every push and unregister walks.
            max_connections_per_user: 16,
            // Carrier-grade and corporate NATs put hundreds of users, each with a few
            // connections, behind one address; 4,096 leaves them room while one address
            // still cannot take more than 4 % of a default node.
            max_connections_per_ip: 4096,
            admin_security: AdminSecurity::default(),
        }
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

/// Raw settings from flags and `PUSH_*` variables (clap reads both).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "PUSH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client port address (WebSocket `/ws`, SSE `/sse`). Default 127.0.0.1:8080.
    #[arg(long, env = "PUSH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin port address (push API, /metrics, /healthz, /readyz). Default 127.0.0.1:9090.
    #[arg(long, env = "PUSH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Node ID. Default: hostname-pid.
    #[arg(long, env = "PUSH_NODE_ID")]
    pub node_id: Option<String>,
    /// HS256 secret for client tokens. Without one, a random secret is made and printed.
    #[arg(long, env = "PUSH_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Bearer token required on the admin API's /v1/* routes (at least 16 bytes).
    #[arg(long, env = "PUSH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Most client connections open at once; readiness fails and new clients get 503 beyond.
    #[arg(long, env = "PUSH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Set SO_REUSEPORT so several processes can share the client port.
    #[arg(long, env = "PUSH_REUSE_PORT", num_args = 0..=1, default_missing_value = "true")]
    pub reuse_port: Option<bool>,
    /// Listen backlog for the client port (capped by net.core.somaxconn).
    #[arg(long, env = "PUSH_BACKLOG")]
    pub backlog: Option<u32>,
    /// Mean connection lifetime before `reconnect`, e.g. 30m.
    #[arg(long, env = "PUSH_LIFETIME", value_parser = parse_duration)]
    pub lifetime: Option<Duration>,
    /// Lifetime jitter as a fraction, e.g. 0.25 for ±25 %.
    #[arg(long, env = "PUSH_LIFETIME_JITTER")]
    pub lifetime_jitter: Option<f64>,
    /// Time a client has to close after `reconnect` before the server closes, e.g. 30s.
    #[arg(long, env = "PUSH_RECONNECT_GRACE", value_parser = parse_duration)]
    pub reconnect_grace: Option<Duration>,
    /// Heartbeat interval (WebSocket ping, SSE comment), e.g. 30s.
    #[arg(long, env = "PUSH_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Silence after which a WebSocket client is taken for dead, e.g. 75s.
    #[arg(long, env = "PUSH_HEARTBEAT_TIMEOUT", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// Window over which SIGTERM spreads `reconnect` to all clients, e.g. 60s.
    #[arg(long, env = "PUSH_DRAIN_WINDOW", value_parser = parse_duration)]
    pub drain_window: Option<Duration>,
    /// Time allowed for a client's request head (slowloris guard), e.g. 10s.
    #[arg(long, env = "PUSH_HANDSHAKE_TIMEOUT", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Largest request head, bytes.
    #[arg(long, env = "PUSH_MAX_HEAD_BYTES")]
    pub max_head_bytes: Option<usize>,
    /// Largest message (client frame or admin payload), bytes.
    #[arg(long, env = "PUSH_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most frames queued for one connection that reads slowly.
    #[arg(long, env = "PUSH_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Most bytes queued for one connection that reads slowly.
    #[arg(long, env = "PUSH_MAX_QUEUE_BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// What to do with a connection whose queue is full.
    #[arg(long, env = "PUSH_SLOW_CONSUMER", value_enum)]
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// How long a client may leave a full queue undrained before it is a slow consumer, e.g. 2s.
    #[arg(long, env = "PUSH_SLOW_CONSUMER_TIMEOUT", value_parser = parse_duration)]
    pub slow_consumer_timeout: Option<Duration>,
    /// Acknowledgements per second allowed per connection.
    #[arg(long, env = "PUSH_ACK_RATE")]
    pub ack_rate: Option<u32>,
    /// Connects per second allowed per client IP (0 disables the limit).
    #[arg(long, env = "PUSH_PER_IP_RATE")]
    pub per_ip_rate: Option<f64>,
    /// Burst of connects allowed per client IP.
    #[arg(long, env = "PUSH_PER_IP_BURST")]
    pub per_ip_burst: Option<u32>,
    /// Most connections in their handshake at once.
    #[arg(long, env = "PUSH_MAX_PENDING_HANDSHAKES")]
    pub max_pending_handshakes: Option<usize>,
    /// How often lifecycle checks run, e.g. 500ms.
    #[arg(long, env = "PUSH_SWEEP_INTERVAL", value_parser = parse_duration)]
    pub sweep_interval: Option<Duration>,
    /// Log format.
    #[arg(long, env = "PUSH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Registry URL: memory, redis://host:port, redis-cluster://h1:p1,h2:p2,
    /// ring://h1:p1,…?racks=3&read=quorum&write=quorum, or none (pushes only through this
    /// node's admin API).
    #[arg(long, env = "PUSH_REGISTRY")]
    pub registry: Option<String>,
    /// Registry record TTL without refresh, e.g. 90s (refreshed every third of it).
    #[arg(long, env = "PUSH_REGISTRY_TTL", value_parser = parse_duration)]
    pub registry_ttl: Option<Duration>,
    /// host:port at which the message processor reaches this node's admin port.
    #[arg(long, env = "PUSH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Most messages kept per user for resume (`?since=`, `Last-Event-ID`); 0 keeps none.
    #[arg(long, env = "PUSH_HISTORY_MESSAGES")]
    pub history_messages: Option<usize>,
    /// How long messages are kept for resume, e.g. 5m.
    #[arg(long, env = "PUSH_HISTORY_AGE", value_parser = parse_duration)]
    pub history_age: Option<Duration>,
    /// Kafka bootstrap servers (host:port,…) to publish delivery receipts to.
    #[arg(long, env = "PUSH_RECEIPTS_BROKERS")]
    pub receipts_brokers: Option<String>,
    /// Kafka topic for delivery receipts.
    #[arg(long, env = "PUSH_RECEIPTS_TOPIC")]
    pub receipts_topic: Option<String>,
    /// Serve a demo page at `/demo` on the admin port, built on the JavaScript client.
    #[arg(long, env = "PUSH_DEMO", num_args = 0..=1, default_missing_value = "true")]
    pub demo: Option<bool>,
    // Admission limits (issue 14).
    /// Most connections of one IPv4 address or IPv6 /64 in their handshake at once (0: no cap).
    #[arg(long, env = "PUSH_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<usize>,
    /// Time a new connection may stay silent before its first byte, e.g. 3s.
    #[arg(long, env = "PUSH_FIRST_BYTE_TIMEOUT", value_parser = parse_duration)]
    pub first_byte_timeout: Option<Duration>,
    /// Most connections of one user on this node; newer ones get 429 (0: no cap).
    #[arg(long, env = "PUSH_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Most connections of one IPv4 address or IPv6 /64 on this node (0: no cap).
    #[arg(long, env = "PUSH_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Admin port and secrets hardening.
    #[command(flatten)]
    pub admin_security: AdminSecurityArgs,
}

/// The same settings as read from a TOML file. Unknown keys are an error, so a typo does
/// not silently leave a default in place.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    node_id: Option<String>,
    auth_secret: Option<String>,
    admin_token: Option<String>,
    max_connections: Option<usize>,
    reuse_port: Option<bool>,
    backlog: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    lifetime: Option<Duration>,
    lifetime_jitter: Option<f64>,
    #[serde(default, with = "humantime_serde_opt")]
    reconnect_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    drain_window: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    handshake_timeout: Option<Duration>,
    max_head_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    max_queue: Option<usize>,
    max_queue_bytes: Option<usize>,
    slow_consumer: Option<SlowConsumerPolicy>,
    #[serde(default, with = "humantime_serde_opt")]
    slow_consumer_timeout: Option<Duration>,
    ack_rate: Option<u32>,
    per_ip_rate: Option<f64>,
    per_ip_burst: Option<u32>,
    max_pending_handshakes: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    sweep_interval: Option<Duration>,
    log_format: Option<LogFormat>,
    registry: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    registry_ttl: Option<Duration>,
    advertise_addr: Option<String>,
    history_messages: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    history_age: Option<Duration>,
    receipts_brokers: Option<String>,
    receipts_topic: Option<String>,
    demo: Option<bool>,
    // Admission limits (issue 14).
    max_pending_per_ip: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    first_byte_timeout: Option<Duration>,
    max_connections_per_user: Option<usize>,
    max_connections_per_ip: Option<usize>,
    // Admin port and secrets (issue 14, harden-admin): see AdminSecurityArgs.
    internal_secret: Option<String>,
    admin_insecure: Option<bool>,
    admin_allowed_hosts: Option<Vec<String>>,
    admin_max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    admin_header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    admin_body_timeout: Option<Duration>,
    peer_nets: Option<String>,
    allow_tokens_without_exp: Option<bool>,
    token_issuer: Option<String>,
    token_audience: Option<String>,
}

mod humantime_serde_opt {
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
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        self.merge(file)
    }

    /// Merges these values over `file` over the defaults, then validates.
    pub fn merge(&self, file: FileConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        let dl = d.lifecycle.clone();
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                self.$field
                    .clone()
                    .or(file.$field.clone())
                    .unwrap_or($default)
            };
        }
        let (admin_security, allow_without_exp) = self.admin_security.merge(&file)?;
        let cfg = Config {
            listen: pick!(listen, d.listen),
            admin_listen: pick!(admin_listen, d.admin_listen),
            node_id: pick!(node_id, d.node_id),
            auth_secret: self.auth_secret.clone().or(file.auth_secret.clone()),
            require_exp: !allow_without_exp,
            admin_token: self.admin_token.clone().or(file.admin_token.clone()),
            max_connections: pick!(max_connections, d.max_connections),
            reuse_port: pick!(reuse_port, d.reuse_port),
            backlog: pick!(backlog, d.backlog),
            lifecycle: Policy {
                lifetime: pick!(lifetime, dl.lifetime),
                lifetime_jitter: pick!(lifetime_jitter, dl.lifetime_jitter),
                reconnect_grace: pick!(reconnect_grace, dl.reconnect_grace),
                heartbeat_interval: pick!(heartbeat_interval, dl.heartbeat_interval),
                heartbeat_timeout: pick!(heartbeat_timeout, dl.heartbeat_timeout),
                drain_window: pick!(drain_window, dl.drain_window),
            },
            handshake_timeout: pick!(handshake_timeout, d.handshake_timeout),
            max_head_bytes: pick!(max_head_bytes, d.max_head_bytes),
            max_message_bytes: pick!(max_message_bytes, d.max_message_bytes),
            max_queue: pick!(max_queue, d.max_queue),
            max_queue_bytes: pick!(max_queue_bytes, d.max_queue_bytes),
            slow_consumer: pick!(slow_consumer, d.slow_consumer),
            slow_consumer_timeout: pick!(slow_consumer_timeout, d.slow_consumer_timeout),
            ack_rate: pick!(ack_rate, d.ack_rate),
            per_ip_rate: pick!(per_ip_rate, d.per_ip_rate),
            per_ip_burst: pick!(per_ip_burst, d.per_ip_burst),
            max_pending_handshakes: pick!(max_pending_handshakes, d.max_pending_handshakes),
            sweep_interval: pick!(sweep_interval, d.sweep_interval),
            log_format: pick!(log_format, d.log_format),
            registry: pick!(registry, d.registry),
            registry_ttl: pick!(registry_ttl, d.registry_ttl),
            advertise_addr: self.advertise_addr.clone().or(file.advertise_addr.clone()),
            history_messages: pick!(history_messages, d.history_messages),
            history_age: pick!(history_age, d.history_age),
            receipts_brokers: self
                .receipts_brokers
                .clone()
                .or(file.receipts_brokers.clone()),
            receipts_topic: pick!(receipts_topic, d.receipts_topic),
            demo: pick!(demo, d.demo),
            #[cfg(feature = "autobahn-echo")]
            echo: false,
            max_pending_per_ip: pick!(max_pending_per_ip, d.max_pending_per_ip),
            first_byte_timeout: pick!(first_byte_timeout, d.first_byte_timeout),
            max_connections_per_user: pick!(max_connections_per_user, d.max_connections_per_user),
            max_connections_per_ip: pick!(max_connections_per_ip, d.max_connections_per_ip),
            admin_security,
        };
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
        if self.registry != NO_REGISTRY {
            push_registry::url::parse(&self.registry)
                .map_err(|e| invalid("registry", e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(a: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("push-server").chain(a.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file: FileConfig = toml::from_str(
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
        assert!(toml::from_str::<FileConfig>("max_conections = 1").is_err());
    }

    #[test]
    fn invalid_relations_are_refused() {
        let err = args(&["--heartbeat-interval", "60s", "--heartbeat-timeout", "30s"])
            .merge(FileConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("heartbeat_timeout"), "{err}");
        assert!(args(&["--auth-secret", "short"])
            .merge(FileConfig::default())
            .is_err());
        assert!(args(&["--lifetime-jitter", "1.5"])
            .merge(FileConfig::default())
            .is_err());
    }

    #[test]
    fn history_and_receipt_settings() {
        let file: FileConfig = toml::from_str(
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
            .merge(FileConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("history_messages"), "{err}");
        assert!(args(&["--history-age", "0s"])
            .merge(FileConfig::default())
            .is_err());
    }

    #[test]
    fn delivery_limits() {
        let d = Config::default();
        assert_eq!(d.slow_consumer_timeout, Duration::from_secs(2));
        assert_eq!(d.ack_rate, 100);
        let file: FileConfig =
            toml::from_str("slow_consumer_timeout = \"500ms\"\nack_rate = 7").unwrap();
        let cfg = args(&[]).merge(file).unwrap();
        assert_eq!(cfg.slow_consumer_timeout, Duration::from_millis(500));
        assert_eq!(cfg.ack_rate, 7);
        let cfg = args(&["--slow-consumer-timeout", "3s", "--ack-rate", "9"])
            .merge(FileConfig::default())
            .unwrap();
        assert_eq!(cfg.slow_consumer_timeout, Duration::from_secs(3));
        assert_eq!(cfg.ack_rate, 9);
        assert!(args(&["--slow-consumer-timeout", "0s"])
            .merge(FileConfig::default())
            .is_err());
        assert!(args(&["--ack-rate", "0"])
            .merge(FileConfig::default())
            .is_err());
    }

    #[test]
    fn admission_limits_have_defaults_flags_env_and_file_keys() {
        let d = Config::default();
        assert_eq!(d.max_pending_per_ip, 32);
        assert_eq!(d.first_byte_timeout, Duration::from_secs(3));
        assert_eq!(d.max_connections_per_user, 16);
        assert_eq!(d.max_connections_per_ip, 4096);
        let file: FileConfig = toml::from_str(
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
            .merge(FileConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("first_byte_timeout"), "{err}");
    }

    #[test]
    fn admin_security_settings() {
        let file: FileConfig = toml::from_str(
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
            .merge(FileConfig::default())
            .unwrap();
        assert!(!lax.require_exp);
        let d = Config::default().admin_security;
        assert_eq!(d.admin_max_connections, 256);
        assert!(!d.peer_nets.contains("10.1.2.3".parse().unwrap()));
        // A public admin port needs a token or the explicit opt-out.
        let err = args(&["--admin-listen", "0.0.0.0:9090"])
            .merge(FileConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("--admin-insecure"), "{err}");
        assert!(
            args(&["--admin-listen", "0.0.0.0:9090", "--admin-insecure"])
                .merge(FileConfig::default())
                .is_ok()
        );
        assert!(args(&[
            "--admin-listen",
            "0.0.0.0:9090",
            "--admin-token",
            "admin-token-0123456789"
        ])
        .merge(FileConfig::default())
        .is_ok());
        for short in [["--admin-token", "short"], ["--internal-secret", "short"]] {
            let err = args(&short).merge(FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains("at least 16"), "{err}");
        }
        assert!(args(&["--peer-nets", "10.0.0.0/40"])
            .merge(FileConfig::default())
            .is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
    }
}
