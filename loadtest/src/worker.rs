//! A worker: a set of clients in one process, run in-process or as a child process.
//!
//! The parent re-executes itself as `loadtest worker --config <json>` because one process
//! may open at most 20,000 files here. Protocol with the parent:
//! - stdout, one JSON object per line: `{"progress":{counts}}` every 250 ms, then
//!   `{"report":{worker report}}` once at the end;
//! - stdin, one word per line: `storm` makes every client reconnect at once; end of input
//!   (the parent is done, or gone) stops the worker, so it never outlives its parent.
//!   A deadline in the config bounds it too.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use push_proto::auth::Authenticator;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{self, Control, Env, Spec};
use crate::conn::Transport;
use crate::stats::{Counts, Stats, WorkerReport};

/// Which transport each client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMix {
    /// All WebSocket.
    Ws,
    /// All SSE.
    Sse,
    /// Even clients WebSocket, odd clients SSE.
    Mixed,
}

impl TransportMix {
    fn for_client(self, index: u64) -> Transport {
        match self {
            Self::Ws => Transport::Ws,
            Self::Sse => Transport::Sse,
            Self::Mixed if index % 2 == 0 => Transport::Ws,
            Self::Mixed => Transport::Sse,
        }
    }
}

/// Everything a worker needs; JSON on the command line of a child worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Global index of this worker's first client.
    pub first_client: u64,
    /// Clients in this worker.
    pub clients: u64,
    /// User IDs are `prefix` + global client index.
    pub prefix: String,
    /// Client ports of the nodes; client `k` starts on `targets[k % len]`.
    pub targets: Vec<SocketAddr>,
    /// Transports.
    pub transport: TransportMix,
    /// HS256 secret of the nodes.
    pub secret: String,
    /// Client `k` binds 127.0.0.(2 + k % sources).
    pub sources: u8,
    /// First connects in flight at once.
    pub concurrency: usize,
    /// Ack each message (WebSocket).
    pub ack: bool,
    /// Clients drop their connection after about this long, ms (`--client-lifetime`).
    pub client_lifetime_ms: Option<u64>,
    /// Per-attempt bound of connect + request + hello, ms.
    pub connect_timeout_ms: u64,
    /// First connects give up after this long, ms.
    pub ramp_ms: u64,
    /// The worker stops by itself after this long, ms, whatever the parent does.
    pub max_run_ms: u64,
}

pub use crate::client::DEVICE;

/// A running worker in this process.
#[derive(Debug)]
pub struct LocalWorker {
    stats: Arc<Stats>,
    control: watch::Sender<Control>,
    clients: JoinSet<()>,
}

impl LocalWorker {
    /// Starts every client (first connects bounded by `concurrency`; each connect mints its token).
    pub fn start(cfg: &WorkerConfig) -> Self {
        let stats = Arc::new(Stats::default());
        stats.count(|c| c.clients = cfg.clients);
        let env = Arc::new(Env {
            targets: cfg.targets.clone(),
            stats: stats.clone(),
            ramp_permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            ramp_deadline: Instant::now() + Duration::from_millis(cfg.ramp_ms),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            ack: cfg.ack,
            client_lifetime: cfg.client_lifetime_ms.map(Duration::from_millis),
            auth: Authenticator::new(cfg.secret.as_bytes(), false),
            prefix: cfg.prefix.clone(),
            // Tokens outlive the run by far: expiry is not what this measures.
            token_ttl: Duration::from_millis(cfg.max_run_ms) + Duration::from_secs(3600),
        });
        let (control, rx) = watch::channel(Control::default());
        let mut clients = JoinSet::new();
        for index in cfg.first_client..cfg.first_client + cfg.clients {
            let spec = Spec {
                index,
                source: IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    2 + (index % u64::from(cfg.sources.max(1))) as u8,
                )),
                transport: cfg.transport.for_client(index),
            };
            clients.spawn(client::run(spec, env.clone(), rx.clone()));
        }
        Self {
            stats,
            control,
            clients,
        }
    }

    /// Counters so far.
    pub fn progress(&self) -> Counts {
        self.stats.counts()
    }

    /// Makes every client reconnect at once.
    pub fn storm(&self) {
        self.control.send_modify(|c| c.storm += 1);
    }

    /// Stops every client (each closes politely, bounded in time) and returns the result.
    pub async fn stop(mut self) -> WorkerReport {
        let report_open = self.stats.counts().open;
        self.control.send_modify(|c| c.stop = true);
        // Clients close within about 2 s; past 5 s something is stuck, so cut it short.
        let all_done = async { while self.clients.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), all_done)
            .await
            .is_err()
        {
            self.clients.abort_all();
        }
        let mut report = self.stats.report();
        // `open` means "connected when the run ended", not after the polite closes.
        report.counts.open = report_open;
        report
    }
}

/// `loadtest worker`: runs a worker in this process and speaks the line protocol above.
pub async fn child_main(config_json: &str) -> anyhow::Result<()> {
    let cfg: WorkerConfig = serde_json::from_str(config_json).context("bad worker config")?;
    let worker = LocalWorker::start(&cfg);
    let mut stdout = tokio::io::stdout();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let deadline = tokio::time::sleep(Duration::from_millis(cfg.max_run_ms));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) if l.trim() == "storm" => worker.storm(),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
            _ = tick.tick() => {
                let line = serde_json::json!({ "progress": worker.progress() }).to_string() + "\n";
                stdout.write_all(line.as_bytes()).await?;
            }
            () = &mut deadline => break,
        }
    }
    let report = worker.stop().await;
    let line = serde_json::json!({ "report": report }).to_string() + "\n";
    stdout.write_all(line.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}
