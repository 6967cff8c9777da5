//! The local scale target: each function with a `command` runs as `ebb
//! worker` child processes on free loopback ports, like a Deployment's pods,
//! and the engine picks among the ready ones, like a Service. The
//! autoscaler's poll scales them through [`ScaleTarget`].

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ebb_autoscaler::target::{Applied, Applying, Change, ReplicaCounts, ScaleTarget};
use ebb_connectors::engine::{Endpoints, Resolve};
use ebb_connectors::limit::Limit;
use ebb_model::FunctionSpec;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::console::Console;

/// How often a starting replica is asked whether it is ready.
const PROBE_EVERY: Duration = Duration::from_millis(2);
/// How long a replica may take to become ready before it is replaced.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The ready replicas of one function, picked round-robin, and the bound on
/// its concurrent deliveries (max-inflight × ready replicas, at least 1).
pub struct FnEndpoints {
    ready: RwLock<Vec<(u64, http::Uri)>>,
    next: AtomicUsize,
    changed: Notify,
    limit: Arc<Limit>,
    max_inflight: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

impl FnEndpoints {
    fn new(max_inflight: usize) -> Self {
        Self {
            ready: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            changed: Notify::new(),
            limit: Limit::new(max_inflight.max(1)),
            max_inflight: AtomicUsize::new(max_inflight.max(1)),
            last_error: Mutex::new(None),
        }
    }

    fn add(&self, id: u64, uri: http::Uri) {
        if let Ok(mut r) = self.ready.write() {
            r.push((id, uri));
        }
        self.resize();
        self.changed.notify_waiters();
    }

    fn remove(&self, id: u64) {
        if let Ok(mut r) = self.ready.write() {
            r.retain(|(i, _)| *i != id);
        }
        self.resize();
    }

    fn resize(&self) {
        let per = self.max_inflight.load(Ordering::Relaxed);
        self.limit.set_max(per * self.ready_count().max(1));
    }

    fn set_max_inflight(&self, n: usize) {
        self.max_inflight.store(n.max(1), Ordering::Relaxed);
        self.resize();
    }

    /// Replicas ready now.
    pub fn ready_count(&self) -> usize {
        self.ready.read().map(|r| r.len()).unwrap_or(0)
    }

    /// Concurrent deliveries allowed to this function.
    pub fn limit(&self) -> &Arc<Limit> {
        &self.limit
    }

    /// The last failed call's reason.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

impl Endpoints for FnEndpoints {
    fn pick(&self) -> Option<http::Uri> {
        let r = self.ready.read().ok()?;
        if r.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % r.len();
        Some(r[i].1.clone())
    }

    fn failed(&self, reason: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(reason.to_string());
        }
    }

    fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.ready_count() > 0 {
                return;
            }
            changed.await;
        })
    }
}

/// One running replica as its set sees it.
struct Replica {
    pid: u32,
    stop: CancellationToken,
    exited: Arc<AtomicBool>,
    /// Exited without being told to stop.
    crashed: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
}

/// The replicas of one function, kept at `desired` like a Deployment's
/// ReplicaSet: a replica that dies is replaced, after a back-off that grows
/// while replicas keep dying before they are ready.
struct ReplicaSet {
    spec: Arc<FunctionSpec>,
    desired: u32,
    replicas: Vec<Replica>,
    /// Replicas that died since one was last ready.
    crashes: u32,
    /// No replacement before this.
    retry_at: Option<tokio::time::Instant>,
}

impl ReplicaSet {
    fn new(spec: &Arc<FunctionSpec>, desired: u32) -> Self {
        Self {
            spec: spec.clone(),
            desired,
            replicas: Vec::new(),
            crashes: 0,
            retry_at: None,
        }
    }
}

/// How long to wait before replacing a replica after `crashes` deaths in a
/// row: 1 s, doubling, at most 30 s (Kubernetes' CrashLoopBackOff, shorter).
pub fn crash_backoff(crashes: u32) -> Duration {
    if crashes == 0 {
        return Duration::ZERO;
    }
    let secs = 1u64 << (crashes - 1).min(5);
    Duration::from_secs(secs.min(30))
}

/// Every function's replicas; also the engine's [`Resolve`]r.
pub struct Replicas {
    exe: PathBuf,
    dir: PathBuf,
    console: Arc<Console>,
    sets: tokio::sync::Mutex<HashMap<String, ReplicaSet>>,
    endpoints: Mutex<HashMap<String, Arc<FnEndpoints>>>,
    ids: AtomicU64,
    tracker: TaskTracker,
    probe: reqwest::Client,
    /// Replica processes started since ebb dev started.
    pub started: AtomicU64,
}

