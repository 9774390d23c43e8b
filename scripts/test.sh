#!/usr/bin/env bash
# Runs every test of the workspace on this machine. Installs redis-server, nats-server and
# Node.js (with npm) from Debian's packages when they are missing (the integration tests start
# their own servers on free ports; they never use ones already running on the default ports),
# and the dependencies of examples/node-backend, which an integration test runs. After the build,
# the TypeScript client (clients/js) is built and tested against the `roomcast standalone` just
# built. Then validates the deployment files (deploy/validate.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Exactly the locked versions, without the audit and funding notices.
npm ci --prefix examples/node-backend --no-audit --no-fund --loglevel=error >/dev/null

# One build of everything (the integration tests run the service binaries), then the tests.
cargo build --workspace --all-targets --locked

# The TypeScript client: type declarations build, unit tests, and tests against a real
# target/debug/roomcast standalone on free ports.
npm ci --prefix clients/js --no-audit --no-fund --loglevel=error >/dev/null
if npm --prefix clients/js run --silent build && npm --prefix clients/js test --silent; then
  echo "clients/js: PASS"
else
  echo "clients/js: FAIL"
  exit 1
fi

cargo test --workspace --locked -- --test-threads=2

# The deployment files (Kubernetes overlays, compose, Dockerfile, HAProxy) against their schemas
# and against the settings the binaries just built accept. No cluster or container engine needed.
./deploy/validate.sh
