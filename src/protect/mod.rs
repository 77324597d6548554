//! Protecting the downstream (SPEC §5a): what an attempt must pass before it is made.
//! The circuit breaker (opt-in) admits nothing while the downstream is down but one
//! probe now and then; the adaptive limit bounds a worker's attempts in flight; the
//! rate limit (`DOWNSTREAM_MAX_RPS`) spaces the attempts of the whole process, inline
//! and worker together; the backlog bound turns new events away while the queues hold
//! too many. Each attempt gets a [`Ticket`] and reports its outcome through it.

pub mod breaker;
pub mod limit;

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::depths::Backlog;
use crate::delivery::Outcome;
use breaker::{Admit, Breaker, BreakerSettings, Change, State};
use limit::{Gate, Permit, Signal};

/// The §5a settings, validated by `config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtectSettings {
    /// `ADAPTIVE_CONCURRENCY`: a worker's attempts in flight follow the downstream's
    /// capacity (between 1 and `WORKER_CONCURRENCY`) instead of the prefetch alone.
    pub adaptive_concurrency: bool,
    /// `DOWNSTREAM_MAX_RPS`: attempts per second per process, when set.
    pub max_rps: Option<NonZeroU32>,
    /// `CIRCUIT_BREAKER` with the `BREAKER_*` values; `None` when off (SPEC §3 exactly).
    pub breaker: Option<BreakerSettings>,
    /// `MAX_BACKLOG`: events in `P.work` and the retry levels past which new events
    /// are answered 503.
    pub max_backlog: Option<u64>,
}

impl Default for ProtectSettings {
    fn default() -> Self {
        Self {
            adaptive_concurrency: true,
            max_rps: None,
            breaker: None,
            max_backlog: None,
        }
    }
}

/// The guards of one process, shared by its receiver and workers.
pub struct Protect {
    /// State the tickets report back to.
    shared: Arc<Shared>,
    /// The spacing of attempts, when `DOWNSTREAM_MAX_RPS` is set.
    rate: Option<DefaultDirectRateLimiter>,
    /// Queue depths as last read from the broker.
    backlog: Backlog,
    /// `MAX_BACKLOG`.
    max_backlog: Option<u64>,
}

struct Shared {
    /// The adaptive limit of worker attempts; `None` with `ADAPTIVE_CONCURRENCY=false`.
    gate: Option<Arc<Gate>>,
    /// The breaker, when `CIRCUIT_BREAKER=true`.
    circuit: Option<Circuit>,
}

struct Circuit {
    /// The state machine, with the settings it was built from.
    breaker: Mutex<Breaker>,
    /// For the log line of an opening.
    settings: BreakerSettings,
    /// Woken on every state change, so held deliveries look again.
    changed: Notify,
}

impl Protect {
    /// The guards for a process whose workers keep up to `worker_concurrency` deliveries.
    pub fn new(settings: ProtectSettings, worker_concurrency: u16, backlog: Backlog) -> Self {
        let gate = if settings.adaptive_concurrency {
            Some(Gate::new(worker_concurrency))
        } else {
            crate::metrics::concurrency_limit(usize::from(worker_concurrency));
            None
        };
        let circuit = settings.breaker.map(|s| {
            crate::metrics::breaker_state(State::Closed.label(), false);
            Circuit {
                breaker: Mutex::new(Breaker::new(s, Instant::now())),
                settings: s,
                changed: Notify::new(),
            }
        });
        // A burst of one per 50 attempts/s: any one-second window sees at most the rate
        // plus 2% (the attempts are spaced, not let through in clumps).
        let rate = settings.max_rps.map(|rps| {
            let burst = NonZeroU32::new((rps.get() / 50).max(1)).expect("at least one");
            RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
        });
        Self {
            shared: Arc::new(Shared { gate, circuit }),
            rate,
            backlog,
            max_backlog: settings.max_backlog,
        }
    }

