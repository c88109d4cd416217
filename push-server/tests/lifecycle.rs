//! Heartbeats, dead peers, rotation and drain, end to end. Time-driven tests run with
//! tokio's paused clock: timers fire in order, as fast as the machine allows, with no sleeps.
//!
//! Connections here keep their tasks (`park_idle` off): a parked connection's writes and
//! reads happen on its reactor's thread, outside the runtime, and a paused clock jumps ahead
//! whenever the runtime itself has nothing to do, before that thread's work lands. The same
//! lifecycle on parked connections, in real time: tests/parking.rs.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use push_server::Config;
use tokio_tungstenite::tungstenite::Message;

fn fast_lifecycle() -> Config {
    let mut cfg = config();
    cfg.sweep_interval = Duration::from_millis(50);
    cfg.lifecycle.heartbeat_interval = Duration::from_millis(500);
    cfg.lifecycle.heartbeat_timeout = Duration::from_millis(1500);
    cfg.lifecycle.lifetime = Duration::from_secs(3600);
    cfg.park_idle = false;
    cfg
}

#[tokio::test(start_paused = true)]
async fn websocket_heartbeat_is_a_ping_and_silence_is_a_dead_peer() {
    let server = start(fast_lifecycle()).await;
    let mut raw = raw_ws(&server, &token(&server, "quiet", None)).await;
    let (op, _) = raw.read_frame().await.unwrap();
    assert_eq!(op, 9, "a ping");
    // The raw client never answers: after the heartbeat timeout the server closes with 4009.
    assert_eq!(raw.close_code().await, Some(4009));
    eventually("the heartbeat timeout to be counted", || async {
        metric(
            &server,
            r#"push_disconnects_total{reason="heartbeat_timeout"}"#,
        )
        .await
            >= 1.0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_stays_connected() {
    let server = start(fast_lifecycle()).await;
    let mut ws = ws_connect(&server, &token(&server, "alive", None)).await;
    ws_next_json(&mut ws).await;
    // tungstenite answers each ping while we wait for messages; 10 heartbeat timeouts pass.
    let pushed = async {
        tokio::time::sleep(Duration::from_secs(15)).await;
        push(&server, "alive", "after a while").await;
    };
    let received = async { ws_next_json(&mut ws).await };
    let ((), msg) = tokio::join!(pushed, received);
    assert_eq!(msg["data"], "after a while");
}

#[tokio::test(start_paused = true)]
async fn sse_heartbeat_is_a_comment_line() {
    let server = start(fast_lifecycle()).await;
    let mut sse = sse_connect(&server, &token(&server, "s", None)).await;
    sse.next_event().await.unwrap();
    let pushed = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        push(&server, "s", "x").await;
    };
    let ((), ev) = tokio::join!(pushed, sse.next_event());
    let ev = ev.unwrap();
    assert_eq!(ev.data, "x");
    assert!(ev.comments >= 3, "heartbeats seen: {}", ev.comments);
}

fn rotating() -> Config {
    let mut cfg = fast_lifecycle();
    cfg.lifecycle.heartbeat_interval = Duration::from_secs(1);
    cfg.lifecycle.heartbeat_timeout = Duration::from_secs(4);
    cfg.lifecycle.lifetime = Duration::from_secs(6);
    cfg.lifecycle.lifetime_jitter = 0.25;
    cfg.lifecycle.reconnect_grace = Duration::from_secs(3);
    cfg
}

#[tokio::test(start_paused = true)]
async fn rotation_asks_the_client_to_reconnect_and_the_client_closes() {
    let server = start(rotating()).await;
    let t = token(&server, "rot", Some("phone"));
    let mut old = ws_connect(&server, &t).await;
    let hello = ws_next_json(&mut old).await;
    let lifetime = hello["lifetime_ms"].as_u64().unwrap();
    assert!(
        (4_500..=7_500).contains(&lifetime),
        "lifetime {lifetime} within ±25 %"
    );

    let started = tokio::time::Instant::now();
    let rc = ws_next_json(&mut old).await;
    assert_eq!(rc["type"], "reconnect");
    assert_eq!(rc["reason"], "rotate");
    assert_eq!(rc["grace_ms"], 3000);
    let waited = started.elapsed().as_millis() as u64;
    assert!(
        waited + 200 >= lifetime,
        "asked after {waited} ms, lifetime {lifetime} ms"
    );

    // The well-behaved client: open the new connection first, then close the old one.
    let mut new = ws_connect(&server, &t).await;
    ws_next_json(&mut new).await;
    old.send(Message::Close(None)).await.unwrap();
    // The server answers the client's close (1000), it did not force one (4003).
    assert_eq!(ws_close_code(&mut old).await, Some(1000));
    drop(old); // the client closes TCP after the close handshake, and keeps the TIME_WAIT
    eventually("the rotation to be counted", || async {
        metric(&server, r#"push_disconnects_total{reason="rotated"}"#).await >= 1.0
    })
    .await;
    push(&server, "rot", "on the new one").await;
    assert_eq!(ws_next_json(&mut new).await["data"], "on the new one");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_ignores_reconnect_is_closed_after_the_grace_period() {
    let mut cfg = rotating();
    // The raw client answers no pings; keep the heartbeat timeout out of the way.
    cfg.lifecycle.heartbeat_interval = Duration::from_secs(60);
    cfg.lifecycle.heartbeat_timeout = Duration::from_secs(120);
    let server = start(cfg).await;
    let mut raw = raw_ws(&server, &token(&server, "stubborn", None)).await;
    let (op, text) = raw.read_frame().await.unwrap();
    assert_eq!(op, 1);
    assert!(String::from_utf8_lossy(&text).contains("reconnect"));
    let asked = tokio::time::Instant::now();
    assert_eq!(raw.close_code().await, Some(4003));
    assert!(asked.elapsed() >= Duration::from_secs(3));
    eventually("the forced close to be counted", || async {
        metric(
            &server,
            r#"push_disconnects_total{reason="forced_after_grace"}"#,
        )
        .await
            >= 1.0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn sse_rotation_sends_a_reconnect_event() {
    let server = start(rotating()).await;
    let mut sse = sse_connect(&server, &token(&server, "sse-rot", None)).await;
    sse.next_event().await.unwrap();
    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.event, "reconnect");
    let body: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(body["reason"], "rotate");
}

#[tokio::test(start_paused = true)]
async fn drain_spreads_reconnects_over_the_window_and_refuses_new_clients() {
    let mut cfg = fast_lifecycle();
    cfg.lifecycle.drain_window = Duration::from_secs(10);
    cfg.lifecycle.reconnect_grace = Duration::from_secs(2);
    let server = start(cfg).await;
    const N: usize = 20;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut ws = ws_connect(&server, &token(&server, &format!("d{i}"), None)).await;
        ws_next_json(&mut ws).await;
        clients.push(ws);
    }
    let mut sse = sse_connect(&server, &token(&server, "d-sse", None)).await;
    sse.next_event().await.unwrap();

    let start_at = tokio::time::Instant::now();
    server.drain();
    let ready = http(server.admin_addr(), "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "draining");
    let late = sse_connect_raw(
        server.client_addr(),
        &format!("/sse?token={}", token(&server, "late", None)),
        &[],
    )
    .await;
    assert_eq!(late.status, 503);

    // Every client is asked once, at its own time within the window, and closes.
    let mut asked_at = Vec::new();
    let waits = clients.into_iter().map(|mut ws| async move {
        let m = ws_next_json(&mut ws).await;
        let t = tokio::time::Instant::now();
        ws.send(Message::Close(None)).await.unwrap();
        let _ = ws_close_code(&mut ws).await;
        drop(ws);
        (m, t)
    });
    for (m, t) in futures_util::future::join_all(waits).await {
        assert_eq!(m["type"], "reconnect");
        assert_eq!(m["reason"], "drain");
        asked_at.push(t.duration_since(start_at));
    }
    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.event, "reconnect");
    drop(sse);

    asked_at.sort();
    assert!(*asked_at.last().unwrap() <= Duration::from_millis(10_200));
    let first_half = asked_at
        .iter()
        .filter(|t| **t < Duration::from_secs(5))
        .count();
    assert!(
        (3..=17).contains(&first_half),
        "reconnects spread over the window, not in a herd: {asked_at:?}"
    );
    tokio::time::timeout(Duration::from_secs(30), server.drained())
        .await
        .expect("drain finishes once the clients are gone");
    assert_eq!(server.hub().open_total(), 0);
    assert!(metric(&server, r#"push_disconnects_total{reason="drain"}"#).await >= N as f64);
}
