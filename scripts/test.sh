#!/usr/bin/env bash
# Runs every test of the workspace on this machine. Installs redis-server, nats-server and
# Node.js (with npm) from Debian's packages when they are missing (the integration tests start
# their own servers on free ports; they never use ones already running on the default ports),
# and the dependencies of examples/node-backend, which an integration test runs; Debian's
# chromium for the browser tests of the demo page (nothing downloads a browser). After the build,
# the TypeScript client (clients/js) is built and tested against the `roomcast standalone` and
# `roomcast-cluster` just built; the demo page (clients/demo) is checked to be the committed
# gateway/src/index.html and tested in Chromium against a cluster; examples/react-chat is
# type-checked and built. Then validates the deployment files (deploy/validate.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Exactly the locked versions, without the audit and funding notices.
npm ci --prefix examples/node-backend --no-audit --no-fund --loglevel=error >/dev/null

# ARCHITECTURE.md's invariant that no two modules of a crate import each other.
python3 scripts/module-imports.py

# One build of everything (the integration tests run the service binaries), then the tests.
cargo build --workspace --all-targets --locked

# The TypeScript client: type declarations build, unit tests, and tests against a real
# target/debug/roomcast standalone and a target/debug/roomcast-cluster on free ports.
npm ci --prefix clients/js --no-audit --no-fund --loglevel=error >/dev/null
if npm --prefix clients/js run --silent build && npm --prefix clients/js test --silent; then
  echo "clients/js: PASS"
else
  echo "clients/js: FAIL"
  exit 1
fi

# The React example: type-checked and bundled against the current client, so it cannot rot
# (the demo's browser tests below also run the bundle in Chromium).
npm ci --prefix examples/react-chat --no-audit --no-fund --loglevel=error >/dev/null
if out=$(npm --prefix examples/react-chat run --silent build 2>&1); then
  echo "examples/react-chat: PASS"
else
  echo "$out"
  echo "examples/react-chat: FAIL"
  exit 1
fi

# The demo page: gateway/src/index.html (embedded in the gateway just built) must be the build
# of clients/demo; then the page in headless Chromium against a two-gateway cluster (screenshot:
# target/artifacts/demo.png), and the React example's bundle against roomcast standalone.
npm ci --prefix clients/demo --no-audit --no-fund --loglevel=error >/dev/null
if ! npm --prefix clients/demo run --silent check; then
  echo "clients/demo: FAIL (gateway/src/index.html is stale: rebuild it with npm run build in clients/demo)"
  exit 1
fi
if npm --prefix clients/demo test --silent; then
  echo "clients/demo: PASS"
else
  echo "clients/demo: FAIL"
  exit 1
fi

cargo test --workspace --locked -- --test-threads=2

# The deployment files (Kubernetes overlays, compose, Dockerfile, HAProxy) against their schemas
# and against the settings the binaries just built accept. No cluster or container engine needed.
./deploy/validate.sh
