//! Test support: librdkafka's mock cluster (or a real broker when `KAFKA_BROKERS` is set),
//! temporary roots, a gateway with a fixed clock, a tiny HTTP client and polling.

#![allow(dead_code)] // each test uses a different part

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use gabo::gateway::{Gateway, GatewaySettings};
use gabo::hour::Hour;
use gabo::staging::Staging;
use gabo::store::Store;
use gabo::types::EventType;
use http_body_util::{BodyExt, Full};
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaErrorCode;

/// Upper bound for one wait: generous for a loaded CI machine; a hang still ends the test.
pub const WAIT: Duration = Duration::from_secs(60);

/// The hour the tests' fixed clock stamps: in the past, so the writer's "caught up now"
/// watermark is past its end plus grace as soon as every partition is read.
pub const HOUR: &str = "2026-11-29T14";

pub fn hour() -> Hour {
    HOUR.parse().unwrap()
}

pub fn fixed_clock() -> gabo::gateway::Clock {
    let t: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-29T14:10:00Z")
        .unwrap()
        .with_timezone(&Utc);
    Arc::new(move || t)
}

pub use testkit::{eventually, eventually_some};

/// Runs the dedup of `HOUR` until the completeness rule lets it close the hour; panics on any
/// other error.
pub async fn close_when_complete(
    type_name: &str,
    dirs: &Dirs,
    opts: &gabo::dedup::DedupOptions,
) -> gabo::dedup::Closed {
    eventually_some("the hour to be complete", || async {
        match gabo::dedup::dedup(type_name, hour(), &dirs.staging, &dirs.store, opts).await {
            Ok(c) => Some(c),
            Err(gabo::dedup::DedupError::Incomplete { .. }) => None,
            Err(e) => panic!("dedup: {e}"),
        }
    })
    .await
}

/// A Kafka peer: the mock cluster, or the broker in `KAFKA_BROKERS`. Not `Send`.
pub struct Kafka {
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    brokers: String,
}

impl Kafka {
    pub fn start() -> Self {
        if let Ok(b) = std::env::var("KAFKA_BROKERS") {
            return Self {
                mock: None,
                brokers: b,
            };
        }
        let mock = MockCluster::new(1).expect("mock cluster starts");
        let brokers = mock.bootstrap_servers();
        Self {
            mock: Some(mock),
            brokers,
        }
    }

    pub fn brokers(&self) -> String {
        self.brokers.clone()
    }

    pub fn is_mock(&self) -> bool {
        self.mock.is_some()
    }

    /// Creates `topic` unless it exists (the mock has no CreateTopics; a real broker goes
    /// through `apply`), so that provisioning twice finds it as a broker would.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        if let Some(m) = &self.mock {
            match m.create_topic(topic, partitions, 1) {
                Ok(()) => {}
                Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err(e) => panic!("mock topic {topic}: {e}"),
            }
        }
    }

    pub fn broker_down(&self) {
        self.mock
            .as_ref()
            .expect("mock only")
            .broker_down(1)
            .unwrap();
    }

    pub fn broker_up(&self) {
        self.mock.as_ref().expect("mock only").broker_up(1).unwrap();
    }
}

/// Fast-reacting librdkafka settings for tests.
pub fn kafka_settings() -> Vec<(String, String)> {
    vec![
        ("fetch.wait.max.ms".into(), "50".into()),
        ("heartbeat.interval.ms".into(), "300".into()),
        ("session.timeout.ms".into(), "6000".into()),
    ]
}

pub const TYPES: &str = r#"
types:
  - name: clicks
    owner: growth
    retention: 7d
    partitions: 2
    schema:
      type: object
      required: [user]
      properties:
        user: { type: string }
"#;

pub fn clicks() -> EventType {
    gabo::types::parse("types.yaml", TYPES).unwrap().remove(0)
}

/// Temporary output root and staging directory.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
    pub store: Store,
    pub staging: Staging,
}

