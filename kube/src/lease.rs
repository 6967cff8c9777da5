//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go's
//! `leaderelection` package does it, plus a little state kept on the Lease.
//!
//! Every candidate runs an [`Elector`] on the same Lease. One holds it and
//! renews it every `retry_period`; the others read it every `retry_period`
//! and take it over once it has not changed for `leaseDurationSeconds`.
//!
//! - **Safety.** Every write is a replace guarded by the `resourceVersion`
//!   last read, so of two candidates writing at once one gets 409 and only
//!   one wins. Expiry is measured on the reader's monotonic clock from the
//!   moment it *saw* the current record (as client-go does), never by
//!   comparing `renewTime` with the local wall clock, so clock skew between
//!   nodes cannot make two leaders. A leader that cannot renew steps down
//!   `renew_deadline` after the start of its last successful renewal, which is
//!   before any follower can take over (`lease_duration` > `renew_deadline`).
//! - **Release.** On shutdown the leader writes `holderIdentity: ""`,
//!   `leaseDurationSeconds: 1`, so a follower takes over at its next read.
//!   A crashed leader is replaced within about `lease_duration +
//!   retry_period`.
//! - **State on the Lease.** The leader keeps small key → value annotations
//!   on the Lease ([`LeaderHandle::set_annotation`], e.g. the last fired
//!   tick of each cron function). They are coalesced and written with the
//!   renewals, at most once per `annotation_interval` (1 s), and on release;
//!   the next leader finds them in [`LeaderState::annotations`] right after
//!   acquiring. Changes not yet written when leadership is lost are dropped.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use ebb_kube::lease::{Elector, LeaseConfig};
//! let client = ebb_kube::client().await?;
//! let config = LeaseConfig::new("ebb", "ebb-connector-cron", LeaseConfig::default_identity());
//! let elector = Elector::new(client, config)?;
//! let handle = elector.handle();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(elector.run(shutdown.clone()));
//!
//! let mut leader = handle.leader();
//! leader.wait_for(|is| *is).await?;
//! let previous = handle.state().borrow().annotations.clone(); // the last leader's
//! handle.set_annotation("ebb.io/last-fired.shop.report", "2026-11-25T10:00:00Z")?;
//! # Ok(()) }
//! ```
//!
//! Needs RBAC `get`, `create` and `update` on `leases` in the
//! `coordination.k8s.io` API group, in the Lease's namespace.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// client-go's defaults.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// At most one annotation write per this long.
pub const DEFAULT_ANNOTATION_INTERVAL: Duration = Duration::from_secs(1);

/// The API server's limit on all annotations of an object together (keys
/// and values, in bytes).
pub const MAX_ANNOTATIONS_SIZE: usize = 256 * 1024;

/// A flush due within this is done now rather than after another sleep
/// (timers may wake a millisecond early or late).
const FLUSH_SLACK: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// Configuration

/// Which Lease to contend for, as whom, and how fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process: two processes with one identity would both
    /// believe they lead. See [`LeaseConfig::default_identity`].
    pub identity: String,
    /// How long followers wait after the last change they saw before taking
    /// over (written, rounded up to whole seconds, as
    /// `leaseDurationSeconds`). Default 15 s.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long (measured
    /// from the start of its last successful renewal). Default 10 s; must be
    /// below `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the leader renews and followers read. Default 2 s; must be
    /// below `renew_deadline` / 1.2 (client-go's jitter factor).
    pub retry_period: Duration,
    /// At most one annotation write per this long. Default 1 s.
    pub annotation_interval: Duration,
}

