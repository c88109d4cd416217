//! `bench peers-idle`: idle memory per connection, side by side, one process each where the
//! peer allows it: push-server, Nchan (nginx + libnginx-mod-nchan) and Pushpin, in one run.
//!
//! - push-server: `bench idle-memory --json` as a child process (see [`crate::idle_memory`]).
//! - Nchan: a generated nginx.conf in a temporary directory (`worker_processes 1`, so that the
//!   figure is one worker's), an `nchan_subscriber` location `/sub/(\w+)` keyed by user and an
//!   `nchan_publisher` location; RSS of the worker and of the master, before and after.
//! - Pushpin: a backend inside this process answers every subscription with `Grip-Hold: stream`
//!   and `Grip-Channel: <user>`; `pushpin` runs with a generated config whose route points to it,
//!   and `zurl` (which the proxy reaches the backend through) with a copy of `/etc/zurl.conf`
//!   that allows 127.0.0.1. RSS of every Pushpin process and zurl, each and summed.
//!
//! The clients come from `bench hold` in raw-path mode (`/sub/u{i}`, no token). Nothing is
//! installed here: a peer whose binaries are missing is skipped with a line saying so. Every
//! process started is stopped (SIGTERM, then SIGKILL, with its descendants) when a peer's run
//! ends, on error too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::hold::{Transport, SPARE_FDS};
use crate::idle_memory::next_event;
use crate::sys;
use crate::systems::{self, memories, Peer};

/// Arguments of `bench peers-idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Idle connections to hold on each server (one client process: at most ~19,900).
    #[arg(long, default_value_t = 15_000)]
    pub conns: usize,
    /// Transport of the idle connections (Pushpin: SSE only here).
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// Servers to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan,pushpin"
    )]
    pub peers: Vec<Peer>,
    /// Client source addresses, 127.0.0.2 onwards.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    pub sources: u8,
    /// Connection attempts in flight at once (push-server and Nchan).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Connection attempts in flight at once for Pushpin: a gentle ramp (DESIGN.md, Measuring).
    #[arg(long, default_value_t = 64)]
    pub pushpin_concurrency: usize,
    /// Seconds to wait after the connections are open before reading the RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// push-server binary (passed to `bench idle-memory`).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Print every result as one JSON array on stdout (the human lines go to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Runs the peers one after the other; Ctrl-C or SIGTERM stop it and its children.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::run_side_by_side(args.json, all(&args), table)
}

/// Every peer of `args.peers`, in order: one result each (skipped and failed included),
/// with `push_server_over_peer` set on the peers.
pub async fn all(args: &Args) -> anyhow::Result<Vec<Value>> {
    let needed = args.conns as u64 + SPARE_FDS;
    let limit = sys::nofile_limit();
    if needed > limit {
        bail!(
            "{} connections need about {needed} open files per process, above the limit of {limit}",
            args.conns
        );
    }
    let bench_bin = std::env::current_exe().context("cannot find the bench binary")?;
    let mut results: Vec<Value> = Vec::new();
    for &peer in &args.peers {
        eprintln!(
            "== {} ({} {} connections)",
            peer.as_str(),
            args.conns,
            args.transport.as_str()
        );
        // Each peer's run is bounded: connects at the slowest ramp, settle, start and stop.
        let budget = Duration::from_secs(180 + args.settle_secs)
            + Duration::from_millis(20 * args.conns as u64);
        let run = async {
            match peer {
                Peer::PushServer => push_server(args, &bench_bin).await,
                Peer::Nchan | Peer::Pushpin => start_and_measure(peer, args, &bench_bin).await,
            }
        };
        let result = crate::systems::bounded(peer, budget, run).await;
        eprintln!("{}", line(&result));
        results.push(result);
    }
    // Ratios: push-server's KiB per connection over each peer's.
    let ours = results
        .iter()
        .find(|r| r["peer"] == "push-server")
        .and_then(|r| r["kib_per_conn"].as_f64());
    for r in &mut results {
        if let (Some(ours), Some(theirs)) = (ours, r["kib_per_conn"].as_f64()) {
            if r["peer"] != "push-server" && theirs > 0.0 {
                r["push_server_over_peer"] = json!(sys::round2(ours / theirs));
            }
        }
    }
    Ok(results)
}

