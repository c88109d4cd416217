//! The systems the side-by-side scenarios run: push-server, Nchan (nginx with
//! libnginx-mod-nchan) and Pushpin (with zurl and a GRIP backend inside the bench), each
//! started on free local ports, with a way to subscribe a user and to publish to one.
//!
//! - push-server: the release binary next to `bench`, `--per-ip-rate 0`, heartbeats every
//!   30 s; subscribers present a token minted for `u{i}`; publish is `POST /v1/push/u{i}`
//!   on the admin port.
//! - Nchan: a generated nginx.conf in a temporary directory, `worker_processes` as asked
//!   (1 for memory, so that the figure is one worker's; 2 for throughput, DESIGN.md), an
//!   `nchan_subscriber` location `/sub/(\w+)` keyed by user and an `nchan_publisher` location
//!   `/pub/(\w+)`.
//! - Pushpin: a backend inside this process answers every subscription with `Grip-Hold:
//!   stream` and `Grip-Channel: <user>`; `pushpin` runs with the package's config with port,
//!   directories, routes, `client_maxconn` and `message_rate` changed, and `zurl` (which the
//!   proxy reaches the backend through) with a copy of `/etc/zurl.conf` that allows
//!   127.0.0.1. Publish is Pushpin's HTTP API, `POST /publish/` on 127.0.0.1:5561.
//!
//! Nothing is installed here: [`missing`] says why a peer cannot run, and the scenarios
//! skip it with that line. Every process started is stopped (SIGTERM, then SIGKILL, with
//! its descendants) when its [`Running`] is dropped, on error too.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use loadtest::conn::{self, Conn, Transport};
use push_proto::auth::Authenticator;
use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::sys::{self, Memory};

/// Secret shared by push-server and its subscribers (32 characters; any value works).
pub const SECRET: &str = "bench-side-by-side-secret-012345";

/// Pushpin's HTTP publish API: `push_in_http_addr` and `push_in_http_port` of the
/// package's pushpin.conf (left as they are: one Pushpin runs at a time).
const PUSHPIN_PUBLISH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5561);

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Our push-server.
    PushServer,
    /// nginx with libnginx-mod-nchan.
    Nchan,
    /// Pushpin, with zurl and a GRIP backend inside the bench.
    Pushpin,
}

impl Peer {
    /// Its name in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PushServer => "push-server",
            Self::Nchan => "nchan",
            Self::Pushpin => "pushpin",
        }
    }
}

/// Why `peer` cannot run here with `transport`, if it cannot.
pub fn missing(peer: Peer, transport: Transport, server_bin: &Path) -> Option<String> {
    match peer {
        Peer::PushServer => (!server_bin.is_file()).then(|| {
            format!(
                "no push-server binary at {} (cargo build --release -p push-server, or --server-bin)",
                server_bin.display()
            )
        }),
        Peer::Nchan => {
            if which("nginx").is_none() {
                Some("nginx is not installed (apt-get install nginx libnginx-mod-nchan)".into())
            } else if nchan_module().is_none() {
                Some("the nchan module is not installed (apt-get install libnginx-mod-nchan)".into())
            } else {
                None
            }
        }
        Peer::Pushpin => {
            if transport == Transport::Ws {
                Some("WebSocket through Pushpin needs WebSocket-over-HTTP in the backend, not written yet; SSE only".into())
            } else if which("pushpin").is_none() || which("zurl").is_none() {
                Some("pushpin or zurl is not installed (apt-get install pushpin zurl)".into())
            } else if !Path::new("/etc/pushpin/pushpin.conf").is_file() {
                Some("no /etc/pushpin/pushpin.conf (apt-get install pushpin)".into())
            } else {
                None
            }
        }
    }
}

/// The push-server binary next to this `bench` binary, unless given.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_owned()),
        None => Ok(std::env::current_exe()
            .context("cannot find the bench binary")?
            .parent()
            .context("bench binary has no directory")?
            .join("push-server")),
    }
}

