//! A tiny plain-HTTP/1 client for broker admin endpoints (NATS monitoring,
//! RabbitMQ management). No TLS, no pooling across calls.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Basic-auth credentials.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// One HTTP response: status and whole body.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("response is not JSON ({err}): {}", self.text()))
    }
}

/// Sends one request with a JSON body (if any) and reads the whole answer,
/// bounded by `limit`. Errors are strings meant for panic messages.
pub async fn request(
    method: Method,
    url: &str,
    auth: Option<&Credentials>,
    json: Option<&serde_json::Value>,
    limit: Duration,
) -> Result<Response, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = Request::builder().method(method.clone()).uri(url);
    if let Some(auth) = auth {
        let token = base64(format!("{}:{}", auth.user, auth.password).as_bytes());
        builder = builder.header(header::AUTHORIZATION, format!("Basic {token}"));
    }
    let body = match json {
        Some(value) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(value.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let request = builder
        .body(body)
        .map_err(|err| format!("{method} {url}: bad request: {err}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| format!("{method} {url}: {err}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("{method} {url}: reading body: {err}"))?
            .to_bytes();
        Ok(Response { status, body })
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{method} {url}: no answer within {limit:?}")))
}

/// Standard base64 with padding (for the Basic auth header).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
