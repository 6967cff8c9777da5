//! Parsers for single setting values. Each returns `None` when the text is not
//! acceptable; the caller turns that into a [`ConfigError`](crate::ConfigError)
//! that says what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A whole number (`u32`), e.g. replica counts.
pub(crate) fn whole(text: &str) -> Option<u32> {
    if text.starts_with('+') {
        return None;
    }
    text.parse().ok()
}

/// A finite decimal number.
pub(crate) fn number(text: &str) -> Option<f64> {
    let n: f64 = text.parse().ok()?;
    n.is_finite().then_some(n)
}

/// `true` or `false` (any letter case).
pub(crate) fn boolean(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// `30s`, `5m`, `1h30m`, `500ms` (anything humantime reads), or a plain
/// whole number of seconds.
pub(crate) fn duration(text: &str) -> Option<Duration> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    humantime::parse_duration(text).ok()
}

/// A topic or subject: non-empty, no whitespace, control characters or commas.
pub(crate) fn is_topic(text: &str) -> bool {
    !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

/// A comma-separated topic list; an empty text is an empty list, an empty
/// item (`a,,b`) is an error. Repeats are dropped, order is kept.
pub(crate) fn topics(text: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    if text.is_empty() {
        return Some(out);
    }
    for topic in text.split(',').map(str::trim) {
        if !is_topic(topic) {
            return None;
        }
        if !out.iter().any(|t| t == topic) {
            out.push(topic.to_owned());
        }
    }
    Some(out)
}

/// A name such as a queue or consumer group: non-empty, no control characters.
pub(crate) fn is_plain_name(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(char::is_control)
}

/// An IANA zone name, checked only for shape here (the cron crate knows the zones).
pub(crate) fn is_zone_name(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `http://host…` or `https://host…`, without whitespace.
pub(crate) fn is_http_url(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &text[7..]
    } else if lower.starts_with("https://") {
        &text[8..]
    } else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    !host.is_empty() && !text.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A DNS-1123 label: lowercase letters, digits and `-`, starting and ending
/// with a letter or digit, at most 63 characters.
pub(crate) fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    bytes.len() <= 63
        && edge(bytes.first())
        && edge(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// One Prometheus series, as written in `ebb.io/prometheus-metric`:
/// `name` or `name{label="value",other="v"}` (equality matchers only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSelector {
    /// The metric name.
    pub name: String,
    /// Labels the series must carry with exactly these values.
    pub labels: BTreeMap<String, String>,
}

impl MetricSelector {
    /// Parses the selector text; `None` when it is not of the form above.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut cursor = Cursor { rest: text.trim() };
        let name = cursor.ident(true)?;
        let mut labels = BTreeMap::new();
        cursor.skip_ws();
        if cursor.eat('{') {
            loop {
                cursor.skip_ws();
                if cursor.eat('}') {
                    break;
                }
                let label = cursor.ident(false)?;
                cursor.skip_ws();
                if !cursor.eat('=') || cursor.peek() == Some('~') {
                    return None;
                }
                cursor.skip_ws();
                let value = cursor.quoted()?;
                if labels.insert(label, value).is_some() {
                    return None;
                }
                cursor.skip_ws();
                if cursor.eat('}') {
                    break;
                }
                if !cursor.eat(',') {
                    return None;
                }
            }
        }
        cursor.skip_ws();
        cursor.rest.is_empty().then_some(Self { name, labels })
    }
}

impl fmt::Display for MetricSelector {
    /// The canonical text: `name{a="x",b="y"}`, labels sorted, values escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if self.labels.is_empty() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, (label, value)) in self.labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{label}=\"")?;
            for c in value.chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '"' => f.write_str("\\\"")?,
                    '\n' => f.write_str("\\n")?,
                    c => write!(f, "{c}")?,
                }
            }
            f.write_str("\"")?;
        }
        f.write_str("}")
    }
}

