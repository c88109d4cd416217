//! The `ring://` backend over real redis-server nodes: three racks, each a full replica.

mod common;

use std::time::Duration;

use push_registry::Error;
use testkit::resp::Reply;
use testkit::RedisServer;

fn ring_url(nodes: &[RedisServer], racks: usize, read: &str, write: &str) -> String {
    let addrs: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
    format!(
        "ring://{}?racks={racks}&read={read}&write={write}&timeout_ms=500",
        addrs.join(",")
    )
}

fn start(n: usize) -> Vec<RedisServer> {
    (0..n).map(|_| RedisServer::start()).collect()
}

#[tokio::test]
async fn ring_passes_the_behaviour_suite() {
    // Two nodes per rack, so users really are spread by the token ring.
    let nodes = start(6);
    let quorum = push_registry::open(&ring_url(&nodes, 3, "quorum", "quorum"))
        .await
        .unwrap();
    common::behaviour_suite(quorum.as_ref(), "ring-q").await;
    let safe = push_registry::open(&ring_url(&nodes, 3, "safe_quorum", "safe_quorum"))
        .await
        .unwrap();
    common::behaviour_suite(safe.as_ref(), "ring-sq").await;
    let one = push_registry::open(&ring_url(&nodes, 3, "one", "one"))
        .await
        .unwrap();
    common::behaviour_suite(one.as_ref(), "ring-one").await;
    // Every rack holds every user: each rack's nodes together have all the keys.
    for rack in nodes.chunks(2) {
        let keys: i64 = rack
            .iter()
            .map(|n| match n.command(&["DBSIZE"]) {
                Reply::Int(k) => k,
                other => panic!("DBSIZE answered {other:?}"),
            })
            .sum();
        assert!(keys >= 3 * 70, "rack holds only {keys} keys");
    }
}

#[tokio::test]
async fn ring_history_passes_the_suite() {
    let nodes = start(6);
    common::history::history_suite(&ring_url(&nodes, 3, "quorum", "quorum"), "ring-q").await;
    common::history::history_suite(&ring_url(&nodes, 3, "one", "one"), "ring-one").await;
    // Every rack holds a copy of every history: each rack's nodes together have the same keys.
    let history_keys = |rack: &[RedisServer]| -> usize {
        rack.iter()
            .map(|n| match n.command(&["KEYS", "ph:*"]) {
                Reply::Array(Some(keys)) => keys.len(),
                other => panic!("KEYS answered {other:?}"),
            })
            .sum()
    };
    let per_rack: Vec<usize> = nodes.chunks(2).map(history_keys).collect();
    assert!(per_rack[0] >= 2 * 8, "{per_rack:?}");
    assert!(per_rack.iter().all(|&k| k == per_rack[0]), "{per_rack:?}");
}

#[tokio::test]
async fn ring_history_keeps_increasing_ids_with_a_rack_down() {
    use common::history::{msg, with_mid, FIVE};
    let mut nodes = start(3);
    let url = ring_url(&nodes, 3, "quorum", "quorum");
    let store = common::history::open(&url, FIVE).await;
    let one = common::history::open(&ring_url(&nodes, 3, "one", "one"), FIVE).await;
    let first = store
        .append(&[msg("hana", "h1"), msg("hana", "h2")])
        .await
        .unwrap();
    let f = first[0].id;
    assert_eq!(first[1].id, f + 1);
    // The copies reached the other racks, byte for byte.
    let members = |n: &RedisServer| n.command(&["ZRANGE", "ph:{hana}", "0", "-1", "WITHSCORES"]);
    assert_eq!(members(&nodes[1]), members(&nodes[0]));
    assert_eq!(members(&nodes[2]), members(&nodes[0]));

    // The first rack's node dies: the next rack appends, continuing the IDs.
    nodes[0].kill();
    let next = store
        .append(&[msg("hana", "h3"), with_mid("hana", "mid-4", "h4")])
        .await
        .unwrap();
    assert_eq!([next[0].id, next[1].id], [f + 2, f + 3]);
    let r = store.since("hana", f).await.unwrap();
    assert_eq!(
        r.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [f + 1, f + 2, f + 3]
    );
    assert_eq!(r.gap, None);
    assert_eq!(store.get("hana", &[f + 2]).await.unwrap()[0].data, "h3");
    // Dedup still holds on the standing-in rack.
    let again = store
        .append(&[with_mid("hana", "mid-4", "h4")])
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].duplicate), (f + 3, true));

    // Even when the stand-in missed the last copy, its counter is raised from the third rack.
    nodes[2].command(&["ZADD", "ph:{hana}", &(f + 9).to_string(), "~last"]);
    let jumped = store.append(&[msg("hana", "h5")]).await.unwrap()[0].id;
    assert_eq!(jumped, f + 10);

    // Two racks down: quorum cannot place the copy and says so; `one` still appends.
    nodes[1].kill();
    let err = store.append(&[msg("hana", "h6")]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Quorum {
                needed: 2,
                succeeded: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&nodes[0].addr()), "{err}");
    let last = one.append(&[msg("hana", "h7")]).await.unwrap()[0].id;
    assert!(last > jumped, "{last} > {jumped}");
    let r = one.since("hana", jumped).await.unwrap();
    assert_eq!(
        r.messages.last().map(|m| (m.id, &m.data[..])),
        Some((last, &b"h7"[..]))
    );

    // All down: the error names every node.
    nodes[2].kill();
    let err = one.since("hana", 0).await.unwrap_err().to_string();
    assert!(nodes.iter().all(|n| err.contains(&n.addr())), "{err}");

    // The first rack's node comes back empty: appends go to it again, and its IDs, seeded
    // from the clock, are above every ID given before.
    nodes[0].restart();
    let back = one.append(&[msg("hana", "h8")]).await.unwrap()[0].id;
    assert!(back > last, "{back} > {last}");
    assert_eq!(one.since("hana", last).await.unwrap().messages[0].id, back);
}

