//! The relay under test as a child process (the built `webhook-relay` binary), and
//! what /proc says about it: peak resident memory and CPU time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running relay process; killed on drop if still alive.
pub struct RelayProcess {
    /// The child.
    child: Child,
    /// Its HTTP port on loopback (receiver endpoints or health only).
    pub port: u16,
    /// Its log (stderr), kept until drop so a failure can show it.
    log: PathBuf,
}

impl RelayProcess {
    /// Starts `binary <role>` with exactly `env` (plus PATH and LISTEN_ADDR).
    pub fn spawn(binary: &Path, role: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!(
            "relay-bench-{}-{role}-{port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.arg(role)
            // Only what the scenario sets: no stray .env or RUST_LOG changes the figures.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, port, log })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A URL on the relay.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `/readyz` answers 200 (broker connected, topology declared).
    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("relay exited early ({status}):\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("relay not ready within 30 s:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What /proc says now.
    pub fn sample(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid())
    }

    /// SIGTERM (graceful: in-flight work finishes and is acked), then waits for exit.
    pub async fn stop(mut self, within: Duration) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("relay exited with {status}:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("relay did not stop within {within:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Resource use of a process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss: u64,
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
}

impl Usage {
    /// Reads /proc/<pid>/status and /proc/<pid>/stat.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let peak_rss = vm_hwm_bytes(&status).context("VmHWM in /proc/<pid>/status")?;
        let ticks = cpu_ticks(&stat).context("utime/stime in /proc/<pid>/stat")?;
        Ok(Self {
            peak_rss,
            cpu_secs: ticks as f64 / clock_ticks_per_sec() as f64,
        })
    }
}

/// VmHWM (peak RSS) from the text of /proc/<pid>/status, in bytes.
pub fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime (fields 14 and 15) from the text of /proc/<pid>/stat, in clock ticks.
/// Fields are counted after the command name, which may itself hold spaces.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field k is at index k - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's USER_HZ (`getconf CLK_TCK`), 100 on every mainstream Linux.
fn clock_ticks_per_sec() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

/// Who used the CPU during one measured phase, to say what limits a figure: the
/// machine as a whole, the broker (when it runs here) and this benchmark process.
pub struct CpuWatch {
    /// Busy and total jiffies of the machine at the start (/proc/stat).
    machine: Option<(u64, u64)>,
    /// The local broker's process id and CPU ticks at the start.
    broker: Option<(u32, u64)>,
    /// This process's CPU ticks at the start.
    own: Option<u64>,
}

/// What a `CpuWatch` saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSeen {
    /// Share of the machine's CPU time that was busy (all processes), 0..1.
    pub machine_busy: Option<f64>,
    /// Broker CPU seconds per 10,000 events.
    pub broker_per_10k: Option<f64>,
    /// This process's (load generator, mock, baselines) CPU seconds per 10,000 events.
    pub bench_per_10k: Option<f64>,
}

impl std::fmt::Display for CpuSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{:.0}%", v * 100.0));
        let secs = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        write!(
            f,
            "machine CPU busy {}, CPU s/10k: broker {}, bench {}",
            pct(self.machine_busy),
            secs(self.broker_per_10k),
            secs(self.bench_per_10k)
        )
    }
}

impl CpuWatch {
    /// Starts watching.
    pub fn start() -> Self {
        let broker = broker_pid().and_then(|pid| Some((pid, ticks_of(pid)?)));
        Self {
            machine: machine_jiffies(),
            broker,
            own: ticks_of(std::process::id()),
        }
    }

    /// What was used since `start`, per `events` handled.
    pub fn finish(&self, events: usize) -> CpuSeen {
        let hz = clock_ticks_per_sec() as f64;
        let per_10k = |ticks: u64| ticks as f64 / hz / events.max(1) as f64 * 10_000.0;
        CpuSeen {
            machine_busy: self
                .machine
                .zip(machine_jiffies())
                .map(|((b0, t0), (b1, t1))| {
                    (b1.saturating_sub(b0)) as f64 / (t1.saturating_sub(t0)).max(1) as f64
                }),
            broker_per_10k: self
                .broker
                .and_then(|(pid, t0)| Some(per_10k(ticks_of(pid)?.saturating_sub(t0)))),
            bench_per_10k: self
                .own
                .zip(ticks_of(std::process::id()))
                .map(|(t0, t1)| per_10k(t1.saturating_sub(t0))),
        }
    }
}

fn ticks_of(pid: u32) -> Option<u64> {
    cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The local RabbitMQ node's process (Erlang's `beam.smp`), when exactly one runs here.
fn broker_pid() -> Option<u32> {
    let mut found = std::fs::read_dir("/proc").ok()?.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    cpu_line_jiffies(stat.lines().next()?)
}

/// Busy (everything but idle and iowait) and total jiffies of a `cpu ...` line.
pub fn cpu_line_jiffies(line: &str) -> Option<(u64, u64)> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let v: Vec<u64> = parts
        .take(8)
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peak_rss_from_status() {
        let status = "Name:\twebhook-relay\nVmPeak:\t  300000 kB\nVmHWM:\t   18432 kB\nVmRSS:\t   17000 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(18432 * 1024));
        assert_eq!(vm_hwm_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn reads_cpu_ticks_even_with_spaces_in_the_name() {
        let stat =
            "4242 (web hook) S 1 4242 4242 0 -1 4194304 500 0 0 0 123 45 0 0 20 0 4 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(168));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_machine_busy_and_total_jiffies() {
        let line = "cpu  100 5 50 800 40 0 5 0 0 0";
        assert_eq!(cpu_line_jiffies(line), Some((160, 1000)));
        assert_eq!(cpu_line_jiffies("cpu0 1 2 3 4 5 6 7 8"), None);
    }

    #[test]
    fn this_process_has_a_readable_usage() {
        let u = Usage::of(std::process::id()).unwrap();
        assert!(u.peak_rss > 0);
        assert!(u.cpu_secs >= 0.0);
    }
}
