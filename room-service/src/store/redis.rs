//! Redis store. Every operation that must be atomic is one Lua script (see `prelude.lua` for
//! the key layout); Redis runs scripts one at a time and pub/sub keeps publish order, so every
//! subscriber sees a room's messages in offset order even with many room-service instances
//! publishing concurrently.
//!
//! Key layout (a room's keys share the `{<room>}` hash tag, so they live in one slot):
//! - `rc:{<room>}:epoch` string, `rc:{<room>}:seq` latest offset, `rc:{<room>}:hist` stream
//!   with ids `<offset>-0`: all three expire together `HISTORY_TTL_SECONDS` after the last
//!   publish or join; a missing epoch means the history is lost and a new epoch starts.
//! - `rc:{<room>}:members` hash client id -> `{"user":…,"gateway":…}`; no expiry: members
//!   leave explicitly or drop out when their gateway's lease runs out.
//! - `rc:gw:{<gateway>}:rooms` set of the rooms a gateway had members in, for the sweeper.
//! - `rc:{gateways}:info` hash gateway id -> `{"connections":…,"last_seen_ms":…}` and
//!   `rc:{gateways}:leases` sorted set gateway id -> lease expiry (unix ms).
//!
//! Requires Redis >= 6.2 (`XTRIM MINID`-era stream commands, `ZMSCORE`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use roomcast_common::broker::Publisher;
use roomcast_common::broker::nats::NatsPublisher;
use roomcast_common::envelope::{CONTROL_CHANNEL, member_event, room_channel, room_message};
use roomcast_common::frame::{MemberEvent, message_frame_tail};
use roomcast_common::namespace::Namespaces;
use serde::{Deserialize, Serialize};

use super::{
    GATEWAY_RECORD_RETENTION, GatewayInfo, HistoryLimits, HistoryPage, Joined, Joiner, Member,
    Once, Position, PublishItem, Published, RoomStats, RoomSummary, StoreError, StoredMessage,
    new_epoch, recover,
};

/// Upper bound on one store operation, reconnection included: callers fail fast instead of
/// hanging while Redis is down.
const OP_TIMEOUT: Duration = Duration::from_millis(2500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

const GATEWAY_INFO_KEY: &str = "rc:{gateways}:info";
const GATEWAY_LEASES_KEY: &str = "rc:{gateways}:leases";

const PRELUDE: &str = include_str!("prelude.lua");

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

#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    /// Set when NATS carries the broadcasts; otherwise the scripts publish on Redis itself.
    nats: Option<NatsPublisher>,
    scripts: Arc<Scripts>,
    limits: HistoryLimits,
    pub(super) namespaces: Arc<Namespaces>,
}

impl StoreError {
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
                    )
            );
        if transient {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Internal(error.to_string())
        }
    }
}

