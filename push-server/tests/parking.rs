//! Parked connections (connection/park.rs), in real time: an idle connection gives up its
//! task and is served by a reactor, and everything a connection does still works there:
//! messages, heartbeats both ways, a dead peer, a frame in parts, a burst that needs the
//! driver back, the client's close and the node's stop. (tests/lifecycle.rs runs the
//! lifecycle on a paused clock, with parking off: see there why.)

mod common;

use std::time::Duration;

use common::*;
use push_server::protocol::ws::{encode_client_frame, OpCode};
use push_server::{Config, Server};

const MASK: [u8; 4] = [7, 1, 9, 3];

fn fast_heartbeats() -> Config {
    let mut cfg = config();
    cfg.sweep_interval = Duration::from_millis(50);
    cfg.lifecycle.heartbeat_interval = Duration::from_millis(300);
    cfg.lifecycle.heartbeat_timeout = Duration::from_millis(1000);
    cfg.lifecycle.lifetime = Duration::from_secs(3600);
    cfg
}

async fn parked(server: &Server, n: usize) {
    eventually(&format!("{n} connections parked"), || async {
        server.parked_connections() == n
    })
    .await;
}

/// Waits until the node holds no connection, parked or not.
async fn all_gone(server: &Server) {
    eventually("every connection to be gone", || async {
        server.hub().open_total() == 0 && server.parked_connections() == 0
    })
    .await;
}

/// Waits for `n` parked connections while `ws` is read, so that tungstenite answers the
/// node's pings meanwhile (nothing is pushed to it: a message fails the test).
async fn parked_while_reading(server: &Server, n: usize, ws: &mut Ws) {
    let reading = tokio::time::timeout(Duration::from_secs(5), ws_next_json(ws));
    tokio::select! {
        () = parked(server, n) => {}
        got = reading => panic!("no message was pushed, got {got:?}"),
    }
}