    /// The adaptive concurrency limit now; `None` when adaptive concurrency is off.
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.shared.gate.as_ref().map(|g| g.limit())
    }

    /// The breaker's state; `None` when the breaker is off.
    pub fn breaker_state(&self) -> Option<State> {
        self.shared
            .circuit
            .as_ref()
            .map(|c| c.breaker.lock().expect("breaker lock").state())
    }

    /// The queue depths the backlog bound reads.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// `Some(held)` when `P.work` and the retry levels hold `MAX_BACKLOG` events or more:
    /// one more would exceed it.
    pub fn backlog_full(&self) -> Option<u64> {
        let max = self.max_backlog?;
        let held = self.backlog.held();
        (held >= max).then_some(held)
    }

    /// For a worker's delivery: waits until it may be attempted (the breaker closed or
    /// this delivery chosen as the probe, room under the adaptive limit, the rate).
    /// `None` when `cancel` fired first: the delivery was not attempted.
    pub async fn admit(&self, cancel: &CancellationToken) -> Option<Ticket> {
        loop {
            let probe = match &self.shared.circuit {
                None => false,
                Some(c) => c.wait_admit(cancel).await?,
            };
            let mut ticket = Ticket::new(self.shared.clone(), probe);
            if let Some(gate) = &self.shared.gate {
                ticket.permit = Some(tokio::select! {
                    p = gate.acquire() => p,
                    _ = cancel.cancelled() => return None,
                });
            }
            // The breaker may have opened while this delivery waited for room.
            if !probe && self.breaker_state().is_some_and(|s| s != State::Closed) {
                continue;
            }
            if let Some(rate) = &self.rate {
                tokio::select! {
                    _ = rate.until_ready() => {}
                    _ = cancel.cancelled() => return None,
                }
            }
            return Some(ticket);
        }
    }

    /// For the receiver's inline attempt: a ticket now, or `None` when no attempt may
    /// be made now (the breaker is open, the rate is used up). The event is then queued
    /// to `P.work` instead: the sender is never made to wait.
    pub fn admit_inline(&self) -> Option<Ticket> {
        // The rate first: a probe taken and then refused a slot would push the next
        // probe back by a whole interval. A slot taken while the breaker is open is
        // one no worker wanted anyway.
        if let Some(rate) = &self.rate
            && rate.check().is_err()
        {
            return None;
        }
        let probe = match &self.shared.circuit {
            None => false,
            Some(c) => match c.try_admit() {
                Admit::Attempt => false,
                Admit::Probe => true,
                Admit::Wait { .. } => return None,
            },
        };
        Some(Ticket::new(self.shared.clone(), probe))
    }
}

impl Shared {
    /// Logs and exposes a state change once, and wakes the held deliveries.
    fn announce(&self, change: Option<Change>) {
        let (Some(change), Some(circuit)) = (change, &self.circuit) else {
            return;
        };
        match change {
            Change::Opened { failed, attempts } => {
                tracing::warn!(
                    failed,
                    attempts,
                    probe_ms = circuit.settings.probe.as_millis() as u64,
                    "downstream failing: circuit breaker open; events wait in the queues, attempts counted for none, one probe at a time"
                );
                crate::metrics::breaker_state(State::Open.label(), true);
            }
            Change::Probing => {
                tracing::debug!("circuit breaker half-open: probing the downstream");
                crate::metrics::breaker_state(State::HalfOpen.label(), true);
            }
            Change::Reopened { next_probe } => {
                tracing::debug!(
                    next_probe_ms = next_probe.as_millis() as u64,
                    "probe failed; circuit breaker stays open"
                );
                crate::metrics::breaker_state(State::Open.label(), true);
            }
            Change::Closed => {
                // The backlog drains from one attempt in flight, doubling per round trip.
                if let Some(gate) = &self.gate {
                    gate.restart();
                }
                tracing::info!(
                    "probe succeeded: circuit breaker closed; draining the backlog at the adaptive limit"
                );
                crate::metrics::breaker_state(State::Closed.label(), true);
            }
        }
        circuit.changed.notify_waiters();
    }
}

impl Circuit {
    fn try_admit(&self) -> Admit {
        let (admit, change) = self
            .breaker
            .lock()
            .expect("breaker lock")
            .admit(Instant::now());
        if change.is_some() {
            // Only `Probing` comes from `admit`; nothing to wake.
            crate::metrics::breaker_state(State::HalfOpen.label(), true);
            tracing::debug!("circuit breaker half-open: probing the downstream");
        }
        admit
    }

    /// Waits until an attempt may be made; `Some(true)` for the probe.
    async fn wait_admit(&self, cancel: &CancellationToken) -> Option<bool> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_admit() {
                Admit::Attempt => return Some(false),
                Admit::Probe => return Some(true),
                Admit::Wait { until } => {
                    // A probe in flight ends with a state change; a day is "never".
                    let until =
                        until.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = cancel.cancelled() => return None,
                    }
                }
            }
        }
    }
}

/// Leave to make one attempt; report its outcome with [`Ticket::finish`]. Dropped
/// unfinished, it gives its room back and, if it was the probe, lets another be made.
pub struct Ticket {
    /// Where the outcome goes.
    shared: Arc<Shared>,
    /// Room under the adaptive limit (worker attempts only).
    permit: Option<Permit>,
    /// Whether this attempt is the breaker's probe.
    probe: bool,
    /// Set once the outcome was reported.
    finished: bool,
}

impl Ticket {
    fn new(shared: Arc<Shared>, probe: bool) -> Self {
        Self {
            shared,
            permit: None,
            probe,
            finished: false,
        }
    }

