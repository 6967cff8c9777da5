//! The Prometheus scaler: a function's Prometheus input is either one series
//! of a `/metrics` endpoint ([`scrape`], `ebb.io/prometheus-url` +
//! `ebb.io/prometheus-metric`) or the value of a PromQL instant query
//! ([`query`], `ebb.io/prometheus-server` + `ebb.io/prometheus-query`).
//!
//! Every failure is an error, never a 0: no series, an empty query result,
//! `NaN`, a timeout, a non-2xx answer, a body that does not parse. The caller
//! treats any error as "unknown" and holds the current replica count.
//!
//! The exposition text is parsed here ([`parse_metrics`]) rather than with
//! `prometheus-parse`, which splits label sets on `,` and `=` even inside
//! quoted values, ignores escapes, does not accept `:` in metric names and
//! silently drops lines it cannot read. The crate is kept as a test oracle
//! for plain input, where it is right.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ebb_model::MetricSelector;
use reqwest::header::{ACCEPT, HeaderValue};
use reqwest::{Client, ClientBuilder, RequestBuilder, Response, Url};
use serde_json::Value as Json;

/// The largest response body read from a `/metrics` endpoint or a Prometheus
/// server: 16 MiB. A larger body is an error ([`ScalerError::BodyTooLarge`]).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What a scrape asks for: the classic text format first, OpenMetrics (which
/// [`parse_metrics`] reads too) second, never protobuf.
const SCRAPE_ACCEPT: &str =
    "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1";

/// The longest excerpt of an error body kept in [`ScalerError::HttpStatus`].
const BODY_EXCERPT_CHARS: usize = 200;

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// One sample of the text exposition format: `name{labels} value`.
/// Histogram and summary lines are samples like any other
/// (`x_bucket{le="0.5"}`, `x_sum`, `x_count`, `x{quantile="0.9"}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, as written on the line.
    pub name: String,
    /// The labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// The value; may be `NaN` or infinite.
    pub value: f64,
}

/// Why exposition text could not be parsed: a 1-based line number and what
/// was wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

/// Parses Prometheus text exposition format (0.0.4) and OpenMetrics text.
///
/// - Blank lines and comments are skipped; `# HELP` needs a metric name and
///   `# TYPE` a name and a known type, as Prometheus requires. `# EOF` ends
///   the input (what follows is ignored).
/// - Label values are quoted strings with the escapes `\\`, `\"` and `\n`;
///   `,`, `=`, `}` and `#` inside them are plain characters. Other escapes
///   are kept as written, as Prometheus does. Trailing commas are allowed;
///   duplicate label names are an error.
/// - Prometheus 3 UTF-8 names are read too: a quoted metric name inside the
///   braces (`{"my.metric",a="b"}`) and quoted label names.
/// - Values follow Go's float syntax (`NaN`, `+Inf`, `-Inf`, exponents). The
///   optional timestamp (integer milliseconds, or OpenMetrics float seconds)
///   is checked and dropped; an OpenMetrics exemplar (`# {…} v`) is ignored.
/// - Lines may end in `\r\n`.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let content = line.trim_matches(is_blank);
        if content.is_empty() {
            continue;
        }
        if let Some(comment) = content.strip_prefix('#') {
            if comment.trim_matches(is_blank) == "EOF" {
                break;
            }
            check_comment(comment, number)?;
            continue;
        }
        samples.push(
            Cursor {
                text: content,
                pos: 0,
                line: number,
            }
            .sample()?,
        );
    }
    Ok(samples)
}

/// Spaces and tabs separate tokens.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Checks `# HELP name …` and `# TYPE name type`; other comments pass.
fn check_comment(comment: &str, line: usize) -> Result<(), ParseError> {
    let mut words = comment.split(is_blank).filter(|w| !w.is_empty());
    let error = |reason: String| Err(ParseError { line, reason });
    match words.next() {
        Some("HELP") => match words.next() {
            Some(name) if is_metric_name(name) || is_quoted(name) => Ok(()),
            Some(name) => error(format!("invalid metric name {name:?} in # HELP")),
            None => error("# HELP without a metric name".into()),
        },
        Some("TYPE") => {
            let name = match words.next() {
                Some(name) if is_metric_name(name) || is_quoted(name) => name,
                Some(name) => return error(format!("invalid metric name {name:?} in # TYPE")),
                None => return error("# TYPE without a metric name".into()),
            };
            match words.next() {
                Some(
                    "counter" | "gauge" | "histogram" | "summary" | "untyped" | "unknown" | "info"
                    | "stateset" | "gaugehistogram",
                ) => Ok(()),
                Some(kind) => error(format!("unknown metric type {kind:?} for {name}")),
                None => error(format!("# TYPE {name} without a type")),
            }
        }
        _ => Ok(()),
    }
}

