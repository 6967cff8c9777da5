//! A RabbitMQ node shared by the tests of one run, with a fresh vhost per test.
//!
//! # Lifecycle
//!
//! [`RabbitMq::shared`] starts (or attaches to) a node of its own: `epmd -port P`
//! and `rabbitmq-server` (the script in `/usr/lib/rabbitmq/bin`, which `exec`s
//! the Erlang VM) with node name, ports, data, logs, config and `HOME` (Erlang
//! cookie) in a temp dir, listening on 127.0.0.1 only. Startup takes seconds,
//! so the node is shared:
//!
//! * plain `cargo test`: by all tests of the test binary (one process);
//! * `cargo nextest run` (a process per test): by all test processes of the
//!   run, keyed by `NEXTEST_RUN_ID`.
//!
//! Test processes coordinate through a directory
//! `$TMPDIR/ebb-test-rabbitmq/<run-…|pid-…>/` holding a lock file, a `state`
//! file (ports of the ready node) and one lease file per test process. A
//! watchdog shell (`rabbitmq-watchdog.sh`), started with the node in its own
//! process group, kills the broker and epmd by pid and deletes the directory
//! once no lease names a live process (immediately for `cargo test`, after a
//! 5 s grace under nextest so consecutive test processes reuse the node).
//! Statics are never dropped, so this is what keeps a node from outliving the
//! tests, even when a test process is killed.
//!
//! Set `EBB_TEST_AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672`) and
//! `EBB_TEST_RABBITMQ_MANAGEMENT_URL` (e.g. `http://guest:guest@127.0.0.1:15672`)
//! to use an existing broker instead.

use super::http::{self, Credentials, Response};
use super::process::pid;
use super::{find_executable, free_port, random_u64, tail_file, unique_name};
use hyper::Method;
use nix::sys::signal::{Signal, kill};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// How long one node start may take (measured: ~5 s idle, ~11 s on 2 busy CPUs).
const READY_LIMIT: Duration = Duration::from_secs(60);
/// Under nextest, how long a node outlives its last test process.
const SHARED_GRACE_SECS: u32 = 5;
const WATCHDOG: &str = include_str!("rabbitmq-watchdog.sh");
const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A RabbitMQ broker with the management plugin.
#[derive(Debug)]
pub struct RabbitMq {
    /// `amqp://user:password@127.0.0.1:PORT` (no vhost).
    amqp_base: String,
    /// `http://127.0.0.1:PORT` (no credentials).
    management_url: String,
    credentials: Credentials,
    /// Where the local node keeps its logs (for failure messages).
    node_dir: Option<PathBuf>,
}

/// A vhost created for one test; the broker is shared, the vhost is not.
#[derive(Clone, Debug)]
pub struct Vhost {
    name: String,
    url: String,
    management_url: String,
    credentials: Credentials,
}

