//! A session against a real node started in-process: messages over WebSocket and SSE with
//! receipts from the automatic acks, rotation handled new connection first with nothing lost
//! or repeated, a token fetched for every connection, and a clear error when the node is gone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use push_client::{Backoff, Options, Session, SessionError, Transport, Update};
use push_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "push-client-test-secret-0123456789";

/// `POST /v1/push/{user}{query}` on the admin port; the answer's JSON.
async fn push(admin: SocketAddr, user: &str, query: &str, body: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(admin).await.expect("admin port");
    let req = format!(
        "POST /v1/push/{user}{query} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("JSON answer")
}

fn options(server: &Server, transport: Transport) -> Options {
    let mut o = Options::new(server.client_addr(), transport);
    o.backoff = Backoff {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(500),
    };
    o
}

/// The next message's data, skipping connection updates.
async fn next_message(session: &mut Session<impl FnMut() -> String>) -> (u64, String) {
    loop {
        let update = tokio::time::timeout(Duration::from_secs(20), session.next())
            .await
            .expect("an update within 20 s")
            .expect("session goes on");
        if let Update::Message(m) = update {
            return (m.id, m.data);
        }
    }
}

async fn receives_and_acks(transport: Transport) {
    let server = Server::start(Config::local_test(SECRET))
        .await
        .expect("node");
    let token = server.mint_token("alice", None, Duration::from_secs(600));
    let mut session = Session::connect(options(&server, transport), move || token.clone())
        .await
        .expect("connects");
    match session.next().await.expect("update") {
        Update::Connected(hello) => assert_eq!(hello.user, "alice"),
        other => panic!("first update should be Connected, got {other:?}"),
    }
    // The push waits for the receipt, which exists only once the session acknowledged.
    let admin = server.admin_addr();
    let pushed =
        tokio::spawn(async move { push(admin, "alice", "?wait_receipt=15s", "hello").await });
    let (id, data) = next_message(&mut session).await;
    assert!(data.contains("hello"), "{data}");
    let answer = pushed.await.expect("push task");
    assert_eq!(answer["id"].as_u64(), Some(id), "{answer}");
    let receipt = &answer["receipt"];
    assert_eq!(
        receipt["id"].as_u64(),
        Some(id),
        "a receipt for the message: {answer}"
    );
    assert_eq!(receipt["transport"], transport.as_str(), "{answer}");
    assert_eq!(session.last_id(), Some(id));
    session.close().await;
    server.stop();
}

#[tokio::test]
async fn websocket_session_receives_and_its_acks_become_receipts() {
    receives_and_acks(Transport::Ws).await;
}

#[tokio::test]
async fn sse_session_receives_and_its_acks_become_receipts() {
    receives_and_acks(Transport::Sse).await;
}

async fn rotation_loses_nothing(transport: Transport) {
    let mut cfg = Config::local_test(SECRET);
    cfg.lifecycle.lifetime = Duration::from_millis(700);
    cfg.lifecycle.lifetime_jitter = 0.0;
    cfg.lifecycle.reconnect_grace = Duration::from_secs(5);
    let server = Server::start(cfg).await.expect("node");
    let tokens = Arc::new(AtomicUsize::new(0));
    let counter = tokens.clone();
    let token = server.mint_token("bob", None, Duration::from_secs(600));
    let mut session = Session::connect(options(&server, transport), move || {
        counter.fetch_add(1, Ordering::Relaxed);
        token.clone()
    })
    .await
    .expect("connects");

    // A steady trickle across several rotations.
    const N: usize = 60;
    let admin = server.admin_addr();
    let pusher = tokio::spawn(async move {
        for i in 0..N {
            push(admin, "bob", "", &format!("m{i}")).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut got = Vec::new();
    let mut connected = 0;
    while got.len() < N {
        let update = tokio::time::timeout(Duration::from_secs(30), session.next())
            .await
            .expect("an update within 30 s")
            .expect("session goes on");
        match update {
            Update::Message(m) => got.push((m.id, m.data)),
            Update::Connected(_) => connected += 1,
            Update::Gap { .. } => panic!("no gap expected: the history covers the run"),
            Update::Disconnected { code } => {
                panic!("rotation must switch without a disconnect, got close {code:?}")
            }
        }
    }
    pusher.await.expect("pusher");
    let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "IDs strictly increase: {ids:?}"
    );
    for (i, (_, data)) in got.iter().enumerate() {
        assert!(
            data.contains(&format!("m{i}")),
            "message {i} in order, got {data}"
        );
    }
    assert!(
        connected >= 3,
        "several rotations during the run: {connected} connections"
    );
    assert_eq!(
        tokens.load(Ordering::Relaxed),
        connected,
        "a token fetched for every connection"
    );
    session.close().await;
    server.stop();
}

#[tokio::test]
async fn websocket_rotation_switches_new_connection_first_and_loses_nothing() {
    rotation_loses_nothing(Transport::Ws).await;
}

#[tokio::test]
async fn sse_rotation_switches_new_connection_first_and_loses_nothing() {
    rotation_loses_nothing(Transport::Sse).await;
}

#[tokio::test]
async fn a_node_that_is_gone_ends_the_session_with_a_clear_error() {
    let server = Server::start(Config::local_test(SECRET))
        .await
        .expect("node");
    let token = server.mint_token("carol", None, Duration::from_secs(600));
    let mut opts = options(&server, Transport::Ws);
    opts.max_attempts = Some(3);
    let addr = server.client_addr();
    let mut session = Session::connect(opts, move || token.clone())
        .await
        .expect("connects");
    assert!(matches!(session.next().await, Ok(Update::Connected(_))));
    server.stop();
    let update = tokio::time::timeout(Duration::from_secs(20), session.next())
        .await
        .expect("the close is seen");
    assert!(
        matches!(update, Ok(Update::Disconnected { .. })),
        "{update:?}"
    );
    let end = tokio::time::timeout(Duration::from_secs(20), session.next())
        .await
        .expect("gives up within 20 s");
    match end {
        Err(SessionError::Connect {
            server, attempts, ..
        }) => {
            assert_eq!(server, addr);
            assert_eq!(attempts, 3);
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}
