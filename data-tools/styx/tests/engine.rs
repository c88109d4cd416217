//! The scheduler core driven with a made-up clock: periods, offsets, catch-up, backfills,
//! resources, timeouts, and replay after a simulated crash. The runner is played by the test.

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use styx::engine::{Action, Engine, EngineConfig, Launch};
use styx::state::{Event, State};
use styx::store::SqliteStore;
use styx::workflow::{InstanceKey, Workflow, WorkflowId};

fn t(h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 29, h, m, 0).unwrap()
}

fn engine() -> Engine {
    let store = SqliteStore::in_memory().unwrap();
    Engine::open(
        Box::new(store),
        EngineConfig {
            seed: Some(3),
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn temp_db(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("styx-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("styx.db")
}

fn wf(extra: &str) -> Workflow {
    Workflow::from_yaml(
        "test.yaml",
        &format!("component: c\nid: w\nschedule: hourly\ncommand: /bin/true\n{extra}"),
    )
    .unwrap()
}

fn id() -> WorkflowId {
    WorkflowId {
        component: "c".into(),
        id: "w".into(),
    }
}

fn key(p: &str) -> InstanceKey {
    InstanceKey {
        workflow: id(),
        parameter: p.into(),
    }
}

/// A manual trigger, then a tick (which dequeues it when a slot is free).
fn trig(e: &mut Engine, p: &str, now: DateTime<Utc>) {
    e.trigger(&id(), p, now).unwrap();
    e.tick(now).unwrap();
}

fn launches(e: &mut Engine) -> Vec<Launch> {
    e.take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Launch(l) => Some(*l),
            Action::Kill { .. } => None,
        })
        .collect()
}

/// Plays a runner whose executions exit with `code`.
fn finish(e: &mut Engine, l: &Launch, code: i32, now: DateTime<Utc>) {
    e.report(
        &l.key,
        &l.execution_id,
        Event::Submitted {
            execution_id: l.execution_id.clone(),
        },
        now,
    )
    .unwrap();
    e.report(&l.key, &l.execution_id, Event::Started, now)
        .unwrap();
    e.report(
        &l.key,
        &l.execution_id,
        Event::Terminate { exit_code: code },
        now,
    )
    .unwrap();
}

fn params(ls: &[Launch]) -> Vec<String> {
    let mut v: Vec<String> = ls.iter().map(|l| l.key.parameter.clone()).collect();
    v.sort();
    v
}

fn states(e: &Engine) -> Vec<(String, State)> {
    e.active_runs(None)
        .into_iter()
        .map(|r| (r.workflow_instance, r.run.state))
        .collect()
}

#[test]
fn natural_trigger_at_period_end_plus_offset() {
    let mut e = engine();
    e.put_workflow(wf("offset: PT10M\n"), t(14, 20)).unwrap();
    assert_eq!(
        e.next_natural(&id()).unwrap(),
        (t(15, 10), "2026-11-29T14".to_string())
    );
    e.tick(t(15, 9)).unwrap();
    assert!(launches(&mut e).is_empty(), "not before the offset");
    e.tick(t(15, 10)).unwrap();
    let ls = launches(&mut e);
    assert_eq!(params(&ls), ["2026-11-29T14"]);
    assert_eq!(ls[0].trigger_id, "natural-trigger");
    finish(&mut e, &ls[0], 0, t(15, 11));
    assert!(e.active_runs(None).is_empty());
    let evs: Vec<&str> = e
        .events(&key("2026-11-29T14"))
        .unwrap()
        .iter()
        .map(|s| s.event.name())
        .collect();
    assert_eq!(
        evs,
        [
            "triggerExecution",
            "dequeue",
            "submit",
            "submitted",
            "started",
            "terminate",
            "success"
        ]
    );
    assert_eq!(
        e.events(&key("2026-11-29T14"))
            .unwrap()
            .last()
            .unwrap()
            .state,
        State::Done
    );
    // The same period is never triggered twice.
    e.tick(t(15, 30)).unwrap();
    assert!(launches(&mut e).is_empty());
}

#[test]
fn catch_up_all_or_latest_after_downtime() {
    let mut e = engine();
    e.put_workflow(wf(""), t(10, 30)).unwrap();
    e.tick(t(14, 5)).unwrap();
    assert_eq!(
        params(&launches(&mut e)),
        [
            "2026-11-29T10",
            "2026-11-29T11",
            "2026-11-29T12",
            "2026-11-29T13"
        ]
    );

    let mut e = engine();
    e.put_workflow(wf("catch_up: latest\n"), t(10, 30)).unwrap();
    e.tick(t(14, 5)).unwrap();
    assert_eq!(params(&launches(&mut e)), ["2026-11-29T13"]);
    assert_eq!(e.next_natural(&id()).unwrap().1, "2026-11-29T14");
}

#[test]
fn disabled_workflows_get_no_natural_triggers_but_manual_ones() {
    let mut e = engine();
    e.put_workflow(wf("enabled: false\n"), t(10, 30)).unwrap();
    e.tick(t(14, 5)).unwrap();
    assert!(launches(&mut e).is_empty());
    trig(&mut e, "2026-11-29T03", t(14, 6));
    assert!(
        e.trigger(&id(), "2026-11-29T03", t(14, 6)).is_err(),
        "already active"
    );
    assert!(
        e.trigger(&id(), "2026-11-29", t(14, 6)).is_err(),
        "not an hourly partition"
    );
    assert_eq!(params(&launches(&mut e)), ["2026-11-29T03"]);
}

#[test]
fn retry_policy_drives_runs() {
    let mut e = engine();
    // Disabled: natural triggers of the hours passed below would add launches of their own.
    e.put_workflow(wf("enabled: false\nretry: {max_cost: 2.5}\n"), t(10, 0))
        .unwrap();
    trig(&mut e, "2026-11-29T05", t(10, 0));
    let l = launches(&mut e).remove(0);
    finish(&mut e, &l, 20, t(10, 1));
    let run = e.active_run(&key("2026-11-29T05")).unwrap().clone();
    assert_eq!(run.state, State::Queued);
    assert_eq!(run.retry_delay_millis, Some(600_000));
    e.tick(t(10, 10)).unwrap();
    assert!(launches(&mut e).is_empty(), "waits 10 minutes");
    e.tick(t(10, 11)).unwrap();
    let l = launches(&mut e).remove(0);
    assert_ne!(
        l.execution_id,
        run.execution_id.clone().unwrap(),
        "a new execution per try"
    );
    // Two failures (cost 1 each) reach 2.1 < 2.5: retried; a third reaches 3.1: stopped.
    finish(&mut e, &l, 1, t(10, 12));
    e.tick(t(11, 0)).unwrap();
    let l = launches(&mut e).remove(0);
    finish(&mut e, &l, 1, t(11, 1));
    e.tick(t(13, 0)).unwrap();
    let l = launches(&mut e).remove(0);
    finish(&mut e, &l, 1, t(13, 1));
    assert!(e.active_run(&key("2026-11-29T05")).is_none());
    let last = e.events(&key("2026-11-29T05")).unwrap().pop().unwrap();
    assert_eq!((last.event, last.state), (Event::Stop, State::Error));

    trig(&mut e, "2026-11-29T06", t(14, 0));
    let l = launches(&mut e).remove(0);
    finish(&mut e, &l, 50, t(14, 1));
    assert!(
        e.active_run(&key("2026-11-29T06")).is_none(),
        "exit 50 stops at once"
    );
}

#[test]
fn stale_reports_are_dropped_and_halt_kills() {
    let mut e = engine();
    e.put_workflow(wf(""), t(10, 0)).unwrap();
    trig(&mut e, "2026-11-29T05", t(10, 0));
    let l = launches(&mut e).remove(0);
    e.report(
        &l.key,
        &l.execution_id,
        Event::Submitted {
            execution_id: l.execution_id.clone(),
        },
        t(10, 0),
    )
    .unwrap();
    e.report(&l.key, "someone-else", Event::Started, t(10, 0))
        .unwrap();
    assert_eq!(e.active_run(&l.key).unwrap().state, State::Submitted);
    e.halt(&l.key, t(10, 1)).unwrap();
    let actions = e.take_actions();
    assert!(
        matches!(&actions[..], [Action::Kill { execution_id, .. }] if *execution_id == l.execution_id)
    );
    // The killed execution's exit arrives late and changes nothing.
    e.report(
        &l.key,
        &l.execution_id,
        Event::Terminate { exit_code: 137 },
        t(10, 2),
    )
    .unwrap();
    assert!(e.active_run(&l.key).is_none());
    assert_eq!(
        e.events(&l.key).unwrap().last().unwrap().state,
        State::Error
    );
    assert!(e.halt(&l.key, t(10, 3)).is_err(), "nothing to halt");
}

#[test]
fn timeouts_per_state() {
    let mut e = engine();
    e.put_workflow(wf("running_timeout: PT30M\n"), t(10, 0))
        .unwrap();
    trig(&mut e, "2026-11-29T01", t(10, 0));
    trig(&mut e, "2026-11-29T02", t(10, 0));
    let ls = launches(&mut e);
    // 01 starts; 02 is never confirmed by the runner.
    e.report(
        &ls[0].key,
        &ls[0].execution_id,
        Event::Submitted {
            execution_id: ls[0].execution_id.clone(),
        },
        t(10, 0),
    )
    .unwrap();
    e.report(&ls[0].key, &ls[0].execution_id, Event::Started, t(10, 0))
        .unwrap();
    e.tick(t(10, 9)).unwrap();
    assert!(e.take_actions().is_empty());
    e.tick(t(10, 10)).unwrap();
    let kills = e.take_actions();
    assert_eq!(
        kills.len(),
        1,
        "SUBMITTING timed out after 10 minutes: {kills:?}"
    );
    assert_eq!(
        e.active_run(&ls[1].key).unwrap().state,
        State::Queued,
        "retried after the timeout"
    );
    e.tick(t(10, 29)).unwrap();
    assert_eq!(e.active_run(&ls[0].key).unwrap().state, State::Running);
    e.tick(t(10, 30)).unwrap();
    assert_eq!(e.active_run(&ls[0].key).unwrap().state, State::Queued);
    let evs: Vec<&str> = e
        .events(&ls[0].key)
        .unwrap()
        .iter()
        .map(|s| s.event.name())
        .collect();
    assert_eq!(&evs[evs.len() - 2..], ["timeout", "retryAfter"]);
    assert!(e.take_actions().iter().any(
        |a| matches!(a, Action::Kill { execution_id, .. } if *execution_id == ls[0].execution_id)
    ));
}

#[test]
fn resources_cap_concurrent_runs() {
    let mut e = engine();
    e.put_resource("db", 2).unwrap();
    e.put_workflow(wf("resources: [db]\n"), t(10, 0)).unwrap();
    for h in 1..=5 {
        trig(&mut e, &format!("2026-11-29T0{h}"), t(10, h));
    }
    let first = launches(&mut e);
    assert_eq!(params(&first), ["2026-11-29T01", "2026-11-29T02"]);
    // Every step stays within the 10-minute submit timeout: 02 (never confirmed by this
    // test's runner) must keep its slot, not time out and free it.
    e.tick(t(10, 6)).unwrap();
    assert!(launches(&mut e).is_empty(), "both slots taken");
    assert_eq!(
        e.active_run(&key("2026-11-29T03"))
            .unwrap()
            .message
            .as_deref(),
        Some("waiting for resource db")
    );
    assert_eq!(e.resources(), [("db".to_string(), 2, 2)]);
    finish(&mut e, &first[0], 0, t(10, 7));
    e.tick(t(10, 8)).unwrap();
    assert_eq!(
        params(&launches(&mut e)),
        ["2026-11-29T03"],
        "oldest queued first"
    );
    let evs: Vec<&str> = e
        .events(&key("2026-11-29T03"))
        .unwrap()
        .iter()
        .map(|s| s.event.name())
        .collect();
    assert_eq!(
        evs.iter().filter(|n| **n == "info").count(),
        1,
        "the wait is noted once: {evs:?}"
    );
}

#[test]
fn backfill_range_concurrency_reverse_and_halt() {
    let mut e = engine();
    e.put_workflow(wf("enabled: false\n"), t(10, 0)).unwrap();
    let b = e
        .create_backfill(&id(), "2026-11-29T00", "2026-11-29T05", 2, false, t(10, 0))
        .unwrap();
    let mut order = Vec::new();
    for i in 0..10 {
        e.tick(t(10, i)).unwrap();
        let ls = launches(&mut e);
        assert!(ls.len() <= 2, "concurrency 2");
        assert!(ls.iter().all(|l| l.trigger_id == b.id));
        for l in &ls {
            order.push(l.key.parameter.clone());
            finish(&mut e, l, 0, t(10, i));
        }
    }
    assert_eq!(
        order,
        [
            "2026-11-29T00",
            "2026-11-29T01",
            "2026-11-29T02",
            "2026-11-29T03",
            "2026-11-29T04"
        ],
        "end exclusive"
    );
    let status = e.backfill(&b.id).unwrap();
    assert!(status.backfill.all_triggered);
    assert_eq!(status.active, 0);

    let r = e
        .create_backfill(&id(), "2026-11-28T22", "2026-11-29T01", 1, true, t(11, 0))
        .unwrap();
    let mut order = Vec::new();
    for i in 0..5 {
        e.tick(t(11, i)).unwrap();
        for l in launches(&mut e) {
            order.push(l.key.parameter.clone());
            finish(&mut e, &l, 0, t(11, i));
        }
    }
    assert_eq!(
        order,
        ["2026-11-29T00", "2026-11-28T23", "2026-11-28T22"],
        "reverse"
    );
    assert!(e.backfill(&r.id).unwrap().backfill.all_triggered);

    let h = e
        .create_backfill(&id(), "2026-11-20T00", "2026-11-21T00", 3, false, t(12, 0))
        .unwrap();
    e.tick(t(12, 0)).unwrap();
    assert_eq!(launches(&mut e).len(), 3);
    let halted = e.halt_backfill(&h.id, t(12, 1)).unwrap();
    assert!(halted.backfill.halted);
    assert_eq!(halted.active, 0, "its runs were halted");
    assert_eq!(e.take_actions().len(), 3, "their executions are killed");
    e.tick(t(12, 2)).unwrap();
    assert!(launches(&mut e).is_empty(), "no new triggers");

    assert!(
        e.create_backfill(&id(), "2026-11-29T05", "2026-11-29T05", 1, false, t(12, 0))
            .is_err(),
        "empty range"
    );
    assert!(
        e.create_backfill(&id(), "2026-11-29T05", "2026-11-29T06", 0, false, t(12, 0))
            .is_err(),
        "zero concurrency"
    );
}

#[test]
fn replay_after_a_crash_rebuilds_active_runs_and_runs_nothing_twice() {
    let db = temp_db("crash");
    let open = || {
        Engine::open(
            Box::new(SqliteStore::open(&db).unwrap()),
            EngineConfig {
                seed: Some(9),
                ..EngineConfig::default()
            },
        )
        .unwrap()
    };
    let mut e = open();
    e.put_resource("db", 1).unwrap();
    e.put_workflow(wf("resources: [db]\n"), t(10, 0)).unwrap();
    for p in [
        "2026-11-29T01",
        "2026-11-29T02",
        "2026-11-29T03",
        "2026-11-29T04",
    ] {
        trig(&mut e, p, t(10, 0));
    }
    // 01: done. 02: running (holds db). 03, 04: queued behind it.
    let l1 = launches(&mut e).remove(0);
    finish(&mut e, &l1, 0, t(10, 1));
    e.tick(t(10, 2)).unwrap();
    let l2 = launches(&mut e).remove(0);
    e.report(
        &l2.key,
        &l2.execution_id,
        Event::Submitted {
            execution_id: l2.execution_id.clone(),
        },
        t(10, 2),
    )
    .unwrap();
    e.report(&l2.key, &l2.execution_id, Event::Started, t(10, 2))
        .unwrap();
    let before = states(&e);
    assert_eq!(before.len(), 3);
    drop(e); // the crash: no shutdown, nothing flushed beyond what each write committed

    let mut e = open();
    assert_eq!(states(&e), before, "the same runs in the same states");
    assert_eq!(
        e.resources(),
        [("db".to_string(), 1, 1)],
        "the running one still holds its slot"
    );
    e.recover(t(10, 5)).unwrap();
    // The lost execution fails and is retried later; the queue moves on; 01 stays done.
    let run2 = e.active_run(&key("2026-11-29T02")).unwrap();
    assert_eq!(run2.state, State::Queued);
    assert_eq!(
        run2.message.as_deref(),
        Some("execution lost: the scheduler restarted")
    );
    e.tick(t(10, 6)).unwrap();
    let next = launches(&mut e);
    assert_eq!(params(&next), ["2026-11-29T03"]);
    assert!(e.active_run(&key("2026-11-29T01")).is_none());
    let done_events = e.events(&key("2026-11-29T01")).unwrap();
    assert_eq!(
        done_events.len(),
        7,
        "nothing more happened to the finished run"
    );

    // A second restart without recover: the natural-trigger cursor survived too.
    e.put_workflow(wf("resources: [db]\n"), t(10, 0)).unwrap();
    let cursor = e.next_natural(&id());
    drop(e);
    let e = open();
    assert_eq!(e.next_natural(&id()), cursor);
    let _ = std::fs::remove_dir_all(db.parent().unwrap());
}

#[test]
fn deleting_a_workflow_halts_its_runs() {
    let mut e = engine();
    e.put_workflow(wf(""), t(10, 0)).unwrap();
    trig(&mut e, "2026-11-29T01", t(10, 0));
    e.delete_workflow(&id(), t(10, 1)).unwrap();
    assert!(e.active_runs(None).is_empty());
    assert!(e.workflow(&id()).is_none());
    assert!(e.delete_workflow(&id(), t(10, 1)).is_err());
}
