//! One room's message stream as this gateway delivers it: the only place that decides order.
//!
//! A [`RoomStream`] owns the room's epoch and last offset delivered, drops duplicates, holds
//! messages while a gap is filled from history (or until the first join tells it where the
//! stream starts), and knows, per member, up to which offset the member's join reply already
//! covered. What it hands to members' queues is therefore in offset order, without duplicates
//! and without what the member got in its join reply; the writer only holds a room's messages
//! while that member's join is in flight.
//!
//! It does no I/O: when a gap needs history it says so ([`Repair`]) and the hub asks the
//! repair task.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};

use crate::outbound::{ConnHandle, Delivery, RoomEvent};

/// A message as it came from the broker (or from history).
pub struct Message {
    pub delivery: Arc<Delivery>,
    /// The publisher's client id: it gets the `published` reply, not the broadcast.
    pub sender: String,
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

/// A gap to fill: the room's messages after `since` (in the stream's current epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    pub since: u64,
}

struct Member {
    conn: Arc<ConnHandle>,
    /// [`id_hash`] of the member's client id: the per-message sender check compares this,
    /// which sits beside `conn`, instead of reading the id's bytes from another allocation (a
    /// cache miss per member per message).
    id: u64,
    /// `(epoch, offset)` the member's join reply covered: it gets nothing up to there. Cleared
    /// by the first message past it, so a member's usual cost is one `None` check.
    covered: Option<(Arc<str>, u64)>,
}

impl Member {
    fn new(conn: Arc<ConnHandle>) -> Self {
        Self {
            id: id_hash(&conn.client_id),
            conn,
            covered: None,
        }
    }

    /// Whether the member is owed `delivery`: not when its join reply covered it. The first
    /// message past what the join covered clears the mark.
    fn owed(&mut self, delivery: &Delivery) -> bool {
        if let Some((epoch, offset)) = &self.covered {
            let same_epoch = Arc::ptr_eq(epoch, &delivery.epoch) || *epoch == delivery.epoch;
            if same_epoch && delivery.offset <= *offset {
                return false;
            }
            self.covered = None;
        }
        true
    }
}

/// `roomcast_gateway_deliveries_total`, counted once per message and room.
fn deliveries_total() -> &'static metrics::Counter {
    static COUNTER: OnceLock<metrics::Counter> = OnceLock::new();
    roomcast_common::ops::cached(&COUNTER, || {
        metrics::counter!("roomcast_gateway_deliveries_total")
    })
}

/// The frames of `deliveries`, back to back: what one write sends for all of them.
fn joined_frames(deliveries: &[&Arc<Delivery>]) -> Bytes {
    let mut joined = BytesMut::with_capacity(deliveries.iter().map(|d| d.wire.len()).sum());
    for delivery in deliveries {
        joined.extend_from_slice(&delivery.wire);
    }
    joined.freeze()
}

/// A client id's hash (equal ids, equal hashes).
fn id_hash(id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(id)
}

/// One room with local members.
pub struct RoomStream {
    /// The room's name, shared with every queued message of the room.
    name: Arc<str>,
    members: Vec<Member>,
    /// Epoch and last offset delivered; `None` until the first join says where the room is.
    epoch: Option<Arc<str>>,
    last: u64,
    /// Some while waiting for a base or a gap fill: what arrived meanwhile, in order.
    held: Option<Vec<Message>>,
    /// Messages taken in order since the last [`RoomStream::flush`]; empty in between.
    outgoing: Vec<Message>,
}

