#!/usr/bin/env bash
# Instructions Redis executes per published message in the publish script, counted by
# valgrind's callgrind: unlike CPU time, the count is the same from run to run whatever else
# the machine does, so a change to the script can be judged by a few hundred instructions.
#
#   bench/publish-cost/instructions.sh [SCRIPT.lua] [--batch N] [--rooms R] [--idem [+]MS]
#                                      [--lasting] [--layout records|batch]
#
# SCRIPT.lua is the script as Redis runs it (default: this checkout's prelude.lua followed by
# publish.lua). For each of two message counts it starts a redis-server of its own under
# callgrind (on a free loopback port), runs script_bench.py (batches of N messages round-robin
# into R rooms, one subscriber on every room channel) and stops it; the difference between
# the two totals, divided by the difference in messages, leaves out start-up and set-up.
# --idem MS: every message carries an idempotency record kept MS ms, as client publishes do
# (the gateway's retry key, 30000); +MS as the gateway's first try sends it (nothing to look
# up). --lasting: after its first publish a room is sent as refreshed lately, as a
# room-service does. --layout: the script's arguments, for scripts older than this checkout's
# (`batch`: before history entries held the retry records); see script_bench.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STORE="$HERE/../../room-service/src/store/redis"
SCRIPT=""
BATCH=32
ROOMS=1000
IDEM=0
LASTING=0
LAYOUT=records
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) BATCH="$2"; shift 2 ;;
    --rooms) ROOMS="$2"; shift 2 ;;
    --idem) IDEM="$2"; shift 2 ;;
    --lasting) LASTING=1; shift ;;
    --layout) LAYOUT="$2"; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) SCRIPT="$1"; shift ;;
  esac
done
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind not found" >&2; exit 2; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/publish-instructions.XXXX")"
REDIS=""
trap '[ -n "$REDIS" ] && kill "$REDIS" 2>/dev/null; rm -rf "$WORK"' EXIT
if [ -z "$SCRIPT" ]; then
  SCRIPT="$WORK/script.lua"
  cat "$STORE/prelude.lua" "$STORE/publish.lua" >"$SCRIPT"
fi
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Total instructions of a fresh redis-server that served `messages` published messages.
total() {
  local messages=$1 port
  port=$(free_port)
  rm -f "$WORK"/cg.out.*
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
  REDIS=$!
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  python3 "$HERE/script_bench.py" "$port" "$SCRIPT" "$LAYOUT" "$BATCH" "$messages" "$ROOMS" "$IDEM" "$LASTING" >/dev/null
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$REDIS" 2>/dev/null || true
  REDIS=""
  awk '/^(summary|totals):/ { print $2; exit }' "$WORK"/cg.out.*
}

# Whole batches, so both runs send exactly what they ask for.
few=$(((2000 + BATCH - 1) / BATCH * BATCH))
many=$(((10000 + BATCH - 1) / BATCH * BATCH))
a=$(total "$few")
b=$(total "$many")
echo "$(basename "$SCRIPT"): $(((b - a) / (many - few))) instructions per message" \
  "(batches of $BATCH, $ROOMS rooms, idempotency records: ${IDEM} ms, lasting: $LASTING; $few and $many messages)"
