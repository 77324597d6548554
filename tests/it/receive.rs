//! The receiver's answers (SPEC §4.2) and forwarding rules (SPEC §4.3).

use std::time::Duration;

use serde_json::Value;
use webhook_relay::app::Role;
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{Inspector, TestApp, eventually};

async fn answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON answer"))
}

#[tokio::test]
async fn inline_delivery_answers_200_and_forwards_byte_for_byte() {
    let down = Downstream::start(Reply::Status(204)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    // Odd spacing and key order: must arrive exactly as sent, not re-serialised.
    let body = "{ \"eventId\" : \"ev-1\",\n \"data\": {\"b\":2, \"a\":1.50} }";
    let resp = app
        .post(
            "/webhooks/conversations",
            body,
            &[
                ("authorization", "Bearer inbound-secret"),
                ("x-custom", "kept"),
                ("x-hub-signature-256", "sha256=abc"),
            ],
        )
        .await;
    let (status, json) = answer(resp).await;
    assert_eq!(status, 200);
    assert_eq!(json["status"], "delivered");
    assert_eq!(json["id"], "ev-1");

    let got = down.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.body.as_ref(), body.as_bytes());
    assert_eq!(r.header("idempotency-key"), Some("ev-1"));
    assert_eq!(r.header("x-relay-attempt"), Some("1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-custom"), Some("kept"));
    assert_eq!(
        r.header("authorization"),
        None,
        "inbound credentials never forwarded"
    );
    assert_eq!(r.header("x-hub-signature-256"), None);

    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0, "nothing stored");
    inspect.close().await;
}

