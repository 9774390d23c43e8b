//! Redis store. Every operation that must be atomic is one Lua script (see `prelude.lua`);
//! Redis runs scripts one at a time and pub/sub keeps publish order, so every subscriber sees a
//! room's messages in offset order even with many room-service instances publishing
//! concurrently. Publishes go in batches, one script call each (`batch.rs`).
//!
//! Key layout (a room's keys share the `{<room>}` hash tag, so they live in one slot):
//! - `rc:{<room>}:epoch` string: expires 1 to 1.25 × `HISTORY_TTL_SECONDS` after the room's
//!   last publish or join (a refresh gives it 1.25 TTL, and is skipped for a fifth of a TTL
//!   after one: `lifetimes.rs`); a missing epoch means the history is lost and a new epoch
//!   starts.
//! - `rc:{<room>}:seq` latest offset, `rc:{<room>}:hist` stream with ids `<offset>-0`, trimmed
//!   approximately by count (every read enforces the exact bounds): they outlive the epoch by
//!   at most half a TTL, so their expiry is checked only on a refresh and moved at most every
//!   half TTL.
//! - `rc:{<room>}:idem:<key>` the first result of an idempotent publish, for its window (not
//!   looked up on the gateway's first try with a key of its own, `Once::unused`, except on a
//!   cluster: `Backend::MAY_RESEND`). The gateway's keys in rooms with history have no such
//!   key: the history entry holds the try (fields `c`, `n`), and a retry looks for it there
//!   (`publish.lua`'s `find_try`): a SET and a key to expire less per client publish.
//! - `rc:{<room>}:members` hash client id -> `{"user":…,"gateway":…}`; no expiry: members
//!   leave explicitly or drop out when their gateway's lease runs out.
//! - `rc:gw:{<gateway>}:rooms` set of the rooms a gateway had members in, for the sweeper.
//! - `rc:{gateways}:info` hash gateway id -> `{"connections":…,"last_seen_ms":…}` and
//!   `rc:{gateways}:leases` sorted set gateway id -> lease expiry (unix ms).
//!
//! Requires Redis >= 6.2 (`GETEX`, `ZMSCORE`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use roomcast_common::broker::Publisher;
use roomcast_common::envelope::{CONTROL_CHANNEL, member_event, room_channel};
use roomcast_common::frame::{MemberEvent, message_frame_sender};
use roomcast_common::namespace::Namespaces;
use serde::{Deserialize, Serialize};

use super::{
    ConnectionOpening, GATEWAY_RECORD_RETENTION, GatewayInfo, HistoryLimits, HistoryPage, Joined,
    Joiner, Member, Once, Position, PublishItem, Published, RoomStats, RoomSummary, Store,
    StoreError, StoredMessage, new_epoch, recover,
};

/// Upper bound on one store operation, reconnection included: callers fail fast instead of
/// hanging while Redis is down.
const OP_TIMEOUT: Duration = Duration::from_millis(2500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

const GATEWAY_INFO_KEY: &str = "rc:{gateways}:info";
const GATEWAY_LEASES_KEY: &str = "rc:{gateways}:leases";

const PRELUDE: &str = include_str!("prelude.lua");

mod backend;
mod batch;
mod lifetimes;

pub use backend::Backend;
use batch::{Batcher, Message};

/// Rooms in which `gateway` has (or had) members; read by the sweeper when its lease expires.
fn gateway_rooms_key(gateway: &str) -> String {
    format!("rc:gw:{{{gateway}}}:rooms")
}

/// The connections of `user` across the cluster: hash client id -> gateway id.
fn user_connections_key(user: &str) -> String {
    format!("rc:user:{{{user}}}:conns")
}

/// Users with connections on `gateway`, for the sweeper.
fn gateway_users_key(gateway: &str) -> String {
    format!("rc:gw:{{{gateway}}}:users")
}

/// The room scripts, each with the prelude prepended.
struct Scripts {
    connect: Script,
    publish: Script,
    join: Script,
    leave: Script,
    history: Script,
    stats: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            connect: Script::new(include_str!("connect.lua")),
            publish: with_prelude(include_str!("publish.lua")),
            join: with_prelude(include_str!("join.lua")),
            leave: Script::new(include_str!("leave.lua")),
            history: with_prelude(include_str!("history.lua")),
            stats: with_prelude(include_str!("stats.lua")),
        }
    }
}

