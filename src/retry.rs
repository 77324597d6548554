//! The retry policy (SPEC §3), pure: attempt k and its outcome decide between
//! delivered, a retry level, or the dead-letter queue. No I/O lives here.

use std::time::Duration;

use crate::delivery::Outcome;

/// The delay levels of the retry ladder, derived from the backoff settings (SPEC §2).
///
/// Level i (0-based) waits `min(base * 2^(i+1), max)`; the ladder stops at the first
/// level that reaches `max`, so any `Retry-After` up to the cap has a level covering it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ladder {
    /// Backoff unit (`BACKOFF_BASE_MS`).
    base: Duration,
    /// Cap (`BACKOFF_MAX_MS`), also the last level.
    max: Duration,
    /// The delays, strictly increasing, the last equal to `max`.
    levels: Vec<Duration>,
}

impl Ladder {
    /// Builds the ladder; `base` and `max` are positive and `base <= max` (checked by config).
    pub fn new(base: Duration, max: Duration) -> Self {
        let mut levels = Vec::new();
        let mut k = 1u32;
        loop {
            let d = backoff(base, max, k);
            levels.push(d);
            if d >= max {
                break;
            }
            k += 1;
        }
        Self { base, max, levels }
    }

    /// The delays, in ladder order.
    pub fn levels(&self) -> &[Duration] {
        &self.levels
    }

    /// The wait after failed attempt `k`: `min(base * 2^k, max)`.
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        backoff(self.base, self.max, attempt)
    }

    /// The smallest level that waits at least `needed` (the last level when none does).
    pub fn level_for(&self, needed: Duration) -> usize {
        self.levels
            .iter()
            .position(|&d| d >= needed)
            .unwrap_or(self.levels.len() - 1)
    }
}

fn backoff(base: Duration, max: Duration, k: u32) -> Duration {
    let factor = 1u32.checked_shl(k).unwrap_or(u32::MAX);
    base.checked_mul(factor).map_or(max, |d| d.min(max))
}

/// Why an event ends in the DLQ; also the value of its reason header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Every one of MAX_ATTEMPTS attempts failed retryably.
    AttemptsExhausted,
    /// The downstream refused it for good (3xx or a 4xx other than 408/429).
    Refused,
}

impl DeadLetterReason {
    /// The stable label used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Refused => "refused",
        }
    }
}

/// What happens to an event after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The downstream took it; nothing more to do.
    Delivered,
    /// Park it in retry level `level` (index into the ladder) for `delay`.
    Retry {
        /// Index of the retry queue in the ladder.
        level: usize,
        /// The level's delay.
        delay: Duration,
    },
    /// Move it to the DLQ.
    DeadLetter(DeadLetterReason),
}

/// The retry policy: how many attempts, and the ladder their waits come from.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Attempts per event (`MAX_ATTEMPTS`, at least 1).
    pub max_attempts: u32,
    /// The retry levels.
    pub ladder: Ladder,
}

impl Policy {
    /// Decides the fate of an event whose attempt number `attempt` (1-based) ended in `outcome`.
    pub fn decide(&self, attempt: u32, outcome: &Outcome) -> Decision {
        match outcome {
            Outcome::Delivered { .. } => Decision::Delivered,
            Outcome::Permanent { .. } => Decision::DeadLetter(DeadLetterReason::Refused),
            Outcome::Retryable { .. } if attempt >= self.max_attempts => {
                Decision::DeadLetter(DeadLetterReason::AttemptsExhausted)
            }
            Outcome::Retryable { retry_after, .. } => {
                let backoff = self.ladder.backoff_after(attempt);
                let needed = retry_after.map_or(backoff, |ra| backoff.max(ra));
                let level = self.ladder.level_for(needed);
                Decision::Retry {
                    level,
                    delay: self.ladder.levels()[level],
                }
            }
        }
    }
}

