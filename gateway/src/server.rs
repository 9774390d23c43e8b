//! The gateway's HTTP surface: the WebSocket handshake at `/ws` (origin and token checked
//! before the upgrade), the demo page at `/`, the ops endpoints, and draining on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use roomcast_common::ops::{self, Readiness};
use roomcast_proto as pb;
use serde::Deserialize;
use tonic::Code;

use crate::backend::Backends;
use crate::config::ConnectionSettings;
use crate::connection::{self, Authenticated};
use crate::hub::Hub;
use crate::limits::UserConnections;
use crate::subscriptions::Subscriptions;

/// Read buffer per connection, allocated for every connection: small, since most frames are
/// small and idle connections are the common case (tungstenite's default is 128 KiB; 4 KiB
/// cost 3.2 KB more RSS per idle connection than this, measured with `loadgen connections`).
/// Larger frames still arrive whole: the buffer grows to the frame's announced length.
const READ_BUFFER_BYTES: usize = 512;

/// Everything the connections of this gateway share.
pub struct Gateway {
    /// Unique id; prefix of every client id issued here.
    pub id: String,
    pub hub: Arc<Hub>,
    pub subscriptions: Subscriptions,
    pub backends: Backends,
    pub settings: ConnectionSettings,
    /// Parsed `ALLOWED_ORIGINS`; empty allows any.
    origins: Vec<String>,
    pub readiness: Readiness,
    /// Open connections per user, for `MAX_CONNECTIONS_PER_USER`.
    users: UserConnections,
    next_client: AtomicU64,
}

impl Gateway {
    pub fn new(
        id: String,
        hub: Arc<Hub>,
        subscriptions: Subscriptions,
        backends: Backends,
        settings: ConnectionSettings,
        readiness: Readiness,
    ) -> Self {
        Self {
            id,
            hub,
            subscriptions,
            backends,
            origins: settings.origins(),
            settings,
            readiness,
            users: UserConnections::default(),
            next_client: AtomicU64::new(1),
        }
    }

    /// A client id unique in the cluster: this gateway's id and a sequence number.
    pub fn next_client_id(&self) -> String {
        format!(
            "{}-{}",
            self.id,
            self.next_client.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        // Non-browser clients send no Origin; the check exists against cross-site browser use.
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        self.origins.iter().any(|o| o == origin)
    }
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(websocket))
        .with_state(gateway.clone())
        .merge(ops::router(gateway.readiness.clone()))
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
}

fn refuse(status: StatusCode, reason: &str) -> Response {
    (status, format!("{reason}\n")).into_response()
}

async fn websocket(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if gateway.readiness.is_draining() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "gateway is draining");
    }
    if !gateway.origin_allowed(&headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = query.token.filter(|t| !t.is_empty()).or(bearer) else {
        return refuse(StatusCode::UNAUTHORIZED, "missing token");
    };
    let request = pb::VerifyTokenRequest {
        token: token.clone(),
    };
    let verified = gateway.backends.verify_token(request).await;
    let claims = match verified {
        Ok(verified) => verified.claims.unwrap_or_default(),
        Err(status) if status.code() == Code::Unauthenticated => {
            return refuse(StatusCode::UNAUTHORIZED, status.message());
        }
        Err(status) => {
            tracing::warn!(%status, "token verification failed");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "auth service unavailable");
        }
    };
    let limit = gateway.settings.max_connections_per_user;
    let Some(slot) = gateway.users.try_acquire(&claims.sub, limit) else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections for this user",
        );
    };
    let auth = Authenticated {
        user: claims.sub,
        token,
        expires_at: claims.exp,
        slot,
    };
    let max = gateway.settings.max_frame_bytes;
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| connection::run(socket, gateway, auth))
}

/// Serves until `shutdown` resolves, then drains: readiness off, new handshakes refused, open
/// connections closed with 1001 (clients reconnect elsewhere) in batches spread over
/// `drain_window`, then returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_window: Duration,
) -> std::io::Result<()> {
    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(gateway.clone());
    // Frames are small and latency matters more than packet count: no Nagle delay (without
    // this a `published` reply waits for the client's next frame or a delayed ACK).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = accepting_stopped.await;
            })
            .await
    });
    shutdown.await;
    tracing::info!(connections = gateway.hub.connection_count(), "draining");
    gateway.readiness.start_draining();
    drain(&gateway, drain_window).await;
    let _ = stop_accepting.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(result)) => result,
        _ => Ok(()),
    }
}

async fn drain(gateway: &Gateway, window: Duration) {
    const BATCHES: u32 = 10;
    let connections = gateway.hub.all_connections();
    let batch_size = connections.len().div_ceil(BATCHES as usize).max(1);
    let pause = window / BATCHES;
    for batch in connections.chunks(batch_size) {
        for conn in batch {
            conn.close(connection::close::GOING_AWAY, "gateway draining; reconnect");
        }
        tokio::time::sleep(pause).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while gateway.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Renews this gateway's lease with the room-service and reports its connection count. The
/// lease lasts one heartbeat timeout, renewed three times per lease: when a gateway dies, its
/// connections leave presence within the same bound as a dead connection (plus the
/// room-service's sweep interval).
pub async fn heartbeat_loop(gateway: Arc<Gateway>) {
    let lease = gateway.settings.heartbeat_timeout();
    let mut tick = tokio::time::interval(lease / 3);
    loop {
        tick.tick().await;
        let request = pb::GatewayHeartbeatRequest {
            gateway_id: gateway.id.clone(),
            connections: gateway.hub.connection_count() as u64,
            lease_ms: lease.as_millis() as u64,
        };
        if let Err(status) = gateway.backends.gateway_heartbeat(request).await {
            tracing::debug!(%status, "gateway heartbeat not recorded");
        }
    }
}
