//! Property tests over the whole request path: arbitrary bodies, headers, names and
//! credentials through the receiver (its router, then raw bytes through the real
//! server) never panic, always get one of the SPEC §4.2 answers, and exactly the
//! accepted events are published.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::Value;
use tower::ServiceExt;
use webhook_relay::app::Role;
use webhook_relay::event;
use webhook_relay::relay::Relay;

use crate::auth::hub_signature;
use crate::common::raw_http::{Feed, exchange};
use crate::common::{Inspector, TestApp, config, delete_topology_blocking, unique_prefix};

const MAX_BODY: usize = 2048;
const TOKEN: &str = "prop-token-c41d";
const BASIC: &str = "eb:prop-pass";
const HMAC_KEY: &str = "prop-hmac-90ab";

/// One credential as presented.
#[derive(Debug, Clone)]
enum Cred {
    Right,
    Wrong(String),
    Missing,
}

impl Cred {
    fn ok(&self) -> bool {
        matches!(self, Self::Right)
    }
}

fn cred() -> impl Strategy<Value = Cred> {
    prop_oneof![
        6 => Just(Cred::Right),
        1 => "[ -~]{0,24}".prop_map(Cred::Wrong),
        1 => Just(Cred::Missing),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    token: Cred,
    basic: Cred,
    hmac: Cred,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id".to_owned()),
        Just("eventId".to_owned()),
        Just("detail-type".to_owned()),
        Just("topicName".to_owned()),
        Just("metadata".to_owned()),
        Just("CorrelationId".to_owned()),
        Just("detail".to_owned()),
        "\\PC{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,24}".prop_map(Value::from),
        "[!-~]{1,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 5, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..300),
        4 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => (55usize..75).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => "[ \t\r\n]{0,8}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), MAX_BODY - 8..MAX_BODY + 400),
        1 => (MAX_BODY - 40..MAX_BODY + 40)
            .prop_map(|n| format!(r#"{{"id":"big","pad":"{}"}}"#, "p".repeat(n)).into_bytes()),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        Just("content-type".to_owned()),
        Just("idempotency-key".to_owned()),
        Just("x-genesys-cloud-webhook-name".to_owned()),
        Just("connection".to_owned()),
        Just("keep-alive".to_owned()),
        Just("expect".to_owned()),
        Just("content-length".to_owned()),
        "x-[a-z0-9-]{1,16}",
    ];
    let value = prop_oneof![
        "[ -~]{0,40}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec((name, value), 0..8)
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/webhook/receive".to_owned()),
        "[A-Za-z0-9._~-]{1,30}".prop_map(|n| format!("/webhooks/{n}")),
        "(%[0-9A-Fa-f]{2}){1,6}".prop_map(|n| format!("/webhooks/{n}")),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (cred(), cred(), cred(), path(), headers(), body()).prop_map(
        |(token, basic, hmac, path, headers, body)| Case {
            token,
            basic,
            hmac,
            path,
            headers,
            body,
        },
    )
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The request headers of `case`, credentials last; invalid generated pairs dropped
/// (the HTTP layer would refuse them before the router sees them).
fn header_map(case: &Case) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in &case.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(k, v);
        }
    }
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    match &case.token {
        Cred::Right => set("x-relay-token", TOKEN.into()),
        Cred::Wrong(t) => set("x-relay-token", format!("{t}~")),
        Cred::Missing => {}
    }
    match &case.basic {
        Cred::Right => set("authorization", format!("Basic {}", BASE64.encode(BASIC))),
        Cred::Wrong(up) => set(
            "authorization",
            format!("Basic {}", BASE64.encode(format!("{up}~"))),
        ),
        Cred::Missing => {}
    }
    match &case.hmac {
        Cred::Right => set("x-hub-signature-256", hub_signature(HMAC_KEY, &case.body)),
        Cred::Wrong(k) => set(
            "x-hub-signature-256",
            hub_signature(&format!("{k}~"), &case.body),
        ),
        Cred::Missing => {}
    }
    h
}

/// What SPEC §4.2 says the answer must be, worked out without the relay's code:
/// `serde_json` decides what JSON is, a recursive walk measures the depth.
fn expected_status(case: &Case, headers: &HeaderMap) -> (u16, Option<Value>) {
    if !case.token.ok() || !case.basic.ok() {
        return (401, None);
    }
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if case.body.len() > MAX_BODY || declared.is_some_and(|n| n > MAX_BODY as u64) {
        return (413, None);
    }
    if !case.hmac.ok() {
        return (401, None);
    }
    match std::str::from_utf8(&case.body)
        .ok()
        .map(serde_json::from_str::<Value>)
    {
        Some(Ok(v)) if depth(&v) <= 64 => (202, Some(v)),
        _ => (400, None),
    }
}

#[test]
fn the_router_answers_every_request_as_the_spec_says() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let max_body = MAX_BODY.to_string();
    let cfg = config(
        &unique_prefix("prop-router"),
        &[
            ("INLINE_DELIVERY", "false"),
            ("MAX_BODY_BYTES", &max_body),
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_TOKEN_HEADER", "x-relay-token"),
            ("INBOUND_BASIC_AUTH", BASIC),
            ("INBOUND_HMAC_SECRET", HMAC_KEY),
        ],
    );
    let relay = rt.block_on(async {
        let relay = Arc::new(Relay::new(cfg, None));
        assert!(relay.broker.wait_ready(Duration::from_secs(15)).await);
        relay
    });
    let topology = relay.topology().clone();
    let router = webhook_relay::http::receiver_router(relay.clone());
    let published = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 160,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&case(), |case| {
        let headers = header_map(&case);
        let (want, full) = expected_status(&case, &headers);
        let mut req = Request::post(case.path.as_str())
            .body(Body::from(case.body.clone()))
            .unwrap();
        *req.headers_mut() = headers.clone();
        let (status, answer) = rt.block_on(async {
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&bytes))
        });
        let answer = answer.map_err(|e| TestCaseError::fail(format!("answer is not JSON: {e}")))?;
        prop_assert_eq!(status, want, "answer {}", answer);
        let id = answer["id"].as_str().unwrap_or_default();
        prop_assert!(
            !id.is_empty() && HeaderValue::from_str(id).is_ok(),
            "id {:?}",
            id
        );
        if status == 202 {
            published.set(published.get() + 1);
            prop_assert_eq!(&answer["status"], "queued");
            match event::event_id(&headers, full.as_ref()) {
                Some(expected) => prop_assert_eq!(id, expected),
                None => prop_assert_eq!(uuid_version(id), Some(7)),
            }
        } else {
            prop_assert_eq!(&answer["status"], "error");
        }
        Ok(())
    });
    let stored = rt.block_on(async {
        let inspect = Inspector::connect().await;
        let n = inspect.count(&topology.work).await;
        inspect.close().await;
        relay.broker.close().await;
        n
    });
    delete_topology_blocking(topology);
    result.unwrap();
    let published = published.get();
    assert!(
        published > 10,
        "the generator reaches the accepting path ({published} accepted)"
    );
    assert_eq!(
        stored, published,
        "exactly the accepted events were published"
    );
}

