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
mod genesys;
mod hostile;
mod logs;
mod metrics;
mod payloads;
mod protect;
mod receive;
mod request_path;
mod signing;
mod topology;
mod worker;
