//! Stack files: the functions and brokers of a machine without Kubernetes.
//!
//! Entries use the annotation keys without the `ebb.io/` prefix, plus `name`
//! and `command`; each entry is turned into key/value text and handed to the
//! same builder as annotations, so both read every key the same way.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_norway::Value;

use crate::error::Quoted;
use crate::keys::{self, Builder, Flavour, Key, Origin, Raw};
use crate::spec::{DEFAULT_NAMESPACE, FunctionSpec};
use crate::values;
use crate::{ConfigError, StackError};

/// A parsed stack file.
///
/// ```yaml
/// functions:
///   - name: echo
///     url: http://127.0.0.1:8081
///     command: [cat]
///     topics: [orders, payments]
/// sources:
///   nats: nats://127.0.0.1:4222
/// ```
///
/// Top-level keys starting with `x-` are ignored, so they can hold YAML
/// anchors that entries merge with `<<: *defaults`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stack {
    /// The functions, in file order, all in namespace [`DEFAULT_NAMESPACE`].
    pub functions: Vec<FunctionSpec>,
    /// The brokers; `ebb dev` starts an in-memory bus when none is given.
    pub sources: Sources,
}

/// The `sources` section of a stack file: broker addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sources {
    /// `nats`: a NATS URL such as `nats://127.0.0.1:4222`.
    pub nats: Option<String>,
    /// `amqp`: an AMQP URL such as `amqp://127.0.0.1:5672`.
    pub amqp: Option<String>,
    /// `kafka`: bootstrap brokers, `host:port[,host:port]`.
    pub kafka: Option<String>,
}

/// Keys of a stack entry that are not annotation keys.
const STACK_ONLY: &[&str] = &["name", "command"];
const NAME: &str = "a DNS-1123 label: lowercase letters, digits and '-', \
                    starting and ending with a letter or digit, at most 63 characters";
const COMMAND: &str = "a non-empty list of strings, or one shell command line as a string";

impl Stack {
    /// Parses a stack file, refusing it when anything is wrong; the error
    /// lists every problem found (as `ebb dev` needs).
    pub fn parse(text: &str) -> Result<Stack, StackError> {
        let (stack, errors) = Self::parse_lenient(text);
        if errors.is_empty() {
            Ok(stack)
        } else {
            Err(StackError::new(errors))
        }
    }

    /// Parses a stack file keeping whatever is good: a function with a bad
    /// setting is left out, a bad source address is left unset, and every
    /// error is returned beside the result (as connectors need). A later
    /// function with a name already used is left out; the first one stays.
    pub fn parse_lenient(text: &str) -> (Stack, Vec<ConfigError>) {
        let mut stack = Stack::default();
        let mut errors = Vec::new();
        let mut doc: Value = match serde_norway::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                let line = e.location().map(|l| l.line());
                errors.push(ConfigError::Syntax {
                    message: format!("invalid YAML: {e}"),
                    line,
                });
                return (stack, errors);
            }
        };
        if let Err(e) = doc.apply_merge() {
            errors.push(ConfigError::Syntax {
                message: format!("invalid YAML merge (<<): {e}"),
                line: None,
            });
            return (stack, errors);
        }
        let top = match doc {
            Value::Null => return (stack, errors),
            Value::Mapping(top) => top,
            other => {
                let message = format!(
                    r#"expected a mapping with "functions" and "sources", got {}"#,
                    Quoted(&render(&other))
                );
                errors.push(ConfigError::Syntax {
                    message,
                    line: locate(text, &[]),
                });
                return (stack, errors);
            }
        };
        for (key, value) in &top {
            match key.as_str() {
                Some("functions") => {
                    parse_functions(text, value, &mut stack.functions, &mut errors)
                }
                Some("sources") => parse_sources(text, value, &mut stack.sources, &mut errors),
                Some(extension) if extension.starts_with("x-") => {}
                other => {
                    let key = render(key);
                    let suggestion =
                        keys::suggest(&key, ["functions", "sources"]).map(str::to_owned);
                    let line = other.and_then(|k| locate(text, &[Step::Key(k)]));
                    errors.push(ConfigError::UnknownKey {
                        function: None,
                        key,
                        suggestion,
                        line,
                    });
                }
            }
        }
        (stack, errors)
    }
}

