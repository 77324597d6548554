//! Adaptive concurrency (SPEC §5a): an AIMD limit on the attempts one worker process
//! has in flight, and the gate that holds deliveries back while the limit is reached.
//! The limit falls multiplicatively on 429, 503, timeouts and a latency rise, and grows
//! additively while attempts succeed with the limit in use. The state machine is pure
//! (time is passed in); the gate around it is the only part that waits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Share of the limit given up per overload signal, relative to the limit the attempt
/// was admitted under: one refusal among attempts admitted under a limit of 5 takes it
/// to 4.2; 28 refusals among 32 halve it. A crowded downstream is left quickly, and one
/// probe past a hard capacity C drops the limit just below C, not to 0.5 C (which would
/// idle the downstream for half of every cycle).
pub const DECREASE_PER_WINDOW: f64 = 0.8;
/// Growth of the limit per round trip (per `limit` successes) while it is in use. Slow,
/// so the probe past the downstream's capacity that costs one refused attempt comes
/// about once every 25 attempts.
pub const INCREASE_PER_ROUND_TRIP: f64 = 0.125;
/// A success counts as an overload signal when the recent latency exceeds the baseline
/// by this factor plus [`LATENCY_SLACK`] (a queueing downstream answers slower before it
/// refuses).
pub const LATENCY_FACTOR: f64 = 2.0;
/// Absolute slack of the latency signal, so jitter on a sub-millisecond loopback
/// downstream is not mistaken for queueing.
pub const LATENCY_SLACK: Duration = Duration::from_millis(20);
/// Weight of a new sample in the recent latency (an exponential average).
const RECENT_WEIGHT: f64 = 0.2;
/// How fast the baseline follows a permanently slower downstream (per sample).
const BASELINE_DRIFT: f64 = 0.01;

/// What one attempt said about the downstream's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// Delivered (or refused for good: the downstream answered, so it had room) after
    /// this long.
    Success(Duration),
    /// 429, 503 or a timeout.
    Overload,
    /// Says nothing about capacity (connection refused, a 500): the breaker's business.
    Neutral,
}

/// The AIMD state machine (pure).
#[derive(Debug, Clone)]
pub struct Aimd {
    /// Current limit; attempts in flight may reach its integer part.
    limit: f64,
    /// Upper bound, `WORKER_CONCURRENCY`.
    max: f64,
    /// Below this the limit grows by one per success (slow start, after a restart);
    /// at or above it, additively.
    threshold: f64,
    /// Exponential average of recent success latencies, seconds.
    recent: Option<f64>,
    /// The lowest recent latency seen, drifting up slowly: what the downstream takes
    /// when it is not queueing, seconds.
    baseline: Option<f64>,
}

impl Aimd {
    /// A limit starting at `max` (SPEC §5a: a healthy downstream sees what it would see
    /// without the limit), bounded to `1..=max`.
    pub fn new(max: u16) -> Self {
        let max = f64::from(max.max(1));
        Self {
            limit: max,
            max,
            threshold: max,
            recent: None,
            baseline: None,
        }
    }

    /// Attempts that may be in flight now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// Records one attempt admitted under the limit `window` that ended with `signal`,
    /// while `in_flight` attempts (this one included) were running.
    pub fn record(&mut self, signal: Signal, window: usize, in_flight: usize) {
        match signal {
            Signal::Neutral => {}
            Signal::Overload => self.decrease(window),
            Signal::Success(took) => {
                if self.latency_rose(took) {
                    self.decrease(window);
                } else if in_flight as f64 * 2.0 >= self.limit {
                    // Grow only while the limit is in use (at least half of it in
                    // flight): a quiet hour must not raise it to a value never tried.
                    self.increase();
                }
            }
        }
    }

    /// Starts again from one attempt in flight, doubling per round trip up to where the
    /// limit was: after an outage the backlog must not hit the downstream all at once.
    pub fn restart(&mut self) {
        self.threshold = self.limit.max(1.0);
        self.limit = 1.0;
    }

    fn decrease(&mut self, window: usize) {
        let share = DECREASE_PER_WINDOW / window.max(1) as f64;
        self.limit = (self.limit * (1.0 - share.min(0.5))).max(1.0);
        self.threshold = self.limit;
    }

    fn increase(&mut self) {
        let step = if self.limit < self.threshold {
            1.0
        } else {
            INCREASE_PER_ROUND_TRIP / self.limit
        };
        self.limit = (self.limit + step).min(self.max);
    }

