//! The run state machine: states, events and the pure transition function.
//!
//! Every run of a workflow instance (workflow + partition) moves through Styx's states by
//! events. [`transition`] is pure: it takes the current [`RunState`], one [`Event`], `now` and
//! the workflow's [`RetryPolicy`] (for the cost of an exit code) and returns the next
//! [`RunState`] or an [`IllegalTransition`]; it never changes anything silently. A run's state
//! is the fold of its events, which is how the scheduler rebuilds every active run after a
//! restart.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// Where a run is. `DONE` and `ERROR` are terminal: the run is over and leaves the active set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Created, not yet triggered.
    New,
    /// Triggered; waits for its retry delay and for resource slots.
    Queued,
    /// Dequeued: holds its resources, about to be submitted to the runner.
    Prepare,
    /// Handed to the runner, which has not confirmed yet.
    Submitting,
    /// The runner accepted it (execution ID known), not started yet.
    Submitted,
    /// The job's process runs.
    Running,
    /// The process exited; the exit code decides what comes next.
    Terminated,
    /// The run failed without an exit code (runner error, timeout).
    Failed,
    /// Terminal: stopped (no more retries) or halted.
    Error,
    /// Terminal: succeeded.
    Done,
}

impl State {
    /// Every state, in lifecycle order (tables and tests walk this).
    pub const ALL: [State; 10] = [
        State::New,
        State::Queued,
        State::Prepare,
        State::Submitting,
        State::Submitted,
        State::Running,
        State::Terminated,
        State::Failed,
        State::Error,
        State::Done,
    ];

    /// The upper-case name used in the API and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "NEW",
            State::Queued => "QUEUED",
            State::Prepare => "PREPARE",
            State::Submitting => "SUBMITTING",
            State::Submitted => "SUBMITTED",
            State::Running => "RUNNING",
            State::Terminated => "TERMINATED",
            State::Failed => "FAILED",
            State::Error => "ERROR",
            State::Done => "DONE",
        }
    }

    /// `DONE` and `ERROR`: nothing moves the run any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::Error)
    }

    /// States in which a run holds its resource slots: from dequeue until its outcome is
    /// decided (a retry goes back to `QUEUED` and waits for a slot again).
    pub fn holds_resources(self) -> bool {
        matches!(
            self,
            State::Prepare
                | State::Submitting
                | State::Submitted
                | State::Running
                | State::Terminated
                | State::Failed
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown state {s:?}"))
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// The schedule reached the end of the partition's period (+ offset).
    Natural,
    /// Part of a backfill; `trigger_id` is the backfill's ID.
    Backfill,
    /// Someone asked (`styx trigger`).
    Adhoc,
}

/// An input of the state machine, as written to the event log and shown by the API
/// (`{"@type":"terminate","exit_code":20}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "@type", rename_all = "camelCase")]
pub enum Event {
    /// Start a run: `NEW` → `QUEUED`.
    TriggerExecution {
        /// Natural, backfill or ad hoc.
        trigger_kind: TriggerKind,
        /// `natural-trigger`, the backfill ID, or `adhoc-…`.
        trigger_id: String,
    },
    /// A resource slot is free and the retry delay is over: `QUEUED` → `PREPARE`.
    Dequeue,
    /// Handed to the runner: `PREPARE` → `SUBMITTING`.
    Submit {
        /// The ID of this execution (one per try).
        execution_id: String,
    },
    /// The runner accepted the execution: `SUBMITTING` → `SUBMITTED`.
    Submitted {
        /// The ID of this execution.
        execution_id: String,
    },
    /// The process started: `SUBMITTED` → `RUNNING`.
    Started,
    /// The process exited: `RUNNING` → `TERMINATED`.
    Terminate {
        /// The process's exit code (128 + signal when killed by one).
        exit_code: i32,
    },
    /// The runner could not run it: → `FAILED`.
    RunError {
        /// What went wrong.
        message: String,
    },
    /// Exit code 0: `TERMINATED` → `DONE`.
    Success,
    /// Try again later: `TERMINATED`/`FAILED` → `QUEUED`.
    RetryAfter {
        /// How long to wait before the next try.
        delay_millis: u64,
    },
    /// Try again now (manual retry, skipping the delay and the queue).
    Retry,
    /// No more tries: `TERMINATED`/`FAILED` → `ERROR`.
    Stop,
    /// The run stayed too long in its state: → `FAILED`.
    Timeout,
    /// Stop the run for good, whatever it does: → `ERROR`.
    Halt,
    /// A note on the run's timeline (why it waits); the state does not change.
    Info {
        /// The note.
        message: String,
    },
}

/// The names of all event types, in the order of the issue (tables and metrics use them).
pub const EVENT_NAMES: [&str; 14] = [
    "triggerExecution",
    "dequeue",
    "submit",
    "submitted",
    "started",
    "terminate",
    "runError",
    "success",
    "retryAfter",
    "retry",
    "stop",
    "timeout",
    "halt",
    "info",
];

impl Event {
    /// The `@type` of this event.
    pub fn name(&self) -> &'static str {
        match self {
            Event::TriggerExecution { .. } => "triggerExecution",
            Event::Dequeue => "dequeue",
            Event::Submit { .. } => "submit",
            Event::Submitted { .. } => "submitted",
            Event::Started => "started",
            Event::Terminate { .. } => "terminate",
            Event::RunError { .. } => "runError",
            Event::Success => "success",
            Event::RetryAfter { .. } => "retryAfter",
            Event::Retry => "retry",
            Event::Stop => "stop",
            Event::Timeout => "timeout",
            Event::Halt => "halt",
            Event::Info { .. } => "info",
        }
    }
}

