//! The broker connection: a supervisor that keeps one live session (a publishing
//! connection with confirm-mode channels, a consuming connection, the topology
//! declared), replaces it with backoff when it breaks, tracks whether the broker is
//! blocking publishers, and the confirmed publisher everything else calls (SPEC §2, §5).

pub mod confirms;
pub mod definitions;
pub mod depths;
pub mod episode;
pub mod status;
pub mod topology;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_lapin::Pool;
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
use confirms::ConfirmChannel;
use episode::Episode;
pub use topology::Topology;

/// Consecutive nacks after which the publishing channel is replaced (at most every
/// [`CHANNEL_ROTATION_MIN`]). A quorum queue that refused a channel's publishes
/// (`x-overflow=reject-publish` at its limit) tells that channel when it takes
/// messages again only when it drops below the limit; after a policy that set the
/// limit is removed, RabbitMQ 3.10 never tells it, and the channel would be refused
/// for ever. A new channel starts with a clean slate.
const NACKS_BEFORE_NEW_CHANNEL: u32 = 3;
const CHANNEL_ROTATION_MIN: Duration = Duration::from_secs(2);
/// First and last wait between reconnection tries.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Publish timeouts in a row after which the session counts as broken (SPEC §5): a
/// half-open TCP connection is not waited out until heartbeats notice.
pub const TIMEOUTS_BEFORE_BROKEN: u32 = 3;
/// Bytes of publishes waiting to be written to the publishing connection's socket.
/// lapin copies a message into frames and queues them until the socket takes them; a
/// burst of large events would otherwise hold every body twice (the request's copy
/// and the queued frames) while the broker drains them.
const PUBLISH_WRITE_BUDGET: usize = 8 * 1024 * 1024;

/// Longest a closing connection may take (shutdown, reconnect): a blocked or silent
/// broker never answers `connection.close`.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `P.work`, through its exchange.
    Work,
    /// Retry level `n` of the ladder.
    Retry(usize),
    /// The terminal DLQ.
    Dlq,
}

impl Target {
    /// The metrics label of the target.
    pub fn label(self) -> &'static str {
        match self {
            Self::Work => "work",
            Self::Retry(_) => "retry",
            Self::Dlq => "dlq",
        }
    }
}

/// A publish that did not end with the broker holding the message. Every variant
/// means the same to the caller: the event is not stored, so answer 503 / do not ack.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No usable broker session right now.
    #[error("broker not connected")]
    NotConnected,
    /// The broker blocks publishers (memory or disk alarm): nothing was published, or
    /// a publish already written was abandoned when the block started.
    #[error("broker is blocking publishers ({0})")]
    Blocked(String),
    /// The confirm did not arrive within PUBLISH_TIMEOUT_MS.
    #[error("publish not confirmed within {0:?}")]
    Timeout(Duration),
    /// The broker refused the message (nack), e.g. a queue at its limit.
    #[error("broker rejected the message (nack)")]
    Nacked,
    /// The message reached no queue (ack with a returned message).
    #[error("message unroutable: {code} {text}")]
    Unroutable {
        /// AMQP reply code (312 NO_ROUTE).
        code: u16,
        /// AMQP reply text.
        text: String,
    },
    /// The channel lost confirm mode (only after a broker-side channel reset).
    #[error("publishing channel is not in confirm mode")]
    NotConfirmMode,
    /// The channel or connection failed during the publish.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// One live pair of connections with the topology declared and confirm-mode channels
