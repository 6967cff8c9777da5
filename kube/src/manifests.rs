//! `ebb deploy`: Kubernetes manifests for the functions of a stack file.
//!
//! Each function with a `command` becomes a Deployment running it under
//! `ebb worker` (the image must hold both the `ebb` binary and the
//! handler) and a Service on port 8080, its stack settings written as the
//! `ebb.io/…` annotations the connectors and the autoscaler read. Every
//! function is checked to read back from its annotations exactly as it
//! reads from the stack file (its `url` aside: in Kubernetes the default,
//! its Service, is right), so what is deployed is what was tested locally.

use std::collections::BTreeMap;

use ebb_model::{ANNOTATION_PREFIX, FunctionSpec, Stack};
use serde_json::{Value, json};

/// Why manifests could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{0}")]
    Stack(String),
    #[error("function {function}: {message}")]
    Function { function: String, message: String },
}

/// What [`render`] made.
#[derive(Debug)]
pub struct Rendered {
    /// The manifests, YAML documents separated by `---`.
    pub yaml: String,
    /// Functions left out, with why (external functions: `url` only).
    pub skipped: Vec<String>,
}

/// Renders `stack_text` for `image` into `namespace`.
pub fn render(stack_text: &str, image: &str, namespace: &str) -> Result<Rendered, RenderError> {
    let stack = Stack::parse(stack_text).map_err(|e| RenderError::Stack(e.to_string()))?;
    let doc: serde_norway::Value =
        serde_norway::from_str(stack_text).map_err(|e| RenderError::Stack(e.to_string()))?;
    let entries = doc
        .get("functions")
        .and_then(serde_norway::Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    let mut docs: Vec<Value> = Vec::new();
    let mut skipped = Vec::new();
    for spec in &stack.functions {
        if spec.command.is_empty() {
            skipped.push(format!(
                "{}: external (no command), not deployed",
                spec.name
            ));
            continue;
        }
        let entry = entries
            .iter()
            .find(|e| e.get("name").and_then(serde_norway::Value::as_str) == Some(&spec.name))
            .ok_or_else(|| RenderError::Function {
                function: spec.name.clone(),
                message: "not found in the stack file".into(),
            })?;
        let annotations = annotations(entry);
        check_round_trip(spec, namespace, &annotations)?;
        docs.push(deployment(spec, image, namespace, &annotations));
        docs.push(service(spec, namespace));
    }
    let mut yaml = String::new();
    for d in &docs {
        yaml.push_str("---\n");
        yaml.push_str(&serde_norway::to_string(d).map_err(|e| RenderError::Stack(e.to_string()))?);
    }
    Ok(Rendered { yaml, skipped })
}

/// The `ebb.io/…` annotations of a stack entry: every key but `name`,
/// `command` and `url`; lists are comma-separated.
fn annotations(entry: &serde_norway::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(map) = entry.as_mapping() else {
        return out;
    };
    for (k, v) in map {
        let Some(key) = k.as_str() else { continue };
        if matches!(key, "name" | "command" | "url") {
            continue;
        }
        let text = match v {
            serde_norway::Value::Sequence(items) => {
                items.iter().map(scalar_text).collect::<Vec<_>>().join(",")
            }
            other => scalar_text(other),
        };
        out.insert(format!("{ANNOTATION_PREFIX}{key}"), text);
    }
    out
}

fn scalar_text(v: &serde_norway::Value) -> String {
    match v {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Bool(b) => b.to_string(),
        serde_norway::Value::Number(n) => n.to_string(),
        serde_norway::Value::Null => String::new(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// The annotations must describe the function the stack file does.
fn check_round_trip(
    spec: &FunctionSpec,
    namespace: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), RenderError> {
    let fail = |message: String| RenderError::Function {
        function: spec.name.clone(),
        message,
    };
    let back = FunctionSpec::from_annotations(&spec.name, namespace, annotations, &BTreeMap::new())
        .map_err(|e| fail(format!("its settings do not read back as annotations: {e}")))?
        .ok_or_else(|| fail("it has no setting an annotation would carry".into()))?;
    let mut want = spec.clone();
    want.namespace = namespace.to_owned();
    want.url = None;
    want.command = Vec::new();
    let mut got = back;
    got.url = None;
    got.command = Vec::new();
    if got != want {
        return Err(fail(format!(
            "its annotations read back differently: {got:?} instead of {want:?}"
        )));
    }
    Ok(())
}

fn labels(spec: &FunctionSpec) -> Value {
    json!({
        "app.kubernetes.io/name": spec.name,
        "app.kubernetes.io/managed-by": "ebb-deploy",
    })
}

fn deployment(
    spec: &FunctionSpec,
    image: &str,
    namespace: &str,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut args = vec![
        "worker".to_owned(),
        "--listen=0.0.0.0:8080".to_owned(),
        format!("--max-inflight={}", spec.max_inflight),
        format!("--timeout={}s", spec.timeout.as_secs().max(1)),
        "--".to_owned(),
    ];
    args.extend(spec.command.iter().cloned());
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": spec.name,
            "namespace": namespace,
            "labels": labels(spec),
            "annotations": annotations,
        },
        "spec": {
            // The autoscaler sets the count from here on.
            "replicas": spec.min_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": spec.name}},
            "template": {
                "metadata": {"labels": labels(spec)},
                "spec": {
                    "terminationGracePeriodSeconds": spec.timeout.as_secs().max(1) + 15,
                    "containers": [{
                        "name": "function",
                        "image": image,
                        "args": args,
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/_/ready", "port": "http"}},
                        "livenessProbe": {"httpGet": {"path": "/_/health", "port": "http"}},
                    }],
                },
            },
        },
    })
}

fn service(spec: &FunctionSpec, namespace: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": namespace, "labels": labels(spec)},
        "spec": {
            "selector": {"app.kubernetes.io/name": spec.name},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: &str = r#"
functions:
  - name: echo
    url: http://127.0.0.1:8081
    command: [cat]
    topics: [orders, "payments.*"]
    min-replicas: 1
    max-replicas: 4
    target: 20
    max-attempts: 3
    dead-letter: orders.dead
    timeout: 10s
  - name: nightly
    command: "echo report"
    schedule: "0 30 2 * * *"
    timezone: Europe/Berlin
    payload: "{\"kind\": \"nightly\"}"
  - name: outside
    url: http://example.invalid:8080
    topics: [t]
"#;

    fn docs(yaml: &str) -> Vec<serde_norway::Value> {
        yaml.split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_norway::from_str(d).expect("YAML"))
            .collect()
    }

    #[test]
    fn each_function_with_a_command_is_a_deployment_and_a_service() {
        let r = render(STACK, "registry.example/shop:1", "shop").expect("render");
        assert_eq!(r.skipped, ["outside: external (no command), not deployed"]);
        let docs = docs(&r.yaml);
        let kinds: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("Deployment", "echo"),
                ("Service", "echo"),
                ("Deployment", "nightly"),
                ("Service", "nightly")
            ]
        );
        let echo = &docs[0];
        assert_eq!(echo["metadata"]["namespace"].as_str(), Some("shop"));
        assert_eq!(echo["spec"]["replicas"].as_u64(), Some(1));
        let a = &echo["metadata"]["annotations"];
        assert_eq!(a["ebb.io/topics"].as_str(), Some("orders,payments.*"));
        assert_eq!(a["ebb.io/max-replicas"].as_str(), Some("4"));
        assert_eq!(a["ebb.io/dead-letter"].as_str(), Some("orders.dead"));
        assert!(a.get("ebb.io/url").is_none(), "the Service is the URL");
        let c = &echo["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"].as_str(), Some("registry.example/shop:1"));
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "worker",
                "--listen=0.0.0.0:8080",
                "--max-inflight=16",
                "--timeout=10s",
                "--",
                "cat"
            ]
        );
        let nightly = &docs[2]["metadata"]["annotations"];
        assert_eq!(
            nightly["ebb.io/payload"].as_str(),
            Some("{\"kind\": \"nightly\"}")
        );
        assert_eq!(docs[2]["spec"]["replicas"].as_u64(), Some(0));
    }

    #[test]
    fn annotations_read_back_as_the_stack_function() {
        let r = render(STACK, "img", "shop").expect("render");
        let stack = Stack::parse(STACK).unwrap();
        for d in docs(&r.yaml).iter().filter(|d| d["kind"] == "Deployment") {
            let name = d["metadata"]["name"].as_str().unwrap();
            let annotations: BTreeMap<String, String> =
                serde_norway::from_value(d["metadata"]["annotations"].clone()).unwrap();
            let mut back =
                FunctionSpec::from_annotations(name, "shop", &annotations, &BTreeMap::new())
                    .unwrap()
                    .unwrap();
            // In Kubernetes the function is reached through its Service.
            assert_eq!(back.url, Some(format!("http://{name}.shop.svc:8080")));
            back.url = None;
            let mut want = stack
                .functions
                .iter()
                .find(|f| f.name == name)
                .unwrap()
                .clone();
            want.namespace = "shop".into();
            want.url = None;
            want.command = Vec::new();
            assert_eq!(back, want, "{name}");
        }
    }

    #[test]
    fn a_bad_stack_file_is_refused_naming_the_problem() {
        let e = render(
            "functions:\n  - name: x\n    command: [cat]\n    target: lots\n",
            "i",
            "n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("target") && e.contains("lots"), "{e}");
    }
}
