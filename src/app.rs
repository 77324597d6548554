//! Startup: builds the relay for a command, binds the listener, runs the receiver
//! and/or workers until the cancellation token fires, then shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::Downstream;
use crate::relay::Relay;

/// What a process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receiver and workers in one process.
    Serve,
    /// HTTP intake only (plus health endpoints).
    Receiver,
    /// Consumers only (plus health endpoints).
    Worker,
}

impl Role {
    fn receives(self) -> bool {
        matches!(self, Self::Serve | Self::Receiver)
    }
    fn works(self) -> bool {
        matches!(self, Self::Serve | Self::Worker)
    }
    fn name(self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Receiver => "receiver",
            Self::Worker => "worker",
        }
    }
}

/// A built, bound application, ready to run.
pub struct App {
    /// The shared relay core.
    relay: Arc<Relay>,
    /// The bound HTTP listener (port 0 in tests).
    listener: TcpListener,
    /// What this process does.
    role: Role,
}

impl App {
    /// Builds the relay for `role` and binds `config.listen_addr`.
    pub async fn build(config: Config, role: Role) -> anyhow::Result<Self> {
        let delivers = role.works() || config.inline_delivery;
        let downstream = if delivers {
            let url = config.require_downstream(role.name())?.clone();
            Some(
                Downstream::new(url)
                    .context("building the HTTP client")?
                    .with_headers(config.downstream_headers.clone())
                    .with_signing(config.downstream_signing.clone()),
            )
        } else {
            None
        };
        crate::metrics::install();
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
        Ok(Self {
            relay: Arc::new(Relay::new(config, downstream)),
            listener,
            role,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The relay core (tests inspect its broker handle).
    pub fn relay(&self) -> Arc<Relay> {
        self.relay.clone()
    }

    /// Runs until `cancel` fires; returns once in-flight work finished or the grace ran out.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let Self {
            relay,
            listener,
            role,
        } = self;
        let grace = relay.config.shutdown_grace;
        tracing::info!(role = role.name(), addr = %listener.local_addr()?, "webhook-relay started");

        let router = if role.receives() {
            crate::http::receiver_router(relay.clone())
        } else {
            crate::http::worker_router(relay.clone())
        };
        let server = tokio::spawn(crate::http::server::serve(
            listener,
            router,
            relay.config.request_timeout,
            cancel.clone(),
        ));
        let worker = role
            .works()
            .then(|| tokio::spawn(crate::worker::run(relay.clone(), cancel.clone())));
        let depth_period = if relay.config.protect.max_backlog.is_some() {
            crate::broker::depths::BACKLOG_REFRESH
        } else {
            crate::broker::depths::DEPTH_REFRESH
        };
        let depths = tokio::spawn(crate::broker::depths::refresh(
            relay.broker.clone(),
            relay.protect.backlog().clone(),
            depth_period,
            cancel.clone(),
        ));

        cancel.cancelled().await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "stopping: no new intake, finishing in-flight work"
        );
        // Every step has a deadline, so the process exits within the grace plus the
        // broker's close deadlines even when the broker is blocked or silent.
        let deadline = tokio::time::Instant::now() + grace;
        // Requests in flight finish (they settle their event or answer 503) within the grace.
        match tokio::time::timeout_at(deadline, server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
            Err(_) => tracing::warn!("HTTP requests still open after the grace; closing them"),
        }
        if let Some(worker) = worker {
            // The worker bounds its own wait by the grace; this bounds anything else.
            let _ = tokio::time::timeout_at(deadline + STOP_MARGIN, worker).await;
        }
        depths.abort();
        relay.broker.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Slack past the grace for the worker's own wind-down (its cancel and tracker).
const STOP_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);
