//! The gateway's HTTP surface: the WebSocket handshake at `/ws` and the SSE endpoints (origin
//! and token checked before a connection starts), the demo page at `/`, the ops endpoints, and
//! draining on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use roomcast_common::close_code::CloseCode;
use roomcast_common::ops;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::admission::{StreamStarted, authenticate, refuse};
use crate::handshake::{self, WsQuery, handshake_span};
use crate::socket;
use crate::sse;
use crate::state::Gateway;
use crate::websocket::{self, Handoff};

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(websocket))
        .route("/sse", get(sse::stream))
        .route("/sse/send", post(sse::send).options(sse::preflight))
        .with_state(gateway.clone())
        .merge(ops::router(gateway.readiness.clone()))
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The `/ws` route: a WebSocket handshake that [`handshake::answer`] left to hyper (over TLS,
/// or a request it does not take).
async fn websocket(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<WsQuery>,
    request: Request,
) -> Response {
    let span = handshake_span();
    let response = handshake(gateway, query, request)
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn handshake(gateway: Arc<Gateway>, query: WsQuery, mut request: Request) -> Response {
    // Only a request over HTTP/1.1 can be upgraded.
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return refuse(StatusCode::BAD_REQUEST, "the connection cannot be upgraded");
    };
    let headers = request.headers();
    let accept = match socket::accept_key(headers) {
        Ok(accept) => accept,
        Err(error @ socket::HandshakeError::Version) => {
            let mut response = refuse(StatusCode::UPGRADE_REQUIRED, &error.to_string());
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return response;
        }
        Err(error) => return refuse(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let auth = match authenticate(&gateway, query.token, headers).await {
        Ok(auth) => auth,
        Err(refused) => return refused,
    };
    tokio::spawn(websocket::run(Handoff::Hyper(on_upgrade), gateway, auth));
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// Serves until `shutdown` resolves, then drains: readiness off, new handshakes refused, open
/// connections closed with 1001 (clients reconnect elsewhere) in batches spread over
/// `drain_window`, then returns.
///
/// With `tls`, every connection is a TLS connection (`wss://`, `https://`); its handshake
/// counts against the handshake timeout like the HTTP phase.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_window: Duration,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(gateway.clone());
    let limits = HandshakeLimits {
        timeout: gateway.settings.handshake_timeout(),
        max_pending: gateway.settings.max_pending_handshakes,
    };
    let server = tokio::spawn(accept_loop(
        listener,
        gateway.clone(),
        app,
        limits,
        tls,
        accepting_stopped,
    ));
    shutdown.await;
    tracing::info!(connections = gateway.hub.connection_count(), "draining");
    gateway.readiness.start_draining();
    drain(&gateway, drain_window).await;
    let _ = stop_accepting.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

/// Bounds on connections that have not finished their HTTP phase (the WebSocket upgrade, or
/// any other request).
#[derive(Debug, Clone, Copy)]
struct HandshakeLimits {
    /// Time from accept to the end of the HTTP phase; past it the connection is dropped.
    timeout: Duration,
    /// Connections in their HTTP phase at once; more are refused at once.
    max_pending: usize,
}

/// Answer to a connection over the pending limit, written without waiting (best effort).
const OVERLOADED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// One connection counted as pending; the count drops when this does.
struct PendingSlot(Arc<AtomicUsize>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections and serves HTTP/1.1 on each until `stop` fires: a plain WebSocket
/// handshake by hand ([`handshake`]), anything else with hyper. HTTP/1.1 only, served on the
/// `TcpStream` (behind the bytes already read, [`socket::Rewind`]) or on the TLS stream over it
/// (with `tls`), so that an upgraded connection gives its socket back (see
/// [`socket::upgraded`]).
///
/// A connection's HTTP phase (TLS handshake included) ends when it is upgraded (the hyper
/// connection then resolves and hands the socket over) or closed. It is bounded in time and in
/// number: a client that never sends a byte, or sends its headers a byte at a time, would
/// otherwise hold a socket and a task for ever, and enough of them exhaust the file
/// descriptors.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    app: Router,
    limits: HandshakeLimits,
    tls: Option<TlsAcceptor>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors, most likely: wait for some to close.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if pending.load(Ordering::Relaxed) >= limits.max_pending {
            metrics::counter!("roomcast_gateway_handshakes_refused_total").increment(1);
            // A fresh socket's send buffer is empty: this write does not block. (A TLS client
            // could not read it: it is just closed.)
            if tls.is_none() {
                let _ = tcp.try_write(OVERLOADED);
            }
            continue;
        }
        pending.fetch_add(1, Ordering::Relaxed);
        let slot = PendingSlot(pending.clone());
        // No Nagle delay: set on the listener, which the socket inherits (`run::listen`).
        // Every request of this connection can tell the loop that it became a long-lived
        // stream (SSE): its HTTP phase is then over.
        let streaming = StreamStarted(Arc::new(tokio::sync::Notify::new()));
        let started = streaming.0.clone();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(streaming.clone());
            tower_service::Service::call(&mut app.clone(), request)
        });
        let tls = tls.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let phase = async move {
                match tls {
                    None => match handshake::answer(tcp, &gateway).await {
                        Ok(()) => Ok(()),
                        Err(rewind) => http_phase(rewind, service).await,
                    },
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => http_phase(stream, service).await,
                        Err(error) => {
                            metrics::counter!("roomcast_gateway_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(%error, "TLS handshake failed");
                            Ok(())
                        }
                    },
                }
            };
            tokio::pin!(phase);
            let ended = tokio::select! {
                ended = &mut phase => Some(ended),
                () = started.notified() => {
                    // A stream now, served for as long as it lasts; no longer pending.
                    drop(slot);
                    Some(phase.await)
                }
                () = tokio::time::sleep(limits.timeout) => None,
            };
            match ended {
                Some(Ok(())) => {}
                Some(Err(error)) => tracing::debug!(%error, "http connection ended with an error"),
                None => {
                    // Dropping the connection closes the socket (and cancels a handshake still
                    // being checked: no WebSocket starts).
                    metrics::counter!("roomcast_gateway_handshake_timeouts_total").increment(1);
                    tracing::debug!("http phase exceeded the handshake timeout");
                }
            }
        });
    }
}

/// Serves HTTP/1.1 on one connection until it closes or is upgraded. `io` is the
/// plain socket (with what was read of it already) or the TLS stream: exactly the types
/// [`socket::upgraded`] takes back.
async fn http_phase<I, S>(io: I, service: S) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
}

async fn drain(gateway: &Gateway, window: Duration) {
    const BATCHES: u32 = 10;
    let connections = gateway.hub.all_connections();
    let batch_size = connections.len().div_ceil(BATCHES as usize).max(1);
    let pause = window / BATCHES;
    for batch in connections.chunks(batch_size) {
        for conn in batch {
            conn.close(CloseCode::GOING_AWAY, "gateway draining; reconnect");
        }
        tokio::time::sleep(pause).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while gateway.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
