//! Bad input and limits: each gets a clear answer, and the server keeps serving.

mod common;

use std::time::Duration;

use common::*;
use push_server::protocol::ws::{encode_client_frame, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let server = start(cfg).await;
    let mut ws = raw_ws(&server, &token(&server, "u", None)).await;
    ws.send(&encode_client_frame(
        true,
        OpCode::Text,
        &[b'a'; 2000],
        MASK,
    ))
    .await;
    assert_eq!(ws.close_code().await, Some(1009));
    eventually("the protocol error to be counted", || async {
        metric(
            &server,
            r#"push_disconnects_total{reason="protocol_error"}"#,
        )
        .await
            >= 1.0
    })
    .await;
    // Still serving.
    let mut ok = ws_connect(&server, &token(&server, "v", None)).await;
    assert_eq!(ws_next_json(&mut ok).await["type"], "hello");
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_with_1009() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let server = start(cfg).await;
    let mut ws = raw_ws(&server, &token(&server, "u", None)).await;
    ws.send(&encode_client_frame(
        false,
        OpCode::Text,
        &[b'a'; 500],
        MASK,
    ))
    .await;
    for _ in 0..2 {
        ws.send(&encode_client_frame(
            false,
            OpCode::Continuation,
            &[b'a'; 500],
            MASK,
        ))
        .await;
    }
    assert_eq!(ws.close_code().await, Some(1009));
}

#[tokio::test]
async fn malformed_frames_close_with_a_protocol_error() {
    let server = start(config()).await;
    let mut ws = raw_ws(&server, &token(&server, "u", None)).await;
    ws.send(&[0x81, 0x03, b'a', b'b', b'c']).await; // unmasked
    assert_eq!(ws.close_code().await, Some(1002));

    let mut ws = raw_ws(&server, &token(&server, "u", None)).await;
    ws.send(&encode_client_frame(
        true,
        OpCode::Text,
        &[0xC3, 0x28],
        MASK,
    ))
    .await;
    assert_eq!(ws.close_code().await, Some(1007));
}

#[tokio::test]
async fn unparsable_client_message_gets_an_error_and_the_connection_stays() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "u", None)).await;
    ws_next_json(&mut ws).await;
    ws_send_json(&mut ws, serde_json::json!({"type": "what"})).await;
    let err = ws_next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_message");
    ws_send_json(&mut ws, serde_json::json!({"type": "ping"})).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "pong");
    ws_send_json(&mut ws, serde_json::json!({"type": "ack", "id": 1})).await;
    push(&server, "u", "still here").await;
    assert_eq!(ws_next_json(&mut ws).await["data"], "still here");
    assert!(metric(&server, "push_acks_total").await >= 1.0);
}

#[tokio::test]
async fn slow_consumer_is_disconnected_with_a_bounded_queue() {
    let mut cfg = config();
    cfg.max_queue = 4;
    // The bound after which a client that does not drain is slow (short, for the test).
    cfg.slow_consumer_timeout = std::time::Duration::from_millis(300);
    let server = start(cfg).await;
    // A client that never reads, with a small receive window so the kernel buffers fill.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.client_addr()).await.unwrap();
    let _slow = raw_ws_over(stream, server.client_addr(), &token(&server, "slow", None)).await;
    let mut healthy = ws_connect(&server, &token(&server, "ok", None)).await;
    ws_next_json(&mut healthy).await;

    let payload = "x".repeat(32 * 1024);
    let mut dropped = false;
    for _ in 0..2_000 {
        let r = push(&server, "slow", &payload).await;
        if r["dropped"] == 1 || r["id"].is_null() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the queue never overflowed");
    eventually("the slow consumer to be disconnected", || async {
        metric(&server, r#"push_disconnects_total{reason="slow_consumer"}"#).await >= 1.0
    })
    .await;
    eventually("the slow consumer to leave the hub", || async {
        server.hub().connections("slow").is_empty()
    })
    .await;
    // Others are unaffected.
    push(&server, "ok", "fine").await;
    assert_eq!(ws_next_json(&mut healthy).await["data"], "fine");
}

#[tokio::test]
async fn slow_consumer_drop_oldest_keeps_the_connection() {
    let mut cfg = config();
    cfg.max_queue = 2;
    cfg.slow_consumer = push_server::hub::SlowConsumerPolicy::DropOldest;
    cfg.slow_consumer_timeout = std::time::Duration::from_millis(300);
    let server = start(cfg).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.client_addr()).await.unwrap();
    let _slow = raw_ws_over(stream, server.client_addr(), &token(&server, "slow", None)).await;
    let payload = "y".repeat(32 * 1024);
    for _ in 0..600 {
        push(&server, "slow", &payload).await;
        if metric(
            &server,
            r#"push_messages_dropped_total{reason="slow_consumer_drop_oldest"}"#,
        )
        .await
            >= 1.0
        {
            break;
        }
    }
    assert!(
        metric(
            &server,
            r#"push_messages_dropped_total{reason="slow_consumer_drop_oldest"}"#
        )
        .await
            >= 1.0
    );
    assert_eq!(server.hub().connections("slow").len(), 1);
}

#[tokio::test]
async fn at_capacity_new_clients_get_503_and_readiness_fails() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let server = start(cfg).await;
    let mut a = ws_connect(&server, &token(&server, "a", None)).await;
    let mut b = sse_connect(&server, &token(&server, "b", None)).await;
    ws_next_json(&mut a).await;
    b.next_event().await.unwrap();
    let auth = format!("Bearer {}", token(&server, "c", None));
    let c = sse_connect_raw(server.client_addr(), "/sse", &[("Authorization", &auth)]).await;
    assert_eq!(c.status, 503);
    assert!(c.head.contains("Retry-After"));
    let err = ws_connect_with(
        &server,
        &format!("?token={}", token(&server, "d", None)),
        &[],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 503));
    let ready = http(server.admin_addr(), "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "at_capacity");
    assert_eq!(ready.json()["capacity"], 2);

    // A place frees up when a client leaves.
    drop(a);
    eventually("readiness to recover", || async {
        http(server.admin_addr(), "GET", "/readyz", &[], b"")
            .await
            .status
            == 200
    })
    .await;
    let mut d = ws_connect(&server, &token(&server, "d", None)).await;
    assert_eq!(ws_next_json(&mut d).await["type"], "hello");
}

