//! The declared topology (SPEC §2) and the publisher's refusal to call an
//! unroutable publish a success.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::future::join_all;

use lapin::options::QueueDeleteOptions;
use webhook_relay::app::Role;
use webhook_relay::broker::{PublishError, Target};
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::seed::drain_envelopes;
use crate::common::{Inspector, TestApp, config, eventually, queue_exists, unique_prefix};

#[tokio::test]
async fn every_queue_exists_and_declaring_again_is_idempotent() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let inspect = Inspector::connect().await;
    let names: Vec<String> = app
        .topology()
        .queues()
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names.len(), 6, "work + 4 retry levels + dlq: {names:?}");
    assert!(names.contains(&format!("{}.retry.01-40ms", app.prefix)));
    assert!(names.contains(&format!("{}.retry.04-200ms", app.prefix)));
    // Passive declares fail for a missing queue.
    for n in &names {
        inspect.count(n).await;
    }
    // A second declaration with the same arguments is accepted.
    app.topology()
        .declare(inspect.channel())
        .await
        .expect("idempotent");
    inspect.close().await;
}

#[tokio::test]
async fn a_second_process_with_the_same_prefix_shares_the_topology() {
    let prefix = unique_prefix("shared");
    let down = Downstream::start(Reply::Status(200)).await;
    let a = TestApp::spawn(
        Role::Receiver,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("QUEUE_PREFIX", &prefix),
            ("INLINE_DELIVERY", "false"),
        ],
    )
    .await;
    let b = TestApp::spawn(
        Role::Worker,
        &[("DOWNSTREAM_URL", &down.url()), ("QUEUE_PREFIX", &prefix)],
    )
    .await
    .shares_topology();
    let resp = a.post("/webhook/receive", r#"{"id":"split-1"}"#, &[]).await;
    assert_eq!(resp.status(), 202);
    crate::common::eventually(
        Duration::from_secs(10),
        "worker process delivered",
        || async { down.for_id("split-1").len() == 1 },
    )
    .await;
    drop(b);
}

#[tokio::test]
async fn an_unroutable_publish_is_a_failure_not_a_success() {
    let prefix = unique_prefix("unroutable");
    let cfg = config(&prefix, &[("DOWNSTREAM_URL", "http://127.0.0.1:9/")]);
    let app = TestApp::spawn_config(Role::Serve, cfg, true).await;
    let inspect = Inspector::connect().await;
    // Remove the DLQ behind the relay's back: a mandatory publish to it must fail.
    delete_queue(&inspect, &app.topology().dlq).await;
    let event = Envelope::received("u-1".into(), "w".into(), None, vec![], "{}".into());
    let err = app
        .relay
        .broker
        .publish(Target::Dlq, &event)
        .await
        .expect_err("unroutable must not count as stored");
    assert!(
        matches!(err, PublishError::Unroutable { code: 312, .. }),
        "{err:?}"
    );
    // The relay re-declares its topology after such a failure and publishing works again.
    crate::common::eventually(Duration::from_secs(10), "topology restored", || async {
        app.relay.broker.publish(Target::Dlq, &event).await.is_ok()
    })
    .await;
    inspect.close().await;
}

