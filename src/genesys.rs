//! Talking back to Genesys Cloud (SPEC §9): the region table and an OAuth
//! client-credentials token client that caches the token, refreshes it 60 s before it
//! expires, makes one refresh at a time however many callers wait, and honours
//! `Retry-After` on 429.

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

use http::{StatusCode, header};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{ConfigError, Secret};

/// How long before `expires_in` runs out a token is replaced.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Waits for a 429 made within one refresh before giving up.
const MAX_RATE_LIMIT_WAITS: u32 = 3;
/// Longest `Retry-After` waited out inside a refresh; a longer one is returned as an
/// error and no request is made before it has passed.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Wait after a 429 that names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Bound on one token request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Genesys Cloud regions, as in the region table of the Genesys platform SDKs: the AWS
/// region name and the domain the platform lives under. `GENESYS_REGION` accepts
/// either; the token endpoint is `https://login.<domain>`.
pub const REGIONS: &[(&str, &str)] = &[
    ("us-east-1", "mypurecloud.com"),
    ("us-east-2", "use2.us-gov-pure.cloud"),
    ("us-west-2", "usw2.pure.cloud"),
    ("ca-central-1", "cac1.pure.cloud"),
    ("sa-east-1", "sae1.pure.cloud"),
    ("eu-west-1", "mypurecloud.ie"),
    ("eu-west-2", "euw2.pure.cloud"),
    ("eu-central-1", "mypurecloud.de"),
    ("eu-central-2", "euc2.pure.cloud"),
    ("me-central-1", "mec1.pure.cloud"),
    ("ap-south-1", "aps1.pure.cloud"),
    ("ap-northeast-1", "mypurecloud.jp"),
    ("ap-northeast-2", "apne2.pure.cloud"),
    ("ap-northeast-3", "apne3.pure.cloud"),
    ("ap-southeast-1", "apse1.pure.cloud"),
    ("ap-southeast-2", "mypurecloud.com.au"),
    ("mx-central-1", "mxc1.pure.cloud"),
    // The EU sovereign cloud lives under its own parent domain.
    ("eusc-de-east-1", "edee1.eusc-pure.cloud"),
];

/// The domain of a region given by domain (`mypurecloud.ie`, also with a `login.`,
/// `api.` or `https://` in front) or by AWS name (`eu-west-1`); `None` if unknown.
pub fn region_domain(region: &str) -> Option<&'static str> {
    let r = region.trim().trim_end_matches('/').to_ascii_lowercase();
    let r = r.strip_prefix("https://").unwrap_or(&r);
    let r = r
        .strip_prefix("login.")
        .or_else(|| r.strip_prefix("api."))
        .unwrap_or(r);
    REGIONS
        .iter()
        .find(|(aws, domain)| *aws == r || *domain == r)
        .map(|(_, domain)| *domain)
}

/// The Genesys settings as configured (all optional until a command needs them).
#[derive(Debug, Clone, Default)]
pub struct GenesysSettings {
    /// OAuth client id (`GENESYS_CLIENT_ID`); not a secret, shown by `genesys token`.
    pub client_id: Option<String>,
    /// OAuth client secret (`GENESYS_CLIENT_SECRET`).
    pub client_secret: Option<Secret>,
    /// Base of the token endpoint: `https://login.<region domain>` from `GENESYS_REGION`,
    /// or `GENESYS_LOGIN_URL` (a proxy, or a local endpoint in tests) when set.
    pub login_url: Option<reqwest::Url>,
}

