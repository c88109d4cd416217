//! The side-by-side driver: the arguments every scenario shares ([`CommonArgs`]), one
//! result per system ([`PeerResult`]), and [`each_peer`], which runs a scenario on each
//! system in turn: checks the open-files limit, skips a system that is missing with a line
//! saying why, bounds each run by a budget, prints one line per system; then [`print()`]
//! writes the table (and the JSON).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hold::{Transport, SPARE_FDS};
use crate::sys;
use crate::systems::{self, Peer};

/// Arguments every idle and side-by-side scenario takes. Scenarios change the defaults of
/// `--transport`, `--sources` and `--concurrency` where they differ (see `main.rs`).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Transport of the client connections.
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// Client source addresses, 127.0.0.2 onwards (avoids ephemeral-port exhaustion).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=253))]
    pub sources: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// push-server binary. Default: `push-server` next to this `bench` binary.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Print the results as JSON on stdout (the human lines go to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The systems of a side-by-side scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct PeersArg {
    /// Systems to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "push-server,nchan,pushpin"
    )]
    pub peers: Vec<Peer>,
}

/// One system's result in a scenario, or why it has none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerResult<T> {
    /// `push-server`, `nchan` or `pushpin`.
    pub peer: String,
    /// Its figures, or why there are none.
    #[serde(flatten)]
    pub outcome: Outcome<T>,
}

/// What became of one system's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome<T> {
    /// Not run: missing here, or not meant for this scenario.
    Skipped {
        /// Why.
        skipped: String,
    },
    /// Failed, or did not finish within its budget.
    Failed {
        /// Why.
        error: String,
    },
    /// Ran: the figures.
    Ran(T),
}

impl<T> PeerResult<T> {
    /// The figures, if it ran.
    pub fn ran(&self) -> Option<&T> {
        match &self.outcome {
            Outcome::Ran(t) => Some(t),
            _ => None,
        }
    }

    /// Why it has no figures, if it has none.
    pub fn why(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Skipped { skipped } => Some(skipped),
            Outcome::Failed { error } => Some(error),
            Outcome::Ran(_) => None,
        }
    }

    /// A human line for it: `line` of the figures, or why there are none.
    pub fn line(&self, line: impl Fn(&T) -> String) -> String {
        match &self.outcome {
            Outcome::Skipped { skipped } => format!("{}: skipped: {skipped}", self.peer),
            Outcome::Failed { error } => format!("{}: failed: {error}", self.peer),
            Outcome::Ran(t) => format!("{}: {}", self.peer, line(t)),
        }
    }
}

/// The result of `peer` among `results`, if it ran.
pub fn of<'a, T>(results: &'a [PeerResult<T>], peer: &str) -> Option<&'a T> {
    results.iter().find(|r| r.peer == peer)?.ran()
}

/// Rows of a table: `row` of each system that ran, `(why)` for the others.
pub fn rows<T>(results: &[PeerResult<T>], row: impl Fn(&T) -> String) -> String {
    results
        .iter()
        .map(|r| match r.ran() {
            Some(t) => format!("{:<13}{}\n", r.peer, row(t)),
            None => format!("{:<13}({})\n", r.peer, r.why().unwrap_or_default()),
        })
        .collect()
}

/// How one scenario runs on each system.
pub struct Plan<'a, T> {
    /// The scenario's name, for the lines.
    pub name: &'a str,
    /// The client transport and the push-server binary.
    pub common: &'a CommonArgs,
    /// The systems, in order.
    pub peers: &'a [Peer],
    /// Connections one client process holds at most: checked against the open-files limit.
    pub conns_per_process: usize,
    /// Each system's run is stopped after this long, so that the others still run.
    pub budget: Duration,
    /// A system this scenario does not run, and why.
    pub not_here: fn(Peer) -> Option<&'static str>,
    /// The human line of a system's figures, printed when its run ends.
    pub line: fn(&T) -> String,
}

/// Runs `run(peer, server_bin)` on each system of `plan` in turn: one result each, skipped
/// and failed included.
pub async fn each_peer<T, F, Fut>(
    plan: Plan<'_, T>,
    mut run: F,
) -> anyhow::Result<Vec<PeerResult<T>>>
where
    F: FnMut(Peer, PathBuf) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    sys::check_files(
        plan.conns_per_process as u64 + SPARE_FDS,
        &format!("{} connections", plan.conns_per_process),
    )?;
    let server_bin = systems::server_bin(plan.common.server_bin.as_deref())?;
    let mut results = Vec::new();
    for &peer in plan.peers {
        eprintln!("== {}: {}", plan.name, peer.as_str());
        let why = systems::missing(peer, &server_bin)
            .or_else(|| (plan.not_here)(peer).map(str::to_owned));
        let outcome = match why {
            Some(skipped) => Outcome::Skipped { skipped },
            None => match tokio::time::timeout(plan.budget, run(peer, server_bin.clone())).await {
                Ok(Ok(t)) => Outcome::Ran(t),
                Ok(Err(e)) => Outcome::Failed {
                    error: format!("{e:#}"),
                },
                Err(_) => Outcome::Failed {
                    error: format!("did not finish within {:?}", plan.budget),
                },
            },
        };
        let result = PeerResult {
            peer: peer.as_str().to_owned(),
            outcome,
        };
        eprintln!("{}", result.line(plan.line));
        results.push(result);
    }
    Ok(results)
}

/// Runs a scenario until it ends or a signal arrives, then prints `table` of its result:
/// on stdout, or with `json` on stderr with the result as JSON on stdout.
pub fn print<R: Serialize>(
    json: bool,
    work: impl Future<Output = anyhow::Result<R>>,
    table: impl FnOnce(&R) -> String,
) -> anyhow::Result<R> {
    let result = crate::runtime(Some(2))?.block_on(crate::until_signal(work))?;
    emit(json, &result, &table(&result))?;
    Ok(result)
}

/// Prints a scenario's human `table`: on stdout, or with `json` on stderr with `result` as
/// JSON on stdout.
pub fn emit(json: bool, result: &impl Serialize, table: &str) -> anyhow::Result<()> {
    if json {
        eprint!("{table}");
        println!("{}", serde_json::to_string(result)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// A field of a report as it is, or its default when an older report wrote it in another
/// shape (`compare --from-json` reads reports of earlier runs).
pub fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

/// No system is left out beyond those missing here.
pub fn every(_: Peer) -> Option<&'static str> {
    None
}
