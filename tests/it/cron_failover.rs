//! Two `ebb connector cron` replicas against the Kubernetes API double elect
//! one leader with a Lease; the leader is killed mid-run and the follower
//! takes over without firing ticks twice (beyond one around the kill) and
//! without firing missed ticks late.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::sink::{Call, Reply, Sink};
use crate::support::{ChildGuard, ebb_command, free_port};
use chrono::{DateTime, Utc};
use ebb_kube_double::KubeApi;
use nix::sys::signal::Signal;
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(2);

fn replica(api: &KubeApi, dir: &std::path::Path, name: &str, admin: u16) -> ChildGuard {
    replica_with(api, dir, name, admin, &[])
}

fn replica_with(
    api: &KubeApi,
    dir: &std::path::Path,
    name: &str,
    admin: u16,
    extra: &[&str],
) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["connector", "cron", "--kubernetes"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args([
            "--lease-duration",
            "2s",
            "--renew-deadline",
            "1500ms",
            "--retry-period",
            "250ms",
        ])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig(dir))
        .env("POD_NAME", name);
    ChildGuard::spawn(name, &mut cmd)
}

fn holder(api: &KubeApi) -> Option<String> {
    let lease = api.lease("default", "ebb-connector-cron")?;
    let h = lease["spec"]["holderIdentity"].as_str()?.to_string();
    (!h.is_empty()).then_some(h)
}

fn scheduled(c: &Call) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(c.header("ce-time").expect("ce-time"))
        .expect("RFC 3339 ce-time")
        .with_timezone(&Utc)
}

