//! The behavioural suite every backend must pass, and helpers shared by the test files.

#![allow(dead_code)] // each test file uses a different subset

pub mod history;

use std::time::Duration;

use push_registry::{Record, RefreshOutcome, Registry};

/// A record for `user`'s `device` held by connection `conn` on `node`.
pub fn rec(user: &str, device: Option<&str>, conn: &str, node: &str) -> Record {
    Record {
        user: user.into(),
        device: device.map(str::to_string),
        node_id: node.into(),
        node_addr: format!("http://{node}.internal:9000"),
        conn_id: conn.into(),
        connected_at: push_registry::now_ms(),
    }
}

fn conns(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.conn_id.as_str()).collect()
}

/// Long enough that nothing expires during a test by accident.
pub const LONG: Duration = Duration::from_secs(60);

/// The contract of [`Registry`], checked the same way on every backend. `tag` keeps users
/// apart when one storage holds several runs.
pub async fn behaviour_suite(reg: &dyn Registry, tag: &str) {
    let u = |name: &str| format!("{tag}-{name}");

    // Newest registration wins for one (user, device).
    let alice = u("alice");
    let old = rec(&alice, Some("phone"), "c-old", "node-a");
    let new = rec(&alice, Some("phone"), "c-new", "node-b");
    reg.register(&old, LONG).await.unwrap();
    assert_eq!(reg.lookup(&alice).await.unwrap(), vec![old.clone()]);
    reg.register(&new, LONG).await.unwrap();
    assert_eq!(reg.lookup(&alice).await.unwrap(), vec![new.clone()]);

    // Compare-and-delete: the old connection closing leaves the new one's entry alone.
    assert!(!reg
        .unregister(&alice, Some("phone"), "c-old")
        .await
        .unwrap());
    assert_eq!(reg.lookup(&alice).await.unwrap(), vec![new.clone()]);

    // A refresh by the superseded connection does not bring it back; the owner's does.
    let outcomes = reg
        .refresh(&[old.clone(), new.clone()], LONG)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [RefreshOutcome::Superseded, RefreshOutcome::Owned]
    );
    assert_eq!(reg.lookup(&alice).await.unwrap(), vec![new.clone()]);

    // Another device of the same user, and device-less connections, sit side by side.
    let laptop = rec(&alice, Some("laptop"), "c-laptop", "node-a");
    let anon1 = rec(&alice, None, "c-anon1", "node-a");
    let anon2 = rec(&alice, None, "c-anon2", "node-b");
    for r in [&laptop, &anon1, &anon2] {
        reg.register(r, LONG).await.unwrap();
    }
    assert_eq!(
        conns(&reg.lookup(&alice).await.unwrap()),
        ["c-anon1", "c-anon2", "c-laptop", "c-new"]
    );
    assert!(reg.unregister(&alice, None, "c-anon1").await.unwrap());
    assert!(!reg.unregister(&alice, None, "c-anon1").await.unwrap());
    assert!(reg
        .unregister(&alice, Some("phone"), "c-new")
        .await
        .unwrap());
    assert_eq!(
        conns(&reg.lookup(&alice).await.unwrap()),
        ["c-anon2", "c-laptop"]
    );

    // lookup_many answers in the order asked, empty for unknown users.
    let bob = u("bob");
    let node_c = u("node-c");
    let b1 = rec(&bob, Some("tv"), "c-bob", &node_c);
    reg.register(&b1, LONG).await.unwrap();
    let many = reg
        .lookup_many(&[bob.clone(), u("nobody"), alice.clone()])
        .await
        .unwrap();
    assert_eq!(many.len(), 3);
    assert_eq!(many[0], vec![b1.clone()]);
    assert!(many[1].is_empty());
    assert_eq!(conns(&many[2]), ["c-anon2", "c-laptop"]);
    assert!(reg.lookup_many(&[]).await.unwrap().is_empty());
    let node_m = u("node-m");
    let batch: Vec<String> = (0..200).map(|i| u(&format!("many-{i}"))).collect();
    for (i, user) in batch.iter().enumerate().step_by(3) {
        reg.register(&rec(user, Some("d"), &format!("c{i}"), &node_m), LONG)
            .await
            .unwrap();
    }
    let found = reg.lookup_many(&batch).await.unwrap();
    for (i, records) in found.iter().enumerate() {
        assert_eq!(records.len(), usize::from(i % 3 == 0), "user {i}");
    }

    // Expiry: a record whose node stops refreshing is gone after its TTL, while a refreshed
    // one stays.
    let carol = u("carol");
    let short = rec(&carol, Some("watch"), "c-short", "node-crashed");
    let kept = rec(&carol, Some("desk"), "c-kept", "node-alive");
    reg.register(&short, Duration::from_millis(400))
        .await
        .unwrap();
    reg.register(&kept, Duration::from_millis(400))
        .await
        .unwrap();
    assert_eq!(reg.lookup(&carol).await.unwrap().len(), 2);
    assert_eq!(
        reg.refresh(std::slice::from_ref(&kept), LONG)
            .await
            .unwrap(),
        [RefreshOutcome::Owned]
    );
    let gone = testkit::poll_until(Duration::from_secs(5), || async {
        reg.lookup(&carol).await.unwrap() == vec![kept.clone()]
    })
    .await;
    assert!(
        gone,
        "expired record still listed: {:?}",
        reg.lookup(&carol).await
    );
    // An expired slot is free: its owner's refresh writes it again (a storage node that lost
    // it is healed the same way), and unregistering the expired connection removes nothing.
    assert!(!reg
        .unregister(&carol, Some("watch"), "c-short")
        .await
        .unwrap());
    assert_eq!(
        reg.refresh(std::slice::from_ref(&short), LONG)
            .await
            .unwrap(),
        [RefreshOutcome::Owned]
    );
    assert_eq!(reg.lookup(&carol).await.unwrap().len(), 2);

    // stats counts live connections per node.
    let stats = reg.stats().await.unwrap();
    assert_eq!(stats.per_node.get(&node_c), Some(&1));
    assert_eq!(stats.per_node.get(&node_m), Some(&67));
    assert!(stats.users >= 3 + 67);
    assert_eq!(stats.connections, stats.per_node.values().sum::<usize>());

    let pings = reg.ping().await;
    assert!(!pings.is_empty());
    assert!(pings.iter().all(|p| p.result.is_ok()), "{pings:?}");
}
