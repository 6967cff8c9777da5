//! A connector's memory is bounded in bytes, not only in messages: large
//! messages to a slow function with a generous `max-inflight` are taken in
//! no faster than `--max-inflight-bytes` allows, so the connector's peak
//! RSS stays bounded whatever the backlog.

use std::time::Duration;

use crate::support::connector::{func, stack_yaml, wait_ready, write_stack};
use crate::support::proc_stat::status_mib;
use crate::support::sink::{Reply, Sink};
use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};
use async_nats::jetstream;

const STEP: Duration = Duration::from_secs(10);
const MESSAGES: usize = 400;
const SIZE: usize = 512 << 10;
/// The connector's default `--max-inflight-bytes`.
const BUDGET: usize = 64 << 20;
/// Acceptance bound of the connector's peak RSS.
const PEAK_MIB: f64 = 160.0;

#[tokio::test]
async fn large_messages_to_a_slow_function_keep_the_connector_within_its_byte_budget() {
    let nats = NatsServer::start_local().await;
    let client = within(STEP, "NATS connect", async_nats::connect(nats.url()))
        .await
        .expect("connect");
    let js = jetstream::new(client);
    let sink = Sink::builder()
        .otherwise(Reply::ok().delay(Duration::from_secs(1)))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = dir.path().join("stack.yaml");
    // Calls are not what bounds it here: up to 1000 at once are allowed.
    write_stack(
        &stack,
        &stack_yaml(&[func("big", &sink.url(), &["blobs"]).set("max-inflight", "1000")]),
    );
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = ebb_command();
    cmd.args(["connector", "nats", "--url", nats.url(), "--functions"])
        .arg(&stack)
        .args(["--admin-addr", &admin, "--max-inflight-total", "1000"]);
    let mut connector = ChildGuard::spawn("connector", &mut cmd);
    wait_ready(&mut connector, &admin, Duration::from_secs(30)).await;

    let body = bytes::Bytes::from(vec![b'x'; SIZE]);
    for _ in 0..MESSAGES {
        within(STEP, "publish", async {
            js.publish("blobs", body.clone())
                .await
                .expect("publish")
                .await
                .expect("stored")
        })
        .await;
    }
    sink.wait_for_calls(MESSAGES, Duration::from_secs(120))
        .await;
    let peak = status_mib(connector.pid(), "VmHWM");
    let most = sink.max_concurrent();
    println!(
        "{MESSAGES} messages of {} KiB, 1 s per call: connector peak RSS {peak:.1} MiB, \
         at most {most} calls at once (byte budget {} MiB)\n\
         rerun: cargo nextest run --test it -E 'test(memory::)' --no-capture",
        SIZE >> 10,
        BUDGET >> 20
    );
    assert!(
        most <= BUDGET / SIZE,
        "{most} calls of {} KiB at once exceed the {} MiB budget",
        SIZE >> 10,
        BUDGET >> 20
    );
    assert!(
        peak < PEAK_MIB,
        "peak RSS {peak:.1} MiB is not under {PEAK_MIB} MiB"
    );
    let calls = sink.calls();
    assert!(calls.iter().all(|c| c.body.len() == SIZE));
}
