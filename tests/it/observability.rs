//! `observability/`: the alert rules pass `promtool check rules` and their unit tests,
//! the Prometheus configuration passes `promtool check config`, and every relay metric
//! the dashboard and the rules name is on a real `/metrics` scrape of the relay. (The
//! broker's metrics they name are checked against the compose broker's scrape by
//! scripts/compose-test.sh.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::downstream::{Downstream, Reply};
use crate::common::process::RelayProcess;
use crate::common::unique_prefix;

fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn repo_file(path: &str) -> String {
    let full = repo_path(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// Runs promtool (Debian's `prometheus` package) in `dir`; panics with its output
/// when it fails or is not installed.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool is needed (Debian: apt-get install prometheus): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(
        "observability/grafana/dashboards/webhook-relay.json",
    ))
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut exprs = Vec::new();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "panel {} uses the provisioned datasource",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("an expr").to_owned());
        }
    }
    exprs
}

/// Every `prefix...` metric name in `text` (a name runs over `[a-z0-9_]`).
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo_path("observability");
    let checked = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 4 rules found"), "{checked}");
    let tested = promtool(&dir, &["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    for alert in [
        "WebhookRelayDlqGrowing",
        "WebhookRelayBrokerDown",
        "WebhookRelayBacklogGrowing",
        "WebhookRelayNoDeliveries",
    ] {
        assert!(
            repo_file("observability/alerts.test.yml").contains(&format!("alertname: {alert}")),
            "{alert} has a unit test"
        );
    }

    // The configuration as compose mounts it, with the rule file where it lies here.
    let tmp = std::env::temp_dir().join(unique_prefix("promconfig"));
    std::fs::create_dir_all(&tmp).unwrap();
    let config = repo_file("observability/prometheus.yml").replace(
        "/etc/prometheus/alerts.yml",
        repo_path("observability/alerts.yml").to_str().unwrap(),
    );
    std::fs::write(tmp.join("prometheus.yml"), config).unwrap();
    let checked = promtool(&tmp, &["check", "config", "prometheus.yml"]);
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(checked.contains("SUCCESS"), "{checked}");
}

#[test]
fn the_dashboard_shows_what_an_operator_needs() {
    let exprs = dashboard_exprs().join("\n");
    for needed in [
        "rate(webhook_relay_events_received_total",
        "rate(webhook_relay_delivery_attempts_total{result=\"delivered\"}",
        "rate(webhook_relay_retries_scheduled_total",
        "rate(webhook_relay_dead_lettered_total",
        "webhook_relay_delivery_duration_seconds_bucket",
        "sum by (kind) (max by (queue, kind) (webhook_relay_queue_depth",
        "webhook_relay_broker_up",
    ] {
        assert!(exprs.contains(needed), "the dashboard shows {needed}");
    }
}

#[tokio::test]
async fn every_relay_metric_the_dashboard_and_rules_name_is_on_a_real_scrape() {
    let named: BTreeSet<String> = dashboard_exprs()
        .iter()
        .map(String::as_str)
        .chain([repo_file("observability/alerts.yml").as_str()])
        .flat_map(|text| names_with_prefix(text, "webhook_relay_"))
        .collect();
    assert!(named.len() >= 8, "{named:?}");

    let down = Downstream::start(Reply::Status(200)).await;
    let prefix = unique_prefix("observability");
    let relay = RelayProcess::start(
        &prefix,
        "serve",
        &[("DOWNSTREAM_URL", &down.url()), ("ADMIN_TOKEN", "observe")],
    )
    .await;
    let http = reqwest::Client::new();
    // Nothing has happened yet: every family must be there from the start. Only the
    // queue depths wait for the broker's first answer (polled, with a deadline).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = http
            .get(relay.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let scraped: BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = named
            .iter()
            .filter(|n| !scraped.contains(n.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "named in observability/ but not on the relay's scrape: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
