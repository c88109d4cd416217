//! The CLI as a user runs it: `check` exit codes, `status` table, `explain` against a Styx API
//! on port 0 (recorded responses), Styx not configured or unreachable, bad declarations.

mod support;

use support::{Receiver, Tree};

const DECLS: &str = r#"
datasets:
  - id: gabo.receipts
    owner: { team: push-data, contact: data@example.com }
    location: "file://{root}/receipts/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
    producer: gabo/dedup-receipts
  - id: reports.delivered
    owner: { team: analytics, contact: an@example.com }
    location: "file://{root}/reports/delivered/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
    producer: reports/delivered-hourly
    upstream: [gabo.receipts]
"#;

fn run(c: &mut std::process::Command) -> (i32, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_exits_non_zero_only_when_late_or_missing() {
    let tree = Tree::new("check");
    tree.declare(DECLS);
    // At 14:30 with a window of 2 (13, 14): both pending → exit 0.
    let (code, out, err) = run(tree
        .cmd("2026-11-29T14:30:00Z")
        .args(["--window", "2", "check"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 late, 0 missing, 4 pending"), "{out}");

    // Everything lands on time: still 0 an hour later.
    tree.land("receipts", "2026-11-29T13", "2026-11-29T14:10:00Z");
    tree.land("reports/delivered", "2026-11-29T13", "2026-11-29T14:40:00Z");
    let (code, out, _) = run(tree
        .cmd("2026-11-29T15:30:00Z")
        .args(["--window", "3", "check"]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 on time, 0 late, 0 missing, 4 pending"),
        "{out}"
    );

    // 16:01: hour 14 of both is overdue.
    let (code, out, _) = run(tree
        .cmd("2026-11-29T16:01:00Z")
        .args(["--window", "3", "check"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing gabo.receipts 2026-11-29T14 60s (push-data)"),
        "{out}"
    );
}

#[test]
fn status_table_filters_by_owner() {
    let tree = Tree::new("status");
    tree.declare(DECLS);
    tree.land("receipts", "2026-11-29T12", "2026-11-29T13:10:00Z");
    tree.land("receipts", "2026-11-29T13", "2026-11-29T15:30:00Z");
    let (code, out, err) = run(tree.cmd("2026-11-29T15:45:00Z").args([
        "--window",
        "4",
        "status",
        "--owner",
        "push-data",
    ]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    // DATASET OWNER ON_TIME LATE MISSING PENDING last
    assert_eq!(
        &cols[..6],
        ["gabo.receipts", "push-data", "1", "1", "0", "2"],
        "{out}"
    );
    assert_eq!(&cols[6..], ["2026-11-29T13", "late"], "{out}");
}

#[test]
fn invalid_declarations_name_file_line_dataset_and_field() {
    let tree = Tree::new("invalid");
    tree.declare(&DECLS.replace(
        "sla: PT1H\n    producer: reports",
        "sla: 1h\n    producer: reports",
    ));
    let (code, _, err) = run(tree.cmd("2026-11-29T14:30:00Z").arg("check"));
    assert_eq!(code, 2);
    let file = tree.decls().display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:13: dataset \"reports.delivered\": field `sla`"
        )),
        "{err}"
    );
}

const STYX_EVENTS: &str = r#"{"events":[
 {"timestamp":"2026-11-29T15:00:01Z","event":{"@type":"triggerExecution","workflow_instance":"reports/delivered-hourly/2026-11-29T14"},"state":"QUEUED"},
 {"timestamp":"2026-11-29T15:00:02Z","event":{"@type":"submit","workflow_instance":"reports/delivered-hourly/2026-11-29T14"},"state":"SUBMITTING"},
 {"timestamp":"2026-11-29T15:00:03Z","event":{"@type":"started","workflow_instance":"reports/delivered-hourly/2026-11-29T14"},"state":"RUNNING"},
 {"timestamp":"2026-11-29T15:02:00Z","event":{"@type":"terminate","workflow_instance":"reports/delivered-hourly/2026-11-29T14","exit_code":2},"state":"TERMINATED"},
 {"timestamp":"2026-11-29T15:02:00Z","event":{"@type":"runError","workflow_instance":"reports/delivered-hourly/2026-11-29T14","message":"input bucket not complete"},"state":"FAILED"},
 {"timestamp":"2026-11-29T15:02:01Z","event":{"@type":"retryAfter","workflow_instance":"reports/delivered-hourly/2026-11-29T14"},"state":"QUEUED"}
]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_with_styx_on_port_0() {
    let tree = Tree::new("explain");
    tree.declare(DECLS);
    // The upstream hour landed 30 minutes late; the report is missing.
    tree.land("receipts", "2026-11-29T14", "2026-11-29T16:30:00Z");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let styx = Receiver::start(listener, |path| match path {
        "/api/v3/status/events/reports/delivered-hourly/2026-11-29T14" => {
            (200, STYX_EVENTS.to_string())
        }
        _ => (404, r#"{"reason":"unknown workflow"}"#.to_string()),
    });
    let styx_url = format!("http://{}", styx.addr);
    let tree_ref = &tree;
    let explain = move |styx: Option<String>, dataset: &'static str| async move {
        let mut c = tree_ref.cmd("2026-11-29T17:00:00Z");
        if let Some(s) = styx {
            c.arg("--styx").arg(s);
        }
        c.args(["explain", dataset, "2026-11-29T14"]);
        tokio::task::spawn_blocking(move || run(&mut c))
            .await
            .unwrap()
    };

    let (code, out, err) = explain(Some(styx_url.clone()), "reports.delivered").await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reports.delivered 2026-11-29T14 (missing), owner analytics (an@example.com)"),
        "{out}"
    );
    assert!(out.contains("- reports.delivered 2026-11-29T14 is missing: no _SUCCESS marker, 1h00m past its deadline"), "{out}");
    assert!(
        out.contains("- Upstream gabo.receipts 2026-11-29T14 landed late itself, by 30m00s."),
        "{out}"
    );
    assert!(out.contains("- Styx run reports/delivered-hourly/2026-11-29T14 is QUEUED after its last event `retryAfter` at 2026-11-29T15:02:01Z; last exit code 2; last error: input bucket not complete."), "{out}");

    // Styx does not know the upstream's workflow.
    let (_, out, _) = explain(Some(styx_url), "gabo.receipts").await;
    assert!(
        out.contains("- Styx does not know the workflow gabo/dedup-receipts: unknown workflow."),
        "{out}"
    );

    // Not configured.
    let (code, out, _) = explain(None, "reports.delivered").await;
    assert_eq!(code, 0);
    assert!(
        out.contains("- Styx is not configured (--styx URL)"),
        "{out}"
    );

    // Unreachable: a port where connections are refused.
    let dead = testkit::RefusedPort::new();
    let (code, out, _) = explain(Some(format!("http://{}", dead.addr)), "reports.delivered").await;
    assert_eq!(code, 0);
    assert!(
        out.contains("- Styx could not be asked about reports/delivered-hourly 2026-11-29T14:"),
        "{out}"
    );

    // Unknown dataset, bad partition name.
    let (code, _, err) = explain(None, "nope").await;
    assert_eq!(code, 2);
    assert!(err.contains("no dataset \"nope\" is declared"), "{err}");
}

#[test]
fn the_shipped_platform_declarations_load_and_are_watched() {
    let tree = Tree::new("shipped");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/declarations/platform.yaml");
    tree.declare(&std::fs::read_to_string(shipped).unwrap());
    // GABO's receipts bucket for 15:00 landed at 16:10, inside its one-hour SLA.
    tree.land("gabo/receipts", "2026-11-29T15", "2026-11-29T16:10:00Z");
    let (code, out, err) = run(tree
        .cmd("2026-11-29T16:30:00Z")
        .args(["--window", "2", "status"]));
    assert_eq!(code, 0, "{out}{err}");
    for id in [
        "gabo.receipts",
        "gabo.outcomes",
        "gabo.client-events",
        "reports.delivered",
    ] {
        assert!(out.contains(id), "{id} missing from:\n{out}");
    }
    let receipts: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("gabo.receipts"))
        .unwrap()
        .split_whitespace()
        .collect();
    // DATASET OWNER ON_TIME LATE MISSING PENDING last: hour 15 on time, hour 16 pending.
    assert_eq!(
        receipts,
        [
            "gabo.receipts",
            "push-data",
            "1",
            "0",
            "0",
            "1",
            "2026-11-29T15",
            "on_time"
        ],
        "{out}"
    );
}
