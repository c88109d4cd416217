//! `bench peers-push`: push by user ID at fixed rates, side by side: push-server, Nchan and
//! Pushpin, one after the other in one run.
//!
//! Per system: start it ([`crate::systems`]), subscribe N users (`u0` … `u(N-1)`, one
//! connection each, SSE by default, from this process through loadtest's raw client), then
//! for each rate of a list publish one message per HTTP request over 32 keep-alive
//! connections for a bounded step (10 s), message `m` to user `m % N` at `start + m / rate`,
//! and account for what arrives. The payload is `{"k":<step>,"s":<m>,"t":<scheduled send
//! time, µs since the Unix epoch>}`: stamping the *scheduled* time keeps a publisher that
//! falls behind from hiding latency (coordinated omission). Per step: achieved rate, HDR
//! latency (receive − scheduled send) p50 / p99 / max, losses, the publish requests' own
//! latency, and the CPU each process used.
//!
//! A step is **sustained** when the achieved rate is at least 95 % of the target, nothing
//! was lost (every request answered 2xx and every message arrived, within the settle time)
//! and the latency p99 is under `--p99-bound-ms` (100 ms). The steps stop after the first
//! one a system does not sustain (`--keep-going` runs them all); the highest sustained rate
//! is the system's figure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use loadtest::stats::{new_histogram, unix_micros};
use push_proto::api::{DeliverAnswer, OutcomeKind};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::hold::{self, Tally, Transport};
use crate::receive::{RunStats, Seen as Arrival};
use crate::side::{self, CommonArgs, PeerResult, PeersArg, Plan};
use crate::sys::{self, CpuMeter};
use crate::systems::{self, Peer, Running};
use crate::zmtp;

/// How far behind schedule a publisher lane may fall before the step stops sending: the
/// rest counts as not sent, and the achieved rate shows it.
const MAX_LAG: Duration = Duration::from_secs(2);

/// Longest wait for messages in flight after the last publish of a step.
const SETTLE: Duration = Duration::from_secs(5);

/// Arguments of `bench peers-push`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub peers: PeersArg,
    #[command(flatten)]
    pub steps: Steps,
    /// Keep-alive HTTP connections of the publisher.
    #[arg(long, default_value_t = 32)]
    pub http_conns: usize,
    /// Run every rate even after a step is not sustained.
    #[arg(long)]
    pub keep_going: bool,
    /// Nchan's worker processes (DESIGN.md: 2 for throughput).
    #[arg(long, default_value_t = 2)]
    pub nchan_workers: u32,
    /// Pushpin's `message_rate`; 0 (the default) turns its rate limiter off. With any
    /// positive rate (the package has 2,500), Pushpin 1.36 delivers nothing while
    /// publishes keep arriving less than 25 ms apart (docs/BENCHMARKS.md, "A fair Pushpin").
    #[arg(long, default_value_t = 0)]
    pub pushpin_message_rate: u32,
    /// How to publish to Pushpin: its HTTP API (`POST /publish/`, a new connection per
    /// message: the API closes it after every answer) or its ZeroMQ input (a PUSH
    /// connection per publisher lane, no answer per message).
    #[arg(long, value_enum, default_value_t = PushpinPublish::Http)]
    pub pushpin_publish: PushpinPublish,
    /// Draw p50 and p99 against rate per system into this PNG.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Pin each system to this CPU (`taskset -c`; push-server with one runtime worker, so
    /// pass `--nchan-workers 1` for the same footing) and report its CPU per message: the
    /// per-core measurement. Run `bench` itself on the other core: `taskset -c 1 bench …`.
    #[arg(long)]
    pub server_cpu: Option<usize>,
    /// Publish to push-server in batches of this many messages, one
    /// `POST /internal/v1/deliver` per batch (the message processor's path), instead of one
    /// `POST /v1/push/{user}` each; 0 (the default) publishes one by one. A batch is sent at
    /// the scheduled time of its first message, and its messages carry that time. The other
    /// systems have no such route and are skipped.
    #[arg(long, default_value_t = 0)]
    pub deliver_batch: usize,
}

/// Pushpin's publish inputs (the other systems have HTTP only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushpinPublish {
    /// `POST /publish/` on 127.0.0.1:5561.
    Http,
    /// ZeroMQ PUSH to `push_in_spec`, 127.0.0.1:5560.
    Zmq,
}

