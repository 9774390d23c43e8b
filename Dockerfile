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
EXPOSE 8080 50051 50052 9101 9102
CMD ["gateway", "standalone"]
