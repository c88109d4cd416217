//! `gabo`: apply, delete, types, serve, dedup, audit. See docs/gabo.md.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gabo::completionist::Completionist;
use gabo::dedup::{Closed, DedupError, DedupOptions};
use gabo::envelope::Limits;
use gabo::gateway::{Gateway, GatewaySettings};
use gabo::hour::Hour;
use gabo::provision::{self, Admin};
use gabo::staging::Staging;
use gabo::store::Store;
use gabo::writer::{Writer, WriterSettings};

#[derive(Parser, Debug)]
#[command(
    name = "gabo",
    about = "Event delivery that provisions itself; hourly deduplicated buckets"
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "GABO_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    brokers: String,
    /// Extra librdkafka setting for every client, `key=value` (repeatable).
    #[arg(long = "kafka", value_parser = parse_kv, global = true)]
    kafka: Vec<(String, String)>,
    /// Output root: a directory or file:// URL (buckets, markers, ledger, declarations).
    #[arg(
        long,
        env = "GABO_ROOT",
        default_value = "gabo-data/out",
        global = true
    )]
    root: String,
    /// The writer's local staging directory (also read by `dedup`).
    #[arg(
        long,
        env = "GABO_STAGING",
        default_value = "gabo-data/staging",
        global = true
    )]
    staging: PathBuf,
    /// How long one Kafka admin request (apply, types, delete) may take.
    #[arg(
        long,
        env = "GABO_ADMIN_TIMEOUT",
        default_value = "15s",
        value_parser = humantime::parse_duration,
        global = true
    )]
    admin_timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or change what the declared types need (shows the plan first).
    Apply {
        /// The types file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Replication of created topics (-1: the broker's default).
        #[arg(long, default_value_t = -1)]
        replication: i32,
    },
    /// Remove a type: its topic, consumer group and output location.
    Delete {
        /// The type.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// List applied types and their state.
    Types,
    /// Run the gateway, the writer and the completionist (all by default).
    Serve {
        /// Parts to run (repeatable); default all three.
        #[arg(long = "part", value_enum)]
        parts: Vec<Part>,
        /// Gateway address.
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: SocketAddr,
        /// Metrics address when the gateway does not run (it serves /metrics itself).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// How long after an hour's end its events may still arrive (>= the produce timeout).
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Gateway: how long a produce may wait for the broker's ack before answering 503.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        produce_timeout: Duration,
        /// Gateway: largest request body in bytes.
        #[arg(long, default_value_t = Limits::default().max_body)]
        max_body: usize,
        /// Gateway: most events per request.
        #[arg(long, default_value_t = Limits::default().max_events)]
        max_events: usize,
        /// Dedup memory limit (e.g. 256MiB).
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        memory_limit: usize,
        /// How often the completionist looks for complete hours.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        check_every: Duration,
    },
    /// Close one hour: dedup its staging into the bucket and write the marker.
    Dedup {
        /// The type.
        name: String,
        /// The hour, e.g. 2026-11-29T14.
        hour: Hour,
        /// Close it even if the completeness rule says it is not complete.
        #[arg(long)]
        force: bool,
        /// See `serve --grace`.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Memory limit (e.g. 256MiB); beyond it the dedup spills to disk.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        memory_limit: usize,
    },
    /// Check that accepted = unique + duplicates + late for a closed hour.
    Audit {
        /// The type.
        name: String,
        /// The hour.
        hour: Hour,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Gateway,
    Writer,
    Completionist,
}

/// Exit code of `gabo dedup` for an hour that is not complete yet: Styx's "missing dependency"
/// code, which Styx retries 10 minutes later at a tenth of a failure's cost (waiting for data
/// is normal), so the shipped workflows need no retry settings of their own.
const EXIT_NOT_YET: u8 = 20;

/// Exit code of `gabo audit` for an hour without a marker (1 is kept for "unbalanced").
const EXIT_NOT_CLOSED: u8 = 2;

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    num.trim()
        .parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a size (e.g. 268435456, 256MiB, 1GiB)"))
}

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init_logging(telemetry::LogFormat::Human, "info,datafusion=warn");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let store = Store::open(&cli.root)?;
    match cli.cmd {
        Cmd::Apply {
            file,
            dry_run,
            replication,
        } => {
            let types = gabo::types::load(&file)?;
            let mut admin = Admin::connect(&cli.brokers, &cli.kafka)?;
            admin.timeout = cli.admin_timeout;
            admin.replication = replication;
            let topics = admin.topics(&types, true).await?;
            let applied = provision::applied(&store)
                .await?
                .into_iter()
                .map(|t| (t.name.clone(), t.raw()))
                .collect();
            let changes = provision::plan(&types, &topics, &applied);
            if changes.is_empty() {
                println!("nothing to change ({} types up to date)", types.len());
                return Ok(ExitCode::SUCCESS);
            }
            for c in &changes {
                println!("{c}");
            }
            if dry_run {
                println!("(dry run: nothing applied)");
                return Ok(ExitCode::SUCCESS);
            }
            admin.apply(&changes, &store).await?;
            println!("applied {} changes", changes.len());
        }
        Cmd::Delete { name, yes } => {
            let types = provision::applied(&store).await?;
            let t = types
                .iter()
                .find(|t| t.name == name)
                .with_context(|| format!("no applied type `{name}`"))?;
            println!(
                "delete type {name}: {}consumer group {}, every object under {}{name}/",
                if t.source_topic.is_none() {
                    format!("topic {}, ", t.topic())
                } else {
                    String::new()
                },
                t.group(),
                store.url
            );
            if !yes {
                println!("type the type's name to confirm:");
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != name {
                    println!("not confirmed; nothing deleted");
                    return Ok(ExitCode::from(1));
                }
            }
            let mut admin = Admin::connect(&cli.brokers, &cli.kafka)?;
            admin.timeout = cli.admin_timeout;
            for d in admin.delete(t).await? {
                println!("{d}");
            }
            // librdkafka 2.12 aborts (`rd_kafka_q_destroy0: assert: rkq->rkq_refcnt > 0`) when
            // an admin client whose DeleteGroups the broker did not support is destroyed (seen
            // on its mock cluster). The process ends right after this command, so the client
            // is left to the exit rather than destroyed.
            std::mem::forget(admin);
            let n = store.delete_prefix(&name).await?;
            println!("deleted {n} objects under {name}/");
        }
        Cmd::Types => {
            let types = provision::applied(&store).await?;
            let mut admin = Admin::connect(&cli.brokers, &cli.kafka)?;
            admin.timeout = cli.admin_timeout;
            let topics = admin.topics(&types, false).await.unwrap_or_default();
            let staging = Staging::open(&cli.staging)?;
            println!(
                "{:<24} {:<14} {:<28} {:<12} {:>6} {:>6}  state",
                "TYPE", "OWNER", "TOPIC", "PARTITIONS", "OPEN", "CLOSED"
            );
            for t in &types {
                let topic = t.topic();
                let (parts, state) = match topics.get(&topic) {
                    None => ("-".to_string(), "topic missing (run apply)"),
                    Some(s) if t.source_topic.is_none() && s.partitions != t.partitions => (
                        format!("{}/{}", s.partitions, t.partitions),
                        "partitions differ (run apply)",
                    ),
                    Some(s) => (s.partitions.to_string(), "ok"),
                };
                let hours = staging.hours(&t.name).unwrap_or_default();
                let open = hours.iter().filter(|(_, f)| !f).count();
                let closed = store
                    .list(&t.name)
                    .await?
                    .iter()
                    .filter(|p| p.ends_with("/_SUCCESS"))
                    .count();
                println!(
                    "{:<24} {:<14} {:<28} {:<12} {:>6} {:>6}  {state}",
                    t.name, t.owner, topic, parts, open, closed
                );
            }
        }
        Cmd::Serve {
            parts,
            listen,
            metrics,
            grace,
            produce_timeout,
            max_body,
            max_events,
            memory_limit,
            check_every,
        } => {
            let parts = if parts.is_empty() {
                vec![Part::Gateway, Part::Writer, Part::Completionist]
            } else {
                parts
            };
            let types = provision::applied(&store).await?;
            anyhow::ensure!(
                !types.is_empty(),
                "no types applied under {}: run `gabo apply -f types.yaml` first",
                store.url
            );
            let handle = gabo::metrics::install();
            let staging = Staging::open(&cli.staging)?;
            let mut _gateway = None;
            let mut _writers = Vec::new();
            let mut _completionist = None;
            if parts.contains(&Part::Gateway) {
                let mut s = GatewaySettings::new(&cli.brokers);
                s.kafka = cli.kafka.clone();
                s.produce_timeout = produce_timeout;
                s.limits = Limits {
                    max_body,
                    max_events,
                };
                s.metrics = Some(handle.clone());
                let listener = tokio::net::TcpListener::bind(listen).await?;
                let g = Gateway::start(listener, &types, store.clone(), s)?;
                println!("gateway listening on http://{}", g.addr());
                _gateway = Some(g);
            } else if let Some(addr) = metrics {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let h = handle.clone();
                tokio::spawn(serve_metrics(listener, h));
            }
            if parts.contains(&Part::Writer) {
                for t in &types {
                    let mut s = WriterSettings::new(&cli.brokers);
                    s.kafka = cli.kafka.clone();
                    _writers.push(Writer::start(t.clone(), staging.clone(), store.clone(), s)?);
                }
                println!("writers running for {} types", types.len());
            }
            if parts.contains(&Part::Completionist) {
                let mut o = DedupOptions::new(cli.staging.join("_spill"));
                o.grace = grace;
                o.memory_limit = memory_limit;
                _completionist = Some(Completionist::start(
                    types.clone(),
                    staging.clone(),
                    store.clone(),
                    o,
                    check_every,
                ));
                println!(
                    "completionist checking every {}",
                    humantime::format_duration(check_every)
                );
            }
            tokio::signal::ctrl_c().await?;
            println!("stopping");
        }
        Cmd::Dedup {
            name,
            hour,
            force,
            grace,
            memory_limit,
        } => {
            let staging = Staging::open(&cli.staging)?;
            let mut o = DedupOptions::new(cli.staging.join("_spill"));
            o.force = force;
            o.grace = grace;
            o.memory_limit = memory_limit;
            match gabo::dedup::dedup(&name, hour, &staging, &store, &o).await {
                Ok(Closed::Now(m, spilled)) => {
                    println!("closed {name} {hour}: {}", serde_json::to_string(&m)?);
                    println!("spilled {} files, {} bytes", spilled.files, spilled.bytes);
                }
                Ok(Closed::Before(m)) => println!(
                    "{name} {hour} was already closed (never rewritten): {}",
                    serde_json::to_string(&m)?
                ),
                Err(e @ DedupError::Incomplete { .. }) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(EXIT_NOT_YET));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Audit { name, hour } => {
            let Some(a) = gabo::audit::audit(&store, &name, hour).await? else {
                eprintln!("{name} {hour} is not closed (no marker)");
                return Ok(ExitCode::from(EXIT_NOT_CLOSED));
            };
            println!("type        {name}");
            println!("hour        {hour}");
            println!("accepted    {}", a.accepted);
            println!("staged      {}", a.marker.staged);
            println!("unique      {}", a.marker.unique);
            println!("duplicates  {}", a.marker.duplicates);
            println!("late        {}", a.late);
            match a.check() {
                Ok(()) => println!("balanced: accepted = unique + duplicates + late"),
                Err(e) => {
                    println!("UNBALANCED: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    use http_body_util::Full;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let body = handle.render();
                async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        bytes::Bytes::from(body),
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
