//! The `redis://` backend against real redis-server processes.

mod common;

use std::time::Duration;

use testkit::RedisServer;

#[tokio::test]
async fn redis_passes_the_behaviour_suite() {
    let server = RedisServer::start();
    let reg = push_registry::open(&server.url()).await.unwrap();
    common::behaviour_suite(reg.as_ref(), "redis").await;
}

/// What Dynomite proxies (its redis command table), narrowed to what a registry could want.
/// Anything else the backend sent would break behind a Dynomite proxy.
const DYNOMITE_ALLOWED: &[&str] = &[
    "EVAL",
    "EVALSHA",
    "HGET",
    "HGETALL",
    "HSET",
    "HDEL",
    "HMGET",
    "HEXISTS",
    "HLEN",
    "PTTL",
    "PEXPIRE",
    "EXPIRE",
    "TTL",
    "GET",
    "SET",
    "DEL",
    "ZADD",
    "ZRANGEBYSCORE",
    "ZREM",
    "SCAN",
    "PING",
    "INCR",
];

#[tokio::test]
async fn redis_backend_sends_only_dynomite_supported_commands() {
    let server = RedisServer::start();
    let monitor = server.monitor();
    let reg = push_registry::open(&server.url()).await.unwrap();
    common::behaviour_suite(reg.as_ref(), "mon").await;
    // A marker after the suite: once MONITOR has streamed it, it has streamed everything.
    reg.lookup("end-of-suite-marker").await.unwrap();
    assert!(monitor.wait_for("end-of-suite-marker", Duration::from_secs(10)));

    let lines = monitor.lines();
    let mut seen = std::collections::BTreeSet::new();
    for line in &lines {
        // `1700000000.123456 [0 127.0.0.1:5555] "HSET" "key" ...` (or `[0 lua]` in scripts)
        let command = line
            .split("] \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("unparsed MONITOR line {line:?}"))
            .to_ascii_uppercase();
        assert!(
            DYNOMITE_ALLOWED.contains(&command.as_str()),
            "{command} is not proxied by Dynomite: {line}"
        );
        if command == "EVAL" {
            // Dynomite routes a script by its one key: exactly one, and a registry key.
            let numkeys_and_key = line.split("\" \"").skip(2).take(2).collect::<Vec<_>>();
            assert_eq!(
                numkeys_and_key.first(),
                Some(&"1"),
                "EVAL with other than one key: {line}"
            );
            assert!(numkeys_and_key[1].starts_with("pr:{"), "{line}");
        }
        seen.insert(command);
    }
    // The scripts really ran (their inner commands are monitored too), and nothing needed
    // MULTI, pub/sub or a multi-key command.
    for expected in ["EVAL", "HGETALL", "HSET", "HDEL", "PEXPIRE", "SCAN", "PING"] {
        assert!(seen.contains(expected), "never saw {expected}: {seen:?}");
    }
}

#[tokio::test]
async fn errors_name_the_failed_node() {
    let mut server = RedisServer::start();
    let reg = push_registry::open(&format!("{}?timeout_ms=500", server.url()))
        .await
        .unwrap();
    reg.register(&common::rec("u", None, "c", "n"), common::LONG)
        .await
        .unwrap();
    server.kill();
    let err = reg.lookup("u").await.unwrap_err().to_string();
    assert!(err.contains(&server.addr()), "{err}");

    // The backend reconnects by itself once the node is back.
    server.restart();
    let back = common::eventually(Duration::from_secs(5), || async {
        reg.lookup("u").await.is_ok()
    })
    .await;
    assert!(back);
}

#[tokio::test]
async fn a_foreign_value_is_reported_not_misread() {
    let server = RedisServer::start();
    server.command(&["HSET", "pr:{mallory}", "d:x", "not json"]);
    let reg = push_registry::open(&server.url()).await.unwrap();
    let err = reg.lookup("mallory").await.unwrap_err().to_string();
    assert!(
        err.contains("mallory") && err.contains(&server.addr()),
        "{err}"
    );
}
