//! Benchmark of `ebb connector amqp` (ignored by default; run it explicitly):
//!
//! ```sh
//! cargo test --release --test it bench_amqp:: -- --ignored --nocapture
//! EBB_BENCH_COUNT=100000 cargo test --release --test it bench_amqp:: -- --ignored --nocapture
//! ```
//!
//! A RabbitMQ node of its own (the tests' shared node, a fresh vhost), a
//! function that answers 200 at once (an HTTP server in this process) and
//! the connector with `max-inflight: 256`. The connector starts once to
//! declare and bind its queue and stops; `EBB_BENCH_COUNT` (50 000) messages
//! of 1 KiB are published with confirms; the connector starts again and the
//! run is timed until every message was delivered and acked (the function
//! counted them all and the queue is empty). Printed: messages/s, the
//! connector's CPU per message (`/proc/PID/stat`), its RSS idle and its
//! peak under load. RabbitMQ, the function, this process and the connector
//! share the machine's cores.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::connector::wait_ready;
use crate::support::proc_stat::{clock_ticks_per_second, cpu_ticks, status_mib};
use crate::support::{ChildGuard, RabbitMq, ebb_command, free_port, within};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use nix::sys::signal::Signal;
use tokio::time::Instant;

/// Bound of a connector start.
const READY: Duration = Duration::from_secs(30);

async fn ready_messages(url: &str, queue: &str) -> u32 {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

fn start_connector(stack: &std::path::Path, url: &str, admin: &str) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["connector", "amqp", "--functions"])
        .arg(stack)
        .args(["--url", url, "--admin-addr", admin])
        .env("EBB_LOG", "warn");
    ChildGuard::spawn("connector", &mut cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn amqp_connector_throughput() {
    let count: u64 = std::env::var("EBB_BENCH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let vhost = RabbitMq::shared().await.vhost().await;

    // The function: 200 at once, counting calls and distinct messages
    // (at-least-once: a call whose answer was lost is made again).
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
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: bench\n    url: http://127.0.0.1:{port}\n    topics: [bench.msgs]\n    max-inflight: 256\n"
        ),
    )
    .expect("stack");
    let admin = format!("127.0.0.1:{}", free_port());

    // 1. Queue declared and bound; connector down; backlog published.
    let mut first = start_connector(&stack, vhost.url(), &admin);
    wait_ready(&mut first, &admin, READY).await;
    first.signal(Signal::SIGTERM);
    first.wait(Duration::from_secs(15)).await;
    drop(first);
    let conn = Connection::connect(vhost.url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = vec![b'x'; 1024];
    let published = Instant::now();
    for i in 0..count {
        ch.basic_publish(
            "ebb".into(),
            "bench.msgs".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(i.to_string().as_str().into()),
        )
        .await
        .expect("publish");
    }
    within(Duration::from_secs(120), "confirms", ch.wait_for_confirms())
        .await
        .expect("confirmed");
    println!(
        "published {count} messages of 1 KiB in {:.1?}",
        published.elapsed()
    );
    assert_eq!(
        ready_messages(vhost.url(), "ebb-default-bench").await as u64,
        count
    );

    // 2. The drain.
    let mut second = start_connector(&stack, vhost.url(), &admin);
    let pid = second.pid();
    wait_ready(&mut second, &admin, READY).await;
    let started = Instant::now();
    let cpu0 = cpu_ticks(pid);
    let mut peak = status_mib(pid, "VmRSS");
    let deadline = started + Duration::from_secs(300);
    let distinct = || seen.lock().expect("lock").len() as u64;
    while distinct() < count {
        assert!(Instant::now() < deadline, "not drained within 300s");
        peak = peak.max(status_mib(pid, "VmRSS"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Acked, too: nothing comes back to the queue.
    let secs = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / clock_ticks_per_second();
    second.signal(Signal::SIGTERM);
    let status = second.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(ready_messages(vhost.url(), "ebb-default-bench").await, 0);

    // 3. Idle RSS of a fresh connector.
    let mut third = start_connector(&stack, vhost.url(), &admin);
    wait_ready(&mut third, &admin, READY).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = status_mib(third.pid(), "VmRSS");
    drop(third);

    println!(
        "amqp connector: {count} messages delivered and acked in {secs:.2}s = {:.0} msg/s; \
         connector CPU {:.1} µs/message; RSS idle {idle:.1} MiB, peak under load {peak:.1} MiB \
         ({} calls for {} messages)",
        count as f64 / secs,
        cpu * 1e6 / count as f64,
        calls.load(Ordering::Relaxed),
        distinct()
    );
}
