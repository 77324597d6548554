//! Failed attempts scheduled for a retry, logged as a summary: the first failure after a
//! quiet spell at once, then one line per interval with the count, while failures go
//! on. Each failure on its own is logged at `debug`. A downstream that is down would
//! otherwise log a line per event, thousands a second, and formatting them cost a
//! fifth of the relay's CPU on that path.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a running spell of failures is summed up.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Failures since the last line, by status (`None`: no answer).
#[derive(Debug, Default)]
struct Window {
    /// When the spell of failures started; `None` while quiet.
    since: Option<Instant>,
    /// When the last line was written.
    logged: Option<Instant>,
    /// Failures since the last line.
    count: u64,
    /// The same, by the downstream's status.
    by_status: BTreeMap<Option<u16>, u64>,
    /// The newest error text.
    last_error: String,
}

/// What a call logged, so tests can tell the lines apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// Nothing at `info`.
    Nothing,
    /// The first failure of a spell.
    Started,
    /// A summary of `count` failures.
    Summary {
        /// Failures in the interval.
        count: u64,
    },
    /// A spell ended: no failure for a whole interval.
    Ended,
}

/// The summary of failed attempts of one process.
#[derive(Debug)]
pub struct RetryLog {
    window: Mutex<Window>,
}

impl RetryLog {
    /// A quiet summary (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            window: Mutex::new(Window {
                since: None,
                logged: None,
                count: 0,
                by_status: BTreeMap::new(),
                last_error: String::new(),
            }),
        }
    }

    /// A failed attempt (status, error) scheduled for a retry. `Started` means this one
    /// opens a spell and the caller logs it at `info` (with the event's span); any
    /// other answer means `debug`.
    pub fn failed(&self, status: Option<u16>, error: Option<&str>) -> Logged {
        self.failed_at(Instant::now(), status, error)
    }

    fn failed_at(&self, now: Instant, status: Option<u16>, error: Option<&str>) -> Logged {
        let mut w = self.window.lock().expect("retry log lock");
        if w.since.is_none() {
            w.since = Some(now);
            w.logged = Some(now);
            return Logged::Started;
        }
        w.count += 1;
        *w.by_status.entry(status).or_default() += 1;
        if let Some(e) = error
            && e != w.last_error
        {
            e.clone_into(&mut w.last_error);
        }
        drop(w);
        self.tick_at(now)
    }

    /// Writes the interval's summary when it is due; ends a quiet spell. Called by
    /// [`RetryLog::failed`] and by a timer, so the last interval is not left unsaid.
    pub fn tick(&self) -> Logged {
        self.tick_at(Instant::now())
    }

    fn tick_at(&self, now: Instant) -> Logged {
        let mut w = self.window.lock().expect("retry log lock");
        let (Some(since), Some(logged)) = (w.since, w.logged) else {
            return Logged::Nothing;
        };
        if now.duration_since(logged) < SUMMARY_EVERY {
            return Logged::Nothing;
        }
        if w.count == 0 {
            *w = Window::default();
            drop(w);
            tracing::info!(
                lasted_s = now.duration_since(since).as_secs(),
                "no failed attempts for {} s",
                SUMMARY_EVERY.as_secs()
            );
            return Logged::Ended;
        }
        let count = std::mem::take(&mut w.count);
        let by_status = std::mem::take(&mut w.by_status)
            .into_iter()
            .map(|(s, n)| match s {
                Some(s) => format!("{s}: {n}"),
                None => format!("no answer: {n}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let last_error = std::mem::take(&mut w.last_error);
        w.logged = Some(now);
        drop(w);
        tracing::info!(
            count,
            by_status,
            last_error,
            "{count} more attempts failed and were scheduled for retry in the last {} s",
            SUMMARY_EVERY.as_secs()
        );
        Logged::Summary { count }
    }
}

/// Keeps writing the summary of `log` while the process runs.
async fn summarize(log: &'static RetryLog) {
    let mut every = tokio::time::interval(SUMMARY_EVERY / 4);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        log.tick();
    }
}

impl Default for RetryLog {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's summary of failed attempts.
static RETRIES: RetryLog = RetryLog::new();

/// Notes a failed attempt scheduled for a retry in the process's summary; `true` when
/// the caller should log it at `info` (the first of a spell). Starts the summary's
/// timer on first use; needs a tokio runtime.
pub fn note_failed(status: Option<u16>, error: Option<&str>) -> bool {
    static TIMER: std::sync::Once = std::sync::Once::new();
    TIMER.call_once(|| {
        tokio::spawn(summarize(&RETRIES));
    });
    RETRIES.failed(status, error) == Logged::Started
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_then_one_summary_per_interval() {
        let log = RetryLog::new();
        let t0 = Instant::now();
        assert_eq!(
            log.failed_at(t0, Some(503), Some("HTTP 503")),
            Logged::Started
        );
        for i in 1..=500 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.failed_at(at, None, Some("refused")), Logged::Nothing);
        }
        // Due: the next failure (or the timer) writes the summary of what came after
        // the first line.
        let due = t0 + SUMMARY_EVERY;
        assert_eq!(
            log.failed_at(due, Some(503), Some("HTTP 503")),
            Logged::Summary { count: 501 }
        );
        assert_eq!(log.tick_at(due + Duration::from_secs(1)), Logged::Nothing);
        // A whole interval without failures ends the spell; the next one starts anew.
        assert_eq!(log.tick_at(due + SUMMARY_EVERY), Logged::Ended);
        assert_eq!(log.tick_at(due + SUMMARY_EVERY * 3), Logged::Nothing);
        let later = due + SUMMARY_EVERY * 4;
        assert_eq!(log.failed_at(later, None, None), Logged::Started);
    }

    #[test]
    fn the_timer_sums_up_the_last_interval() {
        let log = RetryLog::new();
        let t0 = Instant::now();
        log.failed_at(t0, None, Some("refused"));
        log.failed_at(t0 + Duration::from_secs(1), None, Some("refused"));
        assert_eq!(log.tick_at(t0 + Duration::from_secs(5)), Logged::Nothing);
        assert_eq!(
            log.tick_at(t0 + SUMMARY_EVERY),
            Logged::Summary { count: 1 }
        );
    }
}
