//! `relay-bench`: measures the relay against its physical limits in one run, on one
//! machine: the relay (the built `webhook-relay` binary, as child processes) next to
//! a load generator hitting the mock downstream directly and a raw lapin publisher
//! and consumer on quorum queues. Prints one table and writes it as a chart; every
//! scenario first proves that each event was delivered or queued exactly as expected.

mod amqp;
mod chart;
mod floor;
mod load;
mod mock;
mod process;
mod report;
mod tally;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use axum::http::StatusCode;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use lapin::{BasicProperties, Connection};
use webhook_relay::broker::Topology;
use webhook_relay::config::DEFAULT_AMQP_URL;
use webhook_relay::envelope::{self, Envelope};
use webhook_relay::retry::Ladder;

use load::{Expect, Load, Sent};
use mock::Mock;
use process::{CpuSeen, CpuWatch, RelayProcess, Usage};
use report::{FLOOR, FLOOR_ENVELOPE, Resources, Row, median};
use tally::{Tally, event_id};

/// Backoff the relay runs with here: the first retry level holds events for 10 min, far
/// longer than a scenario, so its retried events are all still there to count.
const BACKOFF_BASE_MS: u64 = 300_000;
const BACKOFF_MAX_MS: u64 = 600_000;

/// The ladder of the downstream-capacity scenario: retries come back within a second,
/// as refused attempts would in production (200 ms, 400 ms, 800 ms).
const CAPACITY_BACKOFF_BASE_MS: u64 = 100;
const CAPACITY_BACKOFF_MAX_MS: u64 = 800;

/// How long a queue's count may take to show what its confirms and acks already said.
const SETTLE: Duration = Duration::from_secs(10);

/// The relay's intake endpoint.
const RECEIVE: &str = "/webhook/receive";

/// The scenarios, in the order they run; `--only` picks among them.
const SCENARIOS: std::ops::RangeInclusive<u8> = 1..=6;

/// Measures webhook-relay against the direct path, a raw lapin publisher and a raw
/// lapin consumer in the same run, prints one table and writes it as an SVG chart.
#[derive(Debug, Parser)]
#[command(name = "relay-bench", about)]
struct Args {
    /// Short correctness-only run: small counts, one round, targets not judged. Exits
    /// non-zero, like a full run, when any event is not delivered or queued exactly as
    /// expected.
    #[arg(long)]
    smoke: bool,
    /// Events per HTTP scenario (1-3) and round [default: 20000; smoke: 300].
    #[arg(long)]
    events: Option<usize>,
    /// Events pre-filled into P.work per drain (scenario 4) [default: 50000; smoke: 1000].
    #[arg(long)]
    drain_events: Option<usize>,
    /// Rounds of each measurement, relay and baseline alternating; the table shows
    /// medians, so one round disturbed by a neighbour on the machine does not decide
    /// [default: 3; smoke: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Rate of the paced latency measurement of scenario 1, events/s (twice what the
    /// prototype relayed at most).
    #[arg(long, default_value_t = 2000.0)]
    paced_rate: f64,
    /// Events per paced latency measurement and round [default: 5000; smoke: 200].
    #[arg(long)]
    paced_events: Option<usize>,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Keep-alive connections of the load generator; also the raw publisher's in-flight
    /// window and the prefetch of the relay's workers and of the raw consumer.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How the downstream fails in scenario 2.
    #[arg(long, value_enum, default_value_t = Refusal::Connect)]
    refuse_with: Refusal,
    /// The relay binary [default: `webhook-relay` beside this binary, built first when
    /// run through cargo].
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The broker.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// Events pre-filled into P.work for the downstream-capacity scenario (5), per
    /// mode [default: 2000; smoke: 300].
    #[arg(long)]
    capacity_events: Option<usize>,
    /// Events per round of the large-events scenario (6): fewer than the other HTTP
    /// scenarios, as each is `--large-size` bytes [default: 4000; smoke: 100].
    #[arg(long)]
    large_events: Option<usize>,
    /// Request body size of the large-events scenario (6), bytes.
    #[arg(long, default_value_t = 65_536)]
    large_size: usize,
    /// Run only these scenarios, e.g. `--only 2,3`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=6))]
    only: Vec<u8>,
    /// Where to write the chart of the table's rates (SVG), directories created
    /// [default: target/relay-bench/chart.svg; smoke: target/relay-bench/chart-smoke.svg].
    #[arg(long, value_name = "PATH")]
    chart: Option<PathBuf>,

    /// Serve as the floor forwarder (`floor.rs`) instead of measuring: how the
    /// benchmark starts its own floor process.
    #[arg(long, hide = true)]
    serve_floor: bool,
}

