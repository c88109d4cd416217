//! Push outcomes (`--outcomes-topic`): one record per finished message, for GABO's
//! `outcomes` type, on librdkafka's mock cluster; and a dead outcomes broker that delivery
//! never waits for.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use msg_processor::Stats;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::ClientConfig;

const TEST_DEADLINE: Duration = Duration::from_secs(150);

async fn send_raw(brokers: &str, records: &[Vec<u8>]) {
    let records: Vec<Option<Vec<u8>>> = records.iter().cloned().map(Some).collect();
    produce_raw(brokers, &records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_finished_message_has_one_outcome_on_the_outcomes_topic() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let kafka = MockKafka::start();
        kafka.create_topic("push", 1);
        kafka.create_topic("push-dlq", 1);
        kafka.create_topic("push-outcomes", 1);
        let redis = testkit::RedisServer::start();
        let a = node("node-a", &redis.url(), None).await;
        let client = Client::connect(&a, "u", Inbox::default()).await;
        wait_registered(&redis.url(), &[("u".into(), "node-a".into())]).await;
        let mut s = settings(&kafka.brokers(), "push", &redis.url());
        s.outcomes_topic = Some("push-outcomes".into());
        let p = processor(s).await;

        let delivered = push_lib::Envelope::new("u", serde_json::json!({ "seq": 0 }));
        // Nobody is connected for this user: kept in their history.
        let stored = push_lib::Envelope::new("nobody", serde_json::json!({ "seq": 1 }));
        let mut expired = push_lib::Envelope::new("u", serde_json::json!({ "seq": 2 }))
            .ttl(Duration::from_secs(1));
        expired.created_at = 1;
        let records = vec![
            delivered.encode().unwrap(),
            b"not json at all".to_vec(),
            stored.encode().unwrap(),
            expired.encode().unwrap(),
            // Decodes as JSON but not as an envelope: its names come from its bytes.
            br#"{"v":9,"id":"m-v9","user":"u","data":1}"#.to_vec(),
        ];
        send_raw(&kafka.brokers(), &records).await;

        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka.brokers())
            .set("group.id", "outcomes-reader")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        reader.subscribe(&["push-outcomes"]).unwrap();
        let mut got = BTreeMap::new();
        while got.len() < records.len() {
            let m = tokio::time::timeout(WAIT, reader.recv())
                .await
                .expect("outcome in time")
                .expect("outcome");
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            assert_eq!(s("id"), format!("{}:{}", s("mid"), s("outcome")), "{v}");
            assert!(v["at_ms"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(
                m.key().unwrap_or_default(),
                s("user").as_bytes(),
                "keyed by user"
            );
            let prev = got.insert(s("mid"), (s("user"), s("outcome")));
            assert!(prev.is_none(), "one outcome per message: {v}");
        }
        let want: BTreeMap<String, (String, String)> = [
            (delivered.id.to_string(), ("u", "delivered")),
            ("push/0/1".into(), ("", "dead_lettered")),
            (stored.id.to_string(), ("nobody", "stored")),
            (expired.id.to_string(), ("u", "expired")),
            ("m-v9".into(), ("u", "dead_lettered")),
        ]
        .into_iter()
        .map(|(k, (u, o))| (k, (u.to_owned(), o.to_owned())))
        .collect();
        assert_eq!(got, want);
        assert_eq!(first_seen(&client.inbox), [0]);
        assert_eq!(Stats::get(&p.stats().outcomes_queued), 5);
        assert_eq!(Stats::get(&p.stats().outcomes_dropped), 0);
        p.shutdown().await;
    })
    .await
    .expect("test finished within its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_outcomes_broker_drops_outcomes_and_delivery_goes_on() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let kafka = MockKafka::start();
        kafka.create_topic("push", 1);
        kafka.create_topic("push-dlq", 1);
        let redis = testkit::RedisServer::start();
        let a = node("node-a", &redis.url(), None).await;
        let client = Client::connect(&a, "u", Inbox::default()).await;
        wait_registered(&redis.url(), &[("u".into(), "node-a".into())]).await;
        let mut s = settings(&kafka.brokers(), "push", &redis.url());
        s.outcomes_topic = Some("push-outcomes".into());
        // Nothing listens on port 1; room for 3 outcomes.
        s.outcomes_brokers = Some("127.0.0.1:1".into());
        s.outcomes_queue = 3;
        let p = processor(s).await;

        let envs: Vec<Vec<u8>> = (0..20)
            .map(|n| {
                push_lib::Envelope::new("u", serde_json::json!({ "seq": n }))
                    .encode()
                    .unwrap()
            })
            .collect();
        send_raw(&kafka.brokers(), &envs).await;
        let stats = p.stats().clone();
        eventually(
            "20 messages delivered and their outcomes queued or dropped",
            || {
                let st = &stats;
                std::future::ready(
                    Stats::get(&st.delivered) == 20
                        && Stats::get(&st.outcomes_queued) + Stats::get(&st.outcomes_dropped) == 20,
                )
            },
        )
        .await;
        assert_eq!(first_seen(&client.inbox), (0..20).collect::<Vec<u64>>());
        assert_eq!(Stats::get(&stats.outcomes_queued), 3, "the queue's bound");
        assert_eq!(Stats::get(&stats.outcomes_dropped), 17);
        p.shutdown().await;
    })
    .await
    .expect("test finished within its deadline");
}
