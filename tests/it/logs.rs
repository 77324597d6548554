//! Logs (SPEC §7): with `LOG_FORMAT=json` every line is a JSON object, lines about an
//! event carry its id and webhook name, and configured secrets never appear.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::common::downstream::{Downstream, Reply};
use crate::common::eventually;
use crate::common::process::{RelayProcess, run_cli};
use crate::common::seed::{dead, seed_dlq};

const INBOUND_TOKEN: &str = "inb0und-T0KEN-value";
const BASIC: &str = "genesys:b4sic-PASSWORD";
const HMAC_SECRET: &str = "hm4c-SECRET-key";
const ADMIN_TOKEN: &str = "adm1n-TOKEN-value";

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", BASE64.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn json_lines_carry_the_event_and_never_a_secret() {
    let down = Downstream::start(Reply::Status(200)).await;
    down.script([Reply::Status(503)]);
    let prefix = crate::common::unique_prefix("logs");
    let mut relay = RelayProcess::start(
        &prefix,
        "serve",
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INBOUND_TOKEN", INBOUND_TOKEN),
            ("INBOUND_TOKEN_HEADER", "x-api-key"),
            ("INBOUND_BASIC_AUTH", BASIC),
            ("INBOUND_HMAC_SECRET", HMAC_SECRET),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            // Everything the relay and its libraries log.
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let basic = format!("Basic {}", BASE64.encode(BASIC));
    let body = r#"{"id":"log-ev-1","detail-type":"v2.conversations"}"#;

    // Accepted: the first attempt fails (503), the retry delivers.
    let resp = http
        .post(relay.url("/webhook/receive"))
        .header("content-type", "application/json")
        .header("x-api-key", INBOUND_TOKEN)
        .header("authorization", &basic)
        .header("x-hub-signature-256", sign(body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    eventually(Duration::from_secs(10), "the retry delivered", || async {
        down.for_id("log-ev-1").len() == 2
    })
    .await;

    // Refused: wrong credentials, each secret half right.
    for (key, auth) in [
        (INBOUND_TOKEN, "Basic d3Jvbmc6d3Jvbmc="),
        ("wrong", basic.as_str()),
    ] {
        let resp = http
            .post(relay.url("/webhook/receive"))
            .header("content-type", "application/json")
            .header("x-api-key", key)
            .header("authorization", auth)
            .header("x-hub-signature-256", sign(body))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    // The admin API, with the wrong token and the right one.
    for token in ["not-the-token", ADMIN_TOKEN] {
        http.get(relay.url("/admin/dlq"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
    }
    // A replay from the DLQ (its log lines are about events too).
    seed_dlq(
        &relay.topology(),
        &[dead(
            "log-ev-2",
            Some(500),
            "attempts_exhausted",
            Duration::from_secs(60),
        )],
    )
    .await;
    let ran = run_cli(
        &prefix,
        &["dlq", "replay", "--all"],
        &[
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "debug"),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    eventually(Duration::from_secs(10), "the replay delivered", || async {
        down.for_id("log-ev-2").len() == 1
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the admin refusal logged",
        || async {
            relay
                .lines()
                .iter()
                .any(|l| l.contains("admin request refused"))
        },
    )
    .await;
    relay.kill();

    let mut lines = relay.lines();
    lines.extend(ran.stderr.lines().map(str::to_owned));
    assert!(
        lines.len() > 20,
        "trace logging produced lines: {}",
        lines.len()
    );
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();

    // Lines about an event carry its id and webhook in the `event` span.
    let about = |id: &str, message: &str| {
        parsed
            .iter()
            .find(|v| v["message"] == message && v["span"]["event_id"] == id)
            .unwrap_or_else(|| panic!("no {message:?} line for {id}"))
            .clone()
    };
    let retry = about("log-ev-1", "attempt failed; scheduled for retry");
    assert_eq!(retry["span"]["webhook"], "v2.conversations");
    assert_eq!(retry["level"], "INFO");
    assert_eq!(retry["status"], 503);
    let replayed = about("log-ev-2", "replayed from the DLQ to the work queue");
    assert_eq!(replayed["span"]["webhook"], "orders");
    for v in &parsed {
        if v["span"]["name"] == "event" {
            assert!(
                v["span"]["event_id"].is_string() && v["span"]["webhook"].is_string(),
                "{v}"
            );
        }
    }

    // No secret, and no credential header value, in any line.
    let all = lines.join("\n");
    let basic_b64 = BASE64.encode(BASIC);
    for secret in [
        INBOUND_TOKEN,
        BASIC,
        "b4sic-PASSWORD",
        basic_b64.as_str(),
        HMAC_SECRET,
        ADMIN_TOKEN,
    ] {
        assert!(!all.contains(secret), "{secret:?} appears in the logs");
    }
}
