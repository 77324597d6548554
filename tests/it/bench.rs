//! The benchmark's verdict: its smoke run passes against the real relay, and fails
//! (exit non-zero) when the relay answers 2xx but the events are not where they must be.

use std::process::Command;
use std::time::Duration;

use webhook_relay::broker::Topology;
use webhook_relay::retry::Ladder;

use crate::common::{amqp_url, delete_topology_blocking};

/// Runs `relay-bench --smoke --only 3` with `relay` as the relay binary.
fn smoke_queue_first(relay: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relay-bench"))
        .args(["--smoke", "--only", "3", "--relay-bin", relay])
        .env("AMQP_URL", amqp_url())
        .output()
        .expect("relay-bench runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn smoke_run_passes_against_the_relay() {
    let (code, output) = smoke_queue_first(env!("CARGO_BIN_EXE_webhook-relay"));
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("3 queue-first ingest"), "{output}");
    assert!(output.contains("exactly as expected: yes"), "{output}");
}

#[test]
fn smoke_run_fails_when_events_are_not_where_the_answers_say() {
    // A relay that answers `202 queued` truthfully, but into another prefix's queues:
    // every HTTP answer is right, the events are not where the benchmark looks.
    let dir = std::env::temp_dir().join(format!("relay-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefixes = dir.join("prefixes");
    let wrapper = dir.join("misdirected-relay");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$QUEUE_PREFIX-elsewhere\" >> '{}'\nQUEUE_PREFIX=\"$QUEUE_PREFIX-elsewhere\" exec '{}' \"$@\"\n",
            prefixes.display(),
            env!("CARGO_BIN_EXE_webhook-relay")
        ),
    )
    .unwrap();
    let chmod = Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    assert!(chmod.success());

    let (code, output) = smoke_queue_first(wrapper.to_str().unwrap());

    // The misdirected relay declared a topology the benchmark does not know: delete it.
    // The ladder is the benchmark's (BACKOFF_BASE_MS 300000, BACKOFF_MAX_MS 600000).
    let ladder = Ladder::new(Duration::from_secs(300), Duration::from_secs(600));
    for prefix in std::fs::read_to_string(&prefixes)
        .unwrap_or_default()
        .lines()
    {
        delete_topology_blocking(Topology::new(prefix, &ladder));
    }
    let _ = std::fs::remove_dir_all(&dir);

    assert_ne!(code, 0, "a wrong answer must fail the run:\n{output}");
    assert!(output.contains("scenario 3 FAILED"), "{output}");
    assert!(!output.contains("exactly as expected: yes"), "{output}");
}
