//! Roomcast room service: membership, presence, offsets, history and publishing over gRPC.
//!
//! Layout:
//! - [`config`]: settings from flags and environment, validated at start-up.
//! - [`store`]: the room state (offsets, epochs, history, members, gateway leases) in memory
//!   or in Redis; publishing is atomic with offset assignment, so broadcast order is offset
//!   order.
//! - [`service`]: the gRPC `RoomService` (internal RPCs for gateways, the API-key protected
//!   server API for other backends) on top of a [`store::Store`].
//! - [`serve`]: runs the gRPC server on a listener until shutdown.
//!
//! The service is stateless: run as many instances as needed against one Redis. The gateway's
//! standalone mode builds a memory-backed service in-process with [`store::Store::memory`] and
//! [`service::RoomServiceImpl::new`].

pub mod config;
pub mod service;
pub mod store;

pub use service::{RoomServiceImpl, ServiceOptions};
pub use store::{HistoryLimits, Store, StoreError};

use roomcast_proto::room_service_server::RoomServiceServer;
use tonic::transport::server::TcpIncoming;

/// Serves `service` over gRPC on `listener` until `shutdown` resolves; in-flight calls finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: RoomServiceImpl,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(RoomServiceServer::new(service))
        .serve_with_incoming_shutdown(
            // Small request/response calls: no Nagle delay on replies.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