#[tokio::test]
async fn inline_retryable_failure_is_queued_then_delivered_by_a_worker() {
    let down = Downstream::start(Reply::Status(200)).await;
    down.script([Reply::Status(503), Reply::Status(500)]);
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let (status, json) = answer(
        app.post("/webhook/receive", r#"{"id":"ev-retry"}"#, &[])
            .await,
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(json["status"], "queued_for_retry");
    assert_eq!(json["id"], "ev-retry");

    eventually(
        Duration::from_secs(10),
        "third attempt delivered",
        || async { down.for_id("ev-retry").len() == 3 },
    )
    .await;
    let attempts: Vec<_> = down
        .for_id("ev-retry")
        .iter()
        .map(|r| r.header("x-relay-attempt").unwrap().to_owned())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let inspect = Inspector::connect().await;
    eventually(Duration::from_secs(5), "all queues empty", || async {
        inspect.total(app.topology()).await == 0
    })
    .await;
    inspect.close().await;
}

#[tokio::test]
async fn exhausted_attempts_land_in_the_dlq_with_their_history() {
    let down = Downstream::start(Reply::Status(500)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[("DOWNSTREAM_URL", &down.url()), ("MAX_ATTEMPTS", "3")],
    )
    .await;
    let (status, _) = answer(
        app.post(
            "/webhook/receive",
            r#"{"id":"ev-dead","detail-type":"v2.conversations"}"#,
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(status, 202);
    let inspect = Inspector::connect().await;
    let dlq = app.topology().dlq.clone();
    eventually(Duration::from_secs(10), "event in the DLQ", || async {
        inspect.count(&dlq).await == 1
    })
    .await;
    assert_eq!(
        down.for_id("ev-dead").len(),
        3,
        "exactly MAX_ATTEMPTS attempts"
    );
    let msgs = inspect.drain(&dlq).await;
    let m = &msgs[0];
    let headers = m.delivery.properties.headers().clone().unwrap();
    assert!(
        !headers
            .inner()
            .keys()
            .any(|k| k.as_str().starts_with("x-death")
                || k.as_str().starts_with("x-first-death")
                || k.as_str().starts_with("x-last-death")),
        "broker dead-letter headers are not carried: {headers:?}"
    );
    let e = Envelope::from_amqp(&m.delivery.properties, m.delivery.data.clone());
    assert_eq!(e.id, "ev-dead");
    assert_eq!(e.attempts, 3);
    assert_eq!(e.last_status, Some(500));
    assert_eq!(e.webhook, "v2.conversations");
    assert_eq!(e.dead_letter_reason.as_deref(), Some("attempts_exhausted"));
    assert!(e.last_error.unwrap().contains("500"));
    assert_eq!(
        m.delivery.properties.delivery_mode(),
        &Some(2),
        "persistent"
    );
    assert_eq!(
        e.body.as_ref(),
        br#"{"id":"ev-dead","detail-type":"v2.conversations"}"#
    );
    assert_eq!(inspect.total(app.topology()).await, 0);
    inspect.close().await;
}

#[tokio::test]
async fn permanent_refusal_is_dead_lettered_at_once() {
    let down = Downstream::start(Reply::Status(404)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let (status, json) = answer(
        app.post("/webhook/receive", r#"{"eventId":"ev-404"}"#, &[])
            .await,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (202, Some("dead_lettered"))
    );
    let inspect = Inspector::connect().await;
    // The DLQ publish was confirmed before the 202, so it is there now.
    let msgs = inspect.drain(&app.topology().dlq).await;
    assert_eq!(msgs.len(), 1);
    let e = Envelope::from_amqp(&msgs[0].delivery.properties, msgs[0].delivery.data.clone());
    assert_eq!(e.last_status, Some(404));
    assert_eq!(e.dead_letter_reason.as_deref(), Some("refused"));
    assert_eq!(e.attempts, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(down.count(), 1, "a refusal is never retried");
    inspect.close().await;
}

#[tokio::test]
async fn redirects_are_refusals_not_followed() {
    let down = Downstream::start(Reply::Status(302)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let (status, json) = answer(
        app.post("/webhook/receive", r#"{"id":"ev-302"}"#, &[])
            .await,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (202, Some("dead_lettered"))
    );
    assert_eq!(down.count(), 1);
}

#[tokio::test]
async fn queue_first_mode_answers_queued_and_a_worker_delivers() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_DELIVERY", "false"),
        ],
    )
    .await;
    let (status, json) = answer(
        app.post(
            "/webhooks/x",
            r#"{"id":"ev-q"}"#,
            &[("idempotency-key", "key-q")],
        )
        .await,
    )
    .await;
    assert_eq!((status, json["status"].as_str()), (202, Some("queued")));
    assert_eq!(json["id"], "key-q", "Idempotency-Key wins over the body id");
    eventually(Duration::from_secs(10), "worker delivered", || async {
        down.for_id("key-q").len() == 1
    })
    .await;
    assert_eq!(down.for_id("key-q")[0].header("x-relay-attempt"), Some("1"));
}

#[tokio::test]
async fn bad_bodies_are_refused_and_nothing_is_stored() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[("DOWNSTREAM_URL", &down.url()), ("MAX_BODY_BYTES", "1000")],
    )
    .await;
    for (body, want) in [
        ("", 400),
        ("   ", 400),
        ("not json", 400),
        ("{\"a\":", 400),
        (&format!("{{\"pad\":\"{}\"}}", "x".repeat(2000)), 413),
    ] {
        let resp = app.post("/webhook/receive", body, &[]).await;
        let (status, json) = answer(resp).await;
        assert_eq!(status, want, "body {:?}", &body[..body.len().min(20)]);
        assert_eq!(json["status"], "error");
        assert!(
            json["id"].as_str().is_some_and(|s| !s.is_empty()),
            "error answers carry an id"
        );
    }
    // Deeply nested JSON stops at serde_json's recursion limit.
    let deep = format!("{}{}", "[".repeat(400), "]".repeat(400));
    assert_eq!(app.post("/webhook/receive", &deep, &[]).await.status(), 400);
    // Non-UTF-8 bytes.
    let resp = app
        .http
        .post(app.url("/webhook/receive"))
        .body(vec![0xff, 0xfe, 0x7b])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // A chunked body (no Content-Length) over the limit is cut off too.
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 100])));
    let resp = app
        .http
        .post(app.url("/webhook/receive"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    assert_eq!(down.count(), 0, "nothing forwarded");
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0, "nothing stored");
    inspect.close().await;
}

#[tokio::test]
async fn retry_after_is_honoured_with_a_covering_level() {
    let down = Downstream::start(Reply::Status(200)).await;
    down.script([Reply::RetryAfter(429, "1")]);
    // Ladder 40, 80, ..., 1280, 2000 ms: Retry-After 1 s needs the 1280 ms level.
    let app = TestApp::spawn(
        Role::Serve,
        &[("DOWNSTREAM_URL", &down.url()), ("BACKOFF_MAX_MS", "2000")],
    )
    .await;
    let (status, _) = answer(app.post("/webhook/receive", r#"{"id":"ev-ra"}"#, &[]).await).await;
    assert_eq!(status, 202);
    eventually(Duration::from_secs(10), "second attempt", || async {
        down.for_id("ev-ra").len() == 2
    })
    .await;
    let got = down.for_id("ev-ra");
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(1000), "waited only {gap:?}");
}

#[tokio::test]
async fn health_and_readiness() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
