//! What every new connection goes through before it starts, whatever its transport (a
//! WebSocket handshake, an SSE stream): not draining, an allowed origin, a valid token, room
//! under the per-user limit here and across the cluster. And the marker by which a streaming
//! response ends its connection's HTTP phase.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use roomcast_proto as pb;
use tonic::Code;

use crate::session::Authenticated;
use crate::state::Gateway;

/// A refusal: `status` with `reason` as the body.
pub fn refuse(status: StatusCode, reason: &str) -> Response {
    (status, format!("{reason}\n")).into_response()
}

/// The token of a request: `?token=` or `Authorization: Bearer`.
pub fn token_of(query_token: Option<String>, headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    query_token.filter(|t| !t.is_empty()).or(bearer)
}

/// What every new connection goes through, whatever its transport: not draining, an allowed
/// origin, a valid token (auth-service), room under the per-user limit (here and across the
/// cluster). A refusal is the HTTP answer to give.
pub async fn authenticate(
    gateway: &Arc<Gateway>,
    query_token: Option<String>,
    headers: &HeaderMap,
) -> Result<Authenticated, Response> {
    if gateway.readiness.is_draining() {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway is draining",
        ));
    }
    if !gateway.origin_allowed(headers) {
        return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    let Some(token) = token_of(query_token, headers) else {
        return Err(refuse(StatusCode::UNAUTHORIZED, "missing token"));
    };
    let verify = pb::VerifyTokenRequest {
        token: token.clone(),
    };
    let verified = gateway.backends.verify_token(verify).await;
    let claims = match verified {
        Ok(verified) => {
            let claims = verified.claims.unwrap_or_default();
            tracing::Span::current().record("user", claims.sub.as_str());
            claims
        }
        Err(status) if status.code() == Code::Unauthenticated => {
            return Err(refuse(StatusCode::UNAUTHORIZED, status.message()));
        }
        Err(status) => {
            tracing::warn!(%status, "token verification failed");
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth service unavailable",
            ));
        }
    };
    let limit = gateway.settings.max_connections_per_user;
    let Some(slot) = gateway.users.try_acquire(&claims.sub, limit) else {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections for this user",
        ));
    };
    // The count across the cluster (a user behind a load balancer reaches every gateway).
    // A room-service that cannot answer does not lock users out: the local count still holds.
    let client_id: Arc<str> = Arc::from(gateway.next_client_id());
    let mut counted = false;
    if limit > 0 {
        let request = pb::ConnectionOpenedRequest {
            client_id: client_id.to_string(),
            user: claims.sub.clone(),
            gateway_id: gateway.id.clone(),
            max_per_user: u32::try_from(limit).unwrap_or(u32::MAX),
        };
        match gateway.backends.connection_opened(request).await {
            Ok(_) => counted = true,
            Err(status) if status.code() == Code::ResourceExhausted => {
                return Err(refuse(StatusCode::TOO_MANY_REQUESTS, status.message()));
            }
            Err(status) => {
                tracing::warn!(%status, "per-user count across the cluster unavailable")
            }
        }
    }
    Ok(Authenticated {
        client_id,
        user: claims.sub,
        token,
        expires_at: claims.exp,
        slot,
        counted,
    })
}

/// In every request's extensions: a response that streams (SSE) marks its connection with it,
/// which ends the connection's HTTP phase and with it the handshake timeout.
#[derive(Clone)]
pub struct StreamStarted(pub(crate) Arc<tokio::sync::Notify>);

impl StreamStarted {
    pub fn mark(&self) {
        self.0.notify_one();
    }
}
