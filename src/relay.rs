//! The relay's core step, shared by the receiver (inline attempt 1) and the workers:
//! attempt one delivery, decide with the policy, and make the outcome durable.

use std::time::Duration;

use tracing::Instrument;

use crate::broker::{Broker, PublishError, Target, Topology};
use crate::config::Config;
use crate::delivery::Downstream;
use crate::envelope::Envelope;
use crate::retry::{DeadLetterReason, Decision, Ladder, Policy};

/// Everything a receiver or worker needs, built once per process.
pub struct Relay {
    /// The validated configuration.
    pub config: Config,
    /// The broker handle (publishing, sessions for consumers).
    pub broker: Broker,
    /// The downstream client; `None` for a queue-first receiver, which never delivers.
    pub downstream: Option<Downstream>,
    /// Attempts and retry ladder.
    pub policy: Policy,
}

/// Where an attempted event ended up, durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The downstream took it.
    Delivered,
    /// It waits in a retry level (confirmed by the broker).
    Retried {
        /// Ladder index.
        level: usize,
        /// The level's delay.
        delay: Duration,
    },
    /// It is in the DLQ (confirmed by the broker).
    DeadLettered(DeadLetterReason),
}

impl Relay {
    /// Builds the relay and starts the broker supervisor.
    pub fn new(config: Config, downstream: Option<Downstream>) -> Self {
        let ladder = Ladder::new(config.backoff_base, config.backoff_max);
        let topology = Topology::new(&config.queue_prefix, &ladder);
        let broker = Broker::start(&config.amqp_url, topology, config.publish_timeout);
        let policy = Policy {
            max_attempts: config.max_attempts,
            ladder,
        };
        Self {
            config,
            broker,
            downstream,
            policy,
        }
    }

    /// The declared topology.
    pub fn topology(&self) -> &Topology {
        self.broker.topology()
    }

    /// Makes the next attempt of `event` within `timeout` (default DELIVERY_TIMEOUT_MS)
    /// and makes its outcome durable. `Err` means nothing was stored: the caller must
    /// not acknowledge the event (503 / no ack).
    pub async fn attempt_and_settle(
        &self,
        mut event: Envelope,
        timeout: Option<Duration>,
    ) -> Result<Settled, PublishError> {
        let span = tracing::info_span!("event", event_id = %event.id, webhook = %event.webhook);
        async move {
            let downstream = self
                .downstream
                .as_ref()
                .expect("delivering commands are built with a downstream");
            let attempt = event.attempts.saturating_add(1);
            let started = std::time::Instant::now();
            let outcome = downstream
                .attempt(
                    &event,
                    attempt,
                    timeout.unwrap_or(self.config.delivery_timeout),
                )
                .await;
            crate::metrics::attempted(&outcome, started.elapsed());
            let decision = self.policy.decide(attempt, &outcome);
            event.record_attempt(attempt, outcome.status(), outcome.error());
            let settled = match decision {
                Decision::Delivered => {
                    tracing::debug!(attempt, status = outcome.status(), "delivered");
                    return Ok(Settled::Delivered);
                }
                Decision::Retry { level, delay } => {
                    self.broker.publish(Target::Retry(level), &event).await?;
                    crate::metrics::retry_scheduled(level, delay);
                    tracing::info!(
                        attempt,
                        status = outcome.status(),
                        error = outcome.error(),
                        retry_in_ms = delay.as_millis() as u64,
                        "attempt failed; scheduled for retry"
                    );
                    Settled::Retried { level, delay }
                }
                Decision::DeadLetter(reason) => {
                    event.dead_letter(reason.as_str());
                    self.broker.publish(Target::Dlq, &event).await?;
                    crate::metrics::dead_lettered(reason.as_str());
                    tracing::warn!(
                        attempt,
                        status = outcome.status(),
                        error = outcome.error(),
                        reason = reason.as_str(),
                        "dead-lettered"
                    );
                    Settled::DeadLettered(reason)
                }
            };
            Ok(settled)
        }
        .instrument(span.clone())
        .await
        .inspect_err(|e: &PublishError| {
            span.in_scope(|| {
                // An outage is logged once by the broker supervisor, not once per event.
                if e.is_connection_loss() {
                    tracing::debug!(error = %e, "could not store the attempt's outcome")
                } else {
                    tracing::warn!(error = %e, "could not store the attempt's outcome")
                }
            })
        })
    }
}
