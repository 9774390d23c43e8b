# One image with the three binaries; the container's command picks the role.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p roomcast-gateway -p roomcast-room -p roomcast-auth

FROM debian:bookworm-slim
# Root certificates for an https:// JWKS_URL.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 roomcast
COPY --from=build /src/target/release/gateway /src/target/release/room-service /src/target/release/auth-service /usr/local/bin/
USER roomcast
# Inside a container the listeners must face the container's network, not its loopback. The
# cluster binaries already default to 0.0.0.0; standalone defaults to loopback on a laptop.
ENV GATEWAY_ADDR=0.0.0.0:8080 ROOM_SERVICE_ADDR=0.0.0.0:50051
EXPOSE 8080 50051 50052 9101 9102
CMD ["gateway", "standalone"]
