//! Integration tests against the real RabbitMQ (`AMQP_URL`, default the local node).
//! One binary, one module per capability; every test uses its own `QUEUE_PREFIX`.

mod common;

mod admin;
mod auth;
mod bench;
mod cli;
mod compose;
mod demo;
mod dlq;
mod downstream_client;
mod genesys;
mod hostile;
mod intake;
mod listeners;
mod logs;
mod metrics;
mod observability;
mod payloads;
mod protect;
mod receive;
mod request_path;
mod signing;
mod tls;
mod topology;
mod worker;
