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
    /// Consume a source (NATS, cron) and deliver its events to functions.
    #[command(subcommand)]
    Connector(Box<ConnectorKind>),
    /// Scale functions in Kubernetes with their backlog.
    Autoscaler(AutoscalerArgs),
    /// Publish one event to a topic (NATS, or a running `ebb dev`).
    Publish(PublishArgs),
    /// Run everything on this machine from a stack file: no Kubernetes, no broker needed.
    Dev(DevArgs),
    /// Render Kubernetes manifests (Deployments and Services) for a stack file.
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
    /// Largest request body (413 above it) and answer (502 above it), e.g. 1048576 or 6MiB.
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
    /// The autoscaler, woken when a function has no ready replica (e.g. http://ebb-autoscaler:9091).
    #[arg(long, env = "EBB_AUTOSCALER_URL")]
    autoscaler_url: Option<String>,
    /// How long an event waits for a ready replica before that counts as a failed attempt.
    #[arg(long, env = "EBB_HOLD_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    hold_timeout: Duration,
    /// File holding the secret for the `ebb-signature` header (HMAC-SHA256).
    #[arg(long, env = "EBB_SIGNING_SECRET_FILE")]
    signing_secret_file: Option<PathBuf>,
    /// On shutdown, how long in-flight calls may take to finish.
    #[arg(long, env = "EBB_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Deliveries in flight across all functions.
    #[arg(long, env = "EBB_MAX_INFLIGHT_TOTAL", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..))]
    max_inflight_total: u32,
    /// Bytes of all messages the connector holds at once (in flight, held,
    /// waiting to retry), e.g. 64MiB; pulls are bounded by what is left.
    #[arg(long, env = "EBB_MAX_INFLIGHT_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    max_inflight_bytes: u64,
    /// Smallest delay between retries (doubling up to --retry-max-delay, with full jitter).
    #[arg(long, env = "EBB_RETRY_BASE_DELAY", default_value = "200ms", value_parser = parse_duration)]
    retry_base_delay: Duration,
    /// Largest delay between retries.
    #[arg(long, env = "EBB_RETRY_MAX_DELAY", default_value = "60s", value_parser = parse_duration)]
    retry_max_delay: Duration,
    /// How often a stack file is checked for changes.
    #[arg(long, env = "EBB_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    reload_interval: Duration,
    /// How long a removed function's consumer, queue or group offsets are kept
    /// (with what was published meanwhile) in case it comes back; after that,
    /// what it still holds goes to its dead letters and the rest is deleted.
    #[arg(long, env = "EBB_RETAIN_REMOVED", default_value = "24h", value_parser = parse_duration)]
    retain_removed: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NatsMode {
    /// JetStream: durable, at-least-once, retries and dead letters.
    Jetstream,
    /// Core NATS: queue groups, at-most-once, request/reply.
    Core,
}

#[derive(Debug, Args)]
struct NatsArgs {
    #[command(flatten)]
    common: ConnectorArgs,
    #[arg(long, env = "EBB_NATS_MODE", value_enum, default_value = "jetstream")]
    mode: NatsMode,
    /// The JetStream stream capturing every topic.
    #[arg(long, env = "EBB_STREAM", default_value = "EBB")]
    stream: String,
    /// Maximum age of messages in the stream (0 = unlimited).
    #[arg(long, env = "EBB_STREAM_MAX_AGE", default_value = "0s", value_parser = parse_duration)]
    stream_max_age: Duration,
    /// Maximum size of the stream, e.g. 10GiB (0 = unlimited).
    #[arg(long, env = "EBB_STREAM_MAX_BYTES", default_value = "0", value_parser = parse_bytes)]
    stream_max_bytes: u64,
    /// Replicas of the streams ebb creates; an existing stream keeps its own
    /// replicas, limits and retention (only its subjects are changed).
    #[arg(long, env = "EBB_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    stream_replicas: u8,
    /// The stream capturing dead-letter subjects.
    #[arg(long, env = "EBB_DEAD_LETTER_STREAM", default_value = "EBB_DEAD")]
    dead_letter_stream: String,
    /// How long dead letters are kept.
    #[arg(long, env = "EBB_DEAD_LETTER_MAX_AGE", default_value = "14d", value_parser = parse_duration)]
    dead_letter_max_age: Duration,
    /// The consumers' ack wait (extended with +WPI while a call or hold lasts).
    #[arg(long, env = "EBB_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    ack_wait: Duration,
    /// NATS credentials file (.creds).
    #[arg(long, env = "EBB_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// NATS token.
    #[arg(long, env = "EBB_NATS_TOKEN")]
    nats_token: Option<String>,
    #[arg(long, env = "EBB_NATS_USER")]
    nats_user: Option<String>,
    #[arg(long, env = "EBB_NATS_PASSWORD")]
    nats_password: Option<String>,
    /// CA certificate (PEM) to verify the server.
    #[arg(long, env = "EBB_NATS_TLS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "EBB_NATS_TLS_CERT")]
    nats_tls_cert: Option<PathBuf>,
    #[arg(long, env = "EBB_NATS_TLS_KEY")]
    nats_tls_key: Option<PathBuf>,
    /// Refuse a connection without TLS.
    #[arg(long, env = "EBB_NATS_TLS_REQUIRED")]
    nats_tls_required: bool,
}

