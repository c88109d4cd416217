//! API and CLI round trips against a real `styx serve` on port 0, running the shipped example
//! workflow in a bubblewrap sandbox.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use styx::client::{Client, ClientError};

const BIN: &str = env!("CARGO_BIN_EXE_styx");

struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn serve(name: &str, extra: &[&str]) -> Server {
    let dir = std::env::temp_dir().join(format!("styx-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (child, url) = testkit::spawn_announced(
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tick",
                "100ms",
                "--state-dir",
            ])
            .arg(dir.join("state"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit()),
        "styx listening on ",
    );
    Server { child, url, dir }
}

fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--url")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok(url: &str, args: &[&str]) -> String {
    let (success, out, err) = cli(url, args);
    assert!(success, "styx {args:?} failed: {err}");
    out
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen");
}

fn example(dir: &Path) -> PathBuf {
    // A copy of the shipped example whose output goes to the test's own directory.
    let src = crate_dir().join("examples/workflows/delivered-report.yaml");
    let text = std::fs::read_to_string(&src).unwrap().replace(
        "source: ../out",
        &format!("source: {}", dir.join("out").display()),
    );
    let wf_dir = crate_dir().join("examples/workflows");
    let text = text
        .replace(
            "source: ../scripts",
            &format!("source: {}", wf_dir.join("../scripts").display()),
        )
        .replace(
            "source: ../input",
            &format!("source: {}", wf_dir.join("../input").display()),
        );
    let path = dir.join("delivered-report.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_workflow_runs_from_new_to_done_and_events_shows_it() {
    let s = serve(
        "example",
        &[
            "--workflows",
            crate_dir().join("examples/workflows").to_str().unwrap(),
        ],
    );
    let out = ok(&s.url, &["workflow", "ls"]);
    assert!(
        out.contains("push/delivered-report  hourly  enabled"),
        "{out}"
    );
    // Write to the test's directory rather than the checked-in examples/out.
    let file = example(&s.dir);
    ok(
        &s.url,
        &["workflow", "create", "-f", file.to_str().unwrap()],
    );
    let triggered = ok(
        &s.url,
        &["trigger", "push", "delivered-report", "2026-11-29T14"],
    );
    assert!(
        triggered.contains("QUEUED") || triggered.contains("SUBMITTING"),
        "{triggered}"
    );
    let url = s.url.clone();
    wait_for("DONE", || {
        ok(
            &url,
            &["events", "push", "delivered-report", "2026-11-29T14"],
        )
        .contains("DONE")
    })
    .await;
    let timeline = ok(
        &s.url,
        &["events", "push", "delivered-report", "2026-11-29T14"],
    );
    let rows: Vec<&str> = timeline.lines().collect();
    assert!(rows[0].starts_with("TIME"), "{timeline}");
    for (row, (event, state)) in rows[1..].iter().zip([
        ("triggerExecution", "QUEUED"),
        ("dequeue", "PREPARE"),
        ("submit", "SUBMITTING"),
        ("submitted", "SUBMITTED"),
        ("started", "RUNNING"),
        ("terminate", "TERMINATED"),
        ("success", "DONE"),
    ]) {
        assert!(
            row.contains(event) && row.contains(state),
            "{row} should be {event} {state}\n{timeline}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.contains("terminate") && r.contains(" 0 ")),
        "exit code shown: {timeline}"
    );
    let day = s.dir.join("out/reports/delivered/2026-11-29/14");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(day.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report,
        json!({"hour": "2026-11-29T14", "delivered": 9, "total": 12})
    );
    let marker: Value =
        serde_json::from_str(&std::fs::read_to_string(day.join("_SUCCESS")).unwrap()).unwrap();
    assert!(marker["completed_at"].as_str().unwrap().starts_with("20"));

    // The contract Datamon reads.
    let c = Client::new(&s.url);
    let v = c
        .get("/api/v3/status/events/push/delivered-report/2026-11-29T14")
        .await
        .unwrap();
    let evs = v["events"].as_array().unwrap();
    assert_eq!(evs[0]["event"]["@type"], "triggerExecution");
    assert_eq!(
        evs[0]["event"]["workflow_instance"],
        "push/delivered-report/2026-11-29T14"
    );
    assert_eq!(evs[0]["state"], "QUEUED");
    let term = evs
        .iter()
        .find(|e| e["event"]["@type"] == "terminate")
        .unwrap();
    assert_eq!(term["event"]["exit_code"], 0);
    assert!(chrono::DateTime::parse_from_rfc3339(term["timestamp"].as_str().unwrap()).is_ok());
    match c
        .get("/api/v3/status/events/nobody/nothing/2026-11-29T14")
        .await
    {
        Err(ClientError::Status {
            status: 404,
            reason,
        }) => assert!(reason.contains("unknown workflow"), "{reason}"),
        other => panic!("expected 404, got {other:?}"),
    }
    let metrics = reqwest_like(&s.url, "/metrics").await;
    assert!(
        metrics.contains("styx_transitions_total{event=\"success\"} 1"),
        "{metrics}"
    );
}

async fn reqwest_like(base: &str, path: &str) -> String {
    let c = Client::new(base);
    match c.get(path).await.unwrap() {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trips() {
    let s = serve("roundtrip", &["--runner", "stub"]);
    let dir = s.dir.clone();
    let wf = dir.join("wf.yaml");
    std::fs::write(&wf, "component: team\nid: nightly\nschedule: daily\ncommand: /bin/true\nresources: [db]\nenabled: false\n").unwrap();
    ok(&s.url, &["workflow", "create", "-f", wf.to_str().unwrap()]);
    let got: Value =
        serde_json::from_str(&ok(&s.url, &["workflow", "get", "team", "nightly"])).unwrap();
    assert_eq!(got["configuration"]["schedule"], "daily");
    assert_eq!(got["state"]["enabled"], false);
    ok(&s.url, &["workflow", "enable", "team", "nightly"]);
    let got: Value =
        serde_json::from_str(&ok(&s.url, &["workflow", "get", "team", "nightly"])).unwrap();
    assert_eq!(got["state"]["enabled"], true);
    assert!(got["state"]["next_natural_trigger"].as_str().is_some());
    ok(&s.url, &["workflow", "disable", "team", "nightly"]);

    // A bad file: the error names the file, the line and the field; nothing changes.
    std::fs::write(
        &wf,
        "component: team\nid: nightly\nschedule: daily\ncommand: /bin/true\nretires: 3\n",
    )
    .unwrap();
    let (success, _, err) = cli(&s.url, &["workflow", "create", "-f", wf.to_str().unwrap()]);
    assert!(!success);
    assert!(
        err.contains(&format!("{}:5:", wf.display())) && err.contains("retires"),
        "{err}"
    );
    let got: Value =
        serde_json::from_str(&ok(&s.url, &["workflow", "get", "team", "nightly"])).unwrap();
    assert_eq!(got["configuration"]["resources"], json!(["db"]));

    let out = ok(&s.url, &["resource", "create", "db", "3"]);
    assert!(out.contains("\"concurrency\": 3"), "{out}");
    assert!(ok(&s.url, &["resource", "ls"]).contains("\"db\""));

    let b: Value = serde_json::from_str(&ok(
        &s.url,
        &[
            "backfill",
            "create",
            "team",
            "nightly",
            "2026-11-01",
            "2026-11-11",
            "--concurrency",
            "2",
        ],
    ))
    .unwrap();
    let id = b["id"].as_str().unwrap().to_string();
    let url = s.url.clone();
    let id2 = id.clone();
    wait_for("backfill complete", || {
        let v: Value = serde_json::from_str(&ok(&url, &["backfill", "get", &id2])).unwrap();
        v["all_triggered"] == true && v["active"] == 0
    })
    .await;
    for day in 1..=10 {
        let tl = ok(
            &s.url,
            &["events", "team", "nightly", &format!("2026-11-{day:02}")],
        );
        assert!(tl.contains("DONE"), "day {day}: {tl}");
    }
    assert!(
        !ok(&s.url, &["events", "team", "nightly", "2026-11-11"]).contains("DONE"),
        "end is exclusive"
    );
    assert!(ok(&s.url, &["backfill", "ls"]).contains(&id));
    let halted: Value = serde_json::from_str(&ok(&s.url, &["backfill", "halt", &id])).unwrap();
    assert_eq!(halted["halted"], true);

    // Trigger, halt, retry errors.
    ok(&s.url, &["trigger", "team", "nightly", "2026-11-20"]);
    let (success, _, err) = cli(&s.url, &["trigger", "team", "nightly", "2026-11-20T10"]);
    assert!(!success && err.contains("does not match"), "{err}");
    let (success, _, err) = cli(&s.url, &["halt", "team", "nightly", "2026-10-01"]);
    assert!(!success && err.contains("no active run"), "{err}");
    let (success, _, err) = cli(&s.url, &["retry", "team", "nightly", "2026-10-01"]);
    assert!(!success && err.contains("404"), "{err}");
    let ls = ok(&s.url, &["ls"]);
    assert!(ls.starts_with("INSTANCE"), "{ls}");

    ok(&s.url, &["workflow", "delete", "team", "nightly"]);
    let (success, _, err) = cli(&s.url, &["workflow", "get", "team", "nightly"]);
    assert!(!success && err.contains("unknown workflow"), "{err}");

    // JSON errors with a reason.
    let c = Client::new(&s.url);
    for (path, status) in [("/api/v3/nothing", 404), ("/api/v3/backfills/nope", 404)] {
        match c.get(path).await {
            Err(ClientError::Status {
                status: got,
                reason,
            }) => {
                assert_eq!(got, status);
                assert!(!reason.is_empty());
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    match c
        .post_json("/api/v3/scheduler/trigger", &json!({"component": "team"}))
        .await
    {
        Err(ClientError::Status {
            status: 400,
            reason,
        }) => assert!(reason.contains("missing field"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn serve_refuses_a_bad_workflow_file_and_names_it() {
    let dir = std::env::temp_dir().join(format!("styx-cli-{}-bad", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wf = dir.join("bad.yaml");
    std::fs::write(
        &wf,
        "component: a\nid: b\nschedule: every hour\ncommand: /bin/true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--runner",
            "stub",
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .arg("--workflows")
        .arg(&wf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", wf.display())) && err.contains("schedule"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
