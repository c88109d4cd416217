//! The shipped SQL scripts (data-tools/traces/queries/) over a generated store give the
//! answers worked out by hand.

use traces::model::SpanRow;
use traces::query::{self, to_json_rows, DEFAULT_MEMORY_LIMIT};
use traces::store::SpanStore;

const T0: i64 = 1_764_424_800_000_000_000; // 2025-11-29T14:00:00Z
const MS: i64 = 1_000_000;

// One argument per column the scripts read: each row of `generated` reads as a table line.
#[allow(clippy::too_many_arguments)]
fn span(
    trace: u32,
    id: u32,
    parent: u32,
    service: &str,
    name: &str,
    start_ms: i64,
    dur_ms: i64,
    error: bool,
) -> SpanRow {
    SpanRow {
        trace_id: format!("{trace:032x}"),
        span_id: format!("{id:016x}"),
        parent_span_id: if parent == 0 {
            String::new()
        } else {
            format!("{parent:016x}")
        },
        service: service.into(),
        name: name.into(),
        kind: "internal".into(),
        start_ns: T0 + start_ms * MS,
        end_ns: T0 + (start_ms + dur_ms) * MS,
        duration_ns: dur_ms * MS,
        status: if error { "error" } else { "unset" }.into(),
        status_message: String::new(),
        attributes: "{}".into(),
        resource: "{}".into(),
        events: "[]".into(),
    }
}

/// 100 traces: send (push-lib) → deliver (push-server) → write (push-server). Trace i takes
/// i ms in `write`; deliver adds 1 ms of its own, send 1 ms more. Every 10th deliver fails.
fn generated() -> Vec<SpanRow> {
    let mut rows = Vec::new();
    for i in 1..=100u32 {
        let w = i64::from(i);
        rows.push(span(i, 1, 0, "push-lib", "send", 0, w + 2, false));
        rows.push(span(
            i,
            2,
            1,
            "push-server",
            "deliver",
            1,
            w + 1,
            i % 10 == 0,
        ));
        rows.push(span(i, 3, 2, "push-server", "write", 1, w, false));
    }
    rows
}

async fn run(script: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let dir = tempfile::tempdir().unwrap();
    let store = SpanStore::open(dir.path().to_str().unwrap()).unwrap();
    store.write(generated(), chrono::Utc::now()).await.unwrap();
    let path = format!("{}/queries/{script}", env!("CARGO_MANIFEST_DIR"));
    let sql = std::fs::read_to_string(&path).unwrap();
    let batches = query::run(&store, &sql, T0, T0 + 3_600_000 * MS, DEFAULT_MEMORY_LIMIT)
        .await
        .unwrap();
    to_json_rows(&batches).unwrap()
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

#[tokio::test]
async fn per_hop_latency() {
    let rows = run("per_hop_latency.sql").await;
    assert_eq!(rows.len(), 3);
    // Sorted by p99: send (w+2), deliver (w+1), write (w) for w in 1..=100.
    let ops: Vec<_> = rows
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["send", "deliver", "write"]);
    let write = &rows[2];
    assert_eq!(write["spans"], 100);
    assert_eq!(f(&write["max_ms"]), 100.0);
    // approximate percentiles (t-digest): within 1 ms of the exact 50.5 and 99.01.
    assert!((f(&write["p50_ms"]) - 50.5).abs() <= 1.0, "{write:?}");
    assert!((f(&write["p99_ms"]) - 99.0).abs() <= 1.0, "{write:?}");
}

#[tokio::test]
async fn slowest_traces() {
    let rows = run("slowest_traces.sql").await;
    assert_eq!(rows.len(), 20);
    assert_eq!(rows[0]["trace_id"], format!("{:032x}", 100));
    assert_eq!(f(&rows[0]["end_to_end_ms"]), 102.0);
    assert_eq!(rows[0]["spans"], 3);
    assert_eq!(rows[0]["services"], 2);
    assert_eq!(rows[0]["root"], "push-lib send");
    assert_eq!(rows[19]["trace_id"], format!("{:032x}", 81));
}

#[tokio::test]
async fn error_rate() {
    let rows = run("error_rate.sql").await;
    assert_eq!(rows[0]["operation"], "deliver");
    assert_eq!(rows[0]["errors"], 10);
    assert_eq!(f(&rows[0]["error_rate"]), 0.1);
    assert!(rows[1..].iter().all(|r| r["errors"] == 0));
}

#[tokio::test]
async fn late_messages() {
    let rows = run("late_messages.sql").await;
    // No trace is slower than 100 ms except trace 99 (101 ms) and 100 (102 ms): write's self
    // time is 99 + 100 = 199 ms; deliver's and send's 1 ms each per trace.
    let by_op: std::collections::HashMap<_, _> = rows
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap().to_owned(),
                (r["spans"].clone(), f(&r["self_ms"])),
            )
        })
        .collect();
    assert_eq!(by_op["write"], (serde_json::json!(2), 199.0));
    assert_eq!(by_op["deliver"], (serde_json::json!(2), 2.0));
    assert_eq!(by_op["send"], (serde_json::json!(2), 2.0));
    assert_eq!(rows[0]["operation"], "write");
}
