//! The whole pipeline in one process: a Kafka peer (librdkafka's mock cluster, or a real
//! broker), push-lib producing, msg-processors, push-server nodes sharing a Redis registry,
//! and WebSocket clients that record what they receive.

#![allow(dead_code)] // each test uses a different part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use msg_processor::{Processor, Settings};
use push_lib::{KafkaConfig, PushClient};
use push_server::{Config, Server};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "msg-processor-test-secret-0123456789";
pub const ADMIN_TOKEN: &str = "shared-deliver-secret";
/// The nodes' and processors' `--internal-secret` (the processor sends it, not the token).
pub const INTERNAL_SECRET: &str = "internal-deliver-secret-0123";

/// Upper bound for one wait: generous for a loaded CI machine; a hang still ends the test.
pub const WAIT: Duration = Duration::from_secs(45);

#[allow(unused_imports)] // not every test binary polls
pub use testkit::eventually;
pub use testkit::kafka::MockKafka;

/// Processor settings for tests: fast group membership and retries.
pub fn settings(brokers: &str, topic: &str, registry: &str) -> Settings {
    let mut s = Settings::new(brokers, topic, "test-group", registry);
    s.admin_token = Some(ADMIN_TOKEN.into());
    s.internal_secret = Some(INTERNAL_SECRET.into());
    s.dead_letter_topic = Some(format!("{topic}-dlq"));
    s.batch_size = 100;
    s.retry_backoff = Duration::from_millis(50);
    s.retry_backoff_max = Duration::from_millis(300);
    // About 10 s of retries: long enough for a test to move the users to another node.
    s.max_attempts = 40;
    s.deliver_timeout = Duration::from_secs(2);
    s.session_timeout = Duration::from_secs(6);
    s.shutdown_timeout = Duration::from_secs(5);
    // Rejoining a rebalance waits for the next heartbeat: keep that short.
    s.kafka.push(("heartbeat.interval.ms".into(), "300".into()));
    s.kafka.push(("fetch.wait.max.ms".into(), "50".into()));
    s
}

pub async fn processor(settings: Settings) -> Processor {
    Processor::start(settings).await.expect("processor starts")
}

pub fn producer(brokers: &str, topic: &str) -> PushClient {
    PushClient::kafka(&KafkaConfig::new(brokers, topic)).expect("producer")
}

/// A push-server node on port 0 registering in `registry`.
pub async fn node(id: &str, registry: &str, advertise: Option<SocketAddr>) -> Server {
    let mut cfg = Config::local_test(SECRET);
    cfg.node_id = id.into();
    cfg.registry = registry.parse().expect("registry URL");
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin_security.internal_secret = Some(INTERNAL_SECRET.into());
    cfg.advertise_addr = advertise.map(|a| a.to_string());
    Server::start(cfg).await.expect("node starts")
}

/// A client's WebSocket to a node.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Connects `user` (device `d`) to `server` and waits for `hello`.
pub async fn connect_ws(server: &Server, user: &str) -> Ws {
    let token = server.mint_token(user, Some("d"), Duration::from_secs(3600));
    let url = format!("ws://{}/ws?token={token}", server.client_addr());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("websocket handshake");
    let hello = next_text(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    ws
}

/// The next text frame on `ws`, as JSON (pings and other frames skipped).
async fn next_text(ws: &mut Ws) -> serde_json::Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// The next `message` the node sends on `ws` (control messages skipped), whole.
pub async fn next_message(ws: &mut Ws) -> serde_json::Value {
    loop {
        let v = next_text(ws).await;
        if v["type"] == "message" {
            return v;
        }
    }
}

/// What one client saw: `(mid, data)` per message, in arrival order.
pub type Inbox = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A WebSocket client that records every `message` until dropped.
pub struct Client {
    pub user: String,
    pub inbox: Inbox,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects `user` (device `d`) to `server` and waits for `hello`.
    pub async fn connect(server: &Server, user: &str, inbox: Inbox) -> Self {
        let mut ws = connect_ws(server, user).await;
        let sink = inbox.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(frame)) = ws.next().await {
                if let Message::Text(t) = frame {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "message" {
                        let mid = v["mid"].as_str().unwrap_or_default().to_owned();
                        sink.lock().unwrap().push((mid, v["data"].clone()));
                    }
                }
            }
        });
        Self {
            user: user.to_owned(),
            inbox,
            task,
        }
    }
}

/// Waits until the registry holds a record of every user on the expected node.
pub async fn wait_registered(registry: &str, users: &[(String, String)]) {
    let reg = push_registry::open(registry).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let names: Vec<String> = users.iter().map(|(u, _)| u.clone()).collect();
        let found = reg.lookup_many(&names).await.unwrap();
        let ok = users
            .iter()
            .zip(&found)
            .all(|((_, node), recs)| recs.iter().any(|r| &r.node_id == node));
        if ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "users not registered in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `seq` of each distinct message ID in arrival order (redeliveries dropped, as a
/// client deduplicating by `mid` would), checking that a redelivery carries the same data.
pub fn first_seen(inbox: &Inbox) -> Vec<u64> {
    let got = inbox.lock().unwrap();
    let mut seen: HashMap<&str, &serde_json::Value> = HashMap::new();
    let mut out = Vec::new();
    for (mid, data) in got.iter() {
        assert!(!mid.is_empty(), "queue messages carry a mid: {data}");
        match seen.get(mid.as_str()) {
            Some(prev) => assert_eq!(*prev, data, "a redelivery has the same data"),
            None => {
                seen.insert(mid, data);
                out.push(data["seq"].as_u64().expect("seq"));
            }
        }
    }
    out
}

/// Produces `per_user` messages `{"seq": n}` to each user, round robin, in order per user.
pub async fn produce(client: &PushClient, users: &[String], seqs: std::ops::Range<u64>) {
    let mut envs = Vec::new();
    for n in seqs {
        for u in users {
            envs.push(push_lib::Envelope::new(
                u.clone(),
                serde_json::json!({ "seq": n }),
            ));
        }
    }
    for r in client.send_batch(envs).await {
        r.expect("broker acknowledges");
    }
}

/// A TCP forwarder in front of a node's admin port, so a test can make the node unreachable
/// (as a crash would) while its registry records stay behind. Bound before the node starts
/// (the node advertises the proxy's address), pointed at the node afterwards.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (c, t) = (conns.clone(), target.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Some(to) = *t.lock().unwrap() else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            target,
            conns,
            accept,
        }
    }

    pub fn forward_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = Some(target);
    }

    /// Closes the port and every forwarded connection.
    pub async fn kill(&self) {
        self.accept.abort();
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
        // Wait until the port refuses, so the next delivery attempt fails for sure.
        let deadline = tokio::time::Instant::now() + WAIT;
        while TcpStream::connect(self.addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy did not close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Produces `records` to topic `push`, keyed `u`, as a producer without push-lib would: any
/// bytes, or none (`None`: a record without a payload). Each one acknowledged.
pub async fn produce_raw(brokers: &str, records: &[Option<Vec<u8>>]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for r in records {
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to("push").key("u");
        if let Some(p) = r {
            rec = rec.payload(p);
        }
        raw.send(rec, Duration::from_secs(5)).await.expect("ack");
    }
}
