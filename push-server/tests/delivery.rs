//! Delivery under load and abuse (issue 14): a burst reaches a client that reads, a client
//! that does not is cut off, `delivered` means written, acks are bounded and deduplicated,
//! and a resume's backlog counts against the queue's byte limit. Real clients on port 0.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A burst far above the default 64-frame queue.
const BURST: usize = 1000;

fn batch(user: &str, n: usize) -> Vec<u8> {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"user": user, "data": format!("m{i}")}))
        .collect();
    serde_json::to_vec(&items).unwrap()
}

async fn push_batch(server: &push_server::Server, body: &[u8]) -> Value {
    let r = http(server.admin_addr(), "POST", "/v1/push", &[], body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[tokio::test]
async fn a_burst_of_a_thousand_in_one_batch_reaches_a_reading_websocket_client_in_order() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "burst", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < BURST {
            let m = ws_next_json(&mut ws).await;
            if m["type"] == "message" {
                got.push((
                    m["id"].as_u64().unwrap(),
                    m["data"].as_str().unwrap().to_owned(),
                ));
            }
        }
        (got, ws)
    });
    let r = push_batch(&server, &batch("burst", BURST)).await;
    // Every one written to the socket before the answer: `delivered` means written.
    assert_eq!(r["delivered"], BURST, "{r}");
    let (got, _ws) = reader.await.unwrap();
    let data: Vec<String> = got.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(
        data,
        (0..BURST).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(got.windows(2).all(|w| w[1].0 > w[0].0), "IDs increase");
    assert_eq!(
        metric(&server, r#"push_disconnects_total{reason="slow_consumer"}"#).await,
        0.0
    );
    assert_eq!(
        metric(&server, r#"push_messages_delivered_total{transport="ws"}"#).await,
        BURST as f64
    );
}

#[tokio::test]
async fn a_burst_of_a_thousand_in_one_batch_reaches_a_reading_sse_client_in_order() {
    let server = start(config()).await;
    let mut sse = sse_connect(&server, &token(&server, "burst", None)).await;
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < BURST {
            let ev = sse.next_event().await.expect("stream stays open");
            if ev.event.is_empty() || ev.event == "message" {
                got.push((ev.id.unwrap().parse::<u64>().unwrap(), ev.data));
            }
        }
        got
    });
    let r = push_batch(&server, &batch("burst", BURST)).await;
    assert_eq!(r["delivered"], BURST, "{r}");
    let got = reader.await.unwrap();
    let data: Vec<String> = got.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(
        data,
        (0..BURST).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(got.windows(2).all(|w| w[1].0 > w[0].0), "IDs increase");
}

/// Frames queued behind each other leave in one `writev` (up to 16), and a socket that takes
/// only part of them gets the rest later, the partial frame first: a client with a 4 KiB
/// receive buffer that reads late and pauses now and then gets all of 1,000 messages of 8 KiB
/// (twice what the server's socket buffer grows to on loopback, so writes end part-way),
/// each whole and in order.
#[tokio::test]
async fn a_slow_reader_with_a_small_window_gets_every_queued_frame_whole_and_in_order() {
    const N: usize = 1000;
    let server = start(config()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.client_addr()).await.unwrap();
    let url = format!(
        "ws://{}/ws?token={}",
        server.client_addr(),
        token(&server, "narrow", None)
    );
    let (mut ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket handshake");
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let sent: Vec<String> = (0..N)
        .map(|i| format!("{i:04}{}", "x".repeat(8 * 1024)))
        .collect();
    let reader = tokio::spawn(async move {
        // Not reading at first, then pausing now and then: the server's queue fills and its
        // socket buffer stays full, so gathered writes end part-way through a frame.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut got = Vec::new();
        while got.len() < N {
            let m = ws_next_json(&mut ws).await;
            if m["type"] == "message" {
                got.push(m["data"].as_str().unwrap().to_owned());
                if got.len() % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        got
    });
    // In four batches: one would pass the admin API's body limit.
    for part in sent.chunks(N / 4) {
        let items: Vec<Value> = part
            .iter()
            .map(|d| json!({"user": "narrow", "data": d}))
            .collect();
        let r = push_batch(&server, &serde_json::to_vec(&items).unwrap()).await;
        assert_eq!(r["delivered"], part.len(), "{r}");
    }
    let got = reader.await.unwrap();
    assert_eq!(got.len(), N);
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert!(
            g == s,
            "message {i} arrived as {:?}…",
            &g[..g.len().min(12)]
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_nothing_it_missed_counts_as_delivered() {
    let mut cfg = config();
    cfg.slow_consumer_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    // Never reads, with a small receive window so that the kernel buffers fill.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.client_addr()).await.unwrap();
    let _stalled = raw_ws_over(
        stream,
        server.client_addr(),
        &token(&server, "stalled", None),
    )
    .await;
    let items: Vec<Value> = (0..400)
        .map(|_| json!({"user": "stalled", "data": "z".repeat(8 * 1024)}))
        .collect();
    let r = push_batch(&server, &serde_json::to_vec(&items).unwrap()).await;
    let delivered = r["delivered"].as_u64().unwrap();
    assert!(
        delivered < 400,
        "{delivered} reported delivered to a client that reads nothing"
    );
    eventually("the stalled client to be cut off", || async {
        metric(&server, r#"push_disconnects_total{reason="slow_consumer"}"#).await >= 1.0
    })
    .await;
    eventually("the stalled client to leave the hub", || async {
        server.hub().connections("stalled").is_empty()
    })
    .await;
    // What was reported delivered was written to the socket, no more.
    let written = metric(&server, r#"push_messages_delivered_total{transport="ws"}"#).await;
    assert_eq!(written, delivered as f64);
}

#[tokio::test]
async fn repeated_acks_of_one_message_make_one_receipt() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "acker", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let a = push(&server, "acker", "a").await["id"].as_u64().unwrap();
    let b = push(&server, "acker", "b").await["id"].as_u64().unwrap();
    ws_next_json(&mut ws).await;
    ws_next_json(&mut ws).await;
    // Alternating, so that each repeat passes the connection's same-as-last check and has
    // to be caught by the per-(user, id) dedup.
    for id in [a, b, a, b, a, b] {
        ws_send_json(&mut ws, json!({"type": "ack", "id": id})).await;
    }
    eventually("the acks to be handled", || async {
        metric(
            &server,
            r#"push_receipts_dropped_total{reason="duplicate"}"#,
        )
        .await
            >= 4.0
    })
    .await;
    assert_eq!(
        metric(&server, r#"push_receipts_total{transport="ws"}"#).await,
        2.0
    );
}

#[tokio::test]
async fn a_connection_cannot_ack_faster_than_its_rate() {
    let mut cfg = config();
    cfg.ack_rate = 5;
    let server = start(cfg).await;
    let mut ws = ws_connect(&server, &token(&server, "flood", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    for id in 1..=50u64 {
        ws_send_json(&mut ws, json!({"type": "ack", "id": id})).await;
    }
    // A ping after the flood: once its pong is back, every ack before it was handled.
    ws_send_json(&mut ws, json!({"type": "ping"})).await;
    loop {
        if ws_next_json(&mut ws).await["type"] == "pong" {
            break;
        }
    }
    let limited = metric(&server, r#"push_receipts_dropped_total{reason="ack_rate"}"#).await;
    // At most two windows' worth passed (the flood may straddle a second).
    assert!(limited >= 40.0, "only {limited} acks rate-limited");
    // The connection stays.
    push(&server, "flood", "still here").await;
    let m = loop {
        let m = ws_next_json(&mut ws).await;
        if m["type"] == "message" {
            break m;
        }
    };
    assert_eq!(m["data"], "still here");
}

#[tokio::test]
async fn post_ack_goes_through_the_per_ip_limit_and_the_drain_check() {
    let mut cfg = config();
    cfg.per_ip_rate = 0.001;
    cfg.per_ip_burst = 2;
    let server = start(cfg).await;
    let auth = format!("Bearer {}", token(&server, "poster", None));
    let client = server.client_addr();
    for _ in 0..2 {
        let r = http(
            client,
            "POST",
            "/ack?id=1",
            &[("Authorization", &auth)],
            b"",
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let limited = http(
        client,
        "POST",
        "/ack?id=1",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(limited.status, 429, "{}", limited.body);

    let server = start(config()).await;
    let auth = format!("Bearer {}", token(&server, "poster", None));
    let client = server.client_addr();
    let r = http(
        client,
        "POST",
        "/ack?id=1,1,1",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!((r.status, r.json()["accepted"].clone()), (202, json!(1)));
    server.drain();
    let r = http(
        client,
        "POST",
        "/ack?id=1",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("draining"), "{}", r.body);
}

#[tokio::test]
async fn a_resume_backlog_counts_against_the_queue_byte_limit() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    cfg.max_queue_bytes = 4096;
    cfg.history_messages = 50;
    let server = start(cfg).await;
    let payload = "p".repeat(900);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let r = push(&server, "late", &payload).await;
        assert_eq!(r["stored"], true, "{r}");
        ids.push(r["id"].as_u64().unwrap());
    }
    let t = token(&server, "late", None);
    let (mut ws, _) = ws_connect_with(&server, &format!("?token={t}&since=0"), &[])
        .await
        .expect("resume handshake");
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let gap = ws_next_json(&mut ws).await;
    assert_eq!(gap["type"], "gap", "{gap}");
    let oldest = gap["oldest"].as_u64().unwrap();
    // Only the newest that fit in 4 KiB were queued; the gap names the first of them.
    let mut got = Vec::new();
    while got.last() != ids.last() {
        let m = ws_next_json(&mut ws).await;
        assert_eq!(m["type"], "message", "{m}");
        got.push(m["id"].as_u64().unwrap());
    }
    assert!(
        got.len() <= 4,
        "{} backlog messages over a 4 KiB budget",
        got.len()
    );
    assert_eq!(got[0], oldest);
    assert_eq!(got, ids[ids.len() - got.len()..].to_vec());
}

#[tokio::test]
async fn repeated_acks_publish_one_kafka_receipt() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message as _;
    let kafka = testkit::kafka::MockKafka::start();
    kafka.create_topic("push-receipts", 1);
    let mut cfg = config();
    cfg.receipts_brokers = Some(kafka.brokers());
    let server = start(cfg).await;
    let mut ws = ws_connect(&server, &token(&server, "kafka-acker", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let mut ids = Vec::new();
    for data in ["a", "b", "marker"] {
        ids.push(
            push(&server, "kafka-acker", data).await["id"]
                .as_u64()
                .unwrap(),
        );
        ws_next_json(&mut ws).await;
    }
    let (a, b, marker) = (ids[0], ids[1], ids[2]);
    for id in [a, b, a, b, a, b] {
        ws_send_json(&mut ws, json!({"type": "ack", "id": id})).await;
    }
    eventually("the repeated acks to be handled", || async {
        metric(
            &server,
            r#"push_receipts_dropped_total{reason="duplicate"}"#,
        )
        .await
            >= 4.0
    })
    .await;
    // Acked last: once its receipt is read, every earlier one is too (one partition).
    ws_send_json(&mut ws, json!({"type": "ack", "id": marker})).await;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "receipt-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["push-receipts"]).unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&marker) {
        let m = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("receipt in time")
            .expect("receipt");
        let r: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        seen.push(r["id"].as_u64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![a, b, marker], "one Kafka receipt per message");
}
