//! Benchmark (ignored by default; run it explicitly):
//!
//! ```sh
//! cargo test --release --test it bench_wake:: -- --ignored --nocapture
//! ```
//!
//! Wake-up → scale PATCH through `ebb autoscaler` (release build) against the
//! Kubernetes API double: 1 000 wake-ups of a function at zero, each timed
//! from the POST until its 202 (the handler answers once the patch is done).
//! Prints p50/p99/max; asserts only that every wake-up patched.

use std::time::Duration;

use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};
use ebb_kube_double::KubeApi;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn wake_to_patch_latency() {
    const N: usize = 1000;
    let api = KubeApi::start();
    let nats = NatsServer::start_local().await;
    let dir = tempfile::tempdir().unwrap();
    api.apply_deployment(
        "default",
        "cold",
        &[("ebb.io/topics", "bench.cold")],
        &[],
        0,
    );
    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args([
        "autoscaler",
        "--kubernetes",
        "--nats",
        nats.url(),
        "--interval",
        "1h",
        "--no-leader-election",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
    .env("KUBECONFIG", api.kubeconfig(dir.path()))
    .env("EBB_LOG", "warn");
    let _autoscaler = ChildGuard::spawn("autoscaler", &mut cmd);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{admin}");
    within(Duration::from_secs(20), "autoscaler ready", async {
        loop {
            if let Ok(r) = client.get(format!("{base}/_/ready")).send().await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let mut micros = Vec::with_capacity(N);
    for _ in 0..N {
        api.apply_deployment(
            "default",
            "cold",
            &[("ebb.io/topics", "bench.cold")],
            &[],
            0,
        );
        let started = Instant::now();
        let r = client
            .post(format!("{base}/wake/default/cold"))
            .send()
            .await
            .unwrap();
        micros.push(started.elapsed().as_micros() as u64);
        assert_eq!(r.status(), 202);
        assert_eq!(api.replicas("default", "cold"), Some(1));
    }
    micros.sort_unstable();
    let pct = |q: f64| micros[((q * N as f64).ceil() as usize).clamp(1, N) - 1];
    println!(
        "wake-up -> PATCH over {N} wake-ups (API double, release build): p50 {} us, p99 {} us, max {} us",
        pct(0.50),
        pct(0.99),
        micros[N - 1]
    );
    println!("rerun: cargo test --release --test it bench_wake:: -- --ignored --nocapture");
}
