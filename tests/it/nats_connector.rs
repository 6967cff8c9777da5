//! End-to-end tests of `ebb connector nats`: a real `nats-server -js` and a
//! real connector process per test, functions played by [`Sink`]s in the test
//! process, the autoscaler by a [`FakeAutoscaler`].
//!
//! Each test writes its own stack file into a temp dir, starts the connector
//! on it and waits until it is ready (`GET /_/ready` is 200 and the durable
//! consumers exist) before publishing, as consumers start with new messages.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::support::connector::{Func, func, stack_yaml, wait_ready, write_stack};
use crate::support::sink::{Call, FakeAutoscaler, Reply, Sink};
use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, http, within};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::time::Instant;

/// Bound of one broker round trip.
const STEP: Duration = Duration::from_secs(10);
/// Bound of a connector start.
const READY: Duration = Duration::from_secs(30);
/// Bound of "the event reaches the function" for a handful of events.
const DELIVERY: Duration = Duration::from_secs(15);

const STREAM: &str = "EBB";
const DEAD_STREAM: &str = "EBB_DEAD";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A test's nats-server, temp dir (stack file) and JetStream client.
struct Env {
    nats: NatsServer,
    dir: TempDir,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Env {
    async fn start() -> Self {
        let nats = NatsServer::start_local().await;
        let dir = tempfile::Builder::new()
            .prefix("ebb-test-connector-")
            .tempdir()
            .expect("temp dir");
        let client = within(STEP, "NATS connect", async_nats::connect(nats.url()))
            .await
            .expect("connect to nats-server");
        let js = jetstream::new(client.clone());
        Self {
            nats,
            dir,
            client,
            js,
        }
    }

    fn stack_path(&self) -> PathBuf {
        self.dir.path().join("stack.yaml")
    }

    /// Writes the stack file atomically (write + rename), as an editor or a
    /// ConfigMap update would, so a reload never sees half a file.
    fn write_stack(&self, funcs: &[Func]) {
        self.write_stack_text(&stack_yaml(funcs));
    }

    fn write_stack_text(&self, text: &str) {
        write_stack(&self.stack_path(), text);
    }

    /// Starts `ebb connector nats` on the stack file and waits until it is
    /// ready. `extra` flags override the defaults below.
    async fn connector(&self, extra: &[&str]) -> Connector {
        let mut c = self.spawn_connector(extra);
        c.wait_ready().await;
        c
    }

    fn spawn_connector(&self, extra: &[&str]) -> Connector {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.args(["connector", "nats", "--functions"])
            .arg(self.stack_path())
            .args(["--url", self.nats.url(), "--admin-addr", &admin]);
        for (flag, value) in [
            ("--retry-base-delay", "50ms"),
            ("--retry-max-delay", "200ms"),
            ("--drain-timeout", "10s"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra);
        Connector {
            child: ChildGuard::spawn("connector", &mut cmd),
            admin,
        }
    }

    async fn stream(&self, name: &str) -> stream::Stream {
        within(STEP, "get stream", self.js.get_stream(name))
            .await
            .unwrap_or_else(|err| panic!("stream {name}: {err}"))
    }

    async fn stream_messages(&self, name: &str) -> u64 {
        let mut s = self.stream(name).await;
        within(STEP, "stream info", s.info())
            .await
            .unwrap_or_else(|err| panic!("stream info {name}: {err}"))
            .state
            .messages
    }

    /// The durable consumer of stack function `function` (`ebb-default-NAME`).
    async fn consumer(&self, function: &str) -> Result<consumer::Info, String> {
        let durable = format!("ebb-default-{function}");
        let s = self.stream(STREAM).await;
        within(STEP, "consumer info", s.consumer_info(&durable))
            .await
            .map_err(|err| format!("consumer {durable}: {err}"))
    }

    async fn consumer_info(&self, function: &str) -> consumer::Info {
        self.consumer(function)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits until the durable consumer of each function exists.
    async fn wait_consumers(&self, functions: &[&str]) {
        for f in functions {
            wait_until(READY, &format!("consumer of {f}"), || async {
                self.consumer(f).await.is_ok()
            })
            .await;
        }
    }

    /// Waits until the consumer of `function` acked everything it got.
    async fn wait_all_acked(&self, function: &str, limit: Duration) {
        wait_until(limit, &format!("{function} to ack everything"), || async {
            let info = self.consumer_info(function).await;
            info.num_ack_pending == 0 && info.num_pending == 0
        })
        .await;
    }

    /// Publishes one message through JetStream; returns its stream sequence.
    async fn publish(&self, topic: &str, body: impl Into<Bytes>) -> u64 {
        self.publish_with_headers(topic, async_nats::HeaderMap::new(), body)
            .await
    }

    async fn publish_with_headers(
        &self,
        topic: &str,
        headers: async_nats::HeaderMap,
        body: impl Into<Bytes>,
    ) -> u64 {
        let ack = within(
            STEP,
            "publish",
            self.js
                .publish_with_headers(topic.to_owned(), headers, body.into()),
        )
        .await
        .unwrap_or_else(|err| panic!("publish to {topic}: {err}"));
        within(STEP, "publish ack", ack)
            .await
            .unwrap_or_else(|err| panic!("no stream stored the message on {topic}: {err}"))
            .sequence
    }

    /// Publishes many messages, awaiting their acks in batches; returns the
    /// stream sequence of each, in order.
    async fn publish_many(
        &self,
        messages: Vec<(String, async_nats::HeaderMap, Bytes)>,
    ) -> Vec<u64> {
        let mut sequences = Vec::with_capacity(messages.len());
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let mut acks = Vec::new();
            for (topic, headers, body) in messages.by_ref().take(500) {
                let ack = within(
                    STEP,
                    "publish",
                    self.js.publish_with_headers(topic.clone(), headers, body),
                )
                .await
                .unwrap_or_else(|err| panic!("publish to {topic}: {err}"));
                acks.push(ack);
            }
            for ack in within(
                STEP,
                "publish acks",
                futures::future::join_all(
                    acks.into_iter().map(std::future::IntoFuture::into_future),
                ),
            )
            .await
            {
                sequences.push(ack.expect("stream stored the message").sequence);
            }
        }
        sequences
    }

    /// The last dead letter on `subject`, waiting for it to arrive.
    async fn wait_dead_letter(&self, subject: &str) -> jetstream::message::StreamMessage {
        let s = self.stream_wait(DEAD_STREAM).await;
        let deadline = Instant::now() + DELIVERY;
        loop {
            match s.get_last_raw_message_by_subject(subject).await {
                Ok(m) => return m,
                Err(err) if Instant::now() >= deadline => {
                    panic!(
                        "no dead letter on {subject} in {DEAD_STREAM} within {DELIVERY:?}: {err}"
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn stream_wait(&self, name: &str) -> stream::Stream {
        let deadline = Instant::now() + READY;
        loop {
            match self.js.get_stream(name).await {
                Ok(s) => return s,
                Err(err) if Instant::now() >= deadline => panic!("no stream {name}: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// A running `ebb connector nats`.
struct Connector {
    child: ChildGuard,
    admin: String,
}

impl Connector {
    async fn wait_ready(&mut self) {
        wait_ready(&mut self.child, &self.admin, READY).await;
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        http::request(hyper::Method::GET, &url, None, None, STEP)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .text()
    }

    /// The value of one series, e.g. `ebb_deliveries_total{function="default/f",outcome="dropped"}`.
    async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = Instant::now() + DELIVERY;
        loop {
            let text = self.metrics().await;
            if metric_value(&text, series) == Some(want) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{series} did not become {want} within {DELIVERY:?}; /metrics:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `check` every 20 ms until it holds; panics after `limit`.
async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn headers(pairs: &[(&str, &str)]) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for (name, value) in pairs {
        h.insert(*name, *value);
    }
    h
}

/// A header of a stored NATS message, as text.
fn nats_header(m: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_owned())
}

/// `ce-time` of a call, parsed (RFC 3339).
fn ce_time(call: &Call) -> chrono::DateTime<chrono::Utc> {
    let raw = call.header("ce-time").expect("ce-time");
    chrono::DateTime::parse_from_rfc3339(raw)
        .unwrap_or_else(|err| panic!("ce-time {raw:?} is not RFC 3339: {err}"))
        .with_timezone(&chrono::Utc)
}

fn attempts(calls: &[Call]) -> Vec<u32> {
    calls.iter().map(Call::attempt).collect()
}

/// Distinct bodies a sink received and how many calls repeated one.
fn distinct_and_duplicates(sink: &Sink) -> (HashSet<Bytes>, usize) {
    sink.with_calls(|calls| {
        let distinct: HashSet<Bytes> = calls.iter().map(|c| c.body.clone()).collect();
        let duplicates = calls.len() - distinct.len();
        (distinct, duplicates)
    })
}

// ---------------------------------------------------------------------------
// 1. Fan-out: every message to every subscribed function, exactly once
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delivers_every_message_once_to_each_subscribed_function() {
    const PER_TOPIC: usize = 5_000;
    let env = Env::start().await;
    let (a, b, c) = (
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    );
    // a and b share `orders`; c takes `pay.*`.
    env.write_stack(&[
        func("a", &a.url(), &["orders"]),
        func("b", &b.url(), &["orders"]),
        func("c", &c.url(), &["pay.*"]),
    ]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["a", "b", "c"]).await;

    let started = Instant::now();
    let mut messages = Vec::with_capacity(2 * PER_TOPIC);
    for i in 0..PER_TOPIC {
        for topic in ["orders", "pay.eu"] {
            let body = Bytes::from(format!("{topic}#{i}"));
            let h = headers(&[("x-order", &i.to_string())]);
            messages.push((topic.to_owned(), h, body));
        }
    }
    let published_from = chrono::Utc::now();
    let sequences = env.publish_many(messages.clone()).await;
    let published_until = chrono::Utc::now();
    println!(
        "published {} messages in {:?}",
        sequences.len(),
        started.elapsed()
    );
    // body → (topic, sequence, i)
    let expected: HashMap<Bytes, (String, u64, usize)> = messages
        .iter()
        .zip(&sequences)
        .enumerate()
        .map(|(n, ((topic, _, body), seq))| (body.clone(), (topic.clone(), *seq, n / 2)))
        .collect();
    assert_eq!(
        sequences.iter().collect::<HashSet<_>>().len(),
        2 * PER_TOPIC
    );

    let limit = Duration::from_secs(90);
    for (name, sink) in [("a", &a), ("b", &b), ("c", &c)] {
        sink.wait_for_calls(PER_TOPIC, limit).await;
        env.wait_all_acked(name, limit).await;
    }
    println!(
        "delivered {} calls in {:?}",
        a.count() + b.count() + c.count(),
        started.elapsed()
    );
    // Everything is acked, so nothing more can come: the counts are final.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.stream_messages(STREAM).await, 0, "all acked by all");

    for (name, sink, topic) in [
        ("a", &a, "orders"),
        ("b", &b, "orders"),
        ("c", &c, "pay.eu"),
    ] {
        let calls = sink.calls();
        assert_eq!(calls.len(), PER_TOPIC, "{name}: one call per message");
        let mut bodies = HashSet::new();
        let mut ids = HashSet::new();
        for call in &calls {
            let (want_topic, seq, i) = expected
                .get(&call.body)
                .unwrap_or_else(|| panic!("{name} got an unknown body {:?}", call.text()));
            assert_eq!(want_topic, topic, "{name} got a message of another topic");
            assert_eq!(call.header("ce-id"), Some(seq.to_string().as_str()));
            assert_eq!(call.header("ce-subject"), Some(topic));
            assert_eq!(call.header("x-topic"), Some(topic));
            assert_eq!(call.header("ebb-attempt"), Some("1"));
            assert_eq!(call.header("x-order"), Some(i.to_string().as_str()));
            bodies.insert(call.body.clone());
            ids.insert(call.header("ce-id").map(str::to_owned));
        }
        assert_eq!(bodies.len(), PER_TOPIC, "{name}: each message exactly once");
        assert_eq!(ids.len(), PER_TOPIC, "{name}: ce-id unique per message");

        // A sample, every header checked.
        for call in [&calls[0], &calls[PER_TOPIC / 2], &calls[PER_TOPIC - 1]] {
            let (_, seq, i) = &expected[&call.body];
            assert_eq!(call.method, hyper::Method::POST);
            assert_eq!(call.header("ce-specversion"), Some("1.0"));
            assert_eq!(call.header("ce-id"), Some(seq.to_string().as_str()));
            assert_eq!(call.header("ce-source"), Some("/ebb/nats/EBB"));
            assert_eq!(call.header("ce-type"), Some("io.ebb.nats.message"));
            assert_eq!(call.header("ce-subject"), Some(topic));
            assert_eq!(call.header("x-topic"), Some(topic));
            assert_eq!(call.header("ebb-attempt"), Some("1"));
            assert_eq!(call.header("x-order"), Some(i.to_string().as_str()));
            // When the event entered the stream: while the test published.
            // (Test 2 compares it with the stored message's time exactly.)
            let ce_time = ce_time(call);
            assert!(
                published_from - chrono::TimeDelta::milliseconds(1) <= ce_time
                    && ce_time <= published_until,
                "ce-time {ce_time} is outside the publishing window {published_from} … {published_until}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Retries, ack only after success
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retries_failed_calls_and_acks_only_after_success() {
    let env = Env::start().await;
    // The successful third call takes a moment, so the test can look at the
    // consumer while the event is still unacked.
    let f = Sink::builder()
        .replies([
            Reply::status(500).body("boom"),
            Reply::status(500).body("boom"),
        ])
        .otherwise(Reply::ok().delay(Duration::from_millis(1_500)))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"]).set("max-attempts", "5")]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    let seq = env.publish("jobs", "job-1").await;
    f.wait_for_calls(3, DELIVERY).await;
    // Two failures and a call in flight: not acked.
    let info = env.consumer_info("f").await;
    assert_eq!(info.num_ack_pending, 1, "unacked while failing: {info:?}");
    assert_eq!(env.stream_messages(STREAM).await, 1);
    let stored = within(
        STEP,
        "get message",
        env.stream(STREAM).await.get_raw_message(seq),
    )
    .await
    .expect("the unacked message is still stored")
    .time;

    f.wait_until(DELIVERY, "the third call answered", |s| s.completed() >= 3)
        .await;
    env.wait_all_acked("f", DELIVERY).await;
    assert_eq!(env.stream_messages(STREAM).await, 0, "acked after the 200");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = f.calls();
    assert_eq!(attempts(&calls), [1, 2, 3], "ebb-attempt per call");
    for call in &calls {
        assert_eq!(call.body, "job-1");
        assert_eq!(call.header("ce-id"), Some(seq.to_string().as_str()));
        // When the event entered the stream, the same on every redelivery
        // (ce-time has millisecond precision).
        let skew = (ce_time(call) - stored).num_microseconds().map(i64::abs);
        assert!(
            skew.is_some_and(|us| us < 1_000),
            "ce-time {} is not the stream time {stored}",
            ce_time(call)
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Dead letters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_400_is_dead_lettered_at_once_with_the_reason() {
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::status(400).body("invalid order\n"))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["orders"])
        .set("max-attempts", "5")
        .set("dead-letter", "dead.f")]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;
    // A plain subscriber sees dead letters too.
    let mut plain = within(STEP, "subscribe", env.client.subscribe("dead.>"))
        .await
        .expect("subscribe");
    within(STEP, "flush", env.client.flush())
        .await
        .expect("flush");

    let body: &[u8] = b"{\"id\":7}";
    let seq = env
        .publish_with_headers(
            "orders",
            headers(&[("x-order", "7"), ("content-type", "application/json")]),
            body,
        )
        .await;
    let dead = env.wait_dead_letter("dead.f").await;
    assert_eq!(dead.payload, body, "original payload");
    let h = |name| nats_header(&dead, name);
    assert_eq!(h("ebb-dead-letter-reason").as_deref(), Some("status 400"));
    assert_eq!(h("ebb-attempts").as_deref(), Some("1"));
    assert_eq!(h("ebb-last-status").as_deref(), Some("400"));
    assert_eq!(h("ebb-original-topic").as_deref(), Some("orders"));
    assert_eq!(
        h("ebb-source-position"),
        Some(format!("stream EBB sequence {seq}"))
    );
    assert_eq!(
        h("ebb-last-response").as_deref(),
        Some("invalid order\\x0A")
    );
    assert_eq!(h("x-order").as_deref(), Some("7"), "original headers kept");
    assert_eq!(h("content-type").as_deref(), Some("application/json"));

    let seen = within(STEP, "plain subscriber", plain.next())
        .await
        .expect("a dead letter");
    assert_eq!(seen.subject.as_str(), "dead.f");
    assert_eq!(seen.payload, body);

    env.wait_all_acked("f", DELIVERY).await;
    assert_eq!(env.stream_messages(STREAM).await, 0, "terminated");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.count(), 1, "a 400 is not retried");
    assert_eq!(env.stream_messages(DEAD_STREAM).await, 1);
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_after_max_attempts() {
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::status(500).body("boom"))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["orders"])
        .set("max-attempts", "3")
        .set("dead-letter", "dead.f")]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    let seq = env.publish("orders", "order-9").await;
    let dead = env.wait_dead_letter("dead.f").await;
    assert_eq!(dead.payload, "order-9");
    let h = |name| nats_header(&dead, name);
    let reason = h("ebb-dead-letter-reason").unwrap_or_default();
    assert!(
        reason.starts_with("attempts exhausted"),
        "reason: {reason:?}"
    );
    assert_eq!(h("ebb-attempts").as_deref(), Some("3"));
    assert_eq!(h("ebb-last-status").as_deref(), Some("500"));
    assert_eq!(h("ebb-original-topic").as_deref(), Some("orders"));
    assert_eq!(
        h("ebb-source-position"),
        Some(format!("stream EBB sequence {seq}"))
    );
    assert_eq!(h("ebb-last-response").as_deref(), Some("boom"));

    env.wait_all_acked("f", DELIVERY).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        attempts(&f.calls()),
        [1, 2, 3],
        "exactly max-attempts calls"
    );
    assert_eq!(env.stream_messages(DEAD_STREAM).await, 1);
}

#[tokio::test]
async fn without_a_dead_letter_setting_events_go_to_the_default_destination() {
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::status(400).body("no such order"))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["orders"])]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    let seq = env.publish("orders", "order-3").await;
    let dead = env.wait_dead_letter("ebb.dead.default.f").await;
    assert_eq!(dead.payload, "order-3");
    let h = |name| nats_header(&dead, name);
    assert_eq!(h("ebb-dead-letter-reason").as_deref(), Some("status 400"));
    assert_eq!(h("ebb-attempts").as_deref(), Some("1"));
    assert_eq!(h("ebb-last-status").as_deref(), Some("400"));
    assert_eq!(h("ebb-original-topic").as_deref(), Some("orders"));
    assert_eq!(
        h("ebb-source-position"),
        Some(format!("stream EBB sequence {seq}"))
    );
    assert_eq!(h("ebb-last-response").as_deref(), Some("no such order"));
    env.wait_all_acked("f", DELIVERY).await;
    assert_eq!(env.stream_messages(DEAD_STREAM).await, 1);
    // One subject keeps every function's default dead letters.
    let subjects = env
        .stream(DEAD_STREAM)
        .await
        .cached_info()
        .config
        .subjects
        .clone();
    assert_eq!(subjects, ["ebb.dead.>"]);
}

#[tokio::test]
async fn with_dead_letter_none_a_failed_event_is_dropped_not_redelivered() {
    let env = Env::start().await;
    let f = Sink::builder().otherwise(Reply::status(400)).start().await;
    env.write_stack(&[func("f", &f.url(), &["orders"]).set("dead-letter", "none")]);
    // A short ack wait: an event left unacked would come back quickly.
    let connector = env.connector(&["--ack-wait", "1s"]).await;
    env.wait_consumers(&["f"]).await;

    env.publish("orders", "order-1").await;
    f.wait_for_calls(1, DELIVERY).await;
    connector
        .wait_metric(
            r#"ebb_deliveries_total{function="default/f",outcome="dropped"}"#,
            1.0,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(f.count(), 1, "terminated, not redelivered");
    let info = env.consumer_info("f").await;
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    assert_eq!(env.stream_messages(STREAM).await, 0);
    assert_eq!(
        connector
            .metric(r#"ebb_deliveries_total{function="default/f",outcome="dropped"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn an_existing_stream_keeps_its_limits_and_replicas() {
    let env = Env::start().await;
    let hour = Duration::from_secs(3600);
    let gib = 1 << 30;
    within(
        STEP,
        "create the stream",
        env.js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["legacy".into()],
            retention: stream::RetentionPolicy::Interest,
            max_age: hour,
            max_bytes: gib,
            num_replicas: 1,
            ..Default::default()
        }),
    )
    .await
    .expect("create the stream");
    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &["orders"])]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;
    let kept = |config: &stream::Config| {
        assert_eq!(config.max_age, hour, "{config:?}");
        assert_eq!(config.max_bytes, gib, "{config:?}");
        assert_eq!(config.num_replicas, 1, "{config:?}");
        assert_eq!(config.retention, stream::RetentionPolicy::Interest);
    };
    let config = env.stream(STREAM).await.cached_info().config.clone();
    kept(&config);
    assert_eq!(config.subjects, ["orders"], "only the subjects changed");

    // A topic added later changes the subjects again, and only them.
    env.write_stack(&[func("f", &f.url(), &["orders", "refunds"])]);
    // Published once the function's consumer takes the new topic (a message
    // no consumer is interested in is not kept by an Interest stream).
    wait_until(DELIVERY, "the new subject", || async {
        env.consumer("f")
            .await
            .is_ok_and(|c| c.config.filter_subjects.contains(&"refunds".to_owned()))
    })
    .await;
    let config = env.stream(STREAM).await.cached_info().config.clone();
    kept(&config);
    env.publish("refunds", "r-1").await;
    f.wait_for_calls(1, DELIVERY).await;
}

// ---------------------------------------------------------------------------
// 4. Retry-After
// ---------------------------------------------------------------------------

#[tokio::test]
async fn retry_after_is_honoured() {
    let env = Env::start().await;
    let f = Sink::builder()
        .reply(Reply::status(429).header("retry-after", "1"))
        .otherwise(Reply::ok())
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"])]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    env.publish("jobs", "job").await;
    f.wait_for_calls(2, DELIVERY).await;
    env.wait_all_acked("f", DELIVERY).await;
    let calls = f.calls();
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "second call {gap:?} after the first, Retry-After said 1 s"
    );
    assert!(gap < Duration::from_secs(5), "but not much later: {gap:?}");
    // A handler's own 429 is an ordinary failed attempt.
    assert_eq!(attempts(&calls), [1, 2]);
}

// ---------------------------------------------------------------------------
// 5. kill -9 of the connector
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_killed_connector_loses_nothing() {
    const N: usize = 5_000;
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_millis(2)))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["work"])]);
    // Unacked events of the killed process come back after the ack wait.
    let args = ["--ack-wait", "2s"];
    let mut first = env.connector(&args).await;
    env.wait_consumers(&["f"]).await;

    let messages = (0..N)
        .map(|i| {
            let body = Bytes::from(format!("work#{i}"));
            ("work".to_owned(), async_nats::HeaderMap::new(), body)
        })
        .collect();
    env.publish_many(messages).await;
    f.wait_for_calls(N / 2, Duration::from_secs(60)).await;
    first.child.signal(Signal::SIGKILL);
    first.child.wait(STEP).await;
    let at_kill = f.count();
    drop(first);

    let _second = env.connector(&args).await;
    f.wait_until(Duration::from_secs(60), "every message", |s| {
        distinct_and_duplicates(s).0.len() >= N
    })
    .await;
    env.wait_all_acked("f", Duration::from_secs(30)).await;
    let (distinct, duplicates) = distinct_and_duplicates(&f);
    for i in 0..N {
        assert!(
            distinct.contains(format!("work#{i}").as_bytes()),
            "work#{i} lost"
        );
    }
    assert_eq!(env.stream_messages(STREAM).await, 0);
    println!(
        "kill -9 after {at_kill} of {N} calls: {} calls in all, {duplicates} duplicate(s)",
        f.count()
    );
}

// ---------------------------------------------------------------------------
// 6. nats-server restart
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_connector_recovers_from_a_nats_server_restart() {
    const BEFORE: usize = 2_000;
    const AFTER: usize = 500;
    let mut env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_millis(2)))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["work"])]);
    let connector = env.connector(&["--ack-wait", "2s"]).await;
    env.wait_consumers(&["f"]).await;

    let before = (0..BEFORE)
        .map(|i| {
            let body = Bytes::from(format!("work#{i}"));
            ("work".to_owned(), async_nats::HeaderMap::new(), body)
        })
        .collect();
    env.publish_many(before).await;
    f.wait_for_calls(BEFORE / 3, Duration::from_secs(60)).await;
    env.nats.restart().await;
    let at_restart = f.count();
    // Pulls lost with the old connection must not stall delivery for long
    // (the server ends a pull after 2 s; the connector re-pulls soon after).
    let restarted = Instant::now();
    f.wait_for_calls(at_restart + 1, Duration::from_secs(5))
        .await;
    let resumed = restarted.elapsed();

    // Publish more once the server is back: the first message until the
    // test's own client has reconnected, then the rest at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = async {
            env.js
                .publish("work", Bytes::from(format!("work#{BEFORE}")))
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(STEP, sent).await {
            Ok(Ok(_)) => break,
            Ok(Err(err)) if Instant::now() < deadline => {
                eprintln!("publish after the restart: {err}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(err)) => panic!("publish after the restart: {err}"),
            Err(_) => panic!("publish after the restart took over {STEP:?}"),
        }
    }
    let after = (BEFORE + 1..BEFORE + AFTER)
        .map(|i| {
            let body = Bytes::from(format!("work#{i}"));
            ("work".to_owned(), async_nats::HeaderMap::new(), body)
        })
        .collect();
    env.publish_many(after).await;

    let all = BEFORE + AFTER;
    f.wait_until(Duration::from_secs(60), "every message", |s| {
        distinct_and_duplicates(s).0.len() >= all
    })
    .await;
    env.wait_all_acked("f", Duration::from_secs(30)).await;
    let (distinct, duplicates) = distinct_and_duplicates(&f);
    for i in 0..all {
        assert!(
            distinct.contains(format!("work#{i}").as_bytes()),
            "work#{i} lost"
        );
    }
    println!(
        "nats-server restarted after {at_restart} calls, deliveries resumed {resumed:?} later: {} calls for {all} messages, {duplicates} duplicate(s)",
        f.count()
    );
    drop(connector);
}

