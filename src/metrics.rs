//! Prometheus metrics (SPEC §4.1): the recorder, the one-line recording calls the
//! relay makes at its decision points, the `/metrics` text, and the background task
//! that keeps queue depths fresh without a broker round-trip per scrape.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered by the receive endpoints, by `endpoint`, `code` and `answer`.
pub const EVENTS_RECEIVED: &str = "webhook_relay_events_received_total";
/// Downstream attempts, by `result` and `status_class`.
pub const DELIVERY_ATTEMPTS: &str = "webhook_relay_delivery_attempts_total";
/// Duration of one downstream attempt, by `result`.
pub const DELIVERY_DURATION: &str = "webhook_relay_delivery_duration_seconds";
/// Events durably parked in a retry level, by `level`.
pub const RETRIES_SCHEDULED: &str = "webhook_relay_retries_scheduled_total";
/// Events durably moved to the DLQ by the relay, by `reason`.
pub const DEAD_LETTERED: &str = "webhook_relay_dead_lettered_total";
/// DLQ messages replayed to the work queue, by `result` (`moved`, `failed`).
pub const DLQ_REPLAYED: &str = "webhook_relay_dlq_replayed_total";
/// DLQ messages deleted by a purge.
pub const DLQ_PURGED: &str = "webhook_relay_dlq_purged_total";
/// Time from publish to the broker's confirm, by `target` and `result`.
pub const PUBLISH_CONFIRM: &str = "webhook_relay_publish_confirm_seconds";
/// Ready messages per queue, by `queue` and `kind` (`work`, `retry`, `dlq`).
pub const QUEUE_DEPTH: &str = "webhook_relay_queue_depth";
/// 1 while the broker session is usable, else 0.
pub const BROKER_UP: &str = "webhook_relay_broker_up";
/// Configured capacity of each intake limit (`inline`, `bytes`, `connections`).
pub const INTAKE_CAPACITY: &str = "webhook_relay_intake_capacity";
/// What each intake limit has in use right now.
pub const INTAKE_IN_USE: &str = "webhook_relay_intake_in_use";
/// How often each intake limit was reached (an event sent queue-first, a 503, a
/// connection closed at once).
pub const INTAKE_LIMIT_HITS: &str = "webhook_relay_intake_limit_hits_total";
/// 1 for the broker node (`host:port`) the relay is connected to, 0 for the others.
pub const BROKER_NODE: &str = "webhook_relay_broker_node";
/// 1 while the broker blocks the relay's publishing connection (memory or disk alarm).
pub const BROKER_BLOCKED: &str = "webhook_relay_broker_blocked";
/// Outcome publishes a worker had to try again (nacked, timed out, broker blocking).
pub const SETTLE_RETRIES: &str = "webhook_relay_settle_retries_total";
/// Acks or rejects that failed (the delivery's channel was gone): the broker
/// redelivers those events.
pub const ACK_FAILURES: &str = "webhook_relay_ack_failures_total";

/// The adaptive concurrency limit of a worker process (SPEC §5a); `WORKER_CONCURRENCY`
/// when adaptive concurrency is off.
pub const CONCURRENCY_LIMIT: &str = "webhook_relay_concurrency_limit";
/// 1 for the circuit breaker's current `state` (`closed`, `open`, `half_open`), 0 for
/// the others; absent when the breaker is off.
pub const BREAKER_STATE: &str = "webhook_relay_circuit_breaker_state";
/// Circuit breaker state changes, by the `state` entered.
pub const BREAKER_CHANGES: &str = "webhook_relay_circuit_breaker_changes_total";
/// Events in `P.work` and the retry levels together, as `MAX_BACKLOG` reads them.
pub const BACKLOG: &str = "webhook_relay_backlog";

