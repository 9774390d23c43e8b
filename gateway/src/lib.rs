//! The Roomcast gateway: the thin edge that holds WebSockets.
//!
//! Layout:
//! - [`server`] — HTTP surface (handshake at `/ws`, demo page, ops endpoints) and draining;
//! - [`connection`] — one connection's reader (commands) and writer (socket, pings, cursors);
//! - [`socket`] — the WebSocket upgrade, frame encoding, the read side tungstenite parses;
//! - [`pipeline`] — a connection's publishes, pipelined in ordered batches;
//! - [`protocol`] — client frames in, server frames out;
//! - [`state`] — what the connections of one gateway share (`Gateway`);
//! - [`lease`] — the gateway's lease heartbeat with the room-service;
//! - [`hub`] — local connections and rooms, fan-out of broker payloads;
//! - [`limits`] — publish token bucket, connections per user;
//! - [`memory`] — gives freed heap back to the OS after connection churn;
//! - [`repair`] — fills gaps in a room's offsets from history;
//! - [`subscriptions`] — the broker subscriptions this gateway needs, and only those;
//! - [`backend`] — gRPC clients for room-service and auth-service with failover;
//! - [`config`] — settings from flags and environment;
//! - [`run`] — the wiring of the above into one running gateway, shared by the `gateway`
//!   binary and standalone mode (the `roomcast` crate).

pub mod backend;
pub mod config;
pub mod connection;
pub mod hub;
pub mod lease;
pub mod limits;
pub mod memory;
pub mod pipeline;
pub mod protocol;
pub mod repair;
pub mod run;
pub mod server;
pub mod socket;
pub mod state;
pub mod subscriptions;

pub use run::{Bound, RunConfig, bind, run};
