//! The registry of this gateway's connections and of the rooms they joined, and the fan-out of
//! broker payloads to them.
//!
//! Rooms are spread over shards, each behind its own mutex, so deliveries to different rooms
//! do not contend. A broadcast is serialized once (by the room-service) and every recipient's
//! queue gets a reference-counted clone of the same bytes: no per-delivery allocation of the
//! frame. Order within a room is the [`RoomStream`]'s business; the hub only finds the room.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

// Seeded per process, like std's, at a fraction of SipHash's cost per lookup: room names are the
// clients' choice and every broadcast looks its room up.
use foldhash::fast::RandomState;
use roomcast_common::broker::BrokerEvent;
use roomcast_common::close_code::CloseCode;
use roomcast_common::envelope::{self, Control, Envelope};
use tokio::sync::{Notify, mpsc};

use crate::outbound::{ConnHandle, Delivery, RoomEvent, ServerCommand};
use crate::room_stream::{Filled, Message, Repair, RoomStream};
use crate::socket;

const SHARDS: usize = 32;

/// Broker events the inbox holds at most while the fan-out task is busy (a few MB of small
/// payloads). Redis would disconnect a subscriber that lags much more than this anyway.
pub const MAX_INBOX: usize = 65_536;

type Rooms = HashMap<Arc<str>, RoomStream, RandomState>;

/// Work for the repair task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairRequest {
    /// Fetch a room's history after `since` and deliver it before what was held.
    Room { room: Arc<str>, since: u64 },
    /// The broker link was lost: the store may have lost its memberships too (a restarted
    /// Redis), so record every local membership again.
    Reregister,
}

#[derive(Default)]
pub struct Hub {
    shards: Vec<Mutex<Rooms>>,
    hasher: RandomState,
    repairs: Option<mpsc::UnboundedSender<RepairRequest>>,
    link_lost: AtomicBool,
    connections: Mutex<HashMap<Arc<str>, Arc<ConnHandle>>>,
    connection_count: AtomicUsize,
    /// Broker events waiting for the fan-out task ([`Hub::receive`]).
    inbox: Mutex<Vec<BrokerEvent>>,
    inbox_ready: Notify,
}

