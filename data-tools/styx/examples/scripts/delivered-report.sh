#!/bin/sh
# Counts the messages delivered in one hour and writes the report, then its marker.
# Exit 20 (Styx: "missing dependency", retried in 10 minutes) when the hour has no input yet.
set -eu
partition="$1"                       # 2026-11-29T14
date="${partition%T*}"               # 2026-11-29
hour="${partition#*T}"               # 14
in=/data/in
out="/data/out/reports/delivered/$date/$hour"

files=$(ls "$in"/*.jsonl 2>/dev/null || true)
if [ -z "$files" ]; then
  echo "no input in $in yet" >&2
  exit 20
fi
# Lines of that hour ("at":"2026-11-29T14:...") with outcome delivered.
delivered=$(cat $files | grep "\"at\":\"$partition:" | grep -c '"outcome":"delivered"' || true)
total=$(cat $files | grep -c "\"at\":\"$partition:" || true)
mkdir -p "$out"
printf '{"hour":"%s","delivered":%s,"total":%s}\n' "$partition" "$delivered" "$total" > "$out/report.json"
printf '{"type":"delivered","hour":"%s","completed_at":"%s","delivered":%s}\n' \
  "$partition" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$delivered" > "$out/_SUCCESS"
echo "report for $partition: $delivered of $total messages delivered"
