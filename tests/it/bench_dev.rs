//! Benchmarks of `ebb dev` (ignored by default; run them explicitly):
//!
//! ```sh
//! cargo test --release --test it bench_dev:: -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - `cold_start`: 100 times, a function at zero gets one event through
//!   `POST /publish`; timed from the publish until the function has it
//!   (the handler connects back to the benchmark). Between rounds the
//!   function goes back to zero (`scale-to-zero-after: 0s`).
//! - `bus_throughput`: events published by 16 concurrent HTTP clients to a
//!   warm external function (an `ebb worker --mode http` in front of a
//!   trivial HTTP server); timed until every event is delivered.
//!
//! Each prints its figures; they assert only that every event arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::support::{ChildGuard, ebb_command, free_port};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

async fn start_dev(stack: &std::path::Path, extra: &[&str]) -> (ChildGuard, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = ebb_command();
    cmd.args(["dev", "--listen", &listen])
        .args(extra)
        .arg(stack)
        .env("EBB_LOG", "warn,ebb_dev=info");
    let mut child = ChildGuard::spawn("ebb-dev", &mut cmd);
    child
        .wait_for_output("ebb dev is running", Duration::from_secs(30))
        .await;
    (child, format!("http://{listen}"))
}

async fn replicas(http: &reqwest::Client, url: &str, name: &str) -> u64 {
    let s: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{url}/_/status"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    s["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .map(|f| f["replicas"].as_u64().unwrap())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn cold_start() {
    const N: usize = 100;
    // The handler tells the benchmark it has the event by connecting to it.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = probe.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: cold\n    command: [bash, -c, \"cat >/dev/null; echo >/dev/tcp/127.0.0.1/{port}\"]\n    topics: [cold]\n    scale-to-zero-after: 0s\n"
        ),
    )
    .unwrap();
    let (mut dev, url) = start_dev(&stack, &["--interval", "100ms"]).await;
    let http = reqwest::Client::new();
    let mut took = Vec::with_capacity(N);
    for round in 0..N {
        let deadline = Instant::now() + Duration::from_secs(30);
        while replicas(&http, &url, "cold").await != 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: never back to zero"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = Instant::now();
        let r = http
            .post(format!("{url}/publish/cold"))
            .body(format!("round {round}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), probe.accept())
            .await
            .unwrap_or_else(|_| panic!("round {round}: not delivered\n{}", dev.output()))
            .unwrap();
        took.push(start.elapsed());
        let _ = s.read(&mut [0; 1]).await;
    }
    took.sort();
    println!(
        "ebb dev cold start (publish to a function at zero → handler has the event), {N} wake-ups: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        percentile(&took, 0.5),
        percentile(&took, 0.9),
        percentile(&took, 0.99),
        took[N - 1]
    );
    println!(
        "rerun: cargo test --release --test it bench_dev::cold_start -- --ignored --nocapture"
    );
    dev.signal(Signal::SIGINT);
    assert!(dev.wait(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bus_throughput() {
    const N: u64 = 20_000;
    const CLIENTS: u64 = 16;
    // A trivial HTTP function behind `ebb worker --mode http`.
    let hits = Arc::new(AtomicU64::new(0));
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::Relaxed);
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(upstream, app).await.unwrap() });
    let worker_port = free_port();
    let mut cmd = ebb_command();
    cmd.args([
        "worker",
        "--mode",
        "http",
        "--listen",
        &format!("127.0.0.1:{worker_port}"),
        "--upstream",
        &format!("http://127.0.0.1:{up_port}"),
        "--max-inflight",
        "64",
        "--",
        "sleep",
        "3600",
    ])
    .env("EBB_LOG", "warn");
    let _worker = ChildGuard::spawn("worker", &mut cmd);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http.get(format!("http://127.0.0.1:{worker_port}/_/ready")).send().await, Ok(r) if r.status().is_success())
    {
        assert!(Instant::now() < deadline, "worker not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: warm\n    url: http://127.0.0.1:{worker_port}/\n    topics: [warm]\n    max-inflight: 64\n"
        ),
    )
    .unwrap();
    let (mut dev, url) = start_dev(&stack, &[]).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let http = http.clone();
        let url = format!("{url}/publish/warm");
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while i < N {
                let r = http
                    .post(&url)
                    .body(format!("event {i}"))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 429 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue; // the bus is full: publish it again
                }
                assert_eq!(r.status(), 202);
                i += CLIENTS;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let published = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while hits.load(Ordering::Relaxed) < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} delivered",
            hits.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all = start.elapsed();
    println!(
        "ebb dev bus → warm http-mode worker: {N} events from {CLIENTS} HTTP publishers, all published in {published:?}, all delivered in {all:?}: {:.0} events/s",
        N as f64 / all.as_secs_f64()
    );
    println!(
        "rerun: cargo test --release --test it bench_dev::bus_throughput -- --ignored --nocapture"
    );
    dev.signal(Signal::SIGINT);
    assert!(dev.wait(Duration::from_secs(30)).await.success());
}
