//! The receiver's intake budget (SPEC §4.5): inline attempts in flight, request-body
//! bytes held in memory, open client connections. Each is a tokio semaphore; a held
//! permit is a [`Held`] guard that keeps its `/metrics` gauge current.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::IntakeLimits;

/// One of the three limits, with its metrics label.
#[derive(Debug, Clone)]
struct Limit {
    /// `inline`, `bytes` or `connections`.
    label: &'static str,
    /// The configured capacity.
    capacity: usize,
    /// Permits left.
    free: Arc<Semaphore>,
    /// Its `webhook_relay_intake_in_use` gauge.
    in_use: metrics::Gauge,
}

impl Limit {
    fn new(label: &'static str, capacity: usize) -> Self {
        crate::metrics::intake_capacity(label, capacity);
        let in_use = crate::metrics::intake_in_use(label);
        in_use.set(0.0);
        Self {
            label,
            capacity,
            free: Arc::new(Semaphore::new(capacity)),
            in_use,
        }
    }

    fn held(&self, permit: OwnedSemaphorePermit) -> Held {
        let held = Held {
            permit: Some(permit),
            limit: self.clone(),
        };
        held.report();
        held
    }

    fn try_take(&self, n: usize) -> Option<Held> {
        match self.free.clone().try_acquire_many_owned(n as u32) {
            Ok(p) => Some(self.held(p)),
            Err(_) => {
                crate::metrics::intake_limit_hit(self.label);
                None
            }
        }
    }
}

/// Permits of one limit, released (and the gauge updated) on drop.
pub struct Held {
    /// `None` only while dropping.
    permit: Option<OwnedSemaphorePermit>,
    /// The limit the permits belong to.
    limit: Limit,
}

impl Held {
    fn report(&self) {
        let used = self.limit.capacity - self.limit.free.available_permits();
        self.limit.in_use.set(used as f64);
    }

    /// How many units (slots or bytes) this guard holds.
    pub fn size(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.report();
    }
}

/// The request could not have room in time: answer 503 + `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the intake budget is used up")]
pub struct Full;

/// The intake budget of one receiving process.
#[derive(Clone)]
pub struct Intake {
    /// Inline attempts in flight.
    inline: Limit,
    /// Body bytes held by in-flight requests.
    bytes: Limit,
    /// Open client connections (taken by the HTTP server's accept loop).
    connections: Limit,
    /// How long a request waits for body room before it is refused.
    wait: Duration,
}

impl Intake {
    /// The budget `limits` describe, with its gauges set.
    pub fn new(limits: &IntakeLimits) -> Self {
        Self {
            inline: Limit::new("inline", limits.inline_max_inflight),
            bytes: Limit::new("bytes", limits.max_inflight_bytes),
            connections: Limit::new("connections", limits.max_connections),
            wait: limits.wait,
        }
    }

    /// An inline-attempt slot, or `None` when all are taken (the event then goes
    /// queue-first instead of waiting).
    pub fn try_inline(&self) -> Option<Held> {
        self.inline.try_take(1)
    }

    /// A connection slot, or `None` when `MAX_CONNECTIONS` are open.
    pub fn try_connection(&self) -> Option<Held> {
        self.connections.try_take(1)
    }

    /// A body budget for one request, whose waits together last at most
    /// `INTAKE_WAIT_MS` from now.
    pub fn body(&self) -> BodyBudget {
        BodyBudget {
            limit: self.bytes.clone(),
            held: None,
            deadline: Instant::now() + self.wait,
        }
    }
}

/// The bytes one request holds, grown as its body is known or arrives.
pub struct BodyBudget {
    /// The bytes limit.
    limit: Limit,
    /// What is held so far.
    held: Option<Held>,
    /// When waiting for room gives up.
    deadline: Instant,
}

impl BodyBudget {
    /// Bytes held so far.
    pub fn size(&self) -> usize {
        self.held.as_ref().map_or(0, Held::size)
    }

    /// Holds `total` bytes in all (no-op when already held), waiting for room until the
    /// deadline; `Full` when it does not come.
    pub async fn hold(&mut self, total: usize) -> Result<(), Full> {
        let more = total.saturating_sub(self.size());
        if more == 0 {
            return Ok(());
        }
        let acquire = self.limit.free.clone().acquire_many_owned(more as u32);
        let permit = match tokio::time::timeout_at(self.deadline, acquire).await {
            Ok(Ok(p)) => p,
            // Timed out, or the semaphore closed (never: it lives as long as the relay).
            _ => {
                crate::metrics::intake_limit_hit(self.limit.label);
                return Err(Full);
            }
        };
        match &mut self.held {
            Some(held) => {
                held.permit.as_mut().expect("held").merge(permit);
                held.report();
            }
            None => self.held = Some(self.limit.held(permit)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(inline: usize, bytes: usize, wait_ms: u64) -> IntakeLimits {
        IntakeLimits {
            inline_max_inflight: inline,
            max_inflight_bytes: bytes,
            wait: Duration::from_millis(wait_ms),
            max_connections: 2,
        }
    }

    #[test]
    fn inline_slots_run_out_and_come_back() {
        let intake = Intake::new(&limits(2, 100, 0));
        let a = intake.try_inline().unwrap();
        let _b = intake.try_inline().unwrap();
        assert!(intake.try_inline().is_none());
        drop(a);
        assert!(intake.try_inline().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waits_for_room_then_gives_up() {
        let intake = Intake::new(&limits(1, 100, 1000));
        let mut first = intake.body();
        first.hold(60).await.unwrap();
        first.hold(80).await.unwrap(); // grows by 20
        assert_eq!(first.size(), 80);
        let mut second = intake.body();
        let started = Instant::now();
        assert_eq!(second.hold(30).await, Err(Full));
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
        // Room that frees up within the wait is taken.
        let mut third = intake.body();
        let waiting = tokio::spawn(async move { third.hold(30).await.map(|_| third.size()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(30));
    }
}
