//! The downstream client and the outcome of one delivery attempt (SPEC §3, §4.3).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

use crate::envelope::Envelope;
use crate::event::{IDEMPOTENCY_KEY, RELAY_ATTEMPT};

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
    /// Shared client: connection pool reused across attempts; redirects never followed.
    client: reqwest::Client,
    /// Where every event goes.
    url: reqwest::Url,
}

impl Downstream {
    /// Builds the client for `url`.
    pub fn new(url: reqwest::Url) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // SPEC §3: a 3xx is a refusal, not an instruction.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self { client, url })
    }

    /// Makes attempt number `attempt` of `event`, giving up after `timeout`.
    pub async fn attempt(&self, event: &Envelope, attempt: u32, timeout: Duration) -> Outcome {
        let mut headers = HeaderMap::with_capacity(event.headers.len() + 3);
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
        if let Ok(v) = HeaderValue::from_str(&event.id) {
            headers.insert(IDEMPOTENCY_KEY, v);
        }
        headers.insert(RELAY_ATTEMPT, HeaderValue::from(attempt));

        let request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .timeout(timeout)
            .body(event.body.clone());
        match request.send().await {
            Ok(response) => {
                let outcome = classify(response.status(), response.headers(), SystemTime::now());
                // Drain a little of the body so the connection can be reused; never wait long.
                let _ = tokio::time::timeout(Duration::from_millis(200), response.bytes()).await;
                outcome
            }
            Err(e) => Outcome::Retryable {
                status: None,
                // The URL may carry credentials; the error text goes to logs and headers.
                error: describe(&e.without_url(), timeout),
                retry_after: None,
            },
        }
    }
}

fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        format!("timed out after {} ms", timeout.as_millis())
    } else if e.is_connect() {
        format!("connection failed: {}", crate::error_chain(e))
    } else {
        format!("request failed: {}", crate::error_chain(e))
    }
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

    fn outcome(code: u16, retry_after: Option<&str>) -> Outcome {
        let mut h = HeaderMap::new();
        if let Some(ra) = retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from_str(ra).unwrap());
        }
        classify(StatusCode::from_u16(code).unwrap(), &h, SystemTime::UNIX_EPOCH)
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
