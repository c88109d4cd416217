//! Idle memory per connection, three ways, one measurement ([`measure`]):
//! - `bench idle-memory`: push-server alone, strict: every connection must open, and the
//!   server's `push_connections_open` gauge must show all of them before and after the
//!   settle;
//! - `bench peers-idle`: push-server, Nchan and Pushpin side by side, one server process
//!   each (Nchan with one worker, so that the figure is one worker's plus the master);
//! - `bench idle-scale`: 100,000 connections, which on this machine (20,000 open files per
//!   process) takes several push-server processes (`--nodes`, each its own node) or several
//!   Nchan workers (`listen … reuseport`), and several client processes.
//!
//! The measurement: start the servers ([`crate::systems`]), read their RSS
//! (`/proc/<pid>/status`), open the connections from `bench hold` processes (at most
//! [`PER_HOLDER`] each; push-server with tokens, the peers at `/sub/h<holder>u<i>`), let
//! them settle, read the RSS again. (after − before) ÷ connections held is the cost of one
//! idle connection. Every process started is stopped when the run ends, on error too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::hold::{Connected, Done, Transport, SPARE_FDS};
use crate::side::{self, CommonArgs, PeerResult, PeersArg, Plan};
use crate::sys;
use crate::systems::{self, Peer, Running};

/// Connections one hold process takes (below the 20,000 open files, with room to spare).
const PER_HOLDER: usize = 18_000;

/// How long push-server's gauge has to reach N once the hold processes report all connected.
const GAUGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `bench idle-memory`, `peers-idle` and `idle-scale`: the defaults here are
/// `peers-idle`'s; main.rs changes them for the other two (`idle-memory` runs push-server
/// alone, `idle-scale` 100,000 connections over several processes).
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub peers: PeersArg,
    /// Idle connections in all (one client process holds at most ~19,900; `idle-scale`
    /// spreads them over several).
    #[arg(long, default_value_t = 15_000)]
    pub conns: usize,
    /// push-server processes, each its own node (the peers run one).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Nchan's worker processes (`peers-idle`: one, so that the figure is one process's;
    /// DESIGN.md runs 2 for throughput).
    #[arg(long, default_value_t = 1)]
    pub nchan_workers: u32,
    /// Connection attempts in flight at once for Pushpin: a gentle ramp (DESIGN.md, Measuring).
    #[arg(long, default_value_t = 64)]
    pub pushpin_concurrency: usize,
    /// Seconds to wait after the connections are open before reading the RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Extra argument for push-server, repeatable, e.g. `--server-arg=--registry=redis://127.0.0.1:6379`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

/// One system's idle memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Idle {
    /// Transport of the connections.
    pub transport: Option<Transport>,
    /// Connections asked for.
    pub attempted: usize,
    /// Connections open when the RSS was read (closes are counted until the holders stop,
    /// after that reading, so this is a lower bound; idle-memory checks the server's gauge).
    pub held: u64,
    /// Connections that did not open.
    pub failed: u64,
    /// Why, error kind → count, per hold process.
    #[serde(deserialize_with = "side::lenient")]
    pub errors: Vec<BTreeMap<String, u64>>,
    /// Closed by the server while held.
    pub closed_during_hold: u64,
    /// Heartbeats the clients saw (with a settle above the heartbeat interval, every
    /// connection has had one).
    pub heartbeats_seen: u64,
    /// push-server's heartbeat interval.
    pub heartbeat_interval: Option<String>,
    /// Server processes measured.
    pub server_processes: usize,
    /// The servers' own count while held: push-server's gauges summed, Nchan's stub status.
    pub server_count: Option<ServerCount>,
    /// Per process: memory before and after.
    #[serde(deserialize_with = "side::lenient")]
    pub processes: BTreeMap<String, ProcessMemory>,
    /// RSS of the server processes together, before the clients.
    pub rss_before_kib: u64,
    /// RSS of the server processes together, after the settle.
    pub rss_after_kib: u64,
    /// The figure: RSS growth ÷ connections held.
    pub kib_per_conn: f64,
    /// Anonymous memory (heap, stacks) growth ÷ connections held.
    pub anon_kib_per_conn: f64,
    /// RSS of the hold processes together.
    pub hold_rss_kib: Option<u64>,
    /// The clients' RSS ÷ connections opened.
    pub hold_kib_per_conn: Option<f64>,
    /// Until every connection opened or failed.
    pub connect_secs: Option<f64>,
    /// Connects in flight per hold process.
    pub concurrency: usize,
    /// What was changed from the system's defaults.
    pub config: String,
    /// push-server's KiB per connection over this peer's (peers-idle).
    pub push_server_over_peer: Option<f64>,
}