// ---------------------------------------------------------------------------
// 7. Function down: wake-up and hold
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_function_with_no_replica_is_woken_and_the_event_held() {
    let env = Env::start().await;
    let autoscaler = FakeAutoscaler::start().await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    env.write_stack(&[func("sleepy", &url, &["jobs"])
        .set("max-attempts", "2")
        .set("dead-letter", "dead.sleepy")]);
    let connector = env
        .connector(&["--autoscaler-url", &autoscaler.url(), "--ack-wait", "2s"])
        .await;
    env.wait_consumers(&["sleepy"]).await;

    let seq = env.publish("jobs", "wake up").await;
    let first = autoscaler
        .wait_for_wake("/wake/default/sleepy", DELIVERY)
        .await;
    // Held across more than one ack wait: not dead-lettered, not acked, and
    // woken again at most once a second.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let info = env.consumer_info("sleepy").await;
    assert_eq!(info.num_ack_pending, 1, "held, not acked: {info:?}");
    assert_eq!(info.num_redelivered, 0, "held in progress: {info:?}");
    assert_eq!(
        env.stream_messages(DEAD_STREAM).await,
        0,
        "not dead-lettered"
    );
    let wakes = autoscaler.wakes();
    assert!(
        wakes.iter().all(|w| w.path == "/wake/default/sleepy"),
        "{wakes:?}"
    );
    let span = wakes.last().map_or(Duration::ZERO, |w| w.at - first.at);
    assert!(
        wakes.len() >= 2 && wakes.len() as u128 <= span.as_millis() / 900 + 1,
        "wake-ups keep coming while held, at most one a second: {} in {span:?}",
        wakes.len()
    );
    assert!(
        connector
            .metric(r#"ebb_holds_total{function="default/sleepy",reason="no_replica"}"#)
            .await
            .is_some_and(|v| v >= 1.0)
    );

    // The function comes up where the connector expects it.
    let f = Sink::builder().port(port).start().await;
    f.wait_for_calls(1, DELIVERY).await;
    env.wait_all_acked("sleepy", DELIVERY).await;
    let calls = f.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].body, "wake up");
    assert_eq!(calls[0].header("ce-id"), Some(seq.to_string().as_str()));
    assert_eq!(calls[0].attempt(), 1, "a hold spends no attempt");
    assert_eq!(env.stream_messages(DEAD_STREAM).await, 0);
}

