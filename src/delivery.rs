//! The downstream client and the outcome of one delivery attempt (SPEC §3, §4.3),
//! with the headers every delivery carries: static ones (`DOWNSTREAM_HEADERS`) and a
//! Standard Webhooks signature (`DOWNSTREAM_SIGNING_SECRET`).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::Uri;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::client::proxy;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::Sha256;

use crate::envelope::Envelope;
use crate::event::{IDEMPOTENCY_KEY, RELAY_ATTEMPT};

/// Standard Webhooks: the message id (the event id, the same on every attempt).
pub const WEBHOOK_ID: &str = "webhook-id";
/// Standard Webhooks: Unix seconds when this attempt was signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Headers the relay itself sets on every delivery; with `event::HOP_HEADERS`, what
/// `DOWNSTREAM_HEADERS` may not set.
const RESERVED: &[&str] = &[
    "content-type",
    IDEMPOTENCY_KEY,
    RELAY_ATTEMPT,
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
];

/// Parses `DOWNSTREAM_HEADERS`: a JSON object of header name to string value, such as
/// `{"X-Api-Key":"k-123","X-Tenant":"acme"}`. Values are marked sensitive, so they
/// never show in debug output.
pub fn parse_static_headers(text: &str) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!(r#"expected a JSON object such as {{"X-Api-Key":"..."}} ({e})"#))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        let header = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        if RESERVED.contains(&header.as_str())
            || crate::event::HOP_HEADERS.contains(&header.as_str())
        {
            return Err(format!(
                "{name:?} is set by the relay itself and cannot be configured"
            ));
        }
        let serde_json::Value::String(value) = value else {
            return Err(format!("the value of {name:?} must be a JSON string"));
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of {name:?} is not a valid header value"))?;
        value.set_sensitive(true);
        out.push((header, value));
    }
    Ok(out)
}

