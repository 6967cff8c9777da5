//! Fork mode: one handler process per call.

use std::process::Stdio;
use std::time::Duration;

use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdout, Command};

use crate::Error;
use crate::output::{self, CHUNK, Spool};
use crate::server::{Call, body, text};

/// How much of a failing handler's stderr goes into the 500 response.
const STDERR_IN_RESPONSE: usize = 1024;
/// How much of a handler's stderr goes into one log line.
const STDERR_IN_LOG: usize = 4096;

pub struct ForkRunner {
    command: Vec<String>,
    /// `--max-body`: more output than this is a 502 and the handler is killed.
    max_output: usize,
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
    pub fn new(command: Vec<String>, max_output: usize) -> Self {
        Self {
            command,
            max_output,
        }
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
        let pgid = group.pgid;
        let max = self.max_output;
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
                let mut spool = Spool::new(max);
                let read = match stdout.as_mut() {
                    Some(s) => read_into(s, &mut spool).await,
                    None => Ok(()),
                };
                if read.is_err() {
                    // Nobody reads its stdout any more: stop it now rather
                    // than let it block on a full pipe until the timeout.
                    if let Some(pgid) = pgid {
                        let _ = killpg(pgid, Signal::SIGKILL);
                    }
                }
                read.map(|()| spool)
            };
            let read_err = async {
                let mut kept = Vec::new();
                if let Some(s) = stderr.as_mut() {
                    read_bounded(s, &mut kept, STDERR_IN_LOG).await;
                }
                kept
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
        let spool = match out {
            Ok(spool) => spool,
            Err(e @ Error::OutputTooLarge { .. }) => {
                tracing::warn!(command = %program, error = %e, "handler wrote too much; killed its process group");
                return output::too_large(max);
            }
            Err(e) => {
                tracing::warn!(command = %program, error = %e, "cannot read the handler's output; killed its process group");
                return text(StatusCode::BAD_GATEWAY, format!("{e}\n"));
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
        let (out, declare) = match spool.into_body().await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(command = %program, error = %e, "cannot read back the handler's output");
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
            }
        };
        let mut resp = Response::new(out);
        if let Some(len) = declare {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
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

/// Reads a handler's stdout to its end into `spool`, chunk by chunk; stops at
/// the first chunk that would take it past `--max-body`.
async fn read_into(out: &mut ChildStdout, spool: &mut Spool) -> Result<(), Error> {
    let mut buf = vec![0; CHUNK];
    loop {
        match out.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(n) => spool.push(&buf[..n]).await?,
            Err(e) => return Err(Error::AnswerCut(format!("cannot read its stdout: {e}"))),
        }
    }
}

/// Reads `from` to its end, keeping its first `keep` bytes in `kept`.
async fn read_bounded(from: &mut ChildStderr, kept: &mut Vec<u8>, keep: usize) {
    let mut buf = vec![0; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = keep.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}
