//! End-to-end tests of `ebb connector kafka` and `ebb publish --kafka`
//! against librdkafka's mock cluster (a real Kafka-protocol server in this
//! process), with functions played by [`Sink`]s.
//!
//! The connector runs with `--offset-reset earliest`, so a message produced
//! before its consumer group has joined is still read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::connector::{Func, func, stack_yaml, wait_ready, write_stack};
use crate::support::sink::{FakeAutoscaler, Reply, Sink};
use crate::support::{ChildGuard, KafkaMock, ebb_command, free_port, unique_name, within};
use nix::sys::signal::Signal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tempfile::TempDir;
use tokio::time::Instant;

const STEP: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(30);
/// Group joins on the mock take a few seconds.
const DELIVERY: Duration = Duration::from_secs(30);

struct Env {
    kafka: KafkaMock,
    dir: TempDir,
    producer: FutureProducer,
}

impl Env {
    fn start() -> Self {
        let kafka = KafkaMock::new();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .create()
            .expect("producer");
        let dir = tempfile::Builder::new()
            .prefix("ebb-test-kafka-")
            .tempdir()
            .expect("temp dir");
        Self {
            kafka,
            dir,
            producer,
        }
    }

    fn stack_path(&self) -> PathBuf {
        self.dir.path().join("stack.yaml")
    }

    fn write_stack(&self, funcs: &[Func]) {
        write_stack(&self.stack_path(), &stack_yaml(funcs));
    }

    async fn connector(&self, extra: &[&str]) -> Connector {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.args(["connector", "kafka", "--functions"])
            .arg(self.stack_path())
            .args(["--url", &self.kafka.bootstrap_servers()])
            .args(["--admin-addr", &admin]);
        if !extra.contains(&"--offset-reset") {
            cmd.args(["--offset-reset", "earliest"]);
        }
        cmd.args(["--retry-base-delay", "50ms", "--retry-max-delay", "200ms"])
            .args(["--drain-timeout", "10s"])
            .args(extra);
        let mut c = Connector {
            child: ChildGuard::spawn("connector", &mut cmd),
            admin,
        };
        c.wait_ready().await;
        c
    }

    async fn produce(&self, topic: &str, partition: i32, key: &str, body: &str) -> i64 {
        let headers = OwnedHeaders::new().insert(Header {
            key: "x-order",
            value: Some(body),
        });
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(body)
            .headers(headers);
        within(STEP, "produce", self.producer.send(record, STEP))
            .await
            .expect("delivered")
            .offset
    }

    /// The committed offsets of `group` on `topic`'s `partitions`.
    fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = consumer.committed_offsets(tpl, STEP).expect("committed");
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            })
            .collect()
    }

    async fn wait_committed(&self, group: &str, topic: &str, want: &[Option<i64>]) {
        let deadline = Instant::now() + DELIVERY;
        loop {
            let now = self.committed(group, topic, want.len() as i32);
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {group} committed {now:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The next message on `topic` (read from the start by a fresh group).
    async fn read_one(&self, topic: &str) -> rdkafka::message::OwnedMessage {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .set("group.id", unique_name("reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let deadline = Instant::now() + DELIVERY;
        loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                return m.detach();
            }
            assert!(Instant::now() < deadline, "nothing on {topic}");
            tokio::task::yield_now().await;
        }
    }
}

struct Connector {
    child: ChildGuard,
    admin: String,
}

impl Connector {
    async fn wait_ready(&mut self) {
        wait_ready(&mut self.child, &self.admin, READY).await;
    }
}

fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test]
async fn delivers_each_message_once_per_function_in_partition_order_and_commits() {
    const PER_PARTITION: i64 = 20;
    let env = Env::start();
    env.kafka.create_topic("orders", 3);
    // A slow function keeps several messages of a partition waiting: they
    // must still arrive in order, one at a time per partition.
    let a = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_millis(20)))
        .start()
        .await;
    let b = Sink::start().await;
    env.write_stack(&[
        func("a", &a.url(), &["orders"]),
        func("b", &b.url(), &["orders"]).set("kafka-ordering", "none"),
    ]);
    let _connector = env.connector(&[]).await;
    for i in 0..PER_PARTITION {
        for p in 0..3 {
            env.produce("orders", p, &format!("k{p}"), &format!("{p}:{i}"))
                .await;
        }
    }
    let total = (3 * PER_PARTITION) as usize;
    a.wait_for_calls(total, DELIVERY).await;
    b.wait_for_calls(total, DELIVERY).await;
    let want = vec![Some(PER_PARTITION); 3];
    env.wait_committed("ebb-default-a", "orders", &want).await;
    env.wait_committed("ebb-default-b", "orders", &want).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    for (name, sink) in [("a", &a), ("b", &b)] {
        let calls = sink.calls();
        assert_eq!(calls.len(), total, "{name}: each message once");
        let mut next: HashMap<String, i64> = HashMap::new();
        for call in &calls {
            let body = call.text();
            let (p, i) = body.split_once(':').expect("p:i");
            assert_eq!(
                call.header("ce-id").map(str::to_owned),
                Some(format!("orders/{p}/{i}")),
                "ce-id is topic/partition/offset"
            );
            assert_eq!(call.header("ce-source"), Some("/ebb/kafka/orders"));
            assert_eq!(call.header("ce-type"), Some("io.ebb.kafka.message"));
            assert_eq!(call.header("ce-subject"), Some("orders"));
            assert_eq!(call.header("x-topic"), Some("orders"));
            assert_eq!(call.header("x-order"), Some(body.as_str()));
            assert_eq!(
                call.header("ce-partitionkey").map(str::to_owned),
                Some(format!("k{p}"))
            );
            if name == "a" {
                let n = next.entry(p.to_owned()).or_default();
                assert_eq!(i.parse::<i64>().ok(), Some(*n), "partition {p} in order");
                *n += 1;
            }
        }
    }
    // Ordered per partition: never two calls of one partition at once, so
    // at most 3 at a time.
    assert!(a.max_concurrent() <= 3, "{}", a.max_concurrent());
}

