//! Resume and receipts through the whole pipeline: push-lib → Kafka (librdkafka's mock
//! cluster) → msg-processor → push-server nodes sharing a Redis registry and history →
//! WebSocket clients, and receipts back through Kafka.
//!
//! Every wait has a deadline; the churn test's pauses pace the producer and the node restart
//! (they shape the scenario, nothing is asserted about speed).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use msg_processor::Stats;
use push_lib::{Error, KafkaConfig, MessageId, PushClient, SendOptions};
use push_server::{Config, Server};
use tokio_tungstenite::tungstenite::Message;

const TEST_DEADLINE: Duration = Duration::from_secs(150);

/// Runs a test body on its own runtime, bounded by [`TEST_DEADLINE`], and shuts the runtime
/// down before returning. Why not `#[tokio::test]`: the Kafka clients living in the body's
/// tasks (the processor's consumer, the nodes' receipt producers, push-lib's receipt
/// listener) must close while the mock cluster still runs; closing a consumer whose broker is
/// gone can wait for ever. The caller drops the cluster after this returns.
fn run(body: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(TEST_DEADLINE, body)
            .await
            .expect("test finished in time")
    });
    rt.shutdown_timeout(Duration::from_secs(10));
}

/// A node that publishes receipts to `brokers`, with connection lifetimes of `lifetime`
/// (± 30 %) when given.
async fn receipt_node(
    id: &str,
    registry: &str,
    brokers: &str,
    lifetime: Option<Duration>,
) -> Server {
    let mut cfg = Config::local_test(SECRET);
    cfg.node_id = id.into();
    cfg.registry = registry.parse().expect("registry URL");
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin_security.internal_secret = Some(INTERNAL_SECRET.into());
    cfg.receipts_brokers = Some(brokers.into());
    if let Some(l) = lifetime {
        cfg.lifecycle.lifetime = l;
        cfg.lifecycle.lifetime_jitter = 0.3;
        cfg.lifecycle.reconnect_grace = Duration::from_secs(1);
        cfg.sweep_interval = Duration::from_millis(100);
    }
    Server::start(cfg).await.expect("node starts")
}

fn token(user: &str) -> String {
    // Any node verifies a token signed with the shared secret; mint with a throwaway
    // authenticator of the same secret.
    push_proto::auth::Authenticator::new(SECRET.as_bytes(), false).mint(
        user,
        Some("phone"),
        Duration::from_secs(3600),
    )
}

#[test]
fn a_receipt_travels_from_push_lib_through_kafka_to_a_websocket_client_and_back() {
    let kafka = MockKafka::start();
    kafka.create_topic("push", 2);
    kafka.create_topic("push-dlq", 1);
    kafka.create_topic("push-receipts", 2);
    let brokers = kafka.brokers();
    run(async {
        let redis = testkit::RedisServer::start();
        let node = receipt_node("node-a", &redis.url(), &brokers, None).await;
        let p = processor(settings(&brokers, "push", &redis.url())).await;

        // A client that acknowledges every message it gets.
        let url = format!("ws://{}/ws?token={}", node.client_addr(), token("rita"));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let acker = tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if let Message::Text(t) = frame {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "message" {
                        let ack = serde_json::json!({"type": "ack", "id": v["id"]});
                        ws.send(Message::Text(ack.to_string().into()))
                            .await
                            .unwrap();
                    }
                }
            }
        });
        wait_registered(&redis.url(), &[("rita".into(), "node-a".into())]).await;

        let client = PushClient::kafka(
            &KafkaConfig::new(brokers.clone(), "push").set("fetch.wait.max.ms", "50"),
        )
        .unwrap();
        let options = SendOptions {
            id: Some(MessageId::new("order-shipped-17").unwrap()),
            ..SendOptions::default()
        };
        let receipt = client
            .send_and_wait_receipt(
                "rita",
                serde_json::json!({"order": 17}),
                &options,
                Duration::from_secs(30),
            )
            .await
            .expect("a receipt");
        assert_eq!(receipt.user, "rita");
        assert_eq!(receipt.device.as_deref(), Some("phone"));
        assert_eq!(receipt.mid.as_deref(), Some("order-shipped-17"));
        assert_eq!(receipt.node, "node-a");
        assert_eq!(receipt.transport.as_str(), "ws");
        assert!(receipt.acked_at_ms >= receipt.sent_at_ms);

        // Nobody is connected for this user: the message is kept, no receipt comes.
        let err = client
            .send_and_wait_receipt(
                "nobody",
                "hello?",
                &SendOptions::default(),
                Duration::from_millis(1500),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ReceiptTimeout { .. }), "{err}");
        acker.abort();
        p.shutdown().await;
    });
    drop(kafka);
}

