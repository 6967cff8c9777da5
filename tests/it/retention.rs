//! What operators do to a function never loses its messages, on each broker:
//! an edit that breaks its settings keeps it served on its last valid ones;
//! a removed function keeps its consumer or queue (and what is published
//! meanwhile) for `--retain-removed`, and resumes where it left off when it
//! comes back; once the retention passed, what it still held is moved to
//! its dead-letter destination with reason `function removed`, and then its
//! consumer or queue is deleted.
//!
//! The function's replica is "down" while nothing listens on its URL: the
//! connector holds its events (no attempt spent) until it answers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::connector_reload::{Broker, FUNCTION, TOPIC, metric};
use crate::support::connector::{func, stack_yaml, wait_ready, write_stack};
use crate::support::sink::Sink;
use crate::support::{ChildGuard, ebb_command, free_port, within};
use futures::StreamExt;
use lapin::options::BasicGetOptions;
use tempfile::TempDir;
use tokio::time::Instant;

const STEP: Duration = Duration::from_secs(10);
const READY: Duration = Duration::from_secs(30);
const DELIVERY: Duration = Duration::from_secs(60);
const RELOAD: &str = "200ms";
const CONFIG_ERRORS: &str = "ebb_function_config_errors";
const SERVED: &str = "ebb_functions";
const STARTS: &str = "ebb_consumer_starts_total{function=\"default/slow\"}";
/// The default dead-letter destination of [`FUNCTION`].
const DEAD_SUBJECT: &str = "ebb.dead.default.slow";
const DEAD_QUEUE: &str = "ebb-dead-default-slow";
const DURABLE: &str = "ebb-default-slow";

impl Broker {
    /// Dead letters in the function's default destination: body and reason.
    async fn dead_letters(&self) -> Vec<(String, String)> {
        match self {
            Self::Nats { js, .. } => {
                let Ok(stream) = js.get_stream("EBB_DEAD").await else {
                    return Vec::new();
                };
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::Config {
                        filter_subject: DEAD_SUBJECT.into(),
                        ..Default::default()
                    })
                    .await
                    .expect("an ephemeral consumer on EBB_DEAD");
                let mut batch = consumer
                    .fetch()
                    .max_messages(1000)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .expect("fetch dead letters");
                let mut out = Vec::new();
                while let Some(Ok(m)) = batch.next().await {
                    let reason = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("ebb-dead-letter-reason"))
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    out.push((String::from_utf8_lossy(&m.payload).into_owned(), reason));
                }
                out
            }
            Self::Amqp { vhost, .. } => {
                let (_conn, ch) = vhost.channel(false).await;
                let mut out = Vec::new();
                while let Ok(Some(m)) = ch
                    .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
                    .await
                {
                    let reason = m
                        .delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|h| h.inner().get("ebb-dead-letter-reason"))
                        .and_then(|v| v.as_long_string())
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    out.push((
                        String::from_utf8_lossy(&m.delivery.data).into_owned(),
                        reason,
                    ));
                }
                out
            }
            Self::Kafka { .. } => unreachable!("Kafka's retention is not covered here yet"),
        }
    }

    /// Whether the function's consumer (JetStream) or queue (RabbitMQ) exists.
    async fn consumer_exists(&self) -> bool {
        match self {
            Self::Nats { js, .. } => match js.get_stream("EBB").await {
                Ok(stream) => stream.consumer_info(DURABLE).await.is_ok(),
                Err(_) => false,
            },
            Self::Amqp { vhost, .. } => vhost.queue_info(DURABLE).await.is_some(),
            Self::Kafka { .. } => unreachable!("Kafka's retention is not covered here yet"),
        }
    }
}

struct Connector {
    child: ChildGuard,
    admin: String,
}

impl Connector {
    async fn start(broker: &Broker, stack: &Path, retain: &str) -> Self {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.arg("connector")
            .args(broker.connector_args())
            .arg("--functions")
            .arg(stack)
            .args(["--admin-addr", &admin, "--reload-interval", RELOAD])
            .args(["--retain-removed", retain])
            .args(["--retry-base-delay", "50ms", "--retry-max-delay", "200ms"]);
        let mut child = ChildGuard::spawn("connector", &mut cmd);
        wait_ready(&mut child, &admin, READY).await;
        Self { child, admin }
    }

