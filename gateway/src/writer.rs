//! The connection's writer: the only task that writes to its transport. It takes what the
//! queue holds, holds a room's messages while the connection's join of that room is in flight
//! (the [`RoomStream`](crate::room_stream::RoomStream) decided everything else about order),
//! frames it for the transport and writes it in one system call.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use roomcast_common::close_code::CloseCode;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::outbound::{ConnHandle, Local, Outbound};
use crate::socket;

/// Frames written per write call at most, so one busy connection cannot hog its task.
const MAX_BATCH: usize = 64;

/// Where a writer writes: the socket's write half, or an SSE response body.
pub trait Egress: AsyncWrite + Unpin + Send + 'static {
    /// Whether written bytes may wait in a buffer until a flush (TLS records do; a TCP write
    /// goes straight to the kernel).
    fn buffers(&self) -> bool {
        false
    }

    /// Whether the fan-out may write broadcasts to it while the writer is idle (a plain TCP
    /// socket: a write either takes bytes or says it would block).
    fn direct(&self) -> bool {
        false
    }
}

impl Egress for socket::WriteHalf {
    fn buffers(&self) -> bool {
        socket::WriteHalf::buffers(self)
    }

    fn direct(&self) -> bool {
        socket::WriteHalf::direct(self)
    }
}

/// How server frames are carried. The hub encodes a broadcast once, as a WebSocket frame (the
/// common case costs nothing more); an SSE connection re-frames it for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    WebSocket,
    /// `text/event-stream`: one `data:` event per frame, `: ping` comments, and a final
    /// `disconnect` event instead of a close frame.
    Sse,
}

impl Framing {
    /// A protocol frame (JSON text).
    fn text(self, json: &[u8]) -> Bytes {
        match self {
            Framing::WebSocket => socket::text(json),
            Framing::Sse => sse_event(json),
        }
    }

    /// A frame already encoded as a WebSocket text frame (a broadcast).
    fn wire(self, frame: &Bytes) -> Bytes {
        match self {
            Framing::WebSocket => frame.clone(),
            Framing::Sse => sse_event(socket::payload_of(frame)),
        }
    }

    /// Bytes queued as a ready WebSocket frame: tungstenite's pongs and close replies, and the
    /// session's pings. Over SSE only the pings mean something.
    fn raw(self, frame: Bytes) -> Option<Bytes> {
        match self {
            Framing::WebSocket => Some(frame),
            Framing::Sse if frame.first() == Some(&0x89) => Some(Bytes::from_static(b": ping\n\n")),
            Framing::Sse => None,
        }
    }

    /// The connection's last frame.
    pub fn close(self, code: CloseCode, reason: &str) -> Bytes {
        match self {
            Framing::WebSocket => socket::close(code, reason),
            Framing::Sse => {
                let event = serde_json::json!({
                    "type": "disconnect",
                    "code": code.get(),
                    "reason": reason,
                });
                sse_event(event.to_string().as_bytes())
            }
        }
    }
}

/// One SSE event carrying `json`. A frame's JSON is one line except where a client's own `data`
/// kept line breaks; each line then gets its own `data:` field, which the client's parser joins
/// back with `\n`.
pub fn sse_event(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    let mut rest = json;
    while let Some(at) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"\ndata: ");
        let skip = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[at + skip..];
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// The rooms whose join is in flight, with what arrived for them meanwhile. A connection
/// joins few rooms at a time, so a vector searched by the shared room name (pointer first:
/// deliveries carry the hub's `Arc` of the name) beats hashing the name.
#[derive(Default)]
struct JoinHolds {
    rooms: Vec<(Arc<str>, Vec<Outbound>)>,
}

impl JoinHolds {
    fn position(&self, room: &Arc<str>) -> Option<usize> {
        self.rooms
            .iter()
            .position(|(name, _)| Arc::ptr_eq(name, room) || name == room)
    }