/// What one rotating client saw, by message ID.
#[derive(Default)]
struct Seen {
    /// `(id, seq)` in arrival order, over all its connections.
    messages: Vec<(u64, u64)>,
    /// `reconnect` requests followed.
    rotations: u64,
    /// Connections that ended without a `reconnect` (the node went away).
    dropped: u64,
    /// `gap` messages (must stay 0: the history covers the whole run).
    gaps: u64,
}

/// A client that behaves as docs/protocol.md asks: on `reconnect` it opens a new connection
/// (to the next node) resuming from the last ID it saw, then closes the old one; when a
/// connection drops it reconnects and resumes the same way.
async fn rotating_client(user: String, nodes: Arc<Mutex<Vec<SocketAddr>>>, seen: Arc<Mutex<Seen>>) {
    let token = token(&user);
    let mut last: u64 = 0;
    let mut turn = 0usize;
    let connect = |last: u64, turn: usize| {
        let nodes = nodes.clone();
        let token = token.clone();
        async move {
            loop {
                let addr = {
                    let n = nodes.lock().unwrap();
                    n[turn % n.len()]
                };
                let url = format!("ws://{addr}/ws?token={token}&since={last}");
                match tokio_tungstenite::connect_async(url).await {
                    Ok((ws, _)) => return ws,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };
    let mut ws = connect(last, turn).await;
    loop {
        let frame = ws.next().await;
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            // The node went away: reconnect elsewhere and resume.
            _ => {
                seen.lock().unwrap().dropped += 1;
                turn += 1;
                ws = connect(last, turn).await;
                continue;
            }
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        match v["type"].as_str() {
            Some("message") => {
                let id = v["id"].as_u64().unwrap();
                let seq = v["data"]["seq"].as_u64().unwrap();
                seen.lock().unwrap().messages.push((id, seq));
                last = last.max(id);
            }
            Some("reconnect") => {
                turn += 1;
                let new = connect(last, turn).await;
                let mut old = std::mem::replace(&mut ws, new);
                let _ = old.close(None).await;
                seen.lock().unwrap().rotations += 1;
            }
            Some("gap") => seen.lock().unwrap().gaps += 1,
            _ => {}
        }
    }
}

/// Clients rotate every ~2 s (lifetimes with jitter) between two nodes, and one node is
/// stopped and started again in the middle, while messages flow through Kafka: every message
/// reaches its client exactly once after deduplication by ID, in order.
#[test]
fn churn_with_a_node_restart_loses_nothing() {
    const USERS: usize = 20;
    const PER_USER: u64 = 40;
    let kafka = MockKafka::start();
    kafka.create_topic("push", 4);
    kafka.create_topic("push-dlq", 1);
    kafka.create_topic("push-receipts", 1);
    let brokers = kafka.brokers();
    run(async {
        let redis = testkit::RedisServer::start();
        let lifetime = Some(Duration::from_secs(2));
        let a = receipt_node("node-a", &redis.url(), &brokers, lifetime).await;
        let b = receipt_node("node-b", &redis.url(), &brokers, lifetime).await;
        let nodes = Arc::new(Mutex::new(vec![a.client_addr(), b.client_addr()]));
        let p = processor(settings(&brokers, "push", &redis.url())).await;

        let users: Vec<String> = (0..USERS).map(|i| format!("churn-{i}")).collect();
        let seen: HashMap<String, Arc<Mutex<Seen>>> =
            users.iter().map(|u| (u.clone(), Arc::default())).collect();
        let clients: Vec<_> = users
            .iter()
            .map(|u| tokio::spawn(rotating_client(u.clone(), nodes.clone(), seen[u].clone())))
            .collect();
        // Every client connected and registered (on whichever node) before messages flow.
        let registry = push_registry::open(&redis.url()).await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while registry
            .lookup_many(&users)
            .await
            .unwrap()
            .iter()
            .any(Vec::is_empty)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "clients not registered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let client = producer(&brokers, "push");
        let sent = Arc::new(AtomicU64::new(0));
        let restart_at = PER_USER / 3;
        let mut a = Some(a);
        let mut cut_at_restart = 0;
        for n in 0..PER_USER {
            produce(&client, &users, n..n + 1).await;
            sent.fetch_add(users.len() as u64, Ordering::Relaxed);
            // About 5 messages a second per user: the run spans several lifetimes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if n == restart_at {
                // Node A goes away (its clients are cut off) and comes back on new ports;
                // first make sure it holds some clients (they keep moving between nodes).
                let old = a.take().expect("node A runs");
                eventually("some clients on node A", || {
                    std::future::ready(old.hub().open_total() >= USERS / 4)
                })
                .await;
                cut_at_restart = old.hub().open_total();
                old.stop();
                tokio::time::sleep(Duration::from_millis(500)).await;
                let again = receipt_node("node-a", &redis.url(), &brokers, lifetime).await;
                nodes.lock().unwrap()[0] = again.client_addr();
                a = Some(again);
            }
        }
        let want: Vec<u64> = (0..PER_USER).collect();
        let complete = |s: &Seen| {
            let mut ids: Vec<u64> = s.messages.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() as u64 >= PER_USER
        };
        let all_arrived = testkit::poll_until(WAIT, || {
            std::future::ready(seen.values().all(|s| complete(&s.lock().unwrap())))
        })
        .await;
        if !all_arrived {
            // Which user lacks which sequence numbers, and what that user went through:
            // tells a lost message (a hole below the last one seen) from a slow one.
            let mut report = Vec::new();
            for (user, s) in &seen {
                let s = s.lock().unwrap();
                if complete(&s) {
                    continue;
                }
                let got: std::collections::HashSet<u64> =
                    s.messages.iter().map(|(_, seq)| *seq).collect();
                let missing: Vec<u64> = want.iter().copied().filter(|q| !got.contains(q)).collect();
                report.push(format!(
                    "{user}: missing seq {missing:?}; last id {:?}, rotations {}, dropped {}, gaps {}",
                    s.messages.iter().map(|(id, _)| *id).max(),
                    s.rotations,
                    s.dropped,
                    s.gaps
                ));
            }
            panic!(
                "timed out after {WAIT:?} waiting for every message at every client (node A \
                 held {cut_at_restart} clients when it stopped):\n{}",
                report.join("\n")
            );
        }
        let mut rotations = 0;
        let mut dropped = 0;
        for (user, s) in &seen {
            let s = s.lock().unwrap();
            // Dedup by ID in arrival order, as a client does; IDs must then increase.
            let mut last = 0;
            let mut seqs = Vec::new();
            let mut by_id: HashMap<u64, u64> = HashMap::new();
            for &(id, seq) in &s.messages {
                if id > last {
                    seqs.push(seq);
                    by_id.insert(id, seq);
                    last = id;
                } else {
                    // Below the last ID: only a repeat of a message already seen (the old
                    // connection of a rotation) is allowed, never a new one out of order.
                    assert_eq!(by_id.get(&id), Some(&seq), "{user}: ID {id} out of order");
                }
            }
            assert_eq!(seqs, want, "{user}: every message once, in order");
            assert_eq!(s.gaps, 0, "{user}: the history covered every resume");
            rotations += s.rotations;
            dropped += s.dropped;
        }
        assert!(rotations >= USERS as u64, "clients rotated ({rotations})");
        assert!(cut_at_restart > 0, "the restart cut connections");
        assert_eq!(Stats::get(&p.stats().dead_lettered), 0);
        eprintln!(
            "churn: {} messages to {USERS} users, {rotations} rotations, node A restarted with {cut_at_restart} connections open ({dropped} clients saw theirs cut)",
            sent.load(Ordering::Relaxed)
        );
        for c in clients {
            c.abort();
        }
        p.shutdown().await;
    });
    drop(kafka);
}
