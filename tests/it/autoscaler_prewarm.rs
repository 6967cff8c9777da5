//! Pre-warm for schedules: `ebb autoscaler` and `ebb connector cron` against
//! the Kubernetes API double, whose pods are ready 2 s after a scale
//! (`KubeApi::auto_ready`). The function is a sink; each call must find the
//! Deployment with a ready replica (else a real one would have been held
//! until a wake-up made one ready).

use std::time::Duration;

use chrono::{DateTime, Utc};
use ebb_kube_double::KubeApi;
use tokio::time::Instant;

use crate::autoscaler_cold_start::{autoscaler, wait_ready};
use crate::support::sink::{Call, Sink};
use crate::support::{ChildGuard, ebb_command, free_port, within};

const COLD_START: Duration = Duration::from_secs(2);
/// A fire reaches the function within this of its tick.
const ON_TIME: chrono::TimeDelta = chrono::TimeDelta::milliseconds(100);
/// Before its first cold start is measured the autoscaler scales up this
/// long ahead (10 s assumed, plus a quarter): earlier ticks may not be
/// pre-warmed yet.
const FIRST_LEAD: Duration = Duration::from_millis(12_500);

/// The Deployment's counts at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: DateTime<Utc>,
    replicas: i64,
    ready: i64,
}

fn sample(api: &KubeApi, name: &str) -> Option<Sample> {
    let d = api.deployment("default", name)?;
    Some(Sample {
        at: Utc::now(),
        replicas: d["spec"]["replicas"].as_i64()?,
        ready: d["status"]["readyReplicas"].as_i64().unwrap_or(0),
    })
}

fn cron(api: &KubeApi, dir: &std::path::Path, autoscaler_admin: u16) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["connector", "cron", "--kubernetes"])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--autoscaler-url",
            &format!("http://127.0.0.1:{autoscaler_admin}"),
        ])
        .args(["--lease-duration", "2s", "--renew-deadline", "1500ms"])
        .args(["--retry-period", "250ms"])
        .env("KUBECONFIG", api.kubeconfig(dir))
        .env("POD_NAME", "cron-0");
    ChildGuard::spawn("cron", &mut cmd)
}

fn scheduled(c: &Call) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(c.header("ce-time").expect("ce-time"))
        .expect("RFC 3339 ce-time")
        .with_timezone(&Utc)
}

/// Acceptance: a function with only `schedule: "*/20 * * * * *"`,
/// `min-replicas: 0` and a 2 s cold start has a ready replica before each
/// tick, each fire reaches it within 100 ms of its tick (no hold), and it
/// has no replica between fires, `scale-to-zero-after` (5 s) being shorter
/// than the 20 s gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_function_is_warm_at_each_tick_and_at_zero_between() {
    let api = KubeApi::start();
    api.auto_ready(Some(COLD_START));
    let dir = tempfile::tempdir().unwrap();
    let function = Sink::start().await;
    let url = function.url();
    api.apply_deployment(
        "default",
        "nightly",
        &[
            ("ebb.io/schedule", "*/20 * * * * *"),
            ("ebb.io/min-replicas", "0"),
            ("ebb.io/url", &url),
            // A fire's call ends within 2 s: then only the idle time counts.
            ("ebb.io/timeout", "2s"),
            ("ebb.io/scale-to-zero-after", "5s"),
        ],
        &[],
        0,
    );
    let admin = free_port();
    let _autoscaler = autoscaler(&api, dir.path(), admin, &[]);
    wait_ready(admin).await;
    let _cron = cron(&api, dir.path(), admin);
    // Ticks from here on are pre-warmed even before a measured cold start.
    let eligible = Utc::now() + chrono::Duration::from_std(FIRST_LEAD).unwrap();

    // The Deployment's counts every 20 ms, until two such ticks fired.
    let mut samples: Vec<Sample> = Vec::new();
    let fired = |sink: &Sink| {
        sink.with_calls(|calls| calls.iter().filter(|c| scheduled(c) >= eligible).count())
    };
    within(Duration::from_secs(80), "two pre-warmed fires", async {
        let mut next = Instant::now();
        while fired(&function) < 2 {
            samples.push(sample(&api, "nightly").expect("the Deployment"));
            next += Duration::from_millis(20);
            tokio::time::sleep_until(next).await;
        }
    })
    .await;

    let calls = function.calls();
    let fires: Vec<&Call> = calls.iter().filter(|c| scheduled(c) >= eligible).collect();
    assert_eq!(fires.len(), 2, "{calls:?}");
    for c in &fires {
        let tick = scheduled(c);
        let late = c.wall - tick;
        eprintln!("fire of {tick}: reached the function {late} after its tick");
        assert!(
            late <= ON_TIME,
            "the fire of {tick} reached the function {late} after its tick"
        );
        assert_eq!(c.attempt(), 1, "no failed attempt, no hold");
        let before: Vec<&Sample> = samples.iter().filter(|s| s.at < tick).collect();
        let last = before.last().expect("samples before the tick");
        assert!(
            last.replicas >= 1 && last.ready >= 1,
            "a ready replica before {tick}: {last:?}"
        );
        let at_call = samples.iter().rfind(|s| s.at <= c.wall).expect("a sample");
        assert!(at_call.ready >= 1, "ready when called: {at_call:?}");
    }
    let gap: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > scheduled(fires[0]) && s.at < scheduled(fires[1]))
        .collect();
    assert!(
        gap.iter().any(|s| s.replicas == 0 && s.ready == 0),
        "no replica between the fires: {gap:?}"
    );
    assert!(
        gap.iter().any(|s| s.replicas == 1),
        "and one again before the next: {gap:?}"
    );
}
