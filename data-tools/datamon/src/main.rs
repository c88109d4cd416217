//! `datamon`: status, check, explain, serve.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use datamon::checker::{Checker, Snapshot, DEFAULT_WINDOW};
use datamon::decl::Declarations;
use datamon::http::HttpClient;
use datamon::state::State;
use datamon::store::Stores;

#[derive(Parser, Debug)]
#[command(
    name = "datamon",
    about = "Early warning for late and missing data, with clear owners"
)]
struct Cli {
    /// Declaration file, or directory of *.yaml files.
    #[arg(
        long,
        env = "DATAMON_DECLARATIONS",
        default_value = "data-tools/datamon/declarations",
        global = true
    )]
    declarations: PathBuf,
    /// Fills `{root}` in location templates (the data tools' shared output directory).
    #[arg(long, env = "DATAMON_ROOT", default_value = "data", global = true)]
    root: PathBuf,
    /// SQLite state file (partitions seen, alerts fired, notification queue).
    #[arg(
        long,
        env = "DATAMON_STATE",
        default_value = "datamon.sqlite",
        global = true
    )]
    state: PathBuf,
    /// Partitions looked back per dataset.
    #[arg(long, default_value_t = DEFAULT_WINDOW, global = true)]
    window: usize,
    /// Styx base URL for `explain` (e.g. http://127.0.0.1:8080).
    #[arg(long, env = "DATAMON_STYX", global = true)]
    styx: Option<String>,
    /// This datamon's base URL, for links in alerts.
    #[arg(
        long,
        env = "DATAMON_BASE_URL",
        default_value = "http://127.0.0.1:9464",
        global = true
    )]
    base_url: String,
    /// Webhook for owners that declare none (Alertmanager webhook JSON, or an Alertmanager's
    /// /api/v2/alerts).
    #[arg(long, env = "DATAMON_WEBHOOK", global = true)]
    webhook: Option<String>,
    /// Check as of this instant (RFC 3339) instead of the clock: replays and tests.
    #[arg(long, global = true)]
    now: Option<DateTime<Utc>>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One pass, printed as a table (saves nothing, sends nothing).
    Status {
        /// Only this team's datasets.
        #[arg(long)]
        owner: Option<String>,
    },
    /// One pass: saves state, sends due alerts once; exits 1 when anything is late or missing.
    Check,
    /// Why a partition is late: upstream datasets and the producing Styx run.
    Explain {
        /// Dataset id.
        dataset: String,
        /// Partition name (2026-11-29T14 or 2026-11-29).
        partition: String,
    },
    /// Checks every interval, sends alerts, serves the grid, JSON API and metrics.
    Serve {
        /// Listen address; port 0 picks a free one (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// Time between passes.
        #[arg(long, default_value = "60s", value_parser = humantime_like)]
        interval: Duration,
    },
}

fn humantime_like(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 500ms, 30s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: expected e.g. 500ms, 30s, 5m")),
    }
}

