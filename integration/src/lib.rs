//! End-to-end test harness for Roomcast: starts real processes (redis-server, auth-service,
//! room-services, gateways, or `roomcast standalone`) on free ports and talks to them as clients
//! do.
//!
//! - [`ports`]: free ports, never handed out twice in one run.
//! - [`process`]: child processes with log files, signals, readiness and kill-on-drop.
//! - [`redis`], [`nats`]: a private redis-server, a private nats-server.
//! - [`cluster`] / [`standalone`] / [`system`]: whole systems, and one interface over both.
//! - [`tls`]: the test certificates and TLS clients trusting the test CA.
//! - [`token`]: test JWTs.
//! - [`client`]: a WebSocket client for the JSON protocol.
//! - [`http`]: a minimal GET for the ops endpoints.
//! - [`otlp`]: an OTLP/gRPC collector the processes export their spans to.
//! - [`scenarios`]: the client-visible checks, run against both flavors by `tests/`.
//!
//! The binaries must be built first (`cargo build --workspace`); they are looked up next to the
//! running executable or in `ROOMCAST_BIN_DIR`.

pub mod chaos;
pub mod client;
pub mod cluster;
pub mod http;
pub mod incoming;
pub mod logs;
pub mod nats;
pub mod otlp;
pub mod ports;
pub mod process;
pub mod redis;
pub mod redis_cluster;
pub mod scenarios;
pub mod sse;
pub mod standalone;
pub mod system;
pub mod tls;
pub mod token;

pub use client::{CloseInfo, ConnectError, ConnectOptions, Incoming, TestClient};
pub use cluster::{Cluster, ClusterOptions};
pub use standalone::Standalone;
pub use system::{Flavor, System, run};
pub use token::Claims;
