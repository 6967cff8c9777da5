//! Every branch of [`Engine::deliver`], without brokers, on tokio's paused
//! clock.
//!
//! A fake [`Delivery`], a fake [`DeadLetterSink`] and a scripted function
//! (an axum server on loopback, in the test's runtime) write what happens,
//! and at which paused instant, into one [`Timeline`]; each test asserts on
//! that timeline and on the engine's metrics. Nothing sleeps in real time.
//!
//! The function's per-call timeout is an hour unless a test is about it:
//! with the clock paused, tokio jumps to the next timer whenever the runtime
//! has nothing to do, so a short timer could fire while loopback bytes are
//! still on their way; a timer an hour away can only fire if the test is
//! broken anyway.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::Path;
use axum::response::IntoResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::*;
use crate::metrics::ErrorLabels;

const FUNCTION: &str = "default/f";
const DEAD: &str = "ebb.dead.default.f";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------
// One timeline for the delivery, the dead-letter sink and the function.

/// What happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// The function got a call with this `ebb-attempt`.
    Call(u32),
    Reply(Bytes),
    Ack,
    RetryLater(Duration),
    InProgress,
    Release,
    Terminate,
    /// A dead-letter publish, and whether the sink stored it.
    Publish {
        ok: bool,
    },
    /// Handed back to the source, to come again as this attempt after this wait.
    Requeue(u32, Duration),
}

/// Steps with the paused instant of each, relative to the test's start.
#[derive(Clone)]
struct Timeline {
    start: Instant,
    steps: Arc<Mutex<Vec<(Duration, Step)>>>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            steps: Arc::default(),
        }
    }

    fn push(&self, step: Step) {
        let at = Instant::now() - self.start;
        self.steps.lock().unwrap().push((at, step));
    }

    fn steps(&self) -> Vec<(Duration, Step)> {
        self.steps.lock().unwrap().clone()
    }

    /// The steps without their instants.
    fn kinds(&self) -> Vec<Step> {
        self.steps().into_iter().map(|(_, s)| s).collect()
    }

    /// When each step matching `which` happened.
    fn when(&self, which: impl Fn(&Step) -> bool) -> Vec<Duration> {
        self.steps()
            .into_iter()
            .filter(|(_, s)| which(s))
            .map(|(at, _)| at)
            .collect()
    }

    /// Time since the test's start.
    fn now(&self) -> Duration {
        Instant::now() - self.start
    }
}

// ---------------------------------------------------------------------------
// A source's delivery handle.

/// Which settlement a [`Fake`] delivery refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    RetryLater,
    Release,
    Terminate,
}

struct Fake {
    attempt: u32,
    redelivers: bool,
    progress: Option<Duration>,
    max_unacked: Option<Duration>,
    not_before: Option<Duration>,
    fails: Vec<Settle>,
    tl: Timeline,
}

impl Fake {
    /// A source that keeps its message while the engine retries (Kafka,
    /// cron, core NATS), first delivery.
    fn new(tl: &Timeline) -> Self {
        Self {
            attempt: 1,
            redelivers: false,
            progress: None,
            max_unacked: None,
            not_before: None,
            fails: Vec::new(),
            tl: tl.clone(),
        }
    }

    /// A source that must not keep a message unacked longer (RabbitMQ).
    fn max_unacked(mut self, max: Duration) -> Self {
        self.max_unacked = Some(max);
        self
    }

    /// A requeued message with this much of its retry pause left.
    fn not_before(mut self, wait: Duration) -> Self {
        self.not_before = Some(wait);
        self
    }

    /// A source that redelivers what is given back with a delay (JetStream).
    fn redelivering(mut self) -> Self {
        self.redelivers = true;
        self
    }

    /// The broker's delivery count.
    fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    fn progress(mut self, every: Duration) -> Self {
        self.progress = Some(every);
        self
    }

    fn failing(mut self, settle: Settle) -> Self {
        self.fails.push(settle);
        self
    }

    fn settle(&self, step: Step, kind: Option<Settle>) -> Result<(), Error> {
        self.tl.push(step);
        match kind {
            Some(k) if self.fails.contains(&k) => Err(Error::Ack(format!("{k:?} refused"))),
            _ => Ok(()),
        }
    }
}

impl Delivery for Fake {
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn redelivers(&self) -> bool {
        self.redelivers
    }
    fn progress_interval(&self) -> Option<Duration> {
        self.progress
    }
    async fn ack(&mut self) -> Result<(), Error> {
        self.settle(Step::Ack, Some(Settle::Ack))
    }
    async fn retry_later(&mut self, delay: Duration) -> Result<(), Error> {
        self.settle(Step::RetryLater(delay), Some(Settle::RetryLater))
    }
    async fn in_progress(&mut self) -> Result<(), Error> {
        self.settle(Step::InProgress, None)
    }
    async fn release(&mut self) -> Result<(), Error> {
        self.settle(Step::Release, Some(Settle::Release))
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        self.settle(Step::Terminate, Some(Settle::Terminate))
    }
    async fn reply(&mut self, body: Bytes) -> Result<(), Error> {
        self.settle(Step::Reply(body), None)
    }
    fn max_unacked(&self) -> Option<Duration> {
        self.max_unacked
    }
    fn not_before(&self) -> Option<Duration> {
        self.not_before
    }
    async fn requeue(&mut self, attempt: u32, after: Duration) -> Result<(), Error> {
        self.settle(Step::Requeue(attempt, after), None)
    }
}

// ---------------------------------------------------------------------------
// A dead-letter sink.

struct Published {
    destination: String,
    headers: HeaderMap,
    body: Bytes,
}

struct Sink {
    tl: Timeline,
    /// Publishes still to refuse.
    fail_first: AtomicUsize,
    can_retry: bool,
    stored: Mutex<Vec<Published>>,
}