fn parse_functions(
    text: &str,
    value: &Value,
    functions: &mut Vec<FunctionSpec>,
    errors: &mut Vec<ConfigError>,
) {
    let entries = match value {
        Value::Null => return,
        Value::Sequence(entries) => entries,
        other => {
            errors.push(ConfigError::InvalidValue {
                function: None,
                key: "functions".to_owned(),
                value: render(other),
                expected: "a list of functions",
                line: locate(text, &[Step::Key("functions")]),
            });
            return;
        }
    };
    let entry_line = |i: usize| locate(text, &[Step::Key("functions"), Step::Index(i)]);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        if let Some(name) = entry.get("name").and_then(scalar) {
            if let Some(&first) = seen.get(name.as_ref()) {
                errors.push(ConfigError::DuplicateFunction {
                    function: name.into_owned(),
                    first_line: entry_line(first),
                    line: entry_line(i),
                });
                continue;
            }
            seen.insert(name.into_owned(), i);
        }
        match parse_entry(i, entry) {
            Ok(spec) => functions.push(spec),
            Err(found) => errors.extend(found.into_iter().map(|mut e| {
                let at_key = e.key().and_then(|k| {
                    locate(
                        text,
                        &[Step::Key("functions"), Step::Index(i), Step::Key(k)],
                    )
                });
                e.set_line(at_key.or_else(|| entry_line(i)));
                e
            })),
        }
    }
}

/// One function entry: the same keys as the annotations, plus `name` and `command`.
fn parse_entry(index: usize, entry: &Value) -> Result<FunctionSpec, Vec<ConfigError>> {
    let Value::Mapping(map) = entry else {
        return Err(vec![ConfigError::InvalidValue {
            function: None,
            key: format!("functions[{index}]"),
            value: render(entry),
            expected: "a mapping of function settings",
            line: None,
        }]);
    };
    let name = match map.get("name") {
        None | Some(Value::Null) => {
            return Err(vec![ConfigError::MissingKey {
                function: None,
                key: "name".to_owned(),
                reason: format!("function #{} has no name", index + 1),
                line: None,
            }]);
        }
        Some(value) => match scalar(value) {
            Some(name) => name.into_owned(),
            None => {
                return Err(vec![ConfigError::InvalidValue {
                    function: None,
                    key: "name".to_owned(),
                    value: render(value),
                    expected: NAME,
                    line: None,
                }]);
            }
        },
    };

    let spec = FunctionSpec::new(name.clone(), DEFAULT_NAMESPACE);
    let mut b = Builder::new(name.clone(), spec, "", Flavour::Ebb);
    if !values::is_dns_label(&name) {
        b.invalid("name", &name, NAME);
    }
    let mut command_written = false;
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            b.unknown(&render(key), STACK_ONLY);
            continue;
        };
        match key {
            "name" => {}
            "command" => {
                command_written = true;
                match command(value) {
                    Some(command) => b.spec_mut().command = command,
                    None => b.invalid("command", &render(value), COMMAND),
                }
            }
            _ => match Key::from_name(key) {
                Some(k) => b.set(k, key, raw(k, value)),
                None => b.unknown(key, STACK_ONLY),
            },
        }
    }
    b.finish(Origin::Stack { command_written })
}

/// `command: [prog, arg]` as is; `command: "a | b"` runs under `sh -c`.
fn command(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Sequence(items) => {
            let argv: Vec<String> = items
                .iter()
                .map(|item| match item {
                    Value::Null => None,
                    item => scalar(item).map(Cow::into_owned),
                })
                .collect::<Option<_>>()?;
            argv.first().filter(|program| !program.trim().is_empty())?;
            Some(argv)
        }
        Value::Null => None,
        value => {
            let line = scalar(value)?;
            (!line.trim().is_empty())
                .then(|| vec!["sh".to_owned(), "-c".to_owned(), line.into_owned()])
        }
    }
}

/// The text an annotation would carry for this YAML value: scalars as
/// written, a list of topics joined with `,`. Anything else cannot be a
/// setting and is rendered for the error message.
fn raw(key: Key, value: &Value) -> Raw<'_> {
    if let Some(text) = scalar(value) {
        return Raw::Text(text);
    }
    if let (Key::Topics, Value::Sequence(items)) = (key, value) {
        let topics: Option<Vec<Cow<'_, str>>> = items
            .iter()
            .map(|item| scalar(item).filter(|t| values::is_topic(t.trim())))
            .collect();
        if let Some(topics) = topics {
            return Raw::Text(Cow::Owned(topics.join(",")));
        }
    }
    Raw::Structured(render(value))
}

