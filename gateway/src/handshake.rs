//! The WebSocket handshake of a plain TCP connection, answered without the HTTP server.
//!
//! Nearly every connection a gateway accepts is a `GET /ws` upgrade whose request head arrives
//! whole in its first segment. The connection's first read is made here; when it holds such an
//! upgrade, this module makes the same checks as the `/ws` route ([`socket::accept_key`],
//! [`admission::authenticate`]) and hands the socket to the connection with its 101 head, which
//! the writer sends in one write with the `connected` frame. Anything else (another path or
//! method, a head split over segments or larger than [`HEAD_MAX`], a malformed or refused
//! handshake header) goes to hyper with the bytes read ([`Rewind`]), which answers as before;
//! TLS connections go to hyper untouched.
//!
//! Why: hyper's HTTP/1 connection, the router and the upgrade hand-over were about a fifth of
//! a gateway's CPU per connection in a connect ramp, and the 101 and `connected` frame left in
//! two writes, each waking the client.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use axum::response::Response;
use bytes::Bytes;
use roomcast_common::telemetry::TRACING_ONLY;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use crate::admission::authenticate;
use crate::socket::{self, Rewind};
use crate::state::Gateway;
use crate::websocket::{self, Handoff};

/// The largest request head read here; a larger one (many cookies) goes to hyper.
pub const HEAD_MAX: usize = 4096;

/// Headers read here, at most; a request with more goes to hyper.
const HEADERS_MAX: usize = 32;

/// The query of a `/ws` request.
#[derive(Deserialize)]
pub struct WsQuery {
    pub token: Option<String>,
}

/// A whole WebSocket upgrade request for `/ws`, checked as far as its own headers go.
#[derive(Debug)]
pub struct Upgrade {
    /// Length of the request head: the bytes to consume from the socket, no more (a client may
    /// send its first frames right behind it).
    pub head_len: usize,
    pub headers: HeaderMap,
    pub token: Option<String>,
    /// The `Sec-WebSocket-Accept` value.
    pub accept: String,
}

/// `bytes` (the start of a connection) as an upgrade this module answers, or `None` for hyper.
pub fn parse(bytes: &[u8]) -> Option<Upgrade> {
    let mut slots = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(head_len) = request.parse(bytes).ok()? else {
        return None;
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let target = request.path?;
    if target.split_once('?').map_or(target, |(path, _)| path) != "/ws" {
        return None;
    }
    // The same query parsing as the route's extractor (a malformed query: hyper's 400).
    let uri: Uri = target.parse().ok()?;
    let Query(query) = Query::<WsQuery>::try_from_uri(&uri).ok()?;
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        // A GET with a body is hyper's to read (or refuse).
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            return None;
        }
        headers.append(name, HeaderValue::from_bytes(header.value).ok()?);
    }
    let accept = socket::accept_key(&headers).ok()?;
    Some(Upgrade {
        head_len,
        headers,
        token: query.token,
        accept,
    })
}

/// Reads the start of the connection and answers its handshake if it is one [`parse`] takes;
/// otherwise gives the socket back with what was read, for hyper to read first.
pub async fn answer(mut tcp: TcpStream, gateway: &Arc<Gateway>) -> Result<(), Rewind> {
    // Read into spare capacity: nothing to zero first, on every connection.
    let mut buf = Vec::with_capacity(HEAD_MAX);
    if let Ok(0) | Err(_) = tcp.read_buf(&mut buf).await {
        return Ok(());
    }
    let Some(upgrade) = parse(&buf) else {
        return Err(Rewind::new(tcp, Bytes::from(buf)));
    };
    // The client's first frames, when it sent them right behind the head.
    let pre_read = buf[upgrade.head_len..].to_vec();
    drop(buf);
    let span = handshake_span();
    let status = async {
        match authenticate(gateway, upgrade.token, &upgrade.headers).await {
            Ok(auth) => {
                let head = switching_protocols(&upgrade.accept);
                tokio::spawn(websocket::run(
                    Handoff::Direct {
                        tcp,
                        head,
                        pre_read,
                    },
                    gateway.clone(),
                    auth,
                ));
                101
            }
            Err(refusal) => {
                let status = refusal.status().as_u16();
                refuse(tcp, refusal).await;
                status
            }
        }
    }
    .instrument(span.clone())
    .await;
    span.record("http.response.status_code", status);
    Ok(())
}

