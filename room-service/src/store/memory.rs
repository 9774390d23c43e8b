//! In-process store for standalone mode. One mutex guards every room; a publish assigns the
//! offset, appends to history and hands the payload to the [`MemoryBroker`] while holding it,
//! so subscribers see each room's messages in offset order. The broker calls its sinks inline
//! and they must not block or call back into the store.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use roomcast_common::broker::MemoryBroker;
use roomcast_common::envelope::{CONTROL_CHANNEL, member_event, room_channel, room_message};
use roomcast_common::frame::MemberEvent;
use roomcast_common::namespace::Namespaces;

use super::{
    GATEWAY_RECORD_RETENTION, GatewayInfo, HistoryLimits, HistoryPage, Joined, Joiner, Member,
    Once, Position, Published, RoomStats, RoomSummary, StoredMessage, new_epoch, recover,
};

/// How often idle rooms and old gateway records are swept, at most.
const SWEEP_EVERY_MS: u64 = 60_000;

#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    broker: MemoryBroker,
    limits: HistoryLimits,
    pub(super) namespaces: Arc<Namespaces>,
    /// Added to the wall clock; lets tests age history without sleeping.
    clock_offset_ms: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    rooms: HashMap<String, Room>,
    gateways: HashMap<String, GatewayRecord>,
    /// user -> client id -> gateway id: connections counted against per-user limits.
    users: HashMap<String, HashMap<String, String>>,
    /// (room, idempotency key) -> the first publish's result and when the record expires.
    once: HashMap<(String, String), (Published, u64)>,
    /// Unix ms after which the next operation sweeps expired state.
    next_sweep_ms: u64,
}

#[derive(Default)]
struct Room {
    /// Offsets and history; `None` until first needed and after it expired.
    stream: Option<Stream>,
    /// client id -> member. Not expired with the stream: members leave explicitly, or drop
    /// out when their gateway's lease runs out.
    members: HashMap<String, MemberRecord>,
}

struct Stream {
    epoch: String,
    /// The latest offset.
    seq: u64,
    /// Oldest first; offsets are contiguous.
    entries: VecDeque<Entry>,
    /// Unix ms at which the whole stream is forgotten (history lost: a new epoch follows).
    expires_at_ms: u64,
}

struct Entry {
    message: StoredMessage,
    /// Unix ms of the publish.
    at_ms: u64,
}

struct MemberRecord {
    user: String,
    gateway_id: String,
}

struct GatewayRecord {
    connections: u64,
    last_seen_ms: u64,
    version: String,
    lease_until_ms: u64,
}

impl Stream {
    fn new(now: u64, limits: &HistoryLimits) -> Self {
        Stream {
            epoch: new_epoch(),
            seq: 0,
            entries: VecDeque::new(),
            expires_at_ms: now.saturating_add(limits.ttl_ms()),
        }
    }

    /// Drops entries beyond the count bound and entries older than the age bound.
    fn trim(&mut self, now: u64, limits: &HistoryLimits) {
        while self.entries.len() > limits.size {
            self.entries.pop_front();
        }
        let ttl = limits.ttl_ms();
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_sub(e.at_ms) >= ttl)
        {
            self.entries.pop_front();
        }
    }

    fn after(&self, since: u64) -> impl Iterator<Item = &StoredMessage> {
        // Offsets are contiguous, so the start is found by arithmetic.
        let first = self.entries.front().map_or(0, |e| e.message.offset);
        let skip = since.saturating_add(1).saturating_sub(first);
        self.entries
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(|e| &e.message)
    }
}

/// The room's live stream, created (with a new epoch) when missing or expired; `refresh`
/// extends its life as a publish or join does.
fn live_stream<'a>(
    slot: &'a mut Option<Stream>,
    now: u64,
    limits: &HistoryLimits,
    refresh: bool,
) -> &'a mut Stream {
    if slot.as_ref().is_none_or(|s| now >= s.expires_at_ms) {
        *slot = None;
    }
    let stream = slot.get_or_insert_with(|| Stream::new(now, limits));
    if refresh {
        stream.expires_at_ms = now.saturating_add(limits.ttl_ms());
    }
    stream.trim(now, limits);
    stream
}

