//! Leader election on a `coordination.k8s.io/v1` Lease (`ebb_kube::lease`)
//! against the Kubernetes API double: acquiring and renewing, one leader at
//! a time, takeover after a crash and after a release, conflicts and server
//! errors on renewal, and the annotations a leader keeps on the Lease.
//!
//! Durations are short (lease 2 s, renew deadline 1 s, retry 200 ms), so
//! every bound below is a multiple of them plus scheduling slack.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::within;
use ebb_kube::k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use ebb_kube::k8s_openapi::jiff::Timestamp;
use ebb_kube::lease::{AnnotationError, annotation_key, read_annotations};
use ebb_kube::{Elector, LeaderHandle, LeaseConfig};
use ebb_kube_double::{KubeApi, KubeRequest, Match};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

const NS: &str = "ebb";
const NAME: &str = "ebb-connector-cron";
const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ebb/leases/ebb-connector-cron";

const LEASE: Duration = Duration::from_secs(2);
const RENEW: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(200);
/// Scheduling and HTTP slack on top of the protocol's own bounds.
const SLACK: Duration = Duration::from_millis(600);
const LIMIT: Duration = Duration::from_secs(10);

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: LEASE,
        renew_deadline: RENEW,
        retry_period: RETRY,
        ..LeaseConfig::new(NS, NAME, identity)
    }
}

