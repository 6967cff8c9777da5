#![forbid(unsafe_code)]
//! `ebb-cron-bench`: firing error of `ebb connector cron`.
//!
//! Serves an HTTP function on 127.0.0.1, writes a stack file with
//! `--functions` functions on `--schedule` (default every second), starts
//! `ebb connector cron` on it, and for the first `--fires` calls records
//! arrival time − `ce-time` (the scheduled instant). Prints p50/p99/max.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use ebb_bench::stats::Latencies;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Debug, Parser)]
#[command(name = "ebb-cron-bench", version)]
struct Args {
    /// The ebb binary.
    #[arg(long, default_value = "target/release/ebb")]
    ebb: PathBuf,
    /// Scheduled functions.
    #[arg(long, default_value_t = 100)]
    functions: usize,
    /// Fires to measure.
    #[arg(long, default_value_t = 1000)]
    fires: usize,
    /// The schedule of every function.
    #[arg(long, default_value = "*/1 * * * * *")]
    schedule: String,
    /// Also print each scheduled instant's calls (min/p50/max).
    #[arg(long)]
    per_tick: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb-cron-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let errors: Arc<Mutex<Vec<(i64, i64)>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    {
        let errors = errors.clone();
        let want = args.fires;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let errors = errors.clone();
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let arrived = chrono::Utc::now();
                        let errors = errors.clone();
                        let done_tx = done_tx.clone();
                        async move {
                            let scheduled = req
                                .headers()
                                .get("ce-time")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok());
                            if let Some(s) = scheduled {
                                let us = (arrived - s.with_timezone(&chrono::Utc))
                                    .num_microseconds()
                                    .unwrap_or(i64::MAX);
                                let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
                                e.push((s.timestamp_millis(), us));
                                if e.len() == want {
                                    let _ = done_tx.try_send(());
                                }
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }

    let dir = std::env::temp_dir().join(format!("ebb-cron-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let stack = dir.join("stack.yaml");
    let mut text = String::from("functions:\n");
    for i in 0..args.functions {
        text.push_str(&format!(
            "  - name: f{i}\n    url: http://{addr}/f{i}\n    schedule: \"{}\"\n    concurrency: allow\n",
            args.schedule
        ));
    }
    std::fs::write(&stack, text)?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut child = tokio::process::Command::new(&args.ebb)
        .args(["connector", "cron", "--functions"])
        .arg(&stack)
        .args(["--admin-addr", &admin.to_string()])
        .env("EBB_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", args.ebb.display()))?;
    let bound = Duration::from_secs(30 + args.fires as u64 / args.functions.max(1) as u64 * 2);
    let finished = tokio::time::timeout(bound, done_rx.recv()).await;
    let scheduler = scrape(admin).await.unwrap_or_default();
    if let Some(pid) = child.id() {
        let _ = nix_term(pid);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
    if finished.is_err() {
        bail!("fewer than {} fires arrived within {bound:?}", args.fires);
    }
    let mut samples = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    samples.truncate(args.fires);
    let early = samples.iter().filter(|s| s.1 < 0).count();
    let mut lat = Latencies::new();
    let mut per_tick: std::collections::BTreeMap<i64, Latencies> = Default::default();
    for &(tick, us) in &samples {
        lat.record_us(us.max(0) as u64);
        per_tick
            .entry(tick)
            .or_default()
            .record_us(us.max(0) as u64);
    }
    if args.per_tick {
        for (tick, l) in &per_tick {
            println!(
                "tick {tick}: {} calls, min {} us, p50 {} us, max {} us",
                l.count(),
                l.min(),
                l.percentile(50.0),
                l.max()
            );
        }
    }
    println!(
        "fires {} of {} functions on \"{}\": firing error (arrival - scheduled) p50 {} us, p99 {} us, max {} us, early {}",
        samples.len(),
        args.functions,
        args.schedule,
        lat.percentile(50.0),
        lat.percentile(99.0),
        lat.max(),
        early
    );
    // The first instant opens every connection; the later ones reuse them.
    let first = per_tick.keys().next().copied();
    let mut warm = Latencies::new();
    for &(tick, us) in &samples {
        if Some(tick) != first {
            warm.record_us(us.max(0) as u64);
        }
    }
    if warm.count() > 0 {
        println!(
            "after the first instant: {} fires, p50 {} us, p99 {} us, max {} us",
            warm.count(),
            warm.percentile(50.0),
            warm.percentile(99.0),
            warm.max()
        );
    }
    if let Some(line) = scheduler_summary(&scheduler) {
        println!("{line}");
    }
    println!(
        "rerun: cargo build --release -p ebb -p ebb-bench && target/release/ebb-cron-bench --functions {} --fires {}",
        args.functions, args.fires
    );
    Ok(())
}

/// The connector's `/metrics` text.
async fn scrape(admin: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: ebb\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("metrics scrape timed out"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The connector's own view: `ebb_cron_firing_error_seconds` (fire started −
/// scheduled), as bucket bounds that hold half and 99 % of the fires.
fn scheduler_summary(metrics: &str) -> Option<String> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("ebb_cron_firing_error_seconds_bucket{le=\"") else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse().ok()?));
    }
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let want = (q * total as f64).ceil() as u64;
        buckets
            .iter()
            .find(|b| b.1 >= want)
            .map_or(f64::INFINITY, |b| b.0 * 1e3)
    };
    Some(format!(
        "connector: {total} fires started (fire start - scheduled) p50 <= {:.3} ms, p99 <= {:.3} ms (histogram bucket bounds)",
        at(0.5),
        at(0.99)
    ))
}

/// SIGTERM by pid, through `kill(1)` so this crate needs no signal bindings.
fn nix_term(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
}
