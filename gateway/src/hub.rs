//! The registry of this gateway's connections and of the rooms they joined, and the fan-out of
//! broker payloads to them.
//!
//! Rooms are spread over shards, each behind its own mutex, so deliveries to different rooms
//! do not contend. A broadcast is serialized once (by the room-service) and every recipient's
//! queue gets a reference-counted clone of the same bytes: no per-delivery allocation of the
//! frame. Order within a room is the [`RoomStream`]'s business; the hub only finds the room.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use roomcast_common::broker::BrokerEvent;
use roomcast_common::envelope::{self, Control, Envelope};
use tokio::sync::mpsc;

use roomcast_common::close_code::CloseCode;

use crate::burst::Bursts;
use crate::outbound::{ConnHandle, Delivery, RoomEvent, ServerCommand};
use crate::room_stream::{Filled, Message, Repair, RoomStream};
use crate::socket;

const SHARDS: usize = 32;

type Rooms = HashMap<Arc<str>, RoomStream>;

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
    /// Whether the fan-out is behind (see [`crate::burst`]).
    bursts: Bursts,
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

    /// Hands one broker event to the rooms (or, for control commands, the connections) it is for.
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
                self.fan_out(room, |stream, direct| {
                    let message = Message {
                        delivery: Arc::new(Delivery {
                            room: stream.name().clone(),
                            epoch: stream.epoch_of(&epoch),
                            offset,
                            wire: socket::text(&frame),
                            direct,
                        }),
                        sender,
                    };
                    let repair = stream.accept(message);
                    self.repair(stream.name(), repair);
                });
            }
            Envelope::Event { exclude, frame } => {
                let Some(room) = envelope::room_of_channel(&channel) else {
                    return;
                };
                if std::str::from_utf8(&frame).is_err() {
                    return;
                }
                self.fan_out(room, |stream, direct| {
                    let event = Arc::new(RoomEvent {
                        room: stream.name().clone(),
                        wire: socket::text(&frame),
                        direct,
                    });
                    stream.event(&exclude, &event);
                });
            }
        }
    }

    /// Runs `deliver` on `room`'s stream, if the room has local members, with whether the
    /// payload may be written directly (the room's first of a burst, [`crate::burst`]).
    fn fan_out(&self, room: &str, deliver: impl FnOnce(&mut RoomStream, bool)) {
        let mut shard = self.shard(room);
        let Some(stream) = shard.get_mut(room) else {
            return;
        };
        let direct = stream.direct_in(self.bursts.begin());
        deliver(stream, direct);
        drop(shard);
        self.bursts.end();
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

    fn direct(item: Outbound) -> bool {
        match item {
            Outbound::Message(d) => d.direct,
            Outbound::Event(e) => e.direct,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn payloads_back_to_back_leave_all_but_a_rooms_first_to_the_writers() {
        let (mut hub, _repairs) = Hub::new();
        let gap = std::time::Duration::from_millis(300);
        hub.bursts = Bursts::with_gap(gap);
        let (a, ra) = conn("a", "u", 8);
        let (b, rb) = conn("b", "u", 8);
        hub.add_member("r", a);
        hub.add_member("other", b);
        hub.joined("r", "-", "e", 0);
        hub.joined("other", "-", "e", 0);
        // One burst: "r" twice, an event of "r", then "other" once.
        hub.dispatch(message("r", 1, "x"));
        hub.dispatch(message("r", 2, "x"));
        hub.dispatch(BrokerEvent::Message {
            channel: room_channel("r").into(),
            payload: encode_event("-", "{\"type\":\"member_joined\"}"),
        });
        hub.dispatch(message("other", 1, "x"));
        assert!(direct(ra.try_recv().unwrap()), "a room's first of a burst");
        assert!(!direct(ra.try_recv().unwrap()), "the rest is the writer's");
        assert!(!direct(ra.try_recv().unwrap()), "events too");
        assert!(direct(rb.try_recv().unwrap()), "another room's first");
        // After a pause, a new burst.
        std::thread::sleep(gap + gap / 2);
        hub.dispatch(message("r", 3, "x"));
        assert!(direct(ra.try_recv().unwrap()));
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
        assert_eq!(a.close_reason.get().unwrap().0, CloseCode::SLOW_CONSUMER);
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
        assert_eq!(a.close_reason.get().unwrap().0, CloseCode::SLOW_CONSUMER);
    }
}