impl Dirs {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("out").to_str().unwrap()).unwrap();
        let staging = Staging::open(tmp.path().join("staging")).unwrap();
        Self {
            tmp,
            store,
            staging,
        }
    }

    pub fn root(&self) -> String {
        self.tmp.path().join("out").display().to_string()
    }

    pub fn staging_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("staging")
    }

    /// Distinct events (source positions) staged for `HOUR` so far; a redelivered copy
    /// counts once.
    pub fn staged_lines(&self, type_name: &str) -> usize {
        let dir = self.staging.hour_dir(type_name, hour());
        let mut srcs = std::collections::HashSet::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "ndjson") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                // A line being appended right now may be cut: it is counted on the next poll.
                for l in text.lines() {
                    if let Ok(l) = serde_json::from_str::<gabo::envelope::StagedLine>(l) {
                        srcs.insert(l.src);
                    }
                }
            }
        }
        srcs.len()
    }
}

pub async fn gateway(
    kafka: &Kafka,
    types: &[EventType],
    store: Store,
    produce_timeout: Duration,
) -> Gateway {
    let mut s = GatewaySettings::new(&kafka.brokers());
    s.kafka = kafka_settings();
    s.clock = fixed_clock();
    s.produce_timeout = produce_timeout;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Gateway::start(l, types, store, s).unwrap()
}

/// POSTs `body` to `http://{addr}{path}`; returns the status and the JSON answer.
pub async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// IDs in the Parquet part of `HOUR`'s bucket, sorted.
pub async fn bucket_ids(root: &str, type_name: &str) -> Vec<String> {
    parquet_ids(&format!(
        "{root}/{}/{}",
        hour().bucket_path(type_name),
        gabo::hour::PART0
    ))
    .await
}

/// IDs in the Parquet file `path`, sorted.
pub async fn parquet_ids(path: &str) -> Vec<String> {
    use datafusion::arrow::array::{Array, StringArray};
    use datafusion::arrow::datatypes::DataType;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    let ctx = SessionContext::new();
    let df = ctx
        .read_parquet(path, ParquetReadOptions::default())
        .await
        .unwrap();
    let batches = df.select_columns(&["id"]).unwrap().collect().await.unwrap();
    let mut ids = Vec::new();
    for b in batches {
        // Read back as Utf8View or Utf8 depending on DataFusion's settings: normalise.
        let c = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let a = c.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..a.len() {
            ids.push(a.value(i).to_string());
        }
    }
    ids.sort();
    ids
}

/// What `gabo apply` does, for tests: the mock cluster cannot create topics (no CreateTopics
/// in librdkafka's mock), so there the topic is made directly and apply then finds it.
/// Returns the plan that was applied.
pub async fn provision(kafka: &Kafka, types: &[EventType], store: &Store) -> Vec<String> {
    for t in types {
        kafka.create_topic(&t.topic(), t.partitions);
    }
    let admin = gabo::provision::Admin::connect(&kafka.brokers(), &[]).unwrap();
    let topics = admin.topics(types, true).await.unwrap();
    let applied = gabo::provision::applied(store)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name.clone(), t.raw()))
        .collect();
    let plan = gabo::provision::plan(types, &topics, &applied);
    admin.apply(&plan, store).await.unwrap();
    plan.iter().map(|c| c.to_string()).collect()
}

pub fn writer(kafka: &Kafka, ty: EventType, dirs: &Dirs) -> gabo::writer::Writer {
    let mut s = gabo::writer::WriterSettings::new(&kafka.brokers());
    s.kafka = kafka_settings();
    gabo::writer::Writer::start(ty, dirs.staging.clone(), dirs.store.clone(), s).unwrap()
}

pub fn dedup_options(dirs: &Dirs) -> gabo::dedup::DedupOptions {
    let mut o = gabo::dedup::DedupOptions::new(dirs.staging_dir().join("_spill"));
    // Small, so that the tests exercise the same limited pool as production.
    o.memory_limit = 64 << 20;
    o
}
