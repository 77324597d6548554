//! The `webhook-relay` binary: parses the command line and configuration, starts
//! telemetry, and runs the chosen command. All the work lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhook_relay::app::{App, Role};
use webhook_relay::config::{Config, ConfigError};
use webhook_relay::{broker, dlq, genesys, retry, telemetry};

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
    /// GET a URL; exit 0 on a 2xx answer, 1 otherwise (the container HEALTHCHECK).
    Healthcheck {
        /// The URL to check, e.g. http://127.0.0.1:8000/healthz or https://... with TLS.
        url: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Trust this PEM CA certificate (or the self-signed certificate itself) for https://.
        #[arg(long, value_name = "PEM_FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// Accept any certificate for https:// (a probe of this process over loopback,
        /// where the certificate names the public host).
        #[arg(long, conflicts_with = "ca_file")]
        insecure: bool,
    },
    /// A demo downstream that fails and stalls a share of requests (DEMO_* variables).
    DemoDownstream,
    /// Inspect, replay and purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        action: dlq::cli::DlqCommand,
    },
    /// Calls back to Genesys Cloud (GENESYS_CLIENT_ID, GENESYS_CLIENT_SECRET, GENESYS_REGION).
    Genesys {
        #[command(subcommand)]
        action: GenesysAction,
    },
}

#[derive(Debug, Subcommand)]
enum GenesysAction {
    /// Obtain a token with the client credentials and print its expiry and scopes
    /// (never the token itself).
    Token,
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Declare the exchange and every queue (idempotent), then exit.
    Declare,
    /// Print RabbitMQ definitions (user, vhost, exchange, queues, binding) as JSON.
    /// The relay's user (from AMQP_URL) may use only the names under QUEUE_PREFIX.
    Export {
        /// Also an administrator login for the management UI, as user:pass
        /// (compose: guest:guest). Must differ from the relay's user.
        #[arg(long, value_name = "USER:PASS")]
        management_login: Option<broker::definitions::ManagementLogin>,
    },
    /// Print the message and consumer counts of every queue.
    Status {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Bodies of a burst (250 KB each, a few hundred at a time) are allocated and freed at
/// a high rate. glibc raises its mmap threshold after the first such free, so later
/// ones come from the heap and leave it fragmented: the burst test peaked about 17 MiB
/// higher (168 MiB instead of 151). A fixed threshold keeps allocations of 128 KiB and
/// more in their own mappings, returned to the system when freed; small ones (a 1 KB
/// event's) are not affected. jemalloc and mimalloc were measured too: higher peaks.
#[allow(unsafe_code)]
fn large_allocations_go_back_at_once() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning and takes plain integers;
    // called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    large_allocations_go_back_at_once();
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
        // Found while building (a TLS file that does not parse): still the operator's
        // configuration to fix, reported as such.
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("webhook-relay: configuration error: {e:#}");
            ExitCode::from(2)
        }
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
        Command::Genesys { .. } => {
            config.genesys.credentials()?;
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
        Command::Healthcheck { .. } => "healthcheck",
        Command::DemoDownstream => "demo-downstream",
        Command::Genesys { .. } => "genesys",
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
        Command::Topology {
            action: TopologyAction::Export { management_login },
        } => export(&config, management_login.as_ref()),
        Command::Topology {
            action: TopologyAction::Status { json },
        } => status(&config, json).await,
        Command::Healthcheck {
            url,
            timeout_ms,
            ca_file,
            insecure,
        } => {
            let trust = match (ca_file, insecure) {
                (Some(path), _) => webhook_relay::healthcheck::Trust::CaFile(path),
                (None, true) => webhook_relay::healthcheck::Trust::AnyCertificate,
                (None, false) => webhook_relay::healthcheck::Trust::System,
            };
            let status =
                webhook_relay::healthcheck::check(&url, Duration::from_millis(timeout_ms), &trust)
                    .await?;
            println!("{url}: {status}");
            Ok(())
        }
        Command::DemoDownstream => demo_downstream().await,
        Command::Genesys {
            action: GenesysAction::Token,
        } => genesys_token(config).await,
        Command::Dlq { .. } => unreachable!("dlq commands run from main"),
    }
}

async fn genesys_token(config: Config) -> anyhow::Result<()> {
    let credentials = config.genesys.credentials()?;
    let client = genesys::TokenClient::genesys(credentials.clone())?;
    let token = client
        .token()
        .await
        .with_context(|| format!("getting a token from {}", credentials.token_url))?;
    let issued = &token.issued;
    println!("token endpoint  {}", credentials.token_url);
    println!("client id       {}", credentials.client_id);
    println!("token type      {}", issued.token_type);
    println!(
        "expires in      {} s (at {})",
        issued.expires_in.as_secs(),
        humantime::format_rfc3339_seconds(token.expires_at)
    );
    if issued.scopes.is_empty() {
        println!(
            "scopes          (none stated; a client-credentials token carries the roles of its OAuth client)"
        );
    } else {
        println!("scopes          {}", issued.scopes.join(" "));
    }
    Ok(())
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
    let connection = broker::connect_any(config.amqp_url.urls(), "webhook-relay declare")
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

fn topology_of(config: &Config) -> broker::Topology {
    let ladder = retry::Ladder::new(config.backoff_base, config.backoff_max);
    broker::Topology::new(&config.queue_prefix, &ladder)
}

fn export(
    config: &Config,
    management: Option<&broker::definitions::ManagementLogin>,
) -> anyhow::Result<()> {
    let definitions = broker::definitions::Definitions::new(
        &topology_of(config),
        config.amqp_url.first(),
        management,
    )?;
    print!("{}", definitions.to_pretty_json());
    Ok(())
}

async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let depths = broker::status::queue_depths(config.amqp_url.urls(), &topology_of(config)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&depths)?);
    } else {
        print!("{}", broker::status::table(&depths));
    }
    let missing: Vec<&str> = depths
        .iter()
        .filter(|d| d.messages.is_none())
        .map(|d| d.name.as_str())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "not declared yet (start the relay or run `topology declare`): {}",
        missing.join(", ")
    );
    Ok(())
}

async fn demo_downstream() -> anyhow::Result<()> {
    let demo = webhook_relay::demo::DemoConfig::from_env()?;
    let listener = tokio::net::TcpListener::bind(demo.listen_addr)
        .await
        .with_context(|| format!("binding DEMO_LISTEN_ADDR {}", demo.listen_addr))?;
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    webhook_relay::demo::run(listener, demo.behaviour, cancel).await?;
    Ok(())
}
