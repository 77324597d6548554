//! The demo downstream (`webhook-relay demo-downstream`, SPEC §10): a small HTTP
//! endpoint that fails and stalls a configurable share of requests, so a newcomer sees
//! retries and DLQ entries happen in the management UI.
//!
//! What happens to an event is decided by a hash of its `Idempotency-Key` (the event
//! id the relay forwards), not by chance: the same events always fail, so a demo run
//! (and its test) knows how many must end in the DLQ.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::event::{IDEMPOTENCY_KEY, RELAY_ATTEMPT};

/// How the demo downstream treats events and requests (`DEMO_*` variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behaviour {
    /// Percent of events that fail every attempt with 503, so they end in the DLQ.
    pub fail_percent: u8,
    /// Percent of (other) events that fail their first `flaky_attempts` attempts, then
    /// succeed: they visit the retry levels and are delivered.
    pub flaky_percent: u8,
    /// Attempts a flaky event fails before it succeeds.
    pub flaky_attempts: u32,
    /// Percent of requests answered only after `slow` (decided per attempt).
    pub slow_percent: u8,
    /// How long a slow answer takes; keep it below the relay's timeouts to see slowness
    /// rather than timeouts.
    pub slow: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            fail_percent: 10,
            flaky_percent: 20,
            flaky_attempts: 2,
            slow_percent: 10,
            slow: Duration::from_millis(1000),
        }
    }
}

/// What happens to one event over all its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Accepted at the first attempt.
    Deliver,
    /// Refused (503) this many times, then accepted.
    FailFirst(u32),
    /// Refused (503) at every attempt.
    FailAlways,
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// 200 or 503.
    pub status: StatusCode,
    /// How long to wait before answering.
    pub delay: Duration,
}

impl Behaviour {
    /// The fate of the event `id`: the first `fail_percent` hash buckets always fail,
    /// the next `flaky_percent` fail at first, the rest are delivered.
    pub fn fate(&self, id: &str) -> Fate {
        let b = bucket(&[b"fate", id.as_bytes()]);
        if b < u16::from(self.fail_percent) {
            Fate::FailAlways
        } else if b < u16::from(self.fail_percent) + u16::from(self.flaky_percent) {
            Fate::FailFirst(self.flaky_attempts)
        } else {
            Fate::Deliver
        }
    }

    /// The answer to attempt `attempt` (1-based) of event `id`.
    pub fn reply(&self, id: &str, attempt: u32) -> Reply {
        let fails = match self.fate(id) {
            Fate::Deliver => false,
            Fate::FailFirst(n) => attempt <= n,
            Fate::FailAlways => true,
        };
        let slow = bucket(&[b"slow", id.as_bytes(), &attempt.to_be_bytes()])
            < u16::from(self.slow_percent);
        Reply {
            status: if fails {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            },
            delay: if slow { self.slow } else { Duration::ZERO },
        }
    }
}

/// A stable bucket in 0..100 from a SHA-256 of the parts (stable across builds and
/// platforms, unlike the standard library's hasher).
fn bucket(parts: &[&[u8]]) -> u16 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n % 100) as u16
}

/// The demo downstream's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConfig {
    /// Address to listen on (`DEMO_LISTEN_ADDR`, default `0.0.0.0:9000`).
    pub listen_addr: SocketAddr,
    /// How requests are answered.
    pub behaviour: Behaviour,
}

/// The `DEMO_*` variables as strings, as envy reads them.
#[derive(Debug, Default, Deserialize)]
struct RawDemoEnv {
    listen_addr: Option<String>,
    fail_percent: Option<String>,
    flaky_percent: Option<String>,
    flaky_attempts: Option<String>,
    slow_percent: Option<String>,
    slow_ms: Option<String>,
}

