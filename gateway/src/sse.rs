//! The SSE transport (contract §1.5): an edge over the session for clients whose network blocks
//! WebSocket. `GET /sse` is the connection (its response body is the writer's output, framed
//! as `text/event-stream`); `POST /sse/send` carries client frames and may land on ANY gateway.
//!
//! No sticky sessions and no shared session table: a session's name says which connection it
//! is (`<client id>~<user tag>~<secret>`, the client id naming its gateway). A POST on the
//! session's own gateway hands the frames to the connection; on another gateway it is published
//! on the session's gateway's broker channel, and the hub there hands it over. The session runs
//! posted frames only when the secret and the user are its own; the receiving gateway already
//! answered 401/403 for a bad token or another user's.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use roomcast_common::envelope::{self, Control};
use roomcast_proto as pb;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncReadExt;
use tonic::Code;

use crate::admission::{StreamStarted, authenticate, refuse, token_of};
use crate::outbound::ConnHandle;
use crate::session::{Inbound, Session, Source};
use crate::state::Gateway;
use crate::writer::{self, Egress, Framing, WriterSettings};

/// The header naming the session of a `POST /sse/send`.
pub const SESSION_HEADER: &str = "x-roomcast-session";

/// What the writer of one stream may have written that the client has not read yet. Past it
/// the writer waits, its queue fills, and a client that stopped reading is closed with 4008.
const STREAM_BUFFER: usize = 64 * 1024;

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// The writer's end of a stream: a pipe whose other end is the response body.
impl Egress for tokio::io::DuplexStream {}

/// A session's name, parsed.
struct Name<'a> {
    client_id: &'a str,
    user_tag: &'a str,
    secret: &'a str,
}

impl<'a> Name<'a> {
    fn parse(name: &'a str) -> Option<Self> {
        let mut parts = name.rsplitn(3, '~');
        let secret = parts.next()?;
        let user_tag = parts.next()?;
        let client_id = parts.next()?;
        (!client_id.is_empty() && secret.len() == 32).then_some(Name {
            client_id,
            user_tag,
            secret,
        })
    }

    /// The gateway holding the connection: a client id is `<gateway id>-<n>`.
    fn gateway(&self) -> Option<&'a str> {
        self.client_id.rsplit_once('-').map(|(gateway, _)| gateway)
    }
}

