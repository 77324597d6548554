//! Queue depths for `/metrics`: read from the broker every few seconds on the
//! session's consuming connection (never blocked by an alarm), once more as soon as a
//! session opens so the gauges are filled before the relay first reports ready, and
//! never per scrape. The same reads feed the backlog bound (SPEC §5a `MAX_BACKLOG`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Broker, Session, Topology};

/// How often queue depths are read from the broker (and the recorder's upkeep runs).
pub const DEPTH_REFRESH: Duration = Duration::from_secs(5);
/// How often they are read while `MAX_BACKLOG` depends on them: once a second, never
/// per request.
pub const BACKLOG_REFRESH: Duration = Duration::from_secs(1);

/// Events waiting in `P.work` and the retry levels, as last read from the broker
/// (0 until the first read). Cheap to clone; every clone sees the same value.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<AtomicU64>);

impl Backlog {
    /// Events held at the last read.
    pub fn held(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, held: u64) {
        self.0.store(held, Ordering::Relaxed);
        crate::metrics::backlog(held);
    }

    /// Sets the depth as a broker read would (unit tests of the bound).
    #[cfg(test)]
    pub(crate) fn set_for_test(&self, held: u64) {
        self.set(held);
    }
}
/// Longest one passive declare may take before the round is abandoned.
const PEEK_DEADLINE: Duration = Duration::from_secs(2);

/// Every queue of `topology` with its metrics kind, in ladder order.
fn queues(topology: &Topology) -> Vec<(&str, &'static str)> {
    std::iter::once((topology.work.as_str(), "work"))
        .chain(topology.retry.iter().map(|l| (l.name.as_str(), "retry")))
        .chain(std::iter::once((topology.dlq.as_str(), "dlq")))
        .collect()
}

/// Reads every depth once on `channel`; the backlog (work and retry levels) when every
/// read succeeded, `None` when one failed (the channel is then likely closed and a new
/// one is needed).
async fn read_all(channel: &lapin::Channel, topology: &Topology) -> Option<u64> {
    let mut backlog = 0u64;
    for (name, kind) in queues(topology) {
        match tokio::time::timeout(PEEK_DEADLINE, super::topology::peek(channel, name)).await {
            Ok(Ok(q)) => {
                crate::metrics::queue_depth(name, kind, q.message_count());
                if kind != "dlq" {
                    backlog += u64::from(q.message_count());
                }
            }
            Ok(Err(e)) => {
                // A missing queue closes the channel; the next round opens another.
                tracing::debug!(queue = %name, error = %e, "queue depth refresh failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(queue = %name, "queue depth refresh timed out");
                return None;
            }
        }
    }
    // The gauge too, so it is there from the read made before the first "ready".
    crate::metrics::backlog(backlog);
    Some(backlog)
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

/// Refreshes the queue-depth gauges and `backlog` every `period` ([`DEPTH_REFRESH`], or
/// [`BACKLOG_REFRESH`] under `MAX_BACKLOG`) until `cancel` fires. Also runs the
/// recorder's upkeep, which keeps histogram memory bounded between scrapes.
pub async fn refresh(
    broker: Broker,
    backlog: Backlog,
    period: Duration,
    cancel: CancellationToken,
) {
    // The channel is reused while its session lives; a new session gets a new channel.
    let mut current: Option<(Arc<Session>, lapin::Channel)> = None;
    let mut tick = tokio::time::interval(period);
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
        match read_all(channel, broker.topology()).await {
            Some(held) => backlog.set(held),
            None => current = None,
        }
    }
    if let Some((_, channel)) = current {
        let _ = tokio::time::timeout(PEEK_DEADLINE, channel.close(200, "stopping".into())).await;
    }
}
