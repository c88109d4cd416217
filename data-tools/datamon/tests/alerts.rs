//! Alerts against a real HTTP receiver on a loopback port: down first (retries with backoff,
//! the checker keeps going), then up (one firing), a marker that lands late (one resolve),
//! no repeats across more passes and across a restart (state in SQLite).

mod support;

use support::{get, wait_for, Receiver, Served, Tree};

const NOW: &str = "2026-11-29T14:30:00Z";

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metric_of(url: &str, name: &str) -> f64 {
    metric(&get(&format!("{url}/metrics")).await.1, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_once_retries_while_down_resolves_once_and_survives_restart() {
    let tree = Tree::new("alerts");
    // The receiver is down: its port refuses connections, and is held until it comes up so
    // that no other test's server answers in its place.
    let down = testkit::RefusedPort::new();
    let port = down.port();
    tree.declare(&format!(
        r#"
datasets:
  - id: gabo.receipts
    owner: {{ team: push-data, contact: a@b.c, webhook: "http://127.0.0.1:{port}/hook" }}
    location: "file://{{root}}/receipts/{{date}}/{{hour}}/"
    partitioning: hourly
    sla: PT1H
"#
    ));
    // Window 12:00, 13:00, 14:00 at 14:30: 12 is due at 14:00 and has no marker (missing),
    // 13 and 14 are pending.
    let args = ["--interval", "300ms", "--window", "3"];
    let served = Served::start(tree.cmd(NOW), &args);

    wait_for("failed deliveries while the receiver is down", || async {
        metric_of(&served.url, "datamon_alert_delivery_failures_total").await >= 2.0
    })
    .await;
    let passes = metric_of(&served.url, "datamon_checks_total").await;
    wait_for("passes to go on while deliveries fail", || async {
        metric_of(&served.url, "datamon_checks_total").await >= passes + 3.0
    })
    .await;

    // The receiver comes up on that port.
    drop(down);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let receiver = Receiver::start(listener, |_| (200, String::new()));
    wait_for("the firing alert", || async {
        !receiver.bodies().is_empty()
    })
    .await;
    let fired = &receiver.bodies()[0];
    assert_eq!(fired["version"], "4");
    assert_eq!(fired["status"], "firing");
    let alert = &fired["alerts"][0];
    assert_eq!(alert["labels"]["alertname"], "DatasetMissing");
    assert_eq!(alert["labels"]["dataset"], "gabo.receipts");
    assert_eq!(alert["labels"]["partition"], "2026-11-29T12");
    assert_eq!(alert["labels"]["team"], "push-data");
    assert_eq!(alert["startsAt"], "2026-11-29T14:00:00+00:00");
    assert!(alert["generatorURL"]
        .as_str()
        .unwrap()
        .ends_with("/explain/gabo.receipts/2026-11-29T12"));

    // Restart: the alert that fired is remembered, nothing fires again.
    drop(served);
    let served = Served::start(tree.cmd(NOW), &args);
    wait_for("three passes after the restart", || async {
        metric_of(&served.url, "datamon_checks_total").await >= 3.0
    })
    .await;
    assert_eq!(
        receiver.bodies().len(),
        1,
        "no second firing after a restart"
    );

    // The partition lands, 20 minutes after its deadline: one resolve.
    tree.land("receipts", "2026-11-29T12", "2026-11-29T14:20:00Z");
    wait_for("the resolve", || async { receiver.bodies().len() >= 2 }).await;
    let resolved = &receiver.bodies()[1];
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(
        resolved["alerts"][0]["labels"]["partition"],
        "2026-11-29T12"
    );
    assert_eq!(resolved["alerts"][0]["endsAt"], "2026-11-29T14:20:00+00:00");
    assert_eq!(
        resolved["alerts"][0]["annotations"]["lateness_seconds"],
        "1200"
    );

    let passes = metric_of(&served.url, "datamon_checks_total").await;
    wait_for("five more passes", || async {
        metric_of(&served.url, "datamon_checks_total").await >= passes + 5.0
    })
    .await;
    assert_eq!(
        receiver.bodies().len(),
        2,
        "exactly one firing and one resolve"
    );

    let (code, status) = get(&format!("{}/api/v1/status", served.url)).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let cells = &status["rows"]["gabo.receipts"]["cells"];
    assert_eq!(cells[0]["partition"], "2026-11-29T12");
    assert_eq!(cells[0]["status"], "late");
    assert_eq!(cells[0]["by_seconds"], 1200);
    assert_eq!(cells[1]["status"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_url_gets_the_alert_list() {
    let tree = Tree::new("am");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = Receiver::start(listener, |_| (200, String::new()));
    tree.declare(
        r#"
datasets:
  - id: reports.delivered
    owner: { team: analytics, contact: a@b.c }
    location: "file://{root}/reports/{date}/{hour}/"
    partitioning: hourly
    sla: PT30M
"#,
    );
    // `check` sends once and exits 1: 12 and 13 are overdue at 14:45 (13 due 14:30).
    let out = tree
        .cmd("2026-11-29T14:45:00Z")
        .args(["--window", "3", "--webhook"])
        .arg(format!("http://{}/api/v2/alerts", receiver.addr))
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), 2);
    assert!(receiver
        .paths
        .lock()
        .unwrap()
        .iter()
        .all(|p| p == "/api/v2/alerts"));
    let mut parts: Vec<String> = bodies
        .iter()
        .map(|b| b[0]["labels"]["partition"].as_str().unwrap().to_string())
        .collect();
    parts.sort();
    assert_eq!(parts, ["2026-11-29T12", "2026-11-29T13"]);
    assert_eq!(bodies[0][0]["endsAt"], "0001-01-01T00:00:00Z");

    // A second run fires nothing new.
    let out = tree
        .cmd("2026-11-29T14:50:00Z")
        .args(["--window", "3", "--webhook"])
        .arg(format!("http://{}/api/v2/alerts", receiver.addr))
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(receiver.bodies().len(), 2);
}
