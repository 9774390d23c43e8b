//! The WebSocket transport: an edge over the session. It finishes the upgrade, reads frames
//! with tungstenite over the socket's read half (the [`Source`] of the session), starts the
//! writer on the write half, and lingers for the client's close at the end.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use roomcast_common::close_code::CloseCode;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::session::{self, Authenticated, Inbound, Session, Source};
use crate::socket::{self, ReadSide};
use crate::state::Gateway;
use crate::writer::{self, Framing, WriterSettings};

/// Read buffer per connection, allocated for every connection: small, since most frames are
/// small and idle connections are the common case (tungstenite's default is 128 KiB; 4 KiB
/// cost 3.2 KB more RSS per idle connection than this, measured with `loadgen connections`).
/// Larger frames still arrive whole: the buffer grows to the frame's announced length.
const READ_BUFFER_BYTES: usize = 256;

/// Runs a connection from its upgrade to its end.
///
/// Most of a connection's memory is this future, held for as long as the connection is open:
/// what only the set-up needs lives in a boxed future freed before the first read, and the
/// arguments sit in one box (an async function's arguments would keep their space for its
/// whole run).
pub fn run(
    handoff: Handoff,
    gateway: Arc<Gateway>,
    auth: Authenticated,
) -> impl Future<Output = ()> + Send + 'static {
    let setup = Box::new((handoff, gateway, auth));
    async move {
        let Some((mut session, mut stream, writer)) = Box::pin(start(setup)).await else {
            return;
        };
        session.serve(&mut stream, writer).await;
        drop(session);
        Box::pin(linger(stream.0.into_inner())).await;
    }
}

/// How the socket reaches the connection.
pub enum Handoff {
    /// From hyper, once it has written the 101 (its response to the `/ws` route).
    Hyper(OnUpgrade),
    /// Straight from the accept loop ([`crate::handshake`]): the request head is read, the 101
    /// head not yet written; it goes out first, in one write with the `connected` frame.
    /// `pre_read`: what the client sent behind its request head.
    Direct {
        tcp: TcpStream,
        head: Bytes,
        pre_read: Vec<u8>,
    },
}

/// The session's input: tungstenite's frames.
pub struct Frames(WebSocketStream<ReadSide>);

impl Source for Frames {
    async fn next(&mut self) -> Inbound {
        match self.0.next().await {
            None => Inbound::Closed,
            Some(Err(error)) => Inbound::Failed(close_for(&error)),
            Some(Ok(Message::Text(text))) => Inbound::Text(text),
            Some(Ok(Message::Binary(_))) => Inbound::Binary,
            Some(Ok(Message::Close(_))) => {
                // tungstenite sends its close reply on a flush; it goes to the writer, which
                // sends it after the replies still owed.
                let _ = self.0.flush().await;
                Inbound::Closed
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Inbound::Alive,
        }
    }
}

/// Waits for the upgrade, opens the session and starts the writer.
async fn start(
    setup: Box<(Handoff, Arc<Gateway>, Authenticated)>,
) -> Option<(Session, Frames, tokio::task::JoinHandle<()>)> {
    let (handoff, gateway, auth) = *setup;
    let (socket, pre_read, head) = match handoff {
        Handoff::Hyper(on_upgrade) => match socket::upgraded(on_upgrade).await {
            // A copy of just these bytes: `pre_read` is a slice of the HTTP layer's 8 KiB read
            // buffer, which it would keep alive for the connection's lifetime.
            Ok((socket, pre_read)) => (socket, pre_read[..].to_vec(), None),
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                if auth.counted {
                    session::report_closed(&gateway, &auth.client_id, &auth.user, Vec::new());
                }
                return None;
            }
        },
        Handoff::Direct {
            tcp,
            head,
            pre_read,
        } => (socket::Upgraded::Tcp(tcp), pre_read, Some(head)),
    };
    let session = Session::open(gateway.clone(), auth, None, head).await;
    let conn = session.conn().clone();
    let (read, write) = socket.into_split(&conn);
    let max = gateway.settings.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_frame_size(Some(max))
        .max_message_size(Some(max));
    let stream = WebSocketStream::from_partially_read(
        ReadSide::new(read, conn.clone()),
        pre_read,
        Role::Server,
        Some(config),
    )
    .await;
    let writer = tokio::spawn(writer::run(
        write,
        conn,
        WriterSettings {
            limit: u32::try_from(gateway.settings.outbound_queue_len).unwrap_or(u32::MAX),
            delay: gateway.settings.write_delay(),
            framing: Framing::WebSocket,
            direct: true,
        },
    ));
    Some((session, Frames(stream), writer))
}

/// After the writer sent its last frame and shut its half: the client's pongs and close reply
/// are read until it closes too ([`socket::drain_input`]), so the last frames are not reset.
async fn linger(read: ReadSide) {
    socket::drain_input(&mut read.into_inner()).await;
}

/// The close frame owed for a read error, if the client is still there to get one.
fn close_for(error: &WsError) -> Option<(CloseCode, &'static str)> {
    match error {
        WsError::Capacity(_) => Some((CloseCode::TOO_BIG, "frame too large")),
        WsError::Utf8(_) => Some((CloseCode::INVALID_PAYLOAD, "text frame is not valid UTF-8")),
        // The client dropped the connection: nobody to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((CloseCode::PROTOCOL_ERROR, "protocol violation")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's two tasks are most of its memory. tokio 1.54 allocates a task as its
    /// future plus 104 bytes, rounded up to 128, and jemalloc rounds that up to its size
    /// class (1,280, 1,536, …): a future of 1,176 bytes takes 1,280, one of 1,184 to 1,432
    /// takes 1,536. These bounds keep each task in the smaller class (measured with
    /// `loadgen connections`: RSS per idle connection 4,082-4,090 B with a 1,296-byte future,
    /// 3,811-3,822 B with 1,096).
    #[test]
    fn connection_tasks_stay_in_their_size_class() {
        fn output_size<A, B, C, Fut, F: FnOnce(A, B, C) -> Fut>(_: F) -> usize {
            size_of::<Fut>()
        }
        let connection = output_size(run);
        let writer = output_size(writer::run::<socket::WriteHalf>);
        assert!(connection <= 1176, "connection future: {connection} bytes");
        assert!(writer <= 408, "writer future: {writer} bytes");
    }

    #[test]
    fn read_errors_map_to_close_codes() {
        use tokio_tungstenite::tungstenite::error::CapacityError;
        let too_big = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert_eq!(close_for(&too_big).unwrap().0, CloseCode::TOO_BIG);
        let utf8 = WsError::Utf8("invalid".into());
        assert_eq!(close_for(&utf8).unwrap().0, CloseCode::INVALID_PAYLOAD);
        let unmasked = WsError::Protocol(ProtocolError::UnmaskedFrameFromClient);
        assert_eq!(close_for(&unmasked).unwrap().0, CloseCode::PROTOCOL_ERROR);
        let reset = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert!(close_for(&reset).is_none(), "nobody left to tell");
        assert!(close_for(&WsError::ConnectionClosed).is_none());
    }
}
