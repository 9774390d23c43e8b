//! Roomcast room service: membership, presence, offsets, history and publishing over gRPC.
//!
//! Layout:
//! - [`config`]: settings from flags and environment, validated at start-up.
//! - [`store`]: the room state (offsets, epochs, history, members, gateway leases) in memory
//!   or in Redis; publishing is atomic with offset assignment, so broadcast order is offset
//!   order.
//! - [`service`]: the internal gRPC `RoomService` (called by gateways, behind the internal
//!   token) on top of a [`store::Store`].
//! - [`server_api`]: the gRPC `ServerApi` for other backends, behind the API key.
//! - [`serve`] / [`serve_tls`]: run the gRPC server on a listener until shutdown, plain or
//!   over TLS (`GRPC_TLS_*`).
//!
//! The service is stateless: run as many instances as needed against one Redis. The gateway's
//! standalone mode builds a memory-backed service in-process with [`store::Store::memory`] and
//! [`service::RoomServiceImpl::new`].

pub mod config;
pub mod server_api;
pub mod service;
pub mod store;

pub use server_api::ServerApiImpl;
pub use service::{RoomServiceImpl, ServiceOptions};
pub use store::{HistoryLimits, Store, StoreError};

use roomcast_common::credential::RequireBearer;
use roomcast_proto::room_service_server::RoomServiceServer;
use roomcast_proto::server_api_server::ServerApiServer;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TcpIncoming;

/// Serves, on `listener` until `shutdown` resolves (in-flight calls finish):
/// - `roomcast.v1.RoomService` behind the internal token,
/// - `roomcast.v1.ServerApi` behind the API key (switched off without one),
/// - `grpc.health.v1.Health` and server reflection, open, so load balancers and `grpcurl`
///   work without credentials or the proto files.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: RoomServiceImpl,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_tls(listener, service, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (with client certificates required if it names a
/// client CA: `GRPC_TLS_*`).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    service: RoomServiceImpl,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let options = service.options();
    let internal = RequireBearer::new(options.internal_token.as_deref(), "internal token");
    let api_key = RequireBearer::new(options.api_key.as_deref(), "API key");
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RoomServiceServer<RoomServiceImpl>>()
        .await;
    health_reporter
        .set_serving::<ServerApiServer<ServerApiImpl>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(roomcast_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok();
    let server_api = ServerApiImpl::new(service.clone());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(RoomServiceServer::with_interceptor(service, internal))
        .add_service(ServerApiServer::with_interceptor(server_api, api_key))
        .add_service(health)
        .add_optional_service(reflection)
        .serve_with_incoming_shutdown(
            // Small request/response calls: no Nagle delay on replies.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
