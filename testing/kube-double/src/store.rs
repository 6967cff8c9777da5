//! The stored objects and what a write does to them: resourceVersions,
//! conflicts, the history watches replay, `Status` errors.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::server::json_response;
use crate::{KubeEvent, KubeRequest, Match};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Res {
    Deployment,
    StatefulSet,
    Lease,
    CoreEvent,
    Event,
    Hpa,
    Pod,
}

impl Res {
    pub(crate) const ALL: [Res; 7] = [
        Res::Deployment,
        Res::StatefulSet,
        Res::Lease,
        Res::CoreEvent,
        Res::Event,
        Res::Hpa,
        Res::Pod,
    ];

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Res::Deployment | Res::StatefulSet => "apps/v1",
            Res::Lease => "coordination.k8s.io/v1",
            Res::CoreEvent | Res::Pod => "v1",
            Res::Event => "events.k8s.io/v1",
            Res::Hpa => "autoscaling/v2",
        }
    }

    pub(crate) fn group(self) -> &'static str {
        match self.api_version().split_once('/') {
            Some((group, _)) => group,
            None => "",
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Res::Deployment => "deployments",
            Res::StatefulSet => "statefulsets",
            Res::Lease => "leases",
            Res::CoreEvent | Res::Event => "events",
            Res::Hpa => "horizontalpodautoscalers",
            Res::Pod => "pods",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Res::Deployment => "Deployment",
            Res::StatefulSet => "StatefulSet",
            Res::Lease => "Lease",
            Res::CoreEvent | Res::Event => "Event",
            Res::Hpa => "HorizontalPodAutoscaler",
            Res::Pod => "Pod",
        }
    }

    /// `deployments.apps`, as in API error messages.
    pub(crate) fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    pub(crate) fn is_workload(self) -> bool {
        matches!(self, Res::Deployment | Res::StatefulSet)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjKey {
    pub(crate) res: Res,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl ObjKey {
    pub(crate) fn new(res: Res, namespace: &str, name: &str) -> Self {
        Self {
            res,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Stored {
    /// resourceVersion at creation, for creation order.
    pub(crate) created: u64,
    pub(crate) object: Value,
}

#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) res: Res,
    pub(crate) namespace: String,
    pub(crate) type_: &'static str,
    pub(crate) object: Value,
}

#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) matching: Match,
    pub(crate) remaining: usize,
    pub(crate) status: u16,
}

/// Which part of a workload a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Everything but `status` (the main resource).
    Main,
    /// Only `status` (the status subresource).
    Status,
    /// Everything (test helpers).
    All,
}

/// An API error: HTTP status and message.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) message: String,
    pub(crate) details: Option<(Res, String)>,
}

impl ApiError {
    pub(crate) fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn not_found(res: Res, name: &str) -> Self {
        Self {
            code: 404,
            message: format!("{} \"{name}\" not found", res.qualified()),
            details: Some((res, name.to_owned())),
        }
    }

    pub(crate) fn conflict(res: Res, name: &str) -> Self {
        Self {
            code: 409,
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                res.qualified()
            ),
            details: Some((res, name.to_owned())),
        }
    }

    pub(crate) fn already_exists(res: Res, name: &str) -> Self {
        Self {
            code: 409,
            message: format!("{} \"{name}\" already exists", res.qualified()),
            details: Some((res, name.to_owned())),
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        if self.code == 409 && self.message.ends_with("already exists") {
            return "AlreadyExists";
        }
        reason_for(self.code)
    }

    pub(crate) fn status_body(&self) -> Value {
        let mut status = crate::status(self.code, self.reason(), &self.message);
        if let Some((res, name)) = &self.details {
            status["details"] = json!({"name": name, "group": res.group(), "kind": res.plural()});
        }
        status
    }

    pub(crate) fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status_body())
    }
}

pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    /// The last written resourceVersion; watches wake on it.
    pub(crate) changed: watch::Sender<u64>,
    /// Bumped by `close_watches`.
    pub(crate) close: watch::Sender<u64>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Inner {
    pub(crate) fn new(runtime: tokio::runtime::Handle) -> Self {
        Self {
            state: Mutex::new(State {
                rv: 1,
                uid: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                faults: Vec::new(),
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(2),
                auto_ready: None,
            }),
            changed: watch::Sender::new(1),
            close: watch::Sender::new(0),
            runtime,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct State {
    pub(crate) rv: u64,
    pub(crate) uid: u64,
    pub(crate) objects: BTreeMap<ObjKey, Stored>,
    pub(crate) history: Vec<Change>,
    /// Watches from below this resourceVersion get 410.
    pub(crate) compacted: u64,
    pub(crate) faults: Vec<Fault>,
    pub(crate) requests: Vec<KubeRequest>,
    pub(crate) bookmark_interval: Duration,
    pub(crate) auto_ready: Option<Duration>,
}

impl State {
    pub(crate) fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub(crate) fn record(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        type_: &'static str,
        object: &Value,
    ) {
        let mut object = object.clone();
        // Watch events carry apiVersion and kind.
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind());
        self.history.push(Change {
            rv: self.rv,
            res,
            namespace: namespace.to_owned(),
            type_,
            object,
        });
        inner.changed.send_replace(self.rv);
    }

    pub(crate) fn create(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::new(400, "the body must be a JSON object"));
        }
        if let Some(given) = object["apiVersion"].as_str()
            && given != res.api_version()
        {
            return Err(ApiError::new(
                400,
                format!("apiVersion {given} does not match {}", res.api_version()),
            ));
        }
        let meta = object["metadata"].take();
        let mut meta = match meta {
            Value::Object(meta) => meta,
            Value::Null => Map::new(),
            _ => return Err(ApiError::new(400, "metadata must be an object")),
        };
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if ns != namespace => {
                return Err(ApiError::new(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        self.uid += 1;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", self.uid),
                None => return Err(ApiError::new(422, "name or generateName is required")),
            },
        };
        let key = ObjKey::new(res, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        let rv = self.next_rv();
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(namespace));
        meta.insert(
            "uid".into(),
            json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
        );
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        object["metadata"] = Value::Object(meta);
        object["apiVersion"] = json!(res.api_version());
        object["kind"] = json!(res.kind());
        if res.is_workload() {
            object["metadata"]["generation"] = json!(1);
            if object["spec"]["replicas"].is_null() {
                object["spec"]["replicas"] = json!(1);
            }
            if object["status"].is_null() {
                object["status"] = json!({});
            }
        }
        self.objects.insert(
            key,
            Stored {
                created: rv,
                object: object.clone(),
            },
        );
        self.record(inner, res, namespace, "ADDED", &object);
        self.after_replicas_change(inner, res, namespace, &name, None, &object);
        Ok(object)
    }

    /// Replaces `namespace/name` by `new` (only the `part` it may change),
    /// after checking a resourceVersion in `new` against the stored one.
    pub(crate) fn update(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
        mut new: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.get(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        let current = stored.object.clone();
        let created = stored.created;
        if !new.is_object() {
            return Err(ApiError::new(400, "the body must be a JSON object"));
        }
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(res, name));
        }
        if let Some(given) = new["metadata"]["name"].as_str()
            && given != name
        {
            return Err(ApiError::new(
                400,
                "the name of the object does not match the name on the URL",
            ));
        }
        // Server-owned metadata stays.
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "generation",
        ] {
            new["metadata"][field] = current["metadata"][field].clone();
        }
        new["apiVersion"] = json!(res.api_version());
        new["kind"] = json!(res.kind());
        if res.is_workload() {
            match part {
                Part::Main => new["status"] = current["status"].clone(),
                Part::Status => {
                    let status = new["status"].take();
                    new = current.clone();
                    new["status"] = status;
                }
                Part::All => {}
            }
            if new["spec"]["replicas"].is_null() {
                new["spec"]["replicas"] = json!(1);
            }
            if new["spec"] != current["spec"] {
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(0);
                new["metadata"]["generation"] = json!(generation + 1);
            }
        }
        strip_nulls(&mut new);
        if new == current {
            return Ok(current);
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(
            key,
            Stored {
                created,
                object: new.clone(),
            },
        );
        self.record(inner, res, namespace, "MODIFIED", &new);
        self.after_replicas_change(inner, res, namespace, name, Some(&current), &new);
        Ok(new)
    }

    pub(crate) fn delete(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.remove(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        let mut object = stored.object;
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(inner, res, namespace, "DELETED", &object);
        Ok(object)
    }

    pub(crate) fn set_ready(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
        ready: i32,
    ) {
        let key = ObjKey::new(res, namespace, name);
        let Some(stored) = self.objects.get(&key) else {
            return;
        };
        let mut object = stored.object.clone();
        object["status"]["readyReplicas"] = json!(ready);
        object["status"]["availableReplicas"] = json!(ready);
        object["status"]["replicas"] = object["spec"]["replicas"].clone();
        object["status"]["observedGeneration"] = object["metadata"]["generation"].clone();
        object["metadata"]["resourceVersion"] = Value::Null;
        let _ = self.update(inner, res, namespace, name, object, Part::All);
    }

    /// With `auto_ready`, schedules readiness to follow `spec.replicas`.
    pub(crate) fn after_replicas_change(
        &mut self,
        inner: &Arc<Inner>,
        res: Res,
        namespace: &str,
        name: &str,
        before: Option<&Value>,
        after: &Value,
    ) {
        let (Some(delay), true) = (self.auto_ready, res.is_workload()) else {
            return;
        };
        let target = after["spec"]["replicas"].as_i64().unwrap_or(1);
        if before.is_some_and(|b| b["spec"]["replicas"].as_i64() == Some(target)) {
            return;
        }
        let inner = inner.clone();
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        inner.runtime.clone().spawn(async move {
            tokio::time::sleep(delay).await;
            let mut state = inner.lock();
            let key = ObjKey::new(res, &namespace, &name);
            let still = state
                .objects
                .get(&key)
                .is_some_and(|s| s.object["spec"]["replicas"].as_i64() == Some(target));
            if still {
                let ready = i32::try_from(target).unwrap_or(i32::MAX);
                state.set_ready(&inner, res, &namespace, &name, ready);
            }
        });
    }
}

pub(crate) fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(target) = target {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(key);
                    } else {
                        merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub(crate) fn normalize_event(object: &Value) -> KubeEvent {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let core = object["apiVersion"] == "v1";
    let regarding = if core {
        &object["involvedObject"]
    } else {
        &object["regarding"]
    };
    KubeEvent {
        api_version: text(&object["apiVersion"]),
        namespace: text(&object["metadata"]["namespace"]),
        name: text(&object["metadata"]["name"]),
        type_: text(&object["type"]),
        reason: text(&object["reason"]),
        message: if core {
            text(&object["message"])
        } else {
            text(&object["note"])
        },
        object_kind: text(&regarding["kind"]),
        object_namespace: text(&regarding["namespace"]),
        object_name: text(&regarding["name"]),
        reporter: if core {
            object["reportingComponent"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map_or_else(|| text(&object["source"]["component"]), str::to_owned)
        } else {
            text(&object["reportingController"])
        },
        count: if core {
            object["count"].as_i64().unwrap_or(1)
        } else {
            object["series"]["count"]
                .as_i64()
                .or_else(|| object["deprecatedCount"].as_i64())
                .unwrap_or(1)
        },
        raw: object.clone(),
    }
}
