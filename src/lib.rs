//! webhook-relay: receives Genesys Cloud webhooks, forwards each to one downstream
//! URL, retries failures through TTL-graded RabbitMQ queues, and parks the rest in a
//! dead-letter queue for operators.

pub mod app;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod dlq;
pub mod envelope;
pub mod event;
pub mod genesys;
pub mod healthcheck;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod payload;
pub mod protect;
pub mod relay;
pub mod retry;
pub mod retry_log;
pub mod telemetry;
pub mod worker;

/// An error and all its causes on one line, for the single place it is logged.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
