//! HTTP doubles the `ebb` processes under test talk to: a function
//! ([`Sink`]) and an autoscaler that takes wake-ups ([`FakeAutoscaler`]).
//!
//! Both are axum servers in the test process on 127.0.0.1. A [`Sink`] records
//! every call (headers, body, arrival time), answers from a script (one
//! [`Reply`] per call in order, then a default), and tracks how many calls it
//! holds at once.
//!
//! ```ignore
//! let f = Sink::builder()
//!     .replies([Reply::status(500), Reply::status(500)])
//!     .otherwise(Reply::ok())
//!     .start()
//!     .await;
//! // … point a function's `url` at f.url(), publish …
//! f.wait_for_calls(3, Duration::from_secs(10)).await;
//! assert_eq!(f.calls()[2].header("ebb-attempt"), Some("3"));
//! ```

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the `wait_*` helpers look again.
const POLL: Duration = Duration::from_millis(10);

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    delay: Duration,
}

impl Reply {
    /// `200 OK`, empty body, at once.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// Any status, empty body, at once.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
        }
    }

    /// The worker's own refusal at max in-flight: `429` + `ebb-worker: busy`.
    pub fn busy() -> Self {
        Self::status(429).header("ebb-worker", "busy")
    }

    /// The worker's own refusal while draining: `503` + `ebb-worker: draining`.
    pub fn draining() -> Self {
        Self::status(503).header("ebb-worker", "draining")
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|err| panic!("bad header name {name:?}: {err}"));
        let value = HeaderValue::from_str(value)
            .unwrap_or_else(|err| panic!("bad header value {value:?}: {err}"));
        self.headers.push((name, value));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Answers only after `delay` (the call counts as in flight meanwhile).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One call the sink received.
#[derive(Debug, Clone)]
pub struct Call {
    /// 0-based, in order of arrival.
    pub index: usize,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request (with its whole body) arrived.
    pub at: Instant,
    /// The same moment on the wall clock (to compare with `ce-time`).
    pub wall: chrono::DateTime<chrono::Utc>,
}

impl Call {
    pub fn at_wall(&self) -> chrono::DateTime<chrono::Utc> {
        self.wall
    }

    /// A header as text (`None` when absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `ebb-attempt` as a number; panics when absent or not a number.
    pub fn attempt(&self) -> u32 {
        let raw = self.header("ebb-attempt");
        raw.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("call {} has no numeric ebb-attempt: {raw:?}", self.index))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug)]
struct SinkState {
    script: Mutex<VecDeque<Reply>>,
    otherwise: Mutex<Reply>,
    calls: Mutex<Vec<Call>>,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    completed: AtomicUsize,
}

/// Builds a [`Sink`]: scripted replies, the default reply, the port.
#[derive(Debug, Default)]
pub struct SinkBuilder {
    script: Vec<Reply>,
    otherwise: Option<Reply>,
    port: u16,
}

impl SinkBuilder {
    /// The answer to the next call not yet scripted.
    pub fn reply(mut self, reply: Reply) -> Self {
        self.script.push(reply);
        self
    }

    /// Answers to the next calls, in order.
    pub fn replies(mut self, replies: impl IntoIterator<Item = Reply>) -> Self {
        self.script.extend(replies);
        self
    }

    /// The answer once the script is used up (default: [`Reply::ok`]).
    pub fn otherwise(mut self, reply: Reply) -> Self {
        self.otherwise = Some(reply);
        self
    }

    /// Listens on this port of 127.0.0.1 instead of a fresh one (e.g. a
    /// function that comes up where the connector already expects it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub async fn start(self) -> Sink {
        let state = Arc::new(SinkState {
            script: Mutex::new(self.script.into()),
            otherwise: Mutex::new(self.otherwise.unwrap_or_else(Reply::ok)),
            calls: Mutex::new(Vec::new()),
            inflight: AtomicUsize::new(0),
            max_inflight: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
        });
        let router = Router::new()
            .fallback(answer)
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        let (addr, task) = serve(self.port, router).await;
        Sink { addr, state, task }
    }
}

/// A function double: records calls and answers as scripted.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    task: JoinHandle<()>,
}

impl Sink {
    pub fn builder() -> SinkBuilder {
        SinkBuilder::default()
    }

