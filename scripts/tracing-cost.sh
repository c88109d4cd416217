#!/bin/bash
# Cost of span export on the admin push path (docs/BENCHMARKS.md, "Tracing cost").
# usage: scripts/tracing-cost.sh off|1.0|0.01   (off, or the sampling rate the sink serves)
set -u
# PROFILE=release for release binaries (cargo build --release -p push-server -p push-lib)
B=${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}
MODE=$1
OTLP=()
if [ "$MODE" != off ]; then
  python3 "$(dirname "$0")/otlp-sink.py" 14318 "$MODE" & SINK=$!
  OTLP=(--otlp-endpoint http://127.0.0.1:14318)
fi
$B/push-server --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090 --auth-secret bench-secret-0123456789abcdef0123 --admin-token bench-admin-token "${OTLP[@]}" >/dev/null 2>&1 & SRV=$!
sleep 12   # the node's first sampling-rule fetch is 10 s after start
$B/push-send --direct http://127.0.0.1:19090 --admin-token bench-admin-token --users 100 --count ${COUNT:-20000} --rate 0 --in-flight 64 --data 'n={n}' | tail -1
curl -s http://127.0.0.1:19090/metrics -H "Authorization: Bearer bench-admin-token" | grep -E "^telemetry_spans" ; kill $SRV; [ "$MODE" != off ] && kill $SINK
wait 2>/dev/null
