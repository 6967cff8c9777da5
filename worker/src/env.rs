//! The OpenFaaS watchdog's environment convention for fork-mode handlers.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

/// Environment variables that describe a request to a fork-mode handler, as
/// the OpenFaaS watchdog sets them: `Http_Method`, `Http_Path`, `Http_Query`,
/// `Http_ContentLength` and one `Http_<Header_Name>` per request header (the
/// name in canonical form with `-` turned into `_`, the first value).
pub fn watchdog_env(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    content_length: usize,
) -> Vec<(String, OsString)> {
    let mut env = Vec::with_capacity(headers.keys_len() + 4);
    env.push(("Http_Method".to_string(), method.as_str().into()));
    env.push(("Http_Path".to_string(), uri.path().into()));
    if let Some(q) = uri.query() {
        env.push(("Http_Query".to_string(), q.into()));
    }
    env.push((
        "Http_ContentLength".to_string(),
        content_length.to_string().into(),
    ));
    for name in headers.keys() {
        if let Some(value) = headers.get(name) {
            env.push((
                format!("Http_{}", canonical_env_name(name.as_str())),
                OsString::from_vec(value.as_bytes().to_vec()),
            ));
        }
    }
    env
}

/// `x-call-id` → `X_Call_Id` (Go's canonical header form, `-` → `_`).
fn canonical_env_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        if c == '-' {
            out.push('_');
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(env: &'a [(String, OsString)], k: &str) -> Option<&'a OsString> {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }

    #[test]
    fn names_follow_the_watchdog() {
        assert_eq!(canonical_env_name("x-call-id"), "X_Call_Id");
        assert_eq!(canonical_env_name("content-type"), "Content_Type");
        assert_eq!(canonical_env_name("ce-specversion"), "Ce_Specversion");
        assert_eq!(canonical_env_name("x"), "X");
    }

    #[test]
    fn request_becomes_environment() {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().unwrap());
        headers.append("x-topic", "orders".parse().unwrap());
        headers.append("x-topic", "ignored".parse().unwrap());
        headers.insert("x-raw", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let uri: http::Uri = "/fn/echo?a=1&b=2".parse().unwrap();
        let env = watchdog_env(&http::Method::POST, &uri, &headers, 5);
        assert_eq!(get(&env, "Http_Method").unwrap(), "POST");
        assert_eq!(get(&env, "Http_Path").unwrap(), "/fn/echo");
        assert_eq!(get(&env, "Http_Query").unwrap(), "a=1&b=2");
        assert_eq!(get(&env, "Http_ContentLength").unwrap(), "5");
        assert_eq!(get(&env, "Http_Content_Type").unwrap(), "text/plain");
        assert_eq!(get(&env, "Http_X_Topic").unwrap(), "orders");
        // Non-UTF-8 header bytes pass through untouched.
        assert_eq!(
            get(&env, "Http_X_Raw").unwrap(),
            &OsString::from_vec(b"caf\xe9".to_vec())
        );
    }

    #[test]
    fn no_query_no_variable() {
        let uri: http::Uri = "/".parse().unwrap();
        let env = watchdog_env(&http::Method::GET, &uri, &http::HeaderMap::new(), 0);
        assert!(get(&env, "Http_Query").is_none());
    }
}
