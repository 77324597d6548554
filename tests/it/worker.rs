//! Workers (SPEC §5): bounded concurrency, graceful stop, and what happens while the
//! broker is unreachable.

use std::time::Duration;

use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{Inspector, TestApp, config, eventually, unique_prefix};

#[tokio::test]
async fn worker_concurrency_bounds_deliveries_in_flight() {
    let down = Downstream::start(Reply::Slow(Duration::from_millis(300))).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_DELIVERY", "false"),
            ("WORKER_CONCURRENCY", "4"),
        ],
    )
    .await;
    for i in 0..12 {
        let resp = app
            .post("/webhook/receive", &format!(r#"{{"id":"c-{i}"}}"#), &[])
            .await;
        assert_eq!(resp.status(), 202);
    }
    eventually(Duration::from_secs(15), "all 12 delivered", || async {
        down.count() == 12
    })
    .await;
    let max = down.max_in_flight();
    assert!(
        max <= 4,
        "never more than WORKER_CONCURRENCY in flight, saw {max}"
    );
    assert!(max >= 2, "deliveries ran in parallel, saw {max}");
}

#[tokio::test]
async fn graceful_stop_finishes_in_flight_deliveries() {
    let down = Downstream::start(Reply::Slow(Duration::from_millis(800))).await;
    let mut app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_DELIVERY", "false"),
        ],
    )
    .await;
    for i in 0..5 {
        app.post("/webhook/receive", &format!(r#"{{"id":"g-{i}"}}"#), &[])
            .await;
    }
    eventually(Duration::from_secs(5), "deliveries in flight", || async {
        down.count() == 5
    })
    .await;
    app.stop().await; // returns only after in-flight work settled (grace 3 s)
    let inspect = Inspector::connect().await;
    let total = inspect.total(app.topology()).await;
    assert_eq!(total, 0, "finished deliveries were acked before exit");
    inspect.close().await;
}

#[tokio::test]
async fn broker_unreachable_means_503_with_retry_after_and_not_ready() {
    let down = Downstream::start(Reply::Status(503)).await;
    let prefix = unique_prefix("nobroker");
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let unreachable = "amqp://guest:guest@127.0.0.1:1/%2f";
    let cfg = config(
        &prefix,
        &[("DOWNSTREAM_URL", &down.url()), ("AMQP_URL", unreachable)],
    );
    let app = TestApp::spawn_config(Role::Serve, cfg, false)
        .await
        .shares_topology();

    let resp = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);

    // Downstream failing, nowhere to keep the event: 503 and Retry-After.
    let resp = app.post("/webhook/receive", r#"{"id":"nb-1"}"#, &[]).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "nb-1");

    // Downstream healthy: the inline attempt succeeds, nothing needs storing.
    down.set_default(Reply::Status(200));
    let resp = app.post("/webhook/receive", r#"{"id":"nb-2"}"#, &[]).await;
    assert_eq!(resp.status(), 200);

    // Queue-first mode cannot answer without the broker.
    let cfg = config(
        &prefix,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("AMQP_URL", unreachable),
            ("INLINE_DELIVERY", "false"),
        ],
    );
    let app2 = TestApp::spawn_config(Role::Receiver, cfg, false)
        .await
        .shares_topology();
    let resp = app2.post("/webhook/receive", r#"{"id":"nb-3"}"#, &[]).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
}