/// AMQP's `basic.return` names no publish: a return is followed by the confirm of its
/// publish, but one `multiple` confirm often covers several publishes, and the client
/// library hands the return to any one of them. With routable and unroutable publishes
/// confirmed together, each answer must still be about its own publish: an unroutable
/// one never reported stored (that event would be lost), a stored one never reported
/// unroutable.
#[tokio::test]
async fn routed_and_unroutable_publishes_confirmed_together_each_get_their_own_answer() {
    // Queue-first receiver and no worker: what is published stays where it went.
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    let inspect = Inspector::connect().await;
    let t = app.topology().clone();
    let broker = &app.relay.broker;
    let (mut unroutable, mut stored) = (0, 0);
    // Which publish a return lands on is up to timing: a few rounds make a wrong
    // pairing all but certain to show.
    for round in 0..8 {
        assert!(broker.wait_ready(Duration::from_secs(10)).await);
        delete_queue(&inspect, &t.dlq).await;
        // Every other publish goes to the missing DLQ, all of them in flight at once.
        let sent: Vec<(String, Target)> = (0..400)
            .map(|i| {
                let target = if i % 2 == 0 {
                    Target::Work
                } else {
                    Target::Dlq
                };
                (format!("mix-{round}-{i:03}"), target)
            })
            .collect();
        let answers = join_all(sent.iter().map(|(id, target)| async move {
            let event = Envelope::received(id.clone(), "w".into(), None, vec![], "{}".into());
            broker.publish(*target, &event).await
        }))
        .await;
        // The relay re-declares the DLQ after the first unroutable publish.
        eventually(Duration::from_secs(10), "topology restored", || async {
            queue_exists(&t.dlq).await
        })
        .await;
        let ids_in = |queue: String| {
            let inspect = &inspect;
            async move {
                drain_envelopes(inspect, &queue)
                    .await
                    .into_iter()
                    .map(|e| e.id)
                    .collect::<BTreeSet<String>>()
            }
        };
        let in_work = ids_in(t.work.clone()).await;
        let in_dlq = ids_in(t.dlq.clone()).await;
        for ((id, target), answer) in sent.iter().zip(&answers) {
            let held = if *target == Target::Work {
                &in_work
            } else {
                &in_dlq
            };
            match answer {
                Ok(()) => {
                    stored += 1;
                    assert!(held.contains(id), "{id} was answered stored but is not");
                }
                Err(PublishError::Unroutable { .. }) => {
                    unroutable += 1;
                    assert!(
                        !in_work.contains(id) && !in_dlq.contains(id),
                        "{id} was answered unroutable but is stored"
                    );
                }
                // Cut off by the session's replacement: either answer is allowed.
                Err(_) => {}
            }
        }
    }
    assert!(
        unroutable >= 5 && stored >= 5,
        "{unroutable} unroutable, {stored} stored"
    );
    inspect.close().await;
}

#[tokio::test]
async fn a_message_past_the_work_delivery_limit_is_parked_in_the_dlq() {
    // Queue-first receiver, no worker: the event waits in P.work for our fake consumer.
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    let resp = app
        .post("/webhook/receive", r#"{"id":"poison-1"}"#, &[])
        .await;
    assert_eq!(resp.status(), 202);
    let inspect = Inspector::connect().await;
    let work = app.topology().work.clone();
    // A consumer that keeps failing it: every return counts as a redelivery. Returned
    // with `basic.reject`, as the worker does: RabbitMQ 4.3+ no longer counts
    // `basic.nack` toward the limit, so this pins the way that counts on every version.
    let mut returns = 0;
    while let Some(m) = inspect
        .channel()
        .basic_get(
            work.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        m.delivery
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: true })
            .await
            .unwrap();
        returns += 1;
        assert!(returns <= 100, "the broker never gave up on it");
    }
    let dlq = app.topology().dlq.clone();
    crate::common::eventually(
        Duration::from_secs(10),
        "poison message in the DLQ",
        || async { inspect.count(&dlq).await == 1 },
    )
    .await;
    let m = inspect.drain(&dlq).await.remove(0);
    let e = Envelope::from_amqp(&m.delivery.properties, m.delivery.data);
    assert_eq!(e.id, "poison-1");
    assert_eq!(e.dead_letter_reason.as_deref(), Some("delivery_limit"));
    println!("returned {returns} times before the broker dead-lettered it");
    inspect.close().await;
}

/// Deletes `queue` behind the relay's back.
async fn delete_queue(inspect: &Inspector, queue: &str) {
    inspect
        .channel()
        .queue_delete(
            queue.into(),
            QueueDeleteOptions {
                if_unused: false,
                if_empty: false,
                nowait: false,
            },
        )
        .await
        .unwrap();
}
