//! The broker side of the benchmark: the raw lapin publisher and consumer that give
//! the physical limits, pre-filling `P.work`, and reading queues back to verify them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::tally::Tally;

/// A fresh connection named after the benchmark (visible as such in the management UI).
pub async fn connect(amqp_url: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name("relay-bench".into()),
    )
    .await
    .context("connecting to AMQP_URL")
}

/// Declares the baseline's durable quorum queue (what the relay's queues are).
pub async fn declare_quorum(channel: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: false,
                durable: true, // quorum queues must be durable
                exclusive: false,
                auto_delete: false,
                nowait: false,
            },
            args,
        )
        .await?;
    Ok(())
}

/// Deletes a queue the benchmark declared, messages and all.
pub async fn delete_queue(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .queue_delete(
            name.into(),
            QueueDeleteOptions {
                if_unused: false,
                if_empty: false,
                nowait: false,
            },
        )
        .await?;
    Ok(())
}

/// Ready messages in `queue` (passive declare).
pub async fn ready_count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = webhook_relay::broker::topology::peek(channel, queue)
        .await
        .with_context(|| format!("queue {queue} exists"))?;
    Ok(q.message_count())
}

/// Ready messages in `queue` once it holds `want`, or what it holds after `within`.
/// A queue's count can trail its confirms and acks by a moment (quorum queues report
/// it from the leader's state as applied), so a check that must be exact polls.
pub async fn settled_count(
    channel: &Channel,
    queue: &str,
    want: u32,
    within: Duration,
) -> anyhow::Result<u32> {
    let deadline = Instant::now() + within;
    loop {
        let held = ready_count(channel, queue).await?;
        if held == want || Instant::now() >= deadline {
            return Ok(held);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The plain properties of the raw baseline: persistent, with an id and a type.
pub fn raw_properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2) // persistent, like every relay message
        .with_message_id(id.into())
        .with_content_type("application/json".into())
}

/// Publishes one message, mandatory as the relay does; `Ok` only when the broker acked
/// it without returning it, i.e. a queue holds it.
pub async fn publish_stored(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true, // unroutable must fail, as in the relay
                immediate: false,
            },
            body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("not stored: {other:?}"),
    }
}

/// Publishes `count` messages made by `make(n)` with `window` publishes awaiting their
/// confirm at any time: persistent, mandatory, confirmed, as the relay publishes.
/// Returns the wall time; fails unless every publish was acked without a return.
pub async fn publish_confirmed<F>(
    connection: &Connection,
    exchange: &str,
    routing_key: &str,
    count: usize,
    window: usize,
    make: F,
) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> (Vec<u8>, BasicProperties) + Send + Sync + 'static,
{
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions { nowait: false })
        .await?;
    let make = Arc::new(make);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..window.max(1))
        .map(|_| {
            let (channel, make, next) = (channel.clone(), make.clone(), next.clone());
            let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= count {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let (body, properties) = make(n);
                    publish_stored(&channel, &exchange, &routing_key, &body, properties)
                        .await
                        .with_context(|| format!("publish {n}"))?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.context("publisher task")??;
    }
    let elapsed = started.elapsed();
    let _ = channel.close(200, "published".into()).await;
    Ok(elapsed)
}

/// Consumes `queue` with `prefetch` un-acked deliveries at most, acking each one,
/// until `tally` has seen `count` or the queue stays quiet for `idle`. Returns the time
/// from the first delivery to the last ack. `check` vets each message's properties;
/// the number it refused is returned too.
pub async fn consume_acking(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    count: usize,
    tally: &Tally,
    idle: Duration,
    check: impl Fn(&BasicProperties) -> bool,
) -> anyhow::Result<(Duration, u64)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_local: false,
                no_ack: false, // ack each, as a worker does
                exclusive: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await?;
    let mut first: Option<Instant> = None;
    let mut refused = 0u64;
    // Acks in flight while the next deliveries are read: awaiting each ack before taking
    // the next delivery would measure a round trip per message, not the broker.
    let mut acks = FuturesUnordered::new();
    while (tally.total() as usize) < count {
        let next = tokio::select! {
            Some(acked) = acks.next() => {
                acked?;
                continue;
            }
            next = tokio::time::timeout(idle, consumer.next()) => next,
        };
        let delivery = match next {
            Err(_) => break, // quiet for `idle`: whatever is missing is not coming
            Ok(None) => bail!("consumer of {queue} ended"),
            Ok(Some(d)) => d?,
        };
        first.get_or_insert_with(Instant::now);
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        tally.record(&id);
        if !check(&delivery.properties) {
            refused += 1;
        }
        let acker = delivery.acker;
        acks.push(async move { acker.ack(BasicAckOptions { multiple: false }).await });
    }
    while let Some(acked) = acks.next().await {
        acked?;
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    // Closing the channel returns anything un-acked, so the caller's count is honest.
    let _ = channel.close(200, "consumed".into()).await;
    Ok((elapsed, refused))
}

/// Reads a relay header as an unsigned number.
pub fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// Reads a relay header as text.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
