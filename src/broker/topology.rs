//! The relay's exchange and queues (SPEC §2), described once and used both to declare
//! them on the broker and to export them as RabbitMQ definitions.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::retry::Ladder;
pub use crate::retry::human_delay;

/// Redeliveries after which the broker itself dead-letters a `work` message (one that
/// keeps crashing or stranding its consumer). Explicit, so RabbitMQ 3.x (no default)
/// and 4.x (default 20, then *drop* without a dead-letter target) behave alike.
pub const WORK_DELIVERY_LIMIT: i64 = 20;

/// Delivery limit of the DLQ: never reached, so inspecting the DLQ (which returns
/// messages to it) can never make the broker drop what it holds. A large explicit
/// value rather than -1 because RabbitMQ 3.x refuses negative limits; 4.x reads both
/// the same way.
pub const DLQ_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// A queue argument value, convertible to AMQP and to definitions JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    /// A string argument.
    Str(String),
    /// An integer argument.
    Int(i64),
}

/// One queue of the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Full queue name.
    pub name: String,
    /// Declaration arguments, in a stable order.
    pub args: Vec<(&'static str, ArgValue)>,
}

impl QueueSpec {
    /// The arguments as an AMQP field table.
    pub fn field_table(&self) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in &self.args {
            let v = match v {
                ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
            };
            t.insert((*k).into(), v);
        }
        t
    }
}

/// One rung of the retry ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLevel {
    /// Queue name, e.g. `webhooks.retry.03-8s`.
    pub name: String,
    /// How long a message waits in it.
    pub delay: Duration,
}

/// Names and shapes of everything the relay declares for one `QUEUE_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The work exchange and queue name (`P.work`); the binding key is the same name.
    pub work: String,
    /// The terminal dead-letter queue (`P.dlq`).
    pub dlq: String,
    /// The retry levels in ladder order.
    pub retry: Vec<RetryLevel>,
}

impl Topology {
    /// The topology for `prefix` and the configured ladder.
    pub fn new(prefix: &str, ladder: &Ladder) -> Self {
        let retry = ladder
            .levels()
            .iter()
            .enumerate()
            .map(|(i, &delay)| RetryLevel {
                name: format!("{prefix}.retry.{:02}-{}", i + 1, human_delay(delay)),
                delay,
            })
            .collect();
        Self {
            work: format!("{prefix}.work"),
            dlq: format!("{prefix}.dlq"),
            retry,
        }
    }

    /// The `QUEUE_PREFIX` every name starts with.
    pub fn prefix(&self) -> &str {
        self.work
            .strip_suffix(".work")
            .expect("the work name is built as <prefix>.work")
    }

    /// Every queue with its arguments: work, the retry levels, then the DLQ.
    pub fn queues(&self) -> Vec<QueueSpec> {
        let quorum = ("x-queue-type", ArgValue::Str("quorum".into()));
        // At-least-once dead-lettering keeps a message in its source queue until the
        // target confirmed it; it requires reject-publish overflow.
        let at_least_once = (
            "x-dead-letter-strategy",
            ArgValue::Str("at-least-once".into()),
        );
        let reject_publish = ("x-overflow", ArgValue::Str("reject-publish".into()));

        let mut out = vec![QueueSpec {
            name: self.work.clone(),
            args: vec![
                quorum.clone(),
                ("x-dead-letter-exchange", ArgValue::Str(String::new())),
                ("x-dead-letter-routing-key", ArgValue::Str(self.dlq.clone())),
                at_least_once.clone(),
                reject_publish.clone(),
                ("x-delivery-limit", ArgValue::Int(WORK_DELIVERY_LIMIT)),
            ],
        }];
        out.extend(self.retry.iter().map(|level| QueueSpec {
            name: level.name.clone(),
            args: vec![
                quorum.clone(),
                (
                    "x-message-ttl",
                    ArgValue::Int(level.delay.as_millis() as i64),
                ),
                ("x-dead-letter-exchange", ArgValue::Str(self.work.clone())),
                (
                    "x-dead-letter-routing-key",
                    ArgValue::Str(self.work.clone()),
                ),
                at_least_once.clone(),
                reject_publish.clone(),
            ],
        }));
        out.push(QueueSpec {
            name: self.dlq.clone(),
            args: vec![
                quorum,
                ("x-delivery-limit", ArgValue::Int(DLQ_DELIVERY_LIMIT)),
            ],
        });
        out
    }

    /// Declares the exchange, every queue and the work binding. Idempotent; fails with
    /// the broker's `PRECONDITION_FAILED` if a queue exists with other arguments.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .exchange_declare(
                self.work.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: false,
                    durable: true, // survives a broker restart
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                },
                FieldTable::default(),
            )
            .await?;
        for q in self.queues() {
            channel
                .queue_declare(
                    q.name.as_str().into(),
                    QueueDeclareOptions {
                        passive: false,
                        durable: true, // quorum queues must be durable
                        exclusive: false,
                        auto_delete: false,
                        nowait: false,
                    },
                    q.field_table(),
                )
                .await?;
        }
        channel
            .queue_bind(
                self.work.as_str().into(),
                self.work.as_str().into(),
                self.work.as_str().into(),
                QueueBindOptions { nowait: false },
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Deletes everything `declare` made, messages included (tests and teardown).
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for q in self.queues() {
            channel
                .queue_delete(
                    q.name.as_str().into(),
                    QueueDeleteOptions {
                        if_unused: false,
                        if_empty: false,
                        nowait: false,
                    },
                )
                .await?;
        }
        channel
            .exchange_delete(
                self.work.as_str().into(),
                ExchangeDeleteOptions {
                    if_unused: false,
                    nowait: false,
                },
            )
            .await
    }
}

/// Looks at a queue without creating or changing it (a passive declare): its message
/// and consumer counts. A missing queue fails with NOT_FOUND, which closes the channel.
pub async fn peek(channel: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true, // read only: never create a queue with the wrong arguments
                durable: true,
                exclusive: false,
                auto_delete: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_follow_the_spec() {
        let t = Topology::new(
            "webhooks",
            &Ladder::new(Duration::from_secs(1), Duration::from_secs(3600)),
        );
        let names: Vec<&str> = t.retry.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.first(), Some(&"webhooks.retry.01-2s"));
        assert_eq!(names.get(1), Some(&"webhooks.retry.02-4s"));
        assert_eq!(names.last(), Some(&"webhooks.retry.12-1h"));
        assert_eq!(t.work, "webhooks.work");
        assert_eq!(t.dlq, "webhooks.dlq");
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, names, "the management UI sorts by name");
    }

    #[test]
    fn test_settings_use_milliseconds() {
        let t = Topology::new(
            "t",
            &Ladder::new(Duration::from_millis(20), Duration::from_millis(200)),
        );
        assert_eq!(t.retry[0].name, "t.retry.01-40ms");
        assert_eq!(t.retry.last().unwrap().name, "t.retry.04-200ms");
    }
}
