//! The settings table shared by annotations (`ebb.io/<key>`) and stack files
//! (`<key>`), and the builder that turns key/value pairs into a
//! [`FunctionSpec`], collecting every error on the way.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use crate::ConfigError;
use crate::spec::{Concurrency, FunctionSpec, KafkaOrdering, Prometheus};
use crate::values::{self, MetricSelector};

/// One setting key. [`Key::name`] is the key without the `ebb.io/` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Topics,
    Schedule,
    Timezone,
    MinReplicas,
    MaxReplicas,
    Target,
    ScaleToZeroAfter,
    ScaleDownWindow,
    Activation,
    Timeout,
    MaxInflight,
    MaxAttempts,
    DeadLetter,
    Url,
    Concurrency,
    StartingDeadline,
    Payload,
    KafkaOrdering,
    Queue,
    ConsumerGroup,
    PrometheusUrl,
    PrometheusMetric,
    PrometheusServer,
    PrometheusQuery,
    Paused,
    FallbackReplicas,
    Prewarm,
}

/// What a boolean setting accepts.
pub(crate) const BOOLEAN: &str = r#""true" or "false""#;
const DURATION: &str = r#"a duration like "30s", "5m", "1h30m", "500ms" or whole seconds"#;

impl Key {
    pub(crate) const ALL: [Key; 27] = [
        Key::Topics,
        Key::Schedule,
        Key::Timezone,
        Key::MinReplicas,
        Key::MaxReplicas,
        Key::Target,
        Key::ScaleToZeroAfter,
        Key::ScaleDownWindow,
        Key::Activation,
        Key::Timeout,
        Key::MaxInflight,
        Key::MaxAttempts,
        Key::DeadLetter,
        Key::Url,
        Key::Concurrency,
        Key::StartingDeadline,
        Key::Payload,
        Key::KafkaOrdering,
        Key::Queue,
        Key::ConsumerGroup,
        Key::PrometheusUrl,
        Key::PrometheusMetric,
        Key::PrometheusServer,
        Key::PrometheusQuery,
        Key::Paused,
        Key::FallbackReplicas,
        Key::Prewarm,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Key::Topics => "topics",
            Key::Schedule => "schedule",
            Key::Timezone => "timezone",
            Key::MinReplicas => "min-replicas",
            Key::MaxReplicas => "max-replicas",
            Key::Target => "target",
            Key::ScaleToZeroAfter => "scale-to-zero-after",
            Key::ScaleDownWindow => "scale-down-window",
            Key::Activation => "activation",
            Key::Timeout => "timeout",
            Key::MaxInflight => "max-inflight",
            Key::MaxAttempts => "max-attempts",
            Key::DeadLetter => "dead-letter",
            Key::Url => "url",
            Key::Concurrency => "concurrency",
            Key::StartingDeadline => "starting-deadline",
            Key::Payload => "payload",
            Key::KafkaOrdering => "kafka-ordering",
            Key::Queue => "queue",
            Key::ConsumerGroup => "consumer-group",
            Key::PrometheusUrl => "prometheus-url",
            Key::PrometheusMetric => "prometheus-metric",
            Key::PrometheusServer => "prometheus-server",
            Key::PrometheusQuery => "prometheus-query",
            Key::Paused => "paused",
            Key::FallbackReplicas => "fallback-replicas",
            Key::Prewarm => "prewarm",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What a good value looks like, for error messages.
    pub(crate) fn expected(self) -> &'static str {
        match self {
            Key::Topics => "comma-separated topics without spaces or empty entries",
            Key::Schedule => r#"a cron expression like "*/5 * * * *" or "@every 30s""#,
            Key::Timezone => r#"an IANA time zone like "Europe/Berlin""#,
            Key::MinReplicas | Key::FallbackReplicas => "a whole number ≥ 0",
            Key::MaxReplicas | Key::MaxInflight | Key::MaxAttempts => "a whole number ≥ 1",
            Key::Target => "a number > 0",
            Key::Activation => "a number ≥ 0",
            Key::ScaleToZeroAfter | Key::ScaleDownWindow | Key::StartingDeadline => DURATION,
            Key::Timeout => r#"a duration above zero like "30s", "5m" or "500ms""#,
            Key::DeadLetter => "a topic without spaces or commas, or `none`",
            Key::Url | Key::PrometheusUrl | Key::PrometheusServer => "an http:// or https:// URL",
            Key::Concurrency => r#"one of "forbid", "allow", "replace""#,
            Key::Payload => "a string",
            Key::KafkaOrdering => r#"one of "partition", "key", "none""#,
            Key::Queue | Key::ConsumerGroup => "a non-empty name",
            Key::PrometheusMetric => r#"a series selector like name{label="value"}"#,
            Key::PrometheusQuery => "a non-empty PromQL query",
            Key::Paused | Key::Prewarm => BOOLEAN,
        }
    }
}

