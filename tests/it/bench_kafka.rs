//! Benchmark of `ebb connector kafka` (ignored by default; run it explicitly):
//!
//! ```sh
//! cargo test --release --test it bench_kafka:: -- --ignored --nocapture
//! EBB_BENCH_COUNT=20000 cargo test --release --test it bench_kafka:: -- --ignored --nocapture
//! cargo test --release --test it bench_kafka::mock_cluster_read_baseline -- --ignored --nocapture
//! ```
//!
//! librdkafka's mock cluster (3 brokers, in this process), a topic of 12
//! partitions, a function that answers 200 at once (an HTTP server in this
//! process) and the connector with `max-inflight: 256` and
//! `kafka-ordering: none` (and once with the default, one at a time per
//! partition). `EBB_BENCH_COUNT` (40 000) messages of 1 KiB are produced
//! first; the connector starts (`--offset-reset earliest`) and the run is
//! timed from the first delivery (the group join takes the mock ~3 s) until
//! the function has seen every message and the group has committed them all. Printed: messages/s, the connector's CPU per message
//! (`/proc/PID/stat`), its RSS peak under load. The mock cluster, the
//! function, this process and the connector share the machine's cores.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::connector::wait_ready;
use crate::support::proc_stat::{clock_ticks_per_second, cpu_ticks, status_mib};
use crate::support::{ChildGuard, KafkaMock, ebb_command, free_port};
use nix::sys::signal::Signal;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::time::Instant;

/// Bound of a connector start.
const READY: Duration = Duration::from_secs(30);

/// librdkafka's mock stops serving a partition's fetches past about 5 MB
/// (seen with a bare consumer too): 12 partitions keep 40 000 messages of
/// 1 KiB under that.
const PARTITIONS: i32 = 12;

/// Sum of the group's committed offsets over the topic's partitions.
fn committed(brokers: &str, group: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed");
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        })
        .sum()
}

async fn run(kafka: &KafkaMock, count: u64, ordering: &str) {
    let topic = format!("bench-{ordering}");
    kafka.create_topic(&topic, PARTITIONS);
    let brokers = kafka.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let body = vec![b'x'; 1024];
    let produced = Instant::now();
    let mut pending = Vec::new();
    for i in 0..count {
        let key = (i % 1000).to_string();
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&body))
                .expect("queued"),
        );
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.expect("produced").expect("delivered");
            }
        }
    }
    for d in pending.drain(..) {
        d.await.expect("produced").expect("delivered");
    }
    println!(
        "produced {count} messages of 1 KiB to {PARTITIONS} partitions in {:.1?}",
        produced.elapsed()
    );

    // The function: 200 at once, counting distinct messages.
    let calls = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let (counter, ids) = (calls.clone(), seen.clone());
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let (c, ids) = (counter.clone(), ids.clone());
        async move {
            c.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = headers.get("ce-id").and_then(|v| v.to_str().ok()) {
                ids.lock().expect("lock").insert(id.to_owned());
            }
            ""
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: bench-{ordering}\n    url: http://127.0.0.1:{port}\n    topics: [{topic}]\n    max-inflight: 256\n    kafka-ordering: {ordering}\n"
        ),
    )
    .expect("stack");
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = ebb_command();
    cmd.args(["connector", "kafka", "--functions"])
        .arg(&stack)
        .args([
            "--url",
            &brokers,
            "--admin-addr",
            &admin,
            "--offset-reset",
            "earliest",
        ])
        .env("EBB_LOG", "warn");
    let mut connector = ChildGuard::spawn("connector", &mut cmd);
    let pid = connector.pid();
    wait_ready(&mut connector, &admin, READY).await;
    let distinct = || seen.lock().expect("lock").len() as u64;
    // Timed from the first delivery: joining the group takes the mock ~3 s.
    let joining = Instant::now();
    while distinct() == 0 {
        assert!(
            joining.elapsed() < Duration::from_secs(60),
            "no delivery within 60s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let cpu0 = cpu_ticks(pid);
    let mut peak = status_mib(pid, "VmRSS");
    let group = format!("ebb-default-bench-{ordering}");
    let deadline = started + Duration::from_secs(300);
    let mut report = Instant::now();
    while distinct() < count {
        if report.elapsed() > Duration::from_secs(5) {
            report = Instant::now();
            println!("  {:.0?}: {} delivered", started.elapsed(), distinct());
        }
        assert!(
            Instant::now() < deadline,
            "not delivered within 300s ({} of {count})",
            distinct()
        );
        peak = peak.max(status_mib(pid, "VmRSS"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_secs = started.elapsed().as_secs_f64();
    while committed(&brokers, &group, &topic) < count as i64 {
        assert!(Instant::now() < deadline, "not committed within 300s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / clock_ticks_per_second();
    connector.signal(Signal::SIGTERM);
    assert_eq!(
        connector.wait(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    server.abort();
    println!(
        "kafka connector, kafka-ordering {ordering}: group joined in {:.1?}; {count} messages delivered in {delivered_secs:.2}s, \
         committed in {secs:.2}s = {:.0} msg/s; connector CPU {:.1} µs/message; RSS peak {peak:.1} MiB \
         ({} calls for {} messages)",
        started - joining,
        count as f64 / secs,
        cpu * 1e6 / count as f64,
        calls.load(Ordering::Relaxed),
        distinct()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn kafka_connector_throughput() {
    let count: u64 = std::env::var("EBB_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    let kafka = KafkaMock::new();
    run(&kafka, count, "none").await;
    run(&kafka, count, "partition").await;
}

/// What a bare consumer reads from the mock cluster a second, for scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn mock_cluster_read_baseline() {
    let count: u64 = std::env::var("EBB_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let kafka = KafkaMock::new();
    kafka.create_topic("base", PARTITIONS);
    let brokers = kafka.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let body = vec![b'x'; 1024];
    let mut pending = Vec::new();
    for i in 0..count {
        let key = (i % 1000).to_string();
        pending.push(
            producer
                .send_result(FutureRecord::to("base").key(&key).payload(&body))
                .expect("queued"),
        );
    }
    for d in pending.drain(..) {
        d.await.expect("produced").expect("delivered");
    }
    let extra = std::env::var("EBB_BENCH_QUEUED_KB").unwrap_or_else(|_| "65536".into());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "baseline")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", &extra)
        .create()
        .expect("consumer");
    consumer.subscribe(&["base"]).expect("subscribe");
    let started = Instant::now();
    let mut n = 0u64;
    let mut first = None;
    while n < count && started.elapsed() < Duration::from_secs(120) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
    }
    let from_first = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "bare consumer (queued.max.messages.kbytes {extra}): {n} of {count} in {:.2}s, {:.0} msg/s after the first",
        started.elapsed().as_secs_f64(),
        n as f64 / from_first.max(1e-9)
    );
}
