//! The registry of this gateway's connections and of the rooms they joined, and the fan-out of
//! broker payloads to them.
//!
//! Rooms are spread over shards, each behind its own mutex, so deliveries to different rooms
//! do not contend. A broadcast is serialized once (by the room-service) and every recipient's
//! queue gets a reference-counted clone of the same bytes: no per-delivery allocation of the
//! frame. Delivery never blocks: a full queue means a slow consumer, which is closed with 4008.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use roomcast_common::broker::BrokerEvent;
use roomcast_common::close_code::CloseCode;
use roomcast_common::envelope::{self, Control, Envelope};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::socket;

const SHARDS: usize = 32;

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

/// A change a backend asked for through the server API, carried out by the connection's reader
/// as if the client had sent it (replies without an `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    Subscribe { room: String },
    Unsubscribe { room: String },
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

/// A message as it came from the broker, held while a gap is being filled.
struct HeldMessage {
    delivery: Arc<Delivery>,
    sender: String,
}

/// One room with local members.
struct RoomEntry {
    /// The room's name, shared with every queued message of the room.
    name: Arc<str>,
    members: Vec<Arc<ConnHandle>>,
    /// The room's stream as seen on the broker: epoch and last offset delivered.
    epoch: Option<Arc<str>>,
    last: u64,
    /// Some while a gap is being filled from history: what arrived meanwhile, in order.
    held: Option<Vec<HeldMessage>>,
}

type Rooms = HashMap<Arc<str>, RoomEntry>;

/// Work for the repair task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairRequest {
    /// Fetch a room's history after `since` and deliver it before what was held.
    Room { room: Arc<str>, since: u64 },
    /// The broker link was lost: the store may have lost its memberships too (a restarted
    /// Redis), so record every local membership again.
    Reregister,
}

/// Messages fetched from history to fill a gap.
pub struct Filled {
    pub epoch: String,
    /// The room's latest offset when history was read: everything up to it was (or will
    /// never be) in history.
    pub latest: u64,
    /// `(offset, sender client id, frame)`, oldest first.
    pub messages: Vec<(u64, String, String)>,
}

#[derive(Default)]
pub struct Hub {
    shards: Vec<Mutex<Rooms>>,
    hasher: RandomState,
    /// Where gaps are reported; the repair task fills them from history.
    repairs: Option<mpsc::UnboundedSender<RepairRequest>>,
    /// Set when the broker link dropped: every room is checked against history once it is back.
    link_lost: std::sync::atomic::AtomicBool,
    /// Every local connection by client id, for disconnect commands.
    connections: Mutex<HashMap<Arc<str>, Arc<ConnHandle>>>,
    connection_count: AtomicUsize,
}

