//! `ebb worker` as a process: the worker contract of the design, end to end.
//!
//! Every test starts its own worker binary on a free loopback port and stops
//! it by pid. Handlers are shell one-liners, or `ebb worker` itself as an
//! http-mode upstream.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::support::free_port;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");

struct Worker {
    child: Child,
    base: String,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts `ebb worker --listen 127.0.0.1:PORT ARGS…` and waits for /_/health.
    async fn start(args: &[&str]) -> Worker {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(EBB)
            .arg("worker")
            .arg("--listen")
            .arg(&listen)
            .args(args)
            .env("EBB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ebb worker");
        let w = Worker {
            child,
            base: format!("http://{listen}"),
            stderr_path,
            _dir: dir,
        };
        w.wait_status("/_/health", 200, Duration::from_secs(10))
            .await;
        w
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("worker running") as i32)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    async fn get_status(&self, path: &str) -> Option<u16> {
        reqwest::get(self.url(path))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn wait_status(&self, path: &str, want: u16, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            if self.get_status(path).await == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} did not answer {want} within {bound:?}; worker stderr:\n{}",
                self.stderr()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.split(' ').next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn wait_metric(&self, name: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric(name).await != Some(want) {
            assert!(
                Instant::now() < deadline,
                "{name} never reached {want}; last {:?}",
                self.metric(name).await
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal worker");
    }

    async fn exit_code(&mut self, bound: Duration) -> i32 {
        let status = timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "worker did not exit within {bound:?}; stderr:\n{}",
                    self.stderr()
                )
            })
            .expect("wait worker");
        status.code().expect("worker exited by a signal")
    }
}

fn post(
    url: &str,
    body: &'static str,
) -> impl Future<Output = reqwest::Result<reqwest::Response>> + use<> {
    reqwest::Client::new()
        .post(url.to_string())
        .body(body)
        .send()
}

/// A handler that blocks until `gate` exists, then prints `done`.
fn gated_handler(gate: &Path) -> String {
    format!(
        "cat >/dev/null; while [ ! -e '{}' ]; do sleep 0.02; done; echo done",
        gate.display()
    )
}

impl Drop for Worker {
    /// Stops the worker the way Kubernetes does (SIGTERM, then SIGKILL), so
    /// that an http-mode worker stops its handler instead of orphaning it.
    #[allow(clippy::disallowed_methods)] // Drop cannot await; a short poll is fine in tests.
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(id) = self.child.id() {
            let _ = kill(Pid::from_raw(id as i32), Signal::SIGTERM);
            for _ in 0..150 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.start_kill();
    }
}

/// Alive means running: not gone, and not a zombie waiting to be reaped.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn fork_mode_echoes_stdin_to_stdout() {
    let w = Worker::start(&["--", "cat"]).await;
    let resp = reqwest::Client::new()
        .post(w.url("/anything?x=1"))
        .header("content-type", "application/json")
        .body("{\"hello\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), "{\"hello\":1}");
    assert_eq!(w.get_status("/_/ready").await, Some(200));
    assert_eq!(
        w.metric("ebb_worker_requests_total{status=\"200\"}").await,
        Some(1.0)
    );
    assert_eq!(w.metric("ebb_worker_inflight").await, Some(0.0));
}

