//! A writer killed (SIGKILL) mid-hour and restarted: nothing lost, nothing twice in the bucket,
//! and the audit balances. The writer runs as the real `gabo serve --part writer` process.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use gabo::dedup;

fn spawn_writer(kafka: &Kafka, dirs: &Dirs) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gabo"));
    cmd.args(["serve", "--part", "writer"])
        .args(["--brokers", &kafka.brokers()])
        .args(["--root", &dirs.root()])
        .arg("--staging")
        .arg(dirs.staging_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in kafka_settings() {
        cmd.args(["--kafka", &format!("{k}={v}")]);
    }
    cmd.spawn().expect("gabo binary runs")
}

async fn send(gw: std::net::SocketAddr, from: usize, n: usize) {
    let batch: Vec<String> = (from..from + n)
        .map(|i| format!(r#"{{"id":"e{i}","user":"u{}"}}"#, i % 7))
        .collect();
    let (s, v) = post(gw, "/v1/events/clicks", &format!("[{}]", batch.join(","))).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_loses_nothing_and_duplicates_are_removed() {
    let kafka = Kafka::start();
    let dirs = Dirs::new();
    let types = vec![clicks()];
    provision(&kafka, &types, &dirs.store).await;
    let gw = gateway(&kafka, &types, dirs.store.clone(), Duration::from_secs(20)).await;

    let mut w = spawn_writer(&kafka, &dirs);
    for b in 0..10 {
        send(gw.addr(), b * 100, 100).await;
    }
    // Duplicates on purpose: batch 3 again.
    send(gw.addr(), 300, 100).await;
    eventually("some events staged", || async {
        dirs.staged_lines("clicks") >= 300
    })
    .await;
    w.kill().expect("SIGKILL the writer");
    w.wait().unwrap();

    for b in 10..20 {
        send(gw.addr(), b * 100, 100).await;
    }
    let mut w = spawn_writer(&kafka, &dirs);
    eventually("every record staged after the restart", || async {
        dirs.staged_lines("clicks") >= 2100
    })
    .await;
    let opts = dedup_options(&dirs);
    let closed = close_when_complete("clicks", &dirs, &opts).await;
    let _ = w.kill();
    let _ = w.wait();
    let dedup::Closed::Now(m, _) = closed else {
        panic!("closed by this run: {closed:?}")
    };
    assert_eq!(m.accepted, 2100);
    assert_eq!(m.unique, 2000, "every event once: {m:?}");
    assert_eq!(
        m.duplicates, 100,
        "the batch sent twice; redelivered copies are not duplicates"
    );
    assert!(m.staged >= 2100, "{m:?}");
    let ids = bucket_ids(&dirs.root(), "clicks").await;
    let mut want: Vec<String> = (0..2000).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    let a = gabo::audit::audit(&dirs.store, "clicks", hour())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.check(), Ok(()));
}