fn gateway_alive(gateways: &HashMap<String, GatewayRecord>, gateway_id: &str, now: u64) -> bool {
    // A gateway that never sent a heartbeat cannot be judged; its members are kept.
    gateways
        .get(gateway_id)
        .is_none_or(|g| g.lease_until_ms > now)
}

impl MemoryStore {
    pub fn new(broker: MemoryBroker, limits: HistoryLimits) -> Self {
        MemoryStore {
            state: Arc::default(),
            broker,
            limits,
            namespaces: Arc::default(),
            clock_offset_ms: Arc::default(),
        }
    }

    /// See `Store::with_namespaces`.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    /// The history bounds of `room`'s namespace.
    fn room_limits(&self, room: &str) -> HistoryLimits {
        self.limits.for_namespace(self.namespaces.of(room))
    }

    /// Whether joins and leaves in `room` are announced.
    fn announces(&self, room: &str) -> bool {
        self.namespaces.of(room).announces_members()
    }

    /// Moves this store's clock forward (tests of history age and leases).
    pub fn advance_clock(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.clock_offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        roomcast_common::unix_millis().saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    /// Locks the state, sweeping expired rooms and gateway records now and then.
    fn lock(&self, now: u64) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole store, so a poisoned lock is used as is.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now >= state.next_sweep_ms {
            state.next_sweep_ms = now.saturating_add(SWEEP_EVERY_MS.min(self.limits.ttl_ms()));
            state.rooms.retain(|_, room| {
                if room.stream.as_ref().is_some_and(|s| now >= s.expires_at_ms) {
                    room.stream = None;
                }
                room.stream.is_some() || !room.members.is_empty()
            });
            let retention = u64::try_from(GATEWAY_RECORD_RETENTION.as_millis()).unwrap_or(u64::MAX);
            state
                .gateways
                .retain(|_, g| g.lease_until_ms.saturating_add(retention) > now);
            state.once.retain(|_, (_, until)| *until > now);
        }
        state
    }

    pub fn publish(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        once: Option<Once<'_>>,
    ) -> Published {
        let now = self.now();
        let mut state = self.lock(now);
        let once_key = once.map(|o| ((room.to_owned(), o.key.to_owned()), o.window));
        if let Some((key, _)) = &once_key
            && let Some((published, until)) = state.once.get(key)
            && *until > now
        {
            return published.clone();
        }
        let limits = self.room_limits(room);
        let slot = &mut state.rooms.entry(room.to_owned()).or_default().stream;
        let stream = live_stream(slot, now, &limits, true);
        stream.seq += 1;
        let offset = stream.seq;
        stream.entries.push_back(Entry {
            message: StoredMessage {
                offset,
                user: user.to_owned(),
                client_id: client_id.to_owned(),
                data_json: data_json.to_owned(),
            },
            at_ms: now,
        });
        stream.trim(now, &limits);
        let epoch = stream.epoch.clone();
        // Still under the lock: publish order is offset order.
        self.broker.publish(
            &room_channel(room),
            room_message(room, offset, &epoch, user, client_id, data_json),
        );
        let published = Published { epoch, offset };
        if let Some((key, window)) = once_key {
            let until = now.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
            state.once.insert(key, (published.clone(), until));
        }
        published
    }

    pub fn join(&self, room: &str, joiner: Joiner<'_>, since: Option<&Position>) -> Joined {
        let now = self.now();
        let mut state = self.lock(now);
        let limits = self.room_limits(room);
        let entry = state.rooms.entry(room.to_owned()).or_default();
        let stream = live_stream(&mut entry.stream, now, &limits, true);
        let epoch = stream.epoch.clone();
        let latest = stream.seq;
        let (recovered, missed) = match since {
            // Without history nothing is recovered, even when nothing was missed.
            Some(_) if limits.size == 0 => (Some(false), Vec::new()),
            Some(since) => {
                let after = if since.epoch == epoch {
                    stream.after(since.offset).cloned().collect()
                } else {
                    Vec::new()
                };
                let (recovered, missed) = recover(since, &epoch, latest, after);
                (Some(recovered), missed)
            }
            None => (None, Vec::new()),
        };
        let record = MemberRecord {
            user: joiner.user.to_owned(),
            gateway_id: joiner.gateway_id.to_owned(),
        };
        if entry
            .members
            .insert(joiner.client_id.to_owned(), record)
            .is_none()
            && self.announces(room)
        {
            self.broker.publish(
                &room_channel(room),
                member_event(MemberEvent::Joined, room, joiner.user, joiner.client_id),
            );
        }
        Joined {
            epoch,
            offset: latest,
            recovered,
            missed,
        }
    }

