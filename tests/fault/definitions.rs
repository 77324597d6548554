//! The compose broker boots from `rabbitmq/definitions.json`. A blank node that
//! imports it (and so creates no default user of its own) must let the relay log in,
//! hold every queue before the relay starts, and accept the relay's own declarations,
//! which fail with PRECONDITION_FAILED if any argument differs.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::downstream::{Downstream, Reply};
use crate::support::{Node, Relay, serial};

/// `webhook-relay <args>` with the relay's defaults (the compose topology) on `amqp_url`.
fn relay_tool(amqp_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_webhook-relay"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url)
        .env("RUST_LOG", "off")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_node_booted_from_the_checked_in_definitions_serves_the_relay() {
    let _serial = serial().await;
    let definitions = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("rabbitmq/definitions.json"),
    )
    .unwrap();
    let node = Node::start_with_definitions(&definitions);
    let url = node.amqp_url();

    // The imported password hash is what the broker checks.
    let wrong = relay_tool(
        &url.replace("guest:guest", "guest:not-guest"),
        &["topology", "status"],
    );
    assert!(!wrong.status.success(), "a wrong password is refused");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("ACCESS_REFUSED"));

    // Every queue exists before any relay ran.
    let status = relay_tool(&url, &["topology", "status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 14, "{table}");
    assert!(rows.iter().all(|r| r[2] == "0"), "{table}");

    // The relay's declarations match what was imported.
    let declared = relay_tool(&url, &["topology", "declare"]);
    assert!(
        declared.status.success(),
        "{}",
        String::from_utf8_lossy(&declared.stderr)
    );

    // And the relay runs on it: a refused event lands in the imported DLQ.
    let down = Downstream::start(Reply::Status(404)).await;
    let mut relay = Relay::spawn(
        "serve",
        &[("AMQP_URL", url.as_str()), ("DOWNSTREAM_URL", &down.url())],
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    let answer: serde_json::Value = http
        .post(relay.url("/webhook/receive"))
        .header("content-type", "application/json")
        .body(r#"{"id":"imported-1"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "dead_lettered", "{answer}");
    let status = relay_tool(&url, &["topology", "status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    let dlq: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("dlq"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(dlq, ["dlq", "webhooks.dlq", "1", "0"], "{table}");
}