/// `2s`, `40ms`, `1h`, `2048s`: the shortest exact unit, so names stay short and sort
/// with the ladder index in front.
pub fn human_delay(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms >= 600_000 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn retryable(retry_after: Option<Duration>) -> Outcome {
        Outcome::Retryable {
            status: Some(503),
            error: "HTTP 503".into(),
            retry_after,
            timed_out: false,
        }
    }

    #[test]
    fn default_ladder_has_twelve_levels_ending_at_one_hour() {
        let l = Ladder::new(ms(1000), ms(3_600_000));
        let secs: Vec<u64> = l.levels().iter().map(|d| d.as_secs()).collect();
        assert_eq!(
            secs,
            vec![2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600]
        );
    }

    #[test]
    fn default_policy_attempts_at_0_2_6_14_30_seconds_then_dlq() {
        let p = Policy {
            max_attempts: 5,
            ladder: Ladder::new(ms(1000), ms(3_600_000)),
        };
        let mut t = 0;
        let mut at = vec![0];
        for attempt in 1..=5 {
            match p.decide(attempt, &retryable(None)) {
                Decision::Retry { delay, .. } => {
                    t += delay.as_secs();
                    at.push(t);
                }
                Decision::DeadLetter(r) => {
                    assert_eq!(attempt, 5);
                    assert_eq!(r, DeadLetterReason::AttemptsExhausted);
                }
                Decision::Delivered => unreachable!(),
            }
        }
        assert_eq!(at, vec![0, 2, 6, 14, 30]);
    }

    #[test]
    fn retry_after_picks_the_smallest_covering_level() {
        let p = Policy {
            max_attempts: 5,
            ladder: Ladder::new(ms(1000), ms(3_600_000)),
        };
        // backoff after attempt 1 is 2 s; Retry-After 5 s needs the 8 s level.
        assert_eq!(
            p.decide(1, &retryable(Some(ms(5000)))),
            Decision::Retry {
                level: 2,
                delay: ms(8000)
            }
        );
        // Retry-After beyond the cap is capped at the last level.
        assert_eq!(
            p.decide(1, &retryable(Some(Duration::from_secs(86_400)))),
            Decision::Retry {
                level: 11,
                delay: ms(3_600_000)
            }
        );
    }

    #[test]
    fn permanent_goes_to_dlq_at_once_and_delivered_is_done() {
        let p = Policy {
            max_attempts: 5,
            ladder: Ladder::new(ms(10), ms(100)),
        };
        let refused = Outcome::Permanent {
            status: Some(404),
            error: "HTTP 404".into(),
        };
        assert_eq!(
            p.decide(1, &refused),
            Decision::DeadLetter(DeadLetterReason::Refused)
        );
        assert_eq!(
            p.decide(1, &Outcome::Delivered { status: 204 }),
            Decision::Delivered
        );
    }

    #[test]
    fn single_level_when_base_doubled_reaches_cap() {
        let l = Ladder::new(ms(600), ms(1000));
        assert_eq!(l.levels(), &[ms(1000)]);
    }

    proptest! {
        #[test]
        fn ladder_is_increasing_capped_and_covers_every_wait(
            base in 1u64..100_000, extra in 0u64..10_000_000, attempt in 1u32..64, ra in 0u64..20_000_000
        ) {
            let max = base + extra;
            let l = Ladder::new(ms(base), ms(max));
            prop_assert!(l.levels().windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(*l.levels().last().unwrap(), ms(max));
            prop_assert!(l.levels().len() <= 64);
            let p = Policy { max_attempts: u32::MAX, ladder: l.clone() };
            match p.decide(attempt, &retryable(Some(ms(ra)))) {
                Decision::Retry { level, delay } => {
                    let needed = l.backoff_after(attempt).max(ms(ra)).min(ms(max));
                    prop_assert!(delay >= needed);
                    // smallest such level
                    prop_assert!(level == 0 || l.levels()[level - 1] < needed);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