/// How the downstream of scenario 2 fails every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Refusal {
    /// Connection refused: the downstream is down (a bound port nobody listens on).
    Connect,
    /// HTTP 503 from the mock downstream: up, but failing.
    Status503,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    if args.serve_floor {
        return match runtime.block_on(floor::serve(&args.amqp_url)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay-bench --serve-floor: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(args)) {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        // As a shell reports a process ended by SIGINT.
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every chosen scenario passed its checks.
    Passed,
    /// At least one failed its checks.
    Failed,
    /// Stopped by a signal; the current scenario's queues were deleted.
    Interrupted,
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM), naming the signal.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default action (exit) applies: never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Runs the chosen scenarios.
async fn run(args: Args) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let relay_bin = relay_binary(args.relay_bin.clone())?;
    let bench = Bench::new(args, relay_bin).await?;
    let settings = bench.settings();
    eprintln!("relay-bench: {settings}");
    let mut rows = Vec::new();
    let mut worst_rss: f64 = 0.0;
    let mut failures = Vec::new();
    for scenario in SCENARIOS {
        if !bench.args.only.is_empty() && !bench.args.only.contains(&scenario) {
            continue;
        }
        let prefix = format!("relay-bench-{}-{scenario}", bench.run);
        let measured = async {
            match scenario {
                1 => bench.inline_healthy(&prefix).await,
                2 => bench.inline_refusing(&prefix).await,
                3 => bench.queue_first(&prefix).await,
                4 => bench.drain(&prefix).await,
                5 => bench.capacity(&prefix).await,
                _ => bench.large_events(&prefix).await,
            }
        };
        // Ctrl-C or SIGTERM mid-scenario: the scenario is dropped (its relay processes
        // are killed with it), and what it declared is deleted before exiting.
        let result = tokio::select! {
            result = measured => Ok(result),
            signal = interrupted() => Err(signal),
        };
        bench.teardown(&prefix).await;
        let result = match result {
            Ok(result) => result,
            Err(signal) => {
                eprintln!(
                    "relay-bench: {signal} during scenario {scenario}: its relays stopped, \
                     its queues ({prefix}.*) deleted"
                );
                let _ = bench.amqp.close(200, "bench interrupted".into()).await;
                return Ok(Outcome::Interrupted);
            }
        };
        match result {
            Ok(new) => {
                for r in &new {
                    worst_rss = worst_rss.max(r.rss_mb.unwrap_or(0.0));
                }
                rows.extend(new);
            }
            Err(e) => {
                eprintln!("relay-bench: scenario {scenario} FAILED: {e:#}");
                failures.push(scenario);
            }
        }
    }
    if worst_rss > 0.0 {
        rows.push(Row::peak_rss(worst_rss, bench.judged()));
    }
    let _ = bench.amqp.close(200, "bench done".into()).await;

    let machine = machine();
    println!("\n{machine}\n{settings}\n");
    print!("{}", report::render(&rows));
    println!(
        "\nevery event delivered or queued exactly as expected: {}; total time {:.0} s",
        if failures.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO (scenarios {failures:?} failed, see above)")
        },
        started.elapsed().as_secs_f64()
    );
    let caption = if bench.args.smoke {
        format!("{machine}; smoke run: correctness only, targets not judged")
    } else {
        machine
    };
    write_chart(&bench.chart_path(), &rows, &caption)?;
    Ok(if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed
    })
}

/// Writes the chart of `rows` to `path`, and says where (or why not).
fn write_chart(path: &std::path::Path, rows: &[Row], caption: &str) -> anyhow::Result<()> {
    let Some(svg) = chart::render(rows, caption)? else {
        println!("chart: no row with a relay and a baseline rate, none written");
        return Ok(());
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    println!("chart: {}", path.display());
    Ok(())
}

/// The relay binary: the one given, else `webhook-relay` beside this binary. Run
/// through cargo, it is (re)built first in this binary's profile, so the benchmark
/// never measures a stale relay.
fn relay_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let me = std::env::current_exe().context("locating this binary")?;
    let path = me.with_file_name(format!("webhook-relay{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--bin",
            "webhook-relay",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        eprintln!("relay-bench: building webhook-relay");
        let status = cmd.status().context("running cargo build")?;
        ensure!(status.success(), "cargo build of webhook-relay failed");
    }
    ensure!(
        path.exists(),
        "{} not found: build it (cargo build --release) or pass --relay-bin",
        path.display()
    );
    Ok(path)
}

/// A one-line description of the machine, for the table's caption.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    format!("machine: {cores} cores, {model}; load average at the end: {load}")
}

/// Per-round figures of one measured thing.
#[derive(Debug, Default)]
struct Rounds {
    /// Events per second.
    rate: Vec<f64>,
    /// Median latency, ms.
    p50: Vec<f64>,
    /// 99th percentile latency, ms.
    p99: Vec<f64>,
}

impl Rounds {
    fn push(&mut self, sent: &Sent) {
        self.rate.push(sent.rate());
        self.p50.push(sent.latency_ms(0.5));
        self.p99.push(sent.latency_ms(0.99));
    }
    fn rate(&self) -> f64 {
        median(&self.rate)
    }
    fn latency(&self) -> (f64, f64) {
        (median(&self.p50), median(&self.p99))
    }
}

/// What one round of an HTTP scenario sends.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Events per round.
    events: usize,
    /// Request body size in bytes.
    size: usize,
}

/// A floor forwarder of a queue-first scenario (`floor.rs`): what it stores, where,
/// and how its events and figures are told apart from the others'.
struct Floor {
    /// Stores the relay's envelope instead of bare properties.
    envelope: bool,
    /// Its queue, declared and deleted by the scenario.
    queue: String,
    /// The id tag of its events.
    tag: String,
    /// Keys its broker CPU figures.
    key: String,
    /// Its name in the per-round lines.
    label: &'static str,
    /// Its row's name after the scenario's.
    scenario: &'static str,
    /// What its baseline column calls it.
    what: &'static str,
}

impl Floor {
    /// The least a forwarder does: bare messages, as the raw publisher's; with
    /// `envelope`, storing the relay's envelope (SPEC §2) instead.
    fn new(prefix: &str, number: u8, envelope: bool) -> Self {
        let (tag, key, label, scenario, what) = if envelope {
            (
                "e",
                "floor envelope",
                "floor+env",
                "least forwarder + envelope",
                FLOOR_ENVELOPE,
            )
        } else {
            ("f", "floor", "floor", "the least a forwarder does", FLOOR)
        };
        Self {
            envelope,
            queue: Self::queue(prefix, envelope),
            tag: format!("{prefix}{tag}"),
            key: format!("{number} {key}"),
            label,
            scenario,
            what,
        }
    }

    /// The queue a floor of the scenario with `prefix` publishes to.
    fn queue(prefix: &str, envelope: bool) -> String {
        let suffix = if envelope { "-envelope" } else { "" };
        format!("{prefix}.bench-floor{suffix}")
    }
}

/// Shared state of a run.
struct Bench {
    /// The command line.
    args: Args,
    /// Events per HTTP scenario and round.
    events: usize,
    /// Events pre-filled per drain.
    drain_events: usize,
    /// Rounds per measurement.
    rounds: usize,
    /// Events per paced latency measurement and round.
    paced_events: usize,
    /// Events per mode of the downstream-capacity scenario.
    capacity_events: usize,
    /// Events per round of the large-events scenario, and their size.
    large: Batch,
    /// The relay binary under test.
    relay_bin: PathBuf,
    /// This run's tag: queue prefixes and event ids carry it.
    run: String,
    /// The benchmark's own broker connection (baselines, pre-fill, verification).
    amqp: Connection,
    /// For readiness polls.
    http: reqwest::Client,
    /// Broker CPU s/10k per measurement ("2 relay", "2 raw", ...) and round.
    broker_cpu: Mutex<HashMap<String, Vec<f64>>>,
}

