//! `bench registry`: what a `lookup_many` costs against one local Redis, next to what that
//! Redis serves to `redis-benchmark`, and what the replicated ring costs per operation.
//!
//! One run:
//! 1. Start a `redis-server` on a free port; open it as `redis://…` (push_registry::open) and
//!    fill it with N users, one record each (batched `refresh`, which writes missing slots).
//! 2. C concurrent callers call `lookup_many` on random batches of B users for D seconds (after
//!    one unrecorded second to warm the connection): calls and users per second, latency per
//!    call (p50/p99). Then the same with `register` (one record per call), and with `refresh`
//!    (1,000 records per call, the shape of a node's refresh pass).
//! 3. `redis-benchmark -t get -P 16` against that same Redis: GET requests per second, the
//!    reference the lookup rate is divided by.
//! 4. Start 3 racks × K `redis-server`s, open `ring://…?racks=3&read=R&write=W`, fill it the
//!    same way and repeat step 2: ring ÷ single is the ring's cost per operation.
//!
//! `--runs N` repeats the whole run (fresh servers each time) and reports medians. Every
//! `redis-server` is killed when its run ends, also on error or Ctrl-C.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use push_registry::{Record, Registry};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::process::Command;

use crate::sys::RedisServer;
use crate::sys::{self, median, round2, CpuMeter};

/// How long every record lives: far longer than a run, so nothing expires while measured.
const RECORD_TTL: Duration = Duration::from_secs(3600);

/// Records per `refresh` call while filling: one pipelined round trip per storage node, big
/// enough that filling 100k users takes about a second, small enough to stay far below
/// Redis's 512 MB query-buffer limit.
const FILL_CHUNK: usize = 1000;

/// Unrecorded time before each measurement: connections opened, Redis's hash tables grown.
const WARMUP: Duration = Duration::from_secs(1);

/// Upper bound for `redis-benchmark`; 1M pipelined GETs take a few seconds here.
const REDIS_BENCHMARK_TIMEOUT: Duration = Duration::from_secs(180);

/// Arguments of `bench registry`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Users in the registry, one record each (`user-0` … `user-(N-1)`, device `d`).
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Users per `lookup_many` call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent callers (tokio tasks sharing one registry handle, as the processor does).
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Seconds each operation is measured for, per backend.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Redis nodes per rack in the ring (3 racks): 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    nodes_per_rack: u8,
    /// Ring read consistency: one, quorum or safe_quorum.
    #[arg(long, default_value = "quorum")]
    read: String,
    /// Ring write consistency: one, quorum or safe_quorum.
    #[arg(long, default_value = "quorum")]
    write: String,
    /// Requests `redis-benchmark` sends (`-n`).
    #[arg(long, default_value_t = 1_000_000)]
    redis_benchmark_requests: u64,
    /// Measure only the single Redis (no ring).
    #[arg(long)]
    no_ring: bool,
    /// How the single Redis gets its Lua scripts (`redis://…?scripts=`): `text` (the
    /// default, as behind Dynomite) or `hash` (EVALSHA). The ring always calls by hash.
    #[arg(long, default_value = "text", value_parser = ["text", "hash"])]
    scripts: String,
    /// Repeat the whole run this many times (fresh servers each time) and report medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Print the result as one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark on a multi-threaded runtime (the callers run in parallel, as in the
/// processor); Ctrl-C or SIGTERM stop it and kill the redis-servers.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::runtime(None)?.block_on(crate::until_signal(scenario(args)))
}

/// One run's figures. Every figure is an `f64`, so that several runs reduce to medians
/// field by field ([`medians`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Figures {
    /// The single Redis.
    single: Backend,
    /// `redis-benchmark -t get -P 16` on that Redis: GET requests per second.
    redis_benchmark_get_per_s: f64,
    /// CPU besides redis-server meanwhile, redis-benchmark's own included (about one core).
    redis_benchmark_cpu_others_cores: Option<f64>,
    /// Users looked up per second ÷ GETs per second.
    lookups_per_get: f64,
    /// The ring, unless `--no-ring`.
    ring: Option<Backend>,
    /// Ring ÷ single per operation, unless `--no-ring`.
    ring_over_single: Option<PerOp<Cost>>,
}

/// One backend: its fill, then each operation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Backend {
    fill_secs: f64,
    #[serde(flatten)]
    ops: PerOp<OpFigures>,
}

/// A figure of each operation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct PerOp<T> {
    lookup: T,
    register: T,
    /// Absent from reports written before it was measured.
    #[serde(default)]
    refresh: T,
}

