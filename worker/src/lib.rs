//! `ebb worker`: the runtime in front of a function's handler.
//!
//! It serves the worker contract of ebb's design: the function's HTTP
//! endpoint (any path, any method), `GET /_/health`, `GET /_/ready` and
//! `GET /metrics`, with a hard bound on concurrent calls, a per-call timeout,
//! a body size limit and a graceful drain on SIGTERM. The handler is either a
//! process per request ([`Mode::Fork`]) or one long-lived HTTP server that the
//! worker starts and proxies to ([`Mode::Http`]).
//!
//! `--max-body` bounds the handler's answer too: larger answers get 502 with
//! `ebb-worker: output-too-large` (a fork-mode handler is killed). The status
//! is sent once the answer is known to fit (it ended, or an http-mode upstream
//! declared a `Content-Length` that fits and is relayed as it arrives); until
//! then the answer waits in a spool of 64 KiB in memory plus an unlinked
//! temporary file, so memory stays bounded whatever the handler writes
//! (`output.rs` has the rule).
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

mod env;
mod fork;
mod metrics;
mod output;
mod proxy;
mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use env::watchdog_env;
pub use metrics::Metrics;
pub use server::{State, router};

/// How the handler is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One process per request: body on stdin, stdout is the response.
    Fork,
    /// One long-lived HTTP server, started once and proxied to.
    Http,
}

/// Everything `ebb worker` needs, already validated by the caller's parser.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the worker's HTTP server.
    pub listen: SocketAddr,
    pub mode: Mode,
    /// Where the handler listens in http mode (`http://127.0.0.1:8081`).
    pub upstream: Option<http::Uri>,
    /// Calls served at once; more are refused with 429 `ebb-worker: busy`.
    pub max_inflight: usize,
    /// Bound of one call; past it the call is cut off with 504.
    pub timeout: Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Largest request body accepted (larger ones get 413), and largest answer
    /// passed on (larger ones get 502 `ebb-worker: output-too-large`).
    pub max_body: usize,
    /// How long the http-mode handler may take to accept connections.
    pub startup_timeout: Duration,
    /// The handler command and its arguments (may be empty in http mode when
    /// the upstream runs on its own, e.g. as a sidecar).
    pub command: Vec<String>,
}

impl Config {
    /// Checks the combinations that a flag parser cannot see one flag at a time.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_inflight == 0 {
            return Err(Error::Config("--max-inflight must be at least 1".into()));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("--timeout must be longer than 0s".into()));
        }
        match self.mode {
            Mode::Fork if self.command.is_empty() => Err(Error::Config(
                "fork mode needs the handler command after `--`, e.g. `ebb worker -- cat`".into(),
            )),
            Mode::Fork if self.upstream.is_some() => Err(Error::Config(
                "--upstream is only used with --mode http".into(),
            )),
            Mode::Http => match &self.upstream {
                None => Err(Error::Config(
                    "--mode http needs --upstream URL, where the handler listens (e.g. http://127.0.0.1:8081)".into(),
                )),
                Some(u) if u.scheme_str() != Some("http") || u.authority().is_none() => {
                    Err(Error::Config(format!(
                        "--upstream `{u}` must be an http:// URL with a host and port"
                    )))
                }
                Some(_) => Ok(()),
            },
            Mode::Fork => Ok(()),
        }
    }
}

