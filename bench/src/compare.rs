//! `bench compare`: every side-by-side scenario on every system in one run, then one
//! markdown table with ratios against each peer (`--out`), the JSON of every result
//! (`--json-out`) and the latency chart (`--chart`).
//!
//! In order: idle memory at 15k SSE connections, one process each ([`idle::peers`]); idle
//! memory at 100k WebSocket connections over several processes ([`idle::scale`]); accept
//! rate for a 10k burst ([`accept`]); push by user at fixed rates ([`peers_push`]). Each
//! scenario runs push-server, Nchan and Pushpin one after the other and skips a peer that is
//! missing with a line saying so.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::accept::{self, Accept};
use crate::idle::{self, Idle};
use crate::peers_push::{self, Push, Step, Steps};
use crate::side::{PeerResult, PeersArg};
use crate::sys;
use crate::Command;

/// Arguments of `bench compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    peers: PeersArg,
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
    #[command(flatten)]
    push: Steps,
    /// push-server binary. Default: `push-server` next to this `bench` binary.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Run nothing: write the table and the chart again from this JSON of an earlier run.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

/// Everything one `bench compare` run measured: the JSON it writes and reads back.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    command: String,
    date: String,
    commit: String,
    machine: String,
    load_average_before: String,
    load_average_after: String,
    minutes: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<Vec<PeerResult<Idle>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Vec<PeerResult<Idle>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accept: Option<Vec<PeerResult<Accept>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    push: Option<Vec<PeerResult<Push>>>,
}