impl Bench {
    async fn new(args: Args, relay_bin: PathBuf) -> anyhow::Result<Self> {
        ensure!(
            args.paced_rate.is_finite() && args.paced_rate > 0.0,
            "--paced-rate must be a positive number of events per second"
        );
        ensure!(
            (1..=usize::from(u16::MAX)).contains(&args.connections),
            "--connections must be between 1 and 65535 (it is also the prefetch)"
        );
        let amqp = amqp::connect(&args.amqp_url).await?;
        let (events, drain_events, rounds, paced, capacity, large) = if args.smoke {
            (300, 1_000, 1, 200, 300, 100)
        } else {
            (20_000, 50_000, 3, 5_000, 2_000, 4_000)
        };
        Ok(Self {
            events: args.events.unwrap_or(events).max(1),
            drain_events: args.drain_events.unwrap_or(drain_events).max(1),
            rounds: args.rounds.unwrap_or(rounds).max(1),
            paced_events: args.paced_events.unwrap_or(paced).max(1),
            capacity_events: args.capacity_events.unwrap_or(capacity).max(1),
            large: Batch {
                events: args.large_events.unwrap_or(large).max(1),
                size: args.large_size,
            },
            run: format!("{}-{}", std::process::id(), envelope::now_ms() % 100_000),
            args,
            relay_bin,
            amqp,
            http: reqwest::Client::new(),
            broker_cpu: Mutex::default(),
        })
    }

    fn settings(&self) -> String {
        format!(
            "{} events per HTTP scenario and round, {} per drain, {} paced at {}/s, {} round(s), \
             medians shown; {} B bodies; {} connections = in-flight window = prefetch; \
             scenario 2 downstream: {}; scenario 6: {} events per round of {} B{}",
            self.events,
            self.drain_events,
            self.paced_events,
            report::thousands(self.args.paced_rate),
            self.rounds,
            self.args.size,
            self.args.connections,
            match self.args.refuse_with {
                Refusal::Connect => "connection refused",
                Refusal::Status503 => "HTTP 503",
            },
            self.large.events,
            self.large.size,
            if self.args.smoke {
                "; smoke run: correctness only, targets not judged"
            } else {
                ""
            }
        )
    }

    /// Keeps what the broker spent during one round of measurement `key`.
    fn note_broker(&self, key: &str, seen: &CpuSeen) {
        if let Some(v) = seen.broker_per_10k {
            let mut all = self.broker_cpu.lock().expect("not poisoned");
            all.entry(key.to_owned()).or_default().push(v);
        }
    }

    /// The median broker CPU s/10k of measurement `key`, if the broker was watched.
    fn broker(&self, key: &str) -> Option<f64> {
        let all = self.broker_cpu.lock().expect("not poisoned");
        all.get(key).map(|v| median(v))
    }

    fn judged(&self) -> bool {
        !self.args.smoke
    }

    /// Where the chart goes: as asked, else beside the build, a smoke run's apart so
    /// it never replaces a full run's.
    fn chart_path(&self) -> PathBuf {
        self.args.chart.clone().unwrap_or_else(|| {
            PathBuf::from(if self.args.smoke {
                "target/relay-bench/chart-smoke.svg"
            } else {
                "target/relay-bench/chart.svg"
            })
        })
    }

    /// Events per round and body size of the HTTP scenarios 1-3.
    fn batch(&self) -> Batch {
        Batch {
            events: self.events,
            size: self.args.size,
        }
    }

    /// How long one load or drain may take before the run counts as failed.
    fn deadline(&self) -> Duration {
        Duration::from_secs(if self.args.smoke { 30 } else { 120 })
    }

    fn topology(prefix: &str) -> Topology {
        let ladder = Ladder::new(
            Duration::from_millis(BACKOFF_BASE_MS),
            Duration::from_millis(BACKOFF_MAX_MS),
        );
        Topology::new(prefix, &ladder)
    }