impl Hub {
    /// A hub and the receiving end of its gap reports (for [`crate::repair`]).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<RepairRequest>) {
        let (repairs, requests) = mpsc::unbounded_channel();
        let hub = Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            repairs: Some(repairs),
            ..Default::default()
        };
        (hub, requests)
    }

    fn shard(&self, room: &str) -> std::sync::MutexGuard<'_, Rooms> {
        let index = self.hasher.hash_one(room) as usize % SHARDS;
        // A poisoned shard only means a panic elsewhere mid-update; the map itself is intact.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connection_count(&self) -> usize {
        self.connection_count.load(Ordering::Relaxed)
    }

    pub fn add_connection(&self, conn: Arc<ConnHandle>) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.insert(conn.client_id.clone(), conn);
        self.connection_count
            .store(connections.len(), Ordering::Relaxed);
    }

    pub fn remove_connection(&self, client_id: &str) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.remove(client_id);
        self.connection_count
            .store(connections.len(), Ordering::Relaxed);
    }

    /// Every local connection (for draining).
    pub fn all_connections(&self) -> Vec<Arc<ConnHandle>> {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.values().cloned().collect()
    }

    /// Adds `conn` to `room`; returns the shared room name.
    pub fn add_member(&self, room: &str, conn: Arc<ConnHandle>) -> Arc<str> {
        let mut shard = self.shard(room);
        if let Some(name) = shard.get_key_value(room).map(|(name, _)| name.clone()) {
            if let Some(entry) = shard.get_mut(room) {
                entry.members.push(conn);
            }
            return name;
        }
        let name: Arc<str> = Arc::from(room);
        let entry = RoomEntry {
            name: name.clone(),
            members: vec![conn],
            epoch: None,
            last: 0,
            // Held until the first join gives the room's position (see `set_base`).
            held: Some(Vec::new()),
        };
        shard.insert(name.clone(), entry);
        name
    }

    /// Removes a connection from `room`.
    pub fn remove_member(&self, room: &str, client_id: &str) {
        let mut shard = self.shard(room);
        if let Some(entry) = shard.get_mut(room) {
            entry.members.retain(|m| &*m.client_id != client_id);
            if entry.members.is_empty() {
                shard.remove(room);
            }
        }
    }

    /// Local members of `room` (for tests and stats).
    pub fn member_count(&self, room: &str) -> usize {
        self.shard(room)
            .get(room)
            .map_or(0, |entry| entry.members.len())
    }

    /// Handles one broker event. Called inline by the broker: only non-blocking work here.
    pub fn dispatch(&self, event: BrokerEvent) {
        let BrokerEvent::Message { channel, payload } = event else {
            tracing::warn!("broker link lost; rooms are checked against history once it is back");
            self.link_lost.store(true, Ordering::Relaxed);
            return;
        };
        let envelope = match envelope::decode(payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%channel, %error, "dropping malformed broker payload");
                return;
            }
        };
        match envelope {
            Envelope::Control(control) => self.apply_control(control),
            Envelope::Message {
                offset,
                epoch,
                sender,
                frame,
            } => {
                let Some(room) = envelope::room_of_channel(&channel) else {
                    return;
                };
                if std::str::from_utf8(&frame).is_err() {
                    tracing::warn!(%channel, "dropping non-utf-8 message frame");
                    return;
                }
                let mut shard = self.shard(room);
                let Some(entry) = shard.get_mut(room) else {
                    return;
                };
                // One epoch `Arc` per room while it lasts: writers compare pointers.
                let epoch = match &entry.epoch {
                    Some(seen) if **seen == *epoch => seen.clone(),
                    _ => Arc::from(epoch),
                };
                let message = HeldMessage {
                    delivery: Arc::new(Delivery {
                        room: entry.name.clone(),
                        epoch,
                        offset,
                        wire: socket::text(&frame),
                    }),
                    sender,
                };
                self.accept(entry, message);
            }
            Envelope::Event { exclude, frame } => {
                let Some(room) = envelope::room_of_channel(&channel) else {
                    return;
                };
                if std::str::from_utf8(&frame).is_err() {
                    return;
                }
                let shard = self.shard(room);
                let Some(entry) = shard.get(room) else {
                    return;
                };
                let event = Arc::new(RoomEvent {
                    room: entry.name.clone(),
                    wire: socket::text(&frame),
                });
                for member in entry.members.iter().filter(|m| *m.client_id != *exclude) {
                    member.deliver(Outbound::Event(event.clone()));
                }
            }
        }
    }

    /// Whether the broker link dropped since the last check.
    pub fn link_was_lost(&self) -> bool {
        self.link_lost.load(Ordering::Relaxed)
    }

    /// Takes one message of a room in: held while the room waits for its base or a repair,
    /// held and repaired when it skips offsets, delivered otherwise.
    fn accept(&self, entry: &mut RoomEntry, message: HeldMessage) {
        if let Some(held) = &mut entry.held {
            held.push(message);
            return;
        }
        let offset = message.delivery.offset;
        let gap_since = match &entry.epoch {
            Some(seen) if **seen == *message.delivery.epoch => {
                (offset > entry.last + 1).then_some(entry.last)
            }
            // A new epoch (history lost and restarted): fetch it from its start.
            Some(_) => (offset > 1).then_some(0),
            None => None,
        };
        if let (Some(since), Some(repairs)) = (gap_since, &self.repairs) {
            metrics::counter!("roomcast_gateway_gaps_total").increment(1);
            tracing::info!(room = %entry.name, since, offset, "gap in a room's offsets: filling from history");
            if since == 0 {
                entry.epoch = Some(message.delivery.epoch.clone());
                entry.last = 0;
            }
            entry.held = Some(vec![message]);
            let _ = repairs.send(RepairRequest::Room {
                room: entry.name.clone(),
                since,
            });
            return;
        }
        deliver_message(entry, message);
    }

    /// The room's position as the first successful join saw it. Until then the room's
    /// messages are held: without a base, a first message that arrives out of order (NATS
    /// does not order several publishers) could not be told from a gap.
    pub fn set_base(&self, room: &str, epoch: &str, offset: u64) {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else {
            return;
        };
        if entry.epoch.is_some() {
            return;
        }
        entry.epoch = Some(Arc::from(epoch));
        entry.last = offset;
        for message in entry.held.take().unwrap_or_default() {
            self.accept(entry, message);
        }
    }

    /// After the broker link came back: hold every room that saw messages and ask for what it
    /// may have missed. Returns whether the link had been lost.
    pub fn check_after_link_loss(&self) -> bool {
        if !self.link_lost.swap(false, Ordering::Relaxed) {
            return false;
        }
        let Some(repairs) = &self.repairs else {
            return true;
        };
        let _ = repairs.send(RepairRequest::Reregister);
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for entry in shard.values_mut() {
                if entry.epoch.is_some() && entry.held.is_none() {
                    entry.held = Some(Vec::new());
                    let _ = repairs.send(RepairRequest::Room {
                        room: entry.name.clone(),
                        since: entry.last,
                    });
                }
            }
        }
        true
    }

    /// Every local membership: `(room, client id, user)`.
    pub fn memberships(&self) -> Vec<(Arc<str>, Arc<str>, Arc<str>)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for entry in shard.values() {
                for member in &entry.members {
                    all.push((
                        entry.name.clone(),
                        member.client_id.clone(),
                        member.user.clone(),
                    ));
                }
            }
        }
        all
    }

    /// Delivers what history filled in (`None`: the fetch failed), then what was held.
    pub fn finish_repair(&self, room: &str, filled: Option<Filled>) {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else {
            return;
        };
        if let Some(filled) = &filled
            && entry.epoch.as_deref().is_some_and(|e| *e != *filled.epoch)
            && let Some(repairs) = &self.repairs
        {
            // History answered for a newer epoch than the one being repaired (the store lost
            // everything meanwhile): what it returned starts at the old offset. Keep holding
            // and fetch the new epoch from its start.
            entry.epoch = Some(Arc::from(filled.epoch.as_str()));
            entry.last = 0;
            let _ = repairs.send(RepairRequest::Room {
                room: entry.name.clone(),
                since: 0,
            });
            return;
        }
        let held = entry.held.take().unwrap_or_default();
        // Held messages up to here are delivered as they are; later ones may skip ahead
        // again (a message still in flight) and start another repair rather than be lost.
        let mut covered = u64::MAX;
        if let Some(filled) = filled {
            covered = filled.latest;
            let epoch: Arc<str> = Arc::from(filled.epoch);
            for (offset, sender, frame) in filled.messages {
                let delivery = Arc::new(Delivery {
                    room: entry.name.clone(),
                    epoch: epoch.clone(),
                    offset,
                    wire: socket::text(frame.as_bytes()),
                });
                deliver_message(entry, HeldMessage { delivery, sender });
            }
        }
        for message in held {
            if message.delivery.offset <= covered || entry.held.is_some() {
                if let Some(more) = &mut entry.held {
                    more.push(message);
                } else {
                    deliver_message(entry, message);
                }
            } else {
                self.accept(entry, message);
            }
        }
    }

    /// Runs `f` on every local connection of `user` (when set) or the connection `client_id`.
    fn each_target(&self, user: &str, client_id: &str, f: impl Fn(&ConnHandle)) {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if user.is_empty() {
            if let Some(conn) = connections.get(client_id) {
                f(conn);
            }
            return;
        }
        for conn in connections.values().filter(|c| *c.user == *user) {
            f(conn);
        }
    }

    fn apply_control(&self, control: Control) {
        match control {
            Control::Disconnect {
                user,
                client_id,
                code,
                reason,
            } => {
                let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
                for conn in connections.values() {
                    let by_user = !user.is_empty() && *conn.user == *user;
                    let by_client = !client_id.is_empty() && *conn.client_id == *client_id;
                    if by_user || by_client {
                        conn.close(code, &reason);
                    }
                }
            }
            Control::Subscribe {
                room,
                user,
                client_id,
            } => self.each_target(&user, &client_id, |conn| {
                conn.push_server_command(ServerCommand::Subscribe { room: room.clone() });
            }),
            Control::Unsubscribe {
                room,
                user,
                client_id,
            } => self.each_target(&user, &client_id, |conn| {
                conn.push_server_command(ServerCommand::Unsubscribe { room: room.clone() });
            }),
        }
    }
}

