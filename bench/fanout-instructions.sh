#!/usr/bin/env bash
# User-space instructions per delivery of the front processes (Roomcast's gateways, or the floor
# reference) in a one-room fan-out, counted by valgrind's callgrind. CPU time per delivery swings
# by ±15% between runs on a shared 2-core machine (/proc ticks, other load); on a quiet machine
# the instruction count stays within about 1% from run to run (482-488 for one build, three runs),
# so a change to the delivery path can be judged by a few instructions. A busy machine changes
# how the work batches (506 for a build that counts 397 quietly): count on a quiet one. It leaves out the kernel (the write system calls themselves), which is
# most of a delivery's cost: see docs/benchmarks.md for the time.
#
#   bench/fanout-instructions.sh [--bin DIR] [--system roomcast|floor] [--subscribers N]
#                                [--rooms R] [--rate R] [--window S]
#                                [--process gateway|room-service] [--gateway-env KEY=VALUE]…
#
# Roomcast: `roomcast-cluster` with 2 gateways (each started under callgrind through a wrapper),
# 1 room-service, `WRITE_DELAY_MS=0` (one write per delivery, as the floor does); with
# `--process room-service` the room-service runs under callgrind instead (its user-space
# instructions per message); `--gateway-env` adds a gateway setting (e.g.
# `PUBLISH_BATCH_MS=100`: calls that carry many publishes, to count the per-message work
# without the per-call work); the floor: one
# `floor` process under callgrind. Then `loadgen fanout` into one room (1 publisher, R msg/s,
# 100-byte payloads), or with `--rooms` into that many rooms (one more member each, its
# publisher; R msg/s in all), where the per-message work (the publish call, the broker's
# delivery to each gateway) weighs as much as the fan-out; the counts are zeroed once the members are in and dumped S seconds later,
# and their sum is divided by the deliveries of that window. Under callgrind the front runs
# about 50 times slower: the default load (1000 subscribers x 20 msg/s) keeps it well within one
# core. Everything runs on free loopback ports and is stopped on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$HERE/../target/release"
SYSTEM=roomcast
SUBSCRIBERS=1000
ROOMS=1
RATE=20
WINDOW=10
PROCESS=gateway
GATEWAY_ENV=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --system) SYSTEM="$2"; shift 2 ;;
    --subscribers) SUBSCRIBERS="$2"; shift 2 ;;
    --rooms) ROOMS="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --window) WINDOW="$2"; shift 2 ;;
    --process) PROCESS="$2"; shift 2 ;;
    --gateway-env) GATEWAY_ENV+=(--gateway-env "$2"); shift 2 ;;
    -h|--help) sed -n 2,25p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { echo "fanout-instructions.sh: valgrind not found" >&2; exit 2; }
BIN="$(cd "$BIN" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fanout-instructions.XXXX")"
SERVER=""
LOADGEN=""
# Keeps the script's own exit status.
cleanup() {
  local rc=$?
  [ -z "$LOADGEN" ] || kill "$LOADGEN" 2>/dev/null || true
  if [ -n "$SERVER" ]; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true # 143 after SIGTERM: not this script's status
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$SYSTEM" in
  roomcast)
    # roomcast-cluster runs the binaries in ROOMCAST_BIN_DIR: there the gateway is a wrapper
    # that starts the real one under callgrind.
    mkdir -p "$WORK/bin"
    case "$PROCESS" in
      gateway|room-service) ;;
      *) echo "--process gateway or room-service" >&2; exit 2 ;;
    esac
    for b in gateway room-service auth-service; do
      [ "$b" = "$PROCESS" ] || ln -s "$BIN/$b" "$WORK/bin/$b"
    done
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/cg.%%p %s "$@"\n' \
      "$WORK" "$BIN/$PROCESS" >"$WORK/bin/$PROCESS"
    chmod +x "$WORK/bin/$PROCESS"
    ROOMCAST_BIN_DIR="$WORK/bin" "$BIN/roomcast-cluster" --gateways 2 --room-services 1 --secret s --worker-threads 1 \
      --log-dir "$WORK/logs" --gateway-env WRITE_DELAY_MS=0 "${GATEWAY_ENV[@]}" >"$WORK/cluster.out" 2>&1 &
    SERVER=$!
    for _ in $(seq 600); do
      grep -q 'Ctrl-C or SIGTERM stops everything' "$WORK/cluster.out" && break
      kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/cluster.out" >&2; exit 1; }
      sleep 0.2
    done
    URLS=$(awk '/^  gateway [0-9]+:/ { print $3 }' "$WORK/cluster.out" | paste -sd, -)
    ;;
  floor)
    port=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$BIN/floor" \
      --addr "127.0.0.1:$port" --threads 1 >"$WORK/floor.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
    URLS="ws://127.0.0.1:$port/ws"
    ;;
  *) echo "--system roomcast or floor" >&2; exit 2 ;;
esac
[ -n "$URLS" ] || { echo "fanout-instructions.sh: no server address" >&2; exit 1; }
PIDS=$(pgrep -f "callgrind-out-file=$WORK/" | paste -sd' ')
[ -n "$PIDS" ] || { echo "fanout-instructions.sh: no process under callgrind" >&2; exit 1; }

# Members join in the first seconds (slowly, under callgrind); the window starts after that.
SETTLE=12
"$BIN/loadgen" fanout --url "$URLS" --secret s --subscribers "$SUBSCRIBERS" --rooms "$ROOMS" --publishers "$ROOMS" \
  --rate "$RATE" --payload 100 --duration "$((SETTLE + WINDOW + 3))s" --json >"$WORK/loadgen.json" 2>"$WORK/loadgen.err" &
LOADGEN=$!
sleep "$SETTLE"
for p in $PIDS; do callgrind_control -z "$p" >/dev/null 2>&1; done
sleep "$WINDOW"
for p in $PIDS; do callgrind_control -d "$p" >/dev/null 2>&1; done
wait "$LOADGEN" || { cat "$WORK/loadgen.err" >&2; exit 1; }
LOADGEN=""
total=0
for f in "$WORK"/cg.*.1; do
  n=$(awk '/^(summary|totals):/ { print $2; exit }' "$f")
  total=$((total + n))
done
LABEL=$SYSTEM
# run.sh reads "roomcast:" and "floor:" lines (the gateways and the floor).
[ "$PROCESS" = room-service ] && LABEL="roomcast room-service"
python3 - "$WORK/loadgen.json" "$total" "$WINDOW" "$LABEL" "$SUBSCRIBERS" "$RATE" "$ROOMS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
total, window = int(sys.argv[2]), float(sys.argv[3])
system, subscribers, rate, rooms = sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
loss = r.get("loss")
if loss:
    sys.exit(f"fanout-instructions.sh: the run lost messages ({loss}): the front could not keep up")
deliveries = r["deliveries_per_sec"] * window
publishes = r["published_per_sec"] * window
where = f"{subscribers} subscribers x {rate} msg/s" if rooms == 1 else \
    f"{rooms} rooms, {subscribers} subscribers, {rate} msg/s in all"
print(f"{system}: {total / deliveries:.0f} user-space instructions per delivery, "
      f"{total / publishes:.0f} per message ({where}, {window:.0f} s window, {total} instructions, "
      f"p99 {r['latency_ms']['p99']} ms)")
PY
