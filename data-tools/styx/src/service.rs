//! The driver: one task that ticks the [`Engine`], hands its actions to the [`Runner`] and
//! feeds the runner's reports back. The engine sits behind one `std::sync::Mutex`, never held
//! across an await; API handlers reach it through [`Handle`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::engine::{Action, Engine};
use crate::runner::{Report, Runner};

/// Where "now" comes from (tests pass a settable clock).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Shared access to the engine.
#[derive(Clone)]
pub struct Handle {
    engine: Arc<Mutex<Engine>>,
    wake: Arc<Notify>,
    clock: Clock,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Wraps an engine.
    pub fn new(engine: Engine, clock: Clock) -> Handle {
        Handle {
            engine: Arc::new(Mutex::new(engine)),
            wake: Arc::new(Notify::new()),
            clock,
        }
    }

    /// The current time by this handle's clock.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Runs `f` on the engine with the current time, then wakes the driver so that any
    /// action it queued (a launch after a manual retry, a kill after a halt) goes out now.
    pub fn with<R>(&self, f: impl FnOnce(&mut Engine, DateTime<Utc>) -> R) -> R {
        let now = self.now();
        let r = f(&mut self.lock(), now);
        self.wake.notify_one();
        r
    }

    /// Read access (no wake-up).
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        // A panic while holding the lock leaves the engine as the log has it: keep serving.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the driver: a tick every `tick`, reports applied as they come.
pub fn spawn(handle: Handle, runner: Arc<dyn Runner>, tick: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut reports = Vec::new();
            let ticked = tokio::select! {
                _ = interval.tick() => true,
                Some(r) = rx.recv() => { reports.push(r); false }
                // A request changed something (a trigger, a halt): schedule now, not at the
                // next tick.
                _ = handle.wake.notified() => true,
            };
            while let Ok(r) = rx.try_recv() {
                reports.push(r);
            }
            let actions = {
                let now = handle.now();
                let mut engine = handle.lock();
                let applied = engine.batch(|engine| {
                    for r in reports {
                        if let Err(e) = engine.report(&r.key, &r.execution_id, r.event, now) {
                            tracing::warn!(instance = %r.key, "runner report refused: {e}");
                        }
                    }
                });
                if let Err(e) = applied {
                    tracing::error!("event log: {e}");
                }
                if ticked {
                    if let Err(e) = engine.tick(now) {
                        tracing::error!("scheduler tick: {e}");
                    }
                }
                engine.take_actions()
            };
            for action in actions {
                match action {
                    Action::Launch(l) => runner.launch(*l, tx.clone()),
                    Action::Kill { key, execution_id } => {
                        tracing::info!(instance = %key, %execution_id, "killing execution");
                        runner.kill(&execution_id)
                    }
                }
            }
        }
    })
}
