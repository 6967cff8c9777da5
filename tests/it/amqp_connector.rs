//! End-to-end tests of `ebb connector amqp` and `ebb publish --amqp`: a real
//! RabbitMQ node (a fresh vhost per test), a real connector process per
//! test, functions played by [`Sink`]s, the autoscaler by a
//! [`FakeAutoscaler`].
//!
//! Queue depths are read with a passive `queue.declare` (exact and
//! immediate: ready messages), not the management API's lagging statistics.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::support::connector::{Func, func, stack_yaml, wait_ready, write_stack};
use crate::support::sink::{FakeAutoscaler, Reply, Sink};
use crate::support::{ChildGuard, RabbitMq, Vhost, ebb_command, free_port, within};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::time::Instant;

/// Bound of one broker round trip.
const STEP: Duration = Duration::from_secs(10);
/// Bound of a connector start.
const READY: Duration = Duration::from_secs(30);
/// Bound of "the event reaches the function" for a handful of events.
const DELIVERY: Duration = Duration::from_secs(15);
const EXCHANGE: &str = "ebb";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A test's vhost, temp dir (stack file) and AMQP channel.
struct Env {
    vhost: Vhost,
    dir: TempDir,
    _conn: Connection,
    channel: Channel,
}

impl Env {
    async fn start() -> Self {
        let vhost = RabbitMq::shared().await.vhost().await;
        let dir = tempfile::Builder::new()
            .prefix("ebb-test-amqp-")
            .tempdir()
            .expect("temp dir");
        let (conn, channel) = vhost.channel(true).await;
        Self {
            vhost,
            dir,
            _conn: conn,
            channel,
        }
    }

    fn stack_path(&self) -> PathBuf {
        self.dir.path().join("stack.yaml")
    }

    fn write_stack(&self, funcs: &[Func]) {
        write_stack(&self.stack_path(), &stack_yaml(funcs));
    }

    /// Starts `ebb connector amqp` on the stack file and waits until ready.
    async fn connector(&self, extra: &[&str]) -> Connector {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.args(["connector", "amqp", "--functions"])
            .arg(self.stack_path())
            .args(["--url", self.vhost.url(), "--admin-addr", &admin])
            .args(["--retry-base-delay", "50ms", "--retry-max-delay", "200ms"])
            .args(["--drain-timeout", "10s"])
            .args(extra);
        let mut c = Connector {
            child: ChildGuard::spawn("connector", &mut cmd),
            admin,
        };
        c.wait_ready().await;
        c
    }

    /// Ready messages of a queue, `None` when it does not exist.
    async fn ready(&self, queue: &str) -> Option<u32> {
        // A passive declare of a missing queue closes the channel: use a
        // channel of its own.
        let conn = within(
            STEP,
            "AMQP connect",
            Connection::connect(self.vhost.url(), ConnectionProperties::default()),
        )
        .await
        .expect("connect");
        let ch = within(STEP, "channel", conn.create_channel())
            .await
            .expect("channel");
        let r = within(
            STEP,
            "passive declare",
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        let _ = conn.close(200, "done".into()).await;
        r.ok().map(|q| q.message_count())
    }

    async fn wait_ready_count(&self, queue: &str, want: Option<u32>, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.ready(queue).await;
            if now == want {
                return;
            }
            if Instant::now() >= deadline {
                panic!("queue {queue}: {now:?} ready, not {want:?}, after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes with confirms to `exchange` (routing key `key`).
    async fn publish_to(&self, exchange: &str, key: &str, props: BasicProperties, body: &[u8]) {
        let confirm = within(
            STEP,
            "publish",
            self.channel.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props,
            ),
        )
        .await
        .expect("publish");
        let c = within(STEP, "confirm", confirm).await.expect("confirm");
        assert!(
            matches!(c, Confirmation::Ack(None)),
            "the broker stored it in a queue: {c:?}"
        );
    }

    async fn publish(&self, topic: &str, id: &str, body: &[u8]) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into());
        self.publish_to(EXCHANGE, topic, props, body).await;
    }

    /// One message from a queue, without waiting (basic.get, acked).
    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let deadline = Instant::now() + DELIVERY;
        loop {
            let m = within(
                STEP,
                "basic.get",
                self.channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true }),
            )
            .await
            .expect("basic.get");
            if m.is_some() || Instant::now() >= deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running `ebb connector amqp`.
struct Connector {
    child: ChildGuard,
    admin: String,
}

impl Connector {
    async fn wait_ready(&mut self) {
        wait_ready(&mut self.child, &self.admin, READY).await;
    }