#[tokio::test]
async fn retries_then_commits_and_a_400_is_dead_lettered_first() {
    let env = Env::start();
    env.kafka.create_topic("jobs", 1);
    env.kafka.create_topic("jobs.dead", 1);
    let f = Sink::builder()
        .replies([
            Reply::status(500),
            Reply::status(500),
            Reply::ok(),
            Reply::status(400).body("bad job"),
        ])
        .otherwise(Reply::ok())
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"])
        .set("max-attempts", "5")
        .set("dead-letter", "jobs.dead")]);
    let _connector = env.connector(&[]).await;
    env.produce("jobs", 0, "k", "first").await;
    f.wait_for_calls(3, DELIVERY).await;
    env.wait_committed("ebb-default-f", "jobs", &[Some(1)])
        .await;
    let attempts: Vec<u32> = f.calls().iter().map(|c| c.attempt()).collect();
    assert_eq!(attempts, [1, 2, 3]);

    env.produce("jobs", 0, "k", "second").await;
    let dead = env.read_one("jobs.dead").await;
    assert_eq!(dead.payload(), Some(&b"second"[..]));
    assert_eq!(
        header(&dead, "ebb-dead-letter-reason").as_deref(),
        Some("status 400")
    );
    assert_eq!(header(&dead, "ebb-original-topic").as_deref(), Some("jobs"));
    assert_eq!(
        header(&dead, "ebb-source-position").as_deref(),
        Some("topic jobs partition 0 offset 1")
    );
    assert_eq!(header(&dead, "x-order").as_deref(), Some("second"));
    env.wait_committed("ebb-default-f", "jobs", &[Some(2)])
        .await;
    assert_eq!(f.count(), 4, "a 400 is not retried");
}

#[tokio::test]
async fn a_killed_connector_loses_nothing() {
    let env = Env::start();
    env.kafka.create_topic("work", 1);
    let f = Sink::builder().otherwise(Reply::status(500)).start().await;
    env.write_stack(&[func("f", &f.url(), &["work"]).set("max-attempts", "1000")]);
    let mut first = env.connector(&[]).await;
    env.produce("work", 0, "k", "w").await;
    f.wait_for_calls(2, DELIVERY).await;
    first.child.signal(Signal::SIGKILL);
    first.child.wait(STEP).await;
    drop(first);
    assert_eq!(
        env.committed("ebb-default-f", "work", 1),
        [Some(0)],
        "only where reading started"
    );

    f.set_otherwise(Reply::ok());
    let seen = f.count();
    let _second = env.connector(&[]).await;
    f.wait_for_calls(seen + 1, DELIVERY).await;
    env.wait_committed("ebb-default-f", "work", &[Some(1)])
        .await;
    assert!(
        f.calls()
            .iter()
            .all(|c| c.header("ce-id") == Some("work/0/0"))
    );
}