    /// Feeds a success latency to the averages; true when the recent latency is well
    /// above the baseline.
    fn latency_rose(&mut self, took: Duration) -> bool {
        let sample = took.as_secs_f64();
        let recent = match self.recent {
            None => sample,
            Some(r) => r + (sample - r) * RECENT_WEIGHT,
        };
        self.recent = Some(recent);
        let baseline = match self.baseline {
            None => recent,
            Some(b) if recent < b => recent,
            Some(b) => b + (recent - b) * BASELINE_DRIFT,
        };
        self.baseline = Some(baseline);
        recent > baseline * LATENCY_FACTOR + LATENCY_SLACK.as_secs_f64()
    }
}

/// Holds attempts back while the limit is reached; shared by a worker's deliveries.
#[derive(Debug)]
pub struct Gate {
    /// The limit and the attempts in flight, changed together.
    state: Mutex<GateState>,
    /// Woken when a permit is returned or the limit changes.
    changed: Notify,
}

#[derive(Debug)]
struct GateState {
    aimd: Aimd,
    in_flight: usize,
}

impl Gate {
    /// A gate whose limit starts at (and never exceeds) `max`.
    pub fn new(max: u16) -> Arc<Self> {
        let gate = Arc::new(Self {
            state: Mutex::new(GateState {
                aimd: Aimd::new(max),
                in_flight: 0,
            }),
            changed: Notify::new(),
        });
        crate::metrics::concurrency_limit(gate.limit());
        gate
    }

    /// The current limit (what `/metrics` shows).
    pub fn limit(&self) -> usize {
        self.state.lock().expect("gate lock").aimd.limit()
    }

    /// Attempts holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().expect("gate lock").in_flight
    }

    /// Waits for room under the limit.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("gate lock");
                let window = s.aimd.limit();
                if s.in_flight < window {
                    s.in_flight += 1;
                    return Permit {
                        gate: Some(self.clone()),
                        window,
                    };
                }
            }
            changed.await;
        }
    }

    /// Starts the limit again from one (see [`Aimd::restart`]).
    pub fn restart(&self) {
        let limit = {
            let mut s = self.state.lock().expect("gate lock");
            s.aimd.restart();
            s.aimd.limit()
        };
        crate::metrics::concurrency_limit(limit);
    }

    fn release(&self, outcome: Option<(Signal, usize)>) {
        let limit = {
            let mut s = self.state.lock().expect("gate lock");
            if let Some((signal, window)) = outcome {
                let in_flight = s.in_flight;
                s.aimd.record(signal, window, in_flight);
            }
            s.in_flight -= 1;
            s.aimd.limit()
        };
        crate::metrics::concurrency_limit(limit);
        self.changed.notify_waiters();
    }
}

/// Room for one attempt; returned to the gate when finished or dropped.
#[derive(Debug)]
pub struct Permit {
    /// The gate to return to; `None` once returned.
    gate: Option<Arc<Gate>>,
    /// The limit when the permit was given.
    window: usize,
}

