//! `bench pipeline`: messages per second and latency end to end, push-lib → Kafka →
//! msg-processor → push-server → clients, at 1, 2 and 4 processor instances; and the
//! acceptance check that every message sent arrives.
//!
//! Set-up, once:
//! - a Kafka peer: librdkafka's mock cluster inside this process (a real Kafka protocol
//!   server on a local TCP port, so the other processes use it like any broker), or the
//!   broker given with `--brokers` / `KAFKA_BROKERS`;
//! - one `redis-server` (the registry) and two push-server release processes sharing it;
//! - `bench hold --account`, a separate process holding one WebSocket connection per user, users
//!   alternating between the two nodes, from many 127.0.0.x source addresses.
//!
//! Then per processor count M (a fresh topic and consumer group each, so runs do not mix):
//! 1. start M msg-processor release processes and wait until their partition assignments
//!    (read from their JSON logs) cover the topic, so a group rebalance is not measured;
//! 2. warm up (a few messages through every stage, all must arrive);
//! 3. send N messages round robin over the U users, each carrying its send time in µs, from
//!    this process through push-lib (or from `push-send` with `--producer push-send`);
//! 4. poll the receiver until all N arrived or the deadline passed: sent, received,
//!    duplicates, lost, messages per second (first send → last arrival), latency p50/p99
//!    (send → client), and each process's CPU share over the run (`/proc/<pid>/stat`).
//!
//! Exits non-zero if any message was lost. Every child is killed when the run ends, also on
//! error or Ctrl-C (`kill_on_drop`); the receiver also stops when its stdin closes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt};
use loadtest::stats::unix_micros;
use push_lib::{Envelope, KafkaConfig, PushClient};
use serde::{Deserialize, Serialize};
use serde_json::json;
use testkit::kafka::MockKafka;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::hold::{self, Connected, Done, Reporter, Transport, SPARE_FDS};
use crate::receive::Report;
use crate::side;
use crate::sys::{self, round2, CpuMeter};
use crate::systems::{self, Peer, Running, SECRET};

/// The nodes' `--admin-token`, which the processors present on the deliver endpoint.
const ADMIN_TOKEN: &str = "bench-pipeline-admin-token";

/// How long the processors of one run have to be assigned every partition. Joining a group
/// takes a few seconds (librdkafka's join and sync round trips, cooperative rebalances).
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(60);

/// Assignments must stay unchanged this long before the run starts: a processor that joins
/// late triggers another (incremental) rebalance.
const ASSIGN_STABLE: Duration = Duration::from_secs(2);

/// After everything arrived, wait this long for late duplicates before the final count.
const DUPLICATE_GRACE: Duration = Duration::from_millis(500);

/// Arguments of `bench pipeline`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kafka bootstrap servers of a real broker; without it, librdkafka's mock cluster runs
    /// in this process. The broker must allow topic creation.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Connected users (one WebSocket each, alternating between the two nodes).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Messages per run, round robin over the users.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Processor counts to run, in order, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    processors: Vec<usize>,
    /// Partitions of each run's topic (at least the largest processor count, or some
    /// processors idle).
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Who produces: `bench` (push-lib in this process; payload carries the send time in µs)
    /// or `push-send` (the CLI; latency from the millisecond timestamp in the message ID).
    #[arg(long, value_enum, default_value = "bench")]
    producer: Producer,
    /// Messages per second the producer aims at; 0 sends as fast as Kafka accepts.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Messages sent and awaited before each measured run (through every stage once).
    #[arg(long, default_value_t = 1_000)]
    warmup: u64,
    /// Seconds each run may take, from the first send until every message arrived.
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
    /// Client source addresses, 127.0.0.2 onwards (avoids ephemeral-port exhaustion).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    sources: u8,
    /// Extra argument for every msg-processor, repeatable, e.g. `--processor-arg=--batch-size=1000`.
    #[arg(long = "processor-arg", value_name = "ARG", allow_hyphen_values = true)]
    processor_args: Vec<String>,
    /// Extra argument for both push-servers, repeatable.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Directory of the push-server, msg-processor and push-send binaries. Default: the
    /// directory of this `bench` binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Print the result as one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Who sends the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Producer {
    /// push-lib's `PushClient` in this process.
    Bench,
    /// The `push-send` CLI as a child process.
    PushSend,
}

