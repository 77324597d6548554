//! `webhook-relay healthcheck URL`: the container `HEALTHCHECK`, so the runtime image
//! needs no curl. One GET over http:// or https://; healthy means a 2xx answer within
//! the timeout.

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;

/// Why the checked endpoint is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The URL is not an http(s) URL; fix the command line.
    #[error("not an http:// or https:// URL: {0:?}")]
    BadUrl(String),
    /// The `--ca-file` cannot be read or holds no PEM certificate; fix the command line.
    #[error("--ca-file {path}: {problem}")]
    BadCaFile {
        /// The file given.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No answer: refused, reset, or slower than the timeout.
    #[error("no answer from {url}")]
    Unreachable {
        /// The checked URL.
        url: String,
        /// What the HTTP client saw.
        #[source]
        source: reqwest::Error,
    },
    /// An answer, but not a 2xx.
    #[error("{url} answered {status}")]
    Unhealthy {
        /// The checked URL.
        url: String,
        /// The status it answered.
        status: StatusCode,
    },
}

/// Which certificates an https:// check accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's CA store: a certificate from a public CA, checked against the host.
    System,
    /// Also this PEM file: a private CA, or a self-signed certificate itself.
    CaFile(PathBuf),
    /// Any certificate, any host name: only proves a TLS server answers. For a probe of
    /// the process itself over loopback, where the certificate names the public host.
    AnyCertificate,
}

/// Whether a status counts as healthy: any 2xx, and nothing else (a redirect is not
/// followed, so it does not count).
pub fn is_healthy(status: StatusCode) -> bool {
    status.is_success()
}

/// GETs `url` once; `Ok` with the status when it is healthy.
pub async fn check(url: &str, timeout: Duration, trust: &Trust) -> Result<StatusCode, HealthError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| HealthError::BadUrl(url.to_owned()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(HealthError::BadUrl(url.to_owned()));
    }
    let mut builder = reqwest::Client::builder();
    match trust {
        Trust::System => {}
        Trust::CaFile(path) => {
            let bad = |problem: String| HealthError::BadCaFile {
                path: path.display().to_string(),
                problem,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("not PEM certificates ({e})")))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        Trust::AnyCertificate => builder = builder.danger_accept_invalid_certs(true),
    }
    let client = builder
        .timeout(timeout)
        .connect_timeout(timeout)
        // The probe asks this process about itself: never through a proxy from the environment.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|source| HealthError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    let response = client
        .get(parsed)
        .send()
        .await
        .map_err(|source| HealthError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    let status = response.status();
    if is_healthy(status) {
        Ok(status)
    } else {
        Err(HealthError::Unhealthy {
            url: url.to_owned(),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_is_healthy() {
        assert!(is_healthy(StatusCode::OK));
        assert!(is_healthy(StatusCode::NO_CONTENT));
        assert!(!is_healthy(StatusCode::MOVED_PERMANENTLY));
        assert!(!is_healthy(StatusCode::NOT_FOUND));
        assert!(!is_healthy(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[tokio::test]
    async fn a_non_http_url_is_refused_before_any_request() {
        let err = check("ftp://127.0.0.1/", Duration::from_secs(1), &Trust::System)
            .await
            .unwrap_err();
        assert!(matches!(err, HealthError::BadUrl(_)), "{err}");
    }
}
