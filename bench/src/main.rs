//! `bench`: scenario runners for push-server, run outside CI (see docs/BENCHMARKS.md).
//!
//! | module | role |
//! |---|---|
//! | [`idle_memory`] | `bench idle-memory`: server RSS per idle connection |
//! | [`idle_scale`] | `bench idle-scale`: RSS per connection at 100k over several server and client processes |
//! | [`peers`] | `bench peers-idle`: idle memory per connection, push-server next to Nchan and Pushpin |
//! | [`peers_push`] | `bench peers-push`: push by user at fixed rates, latency and loss, side by side |
//! | [`peers_accept`] | `bench peers-accept`: connects per second for a burst, side by side |
//! | [`compare`] | `bench compare`: every side-by-side scenario in one run; the markdown table, JSON and chart |
//! | [`chart`] | the PNG chart of latency against rate (plotters) |
//! | [`registry`] | `bench registry`: `lookup_many` against one Redis and `redis-benchmark`; the ring's cost |
//! | [`pipeline`] | `bench pipeline`: push-lib → Kafka → msg-processor → push-server → clients, end to end |
//! | [`receive`] | `bench receive` (hidden): holds one WebSocket per user, counts, orders and times messages |
//! | [`redis`] | `redis-server` children on free ports, killed on drop |
//! | [`hold`] | `bench hold` (hidden): a separate process that opens and holds the clients (loadtest's raw client, [`loadtest::conn`]) |
//! | [`admin`] | tiny HTTP/1.1 GET for the server's `/healthz` and `/metrics` |
//! | [`systems`] | push-server, Nchan and Pushpin started on free ports: subscribe, publish, stop |
//! | [`sys`] | `/proc` readings, the open-files limit, free ports |
//!
//! The clients live in their own process so that the server's RSS is all the server's, and
//! so that each process stays under this machine's 20,000 open files.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod chart;
mod compare;
mod hold;
mod idle_memory;
mod idle_scale;
mod peers;
mod peers_accept;
mod peers_push;
mod pipeline;
mod receive;
mod redis;
mod registry;
mod sys;
mod systems;

/// Scenario benchmarks for push-server.
#[derive(Parser, Debug)]
#[command(name = "bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Server RSS per idle connection: start push-server, hold N clients from another
    /// process, compare the server's RSS before and after.
    IdleMemory(idle_memory::Args),
    /// Idle memory per connection at 100,000 connections: several push-server processes
    /// (and Nchan with several workers), several client processes.
    IdleScale(idle_scale::Args),
    /// Idle memory per connection side by side: push-server, Nchan and Pushpin, one after
    /// the other in one run, each peer skipped with a line if it is not installed.
    PeersIdle(peers::Args),
    /// Push by user at a list of fixed rates, side by side: push-server, Nchan and Pushpin;
    /// latency p50/p99 and loss per rate, and the highest rate each sustains.
    PeersPush(peers_push::Args),
    /// Accept rate side by side: a burst of M connections per system, connects per second
    /// and connect latency p50/p99.
    PeersAccept(peers_accept::Args),
    /// Every side-by-side scenario on every system in one run: writes the markdown table
    /// with ratios (docs/bench/compare.md), the JSON and the latency chart.
    Compare(compare::Args),
    /// Open N connections and hold them (run by `idle-memory` as a child process).
    #[command(hide = true)]
    Hold(hold::Args),
    /// Registry `lookup_many` throughput and latency against one local Redis, next to
    /// `redis-benchmark` on that Redis, and the replicated ring's cost per operation.
    Registry(registry::Args),
    /// End to end through Kafka: messages per second and latency from send to client, at
    /// several processor counts; fails if any message is lost.
    Pipeline(pipeline::Args),
    /// Hold one WebSocket per user and account for every message (run by `pipeline`).
    #[command(hide = true)]
    Receive(receive::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Each bench process may hold up to ~20k sockets; the soft limit often starts at 1024.
    // Children (the server, the hold process) inherit the raised limit.
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("bench: warning: cannot raise the open-files limit: {e}");
    }
    let result = match cli.command {
        Command::IdleMemory(args) => idle_memory::run(args),
        Command::IdleScale(args) => idle_scale::run(args),
        Command::PeersIdle(args) => peers::run(args),
        Command::PeersPush(args) => peers_push::run(args),
        Command::PeersAccept(args) => peers_accept::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Hold(args) => hold::run(args),
        Command::Registry(args) => registry::run(args),
        Command::Pipeline(args) => pipeline::run(args),
        Command::Receive(args) => receive::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime of the side-by-side scenarios: two workers, one per core of this machine.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))
}

/// Runs a side-by-side scenario (one JSON result per system) until it ends or a signal
/// arrives, then prints `table` of the results: on stdout, or with `json` on stderr with the
/// results as one JSON array on stdout.
fn run_side_by_side(
    json: bool,
    work: impl std::future::Future<Output = anyhow::Result<Vec<serde_json::Value>>>,
    table: impl FnOnce(&[serde_json::Value]) -> String,
) -> anyhow::Result<()> {
    let results = runtime()?.block_on(until_signal(work))?;
    let table = table(&results);
    if json {
        eprint!("{table}");
        println!("{}", serde_json::Value::Array(results));
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Runs `work` until it ends or Ctrl-C / SIGTERM arrive; either way, leaving drops what it
/// started (children are stopped by their guards).
async fn until_signal<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}
