//! Live edits of a running connector's stack file, on each broker: scaling
//! settings (`max-replicas`, `target`) never restart a consumer, and a new
//! `max-inflight` changes the concurrency where the consumer runs.
//!
//! One scenario, run against a real nats-server (JetStream), a real
//! RabbitMQ node and librdkafka's mock cluster: a steady stream of events to
//! a slow function while its scaling settings change, then a burst while its
//! `max-inflight` goes from 2 to 8. Every event arrives exactly once, on its
//! first attempt; the consumer was started once (and, on JetStream, is the
//! same consumer; on RabbitMQ, nothing was redelivered).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::connector::{Func, func, stack_yaml, wait_ready, write_stack};
use crate::support::sink::{Reply, Sink};
use crate::support::{
    ChildGuard, KafkaMock, NatsServer, RabbitMq, Vhost, ebb_command, free_port, http, within,
};
use async_nats::jetstream;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tempfile::TempDir;

const STEP: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(30);
/// Bound of every event reaching the function (the mock's group join takes a few seconds).
const DELIVERY: Duration = Duration::from_secs(60);
/// How often the connector reads the stack file.
const RELOAD: &str = "200ms";
pub(crate) const TOPIC: &str = "orders";
pub(crate) const FUNCTION: &str = "slow";
/// Events of the steady stream, one every [`EVERY`].
const STEADY: usize = 120;
const EVERY: Duration = Duration::from_millis(20);
/// Events of the burst while `max-inflight` changes.
const BURST: usize = 40;

pub(crate) enum Broker {
    Nats {
        _server: NatsServer,
        url: String,
        js: jetstream::Context,
    },
    Amqp {
        vhost: Vhost,
        _conn: Connection,
        channel: Channel,
    },
    Kafka {
        mock: KafkaMock,
        producer: FutureProducer,
    },
}

impl Broker {
    pub(crate) async fn nats() -> Self {
        let server = NatsServer::start_local().await;
        let client = within(STEP, "NATS connect", async_nats::connect(server.url()))
            .await
            .expect("connect to nats-server");
        Self::Nats {
            url: server.url().to_owned(),
            _server: server,
            js: jetstream::new(client),
        }
    }

    pub(crate) async fn amqp() -> Self {
        let vhost = RabbitMq::shared().await.vhost().await;
        let (conn, channel) = vhost.channel(true).await;
        Self::Amqp {
            vhost,
            _conn: conn,
            channel,
        }
    }

    pub(crate) fn kafka() -> Self {
        let mock = KafkaMock::new();
        mock.create_topic(TOPIC, 4);
        let producer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .create()
            .expect("producer");
        Self::Kafka { mock, producer }
    }

    pub(crate) fn connector_args(&self) -> Vec<String> {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Self::Nats { url, .. } => v(&["nats", "--url", url]),
            Self::Amqp { vhost, .. } => v(&["amqp", "--url", vhost.url()]),
            Self::Kafka { mock, .. } => {
                let mut a = v(&["kafka", "--url"]);
                a.push(mock.bootstrap_servers());
                // Nothing published once the connector is ready may be skipped
                // while its group is still joining.
                a.extend(v(&["--offset-reset", "earliest"]));
                a
            }
        }
    }

    /// The function's extra stack settings on this broker.
    pub(crate) fn settings(&self, f: Func) -> Func {
        match self {
            // Partition order would allow one call per partition at a time.
            Self::Kafka { .. } => f.set("kafka-ordering", "none"),
            _ => f,
        }
    }

    pub(crate) async fn publish(&self, body: &str) {
        match self {
            Self::Nats { js, .. } => {
                within(STEP, "JetStream publish", async {
                    js.publish(TOPIC, body.to_owned().into())
                        .await
                        .expect("publish")
                        .await
                        .expect("stored")
                })
                .await;
            }
            Self::Amqp { channel, .. } => {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(body.into());
                let confirm = within(STEP, "AMQP publish", async {
                    channel
                        .basic_publish(
                            "ebb".into(),
                            TOPIC.into(),
                            BasicPublishOptions {
                                mandatory: true,
                                immediate: false,
                            },
                            body.as_bytes(),
                            props,
                        )
                        .await
                        .expect("publish")
                        .await
                        .expect("confirm")
                })
                .await;
                assert!(confirm.is_ack(), "{confirm:?}");
            }
            Self::Kafka { producer, .. } => {
                let record = FutureRecord::to(TOPIC).key(body).payload(body);
                within(STEP, "produce", producer.send(record, STEP))
                    .await
                    .expect("produced");
            }
        }
    }

    /// When the function's consumer was created, where the broker says.
    async fn consumer_created(&self) -> Option<String> {
        let Self::Nats { js, .. } = self else {
            return None;
        };
        let stream = within(STEP, "stream", js.get_stream("EBB"))
            .await
            .expect("stream EBB");
        let info = within(
            STEP,
            "consumer info",
            stream.consumer_info(format!("ebb-default-{FUNCTION}")),
        )
        .await
        .expect("consumer");
        Some(info.created.to_string())
    }

    /// Messages the broker delivered again (RabbitMQ's `redeliver` counter).
    async fn redelivered(&self) -> u64 {
        let Self::Amqp { vhost, .. } = self else {
            return 0;
        };
        let queue = format!("ebb-default-{FUNCTION}");
        // The management statistics lag a second or two behind.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let info = vhost
            .queue_info(&queue)
            .await
            .expect("the function's queue");
        info.pointer("/message_stats/redeliver")
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }
}

