//! Protecting the downstream (SPEC §5a): the circuit breaker through an outage, the
//! adaptive limit against a downstream of capacity 4, `DOWNSTREAM_MAX_RPS` and
//! `MAX_BACKLOG`. Each test prints its figures; the bounds it asserts are behaviour.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use webhook_relay::app::Role;
use webhook_relay::envelope::Envelope;
use webhook_relay::protect::breaker::State;

use crate::common::downstream::{Downstream, Received, Reply};
use crate::common::seed::{drain_envelopes, seed_queue};
use crate::common::{Inspector, TestApp, eventually};

/// Posts events `tag-0000` .. `tag-{n-1}` to `app` with `concurrency` requests at a
/// time; returns how many times each (status, body status) was answered.
async fn post_many(
    app: &TestApp,
    tag: &str,
    n: usize,
    concurrency: usize,
) -> HashMap<(u16, String), usize> {
    let answers: Vec<(u16, String)> = futures_util::stream::iter(0..n)
        .map(|i| async move {
            let resp = app
                .post(
                    "/webhook/receive",
                    &format!(r#"{{"id":"{tag}-{i:04}"}}"#),
                    &[],
                )
                .await;
            let code = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            (code, body["status"].as_str().unwrap_or("").to_owned())
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut out = HashMap::new();
    for a in answers {
        *out.entry(a).or_insert(0) += 1;
    }
    out
}

/// `n` events as the receiver queues them (attempt count 0).
fn queued_events(tag: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let id = format!("{tag}-{i:04}");
            Envelope::received(
                id.clone(),
                "protect".into(),
                Some("application/json"),
                vec![("content-type".into(), b"application/json".to_vec())],
                Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
            )
        })
        .collect()
}

/// Attempts that failed before the event was delivered: its delivering request carries
/// `X-Relay-Attempt: n`, so n - 1 attempts failed before it.
fn failed_before_delivery(received: &[Received]) -> usize {
    received
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .filter_map(|r| r.header("x-relay-attempt")?.parse::<usize>().ok())
        .map(|n| n - 1)
        .sum()
}

/// The most attempts that fell in any one-second window.
fn busiest_second(received: &[Received]) -> usize {
    let mut at: Vec<Instant> = received.iter().map(|r| r.at).collect();
    at.sort();
    let (mut best, mut start) = (0, 0);
    for end in 0..at.len() {
        while at[end].duration_since(at[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

const OUTAGE: Duration = Duration::from_secs(20);
const OUTAGE_EVENTS: usize = 500;
const CLIENT_CONCURRENCY: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_costs_no_event_its_attempts_with_the_breaker() {
    // Two relays through the same 20 s outage of their downstreams, breaker on and off.
    let (addr_on, addr_off) = (Downstream::refusing_addr(), Downstream::refusing_addr());
    let url_on = format!("http://{addr_on}/hook");
    let url_off = format!("http://{addr_off}/hook");
    assert_ne!(addr_on, addr_off);
    let common = [
        ("MAX_ATTEMPTS", "3"),
        ("BACKOFF_BASE_MS", "100"),
        ("BACKOFF_MAX_MS", "400"),
        ("WORKER_CONCURRENCY", "32"),
    ];
    let breaker = [
        ("CIRCUIT_BREAKER", "true"),
        ("BREAKER_MIN_ATTEMPTS", "20"),
        // Probes 3.5, 10.5 and 24.5 s after it opens: two in the outage, one after.
        ("BREAKER_PROBE_MS", "3500"),
    ];
    let on_vars: Vec<(&str, &str)> = [("DOWNSTREAM_URL", url_on.as_str())]
        .into_iter()
        .chain(common)
        .chain(breaker)
        .collect();
    let off_vars: Vec<(&str, &str)> = [("DOWNSTREAM_URL", url_off.as_str())]
        .into_iter()
        .chain(common)
        .collect();
    let on = TestApp::spawn(Role::Serve, &on_vars).await;
    let off = TestApp::spawn(Role::Serve, &off_vars).await;
    let outage_started = Instant::now();

    let (answers_on, answers_off) = tokio::join!(
        post_many(&on, "out-on", OUTAGE_EVENTS, CLIENT_CONCURRENCY),
        post_many(&off, "out-off", OUTAGE_EVENTS, CLIENT_CONCURRENCY),
    );
    let accepted = |a: &HashMap<(u16, String), usize>| {
        a.iter()
            .filter(|((code, _), _)| *code == 202)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    assert_eq!(accepted(&answers_on), OUTAGE_EVENTS, "{answers_on:?}");
    assert_eq!(accepted(&answers_off), OUTAGE_EVENTS, "{answers_off:?}");
    // Once open, the receiver queues without an inline attempt.
    let queued_on = answers_on
        .get(&(202, "queued".to_owned()))
        .copied()
        .unwrap_or(0);
    assert!(
        queued_on >= OUTAGE_EVENTS - 20 - CLIENT_CONCURRENCY,
        "{answers_on:?}"
    );
    assert_eq!(on.relay.protect.breaker_state(), Some(State::Open));
    let metrics = on
        .http
        .get(on.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"webhook_relay_circuit_breaker_state{state="open"} 1"#),
        "{metrics}"
    );

    let inspect = Inspector::connect().await;
    // Without the breaker every event runs through its three attempts in about a second.
    eventually(
        Duration::from_secs(15),
        "breaker off: events dead-lettered",
        || async { inspect.count(&off.topology().dlq).await as usize == OUTAGE_EVENTS },
    )
    .await;

    tokio::time::sleep(OUTAGE.saturating_sub(outage_started.elapsed())).await;
    let down_on = Downstream::start_at(addr_on, Reply::Status(200)).await;
    let down_off = Downstream::start_at(addr_off, Reply::Status(200)).await;
    let recovered = Instant::now();
    assert_eq!(
        on.relay.protect.breaker_state(),
        Some(State::Open),
        "still open at the end of the outage"
    );

    eventually(
        Duration::from_secs(60),
        "breaker on: all 500 delivered after recovery",
        || async { down_on.delivered().len() == OUTAGE_EVENTS },
    )
    .await;
    let drained_in = recovered.elapsed();
    eventually(
        Duration::from_secs(10),
        "breaker on: queues empty",
        || async { inspect.total(on.topology()).await == 0 },
    )
    .await;
    assert_eq!(on.relay.protect.breaker_state(), Some(State::Closed));

    let attempts_on = failed_before_delivery(&down_on.received());
    // Probes made while the downstream was down: 3.5 s and 10.5 s after the opening.
    let probes = 2;
    let bound = 20 + 32 + CLIENT_CONCURRENCY + probes;
    let dlq_off = inspect.count(&off.topology().dlq).await as usize;
    let dlq_envelopes = drain_envelopes(&inspect, &off.topology().dlq).await;
    let attempts_off: usize = dlq_envelopes
        .iter()
        .map(|e| e.attempts as usize)
        .sum::<usize>()
        + failed_before_delivery(&down_off.received());
    println!(
        "outage {OUTAGE:?}, {OUTAGE_EVENTS} events, MAX_ATTEMPTS=3: breaker on: {attempts_on} attempts during the outage \
         (bound {bound}), DLQ 0, all delivered {drained_in:.1?} after recovery | breaker off: {attempts_off} attempts, \
         DLQ {dlq_off}"
    );
    assert!(
        attempts_on <= bound,
        "attempts during the outage {attempts_on} > {bound}"
    );
    assert!(
        dlq_off > OUTAGE_EVENTS / 2,
        "without the breaker most go to the DLQ"
    );
    inspect.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_finds_a_downstream_capacity_of_four() {
    const EVENTS: usize = 2000;
    let take = Duration::from_millis(50);
    let (down_a, down_f) = (
        Downstream::start(Reply::Capacity(4, take)).await,
        Downstream::start(Reply::Capacity(4, take)).await,
    );
    let spawn = |url: String, adaptive: &'static str| async move {
        TestApp::spawn(
            Role::Worker,
            &[
                ("DOWNSTREAM_URL", url.as_str()),
                ("WORKER_CONCURRENCY", "32"),
                ("ADAPTIVE_CONCURRENCY", adaptive),
            ],
        )
        .await
    };
    let inspect = Inspector::connect().await;
    let settled = |app: &TestApp, down: &Downstream| {
        let (topology, down) = (app.topology().clone(), down.clone());
        let inspect = &inspect;
        async move {
            let dlq = inspect.count(&topology.dlq).await as usize;
            down.delivered().len() + dlq == EVENTS
        }
    };
    // One after the other, so neither relay takes CPU from the other's measurement.
    let adaptive = spawn(down_a.url(), "true").await;
    // Queue-first: the events wait in P.work, as the receiver queues them.
    seed_queue(&adaptive.topology().work, &queued_events("cap-a", EVENTS)).await;
    eventually(
        Duration::from_secs(90),
        "adaptive: every event delivered or dead-lettered",
        || settled(&adaptive, &down_a),
    )
    .await;
    let limit = adaptive.relay.protect.concurrency_limit().unwrap();
    let fixed = spawn(down_f.url(), "false").await;
    seed_queue(&fixed.topology().work, &queued_events("cap-f", EVENTS)).await;
    eventually(
        Duration::from_secs(90),
        "fixed: every event delivered or dead-lettered",
        || settled(&fixed, &down_f),
    )
    .await;

    let figures = |down: &Downstream| {
        let received = down.received();
        let delivered = down.delivered().len();
        let refused = received.iter().filter(|r| r.status == 503).count();
        let first = received.iter().map(|r| r.at).min().unwrap();
        let last = received
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.at)
            .max()
            .unwrap();
        let rate = delivered as f64 / last.duration_since(first).as_secs_f64();
        let share = refused as f64 / received.len() as f64;
        (delivered, rate, share, down.max_in_flight())
    };
    let (delivered_a, rate_a, share_a, peak_a) = figures(&down_a);
    let (delivered_f, rate_f, share_f, peak_f) = figures(&down_f);
    let dlq_a = inspect.count(&adaptive.topology().dlq).await;
    let dlq_f = inspect.count(&fixed.topology().dlq).await;
    println!(
        "capacity 4 x 50 ms (80/s), {EVENTS} events, WORKER_CONCURRENCY=32: adaptive: {rate_a:.1}/s delivered, \
         {:.1}% of attempts 503, limit {limit} at the end, peak in flight {peak_a}, delivered {delivered_a}, DLQ {dlq_a} \
         | fixed: {rate_f:.1}/s, {:.1}% 503, peak {peak_f}, delivered {delivered_f}, DLQ {dlq_f}",
        share_a * 100.0,
        share_f * 100.0
    );
    let metrics = adaptive
        .http
        .get(adaptive.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("webhook_relay_concurrency_limit "),
        "{metrics}"
    );
    assert!(rate_a >= 0.8 * 80.0, "throughput {rate_a:.1}/s");
    assert!(share_a < 0.10, "503 share {share_a:.3}");
    assert!((3..=6).contains(&limit), "limit {limit}");
    assert_eq!(delivered_a, EVENTS, "adaptive: every event delivered");
    inspect.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_max_rps_spaces_inline_and_worker_attempts_together() {
    const EVENTS: usize = 500;
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("DOWNSTREAM_MAX_RPS", "50"),
        ],
    )
    .await;
    let started = Instant::now();
    let answers = post_many(&app, "rate", EVENTS, 8).await;
    let inline = answers
        .get(&(200, "delivered".to_owned()))
        .copied()
        .unwrap_or(0);
    let queued = answers
        .get(&(202, "queued".to_owned()))
        .copied()
        .unwrap_or(0);
    assert_eq!(inline + queued, EVENTS, "{answers:?}");
    assert!(
        inline > 0 && queued > 0,
        "both inline and worker attempts: {answers:?}"
    );
    eventually(Duration::from_secs(30), "all 500 delivered", || async {
        down.delivered().len() == EVENTS
    })
    .await;
    let received = down.received();
    let busiest = busiest_second(&received);
    println!(
        "DOWNSTREAM_MAX_RPS=50, {EVENTS} events ({inline} inline, {queued} by workers): {} attempts in {:.1?}, \
         busiest one-second window {busiest}",
        received.len(),
        started.elapsed()
    );
    assert!(busiest <= 55, "{busiest} attempts in one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_backlog_turns_new_events_away_until_the_queues_drain() {
    let addr = Downstream::refusing_addr();
    let url = format!("http://{addr}/hook");
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &url),
            ("INLINE_DELIVERY", "false"),
            ("MAX_BACKLOG", "100"),
            ("MAX_ATTEMPTS", "10"),
            // One retry level of 10 s: the failed events wait there for the test.
            ("BACKOFF_BASE_MS", "5000"),
            ("BACKOFF_MAX_MS", "10000"),
        ],
    )
    .await;
    for i in 0..100 {
        let resp = app
            .post("/webhook/receive", &format!(r#"{{"id":"bl-{i:03}"}}"#), &[])
            .await;
        assert_eq!(resp.status(), 202, "event {i}");
    }
    // The depth comes from the broker once a second, never per request.
    eventually(
        Duration::from_secs(5),
        "the relay sees 100 waiting",
        || async { app.relay.protect.backlog().held() >= 100 },
    )
    .await;
    for i in 100..105 {
        let resp = app
            .post("/webhook/receive", &format!(r#"{{"id":"bl-{i:03}"}}"#), &[])
            .await;
        assert_eq!(resp.status(), 503, "event {} past MAX_BACKLOG", i + 1);
        assert!(resp.headers().contains_key("retry-after"));
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["id"], format!("bl-{i:03}"));
    }
    let inspect = Inspector::connect().await;
    assert_eq!(
        inspect.total(app.topology()).await,
        100,
        "refused events were not stored"
    );

    let down = Downstream::start_at(addr, Reply::Status(200)).await;
    eventually(Duration::from_secs(30), "backlog drained", || async {
        down.delivered().len() == 100 && app.relay.protect.backlog().held() == 0
    })
    .await;
    let resp = app
        .post("/webhook/receive", r#"{"id":"bl-after"}"#, &[])
        .await;
    assert_eq!(resp.status(), 202);
    println!(
        "MAX_BACKLOG=100: events 101-105 answered 503 + Retry-After; after the drain 202 again"
    );
    inspect.close().await;
}
