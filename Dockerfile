# syntax=docker/dockerfile:1
# One image with the Roomcast binaries (gateway, room-service, auth-service, and roomcast for
# standalone mode); the container's command picks the role. Build: docker build -t roomcast:dev .
#
# Stages: `chef` has cargo-chef; `planner` reduces the workspace to a recipe of its
# dependencies; `build` compiles the dependencies from the recipe alone (a layer that a change
# to the project's own sources does not invalidate), then the project's crates.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: rebuilt when Cargo.toml or Cargo.lock change, not when a .rs file does.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
        -p roomcast-gateway -p roomcast-room -p roomcast-auth -p roomcast
COPY . .
RUN cargo build --release --locked -p roomcast-gateway -p roomcast-room -p roomcast-auth -p roomcast \
    && mkdir -p /out \
    && cp target/release/gateway target/release/room-service target/release/auth-service \
        target/release/roomcast /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# Root certificates for an https:// JWKS_URL; nothing else beyond the base (bash, for the
# health check, is part of it). Not pinned: the CA bundle should be the release's latest.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 roomcast \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin roomcast
COPY --from=build /out/ /usr/local/bin/
COPY deploy/docker/healthcheck.sh /usr/local/bin/roomcast-healthcheck
USER 10001:10001
# Inside a container the listeners must face the container's network, not its loopback. The
# cluster binaries already default to 0.0.0.0; standalone defaults to loopback on a laptop.
ENV GATEWAY_ADDR=0.0.0.0:8080 ROOM_SERVICE_ADDR=0.0.0.0:50051
# 8080: gateway (WebSocket, /healthz, /readyz, /metrics); 50051: room-service gRPC (internal
# RoomService and the server API); 50052: auth-service gRPC; 9101/9102: the services' ops port.
EXPOSE 8080 50051 50052 9101 9102
# Fits the default command (standalone answers /readyz on 8080). docker-compose.yml gives each
# role its own port; Kubernetes ignores HEALTHCHECK and uses the probes of the manifests.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["roomcast-healthcheck", "8080", "/readyz"]
STOPSIGNAL SIGTERM
CMD ["roomcast", "standalone"]
