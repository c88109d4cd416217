//! Opening many client connections, and `bench hold`: a process of its own that opens N of
//! them and holds them, so that a server's RSS is all the server's.
//!
//! [`open_many`] is the one connection loop of the bench (`hold` and the subscribers of
//! `peers-push` use it): bounded connects in flight, source addresses 127.0.0.2 onwards, one
//! task per connection. [`Tally`] counts what opened.
//!
//! Protocol of `bench hold` with its parent ([`Reporter`]), one JSON object per stdout line:
//! - [`Connected`] once every connection has either opened or failed;
//! - with `--account` (the pipeline's receiver), a [`crate::receive::Report`] for each
//!   `report <run>` line on stdin;
//! - [`Done`] when it stops: stdin closed (the parent is done or gone) or the `--hold-secs`
//!   deadline passed, so it never outlives a crashed parent for long.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use loadtest::conn::{self, Conn, Event};
use loadtest::stats::new_histogram;
use push_proto::auth::Authenticator;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, Semaphore};

pub use push_proto::Transport;

use crate::receive::{Books, UserTracker};
use crate::sys;

/// File descriptors a process needs besides its sockets (stdio, epoll, runtime, binary).
pub const SPARE_FDS: u64 = 64;

/// Arguments of `bench hold`; the scenarios fill them in and [`Args::spawn`] the child.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Args {
    /// Transport of every connection.
    #[arg(long, value_enum)]
    pub transport: Transport,
    /// A server's client address (repeatable): connection i goes to server i mod (number
    /// of servers).
    #[arg(long = "server", required = true)]
    #[serde(rename = "server")]
    pub servers: Vec<SocketAddr>,
    /// Connections to open.
    #[arg(long)]
    pub conns: usize,
    /// Spread clients over source addresses 127.0.0.2 .. 127.0.0.(2+N-1).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    pub sources: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// HS256 secret shared with push-server; tokens are minted for users
    /// `<prefix>0` .. `<prefix>(N-1)`.
    #[arg(long, required_unless_present = "path")]
    pub secret: Option<String>,
    /// Prefix of the user IDs (push-lib's and push-send's users are `user-<i>`).
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Device ID in the tokens.
    #[arg(long)]
    pub device: Option<String>,
    /// Account for every message (the pipeline benchmark's receiver, [`crate::receive`]):
    /// answer `report <run>` lines on stdin.
    #[arg(long)]
    pub account: bool,
    /// Raw-path mode, for peers (Nchan, Pushpin): request this path with no token, `{i}`
    /// replaced by the connection's index (e.g. `/sub/u{i}`); open once the response head
    /// is 200 (SSE) or 101 (WebSocket), no hello expected.
    #[arg(long, conflicts_with = "secret")]
    pub path: Option<String>,
    /// Stop by itself after this many seconds, whatever happens.
    #[arg(long, default_value_t = 600)]
    pub hold_secs: u64,
    /// Time one connection has for its connect, request and hello.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_secs: u64,
}

/// The source address of connection `i`: 127.0.0.2 onwards, `sources` of them, so that the
/// clients do not run out of ephemeral ports towards one server address.
pub fn source(i: usize, sources: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % usize::from(sources.max(1))) as u8,
    ))
}

/// Opens `n` connections with `open(i, source)`, at most `concurrency` in flight (so that a
/// server's accept queue and handshake limit are not the thing measured, and a failure shows
/// early instead of as 15,000 timeouts), then holds each with `hold(i, conn)` in its own
/// task. Every attempt's outcome arrives on the returned channel: the µs from the start of
/// the attempt to open, or the kind of error ([`conn::error_kind`]).
pub fn open_many<O, OF, H, HF>(
    n: usize,
    sources: u8,
    concurrency: usize,
    open: O,
    hold: H,
) -> mpsc::UnboundedReceiver<Result<u64, String>>
where
    O: Fn(usize, IpAddr) -> OF + Send + Sync + 'static,
    OF: Future<Output = anyhow::Result<Conn>> + Send + 'static,
    H: Fn(usize, Conn) -> HF + Send + Sync + 'static,
    HF: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, rx) = mpsc::unbounded_channel();
    let (open, hold) = (Arc::new(open), Arc::new(hold));
    for i in 0..n {
        let (permits, tx, open, hold) = (permits.clone(), tx.clone(), open.clone(), hold.clone());
        tokio::spawn(async move {
            let permit = permits.acquire_owned().await;
            let begun = Instant::now();
            // Boxed: the opening future (handshake buffers, the hello's parsing) would
            // otherwise size every task for as long as it holds its idle connection.
            let opened = Box::pin(open(i, source(i, sources))).await;
            drop(permit);
            drop(open);
            match opened {
                Ok(conn) => {
                    let _ = tx.send(Ok(begun.elapsed().as_micros() as u64));
                    drop(tx);
                    hold(i, conn).await;
                }
                Err(e) => {
                    let _ = tx.send(Err(conn::error_kind(&e)));
                }
            }
        });
    }
    rx
}

