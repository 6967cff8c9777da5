//! The in-memory bus of `ebb dev`: `POST /publish/{topic}` puts an event in
//! the queue of every function subscribed to the topic; one dispatcher per
//! function hands events to the shared delivery engine (retries, holds,
//! wake-ups, dead letters to another topic), as many at once as its ready
//! replicas allow. The dispatchers are a source run by the connectors'
//! supervisor, so the bus follows stack edits as every connector does.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use ebb_connectors::engine::{DeadLetterSink, InProcess, NoReply};
use ebb_connectors::event::Event;
use ebb_connectors::limit::Limit;
use ebb_connectors::routing::subject_matches;
use ebb_connectors::supervisor::{Consumer, ConsumerTask, Retired, Source};
use ebb_model::{Function, FunctionSpec};
use http::HeaderMap;
use tokio::sync::Notify;

use crate::replicas::Replicas;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "function {function} already has {max} events waiting; wait for it to catch up or raise --max-backlog"
    )]
    Full { function: String, max: usize },
    #[error("ebb dev is stopping")]
    Stopping,
}

/// What a publish did.
#[derive(Debug, serde::Serialize)]
pub struct Published {
    pub id: String,
    /// The functions that will receive it.
    pub functions: Vec<String>,
}

struct BusFn {
    spec: RwLock<Arc<FunctionSpec>>,
    queue: Mutex<VecDeque<Event>>,
    notify: Notify,
    inflight: AtomicUsize,
}

impl BusFn {
    fn backlog(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0) + self.inflight.load(Ordering::SeqCst)
    }
}

/// The bus: a queue per function, filled by [`Bus::publish`]; the
/// connectors' supervisor runs its dispatchers as a source ([`BusSource`]).
pub struct Bus {
    replicas: Arc<Replicas>,
    functions: RwLock<HashMap<String, Arc<BusFn>>>,
    seq: AtomicU64,
    max_backlog: usize,
    closed: AtomicBool,
    me: Weak<Bus>,
    /// Events published since start (dead letters included).
    pub published: AtomicU64,
}

impl Bus {
    pub fn new(replicas: Arc<Replicas>, max_backlog: usize) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            replicas,
            functions: RwLock::new(HashMap::new()),
            seq: AtomicU64::new(0),
            max_backlog: max_backlog.max(1),
            closed: AtomicBool::new(false),
            me: me.clone(),
            published: AtomicU64::new(0),
        })
    }

    /// The source that delivers the bus's events.
    pub fn source(self: &Arc<Self>) -> BusSource {
        BusSource(self.clone())
    }

    /// Publishes one event to every function subscribed to `topic`.
    pub fn publish(
        &self,
        topic: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Published, PublishError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(PublishError::Stopping);
        }
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        let mut to: Vec<&Arc<BusFn>> = Vec::new();
        let mut names = Vec::new();
        for (name, f) in map.iter() {
            let spec = f.spec.read().unwrap_or_else(|p| p.into_inner()).clone();
            if spec.topics.iter().any(|p| subject_matches(p, topic)) {
                if f.backlog() >= self.max_backlog {
                    return Err(PublishError::Full {
                        function: name.clone(),
                        max: self.max_backlog,
                    });
                }
                to.push(f);
                names.push(name.clone());
            }
        }
        names.sort();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("dev-{seq}");
        let event = Event {
            id: id.clone(),
            source: format!("/ebb/dev/{topic}"),
            kind: "io.ebb.dev.message".into(),
            topic: topic.to_string(),
            time: chrono::Utc::now(),
            headers,
            body,
            position: format!("dev bus sequence {seq}"),
        };
        for f in to {
            if let Ok(mut q) = f.queue.lock() {
                q.push_back(event.clone());
            }
            f.notify.notify_one();
        }
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(Published {
            id,
            functions: names,
        })
    }

    /// Events waiting for or in delivery to `name` (its backlog).
    pub fn backlog(&self, name: &str) -> Option<usize> {
        let map = self.functions.read().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|f| f.backlog())
    }

    /// Refuses further publishes (the process stops; the supervisor drains).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// The bus as a source: a function's "consumer" hands its queue's events to
