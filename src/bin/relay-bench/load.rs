//! The HTTP load generator: N keep-alive connections, each a task sending events
//! with unique ids back to back, every answer checked, every latency kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::tally::event_id;

/// One load run.
#[derive(Debug, Clone)]
pub struct Load {
    /// Where events are posted.
    pub url: String,
    /// Number of the first event (its id) of this run; later rounds continue the count.
    pub first: usize,
    /// Events to send (ids first..first + count of `tag`).
    pub count: usize,
    /// Concurrent keep-alive connections, one request in flight on each.
    pub connections: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Run tag the ids start with.
    pub tag: String,
    /// Send the id as `Idempotency-Key` too (the direct baseline, where no relay adds it).
    pub id_header: bool,
    /// The answer every request must get.
    pub expect: Expect,
    /// Give up sending after this long (the run then fails its count check).
    pub deadline: Duration,
    /// Events per second across all connections, each sent at its scheduled time;
    /// `None` sends back to back (the most the target takes). Paced, latency is the
    /// target's own, not the wait behind other requests that saturation adds.
    pub pace: Option<f64>,
}

/// The answer a request must get to count as correct.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// HTTP status.
    pub status: u16,
    /// The relay's body `status` word with the event's own id; `None` for the mock.
    pub word: Option<&'static str>,
}

/// What a load run measured.
#[derive(Debug, Default)]
pub struct Sent {
    /// Requests answered as expected.
    pub ok: usize,
    /// Requests answered otherwise, or failed; the first few are in `samples`.
    pub wrong: usize,
    /// A few wrong answers, for the error message.
    pub samples: Vec<String>,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
    /// Latency of every correct request, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Sent {
    /// Correct answers per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of latency in milliseconds (0 when nothing succeeded).
    pub fn latency_ms(&self, q: f64) -> f64 {
        f64::from(quantile(&self.latencies_us, q)) / 1000.0
    }
}

/// The `q` quantile (nearest rank) of sorted values; 0 for none.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A JSON event of exactly `size` bytes (or the smallest possible, if larger) shaped
/// like an EventBridge envelope, whose `id` the relay takes as the event id.
pub fn event_body(id: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"{id}","detail-type":"v2.routing.queues.bench.conversations","source":"relay-bench","detail":{{"pad":""#
    );
    let tail = r#""}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + pad + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(tail.as_bytes());
    body
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    id: String,
}

/// Runs the load to completion (or its deadline).
pub async fn run(load: Load) -> Sent {
    let load = Arc::new(load);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..load.connections)
        .map(|_| tokio::spawn(connection(load.clone(), next.clone(), started)))
        .collect();
    let mut sent = Sent::default();
    for t in tasks {
        let part = t.await.expect("load task does not panic");
        sent.ok += part.ok;
        sent.wrong += part.wrong;
        sent.latencies_us.extend(part.latencies_us);
        if sent.samples.len() < 5 {
            sent.samples.extend(part.samples);
        }
    }
    sent.elapsed = started.elapsed();
    sent.latencies_us.sort_unstable();
    sent
}

/// One keep-alive connection, opened again only after a failed request. A plain HTTP/1.1
/// connection (hyper's own client side, `TCP_NODELAY` as every HTTP client sets it)
/// rather than a pooled client: on a machine the generator shares with the relay and
/// the broker, every microsecond it spends per request is taken from them.
async fn connection(load: Arc<Load>, next: Arc<AtomicUsize>, started: Instant) -> Sent {
    let mut part = Sent::default();
    let target = match Target::parse(&load.url) {
        Ok(t) => t,
        Err(why) => {
            part.wrong = 1;
            part.samples.push(why);
            return part;
        }
    };
    let mut open: Option<http1::SendRequest<Full<Bytes>>> = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= load.count || started.elapsed() > load.deadline {
            break;
        }
        if let Some(rate) = load.pace {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let id = event_id(&load.tag, load.first + n);
        let mut request = Request::post(target.path.clone())
            .header(header::HOST, target.host.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if load.id_header {
            request = request.header("idempotency-key", &id);
        }
        let request = request
            .body(Full::new(Bytes::from(event_body(&id, load.size))))
            .expect("a request of valid parts");
        let t0 = Instant::now();
        let exchange = async {
            let sender = match open.as_mut() {
                Some(s) => s,
                None => open.insert(target.connect().await?),
            };
            sender
                .ready()
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            check(&load.expect, &id, status, &body)
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
        };
        let took = t0.elapsed();
        match result {
            Ok(()) => {
                part.ok += 1;
                part.latencies_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            }
            Err(why) => {
                // The connection may be in any state now: the next request opens a new one.
                open = None;
                part.wrong += 1;
                if part.samples.len() < 5 {
                    part.samples.push(format!("{id}: {why}"));
                }
            }
        }
    }
    part
}

/// Longest wait for one answer, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a load posts: the address to connect to, the `Host` header and the path.
struct Target {
    host: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url}: only http:// is generated"));
        }
        let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?;
        let host = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { host, path })
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::TcpStream::connect(&self.host)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.host))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", self.host))?;
        // Ends when the sender is dropped or the peer closes.
        tokio::spawn(connection);
        Ok(sender)
    }
}

fn check(expect: &Expect, id: &str, status: u16, body: &[u8]) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if status != expect.status {
        return Err(format!(
            "HTTP {status}, expected {}: {}",
            expect.status,
            shown()
        ));
    }
    if let Some(word) = expect.word {
        match serde_json::from_slice::<Answer>(body) {
            Ok(a) if a.status == word && a.id == id => {}
            _ => {
                return Err(format!(
                    "answer {}, expected status {word} and id {id}",
                    shown()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_asked_size_and_carry_their_id() {
        for size in [1024, 4096, 300] {
            let body = event_body("rb-00000007", size);
            assert_eq!(body.len(), size);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["id"], "rb-00000007");
        }
        // Smaller than the envelope itself: the envelope, unpadded, still valid.
        let tiny = event_body("x", 10);
        assert!(tiny.len() > 10);
        serde_json::from_slice::<serde_json::Value>(&tiny).unwrap();
    }

    #[test]
    fn targets_name_the_address_the_host_and_the_path() {
        let t = Target::parse("http://127.0.0.1:8080/webhook/receive").unwrap();
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/webhook/receive")
        );
        let t = Target::parse("http://localhost/x?y=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("localhost:80", "/x?y=1")
        );
        assert!(Target::parse("https://localhost/").is_err());
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn answers_are_checked_for_status_word_and_id() {
        let relay = Expect {
            status: 202,
            word: Some("queued"),
        };
        assert!(check(&relay, "a", 202, br#"{"status":"queued","id":"a"}"#).is_ok());
        assert!(check(&relay, "a", 202, br#"{"status":"queued","id":"b"}"#).is_err());
        assert!(check(&relay, "a", 202, br#"{"status":"delivered","id":"a"}"#).is_err());
        assert!(check(&relay, "a", 503, br#"{"status":"queued","id":"a"}"#).is_err());
        let mock = Expect {
            status: 200,
            word: None,
        };
        assert!(check(&mock, "a", 200, b"").is_ok());
    }
}
