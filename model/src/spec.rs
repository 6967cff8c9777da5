//! [`FunctionSpec`]: one function's ebb settings, and how they are read from a
//! Deployment's annotations and labels.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::ConfigError;
use crate::keys::{BOOLEAN, Builder, Flavour, Key, Origin, Raw};
use crate::values::{self, MetricSelector};

/// The namespace of functions that are not on Kubernetes (stack files).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The prefix of ebb's annotations: `ebb.io/<key>`.
pub const ANNOTATION_PREFIX: &str = "ebb.io/";

/// OpenFaaS' magic topic that its cron-connector requires next to `schedule`;
/// ebb needs no such marker, so it is not a real topic here.
const OPENFAAS_CRON_TOPIC: &str = "cron-function";

const OPENFAAS_MIN: &str = "com.openfaas.scale.min";
const OPENFAAS_MAX: &str = "com.openfaas.scale.max";
const OPENFAAS_ZERO: &str = "com.openfaas.scale.zero";
const OPENFAAS_ZERO_DURATION: &str = "com.openfaas.scale.zero-duration";

/// One function's ebb settings, from a Deployment's annotations
/// ([`FunctionSpec::from_annotations`]) or a stack-file entry
/// ([`Stack::parse`](crate::Stack::parse)). Each field names its key
/// (`ebb.io/<key>` on Kubernetes, `<key>` in a stack file) and its default.
///
/// Parsing guarantees `min_replicas <= max_replicas`, `max_replicas`,
/// `max_inflight`, `max_attempts` ≥ 1, `target` > 0 and a non-zero `timeout`.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    /// The Deployment's or stack entry's name.
    pub name: String,
    /// The Deployment's namespace; [`DEFAULT_NAMESPACE`] for stack files.
    pub namespace: String,
    /// `url`: where the function listens. Always set for Kubernetes functions
    /// (default `http://NAME.NAMESPACE.svc:8080`); `None` for a stack-file
    /// function that only has a `command`.
    pub url: Option<String>,
    /// `command` (stack files only): the handler `ebb dev` runs under
    /// `ebb worker`. A string in the file becomes `["sh", "-c", STRING]`.
    pub command: Vec<String>,
    /// `topics`: the topics it receives (none by default).
    pub topics: Vec<String>,
    /// `schedule`: a cron expression, as written (the cron crate checks it).
    pub schedule: Option<String>,
    /// `timezone`: IANA zone of the schedule, default `UTC` (checked by the cron crate).
    pub timezone: String,
    /// `min-replicas`, default 0 (0 = scale to zero).
    pub min_replicas: u32,
    /// `max-replicas`, default 10.
    pub max_replicas: u32,
    /// `target`: backlog per replica the autoscaler aims for, default 10.
    /// Fractional, because Prometheus values are.
    pub target: f64,
    /// `scale-to-zero-after`: idle time before 1 → 0, default 60 s.
    pub scale_to_zero_after: Duration,
    /// `scale-down-window`: stabilization before stepping down, default 60 s.
    pub scale_down_window: Duration,
    /// `activation`: backlog above which 0 → 1, default 0.
    pub activation: f64,
    /// `timeout`: per-call timeout of a delivery, default 30 s.
    pub timeout: Duration,
    /// `max-inflight`: concurrent deliveries per replica, default 16.
    pub max_inflight: u32,
    /// `max-attempts`: calls per event, the first included, default 5.
    pub max_attempts: u32,
    /// `dead-letter`: topic where exhausted events go; `None` for the
    /// function's default destination, [`NO_DEAD_LETTER`] to drop them. Read
    /// it with [`FunctionSpec::dead_letter_topic`].
    pub dead_letter: Option<String>,
    /// `concurrency`: what a cron tick does while the previous one still runs.
    pub concurrency: Concurrency,
    /// `starting-deadline`: how late a missed cron tick may still fire, default 0 (never).
    pub starting_deadline: Duration,
    /// `payload`: body of each cron fire, as written (empty when `None`).
    pub payload: Option<String>,
    /// `kafka-ordering`, default `partition`.
    pub kafka_ordering: KafkaOrdering,
    /// `queue`: an existing AMQP queue to consume; see [`FunctionSpec::queue_name`].
    pub queue: Option<String>,
    /// `consumer-group`: an existing Kafka group; see [`FunctionSpec::consumer_group_name`].
    pub consumer_group: Option<String>,
    /// `prometheus-url` + `prometheus-metric`, or `prometheus-server` + `prometheus-query`.
    pub prometheus: Option<Prometheus>,
    /// `paused`: `true` freezes the replica count.
    pub paused: bool,
    /// `fallback-replicas`: count used after the metric was unknown for a
    /// while; `None` holds the current count. Within the replica bounds.
    pub fallback_replicas: Option<u32>,
    /// `prewarm`: a scheduled function at zero is scaled to one replica
    /// ahead of each tick, by its measured cold start, so the fire does not
    /// wait for a wake-up; default `true`.
    pub prewarm: bool,
}

