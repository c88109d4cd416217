//! testkit: real `redis-server` processes for integration tests, started on free local ports and
//! killed when dropped.
//!
//! | item | role |
//! |---|---|
//! | [`spawn_announced`] | start a server program and read the address it prints first |
//! | [`free_port`] | a port nobody listens on, found by binding `127.0.0.1:0` |
//! | [`RefusedPort`] | a port held where every connection is refused: a peer that is down |
//! | [`RedisServer`] | one `redis-server` child: start, kill, restart empty, send a command |
//! | [`Monitor`] | a `MONITOR` connection that records every command a server executes |
//! | [`RedisCluster`] | N masters (+ replicas) joined with `redis-cli --cluster create` |
//! | [`resp`] | the few lines of RESP the harness needs, over a blocking `TcpStream` |
//! | [`procs`] | processes from `/proc`: a process's descendants, name and command line |
//! | [`eventually`], [`eventually_some`], [`poll_until`] | poll a condition until it holds, for tests of asynchronous effects |
//! | [`browser::Browser`] | a real headless Chromium driven over DevTools (feature `browser`): open a page, evaluate, screenshot |
//! | [`kafka::MockKafka`] | librdkafka's mock cluster (feature `kafka`): a real Kafka protocol peer on a local port |
//!
//! Everything here panics with a message on failure: it is test support, and a failing harness
//! should stop the test with the reason rather than hand back an error nobody handles.
//!
//! Needs `redis-server` and `redis-cli` on `PATH` (Debian: `apt-get install -y redis-server`).

#[cfg(feature = "browser")]
pub mod browser;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod procs;
pub mod resp;

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use resp::Reply;

/// How long a fresh `redis-server` may take to answer `PING`. Generous: CI machines are shared,
/// and the loop returns as soon as it answers.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// How long [`eventually`] waits. Generous: CI machines are shared and loaded, the loop
/// returns as soon as the condition holds, and a hang still ends the test.
pub const WAIT: Duration = Duration::from_secs(45);

/// Polls `cond` every 20 ms until it holds; panics naming `what` after [`WAIT`].
///
/// Tests of asynchronous effects (a registration, a delivery, a close) assert with this
/// rather than sleep-and-check, so they neither flake on a slow machine nor wait longer
/// than needed on a fast one. A synchronous condition is `|| std::future::ready(…)`.
pub async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        poll_until(WAIT, cond).await,
        "timed out after {WAIT:?} waiting for {what}"
    );
}

/// Polls `check` every 20 ms until it gives a value and returns it; panics naming `what`
/// after [`WAIT`]. For conditions that carry what they found (a stored record, a URL).
pub async fn eventually_some<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passes; returns whether it held
/// (for a test that reports more than [`eventually`]'s message when it does not).
pub async fn poll_until<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `cmd` with its stdout piped and returns the child and the rest of its first stdout
/// line after `prefix`: the address a server announces once it listens (`styx listening on
/// http://127.0.0.1:PORT`), so tests bind port 0 and never guess.
///
/// # Panics
/// If the program does not start, or its first line does not start with `prefix`.
pub fn spawn_announced(cmd: &mut Command, prefix: &str) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{:?} starts: {e}", cmd.get_program()));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut BufReader::new(child.stdout.take().expect("piped stdout")),
        &mut line,
    )
    .expect("stdout reads");
    let rest = line
        .trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("first line {line:?} does not start with {prefix:?}"))
        .to_string();
    (child, rest)
}

/// A local TCP port that was free a moment ago.
///
/// Redis cannot listen on port 0 and report the port it got, so we bind `127.0.0.1:0`, read
/// the port the kernel picked and release it. Another process may take it in between; callers
/// that start a server retry with a new port when the server fails to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A local TCP port where every connection is refused, held for as long as this value lives:
/// the address of a collector, receiver or server that is down.
///
/// A port found by binding `127.0.0.1:0` and released at once (as [`free_port`] does) is free
/// for anyone: the suite runs many test binaries at a time, and another test's server given
/// that port a moment later answers what was meant for nobody. (It happened: a span sent to a
/// "dead" collector was taken by the traces collector of a test running beside it, and both
/// tests failed.) This socket is bound without listening and without `SO_REUSEADDR`, so the
/// kernel refuses connections to it and gives its port to no other socket.
#[derive(Debug)]
pub struct RefusedPort {
    _socket: socket2::Socket,
    /// `127.0.0.1:port`.
    pub addr: std::net::SocketAddr,
}

