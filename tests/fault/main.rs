//! Fault tests (issue: survive broker and process faults). They break things for
//! real: a throwaway RabbitMQ node of their own is stopped and started, the relay
//! binary is killed with SIGKILL and SIGTERM. They run one at a time (see
//! `support::serial`) and never touch the shared broker's availability.

mod burst;
mod cluster;
#[path = "../it/common/mod.rs"]
mod common;
mod definitions;
mod pressure;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::downstream::{Downstream, Reply};
use support::{
    Node, Relay, delete_topology, queue_counts, queue_first_env, report, send_all, serial,
    shared_amqp, topology,
};

fn prefix(name: &str) -> String {
    format!("fault-{name}-{}", std::process::id())
}

async fn wait_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the downstream has had every event in `accepted` (the ids answered 2xx).
async fn wait_delivered(down: &Downstream, accepted: &[String], timeout: Duration) {
    wait_until(timeout, "every accepted event delivered", || {
        let delivered = down.delivered();
        accepted.iter().all(|id| delivered.contains_key(id))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_a_queue_first_flow_loses_nothing() {
    let _serial = serial().await;
    let node = Node::start();
    let down = Downstream::start(Reply::Status(200)).await;
    // One event in four fails its first attempt, so some wait in retry queues when the
    // broker goes away.
    down.set_rule(|h| {
        let id = h.get("idempotency-key")?.to_str().ok()?;
        let n: u32 = id.rsplit('-').next()?.parse().ok()?;
        (n.is_multiple_of(4) && h.get("x-relay-attempt")? == "1").then_some(Reply::Status(503))
    });
    let p = prefix("restart");
    let mut relay = Relay::spawn(
        "serve",
        &[
            ("AMQP_URL", node.amqp_url().as_str()),
            ("DOWNSTREAM_URL", &down.url()),
            ("QUEUE_PREFIX", &p),
            ("INLINE_DELIVERY", "false"),
            ("BACKOFF_BASE_MS", "250"),
            ("BACKOFF_MAX_MS", "2000"),
            ("MAX_ATTEMPTS", "10"),
            ("PUBLISH_TIMEOUT_MS", "2000"),
        ],
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;

    // Watch readiness throughout: it must go 503 while the broker is away, then 200.
    let saw_unready = Arc::new(AtomicBool::new(false));
    let ready_again = Arc::new(AtomicBool::new(false));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (http, url) = (http.clone(), relay.url("/readyz"));
        let (unready, again, stop) = (saw_unready.clone(), ready_again.clone(), stop_watch.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(r) = http.get(&url).send().await {
                    match r.status().as_u16() {
                        503 => unready.store(true, Ordering::SeqCst),
                        200 if unready.load(Ordering::SeqCst) => {
                            again.store(true, Ordering::SeqCst)
                        }
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let total = 1000;
    let ids: Vec<String> = (0..total).map(|i| format!("restart-{i}")).collect();
    let accepted = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (http, url, acc) = (
            http.clone(),
            relay.url("/webhook/receive"),
            accepted.clone(),
        );
        tokio::spawn(
            async move { send_all(&http, &url, ids, 4, Duration::from_millis(15), acc).await },
        )
    };
    wait_until(Duration::from_secs(60), "400 accepted", || {
        accepted.load(Ordering::SeqCst) >= 400
    })
    .await;
    let retried_before_stop = down.received().iter().filter(|r| r.status == 503).count();
    node.stop_app();
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.start_app();
    let sent = sender.await.unwrap();
    assert_eq!(sent.accepted.len(), total);

    wait_until(
        Duration::from_secs(90),
        "every accepted event delivered",
        || down.delivered().len() == total,
    )
    .await;
    stop_watch.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    let (duplicates, lost) = report("broker restart", total, &down.delivered(), &sent.accepted);
    println!(
        "broker restart: 503 answers during the outage {}, first-attempt failures before the stop {retried_before_stop}",
        sent.unavailable
    );
    assert_eq!(lost, 0);
    let _ = duplicates;
    assert!(
        retried_before_stop > 0,
        "some events were waiting in retry queues"
    );
    assert!(
        sent.unavailable > 0,
        "the outage fell in the middle of the intake"
    );
    assert!(
        saw_unready.load(Ordering::SeqCst),
        "/readyz went 503 while the broker was away"
    );
    assert!(
        ready_again.load(Ordering::SeqCst),
        "/readyz came back to 200"
    );
    assert!(
        relay.is_running(),
        "the relay kept running:\n{}",
        relay.logs()
    );

    let counts = queue_counts(&node.amqp_url(), &topology(&p, 250, 2000)).await;
    assert!(
        counts.values().all(|&n| n == 0),
        "queues drained: {counts:?}"
    );
    let logs = relay.logs();
    let noisy: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!("broker restart: warning lines logged: {}", noisy.len());
    for l in &noisy {
        println!("  {l}");
    }
    assert!(logs.contains("lost the broker connection"), "{logs}");
    assert!(logs.contains("re-established"), "{logs}");
    assert!(
        noisy.len() <= 6,
        "one line per loss, not one per message:\n{}",
        noisy.join("\n")
    );
    let code = relay.terminate(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_receive_time_answers_503_then_accepts_the_retry() {
    let _serial = serial().await;
    let node = Node::start();
    let down = Downstream::start(Reply::Status(503)).await;
    let p = prefix("down");
    let mut relay = Relay::spawn(
        "serve",
        &[
            ("AMQP_URL", node.amqp_url().as_str()),
            ("DOWNSTREAM_URL", &down.url()),
            ("QUEUE_PREFIX", &p),
            ("BACKOFF_BASE_MS", "1000"),
            ("BACKOFF_MAX_MS", "4000"),
        ],
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    node.stop_app();
    let body = r#"{"id":"down-1"}"#;
    let url = relay.url("/webhook/receive");
    let post = || {
        http.post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    node.start_app();
    relay.wait_ready(&http).await;
    let r = post().await.unwrap();
    assert_eq!(r.status(), 202);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["status"], "queued_for_retry");
    let counts = queue_counts(&node.amqp_url(), &topology(&p, 1000, 4000)).await;
    assert_eq!(
        counts.values().sum::<u32>(),
        1,
        "the event is held: {counts:?}"
    );
    assert!(relay.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_flow_loses_nothing() {
    let _serial = serial().await;
    // The broker is not broken here, so the shared one serves, under a unique prefix.
    let amqp = shared_amqp();
    let down = Downstream::start(Reply::Slow(Duration::from_millis(50))).await;
    let p = prefix("kill9");
    let base = queue_first_env(&amqp, &down.url(), &p, &[("WORKER_CONCURRENCY", "16")]);
    let http = reqwest::Client::new();
    let mut receiver = Relay::spawn("receiver", &base);
    receiver.wait_ready(&http).await;
    let total = 500;
    let ids: Vec<String> = (0..total).map(|i| format!("kill-{i}")).collect();
    let sent = send_all(
        &http,
        &receiver.url("/webhook/receive"),
        ids,
        16,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    assert_eq!(sent.accepted.len(), total);

    let mut worker = Relay::spawn("worker", &base);
    worker.wait_ready(&http).await;
    wait_until(Duration::from_secs(60), "a third delivered", || {
        down.delivered().len() >= total / 3
    })
    .await;
    let in_flight_at_kill = down.received().len();
    worker.kill9();
    let mut worker = Relay::spawn("worker", &base);
    worker.wait_ready(&http).await;
    wait_until(Duration::from_secs(90), "every event delivered", || {
        down.delivered().len() == total
    })
    .await;
    let (duplicates, lost) = report("kill -9 worker", total, &down.delivered(), &sent.accepted);
    println!("kill -9 worker: {in_flight_at_kill} requests seen when the worker was killed");
    assert_eq!(lost, 0);
    assert!(
        duplicates <= 16,
        "at most the prefetch window is redelivered, got {duplicates}"
    );
    let counts = queue_counts(&amqp, &topology(&p, 20, 200)).await;
    assert!(counts.values().all(|&n| n == 0), "{counts:?}");
    assert_eq!(worker.terminate(Duration::from_secs(15)).await, Some(0));
    drop(receiver);
    delete_topology(&amqp, &topology(&p, 20, 200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_deliveries_in_flight_exits_0_and_loses_nothing() {
    let _serial = serial().await;
    let amqp = shared_amqp();
    let down = Downstream::start(Reply::Slow(Duration::from_millis(400))).await;
    let p = prefix("term");
    let base = queue_first_env(
        &amqp,
        &down.url(),
        &p,
        &[("WORKER_CONCURRENCY", "8"), ("SHUTDOWN_GRACE_MS", "5000")],
    );
    let http = reqwest::Client::new();
    let mut relay = Relay::spawn("serve", &base);
    relay.wait_ready(&http).await;
    let total = 60;
    let ids: Vec<String> = (0..total).map(|i| format!("term-{i}")).collect();
    let sent = send_all(
        &http,
        &relay.url("/webhook/receive"),
        ids,
        8,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    wait_until(Duration::from_secs(10), "deliveries in flight", || {
        down.received().len() >= 4
    })
    .await;
    let started = Instant::now();
    let code = relay.terminate(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    let delivered_before_restart = down.delivered().len();

    let mut relay = Relay::spawn("serve", &base);
    relay.wait_ready(&http).await;
    wait_until(Duration::from_secs(60), "every event delivered", || {
        down.delivered().len() == total
    })
    .await;
    let (_, lost) = report("SIGTERM", total, &down.delivered(), &sent.accepted);
    println!(
        "SIGTERM: exited in {took:?}, {delivered_before_restart} delivered before the restart"
    );
    assert_eq!(lost, 0);
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    delete_topology(&amqp, &topology(&p, 20, 200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_downstream_times_out_and_the_rest_keeps_moving() {
    let _serial = serial().await;
    let amqp = shared_amqp();
    let down = Downstream::start(Reply::Status(200)).await;
    // Events "stuck-*" get a downstream that accepts the connection and never answers.
    down.set_rule(|h| {
        h.get("idempotency-key")?
            .to_str()
            .ok()?
            .starts_with("stuck-")
            .then_some(Reply::Hang)
    });
    let p = prefix("stuck");
    let base = queue_first_env(
        &amqp,
        &down.url(),
        &p,
        &[
            ("WORKER_CONCURRENCY", "4"),
            ("DELIVERY_TIMEOUT_MS", "300"),
            ("MAX_ATTEMPTS", "3"),
        ],
    );
    let http = reqwest::Client::new();
    let mut relay = Relay::spawn("serve", &base);
    relay.wait_ready(&http).await;
    let mut ids: Vec<String> = (0..6).map(|i| format!("stuck-{i}")).collect();
    ids.extend((0..60).map(|i| format!("ok-{i}")));
    let sent = send_all(
        &http,
        &relay.url("/webhook/receive"),
        ids,
        8,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    assert_eq!(sent.accepted.len(), 66);
    wait_until(
        Duration::from_secs(30),
        "the healthy events delivered",
        || down.delivered().len() == 60,
    )
    .await;
    let dlq = format!("{p}.dlq");
    let mut counts = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        counts = queue_counts(&amqp, &topology(&p, 20, 200)).await;
        if counts[&dlq] == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        counts[&dlq], 6,
        "stuck events dead-lettered after their attempts: {counts:?}"
    );
    let stuck_attempts = down.received().iter().filter(|r| r.status == 0).count();
    println!(
        "stuck downstream: 60 healthy delivered, 6 stuck dead-lettered after {stuck_attempts} timed-out attempts"
    );
    assert_eq!(
        stuck_attempts, 18,
        "MAX_ATTEMPTS per stuck event, each timed out"
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    delete_topology(&amqp, &topology(&p, 20, 200)).await;
}