    /// Waits until the metric `series` (name and labels, as printed) reads
    /// `want`.
    async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + DELIVERY;
        loop {
            let text = crate::support::http::request(
                hyper::Method::GET,
                &format!("http://{}/metrics", self.admin),
                None,
                None,
                STEP,
            )
            .await
            .expect("GET /metrics")
            .text();
            let got = text.lines().find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            });
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{series} is {got:?}, not {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A text header of an AMQP message.
fn amqp_header(props: &BasicProperties, name: &str) -> Option<String> {
    let table = props.headers().as_ref()?;
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

async fn ebb(args: &[&str]) -> std::process::Output {
    within(
        Duration::from_secs(20),
        "ebb",
        ebb_command().args(args).output(),
    )
    .await
    .expect("run ebb")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delivers_every_message_once_to_each_subscribed_function() {
    const N: usize = 300;
    let env = Env::start().await;
    let (a, b, c) = (
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    );
    env.write_stack(&[
        func("a", &a.url(), &["orders"]),
        func("b", &b.url(), &["orders"]),
        func("c", &c.url(), &["pay.>"]),
    ]);
    let _connector = env.connector(&[]).await;

    let published = chrono::Utc::now().timestamp();
    for i in 0..N {
        for (topic, id) in [
            ("orders", format!("o-{i}")),
            ("pay.eu.card", format!("p-{i}")),
        ] {
            let mut h = BTreeMap::new();
            h.insert(
                ShortString::from("x-order"),
                AMQPValue::LongString(LongString::from(i.to_string())),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into())
                .with_timestamp(u64::try_from(published).expect("time"))
                .with_content_type("application/json".into())
                .with_headers(FieldTable::from(h));
            env.publish_to(
                EXCHANGE,
                topic,
                props,
                format!("{{\"{id}\":{i}}}").as_bytes(),
            )
            .await;
        }
    }
    for (name, sink) in [("a", &a), ("b", &b), ("c", &c)] {
        sink.wait_for_calls(N, Duration::from_secs(60)).await;
        env.wait_ready_count(&format!("ebb-default-{name}"), Some(0), DELIVERY)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, sink, topic, prefix) in [
        ("a", &a, "orders", "o-"),
        ("b", &b, "orders", "o-"),
        ("c", &c, "pay.eu.card", "p-"),
    ] {
        let calls = sink.calls();
        assert_eq!(calls.len(), N, "{name}: one call per message");
        let ids: HashSet<&str> = calls.iter().filter_map(|c| c.header("ce-id")).collect();
        assert_eq!(ids.len(), N, "{name}: each message once");
        for call in &calls {
            let id = call.header("ce-id").expect("ce-id");
            assert!(id.starts_with(prefix), "{name} got {id}");
            let i = &id[2..];
            assert_eq!(call.text(), format!("{{\"{id}\":{i}}}"));
            assert_eq!(call.header("x-order"), Some(i));
            assert_eq!(call.header("ce-specversion"), Some("1.0"));
            assert_eq!(call.header("ce-type"), Some("io.ebb.amqp.message"));
            assert_eq!(
                call.header("ce-source").map(str::to_owned),
                Some(format!("/ebb/amqp/ebb-default-{name}"))
            );
            assert_eq!(call.header("ce-subject"), Some(topic));
            assert_eq!(call.header("x-topic"), Some(topic));
            assert_eq!(call.header("ebb-attempt"), Some("1"));
            assert_eq!(call.header("content-type"), Some("application/json"));
            let t = chrono::DateTime::parse_from_rfc3339(call.header("ce-time").expect("ce-time"))
                .expect("RFC 3339");
            assert_eq!(t.timestamp(), published, "ce-time is the AMQP timestamp");
        }
    }
}

#[tokio::test]
async fn retries_failed_calls_and_acks_only_after_success() {
    let env = Env::start().await;
    let f = Sink::builder()
        .replies([Reply::status(500).body("boom"), Reply::status(503)])
        .otherwise(Reply::ok())
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"]).set("max-attempts", "5")]);
    let _connector = env.connector(&[]).await;
    env.publish("jobs", "job-1", b"job").await;
    f.wait_for_calls(3, DELIVERY).await;
    env.wait_ready_count("ebb-default-f", Some(0), DELIVERY)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = f.calls();
    assert_eq!(calls.len(), 3, "two failures, then success, then nothing");
    let attempts: Vec<u32> = calls.iter().map(|c| c.attempt()).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert!(calls.iter().all(|c| c.header("ce-id") == Some("job-1")));
}

#[tokio::test]
async fn a_400_is_dead_lettered_with_the_reason_then_acked() {
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::status(400).body("invalid order\n"))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["orders"])
        .set("max-attempts", "5")
        .set("dead-letter", "orders.dead")]);
    let _connector = env.connector(&[]).await;
    // Non-UTF-8 bytes pass untouched.
    let body: &[u8] = &[0xff, 0x00, b'{', 0xfe];
    env.publish("orders", "order-7", body).await;
    let dead = env
        .get("ebb-dead-letters-orders.dead")
        .await
        .expect("a dead letter in the dead-letter queue");
    assert_eq!(dead.delivery.data, body, "original payload");
    let h = |name| amqp_header(&dead.delivery.properties, name);
    assert_eq!(h("ebb-dead-letter-reason").as_deref(), Some("status 400"));
    assert_eq!(h("ebb-attempts").as_deref(), Some("1"));
    assert_eq!(h("ebb-last-status").as_deref(), Some("400"));
    assert_eq!(h("ebb-original-topic").as_deref(), Some("orders"));
    assert!(
        h("ebb-source-position").is_some_and(|p| p.starts_with("queue ebb-default-f")),
        "{:?}",
        h("ebb-source-position")
    );
    assert_eq!(
        h("ebb-last-response").as_deref(),
        Some("invalid order\\x0A")
    );
    env.wait_ready_count("ebb-default-f", Some(0), DELIVERY)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.count(), 1, "a 400 is not retried");
    assert_eq!(f.calls()[0].body.as_ref(), body, "delivered byte for byte");
}

