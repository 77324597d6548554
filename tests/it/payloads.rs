//! Real payload shapes (SPEC §4.3): each fixture under `tests/fixtures/` gets the
//! right event id and webhook name, is stored as sent and forwarded byte for byte.

use std::time::Duration;

use webhook_relay::app::Role;
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::{Inspector, TestApp, eventually};

/// One fixture, how it arrives, and what the relay must make of it.
struct Shape {
    what: &'static str,
    body: &'static [u8],
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    id: &'static str,
    name: &'static str,
}

const SHAPES: &[Shape] = &[
    Shape {
        what: "EventBridge API destination: envelope around a conversation event",
        body: include_bytes!("../fixtures/eventbridge-conversation-end.json"),
        path: "/webhook/receive",
        headers: &[],
        id: "6f0f3c9e-2b1a-4d57-9c8e-3a41d2b7e905",
        name: "v2.detail.events.conversation.{id}.customer.end",
    },
    Shape {
        what: "bare notification event",
        body: include_bytes!("../fixtures/notification-user-presence.json"),
        path: "/webhook/receive",
        headers: &[],
        id: "b81f4e2a-6c3d-4a97-8e05-d2f7c1a93b60",
        name: "v2.users.8e4c1a7b-3d92-4f5e-b6a0-2c71d9e84f13.presence",
    },
    Shape {
        what: "Open Messaging outbound message on a named route",
        body: include_bytes!("../fixtures/open-messaging-outbound.json"),
        path: "/webhooks/open-messaging",
        headers: &[],
        id: "e1a45c2f90b3d7864f2a1c8e5b6d9f03",
        name: "open-messaging",
    },
    Shape {
        what: "prototype shape with the Genesys webhook-name header",
        body: include_bytes!("../fixtures/prototype-conversation-ended.json"),
        path: "/webhook/receive",
        headers: &[("x-genesys-cloud-webhook-name", "crm-sync")],
        id: "evt_01HPZ3K7Q9M4X2B8C5D6E7F8G9",
        name: "crm-sync",
    },
    Shape {
        what: "prototype shape with nothing naming it",
        body: include_bytes!("../fixtures/prototype-conversation-ended.json"),
        path: "/webhook/receive",
        headers: &[("idempotency-key", "crm-evt-2291")],
        id: "crm-evt-2291",
        name: "unknown",
    },
];

async fn post(app: &TestApp, shape: &Shape) -> reqwest::Response {
    let mut req = app
        .http
        .post(app.url(shape.path))
        .header("content-type", "application/json; charset=utf-8")
        .body(shape.body.to_vec());
    for (k, v) in shape.headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn each_shape_is_stored_with_its_id_and_name_as_sent() {
    // A receiver alone: queued events stay in P.work for inspection.
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    let inspect = Inspector::connect().await;
    for shape in SHAPES {
        let resp = post(&app, shape).await;
        assert_eq!(resp.status(), 202, "{}", shape.what);
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["status"], "queued", "{}", shape.what);
        assert_eq!(json["id"], shape.id, "{}", shape.what);

        let msgs = inspect.drain(&app.topology().work).await;
        assert_eq!(msgs.len(), 1, "{}", shape.what);
        let props = &msgs[0].delivery.properties;
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some(shape.id)
        );
        let e = Envelope::from_amqp(props, msgs[0].delivery.data.clone());
        assert_eq!(e.id, shape.id, "{}", shape.what);
        assert_eq!(e.webhook, shape.name, "{}", shape.what);
        assert_eq!(
            e.body.as_ref(),
            shape.body,
            "{}: stored byte for byte",
            shape.what
        );
        assert_eq!(e.content_type, "application/json; charset=utf-8");
    }
    inspect.close().await;
}

#[tokio::test]
async fn each_shape_reaches_the_downstream_byte_for_byte() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &down.url())]).await;
    for shape in SHAPES {
        let resp = post(&app, shape).await;
        assert_eq!(resp.status(), 200, "{}", shape.what);
        let got = down.for_id(shape.id);
        assert_eq!(got.len(), 1, "{}", shape.what);
        let r = &got[0];
        // Escapes (\u2013), non-ASCII (ë), spacing and key order all survive: the
        // relay never re-serialises.
        assert_eq!(r.body.as_ref(), shape.body, "{}", shape.what);
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(r.header("x-relay-attempt"), Some("1"));
        for (k, v) in shape
            .headers
            .iter()
            .filter(|(k, _)| *k != "idempotency-key")
        {
            assert_eq!(r.header(k), Some(*v), "{}: {k} forwarded", shape.what);
        }
    }
    assert_eq!(down.count(), SHAPES.len());

    // The same shapes through a retry: still byte for byte on the worker's attempt.
    down.script([Reply::Status(503)]);
    let shape = &SHAPES[0];
    let resp = app
        .http
        .post(app.url(shape.path))
        .header("content-type", "application/json")
        .header("idempotency-key", "eb-retry-1")
        .body(shape.body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    eventually(
        Duration::from_secs(10),
        "worker's second attempt",
        || async { down.for_id("eb-retry-1").len() == 2 },
    )
    .await;
    assert!(
        down.for_id("eb-retry-1")
            .iter()
            .all(|r| r.body.as_ref() == shape.body)
    );
}
