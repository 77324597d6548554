//! What the relay learns from an inbound request (SPEC §4.3), pure: the event id, the
//! webhook name, and which request headers travel on to the downstream.

use http::{HeaderMap, HeaderName, header};
use serde_json::Value;

/// Header the sender may set to choose the event id; also added on forwarding.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header the relay adds on forwarding: the 1-based attempt number.
pub const RELAY_ATTEMPT: &str = "x-relay-attempt";
/// Header naming the webhook, the prototype's fallback for the name. No Genesys product
/// sets it by itself; a sender may (a data action's request template can).
pub const GENESYS_WEBHOOK_NAME: &str = "x-genesys-cloud-webhook-name";
/// Open Messaging's body signature header; an inbound credential, never forwarded.
pub const HUB_SIGNATURE: &str = "x-hub-signature-256";
/// Longest id or name kept (AMQP short strings hold 255 bytes).
const MAX_LEN: usize = 255;

/// Picks the event id: the first usable of the `Idempotency-Key` header, the body's
/// `id`, `eventId`, `metadata.CorrelationId`, `detail.metadata.CorrelationId`.
///
/// A candidate is usable when it is 1-255 bytes of visible ASCII, since it becomes
/// the AMQP `message_id` and an HTTP header value. `None` means: mint a new one.
pub fn event_id(headers: &HeaderMap, body: Option<&Value>) -> Option<String> {
    if let Some(v) = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(usable_id)
    {
        return Some(v);
    }
    let body = body?;
    [
        body.get("id"),
        body.get("eventId"),
        body.get("metadata").and_then(|m| m.get("CorrelationId")),
        body.get("detail")
            .and_then(|d| d.get("metadata"))
            .and_then(|m| m.get("CorrelationId")),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| match v {
        Value::String(s) => usable_id(s),
        Value::Number(n) => usable_id(&n.to_string()),
        _ => None,
    })
}

/// A fresh, time-ordered id for an event that brings none.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn usable_id(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

/// Picks the webhook name: the `{name}` path segment, the Genesys webhook-name
/// header, the body's `detail-type` or `topicName`, else `unknown`.
pub fn webhook_name(path: Option<&str>, headers: &HeaderMap, body: Option<&Value>) -> String {
    let from_body = |key: &str| body.and_then(|b| b.get(key)).and_then(Value::as_str);
    path.and_then(usable_name)
        .or_else(|| {
            headers
                .get(GENESYS_WEBHOOK_NAME)
                .and_then(|v| v.to_str().ok())
                .and_then(usable_name)
        })
        .or_else(|| from_body("detail-type").and_then(usable_name))
        .or_else(|| from_body("topicName").and_then(usable_name))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn usable_name(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    // The common case, already printable and short enough: one copy.
    if s.len() <= MAX_LEN && !s.chars().any(char::is_control) {
        return Some(s.to_owned());
    }
    // Names end up in logs, headers and metric labels: keep them printable and bounded.
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
    let mut end = cleaned.len().min(MAX_LEN);
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    Some(cleaned[..end].to_owned())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others that describe one hop only: never
/// carried from the inbound request, never settable as a static outbound header.
pub const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
    "content-length",
];

/// Inbound headers beyond the hop headers that stay behind.
const NOT_FORWARDED: &[&str] = &[
    // inbound credentials
    "authorization",
    HUB_SIGNATURE,
    // set by the relay itself on every attempt
    IDEMPOTENCY_KEY,
    RELAY_ATTEMPT,
];

/// Parses a `FORWARD_HEADERS` list: comma-separated header names, case-insensitive,
/// blanks ignored. An empty list is refused (it would forward only `content-type`,
/// which is more likely a typo than an intent).
pub fn parse_header_list(list: &str) -> Result<Vec<HeaderName>, String> {
    let mut names: Vec<HeaderName> = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = HeaderName::from_bytes(raw.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("not a valid header name: {raw:?}"))?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err("expected comma-separated header names".into());
    }
    Ok(names)
}

