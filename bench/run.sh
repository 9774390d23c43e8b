#!/usr/bin/env bash
# Roomcast benchmarks: builds the workspace in release mode, starts local clusters, the
# Socket.IO reference (instances on one private Redis) and the floor reference (bench/floor),
# runs the standard scenarios with the load generators, and writes docs/benchmarks.md (machine,
# load average per round, versions, command lines, numbers) and its figures (docs/img/*.svg).
#
#   bench/run.sh              the standard run (15-20 min plus the release build on a 2-core machine)
#   bench/run.sh --quick      a short run (BENCH_QUICK=1 does the same): about 5 min
#   bench/run.sh --help
#
# Every process it starts is stopped on exit (trap EXIT), by pid. It starts its own redis-server
# processes on free ports and never touches a Redis or any other process it did not start.
# Everything runs on loopback.
set -euo pipefail

usage() {
  cat <<'EOF2'
Usage: bench/run.sh [options]

  --quick           a short run: --no-100k --pairs 1 --duration 5 --ladders 1 --no-profile,
                    many rooms with 2,000 rooms and 3 s steps (also BENCH_QUICK=1)
  --no-100k         skip the 100,000 idle connections over 6 gateways
  --pairs N         Roomcast / Socket.IO / floor fan-out rounds, run in alternation [3]
  --duration S      seconds of publishing in each fan-out run [10]
  --ladders N       capacity ladders per system (interleaved with the other systems') [2]
  --step-duration S seconds of publishing at each capacity step [5]
  --no-capacity     skip the capacity ladders
  --no-profile      skip the profiled fan-out round (perf record of the gateways)
  --rooms N         rooms of 5 members (4 subscribers, 1 publisher) in the many-rooms ramp [10000]
  --no-many-rooms   skip the many-rooms ramp
  --no-build        use the existing target/release binaries
  --out FILE        where the report goes [docs/benchmarks.md]; figures go to img/ beside it
  --work DIR        where raw results and logs go [a new directory under $TMPDIR]
  -h, --help
EOF2
}

FULL=1
PAIRS=3
LADDERS=2
DURATION=10
STEP_DURATION=5
CAPACITY=1
PROFILE=1
BUILD=1
MANY=1
MANY_ROOMS=10000
MANY_STEP=5
QUICK=${BENCH_QUICK:-0}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/docs/benchmarks.md"
WORK=""
for a in "$@"; do [ "$a" = --quick ] && QUICK=1; done
if [ "$QUICK" = 1 ]; then
  FULL=0 PAIRS=1 DURATION=5 LADDERS=1 PROFILE=0 MANY_ROOMS=2000 MANY_STEP=3
fi
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) ;;
    --no-100k) FULL=0 ;;
    --ladders) LADDERS="${2:?--ladders needs a number}"; shift ;;
    --pairs) PAIRS="${2:?--pairs needs a number}"; shift ;;
    --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
    --step-duration) STEP_DURATION="${2:?--step-duration needs seconds}"; shift ;;
    --no-capacity) CAPACITY=0 ;;
    --no-profile) PROFILE=0 ;;
    --rooms) MANY_ROOMS="${2:?--rooms needs a number}"; shift ;;
    --no-many-rooms) MANY=0 ;;
    --no-build) BUILD=0 ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    --work) WORK="${2:?--work needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for n in "$PAIRS" "$DURATION" "$STEP_DURATION" "$LADDERS" "$MANY_ROOMS"; do
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
ROOMCAST_PIDS=() GW_PIDS=() CREDIS_PID="" CREDIS_PORT=""
SIO_PIDS=() SIO_REDIS_PID=""
FLOOR_PIDS=()

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

# A free port whose Redis Cluster bus port (+ 10000) is free too.
cluster_port() {
  node -e '
    const net = require("net");
    const tryPort = (p) => new Promise((ok) => { const s = net.createServer(); s.once("error", () => ok(false));
      s.listen(p, "127.0.0.1", () => s.close(() => ok(true))); });
    (async () => { for (let i = 0; i < 200; i++) { const p = 20000 + Math.floor(Math.random() * 35000);
      if ((await tryPort(p)) && (await tryPort(p + 10000))) { console.log(p); return; } } process.exit(1); })();'
}