/// open. Publishing and consuming never share a connection: RabbitMQ blocks a
/// publishing connection during an alarm, and a blocked connection carries nothing,
/// not even the consumers' acks (SPEC §2).
pub struct Session {
    /// The publishing connection, held out of the pool while the session lives.
    publisher: Connection,
    /// The consuming connection: consumers, acks, queue-depth reads. Never publishes,
    /// so an alarm never blocks it.
    consumer: Connection,
    /// The confirm-mode publishing channel on `publisher`. One channel: with every
    /// in-flight publish on it the broker confirms them in batches (one `multiple` ack
    /// for many), about 20% less CPU per publish than four channels (relay-bench).
    /// Replaced after a run of nacks (see [`NACKS_BEFORE_NEW_CHANNEL`]).
    channel: std::sync::RwLock<ConfirmChannel>,
    /// Nacks since the last confirm, and when the channel was last replaced.
    nacks_in_a_row: AtomicU32,
    rotated_at: std::sync::Mutex<Instant>,
    /// Cancelled by a user that saw this session fail; the supervisor then replaces it.
    /// Per session, so a late report about an old session never tears down a new one.
    broken: CancellationToken,
    /// The broker's reason while it blocks the publishing connection, else `None`.
    blocked: watch::Sender<Option<String>>,
    /// Publishes refused at once during the current block, for its end-of-episode line.
    refused_while_blocked: AtomicU64,
    /// Publish timeouts since the last confirm; [`TIMEOUTS_BEFORE_BROKEN`] breaks it.
    timeouts_in_a_row: AtomicU32,
    /// The node this session talks to (`host:port`), never with credentials.
    node: String,
}

impl Session {
    /// The consuming connection, for consumers and reads that must not stall while the
    /// broker blocks publishers.
    pub fn consumer_connection(&self) -> &Connection {
        &self.consumer
    }

    /// The node this session is connected to (`host:port`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the broker is blocking this session's publishers right now.
    pub fn is_blocked(&self) -> bool {
        self.blocked.borrow().is_some()
    }

    fn channel(&self) -> ConfirmChannel {
        self.channel.read().expect("channel lock").clone()
    }

    fn is_usable(&self) -> bool {
        !self.broken.is_cancelled()
            && self.publisher.status().connected()
            && self.consumer.status().connected()
            && self
                .channel
                .read()
                .expect("channel lock")
                .channel()
                .status()
                .connected()
    }

    /// Replaces the publishing channel with a fresh confirm-mode one; the old one is
    /// closed once its publishes in flight had time to be confirmed.
    async fn rotate_channel(&self, publish_timeout: Duration) {
        let fresh = async {
            let ch = self.publisher.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions { nowait: false })
                .await?;
            Ok::<_, lapin::Error>(ConfirmChannel::new(ch))
        };
        match tokio::time::timeout(publish_timeout, fresh).await {
            Ok(Ok(ch)) => {
                let old = std::mem::replace(&mut *self.channel.write().expect("channel lock"), ch);
                tracing::debug!("publishing channel replaced after repeated nacks");
                tokio::time::sleep(publish_timeout).await;
                let _ = tokio::time::timeout(
                    CLOSE_DEADLINE,
                    old.channel().close(200, "replaced".into()),
                )
                .await;
            }
            _ => tracing::debug!("could not open a new publishing channel"),
        }
    }

    async fn close(&self, code: u16, why: &str) {
        for c in [&self.publisher, &self.consumer] {
            let _ = tokio::time::timeout(CLOSE_DEADLINE, c.close(code, why.into())).await;
        }
    }
}

/// One configured broker address.
struct Node {
    /// Connection factory for this address; also serves the DLQ tools' connections.
    pool: Pool,
    /// `host:port`, for logs, `/readyz` and metrics (never the credentials).
    name: String,
}

struct Inner {
    /// The configured addresses (a cluster's nodes), tried in turn.
    nodes: Vec<Node>,
    /// Index into `nodes` of the address in use (or tried next).
    current: AtomicUsize,
    /// Names and arguments of what must exist before the session counts as usable.
    topology: Topology,
    /// The current usable session, or `None` while the broker is away.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Bound on how long a publish waits for its confirm.
    publish_timeout: Duration,
    /// Room for frames not yet written to the socket ([`PUBLISH_WRITE_BUDGET`]).
    unwritten: Arc<tokio::sync::Semaphore>,
    /// Nacked publishes, logged once per episode.
    nacks: Episode,
    /// Publish timeouts, logged once per episode.
    timeouts: Episode,
    /// Stops the supervisor; cancelled last, after the users of the broker are done.
    stop: CancellationToken,
}

