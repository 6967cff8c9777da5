//! The RabbitMQ scaler against a real broker (a vhost per test): the
//! management API reads ready + unacked, a passive declare reads ready only,
//! and a missing queue or bad credentials are errors, never 0.

use std::time::Duration;

use crate::support::{RabbitMq, Vhost, within};
use ebb_autoscaler::scalers::rabbitmq::{Management, RabbitMqScaler, RabbitMqScalerError, Reading};
use ebb_model::FunctionSpec;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

const STEP: Duration = Duration::from_secs(10);
/// New queues' statistics take ~5 s to appear, then lag ~1–1.5 s.
const STATS: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(5);

fn function(queue: &str) -> FunctionSpec {
    let mut f = FunctionSpec::new("echo", "shop");
    f.queue = Some(queue.to_string());
    f
}

async fn management(vhost: &Vhost) -> RabbitMqScaler {
    let rabbit = RabbitMq::shared().await;
    let credentials = rabbit.credentials();
    RabbitMqScaler::management(
        Management {
            url: rabbit.management_url().to_string(),
            vhost: vhost.name().to_string(),
            user: credentials.user.clone(),
            password: credentials.password.clone(),
        },
        TIMEOUT,
    )
    .expect("management scaler")
}

pub(crate) async fn channel(vhost: &Vhost) -> (Connection, Channel) {
    let rabbit = RabbitMq::shared().await;
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
    (connection, channel)
}

