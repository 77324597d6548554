//! The compose deployment stays in step with the code: the broker's definitions equal
//! `topology export` with the compose defaults, the compose file and `.env.example`
//! name the same settings, the services run real subcommands, and the image's
//! `healthcheck` command answers with the right exit code.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use webhook_relay::config::Config;

use crate::common::downstream::{Downstream, Reply};

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

fn relay(args: &[&str], vars: &BTreeMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_webhook-relay"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars)
        // Away from the repository, so a developer's `.env` cannot leak in.
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the binary runs")
}

/// `KEY: value` lines of one top-level block of docker-compose.yml, with
/// `${KEY:-default}` read as its default (what compose uses when nothing is set).
fn compose_block(name: &str) -> BTreeMap<String, String> {
    let text = repo_file("docker-compose.yml");
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name}:")));
    assert!(
        lines.next().is_some(),
        "docker-compose.yml has a top-level {name} block"
    );
    lines
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter_map(env_line)
        .collect()
}

/// Every `KEY: value` environment line anywhere in docker-compose.yml.
fn compose_env() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in repo_file("docker-compose.yml").lines().filter_map(env_line) {
        if let Some(old) = out.insert(k.clone(), v.clone()) {
            assert_eq!(
                old, v,
                "{k} has two different defaults in docker-compose.yml"
            );
        }
    }
    out
}

fn env_line(line: &str) -> Option<(String, String)> {
    let (key, value) = line.trim().split_once(": ")?;
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let value = value.trim();
    let value = match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(inner) => {
            let (var, default) = inner.split_once(":-").unwrap_or((inner, ""));
            assert_eq!(var, key, "{key} is filled from a variable of its own name");
            default.to_owned()
        }
        None => value.to_owned(),
    };
    Some((key.to_owned(), value))
}

/// The host-port variables of docker-compose.yml's `ports:` entries, with their
/// defaults and the host address each is published on (empty: every interface).
fn compose_ports() -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for line in repo_file("docker-compose.yml").lines() {
        let Some(entry) = line.trim().strip_prefix("- \"") else {
            continue;
        };
        let Some((published, _)) = entry.split_once('"') else {
            continue;
        };
        let Some((host, rest)) = published.split_once("${") else {
            continue;
        };
        let (inner, container) = rest.split_once('}').expect("a closed ${...}");
        let (var, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("{var} has a default", var = inner));
        assert!(
            container.starts_with(':'),
            "{var} maps to a container port: {published}"
        );
        let host = host.trim_end_matches(':').to_owned();
        out.insert(var.to_owned(), (default.to_owned(), host));
    }
    out
}