/// `concurrency`: what a cron tick does while the previous fire still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Skip the new tick (the default).
    #[default]
    Forbid,
    /// Run both.
    Allow,
    /// Cancel the running fire, start the new one.
    Replace,
}

impl Concurrency {
    /// The value as written in a setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbid => "forbid",
            Self::Allow => "allow",
            Self::Replace => "replace",
        }
    }
}

/// `kafka-ordering`: which deliveries of a Kafka function must be in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaOrdering {
    /// One at a time per partition (the default).
    #[default]
    Partition,
    /// One at a time per message key.
    Key,
    /// No ordering: as many at once as the function allows.
    None,
}

impl KafkaOrdering {
    /// The value as written in a setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Partition => "partition",
            Self::Key => "key",
            Self::None => "none",
        }
    }
}

/// Where the autoscaler reads a function's Prometheus input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prometheus {
    /// `prometheus-url` + `prometheus-metric`: scrape a `/metrics` endpoint
    /// and read one series.
    Scrape {
        /// The endpoint.
        url: String,
        /// The series.
        metric: MetricSelector,
    },
    /// `prometheus-server` + `prometheus-query`: a PromQL instant query.
    Query {
        /// The Prometheus server's base URL.
        server: String,
        /// The query.
        query: String,
    },
}

/// The name ebb derives for a function's broker resources (JetStream
/// durable, AMQP queue, Kafka consumer group): `ebb-{namespace}-{function}`
/// with every character outside `[A-Za-z0-9_-]` replaced by `_`.
pub fn resource_name(namespace: &str, function: &str) -> String {
    format!("ebb-{}-{}", token(namespace), token(function))
}

/// `text` with every character outside `[A-Za-z0-9_-]` replaced by `_`: a
/// name every broker accepts, and one NATS subject token.
fn token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `dead-letter: none`: exhausted events are dropped (and counted).
pub const NO_DEAD_LETTER: &str = "none";