#[tokio::test]
async fn fork_mode_passes_headers_as_watchdog_environment() {
    let w = Worker::start(&[
        "--",
        "sh",
        "-c",
        r#"printf '%s|%s|%s|%s|%s' "$Http_Method" "$Http_Path" "$Http_Query" "$Http_X_Call_Id" "$Http_Content_Type""#,
    ])
    .await;
    let body = reqwest::Client::new()
        .post(w.url("/fn/echo?a=1"))
        .header("X-Call-Id", "call-42")
        .header("Content-Type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "POST|/fn/echo|a=1|call-42|text/plain");
}

#[tokio::test]
async fn fork_mode_failure_is_500_with_stderr() {
    let w = Worker::start(&["--", "sh", "-c", "echo 'bad input' >&2; exit 3"]).await;
    let resp = post(&w.url("/"), "x").await.unwrap();
    assert_eq!(resp.status(), 500);
    let body = resp.text().await.unwrap();
    assert!(body.contains("bad input"), "{body}");
    assert!(body.contains("3"), "exit status missing: {body}");
    assert!(w.stderr().contains("bad input"), "stderr not logged");
}

#[tokio::test]
async fn fork_mode_timeout_is_504_and_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!(
        "echo $$ > '{p}'; sleep 30 & echo $! >> '{p}'; wait",
        p = pids.display()
    );
    let w = Worker::start(&["--timeout", "500ms", "--", "sh", "-c", &script]).await;
    let started = Instant::now();
    let resp = post(&w.url("/"), "").await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "handler and its child both recorded");
    // The handler and the process it started are both gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| process_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "handler processes {pids:?} survived the timeout"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn body_over_max_body_is_413() {
    let w = Worker::start(&["--max-body", "10", "--", "cat"]).await;
    let resp = post(&w.url("/"), "0123456789").await.unwrap();
    assert_eq!(resp.status(), 200, "exactly the limit is fine");
    let resp = post(&w.url("/"), "0123456789X").await.unwrap();
    assert_eq!(resp.status(), 413);
    // Without Content-Length (chunked), the limit holds while reading.
    let stream = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"012345")),
        Ok(bytes::Bytes::from_static(b"6789AB")),
    ]);
    let resp = reqwest::Client::new()
        .post(w.url("/"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn over_max_inflight_is_429_busy_and_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let script = gated_handler(&gate);
    let w = Worker::start(&["--max-inflight", "2", "--", "sh", "-c", &script]).await;
    let a = tokio::spawn(post(&w.url("/"), "a"));
    let b = tokio::spawn(post(&w.url("/"), "b"));
    w.wait_metric("ebb_worker_inflight", 2.0).await;

    let resp = post(&w.url("/"), "c").await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["ebb-worker"], "busy");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        w.get_status("/_/ready").await,
        Some(200),
        "busy is still ready"
    );

    std::fs::write(&gate, "").unwrap();
    for call in [a, b] {
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "done\n");
    }
    assert_eq!(
        w.metric("ebb_worker_refused_total{reason=\"busy\"}").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let script = gated_handler(&gate);
    let mut w = Worker::start(&["--drain-timeout", "20s", "--", "sh", "-c", &script]).await;
    let slow = tokio::spawn(post(&w.url("/"), "slow"));
    w.wait_metric("ebb_worker_inflight", 1.0).await;

    w.signal(Signal::SIGTERM);
    w.wait_status("/_/ready", 503, Duration::from_secs(5)).await;
    let refused = post(&w.url("/"), "late").await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["ebb-worker"], "draining");
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "exited before the slow call finished"
    );

    std::fs::write(&gate, "").unwrap();
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "done\n");
    assert_eq!(w.exit_code(Duration::from_secs(10)).await, 0);
}