/// Histogram buckets (seconds): from a fast local confirm to a slow downstream.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later calls return the same
/// handle. `None` when another recorder was installed first (then `/metrics` is empty
/// and recording calls go to that recorder).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .expect("the bucket list is not empty")
                .install_recorder()
                .inspect_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!(
        EVENTS_RECEIVED,
        "Requests answered by the receive endpoints, by endpoint, HTTP code and answer."
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        "Downstream delivery attempts, by result and status class."
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "Duration of one downstream delivery attempt."
    );
    describe_counter!(
        RETRIES_SCHEDULED,
        "Events durably scheduled in a retry level."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Events durably moved to the DLQ by the relay, by reason."
    );
    describe_counter!(
        DLQ_REPLAYED,
        "DLQ messages replayed to the work queue (moved) or whose replay publish failed."
    );
    describe_counter!(DLQ_PURGED, "DLQ messages deleted by a purge.");
    describe_histogram!(
        PUBLISH_CONFIRM,
        Unit::Seconds,
        "Time from publish to the broker's confirm."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Ready messages per queue, refreshed every few seconds."
    );
    describe_gauge!(
        BROKER_UP,
        "1 while the broker connection is usable, else 0."
    );
    describe_gauge!(
        INTAKE_CAPACITY,
        "Configured capacity of each intake limit: inline attempts, body bytes, connections."
    );
    describe_gauge!(INTAKE_IN_USE, "What each intake limit has in use.");
    describe_counter!(
        INTAKE_LIMIT_HITS,
        "How often each intake limit was reached (inline: sent queue-first; bytes: 503; connections: closed)."
    );
    describe_gauge!(
        BROKER_NODE,
        "1 for the broker node the relay is connected to, 0 for the other configured ones."
    );
    describe_gauge!(
        BROKER_BLOCKED,
        "1 while the broker blocks the relay's publishing connection (memory or disk alarm)."
    );
    describe_counter!(
        SETTLE_RETRIES,
        "Outcome publishes a worker tried again after a nack, a timeout or a broker block."
    );
    describe_gauge!(
        CONCURRENCY_LIMIT,
        "Attempts a worker process may have in flight (the adaptive concurrency limit)."
    );
    describe_gauge!(
        BREAKER_STATE,
        "1 for the circuit breaker's current state (closed, open, half_open), else 0."
    );
    describe_counter!(
        BREAKER_CHANGES,
        "Circuit breaker state changes, by the state entered."
    );
    describe_gauge!(
        BACKLOG,
        "Events in the work queue and the retry levels together, refreshed from the broker."
    );
    describe_counter!(
        ACK_FAILURES,
        "Acks or rejects that failed because the delivery's channel was gone (the event is redelivered)."
    );
}

/// The series a process can move, known when it starts: registering them at 0 lets
/// the first scrape show every family, so dashboards draw a line from the start and
/// `rate()` sees the first increment.
#[derive(Debug, Clone, Copy)]
pub struct KnownSeries<'a> {
    /// The process answers the receive endpoints.
    pub receives: bool,
    /// The receiver attempts delivery before it answers (`INLINE_DELIVERY`).
    pub inline: bool,
    /// The process makes downstream attempts (a worker, or an inline receiver).
    pub delivers: bool,
    /// The process serves `/admin` (DLQ replay and purge).
    pub admin: bool,
    /// The delays of the retry ladder, level 1 first.
    pub retry_delays: &'a [Duration],
}

/// The receive routes, as [`received`] labels them.
pub const RECEIVE_ENDPOINTS: [&str; 2] = ["/webhook/receive", "/webhooks/{name}"];

/// Codes an error answer of the receive endpoints carries (SPEC §4.2): bad body,
/// failed authentication, slow request, body too large, event not stored.
const ERROR_CODES: [u16; 5] = [400, 401, 408, 413, 503];

/// `result` and `status_class` pairs an attempt can end in: a 2xx delivers, a 3xx or
/// a 4xx other than 408/429 is refused, 408/429, a 5xx or no answer are retried.
const ATTEMPT_SERIES: [(&str, &str); 6] = [
    ("delivered", "2xx"),
    ("permanent", "3xx"),
    ("permanent", "4xx"),
    ("retryable", "4xx"),
    ("retryable", "5xx"),
    ("retryable", "none"),
];