fn is_quoted(word: &str) -> bool {
    word.len() >= 2 && word.starts_with('"') && word.ends_with('"')
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A position in one sample line.
struct Cursor<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// Skips blanks; whether there were any.
    fn skip_blanks(&mut self) -> bool {
        let rest = self.rest();
        let skipped = rest.len() - rest.trim_start_matches(is_blank).len();
        self.pos += skipped;
        skipped > 0
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn error<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line: self.line,
            reason: format!(
                "{} (column {})",
                reason.into(),
                self.text[..self.pos].chars().count() + 1
            ),
        })
    }

    /// The longest prefix of the rest whose characters satisfy `first` then
    /// `more`.
    fn identifier(&mut self, first: fn(char) -> bool, more: fn(char) -> bool) -> Option<&'a str> {
        let rest = self.rest();
        let mut end = 0;
        for (i, c) in rest.char_indices() {
            let ok = if i == 0 { first(c) } else { more(c) };
            if !ok {
                break;
            }
            end = i + c.len_utf8();
        }
        if end == 0 {
            return None;
        }
        self.pos += end;
        Some(&rest[..end])
    }

    fn metric_name(&mut self) -> Option<&'a str> {
        self.identifier(
            |c| c.is_ascii_alphabetic() || c == '_' || c == ':',
            |c| c.is_ascii_alphanumeric() || c == '_' || c == ':',
        )
    }

    fn label_name(&mut self) -> Option<&'a str> {
        self.identifier(
            |c| c.is_ascii_alphabetic() || c == '_',
            |c| c.is_ascii_alphanumeric() || c == '_',
        )
    }

    /// A double-quoted string at the cursor, unescaped.
    fn quoted(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        if !self.eat('"') {
            return self.error("expected '\"'");
        }
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, other)) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        self.pos = start;
        self.error("unterminated quoted string")
    }

    /// The characters up to the next blank (or the end).
    fn token(&mut self) -> &'a str {
        let rest = self.rest();
        let end = rest.find(is_blank).unwrap_or(rest.len());
        self.pos += end;
        &rest[..end]
    }

    /// `name{labels} value [timestamp] [# exemplar]`
    fn sample(mut self) -> Result<Sample, ParseError> {
        let mut name = if self.peek() == Some('{') {
            None
        } else {
            match self.metric_name() {
                Some(name) => Some(name.to_owned()),
                None => return self.error("expected a metric name"),
            }
        };
        let blank_after_name = self.skip_blanks();
        let mut labels = BTreeMap::new();
        let braces = self.eat('{');
        if braces {
            self.labels(&mut name, &mut labels)?;
        }
        let Some(name) = name else {
            return self.error("missing metric name");
        };
        let blank = self.skip_blanks() || blank_after_name;
        if self.at_end() {
            return self.error(format!("missing value for {name}"));
        }
        if !blank && !braces {
            return self.error(format!("invalid character after metric name {name:?}"));
        }
        let start = self.pos;
        let token = self.token();
        let Some(value) = parse_float(token) else {
            self.pos = start;
            return self.error(format!("invalid value {token:?} for {name}"));
        };
        self.skip_blanks();
        if !self.at_end() && self.peek() != Some('#') {
            let start = self.pos;
            let token = self.token();
            if token.parse::<i64>().is_err() && !parse_float(token).is_some_and(f64::is_finite) {
                self.pos = start;
                return self.error(format!("invalid timestamp {token:?}"));
            }
            self.skip_blanks();
        }
        if !self.at_end() && self.peek() != Some('#') {
            return self.error("unexpected text after the value and timestamp");
        }
        // The rest, if any, is an OpenMetrics exemplar: ignored.
        Ok(Sample {
            name,
            labels,
            value,
        })
    }

    /// The label set after `{`, up to and including `}`.
    fn labels(
        &mut self,
        name: &mut Option<String>,
        labels: &mut BTreeMap<String, String>,
    ) -> Result<(), ParseError> {
        loop {
            self.skip_blanks();
            if self.eat('}') {
                return Ok(());
            }
            if self.at_end() {
                return self.error("unterminated label set: missing '}'");
            }
            let key_start = self.pos;
            let (key, quoted_key) = if self.peek() == Some('"') {
                (self.quoted()?, true)
            } else {
                match self.label_name() {
                    Some(key) => (key.to_owned(), false),
                    None => return self.error("expected a label name"),
                }
            };
            self.skip_blanks();
            if self.eat('=') {
                self.skip_blanks();
                if self.peek() != Some('"') {
                    return self.error(format!("expected a quoted value for label {key:?}"));
                }
                let value = self.quoted()?;
                if labels.contains_key(&key) {
                    self.pos = key_start;
                    return self.error(format!("duplicate label {key:?}"));
                }
                labels.insert(key, value);
            } else if quoted_key && name.is_none() && labels.is_empty() {
                // Prometheus 3: `{"metric.name", label="v"}`.
                *name = Some(key);
            } else {
                return self.error(format!("expected '=' after label name {key:?}"));
            }
            self.skip_blanks();
            if self.eat(',') {
                continue;
            }
            if self.eat('}') {
                return Ok(());
            }
            if self.at_end() {
                return self.error("unterminated label set: missing '}'");
            }
            return self.error("expected ',' or '}' in the label set");
        }
    }
}

/// Go's `strconv.ParseFloat` as Prometheus uses it, for the spellings that
/// occur: decimals, exponents, `NaN`, `[+-]Inf` (any case). Rust's parser
/// accepts the same, plus `infinity`, which Go also accepts.
fn parse_float(token: &str) -> Option<f64> {
    if token.is_empty() || token.contains('_') {
        return None;
    }
    token.parse::<f64>().ok()
}

// ---------------------------------------------------------------------------
// Selecting
// ---------------------------------------------------------------------------

/// Why a value could not be read off parsed samples.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelectError {
    /// No series has the name and all the labels.
    #[error("missing series: no sample matches {selector}")]
    MissingSeries {
        /// The selector, as `name{label="value",…}`.
        selector: String,
    },
    /// The matching series sum to `NaN` or an infinity.
    #[error("series {selector} is not a finite number: {value}")]
    NotFinite {
        /// The selector, as `name{label="value",…}`.
        selector: String,
        /// The sum.
        value: f64,
    },
}