impl Replicas {
    /// `exe` is the `ebb` binary; commands run in `dir` (the stack file's).
    pub fn new(exe: PathBuf, dir: PathBuf, console: Arc<Console>) -> Self {
        Self {
            exe,
            dir,
            console,
            sets: tokio::sync::Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
            tracker: TaskTracker::new(),
            probe: reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .no_proxy()
                .build()
                .unwrap_or_default(),
            started: AtomicU64::new(0),
        }
    }

    /// The endpoints of function `name` (created on first use).
    pub fn endpoints_of(&self, name: &str, max_inflight: u32) -> Arc<FnEndpoints> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(FnEndpoints::new(max_inflight as usize)))
            .clone()
    }

    /// The scale of `name`: replicas asked for (running, starting, or
    /// waiting to replace one that died).
    pub async fn count(&self, name: &str) -> u32 {
        self.sets
            .lock()
            .await
            .get(name)
            .map_or(0, |set| set.desired)
    }

    /// Process ids of `name`'s replicas.
    pub async fn pids(&self, name: &str) -> Vec<u32> {
        let sets = self.sets.lock().await;
        sets.get(name).map_or_else(Vec::new, |set| {
            set.replicas
                .iter()
                .filter(|r| !r.exited.load(Ordering::SeqCst))
                .map(|r| r.pid)
                .collect()
        })
    }

    /// Scales `spec` to `n` replicas: starts new ones or stops the newest.
    pub async fn scale(&self, spec: &Arc<FunctionSpec>, n: u32) {
        let mut sets = self.sets.lock().await;
        let set = sets
            .entry(spec.name.clone())
            .or_insert_with(|| ReplicaSet::new(spec, 0));
        set.desired = n;
        self.reconcile(set);
    }

    /// The scale of `spec`, starting it at `min-replicas` when it has none
    /// yet, as the Deployment `ebb deploy` renders for it starts: a function
    /// that no input scales (no topic, Prometheus input or schedule) keeps
    /// that count.
    pub async fn create(&self, spec: &Arc<FunctionSpec>) -> u32 {
        let mut sets = self.sets.lock().await;
        if let Some(set) = sets.get(&spec.name) {
            return set.desired;
        }
        let set = sets
            .entry(spec.name.clone())
            .or_insert_with(|| ReplicaSet::new(spec, spec.min_replicas));
        self.reconcile(set);
        set.desired
    }

    /// Replaces replicas that died (once their back-off has passed), for
    /// every function.
    pub async fn reconcile_all(&self) {
        let mut sets = self.sets.lock().await;
        for set in sets.values_mut() {
            self.reconcile(set);
        }
    }

    fn reconcile(&self, set: &mut ReplicaSet) {
        let now = tokio::time::Instant::now();
        let mut died = 0;
        set.replicas.retain(|r| {
            let gone = r.exited.load(Ordering::SeqCst);
            if gone && r.crashed.load(Ordering::SeqCst) {
                died += 1;
            }
            !gone
        });
        if set.replicas.iter().any(|r| r.ready.load(Ordering::SeqCst)) {
            set.crashes = 0;
        }
        if died > 0 {
            set.crashes += died;
            let wait = crash_backoff(set.crashes);
            set.retry_at = Some(now + wait);
            tracing::warn!(function = %set.spec.name, crashes = set.crashes, ?wait, "replacing a replica that died");
        }
        let n = set.desired as usize;
        while set.replicas.len() > n {
            if let Some(r) = set.replicas.pop() {
                r.stop.cancel();
            }
        }
        if set.replicas.len() < n && set.retry_at.is_some_and(|t| now < t) {
            return; // backing off
        }
        while set.replicas.len() < n {
            match self.start(&set.spec) {
                Ok(r) => set.replicas.push(r),
                Err(e) => {
                    tracing::error!(function = %set.spec.name, error = %e, "cannot start a replica");
                    if let Some(ep) = self
                        .endpoints
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&set.spec.name).cloned())
                    {
                        ep.failed(&e);
                    }
                    set.crashes += 1;
                    set.retry_at = Some(now + crash_backoff(set.crashes));
                    break;
                }
            }
        }
    }

    /// 0 → `to` at once (a wake-up); a function already scaled up is left
    /// alone. True when replicas were asked for.
    pub async fn wake(&self, spec: &Arc<FunctionSpec>, to: u32) -> bool {
        if self.count(&spec.name).await > 0 {
            return false;
        }
        self.scale(spec, to).await;
        true
    }

    /// Takes a changed function: replicas of an old command (or bounds) are
    /// replaced by as many of the new one.
    pub async fn update(&self, spec: &Arc<FunctionSpec>) {
        self.endpoints_of(&spec.name, spec.max_inflight)
            .set_max_inflight(spec.max_inflight as usize);
        let mut sets = self.sets.lock().await;
        let Some(set) = sets.get_mut(&spec.name) else {
            return;
        };
        let old = &set.spec;
        let restart = old.command != spec.command
            || old.max_inflight != spec.max_inflight
            || old.timeout != spec.timeout;
        set.spec = spec.clone();
        if !restart {
            return;
        }
        tracing::info!(function = %spec.name, replicas = set.desired, "function changed; replacing its replicas");
        for r in set.replicas.drain(..) {
            r.stop.cancel();
        }
        // A new command deserves a fresh start.
        set.crashes = 0;
        set.retry_at = None;
        self.reconcile(set);
    }

    /// Stops every replica of `name` and forgets the function.
    pub async fn remove(&self, name: &str) {
        if let Some(set) = self.sets.lock().await.remove(name) {
            for r in set.replicas {
                r.stop.cancel();
            }
        }
    }

    /// Stops every replica (drain, then kill) and waits for them.
    pub async fn shutdown(&self) {
        let mut sets = self.sets.lock().await;
        for (_, set) in sets.drain() {
            for r in set.replicas {
                r.stop.cancel();
            }
        }
        drop(sets);
        self.tracker.close();
        self.tracker.wait().await;
    }

    fn start(&self, spec: &Arc<FunctionSpec>) -> Result<Replica, String> {
        let port = free_port().map_err(|e| format!("no free loopback port: {e}"))?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let addr = format!("127.0.0.1:{port}");
        let drain = spec.timeout + Duration::from_secs(1);
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("worker")
            .arg("--listen")
            .arg(&addr)
            .arg("--max-inflight")
            .arg(spec.max_inflight.max(1).to_string())
            .arg("--timeout")
            .arg(format!("{}ms", spec.timeout.as_millis().max(1)))
            .arg("--drain-timeout")
            .arg(format!("{}ms", drain.as_millis()))
            .arg("--")
            .args(&spec.command)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C reaches ebb dev only, which
            // drains the replica and then kills the whole group.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let pid = child.id().ok_or("the replica exited at once")?;
        self.started.fetch_add(1, Ordering::Relaxed);
        let label = format!("{}[{id}]", spec.name);
        if let Some(out) = child.stdout.take() {
            self.tracker
                .spawn(relay(out, label.clone(), self.console.clone()));
        }
        if let Some(err) = child.stderr.take() {
            self.tracker
                .spawn(relay(err, label.clone(), self.console.clone()));
        }
        let stop = CancellationToken::new();
        let exited = Arc::new(AtomicBool::new(false));
        let crashed = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let endpoints = self.endpoints_of(&spec.name, spec.max_inflight);
        tracing::info!(function = %spec.name, replica = id, %addr, pid, "starting replica");
        self.tracker.spawn(supervise(Supervised {
            child,
            pid,
            id,
            label,
            uri: format!("http://{addr}/"),
            probe: self.probe.clone(),
            endpoints,
            stop: stop.clone(),
            exited: exited.clone(),
            crashed: crashed.clone(),
            ready: ready.clone(),
            drain,
        }));
        Ok(Replica {
            pid,
            stop,
            exited,
            crashed,
            ready,
        })
    }
}

