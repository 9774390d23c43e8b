//! Pieces shared by the gateway and the services.
//!
//! - [`broker`] — the pub/sub leg (in-memory for standalone, Redis for a cluster) that carries
//!   broadcasts from room-service to the gateways holding members of a room.
//! - [`envelope`] — the bytes that travel on the broker, and the channel names.
//! - [`nats`] — NATS as the pub/sub leg instead of Redis pub/sub.
//! - [`message`] — the JSON `message` frame, built in exactly one shape everywhere.
//! - [`error_code`] — the one error-code enum shared by the wire protocol and gRPC statuses.
//! - [`room`] — room-name rules.
//! - [`ops`] — `/healthz`, `/readyz`, `/metrics` for every binary.
//! - [`telemetry`] — logging (`RUST_LOG`, `LOG_FORMAT=json`) and OTLP span export
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT`).

pub mod broker;
pub mod envelope;
pub mod error_code;
pub mod message;
pub mod nats;
pub mod ops;
pub mod room;
pub mod telemetry;

/// Milliseconds since the unix epoch.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
