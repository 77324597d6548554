//! Filling a DLQ the way the relay does (confirmed publishes of `Envelope`s), and
//! reading queues back for assertions.

use std::time::Duration;

use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use webhook_relay::broker::Topology;
use webhook_relay::envelope::{Envelope, now_ms};

use super::{Inspector, amqp_url};

/// A dead-lettered event: `status` (None: no answer), `reason`, dead-lettered `age` ago.
pub fn dead(id: &str, status: Option<u16>, reason: &str, age: Duration) -> Envelope {
    let mut e = Envelope::received(
        id.to_owned(),
        "orders".to_owned(),
        Some("application/json"),
        vec![("x-trace".to_owned(), format!("trace-{id}").into_bytes())],
        Bytes::from(format!(r#"{{"id":"{id}","n":1}}"#)),
    );
    let attempts = if reason == "refused" { 1 } else { 5 };
    let error = match status {
        Some(s) => format!("HTTP {s}"),
        None => "connection failed: refused".to_owned(),
    };
    e.record_attempt(attempts, status, Some(&error));
    e.dead_letter(reason);
    e.dead_lettered_at_ms = Some(now_ms() - age.as_millis() as u64);
    e
}

/// `n` events `prefix-0000` .. dead-lettered after 5 attempts with a 503.
pub fn many(prefix: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            dead(
                &format!("{prefix}-{i:04}"),
                Some(503),
                "attempts_exhausted",
                Duration::from_secs(60),
            )
        })
        .collect()
}

/// Publishes `events` to the DLQ of `topology`, in order, each confirmed.
pub async fn seed_dlq(topology: &Topology, events: &[Envelope]) {
    seed_queue(&topology.dlq, events).await
}

/// Publishes `events` to `queue` (through the default exchange), in order, each confirmed.
pub async fn seed_queue(queue: &str, events: &[Envelope]) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("seeding connects");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions { nowait: false })
        .await
        .unwrap();
    for chunk in events.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for e in chunk {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &e.body,
                    e.properties(),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            let c = c.await.unwrap();
            assert!(
                c.is_ack() && c.take_message().is_none(),
                "seed publish stored"
            );
        }
    }
    let _ = conn.close(200, "seeded".into()).await;
}

/// Ids of `events`, in order.
pub fn ids(events: &[Envelope]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Takes every message out of `queue` (acked) and reads them back, in queue order.
pub async fn drain_envelopes(inspect: &Inspector, queue: &str) -> Vec<Envelope> {
    inspect
        .drain(queue)
        .await
        .into_iter()
        .map(|m| Envelope::from_amqp(&m.delivery.properties, m.delivery.data))
        .collect()
}
