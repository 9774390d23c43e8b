#!/usr/bin/env bash
# CPU profile of running processes (the gateways during a fan-out run): where their time goes,
# user space against kernel, and the top functions.
#
#   bench/profile.sh PIDS SECONDS OUT_PREFIX
#
# PIDS is a comma-separated list. Samples with `perf record -e cpu-clock` (a software clock:
# works where hardware counters are not exposed, as in most VMs) for SECONDS, and reads the
# processes' utime/stime from /proc over the same window. Writes OUT_PREFIX.tsv (figures for
# bench/report.js), OUT_PREFIX.txt (perf's report) and keeps OUT_PREFIX.data.
set -euo pipefail
PIDS=${1:?PIDS}
SECS=${2:?SECONDS}
OUT=${3:?OUT_PREFIX}
command -v perf >/dev/null || { echo "profile.sh: perf not found (Debian: linux-perf)" >&2; exit 2; }

ticks() { # utime stime, summed over the pids
  local u=0 s=0 p f
  for p in ${PIDS//,/ }; do
    read -r -a f < <(sed 's/^.*) //' "/proc/$p/stat")
    u=$((u + f[11])) s=$((s + f[12]))
  done
  echo "$u $s"
}
read -r u0 s0 < <(ticks)
t0=$EPOCHREALTIME
perf record -q -e cpu-clock -F 999 -g -p "$PIDS" -o "$OUT.data" -- sleep "$SECS" >/dev/null 2>&1
t1=$EPOCHREALTIME
read -r u1 s1 < <(ticks)

report() { perf report -i "$OUT.data" --stdio "$@" 2>/dev/null | grep -v '^#' | grep -v '^$' || true; }
share() { # percentage of samples in the kernel (or not), by dso
  report --no-children --sort dso -g none | awk -v want="$1" '
    { p = $1; sub(/%/, "", p); if (($2 == "[kernel.kallsyms]") == (want == "kernel")) s += p }
    END { printf "%.1f", s }'
}
children() { # inclusive share of a kernel function
  report --children --sort sym -g none | awk -v f="$1" '$NF == f { p = $1; sub(/%/, "", p); print p; exit }'
}
tck=$(getconf CLK_TCK)
{
  printf 'seconds\t%s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
  printf 'user_s\t%s\n' "$(awk -v a="$u0" -v b="$u1" -v t="$tck" 'BEGIN { printf "%.2f", (b - a) / t }')"
  printf 'sys_s\t%s\n' "$(awk -v a="$s0" -v b="$s1" -v t="$tck" 'BEGIN { printf "%.2f", (b - a) / t }')"
  printf 'kernel_pct\t%s\n' "$(share kernel)"
  printf 'user_pct\t%s\n' "$(share user)"
  printf 'sendto_pct\t%s\n' "$(children __x64_sys_sendto)"
  printf 'softirq_pct\t%s\n' "$(children net_rx_action)"
  printf 'tcp_v4_rcv_pct\t%s\n' "$(children tcp_v4_rcv)"
  # Top functions by their own samples: "pct<TAB>[k] or [.]<TAB>name".
  report --no-children --sort sym -g none | head -n 25 |
    awk '{ p = $1; t = $2; $1 = ""; $2 = ""; sub(/^ +/, ""); printf "top\t%s\t%s\t%s\n", p, t, $0 }'
} >"$OUT.tsv"
report --no-children --sort dso,sym -g none | head -n 60 >"$OUT.txt"
cat "$OUT.tsv"