// ---------------------------------------------------------------------------
// 8. Concurrency limit and busy workers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn max_inflight_bounds_concurrent_calls() {
    const N: usize = 50;
    let env = Env::start().await;
    let f = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_millis(100)))
        .start()
        .await;
    env.write_stack(&[func("f", &f.url(), &["jobs"]).set("max-inflight", "4")]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    let messages = (0..N)
        .map(|i| {
            let body = Bytes::from(format!("job#{i}"));
            ("jobs".to_owned(), async_nats::HeaderMap::new(), body)
        })
        .collect();
    env.publish_many(messages).await;
    f.wait_until(Duration::from_secs(30), "every call answered", |s| {
        s.completed() >= N
    })
    .await;
    env.wait_all_acked("f", DELIVERY).await;
    assert_eq!(f.count(), N);
    assert_eq!(
        f.max_concurrent(),
        4,
        "max-inflight 4 × one replica: never more than 4 calls at once, and 4 when busy"
    );
}

#[tokio::test]
async fn busy_and_draining_workers_cost_no_attempt() {
    let env = Env::start().await;
    let f = Sink::builder()
        .replies([Reply::busy(), Reply::draining(), Reply::busy()])
        .otherwise(Reply::ok())
        .start()
        .await;
    // One attempt only: a refusal counted as an attempt would dead-letter it.
    env.write_stack(&[func("f", &f.url(), &["jobs"])
        .set("max-attempts", "1")
        .set("dead-letter", "dead.f")]);
    let connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    env.publish("jobs", "job").await;
    f.wait_for_calls(4, DELIVERY).await;
    env.wait_all_acked("f", DELIVERY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = f.calls();
    assert_eq!(attempts(&calls), [1, 1, 1, 1], "refusals are not attempts");
    assert_eq!(env.stream_messages(DEAD_STREAM).await, 0);
    connector
        .wait_metric(
            r#"ebb_deliveries_total{function="default/f",outcome="delivered"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        connector
            .metric(r#"ebb_holds_total{function="default/f",reason="busy"}"#)
            .await,
        Some(2.0)
    );
}

// ---------------------------------------------------------------------------
// 9. Live reload of the stack file
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_stack_file_change_reroutes_without_a_restart() {
    let env = Env::start().await;
    let (a, b) = (Sink::start().await, Sink::start().await);
    env.write_stack(&[func("a", &a.url(), &["t1"])]);
    let mut connector = env
        .connector(&["--reload-interval", "200ms", "--retain-removed", "1s"])
        .await;
    env.wait_consumers(&["a"]).await;
    env.publish("t1", "one").await;
    a.wait_for_calls(1, DELIVERY).await;

    // a gains t3, a new function b takes t2.
    env.write_stack(&[
        func("a", &a.url(), &["t1", "t3"]),
        func("b", &b.url(), &["t2"]),
    ]);
    wait_until(DELIVERY, "the new routing", || async {
        let (Ok(ia), Ok(_)) = (env.consumer("a").await, env.consumer("b").await) else {
            return false;
        };
        ia.config.filter_subjects.contains(&"t3".to_owned())
    })
    .await;
    env.publish("t2", "two").await;
    env.publish("t3", "three").await;
    env.publish("t1", "four").await;
    b.wait_for_calls(1, DELIVERY).await;
    a.wait_for_calls(3, DELIVERY).await;
    env.wait_all_acked("a", DELIVERY).await;
    env.wait_all_acked("b", DELIVERY).await;
    let bodies = |s: &Sink| -> Vec<String> { s.calls().iter().map(Call::text).collect() };
    let mut got_a = bodies(&a);
    got_a.sort();
    assert_eq!(got_a, ["four", "one", "three"]);
    assert_eq!(bodies(&b), ["two"]);

    // b removed again: its consumer goes once its retention passed.
    env.write_stack(&[func("a", &a.url(), &["t1", "t3"])]);
    wait_until(DELIVERY, "b's consumer to be deleted", || async {
        env.consumer("b").await.is_err()
    })
    .await;
    env.publish("t1", "five").await;
    a.wait_for_calls(4, DELIVERY).await;
    assert!(
        connector.child.try_status().is_none(),
        "the connector kept running"
    );
}

// ---------------------------------------------------------------------------
// 10. Bad inputs
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_bad_function_is_skipped_and_the_others_served() {
    let env = Env::start().await;
    let good = Sink::start().await;
    let bad = Sink::start().await;
    env.write_stack(&[
        func("good", &good.url(), &["jobs"]),
        func("bad", &bad.url(), &["other"]).set("max-replicas", "ten"),
    ]);
    let mut connector = env.connector(&[]).await;
    env.wait_consumers(&["good"]).await;
    connector.child.wait_for_output("max-replicas", STEP).await;
    let output = connector.child.output();
    let line = output
        .lines()
        .find(|l| l.contains("max-replicas"))
        .expect("a line naming the key");
    assert!(line.contains("ERROR"), "logged as an error: {line}");
    assert!(line.contains("\"bad\""), "names the function: {line}");
    assert!(line.contains("ten"), "names the value: {line}");
    assert!(env.consumer("bad").await.is_err(), "bad is not consumed");
    assert_eq!(
        connector.metric("ebb_function_config_errors").await,
        Some(1.0)
    );

    env.publish("jobs", "still served").await;
    good.wait_for_calls(1, DELIVERY).await;
    assert_eq!(good.calls()[0].body, "still served");
    assert_eq!(bad.count(), 0);
}

#[tokio::test]
async fn payloads_are_delivered_byte_for_byte() {
    let env = Env::start().await;
    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &["bin"])]);
    let _connector = env.connector(&[]).await;
    env.wait_consumers(&["f"]).await;

    // Not UTF-8.
    let odd: &[u8] = &[0xff, 0xfe, 0x00];
    env.publish("bin", odd).await;
    f.wait_for_calls(1, DELIVERY).await;
    assert_eq!(f.calls()[0].body, odd);

    // As large as the server takes: headers and payload share max_payload.
    let max = env.client.server_info().max_payload;
    assert!(max >= 1 << 20, "max_payload {max}");
    let header_block = "NATS/1.0\r\n".len() + "x-kind: big\r\n".len() + "\r\n".len();
    let big: Vec<u8> = (0..max - header_block)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let one_more = [big.as_slice(), b"!"].concat();
    assert!(
        env.js
            .publish_with_headers("bin", headers(&[("x-kind", "big")]), one_more.into())
            .await
            .is_err(),
        "one byte more is over the limit"
    );
    env.publish_with_headers("bin", headers(&[("x-kind", "big")]), big.clone())
        .await;
    f.wait_for_calls(2, DELIVERY).await;
    let call = f.calls()[1].clone();
    assert_eq!(call.body.len(), big.len());
    assert!(
        call.body == big,
        "the {}-byte payload arrived intact",
        big.len()
    );
    assert_eq!(call.header("x-kind"), Some("big"));
    env.wait_all_acked("f", DELIVERY).await;
}