    fn take(&mut self, room: &Arc<str>) -> Option<Vec<Outbound>> {
        let index = self.position(room)?;
        Some(self.rooms.swap_remove(index).1)
    }

    /// Holds `item` when its room's join is in flight; returns it otherwise. `Err` when the
    /// hold grew past `limit`: the client is too slow. No join in flight (the usual case)
    /// costs one check.
    fn hold(&mut self, item: Outbound, limit: usize) -> Result<Option<Outbound>, ()> {
        if self.rooms.is_empty() {
            return Ok(Some(item));
        }
        let room = match &item {
            Outbound::Message(delivery) => &delivery.room,
            Outbound::Event(event) => &event.room,
            Outbound::Local(_) => return Ok(Some(item)),
        };
        let Some(index) = self.position(room) else {
            return Ok(Some(item));
        };
        let held = &mut self.rooms[index].1;
        held.push(item);
        if held.len() > limit {
            Err(())
        } else {
            Ok(None)
        }
    }

    /// Turns one queue item into frames to write (in `out`). Returns false when a hold grew
    /// past `limit`.
    fn apply(
        &mut self,
        item: Outbound,
        out: &mut Vec<Bytes>,
        limit: usize,
        framing: Framing,
    ) -> bool {
        let item = match self.hold(item, limit) {
            Ok(Some(item)) => item,
            Ok(None) => return true,
            Err(()) => return false,
        };
        match item {
            Outbound::Message(delivery) => out.push(framing.wire(&delivery.wire)),
            Outbound::Event(event) => out.push(framing.wire(&event.wire)),
            Outbound::Local(local) => match *local {
                Local::Frame(frame) => out.push(framing.text(frame.as_bytes())),
                Local::Raw(bytes) => out.extend(framing.raw(bytes)),
                Local::JoinStart { room } => self.rooms.push((room, Vec::new())),
                Local::JoinDone {
                    room,
                    epoch,
                    offset,
                    reply,
                } => {
                    out.push(framing.text(reply.as_bytes()));
                    // What the join reply covered (in its `missed` or before its offset) is
                    // dropped; the room stream filters the member's later messages itself.
                    for held in self.take(&room).unwrap_or_default() {
                        if let Outbound::Message(delivery) = &held
                            && *delivery.epoch == *epoch
                            && delivery.offset <= offset
                        {
                            continue;
                        }
                        self.apply(held, out, limit, framing);
                    }
                }
                Local::JoinFailed { room, reply } => {
                    self.take(&room);
                    out.push(framing.text(reply.as_bytes()));
                }
                Local::Left { reply, .. } => out.push(framing.text(reply.as_bytes())),
                Local::Rest(rest) => out.push(rest),
            },
        }
        true
    }
}

/// `frames` (whole WebSocket frames) as one buffer, so they go out in one system call: a lone
/// frame is its shared bytes as they are, several are copied together.
fn concat(frames: &mut Vec<Bytes>) -> Bytes {
    if frames.len() == 1 {
        return frames.pop().unwrap_or_default();
    }
    let mut buffer = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
    for frame in frames.drain(..) {
        buffer.extend_from_slice(&frame);
    }
    buffer.into()
}

