//! Fault-test support: a throwaway RabbitMQ node (never the shared one), the relay
//! as a real child process, and a sender that behaves like Genesys (retries 503s).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use webhook_relay::broker::Topology;
use webhook_relay::retry::Ladder;

use crate::common::Inspector;

/// Fault tests start brokers and processes: run them one at a time on a 2-core box.
/// (An async lock: each test has its own runtime and holds it across awaits.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A free loopback TCP port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A RabbitMQ command for the throwaway nodes: from `TEST_RABBITMQ_BIN_DIR` when set
/// (another broker version, e.g. RabbitMQ 4 beside a system 3.10), else from PATH.
fn rabbit(tool: &str) -> Command {
    match std::env::var_os("TEST_RABBITMQ_BIN_DIR") {
        Some(dir) if !dir.is_empty() => Command::new(PathBuf::from(dir).join(tool)),
        _ => Command::new(tool),
    }
}

fn run(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A RabbitMQ node of the test's own: own name, ports, data and log dirs. Stopped
/// and removed on drop, also when the test fails.
pub struct Node {
    name: String,
    dir: PathBuf,
    pub port: u16,
}

impl Node {
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// A blank node that imports `definitions` (RabbitMQ definitions JSON) at boot,
    /// as the compose broker does with `load_definitions`.
    pub fn start_with_definitions(definitions: &str) -> Self {
        Self::launch(Some(definitions))
    }

    fn launch(definitions: Option<&str>) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let installed = match std::env::var_os("TEST_RABBITMQ_BIN_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("rabbitmq-server").exists(),
            _ => run(Command::new("sh")
                .args(["-c", "command -v rabbitmq-server && command -v rabbitmqctl"])),
        };
        assert!(
            installed,
            "fault tests need a local rabbitmq-server installation (they start throwaway nodes; TEST_RABBITMQ_BIN_DIR picks another)"
        );
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("relay-fault-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The plugin-less file: the shared node's management plugin owns port 15672.
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let port = free_port();
        let dist = free_port();
        // Its own config file: the machine's may pin listeners to the shared node's port.
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\n");
        if let Some(json) = definitions {
            std::fs::write(dir.join("definitions.json"), json).unwrap();
            conf.push_str(&format!(
                "load_definitions = {}\n",
                dir.join("definitions.json").display()
            ));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        // The Debian wrapper runs the node as user `rabbitmq`; it must own its dirs (or,
        // for a node of another installation whose `rabbitmq` user has another id, be
        // able to write them).
        run(Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir));
        run(Command::new("chmod").args(["-R", "a+rwX"]).arg(&dir));
        let name = format!("relayfault-{}-{n}@localhost", std::process::id());
        let started = rabbit("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server runs");
        assert!(started.success(), "rabbitmq-server -detached failed");
        let node = Self { name, dir, port };
        node.await_startup();
        node
    }

    fn ctl(&self, args: &[&str]) -> bool {
        run(rabbit("rabbitmqctl")
            .args(["-n", &self.name, "-q"])
            .args(args))
    }

    /// `rabbitmqctl` with its output, asserting success.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let out = rabbit("rabbitmqctl")
            .args(["-n", &self.name, "-q"])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Raises a disk alarm (a free-disk limit no disk meets): the broker blocks every
    /// publishing connection until [`Node::clear_alarm`].
    pub fn raise_disk_alarm(&self) {
        assert!(
            self.ctl(&["set_disk_free_limit", "1000000GB"]),
            "set_disk_free_limit"
        );
    }

    /// Restores a free-disk limit the machine meets; the alarm clears.
    pub fn clear_alarm(&self) {
        assert!(
            self.ctl(&["set_disk_free_limit", "1MB"]),
            "set_disk_free_limit"
        );
    }

    /// A policy on the queues matching `pattern`.
    pub fn set_policy(&self, name: &str, pattern: &str, definition: &str) {
        assert!(
            self.ctl(&[
                "set_policy",
                name,
                pattern,
                definition,
                "--apply-to",
                "queues"
            ]),
            "set_policy {name}"
        );
    }

    pub fn clear_policy(&self, name: &str) {
        assert!(self.ctl(&["clear_policy", name]), "clear_policy {name}");
    }

    /// Closes every client connection, as a broker-side flap does.
    pub fn close_all_connections(&self) {
        assert!(
            self.ctl(&["close_all_connections", "fault test flap"]),
            "close_all_connections"
        );
    }

    /// The node's OS process id.
    pub fn os_pid(&self) -> u32 {
        let out = self.ctl_output(&["eval", "os:getpid()."]);
        out.trim().trim_matches('"').parse().expect("a pid")
    }

    /// Freezes the node's process (SIGSTOP): its port still accepts TCP connections
    /// but nothing answers, like a half-open connection. Resumed on drop.
    pub fn freeze(&self) -> Frozen {
        let pid = self.os_pid();
        assert!(run(Command::new("kill").args(["-STOP", &pid.to_string()])));
        Frozen { pid }
    }

    fn await_startup(&self) {
        // Fails at once until the node registers: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctl(&["await_startup", "--timeout", "30"]) {
            assert!(
                Instant::now() < deadline,
                "throwaway node {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The broker goes away: connections are closed, nothing is accepted.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "stop_app");
    }

    /// The broker comes back; durable queues and persistent messages survive.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "start_app");
        self.await_startup();
    }
}

/// A cluster of throwaway nodes on this machine (separate names, ports and data
/// dirs), joined with `rabbitmqctl join_cluster`; every node is stopped on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub fn start(size: usize) -> Self {
        let nodes: Vec<Node> = (0..size).map(|_| Node::start()).collect();
        for node in &nodes[1..] {
            node.stop_app();
            assert!(
                node.ctl(&["join_cluster", &nodes[0].name]),
                "{} joins {}",
                node.name,
                nodes[0].name
            );
            node.start_app();
        }
        Self { nodes }
    }

    /// `AMQP_URL` listing every node, comma-separated.
    pub fn amqp_url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node whose AMQP port is `port`.
    pub fn by_port(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }
}

