#!/usr/bin/env bash
# Roomcast benchmarks: builds the workspace in release mode, starts local clusters and the
# Socket.IO reference (two instances on one private Redis), runs the standard scenarios with the
# load generators, and writes docs/benchmarks.md (machine, versions, command lines, numbers).
#
#   bench/run.sh              the standard run (5-6 min plus the release build on a 2-core machine)
#   bench/run.sh --help
#
# Every process it starts is stopped on exit (trap EXIT), by pid. It starts its own redis-server
# processes on free ports and never touches a Redis or any other process it did not start.
# Everything runs on loopback.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/run.sh [options]

  --no-100k         skip the 100,000 idle connections over 6 gateways
  --pairs N         Roomcast / Socket.IO fan-out pairs, run in alternation A,B,A,B,... [3]
  --duration S      seconds of publishing in each fan-out run [10]
  --ladders N       capacity ladders per system (interleaved with the other system's) [2]
  --step-duration S seconds of publishing at each capacity step [5]
  --no-capacity     skip the capacity ladders
  --no-profile      skip the profiled fan-out round (perf record of the gateways)
  --no-build        use the existing target/release binaries
  --out FILE        where the report goes [docs/benchmarks.md]
  --work DIR        where raw results and logs go [a new directory under $TMPDIR]
  -h, --help
EOF
}

FULL=1
PAIRS=3
LADDERS=2
DURATION=10
STEP_DURATION=5
CAPACITY=1
PROFILE=1
BUILD=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/docs/benchmarks.md"
WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-100k) FULL=0 ;;
    --ladders) LADDERS="${2:?--ladders needs a number}"; shift ;;
    --pairs) PAIRS="${2:?--pairs needs a number}"; shift ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
    --step-duration) STEP_DURATION="${2:?--step-duration needs seconds}"; shift ;;
    --no-capacity) CAPACITY=0 ;;
    --no-profile) PROFILE=0 ;;
    --no-build) BUILD=0 ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    --work) WORK="${2:?--work needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for n in "$PAIRS" "$DURATION" "$STEP_DURATION" "$LADDERS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench/run.sh: '$n' is not a positive integer" >&2; exit 2; }
done

cd "$ROOT"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/roomcast-bench.XXXXXX")}"
mkdir -p "$WORK"
SECRET="bench-secret-$$"
BIN="$ROOT/target/release"
SIO="$ROOT/bench/socketio"
T_START=$SECONDS
# A process may hold at most 20,000 open files here; take what the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf '[bench %4ds] %s\n' "$((SECONDS - T_START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Processes we start, and their cleanup
# ---------------------------------------------------------------------------------------------
STARTED=()          # "pid:starttime" of everything started in the background, stopped on exit
CLUSTER_PID=""
CLUSTER_CHILDREN=() # "pid:starttime" of the processes roomcast-cluster started
SAMPLER_PID=""