/// The try number of a gateway's retry key (`retry:<client id>:<n>`) made for `client_id`.
fn try_number(key: &str, client_id: &str) -> Option<u64> {
    let (client, n) = key
        .strip_prefix(roomcast_common::RETRY_KEY_PREFIX)?
        .rsplit_once(':')?;
    (client == client_id).then(|| n.parse().ok()).flatten()
}

/// The keys of one room.
struct RoomKeys {
    epoch: String,
    seq: String,
    hist: String,
    members: String,
}

impl RoomKeys {
    fn new(room: &str) -> Self {
        RoomKeys {
            epoch: format!("rc:{{{room}}}:epoch"),
            seq: format!("rc:{{{room}}}:seq"),
            hist: format!("rc:{{{room}}}:hist"),
            members: format!("rc:{{{room}}}:members"),
        }
    }
}

/// The value of a members hash field.
#[derive(Serialize, Deserialize)]
struct MemberRecord {
    user: String,
    gateway: String,
}

/// The value of a gateway info hash field.
#[derive(Serialize, Deserialize)]
struct GatewayRecord {
    connections: u64,
    last_seen_ms: u64,
    #[serde(default)]
    version: String,
}

/// The Redis store, on one Redis (the default `C`) or a Redis Cluster (`C` =
/// [`ClusterConnection`], [`RedisStore::cluster`]).
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    connection: C,
    /// Set when another broker (NATS) carries the broadcasts; otherwise the scripts publish
    /// on Redis itself.
    external: Option<Arc<dyn Publisher>>,
    /// The publish queue, started on first use (it needs the runtime).
    batcher: Arc<OnceLock<Batcher>>,
    /// Least time between two publish calls (`PUBLISH_BATCH_MS`).
    batch_interval: Duration,
    scripts: Arc<Scripts>,
    limits: HistoryLimits,
    namespaces: Arc<Namespaces>,
}

impl StoreError {
    /// Sorts a Redis error: transient (the connection, a failover, a busy or loading server)
    /// or not.
    fn from_redis(error: RedisError) -> Self {
        let transient = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.code() == Some("BUSY")
            || matches!(
                error.kind(),
                ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::AuthenticationFailed
                    | ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::ClusterDown
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::ReadOnly
                            // A slot moving (a failover, a migration) that the cluster
                            // connection did not follow within its retries.
                            | ServerErrorKind::Moved
                            | ServerErrorKind::Ask
                    )
            );
        if transient {
            StoreError::Unavailable(error)
        } else {
            StoreError::Refused(error)
        }
    }
}

fn flat_messages(flat: Vec<String>) -> Result<Vec<StoredMessage>, StoreError> {
    if !flat.len().is_multiple_of(4) {
        return Err(StoreError::Malformed("history reply".into()));
    }
    let mut messages = Vec::with_capacity(flat.len() / 4);
    let mut fields = flat.into_iter();
    while let (Some(offset), Some(user), Some(client_id), Some(data_json)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    {
        let offset = offset
            .parse()
            .map_err(|_| StoreError::Malformed(format!("offset {offset:?} in history")))?;
        messages.push(StoredMessage {
            offset,
            user,
            client_id,
            data_json,
        });
    }
    Ok(messages)
}

/// The offset after `since`, as the scripts take it; empty when there is none.
fn first_offset(since: u64) -> String {
    since
        .checked_add(1)
        .map(|first| first.to_string())
        .unwrap_or_default()
}

fn parse_offset(latest: &str) -> Result<u64, StoreError> {
    latest
        .parse()
        .map_err(|_| StoreError::Malformed(format!("offset {latest:?}")))
}

impl RedisStore<ConnectionManager> {
    /// Creates the store without connecting: the connection is made on first use and remade
    /// after failures, so the service can start before Redis and survive its restarts.
    pub fn new(url: &str, limits: HistoryLimits) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::Config)?;
        Self::from_client(client, limits)
    }

    /// [`RedisStore::new`] on a client made beforehand (`rediss://` with its own CA, say).
    pub fn from_client(client: redis::Client, limits: HistoryLimits) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(StoreError::Config)?;
        Ok(RedisStore::on(connection, limits))
    }
}