/// Handle to the broker: cheap to clone, shared by the receiver, workers and tools.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Starts the supervisor, which connects (and reconnects) in the background. With
    /// several addresses (a cluster's nodes) it starts at a random one, so a fleet of
    /// relays spreads over the nodes, and moves on to the next whenever a connection
    /// fails or is lost.
    pub fn start(amqp_urls: &[String], topology: Topology, publish_timeout: Duration) -> Self {
        assert!(!amqp_urls.is_empty(), "at least one broker address");
        let nodes = amqp_urls
            .iter()
            .map(|url| Node {
                pool: pool_for(url),
                name: node_of(url),
            })
            .collect::<Vec<_>>();
        let first = rand::rng().random_range(0..nodes.len());
        let (session, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            nodes,
            current: AtomicUsize::new(first),
            topology,
            session,
            publish_timeout,
            unwritten: Arc::new(tokio::sync::Semaphore::new(PUBLISH_WRITE_BUDGET)),
            nacks: Episode::new("publishes nacked by the broker"),
            timeouts: Episode::new("publishes not confirmed in time"),
            stop: CancellationToken::new(),
        });
        crate::metrics::broker_state(false, false);
        tokio::spawn(supervise(inner.clone()));
        Self { inner }
    }

    /// The topology this broker handle declares.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Whether a usable session exists and the broker takes publishes (what `/readyz`
    /// reports): 503 while the broker is away and while it blocks publishers.
    pub fn is_ready(&self) -> bool {
        self.inner
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| s.is_usable() && !s.is_blocked())
    }

    /// Why the relay is not ready, in words for `/readyz`; `None` when ready.
    pub fn unready_reason(&self) -> Option<String> {
        match self.inner.session.borrow().as_ref() {
            None => Some("broker connection not usable".into()),
            Some(s) if !s.is_usable() => Some("broker connection not usable".into()),
            Some(s) => s
                .blocked
                .borrow()
                .as_ref()
                .map(|why| format!("broker is blocking publishers ({why})")),
        }
    }

    /// The node in use (`host:port`), or the one tried next while disconnected.
    pub fn node(&self) -> String {
        self.session()
            .map(|s| s.node.clone())
            .unwrap_or_else(|| self.inner.node().name.clone())
    }

    /// The current session, if any.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.inner.session.borrow().clone()
    }

    /// Watches session changes (consumers re-open on each new session).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.inner.session.subscribe()
    }

    /// Waits until a session is usable or `timeout` passes; true when ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Tells the supervisor that `session` failed under a user; it will be replaced.
    pub fn report_broken(&self, session: &Session) {
        session.broken.cancel();
    }

    /// A pooled connection for one-off tools (DLQ listing, replay, teardown): never
    /// the session's publishing or consuming connection.
    pub async fn pooled_connection(&self) -> Result<deadpool_lapin::Connection, PublishError> {
        self.inner
            .node()
            .pool
            .get()
            .await
            .map_err(|_| PublishError::NotConnected)
    }

    /// Publishes `event` to `target`: persistent, mandatory, confirmed. `Ok` means the
    /// broker holds it in a queue. While the broker blocks publishers nothing is
    /// written and the answer is `Blocked` at once; a publish in flight when the block
    /// starts is abandoned with `Blocked` rather than waiting out its timeout.
    pub async fn publish(&self, target: Target, event: &Envelope) -> Result<(), PublishError> {
        self.send(target, event.body.clone(), event.properties(), ())
            .await
    }

    /// Publishes `event` like [`Broker::publish`], but lets go of it, and of `release`
    /// (the intake budget its body held), as soon as it is written to the socket: the
    /// wait for the broker's confirm then holds no copy of the body. For callers that
    /// need nothing of the event afterwards (the queue-first receiver).
    pub async fn publish_owned<R: Send>(
        &self,
        target: Target,
        event: Envelope,
        release: R,
    ) -> Result<(), PublishError> {
        let properties = event.properties();
        let body = event.body;
        self.send(target, body, properties, release).await
    }

    async fn send<R: Send>(
        &self,
        target: Target,
        body: bytes::Bytes,
        properties: lapin::BasicProperties,
        release: R,
    ) -> Result<(), PublishError> {
        let started = Instant::now();
        let session = self.session().ok_or(PublishError::NotConnected)?;
        let mut blocked = session.blocked.subscribe();
        if let Some(why) = blocked.borrow_and_update().clone() {
            session
                .refused_while_blocked
                .fetch_add(1, Ordering::Relaxed);
            return Err(PublishError::Blocked(why));
        }
        let topo = &self.inner.topology;
        let (exchange, routing_key) = match target {
            Target::Work => (topo.work.as_str(), topo.work.as_str()),
            Target::Retry(level) => ("", topo.retry[level].name.as_str()),
            Target::Dlq => ("", topo.dlq.as_str()),
        };
        let channel = session.channel();
        let publish = async {
            // A body larger than the whole budget takes all of it.
            let size = body.len().min(PUBLISH_WRITE_BUDGET) as u32;
            let writing = self
                .inner
                .unwritten
                .acquire_many(size)
                .await
                .expect("the write budget is never closed");
            // Mandatory: unroutable must come back as a failure, not vanish.
            let answer = channel
                .publish(exchange, routing_key, &body, properties)
                .await?;
            // Written to the socket: the frames' copy is gone, and the body is no
            // longer needed here.
            drop(writing);
            drop(body);
            drop(release);
            answer.await
        };
        let result = tokio::select! {
            timed = tokio::time::timeout(self.inner.publish_timeout, publish) => match timed {
                Err(_) => Err(PublishError::Timeout(self.inner.publish_timeout)),
                Ok(answer) => answer,
            },
            why = blocked.wait_for(Option::is_some) => {
                session.refused_while_blocked.fetch_add(1, Ordering::Relaxed);
                let why = why.ok().and_then(|w| w.clone()).unwrap_or_default();
                Err(PublishError::Blocked(why))
            }
        };
        crate::metrics::publish_confirmed(target.label(), result.is_ok(), started.elapsed());
        self.after_publish(&session, &result);
        result
    }

    /// Keeps the session's health and the episode logs up to date after a publish.
    fn after_publish(&self, session: &Arc<Session>, result: &Result<(), PublishError>) {
        let inner = &self.inner;
        match result {
            Ok(()) => {
                session.timeouts_in_a_row.store(0, Ordering::Relaxed);
                session.nacks_in_a_row.store(0, Ordering::Relaxed);
                inner.nacks.calm();
                inner.timeouts.calm();
            }
            Err(PublishError::Nacked) => {
                // The broker answered: the connection is alive.
                session.timeouts_in_a_row.store(0, Ordering::Relaxed);
                inner.nacks.strike(&"nack");
                let n = session.nacks_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= NACKS_BEFORE_NEW_CHANNEL {
                    let mut at = session.rotated_at.lock().expect("rotation lock");
                    if at.elapsed() >= CHANNEL_ROTATION_MIN {
                        *at = Instant::now();
                        session.nacks_in_a_row.store(0, Ordering::Relaxed);
                        let (session, timeout) = (session.clone(), inner.publish_timeout);
                        tokio::spawn(async move { session.rotate_channel(timeout).await });
                    }
                }
            }
            Err(e @ PublishError::Timeout(_)) => {
                inner.timeouts.strike(e);
                let n = session.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n == TIMEOUTS_BEFORE_BROKEN {
                    tracing::warn!(
                        node = %session.node,
                        "{TIMEOUTS_BEFORE_BROKEN} publish timeouts in a row: treating the broker connection as broken"
                    );
                    self.report_broken(session);
                } else if !session.is_usable() {
                    self.report_broken(session);
                }
            }
            // A broken channel, or topology that vanished: rebuild the session.
            Err(
                PublishError::Broker(_)
                | PublishError::Unroutable { .. }
                | PublishError::NotConfirmMode,
            ) => self.report_broken(session),
            Err(PublishError::Blocked(_) | PublishError::NotConnected) => {}
        }
    }

    /// Stops the supervisor and closes the session's connections, each within a
    /// deadline: a blocked or silent broker never delays the exit for long.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let session = self.inner.session.send_replace(None);
        if let Some(s) = session {
            s.close(200, "shutdown").await;
        }
    }
}

