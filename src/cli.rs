//! The command line: one subcommand per ebb process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ebb_runtime::{LogFormat, parse_bytes, parse_duration};

/// Exit code for bad configuration, as clap uses for bad flags.
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "ebb",
    version,
    about = "Delivers events from NATS, RabbitMQ, Kafka and cron to functions, and scales them with their backlog",
    propagate_version = true
)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, env = "EBB_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a function's handler behind ebb's HTTP contract (the entry point of a function pod).
    Worker(WorkerArgs),
    /// Consume a source and deliver its events to functions (not implemented yet).
    #[command(subcommand)]
    Connector(ConnectorKind),
    /// Scale functions with their backlog (not implemented yet).
    Autoscaler(AutoscalerArgs),
    /// Publish one event to a topic (not implemented yet).
    Publish(PublishArgs),
    /// Run everything on this machine from a stack file, no Kubernetes (not implemented yet).
    Dev(DevArgs),
    /// Render Kubernetes manifests for a stack file (not implemented yet).
    Deploy(DeployArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum WorkerMode {
    /// One process per request: body on stdin, stdout is the response.
    Fork,
    /// Start the handler once and proxy to it over HTTP.
    Http,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Address to serve the function and /_/health, /_/ready, /metrics on.
    #[arg(long, env = "EBB_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How the handler runs.
    #[arg(long, env = "EBB_MODE", value_enum, default_value = "fork")]
    mode: WorkerMode,
    /// Where the handler listens in http mode, e.g. http://127.0.0.1:8081.
    #[arg(long, env = "EBB_UPSTREAM")]
    upstream: Option<http::Uri>,
    /// Concurrent calls; more are refused with 429 and `ebb-worker: busy`.
    #[arg(long, env = "EBB_MAX_INFLIGHT", default_value = "16", value_parser = clap::value_parser!(u32).range(1..))]
    max_inflight: u32,
    /// Bound of one call (504 past it).
    #[arg(long, env = "EBB_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, env = "EBB_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Largest request body (413 above it), e.g. 1048576 or 6MiB.
    #[arg(long, env = "EBB_MAX_BODY", default_value = "6MiB", value_parser = parse_bytes)]
    max_body: u64,
    /// How long the http-mode handler may take to accept connections.
    #[arg(long, env = "EBB_STARTUP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    startup_timeout: Duration,
    /// The handler command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct FunctionsSource {
    /// Read functions from a stack file.
    #[arg(
        long,
        env = "EBB_FUNCTIONS",
        conflicts_with = "kubernetes",
        required_unless_present = "kubernetes"
    )]
    functions: Option<PathBuf>,
    /// Discover functions from annotated Deployments.
    #[arg(long, env = "EBB_KUBERNETES")]
    kubernetes: bool,
    /// Namespace to watch (all when absent).
    #[arg(long, env = "EBB_NAMESPACE", requires = "kubernetes")]
    namespace: Option<String>,
}

#[derive(Debug, Args)]
struct ConnectorArgs {
    #[command(flatten)]
    source: FunctionsSource,
    /// Broker URL (NATS/AMQP URL, or Kafka host:port[,host:port]).
    #[arg(long, env = "EBB_URL")]
    url: Option<String>,
    /// Address of /_/health, /_/ready and /metrics.
    #[arg(long, env = "EBB_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
}

#[derive(Debug, Subcommand)]
enum ConnectorKind {
    /// NATS JetStream (or core NATS).
    Nats(ConnectorArgs),
    /// RabbitMQ (AMQP 0-9-1).
    Amqp(ConnectorArgs),
    /// Kafka.
    Kafka(ConnectorArgs),
    /// Cron schedules.
    Cron(ConnectorArgs),
}

#[derive(Debug, Args)]
struct AutoscalerArgs {
    #[command(flatten)]
    source: FunctionsSource,
    /// Address of /_/health, /_/ready, /metrics and /wake.
    #[arg(long, env = "EBB_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    admin_addr: SocketAddr,
}

#[derive(Debug, Args)]
struct PublishArgs {
    #[arg(long, env = "EBB_NATS_URL")]
    nats: Option<String>,
    #[arg(long, env = "EBB_AMQP_URL")]
    amqp: Option<String>,
    #[arg(long, env = "EBB_KAFKA_BROKERS")]
    kafka: Option<String>,
    #[arg(long, env = "EBB_DEV_URL")]
    dev: Option<String>,
    /// Header `Name:value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    topic: String,
    /// The payload, `@FILE`, or `-` for stdin.
    data: String,
}

#[derive(Debug, Args)]
struct DevArgs {
    #[arg(long, env = "EBB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    stack: PathBuf,
}

#[derive(Debug, Args)]
struct DeployArgs {
    stack: PathBuf,
}

fn not_implemented(what: &str) -> ExitCode {
    eprintln!("ebb {what}: not implemented yet (see the README for what works today)");
    ExitCode::from(EXIT_CONFIG)
}

impl Cli {
    pub async fn run(self) -> ExitCode {
        match self.command {
            Command::Worker(args) => run_worker(args).await,
            Command::Connector(kind) => not_implemented(match kind {
                ConnectorKind::Nats(_) => "connector nats",
                ConnectorKind::Amqp(_) => "connector amqp",
                ConnectorKind::Kafka(_) => "connector kafka",
                ConnectorKind::Cron(_) => "connector cron",
            }),
            Command::Autoscaler(_) => not_implemented("autoscaler"),
            Command::Publish(_) => not_implemented("publish"),
            Command::Dev(_) => not_implemented("dev"),
            Command::Deploy(_) => not_implemented("deploy"),
        }
    }
}

async fn run_worker(args: WorkerArgs) -> ExitCode {
    let config = ebb_worker::Config {
        listen: args.listen,
        mode: match args.mode {
            WorkerMode::Fork => ebb_worker::Mode::Fork,
            WorkerMode::Http => ebb_worker::Mode::Http,
        },
        upstream: args.upstream,
        max_inflight: args.max_inflight as usize,
        timeout: args.timeout,
        drain_timeout: args.drain_timeout,
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        startup_timeout: args.startup_timeout,
        command: args.command,
    };
    match ebb_worker::run(config, ebb_runtime::shutdown_signal()).await {
        Ok(ebb_worker::Outcome::Drained) => ExitCode::SUCCESS,
        Ok(ebb_worker::Outcome::CutOff(n)) => {
            eprintln!(
                "ebb worker: drain timeout passed with {n} call(s) still running; they were cut off"
            );
            ExitCode::FAILURE
        }
        Err(e) if e.is_config() => {
            eprintln!("ebb worker: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("ebb worker: {e}");
            ExitCode::FAILURE
        }
    }
}
