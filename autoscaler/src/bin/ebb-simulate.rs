//! Replays arrival traces through ebb's scaling policy and models of
//! KEDA+HPA and Knative's KPA; prints what each costs and how long messages
//! wait.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ebb_autoscaler::simulate::{self, SimConfig, Trace};

#[derive(Debug, Parser)]
#[command(
    name = "ebb-simulate",
    about = "Replays arrival traces (CSV `t,arrivals` per second) through ebb's policy, KEDA+HPA and KPA"
)]
struct Args {
    /// Messages a second one replica serves.
    #[arg(long, default_value_t = 10.0)]
    mu: f64,
    /// From a replica's creation until it serves.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    cold_start: Duration,
    /// Most replicas of any policy.
    #[arg(long, default_value_t = 50)]
    max: u32,
    /// Backlog (or concurrency) per replica aimed for, for every policy.
    #[arg(long, default_value_t = 10.0)]
    target: f64,
    /// Idle time simulated after each trace ends.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    tail: Duration,
    /// Write one SVG chart per trace into this directory.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print ebb's replicas per second (`t,replicas`) on stdout; the tables
    /// then go to stderr.
    #[arg(long)]
    series: bool,
    /// Exit 1 when ebb misses a goal on some trace.
    #[arg(long)]
    check: bool,
    /// Trace files.
    #[arg(required = true)]
    traces: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.mu > 0.0, "--mu must be positive");
    anyhow::ensure!(args.target > 0.0, "--target must be positive");
    anyhow::ensure!(args.max > 0, "--max must be positive");
    let cfg = SimConfig {
        mu: args.mu,
        cold_start: args.cold_start,
        max: args.max,
        target: args.target,
        tail: args.tail.as_secs(),
    };
    if let Some(dir) = &args.svg {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut all_pass = true;
    for path in &args.traces {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        let trace = Trace::parse(&name, &text).map_err(anyhow::Error::msg)?;
        let outcomes = simulate::compare(&trace, &cfg);
        all_pass &= simulate::goals(&outcomes, &cfg).iter().all(|(_, ok)| *ok);
        let table = simulate::table(&trace, &outcomes, &cfg);
        if args.series {
            eprintln!("{table}");
            println!("# {name}");
            println!("t,replicas");
            for (t, r) in outcomes[0].replicas.iter().enumerate() {
                println!("{t},{r}");
            }
        } else {
            println!("{table}");
        }
        if let Some(dir) = &args.svg {
            let out = dir.join(format!("{name}.svg"));
            std::fs::write(&out, simulate::svg(&trace, &outcomes))
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    if args.check && !all_pass {
        std::process::exit(1);
    }
    Ok(())
}
