//! The registry of this gateway's connections and of the rooms they joined, and the fan-out of
//! broker payloads to them.
//!
//! Rooms are spread over shards, each behind its own mutex, so deliveries to different rooms
//! do not contend. A broadcast is serialized once (by the room-service) and every recipient's
//! queue gets a reference-counted clone of the same bytes: no per-delivery allocation of the
//! frame. Delivery never blocks: a full queue means a slow consumer, which is closed with 4008.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::ws::Utf8Bytes;
use roomcast_common::broker::BrokerEvent;
use roomcast_common::envelope::{self, Control, Envelope};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Close code for a connection whose outbound queue overflowed.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

const SHARDS: usize = 32;

/// What a connection's writer task receives.
#[derive(Debug)]
pub enum Outbound {
    /// A frame to send as is (replies, the `connected` frame).
    Frame(Utf8Bytes),
    /// A room message; the writer keeps each room's offsets increasing and drops duplicates.
    Message {
        room: Arc<str>,
        /// The room's epoch: offsets restart at 1 when it changes.
        epoch: Arc<str>,
        offset: u64,
        frame: Utf8Bytes,
    },
    /// A presence event of a room; like a message, held back until the room's join completes.
    Event { room: Arc<str>, frame: Utf8Bytes },
    /// A join began: hold the room's messages until [`Outbound::JoinDone`].
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

/// The shared face of one connection: what the hub and the control channel need to reach it.
pub struct ConnHandle {
    pub client_id: Arc<str>,
    pub user: Arc<str>,
    /// Bounded outbound queue, drained by the connection's writer task.
    tx: mpsc::Sender<Outbound>,
    /// Cancelled to end the connection; both of its tasks watch it.
    pub cancel: CancellationToken,
    /// Why it was closed, for the close frame; the first reason wins.
    pub close_reason: OnceLock<(u16, String)>,
}

impl ConnHandle {
    pub fn new(client_id: Arc<str>, user: Arc<str>, tx: mpsc::Sender<Outbound>) -> Self {
        Self {
            client_id,
            user,
            tx,
            cancel: CancellationToken::new(),
            close_reason: OnceLock::new(),
        }
    }

    /// Closes the connection with `code`; later calls keep the first reason.
    pub fn close(&self, code: u16, reason: &str) {
        let _ = self.close_reason.set((code, reason.to_owned()));
        self.cancel.cancel();
    }

    /// Queues without waiting; a full queue closes the connection as a slow consumer.
    pub fn deliver(&self, item: Outbound) {
        match self.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("roomcast_gateway_slow_consumers_total").increment(1);
                self.close(
                    CLOSE_SLOW_CONSUMER,
                    "slow consumer: outbound queue overflowed",
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a reply, waiting for room: replies are never dropped.
    pub async fn reply(&self, item: Outbound) {
        let _ = self.tx.send(item).await;
    }
}

type Rooms = HashMap<Arc<str>, Vec<Arc<ConnHandle>>>;

#[derive(Default)]
pub struct Hub {
    shards: Vec<Mutex<Rooms>>,
    hasher: RandomState,
    /// Every local connection by client id, for disconnect commands.
    connections: Mutex<HashMap<Arc<str>, Arc<ConnHandle>>>,
    connection_count: AtomicUsize,
}

impl Hub {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            ..Default::default()
        }
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
            if let Some(members) = shard.get_mut(room) {
                members.push(conn);
            }
            return name;
        }
        let name: Arc<str> = Arc::from(room);
        shard.insert(name.clone(), vec![conn]);
        name
    }

    /// Removes a connection from `room`.
    pub fn remove_member(&self, room: &str, client_id: &str) {
        let mut shard = self.shard(room);
        if let Some(members) = shard.get_mut(room) {
            members.retain(|m| &*m.client_id != client_id);
            if members.is_empty() {
                shard.remove(room);
            }
        }
    }

    /// Local members of `room` (for tests and stats).
    pub fn member_count(&self, room: &str) -> usize {
        self.shard(room).get(room).map_or(0, Vec::len)
    }