impl RefusedPort {
    /// Holds a port of the kernel's choosing on 127.0.0.1.
    #[expect(clippy::new_without_default, reason = "each call takes a port")]
    pub fn new() -> Self {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .expect("local_addr")
            .as_socket()
            .expect("an IP address");
        RefusedPort {
            _socket: socket,
            addr,
        }
    }

    /// The port held.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A free port whose cluster bus port (port + 10000) is free too, as Redis Cluster needs both.
fn free_cluster_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair (p, p+10000) found in 100 tries");
}

/// A private scratch directory removed on drop (`redis-server --dir`, cluster `nodes.conf`).
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "testkit-redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `redis-server` child process on `127.0.0.1:<port>`, without persistence, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    extra_args: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a plain server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server on a free port with extra `redis-server` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_inner(extra_args, free_port)
    }

    fn start_inner(extra_args: &[&str], pick_port: fn() -> u16) -> Self {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let mut last_error = String::new();
        // The port may be taken between free_port() and redis binding it: retry a few times.
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: pick_port(),
                extra_args: extra_args.clone(),
                dir: TempDir::new(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// Spawns the process on `self.port` and waits until it answers `PING`.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| {
            format!("spawn redis-server: {e} (install it: apt-get install -y redis-server)")
        })?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited: {status}",
                    self.port
                ));
            }
            if let Ok(Reply::Simple(s)) = self.try_command(&["PING"]) {
                if s == "PONG" {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} never answered PING",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// Whether the process is running (not killed by [`RedisServer::kill`]).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process (SIGKILL, as a crash would) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same arguments and no data: it was
    /// started without persistence, so this is a node that lost everything.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_DEADLINE;
        // The old socket can linger briefly; retry until the port binds again.
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends one command and returns the reply, or the I/O error.
    pub fn try_command(&self, args: &[&str]) -> std::io::Result<Reply> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(&resp::encode(args))?;
        resp::read_reply(&mut BufReader::new(stream))
    }

    /// Sends one command; panics if the server cannot be reached.
    pub fn command(&self, args: &[&str]) -> Reply {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("{:?} to {}: {e}", args, self.addr()))
    }

    /// Starts recording every command this server executes (see [`Monitor`]).
    pub fn monitor(&self) -> Monitor {
        Monitor::start(self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `MONITOR` connection: a background thread appends every line the server streams.
///
/// Lines look like `1700000000.123456 [0 127.0.0.1:5555] "HSET" "key" "f" "v"`; commands run
/// inside a script show `[0 lua]` in place of the client address.
#[derive(Debug)]
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    stream: TcpStream,
}

impl Monitor {
    fn start(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect for MONITOR");
        let mut writer = stream.try_clone().expect("clone stream");
        writer
            .write_all(&resp::encode(&["MONITOR"]))
            .expect("send MONITOR");
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        // The first reply is +OK; after it, every command is streamed as a simple string.
        match resp::read_reply(&mut reader) {
            Ok(Reply::Simple(ok)) if ok == "OK" => {}
            other => panic!("MONITOR answered {other:?}"),
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            while let Ok(Reply::Simple(line)) = resp::read_reply(&mut reader) {
                sink.lock().expect("monitor lock").push(line);
            }
        });
        Monitor { lines, stream }
    }

    /// The lines recorded so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("monitor lock").clone()
    }

    /// Waits until a recorded line contains `needle` (the server streams asynchronously).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Unblocks the reader thread, which then ends.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A Redis Cluster of real servers built with `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node, masters and replicas, in creation order.
    pub nodes: Vec<RedisServer>,
    replicas: usize,
}

