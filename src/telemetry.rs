//! Logging: `tracing` with readable text by default or JSON lines (`LOG_FORMAT`),
//! filtered by `RUST_LOG` (default `info`, with the AMQP client's own chatter off: the
//! relay logs one line when it loses and one when it regains the broker; and the
//! certificate verifier's error per failed handshake off: the failed attempt's own
//! line, summarised per spell, carries the same error).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The `event` span: every line about one event is inside it, so it carries the
/// event id and webhook name (README, Logs). Its fields are formatted when it is made.
pub fn event_span(event_id: &str, webhook: &str) -> tracing::Span {
    tracing::info_span!("event", event_id = %event_id, webhook = %webhook)
}

/// Installs the global subscriber; call once, from `main`.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// Like [`init`], with another filter when `RUST_LOG` is unset: operator tools print
/// their own output and log only warnings by default.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_filter},lapin=off,rustls_platform_verifier=off"
        ))
    });
    // Colour codes only on a terminal: piped or collected logs stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
