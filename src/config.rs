//! The environment contract (SPEC §7): every variable is read once with envy and
//! validated here, so a bad value stops the process before anything connects.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Default broker address: the local RabbitMQ with the stock guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Longest allowed downstream attempt (15 min).
const MAX_DELIVERY_TIMEOUT_MS: u64 = 900_000;
/// Longest allowed wait for a publish confirm (5 min).
const MAX_PUBLISH_TIMEOUT_MS: u64 = 300_000;

/// A configuration problem, always naming the variable so the operator knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault, spelled as the operator sets it.
    pub var: &'static str,
    /// What is wrong with it, in words.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

/// A secret value (token, password, HMAC key) whose `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value read from the environment.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret's bytes, for constant-time comparison or signing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The broker addresses (`AMQP_URL`: one URL, or a cluster's nodes separated by
/// commas), each checked to be a well-formed AMQP URI; `Debug` hides the passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(Vec<String>);

impl AmqpUrl {
    /// Parses `AMQP_URL`; a bad address names its position in the list.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let urls: Vec<String> = text.split(',').map(|u| u.trim().to_owned()).collect();
        let n = urls.len();
        for (i, url) in urls.iter().enumerate() {
            let at = if n > 1 {
                format!("address {} of {n}", i + 1)
            } else {
                "the address".to_owned()
            };
            if url.is_empty() {
                return Err(ConfigError::new("AMQP_URL", format!("{at} is empty")));
            }
            lapin::uri::AMQPUri::from_str(url).map_err(|e| {
                ConfigError::new("AMQP_URL", format!("{at} is not a valid AMQP URL ({e})"))
            })?;
        }
        Ok(Self(urls))
    }

    /// Every address, in the configured order.
    pub fn urls(&self) -> &[String] {
        &self.0
    }

    /// The first address: the user and vhost the definitions export names.
    pub fn first(&self) -> &str {
        &self.0[0]
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self
            .0
            .iter()
            .map(|url| match reqwest::Url::parse(url) {
                Ok(mut u) if u.password().is_some() => {
                    let _ = u.set_password(Some("***"));
                    u.to_string()
                }
                Ok(u) => u.to_string(),
                Err(_) => "(unparsable)".into(),
            })
            .collect();
        if shown.len() == 1 {
            write!(f, "{:?}", shown[0])
        } else {
            write!(f, "{shown:?}")
        }
    }
}

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, the default.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Inbound authentication settings (SPEC §4.4); every configured check must pass.
#[derive(Debug, Clone, Default)]
pub struct InboundAuth {
    /// Shared secret expected as a bearer token or in `token_header`.
    pub token: Option<Secret>,
    /// Header carrying the token instead of `Authorization: Bearer` (lower-case name).
    pub token_header: Option<http::HeaderName>,
    /// `user:pass` expected as HTTP Basic credentials.
    pub basic_auth: Option<Secret>,
    /// Key of the `X-Hub-Signature-256` HMAC over the raw body.
    pub hmac_secret: Option<Secret>,
}

/// Where the receiver's certificate chain and private key live (SPEC §4.6): PEM files,
/// read at start-up and again whenever they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `TLS_CERT_FILE`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `TLS_KEY_FILE`: the private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Intake limits of a receiving process (SPEC §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    /// Inline attempts in flight (`INLINE_MAX_INFLIGHT`); past it an event is
    /// published queue-first and answered 202 `queued` instead of waiting.
    pub inline_max_inflight: usize,
    /// Request bodies held in memory by in-flight requests (`MAX_INFLIGHT_BYTES`).
    pub max_inflight_bytes: usize,
    /// How long a request waits for room in that budget before 503 (`INTAKE_WAIT_MS`).
    pub wait: Duration,
    /// Open client connections (`MAX_CONNECTIONS`); past it new ones are closed.
    pub max_connections: usize,
}

