//! Startup: builds the relay for a command, binds the listeners (and loads the TLS
//! certificate), runs the receiver and/or workers until the cancellation token fires,
//! then shuts down in order.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
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
    /// HTTPS on `listener` when the TLS files are configured.
    tls: Option<TlsAcceptor>,
    /// The bound `ADMIN_LISTEN_ADDR` listener, serving metrics and admin in plain HTTP.
    admin_listener: Option<TcpListener>,
    /// What this process does.
    role: Role,
}

impl App {
    /// Builds the relay for `role`, loads the TLS files and binds `config.listen_addr`
    /// and `config.admin_listen_addr`, so a bad file or address fails before anything
    /// connects. A bad TLS file is a [`crate::config::ConfigError`].
    pub async fn build(config: Config, role: Role) -> anyhow::Result<Self> {
        let delivers = role.works() || config.inline_delivery;
        let downstream = if delivers {
            let url = config.require_downstream(role.name())?.clone();
            let downstream = Downstream::new(url)
                .context("building the HTTP client")?
                .with_headers(config.downstream_headers.clone())
                .with_signing(config.downstream_signing.clone());
            if downstream.is_proxied() {
                tracing::info!(
                    "deliveries go through the proxy the environment names for DOWNSTREAM_URL (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY)"
                );
            }
            Some(downstream)
        } else {
            None
        };
        let tls = config
            .tls
            .as_ref()
            .map(crate::http::tls::acceptor)
            .transpose()?;
        crate::metrics::install();
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
        let admin_listener = match config.admin_listen_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding ADMIN_LISTEN_ADDR {addr}"))?,
            ),
            None => None,
        };
        let relay = Arc::new(Relay::new(config, downstream));
        let retry_delays: Vec<_> = relay.topology().retry.iter().map(|l| l.delay).collect();
        crate::metrics::register_known(&crate::metrics::KnownSeries {
            receives: role.receives(),
            inline: relay.config.inline_delivery,
            delivers,
            admin: relay.config.admin_token.is_some(),
            retry_delays: &retry_delays,
        });
        Ok(Self {
            relay,
            listener,
            tls,
            admin_listener,
            role,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address the admin listener actually bound, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
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
            tls,
            admin_listener,
            role,
        } = self;
        let grace = relay.config.shutdown_grace;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(
            role = role.name(),
            addr = %listener.local_addr()?,
            scheme,
            "webhook-relay started"
        );

        let router = if role.receives() {
            crate::http::receiver_router(relay.clone())
        } else {
            crate::http::worker_router(relay.clone())
        };
        let server = tokio::spawn(crate::http::server::serve(
            listener,
            router,
            relay.config.request_timeout,
            tls,
            Some(relay.intake.clone()),
            cancel.clone(),
        ));
        let admin = admin_listener.map(|admin_listener| {
            if let Ok(addr) = admin_listener.local_addr() {
                tracing::info!(%addr, "admin listener started (metrics, admin)");
            }
            tokio::spawn(crate::http::server::serve(
                admin_listener,
                crate::http::admin_router(relay.clone()),
                relay.config.request_timeout,
                None,
                None,
                cancel.clone(),
            ))
        });
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
        let stopping = tokio::time::Instant::now();
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
        if let Some(admin) = admin {
            // Admin requests (a long replay) share the same grace.
            if tokio::time::timeout_at(stopping + grace, admin)
                .await
                .is_err()
            {
                tracing::warn!("admin requests still open after the grace; closing them");
            }
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