#[tokio::test]
async fn idle_connections_park_and_still_get_their_messages() {
    let mut cfg = fast_heartbeats();
    // The clients are not read while the test waits: no pongs, and no timeout for that.
    cfg.lifecycle.heartbeat_timeout = Duration::from_secs(60);
    let server = start(cfg).await;
    let mut ws = ws_connect(&server, &token(&server, "w", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let mut sse = sse_connect(&server, &token(&server, "s", None)).await;
    sse.next_event().await.expect("hello");
    parked(&server, 2).await;
    assert_eq!(
        metric(&server, "push_connections_parked").await,
        2.0,
        "the gauge operators see"
    );
    for i in 0..5 {
        let text = format!("m{i}");
        assert_eq!(push(&server, "w", &text).await["delivered"], 1);
        assert_eq!(push(&server, "s", &text).await["delivered"], 1);
        assert_eq!(ws_next_json(&mut ws).await["data"], text.as_str());
        assert_eq!(sse.next_event().await.expect("event").data, text);
    }
    // A connection that gets messages goes back to a task, and parks again at a heartbeat
    // after a second without one.
    parked(&server, 2).await;
    assert_eq!(server.hub().open_total(), 2);
}

#[tokio::test]
async fn a_connection_that_gets_messages_keeps_a_task_until_it_is_quiet() {
    let server = start(fast_heartbeats()).await;
    let mut ws = ws_connect(&server, &token(&server, "busy", None)).await;
    ws_next_json(&mut ws).await;
    parked(&server, 1).await;
    assert_eq!(push(&server, "busy", "first").await["delivered"], 1);
    assert_eq!(ws_next_json(&mut ws).await["data"], "first");
    // Unparked by its first message: the next ones are written by its task.
    parked(&server, 0).await;
    for i in 0..3 {
        let text = format!("then {i}");
        assert_eq!(push(&server, "busy", &text).await["delivered"], 1);
        assert_eq!(ws_next_json(&mut ws).await["data"], text.as_str());
    }
    // Quiet for a second, then a heartbeat: parked again.
    parked_while_reading(&server, 1, &mut ws).await;
}

#[tokio::test]
async fn parked_connections_get_heartbeats_and_answering_ones_stay() {
    let server = start(fast_heartbeats()).await;
    let mut ws = ws_connect(&server, &token(&server, "alive", None)).await;
    ws_next_json(&mut ws).await;
    let mut sse = sse_connect(&server, &token(&server, "quiet-sse", None)).await;
    sse.next_event().await.expect("hello");
    parked(&server, 2).await;
    // tungstenite answers each ping while it waits; three heartbeat timeouts pass.
    let pushed = async {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        push(&server, "alive", "still here").await;
        push(&server, "quiet-sse", "still here").await;
    };
    let received = async { ws_next_json(&mut ws).await };
    let ((), msg, ev) = tokio::join!(pushed, received, sse.next_event());
    assert_eq!(msg["data"], "still here");
    let ev = ev.expect("event");
    assert_eq!(ev.data, "still here");
    // SSE clients never answer; their heartbeats are comment lines (every 300 ms for 3 s).
    assert!(ev.comments >= 5, "heartbeats seen: {}", ev.comments);
    assert_eq!(server.hub().open_total(), 2);
    // Parked again after a quiet second.
    parked_while_reading(&server, 2, &mut ws).await;
}

#[tokio::test]
async fn a_silent_parked_client_is_closed_as_a_dead_peer() {
    let server = start(fast_heartbeats()).await;
    let mut raw = raw_ws(&server, &token(&server, "silent", None)).await;
    parked(&server, 1).await;
    let (op, _) = raw.read_frame().await.expect("a frame");
    assert_eq!(op, 9, "a ping");
    // Never answered: the node closes with 4009 (heartbeat timeout) after 1 s.
    assert_eq!(raw.close_code().await, Some(4009));
    all_gone(&server).await;
}

#[tokio::test]
async fn a_frame_in_parts_is_read_whole() {
    let server = start(config()).await;
    let mut raw = raw_ws(&server, &token(&server, "slow-typist", None)).await;
    parked(&server, 1).await;
    let ping = encode_client_frame(true, OpCode::Ping, b"half and half", MASK);
    raw.send(&ping[..5]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.send(&ping[5..]).await;
    let (op, payload) = raw.read_frame().await.expect("a frame");
    assert_eq!((op, payload.as_slice()), (10, &b"half and half"[..]));
    // Idle again: parked again.
    parked(&server, 1).await;
}

#[tokio::test]
async fn a_burst_from_a_parked_client_is_answered_in_full() {
    let server = start(config()).await;
    let mut raw = raw_ws(&server, &token(&server, "burst", None)).await;
    parked(&server, 1).await;
    // 200 protocol pings padded to 2,500 bytes: more than the reactor reads in one go
    // (8 × 16 KiB), so the connection goes back to a driver part-way. (At most 53 per
    // 8 reads: within the 64 frames a queue holds, so no pong is refused.)
    let mut ping = br#"{"type":"ping"}"#.to_vec();
    ping.resize(2500, b' ');
    let mut burst = Vec::new();
    for _ in 0..200 {
        burst.extend(encode_client_frame(true, OpCode::Text, &ping, MASK));
    }
    raw.send(&burst).await;
    for i in 0..200 {
        let (op, payload) = raw.read_frame().await.expect("a pong");
        let text = String::from_utf8_lossy(&payload);
        assert_eq!(op, 1, "pong {i}: {text}");
        assert!(text.contains("pong"), "pong {i}: {text}");
    }
    parked(&server, 1).await;
}

#[tokio::test]
async fn a_client_close_while_parked_is_answered() {
    let server = start(config()).await;
    let mut raw = raw_ws(&server, &token(&server, "leaver", None)).await;
    parked(&server, 1).await;
    raw.send(&encode_client_frame(
        true,
        OpCode::Close,
        &1000u16.to_be_bytes(),
        MASK,
    ))
    .await;
    assert_eq!(raw.close_code().await, Some(1000), "the close echoed");
    all_gone(&server).await;
}

#[tokio::test]
async fn a_client_that_vanishes_while_parked_is_unregistered() {
    let server = start(config()).await;
    let raw = raw_ws(&server, &token(&server, "gone", None)).await;
    let mut sse = sse_connect(&server, &token(&server, "gone-sse", None)).await;
    sse.next_event().await.expect("hello");
    parked(&server, 2).await;
    drop(raw);
    drop(sse);
    all_gone(&server).await;
}

#[tokio::test]
async fn stopping_the_node_closes_parked_connections_with_going_away() {
    let server = start(config()).await;
    let mut raw = raw_ws(&server, &token(&server, "stay", None)).await;
    parked(&server, 1).await;
    server.stop();
    assert_eq!(raw.close_code().await, Some(1001));
}

#[tokio::test]
async fn with_parking_off_connections_keep_their_tasks() {
    let mut cfg = config();
    cfg.park_idle = false;
    let server = start(cfg).await;
    let mut ws = ws_connect(&server, &token(&server, "tasked", None)).await;
    ws_next_json(&mut ws).await;
    assert_eq!(push(&server, "tasked", "hi").await["delivered"], 1);
    assert_eq!(ws_next_json(&mut ws).await["data"], "hi");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.parked_connections(), 0);
    assert_eq!(metric(&server, "push_connections_parked").await, 0.0);
}
