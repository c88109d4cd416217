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
//! - Pushpin: a backend inside this process speaks GRIP: an SSE subscription (`GET
//!   /sub/<user>`) gets `Grip-Hold: stream` and `Grip-Channel: <user>`; a WebSocket one
//!   arrives as WebSocket-over-HTTP (the route's `over_http`: `POST` of `OPEN`, `TEXT`,
//!   `CLOSE` events) and its `OPEN` is answered with `OPEN` and the control message
//!   `c:{"type":"subscribe","channel":"<user>"}`. `pushpin` runs with the package's config
//!   with port, directories, routes, `client_maxconn` and `message_rate` changed, and `zurl`
//!   (which the proxy reaches the backend through) with a copy of `/etc/zurl.conf` that
//!   allows 127.0.0.1. Publish is Pushpin's HTTP API, `POST /publish/` on 127.0.0.1:5561,
//!   one item with both formats (`http-stream`, `ws-message`); the API closes the
//!   connection after every answer.
//! - Pushpin's `message_rate` is 0 (its handler's rate limiter off) unless asked: with any
//!   positive rate, Pushpin 1.36's limiter holds every delivery for as long as publishes
//!   keep arriving less than 25 ms apart (docs/BENCHMARKS.md, "A fair Pushpin").
//!
//! Nothing is installed here: [`missing`] says why a peer cannot run, and the scenarios
//! skip it with that line. Every process started is stopped (SIGTERM, then SIGKILL, with
//! its descendants) when its [`Running`] is dropped, on error too.
//!
//! [`start`] with [`Peer::PushServer`] is the one push-server launcher of the bench: the
//! idle-memory, side-by-side and pipeline scenarios all start their nodes through it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use loadtest::conn::{self, Conn, Transport};
use push_proto::auth::Authenticator;
use push_proto::http::parse_request_head;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::hold;
use crate::side::CommonArgs;
use crate::sys::{self, which, Tree};

/// Secret shared by push-server and its clients (32 characters; any value works).
pub const SECRET: &str = "bench-side-by-side-secret-012345";

/// The heartbeat push-server runs with: on, at the production default, so that an idle
/// connection pays for whatever heartbeats cost.
const HEARTBEAT: &str = "30s";

/// How long push-server has to answer `/healthz` after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Pushpin's HTTP publish API: `push_in_http_addr` and `push_in_http_port` of the
/// package's pushpin.conf (left as they are: one Pushpin runs at a time).
const PUSHPIN_PUBLISH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5561);

/// Pushpin's ZeroMQ publish input, a PULL socket: `push_in_spec` of the package's
/// pushpin.conf (left as it is, like the HTTP port).
pub const PUSHPIN_ZMQ: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5560);

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

