//! The built binary as an operator runs it: one-shot commands (`dlq ...`) and a
//! long-running relay whose JSON log lines are captured. A separate process also
//! gives a metrics registry of its own, so counters hold exactly what one test did.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use webhook_relay::broker::Topology;
use webhook_relay::retry::Ladder;

use super::{delete_topology_blocking, eventually, test_vars};

/// What a one-shot command printed, and how it exited.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Stdout lines parsed as JSON (every line must parse).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect()
    }
}

fn command(prefix: &str, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_webhook-relay"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in test_vars(prefix) {
        if k != "LISTEN_ADDR" {
            cmd.env(k, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `webhook-relay <args>` to completion with the test settings for `prefix`.
pub async fn run_cli(prefix: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let out = command(prefix, args, env)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the binary runs");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A relay running as its own process with `LOG_FORMAT=json`, stderr captured.
pub struct RelayProcess {
    pub addr: SocketAddr,
    pub prefix: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts `webhook-relay <command>` and waits until it is ready.
    pub async fn start(prefix: &str, command_name: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-relay"));
        cmd.arg(command_name)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in test_vars(prefix) {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the relay starts");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut process = Self {
            addr: "0.0.0.0:0".parse().unwrap(),
            prefix: prefix.to_owned(),
            child,
            lines,
        };
        eventually(
            Duration::from_secs(15),
            "the relay logs its address",
            || {
                let found = process.lines().iter().find_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).ok()?;
                    (v["message"] == "webhook-relay started")
                        .then(|| v["addr"].as_str().map(str::to_owned))?
                });
                if let Some(a) = found {
                    process.addr = a.parse().unwrap();
                }
                let ok = process.addr.port() != 0;
                async move { ok }
            },
        )
        .await;
        let http = reqwest::Client::new();
        let ready = process.url("/readyz");
        eventually(Duration::from_secs(15), "the relay is ready", || {
            let http = http.clone();
            let ready = ready.clone();
            async move {
                http.get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The topology this process declared (the test ladder of `test_vars`).
    pub fn topology(&self) -> Topology {
        Topology::new(
            &self.prefix,
            &Ladder::new(Duration::from_millis(20), Duration::from_millis(200)),
        )
    }

    /// Stops the process (it is ours: started by this test) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
        delete_topology_blocking(self.topology());
    }
}
