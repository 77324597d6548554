//! `/admin/dlq` (SPEC §6): absent without ADMIN_TOKEN, 401 without the right bearer
//! token, and the DLQ operations over HTTP against the real broker.

use std::time::Duration;

use serde_json::Value;
use webhook_relay::app::Role;

use crate::common::downstream::{Downstream, Reply};
use crate::common::seed::{dead, drain_envelopes, ids, seed_dlq};
use crate::common::{Inspector, TestApp};

const TOKEN: &str = "admin-s3cret-token";
const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn without_a_token_the_admin_tree_does_not_exist() {
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    for (method, path) in [
        ("GET", "/admin/dlq"),
        ("GET", "/admin/dlq/some-id"),
        ("POST", "/admin/dlq/replay?all=true"),
        ("DELETE", "/admin/dlq?all=true"),
        ("GET", "/admin"),
    ] {
        let resp = app
            .http
            .request(method.parse().unwrap(), app.url(path))
            .header("authorization", bearer(TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{method} {path}");
    }
    // The rest of the process is unaffected.
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_wrong_token_or_none_gets_401() {
    let down = Downstream::start(Reply::Status(200)).await;
    // A worker-only process serves the admin tree too.
    let worker = TestApp::spawn(
        Role::Worker,
        &[("DOWNSTREAM_URL", &down.url()), ("ADMIN_TOKEN", TOKEN)],
    )
    .await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer"),
        Some(&*format!("Basic {TOKEN}")),
        Some(TOKEN),
    ] {
        for (method, path) in [
            ("GET", "/admin/dlq"),
            ("GET", "/admin/dlq/x"),
            ("POST", "/admin/dlq/replay?all=true"),
            ("DELETE", "/admin/dlq?all=true"),
        ] {
            let mut req = worker
                .http
                .request(method.parse().unwrap(), worker.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            let body = resp.text().await.unwrap();
            assert!(!body.contains(TOKEN), "the token is never echoed");
        }
    }
    let resp = worker
        .http
        .get(worker.url("/admin/dlq"))
        .header("authorization", bearer(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn list_show_replay_and_purge_over_http() {
    let app = TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("ADMIN_TOKEN", TOKEN)],
    )
    .await;
    let events = vec![
        dead("h1", Some(503), "attempts_exhausted", 2 * HOUR),
        dead("h2", Some(503), "attempts_exhausted", MINUTE),
        dead("h3", Some(404), "refused", MINUTE),
        dead("h4", Some(500), "attempts_exhausted", 2 * HOUR),
        dead("h5", Some(503), "attempts_exhausted", MINUTE),
    ];
    seed_dlq(app.topology(), &events).await;
    let t = app.topology().clone();
    let call = |method: &str, path: &str| {
        app.http
            .request(method.parse().unwrap(), app.url(path))
            .header("authorization", bearer(TOKEN))
    };
    let json = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };

    // List, with and without a limit; the DLQ is unchanged.
    let (status, v) = json(call("GET", "/admin/dlq").send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], 5);
    assert_eq!(v["queue"], t.dlq.as_str());
    let listed: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids(&events));
    assert_eq!(v["messages"][2]["reason"], "refused");
    assert_eq!(v["messages"][2]["last_status"], 404);
    let (_, v) = json(call("GET", "/admin/dlq?limit=2").send().await.unwrap()).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    let (status, _) = json(call("GET", "/admin/dlq?limit=0").send().await.unwrap()).await;
    assert_eq!(status, 400);

    // Show one; an unknown id is 404.
    let (status, v) = json(call("GET", "/admin/dlq/h3").send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "h3");
    assert_eq!(v["body"], r#"{"id":"h3","n":1}"#);
    assert_eq!(v["headers"]["x-relay-dead-letter-reason"], "refused");
    let (status, v) = json(call("GET", "/admin/dlq/nope").send().await.unwrap()).await;
    assert_eq!(status, 404, "{v}");

    // Replay needs a selection; unknown parameters are refused.
    let (status, _) = json(call("POST", "/admin/dlq/replay").send().await.unwrap()).await;
    assert_eq!(status, 400);
    let (status, v) = json(
        call("POST", "/admin/dlq/replay?idd=h1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("idd"), "{v}");

    // Dry run: reports, moves nothing.
    let (status, v) = json(
        call("POST", "/admin/dlq/replay?status=503&dry_run=true")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["would_move"].as_u64(),
            v["skipped"].as_u64(),
            v["dry_run"].as_bool()
        ),
        (Some(3), Some(2), Some(true))
    );
    let would: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(would, ["h1", "h2", "h5"]);
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.count(&t.dlq).await, 5);
    assert_eq!(inspect.count(&t.work).await, 0);

    // Replay with filters.
    let (status, v) = json(
        call("POST", "/admin/dlq/replay?status=503&older_than=1h")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["moved"].as_u64(),
            v["skipped"].as_u64(),
            v["failed"].as_u64()
        ),
        (Some(1), Some(4), Some(0))
    );
    let (status, v) = json(
        call("POST", "/admin/dlq/replay?id=h5&id=h3&rate=50")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["moved"], 2);
    let moved = drain_envelopes(&inspect, &t.work).await;
    assert_eq!(ids(&moved), ["h1", "h3", "h5"]);
    assert!(
        moved
            .iter()
            .all(|e| e.attempts == 0 && e.dead_letter_reason.is_none())
    );

    // Purge: a selection or all=true; filters by id.
    let (status, _) = json(call("DELETE", "/admin/dlq").send().await.unwrap()).await;
    assert_eq!(status, 400, "no selection: nothing deleted");
    let (status, v) = json(call("DELETE", "/admin/dlq?id=h2").send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["purged"].as_u64(), v["skipped"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(inspect.count(&t.dlq).await, 1);
    let (status, v) = json(call("DELETE", "/admin/dlq?all=true").send().await.unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["purged"], 1);
    assert_eq!(inspect.count(&t.dlq).await, 0);
    inspect.close().await;
}
