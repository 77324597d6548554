//! The relay's core step, shared by the receiver (inline attempt 1) and the workers:
//! attempt one delivery, decide with the policy, and make the outcome durable.

use std::time::Duration;

use tracing::{Instrument, Span};

use crate::broker::{Broker, PublishError, Target, Topology};
use crate::config::Config;
use crate::delivery::Downstream;
use crate::envelope::Envelope;
use crate::protect::{Protect, Ticket};
use crate::retry::{DeadLetterReason, Decision, Ladder, Policy};
use crate::telemetry::event_span;

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
    /// The receiver's intake budget (SPEC §4.5).
    pub intake: crate::intake::Intake,
    /// What every attempt must pass first (SPEC §5a).
    pub protect: Protect,
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
        let broker = Broker::start(config.amqp_url.urls(), topology, config.publish_timeout);
        let policy = Policy {
            max_attempts: config.max_attempts,
            ladder,
        };
        let protect = Protect::new(
            config.protect,
            config.worker_concurrency,
            Default::default(),
        );
        Self {
            intake: crate::intake::Intake::new(&config.intake),
            config,
            broker,
            downstream,
            policy,
            protect,
        }
    }

    /// The declared topology.
    pub fn topology(&self) -> &Topology {
        self.broker.topology()
    }

    /// Makes the next attempt of `event` within `timeout` (default DELIVERY_TIMEOUT_MS)
    /// and decides its fate; `ticket` (from [`Protect`]) hears how it went. The event
    /// comes back with the attempt recorded (and the dead-letter reason set), ready for
    /// [`Relay::settle`]; nothing is stored yet.
    pub async fn attempt(
        &self,
        mut event: Envelope,
        timeout: Option<Duration>,
        ticket: Ticket,
    ) -> Attempted {
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
        let took = started.elapsed();
        ticket.finish(&outcome, took);
        crate::metrics::attempted(outcome.label(), outcome.status(), took);
        let decision = self.policy.decide(attempt, &outcome);
        event.record_attempt(attempt, outcome.status(), outcome.error());
        if let Decision::DeadLetter(reason) = decision {
            event.dead_letter(reason.as_str());
        }
        Attempted {
            event,
            decision,
            attempt,
            status: outcome.status(),
        }
    }

    /// Makes the outcome of an attempt durable: nothing for a delivery, a confirmed
    /// publish to the retry level or the DLQ otherwise. `Err` means nothing was stored;
    /// the caller may call it again with the same `attempted` (a worker does, with
    /// backoff) or give up (the receiver answers 503).
    pub async fn settle(&self, attempted: &Attempted) -> Result<Settled, PublishError> {
        let Attempted {
            event,
            decision,
            attempt,
            status,
        } = attempted;
        let error = event.last_error.as_deref();
        match *decision {
            Decision::Delivered => {
                tracing::debug!(attempt, status, "delivered");
                Ok(Settled::Delivered)
            }
            Decision::Retry { level, delay } => {
                self.broker.publish(Target::Retry(level), event).await?;
                crate::metrics::retry_scheduled(level, delay);
                // The first failure of a spell at info, the others at debug with a
                // summary every few seconds: a downstream that is down must not cost a
                // log line per event.
                let retry_in_ms = delay.as_millis() as u64;
                if crate::retry_log::note_failed(*status, error) {
                    in_event_span(event, || {
                        tracing::info!(
                            attempt,
                            status,
                            error,
                            retry_in_ms,
                            "attempt failed; scheduled for retry"
                        )
                    });
                } else {
                    tracing::debug!(
                        attempt,
                        status,
                        error,
                        retry_in_ms,
                        "attempt failed; scheduled for retry"
                    );
                }
                Ok(Settled::Retried { level, delay })
            }
            Decision::DeadLetter(reason) => {
                self.broker.publish(Target::Dlq, event).await?;
                crate::metrics::dead_lettered(reason.as_str());
                in_event_span(event, || {
                    tracing::warn!(
                        attempt,
                        status,
                        error,
                        reason = reason.as_str(),
                        "dead-lettered"
                    )
                });
                Ok(Settled::DeadLettered(reason))
            }
        }
    }

    /// Attempt and one settle, as the receiver's inline attempt 1 does. `Err` means
    /// nothing was stored: the caller must not acknowledge the event (503). Publish
    /// failures are logged once per episode by the broker, not here.
    pub async fn attempt_and_settle(
        &self,
        event: Envelope,
        timeout: Option<Duration>,
        ticket: Ticket,
    ) -> Result<Settled, PublishError> {
        let span = attempt_span(&event);
        async move {
            let attempted = self.attempt(event, timeout, ticket).await;
            self.settle(&attempted).await.inspect_err(
                |e| tracing::debug!(error = %e, "could not store the attempt's outcome"),
            )
        }
        .instrument(span)
        .await
    }
}

/// The span an attempt of `event` runs in. A span's fields are formatted when it is
/// made, about 5,000 instructions of a healthy inline event's 85,000; and at the
/// default level an attempt writes no line unless it fails. So the span is made up
/// front only while debug lines are on; otherwise none, and each line written at info
/// or above is put in the event's span where it is written ([`in_event_span`]).
pub fn attempt_span(event: &Envelope) -> Span {
    if tracing::enabled!(tracing::Level::DEBUG) {
        event_span(&event.id, &event.webhook)
    } else {
        Span::none()
    }
}

/// Writes `line` inside `event`'s span: the one the attempt runs in, or, when it runs
/// in none ([`attempt_span`]), one made for this line.
pub fn in_event_span(event: &Envelope, line: impl FnOnce()) {
    if Span::current().is_none() {
        event_span(&event.id, &event.webhook).in_scope(line)
    } else {
        line()
    }
}

/// An attempt made, its outcome decided, not yet made durable.
#[derive(Debug)]
pub struct Attempted {
    /// The event with the attempt recorded in its headers.
    pub event: Envelope,
    /// What the policy decided.
    pub decision: Decision,
    /// The attempt's number (1-based).
    pub attempt: u32,
    /// The downstream's status, if it answered.
    pub status: Option<u16>,
}