impl RabbitMq {
    /// The broker for this test run, started on first use (see module docs).
    pub async fn shared() -> &'static Self {
        static SHARED: OnceCell<Result<RabbitMq, String>> = OnceCell::const_new();
        let result = SHARED
            .get_or_init(|| async {
                match external_from_env() {
                    Some(external) => external,
                    None => start_or_attach().await,
                }
            })
            .await;
        match result {
            Ok(rabbit) => rabbit,
            Err(err) => panic!("{err}"),
        }
    }

    /// Creates a fresh vhost with all permissions for the test user.
    pub async fn vhost(&self) -> Vhost {
        let name = unique_name("ebb");
        let created = self
            .management(Method::PUT, &format!("/api/vhosts/{name}"), None)
            .await;
        assert!(
            created.status.is_success(),
            "creating vhost {name}: {} {}",
            created.status,
            created.text()
        );
        let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
        let path = format!("/api/permissions/{name}/{}", self.credentials.user);
        let granted = self
            .management(Method::PUT, &path, Some(&permissions))
            .await;
        assert!(
            granted.status.is_success(),
            "granting {path}: {} {}",
            granted.status,
            granted.text()
        );
        Vhost {
            url: format!("{}/{name}", self.amqp_base),
            name,
            management_url: self.management_url.clone(),
            credentials: self.credentials.clone(),
        }
    }

    /// `http://127.0.0.1:PORT`, the management API (credentials: [`credentials`](Self::credentials)).
    pub fn management_url(&self) -> &str {
        &self.management_url
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// One management API call, e.g. `management(Method::GET, "/api/overview", None)`.
    /// Panics (with the node's log) when the API does not answer.
    pub async fn management(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Response {
        let url = format!("{}{path}", self.management_url);
        match http::request(
            method,
            &url,
            Some(&self.credentials),
            json,
            MANAGEMENT_TIMEOUT,
        )
        .await
        {
            Ok(response) => response,
            Err(err) => panic!("RabbitMQ management API: {err}\n{}", self.logs()),
        }
    }

    /// The local node's logs (last lines), empty for an external broker.
    pub fn logs(&self) -> String {
        self.node_dir.as_deref().map_or_else(String::new, node_logs)
    }
}

impl Vhost {
    /// An AMQP connection to this vhost and a channel on it, with publisher
    /// confirms when `confirms` (each step bounded by 10 s).
    pub async fn channel(&self, confirms: bool) -> (lapin::Connection, lapin::Channel) {
        let step = Duration::from_secs(10);
        let props = lapin::ConnectionProperties::default();
        let conn = super::within(
            step,
            "AMQP connect",
            lapin::Connection::connect(self.url(), props),
        )
        .await
        .expect("connect to RabbitMQ");
        let channel = super::within(step, "channel", conn.create_channel())
            .await
            .expect("channel");
        if confirms {
            let options = lapin::options::ConfirmSelectOptions::default();
            super::within(step, "confirms", channel.confirm_select(options))
                .await
                .expect("confirms");
        }
        (conn, channel)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://user:password@127.0.0.1:PORT/<vhost>` for lapin or `ebb`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The management API's view of a queue (`GET /api/queues/<vhost>/<queue>`),
    /// `None` if it does not exist. Counters such as `messages`,
    /// `messages_ready` and `messages_unacknowledged` are missing for the
    /// first ~5 s of a new queue and then lag by ~1–1.5 s (statistics
    /// interval 500 ms on a local node). For an exact, immediate count use
    /// a passive `queue_declare` over AMQP (`message_count` = ready messages).
    pub async fn queue_info(&self, queue: &str) -> Option<serde_json::Value> {
        let url = format!("{}/api/queues/{}/{queue}", self.management_url, self.name);
        let response = http::request(
            Method::GET,
            &url,
            Some(&self.credentials),
            None,
            MANAGEMENT_TIMEOUT,
        )
        .await
        .unwrap_or_else(|err| panic!("RabbitMQ management API: {err}"));
        match response.status.as_u16() {
            200 => Some(response.json()),
            404 => None,
            _ => panic!("GET {url}: {} {}", response.status, response.text()),
        }
    }

    /// Closes, from the broker's side, every connection of this vhost named
    /// `connection_name` (as a node restart or an operator would); waits
    /// until the management API lists one (it does a few seconds after it
    /// opened).
    pub async fn close_connections(&self, connection_name: &str) {
        let rabbit = RabbitMq::shared().await;
        let path = format!("/api/vhosts/{}/connections", self.name);
        let deadline = Instant::now() + Duration::from_secs(60);
        let names = loop {
            let list = rabbit.management(Method::GET, &path, None).await.json();
            let names: Vec<String> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["client_properties"]["connection_name"] == connection_name)
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect();
            if !names.is_empty() {
                break names;
            }
            assert!(
                Instant::now() < deadline,
                "no connection named {connection_name} in {list}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for name in names {
            let encoded =
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC);
            let closed = rabbit
                .management(Method::DELETE, &format!("/api/connections/{encoded}"), None)
                .await;
            assert!(
                closed.status.is_success(),
                "close {name}: {}",
                closed.status
            );
        }
    }

    /// `messages` (ready + unacknowledged) of a queue per the management API,
    /// `None` while the queue or its first statistics are missing.
    pub async fn queue_messages(&self, queue: &str) -> Option<u64> {
        self.queue_info(queue).await?.get("messages")?.as_u64()
    }
}

/// `EBB_TEST_AMQP_URL` + `EBB_TEST_RABBITMQ_MANAGEMENT_URL`, if set.
fn external_from_env() -> Option<Result<RabbitMq, String>> {
    let amqp = std::env::var("EBB_TEST_AMQP_URL")
        .ok()
        .filter(|s| !s.is_empty())?;
    let Some(management) = std::env::var("EBB_TEST_RABBITMQ_MANAGEMENT_URL")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        return Some(Err(
            "EBB_TEST_AMQP_URL is set but EBB_TEST_RABBITMQ_MANAGEMENT_URL is not: \
             tests create a vhost each through the management API"
                .to_owned(),
        ));
    };
    let (management_url, credentials) = split_credentials(&management);
    Some(Ok(RabbitMq {
        amqp_base: without_path(&amqp).to_owned(),
        management_url: without_path(&management_url).to_owned(),
        credentials: credentials.unwrap_or_else(guest),
        node_dir: None,
    }))
}

