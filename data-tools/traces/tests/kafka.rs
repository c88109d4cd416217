//! The Kafka transport against librdkafka's mock cluster (a Kafka protocol peer over TCP): the
//! collector produces the spans it takes over OTLP, two store writers in one consumer group
//! share the partitions and write the common store, and every trace is found whole, each span
//! once, through the query API.

mod support;

use std::time::Duration;

use prost::Message as _;
use rdkafka::mocking::MockCluster;
use support::{eventually_some, request, start};
use tokio::sync::watch;
use traces::kafka::{self, KafkaSettings, WriterSettings};
use traces::server::Settings;
use traces::store::SpanStore;

/// How long the store writers may take to settle their partitions (the suite's longest deadline).
const SETTLE: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_travel_through_kafka_to_store_writers_and_are_found_once() {
    let cluster = MockCluster::new(1).expect("mock cluster starts");
    cluster.create_topic("spans", 4, 1).unwrap();
    let transport = KafkaSettings {
        brokers: cluster.bootstrap_servers(),
        topic: "spans".into(),
    };
    let h = start(Settings {
        kafka: Some(transport.clone()),
        ..Settings::default()
    })
    .await;
    // The writers share the collector's store directory (as they would share a bucket).
    let store = SpanStore::open(h.dir.path().to_str().unwrap()).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let writers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(kafka::run_writer(
                WriterSettings {
                    kafka: transport.clone(),
                    group: "traces-store".into(),
                    flush_interval: Duration::from_millis(100),
                    flush_spans: 1_000,
                },
                store.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    for t in 1..=8u8 {
        for req in [
            request("push-lib", t, &[(1, 0, "send", 0, 900)]),
            request(
                "push-server",
                t,
                &[
                    (2, 1, "deliver", 100, 700),
                    (3, 2, "socket write", 300, 100),
                ],
            ),
        ] {
            let (status, _, _) = h
                .client
                .send(
                    "POST",
                    "/v1/traces",
                    &[("content-type", "application/x-protobuf")],
                    req.encode_to_vec(),
                )
                .await;
            assert_eq!(status, 200);
        }
    }
    for t in 1..=8u8 {
        let id = format!("{t:02x}").repeat(16);
        // Two writers of one consumer group settle their partitions in ~3 s on an idle
        // machine, but once took over 45 s in CI with the whole suite running: this wait gets
        // the suite's longest deadline, not testkit's default.
        let deadline = tokio::time::Instant::now() + SETTLE;
        let spans = loop {
            let (status, v) = h.client.get_json(&format!("/api/traces/{id}")).await;
            let spans = v["data"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if status == 200 && spans.len() >= 3 {
                break spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {SETTLE:?} waiting for trace {id} through Kafka"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let names: Vec<_> = spans
            .iter()
            .map(|s| s["operationName"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["send", "deliver", "socket write"], "trace {id}");
    }
    // Counted once the brokers acknowledged, which may be just after the writers stored them.
    eventually_some("24 spans counted as produced", async || {
        let (_, _, metrics) = h.client.send("GET", "/metrics", &[], vec![]).await;
        String::from_utf8(metrics)
            .ok()?
            .contains("traces_spans_produced_total 24")
            .then_some(())
    })
    .await;

    // A stop writes what each writer holds, commits, and ends cleanly.
    stop.send(true).unwrap();
    for w in writers {
        w.await.unwrap().expect("writer ends without error");
    }
    h.running.shutdown().await;
}