impl GenesysSettings {
    /// Validates the raw variables; a bad value names its variable.
    pub fn from_vars(
        client_id: Option<String>,
        client_secret: Option<String>,
        region: Option<String>,
        login_url: Option<String>,
    ) -> Result<Self, ConfigError> {
        let region_url = region
            .map(|r| {
                region_domain(&r)
                    .map(|d| {
                        reqwest::Url::parse(&format!("https://login.{d}"))
                            .expect("region table domains make valid URLs")
                    })
                    .ok_or_else(|| {
                        let known: Vec<&str> = REGIONS.iter().map(|(_, d)| *d).collect();
                        ConfigError::new(
                            "GENESYS_REGION",
                            format!(
                                "unknown region {r:?}; expected a domain ({}) or an AWS region name such as eu-west-1",
                                known.join(", ")
                            ),
                        )
                    })
            })
            .transpose()?;
        let override_url = login_url
            .map(|u| {
                reqwest::Url::parse(u.trim())
                    .ok()
                    .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
                    .ok_or_else(|| {
                        ConfigError::new(
                            "GENESYS_LOGIN_URL",
                            format!("expected an http:// or https:// URL, got {u:?}"),
                        )
                    })
            })
            .transpose()?;
        let settings = Self {
            client_id: client_id.map(|s| s.trim().to_owned()),
            client_secret: client_secret.map(Secret::new),
            login_url: override_url.or(region_url),
        };
        match (&settings.client_id, &settings.client_secret) {
            (Some(_), None) => Err(ConfigError::new(
                "GENESYS_CLIENT_SECRET",
                "is required when GENESYS_CLIENT_ID is set",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "GENESYS_CLIENT_ID",
                "is required when GENESYS_CLIENT_SECRET is set",
            )),
            _ => Ok(settings),
        }
    }

    /// Everything a token request needs; names what is missing.
    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        let client_id = self.client_id.clone().ok_or_else(|| {
            ConfigError::new("GENESYS_CLIENT_ID", "is required to talk to Genesys Cloud")
        })?;
        let client_secret = self.client_secret.clone().ok_or_else(|| {
            ConfigError::new(
                "GENESYS_CLIENT_SECRET",
                "is required to talk to Genesys Cloud",
            )
        })?;
        let login_url = self.login_url.clone().ok_or_else(|| {
            ConfigError::new(
                "GENESYS_REGION",
                "is required to talk to Genesys Cloud (for example mypurecloud.ie or eu-west-1)",
            )
        })?;
        Ok(Credentials {
            client_id,
            client_secret,
            token_url: login_url
                .join("oauth/token")
                .expect("an http(s) base URL takes a relative path"),
        })
    }
}

/// One OAuth client's credentials and where to use them.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret; sent only as HTTP Basic to the token endpoint.
    pub client_secret: Secret,
    /// `https://login.<domain>/oauth/token`.
    pub token_url: reqwest::Url,
}

/// Why no token could be had, named by what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// 400: the request itself was refused; retrying the same request will not help.
    #[error(
        "the token endpoint refused the request (HTTP 400: {0}); check GENESYS_CLIENT_ID and that the OAuth client uses the Client Credentials grant"
    )]
    Refused(String),
    /// 401/403: the credentials are wrong; fix the configuration.
    #[error(
        "the client credentials were not accepted (HTTP {status}: {detail}); check GENESYS_CLIENT_ID, GENESYS_CLIENT_SECRET and GENESYS_REGION (an OAuth client exists in one region only)"
    )]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The endpoint's own words.
        detail: String,
    },
    /// 429: try again after `retry_after`.
    #[error("the token endpoint is rate-limiting this client; retry in {} s", retry_after.as_secs_f64().ceil())]
    RateLimited {
        /// How long the endpoint asked to wait.
        retry_after: Duration,
    },
    /// Another status (5xx mostly): try again later.
    #[error("the token endpoint answered HTTP {status}: {detail}")]
    Unavailable {
        /// The status.
        status: u16,
        /// The start of the answer.
        detail: String,
    },
    /// The endpoint could not be reached: try again later.
    #[error("could not reach the token endpoint: {0}")]
    Unreachable(String),
    /// A 2xx answer that is not a token: a proxy or a wrong GENESYS_LOGIN_URL.
    #[error("the token endpoint's answer is not a token: {0}")]
    BadAnswer(String),
}

impl TokenError {
    /// Whether the same request may succeed later (as opposed to a configuration fault).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Unavailable { .. } | Self::Unreachable(_)
        )
    }
}

/// An access token; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl AccessToken {
    /// Wraps a token value.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, for an `Authorization: Bearer` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// What the token endpoint issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The token.
    pub access_token: AccessToken,
    /// `bearer`, as the endpoint spells it.
    pub token_type: String,
    /// Lifetime from the moment of issue.
    pub expires_in: Duration,
    /// Scopes the endpoint stated (`scope`, space-separated); often none for this grant.
    pub scopes: Vec<String>,
}

/// A cached token with its schedule.
#[derive(Debug, Clone)]
pub struct Token {
    /// What was issued.
    pub issued: Issued,
    /// When it expires, on the wall clock (for people).
    pub expires_at: SystemTime,
    /// When it expires, on the monotonic clock (for the cache).
    expires_deadline: Instant,
    /// When the cache starts replacing it.
    refresh_deadline: Instant,
}

