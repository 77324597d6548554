//! One log line when a kind of broker trouble starts and one when it ends, with the
//! count in between, instead of one line per event (a refused publish under load
//! would otherwise log thousands of warnings a second).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an episode must stay quiet before a success ends it: trouble that strikes
/// every other publish (a queue at its limit that takes one message per expiry) is
/// one episode, not a line per success.
pub const QUIET_BEFORE_END: Duration = Duration::from_secs(2);

/// A kind of trouble that comes and goes: nacked publishes, publish timeouts,
/// outcome publishes a worker keeps retrying.
pub struct Episode {
    /// What is going wrong, in words, for both log lines.
    what: &'static str,
    /// `Some` while an episode is running: when it started, when it last struck, and
    /// how often it struck.
    state: Mutex<Option<Strikes>>,
}

struct Strikes {
    since: Instant,
    last: Instant,
    count: u64,
}

/// What a report changed, so callers (and tests) can tell a start from a repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first occurrence: the start line was logged.
    Started,
    /// Another occurrence within the running episode: nothing logged.
    Repeated,
    /// The trouble is over: the end line was logged with the count and duration.
    Ended {
        /// Occurrences during the episode.
        count: u64,
        /// From the first occurrence to the recovery.
        lasted: Duration,
    },
    /// A success outside any episode: nothing logged.
    Calm,
}

impl Episode {
    /// An episode tracker for trouble described as `what` ("publishes nacked by the broker").
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::new(None),
        }
    }

    /// One more occurrence; logs a warning only when it starts an episode.
    pub fn strike(&self, detail: &dyn std::fmt::Display) -> Change {
        let mut state = self.state.lock().expect("episode lock");
        let now = Instant::now();
        match state.as_mut() {
            Some(s) => {
                s.count += 1;
                s.last = now;
                Change::Repeated
            }
            None => {
                *state = Some(Strikes {
                    since: now,
                    last: now,
                    count: 1,
                });
                tracing::warn!(error = %detail, "{} (logged once until it recovers)", self.what);
                Change::Started
            }
        }
    }

    /// A success; ends a running episode with one line once it has been quiet for
    /// [`QUIET_BEFORE_END`].
    pub fn calm(&self) -> Change {
        self.calm_after(QUIET_BEFORE_END)
    }

    fn calm_after(&self, quiet: Duration) -> Change {
        let mut state = self.state.lock().expect("episode lock");
        match state.as_ref() {
            Some(s) if s.last.elapsed() < quiet => Change::Repeated,
            Some(_) => {
                let Strikes { since, count, .. } = state.take().expect("checked");
                let lasted = since.elapsed();
                tracing::info!(
                    count,
                    lasted_ms = lasted.as_millis() as u64,
                    "recovered: {}",
                    self.what
                );
                Change::Ended { count, lasted }
            }
            None => Change::Calm,
        }
    }

    /// Whether an episode is running (cheap check for hot paths).
    pub fn is_running(&self) -> bool {
        self.state.lock().expect("episode lock").is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_only_starts_and_ends() {
        let e = Episode::new("test trouble");
        assert_eq!(e.calm(), Change::Calm);
        assert_eq!(e.strike(&"x"), Change::Started);
        assert_eq!(e.strike(&"x"), Change::Repeated);
        // A success right after a strike does not end it: the trouble may be flapping.
        assert_eq!(e.calm(), Change::Repeated);
        assert_eq!(e.strike(&"x"), Change::Repeated);
        assert!(e.is_running());
        assert!(matches!(
            e.calm_after(Duration::ZERO),
            Change::Ended { count: 3, .. }
        ));
        assert!(!e.is_running());
        assert_eq!(e.calm(), Change::Calm);
        assert_eq!(e.strike(&"y"), Change::Started);
    }
}
