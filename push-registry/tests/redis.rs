//! The `redis://` backend against real redis-server processes.

mod common;

use std::time::Duration;

use push_registry::Error;
use testkit::resp::Reply;
use testkit::RedisServer;

#[tokio::test]
async fn redis_passes_the_behaviour_suite() {
    let server = RedisServer::start();
    let reg = push_registry::open(&server.url()).await.unwrap();
    common::behaviour_suite(reg.as_ref(), "redis").await;
}

#[tokio::test]
async fn redis_history_passes_the_suite() {
    let server = RedisServer::start();
    common::history::history_suite(&server.url(), "redis").await;
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
    "ZCARD",
    // The history's mid index: both are in Dynomite's supported sorted-set commands.
    "ZCOUNT",
    "ZREMRANGEBYSCORE",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZREM",
    "ZREMRANGEBYRANK",
    "ZSCORE",
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
    common::history::history_suite(&server.url(), "mon").await;
    // A marker after the suites: once MONITOR has streamed it, it has streamed everything.
    reg.lookup("end-of-suite-marker").await.unwrap();
    assert!(monitor.wait_for("end-of-suite-marker", Duration::from_secs(10)));

    let lines = monitor.lines();
    let mut seen = std::collections::BTreeSet::new();
    let mut history_evals = 0;
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
        if command == "EVAL" || command == "EVALSHA" {
            // Dynomite routes a script by its one key: exactly one, and a registry or history
            // key. (MONITOR escapes the script's quotes, so the split lands on the arguments.)
            let numkeys_and_key = line.split("\" \"").skip(2).take(2).collect::<Vec<_>>();
            assert_eq!(
                numkeys_and_key.first(),
                Some(&"1"),
                "EVAL with other than one key: {line}"
            );
            let key = numkeys_and_key[1];
            assert!(key.starts_with("pr:{") || key.starts_with("ph:{"), "{line}");
            history_evals += usize::from(key.starts_with("ph:{"));
        }
        seen.insert(command);
    }
    // The scripts really ran (their inner commands are monitored too), and nothing needed
    // MULTI, pub/sub or a multi-key command.
    for expected in ["EVAL", "HGETALL", "HSET", "HDEL", "PEXPIRE", "SCAN", "PING"] {
        assert!(seen.contains(expected), "never saw {expected}: {seen:?}");
    }
    // The history scripts ran too: one EVAL on one `ph:` key per append, since and get.
    assert!(history_evals >= 40, "only {history_evals} history EVALs");
    for expected in [
        "ZADD",
        "ZSCORE",
        "ZRANGE",
        "ZRANGEBYSCORE",
        "ZREMRANGEBYRANK",
    ] {
        assert!(seen.contains(expected), "never saw {expected}: {seen:?}");
    }
}

