//! Two `ebb autoscaler` replicas elect one poller with a Lease: only the
//! leader patches, and the follower takes over when the leader is killed.

use std::time::Duration;

use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};
use async_nats::jetstream::{self, consumer, stream};
use ebb_kube_double::KubeApi;
use nix::sys::signal::Signal;

fn replica(api: &KubeApi, dir: &std::path::Path, nats: &str, name: &str, admin: u16) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args([
        "autoscaler",
        "--kubernetes",
        "--nats",
        nats,
        "--interval",
        "200ms",
    ])
    .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
    .args([
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1500ms",
        "--retry-period",
        "250ms",
    ])
    .env("KUBECONFIG", api.kubeconfig(dir))
    .env("POD_NAME", name);
    ChildGuard::spawn(name, &mut cmd)
}

async fn patches(admin: u16) -> u64 {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return 0;
    };
    let body = r.text().await.unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("ebb_autoscaler_scale_patches_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn publish(js: &jetstream::Context, n: usize) {
    for i in 0..n {
        js.publish("lease.work", format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

async fn replicas_become(api: &KubeApi, want: i64, limit: Duration) {
    within(limit, &format!("work scaled to {want}"), async {
        while api.replicas("default", "work") != Some(want) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_patches_and_the_follower_takes_over() {
    let api = KubeApi::start();
    // Pods become ready 100 ms after each scale, as a Deployment's would:
    // the policy waits for starting replicas before asking for more.
    api.auto_ready(Some(Duration::from_millis(100)));
    let nats = NatsServer::start_local().await;
    let dir = tempfile::tempdir().unwrap();
    api.apply_deployment(
        "default",
        "work",
        &[
            ("ebb.io/topics", "lease.work"),
            ("ebb.io/max-replicas", "8"),
        ],
        &[],
        1,
    );
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_or_update_stream(stream::Config {
        name: "EBB".into(),
        subjects: vec!["lease.work".into()],
        retention: stream::RetentionPolicy::Interest,
        ..Default::default()
    })
    .await
    .unwrap();
    js.get_stream("EBB")
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ebb-default-work".into()),
            filter_subjects: vec!["lease.work".into()],
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();

    let (pa, pb) = (free_port(), free_port());
    let mut a = replica(&api, dir.path(), nats.url(), "scaler-a", pa);
    let mut b = replica(&api, dir.path(), nats.url(), "scaler-b", pb);
    publish(&js, 30).await; // 30 / 10 = 3
    replicas_become(&api, 3, Duration::from_secs(20)).await;

    let holder = api.lease("default", "ebb-autoscaler").expect("lease")["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (leader, follower, leader_port, follower_port) = if holder.starts_with("scaler-a") {
        (&mut a, &mut b, pa, pb)
    } else {
        (&mut b, &mut a, pb, pa)
    };
    assert!(patches(leader_port).await >= 1, "the leader did not patch");
    assert_eq!(patches(follower_port).await, 0, "the follower patched");

    leader.signal(Signal::SIGKILL);
    let _ = leader.wait(Duration::from_secs(5)).await;
    publish(&js, 40).await; // 70 / 10 = 7
    replicas_become(&api, 7, Duration::from_secs(15)).await;
    assert!(
        patches(follower_port).await >= 1,
        "the new leader did not patch"
    );
    let status = follower.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
}
