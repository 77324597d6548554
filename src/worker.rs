//! Workers (SPEC §3, §5): consume `P.work`, make one attempt per delivery, settle the
//! outcome (retry level or DLQ, confirmed) and only then ack, on the delivery's own
//! channel. A settle publish that fails is retried with backoff, never by attempting
//! the downstream again and never by requeueing the delivery in a loop.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::broker::Session;
use crate::broker::episode::Episode;
use crate::envelope::Envelope;
use crate::relay::Relay;

/// First and last wait between tries of an outcome publish.
const SETTLE_RETRY_MIN: Duration = Duration::from_millis(100);
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest `basic.cancel` may take at shutdown (a silent broker never answers).
const CANCEL_DEADLINE: Duration = Duration::from_secs(1);

/// Outcome publishes being retried, logged once per episode.
static SETTLE_TROUBLE: Episode =
    Episode::new("outcome publishes failing; workers keep their deliveries and retry");

/// Consumes until `cancel` fires, then waits for in-flight deliveries up to the
/// shutdown grace. Deliveries still running then are abandoned un-acked: the broker
/// redelivers them once the connection closes.
pub async fn run(relay: Arc<Relay>, cancel: CancellationToken) {
    let tracker = TaskTracker::new();
    let mut sessions = relay.broker.subscribe();
    // Dropping a lapin channel closes it, which would hand in-flight deliveries back to
    // the broker before they are acked: the last channel lives until the tracker is done.
    let mut _last_channel: Option<Channel> = None;
    'sessions: loop {
        // Wait for a usable session (or the stop signal).
        let session = tokio::select! {
            _ = cancel.cancelled() => break 'sessions,
            s = sessions.wait_for(|s| s.is_some()) => match s {
                Ok(s) => s.clone().expect("waited for Some"),
                Err(_) => break 'sessions,
            },
        };
        let (channel, mut consumer) = match start_consumer(&relay, &session).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "could not start consuming; waiting for a new broker session");
                relay.broker.report_broken(&session);
                wait_for_new_session(&mut sessions, &session, &cancel).await;
                continue;
            }
        };
        tracing::info!(queue = %relay.topology().work, prefetch = relay.config.worker_concurrency, "worker consuming");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Stop intake; in-flight deliveries keep their channel for their ack.
                    let _ = tokio::time::timeout(
                        CANCEL_DEADLINE,
                        channel.basic_cancel(consumer.tag(), BasicCancelOptions { nowait: false }),
                    )
                    .await;
                    _last_channel = Some(channel);
                    break 'sessions;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (relay, channel, cancel) = (relay.clone(), channel.clone(), cancel.clone());
                        tracker.spawn(async move { handle(&relay, delivery, &channel, &cancel).await });
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "consumer stream failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        // The consumer ended without a stop signal: the channel or connection broke.
        relay.broker.report_broken(&session);
        wait_for_new_session(&mut sessions, &session, &cancel).await;
    }
    tracker.close();
    if tokio::time::timeout(relay.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tracker.len(),
            "shutdown grace elapsed; leaving unfinished deliveries un-acked for redelivery"
        );
    }
}

async fn wait_for_new_session(
    sessions: &mut tokio::sync::watch::Receiver<Option<Arc<Session>>>,
    old: &Arc<Session>,
    cancel: &CancellationToken,
) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = sessions.wait_for(|s| s.as_ref().is_none_or(|s| !Arc::ptr_eq(s, old))) => {}
    }
}

async fn start_consumer(
    relay: &Relay,
    session: &Session,
) -> Result<(Channel, Consumer), lapin::Error> {
    // The consuming connection: acks keep flowing while the broker blocks publishers.
    let channel = session.consumer_connection().create_channel().await?;
    // The prefetch is the concurrency: that many deliveries in flight, no more.
    channel
        .basic_qos(
            relay.config.worker_concurrency,
            BasicQosOptions { global: false },
        )
        .await?;
    let consumer = channel
        .basic_consume(
            relay.topology().work.as_str().into(),
            "".into(), // let the broker name it; several workers share the queue
            BasicConsumeOptions {
                no_local: false,
                no_ack: false, // ack only after the outcome is settled
                exclusive: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// How one delivery's settle loop ended.
enum Settle {
    /// Stored (or delivered): ack it.
    Done,
    /// The delivery's channel is gone: the broker redelivers it; publish nothing more.
    ChannelLost,
    /// Shutdown while the publish kept failing: hand it back for redelivery.
    Stopping,
}

async fn handle(
    relay: &Relay,
    delivery: lapin::message::Delivery,
    channel: &Channel,
    cancel: &CancellationToken,
) {
    let event = Envelope::from_amqp(&delivery.properties, delivery.data);
    let span = crate::relay::attempt_span(&event);
    settle_delivery(relay, delivery.acker, event, channel, cancel)
        .instrument(span)
        .await
}

async fn settle_delivery(
    relay: &Relay,
    acker: lapin::Acker,
    event: Envelope,
    channel: &Channel,
    cancel: &CancellationToken,
) {
    // Held here, un-attempted, while the breaker is open or the adaptive limit is
    // reached: the broker sends no more than the prefetch meanwhile, so the rest of the
    // backlog waits in the queues. Stopping while held leaves the delivery un-acked for
    // redelivery, never attempted.
    let Some(ticket) = relay.protect.admit(cancel).await else {
        return;
    };
    // Held through a channel loss (a broker restart during an outage): the broker has
    // redelivered it elsewhere, so attempting it here would only make a duplicate.
    if !channel.status().connected() {
        return;
    }
    let attempted = relay.attempt(event, None, ticket).await;
    let mut wait = SETTLE_RETRY_MIN;
    let settle = loop {
        // An outcome is published only while the delivery's own channel is open: once
        // it is gone the broker hands the event to another consumer, and a second copy
        // must not walk the ladder beside it.
        if !channel.status().connected() {
            break Settle::ChannelLost;
        }
        match relay.settle(&attempted).await {
            Ok(_) => {
                SETTLE_TROUBLE.calm();
                break Settle::Done;
            }
            Err(e) => {
                SETTLE_TROUBLE.strike(&e);
                crate::metrics::settle_retried();
                tracing::debug!(error = %e, retry_in_ms = wait.as_millis() as u64, "outcome not stored; retrying the publish");
            }
        }
        let jittered = wait.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = cancel.cancelled() => break Settle::Stopping,
            _ = tokio::time::sleep(jittered) => {}
        }
        wait = (wait * 2).min(SETTLE_RETRY_MAX);
    };
    let result = match settle {
        Settle::Done => acker.ack(BasicAckOptions { multiple: false }).await,
        Settle::ChannelLost => {
            tracing::debug!(
                "delivery's channel closed before its outcome was stored; the broker redelivers it"
            );
            return;
        }
        // `reject`, not `nack`: RabbitMQ 4.3+ counts only rejects toward the work
        // queue's delivery limit, which must keep bounding a delivery handed back again
        // and again.
        Settle::Stopping => acker.reject(BasicRejectOptions { requeue: true }).await,
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message (a duplicate, never a
        // loss). Not a success: counted, so a flap's duplicates can be told apart.
        crate::metrics::ack_failed();
        crate::relay::in_event_span(
            &attempted.event,
            || tracing::info!(error = %e, "could not acknowledge the delivery; the broker will redeliver it"),
        );
    }
}