#[tokio::test]
async fn sigterm_leaves_a_held_event_uncommitted_and_it_comes_back() {
    let env = Env::start();
    env.kafka.create_topic("jobs", 1);
    let autoscaler = FakeAutoscaler::start().await;
    let port = free_port();
    env.write_stack(&[func(
        "sleepy",
        &format!("http://127.0.0.1:{port}"),
        &["jobs"],
    )]);
    // `latest`, the default: a new group starts with new messages, so the
    // test produces until one is read (the function at zero is woken).
    let latest = ["--offset-reset", "latest"];
    let mut connector = env
        .connector(&["--autoscaler-url", &autoscaler.url(), latest[0], latest[1]])
        .await;
    let deadline = Instant::now() + DELIVERY;
    while autoscaler.wakes().is_empty() {
        assert!(Instant::now() < deadline, "nothing read");
        env.produce("jobs", 0, "k", "held").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let end = env.produce("jobs", 0, "k", "held").await + 1;
    connector.child.signal(Signal::SIGTERM);
    let status = connector.child.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", connector.child.output());
    // Only where the reading started is committed: the held message was
    // not finished.
    let start = env.committed("ebb-default-sleepy", "jobs", 1)[0].expect("start committed");
    assert!(start < end - 1, "start {start}, end {end}");
    drop(connector);

    // A new connector (still `latest`) resumes there: the held message and
    // the ones after it are delivered, none skipped.
    let f = Sink::builder().port(port).start().await;
    let _again = env.connector(&latest).await;
    env.wait_committed("ebb-default-sleepy", "jobs", &[Some(end)])
        .await;
    let ids: Vec<String> = f
        .calls()
        .iter()
        .filter_map(|c| c.header("ce-id").map(str::to_owned))
        .collect();
    let want: Vec<String> = (start..end).map(|o| format!("jobs/0/{o}")).collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_is_tried_again_before_the_commit() {
    let env = Env::start();
    env.kafka.create_topic("jobs", 1);
    env.kafka.create_topic("jobs.dead", 1);
    let f = Sink::builder().otherwise(Reply::status(400)).start().await;
    env.write_stack(&[func("f", &f.url(), &["jobs"]).set("dead-letter", "jobs.dead")]);
    let mut connector = env.connector(&[]).await;
    env.produce("jobs", 0, "k", "bad").await;
    // The brokers refuse the next produce requests: the dead letter is not
    // stored, so the message is not committed, and it is tried again.
    env.kafka.cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
    );
    f.wait_for_calls(1, DELIVERY).await;
    connector
        .child
        .wait_for_output("cannot publish the dead letter; trying again", DELIVERY)
        .await;
    assert_eq!(env.committed("ebb-default-f", "jobs", 1), [Some(0)]);
    let dead = env.read_one("jobs.dead").await;
    assert_eq!(dead.payload(), Some(&b"bad"[..]));
    env.wait_committed("ebb-default-f", "jobs", &[Some(1)])
        .await;
    assert_eq!(
        f.count(),
        1,
        "the call is not repeated, only the dead letter"
    );
}

#[tokio::test]
async fn ebb_publish_kafka_and_bad_topics() {
    let env = Env::start();
    env.kafka.create_topic("orders", 2);
    let f = Sink::start().await;
    env.write_stack(&[
        func("f", &f.url(), &["orders"]),
        func("wild", &f.url(), &["orders.*"]),
    ]);
    let mut connector = env.connector(&[]).await;
    connector
        .child
        .wait_for_output("no wildcards", DELIVERY)
        .await;
    let brokers = env.kafka.bootstrap_servers();
    let out = within(
        Duration::from_secs(20),
        "ebb publish",
        ebb_command()
            .args(["publish", "--kafka", &brokers, "--key", "cust-7"])
            .args(["-H", "x-order:7", "orders", "hello"])
            .output(),
    )
    .await
    .expect("run ebb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_for_calls(1, DELIVERY).await;
    let call = &f.calls()[0];
    assert_eq!(call.text(), "hello");
    assert_eq!(call.header("x-order"), Some("7"));
    assert_eq!(call.header("ce-partitionkey"), Some("cust-7"));

    let out = within(
        Duration::from_secs(20),
        "ebb publish",
        ebb_command()
            .args(["publish", "--kafka", &brokers, "orders.*", "x"])
            .output(),
    )
    .await
    .expect("run ebb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("orders.*") && err.contains("no wildcards"),
        "{err}"
    );
}

#[tokio::test]
async fn a_removed_function_stops_reading_and_the_others_go_on() {
    let env = Env::start();
    env.kafka.create_topic("jobs", 1);
    let (f, g) = (Sink::start().await, Sink::start().await);
    env.write_stack(&[
        func("f", &f.url(), &["jobs"]),
        func("g", &g.url(), &["jobs"]),
    ]);
    let mut connector = env.connector(&["--reload-interval", "100ms"]).await;
    env.produce("jobs", 0, "k", "one").await;
    f.wait_for_calls(1, DELIVERY).await;
    g.wait_for_calls(1, DELIVERY).await;
    env.wait_committed("ebb-default-g", "jobs", &[Some(1)])
        .await;

    env.write_stack(&[func("f", &f.url(), &["jobs"])]);
    connector
        .child
        .wait_for_output("stopping consumer", DELIVERY)
        .await;
    env.produce("jobs", 0, "k", "two").await;
    f.wait_for_calls(2, DELIVERY).await;
    env.wait_committed("ebb-default-f", "jobs", &[Some(2)])
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.count(), 1, "a removed function gets nothing more");
    assert_eq!(env.committed("ebb-default-g", "jobs", 1), [Some(1)]);
}