# Sum of utime+stime (clock ticks) of the given pids; missing pids count 0.
ticks() {
  local files=() p
  for p in "$@"; do [ -r "/proc/$p/stat" ] && files+=("/proc/$p/stat"); done
  [ ${#files[@]} -eq 0 ] && { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); s += $12 + $13 } END { print s + 0 }' "${files[@]}" 2>/dev/null || echo 0
}

# utime and stime sums (clock ticks) of the given pids: "user system".
ticks_us() {
  local files=() p
  for p in "$@"; do [ -r "/proc/$p/stat" ] && files+=("/proc/$p/stat"); done
  [ ${#files[@]} -eq 0 ] && { echo "0 0"; return; }
  awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }' "${files[@]}" 2>/dev/null || echo "0 0"
}

# One sample line for the 10 Hz series, in one awk: server ticks (utime+stime of $1), Redis
# ticks ($2), and the front processes' user ticks ($3: gateways, Socket.IO instances, floor).
sample3() {
  local files=() groups=() g p
  for g in 1 2 3; do
    for p in ${!g}; do [ -r "/proc/$p/stat" ] && { files+=("/proc/$p/stat"); groups+=("$g"); }; done
  done
  [ ${#files[@]} -eq 0 ] && { echo "0 0 0"; return; }
  awk -v g="${groups[*]}" 'BEGIN { split(g, G, " ") }
    { sub(/^.*\) /, ""); k = G[NR]; if (k == 3) t[3] += $12; else t[k] += $12 + $13 }
    END { print t[1] + 0, t[2] + 0, t[3] + 0 }' "${files[@]}" 2>/dev/null || echo "0 0 0"
}

# Children's user+sys CPU of this shell so far, in seconds (reaped children: the load
# generators), into the variable named $1. `times` must run in this shell, not in a $(...).
children_cpu() {
  times >"$WORK/.times"
  printf -v "$1" '%s' "$(awk 'NR == 2 { s = 0
    for (i = 1; i <= NF; i++) { split($i, b, /[ms]/); s += b[1] * 60 + b[2] } print s }' "$WORK/.times")"
}

# A round starts: its name, the time and the load average, for the report (the machine is
# shared: the load average says how much else ran).
round_start() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$(date -u '+%H:%M:%S')" "$(cut -d' ' -f1-3 /proc/loadavg)" "$((SECONDS - T_START))" >>"$WORK/rounds.tsv"
  log "round '$1' (load average $(cut -d' ' -f1-3 /proc/loadavg))"
}

start_cluster() { # name gateways room-services [more roomcast-cluster options]
  try_start_cluster "$@" || { cat "$WORK/$1.cluster.out" >&2; die "roomcast-cluster did not start ($WORK/$1.cluster.out)"; }
}

# The same, but a cluster that does not start (a setting its services refuse) returns 1 instead
# of ending the run.
try_start_cluster() { # name gateways room-services [more roomcast-cluster options]
  local name=$1 gws=$2 rss=$3 out="$WORK/$1.cluster.out" i
  shift 3
  "$BIN/roomcast-cluster" --gateways "$gws" --room-services "$rss" --secret "$SECRET" \
    --log-dir "$WORK/$name-logs" "$@" >"$out" 2>&1 &
  CLUSTER_PID=$!
  for i in $(seq 600); do
    grep -q 'Ctrl-C or SIGTERM stops everything' "$out" 2>/dev/null && break
    kill -0 "$CLUSTER_PID" 2>/dev/null || { wait "$CLUSTER_PID" 2>/dev/null || true; CLUSTER_PID=""; return 1; }
    sleep 0.1
  done
  grep -q 'Ctrl-C or SIGTERM stops everything' "$out" || { stop_cluster; return 1; }
  GW_URLS=$(awk '/^  gateway [0-9]+:/ { print $3 }' "$out" | paste -sd, -)
  CREDIS_PORT=$(awk '/^  redis:/ { n = split($2, a, ":"); print a[n] }' "$out")
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
  log "cluster '$name' up: gateways ${GW_PIDS[*]} ($GW_URLS), room-services ${RS_PIDS[*]}, auth $AUTH_PID, redis $CREDIS_PID on $CREDIS_PORT"
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
  CLUSTER_PID="" CLUSTER_CHILDREN=() ROOMCAST_PIDS=() GW_PIDS=() CREDIS_PID=""
}

# Stops processes we started ("pid" list) and waits for them, at most 5 s, then kills them.
stop_pids() {
  local p e i alive
  for p in "$@"; do for e in "${STARTED[@]}"; do [ "${e%%:*}" = "$p" ] && signal_if_ours TERM "$e"; done; done
  for i in $(seq 50); do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do for e in "${STARTED[@]}"; do [ "${e%%:*}" = "$p" ] && signal_if_ours KILL "$e"; done; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

start_socketio() { # instances
  local n=${1:-2}
  SIO_REDIS_PORT=$(free_port)
  [ "$SIO_REDIS_PORT" != 6379 ] || SIO_REDIS_PORT=$(free_port)
  redis-server --port "$SIO_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --maxclients 10000 >"$WORK/socketio-redis-$SIO_REDIS_PORT.log" 2>&1 &
  SIO_REDIS_PID=$!
  STARTED+=("$(ours "$SIO_REDIS_PID")")
  local i
  for i in $(seq 100); do redis-cli -p "$SIO_REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$SIO_REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server on $SIO_REDIS_PORT did not start"
  SIO_PIDS=() SIO_URLS=() SIO_WS_URLS=()
  local k port
  for k in $(seq 0 $((n - 1))); do
    port=$(free_port)
    PORT=$port REDIS_URL="redis://127.0.0.1:$SIO_REDIS_PORT" JWT_SECRET="$SECRET" \
      node "$SIO/server.js" >"$WORK/socketio-$port.log" 2>&1 &
    SIO_PIDS+=("$!")
    STARTED+=("$(ours "$!")")
    SIO_URLS+=("http://127.0.0.1:$port")
    SIO_WS_URLS+=("ws://127.0.0.1:$port/socket.io/")
  done
  for k in $(seq 0 $((n - 1))); do
    for i in $(seq 100); do curl -fs "${SIO_URLS[$k]}/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -fs "${SIO_URLS[$k]}/healthz" >/dev/null || die "socket.io server $k did not start (${SIO_URLS[$k]})"
  done
  SIO_URLS_CSV=$(IFS=,; echo "${SIO_URLS[*]}")
  SIO_WS_CSV=$(IFS=,; echo "${SIO_WS_URLS[*]}")
  log "socket.io reference up: servers ${SIO_PIDS[*]} ($SIO_URLS_CSV), redis $SIO_REDIS_PID on $SIO_REDIS_PORT"
}

stop_socketio() {
  [ -n "${SIO_REDIS_PID:-}" ] || return 0
  stop_pids "${SIO_PIDS[@]}" "$SIO_REDIS_PID"
  SIO_PIDS=() SIO_REDIS_PID=""
}

# The floor reference: N processes of bench/floor on free ports, with T runtime threads each.
# The floor gets as many runtime threads as two-worker gateways would have together (four for
# one process beside two gateways, two per process beside three): on a shared machine the
# scheduler shares the cores out by thread, so the floor is given the larger share. The
# fan-out and many-rooms clusters run one worker per process (`--worker-threads 1`: five or
# six server processes share two cores, and that costs less CPU per message); the idle rounds
# keep the default, since one gateway alone accepts connections faster with a worker per core.
start_floor() { # processes threads
  local n=${1:-1} threads=${2:-2} k port i
  FLOOR_PIDS=() FLOOR_URLS=()
  for k in $(seq 0 $((n - 1))); do
    port=$(free_port)
    "$BIN/floor" --addr "127.0.0.1:$port" --threads "$threads" >"$WORK/floor-$port.log" 2>&1 &
    FLOOR_PIDS+=("$!")
    STARTED+=("$(ours "$!")")
    FLOOR_URLS+=("ws://127.0.0.1:$port/ws")
    for i in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || die "floor on $port did not start"
  done
  FLOOR_URLS_CSV=$(IFS=,; echo "${FLOOR_URLS[*]}")
  log "floor reference up: ${FLOOR_PIDS[*]} ($FLOOR_URLS_CSV)"
}

stop_floor() {
  [ ${#FLOOR_PIDS[@]} -gt 0 ] || return 0
  stop_pids "${FLOOR_PIDS[@]}"
  FLOOR_PIDS=()
}

# run NAME SERVER_PIDS REDIS_PID BOUND -- COMMAND...
# Runs a load generator, keeps its JSON (last line of stdout), and records the command, the CPU
# ticks of the server processes and of Redis before and after, the load generator's own CPU, and
# a 10 Hz CPU sample series (for the publishing-window figure). With RUN_FRONT set (pids of the
# front processes: gateways, Socket.IO instances, floor) their user ticks are sampled too; with
# RUN_GROUPS set ("label:pid pid …" entries) each group's user and system ticks are recorded.
# Waits (at most 30 s) until every server process of the systems is idle: below 3% of a core
# over half a second. Without this, a system still working off the backlog of the run before
# (Socket.IO queues seconds of messages past its capacity) slows the run that follows.
settle() {
  local all="${ROOMCAST_PIDS[*]:-} ${CREDIS_PID:-} ${SIO_PIDS[*]:-} ${SIO_REDIS_PID:-} ${FLOOR_PIDS[*]:-}" i a b
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

# Write system calls of the front processes, counted by perf's syscall tracepoints every 100 ms
# (sendto, write, writev, sendmsg: tokio sends with sendto and writev, libuv with write and
# writev): how many frames go out per write. Off when perf or the tracepoints are unavailable.
WRITE_EVENTS=syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendmsg
PERF_WRITES=0
if command -v perf >/dev/null && perf stat -e "$WRITE_EVENTS" -- true >/dev/null 2>&1; then PERF_WRITES=1; fi

RUN_FRONT=""
RUN_GROUPS=()
run() {
  local name=$1 server_pids=$2 redis_pid=$3 bound=$4 front=$RUN_FRONT
  shift 5
  settle
  local wpid="" wstart=""
  if [ "$PERF_WRITES" = 1 ] && [ -n "$front" ]; then
    wstart=$EPOCHREALTIME
    perf stat -I 100 -x, -e "$WRITE_EVENTS" -p "${front// /,}" -o "$WORK/$name.writes" >/dev/null 2>&1 &
    wpid=$!
  fi
  local meta="$WORK/$name.meta" cmd g
  cmd=$(printf '%q ' "$@")
  cmd=${cmd//"$SECRET"/\$SECRET}
  cmd=${cmd//"$ROOT/"/}
  # shellcheck disable=SC2086
  local s0 r0 c0 t0 s1 r1 c1 t1 rc=0 f0 f1 groups0=() groups1=()
  ( while :; do printf '%s %s\n' "$EPOCHREALTIME" "$(sample3 "$server_pids" "$redis_pid" "$front")"; sleep 0.1; done ) \
    >"$WORK/$name.samples" 2>/dev/null &
  SAMPLER_PID=$!
  for g in "${RUN_GROUPS[@]}"; do
    # shellcheck disable=SC2086
    groups0+=("$(ticks_us ${g#*:})")
  done
  # shellcheck disable=SC2086
  s0=$(ticks $server_pids); r0=$(ticks $redis_pid); f0=$(ticks_us $front); children_cpu c0; t0=$EPOCHREALTIME
  timeout --kill-after=10 "$bound" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
  # shellcheck disable=SC2086
  t1=$EPOCHREALTIME; s1=$(ticks $server_pids); r1=$(ticks $redis_pid); f1=$(ticks_us $front); children_cpu c1
  for g in "${RUN_GROUPS[@]}"; do
    # shellcheck disable=SC2086
    groups1+=("$(ticks_us ${g#*:})")
  done
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=""
  if [ -n "$wpid" ]; then
    kill -INT "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
  fi
  tail -n 1 "$WORK/$name.out" >"$WORK/$name.json"
  {
    printf 'name\t%s\n' "$name"
    printf 'cmd\t%s\n' "$cmd"
    printf 'exit\t%s\n' "$rc"
    printf 'start\t%s\nend\t%s\n' "$t0" "$t1"
    printf 'server_ticks\t%s\nredis_ticks\t%s\n' "$((s1 - s0))" "$((r1 - r0))"
    printf 'front_user_ticks\t%s\nfront_sys_ticks\t%s\n' "$(( ${f1% *} - ${f0% *} ))" "$(( ${f1#* } - ${f0#* } ))"
    local i=0
    for g in "${RUN_GROUPS[@]}"; do
      printf 'group_%s\t%s %s\n' "${g%%:*}" "$(( ${groups1[$i]% *} - ${groups0[$i]% *} ))" "$(( ${groups1[$i]#* } - ${groups0[$i]#* } ))"
      i=$((i + 1))
    done
    [ -z "$wstart" ] || printf 'writes_start\t%s\n' "$wstart"
    printf 'loadavg\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
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
for b in gateway room-service auth-service loadgen roomcast-cluster floor; do
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
  printf 'quick\t%s\nmany\t%s\nmany_rooms\t%s\nmany_step\t%s\n' "$QUICK" "$MANY" "$MANY_ROOMS" "$MANY_STEP"
  printf 'perf_writes\t%s\n' "$PERF_WRITES"
} >"$WORK/machine.tsv"

# ---------------------------------------------------------------------------------------------
# 1. Idle connections on one gateway (~19,000): connect rate, CPU per connection, RSS
# ---------------------------------------------------------------------------------------------
round_start idle-1gw
start_cluster idle1 1 1
# --concurrency 100 (the default): more handshakes in flight makes no faster ramp here, only
# SYN retransmits (time-to-connect p99 near 1 s). Gateway and auth-service CPU are recorded on
# their own: together they are the set-up cost of a connection.
RUN_FRONT="${GW_PIDS[*]}"
RUN_GROUPS=("gateway:${GW_PIDS[*]}" "auth:$AUTH_PID" "roomservice:${RS_PIDS[*]}")
# Gateway + auth-service ticks at 10 Hz: their CPU over the ramp alone is the set-up cost
# (the report cuts the series at the load generator's ramp_seconds).
( while :; do printf '%s %s\n' "$EPOCHREALTIME" "$(ticks "${GW_PIDS[@]}" "$AUTH_PID")"; sleep 0.1; done ) \
  >"$WORK/idle-1gw.setup" 2>/dev/null &
SETUP_SAMPLER=$!
run idle-1gw "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 240 -- \
  "$BIN/loadgen" connections --url "$GW_URLS" --secret "$SECRET" --count 19000 --rate 0 \
  --concurrency 100 --hold 10s --duration 180s --gateway-pid "${GW_PIDS[0]}" --json
kill "$SETUP_SAMPLER" 2>/dev/null || true
wait "$SETUP_SAMPLER" 2>/dev/null || true
RUN_FRONT="" RUN_GROUPS=()
log "idle-1gw: connected $(jget idle-1gw connected), $(jget idle-1gw rss_per_connection_bytes) B RSS per connection, $(jget idle-1gw connect_rate) conn/s"
stop_cluster

# The connect rate swings by more than 10% between runs on a shared 2-core machine: two more
# ramps, each on a fresh cluster, and the report takes the median of the three.
for again in b c; do
  round_start "idle-1gw-$again"
  start_cluster "idle1$again" 1 1
  run "idle-1gw-$again" "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 120 -- \
    "$BIN/loadgen" connections --url "$GW_URLS" --secret "$SECRET" --count 19000 --rate 0 \
    --concurrency 100 --hold 1s --duration 60s --gateway-pid "${GW_PIDS[0]}" --json
  log "idle-1gw-$again: connected $(jget "idle-1gw-$again" connected), $(jget "idle-1gw-$again" connect_rate) conn/s"
  stop_cluster
done

# ---------------------------------------------------------------------------------------------
# 2. 100,000 idle connections over 6 gateways (skipped with --no-100k)
# ---------------------------------------------------------------------------------------------
if [ $FULL = 1 ]; then
  round_start idle-6gw
  start_cluster idle6 6 2
  gwargs=()
  for p in "${GW_PIDS[@]}"; do gwargs+=(--gateway-pid "$p"); done
  RUN_GROUPS=("gateway:${GW_PIDS[*]}" "auth:$AUTH_PID" "roomservice:${RS_PIDS[*]}")
  run idle-6gw "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 420 -- \
    "$BIN/loadgen" connections --url "$GW_URLS" --secret "$SECRET" --count 100000 --rate 0 \
    --concurrency 200 --hold 10s --duration 360s "${gwargs[@]}" --json
  RUN_GROUPS=()
  log "idle-6gw: connected $(jget idle-6gw connected), held $(jget idle-6gw held), $(jget idle-6gw rss_per_connection_bytes) B RSS per connection, $(jget idle-6gw connect_rate) conn/s"
  stop_cluster
fi

# ---------------------------------------------------------------------------------------------
# 3. Fan-out: Roomcast, Socket.IO and the floor in alternation; 4. capacity ladders
# ---------------------------------------------------------------------------------------------
# Every run uses ceil(rate / 50) publishers, each at <= 50/s (under the gateway's default
# per-connection publish rate), and the Socket.IO and floor runs use the same publishers.
pubs_for() { echo $(( ($1 + 49) / 50 )); }

# The one-publisher round sends 200 msg/s from one connection, above the default per-connection
# publish rate (100/s); the other rounds publish 50/s per connection. Write coalescing is off
# (WRITE_DELAY_MS=0, the default, given explicitly): one write per delivery, as the floor does.
round_start fanout
start_cluster fanout 2 2 --worker-threads 1 --gateway-env PUBLISH_RATE=1000 --gateway-env PUBLISH_BURST=2000 \
  --gateway-env WRITE_DELAY_MS=0
start_socketio 2
start_floor 1 4
SIO_PIDS_S="${SIO_PIDS[*]}"
RC_PIDS_S="${ROOMCAST_PIDS[*]}"
RC_GW_S="${GW_PIDS[*]}"
FLOOR_PIDS_S="${FLOOR_PIDS[*]}"
BOUND=$((DURATION + 90))
P200=$(pubs_for 200)
fanout_roomcast() { # name rate publishers duration bound
  RUN_FRONT="$RC_GW_S"
  run "$1" "$RC_PIDS_S" "$CREDIS_PID" "$5" -- \
    "$BIN/loadgen" fanout --url "$GW_URLS" --secret "$SECRET" --subscribers 1000 --rooms 1 \
    --publishers "$3" --rate "$2" --payload 100 --duration "${4}s" --json
  RUN_FRONT=""
}
fanout_socketio() { # name rate publishers duration bound
  RUN_FRONT="$SIO_PIDS_S"
  run "$1" "$SIO_PIDS_S" "$SIO_REDIS_PID" "$5" -- \
    node "$SIO/loadgen.js" --url "$SIO_URLS_CSV" --secret "$SECRET" --subscribers 1000 --rooms 1 \
    --publishers "$3" --rate "$2" --payload 100 --duration "${4}s" --json
  RUN_FRONT=""
}
fanout_floor() { # name rate publishers duration bound
  RUN_FRONT="$FLOOR_PIDS_S"
  run "$1" "$FLOOR_PIDS_S" "" "$5" -- \
    "$BIN/loadgen" fanout --url "$FLOOR_URLS_CSV" --secret "$SECRET" --subscribers 1000 --rooms 1 \
    --publishers "$3" --rate "$2" --payload 100 --duration "${4}s" --json
  RUN_FRONT=""
}
summary() { echo "$(jget "$1" deliveries_per_sec)/s, loss $(jget "$1" loss), p99 $(jget "$1" latency_ms.p99) ms"; }

# A short warm-up of each system (connection pools, JIT), not counted.
fanout_roomcast warmup-roomcast 200 "$P200" 3 60
fanout_socketio warmup-socketio 200 "$P200" 3 60
fanout_floor warmup-floor 200 "$P200" 3 60
log "warm-up done: roomcast $(summary warmup-roomcast); socket.io $(summary warmup-socketio); floor $(summary warmup-floor)"
for round in $(seq "$PAIRS"); do
  fanout_roomcast "fanout-roomcast-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "fanout-roomcast-$round: $(summary "fanout-roomcast-$round")"
  fanout_socketio "fanout-socketio-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "fanout-socketio-$round: $(summary "fanout-socketio-$round")"
  fanout_floor "fanout-floor-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "fanout-floor-$round: $(summary "fanout-floor-$round")"
done
# A lighter load, 50 msg/s into the same room, where a shared machine keeps up with one write
# per delivery more easily: the three systems once more.
round_start light
fanout_roomcast light-roomcast 50 1 "$DURATION" "$BOUND"
fanout_socketio light-socketio 50 1 "$DURATION" "$BOUND"
fanout_floor light-floor 50 1 "$DURATION" "$BOUND"
log "light: roomcast $(summary light-roomcast); socket.io $(summary light-socketio); floor $(summary light-floor)"

# The same load from ONE publishing connection (a game host, a feed bridge): a connection's
# publishes must not be serialized on their round trips. As many rounds as the 4-publisher
# ones, so the report compares a median with a median.
round_start onepub
for round in $(seq "$PAIRS"); do
  fanout_roomcast "onepub-roomcast-$round" 200 1 "$DURATION" "$BOUND"
  log "onepub-roomcast-$round: $(summary "onepub-roomcast-$round")"
done
fanout_socketio onepub-socketio 200 1 "$DURATION" "$BOUND"
log "onepub-socketio: $(summary onepub-socketio)"

# One more Roomcast round with the gateways profiled over its publishing window (set-up of the
# 1000 members takes about 3 s): where a delivery's CPU goes. Skipped without a working perf.
if [ $PROFILE = 1 ] && perf stat -e cpu-clock true >/dev/null 2>&1; then
  round_start profile
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
  # Interleaved ladders: at each rate Roomcast, Socket.IO, then the floor, each ladder stopping
  # at its first failing step. A failing step is tried once more (this machine is shared: one
  # burst of someone else's build should not end a ladder); it fails when both tries fail.
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
    round_start "capacity-ladder-$l"
    RC_ALIVE=1 SIO_ALIVE=1 FLOOR_ALIVE=1
    for rate in 10 25 50 75 100 150 200 300 400 600 800 1000 1200 1600 2000; do
      [ $RC_ALIVE = 1 ] || [ $SIO_ALIVE = 1 ] || [ $FLOOR_ALIVE = 1 ] || break
      if [ $RC_ALIVE = 1 ]; then step roomcast "$l" "$rate" || RC_ALIVE=0; fi
      if [ $SIO_ALIVE = 1 ]; then step socketio "$l" "$rate" || SIO_ALIVE=0; fi
      if [ $FLOOR_ALIVE = 1 ]; then step floor "$l" "$rate" || FLOOR_ALIVE=0; fi
    done
  done
fi
stop_cluster
stop_socketio
stop_floor

# User-space instructions per delivery of the gateways and of the floor under callgrind
# (bench/fanout-instructions.sh, 1000 subscribers x 20 msg/s): the user-CPU comparison without
# the ±15% that CPU time swings by between runs here. Skipped without valgrind.
if [ $PROFILE = 1 ] && command -v valgrind >/dev/null; then
  round_start instructions
  for sys in roomcast floor; do
    if "$ROOT/bench/fanout-instructions.sh" --bin "$BIN" --system "$sys" >>"$WORK/instructions.txt" 2>"$WORK/instructions-$sys.err"; then
      log "instructions: $(tail -1 "$WORK/instructions.txt")"
    else
      log "instructions ($sys) failed (see $WORK/instructions-$sys.err)"
    fi
  done
fi

# The fan-out again with write coalescing on (WRITE_DELAY_MS=10: a connection's writer waits
# up to 10 ms for more frames before its write call), against the floor's rounds above. 10 ms
# rather than 5: at 5 the CPU per delivery came out at 0.95-1.06x the floor's between rounds
# (p99 about 24 ms), at 10 at about 0.85x (p99 about 30 ms), well under the 50 ms the latency
# target allows.
COALESCE_MS=10
printf 'coalesce_ms\t%s\n' "$COALESCE_MS" >>"$WORK/machine.tsv"
round_start coalesce
start_cluster coalesce 2 2 --worker-threads 1 --gateway-env PUBLISH_RATE=1000 --gateway-env PUBLISH_BURST=2000 \
  --gateway-env "WRITE_DELAY_MS=$COALESCE_MS"
RC_PIDS_S="${ROOMCAST_PIDS[*]}"
RC_GW_S="${GW_PIDS[*]}"
fanout_roomcast warmup-coalesce 200 "$P200" 3 60
for round in $(seq "$PAIRS"); do
  fanout_roomcast "coalesce-roomcast-$round" 200 "$P200" "$DURATION" "$BOUND"
  log "coalesce-roomcast-$round: $(summary "coalesce-roomcast-$round")"
done
stop_cluster

# One connection publishing as fast as it can into a small room (10 subscribers): its publishes
# are pipelined, not serialized on their round trips. The per-connection limit is raised out of
# the way; 5 s per rate, open loop.
round_start onec
start_cluster onec 2 1 --gateway-env PUBLISH_RATE=100000 --gateway-env PUBLISH_BURST=100000
for rate in 10000 20000 30000; do
  RUN_FRONT="${GW_PIDS[*]}"
  run "onec-roomcast-$rate" "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 60 -- \
    "$BIN/loadgen" fanout --url "$GW_URLS" --secret "$SECRET" --subscribers 10 --rooms 1 \
    --publishers 1 --rate "$rate" --payload 100 --duration 5s --json
  RUN_FRONT=""
  log "onec-roomcast-$rate: $(jget "onec-roomcast-$rate" published_per_sec) publishes/s from one connection, $(summary "onec-roomcast-$rate")"
done
stop_cluster

# ---------------------------------------------------------------------------------------------
# 5. Many small rooms: ROOMS rooms of 4 subscribers + 1 publisher, a rising rate until loss or
#    p99 > 50 ms, for each system on the same machine, one after the other
# ---------------------------------------------------------------------------------------------
# 5 members per room, 50,000 connections at 10,000 rooms: three gateways / Socket.IO instances /
# floor processes (a process may hold 20,000 open files here) and as many load generator worker
# processes as `loadgen --workers auto` takes (15,000 members each). The one Rust load generator
# drives all three systems (`--protocol socketio` for Socket.IO), so the client's cost is the
# same. Roomcast and Socket.IO spread each room's members over their three front processes
# (connection n to front n mod 3), as a load balancer would; the floor has no cross-process
# fan-out, so its rooms are placed whole on one process each (`--placement room`).
# The first, low step warms the servers up (Node's JIT, connection pools) and is reported too.
MANY_RATES="100,250,500,1000,2000,3000,4000,6000,8000,12000,16000,24000,32000"
[ "$QUICK" = 1 ] && MANY_RATES="100,500,1000,2000,4000,8000,16000"
MANY_FRONTS=3
MBOUND=$((240 + 13 * 2 * (MANY_STEP + 8)))
many_rooms() { # name [loadgen fanout options…]
  local name=$1
  shift
  run "$name" "$MANY_SERVER" "$MANY_REDIS" "$MBOUND" -- \
    "$BIN/loadgen" fanout --secret "$SECRET" --subscribers $((MANY_ROOMS * 4)) --rooms "$MANY_ROOMS" \
    --payload 100 --connect-rate 0 --concurrency 200 --steps "$MANY_RATES" --step-duration "${MANY_STEP}s" \
    --json "$@"
  log "$name: $(node -e '
    let r; try { r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); } catch { console.log("no result"); process.exit(0); }
    console.log(`${r.members} members, set-up ${r.setup_seconds} s; ` + (r.steps || []).map((s) =>
      `${s.rate_target}${s.attempt ? "(retry)" : ""}: ${s.published_per_sec}/s p99 ${s.latency_ms.p99}${s.passed ? "" : " FAIL"}`).join(", "));' "$WORK/$name.json")"
}
if [ $MANY = 1 ]; then
  round_start many-roomcast
  start_cluster many "$MANY_FRONTS" 2 --worker-threads 1
  MANY_SERVER="${ROOMCAST_PIDS[*]}" MANY_REDIS="$CREDIS_PID"
  RUN_FRONT="${GW_PIDS[*]}"
  many_rooms many-roomcast --url "$GW_URLS" \
    --measure-pid "server=$(IFS=,; echo "${ROOMCAST_PIDS[*]}")" \
    --measure-pid "gateways=$(IFS=,; echo "${GW_PIDS[*]}")" \
    --measure-redis "redis=127.0.0.1:$CREDIS_PORT"
  stop_cluster

  round_start many-socketio
  start_socketio "$MANY_FRONTS"
  MANY_SERVER="${SIO_PIDS[*]}" MANY_REDIS="$SIO_REDIS_PID"
  RUN_FRONT="${SIO_PIDS[*]}"
  many_rooms many-socketio --protocol socketio --url "$SIO_WS_CSV" \
    --measure-pid "server=$(IFS=,; echo "${SIO_PIDS[*]}")" \
    --measure-pid "gateways=$(IFS=,; echo "${SIO_PIDS[*]}")" \
    --measure-redis "redis=127.0.0.1:$SIO_REDIS_PORT"
  stop_socketio

  round_start many-floor
  start_floor "$MANY_FRONTS" 2
  MANY_SERVER="${FLOOR_PIDS[*]}" MANY_REDIS=""
  RUN_FRONT="${FLOOR_PIDS[*]}"
  many_rooms many-floor --url "$FLOOR_URLS_CSV" --placement room \
    --measure-pid "server=$(IFS=,; echo "${FLOOR_PIDS[*]}")" \
    --measure-pid "gateways=$(IFS=,; echo "${FLOOR_PIDS[*]}")"
  stop_floor
  RUN_FRONT=""

  # The same on a Redis Cluster of 3 masters (CPU per shard), with REDIS_URL=redis+cluster://…
  # for room-service (state and publishes) and the gateways (subscriptions). Where a service
  # refuses that URL the variant is skipped, and the report says why.
  round_start many-roomcast-cluster
  RC_NODES=() RC_NODE_PIDS=()
  for k in 1 2 3; do
    port=$(cluster_port)
    mkdir -p "$WORK/rediscluster-$port"
    (cd "$WORK/rediscluster-$port" && exec redis-server --port "$port" --bind 127.0.0.1 --save '' \
      --appendonly no --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000 >redis.log 2>&1) &
    RC_NODE_PIDS+=("$!")
    STARTED+=("$(ours "$!")")
    RC_NODES+=("127.0.0.1:$port")
  done
  for n in "${RC_NODES[@]}"; do
    for i in $(seq 100); do redis-cli -p "${n#*:}" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create "${RC_NODES[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/rediscluster-create.log" 2>&1 ||
    die "redis-cli --cluster create failed (see $WORK/rediscluster-create.log)"
  for i in $(seq 100); do
    [ "$(redis-cli -p "${RC_NODES[0]#*:}" cluster info 2>/dev/null | tr -d '\r' | awk -F: '/^cluster_state/ { print $2 }')" = ok ] && break
    sleep 0.1
  done
  CLUSTER_URL="redis+cluster://$(IFS=,; echo "${RC_NODES[*]}")"
  if try_start_cluster many-cluster "$MANY_FRONTS" 2 --worker-threads 1 --gateway-env "REDIS_URL=$CLUSTER_URL" --room-env "REDIS_URL=$CLUSTER_URL"; then
    MANY_SERVER="${ROOMCAST_PIDS[*]}" MANY_REDIS="${RC_NODE_PIDS[*]}"
    RUN_FRONT="${GW_PIDS[*]}"
    shards=()
    for k in 0 1 2; do shards+=(--measure-redis "shard$((k + 1))=${RC_NODES[$k]}"); done
    many_rooms many-roomcast-cluster --url "$GW_URLS" \
      --measure-pid "server=$(IFS=,; echo "${ROOMCAST_PIDS[*]}")" \
      --measure-pid "gateways=$(IFS=,; echo "${GW_PIDS[*]}")" "${shards[@]}"
    RUN_FRONT=""
    stop_cluster
  else
    # The first error a service logged says which one refused what.
    why=$(grep -h ' ERROR ' "$WORK"/many-cluster-logs/*.log 2>/dev/null | head -n 1 | sed 's/^[^ ]* *ERROR *//' | cut -c1-300)
    printf 'the services of this build do not run on a Redis Cluster yet (%s); bench/run.sh runs this variant (3 masters made with redis-cli --cluster create, Redis CPU per shard) as soon as they do.\n' \
      "${why:-roomcast-cluster exited during start-up}" >"$WORK/many-roomcast-cluster.skip"
    log "many rooms on a Redis Cluster: skipped ($(cat "$WORK/many-roomcast-cluster.skip"))"
  fi
  stop_pids "${RC_NODE_PIDS[@]}"
fi
# ---------------------------------------------------------------------------------------------
# 6. Publishes through the server API: `loadgen publish-api` at rising rates, one run each
# ---------------------------------------------------------------------------------------------
# 1,000 rooms of one subscriber each, 2 gateways and 2 room-services on one Redis; the load
# generator calls room-service 0's server API with up to 1,024 publishes in flight: first one
# message per ServerApi.Publish call (papi-RATE), then ServerApi.PublishBatch calls of up to 64
# messages, whatever piled up while earlier calls were in flight (papib-RATE). A rate passes when
# at least 95% of it was published with no loss, no publish error and p99 ≤ 50 ms (publish to
# delivery).
PAPI_RATES="10000 20000 30000"
PAPIB_RATES="20000 30000 40000"
[ "$QUICK" = 1 ] && PAPI_RATES="10000 20000" && PAPIB_RATES="20000 30000"
printf 'papi_rates\t%s\npapib_rates\t%s\n' "$PAPI_RATES" "$PAPIB_RATES" >>"$WORK/machine.tsv"
papi_round() { # name rate [more loadgen options]
  local name=$1 rate=$2
  shift 2
  round_start "$name"
  start_cluster "${name//-/}" 2 2
  API_KEY_OF=$(awk '/API key:/ { print $3 }' "$WORK/${name//-/}.cluster.out")
  RS0=$(awk '/^  room-service 0:/ { print $4 }' "$WORK/${name//-/}.cluster.out")
  RUN_GROUPS=("gateway:${GW_PIDS[*]}" "roomservice:${RS_PIDS[*]}")
  run "$name" "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 120 -- \
    "$BIN/loadgen" publish-api --url "$GW_URLS" --secret "$SECRET" --grpc "$RS0" --api-key "$API_KEY_OF" \
    --rooms 1000 --subscribers 1000 --rate "$rate" --max-in-flight 1024 --duration 10s --json "$@"
  RUN_GROUPS=()
  log "$name: $(jget "$name" published_per_sec) publishes/s, loss $(jget "$name" loss), p99 $(jget "$name" latency_ms.p99) ms"
  stop_cluster
}
for rate in $PAPI_RATES; do
  papi_round "papi-$rate" "$rate"
done
for rate in $PAPIB_RATES; do
  papi_round "papib-$rate" "$rate" --batch 64
done

# ---------------------------------------------------------------------------------------------
# 7. Client publishes into the server-API rounds' rooms: 1,000 rooms of one subscriber each and a
# publishing connection per room, rising rate (`loadgen fanout --steps`, a failing step tried
# once more), on one cluster like the server-API rounds'
# ---------------------------------------------------------------------------------------------
CPUB_RATES="10000,20000,30000"
CPUB_STEP=10
[ "$QUICK" = 1 ] && CPUB_RATES="10000,20000" && CPUB_STEP=5
printf 'cpub_step\t%s\n' "$CPUB_STEP" >>"$WORK/machine.tsv"
round_start cpub-roomcast
start_cluster cpub 2 2
run cpub-roomcast "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" 240 -- \
  "$BIN/loadgen" fanout --url "$GW_URLS" --secret "$SECRET" --subscribers 1000 --rooms 1000 --publishers 1000 \
  --payload 100 --connect-rate 0 --steps "$CPUB_RATES" --step-duration "${CPUB_STEP}s" --json \
  --measure-pid "server=$(IFS=,; echo "${ROOMCAST_PIDS[*]}")" \
  --measure-pid "gateways=$(IFS=,; echo "${GW_PIDS[*]}")" \
  --measure-redis "redis=127.0.0.1:$CREDIS_PORT"
log "cpub-roomcast: $(node -e '
  let r; try { r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); } catch { console.log("no result"); process.exit(0); }
  console.log((r.steps || []).map((s) =>
    `${s.rate_target}${s.attempt ? "(retry)" : ""}: ${s.published_per_sec}/s p99 ${s.latency_ms.p99}${s.passed ? "" : " FAIL"}`).join(", "));' "$WORK/cpub-roomcast.json")"
stop_cluster

# ---------------------------------------------------------------------------------------------
# 8. Small rooms at a chat's pace, the server-CPU-per-publish target's own case: 2,000 members
#    over 100 rooms (19 subscribers and 1 publisher each), 10 msg/s per room (1,000 publishes/s
#    in all), Roomcast (the fan-out rounds' cluster) and the floor (one process, as in the
#    fan-out rounds), SMALL_PAIRS rounds each in alternation, and Roomcast once more with
#    `PUBLISH_BATCH_MS=20` on the gateways (SMALL_BATCH_MS: more publishes per gRPC call and
#    script call, for more latency). At this pace a call carries few publishes: the per-call work
#    weighs as much as the deliveries. Each Roomcast round records its gateways' publish calls.
# ---------------------------------------------------------------------------------------------
SMALL_PAIRS=$PAIRS
SMALL_STEP=10
SMALL_BATCH_MS=20
[ "$QUICK" = 1 ] && SMALL_STEP=5
printf 'small_step\t%s\n' "$SMALL_STEP" >>"$WORK/machine.tsv"
printf 'small_batch_ms\t%s\n' "$SMALL_BATCH_MS" >>"$WORK/machine.tsv"
# The gateways' PublishBatch calls and the publishes they carried, summed ("calls publishes"):
# read before the cluster stops.
publish_calls() { # name
  local url
  for url in ${GW_URLS//,/ }; do
    url=${url#ws://}
    curl -fs "http://${url%%/*}/metrics" || true
  done | awk '/^roomcast_gateway_batched_calls_total\{call="publish_batch"\}/ { c += $2 }
    /^roomcast_gateway_batched_requests_total\{call="publish_batch"\}/ { r += $2 }
    END { print c + 0, r + 0 }' >"$WORK/$1.calls"
}
small_roomcast() { # name [more roomcast-cluster options]
  local name=$1
  shift
  round_start "$name"
  start_cluster "$name" 2 2 --worker-threads 1 "$@"
  small_rooms "$name" "${ROOMCAST_PIDS[*]}" "$CREDIS_PID" --url "$GW_URLS" \
    --measure-pid "server=$(IFS=,; echo "${ROOMCAST_PIDS[*]}")" \
    --measure-pid "gateways=$(IFS=,; echo "${GW_PIDS[*]}")" \
    --measure-redis "redis=127.0.0.1:$CREDIS_PORT"
  publish_calls "$name"
  stop_cluster
}
small_rooms() { # name servers redis [loadgen options…]
  local name=$1 servers=$2 redis=$3
  shift 3
  run "$name" "$servers" "$redis" 120 -- \
    "$BIN/loadgen" fanout --secret "$SECRET" --subscribers 1900 --rooms 100 --payload 100 --connect-rate 0 \
    --steps 1000 --step-duration "${SMALL_STEP}s" --json "$@"
  log "$name: $(node -e '
    let r; try { r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); } catch { console.log("no result"); process.exit(0); }
    const s = (r.steps || [])[0]; if (!s) { console.log("no step"); process.exit(0); }
    const cpu = (s.cpu_seconds || {}).server + Object.values(s.redis_cpu_seconds || {}).reduce((a, b) => a + b, 0);
    console.log(`${s.published_per_sec}/s, p99 ${s.latency_ms.p99} ms, ${(cpu * 1e6 / s.published).toFixed(0)} µs of server CPU per publish${s.passed ? "" : " FAIL"}`);' "$WORK/$name.json")"
}
for i in $(seq "$SMALL_PAIRS"); do
  small_roomcast "small-roomcast-$i"
  small_roomcast "small-batched-$i" --gateway-env "PUBLISH_BATCH_MS=$SMALL_BATCH_MS"
  round_start "small-floor-$i"
  start_floor 1 4
  small_rooms "small-floor-$i" "${FLOOR_PIDS[*]}" "" --url "$FLOOR_URLS_CSV" \
    --measure-pid "server=$(IFS=,; echo "${FLOOR_PIDS[*]}")" \
    --measure-pid "gateways=$(IFS=,; echo "${FLOOR_PIDS[*]}")"
  stop_floor
done

printf 'loadavg_end\t%s\nelapsed_s\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" "$((SECONDS - T_START))" >>"$WORK/machine.tsv"

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
node "$ROOT/bench/report.js" "$WORK" "$OUT"
log "done in $((SECONDS - T_START)) s"
echo "Results: $OUT (figures in $(dirname "$OUT")/img; raw JSON, CPU samples and logs: $WORK)"