/// The sum of every sample named `selector.name` that carries all of
/// `selector.labels` with exactly those values (other labels may differ, so
/// several series, e.g. one per pod, may match). No match is an error, never
/// 0; so is a sum that is `NaN` or infinite.
pub fn select(samples: &[Sample], selector: &MetricSelector) -> Result<f64, SelectError> {
    let mut matched = false;
    let mut sum = 0.0;
    for sample in samples.iter().filter(|s| {
        s.name == selector.name
            && selector
                .labels
                .iter()
                .all(|(k, v)| s.labels.get(k) == Some(v))
    }) {
        matched = true;
        sum += sample.value;
    }
    if !matched {
        return Err(SelectError::MissingSeries {
            selector: display_selector(selector),
        });
    }
    if !sum.is_finite() {
        return Err(SelectError::NotFinite {
            selector: display_selector(selector),
            value: sum,
        });
    }
    Ok(sum)
}

/// `name{label="value",…}` with Prometheus escapes.
fn display_selector(selector: &MetricSelector) -> String {
    if selector.labels.is_empty() {
        return selector.name.clone();
    }
    let labels: Vec<String> = selector
        .labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{}{{{}}}", selector.name, labels.join(","))
}

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

/// How to authenticate to a `/metrics` endpoint or a Prometheus server.
///
/// `ca_file` is applied when the client is built ([`HttpAuth::build_client`]):
/// a client for an endpoint with a private CA must be built from its
/// `HttpAuth`. The bearer token and the password are read from their files on
/// every request (they are small, and Kubernetes rotates projected tokens and
/// mounted secrets in place), so a rotation takes effect without a restart.
/// Surrounding whitespace (a trailing newline) is trimmed off both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAuth {
    /// `Authorization: Bearer <contents>`.
    pub bearer_token_file: Option<PathBuf>,
    /// `Authorization: Basic`: the user name and a file with the password.
    pub basic_auth: Option<(String, PathBuf)>,
    /// A PEM bundle of the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
}