impl Permit {
    /// Returns the permit with what the attempt said.
    pub fn finish(mut self, signal: Signal) {
        if let Some(gate) = self.gate.take() {
            gate.release(Some((signal, self.window)));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Not attempted after all (shutdown, the breaker opened): no signal.
        if let Some(gate) = self.gate.take() {
            gate.release(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Drives `aimd` against a downstream that takes `capacity` at a time, one round
    /// trip (50 ms) per step; returns (attempts, refused).
    fn simulate(aimd: &mut Aimd, capacity: usize, steps: usize) -> (usize, usize) {
        let (mut attempts, mut refused) = (0, 0);
        for _ in 0..steps {
            let n = aimd.limit();
            for i in 0..n {
                attempts += 1;
                if i < capacity {
                    aimd.record(Signal::Success(ms(50)), n, n);
                } else {
                    refused += 1;
                    aimd.record(Signal::Overload, n, n);
                }
            }
        }
        (attempts, refused)
    }

    #[test]
    fn starts_at_the_maximum() {
        assert_eq!(Aimd::new(32).limit(), 32);
        assert_eq!(Aimd::new(0).limit(), 1);
    }

    #[test]
    fn a_crowded_round_trip_lowers_the_limit_by_its_share_of_refusals() {
        let mut a = Aimd::new(32);
        for _ in 0..28 {
            a.record(Signal::Overload, 32, 32);
        }
        assert!((14..=17).contains(&a.limit()), "limit {}", a.limit());
        // One refusal among five: just below the capacity it found.
        let mut a = Aimd::new(5);
        a.record(Signal::Overload, 5, 5);
        assert_eq!(a.limit(), 4);
    }

    #[test]
    fn finds_a_capacity_of_four_and_stays_near_it() {
        let mut a = Aimd::new(32);
        let (attempts, refused) = simulate(&mut a, 4, 400);
        let limit = a.limit();
        assert!((3..=5).contains(&limit), "limit {limit}");
        let share = refused as f64 / attempts as f64;
        assert!(share < 0.06, "refused {refused} of {attempts}");
        // Steady state: the downstream is kept busy.
        let (attempts, refused) = simulate(&mut a, 4, 100);
        assert!(
            attempts - refused >= 380,
            "{attempts} attempts in 100 round trips"
        );
    }

    #[test]
    fn grows_only_while_the_limit_is_in_use() {
        let mut a = Aimd::new(32);
        a.record(Signal::Overload, 1, 32);
        assert_eq!(a.limit(), 16);
        for _ in 0..1000 {
            a.record(Signal::Success(ms(5)), 16, 2);
        }
        assert_eq!(a.limit(), 16, "two in flight say nothing about room for 17");
    }

    #[test]
    fn restart_doubles_per_round_trip_back_to_the_old_limit() {
        let mut a = Aimd::new(32);
        a.restart();
        assert_eq!(a.limit(), 1);
        let mut seen = vec![];
        for _ in 0..6 {
            let n = a.limit();
            for _ in 0..n {
                a.record(Signal::Success(ms(5)), n, n);
            }
            seen.push(a.limit());
        }
        assert_eq!(seen[..5], [2, 4, 8, 16, 32]);
    }

    #[test]
    fn a_latency_rise_lowers_the_limit() {
        let mut a = Aimd::new(32);
        for _ in 0..50 {
            a.record(Signal::Success(ms(50)), 32, 1);
        }
        assert_eq!(a.limit(), 32);
        for _ in 0..20 {
            a.record(Signal::Success(ms(400)), 32, 32);
        }
        assert!(a.limit() < 32, "limit {}", a.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn gate_holds_attempts_past_the_limit() {
        let gate = Gate::new(2);
        let a = gate.acquire().await;
        let _b = gate.acquire().await;
        let mut third = Box::pin(gate.acquire());
        assert!(futures_util::poll!(third.as_mut()).is_pending());
        a.finish(Signal::Neutral);
        let _c = third.await;
        assert_eq!(gate.in_flight(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gate_lets_fewer_through_after_an_overload() {
        let gate = Gate::new(4);
        let permits: Vec<Permit> =
            futures_util::future::join_all((0..4).map(|_| gate.acquire())).await;
        for p in permits {
            p.finish(Signal::Overload);
        }
        assert!(gate.limit() < 4);
        let n = gate.limit();
        let _held: Vec<Permit> =
            futures_util::future::join_all((0..n).map(|_| gate.acquire())).await;
        let mut next = Box::pin(gate.acquire());
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        // A dropped permit (never attempted) makes room without a signal.
        drop(_held);
        let _p = tokio::time::timeout(ms(10), next)
            .await
            .expect("room again");
    }

    proptest! {
        #[test]
        fn limit_stays_within_one_and_the_maximum(
            max in 1u16..200,
            events in proptest::collection::vec((0u8..4, 0u64..500, 0usize..300, 1usize..300), 0..300),
        ) {
            let mut a = Aimd::new(max);
            for (kind, took, in_flight, window) in events {
                let signal = match kind {
                    0 => Signal::Success(ms(took)),
                    1 => Signal::Overload,
                    _ => Signal::Neutral,
                };
                a.record(signal, window, in_flight);
                if kind == 3 && took % 7 == 0 {
                    a.restart();
                }
                prop_assert!((1..=usize::from(max)).contains(&a.limit()), "limit {}", a.limit());
            }
        }

        #[test]
        fn overload_never_raises_and_steady_success_never_lowers(
            max in 1u16..100,
            steps in proptest::collection::vec(any::<bool>(), 1..200),
        ) {
            let mut a = Aimd::new(max);
            for overload in steps {
                let before = a.limit();
                if overload {
                    a.record(Signal::Overload, before, before);
                    prop_assert!(a.limit() <= before);
                } else {
                    // Constant latency: never a latency rise.
                    a.record(Signal::Success(ms(10)), before, before);
                    prop_assert!(a.limit() >= before);
                }
            }
        }
    }
}
