#![forbid(unsafe_code)]
//! `ebb-bench-upstream`: the trivial upstream the worker is measured in front
//! of. Answers every request with 200 and the request body echoed (or `ok\n`
//! when it is empty, or always with --fixed). Also usable as an http-mode
//! handler: `ebb worker --mode http --upstream http://127.0.0.1:PORT --
//! ebb-bench-upstream --listen 127.0.0.1:PORT`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use ebb_bench::upstream::{self, Reply};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(name = "ebb-bench-upstream", version)]
struct Args {
    /// Address to listen on [default: 127.0.0.1:$PORT].
    #[arg(long)]
    listen: Option<SocketAddr>,

    /// Always answer the fixed body instead of echoing the request body.
    #[arg(long)]
    fixed: bool,

    /// Runtime worker threads [default: number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
}

fn listen_addr(listen: Option<SocketAddr>, port_env: Option<String>) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = listen {
        return Ok(addr);
    }
    let port = port_env.context("give --listen ADDR or set PORT")?;
    let port: u16 = port
        .trim()
        .parse()
        .with_context(|| format!("invalid PORT {port:?}"))?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

fn main() -> ExitCode {
    match real_main(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb-bench-upstream: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let addr = listen_addr(args.listen, std::env::var("PORT").ok())?;
    let reply = if args.fixed {
        Reply::Fixed
    } else {
        Reply::Echo
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
    rt.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "ebb-bench-upstream: listening on http://{}",
            listener.local_addr()?
        );
        tokio::select! {
            () = upstream::serve(listener, reply) => {}
            () = shutdown_signal() => {}
        }
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT (exits promptly; in-flight requests are cut).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Could not install handlers: keep the default dispositions (which
        // terminate the process) and never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_flag_wins_over_port_env() {
        let a: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(listen_addr(Some(a), Some("1234".into())).unwrap(), a);
        assert_eq!(
            listen_addr(None, Some("1234".into())).unwrap(),
            "127.0.0.1:1234".parse::<SocketAddr>().unwrap()
        );
        assert!(listen_addr(None, None).is_err());
        assert!(listen_addr(None, Some("http".into())).is_err());
    }
}
