//! librdkafka's in-process mock cluster (`rdkafka::mocking`): a real Kafka protocol peer on a
//! local TCP port, for tests of producers and consumers without a broker. Feature `kafka`.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// One mock cluster of one broker, stopped on drop.
///
/// Not `Send` (librdkafka's handle): keep it in the test's own future, not in a spawned task.
pub struct MockKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("brokers", &self.brokers())
            .finish()
    }
}

impl MockKafka {
    /// Starts a cluster; panics if librdkafka cannot.
    pub fn start() -> Self {
        Self::try_start().expect("librdkafka's mock cluster starts")
    }

    /// Starts a cluster, or says why not.
    pub fn try_start() -> Result<Self, KafkaError> {
        Ok(Self {
            cluster: MockCluster::new(1)?,
        })
    }

    /// The bootstrap servers (`bootstrap.servers`) of the cluster.
    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` (replication factor 1); panics on failure.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.try_create_topic(topic, partitions)
            .unwrap_or_else(|e| panic!("mock topic {topic}: {e}"));
    }

    /// Creates `topic` with `partitions` (replication factor 1), or says why not.
    pub fn try_create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster.create_topic(topic, partitions, 1)
    }
}