#[tokio::test]
async fn quorum_survives_one_node_and_fails_clearly_without_two() {
    let mut nodes = start(3);
    let quorum = push_registry::open(&ring_url(&nodes, 3, "quorum", "quorum"))
        .await
        .unwrap();
    let one = push_registry::open(&ring_url(&nodes, 3, "one", "one"))
        .await
        .unwrap();
    let r1 = common::rec("dora", Some("phone"), "c1", "n1");
    quorum.register(&r1, common::LONG).await.unwrap();

    // One node down: quorum reads and writes still succeed.
    nodes[0].kill();
    assert_eq!(quorum.lookup("dora").await.unwrap(), vec![r1.clone()]);
    let r2 = common::rec("dora", Some("laptop"), "c2", "n1");
    quorum.register(&r2, common::LONG).await.unwrap();
    assert_eq!(quorum.lookup("dora").await.unwrap().len(), 2);

    // Two down: quorum fails and says which nodes and why; `one` still answers.
    nodes[1].kill();
    let err = quorum.lookup("dora").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Quorum {
                needed: 2,
                succeeded: 1,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&nodes[0].addr()) && msg.contains(&nodes[1].addr()),
        "{msg}"
    );
    let err = quorum.register(&r1, common::LONG).await.unwrap_err();
    assert!(err.to_string().contains("register needs 2 of 3"), "{err}");
    assert_eq!(one.lookup("dora").await.unwrap().len(), 2);
    one.register(&common::rec("dora", None, "c3", "n2"), common::LONG)
        .await
        .unwrap();
    assert_eq!(one.lookup("dora").await.unwrap().len(), 3);

    // All three down: even `one` fails, naming every node.
    nodes[2].kill();
    let msg = one.lookup("dora").await.unwrap_err().to_string();
    assert!(nodes.iter().all(|n| msg.contains(&n.addr())), "{msg}");
}

#[tokio::test]
async fn a_node_restarted_empty_is_repaired_by_reads() {
    let mut nodes = start(3);
    let quorum = push_registry::open(&ring_url(&nodes, 3, "quorum", "quorum"))
        .await
        .unwrap();
    let safe = push_registry::open(&ring_url(&nodes, 3, "safe_quorum", "quorum"))
        .await
        .unwrap();
    let users: Vec<String> = (0..20).map(|i| format!("eve-{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        quorum
            .register(
                &common::rec(u, Some("d"), &format!("c{i}"), "n"),
                common::LONG,
            )
            .await
            .unwrap();
    }
    nodes[1].restart();
    assert_eq!(nodes[1].command(&["DBSIZE"]), Reply::Int(0));

    // Quorum reads answer from the others and write the records back to the empty node.
    let found = quorum.lookup_many(&users).await.unwrap();
    assert!(found.iter().all(|r| r.len() == 1));
    assert_eq!(nodes[1].command(&["DBSIZE"]), Reply::Int(20));
    for u in &users {
        let key = format!("pr:{{{u}}}");
        assert_eq!(nodes[1].command(&["HLEN", &key]), Reply::Int(1), "{u}");
        // The repaired key expires like the original.
        assert!(matches!(nodes[1].command(&["PTTL", &key]), Reply::Int(t) if t > 0));
    }

    // safe_quorum: with one node down and one empty, the two answers disagree: the read fails,
    // but repairs the empty node, so the next one agrees.
    nodes[2].kill();
    nodes[1].restart();
    let err = safe.lookup("eve-0").await.unwrap_err();
    assert!(matches!(err, Error::Disagreement { .. }), "{err}");
    assert_eq!(safe.lookup("eve-0").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_stale_replica_cannot_resurrect_an_unregistered_connection() {
    let nodes = start(3);
    let quorum = push_registry::open(&ring_url(&nodes, 3, "quorum", "quorum"))
        .await
        .unwrap();
    let r = common::rec("finn", Some("phone"), "c1", "n");
    quorum.register(&r, common::LONG).await.unwrap();
    let Reply::Bulk(Some(live)) = nodes[2].command(&["HGET", "pr:{finn}", "d:phone"]) else {
        panic!("replica lacks the record");
    };
    assert!(quorum
        .unregister("finn", Some("phone"), "c1")
        .await
        .unwrap());
    // As if node 2 had missed the unregister: put its live copy back.
    nodes[2].command(&["HSET", "pr:{finn}", "d:phone", &live]);

    assert!(quorum.lookup("finn").await.unwrap().is_empty());
    // Read repair handed the tombstone to the stale replica.
    let Reply::Bulk(Some(now)) = nodes[2].command(&["HGET", "pr:{finn}", "d:phone"]) else {
        panic!("replica lost the slot");
    };
    assert!(now.contains("\"del\":true"), "{now}");

    // A newer connection for the device beats the tombstone.
    let r2 = common::rec("finn", Some("phone"), "c2", "n");
    tokio::time::sleep(Duration::from_millis(2)).await; // a later connected_at than c1's
    quorum.register(&r2, common::LONG).await.unwrap();
    assert_eq!(quorum.lookup("finn").await.unwrap(), vec![r2]);
}
