//! `bench hold`: opens N client connections and holds them, in a process of its own.
//!
//! Protocol with the parent (`idle-memory`), one JSON object per stdout line:
//! - `{"event":"connected","ok":..,"failed":..,"errors":{..},..}` once every connection has
//!   either its `hello` or an error;
//! - `{"event":"done","closed_during_hold":..,"heartbeats_seen":..}` when it stops: stdin closed (the parent is done or gone) or the
//!   `--hold-secs` deadline passed, so it never outlives a crashed parent for long.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use push_proto::auth::Authenticator;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};

use hdrhistogram::Histogram;
use loadtest::conn::{self, Conn, Event};

pub use push_proto::Transport;

use crate::sys;

/// File descriptors a process needs besides its sockets (stdio, epoll, runtime, binary).
pub const SPARE_FDS: u64 = 64;

/// Arguments of `bench hold`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Transport of every connection.
    #[arg(long, value_enum)]
    transport: Transport,
    /// The server's client address.
    #[arg(long)]
    server: SocketAddr,
    /// Connections to open.
    #[arg(long)]
    conns: usize,
    /// Spread clients over source addresses 127.0.0.2 .. 127.0.0.(2+N-1).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    sources: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// HS256 secret shared with push-server; tokens are minted for users u0 .. u(N-1).
    #[arg(long, required_unless_present = "path")]
    secret: Option<String>,
    /// Raw-path mode, for peers (Nchan, Pushpin): request this path with no token, `{i}`
    /// replaced by the connection's index (e.g. `/sub/u{i}`); open once the response head
    /// is 200 (SSE) or 101 (WebSocket), no hello expected.
    #[arg(long, conflicts_with = "secret")]
    path: Option<String>,
    /// Stop by itself after this many seconds, whatever happens.
    #[arg(long, default_value_t = 600)]
    hold_secs: u64,
    /// Time one connection has for its connect, request and hello.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
}

/// What a connection presents: a push-server token, or a peer's subscription path.
enum Target {
    Token(String),
    Path(String),
}

/// Runs `bench hold` on a multi-threaded runtime.
pub fn run(args: Args) -> anyhow::Result<()> {
    let limit = sys::nofile_limit();
    if args.conns as u64 + SPARE_FDS > limit {
        bail!(
            "{} connections need about {} open files; this process may open {limit}",
            args.conns,
            args.conns as u64 + SPARE_FDS
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(hold(args));
    // The stdin reader is a blocking thread that may never return: do not wait for it.
    runtime.shutdown_background();
    result
}

async fn hold(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_secs(args.hold_secs));
    tokio::pin!(deadline);
    let auth = args
        .secret
        .as_ref()
        .map(|s| Authenticator::new(s.as_bytes(), false));
    // Bounded so that the server's accept queue and handshake limit are not the thing
    // measured, and so that a failure shows up early instead of as 15,000 timeouts.
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    // Each connection's result: the time from connect to open (hello, or the peer's head), µs.
    let (results, mut connected) = mpsc::unbounded_channel::<Result<u64, String>>();
    let closed = Arc::new(AtomicUsize::new(0));
    let heartbeats = Arc::new(AtomicUsize::new(0));
    let connect_timeout = Duration::from_secs(args.connect_timeout_secs);
    // Tokens outlive the bench by far; expiry is not what this measures.
    let token_ttl = Duration::from_secs(args.hold_secs + 3600);

    for i in 0..args.conns {
        // A token for push-server, or the path for a peer.
        let target = match (&auth, &args.path) {
            (Some(auth), _) => Target::Token(auth.mint(&format!("u{i}"), None, token_ttl)),
            (None, path) => Target::Path(
                path.as_deref()
                    .unwrap_or("/")
                    .replace("{i}", &i.to_string()),
            ),
        };
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            2 + (i % usize::from(args.sources)) as u8,
        ));
        let permits = permits.clone();
        let results = results.clone();
        let closed = closed.clone();
        let heartbeats = heartbeats.clone();
        let (server, transport) = (args.server, args.transport);
        tokio::spawn(async move {
            let permit = permits.acquire_owned().await;
            let begun = Instant::now();
            // Boxed: the opening futures (handshake buffers, the hello's parsing) would
            // otherwise size every task for as long as it holds its idle connection.
            let opened = match &target {
                Target::Token(token) => {
                    Box::pin(conn::open(
                        source,
                        server,
                        transport,
                        token,
                        None,
                        connect_timeout,
                    ))
                    .await
                }
                Target::Path(path) => {
                    Box::pin(conn::open_raw(
                        source,
                        server,
                        transport,
                        path,
                        connect_timeout,
                    ))
                    .await
                }
            };
            let took_us = begun.elapsed().as_micros() as u64;
            drop(permit);
            drop(target);
            let conn = match opened {
                Ok(conn) => conn,
                Err(e) => {
                    let _ = results.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let _ = results.send(Ok(took_us));
            drop(results);
            let ended = drive(conn, &heartbeats, |_, _, _| {}).await;
            closed.fetch_add(1, Ordering::Relaxed);
            if ended != Ended::Eof {
                eprintln!("bench hold: connection {i} ended: {ended:?}");
            }
        });
    }
    drop(results);

    let (mut ok, mut failed) = (0usize, 0usize);
    // Error text → count, so 15,000 identical failures print as one line.
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let mut last_open = started;
    while ok + failed < args.conns {
        tokio::select! {
            r = connected.recv() => match r {
                Some(Ok(us)) => {
                    ok += 1;
                    latency.saturating_record(us.max(1));
                    last_open = Instant::now();
                }
                Some(Err(e)) => {
                    failed += 1;
                    *errors.entry(e).or_default() += 1;
                }
                None => break,
            },
            () = &mut deadline => bail!("deadline passed with {ok} connected and {failed} failed"),
        }
    }
    let memory = sys::memory(std::process::id()).ok();
    println!(
        "{}",
        json!({
            "event": "connected",
            "ok": ok,
            "failed": failed,
            "errors": errors,
            "connect_secs": started.elapsed().as_secs_f64(),
            // Accept rate: connections opened per second, from the first attempt to the
            // last success (failures that time out later do not stretch it).
            "opened_per_sec": ok as f64 / (last_open - started).as_secs_f64().max(1e-6),
            "connect_p50_us": latency.value_at_quantile(0.5),
            "connect_p99_us": latency.value_at_quantile(0.99),
            "connect_max_us": latency.max(),
            "rss_kib": memory.map(|m| m.rss_kib),
        })
    );

    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let reason = loop {
        tokio::select! {
            r = stdin.read(&mut sink) => match r {
                Ok(0) | Err(_) => break "stdin closed",
                Ok(_) => {}
            },
            () = &mut deadline => break "deadline",
        }
    };
    println!(
        "{}",
        json!({
            "event": "done",
            "reason": reason,
            "closed_during_hold": closed.load(Ordering::Relaxed),
            "heartbeats_seen": heartbeats.load(Ordering::Relaxed),
        })
    );
    Ok(())
}

/// How a held connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The server closed TCP (or the socket failed).
    Eof,
    /// The server sent a WebSocket close frame with this code.
    CloseFrame(u16),
    /// The server broke the protocol.
    Error,
}

