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
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::client::{self, Transport};
use crate::hold::SPARE_FDS;
use crate::idle_memory::next_event;
use crate::sys::{self, Memory};

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Our push-server (`bench idle-memory`).
    PushServer,
    /// nginx with libnginx-mod-nchan.
    Nchan,
    /// Pushpin, with zurl and a GRIP backend inside the bench.
    Pushpin,
}

impl Peer {
    fn as_str(self) -> &'static str {
        match self {
            Self::PushServer => "push-server",
            Self::Nchan => "nchan",
            Self::Pushpin => "pushpin",
        }
    }
}

/// Arguments of `bench peers-idle`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Idle connections to hold on each server (one client process: at most ~19,900).
    #[arg(long, default_value_t = 15_000)]
    conns: usize,
    /// Transport of the idle connections (Pushpin: SSE only here).
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    transport: Transport,
    /// Servers to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan,pushpin"
    )]
    peers: Vec<Peer>,
    /// Client source addresses, 127.0.0.2 onwards.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    sources: u8,
    /// Connection attempts in flight at once (push-server and Nchan).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Connection attempts in flight at once for Pushpin: a gentle ramp (DESIGN.md, Measuring).
    #[arg(long, default_value_t = 64)]
    pushpin_concurrency: usize,
    /// Seconds to wait after the connections are open before reading the RSS.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// push-server binary (passed to `bench idle-memory`).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Print every result as one JSON array on stdout (the human lines go to stderr).
    #[arg(long)]
    json: bool,
}

/// Runs the peers one after the other; Ctrl-C or SIGTERM stop it and its children.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = all(&args) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    })
}

async fn all(args: &Args) -> anyhow::Result<()> {
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
                Peer::Nchan => nchan(args, &bench_bin).await,
                Peer::Pushpin => pushpin(args, &bench_bin).await,
            }
        };
        let result = match tokio::time::timeout(budget, run).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({"peer": peer.as_str(), "error": format!("{e:#}")}),
            Err(_) => {
                json!({"peer": peer.as_str(), "error": format!("did not finish within {budget:?}")})
            }
        };
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
    let mut table = String::from(
        "peer         held    total RSS before -> after KiB   KiB/conn   push-server ÷ peer\n",
    );
    for r in &results {
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
    if args.json {
        eprint!("{table}");
        println!("{}", Value::Array(results));
    } else {
        print!("{table}");
    }
    Ok(())
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

// ---------------------------------------------------------------------------------------
// Shared by the peers

/// A process started here, stopped with its descendants when dropped: SIGTERM to all, a
/// short wait, then SIGKILL to whatever is left (nginx workers and Pushpin's services do not
/// die with a SIGKILLed parent, so `kill_on_drop` alone would leave them behind).
struct Tree {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
}

impl Tree {
    fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Self { name, child, pid })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let mut pids: Vec<u32> = sys::descendants(self.pid)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        pids.push(self.pid);
        let signal = |pids: &[u32], sig: Signal| {
            for &p in pids {
                if let Some(pid) = Pid::from_raw(p as i32) {
                    let _ = kill_process(pid, sig);
                }
            }
        };
        signal(&pids, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            if pids
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists() || is_zombie(*p))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(&pids, Signal::KILL);
        let _ = self.child.try_wait();
        eprintln!(
            "stopped {} (pid {}) and {} descendants",
            self.name,
            self.pid,
            pids.len() - 1
        );
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("bench-{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first `name` on `PATH` (or in /usr/sbin, where nginx lives).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port free on every address (condure binds 0.0.0.0) and below the ephemeral range, so
/// that no client socket of an earlier run (in TIME_WAIT on 127.0.0.x) holds it.
fn free_port_below_ephemeral() -> anyhow::Result<u16> {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|&p| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok())
        .context("no free port in 20000..32000")
}

/// Waits until something accepts TCP on `addr`.
async fn wait_listening(
    addr: SocketAddr,
    tree: &mut Tree,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = tree.exited() {
            bail!(
                "{} exited with {status} before listening on {addr}",
                tree.name
            );
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within {timeout:?}", tree.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Memory of a set of labelled processes; a process that cannot be read is left out.
fn memories(procs: &[(String, u32)]) -> Vec<(String, u32, Memory)> {
    procs
        .iter()
        .filter_map(|(label, pid)| sys::memory(*pid).ok().map(|m| (label.clone(), *pid, m)))
        .collect()
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
// Nchan

/// The nchan module: the `load_module` line of /etc/nginx/modules-enabled, or the file in
/// /usr/lib/nginx/modules.
fn nchan_module() -> Option<PathBuf> {
    if let Ok(dir) = std::fs::read_dir("/etc/nginx/modules-enabled") {
        for entry in dir.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for l in text.lines() {
                if let Some(rest) = l.trim().strip_prefix("load_module") {
                    let p = PathBuf::from(rest.trim().trim_end_matches(';').trim());
                    if p.file_name()
                        .is_some_and(|f| f.to_string_lossy().contains("nchan"))
                        && p.is_file()
                    {
                        return Some(p);
                    }
                }
            }
        }
    }
    let p = PathBuf::from("/usr/lib/nginx/modules/ngx_nchan_module.so");
    p.is_file().then_some(p)
}

async fn nchan(args: &Args, bench_bin: &Path) -> anyhow::Result<Value> {
    let skip = |why: &str| Ok(json!({"peer": "nchan", "skipped": why}));
    let Some(nginx) = which("nginx") else {
        return skip("nginx is not installed (apt-get install nginx libnginx-mod-nchan)");
    };
    let Some(module) = nchan_module() else {
        return skip("the nchan module is not installed (apt-get install libnginx-mod-nchan)");
    };
    let dir = TempDir::new("nchan")?;
    let port = sys::free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let d = dir.0.display();
    // One worker, so that the figure is one process's (DESIGN.md runs 2 for throughput).
    let conf = format!(
        r"load_module {module};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 19000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/sub/(\w+)$ {{
            nchan_subscriber;
            nchan_channel_id $1;
        }}
        location ~ ^/pub/(\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
        }}
        location = /nchan_status {{
            nchan_stub_status;
        }}
    }}
}}
",
        module = module.display()
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    eprintln!(
        "starting {} -c {} (worker_processes 1)",
        nginx.display(),
        conf_path.display()
    );
    let mut tree = Tree::spawn(
        "nginx",
        Command::new(&nginx)
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    if let Err(e) = wait_listening(addr, &mut tree, Duration::from_secs(10)).await {
        let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
        bail!("{e:#}; error.log: {}", log.trim());
    }
    let mut procs = vec![("nginx master".to_owned(), tree.pid)];
    for (pid, name) in sys::descendants(tree.pid) {
        // Workers keep the binary's name (`nginx`) in /proc; the master is the only parent.
        procs.push((format!("{name} worker"), pid));
    }
    let mut result = measure(
        Peer::Nchan,
        args,
        bench_bin,
        addr,
        &procs,
        args.concurrency,
        Some("/nchan_status"),
    )
    .await;
    if let Ok(r) = &mut result {
        r["config"] = json!("worker_processes 1, master_process on; figure = worker + master");
    }
    drop(tree);
    result
}

