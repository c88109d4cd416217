#!/usr/bin/env bash
# Gateway → Kafka → staging against a real `gabo serve` process on librdkafka's mock cluster
# (testkit's kafka-mock): events/s and the gateway's answer p50/p99 per request, each request
# a batch of NDJSON events. Bounded: the load runs [seconds] (at most 60), every step has a
# timeout, and the mock cluster and the server are stopped on every exit path. Not a test:
# figures go to docs/BENCHMARKS.md.
#   data-tools/gabo/bench/gateway.sh [seconds=20] [clients=16] [events-per-request=100]
# Needs, under $CARGO_TARGET_DIR (default target), debug/kafka-mock, a gabo binary and the
# gateway_bench example:
#   cargo build -p gabo --bins --examples && cargo build -p testkit --features kafka-mock
set -euo pipefail
SECS=${1:-20}
CLIENTS=${2:-16}
BATCH=${3:-100}
[ "$SECS" -le 60 ] || { echo "at most 60 seconds of load" >&2; exit 2; }
T=${CARGO_TARGET_DIR:-target}
PROFILE=$([ -x "$T/release/gabo" ] && echo release || echo debug)
GABO=${GABO:-$T/$PROFILE/gabo}
CLIENT=${CLIENT:-$T/$PROFILE/examples/gateway_bench}
MOCK=${MOCK:-$T/debug/kafka-mock}
for b in "$GABO" "$CLIENT" "$MOCK"; do
  [ -x "$b" ] || { echo "missing $b (see the build command at the top of $0)" >&2; exit 1; }
done
DIR=$(mktemp -d)
MOCK_PID= SERVE_PID=
# On every exit path: stop the server, then the mock cluster, and remove the data.
cleanup() {
  for p in $SERVE_PID $MOCK_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The mock cluster cannot create topics: it is started with the type's topic. It serves until
# its stdin closes: a FIFO held open by this script, so it ends with the script whatever way.
mkfifo "$DIR/mock.in"
"$MOCK" --topic gabo.bench:4 < "$DIR/mock.in" > "$DIR/brokers" &
MOCK_PID=$!
exec 3> "$DIR/mock.in"
for _ in $(seq 100); do [ -s "$DIR/brokers" ] && break; sleep 0.1; done
BROKERS=$(head -1 "$DIR/brokers")
[ -n "$BROKERS" ] || { echo "kafka-mock printed no address" >&2; exit 1; }
export GABO_BROKERS=$BROKERS GABO_ROOT=$DIR/out GABO_STAGING=$DIR/staging
cat > "$DIR/types.yaml" <<'YAML'
types:
  - name: bench
    owner: bench
    retention: 1d
    partitions: 4
    schema: {type: object, required: [user], properties: {user: {type: string}}}
YAML
# 15 s on the mock: it has no DescribeConfigs, whose timeout apply waits out.
timeout 60 "$GABO" apply -f "$DIR/types.yaml" > "$DIR/apply.out" 2>&1 \
  || { cat "$DIR/apply.out" >&2; exit 1; }
RUST_LOG=warn "$GABO" serve --listen 127.0.0.1:0 > "$DIR/serve.out" 2>&1 &
SERVE_PID=$!
ADDR=
for _ in $(seq 300); do
  ADDR=$(sed -n 's|^gateway listening on http://||p' "$DIR/serve.out" | head -1)
  [ -n "$ADDR" ] && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$DIR/serve.out" >&2; exit 1; }
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "gabo serve printed no address" >&2; exit 1; }
echo "gabo serve ($PROFILE) on $ADDR, kafka-mock on $BROKERS; $SECS s, $CLIENTS clients, $BATCH events per request"
GABO_GATEWAY=$ADDR timeout $((SECS * 4 + 60)) "$CLIENT" "$SECS" "$CLIENTS" "$BATCH"
echo "gabo serve peak RSS $(grep VmHWM /proc/$SERVE_PID/status | tr -s ' ' | cut -d' ' -f2-)"