/// How to start a system.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections the system must accept (sizes push-server's and Pushpin's limits).
    pub max_conns: usize,
    /// Nchan's `worker_processes`.
    pub nchan_workers: u32,
    /// Pushpin handler's `message_rate` (messages per second to subscribers; the package
    /// has 2,500) and `message_hwm`.
    pub pushpin_message_rate: u32,
    /// The push-server binary.
    pub server_bin: PathBuf,
    /// Extra push-server arguments.
    pub server_args: Vec<String>,
}

/// A started system, stopped when dropped.
#[derive(Debug)]
pub struct Running {
    /// Which system.
    pub peer: Peer,
    /// Where subscribers connect.
    pub addr: SocketAddr,
    /// Where publishers post.
    pub publish: SocketAddr,
    /// Its processes, labelled, for memory and CPU readings.
    pub procs: Vec<(String, u32)>,
    /// What was changed from the defaults, for the report.
    pub config: String,
    /// push-server's token minter.
    auth: Option<Authenticator>,
    /// Stopped in this order (Pushpin before zurl).
    trees: Vec<Tree>,
    /// The GRIP backend task (Pushpin).
    backend: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.trees.clear();
        if let Some(b) = self.backend.take() {
            b.abort();
        }
    }
}

impl Running {
    /// A push-server this process did not start (in-process in tests): clients on `addr`,
    /// admin on `admin`, tokens minted with `secret`.
    #[cfg(test)]
    pub fn attach_push_server(addr: SocketAddr, admin: SocketAddr, secret: &str) -> Self {
        Self {
            peer: Peer::PushServer,
            addr,
            publish: admin,
            procs: Vec::new(),
            config: "attached".into(),
            auth: Some(Authenticator::new(secret.as_bytes(), false)),
            trees: Vec::new(),
            backend: None,
            _dir: None,
        }
    }

    /// Subscribes user `u{i}` from `source`: push-server with a token (and waits for the
    /// hello), a peer at `/sub/u{i}`.
    pub async fn subscribe(
        &self,
        i: usize,
        source: IpAddr,
        transport: Transport,
        timeout: Duration,
    ) -> anyhow::Result<Conn> {
        match &self.auth {
            Some(auth) => {
                // Tokens outlive any run; expiry is not what is measured.
                let token = auth.mint(&format!("u{i}"), None, Duration::from_secs(7 * 86_400));
                conn::open(source, self.addr, transport, &token, None, timeout).await
            }
            None => {
                conn::open_raw(source, self.addr, transport, &format!("/sub/u{i}"), timeout).await
            }
        }
    }