fn parse_sources(text: &str, value: &Value, sources: &mut Sources, errors: &mut Vec<ConfigError>) {
    let map = match value {
        Value::Null => return,
        Value::Mapping(map) => map,
        other => {
            errors.push(ConfigError::InvalidValue {
                function: None,
                key: "sources".to_owned(),
                value: render(other),
                expected: "a mapping of broker addresses (nats, amqp, kafka)",
                line: locate(text, &[Step::Key("sources")]),
            });
            return;
        }
    };
    for (key, value) in map {
        let (slot, expected) = match key.as_str() {
            Some("nats") => (&mut sources.nats, "a NATS URL like nats://127.0.0.1:4222"),
            Some("amqp") => (&mut sources.amqp, "an AMQP URL like amqp://127.0.0.1:5672"),
            Some("kafka") => (
                &mut sources.kafka,
                "Kafka brokers like 127.0.0.1:9092[,host:port]",
            ),
            other => {
                let shown = render(key);
                let suggestion = keys::suggest(&shown, ["nats", "amqp", "kafka"])
                    .map(|s| format!("sources.{s}"));
                errors.push(ConfigError::UnknownKey {
                    function: None,
                    key: format!("sources.{shown}"),
                    suggestion,
                    line: other.and_then(|k| locate(text, &[Step::Key("sources"), Step::Key(k)])),
                });
                continue;
            }
        };
        let address = scalar(value)
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty() && !a.chars().any(|c| c.is_whitespace() || c.is_control()));
        match address {
            Some(address) => *slot = Some(address),
            None => {
                let name = key.as_str().unwrap_or_default();
                errors.push(ConfigError::InvalidValue {
                    function: None,
                    key: format!("sources.{name}"),
                    value: render(value),
                    expected,
                    line: locate(text, &[Step::Key("sources"), Step::Key(name)]),
                });
            }
        }
    }
}

/// A scalar as the text an annotation would hold; `None` for lists, mappings
/// and tagged values. A null (`key:` with nothing after it) is empty text.
fn scalar(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::Null => Some(Cow::Borrowed("")),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => None,
    }
}

/// A compact one-line YAML-ish rendering for error messages.
fn render(value: &Value) -> String {
    match value {
        Value::Sequence(items) => format!(
            "[{}]",
            items.iter().map(render).collect::<Vec<_>>().join(", ")
        ),
        Value::Mapping(map) => {
            let entries: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", render(k), render(v)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
        Value::Tagged(tagged) => format!("{} {}", tagged.tag, render(&tagged.value)),
        scalar_value => scalar(scalar_value)
            .map(Cow::into_owned)
            .unwrap_or_default(),
    }
}

// ---- Line numbers -------------------------------------------------------
//
// `serde_norway::Value` keeps no positions, but the YAML deserializer stamps
// the position of the current node on any error raised while reading it. To
// find where a key is, `locate` walks the text again along a path and fails
// on purpose at the target; the error's location is the answer. This runs
// only for errors, so valid files are parsed once.

#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The 1-based line of the node at `path` (for a key as last step: of that
/// key), or `None` when the path is not in the text.
fn locate(text: &str, path: &[Step<'_>]) -> Option<usize> {
    match Walk(path).deserialize(serde_norway::Deserializer::from_str(text)) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| l.line()),
    }
}

