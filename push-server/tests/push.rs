//! Connect, authenticate and push, over real sockets on port 0.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_client_gets_hello_then_pushed_message() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "alice", Some("phone"))).await;
    let hello = ws_next_json(&mut ws).await;
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["user"], "alice");
    assert_eq!(hello["device"], "phone");
    assert_eq!(hello["version"], 1);
    assert!(hello["lifetime_ms"].as_u64().unwrap() > 0);

    let r = push(&server, "alice", "hello").await;
    assert_eq!(r["delivered"], 1);
    let msg = ws_next_json(&mut ws).await;
    assert_eq!(
        msg,
        json!({"type": "message", "id": r["id"], "data": "hello"})
    );
}

#[tokio::test]
async fn sse_client_gets_hello_then_pushed_message() {
    let server = start(config()).await;
    let mut sse = sse_connect(&server, &token(&server, "bob", None)).await;
    assert!(sse.head.contains("text/event-stream"));
    let hello = sse.next_event().await.unwrap();
    assert_eq!(hello.event, "hello");
    let hello: serde_json::Value = serde_json::from_str(&hello.data).unwrap();
    assert_eq!(hello["user"], "bob");

    let r = push(&server, "bob", "line one\nline two").await;
    let ev = sse.next_event().await.unwrap();
    assert_eq!(ev.event, "message");
    assert_eq!(ev.id, Some(r["id"].to_string()));
    assert_eq!(ev.data, "line one\nline two");
}

#[tokio::test]
async fn json_payloads_are_embedded_and_invalid_json_is_refused() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "carol", None)).await;
    ws_next_json(&mut ws).await;
    let ct = [("Content-Type", "application/json")];
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/carol",
        &ct,
        br#"{"n":1}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(ws_next_json(&mut ws).await["data"], json!({"n": 1}));
    let r = http(server.admin_addr(), "POST", "/v1/push/carol", &ct, b"{oops").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_payload");
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/carol",
        &[],
        b"\xff\xfe",
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn push_reaches_every_device_of_the_user_and_nobody_else() {
    let server = start(config()).await;
    let mut phone = ws_connect(&server, &token(&server, "dana", Some("phone"))).await;
    let mut laptop = ws_connect(&server, &token(&server, "dana", Some("laptop"))).await;
    let mut browser = sse_connect(&server, &token(&server, "dana", Some("browser"))).await;
    let mut other = ws_connect(&server, &token(&server, "eve", None)).await;
    ws_next_json(&mut phone).await;
    ws_next_json(&mut laptop).await;
    browser.next_event().await.unwrap();
    ws_next_json(&mut other).await;

    let r = push(&server, "dana", "to all of dana").await;
    assert_eq!(r["delivered"], 3);
    for ws in [&mut phone, &mut laptop] {
        let m = ws_next_json(ws).await;
        assert_eq!(m["data"], "to all of dana");
        assert_eq!(m["id"], r["id"]);
    }
    assert_eq!(browser.next_event().await.unwrap().data, "to all of dana");

    // The other user gets only their own message.
    push(&server, "eve", "for eve").await;
    assert_eq!(ws_next_json(&mut other).await["data"], "for eve");

    let users = http(server.admin_addr(), "GET", "/v1/users/dana", &[], b"")
        .await
        .json();
    assert_eq!(users["connections"].as_array().unwrap().len(), 3);
    // A user with no connection: nothing delivered, the message is kept for their resume.
    let missing = push(&server, "nobody", "x").await;
    assert_eq!(missing["delivered"], 0);
    assert_eq!(missing["stored"], true);
    assert!(missing["id"].as_u64().is_some());
}

#[tokio::test]
async fn messages_arrive_in_order_with_increasing_ids() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "frank", None)).await;
    let mut sse = sse_connect(&server, &token(&server, "frank", Some("sse"))).await;
    ws_next_json(&mut ws).await;
    sse.next_event().await.unwrap();
    const N: usize = 300;
    for i in 0..N {
        push(&server, "frank", &format!("m{i}")).await;
    }
    let mut last = 0u64;
    for i in 0..N {
        let m = ws_next_json(&mut ws).await;
        assert_eq!(m["data"], format!("m{i}"));
        let id = m["id"].as_u64().unwrap();
        assert!(id > last, "ids increase: {id} after {last}");
        last = id;
        let ev = sse.next_event().await.unwrap();
        assert_eq!(ev.data, format!("m{i}"));
        assert_eq!(ev.id.unwrap().parse::<u64>().unwrap(), id);
    }
}