/// Why `peer` cannot run here, if it cannot (every system runs both transports).
pub fn missing(peer: Peer, server_bin: &Path) -> Option<String> {
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
            if which("pushpin").is_none() || which("zurl").is_none() {
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
        None => Ok(sys::bin_dir(None)?.join("push-server")),
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
    /// has 2,500) and `message_hwm` (10 s of it). 0 turns the rate limiter off: Pushpin
    /// 1.36's limiter restarts its 25 ms batch timer on every publish (Qt's
    /// `QTimer::setInterval` restarts an active timer), so with any positive rate nothing is
    /// delivered while publishes keep arriving less than 25 ms apart (docs/BENCHMARKS.md).
    pub pushpin_message_rate: u32,
    /// The push-server binary.
    pub server_bin: PathBuf,
    /// Extra push-server arguments.
    pub server_args: Vec<String>,
    /// Pin every process of the system to this CPU (`taskset -c`), and run push-server with
    /// one runtime worker (`TOKIO_WORKER_THREADS=1`): the per-core measurement of issue 16.
    pub cpu: Option<usize>,
}

impl Options {
    /// `max_conns` on `server_bin`, with one Nchan worker (so that a memory figure is one
    /// process's), Pushpin's rate limiter off (see `pushpin_message_rate`) and no extra
    /// arguments.
    pub fn new(server_bin: PathBuf, max_conns: usize) -> Self {
        Self {
            max_conns,
            nchan_workers: 1,
            pushpin_message_rate: 0,
            server_bin,
            server_args: Vec::new(),
            cpu: None,
        }
    }

    /// The command that runs `program`: under `taskset -c CPU` when pinned. `taskset` execs
    /// the program, so the pid stays the program's, and every process and thread it starts
    /// (nginx's workers, Pushpin's services) inherits the mask.
    fn command(&self, program: &Path) -> Command {
        match self.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// What pinning adds to a system's `config` line.
    fn pinned(&self) -> String {
        self.cpu.map_or_else(String::new, |cpu| {
            format!("; pinned to CPU {cpu} (taskset)")
        })
    }
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
    _dir: Option<tempfile::TempDir>,
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

    /// `bench hold` arguments for `conns` connections to this system: with tokens for
    /// push-server, at `/sub/<prefix>u<i>` for a peer (a prefix per hold process keeps their
    /// channels apart).
    pub fn holder(
        &self,
        conns: usize,
        c: &CommonArgs,
        concurrency: usize,
        hold_secs: u64,
        prefix: &str,
    ) -> hold::Args {
        let ours = self.auth.is_some();
        hold::Args {
            secret: ours.then(|| SECRET.into()),
            path: (!ours).then(|| format!("/sub/{prefix}u{{i}}")),
            ..hold::Args::new(
                c.transport,
                vec![self.addr],
                conns,
                (c.sources, concurrency),
                hold_secs,
            )
        }
    }

    /// push-server's batched delivery: one `POST /internal/v1/deliver` with an item per
    /// `(user, payload)`, each payload a JSON value (the node has no internal secret or admin
    /// token here, so the route is open, as on a node behind a private network).
    pub fn deliver_request(&self, items: &[(String, String)]) -> String {
        let mut body = String::with_capacity(items.len() * 64 + 2);
        body.push('[');
        for (i, (user, payload)) in items.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let user = serde_json::Value::from(user.as_str());
            let _ = write!(body, r#"{{"user":{user},"data":{payload}}}"#);
        }
        body.push(']');
        format!(
            "POST /internal/v1/deliver HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.publish,
            body.len()
        )
    }

    /// The whole HTTP/1.1 request (keep-alive) that publishes `payload` (JSON) to `user`.
    pub fn publish_request(&self, user: &str, payload: &str) -> String {
        let host = self.publish;
        let (path, body) = match self.peer {
            Peer::PushServer => (format!("/v1/push/{user}"), payload.to_owned()),
            Peer::Nchan => (format!("/pub/{user}"), payload.to_owned()),
            Peer::Pushpin => (
                "/publish/".to_owned(),
                serde_json::json!({"items": [pushpin_item(user, payload)]}).to_string(),
            ),
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// The message that publishes `payload` to `user` through Pushpin's ZeroMQ input: `J` (the
/// input's JSON marker) and the item.
pub fn pushpin_zmq_message(user: &str, payload: &str) -> Vec<u8> {
    let mut m = b"J".to_vec();
    m.extend_from_slice(pushpin_item(user, payload).to_string().as_bytes());
    m
}

/// One Pushpin publish item for `user`'s channel, in both formats: the SSE event an SSE
/// subscriber reads, the bare payload as a WebSocket subscriber's text message.
fn pushpin_item(user: &str, payload: &str) -> serde_json::Value {
    let content = format!("event: message\ndata: {payload}\n\n");
    serde_json::json!({
        "channel": user,
        "formats": {
            "http-stream": {"content": content},
            "ws-message": {"content": payload},
        },
    })
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
    let (addr, admin) = sys::free_addr_pair();
    let max = (opts.max_conns + 1000).to_string();
    eprintln!(
        "starting {} on {addr} (admin {admin})",
        opts.server_bin.display()
    );
    let mut tree = Tree::spawn(
        "push-server",
        opts.command(&opts.server_bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--auth-secret", SECRET, "--per-ip-rate", "0"])
            .args(["--max-pending-per-ip", "0", "--max-connections-per-ip", "0"])
            .args(["--max-connections", &max, "--heartbeat-interval", HEARTBEAT])
            .args(&opts.server_args)
            // Warnings (accept errors, say) still reach the terminal; per-connection logs do not.
            .env("RUST_LOG", "warn")
            .envs(opts.cpu.map(|_| ("TOKIO_WORKER_THREADS", "1")))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    let what = format!("healthy (/healthz on {admin})");
    tree.wait_ready(&what, STARTUP_TIMEOUT, || async move {
        matches!(sys::http_get(admin, "/healthz").await, Ok((200, _)))
    })
    .await?;
    Ok(Running {
        peer: Peer::PushServer,
        addr,
        publish: admin,
        procs: vec![("push-server".into(), tree.pid)],
        config: format!(
            "--per-ip-rate 0 --max-connections {max} --heartbeat-interval {HEARTBEAT} {}",
            opts.server_args.join(" ")
        )
        .trim()
        .to_owned()
            + &opts
                .cpu
                .map_or_else(String::new, |_| "; one runtime worker".to_owned())
            + &opts.pinned(),
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
    let dir = sys::temp_dir("nchan")?;
    let port = sys::free_port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let d = dir.path().display();
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
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    eprintln!(
        "starting {} -c {} (worker_processes {workers})",
        nginx.display(),
        conf_path.display()
    );
    let mut tree = Tree::spawn(
        "nginx",
        opts.command(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    if let Err(e) = tree.wait_listening(addr, Duration::from_secs(10)).await {
        let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
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
        ) + &opts.pinned(),
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
    for port in [PUSHPIN_PUBLISH, PUSHPIN_ZMQ] {
        if std::net::TcpListener::bind(port).is_err() {
            bail!("{port} (Pushpin's publish input) is taken: is another Pushpin running?");
        }
    }
    let dir = sys::temp_dir("pushpin")?;

    // The backend, in this process.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let backend = listener.local_addr()?;
    let backend_task = tokio::spawn(grip_backend(listener));

    // zurl: Pushpin's internal.conf fixes its sockets in /var/run/zurl. The Debian config
    // denies 127.*; this copy allows it, for the backend on 127.0.0.1.
    std::fs::create_dir_all("/var/run/zurl").context("cannot create /var/run/zurl")?;
    let zurl_conf_path = dir.path().join("zurl.conf");
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
        opts.command(&zurl)
            .arg(format!("--config={}", zurl_conf_path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;

    // pushpin: the package's config with our port, run and log directories, and routes.
    let port = sys::free_port_below_ephemeral()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    for sub in ["run", "log"] {
        std::fs::create_dir_all(dir.path().join(sub))?;
    }
    // `over_http`: WebSocket clients reach the backend as WebSocket-over-HTTP (plain HTTP
    // requests are proxied as they are).
    std::fs::write(
        dir.path().join("routes"),
        format!("* {backend},over_http\n"),
    )?;
    let rate = opts.pushpin_message_rate;
    let mut set = vec![
        (
            "global",
            "rundir",
            dir.path().join("run").display().to_string(),
        ),
        ("runner", "http_port", port.to_string()),
        (
            "runner",
            "logdir",
            dir.path().join("log").display().to_string(),
        ),
        (
            "runner",
            "client_maxconn",
            (opts.max_conns + 1000).to_string(),
        ),
        (
            "proxy",
            "routesfile",
            dir.path().join("routes").display().to_string(),
        ),
        ("handler", "message_rate", rate.to_string()),
    ];
    if rate > 0 {
        // The queue in front of the rate limit: 10 s of messages at that rate.
        set.push((
            "handler",
            "message_hwm",
            rate.saturating_mul(10).to_string(),
        ));
    }
    let conf = rewrite_ini(&pushpin_conf, &set);
    let conf_path = dir.path().join("pushpin.conf");
    std::fs::write(&conf_path, conf)?;
    eprintln!(
        "starting {} --config {} (backend {backend}, message_rate {rate}{})",
        pushpin.display(),
        conf_path.display(),
        if rate == 0 { ": rate limiter off" } else { "" }
    );
    // Its services' logs (`-m`: merged) go to a file, shown if it fails to start.
    let out_path = dir.path().join("pushpin.out");
    let out = std::fs::File::create(&out_path)?;
    let mut tree = Tree::spawn(
        "pushpin",
        opts.command(&pushpin)
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
            "pushpin.conf from the package with port, rundir, logdir, routes (over_http), \
             client_maxconn {}, message_rate {rate}{} changed; zurl.conf with deny= emptied",
            opts.max_conns + 1000,
            if rate == 0 {
                " (rate limiter off)".to_owned()
            } else {
                format!(", message_hwm {}", rate.saturating_mul(10))
            }
        ) + &opts.pinned(),
        auth: None,
        trees: Vec::new(),
        backend: Some(backend_task),
        _dir: None,
    };
    if let Err(e) = tree.wait_listening(addr, Duration::from_secs(20)).await {
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
    // One probe subscription per transport end to end (client → condure → proxy → zurl →
    // backend; WebSocket-over-HTTP for the WebSocket one).
    let deadline = Instant::now() + Duration::from_secs(20);
    for transport in [Transport::Sse, Transport::Ws] {
        loop {
            let probe = conn::open_raw(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                addr,
                transport,
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
                    bail!(
                        "Pushpin's {} probe subscription failed: {e:#}",
                        transport.as_str()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
    // The publish inputs too.
    for port in [PUSHPIN_PUBLISH, PUSHPIN_ZMQ] {
        running.trees[0]
            .wait_listening(port, Duration::from_secs(10))
            .await?;
    }
    if let Some(status) = running.trees[1].exited() {
        bail!("zurl exited with {status}");
    }
    Ok(running)
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

/// A GRIP backend: a `GET /sub/<user>` (SSE) gets `200`, `Grip-Hold: stream` and
/// `Grip-Channel: <user>`; a `POST /sub/<user>` is WebSocket-over-HTTP ([`ws_over_http`]).
/// HTTP/1.1 keep-alive (zurl reuses connections).
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

/// Largest request head or WebSocket-over-HTTP body the backend reads: zurl's requests
/// carry the client's headers and a few events of a few dozen bytes.
const BACKEND_MAX_REQUEST: usize = 64 * 1024;

async fn grip_connection(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        let (head, used) = loop {
            if let Some(parsed) = parse_request_head(&buf, BACKEND_MAX_REQUEST)? {
                break parsed;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let length = content_length(&buf[..used])?;
        if length > BACKEND_MAX_REQUEST {
            bail!("request body of {length} bytes (at most {BACKEND_MAX_REQUEST})");
        }
        while buf.len() < used + length {
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf.drain(..used + length).skip(used).collect();
        let user = head.path.rsplit('/').next().unwrap_or("none");
        let response = if head.method == "POST" {
            let events = ws_over_http(&body, user);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/websocket-events\r\n\
                 Sec-WebSocket-Extensions: grip\r\nContent-Length: {}\r\n\r\n{events}",
                events.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nGrip-Hold: stream\r\n\
                 Grip-Channel: {user}\r\nContent-Length: 0\r\n\r\n"
            )
        };
        stream.write_all(response.as_bytes()).await?;
    }
}

/// The `Content-Length` of a request head (0 without one).
fn content_length(head: &[u8]) -> anyhow::Result<usize> {
    let text = String::from_utf8_lossy(head);
    for line in text.lines() {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value
                    .trim()
                    .parse()
                    .with_context(|| format!("bad Content-Length `{}`", value.trim()));
            }
        }
    }
    Ok(0)
}

/// The answer to one WebSocket-over-HTTP request (Pushpin's protocol: events `TYPE\r\n` or
/// `TYPE <hex length>\r\n<content>\r\n`): `OPEN` is accepted and subscribes the
/// connection to `user`'s channel with a GRIP control message (enabled by the response's
/// `Sec-WebSocket-Extensions: grip`); `CLOSE` is answered with `CLOSE`; anything else
/// (client text, pings) needs no answer.
fn ws_over_http(body: &[u8], user: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..eol]);
        let (kind, length) = match line.split_once(' ') {
            Some((kind, hex)) => (kind, usize::from_str_radix(hex, 16).unwrap_or(0)),
            None => (line.as_ref(), 0),
        };
        match kind {
            "OPEN" => {
                let control = format!(r#"c:{{"type":"subscribe","channel":"{user}"}}"#);
                let _ = write!(out, "OPEN\r\nTEXT {:x}\r\n{control}\r\n", control.len());
            }
            "CLOSE" => out.push_str("CLOSE\r\n"),
            _ => {}
        }
        // The content and its `\r\n`, if the event has one.
        let next = eol + 2 + if length > 0 { length + 2 } else { 0 };
        rest = rest.get(next..).unwrap_or_default();
    }
    out
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

    #[test]
    fn websocket_over_http_open_subscribes_and_close_is_answered() {
        let open = ws_over_http(b"OPEN\r\n", "u7");
        let control = r#"c:{"type":"subscribe","channel":"u7"}"#;
        assert_eq!(
            open,
            format!("OPEN\r\nTEXT {:x}\r\n{control}\r\n", control.len())
        );
        assert_eq!(ws_over_http(b"CLOSE 2\r\n\x03\xe8\r\n", "u7"), "CLOSE\r\n");
        assert_eq!(ws_over_http(b"TEXT 5\r\nCLOSE\r\n", "u7"), "");
    }

    #[test]
    fn content_length_is_read_from_the_head() {
        let head = b"POST /sub/u1 HTTP/1.1\r\nHost: x\r\ncontent-length: 6\r\n\r\n";
        assert_eq!(content_length(head).expect("parses"), 6);
        assert_eq!(
            content_length(b"GET / HTTP/1.1\r\n\r\n").expect("parses"),
            0
        );
        assert!(content_length(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
    }
}
