//! HTTPS in process (SPEC §4.6): certificates made in the test with rcgen, served over
//! HTTP/1.1 and h2, rotated on disk without a restart, refused at start-up when they do
//! not parse, and the hostile-input limits kept behind TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use webhook_relay::app::Role;

use crate::common::process::run_cli;
use crate::common::{TestApp, eventually, unique_prefix};

const DEADLINE: Duration = Duration::from_secs(10);

/// A self-signed certificate for `localhost` and 127.0.0.1.
struct Cert {
    pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Cert {
    fn new() -> Self {
        let made = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("rcgen makes a certificate");
        Self {
            pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
            der: made.cert.der().to_vec(),
        }
    }

    fn reqwest(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
    }
}

/// A directory of its own holding `cert.pem` and `key.pem`, removed on drop.
struct CertDir(PathBuf);

impl CertDir {
    fn new(cert: &Cert) -> Self {
        let dir = std::env::temp_dir().join(unique_prefix("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let d = Self(dir);
        d.write(cert);
        d
    }

    fn cert_path(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    fn key_path(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    /// Replaces both files the way a renewal tool does: written aside, then renamed.
    fn write(&self, cert: &Cert) {
        replace(&self.key_path(), cert.key_pem.as_bytes());
        replace(&self.cert_path(), cert.pem.as_bytes());
    }

    fn vars(&self) -> [(String, String); 2] {
        [
            (
                "TLS_CERT_FILE".into(),
                self.cert_path().display().to_string(),
            ),
            ("TLS_KEY_FILE".into(), self.key_path().display().to_string()),
        ]
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn replace(path: &Path, content: &[u8]) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, content).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

async fn spawn_tls(dir: &CertDir, extra: &[(&str, &str)]) -> TestApp {
    let vars = dir.vars();
    let mut overrides: Vec<(&str, &str)> =
        vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    overrides.push(("INLINE_DELIVERY", "false"));
    overrides.extend_from_slice(extra);
    TestApp::spawn(Role::Receiver, &overrides).await
}

/// A client trusting `certs` only, resolving `localhost` to the relay, never reusing a
/// connection (every request is a new handshake).
fn client(addr: SocketAddr, certs: &[&Cert], h1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only(certs.iter().map(|c| c.reqwest()))
        .resolve("localhost", addr)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .no_proxy();
    if h1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

/// The certificate the server presented for this answer.
fn presented(r: &reqwest::Response) -> Vec<u8> {
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}

#[tokio::test]
async fn https_answers_over_http1_and_h2() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[]).await;
    for (h1, version) in [
        (true, http::Version::HTTP_11),
        (false, http::Version::HTTP_2),
    ] {
        let c = client(app.addr, &[&cert], h1);
        let r = c.get(https(app.addr, "/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), version, "ALPN chose {version:?}");
        assert_eq!(presented(&r), cert.der);
        let r = c
            .post(https(app.addr, "/webhook/receive"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"id":"tls-{h1}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["status"], "queued");
        assert_eq!(body["id"], format!("tls-{h1}"));
    }
    // A client that does not trust the certificate gets no answer at all.
    let stranger = client(app.addr, &[&Cert::new()], true);
    assert!(
        stranger
            .get(https(app.addr, "/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_refused_cleanly() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[]).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut got))
        .await
        .expect("the relay closes the connection")
        .ok();
    assert!(
        !got.starts_with(b"HTTP/"),
        "no HTTP answer in the clear: {:?}",
        String::from_utf8_lossy(&got)
    );
    // reqwest over plain HTTP sees an error, not a status.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", app.addr))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // And HTTPS still works.
    let r = client(app.addr, &[&cert], true)
        .get(https(app.addr, "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let first = Cert::new();
    let second = Cert::new();
    let dir = CertDir::new(&first);
    let app = spawn_tls(&dir, &[]).await;
    // A new client for every request: a resumed TLS session would not show the
    // certificate again.
    let addr = app.addr;
    let fetch = |first: &Cert, second: &Cert| {
        let c = client(addr, &[first, second], true);
        async move { c.get(https(addr, "/healthz")).send().await.unwrap() }
    };
    let r = fetch(&first, &second).await;
    assert_eq!(presented(&r), first.der);

    let serves = |cert: &Cert| {
        let der = cert.der.clone();
        let fetch = &fetch;
        let (first, second) = (&first, &second);
        move || {
            let der = der.clone();
            async move { presented(&fetch(first, second).await) == der }
        }
    };
    dir.write(&second);
    eventually(
        Duration::from_secs(5),
        "the next handshakes present the renewed certificate",
        serves(&second),
    )
    .await;

    // A broken file after start keeps the last good certificate in use.
    replace(
        &dir.cert_path(),
        b"-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    tokio::time::sleep(webhook_relay::http::tls::RELOAD_CHECK_INTERVAL * 2).await;
    for _ in 0..3 {
        let r = fetch(&first, &second).await;
        assert_eq!(r.status(), 200);
        assert_eq!(presented(&r), second.der);
    }
    // And mending it is picked up again.
    dir.write(&first);
    eventually(
        Duration::from_secs(5),
        "the mended files are served",
        serves(&first),
    )
    .await;
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_naming_the_variable() {
    let cert = Cert::new();
    let other = Cert::new();
    let prefix = unique_prefix("tls-bad");
    let garbage_dir = CertDir::new(&cert);
    replace(&garbage_dir.cert_path(), b"this is not PEM\n");
    let keyless = CertDir::new(&cert);
    replace(&keyless.key_path(), cert.pem.as_bytes());
    let mismatched = CertDir::new(&cert);
    replace(&mismatched.key_path(), other.key_pem.as_bytes());

    for (dir, var) in [
        (&garbage_dir, "TLS_CERT_FILE"),
        (&keyless, "TLS_KEY_FILE"),
        (&mismatched, "TLS_KEY_FILE"),
    ] {
        let vars = dir.vars();
        let ran = run_cli(
            &prefix,
            &["receiver"],
            &[
                (vars[0].0.as_str(), vars[0].1.as_str()),
                (vars[1].0.as_str(), vars[1].1.as_str()),
                ("INLINE_DELIVERY", "false"),
                ("LISTEN_ADDR", "127.0.0.1:0"),
            ],
        )
        .await;
        assert_eq!(ran.code, 2, "{var}: {}", ran.stderr);
        assert!(
            ran.stderr.contains("configuration error") && ran.stderr.contains(var),
            "names {var}: {}",
            ran.stderr
        );
    }
    let ran = run_cli(
        &prefix,
        &["receiver"],
        &[
            ("TLS_CERT_FILE", "/nonexistent/cert.pem"),
            ("INLINE_DELIVERY", "false"),
        ],
    )
    .await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    assert!(ran.stderr.contains("TLS_KEY_FILE"), "{}", ran.stderr);
}

#[tokio::test]
async fn healthcheck_speaks_https_with_a_ca_file_or_insecure() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[]).await;
    let prefix = unique_prefix("tls-hc");
    let by_name = https(app.addr, "/healthz");
    let by_ip = format!("https://{}/healthz", app.addr);
    let ca = dir.cert_path().display().to_string();
    let run = |args: Vec<String>| {
        let prefix = prefix.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&prefix, &args, &[]).await
        }
    };
    let hc = |url: &str, extra: &[&str]| {
        let mut a = vec!["healthcheck".to_owned(), url.to_owned()];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    // The self-signed certificate is unknown to the system store.
    let ran = run(hc(&by_ip, &[])).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let ran = run(hc(&by_ip, &["--ca-file", &ca])).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("200"), "{}", ran.stdout);
    let ran = run(hc(&by_ip, &["--insecure"])).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    // A CA file that is not PEM is a usage error, not "unhealthy".
    let ran = run(hc(&by_name, &["--ca-file", "/nonexistent/ca.pem"])).await;
    assert_ne!(ran.code, 0);
    assert!(ran.stderr.contains("--ca-file"), "{}", ran.stderr);
}

// ---- hostile input behind TLS ------------------------------------------------

fn connector(cert: &Cert) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der.clone())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Opens a TLS connection, writes `opening`, then `rest` a byte every `gap`, and
/// returns what came back before the relay closed (`None`: not closed in time) and
/// how many bytes of `rest` had been written.
async fn tls_exchange(
    addr: SocketAddr,
    cert: &Cert,
    opening: &[u8],
    rest: &[u8],
    gap: Duration,
) -> (Option<Vec<u8>>, usize) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector(cert).connect(name, tcp).await.expect("handshake");
    let (mut reader, mut writer) = tokio::io::split(tls);
    let opening = opening.to_vec();
    let rest = rest.to_vec();
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let writing = tokio::spawn(async move {
        if writer.write_all(&opening).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        for b in rest {
            tokio::time::sleep(gap).await;
            if writer.write_all(&[b]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
        // Keep the write side open: only the relay may end the exchange.
        tokio::time::sleep(DEADLINE).await;
        drop(writer);
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    writing.abort();
    (closed.then_some(got), written.load(Ordering::SeqCst))
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_like_a_slow_request() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[("REQUEST_TIMEOUT_MS", "500")]).await;
    // Silent after connecting, and stalled inside a ClientHello.
    for opening in [&b""[..], b"\x16\x03\x01\x02\x00\x01"] {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        tcp.write_all(opening).await.unwrap();
        let started = std::time::Instant::now();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{opening:?}: still open after {DEADLINE:?}");
        println!(
            "stalled handshake {opening:?}: closed after {:?}",
            started.elapsed()
        );
    }
    // Silent after the handshake, or stalled inside the HTTP/2 preface.
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let (got, _) = tls_exchange(app.addr, &cert, opening, b"", Duration::ZERO).await;
        let got = got.unwrap_or_else(|| panic!("{opening:?}: not closed"));
        assert!(
            !got.starts_with(b"HTTP/1.1 2"),
            "{opening:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let r = client(app.addr, &[&cert], true)
        .get(https(app.addr, "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
}

#[tokio::test]
async fn slow_headers_over_tls_are_disconnected() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[("REQUEST_TIMEOUT_MS", "500")]).await;
    let rest = format!(
        "host: relay\r\nx-slow: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "y".repeat(60)
    );
    let (got, written) = tls_exchange(
        app.addr,
        &cert,
        b"POST /webhook/receive HTTP/1.1\r\n",
        rest.as_bytes(),
        Duration::from_millis(100),
    )
    .await;
    let got = got.expect("disconnected");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        written < rest.len(),
        "cut off before the headers were complete"
    );
}

#[tokio::test]
async fn header_and_body_limits_hold_over_tls() {
    let cert = Cert::new();
    let dir = CertDir::new(&cert);
    let app = spawn_tls(&dir, &[("MAX_BODY_BYTES", "1024")]).await;
    for h1 in [true, false] {
        let c = client(app.addr, &[&cert], h1);
        let post = || {
            c.post(https(app.addr, "/webhook/receive"))
                .header("content-type", "application/json")
        };
        if h1 {
            // HTTP/2 caps the header list by size only (below).
            let mut many = post().body("{}");
            for i in 0..150 {
                many = many.header(format!("x-h{i}"), i.to_string());
            }
            assert_eq!(many.send().await.unwrap().status(), 431, "150 headers");
        }
        let huge = post()
            .header("x-big", "b".repeat(80 * 1024))
            .body("{}")
            .send()
            .await;
        match huge {
            Ok(r) => assert_eq!(r.status(), 431, "h1={h1}"),
            // h2 may refuse an oversized header list by resetting the stream instead.
            Err(e) => assert!(!h1, "HTTP/1.1 answers 431, got {e}"),
        }
        let r = post()
            .body(format!(r#"{{"pad":"{}"}}"#, "p".repeat(2048)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "h1={h1}");
        let r = post().body(r#"{"id":"small"}"#).send().await.unwrap();
        assert_eq!(r.status(), 202, "h1={h1}: still takes events");
    }
}
