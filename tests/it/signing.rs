//! Outbound signing and static headers: every delivery, inline or from a worker,
//! carries `DOWNSTREAM_HEADERS` and a Standard Webhooks signature that the reference
//! `standardwebhooks` library verifies.

use std::time::Duration;

use standardwebhooks::Webhook;
use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{TestApp, eventually};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn every_attempt_is_signed_and_carries_the_static_headers() {
    let down = Downstream::start(Reply::Status(200)).await;
    down.script([Reply::Status(503)]);
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("DOWNSTREAM_SIGNING_SECRET", SECRET),
            (
                "DOWNSTREAM_HEADERS",
                r#"{"X-Api-Key":"downstream-key-1","X-Tenant":"acme"}"#,
            ),
        ],
    )
    .await;
    let body = r#"{"id":"signed-1","eventBody":{"note":"caf\u00e9 ë"}}"#;
    // The sender's own x-api-key is replaced by the configured one.
    let resp = app
        .post(
            "/webhook/receive",
            body,
            &[("x-api-key", "sender-value"), ("x-trace", "t-1")],
        )
        .await;
    assert_eq!(
        resp.status(),
        202,
        "inline attempt got 503: queued for retry"
    );
    eventually(Duration::from_secs(10), "the worker's attempt", || async {
        down.for_id("signed-1").len() == 2
    })
    .await;

    let verifier = Webhook::new(SECRET).unwrap();
    let other = Webhook::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    for (n, r) in down.for_id("signed-1").iter().enumerate() {
        let attempt = (n + 1).to_string();
        assert_eq!(r.header("x-relay-attempt"), Some(attempt.as_str()));
        assert_eq!(
            r.header("webhook-id"),
            Some("signed-1"),
            "the event id, stable across attempts"
        );
        assert!(r.header("webhook-signature").unwrap().starts_with("v1,"));
        verifier
            .verify(&r.body, &r.headers)
            .unwrap_or_else(|e| panic!("attempt {attempt} does not verify: {e:?}"));
        // The verification is real: another key, or another body, fails.
        assert!(other.verify(&r.body, &r.headers).is_err());
        let mut tampered = r.body.to_vec();
        tampered[2] ^= 1;
        assert!(verifier.verify(&tampered, &r.headers).is_err());

        assert_eq!(r.header("x-api-key"), Some("downstream-key-1"));
        assert_eq!(r.headers.get_all("x-api-key").iter().count(), 1);
        assert_eq!(r.header("x-tenant"), Some("acme"));
        assert_eq!(
            r.header("x-trace"),
            Some("t-1"),
            "forwarded headers still travel"
        );
        assert_eq!(r.body.as_ref(), body.as_bytes());
    }
}

#[tokio::test]
async fn without_a_secret_nothing_is_signed() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let resp = app
        .post("/webhook/receive", r#"{"id":"plain-1"}"#, &[])
        .await;
    assert_eq!(resp.status(), 200);
    let got = down.for_id("plain-1");
    assert_eq!(got.len(), 1);
    for h in [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-tenant",
    ] {
        assert_eq!(got[0].header(h), None, "{h}");
    }
}