/// One publisher lane's connection: HTTP (kept alive where the system allows), or a ZeroMQ
/// PUSH socket (Pushpin only); opened on first use and again after a failure.
#[derive(Debug)]
enum Lane {
    Http(Option<TcpStream>),
    Zmq(Option<zmtp::Push>),
}

impl Lane {
    fn new(running: &Running, pushpin: PushpinPublish) -> Self {
        if running.peer == Peer::Pushpin && pushpin == PushpinPublish::Zmq {
            Self::Zmq(None)
        } else {
            Self::Http(None)
        }
    }

    /// Publishes `items` (`(user, payload)`), one publish each, or all in one
    /// `/internal/v1/deliver` when `batched`; per item, `Ok` or the error counted in the
    /// step's errors (`HTTP <status>`, an item's outcome, or the failure).
    async fn publish_all(
        &mut self,
        running: &Running,
        items: &[(String, String)],
        batched: bool,
    ) -> Vec<Result<(), String>> {
        if !batched {
            let mut out = Vec::with_capacity(items.len());
            for (user, payload) in items {
                out.push(self.publish(running, user, payload).await);
            }
            return out;
        }
        let Self::Http(stream) = self else {
            return vec![Err("batched delivery is push-server's, over HTTP".into()); items.len()];
        };
        let request = running.deliver_request(items);
        match loadtest::pusher::exchange(stream, running.publish, request.as_bytes()).await {
            Ok(r) if (200..300).contains(&r.status) => deliver_outcomes(&r.body, items.len()),
            Ok(r) => vec![Err(format!("HTTP {}", r.status)); items.len()],
            Err(e) => vec![Err(format!("{e:#}")); items.len()],
        }
    }

    /// Publishes `payload` to `user`; the error is the kind counted in the step's errors
    /// (`HTTP <status>` or the failure).
    async fn publish(
        &mut self,
        running: &Running,
        user: &str,
        payload: &str,
    ) -> Result<(), String> {
        match self {
            Self::Http(stream) => {
                let request = running.publish_request(user, payload);
                match loadtest::pusher::exchange(stream, running.publish, request.as_bytes()).await
                {
                    Ok(r) if (200..300).contains(&r.status) => Ok(()),
                    Ok(r) => Err(format!("HTTP {}", r.status)),
                    Err(e) => Err(format!("{e:#}")),
                }
            }
            Self::Zmq(push) => {
                let message = systems::pushpin_zmq_message(user, payload);
                let result = async {
                    if push.is_none() {
                        *push = Some(zmtp::Push::connect(systems::PUSHPIN_ZMQ).await?);
                    }
                    push.as_mut().expect("just set").send(&message).await
                }
                .await;
                result.map_err(|e| {
                    *push = None;
                    format!("{e:#}")
                })
            }
        }
    }
}

/// Per item of a `/internal/v1/deliver` answer: `delivered` and `stored` are accepted (a
/// stored message reaches its user on resume; the bench's users are all connected, so the
/// losses show it), anything else is an error named by its outcome.
fn deliver_outcomes(body: &[u8], items: usize) -> Vec<Result<(), String>> {
    let answer: DeliverAnswer = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return vec![Err(format!("unreadable answer: {e}")); items],
    };
    if answer.results.len() != items {
        return vec![
            Err(format!(
                "{} results for {items} items",
                answer.results.len()
            ));
            items
        ];
    }
    answer
        .results
        .iter()
        .map(|r| match r.outcome {
            OutcomeKind::Delivered | OutcomeKind::Stored => Ok(()),
            other => Err(format!("outcome {other:?}")),
        })
        .collect()
}

/// The steps of the push scenario: `peers-push` and `compare` take the same flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Steps {
    /// Subscribers, one user (channel) each (`compare`: 0 skips the scenario).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Target rates, messages per second, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20,100,1000,5000,10000,20000,30000,40000,50000,60000,80000,100000,120000"
    )]
    pub rates: Vec<u32>,
    /// Length of one step.
    #[arg(long, default_value_t = 10)]
    pub step_secs: u64,
    /// Bound on the latency p99 of a sustained step, ms.
    #[arg(long, default_value_t = 100.0)]
    pub p99_bound_ms: f64,
}

