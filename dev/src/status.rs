//! What `ebb dev` shows: a snapshot per function, as JSON (`/_/status`), as
//! the live table, or as one summary line.

use std::fmt::Write;

use serde::Serialize;

use crate::Dev;

/// One function's state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionStatus {
    pub name: String,
    /// `local` (run by ebb dev) or `external` (its url).
    pub kind: &'static str,
    pub topics: Vec<String>,
    pub schedule: Option<String>,
    /// Replica processes running or starting.
    pub replicas: u32,
    /// Of those, ready.
    pub ready: usize,
    /// Process ids of the replicas.
    pub pids: Vec<u32>,
    /// Events waiting for or in delivery (in-memory bus).
    pub backlog: Option<usize>,
    /// Deliveries in progress (calls and holds).
    pub inflight: i64,
    #[serde(flatten)]
    pub counts: Counts,
    pub last_error: Option<String>,
    /// The reason of the last scaling decision.
    pub last_scaling: Option<String>,
}

/// What became of a function's events since start.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Counts {
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Given up without a dead-letter topic.
    pub dropped: u64,
}

impl Counts {
    /// Events given up, dead-lettered or dropped.
    pub fn dead(&self) -> u64 {
        self.dead_lettered + self.dropped
    }
}

/// The whole of `ebb dev`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub stack: String,
    pub functions: Vec<FunctionStatus>,
    /// Events accepted by `POST /publish` (and dead letters), since start.
    pub published: u64,
    /// Replica processes started since start.
    pub replicas_started: u64,
    /// The last reload's mistake, while the file still has it.
    pub reload_error: Option<String>,
}

pub(crate) async fn snapshot(dev: &Dev) -> Status {
    let functions = dev.functions();
    let mut out = Vec::with_capacity(functions.len());
    for f in functions {
        let local = !f.command.is_empty();
        let endpoints = local.then(|| dev.replicas.endpoints_of(&f.name, f.max_inflight));
        let decision = dev
            .decisions
            .lock()
            .ok()
            .and_then(|d| d.get(&f.name).cloned());
        out.push(FunctionStatus {
            name: f.name.clone(),
            kind: if local { "local" } else { "external" },
            topics: f.topics.clone(),
            schedule: f.schedule.clone(),
            replicas: if local {
                dev.replicas.count(&f.name).await
            } else {
                0
            },
            ready: endpoints.as_ref().map_or(0, |e| e.ready_count()),
            pids: dev.replicas.pids(&f.name).await,
            backlog: dev.bus.backlog(&f.name),
            inflight: dev.inflight(&f.name),
            counts: Counts {
                delivered: dev.counter(&f.name, "delivered"),
                retried: dev.retries(&f.name),
                dead_lettered: dev.counter(&f.name, "dead_lettered"),
                dropped: dev.counter(&f.name, "dropped"),
            },
            last_error: endpoints.and_then(|e| e.last_error()),
            last_scaling: decision,
        });
    }
    Status {
        stack: dev.cfg.stack.display().to_string(),
        functions: out,
        published: dev.bus.published.load(std::sync::atomic::Ordering::Relaxed),
        replicas_started: dev
            .replicas
            .started
            .load(std::sync::atomic::Ordering::Relaxed),
        reload_error: dev.reload_error.lock().ok().and_then(|r| r.clone()),
    }
}

/// The live table.
pub fn table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>8} {:>8} {:>9} {:>9} {:>7} {:>5}  LAST ERROR",
        "FUNCTION", "REPLICAS", "BACKLOG", "IN-FLIGHT", "DELIVERED", "RETRIED", "DEAD"
    );
    for f in &s.functions {
        let replicas = if f.kind == "local" {
            format!("{}/{}", f.ready, f.replicas)
        } else {
            "ext".to_string()
        };
        let backlog = f.backlog.map_or_else(|| "-".to_string(), |b| b.to_string());
        let mut error = f.last_error.clone().unwrap_or_default();
        if error.chars().count() > 40 {
            error = error.chars().take(39).collect::<String>() + "…";
        }
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>8} {:>9} {:>9} {:>7} {:>5}  {}",
            shorten(&f.name, 20),
            replicas,
            backlog,
            f.inflight,
            f.counts.delivered,
            f.counts.retried,
            f.counts.dead(),
            error
        );
    }
    if let Some(e) = &s.reload_error {
        let _ = writeln!(out, "stack file not reloaded: {e}");
    }
    out
}

/// One line for logs: every function's replicas and counts.
pub fn summary(s: &Status) -> String {
    let mut out = String::from("status:");
    for f in &s.functions {
        let _ = write!(
            out,
            " {}(replicas={} delivered={} retried={} dead={})",
            f.name,
            f.replicas,
            f.counts.delivered,
            f.counts.retried,
            f.counts.dead()
        );
    }
    out
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, kind: &'static str) -> FunctionStatus {
        FunctionStatus {
            name: name.into(),
            kind,
            topics: vec!["t".into()],
            schedule: None,
            replicas: 2,
            ready: 1,
            pids: vec![],
            backlog: Some(7),
            inflight: 3,
            counts: Counts {
                delivered: 40,
                retried: 2,
                dead_lettered: 1,
                dropped: 0,
            },
            last_error: Some("status 500 from the function, which is a long reason".into()),
            last_scaling: None,
        }
    }

    #[test]
    fn the_table_has_a_row_per_function_with_its_counts() {
        let s = Status {
            stack: "stack.yaml".into(),
            functions: vec![
                f("echo", "local"),
                f("a-very-long-function-name-x", "external"),
            ],
            published: 0,
            replicas_started: 0,
            reload_error: Some("bad".into()),
        };
        let t = table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("FUNCTION"));
        let echo: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&echo[..7], ["echo", "1/2", "7", "3", "40", "2", "1"]);
        assert!(lines[1].ends_with('…'), "long errors are cut: {}", lines[1]);
        assert!(lines[2].contains("ext"));
        assert!(lines[2].starts_with("a-very-long-functio…"));
        assert!(lines[3].contains("not reloaded: bad"));
    }

    #[test]
    fn the_counts_are_fields_of_the_function_in_json() {
        let json = serde_json::to_value(f("echo", "local")).unwrap();
        for (key, want) in [
            ("delivered", 40),
            ("retried", 2),
            ("dead_lettered", 1),
            ("dropped", 0),
        ] {
            assert_eq!(json[key], want, "{key} in {json}");
        }
        assert!(json.get("counts").is_none(), "{json}");
    }

    #[test]
    fn the_summary_names_every_function() {
        let s = Status {
            stack: "s".into(),
            functions: vec![f("a", "local"), f("b", "local")],
            published: 0,
            replicas_started: 0,
            reload_error: None,
        };
        assert_eq!(
            summary(&s),
            "status: a(replicas=2 delivered=40 retried=2 dead=1) b(replicas=2 delivered=40 retried=2 dead=1)"
        );
    }
}
