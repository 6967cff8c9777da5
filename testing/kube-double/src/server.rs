//! Routing: which resource a path names, and the verbs on it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, Request, State as AxumState};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::KubeRequest;
use crate::store::{ApiError, Inner, ObjKey, Part, Res, merge_patch};
use crate::watch::{list, start_watch};

/// Request bodies above this are refused.
const MAX_BODY: usize = 16 << 20;

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) res: Res,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) sub: Option<Sub>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    Scale,
    Status,
}

pub(crate) fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] if namespace.is_some() => (*plural, Some((*name).to_owned()), None),
        [plural, name, "scale"] if namespace.is_some() => {
            (*plural, Some((*name).to_owned()), Some(Sub::Scale))
        }
        [plural, name, "status"] if namespace.is_some() => {
            (*plural, Some((*name).to_owned()), Some(Sub::Status))
        }
        _ => return None,
    };
    let res = Res::ALL
        .into_iter()
        .find(|r| r.api_version() == api_version && r.plural() == plural)?;
    if sub == Some(Sub::Scale) && !res.is_workload()
        || sub == Some(Sub::Status) && !res.is_workload()
    {
        return None;
    }
    Some(Route {
        res,
        namespace,
        name,
        sub,
    })
}

pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    let uri: Uri = match format!("/?{query}").parse() {
        Ok(uri) => uri,
        Err(_) => return Vec::new(),
    };
    Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub(crate) async fn handle(AxumState(inner): AxumState<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(err) => {
            return ApiError::new(400, format!("cannot read the body: {err}")).into_response();
        }
    };
    let params: HashMap<String, String> = parse_query(&query).into_iter().collect();
    let is_watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));

    let fault = {
        let mut state = inner.lock();
        let fault = state
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.matching.matches(&method, &path, is_watch))
            .map(|f| {
                f.remaining -= 1;
                f.status
            });
        state.faults.retain(|f| f.remaining > 0);
        state.requests.push(KubeRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
            fault,
        });
        fault
    };
    if let Some(code) = fault {
        return ApiError::new(code, format!("injected fault: {method} {path}")).into_response();
    }

    if path == "/version" && parts.method == Method::GET {
        return json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-ebb-double",
                "platform": "linux/amd64",
            }),
        );
    }
    let Some(route) = route(&path) else {
        return ApiError::new(404, "the server could not find the requested resource")
            .into_response();
    };
    let result = match (&parts.method, &route.name, route.sub) {
        (&Method::GET, None, _) if is_watch => return start_watch(&inner, &route, &params),
        (&Method::GET, None, _) => list(&inner, &route, &params),
        (&Method::POST, None, _) => match route.namespace.as_deref() {
            Some(namespace) => parse_body(&body).and_then(|object| {
                inner
                    .lock()
                    .create(&inner, route.res, namespace, object)
                    .map(|o| (StatusCode::CREATED, o))
            }),
            None => Err(ApiError::new(405, "create needs a namespace in the path")),
        },
        (&Method::GET, Some(name), None) => get(&inner, &route, name).map(|o| (StatusCode::OK, o)),
        (&Method::GET, Some(name), Some(Sub::Scale)) => get(&inner, &route, name)
            .and_then(|o| scale_of(&o))
            .map(|s| (StatusCode::OK, s)),
        (&Method::GET, Some(name), Some(Sub::Status)) => {
            get(&inner, &route, name).map(|o| (StatusCode::OK, o))
        }
        (&Method::PUT, Some(name), sub) => parse_body(&body)
            .and_then(|object| write(&inner, &route, name, sub, Write::Replace(object)))
            .map(|o| (StatusCode::OK, o)),
        (&Method::PATCH, Some(name), sub) => patch_kind(content_type.as_deref())
            .and_then(|kind| Ok((kind, parse_body(&body)?)))
            .and_then(|(kind, patch)| write(&inner, &route, name, sub, Write::Patch(kind, patch)))
            .map(|o| (StatusCode::OK, o)),
        (&Method::DELETE, Some(name), None) => {
            let namespace = route.namespace.clone().unwrap_or_default();
            inner
                .lock()
                .delete(&inner, route.res, &namespace, name)
                .map(|o| (StatusCode::OK, o))
        }
        _ => Err(ApiError::new(
            405,
            format!("{method} is not supported on {path}"),
        )),
    };
    match result {
        Ok((code, body)) => json_response(code, &body),
        Err(err) => err.into_response(),
    }
}