#[tokio::test]
async fn drain_timeout_cuts_off_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec sleep 60", pidfile.display());
    let mut w = Worker::start(&["--drain-timeout", "500ms", "--", "sh", "-c", &script]).await;
    let stuck = tokio::spawn(post(&w.url("/"), ""));
    w.wait_metric("ebb_worker_inflight", 1.0).await;
    w.signal(Signal::SIGINT);
    assert_eq!(w.exit_code(Duration::from_secs(10)).await, 1);
    assert!(w.stderr().contains("cut off"), "{}", w.stderr());
    // The stuck call got an answer or a closed connection, never a hang.
    let answered = timeout(Duration::from_secs(5), stuck)
        .await
        .expect("call hung")
        .unwrap();
    if let Ok(resp) = answered {
        assert_eq!(resp.status(), 503);
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "handler {pid} outlived the worker"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// `ebb worker` in fork mode serves as an http-mode handler in these tests.
fn upstream_cmd(port: u16, handler: &str) -> Vec<String> {
    vec![
        EBB.to_string(),
        "worker".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--".into(),
        "sh".into(),
        "-c".into(),
        handler.into(),
    ]
}

fn http_mode_args(port: u16, extra: &[&str], handler: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--mode".into(),
        "http".into(),
        "--upstream".into(),
        format!("http://127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(handler.iter().cloned());
    args
}

#[tokio::test]
async fn http_mode_proxies_to_the_handler() {
    let port = free_port();
    let args = http_mode_args(
        port,
        &[],
        &upstream_cmd(port, "printf '%s:' \"$Http_X_Topic\"; cat"),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = Worker::start(&args).await;
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    for i in 0..20 {
        let resp = reqwest::Client::new()
            .post(w.url("/path"))
            .header("X-Topic", "orders")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), format!("orders:m{i}"));
    }
    // A failing handler's status passes through unchanged.
}

#[tokio::test]
async fn http_mode_is_not_ready_until_the_handler_listens() {
    let port = free_port();
    let mut handler = vec!["sh".to_string(), "-c".into()];
    handler.push(format!(
        "sleep 1; exec {EBB} worker --listen 127.0.0.1:{port} -- cat"
    ));
    let args = http_mode_args(port, &[], &handler);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let w = Worker::start(&args).await;
    assert_eq!(w.get_status("/_/ready").await, Some(503));
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    let resp = post(&w.url("/"), "late hello").await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "late hello");
}

#[tokio::test]
async fn http_mode_startup_timeout_exits_nonzero() {
    let port = free_port();
    let args = http_mode_args(
        port,
        &["--startup-timeout", "500ms"],
        &["sleep".into(), "30".into()],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut w = Worker::start(&args).await;
    assert_eq!(w.exit_code(Duration::from_secs(10)).await, 1);
    assert!(
        w.stderr().contains("did not accept connections"),
        "{}",
        w.stderr()
    );
}

#[tokio::test]
async fn http_mode_exits_nonzero_when_the_handler_dies() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let handler = vec![
        "sh".to_string(),
        "-c".into(),
        format!(
            "echo $$ > '{}'; exec {EBB} worker --listen 127.0.0.1:{port} -- cat",
            pidfile.display()
        ),
    ];
    let args = http_mode_args(port, &[], &handler);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut w = Worker::start(&args).await;
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert_ne!(w.exit_code(Duration::from_secs(10)).await, 0);
    assert!(w.stderr().contains("handler exited"), "{}", w.stderr());
}

#[tokio::test]
async fn http_mode_drains_before_stopping_the_handler() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let handler = upstream_cmd(port, &gated_handler(&gate));
    let args = http_mode_args(port, &["--drain-timeout", "20s"], &handler);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut w = Worker::start(&args).await;
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    let slow = tokio::spawn(post(&w.url("/"), "slow"));
    w.wait_metric("ebb_worker_inflight", 1.0).await;
    w.signal(Signal::SIGTERM);
    w.wait_status("/_/ready", 503, Duration::from_secs(5)).await;
    std::fs::write(&gate, "").unwrap();
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the handler was stopped before the call finished"
    );
    assert_eq!(resp.text().await.unwrap(), "done\n");
    assert_eq!(w.exit_code(Duration::from_secs(15)).await, 0);
}

#[tokio::test]
async fn bad_flags_exit_2_naming_the_flag() {
    let cases: [(&[&str], &str); 5] = [
        (&["--max-inflight", "lots", "--", "cat"], "--max-inflight"),
        (&["--max-inflight", "0", "--", "cat"], "--max-inflight"),
        (&["--timeout", "soon", "--", "cat"], "--timeout"),
        (&["--mode", "http", "--", "cat"], "--upstream"),
        (&["--mode", "fork"], "command"),
    ];
    for (args, flag) in cases {
        let out = Command::new(EBB)
            .arg("worker")
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains(flag),
            "{args:?}: first line {first:?} does not name {flag}"
        );
    }
}

