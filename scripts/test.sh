#!/usr/bin/env bash
# Runs the whole test suite against a real RabbitMQ: the one at AMQP_URL when it
# answers, else a local rabbitmq-server it starts, else `docker compose up -d rabbitmq`.
#
# A second broker version, when given, gets the broker-facing tests too (the
# integration and fault tests): RABBITMQ4_AMQP_URL is its AMQP URL, and
# RABBITMQ4_BIN_DIR the folder of its rabbitmq-server and rabbitmqctl, which the fault
# tests use for their throwaway nodes. CI sets both to a RabbitMQ 4 beside the
# system's 3.x.
set -euo pipefail
cd "$(dirname "$0")/.."

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
# host and port out of amqp://user:pass@host:port/vhost
hostport="${AMQP_URL#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$hostport" ] && port=5672

broker_answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
wait_for_broker() {
  for _ in $(seq 1 90); do broker_answers && return 0; sleep 1; done
  echo "test.sh: RabbitMQ did not come up at $host:$port within 90 s" >&2
  return 1
}

if broker_answers; then
  echo "test.sh: using RabbitMQ at $host:$port"
elif command -v rabbitmq-server >/dev/null 2>&1; then
  echo "test.sh: starting the local rabbitmq-server"
  rabbitmq-server -detached
  wait_for_broker
  rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 || true
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "test.sh: starting RabbitMQ with docker compose"
  docker compose up -d rabbitmq
  wait_for_broker
else
  echo "test.sh: no RabbitMQ at $host:$port; install rabbitmq-server or Docker, or set AMQP_URL" >&2
  exit 1
fi

# The compose file must stay valid; checking it needs the compose tool, not the engine.
if command -v docker-compose >/dev/null 2>&1; then
  docker-compose config -q
  docker-compose -f docker-compose.cluster.yml config -q
  echo "test.sh: docker-compose.yml and docker-compose.cluster.yml are valid (docker-compose config)"
elif docker compose version >/dev/null 2>&1; then
  docker compose config -q
  docker compose -f docker-compose.cluster.yml config -q
  echo "test.sh: docker-compose.yml and docker-compose.cluster.yml are valid (docker compose config)"
else
  echo "test.sh: neither docker-compose nor docker compose found; docker-compose.yml not checked"
fi

# The fault tests run the relay as a process; their burst and throughput figures are
# about the binary that ships, so they run the release build unless told otherwise.
if [ -z "${RELAY_BIN:-}" ]; then
  cargo build --locked --release --bin webhook-relay
  export RELAY_BIN="$PWD/target/release/webhook-relay"
fi

cargo test --locked --all-targets "$@"

if [ -n "${RABBITMQ4_AMQP_URL:-}" ]; then
  echo "test.sh: the broker-facing tests again, against $RABBITMQ4_AMQP_URL${RABBITMQ4_BIN_DIR:+ (throwaway nodes from $RABBITMQ4_BIN_DIR)}"
  AMQP_URL="$RABBITMQ4_AMQP_URL" TEST_RABBITMQ_BIN_DIR="${RABBITMQ4_BIN_DIR:-}" \
    cargo test --locked --test it --test fault "$@"
fi

# The benchmark's smoke run: correctness only (every event delivered or queued exactly
# as expected, else non-zero), no timing. Skipped when the caller filters the tests.
if [ $# -eq 0 ]; then
  cargo run --locked --quiet --bin relay-bench -- --smoke
fi
