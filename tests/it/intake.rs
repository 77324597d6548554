//! The bounded intake (SPEC §4.5): inline attempts past INLINE_MAX_INFLIGHT go
//! queue-first, bodies past MAX_INFLIGHT_BYTES wait then get 503, connections past
//! MAX_CONNECTIONS are closed at once.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::raw_http::{post_head, send_then_read};
use crate::common::{Inspector, TestApp};

#[tokio::test]
async fn past_the_inline_limit_events_are_queued_not_made_to_wait() {
    let down = Downstream::start(Reply::Slow(Duration::from_millis(800))).await;
    // A receiver: the queued events wait in P.work for a worker that is not here.
    let app = TestApp::spawn(
        Role::Receiver,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_MAX_INFLIGHT", "2"),
        ],
    )
    .await;
    let answers = join_all((0..6).map(|i| {
        let app = &app;
        async move {
            let r = app
                .post(
                    "/webhook/receive",
                    &format!(r#"{{"id":"inline-{i}"}}"#),
                    &[],
                )
                .await;
            let code = r.status().as_u16();
            let json: serde_json::Value = r.json().await.unwrap();
            (code, json["status"].as_str().unwrap().to_owned())
        }
    }))
    .await;
    let delivered = answers
        .iter()
        .filter(|(c, s)| *c == 200 && s == "delivered")
        .count();
    let queued = answers
        .iter()
        .filter(|(c, s)| *c == 202 && s == "queued")
        .count();
    println!("inline limit 2, 6 at once against an 800 ms downstream: {answers:?}");
    assert_eq!((delivered, queued), (2, 4), "{answers:?}");
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.count(&app.topology().work).await, 4);
    inspect.close().await;
}

#[tokio::test]
async fn past_the_byte_budget_a_request_waits_then_gets_503() {
    let down = Downstream::start(Reply::Slow(Duration::from_millis(1500))).await;
    let app = TestApp::spawn(
        Role::Receiver,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("MAX_BODY_BYTES", "1000"),
            ("MAX_INFLIGHT_BYTES", "1000"),
            ("INTAKE_WAIT_MS", "300"),
        ],
    )
    .await;
    let body = |id: &str| format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(700));
    // The first holds ~720 bytes for its 1.5 s inline attempt.
    let first = app.post_in_background("/webhook/receive", body("bytes-1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let second = app.post("/webhook/receive", &body("bytes-2"), &[]).await;
    let waited = started.elapsed();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
    assert!(
        waited >= Duration::from_millis(300),
        "it waited for room: {waited:?}"
    );
    // A chunked body (no Content-Length) is counted as it arrives.
    let chunks = futures_util::stream::iter(
        ["{\"id\":\"bytes-3\",\"pad\":\"", &"y".repeat(700), "\"}"]
            .map(|s| Ok::<_, std::io::Error>(s.to_owned())),
    );
    let chunked = app
        .http
        .post(app.url("/webhook/receive"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 503, "a chunked body past the budget");
    assert_eq!(first.await.unwrap(), Ok(200));
    // Once the first is settled there is room again.
    let third = app.post("/webhook/receive", &body("bytes-4"), &[]).await;
    assert_eq!(third.status(), 200);
    assert!(down.for_id("bytes-2").is_empty() && down.for_id("bytes-3").is_empty());
    println!(
        "byte budget 1000: second body refused after {waited:?}, chunked refused, later one delivered"
    );
}

#[tokio::test]
async fn past_max_connections_new_connections_are_closed_at_once() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Receiver,
        &[("DOWNSTREAM_URL", &down.url()), ("MAX_CONNECTIONS", "2")],
    )
    .await;
    let idle_a = TcpStream::connect(app.addr).await.unwrap();
    let idle_b = TcpStream::connect(app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("closed at once, not left hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the third connection is closed unanswered: {read:?}"
    );
    drop(idle_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::Client::new()
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a slot freed up");
    drop(idle_b);
}

/// A sender answered before its body is read (the budget full: 503; a declared length
/// over `MAX_BODY_BYTES`: 413) must be able to finish sending and read its answer. A
/// relay that closes with the body unread resets the connection: the sender's write
/// fails, and an HTTP client that is still writing (reqwest, in the 1,000-event burst)
/// reports that error instead of the 503 and its `Retry-After` (SPEC §4.5).
#[tokio::test]
async fn a_large_body_refused_unread_is_answered_not_reset() {
    let down = Downstream::start(Reply::Slow(Duration::from_millis(1500))).await;
    let app = TestApp::spawn(
        Role::Receiver,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("MAX_BODY_BYTES", "8000000"),
            ("MAX_INFLIGHT_BYTES", "8000000"),
            ("INTAKE_WAIT_MS", "100"),
        ],
    )
    .await;
    // Larger than what the kernel's socket buffers take in on loopback, so that a
    // sender is still writing when the answer comes.
    let body = |id: &str, size: usize| {
        format!(
            r#"{{"id":"{id}","pad":"{}"}}"#,
            "x".repeat(size.saturating_sub(20))
        )
    };
    // The first holds 7.5 MB of the budget for its 1.5 s inline attempt.
    let first = app.post_in_background("/webhook/receive", body("large-hold", 7_500_000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, size, status) in [("large-503", 6_000_000, 503), ("large-413", 9_000_000, 413)] {
        let b = body(id, size);
        let mut request = post_head("/webhook/receive", &[], Some(b.len()));
        request.extend_from_slice(b.as_bytes());
        let (sent, answer) = send_then_read(app.addr, &request, Duration::from_secs(10)).await;
        assert_eq!(
            sent.map_err(|e| e.kind())
                .map(|()| answer.as_ref().map(|a| a.status)),
            Ok(Some(status)),
            "{id}: the whole request written, then its answer read"
        );
        if status == 503 {
            assert!(
                answer
                    .unwrap()
                    .head
                    .to_ascii_lowercase()
                    .contains("retry-after:")
            );
        }
    }
    assert_eq!(first.await.unwrap(), Ok(200));
    assert!(down.for_id("large-503").is_empty() && down.for_id("large-413").is_empty());
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0, "nothing stored");
    inspect.close().await;
}