#[tokio::test]
async fn slow_header_senders_time_out() {
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let mut s = TcpStream::connect(server.client_addr()).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(server.hub().open_total(), 0);
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let server = start(config()).await;
    let mut s = TcpStream::connect(server.client_addr()).await.unwrap();
    let big = format!("GET /sse HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let _ = s.write_all(big.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut resp))
        .await
        .unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

#[tokio::test]
async fn garbage_instead_of_http_gets_400() {
    let server = start(config()).await;
    let mut s = TcpStream::connect(server.client_addr()).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not http\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[tokio::test]
async fn per_ip_connect_rate_is_limited() {
    let mut cfg = config();
    cfg.per_ip_rate = 1.0;
    cfg.per_ip_burst = 3;
    let server = start(cfg).await;
    let t = token(&server, "u", None);
    let auth = format!("Bearer {t}");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let s = sse_connect_raw(server.client_addr(), "/sse", &[("Authorization", &auth)]).await;
        statuses.push(s.status);
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert_eq!(statuses[3], 429);
    assert!(metric(&server, r#"push_connects_total{result="rate_limited"}"#).await >= 2.0);
}

#[tokio::test]
async fn unsupported_websocket_version_is_refused() {
    let server = start(config()).await;
    let t = token(&server, "u", None);
    let mut s = TcpStream::connect(server.client_addr()).await.unwrap();
    let req = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(resp.contains("Sec-WebSocket-Version: 13"));
}

#[tokio::test]
async fn handshakes_in_flight_are_bounded() {
    let mut cfg = config();
    cfg.max_pending_handshakes = 2;
    let server = start(cfg).await;
    // Two clients that connect and send nothing hold both handshake places...
    let _a = TcpStream::connect(server.client_addr()).await.unwrap();
    let _b = TcpStream::connect(server.client_addr()).await.unwrap();
    eventually("both handshakes to be pending", || async {
        server.pending_handshakes() >= 2
    })
    .await;
    // ...so the next one is refused at once instead of queueing without bound.
    let mut c = TcpStream::connect(server.client_addr()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(WAIT, c.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("\"busy\""), "{resp}");
}

#[tokio::test]
async fn reuse_port_lets_two_nodes_share_the_client_port() {
    let mut a_cfg = config();
    a_cfg.reuse_port = true;
    let a = start(a_cfg).await;
    let mut b_cfg = config();
    b_cfg.reuse_port = true;
    b_cfg.listen = a.client_addr();
    let b = start(b_cfg).await;
    assert_eq!(a.client_addr(), b.client_addr());
    // Clients spread over both processes; each node serves the ones it accepted.
    let mut served = [0usize; 2];
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut ws = ws_connect(&a, &token(&a, &format!("u{i}"), None)).await;
        ws_next_json(&mut ws).await;
        clients.push(ws);
    }
    served[0] = a.hub().open_total();
    served[1] = b.hub().open_total();
    assert_eq!(served[0] + served[1], 40);
    assert!(served[0] > 0 && served[1] > 0, "kernel spread: {served:?}");

    let mut without = config();
    without.listen = a.client_addr();
    assert!(
        push_server::Server::start(without).await.is_err(),
        "without SO_REUSEPORT the port is taken"
    );
}
