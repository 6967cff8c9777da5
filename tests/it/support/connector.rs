//! What the connector tests share: functions of a stack file, and waiting
//! for a connector process to be ready.

use std::time::Duration;

use tokio::time::Instant;

use super::ChildGuard;
use super::http;

/// One function of a stack file.
pub struct Func {
    pub name: String,
    pub url: String,
    pub topics: Vec<String>,
    pub settings: Vec<(String, String)>,
}

pub fn func(name: &str, url: &str, topics: &[&str]) -> Func {
    Func {
        name: name.to_owned(),
        url: url.to_owned(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        settings: Vec::new(),
    }
}

impl Func {
    /// Any other stack-file key, written as given (`max-attempts`, `3`).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// A stack file listing `funcs`.
pub fn stack_yaml(funcs: &[Func]) -> String {
    let mut out = String::from("functions:\n");
    for f in funcs {
        let topics: Vec<String> = f.topics.iter().map(|t| format!("{t:?}")).collect();
        out.push_str(&format!(
            "  - name: {}\n    url: {}\n    topics: [{}]\n",
            f.name,
            f.url,
            topics.join(", ")
        ));
        for (k, v) in &f.settings {
            out.push_str(&format!("    {k}: {v}\n"));
        }
    }
    out
}

/// Writes a stack file atomically (write + rename), as an editor or a
/// ConfigMap update would, so a reload never sees half a file.
pub fn write_stack(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write stack file");
    std::fs::rename(&tmp, path).expect("rename stack file");
}

/// Waits until the connector answers `GET /_/ready` on `admin` with 200;
/// panics with its output when it exits first or `limit` passes.
pub async fn wait_ready(child: &mut ChildGuard, admin: &str, limit: Duration) {
    let url = format!("http://{admin}/_/ready");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_status() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!(
                "the connector exited ({status}) before it was ready; output:\n{}",
                child.output()
            );
        }
        let answer =
            http::request(hyper::Method::GET, &url, None, None, Duration::from_secs(1)).await;
        if answer.is_ok_and(|r| r.status == 200) {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the connector was not ready within {limit:?}; output:\n{}",
                child.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