impl Token {
    fn new(issued: Issued, now: Instant, wall: SystemTime) -> Self {
        Self {
            expires_at: wall + issued.expires_in,
            expires_deadline: now + issued.expires_in,
            refresh_deadline: now + refresh_after(issued.expires_in),
            issued,
        }
    }

    /// The value of an `Authorization` header carrying this token.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.issued.access_token.expose())
    }

    /// Time left before it expires.
    pub fn remaining(&self) -> Duration {
        self.expires_deadline
            .saturating_duration_since(Instant::now())
    }
}

/// How long after issue a token of lifetime `expires_in` is replaced: 60 s before it
/// expires, or at half its life when it lives two minutes or less.
pub fn refresh_after(expires_in: Duration) -> Duration {
    if expires_in > 2 * REFRESH_MARGIN {
        expires_in - REFRESH_MARGIN
    } else {
        expires_in / 2
    }
}

/// Where tokens come from. The HTTP implementation is [`OAuthEndpoint`]; the cache
/// logic above it does not care, so it is tested on a virtual clock.
pub trait TokenEndpoint: Send + Sync {
    /// One token request.
    fn request(&self) -> impl Future<Output = Result<Issued, TokenError>> + Send;
}

/// The Genesys Cloud token endpoint: `POST /oauth/token` with HTTP Basic client
/// credentials and `grant_type=client_credentials`.
#[derive(Debug, Clone)]
pub struct OAuthEndpoint {
    /// The HTTP client (its own pool; token requests are rare).
    http: reqwest::Client,
    /// Client id, secret and token URL.
    credentials: Credentials,
}

impl OAuthEndpoint {
    /// An endpoint for `credentials`.
    pub fn new(credentials: Credentials) -> Result<Self, TokenError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| TokenError::Unreachable(crate::error_chain(&e)))?;
        Ok(Self { http, credentials })
    }

    /// The token URL in use.
    pub fn token_url(&self) -> &reqwest::Url {
        &self.credentials.token_url
    }
}

/// The token endpoint's JSON answer (RFC 6749 §5.1).
#[derive(Deserialize)]
struct TokenAnswer {
    /// The bearer token.
    access_token: String,
    /// `bearer`; optional, as some proxies drop it.
    #[serde(default)]
    token_type: Option<String>,
    /// Lifetime in seconds (Genesys: 86399 unless the OAuth client sets less).
    expires_in: u64,
    /// Space-separated scopes, when the endpoint states them.
    #[serde(default)]
    scope: Option<String>,
}