#[tokio::test]
async fn without_a_dead_letter_setting_events_go_to_the_function_s_own_dead_letter_queue() {
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::status(400).body("no such order"))
        .start()
        .await;
    let g = Sink::builder().otherwise(Reply::status(400)).start().await;
    env.write_stack(&[
        func("f", &f.url(), &["orders"]),
        func("g", &g.url(), &["refunds"]).set("dead-letter", "none"),
    ]);
    let _connector = env.connector(&[]).await;
    env.publish("orders", "order-3", b"order-3").await;
    env.publish("refunds", "refund-1", b"refund-1").await;
    let dead = env
        .get("ebb-dead-default-f")
        .await
        .expect("a dead letter in the function's dead-letter queue");
    assert_eq!(dead.delivery.data, b"order-3");
    let h = |name| amqp_header(&dead.delivery.properties, name);
    assert_eq!(h("ebb-dead-letter-reason").as_deref(), Some("status 400"));
    assert_eq!(h("ebb-attempts").as_deref(), Some("1"));
    assert_eq!(h("ebb-last-status").as_deref(), Some("400"));
    assert_eq!(h("ebb-original-topic").as_deref(), Some("orders"));
    assert!(
        h("ebb-source-position").is_some_and(|p| p.starts_with("queue ebb-default-f")),
        "{:?}",
        h("ebb-source-position")
    );
    assert_eq!(h("ebb-last-response").as_deref(), Some("no such order"));

    // `dead-letter: none`: dropped (acked), no dead-letter queue at all.
    g.wait_for_calls(1, DELIVERY).await;
    env.wait_ready_count("ebb-default-g", Some(0), DELIVERY)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(g.count(), 1, "dropped, not redelivered");
    assert_eq!(env.ready("ebb-dead-default-g").await, None);
}