#[tokio::test]
async fn batch_push_delivers_each_item() {
    let server = start(config()).await;
    let mut a = ws_connect(&server, &token(&server, "a", None)).await;
    let mut b = sse_connect(&server, &token(&server, "b", None)).await;
    ws_next_json(&mut a).await;
    b.next_event().await.unwrap();
    let batch = json!([
        {"user": "a", "data": "text for a"},
        {"user": "b", "data": {"k": [1, 2]}},
        {"user": "nobody", "data": 1}
    ]);
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push",
        &[],
        batch.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["delivered"], 2);
    assert_eq!(body["results"][2]["delivered"], 0);
    assert_eq!(ws_next_json(&mut a).await["data"], "text for a");
    assert_eq!(b.next_event().await.unwrap().data, r#"{"k":[1,2]}"#);

    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push",
        &[],
        b"{\"user\":1}",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_batch");
}

#[tokio::test]
async fn token_is_accepted_from_header_query_and_subprotocol() {
    let server = start(config()).await;
    let t = token(&server, "gina", None);
    let bearer = format!("Bearer {t}");
    let (mut ws, _) = ws_connect_with(&server, "", &[("Authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(ws_next_json(&mut ws).await["user"], "gina");

    let protocols = format!("push.v1, {t}");
    let (mut ws, resp) = ws_connect_with(&server, "", &[("Sec-WebSocket-Protocol", &protocols)])
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "push.v1");
    assert_eq!(ws_next_json(&mut ws).await["user"], "gina");

    // Only the token offered: the token is never echoed back (it would land in logs), so
    // no protocol is selected and a strict client (like a browser) refuses the handshake.
    let r = ws_connect_with(&server, "", &[("Sec-WebSocket-Protocol", &t)]).await;
    assert!(r.is_err(), "the token was selected as the subprotocol");

    let mut sse = sse_connect_raw(server.client_addr(), &format!("/sse?token={t}"), &[]).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
}

/// A token made without this crate's JWT library: HMAC-SHA256 over hand-built base64url
/// parts, with a header that has a different field order and extra whitespace.
fn foreign_token(secret: &str, claims: serde_json::Value) -> String {
    use base64::Engine as _;
    use hmac::{Mac, SimpleHmac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{ "typ": "JWT", "alg": "HS256" }"#);
    let payload = b64.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        b64.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn any_standard_hs256_token_is_accepted() {
    let server = start(config()).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let t = foreign_token(
        SECRET,
        json!({"sub": "henry", "did": "tv", "exp": exp, "iss": "other-service"}),
    );
    let mut ws = ws_connect(&server, &t).await;
    let hello = ws_next_json(&mut ws).await;
    assert_eq!(hello["user"], "henry");
    assert_eq!(hello["device"], "tv");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let server = start(config()).await;
    let addr = server.client_addr();

    let none = sse_connect_raw(addr, "/sse", &[]).await;
    assert_eq!(none.status, 401);

    let wrong_secret = foreign_token("another-secret-entirely-0000", json!({"sub": "x"}));
    let r = sse_connect_raw(addr, &format!("/sse?token={wrong_secret}"), &[]).await;
    assert_eq!(r.status, 401);

    let expired = foreign_token(SECRET, json!({"sub": "x", "exp": 1_000_000}));
    let mut r = sse_connect_raw(addr, &format!("/sse?token={expired}"), &[]).await;
    assert_eq!(r.status, 401);
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut r.reader, &mut body)
        .await
        .unwrap();
    assert!(body.contains("token expired"), "{body}");

    let err = ws_connect_with(&server, "?token=not.a.jwt", &[])
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    assert!(metric(&server, r#"push_connects_total{result="unauthorized"}"#).await >= 4.0);
    assert_eq!(server.hub().open_total(), 0);
}

#[tokio::test]
async fn unknown_paths_and_methods_get_clear_errors() {
    let server = start(config()).await;
    let r = http(server.client_addr(), "GET", "/nope", &[], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/ws"), "{}", r.body);
    let r = http(server.client_addr(), "POST", "/sse", &[], b"").await;
    assert_eq!(r.status, 405);
    let r = http(server.admin_addr(), "GET", "/v2/whatever", &[], b"").await;
    assert_eq!(r.status, 404);
    let r = http(server.admin_addr(), "GET", "/v1/push/x", &[], b"").await;
    assert_eq!(r.status, 405);
    let r = http(server.admin_addr(), "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200);
    let r = http(server.admin_addr(), "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn admin_token_protects_the_push_api_but_not_the_probes() {
    let mut cfg = config();
    cfg.admin_token = Some("admin-s3cret-0123456789".into());
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let r = http(admin, "POST", "/v1/push/u", &[], b"x").await;
    assert_eq!(r.status, 401);
    let r = http(
        admin,
        "POST",
        "/v1/push/u",
        &[("Authorization", "Bearer wrong")],
        b"x",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http(
        admin,
        "POST",
        "/v1/push/u",
        &[("Authorization", "Bearer admin-s3cret-0123456789")],
        b"x",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(http(admin, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(http(admin, "GET", "/metrics", &[], b"").await.status, 200);
}

#[tokio::test]
async fn oversized_admin_payload_is_refused() {
    let mut cfg = config();
    cfg.max_message_bytes = 1024;
    let server = start(cfg).await;
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/u",
        &[],
        &[b'x'; 2048],
    )
    .await;
    assert_eq!(r.status, 413);
}

#[tokio::test]
async fn newer_connection_of_a_device_takes_over_delivery() {
    let server = start(config()).await;
    let t = token(&server, "ivan", Some("phone"));
    let mut old = ws_connect(&server, &t).await;
    ws_next_json(&mut old).await;
    let mut new = ws_connect(&server, &t).await;
    ws_next_json(&mut new).await;
    let r = push(&server, "ivan", "only the newest").await;
    assert_eq!(r["delivered"], 1);
    assert_eq!(ws_next_json(&mut new).await["data"], "only the newest");
    // The old connection closes on the client's side, as a rotating client does.
    old.send(Message::Close(None)).await.unwrap();
    eventually("the replaced connection to be counted", || async {
        metric(&server, r#"push_disconnects_total{reason="replaced"}"#).await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn internal_deliver_reports_an_outcome_per_message_and_drops_redeliveries() {
    let mut cfg = config();
    cfg.admin_token = Some("shared-secret-0123456789".into());
    let server = start(cfg).await;
    let mut phone = ws_connect(&server, &token(&server, "kim", Some("phone"))).await;
    let mut laptop = ws_connect(&server, &token(&server, "kim", Some("laptop"))).await;
    ws_next_json(&mut phone).await;
    ws_next_json(&mut laptop).await;
    let batch = json!([
        {"user": "kim", "message_id": "m-1", "data": "to all"},
        {"user": "kim", "device": "laptop", "message_id": "m-2", "data": {"only": "laptop"}},
        {"user": "kim", "message_id": "m-1", "data": "to all"},
        {"user": "kim", "device": "watch", "message_id": "m-3", "data": "no watch here"},
        {"user": "nobody", "message_id": "m-4", "data": "x"},
        {"user": "", "message_id": "m-5", "data": "x"}
    ]);
    let auth = [("Authorization", "Bearer shared-secret-0123456789")];
    let r = http(
        server.admin_addr(),
        "POST",
        "/internal/v1/deliver",
        &auth,
        batch.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let outcomes: Vec<String> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        outcomes,
        [
            "delivered",
            "delivered",
            "duplicate",
            "stored",
            "stored",
            "invalid"
        ]
    );
    let m = ws_next_json(&mut phone).await;
    assert_eq!(
        (m["mid"].as_str(), m["data"].as_str()),
        (Some("m-1"), Some("to all"))
    );
    assert_eq!(ws_next_json(&mut laptop).await["mid"], "m-1");
    let m = ws_next_json(&mut laptop).await;
    assert_eq!(m["mid"], "m-2");
    assert_eq!(m["data"], json!({"only": "laptop"}));
    // The phone got nothing more: the next message it sees is this one.
    push_with_token(&server, "kim", "after").await;
    assert_eq!(ws_next_json(&mut phone).await["data"], "after");

    let r = http(
        server.admin_addr(),
        "POST",
        "/internal/v1/deliver",
        &[],
        b"[]",
    )
    .await;
    assert_eq!(r.status, 401, "the shared secret is required");
}

async fn push_with_token(server: &push_server::Server, user: &str, body: &str) {
    let r = http(
        server.admin_addr(),
        "POST",
        &format!("/v1/push/{user}"),
        &[("Authorization", "Bearer shared-secret-0123456789")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn the_callers_trace_context_reaches_the_websocket_client() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "tara", None)).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let want = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // B3 multi-header on the admin push: seen as W3C by the client (span export is off in
    // this process, so the caller's context passes through unchanged).
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/tara",
        &[
            ("X-B3-TraceId", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("X-B3-SpanId", "00f067aa0ba902b7"),
            ("X-B3-Sampled", "1"),
        ],
        b"one",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let msg = ws_next_json(&mut ws).await;
    assert_eq!(msg["traceparent"], want, "{msg}");
    assert_eq!(msg["data"], "one");

    // A batch item's own traceparent; an item without one shows none.
    let body = json!([
        {"user": "tara", "data": "two", "traceparent": want},
        {"user": "tara", "data": "three"},
    ]);
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let two = ws_next_json(&mut ws).await;
    assert_eq!(two["traceparent"], want, "{two}");
    let three = ws_next_json(&mut ws).await;
    assert_eq!(three["data"], "three");
    assert!(three.get("traceparent").is_none(), "{three}");
}
