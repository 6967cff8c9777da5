//! `ebb dev` end to end: the example stack run as a child process, events
//! published with `ebb publish --dev`, and the stack-file errors.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::support::{ChildGuard, ebb_bin, ebb_command, free_port};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

struct Dev {
    child: ChildGuard,
    url: String,
    http: reqwest::Client,
    /// Every replica pid seen in a status.
    pids: BTreeSet<u32>,
}

impl Dev {
    async fn start(stack: &Path) -> Dev {
        let url = format!("http://127.0.0.1:{}", free_port());
        let mut cmd = ebb_command();
        cmd.args(["dev", "--listen", url.trim_start_matches("http://")])
            .arg(stack)
            .env("EBB_LOG", "info");
        let mut child = ChildGuard::spawn("ebb-dev", &mut cmd);
        child
            .wait_for_output("ebb dev is running", Duration::from_secs(30))
            .await;
        Dev {
            child,
            url,
            http: reqwest::Client::new(),
            pids: BTreeSet::new(),
        }
    }

    async fn status(&mut self) -> Value {
        let text = self
            .http
            .get(format!("{}/_/status", self.url))
            .send()
            .await
            .expect("GET /_/status")
            .text()
            .await
            .expect("status body");
        let v: Value = serde_json::from_str(&text).expect("status is JSON");
        for f in v["functions"].as_array().expect("functions") {
            for p in f["pids"].as_array().expect("pids") {
                self.pids.insert(p.as_u64().expect("pid") as u32);
            }
        }
        v
    }

    async fn function(&mut self, name: &str) -> Value {
        let s = self.status().await;
        s["functions"]
            .as_array()
            .expect("functions")
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no function {name} in {s}"))
            .clone()
    }

