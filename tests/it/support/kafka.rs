//! librdkafka's in-process mock Kafka cluster.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Brokers in every mock cluster.
pub const BROKERS: i32 = 3;

/// A mock Kafka cluster of [`BROKERS`] brokers listening on 127.0.0.1,
/// served by threads of this test process (so a spawned `ebb` can reach it
/// too, as long as this value lives). The Admin API (CreateTopics) is not
/// supported by the mock: create topics with [`create_topic`](Self::create_topic).
pub struct KafkaMock {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl KafkaMock {
    pub fn new() -> Self {
        let cluster = MockCluster::new(BROKERS)
            .unwrap_or_else(|err| panic!("cannot start the librdkafka mock cluster: {err}"));
        Self { cluster }
    }

    /// `host:port,host:port,…` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions, replicated to every broker.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.cluster
            .create_topic(topic, partitions, BROKERS)
            .unwrap_or_else(|err| panic!("cannot create mock topic {topic}: {err}"));
    }

    /// The underlying mock, for failure injection (`broker_down`, `request_errors`…).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}

impl Default for KafkaMock {
    fn default() -> Self {
        Self::new()
    }
}