/// A value as handed to the builder: text, or a YAML list/mapping where text
/// was needed (already rendered for the error message).
pub(crate) enum Raw<'a> {
    Text(Cow<'a, str>),
    Structured(String),
}

/// Which defaults a function starts from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    Ebb,
    /// Carries OpenFaaS settings: min 1, max 20, idle 15m (OpenFaaS' defaults).
    OpenFaas,
}

/// Where the function came from, for the final checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A Deployment: the URL defaults to its Service.
    Kubernetes,
    /// A stack-file entry: needs a command or a URL. `command_written`
    /// says a `command` key was present (even if rejected).
    Stack { command_written: bool },
}

#[derive(Default)]
struct PromParts {
    url: Option<String>,
    metric: Option<MetricSelector>,
    server: Option<String>,
    query: Option<String>,
}

pub(crate) struct Builder {
    /// How errors name the function.
    function: String,
    /// `ebb.io/` for annotations, empty for stack files.
    prefix: &'static str,
    spec: FunctionSpec,
    /// Keys that were set, with the key as written.
    given: BTreeMap<Key, String>,
    /// Keys whose value was rejected.
    failed: BTreeSet<Key>,
    prom: PromParts,
    errors: Vec<ConfigError>,
}

impl Builder {
    pub(crate) fn new(
        function: String,
        spec: FunctionSpec,
        prefix: &'static str,
        flavour: Flavour,
    ) -> Self {
        let mut spec = spec;
        if flavour == Flavour::OpenFaas {
            spec.min_replicas = 1;
            spec.max_replicas = 20;
            spec.scale_to_zero_after = std::time::Duration::from_secs(15 * 60);
        }
        Self {
            function,
            prefix,
            spec,
            given: BTreeMap::new(),
            failed: BTreeSet::new(),
            prom: PromParts::default(),
            errors: Vec::new(),
        }
    }

    pub(crate) fn spec_mut(&mut self) -> &mut FunctionSpec {
        &mut self.spec
    }

    /// Records a rejected value of a key outside the table (`name`, `command`, OpenFaaS labels).
    pub(crate) fn invalid(&mut self, key: &str, value: &str, expected: &'static str) {
        self.errors.push(ConfigError::InvalidValue {
            function: Some(self.function.clone()),
            key: key.to_owned(),
            value: value.to_owned(),
            expected,
            line: None,
        });
    }

    /// Records a key that is not in the table; `candidates` are bare names
    /// (besides the table) that would have been accepted.
    pub(crate) fn unknown(&mut self, key: &str, extra: &[&str]) {
        let bare = key.strip_prefix(self.prefix).unwrap_or(key);
        let names = Key::ALL
            .iter()
            .map(|k| k.name())
            .chain(extra.iter().copied());
        let suggestion = suggest(bare, names).map(|s| format!("{}{s}", self.prefix));
        self.errors.push(ConfigError::UnknownKey {
            function: Some(self.function.clone()),
            key: key.to_owned(),
            suggestion,
            line: None,
        });
    }

    /// Sets one key; `shown` is the key as written.
    pub(crate) fn set(&mut self, key: Key, shown: &str, raw: Raw<'_>) {
        self.given.insert(key, shown.to_owned());
        let text = match raw {
            Raw::Text(text) => text,
            Raw::Structured(rendered) => {
                self.failed.insert(key);
                self.invalid(shown, &rendered, key.expected());
                return;
            }
        };
        if self.apply(key, &text).is_none() {
            self.failed.insert(key);
            self.invalid(shown, &text, key.expected());
        }
    }

    /// Whether a table key was set (OpenFaaS settings yield to ebb ones).
    pub(crate) fn was_given(&self, key: Key) -> bool {
        self.given.contains_key(&key)
    }

    /// Marks a key as set by something other than its own value (OpenFaaS' `.zero`).
    pub(crate) fn note_given(&mut self, key: Key, shown: &str) {
        self.given.insert(key, shown.to_owned());
    }

