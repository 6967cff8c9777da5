//! The one error type of the model: a bad setting of one function (or of the
//! stack file around it), precise enough to be shown to the person who wrote it.

use std::fmt;

/// A configuration mistake in one function's settings or in a stack file.
///
/// Messages name the function, the key exactly as it was written (for example
/// `ebb.io/max-replicas` on a Deployment, `max-replicas` in a stack file) and
/// what was expected, plus the line in a stack file when it is known:
///
/// ```text
/// function "echo": key "max-replicas": expected a whole number ≥ 1, got "ten" (line 7)
/// ```
///
/// Functions parsed from annotations are named `namespace/name`; stack-file
/// functions by their name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("{}key {}: expected {expected}, got {}{}", Subject(.function), Quoted(.key), Quoted(.value), At(.line))]
    InvalidValue {
        /// The function, when the key belongs to one.
        function: Option<String>,
        /// The key as written.
        key: String,
        /// The offending value (lists and mappings in a compact YAML form).
        value: String,
        /// What would have been accepted.
        expected: &'static str,
        /// 1-based line in the stack file, when known.
        line: Option<usize>,
    },
    /// A value that parses but is wrong for a reason only known at run time
    /// of the parser (a cron expression, a time zone).
    #[error("{}key {}: {reason}{}", Subject(.function), Quoted(.key), At(.line))]
    BadValue {
        /// The function, when the key belongs to one.
        function: Option<String>,
        /// The key as written.
        key: String,
        /// What is wrong and what would fix it, naming the value.
        reason: String,
        /// 1-based line in the stack file, when known.
        line: Option<usize>,
    },
    /// A key that ebb does not know (typo protection).
    #[error("{}unknown key {}{}{}", Subject(.function), Quoted(.key), Suggest(.suggestion), At(.line))]
    UnknownKey {
        /// The function, when the key belongs to one.
        function: Option<String>,
        /// The key as written.
        key: String,
        /// A known key that is spelled almost the same.
        suggestion: Option<String>,
        /// 1-based line in the stack file, when known.
        line: Option<usize>,
    },
    /// A required key is absent.
    #[error("{}missing key {}: {reason}{}", Subject(.function), Quoted(.key), At(.line))]
    MissingKey {
        /// The function, when the key belongs to one.
        function: Option<String>,
        /// The key that is needed, as it would be written.
        key: String,
        /// Why it is needed.
        reason: String,
        /// 1-based line in the stack file, when known.
        line: Option<usize>,
    },
    /// Two settings that are each valid but do not fit together.
    #[error("{}keys {} and {}: {reason}{}", Subject(.function), Quoted(.key), Quoted(.other), At(.line))]
    Conflict {
        /// The function, when the keys belong to one.
        function: Option<String>,
        /// The first key.
        key: String,
        /// The key it conflicts with.
        other: String,
        /// What is wrong.
        reason: String,
        /// 1-based line in the stack file, when known.
        line: Option<usize>,
    },
    /// A second stack-file function with a name already taken; it is skipped.
    #[error("function {}: name used twice{}{}", Quoted(.function), First(.first_line), At(.line))]
    DuplicateFunction {
        /// The repeated name.
        function: String,
        /// Line of the first function with this name, when known.
        first_line: Option<usize>,
        /// Line of this (skipped) function, when known.
        line: Option<usize>,
    },
    /// The stack file is not YAML, or not shaped like a stack file at all.
    #[error("stack file: {message}")]
    Syntax {
        /// What is wrong (YAML parser messages include their position).
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
    },
}

impl ConfigError {
    /// A bounded label for the `error` label of ebb's error counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidValue { .. } | Self::BadValue { .. } => "invalid_value",
            Self::UnknownKey { .. } => "unknown_key",
            Self::MissingKey { .. } => "missing_key",
            Self::Conflict { .. } => "conflict",
            Self::DuplicateFunction { .. } => "duplicate_function",
            Self::Syntax { .. } => "syntax",
        }
    }

    /// The function this error belongs to; `None` for file-level errors
    /// (YAML syntax, `sources`, unknown top-level keys, an entry without a name).
    pub fn function(&self) -> Option<&str> {
        match self {
            Self::InvalidValue { function, .. }
            | Self::BadValue { function, .. }
            | Self::UnknownKey { function, .. }
            | Self::MissingKey { function, .. }
            | Self::Conflict { function, .. } => function.as_deref(),
            Self::DuplicateFunction { function, .. } => Some(function),
            Self::Syntax { .. } => None,
        }
    }

    /// The [`FunctionKey`](crate::FunctionKey) of the function at fault:
    /// `namespace/name` for annotations, a stack-file name in
    /// [`DEFAULT_NAMESPACE`](crate::DEFAULT_NAMESPACE). `None` for file-level errors.
    pub fn function_key(&self) -> Option<crate::FunctionKey> {
        let f = self.function()?;
        Some(match f.split_once('/') {
            Some((namespace, name)) => crate::FunctionKey::new(namespace, name),
            None => crate::FunctionKey::new(crate::DEFAULT_NAMESPACE, f),
        })
    }

    /// The key at fault, as written (the first one for a conflict).
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::InvalidValue { key, .. }
            | Self::BadValue { key, .. }
            | Self::UnknownKey { key, .. }
            | Self::MissingKey { key, .. }
            | Self::Conflict { key, .. } => Some(key),
            Self::DuplicateFunction { .. } | Self::Syntax { .. } => None,
        }
    }

    /// The 1-based line in the stack file, when known (never for annotations).
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::InvalidValue { line, .. }
            | Self::BadValue { line, .. }
            | Self::UnknownKey { line, .. }
            | Self::MissingKey { line, .. }
            | Self::Conflict { line, .. }
            | Self::DuplicateFunction { line, .. }
            | Self::Syntax { line, .. } => *line,
        }
    }

    pub(crate) fn set_line(&mut self, at: Option<usize>) {
        match self {
            Self::InvalidValue { line, .. }
            | Self::BadValue { line, .. }
            | Self::UnknownKey { line, .. }
            | Self::MissingKey { line, .. }
            | Self::Conflict { line, .. }
            | Self::DuplicateFunction { line, .. }
            | Self::Syntax { line, .. } => *line = at,
        }
    }
}

