//! The circuit breaker's state machine (SPEC §5a, pure: time is passed in). Closed, it
//! counts the last `BREAKER_MIN_ATTEMPTS` outcomes and opens when at least
//! `BREAKER_FAILURE_PERCENT` of them failed retryably. Open, it admits nothing but one
//! probe every `BREAKER_PROBE_MS`, doubling to [`PROBE_MAX`]; a probe that succeeds
//! closes it. Outcomes of attempts that were not probes are ignored unless it is closed:
//! while open nothing is counted.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Longest wait between two probes.
pub const PROBE_MAX: Duration = Duration::from_secs(60);

/// The breaker's settings, from `CIRCUIT_BREAKER` and the `BREAKER_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Share of failed attempts (1..=100) that opens the breaker.
    pub failure_percent: u8,
    /// Attempts looked at; the breaker never opens on fewer (at least 1).
    pub min_attempts: u32,
    /// First wait before a probe, doubled after each failed probe up to [`PROBE_MAX`].
    pub probe: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_percent: 70,
            min_attempts: 20,
            probe: Duration::from_millis(5000),
        }
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Attempts flow; outcomes are counted.
    Closed,
    /// No attempts until the next probe.
    Open,
    /// One probe in flight; no other attempts.
    HalfOpen,
}

impl State {
    /// The `/metrics` and log word.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What a caller that wants to attempt may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Attempt (the breaker is closed).
    Attempt,
    /// Attempt as the probe; report the outcome with `probe = true`.
    Probe,
    /// Do not attempt. Ask again at `until` (the next probe) or when the state changes
    /// (`None`: a probe is in flight).
    Wait {
        /// When the next probe is due.
        until: Option<Instant>,
    },
}

/// A state change worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Closed to open: the failure share was reached.
    Opened {
        /// Failed attempts among the last `attempts`.
        failed: u32,
        /// Attempts looked at.
        attempts: u32,
    },
    /// A probe is on its way.
    Probing,
    /// The probe failed (or was abandoned); the next one is due after `next_probe`.
    Reopened {
        /// Wait until the next probe.
        next_probe: Duration,
    },
    /// A probe succeeded.
    Closed,
}