fn guest() -> Credentials {
    Credentials {
        user: "guest".to_owned(),
        password: "guest".to_owned(),
    }
}

/// `scheme://authority` of a URL.
fn without_path(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// `http://user:pw@host` → (`http://host`, credentials).
fn split_credentials(url: &str) -> (String, Option<Credentials>) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), None);
    };
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |i| scheme_end + i);
    let Some(at) = url[scheme_end..authority_end]
        .rfind('@')
        .map(|i| scheme_end + i)
    else {
        return (url.to_owned(), None);
    };
    let (user, password) = url[scheme_end..at]
        .split_once(':')
        .unwrap_or((&url[scheme_end..at], ""));
    let stripped = format!("{}{}", &url[..scheme_end], &url[at + 1..]);
    (
        stripped,
        Some(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        }),
    )
}

/// Ports and paths of a ready node, as written to `state`.
struct NodeState {
    watchdog: u32,
    amqp_port: u16,
    management_port: u16,
    node_dir: PathBuf,
}

impl NodeState {
    fn render(&self) -> String {
        format!(
            "watchdog={}\namqp_port={}\nmanagement_port={}\nnode_dir={}\n",
            self.watchdog,
            self.amqp_port,
            self.management_port,
            self.node_dir.display()
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        };
        Some(Self {
            watchdog: field("watchdog")?.parse().ok()?,
            amqp_port: field("amqp_port")?.parse().ok()?,
            management_port: field("management_port")?.parse().ok()?,
            node_dir: PathBuf::from(field("node_dir")?),
        })
    }

    fn into_rabbit(self) -> RabbitMq {
        RabbitMq {
            amqp_base: format!("amqp://guest:guest@127.0.0.1:{}", self.amqp_port),
            management_url: format!("http://127.0.0.1:{}", self.management_port),
            credentials: guest(),
            node_dir: Some(self.node_dir),
        }
    }
}

/// Takes a lease on the run's node, starting the node when there is none.
async fn start_or_attach() -> Result<RabbitMq, String> {
    let (key, grace) = match std::env::var("NEXTEST_RUN_ID") {
        Ok(run) if !run.is_empty() => (format!("run-{run}"), SHARED_GRACE_SECS),
        _ => (format!("pid-{}", std::process::id()), 0),
    };
    let key_dir = std::env::temp_dir().join("ebb-test-rabbitmq").join(key);
    // Panics when a binary is missing, before touching the directory.
    let binaries = Binaries::find();
    let lock = lock_key_dir(&key_dir).await?;

    let lease = key_dir.join("leases").join(std::process::id().to_string());
    fs::write(&lease, b"").map_err(|err| format!("writing {}: {err}", lease.display()))?;

    let state_path = key_dir.join("state");
    if let Some(state) = fs::read_to_string(&state_path)
        .ok()
        .and_then(|text| NodeState::parse(&text))
        .filter(|state| alive(state.watchdog))
    {
        drop(lock);
        return Ok(state.into_rabbit());
    }

    let mut failures = String::new();
    for attempt in 1..=3 {
        match start_node(&key_dir, grace, &binaries).await {
            Ok(state) => {
                fs::write(&state_path, state.render())
                    .map_err(|err| format!("writing {}: {err}", state_path.display()))?;
                drop(lock);
                return Ok(state.into_rabbit());
            }
            Err(failure) => {
                let _ = writeln!(failures, "attempt {attempt}: {}", failure.message);
                if !failure.port_conflict {
                    break;
                }
            }
        }
    }
    // Leave no trace of this process; the last one out removes the directory
    // (still holding the lock, so a waiting process sees it was unlinked).
    let _ = fs::remove_file(&lease);
    let others = fs::read_dir(key_dir.join("leases"))
        .map(|dir| {
            dir.flatten().any(|lease| {
                lease
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse().ok())
                    .is_some_and(alive)
            })
        })
        .unwrap_or(true);
    let nodes = fs::read_dir(&key_dir)
        .map(|dir| {
            dir.flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with("node-"))
        })
        .unwrap_or(true);
    if !others && !nodes && !state_path.exists() {
        let _ = fs::remove_dir_all(&key_dir);
    }
    drop(lock);
    Err(format!("could not start a RabbitMQ node:\n{failures}"))
}

