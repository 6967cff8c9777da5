//! A broker-independent event and the HTTP headers it is delivered with
//! (CloudEvents 1.0 binary mode, plus ebb's own).

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

/// One event taken from a source, ready to be delivered.
#[derive(Debug, Clone)]
pub struct Event {
    /// `ce-id`: stable across redeliveries (stream sequence, partition/offset…).
    pub id: String,
    /// `ce-source`: `/ebb/{nats|amqp|kafka|cron}/…`.
    pub source: String,
    /// `ce-type`: `io.ebb.nats.message`, `io.ebb.cron.tick`, …
    pub kind: String,
    /// The topic (subject, routing key, Kafka topic) it arrived on.
    pub topic: String,
    /// When it entered the source; the same on every redelivery.
    pub time: DateTime<Utc>,
    /// The broker's own headers, passed through.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Where it sits in the source, for dead letters (`stream EBB sequence 42`).
    pub position: String,
}

/// Headers never copied from a broker message into the HTTP request: they
/// describe a connection or a body framing that the HTTP client sets itself.
const NOT_FORWARDED: [&str; 8] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Signs deliveries: `ebb-signature: t=UNIX,v1=HEX`, HEX being HMAC-SHA256 over
/// `"{t}.{body}"` with the shared secret.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(…)")
    }
}

impl Signer {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    /// The header value for `body` signed at `unix` seconds.
    pub fn sign(&self, unix: i64, body: &[u8]) -> String {
        // HMAC takes keys of any length; the error branch cannot happen.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(unix.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The headers of one delivery attempt.
pub fn delivery_headers(
    event: &Event,
    attempt: u32,
    signer: Option<&Signer>,
    now_unix: i64,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(event.headers.len() + 10);
    let mut is_cloudevent = false;
    for (name, value) in &event.headers {
        if NOT_FORWARDED.contains(&name.as_str()) {
            continue;
        }
        // A CloudEvent in binary mode carries its required `ce-specversion`
        // (other `ce-*` headers alone, such as Kafka's `ce-partitionkey`,
        // are extensions of the event this delivery describes).
        if name == "ce-specversion" {
            is_cloudevent = true;
        }
        h.append(name.clone(), value.clone());
    }
    if !is_cloudevent {
        set(&mut h, "ce-specversion", "1.0");
        set(&mut h, "ce-id", &event.id);
        set(&mut h, "ce-source", &event.source);
        set(&mut h, "ce-type", &event.kind);
        set(&mut h, "ce-subject", &event.topic);
        set(
            &mut h,
            "ce-time",
            &event.time.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
    }
    set(&mut h, "x-topic", &event.topic);
    set(&mut h, "ebb-attempt", &attempt.to_string());
    if let Some(s) = signer {
        set(&mut h, "ebb-signature", &s.sign(now_unix, &event.body));
    }
    h
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// The first KiB of a response body, with non-printable bytes as `\xNN`
/// (for `ebb-last-response`).
pub fn printable_prefix(body: &[u8]) -> String {
    let mut out = String::new();
    for &b in body.iter().take(1024) {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("traceparent", "00-abc-def-01".parse().unwrap());
        headers.insert("content-length", "99".parse().unwrap());
        Event {
            id: "42".into(),
            source: "/ebb/nats/EBB".into(),
            kind: "io.ebb.nats.message".into(),
            topic: "orders.eu".into(),
            time: DateTime::parse_from_rfc3339("2026-11-25T10:00:00.5Z")
                .unwrap()
                .with_timezone(&Utc),
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            position: "stream EBB sequence 42".into(),
        }
    }

    #[test]
    fn cloudevent_binary_headers() {
        let h = delivery_headers(&event(), 3, None, 0);
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-id"], "42");
        assert_eq!(h["ce-source"], "/ebb/nats/EBB");
        assert_eq!(h["ce-type"], "io.ebb.nats.message");
        assert_eq!(h["ce-subject"], "orders.eu");
        assert_eq!(h["ce-time"], "2026-11-25T10:00:00.500Z");
        assert_eq!(h["x-topic"], "orders.eu");
        assert_eq!(h["ebb-attempt"], "3");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert!(h.get("content-length").is_none());
        assert!(h.get("ebb-signature").is_none());
    }

    #[test]
    fn an_existing_cloudevent_keeps_its_attributes() {
        let mut e = event();
        e.headers.insert("ce-id", "upstream-7".parse().unwrap());
        e.headers.insert("ce-source", "/shop".parse().unwrap());
        e.headers.insert("ce-specversion", "1.0".parse().unwrap());
        e.headers.insert("ce-type", "shop.order".parse().unwrap());
        let h = delivery_headers(&e, 1, None, 0);
        assert_eq!(h["ce-id"], "upstream-7");
        assert_eq!(h["ce-source"], "/shop");
        assert_eq!(h["ce-type"], "shop.order");
        assert!(h.get("ce-subject").is_none());
        assert_eq!(h["x-topic"], "orders.eu");
    }

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // Reference computed independently:
        // printf '1700000000.{"id":1}' | openssl dgst -sha256 -hmac secret
        let s = Signer::new(b"secret".to_vec());
        assert_eq!(
            s.sign(1_700_000_000, b"{\"id\":1}"),
            "t=1700000000,v1=3dd1b9aef568d75f6790a84bd2e5dfa1f44409eef3cbdbd3f10b837376100c11"
        );
        let h = delivery_headers(&event(), 1, Some(&s), 1_700_000_000);
        assert_eq!(
            h["ebb-signature"],
            s.sign(1_700_000_000, b"{\"id\":1}").as_str()
        );
    }

    #[test]
    fn printable() {
        assert_eq!(printable_prefix(b"ok"), "ok");
        assert_eq!(printable_prefix(b"a\nb\xff\\"), "a\\x0Ab\\xFF\\x5C");
        assert_eq!(printable_prefix(&[b'x'; 2000]).len(), 1024);
    }
}
