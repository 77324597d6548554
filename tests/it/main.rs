//! Integration tests against the real RabbitMQ (`AMQP_URL`, default the local node).
//! One binary, one module per capability; every test uses its own `QUEUE_PREFIX`.

mod common;

mod auth;
mod cli;
mod compose;
mod demo;
mod genesys;
mod hostile;
mod payloads;
mod receive;
mod request_path;
mod signing;
mod topology;
mod worker;