    pub fn leave(&self, room: &str, client_id: &str, user: &str) -> bool {
        let now = self.now();
        let mut state = self.lock(now);
        let Some(entry) = state.rooms.get_mut(room) else {
            return false;
        };
        let removed = entry.members.remove(client_id).is_some();
        if removed && self.announces(room) {
            self.broker.publish(
                &room_channel(room),
                member_event(MemberEvent::Left, room, user, client_id),
            );
        }
        removed
    }

    pub fn presence(&self, room: &str) -> Vec<Member> {
        let now = self.now();
        let mut state = self.lock(now);
        let State {
            rooms, gateways, ..
        } = &mut *state;
        let Some(entry) = rooms.get_mut(room) else {
            return Vec::new();
        };
        let announces = self.announces(room);
        let mut members = Vec::with_capacity(entry.members.len());
        entry.members.retain(|client_id, record| {
            if gateway_alive(gateways, &record.gateway_id, now) {
                members.push(Member {
                    user: record.user.clone(),
                    client_id: client_id.clone(),
                });
                true
            } else {
                if announces {
                    self.broker.publish(
                        &room_channel(room),
                        member_event(MemberEvent::Left, room, &record.user, client_id),
                    );
                }
                false
            }
        });
        members.sort();
        members
    }

    pub fn history(&self, room: &str, since: Option<u64>, limit: usize) -> HistoryPage {
        let now = self.now();
        let limits = self.room_limits(room);
        let limit = limits.clamp_limit(limit);
        let mut state = self.lock(now);
        let slot = &mut state.rooms.entry(room.to_owned()).or_default().stream;
        let stream = live_stream(slot, now, &limits, false);
        let messages = match since {
            Some(since) => stream.after(since).take(limit).cloned().collect(),
            None => stream
                .entries
                .iter()
                .take(limit)
                .map(|e| e.message.clone())
                .collect(),
        };
        HistoryPage {
            epoch: stream.epoch.clone(),
            offset: stream.seq,
            messages,
        }
    }

    pub fn remove_history(&self, room: &str) {
        let now = self.now();
        let mut state = self.lock(now);
        if let Some(entry) = state.rooms.get_mut(room) {
            entry.stream = None;
        }
    }

    pub fn rooms(&self, prefix: &str, limit: usize) -> Vec<RoomSummary> {
        let now = self.now();
        let state = self.lock(now);
        let mut rooms: Vec<RoomSummary> = state
            .rooms
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .filter_map(|(name, room)| {
                let offset = room
                    .stream
                    .as_ref()
                    .filter(|s| now < s.expires_at_ms)
                    .map(|s| s.seq);
                let members = u64::try_from(room.members.len()).unwrap_or(u64::MAX);
                (members > 0 || offset.is_some()).then(|| RoomSummary {
                    room: name.clone(),
                    members,
                    offset: offset.unwrap_or(0),
                })
            })
            .collect();
        rooms.sort();
        rooms.truncate(limit);
        rooms
    }

    pub fn room_stats(&self, room: &str) -> RoomStats {
        let members = u64::try_from(self.presence(room).len()).unwrap_or(u64::MAX);
        let now = self.now();
        let limits = self.room_limits(room);
        let mut state = self.lock(now);
        let stream = state
            .rooms
            .get_mut(room)
            .and_then(|r| r.stream.as_mut())
            .filter(|s| now < s.expires_at_ms);
        match stream {
            Some(stream) => {
                stream.trim(now, &limits);
                RoomStats {
                    members,
                    epoch: stream.epoch.clone(),
                    offset: stream.seq,
                    history_len: u64::try_from(stream.entries.len()).unwrap_or(u64::MAX),
                }
            }
            None => RoomStats {
                members,
                epoch: String::new(),
                offset: 0,
                history_len: 0,
            },
        }
    }

