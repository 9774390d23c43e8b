//! The room state store: offsets, epochs, history, membership and gateway leases.
//!
//! One trait, [`Store`], with two implementations: [`MemoryStore`] (standalone mode, one
//! process, paired with a `MemoryBroker`) and [`RedisStore`] (a cluster of stateless
//! room-service instances). Both publish a room message in the same atomic step that assigns
//! its offset and appends it to history, so publish order on the broker is offset order.
//!
//! Callers validate room names (`roomcast_common::room::validate_room_name`) and client ids
//! before calling; the store trusts them.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use roomcast_common::broker::BrokerError;
use roomcast_common::namespace::{NamespaceOptions, Namespaces};

pub use self::memory::MemoryStore;
pub use self::redis::{Backend, RedisStore};

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

/// Why a store operation failed. Cheap to clone: a batch of publishes hands its one failure to
/// every caller in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer within the operation's bound; the caller may retry.
    #[error("store did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The backend is down or refusing work for now (connection lost, loading, failing
    /// over); the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] ::redis::RedisError),
    /// The broker that carries the broadcasts (NATS) is unreachable.
    #[error("broker unavailable: {0}")]
    Broker(#[source] Arc<BrokerError>),
    /// The store configuration is unusable (bad URL).
    #[error("invalid store configuration: {0}")]
    Config(#[source] ::redis::RedisError),
    /// The backend refused the operation; retrying will not help.
    #[error("store refused the operation: {0}")]
    Refused(#[source] ::redis::RedisError),
    /// The backend answered something this store does not understand.
    #[error("malformed store reply: {0}")]
    Malformed(String),
    /// A publish retried after a call whose outcome was lost, whose first try the room's
    /// history can no longer confirm or rule out: more than the history size was published
    /// in the room between the tries. Storing it could repeat it, so it is not.
    #[error(
        "cannot tell whether an earlier try of this publish was stored (more than the room's \
         history size was published since); not stored again"
    )]
    Unsure,
    /// A record could not be encoded for the backend.
    #[error("cannot encode a store record: {0}")]
    Encode(#[source] Arc<serde_json::Error>),
}

impl From<BrokerError> for StoreError {
    fn from(error: BrokerError) -> Self {
        StoreError::Broker(Arc::new(error))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(error: serde_json::Error) -> Self {
        StoreError::Encode(Arc::new(error))
    }
}

impl StoreError {
    /// Whether the same call may succeed later (the backend is down or slow, not wrong).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_) | StoreError::Unavailable(_) | StoreError::Broker(_)
        )
    }
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
    /// The key was never used before (the gateway's first try with a key of its own), so there
    /// is no earlier result to look up; the result is still kept for a retry.
    pub unused: bool,
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

/// The room state store, shared by every handler of a service as a [`SharedStore`].
///
/// Guarantees every implementation keeps:
/// - a publish assigns the room's next offset, appends the message to history and hands it to
///   the broker in one atomic step, so broadcast order is offset order;
/// - history is bounded by the room's [`HistoryLimits`] as seen by callers: never more than
///   `size` messages, none older than `ttl`;
/// - a room idle for `ttl` loses its epoch, offset and history together, and the next publish
///   or join starts a new epoch at offset 1.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The global history bounds (a namespace may override them: [`Store::limits_for`]).
    fn limits(&self) -> HistoryLimits;

    /// The namespaces (`NAMESPACES_FILE`) this store applies to its rooms.
    fn namespaces(&self) -> &Namespaces;

    /// The history bounds of `room`, from its namespace.
    fn limits_for(&self, room: &str) -> HistoryLimits {
        self.limits().for_namespace(self.namespaces().of(room))
    }

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Assigns the next offset, appends to history and broadcasts, atomically.
    /// `data_json` must be valid JSON.
    async fn publish(
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
    async fn publish_once(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        once: Option<Once<'_>>,
    ) -> Result<Published, StoreError>;

    /// Publishes `items`, each as [`Store::publish_once`] would, keeping their order within
    /// each room; all or nothing is known: an error means none of the results came back (some
    /// may be stored, which their idempotency keys make safe to retry).
    async fn publish_many(&self, items: &[PublishItem<'_>]) -> Result<Vec<Published>, StoreError>;

    /// Adds the member (announcing it when new) and, with `since`, recovers what was missed.
    async fn join(
        &self,
        room: &str,
        joiner: Joiner<'_>,
        since: Option<&Position>,
    ) -> Result<Joined, StoreError>;

    /// Removes the member, announcing it when it was there; returns whether it was.
    async fn leave(&self, room: &str, client_id: &str, user: &str) -> Result<bool, StoreError>;

    /// The room's members, sorted by user then client id. Members whose gateway's lease ran
    /// out are removed (and announced as left) on the way.
    async fn presence(&self, room: &str) -> Result<Vec<Member>, StoreError>;

    /// Messages with an offset above `since` (all held ones when `None`), oldest first, at most
    /// `limit` (clamped by [`HistoryLimits::clamp_limit`]).
    async fn history(
        &self,
        room: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, StoreError>;

    async fn room_stats(&self, room: &str) -> Result<RoomStats, StoreError>;

    /// Forgets the room's history: the next publish or join starts a new epoch, so a client
    /// recovering from the old one is told `recovered: false`. Members stay.
    async fn remove_history(&self, room: &str) -> Result<(), StoreError>;

    /// Rooms with members or history whose name starts with `prefix`, sorted, at most
    /// `limit`. An administrative call: the Redis store scans the keyspace.
    async fn rooms(&self, prefix: &str, limit: usize) -> Result<Vec<RoomSummary>, StoreError>;

    /// Counts a connection against `user`'s limit across the cluster: `Ok(count)` with it,
    /// `Err(count)` when `limit` (0: none) live connections already exist. Connections of
    /// gateways whose lease ran out do not count.
    async fn connection_opened(
        &self,
        user: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<Result<u64, u64>, StoreError>;

    /// [`Store::connection_opened`] for each of `openings`, one result each, in order. A store
    /// that can count many connections in one round trip does (a reconnect storm arrives in
    /// batches).
    async fn connections_opened(
        &self,
        openings: &[ConnectionOpening<'_>],
    ) -> Vec<Result<Result<u64, u64>, StoreError>> {
        let mut results = Vec::with_capacity(openings.len());
        for o in openings {
            results.push(
                self.connection_opened(o.user, o.client_id, o.gateway, o.limit)
                    .await,
            );
        }
        results
    }

    /// Stops counting `client_id` for `user`.
    async fn connection_closed(&self, user: &str, client_id: &str) -> Result<(), StoreError>;

    /// Records that `gateway_id` is alive with `connections` connections until `lease` passes.
    async fn gateway_heartbeat(
        &self,
        gateway_id: &str,
        connections: u64,
        lease: Duration,
        version: &str,
    ) -> Result<(), StoreError>;

    /// Removes the members of gateways whose lease ran out; returns how many gateways were
    /// swept.
    async fn sweep_dead_gateways(&self) -> Result<usize, StoreError>;

    /// Gateways whose lease has not run out, sorted by id.
    async fn gateways(&self) -> Result<Vec<GatewayInfo>, StoreError>;

    /// Publishes an encoded control envelope on the control channel.
    async fn publish_control(&self, payload: Bytes) -> Result<(), StoreError>;
}

/// A store shared by the services and background tasks of one process.
pub type SharedStore = Arc<dyn Store>;

/// One connection to count against its user's limit ([`Store::connections_opened`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionOpening<'a> {
    pub user: &'a str,
    pub client_id: &'a str,
    pub gateway: &'a str,
    /// 0: no limit.
    pub limit: u32,
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
