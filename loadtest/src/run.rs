//! A whole run: workers (in-process or child processes), the pusher, the scenario's event
//! (storm, drain), progress, and the merged [`Report`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::time::Instant;

use crate::pusher::{self, PushConfig, PushCounts, PushStats};
use crate::stats::{decode_histogram, Counts, WorkerReport};
use crate::worker::{LocalWorker, TransportMix, WorkerConfig};

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Hold connections.
    Idle,
    /// Push at a fixed rate and measure end-to-end latency.
    Push,
    /// Short lifetimes: connections rotate (server `--lifetime`) and/or drop (client side).
    Churn,
    /// Every client reconnects at once, mid-run.
    Storm,
    /// A node gets SIGTERM mid-run; its clients must move to the other nodes.
    Drain,
}

/// The environment variable a worker process reads its settings from (JSON, with the secret).
pub const WORKER_CONFIG_ENV: &str = "LOADTEST_WORKER_CONFIG";

/// Settings of a run (validated command line).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Scenario.
    pub scenario: Scenario,
    /// Clients in total.
    pub clients: u64,
    /// Client ports of the nodes.
    pub targets: Vec<SocketAddr>,
    /// Admin ports, same order as `targets`.
    pub admin_targets: Vec<SocketAddr>,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// HS256 secret.
    pub secret: String,
    /// Transports.
    pub transport: TransportMix,
    /// Steady phase length (after the ramp).
    pub duration: Duration,
    /// Most time the first connects may take.
    pub ramp_timeout: Duration,
    /// Time after the pushes for messages in flight to arrive.
    pub settle: Duration,
    /// Pushes per second (0: none).
    pub rate: f64,
    /// Keep-alive admin connections of the pusher.
    pub http_conns: usize,
    /// Users with no client that the pusher also addresses (loss self-check).
    pub ghost_users: u64,
    /// Source addresses per worker.
    pub sources: u8,
    /// First connects in flight per worker.
    pub concurrency: usize,
    /// Ack messages.
    pub ack: bool,
    /// Client-side random drops.
    pub client_lifetime: Option<Duration>,
    /// Per-attempt connect bound.
    pub connect_timeout: Duration,
    /// When in the steady phase the storm or drain happens.
    pub event_at: Duration,
    /// Process to SIGTERM (`drain`).
    pub drain_pid: Option<u32>,
    /// Push through push-lib and Kafka instead of the admin API.
    pub kafka: Option<pusher::KafkaTarget>,
    /// Worker processes (1: in this process).
    pub procs: usize,
    /// User ID prefix.
    pub prefix: String,
    /// Draw a progress bar.
    pub progress: bool,
}

/// A worker in this process or in a child process.
#[derive(Debug)]
// One value per worker process (a handful): the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Worker {
    Local(LocalWorker),
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
        progress: Arc<Mutex<Counts>>,
        report: tokio::sync::oneshot::Receiver<WorkerReport>,
    },
}