impl LeaseConfig {
    /// A configuration with client-go's default durations.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
            annotation_interval: DEFAULT_ANNOTATION_INTERVAL,
        }
    }

    /// `POD_NAME`, else the host name (the pod name in Kubernetes), then
    /// `_{pid}_{random}`: unique even when a container restarts with the same
    /// host name and pid 1, or two processes share a host.
    pub fn default_identity() -> String {
        let host = std::env::var("POD_NAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(hostname)
            .unwrap_or_else(|| "ebb".to_owned());
        format!("{host}_{}_{:08x}", std::process::id(), random_u32())
    }

    /// Checks the durations and names (client-go's rules).
    pub fn validate(&self) -> Result<(), LeaseConfigError> {
        let fail = |what: String| Err(LeaseConfigError(what));
        if self.namespace.is_empty() || self.name.is_empty() {
            return fail("the Lease needs a namespace and a name".into());
        }
        if self.identity.is_empty() {
            return fail("the identity must not be empty".into());
        }
        if self.retry_period.is_zero() {
            return fail("retry_period must be above zero".into());
        }
        if self.renew_deadline <= self.retry_period.mul_f64(1.2) {
            return fail(format!(
                "renew_deadline ({:?}) must be above 1.2 × retry_period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return fail(format!(
                "lease_duration ({:?}) must be above renew_deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        Ok(())
    }

    /// `leaseDurationSeconds`: whole seconds, rounded up, at least 1.
    pub fn lease_duration_seconds(&self) -> i32 {
        let nanos = self.lease_duration.as_nanos();
        let seconds = nanos.div_ceil(1_000_000_000).max(1);
        i32::try_from(seconds).unwrap_or(i32::MAX)
    }
}

/// A [`LeaseConfig`] that [`LeaseConfig::validate`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid lease configuration: {0}")]
pub struct LeaseConfigError(String);

/// Why [`LeaderHandle::set_annotation`] refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// Only the leader writes; a change made while not leading is dropped.
    #[error("not the leader: only the leader writes annotations on the Lease")]
    NotLeader,
    /// Not a Kubernetes annotation key (`prefix/name`, name ≤ 63 of
    /// `[A-Za-z0-9_.-]`, starting and ending alphanumeric); build one with
    /// [`annotation_key`].
    #[error("invalid annotation key {0:?}")]
    InvalidKey(String),
    /// All annotations together would exceed [`MAX_ANNOTATIONS_SIZE`].
    #[error("the Lease's annotations would exceed {MAX_ANNOTATIONS_SIZE} bytes")]
    TooLarge,
}

/// Leadership as one candidate sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This candidate holds the Lease and renewed it within `renew_deadline`.
    pub is_leader: bool,
    /// The holder as last observed (`None`: nobody, or not read yet).
    pub holder: Option<String>,
    /// While leading: the Lease's annotations as found when this term began,
    /// i.e. as the previous leader left them. Empty when not leading.
    pub annotations: Arc<BTreeMap<String, String>>,
    /// `leaseTransitions` of the Lease when this term began.
    pub transitions: i32,
}

// ---------------------------------------------------------------------------
// The elector and its handle

/// One candidate for one Lease. Start it with [`Elector::run`]; watch it and
/// write annotations through [`Elector::handle`].
pub struct Elector {
    client: Client,
    config: LeaseConfig,
    shared: Arc<Shared>,
}

impl fmt::Debug for Elector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig) -> Result<Self, LeaseConfigError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            identity: config.identity.clone(),
            leader: watch::Sender::new(false),
            state: watch::Sender::new(LeaderState::default()),
            book: Mutex::new(Book::default()),
            wake: Notify::new(),
        });
        Ok(Self {
            client,
            config,
            shared,
        })
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// A cheap, cloneable handle: leadership and annotations.
    pub fn handle(&self) -> LeaderHandle {
        LeaderHandle {
            shared: self.shared.clone(),
        }
    }

    /// `true` while this candidate leads.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.shared.leader.subscribe()
    }

    /// Contends for the Lease until `shutdown`, then releases it if held.
    ///
    /// API errors are retried every `retry_period` and never end it. When the
    /// returned future is dropped (task aborted) leadership ends at once
    /// locally, without a release: others take over after the Lease expires.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut runner = Runner {
            api: Api::namespaced(self.client, &self.config.namespace),
            duration_seconds: self.config.lease_duration_seconds(),
            config: self.config,
            shared: self.shared,
            cached: None,
            observed: None,
            renewed: None,
            last_flush: None,
        };
        runner.run(shutdown).await;
    }
}

/// Leadership and annotations of one [`Elector`]; clones share it.
#[derive(Clone)]
pub struct LeaderHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LeaderHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderHandle")
            .field("identity", &self.shared.identity)
            .field("is_leader", &self.is_leader())
            .finish_non_exhaustive()
    }
}

impl LeaderHandle {
    pub fn identity(&self) -> &str {
        &self.shared.identity
    }

    pub fn is_leader(&self) -> bool {
        *self.shared.leader.borrow()
    }

    /// `true` while this candidate leads; start and stop leader-only work on
    /// its changes.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.shared.leader.subscribe()
    }

    /// The fuller picture: holder, and the annotations found on acquiring.
    pub fn state(&self) -> watch::Receiver<LeaderState> {
        self.shared.state.subscribe()
    }

    /// Sets an annotation on the Lease. Cheap (a mutex and a map insert):
    /// changes from any number of tasks are coalesced and written with the
    /// next renewal, at most once per `annotation_interval`.
    pub fn set_annotation(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), AnnotationError> {
        self.change(key.into(), Some(value.into()))
    }

    /// Removes an annotation from the Lease (batched like
    /// [`Self::set_annotation`]).
    pub fn remove_annotation(&self, key: impl Into<String>) -> Result<(), AnnotationError> {
        self.change(key.into(), None)
    }

    fn change(&self, key: String, value: Option<String>) -> Result<(), AnnotationError> {
        if !is_valid_annotation_key(&key) {
            return Err(AnnotationError::InvalidKey(key));
        }
        let first = self.shared.book().change(key, value)?;
        if first {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// The Lease's annotations as last read or written, with the changes not
    /// written yet applied.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.shared.book().effective()
    }

    /// How many keys wait for the next write.
    pub fn pending_annotations(&self) -> usize {
        self.shared.book().pending.len()
    }
}

/// The annotations of a Lease (empty when there is no such Lease), e.g. for
/// a process that does not take part in the election.
pub async fn read_annotations(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|lease| lease.metadata.annotations)
        .unwrap_or_default())
}

struct Shared {
    identity: String,
    leader: watch::Sender<bool>,
    state: watch::Sender<LeaderState>,
    book: Mutex<Book>,
    /// Wakes the runner when the first change is pending.
    wake: Notify,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Annotations: as stored on the Lease, and changes not written yet.
#[derive(Debug, Default)]
struct Book {
    leading: bool,
    stored: BTreeMap<String, String>,
    /// `None` removes the key.
    pending: BTreeMap<String, Option<String>>,
    /// Bytes of keys and values of the effective annotations.
    size: usize,
}

impl Book {
    fn entry_size(key: &str, value: Option<&String>) -> usize {
        value.map_or(0, |v| key.len() + v.len())
    }

