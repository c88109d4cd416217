//! The admin port as an attacker sees it (issue 14): raw requests with non-canonical paths,
//! secrets per route, message IDs only from the history or the internal secret, Host and
//! browser checks, connection and time limits, and the client token rules.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN_TOKEN: &str = "admin-token-0123456789";
const INTERNAL: &str = "internal-secret-0123456789";

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Sends `raw` as is (no path normalisation, as `curl --path-as-is` would) and returns the
/// status of the answer.
async fn raw_status(addr: std::net::SocketAddr, raw: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // A refusing server may reset the connection after its answer: keep what arrived.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time");
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn non_canonical_admin_paths_are_refused_without_reaching_a_route() {
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let mut x = ws_connect(&server, &token(&server, "x", None)).await;
    ws_next_json(&mut x).await;
    for (method, path, body) in [
        ("POST", "//v1/push/x", "bypass"),
        ("POST", "///v1/push/x", "bypass"),
        (
            "POST",
            "//internal/v1/deliver",
            r#"[{"user":"x","data":"bypass","id":18446744073709551615}]"#,
        ),
        ("GET", "//v1/history/x?since=0", ""),
        ("GET", "//v1/users/x", ""),
        ("POST", "/v1/./push/x", "bypass"),
        ("POST", "/v1/push/../push/x", "bypass"),
        ("POST", "/v1/push/x%2", "bypass"),
    ] {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(raw_status(admin, &raw).await, 400, "{method} {path}");
    }
    assert!(
        metric(
            &server,
            r#"push_admin_refused_total{reason="not_canonical"}"#
        )
        .await
            >= 8.0
    );
    // Nothing reached x, and nothing was kept: the next message is the first one.
    let r = http(
        admin,
        "POST",
        "/v1/push/x",
        &[("Authorization", bearer(ADMIN_TOKEN).as_str())],
        b"legit",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = ws_next_json(&mut x).await;
    assert_eq!(m["data"], "legit");
    let r = http(
        admin,
        "GET",
        "/v1/history/x?since=0",
        &[("Authorization", bearer(ADMIN_TOKEN).as_str())],
        b"",
    )
    .await;
    assert_eq!(
        r.json()["messages"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );
    // The canonical spellings still need the token.
    for (method, path) in [
        ("POST", "/v1/push/x"),
        ("GET", "/v1/history/x"),
        ("GET", "/v1/users/x"),
        ("POST", "/internal/v1/deliver"),
        ("POST", "/v1/push"),
    ] {
        assert_eq!(
            http(admin, method, path, &[], b"[]").await.status,
            401,
            "{path}"
        );
    }
    assert_eq!(http(admin, "GET", "/metrics", &[], b"").await.status, 200);
}

#[tokio::test]
async fn plus_in_an_admin_path_is_a_literal_plus() {
    let server = start(config()).await;
    let mut ab = ws_connect(&server, &token(&server, "a+b", None)).await;
    ws_next_json(&mut ab).await;
    let r = http(server.admin_addr(), "POST", "/v1/push/a+b", &[], b"to a+b").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.json()["user"].as_str(), r.json()["delivered"].as_u64()),
        (Some("a+b"), Some(1))
    );
    assert_eq!(ws_next_json(&mut ab).await["data"], "to a+b");
    let r = http(server.admin_addr(), "GET", "/v1/users/a%2Bb", &[], b"").await;
    assert_eq!(r.json()["connections"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn internal_delivery_takes_the_internal_secret_and_ids_only_with_it() {
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin_security.internal_secret = Some(INTERNAL.into());
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let mut kim = ws_connect(&server, &token(&server, "kim", None)).await;
    ws_next_json(&mut kim).await;
    let item = json!([{"user": "kim", "data": "hi", "id": 7}]).to_string();
    let as_admin = [("Authorization", bearer(ADMIN_TOKEN))];
    let as_admin: Vec<(&str, &str)> = as_admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = http(
        admin,
        "POST",
        "/internal/v1/deliver",
        &as_admin,
        item.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "the admin token is not the internal secret");
    let internal = bearer(INTERNAL);
    let r = http(
        admin,
        "POST",
        "/internal/v1/deliver",
        &[("Authorization", internal.as_str())],
        item.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results"][0]["id"], 7);
    assert_eq!(ws_next_json(&mut kim).await["id"], 7);
    // The internal secret does not open the admin routes.
    let r = http(
        admin,
        "POST",
        "/v1/push/kim",
        &[("Authorization", internal.as_str())],
        b"x",
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn without_an_internal_secret_ids_must_come_from_the_history() {
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let auth = bearer(ADMIN_TOKEN);
    let auth = [("Authorization", auth.as_str())];
    let mut kim = ws_connect(&server, &token(&server, "kim", None)).await;
    ws_next_json(&mut kim).await;
    // An admin-token caller tries to push the connection's ID to the top.
    let forged = json!([{"user": "kim", "data": "forged", "id": u64::MAX}]).to_string();
    let r = http(
        admin,
        "POST",
        "/internal/v1/deliver",
        &auth,
        forged.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results"][0]["outcome"], "invalid", "{}", r.body);
    // A later message still reaches the client (it would be skipped below u64::MAX).
    let first = http(admin, "POST", "/v1/push/kim", &auth, b"real")
        .await
        .json();
    let m = ws_next_json(&mut kim).await;
    assert_eq!((m["data"].as_str(), &m["id"]), (Some("real"), &first["id"]));
    // Replaying a kept message under its own ID is allowed (a redelivery); with other data
    // under that ID it is not.
    let id = first["id"].as_u64().unwrap();
    let replay = json!([
        {"user": "kim", "data": "real", "id": id},
        {"user": "kim", "data": "changed", "id": id}
    ])
    .to_string();
    let r = http(
        admin,
        "POST",
        "/internal/v1/deliver",
        &auth,
        replay.as_bytes(),
    )
    .await;
    let outcomes: Vec<_> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_ne!(outcomes[0], "invalid", "{}", r.body);
    assert_eq!(outcomes[1], "invalid", "{}", r.body);
    assert!(metric(&server, r#"push_admin_refused_total{reason="bad_id"}"#).await >= 2.0);
}

#[tokio::test]
async fn foreign_host_names_and_browser_pages_are_refused() {
    let server = start(config()).await;
    let admin = server.admin_addr();
    let port = admin.port();
    let mut u = ws_connect(&server, &token(&server, "u", None)).await;
    ws_next_json(&mut u).await;
    // DNS rebinding: the page's own name in Host.
    let raw = format!(
        "POST /v1/push/u HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    );
    assert_eq!(raw_status(admin, &raw).await, 403);
    // A cross-site page POSTing text/plain (no preflight needed): Origin is present.
    let raw = format!(
        "POST /v1/push/u HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    );
    assert_eq!(raw_status(admin, &raw).await, 403);
    let raw = format!(
        "POST /v1/push/u HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    );
    assert_eq!(raw_status(admin, &raw).await, 403);
    // No Host at all.
    let raw = "POST /v1/push/u HTTP/1.1\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx";
    assert_eq!(raw_status(admin, raw).await, 400);
    // Addresses and localhost are fine, and a person typing the URL (Sec-Fetch-Site: none).
    let raw = format!(
        "GET /v1/users/u HTTP/1.1\r\nHost: localhost:{port}\r\nSec-Fetch-Site: none\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(admin, &raw).await, 200);
    let r = push(&server, "u", "only this one").await;
    assert_eq!(r["delivered"], 1);
    assert_eq!(ws_next_json(&mut u).await["data"], "only this one");
}

#[tokio::test]
async fn allowed_host_names_are_configurable() {
    let mut cfg = config();
    cfg.admin_security.admin_allowed_hosts = vec!["push-admin.internal".into()];
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let raw =
        "GET /healthz HTTP/1.1\r\nHost: push-admin.internal:9090\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(admin, raw).await, 200);
    let raw = "GET /healthz HTTP/1.1\r\nHost: other.internal\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(admin, raw).await, 403);
}

#[tokio::test]
async fn admin_connections_are_capped() {
    let mut cfg = config();
    cfg.admin_security.admin_max_connections = 2;
    let server = start(cfg).await;
    let admin = server.admin_addr();
    let idle1 = TcpStream::connect(admin).await.unwrap();
    let idle2 = TcpStream::connect(admin).await.unwrap();
    eventually("a third connection to be refused with 503", || async {
        raw_status(
            admin,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await
            == 503
    })
    .await;
    drop((idle1, idle2));
    eventually("the port to serve again once they close", || async {
        raw_status(
            admin,
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await
            == 200
    })
    .await;
}

#[tokio::test]
async fn slow_admin_bodies_and_heads_time_out() {
    let mut cfg = config();
    cfg.admin_security.admin_body_timeout = Duration::from_secs(1);
    cfg.admin_security.admin_header_timeout = Duration::from_secs(1);
    let server = start(cfg).await;
    let admin = server.admin_addr();
    // A body that never completes.
    let raw = "POST /v1/push/u HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nonly part";
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("an answer before WAIT")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // A head that never completes: the connection is closed.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed before WAIT")
        .ok();
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "no answer to half a head"
    );
    assert!(
        metric(
            &server,
            r#"push_admin_refused_total{reason="body_timeout"}"#
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_public_admin_port_needs_a_token_or_admin_insecure() {
    let mut cfg = config();
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    let err = push_server::Server::start(cfg.clone()).await.unwrap_err();
    assert!(err.to_string().contains("--admin-insecure"), "{err}");
    cfg.admin_security.admin_insecure = true;
    let server = start(cfg.clone()).await;
    drop(server);
    cfg.admin_security.admin_insecure = false;
    cfg.admin_token = Some("short".into());
    let err = push_server::Server::start(cfg.clone()).await.unwrap_err();
    assert!(err.to_string().contains("at least 16"), "{err}");
    cfg.admin_token = Some(ADMIN_TOKEN.into());
    cfg.admin_security.internal_secret = Some("short".into());
    let err = push_server::Server::start(cfg).await.unwrap_err();
    assert!(err.to_string().contains("internal_secret"), "{err}");
}

/// Reads a WebSocket handshake answer for `protocols`, raw.
async fn handshake_head(server: &push_server::Server, protocols: &str) -> String {
    let mut s = TcpStream::connect(server.client_addr()).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocols}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("head in time")
            .unwrap();
        assert_eq!(n, 1, "closed before the head ended");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn the_token_is_never_echoed_as_the_subprotocol() {
    let server = start(config()).await;
    let t = token(&server, "p", None);
    let head = handshake_head(&server, &t).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(!head.contains(&t), "token echoed: {head}");
    let head = handshake_head(&server, &format!("push.v1, {t}")).await;
    assert!(
        head.contains("Sec-WebSocket-Protocol: push.v1\r\n"),
        "{head}"
    );
    assert!(!head.contains(&t), "token echoed: {head}");
}

fn sign(claims: serde_json::Value) -> String {
    use base64::Engine as _;
    use hmac::{Mac, SimpleHmac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let head = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64.encode(claims.to_string());
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{head}.{body}").as_bytes());
    let sig = b64.encode(mac.finalize().into_bytes());
    format!("{head}.{body}.{sig}")
}

#[tokio::test]
async fn tokens_without_exp_are_refused_unless_allowed() {
    let forever = sign(json!({"sub": "old"}));
    let server = start(config()).await;
    let r = ws_connect_with(&server, &format!("?token={forever}"), &[]).await;
    assert!(r.is_err(), "a token without exp was accepted");
    let mut cfg = config();
    cfg.require_exp = false;
    let lax = start(cfg).await;
    assert!(ws_connect_with(&lax, &format!("?token={forever}"), &[])
        .await
        .is_ok());
}