// ---------------------------------------------------------------------------------------
// Pushpin

/// A GRIP backend: every request for `/sub/<user>` gets `200`, `Grip-Hold: stream` and
/// `Grip-Channel: <user>`; HTTP/1.1 keep-alive (zurl reuses connections).
async fn grip_backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = grip_connection(stream).await;
        });
    }
}

async fn grip_connection(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..head_end + body_len);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let user = path.rsplit('/').next().unwrap_or("none").to_owned();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nGrip-Hold: stream\r\n\
             Grip-Channel: {user}\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(response.as_bytes()).await?;
    }
}

/// `/etc/<file>` with `key=value` lines replaced (or added under their section).
fn rewrite_ini(text: &str, set: &[(&str, &str, String)]) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let mut done = vec![false; set.len()];
    let flush = |out: &mut String, section: &str, done: &mut Vec<bool>| {
        for (i, (s, k, v)) in set.iter().enumerate() {
            if *s == section && !done[i] {
                let _ = writeln!(out, "{k}={v}");
                done[i] = true;
            }
        }
    };
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            flush(&mut out, &section, &mut done);
            section = t.trim_matches(['[', ']']).to_owned();
        }
        if let Some((k, _)) = t.split_once('=') {
            if let Some(i) = set
                .iter()
                .position(|(s, key, _)| *s == section && *key == k.trim())
            {
                let _ = writeln!(out, "{}={}", set[i].1, set[i].2);
                done[i] = true;
                continue;
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    flush(&mut out, &section, &mut done);
    out
}

async fn pushpin(args: &Args, bench_bin: &Path) -> anyhow::Result<Value> {
    let skip = |why: &str| Ok(json!({"peer": "pushpin", "skipped": why}));
    if args.transport == Transport::Ws {
        return skip("WebSocket through Pushpin needs WebSocket-over-HTTP in the backend, not written yet; run with --transport sse");
    }
    let (Some(pushpin), Some(zurl)) = (which("pushpin"), which("zurl")) else {
        return skip("pushpin or zurl is not installed (apt-get install pushpin zurl)");
    };
    let Ok(pushpin_conf) = std::fs::read_to_string("/etc/pushpin/pushpin.conf") else {
        return skip("no /etc/pushpin/pushpin.conf (apt-get install pushpin)");
    };
    let zurl_conf = std::fs::read_to_string("/etc/zurl.conf").unwrap_or_default();
    if !sys::pids_named("zurl").is_empty() {
        bail!(
            "a zurl is already running (its /var/run/zurl sockets would be shared): stop it first"
        );
    }
    let dir = TempDir::new("pushpin")?;

    // The backend, in this process.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let backend = listener.local_addr()?;
    let backend_task = tokio::spawn(grip_backend(listener));

    // zurl: Pushpin's internal.conf fixes its sockets in /var/run/zurl. The Debian config
    // denies 127.*; this copy allows it, for the backend on 127.0.0.1.
    std::fs::create_dir_all("/var/run/zurl").context("cannot create /var/run/zurl")?;
    let zurl_conf_path = dir.0.join("zurl.conf");
    std::fs::write(
        &zurl_conf_path,
        rewrite_ini(&zurl_conf, &[("General", "deny", String::new())]),
    )?;
    eprintln!(
        "starting {} --config={}",
        zurl.display(),
        zurl_conf_path.display()
    );
    let mut zurl_tree = Tree::spawn(
        "zurl",
        Command::new(&zurl)
            .arg(format!("--config={}", zurl_conf_path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;

    // pushpin: the package's config with our port, run and log directories, and routes.
    let port = free_port_below_ephemeral()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for sub in ["run", "log"] {
        std::fs::create_dir_all(dir.0.join(sub))?;
    }
    std::fs::write(dir.0.join("routes"), format!("* {backend}\n"))?;
    let conf = rewrite_ini(
        &pushpin_conf,
        &[
            ("global", "rundir", dir.0.join("run").display().to_string()),
            ("runner", "http_port", port.to_string()),
            ("runner", "logdir", dir.0.join("log").display().to_string()),
            ("runner", "client_maxconn", (args.conns + 1000).to_string()),
            (
                "proxy",
                "routesfile",
                dir.0.join("routes").display().to_string(),
            ),
        ],
    );
    let conf_path = dir.0.join("pushpin.conf");
    std::fs::write(&conf_path, conf)?;
    eprintln!(
        "starting {} --config {} (backend {backend})",
        pushpin.display(),
        conf_path.display()
    );
    // Its services' logs (`-m`: merged) go to a file, shown if it fails to start.
    let out_path = dir.0.join("pushpin.out");
    let out = std::fs::File::create(&out_path)?;
    let mut tree = Tree::spawn(
        "pushpin",
        Command::new(&pushpin)
            .arg("--config")
            .arg(&conf_path)
            .arg("-m")
            .stdout(out.try_clone()?)
            .stderr(out),
    )?;
    if let Err(e) = wait_listening(addr, &mut tree, Duration::from_secs(20)).await {
        let log = std::fs::read_to_string(&out_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e:#}; its output ends with:\n{}", tail.join("\n"));
    }
    // One probe subscription end to end (client → condure → proxy → zurl → backend).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            client::open_raw(
                std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
                addr,
                args.transport,
                "/sub/probe",
            ),
        )
        .await;
        match probe {
            Ok(Ok(conn)) => {
                drop(conn);
                break;
            }
            Ok(Err(e)) if Instant::now() > deadline => {
                bail!("Pushpin's probe subscription failed: {e:#}")
            }
            Err(_) if Instant::now() > deadline => bail!("Pushpin's probe subscription timed out"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let mut procs = vec![("pushpin".to_owned(), tree.pid)];
    for (pid, name) in sys::descendants(tree.pid) {
        procs.push((name, pid));
    }
    procs.push(("zurl".to_owned(), zurl_tree.pid));
    if let Some(status) = zurl_tree.exited() {
        bail!("zurl exited with {status}");
    }
    let mut result = measure(
        Peer::Pushpin,
        args,
        bench_bin,
        addr,
        &procs,
        args.pushpin_concurrency,
        None,
    )
    .await;
    if let Ok(r) = &mut result {
        r["config"] = json!("pushpin.conf from the package with port, rundir, logdir, routes, client_maxconn changed; zurl.conf with deny= emptied");
    }
    drop(tree);
    drop(zurl_tree);
    backend_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_ini_keys_in_their_section() {
        let text = "[a]\nx=1\ny=2\n[b]\nx=3\n";
        let out = rewrite_ini(text, &[("b", "x", "9".into()), ("a", "z", "5".into())]);
        assert_eq!(out, "[a]\nx=1\ny=2\nz=5\n[b]\nx=9\n");
    }
}
