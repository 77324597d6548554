//! Queue depths of the topology over plain AMQP (passive declares), for
//! `topology status` and the demo script: no management plugin needed.

use lapin::Connection;
use serde::Serialize;

use super::Topology;

/// Where a queue sits in the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// `P.work`: events waiting for an attempt.
    Work,
    /// A retry level: events waiting out their backoff.
    Retry,
    /// `P.dlq`: events that will not be retried.
    Dlq,
}

impl QueueKind {
    /// The label printed in the first column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Work => "work",
            Self::Retry => "retry",
            Self::Dlq => "dlq",
        }
    }
}

/// One queue's depth as the broker reports it to a passive declare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Where the queue sits in the flow.
    pub kind: QueueKind,
    /// Full queue name.
    pub name: String,
    /// Ready messages (deliveries a consumer holds un-acked are not counted);
    /// `None` when the queue does not exist.
    pub messages: Option<u32>,
    /// Active consumers; `None` when the queue does not exist.
    pub consumers: Option<u32>,
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The broker could not be reached or closed the connection; check `AMQP_URL`.
    #[error("broker unavailable")]
    Broker(#[from] lapin::Error),
}

/// Reads the depth of every queue of `topology`, in ladder order.
pub async fn queue_depths(
    amqp_urls: &[String],
    topology: &Topology,
) -> Result<Vec<QueueDepth>, StatusError> {
    let connection = super::connect_any(amqp_urls, "webhook-relay status").await?;
    let result = read_depths(&connection, topology).await;
    let _ = connection.close(200, "status read".into()).await;
    result
}

async fn read_depths(
    connection: &Connection,
    topology: &Topology,
) -> Result<Vec<QueueDepth>, StatusError> {
    let mut channel = connection.create_channel().await?;
    let mut out = Vec::new();
    for q in topology.queues() {
        let kind = kind_of(topology, &q.name);
        let declared = super::topology::peek(&channel, &q.name).await;
        let (messages, consumers) = match declared {
            Ok(info) => (Some(info.message_count()), Some(info.consumer_count())),
            Err(_) if connection.status().connected() => {
                // NOT_FOUND closes the channel, not the connection: carry on with a new one.
                channel = connection.create_channel().await?;
                (None, None)
            }
            Err(e) => return Err(e.into()),
        };
        out.push(QueueDepth {
            kind,
            name: q.name,
            messages,
            consumers,
        });
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(out)
}

fn kind_of(topology: &Topology, name: &str) -> QueueKind {
    if name == topology.work {
        QueueKind::Work
    } else if name == topology.dlq {
        QueueKind::Dlq
    } else {
        QueueKind::Retry
    }
}

/// The human (and `awk`) readable table: `kind queue messages consumers`, one queue
/// a line after a header; a missing queue shows `missing` in both number columns.
pub fn table(depths: &[QueueDepth]) -> String {
    let width = depths
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(0)
        .max("queue".len());
    let num = |n: Option<u32>| n.map_or_else(|| "missing".to_owned(), |n| n.to_string());
    let mut out = format!(
        "{:<5}  {:<width$}  {:>8}  {:>9}\n",
        "kind", "queue", "messages", "consumers"
    );
    for d in depths {
        out.push_str(&format!(
            "{:<5}  {:<width$}  {:>8}  {:>9}\n",
            d.kind.as_str(),
            d.name,
            num(d.messages),
            num(d.consumers)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::retry::Ladder;

    #[test]
    fn kinds_follow_the_topology() {
        let t = Topology::new(
            "p",
            &Ladder::new(Duration::from_millis(20), Duration::from_millis(200)),
        );
        let kinds: Vec<QueueKind> = t.queues().iter().map(|q| kind_of(&t, &q.name)).collect();
        assert_eq!(kinds.first(), Some(&QueueKind::Work));
        assert_eq!(kinds.last(), Some(&QueueKind::Dlq));
        assert!(
            kinds[1..kinds.len() - 1]
                .iter()
                .all(|k| *k == QueueKind::Retry)
        );
    }

    #[test]
    fn table_columns_split_on_whitespace() {
        let rows = [
            QueueDepth {
                kind: QueueKind::Work,
                name: "webhooks.work".into(),
                messages: Some(3),
                consumers: Some(2),
            },
            QueueDepth {
                kind: QueueKind::Dlq,
                name: "webhooks.dlq".into(),
                messages: None,
                consumers: None,
            },
        ];
        let text = table(&rows);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0], ["kind", "queue", "messages", "consumers"]);
        assert_eq!(lines[1], ["work", "webhooks.work", "3", "2"]);
        assert_eq!(lines[2], ["dlq", "webhooks.dlq", "missing", "missing"]);
    }
}
