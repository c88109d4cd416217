//! The `gabo` binary: apply (plan first, idempotent), types, audit and dedup exit codes, the
//! shipped declarations, delete.

mod common;

use std::process::{Command, Output};

use common::*;

fn gabo(kafka: &Kafka, dirs: &Dirs, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gabo"))
        .args(["--brokers", &kafka.brokers(), "--root", &dirs.root()])
        .arg("--staging")
        .arg(dirs.staging_dir())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("gabo runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/types/platform.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_shows_the_plan_then_applies_once() {
    let kafka = Kafka::start();
    if !kafka.is_mock() {
        eprintln!("needs the mock cluster (a real broker has no push-receipts topic); skipped");
        return;
    }
    let dirs = Dirs::new();
    let types = gabo::types::load(std::path::Path::new(SHIPPED)).expect("shipped types parse");
    // The receipts topic belongs to push-server; the outcomes topic is GABO's (created by the
    // test on the mock, which has no CreateTopics; by apply on a real broker).
    kafka.create_topic("push-receipts", 3);
    for t in &types {
        kafka.create_topic(&t.topic(), t.partitions);
    }

    let dry = gabo(&kafka, &dirs, &["apply", "-f", SHIPPED, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("+ type delivery-receipts"),
        "{}",
        text(&dry)
    );
    assert!(text(&dry).contains("dry run"));
    assert!(
        gabo::provision::applied(&dirs.store)
            .await
            .unwrap()
            .is_empty(),
        "a dry run applies nothing"
    );

    let first = gabo(&kafka, &dirs, &["apply", "-f", SHIPPED]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("applied 2 changes"),
        "{}",
        text(&first)
    );
    let second = gabo(&kafka, &dirs, &["apply", "-f", SHIPPED]);
    assert!(
        text(&second).contains("nothing to change"),
        "{}",
        text(&second)
    );

    let list = gabo(&kafka, &dirs, &["types"]);
    assert!(list.status.success(), "{}", text(&list));
    let t = text(&list);
    assert!(
        t.contains("delivery-receipts") && t.contains("push-receipts"),
        "{t}"
    );
    assert!(t.contains("gabo.push-outcomes"), "{t}");

    let del = gabo(&kafka, &dirs, &["delete", "push-outcomes", "--yes"]);
    assert!(del.status.success(), "{}", text(&del));
    let left: Vec<String> = gabo::provision::applied(&dirs.store)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(left, vec!["delivery-receipts".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_declaration_names_type_and_field_and_applies_nothing() {
    let kafka = Kafka::start();
    let dirs = Dirs::new();
    let file = dirs.tmp.path().join("bad.yaml");
    std::fs::write(&file, TYPES.replace("type: string", "type: strung")).unwrap();
    let o = gabo(&kafka, &dirs, &["apply", "-f", file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("type `clicks`: field `schema`"),
        "{}",
        text(&o)
    );
    assert!(gabo::provision::applied(&dirs.store)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_refuses_incomplete_hours_and_audit_needs_a_closed_one() {
    let kafka = Kafka::start();
    let dirs = Dirs::new();
    let o = gabo(&kafka, &dirs, &["audit", "clicks", HOUR]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not closed"));
    let o = gabo(&kafka, &dirs, &["dedup", "clicks", HOUR]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not complete"), "{}", text(&o));
    let o = gabo(&kafka, &dirs, &["dedup", "clicks", HOUR, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = gabo(&kafka, &dirs, &["audit", "clicks", HOUR]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("balanced"));
    let o = gabo(&kafka, &dirs, &["dedup", "clicks", "2026-11-29T25"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is not an hour"), "{}", text(&o));
}