impl TokenEndpoint for OAuthEndpoint {
    async fn request(&self) -> Result<Issued, TokenError> {
        let response = self
            .http
            .post(self.credentials.token_url.clone())
            .basic_auth(
                &self.credentials.client_id,
                Some(self.credentials.client_secret.expose()),
            )
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| TokenError::Unreachable(crate::error_chain(&e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::delivery::parse_retry_after(v, SystemTime::now()));
        let body = response
            .bytes()
            .await
            .map_err(|e| TokenError::Unreachable(crate::error_chain(&e)))?;
        interpret(status, retry_after, &body)
    }
}

/// Turns a token endpoint's answer into a token or a named error (pure).
pub fn interpret(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Issued, TokenError> {
    if status.is_success() {
        let answer: TokenAnswer = serde_json::from_slice(body)
            .map_err(|e| TokenError::BadAnswer(format!("{e} (HTTP {})", status.as_u16())))?;
        if answer.access_token.is_empty() {
            return Err(TokenError::BadAnswer("empty access_token".into()));
        }
        return Ok(Issued {
            access_token: AccessToken(answer.access_token),
            token_type: answer.token_type.unwrap_or_else(|| "bearer".into()),
            expires_in: Duration::from_secs(answer.expires_in),
            scopes: answer
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        });
    }
    let detail = error_detail(body);
    match status.as_u16() {
        400 => Err(TokenError::Refused(detail)),
        401 | 403 => Err(TokenError::Unauthorized {
            status: status.as_u16(),
            detail,
        }),
        429 => Err(TokenError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
        }),
        code => Err(TokenError::Unavailable {
            status: code,
            detail,
        }),
    }
}

/// The endpoint's explanation: OAuth's `error` and `error_description` (Genesys also
/// sends `description`), else the start of the body.
fn error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: Option<String>,
        error_description: Option<String>,
        description: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<OAuthError>(body) {
        let words: Vec<String> = [e.error, e.error_description.or(e.description), e.message]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        if !words.is_empty() {
            return words.join(": ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    if text.trim().is_empty() {
        "no explanation given".into()
    } else {
        text
    }
}

/// A cached, self-refreshing client-credentials token.
pub struct TokenClient<E = OAuthEndpoint> {
    /// Where tokens come from.
    endpoint: E,
    /// The current token and what the last refresh gave.
    state: std::sync::Mutex<State>,
    /// Held by the one caller refreshing; the others wait on it, or use a token that
    /// has not expired yet.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The last token obtained.
    current: Option<Token>,
    /// Counts finished refreshes, so a caller that waited knows one happened.
    generation: u64,
    /// The error of the last refresh, shared with callers that waited for it.
    last_error: Option<TokenError>,
    /// No request before this instant (a 429's `Retry-After` not waited out).
    not_before: Option<Instant>,
}

impl TokenClient<OAuthEndpoint> {
    /// A client for the Genesys Cloud token endpoint.
    pub fn genesys(credentials: Credentials) -> Result<Self, TokenError> {
        Ok(Self::new(OAuthEndpoint::new(credentials)?))
    }
}

impl<E: TokenEndpoint> TokenClient<E> {
    /// A client with an empty cache.
    pub fn new(endpoint: E) -> Self {
        Self {
            endpoint,
            state: std::sync::Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// The endpoint, for callers that want to show where tokens come from.
    pub fn endpoint(&self) -> &E {
        &self.endpoint
    }

    /// A usable token: the cached one until 60 s before it expires, else a new one.
    /// Concurrent callers share one refresh; while it runs, a token that has not
    /// expired yet is handed out instead of waiting.
    pub async fn token(&self) -> Result<Token, TokenError> {
        let seen = {
            let s = self.lock();
            if let Some(t) = s
                .current
                .as_ref()
                .filter(|t| Instant::now() < t.refresh_deadline)
            {
                return Ok(t.clone());
            }
            s.generation
        };
        let _refreshing = match self.refresh.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(t) = self.unexpired() {
                    return Ok(t);
                }
                self.refresh.lock().await
            }
        };
        {
            let s = self.lock();
            let now = Instant::now();
            if s.generation != seen {
                // A refresh finished while this caller waited: share its result.
                if let Some(t) = s.current.as_ref().filter(|t| now < t.refresh_deadline) {
                    return Ok(t.clone());
                }
                if let Some(e) = s.last_error.clone() {
                    drop(s);
                    return self.unexpired().ok_or(e);
                }
            }
            if let Some(until) = s.not_before.filter(|until| now < *until) {
                drop(s);
                return self.unexpired().ok_or(TokenError::RateLimited {
                    retry_after: until - now,
                });
            }
        }
        let result = self.fetch().await;
        let mut s = self.lock();
        s.generation += 1;
        match result {
            Ok(token) => {
                s.last_error = None;
                s.current = Some(token.clone());
                Ok(token)
            }
            Err(e) => {
                s.last_error = Some(e.clone());
                if let TokenError::RateLimited { retry_after } = &e {
                    s.not_before = Some(Instant::now() + *retry_after);
                }
                drop(s);
                match self.unexpired() {
                    Some(t) => {
                        tracing::warn!(error = %e, "token refresh failed; the current token is still valid");
                        Ok(t)
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// One refresh: a request, repeated after a 429 within limits.
    async fn fetch(&self) -> Result<Token, TokenError> {
        let mut waits = 0;
        loop {
            match self.endpoint.request().await {
                Ok(issued) => {
                    tracing::debug!(
                        expires_in_s = issued.expires_in.as_secs(),
                        "obtained a Genesys Cloud token"
                    );
                    return Ok(Token::new(issued, Instant::now(), SystemTime::now()));
                }
                Err(TokenError::RateLimited { retry_after })
                    if waits < MAX_RATE_LIMIT_WAITS && retry_after <= MAX_RATE_LIMIT_WAIT =>
                {
                    waits += 1;
                    tracing::info!(
                        retry_after_ms = retry_after.as_millis() as u64,
                        "token endpoint answered 429; waiting as asked"
                    );
                    tokio::time::sleep(retry_after).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn unexpired(&self) -> Option<Token> {
        let now = Instant::now();
        self.lock()
            .current
            .as_ref()
            .filter(|t| now < t.expires_deadline)
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data updated in one step: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A token endpoint on the virtual clock: answers from a script, takes `latency`.
    struct Scripted {
        answers: std::sync::Mutex<VecDeque<Result<Issued, TokenError>>>,
        latency: Duration,
        calls: AtomicUsize,
        call_times: std::sync::Mutex<Vec<Instant>>,
    }

    impl Scripted {
        fn new(latency: Duration, answers: Vec<Result<Issued, TokenError>>) -> Arc<Self> {
            Arc::new(Self {
                answers: std::sync::Mutex::new(answers.into()),
                latency,
                calls: AtomicUsize::new(0),
                call_times: std::sync::Mutex::new(Vec::new()),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenEndpoint for Arc<Scripted> {
        async fn request(&self) -> Result<Issued, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.call_times.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.latency).await;
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Ok(issued(&format!("tok-{n}"), 3600)))
        }
    }

    fn issued(token: &str, expires_in: u64) -> Issued {
        Issued {
            access_token: AccessToken::new(token),
            token_type: "bearer".into(),
            expires_in: Duration::from_secs(expires_in),
            scopes: vec![],
        }
    }

    fn value(t: &Token) -> &str {
        t.issued.access_token.expose()
    }

    #[test]
    fn the_region_table_is_the_sdks_18_regions() {
        let expected = [
            ("us-east-1", "mypurecloud.com"),
            ("us-east-2", "use2.us-gov-pure.cloud"),
            ("us-west-2", "usw2.pure.cloud"),
            ("ca-central-1", "cac1.pure.cloud"),
            ("sa-east-1", "sae1.pure.cloud"),
            ("mx-central-1", "mxc1.pure.cloud"),
            ("eu-west-1", "mypurecloud.ie"),
            ("eu-west-2", "euw2.pure.cloud"),
            ("eu-central-1", "mypurecloud.de"),
            ("eu-central-2", "euc2.pure.cloud"),
            ("eusc-de-east-1", "edee1.eusc-pure.cloud"),
            ("me-central-1", "mec1.pure.cloud"),
            ("ap-south-1", "aps1.pure.cloud"),
            ("ap-northeast-1", "mypurecloud.jp"),
            ("ap-northeast-2", "apne2.pure.cloud"),
            ("ap-northeast-3", "apne3.pure.cloud"),
            ("ap-southeast-1", "apse1.pure.cloud"),
            ("ap-southeast-2", "mypurecloud.com.au"),
        ];
        let mut table: Vec<(&str, &str)> = REGIONS.to_vec();
        let mut expected = expected.to_vec();
        table.sort();
        expected.sort();
        assert_eq!(table, expected);
        for (aws, domain) in expected {
            assert_eq!(region_domain(aws), Some(domain), "{aws}");
            assert_eq!(
                region_domain(&format!("login.{domain}")),
                Some(domain),
                "{domain}"
            );
        }
    }

    #[test]
    fn regions_by_domain_or_aws_name() {
        assert_eq!(region_domain("mypurecloud.ie"), Some("mypurecloud.ie"));
        assert_eq!(region_domain("eu-west-1"), Some("mypurecloud.ie"));
        assert_eq!(
            region_domain(" https://login.USW2.pure.cloud/ "),
            Some("usw2.pure.cloud")
        );
        assert_eq!(
            region_domain("api.mypurecloud.com.au"),
            Some("mypurecloud.com.au")
        );
        assert_eq!(region_domain("mypurecloud.co.uk"), None);
        for (_, d) in REGIONS {
            assert_eq!(region_domain(d), Some(*d));
        }
    }

    #[test]
    fn settings_name_their_variable() {
        let s =
            |id: Option<&str>, secret: Option<&str>, region: Option<&str>, url: Option<&str>| {
                GenesysSettings::from_vars(
                    id.map(Into::into),
                    secret.map(Into::into),
                    region.map(Into::into),
                    url.map(Into::into),
                )
            };
        let ok = s(Some("cid"), Some("sec"), Some("eu-central-1"), None).unwrap();
        let c = ok.credentials().unwrap();
        assert_eq!(
            c.token_url.as_str(),
            "https://login.mypurecloud.de/oauth/token"
        );
        assert!(!format!("{ok:?}{c:?}").contains("sec\""), "secret hidden");
        let local = s(
            Some("cid"),
            Some("sec"),
            Some("eu-central-1"),
            Some("http://127.0.0.1:9/"),
        )
        .unwrap();
        assert_eq!(
            local.credentials().unwrap().token_url.as_str(),
            "http://127.0.0.1:9/oauth/token"
        );
        assert_eq!(
            s(None, None, Some("mars-1"), None).unwrap_err().var,
            "GENESYS_REGION"
        );
        assert_eq!(
            s(Some("cid"), None, None, None).unwrap_err().var,
            "GENESYS_CLIENT_SECRET"
        );
        assert_eq!(
            s(None, Some("x"), None, None).unwrap_err().var,
            "GENESYS_CLIENT_ID"
        );
        assert_eq!(
            s(None, None, None, Some("ftp://x")).unwrap_err().var,
            "GENESYS_LOGIN_URL"
        );
        let none = s(None, None, None, None).unwrap();
        assert_eq!(none.credentials().unwrap_err().var, "GENESYS_CLIENT_ID");
        let no_region = s(Some("cid"), Some("sec"), None, None).unwrap();
        assert_eq!(no_region.credentials().unwrap_err().var, "GENESYS_REGION");
    }

    #[test]
    fn answers_are_interpreted() {
        let ok = interpret(
            StatusCode::OK,
            None,
            br#"{"access_token":"abc","token_type":"bearer","expires_in":86399,"scope":"a b"}"#,
        )
        .unwrap();
        assert_eq!(ok.expires_in, Duration::from_secs(86399));
        assert_eq!(ok.scopes, ["a", "b"]);
        assert!(
            !format!("{ok:?}").contains("abc"),
            "Debug never shows the token"
        );
        let genesys_400 =
            br#"{"error":"invalid_client","description":"client not found","error_description":"client not found"}"#;
        let e = interpret(StatusCode::BAD_REQUEST, None, genesys_400).unwrap_err();
        assert_eq!(
            e,
            TokenError::Refused("invalid_client: client not found".into())
        );
        assert!(e.to_string().contains("HTTP 400") && e.to_string().contains("GENESYS_CLIENT_ID"));
        let e = interpret(StatusCode::UNAUTHORIZED, None, b"").unwrap_err();
        assert!(matches!(e, TokenError::Unauthorized { status: 401, .. }));
        assert!(e.to_string().contains("GENESYS_CLIENT_SECRET"), "{e}");
        assert!(!e.is_transient());
        let e = interpret(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(7)),
            b"",
        )
        .unwrap_err();
        assert_eq!(
            e,
            TokenError::RateLimited {
                retry_after: Duration::from_secs(7)
            }
        );
        assert!(e.is_transient());
        let e = interpret(StatusCode::BAD_GATEWAY, None, b"<html>bad gateway</html>").unwrap_err();
        assert!(matches!(e, TokenError::Unavailable { status: 502, .. }));
        assert!(matches!(
            interpret(StatusCode::OK, None, b"<html>login page</html>"),
            Err(TokenError::BadAnswer(_))
        ));
    }

    #[test]
    fn refresh_comes_sixty_seconds_early_or_at_half_life() {
        assert_eq!(
            refresh_after(Duration::from_secs(86399)),
            Duration::from_secs(86339)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(121)),
            Duration::from_secs(61)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(120)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(10)),
            Duration::from_secs(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn caches_and_refreshes_sixty_seconds_before_expiry() {
        let ep = Scripted::new(Duration::from_millis(100), vec![]);
        let client = TokenClient::new(ep.clone());
        let t0 = Instant::now();
        let first = client.token().await.unwrap();
        assert_eq!(ep.calls(), 1);
        for _ in 0..10 {
            assert_eq!(value(&client.token().await.unwrap()), value(&first));
        }
        assert_eq!(ep.calls(), 1, "cached");

        // Issued at t0 + 100 ms for 3600 s: still cached just before 3540 s.
        tokio::time::advance(Duration::from_secs(3539)).await;
        assert_eq!(value(&client.token().await.unwrap()), value(&first));
        assert_eq!(ep.calls(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = client.token().await.unwrap();
        assert_eq!(ep.calls(), 2, "refreshed within the last minute");
        assert_ne!(value(&second), value(&first));
        assert!(
            Instant::now() - t0 < Duration::from_secs(3600),
            "before the old one expired"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_concurrent_callers_cause_one_request() {
        let ep = Scripted::new(Duration::from_millis(500), vec![]);
        let client = Arc::new(TokenClient::new(ep.clone()));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.token().await })
            })
            .collect();
        let mut got = Vec::new();
        for c in callers {
            got.push(value(&c.await.unwrap().unwrap()).to_owned());
        }
        assert_eq!(ep.calls(), 1);
        assert!(got.iter().all(|t| t == "tok-0"));
    }

    #[tokio::test(start_paused = true)]
    async fn during_a_refresh_the_unexpired_token_serves_without_waiting() {
        let ep = Scripted::new(Duration::from_secs(5), vec![]);
        let client = Arc::new(TokenClient::new(ep.clone()));
        let first = client.token().await.unwrap();
        tokio::time::advance(Duration::from_secs(3550)).await;
        let refresher = {
            let c = client.clone();
            tokio::spawn(async move { c.token().await })
        };
        tokio::task::yield_now().await;
        assert_eq!(ep.calls(), 2, "the refresh started");
        let before = Instant::now();
        let during = client.token().await.unwrap();
        assert_eq!(Instant::now(), before, "answered at once");
        assert_eq!(value(&during), value(&first));
        let after = refresher.await.unwrap().unwrap();
        assert_eq!(value(&after), "tok-1");
        assert_eq!(value(&client.token().await.unwrap()), "tok-1");
        assert_eq!(ep.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_is_waited_out_for_its_retry_after() {
        let ep = Scripted::new(
            Duration::ZERO,
            vec![
                Err(TokenError::RateLimited {
                    retry_after: Duration::from_secs(7),
                }),
                Ok(issued("after-429", 3600)),
            ],
        );
        let client = TokenClient::new(ep.clone());
        let t = client.token().await.unwrap();
        assert_eq!(value(&t), "after-429");
        let times = ep.call_times.lock().unwrap().clone();
        assert_eq!(times.len(), 2);
        assert!(
            times[1] - times[0] >= Duration::from_secs(7),
            "{:?}",
            times[1] - times[0]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_retry_after_is_an_error_and_no_request_comes_before_it() {
        let ep = Scripted::new(
            Duration::ZERO,
            vec![Err(TokenError::RateLimited {
                retry_after: Duration::from_secs(600),
            })],
        );
        let client = TokenClient::new(ep.clone());
        let start = Instant::now();
        let e = client.token().await.unwrap_err();
        assert!(matches!(e, TokenError::RateLimited { .. }));
        assert_eq!(
            Instant::now(),
            start,
            "did not sleep 10 minutes in the caller"
        );
        tokio::time::advance(Duration::from_secs(300)).await;
        match client.token().await.unwrap_err() {
            TokenError::RateLimited { retry_after } => {
                assert_eq!(
                    retry_after,
                    Duration::from_secs(300),
                    "the rest of the wait"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ep.calls(), 1, "no request inside the Retry-After");
        tokio::time::advance(Duration::from_secs(300)).await;
        assert!(client.token().await.is_ok());
        assert_eq!(ep.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_shared_by_the_callers_that_waited_for_it() {
        let unauthorized = TokenError::Unauthorized {
            status: 401,
            detail: "invalid_client".into(),
        };
        let ep = Scripted::new(Duration::from_millis(200), vec![Err(unauthorized.clone())]);
        let client = Arc::new(TokenClient::new(ep.clone()));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.token().await })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap().unwrap_err(), unauthorized);
        }
        assert_eq!(ep.calls(), 1);
        // A later caller tries again (the configuration may have been fixed meanwhile).
        assert!(client.token().await.is_ok());
        assert_eq!(ep.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_serving_the_unexpired_token() {
        let ep = Scripted::new(Duration::ZERO, vec![]);
        let client = TokenClient::new(ep.clone());
        let first = client.token().await.unwrap();
        ep.answers
            .lock()
            .unwrap()
            .push_back(Err(TokenError::Unavailable {
                status: 503,
                detail: "down".into(),
            }));
        tokio::time::advance(Duration::from_secs(3550)).await;
        assert_eq!(value(&client.token().await.unwrap()), value(&first));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            value(&client.token().await.unwrap()),
            "tok-2",
            "expired: fetched anew"
        );
    }
}
