//! Shared test harness: a relay started in-process on port 0 with its own
//! `QUEUE_PREFIX` against the real RabbitMQ, torn down (queues deleted) on drop.

#![allow(dead_code)]

pub mod downstream;
pub mod process;
pub mod raw_http;
pub mod seed;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use webhook_relay::app::{App, Role};
use webhook_relay::broker::Topology;
use webhook_relay::config::Config;
use webhook_relay::relay::Relay;

/// The broker the suite runs against (`AMQP_URL`, else the local default).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| webhook_relay::config::DEFAULT_AMQP_URL.into())
}

/// A queue prefix no other test (or run) uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "test-{}-{}-{}-{}",
        name,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        webhook_relay::envelope::now_ms() % 1_000_000
    )
}

/// Test defaults: millisecond backoff (ladder 40, 80, 160, 200 ms), short grace.
pub fn test_vars(prefix: &str) -> Vec<(String, String)> {
    [
        ("AMQP_URL", amqp_url()),
        ("QUEUE_PREFIX", prefix.to_owned()),
        ("LISTEN_ADDR", "127.0.0.1:0".into()),
        ("BACKOFF_BASE_MS", "20".into()),
        ("BACKOFF_MAX_MS", "200".into()),
        ("DELIVERY_TIMEOUT_MS", "2000".into()),
        ("SHUTDOWN_GRACE_MS", "3000".into()),
        ("PUBLISH_TIMEOUT_MS", "3000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Builds a configuration from the test defaults overridden by `overrides`.
pub fn config(prefix: &str, overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = test_vars(prefix).into_iter().collect();
    for (k, v) in overrides {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    Config::from_vars(vars).expect("test configuration is valid")
}

/// A relay running in-process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The `ADMIN_LISTEN_ADDR` listener's address, when one is configured.
    pub admin_addr: Option<SocketAddr>,
    pub relay: Arc<Relay>,
    pub prefix: String,
    pub http: reqwest::Client,
    cancel: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Deletes the topology on drop; false when another app owns the same prefix.
    owns_topology: bool,
}

impl TestApp {
    /// Starts `role` with the test defaults plus `overrides`, waiting until the broker
    /// session is ready.
    pub async fn spawn(role: Role, overrides: &[(&str, &str)]) -> Self {
        let prefix = overrides
            .iter()
            .find(|(k, _)| *k == "QUEUE_PREFIX")
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_else(|| unique_prefix("app"));
        Self::spawn_config(role, config(&prefix, overrides), true).await
    }

    pub async fn spawn_config(role: Role, config: Config, wait_ready: bool) -> Self {
        let prefix = config.queue_prefix.clone();
        let app = App::build(config, role).await.expect("app builds");
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let relay = app.relay();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(app.run(cancel.clone()));
        if wait_ready {
            assert!(
                relay.broker.wait_ready(Duration::from_secs(15)).await,
                "relay did not connect to the broker at {}",
                amqp_url()
            );
        }
        Self {
            addr,
            admin_addr,
            relay,
            prefix,
            http: reqwest::Client::new(),
            cancel,
            handle: Some(handle),
            owns_topology: true,
        }
    }

    /// Marks this app as sharing another app's topology (it will not delete it).
    pub fn shares_topology(mut self) -> Self {
        self.owns_topology = false;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn topology(&self) -> &Topology {
        self.relay.topology()
    }

    /// POSTs a JSON body to `path` with extra headers.
    pub async fn post(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request reaches the relay")
    }

    /// POSTs a JSON body to `path` from a task of its own (to hold the relay busy while
    /// the test goes on); the task gives the answer's status, or the error as text.
    pub fn post_in_background(&self, path: &str, body: String) -> JoinHandle<Result<u16, String>> {
        let request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        tokio::spawn(async move {
            let r = request.send().await;
            r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
        })
    }

    /// Stops the app gracefully and waits for it to finish.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("app task").expect("app ran cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
        if self.owns_topology {
            delete_topology_blocking(self.topology().clone());
        }
    }
}

/// Deletes a topology from a fresh thread and runtime, so it works inside `Drop`
/// even while a test is unwinding.
pub fn delete_topology_blocking(topology: Topology) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(conn) =
                Connection::connect(&amqp_url(), ConnectionProperties::default()).await
            {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = topology.delete(&ch).await;
                }
                let _ = conn.close(200, "test teardown".into()).await;
            }
        });
    })
    .join();
}

/// Whether `queue` exists now (a passive declare on a channel of its own, since a
/// failed one closes the channel).
pub async fn queue_exists(queue: &str) -> bool {
    on_side_channel(async |ch| {
        webhook_relay::broker::topology::peek(ch, queue)
            .await
            .is_ok()
    })
    .await
}

/// Whether `exchange` exists now (a passive declare, as for a queue).
pub async fn exchange_exists(exchange: &str) -> bool {
    on_side_channel(async |ch| {
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            passive,
            Default::default(),
        )
        .await
        .is_ok()
    })
    .await
}

/// `check` on a channel of a connection of its own, closed after; false when the
/// broker cannot be reached.
async fn on_side_channel(check: impl AsyncFnOnce(&lapin::Channel) -> bool) -> bool {
    let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
        return false;
    };
    let answer = match conn.create_channel().await {
        Ok(ch) => check(&ch).await,
        Err(_) => false,
    };
    let _ = conn.close(200, "checked".into()).await;
    answer
}

/// A side connection to the broker for inspecting queues.
pub struct Inspector {
    conn: Connection,
    channel: lapin::Channel,
}

impl Inspector {
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_url()).await
    }

    pub async fn connect_to(url: &str) -> Self {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("inspector connects");
        let channel = conn.create_channel().await.unwrap();
        Self { conn, channel }
    }

    pub fn channel(&self) -> &lapin::Channel {
        &self.channel
    }

    /// Ready messages in `queue` (passive declare; fails if the queue does not exist).
    pub async fn count(&self, queue: &str) -> u32 {
        webhook_relay::broker::topology::peek(&self.channel, queue)
            .await
            .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"))
            .message_count()
    }

    /// Messages in every queue of `topology`, by name.
    pub async fn counts(&self, topology: &Topology) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for q in topology.queues() {
            out.insert(q.name.clone(), self.count(&q.name).await);
        }
        out
    }

    /// Total messages across the topology.
    pub async fn total(&self, topology: &Topology) -> u32 {
        self.counts(topology).await.values().sum()
    }

    /// Takes every message out of `queue` (acked), returning them.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            out.push(m);
        }
        out
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