/// What the attempts of [`open_many`] came to.
#[derive(Debug)]
pub struct Tally {
    /// Connections opened.
    pub ok: usize,
    /// Attempts failed.
    pub failed: usize,
    /// Error kind → count, so that 15,000 identical failures print as one line.
    pub errors: BTreeMap<String, u64>,
    /// Time from the start of an attempt to open, µs.
    pub latency_us: Histogram<u64>,
    /// First attempt → last success.
    pub opening: Duration,
}

impl Tally {
    /// Counts `n` outcomes from `rx`, of attempts begun at `started`; fails if `deadline`
    /// passes first.
    pub async fn collect(
        rx: &mut mpsc::UnboundedReceiver<Result<u64, String>>,
        n: usize,
        started: Instant,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<Self> {
        let mut t = Tally {
            ok: 0,
            failed: 0,
            errors: BTreeMap::new(),
            latency_us: new_histogram(),
            opening: Duration::ZERO,
        };
        while t.ok + t.failed < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Ok(us))) => {
                    t.ok += 1;
                    t.latency_us.saturating_record(us.max(1));
                    t.opening = started.elapsed();
                }
                Ok(Some(Err(e))) => {
                    t.failed += 1;
                    *t.errors.entry(e).or_default() += 1;
                }
                Ok(None) => break,
                Err(_) => bail!("deadline passed with {} open and {} failed", t.ok, t.failed),
            }
        }
        Ok(t)
    }

    /// The report of a process that opened connections since `started`.
    pub fn connected(&self, started: Instant) -> Connected {
        Connected {
            ok: self.ok as u64,
            failed: self.failed as u64,
            errors: self.errors.clone(),
            connect_secs: started.elapsed().as_secs_f64(),
            opened_per_sec: self.ok as f64 / self.opening.as_secs_f64().max(1e-6),
            connect_p50_us: self.latency_us.value_at_quantile(0.5),
            connect_p99_us: self.latency_us.value_at_quantile(0.99),
            connect_max_us: self.latency_us.max(),
            rss_kib: sys::memory(std::process::id()).ok().map(|m| m.rss_kib),
        }
    }
}

/// `bench hold`'s report once every connection has opened or failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connected {
    /// Connections open.
    pub ok: u64,
    /// Attempts failed.
    pub failed: u64,
    /// Error kind → count.
    pub errors: BTreeMap<String, u64>,
    /// From the first attempt until all had an outcome.
    pub connect_secs: f64,
    /// Accept rate: connections opened per second, from the first attempt to the last
    /// success (failures that time out later do not stretch it).
    pub opened_per_sec: f64,
    /// Attempt → open latency, µs.
    pub connect_p50_us: u64,
    /// Attempt → open latency, µs.
    pub connect_p99_us: u64,
    /// Attempt → open latency, µs.
    pub connect_max_us: u64,
    /// The hold process's own RSS then.
    pub rss_kib: Option<u64>,
}

/// `bench hold`'s report when it stops.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Done {
    /// Why it stopped: `stdin closed` or `deadline`.
    pub reason: String,
    /// Connections the server closed while they were held.
    pub closed_during_hold: u64,
    /// Heartbeats seen (WebSocket pings, SSE comments), all connections together.
    pub heartbeats_seen: u64,
}

/// One line a child reports: `{"event": <event>, ...report}`.
#[derive(Serialize, Deserialize)]
struct Line<T> {
    event: String,
    #[serde(flatten)]
    report: T,
}

