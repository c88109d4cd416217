//! `bench compare`: every side-by-side scenario on every system in one run, then one
//! markdown table with ratios against each peer (`--out`), the JSON of every result
//! (`--json-out`) and the latency chart (`--chart`).
//!
//! In order: idle memory at 15k SSE connections, one process each ([`crate::peers`]); idle
//! memory at 100k WebSocket connections over several processes ([`crate::idle_scale`]);
//! accept rate for a 10k burst ([`crate::peers_accept`]); push by user at fixed rates
//! ([`crate::peers_push`]). Each scenario runs push-server, Nchan and Pushpin one after the
//! other and skips a peer that is missing with a line saying so.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::hold::Transport;
use crate::systems::Peer;
use crate::{idle_scale, peers, peers_accept, peers_push, sys};

/// Arguments of `bench compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Systems, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan,pushpin"
    )]
    peers: Vec<Peer>,
    /// The markdown table.
    #[arg(long, default_value = "docs/bench/compare.md")]
    out: PathBuf,
    /// Every result, as JSON.
    #[arg(long, default_value = "docs/bench/compare.json")]
    json_out: PathBuf,
    /// The chart of latency against rate.
    #[arg(long, default_value = "docs/bench/push-latency.png")]
    chart: PathBuf,
    /// Idle connections per system, one process each (0 skips the scenario).
    #[arg(long, default_value_t = 15_000)]
    idle_conns: usize,
    /// Idle connections over several processes (0 skips the scenario).
    #[arg(long, default_value_t = 100_000)]
    scale_conns: usize,
    /// push-server processes for `--scale-conns`.
    #[arg(long, default_value_t = 6)]
    scale_nodes: usize,
    /// Connections in the accept burst (0 skips the scenario).
    #[arg(long, default_value_t = 10_000)]
    accept_conns: usize,
    /// Subscribers of the push scenario (0 skips it).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Rates of the push scenario, messages per second.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "20,100,1000,5000,10000,20000,30000,40000,50000,60000,80000,100000,120000"
    )]
    rates: Vec<u32>,
    /// Length of one push step.
    #[arg(long, default_value_t = 10)]
    step_secs: u64,
    /// Bound on the latency p99 of a sustained push step, ms.
    #[arg(long, default_value_t = 100.0)]
    p99_bound_ms: f64,
    /// push-server binary. Default: `push-server` next to this `bench` binary.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Run nothing: write the table and the chart again from this JSON of an earlier run.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

/// Runs every scenario, then writes the table, the JSON and the chart.
pub fn run(args: Args) -> anyhow::Result<()> {
    let report = match &args.from_json {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )?,
        None => {
            let runtime = crate::runtime()?;
            runtime.block_on(crate::until_signal(all(&args)))?
        }
    };
    let markdown = markdown(&report, &args);
    for path in [&args.out, &args.json_out, &args.chart] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
    }
    std::fs::write(&args.out, &markdown)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if args.from_json.as_ref() != Some(&args.json_out) {
        std::fs::write(&args.json_out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", args.json_out.display()))?;
    }
    if let Some(push) = report["push"].as_array() {
        crate::chart::latency_against_rate(&args.chart, push)?;
    }
    print!("{markdown}");
    eprintln!(
        "wrote {}, {} and {}",
        args.out.display(),
        args.json_out.display(),
        args.chart.display()
    );
    Ok(())
}

