//! Inbound authentication (SPEC §4.4) end to end: the right credentials pass; wrong or
//! missing ones get one and the same 401, and nothing is published or forwarded; the
//! credentials never travel on.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};
use webhook_relay::app::Role;
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{Inspector, TestApp};

const TOKEN: &str = "tok-7Qm2vX9pL4";
const BASIC: &str = "genesys-eb:p@ss:w0rd";
const HMAC_KEY: &str = "om-secret-3f9a61";

/// HMAC-SHA256 (RFC 2104) written out on SHA-256 alone, independent of the `hmac`
/// crate the relay uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// `X-Hub-Signature-256` as Genesys Open Messaging sends it.
pub fn hub_signature(key: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        BASE64.encode(hmac_sha256(key.as_bytes(), body))
    )
}

fn basic(userpass: &str) -> String {
    format!("Basic {}", BASE64.encode(userpass))
}

type Headers = Vec<(&'static str, String)>;

/// Posts `body` with `headers`; returns status and JSON answer.
async fn post(app: &TestApp, body: &str, headers: &Headers) -> (u16, serde_json::Value) {
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = app.post("/webhooks/auth-test", body, &pairs).await;
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Runs refusals then one acceptance against a queue-first receiver (nothing consumes,
/// so any publish would stay in P.work), and checks what was stored.
async fn check_mode(
    vars: &[(&str, &str)],
    body: &str,
    refused: Vec<(&str, Headers)>,
    accepted: Headers,
) {
    let mut all = vars.to_vec();
    all.push(("INLINE_DELIVERY", "false"));
    let app = TestApp::spawn(Role::Receiver, &all).await;
    let inspect = Inspector::connect().await;
    let work = app.topology().work.clone();

    let mut errors = std::collections::BTreeSet::new();
    for (what, headers) in &refused {
        let (status, json) = post(&app, body, headers).await;
        assert_eq!(status, 401, "{what} must be refused");
        assert_eq!(json["status"], "error");
        assert!(json["id"].as_str().is_some_and(|s| !s.is_empty()));
        errors.insert(json["error"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        errors.into_iter().collect::<Vec<_>>(),
        ["authentication failed"],
        "one answer for every failure: it never says which part was wrong"
    );
    assert_eq!(
        inspect.total(app.topology()).await,
        0,
        "a refused request publishes nothing"
    );

    let (status, json) = post(&app, body, &accepted).await;
    assert_eq!((status, json["status"].as_str()), (202, Some("queued")));
    let msgs = inspect.drain(&work).await;
    assert_eq!(msgs.len(), 1);
    let e = Envelope::from_amqp(&msgs[0].delivery.properties, msgs[0].delivery.data.clone());
    assert_eq!(e.body.as_ref(), body.as_bytes());
    let stored: Vec<&str> = e.headers.iter().map(|(k, _)| k.as_str()).collect();
    for credential in ["authorization", "x-api-key", "x-hub-signature-256"] {
        assert!(
            !stored.contains(&credential),
            "{credential} stored for forwarding: {stored:?}"
        );
    }
    let values: Vec<String> = e
        .headers
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(
        values
            .iter()
            .all(|v| !v.contains(TOKEN) && !v.contains("p@ss")),
        "no credential value stored: {values:?}"
    );
    assert!(
        stored.contains(&"x-kept"),
        "ordinary headers still travel: {stored:?}"
    );
    inspect.close().await;
}

#[test]
fn the_test_hmac_matches_rfc_4231() {
    // RFC 4231 test case 2.
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn bearer_token() {
    let kept = ("x-kept", "1".to_owned());
    check_mode(
        &[("INBOUND_TOKEN", TOKEN)],
        r#"{"id":"auth-bearer"}"#,
        vec![
            ("no credentials", vec![kept.clone()]),
            (
                "wrong token",
                vec![("authorization", "Bearer tok-wrong".into())],
            ),
            (
                "token with a suffix",
                vec![("authorization", format!("Bearer {TOKEN}x"))],
            ),
            (
                "token prefix only",
                vec![("authorization", format!("Bearer {}", &TOKEN[..6]))],
            ),
            (
                "right token as Basic",
                vec![("authorization", format!("Basic {TOKEN}"))],
            ),
            (
                "right token in another header",
                vec![("x-api-key", TOKEN.into())],
            ),
        ],
        vec![("authorization", format!("Bearer {TOKEN}")), kept],
    )
    .await;
}

#[tokio::test]
async fn token_in_a_custom_header() {
    let kept = ("x-kept", "1".to_owned());
    check_mode(
        &[
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_TOKEN_HEADER", "X-Api-Key"),
        ],
        r#"{"id":"auth-header"}"#,
        vec![
            ("no credentials", vec![]),
            (
                "right token as bearer",
                vec![("authorization", format!("Bearer {TOKEN}"))],
            ),
            (
                "wrong token in the header",
                vec![("x-api-key", "nope".into())],
            ),
            ("empty header", vec![("x-api-key", String::new())]),
        ],
        vec![("x-api-key", TOKEN.into()), kept],
    )
    .await;
}

#[tokio::test]
async fn basic_credentials() {
    let kept = ("x-kept", "1".to_owned());
    check_mode(
        &[("INBOUND_BASIC_AUTH", BASIC)],
        r#"{"id":"auth-basic"}"#,
        vec![
            ("no credentials", vec![]),
            (
                "wrong password",
                vec![("authorization", basic("genesys-eb:p@ss:w0rX"))],
            ),
            (
                "wrong user",
                vec![("authorization", basic("genesys:p@ss:w0rd"))],
            ),
            ("password only", vec![("authorization", basic("p@ss:w0rd"))]),
            (
                "not base64",
                vec![("authorization", format!("Basic {BASIC}"))],
            ),
            (
                "as bearer",
                vec![("authorization", format!("Bearer {}", BASE64.encode(BASIC)))],
            ),
        ],
        vec![("authorization", basic(BASIC)), kept],
    )
    .await;
}

#[tokio::test]
async fn hmac_signature_computed_independently() {
    let body = r#"{"id":"om-1","text":"caf\u00e9 \u2014 ok"}"#;
    let kept = ("x-kept", "1".to_owned());
    let right = hub_signature(HMAC_KEY, body.as_bytes());
    let hex: String = hmac_sha256(HMAC_KEY.as_bytes(), body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    check_mode(
        &[("INBOUND_HMAC_SECRET", HMAC_KEY)],
        body,
        vec![
            ("no signature", vec![kept.clone()]),
            (
                "signed with another key",
                vec![(
                    "x-hub-signature-256",
                    hub_signature("other", body.as_bytes()),
                )],
            ),
            (
                "signature of another body",
                vec![(
                    "x-hub-signature-256",
                    hub_signature(HMAC_KEY, b"{\"id\":\"om-1\"}"),
                )],
            ),
            (
                "hex instead of base64",
                vec![("x-hub-signature-256", format!("sha256={hex}"))],
            ),
            (
                "no sha256= prefix",
                vec![(
                    "x-hub-signature-256",
                    right.trim_start_matches("sha256=").to_owned(),
                )],
            ),
            (
                "signature in another header",
                vec![("x-signature", right.clone())],
            ),
        ],
        vec![("x-hub-signature-256", right.clone()), kept],
    )
    .await;
}

#[tokio::test]
async fn all_configured_checks_must_pass() {
    let body = r#"{"id":"auth-all"}"#;
    let token = ("x-api-key", TOKEN.to_owned());
    let basic_ok = ("authorization", basic(BASIC));
    let sig = (
        "x-hub-signature-256",
        hub_signature(HMAC_KEY, body.as_bytes()),
    );
    let kept = ("x-kept", "1".to_owned());
    check_mode(
        &[
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_TOKEN_HEADER", "x-api-key"),
            ("INBOUND_BASIC_AUTH", BASIC),
            ("INBOUND_HMAC_SECRET", HMAC_KEY),
        ],
        body,
        vec![
            ("token missing", vec![basic_ok.clone(), sig.clone()]),
            ("basic missing", vec![token.clone(), sig.clone()]),
            ("signature missing", vec![token.clone(), basic_ok.clone()]),
            ("only the token", vec![token.clone()]),
        ],
        vec![token, basic_ok, sig, kept],
    )
    .await;
}

#[tokio::test]
async fn credentials_never_reach_the_downstream_and_refusals_forward_nothing() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_TOKEN_HEADER", "x-api-key"),
            ("INBOUND_BASIC_AUTH", BASIC),
            ("INBOUND_HMAC_SECRET", HMAC_KEY),
        ],
    )
    .await;
    let body = r#"{"id":"auth-inline"}"#;
    let good: Headers = vec![
        ("x-api-key", TOKEN.into()),
        ("authorization", basic(BASIC)),
        (
            "x-hub-signature-256",
            hub_signature(HMAC_KEY, body.as_bytes()),
        ),
        ("x-kept", "1".into()),
    ];
    let mut bad = good.clone();
    bad[2].1 = hub_signature("wrong", body.as_bytes());
    let (status, _) = post(&app, body, &bad).await;
    assert_eq!(status, 401);
    assert_eq!(down.count(), 0, "a refused request is not attempted inline");

    let (status, json) = post(&app, body, &good).await;
    assert_eq!((status, json["status"].as_str()), (200, Some("delivered")));
    let got = down.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.header("x-kept"), Some("1"));
    for credential in ["authorization", "x-api-key", "x-hub-signature-256"] {
        assert_eq!(r.header(credential), None, "{credential} forwarded");
    }
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0);
    inspect.close().await;
}

#[tokio::test]
async fn a_bearer_token_with_basic_credentials_is_refused_at_start_up() {
    let prefix = crate::common::unique_prefix("auth-combo");
    let ran = crate::common::process::run_cli(
        &prefix,
        &["receiver"],
        &[
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_BASIC_AUTH", BASIC),
            ("INLINE_DELIVERY", "false"),
            ("LISTEN_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    // Both would need the one Authorization header: no request could ever pass.
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    for var in [
        "INBOUND_TOKEN_HEADER",
        "INBOUND_TOKEN",
        "INBOUND_BASIC_AUTH",
    ] {
        assert!(ran.stderr.contains(var), "names {var}: {}", ran.stderr);
    }
    assert!(!ran.stderr.contains(TOKEN), "never prints the secret");
}

#[tokio::test]
async fn secrets_of_any_length_are_refused_alike() {
    // Presented tokens shorter, longer, equal in length but different, and a prefix:
    // all the same 401 (the comparison itself is of fixed-size digests, unit-tested).
    let lengths = [
        String::new(),
        "t".into(),
        TOKEN[..TOKEN.len() - 1].to_owned(),
        format!("{TOKEN}x"),
        "x".repeat(TOKEN.len()),
        "y".repeat(4096),
    ];
    check_mode(
        &[
            ("INBOUND_TOKEN", TOKEN),
            ("INBOUND_TOKEN_HEADER", "x-api-key"),
        ],
        r#"{"id":"auth-lengths"}"#,
        lengths
            .iter()
            .map(|t| {
                (
                    "a token of another length or value",
                    vec![("x-api-key", t.clone())],
                )
            })
            .collect(),
        vec![("x-api-key", TOKEN.to_owned()), ("x-kept", "1".to_owned())],
    )
    .await;
}