impl DemoConfig {
    /// Reads the `DEMO_*` variables of the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_raw(
            envy::prefixed("DEMO_")
                .from_env::<RawDemoEnv>()
                .map_err(envy_error)?,
        )
    }

    /// Reads the same variables from explicit pairs (tests).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self::from_raw(
            envy::prefixed("DEMO_")
                .from_iter::<_, RawDemoEnv>(vars)
                .map_err(envy_error)?,
        )
    }

    fn from_raw(raw: RawDemoEnv) -> Result<Self, ConfigError> {
        let defaults = Behaviour::default();
        let listen_addr = match nonblank(raw.listen_addr) {
            None => SocketAddr::from(([0, 0, 0, 0], 9000)),
            Some(s) => s.parse().map_err(|_| {
                error(
                    "DEMO_LISTEN_ADDR",
                    format!("expected host:port such as 0.0.0.0:9000, got {s:?}"),
                )
            })?,
        };
        let fail_percent = percent("DEMO_FAIL_PERCENT", raw.fail_percent, defaults.fail_percent)?;
        let flaky_percent = percent(
            "DEMO_FLAKY_PERCENT",
            raw.flaky_percent,
            defaults.flaky_percent,
        )?;
        if u16::from(fail_percent) + u16::from(flaky_percent) > 100 {
            return Err(error(
                "DEMO_FLAKY_PERCENT",
                format!(
                    "DEMO_FAIL_PERCENT + DEMO_FLAKY_PERCENT must be at most 100 ({fail_percent} + {flaky_percent})"
                ),
            ));
        }
        let flaky_attempts = number(
            "DEMO_FLAKY_ATTEMPTS",
            raw.flaky_attempts,
            defaults.flaky_attempts,
        )?;
        let slow_percent = percent("DEMO_SLOW_PERCENT", raw.slow_percent, defaults.slow_percent)?;
        let slow_ms = number(
            "DEMO_SLOW_MS",
            raw.slow_ms,
            defaults.slow.as_millis() as u64,
        )?;
        Ok(Self {
            listen_addr,
            behaviour: Behaviour {
                fail_percent,
                flaky_percent,
                flaky_attempts,
                slow_percent,
                slow: Duration::from_millis(slow_ms),
            },
        })
    }
}

fn error(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

fn envy_error(e: envy::Error) -> ConfigError {
    error("environment", e.to_string())
}

fn nonblank(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn number<T: std::str::FromStr>(
    var: &'static str,
    raw: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match nonblank(raw) {
        None => Ok(default),
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| error(var, format!("expected a whole number, got {s:?}"))),
    }
}

fn percent(var: &'static str, raw: Option<String>, default: u8) -> Result<u8, ConfigError> {
    let p: u8 = number(var, raw, default)?;
    if p > 100 {
        return Err(error(var, format!("must be between 0 and 100, got {p}")));
    }
    Ok(p)
}

/// What the demo downstream saw, for `GET /stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered.
    requests: AtomicU64,
    /// Requests answered 503.
    failed: AtomicU64,
    /// Requests answered late.
    slow: AtomicU64,
    /// Ids of the events answered 200 at least once (a demo-sized set).
    delivered: Mutex<HashSet<String>>,
}

/// `GET /stats` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered 503.
    pub failed: u64,
    /// Requests answered late.
    pub slow: u64,
    /// Distinct events answered 200 (only ids starting with `id_prefix`, when given).
    pub delivered: u64,
}

/// `GET /stats` query.
#[derive(Debug, Deserialize)]
struct StatsQuery {
    /// Count only delivered ids with this prefix (one demo run's events).
    id_prefix: Option<String>,
}

/// Shared state of the handlers.
struct Demo {
    /// How requests are answered.
    behaviour: Behaviour,
    /// What was seen.
    stats: Stats,
}

/// The demo downstream's routes: `GET /healthz`, `GET /stats`, and any other request
/// is an event delivery.
pub fn router(behaviour: Behaviour) -> Router {
    let state = Arc::new(Demo {
        behaviour,
        stats: Stats::default(),
    });
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/stats", get(stats))
        .fallback(deliver)
        .with_state(state)
}

