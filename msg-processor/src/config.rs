//! Flags and `MSGPROC_*` environment variables → [`Settings`].

use std::net::SocketAddr;
use std::time::Duration;

/// A processor's settings, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The topic push-lib writes to.
    pub topic: String,
    /// Consumer group: processors with the same group share the partitions.
    pub group: String,
    /// Registry URL (push-registry): `redis://…`, `ring://…`, ...
    pub registry: String,
    /// The nodes' `--admin-token`: sent on the internal deliver endpoint when no internal
    /// secret is set (the nodes then check every message ID against the history).
    pub admin_token: Option<String>,
    /// The nodes' `--internal-secret`: the secret of the internal deliver endpoint.
    pub internal_secret: Option<String>,
    /// Networks that registry records may name as nodes (default loopback only).
    pub peer_nets: push_registry::PeerNets,
    /// Where malformed, refused and undeliverable messages go; `None` drops them (counted).
    pub dead_letter_topic: Option<String>,
    /// Where push outcomes go (one record per finished message, for GABO); `None`: nowhere.
    pub outcomes_topic: Option<String>,
    /// Brokers of the outcomes topic; `None`: [`Settings::brokers`].
    pub outcomes_brokers: Option<String>,
    /// Most outcome records queued for the broker; beyond it they are dropped (counted).
    pub outcomes_queue: usize,
    /// Most messages of one partition processed as one batch (one registry round trip).
    pub batch_size: usize,
    /// How long a partition waits to fill a batch once it has a message. Zero: take what
    /// has arrived.
    pub batch_linger: Duration,
    /// Most batches in flight at once over all partitions.
    pub concurrency: usize,
    /// Messages buffered per partition ahead of its worker.
    pub partition_buffer: usize,
    /// Most messages per deliver request to a node.
    pub node_batch_max: usize,
    /// Deadline of one deliver request.
    pub deliver_timeout: Duration,
    /// Idle keep-alive connections per node.
    pub node_connections: usize,
    /// Delivery rounds per message; after the last, a message no node took is left in the
    /// history for the user's next resume.
    pub max_attempts: u32,
    /// First backoff after a round with an unreachable node; doubles up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Longest backoff between rounds.
    pub retry_backoff_max: Duration,
    /// Where to serve `/metrics`; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Kafka consumer session timeout: how long a crashed processor holds its partitions.
    pub session_timeout: Duration,
    /// How long a graceful shutdown waits for batches in flight.
    pub shutdown_timeout: Duration,
    /// Extra librdkafka properties for the consumer and the dead-letter producer.
    pub kafka: Vec<(String, String)>,
    /// Limits of each user's history (kept in the registry's storage): must match the
    /// nodes' `--history-messages` and `--history-age`.
    pub history: push_registry::BufferLimits,
}

impl Settings {
    /// Defaults for everything but where to connect.
    pub fn new(
        brokers: impl Into<String>,
        topic: impl Into<String>,
        group: impl Into<String>,
        registry: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            group: group.into(),
            registry: registry.into(),
            admin_token: None,
            internal_secret: None,
            peer_nets: push_registry::PeerNets::default(),
            dead_letter_topic: None,
            outcomes_topic: None,
            outcomes_brokers: None,
            outcomes_queue: 100_000,
            batch_size: 500,
            batch_linger: Duration::from_millis(2),
            concurrency: 64,
            partition_buffer: 1000,
            node_batch_max: 1000,
            deliver_timeout: Duration::from_secs(5),
            node_connections: 8,
            max_attempts: 8,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
            metrics_listen: None,
            session_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            kafka: Vec::new(),
            history: push_registry::BufferLimits::default(),
        }
    }

    /// Checks the bounds the processor relies on.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let positive = [
            ("batch-size", self.batch_size),
            ("concurrency", self.concurrency),
            ("partition-buffer", self.partition_buffer),
            ("node-batch-max", self.node_batch_max),
            ("max-attempts", self.max_attempts as usize),
            ("outcomes-queue", self.outcomes_queue),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(SettingsError::Zero(name));
            }
        }
        // push-server refuses batches over 10,000 items.
        if self.node_batch_max > push_lib::direct::MAX_ITEMS_PER_REQUEST {
            return Err(SettingsError::NodeBatchMax {
                max: push_lib::direct::MAX_ITEMS_PER_REQUEST,
            });
        }
        if self.brokers.is_empty() || self.topic.is_empty() || self.group.is_empty() {
            return Err(SettingsError::NoKafka);
        }
        Ok(())
    }
}

