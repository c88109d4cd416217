//! `bench`: scenario runners for push-server, run outside CI (see docs/BENCHMARKS.md).
//!
//! | module | role |
//! |---|---|
//! | [`idle_memory`] | `bench idle-memory`: server RSS per idle connection |
//! | [`peers`] | `bench peers-idle`: idle memory per connection, push-server next to Nchan and Pushpin |
//! | [`registry`] | `bench registry`: `lookup_many` against one Redis and `redis-benchmark`; the ring's cost |
//! | [`pipeline`] | `bench pipeline`: push-lib → Kafka → msg-processor → push-server → clients, end to end |
//! | [`receive`] | `bench receive` (hidden): holds one WebSocket per user, counts, orders and times messages |
//! | [`redis`] | `redis-server` children on free ports, killed on drop |
//! | [`hold`] | `bench hold` (hidden): a separate process that opens and holds the clients |
//! | [`client`] | a minimal WebSocket / SSE client on raw TCP: handshake, hello, pongs |
//! | [`admin`] | tiny HTTP/1.1 GET for the server's `/healthz` and `/metrics` |
//! | [`sys`] | `/proc` readings, the open-files limit, free ports |
//!
//! The clients live in their own process so that the server's RSS is all the server's, and
//! so that each process stays under this machine's 20,000 open files.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod client;
mod hold;
mod idle_memory;
mod peers;
mod pipeline;
mod receive;
mod redis;
mod registry;
mod sys;

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
    /// Idle memory per connection side by side: push-server, Nchan and Pushpin, one after
    /// the other in one run, each peer skipped with a line if it is not installed.
    PeersIdle(peers::Args),
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
        Command::PeersIdle(args) => peers::run(args),
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
