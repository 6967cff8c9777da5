//! The closed-loop load generator: `connections` tasks, each doing sequential
//! requests over its own keep-alive HTTP/1.1 connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::HOST;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::stats::{ErrorKind, Tally};

/// Pause after a failed connect before the same connection task retries.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Where requests go: a plain `http://` URL split into what the client needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// `Host` header value (the URL's authority).
    pub authority: String,
    /// Origin-form request target (path and query).
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                bail!("unsupported scheme {other:?} in {url:?}: only http:// is supported")
            }
            None => bail!("URL {url:?} needs a scheme, e.g. http://127.0.0.1:8080/"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("URL {url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// How a run is bounded. The run ends at the first of: `requests` measured
/// requests started, `duration` elapsed after warmup, or `max_duration`
/// elapsed after warmup (the hard cap, which also cuts in-flight requests).
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: Target,
    pub method: Method,
    pub body: Bytes,
    pub connections: usize,
    pub requests: Option<u64>,
    pub duration: Option<Duration>,
    pub warmup: Duration,
    /// Per-request timeout (connect, or request through full response body).
    pub timeout: Duration,
    pub max_duration: Duration,
}

/// The merged result of a run, and the length of its measured window (from
/// the end of warmup until the last measured request finished).
#[derive(Debug)]
pub struct Outcome {
    pub tally: Tally,
    pub elapsed: Duration,
}

struct Plan {
    cfg: LoadConfig,
    /// When measurement starts (warmup ends).
    measure_start: Instant,
    /// No new request starts at or after this.
    stop_at: Instant,
    /// Nothing runs past this.
    hard_stop: Instant,
    /// Measured requests not yet started (`u64::MAX` when unbounded).
    budget: AtomicU64,
}

impl Plan {
    fn take_one(&self) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Runs the load and returns the merged tally.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<Outcome> {
    if cfg.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let hard_stop = measure_start + cfg.max_duration;
    let stop_at = cfg
        .duration
        .map_or(hard_stop, |d| (measure_start + d).min(hard_stop));
    let plan = Arc::new(Plan {
        budget: AtomicU64::new(cfg.requests.unwrap_or(u64::MAX)),
        measure_start,
        stop_at,
        hard_stop,
        cfg,
    });

    let tasks: Vec<_> = (0..plan.cfg.connections)
        .map(|_| tokio::spawn(connection_task(Arc::clone(&plan))))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        let t = task.await.context("connection task panicked")?;
        tally.merge(&t);
    }
    let elapsed = Instant::now().saturating_duration_since(measure_start);
    Ok(Outcome { tally, elapsed })
}

async fn connect(target: &Target) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; failures show
        // up on the sender side.
        let _ = conn.await;
    });
    Ok(sender)
}

fn build_request(cfg: &LoadConfig) -> Request<Full<Bytes>> {
    Request::builder()
        .method(cfg.method.clone())
        .uri(cfg.target.path_and_query.as_str())
        .header(HOST, cfg.target.authority.as_str())
        .body(Full::new(cfg.body.clone()))
        .expect("request parts were validated up front")
}

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> hyper::Result<http::StatusCode> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    Ok(status)
}

/// One connection's closed loop.
async fn connection_task(plan: Arc<Plan>) -> Tally {
    let cfg = &plan.cfg;
    let mut tally = Tally::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let now = Instant::now();
        if now >= plan.stop_at {
            return tally;
        }
        let measuring = now >= plan.measure_start;
        if measuring && !plan.take_one() {
            return tally;
        }
        let deadline = (now + cfg.timeout).min(plan.hard_stop);

        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            sender = None;
            match timeout_at(deadline, connect(&cfg.target)).await {
                Ok(Ok(s)) => {
                    tally.connects += 1;
                    sender = Some(s);
                }
                Ok(Err(_)) | Err(_) => {
                    if measuring {
                        tally.errors.add(ErrorKind::Connect);
                    }
                    sleep_until((Instant::now() + RECONNECT_PAUSE).min(plan.stop_at)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            continue;
        };

        let req = build_request(cfg);
        let t0 = Instant::now();
        let result = timeout_at(deadline, exchange(s, req)).await;
        let latency = t0.elapsed();
        let error = match result {
            Ok(Ok(status)) if status.is_success() => None,
            Ok(Ok(status)) => Some(ErrorKind::Status(status.as_u16())),
            Ok(Err(_)) => {
                sender = None;
                Some(ErrorKind::Io)
            }
            Err(_) => {
                // The connection may still carry the unfinished exchange.
                sender = None;
                Some(ErrorKind::Timeout)
            }
        };
        if measuring {
            match error {
                None => {
                    tally.ok += 1;
                    tally.latencies.record(latency);
                }
                Some(kind) => tally.errors.add(kind),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{self, Reply};
    use tokio::net::TcpListener;

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8080/a/b?c=d").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path_and_query: "/a/b?c=d".into(),
            }
        );
        let t = Target::parse("http://localhost").unwrap();
        assert_eq!((t.port, t.path_and_query.as_str()), (80, "/"));
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(Target::parse("https://127.0.0.1/").is_err());
        assert!(Target::parse("127.0.0.1:80").is_err());
        assert!(Target::parse("/just/a/path").is_err());
    }

    fn config(url: &str) -> LoadConfig {
        LoadConfig {
            target: Target::parse(url).unwrap(),
            method: Method::POST,
            body: Bytes::from_static(b"hello"),
            connections: 4,
            requests: Some(200),
            duration: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(20),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exact_request_count_over_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(upstream::serve(listener, Reply::Echo));

        let out = run(config(&format!("http://{addr}/"))).await.unwrap();
        assert_eq!(out.tally.ok, 200);
        assert_eq!(out.tally.errors.total(), 0);
        assert_eq!(out.tally.latencies.count(), 200);
        assert_eq!(out.tally.connects, 4, "one keep-alive connection per task");
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duration_bound_with_warmup() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(upstream::serve(listener, Reply::Fixed));

        let mut cfg = config(&format!("http://{addr}/"));
        cfg.requests = None;
        cfg.duration = Some(Duration::from_millis(300));
        cfg.warmup = Duration::from_millis(100);
        let started = Instant::now();
        let out = run(cfg).await.unwrap();
        let total = started.elapsed();
        assert!(out.tally.ok > 0);
        assert_eq!(out.tally.errors.total(), 0);
        assert!(
            out.elapsed >= Duration::from_millis(300),
            "{:?}",
            out.elapsed
        );
        assert!(total < Duration::from_secs(5), "{total:?}");
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_refused_counts_connect_errors_and_stays_bounded() {
        // Bind then drop to get a port that (almost certainly) refuses.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cfg = config(&format!("http://{addr}/"));
        cfg.requests = Some(20);
        cfg.max_duration = Duration::from_secs(5);
        let out = run(cfg).await.unwrap();
        assert_eq!(out.tally.ok, 0);
        assert_eq!(out.tally.errors.get("connect"), 20);
        assert_eq!(out.tally.latencies.count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_2xx_is_counted_by_status() {
        use hyper::server::conn::http1 as server_http1;
        use hyper::service::service_fn;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        let mut r = hyper::Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _ = server_http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let mut cfg = config(&format!("http://{addr}/"));
        cfg.requests = Some(10);
        let out = run(cfg).await.unwrap();
        assert_eq!(out.tally.ok, 0);
        assert_eq!(out.tally.errors.get("status_503"), 10);
        server.abort();
    }
}
