//! push-lib against real peers: librdkafka's mock cluster (a Kafka protocol peer over TCP)
//! for the Kafka transport and the `push-send` CLI, and a push-server node on port 0 for
//! the direct transport. Every wait has a deadline.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use push_lib::{Accepted, DeliverConfig, Envelope, KafkaConfig, Outcome, PushClient, SendOptions};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::ClientConfig;
use testkit::kafka::MockKafka;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);
const ADMIN_TOKEN: &str = "direct-admin-token-0123";
const INTERNAL_SECRET: &str = "direct-internal-secret-0123";
const SECRET: &str = "push-lib-test-secret-0123456789";

/// Reads `n` records of `topic` from the start: key, envelope, partition.
async fn read(brokers: &str, topic: &str, n: usize) -> Vec<(String, Envelope, i32)> {
    read_with_traceparent(brokers, topic, n)
        .await
        .into_iter()
        .map(|(k, e, p, _)| (k, e, p))
        .collect()
}

/// [`read`], with each record's `traceparent` header.
async fn read_with_traceparent(
    brokers: &str,
    topic: &str,
    n: usize,
) -> Vec<(String, Envelope, i32, Option<String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("record in time")
            .expect("record");
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let env = Envelope::decode(m.payload().unwrap()).expect("decodes");
        let traceparent = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "traceparent")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        });
        out.push((key, env, m.partition(), traceparent));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_send_is_acknowledged_keyed_by_user_and_in_order_per_user() {
    let cluster = MockKafka::start();
    cluster.create_topic("push", 4);
    let brokers = cluster.brokers();
    let client = PushClient::kafka(&KafkaConfig::new(&brokers, "push")).unwrap();
    let opts = SendOptions {
        ttl: Some(Duration::from_secs(60)),
        ..SendOptions::default()
    };
    let receipt = client.send("alice", "hello", &opts).await.expect("acked");
    assert!(matches!(receipt.accepted, Accepted::Queued(_)));
    let envs: Vec<Envelope> = (0..40)
        .map(|n| Envelope::new(format!("u{}", n % 4), serde_json::json!({ "n": n })))
        .collect();
    for r in client.send_batch(envs).await {
        r.expect("acked");
    }
    let got = read(&brokers, "push", 41).await;
    let (key, first, _) = &got.iter().find(|(k, _, _)| k == "alice").unwrap();
    assert_eq!(key, "alice");
    assert_eq!(first.id, receipt.id);
    assert_eq!(first.data, "hello");
    assert_eq!(first.ttl_ms, Some(60_000));
    let mut per_user: HashMap<String, (Vec<u64>, i32)> = HashMap::new();
    for (key, env, partition) in got.into_iter().filter(|(k, _, _)| k != "alice") {
        assert_eq!(key, env.user, "key = user ID");
        let e = per_user.entry(key).or_insert((Vec::new(), partition));
        assert_eq!(e.1, partition, "one partition per user");
        e.0.push(env.data["n"].as_u64().unwrap());
    }
    for (user, (ns, _)) in per_user {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "{user}'s messages in order");
        assert_eq!(ns.len(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_envelope_is_refused_before_sending() {
    let cluster = MockKafka::start();
    let client = PushClient::kafka(&KafkaConfig::new(cluster.brokers(), "push")).unwrap();
    let err = client
        .send("", "x", &SendOptions::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("`user`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_send_cli_spreads_count_messages_over_users() {
    let cluster = MockKafka::start();
    cluster.create_topic("push", 4);
    let brokers = cluster.brokers();
    let bin = env!("CARGO_BIN_EXE_push-send");
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(bin)
            .args(["--brokers", &brokers, "--topic", "push", "--users", "5"])
            .args([
                "--count",
                "50",
                "--rate",
                "0",
                "--data",
                r#"{"n":{n},"u":"{user}"}"#,
            ])
            .arg("--json")
            .env_remove("PUSH_BROKERS")
            .output(),
    )
    .await
    .expect("push-send finishes in time")
    .expect("push-send runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sent=50 failed=0"), "{stdout}");
    let got = read(&brokers, "push", 50).await;
    for (key, env, _) in &got {
        assert_eq!(env.data["u"], key.as_str());
        let n = env.data["n"].as_u64().unwrap();
        assert_eq!(*key, format!("user-{}", n % 5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_send_continues_a_b3_callers_trace_in_the_envelope_and_the_record_header() {
    let cluster = MockKafka::start();
    cluster.create_topic("push", 1);
    let brokers = cluster.brokers();
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_push-send"))
            .args(["--brokers", &brokers, "--topic", "push", "--user", "bob"])
            .args([
                "--trace-header",
                "B3=4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            ])
            .env_remove("PUSH_BROKERS")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .output(),
    )
    .await
    .expect("push-send finishes in time")
    .expect("push-send runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = read_with_traceparent(&brokers, "push", 1).await;
    // Tracing is off in this push-send: the caller's context passes through unchanged.
    let want = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(got[0].1.traceparent.as_deref(), Some(want));
    assert_eq!(got[0].3.as_deref(), Some(want));
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_transport_delivers_through_a_node_s_deliver_endpoint() {
    let mut cfg = push_server::Config::local_test(SECRET);
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin_security.internal_secret = Some(INTERNAL_SECRET.into());
    let server = push_server::Server::start(cfg).await.unwrap();
    let token = server.mint_token("alice", None, Duration::from_secs(600));
    let url = format!("ws://{}/ws?token={token}", server.client_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");

    let admin = format!("http://{}", server.admin_addr());
    let good = DeliverConfig {
        internal_secret: Some(INTERNAL_SECRET.into()),
        ..DeliverConfig::default()
    };
    let client = PushClient::direct(&admin, &good).unwrap();
    let env = Envelope::new("alice", serde_json::json!({"a": 1}));
    let id = env.id.clone();
    let results = client
        .send_batch(vec![env.clone(), env, Envelope::new("nobody", "x")])
        .await;
    let outcomes: Vec<Outcome> = results
        .into_iter()
        .map(|r| match r.unwrap().accepted {
            Accepted::Direct(o) => o,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        matches!(outcomes[0], Outcome::Delivered { connections: 1, .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Duplicate, "same message ID again");
    assert!(
        matches!(outcomes[2], Outcome::Stored { id: Some(_) }),
        "a user with no connection: kept for their resume, {outcomes:?}"
    );
    let msg = next_json(&mut ws).await;
    assert_eq!(msg["mid"], id.as_str());
    assert_eq!(msg["data"]["a"], 1);

    let wrong = PushClient::direct(
        &admin,
        &DeliverConfig {
            // The admin token is not the internal secret.
            admin_token: Some(ADMIN_TOKEN.into()),
            ..DeliverConfig::default()
        },
    )
    .unwrap();
    let err = wrong
        .send("alice", "x", &SendOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, push_lib::Error::Http { status: 401, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn direct_send_and_wait_receipt_returns_the_clients_acknowledgement() {
    let mut cfg = push_server::Config::local_test(SECRET);
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    let server = push_server::Server::start(cfg).await.unwrap();
    let token = server.mint_token("bob", Some("tablet"), Duration::from_secs(600));
    let url = format!("ws://{}/ws?token={token}", server.client_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let client = PushClient::direct(
        &format!("http://{}", server.admin_addr()),
        &DeliverConfig {
            admin_token: Some(ADMIN_TOKEN.into()),
            ..DeliverConfig::default()
        },
    )
    .unwrap();
    let options = SendOptions {
        id: Some(push_lib::MessageId::new("invoice-9").unwrap()),
        ..SendOptions::default()
    };
    let waiting = tokio::spawn(async move {
        client
            .send_and_wait_receipt("bob", "paid", &options, Duration::from_secs(10))
            .await
    });
    let msg = next_json(&mut ws).await;
    assert_eq!(msg["mid"], "invoice-9");
    let ack = serde_json::json!({"type": "ack", "id": msg["id"]}).to_string();
    ws.send(Message::Text(ack.into())).await.unwrap();
    let receipt = waiting.await.unwrap().expect("receipt");
    assert_eq!(receipt.mid.as_deref(), Some("invoice-9"));
    assert_eq!(receipt.device.as_deref(), Some("tablet"));
    assert_eq!(Some(receipt.id), msg["id"].as_u64());
}

/// A "node" whose answer is valid JSON padded far past any real answer: the client stops
/// reading at `MAX_ANSWER_BYTES` instead of buffering whatever a registry record points at.
#[tokio::test]
async fn a_nodes_answer_is_read_only_up_to_a_bound() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = s.read(&mut buf).await;
        let pad = "x".repeat(push_lib::direct::MAX_ANSWER_BYTES + 1024);
        let body = format!(r#"{{"results":[{{"outcome":"stored","id":1}}],"pad":"{pad}"}}"#);
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(body.as_bytes()).await;
    });
    let client = push_lib::direct::DeliverClient::new(&DeliverConfig::default()).unwrap();
    let env = Envelope::new("alice", "x");
    let err = client
        .deliver(&addr.to_string(), &[&env])
        .await
        .expect_err("an oversized answer is refused");
    assert!(err.to_string().contains("length limit"), "{err}");
}
