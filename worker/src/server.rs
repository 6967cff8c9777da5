//! The worker's HTTP front: admission (draining, busy, body size), the
//! per-call timeout, and the admin endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use ebb_model::refusal;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, RefusalLabels, RefusalReason, StatusLabels};
use crate::output::Limits;
use crate::{Config, fork, proxy};

/// How calls reach the handler.
pub enum Runner {
    Fork(fork::ForkRunner),
    Http(proxy::Proxy),
}

/// A call as the handler sees it: the request head and its whole body.
pub struct Call {
    pub parts: http::request::Parts,
    pub body: Bytes,
}

impl Runner {
    async fn call(&self, call: Call, timeout: Duration, limits: Limits) -> Response {
        match self {
            Runner::Fork(f) => f.call(call, timeout).await,
            Runner::Http(p) => match tokio::time::timeout(timeout, p.call(call, limits)).await {
                Ok(r) => r,
                Err(_) => text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("handler did not answer within {timeout:?}\n"),
                ),
            },
        }
    }
}

/// Shared state of one worker.
pub struct State {
    runner: Runner,
    slots: Arc<Semaphore>,
    max_inflight: usize,
    timeout: Duration,
    max_body: usize,
    draining: AtomicBool,
    upstream_up: AtomicBool,
    needs_upstream: bool,
    metrics: Metrics,
    registry: Registry,
    cut_off: CancellationToken,
}

impl State {
    pub fn new(config: &Config, runner: Runner, metrics: Metrics, registry: Registry) -> Self {
        metrics.max_inflight.set(config.max_inflight as i64);
        Self {
            needs_upstream: matches!(runner, Runner::Http(_)),
            runner,
            slots: Arc::new(Semaphore::new(config.max_inflight)),
            max_inflight: config.max_inflight,
            timeout: config.timeout,
            max_body: config.max_body,
            draining: AtomicBool::new(false),
            upstream_up: AtomicBool::new(false),
            metrics,
            registry,
            cut_off: CancellationToken::new(),
        }
    }

    /// Calls being served now.
    pub fn inflight(&self) -> usize {
        self.max_inflight - self.slots.available_permits()
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && (!self.needs_upstream || self.upstream_up.load(Ordering::SeqCst))
    }

    pub(crate) fn set_upstream_up(&self, up: bool) {
        self.upstream_up.store(up, Ordering::SeqCst);
    }

    pub(crate) fn upstream_display(&self) -> String {
        match &self.runner {
            Runner::Http(p) => p.upstream().to_string(),
            Runner::Fork(_) => String::new(),
        }
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Resolves once no call is in flight.
    pub(crate) async fn idle(&self) {
        // Holding every slot at once means nobody else holds one. The permits
        // go back when dropped; new calls are refused while draining anyway.
        let n = u32::try_from(self.max_inflight).unwrap_or(u32::MAX);
        let _all = self.slots.acquire_many(n).await;
    }

    /// Ends every call still running (answering 503 and killing fork children).
    pub(crate) fn cut_off(&self) {
        self.cut_off.cancel();
    }
}

/// The worker's router: admin endpoints, and every other path goes to the handler.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/_/health", get(|| async { "ok\n" }))
        .route("/_/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(call)
        .with_state(state)
}

async fn ready(axum::extract::State(state): axum::extract::State<Arc<State>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if state.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "handler not up\n").into_response()
    }
}

async fn metrics(axum::extract::State(state): axum::extract::State<Arc<State>>) -> Response {
    (
        [(header::CONTENT_TYPE, ebb_runtime::METRICS_CONTENT_TYPE)],
        ebb_runtime::encode_metrics(&state.registry),
    )
        .into_response()
}

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn refusal(state: &State, reason: RefusalReason) -> Response {
    let (status, tag, msg) = match reason {
        RefusalReason::Busy => (
            StatusCode::TOO_MANY_REQUESTS,
            refusal::BUSY,
            format!(
                "worker is at --max-inflight {}; retry later\n",
                state.max_inflight
            ),
        ),
        RefusalReason::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            refusal::DRAINING,
            "worker is shutting down; send to another replica\n".to_string(),
        ),
        RefusalReason::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            refusal::TOO_LARGE,
            format!(
                "request body is larger than --max-body {} bytes\n",
                state.max_body
            ),
        ),
    };
    state
        .metrics
        .refused
        .get_or_create(&RefusalLabels {
            reason: reason.as_str(),
        })
        .inc();
    let mut resp = text(status, msg);
    let h = resp.headers_mut();
    h.insert(refusal::HEADER, HeaderValue::from_static(tag));
    if status != StatusCode::PAYLOAD_TOO_LARGE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Holds the call's slot and decrements the in-flight gauge however the call
/// ends (including when the client goes away and the future is dropped). It
/// goes with the answer's body, so a call counts until its answer was sent
/// and draining waits for answers still streaming.
struct InflightGuard {
    inflight: Gauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inflight.dec();
    }
}

async fn call(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: Request,
) -> Response {
    let start = Instant::now();
    let resp = admit_and_call(&state, req).await;
    let status = resp.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&StatusLabels { status })
        .inc();
    state
        .metrics
        .duration
        .observe(start.elapsed().as_secs_f64());
    resp
}

async fn admit_and_call(state: &State, req: Request) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return refusal(state, RefusalReason::Draining);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body as u64) {
        return refusal(state, RefusalReason::TooLarge);
    }
    let Ok(permit) = state.slots.clone().try_acquire_owned() else {
        return refusal(state, RefusalReason::Busy);
    };
    state.metrics.inflight.inc();
    let guard = InflightGuard {
        inflight: state.metrics.inflight.clone(),
        _permit: permit,
    };

    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return refusal(state, RefusalReason::TooLarge);
        }
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {e}\n"),
            );
        }
    };
    let limits = Limits {
        max: state.max_body,
        deadline: Instant::now() + state.timeout,
        cut_off: state.cut_off.clone(),
    };
    let resp = tokio::select! {
        resp = state.runner.call(Call { parts, body }, state.timeout, limits) => resp,
        () = state.cut_off.cancelled() => {
            let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "cut off: the worker's drain timeout passed\n");
            resp.headers_mut().insert(refusal::HEADER, HeaderValue::from_static(refusal::DRAINING));
            resp
        }
    };
    // The slot is freed when the body is done with (sent or dropped); the
    // frames themselves pass unchanged, and so does the body's size.
    resp.map(|b| {
        Body::new(b.map_frame(move |frame| {
            let _slot = &guard;
            frame
        }))
    })
}

/// Turns a body into a response body (used by the runners).
pub(crate) fn body(b: impl Into<Bytes>) -> Body {
    Body::from(b.into())
}
