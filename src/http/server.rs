//! The HTTP server loop: accepts connections and serves the router over HTTP/1.1 or
//! HTTP/2 with limits a hostile client cannot talk its way past (header count and
//! size, time to send the headers), and stops gracefully on cancellation.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Most request headers accepted; more is answered 431. Genesys senders use about a
/// dozen; the cap keeps the per-request header table small.
pub const MAX_HEADERS: usize = 100;
/// Largest request head (request line and headers) in bytes; larger is answered 431.
/// It is also the most an HTTP/1 connection buffers while reading.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// What an HTTP/2 client sends first (RFC 9113 §3.4); anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting, lets
/// requests in flight finish and closes idle connections. `request_timeout` bounds
/// the time a client has to send its request headers; the handler bounds the body.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    request_timeout: Duration,
    shutdown: CancellationToken,
) {
    let builder = builder(request_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let speaks = tokio::select! {
                speaks = protocol_known(&stream, request_timeout) => speaks,
                _ = stop.cancelled() => false,
            };
            if !speaks {
                // Silent, or stalled inside the HTTP/2 preface: dropped unanswered.
                return;
            }
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            // Clients that vanish or break the protocol end here; hyper has answered
            // what could be answered (400, 431) already.
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2, at most
/// `timeout`. hyper's protocol detection waits for that without a deadline, so a
/// client that connects and stays silent would hold its connection for ever; the
/// HTTP/1 header timeout only starts once the protocol is known.
async fn protocol_known(stream: &TcpStream, timeout: Duration) -> bool {
    let decided = async {
        let mut first = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut first).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if n == H2_PREFACE.len() || first[..n] != H2_PREFACE[..n] {
                return true;
            }
            // A prefix of the HTTP/2 preface: peeking again at once would spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(timeout, decided)
        .await
        .unwrap_or(false)
}

fn builder(request_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client trickling its headers (slowloris) is disconnected.
        .header_read_timeout(request_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}