impl Sink {
    fn new(tl: &Timeline) -> Self {
        Self {
            tl: tl.clone(),
            fail_first: AtomicUsize::new(0),
            can_retry: true,
            stored: Mutex::default(),
        }
    }

    fn failing_first(self, n: usize) -> Self {
        self.fail_first.store(n, Ordering::SeqCst);
        self
    }

    /// A sink that can never store anything (like [`NoDeadLetters`]).
    fn broken(mut self) -> Self {
        self.fail_first.store(usize::MAX, Ordering::SeqCst);
        self.can_retry = false;
        self
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, Vec<Published>> {
        self.stored.lock().unwrap()
    }
}

impl DeadLetterSink for Sink {
    async fn publish(&self, topic: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        let fail = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        self.tl.push(Step::Publish { ok: !fail });
        if fail {
            return Err(Error::DeadLetter("the broker is down".into()));
        }
        self.stored().push(Published {
            destination: topic.to_string(),
            headers,
            body,
        });
        Ok(())
    }
    fn can_retry(&self) -> bool {
        self.can_retry
    }
}

// ---------------------------------------------------------------------------
// The function, the autoscaler and the replicas.

/// One scripted answer of the function.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
    after: Duration,
}

fn answer(status: u16) -> Answer {
    Answer {
        status,
        headers: Vec::new(),
        body: "",
        after: Duration::ZERO,
    }
}

impl Answer {
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn body(mut self, body: &'static str) -> Self {
        self.body = body;
        self
    }
    /// Answers only after this long (paused time).
    fn after(mut self, after: Duration) -> Self {
        self.after = after;
        self
    }
}

async fn serve_on(listener: tokio::net::TcpListener, router: axum::Router) {
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

/// A path that only this test calls. Other ebb processes on the machine (a
/// developer's `ebb dev`, another checkout's tests) may still scrape or call
/// a loopback port that has since been given to this test's server; their
/// requests get 404 and are not recorded.
fn unique_path(prefix: &str) -> String {
    format!("/{prefix}-{:016x}", rand::random::<u64>())
}

/// The function's router, serving `path`: answers the script in order, then
/// its last answer again; every call is a [`Step::Call`] with its `ebb-attempt`.
fn function_router(tl: &Timeline, script: Vec<Answer>, path: &str) -> axum::Router {
    assert!(!script.is_empty());
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let tl = tl.clone();
    let handler = move |req: axum::extract::Request| {
        let (script, tl) = (script.clone(), tl.clone());
        async move {
            let attempt = req
                .headers()
                .get("ebb-attempt")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            tl.push(Step::Call(attempt));
            let a = {
                let mut s = script.lock().unwrap();
                if s.len() > 1 {
                    s.pop_front().unwrap()
                } else {
                    s[0].clone()
                }
            };
            tokio::time::sleep(a.after).await;
            let mut resp = (
                http::StatusCode::from_u16(a.status).unwrap(),
                a.body.to_string(),
            )
                .into_response();
            for (k, v) in a.headers {
                resp.headers_mut()
                    .insert(k, http::HeaderValue::from_static(v));
            }
            resp
        }
    };
    axum::Router::new().route(path, axum::routing::any(handler))
}

/// Starts the function; its URL.
async fn function(tl: &Timeline, script: Vec<Answer>) -> String {
    let path = unique_path("f");
    let (l, base) = listener().await;
    serve_on(l, function_router(tl, script, &path)).await;
    format!("{base}{path}")
}

/// An autoscaler that counts `POST /wake/{ns}/{fn}`.
#[derive(Clone, Default)]
struct Autoscaler {
    wakes: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Autoscaler {
    async fn start(tl: &Timeline) -> (Self, String) {
        let a = Self::default();
        let (wakes, start) = (a.wakes.clone(), tl.start);
        let prefix = unique_path("autoscaler");
        let router = axum::Router::new().route(
            &format!("{prefix}/wake/{{ns}}/{{name}}"),
            axum::routing::post(move |Path((ns, name)): Path<(String, String)>| {
                let wakes = wakes.clone();
                async move {
                    wakes
                        .lock()
                        .unwrap()
                        .push((Instant::now() - start, format!("{ns}/{name}")));
                    http::StatusCode::ACCEPTED
                }
            }),
        );
        let (l, base) = listener().await;
        serve_on(l, router).await;
        (a, format!("{base}{prefix}"))
    }

    fn wakes(&self) -> Vec<(Duration, String)> {
        self.wakes.lock().unwrap().clone()
    }
}

/// The function's replicas as the engine picks them (`ebb dev`): none until
/// the test sets one.
#[derive(Default)]
struct Replicas {
    ready: watch::Sender<Option<http::Uri>>,
    picks: AtomicUsize,
}

impl Replicas {
    fn set(&self, url: &str) {
        self.ready.send_replace(Some(url.parse().unwrap()));
    }
    fn unset(&self) {
        self.ready.send_replace(None);
    }
    fn picks(&self) -> usize {
        self.picks.load(Ordering::SeqCst)
    }
}

impl Endpoints for Replicas {
    fn pick(&self) -> Option<http::Uri> {
        self.picks.fetch_add(1, Ordering::SeqCst);
        self.ready.borrow().clone()
    }
    fn ready(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.ready.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(Option::is_some).await;
        })
    }
}

struct Only(Arc<Replicas>);

impl Resolve for Only {
    fn endpoints(&self, _: &FunctionSpec) -> Option<Arc<dyn Endpoints>> {
        Some(self.0.clone())
    }
}

// ---------------------------------------------------------------------------
// The engine.

/// The function `default/f` at `url`, dead letters to [`DEAD`].
fn spec(url: &str) -> FunctionSpec {
    let mut f = FunctionSpec::new("f", "default");
    f.url = Some(url.to_string());
    f.timeout = secs(3600);
    f.dead_letter = Some(DEAD.to_string());
    f
}

