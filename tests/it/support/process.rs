//! Running the `ebb` binary (or any other child) from tests.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// The `ebb` binary cargo built for these tests.
pub fn ebb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ebb"))
}

/// A command for the `ebb` binary; add args and env, then [`ChildGuard::spawn`].
pub fn ebb_command() -> Command {
    let mut cmd = Command::new(ebb_bin());
    cmd.stdin(Stdio::null());
    cmd
}

/// A running child that is killed (SIGKILL, by pid) when dropped.
///
/// Stdout and stderr are captured into one buffer ([`output`](Self::output))
/// and echoed to the test's stderr as `[name] line`, so a failing test shows
/// what the child said.
pub struct ChildGuard {
    name: String,
    pid: u32,
    child: Child,
    output: Arc<Mutex<String>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr piped. Must run inside a tokio runtime.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot spawn {name} ({cmd:?}): {err}"));
        let pid = child.id().expect("a just-spawned child has a pid");
        let output = Arc::new(Mutex::new(String::new()));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(capture(name.to_owned(), stdout, output.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(capture(name.to_owned(), stderr, output.clone()));
        }
        Self {
            name: name.to_owned(),
            pid,
            child,
            output,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the output contains `needle`; panics (with the output) on
    /// timeout or when the child exits first.
    pub async fn wait_for_output(&mut self, needle: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.output().contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                // Give the readers a moment to drain the pipes, then look again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.output().contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before printing {needle:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not print {needle:?} within {limit:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) {
        if let Err(err) = kill(pid(self.pid), signal) {
            panic!(
                "cannot send {signal} to {} (pid {}): {err}",
                self.name, self.pid
            );
        }
    }

    /// The exit status if the child has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|err| panic!("try_wait on {}: {err}", self.name))
    }

    /// Waits for the child to exit; panics (with its output) after `limit`.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(err)) => panic!("waiting for {}: {err}", self.name),
            Err(_) => panic!(
                "{} did not exit within {limit:?}; output:\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        self.signal(Signal::SIGTERM);
        if let Ok(Ok(status)) = tokio::time::timeout(grace, self.child.wait()).await {
            return status;
        }
        self.signal(Signal::SIGKILL);
        self.wait(Duration::from_secs(10)).await
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // tokio reaps the killed child in the background.
            let _ = kill(pid(self.pid), Signal::SIGKILL);
        }
    }
}

pub(crate) fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

async fn capture(name: String, stream: impl AsyncRead + Unpin, output: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
        let mut output = output.lock().unwrap_or_else(|p| p.into_inner());
        output.push_str(&line);
        output.push('\n');
    }
}