impl RoomStream {
    /// A room with its first member; its messages are held until [`RoomStream::joined`].
    pub fn new(name: Arc<str>, first: Arc<ConnHandle>) -> Self {
        Self {
            name,
            members: vec![Member::new(first)],
            epoch: None,
            last: 0,
            held: Some(Vec::new()),
            outgoing: Vec::new(),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn add(&mut self, conn: Arc<ConnHandle>) {
        self.members.push(Member::new(conn));
    }

    /// Removes a member; returns whether the room is left without members.
    pub fn remove(&mut self, client_id: &str) -> bool {
        self.members.retain(|m| &*m.conn.client_id != client_id);
        self.members.is_empty()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn members(&self) -> impl Iterator<Item = &Arc<ConnHandle>> {
        self.members.iter().map(|m| &m.conn)
    }

    /// The epoch of a new message, sharing the stream's `Arc` when it is the same, so later
    /// compares are pointer compares.
    pub fn epoch_of(&self, epoch: &str) -> Arc<str> {
        match &self.epoch {
            Some(seen) if **seen == *epoch => seen.clone(),
            _ => Arc::from(epoch),
        }
    }

    /// A member's join returned the room at `(epoch, offset)`, its reply covering everything
    /// up to there. The first join of the room also sets where its stream starts.
    pub fn joined(&mut self, client_id: &str, epoch: &str, offset: u64) -> Option<Repair> {
        let epoch = self.epoch_of(epoch);
        if let Some(member) = self
            .members
            .iter_mut()
            .find(|m| &*m.conn.client_id == client_id)
        {
            member.covered = Some((epoch.clone(), offset));
        }
        if self.epoch.is_some() {
            return None;
        }
        self.epoch = Some(epoch);
        self.last = offset;
        let mut repair = None;
        for message in self.held.take().unwrap_or_default() {
            repair = repair.or(self.accept(message));
        }
        self.flush();
        repair
    }

    /// A message from the broker: taken for delivery at the next [`RoomStream::flush`] (the
    /// caller's), held, or the start of a gap repair.
    pub fn accept(&mut self, message: Message) -> Option<Repair> {
        if let Some(held) = &mut self.held {
            held.push(message);
            return None;
        }
        let offset = message.delivery.offset;
        let gap_since = match &self.epoch {
            Some(seen) if **seen == *message.delivery.epoch => {
                (offset > self.last + 1).then_some(self.last)
            }
            Some(_) => (offset > 1).then_some(0),
            None => None,
        };
        let Some(since) = gap_since else {
            self.deliver(message);
            return None;
        };
        metrics::counter!("roomcast_gateway_gaps_total").increment(1);
        tracing::info!(room = %self.name, since, offset, "gap in a room's offsets: filling from history");
        if since == 0 {
            self.epoch = Some(message.delivery.epoch.clone());
            self.last = 0;
        }
        self.held = Some(vec![message]);
        Some(Repair { since })
    }

    /// A presence event: to every member but `exclude`, in the order events arrive.
    pub fn event(&mut self, exclude: &str, event: &Arc<RoomEvent>) {
        // Messages taken before it go first.
        self.flush();
        let excluded = id_hash(exclude);
        for member in self
            .members
            .iter()
            .filter(|m| m.id != excluded || *m.conn.client_id != *exclude)
        {
            member.conn.deliver_event(event);
        }
    }

    /// The broker link was lost: hold the room and check it against history from the last
    /// offset delivered. `None` when the room is already held (its base or a fill is coming).
    pub fn check_after_link_loss(&mut self) -> Option<Repair> {
        if self.epoch.is_none() || self.held.is_some() {
            return None;
        }
        self.held = Some(Vec::new());
        Some(Repair { since: self.last })
    }

    /// History answered a repair (`None`: it could not). Delivers the fill, then what was held;
    /// may need another repair (a message held past what history had, or a newer epoch).
    pub fn finish_repair(&mut self, filled: Option<Filled>) -> Option<Repair> {
        if let Some(filled) = &filled
            && self.epoch.as_deref().is_some_and(|e| *e != *filled.epoch)
        {
            // History is already in a newer epoch: fetch that one from its start.
            self.epoch = Some(Arc::from(filled.epoch.as_str()));
            self.last = 0;
            return Some(Repair { since: 0 });
        }
        let held = self.held.take().unwrap_or_default();
        let mut covered = u64::MAX;
        if let Some(filled) = filled {
            covered = filled.latest;
            let epoch: Arc<str> = Arc::from(filled.epoch);
            for (offset, sender, frame) in filled.messages {
                let delivery = Arc::new(Delivery {
                    room: self.name.clone(),
                    epoch: epoch.clone(),
                    offset,
                    wire: crate::socket::text(frame.as_bytes()),
                    // A fill comes as a batch: the writers coalesce it.
                    direct: false,
                });
                self.deliver(Message { delivery, sender });
            }
        }
        let mut repair = None;
        for message in held {
            if message.delivery.offset <= covered || self.held.is_some() {
                match &mut self.held {
                    Some(more) => more.push(message),
                    None => self.deliver(message),
                }
            } else {
                repair = repair.or(self.accept(message));
            }
        }
        self.flush();
        repair
    }

    /// Takes a message in order: drops what was delivered already, restarts on a new epoch.
    /// It goes out with the rest of the run at the next [`RoomStream::flush`].
    fn deliver(&mut self, message: Message) {
        let delivery = &message.delivery;
        if self.epoch.as_deref() == Some(&*delivery.epoch) {
            if delivery.offset <= self.last {
                return;
            }
        } else {
            self.epoch = Some(delivery.epoch.clone());
        }
        self.last = delivery.offset;
        self.outgoing.push(message);
    }

    /// Hands what [`RoomStream::deliver`] took to the members. A run of several messages is
    /// one frame sequence, joined once: a member that gets all of them and whose writer is
    /// idle gets them in one write (the fan-out's own coalescing, so a fan-out that fell
    /// behind catches up instead of paying a write per message). Others get each message
    /// they are owed, as before.
    pub fn flush(&mut self) {
        let outgoing = std::mem::take(&mut self.outgoing);
        match outgoing.len() {
            0 => {}
            1 => self.send_one(&outgoing[0]),
            _ => self.send_run(&outgoing),
        }
        // Keep the allocation for the next run.
        self.outgoing = outgoing;
        self.outgoing.clear();
    }

    /// One message to every member but its sender and those whose join covered it.
    fn send_one(&mut self, message: &Message) {
        let delivery = &message.delivery;
        let sender = id_hash(&message.sender);
        let mut delivered = 0u64;
        for i in 0..self.members.len() {
            if let Some(next) = self.members.get(i + 1) {
                crate::prefetch::handle(&next.conn);
            }
            let member = &mut self.members[i];
            if member.id == sender && *member.conn.client_id == *message.sender {
                continue;
            }
            if !member.owed(delivery) {
                continue;
            }
            member.conn.deliver_message(delivery);
            delivered += 1;
        }
        deliveries_total().increment(delivered);
    }

    /// Several messages, in order (see [`RoomStream::flush`]).
    fn send_run(&mut self, run: &[Message]) {
        let mut senders: Vec<u64> = run.iter().map(|m| id_hash(&m.sender)).collect();
        senders.sort_unstable();
        senders.dedup();
        let deliveries: Vec<&Arc<Delivery>> = run.iter().map(|m| &m.delivery).collect();
        let mut frames = None;
        let mut delivered = 0u64;
        for i in 0..self.members.len() {
            if let Some(next) = self.members.get(i + 1) {
                crate::prefetch::handle(&next.conn);
            }
            let member = &mut self.members[i];
            // A hash match may be a collision: such a member takes the careful path.
            if member.covered.is_none() && senders.binary_search(&member.id).is_err() {
                let frames = frames.get_or_insert_with(|| joined_frames(&deliveries));
                member.conn.deliver_messages(&deliveries, frames);
                delivered += deliveries.len() as u64;
                continue;
            }
            for message in run {
                if *member.conn.client_id == *message.sender || !member.owed(&message.delivery) {
                    continue;
                }
                member.conn.deliver_message(&message.delivery);
                delivered += 1;
            }
        }
        deliveries_total().increment(delivered);
    }
}
