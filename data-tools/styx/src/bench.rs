//! `styx bench`: scheduler throughput with the runner stubbed out at the runner trait, and
//! event-log replay time. Figures go to docs/BENCHMARKS.md.

use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{Duration as ChronoDuration, TimeZone, Utc};
use styx::engine::{Action, Engine, EngineConfig};
use styx::runner::StubRunner;
use styx::state::{Event, TriggerKind};
use styx::store::{SqliteStore, Storage, StoredEvent};
use styx::workflow::{InstanceKey, Workflow, WorkflowId};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Workflows that all trigger in one tick.
    #[arg(long, default_value_t = 10_000)]
    workflows: usize,
    /// Instances of one backfill.
    #[arg(long, default_value_t = 100_000)]
    backfill: usize,
    /// Backfill concurrency.
    #[arg(long, default_value_t = 1_000)]
    concurrency: u32,
    /// Events in the log for the replay measurement (filled up with synthetic runs).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Where the SQLite file goes (removed first).
    #[arg(long, default_value = "/tmp/styx-bench.db")]
    db: std::path::PathBuf,
}

fn workflow(component: &str, id: &str) -> Workflow {
    Workflow::from_yaml(
        "bench",
        &format!("component: {component}\nid: {id}\nschedule: hourly\ncommand: /bin/true\n"),
    )
    .expect("bench workflow parses")
}

/// Wall and on-CPU time of this thread since `start`. The machine the figures come from is
/// shared with other builds, so the wall time of a pass includes waiting for a core; the CPU
/// time (Linux `/proc/thread-self/schedstat`: nanoseconds this thread ran) does not.
struct Clock {
    wall: Instant,
    cpu_ns: u64,
}

fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Clock {
    fn start() -> Clock {
        Clock {
            wall: Instant::now(),
            cpu_ns: thread_cpu_ns(),
        }
    }

    /// (wall seconds, CPU seconds).
    fn elapsed(&self) -> (f64, f64) {
        (
            self.wall.elapsed().as_secs_f64(),
            thread_cpu_ns().saturating_sub(self.cpu_ns) as f64 / 1e9,
        )
    }
}

/// Ticks until nothing is active, running every launch through the stub runner.
fn drain(engine: &mut Engine, now: chrono::DateTime<Utc>, stub: &StubRunner) -> Result<()> {
    loop {
        engine.tick(now)?;
        let actions = engine.take_actions();
        if actions.is_empty() && engine.active_runs(None).is_empty() {
            return Ok(());
        }
        engine.batch(|e| -> Result<()> {
            for a in actions {
                if let Action::Launch(l) = a {
                    for ev in stub.outcome(&l) {
                        e.report(&l.key, &l.execution_id, ev, now)?;
                    }
                }
            }
            Ok(())
        })??;
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let _ = std::fs::remove_file(&args.db);
    let stub = StubRunner::default();
    let open = || -> Result<Engine> {
        let store = SqliteStore::open(&args.db).context("opening the bench database")?;
        Ok(Engine::open(
            Box::new(store),
            EngineConfig {
                seed: Some(1),
                ..EngineConfig::default()
            },
        )?)
    };
    let mut engine = open()?;
    let t0 = Utc.with_ymd_and_hms(2026, 11, 29, 14, 30, 0).unwrap();

    // 1. Many workflows, all due in the same tick.
    engine.batch(|e| -> Result<()> {
        for i in 0..args.workflows {
            e.put_workflow(workflow("bench", &format!("wf-{i:05}")), t0)?;
        }
        Ok(())
    })??;
    let clock = Clock::start();
    drain(&mut engine, t0 + ChronoDuration::hours(1), &stub)?;
    let (wall, cpu) = clock.elapsed();
    // Seven events per successful run: trigger, dequeue, submit, submitted, started,
    // terminate, success.
    let transitions = args.workflows * 7;
    println!(
        "natural triggers: {} workflows -> {} runs DONE, {} transitions in {:.2} s wall, {:.2} s CPU: {:.0} transitions/s of CPU",
        args.workflows, args.workflows, transitions, wall, cpu, transitions as f64 / cpu
    );

    // 2. One big backfill.
    engine.put_workflow(workflow("bench", "backfilled"), t0)?;
    let id = WorkflowId {
        component: "bench".into(),
        id: "backfilled".into(),
    };
    let first = t0 - ChronoDuration::hours(args.backfill as i64 + 10);
    let sched = "hourly"
        .parse::<styx::workflow::Schedule>()
        .map_err(anyhow::Error::msg)?;
    let first = sched.floor(first);
    let end = first + ChronoDuration::hours(args.backfill as i64);
    engine.create_backfill(
        &id,
        &sched.partition(first),
        &sched.partition(end),
        args.concurrency,
        false,
        t0,
    )?;
    let clock = Clock::start();
    drain(&mut engine, t0 + ChronoDuration::hours(1), &stub)?;
    let (wall, cpu) = clock.elapsed();
    let transitions = args.backfill * 7;
    println!(
        "backfill: {} instances (concurrency {}) DONE, {} transitions in {:.2} s wall, {:.2} s CPU: {:.0} instances/s, {:.0} transitions/s of CPU",
        args.backfill, args.concurrency, transitions, wall, cpu, args.backfill as f64 / cpu, transitions as f64 / cpu
    );
    drop(engine);

    // 3. Replay: fill the log up to the target with synthetic finished runs, then reopen.
    let mut store = SqliteStore::open(&args.db)?;
    let mut count = 0usize;
    store.replay(&mut |_: StoredEvent| count += 1)?;
    store.begin()?;
    let mut i = 0usize;
    while count < args.events {
        let key = InstanceKey {
            workflow: WorkflowId {
                component: "bench".into(),
                id: "filler".into(),
            },
            parameter: format!("p{i}"),
        };
        let events = [
            Event::TriggerExecution {
                trigger_kind: TriggerKind::Adhoc,
                trigger_id: "adhoc-bench".into(),
            },
            Event::Dequeue,
            Event::Submit {
                execution_id: format!("x{i}"),
            },
            Event::Submitted {
                execution_id: format!("x{i}"),
            },
            Event::Started,
            Event::Terminate { exit_code: 0 },
            Event::Success,
        ];
        for e in events.iter().take(args.events - count) {
            store.append(&key, t0, e, styx::state::State::Queued)?;
            count += 1;
        }
        i += 1;
    }
    store.commit()?;
    drop(store);
    let clock = Clock::start();
    let engine = open()?;
    let (wall, cpu) = clock.elapsed();
    println!(
        "replay: {count} events -> {} active runs in {:.2} s wall, {:.2} s CPU: {:.0} events/s of CPU",
        engine.active_runs(None).len(),
        wall,
        cpu,
        count as f64 / cpu
    );
    let _ = std::fs::remove_file(&args.db);
    Ok(())
}
