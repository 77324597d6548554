#!/usr/bin/env bash
# The README's quick start, end to end, on a real Docker engine: `up --build` of
# docker-compose.yml, the demo and its result, three workers on the work queue, the
# management UI in headless Chromium, the DLQ kept across a broker restart. Always
# ends with `down -v` of its own compose project, also when a step fails.
#
#   scripts/compose-test.sh
#
# Needs Docker with Docker Compose v2 (`docker compose`) or docker-compose 1.29, curl,
# jq, and for the UI step Node.js with npm and Chromium (see ui-check/). Host ports
# are picked free, and the compose project has a name of its own, so it runs beside
# a local RabbitMQ or another compose project.
#
# Environment:
#   COMPOSE                 the compose command (default: `docker compose` when it
#                           works, else `docker-compose`)
#   COMPOSE_STANDINS_BUILD  a script that builds local stand-ins for the images the
#                           project names, run as `SCRIPT PROJECT_DIR` when they cannot
#                           be pulled (a machine without registry access)
#   COMPOSE_TEST_EVENTS     events the demo sends (default 200)
#   CHROMIUM                the Chromium binary for the UI step (default: chromium on PATH)
#   COMPOSE_TEST_SKIP_UI=1  skip the browser step (reported as skipped, never as passed)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "compose-test: $*"; }
die() { echo "compose-test: FAILED: $*" >&2; exit 1; }
t0=$SECONDS
step_start=$SECONDS
timings=()
failed_at=
step_done() {
  timings+=("$(printf '%-34s %4ds' "$1" $((SECONDS - step_start)))")
  step_start=$SECONDS
}

for tool in docker curl jq; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done

# BuildKit for both compose tools (the Dockerfile uses RUN --mount=type=cache);
# docker-compose 1.29 then builds through `docker build`.
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1


docker info >/dev/null 2>&1 || {
  [ -n "${COMPOSE_STANDINS_BUILD:-}" ] || die "no Docker engine answers (docker info)"
}

# The images the project names: pulled by compose, or built locally as stand-ins.
images=(rabbitmq:4.1-management rust:1.95-slim-bookworm debian:bookworm-slim)
if [ -n "${COMPOSE_STANDINS_BUILD:-}" ]; then
  say "building image stand-ins with $COMPOSE_STANDINS_BUILD"
  "$COMPOSE_STANDINS_BUILD" "$PWD" >/dev/null
else
  for image in "${images[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 || docker pull -q "$image" >/dev/null ||
      die "cannot pull $image; set COMPOSE_STANDINS_BUILD to a script that builds it"
  done
fi
step_done "images ready"

# Chosen once the images are ready: the stand-ins script may install the engine, and
# with it the client that builds here.
# A docker client from 23 on builds with BuildKit only through its buildx plugin.
# Without it, use the next docker client on PATH that builds (e.g. the one packaged
# with the engine): docker-compose 1.29 runs whichever `docker` comes first.
client_builds() {
  local v
  "$1" buildx version >/dev/null 2>&1 && return 0
  # The client prints its own version even when no engine answers (it exits
  # non-zero then).
  v=$("$1" version -f '{{.Client.Version}}' 2>/dev/null || true)
  v=${v%%$'\n'*}
  [[ "$v" =~ ^[0-9]+ ]] || return 1
  (( ${v%%.*} < 23 ))
}
if ! client_builds docker; then
  for candidate in $(type -ap docker); do
    if client_builds "$candidate"; then
      shim=$(mktemp -d)
      ln -s "$candidate" "$shim/docker"
      export PATH="$shim:$PATH"
      say "the first docker on PATH has no buildx; building with $candidate"
      break
    fi
  done
fi

if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose_cmd <<< "$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  command -v docker-compose >/dev/null || die "neither docker compose nor docker-compose found"
  compose_cmd=(docker-compose)
fi
say "using ${compose_cmd[*]} ($("${compose_cmd[@]}" version --short 2>/dev/null || echo '?'))"