    async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + STEP;
        loop {
            let got = metric(&self.admin, name).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {got:?}, not {want}; connector output:\n{}",
                self.child.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn stack(broker: &Broker, url: &str, extra: &[(&str, &str)]) -> String {
    let mut f = broker.settings(func(FUNCTION, url, &[TOPIC]));
    for (k, v) in extra {
        f = f.set(k, v);
    }
    stack_yaml(&[f])
}

/// Bodies the sink received, each once.
fn received(sink: &Sink) -> HashSet<String> {
    sink.calls().iter().map(|c| c.text()).collect()
}

async fn wait_received(sink: &Sink, bodies: &HashSet<String>) {
    let deadline = Instant::now() + DELIVERY;
    loop {
        let got = received(sink);
        if bodies.is_subset(&got) {
            return;
        }
        let missing: Vec<_> = bodies.difference(&got).take(5).collect();
        assert!(
            Instant::now() < deadline,
            "never delivered (first of {}): {missing:?}",
            bodies.len() - bodies.intersection(&got).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_all(broker: &Broker, prefix: &str, n: usize) -> HashSet<String> {
    let mut bodies = HashSet::new();
    for i in 0..n {
        let body = format!("{prefix}-{i}");
        broker.publish(&body).await;
        bodies.insert(body);
    }
    bodies
}

fn temp_stack() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("ebb-test-retention-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("stack.yaml");
    (dir, path)
}

/// Acceptance: a broken edit, a fix, a removal and a return lose nothing.
async fn edits_and_removals_lose_nothing(broker: Broker) {
    let (_dir, path) = temp_stack();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    write_stack(&path, &stack(&broker, &url, &[]));
    let connector = Connector::start(&broker, &path, "1h").await;

    // 100 events while the replica is down: held.
    let mut all = publish_all(&broker, "a", 100).await;

    // A typo: reported, and the function keeps its consumer.
    write_stack(&path, &stack(&broker, &url, &[("max-replicas", "ten")]));
    connector.wait_metric(CONFIG_ERRORS, 1.0).await;
    connector.wait_metric(SERVED, 1.0).await;
    write_stack(&path, &stack(&broker, &url, &[("max-replicas", "3")]));
    connector.wait_metric(CONFIG_ERRORS, 0.0).await;
    assert_eq!(metric(&connector.admin, STARTS).await, Some(1.0));

    // The replica comes up: every event arrives.
    let sink = Sink::builder().port(port).start().await;
    wait_received(&sink, &all).await;

    // Removed: 50 more published meanwhile; back within the retention.
    write_stack(&path, "functions: []\n");
    connector.wait_metric(SERVED, 0.0).await;
    // Its consumer has stopped taking once nothing more is called.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sink.count();
    let more = publish_all(&broker, "b", 50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.count(), before, "a removed function is not called");
    assert!(broker.consumer_exists().await, "kept while retained");
    write_stack(&path, &stack(&broker, &url, &[]));
    all.extend(more);
    wait_received(&sink, &all).await;
    assert_eq!(received(&sink).len(), 150);
    assert!(broker.dead_letters().await.is_empty());
}

/// Acceptance: once the retention passed, what a removed function held is
/// in its dead letters, and then its consumer or queue is gone.
async fn after_the_retention_what_was_held_is_dead_lettered(broker: Broker) {
    let (_dir, path) = temp_stack();
    // Nothing listens: every event is held.
    let url = format!("http://127.0.0.1:{}", free_port());
    write_stack(&path, &stack(&broker, &url, &[]));
    let connector = Connector::start(&broker, &path, "2s").await;
    let held = publish_all(&broker, "c", 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    write_stack(&path, "functions: []\n");
    connector.wait_metric(SERVED, 0.0).await;
    let deadline = Instant::now() + DELIVERY;
    let dead = loop {
        if !broker.consumer_exists().await {
            break broker.dead_letters().await;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer was never expired; connector output:\n{}",
            connector.child.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let bodies: HashSet<String> = dead.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(bodies, held, "every held event is a dead letter");
    assert_eq!(dead.len(), held.len(), "each once");
    assert!(
        dead.iter().all(|(_, reason)| reason == "function removed"),
        "{dead:?}"
    );
    within(STEP, "stop", async {
        let mut child = connector.child;
        child.terminate(Duration::from_secs(10)).await
    })
    .await;
}

#[tokio::test]
async fn nats_edits_and_removals_lose_nothing() {
    edits_and_removals_lose_nothing(Broker::nats().await).await;
}

#[tokio::test]
async fn amqp_edits_and_removals_lose_nothing() {
    edits_and_removals_lose_nothing(Broker::amqp().await).await;
}

#[tokio::test]
async fn nats_after_the_retention_what_was_held_is_dead_lettered() {
    after_the_retention_what_was_held_is_dead_lettered(Broker::nats().await).await;
}

#[tokio::test]
async fn amqp_after_the_retention_what_was_held_is_dead_lettered() {
    after_the_retention_what_was_held_is_dead_lettered(Broker::amqp().await).await;
}