/// Creates `key_dir` and locks `key_dir/lock`, retrying when a watchdog
/// deleted the directory in between (the locked file is then unlinked).
async fn lock_key_dir(key_dir: &Path) -> Result<File, String> {
    // A starter holds the lock until its node is ready (up to 3 attempts).
    let deadline = Instant::now() + READY_LIMIT * 3 + Duration::from_secs(30);
    let lock_path = key_dir.join("lock");
    loop {
        fs::create_dir_all(key_dir.join("leases"))
            .map_err(|err| format!("creating {}: {err}", key_dir.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|err| format!("opening {}: {err}", lock_path.display()))?;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(format!("locking {}: {err}", lock_path.display())),
            }
        }
        let same_file = match (fs::metadata(&lock_path), file.metadata()) {
            (Ok(on_disk), Ok(locked)) => {
                on_disk.ino() == locked.ino() && on_disk.dev() == locked.dev()
            }
            _ => false,
        };
        if same_file {
            return Ok(file);
        }
    }
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

struct Binaries {
    server: PathBuf,
    epmd: PathBuf,
}

impl Binaries {
    fn find() -> Self {
        // Not /usr/sbin/rabbitmq-server: Debian's wrapper switches to the
        // `rabbitmq` user and the system node's directories.
        let server = find_executable(
            "EBB_RABBITMQ_SERVER",
            &[PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")],
            "rabbitmq-server",
        );
        let epmd = find_executable(
            "EBB_EPMD",
            &[PathBuf::from("/usr/lib/erlang/bin/epmd")],
            "epmd",
        );
        Self { server, epmd }
    }
}

struct StartFailure {
    message: String,
    /// Another process took one of the ports first: worth another attempt.
    port_conflict: bool,
}

/// Starts epmd, the broker and their watchdog; waits until the node is ready.
async fn start_node(key_dir: &Path, grace: u32, bin: &Binaries) -> Result<NodeState, StartFailure> {
    let started = Instant::now();
    let node_dir = key_dir.join(format!(
        "node-{}-{:x}",
        std::process::id(),
        random_u64() as u32
    ));
    let fail = |message: String| StartFailure {
        message,
        port_conflict: false,
    };
    for sub in ["home", "mnesia", "log"] {
        fs::create_dir_all(node_dir.join(sub))
            .map_err(|err| fail(format!("creating {}: {err}", node_dir.display())))?;
    }
    let (amqp_port, management_port, dist_port, epmd_port) =
        (free_port(), free_port(), free_port(), free_port());
    let config = format!(
        "listeners.tcp.1 = 127.0.0.1:{amqp_port}\n\
         management.tcp.ip = 127.0.0.1\n\
         management.tcp.port = {management_port}\n\
         loopback_users = none\n\
         disk_free_limit.absolute = 1MB\n\
         collect_statistics_interval = 500\n"
    );
    let files = [
        ("rabbitmq.conf", config.as_str()),
        ("enabled_plugins", "[rabbitmq_management].\n"),
        // Instead of /etc/rabbitmq/rabbitmq-env.conf.
        ("rabbitmq-env.conf", ""),
        // sh has read it by the time the watchdog deletes the node dir.
        ("rabbitmq-watchdog.sh", WATCHDOG),
    ];
    for (name, content) in files {
        fs::write(node_dir.join(name), content)
            .map_err(|err| fail(format!("writing {name}: {err}")))?;
    }

    let mut epmd = Command::new(&bin.epmd);
    epmd.args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"]);
    let mut epmd = spawn_detached(&mut epmd, &node_dir, "epmd.log").map_err(fail)?;
    // The VM would start an epmd daemon of its own if ours is not up yet.
    if let Err(err) = wait_for_port(epmd_port, &mut epmd, Duration::from_secs(10)).await {
        let _ = epmd.kill();
        let _ = epmd.wait();
        return Err(StartFailure {
            message: format!("epmd: {err}\n{}", tail_file(&node_dir.join("epmd.log"), 20)),
            port_conflict: true,
        });
    }

    let nodename = format!(
        "ebb-test-{}-{:x}@localhost",
        std::process::id(),
        random_u64() as u16
    );
    let mut server = Command::new(&bin.server);
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("RABBITMQ_") || key_str.starts_with("ERL_") {
            server.env_remove(&key);
        }
    }
    let dir = |sub: &str| node_dir.join(sub);
    server
        .current_dir(&node_dir) // erl_crash.dump lands here
        .env("HOME", dir("home")) // the Erlang cookie
        .env("RABBITMQ_CONF_ENV_FILE", dir("rabbitmq-env.conf"))
        .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
        .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir("log"))
        .env("RABBITMQ_LOGS", dir("log/rabbit.log"))
        .env("RABBITMQ_NODENAME", &nodename)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        // `exec` the VM instead of keeping a shell around it: the spawned pid
        // is the broker itself. -noinput because that mode drops it.
        .env("RABBITMQ_ALLOW_INPUT", "1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-noinput -start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
        );
    let mut server = match spawn_detached(&mut server, &node_dir, "server.log") {
        Ok(server) => server,
        Err(err) => {
            let _ = epmd.kill();
            let _ = epmd.wait();
            return Err(fail(err));
        }
    };

    let mut watchdog = Command::new("sh");
    watchdog
        .arg(node_dir.join("rabbitmq-watchdog.sh"))
        .arg(key_dir)
        .arg(&node_dir)
        .arg(grace.to_string())
        .arg(epmd.id().to_string())
        .arg(server.id().to_string());
    let watchdog = match spawn_detached(&mut watchdog, &node_dir, "watchdog.log") {
        Ok(watchdog) => watchdog,
        Err(err) => {
            for child in [&mut server, &mut epmd] {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(fail(err));
        }
    };

    let state = NodeState {
        watchdog: watchdog.id(),
        amqp_port,
        management_port,
        node_dir,
    };
    match wait_ready(&state, &mut server).await {
        Ok(()) => {
            eprintln!(
                "RabbitMQ node {nodename} ready in {:.1?} (amqp 127.0.0.1:{amqp_port}, \
                 management 127.0.0.1:{management_port}, dir {})",
                started.elapsed(),
                state.node_dir.display()
            );
            // The watchdog owns the processes from here on; they outlive this
            // test process when other test processes of the run use them.
            Ok(state)
        }
        Err(err) => {
            let logs = node_logs(&state.node_dir);
            let port_conflict = logs.contains("eaddrinuse");
            // The watchdog kills the broker and epmd and deletes the node dir.
            let mut watchdog = watchdog;
            let _ = kill(pid(watchdog.id()), Signal::SIGTERM);
            let _ = wait_exit(&mut watchdog, Duration::from_secs(5)).await;
            Err(StartFailure {
                message: format!("{err} after {:.1?}\n{logs}", started.elapsed()),
                port_conflict,
            })
        }
    }
}

