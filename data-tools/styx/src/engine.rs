//! The scheduler's core: workflows, active runs, resources and backfills, moved only by
//! [`Engine::apply`] (one event: transition, append to the log, follow-ups) and
//! [`Engine::tick`] (natural triggers, backfills, timeouts, dequeue). Time is passed in, so
//! tests drive it with a made-up clock. What the outside world must do (start or kill an
//! execution) is queued as [`Action`]s that the driver (`service`) hands to the runner.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::metrics as m;
use crate::retry::RetryPolicy;
use crate::state::{transition, Event, IllegalTransition, RunState, State, TriggerKind};
use crate::store::{Backfill, Storage, StoreError, StoredEvent, StoredWorkflow};
use crate::workflow::{CatchUp, InstanceKey, Workflow, WorkflowId};

/// Why a request to the engine was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such workflow.
    #[error("unknown workflow {0}")]
    UnknownWorkflow(WorkflowId),
    /// No such backfill.
    #[error("unknown backfill {0}")]
    UnknownBackfill(String),
    /// The instance has no active run (for retry, halt).
    #[error("{0} has no active run")]
    NotActive(InstanceKey),
    /// The instance already has an active run (for trigger).
    #[error("{0} already has an active run")]
    AlreadyActive(InstanceKey),
    /// A bad parameter, range or value.
    #[error("{0}")]
    Invalid(String),
    /// The event does not fit the run's state.
    #[error("{key}: {source}")]
    Illegal {
        /// The instance.
        key: InstanceKey,
        /// The refused transition.
        source: IllegalTransition,
    },
    /// The event log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Something the driver must do outside the engine.
#[derive(Debug, Clone)]
pub enum Action {
    /// Start an execution (boxed: it carries the workflow, the kill a few strings).
    Launch(Box<Launch>),
    /// Kill an execution (halted or timed out).
    Kill {
        /// The instance.
        key: InstanceKey,
        /// The execution to kill.
        execution_id: String,
    },
}

/// One execution to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The instance.
    pub key: InstanceKey,
    /// This try's ID (reports about other IDs are ignored).
    pub execution_id: String,
    /// The trigger ID (natural, backfill or ad hoc).
    pub trigger_id: String,
    /// The workflow as it is now.
    pub workflow: Workflow,
}

/// Limits of the engine itself.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Seed of the retry backoff and ID RNG (`None`: from the OS).
    pub seed: Option<u64>,
    /// How long a run may stay `SUBMITTING` or `SUBMITTED` before `timeout`: 10 minutes, as
    /// Styx, is long for a local process but covers pulling an image on Kubernetes.
    pub submit_timeout: Duration,
    /// Cap on natural triggers one workflow gets per tick: a minutely cron after a month of
    /// downtime would otherwise queue 43,200 runs in one lock hold; the rest follow next tick.
    pub max_catch_up_per_tick: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            seed: None,
            submit_timeout: Duration::from_secs(600),
            max_catch_up_per_tick: 1000,
        }
    }
}

/// A backfill with its live counts, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillStatus {
    /// The stored backfill.
    #[serde(flatten)]
    pub backfill: Backfill,
    /// Its runs active now.
    pub active: usize,
}

/// An active run, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveRun {
    /// `component/workflow/parameter`.
    pub workflow_instance: String,
    /// The run.
    #[serde(flatten)]
    pub run: RunState,
}

/// The scheduler's state. Not thread-safe by itself: the driver holds it under one lock.
pub struct Engine {
    store: Box<dyn Storage>,
    config: EngineConfig,
    workflows: BTreeMap<WorkflowId, StoredWorkflow>,
    active: BTreeMap<InstanceKey, RunState>,
    resources: BTreeMap<String, u32>,
    /// Slots in use per resource, and which resources each run holds (a workflow edited
    /// mid-run gives back what its run took, not what it names now).
    usage: HashMap<String, u32>,
    held: HashMap<InstanceKey, Vec<String>>,
    backfills: BTreeMap<String, Backfill>,
    rng: StdRng,
    outbox: Vec<Action>,
    per_state: HashMap<State, i64>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workflows", &self.workflows.len())
            .field("active", &self.active.len())
            .finish_non_exhaustive()
    }
}