async fn missed_total(admin: u16) -> u64 {
    let body = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    body.lines()
        .filter(|l| l.starts_with("ebb_cron_missed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

struct Outcome {
    calls: Vec<Call>,
    killed_at: Instant,
    missed_by_survivor: u64,
}

/// Runs two replicas for `ticks` seconds, killing the leader after `kill_after`.
async fn failover(annotations: &[(&str, &str)], ticks: u64, kill_after: u64) -> Outcome {
    let api = KubeApi::start();
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = sink.url();
    let mut ann: Vec<(&str, &str)> =
        vec![("ebb.io/schedule", "*/1 * * * * *"), ("ebb.io/url", &url)];
    ann.extend_from_slice(annotations);
    api.apply_deployment("default", "tick", &ann, &[], 1);
    api.set_ready_replicas("default", "tick", 1);

    let (admin_a, admin_b) = (free_port(), free_port());
    let mut a = replica(&api, dir.path(), "replica-a", admin_a);
    let mut b = replica(&api, dir.path(), "replica-b", admin_b);
    sink.wait_for_calls(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(kill_after)).await;

    let leader = holder(&api).expect("a leader holds the lease");
    let (victim, survivor, survivor_admin) = if leader.starts_with("replica-a") {
        (&mut a, &mut b, admin_b)
    } else {
        (&mut b, &mut a, admin_a)
    };
    victim.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    let _ = victim.wait(Duration::from_secs(5)).await;

    tokio::time::sleep(Duration::from_secs(ticks.saturating_sub(kill_after))).await;
    let missed_by_survivor = missed_total(survivor_admin).await;
    let status = survivor.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "survivor exited with {status}");
    Outcome {
        calls: sink.calls(),
        killed_at,
        missed_by_survivor,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_without_double_fires() {
    let o = failover(
        &[
            ("ebb.io/starting-deadline", "10s"),
            ("ebb.io/concurrency", "forbid"),
        ],
        60,
        20,
    )
    .await;
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for c in &o.calls {
        *by_id
            .entry(c.header("ce-id").unwrap().to_string())
            .or_default() += 1;
    }
    let repeats: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "fires {}, distinct ticks {}, repeated {:?}, missed (survivor) {}",
        o.calls.len(),
        by_id.len(),
        repeats,
        o.missed_by_survivor
    );
    assert!(
        repeats.len() <= 1 && repeats.iter().all(|(_, n)| **n == 2),
        "{repeats:?}"
    );

    // The follower's first fire after the kill comes within the lease
    // duration, plus one read period and one tick.
    let after: Vec<&Call> = o.calls.iter().filter(|c| c.at > o.killed_at).collect();
    let first = after.first().expect("the follower never fired");
    let takeover = first.at - o.killed_at;
    println!("takeover after {takeover:?}");
    assert!(
        takeover <= LEASE + Duration::from_millis(2500),
        "takeover took {takeover:?}"
    );

    // Every tick from the first to the last fire was fired or counted missed.
    let mut ticks: Vec<DateTime<Utc>> = o.calls.iter().map(scheduled).collect();
    ticks.sort();
    ticks.dedup();
    let span = (*ticks.last().unwrap() - *ticks.first().unwrap()).num_seconds() as u64 + 1;
    let fired = ticks.len() as u64;
    assert!(
        fired + o.missed_by_survivor >= span,
        "{span} ticks: {fired} fired + {} missed do not cover them",
        o.missed_by_survivor
    );
    assert!(
        o.missed_by_survivor >= 1,
        "the failover gap was not counted"
    );
    assert!(
        fired >= span - LEASE.as_secs() - 3,
        "too many ticks lost: {fired} of {span}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_deadline_failover_ticks_are_missed_not_fired_late() {
    let o = failover(&[("ebb.io/concurrency", "forbid")], 20, 8).await;
    for c in &o.calls {
        let late = (c.at_wall() - scheduled(c)).to_std().unwrap_or_default();
        assert!(
            late < Duration::from_secs(1),
            "tick {} fired {late:?} late",
            scheduled(c)
        );
    }
    assert!(
        o.missed_by_survivor >= 1,
        "the failover gap was not counted as missed"
    );
}

/// A leader stopped (SIGTERM) while its fire's call runs, with a drain
/// timeout shorter than the call: the tick was never recorded as done, so the
/// next leader fires it again, with the same `ce-id`, however late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_cut_off_by_a_stopping_leader_is_fired_again_by_the_next() {
    let api = KubeApi::start();
    let sink = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_secs(4)))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let url = sink.url();
    // One tick in the test's window: a repeat can only be that tick again.
    let ann = [
        ("ebb.io/schedule", "*/30 * * * * *"),
        ("ebb.io/url", url.as_str()),
    ];
    api.apply_deployment("default", "tick", &ann, &[], 1);
    api.set_ready_replicas("default", "tick", 1);
    let short_drain = ["--drain-timeout", "500ms"];
    let (admin_a, admin_b) = (free_port(), free_port());
    let mut a = replica_with(&api, dir.path(), "replica-a", admin_a, &short_drain);
    let mut b = replica_with(&api, dir.path(), "replica-b", admin_b, &short_drain);

    sink.wait_until(Duration::from_secs(45), "a fire's call running", |s| {
        s.inflight() == 1
    })
    .await;
    // The mark that the tick is being fired reaches the Lease with the next
    // renewal (every 250 ms here).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let leader = holder(&api).expect("a leader holds the lease");
    let (victim, survivor) = if leader.starts_with("replica-a") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    victim.signal(Signal::SIGTERM);
    let status = victim.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "the leader exited with {status}");

    sink.wait_for_calls(2, LEASE + Duration::from_secs(10))
        .await;
    let calls = sink.calls();
    let ids: Vec<&str> = calls.iter().map(|c| c.header("ce-id").unwrap()).collect();
    assert_eq!(ids[0], ids[1], "the same tick, fired again");
    assert_eq!(scheduled(&calls[0]), scheduled(&calls[1]));
    // Its call finishes this time: recorded as done, not fired a third time.
    sink.wait_until(Duration::from_secs(10), "the second call finished", |s| {
        s.completed() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = sink
        .calls()
        .iter()
        .filter(|c| c.header("ce-id") == Some(ids[0]))
        .count();
    assert_eq!(again, 2, "fired once more, not more");
    let status = survivor.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "survivor exited with {status}");
}
