//! Topic routing: NATS-style subjects (`orders.*`, `orders.>`) and the set of
//! subjects a stream must capture. Pure functions over strings.

/// Whether `subject` (no wildcards) matches `pattern` (`*` = one token,
/// `>` = one or more trailing tokens).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(pt), Some(st)) if pt == st => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every subject that `b` matches is also matched by `a`.
pub fn covers(a: &str, b: &str) -> bool {
    let mut at = a.split('.');
    let mut bt = b.split('.');
    loop {
        match (at.next(), bt.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(x), Some(y)) if x == y => {}
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
        let rows = [
            ("orders", "orders", true),
            ("orders", "payments", false),
            ("orders.*", "orders.eu", true),
            ("orders.*", "orders", false),
            ("orders.*", "orders.eu.de", false),
            ("orders.>", "orders.eu", true),
            ("orders.>", "orders.eu.de", true),
            ("orders.>", "orders", false),
            ("*.created", "orders.created", true),
            ("*.created", "orders.deleted", false),
            (">", "anything.at.all", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
        ];
        for (p, s, want) in rows {
            assert_eq!(subject_matches(p, s), want, "{p} ~ {s}");
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
