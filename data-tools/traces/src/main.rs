//! `traces`: the collector, span store and query API (`serve`), the SQL query runner
//! (`query`), and a rules checker (`sampling check`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use traces::kafka::{self, KafkaSettings, WriterSettings};
use traces::query::{self, Format};
use traces::server::{self, Settings};
use traces::store::SpanStore;

#[derive(Debug, Parser)]
#[command(
    name = "traces",
    version,
    about = "Trace collector, span store, sampling engine and query runner"
)]
struct Cli {
    /// Span store: a local directory (or file:///dir).
    #[arg(
        long,
        env = "TRACES_STORE",
        default_value = "data/traces",
        global = true
    )]
    store: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the collector (OTLP/HTTP), the Jaeger query and sampling APIs and the trace page.
    Serve {
        /// Address to listen on (4318 is OTLP/HTTP's port).
        #[arg(long, env = "TRACES_LISTEN", default_value = "127.0.0.1:4318")]
        listen: std::net::SocketAddr,
        /// Sampling rules in Jaeger's strategies JSON; reloaded when the file changes.
        #[arg(long, env = "TRACES_SAMPLING")]
        sampling: Option<PathBuf>,
        /// How often the sampling file is checked for changes.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        sampling_reload: Duration,
        /// Delete spans older than this (whole hours); 0 keeps everything.
        #[arg(long, env = "TRACES_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
        retention: Duration,
        /// Largest OTLP request body, bytes.
        #[arg(long, default_value_t = 8 << 20)]
        max_body: usize,
        /// Spans queued for the store before ingest answers 503 + Retry-After.
        #[arg(long, default_value_t = 200_000)]
        max_queue_spans: usize,
        /// How often queued spans are written to the store.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
        /// At scale: produce spans to Kafka (these brokers) for `traces store-writer`s
        /// instead of writing the store here. The store is still read for queries.
        #[arg(long, env = "TRACES_KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
        /// The spans topic.
        #[arg(long, env = "TRACES_KAFKA_TOPIC", default_value = "traces-spans")]
        kafka_topic: String,
    },
    /// At scale: consumes spans from Kafka and writes them to the store; run several with
    /// the same --group to share the topic's partitions.
    StoreWriter {
        /// Kafka brokers.
        #[arg(long, env = "TRACES_KAFKA_BROKERS")]
        kafka_brokers: String,
        /// The spans topic.
        #[arg(long, env = "TRACES_KAFKA_TOPIC", default_value = "traces-spans")]
        kafka_topic: String,
        /// Consumer group of the store's writers.
        #[arg(long, default_value = "traces-store")]
        group: String,
        /// How often consumed spans are written and their offsets committed.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        flush_interval: Duration,
    },
    /// Runs a SQL script over the spans that started in [--from, --to). The table is `spans`.
    Query {
        /// The script (several statements allowed; the last one's result is printed).
        file: PathBuf,
        /// Start: RFC 3339 time, or a duration before now (`1h`).
        #[arg(long, default_value = "1h")]
        from: String,
        /// End: RFC 3339 time, a duration before now, or `now`.
        #[arg(long, default_value = "now")]
        to: String,
        /// One hour instead of --from/--to: a Styx hourly partition such as `2026-11-29T14`.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        hour: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Memory the query may use before it spills to disk, bytes.
        #[arg(long, default_value_t = query::DEFAULT_MEMORY_LIMIT)]
        memory_limit: usize,
    },
    /// Checks a sampling rules file and prints the answer each listed service would get.
    Sampling {
        /// The rules file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    telemetry::init_logging(telemetry::LogFormat::Human, "info");
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("traces: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            sampling,
            sampling_reload,
            retention,
            max_body,
            max_queue_spans,
            flush_interval,
            kafka_brokers,
            kafka_topic,
        } => {
            let store = SpanStore::open(&cli.store)?;
            let settings = Settings {
                kafka: kafka_brokers.map(|brokers| KafkaSettings {
                    brokers,
                    topic: kafka_topic,
                }),
                listen,
                max_body,
                max_queue_spans,
                flush_interval,
                sampling_file: sampling,
                sampling_reload,
                retention: (!retention.is_zero()).then_some(retention),
                ..Settings::default()
            };
            let running = server::start(settings, store).await?;
            eprintln!(
                "traces: listening on http://{a} (OTLP/HTTP: http://{a}/v1/traces; Jaeger query: http://{a}/api; \
                 sampling: http://{a}/sampling?service=NAME; trace page: http://{a}/trace/ID)",
                a = running.addr
            );
            tokio::signal::ctrl_c().await?;
            eprintln!("traces: stopping; writing queued spans");
            running.shutdown().await;
            Ok(())
        }
        Command::StoreWriter {
            kafka_brokers,
            kafka_topic,
            group,
            flush_interval,
        } => {
            let store = SpanStore::open(&cli.store)?;
            let settings = WriterSettings {
                kafka: KafkaSettings {
                    brokers: kafka_brokers,
                    topic: kafka_topic,
                },
                group,
                flush_interval,
                flush_spans: Settings::default().flush_spans,
            };
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let mut writer = tokio::spawn(kafka::run_writer(settings, store, stop_rx));
            eprintln!("traces: store writer running; Ctrl-C writes what it holds and stops");
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    r?;
                    let _ = stop.send(true);
                    writer.await??;
                }
                // The writer ends by itself only on an error (the store cannot be written).
                r = &mut writer => r??,
            }
            Ok(())
        }
        Command::Query {
            file,
            from,
            to,
            hour,
            format,
            memory_limit,
        } => {
            let sql = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let now = chrono::Utc::now();
            let (from_ns, to_ns) = match hour {
                Some(h) => {
                    let start = chrono::NaiveDateTime::parse_from_str(
                        &format!("{h}:00:00"),
                        "%Y-%m-%dT%H:%M:%S",
                    )
                    .with_context(|| {
                        format!("--hour {h:?}: expected an hourly partition like 2026-11-29T14")
                    })?
                    .and_utc()
                    .timestamp_nanos_opt()
                    .context("--hour out of range")?;
                    (start, start + traces::model::HOUR_NS)
                }
                None => (
                    parse_time(&from, now).context("--from")?,
                    parse_time(&to, now).context("--to")?,
                ),
            };
            anyhow::ensure!(from_ns < to_ns, "--from must be before --to");
            let store = SpanStore::open(&cli.store)?;
            let batches = query::run(&store, &sql, from_ns, to_ns, memory_limit)
                .await
                .with_context(|| format!("running {}", file.display()))?;
            print!("{}", query::render(&batches, format)?);
            if format == Format::Table {
                println!();
            }
            Ok(())
        }
        Command::Sampling { file } => {
            let rules = server::load_rules(&file)?;
            for s in &rules.service_strategies {
                let name = s.service.clone().unwrap_or_default();
                println!("{name}: {}", rules.remote_response(&name));
            }
            println!("(default): {}", rules.remote_response("\u{0}"));
            Ok(())
        }
    }
}

/// An RFC 3339 time, `now`, or a duration before now, as ns since the epoch.
fn parse_time(s: &str, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<i64> {
    let t = if s == "now" {
        now
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&chrono::Utc)
    } else {
        let d = humantime::parse_duration(s).with_context(|| {
            format!("{s:?} is neither an RFC 3339 time, `now`, nor a duration like 1h")
        })?;
        now - chrono::Duration::from_std(d)?
    };
    t.timestamp_nanos_opt().context("time out of range")
}
