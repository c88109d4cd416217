//! The `redis-cluster://` backend on a real 3-master, 3-replica Redis Cluster.

mod common;

use std::time::Duration;

use testkit::RedisCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_passes_the_suite_and_survives_a_master_failover() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap();
    let url = format!("redis-cluster://{}?timeout_ms=1000", cluster.addrs());
    let reg = push_registry::open(&url).await.unwrap();
    common::behaviour_suite(reg.as_ref(), "cl").await;

    // Users spread over all three masters' slots; each user's hash stays whole on one.
    let users: Vec<String> = (0..30).map(|i| format!("fo-{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        reg.register(
            &common::rec(u, Some("d"), &format!("c{i}"), "n1"),
            common::LONG,
        )
        .await
        .unwrap();
    }

    // Kill the master holding users[0]; a replica takes over (bounded wait in the harness).
    let key = "pr:{fo-0}".to_string();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.fail_master_for_key(&key, Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap();

    // Replication is asynchronous, so a write acknowledged just before the kill could be
    // lost; these were written well before, so all must be there, through the new master.
    let ok = testkit::poll_until(Duration::from_secs(20), || async {
        matches!(reg.lookup_many(&users).await, Ok(found) if found.iter().all(|r| r.len() == 1))
    })
    .await;
    assert!(
        ok,
        "lookups after failover: {:?}",
        reg.lookup_many(&users).await
    );
    // And writes work on the promoted replica.
    let after = common::rec("fo-0", Some("d2"), "c-after", "n2");
    reg.register(&after, common::LONG).await.unwrap();
    assert_eq!(reg.lookup("fo-0").await.unwrap().len(), 2);
    assert!(reg.unregister("fo-0", Some("d2"), "c-after").await.unwrap());
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_history_passes_the_suite() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let url = format!("redis-cluster://{}?timeout_ms=1000", cluster.addrs());
    common::history::history_suite(&url, "cl").await;
    // The suite's users really were spread over the masters: each holds some history keys.
    for node in &cluster.nodes {
        let testkit::resp::Reply::Int(keys) = node.command(&["DBSIZE"]) else {
            panic!("DBSIZE gave no number");
        };
        assert!(keys > 0, "{} holds no key", node.addr());
    }
}
