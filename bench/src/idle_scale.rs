//! `bench idle-scale`: idle memory per connection at 100,000 connections, which on this
//! machine (20,000 open files per process) takes several server processes and several
//! client processes.
//!
//! - push-server: `--nodes` processes (each its own node, on its own ports), and one
//!   `bench hold` process per node with that node's share of the connections; the figure
//!   is the sum of the nodes' RSS growth over the sum of the connections their
//!   `push_connections_open` gauges show.
//! - Nchan: one nginx with `--nchan-workers` workers (`listen … reuseport`, so that
//!   connections spread evenly and no worker reaches its 19,000 files first) and as many
//!   `bench hold` processes as it takes; the figure is master + workers.
//!
//! Every client binds one of `--sources` addresses 127.0.0.2 onwards. Every process started
//! is stopped when the run ends, on error too.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Value};

use crate::hold::{HoldPlan, Holder, Present, Transport, SPARE_FDS};
use crate::sys;
use crate::systems::{self, memories, Peer, Running};

/// Connections one hold process takes (below the 20,000 open files, with room to spare).
const PER_HOLDER: usize = 18_000;

/// Arguments of `bench idle-scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Systems to run, in order (Pushpin is not run at this scale: ~44 KiB per connection).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan"
    )]
    pub peers: Vec<Peer>,
    /// Connections in all.
    #[arg(long, default_value_t = 100_000)]
    pub conns: usize,
    /// push-server processes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Nchan's worker processes.
    #[arg(long, default_value_t = 7)]
    pub nchan_workers: u32,
    /// Transport.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Client source addresses, 127.0.0.2 onwards.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=253))]
    pub sources: u8,
    /// Connects in flight per hold process.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Seconds to wait after every connection is open before reading the RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
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
    if args.nodes == 0 || args.conns == 0 {
        bail!("--nodes and --conns must be at least 1");
    }
    let server_bin = systems::server_bin(args.server_bin.as_deref())?;
    let bench_bin = std::env::current_exe()?;
    let mut results = Vec::new();
    for &peer in &args.peers {
        eprintln!(
            "== idle-scale: {} ({} {} connections)",
            peer.as_str(),
            args.conns,
            args.transport.as_str()
        );
        let result = match systems::missing(peer, args.transport, &server_bin) {
            Some(why) => json!({"peer": peer.as_str(), "skipped": why}),
            None if peer == Peer::Pushpin => {
                json!({"peer": "pushpin", "skipped": "not run at this scale (about 44 KiB per connection at 15k: peers-idle)"})
            }
            None => {
                let budget = Duration::from_secs(240 + args.settle_secs)
                    + Duration::from_millis(2 * args.conns as u64);
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
    // The servers, and for each the share of connections its hold processes open.
    let mut servers: Vec<(Running, usize)> = Vec::new();
    match peer {
        Peer::PushServer => {
            let per_node = args.conns.div_ceil(args.nodes);
            if per_node as u64 + SPARE_FDS > sys::nofile_limit() {
                bail!(
                    "{per_node} connections per node do not fit in one process: use more --nodes"
                );
            }
            for n in 0..args.nodes {
                let share = per_node.min(args.conns - n * per_node);
                let opts = options(args, server_bin, per_node, vec![format!("--node-id=n{n}")]);
                servers.push((systems::start(peer, &opts).await?, share));
            }
        }
        _ => {
            let opts = options(args, server_bin, args.conns, Vec::new());
            servers.push((systems::start(peer, &opts).await?, args.conns));
        }
    }
    let procs: Vec<(String, u32)> = servers.iter().flat_map(|(r, _)| r.procs.clone()).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memories(&procs);

    // The hold processes, all at once.
    let budget = Duration::from_secs(120) + Duration::from_millis(args.conns as u64);
    let mut holders = Vec::new();
    for (running, share) in &servers {
        let count = share.div_ceil(PER_HOLDER);
        for h in 0..count {
            let n = share / count + usize::from(h < share % count);
            let present = match peer {
                Peer::PushServer => Present::Secret(systems::SECRET.into()),
                _ => Present::Path(format!("/sub/h{}u{{i}}", holders.len())),
            };
            holders.push(Holder::spawn(
                bench_bin,
                &HoldPlan {
                    server: running.addr,
                    transport: args.transport,
                    conns: n,
                    sources: args.sources,
                    concurrency: args.concurrency,
                    present,
                    hold_secs: budget.as_secs() + args.settle_secs + 120,
                },
            )?);
        }
    }
    let started = std::time::Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    for h in &mut holders {
        let r = h.connected(budget).await?;
        ok += r["ok"].as_u64().unwrap_or(0);
        failed += r["failed"].as_u64().unwrap_or(0);
        if r["failed"].as_u64().unwrap_or(0) > 0 {
            errors.push(r["errors"].clone());
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!("{ok} connected, {failed} failed in {connect_secs:.1} s");
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let after = memories(&procs);
    // The servers' own count while the clients are held.
    let counted = match peer {
        Peer::PushServer => {
            let mut sum = 0.0;
            for (r, _) in &servers {
                let (_, body) = crate::admin::get(r.publish, "/metrics").await?;
                sum +=
                    crate::admin::connections_open(&body, args.transport.as_str()).unwrap_or(0.0);
            }
            json!(sum)
        }
        _ => {
            let (_, body) = crate::admin::get(servers[0].0.addr, "/nchan_status").await?;
            json!(body.trim())
        }
    };
    let hold_rss: u64 = holders
        .iter()
        .filter_map(|h| sys::memory(h.pid).ok())
        .map(|m| m.rss_kib)
        .sum();
    let mut closed = 0;
    for h in holders {
        closed += h
            .finish()
            .await
            .and_then(|d| d["closed_during_hold"].as_u64())
            .unwrap_or(0);
    }
    let held = ok.saturating_sub(closed);
    let mut processes = serde_json::Map::new();
    let (mut total_before, mut total_after) = (0u64, 0u64);
    for (label, pid, b) in &before {
        let Some((_, _, a)) = after.iter().find(|(_, p, _)| p == pid) else {
            bail!("{label} (pid {pid}) exited during the run");
        };
        total_before += b.rss_kib;
        total_after += a.rss_kib;
        processes.insert(
            format!("{label} ({pid})"),
            json!({"before_kib": b.rss_kib, "after_kib": a.rss_kib}),
        );
    }
    let config = servers[0].0.config.clone();
    drop(servers);
    Ok(json!({
        "peer": peer.as_str(),
        "transport": args.transport.as_str(),
        "attempted": args.conns,
        "held": held,
        "failed": failed,
        "errors": errors,
        "server_count": counted,
        "server_processes": procs.len(),
        "processes": processes,
        "rss_before_kib": total_before,
        "rss_after_kib": total_after,
        "kib_per_conn": sys::round2((total_after as f64 - total_before as f64) / held.max(1) as f64),
        "hold_rss_kib": hold_rss,
        "hold_kib_per_conn": sys::round2(hold_rss as f64 / ok.max(1) as f64),
        "connect_secs": sys::round2(connect_secs),
        "config": config,
    }))
}

fn options(
    args: &Args,
    server_bin: &std::path::Path,
    max_conns: usize,
    server_args: Vec<String>,
) -> systems::Options {
    systems::Options {
        max_conns,
        nchan_workers: args.nchan_workers,
        pushpin_message_rate: 2500,
        server_bin: server_bin.to_owned(),
        server_args,
    }
}

fn line(r: &Value) -> String {
    let peer = r["peer"].as_str().unwrap_or("?");
    if let Some(why) = r["skipped"].as_str().or(r["error"].as_str()) {
        return format!("{peer}: {why}");
    }
    format!(
        "{peer}: {} held ({} failed) over {} processes, RSS {} -> {} KiB = {} KiB/conn; server count {}",
        r["held"], r["failed"], r["server_processes"], r["rss_before_kib"], r["rss_after_kib"], r["kib_per_conn"], r["server_count"]
    )
}

/// The human table.
pub fn table(results: &[Value]) -> String {
    let mut out = String::from("system        held     processes   KiB/conn\n");
    for r in results {
        let peer = r["peer"].as_str().unwrap_or("?");
        if let Some(why) = r["skipped"].as_str().or(r["error"].as_str()) {
            let _ = writeln!(out, "{peer:<13} ({why})");
            continue;
        }
        let _ = writeln!(
            out,
            "{peer:<13} {:>7}   {:>9}   {:>8}",
            r["held"], r["server_processes"], r["kib_per_conn"]
        );
    }
    out
}