/// Spawns in a new process group, stdio to `node_dir/log_name`.
fn spawn_detached(cmd: &mut Command, node_dir: &Path, log_name: &str) -> Result<Child, String> {
    let log_path = node_dir.join(log_name);
    let log =
        File::create(&log_path).map_err(|err| format!("creating {}: {err}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|err| format!("dup {}: {err}", log_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Not the test's process group: neither Ctrl-C nor nextest's kill of
        // one test process may take down a node other tests use.
        .process_group(0)
        .spawn()
        .map_err(|err| format!("cannot run {:?}: {err}", cmd.get_program()))
}

/// Waits for a child to exit; false if it is still running after `limit`.
async fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn wait_for_port(port: u16, child: &mut Child, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status})"));
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("127.0.0.1:{port} not listening within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ready = management API answers `/api/overview` and the AMQP port accepts.
async fn wait_ready(state: &NodeState, server: &mut Child) -> Result<(), String> {
    let overview = format!("http://127.0.0.1:{}/api/overview", state.management_port);
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!("rabbitmq-server exited during startup ({status})"));
        }
        let answer = http::request(
            Method::GET,
            &overview,
            Some(&guest()),
            None,
            Duration::from_secs(2),
        )
        .await;
        if answer.is_ok_and(|r| r.status.is_success())
            && tokio::net::TcpStream::connect(("127.0.0.1", state.amqp_port))
                .await
                .is_ok()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "RabbitMQ was not ready within {READY_LIMIT:?} ({overview})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_logs(node_dir: &Path) -> String {
    ["server.log", "log/rabbit.log", "epmd.log", "watchdog.log"]
        .iter()
        .map(|name| tail_file(&node_dir.join(name), 60))
        .collect::<Vec<_>>()
        .join("\n")
}
