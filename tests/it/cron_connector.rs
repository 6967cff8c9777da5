//! `ebb connector cron` as a process with a stack file: fires on time with
//! the tick's identity, retries a failing fire, follows schedule edits live
//! and skips a bad schedule while serving the rest.

use std::time::Duration;

use crate::support::sink::{Reply, Sink};
use crate::support::{ChildGuard, ebb_command, free_port};

fn start_connector(stack: &std::path::Path) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.args(["connector", "cron", "--functions"])
        .arg(stack)
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--reload-interval", "200ms"])
        .args(["--retry-base-delay", "50ms", "--retry-max-delay", "100ms"]);
    ChildGuard::spawn("cron", &mut cmd)
}

fn ce_time(c: &crate::support::sink::Call) -> chrono::DateTime<chrono::Utc> {
    let raw = c.header("ce-time").expect("ce-time");
    chrono::DateTime::parse_from_rfc3339(raw)
        .unwrap_or_else(|e| panic!("ce-time {raw:?}: {e}"))
        .with_timezone(&chrono::Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_every_second_with_the_ticks_identity() {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: tick\n    url: {}\n    schedule: \"*/1 * * * * *\"\n    payload: hello\n",
            sink.url()
        ),
    )
    .unwrap();
    let mut cron = start_connector(&stack);
    sink.wait_for_calls(3, Duration::from_secs(10)).await;
    let calls = sink.calls();
    let mut previous = None;
    for c in &calls[..3] {
        let at = ce_time(c);
        assert_eq!(
            at.timestamp_subsec_millis(),
            0,
            "ticks fall on whole seconds"
        );
        assert_eq!(
            c.header("ce-id").unwrap(),
            format!(
                "default/tick@{}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )
        );
        assert_eq!(c.header("ce-type"), Some("io.ebb.cron.tick"));
        assert_eq!(c.header("ce-source"), Some("/ebb/cron/default/tick"));
        assert_eq!(c.text(), "hello");
        assert_eq!(c.attempt(), 1);
        if let Some(p) = previous {
            assert_eq!(at - p, chrono::Duration::seconds(1), "one fire per tick");
        }
        previous = Some(at);
    }
    let status = cron.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", cron.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fire_is_retried_with_the_same_identity() {
    let sink = Sink::builder()
        .replies([Reply::status(500), Reply::status(503)])
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: flaky\n    url: {}\n    schedule: \"*/5 * * * * *\"\n",
            sink.url()
        ),
    )
    .unwrap();
    let _cron = start_connector(&stack);
    sink.wait_for_calls(3, Duration::from_secs(15)).await;
    let calls = sink.calls();
    let ids: Vec<_> = calls[..3]
        .iter()
        .map(|c| c.header("ce-id").unwrap().to_string())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "retries keep the tick's id: {ids:?}"
    );
    assert_eq!(
        calls[..3].iter().map(|c| c.attempt()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // All within the same 5 s tick, well before the next one.
    assert!(calls[2].at - calls[0].at < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_edits_apply_live_and_a_bad_schedule_is_skipped() {
    let a = Sink::start().await;
    let b = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: alpha\n    url: {}\n    schedule: \"*/1 * * * * *\"\n  - name: broken\n    url: {}\n    schedule: \"61 * * * *\"\n",
            a.url(),
            b.url()
        ),
    )
    .unwrap();
    let mut cron = start_connector(&stack);
    a.wait_for_calls(2, Duration::from_secs(10)).await;
    cron.wait_for_output("broken", Duration::from_secs(5)).await;
    let out = cron.output();
    let line = out
        .lines()
        .find(|l| l.contains("broken") && l.contains("schedule"))
        .unwrap_or_else(|| panic!("no error line for the bad schedule:\n{out}"));
    assert!(line.contains("61"), "{line}");
    assert_eq!(b.count(), 0);

    // Add a schedule to beta, remove alpha's.
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: alpha\n    url: {}\n  - name: beta\n    url: {}\n    schedule: \"*/1 * * * * *\"\n",
            a.url(),
            b.url()
        ),
    )
    .unwrap();
    b.wait_for_calls(2, Duration::from_secs(10)).await;
    let settled = a.count();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        a.count() <= settled + 1,
        "alpha still fires after its schedule was removed"
    );
    let status = cron.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", cron.output());
}
