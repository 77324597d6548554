//! The admin listener (SPEC §4.6) and the header allowlist (SPEC §4.3): with
//! `ADMIN_LISTEN_ADDR`, metrics and admin leave the public port; with
//! `FORWARD_HEADERS`, only the listed headers reach the downstream.

use std::collections::BTreeSet;

use webhook_relay::app::{App, Role};

use crate::common::downstream::{Downstream, Reply};
use crate::common::{TestApp, config, unique_prefix};

const TOKEN: &str = "admin-listener-token";

async fn get(http: &reqwest::Client, url: String, token: Option<&str>) -> u16 {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn admin_and_metrics_live_only_on_the_admin_listener() {
    let down = Downstream::start(Reply::Status(200)).await;
    for role in [Role::Receiver, Role::Worker] {
        let app = TestApp::spawn(
            role,
            &[
                ("DOWNSTREAM_URL", &down.url()),
                ("ADMIN_TOKEN", TOKEN),
                ("ADMIN_LISTEN_ADDR", "127.0.0.1:0"),
                ("INLINE_DELIVERY", "false"),
            ],
        )
        .await;
        let admin = app.admin_addr.expect("the admin listener is bound");
        assert_ne!(admin, app.addr);
        let public = |p: &str| app.url(p);
        let private = |p: &str| format!("http://{admin}{p}");
        let h = &app.http;

        // The public port: health and intake only.
        assert_eq!(get(h, public("/metrics"), None).await, 404, "{role:?}");
        assert_eq!(get(h, public("/admin/dlq"), Some(TOKEN)).await, 404);
        assert_eq!(get(h, public("/healthz"), None).await, 200);
        assert_eq!(get(h, public("/readyz"), None).await, 200);

        // The admin port: metrics, admin (still behind its token), health.
        assert_eq!(get(h, private("/metrics"), None).await, 200, "{role:?}");
        assert_eq!(get(h, private("/admin/dlq"), Some(TOKEN)).await, 200);
        assert_eq!(get(h, private("/admin/dlq"), None).await, 401);
        assert_eq!(get(h, private("/healthz"), None).await, 200);
        assert_eq!(get(h, private("/readyz"), None).await, 200);
        let r = h
            .post(private("/webhook/receive"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "no intake on the admin port");

        if role == Role::Receiver {
            let r = app.post("/webhook/receive", r#"{"id":"pub-1"}"#, &[]).await;
            assert_eq!(r.status(), 202, "intake stays on the public port");
            let text = h.get(private("/metrics")).send().await.unwrap();
            let text = text.text().await.unwrap();
            assert!(text.contains("# TYPE"), "Prometheus text: {text}");
        }
    }
}

#[tokio::test]
async fn without_an_admin_listener_everything_shares_the_public_port() {
    let app = TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("ADMIN_TOKEN", TOKEN)],
    )
    .await;
    assert!(app.admin_addr.is_none());
    assert_eq!(get(&app.http, app.url("/metrics"), None).await, 200);
    assert_eq!(
        get(&app.http, app.url("/admin/dlq"), Some(TOKEN)).await,
        200
    );
}

#[tokio::test]
async fn an_unusable_admin_address_fails_the_build_before_connecting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(
        &unique_prefix("admin-bind"),
        &[
            ("ADMIN_LISTEN_ADDR", &addr),
            ("INLINE_DELIVERY", "false"),
            // Nothing listens here: the build must fail before trying to connect.
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    );
    let err = App::build(cfg, Role::Receiver)
        .await
        .err()
        .expect("bind fails");
    assert!(format!("{err:#}").contains("ADMIN_LISTEN_ADDR"), "{err:#}");
}

/// Header names the downstream got, without those the HTTP client sets per hop.
fn names(r: &crate::common::downstream::Received) -> BTreeSet<String> {
    r.headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| {
            !matches!(
                k.as_str(),
                "host" | "content-length" | "accept" | "accept-encoding" | "user-agent"
            )
        })
        .collect()
}

#[tokio::test]
async fn only_listed_headers_reach_the_downstream() {
    let down = Downstream::start(Reply::Status(200)).await;
    let sent: &[(&str, &str)] = &[
        ("x-forwarded-for", "203.0.113.7"),
        ("cookie", "session=stolen"),
        ("x-api-key", "inbound-key"),
        ("x-request-id", "req-1"),
        ("X-Genesys-Cloud-Webhook-Name", "queue-events"),
        ("x-other", "dropped"),
    ];
    let expected = |extra: &[&str]| -> BTreeSet<String> {
        ["content-type", "idempotency-key", "x-relay-attempt"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };

    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            (
                "FORWARD_HEADERS",
                "X-Request-Id, x-genesys-cloud-webhook-name, x-not-sent",
            ),
        ],
    )
    .await;
    let r = app
        .post("/webhook/receive", r#"{"id":"allow-1"}"#, sent)
        .await;
    assert_eq!(r.status(), 200);
    let got = &down.for_id("allow-1")[0];
    assert_eq!(
        names(got),
        expected(&["x-request-id", "x-genesys-cloud-webhook-name"]),
        "{:?}",
        got.headers
    );
    assert_eq!(got.header("x-request-id"), Some("req-1"));
    assert_eq!(got.header("content-type"), Some("application/json"));
    drop(app);

    // Without the list, everything but the excluded headers travels (the contrast that
    // shows the list is what removed them).
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    let r = app
        .post("/webhook/receive", r#"{"id":"allow-2"}"#, sent)
        .await;
    assert_eq!(r.status(), 200);
    let got = &down.for_id("allow-2")[0];
    assert_eq!(
        names(got),
        expected(&[
            "x-forwarded-for",
            "cookie",
            "x-api-key",
            "x-request-id",
            "x-genesys-cloud-webhook-name",
            "x-other",
        ]),
        "{:?}",
        got.headers
    );

    // Retried deliveries (made by a worker from the stored event) keep to the list too.
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("FORWARD_HEADERS", "x-request-id"),
        ],
    )
    .await;
    down.script([Reply::Status(503)]);
    let r = app
        .post("/webhook/receive", r#"{"id":"allow-3"}"#, sent)
        .await;
    assert_eq!(r.status(), 202);
    crate::common::eventually(
        std::time::Duration::from_secs(10),
        "the retry delivered",
        || async { down.for_id("allow-3").len() == 2 },
    )
    .await;
    for got in down.for_id("allow-3") {
        assert_eq!(
            names(&got),
            expected(&["x-request-id"]),
            "{:?}",
            got.headers
        );
    }
}
