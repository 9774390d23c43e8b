//! A connection's outbound queue and what goes in it: the shared face of a connection
//! ([`ConnHandle`]) that the hub, the control channel and the connection's own tasks reach it
//! through, and the items its writer sends.
//!
//! Delivery never blocks: a full queue means a slow consumer, which is closed with 4008.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use roomcast_common::close_code::CloseCode;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
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
}

/// A presence event of a room, shared like a [`Delivery`].
#[derive(Debug)]
pub struct RoomEvent {
    pub room: Arc<str>,
    /// The whole WebSocket frame.
    pub wire: Bytes,
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
    own_queued: AtomicUsize,
    /// The writer task's waker, and whether it has been woken since it last looked.
    writer: AtomicWaker,
    writer_woken: AtomicBool,
    /// Broadcast items the queue may hold before the connection counts as a slow consumer.
    capacity: usize,
    /// Set once the connection is ending; both of its tasks watch it.
    closed: AtomicBool,
    /// Set when the reader handles no more commands: every reply it owes is queued.
    reader_done: AtomicBool,
    /// Wakes the reader task when the connection is closed from elsewhere.
    reader_wake: Notify,
    /// Why it was closed, for the close frame; the first reason wins.
    pub close_reason: OnceLock<(CloseCode, String)>,
    /// Server-side subscription changes for the reader to carry out (rare: empty, no heap).
    server_commands: Mutex<Vec<ServerCommand>>,
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
            own_queued: AtomicUsize::new(0),
            writer: AtomicWaker::new(),
            writer_woken: AtomicBool::new(false),
            capacity,
            closed: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            reader_wake: Notify::new(),
            close_reason: OnceLock::new(),
            server_commands: Mutex::new(Vec::new()),
        }
    }

    /// Hands `command` to the reader task and wakes it.
    pub fn push_server_command(&self, command: ServerCommand) {
        self.server_commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        self.reader_wake.notify_one();
    }

    /// Hands frames posted for this SSE connection to its session, unless more than
    /// [`MAX_POSTED_WAITING`] would then wait: posts are answered before their frames run, so
    /// without a bound a client could queue work faster than its session does it. Returns
    /// whether they were taken.
    pub fn push_posted(&self, secret: String, user: String, frames: Vec<String>) -> bool {
        let mut commands = self
            .server_commands
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let waiting: usize = commands
            .iter()
            .map(|c| match c {
                ServerCommand::Frames { frames, .. } => frames.len(),
                _ => 0,
            })
            .sum();
        if waiting + frames.len() > MAX_POSTED_WAITING {
            return false;
        }
        commands.push(ServerCommand::Frames {
            secret,
            user,
            frames,
        });
        drop(commands);
        self.reader_wake.notify_one();
        true
    }

    /// The server commands waiting, oldest first.
    pub fn take_server_commands(&self) -> Vec<ServerCommand> {
        std::mem::take(
            &mut *self
                .server_commands
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// For the reader task: resolves once the connection is closed or a server command waits.
    pub async fn attention(&self) {
        loop {
            let waiting = !self
                .server_commands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if self.is_closed() || waiting {
                return;
            }
            self.reader_wake.notified().await;
        }
    }

    /// Closes the connection with `code`; later calls keep the first reason.
    pub fn close(&self, code: CloseCode, reason: &str) {
        let _ = self.close_reason.set((code, reason.to_owned()));
        self.shut();
    }

    /// Ends the connection without a close frame (the socket is gone or silent).
    pub fn shut(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // A permit is stored if the reader is not waiting yet: it cannot miss this.
            self.reader_wake.notify_one();
            self.wake_writer();
        }
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
            let own_queued = self.own_queued.load(Ordering::Relaxed);
            let counted = if own {
                queue.len()
            } else {
                queue.len().saturating_sub(own_queued)
            };
            if counted >= limit {
                drop(queue);
                metrics::counter!("roomcast_gateway_slow_consumers_total").increment(1);
                self.close(
                    CloseCode::SLOW_CONSUMER,
                    "slow consumer: outbound queue overflowed",
                );
                return;
            }
            queue.push_back(item);
            if own {
                self.own_queued.store(own_queued + 1, Ordering::Relaxed);
            }
            own || queue.len() == 1
        };
        // Otherwise a non-empty queue means the writer was woken already and has not taken it
        // yet; it takes everything queued before it waits again.
        if wake {
            self.wake_writer();
        }
    }

    /// Queues bytes that already are a WebSocket frame; limited like a reply.
    pub fn send_raw(&self, bytes: Bytes) {
        self.push(
            Outbound::local(Local::Raw(bytes)),
            self.capacity.saturating_mul(2),
        );
    }

    /// Queues a broadcast without waiting; a full queue closes the connection with 4008.
    pub fn deliver(&self, item: Outbound) {
        self.push(item, self.capacity);
    }

    /// Queues a reply. Replies may go past the broadcast capacity (each answers one of the
    /// client's own commands), up to twice it.
    pub async fn reply(&self, item: Outbound) {
        self.push(item, self.capacity.saturating_mul(2));
    }

    /// Queues the reply to a pipelined publish. A returned batch answers many at once, so these
    /// may go past the reply limit by as many as the pipeline lets a connection owe
    /// (`pipeline::MAX_OWED`); that bound is what keeps a client that never reads in check.
    pub async fn reply_owed(&self, item: Outbound, owed: usize) {
        self.push(item, self.capacity.saturating_mul(2).saturating_add(owed));
    }

    /// Moves up to `max` queued items into `batch`; returns how many.
    pub fn take_batch(&self, batch: &mut Vec<Outbound>, max: usize) -> usize {
        let mut queue = self.queue();
        let n = queue.len().min(max);
        let start = batch.len();
        batch.extend(queue.drain(..n));
        let own = batch[start..]
            .iter()
            .filter(|item| matches!(item, Outbound::Local(_)))
            .count();
        if own > 0 {
            let left = self.own_queued.load(Ordering::Relaxed).saturating_sub(own);
            self.own_queued.store(left, Ordering::Relaxed);
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
            let left = self.own_queued.load(Ordering::Relaxed).saturating_sub(1);
            self.own_queued.store(left, Ordering::Relaxed);
        }
        item
    }
}