# Free host ports: none of them may be the defaults, which a local RabbitMQ or an
# earlier compose project may hold.
picked=()
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 20000 ))
    [[ " ${picked[*]} " == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      picked+=("$p"); echo "$p"; return 0
    fi
  done
  die "no free port found"
}
RELAY_PORT=$(free_port); picked+=("$RELAY_PORT")
DEMO_PORT=$(free_port); picked+=("$DEMO_PORT")
RABBITMQ_AMQP_PORT=$(free_port); picked+=("$RABBITMQ_AMQP_PORT")
RABBITMQ_UI_PORT=$(free_port); picked+=("$RABBITMQ_UI_PORT")
RABBITMQ_PROMETHEUS_PORT=$(free_port)
export RELAY_PORT DEMO_PORT RABBITMQ_AMQP_PORT RABBITMQ_UI_PORT RABBITMQ_PROMETHEUS_PORT
project="wrcompose$$$RANDOM"
compose=("${compose_cmd[@]}" -p "$project")
say "project $project: relay :$RELAY_PORT, demo :$DEMO_PORT, AMQP :$RABBITMQ_AMQP_PORT, UI :$RABBITMQ_UI_PORT, broker metrics :$RABBITMQ_PROMETHEUS_PORT"

logs=$(mktemp -d)
finish() {
  local rc=$?
  if (( rc != 0 )); then
    say "logs of the failed run (last 15 lines per service):"
    "${compose[@]}" logs --no-color --tail 15 2>&1 || true
  fi
  say "down -v"
  "${compose[@]}" --profile observability down -v --remove-orphans >/dev/null 2>&1 ||
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$logs" "${shim:-}"
  say "timings:"
  printf '  %s\n' "${timings[@]}" "$(printf '%-34s %4ds' total $((SECONDS - t0)))"
  if (( rc == 0 )); then say "PASSED"; else say "FAILED (exit $rc)${failed_at:+ at line $failed_at}"; fi
  exit "$rc"
}
trap 'failed_at=${failed_at:-$LINENO}' ERR
trap finish EXIT
trap 'exit 130' INT TERM

# The observability profile is valid and adds its two services.
profile_services=$("${compose[@]}" --profile observability config --services | sort | tr '\n' ' ')
[ "$profile_services" = "demo-downstream grafana prometheus rabbitmq receiver worker " ] ||
  die "--profile observability config lists: $profile_services"
say "compose config: the observability profile is valid and adds prometheus and grafana"

say "building the image (the first build compiles the release binary: minutes)"
"${compose[@]}" build >"$logs/build" 2>&1 || { tail -n 40 "$logs/build"; die "build"; }
step_done "build (up --build)"
"${compose[@]}" up -d --build >"$logs/up" 2>&1 || { cat "$logs/up"; die "up -d --build"; }

# Healthy: every container of the project reports `healthy` (each has a healthcheck).
wait_healthy() {
  local want=$1 deadline=$((SECONDS + 180)) ids states
  while :; do
    ids=$("${compose[@]}" ps -q)
    states=$(for id in $ids; do docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"; done)
    # Exactly these: the observability profile's services stay off without the profile.
    if [ "$(grep -c ' healthy$' <<< "$states")" -eq "$want" ] && [ "$(grep -c . <<< "$states")" -eq "$want" ]; then
      return 0
    fi
    if (( SECONDS > deadline )); then echo "$states" >&2; die "not all $want containers healthy after 180 s"; fi
    sleep 2
  done
}
wait_healthy 4
say "4 containers healthy"
step_done "up until healthy"

api() { curl -fsS --max-time 10 -u guest:guest "http://127.0.0.1:$RABBITMQ_UI_PORT/api/$1"; }
queue_field() { api "queues/%2f/$1" | jq -r ".$2"; }
relay_cmd=("${compose[@]}" exec -T receiver webhook-relay)

n_queues=$(api "queues/%2f" | jq '[.[] | select(.name | startswith("webhooks."))] | length')
[ "$n_queues" = 14 ] || die "the broker holds $n_queues webhooks.* queues, expected 14"

# The demo: DEMO_EVENTS events through the relay and the failing demo downstream.
run_id="ct$$"
events=${COMPOSE_TEST_EVENTS:-200}
RELAY_URL="http://127.0.0.1:$RELAY_PORT" DEMO_DOWNSTREAM_URL="http://127.0.0.1:$DEMO_PORT" \
  DEMO_EVENTS=$events DEMO_RUN_ID=$run_id DEMO_TIMEOUT_S=240 RELAY_CMD="${relay_cmd[*]}" \
  scripts/demo.sh | tee "$logs/demo"
step_done "demo ($events events)"

# The demo downstream fails for good the events whose SHA-256 bucket is below
# DEMO_FAIL_PERCENT (10): bucket = first 8 bytes of sha256(len "fate" len id) mod 100.
u64be() { printf '\\x%02x' 0 0 0 0 0 0 0 "$1"; }
bucket() {
  local id=$1 hex hi lo
  hex=$(printf "$(u64be 4)fate$(u64be ${#id})%s" "$id" | sha256sum | cut -c1-16)
  hi=$((16#${hex:0:8})); lo=$((16#${hex:8:8}))
  # (hi * 2^32 + lo) mod 100, without leaving 64-bit signed arithmetic.
  echo $(( ((hi % 100) * 96 + lo % 100) % 100 ))
}
expected=$(for i in $(seq 1 "$events"); do
  id=$(printf 'demo-%s-%04d' "$run_id" "$i")
  if (( $(bucket "$id") < 10 )); then echo "$id"; fi
done | sort)
dlq_ids() { "${relay_cmd[@]}" dlq list --limit 0 --json | jq -r '.id' | sort; }

# Ready and unacknowledged messages, as the management API counts them (its figures
# trail the queues by a few seconds: polled).
deadline=$((SECONDS + 30))
while :; do
  work=$(queue_field webhooks.work messages)
  retry=$(api "queues/%2f" | jq '[.[] | select(.name | startswith("webhooks.retry.")) | .messages] | add')
  [ "$work" = 0 ] && [ "$retry" = 0 ] && break
  (( SECONDS < deadline )) || die "after the demo: work $work, retry $retry (expected 0 and 0)"
  sleep 1
done
got=$(dlq_ids)
[ "$got" = "$expected" ] || die "DLQ ids differ from the always-failing ids:
$(diff <(echo "$expected") <(echo "$got") || true)"
n_dlq=$(grep -c . <<< "$got" || true)
delivered=$(curl -fsS "http://127.0.0.1:$DEMO_PORT/stats?id_prefix=demo-$run_id-" | jq .delivered)
[ "$delivered" = $((events - n_dlq)) ] || die "delivered $delivered, expected $((events - n_dlq))"
say "demo result: work 0, retry 0, DLQ $n_dlq = the always-failing ids, delivered $delivered = the rest"

# Scale: three workers, three consumers on webhooks.work.
"${compose[@]}" up -d --scale worker=3 >"$logs/scale" 2>&1 || { cat "$logs/scale"; die "--scale worker=3"; }
wait_healthy 6
deadline=$((SECONDS + 60))
until [ "$(queue_field webhooks.work consumers)" = 3 ]; do
  (( SECONDS < deadline )) || die "webhooks.work has $(queue_field webhooks.work consumers) consumers, expected 3"
  sleep 1
done
say "--scale worker=3: 3 consumers on webhooks.work (management API)"
step_done "scale to 3 workers"

# The management UI, in a real browser.
if [ "${COMPOSE_TEST_SKIP_UI:-}" = 1 ]; then
  say "UI check SKIPPED (COMPOSE_TEST_SKIP_UI=1)"
else
  command -v node >/dev/null && command -v npm >/dev/null || die "the UI check needs node and npm"
  chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
  [ -n "$chromium" ] || die "the UI check needs Chromium (set CHROMIUM, or COMPOSE_TEST_SKIP_UI=1)"
  (cd ui-check && npm ci --silent --no-audit --no-fund >/dev/null)
  mkdir -p target
  node ui-check/queues-page.mjs "http://127.0.0.1:$RABBITMQ_UI_PORT" target/rabbitmq-queues.png \
    --chromium "$chromium"
  step_done "UI in headless Chromium"
fi

# The broker's metrics the dashboard and the alert rules name are real.
scrape=$( (curl -fsS "http://127.0.0.1:$RABBITMQ_PROMETHEUS_PORT/metrics"
  curl -fsS "http://127.0.0.1:$RABBITMQ_PROMETHEUS_PORT/metrics/detailed?family=queue_coarse_metrics&family=queue_metrics") |
  sed -n 's/^# TYPE \([a-z_]*\) .*/\1/p' | sort -u)
for name in $(grep -ohE 'rabbitmq_[a-z_]+' observability/alerts.yml observability/grafana/dashboards/*.json | sort -u); do
  grep -qx "$name" <<< "$scrape" || die "$name (observability/) is not in the broker's scrape"
done
say "broker metrics named in observability/ are in the broker's scrape"

# The DLQ lives in the named volume: a broker restart keeps it.
"${compose[@]}" restart rabbitmq >"$logs/restart" 2>&1 || { cat "$logs/restart"; die "restart rabbitmq"; }
wait_healthy 6
deadline=$((SECONDS + 60))
until [ "$(queue_field webhooks.dlq messages 2>/dev/null)" = "$n_dlq" ]; do
  (( SECONDS < deadline )) || die "webhooks.dlq holds $(queue_field webhooks.dlq messages) after the restart, expected $n_dlq"
  sleep 1
done
after=$(dlq_ids)
[ "$after" = "$got" ] || die "the DLQ changed across the broker restart ($(grep -c . <<< "$after") ids)"
say "broker restarted: the DLQ kept its $n_dlq events"
deadline=$((SECONDS + 60))
until [ "$(queue_field webhooks.work consumers)" = 3 ]; do
  (( SECONDS < deadline )) || die "the workers did not come back after the restart"
  sleep 1
done
say "after the restart the 3 workers consume again"
step_done "broker restart"
