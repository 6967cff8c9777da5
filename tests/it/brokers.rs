//! Proof that `support` gives each test a working broker: one message
//! through NATS JetStream, RabbitMQ and (mock) Kafka, plus a NATS restart.

use crate::support::{ChildGuard, KafkaMock, NatsServer, RabbitMq, unique_name, within};
use futures::StreamExt;
use std::time::Duration;

const STEP: Duration = Duration::from_secs(10);

async fn jetstream_with_stream(
    url: &str,
    stream: &str,
    subject: &str,
) -> async_nats::jetstream::Context {
    let client = within(STEP, "NATS connect", async_nats::connect(url))
        .await
        .expect("connect to nats-server");
    let js = async_nats::jetstream::new(client);
    within(
        STEP,
        "create stream",
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![subject.to_owned()],
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    js
}

async fn fetch_one_and_ack(js: &async_nats::jetstream::Context, stream: &str) -> bytes::Bytes {
    let stream = within(STEP, "get stream", js.get_stream(stream))
        .await
        .expect("get stream");
    let consumer: async_nats::jetstream::consumer::PullConsumer = within(
        STEP,
        "create consumer",
        stream.get_or_create_consumer(
            "proof",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("proof".to_owned()),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("create consumer");
    let mut batch = within(
        STEP,
        "fetch",
        consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages(),
    )
    .await
    .expect("fetch");
    let message = within(STEP, "fetched message", batch.next())
        .await
        .expect("one message fetched")
        .expect("message without error");
    within(STEP, "double ack", message.double_ack())
        .await
        .expect("ack");
    message.payload.clone()
}

#[tokio::test]
async fn nats_jetstream_publish_fetch_ack() {
    let nats = NatsServer::start().await;
    let stream = unique_name("proof");
    let subject = format!("{stream}.events");
    let js = jetstream_with_stream(nats.url(), &stream, &subject).await;

    let ack = within(STEP, "publish", js.publish(subject.clone(), "hello".into()))
        .await
        .expect("publish");
    within(STEP, "publish ack", ack)
        .await
        .expect("stream stored the message");

    assert_eq!(fetch_one_and_ack(&js, &stream).await, "hello");
}

#[tokio::test]
async fn nats_restart_keeps_jetstream_messages() {
    let mut nats = NatsServer::start_local().await;
    let url = nats.url().to_owned();
    let stream = unique_name("restart");
    let subject = format!("{stream}.events");
    let js = jetstream_with_stream(&url, &stream, &subject).await;
    let ack = within(
        STEP,
        "publish",
        js.publish(subject.clone(), "before".into()),
    )
    .await
    .expect("publish");
    within(STEP, "publish ack", ack)
        .await
        .expect("stream stored the message");
    assert!(
        nats.store_dir().join("jetstream").is_dir(),
        "store dir is used"
    );

    nats.restart().await;
    assert_eq!(nats.url(), url, "same URL after restart");

    // The old client reconnects by itself; a new one proves the server side.
    let client = within(STEP, "NATS reconnect", async_nats::connect(&url))
        .await
        .expect("connect after restart");
    let js = async_nats::jetstream::new(client);
    assert_eq!(fetch_one_and_ack(&js, &stream).await, "before");
}

#[tokio::test]
async fn rabbitmq_publish_confirm_consume_ack() {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let rabbit = RabbitMq::shared().await;
    let vhost = rabbit.vhost().await;
    let connection = within(
        STEP,
        "AMQP connect",
        Connection::connect(vhost.url(), ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|err| panic!("connect to {}: {err}\n{}", vhost.url(), rabbit.logs()));
    let channel = within(STEP, "channel", connection.create_channel())
        .await
        .expect("channel");
    let queue = "proof";
    within(
        STEP,
        "queue declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue declare");
    within(
        STEP,
        "confirm select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm select");

    let confirm = within(
        STEP,
        "publish",
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default().with_delivery_mode(2),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within(STEP, "publisher confirm", confirm)
        .await
        .expect("confirm");
    assert!(confirmation.is_ack(), "broker confirmed the publish");

    let mut consumer = within(
        STEP,
        "basic consume",
        channel.basic_consume(
            queue.into(),
            "proof".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    let delivery = within(STEP, "delivery", consumer.next())
        .await
        .expect("consumer open")
        .expect("delivery without error");
    assert_eq!(delivery.data, b"hello");
    within(STEP, "ack", delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");

    // The management API sees the queue in this vhost, and it drains to 0
    // (a new queue's first counters take ~5 s to show up there).
    within(
        Duration::from_secs(20),
        "queue drained per management API",
        async {
            while vhost.queue_messages(queue).await != Some(0) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    connection.close(200, "done".into()).await.expect("close");
}

#[tokio::test]
async fn rabbitmq_vhosts_are_isolated() {
    let rabbit = RabbitMq::shared().await;
    let (a, b) = (rabbit.vhost().await, rabbit.vhost().await);
    assert_ne!(a.name(), b.name());
    assert!(a.url().ends_with(a.name()));
    assert_eq!(b.queue_info("missing").await, None);
}

#[tokio::test]
async fn kafka_mock_produce_consume() {
    use rdkafka::ClientConfig;
    use rdkafka::Message;
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let kafka = KafkaMock::new();
    let topic = unique_name("proof");
    kafka.create_topic(&topic, 3);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .expect("producer");
    within(
        STEP,
        "produce",
        producer.send(FutureRecord::to(&topic).key("k").payload("hello"), STEP),
    )
    .await
    .expect("delivered");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", unique_name("group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let message = within(Duration::from_secs(30), "consume", consumer.recv())
        .await
        .expect("message");
    assert_eq!(message.payload(), Some(&b"hello"[..]));
    assert_eq!(message.key(), Some(&b"k"[..]));
    consumer
        .commit_message(&message, CommitMode::Sync)
        .expect("commit");
}

#[tokio::test]
async fn child_guard_kills_on_drop() {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "echo started; exec sleep 60"]);
    let mut child = ChildGuard::spawn("sleeper", &mut cmd);
    child.wait_for_output("started", STEP).await;
    let pid = child.pid();
    drop(child);
    within(STEP, "killed child to disappear", async {
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z"))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        crate::support::ebb_bin().is_file(),
        "CARGO_BIN_EXE_ebb is built"
    );
}
