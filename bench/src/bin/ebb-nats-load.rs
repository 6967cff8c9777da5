#![forbid(unsafe_code)]
//! `ebb-nats-load`: publishes a bounded burst to NATS and waits until a
//! JetStream consumer has worked it off, for the connector benchmark.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ebb_bench::cli::parse_duration;
use futures::StreamExt as _;
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(name = "ebb-nats-load", version)]
struct Args {
    /// NATS URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish COUNT messages of SIZE bytes to SUBJECT (JetStream, acks
    /// awaited in windows; or core with --core).
    Publish {
        #[arg(long)]
        subject: String,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Publish acks outstanding at once.
        #[arg(long, default_value_t = 512)]
        window: usize,
        #[arg(long)]
        core: bool,
    },
    /// Wait until the consumer has nothing pending or unacked; print the
    /// seconds it took and the rate for --count messages.
    Drained {
        #[arg(long, default_value = "EBB")]
        stream: String,
        #[arg(long)]
        consumer: String,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb-nats-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connect to {}", args.url))?;
    match args.command {
        Command::Publish {
            subject,
            count,
            size,
            window,
            core,
        } => {
            let payload = Bytes::from(vec![b'x'; size]);
            let start = Instant::now();
            if core {
                for _ in 0..count {
                    client.publish(subject.clone(), payload.clone()).await?;
                }
                client.flush().await?;
            } else {
                let js = jetstream::new(client.clone());
                let mut acks = futures::stream::FuturesUnordered::new();
                for _ in 0..count {
                    if acks.len() >= window.max(1)
                        && let Some(r) = acks.next().await
                    {
                        let _: jetstream::publish::PublishAck = r?;
                    }
                    acks.push(
                        js.publish(subject.clone(), payload.clone())
                            .await?
                            .into_future(),
                    );
                }
                while let Some(r) = acks.next().await {
                    r?;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"published\":{count},\"size\":{size},\"secs\":{secs:.3},\"per_sec\":{:.0}}}",
                count as f64 / secs
            );
        }
        Command::Drained {
            stream,
            consumer,
            count,
            timeout,
        } => {
            let js = jetstream::new(client.clone());
            let s = js.get_stream(&stream).await?;
            let start = Instant::now();
            loop {
                let info = s.consumer_info(&consumer).await?;
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    break;
                }
                if start.elapsed() > timeout {
                    bail!(
                        "consumer {consumer} still has {} pending and {} unacked after {timeout:?}",
                        info.num_pending,
                        info.num_ack_pending
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"drained\":{count},\"secs\":{secs:.3},\"per_sec\":{:.0}}}",
                count as f64 / secs
            );
        }
    }
    Ok(())
}