fn policy_of(workflows: &BTreeMap<WorkflowId, StoredWorkflow>, id: &WorkflowId) -> RetryPolicy {
    workflows
        .get(id)
        .map(|w| w.workflow.retry.clone())
        .unwrap_or_default()
}

impl Engine {
    /// Loads workflows, resources and backfills, and rebuilds every active run by replaying
    /// the event log.
    pub fn open(store: Box<dyn Storage>, config: EngineConfig) -> Result<Engine, EngineError> {
        let rng = match config.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let mut e = Engine {
            workflows: store
                .workflows()?
                .into_iter()
                .map(|w| (w.workflow.key(), w))
                .collect(),
            resources: store.resources()?.into_iter().collect(),
            backfills: store
                .backfills()?
                .into_iter()
                .map(|b| (b.id.clone(), b))
                .collect(),
            store,
            config,
            active: BTreeMap::new(),
            usage: HashMap::new(),
            held: HashMap::new(),
            rng,
            outbox: Vec::new(),
            per_state: HashMap::new(),
        };
        let replayed = replay(&*e.store, &e.workflows)?;
        for (key, run) in replayed {
            e.count_state(None, Some(run.state));
            if run.state.holds_resources() {
                e.take_resources(&key);
            }
            e.active.insert(key, run);
        }
        Ok(e)
    }

    /// After a restart: executions of the previous process are gone (the local runner's
    /// sandboxes die with it), so runs that were submitted or running get `runError` and go
    /// through the retry policy; runs between decisions get their decision; runs in
    /// `PREPARE` are submitted again. Queued runs wait as before.
    pub fn recover(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        let keys: Vec<(InstanceKey, State)> = self
            .active
            .iter()
            .map(|(k, r)| (k.clone(), r.state))
            .collect();
        self.store.begin()?;
        for (key, state) in keys {
            match state {
                State::Submitting | State::Submitted | State::Running => {
                    let message = "execution lost: the scheduler restarted".to_string();
                    self.apply(&key, Event::RunError { message }, now)?;
                }
                State::Terminated | State::Failed => self.follow_up(&key, now)?,
                State::Prepare => self.submit(&key, now)?,
                _ => {}
            }
        }
        self.store.commit()?;
        Ok(())
    }

    /// Applies one event to an instance: transition, log, metrics, follow-ups (a decided
    /// exit, a submit after dequeue, a kill after halt or timeout).
    pub fn apply(
        &mut self,
        key: &InstanceKey,
        event: Event,
        now: DateTime<Utc>,
    ) -> Result<RunState, EngineError> {
        let current = match self.active.get(key) {
            Some(r) => r.clone(),
            None => RunState::fresh(now),
        };
        let policy = policy_of(&self.workflows, &key.workflow);
        let next =
            transition(&current, &event, now, &policy).map_err(|source| EngineError::Illegal {
                key: key.clone(),
                source,
            })?;
        self.store.append(key, now, &event, next.state)?;
        metrics::counter!(m::TRANSITIONS, "event" => event.name()).increment(1);
        tracing::info!(
            component = %key.workflow.component, workflow = %key.workflow.id, parameter = %key.parameter,
            execution_id = next.execution_id.as_deref().unwrap_or(""), event = event.name(), state = %next.state,
            "transition"
        );
        self.observe(&current, &event, now);
        let had_execution = matches!(
            current.state,
            State::Submitting | State::Submitted | State::Running
        );
        if matches!(event, Event::Halt | Event::Timeout) && had_execution {
            if let Some(execution_id) = current.execution_id.clone() {
                self.outbox.push(Action::Kill {
                    key: key.clone(),
                    execution_id,
                });
            }
        }
        if current.state.holds_resources() && !next.state.holds_resources() {
            self.give_back_resources(key);
        } else if !current.state.holds_resources() && next.state.holds_resources() {
            self.take_resources(key);
        }
        let was_active = self.active.contains_key(key);
        self.count_state(
            was_active.then_some(current.state),
            (!next.state.is_terminal()).then_some(next.state),
        );
        if next.state.is_terminal() {
            self.active.remove(key);
        } else {
            self.active.insert(key.clone(), next.clone());
        }
        match next.state {
            State::Terminated | State::Failed => self.follow_up(key, now)?,
            State::Prepare => self.submit(key, now)?,
            _ => {}
        }
        Ok(self.active.get(key).cloned().unwrap_or(next))
    }