impl FunctionSpec {
    /// A function with every setting at ebb's default (no URL, no topics).
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            url: None,
            command: Vec::new(),
            topics: Vec::new(),
            schedule: None,
            timezone: "UTC".to_owned(),
            min_replicas: 0,
            max_replicas: 10,
            target: 10.0,
            scale_to_zero_after: Duration::from_secs(60),
            scale_down_window: Duration::from_secs(60),
            activation: 0.0,
            timeout: Duration::from_secs(30),
            max_inflight: 16,
            max_attempts: 5,
            dead_letter: None,
            concurrency: Concurrency::Forbid,
            starting_deadline: Duration::ZERO,
            payload: None,
            kafka_ordering: KafkaOrdering::Partition,
            queue: None,
            consumer_group: None,
            prometheus: None,
            paused: false,
            fallback_replicas: None,
            prewarm: true,
        }
    }

    /// Reads a Deployment's settings.
    ///
    /// ebb reads the annotations `ebb.io/<key>` and, for OpenFaaS functions,
    /// the annotations `topic` (comma-separated) and `schedule` and the labels
    /// `com.openfaas.scale.min`, `.max`, `.zero` and `.zero-duration`.
    /// A function with any OpenFaaS setting starts from OpenFaaS' defaults
    /// (min 1, or 0 when `com.openfaas.scale.zero=true`; max 20; 15 min idle
    /// before zero); an `ebb.io/` key wins over its OpenFaaS counterpart. The
    /// OpenFaaS marker topic `cron-function` is dropped.
    ///
    /// Returns `Ok(None)` when the object has neither kind of setting: ebb
    /// never touches it. Unknown `ebb.io/` keys are errors. When several
    /// settings are wrong, the error is the first in key order. Errors name
    /// the function `namespace/name`.
    pub fn from_annotations(
        name: &str,
        namespace: &str,
        annotations: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<FunctionSpec>, ConfigError> {
        let ebb: Vec<(&str, &str, &str)> = annotations
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), k.strip_prefix(ANNOTATION_PREFIX)?, v.as_str())))
            .collect();
        let topic = annotations.get("topic");
        let schedule = annotations.get("schedule");
        let [min, max, zero, zero_duration] = [
            OPENFAAS_MIN,
            OPENFAAS_MAX,
            OPENFAAS_ZERO,
            OPENFAAS_ZERO_DURATION,
        ]
        .map(|l| labels.get(l));
        let openfaas = [topic, schedule, min, max, zero, zero_duration]
            .iter()
            .any(Option::is_some);
        if ebb.is_empty() && !openfaas {
            return Ok(None);
        }

        let flavour = if openfaas {
            Flavour::OpenFaas
        } else {
            Flavour::Ebb
        };
        let mut b = Builder::new(
            format!("{namespace}/{name}"),
            FunctionSpec::new(name, namespace),
            ANNOTATION_PREFIX,
            flavour,
        );
        for (shown, bare, value) in &ebb {
            match Key::from_name(bare) {
                Some(key) => b.set(key, shown, Raw::Text(Cow::Borrowed(value))),
                None => b.unknown(shown, &[]),
            }
        }

        // OpenFaaS settings fill in only what no `ebb.io/` key set.
        let text = |v: &String| Raw::Text(Cow::Owned(v.clone()));
        if let Some(v) = topic.filter(|_| !b.was_given(Key::Topics)) {
            b.set(Key::Topics, "topic", text(v));
            b.spec_mut().topics.retain(|t| t != OPENFAAS_CRON_TOPIC);
        }
        if let Some(v) = schedule.filter(|_| !b.was_given(Key::Schedule)) {
            b.set(Key::Schedule, "schedule", text(v));
        }
        if let Some(v) = max.filter(|_| !b.was_given(Key::MaxReplicas)) {
            b.set(Key::MaxReplicas, OPENFAAS_MAX, text(v));
        }
        if let Some(v) = zero_duration.filter(|_| !b.was_given(Key::ScaleToZeroAfter)) {
            b.set(Key::ScaleToZeroAfter, OPENFAAS_ZERO_DURATION, text(v));
        }
        if !b.was_given(Key::MinReplicas) {
            if let Some(v) = min {
                b.set(Key::MinReplicas, OPENFAAS_MIN, text(v));
            }
            if let Some(v) = zero {
                match values::boolean(v.trim()) {
                    Some(true) => {
                        b.spec_mut().min_replicas = 0;
                        b.note_given(Key::MinReplicas, OPENFAAS_ZERO);
                    }
                    Some(false) => {}
                    None => b.invalid(OPENFAAS_ZERO, v, BOOLEAN),
                }
            }
        }

        b.finish(Origin::Kubernetes)
            .map(Some)
            // `finish` fails only with at least one error.
            .map_err(|mut errors| errors.swap_remove(0))
    }

    /// Where this function's exhausted events go: its `dead-letter` topic,
    /// or by default `ebb.dead.{namespace}.{function}` (each part as in
    /// [`resource_name`]); `None` with `dead-letter: none`.
    pub fn dead_letter_topic(&self) -> Option<String> {
        match self.dead_letter.as_deref() {
            Some(NO_DEAD_LETTER) => None,
            Some(topic) => Some(topic.to_owned()),
            None => Some(self.default_dead_letter()),
        }
    }

    /// The default dead-letter topic (subject): `ebb.dead.{namespace}.{function}`.
    pub fn default_dead_letter(&self) -> String {
        format!("ebb.dead.{}.{}", token(&self.namespace), token(&self.name))
    }

    /// The RabbitMQ queue that keeps the default dead letters:
    /// `ebb-dead-{namespace}-{function}` (each part as in [`resource_name`]).
    pub fn default_dead_letter_queue(&self) -> String {
        format!("ebb-dead-{}-{}", token(&self.namespace), token(&self.name))
    }

    /// The JetStream durable consumer: [`resource_name`] of this function.
    pub fn durable_name(&self) -> String {
        resource_name(&self.namespace, &self.name)
    }

    /// The AMQP queue: `queue` when set, else [`resource_name`].
    pub fn queue_name(&self) -> String {
        self.queue.clone().unwrap_or_else(|| self.durable_name())
    }

    /// The Kafka consumer group: `consumer-group` when set, else [`resource_name`].
    pub fn consumer_group_name(&self) -> String {
        self.consumer_group
            .clone()
            .unwrap_or_else(|| self.durable_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn parse(
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
    ) -> Result<Option<FunctionSpec>, ConfigError> {
        FunctionSpec::from_annotations("echo", "shop", &map(annotations), &map(labels))
    }

    fn spec(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> FunctionSpec {
        match parse(annotations, labels) {
            Ok(Some(spec)) => spec,
            other => panic!("{annotations:?} {labels:?}: {other:?}"),
        }
    }

    fn error(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> ConfigError {
        match parse(annotations, labels) {
            Err(e) => e,
            other => panic!("{annotations:?} {labels:?}: expected an error, got {other:?}"),
        }
    }

    /// ebb's defaults for the test function on Kubernetes.
    fn base() -> FunctionSpec {
        let mut spec = FunctionSpec::new("echo", "shop");
        spec.url = Some("http://echo.shop.svc:8080".into());
        spec
    }

    /// A parsed selector, for expected values.
    fn selector(text: &str) -> MetricSelector {
        MetricSelector::parse(text).expect("valid selector")
    }

    #[test]
    fn defaults() {
        let spec = FunctionSpec::new("f", "ns");
        assert_eq!(spec.timezone, "UTC");
        assert_eq!((spec.min_replicas, spec.max_replicas), (0, 10));
        assert_eq!(spec.target, 10.0);
        assert_eq!(spec.scale_to_zero_after, Duration::from_secs(60));
        assert_eq!(spec.scale_down_window, Duration::from_secs(60));
        assert_eq!(spec.activation, 0.0);
        assert_eq!(spec.timeout, Duration::from_secs(30));
        assert_eq!(spec.max_inflight, 16);
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(spec.concurrency, Concurrency::Forbid);
        assert_eq!(spec.starting_deadline, Duration::ZERO);
        assert_eq!(spec.kafka_ordering, KafkaOrdering::Partition);
        assert!(!spec.paused);
        assert!(spec.prewarm);
        assert_eq!(
            (
                &spec.url,
                &spec.schedule,
                &spec.dead_letter,
                &spec.payload,
                &spec.queue
            ),
            (&None, &None, &None, &None, &None)
        );
        assert_eq!(
            (
                spec.fallback_replicas,
                &spec.prometheus,
                &spec.consumer_group
            ),
            (None, &None, &None)
        );
        assert!(spec.topics.is_empty() && spec.command.is_empty());

        // One ebb setting is enough to be managed; everything else is default.
        let mut want = base();
        want.paused = false;
        assert_eq!(spec_of(&[("ebb.io/paused", "false")]), want);
    }

    fn spec_of(annotations: &[(&str, &str)]) -> FunctionSpec {
        spec(annotations, &[])
    }

    #[test]
    fn untouched_without_settings() {
        assert_eq!(parse(&[], &[]), Ok(None));
        let unrelated = [
            ("deployment.kubernetes.io/revision", "3"),
            ("ebb.iox/topics", "a"),
            ("topics", "a"),
        ];
        let labels = [
            ("app", "echo"),
            ("faas_function", "echo"),
            ("com.openfaas.scale.type", "rps"),
        ];
        assert_eq!(parse(&unrelated, &labels), Ok(None));
        // OpenFaaS names count only where OpenFaaS puts them.
        assert_eq!(
            parse(&[("com.openfaas.scale.min", "2")], &[("topic", "a")]),
            Ok(None)
        );
    }

    #[test]
    fn every_key_good_values() {
        type Row = (&'static str, &'static str, fn(&mut FunctionSpec));
        let rows: &[Row] = &[
            ("topics", "orders", |s| s.topics = vec!["orders".into()]),
            ("topics", " orders , payments,orders ", |s| {
                s.topics = vec!["orders".into(), "payments".into()]
            }),
            ("topics", "", |_| {}),
            ("schedule", "*/5 * * * *", |s| {
                s.schedule = Some("*/5 * * * *".into())
            }),
            ("schedule", " @every 30s ", |s| {
                s.schedule = Some("@every 30s".into())
            }),
            ("timezone", "Europe/Berlin", |s| {
                s.timezone = "Europe/Berlin".into()
            }),
            ("min-replicas", "2", |s| s.min_replicas = 2),
            ("min-replicas", "10", |s| s.min_replicas = 10),
            ("max-replicas", "1", |s| s.max_replicas = 1),
            ("max-replicas", " 40 ", |s| s.max_replicas = 40),
            ("target", "20", |s| s.target = 20.0),
            ("target", "0.5", |s| s.target = 0.5),
            ("scale-to-zero-after", "5m", |s| {
                s.scale_to_zero_after = Duration::from_secs(300)
            }),
            ("scale-to-zero-after", "0", |s| {
                s.scale_to_zero_after = Duration::ZERO
            }),
            ("scale-down-window", "1h30m", |s| {
                s.scale_down_window = Duration::from_secs(5400)
            }),
            ("scale-down-window", "90", |s| {
                s.scale_down_window = Duration::from_secs(90)
            }),
            ("activation", "5", |s| s.activation = 5.0),
            ("activation", "0.25", |s| s.activation = 0.25),
            ("timeout", "500ms", |s| {
                s.timeout = Duration::from_millis(500)
            }),
            ("timeout", "2m", |s| s.timeout = Duration::from_secs(120)),
            ("max-inflight", "1", |s| s.max_inflight = 1),
            ("max-attempts", "1", |s| s.max_attempts = 1),
            ("max-attempts", "12", |s| s.max_attempts = 12),
            ("dead-letter", "orders.dead", |s| {
                s.dead_letter = Some("orders.dead".into())
            }),
            ("url", "http://10.0.0.1:9000/fn", |s| {
                s.url = Some("http://10.0.0.1:9000/fn".into())
            }),
            ("url", "https://fn.example", |s| {
                s.url = Some("https://fn.example".into())
            }),
            ("concurrency", "forbid", |s| {
                s.concurrency = Concurrency::Forbid
            }),
            ("concurrency", "allow", |s| {
                s.concurrency = Concurrency::Allow
            }),
            ("concurrency", "replace", |s| {
                s.concurrency = Concurrency::Replace
            }),
            ("starting-deadline", "30s", |s| {
                s.starting_deadline = Duration::from_secs(30)
            }),
            ("payload", " {\"job\": 1}\n", |s| {
                s.payload = Some(" {\"job\": 1}\n".into())
            }),
            ("payload", "", |s| s.payload = Some(String::new())),
            ("kafka-ordering", "partition", |s| {
                s.kafka_ordering = KafkaOrdering::Partition
            }),
            ("kafka-ordering", "key", |s| {
                s.kafka_ordering = KafkaOrdering::Key
            }),
            ("kafka-ordering", "none", |s| {
                s.kafka_ordering = KafkaOrdering::None
            }),
            ("queue", "legacy-jobs", |s| {
                s.queue = Some("legacy-jobs".into())
            }),
            ("consumer-group", "billing", |s| {
                s.consumer_group = Some("billing".into())
            }),
            ("paused", "true", |s| s.paused = true),
            ("paused", "false", |s| s.paused = false),
            ("fallback-replicas", "0", |s| s.fallback_replicas = Some(0)),
            ("fallback-replicas", "3", |s| s.fallback_replicas = Some(3)),
            ("prewarm", "false", |s| s.prewarm = false),
            ("prewarm", " true ", |s| s.prewarm = true),
        ];
        for (key, value, change) in rows {
            let mut want = base();
            change(&mut want);
            let annotation = format!("{ANNOTATION_PREFIX}{key}");
            assert_eq!(spec_of(&[(&annotation, value)]), want, "{key}: {value:?}");
        }
    }

    #[test]
    fn every_key_bad_values() {
        let rows: &[(&str, &str, &str)] = &[
            ("topics", "a,,b", "comma-separated topics"),
            ("topics", "a b", "comma-separated topics"),
            ("topics", "a,", "comma-separated topics"),
            ("schedule", " ", "a cron expression"),
            ("timezone", "", "an IANA time zone"),
            ("timezone", "Europe/ Berlin", "an IANA time zone"),
            ("min-replicas", "-1", "a whole number ≥ 0"),
            ("min-replicas", "one", "a whole number ≥ 0"),
            ("max-replicas", "0", "a whole number ≥ 1"),
            ("max-replicas", "ten", "a whole number ≥ 1"),
            ("max-replicas", "2.5", "a whole number ≥ 1"),
            ("target", "0", "a number > 0"),
            ("target", "-3", "a number > 0"),
            ("target", "NaN", "a number > 0"),
            ("scale-to-zero-after", "soon", "a duration"),
            ("scale-down-window", "-1m", "a duration"),
            ("activation", "-1", "a number ≥ 0"),
            ("timeout", "0s", "a duration above zero"),
            ("timeout", "30 seconds please", "a duration above zero"),
            ("max-inflight", "0", "a whole number ≥ 1"),
            ("max-attempts", "0", "a whole number ≥ 1"),
            ("dead-letter", "", "a topic"),
            ("dead-letter", "a,b", "a topic"),
            ("url", "echo:8080", "an http:// or https:// URL"),
            ("url", "", "an http:// or https:// URL"),
            (
                "concurrency",
                "Forbid",
                r#"one of "forbid", "allow", "replace""#,
            ),
            ("starting-deadline", "yesterday", "a duration"),
            (
                "kafka-ordering",
                "random",
                r#"one of "partition", "key", "none""#,
            ),
            ("queue", "", "a non-empty name"),
            ("consumer-group", " ", "a non-empty name"),
            (
                "prometheus-url",
                "localhost:9090",
                "an http:// or https:// URL",
            ),
            ("prometheus-metric", "up{job=x}", "a series selector"),
            ("prometheus-server", "prom", "an http:// or https:// URL"),
            ("prometheus-query", "", "a non-empty PromQL query"),
            ("paused", "yes", r#""true" or "false""#),
            ("fallback-replicas", "some", "a whole number ≥ 0"),
            ("prewarm", "off", r#""true" or "false""#),
        ];
        for (key, value, expected) in rows {
            let annotation = format!("{ANNOTATION_PREFIX}{key}");
            let e = error(&[(&annotation, value)], &[]);
            let ConfigError::InvalidValue {
                function,
                key: shown,
                value: got,
                expected: want,
                ..
            } = &e
            else {
                panic!("{key}: {value:?}: {e:?}");
            };
            assert_eq!(function.as_deref(), Some("shop/echo"), "{key}");
            assert_eq!(shown, &annotation);
            assert_eq!(got, value);
            assert!(
                want.starts_with(expected),
                "{key}: expected {want:?} to start with {expected:?}"
            );
            let message = e.to_string();
            let head = format!(
                "function \"shop/echo\": key {annotation:?}: expected {want}, got {value:?}"
            );
            assert_eq!(message, head, "{key}");
            assert_eq!(e.metric_label(), "invalid_value");
        }
    }

    #[test]
    fn first_error_in_key_order() {
        let e = error(
            &[("ebb.io/timeout", "never"), ("ebb.io/max-replicas", "ten")],
            &[],
        );
        assert_eq!(e.key(), Some("ebb.io/max-replicas"));
    }

    #[test]
    fn unknown_keys() {
        let e = error(&[("ebb.io/topics", "a"), ("ebb.io/max-replica", "4")], &[]);
        assert_eq!(
            e,
            ConfigError::UnknownKey {
                function: Some("shop/echo".into()),
                key: "ebb.io/max-replica".into(),
                suggestion: Some("ebb.io/max-replicas".into()),
                line: None,
            }
        );
        assert_eq!(e.metric_label(), "unknown_key");
        assert!(
            e.to_string()
                .contains(r#"did you mean "ebb.io/max-replicas"?"#),
            "{e}"
        );

        // Stack-only keys are not annotations.
        let e = error(&[("ebb.io/command", "cat")], &[]);
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, .. } if key == "ebb.io/command"),
            "{e:?}"
        );
        let e = error(&[("ebb.io/", "x")], &[]);
        assert_eq!(e.key(), Some("ebb.io/"));
    }

    #[test]
    fn replica_bounds_must_fit() {
        let e = error(
            &[("ebb.io/min-replicas", "5"), ("ebb.io/max-replicas", "4")],
            &[],
        );
        assert_eq!(
            e.to_string(),
            r#"function "shop/echo": keys "ebb.io/min-replicas" and "ebb.io/max-replicas": minimum 5 is above maximum 4"#
        );
        assert_eq!(e.metric_label(), "conflict");
        let e = error(&[("ebb.io/min-replicas", "11")], &[]);
        assert!(
            e.to_string()
                .ends_with("minimum 11 is above maximum 10 (the default)"),
            "{e}"
        );
        let same = spec_of(&[("ebb.io/min-replicas", "3"), ("ebb.io/max-replicas", "3")]);
        assert_eq!((same.min_replicas, same.max_replicas), (3, 3));

        // A rejected value does not also cause a conflict.
        let e = error(
            &[("ebb.io/min-replicas", "x"), ("ebb.io/max-replicas", "0")],
            &[],
        );
        assert_eq!(e.metric_label(), "invalid_value");

        let e = error(&[("ebb.io/fallback-replicas", "12")], &[]);
        assert_eq!(e.key(), Some("ebb.io/fallback-replicas"));
        assert!(
            e.to_string()
                .ends_with("fallback 12 is above maximum 10 (the default)"),
            "{e}"
        );
        let e = error(
            &[
                ("ebb.io/fallback-replicas", "1"),
                ("ebb.io/min-replicas", "2"),
            ],
            &[],
        );
        assert!(
            e.to_string()
                .contains(r#"and "ebb.io/min-replicas": fallback 1 is below minimum 2"#),
            "{e}"
        );
    }

    #[test]
    fn prometheus_pairs() {
        let scrape = spec_of(&[
            ("ebb.io/prometheus-url", "http://app:9100/metrics"),
            ("ebb.io/prometheus-metric", r#"jobs_waiting{queue="mail"}"#),
        ]);
        assert_eq!(
            scrape.prometheus,
            Some(Prometheus::Scrape {
                url: "http://app:9100/metrics".into(),
                metric: selector(r#"jobs_waiting{queue="mail"}"#),
            })
        );
        let query = spec_of(&[
            ("ebb.io/prometheus-server", "http://prometheus:9090"),
            ("ebb.io/prometheus-query", "sum(rate(x[1m]))"),
        ]);
        assert_eq!(
            query.prometheus,
            Some(Prometheus::Query {
                server: "http://prometheus:9090".into(),
                query: "sum(rate(x[1m]))".into()
            })
        );

        let missing = [
            (
                ("ebb.io/prometheus-url", "http://a/metrics"),
                "ebb.io/prometheus-metric",
                "ebb.io/prometheus-url",
            ),
            (
                ("ebb.io/prometheus-metric", "up"),
                "ebb.io/prometheus-url",
                "ebb.io/prometheus-metric",
            ),
            (
                ("ebb.io/prometheus-server", "http://p"),
                "ebb.io/prometheus-query",
                "ebb.io/prometheus-server",
            ),
            (
                ("ebb.io/prometheus-query", "up"),
                "ebb.io/prometheus-server",
                "ebb.io/prometheus-query",
            ),
        ];
        for (given, needed, with) in missing {
            let e = error(&[given], &[]);
            assert_eq!(
                e,
                ConfigError::MissingKey {
                    function: Some("shop/echo".into()),
                    key: needed.into(),
                    reason: format!("needed with {with:?}"),
                    line: None,
                },
            );
            assert_eq!(e.metric_label(), "missing_key");
        }

        let e = error(
            &[
                ("ebb.io/prometheus-url", "http://a/metrics"),
                ("ebb.io/prometheus-metric", "up"),
                ("ebb.io/prometheus-server", "http://p"),
                ("ebb.io/prometheus-query", "up"),
            ],
            &[],
        );
        assert_eq!(e.metric_label(), "conflict");
        assert!(
            e.to_string()
                .contains(r#"keys "ebb.io/prometheus-url" and "ebb.io/prometheus-server""#),
            "{e}"
        );
    }

    #[test]
    fn openfaas_functions() {
        // OpenFaaS defaults: min 1, max 20, 15 minutes idle.
        let mut want = base();
        want.topics = vec!["orders".into(), "payments".into()];
        want.min_replicas = 1;
        want.max_replicas = 20;
        want.scale_to_zero_after = Duration::from_secs(15 * 60);
        assert_eq!(spec(&[("topic", "orders,payments")], &[]), want);

        // The cron-connector's marker topic is not a topic.
        let cron = spec(
            &[("topic", "cron-function"), ("schedule", "*/5 * * * *")],
            &[],
        );
        assert!(cron.topics.is_empty());
        assert_eq!(cron.schedule.as_deref(), Some("*/5 * * * *"));
        assert_eq!(cron.min_replicas, 1);

        let labels = [
            ("com.openfaas.scale.min", "2"),
            ("com.openfaas.scale.max", "7"),
            ("com.openfaas.scale.zero-duration", "5m"),
        ];
        let scaled = spec(&[], &labels);
        assert_eq!((scaled.min_replicas, scaled.max_replicas), (2, 7));
        assert_eq!(scaled.scale_to_zero_after, Duration::from_secs(300));

        // `.zero=true` is what lets an OpenFaaS function reach zero.
        let zero = spec(&[], &[("com.openfaas.scale.zero", "true")]);
        assert_eq!((zero.min_replicas, zero.max_replicas), (0, 20));
        let zero = spec(
            &[],
            &[
                ("com.openfaas.scale.zero", "true"),
                ("com.openfaas.scale.min", "3"),
            ],
        );
        assert_eq!(zero.min_replicas, 0);
        let not_zero = spec(&[], &[("com.openfaas.scale.zero", "false")]);
        assert_eq!(not_zero.min_replicas, 1);

        let e = error(&[], &[("com.openfaas.scale.zero", "maybe")]);
        assert_eq!(
            e.to_string(),
            r#"function "shop/echo": key "com.openfaas.scale.zero": expected "true" or "false", got "maybe""#
        );
        let e = error(&[], &[("com.openfaas.scale.max", "lots")]);
        assert_eq!(e.key(), Some("com.openfaas.scale.max"));
        let e = error(
            &[],
            &[
                ("com.openfaas.scale.min", "9"),
                ("com.openfaas.scale.max", "4"),
            ],
        );
        assert!(
            e.to_string().contains(
                r#"keys "com.openfaas.scale.min" and "com.openfaas.scale.max": minimum 9"#
            ),
            "{e}"
        );
        let e = error(&[("topic", "a,,b")], &[]);
        assert_eq!(e.key(), Some("topic"));
    }

    #[test]
    fn ebb_keys_win_over_openfaas() {
        let annotations = [
            ("topic", "old"),
            ("schedule", "* * * * *"),
            ("ebb.io/topics", "new"),
            ("ebb.io/schedule", "@hourly"),
            ("ebb.io/min-replicas", "0"),
            ("ebb.io/max-replicas", "3"),
            ("ebb.io/scale-to-zero-after", "30s"),
        ];
        let labels = [
            ("com.openfaas.scale.min", "2"),
            ("com.openfaas.scale.max", "9"),
            ("com.openfaas.scale.zero", "false"),
            ("com.openfaas.scale.zero-duration", "1h"),
        ];
        let s = spec(&annotations, &labels);
        assert_eq!(s.topics, ["new"]);
        assert_eq!(s.schedule.as_deref(), Some("@hourly"));
        assert_eq!((s.min_replicas, s.max_replicas), (0, 3));
        assert_eq!(s.scale_to_zero_after, Duration::from_secs(30));

        // An overridden OpenFaaS value is not even read.
        let s = spec(
            &[("ebb.io/min-replicas", "0")],
            &[("com.openfaas.scale.min", "junk")],
        );
        assert_eq!(s.min_replicas, 0);
        // Keys not overridden keep OpenFaaS' values and defaults.
        let s = spec(
            &[("ebb.io/topics", "a")],
            &[("com.openfaas.scale.max", "5")],
        );
        assert_eq!((s.min_replicas, s.max_replicas), (1, 5));
    }

    #[test]
    fn kubernetes_url() {
        assert_eq!(
            spec_of(&[("ebb.io/topics", "a")]).url.as_deref(),
            Some("http://echo.shop.svc:8080")
        );
        assert_eq!(
            spec_of(&[("ebb.io/url", "http://x:1")]).url.as_deref(),
            Some("http://x:1")
        );
    }

    #[test]
    fn derived_names() {
        assert_eq!(resource_name("default", "echo"), "ebb-default-echo");
        assert_eq!(resource_name("team.a", "fn.v2"), "ebb-team_a-fn_v2");
        assert_eq!(resource_name("ns", "a b/c*d>e:é"), "ebb-ns-a_b_c_d_e__");
        assert_eq!(resource_name("Ns_1", "A-b_C"), "ebb-Ns_1-A-b_C");

        let mut spec = FunctionSpec::new("echo", "shop");
        assert_eq!(spec.durable_name(), "ebb-shop-echo");
        assert_eq!(spec.queue_name(), "ebb-shop-echo");
        assert_eq!(spec.consumer_group_name(), "ebb-shop-echo");
        spec.queue = Some("legacy".into());
        spec.consumer_group = Some("billing".into());
        assert_eq!(spec.queue_name(), "legacy");
        assert_eq!(spec.consumer_group_name(), "billing");
        assert_eq!(spec.durable_name(), "ebb-shop-echo");
    }

    #[test]
    fn dead_letters_go_to_a_default_topic_unless_set_or_none() {
        let mut spec = FunctionSpec::new("fn.v2", "team.a");
        assert_eq!(
            spec.dead_letter_topic().as_deref(),
            Some("ebb.dead.team_a.fn_v2")
        );
        assert_eq!(spec.default_dead_letter_queue(), "ebb-dead-team_a-fn_v2");
        spec.dead_letter = Some("orders.dead".into());
        assert_eq!(spec.dead_letter_topic().as_deref(), Some("orders.dead"));
        spec = spec_of(&[("ebb.io/dead-letter", "none")]);
        assert_eq!(spec.dead_letter_topic(), None);
    }

    #[test]
    fn enum_names() {
        for c in [
            Concurrency::Forbid,
            Concurrency::Allow,
            Concurrency::Replace,
        ] {
            let s = spec_of(&[("ebb.io/concurrency", c.as_str())]);
            assert_eq!(s.concurrency, c);
        }
        for k in [
            KafkaOrdering::Partition,
            KafkaOrdering::Key,
            KafkaOrdering::None,
        ] {
            let s = spec_of(&[("ebb.io/kafka-ordering", k.as_str())]);
            assert_eq!(s.kafka_ordering, k);
        }
    }
}
