//! `bench idle-memory`: the server's resident memory per idle connection.
//!
//! 1. Start the push-server release binary on free ports, heartbeats on (30 s), and wait for
//!    `/healthz`.
//! 2. Read its RSS (`/proc/<pid>/status`).
//! 3. Start `bench hold` (another process) to open N connections; wait for its report.
//! 4. Wait until the server's `push_connections_open` gauge shows all N, let it settle,
//!    read the RSS again and check that the gauge still shows N.
//! 5. (after − before) / N is the cost of one idle connection.
//!
//! Every child is killed when this returns, on success or error (`kill_on_drop`), and the
//! hold process also stops by itself when its stdin closes or its deadline passes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::admin;
use crate::hold::{HoldPlan, Holder, Present, Transport, SPARE_FDS};
use crate::sys;

/// Secret shared by the server and the hold process (32 characters; any value works).
const SECRET: &str = "bench-idle-memory-secret-0123456";

/// The heartbeat the server runs with: on, at the production default, so that an idle
/// connection pays for whatever heartbeats cost.
const HEARTBEAT: &str = "30s";

/// How long the server has to answer `/healthz` after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the gauge has to reach N once the hold process reports all connected.
const GAUGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `bench idle-memory`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Transport of the idle connections.
    #[arg(long, value_enum)]
    transport: Transport,
    /// Idle connections to hold (one process each side: at most ~19,900 here).
    #[arg(long, default_value_t = 15_000)]
    conns: usize,
    /// push-server binary. Default: `push-server` next to this `bench` binary.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Client source addresses, 127.0.0.2 onwards (avoids ephemeral-port exhaustion).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    sources: u8,
    /// Seconds to wait after all connections are open before reading the RSS.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Extra argument for push-server, repeatable, e.g. `--server-arg=--registry=redis://127.0.0.1:6379`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Print the result as one JSON object on stdout (the human line goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Runs the scenario; Ctrl-C or SIGTERM stop it and its children.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = scenario(args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
    // Leaving `block_on` dropped the scenario and with it the children (`kill_on_drop`).
}

