//! The `webhook-relay` binary: parses the command line and configuration, starts
//! telemetry, and runs the chosen command. All the work lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhook_relay::app::{App, Role};
use webhook_relay::config::{Config, ConfigError};
use webhook_relay::{broker, dlq, retry, telemetry};

/// Receives Genesys Cloud webhooks, forwards them downstream, and retries failures
/// through RabbitMQ. Configured through environment variables (and `.env`).
#[derive(Debug, Parser)]
#[command(name = "webhook-relay", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receiver and workers in one process (the default).
    Serve,
    /// HTTP intake only.
    Receiver,
    /// Consumers of the work queue only.
    Worker,
    /// The broker topology.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Inspect, replay and purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: dlq::cli::DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Declare the exchange and every queue (idempotent), then exit.
    Declare,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `.env` fills in what the environment does not set; it never overrides.
    let _ = dotenvy::dotenv();
    let command = cli.command.unwrap_or(Command::Serve);
    let config = match Config::from_env().and_then(|c| check_for(&command, c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("webhook-relay: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts");
    if let Command::Dlq { action } = command {
        telemetry::init_with_default(config.log_format, "warn");
        return runtime.block_on(dlq::cli::run(&config, action));
    }
    telemetry::init(config.log_format);
    match runtime.block_on(run(command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webhook-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The checks that depend on the command, made before anything connects.
fn check_for(command: &Command, config: Config) -> Result<Config, ConfigError> {
    match command {
        Command::Serve | Command::Worker => {
            config.require_downstream(command_name(command))?;
        }
        Command::Receiver if config.inline_delivery => {
            config.require_downstream("receiver with INLINE_DELIVERY=true")?;
        }
        _ => {}
    }
    Ok(config)
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Serve => "serve",
        Command::Receiver => "receiver",
        Command::Worker => "worker",
        Command::Topology { .. } => "topology",
        Command::Dlq { .. } => "dlq",
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config, Role::Serve).await,
        Command::Receiver => serve(config, Role::Receiver).await,
        Command::Worker => serve(config, Role::Worker).await,
        Command::Topology {
            action: TopologyAction::Declare,
        } => declare(config).await,
        Command::Dlq { .. } => unreachable!("dlq commands run from main"),
    }
}

async fn serve(config: Config, role: Role) -> anyhow::Result<()> {
    let app = App::build(config, role).await?;
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    app.run(cancel).await
}

/// SIGTERM (docker stop) and Ctrl-C both start a graceful stop.
async fn stop_on_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    cancel.cancel();
}

async fn declare(config: Config) -> anyhow::Result<()> {
    let ladder = retry::Ladder::new(config.backoff_base, config.backoff_max);
    let topology = broker::Topology::new(&config.queue_prefix, &ladder);
    let connection = lapin::Connection::connect(&config.amqp_url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to AMQP_URL")?;
    let channel = connection.create_channel().await?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology")?;
    let _ = connection.close(200, "declared".into()).await;
    println!("exchange {}", topology.work);
    for q in topology.queues() {
        println!("queue    {}", q.name);
    }
    Ok(())
}