impl Resolve for Replicas {
    fn endpoints(&self, spec: &FunctionSpec) -> Option<Arc<dyn Endpoints>> {
        if spec.command.is_empty() {
            return None; // an external function: call its url
        }
        Some(self.endpoints_of(&spec.name, spec.max_inflight))
    }
}

/// The scale target of `ebb dev`'s poll: a function with a `command` is
/// scaled by starting and stopping its replicas; an external one is not.
impl ScaleTarget for Replicas {
    type Workload = ();
    type Error = std::convert::Infallible;

    async fn workload(&self, f: &Arc<FunctionSpec>) -> Option<((), ReplicaCounts)> {
        if f.command.is_empty() {
            return None;
        }
        let current = self.create(f).await;
        let ready = self.endpoints_of(&f.name, f.max_inflight).ready_count();
        let ready = Some(u32::try_from(ready).unwrap_or(u32::MAX));
        Some(((), ReplicaCounts { current, ready }))
    }

    async fn reread(&self, f: &Arc<FunctionSpec>, _: &()) -> Option<((), ReplicaCounts)> {
        self.workload(f).await
    }

    async fn apply(&self, f: &Arc<FunctionSpec>, _: &(), change: Change<'_>) -> Applying<Self> {
        let (from, to) = (change.from, change.to);
        tracing::info!(function = %f.name, from, to, reason = %change.reason, "scaling");
        self.scale(f, to).await;
        Ok(Applied::Done)
    }
}

