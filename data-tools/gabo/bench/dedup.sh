#!/usr/bin/env bash
# Dedup of one staged hour much larger than the dedup's memory limit, next to `sort -u` on the
# same IDs in the same run. Prints time and peak RSS of each (GNU time). Not a test: figures
# go to docs/BENCHMARKS.md.
#   data-tools/gabo/bench/dedup.sh [events=2000000] [memory-limit=32MiB] [gabo binary]
set -euo pipefail
N=${1:-2000000}
LIMIT=${2:-32MiB}
GABO=${3:-${CARGO_TARGET_DIR:-target}/release/gabo}
[ -x "$GABO" ] || { echo "no gabo binary at $GABO (build it, or pass its path as the 3rd argument)" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || apt-get install -y time >/dev/null
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
# 10 % duplicates: every 10th event repeats the ID (and payload) of the event 5 before it.
python3 - "$N" "$DIR" <<'EOF'
import json, os, sys
n, d = int(sys.argv[1]), sys.argv[2]
hour = os.path.join(d, "staging", "bench", "2026-11-29", "14")
os.makedirs(hour)
parts = [open(os.path.join(hour, f"p{p}.ndjson"), "w") for p in range(4)]
ids = open(os.path.join(d, "ids.txt"), "w")
at = "2026-11-29T14:05:00.000Z"
for k in range(n):
    i = k - 5 if k % 10 == 9 else k
    eid = f"{i:016x}-{(i * 2654435761) % (1 << 32):08x}"
    payload = json.dumps({"id": eid, "user": f"user-{i % 100000}", "n": i, "kind": "delivered"})
    p = k % 4
    parts[p].write(json.dumps({"id": eid, "received_at": at, "src": f"{p}:{k}:0", "payload": payload}) + "\n")
    ids.write(eid + "\n")
for f in parts: f.close()
ids.close()
EOF
echo "staged: $N events, $(du -sh "$DIR/staging" | cut -f1) of NDJSON; memory limit $LIMIT"
echo "--- gabo dedup"
# The spill directory's largest size during the run, sampled every 0.2 s (spill files are
# removed when the dedup ends).
mkdir -p "$DIR/staging/_spill"
( max=0; while [ ! -e "$DIR/done" ]; do
    s=$(du -sb "$DIR/staging/_spill" 2>/dev/null | cut -f1); s=${s:-0}
    [ "$s" -gt "$max" ] && max=$s && echo "$max" > "$DIR/spill_max"
    sleep 0.2
  done ) &
/usr/bin/time -f "wall %e s, user %U s, sys %S s, peak RSS %M KiB" \
  "$GABO" --root "$DIR/out" --staging "$DIR/staging" dedup bench 2026-11-29T14 --force --memory-limit "$LIMIT" 2>&1 | grep -v '^\s*$' | tail -2
touch "$DIR/done"; wait
echo "spill directory at most $(( $(cat "$DIR/spill_max" 2>/dev/null || echo 0) / 1048576 )) MiB"
echo "--- sort -u on the same IDs"
/usr/bin/time -f "wall %e s, user %U s, sys %S s, peak RSS %M KiB" sh -c "sort -u '$DIR/ids.txt' | wc -l" 2>&1