fn main() -> std::process::ExitCode {
    telemetry::init_logging(telemetry::LogFormat::Human, "datamon=info");
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("datamon: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn now(cli: &Cli) -> DateTime<Utc> {
    cli.now.unwrap_or_else(Utc::now)
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let root = std::path::absolute(&cli.root).context("--root")?;
    let decls = Declarations::open(&cli.declarations, &root.to_string_lossy())?;
    let metrics = datamon::metrics::install();
    metrics::gauge!(datamon::metrics::DECLARATIONS_VALID).set(1.0);
    let client = HttpClient::default();
    match &cli.cmd {
        Cmd::Status { owner } => {
            let state = Arc::new(State::open(&cli.state)?);
            let checker = Checker::new(decls, Stores::default(), state, cli.window, false)?;
            let (snap, _) = checker.pass(now(&cli)).await?;
            print_table(&snap, owner.as_deref());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Check => {
            let state = Arc::new(State::open(&cli.state)?);
            let checker = Checker::new(decls, Stores::default(), state.clone(), cli.window, true)?
                .with_fallback_webhook(cli.webhook.clone());
            let (snap, queued) = checker.pass(now(&cli)).await?;
            let round = datamon::deliver::deliver_due(&state, &client, &cli.base_url).await;
            let counts = snap.counts();
            println!(
                "{} datasets: {} on time, {} late, {} missing, {} pending; {queued} alerts queued, {} delivered, {} to retry",
                snap.rows.len(),
                counts.get("on_time").unwrap_or(&0),
                counts.get("late").unwrap_or(&0),
                counts.get("missing").unwrap_or(&0),
                counts.get("pending").unwrap_or(&0),
                round.delivered,
                round.failed,
            );
            for row in snap.rows.values() {
                for c in row.cells.iter().filter(|c| c.status.is_bad()) {
                    println!(
                        "{} {} {} {}s ({})",
                        c.status.name(),
                        row.dataset,
                        c.partition,
                        c.status.lateness_seconds(),
                        row.team
                    );
                }
            }
            Ok(if snap.any_bad() {
                std::process::ExitCode::from(1)
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
        Cmd::Explain { dataset, partition } => {
            let e = datamon::explain::explain(
                &decls.current(),
                &Stores::default(),
                &client,
                cli.styx.as_deref(),
                dataset,
                partition,
                now(&cli),
            )
            .await?;
            println!(
                "{} {} ({}), owner {}",
                e.dataset,
                e.partition,
                e.status.name(),
                e.owner
            );
            for l in &e.lines {
                println!("- {l}");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Serve { listen, interval } => {
            let state = Arc::new(State::open(&cli.state)?);
            let checker = Arc::new(
                Checker::new(
                    decls.clone(),
                    Stores::default(),
                    state.clone(),
                    cli.window,
                    true,
                )?
                .with_fallback_webhook(cli.webhook.clone()),
            );
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            let poke = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(datamon::deliver::run(
                state.clone(),
                client.clone(),
                cli.base_url.clone(),
                poke.clone(),
            ));
            // The first pass runs before the address is printed, so whoever waits for the
            // line finds a populated grid.
            let pass = |checker: Arc<Checker>| {
                let decls = decls.clone();
                let poke = poke.clone();
                let fixed = cli.now;
                async move {
                    match decls.reload() {
                        Ok(_) => metrics::gauge!(datamon::metrics::DECLARATIONS_VALID).set(1.0),
                        Err(e) => {
                            metrics::gauge!(datamon::metrics::DECLARATIONS_VALID).set(0.0);
                            tracing::error!(error = %e, "declarations invalid; the previous set stays live");
                        }
                    }
                    match checker.pass(fixed.unwrap_or_else(Utc::now)).await {
                        Ok((_, queued)) if queued > 0 => poke.notify_one(),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "checker pass failed"),
                    }
                }
            };
            pass(checker.clone()).await;
            let app = Arc::new(datamon::web::App {
                checker: checker.clone(),
                client,
                styx: cli.styx.clone(),
                metrics,
            });
            println!("datamon serving on http://{addr}");
            std::io::stdout().flush().ok();
            tokio::spawn(datamon::web::serve(listener, app));
            let mut tick = tokio::time::interval(*interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => pass(checker.clone()).await,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn print_table(s: &Snapshot, owner: Option<&str>) {
    println!(
        "{:<36} {:<16} {:>7} {:>5} {:>7} {:>7}  last partition",
        "DATASET", "OWNER", "ON_TIME", "LATE", "MISSING", "PENDING"
    );
    for row in s
        .rows
        .values()
        .filter(|r| owner.is_none_or(|o| r.team == o))
    {
        let n = |name: &str| row.cells.iter().filter(|c| c.status.name() == name).count();
        let last = row
            .cells
            .iter()
            .rev()
            .find(|c| c.status.name() != "pending")
            .map(|c| format!("{} {}", c.partition, c.status.name()))
            .unwrap_or_default();
        println!(
            "{:<36} {:<16} {:>7} {:>5} {:>7} {:>7}  {last}",
            row.dataset,
            row.team,
            n("on_time"),
            n("late"),
            n("missing"),
            n("pending")
        );
    }
}