/// `KEY=value` lines of .env.example, commented out or not.
fn env_example() -> BTreeMap<String, String> {
    repo_file(".env.example")
        .lines()
        .filter_map(|l| l.trim_start_matches('#').split_once('='))
        .filter(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn definitions_json_equals_the_export_with_the_compose_defaults() {
    let vars = compose_block("x-relay-env");
    for needed in [
        "AMQP_URL",
        "QUEUE_PREFIX",
        "BACKOFF_BASE_MS",
        "BACKOFF_MAX_MS",
    ] {
        assert!(vars.contains_key(needed), "compose sets {needed}");
    }
    let export = ["topology", "export", "--management-login", "guest:guest"];
    let out = relay(&export, &vars);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported: serde_json::Value = serde_json::from_slice(&out.stdout).expect("export is JSON");
    let checked_in: serde_json::Value =
        serde_json::from_str(&repo_file("rabbitmq/definitions.json"))
            .expect("definitions.json is JSON");
    assert!(
        exported == checked_in,
        "rabbitmq/definitions.json differs from the relay's topology with the compose \
         defaults; regenerate it: `cargo run -q -- topology export --management-login \
         guest:guest > rabbitmq/definitions.json`\n\
         export:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What the broker must hold before anyone can log in or the UI shows a queue: the
    // relay's own user with rights on its names only, and guest for the UI.
    let user = |name: &str| {
        checked_in["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("definitions.json has a user {name}"))
            .clone()
    };
    let permission = |name: &str| {
        checked_in["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user"] == name)
            .unwrap_or_else(|| panic!("definitions.json gives {name} permissions"))
            .clone()
    };
    assert!(
        vars["AMQP_URL"].starts_with("amqp://relay:"),
        "compose logs in as relay"
    );
    assert_eq!(user("relay")["tags"], serde_json::json!([]));
    assert_eq!(permission("relay")["configure"], r"^webhooks\.");
    assert_eq!(permission("relay")["read"], r"^webhooks\.");
    assert_eq!(
        permission("relay")["write"],
        r"^(webhooks\..*|amq\.default)$"
    );
    assert_eq!(user("guest")["tags"][0], "administrator");
    assert_eq!(permission("guest")["configure"], ".*");
    assert_eq!(checked_in["vhosts"][0]["name"], "/");
    let queues = checked_in["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 14, "work, 12 retry levels, dlq");

    // The comparison is sensitive: another prefix gives other definitions.
    let mut other = vars.clone();
    other.insert("QUEUE_PREFIX".into(), "other".into());
    let out = relay(&export, &other);
    let other: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(other, checked_in);
}

#[test]
fn compose_defaults_are_a_valid_relay_configuration() {
    let vars = compose_block("x-relay-env");
    for spec_name in [
        "AMQP_URL",
        "DOWNSTREAM_URL",
        "LISTEN_ADDR",
        "MAX_ATTEMPTS",
        "BACKOFF_BASE_MS",
        "BACKOFF_MAX_MS",
        "DELIVERY_TIMEOUT_MS",
        "INLINE_DELIVERY",
        "INLINE_TIMEOUT_MS",
        "QUEUE_PREFIX",
        "WORKER_CONCURRENCY",
        "MAX_BODY_BYTES",
        "SHUTDOWN_GRACE_MS",
        "ADMIN_TOKEN",
        "INBOUND_TOKEN",
        "INBOUND_TOKEN_HEADER",
        "INBOUND_BASIC_AUTH",
        "INBOUND_HMAC_SECRET",
        "LOG_FORMAT",
        "RUST_LOG",
    ] {
        assert!(
            vars.contains_key(spec_name),
            "compose passes {spec_name} to the relay"
        );
    }
    let config = Config::from_vars(vars.clone()).expect("compose defaults are valid");
    let defaults = Config::from_vars([("DOWNSTREAM_URL", "http://x/")]).unwrap();
    // Apart from the host names, compose runs the relay's own defaults.
    assert_eq!(config.max_attempts, defaults.max_attempts);
    assert_eq!(config.backoff_base, defaults.backoff_base);
    assert_eq!(config.backoff_max, defaults.backoff_max);
    assert_eq!(config.queue_prefix, defaults.queue_prefix);
    assert_eq!(
        config.listen_addr.port(),
        8000,
        "the image's HEALTHCHECK probes port 8000"
    );
    assert_eq!(
        config.downstream_url.unwrap().as_str(),
        "http://demo-downstream:9000/hook"
    );
    let demo = webhook_relay::demo::DemoConfig::from_vars(compose_env())
        .expect("compose's demo settings are valid");
    assert_eq!(demo.listen_addr.port(), 9000);
}

#[test]
fn host_ports_are_settable_with_the_spec_names_and_the_broker_stays_local() {
    let ports = compose_ports();
    let spec = [
        ("RELAY_PORT", "8000", ""),
        ("DEMO_PORT", "9000", ""),
        ("RABBITMQ_AMQP_PORT", "5672", "127.0.0.1"),
        ("RABBITMQ_UI_PORT", "15672", "127.0.0.1"),
        ("RABBITMQ_PROMETHEUS_PORT", "15692", "127.0.0.1"),
        // The observability profile's, local like the broker's.
        ("PROMETHEUS_PORT", "9090", "127.0.0.1"),
        ("GRAFANA_PORT", "3000", "127.0.0.1"),
    ];
    let expected: BTreeMap<String, (String, String)> = spec
        .iter()
        .map(|(k, d, h)| ((*k).to_owned(), ((*d).to_owned(), (*h).to_owned())))
        .collect();
    assert_eq!(ports, expected, "the ports of docker-compose.yml");
    // No port is published without a variable (a fixed one would collide again).
    let fixed: Vec<String> = repo_file("docker-compose.yml")
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- \"") && !l.contains("${"))
        .map(str::to_owned)
        .collect();
    assert!(fixed.is_empty(), "fixed host ports: {fixed:?}");
    let dockerfile = repo_file("Dockerfile");
    assert!(
        !dockerfile.lines().any(|l| l.starts_with("# syntax=")),
        "a `# syntax=` line makes BuildKit pull a frontend image"
    );
}

#[test]
fn the_observability_profile_mounts_files_that_exist() {
    let compose = repo_file("docker-compose.yml");
    let mounts: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
        .filter_map(|l| l.split(':').next())
        .filter(|p| p.starts_with("observability"))
        .collect();
    assert!(
        mounts.len() >= 4,
        "prometheus.yml, alerts.yml, provisioning, dashboards: {mounts:?}"
    );
    for m in mounts {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(m);
        assert!(path.exists(), "{m} is mounted but missing");
    }
    for service in ["prometheus", "grafana"] {
        let block: Vec<&str> = compose
            .lines()
            .skip_while(|l| *l != format!("  {service}:"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .collect();
        assert!(
            block
                .iter()
                .any(|l| l.trim() == r#"profiles: ["observability"]"#),
            "{service} is in the observability profile only"
        );
    }
}

#[test]
fn env_example_documents_exactly_what_compose_passes() {
    let example = env_example();
    let mut compose = compose_env();
    for (var, (default, _)) in compose_ports() {
        assert!(
            compose.insert(var.clone(), default).is_none(),
            "{var} is both a port and a setting"
        );
    }
    let only_example: Vec<&String> = example
        .keys()
        .filter(|k| !compose.contains_key(*k))
        .collect();
    let only_compose: Vec<&String> = compose
        .keys()
        .filter(|k| !example.contains_key(*k))
        .collect();
    assert!(
        only_example.is_empty(),
        ".env.example names what compose does not pass: {only_example:?}"
    );
    assert!(
        only_compose.is_empty(),
        "compose passes what .env.example does not document: {only_compose:?}"
    );
    for (k, v) in &compose {
        assert_eq!(
            &example[k], v,
            ".env.example shows compose's default for {k}"
        );
    }
}

#[test]
fn compose_services_run_real_subcommands_and_the_dockerfile_builds_like_ci() {
    let compose = repo_file("docker-compose.yml");
    let commands: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("command: [\""))
        .filter_map(|l| l.strip_suffix("\"]"))
        .collect();
    assert_eq!(commands, ["receiver", "worker", "demo-downstream"]);
    for c in commands {
        let out = relay(&[c, "--help"], &BTreeMap::new());
        assert!(out.status.success(), "`webhook-relay {c}` exists");
    }
    let dockerfile = repo_file("Dockerfile");
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "the CI build command"
    );
    assert!(repo_file(".ci/run").contains("cargo build --release --locked"));
    assert!(
        dockerfile
            .contains(r#"CMD ["webhook-relay", "healthcheck", "http://127.0.0.1:8000/healthz"]"#)
    );
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("the runtime stage sets a user");
    assert!(
        !user.contains("root") && !user.contains(" 0"),
        "non-root: {user}"
    );
}

fn healthcheck(url: &str, extra: &[&str]) -> i32 {
    let mut args = vec!["healthcheck", url];
    args.extend_from_slice(extra);
    relay(&args, &BTreeMap::new()).status.code().unwrap_or(-1)
}

#[tokio::test]
async fn healthcheck_exits_0_on_2xx_and_1_otherwise() {
    let ok = Downstream::start(Reply::Status(200)).await;
    let unavailable = Downstream::start(Reply::Status(503)).await;
    let moved = Downstream::start(Reply::Status(301)).await;
    let hangs = Downstream::start(Reply::Hang).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (ok, unavailable, moved, hangs) = (ok.url(), unavailable.url(), moved.url(), hangs.url());
    let codes = tokio::task::spawn_blocking(move || {
        [
            healthcheck(&ok, &[]),
            healthcheck(&unavailable, &[]),
            healthcheck(&moved, &[]),
            healthcheck(&format!("http://{closed}/healthz"), &[]),
            healthcheck(&hangs, &["--timeout-ms", "300"]),
            healthcheck("not a url", &[]),
        ]
    })
    .await
    .unwrap();
    assert_eq!(codes, [0, 1, 1, 1, 1, 1]);
}
