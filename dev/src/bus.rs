//! The in-memory bus of `ebb dev`: `POST /publish/{topic}` puts an event in
//! the queue of every function subscribed to the topic; one dispatcher per
//! function hands events to the shared delivery engine (retries, holds,
//! wake-ups, dead letters to another topic), as many at once as its ready
//! replicas allow.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use ebb_connectors::engine::{DeadLetterSink, Engine, InProcess, NoReply, Target};
use ebb_connectors::event::Event;
use ebb_connectors::limit::Limit;
use ebb_connectors::routing::subject_matches;
use ebb_model::FunctionSpec;
use http::HeaderMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    target: RwLock<Arc<Target>>,
    queue: Mutex<VecDeque<Event>>,
    notify: Notify,
    inflight: AtomicUsize,
    limit: Arc<Limit>,
    stop: CancellationToken,
}

impl BusFn {
    fn backlog(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or(0) + self.inflight.load(Ordering::SeqCst)
    }
}

/// The bus.
pub struct Bus {
    engine: Arc<Engine>,
    replicas: Arc<Replicas>,
    functions: RwLock<HashMap<String, Arc<BusFn>>>,
    seq: AtomicU64,
    max_backlog: usize,
    tracker: TaskTracker,
    me: Weak<Bus>,
    /// Events published since start (dead letters included).
    pub published: AtomicU64,
}

impl Bus {
    pub fn new(engine: Arc<Engine>, replicas: Arc<Replicas>, max_backlog: usize) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            engine,
            replicas,
            functions: RwLock::new(HashMap::new()),
            seq: AtomicU64::new(0),
            max_backlog: max_backlog.max(1),
            tracker: TaskTracker::new(),
            me: me.clone(),
            published: AtomicU64::new(0),
        })
    }

    /// Takes the functions of a (re)loaded stack: starts dispatchers of new
    /// functions, updates changed ones, stops removed ones.
    pub fn update(&self, functions: &[Arc<FunctionSpec>]) {
        let mut map = self.functions.write().unwrap_or_else(|p| p.into_inner());
        let keep: Vec<&str> = functions
            .iter()
            .filter(|f| !f.topics.is_empty())
            .map(|f| f.name.as_str())
            .collect();
        map.retain(|name, f| {
            let kept = keep.contains(&name.as_str());
            if !kept {
                f.stop.cancel();
                let dropped = f.queue.lock().map(|q| q.len()).unwrap_or(0);
                if dropped > 0 {
                    tracing::warn!(function = %name, dropped, "function removed; its waiting events are dropped");
                }
            }
            kept
        });
        for spec in functions.iter().filter(|f| !f.topics.is_empty()) {
            let target = match self.engine.target(spec.clone()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(function = %spec.name, error = %e, "cannot deliver to this function");
                    continue;
                }
            };
            if let Some(f) = map.get(&spec.name) {
                *f.spec.write().unwrap_or_else(|p| p.into_inner()) = spec.clone();
                *f.target.write().unwrap_or_else(|p| p.into_inner()) = target;
                if spec.command.is_empty() {
                    f.limit.set_max(spec.max_inflight.max(1) as usize);
                }
                continue;
            }
            let limit = if spec.command.is_empty() {
                Limit::new(spec.max_inflight.max(1) as usize)
            } else {
                self.replicas
                    .endpoints_of(&spec.name, spec.max_inflight)
                    .limit()
                    .clone()
            };
            let f = Arc::new(BusFn {
                spec: RwLock::new(spec.clone()),
                target: RwLock::new(target),
                queue: Mutex::new(VecDeque::new()),
                notify: Notify::new(),
                inflight: AtomicUsize::new(0),
                limit,
                stop: CancellationToken::new(),
            });
            map.insert(spec.name.clone(), f.clone());
            let bus = self.me.clone();
            self.tracker.spawn(dispatch(bus, f));
        }
    }

    /// Publishes one event to every function subscribed to `topic`.
    pub fn publish(
        &self,
        topic: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Published, PublishError> {
        if self.tracker.is_closed() {
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

    /// Stops taking events and waits for running deliveries (a held event
    /// is given up by the engine once it is told to stop).
    pub async fn shutdown(&self) {
        self.tracker.close();
        for f in self
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            f.stop.cancel();
        }
        self.tracker.wait().await;
    }
}

/// Dead letters go back onto the bus, to their topic.
struct BusDeadLetters(Weak<Bus>);

impl DeadLetterSink for BusDeadLetters {
    async fn publish(
        &self,
        destination: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), ebb_connectors::Error> {
        let bus = self
            .0
            .upgrade()
            .ok_or_else(|| ebb_connectors::Error::DeadLetter("the bus is gone".into()))?;
        match bus.publish(destination, headers, body) {
            Ok(p) => {
                if p.functions.is_empty() {
                    tracing::warn!(topic = %destination, "dead letter published, but no function subscribes to its topic");
                }
                Ok(())
            }
            Err(e) => Err(ebb_connectors::Error::DeadLetter(e.to_string())),
        }
    }
}

/// Hands `f`'s events to the engine, as many at once as its limit allows.
async fn dispatch(bus: Weak<Bus>, f: Arc<BusFn>) {
    let sink = Arc::new(BusDeadLetters(bus.clone()));
    loop {
        let permit = tokio::select! {
            p = f.limit.acquire() => p,
            () = f.stop.cancelled() => return,
        };
        let event = loop {
            let next = f.queue.lock().ok().and_then(|mut q| q.pop_front());
            if let Some(e) = next {
                break e;
            }
            tokio::select! {
                () = f.notify.notified() => {}
                () = f.stop.cancelled() => return,
            }
        };
        let Some(b) = bus.upgrade() else { return };
        f.inflight.fetch_add(1, Ordering::SeqCst);
        let target = f.target.read().unwrap_or_else(|p| p.into_inner()).clone();
        let engine = b.engine.clone();
        let sink = sink.clone();
        let f2 = f.clone();
        b.tracker.spawn(async move {
            engine
                .deliver(&target, &event, InProcess::<NoReply>::new(None), &*sink)
                .await;
            f2.inflight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        });
    }
}
