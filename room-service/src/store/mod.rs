//! The room state store: offsets, epochs, history, membership and gateway leases.
//!
//! Two implementations behind one enum: [`MemoryStore`] (standalone mode, one process, paired
//! with a [`MemoryBroker`]) and [`RedisStore`] (a cluster of stateless room-service instances).
//! Both publish a room message in the same atomic step that assigns its offset and appends it
//! to history, so publish order on the broker is offset order.
//!
//! Callers validate room names (`roomcast_common::room::validate_room_name`) and client ids
//! before calling; the store trusts them.

pub mod memory;
pub mod redis;

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use roomcast_common::broker::MemoryBroker;
use roomcast_common::namespace::{NamespaceOptions, Namespaces};

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// Per-room history bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most messages kept per room; 0 (only from a namespace) keeps none, and a join with
    /// `since` is then never recovered.
    pub size: usize,
    /// Messages older than this are neither returned nor kept; a room without publishes or
    /// joins for this long loses its history and gets a new epoch.
    pub ttl: Duration,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            size: 1000,
            ttl: Duration::from_secs(3600),
        }
    }
}

impl HistoryLimits {
    /// Clamps a requested page size: 0 and anything above the history size mean the size.
    pub fn clamp_limit(&self, limit: usize) -> usize {
        let size = self.size.max(1);
        if limit == 0 { size } else { limit.min(size) }
    }

    /// The bounds of a namespace's rooms: its own where it sets them, these otherwise. A
    /// namespace without history (size or age 0) gets size 0 and keeps this age as the
    /// lifetime of the room's epoch and offset.
    pub fn for_namespace(&self, options: &NamespaceOptions) -> HistoryLimits {
        if !options.keeps_history() {
            return HistoryLimits {
                size: 0,
                ttl: self.ttl,
            };
        }
        HistoryLimits {
            size: options.history_size.unwrap_or(self.size),
            ttl: options
                .history_ttl_seconds
                .map_or(self.ttl, Duration::from_secs),
        }
    }

    pub(crate) fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend is down, slow or refusing work for now; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store configuration is unusable (bad URL).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The backend answered something unexpected; retrying will not help.
    #[error("store error: {0}")]
    Internal(String),
}

/// Where a client stands in a room's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// A message as kept in history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub offset: u64,
    pub user: String,
    /// The sender's connection; empty for server publishes.
    pub client_id: String,
    /// Valid JSON, as published.
    pub data_json: String,
}

/// Makes a publish idempotent: the same `key` in the same room within `window` answers the
/// first publish's position and stores nothing.
#[derive(Debug, Clone, Copy)]
pub struct Once<'a> {
    /// Scoped by the caller (see `service::idempotency_scope`), at most a few hundred bytes.
    pub key: &'a str,
    pub window: Duration,
}

/// One publish of a batch ([`Store::publish_many`]).
#[derive(Debug, Clone, Copy)]
pub struct PublishItem<'a> {
    pub room: &'a str,
    pub user: &'a str,
    pub client_id: &'a str,
    /// Valid JSON.
    pub data_json: &'a str,
    pub once: Option<Once<'a>>,
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub epoch: String,
    pub offset: u64,
}

/// A page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub epoch: String,
    /// The room's latest offset.
    pub offset: u64,
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
}

/// The connection that joins a room.
#[derive(Debug, Clone, Copy)]
pub struct Joiner<'a> {
    pub client_id: &'a str,
    pub user: &'a str,
    /// The gateway holding the connection; its lease decides whether the member is still alive.
    pub gateway_id: &'a str,
}

/// The result of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub epoch: String,
    /// The room's latest offset at the time of the join.
    pub offset: u64,
    /// `Some` when a `since` position was given.
    pub recovered: Option<bool>,
    /// When recovered: every message after `since.offset`, oldest first.
    pub missed: Vec<StoredMessage>,
}

/// A member of a room, as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub user: String,
    pub client_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomStats {
    pub members: u64,
    /// Empty when the room holds no history state.
    pub epoch: String,
    pub offset: u64,
    pub history_len: u64,
}

/// A room that has members or history, as the server API lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RoomSummary {
    pub room: String,
    pub members: u64,
    /// The latest offset; 0 when the room holds no history state.
    pub offset: u64,
}

/// A gateway with a live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    pub gateway_id: String,
    pub connections: u64,
    /// Unix milliseconds of the last heartbeat.
    pub last_seen_ms: u64,
    /// As the gateway reported it; empty when it did not.
    pub version: String,
}