/// Backoff 1 s doubling to 60 s, hold timeout 5 min.
fn config() -> EngineConfig {
    EngineConfig {
        backoff: Backoff {
            base: secs(1),
            cap: secs(60),
        },
        ..EngineConfig::default()
    }
}

/// The engine and its function, and the dead-letter sink the engine is
/// given, on the test's timeline.
struct Setup {
    engine: Engine,
    target: Arc<Target>,
    sink: Sink,
}

fn setup(
    tl: &Timeline,
    spec: FunctionSpec,
    config: EngineConfig,
    autoscaler: Option<String>,
) -> Setup {
    let engine = Engine::new(
        config,
        autoscaler,
        Metrics::register(&mut Registry::default()),
        CancellationToken::new(),
    )
    .unwrap();
    let target = engine.target(Arc::new(spec)).unwrap();
    Setup {
        engine,
        target,
        sink: Sink::new(tl),
    }
}

/// A new timeline, a function answering `script` at its own URL, and an
/// engine calling it with [`config`]: where most tests start.
async fn calling(script: Vec<Answer>) -> (Timeline, Setup) {
    calling_with(script, |_| {}).await
}

/// [`calling`], with the function's settings changed by `edit` first.
async fn calling_with(
    script: Vec<Answer>,
    edit: impl FnOnce(&mut FunctionSpec),
) -> (Timeline, Setup) {
    let tl = Timeline::new();
    let url = function(&tl, script).await;
    let mut f = spec(&url);
    edit(&mut f);
    let s = setup(&tl, f, config(), None);
    (tl, s)
}

/// An engine that picks among `replicas` instead of calling a URL.
fn setup_replicas(
    tl: &Timeline,
    mut config: EngineConfig,
    replicas: &Arc<Replicas>,
    autoscaler: Option<String>,
) -> Setup {
    config.resolver = Some(Resolver(Arc::new(Only(replicas.clone()))));
    let mut f = spec("http://127.0.0.1:9/");
    f.url = None;
    setup(tl, f, config, autoscaler)
}

/// A function that answers 200 but has no ready replica yet, behind an
/// autoscaler: where the held tests start. Answers a new timeline, the
/// engine, the replicas, the function's URL and the autoscaler.
async fn held() -> (Timeline, Setup, Arc<Replicas>, String, Autoscaler) {
    let tl = Timeline::new();
    let (autoscaler, autoscaler_url) = Autoscaler::start(&tl).await;
    let url = function(&tl, vec![answer(200)]).await;
    let replicas = Arc::new(Replicas::default());
    let s = setup_replicas(&tl, config(), &replicas, Some(autoscaler_url));
    (tl, s, replicas, url, autoscaler)
}

impl Setup {
    /// This setup with `sink` in place of its dead-letter sink.
    fn with_sink(self, sink: Sink) -> Self {
        Self { sink, ..self }
    }

    async fn deliver(&self, d: Fake) {
        self.engine
            .deliver(&self.target, &event(), d, &self.sink)
            .await;
    }

    fn outcome(&self, outcome: &'static str) -> u64 {
        let function = FUNCTION.into();
        count(
            &self.engine.metrics().deliveries,
            OutcomeLabels { function, outcome },
        )
    }

    fn calls(&self, outcome: &'static str) -> u64 {
        let function = FUNCTION.into();
        count(
            &self.engine.metrics().attempts,
            OutcomeLabels { function, outcome },
        )
    }

    fn holds(&self, reason: &'static str) -> u64 {
        let function = FUNCTION.into();
        count(
            &self.engine.metrics().holds,
            ReasonLabels { function, reason },
        )
    }

    fn per_function(&self, family: &Family<FunctionLabels, Counter>) -> u64 {
        let function = FUNCTION.into();
        count(family, FunctionLabels { function })
    }

    fn retries(&self) -> u64 {
        self.per_function(&self.engine.metrics().retries)
    }

    fn dead_letters(&self) -> u64 {
        self.per_function(&self.engine.metrics().dead_letters)
    }

    fn wakeups(&self) -> u64 {
        self.per_function(&self.engine.metrics().wakeups)
    }

    fn errors(&self, error: &'static str) -> u64 {
        count(&self.engine.metrics().errors, ErrorLabels { error })
    }

    fn inflight(&self) -> i64 {
        self.engine
            .metrics()
            .inflight
            .get_or_create(&FunctionLabels {
                function: FUNCTION.into(),
            })
            .get()
    }
}

/// The count of `family` for `labels`.
fn count<L>(family: &Family<L, Counter>, labels: L) -> u64
where
    L: Clone + std::hash::Hash + Eq,
{
    family.get_or_create(&labels).get()
}

fn event() -> Event {
    let mut headers = HeaderMap::new();
    headers.insert("x-custom", http::HeaderValue::from_static("kept"));
    Event {
        id: "ev-42".into(),
        source: "/ebb/test/orders".into(),
        kind: "io.ebb.test.message".into(),
        topic: "orders".into(),
        time: chrono::Utc::now(),
        headers,
        body: Bytes::from_static(b"payload"),
        position: "stream EBB sequence 42".into(),
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} header in {h:?}"))
        .to_str()
        .unwrap()
}

/// A call with this attempt number, answered 2xx with `body` and acked, all
/// at `at`.
fn replied(at: Duration, attempt: u32, body: &'static [u8]) -> [(Duration, Step); 3] {
    [
        (at, Step::Call(attempt)),
        (at, Step::Reply(Bytes::from_static(body))),
        (at, Step::Ack),
    ]
}

/// [`replied`] with no body.
fn delivered(at: Duration, attempt: u32) -> [(Duration, Step); 3] {
    replied(at, attempt, b"")
}