impl RedisStore<ClusterConnection> {
    /// A store on the Redis Cluster of `url` (`redis+cluster://host:port,host:port,…`, seed
    /// nodes). Connects in the background, like [`RedisStore::new`]: calls fail with a
    /// transient error until the cluster answers. Must be called on a Tokio runtime.
    pub fn cluster(url: &str, limits: HistoryLimits) -> Result<Self, StoreError> {
        let nodes = roomcast_common::broker::cluster::node_urls(url).ok_or_else(|| {
            StoreError::Config(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "not a redis+cluster:// URL with at least one node",
            )))
        })?;
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .max_retry_wait(500)
            .build()
            .map_err(StoreError::Config)?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        Ok(RedisStore::on(
            client.get_pending_async_connection_with_config(config),
            limits,
        ))
    }
}

impl<C: Backend> RedisStore<C> {
    fn on(connection: C, limits: HistoryLimits) -> Self {
        RedisStore {
            connection,
            external: None,
            batcher: Arc::default(),
            batch_interval: batch::DEFAULT_INTERVAL,
            scripts: Arc::new(Scripts::new()),
            limits,
            namespaces: Arc::default(),
        }
    }

    /// Applies `namespaces` (`NAMESPACES_FILE`) to this store's rooms: history bounds per
    /// namespace, member events off where the namespace says so.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    /// The channel a join or leave script announces the member on: none when the room's
    /// namespace has member events off, or when another broker carries the broadcasts.
    fn member_channel(&self, room: &str) -> String {
        if self.namespaces.of(room).announces_members() {
            self.script_channel(room)
        } else {
            String::new()
        }
    }

    /// Broadcasts a member event on the other broker (when there is one and the namespace
    /// announces). A failure loses only the live event.
    async fn announce_elsewhere(&self, room: &str, event: Bytes) {
        if let Some(external) = &self.external
            && self.namespaces.of(room).announces_members()
        {
            let channel = room_channel(room);
            if let Err(error) = external.publish(&channel, event).await {
                tracing::warn!(channel, %error, "member event not published on the broker");
            }
        }
    }

    /// Sets the least time between two publish calls (`PUBLISH_BATCH_MS`): publishes arriving
    /// meanwhile go together in the next call.
    pub fn with_batch_interval(mut self, interval: Duration) -> Self {
        self.batch_interval = interval;
        self
    }

    /// Broadcasts over another broker (NATS) instead of Redis pub/sub.
    pub fn with_broker(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.external = Some(publisher);
        self
    }

    /// The channel a script publishes on: none when another broker carries the broadcasts.
    fn script_channel(&self, room: &str) -> String {
        if self.external.is_some() {
            String::new()
        } else {
            C::room_channel(room)
        }
    }