/// A registry and history on `redis://…?scripts=hash` (the form for a plain Redis): the suites
/// pass with every script called by its hash, the text goes only to a node that lacks the
/// script (fresh, or after `SCRIPT FLUSH`), and a refresh call puts a small part of the bytes
/// on the wire that it does by text.
#[tokio::test]
async fn scripts_by_hash_pass_the_suites_survive_a_flushed_cache_and_send_far_fewer_bytes() {
    let server = RedisServer::start();
    let url = format!("{}?scripts=hash", server.url());
    let by_hash = push_registry::open(&url).await.unwrap();
    common::behaviour_suite(by_hash.as_ref(), "hash").await;
    common::history::history_suite(&url, "hash").await;

    // The script cache emptied (as by a restart that kept the data): the next calls still
    // answer, by sending the text once.
    let monitor = server.monitor();
    let rec = common::rec("flushed", Some("d"), "c1", "n");
    by_hash.register(&rec, common::LONG).await.unwrap();
    assert_eq!(
        server.command(&["SCRIPT", "FLUSH"]),
        Reply::Simple("OK".into())
    );
    let newer = common::rec("flushed", Some("d"), "c2", "n");
    by_hash.register(&newer, common::LONG).await.unwrap();
    assert_eq!(
        by_hash.lookup("flushed").await.unwrap(),
        vec![newer.clone()]
    );
    assert!(monitor.wait_for("\"HGETALL\" \"pr:{flushed}\"", Duration::from_secs(10)));
    let calls: Vec<String> = monitor
        .lines()
        .iter()
        .filter(|l| l.contains("pr:{flushed}") && l.contains("EVAL"))
        .map(|l| {
            l.split("] \"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    // The register before the flush by hash (the suites cached the script); the one after
    // by hash (refused: NOSCRIPT), then by text.
    assert_eq!(
        calls,
        ["EVALSHA", "EVALSHA", "EVAL"],
        "{:?}",
        monitor.lines()
    );

    // The bytes Redis reads for one refresh call of 1,000 records, by text and by hash.
    let by_text = push_registry::open(&server.url()).await.unwrap();
    let records: Vec<_> = (0..1000)
        .map(|i| common::rec(&format!("bytes-{i}"), None, &format!("c{i}"), "n"))
        .collect();
    by_text.refresh(&records, common::LONG).await.unwrap();
    let read = || -> u64 {
        let Reply::Bulk(Some(info)) = server.command(&["INFO", "stats"]) else {
            panic!("INFO is a bulk string");
        };
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no total_net_input_bytes in {info}"))
    };
    let before = read();
    by_text.refresh(&records, common::LONG).await.unwrap();
    let text_bytes = read() - before;
    let before = read();
    by_hash.refresh(&records, common::LONG).await.unwrap();
    let hash_bytes = read() - before;
    assert!(
        hash_bytes * 4 < text_bytes,
        "a refresh of 1,000 read {hash_bytes} bytes by hash, {text_bytes} by text"
    );
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
    let back = testkit::poll_until(Duration::from_secs(5), || async {
        reg.lookup("u").await.is_ok()
    })
    .await;
    assert!(back);
}

#[tokio::test]
async fn history_errors_name_the_failed_node_and_recover_after_restart() {
    let mut server = RedisServer::start();
    let url = format!("{}?timeout_ms=500", server.url());
    let store = common::history::open(&url, common::history::FIVE).await;
    let before = store
        .append(&[common::history::msg("ida", "m1")])
        .await
        .unwrap()[0]
        .id;
    server.kill();
    for err in [
        store
            .append(&[common::history::msg("ida", "m2")])
            .await
            .unwrap_err(),
        store.since("ida", 0).await.unwrap_err(),
        store.get("ida", &[before]).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::Node { .. }), "{err}");
        assert!(err.to_string().contains(&server.addr()), "{err}");
    }

    // Back, empty: the store reconnects by itself, and the node, which forgot the user,
    // seeds new IDs from the clock, above every ID it gave before.
    server.restart();
    let back = testkit::poll_until(Duration::from_secs(5), || async {
        store.since("ida", 0).await.is_ok()
    })
    .await;
    assert!(back);
    let r = store.since("ida", before).await.unwrap();
    assert!(
        r.messages.is_empty() && r.gap.is_some_and(|g| g > before),
        "{r:?}"
    );
    let after = store
        .append(&[common::history::msg("ida", "m3")])
        .await
        .unwrap()[0]
        .id;
    assert!(after > before, "{after} > {before}");
    let r = store.since("ida", before).await.unwrap();
    assert_eq!(r.messages.iter().map(|m| m.id).collect::<Vec<_>>(), [after]);
}

#[tokio::test]
async fn the_mid_index_finds_duplicates_without_a_scan_and_stays_bounded() {
    use common::history::{with_mid, FIVE};
    let server = RedisServer::start();
    let store = common::history::open(&server.url(), FIVE).await;
    let mids: Vec<String> = (0..20).map(|i| format!("mid-{i}")).collect();
    let mut ids = Vec::new();
    for mid in &mids {
        ids.push(store.append(&[with_mid("ivy", mid, "x")]).await.unwrap()[0].id);
    }
    // Kept: the last five, and their index entries only.
    let index = server.command(&["ZCOUNT", "ph:{ivy}", "-inf", "(0"]);
    assert_eq!(format!("{index:?}"), "Int(5)");
    let monitor = server.monitor();
    let again = store
        .append(&[with_mid("ivy", &mids[19], "x, again")])
        .await
        .unwrap()[0];
    assert_eq!((again.id, again.duplicate), (ids[19], true));
    // An aged-out mid is not a duplicate any more: it is appended anew.
    let old = store
        .append(&[with_mid("ivy", &mids[0], "x")])
        .await
        .unwrap()[0];
    assert!(!old.duplicate && old.id > ids[19]);
    store
        .append(&[with_mid("ivy-end", "m", "x")])
        .await
        .unwrap();
    assert!(monitor.wait_for("ivy-end", Duration::from_secs(10)));
    // The lookup reads no range of the whole history: every ZRANGE is one rank.
    for line in monitor.lines() {
        if line.contains("\"ZRANGE\"") {
            assert!(
                !line.contains("\"0\" \"-1\""),
                "a whole-history scan: {line}"
            );
        }
    }
    let r = store.since("ivy", 0).await.unwrap();
    assert_eq!(r.messages.len(), 5);
    let index = server.command(&["ZCOUNT", "ph:{ivy}", "-inf", "(0"]);
    assert_eq!(format!("{index:?}"), "Int(5)");
}

#[tokio::test]
async fn a_foreign_history_member_is_reported_not_misread() {
    let server = RedisServer::start();
    server.command(&["ZADD", "ph:{mallory}", "5", "not json", "5", "~last"]);
    let store = common::history::open(&server.url(), common::history::FIVE).await;
    let err = store.since("mallory", 0).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("mallory") && msg.contains(&server.addr()),
        "{msg}"
    );
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

/// Register and refresh do not read the user's whole hash while it is small (the prune used to
/// run HGETALL and decode every field on every write); once the hash reaches the bound, a
/// write that adds a field prunes the expired ones, so an active user's hash stays bounded.
#[tokio::test]
async fn writes_prune_only_past_the_bound() {
    let server = RedisServer::start();
    let monitor = server.monitor();
    let reg = push_registry::open(&server.url()).await.unwrap();
    let user = "prune-user";
    let key = format!("pr:{{{user}}}");
    // A few device-less connections registered and refreshed, as a node does.
    let recs: Vec<_> = (0..4)
        .map(|i| common::rec(user, None, &format!("c{i}"), "node-a"))
        .collect();
    for r in &recs {
        reg.register(r, common::LONG).await.unwrap();
    }
    for _ in 0..3 {
        reg.refresh(&recs, common::LONG).await.unwrap();
    }
    reg.lookup("small-hash-marker").await.unwrap();
    assert!(monitor.wait_for("small-hash-marker", Duration::from_secs(10)));
    let hgetalls: Vec<String> = monitor
        .lines()
        .into_iter()
        .filter(|l| l.contains("\"HGETALL\"") && l.contains(&key))
        .collect();
    assert!(
        hgetalls.is_empty(),
        "register/refresh read the whole hash: {hgetalls:?}"
    );

    // Connections of a node that died without unregistering: their fields expire in place.
    // Exactly enough to fill the hash to the bound, so that none of these writes prunes.
    let short = Duration::from_millis(500);
    for i in 0..push_registry::PRUNE_AT - recs.len() {
        let r = common::rec(user, None, &format!("dead{i}"), "node-dead");
        reg.register(&r, short).await.unwrap();
    }
    tokio::time::sleep(short + Duration::from_millis(500)).await;
    let hlen = || match server.command(&["HLEN", &key]) {
        testkit::resp::Reply::Int(n) => n,
        other => panic!("HLEN answered {other:?}"),
    };
    // Refreshes of existing fields never prune, even with expired fields present.
    reg.refresh(&recs, common::LONG).await.unwrap();
    assert_eq!(hlen(), push_registry::PRUNE_AT as i64);
    // The next write that adds a field finds the hash at the bound and prunes it.
    let fresh = common::rec(user, None, "fresh", "node-a");
    reg.register(&fresh, common::LONG).await.unwrap();
    assert_eq!(
        hlen(),
        (recs.len() + 1) as i64,
        "expired fields were not pruned"
    );
    assert_eq!(reg.lookup(user).await.unwrap().len(), recs.len() + 1);
}