pub(crate) fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::new(400, format!("invalid JSON body: {err}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Apply,
}

pub(crate) fn patch_kind(content_type: Option<&str>) -> Result<PatchKind, ApiError> {
    let mime = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    match mime {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchKind::Merge)
        }
        "application/apply-patch+yaml" => Ok(PatchKind::Apply),
        other => Err(ApiError::new(
            415,
            format!("the body of the request was in an unknown format: {other}"),
        )),
    }
}

pub(crate) enum Write {
    Replace(Value),
    Patch(PatchKind, Value),
}

pub(crate) fn get(inner: &Arc<Inner>, route: &Route, name: &str) -> Result<Value, ApiError> {
    let namespace = route.namespace.clone().unwrap_or_default();
    inner
        .lock()
        .objects
        .get(&ObjKey::new(route.res, &namespace, name))
        .map(|s| s.object.clone())
        .ok_or_else(|| ApiError::not_found(route.res, name))
}

/// The autoscaling/v1 Scale of a workload.
pub(crate) fn scale_of(object: &Value) -> Result<Value, ApiError> {
    let selector = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &object["metadata"];
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector,
        },
    }))
}

pub(crate) fn write(
    inner: &Arc<Inner>,
    route: &Route,
    name: &str,
    sub: Option<Sub>,
    write: Write,
) -> Result<Value, ApiError> {
    let res = route.res;
    let namespace = route.namespace.clone().unwrap_or_default();
    let mut state = inner.lock();
    let key = ObjKey::new(res, &namespace, name);
    let current = state.objects.get(&key).map(|s| s.object.clone());
    match sub {
        Some(Sub::Scale) => {
            let current = current.ok_or_else(|| ApiError::not_found(res, name))?;
            let scale = scale_of(&current)?;
            let desired = match write {
                Write::Replace(new) => new,
                Write::Patch(_, patch) => {
                    let mut scale = scale.clone();
                    merge_patch(&mut scale, &patch);
                    scale
                }
            };
            if let Some(rv) = desired["metadata"]["resourceVersion"].as_str()
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return Err(ApiError::conflict(res, name));
            }
            let replicas = desired["spec"]["replicas"]
                .as_i64()
                .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
                .ok_or_else(|| {
                    ApiError::new(422, format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas must be a whole number ≥ 0"))
                })?;
            let mut new = current.clone();
            new["spec"]["replicas"] = json!(replicas);
            new["metadata"]["resourceVersion"] = Value::Null;
            let updated = state.update(inner, res, &namespace, name, new, Part::Main)?;
            scale_of(&updated)
        }
        sub => {
            let part = if sub == Some(Sub::Status) {
                Part::Status
            } else {
                Part::Main
            };
            match (write, current) {
                (Write::Replace(new), Some(_)) => {
                    state.update(inner, res, &namespace, name, new, part)
                }
                (Write::Replace(_), None) => Err(ApiError::not_found(res, name)),
                (Write::Patch(_, patch), Some(mut current)) => {
                    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
                    {
                        return Err(ApiError::conflict(res, name));
                    }
                    merge_patch(&mut current, &patch);
                    current["metadata"]["resourceVersion"] = Value::Null;
                    state.update(inner, res, &namespace, name, current, part)
                }
                (Write::Patch(PatchKind::Apply, mut object), None) if sub.is_none() => {
                    object["metadata"]["name"] = json!(name);
                    state.create(inner, res, &namespace, object)
                }
                (Write::Patch(..), None) => Err(ApiError::not_found(res, name)),
            }
        }
    }
}