/// The human table of `peers-idle`.
pub fn table(results: &[Value]) -> String {
    let mut table = String::from(
        "peer         held    total RSS before -> after KiB   KiB/conn   push-server ÷ peer\n",
    );
    for r in results {
        let _ = writeln!(
            table,
            "{:<12} {:>6}   {:>10} -> {:<10}          {:>8}   {}",
            r["peer"].as_str().unwrap_or("?"),
            r["held"].as_u64().map_or("-".into(), |n| n.to_string()),
            r["rss_before_kib"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
            r["rss_after_kib"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
            r["kib_per_conn"]
                .as_f64()
                .map_or("-".into(), |n| format!("{n:.2}")),
            r["push_server_over_peer"].as_f64().map_or(
                r["skipped"]
                    .as_str()
                    .or(r["error"].as_str())
                    .map_or(String::new(), |s| format!("({s})")),
                |n| format!("{n:.2}")
            ),
        );
    }
    table
}

/// One human line for a result.
fn line(r: &Value) -> String {
    let peer = r["peer"].as_str().unwrap_or("?");
    if let Some(s) = r["skipped"].as_str() {
        return format!("{peer}: skipped: {s}");
    }
    if let Some(e) = r["error"].as_str() {
        return format!("{peer}: failed: {e}");
    }
    format!(
        "{peer}: {} held, RSS {} -> {} KiB = {:.2} KiB/conn; processes {}",
        r["held"],
        r["rss_before_kib"],
        r["rss_after_kib"],
        r["kib_per_conn"].as_f64().unwrap_or(f64::NAN),
        r["processes"]
    )
}

// ---------------------------------------------------------------------------------------
// push-server

async fn push_server(args: &Args, bench_bin: &Path) -> anyhow::Result<Value> {
    let mut cmd = Command::new(bench_bin);
    cmd.arg("idle-memory")
        .args(["--transport", args.transport.as_str()])
        .arg("--conns")
        .arg(args.conns.to_string())
        .arg("--sources")
        .arg(args.sources.to_string())
        .arg("--concurrency")
        .arg(args.concurrency.to_string())
        .arg("--settle-secs")
        .arg(args.settle_secs.to_string())
        .arg("--json");
    if let Some(bin) = &args.server_bin {
        cmd.arg("--server-bin").arg(bin);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run `bench idle-memory`")?;
    if !out.status.success() {
        bail!(
            "`bench idle-memory` exited with {} (its errors are above)",
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .context("`bench idle-memory --json` printed no JSON")?;
    Ok(json!({
        "peer": "push-server",
        "held": r["conns"],
        "processes": {"push-server": {"before": {"rss_kib": r["rss_before_kib"], "anon_kib": r["anon_before_kib"]},
                                      "after": {"rss_kib": r["rss_after_kib"], "anon_kib": r["anon_after_kib"]}}},
        "rss_before_kib": r["rss_before_kib"],
        "rss_after_kib": r["rss_after_kib"],
        "kib_per_conn": r["kib_per_conn"],
        "anon_kib_per_conn": r["anon_kib_per_conn"],
        "hold_rss_kib": r["hold_rss_kib"],
        "heartbeat_interval": r["heartbeat_interval"],
        "connect_secs": r["connect_secs"],
    }))
}

/// Holds `conns` subscribers on `addr` at `/sub/u{i}` from a `bench hold` process, reads the
/// memory of `procs` before and after, and builds the result.
async fn measure(
    peer: Peer,
    args: &Args,
    bench_bin: &Path,
    addr: SocketAddr,
    procs: &[(String, u32)],
    concurrency: usize,
    status_path: Option<&str>,
) -> anyhow::Result<Value> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memories(procs);
    let connect_budget = Duration::from_secs(60) + Duration::from_millis(15 * args.conns as u64);
    let hold_secs = connect_budget.as_secs() + args.settle_secs + 60;
    eprintln!(
        "opening {} {} subscribers on {addr}/sub/u{{i}} from {} source addresses ({concurrency} in flight)",
        args.conns,
        args.transport.as_str(),
        args.sources
    );
    let mut hold = Command::new(bench_bin)
        .arg("hold")
        .args(["--transport", args.transport.as_str()])
        .arg("--server")
        .arg(addr.to_string())
        .arg("--conns")
        .arg(args.conns.to_string())
        .arg("--sources")
        .arg(args.sources.to_string())
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .args(["--path", "/sub/u{i}"])
        .arg("--hold-secs")
        .arg(hold_secs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `bench hold`")?;
    let hold_pid = hold.id().context("bench hold exited at once")?;
    let mut hold_out = BufReader::new(hold.stdout.take().context("hold stdout")?).lines();
    let report = tokio::time::timeout(connect_budget, next_event(&mut hold_out, "connected"))
        .await
        .with_context(|| format!("the hold process did not report within {connect_budget:?}"))??;
    let ok = report["ok"].as_u64().unwrap_or(0);
    let failed = report["failed"].as_u64().unwrap_or(0);
    let connect_secs = report["connect_secs"].as_f64().unwrap_or(f64::NAN);
    eprintln!("{ok} connected, {failed} failed in {connect_secs:.1} s");
    if failed > 0 {
        eprintln!("errors: {}", report["errors"]);
    }
    if ok == 0 {
        bail!("no subscriber connected: {}", report["errors"]);
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let after = memories(procs);
    // The peer's own count of subscribers, while they are held (Nchan's stub status).
    let status = match status_path {
        Some(path) => crate::admin::get(addr, path)
            .await
            .map_or_else(|e| format!("{e:#}"), |(_, body)| body.trim().to_owned()),
        None => String::new(),
    };
    let hold_memory = sys::memory(hold_pid).ok();
    drop(hold.stdin.take());
    let done = tokio::time::timeout(Duration::from_secs(10), next_event(&mut hold_out, "done"))
        .await
        .ok()
        .and_then(Result::ok);
    let _ = hold.start_kill();
    let _ = hold.wait().await;
    let closed = done
        .as_ref()
        .and_then(|d| d["closed_during_hold"].as_u64())
        .unwrap_or(0);
    // The subscribers still open when the RSS was read (closes are counted up to `done`,
    // after that reading, so this is a lower bound).
    let held = ok.saturating_sub(closed);

    let mut processes = serde_json::Map::new();
    let (mut total_before, mut total_after, mut anon_before, mut anon_after) = (0, 0, 0, 0);
    for (label, pid, b) in &before {
        let Some((_, _, a)) = after.iter().find(|(_, p, _)| p == pid) else {
            bail!("{label} (pid {pid}) exited during the run");
        };
        total_before += b.rss_kib;
        total_after += a.rss_kib;
        anon_before += b.anon_kib;
        anon_after += a.anon_kib;
        processes.insert(
            format!("{label} ({pid})"),
            json!({"before": b, "after": a,
                   "kib_per_conn": sys::round2((a.rss_kib as f64 - b.rss_kib as f64) / held.max(1) as f64)}),
        );
    }
    let n = held.max(1) as f64;
    Ok(json!({
        "peer": peer.as_str(),
        "attempted": args.conns,
        "held": held,
        "failed": failed,
        "errors": report["errors"],
        "closed_during_hold": closed,
        "processes": processes,
        "rss_before_kib": total_before,
        "rss_after_kib": total_after,
        "kib_per_conn": sys::round2((total_after as f64 - total_before as f64) / n),
        "anon_kib_per_conn": sys::round2((anon_after as f64 - anon_before as f64) / n),
        "hold_rss_kib": hold_memory.map(|m| m.rss_kib),
        "connect_secs": sys::round2(connect_secs),
        "concurrency": concurrency,
        "status_while_held": status,
    }))
}

// ---------------------------------------------------------------------------------------
// Nchan and Pushpin

/// Starts a peer (skipped with a line if it is missing), holds the subscribers from a
/// `bench hold` process and measures.
async fn start_and_measure(peer: Peer, args: &Args, bench_bin: &Path) -> anyhow::Result<Value> {
    let server_bin = systems::server_bin(args.server_bin.as_deref())?;
    if let Some(why) = systems::missing(peer, args.transport, &server_bin) {
        return Ok(json!({"peer": peer.as_str(), "skipped": why}));
    }
    let opts = systems::Options {
        max_conns: args.conns,
        // One worker, so that the figure is one process's (DESIGN.md runs 2 for throughput).
        nchan_workers: 1,
        pushpin_message_rate: 2500,
        server_bin,
        server_args: Vec::new(),
    };
    let running = systems::start(peer, &opts).await?;
    let (concurrency, status) = match peer {
        Peer::Nchan => (args.concurrency, Some("/nchan_status")),
        _ => (args.pushpin_concurrency, None),
    };
    let mut result = measure(
        peer,
        args,
        bench_bin,
        running.addr,
        &running.procs,
        concurrency,
        status,
    )
    .await;
    if let Ok(r) = &mut result {
        r["config"] = json!(match peer {
            Peer::Nchan =>
                "worker_processes 1, master_process on; figure = worker + master".to_owned(),
            _ => running.config.clone(),
        });
    }
    drop(running);
    result
}