/// The connection's only writer to its transport. Pings come from the session (it owns the
/// connection's one timer) through the queue, like every other frame, unless a write carried
/// them first ([`crate::ping`]).
pub async fn run<E: Egress>(mut socket: E, conn: Arc<ConnHandle>, settings: WriterSettings) {
    let mut batch = Vec::new();
    // What the socket has not taken yet. Kept across a close, so the close frame never lands
    // in the middle of a half-written frame.
    let mut pending = Bytes::new();
    let served = serve(&mut socket, &conn, &settings, &mut batch, &mut pending);
    if served.await == Ended::Gone {
        conn.shut();
        return;
    }
    // Closing. Every reply owed goes out before the close frame: wait for the reader to finish
    // the command it may be running (a publish being stored, say), so its reply is queued,
    // then send the replies still queued. Bounded, in case a backend hangs.
    let reader_done = std::future::poll_fn(|cx| conn.poll_reader_finished(cx));
    let _ = tokio::time::timeout(OWED_REPLY_WAIT, reader_done).await;
    conn.take_batch(&mut batch, usize::MAX);
    let (owed, close_reply) = owed_replies(batch.drain(..), settings.framing);
    let last = match conn.close_reason() {
        Some((code, reason)) => settings.framing.close(code, &reason),
        // Closed by the client or the socket: tungstenite's reply to a close, if any.
        None => close_reply.unwrap_or_default(),
    };
    // Boxed: only a closing connection needs this future's space.
    let finish = Box::pin(async move {
        socket.write_all(&pending).await?;
        for reply in &owed {
            socket.write_all(reply).await?;
        }
        socket.write_all(&last).await?;
        // Flushes (TLS: and sends close_notify), then ends the sending direction.
        socket.shutdown().await
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), finish).await;
}

/// How a connection's writer bounds, paces and frames its output.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Most messages held while a join is in flight (`OUTBOUND_QUEUE_LEN`). 32 bits: this
    /// struct lives in every connection's writer.
    pub limit: u32,
    /// How long broadcasts wait for more before a write (`WRITE_DELAY_MS`).
    pub delay: Duration,
    pub framing: Framing,
    /// Whether the fan-out may write broadcasts itself while this writer is idle (a plain
    /// WebSocket; see [`crate::outbound`]).
    pub direct: bool,
}

/// How serving a connection's queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The connection is closing: the replies owed and the close go out next.
    Closing,
    /// The transport failed: nothing more can be sent.
    Gone,
}

/// Writes what the queue gets until the connection closes or its transport fails.
async fn serve<E: Egress>(
    socket: &mut E,
    conn: &ConnHandle,
    settings: &WriterSettings,
    batch: &mut Vec<Outbound>,
    pending: &mut Bytes,
) -> Ended {
    let mut holds = JoinHolds::default();
    let mut out = Vec::new();
    // Broadcasts may skip the queue only when nothing here would treat them differently: no
    // write delay to wait out, WebSocket frames as they are.
    let direct = settings.direct
        && socket.direct()
        && settings.delay.is_zero()
        && settings.framing == Framing::WebSocket;
    // Whether the broadcasts now queued were already held for the write delay.
    let mut held = false;
    loop {
        // With a write delay, broadcasts wait for the ones that follow, whether they arrived
        // while the writer was idle or while it was writing; the connection's own traffic (a
        // reply) ends the wait.
        if !settings.delay.is_zero() && !held && conn.holds_only_broadcasts() {
            if Box::pin(hold_broadcasts(conn, settings.delay)).await {
                return Ended::Closing;
            }
            held = true;
            continue;
        }
        // Whatever is queued goes out in one write, MAX_BATCH items at a time.
        held = false;
        if conn.take_batch(batch, MAX_BATCH) == 0 {
            if conn.is_closed() {
                return Ended::Closing;
            }
            if direct && holds.rooms.is_empty() {
                conn.writer_idle();
            }
            std::future::poll_fn(|cx| conn.poll_writer_woken(cx)).await;
            continue;
        }
        if conn.is_closed() {
            return Ended::Closing;
        }
        let mut ok = true;
        for item in batch.drain(..) {
            ok &= holds.apply(item, &mut out, settings.limit as usize, settings.framing);
        }
        if !ok {
            conn.close(
                CloseCode::SLOW_CONSUMER,
                "slow consumer: outbound queue overflowed",
            );
            // This batch may hold replies: it goes out before the close frame, like the rest.
            *pending = concat(&mut out);
            return Ended::Closing;
        }
        if out.is_empty() {
            continue;
        }
        // Every frame in `out` ends whole: a due ping goes after them, in the same write.
        if settings.framing == Framing::WebSocket && conn.pings.take() {
            out.push(socket::ping());
        }
        *pending = concat(&mut out);
        if let Err(ended) = write_out(socket, pending, conn).await {
            return ended;
        }
    }
}