/// The connector's metric `name` (with its labels, as printed), if present.
pub(crate) async fn metric(admin: &str, name: &str) -> Option<f64> {
    let r = http::request(
        hyper::Method::GET,
        &format!("http://{admin}/metrics"),
        None,
        None,
        STEP,
    )
    .await
    .expect("GET /metrics");
    r.text().lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

const STARTS: &str = "ebb_consumer_starts_total{function=\"default/slow\"}";
const LIMIT: &str = "ebb_delivery_limit{function=\"default/slow\"}";

fn stack(
    broker: &Broker,
    sink: &Sink,
    max_inflight: u32,
    max_replicas: u32,
    target: u32,
) -> String {
    stack_yaml(&[broker.settings(
        func(FUNCTION, &sink.url(), &[TOPIC])
            .set("max-inflight", &max_inflight.to_string())
            .set("max-replicas", &max_replicas.to_string())
            .set("target", &target.to_string()),
    )])
}

async fn live_edits_restart_nothing(broker: Broker) {
    let dir: TempDir = tempfile::Builder::new()
        .prefix("ebb-test-reload-")
        .tempdir()
        .expect("temp dir");
    let path: PathBuf = dir.path().join("stack.yaml");
    let sink = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_millis(30)))
        .start()
        .await;
    write_stack(&path, &stack(&broker, &sink, 2, 3, 5));

    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = ebb_command();
    cmd.arg("connector")
        .args(broker.connector_args())
        .arg("--functions")
        .arg(&path)
        .args(["--admin-addr", &admin, "--reload-interval", RELOAD]);
    let mut connector = ChildGuard::spawn("connector", &mut cmd);
    wait_ready(&mut connector, &admin, READY).await;
    let created = broker.consumer_created().await;

    // A steady stream; its scaling settings change twice on the way.
    for i in 0..STEADY {
        broker.publish(&format!("m-{i}")).await;
        match i {
            40 => write_stack(&path, &stack(&broker, &sink, 2, 7, 2)),
            80 => write_stack(&path, &stack(&broker, &sink, 2, 1, 50)),
            _ => {}
        }
        tokio::time::sleep(EVERY).await;
    }
    sink.wait_for_calls(STEADY, DELIVERY).await;
    assert!(
        sink.max_concurrent() <= 2,
        "max-inflight 2, yet {} calls at once",
        sink.max_concurrent()
    );

    // A burst at max-inflight 2, then 8, while it is being delivered.
    sink.set_otherwise(Reply::ok().delay(Duration::from_millis(400)));
    for i in STEADY..STEADY + BURST {
        broker.publish(&format!("m-{i}")).await;
    }
    sink.wait_until(STEP, "2 calls at once", |s| s.inflight() == 2)
        .await;
    assert_eq!(metric(&admin, LIMIT).await, Some(2.0));
    write_stack(&path, &stack(&broker, &sink, 8, 1, 50));
    sink.wait_until(STEP, "8 calls at once after the edit", |s| {
        s.inflight() == 8
    })
    .await;
    assert_eq!(metric(&admin, LIMIT).await, Some(8.0));
    assert!(
        sink.max_concurrent() <= 8,
        "{} calls at once",
        sink.max_concurrent()
    );

    sink.wait_for_calls(STEADY + BURST, DELIVERY).await;
    // Anything delivered twice would come within a few reload intervals.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = sink.calls();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in &calls {
        *seen.entry(c.text()).or_default() += 1;
        assert_eq!(c.attempt(), 1, "{} was delivered again", c.text());
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let missing: Vec<usize> = (0..STEADY + BURST)
        .filter(|i| !seen.contains_key(&format!("m-{i}")))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");

    assert_eq!(
        metric(&admin, STARTS).await,
        Some(1.0),
        "the consumer was restarted; connector output:\n{}",
        connector.output()
    );
    assert_eq!(
        broker.consumer_created().await,
        created,
        "the consumer was recreated"
    );
    assert_eq!(
        broker.redelivered().await,
        0,
        "RabbitMQ redelivered messages"
    );
    connector.terminate(Duration::from_secs(15)).await;
}

#[tokio::test]
async fn nats_live_edits_restart_nothing() {
    live_edits_restart_nothing(Broker::nats().await).await;
}

#[tokio::test]
async fn amqp_live_edits_restart_nothing() {
    live_edits_restart_nothing(Broker::amqp().await).await;
}

#[tokio::test]
async fn kafka_live_edits_restart_nothing() {
    live_edits_restart_nothing(Broker::kafka()).await;
}