/// Every error found in a stack file (never empty), returned by
/// [`Stack::parse`](crate::Stack::parse). Its message is one line: the error
/// itself, or a count followed by all of them separated by `; `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", List(.errors))]
pub struct StackError {
    errors: Vec<ConfigError>,
}

impl StackError {
    pub(crate) fn new(errors: Vec<ConfigError>) -> Self {
        debug_assert!(!errors.is_empty());
        Self { errors }
    }

    /// The errors, in file order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// The errors, in file order.
    pub fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }
}

/// Longest value shown in a message, in characters; annotation values can be big.
const SHOWN_CHARS: usize = 80;

/// A string in double quotes with control characters escaped, shortened.
pub(crate) struct Quoted<'a>(pub(crate) &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(SHOWN_CHARS) {
            Some((cut, _)) => write!(f, "{:?}…", &self.0[..cut]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

struct Subject<'a>(&'a Option<String>);

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(function) => write!(f, "function {}: ", Quoted(function)),
            None => Ok(()),
        }
    }
}

struct At<'a>(&'a Option<usize>);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

struct First<'a>(&'a Option<usize>);

impl fmt::Display for First<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ", first on line {line}"),
            None => Ok(()),
        }
    }
}

struct Suggest<'a>(&'a Option<String>);

impl fmt::Display for Suggest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, " (did you mean {}?)", Quoted(key)),
            None => Ok(()),
        }
    }
}

struct List<'a>(&'a [ConfigError]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => one.fmt(f),
            all => {
                write!(f, "{} errors: ", all.len())?;
                for (i, error) in all.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    error.fmt(f)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(function: Option<&str>, value: &str, line: Option<usize>) -> ConfigError {
        ConfigError::InvalidValue {
            function: function.map(str::to_owned),
            key: "max-replicas".into(),
            value: value.into(),
            expected: "a whole number ≥ 1",
            line,
        }
    }

    #[test]
    fn messages() {
        let cases = [
            (
                invalid(Some("echo"), "ten", None),
                r#"function "echo": key "max-replicas": expected a whole number ≥ 1, got "ten""#,
            ),
            (
                invalid(Some("echo"), "ten", Some(7)),
                r#"function "echo": key "max-replicas": expected a whole number ≥ 1, got "ten" (line 7)"#,
            ),
            (
                invalid(None, "a\nb", None),
                r#"key "max-replicas": expected a whole number ≥ 1, got "a\nb""#,
            ),
            (
                ConfigError::UnknownKey {
                    function: Some("shop/echo".into()),
                    key: "ebb.io/max-replica".into(),
                    suggestion: Some("ebb.io/max-replicas".into()),
                    line: None,
                },
                r#"function "shop/echo": unknown key "ebb.io/max-replica" (did you mean "ebb.io/max-replicas"?)"#,
            ),
            (
                ConfigError::MissingKey {
                    function: Some("echo".into()),
                    key: "prometheus-metric".into(),
                    reason: r#"needed with "prometheus-url""#.into(),
                    line: Some(3),
                },
                r#"function "echo": missing key "prometheus-metric": needed with "prometheus-url" (line 3)"#,
            ),
            (
                ConfigError::Conflict {
                    function: Some("echo".into()),
                    key: "min-replicas".into(),
                    other: "max-replicas".into(),
                    reason: "minimum 5 is above maximum 4".into(),
                    line: None,
                },
                r#"function "echo": keys "min-replicas" and "max-replicas": minimum 5 is above maximum 4"#,
            ),
            (
                ConfigError::DuplicateFunction {
                    function: "echo".into(),
                    first_line: Some(2),
                    line: Some(9),
                },
                r#"function "echo": name used twice, first on line 2 (line 9)"#,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(error.to_string(), want);
        }
    }

    #[test]
    fn long_values_are_shortened() {
        let long = "x".repeat(500);
        let message = invalid(Some("echo"), &long, None).to_string();
        assert!(
            message.ends_with(&format!("got \"{}\"…", "x".repeat(80))),
            "{message}"
        );
    }

    #[test]
    fn labels_and_accessors() {
        let e = invalid(Some("echo"), "ten", Some(4));
        assert_eq!(e.metric_label(), "invalid_value");
        assert_eq!(e.function(), Some("echo"));
        assert_eq!(e.key(), Some("max-replicas"));
        assert_eq!(e.line(), Some(4));
        let syntax = ConfigError::Syntax {
            message: "bad".into(),
            line: None,
        };
        assert_eq!(syntax.metric_label(), "syntax");
        assert_eq!(syntax.function(), None);
        assert_eq!(syntax.key(), None);
    }

    #[test]
    fn stack_error_is_one_line() {
        let one = StackError::new(vec![invalid(Some("a"), "x", None)]);
        assert_eq!(one.to_string(), invalid(Some("a"), "x", None).to_string());
        let two = StackError::new(vec![
            invalid(Some("a"), "x", None),
            invalid(Some("b"), "y", None),
        ]);
        let message = two.to_string();
        assert!(message.starts_with("2 errors: function \"a\""), "{message}");
        assert!(message.contains("; function \"b\""), "{message}");
        assert!(!message.contains('\n'));
        assert_eq!(two.errors().len(), 2);
    }
}
