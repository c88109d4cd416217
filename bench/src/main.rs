//! `bench`: scenario runners for push-server, run outside CI (see docs/BENCHMARKS.md).
//!
//! | module | role |
//! |---|---|
//! | [`idle`] | `bench idle-memory`, `peers-idle`, `idle-scale`: server RSS per idle connection, alone, side by side, at 100k |
//! | [`accept`] | `bench peers-accept`: connects per second for a burst, side by side |
//! | [`peers_push`] | `bench peers-push`: push by user at fixed rates, latency and loss, side by side |
//! | [`compare`] | `bench compare`: every side-by-side scenario in one run; the markdown table, JSON and chart |
//! | [`chart`] | the PNG chart of latency against rate (plotters) |
//! | [`floor`] | `bench floor`: the kernel's CPU per 80-byte write to one of 9,000 loopback sockets, the floor of a push |
//! | [`registry`] | `bench registry`: `lookup_many` against one Redis and `redis-benchmark`; the ring's cost |
//! | [`pipeline`] | `bench pipeline`: push-lib → Kafka → msg-processor → push-server → clients, end to end |
//! | [`side`] | the side-by-side driver: common arguments, one result per system, skip, budget, print |
//! | [`systems`] | push-server (the one launcher), Nchan and Pushpin started on free ports: subscribe, publish, stop |
//! | [`hold`] | the connection loop, and `bench hold` (hidden): a process that opens and holds the clients |
//! | [`receive`] | `bench hold --account`: per user, counts, orders and times the pipeline's messages |
//! | [`sys`] | `/proc` readings, the open-files limit, free ports, process trees, temporary directories, `redis-server` children, HTTP `GET` |
//! | [`zmtp`] | a ZeroMQ PUSH socket (ZMTP 3.0, NULL), for Pushpin's ZeroMQ publish input |
//!
//! Higher rows use lower ones, never the reverse. The clients live in their own process so
//! that the server's RSS is all the server's, and so that each process stays under this
//! machine's 20,000 open files.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod accept;
mod chart;
mod compare;
mod floor;
mod hold;
mod idle;
mod peers_push;
mod pipeline;
mod receive;
mod registry;
mod side;
mod sys;
mod systems;
mod zmtp;

/// Scenario benchmarks for push-server.
#[derive(Parser, Debug)]
#[command(name = "bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Scenarios share `side::CommonArgs`; where a scenario's defaults differ, its variant says so.
#[derive(Subcommand, Debug)]
enum Command {
    /// Server RSS per idle connection: start push-server, hold N clients from another
    /// process, compare the server's RSS before and after.
    #[command(
        mut_arg("transport", |a| a.required(true).default_value(None::<&'static str>)),
        mut_arg("peers", |a| a.default_value("push-server").hide(true)),
        mut_arg("pushpin_concurrency", |a| a.hide(true)),
        mut_arg("nchan_workers", |a| a.hide(true)),
    )]
    IdleMemory(idle::IdleArgs),
    /// Idle memory per connection at 100,000 connections: several push-server processes
    /// (and Nchan with several workers), several client processes.
    #[command(
        mut_arg("transport", |a| a.default_value("ws")),
        mut_arg("sources", |a| a.default_value("64")),
        mut_arg("concurrency", |a| a.default_value("128")),
        mut_arg("peers", |a| a.default_value("push-server,nchan")),
        mut_arg("conns", |a| a.default_value("100000")),
        mut_arg("nodes", |a| a.default_value("6")),
        mut_arg("nchan_workers", |a| a.default_value("7")),
    )]
    IdleScale(idle::IdleArgs),
    /// Idle memory per connection side by side: push-server, Nchan and Pushpin, one after
    /// the other in one run, each peer skipped with a line if it is not installed.
    PeersIdle(idle::IdleArgs),
    /// Push by user at a list of fixed rates, side by side: push-server, Nchan and Pushpin;
    /// latency p50/p99 and loss per rate, and the highest rate each sustains.
    #[command(
        mut_arg("sources", |a| a.default_value("16")),
        mut_arg("concurrency", |a| a.default_value("64")),
    )]
    PeersPush(peers_push::Args),
    /// Accept rate side by side: a burst of M connections per system, connects per second
    /// and connect latency p50/p99.
    PeersAccept(accept::Args),
    /// Every side-by-side scenario on every system in one run: writes the markdown table
    /// with ratios (docs/bench/compare.md), the JSON and the latency chart.
    Compare(compare::Args),
    /// Open N connections and hold them (run by the idle, accept and pipeline scenarios as a
    /// child; the pipeline's accounts for every message).
    #[command(hide = true)]
    Hold(hold::Args),
    /// Registry `lookup_many` throughput and latency against one local Redis, next to
    /// `redis-benchmark` on that Redis, and the replicated ring's cost per operation.
    Registry(registry::Args),
    /// End to end through Kafka: messages per second and latency from send to client, at
    /// several processor counts; fails if any message is lost.
    Pipeline(pipeline::Args),
    /// The floor: CPU per small write to one of many loopback sockets read on the other
    /// core, the least any push can cost on this machine.
    Floor(floor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Each bench process may hold up to ~20k sockets; the soft limit often starts at 1024.
    // Children (the server, the hold process) inherit the raised limit.
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("bench: warning: cannot raise the open-files limit: {e}");
    }
    let result = match cli.command {
        Command::IdleMemory(args) => idle::run_memory(args),
        Command::IdleScale(args) => idle::run_scale(args),
        Command::PeersIdle(args) => idle::run_peers(args),
        Command::PeersPush(args) => peers_push::run(args),
        Command::PeersAccept(args) => accept::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Hold(args) => hold::run(args),
        Command::Registry(args) => registry::run(args),
        Command::Pipeline(args) => pipeline::run(args),
        Command::Floor(args) => floor::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A multi-threaded runtime: `workers` threads (the side-by-side scenarios run two, one per
/// core of this machine), or tokio's default of one per core.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))
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
