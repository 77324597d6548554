//! A request answered before its body is read (401, 413, a 503 while the broker
//! blocks publishers or the intake budget is full) still has the rest of its body read
//! and thrown away, for a while, after the answer is sent: a "lingering close", as
//! nginx and Apache do it.
//!
//! Without it the connection closes with the sender's bytes unread, so the kernel
//! answers them with a reset. A sender still writing its body then sees its write fail,
//! and an HTTP client reports that error rather than the 503 and its `Retry-After`
//! (seen in a burst of 1,000 bodies of 250 KB: 56 senders got a reset, no answer).
//! Nothing is kept: each piece is dropped as it arrives, so a refused burst still holds
//! no memory for its bodies.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// The longest a refused body is read and discarded after the answer (and never longer
/// than `REQUEST_TIMEOUT_MS`): time for a sender to finish writing and read the answer.
pub const LINGER: Duration = Duration::from_secs(5);

/// A request body that, when dropped before its end, reads what is left of it (a
/// bounded amount, for a bounded time) in a task of its own and throws it away.
pub struct Lingering {
    body: Option<Body>,
    /// Nothing is left to read: the body ended (or failed), or its sender waits for a
    /// `100 Continue` before sending any. A chunked body's end shows only here.
    ended: bool,
    /// The most read and discarded after an early answer.
    max_bytes: usize,
    /// The longest that takes.
    within: Duration,
}

impl Lingering {
    /// Wraps `body`. A sender that asked `Expect: 100-continue` sends nothing until told
    /// to, so there is nothing to read: its body is left alone (reading it would make
    /// the server send the `100 Continue` the early answer means to withhold).
    ///
    /// At most `max_bytes` are read after the answer, or the `declared` length when
    /// larger: a sender told 413 on its declared length then still reads the 413,
    /// whatever it declared, as long as it sends within `within`.
    pub fn new(
        body: Body,
        headers: &HeaderMap,
        declared: Option<u64>,
        max_bytes: usize,
        within: Duration,
    ) -> Self {
        let expects_continue = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let declared = declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        Self {
            body: Some(body),
            ended: expects_continue,
            max_bytes: declared.max(max_bytes),
            within,
        }
    }
}

impl HttpBody for Lingering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        let (max_bytes, within) = (self.max_bytes, self.within);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body, max_bytes, within));
        }
    }
}

/// Reads `body` to its end, dropping each piece, until `max_bytes` were read or
/// `within` has passed; then drops it (which closes the connection if it is unfinished).
async fn discard(mut body: Body, max_bytes: usize, within: Duration) {
    let _ = tokio::time::timeout(within, async {
        let mut read = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, Bytes::len);
            if read > max_bytes {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that counts how much of it was read, over a channel the test feeds.
    fn fed_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, Body::new(http_body_util::StreamBody::new(stream)))
    }

    /// Wraps `body` as the handler does and drops it before reading any of it.
    fn dropped_unread(body: Body, headers: &HeaderMap, max_bytes: usize) {
        drop(Lingering::new(body, headers, None, max_bytes, LINGER));
    }

    #[tokio::test]
    async fn a_body_dropped_unread_is_read_to_its_end() {
        let (tx, body) = fed_body();
        dropped_unread(body, &HeaderMap::new(), 1 << 20);
        // The discarding task takes every piece the sender still sends.
        for _ in 0..10 {
            let sent = tokio::time::timeout(
                Duration::from_secs(1),
                tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 1000])))),
            )
            .await;
            assert!(matches!(sent, Ok(Ok(()))), "the rest is read: {sent:?}");
        }
    }

    #[tokio::test]
    async fn discarding_stops_past_its_byte_limit() {
        let (tx, body) = fed_body();
        dropped_unread(body, &HeaderMap::new(), 2500);
        let mut sent = 0;
        while tokio::time::timeout(
            Duration::from_millis(500),
            tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 1000])))),
        )
        .await
        .is_ok_and(|r| r.is_ok())
        {
            sent += 1;
            assert!(sent < 20, "still reading past the limit");
        }
        // Three pieces pass the 2,500-byte limit; the channel holds a few more.
        assert!(sent <= 3 + 4 + 1, "{sent} pieces taken");
    }

    #[test]
    fn a_declared_length_past_the_limit_is_read_to_its_end() {
        let none = HeaderMap::new();
        for (declared, bound) in [(Some(4_000_000), 4_000_000), (Some(10), 1000), (None, 1000)] {
            let (_tx, body) = fed_body();
            let lingering = Lingering::new(body, &none, declared, 1000, LINGER);
            assert_eq!(lingering.max_bytes, bound, "declared {declared:?}");
        }
    }

    #[tokio::test]
    async fn a_sender_waiting_for_100_continue_is_not_read() {
        let (tx, body) = fed_body();
        let mut expects = HeaderMap::new();
        expects.insert(
            header::EXPECT,
            http::HeaderValue::from_static("100-continue"),
        );
        dropped_unread(body, &expects, 1 << 20);
        tokio::task::yield_now().await;
        assert!(tx.is_closed(), "the body was dropped, not read");
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_leaves_nothing_behind() {
        let (tx, body) = fed_body();
        let mut lingering = Lingering::new(body, &HeaderMap::new(), None, 1 << 20, LINGER);
        tx.send(Ok(Frame::data(Bytes::from_static(b"{}"))))
            .await
            .unwrap();
        drop(tx);
        let read = (&mut lingering).collect().await.unwrap().to_bytes();
        assert_eq!(&read[..], b"{}");
        assert!(lingering.ended);
        drop(lingering);
    }
}
