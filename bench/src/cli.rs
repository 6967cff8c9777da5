//! Small command-line helpers shared by the bench binaries.

use std::time::Duration;

/// Parses a byte size: a plain integer, optionally followed by a binary unit
/// (`k`/`kb`/`kib` = 1024, `m`/`mb`/`mib` = 1024², `b` = 1), case-insensitive.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid size {s:?}: expected e.g. 0, 512, 4k, 1m"));
    }
    let n: usize = digits
        .parse()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Parses a duration like `10s`, `500ms`, `1m30s` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Formats a duration so that [`parse_duration`] reads it back exactly.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_owned()
    } else {
        humantime::format_duration(d).to_string().replace(' ', "")
    }
}

/// Quotes a word for a POSIX shell, leaving plainly safe words unquoted.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Joins words into one shell command line.
pub fn shell_join<S: AsRef<str>>(words: impl IntoIterator<Item = S>) -> String {
    words
        .into_iter()
        .map(|w| shell_quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2MB"), Ok(2 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1g").is_err());
        assert!(parse_size("1.5k").is_err());
    }

    #[test]
    fn durations_round_trip() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(1),
            Duration::from_secs(90),
            Duration::from_millis(10_500),
        ] {
            let s = format_duration(d);
            assert!(!s.contains(' '), "{s}");
            assert_eq!(parse_duration(&s), Ok(d), "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(
            shell_quote("http://127.0.0.1:80/a?b=c"),
            "'http://127.0.0.1:80/a?b=c'"
        );
        assert_eq!(
            shell_quote("http://127.0.0.1:80/x"),
            "http://127.0.0.1:80/x"
        );
        assert_eq!(shell_quote("--connections"), "--connections");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            shell_join(["ebb-load", "--url", "a&b"]),
            "ebb-load --url 'a&b'"
        );
    }
}
