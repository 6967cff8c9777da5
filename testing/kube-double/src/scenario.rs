//! Exact-request checks: a kube [`Client`] whose requests the test answers
//! one by one, in order, over `tower-test`'s mock service (no socket, so it
//! also runs on a paused clock).
//!
//! ```ignore
//! let (client, mut api) = Scenario::client();
//! let call = tokio::spawn(async move { target.get(&workload).await });
//! let (seen, reply) = api.next().await;
//! assert_eq!((seen.method.as_str(), seen.uri.as_str()), ("GET", SCALE_PATH));
//! reply.json(200, &scale);
//! api.quiet(Duration::from_millis(200)).await; // and nothing else
//! ```
//!
//! Use it where the order of the requests is the point, or where an answer
//! is needed that [`KubeApi`](crate::KubeApi) does not give (another writer
//! between a read and a write); use the API server double otherwise.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};

/// How long [`Scenario::next`] waits for the client's next request.
const NEXT_TIMEOUT: Duration = Duration::from_secs(5);

/// The API server's side of a [`Scenario::client`].
pub struct Scenario {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The path and query exactly as sent, e.g.
    /// `/apis/apps/v1/deployments?&limit=500`.
    pub uri: String,
    pub content_type: Option<String>,
    /// The body as JSON; `Null` when empty.
    pub body: Value,
}

/// The answer to one request; the client waits until it is given (or
/// dropped, which fails the request).
#[must_use = "the client waits for this answer"]
pub struct Reply(SendResponse<Response<Body>>);

impl Scenario {
    /// A client (default namespace `default`) whose every request this
    /// scenario receives.
    pub fn client() -> (Client, Self) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), Self { handle })
    }

    /// The next request. Panics when none comes within 5 s, when the body is
    /// not JSON, or when every client is gone.
    pub async fn next(&mut self) -> (Seen, Reply) {
        let (request, send) = tokio::time::timeout(NEXT_TIMEOUT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request within {NEXT_TIMEOUT:?}"))
            .unwrap_or_else(|| panic!("the client was dropped while a request was expected"));
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .unwrap_or_else(|err| panic!("reading the request body: {err}"))
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                panic!(
                    "request body is not JSON ({err}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        let seen = Seen {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            uri: parts
                .uri
                .path_and_query()
                .map(ToString::to_string)
                .unwrap_or_default(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        };
        (seen, Reply(send))
    }

    /// Panics when a request comes within `window`. Every client being
    /// dropped in the meantime is fine.
    pub async fn quiet(&mut self, window: Duration) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(window, self.handle.next_request()).await
        {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
    }

    /// Waits up to `limit` for every client to be dropped; panics on a
    /// request or when one is still alive after `limit`.
    pub async fn closed(&mut self, limit: Duration) {
        match tokio::time::timeout(limit, self.handle.next_request()).await {
            Ok(None) => {}
            Ok(Some((request, _))) => {
                panic!("unexpected request: {} {}", request.method(), request.uri())
            }
            Err(_) => panic!("the client is still alive after {limit:?}"),
        }
    }
}

impl Reply {
    /// Answers `status` with `body` as JSON.
    pub fn json(self, status: u16, body: &Value) {
        let status = StatusCode::from_u16(status)
            .unwrap_or_else(|err| panic!("bad status code {status}: {err}"));
        let bytes = serde_json::to_vec(body).unwrap_or_else(|err| panic!("serialize: {err}"));
        let response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .unwrap_or_else(|err| panic!("building the response: {err}"));
        self.0.send_response(response);
    }

    /// Answers `code` with a `Status` failure body, e.g.
    /// `reply.status(409, "Conflict", "the object has been modified")`.
    pub fn status(self, code: u16, reason: &str, message: &str) {
        self.json(code, &crate::status(code, reason, message));
    }
}
