//! The benchmark's verdict: its smoke run passes against the real relay, and fails
//! (exit non-zero) when the relay answers 2xx but the events are not where they must be.

use std::process::Command;
use std::time::Duration;

use webhook_relay::broker::Topology;
use webhook_relay::retry::Ladder;

use crate::common::{Inspector, amqp_url, delete_topology_blocking, exchange_exists, queue_exists};

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
    let wrapper = relay_wrapper(
        &dir.join("misdirected-relay"),
        &format!(
            "echo \"$QUEUE_PREFIX-elsewhere\" >> '{}'\nexport QUEUE_PREFIX=\"$QUEUE_PREFIX-elsewhere\"",
            prefixes.display()
        ),
    );

    let (code, output) = smoke_queue_first(wrapper.to_str().unwrap());

    // The misdirected relay declared a topology the benchmark does not know: delete it.
    for prefix in std::fs::read_to_string(&prefixes)
        .unwrap_or_default()
        .lines()
    {
        delete_topology_blocking(bench_topology(prefix));
    }
    let _ = std::fs::remove_dir_all(&dir);

    assert_ne!(code, 0, "a wrong answer must fail the run:\n{output}");
    assert!(output.contains("scenario 3 FAILED"), "{output}");
    assert!(!output.contains("exactly as expected: yes"), "{output}");
}

#[test]
fn an_interrupted_run_stops_its_relay_and_deletes_what_it_declared() {
    // A relay that writes down its prefix and process id, then becomes the real relay.
    let dir = std::env::temp_dir().join(format!("relay-bench-int-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let started = dir.join("started");
    let wrapper = relay_wrapper(
        &dir.join("recorded-relay"),
        &format!("echo \"$QUEUE_PREFIX $$\" >> '{}'", started.display()),
    );
    let log = std::fs::File::create(dir.join("bench.log")).unwrap();
    // Far more events than run in the test's time: only the signal ends it.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_relay-bench"))
        .args([
            "--smoke",
            "--only",
            "3",
            "--events",
            "5000000",
            "--relay-bin",
        ])
        .arg(&wrapper)
        .env("AMQP_URL", amqp_url())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("relay-bench runs");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (prefix, relay_pid) = loop {
        let line = std::fs::read_to_string(&started).unwrap_or_default();
        if let Some((prefix, pid)) = line.lines().next().and_then(|l| l.split_once(' ')) {
            let work = format!("{prefix}.work");
            if rt.block_on(queue_exists(&work)) {
                break (prefix.to_owned(), pid.parse::<u32>().unwrap());
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay of scenario 3 did not start and declare its queues"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Mid-load: the raw publisher publishing (its round comes first). A publish
    // dropped half-written breaks the benchmark's own connection, so what it declared
    // must be deleted over another.
    let raw = format!("{prefix}.bench-raw");
    while !rt.block_on(queue_exists(&raw)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the raw publisher of scenario 3 did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(kill("-INT", bench.id()), "SIGINT could not be sent");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = bench.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = bench.kill();
            let _ = bench.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(dir.join("bench.log")).unwrap_or_default();
    // Signal 0 only asks whether the process exists.
    let relay_alive = kill("-0", relay_pid);
    if relay_alive {
        // The relay this test started must not outlive it.
        kill("-KILL", relay_pid);
    }
    let topology = bench_topology(&prefix);
    // The relay's topology, and what the benchmark declares itself: the raw
    // publisher's and the floors' queues.
    let own = ["bench-raw", "bench-floor", "bench-floor-envelope"].map(|q| format!("{prefix}.{q}"));
    let mut left: Vec<String> = topology
        .queues()
        .into_iter()
        .map(|q| q.name)
        .chain(own.iter().cloned())
        .filter(|q| rt.block_on(queue_exists(q)))
        .collect();
    if rt.block_on(exchange_exists(&topology.work)) {
        left.push(format!("exchange {}", topology.work));
    }
    if !left.is_empty() {
        delete_topology_blocking(topology);
        rt.block_on(delete_queues(&own));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let status = status.unwrap_or_else(|| panic!("relay-bench ignored SIGINT:\n{output}"));
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(!relay_alive, "its relay outlived it:\n{output}");
    assert!(left.is_empty(), "left behind: {left:?}\n{output}");
    assert!(output.contains("SIGINT during scenario 3"), "{output}");
}

/// Deletes `queues` (deleting one that is gone is no error).
async fn delete_queues(queues: &[String]) {
    let inspector = Inspector::connect().await;
    for q in queues {
        let _ = inspector
            .channel()
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    inspector.close().await;
}

/// The topology the benchmark's relays declare for `prefix`: its ladder is
/// BACKOFF_BASE_MS 300000, BACKOFF_MAX_MS 600000.
fn bench_topology(prefix: &str) -> Topology {
    Topology::new(
        prefix,
        &Ladder::new(Duration::from_secs(300), Duration::from_secs(600)),
    )
}

/// Writes an executable script at `path` that runs the shell lines `before`, then
/// becomes the relay with the same arguments (`exec`, so the process id stays).
fn relay_wrapper(path: &std::path::Path, before: &str) -> std::path::PathBuf {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\n{before}\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_webhook-relay")
        ),
    )
    .unwrap();
    let chmod = Command::new("chmod").arg("+x").arg(path).status().unwrap();
    assert!(chmod.success());
    path.to_owned()
}

/// `kill SIGNAL PID`; whether it succeeded.
fn kill(signal: &str, pid: u32) -> bool {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