/// One system's push figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Push {
    /// Subscriber transport.
    pub transport: Option<Transport>,
    /// Subscribers asked for.
    pub subscribers: usize,
    /// Subscribers connected.
    pub subscribed: usize,
    /// Subscriptions failed.
    pub subscribe_failed: usize,
    /// Why, error kind → count.
    pub subscribe_errors: BTreeMap<String, u64>,
    /// Subscriptions the system closed during the run.
    pub closed_during_run: usize,
    /// Messages whose payload was not ours, or out of range.
    pub foreign: u64,
    /// What was changed from the system's defaults.
    pub config: String,
    /// Latency bound of a sustained step.
    pub p99_bound_ms: f64,
    /// The figure: the highest target rate sustained.
    pub max_sustained_rate: Option<u32>,
    /// Latency at that rate.
    pub p50_ms_at_max: Option<f64>,
    /// Latency at that rate.
    pub p99_ms_at_max: Option<f64>,
    /// The system's CPU per message at that rate, µs.
    pub server_us_per_msg_at_max: Option<f64>,
    /// Of which in the kernel (system time), µs (absent in older reports).
    pub server_kernel_us_per_msg_at_max: Option<f64>,
    /// Every step run.
    pub steps: Vec<Step>,
}

/// One step at a target rate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    /// Target, messages per second.
    pub rate: u32,
    /// Accepted publishes per second.
    pub achieved: f64,
    /// Publishes sent (accepted + failed).
    pub attempted: u64,
    /// Publishes answered 2xx.
    pub accepted: u64,
    /// Publishes answered otherwise, or failed.
    pub failed: u64,
    /// Not sent: a lane fell more than 2 s behind.
    pub unsent: u64,
    /// Why publishes failed: `HTTP <status>` or the error, with counts.
    pub errors: BTreeMap<String, u64>,
    /// Distinct messages the subscribers received.
    pub received: u64,
    /// Messages received twice.
    pub duplicates: u64,
    /// Attempted but not received.
    pub lost: u64,
    /// Latency, scheduled send → receipt, ms.
    pub p50_ms: f64,
    /// Latency, ms.
    pub p99_ms: f64,
    /// Latency, ms.
    pub p999_ms: f64,
    /// Latency, ms.
    pub max_ms: f64,
    /// The publish requests' own latency, ms.
    pub request_p50_ms: f64,
    /// The publish requests' own latency, ms.
    pub request_p99_ms: f64,
    /// Cores used by label (`others`: the rest of the machine).
    pub cpu_cores: BTreeMap<String, f64>,
    /// The CPU readings' window: sending and the settle after it (absent in older reports).
    pub wall_secs: Option<f64>,
    /// The system's processes' CPU over the window per message received, µs (absent in
    /// older reports). Idle time (heartbeats, timers) counts too, so low rates overstate it.
    pub server_us_per_msg: Option<f64>,
    /// Of which the system's processes spent in the kernel (system time: its system calls and
    /// the loopback TCP work they run), µs (absent in older reports).
    pub server_kernel_us_per_msg: Option<f64>,
    /// ≥ 95 % of the target, nothing lost, p99 within the bound.
    pub sustained: bool,
}

