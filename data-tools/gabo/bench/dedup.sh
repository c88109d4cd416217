#!/usr/bin/env bash
# Dedup of one staged hour much larger than the dedup's memory limit, next to `sort -u` on the
# same IDs in the same run. Prints time, peak RSS (GNU time) and spill bytes of each. Not a
# test: figures go to docs/BENCHMARKS.md.
#   data-tools/gabo/bench/dedup.sh [events=2000000] [memory-limit=32MiB] [gabo binary]
# The binary defaults to the release build, else the debug one, under $CARGO_TARGET_DIR.
# DEDUP_DATA=DIR keeps the generated hour in DIR/gen-{events} and reuses it in later runs
# (each run dedups a hard-linked copy, since the dedup removes the staging files it closed).
set -euo pipefail
N=${1:-2000000}
LIMIT=${2:-32MiB}
T=${CARGO_TARGET_DIR:-target}
GABO=${3:-$([ -x "$T/release/gabo" ] && echo "$T/release/gabo" || echo "$T/debug/gabo")}
[ -x "$GABO" ] || { echo "no gabo binary at $GABO (build it, or pass its path as the 3rd argument)" >&2; exit 1; }
command -v /usr/bin/time >/dev/null || apt-get install -y time >/dev/null
DIR=$(mktemp -d)
MONITOR=
# On every exit path (success, a failed dedup under `set -e`, Ctrl-C): stop the spill monitor
# and remove the data.
cleanup() {
  if [ -n "$MONITOR" ]; then kill "$MONITOR" 2>/dev/null || true; wait "$MONITOR" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
GEN=${DEDUP_DATA:+$DEDUP_DATA/gen-$N}
GEN=${GEN:-$DIR/gen}
# 10 % duplicates: every 10th event repeats the ID (and payload) of the event 5 before it.
[ -f "$GEN/done" ] || { rm -rf "$GEN"; mkdir -p "$GEN"; python3 - "$N" "$GEN" <<'EOF'
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
touch "$GEN/done"; }
cp -al "$GEN/staging" "$DIR/staging"
ln -s "$GEN/ids.txt" "$DIR/ids.txt"
echo "staged: $N events, $(du -sh "$DIR/staging" | cut -f1) of NDJSON; memory limit $LIMIT"
echo "--- gabo dedup ($GABO)"
# The spill directory's largest size during the run, sampled every 0.2 s (spill files are
# removed when the dedup ends); gabo also prints what its aggregation spilled.
# watch_max DIR FILE: in the background, keeps in FILE the largest size DIR reached.
watch_max() {
  mkdir -p "$1"
  ( max=0; while :; do
      s=$(du -sb "$1" 2>/dev/null | cut -f1); s=${s:-0}
      [ "$s" -gt "$max" ] && max=$s && echo "$max" > "$2"
      sleep 0.2
    done ) &
  MONITOR=$!
}
watch_max "$DIR/staging/_spill" "$DIR/spill_max"
TIMEFMT="wall %e s, user %U s, sys %S s, peak RSS %M KiB"
if ! /usr/bin/time -f "$TIMEFMT" -o "$DIR/gabo.time" \
  "$GABO" --root "$DIR/out" --staging "$DIR/staging" dedup bench 2026-11-29T14 --force \
  --memory-limit "$LIMIT" > "$DIR/gabo.out" 2>&1; then
  tail -20 "$DIR/gabo.out" >&2; echo "gabo dedup failed" >&2; exit 1
fi
kill "$MONITOR"; wait "$MONITOR" 2>/dev/null || true; MONITOR=
grep -E '^(closed|spilled) ' "$DIR/gabo.out"
cat "$DIR/gabo.time"
# Peak RSS against the limit (the limit in MiB or GiB, as passed).
awk -v lim="$LIMIT" '/peak RSS/ { kib = $(NF-1); n = lim + 0; if (lim ~ /GiB$/) n *= 1024;
  printf "peak RSS %.0f MiB = %.2fx the %s limit\n", kib / 1024, kib / 1024 / n, lim }' "$DIR/gabo.time"
echo "spill directory at most $(( $(cat "$DIR/spill_max" 2>/dev/null || echo 0) / 1048576 )) MiB"
rate() { awk -v n="$N" '/^wall/ { gsub(",", ""); printf "%.0f events/s, %.0f events per CPU-second\n", n / $2, n / ($5 + $8) }' "$1"; }
rate "$DIR/gabo.time"
# sort's buffer is held to the same limit (GNU sort takes K/M/G suffixes); C locale, as the
# dedup compares bytes. sort spills sorted runs to $TMPDIR: sample that like the above.
SORTLIMIT=${LIMIT%iB}
echo "--- sort -u -S $SORTLIMIT on the same IDs"
watch_max "$DIR/sorttmp" "$DIR/sort_spill_max"
LC_ALL=C /usr/bin/time -f "$TIMEFMT" -o "$DIR/sort.time" \
  sort -u -S "$SORTLIMIT" -T "$DIR/sorttmp" "$DIR/ids.txt" -o "$DIR/ids.sorted"
kill "$MONITOR"; wait "$MONITOR" 2>/dev/null || true; MONITOR=
echo "unique $(wc -l < "$DIR/ids.sorted")"
cat "$DIR/sort.time"
echo "temporary files at most $(( $(cat "$DIR/sort_spill_max" 2>/dev/null || echo 0) / 1048576 )) MiB"
rate "$DIR/sort.time"