/// The validated configuration of one relay process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker addresses (a cluster's nodes), each checked to be a well-formed AMQP URI.
    pub amqp_url: AmqpUrl,
    /// Where events are forwarded; only the commands that deliver require it.
    pub downstream_url: Option<reqwest::Url>,
    /// Address the HTTP receiver binds.
    pub listen_addr: SocketAddr,
    /// Attempts per event before it is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Backoff unit: the wait after failed attempt k is `base * 2^k`, capped.
    pub backoff_base: Duration,
    /// Cap of the backoff and of an honoured `Retry-After`; the last retry level.
    pub backoff_max: Duration,
    /// Time allowed for one downstream attempt made by a worker.
    pub delivery_timeout: Duration,
    /// Whether the receiver makes attempt 1 itself before answering.
    pub inline_delivery: bool,
    /// Time allowed for the inline attempt (kept below the senders' own timeouts).
    pub inline_timeout: Duration,
    /// Prefix of every exchange and queue name, so deployments can share a broker.
    pub queue_prefix: String,
    /// Deliveries in flight per worker process (the consumer prefetch).
    pub worker_concurrency: u16,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Intake limits (SPEC §4.5): memory stays bounded under any burst.
    pub intake: IntakeLimits,
    /// Time a sender has for its request headers, and then for its body; a slower
    /// sender (slowloris) is cut off so it cannot hold a connection and memory.
    pub request_timeout: Duration,
    /// How long a stopping process lets in-flight work finish.
    pub shutdown_grace: Duration,
    /// How long a publish may wait for the broker's confirm before it counts as failed.
    pub publish_timeout: Duration,
    /// Bearer token guarding `/admin`; the tree does not exist without it.
    pub admin_token: Option<Secret>,
    /// Inbound authentication checks.
    pub inbound: InboundAuth,
    /// Headers added to every delivery (`DOWNSTREAM_HEADERS`), values hidden from Debug.
    pub downstream_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Key signing every delivery the Standard Webhooks way (`DOWNSTREAM_SIGNING_SECRET`).
    pub downstream_signing: Option<crate::delivery::SigningKey>,
    /// OAuth client for calls back to Genesys Cloud (SPEC §9).
    pub genesys: crate::genesys::GenesysSettings,
    /// Log output format.
    pub log_format: LogFormat,

    // HTTPS, the admin listener and header forwarding (SPEC §4.3, §4.6).
    /// Serve HTTPS on `listen_addr` with these files; plain HTTP when `None`.
    pub tls: Option<TlsFiles>,
    /// Where `/admin/...` and `/metrics` are served instead of `listen_addr`, so the
    /// operations surface can stay on an internal network.
    pub admin_listen_addr: Option<SocketAddr>,
    /// `FORWARD_HEADERS`: when set, only these request headers (and `content-type`)
    /// travel to the downstream, instead of all but the excluded ones.
    pub forward_headers: Option<Vec<http::HeaderName>>,
    // Protecting the downstream (SPEC §5a).
    /// Adaptive concurrency, `DOWNSTREAM_MAX_RPS`, the circuit breaker, `MAX_BACKLOG`.
    pub protect: crate::protect::ProtectSettings,
}

/// The variables as strings, exactly as envy reads them from the environment.
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    amqp_url: Option<String>,
    downstream_url: Option<String>,
    listen_addr: Option<String>,
    max_attempts: Option<String>,
    backoff_base_ms: Option<String>,
    backoff_max_ms: Option<String>,
    delivery_timeout_ms: Option<String>,
    inline_delivery: Option<String>,
    inline_timeout_ms: Option<String>,
    queue_prefix: Option<String>,
    worker_concurrency: Option<String>,
    max_body_bytes: Option<String>,
    inline_max_inflight: Option<String>,
    max_inflight_bytes: Option<String>,
    intake_wait_ms: Option<String>,
    max_connections: Option<String>,
    request_timeout_ms: Option<String>,
    downstream_headers: Option<String>,
    downstream_signing_secret: Option<String>,
    genesys_client_id: Option<String>,
    genesys_client_secret: Option<String>,
    genesys_region: Option<String>,
    genesys_login_url: Option<String>,
    shutdown_grace_ms: Option<String>,
    publish_timeout_ms: Option<String>,
    admin_token: Option<String>,
    inbound_token: Option<String>,
    inbound_token_header: Option<String>,
    inbound_basic_auth: Option<String>,
    inbound_hmac_secret: Option<String>,
    log_format: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    admin_listen_addr: Option<String>,
    forward_headers: Option<String>,
    // Protecting the downstream (SPEC §5a).
    adaptive_concurrency: Option<String>,
    downstream_max_rps: Option<String>,
    circuit_breaker: Option<String>,
    breaker_failure_percent: Option<String>,
    breaker_min_attempts: Option<String>,
    breaker_probe_ms: Option<String>,
    max_backlog: Option<String>,
}

