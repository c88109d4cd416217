//! The behavioural suite on the in-process backend.

mod common;

use push_registry::{Error, MemoryRegistry, Registry};

#[tokio::test]
async fn memory_passes_the_behaviour_suite() {
    let reg = push_registry::open("memory").await.unwrap();
    common::behaviour_suite(reg.as_ref(), "mem").await;
}

#[tokio::test]
async fn memory_history_passes_the_suite() {
    common::history::history_suite("memory", "mem").await;
}

#[tokio::test]
async fn memory_is_bounded_and_frees_expired_entries() {
    let reg = MemoryRegistry::new(3);
    for i in 0..3 {
        let r = common::rec(&format!("u{i}"), None, &format!("c{i}"), "n");
        reg.register(&r, std::time::Duration::from_millis(200))
            .await
            .unwrap();
    }
    let extra = common::rec("u9", None, "c9", "n");
    assert!(matches!(
        reg.register(&extra, common::LONG).await,
        Err(Error::Full { limit: 3 })
    ));
    // Once the short-lived entries expire, the sweep makes room again.
    let admitted = testkit::poll_until(std::time::Duration::from_secs(5), || async {
        reg.register(&extra, common::LONG).await.is_ok()
    })
    .await;
    assert!(admitted);
    assert_eq!(reg.stats().await.unwrap().connections, 1);
}
