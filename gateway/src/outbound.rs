//! A connection's outbound queue and what goes in it: the shared face of a connection
//! ([`ConnHandle`]) that the hub, the control channel and the connection's own tasks reach it
//! through, and the items its writer sends.
//!
//! Delivery never blocks: a full queue means a slow consumer, which is closed with 4008.
//!
//! A broadcast that finds a plain-TCP WebSocket connection's writer idle (nothing queued,
//! nothing half-written, no join in flight, no write delay) is written to the socket from the
//! fan-out at once, with one non-blocking write: no queue item, no wake-up of the writer task,
//! which was most of the gateway's own CPU per delivery. Whatever the socket does not take goes
//! through the queue as before, and the writer is in charge again until it is idle. The
//! connection's own task writes its pings and a returned publish batch's replies the same way.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use roomcast_common::close_code::CloseCode;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::ping::{self, PingSlot};

/// A room message as queued for its recipients: built once per broadcast and shared, so a
/// delivery costs one reference-count increment.
#[derive(Debug)]
pub struct Delivery {
    pub room: Arc<str>,
    /// The room's epoch: offsets restart at 1 when it changes.
    pub epoch: Arc<str>,
    pub offset: u64,
    /// The whole WebSocket frame, header included: the same bytes go to every recipient.
    pub wire: Bytes,
    /// Whether the fan-out may write it to idle sockets itself: not for gap fills, which the
    /// writers coalesce.
    pub direct: bool,
}

/// A presence event of a room, shared like a [`Delivery`].
#[derive(Debug)]
pub struct RoomEvent {
    pub room: Arc<str>,
    /// The whole WebSocket frame.
    pub wire: Bytes,
    /// As [`Delivery::direct`].
    pub direct: bool,
}

/// What a connection's writer task receives. Two words: every connection's queue allocates
/// its slots up front, so this size is per-connection memory.
#[derive(Debug)]
pub enum Outbound {
    /// A room message; the writer keeps each room's offsets increasing and drops duplicates.
    Message(Arc<Delivery>),
    /// A presence event; like a message, held back until the room's join completes.
    Event(Arc<RoomEvent>),
    /// The connection's own traffic: replies and join bookkeeping.
    Local(Box<Local>),
}

#[derive(Debug)]
pub enum Local {
    /// A protocol frame to send (replies, the `connected` frame).
    Frame(Utf8Bytes),
    /// Bytes that are already a WebSocket frame (tungstenite's pongs and close replies).
    Raw(Bytes),
    /// A join began: hold the room's messages until [`Local::JoinDone`].
    JoinStart { room: Arc<str> },
    /// The join reply; messages up to `offset` are already known to the client (or in `missed`).
    JoinDone {
        room: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        reply: Utf8Bytes,
    },
    /// The join failed: forget the room and send the error.
    JoinFailed { room: Arc<str>, reply: Utf8Bytes },
    /// Left the room: forget it and send the reply.
    Left { room: Arc<str>, reply: Utf8Bytes },
    /// The rest of a broadcast the fan-out wrote in part: it goes out before anything else,
    /// even when closing, so the close frame never lands inside a frame.
    Rest(Bytes),
}

impl Outbound {
    pub fn frame(frame: impl Into<Utf8Bytes>) -> Self {
        Outbound::Local(Box::new(Local::Frame(frame.into())))
    }

    pub fn local(local: Local) -> Self {
        Outbound::Local(Box::new(local))
    }
}