impl Config {
    /// Reads the process environment (after `.env`, which the caller loads).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_raw(envy::from_env::<RawEnv>().map_err(envy_error)?)
    }

    /// Reads the same contract from explicit pairs; tests build their configuration this way.
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
        Self::from_raw(envy::from_iter::<_, RawEnv>(vars).map_err(envy_error)?)
    }

    fn from_raw(raw: RawEnv) -> Result<Self, ConfigError> {
        let protect = protect_settings(&raw)?;
        let amqp_url =
            AmqpUrl::parse(&nonblank(raw.amqp_url).unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned()))?;

        let downstream_url = nonblank(raw.downstream_url)
            .map(|s| parse_http_url("DOWNSTREAM_URL", &s))
            .transpose()?;

        let listen_addr = nonblank(raw.listen_addr)
            .map(|s| socket_addr("LISTEN_ADDR", &s))
            .transpose()?
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8000)));

        let max_attempts: u32 = number("MAX_ATTEMPTS", raw.max_attempts, 5)?;
        if max_attempts == 0 {
            return Err(ConfigError::new("MAX_ATTEMPTS", "must be at least 1"));
        }
        let backoff_base_ms: u64 = positive("BACKOFF_BASE_MS", raw.backoff_base_ms, 1000)?;
        let backoff_max_ms: u64 = positive("BACKOFF_MAX_MS", raw.backoff_max_ms, 3_600_000)?;
        if backoff_max_ms < backoff_base_ms {
            return Err(ConfigError::new(
                "BACKOFF_MAX_MS",
                format!("must not be below BACKOFF_BASE_MS ({backoff_base_ms})"),
            ));
        }
        // Queue TTLs are 32-bit on the broker side; 24 days is far past any sane cap.
        if backoff_max_ms > u64::from(u32::MAX >> 1) {
            return Err(ConfigError::new(
                "BACKOFF_MAX_MS",
                "must be at most 1073741823 (about 12 days)",
            ));
        }
        let delivery_timeout_ms = positive("DELIVERY_TIMEOUT_MS", raw.delivery_timeout_ms, 10_000)?;
        // A delivery holds its message un-acked for at most delivery + publish timeouts;
        // both are capped so that stays far below RabbitMQ's consumer_timeout (30 min).
        if delivery_timeout_ms > MAX_DELIVERY_TIMEOUT_MS {
            return Err(ConfigError::new(
                "DELIVERY_TIMEOUT_MS",
                format!(
                    "must be at most {MAX_DELIVERY_TIMEOUT_MS} (15 min), below the broker's consumer_timeout"
                ),
            ));
        }
        let inline_delivery = boolean("INLINE_DELIVERY", raw.inline_delivery, true)?;
        let inline_timeout_ms = positive("INLINE_TIMEOUT_MS", raw.inline_timeout_ms, 2_000)?;

        let queue_prefix = nonblank(raw.queue_prefix).unwrap_or_else(|| "webhooks".to_owned());
        validate_prefix(&queue_prefix)?;

        let worker_concurrency: u16 = positive("WORKER_CONCURRENCY", raw.worker_concurrency, 32)?;
        let max_body_bytes: usize = positive("MAX_BODY_BYTES", raw.max_body_bytes, 1_048_576)?;
        let request_timeout_ms: u64 =
            positive("REQUEST_TIMEOUT_MS", raw.request_timeout_ms, 15_000)?;
        let intake = IntakeLimits {
            inline_max_inflight: positive("INLINE_MAX_INFLIGHT", raw.inline_max_inflight, 64)?,
            max_inflight_bytes: positive(
                "MAX_INFLIGHT_BYTES",
                raw.max_inflight_bytes,
                64 * 1024 * 1024,
            )?,
            wait: Duration::from_millis(number("INTAKE_WAIT_MS", raw.intake_wait_ms, 1_000u64)?),
            max_connections: positive("MAX_CONNECTIONS", raw.max_connections, 10_000)?,
        };
        if intake.max_inflight_bytes < max_body_bytes {
            return Err(ConfigError::new(
                "MAX_INFLIGHT_BYTES",
                format!(
                    "must be at least MAX_BODY_BYTES ({max_body_bytes}), or a body of the largest accepted size could never be taken in"
                ),
            ));
        }
        if intake.max_inflight_bytes > u32::MAX as usize {
            return Err(ConfigError::new(
                "MAX_INFLIGHT_BYTES",
                format!("must be at most {}", u32::MAX),
            ));
        }
        let downstream_headers = nonblank(raw.downstream_headers)
            .map(|h| crate::delivery::parse_static_headers(&h))
            .transpose()
            .map_err(|e| ConfigError::new("DOWNSTREAM_HEADERS", e))?
            .unwrap_or_default();
        let downstream_signing = nonblank(raw.downstream_signing_secret)
            .map(|k| crate::delivery::SigningKey::parse(&k))
            .transpose()
            .map_err(|e| ConfigError::new("DOWNSTREAM_SIGNING_SECRET", e))?;
        let genesys = crate::genesys::GenesysSettings::from_vars(
            nonblank(raw.genesys_client_id),
            nonblank(raw.genesys_client_secret),
            nonblank(raw.genesys_region),
            nonblank(raw.genesys_login_url),
        )?;
        let shutdown_grace_ms: u64 = number("SHUTDOWN_GRACE_MS", raw.shutdown_grace_ms, 10_000)?;
        let publish_timeout_ms: u64 =
            positive("PUBLISH_TIMEOUT_MS", raw.publish_timeout_ms, 2_500)?;
        if publish_timeout_ms > MAX_PUBLISH_TIMEOUT_MS {
            return Err(ConfigError::new(
                "PUBLISH_TIMEOUT_MS",
                format!("must be at most {MAX_PUBLISH_TIMEOUT_MS} (5 min)"),
            ));
        }

        let inbound_token_header = nonblank(raw.inbound_token_header)
            .map(|h| {
                http::HeaderName::from_bytes(h.trim().to_ascii_lowercase().as_bytes()).map_err(
                    |_| {
                        ConfigError::new(
                            "INBOUND_TOKEN_HEADER",
                            format!("not a valid header name: {h:?}"),
                        )
                    },
                )
            })
            .transpose()?
            // `Authorization` is the default carrier (as a bearer token), not a custom header.
            .filter(|h| h != http::header::AUTHORIZATION);
        let basic_auth = nonblank(raw.inbound_basic_auth).map(Secret);
        if let Some(b) = &basic_auth
            && !b.0.contains(':')
        {
            return Err(ConfigError::new(
                "INBOUND_BASIC_AUTH",
                "expected user:pass (the colon is missing)",
            ));
        }
        let inbound_token = nonblank(raw.inbound_token).map(Secret);
        if inbound_token.is_some() && basic_auth.is_some() && inbound_token_header.is_none() {
            // Both would need the one Authorization header, so no request could pass.
            return Err(ConfigError::new(
                "INBOUND_TOKEN_HEADER",
                "must be set when INBOUND_TOKEN and INBOUND_BASIC_AUTH are both set \
                 (a bearer token and Basic credentials cannot share the Authorization header)",
            ));
        }

        let log_format = match nonblank(raw.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                ));
            }
        };

        let tls = match (nonblank(raw.tls_cert_file), nonblank(raw.tls_key_file)) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "TLS_KEY_FILE",
                    "is required when TLS_CERT_FILE is set (both or neither)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "TLS_CERT_FILE",
                    "is required when TLS_KEY_FILE is set (both or neither)",
                ));
            }
        };
        let admin_listen_addr = nonblank(raw.admin_listen_addr)
            .map(|s| socket_addr("ADMIN_LISTEN_ADDR", &s))
            .transpose()?;
        let forward_headers = nonblank(raw.forward_headers)
            .map(|list| crate::event::parse_header_list(&list))
            .transpose()
            .map_err(|e| ConfigError::new("FORWARD_HEADERS", e))?;

        Ok(Self {
            amqp_url,
            downstream_url,
            listen_addr,
            max_attempts,
            backoff_base: Duration::from_millis(backoff_base_ms),
            backoff_max: Duration::from_millis(backoff_max_ms),
            delivery_timeout: Duration::from_millis(delivery_timeout_ms),
            inline_delivery,
            inline_timeout: Duration::from_millis(inline_timeout_ms),
            queue_prefix,
            worker_concurrency,
            max_body_bytes,
            intake,
            request_timeout: Duration::from_millis(request_timeout_ms),
            shutdown_grace: Duration::from_millis(shutdown_grace_ms),
            publish_timeout: Duration::from_millis(publish_timeout_ms),
            admin_token: nonblank(raw.admin_token).map(Secret),
            inbound: InboundAuth {
                token: inbound_token,
                token_header: inbound_token_header,
                basic_auth,
                hmac_secret: nonblank(raw.inbound_hmac_secret).map(Secret),
            },
            downstream_headers,
            downstream_signing,
            genesys,
            log_format,
            tls,
            admin_listen_addr,
            forward_headers,
            protect,
        })
    }

    /// The downstream URL, for the commands that deliver; names the variable when it is missing.
    pub fn require_downstream(&self, command: &str) -> Result<&reqwest::Url, ConfigError> {
        self.downstream_url.as_ref().ok_or_else(|| {
            ConfigError::new(
                "DOWNSTREAM_URL",
                format!("is required by `{command}` (the URL events are forwarded to)"),
            )
        })
    }
}

