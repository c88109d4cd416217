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
