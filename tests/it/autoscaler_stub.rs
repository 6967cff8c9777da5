//! A stub HTTP endpoint for the autoscaler's Prometheus and in-flight
//! inputs: answers `GET PATH` with the exposition text set for that path
//! (404 when none), optionally after a delay and only with a bearer token.
//! It counts requests and the most requests it served at once.
//!
//! It runs on its own thread and runtime (two workers), so it answers while a
//! test blocks and does not compete with the test's runtime; it stops when
//! dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

#[derive(Default)]
struct Inner {
    bodies: Mutex<HashMap<String, String>>,
    delay: Mutex<Duration>,
    bearer: Mutex<Option<String>>,
    /// `Authorization` headers seen, in order (at most 1 000 kept).
    authorizations: Mutex<Vec<Option<String>>>,
    requests: AtomicU64,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
}

impl Inner {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running stub.
pub struct MetricsStub {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MetricsStub {
    /// Starts on 127.0.0.1 on a free port.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address"))
    }

    /// Starts on `addr` (port 0 for a free one).
    pub fn start_on(addr: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|err| panic!("metrics stub: cannot bind {addr}: {err}"));
        let addr = listener.local_addr().expect("metrics stub: local_addr");
        listener
            .set_nonblocking(true)
            .expect("metrics stub: set_nonblocking");
        let inner = Arc::new(Inner::default());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let state = inner.clone();
        std::thread::Builder::new()
            .name(format!("metrics-stub-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("metrics stub: runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("metrics stub: listener");
                    let app = axum::Router::new().fallback(handle).with_state(state);
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            if let Err(err) = result {
                                eprintln!("metrics stub: server stopped: {err}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
            })
            .expect("metrics stub: thread");
        Self {
            addr,
            inner,
            shutdown: Some(shutdown_tx),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serves `body` on `GET path`.
    pub fn set(&self, path: &str, body: impl Into<String>) {
        Inner::lock(&self.inner.bodies).insert(path.to_owned(), body.into());
    }

    /// Serves one gauge sample `name value` on `GET path`.
    pub fn set_gauge(&self, path: &str, name: &str, value: f64) {
        self.set(
            path,
            format!("# HELP {name} Stub.\n# TYPE {name} gauge\n{name} {value}\n"),
        );
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        *Inner::lock(&self.inner.delay) = delay;
    }

    /// Only requests with `Authorization: Bearer token` are answered (401
    /// otherwise); `None` accepts any.
    pub fn require_bearer(&self, token: Option<&str>) {
        *Inner::lock(&self.inner.bearer) = token.map(str::to_owned);
    }

    /// The `Authorization` headers seen so far (the first 1 000).
    pub fn authorizations(&self) -> Vec<Option<String>> {
        Inner::lock(&self.inner.authorizations).clone()
    }

    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// The most requests being answered at the same time so far.
    pub fn max_inflight(&self) -> usize {
        self.inner.max_inflight.load(Ordering::SeqCst)
    }
}

impl Drop for MetricsStub {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

struct InflightGuard<'a>(&'a Inner);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let now = inner.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_inflight.fetch_max(now, Ordering::SeqCst);
    let _guard = InflightGuard(&inner);
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    {
        let mut seen = Inner::lock(&inner.authorizations);
        if seen.len() < 1000 {
            seen.push(authorization.clone());
        }
    }
    let delay = *Inner::lock(&inner.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(token) = Inner::lock(&inner.bearer).clone()
        && authorization.as_deref() != Some(&format!("Bearer {token}"))
    {
        return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
    }
    let body = Inner::lock(&inner.bodies)
        .get(request.uri().path())
        .cloned();
    match body {
        Some(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        None => (StatusCode::NOT_FOUND, "no such path\n").into_response(),
    }
}