/// SPEC §5a: the variables that protect the downstream.
fn protect_settings(raw: &RawEnv) -> Result<crate::protect::ProtectSettings, ConfigError> {
    let adaptive_concurrency = boolean(
        "ADAPTIVE_CONCURRENCY",
        raw.adaptive_concurrency.clone(),
        true,
    )?;
    let max_rps = nonblank(raw.downstream_max_rps.clone())
        .map(|v| positive::<u32>("DOWNSTREAM_MAX_RPS", Some(v), 1))
        .transpose()?
        .and_then(std::num::NonZeroU32::new);
    let failure_percent: u8 = positive(
        "BREAKER_FAILURE_PERCENT",
        raw.breaker_failure_percent.clone(),
        70,
    )?;
    if failure_percent > 100 {
        return Err(ConfigError::new(
            "BREAKER_FAILURE_PERCENT",
            "must be a percentage from 1 to 100",
        ));
    }
    let min_attempts: u32 = positive("BREAKER_MIN_ATTEMPTS", raw.breaker_min_attempts.clone(), 20)?;
    if min_attempts > 10_000 {
        return Err(ConfigError::new(
            "BREAKER_MIN_ATTEMPTS",
            "must be at most 10000",
        ));
    }
    let probe_ms: u64 = positive("BREAKER_PROBE_MS", raw.breaker_probe_ms.clone(), 5_000)?;
    if probe_ms > 3_600_000 {
        return Err(ConfigError::new(
            "BREAKER_PROBE_MS",
            "must be at most 3600000 (1 h)",
        ));
    }
    let breaker = boolean("CIRCUIT_BREAKER", raw.circuit_breaker.clone(), false)?.then_some(
        crate::protect::breaker::BreakerSettings {
            failure_percent,
            min_attempts,
            probe: Duration::from_millis(probe_ms),
        },
    );
    let max_backlog = nonblank(raw.max_backlog.clone())
        .map(|v| positive::<u64>("MAX_BACKLOG", Some(v), 1))
        .transpose()?;
    Ok(crate::protect::ProtectSettings {
        adaptive_concurrency,
        max_rps,
        breaker,
        max_backlog,
    })
}