/// How long a gateway's record is kept after its lease ran out. Members whose gateway's lease
/// ran out are dropped from presence; the record must outlive them.
pub(crate) const GATEWAY_RECORD_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The room state store.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// An in-process store that publishes on `broker`.
    pub fn memory(broker: MemoryBroker, limits: HistoryLimits) -> Self {
        Store::Memory(MemoryStore::new(broker, limits))
    }

    /// A Redis store. Connects lazily: a Redis that is down now makes calls fail with
    /// [`StoreError::Unavailable`] until it is back.
    pub fn redis(url: &str, limits: HistoryLimits) -> Result<Self, StoreError> {
        RedisStore::new(url, limits).map(Store::Redis)
    }

    /// A Redis store on a client made beforehand (e.g. with TLS settings), broadcasting over
    /// NATS when `nats` is given.
    pub fn redis_from_client(
        client: ::redis::Client,
        limits: HistoryLimits,
        nats: Option<roomcast_common::broker::nats::NatsPublisher>,
    ) -> Result<Self, StoreError> {
        let store = RedisStore::from_client(client, limits)?;
        Ok(Store::Redis(match nats {
            Some(nats) => store.with_nats(nats),
            None => store,
        }))
    }

    /// State in Redis, broadcasts over NATS.
    pub fn redis_with_nats(
        url: &str,
        limits: HistoryLimits,
        nats: roomcast_common::broker::nats::NatsPublisher,
    ) -> Result<Self, StoreError> {
        RedisStore::new(url, limits).map(|store| Store::Redis(store.with_nats(nats)))
    }

    /// Applies `namespaces` (`NAMESPACES_FILE`) to this store's rooms: history bounds per
    /// namespace, member events off where the namespace says so.
    pub fn with_namespaces(self, namespaces: Arc<Namespaces>) -> Self {
        match self {
            Store::Memory(s) => Store::Memory(s.with_namespaces(namespaces)),
            Store::Redis(s) => Store::Redis(s.with_namespaces(namespaces)),
        }
    }

    /// The global history bounds (a namespace may override them: [`Store::limits_for`]).
    pub fn limits(&self) -> HistoryLimits {
        match self {
            Store::Memory(s) => s.limits(),
            Store::Redis(s) => s.limits(),
        }
    }

    pub fn namespaces(&self) -> &Namespaces {
        match self {
            Store::Memory(s) => &s.namespaces,
            Store::Redis(s) => &s.namespaces,
        }
    }

    /// The history bounds of `room`, from its namespace.
    pub fn limits_for(&self, room: &str) -> HistoryLimits {
        self.limits().for_namespace(self.namespaces().of(room))
    }

    /// Checks that the backend answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(s) => s.ping().await,
        }
    }

    /// Assigns the next offset, appends to history and broadcasts, atomically.
    /// `data_json` must be valid JSON.
    pub async fn publish(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
    ) -> Result<Published, StoreError> {
        self.publish_once(room, user, client_id, data_json, None)
            .await
    }

    /// [`Store::publish`], at most once per [`Once`] key when one is given.
    pub async fn publish_once(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        once: Option<Once<'_>>,
    ) -> Result<Published, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.publish(room, user, client_id, data_json, once)),
            Store::Redis(s) => s.publish_once(room, user, client_id, data_json, once).await,
        }
    }

    /// Publishes `items` in the order given, each as [`Store::publish_once`] would; all or
    /// nothing is known: an error means none of the results came back (some may be stored,
    /// which their idempotency keys make safe to retry).
    pub async fn publish_many(
        &self,
        items: &[PublishItem<'_>],
    ) -> Result<Vec<Published>, StoreError> {
        match self {
            Store::Memory(s) => Ok(items
                .iter()
                .map(|i| s.publish(i.room, i.user, i.client_id, i.data_json, i.once))
                .collect()),
            Store::Redis(s) => s.publish_many(items).await,
        }
    }

    /// Adds the member (announcing it when new) and, with `since`, recovers what was missed.
    pub async fn join(
        &self,
        room: &str,
        joiner: Joiner<'_>,
        since: Option<&Position>,
    ) -> Result<Joined, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.join(room, joiner, since)),
            Store::Redis(s) => s.join(room, joiner, since).await,
        }
    }

    /// Removes the member, announcing it when it was there; returns whether it was.
    pub async fn leave(&self, room: &str, client_id: &str, user: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.leave(room, client_id, user)),
            Store::Redis(s) => s.leave(room, client_id, user).await,
        }
    }

    /// The room's members, sorted by user then client id. Members whose gateway's lease ran
    /// out are removed (and announced as left) on the way.
    pub async fn presence(&self, room: &str) -> Result<Vec<Member>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.presence(room)),
            Store::Redis(s) => s.presence(room).await,
        }
    }

    /// Messages with an offset above `since` (all held ones when `None`), oldest first, at most
    /// `limit` (clamped by [`HistoryLimits::clamp_limit`]).
    pub async fn history(
        &self,
        room: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.history(room, since, limit)),
            Store::Redis(s) => s.history(room, since, limit).await,
        }
    }

    pub async fn room_stats(&self, room: &str) -> Result<RoomStats, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.room_stats(room)),
            Store::Redis(s) => s.room_stats(room).await,
        }
    }

    /// Forgets the room's history: the next publish or join starts a new epoch, so a client
    /// recovering from the old one is told `recovered: false`. Members stay.
    pub async fn remove_history(&self, room: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.remove_history(room);
                Ok(())
            }
            Store::Redis(s) => s.remove_history(room).await,
        }
    }

    /// Rooms with members or history whose name starts with `prefix`, sorted, at most
    /// `limit`. An administrative call: the Redis store scans the keyspace.
    pub async fn rooms(&self, prefix: &str, limit: usize) -> Result<Vec<RoomSummary>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.rooms(prefix, limit)),
            Store::Redis(s) => s.rooms(prefix, limit).await,
        }
    }

    /// Counts a connection against `user`'s limit across the cluster: `Ok(count)` with it,
    /// `Err(count)` when `limit` (0: none) live connections already exist.
    pub async fn connection_opened(
        &self,
        user: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<Result<u64, u64>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.connection_opened(user, client_id, gateway, limit)),
            Store::Redis(s) => s.connection_opened(user, client_id, gateway, limit).await,
        }
    }

    pub async fn connection_closed(&self, user: &str, client_id: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.connection_closed(user, client_id);
                Ok(())
            }
            Store::Redis(s) => s.connection_closed(user, client_id).await,
        }
    }

    /// Records that `gateway_id` is alive with `connections` connections until `lease` passes.
    pub async fn gateway_heartbeat(
        &self,
        gateway_id: &str,
        connections: u64,
        lease: Duration,
        version: &str,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.gateway_heartbeat(gateway_id, connections, lease, version);
                Ok(())
            }
            Store::Redis(s) => {
                s.gateway_heartbeat(gateway_id, connections, lease, version)
                    .await
            }
        }
    }

    /// Gateways whose lease has not run out, sorted by id.
    /// Removes the members of gateways whose lease ran out; returns how many gateways were
    /// swept. The memory store serves one in-process gateway and has nothing to sweep.
    pub async fn sweep_dead_gateways(&self) -> Result<usize, StoreError> {
        match self {
            Store::Memory(_) => Ok(0),
            Store::Redis(s) => s.sweep_dead_gateways().await,
        }
    }

    pub async fn gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        match self {
            Store::Memory(s) => Ok(s.gateways()),
            Store::Redis(s) => s.gateways().await,
        }
    }

    /// Publishes an encoded control envelope on the control channel.
    pub async fn publish_control(&self, payload: Bytes) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => {
                s.publish_control(payload);
                Ok(())
            }
            Store::Redis(s) => s.publish_control(payload).await,
        }
    }
}