/// How a worker run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every in-flight call finished within the drain timeout.
    Drained,
    /// The drain timeout passed with this many calls still running; they were cut off.
    CutOff(usize),
}

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start handler `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("handler did not accept connections on {upstream} within {timeout:?}")]
    StartupTimeout { upstream: String, timeout: Duration },
    #[error("handler exited ({status}); the worker stops so that the pod is restarted")]
    HandlerExited { status: String },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("the handler's answer is larger than --max-body {max} bytes")]
    OutputTooLarge { max: usize },
    #[error("cannot hold the handler's answer: {0}")]
    Spool(std::io::Error),
    #[error("the handler's answer was cut off: {0}")]
    AnswerCut(String),
}

impl Error {
    /// A bounded label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Bind { .. } => "bind",
            Self::Spawn { .. } => "spawn",
            Self::StartupTimeout { .. } => "startup_timeout",
            Self::HandlerExited { .. } => "handler_exited",
            Self::Serve(_) => "serve",
            Self::OutputTooLarge { .. } => "output_too_large",
            Self::Spool(_) => "spool",
            Self::AnswerCut(_) => "answer_cut",
        }
    }

    /// Whether this is a configuration mistake (exit code 2) rather than a
    /// failure at run time.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// Runs the worker until `shutdown` resolves, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Outcome, Error> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    run_on(listener, config, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind `127.0.0.1:0`).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Outcome, Error> {
    config.validate()?;
    let addr = listener.local_addr().map_err(Error::Serve)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);

    let (runner, handler) = match config.mode {
        Mode::Fork => (
            server::Runner::Fork(fork::ForkRunner::new(
                config.command.clone(),
                config.max_body,
            )),
            None,
        ),
        Mode::Http => {
            let upstream = config
                .upstream
                .clone()
                .ok_or_else(|| Error::Config("--mode http needs --upstream URL".into()))?;
            let handler = if config.command.is_empty() {
                None
            } else {
                Some(proxy::Handler::spawn(&config.command)?)
            };
            (server::Runner::Http(proxy::Proxy::new(upstream)), handler)
        }
    };
    let state = Arc::new(State::new(&config, runner, metrics, registry));
    let app = router(state.clone());

    let stop_server = tokio_util::sync::CancellationToken::new();
    let serve = {
        let stop = stop_server.clone();
        // Answers are small and latency matters more than packet count.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await })
    };
    // The server runs in its own task, so that it keeps accepting (and
    // answering probes) while this task waits for the drain.
    let mut serve = tokio::spawn(async move { serve.await });
    tracing::info!(%addr, mode = ?config.mode, max_inflight = config.max_inflight, "worker listening");

    let mut handler = handler;
    let mut shutdown = std::pin::pin!(shutdown);

    // Phase 1: serve until asked to stop (or the handler dies).
    if config.mode == Mode::Http {
        let startup = proxy::wait_until_up(&config, &state, handler.as_mut());
        tokio::select! {
            r = startup => r?,
            r = &mut serve => return Err(server_stopped(r)),
            () = &mut shutdown => {
                if let Some(h) = handler.as_mut() { h.stop(Duration::from_secs(5)).await; }
                return Ok(Outcome::Drained);
            }
        }
        state.set_upstream_up(true);
        tracing::info!(upstream = %state.upstream_display(), "handler is up; worker ready");
    }
    tokio::select! {
        () = &mut shutdown => {}
        status = proxy::wait_exit(handler.as_mut()) => {
            state.set_upstream_up(false);
            tracing::error!(%status, "handler exited");
            return Err(Error::HandlerExited { status });
        }
        r = &mut serve => return Err(server_stopped(r)),
    }

    // Phase 2: drain. Ready turns 503 and new calls are refused with 503
    // `ebb-worker: draining`, but the listener stays open so that probes and
    // late requests get an answer instead of a refused connection.
    state.start_draining();
    let inflight = state.inflight();
    tracing::info!(inflight, drain_timeout = ?config.drain_timeout, "draining");
    let outcome = match tokio::time::timeout(config.drain_timeout, state.idle()).await {
        Ok(()) => Outcome::Drained,
        Err(_) => {
            let left = state.inflight();
            tracing::warn!(
                left,
                "drain timeout passed; cutting off calls still running"
            );
            Outcome::CutOff(left)
        }
    };
    // Calls still running are answered 503 now; fork children are killed
    // with their process groups.
    state.cut_off();
    stop_server.cancel();
    // Idle keep-alive connections close at once; give the rest a short bound.
    if tokio::time::timeout(Duration::from_secs(1), &mut serve)
        .await
        .is_err()
    {
        serve.abort();
    }
    if let Some(h) = handler.as_mut() {
        h.stop(Duration::from_secs(5)).await;
    }
    Ok(outcome)
}

fn server_stopped(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> Error {
    match r {
        Ok(Ok(())) => Error::Serve(std::io::Error::other("server stopped unexpectedly")),
        Ok(Err(e)) => Error::Serve(e),
        Err(e) => Error::Serve(std::io::Error::other(e.to_string())),
    }
}