struct Supervised {
    child: tokio::process::Child,
    pid: u32,
    id: u64,
    label: String,
    uri: String,
    probe: reqwest::Client,
    endpoints: Arc<FnEndpoints>,
    stop: CancellationToken,
    exited: Arc<AtomicBool>,
    crashed: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    drain: Duration,
}

impl Supervised {
    /// The replica's process exited on its own: marks it crashed, reports
    /// `what` with the exit status and kills its process group.
    fn died(&self, status: std::io::Result<std::process::ExitStatus>, what: &str) {
        self.crashed.store(true, Ordering::SeqCst);
        self.exited.store(true, Ordering::SeqCst);
        let reason = describe(status);
        tracing::warn!(replica = %self.label, %reason, "{what}");
        self.endpoints.failed(&format!("{what}: {reason}"));
        kill_group(self.pid);
    }
}

/// Runs one replica: waits until it is ready, serves it to the engine, and
/// on stop drains it (SIGTERM) and then kills its process group.
async fn supervise(mut s: Supervised) {
    let ready_url = format!("{}_/ready", s.uri);
    let started = tokio::time::Instant::now();
    let mut ready = false;
    loop {
        tokio::select! {
            status = s.child.wait() => {
                s.died(status, "replica exited before it was ready");
                return;
            }
            () = s.stop.cancelled() => break,
            () = tokio::time::sleep(PROBE_EVERY) => {
                if matches!(s.probe.get(&ready_url).send().await, Ok(r) if r.status().is_success()) {
                    ready = true;
                    break;
                }
                if started.elapsed() > STARTUP_TIMEOUT {
                    tracing::warn!(replica = %s.label, timeout = ?STARTUP_TIMEOUT, "replica not ready in time; stopping it");
                    break;
                }
            }
        }
    }
    if ready {
        let uri = s.uri.parse().ok();
        if let Some(uri) = uri {
            tracing::info!(replica = %s.label, after = ?started.elapsed(), "replica ready");
            s.ready.store(true, Ordering::SeqCst);
            s.endpoints.add(s.id, uri);
        }
        tokio::select! {
            status = s.child.wait() => {
                s.endpoints.remove(s.id);
                s.died(status, "replica exited");
                return;
            }
            () = s.stop.cancelled() => {}
        }
    }
    // Stop: no new calls, let the running ones finish, then make sure.
    s.endpoints.remove(s.id);
    s.exited.store(true, Ordering::SeqCst);
    let _ = kill(pid_of(s.pid), Signal::SIGTERM);
    match tokio::time::timeout(s.drain, s.child.wait()).await {
        Ok(_) => tracing::info!(replica = %s.label, "replica stopped"),
        Err(_) => {
            tracing::warn!(replica = %s.label, drain = ?s.drain, "replica still running after its drain time; killing it");
        }
    }
    kill_group(s.pid);
    let _ = s.child.wait().await;
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// SIGKILL to the replica's process group (its handler processes too).
fn kill_group(pid: u32) {
    let _ = killpg(pid_of(pid), Signal::SIGKILL);
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Copies a replica's output to the console, line by line, with its name.
async fn relay(out: impl tokio::io::AsyncRead + Unpin, label: String, console: Arc<Console>) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        console.line(&format!("{label} | {line}"));
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_backoff_doubles_from_one_second_up_to_thirty() {
        let secs: Vec<u64> = (0..9).map(|n| crash_backoff(n).as_secs()).collect();
        assert_eq!(secs, [0, 1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[tokio::test]
    async fn endpoints_round_robin_and_bound_deliveries_by_ready_replicas() {
        let e = FnEndpoints::new(4);
        assert_eq!(e.pick(), None);
        assert_eq!(e.limit().available(), 4, "at least one replica's worth");
        e.add(1, "http://127.0.0.1:1/".parse().unwrap());
        e.add(2, "http://127.0.0.1:2/".parse().unwrap());
        assert_eq!(e.limit().available(), 8);
        let picks: Vec<_> = (0..4).map(|_| e.pick().unwrap().port_u16()).collect();
        assert_eq!(picks.iter().filter(|p| **p == Some(1)).count(), 2);
        assert_eq!(picks.iter().filter(|p| **p == Some(2)).count(), 2);
        e.remove(1);
        assert_eq!(e.pick().unwrap().port_u16(), Some(2));
        assert_eq!(e.limit().available(), 4);
    }

    #[tokio::test]
    async fn ready_resolves_when_a_replica_becomes_ready() {
        let e = Arc::new(FnEndpoints::new(1));
        let waiter = {
            let e = e.clone();
            tokio::spawn(async move { e.ready().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        e.add(7, "http://127.0.0.1:7/".parse().unwrap());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // Already ready: at once.
        tokio::time::timeout(Duration::from_secs(5), e.ready())
            .await
            .unwrap();
    }
}