/// Runs the scenario on a current-thread runtime: the mock cluster handle is not `Send`, so
/// it lives in the scenario's own future, and librdkafka does its work on its own threads.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let failed = runtime.block_on(crate::until_signal(scenario(args)))?;
    // Leaving `block_on` dropped the scenario and with it every child (`kill_on_drop`).
    if failed > 0 {
        bail!("{failed} run(s) lost messages (see the table)");
    }
    Ok(())
}

/// The Kafka peer: the mock cluster (kept alive here) or a real broker.
enum Kafka {
    Mock(MockKafka),
    Real(String),
}

impl Kafka {
    fn brokers(&self) -> String {
        match self {
            Kafka::Mock(m) => m.brokers(),
            Kafka::Real(b) => b.clone(),
        }
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        match self {
            Kafka::Mock(m) => m
                .try_create_topic(topic, partitions)
                .with_context(|| format!("mock cluster: cannot create topic {topic}")),
            Kafka::Real(brokers) => {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                use rdkafka::client::DefaultClientContext;
                let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .context("cannot create a Kafka admin client")?;
                let topic_spec = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let results = admin
                    .create_topics(&[topic_spec], &AdminOptions::new())
                    .await
                    .with_context(|| format!("cannot create topic {topic} on {brokers}"))?;
                for r in results {
                    r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

/// One run's outcome.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    processors: usize,
    topic: String,
    sent: u64,
    send_failed: u64,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    lost: u64,
    /// First send → last arrival.
    secs: f64,
    msgs_per_s: f64,
    /// First send → last acknowledgement by Kafka.
    send_secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Average cores used over the run, by process group.
    cpu_cores: BTreeMap<String, f64>,
    /// Processor counters scraped at the end (summed over the instances).
    not_connected: f64,
    dead_lettered: f64,
    conn_seq_regressions: u64,
}

async fn scenario(args: Args) -> anyhow::Result<usize> {
    if args.users == 0 || args.messages == 0 || args.processors.is_empty() {
        bail!("--users, --messages and --processors must not be empty or zero");
    }
    if let Some(&m) = args.processors.iter().find(|&&m| m == 0) {
        bail!("--processors {m}: each count must be at least 1");
    }
    sys::check_files(args.users as u64 + SPARE_FDS, "the receiver's connections")?;
    let bin_dir = sys::bin_dir(args.bin_dir.as_deref())?;
    let bin = |name: &str| -> anyhow::Result<PathBuf> {
        let p = bin_dir.join(name);
        if !p.is_file() {
            bail!(
                "no {name} binary at {} (build it: cargo build --release -p bench -p push-server -p msg-processor -p push-lib)",
                p.display()
            );
        }
        Ok(p)
    };
    let (server_bin, processor_bin) = (bin("push-server")?, bin("msg-processor")?);
    let push_send_bin = match args.producer {
        Producer::PushSend => Some(bin("push-send")?),
        Producer::Bench => None,
    };

    // The Kafka peer.
    let kafka = match &args.brokers {
        Some(b) => Kafka::Real(b.clone()),
        None => {
            Kafka::Mock(MockKafka::try_start().context("cannot start librdkafka's mock cluster")?)
        }
    };
    let brokers = kafka.brokers();
    let kind = if args.brokers.is_some() {
        "broker"
    } else {
        "mock cluster at"
    };
    eprintln!("kafka: {kind} {brokers}");

    // The registry and the two nodes.
    let redis = sys::start_redis().await?;
    let registry = format!("redis://{}", redis.addr());
    let mut nodes: Vec<Running> = Vec::new();
    for name in ["node-a", "node-b"] {
        let mut server_args: Vec<String> = ["--node-id", name, "--registry", &registry]
            .into_iter()
            .chain(["--admin-token", ADMIN_TOKEN])
            .map(str::to_owned)
            .collect();
        server_args.extend(args.server_args.iter().cloned());
        let opts = systems::Options {
            server_args,
            ..systems::Options::new(server_bin.clone(), args.users)
        };
        nodes.push(systems::start(Peer::PushServer, &opts).await?);
    }
    eprintln!(
        "registry {registry}; nodes {} and {}",
        nodes[0].addr, nodes[1].addr
    );

    // The receiver.
    let hold_secs = args.deadline_secs * (args.processors.len() as u64 + 1) * 3 + 300;
    let mut receiver = hold::Args {
        secret: Some(SECRET.into()),
        user_prefix: "user-".into(),
        device: Some("d".into()),
        account: true,
        ..hold::Args::new(
            Transport::Ws,
            nodes.iter().map(|n| n.addr).collect(),
            args.users,
            (args.sources, 256),
            hold_secs,
        )
    }
    .spawn()?;
    let receiver_pid = receiver.pid;
    let connect_budget = Duration::from_secs(60) + Duration::from_millis(10 * args.users as u64);
    let report: Connected = receiver.next("connected", connect_budget).await?;
    if report.failed != 0 || report.ok != args.users as u64 {
        bail!(
            "{} of {} connections failed: {:?}",
            report.failed,
            args.users,
            report.errors
        );
    }
    eprintln!(
        "{} users connected in {:.1} s",
        args.users, report.connect_secs
    );

    let stamp = push_registry::now_ms();
    let mut results = Vec::new();
    let mut run_id: u32 = 0;
    for &m in &args.processors {
        let topic = format!("bench-pipeline-{stamp}-m{m}");
        kafka.create_topic(&topic, args.partitions).await?;
        let client = match args.producer {
            Producer::Bench => Some(
                PushClient::kafka(&KafkaConfig::new(&brokers, &topic))
                    .context("cannot create a Kafka producer")?,
            ),
            Producer::PushSend => None,
        };
        let processors = start_processors(
            &processor_bin,
            m,
            &brokers,
            &topic,
            &registry,
            args.partitions,
            &args.processor_args,
        )
        .await?;

        let send = SendPlan {
            args: &args,
            brokers: &brokers,
            topic: &topic,
            client: client.as_ref(),
            push_send: push_send_bin.as_deref(),
        };

        // Warm-up: every stage has connections and caches before the clock starts.
        if args.warmup > 0 {
            run_id += 1;
            let (sent, _) = send.send(run_id, args.warmup.min(args.messages)).await?;
            let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
            let r = wait_for(&mut receiver, run_id, sent, deadline).await?;
            if r.received != sent {
                bail!(
                    "warm-up with {m} processors: {} of {sent} arrived",
                    r.received
                );
            }
        }

        // The measured run.
        run_id += 1;
        let mut procs: Vec<(String, u32)> = vec![
            ("bench (kafka mock + producer)".into(), std::process::id()),
            ("receiver".into(), receiver_pid),
        ];
        if let Ok(pid) = sys::redis_pid(&redis) {
            procs.push(("redis".into(), pid));
        }
        for (i, n) in nodes.iter().enumerate() {
            procs.push((format!("push-server {i}"), n.procs[0].1));
        }
        for (i, p) in processors.iter().enumerate() {
            if let Some(pid) = p.child.id() {
                procs.push((format!("msg-processor {i}"), pid));
            }
        }
        eprintln!(
            "run: {m} processor(s), {} messages to {} users",
            args.messages, args.users
        );
        let cpu = CpuMeter::start(&procs);
        let first_send_us = unix_micros();
        let (sent, send_secs) = send.send(run_id, args.messages).await?;
        let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
        let mut report = wait_for(&mut receiver, run_id, sent, deadline).await?;
        let shares = cpu.stop();
        tokio::time::sleep(DUPLICATE_GRACE).await;
        if let Ok(r) = ask(&mut receiver, run_id).await {
            report = r;
        }
        let (mut not_connected, mut dead_lettered) = (0.0, 0.0);
        for p in &processors {
            if let Ok((200, body)) = sys::http_get(p.metrics, "/metrics").await {
                not_connected += sys::metric_sum(&body, "msgproc_stored_total");
                dead_lettered += sys::metric_sum(&body, "msgproc_dead_lettered_total");
            }
        }
        drop(processors);
        if let Some(c) = client {
            // Nothing is pending (every send was awaited); flush is a formality.
            let _ = tokio::task::spawn_blocking(move || c.flush(Duration::from_secs(5))).await;
        }

        let received = report.received;
        let last_us = report.last_us.unwrap_or(first_send_us);
        let secs = last_us.saturating_sub(first_send_us) as f64 / 1e6;
        let ms = |us: Option<u64>| us.map_or(f64::NAN, |us| round2(us as f64 / 1000.0));
        let result = RunResult {
            processors: m,
            topic,
            sent,
            send_failed: args.messages - sent,
            received,
            duplicates: report.duplicates,
            out_of_order: report.out_of_order,
            lost: sent.saturating_sub(received),
            secs: round2(secs),
            msgs_per_s: (received as f64 / secs.max(1e-9)).round(),
            send_secs: round2(send_secs),
            p50_ms: ms(report.p50_us),
            p99_ms: ms(report.p99_us),
            max_ms: ms(report.max_us),
            cpu_cores: group_shares(&shares),
            not_connected,
            dead_lettered,
            conn_seq_regressions: report.conn_seq_regressions as u64,
        };
        eprintln!("{}", row(&result));
        results.push(result);
    }

    receiver.finish::<Done>().await;
    drop(nodes);
    drop(redis);

    let failed = results
        .iter()
        .filter(|r| r.lost > 0 || r.send_failed > 0)
        .count();
    let table = format!("{}\n", table(&results, &args));
    let out = Output {
        users: args.users,
        messages: args.messages,
        partitions: args.partitions,
        producer: args.producer,
        kafka: match args.brokers {
            Some(_) => brokers,
            None => "librdkafka mock cluster (in the bench process)".into(),
        },
        processor_args: args.processor_args.clone(),
        machine: sys::machine(),
        runs: results,
    };
    side::emit(args.json, &out, &table)?;
    Ok(failed)
}

/// `bench pipeline --json`: the set-up and every run.
#[derive(Debug, Serialize)]
struct Output {
    users: usize,
    messages: u64,
    partitions: i32,
    producer: Producer,
    kafka: String,
    processor_args: Vec<String>,
    machine: String,
    runs: Vec<RunResult>,
}

/// What the producer of a run needs.
struct SendPlan<'a> {
    args: &'a Args,
    brokers: &'a str,
    topic: &'a str,
    client: Option<&'a PushClient>,
    push_send: Option<&'a Path>,
}

impl SendPlan<'_> {
    /// Sends `count` messages of run `run`, round robin over the users; returns how many
    /// Kafka acknowledged and how long sending took (first send → last acknowledgement).
    async fn send(&self, run: u32, count: u64) -> anyhow::Result<(u64, f64)> {
        let started = Instant::now();
        let users = self.args.users as u64;
        let sent = match (self.client, self.push_send) {
            (Some(client), _) => {
                let mut inflight = FuturesUnordered::new();
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut tally = |r: push_lib::Result<push_lib::Receipt>| match r {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        if failed <= 5 {
                            eprintln!("send failed: {e}");
                        }
                    }
                };
                for n in 0..count {
                    if self.args.rate > 0.0 {
                        let due = started + Duration::from_secs_f64(n as f64 / self.args.rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    // Bounded like push-send's --in-flight: enough to keep librdkafka's
                    // batches full, without holding 100k futures.
                    while inflight.len() >= 10_000 {
                        if let Some(r) = inflight.next().await {
                            tally(r);
                        }
                    }
                    let user = format!("user-{}", n % users);
                    // The send time goes in the payload: the client sees only `data`.
                    let data = json!({ "r": run, "s": n / users, "t": unix_micros() });
                    match client.enqueue(Envelope::new(user, data)).await {
                        Ok(fut) => inflight.push(fut),
                        Err(e) => tally(Err(e)),
                    }
                }
                while let Some(r) = inflight.next().await {
                    tally(r);
                }
                ok
            }
            (None, Some(push_send)) => {
                let mut cmd = Command::new(push_send);
                cmd.args(["--brokers", self.brokers, "--topic", self.topic])
                    .arg("--users")
                    .arg(users.to_string())
                    .arg("--count")
                    .arg(count.to_string())
                    .arg("--rate")
                    .arg(self.args.rate.to_string())
                    .arg("--json")
                    .arg("--data")
                    .arg(format!("{{\"r\":{run},\"n\":{{n}}}}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true);
                let out = tokio::time::timeout(
                    Duration::from_secs(self.args.deadline_secs),
                    cmd.output(),
                )
                .await
                .context("push-send did not finish within the deadline")?
                .context("cannot run push-send")?;
                let line = String::from_utf8_lossy(&out.stdout);
                eprintln!("push-send: {}", line.trim());
                push_send_sent(&line).with_context(|| {
                    format!("push-send ({}) printed no `sent=`: {line}", out.status)
                })?
            }
            (None, None) => bail!("no producer"),
        };
        Ok((sent, started.elapsed().as_secs_f64()))
    }
}

/// `sent=N` from push-send's summary line.
fn push_send_sent(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("sent="))
        .and_then(|v| v.parse().ok())
}

/// Asks the receiver for its report on `run`.
async fn ask(receiver: &mut Reporter, run: u32) -> anyhow::Result<Report> {
    receiver.send(&format!("report {run}")).await?;
    receiver.next("report", Duration::from_secs(10)).await
}

/// Polls until `expected` distinct messages of `run` arrived or `deadline` passes; returns
/// the last report either way.
async fn wait_for(
    receiver: &mut Reporter,
    run: u32,
    expected: u64,
    deadline: Instant,
) -> anyhow::Result<Report> {
    loop {
        let r = ask(receiver, run).await?;
        if r.received >= expected || Instant::now() > deadline {
            if r.received < expected {
                eprintln!(
                    "deadline passed: {} of {expected} messages of run {run} arrived",
                    r.received
                );
            }
            return Ok(r);
        }
        // 50 ms: fine enough that the run's end is not blurred (the end time is the
        // receiver's own last-arrival timestamp anyway), cheap for the receiver.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A msg-processor child.
#[derive(Debug)]
struct Processor {
    child: Child,
    metrics: SocketAddr,
}

/// Partitions each processor holds, from their logs.
type Assignments = Arc<Mutex<Vec<BTreeSet<i32>>>>;

async fn start_processors(
    bin: &Path,
    count: usize,
    brokers: &str,
    topic: &str,
    registry: &str,
    partitions: i32,
    extra: &[String],
) -> anyhow::Result<Vec<Processor>> {
    let assignments: Assignments = Arc::new(Mutex::new(vec![BTreeSet::new(); count]));
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, sys::free_port()));
        let mut child = Command::new(bin)
            .args([
                "--brokers",
                brokers,
                "--topic",
                topic,
                "--registry",
                registry,
            ])
            .arg("--group")
            .arg(format!("{topic}-group"))
            .args(["--admin-token", ADMIN_TOKEN])
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            // JSON logs at info: the bench reads "partitions assigned/revoked" from them.
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            // Its logs (and panics) go to stderr; stdout only names the metrics address.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let logs = child.stderr.take().context("processor stderr")?;
        let assignments = assignments.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(logs).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match parse_log(&line) {
                    LogLine::Assigned(p) => assignments.lock().expect("no panics")[i].extend(p),
                    LogLine::Revoked(p) => {
                        let mut a = assignments.lock().expect("no panics");
                        for p in p {
                            a[i].remove(&p);
                        }
                    }
                    LogLine::Quiet => {}
                    LogLine::Show => eprintln!("msg-processor {i}: {line}"),
                }
            }
        });
        out.push(Processor { child, metrics });
    }

