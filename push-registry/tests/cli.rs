//! The `push-registry` binary against a real redis-server: output and exit codes.

use std::process::{Command, Output};

use testkit::RedisServer;

fn cli(registry: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_push-registry"))
        .arg("--registry")
        .arg(registry)
        .args(args)
        .output()
        .expect("run push-registry")
}

#[test]
fn register_lookup_unregister_stats_ping_with_exit_codes() {
    let mut server = RedisServer::start();
    let url = server.url();
    let reg = [
        "register",
        "--user",
        "u1",
        "--device",
        "phone",
        "--node-id",
        "edge-1",
        "--node-addr",
        "10.0.0.1:9000",
        "--conn-id",
        "c1",
        "--ttl",
        "5m",
    ];
    assert_eq!(cli(&url, &reg).status.code(), Some(0));

    let out = cli(&url, &["lookup", "u1"]);
    assert_eq!(out.status.code(), Some(0));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records[0]["node_id"], "edge-1");
    assert_eq!(records[0]["conn_id"], "c1");

    assert_eq!(cli(&url, &["lookup", "nobody"]).status.code(), Some(1));

    let stats = cli(&url, &["stats"]);
    assert_eq!(stats.status.code(), Some(0));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["per_node"]["edge-1"], 1);

    let ping = cli(&url, &["ping"]);
    assert_eq!(ping.status.code(), Some(0));
    let ping: serde_json::Value = serde_json::from_slice(&ping.stdout).unwrap();
    assert_eq!(ping[0]["ok"], true);

    let wrong_owner = [
        "unregister",
        "--user",
        "u1",
        "--device",
        "phone",
        "--conn-id",
        "c0",
    ];
    assert_eq!(cli(&url, &wrong_owner).status.code(), Some(1));
    let owner = [
        "unregister",
        "--user",
        "u1",
        "--device",
        "phone",
        "--conn-id",
        "c1",
    ];
    assert_eq!(cli(&url, &owner).status.code(), Some(0));
    assert_eq!(cli(&url, &["lookup", "u1"]).status.code(), Some(1));

    // Storage down: exit 2 and a message naming the node.
    server.kill();
    let out = cli(&format!("{url}?timeout_ms=300"), &["lookup", "u1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&server.addr()), "{err}");
    assert_eq!(cli(&url, &["ping"]).status.code(), Some(2));

    // A bad URL is a usage error, also 2, with the reason.
    let out = cli("mongodb://x", &["lookup", "u1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid registry URL"));
}

#[tokio::test]
async fn history_prints_kept_messages_with_exit_codes() {
    let mut server = RedisServer::start();
    let url = server.url();
    let limits = push_registry::BufferLimits {
        max_messages: 3,
        max_age: std::time::Duration::from_secs(60),
    };
    let store = push_registry::open_store(&url, limits).await.unwrap();
    let batch: Vec<push_registry::NewMessage<'_>> = ["one", "two", "three", "four"]
        .iter()
        .map(|d| push_registry::NewMessage {
            user: "hal",
            mid: None,
            device: Some("phone"),
            traceparent: None,
            json: false,
            data: d.as_bytes(),
        })
        .collect();
    let ids: Vec<u64> = store
        .append(&batch)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    let history = |args: &[&str]| {
        let mut all = vec!["history", "hal", "--history-messages", "3"];
        all.extend_from_slice(args);
        cli(&url, &all)
    };

    let out = history(&[]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["two", "three", "four"]);
    assert_eq!(v["messages"][0]["id"], ids[1]);
    assert_eq!(v["messages"][0]["device"], "phone");
    assert_eq!(v["gap"], serde_json::Value::Null);

    // A client that saw the first (trimmed by the count limit): the rest, no gap, since the
    // second is still kept. One whose last ID is older still is told of the gap.
    let since = ids[0].to_string();
    let v: serde_json::Value =
        serde_json::from_slice(&history(&["--since", &since]).stdout).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 3);
    assert_eq!(v["gap"], serde_json::Value::Null);
    let before = (ids[0] - 1).to_string();
    let v: serde_json::Value =
        serde_json::from_slice(&history(&["--since", &before]).stdout).unwrap();
    assert_eq!(v["gap"], ids[1]);

    // Nothing owed: exit 1.
    let newest = ids[3].to_string();
    assert_eq!(history(&["--since", &newest]).status.code(), Some(1));
    assert_eq!(cli(&url, &["history", "nobody"]).status.code(), Some(1));

    // Storage down: exit 2, naming the node.
    server.kill();
    let out = cli(&format!("{url}?timeout_ms=300"), &["history", "hal"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&server.addr()));
}