/// Holds a connection until the server ends it: answers WebSocket pings, counts heartbeats
/// (pings, SSE comments) in `heartbeats`, and hands every message to `on_message` as
/// `(id, mid, data)`.
pub async fn drive(
    mut conn: Conn,
    heartbeats: &AtomicUsize,
    mut on_message: impl FnMut(u64, Option<&str>, &str),
) -> Ended {
    loop {
        match conn.next_event().await {
            Event::Message { id, mid, data } => on_message(id, mid.as_deref(), &data),
            Event::Ping(payload) => {
                heartbeats.fetch_add(1, Ordering::Relaxed);
                if conn.pong(&payload).await.is_err() {
                    return Ended::Eof;
                }
            }
            Event::Heartbeat => {
                heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Event::Closed(None) => return Ended::Eof,
            Event::Closed(Some(code)) => return Ended::CloseFrame(code),
            Event::Other(text) if text.starts_with("protocol_error") => return Ended::Error,
            Event::Reconnect { .. } | Event::Other(_) => {}
        }
    }
}

/// What the connections of a [`Holder`] present.
#[derive(Debug, Clone)]
pub enum Present {
    /// push-server: tokens minted with this secret for `u0` … (`u{first}` onwards).
    Secret(String),
    /// A peer: this path, `{i}` replaced by the connection's index.
    Path(String),
}

/// A `bench hold` child process, killed when dropped.
#[derive(Debug)]
pub struct Holder {
    child: tokio::process::Child,
    /// Its pid, for memory readings.
    pub pid: u32,
    out: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

/// How a [`Holder`] connects.
#[derive(Debug, Clone)]
pub struct HoldPlan {
    /// The server's client address.
    pub server: SocketAddr,
    /// Transport of every connection.
    pub transport: Transport,
    /// Connections to open.
    pub conns: usize,
    /// Source addresses 127.0.0.2 … 127.0.0.(2 + sources − 1).
    pub sources: u8,
    /// Connects in flight.
    pub concurrency: usize,
    /// Token or path.
    pub present: Present,
    /// The holder's own deadline.
    pub hold_secs: u64,
}

impl Holder {
    /// Starts `bench hold` with `plan`.
    pub fn spawn(bench_bin: &std::path::Path, plan: &HoldPlan) -> anyhow::Result<Self> {
        use std::process::Stdio;
        let mut cmd = tokio::process::Command::new(bench_bin);
        cmd.arg("hold")
            .args(["--transport", plan.transport.as_str()])
            .arg("--server")
            .arg(plan.server.to_string())
            .arg("--conns")
            .arg(plan.conns.to_string())
            .arg("--sources")
            .arg(plan.sources.to_string())
            .arg("--concurrency")
            .arg(plan.concurrency.to_string())
            .arg("--hold-secs")
            .arg(plan.hold_secs.to_string());
        match &plan.present {
            Present::Secret(s) => cmd.args(["--secret", s]),
            Present::Path(p) => cmd.args(["--path", p]),
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `bench hold`")?;
        let pid = child.id().context("bench hold exited at once")?;
        let out = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().context("hold stdout")?,
        ));
        Ok(Self { child, pid, out })
    }

    /// Waits for the `connected` report (ok, failed, errors, connect latency, rate).
    pub async fn connected(&mut self, budget: Duration) -> anyhow::Result<serde_json::Value> {
        tokio::time::timeout(budget, self.event("connected"))
            .await
            .with_context(|| format!("the hold process did not report within {budget:?}"))?
    }

    async fn event(&mut self, event: &str) -> anyhow::Result<serde_json::Value> {
        while let Some(line) = self.out.next_line().await? {
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["event"] == event => return Ok(v),
                _ => eprintln!("bench hold: {line}"),
            }
        }
        bail!("the hold process exited before reporting `{event}` (its errors are above)")
    }

    /// Lets the process go (stdin closed) and returns its `done` report, if it gave one.
    pub async fn finish(mut self) -> Option<serde_json::Value> {
        drop(self.child.stdin.take());
        let done = tokio::time::timeout(Duration::from_secs(10), self.event("done"))
            .await
            .ok()
            .and_then(Result::ok);
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        done
    }
}
