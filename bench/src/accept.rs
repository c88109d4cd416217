//! `bench peers-accept`: accept rate side by side. Per system (push-server, Nchan,
//! Pushpin): start it, open a burst of M connections from a `bench hold` process with C
//! connects in flight over many source addresses, and report connections opened per second
//! (first attempt to last success) and the connect latency p50 / p99 / max (TCP connect to
//! open: push-server's `hello`, a peer's response head). The held connections are then
//! released and the system stopped.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hold::{Connected, Done, Transport};
use crate::side::{self, CommonArgs, PeerResult, PeersArg, Plan};
use crate::sys::round2;
use crate::systems;

/// Arguments of `bench peers-accept`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub peers: PeersArg,
    /// Connections in the burst (one client process: at most ~19,900).
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Nchan's worker processes.
    #[arg(long, default_value_t = 2)]
    pub nchan_workers: u32,
}

/// One system's accept figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Accept {
    /// Transport of the burst.
    pub transport: Option<Transport>,
    /// Connections in the burst.
    pub conns: usize,
    /// Connects in flight.
    pub concurrency: usize,
    /// Connections opened.
    pub opened: u64,
    /// Attempts failed.
    pub failed: u64,
    /// Error kind → count.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Opened ÷ (first attempt → last success).
    pub opened_per_sec: Option<f64>,
    /// Connect latency, ms.
    pub connect_p50_ms: Option<f64>,
    /// Connect latency, ms.
    pub connect_p99_ms: Option<f64>,
    /// Connect latency, ms.
    pub connect_max_ms: Option<f64>,
}

impl Accept {
    fn line(&self) -> String {
        format!(
            "{} opened ({} failed) at {}/s, connect p50 {} p99 {} max {} ms",
            self.opened,
            self.failed,
            self.opened_per_sec.unwrap_or(f64::NAN),
            self.connect_p50_ms.unwrap_or(f64::NAN),
            self.connect_p99_ms.unwrap_or(f64::NAN),
            self.connect_max_ms.unwrap_or(f64::NAN),
        )
    }
}

/// Runs the systems one after the other.
pub fn run(args: Args) -> anyhow::Result<()> {
    side::print(args.common.json, all(&args), |r| table(r))?;
    Ok(())
}

/// One result per system (skipped and failed included).
pub async fn all(args: &Args) -> anyhow::Result<Vec<PeerResult<Accept>>> {
    let c = &args.common;
    let plan = Plan {
        name: "peers-accept",
        common: c,
        peers: &args.peers.peers,
        conns_per_process: args.conns,
        budget: Duration::from_secs(150) + Duration::from_millis(10 * args.conns as u64),
        not_here: side::every,
        line: Accept::line,
    };
    side::each_peer(plan, |peer, server_bin| async move {
        let opts = systems::Options {
            nchan_workers: args.nchan_workers,
            ..systems::Options::new(server_bin, args.conns)
        };
        let running = systems::start(peer, &opts).await?;
        let budget = Duration::from_secs(60) + Duration::from_millis(10 * args.conns as u64);
        let hold_secs = budget.as_secs() + 60;
        let mut holder = running
            .holder(args.conns, c, c.concurrency, hold_secs, "")
            .spawn()?;
        let r: Connected = holder.next("connected", budget).await?;
        holder.finish::<Done>().await;
        drop(running);
        let ms = |us: u64| Some(round2(us as f64 / 1000.0));
        Ok(Accept {
            transport: Some(c.transport),
            conns: args.conns,
            concurrency: c.concurrency,
            opened: r.ok,
            failed: r.failed,
            errors: r.errors,
            opened_per_sec: Some(r.opened_per_sec.round()),
            connect_p50_ms: ms(r.connect_p50_us),
            connect_p99_ms: ms(r.connect_p99_us),
            connect_max_ms: ms(r.connect_max_us),
        })
    })
    .await
}

/// The human table.
pub fn table(results: &[PeerResult<Accept>]) -> String {
    "system        opened/s   failed   connect p50 ms   p99 ms\n".to_owned()
        + &side::rows(results, |r| {
            format!(
                "{:>8}   {:>6}   {:>14}   {:>6}",
                r.opened_per_sec.unwrap_or(f64::NAN),
                r.failed,
                r.connect_p50_ms.unwrap_or(f64::NAN),
                r.connect_p99_ms.unwrap_or(f64::NAN)
            )
        })
}
