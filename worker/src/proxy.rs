//! Http mode: the handler is one long-lived HTTP server that the worker
//! starts, watches and proxies to over pooled keep-alive connections.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::output::{self, Limits, PREFIX, Spool};
use crate::server::{Call, State, text};
use crate::{Config, Error};

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub struct Proxy {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// How an answer with a status already decided by the upstream goes on.
enum Rest {
    /// It ended within the prefix.
    Ended(Bytes),
    /// More follows.
    Open(Bytes, Incoming),
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(h);
    }
}

impl Proxy {
    pub fn new(upstream: Uri) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { upstream, client }
    }

    pub fn upstream(&self) -> &Uri {
        &self.upstream
    }

    fn target(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let base = self.upstream.path().trim_end_matches('/');
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut parts = http::uri::Parts::default();
        parts.scheme = self.upstream.scheme().cloned();
        parts.authority = self.upstream.authority().cloned();
        parts.path_and_query = Some(format!("{base}{pq}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }

    /// Passes `call` on. The status is sent once the answer is known to fit
    /// in `limits.max`; an answer relayed after that is bound by `limits`.
    pub async fn call(&self, call: Call, limits: Limits) -> Response {
        let Call { mut parts, body } = call;
        let uri = match self.target(&parts.uri) {
            Ok(u) => u,
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, format!("bad request path: {e}\n"));
            }
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        let req = http::Request::from_parts(parts, Full::new(body));
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %self.upstream, error = %e, "handler unreachable");
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("handler at {} unreachable: {e}\n", self.upstream),
                );
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let max = limits.max;
        // The status waits until the answer is known to fit in --max-body
        // (see `output`). Small answers end within the prefix and are
        // answered whole, as they always were.
        let (head, incoming) = match read_prefix(incoming, max).await {
            Ok(Rest::Ended(all)) => return Response::from_parts(parts, Body::from(all)),
            Ok(Rest::Open(head, incoming)) => (head, incoming),
            Err(e) => return self.failed(e, max),
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > max as u64 => self.failed(Error::OutputTooLarge { max }, max),
            // Known to fit: relayed as it arrives, within the call's bounds.
            Some(_) => Response::from_parts(parts, output::relay(head, incoming, limits)),
            // Unknown length: held until it ends (the call's --timeout bounds this).
            None => match spool(head, incoming, max).await {
                Ok(spool) => match spool.into_body().await {
                    Ok((body, declare)) => {
                        if let Some(len) = declare {
                            parts
                                .headers
                                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                        }
                        Response::from_parts(parts, body)
                    }
                    Err(e) => self.failed(e, max),
                },
                Err(e) => self.failed(e, max),
            },
        }
    }

    fn failed(&self, e: Error, max: usize) -> Response {
        tracing::warn!(upstream = %self.upstream, error = %e, "cannot pass on the handler's answer");
        match e {
            Error::OutputTooLarge { .. } => output::too_large(max),
            Error::AnswerCut(why) => text(
                StatusCode::BAD_GATEWAY,
                format!("handler broke off its answer: {why}\n"),
            ),
            e => text(StatusCode::BAD_GATEWAY, format!("{e}\n")),
        }
    }
}

/// Reads an answer until it ends or passes [`PREFIX`] bytes.
async fn read_prefix(mut incoming: Incoming, max: usize) -> Result<Rest, Error> {
    let mut head = BytesMut::new();
    while head.len() <= PREFIX {
        match incoming.frame().await {
            None => return Ok(Rest::Ended(head.freeze())),
            Some(Err(e)) => return Err(Error::AnswerCut(e.to_string())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if data.len() > max - head.len() {
                        return Err(Error::OutputTooLarge { max });
                    }
                    head.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(Rest::Open(head.freeze(), incoming))
}

/// Holds the rest of an answer of unknown length until it ends.
async fn spool(head: Bytes, mut incoming: Incoming, max: usize) -> Result<Spool, Error> {
    let mut spool = Spool::new(max);
    spool.push(&head).await?;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| Error::AnswerCut(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            spool.push(&data).await?;
        }
    }
    Ok(spool)
}

/// The http-mode handler process.
pub struct Handler {
    child: Child,
    pgid: Option<Pid>,
    command: String,
    exited: Option<String>,
}

impl Handler {
    pub fn spawn(command: &[String]) -> Result<Self, Error> {
        let Some((program, args)) = command.split_first() else {
            return Err(Error::Config("empty handler command".into()));
        };
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            // Its own group: the terminal's Ctrl-C reaches the worker only, and
            // the worker stops the handler after draining.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: command.join(" "),
                source,
            })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        tracing::info!(command = %command.join(" "), pid = ?child.id(), "started handler");
        Ok(Self {
            child,
            pgid,
            command: command.join(" "),
            exited: None,
        })
    }

    async fn wait(&mut self) -> String {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let s = match self.child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        self.exited = Some(s.clone());
        s
    }

    /// SIGTERM to the handler's group, SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if self.exited.is_some() {
            return;
        }
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            tracing::warn!(command = %self.command, "handler ignored SIGTERM; killing it");
            if let Some(pgid) = self.pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = self.wait().await;
        }
        // Whatever else it started in its group goes too.
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Resolves when the handler exits, with its exit status; never without one.
pub async fn wait_exit(handler: Option<&mut Handler>) -> String {
    match handler {
        Some(h) => h.wait().await,
        None => std::future::pending().await,
    }
}

/// Waits until the upstream accepts TCP connections, bounded by
/// `--startup-timeout`; fails at once if the handler exits first.
pub async fn wait_until_up(
    config: &Config,
    _state: &Arc<State>,
    mut handler: Option<&mut Handler>,
) -> Result<(), Error> {
    let upstream = config
        .upstream
        .as_ref()
        .ok_or_else(|| Error::Config("--mode http needs --upstream URL".into()))?;
    let authority = upstream
        .authority()
        .ok_or_else(|| Error::Config(format!("--upstream `{upstream}` has no host")))?;
    let port = authority.port_u16().unwrap_or(80);
    let addr = format!("{}:{port}", authority.host().trim_matches(['[', ']']));
    let deadline = Instant::now() + config.startup_timeout;
    let mut pauses =
        ebb_runtime::Retrying::new(Duration::from_millis(5), Duration::from_millis(100));
    loop {
        let delay = pauses.next_pause();
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::StartupTimeout {
                upstream: upstream.to_string(),
                timeout: config.startup_timeout,
            });
        }
        match handler.as_deref_mut() {
            Some(h) => {
                tokio::select! {
                    status = h.wait() => return Err(Error::HandlerExited { status }),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            None => tokio::time::sleep(delay).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-topic", "orders".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-topic"], "orders");
    }

    #[test]
    fn target_keeps_path_and_query_under_the_upstream_base() {
        let p = Proxy::new("http://127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            p.target(&"/a/b?x=1".parse().unwrap()).unwrap(),
            "http://127.0.0.1:9000/a/b?x=1"
        );
        let p = Proxy::new("http://127.0.0.1:9000/base/".parse().unwrap());
        assert_eq!(
            p.target(&"/a".parse().unwrap()).unwrap(),
            "http://127.0.0.1:9000/base/a"
        );
    }
}