/// A frozen node's process; resumed (SIGCONT) when dropped, also when a test fails.
pub struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        run(Command::new("kill").args(["-CONT", &self.pid.to_string()]));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay binary the fault tests run: `RELAY_BIN` when set (CI points it at the
/// release build it ships, whose speed the burst figures describe), else the test
/// profile's build.
pub fn relay_binary() -> PathBuf {
    match std::env::var_os("RELAY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_webhook-relay")),
    }
}

/// The relay binary running as a child process.
pub struct Relay {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Relay {
    /// Spawns `webhook-relay <command>` with `env` (LISTEN_ADDR is chosen here).
    pub fn spawn<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
        command: &str,
        env: &[(K, V)],
    ) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "relay-fault-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(relay_binary());
        cmd.arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("relay binary spawns");
        Self { child, port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(self.is_running(), "relay exited early:\n{}", self.logs());
            assert!(
                Instant::now() < deadline,
                "relay not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        run(Command::new("kill").args([sig, &self.pid().to_string()]));
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the exit code.
    pub async fn terminate(mut self, within: Duration) -> Option<i32> {
        self.signal("-TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What a sender saw: ids accepted with 2xx, and how many 503s it had to retry.
#[derive(Debug, Default)]
pub struct Sent {
    pub accepted: Vec<String>,
    pub unavailable: usize,
}

/// Sends `ids` to `url` with `concurrency` requests in flight, each retried (like a
/// webhook sender) on 503 or a refused connection until it gets a 2xx. Each sender
/// pauses `pace` after an accepted event, to stretch the flow over time.
pub async fn send_all(
    http: &reqwest::Client,
    url: &str,
    ids: Vec<String>,
    concurrency: usize,
    pace: Duration,
    accepted_counter: Arc<AtomicUsize>,
) -> Sent {
    use futures_util::StreamExt;
    let unavailable = Arc::new(AtomicUsize::new(0));
    let accepted: Vec<String> = futures_util::stream::iter(ids)
        .map(|id| {
            let http = http.clone();
            let url = url.to_owned();
            let unavailable = unavailable.clone();
            let counter = accepted_counter.clone();
            async move {
                let body = format!(
                    r#"{{"id":"{id}","detail":{{"pad":"{}"}}}}"#,
                    "x".repeat(200)
                );
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            counter.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(pace).await;
                            return id;
                        }
                        Ok(r) if r.status() == 503 => {
                            assert!(
                                r.headers().contains_key("retry-after"),
                                "503 carries Retry-After"
                            );
                            unavailable.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => panic!("unexpected answer {} for {id}", r.status()),
                        Err(_) => {}
                    }
                    assert!(Instant::now() < deadline, "{id} never accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    Sent {
        accepted,
        unavailable: unavailable.load(Ordering::SeqCst),
    }
}

/// The shared broker (`AMQP_URL`), for fault tests that break processes, not the broker.
pub fn shared_amqp() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| webhook_relay::config::DEFAULT_AMQP_URL.into())
}

/// The environment of a queue-first relay on `amqp` with millisecond backoff
/// (20 ms base, 200 ms cap), plus `extra`.
pub fn queue_first_env(
    amqp: &str,
    downstream: &str,
    prefix: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    // Later entries win when the child's environment is set, so `extra` overrides.
    [
        ("AMQP_URL", amqp),
        ("DOWNSTREAM_URL", downstream),
        ("QUEUE_PREFIX", prefix),
        ("INLINE_DELIVERY", "false"),
        ("BACKOFF_BASE_MS", "20"),
        ("BACKOFF_MAX_MS", "200"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// The relay's topology for `prefix` and a backoff of `base_ms`..`max_ms`.
pub fn topology(prefix: &str, base_ms: u64, max_ms: u64) -> Topology {
    Topology::new(
        prefix,
        &Ladder::new(
            Duration::from_millis(base_ms),
            Duration::from_millis(max_ms),
        ),
    )
}

/// Messages in each of the topology's queues on the broker at `amqp_url`.
pub async fn queue_counts(amqp_url: &str, topology: &Topology) -> HashMap<String, u32> {
    let inspect = Inspector::connect_to(amqp_url).await;
    let counts = inspect.counts(topology).await;
    inspect.close().await;
    counts
}

/// Deletes the topology on the broker at `amqp_url`.
pub async fn delete_topology(amqp_url: &str, topology: &Topology) {
    let inspect = Inspector::connect_to(amqp_url).await;
    let _ = topology.delete(inspect.channel()).await;
    inspect.close().await;
}

/// Prints the figures a fault test reports (visible with `--nocapture`, and in CI logs
/// of a failing run).
pub fn report(
    test: &str,
    sent: usize,
    delivered: &HashMap<String, usize>,
    accepted: &[String],
) -> (usize, usize) {
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    let lost = accepted
        .iter()
        .filter(|id| !delivered.contains_key(*id))
        .count();
    println!(
        "{test}: sent {sent}, accepted {}, delivered {} distinct, duplicates {duplicates}, lost {lost}",
        accepted.len(),
        delivered.len()
    );
    (duplicates, lost)
}