/// Runs the systems one after the other; Ctrl-C or SIGTERM stop it and its children.
pub fn run(args: Args) -> anyhow::Result<()> {
    let bound = args.steps.p99_bound_ms;
    let results = side::print(args.common.json, all(&args), |r| table(r, bound))?;
    if let Some(path) = &args.chart {
        crate::chart::latency_against_rate(path, &results)?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// Every system of `args.peers`, in order: one result each (skipped and failed included).
pub async fn all(args: &Args) -> anyhow::Result<Vec<PeerResult<Push>>> {
    if args.steps.subscribers == 0 || args.steps.rates.is_empty() {
        bail!("--subscribers and --rates must not be empty");
    }
    let c = &args.common;
    eprintln!(
        "peers-push: {} {} subscribers, rates {:?}/s, {} s each",
        args.steps.subscribers,
        c.transport.as_str(),
        args.steps.rates,
        args.steps.step_secs
    );
    let plan = Plan {
        name: "peers-push",
        common: c,
        peers: &args.peers.peers,
        conns_per_process: args.steps.subscribers,
        // Subscriptions, every step with its settle time, start and stop.
        budget: Duration::from_secs(120)
            + (Duration::from_secs(args.steps.step_secs)
                + MAX_LAG
                + SETTLE
                + Duration::from_secs(2))
                * args.steps.rates.len() as u32,
        not_here: if args.deliver_batch > 0 {
            push_server_only
        } else {
            side::every
        },
        line: |r: &Push| {
            format!(
                "highest sustained rate {:?}/s, p99 there {:?} ms",
                r.max_sustained_rate, r.p99_ms_at_max
            )
        },
    };
    side::each_peer(plan, |peer, server_bin| async move {
        let opts = systems::Options {
            nchan_workers: args.nchan_workers,
            pushpin_message_rate: args.pushpin_message_rate,
            cpu: args.server_cpu,
            ..systems::Options::new(server_bin, args.steps.subscribers)
        };
        measure(systems::start(peer, &opts).await?, args).await
    })
    .await
}

/// `--deliver-batch`: the batched route is push-server's.
fn push_server_only(peer: Peer) -> Option<&'static str> {
    (peer != Peer::PushServer).then_some("--deliver-batch: no batched delivery route")
}

/// What the subscribers saw of one step: the pipeline receiver's tally, and one bit per
/// message of the step (seen) in place of its per-user set of message IDs.
#[derive(Debug)]
struct StepSeen {
    stats: RunStats,
    seen: Vec<u64>,
}

impl StepSeen {
    fn new(total: u64) -> Self {
        Self {
            stats: RunStats::new(),
            seen: vec![0; total.div_ceil(64) as usize],
        }
    }
}

/// State shared by the subscribers.
#[derive(Debug, Default)]
struct Seen {
    steps: Mutex<Vec<StepSeen>>,
    /// Messages whose payload was not ours or whose step or sequence was out of range.
    foreign: AtomicU64,
    closed: AtomicUsize,
}

impl Seen {
    fn record(&self, data: &str, now_us: u64) {
        #[derive(Deserialize)]
        struct Payload {
            k: usize,
            s: u64,
            t: u64,
        }
        let Ok(p) = serde_json::from_str::<Payload>(data) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(step) = steps.get_mut(p.k) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (word, bit) = ((p.s / 64) as usize, 1u64 << (p.s % 64));
        let Some(w) = step.seen.get_mut(word) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let seen = if *w & bit != 0 {
            Arrival::Duplicate
        } else {
            Arrival::New
        };
        *w |= bit;
        step.stats.add(seen, Some(p.t), now_us);
    }

    fn received(&self, k: usize) -> u64 {
        self.steps.lock().unwrap_or_else(|e| e.into_inner())[k]
            .stats
            .received
    }
}

/// Subscribes and runs the steps on a started system; stops it at the end.
async fn measure(running: Running, args: &Args) -> anyhow::Result<Push> {
    let peer = running.peer;
    let running = Arc::new(running);
    let seen = Arc::new(Seen::default());
    let subscribed = subscribe(&running, args, &seen).await?;
    eprintln!(
        "{} subscribed in {:.1} s ({} failed)",
        subscribed.ok,
        subscribed.opening.as_secs_f64(),
        subscribed.failed
    );
    if subscribed.ok == 0 {
        bail!("no subscriber connected: {:?}", subscribed.errors);
    }
    // Connections settle (Nchan and Pushpin confirm subscriptions asynchronously).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut steps = Vec::new();
    let mut max_sustained: Option<u32> = None;
    for (k, &rate) in args.steps.rates.iter().enumerate() {
        let step = step(&running, args, &seen, k, rate).await;
        eprintln!("{}: {}", peer.as_str(), step_line(&step));
        let sustained = step.sustained;
        if sustained {
            max_sustained = Some(rate);
        }
        steps.push(step);
        if !sustained && !args.keep_going {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let at_max = steps.iter().find(|s| Some(s.rate) == max_sustained);
    Ok(Push {
        transport: Some(args.common.transport),
        subscribers: args.steps.subscribers,
        subscribed: subscribed.ok,
        subscribe_failed: subscribed.failed,
        subscribe_errors: subscribed.errors.clone(),
        closed_during_run: seen.closed.load(Ordering::Relaxed),
        foreign: seen.foreign.load(Ordering::Relaxed),
        config: match peer {
            Peer::Pushpin => format!(
                "{}; published over {}",
                running.config,
                match args.pushpin_publish {
                    PushpinPublish::Http => "HTTP (POST /publish/, one connection per message)",
                    PushpinPublish::Zmq => "ZeroMQ (PUSH to push_in_spec, one per lane)",
                }
            ),
            _ => running.config.clone(),
        },
        p99_bound_ms: args.steps.p99_bound_ms,
        max_sustained_rate: max_sustained,
        p50_ms_at_max: at_max.map(|s| s.p50_ms),
        p99_ms_at_max: at_max.map(|s| s.p99_ms),
        server_us_per_msg_at_max: at_max.and_then(|s| s.server_us_per_msg),
        server_kernel_us_per_msg_at_max: at_max.and_then(|s| s.server_kernel_us_per_msg),
        steps,
    })
    // Dropping the last handle of `running` stops the system.
}

/// Opens one subscription per user, each driven by its own task until the run ends.
async fn subscribe(running: &Arc<Running>, args: &Args, seen: &Arc<Seen>) -> anyhow::Result<Tally> {
    let c = &args.common;
    let started = std::time::Instant::now();
    let transport = c.transport;
    let heartbeats = Arc::new(AtomicUsize::new(0));
    let (r, seen) = (running.clone(), seen.clone());
    let mut rx = hold::open_many(
        args.steps.subscribers,
        c.sources,
        c.concurrency,
        move |i, source| {
            // The task holds the system's handle only while subscribing: dropping the
            // last handle is what stops the system.
            let running = r.clone();
            async move {
                running
                    .subscribe(i, source, transport, Duration::from_secs(10))
                    .await
            }
        },
        move |_, conn| {
            let (seen, heartbeats) = (seen.clone(), heartbeats.clone());
            async move {
                hold::drive(conn, &heartbeats, |_, _, data| {
                    seen.record(data, unix_micros())
                })
                .await;
                seen.closed.fetch_add(1, Ordering::Relaxed);
            }
        },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    Tally::collect(&mut rx, args.steps.subscribers, started, deadline)
        .await
        .context("subscriptions did not finish within 60 s")
}

/// What one publisher lane did.
#[derive(Debug, Default)]
struct LaneCounts {
    accepted: u64,
    failed: u64,
    unsent: u64,
    request_us: Vec<u64>,
    /// Why requests failed: `HTTP <status>` or the error, with counts.
    errors: std::collections::BTreeMap<String, u64>,
}

/// One step at `rate`: publish for `step_secs`, settle, account.
async fn step(running: &Arc<Running>, args: &Args, seen: &Arc<Seen>, k: usize, rate: u32) -> Step {
    let duration = Duration::from_secs(args.steps.step_secs);
    let total = u64::from(rate) * args.steps.step_secs;
    seen.steps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(StepSeen::new(total));
    let mut procs = running.procs.clone();
    procs.push(("bench".into(), std::process::id()));
    let meter = CpuMeter::start(&procs);
    let start = Instant::now();
    let start_unix = unix_micros();
    let lanes = args.http_conns.max(1) as u64;
    // Messages go out in batches of consecutive sequence numbers (one message each unless
    // `--deliver-batch`); lane `l` sends batches `l`, `l + lanes`, …
    let batched = args.deliver_batch > 0;
    let batch = args.deliver_batch.max(1) as u64;
    let batches = total.div_ceil(batch);
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes.min(batches) {
        let running = running.clone();
        let users = args.steps.subscribers as u64;
        let pushpin = args.pushpin_publish;
        tasks.spawn(async move {
            let mut counts = LaneCounts::default();
            let mut lane_conn = Lane::new(&running, pushpin);
            let mut j = lane;
            while j < batches {
                let first = j * batch;
                let offset = Duration::from_secs_f64(first as f64 / f64::from(rate));
                if Instant::now() > start + duration + MAX_LAG {
                    counts.unsent = (batches - j).div_ceil(lanes) * batch;
                    break;
                }
                tokio::time::sleep_until(start + offset).await;
                let stamp = start_unix + offset.as_micros() as u64;
                let items: Vec<(String, String)> = (first..(first + batch).min(total))
                    .map(|m| {
                        let user = format!("u{}", m % users);
                        (user, format!(r#"{{"k":{k},"s":{m},"t":{stamp}}}"#))
                    })
                    .collect();
                let sent = Instant::now();
                for result in lane_conn.publish_all(&running, &items, batched).await {
                    match result {
                        Ok(()) => counts.accepted += 1,
                        Err(e) => {
                            counts.failed += 1;
                            *counts.errors.entry(e).or_default() += 1;
                        }
                    }
                }
                counts.request_us.push(sent.elapsed().as_micros() as u64);
                j += lanes;
            }
            counts
        });
    }
    let mut all = LaneCounts::default();
    let mut request_us = new_histogram();
    while let Some(r) = tasks.join_next().await {
        if let Ok(c) = r {
            all.accepted += c.accepted;
            all.failed += c.failed;
            all.unsent += c.unsent;
            for (e, n) in c.errors {
                *all.errors.entry(e).or_default() += n;
            }
            for us in c.request_us {
                request_us.saturating_record(us.max(1));
            }
        }
    }
    let send_secs = start.elapsed().as_secs_f64().max(duration.as_secs_f64());
    let attempted = all.accepted + all.failed;
    let settle_until = Instant::now() + SETTLE;
    while seen.received(k) < attempted && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cpu, kernel) = meter.stop_split();
    let wall_secs = start.elapsed().as_secs_f64();
    let s = {
        let steps = seen.steps.lock().unwrap_or_else(|e| e.into_inner());
        let s = &steps[k].stats;
        (s.latency_us.clone(), s.received, s.duplicates)
    };
    let (latency, received, duplicates) = s;
    let achieved = all.accepted as f64 / send_secs;
    let lost = attempted.saturating_sub(received);
    let ms = |us: u64| sys::round2(us as f64 / 1000.0);
    let p99_ms = latency.value_at_quantile(0.99) as f64 / 1000.0;
    let sustained = received > 0
        && achieved >= 0.95 * f64::from(rate)
        && lost == 0
        && all.failed == 0
        && p99_ms <= args.steps.p99_bound_ms;
    // Summed by label: Nchan's workers share one. The system's own processes (not `bench`,
    // not `others`) make its CPU per message received.
    let mut cpu_cores = BTreeMap::<String, f64>::new();
    let mut server_cores = 0.0;
    for (label, cores) in cpu {
        if running.procs.iter().any(|(l, _)| *l == label) {
            server_cores += cores;
        }
        *cpu_cores.entry(label).or_default() += cores;
    }
    let server_kernel_cores: f64 = kernel
        .iter()
        .filter(|(label, _)| running.procs.iter().any(|(l, _)| l == label))
        .map(|(_, cores)| cores)
        .sum();
    let per_msg = |cores: f64| {
        (received > 0 && !running.procs.is_empty())
            .then(|| sys::round2(cores * wall_secs * 1e6 / received as f64))
    };
    let server_us_per_msg = per_msg(server_cores);
    let server_kernel_us_per_msg = per_msg(server_kernel_cores);
    cpu_cores.values_mut().for_each(|c| *c = sys::round2(*c));
    Step {
        rate,
        achieved: achieved.round(),
        attempted,
        accepted: all.accepted,
        failed: all.failed,
        unsent: all.unsent,
        errors: all.errors,
        received,
        duplicates,
        lost,
        p50_ms: ms(latency.value_at_quantile(0.5)),
        p99_ms: ms(latency.value_at_quantile(0.99)),
        p999_ms: ms(latency.value_at_quantile(0.999)),
        max_ms: ms(latency.max()),
        request_p50_ms: ms(request_us.value_at_quantile(0.5)),
        request_p99_ms: ms(request_us.value_at_quantile(0.99)),
        cpu_cores,
        wall_secs: Some(sys::round2(wall_secs)),
        server_us_per_msg,
        server_kernel_us_per_msg,
        sustained,
    }
}

fn step_line(s: &Step) -> String {
    format!(
        "{:>6}/s: achieved {:>7}/s, lost {} (failed {} {}, unsent {}), latency p50 {} p99 {} max {} ms, request p99 {} ms, cpu {:?}, server {} µs/msg (kernel {}) -> {}",
        s.rate,
        s.achieved,
        s.lost,
        s.failed,
        if s.failed == 0 { String::new() } else { format!("{:?}", s.errors) },
        s.unsent,
        s.p50_ms,
        s.p99_ms,
        s.max_ms,
        s.request_p99_ms,
        s.cpu_cores,
        s.server_us_per_msg.map_or("-".into(), |x| x.to_string()),
        s.server_kernel_us_per_msg.map_or("-".into(), |x| x.to_string()),
        if s.sustained { "sustained" } else { "NOT sustained" }
    )
}

/// The human table: each system's highest sustained rate and latency there, and the ratios
/// of push-server against each peer.
pub fn table(results: &[PeerResult<Push>], bound_ms: f64) -> String {
    let opt = |x: Option<f64>| x.map_or("-".into(), |x| x.to_string());
    let mut out = format!(
        "system        max sustained/s   p50 ms   p99 ms   server µs/msg   of which kernel   (sustained: ≥95 % of target, 0 lost, p99 ≤ {bound_ms} ms)\n"
    ) + &side::rows(results, |r| {
        format!(
            " {:>15}   {:>6}   {:>6}   {:>13}   {:>15}",
            r.max_sustained_rate
                .map_or("none".into(), |n| n.to_string()),
            opt(r.p50_ms_at_max),
            opt(r.p99_ms_at_max),
            opt(r.server_us_per_msg_at_max),
            opt(r.server_kernel_us_per_msg_at_max)
        )
    });
    for (peer, ratio, p99) in ratios(results) {
        let _ = writeln!(
            out,
            "push-server ÷ {peer}: sustained rate ×{}, p99 at {peer}'s highest sustained rate ×{}",
            ratio.map_or("-".into(), |x| format!("{x:.2}")),
            p99.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    out
}

/// Per peer: push-server's max sustained rate over the peer's, and push-server's p99 over
/// the peer's at the peer's highest sustained rate (the same step of both runs).
pub fn ratios(results: &[PeerResult<Push>]) -> Vec<(String, Option<f64>, Option<f64>)> {
    let Some(ours) = side::of(results, "push-server") else {
        return Vec::new();
    };
    let p99_at = |r: &Push, rate: u32| Some(r.steps.iter().find(|s| s.rate == rate)?.p99_ms);
    results
        .iter()
        .filter(|r| r.peer != "push-server")
        .filter_map(|r| Some((r.peer.clone(), r.ran()?)))
        .map(|(peer, r)| {
            let rate = ours
                .max_sustained_rate
                .zip(r.max_sustained_rate)
                .map(|(a, b)| sys::round2(f64::from(a) / f64::from(b)));
            let p99 = r.max_sustained_rate.and_then(|rate| {
                let (a, b) = (p99_at(ours, rate)?, p99_at(r, rate)?);
                (b > 0.0).then(|| sys::round2(a / b))
            });
            (peer, rate, p99)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use serde_json::json;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    /// Tiny scale: 20 subscribers, two 1-second steps. Checks the accounting (every message
    /// published arrives once, in its step), never the latency.
    fn tiny(extra: &[&str]) -> Args {
        let mut argv = vec![
            "peers-push",
            "--subscribers",
            "20",
            "--rates",
            "100,300",
            "--step-secs",
            "1",
            "--sources",
            "2",
            "--keep-going",
        ];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    fn check(r: &Push, rates: usize) {
        assert_eq!(r.subscribed, 20, "{r:?}");
        assert_eq!(r.steps.len(), rates, "{r:?}");
        for s in &r.steps {
            assert_eq!(
                (s.failed, s.unsent, s.lost, s.duplicates),
                (0, 0, 0, 0),
                "{s:?}"
            );
            assert_eq!(s.received, s.attempted, "{s:?}");
        }
        assert_eq!(r.foreign, 0, "{r:?}");
    }

    /// A push-server in this process, and the bench's handle on it (kept together: dropping
    /// the server stops it).
    async fn in_process() -> (push_server::Server, Running) {
        const SECRET: &str = "bench-peers-push-test-secret-0123";
        let server = push_server::Server::start(push_server::Config::local_test(SECRET))
            .await
            .expect("server starts");
        let running =
            Running::attach_push_server(server.client_addr(), server.admin_addr(), SECRET);
        (server, running)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_server_in_process_gets_every_message() {
        let (_server, running) = in_process().await;
        let r = measure(running, &tiny(&[])).await.expect("runs");
        check(&r, 2);
    }

    /// `--deliver-batch`: the same messages in batches of 7 through `/internal/v1/deliver`
    /// (300 is not a multiple of 7: the last batch of a step is short), each arriving once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_delivery_gets_every_message_once() {
        let (_server, running) = in_process().await;
        let r = measure(running, &tiny(&["--deliver-batch", "7"]))
            .await
            .expect("runs");
        check(&r, 2);
        assert!(
            r.steps.iter().all(|s| s.server_us_per_msg.is_none()),
            "an attached server has no process of its own to measure: {r:?}"
        );
    }

    #[test]
    fn deliver_answers_count_per_item() {
        let body = br#"{"results":[{"outcome":"delivered","id":1,"delivered":1},{"outcome":"stored","id":2},{"outcome":"invalid","reason":"bad"}]}"#;
        let r = deliver_outcomes(body, 3);
        assert_eq!(r[..2], [Ok(()), Ok(())]);
        assert_eq!(r[2], Err("outcome Invalid".to_owned()));
        // An answer that does not match the batch fails every item, with the reason.
        let r = deliver_outcomes(body, 4);
        assert_eq!(r, vec![Err("3 results for 4 items".to_owned()); 4]);
        assert!(deliver_outcomes(b"<html>", 2)[0]
            .as_ref()
            .is_err_and(|e| e.starts_with("unreadable answer")));
    }

    #[test]
    fn ratios_compare_rates_and_the_p99_at_the_peers_rate() {
        let ours = json!({"peer": "push-server", "max_sustained_rate": 30000,
            "steps": [{"rate": 10000, "p99_ms": 2.0}, {"rate": 30000, "p99_ms": 5.0}]});
        let nchan = json!({"peer": "nchan", "max_sustained_rate": 10000,
            "steps": [{"rate": 10000, "p99_ms": 4.0}]});
        let pushpin = json!({"peer": "pushpin", "max_sustained_rate": null, "steps": []});
        let skipped = json!({"peer": "other", "skipped": "not installed"});
        let results: Vec<PeerResult<Push>> =
            serde_json::from_value(json!([ours, nchan, pushpin, skipped])).expect("reads");
        assert_eq!(results[3].why(), Some("not installed"));
        let r = ratios(&results);
        assert_eq!(
            r,
            vec![
                ("nchan".to_owned(), Some(3.0), Some(0.5)),
                ("pushpin".to_owned(), None, None)
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nchan_if_installed_gets_every_message() {
        let args = tiny(&["--peers", "nchan", "--nchan-workers", "1"]);
        let bin = std::path::PathBuf::from("/nonexistent");
        if let Some(why) = systems::missing(Peer::Nchan, &bin) {
            eprintln!("skipped: {why}");
            return;
        }
        let opts = systems::Options::new(bin, 20);
        let running = systems::start(Peer::Nchan, &opts).await.expect("starts");
        let r = measure(running, &args).await.expect("runs");
        check(&r, 2);
        // Nchan runs as processes of its own: its CPU per message, and the kernel's part of it.
        for s in &r.steps {
            match (s.server_us_per_msg, s.server_kernel_us_per_msg) {
                (Some(total), Some(kernel)) => assert!(kernel <= total, "{s:?}"),
                _ => panic!("no CPU per message for Nchan's processes: {s:?}"),
            }
        }
    }

    /// Both transports and both publish inputs in one test: one Pushpin runs at a time (its
    /// publish ports and zurl's sockets are fixed). WebSocket checks the backend's
    /// WebSocket-over-HTTP and the `ws-message` format end to end; ZeroMQ the ZMTP handshake
    /// and message framing against Pushpin's own PULL socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pushpin_if_installed_gets_messages_over_sse_and_websocket() {
        let bin = std::path::PathBuf::from("/nonexistent");
        if let Some(why) = systems::missing(Peer::Pushpin, &bin) {
            eprintln!("skipped: {why}");
            return;
        }
        for (transport, publish) in [("sse", "http"), ("ws", "http"), ("sse", "zmq")] {
            eprintln!("{transport}, published over {publish}");
            let args = tiny(&[
                "--peers",
                "pushpin",
                "--transport",
                transport,
                "--pushpin-publish",
                publish,
            ]);
            let opts = systems::Options::new(bin.clone(), 20);
            let running = systems::start(Peer::Pushpin, &opts).await.expect("starts");
            let r = measure(running, &args).await.expect("runs");
            // Not `check`: on a loaded machine (CI, 2026-11-30) Pushpin once delivered nothing
            // to 2 of the 20 subscribers over SSE and HTTP publish (8 of 100 and 30 of 300
            // lost, the rest on time), which is not explained yet (docs/BENCHMARKS.md, "A fair
            // Pushpin"). The bench reports such loss; this test holds the harness to what it
            // does itself: every publish accepted, messages delivered over this transport and
            // input, none twice, none to the wrong subscriber.
            assert_eq!(r.subscribed, 20, "{r:?}");
            assert_eq!(r.steps.len(), 2, "{r:?}");
            for s in &r.steps {
                assert_eq!((s.failed, s.unsent, s.duplicates), (0, 0, 0), "{s:?}");
                assert!(s.received > s.attempted / 2, "{s:?}");
            }
            assert_eq!(r.foreign, 0, "{r:?}");
        }
    }
}