/// A run's state and the data its events accumulated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Where the run is.
    pub state: State,
    /// When it entered `state` (per-state timeouts count from here).
    pub since: DateTime<Utc>,
    /// When the run was triggered (queue wait and run duration count from here).
    pub triggered_at: Option<DateTime<Utc>>,
    /// What started it.
    pub trigger_kind: Option<TriggerKind>,
    /// The natural trigger, backfill or ad hoc ID.
    pub trigger_id: Option<String>,
    /// The current (or last) execution's ID.
    pub execution_id: Option<String>,
    /// Executions the runner accepted so far.
    pub tries: u32,
    /// Failures in a row (exit codes other than 0 and "missing dependency", run errors,
    /// timeouts); the backoff grows with it.
    pub consecutive_failures: u32,
    /// Sum of the costs of all tries; a run stops when it reaches the policy's maximum.
    pub retry_cost: f64,
    /// The last exit code, if the last try exited.
    pub last_exit: Option<i32>,
    /// The delay set by the last `retryAfter`: the run is not dequeued before `since` + this.
    pub retry_delay_millis: Option<u64>,
    /// The last message (run error, info, timeout).
    pub message: Option<String>,
}

impl RunState {
    /// A run that nothing has happened to yet.
    pub fn fresh(now: DateTime<Utc>) -> RunState {
        RunState {
            state: State::New,
            since: now,
            triggered_at: None,
            trigger_kind: None,
            trigger_id: None,
            execution_id: None,
            tries: 0,
            consecutive_failures: 0,
            retry_cost: 0.0,
            last_exit: None,
            retry_delay_millis: None,
            message: None,
        }
    }
}

/// An event that the current state does not accept. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event} while in {state}")]
pub struct IllegalTransition {
    /// The state the run was in (and stays in).
    pub state: State,
    /// The refused event's `@type`.
    pub event: &'static str,
}

