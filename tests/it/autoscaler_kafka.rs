//! The Kafka scaler against librdkafka's mock cluster: consumer-group lag
//! summed over a function's partitions.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{KafkaMock, unique_name, within};
use ebb_autoscaler::scalers::kafka::{KafkaScaler, KafkaScalerError, OffsetReset, Reading};
use ebb_model::FunctionSpec;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const STEP: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(5);

fn function(topics: &[&str], group: &str) -> FunctionSpec {
    let mut f = FunctionSpec::new(unique_name("fn"), "default");
    f.topics = topics.iter().map(|t| t.to_string()).collect();
    f.consumer_group = Some(group.to_string());
    f
}

/// Produces `count` messages round-robin over `partitions` partitions.
async fn produce(kafka: &KafkaMock, topic: &str, partitions: i32, count: i32) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .expect("producer");
    for i in 0..count {
        let payload = i.to_string();
        let record = FutureRecord::<(), _>::to(topic)
            .partition(i % partitions)
            .payload(&payload);
        within(STEP, "produce", producer.send(record, STEP))
            .await
            .expect("delivered");
    }
}

/// Commits `offsets` ((topic, partition) → next offset) for `group` without
/// joining it.
fn commit(kafka: &KafkaMock, group: &str, offsets: &[(&str, i32, i64)]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for &(topic, partition, offset) in offsets {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .expect("offset");
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

fn scaler(kafka: &KafkaMock, reset: OffsetReset) -> KafkaScaler {
    KafkaScaler::new(&kafka.bootstrap_servers(), reset, TIMEOUT)
}

#[tokio::test]
async fn lag_is_high_watermark_minus_committed() {
    let kafka = KafkaMock::new();
    let topic = unique_name("orders");
    kafka.create_topic(&topic, 3);
    produce(&kafka, &topic, 3, 30).await;

    // A member of the group consumes 10 messages and commits them.
    let group = unique_name("group");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut next = BTreeMap::new();
    for _ in 0..10 {
        let m = within(Duration::from_secs(30), "consume", consumer.recv())
            .await
            .expect("message");
        next.insert(m.partition(), m.offset() + 1);
    }
    // Every partition gets a committed offset (0 where nothing was read),
    // so the lag is 20 whatever the reset policy.
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        let offset = next.get(&p).copied().unwrap_or(0);
        tpl.add_partition_offset(&topic, p, Offset::Offset(offset))
            .expect("offset");
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");

    let f = function(&[&topic], &group);
    for reset in [OffsetReset::Latest, OffsetReset::Earliest] {
        let reading = scaler(&kafka, reset).read(&f).await.expect("reading");
        assert_eq!(
            reading,
            Reading {
                lag: 20.0,
                partitions: 3,
                finished: Some(10),
            },
            "{reset:?}"
        );
    }
}

#[tokio::test]
async fn uncommitted_partitions_count_from_the_reset_position() {
    let kafka = KafkaMock::new();
    let topic = unique_name("orders");
    kafka.create_topic(&topic, 3);
    produce(&kafka, &topic, 3, 30).await;

    let fresh = function(&[&topic], &unique_name("fresh"));
    let earliest = scaler(&kafka, OffsetReset::Earliest);
    let latest = scaler(&kafka, OffsetReset::Latest);
    assert_eq!(
        earliest.read(&fresh).await.expect("earliest"),
        Reading {
            lag: 30.0,
            partitions: 3,
            finished: Some(0),
        }
    );
    assert_eq!(
        latest.read(&fresh).await.expect("latest"),
        Reading {
            lag: 0.0,
            partitions: 3,
            finished: Some(0),
        }
    );

    // Committed on partition 0 only (4 of its 10 read).
    let group = unique_name("partial");
    commit(&kafka, &group, &[(&topic, 0, 4)]);
    let partial = function(&[&topic], &group);
    assert_eq!(latest.backlog(&partial).await.expect("latest"), 6.0);
    assert_eq!(earliest.backlog(&partial).await.expect("earliest"), 26.0);
}

#[tokio::test]
async fn lag_and_partitions_sum_over_topics() {
    let kafka = KafkaMock::new();
    let (a, b) = (unique_name("a"), unique_name("b"));
    kafka.create_topic(&a, 3);
    kafka.create_topic(&b, 2);
    produce(&kafka, &a, 3, 9).await;
    produce(&kafka, &b, 2, 4).await;
    let group = unique_name("group");
    commit(&kafka, &group, &[(&a, 0, 3), (&a, 1, 1), (&b, 1, 0)]);

    let f = function(&[&a, &b], &group);
    let reading = scaler(&kafka, OffsetReset::Latest)
        .read(&f)
        .await
        .expect("reading");
    assert_eq!(
        reading,
        Reading {
            lag: 4.0,
            partitions: 5,
            finished: Some(4),
        }
    );
}

#[tokio::test]
async fn finished_is_the_sum_of_committed_offsets() {
    let kafka = KafkaMock::new();
    let topic = unique_name("orders");
    kafka.create_topic(&topic, 3);
    produce(&kafka, &topic, 3, 30).await;
    let group = unique_name("group");
    let f = function(&[&topic], &group);
    let scaler = scaler(&kafka, OffsetReset::Earliest);
    let finished = |reading: Reading| reading.finished;

    // Nothing committed: nothing finished.
    assert_eq!(finished(scaler.read(&f).await.expect("read")), Some(0));
    // First commits on partitions 0 and 1: the sum, but a partition's first
    // commit is not comparable with the read before it.
    commit(&kafka, &group, &[(&topic, 0, 4), (&topic, 1, 2)]);
    let first = scaler.read(&f).await.expect("read");
    assert_eq!((first.lag, first.finished), (24.0, None));
    assert_eq!(finished(scaler.read(&f).await.expect("read")), Some(6));
    // The function finishes 5 more: the count grows by 5.
    commit(&kafka, &group, &[(&topic, 0, 7), (&topic, 1, 4)]);
    let more = scaler.read(&f).await.expect("read");
    assert_eq!((more.lag, more.finished), (19.0, Some(11)));
    // A fresh scaler has nothing to compare with: the sum.
    let fresh = self::scaler(&kafka, OffsetReset::Earliest);
    assert_eq!(finished(fresh.read(&f).await.expect("read")), Some(11));
    // A commit moved back: unknown, then the (lower) sum again.
    commit(&kafka, &group, &[(&topic, 0, 1)]);
    assert_eq!(finished(scaler.read(&f).await.expect("read")), None);
    assert_eq!(finished(scaler.read(&f).await.expect("read")), Some(5));
}

#[tokio::test]
async fn a_missing_topic_is_an_error_not_zero() {
    let kafka = KafkaMock::new();
    let present = unique_name("present");
    kafka.create_topic(&present, 1);
    let missing = unique_name("missing");
    let f = function(&[&present, &missing], &unique_name("group"));

    for reset in [OffsetReset::Latest, OffsetReset::Earliest] {
        let err = scaler(&kafka, reset)
            .read(&f)
            .await
            .expect_err("missing topic");
        assert!(
            matches!(&err, KafkaScalerError::NoTopic { topic } if *topic == missing),
            "{err:?}"
        );
        assert_eq!(err.metric_label(), "missing_topic");
        assert!(err.to_string().contains(&missing), "{err}");
    }
}

#[tokio::test]
async fn a_function_without_topics_is_an_error() {
    let kafka = KafkaMock::new();
    let f = function(&[], "group");
    let err = scaler(&kafka, OffsetReset::Latest)
        .read(&f)
        .await
        .expect_err("no topics");
    assert_eq!(err.metric_label(), "no_topics");
}

#[tokio::test]
async fn a_coordinator_error_is_an_error_not_zero() {
    let kafka = KafkaMock::new();
    let topic = unique_name("orders");
    kafka.create_topic(&topic, 3);
    produce(&kafka, &topic, 3, 30).await;
    let f = function(&[&topic], &unique_name("group"));
    kafka.cluster().request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    let err = scaler(&kafka, OffsetReset::Earliest)
        .read(&f)
        .await
        .expect_err("coordinator error");
    assert_eq!(err.metric_label(), "coordinator", "{err:?}");
}

#[tokio::test]
async fn an_unreachable_cluster_is_an_error() {
    // Nothing listens on port 1 of 127.0.0.1.
    let scaler = KafkaScaler::new("127.0.0.1:1", OffsetReset::Latest, Duration::from_secs(1));
    let f = function(&["orders"], "group");
    let err = within(STEP, "read", scaler.read(&f))
        .await
        .expect_err("unreachable");
    assert!(
        ["unreachable", "timeout"].contains(&err.metric_label()),
        "{err:?}"
    );
}
