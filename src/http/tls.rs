//! HTTPS for the receiver (SPEC §4.6): the rustls server configuration (TLS 1.2 and
//! 1.3, ALPN h2 and http/1.1) and a certificate that is read again when its files
//! change, so a renewal (certbot, cert-manager) needs no restart.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, version};

use crate::config::{ConfigError, TlsFiles};

/// How often at most the files are looked at again: a renewal shows within this, and
/// a busy server stats the files once per interval, not once per handshake.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The acceptor for `files`, or a configuration error naming `TLS_CERT_FILE` or
/// `TLS_KEY_FILE` when they do not hold a usable certificate and key.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, ConfigError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let resolver = ReloadingCert::new(files.clone(), provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| ConfigError::new("TLS_CERT_FILE", format!("TLS setup failed: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reads and checks the chain and key: both parse, and the key belongs to the leaf.
fn load(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, ConfigError> {
    let cert_problem =
        |p: String| ConfigError::new("TLS_CERT_FILE", format!("{}: {p}", files.cert.display()));
    let key_problem =
        |p: String| ConfigError::new("TLS_KEY_FILE", format!("{}: {p}", files.key.display()));

    let pem = std::fs::read(&files.cert).map_err(|e| cert_problem(format!("cannot read ({e})")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_problem(format!("not a PEM certificate chain ({e})")))?;
    if chain.is_empty() {
        return Err(cert_problem("holds no PEM CERTIFICATE block".into()));
    }
    let pem = std::fs::read(&files.key).map_err(|e| key_problem(format!("cannot read ({e})")))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_problem(format!("not a PEM private key ({e})")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        key_problem(format!(
            "unusable with the certificate in TLS_CERT_FILE ({e})"
        ))
    })
}

/// What a file looked like: a renewal changes at least one of these. The inode catches
/// a file replaced by rename within the modification time's granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    /// Last modification time.
    modified: SystemTime,
    /// Size in bytes.
    len: u64,
    /// Inode number (0 where there is none).
    inode: u64,
}

/// The stamps of the certificate and key files; `None` for a file that cannot be
/// looked at (being replaced, say).
type Stamp = [Option<FileStamp>; 2];

fn stamp(files: &TlsFiles) -> Stamp {
    // `metadata` follows symlinks: certbot's `live/` links and cert-manager's `..data`
    // swap change the target, which is what is stamped.
    let of = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileStamp {
            modified: m.modified().ok()?,
            len: m.len(),
            inode,
        })
    };
    [of(&files.cert), of(&files.key)]
}

/// Serves the certificate last read from the files, and reads them again (at most
/// once per [`RELOAD_CHECK_INTERVAL`], during a handshake) when they changed. A file
/// that fails to load keeps the previous certificate in use and is reported once.
struct ReloadingCert {
    /// The files to watch.
    files: TlsFiles,
    /// Parses the private key.
    provider: Arc<CryptoProvider>,
    /// What is being served, and what the files looked like when it was read.
    state: Mutex<State>,
}

struct State {
    /// The certificate presented to clients.
    current: Arc<CertifiedKey>,
    /// The files' stamp when `current` was read.
    loaded: Stamp,
    /// The stamp of files that failed to load, so the failure is logged once.
    failed: Option<Stamp>,
    /// When the files were last looked at.
    checked: Instant,
}

impl ReloadingCert {
    fn new(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, ConfigError> {
        let loaded = stamp(&files);
        let current = Arc::new(load(&files, &provider)?);
        Ok(Self {
            files,
            provider,
            state: Mutex::new(State {
                current,
                loaded,
                failed: None,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to present, reloaded first when the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            state.checked = Instant::now();
            let now = stamp(&self.files);
            if now != state.loaded && Some(now) != state.failed {
                match load(&self.files, &self.provider) {
                    Ok(key) => {
                        state.current = Arc::new(key);
                        state.loaded = now;
                        state.failed = None;
                        tracing::info!(
                            cert = %self.files.cert.display(),
                            "TLS certificate reloaded"
                        );
                    }
                    Err(e) => {
                        // Half-written files during a renewal land here too; the next
                        // change of the files tries again.
                        state.failed = Some(now);
                        tracing::warn!(
                            error = %e,
                            "TLS files changed but cannot be used; still serving the previous certificate"
                        );
                    }
                }
            }
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}
