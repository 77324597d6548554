//! A programmable mock downstream: the system we do not own, so a small axum server
//! is the right double (unlike the broker, which is always real).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// What the downstream answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer this status.
    Status(u16),
    /// Answer this status with a `Retry-After` header.
    RetryAfter(u16, &'static str),
    /// Wait, then answer 200.
    Slow(Duration),
    /// Never answer (until the client gives up).
    Hang,
    /// Wait, then answer this status.
    SlowStatus(Duration, u16),
    /// A downstream that serves this many requests at a time, each taking the given
    /// time, and answers 503 at once to any request past that.
    Capacity(usize, Duration),
}

/// A per-request rule, consulted before the script: `Some(reply)` decides.
pub type Rule = Arc<dyn Fn(&HeaderMap) -> Option<Reply> + Send + Sync>;

/// One request the downstream saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// The request target as sent: a path, or a whole URL when sent to a proxy.
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status answered (recorded once the reply is chosen; `Hang` records 0).
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Shared {
    rule: Mutex<Option<Rule>>,
    /// Replies used in order; `default` once they run out.
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running mock downstream.
#[derive(Clone)]
pub struct Downstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Downstream {
    /// Starts a downstream answering `default` to everything (after `script`, if set).
    pub async fn start(default: Reply) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), default).await
    }

    /// A loopback address nothing listens on: connections to it are refused until a
    /// downstream is started there with [`Downstream::start_at`].
    pub fn refusing_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Starts a downstream on `addr` (e.g. one that refused connections until now).
    pub async fn start_at(addr: SocketAddr, default: Reply) -> Self {
        let (app, shared) = router(default);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, shared }
    }

    /// Starts a downstream serving HTTPS only, with the certificate chain `cert_pem`
    /// and its key `key_pem`; its URL is [`Downstream::https_url`].
    pub async fn start_tls(cert_pem: &str, key_pem: &str, default: Reply) -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (app, shared) = router(default);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, shared }
    }

    /// Replies used (in order) before the default one.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// Decides replies per request (by header, e.g. the event id or attempt number).
    pub fn set_rule(&self, rule: impl Fn(&HeaderMap) -> Option<Reply> + Send + Sync + 'static) {
        *self.shared.rule.lock().unwrap() = Some(Arc::new(rule));
    }

    /// Ids (Idempotency-Key) answered 2xx, with how many times each was.
    pub fn delivered(&self) -> std::collections::HashMap<String, usize> {
        let mut out = std::collections::HashMap::new();
        for r in self.received() {
            if (200..300).contains(&r.status)
                && let Some(id) = r.header("idempotency-key")
            {
                *out.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Changes the default reply.
    pub fn set_default(&self, reply: Reply) {
        *self.shared.default.lock().unwrap() = Some(reply);
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The URL of a downstream started with [`Downstream::start_tls`], by the name its
    /// certificate carries.
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}/hook", self.addr.port())
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests seen for one event id (its `Idempotency-Key`).
    pub fn for_id(&self, id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.header("idempotency-key") == Some(id))
            .collect()
    }
}

/// The mock's router and the state it shares with its handle.
fn router(default: Reply) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    *shared.default.lock().unwrap() = Some(default);
    // As large a body as any test lets the relay take in (axum's default is 2 MB).
    let app = Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(16 << 20))
        .with_state(shared.clone());
    (app, shared)
}

async fn handle(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let rule = s.rule.lock().unwrap().clone();
    let reply = rule
        .and_then(|r| r(&headers))
        .or_else(|| s.script.lock().unwrap().pop_front())
        .or_else(|| s.default.lock().unwrap().clone())
        .unwrap_or(Reply::Status(200));
    let status = match &reply {
        Reply::Status(c) | Reply::RetryAfter(c, _) => *c,
        Reply::Slow(_) => 200,
        Reply::Hang => 0,
        Reply::SlowStatus(_, c) => *c,
        Reply::Capacity(limit, _) if now > *limit => 503,
        Reply::Capacity(..) => 200,
    };
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        uri,
        headers,
        body,
        status,
    });
    let response = match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(code, ra) => {
            (StatusCode::from_u16(code).unwrap(), [("retry-after", ra)]).into_response()
        }
        Reply::Slow(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Reply::SlowStatus(d, code) => {
            tokio::time::sleep(d).await;
            StatusCode::from_u16(code).unwrap().into_response()
        }
        Reply::Capacity(limit, _) if now > limit => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Reply::Capacity(_, d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}