/// The shared face of one connection: what the hub and the control channel need to reach it,
/// and its outbound queue.
///
/// The queue is a plain deque behind a mutex with a wake-up for the writer, rather than a
/// channel: it allocates nothing while empty (a bounded tokio channel costs about 1 KB per
/// connection up front), and a delivery is one short lock. The writer is woken through an
/// [`AtomicWaker`], and only when the queue was empty: a burst to one connection costs one
/// wake-up, and a wake-up costs no lock.
pub struct ConnHandle {
    pub client_id: Arc<str>,
    pub user: Arc<str>,
    /// Frames waiting for the writer task.
    queue: Mutex<VecDeque<Outbound>>,
    /// How many of the queued items are the connection's own traffic (replies); changed
    /// only under the queue's lock. Broadcasts are limited by how many broadcasts are queued,
    /// so a burst of replies (a returned publish batch) cannot make a broadcast overflow.
    own_queued: AtomicU32,
    /// The writer task's waker, and whether it has been woken since it last looked.
    writer: AtomicWaker,
    writer_woken: AtomicBool,
    /// Broadcast items the queue may hold before the connection counts as a slow consumer.
    capacity: u32,
    /// Set once the connection is ending; both of its tasks watch it.
    closed: AtomicBool,
    /// Set when the reader handles no more commands: every reply it owes is queued.
    reader_done: AtomicBool,
    /// The reader task's waker, for a close from elsewhere or a server command. A waker
    /// rather than a `Notify`: the reader's wait for it is then 8 bytes instead of 88 in a
    /// future kept for as long as the connection is open.
    reader_wake: AtomicWaker,
    /// Server commands for the reader, and why the connection was closed (both rare: empty,
    /// no heap). One lock for both keeps the handle in its size class.
    mailbox: Mutex<Mailbox>,
    /// A plain-TCP WebSocket connection's write half. The writer writes through it; the
    /// fan-out, while `direct` is set, writes to its descriptor (`fd`).
    tcp: Mutex<Option<OwnedWriteHalf>>,
    /// Whether the fan-out may write a broadcast itself: set by the idle writer, cleared when it
    /// takes work. Changed only under the queue's lock, and the fan-out writes under that lock,
    /// so its writes and the writer's never overlap.
    direct: AtomicBool,
    /// The server ping that may go along with the next write ([`crate::ping`]).
    pub pings: PingSlot,
    /// The attached write half's file descriptor (-1 before and once released): the fan-out's
    /// direct writes use it without going through tokio's registration, which costs two cache
    /// misses per recipient (the stream and its readiness) in a loop that is otherwise one
    /// system call. Set to -1 under the queue's lock before the half is released, and read
    /// under that lock by the direct writes, so a descriptor they use is never closed under
    /// them: they need no second lock.
    fd: AtomicI32,
}

/// See [`ConnHandle::push_server_command`] and [`ConnHandle::close`].
#[derive(Default)]
struct Mailbox {
    commands: Vec<ServerCommand>,
    /// Why it was closed, for the close frame; the first reason wins. Boxed: set only on a
    /// server-side close.
    close_reason: Option<Box<(CloseCode, String)>>,
}

/// Posted frames that may wait for an SSE session at most (see [`ConnHandle::push_posted`]).
pub const MAX_POSTED_WAITING: usize = 1024;

/// A change a backend asked for through the server API, carried out by the connection's reader
/// as if the client had sent it (replies without an `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    Subscribe {
        room: String,
    },
    Unsubscribe {
        room: String,
    },
    /// Client frames posted for an SSE session (`POST /sse/send`); the session checks that
    /// `secret` and `user` are its own before running them, in order.
    Frames {
        secret: String,
        user: String,
        frames: Vec<String>,
    },
}

impl ConnHandle {
    pub fn new(client_id: Arc<str>, user: Arc<str>, capacity: usize) -> Self {
        Self {
            client_id,
            user,
            queue: Mutex::new(VecDeque::new()),
            own_queued: AtomicU32::new(0),
            writer: AtomicWaker::new(),
            writer_woken: AtomicBool::new(false),
            // 32 bits (and the count above): with the flags they fill one word, which keeps the
            // handle in a smaller allocation class.
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            closed: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            reader_wake: AtomicWaker::new(),
            mailbox: Mutex::default(),
            tcp: Mutex::new(None),
            pings: PingSlot::default(),
            fd: AtomicI32::new(-1),
            direct: AtomicBool::new(false),
        }
    }

    /// Takes the write half of a plain-TCP connection: from now on the writer writes through
    /// [`ConnHandle::poll_tcp`], and broadcasts may be written from the fan-out.
    pub fn attach_tcp(&self, half: OwnedWriteHalf) {
        self.fd.store(half.as_ref().as_raw_fd(), Ordering::Relaxed);
        *self.tcp() = Some(half);
    }

