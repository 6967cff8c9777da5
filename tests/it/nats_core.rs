//! `ebb connector nats --mode core`: queue-group subscriptions and
//! request/reply, against a real nats-server.

use std::time::Duration;

use crate::support::sink::{Reply, Sink};
use crate::support::{ChildGuard, NatsServer, ebb_command, free_port, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gets_the_functions_answer_as_its_reply() {
    let nats = NatsServer::start_local().await;
    let sink = Sink::builder()
        .otherwise(Reply::ok().body("pong"))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    std::fs::write(
        &stack,
        format!(
            "functions:\n  - name: ping\n    url: {}\n    topics: [core.ping]\n",
            sink.url()
        ),
    )
    .unwrap();
    let admin = free_port();
    let mut cmd = ebb_command();
    cmd.args(["connector", "nats", "--mode", "core", "--url", nats.url()])
        .arg("--functions")
        .arg(&stack)
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")]);
    let mut connector = ChildGuard::spawn("connector", &mut cmd);
    let client = async_nats::connect(nats.url()).await.unwrap();
    // The subscription exists once the connector is ready.
    within(Duration::from_secs(10), "connector ready", async {
        loop {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{admin}/_/ready")).await
                && r.status() == 200
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let answer = within(
        Duration::from_secs(10),
        "reply",
        client.request("core.ping", "ping".into()),
    )
    .await
    .expect("a reply");
    assert_eq!(&answer.payload[..], b"pong");
    let calls = sink.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].text(), "ping");
    assert_eq!(calls[0].header("x-topic"), Some("core.ping"));
    let status = connector.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{}", connector.output());
}
