//! The trivial upstream: HTTP/1.1 with keep-alive, answering every request
//! with 200 and either the request body echoed or a fixed small body.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The body answered when not echoing (or when the request body is empty).
pub const FIXED_BODY: &[u8] = b"ok\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Echo the request body; answer [`FIXED_BODY`] if it is empty.
    Echo,
    /// Always answer [`FIXED_BODY`].
    Fixed,
}

async fn handle(req: Request<Incoming>, reply: Reply) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"bad request body\n")));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(resp);
        }
    };
    let out = if reply == Reply::Echo && !body.is_empty() {
        body
    } else {
        Bytes::from_static(FIXED_BODY)
    };
    Ok(Response::new(Full::new(out)))
}

/// Serves connections from `listener` until the task is dropped. Accept errors
/// (e.g. out of file descriptors) are reported and retried after a pause.
pub async fn serve(listener: TcpListener, reply: Reply) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("ebb-bench-upstream: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, reply));
            // Per-connection errors (client went away mid-request) are not interesting.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