/// Holds the queued broadcasts for `delay`, or until the connection's own traffic arrives.
/// Returns whether the connection closed meanwhile.
async fn hold_broadcasts(conn: &ConnHandle, delay: Duration) -> bool {
    let mut hold = std::pin::pin!(tokio::time::sleep(delay));
    loop {
        tokio::select! {
            biased;
            () = std::future::poll_fn(|cx| conn.poll_writer_closed(cx)) => return true,
            () = &mut hold => return false,
            () = std::future::poll_fn(|cx| conn.poll_writer_woken(cx)) => {
                if !conn.holds_only_broadcasts() {
                    return false;
                }
            }
        }
    }
}

/// Writes `pending` whole (and flushes it, when the transport buffers). On a close it stops
/// with `pending` holding exactly what is left.
async fn write_out<E: Egress>(
    socket: &mut E,
    pending: &mut Bytes,
    conn: &ConnHandle,
) -> Result<(), Ended> {
    let closed = || std::future::poll_fn(|cx| conn.poll_writer_closed(cx));
    while !pending.is_empty() {
        // Biased: a write that completes at once (the usual case) never looks at closing.
        // `write` is cancel-safe.
        let written = tokio::select! {
            biased;
            written = socket.write(pending) => written,
            () = closed() => return Err(Ended::Closing),
        };
        match written {
            Ok(n) if n > 0 => pending.advance(n),
            _ => return Err(Ended::Gone),
        }
    }
    if socket.buffers() {
        // TLS: what the stream took may still sit in its record buffer.
        let flushed = tokio::select! {
            biased;
            flushed = socket.flush() => flushed,
            () = closed() => return Err(Ended::Closing),
        };
        if flushed.is_err() {
            return Err(Ended::Gone);
        }
    }
    Ok(())
}

/// How long a closing connection waits for the reply to the command in flight.
const OWED_REPLY_WAIT: Duration = Duration::from_secs(5);