    fn apply(&mut self, key: Key, raw: &str) -> Option<()> {
        let text = raw.trim();
        let spec = &mut self.spec;
        match key {
            Key::Topics => spec.topics = values::topics(text)?,
            Key::Schedule => spec.schedule = Some(non_empty(text)?.to_owned()),
            Key::Timezone => spec.timezone = ok_if(values::is_zone_name(text), text)?,
            Key::MinReplicas => spec.min_replicas = values::whole(text)?,
            Key::MaxReplicas => spec.max_replicas = values::whole(text).filter(|n| *n >= 1)?,
            Key::Target => spec.target = values::number(text).filter(|n| *n > 0.0)?,
            Key::ScaleToZeroAfter => spec.scale_to_zero_after = values::duration(text)?,
            Key::ScaleDownWindow => spec.scale_down_window = values::duration(text)?,
            Key::Activation => spec.activation = values::number(text).filter(|n| *n >= 0.0)?,
            Key::Timeout => spec.timeout = values::duration(text).filter(|d| !d.is_zero())?,
            Key::MaxInflight => spec.max_inflight = values::whole(text).filter(|n| *n >= 1)?,
            Key::MaxAttempts => spec.max_attempts = values::whole(text).filter(|n| *n >= 1)?,
            Key::DeadLetter => spec.dead_letter = Some(ok_if(values::is_topic(text), text)?),
            Key::Url => spec.url = Some(ok_if(values::is_http_url(text), text)?),
            Key::Concurrency => {
                spec.concurrency = match text {
                    "forbid" => Concurrency::Forbid,
                    "allow" => Concurrency::Allow,
                    "replace" => Concurrency::Replace,
                    _ => return None,
                }
            }
            Key::StartingDeadline => spec.starting_deadline = values::duration(text)?,
            // The body is sent as written: no trimming.
            Key::Payload => spec.payload = Some(raw.to_owned()),
            Key::KafkaOrdering => {
                spec.kafka_ordering = match text {
                    "partition" => KafkaOrdering::Partition,
                    "key" => KafkaOrdering::Key,
                    "none" => KafkaOrdering::None,
                    _ => return None,
                }
            }
            Key::Queue => spec.queue = Some(ok_if(values::is_plain_name(text), text)?),
            Key::ConsumerGroup => {
                spec.consumer_group = Some(ok_if(values::is_plain_name(text), text)?)
            }
            Key::PrometheusUrl => self.prom.url = Some(ok_if(values::is_http_url(text), text)?),
            Key::PrometheusMetric => self.prom.metric = Some(MetricSelector::parse(text)?),
            Key::PrometheusServer => {
                self.prom.server = Some(ok_if(values::is_http_url(text), text)?)
            }
            Key::PrometheusQuery => self.prom.query = Some(non_empty(text)?.to_owned()),
            Key::Paused => spec.paused = values::boolean(text)?,
            Key::FallbackReplicas => spec.fallback_replicas = Some(values::whole(text)?),
            Key::Prewarm => spec.prewarm = values::boolean(text)?,
        }
        Some(())
    }

    /// The key as written, or as it would be written when it was left at its default.
    fn shown(&self, key: Key) -> String {
        self.given
            .get(&key)
            .cloned()
            .unwrap_or_else(|| format!("{}{}", self.prefix, key.name()))
    }

