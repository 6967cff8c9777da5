//! The dev address: `POST /publish/{topic}`, `POST /wake/{ns}/{fn}`,
//! `GET /_/status`, `/metrics`, `/_/health`, `/_/ready`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Dev;
use crate::bus::PublishError;

use crate::MAX_EVENT;

/// Request headers that describe the publish request, not the event.
const NOT_EVENT_HEADERS: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "user-agent",
    "accept",
    "accept-encoding",
    "expect",
];

pub(crate) fn router(dev: Arc<Dev>) -> Router {
    Router::new()
        .route("/_/health", get(|| async { "ok\n" }))
        .route("/_/ready", get(|| async { "ready\n" }))
        .route("/_/status", get(status))
        .route("/metrics", get(metrics))
        .route("/publish/{topic}", post(publish))
        .route("/wake/{namespace}/{function}", post(wake))
        .layer(DefaultBodyLimit::max(MAX_EVENT))
        .with_state(dev)
}

async fn status(State(dev): State<Arc<Dev>>) -> Response {
    axum::Json(crate::status::snapshot(&dev).await).into_response()
}

async fn metrics(State(dev): State<Arc<Dev>>) -> Response {
    dev.refresh_gauges().await;
    (
        [(header::CONTENT_TYPE, ebb_runtime::METRICS_CONTENT_TYPE)],
        ebb_runtime::encode_metrics(&dev.registry),
    )
        .into_response()
}

async fn publish(
    State(dev): State<Arc<Dev>>,
    Path(topic): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let too_big = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the event is larger than {MAX_EVENT} bytes (6 MiB), the most ebb dev accepts\n"
            ),
        )
            .into_response()
    };
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_EVENT as u64) {
        return too_big();
    }
    let body: Bytes = match axum::body::to_bytes(body, MAX_EVENT).await {
        Ok(b) => b,
        Err(_) => return too_big(),
    };
    if let Err(e) = ebb_connectors::routing::validate_subject(&topic).and_then(|()| {
        if topic.contains(['*', '>']) {
            Err("a published topic cannot hold wildcards (* or >)".to_string())
        } else {
            Ok(())
        }
    }) {
        return (
            StatusCode::BAD_REQUEST,
            format!("topic {topic:?} is not valid: {e}\n"),
        )
            .into_response();
    }
    let mut event_headers = HeaderMap::new();
    for (name, value) in &headers {
        if !NOT_EVENT_HEADERS.contains(&name.as_str()) {
            event_headers.append(name.clone(), value.clone());
        }
    }
    if let Some(client) = &dev.nats {
        return match ebb_connectors::nats::publish(client, &topic, &event_headers, body, false)
            .await
        {
            Ok(seq) => (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "stream_sequence": seq })),
            )
                .into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        };
    }
    if let Some(url) = &dev.amqp {
        return match ebb_connectors::amqp::publish(
            url,
            ebb_connectors::amqp::DEFAULT_EXCHANGE,
            &topic,
            &event_headers,
            body,
        )
        .await
        {
            Ok(()) => (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "confirmed": true })),
            )
                .into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        };
    }
    if let Some(brokers) = &dev.kafka {
        return match ebb_connectors::kafka::publish(brokers, &topic, None, &event_headers, body)
            .await
        {
            Ok((partition, offset)) => (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "partition": partition, "offset": offset })),
            )
                .into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        };
    }
    match dev.bus.publish(&topic, event_headers, body) {
        Ok(p) => {
            if p.functions.is_empty() {
                tracing::warn!(%topic, "published, but no function subscribes to this topic");
            }
            (StatusCode::ACCEPTED, axum::Json(p)).into_response()
        }
        Err(e @ PublishError::Full { .. }) => {
            (StatusCode::TOO_MANY_REQUESTS, format!("{e}\n")).into_response()
        }
        Err(e @ PublishError::Stopping) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

/// The connectors' wake-up: 0 → max(1, min) at once.
async fn wake(
    State(dev): State<Arc<Dev>>,
    Path((namespace, function)): Path<(String, String)>,
) -> Response {
    let spec = (namespace == ebb_model::DEFAULT_NAMESPACE)
        .then(|| dev.spec(&function))
        .flatten();
    let Some(spec) = spec else {
        return (
            StatusCode::NOT_FOUND,
            format!("no function {namespace}/{function}\n"),
        )
            .into_response();
    };
    if spec.command.is_empty() || spec.paused {
        return (StatusCode::ACCEPTED, "nothing to start\n").into_response();
    }
    let to = spec.min_replicas.max(1).min(spec.max_replicas.max(1));
    if dev.replicas.wake(&spec, to).await {
        tracing::info!(function = %function, to, "wake-up: starting replicas");
        if let Ok(mut d) = dev.decisions.lock() {
            d.insert(function.clone(), format!("wake-up → {to}"));
        }
    }
    (StatusCode::ACCEPTED, "woken\n").into_response()
}
