#!/usr/bin/env bash
# Sends a burst of sample Genesys Cloud events to a running relay, then prints the
# queue depths every second until the work and retry queues are empty (and every
# event is delivered or dead-lettered), and ends with the DLQ count.
# Works against `docker compose up` or a local `webhook-relay serve` plus
# `webhook-relay demo-downstream`. Stops by itself: success, or DEMO_TIMEOUT_S.
#
#   scripts/demo.sh                  # 50 events to http://127.0.0.1:8000
#   DEMO_EVENTS=200 scripts/demo.sh
#
# Environment:
#   RELAY_URL            the receiver (default http://127.0.0.1:8000)
#   DEMO_DOWNSTREAM_URL  the demo downstream, read for GET /stats (default
#                        http://127.0.0.1:9000); without it the script waits for the
#                        queues to stay empty for 3 readings instead
#   DEMO_EVENTS          events to send, 1 to 10000 (default 50)
#   DEMO_PARALLEL        requests in flight, 1 to 100 (default 10)
#   DEMO_TIMEOUT_S       longest wait for the queues to drain (default 180)
#   DEMO_RUN_ID          event ids are demo-<run id>-<nnnn> (default: time and pid)
#   RELAY_CMD            how to run `webhook-relay` for `topology status`; default
#                        `docker compose exec -T receiver webhook-relay` when the
#                        compose receiver runs, else `cargo run -q --`. The command
#                        must see the relay's AMQP_URL, QUEUE_PREFIX and BACKOFF_*.
set -euo pipefail
cd "$(dirname "$0")/.."