impl Worker {
    fn spawn_child(cfg: &WorkerConfig) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        // The settings hold the nodes' secret: through the environment, which only this user
        // can read (/proc/PID/environ), not the command line, which every user can.
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .env(WORKER_CONFIG_ENV, serde_json::to_string(cfg)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take();
        let progress = Arc::new(Mutex::new(Counts::default()));
        let (tx, report) = tokio::sync::oneshot::channel();
        let p = progress.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(c) = v.get("progress") {
                    if let Ok(c) = serde_json::from_value(c.clone()) {
                        *p.lock().unwrap_or_else(|e| e.into_inner()) = c;
                    }
                } else if let Some(r) = v.get("report") {
                    if let (Ok(r), Some(tx)) = (serde_json::from_value(r.clone()), tx.take()) {
                        let _ = tx.send(r);
                    }
                }
            }
        });
        Ok(Self::Child {
            child,
            stdin,
            progress,
            report,
        })
    }

    fn progress(&self) -> Counts {
        match self {
            Self::Local(w) => w.progress(),
            Self::Child { progress, .. } => {
                progress.lock().unwrap_or_else(|e| e.into_inner()).clone()
            }
        }
    }

    async fn storm(&mut self) {
        match self {
            Self::Local(w) => w.storm(),
            Self::Child { stdin: Some(s), .. } => {
                let _ = s.write_all(b"storm\n").await;
            }
            Self::Child { .. } => {}
        }
    }

    async fn stop(self) -> anyhow::Result<WorkerReport> {
        match self {
            Self::Local(w) => Ok(w.stop().await),
            Self::Child {
                mut child,
                stdin,
                report,
                ..
            } => {
                drop(stdin); // end of input: the worker stops
                let r = tokio::time::timeout(Duration::from_secs(15), report).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                match r {
                    Ok(Ok(r)) => Ok(r),
                    _ => bail!("a worker process ended without a report"),
                }
            }
        }
    }
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: Scenario,
    /// Clients asked for.
    pub clients: u64,
    /// Worker processes.
    pub procs: usize,
    /// Seconds the first connects took (until all connected or the ramp timeout).
    pub ramp_secs: f64,
    /// Seconds of the steady phase.
    pub steady_secs: f64,
    /// Connect latency (TCP connect to hello), every connection of the run.
    pub connect_latency: Latency,
    /// End-to-end latency: push scheduled → client received, distinct messages.
    pub message_latency: Latency,
    /// Admin request latency seen by the pusher (first node tried).
    pub push_request_latency: Latency,
    /// Pusher counters.
    pub push: PushCounts,
    /// Messages the pusher tried to send and no client received (includes `not_connected`
    /// and `failed`).
    pub lost: u64,
    /// Highest completed reconnects in one second.
    pub reconnects_per_sec_max: u64,
    /// Completed reconnects per second over the seconds that had any.
    pub reconnects_per_sec_mean: f64,
    /// Merged worker results (counters, errors, violations, histograms).
    pub workers: WorkerReport,
    /// Empty when the run passed; otherwise why it failed.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs the scenario; `Err` only for setup errors (bad targets, workers that will not start).