impl Inner {
    /// The address in use, or tried next.
    fn node(&self) -> &Node {
        &self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()]
    }

    /// Moves on to the next address (after a failed connect or a lost connection).
    fn next_node(&self) {
        if self.nodes.len() > 1 {
            let at = self.current.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(node = %self.nodes[at % self.nodes.len()].name, "trying the next broker address");
        }
    }
}

/// Largest AMQP frame the relay asks for, unless the URL sets `frame_max`: the
/// broker's own default. Every body frame costs the broker, so a smaller size makes
/// each larger event dearer (README, "What changed the figures", has the figures).
/// lapin keeps 32 frames' room for sending and 32 for receiving per connection,
/// touched as it is used: 8 MiB per connection at this size.
pub const FRAME_MAX: u32 = 128 * 1024;

/// `amqp_url` with [`FRAME_MAX`] asked for, unless the URL sets its own `frame_max`.
pub fn with_frame_max(amqp_url: &str) -> String {
    if amqp_url.contains("frame_max=") {
        return amqp_url.to_owned();
    }
    let joint = if amqp_url.contains('?') { '&' } else { '?' };
    format!("{amqp_url}{joint}frame_max={FRAME_MAX}")
}

fn pool_for(amqp_url: &str) -> Pool {
    let config = deadpool_lapin::Config {
        url: Some(with_frame_max(amqp_url)),
        pool: Some(deadpool_lapin::PoolConfig {
            max_size: 4,
            timeouts: deadpool_lapin::Timeouts {
                wait: Some(Duration::from_secs(10)),
                create: Some(Duration::from_secs(10)),
                recycle: Some(Duration::from_secs(5)),
            },
            queue_mode: Default::default(),
        }),
    };
    config
        .create_pool(
            || ConnectionProperties::default().with_connection_name("webhook-relay".into()),
            deadpool_lapin::Runtime::Tokio1,
        )
        // Only fails for an unsupported runtime; Tokio1 is compiled in.
        .expect("the tokio runtime is supported")
}

