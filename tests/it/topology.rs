//! The declared topology (SPEC §2) and the publisher's refusal to call an
//! unroutable publish a success.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use webhook_relay::app::Role;
use webhook_relay::broker::{PublishError, Target};
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{Inspector, TestApp, config, unique_prefix};

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
    inspect
        .channel()
        .queue_delete(
            app.topology().dlq.as_str().into(),
            QueueDeleteOptions {
                if_unused: false,
                if_empty: false,
                nowait: false,
            },
        )
        .await
        .unwrap();
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
