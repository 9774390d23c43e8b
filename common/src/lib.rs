//! Pieces shared by the gateway and the services.
//!
//! - [`broker`] — the pub/sub leg (in-memory for standalone, Redis for a cluster) that carries
//!   broadcasts from room-service to the gateways holding members of a room.
//! - [`credential`] — bearer credentials on gRPC calls (internal token, API key), checked in
//!   an interceptor.
//! - [`envelope`] — the bytes that travel on the broker, and the channel names.
//! - [`namespace`] — namespaces (`NAMESPACES_FILE`): per-room-family options looked up by
//!   room name.
//! - [`frame`] — the client frames more than one crate builds (`message`, `member_joined`,
//!   `member_left`), each in exactly one shape everywhere.
//! - [`close_code`] — WebSocket close codes: the ones Roomcast sends, which codes a backend may
//!   ask for, and whether a client should reconnect after each.
//! - [`error_code`] — the one error-code enum shared by the wire protocol and gRPC statuses.
//! - [`room`] — room-name rules.
//! - [`runtime`] — the tokio runtime of each binary (`WORKER_THREADS`).
//! - [`ops`] — `/healthz`, `/readyz`, `/metrics` for every binary.
//! - [`tls`] — TLS material from PEM files (gRPC servers and clients, the gateway's listener,
//!   `rediss://`), checked at start-up.
//! - [`telemetry`] — logging (`RUST_LOG`, `LOG_FORMAT=json`) and OTLP span export
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT`).
//! - [`propagation`] — W3C trace context across gRPC calls (client interceptor, server layer),
//!   on while span export is.

pub mod broker;
pub mod close_code;
pub mod credential;
pub mod envelope;
pub mod error_code;
pub mod frame;
pub mod namespace;
pub mod ops;
pub mod propagation;
pub mod room;
pub mod runtime;
pub mod telemetry;
pub mod tls;

/// Starts the idempotency keys a gateway makes up for its own retries of a publish (the
/// client gave none). Room-service keeps those only for [`RETRY_KEY_WINDOW`]: they guard a
/// retry within one call, not a client's retry after a reconnect.
pub const RETRY_KEY_PREFIX: &str = "retry:";
pub const RETRY_KEY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// Milliseconds since the unix epoch.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