/// The WebSocket handshake's span, when spans are exported: its token check (auth-service
/// `VerifyToken`) and per-user count (room-service `ConnectionOpened`) are its children; the
/// connection that follows is not part of it.
pub fn handshake_span() -> tracing::Span {
    tracing::info_span!(
        target: TRACING_ONLY,
        "gateway.handshake",
        otel.kind = "server",
        user = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    )
}

/// The 101 answer, as hyper would write it for the route (less its `date`).
pub fn switching_protocols(accept: &str) -> Bytes {
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-accept: ",
    );
    head.extend_from_slice(accept.as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    Bytes::from(head)
}

/// Writes a refusal and closes: the status, the response's headers, its body. What the client
/// sent past the head is drained first ([`socket::drain_input`]), so that the close is not a
/// reset that could discard the answer.
async fn refuse(mut tcp: TcpStream, refusal: Response) {
    let bytes = encode(refusal).await;
    if tcp.write_all(&bytes).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    socket::drain_input(&mut tcp).await;
}

/// A refusal as HTTP/1.1 bytes, with `content-length` and `connection: close`.
async fn encode(response: Response) -> Vec<u8> {
    let (parts, body) = response.into_parts();
    // Refusals are a line of text.
    let body = axum::body::to_bytes(Body::new(body), 64 * 1024)
        .await
        .unwrap_or_default();
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission;
    use axum::http::StatusCode;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn head(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\
             {extra}\r\n"
        )
    }

    #[test]
    fn a_whole_upgrade_is_taken_with_its_token_and_accept_key() {
        let request = head("/ws?token=a%2Bb&x=1", "Origin: https://app\r\n");
        let mut bytes = request.clone().into_bytes();
        // A frame sent right behind the head is not part of it.
        bytes.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let upgrade = parse(&bytes).expect("an upgrade");
        assert_eq!(upgrade.head_len, request.len());
        assert_eq!(upgrade.token.as_deref(), Some("a+b"));
        // RFC 6455's own example.
        assert_eq!(upgrade.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(upgrade.headers.get("origin").unwrap(), "https://app");
        let head = switching_protocols(&upgrade.accept);
        assert!(head.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(head.ends_with(b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
    }

    #[test]
    fn anything_else_is_left_to_hyper() {
        let whole = head("/ws?token=t", "");
        // Split over segments: only a prefix has arrived.
        assert!(parse(&whole.as_bytes()[..whole.len() - 3]).is_none());
        assert!(parse(head("/sse?token=t", "").as_bytes()).is_none());
        assert!(parse(head("/wss", "").as_bytes()).is_none());
        assert!(parse(head("/ws", "Content-Length: 3\r\n").as_bytes()).is_none());
        assert!(parse(whole.replacen("GET", "POST", 1).as_bytes()).is_none());
        assert!(parse(whole.replacen("HTTP/1.1", "HTTP/1.0", 1).as_bytes()).is_none());
        // Refused handshakes (400, 426) and bad queries are answered by hyper.
        assert!(parse(whole.replace("Version: 13", "Version: 8").as_bytes()).is_none());
        assert!(parse(whole.replace("Sec-WebSocket-Key", "X-Key").as_bytes()).is_none());
        assert!(
            parse(
                whole
                    .replace("Upgrade: websocket", "Upgrade: h2c")
                    .as_bytes()
            )
            .is_none()
        );
        assert!(parse(head("/ws?token=a&token=b", "").as_bytes()).is_none());
        let many: String = (0..HEADERS_MAX).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(parse(head("/ws", &many).as_bytes()).is_none());
        assert!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").is_none());
    }

    #[tokio::test]
    async fn a_refusal_is_a_whole_http_response() {
        let refusal = admission::refuse(StatusCode::UNAUTHORIZED, "token expired");
        let bytes = String::from_utf8(encode(refusal).await).unwrap();
        let (head, body) = bytes.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
        assert!(
            head.contains("content-type: text/plain; charset=utf-8"),
            "{head}"
        );
        assert!(head.contains("content-length: 14\r\n"), "{head}");
        assert!(head.ends_with("connection: close"), "{head}");
        assert_eq!(body, "token expired\n");
    }
}
