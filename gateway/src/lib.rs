//! The Roomcast gateway: the thin edge that holds client connections.
//!
//! Layout:
//! - [`server`] — HTTP surface (`/ws`, `/sse`, the demo page, ops endpoints) and draining;
//! - [`admission`] — what a new connection must pass (origin, token, per-user limits);
//! - [`websocket`] — the WebSocket transport: upgrade, frames in, lingering close;
//! - [`sse`] — the SSE transport: the event stream, and commands posted to any gateway;
//! - [`session`] — the connection core over either transport: commands, the one timer, cleanup;
//! - [`writer`] — a connection's only writer: join holds, transport framing, one write call;
//! - [`outbound`] — a connection's queue and what goes in it (`ConnHandle`, `Outbound`);
//! - [`socket`] — the WebSocket upgrade, frame encoding, the read side tungstenite parses;
//! - [`ping`] — server pings carried by writes going out anyway, late in their interval;
//! - [`pipeline`] — a connection's publishes, pipelined in ordered batches;
//! - [`protocol`] — client frames in, server frames out;
//! - [`hub`] — the registry of connections and rooms, fan-out of broker payloads, run by run;
//! - [`room_stream`] — one room's order: epoch, offsets, duplicates, gap holds, join floors;
//! - [`prefetch`] — cache hints for the fan-out's loop over members;
//! - [`repair`] — fills gaps in a room's offsets from history;
//! - [`subscriptions`] — the broker subscriptions this gateway needs, and only those;
//! - [`state`] — what the connections of one gateway share (`Gateway`);
//! - [`lease`] — the gateway's lease heartbeat with the room-service;
//! - [`limits`] — publish token bucket, connections per user;
//! - [`backend`] — gRPC clients for room-service and auth-service with failover;
//! - [`batcher`] — handshakes' and closes' backend calls of the moment sent as one;
//! - [`config`] — settings from flags and environment;
//! - [`run`] — the wiring of the above into one running gateway, shared by the `gateway`
//!   binary and standalone mode (the `roomcast` crate).

pub mod admission;
pub mod backend;
pub mod batcher;
pub mod config;
pub mod handshake;
pub mod hub;
pub mod lease;
pub mod limits;
pub mod outbound;
pub mod ping;
pub mod pipeline;
pub mod prefetch;
pub mod protocol;
pub mod repair;
pub mod room_stream;
pub mod run;
pub mod server;
pub mod session;
pub mod socket;
pub mod sse;
pub mod state;
pub mod subscriptions;
pub mod websocket;
pub mod writer;

pub use run::{Bound, RunConfig, bind, run};