#[derive(Debug, Args)]
struct AmqpArgs {
    #[command(flatten)]
    common: ConnectorArgs,
    /// The topic exchange topics are published to (declared durable).
    #[arg(long, env = "EBB_EXCHANGE", default_value = ebb_connectors::amqp::DEFAULT_EXCHANGE)]
    exchange: String,
    /// How long a message may stay unacked (held, or waiting for a retry)
    /// before it is requeued with its attempt count; keep it below RabbitMQ's
    /// consumer_timeout (30m by default).
    #[arg(long, env = "EBB_MAX_UNACKED", default_value = "25m", value_parser = parse_duration)]
    max_unacked: Duration,
}

#[derive(Debug, Args)]
struct KafkaArgs {
    #[command(flatten)]
    common: ConnectorArgs,
    /// Where a consumer group with no committed offset starts: new messages
    /// only, or everything still in the topic.
    #[arg(
        long,
        env = "EBB_KAFKA_OFFSET_RESET",
        value_enum,
        default_value = "latest"
    )]
    offset_reset: OffsetReset,
}

/// Leader election among replicas (with --kubernetes).
#[derive(Debug, Args)]
struct LeaseArgs {
    /// Namespace of the Lease the replicas elect a leader with.
    #[arg(long, env = "EBB_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of that Lease (default: the component's name).
    #[arg(long, env = "EBB_LEASE_NAME")]
    lease_name: Option<String>,
    /// How long followers wait for a silent leader before taking over.
    #[arg(long, env = "EBB_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// The leader steps down when it could not renew for this long.
    #[arg(long, env = "EBB_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,
    /// How often the leader renews and followers check.
    #[arg(long, env = "EBB_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,
}