    // Wait until the group has settled: every partition owned, every processor busy (when
    // there are enough partitions), and nothing moved for ASSIGN_STABLE.
    let started = Instant::now();
    let mut last = Vec::new();
    let mut stable_since = Instant::now();
    loop {
        for (i, p) in out.iter_mut().enumerate() {
            if let Some(status) = p.child.try_wait()? {
                bail!("msg-processor {i} exited with {status} (its log is above)");
            }
        }
        let now = assignments.lock().expect("no panics").clone();
        if now != last {
            last = now.clone();
            stable_since = Instant::now();
        }
        let owned: BTreeSet<i32> = now.iter().flatten().copied().collect();
        let busy = now.iter().filter(|a| !a.is_empty()).count();
        let settled = owned.len() == partitions as usize && busy == count.min(partitions as usize);
        if settled && stable_since.elapsed() >= ASSIGN_STABLE {
            eprintln!(
                "{count} processor(s) assigned after {:.1} s: {now:?}",
                started.elapsed().as_secs_f64()
            );
            return Ok(out);
        }
        if started.elapsed() > ASSIGN_TIMEOUT {
            bail!(
                "msg-processors not assigned every partition of {topic} within {ASSIGN_TIMEOUT:?}: {now:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a processor log line means to the bench.
#[derive(Debug, PartialEq, Eq)]
enum LogLine {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
    /// Info and below: not shown.
    Quiet,
    /// A warning or error (or not JSON): shown.
    Show,
}

/// Reads one line of `msg-processor --log-format json` (tracing-subscriber's JSON: `level`,
/// and `fields` with `message` and the Debug form of the partition list).
fn parse_log(line: &str) -> LogLine {
    #[derive(Deserialize)]
    struct Log {
        #[serde(default)]
        level: String,
        #[serde(default)]
        fields: Fields,
    }
    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Fields {
        message: String,
        assigned: String,
        revoked: String,
    }
    let Ok(log) = serde_json::from_str::<Log>(line) else {
        // Its one plain line, `metrics  http://…`, says nothing the bench does not know.
        return if line.starts_with("metrics ") {
            LogLine::Quiet
        } else {
            LogLine::Show
        };
    };
    let list = |text: &str| -> Vec<i32> {
        text.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    };
    let f = &log.fields;
    if f.message.starts_with("partitions assigned") {
        LogLine::Assigned(list(&f.assigned))
    } else if f.message.starts_with("partitions revoked") {
        LogLine::Revoked(list(&f.revoked))
    } else if matches!(log.level.as_str(), "WARN" | "ERROR") {
        LogLine::Show
    } else {
        LogLine::Quiet
    }
}

/// CPU shares summed by process kind ("msg-processor 0" and "msg-processor 1" → one line).
fn group_shares(shares: &[(String, f64)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (label, cores) in shares {
        let kind = label
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end()
            .to_owned();
        *out.entry(kind).or_insert(0.0) += cores;
    }
    out.into_iter().map(|(k, v)| (k, round2(v))).collect()
}

fn row(r: &RunResult) -> String {
    format!(
        "{:>10} {:>8} {:>9} {:>5} {:>5} {:>8.2} {:>8.0} {:>8.1} {:>8.1} {:>8.1}   {}",
        r.processors,
        r.sent,
        r.received,
        r.duplicates,
        r.lost,
        r.secs,
        r.msgs_per_s,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.cpu_cores
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

fn table(results: &[RunResult], args: &Args) -> String {
    let mut out = format!(
        "{} messages to {} users, {} partitions, producer {:?}\n\
         {:>10} {:>8} {:>9} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8}   cpu cores by process\n",
        args.messages,
        args.users,
        args.partitions,
        args.producer,
        "processors",
        "sent",
        "received",
        "dups",
        "lost",
        "secs",
        "msgs/s",
        "p50 ms",
        "p99 ms",
        "max ms",
    );
    for r in results {
        out += &row(r);
        out.push('\n');
    }
    for r in results {
        if r.out_of_order > 0 || r.not_connected > 0.0 || r.dead_lettered > 0.0 {
            out += &format!(
                "{} processor(s): {} out of order, {} not connected, {} dead-lettered\n",
                r.processors, r.out_of_order, r.not_connected, r.dead_lettered
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_assignments_from_processor_logs() {
        let assigned = r#"{"timestamp":"x","level":"INFO","fields":{"message":"partitions assigned","assigned":"[0, 3, 5]"},"target":"msg_processor::consumer"}"#;
        assert_eq!(parse_log(assigned), LogLine::Assigned(vec![0, 3, 5]));
        let revoked = r#"{"level":"INFO","fields":{"message":"partitions revoked; committing what is done","revoked":"[3]"}}"#;
        assert_eq!(parse_log(revoked), LogLine::Revoked(vec![3]));
        assert_eq!(
            parse_log(r#"{"level":"INFO","fields":{"message":"started"}}"#),
            LogLine::Quiet
        );
        assert_eq!(
            parse_log(r#"{"level":"WARN","fields":{"message":"consumer error"}}"#),
            LogLine::Show
        );
        assert_eq!(parse_log("thread panicked"), LogLine::Show);
    }

    #[test]
    fn groups_cpu_shares_by_process_kind() {
        let shares = vec![
            ("msg-processor 0".to_owned(), 0.5),
            ("msg-processor 1".to_owned(), 0.25),
            ("redis".to_owned(), 0.1),
        ];
        let g = group_shares(&shares);
        assert_eq!(g["msg-processor"], 0.75);
        assert_eq!(g["redis"], 0.1);
    }

    #[test]
    fn reads_push_sends_summary() {
        let line = "sent=100000 failed=0 not_connected=0 elapsed_s=3.2 rate_per_s=31000";
        assert_eq!(push_send_sent(line), Some(100_000));
        assert_eq!(push_send_sent("error"), None);
    }
}