#[tokio::test]
async fn a_killed_connector_loses_nothing() {
    let env = Env::start().await;
    // Fails until told otherwise: the message stays unacked.
    let f = Sink::builder().otherwise(Reply::status(500)).start().await;
    env.write_stack(&[func("f", &f.url(), &["work"]).set("max-attempts", "1000")]);
    let mut first = env.connector(&[]).await;
    env.publish("work", "w-1", b"work").await;
    f.wait_for_calls(2, DELIVERY).await;
    assert_eq!(env.ready("ebb-default-f").await, Some(0), "taken, unacked");
    first.child.signal(Signal::SIGKILL);
    first.child.wait(STEP).await;
    drop(first);
    // The broker requeues what the dead connection had not acked.
    env.wait_ready_count("ebb-default-f", Some(1), DELIVERY)
        .await;

    f.set_otherwise(Reply::ok());
    let seen = f.count();
    let mut second = env.connector(&[]).await;
    f.wait_for_calls(seen + 1, DELIVERY).await;
    f.wait_until(DELIVERY, "the call answered", |s| s.completed() > seen)
        .await;
    // Stopped after the 200: the message does not come back (acked).
    second.child.signal(Signal::SIGTERM);
    assert_eq!(second.child.wait(STEP).await.code(), Some(0));
    assert_eq!(env.ready("ebb-default-f").await, Some(0), "acked");
    assert_eq!(f.count(), seen + 1, "one call after the restart");
    assert!(f.calls().iter().all(|c| c.header("ce-id") == Some("w-1")));
}

#[tokio::test]
async fn sigterm_finishes_calls_in_flight_and_releases_held_events() {
    let env = Env::start().await;
    let autoscaler = FakeAutoscaler::start().await;
    let port = free_port();
    let slow = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_secs(2)))
        .start()
        .await;
    env.write_stack(&[
        func("sleepy", &format!("http://127.0.0.1:{port}"), &["jobs"])
            .set("dead-letter", "jobs.dead"),
        func("slow", &slow.url(), &["slow"]),
    ]);
    let mut connector = env
        .connector(&["--autoscaler-url", &autoscaler.url()])
        .await;
    env.publish("jobs", "held-1", b"held").await;
    env.publish("slow", "slow-1", b"in flight").await;
    autoscaler
        .wait_for_wake("/wake/default/sleepy", DELIVERY)
        .await;
    slow.wait_for_calls(1, DELIVERY).await;
    assert_eq!(env.ready("ebb-default-sleepy").await, Some(0), "held");

    connector.child.signal(Signal::SIGTERM);
    let status = connector.child.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit 0 after draining");
    // The call in flight finished and was acked before the exit: it is
    // not back in the queue.
    assert_eq!(slow.completed(), 1);
    assert_eq!(env.ready("ebb-default-slow").await, Some(0), "acked");
    // Given back, not acked, not dead-lettered.
    env.wait_ready_count("ebb-default-sleepy", Some(1), DELIVERY)
        .await;
    assert_eq!(env.ready("ebb-dead-letters-jobs.dead").await, Some(0));
    drop(connector);

    let f = Sink::builder().port(port).start().await;
    let _again = env.connector(&[]).await;
    f.wait_for_calls(1, DELIVERY).await;
    env.wait_ready_count("ebb-default-sleepy", Some(0), DELIVERY)
        .await;
    assert_eq!(f.calls()[0].header("ce-id"), Some("held-1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.count(), 1, "the acked message is not delivered again");
}

#[tokio::test]
async fn an_existing_queue_is_consumed_as_it_is() {
    let env = Env::start().await;
    within(
        STEP,
        "declare",
        env.channel.queue_declare(
            "legacy-jobs".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare legacy-jobs");
    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &[]).set("queue", "legacy-jobs")]);
    let _connector = env.connector(&[]).await;
    // Published straight to the queue (default exchange).
    env.publish_to(
        "",
        "legacy-jobs",
        BasicProperties::default().with_message_id("l-1".into()),
        b"old",
    )
    .await;
    f.wait_for_calls(1, DELIVERY).await;
    env.wait_ready_count("legacy-jobs", Some(0), DELIVERY).await;
    assert_eq!(f.calls()[0].text(), "old");
    assert_eq!(f.calls()[0].header("ce-subject"), Some("legacy-jobs"));
    assert_eq!(
        env.ready("ebb-default-f").await,
        None,
        "no queue of its own"
    );
}