impl LeaseArgs {
    /// The Lease settings, named `default_name` unless --lease-name says otherwise.
    fn config(&self, default_name: &str) -> Result<ebb_kube::LeaseConfig, String> {
        let mut cfg = ebb_kube::LeaseConfig::new(
            self.lease_namespace.clone(),
            self.lease_name
                .clone()
                .unwrap_or_else(|| default_name.to_string()),
            ebb_kube::LeaseConfig::default_identity(),
        );
        cfg.lease_duration = self.lease_duration;
        cfg.renew_deadline = self.renew_deadline;
        cfg.retry_period = self.retry_period;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

#[derive(Debug, Args)]
struct CronArgs {
    #[command(flatten)]
    common: ConnectorArgs,
    #[command(flatten)]
    lease: LeaseArgs,
}

#[derive(Debug, Subcommand)]
enum ConnectorKind {
    /// NATS JetStream (or core NATS).
    Nats(Box<NatsArgs>),
    /// RabbitMQ (AMQP 0-9-1).
    Amqp(Box<AmqpArgs>),
    /// Kafka.
    Kafka(Box<KafkaArgs>),
    /// Cron schedules.
    Cron(Box<CronArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OffsetReset {
    Latest,
    Earliest,
}

/// The management API settings from `--amqp-management` and the `--amqp` URL.
fn rabbit_source(
    amqp: &str,
    management: Option<&str>,
) -> Result<ebb_autoscaler::app::RabbitSource, String> {
    let Some(mgmt) = management else {
        return Ok(ebb_autoscaler::app::RabbitSource::Amqp(amqp.to_string()));
    };
    let url = reqwest::Url::parse(amqp).map_err(|e| format!("--amqp {amqp:?}: {e}"))?;
    let decode = |s: &str| percent_decode(s);
    let vhost = match url.path().trim_start_matches('/') {
        "" => "/".to_string(),
        v => decode(v),
    };
    Ok(ebb_autoscaler::app::RabbitSource::Management(
        ebb_autoscaler::scalers::rabbitmq::Management {
            url: mgmt.trim_end_matches('/').to_string(),
            vhost,
            user: match url.username() {
                "" => "guest".to_string(),
                u => decode(u),
            },
            password: url
                .password()
                .map(decode)
                .unwrap_or_else(|| "guest".to_string()),
        },
    ))
}

/// `%2F` → `/` (URL userinfo and paths).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[derive(Debug, Args)]
struct AutoscalerArgs {
    #[command(flatten)]
    source: FunctionsSource,
    /// Address of /_/health, /_/ready, /metrics and POST /wake/{ns}/{fn}.
    #[arg(long, env = "EBB_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    admin_addr: SocketAddr,
    /// How often every function's inputs are read and its count decided.
    #[arg(long, env = "EBB_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// NATS URL, to read JetStream backlogs.
    #[arg(long, env = "EBB_NATS_URL")]
    nats: Option<String>,
    /// The JetStream stream the NATS connector uses.
    #[arg(long, env = "EBB_STREAM", default_value = "EBB")]
    stream: String,
    /// RabbitMQ AMQP URL (amqp://user:pass@host:5672/vhost), to read queue depths.
    #[arg(long, env = "EBB_AMQP_URL")]
    amqp: Option<String>,
    /// RabbitMQ management API (http://host:15672): ready + unacked instead of
    /// ready only; credentials and vhost come from --amqp.
    #[arg(long, env = "EBB_AMQP_MANAGEMENT_URL", requires = "amqp")]
    amqp_management: Option<String>,
    /// Kafka bootstrap servers (host:port[,host:port]), to read consumer lag.
    #[arg(long, env = "EBB_KAFKA_BROKERS")]
    kafka: Option<String>,
    /// Where a consumer group without a committed offset starts reading.
    #[arg(
        long,
        env = "EBB_KAFKA_OFFSET_RESET",
        value_enum,
        default_value = "latest"
    )]
    kafka_offset_reset: OffsetReset,
    /// Bound of one input read; past it the input is unknown (hold).
    #[arg(long, env = "EBB_SCALER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    scaler_timeout: Duration,
    /// Functions read (and scaled) at the same time in one poll.
    #[arg(long, env = "EBB_MAX_CONCURRENT_READS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrent_reads: u32,
    /// Read the workers' in-flight calls (`ebb_worker_inflight` on GET
    /// /metrics, summed over a function's ready pods) as one more input.
    /// Needs RBAC `list` on pods and `get` on deployments and statefulsets.
    #[arg(long, env = "EBB_WORKER_INFLIGHT")]
    worker_inflight: bool,
    /// The workers' port, for pods without a container port named `http`.
    #[arg(long, env = "EBB_WORKER_PORT", default_value_t = 8080)]
    worker_port: u16,
    /// How long a cold start (0 → N) is followed until its first replica is
    /// ready (ebb_autoscaler_wake_to_ready_seconds); past it, it counts as a
    /// timeout.
    #[arg(long, env = "EBB_COLD_START_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    cold_start_timeout: Duration,
    /// Credentials of Prometheus and of the RabbitMQ management API.
    #[command(flatten)]
    credentials: Box<AutoscalerCredentials>,
    #[command(flatten)]
    lease: LeaseArgs,
    /// Poll without electing a leader (one replica only).
    #[arg(long, env = "EBB_NO_LEADER_ELECTION")]
    no_leader_election: bool,
}

/// `ebb autoscaler`'s credential flags (boxed: they are many).
#[derive(Debug, Args)]
struct AutoscalerCredentials {
    /// Prometheus (scrapes and queries): `Authorization: Bearer` with this
    /// file's contents, read again on every request.
    #[arg(
        long,
        env = "EBB_PROMETHEUS_BEARER_TOKEN_FILE",
        conflicts_with = "prometheus_user"
    )]
    prometheus_bearer_token_file: Option<PathBuf>,
    /// Prometheus: basic auth user; the password is in --prometheus-password-file.
    #[arg(
        long,
        env = "EBB_PROMETHEUS_USER",
        requires = "prometheus_password_file"
    )]
    prometheus_user: Option<String>,
    /// Prometheus: the basic auth password's file, read again on every request.
    #[arg(
        long,
        env = "EBB_PROMETHEUS_PASSWORD_FILE",
        requires = "prometheus_user"
    )]
    prometheus_password_file: Option<PathBuf>,
    /// Prometheus over https: trust only the CA certificates of this PEM file.
    #[arg(long, env = "EBB_PROMETHEUS_CA_FILE")]
    prometheus_ca_file: Option<PathBuf>,
    /// RabbitMQ management API: `Authorization: Bearer` with this file's
    /// contents (OAuth 2 plugin) instead of the --amqp URL's user.
    #[arg(
        long,
        env = "EBB_AMQP_MANAGEMENT_BEARER_TOKEN_FILE",
        requires = "amqp_management",
        conflicts_with = "amqp_management_user"
    )]
    amqp_management_bearer_token_file: Option<PathBuf>,
    /// RabbitMQ management API: basic auth user instead of the --amqp URL's;
    /// the password is in --amqp-management-password-file.
    #[arg(
        long,
        env = "EBB_AMQP_MANAGEMENT_USER",
        requires_all = ["amqp_management", "amqp_management_password_file"]
    )]
    amqp_management_user: Option<String>,
    /// RabbitMQ management API: the basic auth password's file, read again on
    /// every request.
    #[arg(
        long,
        env = "EBB_AMQP_MANAGEMENT_PASSWORD_FILE",
        requires = "amqp_management_user"
    )]
    amqp_management_password_file: Option<PathBuf>,
    /// RabbitMQ management API over https: trust only the CA certificates of
    /// this PEM file.
    #[arg(
        long,
        env = "EBB_AMQP_MANAGEMENT_CA_FILE",
        requires = "amqp_management"
    )]
    amqp_management_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Publish to NATS at this URL (JetStream, waiting for the stream's ack).
    #[arg(long, env = "EBB_NATS_URL")]
    nats: Option<String>,
    /// With --nats: a plain core NATS publish, no stream ack.
    #[arg(long)]
    core: bool,
    /// Publish to RabbitMQ at this URL (amqp://user:pass@host:5672/vhost),
    /// waiting for the broker's confirm.
    #[arg(long, env = "EBB_AMQP_URL")]
    amqp: Option<String>,
    /// With --amqp: the exchange the connector uses.
    #[arg(long, env = "EBB_EXCHANGE", default_value = ebb_connectors::amqp::DEFAULT_EXCHANGE, requires = "amqp")]
    exchange: String,
    /// Publish to Kafka (host:port[,host:port]), waiting until the brokers
    /// have it (acks=all).
    #[arg(long, env = "EBB_KAFKA_BROKERS")]
    kafka: Option<String>,
    /// With --kafka: the message key.
    #[arg(long, requires = "kafka")]
    key: Option<String>,
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
    /// Where to serve POST /publish/{topic}, /_/status and /metrics.
    #[arg(long, env = "EBB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How often the scaling policy runs.
    #[arg(long, env = "EBB_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Events waiting per function before a publish is refused (429).
    #[arg(long, env = "EBB_MAX_BACKLOG", default_value = "10000", value_parser = clap::value_parser!(u32).range(1..))]
    max_backlog: u32,
    /// The stack file, e.g. examples/stack.yaml.
    stack: PathBuf,
}