struct Cursor<'a> {
    rest: &'a str,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    /// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or, without colons, a label name.
    fn ident(&mut self, colons: bool) -> Option<String> {
        let ok = |c: char, first: bool| {
            c.is_ascii_alphabetic()
                || c == '_'
                || (colons && c == ':')
                || (!first && c.is_ascii_digit())
        };
        let end = self
            .rest
            .char_indices()
            .find(|&(i, c)| !ok(c, i == 0))
            .map_or(self.rest.len(), |(i, _)| i);
        if end == 0 {
            return None;
        }
        let (ident, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(ident.to_owned())
    }

    /// A double-quoted string with `\\`, `\"` and `\n` escapes.
    fn quoted(&mut self) -> Option<String> {
        if !self.eat('"') {
            return None;
        }
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Some(out);
                }
                '\\' => match chars.next()?.1 {
                    'n' => out.push('\n'),
                    c @ ('\\' | '"') => out.push(c),
                    _ => return None,
                },
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let good = [
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("1h 30m", 5_400_000),
            ("500ms", 500),
            ("0", 0),
            ("45", 45_000),
            ("0s", 0),
            ("1.5h", 5_400_000),
        ];
        for (text, millis) in good {
            assert_eq!(
                duration(text),
                Some(Duration::from_millis(millis)),
                "{text}"
            );
        }
        for bad in [
            "",
            "ten",
            "-5s",
            "5x",
            "s",
            "30 s x",
            "99999999999999999999",
        ] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(whole("0"), Some(0));
        assert_eq!(whole("42"), Some(42));
        for bad in ["", "-1", "+1", "1.0", "ten", "4294967296"] {
            assert_eq!(whole(bad), None, "{bad}");
        }
        assert_eq!(number("0.5"), Some(0.5));
        assert_eq!(number("10"), Some(10.0));
        for bad in ["", "NaN", "inf", "-inf", "x"] {
            assert_eq!(number(bad), None, "{bad}");
        }
        assert_eq!(boolean("true"), Some(true));
        assert_eq!(boolean("True"), Some(true));
        assert_eq!(boolean("false"), Some(false));
        for bad in ["", "yes", "1", "0", "on"] {
            assert_eq!(boolean(bad), None, "{bad}");
        }
    }

    #[test]
    fn topic_lists() {
        let list = |t: &str| topics(t).map(|v| v.join("|"));
        assert_eq!(list(""), Some(String::new()));
        assert_eq!(list("orders"), Some("orders".into()));
        assert_eq!(list("orders, payments"), Some("orders|payments".into()));
        assert_eq!(list("a,b,a"), Some("a|b".into()));
        assert_eq!(list("orders.*,>"), Some("orders.*|>".into()));
        for bad in ["a,,b", "a,", ",", "a b", "a,\tb c"] {
            assert_eq!(topics(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls() {
        for good in [
            "http://a",
            "https://a.b:8080/x?y",
            "HTTP://a",
            "http://127.0.0.1:8081",
        ] {
            assert!(is_http_url(good), "{good}");
        }
        for bad in [
            "",
            "a.b",
            "ftp://a",
            "http://",
            "http:///x",
            "http://a b",
            "https:/a",
        ] {
            assert!(!is_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "echo", "nightly-report", "a1", "1a", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "Echo", "-a", "a-", "a_b", "a.b", "ä", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn metric_selectors() {
        let sel =
            MetricSelector::parse(r#" queue_depth{ queue = "jobs", env="a\"b\\c" , } "#).unwrap();
        assert_eq!(sel.name, "queue_depth");
        assert_eq!(sel.labels["queue"], "jobs");
        assert_eq!(sel.labels["env"], "a\"b\\c");
        assert_eq!(
            sel.to_string(),
            r#"queue_depth{env="a\"b\\c",queue="jobs"}"#
        );
        assert_eq!(MetricSelector::parse(&sel.to_string()), Some(sel));

        let bare = MetricSelector::parse("ns:requests_total").unwrap();
        assert!(bare.labels.is_empty());
        assert_eq!(bare.to_string(), "ns:requests_total");
        assert!(MetricSelector::parse("up{}").is_some());

        for bad in [
            "",
            "1up",
            "up{",
            "up{a}",
            "up{a=b}",
            "up{a=\"b\"",
            "up{a!=\"b\"}",
            "up{a=~\"b\"}",
            "up{a=\"b\",a=\"c\"}",
            "up{a:b=\"c\"}",
            "up extra",
            "{a=\"b\"}",
            "up{a=\"\\x\"}",
        ] {
            assert_eq!(MetricSelector::parse(bad), None, "{bad}");
        }
    }
}