impl<T> PerOp<T> {
    fn get(&self, op: Op) -> &T {
        match op {
            Op::Lookup => &self.lookup,
            Op::Register => &self.register,
            Op::Refresh => &self.refresh,
        }
    }
}

/// One operation measured on one backend.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct OpFigures {
    calls_per_s: f64,
    users_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    errors: f64,
    /// The storage processes summed (a ring's 3–6 servers).
    cpu_redis_cores: f64,
    cpu_bench_cores: f64,
    /// Anything else on the machine: above ~0.1 core the run was disturbed.
    cpu_others_cores: f64,
}

/// The ring's cost over the single Redis for one operation.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Cost {
    p50_us: f64,
    p99_us: f64,
    /// Users per second for lookups, calls per second for registers.
    throughput: f64,
}

/// `bench registry --json`: the set-up, the medians and every run.
#[derive(Debug, Serialize)]
struct Output {
    users: usize,
    batch: usize,
    callers: usize,
    secs: u64,
    /// The ring measured, unless `--no-ring`.
    ring: Option<Ring>,
    /// How the single Redis got its scripts (`--scripts`).
    scripts: String,
    redis_benchmark: String,
    redis_server: String,
    machine: String,
    medians: Figures,
    runs: Vec<Figures>,
}

/// The ring's shape.
#[derive(Debug, Serialize)]
struct Ring {
    racks: u8,
    nodes_per_rack: u8,
    read: String,
    write: String,
}

async fn scenario(args: Args) -> anyhow::Result<()> {
    if args.users == 0 || args.batch == 0 || args.callers == 0 || args.secs == 0 {
        bail!("--users, --batch, --callers and --secs must be at least 1");
    }
    if args.batch > args.users {
        bail!(
            "--batch {} is larger than --users {}",
            args.batch,
            args.users
        );
    }
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        eprintln!("run {i} of {}", args.runs);
        let figures = one_run(&args).await?;
        if args.runs > 1 {
            eprintln!("{}", table(&figures, &args));
        }
        runs.push(figures);
    }
    let medians = medians(&runs)?;
    let title = if args.runs > 1 {
        format!("medians of {} runs: ", args.runs)
    } else {
        String::new()
    };
    let table = format!("{title}{}\n", table(&medians, &args));
    let result = Output {
        users: args.users,
        batch: args.batch,
        callers: args.callers,
        secs: args.secs,
        ring: (!args.no_ring).then(|| Ring {
            racks: 3,
            nodes_per_rack: args.nodes_per_rack,
            read: args.read.clone(),
            write: args.write.clone(),
        }),
        scripts: args.scripts.clone(),
        redis_benchmark: redis_benchmark_command("P", args.redis_benchmark_requests).join(" "),
        redis_server: sys::shell(&["redis-server", "--version"]),
        machine: sys::machine(),
        medians,
        runs,
    };
    crate::side::emit(args.json, &result, &table)?;
    Ok(())
}

async fn one_run(args: &Args) -> anyhow::Result<Figures> {
    // The single Redis, then redis-benchmark on the same server.
    let single = sys::start_redis().await?;
    let url = format!("redis://{}?scripts={}", single.addr(), args.scripts);
    let pids = vec![("redis".to_owned(), sys::redis_pid(&single)?)];
    let backend = measure_backend("single", &url, &pids, args).await?;
    let cpu = CpuMeter::start(&pids);
    let gets = redis_benchmark(single.port(), args.redis_benchmark_requests).await?;
    // `others` includes redis-benchmark itself (about one core): more than that is noise.
    let others = cpu.stop().into_iter().find(|(l, _)| l == "others");
    let mut f = Figures {
        lookups_per_get: backend.ops.lookup.users_per_s / gets,
        single: backend,
        redis_benchmark_get_per_s: gets,
        redis_benchmark_cpu_others_cores: others.map(|(_, cores)| cores),
        ring: None,
        ring_over_single: None,
    };
    drop(single);

    if !args.no_ring {
        let count = 3 * usize::from(args.nodes_per_rack);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            nodes.push(sys::start_redis().await?);
        }
        let addrs: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        // `racks=3`: the nodes are split into 3 racks in the order given (push-registry url.rs).
        let url = format!(
            "ring://{}?racks=3&read={}&write={}",
            addrs.join(","),
            args.read,
            args.write
        );
        let pids: Vec<(String, u32)> = nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((format!("redis{i}"), sys::redis_pid(n).ok()?)))
            .collect();
        let ring = measure_backend("ring", &url, &pids, args).await?;
        let cost = |op: Op| {
            let (r, s) = (ring.ops.get(op), f.single.ops.get(op));
            // Lookups move `--batch` users per call: their throughput is users per second.
            let (rt, st) = match op {
                Op::Lookup | Op::Refresh => (r.users_per_s, s.users_per_s),
                Op::Register => (r.calls_per_s, s.calls_per_s),
            };
            Cost {
                p50_us: r.p50_us / s.p50_us,
                p99_us: r.p99_us / s.p99_us,
                throughput: rt / st,
            }
        };
        f.ring_over_single = Some(PerOp {
            lookup: cost(Op::Lookup),
            register: cost(Op::Register),
            refresh: cost(Op::Refresh),
        });
        f.ring = Some(ring);
    }
    Ok(f)
}