/// Applies one event. Pure: the result depends only on the arguments.
pub fn transition(
    run: &RunState,
    event: &Event,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
) -> Result<RunState, IllegalTransition> {
    use State::*;
    let illegal = || IllegalTransition {
        state: run.state,
        event: event.name(),
    };
    let mut next = run.clone();
    let to = match (run.state, event) {
        (
            New,
            Event::TriggerExecution {
                trigger_kind,
                trigger_id,
            },
        ) => {
            next.trigger_kind = Some(*trigger_kind);
            next.trigger_id = Some(trigger_id.clone());
            next.triggered_at = Some(now);
            Queued
        }
        (Queued, Event::Dequeue) => Prepare,
        (Prepare, Event::Submit { execution_id }) => {
            next.execution_id = Some(execution_id.clone());
            Submitting
        }
        (Submitting, Event::Submitted { execution_id }) => {
            next.execution_id = Some(execution_id.clone());
            next.tries += 1;
            Submitted
        }
        // As in Styx, a runner may report the start without a separate submitted step.
        (Submitted | Prepare, Event::Started) => Running,
        (Running, Event::Terminate { exit_code }) => {
            let code = *exit_code;
            next.retry_cost += policy.cost_of_exit(code);
            next.last_exit = Some(code);
            if code == policy.success_exit_code {
                next.consecutive_failures = 0;
            } else if code != policy.missing_deps_exit_code {
                next.consecutive_failures += 1;
            }
            next.message = Some(format!("Exit code: {code}"));
            Terminated
        }
        (Queued | Prepare | Submitting | Submitted | Running, Event::RunError { message }) => {
            next.retry_cost += policy.failure_cost;
            next.consecutive_failures += 1;
            next.last_exit = None;
            next.message = Some(message.clone());
            Failed
        }
        (Terminated, Event::Success) => Done,
        (Terminated | Failed, Event::RetryAfter { delay_millis }) => {
            next.retry_delay_millis = Some(*delay_millis);
            Queued
        }
        (Terminated | Failed | Queued, Event::Retry) => {
            next.retry_delay_millis = None;
            Prepare
        }
        (Terminated | Failed, Event::Stop) => Error,
        // A timeout costs like a failure, or a job that always hangs would retry forever.
        (s, Event::Timeout) if !s.is_terminal() && s != Terminated && s != Failed => {
            next.retry_cost += policy.failure_cost;
            next.consecutive_failures += 1;
            next.last_exit = None;
            next.message = Some(format!("Timeout in {s}"));
            Failed
        }
        (s, Event::Halt) if !s.is_terminal() => Error,
        (s, Event::Info { message }) if !s.is_terminal() => {
            next.message = Some(message.clone());
            // An info note is not a move: the state's clock (and its timeout) keeps running.
            return Ok(next);
        }
        _ => return Err(illegal()),
    };
    next.state = to;
    next.since = now;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 14, 0, 0).unwrap()
    }

    fn sample(name: &str) -> Event {
        match name {
            "triggerExecution" => Event::TriggerExecution {
                trigger_kind: TriggerKind::Adhoc,
                trigger_id: "adhoc-1".into(),
            },
            "dequeue" => Event::Dequeue,
            "submit" => Event::Submit {
                execution_id: "x1".into(),
            },
            "submitted" => Event::Submitted {
                execution_id: "x1".into(),
            },
            "started" => Event::Started,
            "terminate" => Event::Terminate { exit_code: 1 },
            "runError" => Event::RunError {
                message: "boom".into(),
            },
            "success" => Event::Success,
            "retryAfter" => Event::RetryAfter { delay_millis: 1000 },
            "retry" => Event::Retry,
            "stop" => Event::Stop,
            "timeout" => Event::Timeout,
            "halt" => Event::Halt,
            "info" => Event::Info {
                message: "waiting".into(),
            },
            other => panic!("no sample for {other}"),
        }
    }

    /// The whole table: for every state and every event, the expected next state, or `None`
    /// for an illegal transition. Written out by hand so that a change shows up here.
    fn expected(from: State, event: &str) -> Option<State> {
        use State::*;
        let active = !from.is_terminal();
        match event {
            "triggerExecution" => (from == New).then_some(Queued),
            "dequeue" => (from == Queued).then_some(Prepare),
            "submit" => (from == Prepare).then_some(Submitting),
            "submitted" => (from == Submitting).then_some(Submitted),
            "started" => matches!(from, Submitted | Prepare).then_some(Running),
            "terminate" => (from == Running).then_some(Terminated),
            "runError" => matches!(from, Queued | Prepare | Submitting | Submitted | Running)
                .then_some(Failed),
            "success" => (from == Terminated).then_some(Done),
            "retryAfter" => matches!(from, Terminated | Failed).then_some(Queued),
            "retry" => matches!(from, Terminated | Failed | Queued).then_some(Prepare),
            "stop" => matches!(from, Terminated | Failed).then_some(Error),
            "timeout" => (active && !matches!(from, Terminated | Failed)).then_some(Failed),
            "halt" => active.then_some(Error),
            "info" => active.then_some(from),
            other => panic!("unknown event {other}"),
        }
    }

    #[test]
    fn every_state_times_every_event() {
        let policy = RetryPolicy::default();
        let mut legal = 0;
        for from in State::ALL {
            for name in EVENT_NAMES {
                let mut run = RunState::fresh(t0());
                run.state = from;
                let event = sample(name);
                assert_eq!(event.name(), name);
                let later = t0() + chrono::Duration::seconds(5);
                match (
                    transition(&run, &event, later, &policy),
                    expected(from, name),
                ) {
                    (Ok(next), Some(to)) => {
                        legal += 1;
                        assert_eq!(next.state, to, "{from} + {name}");
                        if name != "info" {
                            assert_eq!(next.since, later, "{from} + {name} resets the clock");
                        }
                    }
                    (Err(e), None) => {
                        assert_eq!(e.state, from);
                        assert_eq!(e.event, name);
                        assert!(e.to_string().contains(name));
                    }
                    (got, want) => panic!("{from} + {name}: got {got:?}, want {want:?}"),
                }
            }
        }
        // Guard against an empty walk.
        assert_eq!(legal, 42);
    }

    #[test]
    fn terminal_states_accept_nothing() {
        let policy = RetryPolicy::default();
        for from in [State::Done, State::Error] {
            for name in EVENT_NAMES {
                let mut run = RunState::fresh(t0());
                run.state = from;
                assert!(transition(&run, &sample(name), t0(), &policy).is_err());
            }
        }
    }

    #[test]
    fn a_full_successful_run_and_its_data() {
        let policy = RetryPolicy::default();
        let mut run = RunState::fresh(t0());
        for name in [
            "triggerExecution",
            "dequeue",
            "submit",
            "submitted",
            "started",
        ] {
            run = transition(&run, &sample(name), t0(), &policy).unwrap();
        }
        assert_eq!(run.state, State::Running);
        assert_eq!(run.tries, 1);
        assert_eq!(run.execution_id.as_deref(), Some("x1"));
        assert_eq!(run.trigger_kind, Some(TriggerKind::Adhoc));
        run = transition(&run, &Event::Terminate { exit_code: 0 }, t0(), &policy).unwrap();
        assert_eq!(run.last_exit, Some(0));
        assert_eq!(run.retry_cost, 0.0);
        run = transition(&run, &Event::Success, t0(), &policy).unwrap();
        assert_eq!(run.state, State::Done);
    }

    #[test]
    fn exit_codes_cost_and_count_failures() {
        let policy = RetryPolicy::default();
        let mut run = RunState::fresh(t0());
        run.state = State::Running;
        let after20 = transition(&run, &Event::Terminate { exit_code: 20 }, t0(), &policy).unwrap();
        assert!((after20.retry_cost - 0.1).abs() < 1e-9);
        assert_eq!(
            after20.consecutive_failures, 0,
            "missing deps is not a failure"
        );
        let after1 = transition(&run, &Event::Terminate { exit_code: 1 }, t0(), &policy).unwrap();
        assert_eq!(after1.retry_cost, 1.0);
        assert_eq!(after1.consecutive_failures, 1);
        let timed_out = transition(&run, &Event::Timeout, t0(), &policy).unwrap();
        assert_eq!(timed_out.state, State::Failed);
        assert_eq!(timed_out.message.as_deref(), Some("Timeout in RUNNING"));
        assert_eq!(timed_out.retry_cost, 1.0);
    }

    #[test]
    fn events_serialise_with_styx_type_tags() {
        let json = serde_json::to_value(Event::Terminate { exit_code: 20 }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"@type": "terminate", "exit_code": 20})
        );
        for name in EVENT_NAMES {
            let e = sample(name);
            let back: Event = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
            assert_eq!(back, e);
        }
        assert_eq!("running".parse::<State>().unwrap(), State::Running);
    }
}