impl HttpAuth {
    /// A client builder with `ca_file`, if set, as the only trusted roots
    /// (as Prometheus' `tls_config.ca_file` does), and ebb's user agent.
    pub fn client_builder(&self) -> Result<ClientBuilder, ScalerError> {
        let mut builder =
            Client::builder().user_agent(concat!("ebb-autoscaler/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|source| ScalerError::Credentials {
                path: path.clone(),
                reason: source.to_string(),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ScalerError::Tls {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(ScalerError::Tls {
                    path: path.clone(),
                    reason: "no PEM certificate in the file".into(),
                });
            }
            builder = builder.tls_certs_only(certs);
        }
        Ok(builder)
    }

    /// [`client_builder`](Self::client_builder), built.
    pub fn build_client(&self) -> Result<Client, ScalerError> {
        self.client_builder()?
            .build()
            .map_err(|e| ScalerError::Tls {
                path: self.ca_file.clone().unwrap_or_default(),
                reason: e.to_string(),
            })
    }

    /// Adds the `Authorization` header, reading the token or password file
    /// now. Setting both a bearer token and basic auth is an error.
    pub async fn apply(&self, request: RequestBuilder) -> Result<RequestBuilder, ScalerError> {
        match (&self.bearer_token_file, &self.basic_auth) {
            (Some(_), Some(_)) => Err(ScalerError::Credentials {
                path: PathBuf::new(),
                reason: "both a bearer token and basic auth are set".into(),
            }),
            (Some(path), None) => Ok(request.bearer_auth(read_secret(path).await?)),
            (None, Some((user, path))) => {
                Ok(request.basic_auth(user, Some(read_secret(path).await?)))
            }
            (None, None) => Ok(request),
        }
    }
}

/// A token or password file's contents, trimmed; empty is an error.
async fn read_secret(path: &Path) -> Result<String, ScalerError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| ScalerError::Credentials {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ScalerError::Credentials {
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Ok(secret.to_owned())
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a Prometheus value could not be read. The caller treats every error as
/// "unknown" (hold the current count), never as 0.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ScalerError {
    /// The URL does not parse or is not http(s).
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// A token, password or CA file cannot be read or is empty.
    #[error("credentials {path:?}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    /// The CA file holds no usable certificate.
    #[error("TLS CA file {path:?}: {reason}")]
    Tls { path: PathBuf, reason: String },
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed (refused, DNS, TLS handshake).
    #[error("cannot connect: {0}")]
    Connect(reqwest::Error),
    /// Another transport failure (reset, bad HTTP).
    #[error("request failed: {0}")]
    Http(reqwest::Error),
    /// A non-2xx status (without a Prometheus API error in the body).
    #[error("HTTP status {status}: {body}")]
    HttpStatus {
        status: u16,
        /// The start of the body, for the log.
        body: String,
    },
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("response body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The `/metrics` text does not parse.
    #[error("cannot parse metrics: {0}")]
    Parse(ParseError),
    /// The Prometheus API answer is not the JSON it should be.
    #[error("unexpected Prometheus API answer: {0}")]
    Decode(String),
    /// No series matches the selector.
    #[error("{0}")]
    MissingSeries(SelectError),
    /// The query returned an empty vector.
    #[error("query {query:?} returned no series")]
    EmptyResult { query: String },
    /// Prometheus answered `"status":"error"`.
    #[error("Prometheus query failed ({error_type}): {message}")]
    #[strum(serialize = "query_error")]
    Query { error_type: String, message: String },
    /// The query returned a matrix or a string.
    #[error("query result type {0:?} is not a vector or a scalar")]
    UnsupportedResult(String),
    /// The value is `NaN` or infinite.
    #[error("value is not a finite number: {0}")]
    NotFinite(f64),
}

impl ScalerError {
    /// A bounded label for `ebb_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        self.into()
    }
}

impl From<SelectError> for ScalerError {
    fn from(error: SelectError) -> Self {
        match error {
            SelectError::NotFinite { value, .. } => Self::NotFinite(value),
            missing @ SelectError::MissingSeries { .. } => Self::MissingSeries(missing),
        }
    }
}

fn transport(error: reqwest::Error, timeout: Duration) -> ScalerError {
    if error.is_timeout() {
        ScalerError::Timeout(timeout)
    } else if error.is_connect() {
        ScalerError::Connect(error)
    } else {
        ScalerError::Http(error)
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

fn parse_url(url: &str) -> Result<Url, ScalerError> {
    let parsed = Url::parse(url).map_err(|e| ScalerError::Url {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ScalerError::Url {
            url: url.to_owned(),
            reason: "the scheme must be http or https".into(),
        });
    }
    Ok(parsed)
}

/// Sends the request and reads at most [`MAX_BODY_BYTES`] of the body:
/// (status, body).
async fn fetch(
    request: RequestBuilder,
    timeout: Duration,
) -> Result<(reqwest::StatusCode, Vec<u8>), ScalerError> {
    let work = async {
        let mut response: Response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport(e, timeout))?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(ScalerError::BodyTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(e, timeout))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ScalerError::BodyTooLarge {
                    limit: MAX_BODY_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ScalerError::Timeout(timeout)))
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .chars()
        .take(BODY_EXCERPT_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Scrapes `url` (a `/metrics` endpoint) and returns the sum of the series
/// that match `selector` ([`select`]).
///
/// `timeout` bounds the whole exchange, reading the credentials and the body
/// included. Errors: a bad URL, unreadable credentials, a timeout, a failed
/// connection, a non-2xx status, a body over [`MAX_BODY_BYTES`], text that
/// does not parse, no matching series, a sum that is not finite.
pub async fn scrape(
    client: &Client,
    auth: &HttpAuth,
    url: &str,
    selector: &MetricSelector,
    timeout: Duration,
) -> Result<f64, ScalerError> {
    let url = parse_url(url)?;
    let work = async {
        let request = client
            .get(url)
            .header(ACCEPT, HeaderValue::from_static(SCRAPE_ACCEPT));
        let request = auth.apply(request).await?;
        fetch(request, timeout).await
    };
    let (status, body) = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ScalerError::Timeout(timeout)))?;
    if !status.is_success() {
        return Err(ScalerError::HttpStatus {
            status: status.as_u16(),
            body: excerpt(&body),
        });
    }
    let text = std::str::from_utf8(&body).map_err(|e| {
        let valid = &body[..e.valid_up_to()];
        ScalerError::Parse(ParseError {
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            reason: "invalid UTF-8".into(),
        })
    })?;
    let samples = parse_metrics(text).map_err(ScalerError::Parse)?;
    Ok(select(&samples, selector)?)
}

/// Runs the PromQL instant query `promql` on the Prometheus server at
/// `server` (a base URL, which may carry a path prefix such as
/// `http://host:9090/prometheus`): `GET {server}/api/v1/query?query=…`.
///
/// A vector result is summed over its series; a scalar is taken as is. An
/// empty vector, a matrix or string result, a `NaN` or infinite value, and
/// `"status":"error"` (reported with Prometheus' `errorType` and `error`,
/// whatever the HTTP status) are errors, as are the transport failures of
/// [`scrape`].
pub async fn query(
    client: &Client,
    auth: &HttpAuth,
    server: &str,
    promql: &str,
    timeout: Duration,
) -> Result<f64, ScalerError> {
    let mut url = parse_url(server)?;
    let path = format!("{}/api/v1/query", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(None);
    url.query_pairs_mut().append_pair("query", promql);
    let work = async {
        let request = client
            .get(url)
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        let request = auth.apply(request).await?;
        fetch(request, timeout).await
    };
    let (status, body) = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(ScalerError::Timeout(timeout)))?;
    let json: Json = match serde_json::from_slice(&body) {
        Ok(json) => json,
        Err(_) if !status.is_success() => {
            return Err(ScalerError::HttpStatus {
                status: status.as_u16(),
                body: excerpt(&body),
            });
        }
        Err(e) => return Err(ScalerError::Decode(format!("invalid JSON: {e}"))),
    };
    if json.get("status").and_then(Json::as_str) == Some("error") {
        let field = |name: &str| {
            json.get(name)
                .and_then(Json::as_str)
                .unwrap_or("unknown")
                .to_owned()
        };
        return Err(ScalerError::Query {
            error_type: field("errorType"),
            message: field("error"),
        });
    }
    if !status.is_success() {
        return Err(ScalerError::HttpStatus {
            status: status.as_u16(),
            body: excerpt(&body),
        });
    }
    query_value(&json, promql)
}

/// The Prometheus input of functions that have one (`ebb.io/prometheus-*`):
/// a scrape or a query, with shared credentials and client.
#[derive(Debug, Clone)]
pub struct PrometheusScaler {
    client: Client,
    auth: HttpAuth,
    timeout: Duration,
}

impl PrometheusScaler {
    /// `client` trusts `auth`'s CA ([`HttpAuth::build_client`]); `timeout`
    /// bounds one read.
    pub fn new(client: Client, auth: HttpAuth, timeout: Duration) -> Self {
        Self {
            client,
            auth,
            timeout,
        }
    }

    /// The value of the Prometheus input `p`.
    pub async fn read(&self, p: &ebb_model::Prometheus) -> Result<f64, ScalerError> {
        let (client, auth, timeout) = (&self.client, &self.auth, self.timeout);
        match p {
            ebb_model::Prometheus::Scrape { url, metric } => {
                scrape(client, auth, url, metric, timeout).await
            }
            ebb_model::Prometheus::Query { server, query: q } => {
                query(client, auth, server, q, timeout).await
            }
        }
    }
}

impl<W: Sync> super::Scaler<W> for PrometheusScaler {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    fn role(&self) -> super::Role {
        super::Role::Metric
    }

    fn serves(&self, f: &ebb_model::FunctionSpec) -> bool {
        f.prometheus.is_some()
    }

    fn read<'a>(&'a self, f: &'a ebb_model::FunctionSpec, _: &'a W) -> super::ReadFuture<'a> {
        Box::pin(async move {
            let Some(p) = &f.prometheus else {
                return Ok(super::Reading::default());
            };
            Ok(super::Reading::value(self.read(p).await?))
        })
    }
}

/// The value of a successful `/api/v1/query` answer.
fn query_value(json: &Json, promql: &str) -> Result<f64, ScalerError> {
    let decode = |what: &str| ScalerError::Decode(what.to_owned());
    match json.get("status").and_then(Json::as_str) {
        Some("success") => {}
        Some(other) => return Err(decode(&format!("status {other:?}"))),
        None => return Err(decode("no \"status\"")),
    }
    let data = json.get("data").ok_or_else(|| decode("no \"data\""))?;
    let result_type = data
        .get("resultType")
        .and_then(Json::as_str)
        .ok_or_else(|| decode("no \"data.resultType\""))?;
    let result = data
        .get("result")
        .ok_or_else(|| decode("no \"data.result\""))?;
    let value = match result_type {
        "scalar" => sample_value(result)?,
        "vector" => {
            let series = result
                .as_array()
                .ok_or_else(|| decode("\"data.result\" is not an array"))?;
            if series.is_empty() {
                return Err(ScalerError::EmptyResult {
                    query: promql.to_owned(),
                });
            }
            let mut sum = 0.0;
            for one in series {
                let value = match one.get("value") {
                    Some(value) => value,
                    None if one.get("histogram").is_some() => {
                        return Err(ScalerError::UnsupportedResult("native histogram".into()));
                    }
                    None => return Err(decode("a vector sample without \"value\"")),
                };
                let value = sample_value(value)?;
                if !value.is_finite() {
                    return Err(ScalerError::NotFinite(value));
                }
                sum += value;
            }
            sum
        }
        other => return Err(ScalerError::UnsupportedResult(other.to_owned())),
    };
    if !value.is_finite() {
        return Err(ScalerError::NotFinite(value));
    }
    Ok(value)
}

/// `[timestamp, "value"]`
fn sample_value(pair: &Json) -> Result<f64, ScalerError> {
    let text = pair
        .as_array()
        .filter(|a| a.len() == 2)
        .and_then(|a| a[1].as_str())
        .ok_or_else(|| {
            ScalerError::Decode(format!("expected [timestamp, \"value\"], got {pair}"))
        })?;
    parse_float(text).ok_or_else(|| ScalerError::Decode(format!("invalid sample value {text:?}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::Router;
    use axum::extract::Query;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn selector(name: &str, pairs: &[(&str, &str)]) -> MetricSelector {
        MetricSelector {
            name: name.into(),
            labels: labels(pairs),
        }
    }

    fn one(line: &str) -> Sample {
        let mut samples = parse_metrics(line).expect("parses");
        assert_eq!(samples.len(), 1, "{samples:?}");
        samples.remove(0)
    }

    fn parse_error(text: &str) -> ParseError {
        parse_metrics(text).expect_err("must not parse")
    }

    #[test]
    fn parses_plain_samples_comments_and_blank_lines() {
        let text = "# HELP queue_depth Messages waiting.\n\
                    # TYPE queue_depth gauge\n\
                    \n\
                    # a free comment, with = and { }\n\
                    queue_depth 12\n\
                    \t \n\
                    queue_depth{queue=\"b\"} 3.5\n\
                    job:requests:rate5m 0.25\n";
        let samples = parse_metrics(text).unwrap();
        assert_eq!(
            samples,
            vec![
                Sample {
                    name: "queue_depth".into(),
                    labels: BTreeMap::new(),
                    value: 12.0
                },
                Sample {
                    name: "queue_depth".into(),
                    labels: labels(&[("queue", "b")]),
                    value: 3.5
                },
                Sample {
                    name: "job:requests:rate5m".into(),
                    labels: BTreeMap::new(),
                    value: 0.25
                },
            ]
        );
        assert_eq!(parse_metrics("").unwrap(), vec![]);
        assert_eq!(parse_metrics("\n\n# only comments\n").unwrap(), vec![]);
    }

    #[test]
    fn label_values_keep_commas_equals_braces_and_hashes() {
        let sample = one(r##"m{a="x,y=z",b="}{",c="# not a comment", d = "sp ace" ,} 1"##);
        assert_eq!(
            sample.labels,
            labels(&[
                ("a", "x,y=z"),
                ("b", "}{"),
                ("c", "# not a comment"),
                ("d", "sp ace")
            ])
        );
        assert_eq!(sample.value, 1.0);
    }

    #[test]
    fn label_values_unescape() {
        let sample = one(r#"m{q="say \"hi\"",p="C:\\dir\\",n="a\nb",u="\t"} 2"#);
        assert_eq!(sample.labels["q"], r#"say "hi""#);
        assert_eq!(sample.labels["p"], r"C:\dir\");
        assert_eq!(sample.labels["n"], "a\nb");
        // Unknown escapes stay as written, as in Prometheus.
        assert_eq!(sample.labels["u"], r"\t");
        assert_eq!(one(r#"m{a=""} 0"#).labels["a"], "");
    }

    #[test]
    fn histograms_and_summaries_are_plain_samples() {
        let text = r#"# HELP rpc_seconds RPC latency.
# TYPE rpc_seconds histogram
rpc_seconds_bucket{le="0.5"} 3
rpc_seconds_bucket{le="1"} 5
rpc_seconds_bucket{le="+Inf"} 7
rpc_seconds_sum 4.2
rpc_seconds_count 7
# TYPE lag summary
lag{quantile="0.99"} NaN
lag_sum 1e3
lag_count 2
"#;
        let samples = parse_metrics(text).unwrap();
        assert_eq!(samples.len(), 8);
        assert_eq!(
            select(&samples, &selector("rpc_seconds_bucket", &[("le", "+Inf")])),
            Ok(7.0)
        );
        assert_eq!(
            select(&samples, &selector("rpc_seconds_bucket", &[])),
            Ok(15.0)
        );
        assert_eq!(select(&samples, &selector("lag_sum", &[])), Ok(1000.0));
        assert!(samples[5].value.is_nan());
    }

    #[test]
    fn special_values_timestamps_and_exemplars() {
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m +Inf").value, f64::INFINITY);
        assert_eq!(one("m -Inf").value, f64::NEG_INFINITY);
        assert_eq!(one("m -1.5e-3").value, -0.0015);
        assert_eq!(one("m 7 1712345678901").value, 7.0);
        assert_eq!(one("m{a=\"b\"} 7 -3").value, 7.0);
        assert_eq!(one("m 7 1712345678.901").value, 7.0); // OpenMetrics seconds
        assert_eq!(
            one("m_total 7 # {trace_id=\"x\"} 1 1712345678.1").value,
            7.0
        );
        assert_eq!(one("m_total 7 1712345678 # {trace_id=\"x\"} 1").value, 7.0);
        assert_eq!(one("  m \t 8\t ").value, 8.0);
        assert_eq!(one("m{a=\"b\"}9").value, 9.0);
        assert_eq!(parse_metrics("a 1\r\nb 2\r\n").unwrap().len(), 2);
    }

    #[test]
    fn openmetrics_eof_ends_the_input() {
        let text = "# TYPE a counter\n# UNIT a seconds\na_total 1\n# EOF\n";
        assert_eq!(parse_metrics(text).unwrap().len(), 1);
        assert_eq!(parse_metrics("a 1\n# EOF\ngarbage{\n").unwrap().len(), 1);
    }

    #[test]
    fn utf8_quoted_names() {
        let sample = one(r#"{"my.metric", "le.vel"="x"} 4"#);
        assert_eq!(sample.name, "my.metric");
        assert_eq!(sample.labels, labels(&[("le.vel", "x")]));
        assert_eq!(one(r#"{"only.name"} 1"#).name, "only.name");
    }

    #[test]
    fn malformed_lines_report_their_line_number() {
        let cases = [
            ("ok 1\nbad{a=\"b\" 1\n", 2, "expected ',' or '}'"),
            (
                "ok 1\n\nm{a=\"unterminated} 1",
                3,
                "unterminated quoted string",
            ),
            ("m{a=b} 1", 1, "expected a quoted value"),
            ("m{a} 1", 1, "expected '=' after label name"),
            ("m{a=\"1\",a=\"2\"} 1", 1, "duplicate label"),
            ("m{a=\"1\"", 1, "missing '}'"),
            ("m", 1, "missing value"),
            ("m{}", 1, "missing value"),
            ("m abc", 1, "invalid value"),
            ("m 1 2 3", 1, "unexpected text"),
            ("m 1 soon", 1, "invalid timestamp"),
            ("m 1_000", 1, "invalid value"),
            ("a 1\nb 2\n1abc 3", 3, "expected a metric name"),
            ("m-x 1", 1, "invalid character after metric name"),
            ("{a=\"b\"} 1", 1, "missing metric name"),
            ("# TYPE m counterish", 1, "unknown metric type"),
            ("# TYPE m", 1, "without a type"),
            ("# HELP", 1, "without a metric name"),
        ];
        for (text, line, reason) in cases {
            let error = parse_error(text);
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.reason.contains(reason), "{text:?}: {error}");
            assert!(error.to_string().starts_with(&format!("line {line}: ")));
        }
        assert!(parse_error("m{a=b} 1").reason.contains("(column 5)"));
    }

    /// Where prometheus-parse is right (plain names, labels without `,`,
    /// `=` or escapes, untyped lines), it agrees with us.
    #[test]
    fn agrees_with_prometheus_parse_on_plain_text() {
        let text = "a 1\nb{x=\"1\",y=\"two\"} 2.5\nc{z=\"q\"} -3 1712345678000\nd NaN\n";
        let ours = parse_metrics(text).unwrap();
        let theirs =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        assert_eq!(ours.len(), theirs.samples.len());
        for (ours, theirs) in ours.iter().zip(&theirs.samples) {
            assert_eq!(ours.name, theirs.metric);
            let their_labels: BTreeMap<String, String> = theirs
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(ours.labels, their_labels);
            let prometheus_parse::Value::Untyped(value) = theirs.value else {
                panic!("untyped expected: {:?}", theirs.value);
            };
            assert!(ours.value == value || (ours.value.is_nan() && value.is_nan()));
        }
    }

    #[test]
    fn select_sums_matching_series() {
        let samples = parse_metrics(
            "pending{pod=\"a\",queue=\"q\"} 3\n\
             pending{pod=\"b\",queue=\"q\"} 4\n\
             pending{pod=\"c\",queue=\"other\"} 100\n\
             pending_total{queue=\"q\"} 1000\n",
        )
        .unwrap();
        assert_eq!(
            select(&samples, &selector("pending", &[("queue", "q")])),
            Ok(7.0)
        );
        assert_eq!(select(&samples, &selector("pending", &[])), Ok(107.0));
        assert_eq!(
            select(
                &samples,
                &selector("pending", &[("queue", "q"), ("pod", "b")])
            ),
            Ok(4.0)
        );
    }

    #[test]
    fn select_missing_series_is_an_error_not_zero() {
        let samples = parse_metrics("pending{queue=\"q\"} 0\n").unwrap();
        assert_eq!(
            select(&samples, &selector("pending", &[("queue", "q")])),
            Ok(0.0)
        );
        let missing = select(&samples, &selector("pending", &[("queue", "x\"y")]));
        assert_eq!(
            missing,
            Err(SelectError::MissingSeries {
                selector: r#"pending{queue="x\"y"}"#.into()
            })
        );
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .starts_with("missing series")
        );
        assert!(matches!(
            select(&samples, &selector("absent", &[])),
            Err(SelectError::MissingSeries { .. })
        ));
        assert!(matches!(
            select(&[], &selector("pending", &[])),
            Err(SelectError::MissingSeries { .. })
        ));
    }

    #[test]
    fn select_nan_is_an_error() {
        let samples = parse_metrics("a NaN\nb +Inf\n").unwrap();
        assert!(matches!(
            select(&samples, &selector("a", &[])),
            Err(SelectError::NotFinite { .. })
        ));
        assert!(matches!(
            select(&samples, &selector("b", &[])),
            Err(SelectError::NotFinite { .. })
        ));
    }

    // --- HTTP ---------------------------------------------------------------

    const METRICS: &str = "# TYPE pending gauge\n\
                           pending{queue=\"q\",pod=\"a\"} 5\n\
                           pending{queue=\"q\",pod=\"b\"} 6\n";

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        format!("http://{addr}")
    }

    fn client() -> Client {
        HttpAuth::default().build_client().unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    async fn scrape_with(
        router: Router,
        path: &str,
        sel: &MetricSelector,
    ) -> Result<f64, ScalerError> {
        let base = serve(router).await;
        scrape(
            &client(),
            &HttpAuth::default(),
            &format!("{base}{path}"),
            sel,
            TIMEOUT,
        )
        .await
    }

    /// Scrapes `path` of a server that answers [`METRICS`] at `/metrics`.
    async fn scrape_metrics(path: &str, sel: &MetricSelector) -> Result<f64, ScalerError> {
        let router = Router::new().route("/metrics", get(|| async { METRICS }));
        scrape_with(router, path, sel).await
    }

    /// A server that answers `body` at `path`, after 30 s.
    fn slow(path: &str, body: &'static str) -> Router {
        let answer = async move || {
            tokio::time::sleep(Duration::from_secs(30)).await;
            body
        };
        Router::new().route(path, get(answer))
    }

    #[tokio::test]
    async fn prometheus_scrape_ok() {
        let sel = selector("pending", &[("queue", "q")]);
        assert_eq!(scrape_metrics("/metrics", &sel).await.unwrap(), 11.0);
    }

    #[tokio::test]
    async fn prometheus_scrape_missing_series() {
        let sel = selector("pending", &[("queue", "z")]);
        let error = scrape_metrics("/metrics", &sel).await.unwrap_err();
        assert_eq!(error.metric_label(), "missing_series", "{error}");
    }

    #[tokio::test]
    async fn prometheus_scrape_not_found() {
        let sel = selector("pending", &[]);
        let error = scrape_metrics("/nope", &sel).await.unwrap_err();
        assert!(
            matches!(error, ScalerError::HttpStatus { status: 404, .. }),
            "{error}"
        );
        assert_eq!(error.metric_label(), "http_status");
    }

    #[tokio::test]
    async fn prometheus_scrape_parse_error() {
        let router = Router::new().route("/metrics", get(|| async { "ok 1\nbroken{ 2\n" }));
        let error = scrape_with(router, "/metrics", &selector("ok", &[]))
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "parse");
        assert!(error.to_string().contains("line 2"), "{error}");
    }

    #[tokio::test]
    async fn prometheus_scrape_timeout() {
        let base = serve(slow("/metrics", METRICS)).await;
        let error = scrape(
            &client(),
            &HttpAuth::default(),
            &format!("{base}/metrics"),
            &selector("pending", &[]),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(error.metric_label(), "timeout", "{error}");
    }

    #[tokio::test]
    async fn prometheus_scrape_body_too_large() {
        let router =
            Router::new().route("/metrics", get(|| async { "x".repeat(MAX_BODY_BYTES + 1) }));
        let error = scrape_with(router, "/metrics", &selector("x", &[]))
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "body_too_large", "{error}");
    }

    #[tokio::test]
    async fn prometheus_scrape_connect_refused_and_bad_url() {
        // Bind then drop, so the port is (very likely) closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = scrape(
            &client(),
            &HttpAuth::default(),
            &format!("http://{addr}/metrics"),
            &selector("x", &[]),
            TIMEOUT,
        )
        .await
        .unwrap_err();
        assert_eq!(error.metric_label(), "connect", "{error}");
        let error = scrape(
            &client(),
            &HttpAuth::default(),
            "ftp://x/",
            &selector("x", &[]),
            TIMEOUT,
        )
        .await
        .unwrap_err();
        assert_eq!(error.metric_label(), "url", "{error}");
    }

    #[tokio::test]
    async fn prometheus_scrape_sends_bearer_and_basic_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let password = dir.path().join("password");
        std::fs::write(&token, "s3cret\n").unwrap();
        std::fs::write(&password, "pw").unwrap();
        let router = Router::new().route(
            "/metrics",
            get(|headers: HeaderMap| async move {
                match headers.get("authorization").and_then(|v| v.to_str().ok()) {
                    // "user:pw" in base64
                    Some("Bearer s3cret") | Some("Basic dXNlcjpwdw==") => (StatusCode::OK, METRICS),
                    _ => (StatusCode::UNAUTHORIZED, "no"),
                }
            }),
        );
        let base = serve(router).await;
        let url = format!("{base}/metrics");
        let sel = selector("pending", &[]);
        let read = async |auth: &HttpAuth| scrape(&client(), auth, &url, &sel, TIMEOUT).await;
        let bearer = HttpAuth {
            bearer_token_file: Some(token.clone()),
            ..HttpAuth::default()
        };
        assert_eq!(read(&bearer).await.unwrap(), 11.0);
        let basic = HttpAuth {
            basic_auth: Some(("user".into(), password.clone())),
            ..HttpAuth::default()
        };
        assert_eq!(read(&basic).await.unwrap(), 11.0);
        // The token is re-read on every request.
        std::fs::write(&token, "rotated").unwrap();
        let error = read(&bearer).await.unwrap_err();
        assert!(
            matches!(error, ScalerError::HttpStatus { status: 401, .. }),
            "{error}"
        );
        let none = read(&HttpAuth::default()).await.unwrap_err();
        assert_eq!(none.metric_label(), "http_status");
        let missing = HttpAuth {
            bearer_token_file: Some(dir.path().join("absent")),
            ..HttpAuth::default()
        };
        let error = read(&missing).await.unwrap_err();
        assert_eq!(error.metric_label(), "credentials", "{error}");
        let both = HttpAuth {
            bearer_token_file: Some(token),
            basic_auth: Some(("user".into(), password)),
            ca_file: None,
        };
        let error = read(&both).await.unwrap_err();
        assert_eq!(error.metric_label(), "credentials", "{error}");
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let auth = HttpAuth {
            ca_file: Some(garbage),
            ..HttpAuth::default()
        };
        assert_eq!(auth.build_client().unwrap_err().metric_label(), "tls");
        let auth = HttpAuth {
            ca_file: Some(dir.path().join("absent.pem")),
            ..HttpAuth::default()
        };
        assert_eq!(
            auth.build_client().unwrap_err().metric_label(),
            "credentials"
        );
    }

    /// A fake Prometheus: answers `/prefix/api/v1/query` by the query text.
    async fn prometheus_server() -> String {
        async fn answer(Query(params): Query<HashMap<String, String>>) -> (StatusCode, String) {
            let query = params.get("query").cloned().unwrap_or_default();
            let ok = |data: &str| {
                (
                    StatusCode::OK,
                    format!(r#"{{"status":"success","data":{data}}}"#),
                )
            };
            match query.as_str() {
                r#"sum(rate(jobs_total{queue="a,b"}[1m]))"# => ok(
                    r#"{"resultType":"vector","result":[{"metric":{},"value":[1712345678.123,"12.5"]}]}"#,
                ),
                "per_pod" => ok(
                    r#"{"resultType":"vector","result":[
                        {"metric":{"pod":"a"},"value":[1,"1.5"]},
                        {"metric":{"pod":"b"},"value":[1,"2"]}]}"#,
                ),
                "scalar(1)" => ok(r#"{"resultType":"scalar","result":[1712345678,"42"]}"#),
                "empty" => ok(r#"{"resultType":"vector","result":[]}"#),
                "nan" => ok(r#"{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}"#),
                "inf" => ok(r#"{"resultType":"scalar","result":[1,"+Inf"]}"#),
                "matrix" => ok(r#"{"resultType":"matrix","result":[]}"#),
                "garbage" => (StatusCode::OK, "<html>".into()),
                "down" => (StatusCode::BAD_GATEWAY, "bad gateway".into()),
                _ => (
                    StatusCode::BAD_REQUEST,
                    r#"{"status":"error","errorType":"bad_data","error":"parse error: unexpected end of input"}"#
                        .into(),
                ),
            }
        }
        let router = Router::new().route("/prefix/api/v1/query", get(answer));
        format!("{}/prefix/", serve(router).await)
    }

    #[tokio::test]
    async fn prometheus_query_results() {
        let server = prometheus_server().await;
        let run = |q: &'static str| {
            let server = server.clone();
            async move { query(&client(), &HttpAuth::default(), &server, q, TIMEOUT).await }
        };
        assert_eq!(
            run(r#"sum(rate(jobs_total{queue="a,b"}[1m]))"#)
                .await
                .unwrap(),
            12.5
        );
        assert_eq!(run("per_pod").await.unwrap(), 3.5);
        assert_eq!(run("scalar(1)").await.unwrap(), 42.0);
        let label = |r: Result<f64, ScalerError>| r.unwrap_err().metric_label();
        assert_eq!(label(run("empty").await), "empty_result");
        assert_eq!(label(run("nan").await), "not_finite");
        assert_eq!(label(run("inf").await), "not_finite");
        assert_eq!(label(run("matrix").await), "unsupported_result");
        assert_eq!(label(run("garbage").await), "decode");
        assert_eq!(label(run("down").await), "http_status");
        let error = run("sum(").await.unwrap_err();
        assert_eq!(error.metric_label(), "query_error");
        assert_eq!(
            error.to_string(),
            "Prometheus query failed (bad_data): parse error: unexpected end of input"
        );
    }

    #[tokio::test]
    async fn prometheus_query_timeout() {
        let server = serve(slow("/api/v1/query", "{}")).await;
        let error = query(
            &client(),
            &HttpAuth::default(),
            &server,
            "up",
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(error.metric_label(), "timeout", "{error}");
    }
}
