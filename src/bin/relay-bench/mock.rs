//! The fast mock downstream: answers one fixed status to every request and tallies
//! the `Idempotency-Key` it was sent, so a scenario can prove what reached it. Or a
//! downstream of limited capacity: that many requests at a time, 503 past it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use tokio::task::JoinHandle;

use crate::tally::Tally;

struct Shared {
    /// What every request gets.
    status: StatusCode,
    /// Which event ids arrived, and how often.
    tally: Tally,
    /// Reference point of `first_ns` / `last_ns`.
    epoch: Instant,
    /// When the first request arrived (ns after `epoch`; `u64::MAX` before any).
    first_ns: AtomicU64,
    /// When the latest request arrived (ns after `epoch`); for a limited capacity,
    /// when the latest delivered one was answered.
    last_ns: AtomicU64,
    /// Requests served at a time and how long each takes; past it, 503 at once.
    capacity: Option<(usize, Duration)>,
    /// Requests being served now.
    in_flight: AtomicUsize,
    /// Requests answered, and of those refused with 503 for lack of capacity.
    answered: AtomicU64,
    refused: AtomicU64,
}

/// A running mock downstream; stops when dropped.
pub struct Mock {
    /// Where it listens (loopback, port chosen by the OS).
    pub addr: SocketAddr,
    /// State shared with the handler.
    shared: Arc<Shared>,
    /// The server task, aborted on drop.
    server: JoinHandle<()>,
}

impl Mock {
    /// Starts a mock answering `status` and expecting ids 0..count of `tag`.
    pub async fn start(status: StatusCode, tag: &str, count: usize) -> std::io::Result<Self> {
        Self::serve(status, None, tag, count).await
    }

    /// Starts a mock that serves `capacity` requests at a time, each taking `took`, and
    /// answers 503 at once past that; only served (200) requests are tallied.
    pub async fn with_capacity(
        capacity: usize,
        took: Duration,
        tag: &str,
        count: usize,
    ) -> std::io::Result<Self> {
        Self::serve(StatusCode::OK, Some((capacity, took)), tag, count).await
    }

    async fn serve(
        status: StatusCode,
        capacity: Option<(usize, Duration)>,
        tag: &str,
        count: usize,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            status,
            tally: Tally::new(tag, count),
            epoch: Instant::now(),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            capacity,
            in_flight: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let app = Router::new().fallback(hook).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// The URL to post events to.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The ids seen so far.
    pub fn tally(&self) -> &Tally {
        &self.shared.tally
    }

    /// Requests answered, and how many of them were refused for lack of capacity.
    pub fn answered(&self) -> (u64, u64) {
        (
            self.shared.answered.load(Ordering::Relaxed),
            self.shared.refused.load(Ordering::Relaxed),
        )
    }

    /// Time from the first to the latest request, once any arrived.
    pub fn active_span(&self) -> Option<Duration> {
        let first = self.shared.first_ns.load(Ordering::Relaxed);
        let last = self.shared.last_ns.load(Ordering::Relaxed);
        (first != u64::MAX).then(|| Duration::from_nanos(last.saturating_sub(first)))
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn hook(State(s): State<Arc<Shared>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let now = s.epoch.elapsed().as_nanos() as u64;
    s.first_ns.fetch_min(now, Ordering::Relaxed);
    s.answered.fetch_add(1, Ordering::Relaxed);
    if let Some((capacity, took)) = s.capacity {
        let serving = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if serving > capacity {
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            s.refused.fetch_add(1, Ordering::Relaxed);
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        tokio::time::sleep(took).await;
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        let done = s.epoch.elapsed().as_nanos() as u64;
        s.last_ns.fetch_max(done, Ordering::Relaxed);
    } else {
        s.last_ns.fetch_max(now, Ordering::Relaxed);
    }
    match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(id) => s.tally.record(id),
        None => s.tally.record(""),
    }
    s.status
}