    fn tcp(&self) -> std::sync::MutexGuard<'_, Option<OwnedWriteHalf>> {
        self.tcp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For the writer: `f` on the attached write half (an error once it was released).
    pub fn poll_tcp<T>(
        &self,
        f: impl FnOnce(std::pin::Pin<&mut OwnedWriteHalf>) -> Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match self.tcp().as_mut() {
            Some(half) => f(std::pin::Pin::new(half)),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    /// For the writer, once it is done: releases the write half, which shuts the sending
    /// direction.
    pub fn release_tcp(&self) {
        {
            let _queue = self.queue();
            self.direct.store(false, Ordering::Relaxed);
            self.fd.store(-1, Ordering::Relaxed);
        }
        let half = self.tcp().take();
        drop(half);
    }

    /// For the writer, about to wait with nothing queued, nothing half-written and no room
    /// held: lets the fan-out write broadcasts itself until the writer takes work again.
    pub fn writer_idle(&self) {
        let queue = self.queue();
        if queue.is_empty() {
            self.direct.store(true, Ordering::Relaxed);
        }
    }

    /// Writes `wire` straight to the socket, without waiting; how many bytes it took. The
    /// caller holds the queue's lock (`_queue`), which keeps the descriptor open.
    fn write_now(&self, _queue: &VecDeque<Outbound>, wire: &[u8]) -> usize {
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return 0;
        }
        // SAFETY: `fd` is the attached write half's descriptor: it is stored before the half
        // is attached and set to -1, under the queue's lock that the caller holds, before the
        // half is released, so the descriptor is open and is this socket for as long as this
        // call. `wire` is valid for `wire.len()` bytes. The system call is made directly rather
        // than through libc's `send`, a cancellation point that costs two more calls per
        // recipient; no thread here is ever cancelled. A non-blocking send does not change
        // tokio's view of the socket: were it to block, tokio's next write sees that itself
        // and waits for readiness.
        #[allow(unsafe_code)]
        let sent = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                wire.as_ptr(),
                wire.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        };
        // Not ready (or failed) reads as "took nothing": the writer takes over, waits for the
        // socket properly and meets any error itself.
        usize::try_from(sent).unwrap_or(0)
    }

    /// Hands `command` to the reader task and wakes it.
    pub fn push_server_command(&self, command: ServerCommand) {
        self.mailbox().commands.push(command);
        self.reader_wake.wake();
    }

    /// Hands frames posted for this SSE connection to its session, unless more than
    /// [`MAX_POSTED_WAITING`] would then wait: posts are answered before their frames run, so
    /// without a bound a client could queue work faster than its session does it. Returns
    /// whether they were taken.
    pub fn push_posted(&self, secret: String, user: String, frames: Vec<String>) -> bool {
        let mut mailbox = self.mailbox();
        let waiting: usize = mailbox
            .commands
            .iter()
            .map(|c| match c {
                ServerCommand::Frames { frames, .. } => frames.len(),
                _ => 0,
            })
            .sum();
        if waiting + frames.len() > MAX_POSTED_WAITING {
            return false;
        }
        mailbox.commands.push(ServerCommand::Frames {
            secret,
            user,
            frames,
        });
        drop(mailbox);
        self.reader_wake.wake();
        true
    }

    /// The server commands waiting, oldest first.
    pub fn take_server_commands(&self) -> Vec<ServerCommand> {
        std::mem::take(&mut self.mailbox().commands)
    }

    fn mailbox(&self) -> std::sync::MutexGuard<'_, Mailbox> {
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the server closed the connection, if it did: code and reason.
    pub fn close_reason(&self) -> Option<(CloseCode, String)> {
        self.mailbox().close_reason.as_deref().cloned()
    }