pub async fn run(cfg: RunConfig) -> anyhow::Result<Report> {
    if cfg.targets.is_empty() || cfg.targets.len() != cfg.admin_targets.len() {
        bail!("--targets and --admin-targets must name the same number of nodes (at least one)");
    }
    if cfg.scenario == Scenario::Drain && (cfg.targets.len() < 2 || cfg.drain_pid.is_none()) {
        bail!("drain needs --drain-pid and at least two --targets (clients move to the others)");
    }
    let procs = cfg.procs.max(1) as u64;
    let max_run = cfg.ramp_timeout + cfg.duration + cfg.settle + Duration::from_secs(30);
    let mut workers = Vec::new();
    let mut first = 0;
    for p in 0..procs {
        // Spread the remainder over the first workers.
        let n = cfg.clients / procs + u64::from(p < cfg.clients % procs);
        let wc = WorkerConfig {
            first_client: first,
            clients: n,
            prefix: cfg.prefix.clone(),
            targets: cfg.targets.clone(),
            transport: cfg.transport,
            secret: cfg.secret.clone(),
            sources: cfg.sources,
            concurrency: cfg.concurrency,
            ack: cfg.ack,
            client_lifetime_ms: cfg.client_lifetime.map(|d| d.as_millis() as u64),
            connect_timeout_ms: cfg.connect_timeout.as_millis() as u64,
            ramp_ms: cfg.ramp_timeout.as_millis() as u64,
            max_run_ms: max_run.as_millis() as u64,
        };
        first += n;
        workers.push(if procs == 1 {
            Worker::Local(LocalWorker::start(&wc))
        } else {
            Worker::spawn_child(&wc)?
        });
    }
    let total = |ws: &[Worker]| {
        ws.iter().fold(Counts::default(), |mut acc, w| {
            let c = w.progress();
            acc.clients_connected += c.clients_connected;
            acc.open += c.open;
            acc.messages_unique += c.messages_unique;
            acc.reconnects += c.reconnects;
            acc.connect_failures += c.connect_failures;
            acc
        })
    };

    let bar = progress_bar(cfg.progress, cfg.duration);
    // Ramp: until every client has its first hello, or the ramp timeout.
    let ramp_start = Instant::now();
    while total(&workers).clients_connected < cfg.clients && ramp_start.elapsed() < cfg.ramp_timeout
    {
        let c = total(&workers);
        bar.set_message(format!(
            "ramp: {}/{} connected, {} failed attempts",
            c.clients_connected, cfg.clients, c.connect_failures
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp_secs = ramp_start.elapsed().as_secs_f64();

    // Steady phase.
    let push_stats = Arc::new(PushStats::default());
    let pusher = tokio::spawn(pusher::run(
        PushConfig {
            admin_targets: cfg.admin_targets.clone(),
            admin_token: cfg.admin_token.clone(),
            rate: cfg.rate,
            conns: cfg.http_conns,
            users: cfg.clients,
            ghost_users: cfg.ghost_users,
            prefix: cfg.prefix.clone(),
            duration: cfg.duration,
            kafka: cfg.kafka.clone(),
        },
        push_stats.clone(),
    ));
    let steady_start = Instant::now();
    let mut event_done = !matches!(cfg.scenario, Scenario::Storm | Scenario::Drain);
    while steady_start.elapsed() < cfg.duration {
        if !event_done && steady_start.elapsed() >= cfg.event_at {
            event_done = true;
            match cfg.scenario {
                Scenario::Storm => {
                    for w in &mut workers {
                        w.storm().await;
                    }
                }
                Scenario::Drain => sigterm(cfg.drain_pid.expect("checked above"))?,
                _ => {}
            }
        }
        let (c, p) = (total(&workers), push_stats.counts());
        bar.set_position(steady_start.elapsed().as_secs().min(cfg.duration.as_secs()));
        bar.set_message(format!(
            "open {} | pushed {} | received {} | reconnects {}",
            c.open, p.attempted, c.messages_unique, c.reconnects
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let steady_secs = steady_start.elapsed().as_secs_f64();
    // The pusher stops scheduling at `duration`; its last requests are bounded in time.
    let _ = tokio::time::timeout(Duration::from_secs(10), pusher).await;
    // Settle: until every delivered (Kafka: queued) message has arrived, or the settle time
    // is over.
    let settle_start = Instant::now();
    let expected = |c: &PushCounts| c.delivered + c.queued;
    while settle_start.elapsed() < cfg.settle
        && total(&workers).messages_unique < expected(&push_stats.counts())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();

    let mut merged = WorkerReport::default();
    for w in workers {
        merged.merge(&w.stop().await?)?;
    }
    let (push, push_hist) = push_stats.snapshot();
    Ok(build_report(
        &cfg,
        ramp_secs,
        steady_secs,
        merged,
        push,
        &push_hist,
    ))
}

fn build_report(
    cfg: &RunConfig,
    ramp_secs: f64,
    steady_secs: f64,
    workers: WorkerReport,
    push: PushCounts,
    push_hist: &hdrhistogram::Histogram<u64>,
) -> Report {
    let c = &workers.counts;
    let lost = push.attempted.saturating_sub(c.messages_unique);
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!(
            "{lost} of {} messages lost ({} to users with no connection, {} failed pushes)",
            push.attempted, push.not_connected, push.failed
        ));
    }
    if c.clients_connected < cfg.clients {
        failures.push(format!(
            "{} of {} clients never connected",
            cfg.clients - c.clients_connected,
            cfg.clients
        ));
    }
    for (kind, n) in &workers.violations {
        failures.push(format!("{n} correctness violation(s): {kind}"));
    }
    let per_sec: Vec<u64> = workers.reconnects_per_sec.values().copied().collect();
    let hist = |s: &str| decode_histogram(s).unwrap_or_else(|_| crate::stats::new_histogram());
    Report {
        scenario: cfg.scenario,
        clients: cfg.clients,
        procs: cfg.procs.max(1),
        ramp_secs: round3(ramp_secs),
        steady_secs: round3(steady_secs),
        connect_latency: Latency::of(&hist(&workers.connect_us)),
        message_latency: Latency::of(&hist(&workers.latency_us)),
        push_request_latency: Latency::of(push_hist),
        push,
        lost,
        reconnects_per_sec_max: per_sec.iter().copied().max().unwrap_or(0),
        reconnects_per_sec_mean: if per_sec.is_empty() {
            0.0
        } else {
            round3(per_sec.iter().sum::<u64>() as f64 / per_sec.len() as f64)
        },
        workers,
        failures,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn sigterm(pid: u32) -> anyhow::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .with_context(|| format!("bad pid {pid}"))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .with_context(|| format!("cannot send SIGTERM to {pid:?}"))
}

fn progress_bar(enabled: bool, duration: Duration) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(duration.as_secs().max(1));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The human table.
pub fn table(r: &Report) -> String {
    let c = &r.workers.counts;
    let l = |x: &Latency| {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
            x.p50_ms, x.p90_ms, x.p99_ms, x.p999_ms, x.max_ms, x.count
        )
    };
    let map = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let rows = [
        ("scenario", format!("{:?} ({} clients, {} procs)", r.scenario, r.clients, r.procs).to_lowercase()),
        ("ramp / steady", format!("{:.2} s / {:.2} s", r.ramp_secs, r.steady_secs)),
        ("clients connected", format!("{} (open at end {})", c.clients_connected, c.open)),
        ("connect attempts", format!("{} ({} failed: {})", c.connect_attempts, c.connect_failures, map(&r.workers.connect_errors))),
        ("connect latency", l(&r.connect_latency)),
        ("pushed", if r.push.queued > 0 && r.push.queued + r.push.failed == r.push.attempted {
            format!("{} (through Kafka: queued {}, failed {})", r.push.attempted, r.push.queued, r.push.failed)
        } else if r.push.queued > 0 {
            format!("{} (through Kafka: queued {}; through the admin API: delivered {}, not connected {}, rerouted {}; failed {})", r.push.attempted, r.push.queued, r.push.delivered, r.push.not_connected, r.push.rerouted, r.push.failed)
        } else {
            format!("{} (delivered {}, not connected {}, failed {}, rerouted {})", r.push.attempted, r.push.delivered, r.push.not_connected, r.push.failed, r.push.rerouted)
        }),
        ("received", format!("{} distinct, {} duplicates, {} foreign, {} acks", c.messages_unique, c.duplicates, c.foreign_messages, c.acks_sent)),
        ("LOST", r.lost.to_string()),
        ("message latency", l(&r.message_latency)),
        ("push request", l(&r.push_request_latency)),
        ("reconnects", format!("{} (rotate asks {}, drain asks {}, storm {}, random drops {}; clients rotated {}), max {}/s, mean {}/s", c.reconnects, c.rotate_requests, c.drain_requests, c.storm_reconnects, c.client_random_closes, c.clients_reconnected, r.reconnects_per_sec_max, r.reconnects_per_sec_mean)),
        ("closes", format!("client-initiated {}, by server {} ({})", c.client_initiated_closes, c.server_closes, map(&r.workers.server_close_codes))),
        ("heartbeats", c.heartbeats.to_string()),
        ("violations", map(&r.workers.violations)),
        ("verdict", if r.passed() { "PASS".to_owned() } else { format!("FAIL: {}", r.failures.join("; ")) }),
    ];
    rows.iter().map(|(k, v)| format!("{k:<18} {v}\n")).collect()
}