    fn default_note(&self, key: Key) -> &'static str {
        if self.given.contains_key(&key) {
            ""
        } else {
            " (the default)"
        }
    }

    fn conflict(&mut self, key: Key, other: Key, reason: String) {
        self.errors.push(ConfigError::Conflict {
            function: Some(self.function.clone()),
            key: self.shown(key),
            other: self.shown(other),
            reason,
            line: None,
        });
    }

    fn missing(&mut self, key: String, reason: String) {
        self.errors.push(ConfigError::MissingKey {
            function: Some(self.function.clone()),
            key,
            reason,
            line: None,
        });
    }

    /// Cross-key checks, then the spec or every error found, in key order.
    pub(crate) fn finish(mut self, origin: Origin) -> Result<FunctionSpec, Vec<ConfigError>> {
        let ok = |b: &Self, keys: &[Key]| keys.iter().all(|k| !b.failed.contains(k));

        // A schedule is checked with its zone: a cron connector would skip
        // the function, so say so now, naming the key at fault.
        if let Some(expr) = self.spec.schedule.clone()
            && ok(&self, &[Key::Schedule, Key::Timezone])
            && let Err(e) = crate::schedule::Schedule::parse(&expr, &self.spec.timezone)
        {
            let key = match e.key() {
                "timezone" => Key::Timezone,
                _ => Key::Schedule,
            };
            self.errors.push(ConfigError::BadValue {
                function: Some(self.function.clone()),
                key: self.shown(key),
                reason: e.to_string(),
                line: None,
            });
        }

        let (min, max) = (self.spec.min_replicas, self.spec.max_replicas);
        if ok(&self, &[Key::MinReplicas, Key::MaxReplicas]) && min > max {
            let reason = format!(
                "minimum {min}{} is above maximum {max}{}",
                self.default_note(Key::MinReplicas),
                self.default_note(Key::MaxReplicas)
            );
            self.conflict(Key::MinReplicas, Key::MaxReplicas, reason);
        } else if let Some(fallback) = self.spec.fallback_replicas
            && ok(
                &self,
                &[Key::FallbackReplicas, Key::MinReplicas, Key::MaxReplicas],
            )
            && !(min..=max).contains(&fallback)
        {
            let (other, bound) = if fallback < min {
                (
                    Key::MinReplicas,
                    format!("below minimum {min}{}", self.default_note(Key::MinReplicas)),
                )
            } else {
                (
                    Key::MaxReplicas,
                    format!("above maximum {max}{}", self.default_note(Key::MaxReplicas)),
                )
            };
            self.conflict(
                Key::FallbackReplicas,
                other,
                format!("fallback {fallback} is {bound}"),
            );
        }

        let pairs = [
            (Key::PrometheusUrl, Key::PrometheusMetric),
            (Key::PrometheusServer, Key::PrometheusQuery),
        ];
        for (a, b) in pairs {
            match (self.was_given(a), self.was_given(b)) {
                (true, false) => {
                    self.missing(self.shown(b), format!("needed with {:?}", self.shown(a)))
                }
                (false, true) => {
                    self.missing(self.shown(a), format!("needed with {:?}", self.shown(b)))
                }
                _ => {}
            }
        }
        let scrape = self.was_given(Key::PrometheusUrl) || self.was_given(Key::PrometheusMetric);
        let query = self.was_given(Key::PrometheusServer) || self.was_given(Key::PrometheusQuery);
        if scrape && query {
            let (a, b) = (
                if self.was_given(Key::PrometheusUrl) {
                    Key::PrometheusUrl
                } else {
                    Key::PrometheusMetric
                },
                if self.was_given(Key::PrometheusServer) {
                    Key::PrometheusServer
                } else {
                    Key::PrometheusQuery
                },
            );
            let reason = "use a scrape (prometheus-url + prometheus-metric) or a query \
                          (prometheus-server + prometheus-query), not both";
            self.conflict(a, b, reason.to_owned());
        }
        let prom = std::mem::take(&mut self.prom);
        self.spec.prometheus = match prom {
            PromParts {
                url: Some(url),
                metric: Some(metric),
                ..
            } => Some(Prometheus::Scrape { url, metric }),
            PromParts {
                server: Some(server),
                query: Some(query),
                ..
            } => Some(Prometheus::Query { server, query }),
            _ => None,
        };

        match origin {
            Origin::Kubernetes => {
                if self.spec.url.is_none() {
                    self.spec.url = Some(format!(
                        "http://{}.{}.svc:8080",
                        self.spec.name, self.spec.namespace
                    ));
                }
            }
            Origin::Stack { command_written } => {
                if !command_written && !self.was_given(Key::Url) {
                    let reason = r#"a function needs a "url" to call or a "command" that ebb runs"#;
                    self.missing("url".to_owned(), reason.to_owned());
                }
            }
        }

        if self.errors.is_empty() {
            Ok(self.spec)
        } else {
            Err(self.errors)
        }
    }
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

fn ok_if(ok: bool, text: &str) -> Option<String> {
    ok.then(|| text.to_owned())
}

/// The closest known name within a small edit distance, for "did you mean".
pub(crate) fn suggest<'a>(
    unknown: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (unknown.chars().count() / 3).clamp(1, 3);
    known
        .into_iter()
        .map(|name| (edit_distance(unknown, name), name))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_unique_name() {
        for key in Key::ALL {
            assert_eq!(Key::from_name(key.name()), Some(key));
        }
        let names: BTreeSet<_> = Key::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), Key::ALL.len());
    }

    #[test]
    fn suggestions() {
        let known = ["max-replicas", "min-replicas", "topics", "url"];
        assert_eq!(suggest("max-replica", known), Some("max-replicas"));
        assert_eq!(suggest("topic", known), Some("topics"));
        assert_eq!(suggest("maxreplicas", known), Some("max-replicas"));
        assert_eq!(suggest("uri", known), Some("url"));
        assert_eq!(suggest("completely-else", known), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