    /// See `RedisStore::connection_opened`.
    pub fn connection_opened(
        &self,
        user: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<u64, u64> {
        let now = self.now();
        let mut state = self.lock(now);
        let State {
            users, gateways, ..
        } = &mut *state;
        let held = users.entry(user.to_owned()).or_default();
        if !held.contains_key(client_id) {
            held.retain(|_, g| gateway_alive(gateways, g, now));
            if limit > 0 && held.len() >= limit as usize {
                return Err(held.len() as u64);
            }
            held.insert(client_id.to_owned(), gateway.to_owned());
        }
        Ok(held.len() as u64)
    }

    pub fn connection_closed(&self, user: &str, client_id: &str) {
        let now = self.now();
        let mut state = self.lock(now);
        if let Some(held) = state.users.get_mut(user) {
            held.remove(client_id);
            if held.is_empty() {
                state.users.remove(user);
            }
        }
    }

    pub fn gateway_heartbeat(
        &self,
        gateway_id: &str,
        connections: u64,
        lease: Duration,
        version: &str,
    ) {
        let now = self.now();
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let mut state = self.lock(now);
        state.gateways.insert(
            gateway_id.to_owned(),
            GatewayRecord {
                connections,
                last_seen_ms: now,
                version: version.to_owned(),
                lease_until_ms: now.saturating_add(lease_ms),
            },
        );
    }

    pub fn gateways(&self) -> Vec<GatewayInfo> {
        let now = self.now();
        let state = self.lock(now);
        let mut gateways: Vec<_> = state
            .gateways
            .iter()
            .filter(|(_, g)| g.lease_until_ms > now)
            .map(|(id, g)| GatewayInfo {
                gateway_id: id.clone(),
                connections: g.connections,
                last_seen_ms: g.last_seen_ms,
                version: g.version.clone(),
            })
            .collect();
        gateways.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        gateways
    }

    pub fn publish_control(&self, payload: Bytes) {
        self.broker.publish(CONTROL_CHANNEL, payload);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use roomcast_common::broker::{BrokerEvent, Sink, Subscriber};
    use roomcast_common::envelope::{Envelope, decode};
    use roomcast_common::frame::message_frame;

    use super::*;

    fn store(size: usize, ttl_secs: u64) -> (MemoryStore, MemoryBroker) {
        let broker = MemoryBroker::new();
        let limits = HistoryLimits {
            size,
            ttl: Duration::from_secs(ttl_secs),
        };
        (MemoryStore::new(broker.clone(), limits), broker)
    }

    /// Subscribes to a channel and collects what arrives.
    async fn listen(
        broker: &MemoryBroker,
        channel: &str,
    ) -> (Box<dyn Subscriber>, Arc<StdMutex<Vec<Envelope>>>) {
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let seen2 = seen.clone();
        let sink: Sink = Arc::new(move |event| {
            if let BrokerEvent::Message { payload, .. } = event {
                seen2.lock().unwrap().push(decode(payload).unwrap());
            }
        });
        let subscriber: Box<dyn Subscriber> = Box::new(broker.subscriber(sink));
        subscriber.subscribe(channel).await.unwrap();
        (subscriber, seen)
    }

    fn joiner<'a>(client_id: &'a str, user: &'a str, gateway_id: &'a str) -> Joiner<'a> {
        Joiner {
            client_id,
            user,
            gateway_id,
        }
    }

