//! The broker connection: a supervisor that keeps one live session (connection,
//! declared topology, confirm-mode publishing channels), replaces it with backoff when
//! it breaks, and the confirmed publisher everything else calls (SPEC §2, §5).

pub mod definitions;
pub mod status;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_lapin::Pool;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
pub use topology::Topology;

/// Publishing channels per session, used round-robin. One: with every in-flight
/// publish on one channel the broker confirms them in batches (one `multiple` ack for
/// many), which costs the broker and the relay about 20% less CPU per publish than four
/// channels did at the same rate (relay-bench), and one channel carries well past what
/// a relay process receives over HTTP. A broken channel replaces the whole session
/// either way, so more channels never isolated failures.
const PUBLISH_CHANNELS: usize = 1;
/// First and last wait between reconnection tries.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

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

/// A publish that did not end with the broker holding the message. Every variant
/// means the same to the caller: the event is not stored, so answer 503 / do not ack.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No usable broker session right now.
    #[error("broker not connected")]
    NotConnected,
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

/// Reads a publisher confirm: only a plain ack means stored. An ack that carries a
/// returned (unroutable) message is a failure, like a nack.
pub fn read_confirmation(c: Result<Confirmation, lapin::Error>) -> Result<(), PublishError> {
    match c {
        Err(e) => Err(PublishError::Broker(e)),
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(PublishError::Unroutable {
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
        }),
        Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
        Ok(Confirmation::NotRequested) => Err(PublishError::NotConfirmMode),
    }
}

impl PublishError {
    /// Whether the failure is the broker connection going away, which the supervisor
    /// already reports once; callers log these quietly instead of once per event.
    pub fn is_connection_loss(&self) -> bool {
        matches!(self, Self::NotConnected | Self::Broker(_))
    }
}

/// One live connection with the topology declared and confirm-mode channels open.
pub struct Session {
    /// The connection, held out of the pool while the session lives.
    connection: Connection,
    /// Confirm-mode publishing channels, used round-robin.
    channels: Vec<Channel>,
    /// Round-robin cursor over `channels`.
    next: AtomicUsize,
    /// Cancelled by a user that saw this session fail; the supervisor then replaces it.
    /// Per session, so a late report about an old session never tears down a new one.
    broken: CancellationToken,
}

impl Session {
    /// The session's connection, for consumers that open their own channel.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    fn channel(&self) -> &Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        &self.channels[i]
    }

    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

struct Inner {
    /// Connection factory; also serves short-lived connections to the DLQ tools.
    pool: Pool,
    /// Names and arguments of what must exist before the session counts as usable.
    topology: Topology,
    /// The current usable session, or `None` while the broker is away.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Bound on how long a publish waits for its confirm.
    publish_timeout: Duration,
    /// Stops the supervisor; cancelled last, after the users of the broker are done.
    stop: CancellationToken,
}