    fn effective_size(&self, key: &str) -> usize {
        match self.pending.get(key) {
            Some(value) => Self::entry_size(key, value.as_ref()),
            None => Self::entry_size(key, self.stored.get(key)),
        }
    }

    /// Records a change; `Ok(true)` when it is the first pending one.
    fn change(&mut self, key: String, value: Option<String>) -> Result<bool, AnnotationError> {
        if !self.leading {
            return Err(AnnotationError::NotLeader);
        }
        let size = self.size - self.effective_size(&key) + Self::entry_size(&key, value.as_ref());
        if size > MAX_ANNOTATIONS_SIZE {
            return Err(AnnotationError::TooLarge);
        }
        self.size = size;
        // An unchanged value needs no write, unless a different one is
        // pending (maybe being written right now): then this one must follow.
        if !self.pending.contains_key(&key) && self.stored.get(&key) == value.as_ref() {
            return Ok(false);
        }
        let first = self.pending.is_empty();
        self.pending.insert(key, value);
        Ok(first)
    }

    fn effective(&self) -> BTreeMap<String, String> {
        let mut map = self.stored.clone();
        apply_changes(&mut map, &self.pending);
        map
    }

    /// After a read or a write: `stored` is now the Lease's, and the changes
    /// in `written` are no longer pending unless changed again since.
    fn stored(
        &mut self,
        stored: BTreeMap<String, String>,
        written: &BTreeMap<String, Option<String>>,
    ) {
        self.stored = stored;
        for (key, value) in written {
            if self.pending.get(key) == Some(value) {
                self.pending.remove(key);
            }
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.size = self
            .effective()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
    }
}

fn apply_changes(map: &mut BTreeMap<String, String>, changes: &BTreeMap<String, Option<String>>) {
    for (key, value) in changes {
        match value {
            Some(value) => {
                map.insert(key.clone(), value.clone());
            }
            None => {
                map.remove(key);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The loop

/// What one try to acquire or renew found.
#[derive(Debug)]
enum Outcome {
    /// We hold the Lease (the write succeeded).
    Held,
    /// Someone else holds it and it has not expired.
    HeldBy(String),
    /// No answer, an error, or a lost race (409): try again later.
    Failed,
}

/// Why a request failed.
#[derive(Debug)]
enum Failure {
    Api(kube::Error),
    Timeout,
}

impl Failure {
    fn code(&self) -> Option<u16> {
        match self {
            Self::Api(kube::Error::Api(status)) => Some(status.code),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Api(err) => write!(f, "{err}"),
            Self::Timeout => f.write_str("no answer in time"),
        }
    }
}

async fn within<T>(
    deadline: Instant,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Failure> {
    match timeout_at(deadline, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(Failure::Api(err)),
        Err(_) => Err(Failure::Timeout),
    }
}

/// What ended a wait between tries.
enum Woke {
    Shutdown,
    Deadline,
    Due,
    Changed,
}

struct Runner {
    api: Api<Lease>,
    config: LeaseConfig,
    duration_seconds: i32,
    shared: Arc<Shared>,
    /// The Lease as last read or written (its resourceVersion guards writes).
    cached: Option<Lease>,
    /// The spec last seen and when it was first seen, for expiry.
    observed: Option<(Option<LeaseSpec>, Instant)>,
    /// While leading: when the last successful renewal started.
    renewed: Option<Instant>,
    /// When the last write carrying annotations started.
    last_flush: Option<Instant>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Aborted or finished: whatever happens to the Lease, this process
        // no longer acts as the leader.
        self.end_term(None);
    }
}

impl Runner {
    fn identity(&self) -> &str {
        &self.shared.identity
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        tracing::info!(
            lease = %format!("{}/{}", self.config.namespace, self.config.name),
            identity = %self.identity(),
            "contending for leadership"
        );
        let shared = self.shared.clone();
        'run: loop {
            let attempt = Instant::now();
            let outcome = tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'run,
                outcome = self.try_acquire_or_renew() => outcome,
            };
            // A flush may bring the next write forward, but never retries a
            // failed one sooner than a retry period later.
            let may_flush_early = matches!(outcome, Outcome::Held);
            match outcome {
                Outcome::Held if self.renewed.is_none() => self.begin_term(attempt),
                Outcome::Held => self.renewed = Some(attempt),
                Outcome::HeldBy(holder) if self.renewed.is_some() => {
                    self.end_term(Some(&format!("the Lease is now held by {holder}")));
                }
                Outcome::HeldBy(_) | Outcome::Failed => {}
            }
            loop {
                let leading = self.renewed.is_some();
                let deadline = self.renewed.map(|at| at + self.config.renew_deadline);
                let mut next = attempt + self.config.retry_period;
                if may_flush_early && let Some(due) = self.flush_at() {
                    next = next.min(due);
                }
                let woke = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => Woke::Shutdown,
                    () = sleep_until(deadline.unwrap_or(next)), if deadline.is_some_and(|d| d <= next) => Woke::Deadline,
                    () = sleep_until(next) => Woke::Due,
                    () = shared.wake.notified(), if leading => Woke::Changed,
                };
                match woke {
                    Woke::Shutdown => break 'run,
                    Woke::Deadline => self.end_term(Some(&format!(
                        "could not renew the Lease within {:?}",
                        self.config.renew_deadline
                    ))),
                    Woke::Due => break,
                    Woke::Changed => {}
                }
            }
        }
        self.release().await;
    }

    /// When pending annotations should be written (leading only).
    fn flush_at(&self) -> Option<Instant> {
        if self.renewed.is_none() || self.shared.book().pending.is_empty() {
            return None;
        }
        Some(
            self.last_flush
                .map_or_else(Instant::now, |at| at + self.config.annotation_interval),
        )
    }

    fn flush_due(&self, now: Instant) -> bool {
        self.last_flush
            .is_none_or(|at| now + FLUSH_SLACK >= at + self.config.annotation_interval)
    }

    fn expired(&self, now: Instant) -> bool {
        let Some((spec, seen)) = &self.observed else {
            return true;
        };
        let seconds = spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .filter(|s| *s > 0)
            .unwrap_or(self.duration_seconds);
        now >= *seen + Duration::from_secs(u64::try_from(seconds).unwrap_or(1))
    }

    /// client-go's `tryAcquireOrRenew`: the leader first writes over the
    /// Lease it last saw; on a conflict, and for followers, read then decide.
    async fn try_acquire_or_renew(&mut self) -> Outcome {
        let start = Instant::now();
        let deadline = match self.renewed {
            Some(renewed) => renewed + self.config.renew_deadline,
            None => start + self.config.renew_deadline,
        };
        if self.renewed.is_some()
            && let Some(lease) = self.cached.clone()
            && holder(lease.spec.as_ref()) == Some(self.identity())
        {
            match self.write(lease, start, deadline).await {
                Ok(()) => return Outcome::Held,
                Err(failure) if matches!(failure.code(), Some(404 | 409)) => {
                    tracing::debug!(%failure, "the Lease changed under us; reading it again");
                }
                Err(failure) => {
                    tracing::warn!(%failure, "could not renew the Lease");
                    return Outcome::Failed;
                }
            }
        }
        let current = match within(deadline, self.api.get_opt(&self.config.name)).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return self.create(deadline).await,
            Err(failure) => {
                tracing::warn!(%failure, "could not read the Lease");
                return Outcome::Failed;
            }
        };
        self.remember(&current, &BTreeMap::new());
        if let Some(other) = holder(current.spec.as_ref())
            && other != self.identity()
            && (self.renewed.is_some() || !self.expired(Instant::now()))
        {
            return Outcome::HeldBy(other.to_owned());
        }
        match self.write(current, start, deadline).await {
            Ok(()) => Outcome::Held,
            Err(failure) if failure.code() == Some(409) => {
                tracing::debug!("another candidate wrote the Lease first");
                Outcome::Failed
            }
            Err(failure) => {
                tracing::warn!(%failure, "could not write the Lease");
                Outcome::Failed
            }
        }
    }

    /// Replaces `base` (guarded by its resourceVersion) with us as holder,
    /// carrying the pending annotations when a flush is due.
    async fn write(
        &mut self,
        base: Lease,
        start: Instant,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let flush = if self.renewed.is_some() && self.flush_due(start) {
            self.shared.book().pending.clone()
        } else {
            BTreeMap::new()
        };
        let mut lease = base;
        lease.spec = Some(holding_spec(
            lease.spec.as_ref(),
            self.identity(),
            self.duration_seconds,
            now_micros(),
        ));
        if !flush.is_empty() {
            apply_changes(
                lease.metadata.annotations.get_or_insert_with(BTreeMap::new),
                &flush,
            );
        }
        let params = PostParams::default();
        let request = self.api.replace(&self.config.name, &params, &lease);
        let stored = within(deadline, request).await?;
        if !flush.is_empty() {
            self.last_flush = Some(start);
            tracing::debug!(keys = flush.len(), "annotations written to the Lease");
        }
        self.remember(&stored, &flush);
        Ok(())
    }

    async fn create(&mut self, deadline: Instant) -> Outcome {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(holding_spec(
                None,
                self.identity(),
                self.duration_seconds,
                now_micros(),
            )),
        };
        match within(deadline, self.api.create(&PostParams::default(), &lease)).await {
            Ok(stored) => {
                self.remember(&stored, &BTreeMap::new());
                Outcome::Held
            }
            Err(failure) if failure.code() == Some(409) => {
                tracing::debug!("another candidate created the Lease first");
                Outcome::Failed
            }
            Err(failure) => {
                tracing::warn!(%failure, "could not create the Lease");
                Outcome::Failed
            }
        }
    }