    #[tokio::test]
    async fn offsets_are_contiguous_and_broadcast_in_order() {
        let (store, broker) = store(1000, 3600);
        let (_sub, seen) = listen(&broker, "rc:room:r").await;
        let first = store.publish("r", "alice", "c1", r#"{"n":1}"#, None);
        assert_eq!(first.offset, 1);
        for n in 2..=5 {
            let p = store.publish("r", "alice", "c1", &n.to_string(), None);
            assert_eq!(p.offset, n);
            assert_eq!(p.epoch, first.epoch);
        }
        assert_eq!(store.publish("other", "a", "c", "1", None).offset, 1);
        let seen = seen.lock().unwrap();
        let offsets: Vec<u64> = seen
            .iter()
            .map(|e| match e {
                Envelope::Message { offset, .. } => *offset,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        let Envelope::Message { sender, frame, .. } = &seen[0] else {
            unreachable!()
        };
        assert_eq!(sender, "c1");
        assert_eq!(
            frame.as_ref(),
            message_frame("r", 1, &first.epoch, "alice", "c1", r#"{"n":1}"#).as_bytes()
        );
    }

    #[test]
    fn history_is_bounded_by_count() {
        let (store, _) = store(3, 3600);
        for n in 1..=5 {
            store.publish("r", "u", "c", &n.to_string(), None);
        }
        let page = store.history("r", None, 0);
        assert_eq!(page.offset, 5);
        let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        let page = store.history("r", Some(3), 0);
        assert_eq!(
            page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![4, 5]
        );
        let page = store.history("r", Some(0), 1);
        assert_eq!(
            page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![3]
        );
        assert!(store.history("r", Some(u64::MAX), 0).messages.is_empty());
        assert_eq!(page.messages[0].data_json, "3");
    }

    #[test]
    fn history_is_bounded_by_age_and_expires_with_a_new_epoch() {
        let (store, _) = store(100, 10);
        let first = store.publish("r", "u", "c", "1", None);
        store.advance_clock(Duration::from_secs(6));
        store.publish("r", "u", "c", "2", None);
        store.advance_clock(Duration::from_secs(6));
        // Message 1 is 12 s old, message 2 is 6 s old.
        let page = store.history("r", None, 0);
        assert_eq!(page.epoch, first.epoch);
        assert_eq!(page.offset, 2);
        assert_eq!(
            page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![2]
        );
        // Idle for longer than the TTL: the history is gone and offsets restart.
        store.advance_clock(Duration::from_secs(11));
        let page = store.history("r", None, 0);
        assert_ne!(page.epoch, first.epoch);
        assert_eq!(page.offset, 0);
        assert!(page.messages.is_empty());
        let next = store.publish("r", "u", "c", "3", None);
        assert_eq!(next.offset, 1);
        assert_eq!(next.epoch, page.epoch);
    }

    #[test]
    fn join_recovers_only_what_history_still_holds() {
        let (store, _) = store(3, 3600);
        let j = joiner("c1", "alice", "gw1");
        let joined = store.join("r", j, None);
        assert_eq!((joined.offset, joined.recovered), (0, None));
        for n in 1..=2 {
            store.publish("r", "bob", "c2", &n.to_string(), None);
        }
        let epoch = joined.epoch.clone();
        // Nothing missed.
        let at = |offset| Position {
            epoch: epoch.clone(),
            offset,
        };
        let r = store.join("r", j, Some(&at(2)));
        assert_eq!((r.recovered, r.missed.len(), r.offset), (Some(true), 0, 2));
        // Missed 1 and 2.
        let r = store.join("r", j, Some(&at(0)));
        assert_eq!(r.recovered, Some(true));
        assert_eq!(
            r.missed.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // History holds 3..=5 only: offset 2 is gone.
        for n in 3..=5 {
            store.publish("r", "bob", "c2", &n.to_string(), None);
        }
        let r = store.join("r", j, Some(&at(1)));
        assert_eq!((r.recovered, r.missed.len()), (Some(false), 0));
        let r = store.join("r", j, Some(&at(2)));
        assert_eq!(r.recovered, Some(true));
        assert_eq!(
            r.missed.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        // Another epoch, or an offset from the future.
        let r = store.join(
            "r",
            j,
            Some(&Position {
                epoch: "nope".into(),
                offset: 5,
            }),
        );
        assert_eq!(r.recovered, Some(false));
        let r = store.join("r", j, Some(&at(9)));
        assert_eq!(r.recovered, Some(false));
    }

    #[test]
    fn recovery_fails_after_the_history_expired() {
        let (store, _) = store(100, 10);
        let p = store.publish("r", "u", "c", "1", None);
        store.advance_clock(Duration::from_secs(11));
        let r = store.join(
            "r",
            joiner("c1", "u", "g"),
            Some(&Position {
                epoch: p.epoch.clone(),
                offset: 0,
            }),
        );
        assert_eq!(r.recovered, Some(false));
        assert_ne!(r.epoch, p.epoch);
        assert_eq!(r.offset, 0);
    }

    #[tokio::test]
    async fn presence_follows_joins_leaves_and_announces_them() {
        let (store, broker) = store(10, 3600);
        let (_sub, seen) = listen(&broker, "rc:room:r").await;
        store.join("r", joiner("c1", "alice", "gw1"), None);
        store.join("r", joiner("c2", "bob", "gw1"), None);
        // A second join of the same connection is not announced again.
        store.join("r", joiner("c2", "bob", "gw1"), None);
        assert_eq!(
            store.presence("r"),
            vec![
                Member {
                    user: "alice".into(),
                    client_id: "c1".into()
                },
                Member {
                    user: "bob".into(),
                    client_id: "c2".into()
                },
            ]
        );
        assert!(store.leave("r", "c1", "alice"));
        assert!(!store.leave("r", "c1", "alice"));
        assert!(!store.leave("nowhere", "c1", "alice"));
        assert_eq!(store.presence("r").len(), 1);
        assert_eq!(store.room_stats("r").members, 1);
        let events: Vec<(String, serde_json::Value)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                Envelope::Event { exclude, frame } => {
                    (exclude.clone(), serde_json::from_slice(frame).unwrap())
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].0, "c1");
        assert_eq!(events[0].1["type"], "member_joined");
        assert_eq!(events[0].1["room"], "r");
        assert_eq!(events[0].1["user"], "alice");
        assert_eq!(events[0].1["clientId"], "c1");
        assert_eq!(events[2].0, "c1");
        assert_eq!(events[2].1["type"], "member_left");
    }

    #[test]
    fn members_of_a_dead_gateway_drop_out() {
        let (store, _) = store(10, 3600);
        store.gateway_heartbeat("gw1", 1, Duration::from_secs(5), "");
        store.gateway_heartbeat("gw2", 2, Duration::from_secs(60), "");
        store.join("r", joiner("c1", "alice", "gw1"), None);
        store.join("r", joiner("c2", "bob", "gw2"), None);
        store.join("r", joiner("c3", "carol", "unknown-gw"), None);
        assert_eq!(store.presence("r").len(), 3);
        assert_eq!(store.gateways().len(), 2);
        store.advance_clock(Duration::from_secs(10));
        let users: Vec<String> = store.presence("r").into_iter().map(|m| m.user).collect();
        assert_eq!(users, vec!["bob", "carol"]);
        let gateways = store.gateways();
        assert_eq!(gateways.len(), 1);
        assert_eq!(
            (gateways[0].gateway_id.as_str(), gateways[0].connections),
            ("gw2", 2)
        );
    }

    #[tokio::test]
    async fn room_stats_and_control() {
        let (store, broker) = store(2, 3600);
        assert_eq!(
            store.room_stats("r"),
            RoomStats {
                members: 0,
                epoch: String::new(),
                offset: 0,
                history_len: 0
            }
        );
        let p = store.publish("r", "u", "c", "1", None);
        store.publish("r", "u", "c", "2", None);
        store.publish("r", "u", "c", "3", None);
        let stats = store.room_stats("r");
        assert_eq!(
            (stats.epoch, stats.offset, stats.history_len),
            (p.epoch, 3, 2)
        );
        let (_sub, seen) = listen(&broker, CONTROL_CHANNEL).await;
        store.publish_control(Bytes::from_static(
            b"C{\"op\":\"disconnect\",\"user\":\"u\",\"code\":1008,\"reason\":\"\"}",
        ));
        assert!(matches!(seen.lock().unwrap()[0], Envelope::Control(_)));
    }
}