/// Delivers one message to the room's members (not its sender) unless the room already
/// delivered it, and advances the room's position.
fn deliver_message(entry: &mut RoomEntry, message: HeldMessage) {
    let delivery = &message.delivery;
    if entry.epoch.as_deref() == Some(&*delivery.epoch) {
        if delivery.offset <= entry.last {
            return;
        }
    } else {
        entry.epoch = Some(delivery.epoch.clone());
    }
    entry.last = delivery.offset;
    let mut delivered = 0u64;
    for member in entry
        .members
        .iter()
        .filter(|m| *m.client_id != *message.sender)
    {
        member.deliver(Outbound::Message(delivery.clone()));
        delivered += 1;
    }
    metrics::counter!("roomcast_gateway_deliveries_total").increment(delivered);
}

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_common::envelope::{encode_event, encode_message, room_channel};

    fn conn(id: &str, user: &str, capacity: usize) -> (Arc<ConnHandle>, Arc<ConnHandle>) {
        let conn = Arc::new(ConnHandle::new(id.into(), user.into(), capacity));
        (conn.clone(), conn)
    }

    fn message(room: &str, offset: u64, sender: &str) -> BrokerEvent {
        BrokerEvent::Message {
            channel: room_channel(room).into(),
            payload: encode_message(offset, "e", sender, "{\"type\":\"message\"}"),
        }
    }

    #[test]
    fn delivers_to_members_except_the_sender() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 8);
        let (b, rb) = conn("b", "u", 8);
        let (c, rc) = conn("c", "u", 8);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.add_member("other", c);
        hub.set_base("r", "e", 0);
        hub.set_base("other", "e", 0);
        hub.dispatch(message("r", 1, "a"));
        assert!(ra.try_recv().is_none());
        match rb.try_recv().unwrap() {
            Outbound::Message(d) => assert_eq!((&*d.room, d.offset), ("r", 1)),
            other => panic!("{other:?}"),
        }
        assert!(rc.try_recv().is_none());
    }

    #[test]
    fn overflow_closes_with_4008() {
        let (hub, _repairs) = Hub::new();
        let (a, _ra) = conn("a", "u", 1);
        hub.add_member("r", a.clone());
        hub.set_base("r", "e", 0);
        hub.dispatch(message("r", 1, "x"));
        assert!(!a.is_closed());
        hub.dispatch(message("r", 2, "x"));
        assert!(a.is_closed());
        assert_eq!(a.close_reason.get().unwrap().0, CloseCode::SLOW_CONSUMER);
    }

    #[tokio::test]
    async fn replies_do_not_count_against_the_broadcast_limit() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 2);
        hub.add_member("r", a.clone());
        hub.set_base("r", "e", 0);
        // A returned publish batch: more replies than the broadcast capacity.
        for _ in 0..20 {
            a.reply_owed(Outbound::frame("published"), 64).await;
        }
        hub.dispatch(message("r", 1, "x"));
        hub.dispatch(message("r", 2, "x"));
        assert!(!a.is_closed(), "two broadcasts fit a capacity of 2");
        hub.dispatch(message("r", 3, "x"));
        assert!(a.is_closed(), "a third broadcast overflows");
        // Taking the replies keeps the count right: 20 replies then 2 broadcasts.
        let mut batch = Vec::new();
        assert_eq!(a.take_batch(&mut batch, 64), 22);
        assert!(ra.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_closed_connection_still_queues_replies_but_not_broadcasts() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 8);
        hub.add_member("r", a.clone());
        hub.set_base("r", "e", 0);
        a.close(CloseCode::GOING_AWAY, "draining");
        hub.dispatch(message("r", 1, "x"));
        assert!(ra.try_recv().is_none(), "broadcasts stop at the close");
        a.reply(Outbound::frame("owed")).await;
        assert!(matches!(ra.try_recv().unwrap(), Outbound::Local(_)));
    }

    #[test]
    fn events_skip_the_excluded_client_and_removal_works() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 8);
        let (b, rb) = conn("b", "u", 8);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.dispatch(BrokerEvent::Message {
            channel: room_channel("r").into(),
            payload: encode_event("a", "{}"),
        });
        assert!(ra.try_recv().is_none());
        assert!(matches!(rb.try_recv().unwrap(), Outbound::Event(_)));
        hub.remove_member("r", "b");
        assert_eq!(hub.member_count("r"), 1);
        hub.remove_member("r", "a");
        assert_eq!(hub.member_count("r"), 0);
    }

    #[test]
    fn malformed_payloads_are_dropped() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 8);
        hub.add_member("r", a);
        for payload in [&b"garbage"[..], b"M1 x\n\xff\xfe"] {
            hub.dispatch(BrokerEvent::Message {
                channel: room_channel("r").into(),
                payload: Bytes::copy_from_slice(payload),
            });
        }
        assert!(ra.try_recv().is_none());
    }

    #[test]
    fn disconnect_control_closes_matching_connections() {
        let (hub, _repairs) = Hub::new();
        let (a, _ra) = conn("a", "alice", 8);
        let (b, _rb) = conn("b", "bob", 8);
        hub.add_connection(a.clone());
        hub.add_connection(b.clone());
        hub.apply_control(Control::Disconnect {
            user: "alice".into(),
            client_id: String::new(),
            code: CloseCode::POLICY_VIOLATION,
            reason: "bye".into(),
        });
        assert!(a.is_closed());
        assert!(!b.is_closed());
        assert_eq!(hub.connection_count(), 2);
    }
    fn offsets(rx: &Arc<ConnHandle>) -> Vec<(String, u64)> {
        let mut seen = Vec::new();
        while let Some(item) = rx.try_recv() {
            if let Outbound::Message(d) = item {
                seen.push((d.epoch.to_string(), d.offset));
            }
        }
        seen
    }

    fn message_in(room: &str, epoch: &str, offset: u64) -> BrokerEvent {
        BrokerEvent::Message {
            channel: room_channel(room).into(),
            payload: encode_message(offset, epoch, "other", "{}"),
        }
    }

    fn room_request(room: &str, since: u64) -> RepairRequest {
        RepairRequest::Room {
            room: Arc::from(room),
            since,
        }
    }

    fn filled(epoch: &str, offsets: &[u64]) -> Filled {
        Filled {
            epoch: epoch.into(),
            latest: offsets.last().copied().unwrap_or(0),
            messages: offsets
                .iter()
                .map(|o| (*o, "other".to_owned(), "{}".to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_gap_is_held_then_filled_in_order() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "e", 0);
        hub.dispatch(message_in("r", "e", 1));
        hub.dispatch(message_in("r", "e", 2));
        hub.dispatch(message_in("r", "e", 5));
        hub.dispatch(message_in("r", "e", 6));
        assert_eq!(offsets(&ra), [("e".into(), 1), ("e".into(), 2)]);
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 2));
        assert!(repairs.try_recv().is_err(), "one repair at a time per room");
        hub.finish_repair("r", Some(filled("e", &[3, 4, 5])));
        let got: Vec<u64> = offsets(&ra).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, [3, 4, 5, 6], "filled, then held, without duplicates");
        hub.dispatch(message_in("r", "e", 7));
        assert_eq!(offsets(&ra), [("e".into(), 7)]);
    }

    #[test]
    fn messages_wait_for_the_base_and_a_first_one_out_of_order_is_repaired() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        // Arrives before the join reply, and ahead of offset 5.
        hub.dispatch(message_in("r", "e", 6));
        assert!(ra.try_recv().is_none(), "held until the base is known");
        hub.set_base("r", "e", 4);
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 4));
        hub.dispatch(message_in("r", "e", 5));
        hub.finish_repair("r", Some(filled("e", &[5, 6])));
        let got: Vec<u64> = offsets(&ra).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, [5, 6]);
    }

    #[test]
    fn a_held_message_past_the_fill_starts_another_repair() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "e", 0);
        hub.dispatch(message_in("r", "e", 2));
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 0));
        // 4 arrives while 3 is still in flight; history was read when 2 was the latest.
        hub.dispatch(message_in("r", "e", 4));
        hub.finish_repair("r", Some(filled("e", &[1, 2])));
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 2));
        hub.dispatch(message_in("r", "e", 3));
        hub.finish_repair("r", Some(filled("e", &[3, 4])));
        let got: Vec<u64> = offsets(&ra).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(repairs.try_recv().is_err(), "no endless repairs");
    }

    #[test]
    fn a_fill_that_history_cannot_complete_delivers_anyway() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "e", 0);
        hub.dispatch(message_in("r", "e", 5));
        assert!(repairs.try_recv().is_ok());
        // History lost 1..3 (trimmed): it returns 4..5 with 5 the latest.
        hub.finish_repair("r", Some(filled("e", &[4, 5])));
        let got: Vec<u64> = offsets(&ra).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, [4, 5]);
        assert!(repairs.try_recv().is_err(), "no endless repairs");
    }

    #[test]
    fn a_failed_fill_still_delivers_what_was_held() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "e", 0);
        hub.dispatch(message_in("r", "e", 1));
        hub.dispatch(message_in("r", "e", 3));
        assert!(repairs.try_recv().is_ok());
        hub.finish_repair("r", None);
        let got: Vec<u64> = offsets(&ra).into_iter().map(|(_, o)| o).collect();
        assert_eq!(got, [1, 3]);
    }

    #[test]
    fn a_new_epoch_that_skips_its_start_is_filled_from_offset_one() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "old", 8);
        hub.dispatch(message_in("r", "old", 9));
        hub.dispatch(message_in("r", "new", 3));
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 0));
        hub.finish_repair("r", Some(filled("new", &[1, 2, 3])));
        assert_eq!(
            offsets(&ra),
            [
                ("old".into(), 9),
                ("new".into(), 1),
                ("new".into(), 2),
                ("new".into(), 3)
            ]
        );
    }

    #[test]
    fn a_repair_answered_in_a_newer_epoch_refetches_that_epoch_from_its_start() {
        let (hub, mut repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.set_base("r", "old", 56);
        hub.dispatch(message_in("r", "old", 57));
        hub.dispatch(BrokerEvent::Disconnected);
        assert!(hub.check_after_link_loss());
        assert_eq!(repairs.try_recv().unwrap(), RepairRequest::Reregister);
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 57));
        // The store restarted: the new epoch is at 30 when the first new message arrives.
        hub.dispatch(message_in("r", "new", 30));
        hub.finish_repair("r", Some(filled("new", &[])));
        assert_eq!(repairs.try_recv().unwrap(), room_request("r", 0));
        hub.finish_repair("r", Some(filled("new", &(1..=29).collect::<Vec<_>>())));
        let got: Vec<(String, u64)> = offsets(&ra);
        let mut want = vec![("old".to_owned(), 57)];
        want.extend((1..=30).map(|o| ("new".to_owned(), o)));
        assert_eq!(got, want);
    }

    #[test]
    fn a_lost_link_checks_every_active_room() {
        let (hub, mut repairs) = Hub::new();
        let (a, _ra) = conn("a", "u", 64);
        hub.add_member("r", a.clone());
        hub.add_member("quiet", a);
        hub.set_base("r", "e", 3);
        hub.set_base("quiet", "e", 0);
        hub.dispatch(message_in("r", "e", 4));
        assert!(!hub.check_after_link_loss(), "nothing lost yet");
        hub.dispatch(BrokerEvent::Disconnected);
        assert!(hub.link_was_lost());
        assert!(hub.check_after_link_loss());
        assert_eq!(repairs.try_recv().unwrap(), RepairRequest::Reregister);
        let mut requests = vec![repairs.try_recv().unwrap(), repairs.try_recv().unwrap()];
        requests.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(requests, [room_request("quiet", 0), room_request("r", 4)]);
        assert!(repairs.try_recv().is_err());
    }
}