#[derive(Debug, Args)]
struct DeployArgs {
    /// The image with `ebb` and the functions' handlers.
    #[arg(long, env = "EBB_IMAGE")]
    image: String,
    /// Namespace of the Deployments and Services.
    #[arg(long, env = "EBB_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The stack file, e.g. examples/stack.yaml.
    stack: PathBuf,
}

/// `ebb deploy`: manifests on stdout, functions left out on stderr.
fn run_deploy(args: DeployArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.stack) {
        Ok(t) => t,
        Err(e) => {
            return config_error(
                "deploy",
                format!("cannot read {}: {e}", args.stack.display()),
            );
        }
    };
    match ebb_kube::manifests::render(&text, &args.image, &args.namespace) {
        Ok(r) => {
            for s in &r.skipped {
                eprintln!("ebb deploy: {s}");
            }
            print!("{}", r.yaml);
            ExitCode::SUCCESS
        }
        Err(e) => config_error("deploy", format!("{}: {e}", args.stack.display())),
    }
}

impl Cli {
    /// Logging to stderr; `ebb dev` keeps log lines above its live table.
    pub fn init_tracing(&self) {
        match &self.command {
            Command::Dev(_) => ebb_runtime::init_tracing_to(
                self.log_format,
                ebb_dev::console::LogWriter(ebb_dev::console::global()),
            ),
            _ => ebb_runtime::init_tracing(self.log_format),
        }
    }

