//! `push-registry`: the operator's view of the registry. Every command takes `--registry URL`
//! (or `PUSH_REGISTRY`) and prints JSON.
//!
//! Exit codes: 0 found / ok, 1 not found (lookup, unregister, history), 2 storage or usage error.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use push_registry::{BufferLimits, Record, Registry};

#[derive(Debug, Parser)]
#[command(version, about = "Inspect and operate the push registry")]
struct Cli {
    /// Registry URL: memory, redis://host:port, redis-cluster://h1:p1,...,
    /// ring://h1:p1,...?racks=N&read=quorum&write=quorum
    #[arg(long, env = "PUSH_REGISTRY", default_value = "memory")]
    registry: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a user's live connections as JSON; exit 1 if there are none.
    Lookup {
        /// User ID.
        user: String,
    },
    /// Register a connection (newest wins for its user and device).
    Register {
        /// User ID.
        #[arg(long)]
        user: String,
        /// Device ID; omit for a device-less connection.
        #[arg(long)]
        device: Option<String>,
        /// Node holding the connection.
        #[arg(long)]
        node_id: String,
        /// That node's delivery address.
        #[arg(long)]
        node_addr: String,
        /// Connection ID.
        #[arg(long)]
        conn_id: String,
        /// How long the entry lives without a refresh, e.g. `90s`, `5m`.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Remove a connection's entry if it still owns it; exit 1 if nothing was removed.
    Unregister {
        /// User ID.
        #[arg(long)]
        user: String,
        /// Device ID; omit for a device-less connection.
        #[arg(long)]
        device: Option<String>,
        /// Connection ID that must own the entry.
        #[arg(long)]
        conn_id: String,
    },
    /// Print a user's kept messages (for resume) as JSON: `{"messages": [...], "gap": N|null}`;
    /// exit 1 if none is owed.
    History {
        /// User ID.
        user: String,
        /// Only messages after this ID, as a client that last saw it would get them (0: all
        /// kept). `gap` is set when messages after it are no longer kept.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Most messages kept per user: give the push servers' setting, since a read skips
        /// what they would have trimmed.
        #[arg(long, default_value_t = BufferLimits::default().max_messages)]
        history_messages: usize,
        /// Age limit of kept messages, e.g. `5m`: the push servers' setting.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        history_age: Duration,
    },
    /// Live connections per node.
    Stats,
    /// Ping every storage node and print its latency; exit 2 if any fails.
    Ping,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("push-registry: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the whole chain: what we were doing, then which node failed and why.
            eprintln!("push-registry: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::History {
        user,
        since,
        history_messages,
        history_age,
    } = &cli.command
    {
        let limits = BufferLimits {
            max_messages: *history_messages,
            max_age: *history_age,
        };
        return history(&cli.registry, user, *since, limits).await;
    }
    let registry = push_registry::open(&cli.registry)
        .await
        .with_context(|| format!("opening registry {}", cli.registry))?;
    let found = |yes: bool| ExitCode::from(if yes { 0 } else { 1 });
    Ok(match cli.command {
        Command::Lookup { user } => {
            let records = registry
                .lookup(&user)
                .await
                .with_context(|| format!("looking up {user}"))?;
            print_json(&records)?;
            found(!records.is_empty())
        }
        Command::Register {
            user,
            device,
            node_id,
            node_addr,
            conn_id,
            ttl,
        } => {
            let record = Record {
                user,
                device,
                node_id,
                node_addr,
                conn_id,
                connected_at: push_registry::now_ms(),
            };
            registry
                .register(&record, ttl)
                .await
                .context("registering")?;
            print_json(&record)?;
            ExitCode::SUCCESS
        }
        Command::Unregister {
            user,
            device,
            conn_id,
        } => {
            let removed = registry
                .unregister(&user, device.as_deref(), &conn_id)
                .await
                .context("unregistering")?;
            print_json(&serde_json::json!({ "removed": removed }))?;
            found(removed)
        }
        Command::Stats => {
            print_json(&registry.stats().await.context("collecting stats")?)?;
            ExitCode::SUCCESS
        }
        Command::Ping => ping(registry.as_ref()).await?,
        Command::History { .. } => unreachable!("handled before opening the registry"),
    })
}

/// `history`: opens only the message store (a registry of the same URL is not needed).
async fn history(
    url: &str,
    user: &str,
    since: u64,
    limits: BufferLimits,
) -> anyhow::Result<ExitCode> {
    let store = push_registry::open_store(url, limits)
        .await
        .with_context(|| format!("opening message store {url}"))?;
    let resume = store
        .since(user, since)
        .await
        .with_context(|| format!("reading {user}'s history"))?;
    print_json(&serde_json::json!({ "messages": resume.messages, "gap": resume.gap }))?;
    Ok(ExitCode::from(if resume.messages.is_empty() {
        1
    } else {
        0
    }))
}

async fn ping(registry: &dyn Registry) -> anyhow::Result<ExitCode> {
    let pings = registry.ping().await;
    let rows: Vec<serde_json::Value> = pings
        .iter()
        .map(|p| match &p.result {
            Ok(us) => serde_json::json!({ "node": p.node, "ok": true, "latency_us": us }),
            Err(e) => serde_json::json!({ "node": p.node, "ok": false, "error": e.to_string() }),
        })
        .collect();
    print_json(&rows)?;
    let failed: Vec<&str> = pings
        .iter()
        .filter(|p| p.result.is_err())
        .map(|p| p.node.as_str())
        .collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("push-registry: unreachable: {}", failed.join(", "));
        Ok(ExitCode::from(2))
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