    /// Takes in a Lease read or written: the cache, the observation for
    /// expiry, the stored annotations, the observed holder.
    fn remember(&mut self, lease: &Lease, written: &BTreeMap<String, Option<String>>) {
        let now = Instant::now();
        if self
            .observed
            .as_ref()
            .is_none_or(|(spec, _)| spec != &lease.spec)
        {
            self.observed = Some((lease.spec.clone(), now));
        }
        self.shared.book().stored(
            lease.metadata.annotations.clone().unwrap_or_default(),
            written,
        );
        let observed = holder(lease.spec.as_ref()).map(str::to_owned);
        self.shared.state.send_if_modified(|state| {
            let changed = state.holder != observed;
            state.holder.clone_from(&observed);
            changed
        });
        self.cached = Some(lease.clone());
    }

    fn begin_term(&mut self, start: Instant) {
        self.renewed = Some(start);
        self.last_flush = None;
        let lease = self.cached.as_ref();
        let annotations = lease
            .and_then(|l| l.metadata.annotations.clone())
            .unwrap_or_default();
        let transitions = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        {
            let mut book = self.shared.book();
            book.leading = true;
            book.pending.clear();
            book.recount();
        }
        tracing::info!(
            lease = %format!("{}/{}", self.config.namespace, self.config.name),
            identity = %self.identity(),
            transitions,
            "became the leader"
        );
        self.shared.state.send_replace(LeaderState {
            is_leader: true,
            holder: Some(self.identity().to_owned()),
            annotations: Arc::new(annotations),
            transitions,
        });
        self.shared.leader.send_replace(true);
    }