    /// Whether this attempt is the breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the outcome of an attempt that took `took`.
    pub fn finish(mut self, outcome: &Outcome, took: Duration) {
        self.finished = true;
        let signal = if outcome.is_overload() {
            Signal::Overload
        } else {
            match outcome {
                Outcome::Retryable { .. } => Signal::Neutral,
                Outcome::Delivered { .. } | Outcome::Permanent { .. } => Signal::Success(took),
            }
        };
        if let Some(permit) = self.permit.take() {
            permit.finish(signal);
        }
        if let Some(circuit) = &self.shared.circuit {
            let failed = matches!(outcome, Outcome::Retryable { .. });
            let change = circuit.breaker.lock().expect("breaker lock").record(
                failed,
                self.probe,
                Instant::now(),
            );
            self.shared.announce(change);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe
            && !self.finished
            && let Some(circuit) = &self.shared.circuit
        {
            let change = circuit
                .breaker
                .lock()
                .expect("breaker lock")
                .probe_abandoned(Instant::now());
            self.shared.announce(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn refused() -> Outcome {
        Outcome::Retryable {
            status: None,
            error: "connection failed: refused".into(),
            retry_after: None,
            timed_out: false,
        }
    }

    fn with_breaker() -> Protect {
        let settings = ProtectSettings {
            breaker: Some(BreakerSettings {
                failure_percent: 100,
                min_attempts: 2,
                probe: ms(1000),
            }),
            ..ProtectSettings::default()
        };
        Protect::new(settings, 8, Backlog::default())
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_holds_deliveries_and_lets_one_probe_through() {
        let p = with_breaker();
        let cancel = CancellationToken::new();
        for _ in 0..2 {
            p.admit(&cancel).await.unwrap().finish(&refused(), ms(1));
        }
        assert_eq!(p.breaker_state(), Some(State::Open));
        assert!(p.admit_inline().is_none(), "the receiver queues instead");

        let mut a = Box::pin(p.admit(&cancel));
        let mut b = Box::pin(p.admit(&cancel));
        assert!(futures_util::poll!(a.as_mut()).is_pending());
        assert!(futures_util::poll!(b.as_mut()).is_pending());
        tokio::time::advance(ms(1000)).await;
        let (probe, mut other) = match futures_util::future::select(a, b).await {
            futures_util::future::Either::Left((t, other)) => (t.unwrap(), other),
            futures_util::future::Either::Right((t, other)) => (t.unwrap(), other),
        };
        assert!(probe.is_probe());
        assert_eq!(p.breaker_state(), Some(State::HalfOpen));
        assert!(
            futures_util::poll!(other.as_mut()).is_pending(),
            "one probe at a time"
        );
        assert!(p.admit_inline().is_none());

        probe.finish(&Outcome::Delivered { status: 200 }, ms(5));
        assert_eq!(p.breaker_state(), Some(State::Closed));
        // The backlog drains from one attempt in flight.
        assert_eq!(p.concurrency_limit(), Some(1));
        let next = other.await.unwrap();
        assert!(!next.is_probe());
        let mut third = Box::pin(p.admit(&cancel));
        assert!(futures_util::poll!(third.as_mut()).is_pending());
        next.finish(&Outcome::Delivered { status: 200 }, ms(5));
        assert_eq!(p.concurrency_limit(), Some(2));
        third.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_wait_and_an_abandoned_one_does_not() {
        let p = with_breaker();
        let cancel = CancellationToken::new();
        for _ in 0..2 {
            p.admit(&cancel).await.unwrap().finish(&refused(), ms(1));
        }
        tokio::time::advance(ms(1000)).await;
        p.admit(&cancel).await.unwrap().finish(&refused(), ms(1));
        let mut next = Box::pin(p.admit(&cancel));
        tokio::time::advance(ms(1999)).await;
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        tokio::time::advance(ms(1)).await;
        let probe = next.await.unwrap();
        assert!(probe.is_probe());
        drop(probe); // never attempted (shutdown): another probe soon, same wait
        let mut again = Box::pin(p.admit(&cancel));
        tokio::time::advance(ms(1999)).await;
        assert!(futures_util::poll!(again.as_mut()).is_pending());
        tokio::time::advance(ms(1)).await;
        assert!(again.await.unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_releases_a_held_delivery_unattempted() {
        let p = with_breaker();
        let cancel = CancellationToken::new();
        for _ in 0..2 {
            p.admit(&cancel).await.unwrap().finish(&refused(), ms(1));
        }
        let held = p.admit(&cancel);
        cancel.cancel();
        assert!(held.await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_backlog_is_full_at_max_backlog_events() {
        let backlog = Backlog::default();
        let settings = ProtectSettings {
            max_backlog: Some(100),
            ..ProtectSettings::default()
        };
        let p = Protect::new(settings, 8, backlog.clone());
        assert_eq!(p.backlog_full(), None);
        backlog.set_for_test(99);
        assert_eq!(p.backlog_full(), None);
        backlog.set_for_test(100);
        assert_eq!(p.backlog_full(), Some(100));
        let unbounded = Protect::new(ProtectSettings::default(), 8, backlog);
        assert_eq!(unbounded.backlog_full(), None);
    }
}
