//! Roomcast auth service: verifies client tokens (JWT) and decides what a token may do in a
//! room, over gRPC (`roomcast.v1.AuthService`).
//!
//! Layout:
//! - [`claims`]: the claims Roomcast reads, room-pattern matching, `can_join` / `can_publish`,
//!   and conversion to and from the proto `Claims`.
//! - [`verifier`]: builds a [`Verifier`] from settings (`JWT_SECRET`, `JWT_PUBLIC_KEY_FILE` or
//!   `JWKS_URL`) and checks tokens; every refusal is a [`VerifyError`] with a short, client-safe
//!   message.
//! - [`jwks`]: the keys of a `JWKS_URL`: fetched over HTTP(S), cached, refreshed periodically
//!   and on an unknown `kid` (rate-limited).
//! - [`mint`]: HS256 development tokens (the `mint-token` command, standalone mode, tests).
//! - [`service`]: the tonic `AuthService` implementation.
//! - [`serve`] / [`serve_tls`]: run the gRPC server on a bound listener, plain or over TLS
//!   (`GRPC_TLS_*`); the binary and standalone mode call them.

pub mod claims;
pub mod jwks;
pub mod mint;
pub mod service;
pub mod verifier;

pub use claims::{Claims, MAX_SUBJECT_BYTES, pattern_matches, valid_subject};
pub use jwks::{FetchError, Jwks, JwksError, JwksSettings};
pub use mint::{MintError, encode_hs256, mint_hs256};
pub use service::AuthHandler;
pub use verifier::{ConfigError, KeyError, Verifier, VerifierConfig, VerifyError};

use roomcast_common::credential::RequireBearer;
use roomcast_common::propagation::ExtractTraceContextLayer;
use roomcast_proto::auth_service_server::AuthServiceServer;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

/// Serves `AuthService` on `listener` until `shutdown` resolves, then lets in-flight calls
/// finish. Every call must carry `internal_token` (checked before any handler runs); the
/// gRPC health service is open, for load balancers. A call carrying W3C trace context runs
/// under it ([`roomcast_common::propagation`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    verifier: Verifier,
    internal_token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_tls(listener, verifier, internal_token, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (with client certificates required if it names a
/// client CA: `GRPC_TLS_*`).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    verifier: Verifier,
    internal_token: String,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Calls are tiny request/response pairs: without TCP_NODELAY, Nagle's algorithm can hold a
    // reply back for a delayed ACK.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuthServiceServer<AuthHandler>>()
        .await;
    let credential = RequireBearer::new(Some(&internal_token), "internal token");
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        // Handler spans continue the caller's trace (while span export is on).
        .layer(ExtractTraceContextLayer)
        .add_service(AuthServiceServer::with_interceptor(
            AuthHandler::new(verifier),
            credential,
        ))
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_proto::auth_service_client::AuthServiceClient;
    use roomcast_proto::{AuthorizeRequest, VerifyTokenRequest};

    const SECRET: &[u8] = b"network-test-secret-network-test";
    const INTERNAL: &str = "internal-token-for-tests";

    #[tokio::test]
    async fn serves_real_grpc_clients_and_stops_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let verifier = Verifier::hs256(SECRET).unwrap();
        let server = tokio::spawn(serve(listener, verifier, INTERNAL.into(), async {
            let _ = stopped.await;
        }));

        let token = mint_hs256(SECRET, "alice", 60, Some(vec!["chat:*".into()]), None).unwrap();
        // Without the internal token nothing is answered, not even whether a token is valid.
        let mut outsider = AuthServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let status = outsider
            .verify_token(VerifyTokenRequest {
                token: token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("internal token"), "{status:?}");

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let attach = roomcast_common::credential::AttachBearer::new(INTERNAL).unwrap();
        let mut client = AuthServiceClient::with_interceptor(channel, attach);

        let claims = client
            .verify_token(VerifyTokenRequest {
                token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .claims
            .unwrap();
        assert_eq!(Claims::from(claims).rooms, Some(vec!["chat:*".to_owned()]));

        let allowed = client
            .authorize(AuthorizeRequest {
                token: token.clone(),
                room: "chat:1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(allowed.can_join && allowed.can_publish);
        let denied = client
            .authorize(AuthorizeRequest {
                token,
                room: "lobby".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!denied.can_join && !denied.can_publish);

        let status = client
            .verify_token(VerifyTokenRequest {
                token: "a.b.c".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), "malformed token");

        drop(client);
        drop(outsider);
        stop.send(()).unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops after shutdown")
            .unwrap();
        assert!(result.is_ok());
    }
}
