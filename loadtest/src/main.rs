//! `loadtest`: many well-behaved push clients and a pusher, with a verdict.
//!
//! Exit status: 0 when every check held, 1 when a message was lost or a check failed, 2 on
//! a setup error (bad flags, unreachable targets, a worker that would not start).

/// jemalloc, as in push-server: a worker process is up to ~19,900 clients' small, long-lived
/// allocations, and the million needs the load generator as lean as the nodes (2.32 KiB of
/// RSS per idle client with glibc malloc, 1.6 KiB with jemalloc: docs/BENCHMARKS.md, "The load
/// generator's bytes per client").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use loadtest::run::{self, RunConfig, Scenario};
use loadtest::worker::TransportMix;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "Load generator and correctness checker for push-server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold N connections for --duration (no pushes unless --rate).
    Idle(Common),
    /// Push at --rate through the admin API and measure end-to-end latency.
    Push(Common),
    /// Short lifetimes: start the servers with a short --lifetime, and/or use --client-lifetime.
    Churn(Common),
    /// Every client reconnects at once at --event-at.
    Storm(Common),
    /// SIGTERM --drain-pid at --event-at; its clients move to the other targets.
    Drain(Common),
    /// A worker process (started by the parent with --procs).
    #[command(hide = true)]
    Worker {
        /// The worker's settings, JSON (from the parent, in the environment).
        #[arg(long, env = run::WORKER_CONFIG_ENV, hide_env_values = true)]
        config: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("`{s}` is not a fraction in (0, 1], e.g. 0.5")),
    }
}

/// Flags of every scenario.
#[derive(Debug, clap::Args)]
struct Common {
    /// Client ports of the nodes (host:port, comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080")]
    targets: Vec<SocketAddr>,
    /// Admin ports of the nodes, in the same order.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9090")]
    admin_targets: Vec<SocketAddr>,
    /// Bearer token of the admin API, if the nodes run with --admin-token.
    #[arg(long, env = "LOADTEST_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// HS256 secret of the nodes (their --auth-secret).
    #[arg(long, env = "PUSH_AUTH_SECRET", hide_env_values = true)]
    secret: String,
    /// Clients (one user each).
    #[arg(long, short = 'n', default_value_t = 100)]
    clients: u64,
    /// Transport of the clients.
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportMix,
    /// Steady phase, after the ramp.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Most time for the first connects.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    ramp_timeout: Duration,
    /// Time after the last push for messages in flight.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    settle: Duration,
    /// Pushes per second (default: 0 for idle, 100 otherwise).
    #[arg(long)]
    rate: Option<f64>,
    /// Keep-alive HTTP connections of the pusher.
    #[arg(long, default_value_t = 32)]
    http_conns: usize,
    /// Also push to this many users that have no client (checks that losses are reported).
    #[arg(long, default_value_t = 0)]
    ghost_users: u64,
    /// Source addresses 127.0.0.2 .. per worker (one address has ~28k ports per target).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    sources: u8,
    /// First connects in flight per worker.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Ack every message (WebSocket).
    #[arg(long)]
    ack: bool,
    /// Clients drop their connection after about this long (0.5–1.5×) and reconnect.
    #[arg(long, value_parser = parse_duration)]
    client_lifetime: Option<Duration>,
    /// Bound of one connect + request + hello.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    connect_timeout: Duration,
    /// When in the steady phase the storm or drain happens (default: a third in).
    #[arg(long, value_parser = parse_duration)]
    event_at: Option<Duration>,
    /// Server process to SIGTERM (drain).
    #[arg(long)]
    drain_pid: Option<u32>,
    /// Push through push-lib and Kafka (these bootstrap servers) instead of the admin API;
    /// message processors must be running and the nodes must share their registry.
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Kafka mode: the topic the message processors consume.
    #[arg(long, default_value = "push")]
    kafka_topic: String,
    /// Kafka mode: extra librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(long = "kafka-set", value_name = "KEY=VALUE")]
    kafka_set: Vec<String>,
    /// Kafka mode: the fraction of messages sent through Kafka, spread evenly; the others
    /// go through the admin API (both paths in one run).
    #[arg(long, default_value_t = 1.0, value_parser = parse_share)]
    kafka_share: f64,
    /// Worker processes; each must stay under the open-files limit.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// User ID prefix.
    #[arg(long, default_value = "lt-")]
    prefix: String,
    /// Write the JSON report here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Raises the soft open-files limit to the hard one (children inherit it).
fn raise_nofile_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// File descriptors a worker needs besides its client sockets (stdio, epoll, pusher).
const SPARE_FDS: u64 = 128;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let limit = raise_nofile_limit();
    let result = runtime.block_on(async move {
        let (scenario, args) = match cli.command {
            Command::Worker { config } => {
                return loadtest::worker::child_main(&config).await.map(|()| true);
            }
            Command::Idle(a) => (Scenario::Idle, a),
            Command::Push(a) => (Scenario::Push, a),
            Command::Churn(a) => (Scenario::Churn, a),
            Command::Storm(a) => (Scenario::Storm, a),
            Command::Drain(a) => (Scenario::Drain, a),
        };
        let per_proc = args.clients.div_ceil(args.procs.max(1) as u64);
        anyhow::ensure!(
            per_proc + SPARE_FDS <= limit,
            "{per_proc} clients per process need about {} open files, the limit is {limit}: raise --procs",
            per_proc + SPARE_FDS
        );
        let json_out = args.json_out.clone();
        let cfg = config(scenario, args);
        let report = run::run(cfg).await?;
        print!("{}", run::table(&report));
        if let Some(path) = json_out {
            let json = serde_json::to_string_pretty(&report)?;
            std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(report.passed())
    });
    // Stdin readers and leftover sockets must not delay the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn config(scenario: Scenario, a: Common) -> RunConfig {
    let rate = a.rate.unwrap_or(if scenario == Scenario::Idle {
        0.0
    } else {
        100.0
    });
    RunConfig {
        scenario,
        clients: a.clients,
        targets: a.targets,
        admin_targets: a.admin_targets,
        admin_token: a.admin_token,
        secret: a.secret,
        transport: a.transport,
        duration: a.duration,
        ramp_timeout: a.ramp_timeout,
        settle: a.settle,
        rate,
        http_conns: a.http_conns,
        ghost_users: a.ghost_users,
        sources: a.sources,
        concurrency: a.concurrency,
        ack: a.ack,
        client_lifetime: a.client_lifetime,
        connect_timeout: a.connect_timeout,
        event_at: a.event_at.unwrap_or(a.duration / 3),
        drain_pid: a.drain_pid,
        kafka: a
            .kafka_brokers
            .map(|brokers| loadtest::pusher::KafkaTarget {
                brokers,
                topic: a.kafka_topic,
                extra: a
                    .kafka_set
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                share: a.kafka_share,
            }),
        procs: a.procs,
        prefix: a.prefix,
        progress: !a.quiet,
    }
}
