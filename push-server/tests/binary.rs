//! The `push-server` binary as an operator runs it: banner, token subcommand, environment
//! and config-file settings, and SIGTERM drain then exit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn banner_token_works_and_sigterm_drains_then_exits() {
    let mut p = spawn(&["--drain-window", "1s", "--reconnect-grace", "2s"], &[]);
    let url = format!("ws://{}/ws?token={}", p.client, p.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(ws_next_json(&mut ws).await["user"], "demo");
    let r = http(p.admin, "POST", "/v1/push/demo", &[], b"hello").await;
    assert_eq!(r.json()["delivered"], 1);
    assert_eq!(ws_next_json(&mut ws).await["data"], "hello");

    let status = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rc = ws_next_json(&mut ws).await;
    assert_eq!(rc["type"], "reconnect");
    assert_eq!(rc["reason"], "drain");
    ws.send(Message::Close(None)).await.unwrap();
    let _ = ws_close_code(&mut ws).await;
    drop(ws);

    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after its drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn token_subcommand_mints_tokens_for_the_configured_secret() {
    let secret = "token-subcommand-secret-0123456789";
    let out = Command::new(BIN)
        .args(["token", "--user", "zoe", "--device", "watch", "--ttl", "5m"])
        .env("PUSH_AUTH_SECRET", secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = push_server::auth::Authenticator::new(secret.as_bytes(), true)
        .verify(token.trim())
        .unwrap();
    assert_eq!(claims.sub, "zoe");
    assert_eq!(claims.did.as_deref(), Some("watch"));

    let out = Command::new(BIN)
        .args(["token", "--user", "zoe"])
        .env_remove("PUSH_AUTH_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret configured"));
}

#[tokio::test]
async fn settings_come_from_the_environment_and_the_config_file() {
    let dir = std::env::temp_dir().join(format!("push-server-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("push.toml");
    std::fs::write(&file, "max_connections = 7\nnode_id = \"from-file\"\n").unwrap();
    let p = spawn(
        &["--config", file.to_str().unwrap()],
        &[("PUSH_NODE_ID", "from-env")],
    );
    let ready = http(p.admin, "GET", "/readyz", &[], b"").await.json();
    assert_eq!(ready["capacity"], 7, "file sets max_connections");
    let url = format!("ws://{}/ws?token={}", p.client, p.token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(
        ws_next_json(&mut ws).await["node"],
        "from-env",
        "environment beats the file"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn invalid_settings_fail_with_a_clear_message() {
    let out = Command::new(BIN)
        .args(["--heartbeat-interval", "1m", "--heartbeat-timeout", "10s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat_timeout"), "{err}");
}

#[test]
fn an_invalid_registry_url_stops_the_start_with_a_clear_message() {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--registry", "postgres://nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid setting `registry`: invalid registry URL \"postgres://nope\""),
        "{err}"
    );
}

#[test]
fn a_generated_secret_is_not_printed_to_a_pipe() {
    use std::io::BufRead as _;
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("PUSH_AUTH_SECRET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut banner = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.trim().starts_with("token ") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(banner.contains("not shown"), "{banner}");
    assert!(!banner.contains("eyJ"), "a token was printed: {banner}");
}