/// Handle to the broker: cheap to clone, shared by the receiver, workers and tools.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Starts the supervisor, which connects (and reconnects) in the background.
    pub fn start(amqp_url: &str, topology: Topology, publish_timeout: Duration) -> Self {
        let config = deadpool_lapin::Config {
            url: Some(amqp_url.to_owned()),
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
        let pool = config
            .create_pool(
                || ConnectionProperties::default().with_connection_name("webhook-relay".into()),
                deadpool_lapin::Runtime::Tokio1,
            )
            // Only fails for an unsupported runtime; Tokio1 is compiled in.
            .expect("the tokio runtime is supported");
        let (session, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            pool,
            topology,
            session,
            publish_timeout,
            stop: CancellationToken::new(),
        });
        tokio::spawn(supervise(inner.clone()));
        Self { inner }
    }

    /// The topology this broker handle declares.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Whether a usable session exists (what `/readyz` reports).
    pub fn is_ready(&self) -> bool {
        self.inner
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| s.is_usable())
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

    /// A pooled connection for one-off tools (DLQ listing, replay, teardown).
    pub async fn pooled_connection(&self) -> Result<deadpool_lapin::Connection, PublishError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|_| PublishError::NotConnected)
    }

    /// Publishes `event` to `target`: persistent, mandatory, confirmed. `Ok` means the
    /// broker holds it in a queue.
    pub async fn publish(&self, target: Target, event: &Envelope) -> Result<(), PublishError> {
        let started = std::time::Instant::now();
        let session = self.session().ok_or(PublishError::NotConnected)?;
        let topo = &self.inner.topology;
        let (exchange, routing_key) = match target {
            Target::Work => (topo.work.as_str(), topo.work.as_str()),
            Target::Retry(level) => ("", topo.retry[level].name.as_str()),
            Target::Dlq => ("", topo.dlq.as_str()),
        };
        let channel = session.channel();
        let publish = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        // Unroutable must come back as a failure, not vanish.
                        mandatory: true,
                        immediate: false,
                    },
                    &event.body,
                    event.properties(),
                )
                .await?;
            confirm.await
        };
        let result = match tokio::time::timeout(self.inner.publish_timeout, publish).await {
            Err(_) => Err(PublishError::Timeout(self.inner.publish_timeout)),
            Ok(confirm) => read_confirmation(confirm),
        };
        crate::metrics::publish_confirmed(target, &result, started.elapsed());
        match &result {
            // A broken channel, or topology that vanished: rebuild the session.
            Err(
                PublishError::Broker(_)
                | PublishError::Unroutable { .. }
                | PublishError::NotConfirmMode,
            ) => self.report_broken(&session),
            Err(PublishError::Timeout(_)) if !session.is_usable() => self.report_broken(&session),
            _ => {}
        }
        result
    }

    /// Stops the supervisor and closes the session's connection cleanly.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let session = self.inner.session.send_replace(None);
        if let Some(s) = session {
            let _ = s.connection.close(200, "shutdown".into()).await;
        }
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
        match open_session(&inner).await {
            Ok(session) => {
                if was_up || failures > 0 {
                    tracing::info!("broker connection re-established; topology declared");
                } else {
                    tracing::info!("connected to broker; topology declared");
                }
                was_up = true;
                failures = 0;
                wait = RECONNECT_MIN;
                let session = Arc::new(session);
                let mut events = session.connection.events_listener();
                inner.session.send_replace(Some(session.clone()));
                let mut poll = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = inner.stop.cancelled() => return,
                        _ = session.broken.cancelled() => break,
                        ev = events.next() => match ev {
                            Some(lapin::Event::Error(e)) => {
                                tracing::debug!(error = %e, "broker connection error event");
                                break;
                            }
                            None => break,
                            Some(_) => {}
                        },
                        _ = poll.tick() => if !session.is_usable() { break },
                    }
                }
                inner.session.send_replace(None);
                tracing::warn!("lost the broker connection; reconnecting");
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    session.connection.close(320, "relay reconnecting".into()),
                )
                .await;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %crate::error_chain(e.as_ref()), "broker unavailable; retrying with backoff");
                } else {
                    tracing::debug!(error = %crate::error_chain(e.as_ref()), failures, "broker still unavailable");
                }
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
    // Take the connection out of the pool: the session owns it until it breaks, and a
    // broken one must never be handed to anyone else.
    let connection = deadpool_lapin::Object::take(inner.pool.get().await?);
    let setup = async {
        let declare = connection.create_channel().await?;
        inner.topology.declare(&declare).await?;
        let _ = declare.close(200, "declared".into()).await;
        let mut channels = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            let ch = connection.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions { nowait: false })
                .await?;
            channels.push(ch);
        }
        Ok::<_, lapin::Error>(channels)
    };
    match setup.await {
        Ok(channels) => Ok(Session {
            connection,
            channels,
            next: AtomicUsize::new(0),
            broken: CancellationToken::new(),
        }),
        Err(e) => {
            let _ = connection.close(200, "setup failed".into()).await;
            Err(e.into())
        }
    }
}