struct Candidate {
    handle: LeaderHandle,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Candidate {
    fn start(api: &KubeApi, config: LeaseConfig) -> Self {
        let elector = Elector::new(api.client(), config).expect("valid lease config");
        let handle = elector.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(elector.run(shutdown.clone()));
        Self {
            handle,
            shutdown,
            task,
        }
    }

    async fn until_leader(&self, limit: Duration, what: &str) {
        let mut leader = self.handle.leader();
        within(limit, what, leader.wait_for(|is| *is))
            .await
            .expect("elector alive");
    }

    async fn until_follower(&self, limit: Duration, what: &str) {
        let mut leader = self.handle.leader();
        within(limit, what, leader.wait_for(|is| !*is))
            .await
            .expect("elector alive");
    }

    /// Graceful: cancel and wait for the release.
    async fn stop(mut self) {
        self.shutdown.cancel();
        within(LIMIT, "the elector to stop", &mut self.task)
            .await
            .expect("no panic");
    }

    /// A crash: the task is gone, the Lease is not released.
    async fn crash(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Samples every candidate's `is_leader` every 5 ms; counts the samples in
/// which more than one leads.
struct Sampler {
    handles: Arc<Mutex<Vec<LeaderHandle>>>,
    overlaps: Arc<Mutex<Vec<Vec<String>>>>,
    samples: Arc<Mutex<u64>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Sampler {
    fn start() -> Self {
        let handles: Arc<Mutex<Vec<LeaderHandle>>> = Arc::default();
        let overlaps: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let samples: Arc<Mutex<u64>> = Arc::default();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (handles, overlaps, samples, stop) = (
                handles.clone(),
                overlaps.clone(),
                samples.clone(),
                stop.clone(),
            );
            async move {
                while !stop.is_cancelled() {
                    let leaders: Vec<String> = handles
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|h| h.is_leader())
                        .map(|h| h.identity().to_owned())
                        .collect();
                    if leaders.len() > 1 {
                        overlaps.lock().unwrap().push(leaders);
                    }
                    *samples.lock().unwrap() += 1;
                    sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Self {
            handles,
            overlaps,
            samples,
            stop,
            task,
        }
    }

    fn watch(&self, handle: &LeaderHandle) {
        self.handles.lock().unwrap().push(handle.clone());
    }

    async fn finish(self) {
        self.stop.cancel();
        self.task.await.expect("sampler");
        let samples = *self.samples.lock().unwrap();
        assert!(samples > 100, "only {samples} samples");
        let overlaps = self.overlaps.lock().unwrap();
        assert!(
            overlaps.is_empty(),
            "{} of {samples} samples saw several leaders, e.g. {:?}",
            overlaps.len(),
            overlaps.first()
        );
    }
}

fn lease(api: &KubeApi) -> Value {
    api.lease(NS, NAME).expect("the Lease exists")
}

fn lease_writes(api: &KubeApi) -> Vec<KubeRequest> {
    api.requests()
        .into_iter()
        .filter(|r| r.path == PATH && matches!(r.method.as_str(), "PUT" | "PATCH"))
        .collect()
}

/// `2026-11-25T10:00:00.000000Z`.
fn is_micro_time(value: &Value) -> bool {
    let Some(s) = value.as_str() else {
        return false;
    };
    let b = s.as_bytes();
    b.len() == 27
        && b[10] == b'T'
        && b[19] == b'.'
        && b[20..26].iter().all(u8::is_ascii_digit)
        && b[26] == b'Z'
        && s.parse::<Timestamp>().is_ok()
}

fn micro_now() -> Value {
    serde_json::to_value(MicroTime(Timestamp::now())).expect("MicroTime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_acquires_renews_and_releases() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;
    let state = a.handle.state().borrow().clone();
    assert!(state.is_leader);
    assert_eq!(state.holder.as_deref(), Some("pod-a"));
    assert_eq!(state.transitions, 0);

    let first = lease(&api);
    let spec = &first["spec"];
    assert_eq!(spec["holderIdentity"], "pod-a");
    assert_eq!(spec["leaseDurationSeconds"], 2);
    assert_eq!(spec["leaseTransitions"], 0);
    assert!(is_micro_time(&spec["acquireTime"]), "{spec}");
    assert!(is_micro_time(&spec["renewTime"]), "{spec}");

    // Renewals every retry period: renewTime moves, acquireTime stays.
    api.clear_requests();
    sleep(Duration::from_secs(1)).await;
    let writes = lease_writes(&api);
    assert!(
        (3..=7).contains(&writes.len()),
        "{} renewals in 1 s with a 200 ms retry period",
        writes.len()
    );
    assert!(
        writes
            .iter()
            .all(|w| w.method == "PUT" && w.fault.is_none())
    );
    for write in &writes {
        let body = write.json();
        assert!(
            body["metadata"]["resourceVersion"].is_string(),
            "every write is guarded by resourceVersion: {body}"
        );
    }
    let later = lease(&api);
    assert_eq!(later["spec"]["acquireTime"], first["spec"]["acquireTime"]);
    assert_ne!(later["spec"]["renewTime"], first["spec"]["renewTime"]);
    assert!(is_micro_time(&later["spec"]["renewTime"]));
    assert!(a.handle.is_leader());

    let handle = a.handle.clone();
    a.stop().await;
    assert!(!handle.is_leader());
    let released = lease(&api);
    assert_eq!(released["spec"]["holderIdentity"], "");
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(released["spec"]["leaseTransitions"], 0);
    assert!(is_micro_time(&released["spec"]["renewTime"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_candidates_one_leader_takeover_after_crash_and_release() {
    let api = KubeApi::start();
    let sampler = Sampler::start();
    let a = Candidate::start(&api, config("pod-a"));
    sampler.watch(&a.handle);
    a.until_leader(LIMIT, "pod-a to lead").await;
    let b = Candidate::start(&api, config("pod-b"));
    sampler.watch(&b.handle);

    // The follower reads, never writes, while the leader renews.
    sleep(LEASE + Duration::from_millis(500)).await;
    assert!(a.handle.is_leader());
    assert!(!b.handle.is_leader());
    assert_eq!(b.handle.state().borrow().holder.as_deref(), Some("pod-a"));
    assert!(
        lease_writes(&api)
            .iter()
            .all(|w| w.json()["spec"]["holderIdentity"] == "pod-a"),
        "pod-b never wrote a live Lease"
    );

    // Crash: pod-b takes over once the Lease has not changed for its duration.
    let crashed = Instant::now();
    a.crash().await;
    b.until_leader(
        LEASE + RETRY + SLACK,
        "pod-b to take over from a crashed leader",
    )
    .await;
    let took = crashed.elapsed();
    assert!(
        took >= LEASE - RETRY - Duration::from_millis(100),
        "pod-b took over after {took:?}, before the Lease expired"
    );
    let spec = lease(&api)["spec"].clone();
    assert_eq!(spec["holderIdentity"], "pod-b");
    assert_eq!(spec["leaseTransitions"], 1);
    assert_eq!(b.handle.state().borrow().transitions, 1);

    // Release: a follower takes over at its next read.
    let c = Candidate::start(&api, config("pod-c"));
    sampler.watch(&c.handle);
    sleep(Duration::from_millis(500)).await;
    assert!(!c.handle.is_leader());
    let released = Instant::now();
    b.stop().await;
    c.until_leader(RETRY + SLACK, "pod-c to take over a released Lease")
        .await;
    assert!(released.elapsed() < RETRY + SLACK);
    let spec = lease(&api)["spec"].clone();
    assert_eq!(spec["holderIdentity"], "pod-c");
    assert_eq!(spec["leaseTransitions"], 2);

    sleep(Duration::from_millis(500)).await;
    sampler.finish().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_candidates_race_for_a_new_lease_and_one_wins() {
    let api = KubeApi::start();
    let sampler = Sampler::start();
    let candidates: Vec<Candidate> = (0..5)
        .map(|i| Candidate::start(&api, config(&format!("pod-{i}"))))
        .collect();
    for c in &candidates {
        sampler.watch(&c.handle);
    }
    within(LIMIT, "some leader", async {
        while !candidates.iter().any(|c| c.handle.is_leader()) {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    sleep(Duration::from_secs(1)).await;
    let leaders: Vec<&str> = candidates
        .iter()
        .filter(|c| c.handle.is_leader())
        .map(|c| c.handle.identity())
        .collect();
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    assert_eq!(lease(&api)["spec"]["holderIdentity"], leaders[0]);
    sampler.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_renew_is_reread_and_the_leader_stays() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;
    let mut leader = a.handle.leader();
    leader.mark_unchanged();

    api.clear_requests();
    api.fail_next(1, 409, Match::path(PATH).method("PUT"));
    sleep(Duration::from_secs(1)).await;
    assert!(
        !leader.has_changed().unwrap(),
        "leadership flickered on a 409"
    );
    assert!(a.handle.is_leader());
    let requests: Vec<(String, Option<u16>)> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == PATH)
        .map(|r| (r.method, r.fault))
        .collect();
    let conflict = requests
        .iter()
        .position(|r| r.1 == Some(409))
        .expect("the injected conflict was hit");
    assert_eq!(
        requests[conflict + 1..conflict + 3],
        [("GET".to_owned(), None), ("PUT".to_owned(), None)],
        "a 409 is followed by a read and a renewal: {requests:?}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_another_is_given_up_at_once_and_retaken_after_it_expires() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;

    // Someone else writes the Lease (as if it had won): pod-a's next renewal
    // meets a 409, reads the Lease and steps down.
    let mut intruded = lease(&api);
    intruded["metadata"]["resourceVersion"] = Value::Null;
    intruded["spec"] = json!({
        "holderIdentity": "intruder", "leaseDurationSeconds": 2,
        "acquireTime": micro_now(), "renewTime": micro_now(), "leaseTransitions": 5,
    });
    let at = Instant::now();
    api.put_object(intruded);
    a.until_follower(RETRY + SLACK, "pod-a to give up the Lease")
        .await;
    assert!(at.elapsed() < RETRY + SLACK);
    assert_eq!(
        a.handle.state().borrow().holder.as_deref(),
        Some("intruder")
    );
    assert_eq!(
        a.handle.set_annotation("ebb.io/x", "1"),
        Err(AnnotationError::NotLeader)
    );

    // The intruder never renews: pod-a takes over once it expired.
    sleep(LEASE - SLACK).await;
    assert!(!a.handle.is_leader(), "taken over before the Lease expired");
    a.until_leader(LEASE + SLACK, "pod-a to take the expired Lease back")
        .await;
    assert_eq!(lease(&api)["spec"]["holderIdentity"], "pod-a");
    assert_eq!(lease(&api)["spec"]["leaseTransitions"], 6);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_beyond_the_renew_deadline_lose_leadership() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;
    sleep(Duration::from_millis(300)).await;

    let failing = Instant::now();
    api.fail_next(10_000, 500, Match::path(PATH).method("PUT"));
    // A change waiting to be written does not turn retries into a busy loop.
    a.handle.set_annotation("ebb.io/pending", "1").unwrap();
    // The last good renewal was at most a retry period ago: leadership lasts
    // until renew_deadline after it.
    sleep(RENEW - RETRY - Duration::from_millis(100)).await;
    assert!(
        a.handle.is_leader(),
        "stepped down before the renew deadline"
    );
    a.until_follower(RETRY + SLACK, "pod-a to step down").await;
    let lasted = failing.elapsed();
    assert!(
        lasted <= RENEW + SLACK,
        "still leader {lasted:?} after renewals started failing"
    );
    let failed = api
        .requests()
        .iter()
        .filter(|r| r.fault == Some(500))
        .count();
    assert!(
        (3..=8).contains(&failed),
        "{failed} failed renewals in {lasted:?}: retried once per retry period"
    );
    assert_eq!(a.handle.pending_annotations(), 0, "dropped with the term");

    // The API recovers: the Lease still names pod-a, which takes it up again
    // (a renewal: no transition).
    api.clear_faults();
    a.until_leader(RETRY + SLACK, "pod-a to lead again").await;
    let spec = lease(&api)["spec"].clone();
    assert_eq!(spec["holderIdentity"], "pod-a");
    assert_eq!(spec["leaseTransitions"], 0);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_are_batched_with_renewals() {
    let api = KubeApi::start();
    // Renewals once a second, so the count of writes is all about batching.
    let slow = LeaseConfig {
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_secs(1),
        ..config("pod-a")
    };
    let a = Candidate::start(&api, slow);
    a.until_leader(LIMIT, "pod-a to lead").await;
    sleep(Duration::from_millis(300)).await;

    api.clear_requests();
    let writers = hammer(&a.handle, 20, Duration::from_secs(2));
    for writer in writers {
        writer.await.expect("writer");
    }
    let writes = lease_writes(&api);
    assert!(
        writes.len() <= 3,
        "{} writes of the Lease in 2 s of set_annotation calls",
        writes.len()
    );
    let with_annotations = writes
        .iter()
        .filter(|w| w.json()["metadata"]["annotations"].is_object())
        .count();
    assert!(with_annotations >= 1);

    within(LIMIT, "the last changes to be written", async {
        while a.handle.pending_annotations() > 0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let on_lease = read_annotations(api.client(), NS, NAME)
        .await
        .expect("read");
    assert_eq!(on_lease, a.handle.annotations());
    assert_eq!(on_lease.len(), 20);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_changes_are_coalesced_to_one_write_a_second() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;

    api.clear_requests();
    let writers = hammer(&a.handle, 20, Duration::from_secs(2));
    for writer in writers {
        writer.await.expect("writer");
    }
    // Renewals go on every 200 ms; only some of them carry changes.
    let writes = lease_writes(&api);
    let mut changes = 0;
    let mut previous = Value::Null;
    for write in &writes {
        let annotations = write.json()["metadata"]["annotations"].clone();
        if annotations != previous {
            changes += 1;
        }
        previous = annotations;
    }
    assert!(writes.len() >= 6, "{} renewals", writes.len());
    assert!(
        changes <= 3,
        "{changes} of {} writes changed annotations in 2 s",
        writes.len()
    );
    a.stop().await;
}

/// `tasks` tasks each set their own `ebb.io/last-fired.shop.fn-N` to a new
/// RFC 3339 instant every 10 ms, for `period`.
fn hammer(handle: &LeaderHandle, tasks: usize, period: Duration) -> Vec<JoinHandle<()>> {
    (0..tasks)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move {
                let key = annotation_key("ebb.io/last-fired", &format!("shop/fn-{i}"));
                let end = Instant::now() + period;
                let mut n = 0_i64;
                while Instant::now() < end {
                    let at = Timestamp::from_second(1_800_000_000 + n).unwrap();
                    handle
                        .set_annotation(key.clone(), at.to_string())
                        .expect("the leader may write");
                    n += 1;
                    sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_leader_finds_the_annotations_after_a_crash_and_after_a_release() {
    let api = KubeApi::start();
    let a = Candidate::start(&api, config("pod-a"));
    a.until_leader(LIMIT, "pod-a to lead").await;
    let b = Candidate::start(&api, config("pod-b"));

    assert_eq!(
        b.handle.set_annotation("ebb.io/last-fired.shop.a", "x"),
        Err(AnnotationError::NotLeader)
    );
    assert!(matches!(
        a.handle.set_annotation("not a key", "x"),
        Err(AnnotationError::InvalidKey(_))
    ));
    let key_a = annotation_key("ebb.io/last-fired", "shop/a");
    let key_b = annotation_key("ebb.io/last-fired", "shop/b");
    a.handle
        .set_annotation(&key_a, "2026-11-25T10:00:00Z")
        .unwrap();
    a.handle
        .set_annotation(&key_b, "2026-11-25T10:00:05Z")
        .unwrap();
    within(LIMIT, "the annotations to be written", async {
        while a.handle.pending_annotations() > 0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let written = a.handle.annotations();

    // Crash after the write: pod-b finds them on taking over.
    a.crash().await;
    b.until_leader(LEASE + RETRY + SLACK, "pod-b to take over")
        .await;
    let state = b.handle.state().borrow().clone();
    assert_eq!(*state.annotations, written);
    assert_eq!(b.handle.annotations(), written);

    // A change, then a release right away (within the annotation interval):
    // the release carries it to pod-c.
    let c = Candidate::start(&api, config("pod-c"));
    b.handle
        .set_annotation(&key_a, "2026-11-25T10:00:30Z")
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.handle.pending_annotations(),
        0,
        "the first change of a term is written at once"
    );
    b.handle.remove_annotation(&key_b).unwrap();
    b.handle
        .set_annotation(&key_a, "2026-11-25T10:01:00Z")
        .unwrap();
    assert_eq!(b.handle.pending_annotations(), 2);
    b.stop().await;
    c.until_leader(RETRY + SLACK, "pod-c to take over").await;
    let expected = BTreeMap::from([(key_a.clone(), "2026-11-25T10:01:00Z".to_owned())]);
    assert_eq!(*c.handle.state().borrow().annotations, expected);
    assert_eq!(
        read_annotations(api.client(), NS, NAME).await.unwrap(),
        expected
    );
    c.stop().await;
}