# Start time (clock ticks since boot) of a pid: with the pid it names one process for good, so
# we never signal a process that merely reused the pid of one of ours.
proc_start() { awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$1/stat" 2>/dev/null || true; }
ours() { [ -n "$1" ] && echo "$1:$(proc_start "$1")"; }
signal_if_ours() { # signal "pid:starttime"
  local pid=${2%%:*} st=${2#*:}
  [ -n "$pid" ] && [ -n "$st" ] && [ "$(proc_start "$pid")" = "$st" ] && kill "-$1" "$pid" 2>/dev/null || true
}
alive_if_ours() { local pid=${1%%:*}; [ -n "$pid" ] && [ "$(proc_start "$pid")" = "${1#*:}" ]; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
  if [ -n "$CLUSTER_PID" ]; then stop_cluster; fi
  local e
  for e in "${STARTED[@]}"; do signal_if_ours TERM "$e"; done
  for _ in $(seq 50); do
    local alive=0
    for e in "${STARTED[@]}"; do alive_if_ours "$e" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for e in "${STARTED[@]}"; do signal_if_ours KILL "$e"; done
  if [ $rc -ne 0 ]; then log "failed (exit $rc); logs and raw results in $WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Sum of utime+stime (clock ticks) of the given pids; missing pids count 0.
ticks() {
  local files=() p
  for p in "$@"; do [ -r "/proc/$p/stat" ] && files+=("/proc/$p/stat"); done
  [ ${#files[@]} -eq 0 ] && { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); s += $12 + $13 } END { print s + 0 }' "${files[@]}" 2>/dev/null || echo 0
}

# Children's user+sys CPU of this shell so far, in seconds (reaped children: the load
# generators), into the variable named $1. `times` must run in this shell, not in a $(...).
children_cpu() {
  times >"$WORK/.times"
  printf -v "$1" '%s' "$(awk 'NR == 2 { s = 0
    for (i = 1; i <= NF; i++) { split($i, b, /[ms]/); s += b[1] * 60 + b[2] } print s }' "$WORK/.times")"
}

start_cluster() { # name gateways room-services [more roomcast-cluster options]
  local name=$1 gws=$2 rss=$3 out="$WORK/$1.cluster.out" i
  shift 3
  "$BIN/roomcast-cluster" --gateways "$gws" --room-services "$rss" --secret "$SECRET" \
    --log-dir "$WORK/$name-logs" "$@" >"$out" 2>&1 &
  CLUSTER_PID=$!
  for i in $(seq 600); do
    grep -q 'Ctrl-C or SIGTERM stops everything' "$out" 2>/dev/null && break
    kill -0 "$CLUSTER_PID" 2>/dev/null || { cat "$out" >&2; die "roomcast-cluster exited during start-up"; }
    sleep 0.1
  done
  grep -q 'Ctrl-C or SIGTERM stops everything' "$out" || die "roomcast-cluster did not start within 60 s ($out)"
  GW_URLS=$(awk '/^  gateway [0-9]+:/ { print $3 }' "$out" | paste -sd, -)
  GW_PIDS=() RS_PIDS=() AUTH_PID="" CREDIS_PID="" CLUSTER_CHILDREN=()
  local pid comm
  while read -r pid comm; do
    CLUSTER_CHILDREN+=("$(ours "$pid")")
    case "$comm" in
      gateway) GW_PIDS+=("$pid") ;;
      room-service) RS_PIDS+=("$pid") ;;
      auth-service) AUTH_PID=$pid ;;
      redis-server) CREDIS_PID=$pid ;;
    esac
  done < <(ps --ppid "$CLUSTER_PID" -o pid=,comm=)
  [ ${#GW_PIDS[@]} -eq "$gws" ] || die "expected $gws gateways under roomcast-cluster, found ${#GW_PIDS[@]}"
  ROOMCAST_PIDS=("${GW_PIDS[@]}" "${RS_PIDS[@]}" "$AUTH_PID")
  log "cluster '$name' up: gateways ${GW_PIDS[*]} ($GW_URLS), room-services ${RS_PIDS[*]}, auth $AUTH_PID, redis $CREDIS_PID"
}

stop_cluster() {
  [ -n "$CLUSTER_PID" ] || return 0
  kill -TERM "$CLUSTER_PID" 2>/dev/null || true
  local i p
  for i in $(seq 150); do kill -0 "$CLUSTER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$CLUSTER_PID" 2>/dev/null || true
  wait "$CLUSTER_PID" 2>/dev/null || true
  # Its children, in case it could not stop them (they are ours: started by our cluster).
  for p in "${CLUSTER_CHILDREN[@]}"; do signal_if_ours KILL "$p"; done
  CLUSTER_PID="" CLUSTER_CHILDREN=()
}

start_socketio() {
  SIO_REDIS_PORT=$(free_port)
  [ "$SIO_REDIS_PORT" != 6379 ] || SIO_REDIS_PORT=$(free_port)
  redis-server --port "$SIO_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --maxclients 10000 >"$WORK/socketio-redis.log" 2>&1 &
  SIO_REDIS_PID=$!
  STARTED+=("$(ours "$SIO_REDIS_PID")")
  local i
  for i in $(seq 100); do redis-cli -p "$SIO_REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$SIO_REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server on $SIO_REDIS_PORT did not start"
  SIO_PIDS=() SIO_URLS=()
  local k port
  for k in 0 1; do
    port=$(free_port)
    PORT=$port REDIS_URL="redis://127.0.0.1:$SIO_REDIS_PORT" JWT_SECRET="$SECRET" \
      node "$SIO/server.js" >"$WORK/socketio-$k.log" 2>&1 &
    SIO_PIDS+=("$!")
    STARTED+=("$(ours "$!")")
    SIO_URLS+=("http://127.0.0.1:$port")
  done
  for k in 0 1; do
    for i in $(seq 100); do curl -fs "${SIO_URLS[$k]}/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -fs "${SIO_URLS[$k]}/healthz" >/dev/null || die "socket.io server $k did not start (${SIO_URLS[$k]})"
  done
  SIO_URLS_CSV=$(IFS=,; echo "${SIO_URLS[*]}")
  log "socket.io reference up: servers ${SIO_PIDS[*]} ($SIO_URLS_CSV), redis $SIO_REDIS_PID on $SIO_REDIS_PORT"
}

# run NAME SERVER_PIDS REDIS_PID BOUND -- COMMAND...
# Runs a load generator, keeps its JSON (last line of stdout), and records the command, the CPU
# ticks of the server processes and of Redis before and after, the load generator's own CPU, and
# a 10 Hz CPU sample series (for the publishing-window figure).
# Waits (at most 30 s) until every server process of both systems is idle: below 3% of a core
# over half a second. Without this, a system still working off the backlog of the run before
# (Socket.IO queues seconds of messages past its capacity) slows the run that follows.
settle() {
  local all="${ROOMCAST_PIDS[*]:-} ${CREDIS_PID:-} ${SIO_PIDS[*]:-} ${SIO_REDIS_PID:-}" i a b
  local tck; tck=$(getconf CLK_TCK)
  for i in $(seq 60); do
    # shellcheck disable=SC2086
    a=$(ticks $all); sleep 0.5
    # shellcheck disable=SC2086
    b=$(ticks $all)
    [ $(( (b - a) * 100 )) -le $(( tck * 3 / 2 )) ] && return 0
  done
  log "servers still busy after 30 s; running anyway"
}

run() {
  local name=$1 server_pids=$2 redis_pid=$3 bound=$4
  shift 5
  settle
  local meta="$WORK/$name.meta" cmd
  cmd=$(printf '%q ' "$@")
  cmd=${cmd//"$SECRET"/\$SECRET}
  cmd=${cmd//"$ROOT/"/}
  # shellcheck disable=SC2086
  local s0 r0 c0 t0 s1 r1 c1 t1 rc=0
  ( while :; do printf '%s %s %s\n' "$EPOCHREALTIME" "$(ticks $server_pids)" "$(ticks $redis_pid)"; sleep 0.1; done ) \
    >"$WORK/$name.samples" 2>/dev/null &
  SAMPLER_PID=$!
  # shellcheck disable=SC2086
  s0=$(ticks $server_pids); r0=$(ticks $redis_pid); children_cpu c0; t0=$EPOCHREALTIME
  timeout --kill-after=10 "$bound" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
  # shellcheck disable=SC2086
  t1=$EPOCHREALTIME; s1=$(ticks $server_pids); r1=$(ticks $redis_pid); children_cpu c1
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=""
  tail -n 1 "$WORK/$name.out" >"$WORK/$name.json"
  {
    printf 'name\t%s\n' "$name"
    printf 'cmd\t%s\n' "$cmd"
    printf 'exit\t%s\n' "$rc"
    printf 'start\t%s\nend\t%s\n' "$t0" "$t1"
    printf 'server_ticks\t%s\nredis_ticks\t%s\n' "$((s1 - s0))" "$((r1 - r0))"
    printf 'loadgen_cpu_s\t%s\n' "$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')"
    printf 'clk_tck\t%s\n' "$(getconf CLK_TCK)"
  } >"$meta"
  if [ $rc -ne 0 ]; then
    log "$name: load generator exited $rc (see $WORK/$name.err)"
    tail -n 5 "$WORK/$name.err" >&2 || true
  fi
  return 0
}

# Field of a result JSON ('' when missing), e.g. jget fanout-x latency_ms.p99
jget() {
  node -e '
    let v; try { v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); } catch { v = undefined; }
    for (const k of process.argv[2].split(".")) v = v == null ? undefined : v[k];
    console.log(v == null ? "" : typeof v === "object" ? JSON.stringify(v) : v);' "$WORK/$1.json" "$2"
}

# A capacity step passes with every joined, zero loss, nothing refused or unanswered, no member
# dropped, and p99 <= 50 ms.
step_ok() {
  node -e '
    let r; try { r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); } catch { process.exit(1); }
    const empty = (o) => !o || Object.keys(o).length === 0;
    const ok = r.loss === 0 && r.received > 0 && r.unacked === 0 && empty(r.publish_errors) &&
      empty(r.setup_failures) && empty(r.disconnected) && r.latency_ms && r.latency_ms.p99 <= 50;
    process.exit(ok ? 0 : 1);' "$WORK/$1.json"
}

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
command -v redis-server >/dev/null || die "redis-server is not on PATH (Debian package redis-server)"
command -v node >/dev/null || die "node is not on PATH (Node.js 20)"
if [ $BUILD = 1 ]; then
  log "cargo build --release --workspace (log: $WORK/build.log)"
  cargo build --release --workspace >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; die "release build failed"; }
fi
for b in gateway room-service auth-service loadgen roomcast-cluster; do
  [ -x "$BIN/$b" ] || die "missing $BIN/$b (build the workspace in release mode)"
done
if [ ! -d "$SIO/node_modules" ]; then
  log "npm ci in bench/socketio"
  (cd "$SIO" && npm ci --no-audit --no-fund >"$WORK/npm.log" 2>&1) || { tail -n 20 "$WORK/npm.log" >&2; die "npm ci failed"; }
fi

# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------
lockver() { awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock"; }
npmver() { node -e 'const l=require(process.argv[1]); const p=l.packages["node_modules/"+process.argv[2]]; console.log(p?p.version:"?")' "$SIO/package-lock.json" "$1"; }
{
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  printf 'mem\t%s\n' "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  printf 'kernel\t%s\n' "$(uname -sr)"
  printf 'nofile\t%s\n' "$(ulimit -n)"
  printf 'loadavg_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  printf 'rustc\t%s\n' "$(rustc --version)"
  printf 'node\t%s\n' "$(node --version)"
  printf 'redis\t%s\n' "$(redis-server --version | sed 's/ sha=.*//')"
  printf 'commit\t%s\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- . ':!bench' ':!docs/benchmarks.md' 2>/dev/null || echo ' (with uncommitted changes)')"
  for c in tokio tokio-tungstenite tungstenite axum tonic prost redis; do printf 'crate_%s\t%s\n' "$c" "$(lockver "$c")"; done
  for p in socket.io socket.io-client @socket.io/redis-adapter socket.io-adapter engine.io engine.io-client ws redis jsonwebtoken; do
    printf 'npm_%s\t%s\n' "$p" "$(npmver "$p")"
  done
  printf 'pairs\t%s\nduration\t%s\nstep_duration\t%s\nladders\t%s\nfull\t%s\n' "$PAIRS" "$DURATION" "$STEP_DURATION" "$LADDERS" "$FULL"
} >"$WORK/machine.tsv"

# ---------------------------------------------------------------------------------------------
# 1. Idle connections on one gateway (~19,000) and connect rate
# ---------------------------------------------------------------------------------------------
start_cluster idle1 1 1
# --concurrency 100 (the default): more handshakes in flight makes no faster ramp here, only
# SYN retransmits (time-to-connect p99 near 1 s).
run idle-1gw "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 240 -- \
  "$BIN/loadgen" connections --url "$GW_URLS" --secret "$SECRET" --count 19000 --rate 0 \
  --concurrency 100 --hold 10s --duration 180s --gateway-pid "${GW_PIDS[0]}" --json
log "idle-1gw: connected $(jget idle-1gw connected), $(jget idle-1gw rss_per_connection_bytes) B RSS per connection, $(jget idle-1gw connect_rate) conn/s"
stop_cluster

# ---------------------------------------------------------------------------------------------
# 2. 100,000 idle connections over 6 gateways (skipped with --no-100k)
# ---------------------------------------------------------------------------------------------
if [ $FULL = 1 ]; then
  start_cluster idle6 6 2
  gwargs=()
  for p in "${GW_PIDS[@]}"; do gwargs+=(--gateway-pid "$p"); done
  run idle-6gw "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 420 -- \
    "$BIN/loadgen" connections --url "$GW_URLS" --secret "$SECRET" --count 100000 --rate 0 \
    --concurrency 200 --hold 10s --duration 360s "${gwargs[@]}" --json
  log "idle-6gw: connected $(jget idle-6gw connected), held $(jget idle-6gw held), $(jget idle-6gw rss_per_connection_bytes) B RSS per connection, $(jget idle-6gw connect_rate) conn/s"
  stop_cluster
fi

# ---------------------------------------------------------------------------------------------
# 3. Fan-out, Roomcast and Socket.IO in alternation; 4. capacity ladders
# ---------------------------------------------------------------------------------------------
# roomcast-cluster hands the gateways a fixed environment, so PUBLISH_RATE (100/s per
# connection, burst 200) cannot be raised from here: every run uses ceil(rate / 50) publishers,
# each at <= 50/s, and the Socket.IO runs use the same publishers.
pubs_for() { echo $(( ($1 + 49) / 50 )); }

# The one-publisher round sends 200 msg/s from one connection, above the default per-connection
# publish rate (100/s); the other rounds publish 50/s per connection.
start_cluster fanout 2 2 --gateway-env PUBLISH_RATE=1000 --gateway-env PUBLISH_BURST=2000
start_socketio
SIO_PIDS_S="${SIO_PIDS[*]}"
RC_PIDS_S="${ROOMCAST_PIDS[*]}"
BOUND=$((DURATION + 90))
P200=$(pubs_for 200)
fanout_roomcast() { # name rate publishers duration bound
  run "$1" "$RC_PIDS_S" "$CREDIS_PID" "$5" -- \
    "$BIN/loadgen" fanout --url "$GW_URLS" --secret "$SECRET" --subscribers 1000 --rooms 1 \
    --publishers "$3" --rate "$2" --payload 100 --duration "${4}s" --json
}
fanout_socketio() { # name rate publishers duration bound
  run "$1" "$SIO_PIDS_S" "$SIO_REDIS_PID" "$5" -- \
    node "$SIO/loadgen.js" --url "$SIO_URLS_CSV" --secret "$SECRET" --subscribers 1000 --rooms 1 \
    --publishers "$3" --rate "$2" --payload 100 --duration "${4}s" --json
}
summary() { echo "$(jget "$1" deliveries_per_sec)/s, loss $(jget "$1" loss), p99 $(jget "$1" latency_ms.p99) ms"; }

# A short warm-up of each system (connection pools, JIT), not counted.
fanout_roomcast warmup-roomcast 200 "$P200" 3 60
fanout_socketio warmup-socketio 200 "$P200" 3 60
log "warm-up done: roomcast $(summary warmup-roomcast); socket.io $(summary warmup-socketio)"
for round in $(seq "$PAIRS"); do
  fanout_roomcast "fanout-roomcast-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "fanout-roomcast-$round: $(summary "fanout-roomcast-$round")"
  fanout_socketio "fanout-socketio-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "fanout-socketio-$round: $(summary "fanout-socketio-$round")"
done
# The same load from ONE publishing connection (a game host, a feed bridge): a connection's
# publishes must not be serialized on their round trips.
fanout_roomcast onepub-roomcast 200 1 "$DURATION" "$BOUND"
log "onepub-roomcast: $(summary onepub-roomcast)"
fanout_socketio onepub-socketio 200 1 "$DURATION" "$BOUND"
log "onepub-socketio: $(summary onepub-socketio)"

# One more Roomcast round with the gateways profiled over its publishing window (set-up of the
# 1000 members takes about 3 s): where a delivery's CPU goes. Skipped without a working perf.
if [ $PROFILE = 1 ] && perf stat -e cpu-clock true >/dev/null 2>&1; then
  PSECS=$((DURATION > 8 ? DURATION - 4 : 4))
  GW_PIDS_CSV=$(IFS=,; echo "${GW_PIDS[*]}")
  ( sleep 4; "$ROOT/bench/profile.sh" "$GW_PIDS_CSV" "$PSECS" "$WORK/profile" >/dev/null 2>"$WORK/profile.err" ) &
  PROFILER_PID=$!
  fanout_roomcast profile-roomcast 200 "$P200" "$((PSECS + 6))" "$BOUND"
  wait "$PROFILER_PID" || log "profile failed (see $WORK/profile.err)"
  log "profile-roomcast: $(summary profile-roomcast); gateways' profile in $WORK/profile.txt"
else
  log "perf unavailable or --no-profile: no profile"
fi

if [ $CAPACITY = 1 ]; then
  # Interleaved ladders: at each rate Roomcast then Socket.IO, each ladder stopping at its first
  # failing step. A failing step is tried once more (this machine is shared: one burst of
  # someone else's build should not end a ladder); it fails when both tries fail.
  SBOUND=$((STEP_DURATION + 90))
  step() { # system ladder rate -> 0 pass, 1 fail
    local sys=$1 l=$2 rate=$3 np try name
    np=$(pubs_for "$rate")
    for try in 1 2; do
      name="cap-$sys-l$l-$rate"
      [ $try = 1 ] || name="$name-retry"
      "fanout_$sys" "$name" "$rate" "$np" "$STEP_DURATION" "$SBOUND"
      if step_ok "$name"; then log "$name: pass ($(summary "$name"))"; return 0; fi
      log "$name: FAIL ($(summary "$name"))"
    done
    return 1
  }
  for l in $(seq "$LADDERS"); do
    RC_ALIVE=1 SIO_ALIVE=1
    for rate in 10 25 50 75 100 150 200 300 400 600 800 1000 1200 1600 2000; do
      [ $RC_ALIVE = 1 ] || [ $SIO_ALIVE = 1 ] || break
      if [ $RC_ALIVE = 1 ]; then step roomcast "$l" "$rate" || RC_ALIVE=0; fi
      if [ $SIO_ALIVE = 1 ]; then step socketio "$l" "$rate" || SIO_ALIVE=0; fi
    done
  done
fi
stop_cluster
printf 'loadavg_end\t%s\nelapsed_s\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" "$((SECONDS - T_START))" >>"$WORK/machine.tsv"

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
node "$ROOT/bench/report.js" "$WORK" "$OUT"
log "done in $((SECONDS - T_START)) s"
echo "Results: $OUT (raw JSON, CPU samples and logs: $WORK)"