/// Declares a durable queue and publishes `n` persistent, confirmed messages.
pub(crate) async fn queue_with(channel: &Channel, queue: &str, n: usize) {
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
    for i in 0..n {
        let confirm = within(
            STEP,
            "publish",
            channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await
        .expect("publish");
        let confirmation = within(STEP, "publisher confirm", confirm)
            .await
            .expect("confirm");
        assert!(confirmation.is_ack(), "broker confirmed publish {i}");
    }
}

/// Polls the management scaler until `done` holds, tolerating only missing
/// statistics in between; returns the last reading.
async fn poll_until(
    scaler: &RabbitMqScaler,
    f: &FunctionSpec,
    what: &str,
    done: impl Fn(&Reading) -> bool,
) -> Reading {
    within(STATS, what, async {
        loop {
            match scaler.read(f).await {
                Ok(reading) if done(&reading) => return reading,
                Ok(_) | Err(RabbitMqScalerError::NoStats { .. }) => {}
                Err(err) => panic!("{what}: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

#[tokio::test]
async fn management_and_passive_declare_read_the_backlog() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (connection, channel) = channel(&vhost).await;
    let queue = "orders";
    queue_with(&channel, queue, 50).await;
    let f = function(queue);

    let http = management(&vhost).await;
    let reading = poll_until(&http, &f, "management backlog 50", |r| r.backlog == 50.0).await;
    assert_eq!(
        reading,
        Reading {
            backlog: 50.0,
            ready: 50,
            unacked: Some(0),
            finished: reading.finished,
        }
    );
    assert_eq!(http.backlog(&f).await.expect("backlog"), 50.0);

    let amqp = RabbitMqScaler::amqp(vhost.url(), TIMEOUT).expect("amqp scaler");
    assert_eq!(
        amqp.read(&f).await.expect("passive declare"),
        Reading {
            backlog: 50.0,
            ready: 50,
            unacked: None,
            finished: None,
        }
    );
    // The connection is kept; a second read works the same.
    assert_eq!(amqp.backlog(&f).await.expect("second read"), 50.0);

    connection.close(200, "done".into()).await.expect("close");
}

#[tokio::test]
async fn unacked_messages_count_in_the_management_backlog() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (connection, channel) = channel(&vhost).await;
    let queue = "work";
    queue_with(&channel, queue, 50).await;
    let f = function(queue);

    // A consumer that takes 10 and acks none.
    let (_consuming, held) = hold(&connection, queue, 10).await;

    let http = management(&vhost).await;
    let reading = poll_until(&http, &f, "ready 40 + unacked 10", |r| {
        r.ready == 40 && r.unacked == Some(10)
    })
    .await;
    assert_eq!(reading.backlog, 50.0);

    // A passive declare counts ready messages only.
    let amqp = RabbitMqScaler::amqp(vhost.url(), TIMEOUT).expect("amqp scaler");
    assert_eq!(amqp.backlog(&f).await.expect("passive declare"), 40.0);

    drop(held);
    connection.close(200, "done".into()).await.expect("close");
}

#[tokio::test]
async fn a_missing_queue_is_an_error_not_zero() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let f = function("nobody-declared-this");

    let http = management(&vhost).await;
    let err = http.backlog(&f).await.expect_err("missing queue");
    assert!(
        matches!(err, RabbitMqScalerError::NoQueue { .. }),
        "management: {err:?}"
    );
    assert_eq!(err.metric_label(), "missing_queue");

    let amqp = RabbitMqScaler::amqp(vhost.url(), TIMEOUT).expect("amqp scaler");
    let err = amqp.backlog(&f).await.expect_err("missing queue");
    assert!(
        matches!(err, RabbitMqScalerError::NoQueue { .. }),
        "amqp: {err:?}"
    );

    // The closed channel does not poison the scaler: an existing queue reads.
    let (connection, channel) = channel(&vhost).await;
    queue_with(&channel, "present", 3).await;
    assert_eq!(
        amqp.backlog(&function("present"))
            .await
            .expect("existing queue after a missing one"),
        3.0
    );
    connection.close(200, "done".into()).await.expect("close");
}

#[tokio::test]
async fn wrong_credentials_are_an_error() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (connection, channel) = channel(&vhost).await;
    queue_with(&channel, "guarded", 5).await;
    let f = function("guarded");

    let rabbit = RabbitMq::shared().await;
    let credentials = rabbit.credentials();
    let http = RabbitMqScaler::management(
        Management {
            url: rabbit.management_url().to_string(),
            vhost: vhost.name().to_string(),
            user: credentials.user.clone(),
            password: "not-the-password".to_string(),
        },
        TIMEOUT,
    )
    .expect("management scaler");
    let err = http.backlog(&f).await.expect_err("wrong password");
    assert!(
        matches!(err, RabbitMqScalerError::Auth(_)),
        "management: {err:?}"
    );
    assert_eq!(err.metric_label(), "auth");

    let wrong_url = vhost.url().replacen(
        &format!("{}:{}@", credentials.user, credentials.password),
        &format!("{}:not-the-password@", credentials.user),
        1,
    );
    assert_ne!(wrong_url, vhost.url(), "URL carries the credentials");
    let amqp = RabbitMqScaler::amqp(&wrong_url, TIMEOUT).expect("amqp scaler");
    let err = amqp.backlog(&f).await.expect_err("wrong password");
    assert!(matches!(err, RabbitMqScalerError::Auth(_)), "amqp: {err:?}");
    assert!(
        !err.to_string().contains("not-the-password"),
        "error does not leak the password: {err}"
    );

    connection.close(200, "done".into()).await.expect("close");
}

/// A consumer of `queue` on a channel of its own, with a prefetch of
/// `prefetch`.
async fn consume(connection: &Connection, queue: &str, prefetch: u16) -> (Channel, Consumer) {
    let channel = within(STEP, "consumer channel", connection.create_channel())
        .await
        .expect("channel");
    within(
        STEP,
        "qos",
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await
    .expect("qos");
    let consumer = within(
        STEP,
        "basic consume",
        channel.basic_consume(
            queue.into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    (channel, consumer)
}

/// Takes `n` messages of `queue` and acks none: in flight until dropped.
pub(crate) async fn hold(connection: &Connection, queue: &str, n: u16) -> (Channel, Vec<Delivery>) {
    let (channel, mut consumer) = consume(connection, queue, n).await;
    let mut held = Vec::new();
    for _ in 0..n {
        let delivery = within(STEP, "delivery", consumer.next())
            .await
            .expect("consumer open")
            .expect("delivery");
        held.push(delivery);
    }
    (channel, held)
}

/// Takes `n` deliveries from `consumer` and acks each.
async fn ack(consumer: &mut Consumer, n: usize) {
    for _ in 0..n {
        let delivery = within(STEP, "delivery", consumer.next())
            .await
            .expect("consumer open")
            .expect("delivery");
        within(STEP, "ack", delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
}

#[tokio::test]
async fn acked_messages_count_as_finished() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (connection, channel) = channel(&vhost).await;
    let queue = "acked";
    queue_with(&channel, queue, 20).await;
    let f = function(queue);
    let http = management(&vhost).await;
    // Published to, nothing acked yet: RabbitMQ reports no `ack` counter,
    // which is unknown, not 0.
    let published = poll_until(&http, &f, "backlog 20", |r| r.backlog == 20.0).await;
    assert_eq!(published.finished, None, "{published:?}");

    // A consumer with a prefetch of 10 acks 6, then 5 more.
    let (_consuming, mut consumer) = consume(&connection, queue, 10).await;
    ack(&mut consumer, 6).await;
    let six = poll_until(&http, &f, "6 finished", |r| r.finished == Some(6)).await;
    // The other 10 of the prefetch are delivered, not finished.
    assert_eq!(six.backlog, 14.0, "{six:?}");
    ack(&mut consumer, 5).await;
    let eleven = poll_until(&http, &f, "11 finished", |r| r.finished == Some(11)).await;
    assert_eq!(eleven.backlog, 9.0, "{eleven:?}");

    // A passive declare cannot tell.
    let amqp = RabbitMqScaler::amqp(vhost.url(), TIMEOUT).expect("amqp scaler");
    assert_eq!(amqp.read(&f).await.expect("passive declare").finished, None);

    connection.close(200, "done".into()).await.expect("close");
}
