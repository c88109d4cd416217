//! push-server with a shared Redis registry (a real redis-server per test): nodes register
//! their connections, see each other's users, refresh, and unregister on close.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use push_server::{Config, Server};
use testkit::RedisServer;
use tokio_tungstenite::tungstenite::Message;

fn node(id: &str, registry: &str) -> Config {
    let mut cfg = config();
    cfg.node_id = id.into();
    cfg.registry = registry.parse().expect("registry URL");
    cfg.registry_ttl = Duration::from_secs(3);
    cfg
}

async fn lookup(url: &str, user: &str) -> Vec<push_registry::Record> {
    let registry = push_registry::open(url).await.unwrap();
    registry.lookup(user).await.unwrap()
}

/// The `push-registry` binary built beside this test (`cargo nextest run --workspace` and
/// `scripts/test` build every binary of the workspace first).
fn registry_cli() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let cli = dir.join("push-registry");
    assert!(
        cli.exists(),
        "{} not built: run the tests with `scripts/test` (it builds the whole workspace)",
        cli.display()
    );
    cli
}

#[tokio::test]
async fn two_nodes_sharing_redis_see_each_others_users() {
    let redis = RedisServer::start();
    let a = start(node("node-a", &redis.url())).await;
    let b = start(node("node-b", &redis.url())).await;
    let mut alice = ws_connect(&a, &token(&a, "alice", Some("phone"))).await;
    ws_next_json(&mut alice).await;
    let mut bob = sse_connect(&b, &token(&b, "bob", None)).await;
    bob.next_event().await.unwrap();

    let url = redis.url();
    eventually("both users to be registered", || async {
        lookup(&url, "alice").await.len() == 1 && lookup(&url, "bob").await.len() == 1
    })
    .await;
    let rec = &lookup(&url, "alice").await[0];
    assert_eq!(rec.node_id, "node-a");
    assert_eq!(rec.node_addr, a.admin_addr().to_string());
    assert_eq!(rec.device.as_deref(), Some("phone"));
    assert_eq!(lookup(&url, "bob").await[0].node_id, "node-b");

    // The operator CLI shows the same.
    let out = Command::new(registry_cli())
        .args(["--registry", &url, "lookup", "bob"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-b"));

    // Closing unregisters.
    alice.send(Message::Close(None)).await.unwrap();
    let _ = ws_close_code(&mut alice).await;
    drop(alice);
    eventually("alice's entry to be removed", || async {
        lookup(&url, "alice").await.is_empty()
    })
    .await;
    let out = Command::new(registry_cli())
        .args(["--registry", &url, "lookup", "alice"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "not found");
}

#[tokio::test]
async fn records_of_a_crashed_node_expire() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut p = spawn(
        &[
            "--registry",
            &url,
            "--registry-ttl",
            "3s",
            "--node-id",
            "doomed",
        ],
        &[],
    );
    let ws_url = format!("ws://{}/ws?token={}", p.client, p.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws_next_json(&mut ws).await;
    eventually("demo to be registered", || async {
        lookup(&url, "demo").await.len() == 1
    })
    .await;
    // Refreshes keep the record past its 3 s TTL...
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        lookup(&url, "demo").await.len(),
        1,
        "refreshed inside the TTL"
    );
    // ...and when the node dies without unregistering anything, the record expires.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let killed = std::time::Instant::now();
    eventually("the record to expire", || async {
        lookup(&url, "demo").await.is_empty()
    })
    .await;
    // The TTL is 3 s after the last refresh; the rest is slack for a loaded machine.
    assert!(
        killed.elapsed() <= Duration::from_secs(5),
        "expired within the TTL"
    );
    drop(ws);
}

#[tokio::test]
async fn a_device_that_moves_to_another_node_is_retired_on_the_old_one() {
    let redis = RedisServer::start();
    let a = start(node("node-a", &redis.url())).await;
    let b = start(node("node-b", &redis.url())).await;
    let t = token(&a, "dave", Some("tablet"));
    let mut on_a = ws_connect(&a, &t).await;
    ws_next_json(&mut on_a).await;
    let url = redis.url();
    eventually("dave on node-a", || async {
        lookup(&url, "dave")
            .await
            .first()
            .map(|r| r.node_id.clone())
            == Some("node-a".into())
    })
    .await;
    let mut on_b = ws_connect(&b, &t).await;
    ws_next_json(&mut on_b).await;
    eventually("dave on node-b", || async {
        lookup(&url, "dave")
            .await
            .first()
            .map(|r| r.node_id.clone())
            == Some("node-b".into())
    })
    .await;
    // Node A's next refresh finds the newer registration and stops delivering there.
    eventually("node-a to retire its connection", || async {
        a.hub()
            .connections("dave")
            .iter()
            .all(|c| c.state().superseded)
    })
    .await;
    // A push through node A reaches the device on node B only (forwarded), not the retired
    // connection.
    let r = push(&a, "dave", "x").await;
    assert_eq!(r["delivered"], 1, "{r}");
    assert_eq!(ws_next_json(&mut on_b).await["data"], "x");
    // The old connection's close does not remove the new registration.
    on_a.send(Message::Close(None)).await.unwrap();
    let _ = ws_close_code(&mut on_a).await;
    drop(on_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs = lookup(&url, "dave").await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].node_id, "node-b");
}

#[tokio::test]
async fn clients_connect_while_the_registry_is_down_pushes_wait_for_it_and_both_resume() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let a: Server = start(node("node-a", &url)).await;
    // Connecting does not need the registry.
    let mut ws = ws_connect(&a, &token(&a, "erin", None)).await;
    ws_next_json(&mut ws).await;
    eventually("the failed registration to be counted", || async {
        metric(&a, r#"push_registry_errors_total{op="register"}"#).await >= 1.0
    })
    .await;
    // A push needs the history (in the same Redis) for its ID: refused with a clear,
    // retryable answer rather than sent with an ID that could break resume.
    let r = http(a.admin_addr(), "POST", "/v1/push/erin", &[], b"too early").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "history_unavailable");
    redis.restart();
    // The next refresh writes the missing record, and pushes go through again.
    eventually(
        "erin to be registered after the registry returns",
        || async { lookup(&url, "erin").await.len() == 1 },
    )
    .await;
    push(&a, "erin", "delivered again").await;
    assert_eq!(ws_next_json(&mut ws).await["data"], "delivered again");
    drop(ws);
}