async fn all(args: &Args) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let load_before = load_average();
    let mut report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "date": shell(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        "commit": shell(&["git", "rev-parse", "--short", "HEAD"]),
        "machine": sys::machine(),
        "load_average_before": load_before,
    });
    if args.idle_conns > 0 {
        let a = peers::Args {
            conns: args.idle_conns,
            transport: Transport::Sse,
            peers: args.peers.clone(),
            sources: 32,
            concurrency: 256,
            pushpin_concurrency: 64,
            settle_secs: 5,
            server_bin: args.server_bin.clone(),
            json: true,
        };
        report["idle"] = Value::Array(peers::all(&a).await?);
    }
    if args.scale_conns > 0 {
        let a = idle_scale::Args {
            peers: args.peers.clone(),
            conns: args.scale_conns,
            nodes: args.scale_nodes,
            nchan_workers: u32::try_from(args.scale_conns.div_ceil(15_000))
                .unwrap_or(8)
                .max(1),
            transport: Transport::Ws,
            sources: 64,
            concurrency: 128,
            settle_secs: 5,
            server_bin: args.server_bin.clone(),
            json: true,
        };
        report["scale"] = Value::Array(idle_scale::all(&a).await?);
    }
    if args.accept_conns > 0 {
        let a = peers_accept::Args {
            peers: args.peers.clone(),
            conns: args.accept_conns,
            transport: Transport::Sse,
            concurrency: 256,
            sources: 32,
            nchan_workers: 2,
            server_bin: args.server_bin.clone(),
            json: true,
        };
        report["accept"] = Value::Array(peers_accept::all(&a).await?);
    }
    if args.subscribers > 0 {
        let a = peers_push::Args {
            peers: args.peers.clone(),
            subscribers: args.subscribers,
            transport: Transport::Sse,
            rates: args.rates.clone(),
            step_secs: args.step_secs,
            http_conns: 32,
            p99_bound_ms: args.p99_bound_ms,
            keep_going: false,
            sources: 16,
            concurrency: 64,
            nchan_workers: 2,
            pushpin_message_rate: 200_000,
            server_bin: args.server_bin.clone(),
            json: true,
            chart: None,
        };
        report["push"] = Value::Array(peers_push::all(&a).await?);
    }
    report["load_average_after"] = json!(load_average());
    report["minutes"] = json!(sys::round2(started.elapsed().as_secs_f64() / 60.0));
    Ok(report)
}

/// The first line of a command's output, or `?`.
fn shell(cmd: &[&str]) -> String {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or("?".into(), |s| s.trim().to_owned())
}

/// `/proc/loadavg`'s first three fields: how busy the machine was (others' builds show here).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The result of `peer` in a scenario's array.
fn of<'a>(results: &'a Value, peer: &str) -> Option<&'a Value> {
    results.as_array()?.iter().find(|r| r["peer"] == peer)
}

/// A figure of one system, or why there is none.
fn cell(results: &Value, peer: &str, key: &str) -> String {
    match of(results, peer) {
        None => "not run".into(),
        Some(r) => match (&r[key], r["skipped"].as_str(), r["error"].as_str()) {
            (_, Some(_), _) => "skipped".into(),
            (_, _, Some(_)) => "failed".into(),
            (Value::Null, _, _) => "none".into(),
            (v, _, _) => fmt_num(v),
        },
    }
}

fn fmt_num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() >= 1000.0 => {
            let s = format!("{x:.0}");
            // Thousands separated by commas, as in the rest of BENCHMARKS.md.
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(x) => format!("{x}"),
        None => v.to_string(),
    }
}

/// `ours ÷ theirs` of a figure, or `–`.
fn ratio(results: &Value, peer: &str, key: &str) -> Option<f64> {
    let ours = of(results, "push-server")?[key].as_f64()?;
    let theirs = of(results, peer)?[key].as_f64()?;
    (theirs > 0.0).then(|| sys::round2(ours / theirs))
}

/// How a ratio reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    /// Memory, latency: the ratio also says how many times less (or more).
    Lower,
    /// Rates: the ratio as it is.
    Higher,
    /// Counts with no meaningful ratio (failures).
    NoRatio,
}

fn say(r: Option<f64>, better: Better) -> String {
    match (r, better) {
        (None, _) | (_, Better::NoRatio) => "–".into(),
        (Some(r), Better::Lower) if r > 0.0 && r < 1.0 => {
            format!("×{r:.2} ({:.1}× less)", 1.0 / r)
        }
        (Some(r), Better::Lower) if r > 1.0 => format!("×{r:.2} ({r:.1}× more)"),
        (Some(r), _) => format!("×{r:.2}"),
    }
}

