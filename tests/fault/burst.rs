//! Bursts (issue: absorb any burst): 1,000 concurrent 250 KB events against a slow
//! downstream, and a flood of idle connections, against the relay binary, whose peak
//! memory is read from /proc (SPEC §4.5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;

use crate::common::downstream::{Downstream, Reply};
use crate::support::{Relay, queue_first_env, serial, shared_amqp, topology};
use crate::{prefix, wait_delivered};

/// A memory figure of process `pid` in MiB: `VmHWM` (peak resident) or `VmRSS` (now).
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn peak_rss_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmHWM:")
}

fn current_rss_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmRSS:")
}

/// Deletes a test's topology on the shared broker when dropped, also when the test
/// fails halfway.
struct DeleteOnDrop(webhook_relay::broker::Topology);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        crate::common::delete_topology_blocking(self.0.clone());
    }
}

struct Burst {
    codes: Vec<u16>,
    /// What the requests that got no answer (code 0) failed with, by kind.
    unanswered: std::collections::BTreeMap<String, usize>,
    p99: Duration,
    accepted: Vec<String>,
}

/// `n` events of `size` bytes sent all at once (one connection each), the id in
/// `Idempotency-Key` so every request can share one body.
async fn burst(url: &str, tag: &str, n: usize, size: usize) -> Burst {
    let body = Bytes::from(format!(
        r#"{{"detail":{{"pad":"{}"}}}}"#,
        "x".repeat(size.saturating_sub(20))
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let results = join_all((0..n).map(|i| {
        let (http, body) = (http.clone(), body.clone());
        let id = format!("{tag}-{i}");
        async move {
            let started = Instant::now();
            let (code, error) = match http
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", &id)
                .body(body)
                .send()
                .await
            {
                Ok(r) => (r.status().as_u16(), None),
                Err(e) => (0, Some(webhook_relay::error_chain(&e))),
            };
            (id, code, started.elapsed(), error)
        }
    }))
    .await;
    let mut took: Vec<Duration> = results.iter().map(|r| r.2).collect();
    took.sort();
    Burst {
        codes: results.iter().map(|r| r.1).collect(),
        unanswered: tally(results.iter().filter_map(|r| r.3.clone())),
        p99: took[took.len() * 99 / 100],
        accepted: results
            .into_iter()
            .filter(|r| (200..300).contains(&r.1))
            .map(|r| r.0)
            .collect(),
    }
}

/// How many times each item occurs.
fn tally<T: Ord>(items: impl IntoIterator<Item = T>) -> std::collections::BTreeMap<T, usize> {
    let mut t = std::collections::BTreeMap::new();
    for item in items {
        *t.entry(item).or_default() += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_events_keeps_memory_bounded_and_loses_nothing() {
    let _serial = serial().await;
    let amqp = shared_amqp();
    for (scenario, reply) in [
        ("slow", Reply::Slow(Duration::from_millis(1500))),
        ("healthy", Reply::Status(200)),
    ] {
        let down = Downstream::start(reply).await;
        let p = prefix(&format!("burst-{scenario}"));
        let mut env = queue_first_env(&amqp, &down.url(), &p, &[("WORKER_CONCURRENCY", "64")]);
        env.retain(|(k, _)| k != "INLINE_DELIVERY"); // the default: inline attempts
        let _cleanup = DeleteOnDrop(topology(&p, 20, 200));
        let mut relay = Relay::spawn("serve", &env);
        let http = reqwest::Client::new();
        relay.wait_ready(&http).await;
        let before = current_rss_mib(relay.pid());
        let started = Instant::now();
        let sent = burst(&relay.url("/webhook/receive"), &p, 1000, 250_000).await;
        let answered_in = started.elapsed();
        let peak_burst = peak_rss_mib(relay.pid());
        let counts = tally(sent.codes.iter().copied());
        let refused = counts.get(&503).copied().unwrap_or(0);
        wait_delivered(&down, &sent.accepted, Duration::from_secs(120)).await;
        let peak = peak_rss_mib(relay.pid());
        println!(
            "burst ({scenario} downstream): 1000 x 250 KB answered {counts:?} ({:.1}% 503) in {answered_in:?}, p99 {:?}; relay RSS {before:.0} MiB before, peak {peak_burst:.0} MiB during the burst, {peak:.0} MiB after delivering all {} accepted",
            refused as f64 / 10.0,
            sent.p99,
            sent.accepted.len()
        );
        assert!(
            counts.keys().all(|c| [200, 202, 503].contains(c)),
            "only 200, 202 or 503: {counts:?}; unanswered: {:?}",
            sent.unanswered
        );
        // The memory target: at most 160 MB (MAX_INFLIGHT_BYTES of bodies, the workers'
        // prefetch of 64 x 250 KB, a thousand connections' buffers), against 462 MB
        // before the intake was bounded. The 503 share (at most 5% against the slow
        // downstream, none against the healthy one, wanted) is a speed figure, printed
        // and not asserted: a request waits INTAKE_WAIT_MS for room, so it depends on
        // how fast the relay and the broker move 250 MB on a shared machine (a healthy
        // run here: 0 to 2 of 1,000), and on the build.
        assert!(
            refused < 1000 / 2,
            "most of the burst is taken in: {counts:?}"
        );
        let limit_mib = 160e6 / (1024.0 * 1024.0);
        assert!(
            peak <= limit_mib,
            "peak RSS {peak:.0} MiB, over 160 MB ({limit_mib:.1} MiB)"
        );
        assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    }
}

/// Bursts the relay refuses before reading the bodies, with every sender still writing
/// when its answer comes: 200 bodies of 4 MB over the default `MAX_BODY_BYTES` (413 on
/// the declared length), and 1,000 of 250 KB past a byte budget of 16 bodies (503 after
/// a short wait). Each sender must read its answer rather than a connection reset:
/// closing with the body unread made 43 of the 200 get "Broken pipe" from reqwest, and
/// 56 of 1,000 senders of the burst above got no answer in one CI run on RabbitMQ 4.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_refused_unread_is_answered_never_reset() {
    let _serial = serial().await;
    let amqp = shared_amqp();
    for (scenario, extra, n, size, answers) in [
        ("oversize", &[][..], 200, 4_000_000, &[413][..]),
        (
            "budget",
            &[("MAX_INFLIGHT_BYTES", "4000000"), ("INTAKE_WAIT_MS", "50")][..],
            1000,
            250_000,
            &[202, 503][..],
        ),
    ] {
        let down = Downstream::start(Reply::Status(200)).await;
        let p = prefix(&format!("burst-refused-{scenario}"));
        let _cleanup = DeleteOnDrop(topology(&p, 20, 200));
        let mut relay = Relay::spawn("serve", &queue_first_env(&amqp, &down.url(), &p, extra));
        let http = reqwest::Client::new();
        relay.wait_ready(&http).await;
        let sent = burst(&relay.url("/webhook/receive"), &p, n, size).await;
        let counts = tally(sent.codes.iter().copied());
        wait_delivered(&down, &sent.accepted, Duration::from_secs(120)).await;
        let peak = peak_rss_mib(relay.pid());
        println!(
            "burst refused ({scenario}): {n} x {} KB answered {counts:?}, p99 {:?}; relay peak RSS {peak:.0} MiB; all {} accepted delivered",
            size / 1000,
            sent.p99,
            sent.accepted.len()
        );
        assert!(
            counts.keys().all(|c| answers.contains(c)),
            "{scenario}: only {answers:?}: {counts:?}; unanswered: {:?}",
            sent.unanswered
        );
        let refused = counts.get(answers.last().unwrap()).copied().unwrap_or(0);
        assert!(
            refused >= n / 10,
            "{scenario}: a good part of the burst refused: {counts:?}"
        );
        assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_leaves_the_relay_answering() {
    let _serial = serial().await;
    let amqp = shared_amqp();
    let down = Downstream::start(Reply::Status(200)).await;
    let p = prefix("flood");
    let _cleanup = DeleteOnDrop(topology(&p, 20, 200));
    let mut relay = Relay::spawn(
        "receiver",
        &queue_first_env(&amqp, &down.url(), &p, &[("REQUEST_TIMEOUT_MS", "3000")]),
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    let before = current_rss_mib(relay.pid());
    // As many as this process's descriptor limit allows, less a margin for the rest.
    let limit = std::process::Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(1024);
    let target = 20_000.min(limit.saturating_sub(1_000));
    let addr = format!("127.0.0.1:{}", relay.port);
    let opened = Arc::new(std::sync::Mutex::new(Vec::with_capacity(target)));
    let started = Instant::now();
    for chunk in (0..target).collect::<Vec<_>>().chunks(500) {
        let conns = join_all(chunk.iter().map(|_| tokio::net::TcpStream::connect(&addr))).await;
        opened
            .lock()
            .unwrap()
            .extend(conns.into_iter().filter_map(Result::ok));
    }
    let held = opened.lock().unwrap().len();
    let flooded_in = started.elapsed();
    let during = current_rss_mib(relay.pid());
    // Real requests are answered once slots free up: idle connections are cut after
    // REQUEST_TIMEOUT_MS, the ones past MAX_CONNECTIONS at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = None;
    while Instant::now() < deadline {
        if let Ok(r) = http
            .post(relay.url("/webhook/receive"))
            .header("content-type", "application/json")
            .body(r#"{"id":"flood-real"}"#)
            .send()
            .await
        {
            answered = Some((r.status().as_u16(), started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = peak_rss_mib(relay.pid());
    println!(
        "connection flood: {held} of {target} idle connections opened in {flooded_in:?} (descriptor limit {limit}); relay RSS {before:.0} MiB before, {during:.0} MiB flooded, peak {peak:.0} MiB; a real event answered {answered:?}"
    );
    drop(opened);
    assert!(relay.is_running(), "the relay stays up:\n{}", relay.logs());
    assert_eq!(answered.map(|a| a.0), Some(202), "a real event is answered");
    assert!(peak <= 160.0, "peak RSS {peak:.0} MiB");
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
}
