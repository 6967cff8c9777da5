//! A throwaway `nats-server -js` per test.

use super::http;
use super::process::pid;
use super::{find_executable, free_port, tail_file, workspace_root};
use nix::sys::signal::{Signal, kill};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// How long a start may take before the test fails.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long a SIGTERMed server may take to exit before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A NATS server with JetStream for one test.
///
/// [`start`](Self::start) uses `EBB_TEST_NATS_URL` when set; otherwise it runs
/// `nats-server -js -a 127.0.0.1 -p PORT -m MONITOR_PORT -sd STORE_DIR` from
/// `EBB_NATS_SERVER`, `<workspace>/.venv/bin/nats-server` or `PATH`. The local
/// server is stopped (SIGTERM, then SIGKILL) when this is dropped; its store
/// lives in a temp dir removed at the same time.
pub struct NatsServer {
    url: String,
    local: Option<Local>,
}

struct Local {
    bin: PathBuf,
    port: u16,
    monitor_port: u16,
    /// Holds `store/` (JetStream) and `nats-server.log`.
    dir: TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// `EBB_TEST_NATS_URL` if set, else a fresh local server.
    pub async fn start() -> Self {
        match std::env::var("EBB_TEST_NATS_URL") {
            Ok(url) if !url.is_empty() => Self { url, local: None },
            _ => Self::start_local().await,
        }
    }

    /// Always a fresh local server (for tests that stop or restart it).
    pub async fn start_local() -> Self {
        let bin = find_executable(
            "EBB_NATS_SERVER",
            &[workspace_root().join(".venv/bin/nats-server")],
            "nats-server",
        );
        let dir = tempfile::Builder::new()
            .prefix("ebb-test-nats-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp dir for nats-server: {err}"));
        let mut local = Local {
            bin,
            port: 0,
            monitor_port: 0,
            dir,
            child: None,
        };
        // Ports are picked before the server binds them, so another process can
        // take one in between: try again with fresh ports.
        for attempt in 1..=3 {
            local.port = free_port();
            local.monitor_port = free_port();
            match local.spawn_and_wait().await {
                Ok(()) => {
                    let url = format!("nats://127.0.0.1:{}", local.port);
                    return Self {
                        url,
                        local: Some(local),
                    };
                }
                Err(err) if attempt < 3 && local.log().contains("address already in use") => {
                    eprintln!("nats-server start failed ({err}), retrying with other ports");
                }
                Err(err) => panic!("{err}\n{}", local.log()),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `nats://127.0.0.1:PORT` (or `EBB_TEST_NATS_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The JetStream store directory (`-sd`) of the local server.
    pub fn store_dir(&self) -> PathBuf {
        self.local().dir.path().join("store")
    }

    /// Stops the server (SIGTERM, SIGKILL after 5 s) and waits for it to exit.
    /// The port and store stay reserved for [`start_again`](Self::start_again).
    pub async fn stop(&mut self) {
        let local = self.local_mut();
        if let Some(mut child) = local.child.take() {
            let _ = kill(pid(child.id()), Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                }
            }
        }
    }

    /// Starts the stopped server again on the same port with the same store.
    pub async fn start_again(&mut self) {
        let local = self.local_mut();
        assert!(
            local.child.is_none(),
            "start_again: nats-server is still running"
        );
        if let Err(err) = local.spawn_and_wait().await {
            panic!("restarting nats-server: {err}\n{}", local.log());
        }
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again): same
    /// URL, same JetStream data, clients see a dropped connection.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    fn local(&self) -> &Local {
        self.local.as_ref().expect(
            "needs a local nats-server; use NatsServer::start_local() or unset EBB_TEST_NATS_URL",
        )
    }

    fn local_mut(&mut self) -> &mut Local {
        self.local.as_mut().expect(
            "needs a local nats-server; use NatsServer::start_local() or unset EBB_TEST_NATS_URL",
        )
    }
}

impl Local {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn log(&self) -> String {
        tail_file(&self.log_path(), 200)
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = open_append(&self.log_path());
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log file"))
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|err| format!("cannot run {}: {err}", self.bin.display()))?;
        let child = self.child.insert(child);
        let healthz = format!(
            "http://127.0.0.1:{}/healthz?js-enabled-only=true",
            self.monitor_port
        );
        let deadline = tokio::time::Instant::now() + READY_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("nats-server exited during startup ({status})"));
            }
            let answer = http::request(
                hyper::Method::GET,
                &healthz,
                None,
                None,
                Duration::from_secs(1),
            )
            .await;
            if answer.is_ok_and(|r| r.status.is_success()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return Err(format!(
                    "nats-server was not ready within {READY_LIMIT:?} ({healthz})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Local {
    #[allow(
        clippy::disallowed_methods,
        reason = "Drop cannot await; a bounded poll (at most STOP_GRACE) for the child to exit"
    )]
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(pid(child.id()), Signal::SIGTERM);
        let step = Duration::from_millis(10);
        for _ in 0..(STOP_GRACE.as_millis() / step.as_millis()) {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(step);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()))
}