/// Fills the backend at `url`, then measures `lookup_many` and `register`. `pids` are the
/// storage processes whose CPU share is reported; `name` labels the lines.
async fn measure_backend(
    name: &str,
    url: &str,
    pids: &[(String, u32)],
    args: &Args,
) -> anyhow::Result<Backend> {
    let registry = push_registry::open(url)
        .await
        .with_context(|| format!("cannot open registry {url}"))?;
    let started = Instant::now();
    fill(registry.as_ref(), args.users).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{name}: {url}: filled {} users in {fill_secs:.1} s",
        args.users
    );
    let mut procs = pids.to_vec();
    procs.push(("bench".into(), std::process::id()));
    let mut ops = PerOp::<OpFigures>::default();
    for op in Op::ALL {
        drive(&registry, op, args, WARMUP).await?;
        let cpu = CpuMeter::start(&procs);
        let m = drive(&registry, op, args, Duration::from_secs(args.secs)).await?;
        let shares = cpu.stop();
        if m.misses > 0 {
            bail!(
                "{name} {}: {} users of {} had no record of theirs (the fill wrote them all)",
                op.name(),
                m.misses,
                m.calls * op.users_per_call(args) as u64
            );
        }
        let secs = m.elapsed.as_secs_f64();
        let share = |label: &str| {
            shares
                .iter()
                .filter(|(l, _)| l.starts_with(label))
                .map(|(_, c)| c)
                .sum::<f64>()
        };
        let figures = OpFigures {
            calls_per_s: (m.calls as f64 / secs).round(),
            users_per_s: (m.calls as f64 * op.users_per_call(args) as f64 / secs).round(),
            p50_us: m.latency_us.value_at_quantile(0.5) as f64,
            p99_us: m.latency_us.value_at_quantile(0.99) as f64,
            max_us: m.latency_us.max() as f64,
            errors: m.errors as f64,
            cpu_redis_cores: round2(share("redis")),
            cpu_bench_cores: share("bench"),
            cpu_others_cores: share("others"),
        };
        match op {
            Op::Lookup => ops.lookup = figures,
            Op::Register => ops.register = figures,
            Op::Refresh => ops.refresh = figures,
        }
    }
    Ok(Backend {
        fill_secs: round2(fill_secs),
        ops,
    })
}

/// The user IDs of the run: the same form the pipeline benchmark and push-send use.
fn user(i: usize) -> String {
    format!("user-{i}")
}

/// The record of user `i`: one device on one of two nodes, as after a real registration.
fn record(i: usize) -> Record {
    Record {
        user: user(i),
        device: Some("d".into()),
        node_id: format!("node-{}", i % 2),
        node_addr: format!("127.0.0.1:{}", 9090 + i % 2),
        conn_id: format!("conn-{i}"),
        connected_at: push_registry::now_ms(),
    }
}

/// Writes one record per user, `FILL_CHUNK` per round trip.
async fn fill(registry: &dyn Registry, users: usize) -> anyhow::Result<()> {
    let mut i = 0;
    while i < users {
        let end = (i + FILL_CHUNK).min(users);
        let records: Vec<Record> = (i..end).map(record).collect();
        registry
            .refresh(&records, RECORD_TTL)
            .await
            .context("filling the registry")?;
        i = end;
    }
    Ok(())
}

/// The operation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `lookup_many` of `--batch` random users.
    Lookup,
    /// `register` of one random user's record (overwriting it).
    Register,
    /// `refresh` of [`FILL_CHUNK`] users' records from a random one on, as a node's refresh
    /// pass sends them: one pipelined call (single Redis, ring) or concurrent calls (cluster).
    Refresh,
}

impl Op {
    const ALL: [Op; 3] = [Op::Lookup, Op::Register, Op::Refresh];

    fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Register => "register",
            Op::Refresh => "refresh",
        }
    }

    fn users_per_call(self, args: &Args) -> usize {
        match self {
            Op::Lookup => args.batch,
            Op::Register => 1,
            Op::Refresh => FILL_CHUNK.min(args.users),
        }
    }
}

