//! A three-node cluster (issue: outgrow one broker): the relay lists every node in
//! `AMQP_URL`, and when the node it uses goes away it moves to another within seconds,
//! losing nothing (SPEC §2, §7).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::downstream::{Downstream, Reply};
use crate::support::{Cluster, Relay, queue_counts, report, send_all, serial, topology};
use crate::{prefix, wait_delivered, wait_until};

/// The node `/readyz` says the relay uses (its AMQP port), or `None` while not ready.
async fn node_in_use(http: &reqwest::Client, relay: &Relay) -> Option<u16> {
    let r = http.get(relay.url("/readyz")).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    let json: serde_json::Value = r.json().await.ok()?;
    json["node"].as_str()?.rsplit(':').next()?.parse().ok()
}

/// Waits until the relay is ready on a node other than `gone`; how long that took.
async fn failover(http: &reqwest::Client, relay: &Relay, gone: u16) -> (u16, Duration) {
    let started = Instant::now();
    loop {
        if let Some(port) = node_in_use(http, relay).await
            && port != gone
        {
            return (port, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no failover within 60 s:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_in_use_fails_over_and_loses_nothing() {
    let _serial = serial().await;
    let cluster = Cluster::start(3);
    let down = Downstream::start(Reply::Status(200)).await;
    // Every first attempt fails, so every event also travels through a retry level.
    down.set_rule(|h| (h.get("x-relay-attempt")? == "1").then_some(Reply::Status(503)));
    let p = prefix("cluster");
    let (base, max) = (250, 2000);
    let mut relay = Relay::spawn(
        "serve",
        &[
            ("AMQP_URL", cluster.amqp_url().as_str()),
            ("DOWNSTREAM_URL", &down.url()),
            ("QUEUE_PREFIX", &p),
            ("BACKOFF_BASE_MS", "250"),
            ("BACKOFF_MAX_MS", "2000"),
            ("MAX_ATTEMPTS", "10"),
            ("PUBLISH_TIMEOUT_MS", "2000"),
        ],
    );
    let http = reqwest::Client::new();
    relay.wait_ready(&http).await;
    // Quorum queues are replicated on all three nodes (the default initial group size
    // is up to three members).
    let members = cluster.nodes[0].ctl_output(&["list_queues", "name", "members"]);
    let work_line = members
        .lines()
        .find(|l| l.starts_with(&format!("{p}.work")))
        .unwrap_or_default()
        .to_owned();
    let replicas = work_line.matches("relayfault-").count();

    let total = 1500;
    let ids: Vec<String> = (0..total).map(|i| format!("cluster-{i}")).collect();
    let accepted = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (http, url, acc) = (
            http.clone(),
            relay.url("/webhook/receive"),
            accepted.clone(),
        );
        tokio::spawn(
            async move { send_all(&http, &url, ids, 4, Duration::from_millis(25), acc).await },
        )
    };

    wait_until(Duration::from_secs(60), "400 accepted", || {
        accepted.load(Ordering::SeqCst) >= 400
    })
    .await;
    let first = node_in_use(&http, &relay)
        .await
        .expect("ready before the stop");
    cluster.by_port(first).stop_app();
    let (second, took_first) = failover(&http, &relay, first).await;
    cluster.by_port(first).start_app();

    wait_until(Duration::from_secs(60), "1000 accepted", || {
        accepted.load(Ordering::SeqCst) >= 1000
    })
    .await;
    let in_use = node_in_use(&http, &relay).await.unwrap_or(second);
    cluster.by_port(in_use).stop_app();
    let (third, took_second) = failover(&http, &relay, in_use).await;

    let sent = sender.await.unwrap();
    assert_eq!(sent.accepted.len(), total);
    wait_delivered(&down, &sent.accepted, Duration::from_secs(120)).await;
    let (duplicates, lost) = report("cluster failover", total, &down.delivered(), &sent.accepted);
    println!(
        "cluster failover: work queue replicas {replicas} ({work_line:?}); node :{first} stopped, ready on :{second} after {took_first:?}; node :{in_use} stopped, ready on :{third} after {took_second:?}; 503s seen by the sender {}, duplicates {duplicates}, lost {lost}",
        sent.unavailable
    );
    assert_eq!(lost, 0);
    assert_eq!(replicas, 3, "the work queue has a replica on every node");
    assert!(
        took_first < Duration::from_secs(15) && took_second < Duration::from_secs(15),
        "ready on another node within 15 s"
    );
    cluster.by_port(in_use).start_app();
    let live = cluster.nodes.iter().find(|n| n.port == third).unwrap();
    let counts = queue_counts(&live.amqp_url(), &topology(&p, base, max)).await;
    assert!(
        counts.values().all(|&n| n == 0),
        "queues drained: {counts:?}"
    );
    assert!(
        relay.logs().contains("lost the broker connection"),
        "{}",
        relay.logs()
    );
    assert_eq!(relay.terminate(Duration::from_secs(15)).await, Some(0));
}