fn envy_error(e: envy::Error) -> ConfigError {
    // Every field is an optional string, so envy can only fail on non-UTF-8 values.
    ConfigError::new("environment", e.to_string())
}

fn nonblank(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn number<T: FromStr>(
    var: &'static str,
    raw: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    match nonblank(raw) {
        None => Ok(default),
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| ConfigError::new(var, format!("expected a whole number, got {s:?}"))),
    }
}

fn positive<T>(var: &'static str, raw: Option<String>, default: T) -> Result<T, ConfigError>
where
    T: FromStr + PartialEq + Default,
{
    let v = number(var, raw, default)?;
    if v == T::default() {
        return Err(ConfigError::new(var, "must be greater than 0"));
    }
    Ok(v)
}

fn boolean(var: &'static str, raw: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match nonblank(raw)
        .map(|s| s.trim().to_ascii_lowercase())
        .as_deref()
    {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::new(
            var,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

fn socket_addr(var: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse().map_err(|_| {
        ConfigError::new(
            var,
            format!("expected host:port such as 0.0.0.0:8000, got {s:?}"),
        )
    })
}

fn parse_http_url(var: &'static str, s: &str) -> Result<reqwest::Url, ConfigError> {
    let url = reqwest::Url::parse(s.trim())
        .map_err(|e| ConfigError::new(var, format!("not a valid URL ({e}): {s:?}")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err(ConfigError::new(
            var,
            format!("expected an http:// or https:// URL with a host, got {s:?}"),
        )),
    }
}

fn validate_prefix(prefix: &str) -> Result<(), ConfigError> {
    // Leaves room for the longest suffix (".retry.NN-<delay>") within AMQP's 255-byte names.
    if prefix.len() > 200 {
        return Err(ConfigError::new(
            "QUEUE_PREFIX",
            "must be at most 200 characters",
        ));
    }
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(ConfigError::new(
            "QUEUE_PREFIX",
            format!("may hold only letters, digits and . - _ : (got {prefix:?})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = cfg(&[("DOWNSTREAM_URL", "http://example.test/hook")]).unwrap();
        assert_eq!(c.amqp_url.urls(), [DEFAULT_AMQP_URL]);
        assert_eq!(c.listen_addr, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.backoff_base, Duration::from_millis(1000));
        assert_eq!(c.backoff_max, Duration::from_millis(3_600_000));
        assert_eq!(c.delivery_timeout, Duration::from_millis(10_000));
        assert!(c.inline_delivery);
        assert_eq!(c.inline_timeout, Duration::from_millis(2000));
        assert_eq!(c.queue_prefix, "webhooks");
        assert_eq!(c.worker_concurrency, 32);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.intake.inline_max_inflight, 64);
        assert_eq!(c.intake.max_inflight_bytes, 64 * 1024 * 1024);
        assert_eq!(c.intake.wait, Duration::from_millis(1_000));
        assert_eq!(c.intake.max_connections, 10_000);
        assert_eq!(c.request_timeout, Duration::from_millis(15_000));
        assert!(c.downstream_headers.is_empty() && c.downstream_signing.is_none());
        assert_eq!(c.shutdown_grace, Duration::from_millis(10_000));
        assert_eq!(c.publish_timeout, Duration::from_millis(2_500));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.protect, crate::protect::ProtectSettings::default());
        assert!(c.protect.adaptive_concurrency && c.protect.breaker.is_none());
    }

    #[test]
    fn protection_variables_parse() {
        let c = cfg(&[
            ("ADAPTIVE_CONCURRENCY", "false"),
            ("DOWNSTREAM_MAX_RPS", "50"),
            ("CIRCUIT_BREAKER", "true"),
            ("BREAKER_FAILURE_PERCENT", "60"),
            ("BREAKER_MIN_ATTEMPTS", "10"),
            ("BREAKER_PROBE_MS", "250"),
            ("MAX_BACKLOG", "100"),
        ])
        .unwrap();
        let p = c.protect;
        assert!(!p.adaptive_concurrency);
        assert_eq!(p.max_rps.map(|r| r.get()), Some(50));
        assert_eq!(
            p.breaker,
            Some(crate::protect::breaker::BreakerSettings {
                failure_percent: 60,
                min_attempts: 10,
                probe: Duration::from_millis(250),
            })
        );
        assert_eq!(p.max_backlog, Some(100));
        let on = cfg(&[("CIRCUIT_BREAKER", "true")]).unwrap().protect.breaker;
        assert_eq!(
            on,
            Some(crate::protect::breaker::BreakerSettings::default())
        );
    }

    #[test]
    fn several_broker_addresses_are_each_checked() {
        let c = cfg(&[(
            "AMQP_URL",
            "amqp://u:p1@n1:5672/%2f, amqp://u:p2@n2:5672/%2f,amqp://u:p3@n3:5672/%2f",
        )])
        .unwrap();
        assert_eq!(c.amqp_url.urls().len(), 3);
        assert_eq!(c.amqp_url.urls()[1], "amqp://u:p2@n2:5672/%2f");
        let shown = format!("{:?}", c.amqp_url);
        assert!(!shown.contains("p1") && !shown.contains("p3"), "{shown}");
        let e = cfg(&[("AMQP_URL", "amqp://n1:5672/%2f,nope://n2")]).unwrap_err();
        assert!(e.problem.contains("address 2 of 2"), "{e}");
        let e = cfg(&[("AMQP_URL", "amqp://n1:5672/%2f,,amqp://n3")]).unwrap_err();
        assert!(e.problem.contains("address 2 of 3 is empty"), "{e}");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (vars, var) in [
            (vec![("MAX_ATTEMPTS", "abc")], "MAX_ATTEMPTS"),
            (vec![("MAX_ATTEMPTS", "0")], "MAX_ATTEMPTS"),
            (vec![("DOWNSTREAM_URL", "not a url")], "DOWNSTREAM_URL"),
            (vec![("DOWNSTREAM_URL", "ftp://x/y")], "DOWNSTREAM_URL"),
            (vec![("AMQP_URL", "http://nope")], "AMQP_URL"),
            (vec![("LISTEN_ADDR", "8000")], "LISTEN_ADDR"),
            (vec![("INLINE_DELIVERY", "maybe")], "INLINE_DELIVERY"),
            (vec![("BACKOFF_BASE_MS", "0")], "BACKOFF_BASE_MS"),
            (
                vec![("BACKOFF_BASE_MS", "10"), ("BACKOFF_MAX_MS", "5")],
                "BACKOFF_MAX_MS",
            ),
            (vec![("QUEUE_PREFIX", "has space")], "QUEUE_PREFIX"),
            (vec![("WORKER_CONCURRENCY", "70000")], "WORKER_CONCURRENCY"),
            (vec![("LOG_FORMAT", "xml")], "LOG_FORMAT"),
            (
                vec![("DELIVERY_TIMEOUT_MS", "3600000")],
                "DELIVERY_TIMEOUT_MS",
            ),
            (
                vec![("PUBLISH_TIMEOUT_MS", "3600000")],
                "PUBLISH_TIMEOUT_MS",
            ),
            (
                vec![("INBOUND_BASIC_AUTH", "nocolon")],
                "INBOUND_BASIC_AUTH",
            ),
            (vec![("REQUEST_TIMEOUT_MS", "0")], "REQUEST_TIMEOUT_MS"),
            (vec![("INLINE_MAX_INFLIGHT", "0")], "INLINE_MAX_INFLIGHT"),
            (vec![("MAX_INFLIGHT_BYTES", "1000")], "MAX_INFLIGHT_BYTES"),
            (vec![("INTAKE_WAIT_MS", "soon")], "INTAKE_WAIT_MS"),
            (vec![("MAX_CONNECTIONS", "0")], "MAX_CONNECTIONS"),
            (
                vec![("AMQP_URL", "amqp://a:5672/%2f, http://b")],
                "AMQP_URL",
            ),
            (
                vec![("DOWNSTREAM_HEADERS", "X-Api-Key: k")],
                "DOWNSTREAM_HEADERS",
            ),
            (
                vec![("DOWNSTREAM_SIGNING_SECRET", "plain")],
                "DOWNSTREAM_SIGNING_SECRET",
            ),
            (vec![("GENESYS_REGION", "atlantis")], "GENESYS_REGION"),
            (vec![("TLS_CERT_FILE", "cert.pem")], "TLS_KEY_FILE"),
            (vec![("TLS_KEY_FILE", "key.pem")], "TLS_CERT_FILE"),
            (vec![("ADMIN_LISTEN_ADDR", "9090")], "ADMIN_LISTEN_ADDR"),
            (
                vec![("FORWARD_HEADERS", "x-ok, bad header")],
                "FORWARD_HEADERS",
            ),
            (
                vec![("INBOUND_TOKEN", "t"), ("INBOUND_BASIC_AUTH", "u:p")],
                "INBOUND_TOKEN_HEADER",
            ),
            (
                vec![("ADAPTIVE_CONCURRENCY", "auto")],
                "ADAPTIVE_CONCURRENCY",
            ),
            (vec![("DOWNSTREAM_MAX_RPS", "0")], "DOWNSTREAM_MAX_RPS"),
            (vec![("CIRCUIT_BREAKER", "sometimes")], "CIRCUIT_BREAKER"),
            (
                vec![("BREAKER_FAILURE_PERCENT", "101")],
                "BREAKER_FAILURE_PERCENT",
            ),
            (vec![("BREAKER_MIN_ATTEMPTS", "0")], "BREAKER_MIN_ATTEMPTS"),
            (vec![("BREAKER_PROBE_MS", "-5")], "BREAKER_PROBE_MS"),
            (vec![("MAX_BACKLOG", "lots")], "MAX_BACKLOG"),
        ] {
            let err = cfg(&vars).unwrap_err();
            assert_eq!(err.var, var, "{vars:?} gave {err}");
            assert!(err.to_string().starts_with(var));
        }
    }

    #[test]
    fn token_and_basic_together_need_a_token_header() {
        let err = cfg(&[("INBOUND_TOKEN", "t"), ("INBOUND_BASIC_AUTH", "u:p")]).unwrap_err();
        let text = err.to_string();
        for var in [
            "INBOUND_TOKEN_HEADER",
            "INBOUND_TOKEN",
            "INBOUND_BASIC_AUTH",
        ] {
            assert!(text.contains(var), "{text} names {var}");
        }
        // `Authorization` as the token header is the bearer case again: still refused.
        assert!(
            cfg(&[
                ("INBOUND_TOKEN", "t"),
                ("INBOUND_BASIC_AUTH", "u:p"),
                ("INBOUND_TOKEN_HEADER", "Authorization"),
            ])
            .is_err()
        );
        let c = cfg(&[
            ("INBOUND_TOKEN", "t"),
            ("INBOUND_BASIC_AUTH", "u:p"),
            ("INBOUND_TOKEN_HEADER", "X-Relay-Token"),
        ])
        .unwrap();
        assert!(c.inbound.token.is_some() && c.inbound.basic_auth.is_some());
    }

    #[test]
    fn https_admin_listener_and_forward_headers() {
        let c = cfg(&[]).unwrap();
        assert!(c.tls.is_none() && c.admin_listen_addr.is_none() && c.forward_headers.is_none());
        let c = cfg(&[
            ("TLS_CERT_FILE", "/etc/relay/fullchain.pem"),
            ("TLS_KEY_FILE", "/etc/relay/privkey.pem"),
            ("ADMIN_LISTEN_ADDR", "127.0.0.1:9090"),
            (
                "FORWARD_HEADERS",
                "X-Request-Id, x-genesys-cloud-webhook-name,",
            ),
        ])
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/relay/fullchain.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/relay/privkey.pem"));
        assert_eq!(c.admin_listen_addr, Some("127.0.0.1:9090".parse().unwrap()));
        let names: Vec<&str> = c
            .forward_headers
            .as_deref()
            .unwrap()
            .iter()
            .map(|h| h.as_str())
            .collect();
        assert_eq!(names, ["x-request-id", "x-genesys-cloud-webhook-name"]);
    }

    #[test]
    fn downstream_is_required_only_where_used() {
        let c = cfg(&[]).unwrap();
        let err = c.require_downstream("serve").unwrap_err();
        assert_eq!(err.var, "DOWNSTREAM_URL");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = cfg(&[
            ("ADMIN_TOKEN", "hunter2"),
            ("INBOUND_HMAC_SECRET", "s3cret"),
            ("DOWNSTREAM_HEADERS", r#"{"X-Api-Key":"dskey-1"}"#),
            ("DOWNSTREAM_SIGNING_SECRET", "whsec_c2lnbmluZy1rZXk="),
            ("GENESYS_CLIENT_ID", "cid"),
            ("GENESYS_CLIENT_SECRET", "gsecret-1"),
            ("AMQP_URL", "amqp://relay:pw-in-url@broker:5672/%2f"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in [
            "hunter2",
            "s3cret",
            "dskey-1",
            "c2lnbmluZy1rZXk",
            "gsecret-1",
            "pw-in-url",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("relay:***@broker"), "{shown}");
    }
}
