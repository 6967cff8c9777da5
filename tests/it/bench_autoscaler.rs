//! Benchmark (ignored by default; run it explicitly):
//!
//! ```sh
//! cargo test --release --test it bench_autoscaler:: -- --ignored --nocapture
//! ```
//!
//! `ebb autoscaler` (release build) with 10 000 functions at a 1 s interval:
//! the Kubernetes API double holds 10 000 Deployments, each scaled by a
//! Prometheus scrape (`ebb.io/prometheus-url`) of its own path on one local
//! stub endpoint. Every function's value already matches its replica count,
//! so this is the steady-state cost of reading and deciding, not of patching.
//!
//! After a warm-up of three polls it measures the autoscaler child process
//! for `EBB_BENCH_SECONDS` (default 30): CPU from `/proc/PID/stat` (user +
//! system), resident memory from `/proc/PID/status` (`VmRSS`, and the peak
//! `VmHWM`), reads per second at the stub and the mean poll duration. Goal
//! (issue 6): < 1 core and < 200 MiB. Set `EBB_BENCH_FUNCTIONS` to change the
//! number of functions. Asserts only that every function is read about once
//! per second.

use std::time::Duration;

use crate::autoscaler_stub::MetricsStub;
use crate::support::proc_stat::{clock_ticks_per_second, cpu_ticks, status_mib};
use crate::support::{ChildGuard, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;
use tokio::time::Instant;

fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn ten_thousand_functions_at_one_second() {
    let n = env_number("EBB_BENCH_FUNCTIONS", 10_000) as usize;
    let seconds = env_number("EBB_BENCH_SECONDS", 30);
    let api = KubeApi::start();
    let stub = MetricsStub::start();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    for i in 0..n {
        // 1 to 4 replicas, and the value that asks for exactly that many.
        let replicas = 1 + (i % 4) as i32;
        let path = format!("/metrics/f{i}");
        stub.set_gauge(&path, "queue_depth", 10.0 * f64::from(replicas));
        let url = stub.url(&path);
        api.apply_deployment(
            "default",
            &format!("f{i}"),
            &[
                ("ebb.io/prometheus-url", &url),
                ("ebb.io/prometheus-metric", "queue_depth"),
                ("ebb.io/target", "10"),
                ("ebb.io/max-replicas", "8"),
            ],
            &[],
            replicas,
        );
    }
    eprintln!(
        "{n} Deployments in the API double in {:?}",
        started.elapsed()
    );

    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args([
        "autoscaler",
        "--kubernetes",
        "--interval",
        "1s",
        "--no-leader-election",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
    .env("KUBECONFIG", api.kubeconfig(dir.path()))
    .env("EBB_LOG", "warn");
    let autoscaler = ChildGuard::spawn("autoscaler", &mut cmd);
    let pid = autoscaler.pid();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{admin}");
    within(Duration::from_secs(120), "autoscaler ready", async {
        loop {
            if let Ok(r) = client.get(format!("{base}/_/ready")).send().await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    eprintln!("autoscaler ready after {:?}", started.elapsed());
    // Warm-up: three reads of every function.
    within(Duration::from_secs(120), "three polls", async {
        while stub.requests() < 3 * n as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let ticks = clock_ticks_per_second();
    let cpu_before = cpu_ticks(pid);
    let reads_before = stub.requests();
    let window_start = Instant::now();
    let mut rss_max: f64 = 0.0;
    while window_start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(status_mib(pid, "VmRSS"));
    }
    let elapsed = window_start.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / ticks / elapsed;
    let reads = (stub.requests() - reads_before) as f64 / elapsed;
    let rss = status_mib(pid, "VmRSS");
    let hwm = status_mib(pid, "VmHWM");

    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let polls = sample(&text, "ebb_autoscaler_poll_duration_seconds_count").unwrap_or(0.0);
    let poll_sum = sample(&text, "ebb_autoscaler_poll_duration_seconds_sum").unwrap_or(0.0);
    let patches = api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "autoscaler, {n} functions, --interval 1s, {elapsed:.1} s measured ({cores} cores here)"
    );
    println!(
        "  CPU          {cpu:.3} cores   (goal < 1: {})",
        if cpu < 1.0 { "met" } else { "MISSED" }
    );
    println!(
        "  RSS          {rss:.1} MiB now, {rss_max:.1} MiB max sampled, {hwm:.1} MiB peak (VmHWM)   (goal < 200: {})",
        if hwm < 200.0 { "met" } else { "MISSED" }
    );
    println!("  reads        {reads:.0} per second at the stub");
    println!(
        "  polls        {polls:.0}, mean {:.0} ms",
        if polls > 0.0 {
            poll_sum / polls * 1000.0
        } else {
            0.0
        }
    );
    println!("  scale patches {patches} (steady state: 0 expected)");
    println!("rerun: cargo test --release --test it bench_autoscaler:: -- --ignored --nocapture");
    println!("       (EBB_BENCH_FUNCTIONS={n} EBB_BENCH_SECONDS={seconds})");
    assert!(
        reads >= 0.9 * n as f64,
        "only {reads:.0} reads per second for {n} functions at a 1 s interval"
    );
    drop(autoscaler);
}