    fn observe(&self, before: &RunState, event: &Event, now: DateTime<Utc>) {
        let secs = |since: DateTime<Utc>| (now - since).num_milliseconds().max(0) as f64 / 1000.0;
        match event {
            Event::Dequeue => metrics::histogram!(m::QUEUE_WAIT).record(secs(before.since)),
            Event::Terminate { exit_code } => {
                metrics::histogram!(m::RUN_DURATION).record(secs(before.since));
                if *exit_code != 0 {
                    metrics::counter!(m::FAILURES, "exit_code" => exit_code.to_string())
                        .increment(1);
                }
            }
            Event::RunError { .. } => {
                metrics::counter!(m::FAILURES, "exit_code" => "run_error").increment(1)
            }
            Event::Timeout => metrics::counter!(m::FAILURES, "exit_code" => "timeout").increment(1),
            _ => {}
        }
    }

    fn count_state(&mut self, from: Option<State>, to: Option<State>) {
        if from == to {
            return;
        }
        if let Some(s) = from {
            let n = self.per_state.entry(s).or_default();
            *n -= 1;
            metrics::gauge!(m::RUNS, "state" => s.as_str()).set(*n as f64);
        }
        if let Some(s) = to {
            let n = self.per_state.entry(s).or_default();
            *n += 1;
            metrics::gauge!(m::RUNS, "state" => s.as_str()).set(*n as f64);
        }
    }

    fn take_resources(&mut self, key: &InstanceKey) {
        let names = self
            .workflows
            .get(&key.workflow)
            .map(|w| w.workflow.resources.clone())
            .unwrap_or_default();
        for r in &names {
            *self.usage.entry(r.clone()).or_default() += 1;
        }
        self.held.insert(key.clone(), names);
    }