async fn scenario(args: Args) -> anyhow::Result<()> {
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    let needed = args.conns as u64 + SPARE_FDS;
    let limit = sys::nofile_limit();
    if needed > limit {
        bail!(
            "{} connections need about {needed} open files per process, above the limit of {limit}; \
             beyond that, run several server and client processes (see DESIGN.md, Measuring)",
            args.conns
        );
    }
    let bench_bin = std::env::current_exe().context("cannot find the bench binary")?;
    let server_bin = match args.server_bin.clone() {
        Some(p) => p,
        None => bench_bin
            .parent()
            .context("bench binary has no directory")?
            .join("push-server"),
    };
    if !server_bin.is_file() {
        bail!(
            "no push-server binary at {} (build it with `cargo build --release -p push-server`, or pass --server-bin)",
            server_bin.display()
        );
    }

    // 1. The server.
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, sys::free_port()?));
    let admin_addr = loop {
        let port = sys::free_port()?;
        if port != listen.port() {
            break SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        }
    };
    eprintln!(
        "starting {} on {listen} (admin {admin_addr})",
        server_bin.display()
    );
    let mut server = Command::new(&server_bin)
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--admin-listen")
        .arg(admin_addr.to_string())
        .args(["--auth-secret", SECRET, "--per-ip-rate", "0"])
        .args(["--max-pending-per-ip", "0", "--max-connections-per-ip", "0"])
        .arg("--max-connections")
        .arg((args.conns + 1000).to_string())
        .args(["--heartbeat-interval", HEARTBEAT])
        .args(&args.server_args)
        // Warnings (accept errors, say) still reach the terminal; per-connection logs do not.
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", server_bin.display()))?;
    let server_pid = server.id().context("push-server exited at once")?;
    wait_healthy(&mut server, admin_addr).await?;
    let server_limit = sys::nofile_limit_of(server_pid)?;
    if needed > server_limit {
        bail!("push-server may open only {server_limit} files; {needed} are needed");
    }

    // 2. Its memory with no client. A moment first, so start-up allocations are done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sys::memory(server_pid)?;

    // 3. The clients, from another process.
    let connect_budget = Duration::from_secs(60) + Duration::from_millis(10 * args.conns as u64);
    let hold_secs = connect_budget.as_secs() + GAUGE_TIMEOUT.as_secs() + args.settle_secs + 60;
    eprintln!(
        "opening {} {} connections from {} source addresses ({} in flight)",
        args.conns,
        args.transport.as_str(),
        args.sources,
        args.concurrency
    );
    let mut hold = Holder::spawn(
        &bench_bin,
        &HoldPlan {
            server: listen,
            transport: args.transport,
            conns: args.conns,
            sources: args.sources,
            concurrency: args.concurrency,
            present: Present::Secret(SECRET.to_owned()),
            hold_secs,
        },
    )?;
    let hold_pid = hold.pid;
    let report = hold.connected(connect_budget).await?;
    let ok = report["ok"].as_u64().unwrap_or(0);
    let failed = report["failed"].as_u64().unwrap_or(0);
    let connect_secs = report["connect_secs"].as_f64().unwrap_or(f64::NAN);
    if failed > 0 || ok != args.conns as u64 {
        bail!(
            "{failed} of {} connections failed (errors and counts: {})",
            args.conns,
            report["errors"]
        );
    }
    eprintln!("{ok} connected in {connect_secs:.1} s");

    // 4. The server's own count, then the settle, then the second reading.
    let gauge_deadline = Instant::now() + GAUGE_TIMEOUT;
    loop {
        let open = open_connections(admin_addr, args.transport).await?;
        if open == args.conns as f64 {
            break;
        }
        if Instant::now() > gauge_deadline {
            bail!(
                "the server counts {open} open {} connections, not {}, {GAUGE_TIMEOUT:?} after the clients connected",
                args.transport.as_str(),
                args.conns
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let after = sys::memory(server_pid)?;
    let hold_memory = sys::memory(hold_pid)?;
    let open = open_connections(admin_addr, args.transport).await?;
    if open != args.conns as f64 {
        bail!(
            "connections dropped while settling: the server counts {open}, not {}",
            args.conns
        );
    }

    // Done: let the hold process go, then the server.
    let done = hold.finish().await;
    let _ = server.start_kill();
    let _ = server.wait().await;

    // 5. The result.
    let n = args.conns as f64;
    let per_conn = |a: u64, b: u64| (a as f64 - b as f64) / n;
    let kib_per_conn = per_conn(after.rss_kib, before.rss_kib);
    let anon_kib_per_conn = per_conn(after.anon_kib, before.anon_kib);
    let result = json!({
        "transport": args.transport,
        "conns": args.conns,
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
        "kib_per_conn": round2(kib_per_conn),
        "anon_before_kib": before.anon_kib,
        "anon_after_kib": after.anon_kib,
        "anon_kib_per_conn": round2(anon_kib_per_conn),
        "hold_rss_kib": hold_memory.rss_kib,
        "hold_kib_per_conn": round2(hold_memory.rss_kib as f64 / n),
        "connect_secs": round2(connect_secs),
        "settle_secs": args.settle_secs,
        "heartbeat_interval": HEARTBEAT,
        "sources": args.sources,
        "closed_during_hold": done.as_ref().and_then(|d| d["closed_during_hold"].as_u64()),
        // With --settle-secs above the heartbeat interval, every connection has had one.
        "heartbeats_seen": done.as_ref().and_then(|d| d["heartbeats_seen"].as_u64()),
        "server_bin": server_bin.display().to_string(),
        "server_args": args.server_args,
        "machine": sys::machine(),
    });
    let line = format!(
        "idle-memory {}: {} conns, server RSS {} -> {} KiB = {kib_per_conn:.2} KiB/conn \
         (anon {anon_kib_per_conn:.2}); hold process {} KiB; heartbeats seen {}",
        args.transport.as_str(),
        args.conns,
        before.rss_kib,
        after.rss_kib,
        hold_memory.rss_kib,
        result["heartbeats_seen"],
    );
    if args.json {
        eprintln!("{line}");
        println!("{result}");
    } else {
        println!("{line}");
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Polls `/healthz` until it answers 200; fails if the server exits or takes too long.
pub(crate) async fn wait_healthy(server: &mut Child, admin_addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = server.try_wait()? {
            bail!("push-server exited with {status} before it was healthy");
        }
        if let Ok((200, _)) = admin::get(admin_addr, "/healthz").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("push-server did not answer /healthz on {admin_addr} within {STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's `push_connections_open` gauge for `transport` (0 when absent).
async fn open_connections(admin_addr: SocketAddr, transport: Transport) -> anyhow::Result<f64> {
    let (status, body) = admin::get(admin_addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(admin::connections_open(&body, transport.as_str()).unwrap_or(0.0))
}

/// Reads the hold process's stdout up to the JSON line whose `event` is `event`.
pub(crate) async fn next_event(
    lines: &mut Lines<BufReader<ChildStdout>>,
    event: &str,
) -> anyhow::Result<Value> {
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v["event"] == event => return Ok(v),
            _ => eprintln!("bench hold: {line}"),
        }
    }
    bail!("the hold process exited before reporting `{event}` (its errors are above)")
}