/// The default `--max-body` (6MiB).
const DEFAULT_MAX_BODY: usize = 6 * 1024 * 1024;
/// What the acceptance's greedy handler writes.
const TWENTY_MIB: usize = 20 * 1024 * 1024;

/// `len` bytes of a pattern that shows reordered or lost chunks, from `start`.
fn pattern(start: usize, len: usize) -> Vec<u8> {
    (start..start + len).map(|i| (i % 251) as u8).collect()
}

/// The worker's peak resident memory so far, in MiB.
fn peak_rss_mib(w: &Worker) -> f64 {
    crate::support::proc_stat::status_mib(w.child.id().expect("worker running"), "VmHWM")
}

/// Gone means reaped: not even a zombie is left in /proc.
async fn wait_reaped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "handler {pid} was not killed and reaped"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Under 40 MiB (the acceptance), and grown by less than one 6MiB answer, so
/// no answer was held in memory whole.
fn assert_bounded(before: f64, peak: f64) {
    assert!(peak < 40.0, "worker peak RSS {peak:.1} MiB");
    assert!(
        peak - before < 6.0,
        "worker peak RSS grew by {:.1} MiB (from {before:.1} MiB)",
        peak - before
    );
}

async fn assert_too_large(resp: reqwest::Response, max: usize) {
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["ebb-worker"], "output-too-large");
    let text = resp.text().await.unwrap();
    assert!(text.contains(&format!("--max-body {max} bytes")), "{text}");
}

#[tokio::test]
async fn fork_mode_output_over_max_body_is_502_kills_the_handler_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "echo $$ > '{}'; exec head -c {TWENTY_MIB} /dev/zero",
        pidfile.display()
    );
    let w = Worker::start(&["--", "sh", "-c", &script]).await;
    let before = peak_rss_mib(&w);
    for _ in 0..2 {
        let resp = timeout(Duration::from_secs(60), post(&w.url("/"), ""))
            .await
            .expect("no answer to a greedy handler")
            .unwrap();
        assert_too_large(resp, DEFAULT_MAX_BODY).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_reaped(pid).await;
    }
    let peak = peak_rss_mib(&w);
    println!(
        "fork mode: worker peak RSS (VmHWM) {peak:.1} MiB after two handlers wrote 20 MiB each \
         (--max-body 6MiB); {before:.1} MiB before"
    );
    assert_bounded(before, peak);
    assert_eq!(
        w.metric("ebb_worker_requests_total{status=\"502\"}").await,
        Some(2.0)
    );
    w.wait_metric("ebb_worker_inflight", 0.0).await;
    // The worker goes on serving.
    let resp = post(&w.url("/"), "").await.unwrap();
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn fork_mode_output_up_to_max_body_is_200_with_exact_bytes() {
    const MAX: usize = 1024 * 1024;
    // `cat` answers with the request body (itself at most --max-body); with
    // `X-Extra` set, one byte more.
    let w = Worker::start(&[
        "--max-body",
        &MAX.to_string(),
        "--",
        "sh",
        "-c",
        r#"cat; if [ -n "$Http_X_Extra" ]; then printf x; fi"#,
    ])
    .await;
    let input = pattern(0, MAX);
    let resp = reqwest::Client::new()
        .post(w.url("/"))
        .body(input.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.headers()["content-length"], MAX.to_string().as_str());
    let got = resp.bytes().await.unwrap();
    assert!(
        got[..] == input[..],
        "answer differs from the handler's output"
    );

    let resp = reqwest::Client::new()
        .post(w.url("/"))
        .header("X-Extra", "1")
        .body(input)
        .send()
        .await
        .unwrap();
    assert_too_large(resp, MAX).await;
}