    fn give_back_resources(&mut self, key: &InstanceKey) {
        for r in self.held.remove(key).unwrap_or_default() {
            if let Some(n) = self.usage.get_mut(&r) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// The retry policy's decision for a run that just ended a try.
    fn follow_up(&mut self, key: &InstanceKey, now: DateTime<Utc>) -> Result<(), EngineError> {
        let Some(run) = self.active.get(key).cloned() else {
            return Ok(());
        };
        let policy = policy_of(&self.workflows, &key.workflow);
        if let Some(event) = policy.decide(&run, &mut self.rng) {
            self.apply(key, event, now)?;
        }
        Ok(())
    }

    fn submit(&mut self, key: &InstanceKey, now: DateTime<Utc>) -> Result<(), EngineError> {
        let Some(wf) = self
            .workflows
            .get(&key.workflow)
            .map(|w| w.workflow.clone())
        else {
            let message = format!("workflow {} was deleted", key.workflow);
            self.apply(key, Event::RunError { message }, now)?;
            return Ok(());
        };
        let execution_id = format!("styx-run-{:016x}", self.rng.random::<u64>());
        let run = self.apply(
            key,
            Event::Submit {
                execution_id: execution_id.clone(),
            },
            now,
        )?;
        self.outbox.push(Action::Launch(Box::new(Launch {
            key: key.clone(),
            execution_id,
            trigger_id: run.trigger_id.clone().unwrap_or_default(),
            workflow: wf,
        })));
        Ok(())
    }

    /// A runner's report about one execution. Reports about an execution that is no longer
    /// the run's current one (halted, timed out, retried) are dropped: the run moved on.
    pub fn report(
        &mut self,
        key: &InstanceKey,
        execution_id: &str,
        event: Event,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        // Only a run with a live execution takes reports: after its exit was decided (or it
        // was halted, or timed out) late news of the same execution changes nothing.
        let live = self
            .active
            .get(key)
            .filter(|r| {
                matches!(
                    r.state,
                    State::Submitting | State::Submitted | State::Running
                )
            })
            .and_then(|r| r.execution_id.as_deref());
        if live != Some(execution_id) {
            tracing::debug!(instance = %key, execution_id, event = event.name(), "stale runner report dropped");
            return Ok(());
        }
        self.apply(key, event, now).map(|_| ())
    }

    /// Runs `f` as one batch of writes (one commit): the driver applies a burst of runner
    /// reports this way.
    pub fn batch<R>(&mut self, f: impl FnOnce(&mut Engine) -> R) -> Result<R, EngineError> {
        self.store.begin()?;
        let r = f(self);
        self.store.commit()?;
        Ok(r)
    }

    /// Takes the actions queued since the last call.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    /// One scheduling pass: natural triggers, backfills, timeouts, dequeues. All its writes
    /// are one transaction: a crash leaves either all of a pass or none of it.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        self.store.begin()?;
        let result = self.tick_inner(now);
        // Commit what was applied even on error: the log and memory must agree.
        self.store.commit()?;
        result
    }

    fn tick_inner(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        self.natural_triggers(now)?;
        self.progress_backfills(now)?;
        self.timeouts(now)?;
        self.dequeue(now)
    }

    fn natural_triggers(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        let ids: Vec<WorkflowId> = self.workflows.keys().cloned().collect();
        for id in ids {
            let sw = &self.workflows[&id];
            if !sw.workflow.enabled {
                continue;
            }
            let Some(mut p) = sw.next_natural else {
                continue;
            };
            let mut due = Vec::new();
            while sw.workflow.trigger_time(p) <= now
                && due.len() < self.config.max_catch_up_per_tick
            {
                due.push(p);
                p = sw.workflow.schedule.next(p);
            }
            if due.is_empty() {
                continue;
            }
            if sw.workflow.catch_up == CatchUp::Latest {
                // Skip straight to the newest due period.
                while sw.workflow.trigger_time(p) <= now {
                    due.push(p);
                    p = sw.workflow.schedule.next(p);
                }
                due = due.split_off(due.len() - 1);
            }
            let schedule = sw.workflow.schedule.clone();
            for start in due {
                let key = InstanceKey {
                    workflow: id.clone(),
                    parameter: schedule.partition(start),
                };
                if self.active.contains_key(&key) {
                    tracing::info!(instance = %key, "natural trigger skipped: instance already active");
                    continue;
                }
                let event = Event::TriggerExecution {
                    trigger_kind: TriggerKind::Natural,
                    trigger_id: "natural-trigger".into(),
                };
                self.apply(&key, event, now)?;
            }
            let sw = self.workflows.get_mut(&id).expect("listed above");
            sw.next_natural = Some(p);
            self.store.put_workflow(sw)?;
        }
        Ok(())
    }

    fn backfill_active(&self, id: &str) -> usize {
        self.active
            .values()
            .filter(|r| {
                r.trigger_kind == Some(TriggerKind::Backfill) && r.trigger_id.as_deref() == Some(id)
            })
            .count()
    }

    fn progress_backfills(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        let ids: Vec<String> = self
            .backfills
            .values()
            .filter(|b| !b.halted && !b.all_triggered)
            .map(|b| b.id.clone())
            .collect();
        for id in ids {
            let mut room = (self.backfills[&id].concurrency as usize)
                .saturating_sub(self.backfill_active(&id));
            let mut b = self.backfills[&id].clone();
            let Some(sched) = self
                .workflows
                .get(&b.workflow)
                .map(|w| w.workflow.schedule.clone())
            else {
                continue;
            };
            while room > 0 {
                let Some(p) = b.next_trigger else { break };
                let key = InstanceKey {
                    workflow: b.workflow.clone(),
                    parameter: sched.partition(p),
                };
                if !self.active.contains_key(&key) {
                    let event = Event::TriggerExecution {
                        trigger_kind: TriggerKind::Backfill,
                        trigger_id: b.id.clone(),
                    };
                    self.apply(&key, event, now)?;
                    room -= 1;
                } else {
                    tracing::info!(instance = %key, backfill = %b.id, "backfill skips an instance that is already active");
                }
                b.next_trigger = step(&sched, &b, p);
            }
            if b.next_trigger.is_none() {
                b.all_triggered = true;
            }
            if b != self.backfills[&id] {
                self.store.put_backfill(&b)?;
                self.backfills.insert(id, b);
            }
        }
        Ok(())
    }

    fn timeout_of(&self, key: &InstanceKey, state: State) -> Option<Duration> {
        match state {
            State::Submitting | State::Submitted => Some(self.config.submit_timeout),
            State::Running => Some(
                self.workflows
                    .get(&key.workflow)
                    .map_or(Duration::from_secs(86_400), |w| w.workflow.running_timeout),
            ),
            _ => None,
        }
    }

    fn timeouts(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        let expired: Vec<InstanceKey> = self
            .active
            .iter()
            .filter(|(k, r)| {
                self.timeout_of(k, r.state).is_some_and(|t| {
                    now - r.since >= ChronoDuration::from_std(t).unwrap_or(ChronoDuration::MAX)
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.apply(&key, Event::Timeout, now)?;
        }
        Ok(())
    }

    fn dequeue(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        // Oldest first, so a long queue drains in trigger order.
        let mut ready: Vec<(DateTime<Utc>, InstanceKey)> = self
            .active
            .iter()
            .filter(|(_, r)| r.state == State::Queued)
            .filter(|(_, r)| {
                let delay = ChronoDuration::milliseconds(r.retry_delay_millis.unwrap_or(0) as i64);
                r.since + delay <= now
            })
            .map(|(k, r)| (r.since, k.clone()))
            .collect();
        ready.sort();
        for (_, key) in ready {
            let needs = self
                .workflows
                .get(&key.workflow)
                .map(|w| w.workflow.resources.clone())
                .unwrap_or_default();
            let full: Vec<&String> = needs
                .iter()
                .filter(|r| {
                    self.resources
                        .get(*r)
                        .is_some_and(|limit| self.usage.get(*r).copied().unwrap_or(0) >= *limit)
                })
                .collect();
            if full.is_empty() {
                self.apply(&key, Event::Dequeue, now)?;
            } else {
                let message = format!(
                    "waiting for resource {}",
                    full.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if self.active.get(&key).and_then(|r| r.message.as_deref())
                    != Some(message.as_str())
                {
                    self.apply(&key, Event::Info { message }, now)?;
                }
            }
        }
        Ok(())
    }

    // --- requests (API, CLI) ---

    /// Creates or replaces a workflow. A new one (or a new schedule) starts its natural
    /// triggers with the current period.
    pub fn put_workflow(&mut self, wf: Workflow, now: DateTime<Utc>) -> Result<(), EngineError> {
        let id = wf.key();
        let next_natural = match self.workflows.get(&id) {
            Some(old) if old.workflow.schedule.to_string() == wf.schedule.to_string() => {
                old.next_natural
            }
            _ => Some(wf.schedule.floor(now)),
        };
        let sw = StoredWorkflow {
            workflow: wf,
            next_natural,
        };
        self.store.put_workflow(&sw)?;
        self.workflows.insert(id, sw);
        Ok(())
    }

    /// Deletes a workflow; its active runs are halted.
    pub fn delete_workflow(
        &mut self,
        id: &WorkflowId,
        now: DateTime<Utc>,
    ) -> Result<(), EngineError> {
        if !self.workflows.contains_key(id) {
            return Err(EngineError::UnknownWorkflow(id.clone()));
        }
        let keys: Vec<InstanceKey> = self
            .active
            .keys()
            .filter(|k| &k.workflow == id)
            .cloned()
            .collect();
        for k in keys {
            self.apply(&k, Event::Halt, now)?;
        }
        self.store.delete_workflow(id)?;
        self.workflows.remove(id);
        Ok(())
    }

    /// Enables or disables natural triggers.
    pub fn set_enabled(&mut self, id: &WorkflowId, enabled: bool) -> Result<(), EngineError> {
        let sw = self
            .workflows
            .get_mut(id)
            .ok_or_else(|| EngineError::UnknownWorkflow(id.clone()))?;
        sw.workflow.enabled = enabled;
        self.store.put_workflow(sw)?;
        Ok(())
    }

    /// One workflow and its cursor.
    pub fn workflow(&self, id: &WorkflowId) -> Option<&StoredWorkflow> {
        self.workflows.get(id)
    }

    /// All workflows.
    pub fn workflows(&self) -> impl Iterator<Item = &StoredWorkflow> {
        self.workflows.values()
    }

    /// When the next natural trigger of a workflow fires, and for which partition.
    pub fn next_natural(&self, id: &WorkflowId) -> Option<(DateTime<Utc>, String)> {
        let sw = self.workflows.get(id)?;
        let p = sw.next_natural?;
        Some((
            sw.workflow.trigger_time(p),
            sw.workflow.schedule.partition(p),
        ))
    }

    fn instance(
        &self,
        id: &WorkflowId,
        parameter: &str,
    ) -> Result<(InstanceKey, DateTime<Utc>), EngineError> {
        let sw = self
            .workflows
            .get(id)
            .ok_or_else(|| EngineError::UnknownWorkflow(id.clone()))?;
        let start = sw
            .workflow
            .schedule
            .parse_partition(parameter)
            .map_err(EngineError::Invalid)?;
        Ok((
            InstanceKey {
                workflow: id.clone(),
                parameter: parameter.to_string(),
            },
            start,
        ))
    }

    /// Manual trigger of one instance.
    pub fn trigger(
        &mut self,
        id: &WorkflowId,
        parameter: &str,
        now: DateTime<Utc>,
    ) -> Result<RunState, EngineError> {
        let (key, _) = self.instance(id, parameter)?;
        if self.active.contains_key(&key) {
            return Err(EngineError::AlreadyActive(key));
        }
        let trigger_id = format!("adhoc-{:08x}", self.rng.random::<u32>());
        self.apply(
            &key,
            Event::TriggerExecution {
                trigger_kind: TriggerKind::Adhoc,
                trigger_id,
            },
            now,
        )
    }

    /// Manual retry: a queued (or ended) run goes to `PREPARE` now, skipping its delay and
    /// the resource queue, as Styx's retry does.
    pub fn retry(
        &mut self,
        key: &InstanceKey,
        now: DateTime<Utc>,
    ) -> Result<RunState, EngineError> {
        if !self.active.contains_key(key) {
            return Err(EngineError::NotActive(key.clone()));
        }
        self.apply(key, Event::Retry, now)
    }

    /// Halts an active run for good (its execution is killed).
    pub fn halt(&mut self, key: &InstanceKey, now: DateTime<Utc>) -> Result<RunState, EngineError> {
        if !self.active.contains_key(key) {
            return Err(EngineError::NotActive(key.clone()));
        }
        self.apply(key, Event::Halt, now)
    }

    /// The active run of an instance.
    pub fn active_run(&self, key: &InstanceKey) -> Option<&RunState> {
        self.active.get(key)
    }

    /// All active runs (optionally of one component).
    pub fn active_runs(&self, component: Option<&str>) -> Vec<ActiveRun> {
        self.active
            .iter()
            .filter(|(k, _)| component.is_none_or(|c| k.workflow.component == c))
            .map(|(k, r)| ActiveRun {
                workflow_instance: k.to_string(),
                run: r.clone(),
            })
            .collect()
    }

    /// The event log of one instance.
    pub fn events(&self, key: &InstanceKey) -> Result<Vec<StoredEvent>, EngineError> {
        Ok(self.store.events(key)?)
    }

    /// Starts a backfill of `[start, end)` (partition names).
    pub fn create_backfill(
        &mut self,
        id: &WorkflowId,
        start: &str,
        end: &str,
        concurrency: u32,
        reverse: bool,
        now: DateTime<Utc>,
    ) -> Result<Backfill, EngineError> {
        let (_, s) = self.instance(id, start)?;
        let (_, e) = self.instance(id, end)?;
        if s >= e {
            return Err(EngineError::Invalid(format!(
                "empty range: start {start} must be before end {end} (end is exclusive)"
            )));
        }
        if concurrency == 0 {
            return Err(EngineError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        let sched = self.workflows[id].workflow.schedule.clone();
        let first = if reverse {
            sched.floor(e - ChronoDuration::seconds(1))
        } else {
            s
        };
        let b = Backfill {
            id: format!("backfill-{:016x}", self.rng.random::<u64>()),
            workflow: id.clone(),
            start: s,
            end: e,
            concurrency,
            reverse,
            next_trigger: Some(first),
            all_triggered: false,
            halted: false,
            created: now,
        };
        self.store.put_backfill(&b)?;
        self.backfills.insert(b.id.clone(), b.clone());
        Ok(b)
    }

    /// Halts a backfill: no new triggers, and its active runs are halted.
    pub fn halt_backfill(
        &mut self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<BackfillStatus, EngineError> {
        let mut b = self
            .backfills
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::UnknownBackfill(id.to_string()))?;
        b.halted = true;
        self.store.put_backfill(&b)?;
        self.backfills.insert(b.id.clone(), b);
        let keys: Vec<InstanceKey> = self
            .active
            .iter()
            .filter(|(_, r)| {
                r.trigger_kind == Some(TriggerKind::Backfill) && r.trigger_id.as_deref() == Some(id)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.apply(&k, Event::Halt, now)?;
        }
        Ok(self.backfill(id).expect("inserted above"))
    }

    /// One backfill with its live counts.
    pub fn backfill(&self, id: &str) -> Option<BackfillStatus> {
        let b = self.backfills.get(id)?;
        Some(BackfillStatus {
            backfill: b.clone(),
            active: self.backfill_active(id),
        })
    }

    /// All backfills.
    pub fn backfills(&self) -> Vec<BackfillStatus> {
        self.backfills
            .keys()
            .filter_map(|id| self.backfill(id))
            .collect()
    }

    /// Sets a resource's concurrency limit.
    pub fn put_resource(&mut self, id: &str, concurrency: u32) -> Result<(), EngineError> {
        if id.is_empty() {
            return Err(EngineError::Invalid("resource id must not be empty".into()));
        }
        self.store.put_resource(id, concurrency)?;
        self.resources.insert(id.to_string(), concurrency);
        Ok(())
    }

    /// Resources: (id, limit, in use).
    pub fn resources(&self) -> Vec<(String, u32, u32)> {
        self.resources
            .iter()
            .map(|(id, c)| (id.clone(), *c, self.usage.get(id).copied().unwrap_or(0)))
            .collect()
    }
}

/// The backfill's next period start after `p`, or `None` past its range.
fn step(
    sched: &crate::workflow::Schedule,
    b: &Backfill,
    p: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if b.reverse {
        let prev = sched.floor(p - ChronoDuration::seconds(1));
        (prev >= b.start && prev < p).then_some(prev)
    } else {
        let next = sched.next(p);
        (next < b.end).then_some(next)
    }
}

/// Folds the whole event log into the runs that are still active. A trigger after a
/// terminal state starts a new run of the same instance.
pub fn replay(
    store: &dyn Storage,
    workflows: &BTreeMap<WorkflowId, StoredWorkflow>,
) -> Result<HashMap<InstanceKey, RunState>, EngineError> {
    let mut runs: HashMap<InstanceKey, RunState> = HashMap::new();
    let mut policies: HashMap<WorkflowId, RetryPolicy> = HashMap::new();
    let mut bad = 0u64;
    store.replay(&mut |e: StoredEvent| {
        let policy = policies
            .entry(e.key.workflow.clone())
            .or_insert_with(|| policy_of(workflows, &e.key.workflow));
        let current = match runs.get(&e.key) {
            Some(r) if !r.state.is_terminal() => r.clone(),
            _ => RunState::fresh(e.timestamp),
        };
        match transition(&current, &e.event, e.timestamp, policy) {
            Ok(next) => {
                runs.insert(e.key, next);
            }
            // The log only holds events that were legal when written; one that is not now is
            // reported and skipped rather than stopping the scheduler.
            Err(err) => {
                bad += 1;
                tracing::warn!(seq = e.seq, instance = %e.key, "replay: {err}");
            }
        }
    })?;
    if bad > 0 {
        tracing::warn!(bad, "replay skipped events that no longer apply");
    }
    runs.retain(|_, r| !r.state.is_terminal());
    Ok(runs)
}