/// Runs every scenario, then writes the table, the JSON and the chart.
pub fn run(args: Args) -> anyhow::Result<()> {
    let report: Report = match &args.from_json {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not a `bench compare` JSON", path.display()))?,
        None => crate::runtime(Some(2))?.block_on(crate::until_signal(all(&args)))?,
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
    if let Some(push) = &report.push {
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

async fn all(args: &Args) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: sys::shell(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: sys::shell(&["git", "rev-parse", "--short", "HEAD"]),
        machine: sys::machine(),
        load_average_before: sys::load_average(),
        ..Report::default()
    };
    let parse = |argv: &[&str]| scenario(args, argv);
    if args.idle_conns > 0 {
        if let Command::PeersIdle(a) =
            parse(&["peers-idle", "--conns", &args.idle_conns.to_string()])?
        {
            report.idle = Some(idle::peers(&a).await?);
        }
    }
    if args.scale_conns > 0 {
        // One Nchan worker per 15,000 connections.
        let workers = args.scale_conns.div_ceil(15_000).max(1).to_string();
        let (conns, nodes) = (args.scale_conns.to_string(), args.scale_nodes.to_string());
        let argv = [
            "idle-scale",
            "--conns",
            &conns,
            "--nodes",
            &nodes,
            "--nchan-workers",
            &workers,
        ];
        if let Command::IdleScale(a) = parse(&argv)? {
            report.scale = Some(idle::scale(&a).await?);
        }
    }
    if args.accept_conns > 0 {
        if let Command::PeersAccept(a) =
            parse(&["peers-accept", "--conns", &args.accept_conns.to_string()])?
        {
            report.accept = Some(accept::all(&a).await?);
        }
    }
    if args.push.subscribers > 0 {
        if let Command::PeersPush(mut a) = parse(&["peers-push"])? {
            a.steps = args.push.clone();
            report.push = Some(peers_push::all(&a).await?);
        }
    }
    report.load_average_after = sys::load_average();
    report.minutes = sys::round2(started.elapsed().as_secs_f64() / 60.0);
    Ok(report)
}

/// A scenario's arguments as its own subcommand reads them (its defaults, main.rs's
/// included), with this run's sizes in `argv` and this run's peers and server.
fn scenario(args: &Args, argv: &[&str]) -> anyhow::Result<Command> {
    let peers: Vec<&str> = args.peers.peers.iter().map(|p| p.as_str()).collect();
    let mut all: Vec<OsString> = ["bench", argv[0], "--json", "--peers", &peers.join(",")]
        .into_iter()
        .chain(argv[1..].iter().copied())
        .map(OsString::from)
        .collect();
    if let Some(bin) = &args.server_bin {
        all.extend(["--server-bin".into(), bin.into()]);
    }
    Ok(<crate::Cli as clap::Parser>::try_parse_from(all)?.command)
}

/// A figure of one system, or why there is none.
fn cell<T>(results: &[PeerResult<T>], peer: &str, get: &impl Fn(&T) -> Option<f64>) -> String {
    match results.iter().find(|r| r.peer == peer) {
        None => "not run".into(),
        Some(r) => match (r.ran(), &r.outcome) {
            (Some(t), _) => get(t).map_or("none".into(), fmt_num),
            (None, crate::side::Outcome::Skipped { .. }) => "skipped".into(),
            (None, _) => "failed".into(),
        },
    }
}

/// A number as the rest of BENCHMARKS.md writes it: whole numbers from 1,000 with commas.
fn fmt_num(x: f64) -> String {
    if x.fract() != 0.0 || x.abs() < 1000.0 {
        return format!("{x}");
    }
    let s = format!("{x:.0}");
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `ours ÷ theirs` of a figure, or `–`.
fn ratio<T>(
    results: &[PeerResult<T>],
    peer: &str,
    get: &impl Fn(&T) -> Option<f64>,
) -> Option<f64> {
    let ours = get(crate::side::of(results, "push-server")?)?;
    let theirs = get(crate::side::of(results, peer)?)?;
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
fn cpu_us_per_msg(step: &Step) -> Option<f64> {
    let cores: f64 = step
        .cpu_cores
        .iter()
        .filter(|(k, _)| *k != "bench" && *k != "others")
        .map(|(_, v)| v)
        .sum();
    // Below 1,000/s the CPU readings (10 ms ticks) say little per message.
    if step.achieved < 1000.0 || step.accepted == 0 {
        return None;
    }
    let accepted = step.accepted as f64;
    // Older reports have no window: the sending time (accepted ÷ achieved) stands in.
    let wall = step.wall_secs.unwrap_or(accepted / step.achieved);
    Some(sys::round2(cores * wall / accepted * 1e6))
}

const PEERS: [&str; 2] = ["nchan", "pushpin"];

/// One row of the main table: a figure of each system and push-server's ratios.
fn row<T>(
    md: &mut String,
    name: &str,
    results: &[PeerResult<T>],
    better: Better,
    get: impl Fn(&T) -> Option<f64>,
) {
    let _ = writeln!(
        md,
        "| {name} | {} | {} | {} | {} | {} |",
        cell(results, "push-server", &get),
        cell(results, PEERS[0], &get),
        cell(results, PEERS[1], &get),
        say(ratio(results, PEERS[0], &get), better),
        say(ratio(results, PEERS[1], &get), better),
    );
}

/// The markdown report.
pub fn markdown(report: &Report, args: &Args) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# push-server side by side with Nchan and Pushpin\n");
    let _ = writeln!(
        md,
        "Generated by `{}` on {} (commit `{}`, {}; load average {} before, {} after; {} minutes). \
         Ratios are push-server's figure over the peer's, from this one run.\n",
        report.command,
        report.date,
        report.commit,
        report.machine,
        report.load_average_before,
        report.load_average_after,
        report.minutes,
    );
    let _ = writeln!(
        md,
        "| scenario | push-server | Nchan | Pushpin | push-server ÷ Nchan | push-server ÷ Pushpin |\n|---|---|---|---|---|---|"
    );
    let kib = |r: &Idle| Some(r.kib_per_conn);
    if let Some(idle) = &report.idle {
        let name = format!(
            "idle RSS per SSE connection, {} conns, one process (KiB)",
            args.idle_conns
        );
        row(&mut md, &name, idle, Better::Lower, kib);
    }
    if let Some(scale) = &report.scale {
        let name = format!(
            "idle RSS per WebSocket connection, {} conns, several processes (KiB)",
            args.scale_conns
        );
        row(&mut md, &name, scale, Better::Lower, kib);
    }
    if let Some(accept) = &report.accept {
        let name = format!(
            "accept: SSE connections opened per second, burst of {}",
            args.accept_conns
        );
        row(&mut md, &name, accept, Better::Higher, |r| r.opened_per_sec);
        let p50 = "accept: connect latency p50 (ms)";
        row(&mut md, p50, accept, Better::Lower, |r| r.connect_p50_ms);
        let p99 = "accept: connect latency p99 (ms)";
        row(&mut md, p99, accept, Better::Lower, |r| r.connect_p99_ms);
        let failed = "accept: connections failed";
        row(&mut md, failed, accept, Better::NoRatio, |r| {
            Some(r.failed as f64)
        });
    }
    if let Some(push) = &report.push {
        push_rows(&mut md, push, args);
    }
    let _ = writeln!(
        md,
        "\nSustained: achieved ≥ 95 % of the target rate, no message lost (every publish answered 2xx, \
         every message received within 5 s of the step's end), latency p99 ≤ {} ms; latency is from the \
         scheduled send time in the payload to the subscriber's receipt.\n",
        args.push.p99_bound_ms
    );
    if let Some(push) = &report.push {
        push_steps(&mut md, push);
    }
    details(
        &mut md,
        "Idle memory, one process each (details)",
        &report.idle,
    );
    details(&mut md, "Idle memory at scale (details)", &report.scale);
    details(&mut md, "Accept rate (details)", &report.accept);
    md
}

/// The push rows of the main table.
fn push_rows(md: &mut String, push: &[PeerResult<Push>], args: &Args) {
    let name = format!(
        "push by user: highest sustained rate, msg/s ({} SSE subscribers, 32 keep-alive publishers)",
        args.push.subscribers
    );
    row(md, &name, push, Better::Higher, |r| {
        r.max_sustained_rate.map(f64::from)
    });
    let p50 = "push by user: latency p50 at that rate (ms)";
    row(md, p50, push, Better::Lower, |r| r.p50_ms_at_max);
    let p99 = "push by user: latency p99 at that rate (ms)";
    row(md, p99, push, Better::Lower, |r| r.p99_ms_at_max);
    // Same rate: push-server's p99 at each peer's highest sustained rate.
    let ratios = peers_push::ratios(push);
    let same: Vec<String> = PEERS
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
    // CPU the system used per message (bench and the rest of the machine left out), at the
    // highest rate each sustained; the ratio compares the same rate (the peer's).
    let per_msg = |peer: &str, rate: Option<u32>| -> Option<f64> {
        let r = crate::side::of(push, peer)?;
        let rate = rate.or(r.max_sustained_rate)?;
        cpu_us_per_msg(r.steps.iter().find(|s| s.rate == rate)?)
    };
    let cells: Vec<String> = ["push-server", PEERS[0], PEERS[1]]
        .iter()
        .map(|p| per_msg(p, None).map_or("–".into(), |x| format!("{x:.1}")))
        .collect();
    let ratios: Vec<String> = PEERS
        .iter()
        .map(|p| {
            let rate = crate::side::of(push, p).and_then(|r| r.max_sustained_rate);
            let r = per_msg("push-server", rate)
                .zip(per_msg(p, rate))
                .filter(|(_, b)| *b > 0.0)
                .map(|(a, b)| sys::round2(a / b));
            say(r, Better::Lower)
        })
        .collect();
    let _ = writeln!(
        md,
        "| push by user: CPU of the system per message at its highest sustained rate (µs; ratio at the peer's rate) | {} | {} | {} | {} | {} |",
        cells[0], cells[1], cells[2], ratios[0], ratios[1]
    );
}

/// Every push step of every system.
fn push_steps(md: &mut String, push: &[PeerResult<Push>]) {
    let _ = writeln!(md, "## Push by user, every step\n");
    let _ = writeln!(
        md,
        "| system | target/s | achieved/s | lost | p50 ms | p99 ms | max ms | publish p99 ms | CPU (cores) | sustained |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in push {
        let Some(p) = r.ran() else {
            let why = r.why().unwrap_or_default();
            let _ = writeln!(md, "| {} | {why} | | | | | | | | |", r.peer);
            continue;
        };
        for s in &p.steps {
            let cpu: Vec<String> = s
                .cpu_cores
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.peer,
                fmt_num(f64::from(s.rate)),
                fmt_num(s.achieved),
                s.lost,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.request_p99_ms,
                cpu.join(", "),
                if s.sustained { "yes" } else { "**no**" }
            );
        }
    }
    let _ = writeln!(md);
}

/// One line of JSON per system, without the long blobs (per-process maps, steps), which stay
/// in the JSON.
fn details<T: Serialize>(md: &mut String, title: &str, results: &Option<Vec<PeerResult<T>>>) {
    let Some(results) = results else { return };
    let _ = writeln!(md, "## {title}\n");
    for r in results {
        let mut v = serde_json::to_value(r).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("processes");
            o.remove("steps");
            o.remove("peer");
        }
        let _ = writeln!(md, "- **{}**: `{v}`", r.peer);
    }
    let _ = writeln!(md);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_renders_the_checked_in_report() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bench/compare.json");
        let text = std::fs::read_to_string(path).expect("docs/bench/compare.json");
        let report: Report = serde_json::from_str(&text).expect("reads");
        let push = report.push.as_ref().expect("push results");
        assert!(side_ran(push) >= 1, "{push:?}");
        let ours = crate::side::of(push, "push-server").expect("push-server ran");
        assert!(ours.max_sustained_rate.is_some() && !ours.steps.is_empty());
        let args = <Cli as clap::Parser>::parse_from(["compare"]).args;
        let md = markdown(&report, &args);
        assert!(
            md.contains("| idle RSS per SSE connection, 15000 conns"),
            "{md}"
        );
        assert!(md.contains("## Push by user, every step"), "{md}");
    }

    fn side_ran<T>(r: &[PeerResult<T>]) -> usize {
        r.iter().filter(|r| r.ran().is_some()).count()
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn scenarios_get_their_own_defaults_and_this_runs_sizes() {
        let args = <Cli as clap::Parser>::parse_from(["compare", "--peers", "nchan"]).args;
        let Ok(Command::PeersPush(push)) = scenario(&args, &["peers-push"]) else {
            panic!("peers-push parses");
        };
        // peers-push's own defaults (main.rs), not CommonArgs'.
        assert_eq!((push.common.sources, push.common.concurrency), (16, 64));
        assert!(push.common.json);
        assert_eq!(push.peers.peers, vec![crate::systems::Peer::Nchan]);
        let Ok(Command::IdleScale(scale)) =
            scenario(&args, &["idle-scale", "--conns", "30000", "--nodes", "2"])
        else {
            panic!("idle-scale parses");
        };
        assert_eq!((scale.conns, scale.nodes), (30_000, 2));
        assert_eq!(scale.common.transport, crate::hold::Transport::Ws);
    }

    #[test]
    fn numbers_read_as_in_the_docs() {
        assert_eq!(fmt_num(120000.0), "120,000");
        assert_eq!(fmt_num(1.49), "1.49");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(say(Some(0.5), Better::Lower), "×0.50 (2.0× less)");
    }
}
