//! Queue depths for `/metrics`: read from the broker every few seconds on the
//! session's consuming connection (never blocked by an alarm), once more as soon as a
//! session opens so the gauges are filled before the relay first reports ready, and
//! never per scrape.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Broker, Session, Topology};

/// How often queue depths are read from the broker (and the recorder's upkeep runs).
pub const DEPTH_REFRESH: Duration = Duration::from_secs(5);
/// Longest one passive declare may take before the round is abandoned.
const PEEK_DEADLINE: Duration = Duration::from_secs(2);

/// Every queue of `topology` with its metrics kind, in ladder order.
fn queues(topology: &Topology) -> Vec<(&str, &'static str)> {
    std::iter::once((topology.work.as_str(), "work"))
        .chain(topology.retry.iter().map(|l| (l.name.as_str(), "retry")))
        .chain(std::iter::once((topology.dlq.as_str(), "dlq")))
        .collect()
}

/// Reads every depth once on `channel`; false when a read failed (the channel is then
/// likely closed and a new one is needed).
async fn read_all(channel: &lapin::Channel, topology: &Topology) -> bool {
    for (name, kind) in queues(topology) {
        match tokio::time::timeout(PEEK_DEADLINE, super::topology::peek(channel, name)).await {
            Ok(Ok(q)) => crate::metrics::queue_depth(name, kind, q.message_count()),
            Ok(Err(e)) => {
                // A missing queue closes the channel; the next round opens another.
                tracing::debug!(queue = %name, error = %e, "queue depth refresh failed");
                return false;
            }
            Err(_) => {
                tracing::debug!(queue = %name, "queue depth refresh timed out");
                return false;
            }
        }
    }
    true
}

/// One round on a channel of its own, for a session that just opened.
pub(super) async fn refresh_once(session: &Session, topology: &Topology) {
    let Ok(Ok(channel)) = tokio::time::timeout(
        PEEK_DEADLINE,
        session.consumer_connection().create_channel(),
    )
    .await
    else {
        return;
    };
    read_all(&channel, topology).await;
    let _ = tokio::time::timeout(PEEK_DEADLINE, channel.close(200, "depths read".into())).await;
}

/// Refreshes the queue-depth gauges every [`DEPTH_REFRESH`] until `cancel` fires. Also
/// runs the recorder's upkeep, which keeps histogram memory bounded between scrapes.
pub async fn refresh(broker: Broker, cancel: CancellationToken) {
    // The channel is reused while its session lives; a new session gets a new channel.
    let mut current: Option<(Arc<Session>, lapin::Channel)> = None;
    let mut tick = tokio::time::interval(DEPTH_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        crate::metrics::upkeep();
        let Some(session) = broker.session() else {
            current = None;
            continue;
        };
        if !current
            .as_ref()
            .is_some_and(|(s, ch)| Arc::ptr_eq(s, &session) && ch.status().connected())
        {
            match tokio::time::timeout(
                PEEK_DEADLINE,
                session.consumer_connection().create_channel(),
            )
            .await
            {
                Ok(Ok(ch)) => current = Some((session.clone(), ch)),
                _ => {
                    tracing::debug!("queue depth refresh: no channel");
                    current = None;
                    continue;
                }
            }
        }
        let Some((_, channel)) = &current else {
            continue;
        };
        if !read_all(channel, broker.topology()).await {
            current = None;
        }
    }
    if let Some((_, channel)) = current {
        let _ = tokio::time::timeout(PEEK_DEADLINE, channel.close(200, "stopping".into())).await;
    }
}
