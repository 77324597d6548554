//! The broker pushing back (issue: alarms, refused publishes, flaps, half-open
//! connections): each test makes its throwaway node do what a busy RabbitMQ does and
//! checks that no promise breaks (SPEC §2, §4.2, §5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::Inspector;
use crate::common::downstream::{Downstream, Reply};
use crate::support::{
    Node, Relay, queue_counts, queue_first_env, report, send_all, serial, topology,
};
use crate::{prefix, wait_delivered, wait_until};

fn body(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","detail":{{"pad":"{}"}}}}"#,
        "x".repeat(200)
    )
}

/// One POST: its status, whether it carried Retry-After, and how long it took.
async fn post(http: &reqwest::Client, url: &str, id: &str) -> (u16, bool, Duration) {
    let started = Instant::now();
    let r = http
        .post(url)
        .header("content-type", "application/json")
        .body(body(id))
        .send()
        .await
        .expect("the relay answers");
    (
        r.status().as_u16(),
        r.headers().contains_key("retry-after"),
        started.elapsed(),
    )
}

async fn readyz(http: &reqwest::Client, relay: &Relay) -> u16 {
    http.get(relay.url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_readyz(http: &reqwest::Client, relay: &Relay, code: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while readyz(http, relay).await != code {
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {code} within {within:?}:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn warnings(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect()
}

/// A queue-first receiver on `node` with `PUBLISH_TIMEOUT_MS=publish_timeout_ms`,
/// ready and shown to store one event; its client and receive URL.
async fn queue_first_receiver(
    node: &Node,
    name: &str,
    publish_timeout_ms: &str,
) -> (Relay, reqwest::Client, String, String) {
    let p = prefix(name);
    let mut relay = Relay::spawn(
        "receiver",
        &queue_first_env(
            &node.amqp_url(),
            "http://127.0.0.1:9/unused",
            &p,
            &[("PUBLISH_TIMEOUT_MS", publish_timeout_ms)],
        ),
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    let url = relay.url("/webhook/receive");
    assert_eq!(post(&http, &url, &format!("{name}-before")).await.0, 202);
    (relay, http, url, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_alarm_queue_first_answers_503_at_once_and_stores_nothing() {
    let _serial = serial().await;
    let node = Node::start();
    let (relay, http, url, p) = queue_first_receiver(&node, "alarm-qf", "5000").await;

    node.raise_disk_alarm();
    let mut answers = Vec::new();
    for i in 0..20 {
        answers.push(post(&http, &url, &format!("alarm-{i}")).await);
    }
    let during = readyz(&http, &relay).await;
    node.clear_alarm();
    wait_readyz(&http, &relay, 200, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = queue_counts(&node.amqp_url(), &topology(&p, 20, 200)).await;
    let stored = counts.values().sum::<u32>() - 1; // less the one accepted before
    let slow = answers
        .iter()
        .filter(|(_, _, t)| *t > Duration::from_secs(1))
        .count();
    let max = answers.iter().map(|a| a.2).max().unwrap();
    let codes: Vec<u16> = answers.iter().map(|a| a.0).collect();
    println!(
        "alarm, queue-first: 20 answered {codes:?}; {slow} took over 1 s (slowest {max:?}); /readyz during the alarm {during}; stored after it cleared {stored}"
    );
    assert!(
        answers.iter().all(|(c, ra, _)| *c == 503 && *ra),
        "every event answered 503 + Retry-After: {codes:?}"
    );
    assert!(slow <= 2, "all but at most 2 answered within 1 s");
    assert_eq!(during, 503, "/readyz says 503 while the broker blocks");
    assert!(
        stored <= 2,
        "at most 2 of the refused events stored: {counts:?}"
    );
    let logs = relay.logs();
    assert!(logs.contains("broker is blocking publishers"), "{logs}");
    assert!(
        logs.contains("broker stopped blocking publishers"),
        "{logs}"
    );
    assert!(warnings(&logs).len() <= 3, "one line per episode:\n{logs}");
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_alarm_in_serve_keeps_workers_acking_and_sigterm_exits_in_time() {
    let _serial = serial().await;
    let node = Node::start();
    let down = Downstream::start(Reply::Slow(Duration::from_millis(50))).await;
    let p = prefix("alarm-serve");
    let env = queue_first_env(
        &node.amqp_url(),
        &down.url(),
        &p,
        &[("WORKER_CONCURRENCY", "4"), ("SHUTDOWN_GRACE_MS", "2000")],
    );
    let mut relay = Relay::spawn("serve", &env);
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    let total = 700;
    let ids: Vec<String> = (0..total).map(|i| format!("backlog-{i}")).collect();
    let sent = send_all(
        &http,
        &relay.url("/webhook/receive"),
        ids,
        16,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    assert_eq!(sent.accepted.len(), total);

    let window = Duration::from_millis(1500);
    let d0 = down.delivered().len();
    tokio::time::sleep(window).await;
    let d1 = down.delivered().len();
    node.raise_disk_alarm();
    // A publish makes the broker block the publishing connection.
    let (code, _, _) = post(&http, &relay.url("/webhook/receive"), "during-alarm").await;
    assert_eq!(code, 503, "an event during the alarm is refused");
    wait_readyz(&http, &relay, 503, Duration::from_secs(5)).await;
    let d2 = down.delivered().len();
    tokio::time::sleep(window).await;
    let d3 = down.delivered().len();
    let (before, during) = (d1 - d0, d3 - d2);
    assert!(d3 < total, "the backlog lasted into the alarm");
    let started = Instant::now();
    let code = relay.terminate(Duration::from_secs(10)).await;
    let took = started.elapsed();
    println!(
        "alarm, serve: delivered {before} in {window:?} before the alarm, {during} during it; SIGTERM during the alarm exited {code:?} in {took:?}"
    );
    assert!(
        during * 2 >= before,
        "workers keep at least half their rate during the alarm ({during} vs {before})"
    );
    assert_eq!(code, Some(0));
    assert!(
        took <= Duration::from_millis(4000),
        "exit within SHUTDOWN_GRACE_MS + 2 s, took {took:?}"
    );

    node.clear_alarm();
    let mut relay = Relay::spawn("serve", &env);
    relay.wait_ready(&http).await;
    // The one publish written as the block started may land when it ends (SPEC §4.2).
    wait_delivered(&down, &sent.accepted, Duration::from_secs(60)).await;
    let (_, lost) = report("alarm, serve", total, &down.delivered(), &sent.accepted);
    assert_eq!(lost, 0);
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_retry_publishes_are_retried_without_attempting_again() {
    let _serial = serial().await;
    let node = Node::start();
    let down = Downstream::start(Reply::Status(200)).await;
    // Every first attempt fails, so every event needs its retry publish.
    down.set_rule(|h| (h.get("x-relay-attempt")? == "1").then_some(Reply::Status(503)));
    let p = prefix("refused");
    let (base, max) = (100, 400);
    let env = queue_first_env(
        &node.amqp_url(),
        &down.url(),
        &p,
        &[
            ("BACKOFF_BASE_MS", "100"),
            ("BACKOFF_MAX_MS", "400"),
            ("MAX_ATTEMPTS", "3"),
            ("RUST_LOG", "info,webhook_relay::worker=debug"),
        ],
    );
    let mut relay = Relay::spawn("serve", &env);
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    // The retry levels refuse every publish (a full or policy-limited queue).
    node.set_policy(
        "refuse",
        &format!("^{}\\.retry\\.", p.replace('.', "\\.")),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = 20;
    let ids: Vec<String> = (0..total).map(|i| format!("refused-{i}")).collect();
    let sent = send_all(
        &http,
        &relay.url("/webhook/receive"),
        ids.clone(),
        4,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts_while_refused = down.received().len();
    node.clear_policy("refuse");
    // The adaptive limit (on by default) shrinks to one attempt at a time against
    // 1 s 503s, so the second attempts after the flap run one by one: 20 to 40 s on
    // a busy two-core machine, more now and then.
    let deadline = Instant::now() + Duration::from_secs(90);
    while down.delivered().len() < total {
        assert!(
            Instant::now() < deadline,
            "every event delivered after the refusal: {} of {total}; queues {:?}\n{}",
            down.delivered().len(),
            queue_counts(&node.amqp_url(), &topology(&p, base, max)).await,
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_event: Vec<usize> = ids.iter().map(|id| down.for_id(id).len()).collect();
    let most = *per_event.iter().max().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = queue_counts(&node.amqp_url(), &topology(&p, base, max)).await;
    let (_, lost) = report(
        "refused retry publishes",
        total,
        &down.delivered(),
        &sent.accepted,
    );
    println!(
        "refused retry publishes: {attempts_while_refused} downstream attempts during 4 s of refusal for {total} events, at most {most} attempts per event, queues after: {counts:?}"
    );
    assert_eq!(lost, 0);
    assert!(
        most <= 3,
        "at most 3 downstream attempts per event: {per_event:?}"
    );
    // A quorum queue over its limit still takes a publish now and then (each time one
    // of its messages expires), so some events move on during the refusal: what must
    // hold is that no event is attempted again for it.
    assert!(
        counts.values().all(|&n| n == 0),
        "nothing dead-lettered or left: {counts:?}"
    );
    let logs = relay.logs();
    assert!(
        logs.contains("publishes nacked by the broker"),
        "the refusal happened:\n{logs}"
    );
    let noisy = warnings(&logs);
    assert!(
        noisy.len() <= 4,
        "one line per episode, not per event:\n{}",
        noisy.join("\n")
    );
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flap_leaves_one_copy_of_each_event() {
    let _serial = serial().await;
    let node = Node::start();
    let down = Downstream::start(Reply::SlowStatus(Duration::from_secs(1), 503)).await;
    let p = prefix("flap");
    let env = queue_first_env(
        &node.amqp_url(),
        &down.url(),
        &p,
        &[
            ("BACKOFF_BASE_MS", "50"),
            ("BACKOFF_MAX_MS", "200"),
            ("MAX_ATTEMPTS", "2"),
            ("WORKER_CONCURRENCY", "32"),
        ],
    );
    let mut relay = Relay::spawn("serve", &env);
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    let total = 30;
    let ids: Vec<String> = (0..total).map(|i| format!("flap-{i}")).collect();
    let sent = send_all(
        &http,
        &relay.url("/webhook/receive"),
        ids.clone(),
        8,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    assert_eq!(sent.accepted.len(), total);
    wait_until(Duration::from_secs(10), "every event in flight", || {
        down.received().len() >= total
    })
    .await;
    node.close_all_connections();
    let topo = topology(&p, 50, 200);
    let dlq = topo.dlq.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = queue_counts(&node.amqp_url(), &topo).await;
        let elsewhere: u32 = counts
            .iter()
            .filter(|(q, _)| **q != dlq)
            .map(|(_, n)| n)
            .sum();
        if counts[&dlq] >= total as u32 && elsewhere == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events did not settle: {counts:?} after {} downstream attempts",
            down.received().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late copies would arrive within a few attempt durations.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inspect = Inspector::connect_to(&node.amqp_url()).await;
    let parked = crate::common::seed::drain_envelopes(&inspect, &dlq).await;
    inspect.close().await;
    let mut per_id = std::collections::HashMap::<String, usize>::new();
    for e in &parked {
        *per_id.entry(e.id.clone()).or_default() += 1;
    }
    let copies: usize = per_id.values().map(|n| n.saturating_sub(1)).sum();
    println!(
        "connection flap: {total} events, {} DLQ entries, {} distinct, {copies} extra copies; {} downstream attempts",
        parked.len(),
        per_id.len(),
        down.received().len()
    );
    assert_eq!(per_id.len(), total, "every event in the DLQ");
    assert_eq!(copies, 0, "no event has two copies: {per_id:?}");
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_broker_is_left_after_three_publish_timeouts() {
    let _serial = serial().await;
    let node = Node::start();
    let (relay, http, url, _) = queue_first_receiver(&node, "halfopen", "500").await;

    let frozen = node.freeze();
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut i = 0;
    while readyz(&http, &relay).await == 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still ready 30 s into a frozen broker:\n{}",
            relay.logs()
        );
        answers.push(post(&http, &url, &format!("frozen-{i}")).await.0);
        i += 1;
    }
    let unready_after = started.elapsed();
    drop(frozen);
    wait_readyz(&http, &relay, 200, Duration::from_secs(30)).await;
    let back_after = started.elapsed();
    let after = post(&http, &url, "after").await.0;
    println!(
        "half-open broker: {} requests answered {answers:?} before /readyz went 503 after {unready_after:?}; ready again {back_after:?} after the freeze (resumed at {unready_after:?}); next event {after}",
        answers.len()
    );
    assert!(answers.iter().all(|&c| c == 503), "{answers:?}");
    assert!(
        answers.len() >= 3 && answers.len() <= 4,
        "the session is given up after three publish timeouts: {answers:?}"
    );
    assert!(
        unready_after < Duration::from_secs(10),
        "left after the timeouts, not after heartbeats: {unready_after:?}"
    );
    assert_eq!(after, 202);
    assert!(
        relay
            .logs()
            .contains("3 publish timeouts in a row: treating the broker connection as broken"),
        "{}",
        relay.logs()
    );
    assert_eq!(relay.terminate(Duration::from_secs(10)).await, Some(0));
}
