//! `bench peers-accept`: accept rate side by side. Per system (push-server, Nchan,
//! Pushpin): start it, open a burst of M connections from a `bench hold` process with C
//! connects in flight over many source addresses, and report connections opened per second
//! (first attempt to last success) and the connect latency p50 / p99 / max (TCP connect to
//! open: push-server's `hello`, a peer's response head). The held connections are then
//! released and the system stopped.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::hold::{HoldPlan, Holder, Present, Transport, SPARE_FDS};
use crate::sys;
use crate::systems::{self, Peer};

/// Arguments of `bench peers-accept`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Systems to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan,pushpin"
    )]
    pub peers: Vec<Peer>,
    /// Connections in the burst (one client process: at most ~19,900).
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Transport (Pushpin: SSE only).
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// Connects in flight at once, the same for every system.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Client source addresses, 127.0.0.2 onwards.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    pub sources: u8,
    /// Nchan's worker processes.
    #[arg(long, default_value_t = 2)]
    pub nchan_workers: u32,
    /// push-server binary. Default: `push-server` next to this `bench` binary.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Print the results as one JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the systems one after the other.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::run_side_by_side(args.json, all(&args), table)
}

/// One result per system (skipped and failed included).
pub async fn all(args: &Args) -> anyhow::Result<Vec<Value>> {
    if args.conns as u64 + SPARE_FDS > sys::nofile_limit() {
        anyhow::bail!(
            "{} connections do not fit in one client process here",
            args.conns
        );
    }
    let server_bin = systems::server_bin(args.server_bin.as_deref())?;
    let bench_bin = std::env::current_exe()?;
    let mut results = Vec::new();
    for &peer in &args.peers {
        eprintln!(
            "== peers-accept: {} ({} {} connections, {} in flight)",
            peer.as_str(),
            args.conns,
            args.transport.as_str(),
            args.concurrency
        );
        let result = match systems::missing(peer, args.transport, &server_bin) {
            Some(why) => {
                eprintln!("{}: skipped: {why}", peer.as_str());
                json!({"peer": peer.as_str(), "skipped": why})
            }
            None => {
                let budget =
                    Duration::from_secs(150) + Duration::from_millis(10 * args.conns as u64);
                systems::bounded(peer, budget, system(peer, args, &server_bin, &bench_bin)).await
            }
        };
        eprintln!("{}", line(&result));
        results.push(result);
    }
    Ok(results)
}

async fn system(
    peer: Peer,
    args: &Args,
    server_bin: &std::path::Path,
    bench_bin: &std::path::Path,
) -> anyhow::Result<Value> {
    let opts = systems::Options {
        max_conns: args.conns,
        nchan_workers: args.nchan_workers,
        pushpin_message_rate: 2500,
        server_bin: server_bin.to_owned(),
        server_args: Vec::new(),
    };
    let running = systems::start(peer, &opts).await?;
    let budget = Duration::from_secs(60) + Duration::from_millis(10 * args.conns as u64);
    let present = match peer {
        Peer::PushServer => Present::Secret(systems::SECRET.into()),
        _ => Present::Path("/sub/u{i}".into()),
    };
    let mut holder = Holder::spawn(
        bench_bin,
        &HoldPlan {
            server: running.addr,
            transport: args.transport,
            conns: args.conns,
            sources: args.sources,
            concurrency: args.concurrency,
            present,
            hold_secs: budget.as_secs() + 60,
        },
    )?;
    let report = holder.connected(budget).await?;
    holder.finish().await;
    drop(running);
    Ok(json!({
        "peer": peer.as_str(),
        "transport": args.transport.as_str(),
        "conns": args.conns,
        "concurrency": args.concurrency,
        "opened": report["ok"],
        "failed": report["failed"],
        "errors": report["errors"],
        "opened_per_sec": report["opened_per_sec"].as_f64().map(f64::round),
        "connect_p50_ms": report["connect_p50_us"].as_f64().map(|u| sys::round2(u / 1000.0)),
        "connect_p99_ms": report["connect_p99_us"].as_f64().map(|u| sys::round2(u / 1000.0)),
        "connect_max_ms": report["connect_max_us"].as_f64().map(|u| sys::round2(u / 1000.0)),
    }))
}

fn line(r: &Value) -> String {
    let peer = r["peer"].as_str().unwrap_or("?");
    if let Some(why) = r["skipped"].as_str().or(r["error"].as_str()) {
        return format!("{peer}: {why}");
    }
    format!(
        "{peer}: {} opened ({} failed) at {}/s, connect p50 {} p99 {} max {} ms",
        r["opened"],
        r["failed"],
        r["opened_per_sec"],
        r["connect_p50_ms"],
        r["connect_p99_ms"],
        r["connect_max_ms"]
    )
}

/// The human table, with push-server's accept rate over each peer's.
pub fn table(results: &[Value]) -> String {
    let mut out = String::from("system        opened/s   failed   connect p50 ms   p99 ms\n");
    for r in results {
        let peer = r["peer"].as_str().unwrap_or("?");
        if let Some(why) = r["skipped"].as_str().or(r["error"].as_str()) {
            let _ = writeln!(out, "{peer:<13} ({why})");
            continue;
        }
        let _ = writeln!(
            out,
            "{peer:<13} {:>8}   {:>6}   {:>14}   {:>6}",
            r["opened_per_sec"], r["failed"], r["connect_p50_ms"], r["connect_p99_ms"]
        );
    }
    out
}