/// Connects to the first of `amqp_urls` that answers, in order (the tools: DLQ,
/// status, declare), named `name` in the management UI; the last error when none does.
pub async fn connect_any(amqp_urls: &[String], name: &str) -> Result<Connection, lapin::Error> {
    let mut last = None;
    for url in amqp_urls {
        match Connection::connect(
            &with_frame_max(url),
            ConnectionProperties::default().with_connection_name(name.into()),
        )
        .await
        {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(node = %node_of(url), error = %e, "broker address not reachable");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one broker address"))
}

/// `host:port` of an AMQP URL, for logs and metrics: never the credentials.
pub fn node_of(amqp_url: &str) -> String {
    match lapin::uri::AMQPUri::from_str(amqp_url) {
        Ok(u) => format!("{}:{}", u.authority.host, u.authority.port),
        Err(_) => "(unparsable AMQP_URL)".into(),
    }
}

async fn supervise(inner: Arc<Inner>) {
    let mut wait = RECONNECT_MIN;
    let mut was_up = false;
    let mut failures = 0u32;
    loop {
        if inner.stop.is_cancelled() {
            return;
        }
        let opened = tokio::select! {
            _ = inner.stop.cancelled() => return,
            opened = open_session(&inner) => opened,
        };
        match opened {
            Ok(session) => {
                if was_up || failures > 0 {
                    tracing::info!(node = %session.node, "broker connection re-established; topology declared");
                } else {
                    tracing::info!(node = %session.node, "connected to broker; topology declared");
                }
                was_up = true;
                failures = 0;
                wait = RECONNECT_MIN;
                let session = Arc::new(session);
                // Depths are known before the first "ready", so dashboards never start
                // with empty queue panels.
                depths::refresh_once(&session, &inner.topology).await;
                let mut publisher_events = session.publisher.events_listener();
                let mut consumer_events = session.consumer.events_listener();
                inner.session.send_replace(Some(session.clone()));
                crate::metrics::broker_state(true, false);
                for n in &inner.nodes {
                    crate::metrics::broker_node(&n.name, n.name == session.node);
                }
                let mut blocked_since: Option<Instant> = None;
                let mut poll = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = inner.stop.cancelled() => return,
                        _ = session.broken.cancelled() => break,
                        ev = publisher_events.next() => match ev {
                            Some(lapin::Event::ConnectionBlocked(why)) => {
                                tracing::warn!(node = %session.node, reason = %why, "broker is blocking publishers (memory or disk alarm): answering 503 until it stops");
                                session.refused_while_blocked.store(0, Ordering::Relaxed);
                                session.blocked.send_replace(Some(why));
                                blocked_since.get_or_insert_with(Instant::now);
                                crate::metrics::broker_state(true, true);
                            }
                            Some(lapin::Event::ConnectionUnblocked) => {
                                session.blocked.send_replace(None);
                                let lasted = blocked_since.take().map(|t| t.elapsed()).unwrap_or_default();
                                tracing::info!(
                                    node = %session.node,
                                    lasted_ms = lasted.as_millis() as u64,
                                    refused = session.refused_while_blocked.load(Ordering::Relaxed),
                                    "broker stopped blocking publishers"
                                );
                                crate::metrics::broker_state(true, false);
                            }
                            Some(lapin::Event::Error(e)) => {
                                tracing::debug!(error = %e, "publishing connection error event");
                                break;
                            }
                            None => break,
                            Some(_) => {}
                        },
                        ev = consumer_events.next() => match ev {
                            Some(lapin::Event::Error(e)) => {
                                tracing::debug!(error = %e, "consuming connection error event");
                                break;
                            }
                            None => break,
                            Some(_) => {}
                        },
                        _ = poll.tick() => if !session.is_usable() { break },
                    }
                }
                inner.session.send_replace(None);
                crate::metrics::broker_state(false, false);
                crate::metrics::broker_node(&session.node, false);
                tracing::warn!(node = %session.node, "lost the broker connection; reconnecting");
                session.close(320, "relay reconnecting").await;
                inner.next_node();
            }
            Err(e) => {
                failures += 1;
                let node = &inner.node().name;
                if failures == 1 {
                    tracing::warn!(node = %node, error = %crate::error_chain(e.as_ref()), "broker unavailable; retrying with backoff");
                } else {
                    tracing::debug!(node = %node, error = %crate::error_chain(e.as_ref()), failures, "broker still unavailable");
                }
                inner.next_node();
            }
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(wait.mul_f64(jitter)) => {}
        }
        wait = (wait * 2).min(RECONNECT_MAX);
    }
}

