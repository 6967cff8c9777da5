//! Kubernetes Events (`core/v1`) about the objects ebb works on, shown by
//! `kubectl describe` and `kubectl get events`.
//!
//! Repeats are aggregated the way client-go's recorder does it: the same
//! event (object, type, reason and message) within [`AGGREGATION_WINDOW`]
//! bumps `count` and `lastTimestamp` of the Event already written (a merge
//! patch) instead of creating another object. A different message is a new
//! Event.
//!
//! Not `kube::runtime::events::Recorder`: its series leave the message out of
//! the key, so a new message within its window is lost in the first Event,
//! and a series whose Event is gone is refused rather than written anew
//! (`api_tests::kube_runtime_recorder_hides_a_new_message_in_the_first_event`).
//! It also neither truncates (the API refuses a note over 1 KiB) nor bounds
//! its cache by size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Event as CoreEvent, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::Error;

/// How long a written Event is remembered for aggregation.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(10 * 60);

/// At most this many distinct Events are remembered (oldest forgotten first).
const CACHE_CAPACITY: usize = 4096;

/// Kubernetes limits: `reason` is a short CamelCase word, `message` ≤ 1 KiB
/// is what `kubectl` shows comfortably (the API allows more, but no reader
/// wants it).
const MAX_REASON: usize = 128;
const MAX_MESSAGE: usize = 1024;

/// The severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// Publishes `core/v1` Events in the namespace of the object they regard
/// (`default` for cluster-scoped objects).
///
/// Cheap to clone; clones share the aggregation cache. Needs RBAC `create`
/// and `patch` on `events` in the core (`""`) API group.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    cache: Arc<Mutex<HashMap<Key, Written>>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    type_: EventType,
    reason: String,
    message: String,
}

#[derive(Debug, Clone)]
struct Written {
    namespace: String,
    name: String,
    count: i32,
    last: SystemTime,
}

impl Recorder {
    /// A recorder reporting as `controller` (for example
    /// `ebb-connector-nats`); the instance is the host name, which is the pod
    /// name inside Kubernetes.
    pub fn new(client: Client, controller: impl Into<String>) -> Self {
        let controller = controller.into();
        let instance = hostname().unwrap_or_else(|| controller.clone());
        Self::with_instance(client, controller, instance)
    }

    /// A recorder with an explicit instance name (several replicas of one
    /// controller tell their Events apart by it).
    pub fn with_instance(
        client: Client,
        controller: impl Into<String>,
        instance: impl Into<String>,
    ) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance: instance.into(),
            cache: Arc::default(),
        }
    }

    /// The reporting controller name.
    pub fn controller(&self) -> &str {
        &self.controller
    }

    /// Publishes a `Warning` Event.
    pub async fn warning(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        message: &str,
    ) -> Result<(), Error> {
        self.publish(regarding, EventType::Warning, reason, message)
            .await
    }

    /// Publishes a `Normal` Event.
    pub async fn normal(
        &self,
        regarding: &ObjectReference,
        reason: &str,
        message: &str,
    ) -> Result<(), Error> {
        self.publish(regarding, EventType::Normal, reason, message)
            .await
    }

    /// Publishes an Event about `regarding` (build it with
    /// [`kube::Resource::object_ref`]). A repeat of the same Event within
    /// [`AGGREGATION_WINDOW`] only bumps its count.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), Error> {
        let reason = truncate(reason, MAX_REASON);
        let message = truncate(message, MAX_MESSAGE);
        let key = Key {
            api_version: regarding.api_version.clone(),
            kind: regarding.kind.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
            type_,
            reason: reason.to_owned(),
            message: message.to_owned(),
        };
        let now = SystemTime::now();
        let previous = self.remembered(&key, now);

        if let Some(previous) = previous {
            let count = previous.count.saturating_add(1);
            let patch = serde_json::json!({
                "count": count,
                "lastTimestamp": Time(timestamp(now)),
            });
            let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &previous.namespace);
            match api
                .patch(
                    &previous.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.remember(
                        key,
                        Written {
                            count,
                            last: now,
                            ..previous
                        },
                    );
                    return Ok(());
                }
                // Events expire (1 h by default): write a fresh one.
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(err) => return Err(Error::Api(err)),
            }
        }

        let namespace = regarding
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let name = event_name(regarding.name.as_deref().unwrap_or(&self.controller), now);
        let event = CoreEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: regarding.clone(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some(type_.as_str().to_owned()),
            count: Some(1),
            first_timestamp: Some(Time(timestamp(now))),
            last_timestamp: Some(Time(timestamp(now))),
            source: Some(EventSource {
                component: Some(self.controller.clone()),
                host: None,
            }),
            reporting_component: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..CoreEvent::default()
        };
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event).await?;
        self.remember(
            key,
            Written {
                namespace,
                name,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }

    fn remembered(&self, key: &Key, now: SystemTime) -> Option<Written> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|w| now.duration_since(w.last).unwrap_or_default() < AGGREGATION_WINDOW)
            .cloned()
    }

    fn remember(&self, key: Key, written: Written) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = written.last;
        if cache.len() >= CACHE_CAPACITY {
            cache
                .retain(|_, w| now.duration_since(w.last).unwrap_or_default() < AGGREGATION_WINDOW);
        }
        if cache.len() >= CACHE_CAPACITY {
            let oldest = cache
                .iter()
                .min_by_key(|(_, w)| w.last)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, written);
    }
}

/// `NAME.HEXNANOS`, as client-go names Events.
fn event_name(object: &str, now: SystemTime) -> String {
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{object}.{nanos:x}")
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_at_char_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("ä≥b", 3), "ä");
    }

    #[test]
    fn event_names_follow_client_go() {
        let t = UNIX_EPOCH + Duration::from_nanos(255);
        assert_eq!(event_name("echo", t), "echo.ff");
    }
}
