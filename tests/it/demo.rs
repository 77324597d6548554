//! The demo: `demo-downstream` fails the share of events it is configured to, and
//! `scripts/demo.sh` against `serve` ends with every queue drained and exactly the
//! events the demo downstream always refuses in the DLQ.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use webhook_relay::app::Role;
use webhook_relay::demo::{Behaviour, Fate, StatsView};
use webhook_relay::envelope::Envelope;

use crate::common::{Inspector, TestApp, test_vars};

/// A demo downstream served in-process on port 0; stops when dropped.
struct DemoDownstream {
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl DemoDownstream {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(webhook_relay::demo::run(
            listener,
            behaviour,
            cancel.clone(),
        ));
        Self { addr, cancel }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stats(&self, query: &str) -> StatsView {
        reqwest::get(self.url(&format!("/stats{query}")))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for DemoDownstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test]
async fn demo_downstream_fails_the_configured_share_of_events() {
    let behaviour = Behaviour {
        fail_percent: 20,
        flaky_percent: 25,
        flaky_attempts: 1,
        slow_percent: 0,
        slow: Duration::ZERO,
    };
    let demo = DemoDownstream::start(behaviour).await;
    let http = reqwest::Client::new();
    let ids: Vec<String> = (0..400).map(|i| format!("share-{i}")).collect();
    let send = |id: &str, attempt: u32| {
        http.post(demo.url("/hook"))
            .header("idempotency-key", id)
            .header("x-relay-attempt", attempt.to_string())
            .body("{}")
            .send()
    };
    let mut failed_first = 0;
    let mut failed_second = 0;
    for id in &ids {
        let first = send(id, 1).await.unwrap().status().as_u16();
        let second = send(id, 2).await.unwrap().status().as_u16();
        let expected = match behaviour.fate(id) {
            Fate::FailAlways => (503, 503),
            Fate::FailFirst(1) => (503, 200),
            Fate::Deliver => (200, 200),
            other => panic!("unexpected fate {other:?}"),
        };
        assert_eq!((first, second), expected, "{id}");
        failed_first += usize::from(first == 503);
        failed_second += usize::from(second == 503);
    }
    let share_first = failed_first as f64 / ids.len() as f64;
    let share_always = failed_second as f64 / ids.len() as f64;
    // 45 % of first attempts and 20 % of all attempts fail; 400 events put the
    // observed shares within a few points of that.
    assert!(
        (share_first - 0.45).abs() < 0.08,
        "first attempts failing: {share_first}"
    );
    assert!(
        (share_always - 0.20).abs() < 0.06,
        "always failing: {share_always}"
    );

    let stats = demo.stats("").await;
    assert_eq!(stats.requests, 800);
    assert_eq!(stats.failed, (failed_first + failed_second) as u64);
    assert_eq!(stats.delivered, (ids.len() - failed_second) as u64);
    assert_eq!(stats.slow, 0);
    let one = demo.stats("?id_prefix=share-1").await;
    let expected_one = ids
        .iter()
        .filter(|id| id.starts_with("share-1") && behaviour.fate(id) != Fate::FailAlways)
        .count();
    assert_eq!(one.delivered, expected_one as u64);
}

#[tokio::test]
async fn demo_downstream_answers_slowly_when_told_to() {
    let demo = DemoDownstream::start(Behaviour {
        fail_percent: 0,
        flaky_percent: 0,
        flaky_attempts: 0,
        slow_percent: 100,
        slow: Duration::from_millis(20),
    })
    .await;
    for i in 0..5 {
        let resp = reqwest::Client::new()
            .post(demo.url("/anything"))
            .header("idempotency-key", format!("slow-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let stats = demo.stats("").await;
    assert_eq!((stats.requests, stats.slow, stats.delivered), (5, 5, 5));
}

#[tokio::test]
async fn demo_script_drains_the_queues_and_reports_the_expected_dlq_count() {
    let behaviour = Behaviour {
        fail_percent: 10,
        flaky_percent: 20,
        flaky_attempts: 2,
        slow_percent: 10,
        slow: Duration::from_millis(30),
    };
    let demo = DemoDownstream::start(behaviour).await;
    let app = TestApp::spawn(Role::Serve, &[("DOWNSTREAM_URL", &demo.url("/hook"))]).await;

    // The ids the script sends: demo-<run id>-<nnnn>.
    let (run_id, events) = ("it", 40);
    let ids: Vec<String> = (1..=events)
        .map(|i| format!("demo-{run_id}-{i:04}"))
        .collect();
    let doomed: BTreeSet<String> = ids
        .iter()
        .filter(|id| behaviour.fate(id) == Fate::FailAlways)
        .cloned()
        .collect();
    let flaky = ids
        .iter()
        .filter(|id| matches!(behaviour.fate(id), Fate::FailFirst(_)))
        .count();
    assert!(
        !doomed.is_empty() && flaky > 0,
        "the run exercises the DLQ and the retries"
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(&script)
        // The relay's own settings, so `topology status` reads this test's queues.
        .envs(test_vars(&app.prefix))
        .env("RELAY_URL", format!("http://{}", app.addr))
        .env("DEMO_DOWNSTREAM_URL", demo.url(""))
        .env("DEMO_EVENTS", events.to_string())
        .env("DEMO_RUN_ID", run_id)
        .env("DEMO_TIMEOUT_S", "60")
        .env("RELAY_CMD", env!("CARGO_BIN_EXE_webhook-relay"))
        .env("RUST_LOG", "error")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo script stops by itself")
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let dlq = &app.topology().dlq;
    assert_eq!(
        stdout.lines().last(),
        Some(
            format!(
                "DLQ: {n} messages in {dlq} ({n} from this run)",
                n = doomed.len()
            )
            .as_str()
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("] work "),
        "progress lines printed:\n{stdout}"
    );

    let inspect = Inspector::connect().await;
    let counts = inspect.counts(app.topology()).await;
    for (queue, n) in &counts {
        if queue != dlq {
            assert_eq!(*n, 0, "{queue} drained");
        }
    }
    let parked: BTreeSet<String> = inspect
        .drain(dlq)
        .await
        .iter()
        .map(|m| Envelope::from_amqp(&m.delivery.properties, m.delivery.data.clone()).id)
        .collect();
    assert_eq!(
        parked, doomed,
        "exactly the always-failing events are in the DLQ"
    );
    let stats = demo.stats(&format!("?id_prefix=demo-{run_id}-")).await;
    assert_eq!(
        stats.delivered as usize,
        events - doomed.len(),
        "every other event delivered"
    );
    inspect.close().await;
}