async fn open_session(inner: &Inner) -> Result<Session, anyhow::Error> {
    // Take the connections out of the pool: the session owns them until it breaks, and
    // a broken one must never be handed to anyone else.
    let node = inner.node();
    let publisher = deadpool_lapin::Object::take(node.pool.get().await?);
    let consumer = match node.pool.get().await {
        Ok(c) => deadpool_lapin::Object::take(c),
        Err(e) => {
            let _ =
                tokio::time::timeout(CLOSE_DEADLINE, publisher.close(200, "setup failed".into()))
                    .await;
            return Err(e.into());
        }
    };
    let setup = async {
        let declare = consumer.create_channel().await?;
        inner.topology.declare(&declare).await?;
        let _ = declare.close(200, "declared".into()).await;
        let channel = publisher.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await?;
        Ok::<_, lapin::Error>(channel)
    };
    match setup.await {
        Ok(channel) => {
            let s = Session {
                blocked: watch::channel(None).0,
                refused_while_blocked: AtomicU64::new(0),
                timeouts_in_a_row: AtomicU32::new(0),
                node: node.name.clone(),
                publisher,
                consumer,
                channel: std::sync::RwLock::new(ConfirmChannel::new(channel)),
                nacks_in_a_row: AtomicU32::new(0),
                rotated_at: std::sync::Mutex::new(Instant::now()),
                broken: CancellationToken::new(),
            };
            // A block announced before the listener existed is still in the status.
            if s.publisher.status().blocked() {
                s.blocked.send_replace(Some("blocked at connect".into()));
            }
            Ok(s)
        }
        Err(e) => {
            for c in [&publisher, &consumer] {
                let _ =
                    tokio::time::timeout(CLOSE_DEADLINE, c.close(200, "setup failed".into())).await;
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_size_is_asked_for_unless_the_url_sets_one() {
        assert_eq!(
            with_frame_max("amqp://u:p@h:5672/%2f"),
            "amqp://u:p@h:5672/%2f?frame_max=131072"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?heartbeat=10"),
            "amqp://h/%2f?heartbeat=10&frame_max=131072"
        );
        assert_eq!(
            with_frame_max("amqp://h/%2f?frame_max=32768"),
            "amqp://h/%2f?frame_max=32768"
        );
        for url in ["amqp://u:p@h:5672/%2f", "amqp://h/v?heartbeat=10"] {
            let uri: lapin::uri::AMQPUri = with_frame_max(url).parse().unwrap();
            assert_eq!(uri.query.frame_max, Some(FRAME_MAX));
        }
    }
}