/// CPU time the system's own processes used per message in a step, µs: the step's
/// `cpu_cores` minus `bench` and `others`, times the readings' window, over the messages
/// accepted.
fn cpu_us_per_msg(step: &Value) -> Option<f64> {
    let cores: f64 = step["cpu_cores"]
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "bench" && *k != "others")
        .filter_map(|(_, v)| v.as_f64())
        .sum();
    // Below 1,000/s the CPU readings (10 ms ticks) say little per message.
    step["achieved"].as_f64().filter(|r| *r >= 1000.0)?;
    let accepted = step["accepted"].as_f64().filter(|n| *n > 0.0)?;
    // Older reports have no window: the sending time (accepted ÷ achieved) stands in.
    let wall = step["wall_secs"]
        .as_f64()
        .or_else(|| Some(accepted / step["achieved"].as_f64().filter(|r| *r > 0.0)?))?;
    Some(sys::round2(cores * wall / accepted * 1e6))
}

/// The markdown report.
pub fn markdown(report: &Value, args: &Args) -> String {
    let peers = ["nchan", "pushpin"];
    let mut md = String::new();
    let _ = writeln!(md, "# push-server side by side with Nchan and Pushpin\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} (commit `{}`, {}; load average {} before, {} after; {} minutes). \
         Ratios are push-server's figure over the peer's, from this one run.\n",
        report["command"].as_str().unwrap_or("bench compare"),
        report["date"].as_str().unwrap_or("?"),
        report["commit"].as_str().unwrap_or("?"),
        report["machine"].as_str().unwrap_or("?"),
        report["load_average_before"].as_str().unwrap_or("?"),
        report["load_average_after"].as_str().unwrap_or("?"),
        report["minutes"],
    );
    let _ = writeln!(
        md,
        "| scenario | push-server | Nchan | Pushpin | push-server ÷ Nchan | push-server ÷ Pushpin |\n|---|---|---|---|---|---|"
    );
    let mut row = |name: String, results: &Value, key: &str, better: Better| {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} |",
            cell(results, "push-server", key),
            cell(results, peers[0], key),
            cell(results, peers[1], key),
            say(ratio(results, peers[0], key), better),
            say(ratio(results, peers[1], key), better),
        );
    };
    let idle = &report["idle"];
    if idle.is_array() {
        row(
            format!(
                "idle RSS per SSE connection, {} conns, one process (KiB)",
                args.idle_conns
            ),
            idle,
            "kib_per_conn",
            Better::Lower,
        );
    }
    let scale = &report["scale"];
    if scale.is_array() {
        row(
            format!(
                "idle RSS per WebSocket connection, {} conns, several processes (KiB)",
                args.scale_conns
            ),
            scale,
            "kib_per_conn",
            Better::Lower,
        );
    }
    let accept = &report["accept"];
    if accept.is_array() {
        row(
            format!(
                "accept: SSE connections opened per second, burst of {}",
                args.accept_conns
            ),
            accept,
            "opened_per_sec",
            Better::Higher,
        );
        row(
            "accept: connect latency p50 (ms)".into(),
            accept,
            "connect_p50_ms",
            Better::Lower,
        );
        row(
            "accept: connect latency p99 (ms)".into(),
            accept,
            "connect_p99_ms",
            Better::Lower,
        );
        row(
            "accept: connections failed".into(),
            accept,
            "failed",
            Better::NoRatio,
        );
    }
    let push = &report["push"];
    if push.is_array() {
        row(
            format!(
                "push by user: highest sustained rate, msg/s ({} SSE subscribers, 32 keep-alive publishers)",
                args.subscribers
            ),
            push,
            "max_sustained_rate",
            Better::Higher,
        );
        row(
            "push by user: latency p50 at that rate (ms)".into(),
            push,
            "p50_ms_at_max",
            Better::Lower,
        );
        row(
            "push by user: latency p99 at that rate (ms)".into(),
            push,
            "p99_ms_at_max",
            Better::Lower,
        );
        // Same rate: push-server's p99 at each peer's highest sustained rate.
        let ratios = peers_push::ratios(push.as_array().map_or(&[][..], Vec::as_slice));
        let same: Vec<String> = peers
            .iter()
            .map(|p| {
                ratios
                    .iter()
                    .find(|(name, _, _)| name == p)
                    .and_then(|(_, _, p99)| *p99)
                    .map_or("–".into(), |r| format!("×{r:.2}"))
            })
            .collect();
        let _ = writeln!(
            md,
            "| push by user: push-server's p99 ÷ the peer's, at the peer's highest sustained rate | | | | {} | {} |",
            same[0], same[1]
        );
        // CPU the system used per message (bench and the rest of the machine left out), at
        // the highest rate each sustained; the ratio compares the same rate (the peer's).
        let per_msg = |peer: &str, rate: Option<u64>| -> Option<f64> {
            let r = of(push, peer)?;
            let rate = rate.or_else(|| r["max_sustained_rate"].as_u64())?;
            let step = r["steps"]
                .as_array()?
                .iter()
                .find(|s| s["rate"].as_u64() == Some(rate))?;
            cpu_us_per_msg(step)
        };
        let mut cells = Vec::new();
        let mut ratios = Vec::new();
        for p in ["push-server", peers[0], peers[1]] {
            cells.push(per_msg(p, None).map_or("–".into(), |x| format!("{x:.1}")));
        }
        for p in peers {
            let rate = of(push, p).and_then(|r| r["max_sustained_rate"].as_u64());
            let r = per_msg("push-server", rate)
                .zip(per_msg(p, rate))
                .filter(|(_, b)| *b > 0.0)
                .map(|(a, b)| sys::round2(a / b));
            ratios.push(say(r, Better::Lower));
        }
        let _ = writeln!(
            md,
            "| push by user: CPU of the system per message at its highest sustained rate (µs; ratio at the peer's rate) | {} | {} | {} | {} | {} |",
            cells[0], cells[1], cells[2], ratios[0], ratios[1]
        );
    }
    let _ = writeln!(
        md,
        "\nSustained: achieved ≥ 95 % of the target rate, no message lost (every publish answered 2xx, \
         every message received within 5 s of the step's end), latency p99 ≤ {} ms; latency is from the \
         scheduled send time in the payload to the subscriber's receipt.\n",
        args.p99_bound_ms
    );

    if let Some(systems) = push.as_array() {
        let _ = writeln!(md, "## Push by user, every step\n");
        let _ = writeln!(
            md,
            "| system | target/s | achieved/s | lost | p50 ms | p99 ms | max ms | publish p99 ms | CPU (cores) | sustained |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in systems {
            let peer = r["peer"].as_str().unwrap_or("?");
            if let Some(why) = r["skipped"].as_str().or(r["error"].as_str()) {
                let _ = writeln!(md, "| {peer} | {why} | | | | | | | | |");
                continue;
            }
            for s in r["steps"].as_array().into_iter().flatten() {
                let cpu = s["cpu_cores"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    md,
                    "| {peer} | {} | {} | {} | {} | {} | {} | {} | {cpu} | {} |",
                    fmt_num(&s["rate"]),
                    fmt_num(&s["achieved"]),
                    s["lost"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    s["request_p99_ms"],
                    if s["sustained"] == true {
                        "yes"
                    } else {
                        "**no**"
                    }
                );
            }
        }
        let _ = writeln!(md);
    }
    let mut details = |title: &str, results: &Value| {
        if let Some(rs) = results.as_array() {
            let _ = writeln!(md, "## {title}\n");
            for r in rs {
                let peer = r["peer"].as_str().unwrap_or("?");
                let mut r = r.clone();
                // Long blobs (per-process maps, status pages) stay in the JSON.
                if let Some(o) = r.as_object_mut() {
                    o.remove("processes");
                    o.remove("status_while_held");
                    o.remove("steps");
                }
                let _ = writeln!(md, "- **{peer}**: `{r}`");
            }
            let _ = writeln!(md);
        }
    };
    details("Idle memory, one process each (details)", idle);
    details("Idle memory at scale (details)", scale);
    details("Accept rate (details)", accept);
    md
}
