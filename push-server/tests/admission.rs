//! Admission limits (docs/security.md, "Admission limits"): one source or one user cannot
//! take what every client shares, and every refusal is clear and counted.
//!
//! Sources are told apart by their address: these tests bind clients to 127.0.0.1 and
//! 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn source(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// A TCP connection to `server` from `source` (port chosen by the kernel).
async fn connect_from(source: IpAddr, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    tokio::time::timeout(WAIT, socket.connect(server))
        .await
        .expect("connect in time")
        .unwrap()
}

/// Sends an SSE request from `source` and returns the status of the answer.
async fn sse_status_from(source: IpAddr, server: &push_server::Server, token: &str) -> u16 {
    let mut s = connect_from(source, server.client_addr()).await;
    let req = format!("GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    status_of(&mut s).await
}

/// Reads a response head and returns its status (0 if the connection closed first).
async fn status_of(s: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("response in time")
        {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn connects(server: &push_server::Server, result: &str) -> f64 {
    metric(
        server,
        &format!(r#"push_connects_total{{result="{result}"}}"#),
    )
    .await
}

#[tokio::test]
async fn silent_connections_from_one_address_do_not_keep_another_address_out() {
    let mut cfg = config();
    cfg.max_pending_handshakes = 16;
    cfg.max_pending_per_ip = 4;
    // Long, so that only the per-source cap can free the shared slots during the test.
    cfg.handshake_timeout = Duration::from_secs(60);
    cfg.first_byte_timeout = Duration::from_secs(60);
    let server = start(cfg).await;
    // One address opens many connections and never sends a byte.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(connect_from(source(1), server.client_addr()).await);
    }
    eventually(
        "the silent connections past the per-address cap to be refused",
        || async { connects(&server, "pending_ip_limit").await >= 36.0 },
    )
    .await;
    assert_eq!(server.pending_handshakes(), 4);
    // A client from another address still gets in.
    let t = token(&server, "real", None);
    assert_eq!(sse_status_from(source(2), &server, &t).await, 200);
    // The flooding address is told why.
    let mut more = connect_from(source(1), server.client_addr()).await;
    assert_eq!(status_of(&mut more).await, 429);
    drop(silent);
}

#[tokio::test]
async fn a_silent_connection_is_let_go_at_the_first_byte_timeout() {
    let mut cfg = config();
    cfg.first_byte_timeout = Duration::from_secs(1);
    // Far beyond the test's wait: a 408 within it comes from the first-byte timeout.
    cfg.handshake_timeout = Duration::from_secs(60);
    let server = start(cfg).await;
    let mut silent = connect_from(source(1), server.client_addr()).await;
    assert_eq!(status_of(&mut silent).await, 408);
    assert_eq!(connects(&server, "first_byte_timeout").await, 1.0);
    // A client that started its request in time may finish it more slowly.
    let mut slow = connect_from(source(1), server.client_addr()).await;
    slow.write_all(b"GET /sse HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rest = format!(
        "Host: x\r\nAuthorization: Bearer {}\r\n\r\n",
        token(&server, "slow", None)
    );
    slow.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(status_of(&mut slow).await, 200);
}

#[tokio::test]
async fn the_connect_rate_is_limited_before_the_request_is_read() {
    let mut cfg = config();
    cfg.per_ip_rate = 0.5;
    cfg.per_ip_burst = 1;
    cfg.handshake_timeout = Duration::from_secs(60);
    cfg.first_byte_timeout = Duration::from_secs(60);
    let server = start(cfg).await;
    let t = token(&server, "u", None);
    assert_eq!(sse_status_from(source(1), &server, &t).await, 200);
    // Over the rate, a connection is refused at once, without sending anything.
    let mut s = connect_from(source(1), server.client_addr()).await;
    assert_eq!(status_of(&mut s).await, 429);
    assert_eq!(connects(&server, "rate_limited").await, 1.0);
    // Another address has its own budget.
    assert_eq!(sse_status_from(source(2), &server, &t).await, 200);
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let mut cfg = config();
    cfg.max_connections_per_ip = 2;
    let server = start(cfg).await;
    let auth = |u: &str| token(&server, u, None);
    let mut held = Vec::new();
    for u in ["a", "b"] {
        let mut s = connect_from(source(1), server.client_addr()).await;
        let req = format!(
            "GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            auth(u)
        );
        s.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(status_of(&mut s).await, 200);
        held.push(s);
    }
    assert_eq!(sse_status_from(source(1), &server, &auth("c")).await, 429);
    assert_eq!(connects(&server, "ip_limit").await, 1.0);
    assert_eq!(sse_status_from(source(2), &server, &auth("c")).await, 200);
    // A place frees when a connection of that address closes.
    held.pop();
    let mut status = 0;
    for _ in 0..100 {
        status = sse_status_from(source(1), &server, &auth("d")).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn connections_per_user_are_capped_and_the_newest_is_refused() {
    let mut cfg = config();
    cfg.max_connections_per_user = 2;
    let server = start(cfg).await;
    let t = token(&server, "many", None);
    let mut a = ws_connect(&server, &t).await;
    let mut b = sse_connect(&server, &t).await;
    ws_next_json(&mut a).await;
    b.next_event().await.unwrap();
    let refused = ws_connect_with(&server, &format!("?token={t}"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 429),
        "{refused:?}"
    );
    assert_eq!(connects(&server, "user_limit").await, 1.0);
    // The older connections are untouched, and other users are not affected.
    push(&server, "many", "still here").await;
    assert_eq!(ws_next_json(&mut a).await["data"], "still here");
    let mut other = ws_connect(&server, &token(&server, "other", None)).await;
    assert_eq!(ws_next_json(&mut other).await["type"], "hello");
    // The same device reconnecting replaces its connection even at the cap.
    let phone = token(&server, "dev", Some("phone"));
    let _p1 = ws_connect(&server, &phone).await;
    let _p2 = ws_connect(&server, &token(&server, "dev", Some("tablet"))).await;
    let mut p3 = ws_connect(&server, &phone).await;
    assert_eq!(ws_next_json(&mut p3).await["type"], "hello");
    // Nothing leaked: every place is given back once the clients are gone.
    drop((a, b, other, p3));
    eventually("the many user's places to be free", || async {
        server.hub().connections("many").is_empty()
    })
    .await;
    let mut c = ws_connect(&server, &t).await;
    assert_eq!(ws_next_json(&mut c).await["type"], "hello");
}

/// Resume points at the top of the ID range: no overflow (a panic in a debug build, after
/// registration), no leaked place, on both transports.
#[tokio::test]
async fn resume_points_at_the_top_of_the_id_range_are_served() {
    let server = start(config()).await;
    let t = token(&server, "top", None);
    for since in [u64::MAX, u64::MAX - 1] {
        let mut ws = ws_connect_with(&server, &format!("?token={t}&since={since}"), &[])
            .await
            .expect("handshake")
            .0;
        assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
        let auth = format!("Bearer {t}");
        let id = since.to_string();
        let mut sse = sse_connect_raw(
            server.client_addr(),
            "/sse",
            &[("Authorization", &auth), ("Last-Event-ID", &id)],
        )
        .await;
        assert_eq!(sse.status, 200, "{}", sse.head);
        assert_eq!(sse.next_event().await.unwrap().event, "hello");
        // Both connections work: a push reaches them (after a `gap`, when the user has no
        // history: the server cannot vouch for what the client saw).
        push(&server, "top", "after the top").await;
        let mut msg = ws_next_json(&mut ws).await;
        if msg["type"] == "gap" {
            msg = ws_next_json(&mut ws).await;
        }
        assert_eq!(msg["data"], "after the top");
        let mut ev = sse.next_event().await.unwrap();
        if ev.event == "gap" {
            ev = sse.next_event().await.unwrap();
        }
        assert_eq!(ev.data, "after the top");
        drop((ws, sse));
        eventually("both places to be given back", || async {
            server.hub().open_total() == 0
        })
        .await;
    }
    // Past u64 is not a message ID: a clear 400, not a wrap.
    let err = ws_connect_with(
        &server,
        &format!("?token={t}&since=18446744073709551616"),
        &[],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 400),
        "{err:?}"
    );
}