/// A public tag of the session's user in its name, so any gateway can answer 403 to another
/// user's token without asking the session's gateway (FNV-1a: stable across builds and
/// versions, unlike the standard library's hasher). Not a secret: the token proves the user.
fn user_tag(user: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The CORS headers for an allowed browser origin (none for other clients).
fn cors(gateway: &Gateway, request: &HeaderMap, response: &mut Response) {
    let Some(origin) = request.get(header::ORIGIN) else {
        return;
    };
    if !gateway.origin_allowed(request) {
        return;
    }
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// Ends the connection when dropped with the response body.
struct EndsWithBody(Arc<ConnHandle>);

impl Drop for EndsWithBody {
    fn drop(&mut self) {
        self.0.shut();
    }
}

/// The session's input: posted frames arrive as server commands (see [`Session::serve`]), so
/// this side only waits; the stream ends when a write to it fails.
struct Posted {
    secret: String,
    user: String,
}

impl Source for Posted {
    async fn next(&mut self) -> Inbound {
        std::future::pending().await
    }

    fn expects_heartbeats(&self) -> bool {
        false
    }

    fn accepts_posted(&self, secret: &str, user: &str) -> bool {
        roomcast_common::credential::constant_time_eq(secret.as_bytes(), self.secret.as_bytes())
            && user == self.user
    }
}

/// `GET /sse`: checked like a WebSocket handshake, then a connection whose frames are events.
pub async fn stream(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<TokenQuery>,
    request: Request,
) -> Response {
    let headers = request.headers();
    let auth = match authenticate(&gateway, query.token, headers).await {
        Ok(auth) => auth,
        Err(mut refused) => {
            cors(&gateway, headers, &mut refused);
            return refused;
        }
    };
    let secret = format!("{:032x}", rand::random::<u128>());
    let user = auth.user.clone();
    let name = format!("{}~{}~{secret}", auth.client_id, user_tag(&user));
    let mut session = Session::open(gateway.clone(), auth, Some(&name), None).await;
    let conn = session.conn().clone();
    let (output, body) = tokio::io::duplex(STREAM_BUFFER);
    let writer = tokio::spawn(writer::run(
        output,
        conn.clone(),
        WriterSettings {
            limit: u32::try_from(gateway.settings.outbound_queue_len).unwrap_or(u32::MAX),
            delay: gateway.settings.write_delay(),
            framing: Framing::Sse,
            direct: false,
        },
    ));
    tokio::spawn(async move {
        session.serve(&mut Posted { secret, user }, writer).await;
    });
    if let Some(streaming) = request.extensions().get::<StreamStarted>() {
        streaming.mark();
    }
    // hyper drops the body when the client goes away (it watches for EOF while it streams);
    // the guard then ends the session at once rather than at its next write.
    let guard = EndsWithBody(conn);
    let chunks = futures_util::stream::unfold((body, guard), |(mut body, guard)| async move {
        let mut chunk = BytesMut::with_capacity(8 * 1024);
        match body.read_buf(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some((Ok::<Bytes, std::io::Error>(chunk.freeze()), (body, guard))),
        }
    });
    let mut response = Response::new(Body::from_stream(chunks));
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer responses (nginx) would hold the events back.
    out.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(&gateway, request.headers(), &mut response);
    response
}

/// `OPTIONS /sse/send`: the CORS preflight of a browser posting with its headers.
pub async fn preflight(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if headers.get(header::ORIGIN).is_none() || !gateway.origin_allowed(&headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    cors(&gateway, &headers, &mut response);
    let out = response.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, X-Roomcast-Session, Content-Type"),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    out.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `POST /sse/send`: one client frame (a JSON object) or an array of them, for the session
/// named by the header, run in order on the session's gateway. Replies go to the stream.
pub async fn send(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<TokenQuery>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let mut response = post(&gateway, query, &parts.headers, body).await;
    cors(&gateway, &parts.headers, &mut response);
    // One request per connection: a kept-alive connection would stay in its HTTP phase, and
    // the handshake timeout would cut it, perhaps mid-post.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn post(gateway: &Gateway, query: TokenQuery, headers: &HeaderMap, body: Body) -> Response {
    if !gateway.origin_allowed(headers) {
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let Some(token) = token_of(query.token, headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "missing token");
    };
    let Some(name) = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Name::parse)
    else {
        return refuse(StatusCode::NOT_FOUND, "no such session");
    };
    let body = match axum::body::to_bytes(body, gateway.settings.max_frame_bytes).await {
        Ok(body) => body,
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body over MAX_FRAME_BYTES"),
    };
    let Some(frames) = frames_of(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object (one frame) or an array of them",
        );
    };
    let verify = pb::VerifyTokenRequest { token };
    let user = match gateway.backends.verify_token(verify).await {
        Ok(verified) => verified.claims.unwrap_or_default().sub,
        Err(status) if status.code() == Code::Unauthenticated => {
            return refuse(StatusCode::UNAUTHORIZED, status.message());
        }
        Err(status) => {
            tracing::warn!(%status, "token verification failed");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "auth service unavailable");
        }
    };
    if user_tag(&user) != name.user_tag {
        return refuse(StatusCode::FORBIDDEN, "the token is for another user");
    }
    if frames.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let Some(session_gateway) = name.gateway() else {
        return refuse(StatusCode::NOT_FOUND, "no such session");
    };
    if session_gateway == gateway.id {
        let Some(conn) = gateway.hub.connection(name.client_id) else {
            return refuse(StatusCode::NOT_FOUND, "no such session");
        };
        if !conn.push_posted(name.secret.to_owned(), user, frames) {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many posted frames waiting; wait for their replies",
            );
        }
        return StatusCode::ACCEPTED.into_response();
    }
    let control = Control::Post {
        client_id: name.client_id.to_owned(),
        secret: name.secret.to_owned(),
        user,
        frames,
    };
    let channel = envelope::gateway_channel(session_gateway);
    match gateway
        .publisher
        .publish(&channel, envelope::encode_control(&control))
        .await
    {
        // Nobody listens on that gateway's channel: it is gone, and its sessions with it.
        Ok(Some(0)) => refuse(StatusCode::NOT_FOUND, "no such session"),
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(error) => {
            tracing::warn!(%error, "posted frames not forwarded");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable; retry")
        }
    }
}

/// The frames of a body: one JSON object, or an array of JSON objects. `None` otherwise.
fn frames_of(body: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(body).ok()?;
    let is_object = |raw: &RawValue| raw.get().starts_with('{');
    match text.trim_start().as_bytes().first()? {
        b'{' => {
            let frame: &RawValue = serde_json::from_str(text).ok()?;
            Some(vec![frame.get().to_owned()])
        }
        b'[' => {
            let frames: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            frames
                .iter()
                .all(|f| is_object(f))
                .then(|| frames.iter().map(|f| f.get().to_owned()).collect())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_parse_back() {
        let name = format!("gw.a-b-12~{}~{:032x}", user_tag("alice"), 7u128);
        let parsed = Name::parse(&name).unwrap();
        assert_eq!(parsed.client_id, "gw.a-b-12");
        assert_eq!(parsed.gateway(), Some("gw.a-b"));
        assert_eq!(parsed.user_tag, user_tag("alice"));
        assert_ne!(user_tag("alice"), user_tag("bob"));
        for bad in [
            "",
            "x",
            "a~b",
            "a~b~short",
            "~t~0123456789abcdef0123456789abcdef",
        ] {
            assert!(Name::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn bodies_are_one_object_or_an_array_of_objects() {
        assert_eq!(
            frames_of(b"{\"type\":\"ping\"}").unwrap(),
            ["{\"type\":\"ping\"}"]
        );
        assert_eq!(
            frames_of(b" [{\"a\":1}, {\"b\":[2]}]").unwrap(),
            ["{\"a\":1}", "{\"b\":[2]}"]
        );
        assert!(frames_of(b"[]").unwrap().is_empty());
        for bad in [&b""[..], b"1", b"\"x\"", b"[1]", b"{", b"[{}", b"\xff"] {
            assert!(frames_of(bad).is_none(), "{bad:?}");
        }
    }
}