fn flat_messages(flat: Vec<String>) -> Result<Vec<StoredMessage>, StoreError> {
    if !flat.len().is_multiple_of(4) {
        return Err(StoreError::Internal("malformed history reply".into()));
    }
    let mut messages = Vec::with_capacity(flat.len() / 4);
    let mut fields = flat.into_iter();
    while let (Some(offset), Some(user), Some(client_id), Some(data_json)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    {
        let offset = offset
            .parse()
            .map_err(|_| StoreError::Internal(format!("bad offset {offset:?} in history")))?;
        messages.push(StoredMessage {
            offset,
            user,
            client_id,
            data_json,
        });
    }
    Ok(messages)
}

fn parse_offset(latest: &str) -> Result<u64, StoreError> {
    latest
        .parse()
        .map_err(|_| StoreError::Internal(format!("bad offset {latest:?} in store")))
}

impl RedisStore {
    /// Creates the store without connecting: the connection is made on first use and remade
    /// after failures, so the service can start before Redis and survive its restarts.
    pub fn new(url: &str, limits: HistoryLimits) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Config(e.to_string()))?;
        Self::from_client(client, limits)
    }

    /// [`RedisStore::new`] on a client made beforehand (`rediss://` with its own CA, say).
    pub fn from_client(client: redis::Client, limits: HistoryLimits) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(RedisStore {
            connection,
            nats: None,
            scripts: Arc::new(Scripts::new()),
            limits,
            namespaces: Arc::default(),
        })
    }

    /// See `Store::with_namespaces`.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    /// The history bounds of `room`'s namespace.
    fn room_limits(&self, room: &str) -> HistoryLimits {
        self.limits.for_namespace(self.namespaces.of(room))
    }

    /// The channel a join or leave script announces the member on: none when the room's
    /// namespace has member events off, or when NATS carries the broadcasts.
    fn member_channel(&self, room: &str) -> String {
        if self.namespaces.of(room).announces_members() {
            self.script_channel(room)
        } else {
            String::new()
        }
    }

    /// Broadcasts a member event on NATS (when it is the broker and the namespace announces).
    async fn announce_on_nats(&self, room: &str, event: Bytes) {
        if self.namespaces.of(room).announces_members() {
            self.broadcast(&room_channel(room), event).await;
        }
    }

    /// Broadcasts over NATS instead of Redis pub/sub.
    pub fn with_nats(mut self, nats: NatsPublisher) -> Self {
        self.nats = Some(nats);
        self
    }

    /// The channel a script publishes on: none when NATS carries the broadcasts.
    fn script_channel(&self, room: &str) -> String {
        if self.nats.is_some() {
            String::new()
        } else {
            room_channel(room)
        }
    }

    /// Publishes on NATS, when it is the broker. A failure loses only the live broadcast:
    /// the message is in history, and gateways fill the gap when the next one arrives.
    async fn broadcast(&self, channel: &str, payload: Bytes) {
        if let Some(nats) = &self.nats
            && let Err(error) = nats.publish(channel, payload).await
        {
            tracing::warn!(channel, %error, "broadcast not published on nats");
        }
    }

    pub fn limits(&self) -> HistoryLimits {
        self.limits
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
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis did not answer within {} ms",
                OP_TIMEOUT.as_millis()
            ))),
        }
    }

    /// Checks Redis and, when it is the broker, NATS.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        })
        .await?;
        if let Some(nats) = &self.nats {
            nats.ping()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

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

    pub async fn publish_once(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        once: Option<Once<'_>>,
    ) -> Result<Published, StoreError> {
        let item = PublishItem {
            room,
            user,
            client_id,
            data_json,
            once,
        };
        let invocation = self.publish_invocation(&item)?;
        let mut connection = self.connection.clone();
        let (epoch, offset): (String, u64) = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        let published = Published { epoch, offset };
        self.broadcast_on_nats(&item, &published).await;
        Ok(published)
    }

    /// Publishes `items` in order in one round trip (a pipeline: Redis runs the scripts one
    /// after the other, in the order sent).
    pub async fn publish_many(
        &self,
        items: &[PublishItem<'_>],
    ) -> Result<Vec<Published>, StoreError> {
        let mut pipe = redis::pipe();
        // EVALSHA fails on a Redis that lost its scripts (restart, flush); loading it first in
        // the same pipeline keeps the order, where a retry after NOSCRIPT would not.
        pipe.load_script(&self.scripts.publish).ignore();
        for item in items {
            pipe.invoke_script(&self.publish_invocation(item)?);
        }
        let mut connection = self.connection.clone();
        let results: Vec<(String, u64)> = self
            .run(async move { pipe.query_async(&mut connection).await })
            .await?;
        let mut published = Vec::with_capacity(results.len());
        for (item, (epoch, offset)) in items.iter().zip(results) {
            let p = Published { epoch, offset };
            self.broadcast_on_nats(item, &p).await;
            published.push(p);
        }
        Ok(published)
    }

    fn publish_invocation<'s>(
        &'s self,
        item: &PublishItem<'_>,
    ) -> Result<redis::ScriptInvocation<'s>, StoreError> {
        let keys = RoomKeys::new(item.room);
        let limits = self.room_limits(item.room);
        let room_json =
            serde_json::to_string(item.room).map_err(|e| StoreError::Internal(e.to_string()))?;
        let tail = message_frame_tail(item.user, item.client_id, item.data_json);
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .arg(new_epoch())
            .arg(limits.ttl_ms())
            .arg(limits.size)
            .arg(self.script_channel(item.room))
            .arg(room_json)
            .arg(item.client_id)
            .arg(item.user)
            .arg(item.data_json)
            .arg(tail);
        if let Some(once) = item.once {
            // The room's hash tag comes first, so the record lives in the room's slot.
            invocation
                .key(format!("rc:{{{}}}:idem:{}", item.room, once.key))
                .arg(
                    u64::try_from(once.window.as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
        }
        Ok(invocation)
    }

    /// With NATS as the broker, room-service publishes after the script. A repeated
    /// idempotent publish goes out again (the script cannot say it was a repeat without
    /// another round trip); gateways drop the known offset as a duplicate.
    async fn broadcast_on_nats(&self, item: &PublishItem<'_>, published: &Published) {
        if self.nats.is_none() {
            return;
        }
        let payload = room_message(
            item.room,
            published.offset,
            &published.epoch,
            item.user,
            item.client_id,
            item.data_json,
        );
        self.broadcast(&room_channel(item.room), payload).await;
    }

    pub async fn join(
        &self,
        room: &str,
        joiner: Joiner<'_>,
        since: Option<&Position>,
    ) -> Result<Joined, StoreError> {
        let keys = RoomKeys::new(room);
        let limits = self.room_limits(room);
        let record = serde_json::to_string(&MemberRecord {
            user: joiner.user.to_owned(),
            gateway: joiner.gateway_id.to_owned(),
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        let event = member_event(MemberEvent::Joined, room, joiner.user, joiner.client_id);
        // The first missed message's id; none when `since.offset + 1` overflows (such a
        // position cannot be recovered).
        let (since_epoch, first_missed) = match since {
            Some(since) => (
                since.epoch.as_str(),
                since
                    .offset
                    .checked_add(1)
                    .map(|first| format!("{first}-0"))
                    .unwrap_or_default(),
            ),
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
            .arg(if limits.size == 0 {
                String::new()
            } else {
                first_missed
            })
            .arg(limits.size.max(1));
        let mut connection = self.connection.clone();
        let (epoch, latest, flat, new_member): (String, String, Vec<String>, i64) = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if new_member == 1 {
            self.announce_on_nats(room, event.clone()).await;
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

    pub async fn leave(&self, room: &str, client_id: &str, user: &str) -> Result<bool, StoreError> {
        let keys = RoomKeys::new(room);
        let event = member_event(MemberEvent::Left, room, user, client_id);
        let mut invocation = self.scripts.leave.prepare_invoke();
        invocation
            .key(&keys.members)
            .arg(client_id)
            .arg(self.member_channel(room))
            .arg(event.as_ref());
        let mut connection = self.connection.clone();
        let removed: i64 = self
            .run(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        if removed == 1 {
            self.announce_on_nats(room, event).await;
        }
        Ok(removed == 1)
    }

    pub async fn presence(&self, room: &str) -> Result<Vec<Member>, StoreError> {
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

    pub async fn history(
        &self,
        room: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, StoreError> {
        let keys = RoomKeys::new(room);
        let start = match since {
            None => "-".to_owned(),
            Some(since) => since
                .checked_add(1)
                .map(|first| format!("{first}-0"))
                .unwrap_or_default(),
        };
        let limits = self.room_limits(room);
        let mut invocation = self.scripts.history.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .arg(new_epoch())
            .arg(limits.ttl_ms())
            .arg(start)
            .arg(limits.clamp_limit(limit));
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

    pub async fn remove_history(&self, room: &str) -> Result<(), StoreError> {
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

    pub async fn rooms(&self, prefix: &str, limit: usize) -> Result<Vec<RoomSummary>, StoreError> {
        // Room names cannot hold glob characters (room name rules), so the prefix is literal.
        let mut names = std::collections::BTreeSet::new();
        for suffix in ["seq", "members"] {
            let pattern = format!("rc:{{{prefix}*}}:{suffix}");
            let mut connection = self.connection.clone();
            let keys: Vec<String> = self
                .run(async move {
                    let mut cursor = 0u64;
                    let mut keys = Vec::new();
                    loop {
                        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut connection)
                            .await?;
                        keys.extend(batch);
                        if next == 0 {
                            return Ok(keys);
                        }
                        cursor = next;
                    }
                })
                .await?;
            names.extend(keys.iter().filter_map(|key| {
                key.strip_prefix("rc:{")
                    .and_then(|rest| rest.rsplit_once("}:"))
                    .map(|(room, _)| room.to_owned())
            }));
        }
        let names: Vec<String> = names.into_iter().take(limit).collect();
        let mut pipe = redis::pipe();
        for room in &names {
            let keys = RoomKeys::new(room);
            pipe.cmd("HLEN")
                .arg(&keys.members)
                .cmd("GET")
                .arg(&keys.seq);
        }
        let mut connection = self.connection.clone();
        let counts: Vec<(u64, Option<String>)> = if names.is_empty() {
            Vec::new()
        } else {
            let flat: Vec<redis::Value> = self
                .run(async move { pipe.query_async(&mut connection).await })
                .await?;
            flat.chunks(2)
                .map(|pair| {
                    let members = redis::from_redis_value::<u64>(pair[0].clone()).unwrap_or(0);
                    let offset = redis::from_redis_value::<Option<String>>(pair[1].clone())
                        .ok()
                        .flatten();
                    (members, offset)
                })
                .collect()
        };
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

    pub async fn room_stats(&self, room: &str) -> Result<RoomStats, StoreError> {
        let members = u64::try_from(self.presence(room).await?.len()).unwrap_or(u64::MAX);
        let keys = RoomKeys::new(room);
        let mut invocation = self.scripts.stats.prepare_invoke();
        invocation
            .key(&keys.epoch)
            .key(&keys.seq)
            .key(&keys.hist)
            .arg(self.room_limits(room).ttl_ms());
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

    pub async fn gateway_heartbeat(
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
        })
        .map_err(|e| StoreError::Internal(e.to_string()))?;
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
    pub async fn connection_opened(
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

    /// Runs `connect.lua`: the count with the connection, negative when refused.
    async fn count_connection(
        &self,
        key: &str,
        client_id: &str,
        gateway: &str,
        limit: u32,
    ) -> Result<i64, StoreError> {
        let mut invocation = self.scripts.connect.prepare_invoke();
        invocation.key(key).arg(client_id).arg(gateway).arg(limit);
        let mut connection = self.connection.clone();
        self.run(async move { invocation.invoke_async(&mut connection).await })
            .await
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

    /// Stops counting `client_id` for `user`.
    pub async fn connection_closed(&self, user: &str, client_id: &str) -> Result<(), StoreError> {
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

    pub async fn sweep_dead_gateways(&self) -> Result<usize, StoreError> {
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
            let mut pipe = redis::pipe();
            pipe.cmd("DEL")
                .arg(gateway_rooms_key(gateway))
                .ignore()
                .cmd("DEL")
                .arg(gateway_users_key(gateway))
                .ignore()
                .cmd("ZADD")
                .arg(GATEWAY_LEASES_KEY)
                .arg("XX")
                .arg("LT")
                .arg(0)
                .arg(gateway)
                .ignore();
            let mut connection = self.connection.clone();
            self.run(async move { pipe.query_async::<()>(&mut connection).await })
                .await?;
            tracing::info!(
                gateway,
                rooms = rooms.len(),
                "swept members of a dead gateway"
            );
        }
        Ok(dead.len())
    }

    pub async fn gateways(&self) -> Result<Vec<GatewayInfo>, StoreError> {
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

    pub async fn publish_control(&self, payload: Bytes) -> Result<(), StoreError> {
        if let Some(nats) = &self.nats {
            return nats
                .publish(CONTROL_CHANNEL, payload)
                .await
                .map(|_| ())
                .map_err(|e| StoreError::Unavailable(e.to_string()));
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