/// The state machine.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    /// The last outcomes while closed, `true` for a retryable failure.
    recent: VecDeque<bool>,
    /// Failures among `recent`.
    failures: u32,
    /// Current wait between probes.
    interval: Duration,
    /// When the next probe is due (meaningful while open).
    next_probe: Instant,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings, now: Instant) -> Self {
        Self {
            settings,
            state: State::Closed,
            recent: VecDeque::with_capacity(settings.min_attempts as usize),
            failures: 0,
            interval: settings.probe,
            next_probe: now,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// May an attempt start at `now`? Turns open into half-open for the one caller that
    /// gets [`Admit::Probe`].
    pub fn admit(&mut self, now: Instant) -> (Admit, Option<Change>) {
        match self.state {
            State::Closed => (Admit::Attempt, None),
            State::Open if now >= self.next_probe => {
                self.state = State::HalfOpen;
                (Admit::Probe, Some(Change::Probing))
            }
            State::Open => (
                Admit::Wait {
                    until: Some(self.next_probe),
                },
                None,
            ),
            State::HalfOpen => (Admit::Wait { until: None }, None),
        }
    }

    /// Records an attempt's outcome (`failed`: retryably). `probe` says whether it was
    /// admitted as the probe.
    pub fn record(&mut self, failed: bool, probe: bool, now: Instant) -> Option<Change> {
        match (self.state, probe) {
            (State::HalfOpen, true) if failed => Some(self.reopen(now, true)),
            (State::HalfOpen, true) => {
                self.state = State::Closed;
                self.recent.clear();
                self.failures = 0;
                self.interval = self.settings.probe;
                Some(Change::Closed)
            }
            (State::Closed, _) => {
                let window = self.settings.min_attempts.max(1) as usize;
                self.recent.push_back(failed);
                self.failures += u32::from(failed);
                while self.recent.len() > window {
                    if self.recent.pop_front() == Some(true) {
                        self.failures -= 1;
                    }
                }
                let attempts = self.recent.len() as u32;
                let reached = u64::from(self.failures) * 100
                    >= u64::from(self.settings.failure_percent) * u64::from(attempts);
                if self.recent.len() == window && reached {
                    let failed = self.failures;
                    self.state = State::Open;
                    self.recent.clear();
                    self.failures = 0;
                    self.interval = self.settings.probe;
                    self.next_probe = now + self.interval;
                    return Some(Change::Opened { failed, attempts });
                }
                None
            }
            // Open, or half-open with an attempt that is not the probe (admitted before
            // the breaker opened): nothing is counted.
            _ => None,
        }
    }

    /// The probe was admitted but never made (shutdown, an event that could not be
    /// read): open again, without doubling the wait.
    pub fn probe_abandoned(&mut self, now: Instant) -> Option<Change> {
        (self.state == State::HalfOpen).then(|| self.reopen(now, false))
    }

    fn reopen(&mut self, now: Instant, failed: bool) -> Change {
        if failed {
            self.interval = (self.interval * 2).min(PROBE_MAX.max(self.settings.probe));
        }
        self.state = State::Open;
        self.next_probe = now + self.interval;
        Change::Reopened {
            next_probe: self.interval,
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

    fn settings(percent: u8, min: u32, probe_ms: u64) -> BreakerSettings {
        BreakerSettings {
            failure_percent: percent,
            min_attempts: min,
            probe: ms(probe_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_failure_share_of_the_last_attempts() {
        let mut b = Breaker::new(settings(70, 10, 1000), Instant::now());
        for _ in 0..6 {
            assert_eq!(b.record(true, false, Instant::now()), None);
        }
        for _ in 0..3 {
            assert_eq!(b.record(false, false, Instant::now()), None);
        }
        // 10th attempt: 7 of 10 failed.
        assert_eq!(
            b.record(true, false, Instant::now()),
            Some(Change::Opened {
                failed: 7,
                attempts: 10
            })
        );
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn never_opens_below_the_minimum_attempts() {
        let mut b = Breaker::new(settings(70, 20, 1000), Instant::now());
        for _ in 0..19 {
            b.record(true, false, Instant::now());
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_double_to_sixty_seconds_and_a_success_closes() {
        let mut b = Breaker::new(settings(50, 2, 5000), Instant::now());
        b.record(true, false, Instant::now());
        b.record(true, false, Instant::now());
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.admit(Instant::now()).0,
            Admit::Wait {
                until: Some(Instant::now() + ms(5000))
            }
        );
        let mut waits = vec![];
        for _ in 0..6 {
            let Admit::Wait { until: Some(at) } = b.admit(Instant::now()).0 else {
                panic!("open breaker waits for its probe");
            };
            waits.push((at - Instant::now()).as_millis() as u64);
            tokio::time::advance(at - Instant::now()).await;
            assert_eq!(b.admit(Instant::now()).0, Admit::Probe);
            // Only one probe at a time; nothing else while it runs.
            assert_eq!(b.admit(Instant::now()).0, Admit::Wait { until: None });
            assert_eq!(b.record(true, false, Instant::now()), None);
            b.record(true, true, Instant::now());
        }
        assert_eq!(waits, [5000, 10000, 20000, 40000, 60000, 60000]);
        tokio::time::advance(ms(60000)).await;
        assert_eq!(b.admit(Instant::now()).0, Admit::Probe);
        assert_eq!(b.record(false, true, Instant::now()), Some(Change::Closed));
        assert_eq!(b.admit(Instant::now()).0, Admit::Attempt);
        // Closed again with a clean slate and the first probe wait.
        b.record(true, false, Instant::now());
        assert_eq!(b.state(), State::Closed);
        b.record(true, false, Instant::now());
        assert_eq!(
            b.admit(Instant::now()).0,
            Admit::Wait {
                until: Some(Instant::now() + ms(5000))
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_while_open_are_not_counted() {
        let mut b = Breaker::new(settings(100, 1, 1000), Instant::now());
        b.record(true, false, Instant::now());
        assert_eq!(b.state(), State::Open);
        // Stragglers admitted before it opened: a success does not close it.
        assert_eq!(b.record(false, false, Instant::now()), None);
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_reopens_without_doubling() {
        let mut b = Breaker::new(settings(100, 1, 1000), Instant::now());
        b.record(true, false, Instant::now());
        tokio::time::advance(ms(1000)).await;
        assert_eq!(b.admit(Instant::now()).0, Admit::Probe);
        assert_eq!(
            b.probe_abandoned(Instant::now()),
            Some(Change::Reopened {
                next_probe: ms(1000)
            })
        );
    }

    proptest! {
        #[test]
        fn at_most_one_probe_and_never_an_attempt_while_not_closed(
            steps in proptest::collection::vec((0u8..4, 0u64..3000), 1..400),
            percent in 1u8..=100,
            min in 1u32..30,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let mut b = Breaker::new(settings(percent, min, 500), Instant::now());
                let mut probes_out = 0u32;
                for (kind, wait) in steps {
                    tokio::time::advance(ms(wait)).await;
                    let now = Instant::now();
                    match kind {
                        0 | 1 => {
                            let before = b.state();
                            match b.admit(now).0 {
                                Admit::Attempt => prop_assert_eq!(before, State::Closed),
                                Admit::Probe => {
                                    prop_assert_eq!(before, State::Open);
                                    probes_out += 1;
                                }
                                Admit::Wait { .. } => prop_assert_ne!(before, State::Closed),
                            }
                        }
                        2 if probes_out > 0 => {
                            probes_out -= 1;
                            b.record(wait % 2 == 0, true, now);
                        }
                        _ => {
                            b.record(wait % 3 != 0, false, now);
                        }
                    }
                    prop_assert!(probes_out <= 1);
                    prop_assert_eq!(probes_out == 1, b.state() == State::HalfOpen);
                }
                Ok(())
            })?;
        }
    }
}
