//! Integration tests against the real RabbitMQ (`AMQP_URL`, default the local node).
//! One binary, one module per capability; every test uses its own `QUEUE_PREFIX`.

mod common;

mod bench;
mod cli;
mod receive;
mod topology;
mod worker;