/// Serves on `listener` until `cancel` fires.
pub async fn run(
    listener: TcpListener,
    behaviour: Behaviour,
    cancel: CancellationToken,
) -> io::Result<()> {
    tracing::info!(
        addr = %listener.local_addr()?,
        fail_percent = behaviour.fail_percent,
        flaky_percent = behaviour.flaky_percent,
        flaky_attempts = behaviour.flaky_attempts,
        slow_percent = behaviour.slow_percent,
        slow_ms = behaviour.slow.as_millis() as u64,
        "demo downstream started"
    );
    axum::serve(listener, router(behaviour))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn deliver(State(demo): State<Arc<Demo>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // Without the relay's key (a request sent straight here), the body stands for the event.
    let id = header(IDEMPOTENCY_KEY)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("body-{:x}", Sha256::digest(&body)));
    let attempt = header(RELAY_ATTEMPT)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    let reply = demo.behaviour.reply(&id, attempt);
    if !reply.delay.is_zero() {
        demo.stats.slow.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(reply.delay).await;
    }
    demo.stats.requests.fetch_add(1, Ordering::Relaxed);
    if reply.status.is_success() {
        demo.stats
            .delivered
            .lock()
            .expect("stats lock")
            .insert(id.clone());
    } else {
        demo.stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(
        event_id = %id,
        attempt,
        status = reply.status.as_u16(),
        delay_ms = reply.delay.as_millis() as u64,
        "demo downstream answered"
    );
    let word = if reply.status.is_success() {
        "accepted"
    } else {
        "unavailable (demo failure)"
    };
    (
        reply.status,
        Json(serde_json::json!({"status": word, "id": id})),
    )
        .into_response()
}

async fn stats(State(demo): State<Arc<Demo>>, Query(q): Query<StatsQuery>) -> Json<StatsView> {
    let delivered = {
        let ids = demo.stats.delivered.lock().expect("stats lock");
        match q.id_prefix.as_deref() {
            Some(p) => ids.iter().filter(|id| id.starts_with(p)).count(),
            None => ids.len(),
        }
    };
    Json(StatsView {
        requests: demo.stats.requests.load(Ordering::Relaxed),
        failed: demo.stats.failed.load(Ordering::Relaxed),
        slow: demo.stats.slow.load(Ordering::Relaxed),
        delivered: delivered as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("demo-test-{i:05}")).collect()
    }

    #[test]
    fn shares_match_the_configuration() {
        let b = Behaviour {
            fail_percent: 10,
            flaky_percent: 30,
            flaky_attempts: 2,
            slow_percent: 25,
            slow: Duration::from_millis(5),
        };
        let ids = ids(20_000);
        let share = |f: &dyn Fn(&str) -> bool| {
            ids.iter().filter(|id| f(id)).count() as f64 / ids.len() as f64
        };
        let always = share(&|id| b.fate(id) == Fate::FailAlways);
        let flaky = share(&|id| b.fate(id) == Fate::FailFirst(2));
        let first_fails = share(&|id| b.reply(id, 1).status == StatusCode::SERVICE_UNAVAILABLE);
        let slow = share(&|id| !b.reply(id, 1).delay.is_zero());
        // 20 000 draws: one percentage point is more than four standard deviations.
        assert!(
            (always - 0.10).abs() < 0.01,
            "always-failing share {always}"
        );
        assert!((flaky - 0.30).abs() < 0.01, "flaky share {flaky}");
        assert!(
            (first_fails - 0.40).abs() < 0.01,
            "first attempts failing {first_fails}"
        );
        assert!((slow - 0.25).abs() < 0.01, "slow share {slow}");
    }

    #[test]
    fn fates_hold_over_attempts() {
        let b = Behaviour {
            flaky_attempts: 3,
            ..Behaviour::default()
        };
        for id in ids(2_000) {
            let statuses: Vec<u16> = (1..=6).map(|a| b.reply(&id, a).status.as_u16()).collect();
            match b.fate(&id) {
                Fate::Deliver => assert_eq!(statuses, [200; 6], "{id}"),
                Fate::FailAlways => assert_eq!(statuses, [503; 6], "{id}"),
                Fate::FailFirst(n) => {
                    assert_eq!(n, 3);
                    assert_eq!(statuses, [503, 503, 503, 200, 200, 200], "{id}");
                }
            }
            assert_eq!(b.reply(&id, 2), b.reply(&id, 2), "deterministic");
        }
    }

    #[test]
    fn zero_and_hundred_percent_are_exact() {
        let never = Behaviour {
            fail_percent: 0,
            flaky_percent: 0,
            slow_percent: 0,
            ..Behaviour::default()
        };
        let always = Behaviour {
            fail_percent: 100,
            flaky_percent: 0,
            slow_percent: 100,
            ..Behaviour::default()
        };
        for id in ids(1_000) {
            assert_eq!(never.reply(&id, 1).status, StatusCode::OK);
            assert!(never.reply(&id, 1).delay.is_zero());
            assert_eq!(always.reply(&id, 9).status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(always.reply(&id, 9).delay, always.slow);
        }
    }

    #[test]
    fn configuration_defaults_and_errors() {
        let c = DemoConfig::from_vars(Vec::<(String, String)>::new()).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.behaviour, Behaviour::default());
        let c =
            DemoConfig::from_vars([("DEMO_FAIL_PERCENT", "25"), ("DEMO_SLOW_MS", "0")]).unwrap();
        assert_eq!(c.behaviour.fail_percent, 25);
        assert!(c.behaviour.slow.is_zero());
        for (vars, var) in [
            (vec![("DEMO_FAIL_PERCENT", "101")], "DEMO_FAIL_PERCENT"),
            (vec![("DEMO_FAIL_PERCENT", "ten")], "DEMO_FAIL_PERCENT"),
            (
                vec![("DEMO_FAIL_PERCENT", "60"), ("DEMO_FLAKY_PERCENT", "50")],
                "DEMO_FLAKY_PERCENT",
            ),
            (vec![("DEMO_LISTEN_ADDR", "9000")], "DEMO_LISTEN_ADDR"),
            (vec![("DEMO_SLOW_MS", "-1")], "DEMO_SLOW_MS"),
        ] {
            let err = DemoConfig::from_vars(vars.clone()).unwrap_err();
            assert_eq!(err.var, var, "{vars:?}: {err}");
        }
    }
}
