//! `GET /metrics` (SPEC §4.1): after a known sequence of events, the exposition holds
//! exactly the expected counters. The relay runs as its own process, so its registry
//! holds what this test did and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::process::RelayProcess;
use crate::common::{Inspector, TestApp, eventually, unique_prefix};

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format: `# TYPE` lines and samples with quoted,
/// escaped label values. Panics on anything malformed.
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("malformed sample: {line}"),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                // key
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "quoted value in {line}"
                );
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => panic!("dangling escape in {line}"),
                        },
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key.trim_start_matches(',').to_owned(), value);
                match chars.next() {
                    Some((_, ',')) => {
                        if let Some(&(i, '}')) = chars.peek() {
                            break i;
                        }
                    }
                    Some((i, '}')) => break i,
                    other => panic!("unexpected {other:?} in {line}"),
                }
            };
            &body[end + 1..]
        } else {
            rest
        };
        let value = rest.split_whitespace().next().expect("a value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    (samples, types)
}

/// Every sample of `name`, as (labels rendered k=v,..., value).
fn series(samples: &[Sample], name: &str) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (labels.join(","), s.value)
        })
        .collect()
}

/// The series of `name` that moved: registered-at-0 series left out.
fn moved(samples: &[Sample], name: &str) -> BTreeMap<String, f64> {
    series(samples, name)
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// Every (name, labels) of a scrape but the queue depths, which the broker fills.
fn series_keys(samples: &[Sample]) -> BTreeSet<(String, BTreeMap<String, String>)> {
    samples
        .iter()
        .filter(|s| s.name != "webhook_relay_queue_depth")
        .map(|s| (s.name.clone(), s.labels.clone()))
        .collect()
}

fn expect(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

async fn scrape(
    http: &reqwest::Client,
    relay: &RelayProcess,
) -> (Vec<Sample>, BTreeMap<String, String>) {
    let resp = http.get(relay.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    parse(&resp.text().await.unwrap())
}

#[test]
fn the_parser_reads_labels_and_escapes() {
    let (s, t) = parse(
        "# HELP x A thing.\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"uo\\\\te\"} 3\ny 2.5\nz_bucket{le=\"+Inf\",} 7\n",
    );
    assert_eq!(t["x"], "counter");
    assert_eq!(s[0].labels["b"], "q\"uo\\te");
    assert_eq!(s[0].value, 3.0);
    assert_eq!(s[1].name, "y");
    assert_eq!(s[2].labels["le"], "+Inf");
}

#[tokio::test]
async fn counters_hold_exactly_what_happened() {
    let down = Downstream::start(Reply::Status(200)).await;
    // In order: delivered, refused, retryable, retryable again (then the DLQ).
    down.script([
        Reply::Status(200),
        Reply::Status(404),
        Reply::Status(503),
        Reply::Status(503),
    ]);
    let prefix = unique_prefix("metrics");
    let relay = RelayProcess::start(
        &prefix,
        "serve",
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("MAX_ATTEMPTS", "2"),
            ("ADMIN_TOKEN", "metrics-admin"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let (first, _) = scrape(&http, &relay).await;
    let post = |path: &str, body: &str| {
        http.post(relay.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    assert_eq!(
        post("/webhooks/orders", r#"{"id":"m-1"}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("/webhooks/orders", r#"{"id":"m-2"}"#)
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        post("/webhook/receive", r#"{"id":"m-3"}"#)
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        post("/webhook/receive", "not json").await.unwrap().status(),
        400
    );

    let t = relay.topology();
    let inspect = Inspector::connect().await;
    eventually(Duration::from_secs(10), "two events in the DLQ", || async {
        inspect.count(&t.dlq).await == 2
    })
    .await;

    let (s, types) = scrape(&http, &relay).await;
    assert_eq!(
        moved(&s, "webhook_relay_events_received_total"),
        expect(&[
            (
                "answer=dead_lettered,code=202,endpoint=/webhooks/{name}",
                1.0
            ),
            ("answer=delivered,code=200,endpoint=/webhooks/{name}", 1.0),
            ("answer=error,code=400,endpoint=/webhook/receive", 1.0),
            (
                "answer=queued_for_retry,code=202,endpoint=/webhook/receive",
                1.0
            ),
        ])
    );
    assert_eq!(
        moved(&s, "webhook_relay_delivery_attempts_total"),
        expect(&[
            ("result=delivered,status_class=2xx", 1.0),
            ("result=permanent,status_class=4xx", 1.0),
            ("result=retryable,status_class=5xx", 2.0),
        ])
    );
    assert_eq!(
        moved(&s, "webhook_relay_delivery_duration_seconds_count"),
        expect(&[
            ("result=delivered", 1.0),
            ("result=permanent", 1.0),
            ("result=retryable", 2.0)
        ])
    );
    assert_eq!(
        moved(&s, "webhook_relay_retries_scheduled_total"),
        expect(&[("level=01-40ms", 1.0)])
    );
    assert_eq!(
        moved(&s, "webhook_relay_dead_lettered_total"),
        expect(&[("reason=attempts_exhausted", 1.0), ("reason=refused", 1.0)])
    );
    assert_eq!(
        moved(&s, "webhook_relay_publish_confirm_seconds_count"),
        expect(&[
            ("result=confirmed,target=dlq", 2.0),
            ("result=confirmed,target=retry", 1.0)
        ])
    );
    assert_eq!(series(&s, "webhook_relay_broker_up"), expect(&[("", 1.0)]));
    assert!(moved(&s, "webhook_relay_dlq_replayed_total").is_empty());
    for (name, kind) in [
        ("webhook_relay_events_received_total", "counter"),
        ("webhook_relay_delivery_attempts_total", "counter"),
        ("webhook_relay_delivery_duration_seconds", "histogram"),
        ("webhook_relay_publish_confirm_seconds", "histogram"),
        ("webhook_relay_broker_up", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // Histogram buckets are cumulative and end with +Inf = count.
    let buckets: Vec<&Sample> = s
        .iter()
        .filter(|x| {
            x.name == "webhook_relay_delivery_duration_seconds_bucket"
                && x.labels["result"] == "retryable"
        })
        .collect();
    assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
    assert_eq!(buckets.last().unwrap().value, 2.0);

    // Queue depths come from the background refresher (every few seconds).
    eventually(
        Duration::from_secs(20),
        "the DLQ depth gauge reads 2",
        || async {
            let (s, _) = scrape(&http, &relay).await;
            let depths = series(&s, "webhook_relay_queue_depth");
            depths.get(&format!("kind=dlq,queue={}", t.dlq)) == Some(&2.0)
                && depths.get(&format!("kind=work,queue={}", t.work)) == Some(&0.0)
                && t.retry
                    .iter()
                    .all(|l| depths.get(&format!("kind=retry,queue={}", l.name)) == Some(&0.0))
        },
    )
    .await;

    // A replay through the admin API: both events move and are delivered.
    let resp = http
        .post(relay.url("/admin/dlq/replay?all=true"))
        .header("authorization", "Bearer metrics-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    eventually(
        Duration::from_secs(10),
        "replayed events delivered",
        || async { down.for_id("m-2").len() == 2 && down.for_id("m-3").len() == 3 },
    )
    .await;
    eventually(Duration::from_secs(10), "delivery counted", || async {
        let (s, _) = scrape(&http, &relay).await;
        series(&s, "webhook_relay_delivery_attempts_total").get("result=delivered,status_class=2xx")
            == Some(&3.0)
    })
    .await;
    let (s, _) = scrape(&http, &relay).await;
    assert_eq!(
        moved(&s, "webhook_relay_dlq_replayed_total"),
        expect(&[("result=moved", 2.0)])
    );
    assert_eq!(
        series(&s, "webhook_relay_events_received_total")
            .values()
            .sum::<f64>(),
        4.0,
        "replays are not receptions"
    );
    // Every series the traffic moved was on the first scrape already, at 0.
    let appeared: Vec<_> = series_keys(&s)
        .difference(&series_keys(&first))
        .cloned()
        .collect();
    assert!(appeared.is_empty(), "not on the first scrape: {appeared:?}");
    assert_eq!(
        moved(&first, "webhook_relay_events_received_total"),
        expect(&[]),
        "the first scrape counts nothing yet"
    );
    inspect.close().await;
}

#[tokio::test]
async fn a_worker_process_serves_metrics_too() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(Role::Worker, &[("DOWNSTREAM_URL", &down.url())]).await;
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (s, _) = parse(&resp.text().await.unwrap());
    assert!(s.iter().any(|x| x.name == "webhook_relay_broker_up"));
}

/// The `label=value` sets of `name` on a scrape.
fn label_sets(samples: &[Sample], name: &str) -> BTreeSet<String> {
    series(samples, name).into_keys().collect()
}

#[tokio::test]
async fn every_family_is_on_the_first_scrape_at_zero() {
    let down = Downstream::start(Reply::Status(200)).await;
    let http = reqwest::Client::new();

    // serve with inline delivery and /admin: every family the relay has.
    let prefix = unique_prefix("metrics-first");
    let relay = RelayProcess::start(
        &prefix,
        "serve",
        &[("DOWNSTREAM_URL", &down.url()), ("ADMIN_TOKEN", "first")],
    )
    .await;
    let (s, types) = scrape(&http, &relay).await;
    for (name, kind) in [
        ("webhook_relay_events_received_total", "counter"),
        ("webhook_relay_delivery_attempts_total", "counter"),
        ("webhook_relay_delivery_duration_seconds", "histogram"),
        ("webhook_relay_retries_scheduled_total", "counter"),
        ("webhook_relay_dead_lettered_total", "counter"),
        ("webhook_relay_dlq_replayed_total", "counter"),
        ("webhook_relay_dlq_purged_total", "counter"),
        ("webhook_relay_publish_confirm_seconds", "histogram"),
        ("webhook_relay_broker_up", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let received = label_sets(&s, "webhook_relay_events_received_total");
    for endpoint in ["/webhook/receive", "/webhooks/{name}"] {
        for (code, answer) in [
            (200, "delivered"),
            (202, "queued_for_retry"),
            (202, "dead_lettered"),
            // Past INLINE_MAX_INFLIGHT an inline receiver queues the event.
            (202, "queued"),
            (400, "error"),
            (401, "error"),
            (413, "error"),
            (503, "error"),
        ] {
            let key = format!("answer={answer},code={code},endpoint={endpoint}");
            assert!(received.contains(&key), "{key} in {received:?}");
        }
    }
    let levels: BTreeSet<String> = relay
        .topology()
        .retry
        .iter()
        .enumerate()
        .map(|(i, l)| format!("level={}", webhook_relay::metrics::level_label(i, l.delay)))
        .collect();
    assert_eq!(
        label_sets(&s, "webhook_relay_retries_scheduled_total"),
        levels,
        "one series per retry level"
    );
    assert_eq!(
        label_sets(&s, "webhook_relay_dead_lettered_total"),
        BTreeSet::from([
            "reason=attempts_exhausted".to_owned(),
            "reason=refused".to_owned()
        ])
    );
    assert!(
        label_sets(&s, "webhook_relay_delivery_attempts_total").is_superset(&BTreeSet::from([
            "result=delivered,status_class=2xx".to_owned(),
            "result=permanent,status_class=4xx".to_owned(),
            "result=retryable,status_class=5xx".to_owned(),
            "result=retryable,status_class=none".to_owned(),
        ]))
    );
    assert_eq!(
        label_sets(&s, "webhook_relay_delivery_duration_seconds_count"),
        BTreeSet::from([
            "result=delivered".to_owned(),
            "result=permanent".to_owned(),
            "result=retryable".to_owned()
        ])
    );
    assert_eq!(
        label_sets(&s, "webhook_relay_dlq_replayed_total"),
        BTreeSet::from(["result=failed".to_owned(), "result=moved".to_owned()])
    );
    let counted: f64 = s
        .iter()
        .filter(|x| x.name.ends_with("_total") || x.name.ends_with("_count"))
        .map(|x| x.value)
        .sum();
    assert_eq!(counted, 0.0, "nothing happened yet");
    drop(relay);

    // A queueing receiver answers `queued` and publishes to the work queue only.
    let prefix = unique_prefix("metrics-first-rx");
    let receiver = RelayProcess::start(&prefix, "receiver", &[("INLINE_DELIVERY", "false")]).await;
    let (s, types) = scrape(&http, &receiver).await;
    let received = label_sets(&s, "webhook_relay_events_received_total");
    assert!(received.contains("answer=queued,code=202,endpoint=/webhooks/{name}"));
    assert!(!received.iter().any(|k| k.starts_with("answer=delivered,")));
    assert_eq!(
        label_sets(&s, "webhook_relay_publish_confirm_seconds_count"),
        BTreeSet::from([
            "result=confirmed,target=work".to_owned(),
            "result=failed,target=work".to_owned()
        ])
    );
    assert!(!types.contains_key("webhook_relay_delivery_attempts_total"));
    assert!(
        !types.contains_key("webhook_relay_dlq_replayed_total"),
        "no /admin"
    );
    drop(receiver);

    // A worker attempts, retries and dead-letters, and receives nothing.
    let prefix = unique_prefix("metrics-first-wk");
    let worker = RelayProcess::start(&prefix, "worker", &[("DOWNSTREAM_URL", &down.url())]).await;
    let (_, types) = scrape(&http, &worker).await;
    assert!(!types.contains_key("webhook_relay_events_received_total"));
    for name in [
        "webhook_relay_delivery_attempts_total",
        "webhook_relay_retries_scheduled_total",
        "webhook_relay_dead_lettered_total",
        "webhook_relay_publish_confirm_seconds",
    ] {
        assert!(types.contains_key(name), "{name} on a worker");
    }
}