    /// Stops leading (if leading); `reason` is logged as a loss.
    fn end_term(&mut self, reason: Option<&str>) {
        let was = self.renewed.take().is_some();
        self.last_flush = None;
        // Refuse annotations before anyone sees `false`.
        let dropped = {
            let mut book = self.shared.book();
            book.leading = false;
            let dropped = book.pending.len();
            book.pending.clear();
            book.recount();
            dropped
        };
        self.shared
            .leader
            .send_if_modified(|is| std::mem::replace(is, false));
        self.shared.state.send_if_modified(|state| {
            let changed = state.is_leader || !state.annotations.is_empty();
            state.is_leader = false;
            state.annotations = Arc::default();
            changed
        });
        if was && let Some(reason) = reason {
            tracing::warn!(
                lease = %format!("{}/{}", self.config.namespace, self.config.name),
                identity = %self.identity(),
                dropped_annotations = dropped,
                "lost leadership: {reason}"
            );
        }
    }

    /// On shutdown: stop leading, then hand the Lease over at once (with the
    /// annotations not written yet) if the Lease still names us.
    async fn release(&mut self) {
        let flush = if self.renewed.is_some() {
            self.shared.book().pending.clone()
        } else {
            BTreeMap::new()
        };
        self.end_term(None);
        let deadline = Instant::now() + self.config.renew_deadline;
        let Some(mut base) = self.cached.clone() else {
            return;
        };
        for _ in 0..2 {
            if holder(base.spec.as_ref()) != Some(self.identity()) {
                return;
            }
            let mut lease = base.clone();
            lease.spec = Some(released_spec(lease.spec.as_ref(), now_micros()));
            if !flush.is_empty() {
                apply_changes(
                    lease.metadata.annotations.get_or_insert_with(BTreeMap::new),
                    &flush,
                );
            }
            let params = PostParams::default();
            let request = self.api.replace(&self.config.name, &params, &lease);
            match within(deadline, request).await {
                Ok(stored) => {
                    self.remember(&stored, &flush);
                    tracing::info!(identity = %self.identity(), "released the Lease");
                    return;
                }
                Err(failure) if failure.code() == Some(409) => {
                    match within(deadline, self.api.get_opt(&self.config.name)).await {
                        Ok(Some(lease)) => base = lease,
                        _ => return,
                    }
                }
                Err(failure) => {
                    tracing::warn!(%failure, "could not release the Lease; others take over once it expires");
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The Lease record (pure)

/// The holder named by a Lease (`None` when empty).
fn holder(spec: Option<&LeaseSpec>) -> Option<&str> {
    spec.and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// Now, to the microsecond (what `MicroTime` keeps).
fn now_micros() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now)
}

/// The spec that makes `identity` the holder at `now`: a renewal keeps
/// `acquireTime` and `leaseTransitions`; taking over from anyone else
/// (including nobody, after a release) sets `acquireTime` and counts a
/// transition. A new Lease starts at 0 transitions.
fn holding_spec(
    old: Option<&LeaseSpec>,
    identity: &str,
    duration_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let mut spec = old.cloned().unwrap_or_default();
    let renewal = old.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    if !renewal {
        spec.holder_identity = Some(identity.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(match old {
            Some(old) => old.lease_transitions.unwrap_or(0).saturating_add(1),
            None => 0,
        });
    }
    spec.acquire_time.get_or_insert(MicroTime(now));
    spec.lease_transitions.get_or_insert(0);
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(MicroTime(now));
    spec
}

/// The spec a leader writes on release, as client-go does: no holder, a
/// 1 s duration, so the next candidate takes over at once.
fn released_spec(old: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let mut spec = old.cloned().unwrap_or_default();
    spec.holder_identity = Some(String::new());
    spec.lease_duration_seconds = Some(1);
    spec.acquire_time = Some(MicroTime(now));
    spec.renew_time = Some(MicroTime(now));
    spec.lease_transitions.get_or_insert(0);
    spec
}

// ---------------------------------------------------------------------------
// Annotation keys (pure)

/// A valid Kubernetes annotation key: an optional DNS-subdomain prefix
/// (≤ 253) and `/`, then a name of 1–63 characters of `[A-Za-z0-9_.-]`
/// starting and ending alphanumeric.
pub fn is_valid_annotation_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

/// `{base}.{suffix}` as a valid annotation key, e.g.
/// `annotation_key("ebb.io/last-fired", "shop/report")` →
/// `ebb.io/last-fired.shop.report`. `/` becomes `.`; when the suffix has
/// other characters an annotation cannot carry, or the name part would pass
/// 63 characters, it is cut and ends in `-` and 8 hex digits of a stable
/// hash of the whole suffix, so distinct suffixes stay distinct.
pub fn annotation_key(base: &str, suffix: &str) -> String {
    let (prefix, name) = match base.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, base),
    };
    let with_prefix = |name: &str| match prefix {
        Some(prefix) => format!("{prefix}/{name}"),
        None => name.to_owned(),
    };
    let cleaned: String = suffix
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            '/' => '.',
            _ => '_',
        })
        .collect();
    let mut full = format!("{name}.{cleaned}");
    let lossless = suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if lossless && is_valid_annotation_key(&with_prefix(&full)) {
        return with_prefix(&full);
    }
    let hash = format!("{:08x}", fnv1a(suffix.as_bytes()) as u32);
    let mut keep = 63 - 1 - hash.len();
    while !full.is_char_boundary(keep.min(full.len())) {
        keep -= 1;
    }
    full.truncate(keep);
    full.push('-');
    full.push_str(&hash);
    with_prefix(&full)
}

/// FNV-1a, 64 bits: stable across Rust versions and processes (std's
/// hasher is not promised to be).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
}

/// Random enough for an identity suffix: std's per-process hash seed mixed
/// with the time.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    use ebb_kube_double::Scenario;
    use serde_json::{Value, json};

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/cron";

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    /// `2026-11-25T10:00:00.000000Z`: 27 characters, 6 fraction digits, `Z`.
    fn is_micro_time(value: &Value) -> bool {
        let Some(s) = value.as_str() else {
            return false;
        };
        let b = s.as_bytes();
        b.len() == 27
            && b[4] == b'-'
            && b[10] == b'T'
            && b[19] == b'.'
            && b[20..26].iter().all(u8::is_ascii_digit)
            && b[26] == b'Z'
            && s.parse::<Timestamp>().is_ok()
    }