/// the engine, as many at once as its ready replicas allow.
pub struct BusSource(Arc<Bus>);

impl Source for BusSource {
    fn name(&self) -> &'static str {
        "dev"
    }

    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>> {
        (!spec.topics.is_empty()).then_some(Ok(()))
    }

    fn own_limit(&self, f: &Function) -> Option<Arc<Limit>> {
        // A local function's calls are bounded by its ready replicas.
        (!f.spec.command.is_empty()).then(|| {
            self.0
                .replicas
                .endpoints_of(&f.spec.name, f.spec.max_inflight)
                .limit()
                .clone()
        })
    }

    async fn start(&mut self, c: Consumer) -> Result<ConsumerTask, ebb_connectors::Error> {
        // A restarted function keeps the events waiting for it.
        let f = {
            let mut map = self.0.functions.write().unwrap_or_else(|p| p.into_inner());
            map.entry(c.spec.name.clone())
                .or_insert_with(|| {
                    Arc::new(BusFn {
                        spec: RwLock::new(c.spec.clone()),
                        queue: Mutex::new(VecDeque::new()),
                        notify: Notify::new(),
                        inflight: AtomicUsize::new(0),
                    })
                })
                .clone()
        };
        *f.spec.write().unwrap_or_else(|p| p.into_inner()) = c.spec.clone();
        let bus = self.0.me.clone();
        Ok(Box::pin(async move {
            dispatch(bus, f, c).await;
            None
        }))
    }

    async fn refilter(
        &mut self,
        _old: &FunctionSpec,
        new: &FunctionSpec,
    ) -> Result<bool, ebb_connectors::Error> {
        let map = self.0.functions.read().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(&new.name) {
            *f.spec.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new.clone());
        }
        Ok(true)
    }

    async fn retire(
        &mut self,
        Retired { old, now }: Retired<'_>,
    ) -> Result<(), ebb_connectors::Error> {
        if now.is_some() {
            return Ok(());
        }
        let removed = self
            .0
            .functions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&old.name);
        let dropped = removed.map_or(0, |f| f.queue.lock().map(|q| q.len()).unwrap_or(0));
        if dropped > 0 {
            tracing::warn!(function = %old.name, dropped, "function removed; its waiting events are dropped");
        }
        Ok(())
    }
}

/// Dead letters go back onto the bus, to their topic.
struct BusDeadLetters(Weak<Bus>);

impl DeadLetterSink for BusDeadLetters {
    async fn publish(
        &self,
        topic: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), ebb_connectors::Error> {
        let bus = self
            .0
            .upgrade()
            .ok_or_else(|| ebb_connectors::Error::DeadLetter("the bus is gone".into()))?;
        match bus.publish(topic, headers, body) {
            Ok(p) => {
                if p.functions.is_empty() {
                    tracing::warn!(%topic, "dead letter published, but no function subscribes to its topic");
                }
                Ok(())
            }
            Err(e) => Err(ebb_connectors::Error::DeadLetter(e.to_string())),
        }
    }
}

/// Hands `f`'s events to the engine, as many at once as its limit allows.
async fn dispatch(bus: Weak<Bus>, f: Arc<BusFn>, c: Consumer) {
    let sink = Arc::new(BusDeadLetters(bus));
    loop {
        let Some(slots) = c.slots().await else {
            return;
        };
        let event = loop {
            let next = f.queue.lock().ok().and_then(|mut q| q.pop_front());
            if let Some(e) = next {
                break e;
            }
            tokio::select! {
                () = f.notify.notified() => {}
                () = c.stop.cancelled() => return,
            }
        };
        f.inflight.fetch_add(1, Ordering::SeqCst);
        let delivery = c.delivery(slots, event, InProcess::<NoReply>::new(None), sink.clone());
        let f = f.clone();
        c.tracker.spawn(async move {
            delivery.await;
            f.inflight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