    /// A sink answering 200 to everything, on a fresh port.
    pub async fn start() -> Sink {
        Self::builder().start().await
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the answer once the script is used up.
    pub fn set_otherwise(&self, reply: Reply) {
        *lock(&self.state.otherwise) = reply;
    }

    /// Calls received so far (a copy).
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state.calls).clone()
    }

    /// How many calls arrived so far.
    pub fn count(&self) -> usize {
        lock(&self.state.calls).len()
    }

    /// Runs `f` over the calls without copying them.
    pub fn with_calls<T>(&self, f: impl FnOnce(&[Call]) -> T) -> T {
        f(&lock(&self.state.calls))
    }

    /// Calls answered so far (the reply was handed to the server).
    pub fn completed(&self) -> usize {
        self.state.completed.load(Ordering::SeqCst)
    }

    /// Calls being answered now.
    pub fn inflight(&self) -> usize {
        self.state.inflight.load(Ordering::SeqCst)
    }

    /// The most calls ever held at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_inflight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` calls arrived; panics after `limit`.
    pub async fn wait_for_calls(&self, n: usize, limit: Duration) {
        self.wait_until(limit, &format!("{n} call(s)"), |s| s.count() >= n)
            .await;
    }

    /// Waits until `done(self)` holds; panics (saying what it waited for and
    /// how many calls came) after `limit`.
    pub async fn wait_until(&self, limit: Duration, what: &str, done: impl Fn(&Sink) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sink {}: no {what} within {limit:?} ({} call(s) so far)",
                    self.url(),
                    self.count()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the in-flight count and counts the call as answered, also when
/// the client hangs up and the handler is dropped.
struct InflightGuard(Arc<SinkState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.completed.fetch_add(1, Ordering::SeqCst);
    }
}

async fn answer(
    State(state): State<Arc<SinkState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = state.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_inflight.fetch_max(now, Ordering::SeqCst);
    let guard = InflightGuard(state.clone());
    let reply = {
        let mut calls = lock(&state.calls);
        let index = calls.len();
        calls.push(Call {
            index,
            method,
            headers,
            body,
            at: Instant::now(),
            wall: chrono::Utc::now(),
        });
        // Take the reply under the calls lock, so call n gets reply n.
        lock(&state.script)
            .pop_front()
            .unwrap_or_else(|| lock(&state.otherwise).clone())
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let status = StatusCode::from_u16(reply.status)
        .unwrap_or_else(|err| panic!("bad scripted status {}: {err}", reply.status));
    let mut response = (status, reply.body).into_response();
    response.headers_mut().extend(reply.headers);
    drop(guard);
    response
}

/// A wake-up the fake autoscaler received.
#[derive(Debug, Clone)]
pub struct Wake {
    /// `/wake/{namespace}/{function}`
    pub path: String,
    pub at: Instant,
}

/// The autoscaler's wake-up endpoint: records every `POST /wake/{ns}/{fn}`
/// and answers 202; anything else is 404.
#[derive(Debug)]
pub struct FakeAutoscaler {
    addr: SocketAddr,
    wakes: Arc<Mutex<Vec<Wake>>>,
    task: JoinHandle<()>,
}

impl FakeAutoscaler {
    pub async fn start() -> Self {
        let wakes = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new().fallback(wake).with_state(wakes.clone());
        let (addr, task) = serve(0, router).await;
        Self { addr, wakes, task }
    }

    /// `http://127.0.0.1:PORT`, for `--autoscaler-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn wakes(&self) -> Vec<Wake> {
        lock(&self.wakes).clone()
    }

    /// Waits for a wake-up on `path`; panics after `limit`.
    pub async fn wait_for_wake(&self, path: &str, limit: Duration) -> Wake {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(w) = self.wakes().into_iter().find(|w| w.path == path) {
                return w;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no wake-up POST {path} within {limit:?}; got {:?}",
                    self.wakes()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for FakeAutoscaler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wake(State(wakes): State<Arc<Mutex<Vec<Wake>>>>, method: Method, uri: Uri) -> StatusCode {
    let path = uri.path().to_owned();
    if method != Method::POST || path.split('/').count() != 4 || !path.starts_with("/wake/") {
        return StatusCode::NOT_FOUND;
    }
    lock(&wakes).push(Wake {
        path,
        at: Instant::now(),
    });
    StatusCode::ACCEPTED
}

async fn serve(port: u16, router: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:{port}: {err}"));
    let addr = listener
        .local_addr()
        .expect("local_addr of a bound listener");
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            eprintln!("test HTTP server on {addr} stopped: {err}");
        }
    });
    (addr, task)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
