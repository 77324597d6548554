//! Raw HTTP/1.1 over TCP, for requests no well-behaved client sends: bodies larger
//! than declared or trickled a byte at a time, too many headers, garbage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the client writes after the request head.
#[derive(Debug, Clone)]
pub enum Feed {
    /// Nothing more.
    Nothing,
    /// These bytes at once.
    All(Vec<u8>),
    /// These bytes one at a time, `interval` apart.
    Trickle(Vec<u8>, Duration),
    /// `chunk` written `times` times as fast as the server takes it.
    Repeat { chunk: Vec<u8>, times: usize },
}

/// An answer as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "JSON body expected ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// How an exchange ended.
#[derive(Debug)]
pub struct Exchange {
    /// The answer, or `None` when the server closed the connection without one.
    pub response: Option<RawResponse>,
    /// Bytes the client had written (head included) when the answer or the close came.
    pub written: usize,
}

/// Connects to `addr`, writes `head`, then feeds the rest while reading the answer.
/// Panics if neither an answer nor a close comes within `deadline`.
pub async fn exchange(addr: SocketAddr, head: Vec<u8>, feed: Feed, deadline: Duration) -> Exchange {
    let stream = TcpStream::connect(addr)
        .await
        .expect("relay accepts connections");
    let (mut reader, mut writer) = stream.into_split();
    let written = Arc::new(AtomicUsize::new(0));
    let count = written.clone();
    let feeding = tokio::spawn(async move {
        // Each write adds to the shared count; the first failure (the server closed)
        // ends the feed.
        if writer.write_all(&head).await.is_err() {
            return;
        }
        count.fetch_add(head.len(), Ordering::SeqCst);
        match feed {
            Feed::Nothing => {}
            Feed::All(bytes) => {
                if writer.write_all(&bytes).await.is_ok() {
                    count.fetch_add(bytes.len(), Ordering::SeqCst);
                }
            }
            Feed::Trickle(bytes, interval) => {
                for b in bytes {
                    tokio::time::sleep(interval).await;
                    if writer.write_all(&[b]).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
            Feed::Repeat { chunk, times } => {
                for _ in 0..times {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                    count.fetch_add(chunk.len(), Ordering::SeqCst);
                }
            }
        }
        // Keep the write side open: closing it would tell the server the request ended.
        std::future::pending::<()>().await;
    });
    let response = tokio::time::timeout(deadline, read_response(&mut reader))
        .await
        .unwrap_or_else(|_| panic!("no answer and no close within {deadline:?}"));
    let written = written.load(Ordering::SeqCst);
    feeding.abort();
    Exchange { response, written }
}

/// A sender that writes its whole `request` first and reads the answer only then, as
/// the simplest clients do: the write's outcome and the answer read after it (`None`
/// when the connection closed without one). Panics past `deadline`.
pub async fn send_then_read(
    addr: SocketAddr,
    request: &[u8],
    deadline: Duration,
) -> (std::io::Result<()>, Option<RawResponse>) {
    let stream = TcpStream::connect(addr)
        .await
        .expect("relay accepts connections");
    let (mut reader, mut writer) = stream.into_split();
    tokio::time::timeout(deadline, async {
        let sent = writer.write_all(request).await;
        (sent, read_response(&mut reader).await)
    })
    .await
    .unwrap_or_else(|_| panic!("not written and answered within {deadline:?}"))
}

/// Reads one response: the head, then a `content-length` body (or to the close).
async fn read_response(reader: &mut tokio::net::tcp::OwnedReadHalf) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {head:?}"));
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    loop {
        if length.is_some_and(|n| body.len() >= n) {
            break;
        }
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(RawResponse { status, head, body })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A POST head for `path` with `headers` (each `Name: value`) and a `content-length`.
pub fn post_head(path: &str, headers: &[String], content_length: Option<usize>) -> Vec<u8> {
    let mut head =
        format!("POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if let Some(n) = content_length {
        head.push_str(&format!("content-length: {n}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}
