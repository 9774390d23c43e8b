#!/usr/bin/env bash
# Redis CPU per publish through the server API: starts `roomcast-cluster` (2 gateways, 2
# room-services, its own Redis), opens the subscribers, publishes with `loadgen publish-api`
# into room-service 0 and reports Redis's own CPU per publish (redis_cpu.py), then stops the
# cluster (by pid). Everything it starts runs on loopback, on the ports given.
#
#   bench/publish-cost/run.sh [--bin DIR] [--base-port P] [--rate R] [--duration D]
#                             [--rooms N] [--subscribers N] [--label L] [-- CLUSTER OPTIONS...]
#
# e.g. bench/publish-cost/run.sh --bin target/release --rate 5000 -- --room-env PUBLISH_BATCH_MS=2
#      bench/publish-cost/run.sh --bin target/release --rate 5000 -- --redis-cluster
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$HERE/../../target/release"
BASE=7400
RATE=5000
DURATION=20s
ROOMS=1000
SUBSCRIBERS=1000
LABEL=run
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --base-port) BASE="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --rooms) ROOMS="$2"; shift 2 ;;
    --subscribers) SUBSCRIBERS="$2"; shift 2 ;;
    --label) LABEL="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/publish-cost-$LABEL.XXXX")"
"$BIN/roomcast-cluster" --base-port "$BASE" --log-dir "$WORK/logs" "$@" >"$WORK/cluster.out" 2>&1 &
CLUSTER=$!
trap 'kill -INT $CLUSTER 2>/dev/null; wait $CLUSTER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "cluster is up" "$WORK/cluster.out" && break
  kill -0 $CLUSTER 2>/dev/null || { cat "$WORK/cluster.out" >&2; exit 1; }
  sleep 0.5
done
sleep 1
urls=$(grep -oE 'ws://127\.0\.0\.1:[0-9]+/ws' "$WORK/cluster.out" | paste -sd, -)
grpc=$(grep -m1 -oE 'room-service 0: +grpc http://[0-9.:]+' "$WORK/cluster.out" | grep -oE 'http://[0-9.:]+')
# On a Redis Cluster (`-- --redis-cluster`), its masters; otherwise the one redis-server.
redis_line=$(grep -E '^ +redis masters:' "$WORK/cluster.out" || grep -E '^ +redis:' "$WORK/cluster.out")
redis_ports=$(echo "$redis_line" | grep -oE '127\.0\.0\.1:[0-9]+' | cut -d: -f2 | paste -sd, -)
echo "== $LABEL: rate $RATE/s, $ROOMS rooms, $SUBSCRIBERS subscribers, $DURATION; cluster options: $*"
echo "   $(uptime | sed 's/.*load/load/'); logs in $WORK"
python3 "$HERE/redis_cpu.py" "$redis_ports" xadd -- "$BIN/loadgen" publish-api \
  --url "$urls" --secret roomcast-dev-secret --grpc "$grpc" --api-key roomcast-dev-api-key \
  --rooms "$ROOMS" --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --json
