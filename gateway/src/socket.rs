//! The WebSocket below the protocol: the upgrade (done here rather than by a framework, so the
//! connection keeps its bare TCP socket), server-to-client frame encoding, and the read side
//! that tungstenite parses.
//!
//! Why the bare socket: a broadcast's WebSocket frame is the same bytes for every recipient
//! (server frames are not masked), so the hub encodes it once and each writer hands the shared
//! bytes straight to the kernel. Only the read direction goes through tungstenite; the few
//! bytes tungstenite itself wants to send (pong and close replies) are queued to the writer
//! like any other frame, so one task alone writes to the socket.
//!
//! With `GATEWAY_TLS_*` the socket is a TLS stream instead ([`Upgraded::Tls`]); its halves are
//! enums over the two, so a plain connection pays one branch per read or write and nothing
//! else.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, header};
use bytes::{BufMut, Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use roomcast_common::close_code::CloseCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::outbound::ConnHandle;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the upgrade did not complete: {0}")]
    Upgrade(#[from] hyper::Error),
    #[error("the upgraded connection is neither a TCP nor a TLS stream")]
    NotTcp,
}

/// Why a request is not a WebSocket handshake this server accepts (RFC 6455 section 4.2.1).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    #[error("unsupported WebSocket version (13 is)")]
    Version,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
}

/// Checks a handshake request's headers; returns the `Sec-WebSocket-Accept` value to answer.
pub fn accept_key(headers: &HeaderMap) -> Result<String, HandshakeError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(HandshakeError::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::MissingKey)?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// A TLS connection accepted by the gateway (`GATEWAY_TLS_*`).
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The socket of an upgraded connection.
pub enum Upgraded {
    Tcp(TcpStream),
    /// Boxed: the TLS state is over a kilobyte.
    Tls(Box<TlsStream>),
}

impl Upgraded {
    /// The read and write halves, owned by the reader and the writer. A TCP write half goes
    /// to `conn`, so that the fan-out can write to it too (see [`crate::outbound`]).
    pub fn into_split(self, conn: &Arc<ConnHandle>) -> (ReadHalf, WriteHalf) {
        match self {
            Upgraded::Tcp(tcp) => {
                let (read, write) = tcp.into_split();
                conn.attach_tcp(write);
                (ReadHalf::Tcp(read), WriteHalf::Tcp(conn.clone()))
            }
            Upgraded::Tls(tls) => {
                let (read, write) = tokio::io::split(*tls);
                (ReadHalf::Tls(read), WriteHalf::Tls(write))
            }
        }
    }
}

/// Waits for the HTTP connection to hand over its socket after the 101 response. Returns the
/// socket and whatever had already been read past the request (the client's first frames, if
/// it did not wait for the 101).
pub async fn upgraded(on_upgrade: OnUpgrade) -> Result<(Upgraded, Bytes), UpgradeError> {
    let upgraded = on_upgrade.await?;
    match upgraded.downcast::<TokioIo<Rewind>>() {
        Ok(parts) => {
            let (tcp, unread) = parts.io.into_inner().into_parts();
            // What hyper read and did not parse comes first, then what it never read.
            let rest = if unread.is_empty() {
                parts.read_buf
            } else {
                let mut rest = BytesMut::from(&parts.read_buf[..]);
                rest.extend_from_slice(&unread);
                rest.freeze()
            };
            Ok((Upgraded::Tcp(tcp), rest))
        }
        Err(upgraded) => {
            let parts = upgraded
                .downcast::<TokioIo<TlsStream>>()
                .map_err(|_| UpgradeError::NotTcp)?;
            Ok((
                Upgraded::Tls(Box::new(parts.io.into_inner())),
                parts.read_buf,
            ))
        }
    }
}

/// A plain connection handed to hyper with the bytes already read from it (by
/// [`crate::handshake`], to see whether it could answer without hyper): reads return those
/// first, then the socket's.
pub struct Rewind {
    unread: Bytes,
    tcp: TcpStream,
}

impl Rewind {
    pub fn new(tcp: TcpStream, read: Bytes) -> Self {
        Rewind { unread: read, tcp }
    }

    /// The socket, and what of the bytes read before was not read again.
    pub fn into_parts(self) -> (TcpStream, Bytes) {
        (self.tcp, self.unread)
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The socket's read half.
pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(read) => Pin::new(read).poll_read(cx, buf),
            ReadHalf::Tls(read) => Pin::new(read).poll_read(cx, buf),
        }
    }
}