#[tokio::test]
async fn a_broken_stack_file_edit_keeps_the_last_functions() {
    let env = Env::start().await;
    let f = Sink::start().await;
    env.write_stack(&[func("f", &f.url(), &["jobs"])]);
    let mut connector = env.connector(&["--reload-interval", "100ms"]).await;
    env.wait_consumers(&["f"]).await;

    // Not YAML: must not read as "no functions" (which would delete f's
    // consumer and its backlog).
    env.write_stack_text("functions:\n  - name: f\n    topics: [jobs\n");
    connector.child.wait_for_output("invalid YAML", STEP).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(env.consumer("f").await.is_ok(), "f is still consumed");
    env.publish("jobs", "after the typo").await;
    f.wait_for_calls(1, DELIVERY).await;
    assert_eq!(f.calls()[0].body, "after the typo");
    assert!(connector.child.try_status().is_none(), "still running");
}

#[tokio::test]
async fn a_stack_file_that_is_not_yaml_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stack.yaml");
    std::fs::write(&path, "functions: [\n").expect("write stack file");
    let (code, stderr) = run_connector_to_exit(&path).await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(&path.display().to_string()),
        "names the file: {stderr}"
    );
}

/// Runs a connector that is expected to refuse to start; returns its exit
/// code and stderr.
async fn run_connector_to_exit(stack: &std::path::Path) -> (Option<i32>, String) {
    let output = within(
        STEP,
        "the connector to exit",
        ebb_command()
            .args(["connector", "nats", "--functions"])
            .arg(stack)
            .args(["--url", "nats://127.0.0.1:1", "--admin-addr", "127.0.0.1:0"])
            .output(),
    )
    .await
    .expect("run ebb");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_missing_stack_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("no-such-stack.yaml");
    let (code, stderr) = run_connector_to_exit(&path).await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(&path.display().to_string()),
        "names the file: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_finishes_calls_in_flight_and_releases_held_events() {
    let env = Env::start().await;
    let slow = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_secs(2)))
        .start()
        .await;
    let down_port = free_port();
    env.write_stack(&[
        func("slow", &slow.url(), &["slow"]),
        func("down", &format!("http://127.0.0.1:{down_port}"), &["down"])
            .set("dead-letter", "dead.down"),
    ]);
    let mut connector = env.connector(&[]).await;
    env.wait_consumers(&["slow", "down"]).await;

    env.publish("slow", "in flight").await;
    let held = env.publish("down", "held").await;
    slow.wait_for_calls(1, DELIVERY).await;
    connector
        .wait_metric(r#"ebb_delivery_inflight{function="default/down"}"#, 1.0)
        .await;
    assert_eq!(slow.completed(), 0, "the slow call is still running");

    let signalled = Instant::now();
    connector.child.signal(Signal::SIGTERM);
    let status = connector.child.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit 0 after draining");
    assert_eq!(slow.completed(), 1, "the call in flight finished");
    println!("drained in {:?}", signalled.elapsed());

    let info = env.consumer_info("slow").await;
    assert_eq!(
        (info.num_ack_pending, info.num_pending),
        (0, 0),
        "the finished call was acked before exit: {info:?}"
    );
    assert_eq!(
        env.stream_messages(DEAD_STREAM).await,
        0,
        "not dead-lettered"
    );
    let stream = env.stream(STREAM).await;
    let kept = within(STEP, "get message", stream.get_raw_message(held))
        .await
        .expect("the held event is still in the stream (not acked)");
    assert_eq!(kept.payload, "held");
    drop(connector);

    // After a restart, the held event reaches the function once it is up,
    // well within the 30 s ack wait: it was given back (NAK), not left to
    // time out. (Its ebb-attempt is 2 then: JetStream counts the released
    // delivery, so the connector cannot tell it was only a hold.)
    let down = Sink::builder().port(down_port).start().await;
    let _again = env.connector(&[]).await;
    down.wait_for_calls(1, DELIVERY).await;
    env.wait_all_acked("down", DELIVERY).await;
    assert_eq!(down.calls()[0].body, "held");
    assert_eq!(
        down.calls()[0].header("ce-id"),
        Some(held.to_string().as_str())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.count(), 1, "the acked event is not delivered again");
}