    /// The whole HTTP/1.1 request (keep-alive) that publishes `payload` (JSON) to `user`.
    pub fn publish_request(&self, user: &str, payload: &str) -> String {
        let host = self.publish;
        let (path, body) = match self.peer {
            Peer::PushServer => (format!("/v1/push/{user}"), payload.to_owned()),
            Peer::Nchan => (format!("/pub/{user}"), payload.to_owned()),
            Peer::Pushpin => {
                // One item per request, formatted as the SSE event the subscriber reads.
                let content = format!("event: message\ndata: {payload}\n\n");
                let item = serde_json::json!({
                    "channel": user,
                    "formats": {"http-stream": {"content": content}},
                });
                (
                    "/publish/".to_owned(),
                    serde_json::json!({"items": [item]}).to_string(),
                )
            }
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Starts `peer` (check [`missing`] first).
pub async fn start(peer: Peer, opts: &Options) -> anyhow::Result<Running> {
    match peer {
        Peer::PushServer => start_push_server(opts).await,
        Peer::Nchan => start_nchan(opts).await,
        Peer::Pushpin => start_pushpin(opts).await,
    }
}

async fn start_push_server(opts: &Options) -> anyhow::Result<Running> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, sys::free_port()?));
    let admin = loop {
        let port = sys::free_port()?;
        if port != addr.port() {
            break SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        }
    };
    eprintln!(
        "starting {} on {addr} (admin {admin})",
        opts.server_bin.display()
    );
    let mut tree = Tree::spawn(
        "push-server",
        Command::new(&opts.server_bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--auth-secret", SECRET, "--per-ip-rate", "0"])
            .args(["--max-pending-per-ip", "0", "--max-connections-per-ip", "0"])
            .arg("--max-connections")
            .arg((opts.max_conns + 1000).to_string())
            .args(["--heartbeat-interval", "30s"])
            .args(&opts.server_args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = tree.exited() {
            bail!("push-server exited with {status} before it was healthy");
        }
        if let Ok((200, _)) = crate::admin::get(admin, "/healthz").await {
            break;
        }
        if Instant::now() > deadline {
            bail!("push-server did not answer /healthz on {admin} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Running {
        peer: Peer::PushServer,
        addr,
        publish: admin,
        procs: vec![("push-server".into(), tree.pid)],
        config: format!(
            "--per-ip-rate 0 --max-connections {} --heartbeat-interval 30s {}",
            opts.max_conns + 1000,
            opts.server_args.join(" ")
        )
        .trim()
        .to_owned(),
        auth: Some(Authenticator::new(SECRET.as_bytes(), false)),
        trees: vec![tree],
        backend: None,
        _dir: None,
    })
}

async fn start_nchan(opts: &Options) -> anyhow::Result<Running> {
    let (Some(nginx), Some(module)) = (which("nginx"), nchan_module()) else {
        bail!("nginx or the nchan module is missing");
    };
    let dir = TempDir::new("nchan")?;
    let port = sys::free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let d = dir.0.display();
    let workers = opts.nchan_workers.max(1);
    // Each worker may hold up to 19,000 connections (the limit is per process, 20,000).
    // With several workers, `reuseport` gives each its own accept queue, so connections
    // spread evenly and no worker runs into its limit first.
    let reuseport = if workers > 1 { " reuseport" } else { "" };
    let conf = format!(
        r"load_module {module};
daemon off;
master_process on;
worker_processes {workers};
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
        listen 127.0.0.1:{port} backlog=4096{reuseport};
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
        "starting {} -c {} (worker_processes {workers})",
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
    Ok(Running {
        peer: Peer::Nchan,
        addr,
        publish: addr,
        procs,
        config: format!(
            "worker_processes {workers}, worker_connections 19000, worker_rlimit_nofile 19000{}, nchan defaults",
            if workers > 1 { ", listen reuseport" } else { "" }
        ),
        auth: None,
        trees: vec![tree],
        backend: None,
        _dir: Some(dir),
    })
}

async fn start_pushpin(opts: &Options) -> anyhow::Result<Running> {
    let (Some(pushpin), Some(zurl)) = (which("pushpin"), which("zurl")) else {
        bail!("pushpin or zurl is missing");
    };
    let pushpin_conf = std::fs::read_to_string("/etc/pushpin/pushpin.conf")
        .context("cannot read /etc/pushpin/pushpin.conf")?;
    let zurl_conf = std::fs::read_to_string("/etc/zurl.conf").unwrap_or_default();
    if !sys::pids_named("zurl").is_empty() {
        bail!(
            "a zurl is already running (its /var/run/zurl sockets would be shared): stop it first"
        );
    }
    if std::net::TcpListener::bind(PUSHPIN_PUBLISH).is_err() {
        bail!("{PUSHPIN_PUBLISH} (Pushpin's publish port) is taken: is another Pushpin running?");
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
    let zurl_tree = Tree::spawn(
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
    let rate = opts.pushpin_message_rate.max(1);
    let conf = rewrite_ini(
        &pushpin_conf,
        &[
            ("global", "rundir", dir.0.join("run").display().to_string()),
            ("runner", "http_port", port.to_string()),
            ("runner", "logdir", dir.0.join("log").display().to_string()),
            (
                "runner",
                "client_maxconn",
                (opts.max_conns + 1000).to_string(),
            ),
            (
                "proxy",
                "routesfile",
                dir.0.join("routes").display().to_string(),
            ),
            ("handler", "message_rate", rate.to_string()),
            // The queue in front of the rate limit: 10 s of messages at that rate.
            (
                "handler",
                "message_hwm",
                (rate.saturating_mul(10)).to_string(),
            ),
        ],
    );
    let conf_path = dir.0.join("pushpin.conf");
    std::fs::write(&conf_path, conf)?;
    eprintln!(
        "starting {} --config {} (backend {backend}, message_rate {rate})",
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
    let mut running = Running {
        peer: Peer::Pushpin,
        addr,
        publish: PUSHPIN_PUBLISH,
        procs: Vec::new(),
        config: format!(
            "pushpin.conf from the package with port, rundir, logdir, routes, client_maxconn {}, \
             message_rate {rate}, message_hwm {} changed; zurl.conf with deny= emptied",
            opts.max_conns + 1000,
            rate.saturating_mul(10)
        ),
        auth: None,
        trees: Vec::new(),
        backend: Some(backend_task),
        _dir: None,
    };
    if let Err(e) = wait_listening(addr, &mut tree, Duration::from_secs(20)).await {
        let log = std::fs::read_to_string(&out_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        running.trees = vec![tree, zurl_tree];
        bail!("{e:#}; its output ends with:\n{}", tail.join("\n"));
    }
    running.procs.push(("pushpin".to_owned(), tree.pid));
    for (pid, name) in sys::descendants(tree.pid) {
        running.procs.push((name, pid));
    }
    running.procs.push(("zurl".to_owned(), zurl_tree.pid));
    running.trees = vec![tree, zurl_tree];
    running._dir = Some(dir);
    // One probe subscription end to end (client → condure → proxy → zurl → backend).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = conn::open_raw(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            addr,
            Transport::Sse,
            "/sub/probe",
            Duration::from_secs(5),
        )
        .await;
        match probe {
            Ok(conn) => {
                drop(conn);
                break;
            }
            Err(e) if Instant::now() > deadline => {
                bail!("Pushpin's probe subscription failed: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    // The publish API too.
    wait_listening(
        PUSHPIN_PUBLISH,
        &mut running.trees[0],
        Duration::from_secs(10),
    )
    .await?;
    if let Some(status) = running.trees[1].exited() {
        bail!("zurl exited with {status}");
    }
    Ok(running)
}

/// A process started here, stopped with its descendants when dropped: SIGTERM to all, a
/// short wait, then SIGKILL to whatever is left (nginx workers and Pushpin's services do not
/// die with a SIGKILLed parent, so `kill_on_drop` alone would leave them behind).
#[derive(Debug)]
pub struct Tree {
    name: &'static str,
    child: tokio::process::Child,
    /// The process's pid.
    pub pid: u32,
}

impl Tree {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
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

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
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
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
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

/// One system's part of a scenario, bounded by `budget`: its result, or a result that says
/// why it has none (the error, or the budget), so that the other systems still run.
pub async fn bounded(
    peer: Peer,
    budget: std::time::Duration,
    work: impl std::future::Future<Output = anyhow::Result<serde_json::Value>>,
) -> serde_json::Value {
    match tokio::time::timeout(budget, work).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            eprintln!("{}: failed: {e:#}", peer.as_str());
            serde_json::json!({"peer": peer.as_str(), "error": format!("{e:#}")})
        }
        Err(_) => {
            serde_json::json!({"peer": peer.as_str(), "error": format!("did not finish within {budget:?}")})
        }
    }
}

/// The first `name` on `PATH` (or in /usr/sbin, where nginx lives).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port free on every address (condure binds 0.0.0.0) and below the ephemeral range, so
/// that no client socket of an earlier run (in TIME_WAIT on 127.0.0.x) holds it.
pub fn free_port_below_ephemeral() -> anyhow::Result<u16> {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|&p| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok())
        .context("no free port in 20000..32000")
}

/// Waits until something accepts TCP on `addr`.
pub async fn wait_listening(
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
pub fn memories(procs: &[(String, u32)]) -> Vec<(String, u32, Memory)> {
    procs
        .iter()
        .filter_map(|(label, pid)| sys::memory(*pid).ok().map(|m| (label.clone(), *pid, m)))
        .collect()
}

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
pub fn rewrite_ini(text: &str, set: &[(&str, &str, String)]) -> String {
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
