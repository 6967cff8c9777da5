//! Lists and watches, with label and field selectors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::server::Route;
use crate::store::{ApiError, Inner, Res};

/// Watches without `timeoutSeconds` end after this long (the real API picks
/// 30–60 min at random).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Label and field selectors of a list or watch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub(crate) res: Option<Res>,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: Vec<Term>,
    pub(crate) fields: Vec<Term>,
}

#[derive(Debug, Clone)]
pub(crate) enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

pub(crate) fn parse_selector(selector: &str, fields: bool) -> Result<Vec<Term>, ApiError> {
    if selector.contains('(') {
        return Err(ApiError::new(
            400,
            format!("set-based selectors are not supported by the double: {selector}"),
        ));
    }
    let mut terms = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let parsed = if let Some((k, v)) = term.split_once("!=") {
            Term::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Term::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if fields {
            return Err(ApiError::new(
                400,
                format!("invalid field selector: {term}"),
            ));
        } else if let Some(k) = term.strip_prefix('!') {
            Term::NotExists(k.trim().to_owned())
        } else {
            Term::Exists(term.to_owned())
        };
        terms.push(parsed);
    }
    Ok(terms)
}

impl Filter {
    pub(crate) fn new(route: &Route, params: &HashMap<String, String>) -> Result<Self, ApiError> {
        Ok(Self {
            res: Some(route.res),
            namespace: route.namespace.clone(),
            labels: parse_selector(
                params.get("labelSelector").map_or("", String::as_str),
                false,
            )?,
            fields: parse_selector(params.get("fieldSelector").map_or("", String::as_str), true)?,
        })
    }

    pub(crate) fn matches(&self, res: Res, namespace: &str, object: &Value) -> bool {
        if self.res.is_some_and(|r| r != res)
            || self.namespace.as_deref().is_some_and(|ns| ns != namespace)
        {
            return false;
        }
        let label = |k: &str| object["metadata"]["labels"][k].as_str().map(str::to_owned);
        let field = |path: &str| {
            let mut value = object;
            for part in path.split('.') {
                value = &value[part];
            }
            match value {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        let check = |terms: &[Term], get: &dyn Fn(&str) -> Option<String>| {
            terms.iter().all(|term| match term {
                Term::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
                // Like the real API, an absent field is "" for field selectors.
                Term::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
                Term::Exists(k) => get(k).is_some(),
                Term::NotExists(k) => get(k).is_none(),
            })
        };
        check(&self.labels, &label) && check(&self.fields, &field)
    }
}

pub(crate) fn list(
    inner: &Arc<Inner>,
    route: &Route,
    params: &HashMap<String, String>,
) -> Result<(StatusCode, Value), ApiError> {
    let filter = Filter::new(route, params)?;
    let state = inner.lock();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|(key, stored)| filter.matches(key.res, &key.namespace, &stored.object))
        .map(|(_, stored)| {
            // List items carry no apiVersion/kind, as from the real API.
            let mut item = stored.object.clone();
            if let Value::Object(map) = &mut item {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    Ok((
        StatusCode::OK,
        json!({
            "apiVersion": route.res.api_version(),
            "kind": format!("{}List", route.res.kind()),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }),
    ))
}

pub(crate) fn watch_line(type_: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

pub(crate) fn bookmark(res: Res, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"apiVersion": res.api_version(), "kind": res.kind(), "metadata": metadata}),
    )
}

pub(crate) fn start_watch(
    inner: &Arc<Inner>,
    route: &Route,
    params: &HashMap<String, String>,
) -> Response {
    let filter = match Filter::new(route, params) {
        Ok(filter) => filter,
        Err(err) => return err.into_response(),
    };
    let from = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return ApiError::new(400, format!("invalid resource version: {rv}"))
                    .into_response();
            }
        },
    };
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let initial_events = params.get("sendInitialEvents").is_some_and(|b| b == "true");

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let inner = inner.clone();
    let res = route.res;
    inner.runtime.clone().spawn(async move {
        let _ = run_watch(
            &inner,
            res,
            filter,
            from,
            timeout,
            bookmarks,
            initial_events,
            tx,
        )
        .await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::new(500, "cannot build the watch response").into_response())
}

/// Streams one watch until its timeout, a `close_watches`, or the client
/// going away. `Err` only means the client is gone.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, all watch options"
)]
pub(crate) async fn run_watch(
    inner: &Arc<Inner>,
    res: Res,
    filter: Filter,
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    initial_events: bool,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), ()> {
    let mut changed = inner.changed.subscribe();
    let mut close = inner.close.subscribe();
    close.borrow_and_update();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);

    // Where to start, and what to send first.
    let (mut last, first, interval) = {
        changed.borrow_and_update();
        let state = inner.lock();
        let interval = state.bookmark_interval;
        match from {
            Some(rv) if rv < state.compacted => {
                let status = ApiError::new(
                    410,
                    format!("too old resource version: {rv} ({})", state.compacted),
                );
                // Send the ERROR event, then end the stream.
                (
                    u64::MAX,
                    vec![watch_line("ERROR", &status.status_body())],
                    interval,
                )
            }
            Some(rv) if !initial_events => (rv, Vec::new(), interval),
            _ => {
                let mut first: Vec<Bytes> = state
                    .objects
                    .iter()
                    .filter(|(key, stored)| filter.matches(key.res, &key.namespace, &stored.object))
                    .map(|(_, stored)| watch_line("ADDED", &stored.object))
                    .collect();
                if initial_events && bookmarks {
                    first.push(bookmark(res, state.rv, true));
                }
                (state.rv, first, interval)
            }
        }
    };
    for line in first {
        tx.send(line).await.map_err(drop)?;
    }
    if last == u64::MAX {
        return Ok(());
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        let lines: Vec<Bytes> = {
            changed.borrow_and_update();
            let state = inner.lock();
            // Writes made after `close_watches` never reach a closed stream.
            if close.has_changed().unwrap_or(true) {
                return Ok(());
            }
            let lines = state
                .history
                .iter()
                .filter(|c| c.rv > last && filter.matches(c.res, &c.namespace, &c.object))
                .map(|c| watch_line(c.type_, &c.object))
                .collect();
            last = last.max(state.rv);
            lines
        };
        for line in lines {
            tx.send(line).await.map_err(drop)?;
        }
        tokio::select! {
            biased;
            _ = close.changed() => return Ok(()),
            _ = changed.changed() => {}
            _ = ticker.tick(), if bookmarks => {
                tx.send(bookmark(res, last, false)).await.map_err(drop)?;
            }
            () = &mut deadline => return Ok(()),
            () = tx.closed() => return Err(()),
        }
    }
}