impl Idle {
    /// The human line.
    pub fn line(&self) -> String {
        format!(
            "{} held ({} failed) over {} process(es), RSS {} -> {} KiB = {:.2} KiB/conn \
             (anon {:.2}); clients {} KiB; heartbeats seen {}; server count {}",
            self.held,
            self.failed,
            self.server_processes,
            self.rss_before_kib,
            self.rss_after_kib,
            self.kib_per_conn,
            self.anon_kib_per_conn,
            self.hold_rss_kib.unwrap_or_default(),
            self.heartbeats_seen,
            count_text(&self.server_count),
        )
    }
}

/// The servers' own count of open connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerCount {
    /// push-server: its `push_connections_open` gauges summed.
    Gauge(f64),
    /// Nchan: its stub status page.
    Status(String),
}

/// A count as JSON (`null` when the system has none), for the human lines.
fn count_text(count: &Option<ServerCount>) -> String {
    serde_json::to_string(count).unwrap_or_default()
}

/// One server process's memory in an idle run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessMemory {
    /// Before the clients connected.
    pub before: sys::Memory,
    /// After the settle.
    pub after: sys::Memory,
    /// Its RSS growth ÷ connections held.
    pub kib_per_conn: f64,
}

/// `bench idle-memory`: `peers-idle` with push-server alone (strict), one line of result.
pub fn run_memory(mut args: IdleArgs) -> anyhow::Result<()> {
    let transport = args.common.transport;
    args.peers.peers = vec![Peer::PushServer];
    let one = async {
        if args.conns == 0 {
            bail!("--conns must be at least 1");
        }
        let result = peers(&args).await?.pop().context("no result")?;
        match result.outcome {
            side::Outcome::Ran(idle) => Ok(idle),
            _ => bail!("{}", result.why().unwrap_or_default()),
        }
    };
    side::print(args.common.json, one, |r| {
        format!("idle-memory {}: {}\n", transport.as_str(), r.line())
    })?;
    Ok(())
}

/// `bench peers-idle`.
pub fn run_peers(args: IdleArgs) -> anyhow::Result<()> {
    side::print(args.common.json, peers(&args), |r| peers_table(r))?;
    Ok(())
}

/// `bench idle-scale`.
pub fn run_scale(args: IdleArgs) -> anyhow::Result<()> {
    side::print(args.common.json, scale(&args), |r| scale_table(r))?;
    Ok(())
}

/// Every system of `peers-idle`, with `push_server_over_peer` set on the peers.
pub async fn peers(args: &IdleArgs) -> anyhow::Result<Vec<PeerResult<Idle>>> {
    let c = &args.common;
    let plan = Plan {
        name: "peers-idle",
        common: c,
        peers: &args.peers.peers,
        conns_per_process: args.conns,
        // Connects at the slowest ramp, settle, start and stop.
        budget: Duration::from_secs(180 + args.settle_secs)
            + Duration::from_millis(20 * args.conns as u64),
        not_here: side::every,
        line: Idle::line,
    };
    let mut results = side::each_peer(plan, |peer, server_bin| {
        measure(args, peer, server_bin, peer == Peer::PushServer)
    })
    .await?;
    let ours = side::of(&results, "push-server").map(|r| r.kib_per_conn);
    for r in &mut results {
        if let (Some(ours), side::Outcome::Ran(theirs)) = (ours, &mut r.outcome) {
            if r.peer != "push-server" && theirs.kib_per_conn > 0.0 {
                theirs.push_server_over_peer = Some(sys::round2(ours / theirs.kib_per_conn));
            }
        }
    }
    Ok(results)
}