/// A Standard Webhooks signing key, given as `whsec_<base64>`; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    /// Parses `whsec_<base64 key>`, the form Standard Webhooks libraries take.
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or("expected whsec_<base64 key>, the Standard Webhooks secret format")?;
        let key = BASE64
            .decode(b64)
            .map_err(|_| "the part after whsec_ is not valid base64")?;
        if key.is_empty() {
            return Err("the key after whsec_ is empty".into());
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` value for message `id` sent at `timestamp` (Unix seconds).
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

/// The headers of one delivery attempt (pure): the forwarded request headers, the
/// original content type, the static headers (which win over forwarded ones of the
/// same name), `Idempotency-Key`, `X-Relay-Attempt`, and with a key the Standard
/// Webhooks trio signed at `now` (each attempt is signed afresh, so a retry hours
/// later still passes a verifier's timestamp tolerance).
pub fn delivery_headers(
    event: &Envelope,
    attempt: u32,
    static_headers: &[(HeaderName, HeaderValue)],
    signing: Option<&SigningKey>,
    now: SystemTime,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(event.headers.len() + static_headers.len() + 6);
    for (name, value) in &event.headers {
        // Stored headers came from a valid request; skip anything that no longer parses.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&event.content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    for (name, value) in static_headers {
        headers.insert(name.clone(), value.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&event.id) {
        headers.insert(IDEMPOTENCY_KEY, v);
    }
    headers.insert(RELAY_ATTEMPT, HeaderValue::from(attempt));
    if let Some(key) = signing {
        let ts = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = key.sign(&event.id, ts, &event.body);
        if let (Ok(id), Ok(sig)) = (
            HeaderValue::from_str(&event.id),
            HeaderValue::from_str(&signature),
        ) {
            headers.insert(WEBHOOK_ID, id);
            headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(ts));
            headers.insert(WEBHOOK_SIGNATURE, sig);
        }
    }
    headers
}

/// How one attempt ended, as far as the retry policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The downstream answered 2xx.
    Delivered {
        /// The 2xx status.
        status: u16,
    },
    /// Worth another try: network failure, timeout, 408, 429 or 5xx.
    Retryable {
        /// The status, when the downstream answered at all.
        status: Option<u16>,
        /// What went wrong, for the event's headers and the logs.
        error: String,
        /// The downstream's `Retry-After` (429/503 only).
        retry_after: Option<Duration>,
        /// The attempt ran out of time (DELIVERY_TIMEOUT_MS or INLINE_TIMEOUT_MS): a sign
        /// of an overloaded downstream, like a 429 or 503.
        timed_out: bool,
    },
    /// Refused for good: 3xx (redirects are not followed) or a 4xx other than 408/429.
    Permanent {
        /// The status.
        status: Option<u16>,
        /// Why, for the event's headers and the logs.
        error: String,
    },
}

impl Outcome {
    /// The downstream's status, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Delivered { status } => Some(*status),
            Self::Retryable { status, .. } | Self::Permanent { status, .. } => *status,
        }
    }

    /// The error text, if the attempt failed.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Delivered { .. } => None,
            Self::Retryable { error, .. } | Self::Permanent { error, .. } => Some(error),
        }
    }

    /// Whether the downstream said it is overloaded: 429, 503 or no answer in time.
    /// The adaptive concurrency limit backs off on these (SPEC §5a).
    pub fn is_overload(&self) -> bool {
        match self {
            Self::Retryable {
                status, timed_out, ..
            } => *timed_out || matches!(status, Some(429 | 503)),
            _ => false,
        }
    }

    /// The label used in logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::Retryable { .. } => "retryable",
            Self::Permanent { .. } => "permanent",
        }
    }
}

/// Classifies a downstream answer (pure).
pub fn classify(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        return Outcome::Delivered { status: code };
    }
    let error = format!(
        "HTTP {code}{}",
        status
            .canonical_reason()
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    );
    if matches!(code, 408 | 429) || status.is_server_error() {
        let retry_after = if matches!(code, 429 | 503) {
            headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now))
        } else {
            None
        };
        Outcome::Retryable {
            status: Some(code),
            error,
            retry_after,
            timed_out: false,
        }
    } else {
        Outcome::Permanent {
            status: Some(code),
            error,
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The downstream: one URL, one shared keep-alive HTTP client.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// How requests reach the URL: connection pool reused across attempts; redirects
    /// never followed.
    transport: Transport,
    /// Added to every delivery (`DOWNSTREAM_HEADERS`), e.g. the downstream's API key.
    static_headers: Vec<(HeaderName, HeaderValue)>,
    /// Signs every delivery the Standard Webhooks way (`DOWNSTREAM_SIGNING_SECRET`).
    signing: Option<SigningKey>,
    /// When the downstream last refused a connection, if no attempt got an answer since.
    refused: Arc<Mutex<Option<Instant>>>,
}

/// After a refused connection, attempts within this long fail at once without
/// connecting: a downstream that is down refuses every connect, and each refused
/// connect cost about a quarter of the relay's CPU on that path. One attempt per window
/// connects for real, so a recovered downstream is seen within this long.
pub const REFUSED_HOLD: Duration = Duration::from_millis(50);

/// Longest wait for the rest of an answer's body once its status is known: it is read
/// (and dropped) so the connection can carry the next attempt.
const DRAIN_WITHIN: Duration = Duration::from_millis(200);

/// TCP keepalive on downstream connections (first probe, interval, probes) and the
/// time unacknowledged data may sit before the connection is dropped: a pooled
/// connection to a downstream that vanished is found dead, not waited on. reqwest's
/// defaults, kept when the relay stopped sending through it.
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The pooled HTTP/1.1 client of a direct downstream: plain or rustls TLS.
type DirectClient = legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How deliveries reach the downstream.
#[derive(Clone)]
enum Transport {
    /// hyper-util's pooled client, the one reqwest is built on, used as is: reqwest
    /// wraps every request in layers the relay has no use for (a redirect policy that
    /// parses the URL again on every request even with redirects off, a retry layer, a
    /// proxy lookup, the URL turned into a URI), about 34,000 instructions a request,
    /// more than the rest of the client and the server together (README, Performance).
    Direct {
        /// The pool, shared by every attempt (boxed: it is most of the enum's size,
        /// and built once).
        client: Box<DirectClient>,
        /// `DOWNSTREAM_URL` without its credentials, parsed once.
        uri: Uri,
        /// `Authorization: Basic` from credentials in `DOWNSTREAM_URL`, as reqwest
        /// sent them; a configured `Authorization` header wins.
        basic_auth: Option<HeaderValue>,
    },
    /// reqwest, when the environment names a proxy for the downstream (`HTTP_PROXY`,
    /// `HTTPS_PROXY`, `ALL_PROXY`, less `NO_PROXY`): it speaks to proxies, plain and
    /// tunnelled, with their credentials.
    Proxied {
        /// reqwest's client, with the proxy from the environment.
        client: reqwest::Client,
        /// `DOWNSTREAM_URL` as given.
        url: reqwest::Url,
    },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may carry credentials.
        f.write_str(match self {
            Self::Direct { .. } => "Direct",
            Self::Proxied { .. } => "Proxied",
        })
    }
}

/// Why the downstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The platform's certificate verifier could not be set up (no trust store).
    #[error("setting up TLS for the downstream: {0}")]
    Tls(#[from] std::io::Error),
    /// reqwest refused its configuration (the proxied transport).
    #[error("building the proxied HTTP client: {0}")]
    Proxied(#[from] reqwest::Error),
    /// The URL is not a valid request target.
    #[error("DOWNSTREAM_URL is not a valid request URI")]
    Uri,
}

/// An attempt that got no answer: what the outcome needs to know of it.
struct NoAnswer {
    /// It ran out of time.
    timed_out: bool,
    /// Nothing listens at the downstream's address.
    refused: bool,
    /// It failed while connecting (DNS, TCP, TLS) rather than on a connection.
    connect: bool,
    /// The error and its causes, without the URL.
    text: String,
}

impl Transport {
    fn new(url: reqwest::Url) -> Result<Self, ClientError> {
        let as_uri: Uri = url.as_str().parse().map_err(|_| ClientError::Uri)?;
        if proxy::matcher::Matcher::from_system()
            .intercept(&as_uri)
            .is_some()
        {
            let client = reqwest::Client::builder()
                // SPEC §3: a 3xx is a refusal, not an instruction.
                .redirect(reqwest::redirect::Policy::none())
                .pool_idle_timeout(Duration::from_secs(60))
                .build()?;
            return Ok(Self::Proxied { client, url });
        }
        let mut url = url;
        let basic_auth = take_credentials(&mut url);
        let uri: Uri = url.as_str().parse().map_err(|_| ClientError::Uri)?;
        let mut http = HttpConnector::new();
        // https:// URLs are handed on to the TLS layer.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(KEEPALIVE));
        http.set_keepalive_interval(Some(KEEPALIVE));
        http.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
        http.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
        let provider = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(provider)?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(Self::Direct {
            client: Box::new(client),
            uri,
            basic_auth,
        })
    }

    /// Sends `body` with `headers` and waits up to `timeout` for the answer's head.
    /// The answer's status and headers, or why there is none.
    async fn send(
        &self,
        mut headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, HeaderMap), NoAnswer> {
        match self {
            Self::Direct {
                client,
                uri,
                basic_auth,
            } => {
                if let Some(auth) = basic_auth {
                    headers.entry(header::AUTHORIZATION).or_insert(auth.clone());
                }
                // What reqwest sent when the request had none.
                headers
                    .entry(header::ACCEPT)
                    .or_insert(HeaderValue::from_static("*/*"));
                let mut request = http::Request::new(Full::new(body));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = uri.clone();
                *request.headers_mut() = headers;
                let response = match tokio::time::timeout(timeout, client.request(request)).await {
                    Err(_) => return Err(NoAnswer::timed_out()),
                    Ok(Err(e)) => return Err(NoAnswer::failed(&e, e.is_connect())),
                    Ok(Ok(response)) => response,
                };
                let (head, mut body) = response.into_parts();
                // Read (and drop) the rest so the connection can be reused; never wait long.
                let _ = tokio::time::timeout(DRAIN_WITHIN, async {
                    while let Some(Ok(_)) = body.frame().await {}
                })
                .await;
                Ok((head.status, head.headers))
            }
            Self::Proxied { client, url } => {
                let sent = client
                    .post(url.clone())
                    .headers(headers)
                    .timeout(timeout)
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(response) => {
                        let answer = (response.status(), response.headers().clone());
                        let _ = tokio::time::timeout(DRAIN_WITHIN, response.bytes()).await;
                        Ok(answer)
                    }
                    Err(e) if e.is_timeout() => Err(NoAnswer::timed_out()),
                    Err(e) => {
                        // The URL may carry credentials; the error text goes to logs and headers.
                        let e = e.without_url();
                        Err(NoAnswer::failed(&e, e.is_connect()))
                    }
                }
            }
        }
    }
}

impl NoAnswer {
    /// The attempt failed with `e`, `connect` when it failed while connecting.
    fn failed(e: &(dyn std::error::Error + 'static), connect: bool) -> Self {
        Self {
            timed_out: false,
            refused: is_connection_refused(e),
            connect,
            text: crate::error_chain(e),
        }
    }

    fn timed_out() -> Self {
        Self {
            timed_out: true,
            refused: false,
            connect: false,
            text: String::new(),
        }
    }

    fn describe(&self, timeout: Duration) -> String {
        if self.timed_out {
            format!("timed out after {} ms", timeout.as_millis())
        } else if self.connect {
            format!("connection failed: {}", self.text)
        } else {
            format!("request failed: {}", self.text)
        }
    }
}

/// Takes the user name and password out of `url` (percent-decoded, as reqwest did)
/// and gives them back as a `Basic` authorization value, marked sensitive.
fn take_credentials(url: &mut reqwest::Url) -> Option<HeaderValue> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    };
    let user = decode(url.username())?;
    let password = match url.password() {
        Some(p) => Some(decode(p)?),
        None => None,
    };
    if user.is_empty() && password.is_none() {
        return None;
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let token = BASE64.encode(format!("{user}:{}", password.unwrap_or_default()));
    let mut value = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

impl Downstream {
    /// Builds the client for `url`: direct, or through the proxy the environment
    /// names for it.
    pub fn new(url: reqwest::Url) -> Result<Self, ClientError> {
        Ok(Self {
            transport: Transport::new(url)?,
            static_headers: Vec::new(),
            signing: None,
            refused: Default::default(),
        })
    }

    /// Whether deliveries go through a proxy named by the environment.
    pub fn is_proxied(&self) -> bool {
        matches!(self.transport, Transport::Proxied { .. })
    }

    /// Adds `headers` to every delivery.
    pub fn with_headers(mut self, headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        self.static_headers = headers;
        self
    }

    /// Signs every delivery with `key` (none: unsigned).
    pub fn with_signing(mut self, key: Option<SigningKey>) -> Self {
        self.signing = key;
        self
    }

    /// Makes attempt number `attempt` of `event`, giving up after `timeout`.
    pub async fn attempt(&self, event: &Envelope, attempt: u32, timeout: Duration) -> Outcome {
        if let Some(ago) = self.refused_within(REFUSED_HOLD) {
            return Outcome::Retryable {
                status: None,
                error: format!(
                    "connection failed: refused {} ms ago; not tried again within {} ms",
                    ago.as_millis(),
                    REFUSED_HOLD.as_millis()
                ),
                retry_after: None,
                timed_out: false,
            };
        }
        let headers = delivery_headers(
            event,
            attempt,
            &self.static_headers,
            self.signing.as_ref(),
            SystemTime::now(),
        );
        let sent = self
            .transport
            .send(headers, event.body.clone(), timeout)
            .await;
        self.note_refused(sent.as_ref().err().is_some_and(|e| e.refused));
        match sent {
            Ok((status, headers)) => classify(status, &headers, SystemTime::now()),
            Err(e) => Outcome::Retryable {
                timed_out: e.timed_out,
                status: None,
                error: e.describe(timeout),
                retry_after: None,
            },
        }
    }

    /// How long ago the downstream refused a connection, if that is less than `hold`
    /// ago and this caller is not the one that should try again. The first caller
    /// past the window takes it (the clock restarts), so one attempt per window
    /// connects while the others fail at once.
    fn refused_within(&self, hold: Duration) -> Option<Duration> {
        let mut refused = self.refused.lock().expect("refused lock");
        let at = (*refused)?;
        let ago = at.elapsed();
        if ago < hold {
            return Some(ago);
        }
        // This attempt connects; the others keep failing fast until it is answered.
        *refused = Some(Instant::now());
        None
    }

    /// Records whether the last connect was refused; an answered attempt clears it.
    fn note_refused(&self, refused: bool) {
        let mut state = self.refused.lock().expect("refused lock");
        *state = refused.then(Instant::now);
    }
}

/// Whether the attempt failed because nothing listens at the downstream's address.
fn is_connection_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_never_carry_the_downstream_url() {
        // Port 1 on loopback: the connection is refused at once.
        let url = "http://relay:s3cret-pass@127.0.0.1:1/hook?token=t0ken";
        let downstream = Downstream::new(reqwest::Url::parse(url).unwrap()).unwrap();
        let event = Envelope::received("e".into(), "w".into(), None, vec![], Default::default());
        let outcome = downstream.attempt(&event, 1, Duration::from_secs(2)).await;
        let error = outcome.error().expect("the attempt failed");
        assert!(error.starts_with("connection failed"), "{error}");
        for secret in ["s3cret-pass", "t0ken"] {
            assert!(!error.contains(secret), "{error}");
        }
    }

    #[tokio::test]
    async fn a_refusing_downstream_is_connected_to_once_per_window() {
        // A port that was just free: nothing listens there, connections are refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        let downstream = Downstream::new(url).unwrap();
        let event = Envelope::received("e".into(), "w".into(), None, vec![], Default::default());
        let timeout = Duration::from_secs(2);
        let first = downstream.attempt(&event, 1, timeout).await;
        assert!(
            first.error().unwrap().starts_with("connection failed"),
            "{first:?}"
        );
        // Within the window: no connect, the same kind of failure at once.
        let fast = downstream.attempt(&event, 1, timeout).await;
        let error = fast.error().unwrap();
        assert!(
            error.starts_with("connection failed: refused") && error.contains("not tried again"),
            "{fast:?}"
        );
        assert!(!fast.is_overload());
        assert!(matches!(fast, Outcome::Retryable { status: None, .. }));
        // The downstream comes back: after the window one attempt connects, is answered,
        // and every attempt after it goes through again.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        tokio::time::sleep(REFUSED_HOLD + Duration::from_millis(10)).await;
        for _ in 0..3 {
            let again = downstream.attempt(&event, 2, timeout).await;
            assert_eq!(again, Outcome::Delivered { status: 200 });
        }
    }

    fn outcome(code: u16, retry_after: Option<&str>) -> Outcome {
        let mut h = HeaderMap::new();
        if let Some(ra) = retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from_str(ra).unwrap());
        }
        classify(
            StatusCode::from_u16(code).unwrap(),
            &h,
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn statuses_are_classified_as_the_prototype_did() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(outcome(code, None).label(), "delivered", "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(outcome(code, None).label(), "retryable", "{code}");
        }
        for code in [301, 302, 304, 307, 400, 401, 403, 404, 409, 410, 422] {
            assert_eq!(outcome(code, None).label(), "permanent", "{code}");
        }
    }

    fn event() -> Envelope {
        Envelope::received(
            "ev-1".into(),
            "w".into(),
            Some("application/json"),
            vec![
                ("x-api-key".into(), b"from-sender".to_vec()),
                ("x-trace".into(), b"t".to_vec()),
            ],
            bytes::Bytes::from_static(br#"{"a":1}"#),
        )
    }

    #[test]
    fn static_headers_parse_and_refuse_what_the_relay_owns() {
        let h =
            parse_static_headers(r#"{"X-Api-Key":"k-123","Authorization":"Bearer d"}"#).unwrap();
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|(_, v)| v.is_sensitive()));
        assert!(
            !format!("{h:?}").contains("k-123"),
            "values hidden from Debug"
        );
        for bad in [
            "X-Api-Key: k",
            r#"["X-Api-Key","k"]"#,
            r#"{"bad name":"v"}"#,
            r#"{"X-Num":5}"#,
            r#"{"X-Nl":"a
b"}"#,
            r#"{"Content-Length":"5"}"#,
            r#"{"Idempotency-Key":"k"}"#,
            r#"{"webhook-signature":"v1,x"}"#,
        ] {
            assert!(parse_static_headers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signing_matches_the_standard_webhooks_test_vector() {
        // The Standard Webhooks reference libraries' own sign test.
        let key = SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            key.sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        assert!(
            SigningKey::parse("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_err(),
            "prefix required"
        );
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(SigningKey::parse("whsec_").is_err());
        assert_eq!(format!("{key:?}"), "SigningKey(***)");
    }

    #[test]
    fn delivery_headers_layer_static_relay_and_signature_headers() {
        let statics = parse_static_headers(r#"{"X-Api-Key":"downstream-key"}"#).unwrap();
        let key = SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = delivery_headers(&event(), 3, &statics, Some(&key), at);
        assert_eq!(
            h["x-api-key"], "downstream-key",
            "static wins over forwarded"
        );
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-trace"], "t");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["idempotency-key"], "ev-1");
        assert_eq!(h["x-relay-attempt"], "3");
        assert_eq!(h[WEBHOOK_ID], "ev-1");
        assert_eq!(h[WEBHOOK_TIMESTAMP], "1700000000");
        assert_eq!(
            h[WEBHOOK_SIGNATURE],
            key.sign("ev-1", 1_700_000_000, br#"{"a":1}"#).as_str()
        );

        let unsigned = delivery_headers(&event(), 1, &[], None, at);
        assert_eq!(unsigned["x-api-key"], "from-sender");
        assert!(unsigned.get(WEBHOOK_SIGNATURE).is_none());
    }

    #[test]
    fn retry_after_in_seconds_or_http_date_on_429_and_503_only() {
        let ra = |o: Outcome| match o {
            Outcome::Retryable { retry_after, .. } => retry_after,
            _ => panic!("not retryable"),
        };
        assert_eq!(ra(outcome(429, Some("7"))), Some(Duration::from_secs(7)));
        assert_eq!(
            ra(outcome(503, Some("Thu, 01 Jan 1970 00:01:40 GMT"))),
            Some(Duration::from_secs(100))
        );
        assert_eq!(ra(outcome(500, Some("7"))), None);
        assert_eq!(ra(outcome(503, Some("soon"))), None);
    }
}
