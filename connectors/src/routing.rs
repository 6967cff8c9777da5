//! Topic routing: NATS-style subjects (`orders.*`, `orders.>`) and the set of
//! subjects a stream must capture. Pure functions over strings.

/// Whether `subject` (no wildcards) matches `pattern` (`*` = one token,
/// `>` = one or more trailing tokens).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    tokens_match(pattern, subject, |_| true)
}

/// Whether every subject that `b` matches is also matched by `a`.
pub fn covers(a: &str, b: &str) -> bool {
    tokens_match(a, b, |t| t != ">")
}

/// Walks `pattern` and `other` token by token: `>` in `pattern` takes the
/// rest (at least one token), `*` one token that `star` takes, and any
/// other token must be the same.
fn tokens_match(pattern: &str, other: &str, star: impl Fn(&str) -> bool) -> bool {
    let mut p = pattern.split('.');
    let mut o = other.split('.');
    loop {
        match (p.next(), o.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if star(t) => {}
            (Some(pt), Some(ot)) if pt == ot => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks a topic is a valid NATS subject or pattern: non-empty tokens, no
/// whitespace, `>` only as the last token, wildcards only as whole tokens.
pub fn validate_subject(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty subject".into());
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("subject `{s}` contains whitespace"));
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!("subject `{s}` has an empty token"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!("subject `{s}`: `>` must be the last token"));
        }
        if t.len() > 1 && (t.contains('*') || t.contains('>')) {
            return Err(format!(
                "subject `{s}`: wildcards `*` and `>` must be whole tokens"
            ));
        }
    }
    Ok(())
}

/// The smallest sorted set of subjects that captures all of `subjects`: a
/// subject covered by another (`orders.eu` by `orders.*`) is dropped, as a
/// JetStream stream refuses overlapping subjects.
pub fn minimal_subjects<'a>(subjects: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut all: Vec<&str> = subjects.into_iter().collect();
    all.sort_unstable();
    all.dedup();
    let mut out: Vec<String> = Vec::new();
    for (i, s) in all.iter().enumerate() {
        let covered = all
            .iter()
            .enumerate()
            .any(|(j, other)| j != i && covers(other, s) && !(covers(s, other) && j > i));
        if !covered {
            out.push((*s).to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        // (pattern, subjects it matches, subjects it does not)
        let rows: [(&str, &[&str], &[&str]); 6] = [
            ("orders", &["orders"], &["payments"]),
            ("orders.*", &["orders.eu"], &["orders", "orders.eu.de"]),
            ("orders.>", &["orders.eu", "orders.eu.de"], &["orders"]),
            ("*.created", &["orders.created"], &["orders.deleted"]),
            (">", &["anything.at.all"], &[]),
            ("a.*.c", &["a.b.c"], &["a.b.d"]),
        ];
        for (p, yes, no) in rows {
            for s in yes {
                assert!(subject_matches(p, s), "{p} ~ {s}");
            }
            for s in no {
                assert!(!subject_matches(p, s), "{p} !~ {s}");
            }
        }
    }

    #[test]
    fn covering() {
        assert!(covers("orders.*", "orders.eu"));
        assert!(covers("orders.>", "orders.*"));
        assert!(covers("orders.>", "orders.eu.de"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.eu", "orders.*"));
        assert!(covers(">", "a.b"));
        assert!(covers("a", "a"));
    }

    #[test]
    fn minimal_set() {
        assert_eq!(
            minimal_subjects(["orders.eu", "orders.*", "payments", "payments", "orders.>"]),
            vec!["orders.>", "payments"]
        );
        assert_eq!(minimal_subjects(["b", "a"]), vec!["a", "b"]);
        assert_eq!(minimal_subjects(["x.*", "x.*"]), vec!["x.*"]);
        assert!(minimal_subjects(std::iter::empty()).is_empty());
    }

    #[test]
    fn validation() {
        for ok in ["orders", "orders.*", "orders.>", ">", "a.*.c", "a_b-c.D"] {
            assert!(validate_subject(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "a.>.b", "a b", "ord*rs", "a.b>", ".a", "a."] {
            assert!(validate_subject(bad).is_err(), "{bad}");
        }
    }
}
