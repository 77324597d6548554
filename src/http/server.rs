//! The HTTP server loop: accepts connections and serves the router over HTTP/1.1 or
//! HTTP/2, in the clear or behind TLS, with limits a hostile client cannot talk its
//! way past (time to finish the TLS handshake and to send the headers, header count
//! and size), and stops gracefully on cancellation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Largest request head (request line and headers) in bytes; larger is answered 431.
/// It is also the most an HTTP/1 connection buffers while reading, so it weighs on the
/// memory of a burst: 1,000 connections reading bodies hold up to this much each (at
/// 16 KiB the 250 KB burst test peaked about 11 MiB higher). 8 KiB is hyper's least,
/// and the default of Tomcat and Jetty; a Genesys request head is about 1 KiB.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Pause after a failed accept (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// What an HTTP/2 client sends first (RFC 9113 §3.4); anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting, lets
/// requests in flight finish and closes idle connections. `request_timeout` bounds
/// the TLS handshake and the time a client has to send its request headers; the
/// handler bounds the body. With `tls`, every connection must be HTTPS. With
/// `intake`, at most `MAX_CONNECTIONS` are open at once; past it a new connection is
/// closed at once, so a connection flood cannot exhaust memory or descriptors.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    request_timeout: Duration,
    tls: Option<TlsAcceptor>,
    intake: Option<crate::intake::Intake>,
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
        let slot = match &intake {
            None => None,
            Some(intake) => match intake.try_connection() {
                Some(slot) => Some(slot),
                // Closed at once: counted in webhook_relay_intake_limit_hits_total.
                None => {
                    drop(stream);
                    continue;
                }
            },
        };
        // Answers go out as soon as they are written, never held back by Nagle's
        // algorithm waiting for the client's ACK of the previous segment.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Silent, stalled inside the TLS handshake or the HTTP/2 preface, or not
            // speaking TLS on an HTTPS port: dropped unanswered.
            match tls {
                None => {
                    let speaks = tokio::select! {
                        speaks = protocol_known(&stream, request_timeout) => speaks,
                        _ = stop.cancelled() => false,
                    };
                    if speaks {
                        serve_io(&builder, stream, service, watcher).await;
                    }
                }
                Some(acceptor) => {
                    let opened = tokio::select! {
                        opened = open_tls(&acceptor, stream, request_timeout) => opened,
                        _ = stop.cancelled() => None,
                    };
                    if let Some(io) = opened {
                        serve_io(&builder, io, service, watcher).await;
                    }
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection whose protocol is known until it closes.
async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    // Clients that vanish or break the protocol end here; hyper has answered what
    // could be answered (400, 431) already.
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
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

/// Completes the TLS handshake and waits for the protocol to be known, both within
/// `timeout` (the same budget a plain connection has for its protocol), so a client
/// that stalls anywhere before its request headers holds nothing for long.
async fn open_tls(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Option<Rewound<TlsStream<TcpStream>>> {
    let opened = async {
        let mut tls = match acceptor.accept(stream).await {
            Ok(tls) => tls,
            Err(e) => {
                // Plain HTTP on the HTTPS port, an unknown CA on the client side, a scan.
                tracing::debug!(error = %e, "TLS handshake failed");
                return None;
            }
        };
        // The decrypted stream cannot be peeked at: read the opening bytes and hand
        // them back in front of the rest.
        let mut first = Vec::with_capacity(H2_PREFACE.len());
        loop {
            let mut buf = [0u8; H2_PREFACE.len()];
            let want = H2_PREFACE.len() - first.len();
            match tls.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => first.extend_from_slice(&buf[..n]),
            }
            if first.len() == H2_PREFACE.len() || first[..] != H2_PREFACE[..first.len()] {
                return Some(Rewound::new(first, tls));
            }
        }
    };
    tokio::time::timeout(timeout, opened)
        .await
        .unwrap_or_else(|_| {
            tracing::debug!("TLS connection silent past the request timeout; dropped");
            None
        })
}

/// A stream with bytes already read from it put back in front.
struct Rewound<S> {
    /// Bytes read before the protocol was known, served first.
    prefix: Vec<u8>,
    /// How much of `prefix` has been served.
    served: usize,
    /// The stream the rest comes from, and where writes go.
    inner: S,
}

impl<S> Rewound<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            served: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.served < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.served);
            buf.put_slice(&this.prefix[this.served..this.served + n]);
            this.served += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn builder(request_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A client trickling its headers (slowloris) is disconnected.
        .header_read_timeout(request_timeout)
        // At most 100 request headers, hyper's default (more is answered 431; Genesys
        // senders use about a dozen). Left unset on purpose: with `max_headers` set,
        // hyper builds and initialises a header table of that size for every request
        // instead of using one on the stack.
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}