/// A call with this attempt number given up: its dead letter published
/// (`stored` or not), then the event settled by `then`.
fn dead_letter_then(attempt: u32, stored: bool, then: Step) -> [Step; 3] {
    [Step::Call(attempt), Step::Publish { ok: stored }, then]
}

/// The one delay of the one `RetryLater` among `steps`.
fn retry_delay(steps: &[Step]) -> Duration {
    match steps {
        [.., Step::RetryLater(d)] => *d,
        other => panic!("expected a retry-later last, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Delivered.

#[tokio::test(start_paused = true)]
async fn a_2xx_is_acked_once_and_counted_delivered() {
    let (tl, s) = calling(vec![answer(200).body("done")]).await;

    s.deliver(Fake::new(&tl).redelivering()).await;

    assert_eq!(tl.steps(), replied(ms(0), 1, b"done"));
    assert_eq!(s.outcome("delivered"), 1);
    assert_eq!(s.calls("ok"), 1);
    assert_eq!(s.calls("failed"), 0);
    assert_eq!(s.retries(), 0);
    assert_eq!(s.inflight(), 0);
    assert!(s.sink.stored().is_empty());
}

// ---------------------------------------------------------------------------
// 2. Failed, retried.

#[tokio::test(start_paused = true)]
async fn a_failure_with_a_redelivering_source_is_given_back_with_the_backoff_delay() {
    let (tl, s) = calling(vec![answer(500)]).await;

    // The broker's third delivery: the engine numbers the call 3 and backs
    // off as after a third failure (1 s × 2², full jitter).
    s.deliver(Fake::new(&tl).redelivering().attempt(3)).await;

    let kinds = tl.kinds();
    assert_eq!(kinds[..kinds.len() - 1], [Step::Call(3)]);
    let delay = retry_delay(&kinds);
    assert!(delay <= secs(4), "{delay:?}");
    // Given back at once: the broker waits, not the engine.
    assert_eq!(tl.now(), ms(0));
    assert_eq!(s.calls("failed"), 1);
    assert_eq!(s.retries(), 1);
    assert_eq!(s.outcome("delivered"), 0);
    assert!(s.sink.stored().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failure_with_a_source_that_does_not_redeliver_waits_the_backoff_and_calls_again() {
    let (tl, s) = calling(vec![answer(503), answer(500), answer(200)]).await;

    s.deliver(Fake::new(&tl)).await;

    let kinds = tl.kinds();
    assert_eq!(
        kinds,
        [
            Step::Call(1),
            Step::Call(2),
            Step::Call(3),
            Step::Reply(Bytes::new()),
            Step::Ack,
        ]
    );
    let calls = tl.when(|s| matches!(s, Step::Call(_)));
    assert_eq!(calls[0], ms(0));
    // Full jitter: within [0, 1 s] after the first failure, [0, 2 s] after the second.
    assert!(calls[1] - calls[0] <= secs(1), "{calls:?}");
    assert!(calls[2] - calls[1] <= secs(2), "{calls:?}");
    // Acked as soon as the third call answered; nothing else waited.
    assert_eq!(tl.when(|s| *s == Step::Ack), [calls[2]]);
    assert_eq!(s.calls("failed"), 2);
    assert_eq!(s.retries(), 2);
    assert_eq!(s.outcome("delivered"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_past_the_function_timeout_is_a_failed_attempt() {
    let script = vec![answer(200).after(secs(60))];
    let (tl, s) = calling_with(script, |f| f.timeout = secs(10)).await;

    s.deliver(Fake::new(&tl).redelivering()).await;

    let steps = tl.steps();
    assert_eq!(steps[0], (ms(0), Step::Call(1)));
    assert!(
        matches!(steps[1], (at, Step::RetryLater(_)) if at == secs(10)),
        "{steps:?}"
    );
    assert_eq!(steps.len(), 2);
    assert_eq!(s.calls("failed"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_broken_connection_is_a_failed_attempt_and_a_broken_2xx_body_is_delivered() {
    // A function that reads the request, answers `reply` and hangs up.
    async fn raw(reply: &'static [u8]) -> String {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = l.accept().await else {
                    return;
                };
                let mut buf = vec![0; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(reply).await;
            }
        });
        url
    }

    let tl = Timeline::new();
    let hung_up = raw(b"").await;
    let s = setup(&tl, spec(&hung_up), config(), None);
    s.deliver(Fake::new(&tl).redelivering()).await;
    let kinds = tl.kinds();
    assert!(matches!(kinds[..], [Step::RetryLater(_)]), "{kinds:?}");
    assert_eq!(s.calls("failed"), 1);
    assert_eq!(s.holds("no_replica"), 0);

    let tl = Timeline::new();
    let cut = raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
    let s = setup(&tl, spec(&cut), config(), None);
    s.deliver(Fake::new(&tl).redelivering()).await;
    assert_eq!(tl.kinds(), [Step::Reply(Bytes::new()), Step::Ack]);
    assert_eq!(s.outcome("delivered"), 1);
}

// ---------------------------------------------------------------------------
// 3. Held: no replica, wake-up, delivered once one is ready.

#[tokio::test(start_paused = true)]
async fn with_no_replica_the_function_is_woken_and_the_event_delivered_once_one_is_ready() {
    let (tl, s, replicas, url, autoscaler) = held().await;

    tokio::join!(s.deliver(Fake::new(&tl).redelivering()), async {
        tokio::time::sleep(secs(3)).await;
        replicas.set(&url);
    });

    // Called the moment the replica was ready, as attempt 1: holds are not attempts.
    assert_eq!(tl.steps(), delivered(secs(3), 1));
    let wakes = autoscaler.wakes();
    assert_eq!(
        wakes.first(),
        Some(&(ms(0), FUNCTION.to_string())),
        "{wakes:?}"
    );
    // At most one wake-up a second while held.
    assert!(wakes.len() <= 4, "{wakes:?}");
    assert!(
        wakes.windows(2).all(|w| w[1].0 - w[0].0 >= secs(1)),
        "{wakes:?}"
    );
    assert_eq!(s.wakeups(), wakes.len() as u64);
    assert!(s.holds("no_replica") > 0);
    assert_eq!(s.calls("failed"), 0);
    assert_eq!(s.retries(), 0);
    assert_eq!(s.outcome("delivered"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hold_right_after_a_delivery_wakes_at_once_then_at_most_once_a_second() {
    let (tl, s, replicas, url, autoscaler) = held().await;

    // At zero: woken; a replica comes up at 0.5 s and takes the event.
    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(ms(500)).await;
        replicas.set(&url);
    });
    // Back at zero within the second: a new cold start, woken at once; then
    // held until 3 s, woken again once a second has passed.
    replicas.unset();
    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(ms(2500)).await;
        replicas.set(&url);
    });

    let wakes = autoscaler.wakes();
    let at: Vec<Duration> = wakes.iter().map(|(at, _)| *at).collect();
    // The second hold calls at 0.5 s, then after pauses of 25 ms doubling:
    // its first call a second or more after its wake-up is at 2.075 s.
    assert_eq!(at, [ms(0), ms(500), ms(2075)]);
    assert_eq!(
        tl.steps(),
        [delivered(ms(500), 1), delivered(secs(3), 1)].concat()
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_a_hold_until_the_function_listens() {
    let tl = Timeline::new();
    let (autoscaler, autoscaler_url) = Autoscaler::start(&tl).await;
    // A port that refuses connections until the function listens on it.
    // Bound from the start, so that no test running alongside can take it
    // (a port freed and bound again later could be, and its server would
    // get this test's held calls).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let path = unique_path("f");
    let url = format!("http://{}{path}", socket.local_addr().unwrap());
    let s = setup(&tl, spec(&url), config(), Some(autoscaler_url));

    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(secs(3)).await;
        let l = socket.listen(16).unwrap();
        serve_on(l, function_router(&tl, vec![answer(200)], &path)).await;
    });

    assert_eq!(
        tl.kinds(),
        [Step::Call(1), Step::Reply(Bytes::new()), Step::Ack]
    );
    // Held calls retry on pauses doubling from 25 ms to 1 s: the first call
    // after the function came up.
    let at = tl.when(|s| *s == Step::Ack)[0];
    assert!(at > secs(3) && at <= secs(4), "{at:?}");
    let wakes = autoscaler.wakes();
    assert_eq!(
        wakes.first(),
        Some(&(ms(0), FUNCTION.to_string())),
        "{wakes:?}"
    );
    assert!(s.holds("no_replica") > 0);
    assert_eq!(s.calls("failed"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_workers_own_refusals_are_holds_not_attempts() {
    let tl = Timeline::new();
    let (autoscaler, autoscaler_url) = Autoscaler::start(&tl).await;
    let url = function(
        &tl,
        vec![
            answer(429).header(ebb_model::refusal::HEADER, ebb_model::refusal::BUSY),
            answer(503).header("ebb-worker", "draining"),
            answer(200),
        ],
    )
    .await;
    let s = setup(&tl, spec(&url), config(), Some(autoscaler_url));

    s.deliver(Fake::new(&tl).redelivering()).await;

    // Same attempt each time, on the hold's 25 ms then 50 ms pauses; never
    // given back to the broker.
    let steps = tl.steps();
    assert_eq!(
        steps[..2],
        [(ms(0), Step::Call(1)), (ms(25), Step::Call(1))]
    );
    assert_eq!(steps[2..], delivered(ms(75), 1));
    assert_eq!(s.holds("busy"), 1);
    assert_eq!(s.holds("draining"), 1);
    assert_eq!(s.calls("failed"), 0);
    // A busy worker is alive: no wake-up; a draining one may be the last.
    assert_eq!(s.wakeups(), 1);
    assert_eq!(autoscaler.wakes(), [(ms(25), FUNCTION.to_string())]);
}

// ---------------------------------------------------------------------------
// 4. A hold past the hold timeout is one failed attempt.

fn hold_config() -> EngineConfig {
    EngineConfig {
        hold_timeout: secs(10),
        ..config()
    }
}

/// When a hold that started at 0 gives up: its calls are at 0, then after
/// pauses of 25, 50, … ms, doubling to 1 s; the first call at or past the
/// hold timeout ends it.
const HOLD_TIMED_OUT: Duration = Duration::from_millis(10_575);

#[tokio::test(start_paused = true)]
async fn a_hold_past_the_hold_timeout_is_one_failed_attempt() {
    let tl = Timeline::new();
    let replicas = Arc::new(Replicas::default());
    let mut config = hold_config();
    config.backoff.base = secs(2);
    let s = setup_replicas(&tl, config, &replicas, None);

    s.deliver(Fake::new(&tl).redelivering()).await;

    let steps = tl.steps();
    let [(at, Step::RetryLater(delay))] = steps[..] else {
        panic!("{steps:?}")
    };
    assert_eq!(at, HOLD_TIMED_OUT);
    assert!(delay <= secs(2), "{delay:?}");
    assert_eq!(s.retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn after_a_hold_timeout_the_next_call_is_the_next_attempt() {
    let tl = Timeline::new();
    let url = function(&tl, vec![answer(200)]).await;
    let replicas = Arc::new(Replicas::default());
    let mut f = spec(&url);
    f.max_attempts = 2;
    let mut config = hold_config();
    config.resolver = Some(Resolver(Arc::new(Only(replicas.clone()))));
    let s = setup(&tl, f, config, None);
    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(secs(15)).await;
        replicas.set(&url);
    });

    assert_eq!(tl.steps(), delivered(secs(15), 2));
    assert_eq!(s.retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn holds_past_the_hold_timeout_exhaust_the_attempts() {
    let tl = Timeline::new();
    let replicas = Arc::new(Replicas::default());
    let s = {
        let mut config = hold_config();
        config.resolver = Some(Resolver(Arc::new(Only(replicas.clone()))));
        let mut f = spec("http://127.0.0.1:9/");
        f.max_attempts = 2;
        setup(&tl, f, config, None)
    };

    s.deliver(Fake::new(&tl)).await;

    let steps = tl.steps();
    assert_eq!(
        steps.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
        [Step::Publish { ok: true }, Step::Terminate]
    );
    // Two holds of 10.575 s with one backoff pause (≤ 1 s) between them.
    let at = steps[0].0;
    assert!(
        at >= HOLD_TIMED_OUT * 2 && at <= HOLD_TIMED_OUT * 2 + secs(1),
        "{at:?}"
    );
    let stored = s.sink.stored();
    let h = &stored[0].headers;
    assert_eq!(
        header(h, "ebb-dead-letter-reason"),
        "attempts exhausted (2 of 2, last: no ready replica within the hold timeout)"
    );
    assert_eq!(header(h, "ebb-attempts"), "2");
    assert_eq!(header(h, "ebb-last-status"), "none");
    assert_eq!(s.outcome("dead_lettered"), 1);
}

// ---------------------------------------------------------------------------
// 5. Retry-After.

#[tokio::test(start_paused = true)]
async fn retry_after_sets_the_delay_and_a_huge_one_is_capped_at_a_day() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    for (value, want) in [("7", secs(7)), ("999999999999", DAY)] {
        // A redelivering source: the broker waits exactly that long.
        let (tl, s) = calling(vec![answer(503).header("retry-after", value)]).await;
        s.deliver(Fake::new(&tl).redelivering()).await;
        assert_eq!(
            tl.kinds(),
            [Step::Call(1), Step::RetryLater(want)],
            "{value}"
        );

        // A source that does not redeliver: the engine waits exactly that long.
        let (tl, s) = calling(vec![answer(429).header("retry-after", value), answer(200)]).await;
        s.deliver(Fake::new(&tl)).await;
        let steps = tl.steps();
        assert_eq!(steps[0], (ms(0), Step::Call(1)), "{value}");
        assert_eq!(steps[1..], delivered(want, 2), "{value}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_pause_past_the_unacked_limit_requeues_as_the_next_attempt() {
    let (tl, s) = calling(vec![answer(503).header("retry-after", "600")]).await;
    s.deliver(Fake::new(&tl).max_unacked(secs(120))).await;
    // Handed back at once with the whole pause: never held unacked for it.
    assert_eq!(
        tl.steps(),
        [(ms(0), Step::Call(1)), (ms(0), Step::Requeue(2, secs(600)))]
    );
    assert_eq!(s.outcome("requeued"), 1);

    // A pause that fits stays in the engine.
    let (tl, s) = calling(vec![answer(503).header("retry-after", "7"), answer(200)]).await;
    s.deliver(Fake::new(&tl).max_unacked(secs(120))).await;
    assert_eq!(tl.when(|s| *s == Step::Call(2)), [secs(7)]);
    assert_eq!(s.outcome("requeued"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_requeued_message_waits_what_was_left_of_its_pause() {
    let (tl, s) = calling(vec![answer(200)]).await;
    let requeued = |tl: &Timeline, wait| {
        Fake::new(tl)
            .attempt(2)
            .max_unacked(secs(120))
            .not_before(wait)
    };
    s.deliver(requeued(&tl, secs(30))).await;
    assert_eq!(tl.when(|s| *s == Step::Call(2)), [secs(30)]);

    // Longer than the limit: handed back again, same attempt, what is left.
    let (tl, s) = calling(vec![answer(200)]).await;
    s.deliver(requeued(&tl, secs(500))).await;
    assert_eq!(tl.steps(), [(ms(0), Step::Requeue(2, secs(500)))]);
}

#[tokio::test(start_paused = true)]
async fn a_hold_past_the_unacked_limit_requeues_as_the_same_attempt() {
    let tl = Timeline::new();
    // Bound, never listening: every call is refused, a hold.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let url = format!("http://{}/f", socket.local_addr().unwrap());
    let mut cfg = config();
    cfg.hold_timeout = secs(3600);
    let s = setup(&tl, spec(&url), cfg, None);
    s.deliver(Fake::new(&tl).max_unacked(secs(10))).await;
    let steps = tl.steps();
    let (at, last) = steps.last().cloned().expect("a step");
    assert!(matches!(last, Step::Requeue(1, _)), "{steps:?}");
    assert!(at <= secs(10), "requeued within the limit: {steps:?}");
    assert_eq!(s.outcome("requeued"), 1);
}

// ---------------------------------------------------------------------------
// 6. Dead letters.

#[tokio::test(start_paused = true)]
async fn a_non_retryable_4xx_is_dead_lettered_with_its_reasons_then_terminated() {
    let (tl, s) = calling(vec![answer(422).body("bad\u{1}input")]).await;

    s.deliver(Fake::new(&tl).redelivering()).await;

    assert_eq!(tl.kinds(), dead_letter_then(1, true, Step::Terminate));
    let stored = s.sink.stored();
    let [dl] = &stored[..] else {
        panic!("one dead letter")
    };
    assert_eq!(dl.destination, DEAD);
    assert_eq!(dl.body, Bytes::from_static(b"payload"));
    let h = &dl.headers;
    assert_eq!(header(h, "ebb-dead-letter-reason"), "status 422");
    assert_eq!(header(h, "ebb-attempts"), "1");
    assert_eq!(header(h, "ebb-last-status"), "422");
    assert_eq!(header(h, "ebb-original-topic"), "orders");
    assert_eq!(header(h, "ebb-source-position"), "stream EBB sequence 42");
    assert_eq!(header(h, "ebb-event-id"), "ev-42");
    assert_eq!(header(h, "ebb-last-response"), "bad\\x01input");
    assert_eq!(header(h, "x-custom"), "kept");
    assert_eq!(s.dead_letters(), 1);
    assert_eq!(s.outcome("dead_lettered"), 1);
    assert_eq!(s.retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn exhausted_attempts_are_dead_lettered_then_terminated() {
    // The engine retries itself.
    let three = |f: &mut FunctionSpec| f.max_attempts = 3;
    let (tl, s) = calling_with(vec![answer(500).body("oops")], three).await;
    s.deliver(Fake::new(&tl)).await;
    assert_eq!(
        tl.kinds(),
        [
            Step::Call(1),
            Step::Call(2),
            Step::Call(3),
            Step::Publish { ok: true },
            Step::Terminate
        ]
    );
    let h = s.sink.stored()[0].headers.clone();
    assert_eq!(
        header(&h, "ebb-dead-letter-reason"),
        "attempts exhausted (3 of 3, last: status 500)"
    );
    assert_eq!(header(&h, "ebb-attempts"), "3");
    assert_eq!(header(&h, "ebb-last-status"), "500");
    assert_eq!(header(&h, "ebb-last-response"), "oops");
    assert_eq!(s.retries(), 2);

    // The broker's last delivery: one call, then the dead letter.
    let (tl, s) = calling_with(vec![answer(500)], three).await;
    s.deliver(Fake::new(&tl).redelivering().attempt(3)).await;
    assert_eq!(tl.kinds(), dead_letter_then(3, true, Step::Terminate));
    assert_eq!(s.outcome("dead_lettered"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_past_the_budget_is_dead_lettered_without_another_call() {
    let (tl, s) = calling_with(vec![answer(200)], |f| f.max_attempts = 2).await;
    s.deliver(Fake::new(&tl).redelivering().attempt(3)).await;
    assert_eq!(tl.kinds(), [Step::Publish { ok: true }, Step::Terminate]);
    let h = s.sink.stored()[0].headers.clone();
    assert_eq!(
        header(&h, "ebb-dead-letter-reason"),
        "attempts exhausted (2 of 2)"
    );
    assert_eq!(header(&h, "ebb-attempts"), "2");
    assert_eq!(s.outcome("dead_lettered"), 1);
}

#[tokio::test(start_paused = true)]
async fn with_dead_letters_off_a_given_up_event_is_dropped() {
    let (tl, s) = calling_with(vec![answer(400)], |f| {
        f.dead_letter = Some(ebb_model::NO_DEAD_LETTER.into())
    })
    .await;

    s.deliver(Fake::new(&tl).redelivering()).await;

    assert_eq!(tl.kinds(), [Step::Call(1), Step::Terminate]);
    assert_eq!(s.outcome("dropped"), 1);
    assert_eq!(s.dead_letters(), 0);

    // Without a `dead-letter` setting: the function's default destination.
    let (tl, s) = calling_with(vec![answer(400)], |f| f.dead_letter = None).await;
    s.deliver(Fake::new(&tl).redelivering()).await;
    assert_eq!(
        tl.kinds(),
        [Step::Call(1), Step::Publish { ok: true }, Step::Terminate]
    );
    assert_eq!(s.sink.stored()[0].destination, DEAD);
}

// ---------------------------------------------------------------------------
// 7. A dead letter that cannot be published.

#[tokio::test(start_paused = true)]
async fn a_failing_dead_letter_is_retried_until_stored_and_only_then_terminated() {
    let tl = Timeline::new();
    let url = function(&tl, vec![answer(400)]).await;
    let mut config = config();
    config.backoff.cap = secs(4);
    let s = setup(&tl, spec(&url), config, None);
    let s = s.with_sink(Sink::new(&tl).failing_first(4));

    s.deliver(Fake::new(&tl)).await;

    // Pauses from the backoff base, doubling up to its cap: 1, 2, 4, 4 s.
    assert_eq!(
        tl.steps(),
        [
            (secs(0), Step::Call(1)),
            (secs(0), Step::Publish { ok: false }),
            (secs(1), Step::Publish { ok: false }),
            (secs(3), Step::Publish { ok: false }),
            (secs(7), Step::Publish { ok: false }),
            (secs(11), Step::Publish { ok: true }),
            (secs(11), Step::Terminate),
        ]
    );
    assert_eq!(s.sink.stored().len(), 1);
    assert_eq!(s.errors("dead_letter"), 4);
    assert_eq!(s.outcome("dead_lettered"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_dead_letter_of_a_redelivering_source_is_given_back_never_terminated() {
    let (tl, s) = calling(vec![answer(400)]).await;
    let s = s.with_sink(Sink::new(&tl).failing_first(1));

    s.deliver(Fake::new(&tl).redelivering()).await;

    // Given back after the backoff cap, for the broker to try again.
    assert_eq!(
        tl.kinds(),
        [
            Step::Call(1),
            Step::Publish { ok: false },
            Step::RetryLater(secs(60)),
        ]
    );
    assert_eq!(s.outcome("dead_lettered"), 0);
    assert_eq!(s.errors("dead_letter"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_that_can_never_be_stored_releases_the_event() {
    let (tl, s) = calling(vec![answer(400)]).await;
    let s = s.with_sink(Sink::new(&tl).broken());

    s.deliver(Fake::new(&tl)).await;

    assert_eq!(tl.kinds(), dead_letter_then(1, false, Step::Release));
    assert_eq!(s.outcome("dead_lettered"), 0);
}

// ---------------------------------------------------------------------------
// 8. Stopping.

#[tokio::test(start_paused = true)]
async fn stopping_during_a_hold_releases_the_event_without_counting_an_attempt() {
    for redelivering in [false, true] {
        let tl = Timeline::new();
        let replicas = Arc::new(Replicas::default());
        let s = setup_replicas(&tl, config(), &replicas, None);
        let mut d = Fake::new(&tl);
        d.redelivers = redelivering;
        let mut picks_at_stop = 0;
        tokio::join!(s.deliver(d), async {
            tokio::time::sleep(secs(5)).await;
            picks_at_stop = replicas.picks();
            s.engine.stopping().cancel();
        });

        assert_eq!(tl.steps(), [(secs(5), Step::Release)], "{redelivering}");
        assert_eq!(replicas.picks(), picks_at_stop, "no call after the stop");
        assert_eq!(s.retries(), 0);
        assert_eq!(s.calls("failed"), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn stopping_during_a_backoff_pause_releases_the_event() {
    let (tl, s) = calling(vec![answer(503).header("retry-after", "30"), answer(200)]).await;
    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(secs(10)).await;
        s.engine.stopping().cancel();
    });

    assert_eq!(
        tl.steps(),
        [(secs(0), Step::Call(1)), (secs(10), Step::Release)]
    );
}

#[tokio::test(start_paused = true)]
async fn stopping_while_a_dead_letter_is_retried_releases_the_event() {
    let (tl, s) = calling(vec![answer(400)]).await;
    let s = s.with_sink(Sink::new(&tl).failing_first(usize::MAX));

    tokio::join!(s.deliver(Fake::new(&tl)), async {
        tokio::time::sleep(secs(2)).await;
        s.engine.stopping().cancel();
    });

    assert_eq!(
        tl.steps(),
        [
            (secs(0), Step::Call(1)),
            (secs(0), Step::Publish { ok: false }),
            (secs(1), Step::Publish { ok: false }),
            (secs(2), Step::Release),
        ]
    );
}

// ---------------------------------------------------------------------------
// 9. Extending the broker's deadline.

#[tokio::test(start_paused = true)]
async fn a_long_call_extends_the_deadline_every_progress_interval() {
    let (tl, s) = calling(vec![answer(200).after(secs(17))]).await;

    s.deliver(Fake::new(&tl).redelivering().progress(secs(5)))
        .await;

    assert_eq!(
        tl.steps(),
        [
            (secs(0), Step::Call(1)),
            (secs(5), Step::InProgress),
            (secs(10), Step::InProgress),
            (secs(15), Step::InProgress),
            (secs(17), Step::Reply(Bytes::new())),
            (secs(17), Step::Ack),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_hold_extends_the_deadline_across_its_short_pauses() {
    let tl = Timeline::new();
    let url = function(&tl, vec![answer(200)]).await;
    let replicas = Arc::new(Replicas::default());
    let s = setup_replicas(&tl, config(), &replicas, None);
    tokio::join!(
        s.deliver(Fake::new(&tl).redelivering().progress(secs(5))),
        async {
            tokio::time::sleep(secs(62)).await;
            replicas.set(&url);
        }
    );

    // Every pause of a hold is 1 s at most, yet the deadline is extended
    // every 5 s.
    let extended = tl.when(|s| *s == Step::InProgress);
    assert_eq!(extended, (1..=12).map(|n| secs(5 * n)).collect::<Vec<_>>());
    assert_eq!(tl.steps()[12..], delivered(secs(62), 1));
}

#[tokio::test(start_paused = true)]
async fn a_backoff_pause_extends_the_deadline() {
    let (tl, s) = calling(vec![answer(503).header("retry-after", "12"), answer(200)]).await;

    s.deliver(Fake::new(&tl).progress(secs(5))).await;

    let steps = tl.steps();
    assert_eq!(
        steps[..3],
        [
            (secs(0), Step::Call(1)),
            (secs(5), Step::InProgress),
            (secs(10), Step::InProgress),
        ]
    );
    assert_eq!(steps[3..], delivered(secs(12), 2));
}

// ---------------------------------------------------------------------------
// Settlements the source refuses.

#[tokio::test(start_paused = true)]
async fn a_refused_settlement_is_counted_and_never_turned_into_another() {
    // Ack refused: still delivered (the broker redelivers; at-least-once).
    let (tl, s) = calling(vec![answer(200)]).await;
    s.deliver(Fake::new(&tl).redelivering().failing(Settle::Ack))
        .await;
    assert_eq!(
        tl.kinds(),
        [Step::Call(1), Step::Reply(Bytes::new()), Step::Ack]
    );
    assert_eq!(s.errors("ack"), 1);
    assert_eq!(s.outcome("delivered"), 1);

    // Retry-later refused: nothing else (the broker redelivers after its ack wait).
    let (tl, s) = calling(vec![answer(500)]).await;
    s.deliver(Fake::new(&tl).redelivering().failing(Settle::RetryLater))
        .await;
    assert!(matches!(
        tl.kinds()[..],
        [Step::Call(1), Step::RetryLater(_)]
    ));
    assert_eq!(s.errors("nak"), 1);

    // Terminate refused after the dead letter was stored: it stays dead-lettered.
    let (tl, s) = calling(vec![answer(400)]).await;
    s.deliver(Fake::new(&tl).redelivering().failing(Settle::Terminate))
        .await;
    assert_eq!(tl.kinds(), dead_letter_then(1, true, Step::Terminate));
    assert_eq!(s.outcome("dead_lettered"), 1);

    // Release refused on stop: nothing else.
    let tl = Timeline::new();
    let replicas = Arc::new(Replicas::default());
    let s = setup_replicas(&tl, config(), &replicas, None);
    tokio::join!(s.deliver(Fake::new(&tl).failing(Settle::Release)), async {
        tokio::time::sleep(secs(1)).await;
        s.engine.stopping().cancel();
    });
    assert_eq!(tl.steps(), [(secs(1), Step::Release)]);
}
