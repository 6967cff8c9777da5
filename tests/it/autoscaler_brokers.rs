//! `ebb autoscaler` reading RabbitMQ queue depth and Kafka consumer lag (with
//! the partition cap), against a real RabbitMQ node, librdkafka's mock
//! cluster and the Kubernetes API double.

use std::time::Duration;

use crate::support::{ChildGuard, KafkaMock, RabbitMq, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const STEP: Duration = Duration::from_secs(10);

fn autoscaler(api: &KubeApi, dir: &std::path::Path, source: &[&str]) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args([
        "autoscaler",
        "--kubernetes",
        "--interval",
        "200ms",
        "--no-leader-election",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
    .args(source)
    .env("KUBECONFIG", api.kubeconfig(dir));
    ChildGuard::spawn("autoscaler", &mut cmd)
}

async fn replicas_become(api: &KubeApi, name: &str, want: i64) {
    within(
        Duration::from_secs(30),
        &format!("{name} scaled to {want}"),
        async {
            while api.replicas("default", name) != Some(want) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_lag_scales_up_capped_at_the_partition_count() {
    let api = KubeApi::start();
    // Pods become ready 100 ms after each scale, as a Deployment's would:
    // with the group's committed offsets as its finished count, the policy
    // waits for starting replicas before asking for more.
    api.auto_ready(Some(Duration::from_millis(100)));
    let kafka = KafkaMock::new();
    kafka.create_topic("k.work", 3);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()
        .expect("producer");
    for i in 0..30 {
        let payload = i.to_string();
        let record = FutureRecord::<(), _>::to("k.work")
            .partition(i % 3)
            .payload(&payload);
        within(STEP, "produce", producer.send(record, STEP))
            .await
            .expect("delivered");
    }
    // 30 messages at target 1 would ask for 30 (max 8); 3 partitions cap it.
    api.apply_deployment(
        "default",
        "kwork",
        &[
            ("ebb.io/topics", "k.work"),
            ("ebb.io/target", "1"),
            ("ebb.io/max-replicas", "8"),
        ],
        &[],
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = kafka.bootstrap_servers();
    let _a = autoscaler(
        &api,
        dir.path(),
        &["--kafka", &bootstrap, "--kafka-offset-reset", "earliest"],
    );
    replicas_become(&api, "kwork", 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        api.replicas("default", "kwork"),
        Some(3),
        "went past the partition count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_depth_scales_up() {
    let api = KubeApi::start();
    let rabbit = RabbitMq::shared().await;
    let vhost = rabbit.vhost().await;
    let (_connection, channel) = vhost.channel(false).await;
    within(
        STEP,
        "declare",
        channel.queue_declare(
            "ebb-default-rwork".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    within(
        STEP,
        "confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirms");
    for i in 0..50 {
        let confirm = within(
            STEP,
            "publish",
            channel.basic_publish(
                "".into(),
                "ebb-default-rwork".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await
        .expect("publish");
        within(STEP, "confirm", confirm).await.expect("confirmed");
    }
    // 50 ready at target 10 → 5 (from 1, +4 allowed at once).
    api.apply_deployment(
        "default",
        "rwork",
        &[("ebb.io/topics", "r.work"), ("ebb.io/target", "10")],
        &[],
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let url = vhost.url().to_string();
    let _a = autoscaler(&api, dir.path(), &["--amqp", &url]);
    replicas_become(&api, "rwork", 5).await;
}