/// Registers at 0 every series of [`KnownSeries`]; called once when the process starts.
pub fn register_known(known: &KnownSeries<'_>) {
    if known.receives {
        let answers: &[(u16, &'static str)] = if known.inline {
            // Past INLINE_MAX_INFLIGHT an inline receiver queues (202 `queued`) too.
            &[
                (200, "delivered"),
                (202, "queued_for_retry"),
                (202, "dead_lettered"),
                (202, "queued"),
            ]
        } else {
            &[(202, "queued")]
        };
        let errors = ERROR_CODES.map(|code| (code, "error"));
        for endpoint in RECEIVE_ENDPOINTS {
            for &(code, answer) in answers.iter().chain(&errors) {
                counter!(EVENTS_RECEIVED, "endpoint" => endpoint, "code" => code.to_string(), "answer" => answer)
                    .increment(0);
            }
        }
    }
    let mut targets = Vec::new();
    if known.delivers {
        for (result, class) in ATTEMPT_SERIES {
            counter!(DELIVERY_ATTEMPTS, "result" => result, "status_class" => class).increment(0);
        }
        for result in ["delivered", "permanent", "retryable"] {
            let _ = histogram!(DELIVERY_DURATION, "result" => result);
        }
        for (level, delay) in known.retry_delays.iter().enumerate() {
            counter!(RETRIES_SCHEDULED, "level" => level_label(level, *delay)).increment(0);
        }
        for reason in [
            crate::retry::DeadLetterReason::AttemptsExhausted,
            crate::retry::DeadLetterReason::Refused,
        ] {
            counter!(DEAD_LETTERED, "reason" => reason.as_str()).increment(0);
        }
        targets.extend(["retry", "dlq"]);
        counter!(SETTLE_RETRIES).increment(0);
        counter!(ACK_FAILURES).increment(0);
    }
    // A receiver publishes to the work queue: every event without inline delivery,
    // the ones past INLINE_MAX_INFLIGHT with it.
    if known.receives {
        targets.push("work");
        for limit in ["inline", "bytes", "connections"] {
            counter!(INTAKE_LIMIT_HITS, "limit" => limit).increment(0);
        }
    }
    for target in targets {
        for result in ["confirmed", "failed"] {
            let _ = histogram!(PUBLISH_CONFIRM, "target" => target, "result" => result);
        }
    }
    if known.admin {
        for result in ["moved", "failed"] {
            counter!(DLQ_REPLAYED, "result" => result).increment(0);
        }
        counter!(DLQ_PURGED).increment(0);
    }
}

/// The `/metrics` body, in Prometheus text format.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// The recorder's periodic upkeep (keeps histogram memory bounded between scrapes).
pub fn upkeep() {
    if let Some(h) = install() {
        h.run_upkeep();
    }
}

/// The broker session is usable (`up`) and the broker is (not) blocking publishers.
pub fn broker_state(up: bool, blocked: bool) {
    gauge!(BROKER_UP).set(if up { 1.0 } else { 0.0 });
    gauge!(BROKER_BLOCKED).set(if blocked { 1.0 } else { 0.0 });
}

/// Intake limit `limit` has `capacity`.
pub fn intake_capacity(limit: &'static str, capacity: usize) {
    gauge!(INTAKE_CAPACITY, "limit" => limit).set(capacity as f64);
}

/// The gauge of what intake limit `limit` has in use, as a handle: it is set twice per
/// request, and a held handle is one atomic store where a lookup by name and label is
/// a key built, hashed and found each time. Made after [`install`], or it counts into
/// nothing.
pub fn intake_in_use(limit: &'static str) -> metrics::Gauge {
    gauge!(INTAKE_IN_USE, "limit" => limit)
}

/// Intake limit `limit` was reached once more.
pub fn intake_limit_hit(limit: &'static str) {
    counter!(INTAKE_LIMIT_HITS, "limit" => limit).increment(1);
}

/// Whether the relay is connected to broker `node` (`host:port`) right now.
pub fn broker_node(node: &str, in_use: bool) {
    gauge!(BROKER_NODE, "node" => node.to_owned()).set(if in_use { 1.0 } else { 0.0 });
}

/// `queue` (of `kind` work, retry or dlq) holds `ready` messages.
pub fn queue_depth(queue: &str, kind: &'static str, ready: u32) {
    gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "kind" => kind).set(f64::from(ready));
}

/// The adaptive concurrency limit is now `limit`.
pub fn concurrency_limit(limit: usize) {
    gauge!(CONCURRENCY_LIMIT).set(limit as f64);
}

/// The circuit breaker is in `state` (`closed`, `open` or `half_open`); `changed` when
/// it just entered it.
pub fn breaker_state(state: &'static str, changed: bool) {
    for s in ["closed", "open", "half_open"] {
        gauge!(BREAKER_STATE, "state" => s).set(if s == state { 1.0 } else { 0.0 });
    }
    if changed {
        counter!(BREAKER_CHANGES, "state" => state).increment(1);
    }
}

/// `P.work` and the retry levels hold `held` events.
pub fn backlog(held: u64) {
    gauge!(BACKLOG).set(held as f64);
}

/// A worker tries an outcome publish again.
pub fn settle_retried() {
    counter!(SETTLE_RETRIES).increment(1);
}

/// An ack or reject failed; the broker will redeliver the event.
pub fn ack_failed() {
    counter!(ACK_FAILURES).increment(1);
}

/// A receive endpoint answered `code` with body status `answer`.
pub fn received(endpoint: &'static str, code: u16, answer: &'static str) {
    static KEPT: Handles<(&str, u16, &str), Counter> = Handles::new();
    KEPT.with((endpoint, code, answer), |c| c.increment(1), || {
        counter!(EVENTS_RECEIVED, "endpoint" => endpoint, "code" => code.to_string(), "answer" => answer)
    });
}

/// One downstream attempt ended in `result` (with HTTP `status`, if any) after `took`.
pub fn attempted(result: &'static str, status: Option<u16>, took: Duration) {
    static COUNTED: Handles<(&str, &str), Counter> = Handles::new();
    static TIMED: Handles<&str, Histogram> = Handles::new();
    let class = status_class(status);
    COUNTED.with(
        (result, class),
        |c| c.increment(1),
        || counter!(DELIVERY_ATTEMPTS, "result" => result, "status_class" => class),
    );
    TIMED.with(
        result,
        |h| h.record(took),
        || histogram!(DELIVERY_DURATION, "result" => result),
    );
}