    #[test]
    fn micro_time_is_written_with_six_fraction_digits() {
        let spec = holding_spec(None, "me", 15, ts("2026-11-25T10:00:00Z"));
        let body = serde_json::to_value(&spec).expect("serialize");
        assert_eq!(body["renewTime"], "2026-11-25T10:00:00.000000Z");
        assert_eq!(body["acquireTime"], "2026-11-25T10:00:00.000000Z");
        let later = holding_spec(None, "me", 15, ts("2026-11-25T10:00:00.123456Z"));
        let body = serde_json::to_value(&later).expect("serialize");
        assert_eq!(body["renewTime"], "2026-11-25T10:00:00.123456Z");
        assert!(is_micro_time(&body["renewTime"]));
        assert!(is_micro_time(
            &serde_json::to_value(MicroTime(now_micros())).expect("json")
        ));
    }

    #[test]
    fn holding_spec_creates_renews_and_takes_over() {
        let t0 = ts("2026-11-25T10:00:00Z");
        let t1 = ts("2026-11-25T10:00:02Z");
        let created = holding_spec(None, "a", 15, t0);
        assert_eq!(created.holder_identity.as_deref(), Some("a"));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.acquire_time, Some(MicroTime(t0)));
        assert_eq!(created.renew_time, Some(MicroTime(t0)));

