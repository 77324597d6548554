//! How deliveries reach the downstream (README "What the downstream receives"): HTTPS
//! checked against the platform's trust store, credentials in `DOWNSTREAM_URL` sent as
//! HTTP Basic, and a proxy named by the environment used for the downstream.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::process::RelayProcess;
use crate::common::{TestApp, eventually, unique_prefix};

/// A self-signed certificate for `localhost` (not a CA: rustls refuses a CA
/// certificate as a server's own), and the PEM file a client is told to trust.
struct LocalCert {
    pem: String,
    key_pem: String,
    file: PathBuf,
}

impl LocalCert {
    fn new() -> Self {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("rcgen makes a certificate");
        let file = std::env::temp_dir().join(format!("{}.pem", unique_prefix("down-ca")));
        std::fs::write(&file, made.cert.pem()).unwrap();
        Self {
            pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
            file,
        }
    }
}

impl Drop for LocalCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Posts one event with `id` to a relay process; the answer's status and body.
async fn post_event(relay: &RelayProcess, id: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(relay.url("/webhook/receive"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"id":"{id}"}}"#))
        .send()
        .await
        .expect("the relay answers");
    (
        resp.status().as_u16(),
        resp.json().await.expect("JSON answer"),
    )
}

#[tokio::test]
async fn an_https_downstream_whose_certificate_is_trusted_is_delivered_to() {
    let cert = LocalCert::new();
    let down = Downstream::start_tls(&cert.pem, &cert.key_pem, Reply::Status(200)).await;
    // SSL_CERT_FILE: the platform trust store of the relay's process, as an operator
    // adds a private CA.
    let relay = RelayProcess::start(
        &unique_prefix("https-down"),
        "receiver",
        &[
            ("DOWNSTREAM_URL", &down.https_url()),
            ("SSL_CERT_FILE", cert.file.to_str().unwrap()),
        ],
    )
    .await;

    let (status, json) = post_event(&relay, "ev-tls-trusted").await;
    assert_eq!((status, json["status"].as_str()), (200, Some("delivered")));
    let got = down.for_id("ev-tls-trusted");
    assert_eq!(got.len(), 1, "delivered once, over TLS");
    assert_eq!(got[0].header("x-relay-attempt"), Some("1"));
}

#[tokio::test]
async fn an_https_downstream_with_an_unknown_certificate_is_refused_and_retried_later() {
    let cert = LocalCert::new();
    let down = Downstream::start_tls(&cert.pem, &cert.key_pem, Reply::Status(200)).await;
    // The system's trust store only: a self-signed certificate is not in it.
    let relay = RelayProcess::start(
        &unique_prefix("https-untrusted"),
        "receiver",
        &[("DOWNSTREAM_URL", &down.https_url())],
    )
    .await;

    let (status, json) = post_event(&relay, "ev-tls-untrusted").await;
    assert_eq!(
        (status, json["status"].as_str()),
        (202, Some("queued_for_retry")),
        "{json}"
    );
    assert_eq!(
        down.count(),
        0,
        "no request crossed an unverified connection"
    );
    eventually(
        Duration::from_secs(5),
        "the failed attempt is logged with the certificate error",
        || {
            let logged = relay.lines().iter().any(|l| {
                l.contains("ev-tls-untrusted")
                    && l.contains("connection failed")
                    && l.contains("certificate")
            });
            async move { logged }
        },
    )
    .await;
}

#[tokio::test]
async fn credentials_in_the_downstream_url_are_sent_as_basic_auth_and_never_in_the_target() {
    let down = Downstream::start(Reply::Status(200)).await;
    // Percent-encoded in the URL, decoded on the wire, as the URL standard has it.
    let url = format!("http://relay%2Fuser:p%40ss%3Aword@{}/hook?k=v", down.addr);
    let app = TestApp::spawn(Role::Receiver, &[("DOWNSTREAM_URL", &url)]).await;

    let resp = app
        .post("/webhook/receive", r#"{"id":"ev-basic"}"#, &[])
        .await;
    assert_eq!(resp.status(), 200);
    let got = down.for_id("ev-basic");
    assert_eq!(got.len(), 1);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("relay/user:p@ss:word")
    );
    assert_eq!(got[0].header("authorization"), Some(expected.as_str()));
    assert_eq!(got[0].uri.to_string(), "/hook?k=v");
    assert_eq!(
        got[0].header("host"),
        Some(down.addr.to_string().as_str()),
        "no credentials in Host"
    );
}

#[tokio::test]
async fn a_proxy_named_by_the_environment_carries_the_deliveries() {
    // The mock stands in for the proxy: a plain-HTTP proxy gets the whole URL as the
    // request target. The downstream's name does not resolve, so only the proxy can
    // have delivered it.
    let proxy = Downstream::start(Reply::Status(200)).await;
    let relay = RelayProcess::start(
        &unique_prefix("proxied"),
        "receiver",
        &[
            ("DOWNSTREAM_URL", "http://downstream.invalid/hook"),
            ("HTTP_PROXY", &format!("http://{}", proxy.addr)),
        ],
    )
    .await;

    let (status, json) = post_event(&relay, "ev-proxied").await;
    assert_eq!((status, json["status"].as_str()), (200, Some("delivered")));
    let got = proxy.for_id("ev-proxied");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri.to_string(), "http://downstream.invalid/hook");
    assert!(
        relay
            .lines()
            .iter()
            .any(|l| l.contains("through the proxy")),
        "the start-up log says deliveries go through a proxy"
    );
}