/// A registration that failed is tried again within seconds, not only by the periodic
/// refresh (here 80–120 s away, past the wait of `eventually`): a user who connected while
/// the registry was down can be found soon after it returns.
#[tokio::test]
async fn a_registration_that_failed_is_written_soon_after_the_registry_returns() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let mut cfg = node("node-a", &url);
    cfg.registry_ttl = Duration::from_secs(300);
    let a: Server = start(cfg).await;
    let mut ws = ws_connect(&a, &token(&a, "fay", None)).await;
    ws_next_json(&mut ws).await;
    eventually("the failed registration to be counted", || async {
        metric(&a, r#"push_registry_errors_total{op="register"}"#).await >= 1.0
    })
    .await;
    redis.restart();
    eventually("fay to be registered by a retry", || async {
        lookup(&url, "fay").await.len() == 1
    })
    .await;
    assert!(metric(&a, r#"push_registry_ops_total{op="register_retry"}"#).await >= 1.0);
    assert_eq!(
        metric(&a, r#"push_registry_ops_total{op="refresh"}"#).await,
        0.0
    );
    drop(ws);
}

/// With a shared registry and history, any node's admin API reaches a user on another node:
/// the message is kept once and arrives live, with the same ID sequence the user's own node
/// continues, so a later resume finds no hole and no orphan.
#[tokio::test]
async fn an_admin_push_to_any_node_reaches_the_user_on_another_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = start(node("node-a", &url)).await;
    let b = start(node("node-b", &url)).await;
    let t = token(&b, "zoe", Some("phone"));
    let mut zoe = ws_connect(&b, &t).await;
    ws_next_json(&mut zoe).await;
    eventually("zoe to be registered", || async {
        lookup(&url, "zoe").await.len() == 1
    })
    .await;
    let via_a = push(&a, "zoe", "through node a").await;
    assert_eq!(via_a["delivered"], 1, "{via_a}");
    assert_eq!(via_a["stored"], false);
    let m = ws_next_json(&mut zoe).await;
    assert_eq!(
        (&m["data"], &m["id"]),
        (&serde_json::json!("through node a"), &via_a["id"])
    );
    let via_b = push(&b, "zoe", "through node b").await;
    assert_eq!(via_b["id"].as_u64(), via_a["id"].as_u64().map(|i| i + 1));
    assert_eq!(ws_next_json(&mut zoe).await["data"], "through node b");
    assert!(metric(&a, "push_forwarded_total").await >= 1.0);
    // The history holds each message once: a resume from before both sees exactly two.
    drop(zoe);
    let since = via_a["id"].as_u64().unwrap() - 1;
    let (mut again, _) = ws_connect_with(&a, &format!("?token={t}&since={since}"), &[])
        .await
        .unwrap();
    ws_next_json(&mut again).await;
    assert_eq!(ws_next_json(&mut again).await["data"], "through node a");
    assert_eq!(ws_next_json(&mut again).await["data"], "through node b");
    // A user connected nowhere: kept, nothing forwarded.
    let nobody = push(&a, "nobody", "kept").await;
    assert_eq!(
        (nobody["delivered"].as_u64(), nobody["stored"].as_bool()),
        (Some(0), Some(true))
    );
}

/// A client asked to reconnect (here: its node drains) resumes on another node; a push that
/// still reaches the node it is leaving is also handed to the new node, so the client gets
/// it even if it stops reading the old connection.
#[tokio::test]
async fn a_push_to_a_connection_being_left_follows_the_client_to_its_new_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut cfg = node("node-a", &url);
    cfg.lifecycle.drain_window = Duration::from_millis(200);
    cfg.sweep_interval = Duration::from_millis(50);
    let a = start(cfg).await;
    let b = start(node("node-b", &url)).await;
    let t = token(&a, "yan", Some("phone"));
    let mut old = ws_connect(&a, &t).await;
    ws_next_json(&mut old).await;
    let first = push(&a, "yan", "before").await;
    assert_eq!(ws_next_json(&mut old).await["data"], "before");
    a.drain();
    let ask = ws_next_json(&mut old).await;
    assert_eq!(
        (ask["type"].as_str(), ask["reason"].as_str()),
        (Some("reconnect"), Some("drain"))
    );
    // The client resumes on node B from the last ID it saw, and reads only the new connection.
    let since = first["id"].as_u64().unwrap();
    let (mut new, _) = ws_connect_with(&b, &format!("?token={t}&since={since}"), &[])
        .await
        .unwrap();
    ws_next_json(&mut new).await;
    // A backend still pushing through node A (the old connection is open, not yet closed).
    let r = push(&a, "yan", "after").await;
    assert_eq!(
        r["delivered"], 2,
        "old connection and forwarded to the new one: {r}"
    );
    let m = ws_next_json(&mut new).await;
    assert_eq!(
        (&m["data"], &m["id"]),
        (&serde_json::json!("after"), &r["id"])
    );
    drop(old);
}

/// Appends a message to `user`'s history in Redis the way a message processor does, without
/// delivering it: as if its delivery went to a node the client had just left.
async fn append_undelivered(url: &str, user: &str, device: Option<&str>, data: &str) -> u64 {
    let store = push_registry::open_store(url, push_registry::BufferLimits::default())
        .await
        .unwrap();
    let message = push_registry::NewMessage {
        user,
        mid: None,
        device,
        traceparent: None,
        json: false,
        data: data.as_bytes(),
    };
    store.append(&[message]).await.unwrap()[0].id
}

/// One user's IDs are consecutive: a live message that would make a connected client skip
/// one (a delivery that went to a node the client had just left) makes the node read what
/// lies between from the history and send it first, in order. Otherwise the client would
/// resume from the later ID and never get the earlier one.
#[tokio::test]
async fn a_message_that_missed_a_connected_client_is_sent_before_the_next_one() {
    let redis = RedisServer::start();
    let server = start(node("node-a", &redis.url())).await;
    // One client resumes (since=0), one asked for no history: both are owed what they skip
    // once they stand somewhere.
    let t = token(&server, "zoe", None);
    let (mut resumed, _) = ws_connect_with(&server, &format!("?token={t}&since=0"), &[])
        .await
        .unwrap();
    let (mut live, _) = ws_connect_with(&server, &format!("?token={t}"), &[])
        .await
        .unwrap();
    for ws in [&mut resumed, &mut live] {
        assert_eq!(ws_next_json(ws).await["type"], "hello");
    }
    push(&server, "zoe", "one").await;
    let mut first = 0;
    for ws in [&mut resumed, &mut live] {
        let one = ws_next_json(ws).await;
        assert_eq!(one["data"], "one");
        first = one["id"].as_u64().unwrap();
    }
    let lost = append_undelivered(&redis.url(), "zoe", None, "two").await;
    assert_eq!(lost, first + 1);
    push(&server, "zoe", "three").await;
    for ws in [&mut resumed, &mut live] {
        let two = ws_next_json(ws).await;
        assert_eq!(
            (two["data"].as_str(), two["id"].as_u64()),
            (Some("two"), Some(lost))
        );
        let three = ws_next_json(ws).await;
        assert_eq!(
            (three["data"].as_str(), three["id"].as_u64()),
            (Some("three"), Some(lost + 1))
        );
    }
}

/// What a catch-up reads is filtered like a resume: a skipped message for another device is
/// not sent, and the phone just goes on.
#[tokio::test]
async fn a_catch_up_sends_only_what_is_for_the_clients_device() {
    let redis = RedisServer::start();
    let server = start(node("node-a", &redis.url())).await;
    let t = token(&server, "yan", Some("phone"));
    let (mut phone, _) = ws_connect_with(&server, &format!("?token={t}&since=0"), &[])
        .await
        .unwrap();
    assert_eq!(ws_next_json(&mut phone).await["type"], "hello");
    append_undelivered(&redis.url(), "yan", Some("watch"), "for the watch").await;
    append_undelivered(&redis.url(), "yan", Some("phone"), "for the phone").await;
    push(&server, "yan", "for everyone").await;
    assert_eq!(ws_next_json(&mut phone).await["data"], "for the phone");
    assert_eq!(ws_next_json(&mut phone).await["data"], "for everyone");
}

/// A user's history expires while the client stays connected (no message for twice the
/// history age): the next message's ID restarts from the clock, far above the last one. That
/// step is not a loss, and the client gets the message without a `gap`.
#[tokio::test]
async fn ids_that_restart_after_the_history_expired_are_not_reported_as_a_gap() {
    let redis = RedisServer::start();
    let mut cfg = node("node-a", &redis.url());
    cfg.history_age = Duration::from_secs(1);
    let server = start(cfg).await;
    let t = token(&server, "vic", None);
    let (mut ws, _) = ws_connect_with(&server, &format!("?token={t}&since=0"), &[])
        .await
        .unwrap();
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    push(&server, "vic", "before").await;
    let before = ws_next_json(&mut ws).await["id"].as_u64().unwrap();
    // The history key lives twice the history age after its last write.
    let gone = testkit::poll_until(Duration::from_secs(30), || {
        let exists = redis.command(&["EXISTS", "ph:{vic}"]);
        std::future::ready(matches!(exists, testkit::resp::Reply::Int(0)))
    })
    .await;
    assert!(gone, "the history key never expired");
    push(&server, "vic", "after").await;
    let after = ws_next_json(&mut ws).await;
    assert_eq!(
        (after["type"].as_str(), after["data"].as_str()),
        (Some("message"), Some("after")),
        "{after}"
    );
    assert!(
        after["id"].as_u64().unwrap() > before + 1,
        "IDs did not restart: {after}"
    );
}