    /// For the reader task: resolves once the connection is closed or a server command waits.
    /// The waker is registered before the check, so a close or command that comes between
    /// the two still wakes the task.
    pub fn attention(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |cx| {
            self.reader_wake.register(cx.waker());
            let waiting = !self.mailbox().commands.is_empty();
            if self.is_closed() || waiting {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Closes the connection with `code`; later calls keep the first reason. Returns whether
    /// this call closed it (false when it was closed already).
    pub fn close(&self, code: CloseCode, reason: &str) -> bool {
        let mut mailbox = self.mailbox();
        if mailbox.close_reason.is_none() {
            mailbox.close_reason = Some(Box::new((code, reason.to_owned())));
        }
        drop(mailbox);
        self.shut()
    }

    /// Ends the connection without a close frame (the socket is gone or silent).
    /// Returns whether this call ended it.
    pub fn shut(&self) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        // The reader checks the flag after registering its waker: it cannot miss this.
        self.reader_wake.wake();
        self.wake_writer();
        true
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// For the reader task: it handles no more commands, so every reply it owes is queued.
    pub fn reader_finished(&self) {
        self.reader_done.store(true, Ordering::Release);
        self.wake_writer();
    }

    /// For the writer task: resolves once [`reader_finished`](Self::reader_finished) was called.
    pub fn poll_reader_finished(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.reader_done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.writer.register(cx.waker());
        if self.reader_done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    fn wake_writer(&self) {
        self.writer_woken.store(true, Ordering::Release);
        self.writer.wake();
    }

    /// Replies queued (see `own_queued`); read and written under the queue's lock.
    fn own(&self) -> usize {
        self.own_queued.load(Ordering::Relaxed) as usize
    }

    fn set_own(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.own_queued.store(n, Ordering::Relaxed);
    }

    fn capacity(&self) -> usize {
        self.capacity as usize
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` unless the queue already holds `limit` items; then the connection is
    /// closed as a slow consumer.
    fn push(&self, item: Outbound, limit: usize) {
        // The connection's own traffic always wakes the writer: it may be holding broadcasts
        // (a write delay) that a reply must not wait behind.
        let own = matches!(item, Outbound::Local(_));
        // Once closing, broadcasts are dropped (a client recovers them with `since`), but a
        // reply to a command still running is owed: the writer sends it before the close frame.
        if self.is_closed() && !own {
            return;
        }
        let wake = {
            let mut queue = self.queue();
            let own_queued = self.own();
            let counted = if own {
                queue.len()
            } else {
                queue.len().saturating_sub(own_queued)
            };
            if counted >= limit {
                drop(queue);
                // Counted once per connection: replies owed after the close still come here.
                if self.close(
                    CloseCode::SLOW_CONSUMER,
                    "slow consumer: outbound queue overflowed",
                ) {
                    metrics::counter!("roomcast_gateway_slow_consumers_total").increment(1);
                }
                return;
            }
            queue.push_back(item);
            if own {
                self.set_own(own_queued + 1);
            }
            own || queue.len() == 1
        };
        // Otherwise a non-empty queue means the writer was woken already and has not taken it
        // yet; it takes everything queued before it waits again.
        if wake {
            self.wake_writer();
        }
    }

    /// Queues bytes that already are a WebSocket frame; limited like a reply. The session's
    /// ping (one per interval) is written at once while the writer lets it, like a batch of
    /// replies ([`ConnHandle::reply_texts`]). Pongs, which a client's burst of pings can pile
    /// up, and close frames, which end the connection, go through the writer.
    pub fn send_raw(&self, bytes: Bytes) {
        let ping = bytes.first() == Some(&0x89);
        if ping && !self.is_closed() && self.write_if_idle(|| Cow::Borrowed(&bytes)) {
            return;
        }
        self.push(
            Outbound::local(Local::Raw(bytes)),
            self.capacity().saturating_mul(2),
        );
    }

    /// Delivers a broadcast without waiting; a full queue closes the connection with 4008.
    pub fn deliver(&self, item: Outbound) {
        match item {
            Outbound::Message(delivery) => self.deliver_message(&delivery),
            Outbound::Event(event) => self.deliver_event(&event),
            Outbound::Local(_) => self.push(item, self.capacity()),
        }
    }

    /// Delivers a room message: written at once while the writer lets it, queued otherwise.
    pub fn deliver_message(&self, delivery: &Arc<Delivery>) {
        self.broadcast(&delivery.wire, delivery.direct, || {
            Outbound::Message(delivery.clone())
        });
    }

    /// Delivers a run of room messages whose frames, back to back, are `frames`: in one write
    /// while the writer lets it and every one of them may be written directly, each queued
    /// otherwise.
    pub fn deliver_messages(&self, deliveries: &[&Arc<Delivery>], frames: &Bytes) {
        if self.is_closed() {
            return;
        }
        if deliveries.iter().all(|d| d.direct) && self.write_if_idle(|| Cow::Borrowed(frames)) {
            return;
        }
        for delivery in deliveries {
            self.push(Outbound::Message(Arc::clone(delivery)), self.capacity());
        }
    }

    /// Delivers a presence event, like a message.
    pub fn deliver_event(&self, event: &Arc<RoomEvent>) {
        self.broadcast(&event.wire, event.direct, || Outbound::Event(event.clone()));
    }

    /// A broadcast whose frame is `wire`: written by the caller when `direct` and the writer
    /// lets it ([`ConnHandle::writer_idle`]), otherwise `item()` is queued (made only then, so
    /// a direct write costs no reference count).
    fn broadcast(&self, wire: &Bytes, direct: bool, item: impl FnOnce() -> Outbound) {
        if self.is_closed() {
            return;
        }
        if direct && self.write_if_idle(|| Cow::Borrowed(wire)) {
            return;
        }
        self.push(item(), self.capacity());
    }

    /// Writes the frame `wire()` makes (called only then) to the socket at once if the writer
    /// lets it ([`ConnHandle::writer_idle`]); whatever the socket does not take is queued first.
    /// Returns whether the frame was dealt with; if not, the caller queues it.
    fn write_if_idle<'w>(&self, wire: impl FnOnce() -> Cow<'w, Bytes>) -> bool {
        let mut queue = self.queue();
        if !queue.is_empty() || !self.direct.load(Ordering::Relaxed) {
            return false;
        }
        let mut wire = wire();
        let ping = self.pings.take();
        if ping {
            // The frame is whole: a ping may follow it in the same write.
            let mut both = Vec::with_capacity(wire.len() + 2);
            both.extend_from_slice(&wire);
            both.extend_from_slice(ping::FRAME);
            wire = Cow::Owned(both.into());
        }
        let written = self.write_now(&queue, &wire);
        if written == wire.len() {
            return true;
        }
        // The writer is in charge again.
        self.direct.store(false, Ordering::Relaxed);
        if written == 0 {
            if ping {
                // Nothing went, and the session counts on this write for its ping: the
                // writer sends it, ahead of the frame the caller queues.
                let raw = Bytes::from_static(ping::FRAME);
                queue.push_back(Outbound::local(Local::Raw(raw)));
                let own = self.own();
                self.set_own(own + 1);
                drop(queue);
                self.wake_writer();
            }
            return false;
        }
        // The rest stands for the whole frame; it is owed like a reply.
        queue.push_back(Outbound::local(Local::Rest(wire.slice(written..))));
        let own = self.own();
        self.set_own(own + 1);
        drop(queue);
        self.wake_writer();
        true
    }

    /// Queues the replies of a returned publish batch, `jsons`; or, while the writer lets it,
    /// writes them at once, all in one write, as the WebSocket frames `encode` makes, which
    /// saves the writer task a wake-up per batch. Only for replies that come together: replies
    /// written one by one would each cost a write where the writer sends whatever piled up in
    /// one. The writer only lets it on WebSocket connections, so `encode` is always the
    /// WebSocket text framing.
    ///
    /// A batch answers many publishes at once, so these may go past the reply limit by `owed`,
    /// as many as the pipeline lets a connection owe (`pipeline::MAX_OWED`); that bound is what
    /// keeps a client that never reads in check.
    pub fn reply_texts(&self, jsons: Vec<Utf8Bytes>, encode: fn(&[u8]) -> Bytes, owed: usize) {
        if jsons.is_empty() {
            return;
        }
        let written = !self.is_closed()
            && self.write_if_idle(|| {
                Cow::Owned(match jsons.as_slice() {
                    [one] => encode(one.as_bytes()),
                    many => {
                        // Each frame's header is at most 10 bytes.
                        let size = many.iter().map(|json| json.len() + 10).sum();
                        let mut out = BytesMut::with_capacity(size);
                        for json in many {
                            out.extend_from_slice(&encode(json.as_bytes()));
                        }
                        out.freeze()
                    }
                })
            });
        if written {
            return;
        }
        let limit = self.capacity().saturating_mul(2).saturating_add(owed);
        for json in jsons {
            self.push(Outbound::local(Local::Frame(json)), limit);
        }
    }

    /// Queues a reply. Replies may go past the broadcast capacity (each answers one of the
    /// client's own commands), up to twice it.
    pub async fn reply(&self, item: Outbound) {
        self.push(item, self.capacity().saturating_mul(2));
    }

    /// Moves up to `max` queued items into `batch`; returns how many.
    pub fn take_batch(&self, batch: &mut Vec<Outbound>, max: usize) -> usize {
        let mut queue = self.queue();
        // Whatever the writer does next, the fan-out must not write under it.
        self.direct.store(false, Ordering::Relaxed);
        let n = queue.len().min(max);
        let start = batch.len();
        batch.extend(queue.drain(..n));
        let own = batch[start..]
            .iter()
            .filter(|item| matches!(item, Outbound::Local(_)))
            .count();
        if own > 0 {
            let left = self.own().saturating_sub(own);
            self.set_own(left);
        }
        // Give back what a burst grew, so an idle connection stays small.
        if queue.is_empty() && queue.capacity() > 64 {
            queue.shrink_to(16);
        }
        n
    }

    /// Whether the queue holds broadcasts and nothing else: what a write delay may hold back
    /// (never the connection's own traffic, such as replies).
    pub fn holds_only_broadcasts(&self) -> bool {
        let queue = self.queue();
        !queue.is_empty() && !queue.iter().any(|item| matches!(item, Outbound::Local(_)))
    }

    /// For the writer task: resolves when something was queued or the connection closed
    /// since the last call (or already before it).
    pub fn poll_writer_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.writer_woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.writer.register(cx.waker());
        if self.writer_woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// For the writer task: resolves once the connection is closed.
    pub fn poll_writer_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_closed() {
            return Poll::Ready(());
        }
        self.writer.register(cx.waker());
        if self.is_closed() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    #[cfg(test)]
    pub fn try_recv(&self) -> Option<Outbound> {
        let item = self.queue().pop_front();
        if matches!(item, Some(Outbound::Local(_))) {
            let left = self.own().saturating_sub(1);
            self.set_own(left);
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    fn message(offset: u64, size: usize) -> Outbound {
        Outbound::Message(Arc::new(Delivery {
            room: Arc::from("r"),
            epoch: Arc::from("e"),
            offset,
            wire: Bytes::from(vec![b'0' + (offset % 10) as u8; size]),
            direct: true,
        }))
    }

    /// A connection handle holding the write half of a loopback socket, and the client's end.
    async fn attached() -> (ConnHandle, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let conn = ConnHandle::new(Arc::from("c"), Arc::from("u"), 16);
        conn.attach_tcp(write);
        (conn, client)
    }

    /// Whether the client's end stays silent for 50 ms.
    async fn nothing_more(client: &mut TcpStream) -> bool {
        let mut extra = [0u8; 1];
        let wait = std::time::Duration::from_millis(50);
        tokio::time::timeout(wait, client.read(&mut extra))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_ping_taken_by_a_write_that_wrote_nothing_goes_to_the_writer() {
        let (conn, _client) = attached().await;
        conn.writer_idle();
        // A frame the socket cannot take at once: the rest is queued.
        conn.deliver(message(1, 64 << 20));
        while conn.try_recv().is_some() {}
        conn.writer_idle();
        conn.pings.open(tokio::time::Instant::now());
        conn.deliver(message(2, 3));
        let queued: Vec<Outbound> = std::iter::from_fn(|| conn.try_recv()).collect();
        assert!(
            matches!(&queued[..], [Outbound::Local(ping), Outbound::Message(m)]
                if matches!(**ping, Local::Raw(ref b) if &b[..] == ping::FRAME) && m.offset == 2),
            "the ping, then the frame, for the writer: {queued:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_writer_lets_the_fan_out_write_and_a_busy_one_gets_the_queue() {
        let (conn, mut client) = attached().await;
        // Until the writer says it is idle, everything is queued.
        conn.deliver(message(1, 10));
        assert!(conn.try_recv().is_some());
        conn.writer_idle();
        conn.deliver(message(2, 10));
        assert!(conn.try_recv().is_none(), "written without the queue");
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [b'2'; 10]);
        // The writer took work: the fan-out queues again.
        conn.take_batch(&mut Vec::new(), 1);
        conn.deliver(message(3, 10));
        assert!(conn.try_recv().is_some());
    }

    #[tokio::test]
    async fn a_run_goes_to_an_idle_writer_s_socket_in_one_write_and_is_queued_otherwise() {
        let (conn, mut client) = attached().await;
        let run: Vec<Arc<Delivery>> = (1..=3)
            .map(|offset| match message(offset, 4) {
                Outbound::Message(d) => d,
                _ => unreachable!(),
            })
            .collect();
        let refs: Vec<&Arc<Delivery>> = run.iter().collect();
        let frames = Bytes::from_static(b"111122223333");
        // Busy writer: each message is queued, in order.
        conn.deliver_messages(&refs, &frames);
        let offsets: Vec<u64> = std::iter::from_fn(|| conn.try_recv())
            .map(|item| match item {
                Outbound::Message(d) => d.offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [1, 2, 3]);
        // Idle writer: the joined frames go straight to the socket.
        conn.writer_idle();
        conn.deliver_messages(&refs, &frames);
        assert!(conn.try_recv().is_none(), "written without the queue");
        let mut got = [0u8; 12];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"111122223333");
        // A run holding a gap fill's message is left to the writer.
        conn.writer_idle();
        let fill = Arc::new(Delivery {
            room: Arc::from("r"),
            epoch: Arc::from("e"),
            offset: 4,
            wire: Bytes::from_static(b"4444"),
            direct: false,
        });
        conn.deliver_messages(&[&run[0], &fill], &Bytes::from_static(b"11114444"));
        assert_eq!(std::iter::from_fn(|| conn.try_recv()).count(), 2);
        assert!(nothing_more(&mut client).await);
    }

    #[tokio::test]
    async fn a_broadcast_not_marked_direct_is_queued_even_for_an_idle_writer() {
        let (conn, _client) = attached().await;
        conn.writer_idle();
        let Outbound::Message(delivery) = message(1, 10) else {
            unreachable!()
        };
        let mut behind = Arc::into_inner(delivery).unwrap();
        // The fan-out is behind: the writer coalesces.
        behind.direct = false;
        conn.deliver(Outbound::Message(Arc::new(behind)));
        assert!(conn.try_recv().is_some(), "queued");
        // Still idle: a direct one is written.
        conn.writer_idle();
        conn.deliver(message(2, 10));
        assert!(conn.try_recv().is_none(), "written without the queue");
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_goes_first_through_the_queue() {
        let (conn, mut client) = attached().await;
        conn.writer_idle();
        // Far more than a loopback socket buffers while nobody reads.
        let big = 64 << 20;
        conn.deliver(message(4, big));
        conn.deliver(message(5, 10));
        conn.deliver(message(6, 10));
        let Some(Outbound::Local(rest)) = conn.try_recv() else {
            panic!("the rest of the frame is queued first");
        };
        let Local::Rest(rest) = *rest else {
            panic!("expected the rest of the frame");
        };
        let written = big - rest.len();
        assert!(written > 0 && !rest.is_empty(), "a partial write");
        // What followed waits behind it, in order, instead of being written.
        let next: Vec<u64> = std::iter::from_fn(|| conn.try_recv())
            .map(|item| match item {
                Outbound::Message(delivery) => delivery.offset,
                _ => 0,
            })
            .collect();
        assert_eq!(next, [5, 6]);
        let mut head = vec![0u8; written];
        client.read_exact(&mut head).await.unwrap();
        assert!(head.iter().all(|b| *b == b'4'));
        // And nothing else was written meanwhile.
        assert!(
            nothing_more(&mut client).await,
            "only the written part of the frame arrived"
        );
    }

    fn framed(json: &[u8]) -> Bytes {
        [b"#".as_slice(), json].concat().into()
    }

    #[tokio::test]
    async fn an_idle_writer_lets_a_batch_of_replies_and_a_ping_be_written_at_once_but_not_a_pong_or_close()
     {
        let (conn, mut client) = attached().await;
        // A busy writer gets the reply through the queue, as it was.
        conn.reply_texts(vec!["{\"a\":1}".into()], framed, 0);
        let Some(Outbound::Local(local)) = conn.try_recv() else {
            panic!("queued while the writer is busy");
        };
        assert!(matches!(*local, Local::Frame(ref f) if f.as_str() == "{\"a\":1}"));
        conn.writer_idle();
        conn.reply_texts(vec!["{\"b\":2}".into(), "{}".into()], framed, 0);
        conn.send_raw(Bytes::from_static(&[0x89, 0]));
        assert!(conn.try_recv().is_none(), "written without the queue");
        let mut got = [0u8; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got, b"#{\"b\":2}#{}\x89\x00",
            "the replies framed, in one piece, then the ping"
        );
        // A pong (a client's burst of pings) and a close frame are the writer's to send.
        conn.send_raw(Bytes::from_static(&[0x8a, 0]));
        assert!(conn.try_recv().is_some(), "a pong is queued");
        conn.writer_idle();
        conn.send_raw(Bytes::from_static(&[0x88, 0]));
        assert!(conn.try_recv().is_some(), "a close frame is queued");
    }

    #[tokio::test]
    async fn a_due_ping_follows_a_direct_write_in_the_same_write() {
        let (conn, mut client) = attached().await;
        conn.writer_idle();
        // Not opened (or not yet due): a delivery goes alone.
        conn.deliver(message(1, 3));
        conn.pings
            .open(tokio::time::Instant::now() + std::time::Duration::from_secs(60));
        conn.deliver(message(2, 3));
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"111222");
        // Due: the next write carries it, once.
        conn.pings.open(tokio::time::Instant::now());
        conn.deliver(message(3, 3));
        conn.deliver(message(4, 3));
        let mut got = [0u8; 8];
        let read = client.read_exact(&mut got);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the ping was written")
            .unwrap();
        assert_eq!(
            &got, b"333\x89\x00444",
            "the ping right behind the frame, once"
        );
        assert!(nothing_more(&mut client).await, "nothing more was written");
    }

    #[tokio::test]
    async fn replies_owed_by_a_closing_connection_go_to_the_writer() {
        let (conn, _client) = attached().await;
        conn.writer_idle();
        conn.close(CloseCode::NORMAL, "bye");
        conn.reply_texts(vec!["{}".into()], framed, 0);
        assert!(
            matches!(conn.try_recv(), Some(Outbound::Local(_))),
            "queued, to go before the close frame"
        );
    }

    /// Every connection has a handle, behind an `Arc` (16 bytes more): 208 bytes keep it in
    /// jemalloc's 224-byte class, where 216 to 240 take 256 and 248 takes 320 (measured with
    /// `loadgen connections`: 4,087 B of RSS per idle connection at 240, 4,167 B at 248).
    #[test]
    fn the_handle_stays_in_its_size_class() {
        assert!(
            size_of::<ConnHandle>() <= 208,
            "{} bytes",
            size_of::<ConnHandle>()
        );
    }

    #[tokio::test]
    async fn replies_past_the_limit_close_once_with_4008() {
        let conn = ConnHandle::new(Arc::from("c"), Arc::from("u"), 2);
        let reply = || Outbound::local(Local::Raw(Bytes::from_static(b"r")));
        // Replies may reach twice the capacity; the next one closes the connection.
        for _ in 0..4 {
            conn.reply(reply()).await;
        }
        assert!(!conn.is_closed());
        conn.reply(reply()).await;
        assert!(conn.is_closed());
        assert_eq!(conn.close_reason().unwrap().0, CloseCode::SLOW_CONSUMER);
        // Owed replies still overflow, but only the first close counts as closing it.
        assert!(!conn.close(CloseCode::SLOW_CONSUMER, "again"));
        assert!(!conn.shut());
        let other = ConnHandle::new(Arc::from("d"), Arc::from("u"), 2);
        assert!(
            other.close(CloseCode::NORMAL, "bye"),
            "the first close closes it"
        );
    }

    #[tokio::test]
    async fn a_released_socket_is_not_written() {
        let (conn, _client) = attached().await;
        conn.writer_idle();
        conn.release_tcp();
        conn.deliver(message(7, 10));
        assert!(conn.try_recv().is_some(), "queued: no socket to write to");
    }
}
