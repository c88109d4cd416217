//! The `gabo` binary as a user (or Styx) runs it: apply (plan first, idempotent), types,
//! delete, audit and dedup exit codes; `gabo serve` as one process with the shipped platform
//! types; and the names the shipped files share with Styx and Datamon.

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::*;
use gabo::hour::Hour;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

fn gabo(kafka: &Kafka, dirs: &Dirs, args: &[&str]) -> Output {
    gabo_cmd(kafka)
        .args(["--root", &dirs.root()])
        .arg("--staging")
        .arg(dirs.staging_dir())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("gabo runs")
}

/// `gabo --brokers …`. On the mock cluster, admin requests time out after 2 s instead of 15:
/// the mock never answers DescribeConfigs or DeleteTopics (they are the only admin requests
/// that wait out the timeout there), and each `apply` of a type that owns its topic asks
/// DescribeConfigs once. With 15 s the apply test took a minute.
fn gabo_cmd(kafka: &Kafka) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gabo"));
    cmd.args(["--brokers", &kafka.brokers()]);
    if kafka.is_mock() {
        cmd.env("GABO_ADMIN_TIMEOUT", "2s");
    }
    cmd
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
    let file = shipped(&kafka);

    let dry = gabo(&kafka, &dirs, &["apply", "-f", file, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("+ type receipts"), "{}", text(&dry));
    assert!(text(&dry).contains("dry run"));
    assert!(
        gabo::provision::applied(&dirs.store)
            .await
            .unwrap()
            .is_empty(),
        "a dry run applies nothing"
    );

    let first = gabo(&kafka, &dirs, &["apply", "-f", file]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("applied 3 changes"),
        "{}",
        text(&first)
    );
    let second = gabo(&kafka, &dirs, &["apply", "-f", file]);
    assert!(
        text(&second).contains("nothing to change"),
        "{}",
        text(&second)
    );

    let list = gabo(&kafka, &dirs, &["types"]);
    assert!(list.status.success(), "{}", text(&list));
    let t = text(&list);
    assert!(t.contains("receipts") && t.contains("push-receipts"), "{t}");
    assert!(t.contains("outcomes") && t.contains("push-outcomes"), "{t}");
    assert!(t.contains("gabo.client-events"), "{t}");

    // Without --yes the name must be typed; anything else deletes nothing.
    let mut no = gabo_cmd(&kafka)
        .args(["--root", &dirs.root()])
        .args(["delete", "receipts"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    no.stdin.take().unwrap().write_all(b"outcomes\n").unwrap();
    let no = no.wait_with_output().unwrap();
    assert_eq!(no.status.code(), Some(1), "{}", text(&no));
    assert!(text(&no).contains("not confirmed"), "{}", text(&no));
    assert_eq!(
        applied_names(&dirs).await,
        ["client-events", "outcomes", "receipts"]
    );

    // librdkafka's mock cluster has no DeleteTopics: deleting a type that owns its topic
    // stops there and keeps the type whole, so the delete can be retried.
    let del = gabo(&kafka, &dirs, &["delete", "client-events", "--yes"]);
    assert_eq!(del.status.code(), Some(1), "{}", text(&del));
    assert!(
        text(&del).contains("deleting topic gabo.client-events")
            && text(&del).contains("nothing deleted"),
        "{}",
        text(&del)
    );
    assert_eq!(
        applied_names(&dirs).await,
        ["client-events", "outcomes", "receipts"]
    );

    // An ingested type has no topic of its own: its consumer group and location go.
    let del = gabo(&kafka, &dirs, &["delete", "receipts", "--yes"]);
    assert!(del.status.success(), "{}", text(&del));
    assert!(
        text(&del).contains("consumer group gabo-writer.receipts"),
        "{}",
        text(&del)
    );
    assert_eq!(applied_names(&dirs).await, ["client-events", "outcomes"]);
    assert!(dirs.store.list("receipts").await.unwrap().is_empty());
}

/// The shipped types' file, with their topics made on the mock: `receipts`' and `outcomes`'
/// belong to push-server and msg-processor (GABO ingests them); `client-events`' is GABO's own
/// (made here because the mock has no CreateTopics; by `gabo apply` on a real broker).
fn shipped(kafka: &Kafka) -> &'static str {
    let types = gabo::types::load(std::path::Path::new(SHIPPED)).expect("the types parse");
    assert_eq!(types.len(), 3);
    for t in &types {
        kafka.create_topic(&t.topic(), t.partitions);
    }
    SHIPPED
}

async fn applied_names(dirs: &Dirs) -> Vec<String> {
    gabo::provision::applied(&dirs.store)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect()
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
    assert_eq!(
        o.status.code(),
        Some(20),
        "Styx's missing-dependency code: {}",
        text(&o)
    );
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

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gabo serve` on port 0 and returns it with the gateway's address (read from the
/// line it prints).
fn serve(kafka: &Kafka, dirs: &Dirs) -> (Server, std::net::SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gabo"));
    cmd.args(["--brokers", &kafka.brokers(), "--root", &dirs.root()])
        .arg("--staging")
        .arg(dirs.staging_dir())
        .args(["serve", "--listen", "127.0.0.1:0", "--check-every", "1s"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in kafka_settings() {
        cmd.args(["--kafka", &format!("{k}={v}")]);
    }
    let mut child = cmd.spawn().expect("gabo serve starts");
    let stdout = child.stdout.take().expect("piped");
    let server = Server(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("gabo serve printed its address before exiting")
            .expect("stdout readable");
        if let Some(a) = line.strip_prefix("gateway listening on http://") {
            break a.parse().expect("an address");
        }
    };
    // Keep draining what it prints so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_closes_hours_of_the_shipped_types_and_the_audit_balances() {
    let kafka = Kafka::start();
    if !kafka.is_mock() {
        eprintln!("needs the mock cluster (a real broker has no push-receipts topic); skipped");
        return;
    }
    let dirs = Dirs::new();
    let o = gabo(&kafka, &dirs, &["apply", "-f", shipped(&kafka)]);
    assert!(o.status.success(), "{}", text(&o));

    let (_server, addr) = serve(&kafka, &dirs);

    // Receipts of a past hour, as push-server writes them (Kafka timestamp = the hour); the
    // client acknowledged message 2 twice.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let at_ms = hour().start().timestamp_millis() + 600_000;
    for (i, id) in [1, 2, 2, 3, 4].into_iter().enumerate() {
        let receipt = serde_json::json!({
            "user": "alice", "device": "phone", "id": id, "node": "n1", "transport": "ws",
            "sent_at_ms": at_ms, "acked_at_ms": at_ms + 5,
        })
        .to_string();
        let key = format!("alice-{i}");
        producer
            .send(
                FutureRecord::to("push-receipts")
                    .key(&key)
                    .payload(&receipt)
                    .timestamp(at_ms + i as i64),
                Duration::from_secs(20),
            )
            .await
            .expect("receipt produced");
    }
    // Push outcomes of the same hour, as msg-processor writes them (`--outcomes-topic`):
    // m1 redelivered and delivered again (a duplicate), m2 kept for its user's resume.
    for (i, (mid, user, outcome)) in [
        ("m1", "alice", "delivered"),
        ("m2", "bob", "stored"),
        ("m1", "alice", "delivered"),
    ]
    .into_iter()
    .enumerate()
    {
        let o = serde_json::json!({
            "id": format!("{mid}:{outcome}"), "mid": mid, "user": user, "outcome": outcome,
            "at_ms": at_ms + i as i64,
        })
        .to_string();
        producer
            .send(
                FutureRecord::to("push-outcomes")
                    .key(user)
                    .payload(&o)
                    .timestamp(at_ms + i as i64),
                Duration::from_secs(20),
            )
            .await
            .expect("outcome produced");
    }
    for ty in ["receipts", "outcomes"] {
        let marker = format!("{}/{ty}/2026-11-29/14/_SUCCESS", dirs.root());
        eventually(
            &format!("the completionist to close the {ty} hour"),
            || async { std::path::Path::new(&marker).exists() },
        )
        .await;
    }
    assert_eq!(
        bucket_ids(&dirs.root(), "receipts").await,
        [
            "alice:phone:1",
            "alice:phone:2",
            "alice:phone:3",
            "alice:phone:4"
        ],
    );
    assert_eq!(
        bucket_ids(&dirs.root(), "outcomes").await,
        ["m1:delivered", "m2:stored"]
    );
    let a = gabo(&kafka, &dirs, &["audit", "outcomes", HOUR]);
    assert!(a.status.success(), "{}", text(&a));
    let t = text(&a);
    assert!(
        t.contains("accepted    3")
            && t.contains("unique      2")
            && t.contains("duplicates  1")
            && t.contains("balanced"),
        "{t}"
    );
    let a = gabo(&kafka, &dirs, &["audit", "receipts", HOUR]);
    assert!(a.status.success(), "{}", text(&a));
    let t = text(&a);
    assert!(t.contains("balanced"), "{t}");
    assert!(
        t.contains("accepted    5") && t.contains("duplicates  1"),
        "{t}"
    );

    // An ingested type is not posted to: its events would be skipped by the writer.
    let (s, v) = post(
        addr,
        "/v1/events/outcomes",
        r#"[{"mid":"m3","user":"carol","outcome":"delivered","at_ms":1}]"#,
    )
    .await;
    assert_eq!(s, 405, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("push-outcomes"),
        "{v}"
    );

    // What clients did, posted by the apps over HTTP and stamped now. An event that breaks the
    // schema is rejected by its index; the others in the request are accepted, the client's
    // retry of "m1 opened" among them (a duplicate).
    let event = |mid: &str, device: &str, action: &str| {
        serde_json::json!({
            "id": format!("{mid}:{device}:{action}"), "mid": mid, "user": "alice",
            "device": device, "action": action, "at_ms": 1_764_428_400_000u64,
        })
    };
    let body = serde_json::json!([
        event("m1", "phone", "opened"),
        event("m2", "web", "displayed"),
        event("m3", "web", "liked"),
        event("m1", "phone", "opened"),
    ])
    .to_string();
    let (s, v) = post(addr, "/v1/events/client-events", &body).await;
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(3)), "{v}");
    assert_eq!(v["rejected"][0]["index"], 2, "{v}");
    let current: Hour = eventually_some("the client events staged", || async {
        let open = dirs.staging.hours("client-events").unwrap();
        (open.len() == 1 && dirs.staging.has_files("client-events", open[0].0)).then(|| open[0].0)
    })
    .await;
    let name = current.to_string();
    let o = gabo(&kafka, &dirs, &["dedup", "client-events", &name]);
    // The hour is open until its end plus the 2 min grace: only a run that began that late
    // may find it complete.
    if Utc::now() < current.end() + chrono::Duration::minutes(2) {
        assert_eq!(o.status.code(), Some(20), "{}", text(&o));
        assert!(text(&o).contains("not complete"), "{}", text(&o));
        let o = gabo(&kafka, &dirs, &["dedup", "client-events", &name, "--force"]);
        assert!(o.status.success(), "{}", text(&o));
    } else {
        assert!(o.status.success(), "{}", text(&o));
    }
    // The bucket of the HTTP events: each ID once in the Parquet part, then the marker.
    let bucket = format!("{}/{}", dirs.root(), current.bucket_path("client-events"));
    assert!(
        std::path::Path::new(&format!("{bucket}/_SUCCESS")).is_file(),
        "no marker in {bucket}"
    );
    assert_eq!(
        parquet_ids(&format!("{bucket}/{}", gabo::hour::PART0)).await,
        ["m1:phone:opened", "m2:web:displayed"]
    );
    let a = gabo(&kafka, &dirs, &["audit", "client-events", &name]);
    assert!(a.status.success(), "{}", text(&a));
    let t = text(&a);
    assert!(
        t.contains("accepted    3")
            && t.contains("unique      2")
            && t.contains("duplicates  1")
            && t.contains("balanced"),
        "{t}"
    );
}

/// The crate's directory: the shipped files are read from it.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

// The names GABO shares with the other data tools, checked on the shipped files: every
// platform type has a Styx workflow that closes its hours (`gabo/dedup-{type}`, running
// `gabo dedup {type} {}`), and Datamon's shipped declarations of GABO buckets name a shipped
// type, the bucket layout and that workflow as producer. The tools share no code, only these
// names, so a rename on one side fails here.

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn shipped_types() -> BTreeSet<String> {
    gabo::types::load(std::path::Path::new(&format!("{ROOT}/types/platform.yaml")))
        .expect("shipped types parse")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[test]
fn every_shipped_type_has_a_styx_workflow_that_closes_its_hours() {
    let mut covered = BTreeSet::new();
    for entry in std::fs::read_dir(format!("{ROOT}/workflows")).unwrap() {
        let path = entry.unwrap().path().display().to_string();
        let wf = yaml(&path);
        assert_eq!(wf["component"], "gabo", "{path}");
        assert_eq!(wf["schedule"], "hourly", "{path}");
        assert_eq!(wf["command"], "gabo", "{path}");
        let args: Vec<&str> = wf["args"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: args"))
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let [verb, ty, hour] = args[..] else {
            panic!("{path}: args {args:?}")
        };
        assert_eq!((verb, hour), ("dedup", "{}"), "{path}");
        assert_eq!(wf["id"], format!("dedup-{ty}"), "{path}");
        covered.insert(ty.to_string());
    }
    assert_eq!(covered, shipped_types());
}

#[test]
fn datamon_watches_the_shipped_buckets_with_their_workflows_as_producers() {
    let decl = yaml(&format!("{ROOT}/../datamon/declarations/platform.yaml"));
    let mut watched = BTreeSet::new();
    for d in decl["datasets"].as_array().unwrap() {
        let Some(ty) = d["location"]
            .as_str()
            .unwrap()
            .strip_prefix("file://{root}/gabo/")
            .and_then(|rest| rest.strip_suffix("/{date}/{hour}/"))
        else {
            continue;
        };
        assert_eq!(d["partitioning"], "hourly", "{d}");
        assert_eq!(d["marker"], gabo::hour::MARKER, "{d}");
        assert_eq!(d["producer"], format!("gabo/dedup-{ty}"), "{d}");
        watched.insert(ty.to_string());
    }
    assert_eq!(watched, shipped_types());
}