relay_url=${RELAY_URL:-http://127.0.0.1:8000}
downstream_url=${DEMO_DOWNSTREAM_URL:-http://127.0.0.1:9000}
events=${DEMO_EVENTS:-50}
parallel=${DEMO_PARALLEL:-10}
timeout_s=${DEMO_TIMEOUT_S:-180}
run_id=${DEMO_RUN_ID:-$(date +%s)-$$}

die() { echo "demo: $*" >&2; exit 1; }
whole() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || (( $2 < $3 || $2 > $4 )); then
    die "$1 must be a number from $3 to $4, got '$2'"
  fi
}
whole DEMO_EVENTS "$events" 1 10000
whole DEMO_PARALLEL "$parallel" 1 100
whole DEMO_TIMEOUT_S "$timeout_s" 1 86400
[[ $run_id =~ ^[A-Za-z0-9_.-]+$ ]] || die "DEMO_RUN_ID may hold only letters, digits and . _ -"
command -v curl >/dev/null || die "curl is needed"

if [ -n "${RELAY_CMD:-}" ]; then
  read -r -a relay <<< "$RELAY_CMD"
elif docker compose ps --status running -q receiver 2>/dev/null | grep -q .; then
  relay=(docker compose exec -T receiver webhook-relay)
else
  relay=(cargo run -q --)
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Sets work, retry, dlq (message counts), dlq_name and levels ("01-2s:3 02-4s:1").
read_depths() {
  local out
  out=$("${relay[@]}" topology status 2>"$tmp/status.err") || return 1
  read -r work retry dlq dlq_name levels < <(awk '
    NR > 1 && $1 == "work"  { w += $3 }
    NR > 1 && $1 == "retry" { r += $3; if ($3 > 0) { n = $2; sub(/.*\.retry\./, "", n); l = l " " n ":" $3 } }
    NR > 1 && $1 == "dlq"   { q += $3; name = $2 }
    END { printf "%d %d %d %s%s\n", w, r, q, name, l }' <<< "$out")
}

# Distinct events of this run the demo downstream accepted, or "?" without it.
delivered_count() {
  local n
  n=$(curl -fsS --max-time 2 "$downstream_url/stats?id_prefix=demo-$run_id-" 2>/dev/null |
        sed -n 's/.*"delivered":\([0-9]*\).*/\1/p') || true
  echo "${n:-?}"
}

echo "demo: waiting for the relay at $relay_url/readyz"
for i in $(seq 1 30); do
  if curl -fsS -o /dev/null --max-time 2 "$relay_url/readyz" 2>/dev/null; then break; fi
  if (( i == 30 )); then die "the relay at $relay_url is not ready after 30 tries (is it running?)"; fi
  sleep 1
done
read_depths || die "cannot read the queue depths with '${relay[*]} topology status': $(tail -n 1 "$tmp/status.err")"
dlq_before=$dlq
if [ "$(delivered_count)" = "?" ]; then
  echo "demo: no demo downstream at $downstream_url; waiting for 3 empty readings instead"
fi

# One EventBridge-style Genesys Cloud event; the id doubles as the Idempotency-Key.
send_one() {
  local id now body answer
  id=$(printf 'demo-%s-%04d' "$run_id" "$1")
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  body=$(printf '{"version":"0","id":"%s","detail-type":"v2.detail.events.conversation.{id}.customer.end","source":"aws.partner/genesys.com/cloud/demo-org/webhook-relay-demo","account":"000000000000","time":"%s","region":"us-east-1","resources":[],"detail":{"topicName":"v2.detail.events.conversation.%s.customer.end","version":"2","timestamp":"%s","eventBody":{"conversationId":"%s","participantId":"demo-participant","mediaType":"VOICE","disconnectType":"CLIENT"},"metadata":{"CorrelationId":"%s"}}}' \
    "$id" "$now" "$id" "$now" "$id" "$id")
  answer=$(curl -sS --max-time 30 -H 'content-type: application/json' --data-binary "$body" \
             -w ' HTTP=%{http_code}' "$relay_url/webhooks/genesys-demo" 2>&1) || true
  local code=${answer##*HTTP=} word
  word=$(sed -n 's/.*"status":"\([a-z_]*\)".*/\1/p' <<< "$answer")
  echo "$code ${word:-no_answer}" >> "$tmp/answers"
}

echo "demo: sending $events events (ids demo-$run_id-0001...), $parallel at a time"
for (( i = 1; i <= events; i++ )); do
  send_one "$i" &
  if (( i % parallel == 0 )); then wait; fi
done
wait
accepted=$(grep -c '^2' "$tmp/answers" || true)
echo "demo: answers from the relay:"
sort "$tmp/answers" | uniq -c | awk '{ printf "  %5d x HTTP %s %s\n", $1, $2, $3 }'
(( accepted > 0 )) || die "the relay accepted none of the events"

echo "demo: queue depths every second until work and retry are empty"
start=$SECONDS
empty_readings=0
while :; do
  elapsed=$(( SECONDS - start ))
  if read_depths; then
    delivered=$(delivered_count)
    added=$(( dlq - dlq_before ))
    printf '[%3ds] work %4d | retry %4d%s | dlq %4d (+%d) | delivered %s/%d\n' \
      "$elapsed" "$work" "$retry" "${levels:+ (${levels# })}" "$dlq" "$added" "$delivered" "$accepted"
    if (( work == 0 && retry == 0 )); then
      empty_readings=$(( empty_readings + 1 ))
      if [ "$delivered" != "?" ]; then
        # Un-acked deliveries do not show in the counts: done only when every
        # accepted event is accounted for.
        if (( delivered + added >= accepted )); then break; fi
      elif (( empty_readings >= 3 )); then
        break
      fi
    else
      empty_readings=0
    fi
  else
    printf '[%3ds] cannot read the queue depths: %s\n' "$elapsed" "$(tail -n 1 "$tmp/status.err")"
  fi
  if (( elapsed >= timeout_s )); then
    die "the queues did not drain within ${timeout_s}s (DEMO_TIMEOUT_S)"
  fi
  sleep 1
done

failed=$(( events - accepted ))
if (( failed > 0 )); then
  echo "demo: $failed events were not accepted by the relay (see the answers above)"
fi
echo "DLQ: $dlq messages in $dlq_name ($added from this run)"
(( failed == 0 ))
