//! Workers (SPEC §3, §5): consume `P.work`, make one attempt per delivery, settle the
//! outcome (retry level or DLQ, confirmed) and only then ack.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Session;
use crate::envelope::Envelope;
use crate::relay::Relay;

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
                    let _ = channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions { nowait: false })
                        .await;
                    _last_channel = Some(channel);
                    break 'sessions;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let relay = relay.clone();
                        tracker.spawn(async move { handle(&relay, delivery).await });
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
    let channel = session.connection().create_channel().await?;
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

async fn handle(relay: &Relay, delivery: lapin::message::Delivery) {
    let event = Envelope::from_amqp(&delivery.properties, delivery.data);
    let span = tracing::info_span!("event", event_id = %event.id, webhook = %event.webhook);
    let settled = relay.attempt_and_settle(event, None).await;
    let result = if settled.is_ok() {
        delivery
            .acker
            .ack(BasicAckOptions { multiple: false })
            .await
    } else {
        // Not settled (publish failed): hand it back for another worker or a later try.
        delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
    };
    if let Err(e) = result {
        // The channel is gone; the broker redelivers the message (a duplicate, never a loss).
        let _in_event = span.enter();
        tracing::debug!(error = %e, "could not ack/nack; the message will be redelivered");
    }
}
