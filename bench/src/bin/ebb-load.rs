#![forbid(unsafe_code)]
//! `ebb-load`: closed-loop HTTP/1.1 load generator over keep-alive connections.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use ebb_bench::cli::{format_duration, parse_duration, parse_size, shell_join};
use ebb_bench::load::{self, LoadConfig, Target};
use ebb_bench::stats::{RunInfo, Summary};
use http::Method;

/// Closed-loop HTTP/1.1 load generator: each connection is one task doing
/// sequential requests over its own keep-alive connection. Throughput and
/// latency are reported over 2xx responses; everything else is an error.
///
/// Bounded by --requests and/or --duration (default --duration 10s when
/// neither is given), and always by --max-duration. Exits 1 when no request
/// got a 2xx response.
#[derive(Debug, Parser)]
#[command(name = "ebb-load", version)]
struct Args {
    /// Target URL (http:// only), e.g. http://127.0.0.1:8080/
    #[arg(long)]
    url: String,

    /// Concurrent connections (one task each).
    #[arg(short, long, default_value_t = 32)]
    connections: usize,

    /// Stop after this many measured requests (excluding warmup).
    #[arg(short = 'n', long)]
    requests: Option<u64>,

    /// Stop starting requests this long after warmup (e.g. 10s, 500ms).
    #[arg(short, long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Request body size in bytes (suffixes k, m); the body is 'x' repeated.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    body_size: usize,

    /// HTTP method [default: GET, or POST when --body-size > 0].
    #[arg(short = 'X', long)]
    method: Option<Method>,

    /// Unmeasured load before measuring (same connections).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,

    /// Per-request timeout (connect, or request through full response body).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    /// Hard cap on the measured phase, whatever --requests says.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    max_duration: Duration,

    /// Runtime worker threads [default: number of CPUs].
    #[arg(long)]
    threads: Option<usize>,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
}

/// The command line that reproduces `args` with every bound spelled out.
fn rerun_command(argv0: &str, args: &Args, method: &Method, duration: Option<Duration>) -> String {
    let mut w: Vec<String> = vec![argv0.to_owned(), "--url".into(), args.url.clone()];
    w.extend(["--connections".into(), args.connections.to_string()]);
    if let Some(n) = args.requests {
        w.extend(["--requests".into(), n.to_string()]);
    }
    if let Some(d) = duration {
        w.extend(["--duration".into(), format_duration(d)]);
    }
    w.extend(["--body-size".into(), args.body_size.to_string()]);
    w.extend(["--method".into(), method.to_string()]);
    w.extend(["--warmup".into(), format_duration(args.warmup)]);
    w.extend(["--timeout".into(), format_duration(args.timeout)]);
    w.extend(["--max-duration".into(), format_duration(args.max_duration)]);
    if let Some(t) = args.threads {
        w.extend(["--threads".into(), t.to_string()]);
    }
    if args.json {
        w.push("--json".into());
    }
    shell_join(w)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ebb-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.connections),
        "--connections must be between 1 and 100000"
    );
    anyhow::ensure!(args.requests != Some(0), "--requests must be at least 1");
    anyhow::ensure!(!args.timeout.is_zero(), "--timeout must be positive");
    anyhow::ensure!(
        !args.max_duration.is_zero(),
        "--max-duration must be positive"
    );
    if let Some(d) = args.duration {
        anyhow::ensure!(
            d <= args.max_duration,
            "--duration {} exceeds --max-duration {}",
            format_duration(d),
            format_duration(args.max_duration)
        );
    }
    let target = Target::parse(&args.url)?;
    let method = args.method.clone().unwrap_or(if args.body_size > 0 {
        Method::POST
    } else {
        Method::GET
    });
    // Neither bound given: default to a 10 s run.
    let duration = match (args.requests, args.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, d) => d,
    };
    let argv0 = std::env::args().next().unwrap_or_else(|| "ebb-load".into());
    let info = RunInfo {
        url: args.url.clone(),
        method: method.to_string(),
        connections: args.connections,
        body_size: args.body_size,
        warmup_secs: args.warmup.as_secs_f64(),
        command: rerun_command(&argv0, &args, &method, duration),
    };
    let cfg = LoadConfig {
        target,
        method,
        body: Bytes::from(vec![b'x'; args.body_size]),
        connections: args.connections,
        requests: args.requests,
        duration,
        warmup: args.warmup,
        timeout: args.timeout,
        max_duration: args.max_duration,
    };

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        anyhow::ensure!(t >= 1, "--threads must be at least 1");
        rt.worker_threads(t);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let outcome = rt.block_on(load::run(cfg))?;

    let summary = Summary::new(info, &outcome.tally, outcome.elapsed);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.render_text());
    }
    Ok(if summary.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