/// A setting the processor cannot run with; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A count that must be positive is 0.
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    /// More items per deliver request than push-server takes.
    #[error("--node-batch-max must be at most {max}")]
    NodeBatchMax {
        /// push-server's limit.
        max: usize,
    },
    /// No brokers, topic or group.
    #[error("--brokers, --topic and --group must not be empty")]
    NoKafka,
    /// `--peer-nets` does not parse (the reason names the bad item).
    #[error("--peer-nets: {0}")]
    PeerNets(String),
    /// A `--kafka-set` without `=`.
    #[error("--kafka-set {0:?}: expected KEY=VALUE")]
    KafkaSet(String),
}

/// Command-line flags; each also reads `MSGPROC_<NAME>` from the environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "msg-processor",
    version,
    about = "Consumes the push topic and delivers each message to the node that holds the user"
)]
pub struct Args {
    /// Kafka bootstrap servers, `host:port,...`.
    #[arg(long, env = "MSGPROC_BROKERS")]
    pub brokers: String,
    /// Topic to consume.
    #[arg(long, env = "MSGPROC_TOPIC", default_value = "push")]
    pub topic: String,
    /// Consumer group shared by all processors.
    #[arg(long, env = "MSGPROC_GROUP", default_value = "msg-processor")]
    pub group: String,
    /// Registry URL: `redis://host:port`, `redis-cluster://…`, `ring://…` (see push-registry).
    #[arg(long, env = "MSGPROC_REGISTRY")]
    pub registry: String,
    /// The nodes' admin token (sent to `/internal/v1/deliver` when no internal secret is set).
    #[arg(long, env = "MSGPROC_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The nodes' `--internal-secret` (the secret of `/internal/v1/deliver`).
    #[arg(long, env = "MSGPROC_INTERNAL_SECRET", hide_env_values = true)]
    pub internal_secret: Option<String>,
    /// Networks (CIDRs, comma-separated, or `any`) that registry records may name as nodes
    /// to deliver to; a record outside them gets nothing (its messages stay in the history).
    #[arg(long, env = "MSGPROC_PEER_NETS", default_value = push_registry::peer_nets::DEFAULT_PEER_NETS)]
    pub peer_nets: String,
    /// Topic for malformed, refused and undeliverable messages; without it they are dropped
    /// (and counted).
    #[arg(long, env = "MSGPROC_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Topic for push outcomes (one JSON record per finished message: delivered, stored,
    /// expired, dead_lettered), e.g. `push-outcomes` for GABO; off by default. Never slows
    /// delivery: when the queue is full or the broker is down, outcomes are dropped (counted
    /// in `msgproc_outcomes_dropped_total`).
    #[arg(long, env = "MSGPROC_OUTCOMES_TOPIC")]
    pub outcomes_topic: Option<String>,
    /// Brokers of the outcomes topic (default: `--brokers`).
    #[arg(long, env = "MSGPROC_OUTCOMES_BROKERS")]
    pub outcomes_brokers: Option<String>,
    /// Most outcome records waiting for the broker; more are dropped.
    #[arg(long, env = "MSGPROC_OUTCOMES_QUEUE", default_value_t = 100_000)]
    pub outcomes_queue: usize,
    /// Most messages of a partition per batch.
    #[arg(long, env = "MSGPROC_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Wait this long to fill a batch (e.g. `2ms`; `0s` disables).
    #[arg(long, env = "MSGPROC_BATCH_LINGER", default_value = "2ms", value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,
    /// Most batches in flight at once over all partitions.
    #[arg(long, env = "MSGPROC_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Messages buffered per partition.
    #[arg(long, env = "MSGPROC_PARTITION_BUFFER", default_value_t = 1000)]
    pub partition_buffer: usize,
    /// Most messages per deliver request.
    #[arg(long, env = "MSGPROC_NODE_BATCH_MAX", default_value_t = 1000)]
    pub node_batch_max: usize,
    /// Deadline of one deliver request.
    #[arg(long, env = "MSGPROC_DELIVER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub deliver_timeout: Duration,
    /// Idle keep-alive connections per node.
    #[arg(long, env = "MSGPROC_NODE_CONNECTIONS", default_value_t = 8)]
    pub node_connections: usize,
    /// Delivery rounds before a message whose node stays unreachable is left to resume.
    #[arg(long, env = "MSGPROC_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// First retry backoff (doubles each round).
    #[arg(long, env = "MSGPROC_RETRY_BACKOFF", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Longest retry backoff.
    #[arg(long, env = "MSGPROC_RETRY_BACKOFF_MAX", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_backoff_max: Duration,
    /// Serve `/metrics` and `/healthz` here.
    #[arg(long, env = "MSGPROC_METRICS_LISTEN", default_value = "127.0.0.1:9100")]
    pub metrics_listen: Option<SocketAddr>,
    /// How long a crashed processor keeps its partitions before the group reassigns them.
    #[arg(long, env = "MSGPROC_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,
    /// How long SIGTERM waits for batches in flight before leaving the group.
    #[arg(long, env = "MSGPROC_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Extra librdkafka property, `key=value` (repeatable), e.g. `security.protocol=ssl`.
    #[arg(long = "kafka-set", value_name = "KEY=VALUE")]
    pub kafka_set: Vec<String>,
    /// Most messages kept per user for resume (the nodes' `--history-messages`).
    #[arg(long, env = "MSGPROC_HISTORY_MESSAGES", default_value_t = 100)]
    pub history_messages: usize,
    /// How long messages are kept for resume (the nodes' `--history-age`).
    #[arg(long, env = "MSGPROC_HISTORY_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub history_age: Duration,
    /// Log format: `human` or `json`; level from `RUST_LOG`.
    #[arg(long, env = "MSGPROC_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: telemetry::LogFormat,
    /// Span export.
    #[command(flatten)]
    pub otlp: telemetry::OtlpArgs,
}

