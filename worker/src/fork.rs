//! Fork mode: one handler process per call.

use std::process::Stdio;
use std::time::Duration;

use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::server::{Call, body, text};

/// How much of a failing handler's stderr goes into the 500 response.
const STDERR_IN_RESPONSE: usize = 1024;
/// How much of a handler's stderr goes into one log line.
const STDERR_IN_LOG: usize = 4096;

pub struct ForkRunner {
    command: Vec<String>,
}

/// Kills the handler's whole process group unless disarmed: a call that is
/// cut off (timeout, client gone, drain timeout) leaves nothing running.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // ESRCH means it is already gone, which is the goal.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

impl ForkRunner {
    pub fn new(command: Vec<String>) -> Self {
        Self { command }
    }

    pub async fn call(&self, call: Call, timeout: Duration) -> Response {
        let Some((program, args)) = self.command.split_first() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "no handler command\n");
        };
        let env = crate::env::watchdog_env(
            &call.parts.method,
            &call.parts.uri,
            &call.parts.headers,
            call.body.len(),
        );
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started too,
            // and a Ctrl-C at the terminal reaches only the worker, which drains.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(command = %program, error = %e, "cannot start handler");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot start handler `{program}`: {e}\n"),
                );
            }
        };
        let mut group = GroupGuard {
            pgid: child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        };

        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let input = call.body;
        let io = async {
            let write = async {
                if let Some(mut s) = stdin.take() {
                    // A handler that does not read its input closes the pipe
                    // early; that is its right, not an error.
                    let _ = s.write_all(&input).await;
                    let _ = s.shutdown().await;
                }
            };
            let read_out = async {
                let mut buf = Vec::new();
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_end(&mut buf).await;
                }
                buf
            };
            let read_err = async {
                let mut buf = Vec::new();
                if let Some(s) = stderr.as_mut() {
                    let _ = s.read_to_end(&mut buf).await;
                }
                buf
            };
            let ((), out, err, status) = tokio::join!(write, read_out, read_err, child.wait());
            (out, err, status)
        };
        let (out, err, status) = match tokio::time::timeout(timeout, io).await {
            Ok(r) => r,
            Err(_) => {
                group.kill();
                // Reap it now, so no zombie outlives the call.
                let _ = child.wait().await;
                tracing::warn!(command = %program, ?timeout, "handler timed out; killed its process group");
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("handler did not finish within {timeout:?}\n"),
                );
            }
        };
        // The handler has exited; anything it left running in its group goes too.
        group.kill();
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot wait for handler: {e}\n"),
                );
            }
        };
        if !err.is_empty() {
            let shown = String::from_utf8_lossy(&err[..err.len().min(STDERR_IN_LOG)]);
            if status.success() {
                tracing::info!(command = %program, stderr = %shown.trim_end(), "handler stderr");
            } else {
                tracing::warn!(command = %program, %status, stderr = %shown.trim_end(), "handler failed");
            }
        } else if !status.success() {
            tracing::warn!(command = %program, %status, "handler failed");
        }
        if !status.success() {
            let mut msg = format!("handler failed ({status})\n").into_bytes();
            msg.extend_from_slice(&err[..err.len().min(STDERR_IN_RESPONSE)]);
            let mut resp = Response::new(body(msg));
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return resp;
        }
        let mut resp = Response::new(body(out));
        // Like the OpenFaaS watchdog: the answer has the request's content type.
        let ct = call
            .parts
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        resp
    }
}