/// What the callers of one measurement did together.
#[derive(Debug)]
struct Measured {
    calls: u64,
    errors: u64,
    /// Users a lookup found no record for.
    misses: u64,
    latency_us: Histogram<u64>,
    elapsed: Duration,
    first_error: Option<String>,
}

impl Measured {
    fn new() -> Self {
        Self {
            calls: 0,
            errors: 0,
            misses: 0,
            // Three significant figures, 1 µs .. 60 s: what one registry call can take.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds"),
            elapsed: Duration::ZERO,
            first_error: None,
        }
    }
}

/// Runs `--callers` tasks calling `op` back to back for `duration`.
async fn drive(
    registry: &Arc<dyn Registry>,
    op: Op,
    args: &Args,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(args.callers);
    for caller in 0..args.callers {
        let registry = registry.clone();
        let (users, batch) = (args.users, args.batch);
        tasks.push(tokio::spawn(async move {
            // Small and fast (statistical quality is irrelevant here): the bench's own cost
            // stays low and fixed; seeded per caller, so runs pick the same users.
            let mut rng = SmallRng::seed_from_u64(caller as u64);
            let mut m = Measured::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let outcome = match op {
                    Op::Lookup => {
                        let batch: Vec<String> = (0..batch)
                            .map(|_| user(rng.random_range(0..users)))
                            .collect();
                        registry.lookup_many(&batch).await.map(|found| {
                            found.iter().filter(|records| records.is_empty()).count() as u64
                        })
                    }
                    Op::Register => registry
                        .register(&record(rng.random_range(0..users)), RECORD_TTL)
                        .await
                        .map(|()| 0),
                    Op::Refresh => {
                        let n = FILL_CHUNK.min(users);
                        let first = rng.random_range(0..=users - n);
                        let records: Vec<Record> = (first..first + n).map(record).collect();
                        // A record refreshed by its own connection is owned: one that is not
                        // (the fill wrote another conn_id) counts as a miss.
                        registry
                            .refresh(&records, RECORD_TTL)
                            .await
                            .map(|outcomes| {
                                outcomes
                                    .iter()
                                    .filter(|o| **o != push_registry::RefreshOutcome::Owned)
                                    .count() as u64
                            })
                    }
                };
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                m.latency_us.saturating_record(us.max(1));
                m.calls += 1;
                match outcome {
                    Ok(misses) => m.misses += misses,
                    Err(e) => {
                        m.errors += 1;
                        m.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            m
        }));
    }
    let mut total = Measured::new();
    for task in tasks {
        let m = task.await.context("a caller panicked")?;
        total.calls += m.calls;
        total.errors += m.errors;
        total.misses += m.misses;
        total
            .latency_us
            .add(m.latency_us)
            .context("merging histograms")?;
        total.first_error = total.first_error.or(m.first_error);
    }
    total.elapsed = started.elapsed();
    if let Some(e) = &total.first_error {
        // A few errors (a timeout under load) are reported in the figures; all errors is a
        // broken setup and worth stopping for.
        if total.errors == total.calls {
            bail!("every {} call failed: {e}", op.name());
        }
        eprintln!(
            "{} errors of {} {} calls, first: {e}",
            total.errors,
            total.calls,
            op.name()
        );
    }
    Ok(total)
}

/// The `redis-benchmark` command line, for running and for the report.
fn redis_benchmark_command(port: &str, requests: u64) -> Vec<String> {
    [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-t",
        "get",
        "-P",
        "16",
        "-n",
        &requests.to_string(),
        "--csv",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `redis-benchmark -t get -P 16` against `port`: GET requests per second.
async fn redis_benchmark(port: u16, requests: u64) -> anyhow::Result<f64> {
    let cmd = redis_benchmark_command(&port.to_string(), requests);
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run redis-benchmark (Debian: apt-get install -y redis-tools)")?;
    let out = tokio::time::timeout(REDIS_BENCHMARK_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| {
            format!("redis-benchmark took longer than {REDIS_BENCHMARK_TIMEOUT:?}")
        })??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "redis-benchmark failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_redis_benchmark_csv(&stdout)
        .with_context(|| format!("no GET line in redis-benchmark's output: {stdout}"))
}

/// The requests per second of the `GET` row of `redis-benchmark --csv` (Redis 7: a header
/// `"test","rps",…`, then `"GET","123456.79",…`; Redis 6 has no header).
fn parse_redis_benchmark_csv(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let mut cols = line.split(',').map(|c| c.trim().trim_matches('"'));
        (cols.next()? == "GET").then_some(())?;
        cols.next()?.parse().ok()
    })
}

/// The median over runs, figure by figure: every run is the same struct, so the medians
/// are read field by field through its JSON form (absent or `null` figures are skipped).
fn medians(runs: &[Figures]) -> anyhow::Result<Figures> {
    fn fold(values: &[Value]) -> Value {
        match values.iter().find(|v| !v.is_null()) {
            Some(Value::Object(first)) => Value::Object(
                first
                    .keys()
                    .map(|k| {
                        let field: Vec<Value> =
                            values.iter().filter_map(|v| v.get(k).cloned()).collect();
                        (k.clone(), fold(&field))
                    })
                    .collect(),
            ),
            Some(Value::Number(_)) => {
                serde_json::json!(median(
                    &values.iter().filter_map(Value::as_f64).collect::<Vec<_>>()
                ))
            }
            other => other.cloned().unwrap_or(Value::Null),
        }
    }
    if let [one] = runs {
        return Ok(one.clone());
    }
    let values = runs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(serde_json::from_value(fold(&values))?)
}

/// The human report of one run or of the medians.
fn table(f: &Figures, args: &Args) -> String {
    let mut out = format!(
        "{} users, lookup_many of {} users, {} callers, {} s per operation, \
         the single Redis's scripts by {}\n\
         {:<8} {:<12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10} {:>13} {:>10} {:>10}\n",
        args.users,
        args.batch,
        args.callers,
        args.secs,
        args.scripts,
        "backend",
        "operation",
        "calls/s",
        "users/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "redis cpu",
        "redis µs/call",
        "bench cpu",
        "other cpu",
    );
    let backends = [("single", Some(&f.single)), ("ring", f.ring.as_ref())];
    for (backend, b) in backends {
        for op in Op::ALL.into_iter().filter(|_| b.is_some()) {
            let k = b.map(|b| *b.ops.get(op)).unwrap_or_default();
            out += &format!(
                "{:<8} {:<12} {:>10.0} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>10.2} {:>13.2} {:>10.2} {:>10.2}\n",
                backend,
                if op == Op::Lookup { "lookup_many" } else { op.name() },
                k.calls_per_s,
                k.users_per_s,
                k.p50_us,
                k.p99_us,
                k.max_us,
                k.cpu_redis_cores,
                // The storage's CPU per call: what a node's refresh pass or a register costs it.
                k.cpu_redis_cores * 1e6 / k.calls_per_s.max(1.0),
                k.cpu_bench_cores,
                k.cpu_others_cores,
            );
        }
    }
    out += &format!(
        "redis-benchmark -t get -P 16: {:.0} GET/s (cpu besides redis-server, including \
         redis-benchmark: {:.2}); lookups/s ÷ GET/s = {:.3}",
        f.redis_benchmark_get_per_s,
        f.redis_benchmark_cpu_others_cores.unwrap_or(f64::NAN),
        f.lookups_per_get,
    );
    for (op, r) in f
        .ring_over_single
        .iter()
        .flat_map(|c| [("lookup", c.lookup), ("register", c.register)])
    {
        out += &format!(
            "\nring ÷ single, {op}: p50 × {:.2}, p99 × {:.2}, throughput × {:.2}",
            r.p50_us, r.p99_us, r.throughput,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_get_row_of_redis_benchmark_csv() {
        let redis7 = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\"\n\
                      \"GET\",\"1250000.00\",\"0.563\",\"0.104\"\n";
        assert_eq!(parse_redis_benchmark_csv(redis7), Some(1_250_000.0));
        assert_eq!(parse_redis_benchmark_csv("\"GET\",\"99.5\"\n"), Some(99.5));
        assert_eq!(parse_redis_benchmark_csv("\"SET\",\"1\"\n"), None);
        assert_eq!(parse_redis_benchmark_csv(""), None);
    }

    #[test]
    fn medians_field_by_field() {
        let run = |p50: f64, others: Option<f64>| {
            let mut f = Figures {
                redis_benchmark_cpu_others_cores: others,
                ..Figures::default()
            };
            f.single.ops.lookup.p50_us = p50;
            f
        };
        let m = medians(&[run(1.0, Some(10.0)), run(3.0, None), run(2.0, Some(20.0))])
            .expect("medians");
        assert_eq!(m.single.ops.lookup.p50_us, 2.0);
        assert_eq!(m.redis_benchmark_cpu_others_cores, Some(15.0));
        assert!(m.ring.is_none());
        let none = medians(&[run(1.0, None), run(2.0, None)]).expect("medians");
        assert_eq!(none.redis_benchmark_cpu_others_cores, None);
    }
}