        let renewed = holding_spec(Some(&created), "a", 15, t1);
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(t0)),
            "a renewal keeps acquireTime"
        );
        assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
        assert_eq!(renewed.lease_transitions, Some(0));

        let taken = holding_spec(Some(&renewed), "b", 15, t1);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(t1)));
        assert_eq!(taken.lease_transitions, Some(1));

        let released = released_spec(Some(&taken), t1);
        assert_eq!(released.holder_identity.as_deref(), Some(""));
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(1));
        assert_eq!(holder(Some(&released)), None);
        let after_release = holding_spec(Some(&released), "b", 15, t1);
        assert_eq!(
            after_release.lease_transitions,
            Some(2),
            "nobody → b is a transition"
        );
        assert_eq!(after_release.lease_duration_seconds, Some(15));
    }

    #[test]
    fn config_follows_client_go_rules() {
        let config = LeaseConfig::new("ebb", "cron", "me");
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.lease_duration_seconds(), 15);
        let short = LeaseConfig {
            lease_duration: Duration::from_millis(1500),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
            ..config.clone()
        };
        assert_eq!(short.validate(), Ok(()));
        assert_eq!(short.lease_duration_seconds(), 2, "rounded up");
        let bad = [
            LeaseConfig {
                renew_deadline: Duration::from_secs(15),
                ..config.clone()
            },
            LeaseConfig {
                retry_period: Duration::from_secs(9),
                ..config.clone()
            },
            LeaseConfig {
                retry_period: Duration::ZERO,
                ..config.clone()
            },
            LeaseConfig {
                identity: String::new(),
                ..config.clone()
            },
            LeaseConfig {
                name: String::new(),
                ..config.clone()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        let a = LeaseConfig::default_identity();
        let b = LeaseConfig::default_identity();
        assert_ne!(a, b);
        assert!(a.contains(&format!("_{}_", std::process::id())), "{a}");
    }

    #[test]
    fn annotation_keys() {
        for ok in [
            "ebb.io/last-fired.shop.report",
            "a",
            "example.com/A_b.c-9",
            "ebb.io/x",
        ] {
            assert!(is_valid_annotation_key(ok), "{ok}");
        }
        for bad in [
            "",
            "ebb.io/",
            "/x",
            "Ebb.io/x",
            "ebb.io/x/y",
            "ebb.io/-x",
            "ebb.io/x.",
            "ebb.io/a b",
            &format!("ebb.io/{}", "x".repeat(64)),
        ] {
            assert!(!is_valid_annotation_key(bad), "{bad}");
        }
        assert_eq!(
            annotation_key("ebb.io/last-fired", "shop/nightly-report"),
            "ebb.io/last-fired.shop.nightly-report"
        );
        let long = annotation_key("ebb.io/last-fired", &format!("shop/{}", "r".repeat(80)));
        assert!(is_valid_annotation_key(&long), "{long}");
        assert_eq!(long.len() - "ebb.io/".len(), 63);
        let other = annotation_key("ebb.io/last-fired", &format!("shop/{}s", "r".repeat(79)));
        assert_ne!(long, other, "distinct suffixes stay distinct");
        let odd = annotation_key("ebb.io/last-fired", "shop/ä");
        assert!(is_valid_annotation_key(&odd), "{odd}");
        assert_ne!(odd, annotation_key("ebb.io/last-fired", "shop/ö"));
        assert!(is_valid_annotation_key(&annotation_key("ebb.io/x", "")));
    }

    #[test]
    fn book_coalesces_and_keeps_changes_made_during_a_write() {
        let mut book = Book::default();
        assert_eq!(
            book.change("k".into(), Some("1".into())),
            Err(AnnotationError::NotLeader)
        );
        book.leading = true;
        book.stored(
            BTreeMap::from([("k".to_owned(), "a".to_owned())]),
            &BTreeMap::new(),
        );
        assert_eq!(
            book.change("k".into(), Some("a".into())),
            Ok(false),
            "unchanged"
        );
        assert!(book.pending.is_empty());
        assert_eq!(
            book.change("k".into(), Some("b".into())),
            Ok(true),
            "first pending"
        );
        assert_eq!(book.change("j".into(), Some("c".into())), Ok(false));
        // A write of the current pending set starts; meanwhile k goes back to a.
        let written = book.pending.clone();
        assert_eq!(book.change("k".into(), Some("a".into())), Ok(false));
        let mut on_lease = book.stored.clone();
        apply_changes(&mut on_lease, &written);
        book.stored(on_lease, &written);
        assert_eq!(
            book.pending,
            BTreeMap::from([("k".to_owned(), Some("a".to_owned()))]),
            "the newer value still has to be written"
        );
        assert_eq!(book.effective()["k"], "a");
        assert_eq!(book.effective()["j"], "c");
        let big = "x".repeat(MAX_ANNOTATIONS_SIZE);
        assert_eq!(
            book.change("big".into(), Some(big)),
            Err(AnnotationError::TooLarge)
        );
        assert_eq!(book.change("j".into(), None), Ok(false));
        assert!(!book.effective().contains_key("j"));
    }

    // --- exact requests, answered one by one ([`Scenario`]) ----------------

    /// The body as stored, with a new resourceVersion.
    fn stored(mut body: Value, rv: &str) -> Value {
        body["metadata"]["resourceVersion"] = json!(rv);
        body["apiVersion"] = json!("coordination.k8s.io/v1");
        body["kind"] = json!("Lease");
        body
    }

    fn start(
        retry_ms: u64,
    ) -> (
        LeaderHandle,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        Scenario,
    ) {
        crate::install_crypto_provider();
        let (client, api) = Scenario::client();
        let config = LeaseConfig {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_millis(retry_ms),
            ..LeaseConfig::new("ebb", "cron", "pod-a")
        };
        let elector = Elector::new(client, config).expect("valid config");
        let leader = elector.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(elector.run(shutdown.clone()));
        (leader, shutdown, task, api)
    }

    #[tokio::test]
    async fn creates_renews_with_annotations_and_releases() {
        let (leader, shutdown, task, mut api) = start(300);

        let (seen, reply) = api.next().await;
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("GET", PATH));
        reply.status(
            404,
            "NotFound",
            "leases.coordination.k8s.io \"cron\" not found",
        );

        let (seen, reply) = api.next().await;
        assert_eq!(seen.method, "POST");
        assert_eq!(
            seen.path,
            "/apis/coordination.k8s.io/v1/namespaces/ebb/leases"
        );
        let body = seen.body;
        assert_eq!(body["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(body["kind"], "Lease");
        assert_eq!(body["metadata"]["name"], "cron");
        assert_eq!(body["metadata"]["namespace"], "ebb");
        let spec = &body["spec"];
        assert_eq!(spec["holderIdentity"], "pod-a");
        assert_eq!(spec["leaseDurationSeconds"], 15);
        assert_eq!(spec["leaseTransitions"], 0);
        assert!(is_micro_time(&spec["acquireTime"]), "{spec}");
        assert!(is_micro_time(&spec["renewTime"]), "{spec}");
        assert_eq!(spec["acquireTime"], spec["renewTime"]);
        let mut current = stored(body, "10");
        reply.json(201, &current);

        let mut is_leader = leader.leader();
        tokio::time::timeout(Duration::from_secs(5), is_leader.wait_for(|l| *l))
            .await
            .expect("leader in time")
            .expect("elector alive");
        leader
            .set_annotation("ebb.io/last-fired.shop.a", "2026-11-25T10:00:00Z")
            .expect("leader");
        leader
            .set_annotation("ebb.io/last-fired.shop.b", "2026-11-25T10:00:01Z")
            .expect("leader");
        assert_eq!(leader.annotations().len(), 2);

        // The renewal (early, to flush): a replace guarded by resourceVersion.
        let (seen, reply) = api.next().await;
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("PUT", PATH));
        assert_eq!(seen.body["metadata"]["resourceVersion"], "10");
        assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
        assert_eq!(
            seen.body["spec"]["acquireTime"],
            current["spec"]["acquireTime"]
        );
        assert_eq!(seen.body["spec"]["leaseTransitions"], 0);
        assert!(is_micro_time(&seen.body["spec"]["renewTime"]));
        assert_eq!(
            seen.body["metadata"]["annotations"],
            json!({"ebb.io/last-fired.shop.a": "2026-11-25T10:00:00Z",
                   "ebb.io/last-fired.shop.b": "2026-11-25T10:00:01Z"})
        );
        current = stored(seen.body, "11");
        reply.json(200, &current);
        tokio::time::timeout(Duration::from_secs(5), async {
            while leader.pending_annotations() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("flushed");

        // A change within the annotation interval waits; the release carries it.
        leader
            .set_annotation("ebb.io/last-fired.shop.a", "2026-11-25T10:01:00Z")
            .expect("leader");
        shutdown.cancel();
        let (seen, reply) = api.next().await;
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("PUT", PATH));
        assert!(
            !leader.is_leader(),
            "leadership ends before the release is written"
        );
        let spec = &seen.body["spec"];
        assert_eq!(seen.body["metadata"]["resourceVersion"], "11");
        assert_eq!(spec["holderIdentity"], "");
        assert_eq!(spec["leaseDurationSeconds"], 1);
        assert_eq!(spec["leaseTransitions"], 0);
        assert!(is_micro_time(&spec["renewTime"]));
        assert_eq!(
            seen.body["metadata"]["annotations"]["ebb.io/last-fired.shop.a"],
            "2026-11-25T10:01:00Z"
        );
        reply.json(200, &stored(seen.body, "12"));
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run ends after the release")
            .expect("no panic");
    }

    fn lease(holder: &str, transitions: i32, rv: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "cron", "namespace": "ebb", "resourceVersion": rv,
                         "annotations": {"ebb.io/last-fired.shop.a": "2026-11-25T09:00:00Z"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": "2026-11-25T09:00:00.000000Z",
                     "renewTime": "2026-11-25T09:59:59.000000Z",
                     "leaseTransitions": transitions},
        })
    }

    #[tokio::test]
    async fn takes_over_a_released_lease_and_leaves_a_live_one_alone() {
        let (leader, shutdown, task, mut api) = start(100);

        // Held by another, and (as far as we have seen) alive: only reads.
        for _ in 0..3 {
            let (seen, reply) = api.next().await;
            assert_eq!((seen.method.as_str(), seen.path.as_str()), ("GET", PATH));
            reply.json(200, &lease("pod-b", 3, "20"));
        }
        assert!(!leader.is_leader());
        assert_eq!(leader.state().borrow().holder.as_deref(), Some("pod-b"));

        // Released: taken over at once, counting a transition.
        let (seen, reply) = api.next().await;
        assert_eq!(seen.method, "GET");
        reply.json(200, &lease("", 3, "21"));
        let (seen, reply) = api.next().await;
        assert_eq!((seen.method.as_str(), seen.path.as_str()), ("PUT", PATH));
        let spec = &seen.body["spec"];
        assert_eq!(seen.body["metadata"]["resourceVersion"], "21");
        assert_eq!(spec["holderIdentity"], "pod-a");
        assert_eq!(spec["leaseTransitions"], 4);
        assert_eq!(spec["leaseDurationSeconds"], 15);
        assert_ne!(spec["acquireTime"], "2026-11-25T09:00:00.000000Z");
        assert_eq!(spec["acquireTime"], spec["renewTime"]);
        assert!(is_micro_time(&spec["acquireTime"]));
        reply.json(200, &stored(seen.body, "22"));

        let mut state = leader.state();
        let state = tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| s.is_leader))
            .await
            .expect("leader in time")
            .expect("alive")
            .clone();
        assert_eq!(state.transitions, 4);
        assert_eq!(
            state
                .annotations
                .get("ebb.io/last-fired.shop.a")
                .map(String::as_str),
            Some("2026-11-25T09:00:00Z"),
            "the previous leader's annotations"
        );
        task.abort();
        drop(shutdown);
        let _ = task.await;
        assert!(!leader.is_leader(), "an aborted elector is no leader");
    }
}