    /// Starts a relay process for `prefix` and waits until it is ready.
    async fn start_relay(
        &self,
        role: &str,
        prefix: &str,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<RelayProcess> {
        let mut env: Vec<(&str, String)> = vec![
            ("AMQP_URL", self.args.amqp_url.clone()),
            ("QUEUE_PREFIX", prefix.to_owned()),
            ("BACKOFF_BASE_MS", BACKOFF_BASE_MS.to_string()),
            ("BACKOFF_MAX_MS", BACKOFF_MAX_MS.to_string()),
            ("WORKER_CONCURRENCY", self.args.connections.to_string()),
        ];
        env.extend(extra.iter().cloned());
        let mut relay = RelayProcess::spawn(&self.relay_bin, role, &env)?;
        relay.wait_ready(&self.http).await?;
        Ok(relay)
    }

    /// Round `round`'s load of `batch` on `url`: events `round * batch.events ..` of `tag`.
    fn load(
        &self,
        batch: Batch,
        url: String,
        tag: &str,
        round: usize,
        id_header: bool,
        expect: Expect,
    ) -> Load {
        Load {
            url,
            first: round * batch.events,
            count: batch.events,
            connections: self.args.connections,
            size: batch.size,
            tag: tag.to_owned(),
            id_header,
            expect,
            deadline: self.deadline(),
            pace: None,
        }
    }

    /// Round `round`'s paced load on `url`: `paced_events` at `paced_rate`, ids after
    /// every round's saturating load.
    fn paced(&self, url: String, tag: &str, round: usize, id_header: bool, expect: Expect) -> Load {
        Load {
            first: self.rounds * self.events + round * self.paced_events,
            count: self.paced_events,
            pace: Some(self.args.paced_rate),
            ..self.load(self.batch(), url, tag, round, id_header, expect)
        }
    }

    /// One measured round of `process` (the relay, or the floor forwarder: `what`)
    /// receiving `load`, with its CPU and the machine's watched.
    async fn measured_round(
        &self,
        what: &str,
        process: &RelayProcess,
        key: &str,
        round: usize,
        load: Load,
        cpu: &mut Vec<(Usage, Usage)>,
    ) -> anyhow::Result<Sent> {
        let n = load.count;
        let before = process.sample()?;
        let watch = CpuWatch::start();
        let sent = load::run(load).await;
        let seen = watch.finish(n);
        self.note_broker(key, &seen);
        let after = process.sample()?;
        cpu.push((before, after));
        check_sent(what, &sent, n)?;
        let label = format!("{what}:");
        eprintln!(
            "  round {round} {label:<10} {}/s, p50 {:.2} ms, p99 {:.2} ms, slowest {:.0} ms, {what} CPU s/10k {:.2}; {seen}",
            report::thousands(sent.rate()),
            sent.latency_ms(0.5),
            sent.latency_ms(0.99),
            sent.latency_ms(1.0),
            (after.cpu_secs - before.cpu_secs) / n.max(1) as f64 * 10_000.0
        );
        Ok(sent)
    }

    /// Starts the floor forwarder (this binary with `--serve-floor`, see `floor.rs`)
    /// with `env` and waits until it answers.
    async fn start_floor(&self, env: &[(&'static str, String)]) -> anyhow::Result<RelayProcess> {
        let me = std::env::current_exe().context("locating this binary")?;
        let mut env = env.to_vec();
        env.push(("AMQP_URL", self.args.amqp_url.clone()));
        let mut floor = RelayProcess::spawn(&me, "--serve-floor", &env)?;
        floor.wait_ready(&self.http).await?;
        Ok(floor)
    }

    /// Scenario 1: inline delivery to a healthy downstream, against the load generator
    /// hitting the mock downstream directly.
    async fn inline_healthy(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        eprintln!("scenario 1: inline, downstream healthy");
        let n = self.events;
        let ids = (n + self.paced_events) * self.rounds;
        let (tag_d, tag, tag_f) = (
            format!("{prefix}d"),
            format!("{prefix}r"),
            format!("{prefix}f"),
        );
        let direct_mock = Mock::start(StatusCode::OK, &tag_d, ids).await?;
        let relay_mock = Mock::start(StatusCode::OK, &tag, ids).await?;
        let floor_mock = Mock::start(StatusCode::OK, &tag_f, n * self.rounds).await?;
        let floor = self
            .start_floor(&[("DOWNSTREAM_URL", floor_mock.url())])
            .await?;
        let relay = self
            .start_relay(
                "receiver",
                prefix,
                &[
                    ("DOWNSTREAM_URL", relay_mock.url()),
                    ("INLINE_DELIVERY", "true".into()),
                ],
            )
            .await?;
        let to_mock = Expect {
            status: 200,
            word: None,
        };
        let delivered = Expect {
            status: 200,
            word: Some("delivered"),
        };
        let (mut direct, mut through, mut cpu) = (Rounds::default(), Rounds::default(), vec![]);
        let (mut direct_paced, mut through_paced) = (Rounds::default(), Rounds::default());
        let (mut least, mut floor_cpu) = (Rounds::default(), vec![]);
        for round in 0..self.rounds {
            let watch = CpuWatch::start();
            let direct_load = self.load(
                self.batch(),
                direct_mock.url(),
                &tag_d,
                round,
                true,
                to_mock,
            );
            let sent = load::run(direct_load).await;
            let seen = watch.finish(n);
            check_sent("direct", &sent, n)?;
            eprintln!(
                "  round {round} direct:   {}/s, p50 {:.2} ms, p99 {:.2} ms; {seen}",
                report::thousands(sent.rate()),
                sent.latency_ms(0.5),
                sent.latency_ms(0.99)
            );
            direct.push(&sent);
            let load = self.load(
                self.batch(),
                floor.url(RECEIVE),
                &tag_f,
                round,
                false,
                delivered,
            );
            least.push(
                &self
                    .measured_round("floor", &floor, "1 floor", round, load, &mut floor_cpu)
                    .await?,
            );
            let load = self.load(
                self.batch(),
                relay.url(RECEIVE),
                &tag,
                round,
                false,
                delivered,
            );
            through.push(
                &self
                    .measured_round("relay", &relay, "1 relay", round, load, &mut cpu)
                    .await?,
            );
            for (what, url, tag, id_header, expect, into) in [
                (
                    "direct",
                    direct_mock.url(),
                    &tag_d,
                    true,
                    to_mock,
                    &mut direct_paced,
                ),
                (
                    "relay",
                    relay.url(RECEIVE),
                    &tag,
                    false,
                    delivered,
                    &mut through_paced,
                ),
            ] {
                let sent = load::run(self.paced(url, tag, round, id_header, expect)).await;
                check_sent(what, &sent, self.paced_events)?;
                eprintln!(
                    "  round {round} {what} paced at {}/s: p50 {:.2} ms, p99 {:.2} ms (p90 {:.2} p95 {:.2} p999 {:.2})",
                    report::thousands(self.args.paced_rate),
                    sent.latency_ms(0.5),
                    sent.latency_ms(0.99),
                    sent.latency_ms(0.90),
                    sent.latency_ms(0.95),
                    sent.latency_ms(0.999)
                );
                into.push(&sent);
            }
        }
        relay.stop(Duration::from_secs(15)).await?;
        floor.stop(Duration::from_secs(15)).await?;
        check_tally("direct: downstream", direct_mock.tally())?;
        check_tally("relay: downstream", relay_mock.tally())?;
        check_tally("floor: downstream", floor_mock.tally())?;
        self.expect_counts(prefix, &[]).await?;
        let res = Resources::from_samples(&cpu, n * self.rounds);
        Ok(vec![
            Row::rate(
                "1 inline, downstream healthy",
                through.rate(),
                direct.rate(),
                "direct",
                0.40,
                self.judged(),
                Some(res),
            ),
            Row::reference(
                "1 inline, the least a forwarder does",
                through.rate(),
                least.rate(),
                FLOOR,
                direct.rate(),
                "direct",
            ),
            Row::latency(
                "1 inline, healthy: p50 / p99, saturated",
                through.latency(),
                direct.latency(),
                2.0,
                self.judged(),
            ),
            Row::latency(
                &format!(
                    "1 inline, healthy: p50 / p99 at {}/s",
                    report::thousands(self.args.paced_rate)
                ),
                through_paced.latency(),
                direct_paced.latency(),
                2.0,
                self.judged(),
            ),
        ])
    }

    /// Scenario 2: inline delivery to a downstream that fails every attempt, so every
    /// event is published to the first retry level, against the raw confirmed publisher.
    async fn inline_refusing(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        eprintln!("scenario 2: inline, downstream refusing");
        let total = self.events * self.rounds;
        let tag = format!("{prefix}r");
        // Either a port bound without listening (connections are refused, and nobody
        // else can take the port meanwhile) or the mock answering 503.
        let (mock, _refusing_socket, url) = match self.args.refuse_with {
            Refusal::Connect => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(([127, 0, 0, 1], 0).into())?;
                let url = format!("http://{}/hook", socket.local_addr()?);
                (None, Some(socket), url)
            }
            Refusal::Status503 => {
                let mock = Mock::start(StatusCode::SERVICE_UNAVAILABLE, &tag, total).await?;
                let url = mock.url();
                (Some(mock), None, url)
            }
        };
        let relay = self
            .start_relay(
                "receiver",
                prefix,
                &[("DOWNSTREAM_URL", url), ("INLINE_DELIVERY", "true".into())],
            )
            .await?;
        let (mut raw, mut through, mut cpu) = (vec![], Rounds::default(), vec![]);
        for round in 0..self.rounds {
            raw.push(
                self.raw_publisher("2 raw", prefix, round, self.batch())
                    .await?,
            );
            let expect = Expect {
                status: 202,
                word: Some("queued_for_retry"),
            };
            let load = self.load(self.batch(), relay.url(RECEIVE), &tag, round, false, expect);
            through.push(
                &self
                    .measured_round("relay", &relay, "2 relay", round, load, &mut cpu)
                    .await?,
            );
        }
        relay.stop(Duration::from_secs(15)).await?;
        if let Some(mock) = &mock {
            check_tally("relay: downstream (one attempt each)", mock.tally())?;
        }
        let level1 = Self::topology(prefix).retry[0].name.clone();
        self.expect_counts(prefix, &[(level1.as_str(), total)])
            .await?;
        let refusal = self.args.refuse_with;
        self.verify_queued(&tag, &level1, total, move |p| {
            amqp::header_u64(p, envelope::H_ATTEMPTS) == Some(1)
                && match refusal {
                    Refusal::Connect => amqp::header_text(p, envelope::H_LAST_ERROR)
                        .is_some_and(|e| e.starts_with("connection failed")),
                    Refusal::Status503 => amqp::header_u64(p, envelope::H_LAST_STATUS) == Some(503),
                }
        })
        .await?;
        Ok(vec![
            Row::rate(
                "2 inline, downstream refusing",
                through.rate(),
                median(&raw),
                "raw publisher",
                0.70,
                self.judged(),
                Some(Resources::from_samples(&cpu, total)),
            )
            .with_broker_cpu(self.broker("2 relay"), self.broker("2 raw")),
        ])
    }

    /// Scenario 3: queue-first intake (`INLINE_DELIVERY=false`) against the raw publisher.
    async fn queue_first(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        eprintln!("scenario 3: queue-first ingest");
        self.queue_first_of(prefix, 3, "3 queue-first ingest", self.batch())
            .await
    }

    /// Scenario 6: queue-first intake of large bodies against the raw publisher sending
    /// bodies of the same size; scenario 3 with fewer, larger events.
    async fn large_events(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        let batch = self.large;
        eprintln!("scenario 6: large events, {} B bodies", batch.size);
        let name = format!("6 large events, {}, queue-first", size_label(batch.size));
        self.queue_first_of(prefix, 6, &name, batch).await
    }

    /// Queue-first intake of `batch` per round, relay, raw publisher and floors
    /// alternating; then `P.work` must hold every event of every round exactly once,
    /// not yet attempted, and each floor's queue every event it took. `number` keys the
    /// scenario's broker CPU figures. Scenario 3 also runs the floor storing the
    /// relay's envelope: the least a forwarder that keeps SPEC §2 does.
    async fn queue_first_of(
        &self,
        prefix: &str,
        number: u8,
        name: &str,
        batch: Batch,
    ) -> anyhow::Result<Vec<Row>> {
        let total = batch.events * self.rounds;
        let tag = format!("{prefix}r");
        let (key_relay, key_raw) = (format!("{number} relay"), format!("{number} raw"));
        let relay = self
            .start_relay("receiver", prefix, &[("INLINE_DELIVERY", "false".into())])
            .await?;
        let channel = self.amqp.create_channel().await?;
        let mut floors = vec![Floor::new(prefix, number, false)];
        if number == 3 {
            floors.push(Floor::new(prefix, number, true));
        }
        let mut running = Vec::new();
        for f in &floors {
            // Each floor publishes to a queue like the raw publisher's.
            amqp::declare_quorum(&channel, &f.queue).await?;
            let env = [
                ("FLOOR_QUEUE", f.queue.clone()),
                ("FLOOR_ENVELOPE", f.envelope.to_string()),
            ];
            running.push((self.start_floor(&env).await?, Rounds::default(), vec![]));
        }
        let (mut raw, mut through, mut cpu) = (vec![], Rounds::default(), vec![]);
        for round in 0..self.rounds {
            raw.push(self.raw_publisher(&key_raw, prefix, round, batch).await?);
            for (f, (process, least, floor_cpu)) in floors.iter().zip(running.iter_mut()) {
                let load = self.load(batch, process.url(RECEIVE), &f.tag, round, false, QUEUED);
                least.push(
                    &self
                        .measured_round(f.label, process, &f.key, round, load, floor_cpu)
                        .await?,
                );
            }
            let load = self.load(batch, relay.url(RECEIVE), &tag, round, false, QUEUED);
            through.push(
                &self
                    .measured_round("relay", &relay, &key_relay, round, load, &mut cpu)
                    .await?,
            );
        }
        relay.stop(Duration::from_secs(15)).await?;
        let mut leasts = Vec::new();
        for (process, least, _) in running {
            process.stop(Duration::from_secs(15)).await?;
            leasts.push(least);
        }
        let work = Self::topology(prefix).work;
        self.expect_counts(prefix, &[(work.as_str(), total)])
            .await?;
        let not_attempted =
            |p: &BasicProperties| amqp::header_u64(p, envelope::H_ATTEMPTS) == Some(0);
        self.verify_queued(&tag, &work, total, not_attempted)
            .await?;
        for f in &floors {
            // The enveloped floor's messages must carry the envelope, as the relay's do.
            self.verify_queued(&f.tag, &f.queue, total, |p| !f.envelope || not_attempted(p))
                .await?;
            amqp::delete_queue(&channel, &f.queue).await?;
        }
        let _ = channel.close(200, "floor checked".into()).await;
        let short = name.split(',').next().unwrap_or(name);
        let mut rows = vec![
            Row::rate(
                name,
                through.rate(),
                median(&raw),
                "raw publisher",
                0.80,
                self.judged(),
                Some(Resources::from_samples(&cpu, total)),
            )
            .with_broker_cpu(self.broker(&key_relay), self.broker(&key_raw)),
        ];
        for (f, least) in floors.iter().zip(&leasts) {
            rows.push(
                Row::reference(
                    &format!("{short}, {}", f.scenario),
                    through.rate(),
                    least.rate(),
                    f.what,
                    median(&raw),
                    "raw publisher",
                )
                .with_broker_cpu(self.broker(&key_relay), self.broker(&f.key)),
            );
        }
        Ok(rows)
    }

    /// The raw lapin publisher: persistent, mandatory, confirmed publishes of `batch`'s
    /// bodies to a quorum queue with the load generator's in-flight window. Events/s.
    async fn raw_publisher(
        &self,
        key: &str,
        prefix: &str,
        round: usize,
        batch: Batch,
    ) -> anyhow::Result<f64> {
        let n = batch.events;
        let queue = format!("{prefix}.bench-raw");
        let channel = self.amqp.create_channel().await?;
        amqp::declare_quorum(&channel, &queue).await?;
        let (tag, size) = (format!("{prefix}p{round}"), batch.size);
        let watch = CpuWatch::start();
        let elapsed =
            amqp::publish_confirmed(&self.amqp, "", &queue, n, self.args.connections, move |i| {
                let id = event_id(&tag, i);
                (load::event_body(&id, size), amqp::raw_properties(&id))
            })
            .await?;
        let seen = watch.finish(n);
        self.note_broker(key, &seen);
        let held = amqp::settled_count(&channel, &queue, n as u32, SETTLE).await?;
        amqp::delete_queue(&channel, &queue).await?;
        let _ = channel.close(200, "raw publisher done".into()).await;
        ensure!(
            held as usize == n,
            "raw publisher: queue holds {held}, expected {n}"
        );
        let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
        eprintln!(
            "  round {round} raw publisher: {}/s; {seen}",
            report::thousands(rate)
        );
        Ok(rate)
    }

    /// Scenario 4: worker drain of a pre-filled `P.work` with one and with three
    /// worker processes, against the raw consumer acking the same queue.
    async fn drain(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        eprintln!("scenario 4: worker drain");
        let topology = Self::topology(prefix);
        let channel = self.amqp.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        let (mut raw, mut one, mut three) = (vec![], vec![], vec![]);
        let (mut one_cpu, mut three_cpu) = (vec![], vec![]);
        for round in 0..self.rounds {
            raw.push(self.raw_consumer(prefix, &topology, round).await?);
            one.push(
                self.drain_with(prefix, &topology, round, 1, &mut one_cpu)
                    .await?,
            );
            three.push(
                self.drain_with(prefix, &topology, round, 3, &mut three_cpu)
                    .await?,
            );
        }
        let total = self.drain_events * self.rounds;
        let one = median(&one);
        Ok(vec![
            Row::rate(
                "4 worker drain, 1 worker",
                one,
                median(&raw),
                "raw consumer",
                0.80,
                self.judged(),
                Some(Resources::from_samples(&one_cpu, total)),
            )
            .with_broker_cpu(self.broker("4 w1"), self.broker("4 raw")),
            Row::rate(
                "4 worker drain, 3 workers",
                median(&three),
                one,
                "1 worker",
                1.00,
                self.judged(),
                Some(Resources::from_samples(&three_cpu, total)),
            )
            .with_broker_cpu(self.broker("4 w3"), self.broker("4 w1")),
        ])
    }

    /// The physical limit of a drain: a raw lapin consumer with the workers' prefetch,
    /// delivering and acking, nothing else. Events/s.
    async fn raw_consumer(
        &self,
        prefix: &str,
        topology: &Topology,
        round: usize,
    ) -> anyhow::Result<f64> {
        let n = self.drain_events;
        let tag = format!("{prefix}c{round}");
        self.prefill(topology, &tag).await?;
        let tally = Tally::new(&tag, n);
        let watch = CpuWatch::start();
        let (elapsed, _) = amqp::consume_acking(
            &self.amqp,
            &topology.work,
            self.args.connections as u16,
            n,
            &tally,
            Duration::from_secs(10),
            |_| true,
        )
        .await?;
        let seen = watch.finish(n);
        self.note_broker("4 raw", &seen);
        check_tally("raw consumer", &tally)?;
        self.expect_counts(prefix, &[]).await?;
        let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
        eprintln!(
            "  round {round} raw consumer: {}/s; {seen}",
            report::thousands(rate)
        );
        Ok(rate)
    }

    /// Pre-fills `P.work` with `drain_events` events as the receiver would have queued
    /// them (the relay's own envelope), then checks the queue holds them all.
    async fn prefill(&self, topology: &Topology, tag: &str) -> anyhow::Result<()> {
        self.prefill_n(topology, tag, self.drain_events).await
    }

    /// [`Bench::prefill`] with `n` events.
    async fn prefill_n(&self, topology: &Topology, tag: &str, n: usize) -> anyhow::Result<()> {
        let (tag, size) = (tag.to_owned(), self.args.size);
        amqp::publish_confirmed(
            &self.amqp,
            &topology.work,
            &topology.work,
            n,
            256, // as fast as the broker takes them; not measured
            move |i| {
                let id = event_id(&tag, i);
                let body = load::event_body(&id, size);
                let event = Envelope::received(
                    id,
                    "bench".into(),
                    Some("application/json"),
                    vec![
                        ("content-type".into(), b"application/json".to_vec()),
                        ("user-agent".into(), b"relay-bench".to_vec()),
                    ],
                    Bytes::from(body),
                );
                let properties = event.properties();
                (event.body.to_vec(), properties)
            },
        )
        .await?;
        let channel = self.amqp.create_channel().await?;
        let held = amqp::settled_count(&channel, &topology.work, n as u32, SETTLE).await?;
        let _ = channel.close(200, "counted".into()).await;
        ensure!(
            held as usize == n,
            "pre-fill: work holds {held}, expected {n}"
        );
        Ok(())
    }

    /// Pre-fills `P.work`, lets `workers` worker processes drain it into a healthy mock
    /// downstream, stops them gracefully, and checks every event arrived exactly once and
    /// nothing is left. Returns events/s from the first to the last downstream request.
    async fn drain_with(
        &self,
        prefix: &str,
        topology: &Topology,
        round: usize,
        workers: usize,
        cpu: &mut Vec<(Usage, Usage)>,
    ) -> anyhow::Result<f64> {
        let n = self.drain_events;
        let tag = format!("{prefix}w{workers}r{round}");
        self.prefill(topology, &tag).await?;
        let mock = Mock::start(StatusCode::OK, &tag, n).await?;
        let watch = CpuWatch::start();
        let mut procs = Vec::with_capacity(workers);
        for _ in 0..workers {
            procs.push(
                self.start_relay("worker", prefix, &[("DOWNSTREAM_URL", mock.url())])
                    .await?,
            );
        }
        // Consuming starts as soon as a worker connects, so CPU counts from its start.
        let deadline = Instant::now() + self.deadline();
        while (mock.tally().total() as usize) < n {
            if Instant::now() > deadline {
                bail!(
                    "{workers} worker(s): {} of {n} delivered within {:?}:\n{}",
                    mock.tally().total(),
                    self.deadline(),
                    procs[0].log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let span = mock.active_span().unwrap_or_default();
        let seen = watch.finish(n);
        self.note_broker(&format!("4 w{workers}"), &seen);
        for p in &procs {
            cpu.push((Usage::default(), p.sample()?));
        }
        for p in procs {
            p.stop(Duration::from_secs(15)).await?;
        }
        check_tally(&format!("{workers} worker(s): downstream"), mock.tally())?;
        self.expect_counts(prefix, &[]).await?;
        let rate = n as f64 / span.as_secs_f64().max(1e-9);
        eprintln!(
            "  round {round} {workers} worker(s): {}/s; {seen}",
            report::thousands(rate)
        );
        Ok(rate)
    }

    /// Scenario 5: a downstream that serves 4 requests at a time (50 ms each, so 80/s at
    /// most) and answers 503 past that, draining a pre-filled `P.work` with one worker
    /// process, adaptive concurrency against a fixed WORKER_CONCURRENCY in the same run.
    /// Retries run on a short ladder, as they would in production, so refusals cost
    /// attempts and events exhausting theirs reach the DLQ.
    async fn capacity(&self, prefix: &str) -> anyhow::Result<Vec<Row>> {
        eprintln!("scenario 5: downstream capacity 4");
        let topology = &Self::capacity_topology(prefix);
        let channel = self.amqp.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        let mut cpu = vec![];
        let adaptive = self
            .capacity_drain(prefix, topology, true, &mut cpu)
            .await?;
        let fixed = self
            .capacity_drain(prefix, topology, false, &mut Vec::new())
            .await?;
        Ok(vec![Row::capacity(
            "5 downstream capacity 4, adaptive vs fixed",
            adaptive,
            fixed,
            80.0,
            0.80,
            0.10,
            self.judged(),
            Some(Resources::from_samples(&cpu, self.capacity_events)),
        )])
    }

    /// Scenario 5's topology: its own, shorter ladder.
    fn capacity_topology(prefix: &str) -> Topology {
        let ladder = Ladder::new(
            Duration::from_millis(CAPACITY_BACKOFF_BASE_MS),
            Duration::from_millis(CAPACITY_BACKOFF_MAX_MS),
        );
        Topology::new(prefix, &ladder)
    }

    /// One drain against the capacity-4 downstream; (delivered events/s, share of
    /// attempts answered 503, share of the events delivered rather than dead-lettered).
    async fn capacity_drain(
        &self,
        prefix: &str,
        topology: &Topology,
        adaptive: bool,
        cpu: &mut Vec<(Usage, Usage)>,
    ) -> anyhow::Result<(f64, f64, f64)> {
        let n = self.capacity_events;
        let mode = if adaptive { "adaptive" } else { "fixed" };
        let tag = format!("{prefix}{mode}");
        self.prefill_n(topology, &tag, n).await?;
        let mock = Mock::with_capacity(4, Duration::from_millis(50), &tag, n).await?;
        let relay = self
            .start_relay(
                "worker",
                prefix,
                &[
                    ("DOWNSTREAM_URL", mock.url()),
                    ("ADAPTIVE_CONCURRENCY", adaptive.to_string()),
                    ("BACKOFF_BASE_MS", CAPACITY_BACKOFF_BASE_MS.to_string()),
                    ("BACKOFF_MAX_MS", CAPACITY_BACKOFF_MAX_MS.to_string()),
                ],
            )
            .await?;
        let channel = self.amqp.create_channel().await?;
        let deadline = Instant::now() + self.deadline();
        let dead = loop {
            let dead = amqp::ready_count(&channel, &topology.dlq).await? as usize;
            if mock.tally().total() as usize + dead >= n {
                break dead;
            }
            if Instant::now() > deadline {
                bail!(
                    "{mode}: {} delivered and {dead} dead-lettered of {n} within {:?}:\n{}",
                    mock.tally().total(),
                    self.deadline(),
                    relay.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let limit = self.gauge(&relay, "webhook_relay_concurrency_limit").await;
        cpu.push((Usage::default(), relay.sample()?));
        relay.stop(Duration::from_secs(15)).await?;
        let delivered = mock.tally().total() as usize;
        let m = mock.tally().mismatch();
        ensure!(
            m.duplicates == 0 && m.foreign == 0 && delivered + dead == n,
            "{mode}: {delivered} delivered + {dead} dead-lettered of {n} ({m})"
        );
        // Every event delivered once or in the DLQ, nothing left anywhere else.
        for q in topology.queues() {
            let want = if q.name == topology.dlq {
                dead as u32
            } else {
                0
            };
            let held = amqp::settled_count(&channel, &q.name, want, SETTLE).await?;
            ensure!(
                held == want,
                "{mode}: {} holds {held}, expected {want}",
                q.name
            );
        }
        // The next mode starts from an empty DLQ.
        channel
            .queue_purge(
                topology.dlq.as_str().into(),
                lapin::options::QueuePurgeOptions { nowait: false },
            )
            .await?;
        let _ = channel.close(200, "counted".into()).await;
        let span = mock.active_span().unwrap_or_default();
        let rate = delivered as f64 / span.as_secs_f64().max(1e-9);
        let (answered, refused) = mock.answered();
        let share = refused as f64 / answered.max(1) as f64;
        eprintln!(
            "  {mode}: {rate:.1} delivered/s, {:.1}% of {answered} attempts 503, {dead} dead-lettered, \
             concurrency limit at the end {limit}",
            share * 100.0
        );
        Ok((rate, share, delivered as f64 / n as f64))
    }

    /// A gauge's value from a relay's `/metrics` (`?` when absent).
    async fn gauge(&self, relay: &RelayProcess, name: &str) -> String {
        let text = match self.http.get(relay.url("/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    }

    /// Checks every queue of `prefix`'s topology holds what `expected` says (by name),
    /// and every other queue nothing.
    async fn expect_counts(&self, prefix: &str, expected: &[(&str, usize)]) -> anyhow::Result<()> {
        let channel = self.amqp.create_channel().await?;
        let mut wrong = Vec::new();
        for q in Self::topology(prefix).queues() {
            let want = expected
                .iter()
                .find(|(name, _)| *name == q.name)
                .map_or(0, |(_, c)| *c);
            let held = amqp::settled_count(&channel, &q.name, want as u32, SETTLE).await? as usize;
            if held != want {
                wrong.push(format!("{} holds {held}, expected {want}", q.name));
            }
        }
        let _ = channel.close(200, "counted".into()).await;
        ensure!(wrong.is_empty(), "queue counts: {}", wrong.join("; "));
        Ok(())
    }

    /// Reads `queue` back: events `0..total` of `tag` (all rounds) exactly once, each
    /// one passing `check`.
    ///
    /// The queue is not checked for emptiness afterwards: a quorum queue may ignore
    /// acks sent just before their channel closes and return those messages
    /// (rabbitmq-server#10327; seen here reading back 64 KB events), which says
    /// nothing about the relay.
    async fn verify_queued(
        &self,
        tag: &str,
        queue: &str,
        total: usize,
        check: impl Fn(&BasicProperties) -> bool,
    ) -> anyhow::Result<()> {
        let tally = Tally::new(tag, total);
        let (_, refused) = amqp::consume_acking(
            &self.amqp,
            queue,
            1000,
            total,
            &tally,
            Duration::from_secs(5),
            check,
        )
        .await?;
        check_tally(&format!("{queue} read back"), &tally)?;
        ensure!(
            refused == 0,
            "{queue}: {refused} messages without the expected attempt headers"
        );
        Ok(())
    }

    /// Deletes everything the scenario declared (the relay's topology on either ladder,
    /// the raw baseline's and the floors' queues), whatever state the scenario ended
    /// in, an interrupted one included. On a connection of its own: the run's may be
    /// closing after an interruption (a publish dropped half-written breaks it).
    /// Says what it could not delete.
    async fn teardown(&self, prefix: &str) {
        let topology = Self::topology(prefix);
        let mut names: Vec<String> = topology
            .queues()
            .into_iter()
            .chain(Self::capacity_topology(prefix).queues())
            .map(|q| q.name)
            .collect();
        names.sort();
        names.dedup();
        names.push(format!("{prefix}.bench-raw"));
        names.push(Floor::queue(prefix, false));
        names.push(Floor::queue(prefix, true));
        let connection = match amqp::connect(&self.args.amqp_url).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("relay-bench: {prefix}.* not deleted: {e:#}");
                return;
            }
        };
        let mut failed = Vec::new();
        for name in names {
            // A fresh channel each time: a failed delete closes its channel.
            let deleted = async {
                let ch = connection.create_channel().await?;
                amqp::delete_queue(&ch, &name).await?;
                let _ = ch.close(200, "teardown".into()).await;
                anyhow::Ok(())
            };
            if let Err(e) = deleted.await {
                failed.push(format!("queue {name} ({e:#})"));
            }
        }
        let deleted = async {
            let ch = connection.create_channel().await?;
            let options = lapin::options::ExchangeDeleteOptions {
                if_unused: false,
                nowait: false,
            };
            ch.exchange_delete(topology.work.as_str().into(), options)
                .await?;
            let _ = ch.close(200, "teardown".into()).await;
            anyhow::Ok(())
        };
        if let Err(e) = deleted.await {
            failed.push(format!("exchange {} ({e:#})", topology.work));
        }
        let _ = connection.close(200, "teardown".into()).await;
        if !failed.is_empty() {
            eprintln!("relay-bench: not deleted: {}", failed.join(", "));
        }
    }
}

/// What the receiver answers an event it queued for the workers.
const QUEUED: Expect = Expect {
    status: 202,
    word: Some("queued"),
};

/// `65536` as `64 KB`, other sizes in bytes.
fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn check_sent(what: &str, sent: &Sent, n: usize) -> anyhow::Result<()> {
    ensure!(
        sent.ok == n && sent.wrong == 0,
        "{what}: {} of {n} answered as expected, {} wrong; first: {:?}",
        sent.ok,
        sent.wrong,
        sent.samples
    );
    Ok(())
}

fn check_tally(what: &str, tally: &Tally) -> anyhow::Result<()> {
    let m = tally.mismatch();
    ensure!(m.is_exact(), "{what}: {m}");
    Ok(())
}