/// An upstream that answers `POST /{chunked|sized|stall}/{n}` with `n` bytes
/// of [`pattern`], produced as they are sent; `sized` and `stall` declare
/// Content-Length, and `stall` stops sending after 128 KiB.
async fn pattern_upstream() -> u16 {
    use axum::extract::Path as UrlPath;
    use axum::response::Response;
    use futures::StreamExt;

    async fn answer(UrlPath((kind, n)): UrlPath<(String, usize)>) -> Response {
        const CHUNK: usize = 64 * 1024;
        let chunks = futures::stream::iter((0..n).step_by(CHUNK).map(move |start| {
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(pattern(
                start,
                CHUNK.min(n - start),
            )))
        }));
        // `stall`: two chunks, then nothing, never ending.
        let chunks = if kind == "stall" {
            chunks.take(2).chain(futures::stream::pending()).boxed()
        } else {
            chunks.boxed()
        };
        let mut resp = Response::new(axum::body::Body::from_stream(chunks));
        if kind != "chunked" {
            resp.headers_mut()
                .insert("content-length", n.to_string().parse().unwrap());
        }
        resp
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/{kind}/{n}", axum::routing::any(answer));
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test]
async fn http_mode_answer_over_max_body_is_502_and_memory_stays_bounded() {
    let port = pattern_upstream().await;
    let upstream = format!("http://127.0.0.1:{port}");
    let w = Worker::start(&["--mode", "http", "--upstream", &upstream]).await;
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    let before = peak_rss_mib(&w);
    let call = |path: String| {
        let url = w.url(&path);
        async move {
            timeout(Duration::from_secs(60), post(&url, ""))
                .await
                .unwrap_or_else(|_| panic!("no answer to POST {path}"))
                .unwrap()
        }
    };

    // Without a length the answer is held until it ends: past 6MiB it is 502.
    assert_too_large(
        call(format!("/chunked/{TWENTY_MIB}")).await,
        DEFAULT_MAX_BODY,
    )
    .await;
    // A declared length over the limit is 502 without reading it all.
    assert_too_large(call(format!("/sized/{TWENTY_MIB}")).await, DEFAULT_MAX_BODY).await;

    // Up to the limit, both pass whole: a declared length is relayed as it
    // arrives, an unknown one is answered with its length once it ended.
    for kind in ["sized", "chunked"] {
        let resp = call(format!("/{kind}/{DEFAULT_MAX_BODY}")).await;
        assert_eq!(resp.status(), 200, "{kind}");
        assert_eq!(
            resp.headers()["content-length"],
            DEFAULT_MAX_BODY.to_string().as_str(),
            "{kind}"
        );
        let got = resp.bytes().await.unwrap();
        assert!(
            got[..] == pattern(0, DEFAULT_MAX_BODY)[..],
            "{kind}: answer differs from the upstream's"
        );
    }
    let peak = peak_rss_mib(&w);
    println!(
        "http mode: worker peak RSS (VmHWM) {peak:.1} MiB after two 20 MiB answers refused \
         and two 6 MiB answers passed (--max-body 6MiB); {before:.1} MiB before"
    );
    assert_bounded(before, peak);
    w.wait_metric("ebb_worker_inflight", 0.0).await;
}

#[tokio::test]
async fn http_mode_relayed_answer_breaks_off_at_the_timeout_and_frees_its_slot() {
    let port = pattern_upstream().await;
    let upstream = format!("http://127.0.0.1:{port}");
    let w = Worker::start(&["--mode", "http", "--upstream", &upstream, "--timeout", "1s"]).await;
    w.wait_status("/_/ready", 200, Duration::from_secs(10))
        .await;
    // The declared length fits, so the status goes out before the answer
    // ended; the upstream then stalls and the call's --timeout ends the body.
    let resp = timeout(Duration::from_secs(30), post(&w.url("/stall/1048576"), ""))
        .await
        .expect("no answer head")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = timeout(Duration::from_secs(30), resp.bytes())
        .await
        .expect("a stalled relayed answer hung past the call's timeout");
    assert!(body.is_err(), "a cut answer must not look complete");
    w.wait_metric("ebb_worker_inflight", 0.0).await;
}