fn uuid_version(id: &str) -> Option<usize> {
    uuid::Uuid::parse_str(id).ok().map(|u| u.get_version_num())
}

/// A request line, headers and body as raw bytes, well-formed or not.
fn raw_request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        4 => Just(b"POST".to_vec()),
        1 => Just(b"GET".to_vec()),
        1 => "[A-Z]{1,8}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..8),
    ];
    let target = prop_oneof![
        4 => Just(b"/webhook/receive".to_vec()),
        2 => "/webhooks/[a-z0-9%]{0,12}".prop_map(String::into_bytes),
        1 => Just(b"/healthz".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ];
    let version = prop_oneof![
        6 => Just(b"HTTP/1.1".to_vec()),
        1 => Just(b"HTTP/1.0".to_vec()),
        1 => "[ -~]{0,9}".prop_map(String::into_bytes),
    ];
    let header = prop_oneof![
        4 => ("[a-zA-Z0-9-]{1,20}", "[ -~]{0,40}").prop_map(|(k, v)| format!("{k}: {v}").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ];
    let body = prop_oneof![
        json_value().prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ];
    let length = prop_oneof![
        Just(None),
        Just(Some(None)),
        (0usize..400).prop_map(|n| Some(Some(n)))
    ];
    (
        method,
        target,
        version,
        proptest::collection::vec(header, 0..10),
        length,
        body,
    )
        .prop_map(|(method, target, version, headers, length, body)| {
            let mut out = method;
            out.push(b' ');
            out.extend(target);
            out.push(b' ');
            out.extend(version);
            out.extend_from_slice(b"\r\nhost: relay\r\n");
            for h in headers {
                out.extend(h);
                out.extend_from_slice(b"\r\n");
            }
            match length {
                None => {}
                Some(None) => {
                    out.extend(format!("content-length: {}\r\n", body.len()).into_bytes())
                }
                Some(Some(n)) => out.extend(format!("content-length: {n}\r\n").into_bytes()),
            }
            out.extend_from_slice(b"\r\n");
            out.extend(body);
            out
        })
}

/// What the server may answer to arbitrary bytes: the SPEC §4.2 answers, the routing
/// answers (404, 405), and the server limits (408 slow body, 414/431 too large a head).
const ALLOWED: &[u16] = &[200, 202, 400, 401, 404, 405, 408, 413, 414, 431, 503];

#[test]
fn arbitrary_bytes_over_tcp_get_an_allowed_answer_or_a_close() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("REQUEST_TIMEOUT_MS", "300")],
    ));
    let addr = app.addr;
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&raw_request(), |bytes| {
        let x = rt.block_on(exchange(
            addr,
            bytes,
            Feed::Nothing,
            Duration::from_secs(10),
        ));
        if let Some(r) = &x.response {
            prop_assert!(
                ALLOWED.contains(&r.status),
                "status {} to this request",
                r.status
            );
        }
        Ok(())
    });
    let healthy = rt.block_on(async {
        let r = app.http.get(app.url("/healthz")).send().await.unwrap();
        let ok = r.status() == 200;
        let r = app
            .post("/webhook/receive", r#"{"id":"after-fuzz"}"#, &[])
            .await;
        ok && r.status() == 202
    });
    drop(app);
    result.unwrap();
    assert!(healthy, "still serving after the fuzzing");
}