    /// The command the scripts broadcast with.
    fn broadcast_command(&self) -> &'static str {
        C::BROADCAST
    }

    /// The publish queue, started on first use.
    fn batcher(&self) -> &Batcher {
        self.batcher.get_or_init(|| {
            Batcher::start(batch::Sender {
                connection: self.connection.clone(),
                scripts: self.scripts.clone(),
                external: self.external.clone(),
                interval: self.batch_interval,
                lifetimes: Default::default(),
            })
        })
    }

    /// Runs one command, bounded like every store operation.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        self.run(command.query_async(&mut connection)).await
    }

    /// Runs one Redis operation within [`OP_TIMEOUT`].
    async fn run<T>(&self, op: impl Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(result) => result.map_err(StoreError::from_redis),
            Err(_) => Err(StoreError::Timeout(OP_TIMEOUT)),
        }
    }

    /// `item` as the publish script takes it.
    fn encode(&self, item: &PublishItem<'_>) -> Result<Message, StoreError> {
        let keys = RoomKeys::new(item.room);
        let limits = self.limits_for(item.room);
        let mut message = Message {
            keys: vec![keys.epoch, keys.seq, keys.hist],
            ttl_ms: limits.ttl_ms(),
            size: limits.size,
            channel: self.script_channel(item.room),
            room_json: serde_json::to_string(item.room)?,
            client_id: item.client_id.to_owned(),
            user: item.user.to_owned(),
            data_json: item.data_json.to_owned(),
            sender: message_frame_sender(item.user, item.client_id),
            record_key: None,
            window_ms: None,
            key_unused: false,
            try_number: None,
            room: item.room.to_owned(),
        };
        if let Some(once) = item.once {
            let window_ms = u64::try_from(once.window.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            message.window_ms = Some(window_ms);
            // A client that may send a script call again by itself (a cluster's) could run a
            // first try twice: there every publish looks its record key up.
            message.key_unused = once.unused && !C::MAY_RESEND;
            // The history entry is the record when it surely outlives the retry window but for
            // trimming to size, which publish.lua detects.
            if limits.size > 0 && message.ttl_ms >= window_ms && !C::MAY_RESEND {
                message.try_number = try_number(once.key, item.client_id);
            }
            // A first try whose record is its history entry has no record key to look up or
            // write. The room's hash tag comes first, so the key lives in the room's slot.
            if !(message.try_number.is_some() && message.key_unused) {
                message.record_key = Some(format!("rc:{{{}}}:idem:{}", item.room, once.key));
            }
        }
        Ok(message)
    }

    /// The gateways among `members`' whose lease ran out. A gateway without a lease record
    /// never sent a heartbeat and cannot be judged.
    async fn dead_gateways(
        &self,
        members: &[(String, MemberRecord)],
    ) -> Result<Vec<String>, StoreError> {
        self.dead_among(members.iter().map(|(_, r)| r.gateway.as_str()).collect())
            .await
    }

    /// The gateways among `gateways` whose lease ran out.
    async fn dead_among(&self, mut gateways: Vec<&str>) -> Result<Vec<String>, StoreError> {
        gateways.sort_unstable();
        gateways.dedup();
        if gateways.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let leases: Vec<Option<f64>> = self
            .run(async {
                redis::cmd("ZMSCORE")
                    .arg(GATEWAY_LEASES_KEY)
                    .arg(&gateways)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let now = roomcast_common::unix_millis() as f64;
        Ok(gateways
            .into_iter()
            .zip(leases)
            .filter(|(_, lease)| lease.is_some_and(|until| until <= now))
            .map(|(gateway, _)| gateway.to_owned())
            .collect())
    }

    /// Runs `connect.lua`: the count with the connection, negative when refused.
    async fn count_connection(
        &self,
        key: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<i64, StoreError> {
        let opening = ConnectionOpening {
            user: "",
            client_id,
            gateway,
            limit,
        };
        let counts = self
            .count_connections(&[key.to_owned()], &[&opening])
            .await?;
        counts
            .first()
            .copied()
            .ok_or_else(|| StoreError::Malformed("connect reply".into()))
    }

    /// Runs `connect.lua` once for `openings` (whose `keys` share a slot on a cluster): per
    /// connection the count with it, negative when refused.
    async fn count_connections(
        &self,
        keys: &[String],
        openings: &[&ConnectionOpening<'_>],
    ) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.scripts.connect.prepare_invoke();
        invocation.arg(openings.len());
        for (key, o) in keys.iter().zip(openings) {
            invocation
                .key(key)
                .arg(o.client_id)
                .arg(o.gateway)
                .arg(o.limit);
        }
        let mut connection = self.connection.clone();
        let counts: Vec<i64> = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if counts.len() == openings.len() {
            Ok(counts)
        } else {
            Err(StoreError::Malformed("connect reply".into()))
        }
    }

    /// Stops counting `user`'s connections on `gateway` (a dead one).
    async fn forget_gateway_connections(
        &self,
        user: &str,
        gateway: &str,
    ) -> Result<(), StoreError> {
        let key = user_connections_key(user);
        let held: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
        let stale: Vec<&String> = held
            .iter()
            .filter(|(_, g)| g.as_str() == gateway)
            .map(|(client, _)| client)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(&stale)
                .query_async::<()>(&mut connection)
                .await
        })
        .await
    }
}

#[async_trait]
impl<C: Backend> Store for RedisStore<C> {
    fn limits(&self) -> HistoryLimits {
        self.limits
    }

    fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Checks Redis and, when it is the broker, NATS.
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(self.connection.ping()).await?;
        if let Some(external) = &self.external {
            external.ping().await?;
        }
        Ok(())
    }

    async fn publish_once(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        once: Option<Once<'_>>,
    ) -> Result<Published, StoreError> {
        let message = self.encode(&PublishItem {
            room,
            user,
            client_id,
            data_json,
            once,
        })?;
        let mut published = self.batcher().publish(vec![message]).await?;
        published
            .pop()
            .ok_or_else(|| StoreError::Malformed("publish reply: no result".into()))
    }

    /// Queues `items` together: they go out in order, in one script call or consecutive ones
    /// (a batch of other callers' publishes may carry them).
    async fn publish_many(&self, items: &[PublishItem<'_>]) -> Result<Vec<Published>, StoreError> {
        let messages = items
            .iter()
            .map(|item| self.encode(item))
            .collect::<Result<Vec<_>, _>>()?;
        self.batcher().publish(messages).await
    }

    async fn join(
        &self,
        room: &str,
        joiner: Joiner<'_>,
        since: Option<&Position>,
    ) -> Result<Joined, StoreError> {
        let keys = RoomKeys::new(room);
        let limits = self.limits_for(room);
        let record = serde_json::to_string(&MemberRecord {
            user: joiner.user.to_owned(),
            gateway: joiner.gateway_id.to_owned(),
        })?;
        let event = member_event(MemberEvent::Joined, room, joiner.user, joiner.client_id);
        // The first missed offset; none when `since.offset + 1` overflows (such a position
        // cannot be recovered).
        let (since_epoch, first_missed) = match since {
            Some(since) => (since.epoch.as_str(), first_offset(since.offset)),
            None => ("", String::new()),
        };
        let mut invocation = self.scripts.join.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .key(&keys.members)
            .arg(new_epoch())
            .arg(limits.ttl_ms())
            .arg(joiner.client_id)
            .arg(record)
            .arg(self.member_channel(room))
            .arg(event.as_ref())
            .arg(since_epoch)
            .arg(first_missed)
            .arg(limits.size)
            .arg(self.broadcast_command());
        let mut connection = self.connection.clone();
        let (epoch, latest, flat, new_member): (String, String, Vec<String>, i64) = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if new_member == 1 {
            self.announce_elsewhere(room, event.clone()).await;
        }
        // Index for the sweeper: the rooms this gateway has members in. A separate command,
        // since the index key lives outside the room's hash slot.
        let indexed: Result<(), StoreError> = self
            .query(
                redis::cmd("SADD")
                    .arg(gateway_rooms_key(joiner.gateway_id))
                    .arg(room),
            )
            .await;
        if let Err(error) = indexed {
            // Presence reads still find the member when its gateway dies; only the sweep
            // would miss it.
            tracing::warn!(room, %error, "gateway room index not updated");
        }
        let latest = parse_offset(&latest)?;
        let (recovered, missed) = match since {
            // Without history nothing is recovered, even when nothing was missed.
            Some(_) if limits.size == 0 => (Some(false), Vec::new()),
            Some(since) => {
                let (recovered, missed) = recover(since, &epoch, latest, flat_messages(flat)?);
                (Some(recovered), missed)
            }
            None => (None, Vec::new()),
        };
        Ok(Joined {
            epoch,
            offset: latest,
            recovered,
            missed,
        })
    }

    async fn leave(&self, room: &str, client_id: &str, user: &str) -> Result<bool, StoreError> {
        let keys = RoomKeys::new(room);
        let event = member_event(MemberEvent::Left, room, user, client_id);
        let mut invocation = self.scripts.leave.prepare_invoke();
        invocation
            .key(&keys.members)
            .arg(client_id)
            .arg(self.member_channel(room))
            .arg(event.as_ref())
            .arg(self.broadcast_command());
        let mut connection = self.connection.clone();
        let removed: i64 = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if removed == 1 {
            self.announce_elsewhere(room, event).await;
        }
        Ok(removed == 1)
    }

    async fn presence(&self, room: &str) -> Result<Vec<Member>, StoreError> {
        let keys = RoomKeys::new(room);
        let fields: HashMap<String, String> =
            self.query(redis::cmd("HGETALL").arg(&keys.members)).await?;
        let mut members: Vec<(String, MemberRecord)> = fields
            .into_iter()
            .filter_map(|(client_id, json)| match serde_json::from_str(&json) {
                Ok(record) => Some((client_id, record)),
                Err(error) => {
                    tracing::warn!(room, client_id, %error, "skipping malformed member record");
                    None
                }
            })
            .collect();
        let dead = self.dead_gateways(&members).await?;
        if !dead.is_empty() {
            let (gone, alive): (Vec<_>, Vec<_>) = members
                .into_iter()
                .partition(|(_, record)| dead.contains(&record.gateway));
            members = alive;
            for (client_id, record) in gone {
                self.leave(room, &client_id, &record.user).await?;
            }
        }
        let mut members: Vec<Member> = members
            .into_iter()
            .map(|(client_id, record)| Member {
                user: record.user,
                client_id,
            })
            .collect();
        members.sort();
        Ok(members)
    }

    async fn history(
        &self,
        room: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        let keys = RoomKeys::new(room);
        let first = match since {
            None => "1".to_owned(),
            Some(since) => first_offset(since),
        };
        let limits = self.limits_for(room);
        let mut invocation = self.scripts.history.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .arg(new_epoch())
            .arg(limits.ttl_ms())
            .arg(first)
            .arg(limits.clamp_limit(limit))
            .arg(limits.size);
        let mut connection = self.connection.clone();
        let (epoch, latest, flat): (String, String, Vec<String>) = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        Ok(HistoryPage {
            epoch,
            offset: parse_offset(&latest)?,
            messages: flat_messages(flat)?,
        })
    }

    async fn remove_history(&self, room: &str) -> Result<(), StoreError> {
        let keys = RoomKeys::new(room);
        self.query::<u64>(
            redis::cmd("DEL")
                .arg(&keys.epoch)
                .arg(&keys.seq)
                .arg(&keys.hist),
        )
        .await?;
        Ok(())
    }

    async fn rooms(&self, prefix: &str, limit: usize) -> Result<Vec<RoomSummary>, StoreError> {
        // Room names cannot hold glob characters (room name rules), so the prefix is literal.
        let mut names = std::collections::BTreeSet::new();
        // The epoch key lives exactly as long as the room's history state (offset and stream
        // may outlive it a little).
        for suffix in ["epoch", "members"] {
            let pattern = format!("rc:{{{prefix}*}}:{suffix}");
            let keys = self.run(self.connection.scan(&pattern)).await?;
            names.extend(keys.iter().filter_map(|key| {
                key.strip_prefix("rc:{")
                    .and_then(|rest| rest.rsplit_once("}:"))
                    .map(|(room, _)| room.to_owned())
            }));
        }
        let names: Vec<String> = names.into_iter().take(limit).collect();
        // One pipeline per room: a room's keys share a slot, rooms do not.
        let counts = names.iter().map(|room| {
            let keys = RoomKeys::new(room);
            let mut pipe = redis::pipe();
            pipe.cmd("HLEN")
                .arg(&keys.members)
                .cmd("GET")
                .arg(&keys.seq);
            let mut connection = self.connection.clone();
            async move {
                pipe.query_async::<(u64, Option<String>)>(&mut connection)
                    .await
            }
        });
        let counts = self.run(futures_util::future::try_join_all(counts)).await?;
        Ok(names
            .into_iter()
            .zip(counts)
            .map(|(room, (members, offset))| RoomSummary {
                room,
                members,
                offset: offset.and_then(|o| o.parse().ok()).unwrap_or(0),
            })
            .collect())
    }

    async fn room_stats(&self, room: &str) -> Result<RoomStats, StoreError> {
        let members = u64::try_from(self.presence(room).await?.len()).unwrap_or(u64::MAX);
        let keys = RoomKeys::new(room);
        let limits = self.limits_for(room);
        let mut invocation = self.scripts.stats.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .arg(limits.ttl_ms())
            .arg(limits.size);
        let mut connection = self.connection.clone();
        let (epoch, latest, history_len): (String, String, u64) = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        Ok(RoomStats {
            members,
            epoch,
            offset: parse_offset(&latest)?,
            history_len,
        })
    }

    async fn gateway_heartbeat(
        &self,
        gateway_id: &str,
        connections: u64,
        lease: Duration,
        version: &str,
    ) -> Result<(), StoreError> {
        let now = roomcast_common::unix_millis();
        let lease_until = now.saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let record = serde_json::to_string(&GatewayRecord {
            connections,
            last_seen_ms: now,
            version: version.to_owned(),
        })?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(GATEWAY_INFO_KEY)
            .arg(gateway_id)
            .arg(record)
            .ignore()
            .cmd("ZADD")
            .arg(GATEWAY_LEASES_KEY)
            .arg(lease_until)
            .arg(gateway_id)
            .ignore();
        let mut connection = self.connection.clone();
        self.run(async move { pipe.query_async::<()>(&mut connection).await })
            .await
    }

    /// Removes the members of every gateway whose lease ran out (announcing `member_left`),
    /// then marks the gateway swept (lease score 0) so the next sweep skips it. Safe to run
    /// on every instance at once: a member is removed, and announced, once.
    /// Counts `client_id` against `user`'s limit across the cluster: `Ok(count)` with it, or
    /// `Err(count)` inside when the user already holds `limit` live connections. Connections
    /// of gateways whose lease ran out are dropped before refusing.
    async fn connection_opened(
        &self,
        user: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<Result<u64, u64>, StoreError> {
        let key = user_connections_key(user);
        let mut count = self
            .count_connection(&key, client_id, gateway, limit)
            .await?;
        if count <= 0 {
            // Refused: drop what dead gateways left behind, then try once more.
            let held: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(&key)).await?;
            let dead = self
                .dead_among(held.values().map(String::as_str).collect())
                .await?;
            let stale: Vec<&String> = held
                .iter()
                .filter(|(_, gateway)| dead.contains(gateway))
                .map(|(client, _)| client)
                .collect();
            if stale.is_empty() {
                return Ok(Err(count.unsigned_abs()));
            }
            self.query::<()>(redis::cmd("HDEL").arg(&key).arg(&stale))
                .await?;
            count = self
                .count_connection(&key, client_id, gateway, limit)
                .await?;
            if count <= 0 {
                return Ok(Err(count.unsigned_abs()));
            }
        }
        let mut connection = self.connection.clone();
        let users = gateway_users_key(gateway);
        self.run(async move {
            redis::cmd("SADD")
                .arg(&users)
                .arg(user)
                .query_async::<()>(&mut connection)
                .await
        })
        .await?;
        Ok(Ok(count.unsigned_abs()))
    }

    /// One `connect.lua` call per hash slot (one on a single Redis) and one `SADD` per gateway
    /// for the whole batch; a refused connection takes [`Store::connection_opened`]'s way
    /// (dead gateways' connections dropped, then counted once more).
    async fn connections_opened(
        &self,
        openings: &[ConnectionOpening<'_>],
    ) -> Vec<Result<Result<u64, u64>, StoreError>> {
        if openings.is_empty() {
            return Vec::new();
        }
        let users: Vec<&str> = openings.iter().map(|o| o.user).collect();
        let groups = C::call_groups(&users);
        let calls = groups.iter().map(|group| {
            let keys: Vec<String> = group
                .iter()
                .map(|&i| user_connections_key(openings[i].user))
                .collect();
            let members: Vec<&ConnectionOpening<'_>> =
                group.iter().map(|&i| &openings[i]).collect();
            async move { self.count_connections(&keys, &members).await }
        });
        let replies = futures_util::future::join_all(calls).await;
        let mut counts: Vec<Result<i64, StoreError>> = openings
            .iter()
            .map(|_| Err(StoreError::Malformed("connect reply".into())))
            .collect();
        for (group, reply) in groups.iter().zip(replies) {
            match reply {
                Ok(values) => {
                    for (&i, count) in group.iter().zip(values) {
                        counts[i] = Ok(count);
                    }
                }
                Err(error) => {
                    for &i in group {
                        counts[i] = Err(error.clone());
                    }
                }
            }
        }
        // The counted connections' users, by gateway, for the sweeper.
        let mut by_gateway: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, count) in counts.iter().enumerate() {
            if matches!(count, Ok(c) if *c > 0) {
                by_gateway.entry(openings[i].gateway).or_default().push(i);
            }
        }
        let recorded = futures_util::future::join_all(by_gateway.iter().map(|(gateway, items)| {
            let mut command = redis::cmd("SADD");
            command.arg(gateway_users_key(gateway));
            for &i in items {
                command.arg(openings[i].user);
            }
            let mut connection = self.connection.clone();
            async move {
                self.run(async move { command.query_async::<()>(&mut connection).await })
                    .await
            }
        }))
        .await;
        for ((_, items), result) in by_gateway.iter().zip(recorded) {
            if let Err(error) = result {
                for &i in items {
                    counts[i] = Err(error.clone());
                }
            }
        }
        // Refused ones: the single path, which may make room by dropping dead gateways'.
        let retried = futures_util::future::join_all(counts.iter().enumerate().map(|(i, c)| {
            let o = openings[i];
            let refused = matches!(c, Ok(count) if *count <= 0);
            async move {
                if refused {
                    Some(
                        self.connection_opened(o.user, o.client_id, o.gateway, o.limit)
                            .await,
                    )
                } else {
                    None
                }
            }
        }))
        .await;
        counts
            .into_iter()
            .zip(retried)
            .map(|(count, retry)| match retry {
                Some(result) => result,
                None => count.map(|c| Ok(c.unsigned_abs())),
            })
            .collect()
    }

    /// Stops counting `client_id` for `user`.
    async fn connection_closed(&self, user: &str, client_id: &str) -> Result<(), StoreError> {
        let key = user_connections_key(user);
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(client_id)
                .query_async::<()>(&mut connection)
                .await
        })
        .await
    }

    async fn sweep_dead_gateways(&self) -> Result<usize, StoreError> {
        let now = roomcast_common::unix_millis();
        let dead: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(GATEWAY_LEASES_KEY)
                    .arg("(0")
                    .arg(now),
            )
            .await?;
        for gateway in &dead {
            let key = gateway_rooms_key(gateway);
            let rooms: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&key)).await?;
            for room in &rooms {
                // Reading presence drops (and announces) members of dead gateways.
                self.presence(room).await?;
            }
            let users_key = gateway_users_key(gateway);
            let users: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(&users_key)).await?;
            for user in &users {
                self.forget_gateway_connections(user, gateway).await?;
            }
            // The gateway's keys share its slot; the leases live in another.
            self.query::<()>(
                redis::cmd("DEL")
                    .arg(gateway_rooms_key(gateway))
                    .arg(gateway_users_key(gateway)),
            )
            .await?;
            self.query::<()>(
                redis::cmd("ZADD")
                    .arg(GATEWAY_LEASES_KEY)
                    .arg("XX")
                    .arg("LT")
                    .arg(0)
                    .arg(gateway),
            )
            .await?;
            tracing::info!(
                gateway,
                rooms = rooms.len(),
                "swept members of a dead gateway"
            );
        }
        Ok(dead.len())
    }

    async fn gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
        let now = roomcast_common::unix_millis();
        let retention = u64::try_from(GATEWAY_RECORD_RETENTION.as_millis()).unwrap_or(u64::MAX);
        let mut connection = self.connection.clone();
        // Forget gateways long dead, then read the live ones.
        let forgotten: Vec<String> = self
            .run(async {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(GATEWAY_LEASES_KEY)
                    .arg("-inf")
                    .arg(now.saturating_sub(retention))
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        if !forgotten.is_empty() {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HDEL")
                .arg(GATEWAY_INFO_KEY)
                .arg(&forgotten)
                .ignore()
                .cmd("ZREM")
                .arg(GATEWAY_LEASES_KEY)
                .arg(&forgotten)
                .ignore();
            self.run(async { pipe.query_async::<()>(&mut connection).await })
                .await?;
        }
        let live: Vec<String> = self
            .run(async {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(GATEWAY_LEASES_KEY)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<Option<String>> = self
            .run(async {
                redis::cmd("HMGET")
                    .arg(GATEWAY_INFO_KEY)
                    .arg(&live)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let mut gateways: Vec<GatewayInfo> = live
            .into_iter()
            .zip(records)
            .filter_map(|(gateway_id, record)| {
                let record: GatewayRecord = serde_json::from_str(record.as_deref()?).ok()?;
                Some(GatewayInfo {
                    gateway_id,
                    connections: record.connections,
                    last_seen_ms: record.last_seen_ms,
                    version: record.version,
                })
            })
            .collect();
        gateways.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(gateways)
    }

    async fn publish_control(&self, payload: Bytes) -> Result<(), StoreError> {
        if let Some(external) = &self.external {
            external.publish(CONTROL_CHANNEL, payload).await?;
            return Ok(());
        }
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("PUBLISH")
                .arg(CONTROL_CHANNEL)
                .arg(payload.as_ref())
                .query_async::<i64>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }
}