/// The request headers that travel to the downstream, in order, as (name, raw value).
///
/// Drops hop-by-hop headers (including any named by `Connection`), `host`,
/// `content-length`, and the inbound credentials: `authorization`, the configured
/// token header and `x-hub-signature-256`. With an `allow` list (`FORWARD_HEADERS`),
/// only the listed headers and `content-type` are kept of what remains, so headers a
/// downstream might trust (`x-forwarded-for`, `cookie`, API keys) never reach it
/// unless named.
pub fn forwarded_headers(
    headers: &HeaderMap,
    token_header: Option<&HeaderName>,
    allow: Option<&[HeaderName]>,
) -> Vec<(String, Vec<u8>)> {
    let named_by_connection: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !HOP_HEADERS.contains(&n)
                && !NOT_FORWARDED.contains(&n)
                && Some(*name) != token_header
                && !named_by_connection.iter().any(|c| c == n)
                && allow.is_none_or(|list| *name == header::CONTENT_TYPE || list.contains(name))
        })
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn id_precedence() {
        let body = json!({"id": "eb-1", "eventId": "ev-1", "metadata": {"CorrelationId": "c-1"}});
        assert_eq!(
            event_id(&headers(&[("idempotency-key", "k-1")]), Some(&body)).as_deref(),
            Some("k-1")
        );
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("eb-1")
        );
        let body = json!({"eventId": "ev-1", "metadata": {"CorrelationId": "c-1"}});
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("ev-1")
        );
        let body = json!({"metadata": {"CorrelationId": "c-1"}});
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("c-1")
        );
        let body = json!({"detail": {"metadata": {"CorrelationId": "c-2"}}});
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("c-2")
        );
        assert_eq!(event_id(&HeaderMap::new(), Some(&json!({"x": 1}))), None);
        assert_eq!(event_id(&HeaderMap::new(), Some(&json!([1, 2]))), None);
    }

    #[test]
    fn unusable_ids_are_skipped() {
        let body = json!({"id": "has space", "eventId": "ok-2"});
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&body)).as_deref(),
            Some("ok-2")
        );
        let long = "x".repeat(300);
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&json!({ "id": long }))),
            None
        );
        assert_eq!(
            event_id(&HeaderMap::new(), Some(&json!({"id": 42}))).as_deref(),
            Some("42")
        );
    }

    #[test]
    fn new_ids_are_uuid_v7() {
        let id = new_event_id();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    }

    #[test]
    fn name_precedence() {
        let body = json!({"detail-type": "v2.routing.queues.x", "topicName": "t"});
        let h = headers(&[("x-genesys-cloud-webhook-name", "from-header")]);
        assert_eq!(webhook_name(Some("path"), &h, Some(&body)), "path");
        assert_eq!(webhook_name(None, &h, Some(&body)), "from-header");
        assert_eq!(
            webhook_name(None, &HeaderMap::new(), Some(&body)),
            "v2.routing.queues.x"
        );
        assert_eq!(
            webhook_name(None, &HeaderMap::new(), Some(&json!({"topicName": "t"}))),
            "t"
        );
        assert_eq!(webhook_name(None, &HeaderMap::new(), None), "unknown");
    }

    #[test]
    fn forwarding_drops_hop_by_hop_and_credentials() {
        let h = headers(&[
            ("connection", "keep-alive, x-custom-hop"),
            ("keep-alive", "timeout=5"),
            ("x-custom-hop", "1"),
            ("host", "relay:8000"),
            ("content-length", "10"),
            ("content-type", "application/json"),
            ("authorization", "Bearer secret"),
            ("x-api-key", "secret2"),
            ("x-hub-signature-256", "sha256=abc"),
            ("transfer-encoding", "chunked"),
            ("idempotency-key", "k"),
            ("x-genesys-cloud-webhook-name", "n"),
            ("x-trace", "a"),
            ("x-trace", "b"),
        ]);
        let token = HeaderName::from_static("x-api-key");
        let fwd = forwarded_headers(&h, Some(&token), None);
        let names: Vec<&str> = fwd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "content-type",
                "x-genesys-cloud-webhook-name",
                "x-trace",
                "x-trace"
            ]
        );
    }

    #[test]
    fn an_allowlist_keeps_only_listed_headers_and_content_type() {
        let h = headers(&[
            ("content-type", "application/json"),
            ("x-forwarded-for", "10.0.0.1"),
            ("cookie", "session=1"),
            ("x-api-key", "inbound-secret"),
            ("x-request-id", "r-1"),
            ("authorization", "Bearer secret"),
            ("x-hub-signature-256", "sha256=abc"),
            ("idempotency-key", "k"),
            ("connection", "x-request-id"),
        ]);
        let allow = parse_header_list("X-Request-Id, authorization, x-api-key").unwrap();
        let token = HeaderName::from_static("x-api-key");
        let fwd = forwarded_headers(&h, Some(&token), Some(&allow));
        let names: Vec<&str> = fwd.iter().map(|(n, _)| n.as_str()).collect();
        // x-request-id is listed but named by Connection (hop-by-hop); credentials
        // stay behind even when listed.
        assert_eq!(names, ["content-type"]);

        let h = headers(&[("x-request-id", "r-1"), ("x-other", "o")]);
        let fwd = forwarded_headers(&h, None, Some(&allow));
        assert_eq!(fwd, vec![("x-request-id".to_owned(), b"r-1".to_vec())]);
    }

    #[test]
    fn header_lists_parse_case_insensitively() {
        let names = parse_header_list(" X-A ,x-b,,X-a ").unwrap();
        assert_eq!(names, ["x-a", "x-b"]);
        assert!(parse_header_list(" , ").is_err());
        assert!(parse_header_list("x-ok, not ok").is_err());
    }

    proptest! {
        #[test]
        fn the_allowlist_forwards_a_subset_of_listed_headers(
            pairs in proptest::collection::vec(("[a-e]{1,2}", "[a-z0-9]{0,4}"), 0..12),
            listed in proptest::collection::vec("[a-e]{1,2}", 1..4),
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in &pairs {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            let allow: Vec<HeaderName> = listed.iter().map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()).collect();
            let all = forwarded_headers(&h, None, None);
            let some = forwarded_headers(&h, None, Some(&allow));
            // Exactly the unfiltered forwarding, restricted to the listed names.
            let expected: Vec<_> = all.into_iter().filter(|(n, _)| listed.contains(n)).collect();
            prop_assert_eq!(some, expected);
        }

        #[test]
        fn extraction_never_panics_and_ids_are_header_safe(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            key in "\\PC{0,300}",
            name in "\\PC{0,300}",
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&key) { h.insert(IDEMPOTENCY_KEY, v); }
            if let Ok(v) = HeaderValue::from_str(&name) { h.insert(GENESYS_WEBHOOK_NAME, v); }
            let parsed: Option<Value> = serde_json::from_slice(&body).ok();
            if let Some(id) = event_id(&h, parsed.as_ref()) {
                prop_assert!(!id.is_empty() && id.len() <= 255);
                prop_assert!(HeaderValue::from_str(&id).is_ok());
            }
            let n = webhook_name(Some(&name), &h, parsed.as_ref());
            prop_assert!(!n.is_empty() && n.len() <= 255);
            prop_assert!(!n.chars().any(char::is_control));
        }
    }
}