struct Walk<'p, 'k>(&'p [Step<'k>]);

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.0.first() {
            None => d.deserialize_any(Here),
            Some(Step::Key(_)) => d.deserialize_map(self),
            Some(Step::Index(_)) => d.deserialize_seq(self),
        }
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Step::Key(key), rest)) = self.0.split_first() else {
            return Ok(());
        };
        let probe = || KeyProbe {
            key,
            fail: rest.is_empty(),
        };
        while let Some(found) = map.next_key_seed(probe())? {
            if found {
                map.next_value_seed(Walk(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Index(index), rest)) = self.0.split_first() else {
            return Ok(());
        };
        let mut i = 0;
        loop {
            let more = if i == *index {
                seq.next_element_seed(Walk(rest))?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}

/// Fails on whatever node it is asked to read, so the error carries its position.
struct Here;

impl Visitor<'_> for Here {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (locating a node)")
    }
}

/// Reads a mapping key: `true` when it is the one looked for, an error when
/// it is and `fail` is set (the key itself is the target).
struct KeyProbe<'k> {
    key: &'k str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match (v == self.key, self.fail) {
            (true, true) => Err(E::custom("located")),
            (found, _) => Ok(found),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<bool, A::Error> {
        use serde::de::VariantAccess;
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
functions:
  - name: echo
    url: http://127.0.0.1:8081       # where it listens (connectors, autoscaler)
    command: [cat]                   # `ebb dev` runs it under `ebb worker`
    topics: [orders, payments]
    min-replicas: 0
    max-replicas: 4
    target: 20
  - name: nightly-report
    url: http://127.0.0.1:8082
    schedule: "0 30 2 * * *"
    timezone: Europe/Berlin
sources:                              # optional; `ebb dev` starts an in-memory bus when absent
  nats: nats://127.0.0.1:4222
"#;

    fn ok(text: &str) -> Stack {
        match Stack::parse(text) {
            Ok(stack) => stack,
            Err(e) => panic!("{text}\n{e}"),
        }
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match Stack::parse(text) {
            Ok(stack) => panic!("{text}\nexpected errors, got {stack:?}"),
            Err(e) => e.into_errors(),
        }
    }

    fn one_error(text: &str) -> ConfigError {
        let mut all = errors(text);
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    /// A stack with one function `f` (command `cat`) plus the given lines.
    fn with(lines: &str) -> String {
        let mut text = "functions:\n  - name: f\n    command: cat\n".to_owned();
        for line in lines.lines() {
            text.push_str("    ");
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn function(lines: &str) -> FunctionSpec {
        let mut stack = ok(&with(lines));
        assert_eq!(stack.functions.len(), 1);
        stack.functions.remove(0)
    }

    #[test]
    fn design_example() {
        let stack = ok(DESIGN_EXAMPLE);
        let mut echo = FunctionSpec::new("echo", "default");
        echo.url = Some("http://127.0.0.1:8081".into());
        echo.command = vec!["cat".into()];
        echo.topics = vec!["orders".into(), "payments".into()];
        echo.max_replicas = 4;
        echo.target = 20.0;
        let mut report = FunctionSpec::new("nightly-report", "default");
        report.url = Some("http://127.0.0.1:8082".into());
        report.schedule = Some("0 30 2 * * *".into());
        report.timezone = "Europe/Berlin".into();
        assert_eq!(stack.functions, [echo, report]);
        assert_eq!(
            stack.sources,
            Sources {
                nats: Some("nats://127.0.0.1:4222".into()),
                amqp: None,
                kafka: None
            }
        );
        assert_eq!(stack.functions[0].durable_name(), "ebb-default-echo");
    }

    #[test]
    fn empty_files() {
        for text in [
            "",
            "# nothing\n",
            "functions:\n",
            "functions: []\nsources: {}\n",
            "sources:\n",
        ] {
            assert_eq!(ok(text), Stack::default(), "{text:?}");
        }
    }

    #[test]
    fn yaml_types_become_annotation_text() {
        let f = function(
            "topics: orders, payments\nmax-replicas: 4\ntarget: 0.5\npaused: true\n\
             timeout: 45\nscale-to-zero-after: 5m\nactivation: 3\nfallback-replicas: 2\n\
             payload: '{\"a\": 1}'\nschedule: '@every 30s'\nprewarm: false\n",
        );
        assert_eq!(f.topics, ["orders", "payments"]);
        assert_eq!(f.max_replicas, 4);
        assert_eq!(f.target, 0.5);
        assert!(f.paused);
        assert_eq!(f.timeout, Duration::from_secs(45));
        assert_eq!(f.scale_to_zero_after, Duration::from_secs(300));
        assert_eq!(f.activation, 3.0);
        assert_eq!(f.fallback_replicas, Some(2));
        assert_eq!(f.payload.as_deref(), Some(r#"{"a": 1}"#));
        assert_eq!(f.schedule.as_deref(), Some("@every 30s"));
        assert!(!f.prewarm);
        assert_eq!(f.namespace, DEFAULT_NAMESPACE);
        assert_eq!(f.url, None);

        let f = function("topics:\n  - a\n  - b\n  - a\n");
        assert_eq!(f.topics, ["a", "b"]);
        let f = function("topics: []\n");
        assert!(f.topics.is_empty());
        let f = function(
            "prometheus-url: http://app:9100/metrics\nprometheus-metric: 'jobs{queue=\"mail\"}'\n",
        );
        assert!(
            matches!(f.prometheus, Some(crate::Prometheus::Scrape { .. })),
            "{f:?}"
        );
    }

    #[test]
    fn commands() {
        let cases: &[(&str, &[&str])] = &[
            ("command: [cat]", &["cat"]),
            (
                "command: [python3, -u, handler.py, 42]",
                &["python3", "-u", "handler.py", "42"],
            ),
            ("command: [printf, '']", &["printf", ""]),
            ("command: cat | wc -l", &["sh", "-c", "cat | wc -l"]),
            ("command: \"tr a-z A-Z\"", &["sh", "-c", "tr a-z A-Z"]),
        ];
        for (line, want) in cases {
            let text = format!("functions:\n  - name: f\n    {line}\n");
            assert_eq!(ok(&text).functions[0].command, *want, "{line}");
        }
        for line in [
            "command: []",
            "command: ''",
            "command:",
            "command: {a: b}",
            "command: ['', x]",
            "command: [[a]]",
        ] {
            let text = format!("functions:\n  - name: f\n    {line}\n");
            let e = one_error(&text);
            assert_eq!(e.key(), Some("command"), "{line}: {e}");
            assert_eq!(e.metric_label(), "invalid_value");
            assert_eq!(e.line(), Some(3), "{line}");
            assert!(
                e.to_string()
                    .contains("expected a non-empty list of strings"),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_value_names_function_key_and_line() {
        let text = "functions:\n  - name: echo\n    command: [cat]\n    max-replicas: ten\n";
        let e = one_error(text);
        assert_eq!(
            e.to_string(),
            r#"function "echo": key "max-replicas": expected a whole number ≥ 1, got "ten" (line 4)"#
        );
        assert_eq!(Stack::parse(text).unwrap_err().to_string(), e.to_string());
    }

    #[test]
    fn structured_values_where_text_is_needed() {
        let e = one_error(&with("max-replicas: [1, 2]"));
        assert!(
            e.to_string().ends_with(
                r#"key "max-replicas": expected a whole number ≥ 1, got "[1, 2]" (line 4)"#
            ),
            "{e}"
        );
        let e = one_error(&with("timeout: {after: 3s}"));
        assert!(e.to_string().contains(r#"got "{after: 3s}""#), "{e}");
        let e = one_error(&with("topics: [a, 'b,c']"));
        assert!(
            e.to_string()
                .contains(r#"key "topics": expected comma-separated topics"#),
            "{e}"
        );
        let e = one_error(&with("topics: [a, {b: c}]"));
        assert_eq!(e.key(), Some("topics"));
        let e = one_error(&with("schedule:"));
        assert!(
            e.to_string()
                .contains(r#"key "schedule": expected a cron expression"#),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys() {
        let e = one_error(&with("max-replica: 4"));
        assert_eq!(
            e,
            ConfigError::UnknownKey {
                function: Some("f".into()),
                key: "max-replica".into(),
                suggestion: Some("max-replicas".into()),
                line: Some(4),
            }
        );
        assert_eq!(
            e.to_string(),
            r#"function "f": unknown key "max-replica" (did you mean "max-replicas"?) (line 4)"#
        );
        // The prefixed form belongs on Deployments only.
        let e = one_error(&with("ebb.io/topics: a"));
        assert_eq!(e.key(), Some("ebb.io/topics"));
        let e = one_error(&with("namespace: shop"));
        assert_eq!(e.metric_label(), "unknown_key");
        let e = one_error(&with("7: x"));
        assert_eq!(e.key(), Some("7"));

        let e = one_error("functions: []\nsourcse: {}\n");
        assert_eq!(
            e.to_string(),
            r#"unknown key "sourcse" (did you mean "sources"?) (line 2)"#
        );
    }

    #[test]
    fn sources() {
        let stack = ok(
            "sources:\n  nats: nats://n:4222\n  amqp: amqp://guest:guest@r:5672/%2f\n  kafka: k1:9092,k2:9092\n",
        );
        assert_eq!(
            stack.sources,
            Sources {
                nats: Some("nats://n:4222".into()),
                amqp: Some("amqp://guest:guest@r:5672/%2f".into()),
                kafka: Some("k1:9092,k2:9092".into()),
            }
        );
        let e = one_error("sources:\n  nats: nats://n:4222\n  nat: x\n");
        assert_eq!(
            e.to_string(),
            r#"unknown key "sources.nat" (did you mean "sources.nats"?) (line 3)"#
        );
        let (stack, found) = Stack::parse_lenient("sources:\n  nats: ''\n  kafka: k:9092\n");
        assert_eq!(
            stack.sources,
            Sources {
                kafka: Some("k:9092".into()),
                ..Sources::default()
            }
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key(), Some("sources.nats"));
        assert_eq!(found[0].function(), None);
        assert_eq!(found[0].line(), Some(2));
        let e = one_error("sources: [nats]\n");
        assert_eq!(e.key(), Some("sources"));
    }

    #[test]
    fn names() {
        for bad in ["Echo", "echo_1", "-echo", "echo-", "a.b", "ä"] {
            let text = format!("functions:\n  - name: \"{bad}\"\n    command: cat\n");
            let e = one_error(&text);
            let ConfigError::InvalidValue {
                function,
                key,
                value,
                expected,
                line,
            } = &e
            else {
                panic!("{e:?}")
            };
            assert_eq!(
                (function.as_deref(), key.as_str(), value.as_str()),
                (Some(bad), "name", bad)
            );
            assert!(expected.starts_with("a DNS-1123 label"), "{expected}");
            assert_eq!(*line, Some(2), "{bad}");
        }
        let long = "a".repeat(64);
        let e = one_error(&format!("functions:\n  - name: {long}\n    command: cat\n"));
        assert_eq!(e.key(), Some("name"));
        assert!(
            ok(&format!(
                "functions:\n  - name: {}\n    command: cat\n",
                "a".repeat(63)
            ))
            .functions
            .len()
                == 1
        );
        assert_eq!(
            ok("functions:\n  - name: 42\n    command: cat\n").functions[0].name,
            "42"
        );

        let e = one_error("functions:\n  - command: cat\n    topics: [a]\n");
        assert_eq!(
            e.to_string(),
            r#"missing key "name": function #1 has no name (line 2)"#
        );
        let e = one_error("functions:\n  - name: [a]\n    command: cat\n");
        assert_eq!(e.key(), Some("name"));
        assert_eq!(e.function(), None);
    }

    #[test]
    fn needs_command_or_url() {
        let e = one_error(
            "functions:\n  - name: a\n    command: cat\n  - name: lonely\n    topics: [x]\n",
        );
        assert_eq!(
            e.to_string(),
            r#"function "lonely": missing key "url": a function needs a "url" to call or a "command" that ebb runs (line 4)"#
        );
        assert_eq!(e.metric_label(), "missing_key");
        // A rejected url or command is reported as such, not also as missing.
        assert_eq!(
            one_error("functions:\n  - name: a\n    url: nope\n").key(),
            Some("url")
        );
        assert_eq!(
            one_error("functions:\n  - name: a\n    command: []\n").key(),
            Some("command")
        );
        let external = ok("functions:\n  - name: a\n    url: http://h:1\n");
        assert!(external.functions[0].command.is_empty());
    }

    #[test]
    fn duplicate_names() {
        let text = "functions:\n  - name: a\n    command: cat\n  - name: b\n    command: cat\n  - name: a\n    url: http://x:1\n";
        let e = one_error(text);
        assert_eq!(
            e,
            ConfigError::DuplicateFunction {
                function: "a".into(),
                first_line: Some(2),
                line: Some(6)
            }
        );
        assert_eq!(
            e.to_string(),
            r#"function "a": name used twice, first on line 2 (line 6)"#
        );
        assert_eq!(e.metric_label(), "duplicate_function");
        let (stack, found) = Stack::parse_lenient(text);
        assert_eq!(found.len(), 1);
        let kept: Vec<_> = stack
            .functions
            .iter()
            .map(|f| (f.name.as_str(), f.url.is_some()))
            .collect();
        assert_eq!(kept, [("a", false), ("b", false)]);
    }

    #[test]
    fn lenient_keeps_good_functions() {
        let text = "\
functions:
  - name: good
    command: cat
  - name: bad
    command: cat
    max-replicas: 0
    timeout: never
    retries: 3
  - name: also-good
    url: http://h:8080
    min-replicas: 2
";
        let (stack, found) = Stack::parse_lenient(text);
        let names: Vec<_> = stack.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["good", "also-good"]);
        assert_eq!(stack.functions[1].min_replicas, 2);
        let summary: Vec<_> = found
            .iter()
            .map(|e| (e.function(), e.key(), e.line()))
            .collect();
        assert_eq!(
            summary,
            [
                (Some("bad"), Some("max-replicas"), Some(6)),
                (Some("bad"), Some("timeout"), Some(7)),
                (Some("bad"), Some("retries"), Some(8)),
            ]
        );
        let e = Stack::parse(text).unwrap_err();
        assert_eq!(e.errors(), found.as_slice());
        assert!(
            e.to_string()
                .starts_with("3 errors: function \"bad\": key \"max-replicas\""),
            "{e}"
        );
    }

    #[test]
    fn conflicts_point_at_the_function() {
        let e = one_error(&with("min-replicas: 5\nmax-replicas: 4"));
        assert_eq!(
            e.to_string(),
            r#"function "f": keys "min-replicas" and "max-replicas": minimum 5 is above maximum 4 (line 4)"#
        );
        let e = one_error(&with("prometheus-query: up"));
        assert_eq!(
            e.to_string(),
            r#"function "f": missing key "prometheus-server": needed with "prometheus-query" (line 2)"#
        );
    }

    #[test]
    fn file_shape_errors() {
        let e = one_error("functions: [\n");
        assert_eq!(e.metric_label(), "syntax");
        assert!(
            e.to_string().starts_with("stack file: invalid YAML: "),
            "{e}"
        );
        assert!(e.line().is_some());

        let e = one_error("- name: a\n");
        assert_eq!(e.metric_label(), "syntax");
        assert!(
            e.to_string()
                .contains(r#"expected a mapping with "functions" and "sources""#),
            "{e}"
        );

        let e = one_error("functions:\n  name: a\n");
        assert_eq!(e.key(), Some("functions"));
        assert!(
            e.to_string().contains("expected a list of functions"),
            "{e}"
        );

        let e = one_error("functions:\n  - just-a-name\n");
        assert_eq!(e.key(), Some("functions[0]"));
        assert_eq!(e.line(), Some(2));

        let e = one_error("functions:\n  - name: a\n    command: cat\n    command: dog\n");
        assert_eq!(e.metric_label(), "syntax");
        assert!(e.to_string().contains("duplicate"), "{e}");

        let (stack, found) = Stack::parse_lenient("functions: [\n");
        assert_eq!(stack, Stack::default());
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn anchors_and_merges() {
        let text = "\
x-defaults: &defaults
  max-replicas: 3
  timeout: 10s
functions:
  - <<: *defaults
    name: a
    command: cat
  - <<: *defaults
    name: b
    url: http://b:1
    timeout: 20s
";
        let stack = ok(text);
        assert_eq!(stack.functions[0].max_replicas, 3);
        assert_eq!(stack.functions[0].timeout, Duration::from_secs(10));
        assert_eq!(stack.functions[1].timeout, Duration::from_secs(20));

        // An error in merged settings points at the function using them.
        let text = "x-d: &d\n  target: 0\nfunctions:\n  - name: a\n    <<: *d\n    command: cat\n";
        let e = one_error(text);
        assert_eq!(e.key(), Some("target"));
        assert_eq!(e.line(), Some(4));
    }

    #[test]
    fn locating_nodes() {
        let text =
            "a: 1\nfunctions:\n  - name: x\n    k: v\n  -\n    name: y\n    deep:\n      - 1\n";
        let line = |path: &[Step<'_>]| locate(text, path);
        assert_eq!(line(&[Step::Key("a")]), Some(1));
        assert_eq!(line(&[Step::Key("functions")]), Some(2));
        assert_eq!(line(&[Step::Key("functions"), Step::Index(0)]), Some(3));
        assert_eq!(
            line(&[Step::Key("functions"), Step::Index(0), Step::Key("k")]),
            Some(4)
        );
        assert_eq!(
            line(&[Step::Key("functions"), Step::Index(1), Step::Key("name")]),
            Some(6)
        );
        assert_eq!(
            line(&[Step::Key("functions"), Step::Index(1), Step::Key("deep")]),
            Some(7)
        );
        assert_eq!(line(&[Step::Key("functions"), Step::Index(2)]), None);
        assert_eq!(
            line(&[Step::Key("functions"), Step::Index(0), Step::Key("missing")]),
            None
        );
        assert_eq!(line(&[Step::Key("nope")]), None);
    }
}
