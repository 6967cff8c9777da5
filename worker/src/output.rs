//! A handler's answer on its way to the caller, bounded by `--max-body`.
//!
//! The rule (README, "`ebb worker`"): the worker sends the status line only
//! once it knows the answer fits in `--max-body`, because a 502 is impossible
//! after the first byte. It knows when
//!
//! - the answer ended: fork mode when the handler exited (its exit status
//!   decides 200 or 500), http mode when the upstream's body ended; or
//! - (http mode) the upstream declared a `Content-Length` of at most
//!   `--max-body`: the answer is then relayed as it arrives.
//!
//! Until then the answer waits in a [`Spool`]: its first [`PREFIX`] bytes in
//! memory, the rest in an unlinked temporary file, so the worker's memory is
//! bounded by the prefix and one read chunk per call, never by the size of the
//! answer. An answer that grows past `--max-body` is dropped, the fork-mode
//! handler is killed, and the caller gets 502 with `ebb-worker: output-too-large`.

use std::io::SeekFrom;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use ebb_model::refusal;
use futures::StreamExt;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::server::text;

/// How much of an answer the worker keeps in memory per call.
pub const PREFIX: usize = 64 * 1024;
/// How much it reads (from a pipe, the spool file) at once.
pub const CHUNK: usize = 64 * 1024;

/// The 502 for an answer larger than `--max-body`.
pub fn too_large(max: usize) -> Response {
    let mut resp = text(
        StatusCode::BAD_GATEWAY,
        format!("the handler's answer is larger than --max-body {max} bytes\n"),
    );
    resp.headers_mut().insert(
        refusal::HEADER,
        HeaderValue::from_static(refusal::OUTPUT_TOO_LARGE),
    );
    resp
}

/// An answer of unknown length, held until it ended: the first [`PREFIX`]
/// bytes in memory, the rest in an unlinked temporary file (in `TMPDIR`).
/// When no temporary file can be made (a read-only file system), the rest is
/// kept in memory too, still at most `max` bytes.
pub struct Spool {
    max: usize,
    len: usize,
    head: BytesMut,
    file: Option<tokio::fs::File>,
    in_memory: bool,
}

impl Spool {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            len: 0,
            head: BytesMut::new(),
            file: None,
            in_memory: false,
        }
    }

    /// Adds `chunk`, or fails with [`Error::OutputTooLarge`] (keeping nothing
    /// of it) when the answer would grow past `max`.
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), Error> {
        if chunk.len() > self.max - self.len {
            return Err(Error::OutputTooLarge { max: self.max });
        }
        self.len += chunk.len();
        if self.file.is_none() && (self.in_memory || self.head.len() + chunk.len() <= PREFIX) {
            self.head.extend_from_slice(chunk);
            return Ok(());
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => match tempfile::tempfile() {
                Ok(f) => self.file.insert(tokio::fs::File::from_std(f)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make a temporary file for a large answer; holding it in memory");
                    self.in_memory = true;
                    self.head.extend_from_slice(chunk);
                    return Ok(());
                }
            },
        };
        file.write_all(chunk).await.map_err(Error::Spool)
    }

    /// The whole answer as a body, and the `Content-Length` to declare when
    /// the body cannot tell it itself (it is read back from the file).
    pub async fn into_body(self) -> Result<(Body, Option<usize>), Error> {
        let head = self.head.freeze();
        let Some(mut file) = self.file else {
            return Ok((Body::from(head), None));
        };
        file.flush().await.map_err(Error::Spool)?;
        file.seek(SeekFrom::Start(0)).await.map_err(Error::Spool)?;
        let rest = futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = BytesMut::with_capacity(CHUNK);
            match file.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(buf.freeze()), Some(file))),
                Err(e) => Some((Err(e), None)),
            }
        });
        let body = futures::stream::once(async move { Ok(head) }).chain(rest);
        Ok((Body::from_stream(body), Some(self.len)))
    }
}

/// What bounds an answer that is relayed after its status was sent.
#[derive(Clone)]
pub struct Limits {
    pub max: usize,
    /// The call's `--timeout`.
    pub deadline: Instant,
    /// Cancelled when the worker's drain timeout passed.
    pub cut_off: CancellationToken,
}

/// Relays an upstream answer whose status is already decided: `head` first,
/// then the rest as it arrives. The body breaks off (the caller sees a
/// truncated answer) if more than `max` bytes come, if the call's deadline
/// passes, if the drain timeout cuts it off, or if the upstream breaks off.
pub fn relay(head: Bytes, rest: hyper::body::Incoming, limits: Limits) -> Body {
    struct Relay {
        head: Option<Bytes>,
        rest: hyper::body::Incoming,
        sent: usize,
        limits: Limits,
        done: bool,
    }
    let state = Relay {
        head: Some(head),
        rest,
        sent: 0,
        limits,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut r| async move {
        if r.done {
            return None;
        }
        if let Some(head) = r.head.take() {
            r.sent = head.len();
            return Some((Ok(head), r));
        }
        let next = loop {
            let frame = tokio::select! {
                () = r.limits.cut_off.cancelled() => {
                    break Err(Error::AnswerCut("the worker's drain timeout passed".into()));
                }
                f = tokio::time::timeout_at(r.limits.deadline, r.rest.frame()) => f,
            };
            match frame {
                Err(_) => break Err(Error::AnswerCut("the call's --timeout passed".into())),
                Ok(None) => return None,
                Ok(Some(Err(e))) => break Err(Error::AnswerCut(format!("handler broke off: {e}"))),
                Ok(Some(Ok(frame))) => {
                    // Trailers are not relayed (as before streaming).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.len() > r.limits.max - r.sent {
                        break Err(Error::OutputTooLarge { max: r.limits.max });
                    }
                    r.sent += data.len();
                    break Ok(data);
                }
            }
        };
        if let Err(e) = &next {
            tracing::warn!(error = %e, sent = r.sent, "breaking off an answer already under way");
            r.done = true;
        }
        Some((next, r))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> Bytes {
        body.collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn a_small_answer_stays_in_memory() {
        let mut s = Spool::new(1 << 20);
        s.push(b"hello ").await.unwrap();
        s.push(b"world").await.unwrap();
        let (body, declare) = s.into_body().await.unwrap();
        assert_eq!(declare, None, "a full body tells its own length");
        assert_eq!(collect(body).await, "hello world");
    }

    #[tokio::test]
    async fn a_large_answer_is_read_back_whole_and_in_order() {
        let total = 3 * PREFIX + 123;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut s = Spool::new(total);
        for chunk in data.chunks(10_000) {
            s.push(chunk).await.unwrap();
        }
        let (body, declare) = s.into_body().await.unwrap();
        assert_eq!(declare, Some(total));
        assert_eq!(collect(body).await, data);
    }

    #[tokio::test]
    async fn one_byte_past_max_is_refused() {
        let mut s = Spool::new(10);
        s.push(b"0123456789").await.unwrap();
        let err = s.push(b"X").await.unwrap_err();
        assert!(matches!(err, Error::OutputTooLarge { max: 10 }), "{err}");
        let (body, _) = s.into_body().await.unwrap();
        assert_eq!(
            collect(body).await,
            "0123456789",
            "the refused chunk is not kept"
        );
    }

    #[tokio::test]
    async fn too_large_is_502_tagged_by_the_worker() {
        let resp = too_large(6);
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[refusal::HEADER], refusal::OUTPUT_TOO_LARGE);
        let body = collect(resp.into_body()).await;
        assert!(String::from_utf8_lossy(&body).contains("--max-body 6"));
    }
}