    pub async fn run(self) -> ExitCode {
        match self.command {
            Command::Worker(args) => run_worker(args).await,
            Command::Connector(kind) => match *kind {
                ConnectorKind::Nats(args) => run_nats(*args).await,
                ConnectorKind::Cron(args) => run_cron(*args).await,
                ConnectorKind::Amqp(args) => run_amqp(*args).await,
                ConnectorKind::Kafka(args) => run_kafka(*args).await,
            },
            Command::Autoscaler(args) => run_autoscaler(args).await,
            Command::Publish(args) => run_publish(args).await,
            Command::Dev(args) => run_dev(args).await,
            Command::Deploy(args) => run_deploy(args),
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

/// One line naming what is wrong, exit 2, as clap does for bad flags.
fn config_error(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("ebb {what}: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn connector_common(
    a: &ConnectorArgs,
    component: &str,
) -> Result<ebb_connectors::app::CommonOptions, String> {
    let functions = match (&a.source.functions, a.source.kubernetes) {
        (Some(path), false) => ebb_connectors::app::FunctionsFrom::Stack {
            path: path.clone(),
            reload_every: a.reload_interval,
        },
        (None, true) => ebb_connectors::app::FunctionsFrom::Kubernetes {
            namespace: a.source.namespace.clone(),
            component: component.to_string(),
        },
        _ => {
            return Err(
                "say where functions come from: --functions STACK.yaml or --kubernetes".into(),
            );
        }
    };
    if a.retry_base_delay.is_zero() || a.retry_base_delay > a.retry_max_delay {
        return Err("--retry-base-delay must be above 0 and at most --retry-max-delay".into());
    }
    Ok(ebb_connectors::app::CommonOptions {
        functions,
        admin_addr: Some(a.admin_addr),
        autoscaler_url: a.autoscaler_url.clone(),
        hold_timeout: a.hold_timeout,
        signing_secret_file: a.signing_secret_file.clone(),
        backoff: ebb_connectors::retry::Backoff {
            base: a.retry_base_delay,
            cap: a.retry_max_delay,
        },
        resolver: None,
        retain_removed: a.retain_removed,
        max_inflight_bytes: usize::try_from(a.max_inflight_bytes.max(1)).unwrap_or(usize::MAX),
    })
}

async fn run_nats(args: NatsArgs) -> ExitCode {
    let common = match connector_common(&args.common, "ebb-connector-nats") {
        Ok(c) => c,
        Err(e) => return config_error("connector nats", e),
    };
    let cfg = ebb_connectors::nats::NatsConfig {
        url: args
            .common
            .url
            .clone()
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
        mode: match args.mode {
            NatsMode::Jetstream => ebb_connectors::nats::Mode::JetStream,
            NatsMode::Core => ebb_connectors::nats::Mode::Core,
        },
        auth: ebb_connectors::nats::Auth {
            creds_file: args.nats_creds,
            token: args.nats_token,
            user: args.nats_user,
            password: args.nats_password,
            tls: ebb_connectors::nats::Tls {
                ca: args.nats_tls_ca,
                cert: args.nats_tls_cert,
                key: args.nats_tls_key,
                required: args.nats_tls_required,
            },
        },
        stream: args.stream,
        stream_max_age: args.stream_max_age,
        stream_max_bytes: i64::try_from(args.stream_max_bytes).unwrap_or(i64::MAX),
        dead_stream: args.dead_letter_stream,
        dead_max_age: args.dead_letter_max_age,
        stream_replicas: usize::from(args.stream_replicas),
        ack_wait: args.ack_wait,
        max_inflight_total: args.common.max_inflight_total as usize,
        drain_timeout: args.common.drain_timeout,
    };
    let source = ebb_connectors::nats::source(cfg);
    match ebb_connectors::app::run_broker(common, source, ebb_runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => config_error("connector nats", e),
        Err(e) => {
            eprintln!("ebb connector nats: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the payload argument: literal text, `@FILE`, or `-` for stdin.
fn read_payload(data: &str) -> Result<Vec<u8>, String> {
    if data == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(buf)
    } else if let Some(path) = data.strip_prefix('@') {
        std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
    } else {
        Ok(data.as_bytes().to_vec())
    }
}

/// Parses `-H Name:value` flags.
fn parse_headers(raw: &[String]) -> Result<http::HeaderMap, String> {
    let mut h = http::HeaderMap::new();
    for item in raw {
        let Some((name, value)) = item.split_once(':') else {
            return Err(format!("-H {item:?}: expected Name:value"));
        };
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("-H {item:?}: {:?} is not a valid header name", name.trim()))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("-H {item:?}: the value is not a valid header value"))?;
        h.append(name, value);
    }
    Ok(h)
}

async fn run_dev(args: DevArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ebb dev: cannot find the ebb binary to run replicas with: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = ebb_dev::DevConfig {
        stack: args.stack,
        listen: args.listen,
        exe,
        interval: args.interval,
        max_backlog: args.max_backlog as usize,
        reload_every: Duration::from_millis(500),
    };
    match ebb_dev::run(cfg, ebb_runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ebb_dev::Error::Config(_)) => config_error("dev", e),
        Err(e) => {
            eprintln!("ebb dev: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ebb publish --dev URL TOPIC DATA`: one event to a running `ebb dev`.
async fn publish_dev(url: &str, topic: &str, headers: http::HeaderMap, body: Vec<u8>) -> ExitCode {
    let base = url.trim_end_matches('/');
    let target = format!(
        "{base}/publish/{}",
        percent_encoding::utf8_percent_encode(topic, percent_encoding::NON_ALPHANUMERIC)
    );
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ebb publish: {e}");
            return ExitCode::FAILURE;
        }
    };
    let resp = match client
        .post(&target)
        .headers(headers)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "ebb publish: cannot reach ebb dev at {base} ({e}); is `ebb dev` running with --listen on that address?"
            );
            return ExitCode::FAILURE;
        }
    };
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        eprintln!("ebb publish: ebb dev answered {status}: {}", text.trim());
        return ExitCode::FAILURE;
    }
    let functions: Vec<String> = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("functions").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    if functions.is_empty() && !text.contains("stream_sequence") {
        eprintln!("published to {topic}, but no function subscribes to it: the event was dropped");
    } else if functions.is_empty() {
        eprintln!("published to {topic}");
    } else {
        eprintln!("published to {topic} → {}", functions.join(", "));
    }
    ExitCode::SUCCESS
}

async fn run_publish(args: PublishArgs) -> ExitCode {
    let headers = match parse_headers(&args.headers) {
        Ok(h) => h,
        Err(e) => return config_error("publish", e),
    };
    let body = match read_payload(&args.data) {
        Ok(b) => b,
        Err(e) => return config_error("publish", e),
    };
    if let Some(dev) = &args.dev {
        if args.nats.is_some() || args.amqp.is_some() || args.kafka.is_some() {
            return config_error("publish", "give one of --dev, --nats, --amqp, --kafka");
        }
        if body.len() > ebb_dev::MAX_EVENT {
            return config_error(
                "publish",
                format!(
                    "the event is {} bytes; ebb dev accepts at most 6 MiB per event",
                    body.len()
                ),
            );
        }
        return publish_dev(dev, &args.topic, headers, body).await;
    }
    if let Some(url) = &args.amqp {
        if args.nats.is_some() || args.kafka.is_some() {
            return config_error("publish", "give one of --dev, --nats, --amqp, --kafka");
        }
        let publish =
            ebb_connectors::amqp::publish(url, &args.exchange, &args.topic, &headers, body.into());
        return match tokio::time::timeout(Duration::from_secs(10), publish).await {
            Ok(Ok(())) => {
                eprintln!("published to {} (confirmed)", args.topic);
                ExitCode::SUCCESS
            }
            Ok(Err(e)) if e.is_config() => config_error("publish", e),
            Ok(Err(e)) => {
                eprintln!("ebb publish: {e}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("ebb publish: no confirm from RabbitMQ within 10s");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(brokers) = &args.kafka {
        if args.nats.is_some() {
            return config_error("publish", "give one of --dev, --nats, --amqp, --kafka");
        }
        let publish = ebb_connectors::kafka::publish(
            brokers,
            &args.topic,
            args.key.as_deref(),
            &headers,
            body.into(),
        );
        return match tokio::time::timeout(Duration::from_secs(15), publish).await {
            Ok(Ok((partition, offset))) => {
                eprintln!(
                    "published to {} (partition {partition}, offset {offset})",
                    args.topic
                );
                ExitCode::SUCCESS
            }
            Ok(Err(e)) if e.is_config() => config_error("publish", e),
            Ok(Err(e)) => {
                eprintln!("ebb publish: {e}");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("ebb publish: Kafka did not take the message within 15s");
                ExitCode::FAILURE
            }
        };
    }
    let Some(url) = args.nats.clone() else {
        return config_error(
            "publish",
            "say where to publish: --dev URL, --nats URL, --amqp URL or --kafka BROKERS",
        );
    };
    let cfg = ebb_connectors::nats::NatsConfig {
        url,
        ..Default::default()
    };
    let client = match tokio::time::timeout(
        Duration::from_secs(10),
        ebb_connectors::nats::connect(
            &cfg,
            "ebb-publish",
            &tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            eprintln!("ebb publish: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("ebb publish: cannot connect to {} within 10s", cfg.url);
            return ExitCode::FAILURE;
        }
    };
    match ebb_connectors::nats::publish(&client, &args.topic, &headers, body.into(), args.core)
        .await
    {
        Ok(Some(seq)) => {
            eprintln!("published to {} (stream sequence {seq})", args.topic);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb publish: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_amqp(args: AmqpArgs) -> ExitCode {
    let common = match connector_common(&args.common, "ebb-connector-amqp") {
        Ok(c) => c,
        Err(e) => return config_error("connector amqp", e),
    };
    let cfg = ebb_connectors::amqp::AmqpConfig {
        url: args
            .common
            .url
            .clone()
            .unwrap_or_else(|| ebb_connectors::amqp::AmqpConfig::default().url),
        exchange: args.exchange,
        max_inflight_total: args.common.max_inflight_total as usize,
        drain_timeout: args.common.drain_timeout,
        max_unacked: args.max_unacked,
    };
    let source = match ebb_connectors::amqp::source(cfg) {
        Ok(s) => s,
        Err(e) => return config_error("connector amqp", e),
    };
    match ebb_connectors::app::run_broker(common, source, ebb_runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => config_error("connector amqp", e),
        Err(e) => {
            eprintln!("ebb connector amqp: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_kafka(args: KafkaArgs) -> ExitCode {
    let common = match connector_common(&args.common, "ebb-connector-kafka") {
        Ok(c) => c,
        Err(e) => return config_error("connector kafka", e),
    };
    let cfg = ebb_connectors::kafka::KafkaConfig {
        brokers: args
            .common
            .url
            .clone()
            .unwrap_or_else(|| ebb_connectors::kafka::KafkaConfig::default().brokers),
        offset_reset: match args.offset_reset {
            OffsetReset::Latest => ebb_connectors::kafka::OffsetReset::Latest,
            OffsetReset::Earliest => ebb_connectors::kafka::OffsetReset::Earliest,
        },
        max_inflight_total: args.common.max_inflight_total as usize,
        drain_timeout: args.common.drain_timeout,
        ..Default::default()
    };
    let source = match ebb_connectors::kafka::source(cfg) {
        Ok(s) => s,
        Err(e) => return config_error("connector kafka", e),
    };
    match ebb_connectors::app::run_broker(common, source, ebb_runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => config_error("connector kafka", e),
        Err(e) => {
            eprintln!("ebb connector kafka: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_cron(args: CronArgs) -> ExitCode {
    let common = match connector_common(&args.common, "ebb-connector-cron") {
        Ok(c) => c,
        Err(e) => return config_error("connector cron", e),
    };
    let lease = match args.common.source.kubernetes {
        true => match args.lease.config("ebb-connector-cron") {
            Ok(c) => Some(c),
            Err(e) => return config_error("connector cron", e),
        },
        false => None,
    };
    match ebb_connectors::app::run_cron(
        common,
        lease,
        args.common.drain_timeout,
        ebb_runtime::shutdown_signal(),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => config_error("connector cron", e),
        Err(e) => {
            eprintln!("ebb connector cron: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_autoscaler(args: AutoscalerArgs) -> ExitCode {
    if !args.source.kubernetes {
        return config_error(
            "autoscaler",
            "--functions: local replicas are scaled by `ebb dev STACK`, which runs this policy over them; ebb autoscaler scales Kubernetes workloads (--kubernetes)",
        );
    }
    let lease = match args.no_leader_election {
        false => match args.lease.config("ebb-autoscaler") {
            Ok(c) => Some(c),
            Err(e) => return config_error("autoscaler", e),
        },
        true => None,
    };
    let cfg = ebb_autoscaler::app::AutoscalerConfig {
        admin_addr: args.admin_addr,
        namespace: args.source.namespace.clone(),
        interval: args.interval,
        nats: args.nats.clone().map(|u| (u, args.stream.clone())),
        rabbitmq: match &args.amqp {
            Some(a) => match rabbit_source(a, args.amqp_management.as_deref()) {
                Ok(r) => Some(r),
                Err(e) => return config_error("autoscaler", e),
            },
            None => None,
        },
        kafka: args.kafka.clone().map(|b| {
            (
                b,
                match args.kafka_offset_reset {
                    OffsetReset::Latest => ebb_autoscaler::scalers::kafka::OffsetReset::Latest,
                    OffsetReset::Earliest => ebb_autoscaler::scalers::kafka::OffsetReset::Earliest,
                },
            )
        }),
        scaler_timeout: args.scaler_timeout,
        max_concurrent_reads: args.max_concurrent_reads as usize,
        prometheus_auth: ebb_autoscaler::scalers::prometheus::HttpAuth {
            bearer_token_file: args.credentials.prometheus_bearer_token_file.clone(),
            basic_auth: args
                .credentials
                .prometheus_user
                .clone()
                .zip(args.credentials.prometheus_password_file.clone()),
            ca_file: args.credentials.prometheus_ca_file.clone(),
        },
        amqp_management_auth: ebb_autoscaler::scalers::prometheus::HttpAuth {
            bearer_token_file: args.credentials.amqp_management_bearer_token_file.clone(),
            basic_auth: args
                .credentials
                .amqp_management_user
                .clone()
                .zip(args.credentials.amqp_management_password_file.clone()),
            ca_file: args.credentials.amqp_management_ca_file.clone(),
        },
        worker_inflight: args.worker_inflight.then_some(args.worker_port),
        cold_start_timeout: args.cold_start_timeout,
        lease,
    };
    match ebb_autoscaler::app::run(cfg, ebb_runtime::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => config_error("autoscaler", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_settings_come_from_the_amqp_url() {
        let r = rabbit_source(
            "amqp://ops:s%40cret@rabbit:5672/%2Fshop",
            Some("http://rabbit:15672/"),
        )
        .unwrap();
        let ebb_autoscaler::app::RabbitSource::Management(m) = r else {
            panic!("management expected");
        };
        assert_eq!(m.url, "http://rabbit:15672");
        assert_eq!(m.user, "ops");
        assert_eq!(m.password, "s@cret");
        assert_eq!(m.vhost, "/shop");

        let r = rabbit_source("amqp://rabbit", Some("http://rabbit:15672")).unwrap();
        let ebb_autoscaler::app::RabbitSource::Management(m) = r else {
            panic!("management expected");
        };
        assert_eq!(
            (m.user.as_str(), m.password.as_str(), m.vhost.as_str()),
            ("guest", "guest", "/")
        );

        assert!(matches!(
            rabbit_source("amqp://rabbit/v", None),
            Ok(ebb_autoscaler::app::RabbitSource::Amqp(u)) if u == "amqp://rabbit/v"
        ));
        assert!(rabbit_source("not a url", Some("http://x")).is_err());
    }
}