/// Every system of `idle-scale`.
pub async fn scale(args: &IdleArgs) -> anyhow::Result<Vec<PeerResult<Idle>>> {
    if args.nodes == 0 || args.conns < args.nodes {
        bail!("--nodes must be at least 1 and --conns at least --nodes");
    }
    let c = &args.common;
    let plan = Plan {
        name: "idle-scale",
        common: c,
        peers: &args.peers.peers,
        conns_per_process: PER_HOLDER.min(args.conns),
        budget: Duration::from_secs(240 + args.settle_secs)
            + Duration::from_millis(2 * args.conns as u64),
        not_here: |peer| {
            (peer == Peer::Pushpin)
                .then_some("not run at this scale (about 44 KiB per connection at 15k: peers-idle)")
        },
        line: Idle::line,
    };
    side::each_peer(plan, |peer, server_bin| {
        measure(args, peer, server_bin, false)
    })
    .await
}

/// Starts the servers, holds the connections from `bench hold` processes, reads the memory
/// before and after. `strict`: fail unless every connection opens and push-server's gauge
/// shows them all.
async fn measure(
    s: &IdleArgs,
    peer: Peer,
    server_bin: PathBuf,
    strict: bool,
) -> anyhow::Result<Idle> {
    let c = &s.common;
    // The peers' gentle ramp (DESIGN.md, Measuring).
    let concurrency = match peer {
        Peer::Pushpin => s.pushpin_concurrency,
        _ => c.concurrency,
    };
    // The servers, and for each the share of connections its hold processes open.
    let nodes = if peer == Peer::PushServer { s.nodes } else { 1 };
    let per_node = s.conns.div_ceil(nodes);
    let mut servers: Vec<(Running, usize)> = Vec::new();
    for n in 0..nodes {
        let mut server_args = s.server_args.clone();
        if nodes > 1 {
            server_args.push(format!("--node-id=n{n}"));
        }
        let opts = systems::Options {
            nchan_workers: s.nchan_workers,
            server_args,
            ..systems::Options::new(server_bin.clone(), per_node)
        };
        let running = systems::start(peer, &opts).await?;
        if peer == Peer::PushServer {
            let limit = sys::nofile_limit_of(running.procs[0].1)?;
            if per_node as u64 + SPARE_FDS > limit {
                bail!("push-server may open only {limit} files; {per_node} connections need more: use more --nodes");
            }
        }
        servers.push((running, per_node.min(s.conns.saturating_sub(n * per_node))));
    }
    let procs: Vec<(String, u32)> = servers.iter().flat_map(|(r, _)| r.procs.clone()).collect();
    // A moment first, so that start-up allocations are done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sys::memories(&procs);

    // The hold processes, all at once.
    let budget =
        Duration::from_secs(60) + Duration::from_millis(15 * PER_HOLDER.min(s.conns) as u64);
    let hold_secs = budget.as_secs() + GAUGE_TIMEOUT.as_secs() + s.settle_secs + 120;
    eprintln!(
        "opening {} {} connections from {} source addresses ({} in flight per client process)",
        s.conns,
        c.transport.as_str(),
        c.sources,
        concurrency
    );
    let mut holders = Vec::new();
    for (running, share) in &servers {
        let count = share.div_ceil(PER_HOLDER);
        for h in 0..count {
            let conns = share / count + usize::from(h < share % count);
            let prefix = format!("h{}", holders.len());
            let holder = running.holder(conns, c, concurrency, hold_secs, &prefix);
            holders.push(holder.spawn()?);
        }
    }
    let started = Instant::now();
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for h in &mut holders {
        let r: Connected = h.next("connected", budget).await?;
        ok += r.ok;
        failed += r.failed;
        if r.failed > 0 {
            errors.push(r.errors);
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!("{ok} connected, {failed} failed in {connect_secs:.1} s");
    if ok == 0 || (strict && (failed > 0 || ok != s.conns as u64)) {
        bail!("{failed} of {} connections failed: {errors:?}", s.conns);
    }

    // push-server's own count must show every connection (strict), then the settle.
    if strict {
        let deadline = Instant::now() + GAUGE_TIMEOUT;
        loop {
            let open = server_count(peer, c.transport, &servers).await?;
            if open == Some(ServerCount::Gauge(s.conns as f64)) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the server counts {} open connections, not {}, {GAUGE_TIMEOUT:?} after the clients connected",
                    count_text(&open),
                    s.conns
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(s.settle_secs)).await;
    let after = sys::memories(&procs);
    let hold_rss: u64 = holders
        .iter()
        .filter_map(|h| sys::memory(h.pid).ok())
        .map(|m| m.rss_kib)
        .sum();
    let counted = server_count(peer, c.transport, &servers).await?;
    if strict && counted != Some(ServerCount::Gauge(s.conns as f64)) {
        bail!(
            "connections dropped while settling: the server counts {}, not {}",
            count_text(&counted),
            s.conns
        );
    }
    let (mut closed, mut heartbeats) = (0, 0);
    for h in holders {
        if let Some(d) = h.finish::<Done>().await {
            closed += d.closed_during_hold;
            heartbeats += d.heartbeats_seen;
        }
    }
    let held = if strict {
        s.conns as u64
    } else {
        ok.saturating_sub(closed)
    };

    let n = held.max(1) as f64;
    let mut processes = BTreeMap::new();
    let (mut rss, mut anon) = ((0, 0), (0, 0));
    for (label, pid, b) in &before {
        let Some((_, _, a)) = after.iter().find(|(_, p, _)| p == pid) else {
            bail!("{label} (pid {pid}) exited during the run");
        };
        rss = (rss.0 + b.rss_kib, rss.1 + a.rss_kib);
        anon = (anon.0 + b.anon_kib, anon.1 + a.anon_kib);
        processes.insert(
            format!("{label} ({pid})"),
            ProcessMemory {
                before: *b,
                after: *a,
                kib_per_conn: sys::round2((a.rss_kib as f64 - b.rss_kib as f64) / n),
            },
        );
    }
    let per_conn = |(b, a): (u64, u64)| sys::round2((a as f64 - b as f64) / n);
    Ok(Idle {
        transport: Some(c.transport),
        attempted: s.conns,
        held,
        failed,
        errors,
        closed_during_hold: closed,
        heartbeats_seen: heartbeats,
        heartbeat_interval: (peer == Peer::PushServer).then(|| "30s".into()),
        server_processes: procs.len(),
        server_count: counted,
        processes,
        rss_before_kib: rss.0,
        rss_after_kib: rss.1,
        kib_per_conn: per_conn(rss),
        anon_kib_per_conn: per_conn(anon),
        hold_rss_kib: Some(hold_rss),
        hold_kib_per_conn: Some(sys::round2(hold_rss as f64 / ok.max(1) as f64)),
        connect_secs: Some(sys::round2(connect_secs)),
        concurrency,
        config: servers[0].0.config.clone(),
        push_server_over_peer: None,
    })
}

/// The servers' own count of open connections: push-server's `push_connections_open` gauges
/// summed over the nodes, Nchan's stub status, nothing from Pushpin.
async fn server_count(
    peer: Peer,
    transport: Transport,
    servers: &[(Running, usize)],
) -> anyhow::Result<Option<ServerCount>> {
    match peer {
        Peer::PushServer => {
            let mut sum = 0.0;
            for (r, _) in servers {
                let (status, body) = sys::http_get(r.publish, "/metrics").await?;
                if status != 200 {
                    bail!("/metrics answered {status}");
                }
                let series = format!(
                    "push_connections_open{{transport=\"{}\"}}",
                    transport.as_str()
                );
                sum += sys::metric_sum(&body, &series);
            }
            Ok(Some(ServerCount::Gauge(sum)))
        }
        Peer::Nchan => {
            let (_, body) = sys::http_get(servers[0].0.addr, "/nchan_status").await?;
            Ok(Some(ServerCount::Status(body.trim().to_owned())))
        }
        Peer::Pushpin => Ok(None),
    }
}

/// The human table of `peers-idle`.
pub fn peers_table(results: &[PeerResult<Idle>]) -> String {
    "peer         held    total RSS before -> after KiB   KiB/conn   push-server ÷ peer\n"
        .to_owned()
        + &side::rows(results, |r| {
            format!(
                "{:>6}   {:>10} -> {:<10}          {:>8.2}   {}",
                r.held,
                r.rss_before_kib,
                r.rss_after_kib,
                r.kib_per_conn,
                r.push_server_over_peer
                    .map_or(String::new(), |x| format!("{x:.2}"))
            )
        })
}

/// The human table of `idle-scale`.
pub fn scale_table(results: &[PeerResult<Idle>]) -> String {
    "system       held     processes   KiB/conn\n".to_owned()
        + &side::rows(results, |r| {
            format!(
                "{:>7}   {:>9}   {:>8}",
                r.held, r.server_processes, r.kib_per_conn
            )
        })
}