impl RedisCluster {
    /// Builds `masters` masters with `replicas` replicas each and waits until the cluster is ok.
    ///
    /// Node timeout is 1 s so a killed master fails over in a few seconds, and the replica
    /// validity factor is 0 so a replica always may take over (a test kills masters abruptly).
    pub fn start(masters: usize, replicas: usize) -> Self {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_inner(&args, free_cluster_port))
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(n.addr());
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = cmd.output().expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, replicas };
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicated(Duration::from_secs(30));
        cluster
    }

    /// Waits until every running master's replicas are online and have acknowledged all of
    /// its writes (replica offset = master offset). Replication is asynchronous: a test that
    /// kills a master to exercise failover, rather than to lose writes, calls this first.
    pub fn wait_replicated(&self, timeout: Duration) {
        if self.replicas == 0 {
            return;
        }
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let Reply::Bulk(Some(info)) = node.command(&["INFO", "replication"]) else {
                    panic!("INFO replication gave no text");
                };
                if !info.contains("role:master") || replicas_caught_up(&info) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replicas of {} not caught up after {timeout:?}:\n{info}",
                    node.addr()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Comma-separated `host:port` of every node, for a `redis-cluster://` URL.
    pub fn addrs(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees on who serves
    /// every slot with a running master.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let all_ok = self.nodes.iter().filter(|n| n.is_running()).all(|n| {
                matches!(n.try_command(&["CLUSTER", "INFO"]),
                         Ok(Reply::Bulk(Some(s))) if s.contains("cluster_state:ok"))
            });
            if all_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Index in [`RedisCluster::nodes`] of the running master that serves `key`'s slot, as a
    /// running node sees it, if one does.
    pub fn master_for_key(&self, key: &str) -> Option<usize> {
        let probe = self.nodes.iter().find(|n| n.is_running())?;
        let slot = match probe.command(&["CLUSTER", "KEYSLOT", key]) {
            Reply::Int(s) => s,
            other => panic!("CLUSTER KEYSLOT answered {other:?}"),
        };
        let Reply::Bulk(Some(table)) = probe.command(&["CLUSTER", "NODES"]) else {
            return None;
        };
        for line in table.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut ends = range.splitn(2, '-').map(|p| p.parse::<i64>().unwrap_or(-1));
                let lo = ends.next().unwrap_or(-1);
                let hi = ends.next().unwrap_or(lo);
                (lo..=hi).contains(&slot)
            });
            if serves {
                let port: u16 = fields[1].split([':', '@']).nth(1)?.parse().ok()?;
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port() == port && n.is_running());
            }
        }
        None
    }

    /// Kills the master serving `key` and waits (bounded) until a replica has taken over its
    /// slots and the cluster is ok again. Returns the killed node's index.
    pub fn fail_master_for_key(&mut self, key: &str, timeout: Duration) -> usize {
        let victim = self.master_for_key(key).expect("a master serves the key");
        self.wait_replicated(timeout);
        self.nodes[victim].kill();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(new_master) = self.master_for_key(key) {
                if new_master != victim {
                    self.wait_ok(deadline.saturating_duration_since(Instant::now()));
                    return victim;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over {key}'s slot within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether an `INFO replication` text of a master shows all its replicas online at its offset.
fn replicas_caught_up(info: &str) -> bool {
    let field = |line: &str, name: &str| -> Option<String> {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name).map(str::to_string))
    };
    let mut master_offset = None;
    let mut expected = 0;
    let mut replicas = Vec::new();
    for line in info.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("master_repl_offset:") {
            master_offset = v.parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("connected_slaves:") {
            expected = v.parse::<usize>().unwrap_or(0);
        } else if line.starts_with("slave") && line.contains(":ip=") {
            let state = field(line, "state=").unwrap_or_default();
            let offset = field(line, "offset=").and_then(|o| o.parse::<u64>().ok());
            replicas.push((state, offset));
        }
    }
    expected > 0
        && replicas.len() == expected
        && replicas
            .iter()
            .all(|(state, offset)| state == "online" && *offset == master_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_port_refuses_connections_and_is_taken_by_no_one_while_held() {
        let held = RefusedPort::new();
        let err = TcpStream::connect(held.addr).expect_err("nobody answers");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // A server (std sets SO_REUSEADDR, as tokio does) cannot take the port meanwhile.
        assert!(TcpListener::bind(held.addr).is_err());
        let port = held.port();
        drop(held);
        TcpListener::bind(("127.0.0.1", port)).expect("free once released");
    }
}