/// A fresh random epoch: 16 hex digits, so two epochs of one room practically never collide.
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Applies the recovery rule: a join with `since` is recovered when `since` is in the current
/// epoch and `after` (the held messages with offsets above `since.offset`, oldest first) holds
/// every offset from `since.offset + 1` to `latest`.
pub(crate) fn recover(
    since: &Position,
    epoch: &str,
    latest: u64,
    after: Vec<StoredMessage>,
) -> (bool, Vec<StoredMessage>) {
    if since.epoch != epoch || since.offset > latest {
        return (false, Vec::new());
    }
    let missing = latest - since.offset;
    let contiguous = u64::try_from(after.len()) == Ok(missing)
        && after
            .iter()
            .zip(since.offset + 1..)
            .all(|(message, expected)| message.offset == expected);
    if contiguous {
        (true, after)
    } else {
        (false, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(offset: u64) -> StoredMessage {
        StoredMessage {
            offset,
            user: "u".into(),
            client_id: "c".into(),
            data_json: "1".into(),
        }
    }

    fn pos(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn recovery_needs_same_epoch_and_every_offset() {
        assert_eq!(recover(&pos("e", 5), "e", 5, vec![]), (true, vec![]));
        assert_eq!(
            recover(&pos("e", 3), "e", 5, vec![msg(4), msg(5)]),
            (true, vec![msg(4), msg(5)])
        );
        assert_eq!(
            recover(&pos("x", 3), "e", 5, vec![msg(4), msg(5)]),
            (false, vec![])
        );
        assert_eq!(recover(&pos("e", 3), "e", 5, vec![msg(5)]), (false, vec![]));
        assert_eq!(recover(&pos("e", 3), "e", 5, vec![msg(4)]), (false, vec![]));
        assert_eq!(recover(&pos("e", 9), "e", 5, vec![]), (false, vec![]));
    }

    #[test]
    fn namespace_limits() {
        let global = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(100),
        };
        assert_eq!(global.for_namespace(&NamespaceOptions::default()), global);
        let own = NamespaceOptions {
            history_size: Some(3),
            history_ttl_seconds: Some(5),
            ..Default::default()
        };
        assert_eq!(
            global.for_namespace(&own),
            HistoryLimits {
                size: 3,
                ttl: Duration::from_secs(5)
            }
        );
        for off in [
            NamespaceOptions {
                history_size: Some(0),
                ..Default::default()
            },
            NamespaceOptions {
                history_ttl_seconds: Some(0),
                ..Default::default()
            },
        ] {
            assert_eq!(
                global.for_namespace(&off),
                HistoryLimits {
                    size: 0,
                    ttl: global.ttl
                }
            );
        }
    }

    #[test]
    fn limits_clamp() {
        let limits = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(1),
        };
        assert_eq!(limits.clamp_limit(0), 10);
        assert_eq!(limits.clamp_limit(3), 3);
        assert_eq!(limits.clamp_limit(30), 10);
    }
}
