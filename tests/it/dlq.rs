//! Operating the DLQ (SPEC §6) against the real broker: the `dlq` command as an
//! operator runs it, and the library walks under failure and interruption.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::Duration;

use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use webhook_relay::app::Role;
use webhook_relay::dlq::{Action, Dlq, Operation, Selection};
use webhook_relay::envelope::Envelope;

use crate::common::downstream::{Downstream, Reply};
use crate::common::process::run_cli;
use crate::common::seed::{dead, drain_envelopes, ids, many, seed_dlq};
use crate::common::{Inspector, TestApp, eventually};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// A relay that declares the topology but consumes nothing, so queues can be inspected.
async fn idle_relay() -> TestApp {
    TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await
}

async fn listed(app: &TestApp) -> Vec<String> {
    let conn = app.relay.broker.pooled_connection().await.unwrap();
    let dlq = Dlq::new(app.topology(), Duration::from_secs(5));
    let mut out = Vec::new();
    dlq.list(&conn, None, &CancellationToken::new(), |e| {
        out.push(e.id);
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    out
}

#[tokio::test]
async fn listing_leaves_the_dlq_exactly_as_it_was() {
    let app = idle_relay().await;
    // More than 32: RabbitMQ 3.10 hands back larger batches of un-acked messages in
    // hash order when a channel closes; listing must not depend on that.
    let events = many("l", 120);
    seed_dlq(app.topology(), &events).await;
    let want = ids(&events);

    assert_eq!(
        listed(&app).await,
        want,
        "first listing: every message, in order"
    );
    assert_eq!(listed(&app).await, want, "second listing: the same");

    let p = &app.prefix;
    let ran = run_cli(p, &["dlq", "list", "--json", "--limit", "0"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let lines = ran.json_lines();
    let got: Vec<&str> = lines.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(got, want);
    let first = &lines[0];
    assert_eq!(first["webhook"], "orders");
    assert_eq!(first["attempts"], 5);
    assert_eq!(first["last_status"], 503);
    assert_eq!(first["last_error"], "HTTP 503");
    assert_eq!(first["reason"], "attempts_exhausted");
    assert!(first["dead_lettered_at"].as_str().unwrap().ends_with('Z'));
    assert!(first["first_received"].as_str().unwrap().ends_with('Z'));

    let ran = run_cli(p, &["dlq", "list", "--limit", "5"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let rows: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(rows.len(), 6, "header and 5 rows: {}", ran.stdout);
    assert!(rows[0].starts_with("ID") && rows[0].contains("LAST ERROR"));
    for (row, id) in rows[1..].iter().zip(&want) {
        assert!(row.starts_with(id.as_str()), "{row}");
        assert!(
            row.contains("attempts_exhausted") && row.ends_with("HTTP 503"),
            "{row}"
        );
    }
    assert!(ran.stderr.contains("5 of 120 messages"), "{}", ran.stderr);

    // Independent check, by draining: nothing lost, duplicated or reordered.
    let inspect = Inspector::connect().await;
    let drained = drain_envelopes(&inspect, &app.topology().dlq).await;
    assert_eq!(ids(&drained), want);
    inspect.close().await;
}

#[tokio::test]
async fn show_prints_one_message_with_headers_and_body() {
    let app = idle_relay().await;
    let events = many("s", 40);
    seed_dlq(app.topology(), &events).await;
    let p = &app.prefix;

    let ran = run_cli(p, &["dlq", "show", "s-0007"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let out = &ran.stdout;
    assert!(out.contains("id:               s-0007"), "{out}");
    assert!(out.contains("attempts:         5"), "{out}");
    assert!(
        out.contains("x-trace: trace-s-0007"),
        "forwarded headers shown: {out}"
    );
    assert!(
        out.contains("x-relay-dead-letter-reason: \"attempts_exhausted\""),
        "{out}"
    );
    assert!(
        out.contains(r#"{"id":"s-0007","n":1}"#),
        "body shown: {out}"
    );

    let ran = run_cli(p, &["dlq", "show", "s-0039", "--json"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let v: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(v["id"], "s-0039");
    assert_eq!(v["body"], r#"{"id":"s-0039","n":1}"#);
    assert_eq!(v["content_type"], "application/json");
    assert_eq!(v["headers"]["x-relay-attempts"], 5);
    assert_eq!(v["forward_headers"][0][0], "x-trace");

    let ran = run_cli(p, &["dlq", "show", "nope"], &[]).await;
    assert_eq!(ran.code, 1);
    assert!(
        ran.stderr.contains("no message with id \"nope\""),
        "{}",
        ran.stderr
    );

    assert_eq!(listed(&app).await, ids(&events), "show changed nothing");
}

#[tokio::test]
async fn replay_filters_move_exactly_what_they_select() {
    let app = idle_relay().await;
    let events = vec![
        dead("a1", Some(503), "attempts_exhausted", 2 * HOUR),
        dead("a2", Some(503), "attempts_exhausted", MINUTE),
        dead("b1", Some(404), "refused", 2 * HOUR),
        dead("b2", Some(404), "refused", MINUTE),
        dead("c1", None, "attempts_exhausted", 2 * HOUR),
        dead("a3", Some(502), "attempts_exhausted", 2 * HOUR),
        dead("a4", Some(503), "attempts_exhausted", MINUTE),
        dead("d1", Some(410), "refused", MINUTE),
    ];
    seed_dlq(app.topology(), &events).await;
    let p = &app.prefix;
    let t = app.topology().clone();
    let inspect = Inspector::connect().await;

    // Dry run: says what would move, moves nothing.
    let ran = run_cli(p, &["dlq", "replay", "--status", "503", "--dry-run"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let rows: Vec<&str> = ran.stdout.lines().skip(1).collect();
    let shown: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    assert_eq!(shown, ["a1", "a2", "a4", "would"], "{}", ran.stdout);
    assert!(
        ran.stdout.contains("would move 3, skip 5"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        listed(&app).await,
        ids(&events),
        "a dry run changes nothing"
    );
    assert_eq!(inspect.count(&t.work).await, 0);

    // Status and age together; a complete walk keeps the rest in order.
    let ran = run_cli(
        p,
        &["dlq", "replay", "--status", "503", "--older-than", "1h"],
        &[],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.contains("moved 1, skipped 7, failed 0"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        listed(&app).await,
        ["a2", "b1", "b2", "c1", "a3", "a4", "d1"]
    );

    // By id (repeatable): the walk stops once both are found.
    let ran = run_cli(p, &["dlq", "replay", "--id", "b2", "--id", "a2"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("moved 2,"), "{}", ran.stdout);

    // The downstream never answered c1: `--status none`.
    let ran = run_cli(p, &["dlq", "replay", "--status", "none"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("moved 1,"), "{}", ran.stdout);

    // By reason and age, JSON summary; then by status class.
    let ran = run_cli(
        p,
        &[
            "dlq",
            "replay",
            "--reason",
            "refused",
            "--older-than",
            "1h",
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let v = &ran.json_lines()[0];
    assert_eq!(
        (v["moved"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    let ran = run_cli(p, &["dlq", "replay", "--status", "5xx"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("moved 2,"), "{}", ran.stdout);

    // Refused: no selection, or --all with a filter. Nothing moves.
    let ran = run_cli(p, &["dlq", "replay"], &[]).await;
    assert_eq!(ran.code, 2);
    assert!(ran.stderr.contains("--all"), "{}", ran.stderr);
    let ran = run_cli(p, &["dlq", "replay", "--all", "--status", "503"], &[]).await;
    assert_eq!(ran.code, 2, "{ran:?}");

    let left = drain_envelopes(&inspect, &t.dlq).await;
    assert_eq!(ids(&left), ["d1"]);
    let moved = drain_envelopes(&inspect, &t.work).await;
    let moved_ids: BTreeSet<String> = moved.iter().map(|e| e.id.clone()).collect();
    let want: BTreeSet<String> = ["a1", "a2", "a3", "a4", "b1", "b2", "c1"]
        .map(String::from)
        .into();
    assert_eq!(moved_ids, want);
    assert_eq!(moved.len(), 7, "no duplicates");
    for e in &moved {
        let original = events.iter().find(|o| o.id == e.id).unwrap();
        assert_eq!(e.attempts, 0, "attempt count reset");
        assert_eq!(e.dead_letter_reason, None);
        assert_eq!(e.dead_lettered_at_ms, None);
        assert_eq!(e.body, original.body, "body byte for byte");
        assert_eq!(e.headers, original.headers, "forwarded headers kept");
        assert_eq!(e.last_status, original.last_status, "history kept");
        assert_eq!(e.first_received_ms, original.first_received_ms);
    }
    inspect.close().await;
}

#[tokio::test]
async fn purge_needs_yes_and_deletes_only_what_it_selects() {
    let app = idle_relay().await;
    let events = vec![
        dead("p0", Some(500), "attempts_exhausted", 2 * HOUR),
        dead("p1", Some(404), "refused", 2 * HOUR),
        dead("p2", Some(500), "attempts_exhausted", MINUTE),
        dead("p3", Some(500), "attempts_exhausted", MINUTE),
        dead("p4", None, "attempts_exhausted", MINUTE),
        dead("p5", Some(500), "attempts_exhausted", MINUTE),
    ];
    seed_dlq(app.topology(), &events).await;
    let p = &app.prefix;

    let ran = run_cli(p, &["dlq", "purge"], &[]).await;
    assert_eq!(ran.code, 2);
    assert!(ran.stderr.contains("--yes"), "{}", ran.stderr);
    assert_eq!(listed(&app).await.len(), 6, "refused: nothing deleted");

    let ran = run_cli(p, &["dlq", "purge", "--older-than", "1h", "--dry-run"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.contains("would purge 2, skip 4"),
        "{}",
        ran.stdout
    );
    assert_eq!(listed(&app).await.len(), 6);

    let ran = run_cli(p, &["dlq", "purge", "--yes", "--id", "p3"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(listed(&app).await, ["p0", "p1", "p2", "p4", "p5"]);

    let ran = run_cli(p, &["dlq", "purge", "--yes", "--older-than", "1h"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout.contains("purged 2, skipped 3, failed 0"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        listed(&app).await,
        ["p2", "p4", "p5"],
        "the rest kept, in order"
    );

    let ran = run_cli(p, &["dlq", "purge", "--yes"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("purged 3,"), "{}", ran.stdout);
    assert!(listed(&app).await.is_empty());
}

#[tokio::test]
async fn replaying_1000_messages_delivers_every_one_and_empties_the_dlq() {
    let down = Downstream::start(Reply::Status(200)).await;
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_DELIVERY", "false"),
        ],
    )
    .await;
    let events = many("r", 1000);
    seed_dlq(app.topology(), &events).await;

    let ran = run_cli(&app.prefix, &["dlq", "replay", "--all"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(
        ran.stdout
            .contains("moved 1000, skipped 0, failed 0 (1000 in the DLQ when it started)"),
        "{}",
        ran.stdout
    );

    eventually(Duration::from_secs(60), "1000 deliveries", || async {
        down.count() >= 1000
    })
    .await;
    let inspect = Inspector::connect().await;
    eventually(Duration::from_secs(20), "every queue empty", || async {
        inspect.total(app.topology()).await == 0
    })
    .await;
    let delivered: BTreeSet<String> = down
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids(&events).into_iter().collect::<BTreeSet<_>>());
    assert_eq!(down.count(), 1000, "each delivered once");
    assert!(
        down.received()
            .iter()
            .all(|r| r.header("x-relay-attempt") == Some("1")),
        "attempt counts were reset"
    );
    inspect.close().await;
}

#[tokio::test]
async fn a_replay_into_a_downstream_failing_mid_way_loses_nothing() {
    let down = Downstream::start(Reply::Status(500)).await;
    down.script(std::iter::repeat_n(Reply::Status(200), 150));
    let app = TestApp::spawn(
        Role::Serve,
        &[
            ("DOWNSTREAM_URL", &down.url()),
            ("INLINE_DELIVERY", "false"),
            ("MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    let events = many("f", 400);
    seed_dlq(app.topology(), &events).await;

    let ran = run_cli(&app.prefix, &["dlq", "replay", "--all"], &[]).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.contains("moved 400,"), "{}", ran.stdout);

    let t = app.topology().clone();
    let inspect = Inspector::connect().await;
    eventually(
        Duration::from_secs(60),
        "250 failures back in the DLQ",
        || async { inspect.count(&t.dlq).await == 250 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "nothing else in flight",
        || async { inspect.total(&t).await == 250 },
    )
    .await;
    let back = drain_envelopes(&inspect, &t.dlq).await;
    let back_ids: BTreeSet<String> = back.iter().map(|e| e.id.clone()).collect();
    assert_eq!(back.len(), 250, "no duplicates in the DLQ");
    assert_eq!(back_ids.len(), 250);
    // The only other way out of the relay is a 2xx: exactly the 150 the downstream gave.
    let seen: BTreeSet<String> = down
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    let all: BTreeSet<String> = ids(&events).into_iter().collect();
    let delivered: BTreeSet<String> = all.difference(&back_ids).cloned().collect();
    assert_eq!(delivered.len(), 150);
    assert!(
        delivered.is_subset(&seen),
        "every event not in the DLQ reached the downstream"
    );
    assert!(
        back_ids.is_subset(&all),
        "the DLQ holds only replayed events"
    );
    for e in &back {
        assert_eq!(e.attempts, 2, "a fresh set of attempts after the replay");
        assert_eq!(e.dead_letter_reason.as_deref(), Some("attempts_exhausted"));
    }
    inspect.close().await;
}

/// After a replay stopped mid-way: the work queue holds the first messages, in order;
/// the DLQ holds every other one exactly once, in order but for the few that were on
/// the wire when it stopped (the queue hands those back first).
fn assert_rest_kept(events: &[Envelope], moved: &[Envelope], left: &[Envelope]) {
    let want = ids(events);
    assert_eq!(ids(moved), want[..moved.len()], "moved: a prefix, in order");
    let mut rest = ids(left);
    let out_of_place = rest.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(out_of_place <= 2, "{out_of_place} out of place: {rest:?}");
    rest.sort();
    let expected = &want[moved.len()..];
    let missing: Vec<_> = expected.iter().filter(|id| !rest.contains(id)).collect();
    let mut extra = rest.clone();
    for id in expected {
        if let Some(i) = extra.iter().position(|x| x == id) {
            extra.remove(i);
        }
    }
    assert!(
        missing.is_empty() && extra.is_empty(),
        "every other message still in the DLQ, once: {} moved, {} left; \
         missing {missing:?}, extra {extra:?}",
        moved.len(),
        rest.len()
    );
}

fn replay_all(rate: Option<f64>) -> Operation {
    Operation {
        action: Action::Replay,
        selection: Selection::default(),
        dry_run: false,
        rate,
    }
}

#[tokio::test]
async fn an_interrupted_replay_settles_what_is_in_flight_and_keeps_the_rest() {
    let app = idle_relay().await;
    let events = many("i", 600);
    seed_dlq(app.topology(), &events).await;
    let t = app.topology().clone();
    let conn = app.relay.broker.pooled_connection().await.unwrap();
    let dlq = Dlq::new(&t, Duration::from_secs(5));
    let inspect = Inspector::connect().await;

    let cancel = CancellationToken::new();
    let op = replay_all(Some(400.0));
    let walk = dlq.run(&conn, &op, &cancel, |_| {}, |_| {});
    let stop = async {
        eventually(Duration::from_secs(20), "replay under way", || async {
            inspect.count(&t.work).await >= 100
        })
        .await;
        cancel.cancel();
    };
    let (tally, ()) = tokio::join!(walk, stop);
    let tally = tally.unwrap();
    assert_eq!(tally.stopped.as_deref(), Some("interrupted"));
    assert!(tally.matched >= 100 && tally.matched < 600, "{tally:?}");
    assert_eq!(tally.failed, 0);

    let moved = drain_envelopes(&inspect, &t.work).await;
    let left = drain_envelopes(&inspect, &t.dlq).await;
    assert_eq!(
        moved.len() as u64,
        tally.matched,
        "what was counted moved is in work"
    );
    assert_rest_kept(&events, &moved, &left);
    inspect.close().await;
}

#[tokio::test]
async fn a_replay_whose_publishes_start_failing_keeps_every_unmoved_message() {
    let app = idle_relay().await;
    let events = many("u", 600);
    seed_dlq(app.topology(), &events).await;
    let t = app.topology().clone();
    let conn = app.relay.broker.pooled_connection().await.unwrap();
    let dlq = Dlq::new(&t, Duration::from_secs(5));
    let inspect = Inspector::connect().await;

    let op = replay_all(Some(400.0));
    let cancel = CancellationToken::new();
    let walk = dlq.run(&conn, &op, &cancel, |_| {}, |_| {});
    let break_it = async {
        eventually(Duration::from_secs(20), "replay under way", || async {
            inspect.count(&t.work).await >= 100
        })
        .await;
        // The work queue loses its binding: from now on every replay publish is unroutable.
        inspect
            .channel()
            .queue_unbind(
                t.work.as_str().into(),
                t.work.as_str().into(),
                t.work.as_str().into(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    };
    let (tally, ()) = tokio::join!(walk, break_it);
    let tally = tally.unwrap();
    assert!(tally.failed >= 1, "{tally:?}");
    assert!(
        tally.stopped.as_deref().unwrap().contains("unroutable"),
        "{tally:?}"
    );

    let moved = drain_envelopes(&inspect, &t.work).await;
    let left = drain_envelopes(&inspect, &t.dlq).await;
    assert_eq!(moved.len() as u64, tally.matched, "{tally:?}");
    assert_eq!(
        left.len() as u64,
        600 - tally.matched,
        "every message not moved is still in the DLQ"
    );
    assert_rest_kept(&events, &moved, &left);
    inspect.close().await;
}