    /// Handles one broker event. Called inline by the broker: only non-blocking work here.
    pub fn dispatch(&self, event: BrokerEvent) {
        let BrokerEvent::Message { channel, payload } = event else {
            tracing::warn!("broker link lost; it reconnects and resubscribes by itself");
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
                let Ok(frame) = Utf8Bytes::try_from(frame) else {
                    tracing::warn!(%channel, "dropping non-utf-8 message frame");
                    return;
                };
                let shard = self.shard(room);
                let Some((name, members)) = shard.get_key_value(room) else {
                    return;
                };
                let epoch: Arc<str> = Arc::from(epoch);
                let mut delivered = 0u64;
                for member in members.iter().filter(|m| *m.client_id != *sender) {
                    member.deliver(Outbound::Message {
                        room: name.clone(),
                        epoch: epoch.clone(),
                        offset,
                        frame: frame.clone(),
                    });
                    delivered += 1;
                }
                metrics::counter!("roomcast_gateway_deliveries_total").increment(delivered);
            }
            Envelope::Event { exclude, frame } => {
                let Some(room) = envelope::room_of_channel(&channel) else {
                    return;
                };
                let Ok(frame) = Utf8Bytes::try_from(frame) else {
                    return;
                };
                let shard = self.shard(room);
                let Some((name, members)) = shard.get_key_value(room) else {
                    return;
                };
                for member in members.iter().filter(|m| *m.client_id != *exclude) {
                    member.deliver(Outbound::Event {
                        room: name.clone(),
                        frame: frame.clone(),
                    });
                }
            }
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use roomcast_common::envelope::{encode_event, encode_message, room_channel};

    fn conn(id: &str, user: &str, capacity: usize) -> (Arc<ConnHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Arc::new(ConnHandle::new(id.into(), user.into(), tx)), rx)
    }

    fn message(room: &str, offset: u64, sender: &str) -> BrokerEvent {
        BrokerEvent::Message {
            channel: room_channel(room).into(),
            payload: encode_message(offset, "e", sender, "{\"type\":\"message\"}"),
        }
    }

    #[test]
    fn delivers_to_members_except_the_sender() {
        let hub = Hub::new();
        let (a, mut ra) = conn("a", "u", 8);
        let (b, mut rb) = conn("b", "u", 8);
        let (c, mut rc) = conn("c", "u", 8);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.add_member("other", c);
        hub.dispatch(message("r", 1, "a"));
        assert!(ra.try_recv().is_err());
        match rb.try_recv().unwrap() {
            Outbound::Message { room, offset, .. } => assert_eq!((&*room, offset), ("r", 1)),
            other => panic!("{other:?}"),
        }
        assert!(rc.try_recv().is_err());
    }

    #[test]
    fn overflow_closes_with_4008() {
        let hub = Hub::new();
        let (a, _ra) = conn("a", "u", 1);
        hub.add_member("r", a.clone());
        hub.dispatch(message("r", 1, "x"));
        assert!(!a.cancel.is_cancelled());
        hub.dispatch(message("r", 2, "x"));
        assert!(a.cancel.is_cancelled());
        assert_eq!(a.close_reason.get().unwrap().0, CLOSE_SLOW_CONSUMER);
    }

    #[test]
    fn events_skip_the_excluded_client_and_removal_works() {
        let hub = Hub::new();
        let (a, mut ra) = conn("a", "u", 8);
        let (b, mut rb) = conn("b", "u", 8);
        hub.add_member("r", a);
        hub.add_member("r", b);
        hub.dispatch(BrokerEvent::Message {
            channel: room_channel("r").into(),
            payload: encode_event("a", "{}"),
        });
        assert!(ra.try_recv().is_err());
        assert!(matches!(rb.try_recv().unwrap(), Outbound::Event { .. }));
        hub.remove_member("r", "b");
        assert_eq!(hub.member_count("r"), 1);
        hub.remove_member("r", "a");
        assert_eq!(hub.member_count("r"), 0);
    }

    #[test]
    fn malformed_payloads_are_dropped() {
        let hub = Hub::new();
        let (a, mut ra) = conn("a", "u", 8);
        hub.add_member("r", a);
        for payload in [&b"garbage"[..], b"M1 x\n\xff\xfe"] {
            hub.dispatch(BrokerEvent::Message {
                channel: room_channel("r").into(),
                payload: Bytes::copy_from_slice(payload),
            });
        }
        assert!(ra.try_recv().is_err());
    }

    #[test]
    fn disconnect_control_closes_matching_connections() {
        let hub = Hub::new();
        let (a, _ra) = conn("a", "alice", 8);
        let (b, _rb) = conn("b", "bob", 8);
        hub.add_connection(a.clone());
        hub.add_connection(b.clone());
        hub.apply_control(Control::Disconnect {
            user: "alice".into(),
            client_id: String::new(),
            code: 1008,
            reason: "bye".into(),
        });
        assert!(a.cancel.is_cancelled());
        assert!(!b.cancel.is_cancelled());
        assert_eq!(hub.connection_count(), 2);
    }
}