impl Args {
    /// Validated settings.
    pub fn settings(&self) -> Result<Settings, SettingsError> {
        let mut s = Settings::new(&self.brokers, &self.topic, &self.group, &self.registry);
        s.admin_token = self.admin_token.clone();
        s.internal_secret = self.internal_secret.clone();
        s.peer_nets = push_registry::PeerNets::parse(&self.peer_nets)
            .map_err(|e| SettingsError::PeerNets(e.to_string()))?;
        s.dead_letter_topic = self.dead_letter_topic.clone();
        s.outcomes_topic = self.outcomes_topic.clone();
        s.outcomes_brokers = self.outcomes_brokers.clone();
        s.outcomes_queue = self.outcomes_queue;
        s.batch_size = self.batch_size;
        s.batch_linger = self.batch_linger;
        s.concurrency = self.concurrency;
        s.partition_buffer = self.partition_buffer;
        s.node_batch_max = self.node_batch_max;
        s.deliver_timeout = self.deliver_timeout;
        s.node_connections = self.node_connections;
        s.max_attempts = self.max_attempts;
        s.retry_backoff = self.retry_backoff;
        s.retry_backoff_max = self.retry_backoff_max;
        s.metrics_listen = self.metrics_listen;
        s.session_timeout = self.session_timeout;
        s.shutdown_timeout = self.shutdown_timeout;
        s.history = push_registry::BufferLimits {
            max_messages: self.history_messages,
            max_age: self.history_age,
        };
        for kv in &self.kafka_set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| SettingsError::KafkaSet(kv.clone()))?;
            s.kafka.push((k.to_owned(), v.to_owned()));
        }
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn flags_become_settings() {
        let args = Args::try_parse_from([
            "msg-processor",
            "--brokers",
            "b:9092",
            "--registry",
            "redis://127.0.0.1:6379",
            "--batch-size",
            "50",
            "--retry-backoff",
            "10ms",
            "--kafka-set",
            "fetch.wait.max.ms=10",
        ])
        .unwrap();
        let s = args.settings().unwrap();
        assert_eq!(s.topic, "push");
        assert_eq!(s.batch_size, 50);
        assert_eq!(s.retry_backoff, Duration::from_millis(10));
        assert_eq!(s.kafka, [("fetch.wait.max.ms".into(), "10".into())]);
        assert_eq!(s.outcomes_topic, None, "outcomes are off by default");
        assert_eq!(s.outcomes_queue, 100_000);
    }

    #[test]
    fn secrets_do_not_show_in_help() {
        use clap::CommandFactory as _;
        std::env::set_var("MSGPROC_ADMIN_TOKEN", "visible-admin-token-value");
        std::env::set_var("MSGPROC_INTERNAL_SECRET", "visible-internal-secret");
        let help = Args::command().render_long_help().to_string();
        std::env::remove_var("MSGPROC_ADMIN_TOKEN");
        std::env::remove_var("MSGPROC_INTERNAL_SECRET");
        assert!(help.contains("MSGPROC_ADMIN_TOKEN"), "{help}");
        assert!(!help.contains("visible-admin-token-value"), "{help}");
        assert!(!help.contains("visible-internal-secret"), "{help}");
    }

    #[test]
    fn peer_nets_default_to_loopback_and_parse() {
        let base = [
            "msg-processor",
            "--brokers",
            "b:9092",
            "--registry",
            "memory",
        ];
        let s = Args::try_parse_from(base).unwrap().settings().unwrap();
        assert!(s.peer_nets.contains("127.0.0.1".parse().unwrap()));
        assert!(!s.peer_nets.contains("10.0.0.1".parse().unwrap()));
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--peer-nets", "10.0.0.0/8"]);
        let s = Args::try_parse_from(&args).unwrap().settings().unwrap();
        assert!(s.peer_nets.contains("10.0.0.1".parse().unwrap()));
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--peer-nets", "10.0.0.0/99"]);
        let err = Args::try_parse_from(&args).unwrap().settings().unwrap_err();
        assert!(matches!(&err, SettingsError::PeerNets(why) if why.contains("10.0.0.0/99")));
        assert!(err.to_string().starts_with("--peer-nets: "), "{err}");
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--kafka-set", "no-equals-sign"]);
        let err = Args::try_parse_from(&args).unwrap().settings().unwrap_err();
        assert_eq!(err, SettingsError::KafkaSet("no-equals-sign".into()));
    }

    #[test]
    fn bounds_are_checked() {
        let mut s = Settings::new("b", "t", "g", "memory");
        s.node_batch_max = 20_000;
        assert_eq!(
            s.validate(),
            Err(SettingsError::NodeBatchMax {
                max: push_lib::direct::MAX_ITEMS_PER_REQUEST
            })
        );
        s.node_batch_max = 1;
        s.batch_size = 0;
        assert_eq!(s.validate(), Err(SettingsError::Zero("batch-size")));
        s.batch_size = 1;
        s.outcomes_queue = 0;
        assert_eq!(s.validate(), Err(SettingsError::Zero("outcomes-queue")));
    }
}