/// An event is durably in retry level `level` (0-based) of delay `delay`.
pub fn retry_scheduled(level: usize, delay: Duration) {
    static KEPT: Handles<(usize, Duration), Counter> = Handles::new();
    KEPT.with(
        (level, delay),
        |c| c.increment(1),
        || counter!(RETRIES_SCHEDULED, "level" => level_label(level, delay)),
    );
}

/// An event is durably in the DLQ for `reason`.
pub fn dead_lettered(reason: &'static str) {
    counter!(DEAD_LETTERED, "reason" => reason).increment(1);
}

/// A DLQ message was moved back to the work queue (`moved`) or its publish failed.
pub fn replayed(result: &'static str) {
    counter!(DLQ_REPLAYED, "result" => result).increment(1);
}

/// A DLQ message was deleted by a purge.
pub fn purged() {
    counter!(DLQ_PURGED).increment(1);
}

/// A publish to `target` (work, retry, dlq) was confirmed or failed after `took`.
pub fn publish_confirmed(target: &'static str, confirmed: bool, took: Duration) {
    static KEPT: Handles<(&str, bool), Histogram> = Handles::new();
    KEPT.with(
        (target, confirmed),
        |h| h.record(took),
        || {
            let result = if confirmed { "confirmed" } else { "failed" };
            histogram!(PUBLISH_CONFIRM, "target" => target, "result" => result)
        },
    );
}

/// Metric handles by their label values, each made once: the hot paths count every
/// event, and a held handle is an atomic add where the macros build a key, hash it and
/// look it up in the recorder's registry on every call. Nothing is kept until the
/// recorder is installed, since a handle made before counts into nothing.
struct Handles<K, H>(RwLock<Option<HashMap<K, H>>>);

impl<K: Hash + Eq, H> Handles<K, H> {
    const fn new() -> Self {
        Self(RwLock::new(None))
    }

    /// Calls `with` on the handle of `key`, made by `make` the first time.
    fn with(&self, key: K, with: impl FnOnce(&H), make: impl FnOnce() -> H) {
        self.with_kept(HANDLE.get().is_some(), key, with, make);
    }

    fn with_kept(&self, keep: bool, key: K, with: impl FnOnce(&H), make: impl FnOnce() -> H) {
        if !keep {
            return with(&make());
        }
        let kept = self.0.read().expect("metric handles");
        if let Some(h) = kept.as_ref().and_then(|m| m.get(&key)) {
            return with(h);
        }
        drop(kept);
        let mut kept = self.0.write().expect("metric handles");
        with(
            kept.get_or_insert_with(HashMap::new)
                .entry(key)
                .or_insert_with(make),
        );
    }
}

/// `2xx` .. `5xx`, or `none` when the downstream never answered (pure).
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "none",
    }
}

/// The level label, the ladder part of the queue name: `01-2s` (pure).
pub fn level_label(level: usize, delay: Duration) -> String {
    format!("{:02}-{}", level + 1, crate::retry::human_delay(delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_made_once_per_key_once_kept() {
        let kept: Handles<(&str, u16), u32> = Handles::new();
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            made.get()
        };
        let seen = std::cell::RefCell::new(Vec::new());
        let see = |h: &u32| seen.borrow_mut().push(*h);
        // Before the recorder exists nothing is kept: every call makes its own.
        kept.with_kept(false, ("a", 1), see, make);
        kept.with_kept(false, ("a", 1), see, make);
        assert_eq!(made.get(), 2);
        // Once kept, a key's handle is made the first time and reused after.
        kept.with_kept(true, ("a", 1), see, make);
        kept.with_kept(true, ("a", 1), see, make);
        kept.with_kept(true, ("b", 1), see, make);
        kept.with_kept(true, ("a", 1), see, make);
        assert_eq!(made.get(), 4);
        assert_eq!(*seen.borrow(), [1, 2, 3, 3, 4, 3]);
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(204)), "2xx");
        assert_eq!(status_class(Some(302)), "3xx");
        assert_eq!(status_class(Some(404)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(Some(99)), "other");
        assert_eq!(status_class(None), "none");
    }

    #[test]
    fn level_labels_match_queue_names() {
        assert_eq!(level_label(0, Duration::from_secs(2)), "01-2s");
        assert_eq!(level_label(11, Duration::from_secs(3600)), "12-1h");
        assert_eq!(level_label(0, Duration::from_millis(40)), "01-40ms");
    }
}