#[tokio::test]
async fn a_stack_edit_rebinds_and_a_removed_function_s_queue_goes_after_its_retention() {
    let env = Env::start().await;
    let (f, g) = (Sink::start().await, Sink::start().await);
    let slow = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_secs(2)))
        .start()
        .await;
    env.write_stack(&[
        func("f", &f.url(), &["old"]),
        func("g", &g.url(), &["keep"]),
        func("h", &slow.url(), &["slow"]).set("max-inflight", "1"),
    ]);
    let _connector = env
        .connector(&["--reload-interval", "100ms", "--retain-removed", "4s"])
        .await;
    env.publish("old", "1", b"1").await;
    f.wait_for_calls(1, DELIVERY).await;
    for i in 0..3 {
        env.publish("slow", &format!("s{i}"), b"s").await;
    }
    slow.wait_for_calls(1, DELIVERY).await;

    // g and h removed: both queues are kept for the retention (h's call in
    // flight finishes and is acked; its backlog waits); then g's empty
    // queue is deleted, and h's backlog goes to its dead letters before its
    // queue is deleted.
    env.write_stack(&[func("f", &f.url(), &["new"])]);
    slow.wait_until(DELIVERY, "the call in flight", |s| s.completed() == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.ready("ebb-default-h").await,
        Some(2),
        "kept, nothing requeued"
    );
    assert_eq!(
        env.ready("ebb-default-g").await,
        Some(0),
        "kept while retained"
    );
    env.wait_ready_count("ebb-default-g", None, DELIVERY).await;
    env.wait_ready_count("ebb-default-h", None, DELIVERY).await;
    assert_eq!(env.ready("ebb-dead-default-h").await, Some(2));
    let dead = env.get("ebb-dead-default-h").await.expect("a dead letter");
    assert_eq!(
        amqp_header(&dead.delivery.properties, "ebb-dead-letter-reason").as_deref(),
        Some("function removed")
    );
    assert_eq!(slow.count(), 1);
    env.publish("new", "2", b"2").await;
    f.wait_for_calls(2, DELIVERY).await;
    // `old` is no longer bound anywhere: a mandatory publish comes back.
    let confirm = within(
        STEP,
        "publish",
        env.channel.basic_publish(
            EXCHANGE.into(),
            "old".into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"3",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    let c = within(STEP, "confirm", confirm).await.expect("confirm");
    assert!(
        matches!(c, Confirmation::Ack(Some(_))),
        "unroutable after the edit: {c:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.count(), 2);
}

#[tokio::test]
async fn ebb_publish_amqp_delivers_and_names_what_is_wrong() {
    let env = Env::start().await;
    let url = env.vhost.url().to_owned();
    // No connector has declared the exchange yet.
    let out = ebb(&["publish", "--amqp", &url, "orders", "x"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("exchange `ebb` does not exist") && err.contains("ebb connector amqp"),
        "{err}"
    );

    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &["orders"])]);
    let _connector = env.connector(&[]).await;
    let out = ebb(&[
        "publish",
        "--amqp",
        &url,
        "-H",
        "x-order:9",
        "orders",
        "hello",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_for_calls(1, DELIVERY).await;
    let call = &f.calls()[0];
    assert_eq!(call.text(), "hello");
    assert_eq!(call.header("x-order"), Some("9"));
    assert!(call.header("ce-id").is_some_and(|id| id.len() == 32));

    // A topic nobody subscribes to is refused, not silently dropped.
    let out = ebb(&["publish", "--amqp", &url, "nobody.listens", "x"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no queue is bound to `nobody.listens`"),
        "{err}"
    );

    // A malformed URL is a configuration error (exit 2) naming the flag.
    let out = ebb(&["publish", "--amqp", "amqp://[bad", "orders", "x"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not an AMQP URL"), "{err}");
    let out = ebb(&[
        "connector",
        "amqp",
        "--functions",
        env.stack_path().to_str().expect("path"),
        "--url",
        "amqp://[bad",
        "--admin-addr",
        "127.0.0.1:0",
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--url") && err.contains("not an AMQP URL"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_queue_is_reported_and_the_other_functions_served() {
    let env = Env::start().await;
    let (f, g) = (Sink::start().await, Sink::start().await);
    env.write_stack(&[
        func("f", &f.url(), &[]).set("queue", "not-yet"),
        func("g", &g.url(), &["jobs"]),
    ]);
    let mut connector = env.connector(&[]).await;
    connector
        .child
        .wait_for_output("queue not-yet of default/f", DELIVERY)
        .await;
    env.publish("jobs", "g-1", b"g").await;
    g.wait_for_calls(1, DELIVERY).await;

    // Once the queue exists, the next retry consumes it.
    within(
        STEP,
        "declare",
        env.channel.queue_declare(
            "not-yet".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare not-yet");
    env.publish_to("", "not-yet", BasicProperties::default(), b"f")
        .await;
    f.wait_for_calls(1, Duration::from_secs(30)).await;
    env.wait_ready_count("not-yet", Some(0), DELIVERY).await;
}

#[tokio::test]
async fn the_connector_reconnects_after_the_broker_closes_its_connection() {
    let env = Env::start().await;
    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &["jobs"])]);
    let _connector = env.connector(&[]).await;
    env.publish("jobs", "before", b"1").await;
    f.wait_for_calls(1, DELIVERY).await;
    env.vhost.close_connections("ebb-connector-amqp").await;

    // Published while it reconnects: the queue keeps it.
    env.publish("jobs", "after", b"2").await;
    f.wait_for_calls(2, Duration::from_secs(30)).await;
    env.wait_ready_count("ebb-default-f", Some(0), DELIVERY)
        .await;
    let ids: Vec<String> = f
        .calls()
        .iter()
        .filter_map(|c| c.header("ce-id").map(str::to_owned))
        .collect();
    assert_eq!(ids, ["before", "after"]);
}

#[tokio::test]
async fn a_closed_connection_frees_its_deliveries_at_once_and_the_message_comes_again() {
    let env = Env::start().await;
    // The first call is slow (longer than finding the connection to close
    // takes: the management API lists it after a few seconds) and then
    // fails; later ones succeed.
    let f = Sink::builder()
        .reply(Reply::status(500).delay(Duration::from_secs(40)))
        .otherwise(Reply::ok())
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"])]);
    let connector = env.connector(&[]).await;
    env.publish("jobs", "slow-1", b"1").await;
    f.wait_until(DELIVERY, "the slow call", |s| s.inflight() == 1)
        .await;

    env.vhost.close_connections("ebb-connector-amqp").await;
    let closed = Instant::now();
    // Its delivery ended with the channel (its call cut, its slot freed, no
    // outcome sent to a closed channel), not when the call would answer.
    connector
        .wait_metric(r#"ebb_delivery_inflight{function="default/f"}"#, 0.0)
        .await;
    assert!(
        closed.elapsed() < Duration::from_secs(20),
        "freed only after {:?}",
        closed.elapsed()
    );

    // The broker gave the message back: delivered after the reconnect.
    f.wait_for_calls(2, Duration::from_secs(30)).await;
    connector
        .wait_metric(
            r#"ebb_deliveries_total{function="default/f",outcome="delivered"}"#,
            1.0,
        )
        .await;
    let calls = f.calls();
    assert_eq!(calls[1].header("ce-id"), Some("slow-1"));
    env.wait_ready_count("ebb-default-f", Some(0), DELIVERY)
        .await;
    assert_eq!(
        env.ready("ebb-dead-default-f").await,
        Some(0),
        "nothing dead-lettered"
    );
}

#[tokio::test]
async fn a_message_retried_past_max_unacked_is_requeued_with_its_attempt_count() {
    let env = Env::start().await;
    // Two failures asking for a 3 s pause each, then success.
    let f = Sink::builder()
        .replies([
            Reply::status(503).header("retry-after", "3"),
            Reply::status(503).header("retry-after", "3"),
        ])
        .otherwise(Reply::ok())
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"]).set("max-attempts", "5")]);
    let _connector = env.connector(&["--max-unacked", "2s"]).await;
    env.publish("jobs", "retry-1", b"payload").await;
    f.wait_for_calls(3, DELIVERY).await;
    let calls = f.calls();
    let attempts: Vec<u32> = calls.iter().map(|c| c.attempt()).collect();
    assert_eq!(attempts, [1, 2, 3], "the attempt count survives a requeue");
    for c in &calls {
        assert_eq!(c.header("ce-id"), Some("retry-1"));
        assert_eq!(c.header("ce-type"), Some("io.ebb.amqp.message"));
        assert_eq!(c.body.as_ref(), b"payload");
        assert!(
            c.header("ebb-retry-at").is_none() && c.header("ebb-topic").is_none(),
            "ebb's own headers stay with ebb"
        );
    }
    // The pause was kept across the requeue.
    assert!(
        calls[1].at - calls[0].at >= Duration::from_millis(2900),
        "{:?}",
        calls[1].at - calls[0].at
    );
    env.wait_ready_count("ebb-default-f", Some(0), DELIVERY)
        .await;
}