/// Prints one report line: `{"event": <event>, ...report}`.
pub fn report(event: &str, report: &impl Serialize) {
    let line = Line {
        event: event.into(),
        report,
    };
    println!(
        "{}",
        serde_json::to_string(&line).expect("reports serialize")
    );
}

/// Runs `bench hold` on a multi-threaded runtime.
pub fn run(args: Args) -> anyhow::Result<()> {
    run_child(args.conns, hold(args))
}

/// Runs a child of the bench that holds `conns` connections (`hold`) on a
/// multi-threaded runtime, once they fit under the open-files limit.
pub fn run_child(
    conns: usize,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    sys::check_files(conns as u64 + SPARE_FDS, "the connections")?;
    let runtime = crate::runtime(None)?;
    let result = runtime.block_on(work);
    // The stdin reader is a blocking thread that may never return: do not wait for it.
    runtime.shutdown_background();
    result
}

async fn hold(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.hold_secs);
    let auth = args
        .secret
        .as_ref()
        .map(|s| Authenticator::new(s.as_bytes(), false));
    let books = Arc::new(Books::default());
    let timeout = Duration::from_secs(args.connect_timeout_secs);
    // Tokens outlive the bench by far; expiry is not what this measures.
    let token_ttl = Duration::from_secs(args.hold_secs + 3600);
    let Args {
        servers,
        transport,
        path,
        user_prefix,
        device,
        account,
        ..
    } = args.clone();
    let b = books.clone();
    let mut rx = open_many(
        args.conns,
        args.sources,
        args.concurrency,
        move |i, source| {
            // A token for push-server, or the path for a peer.
            let user = format!("{user_prefix}{i}");
            let target = match (&auth, &path) {
                (Some(auth), _) => Ok(auth.mint(&user, device.as_deref(), token_ttl)),
                (None, path) => Err(path
                    .as_deref()
                    .unwrap_or("/")
                    .replace("{i}", &i.to_string())),
            };
            let server = servers[i % servers.len()];
            async move {
                match target {
                    Ok(token) => conn::open(source, server, transport, &token, None, timeout).await,
                    Err(path) => conn::open_raw(source, server, transport, &path, timeout).await,
                }
            }
        },
        move |i, conn| {
            let books = b.clone();
            async move {
                let mut tracker = UserTracker::default();
                let ended = drive(conn, &books.heartbeats, |id, mid, data| {
                    if account {
                        books.record(&mut tracker, id, mid, data);
                    }
                })
                .await;
                books.ended(&tracker);
                if ended != Ended::Eof {
                    eprintln!("bench hold: connection {i} ended: {ended:?}");
                }
            }
        },
    );
    let t = Tally::collect(&mut rx, args.conns, started, deadline).await?;
    report("connected", &t.connected(started));

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let reason = loop {
        let line = tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => break "stdin closed",
            },
            () = tokio::time::sleep_until(deadline) => break "deadline",
        };
        match line
            .strip_prefix("report ")
            .and_then(|r| r.trim().parse().ok())
        {
            Some(run) => report("report", &books.report(run)),
            None => eprintln!("bench hold: unknown command {line:?} (expected `report <run>`)"),
        }
    };
    report(
        "done",
        &Done {
            reason: reason.into(),
            closed_during_hold: books.closed.load(Ordering::Relaxed) as u64,
            heartbeats_seen: books.heartbeats.load(Ordering::Relaxed) as u64,
        },
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

/// A child process of the bench that reports in JSON lines on stdout (`bench hold`); killed
/// when dropped.
#[derive(Debug)]
pub struct Reporter {
    child: Child,
    /// Its pid, for memory and CPU readings.
    pub pid: u32,
    out: Lines<BufReader<ChildStdout>>,
    name: &'static str,
}

impl Reporter {
    /// Starts `bench <args…>` with piped stdin and stdout.
    pub fn spawn(name: &'static str, args: &[String]) -> anyhow::Result<Self> {
        let bench = std::env::current_exe().context("cannot find the bench binary")?;
        let mut child = Command::new(bench)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start `{name}`"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        let out = BufReader::new(child.stdout.take().context("child stdout")?).lines();
        Ok(Self {
            child,
            pid,
            out,
            name,
        })
    }

    /// Reads stdout up to the line whose `event` is `event`, within `budget`; other lines
    /// are shown.
    pub async fn next<T: DeserializeOwned>(
        &mut self,
        event: &str,
        budget: Duration,
    ) -> anyhow::Result<T> {
        let read = async {
            while let Some(line) = self.out.next_line().await? {
                #[derive(Deserialize)]
                struct Tag {
                    event: String,
                }
                match serde_json::from_str::<Tag>(&line) {
                    Ok(tag) if tag.event == event => {
                        return serde_json::from_str::<Line<T>>(&line)
                            .map(|l| l.report)
                            .with_context(|| format!("bad `{event}` report: {line}"));
                    }
                    _ => eprintln!("{}: {line}", self.name),
                }
            }
            bail!(
                "{} exited before reporting `{event}` (its errors are above)",
                self.name
            )
        };
        tokio::time::timeout(budget, read)
            .await
            .with_context(|| format!("{} did not report `{event}` within {budget:?}", self.name))?
    }

    /// Writes one line to its stdin.
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let stdin = self.child.stdin.as_mut().context("stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("{} is gone", self.name))
    }

    /// Lets the process go (stdin closed) and returns its `done` report, if it gave one
    /// within 10 s.
    pub async fn finish<T: DeserializeOwned>(mut self) -> Option<T> {
        drop(self.child.stdin.take());
        let done = self.next("done", Duration::from_secs(10)).await.ok();
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        done
    }
}

impl Args {
    /// `conns` connections of `transport` to `servers`, with the command line's defaults for
    /// the rest: users `u<i>` without a device or token (set `secret` or `path`), 30 s per
    /// connect, messages not accounted.
    pub fn new(
        transport: Transport,
        servers: Vec<SocketAddr>,
        conns: usize,
        (sources, concurrency): (u8, usize),
        hold_secs: u64,
    ) -> Self {
        Self {
            transport,
            servers,
            conns,
            sources,
            concurrency,
            secret: None,
            path: None,
            user_prefix: "u".into(),
            device: None,
            account: false,
            hold_secs,
            connect_timeout_secs: 30,
        }
    }

    /// Starts `bench hold` with these arguments, as a [`Reporter`]: each field as its flag
    /// (clap's long name is the field's, kebab-cased), repeated for a list, bare for `true`,
    /// left out when unset.
    pub fn spawn(&self) -> anyhow::Result<Reporter> {
        Reporter::spawn("bench hold", &self.argv()?)
    }

    fn argv(&self) -> anyhow::Result<Vec<String>> {
        let mut args: Vec<String> = vec!["hold".into()];
        let Value::Object(fields) = serde_json::to_value(self)? else {
            bail!("hold arguments are not a map");
        };
        for (name, value) in fields {
            let flag = format!("--{}", name.replace('_', "-"));
            let values = match value {
                Value::Null | Value::Bool(false) => continue,
                Value::Bool(true) => {
                    args.push(flag);
                    continue;
                }
                Value::Array(values) => values,
                one => vec![one],
            };
            for v in values {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                args.extend([flag.clone(), text]);
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        hold: Hold,
    }

    #[derive(clap::Subcommand)]
    enum Hold {
        Hold(Args),
    }

    #[test]
    fn the_child_reads_back_the_arguments_it_was_given() {
        let addrs = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let given = Args {
            secret: Some("s".into()),
            device: Some("d".into()),
            account: true,
            ..Args::new(Transport::Sse, addrs, 7, (3, 5), 60)
        };
        let argv = given.argv().expect("argv");
        let Hold::Hold(read) = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("bench".to_owned()).chain(argv.clone()),
        )
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .hold;
        assert_eq!(format!("{read:?}"), format!("{given:?}"));
        let peer = Args {
            path: Some("/sub/u{i}".into()),
            ..Args::new(
                Transport::Ws,
                vec!["127.0.0.1:3".parse().unwrap()],
                1,
                (1, 1),
                1,
            )
        };
        assert!(peer.argv().expect("argv").contains(&"--path".to_owned()));
        assert!(!peer.argv().expect("argv").contains(&"--account".to_owned()));
    }
}
