//! Roomcast room service: membership, presence, offsets, history and publishing over gRPC.
//!
//! Layout:
//! - [`config`]: settings from flags and environment, validated at start-up.
//! - [`store`]: the room state (offsets, epochs, history, members, gateway leases) behind the
//!   [`store::Store`] trait, in memory or in Redis; publishing is atomic with offset
//!   assignment, so broadcast order is offset order.
//! - [`service`]: the internal gRPC `RoomService` (called by gateways, behind the internal
//!   token) on top of a [`store::SharedStore`].
//! - [`server_api`]: the gRPC `ServerApi` for other backends, behind the API key.
//! - [`serve`] / [`serve_with`]: run the gRPC server on a listener until shutdown, plain or
//!   over TLS (`GRPC_TLS_*`).
//!
//! The service is stateless: run as many instances as needed against one Redis. Standalone
//! mode (the `roomcast` crate) builds a memory-backed service in-process with
//! [`store::MemoryStore`] and [`service::RoomServiceImpl::new`].

pub mod config;
pub mod server_api;
pub mod service;
pub mod store;

pub use server_api::ServerApiImpl;
pub use service::{RoomServiceImpl, ServiceOptions};
pub use store::{HistoryLimits, SharedStore, Store, StoreError};

use roomcast_common::credential::RequireBearer;
use roomcast_common::propagation::ExtractTraceContextLayer;
use roomcast_proto::room_service_server::RoomServiceServer;
use roomcast_proto::server_api_server::ServerApiServer;
use tonic::transport::ServerTlsConfig;
use tonic::transport::server::TcpIncoming;

/// Serves, on `listener` until `shutdown` resolves (in-flight calls finish):
/// - `roomcast.v1.RoomService` behind the internal token,
/// - `roomcast.v1.ServerApi` behind the API key (switched off without one),
/// - `grpc.health.v1.Health` and server reflection, open, so load balancers and `grpcurl`
///   work without credentials or the proto files.
///
/// A call carrying W3C trace context (`traceparent`) runs under it, so its handler span is the
/// caller's child ([`roomcast_common::propagation`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: RoomServiceImpl,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(listener, service, ServeOptions::default(), shutdown).await
}

/// How [`serve_with`] serves, beyond the defaults of [`serve`].
#[derive(Default)]
pub struct ServeOptions {
    /// TLS (with client certificates required if it names a client CA: `GRPC_TLS_*`).
    pub tls: Option<ServerTlsConfig>,
    /// The gRPC health status follows it (NOT_SERVING while the store is unreachable or the
    /// service drains), as `/readyz` does; without it, always SERVING.
    pub readiness: Option<roomcast_common::ops::Readiness>,
}

/// [`serve`], with TLS and health following readiness.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    service: RoomServiceImpl,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let ServeOptions { tls, readiness } = options;
    let options = service.options();
    let internal = RequireBearer::new(options.internal_token.as_deref(), "internal token");
    let api_key = RequireBearer::new(options.api_key.as_deref(), "API key");
    let (health_reporter, health) = tonic_health::server::health_reporter();
    match readiness {
        None => set_health(&health_reporter, true).await,
        Some(readiness) => {
            let reporter = health_reporter.clone();
            tokio::spawn(async move {
                let mut shown = None;
                loop {
                    let ready = readiness.get();
                    if shown != Some(ready) {
                        set_health(&reporter, ready).await;
                        shown = Some(ready);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            });
        }
    }
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
        // Handler spans continue the caller's trace (while span export is on).
        .layer(ExtractTraceContextLayer)
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

/// Marks every service of this port (and the server as a whole, "") serving or not.
async fn set_health(reporter: &tonic_health::server::HealthReporter, ready: bool) {
    use tonic_health::ServingStatus;
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter
        .set_service_status(
            <RoomServiceServer<RoomServiceImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <ServerApiServer<ServerApiImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}