/// What a closing connection still sends of its queue: the replies to the client's commands,
/// in order (broadcasts are dropped: a client recovers them with `since`), and tungstenite's
/// reply to a client's close frame, if one is queued.
fn owed_replies(
    items: impl Iterator<Item = Outbound>,
    framing: Framing,
) -> (Vec<Bytes>, Option<Bytes>) {
    let mut owed = Vec::new();
    let mut close_reply = None;
    for item in items {
        let Outbound::Local(local) = item else {
            continue;
        };
        match *local {
            Local::Frame(frame) => owed.push(framing.text(frame.as_bytes())),
            Local::JoinDone { reply, .. }
            | Local::JoinFailed { reply, .. }
            | Local::Left { reply, .. } => owed.push(framing.text(reply.as_bytes())),
            // Pings and pongs are moot now; a close frame (opcode 8) is the client's answer.
            Local::Rest(rest) => owed.push(rest),
            Local::Raw(bytes) if bytes.first() == Some(&0x88) => close_reply = Some(bytes),
            Local::Raw(_) | Local::JoinStart { .. } => {}
        }
    }
    (owed, close_reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Delivery;

    fn message(room: &Arc<str>, offset: u64) -> Outbound {
        Outbound::Message(Arc::new(Delivery {
            room: room.clone(),
            epoch: Arc::from("e"),
            offset,
            wire: socket::text(offset.to_string().as_bytes()),
            direct: true,
        }))
    }

    fn texts(out: &[Bytes]) -> Vec<&str> {
        out.iter()
            .map(|f| std::str::from_utf8(socket::payload_of(f)).unwrap())
            .collect()
    }

    fn join_done(room: &Arc<str>, offset: u64) -> Outbound {
        Outbound::local(Local::JoinDone {
            room: room.clone(),
            epoch: Arc::from("e"),
            offset,
            reply: "joined".into(),
        })
    }

    /// The fan-out's direct writes go around tokio; when one fills the socket, the writer
    /// must still see that it cannot write and wait for the socket, then send the rest.
    #[tokio::test]
    async fn the_writer_finishes_what_a_direct_write_left_on_a_full_socket() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let conn = Arc::new(ConnHandle::new(Arc::from("c"), Arc::from("u"), 64));
        conn.attach_tcp(write);
        let settings = WriterSettings {
            limit: 64,
            delay: Duration::ZERO,
            framing: Framing::WebSocket,
            direct: true,
        };
        let writer = tokio::spawn(run(
            socket::WriteHalf::Tcp(conn.clone()),
            conn.clone(),
            settings,
        ));
        // Wait until the writer lets the fan-out write: a small frame then skips the queue.
        let room: Arc<str> = Arc::from("r");
        let mut expected = Vec::new();
        for offset in 1.. {
            let Outbound::Message(small) = message(&room, offset) else {
                unreachable!()
            };
            expected.extend_from_slice(&small.wire);
            conn.deliver_message(&small);
            if conn.try_recv().is_none() {
                break;
            }
            // Queued: the writer sends it; take it back out and try again.
            expected.truncate(expected.len() - small.wire.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(offset < 200, "the writer never became idle");
        }
        // Far more than the socket takes while nobody reads: a partial direct write, the
        // rest queued for the writer, and more frames behind it.
        let big = Arc::new(Delivery {
            room: room.clone(),
            epoch: Arc::from("e"),
            offset: 1000,
            wire: Bytes::from(vec![b'x'; 32 << 20]),
            direct: true,
        });
        conn.deliver_message(&big);
        expected.extend_from_slice(&big.wire);
        for offset in 1001..1004 {
            let Outbound::Message(small) = message(&room, offset) else {
                unreachable!()
            };
            conn.deliver_message(&small);
            expected.extend_from_slice(&small.wire);
        }
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut got))
            .await
            .expect("the writer sent the rest")
            .unwrap();
        assert!(got == expected, "every byte, in order");
        conn.close(CloseCode::NORMAL, "done");
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }

    #[tokio::test]
    async fn a_due_ping_goes_after_the_frames_of_a_write() {
        use tokio::io::AsyncReadExt;
        let (egress, mut client) = tokio::io::duplex(1 << 16);
        let conn = Arc::new(ConnHandle::new(Arc::from("c"), Arc::from("u"), 16));
        let settings = WriterSettings {
            limit: 16,
            delay: Duration::ZERO,
            framing: Framing::WebSocket,
            direct: false,
        };
        let writer = tokio::spawn(run(egress, conn.clone(), settings));
        let room: Arc<str> = Arc::from("r");
        let mut got = vec![0u8; 64];
        // Not due: the frame alone.
        conn.pings
            .open(tokio::time::Instant::now() + Duration::from_secs(60));
        conn.deliver(message(&room, 1));
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], &socket::text(b"1")[..]);
        // Due: behind the frames of the next write, once.
        conn.pings.open(tokio::time::Instant::now());
        conn.deliver(message(&room, 2));
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(
            &got[..n],
            &[&socket::text(b"2")[..], crate::ping::FRAME].concat()[..]
        );
        conn.deliver(message(&room, 3));
        let n = client.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], &socket::text(b"3")[..]);
        conn.reader_finished();
        conn.shut();
        writer.await.unwrap();
    }

    #[test]
    fn a_join_holds_its_room_and_drops_what_the_reply_covered() {
        let room: Arc<str> = Arc::from("r");
        let other: Arc<str> = Arc::from("o");
        let mut holds = JoinHolds::default();
        let mut out = Vec::new();
        let ws = Framing::WebSocket;
        holds.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            10,
            ws,
        );
        for offset in [4, 5, 6] {
            holds.apply(message(&room, offset), &mut out, 10, ws);
        }
        holds.apply(message(&other, 1), &mut out, 10, ws);
        assert_eq!(texts(&out), ["1"], "only the joining room is held");
        out.clear();
        holds.apply(join_done(&room, 5), &mut out, 10, ws);
        assert_eq!(texts(&out), ["joined", "6"]);
        out.clear();
        holds.apply(message(&room, 7), &mut out, 10, ws);
        assert_eq!(texts(&out), ["7"], "after the join, straight through");
    }

    #[test]
    fn a_failed_join_drops_what_was_held() {
        let room: Arc<str> = Arc::from("r");
        let mut holds = JoinHolds::default();
        let mut out = Vec::new();
        let ws = Framing::WebSocket;
        holds.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            10,
            ws,
        );
        holds.apply(message(&room, 1), &mut out, 10, ws);
        holds.apply(
            Outbound::local(Local::JoinFailed {
                room: room.clone(),
                reply: "error".into(),
            }),
            &mut out,
            10,
            ws,
        );
        assert_eq!(texts(&out), ["error"]);
        assert!(holds.rooms.is_empty());
    }

    #[test]
    fn a_closing_connection_sends_replies_in_order_and_no_broadcasts() {
        let room: Arc<str> = Arc::from("r");
        let items = vec![
            Outbound::frame("a"),
            message(&room, 1),
            Outbound::local(Local::Raw(socket::ping())),
            Outbound::local(Local::JoinStart { room: room.clone() }),
            join_done(&room, 1),
            Outbound::local(Local::Raw(socket::close(CloseCode::NORMAL, ""))),
            Outbound::frame("b"),
        ];
        let (owed, close_reply) = owed_replies(items.into_iter(), Framing::WebSocket);
        assert_eq!(texts(&owed), ["a", "joined", "b"]);
        assert_eq!(close_reply.unwrap(), socket::close(CloseCode::NORMAL, ""));
    }

    #[test]
    fn a_hold_is_bounded() {
        let room: Arc<str> = Arc::from("r");
        let mut holds = JoinHolds::default();
        let mut out = Vec::new();
        let ws = Framing::WebSocket;
        holds.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            2,
            ws,
        );
        assert!(holds.apply(message(&room, 1), &mut out, 2, ws));
        assert!(holds.apply(message(&room, 2), &mut out, 2, ws));
        assert!(!holds.apply(message(&room, 3), &mut out, 2, ws));
    }

    #[test]
    fn sse_framing_carries_every_frame_as_one_event() {
        let sse = Framing::Sse;
        let room: Arc<str> = Arc::from("r");
        let mut holds = JoinHolds::default();
        let mut out = Vec::new();
        holds.apply(Outbound::frame("{\"a\":1}"), &mut out, 10, sse);
        holds.apply(message(&room, 7), &mut out, 10, sse);
        holds.apply(
            Outbound::local(Local::Raw(socket::ping())),
            &mut out,
            10,
            sse,
        );
        // tungstenite's pongs have no meaning over SSE.
        holds.apply(
            Outbound::local(Local::Raw(Bytes::from_static(&[0x8a, 0]))),
            &mut out,
            10,
            sse,
        );
        let text: Vec<&[u8]> = out.iter().map(|b| &b[..]).collect();
        assert_eq!(
            text,
            [&b"data: {\"a\":1}\n\n"[..], b"data: 7\n\n", b": ping\n\n"]
        );
        let close = sse.close(CloseCode::GOING_AWAY, "draining");
        assert_eq!(
            &close[..],
            b"data: {\"code\":1001,\"reason\":\"draining\",\"type\":\"disconnect\"}\n\n"
        );
    }

    #[test]
    fn sse_events_keep_line_breaks_of_a_clients_data() {
        let event = sse_event(b"{\"data\":{\"a\":\n1,\r\n\"b\":\r2}}");
        assert_eq!(
            &event[..],
            b"data: {\"data\":{\"a\":\ndata: 1,\ndata: \"b\":\ndata: 2}}\n\n"
        );
    }
}