/// The socket's write half.
pub enum WriteHalf {
    /// The connection whose handle holds the TCP write half.
    Tcp(Arc<ConnHandle>),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl WriteHalf {
    /// Whether written bytes may wait in a buffer until a flush (TLS records do; a TCP write
    /// goes straight to the kernel).
    pub fn buffers(&self) -> bool {
        matches!(self, WriteHalf::Tls(_))
    }

    /// Whether the fan-out may write broadcasts to it itself.
    pub fn direct(&self) -> bool {
        matches!(self, WriteHalf::Tcp(_))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        // The writer is done: the handle, which the hub may keep a while, lets the socket go.
        if let WriteHalf::Tcp(conn) = self {
            conn.release_tcp();
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(conn) => conn.poll_tcp(|half| half.poll_write(cx, buf)),
            WriteHalf::Tls(write) => Pin::new(write).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(conn) => conn.poll_tcp(|half| half.poll_flush(cx)),
            WriteHalf::Tls(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(conn) => conn.poll_tcp(|half| half.poll_shutdown(cx)),
            WriteHalf::Tls(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}

/// A server-to-client frame (FIN set, not masked) of `opcode` around `payload`.
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// A text frame: what every protocol frame travels in.
pub fn text(payload: &[u8]) -> Bytes {
    frame(0x1, payload)
}

/// An empty ping.
pub fn ping() -> Bytes {
    Bytes::from_static(crate::ping::FRAME)
}

/// A close frame with `code` and `reason` (cut to fit a control frame's 125 bytes).
pub fn close(code: CloseCode, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.get().to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(0x8, &payload)
}

/// The socket's read half as tungstenite sees it. What tungstenite writes (pongs, the reply
/// to a client's close) goes to the connection's writer instead of the socket.
pub struct ReadSide {
    read: ReadHalf,
    conn: Arc<ConnHandle>,
}

impl ReadSide {
    pub fn new(read: ReadHalf, conn: Arc<ConnHandle>) -> Self {
        Self { read, conn }
    }

    pub fn into_inner(self) -> ReadHalf {
        self.read
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.send_raw(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads and discards what the client still sends until it closes too, for at most a second,
/// once the server has said its last word (a close frame, a refusal) and shut its side. Closing
/// a socket with unread input makes the kernel send a reset, which can overtake that last word.
pub async fn drain_input(read: &mut (impl AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 512];
    let drained = async {
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drained).await;
}

/// The payload of a frame made by this module (an SSE connection re-frames broadcasts).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    match frame[1] {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    /// Reads give the bytes read before first, then the socket's; what was not read again is
    /// given back with the socket.
    #[tokio::test]
    async fn rewind_replays_what_was_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client.write_all(b" world").await.unwrap();
        let mut rewind = Rewind::new(tcp, Bytes::from_static(b"hello"));
        let mut got = [0u8; 3];
        rewind.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hel");
        let (mut tcp, unread) = rewind.into_parts();
        assert_eq!(&unread[..], b"lo");
        let mut rest = [0u8; 6];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        let mut rewind = Rewind::new(tcp, Bytes::from_static(b"ab"));
        client.write_all(b"cd").await.unwrap();
        let mut all = [0u8; 4];
        rewind.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"abcd");
    }

    fn parse(bytes: &[u8]) -> (FrameHeader, usize, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        let start = cursor.position() as usize;
        (header, len as usize, bytes[start..].to_vec())
    }

    #[test]
    fn frames_of_every_length_class_parse_back() {
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 100_000] {
            let payload = vec![b'x'; len];
            let bytes = text(&payload);
            let (header, n, rest) = parse(&bytes);
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert_eq!(n, len);
            assert_eq!(rest, payload);
            assert_eq!(payload_of(&bytes), &payload[..]);
        }
    }

    #[test]
    fn close_frames_fit_a_control_frame() {
        let long = "é".repeat(200);
        let bytes = close(CloseCode::SLOW_CONSUMER, &long);
        let (_, n, rest) = parse(&bytes);
        assert!(n <= 125);
        assert_eq!(u16::from_be_bytes([rest[0], rest[1]]), 4008);
        assert!(std::str::from_utf8(&rest[2..]).is_ok());
    }

    #[test]
    fn handshake_headers_are_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(accept_key(&headers), Err(HandshakeError::NotUpgrade));
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(accept_key(&headers), Err(HandshakeError::Version));
        headers.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        assert_eq!(accept_key(&headers), Err(HandshakeError::MissingKey));
        // The example of RFC 6455, section 1.3.
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        assert_eq!(
            accept_key(&headers).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