    /// Waits until `check` holds for function `name`.
    async fn until(
        &mut self,
        name: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let f = self.function(name).await;
            if check(&f) {
                return f;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{name}: {what} not reached within {limit:?}; last status {f}\n--- output ---\n{}",
                    self.child.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn publish(&self, topic: &str, data: &str) {
        let out = tokio::process::Command::new(ebb_bin())
            .args(["publish", "--dev", &self.url, topic, data])
            .output()
            .await
            .expect("run ebb publish");
        assert!(
            out.status.success(),
            "ebb publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn n(f: &Value, key: &str) -> u64 {
    f[key].as_u64().unwrap_or_else(|| panic!("{key} in {f}"))
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

fn group_alive(pid: u32) -> bool {
    killpg(Pid::from_raw(pid as i32), None).is_ok()
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_stack_delivers_retries_dead_letters_fires_and_scales_to_zero() {
    let mut dev = Dev::start(&repo().join("examples/stack.yaml")).await;

    // The publisher script sends one event to each function.
    let out = tokio::process::Command::new("sh")
        .arg(repo().join("examples/publish.sh"))
        .arg(&dev.url)
        .env("EBB", ebb_bin())
        .output()
        .await
        .expect("run examples/publish.sh");
    assert!(
        out.status.success(),
        "publish.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("published to orders → orders"), "{said}");

    let limit = Duration::from_secs(30);
    dev.until("echo", "delivered", limit, |f| n(f, "delivered") == 1)
        .await;
    dev.until("greet", "delivered", limit, |f| n(f, "delivered") == 1)
        .await;
    // order 1 and the flaky order 2 delivered, order 2 after one retry; the
    // poison order 3 retried twice and dead-lettered after three attempts.
    let orders = dev
        .until("orders", "two delivered and one dead letter", limit, |f| {
            n(f, "delivered") == 2 && n(f, "dead_lettered") == 1
        })
        .await;
    assert_eq!(n(&orders, "retried"), 3, "{orders}");
    assert_eq!(orders["last_error"], "status 500", "{orders}");
    dev.until("dead-letters", "the dead letter", limit, |f| {
        n(f, "delivered") == 1
    })
    .await;
    dev.until("sleepy", "delivered", limit, |f| n(f, "delivered") == 1)
        .await;
    let output = dev.child.output();
    for line in [
        "greet: hello, Ada (attempt 1)",
        "orders: failing the first attempt of \"order 2 (flaky)\"",
        "orders: processed \"order 2 (flaky)\" (attempt 2)",
        "dead-letters: \"order 3 (poison)\" from orders after 3 attempts (attempts exhausted",
        "sleepy: woke up for \"job 1\"",
    ] {
        assert!(output.contains(line), "missing {line:?} in\n{output}");
    }

    // Cron: the tick function fires every 5 s.
    dev.until("tick", "a fire", Duration::from_secs(15), |f| {
        n(f, "delivered") >= 1
    })
    .await;
    assert!(dev.child.output().contains("tick scheduled for"));

    // Scale to zero after 5 s idle: the replica process is gone.
    let up = dev.function("sleepy").await;
    let sleepy_pids: Vec<u32> = up["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(sleepy_pids.len(), 1, "{up}");
    dev.until("sleepy", "zero replicas", Duration::from_secs(30), |f| {
        n(f, "replicas") == 0
    })
    .await;
    for pid in &sleepy_pids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while alive(*pid) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {pid} still runs after scale to zero"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Wake-up: the next event starts a replica and is delivered.
    dev.publish("jobs", "job 2").await;
    let woke = dev
        .until("sleepy", "woken and delivered", limit, |f| {
            n(f, "delivered") == 2
        })
        .await;
    assert_eq!(n(&woke, "replicas"), 1, "{woke}");
    assert!(dev.child.output().contains("sleepy: woke up for \"job 2\""));
    dev.status().await;

    // Prometheus metrics of the engine and of the local replicas.
    let metrics = dev
        .http
        .get(format!("{}/metrics", dev.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "ebb_dev_replicas{function=\"sleepy\"} 1",
        "ebb_deliveries_total{function=\"default/orders\",outcome=\"dead_lettered\"} 1",
        "ebb_dead_letters_total{function=\"default/orders\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }

    // Ctrl-C: every replica drained and gone, exit 0.
    let pids = dev.pids.clone();
    assert!(pids.len() >= 6, "replicas seen: {pids:?}");
    dev.child.signal(Signal::SIGINT);
    let status = dev.child.wait(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "ebb dev exit: {status:?}\n{}",
        dev.child.output()
    );
    for pid in pids {
        assert!(!alive(pid), "replica {pid} outlived ebb dev");
        assert!(
            !group_alive(pid),
            "a process of replica {pid}'s group outlived ebb dev"
        );
    }
}

/// `ebb dev` runs the autoscaler's poll: a cron-only function at
/// `min-replicas: 0` is pre-warmed before each tick (its fire delivered at
/// the first attempt) and back at zero between fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_only_function_is_back_at_zero_between_fires() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    let text = "functions:\n  - name: nightly\n    command: cat\n    \
                schedule: \"*/10 * * * * *\"\n    scale-to-zero-after: 1s\n";
    std::fs::write(&stack, text).unwrap();
    let mut dev = Dev::start(&stack).await;
    // Replicas seen per number of fires delivered so far.
    let mut seen: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 3];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let f = dev.function("nightly").await;
        let fired = n(&f, "delivered");
        if fired >= 2 {
            break;
        }
        seen[fired as usize].insert(n(&f, "replicas"));
        assert!(tokio::time::Instant::now() < deadline, "two fires: {f}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen[1].contains(&0), "zero between the fires: {seen:?}");
    assert!(
        seen[1].contains(&1),
        "warm again before the second: {seen:?}"
    );
    let f = dev.function("nightly").await;
    assert_eq!((n(&f, "retried"), n(&f, "dropped")), (0, 0), "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stack_files_are_refused_with_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown key",
            "functions:\n  - name: echo\n    command: cat\n    topcis: [a]\n",
            &["\"echo\"", "topcis"][..],
        ),
        (
            "bad schedule",
            "functions:\n  - name: nightly\n    command: cat\n    schedule: \"0 99 * * *\"\n",
            &["\"nightly\"", "schedule"],
        ),
        (
            "neither command nor url",
            "functions:\n  - name: lost\n    topics: [a]\n",
            &["\"lost\"", "url"],
        ),
        (
            "duplicate name",
            "functions:\n  - name: twice\n    command: cat\n  - name: twice\n    command: cat\n",
            &["\"twice\"", "used twice"],
        ),
    ];
    for (what, text, needles) in cases {
        let path = dir.path().join("stack.yaml");
        std::fs::write(&path, text).unwrap();
        let out = tokio::process::Command::new(ebb_bin())
            .args(["dev", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg(&path)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one line expected, got {stderr:?}");
        for needle in needles {
            assert!(
                lines[0].to_lowercase().contains(&needle.to_lowercase()),
                "{what}: {:?} should name {needle}",
                lines[0]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_edits_are_picked_up_live_and_a_broken_edit_keeps_the_last_good_stack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    let one =
        "functions:\n  - name: first\n    command: cat\n    topics: [one]\n    min-replicas: 1\n";
    std::fs::write(&path, one).unwrap();
    let mut dev = Dev::start(&path).await;
    dev.until("first", "its replica", Duration::from_secs(20), |f| {
        n(f, "ready") == 1
    })
    .await;

    // Added.
    let two = format!("{one}  - name: second\n    command: cat\n    topics: [two]\n");
    std::fs::write(&path, &two).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !dev.status().await["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "second")
    {
        assert!(tokio::time::Instant::now() < deadline, "second never added");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev.publish("two", "hi").await;
    dev.until("second", "delivered", Duration::from_secs(20), |f| {
        n(f, "delivered") == 1
    })
    .await;

    // A broken edit: reported, the running functions stay.
    std::fs::write(&path, format!("{two}    max-replicas: lots\n")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = dev.status().await;
        if let Some(e) = s["reload_error"].as_str() {
            assert!(e.contains("max-replicas"), "{e}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "broken edit not reported: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev.publish("two", "still here").await;
    dev.until("second", "delivered again", Duration::from_secs(20), |f| {
        n(f, "delivered") == 2
    })
    .await;

    // Changed command: the replica is replaced; removed: its replica stops.
    let first = dev.function("first").await;
    let old_pid = first["pids"][0].as_u64().unwrap() as u32;
    std::fs::write(
        &path,
        "functions:\n  - name: first\n    command: [tr, a-z, A-Z]\n    topics: [one]\n    min-replicas: 1\n",
    )
    .unwrap();
    dev.until("first", "a new replica", Duration::from_secs(20), |f| {
        n(f, "ready") == 1 && f["pids"][0].as_u64() != Some(u64::from(old_pid))
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dev.status().await["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "second")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "second never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while alive(old_pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old replica {old_pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dev.child.signal(Signal::SIGTERM);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_get_clear_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        "functions:\n  - name: f\n    command: cat\n    topics: [t]\n",
    )
    .unwrap();
    let mut dev = Dev::start(&path).await;
    let http = reqwest::Client::new();

    let r = http
        .post(format!("{}/publish/a.*", dev.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("wildcards"));

    // Oversize: refused from its Content-Length, before the body is read.
    let addr = dev.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(
        format!(
            "POST /publish/t HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n\r\n",
            7 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0; 1024];
    let got = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..got]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // ebb publish refuses it before sending, naming the limit.
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 7 << 20]).unwrap();
    let out = tokio::process::Command::new(ebb_bin())
        .args(["publish", "--dev", &dev.url, "t"])
        .arg(format!("@{}", big.display()))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("6 MiB"), "{e}");

    // Not UTF-8 is fine: events are bytes.
    let r = http
        .post(format!("{}/publish/t", dev.url))
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    dev.until("f", "delivered", Duration::from_secs(20), |f| {
        n(f, "delivered") == 1
    })
    .await;

    // Nobody listens: ebb publish says so.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = tokio::process::Command::new(ebb_bin())
        .args(["publish", "--dev", &closed, "t", "x"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("cannot reach ebb dev at"), "{e}");

    // A topic nobody subscribes to: published, and ebb publish says it was dropped.
    let out = tokio::process::Command::new(ebb_bin())
        .args(["publish", "--dev", &dev.url, "nobody", "x"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no function subscribes"));
    dev.child.signal(Signal::SIGTERM);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_a_live_table_is_redrawn_in_place_with_logs_above_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        "functions:\n  - name: echo\n    command: cat\n    topics: [t]\n    min-replicas: 1\n",
    )
    .unwrap();
    // `script` gives ebb dev a pseudo-terminal as stdout and stderr; ebb
    // dev stops itself (SIGINT from `timeout`) after a few seconds.
    let line = format!(
        "timeout --preserve-status -s INT 4 {} dev --listen 127.0.0.1:{} {}",
        ebb_bin().display(),
        free_port(),
        path.display()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("script")
            .args(["-qfec", &line, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("ebb dev under script stops")
    .expect("run script (util-linux)");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{screen}", out.status);
    let header =
        "FUNCTION             REPLICAS  BACKLOG IN-FLIGHT DELIVERED RETRIED  DEAD  LAST ERROR";
    assert!(screen.contains(header), "{screen}");
    // The replica comes up: the row changes from 0/1 (or 0/0) to 1/1 in place.
    assert!(
        screen.contains("echo                      1/1        0         0         0       0     0"),
        "{screen}"
    );
    // Redrawn in place: cursor up over the two table lines, clear below.
    assert!(screen.contains("\x1b[2A\r\x1b[J"), "{screen}");
    // Log lines go above the table, which is drawn again after them.
    let stopping = screen
        .find("stopping: finishing deliveries")
        .expect("stop logged");
    assert!(screen[stopping..].contains(header), "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_nats_source_the_real_connector_delivers_and_wakes_local_replicas() {
    let nats = crate::support::NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        format!(
            "functions:\n  - name: js\n    command: [sh, -c, 'cat >&2']\n    topics: [orders.new]\nsources:\n  nats: {}\n",
            nats.url()
        ),
    )
    .unwrap();
    let mut dev = Dev::start(&path).await;
    assert_eq!(n(&dev.function("js").await, "replicas"), 0);
    // Published into JetStream through ebb dev; the consumer may still be
    // starting, and JetStream keeps the event until it is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = tokio::process::Command::new(ebb_bin())
            .args(["publish", "--dev", &dev.url, "orders.new", "from nats"])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let f = dev
        .until(
            "js",
            "delivered from JetStream",
            Duration::from_secs(30),
            |f| n(f, "delivered") == 1,
        )
        .await;
    assert_eq!(n(&f, "replicas"), 1, "woken from zero: {f}");
    assert!(dev.child.output().contains("stderr=from nats"));
    dev.child.signal(Signal::SIGINT);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        "functions:\n  - name: f\n    command: cat\n    topics: [t]\n    min-replicas: 1\n",
    )
    .unwrap();
    let mut dev = Dev::start(&path).await;
    let f = dev
        .until("f", "its replica", Duration::from_secs(20), |f| {
            n(f, "ready") == 1
        })
        .await;
    let first = f["pids"][0].as_u64().unwrap() as u32;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let f = dev
        .until("f", "a new replica", Duration::from_secs(20), |f| {
            n(f, "ready") == 1 && f["pids"][0].as_u64() != Some(u64::from(first))
        })
        .await;
    assert_eq!(n(&f, "replicas"), 1, "{f}");
    let error = f["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("replica exited"), "{f}");
    // The new replica serves.
    dev.publish("t", "after the crash").await;
    dev.until("f", "delivered", Duration::from_secs(20), |f| {
        n(f, "delivered") == 1
    })
    .await;
    dev.child.signal(Signal::SIGTERM);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

/// Publishes through `ebb dev` until `function` has one delivery (a new
/// Kafka group starts with new messages, so the first publishes may come
/// before the connector's group has joined).
async fn publish_until_delivered(dev: &mut Dev, topic: &str, body: &str, function: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = tokio::process::Command::new(ebb_bin())
            .args(["publish", "--dev", &dev.url, topic, body])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success() || tokio::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = dev.function(function).await;
        if n(&f, "delivered") >= 1 {
            return f;
        }
        assert!(tokio::time::Instant::now() < deadline, "not delivered: {f}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_amqp_source_the_real_connector_delivers_and_wakes_local_replicas() {
    let vhost = crate::support::RabbitMq::shared().await.vhost().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        format!(
            "functions:\n  - name: rabbit\n    command: [sh, -c, 'cat >&2']\n    topics: [orders.new]\nsources:\n  amqp: {}\n",
            vhost.url()
        ),
    )
    .unwrap();
    let mut dev = Dev::start(&path).await;
    assert_eq!(n(&dev.function("rabbit").await, "replicas"), 0);
    // The queue is bound once the connector runs; until then a publish is
    // refused (no queue bound), so this retries.
    let f = publish_until_delivered(&mut dev, "orders.new", "from rabbitmq", "rabbit").await;
    assert_eq!(n(&f, "replicas"), 1, "woken from zero: {f}");
    assert!(dev.child.output().contains("stderr=from rabbitmq"));
    dev.child.signal(Signal::SIGINT);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_kafka_source_the_real_connector_delivers_and_wakes_local_replicas() {
    let kafka = crate::support::KafkaMock::new();
    kafka.create_topic("orders", 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        format!(
            "functions:\n  - name: log\n    command: [sh, -c, 'cat >&2']\n    topics: [orders]\nsources:\n  kafka: {}\n",
            kafka.bootstrap_servers()
        ),
    )
    .unwrap();
    let mut dev = Dev::start(&path).await;
    assert_eq!(n(&dev.function("log").await, "replicas"), 0);
    let f = publish_until_delivered(&mut dev, "orders", "from kafka", "log").await;
    assert_eq!(n(&f, "replicas"), 1, "woken from zero: {f}");
    assert!(dev.child.output().contains("stderr=from kafka"));
    dev.child.signal(Signal::SIGINT);
    assert!(dev.child.wait(Duration::from_secs(60)).await.success());
}

#[tokio::test]
async fn two_broker_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(
        &path,
        "functions:\n  - name: f\n    command: cat\n    topics: [t]\nsources:\n  nats: nats://127.0.0.1:1\n  kafka: 127.0.0.1:1\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(ebb_bin())
        .args(["dev", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("give one of nats, amqp and kafka"), "{err}");
}