impl Hub {
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
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn repair(&self, room: &Arc<str>, repair: Option<Repair>) {
        if let (Some(Repair { since }), Some(repairs)) = (repair, &self.repairs) {
            let _ = repairs.send(RepairRequest::Room {
                room: room.clone(),
                since,
            });
        }
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

    pub fn connection(&self, client_id: &str) -> Option<Arc<ConnHandle>> {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.get(client_id).cloned()
    }

    pub fn all_connections(&self) -> Vec<Arc<ConnHandle>> {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.values().cloned().collect()
    }

    /// Adds `conn` to `room`'s members; returns the hub's shared name of the room.
    pub fn add_member(&self, room: &str, conn: Arc<ConnHandle>) -> Arc<str> {
        let mut shard = self.shard(room);
        if let Some(stream) = shard.get_mut(room) {
            stream.add(conn);
            return stream.name().clone();
        }
        let name: Arc<str> = Arc::from(room);
        shard.insert(name.clone(), RoomStream::new(name.clone(), conn));
        name
    }

    pub fn remove_member(&self, room: &str, client_id: &str) {
        let mut shard = self.shard(room);
        if let Some(stream) = shard.get_mut(room)
            && stream.remove(client_id)
        {
            shard.remove(room);
        }
    }

    pub fn member_count(&self, room: &str) -> usize {
        self.shard(room)
            .get(room)
            .map_or(0, RoomStream::member_count)
    }

    /// A member's join returned the room at `(epoch, offset)`: see [`RoomStream::joined`].
    pub fn joined(&self, room: &str, client_id: &str, epoch: &str, offset: u64) {
        let mut shard = self.shard(room);
        if let Some(stream) = shard.get_mut(room) {
            let repair = stream.joined(client_id, epoch, offset);
            self.repair(stream.name(), repair);
        }
    }

    /// The broker sink: takes an event from the broker's receiving task without doing the
    /// fan-out there. Payloads wait in the inbox for [`Hub::run_fan_out`], which takes
    /// everything that piled up at once, so a room's run of payloads from one broker read goes
    /// out to each member in one write. A lost link is noted at once.
    pub fn receive(&self, event: BrokerEvent) {
        if matches!(event, BrokerEvent::Disconnected) {
            self.dispatch(event);
            return;
        }
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.len() >= MAX_INBOX {
            // The fan-out is this far behind: drop, as a broker drops a subscriber that does not
            // read, and say so. Rooms see the gap at their next offset, or are checked against
            // history once the link check passes.
            drop(inbox);
            metrics::counter!("roomcast_gateway_broker_payloads_dropped_total").increment(1);
            if !self.link_lost.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    waiting = MAX_INBOX,
                    "fan-out behind: dropping broker payloads; rooms are repaired from history"
                );
            }
            return;
        }
        inbox.push(event);
        if inbox.len() == 1 {
            drop(inbox);
            self.inbox_ready.notify_one();
        }
    }

    /// The fan-out task: dispatches what [`Hub::receive`] collected, run by run, until the
    /// process ends.
    pub async fn run_fan_out(self: Arc<Self>) {
        let mut events = Vec::new();
        loop {
            self.inbox_ready.notified().await;
            std::mem::swap(
                &mut events,
                &mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()),
            );
            self.dispatch_all(events.drain(..));
        }
    }

    /// Hands one broker event to the rooms (or, for control commands, the connections) it is for.
    pub fn dispatch(&self, event: BrokerEvent) {
        self.dispatch_all(std::iter::once(event));
    }

    /// Hands broker events to the rooms or connections they are for. A room's payloads keep
    /// their order and go to its stream together, flushed once (see [`RoomStream::flush`]).
    pub fn dispatch_all(&self, events: impl Iterator<Item = BrokerEvent>) {
        let _clock = crate::ping::RunClock::start();
        // Rooms in order of their first payload, each with its payloads in order.
        let mut runs: Vec<(Arc<str>, Vec<Envelope>)> = Vec::new();
        let mut run_of: HashMap<Arc<str>, usize, RandomState> = HashMap::default();
        for event in events {
            let BrokerEvent::Message { channel, payload } = event else {
                tracing::warn!(
                    "broker link lost; rooms are checked against history once it is back"
                );
                self.link_lost.store(true, Ordering::Relaxed);
                continue;
            };
            let envelope = match envelope::decode(payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::warn!(%channel, %error, "dropping malformed broker payload");
                    continue;
                }
            };
            let payload = match envelope {
                Envelope::Control(control) => {
                    self.apply_control(control);
                    continue;
                }
                room_payload => room_payload,
            };
            let (Envelope::Message { frame, .. } | Envelope::Event { frame, .. }) = &payload else {
                continue;
            };
            if envelope::room_of_channel(&channel).is_none() {
                continue;
            }
            if std::str::from_utf8(frame).is_err() {
                tracing::warn!(%channel, "dropping non-utf-8 room frame");
                continue;
            }
            match run_of.get(&channel) {
                Some(&i) => runs[i].1.push(payload),
                None => {
                    run_of.insert(channel.clone(), runs.len());
                    runs.push((channel, vec![payload]));
                }
            }
        }
        for (channel, run) in runs {
            if let Some(room) = envelope::room_of_channel(&channel) {
                self.fan_out(room, run);
            }
        }
    }

    /// Gives `room`'s stream a run of payloads, if the room has local members, then flushes it.
    fn fan_out(&self, room: &str, run: Vec<Envelope>) {
        let mut shard = self.shard(room);
        let Some(stream) = shard.get_mut(room) else {
            return;
        };
        let mut repair = None;
        for payload in run {
            match payload {
                Envelope::Message {
                    offset,
                    epoch,
                    sender,
                    frame,
                } => {
                    let message = Message {
                        delivery: Arc::new(Delivery {
                            room: stream.name().clone(),
                            epoch: stream.epoch_of(&epoch),
                            offset,
                            wire: socket::text(&frame),
                            direct: true,
                        }),
                        sender,
                    };
                    repair = repair.or(stream.accept(message));
                }
                Envelope::Event { exclude, frame } => {
                    let event = Arc::new(RoomEvent {
                        room: stream.name().clone(),
                        wire: socket::text(&frame),
                        direct: true,
                    });
                    stream.event(&exclude, &event);
                }
                // `dispatch_all` applies these itself.
                Envelope::Control(_) => {}
            }
        }
        stream.flush();
        self.repair(stream.name(), repair);
    }

    /// Whether the broker link was lost since the last [`Hub::check_after_link_loss`].
    pub fn link_was_lost(&self) -> bool {
        self.link_lost.load(Ordering::Relaxed)
    }

    /// After a lost link is back: records memberships again and checks every room against
    /// history. Returns whether a loss was pending.
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
            for stream in shard.values_mut() {
                let repair = stream.check_after_link_loss();
                self.repair(stream.name(), repair);
            }
        }
        true
    }

    /// Every local membership: `(room, client id, user)`.
    pub fn memberships(&self) -> Vec<(Arc<str>, Arc<str>, Arc<str>)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for stream in shard.values() {
                for member in stream.members() {
                    all.push((
                        stream.name().clone(),
                        member.client_id.clone(),
                        member.user.clone(),
                    ));
                }
            }
        }
        all
    }

    /// The repair task's answer for `room`: see [`RoomStream::finish_repair`].
    pub fn finish_repair(&self, room: &str, filled: Option<Filled>) {
        let mut shard = self.shard(room);
        if let Some(stream) = shard.get_mut(room) {
            let repair = stream.finish_repair(filled);
            self.repair(stream.name(), repair);
        }
    }

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
            Control::Post {
                client_id,
                secret,
                user,
                frames,
            } => {
                if let Some(conn) = self.connection(&client_id)
                    && !conn.push_posted(secret, user, frames)
                {
                    tracing::debug!(client = %client_id, "posted frames dropped: too many waiting");
                    conn.close(CloseCode::SLOW_CONSUMER, "too many posted frames waiting");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Outbound;
    use bytes::Bytes;
    use roomcast_common::close_code::CloseCode;
    use roomcast_common::envelope::{encode_event, encode_message, room_channel};
    use tokio_tungstenite::tungstenite::Utf8Bytes;

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
        hub.joined("r", "-", "e", 0);
        hub.joined("other", "-", "e", 0);
        hub.dispatch(message("r", 1, "a"));
        assert!(ra.try_recv().is_none());
        match rb.try_recv().unwrap() {
            Outbound::Message(d) => assert_eq!((&*d.room, d.offset), ("r", 1)),
            other => panic!("{other:?}"),
        }
        assert!(rc.try_recv().is_none());
    }

    /// What a test connection has queued: `m<offset>` for a message of `room`, `e` for an event.
    fn queued(rx: &ConnHandle) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|item| match item {
                Outbound::Message(d) => format!("{}{}", d.room, d.offset),
                Outbound::Event(e) => format!("{}-event", e.room),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_run_of_payloads_keeps_its_order_and_skips_each_message_s_sender() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 16);
        let (b, rb) = conn("b", "u", 16);
        let (c, rc) = conn("c", "u", 16);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.add_member("s", c);
        hub.joined("r", "-", "e", 0);
        hub.joined("s", "-", "e", 0);
        hub.dispatch_all(
            [
                message("r", 1, "x"),
                message("r", 2, "a"),
                BrokerEvent::Message {
                    channel: room_channel("r").into(),
                    payload: encode_event("-", "{\"type\":\"member_joined\"}"),
                },
                message("s", 1, "x"),
                message("r", 3, "x"),
            ]
            .into_iter(),
        );
        assert_eq!(queued(&ra), ["r1", "r-event", "r3"], "a sent r2");
        assert_eq!(queued(&rb), ["r1", "r2", "r-event", "r3"]);
        assert_eq!(queued(&rc), ["s1"]);
    }

    #[test]
    fn a_run_skips_what_a_members_join_covered() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 16);
        let (b, rb) = conn("b", "u", 16);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.joined("r", "-", "e", 0);
        // a's join reply already held offsets 1 and 2.
        hub.joined("r", "a", "e", 2);
        hub.dispatch_all((1..=4).map(|offset| message("r", offset, "x")));
        assert_eq!(queued(&ra), ["r3", "r4"]);
        assert_eq!(queued(&rb), ["r1", "r2", "r3", "r4"]);
        // The mark is cleared: a later run goes to a whole.
        hub.dispatch_all((5..=6).map(|offset| message("r", offset, "x")));
        assert_eq!(queued(&ra), ["r5", "r6"]);
    }

    #[tokio::test]
    async fn received_payloads_reach_the_members_through_the_fan_out_task() {
        let (hub, _repairs) = Hub::new();
        let hub = Arc::new(hub);
        let (a, ra) = conn("a", "u", 64);
        hub.add_member("r", a);
        hub.joined("r", "-", "e", 0);
        for offset in 1..=3 {
            hub.receive(message("r", offset, "x"));
        }
        // A lost link is noted at once, not behind the payloads waiting.
        hub.receive(BrokerEvent::Disconnected);
        assert!(hub.link_was_lost());
        assert!(ra.try_recv().is_none(), "nothing is fanned out inline");
        tokio::spawn(hub.clone().run_fan_out());
        let mut got = Vec::new();
        for _ in 0..200 {
            got.extend(queued(&ra));
            if got.len() >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(got, ["r1", "r2", "r3"]);
        // Later payloads wake the task again.
        hub.receive(message("r", 4, "x"));
        for _ in 0..200 {
            got.extend(queued(&ra));
            if got.len() >= 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(got, ["r1", "r2", "r3", "r4"]);
    }

    #[test]
    fn a_full_inbox_drops_payloads_and_reports_a_lost_link() {
        let (hub, _repairs) = Hub::new();
        for offset in 0..MAX_INBOX as u64 {
            hub.receive(message("r", offset + 1, "x"));
        }
        assert!(!hub.link_was_lost());
        hub.receive(message("r", MAX_INBOX as u64 + 1, "x"));
        assert!(hub.link_was_lost(), "the drop is reported");
        let inbox = hub.inbox.lock().unwrap();
        assert_eq!(inbox.len(), MAX_INBOX, "the newest payload was dropped");
    }

    #[test]
    fn overflow_closes_with_4008() {
        let (hub, _repairs) = Hub::new();
        let (a, _ra) = conn("a", "u", 1);
        hub.add_member("r", a.clone());
        hub.joined("r", "-", "e", 0);
        hub.dispatch(message("r", 1, "x"));
        assert!(!a.is_closed());
        hub.dispatch(message("r", 2, "x"));
        assert!(a.is_closed());
        assert_eq!(a.close_reason().unwrap().0, CloseCode::SLOW_CONSUMER);
    }

    #[tokio::test]
    async fn replies_do_not_count_against_the_broadcast_limit() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 2);
        hub.add_member("r", a.clone());
        hub.joined("r", "-", "e", 0);
        // A returned publish batch: more replies than the broadcast capacity.
        let replies = vec![Utf8Bytes::from_static("published"); 20];
        a.reply_texts(replies, socket::text, 64);
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
        hub.joined("r", "-", "e", 0);
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
        hub.joined("r", "-", "e", 0);
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
        hub.joined("r", "-", "e", 4);
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
        hub.joined("r", "-", "e", 0);
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
        hub.joined("r", "-", "e", 0);
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
        hub.joined("r", "-", "e", 0);
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
        hub.joined("r", "-", "old", 8);
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
        hub.joined("r", "-", "old", 56);
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
        hub.joined("r", "-", "e", 3);
        hub.joined("quiet", "-", "e", 0);
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

    #[test]
    fn a_member_gets_nothing_its_join_reply_covered() {
        let (hub, _repairs) = Hub::new();
        let (a, ra) = conn("a", "u", 64);
        let (b, rb) = conn("b", "u", 64);
        hub.add_member("r", a);
        hub.joined("r", "a", "e", 3);
        // b's join returned offset 5 while 4 and 5 were still on their way here.
        hub.add_member("r", b);
        hub.joined("r", "b", "e", 5);
        for offset in 4..=7 {
            hub.dispatch(message_in("r", "e", offset));
        }
        let got = |rx| -> Vec<u64> { offsets(rx).into_iter().map(|(_, o)| o).collect() };
        assert_eq!(got(&ra), [4, 5, 6, 7]);
        assert_eq!(got(&rb), [6, 7]);
    }

    #[test]
    fn posted_frames_reach_their_connection_within_a_bound() {
        let (hub, _repairs) = Hub::new();
        let (a, _ra) = conn("a", "alice", 8);
        hub.add_connection(a.clone());
        let post = |n: usize| Control::Post {
            client_id: "a".into(),
            secret: "s".into(),
            user: "alice".into(),
            frames: vec!["{}".to_owned(); n],
        };
        hub.apply_control(post(3));
        hub.apply_control(post(crate::outbound::MAX_POSTED_WAITING - 3));
        assert!(!a.is_closed());
        let waiting = a.take_server_commands();
        assert_eq!(waiting.len(), 2);
        hub.apply_control(post(crate::outbound::MAX_POSTED_WAITING));
        hub.apply_control(post(1));
        assert!(a.is_closed(), "a flood of posts ends the connection");
        assert_eq!(a.close_reason().unwrap().0, CloseCode::SLOW_CONSUMER);
    }
}
