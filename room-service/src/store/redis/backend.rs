//! The two kinds of Redis the store runs on: one Redis (a [`ConnectionManager`]) or a Redis
//! Cluster (a [`ClusterConnection`], `REDIS_URL=redis+cluster://…`). Every key of one script
//! call shares a hash slot (a room's keys share the `{<room>}` tag, a user's and a gateway's
//! theirs, the gateway leases `{gateways}`), and no call mixes slots, so the store's code is
//! the same on both; what differs is here.

use std::collections::HashMap;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{RedisError, RedisResult};
use roomcast_common::envelope::{cluster_channel, room_channel};

/// What the store needs of its connection beyond sending commands.
pub trait Backend: ConnectionLike + Clone + Send + Sync + 'static {
    /// The command the scripts broadcast with: `PUBLISH`, or `SPUBLISH` on a cluster (the
    /// room channel then lives in the room's slot).
    const BROADCAST: &'static str;

    /// Whether the client sends a command again by itself after losing the connection it went
    /// on (the cluster client does, after a reconnect or a failover), so a script may run twice
    /// for one call: its publishes must then always look their idempotency records up.
    const MAY_RESEND: bool;

    /// The channel the scripts broadcast `room`'s messages and member events on.
    fn room_channel(room: &str) -> String;

    /// The script calls a batch of publishes splits into: indices into `rooms`, in order,
    /// one group per call. One Redis takes them all in one call; a cluster needs one call
    /// per hash slot.
    fn call_groups(rooms: &[&str]) -> Vec<Vec<usize>>;

    /// Every key matching `pattern`, from every master (on a cluster whose slot map is stale,
    /// a key may come twice).
    fn scan(&self, pattern: &str) -> impl Future<Output = RedisResult<Vec<String>>> + Send;

    /// One round trip to the store (any node of a cluster: one master failing over does not
    /// make the store unusable).
    fn ping(&self) -> impl Future<Output = RedisResult<()>> + Send;
}

/// One `SCAN … MATCH pattern COUNT 1000` step from `cursor`.
fn scan_step(cursor: u64, pattern: &str) -> redis::Cmd {
    let mut command = redis::cmd("SCAN");
    command
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    command
}

impl Backend for ConnectionManager {
    const BROADCAST: &'static str = "PUBLISH";
    const MAY_RESEND: bool = false;

    fn room_channel(room: &str) -> String {
        room_channel(room)
    }

    fn call_groups(rooms: &[&str]) -> Vec<Vec<usize>> {
        vec![(0..rooms.len()).collect()]
    }

    async fn scan(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut connection = self.clone();
        let (mut cursor, mut keys) = (0u64, Vec::new());
        loop {
            let (next, batch): (u64, Vec<String>) = scan_step(cursor, pattern)
                .query_async(&mut connection)
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    async fn ping(&self) -> RedisResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.clone())
            .await
    }
}

/// The slot of `room`'s keys.
fn room_slot(room: &str) -> Slot {
    Slot::for_key(format!("{{{room}}}"))
}

impl Backend for ClusterConnection {
    const BROADCAST: &'static str = "SPUBLISH";
    const MAY_RESEND: bool = true;

    fn room_channel(room: &str) -> String {
        cluster_channel(&room_channel(room)).into_owned()
    }

    fn call_groups(rooms: &[&str]) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_slot: HashMap<Slot, usize> = HashMap::new();
        for (index, room) in rooms.iter().enumerate() {
            let group = *by_slot.entry(room_slot(room)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(index);
        }
        groups
    }

    async fn scan(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut connection = self.clone();
        let mut keys = Vec::new();
        // Routed by one slot of each shard rather than by address: the client connects to
        // a slot's master on demand, but only routes by address to nodes it already holds
        // a connection to (ClusterConnectionNotFound right after start or a failover).
        for slot in shard_slots(&shards(self).await?) {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                Route::with_slot(slot, SlotAddr::Master),
            ));
            let mut cursor = 0u64;
            loop {
                let reply = connection
                    .route_command(scan_step(cursor, pattern), node.clone())
                    .await?;
                let (next, batch): (u64, Vec<String>) =
                    redis::from_redis_value(reply).map_err(RedisError::from)?;
                // A stale slot map can send two shards' scans to one node, so a key may come
                // twice; the one caller (`rooms`) keeps names in a set.
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    async fn ping(&self) -> RedisResult<()> {
        let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        self.clone()
            .route_command(redis::cmd("PING"), any)
            .await
            .map(drop)
    }
}

/// The cluster's `CLUSTER SHARDS` reply now.
async fn shards(connection: &ClusterConnection) -> RedisResult<redis::Value> {
    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    connection
        .clone()
        .route_command(redis::cmd("CLUSTER").arg("SHARDS").to_owned(), any)
        .await
}

/// One slot of each shard that serves slots and has a healthy master, from a
/// `CLUSTER SHARDS` reply: routing a keyless command by it reaches that shard's master.
fn shard_slots(reply: &redis::Value) -> Vec<Slot> {
    fn field<'v>(map: &'v redis::Value, name: &str) -> Option<&'v redis::Value> {
        // RESP2 answers flat arrays of name, value; RESP3 maps.
        match map {
            redis::Value::Array(items) => items
                .chunks(2)
                .find(|pair| text(&pair[0]).as_deref() == Some(name))
                .map(|pair| &pair[1]),
            redis::Value::Map(pairs) => pairs
                .iter()
                .find(|(key, _)| text(key).as_deref() == Some(name))
                .map(|(_, value)| value),
            _ => None,
        }
    }
    fn text(value: &redis::Value) -> Option<String> {
        redis::from_redis_value_ref::<String>(value).ok()
    }
    let redis::Value::Array(shards) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for shard in shards {
        // `slots` is a flat list of range bounds: start, end, start, end, …
        let first = match field(shard, "slots") {
            Some(redis::Value::Array(bounds)) => bounds
                .first()
                .and_then(|b| redis::from_redis_value_ref::<u16>(b).ok())
                .and_then(Slot::new),
            _ => None,
        };
        let Some(slot) = first else { continue };
        let Some(redis::Value::Array(nodes)) = field(shard, "nodes") else {
            continue;
        };
        let healthy_master = nodes.iter().any(|node| {
            field(node, "role").and_then(text).as_deref() == Some("master")
                && field(node, "health").and_then(text).as_deref() != Some("fail")
        });
        if healthy_master {
            out.push(slot);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_batch_splits_by_slot_keeping_order() {
        // "a" and "{a}"-tagged keys share a slot; "b" is elsewhere.
        assert_eq!(room_slot("a"), Slot::for_key("rc:{a}:seq"));
        assert_ne!(room_slot("a"), room_slot("b"));
        let groups = ClusterConnection::call_groups(&["a", "b", "a", "a", "b"]);
        assert_eq!(groups, vec![vec![0, 2, 3], vec![1, 4]]);
        assert_eq!(
            ConnectionManager::call_groups(&["a", "b", "a"]),
            vec![vec![0, 1, 2]]
        );
        assert_eq!(ClusterConnection::room_channel("r"), "rc:room:{r}");
        assert_eq!(
            Slot::for_key(ClusterConnection::room_channel("r")),
            room_slot("r")
        );
        assert_eq!(ConnectionManager::room_channel("r"), "rc:room:r");
    }

    #[test]
    fn scans_route_by_a_slot_of_each_shard_with_a_healthy_master() {
        use redis::Value::{Array, BulkString, Int};
        let text = |s: &str| BulkString(s.as_bytes().to_vec());
        let node = |role: &str, health: &str| {
            Array(vec![
                text("ip"),
                text("127.0.0.1"),
                text("role"),
                text(role),
                text("health"),
                text(health),
            ])
        };
        let shard = |slots: Vec<i64>, nodes: Vec<redis::Value>| {
            Array(vec![
                text("slots"),
                Array(slots.into_iter().map(Int).collect()),
                text("nodes"),
                Array(nodes),
            ])
        };
        let reply = Array(vec![
            shard(
                vec![0, 5460],
                vec![node("master", "online"), node("replica", "online")],
            ),
            shard(
                vec![5461, 9000, 9500, 10922],
                vec![node("master", "online")],
            ),
            // A failed master whose replica has not taken over yet: nothing to scan there.
            shard(
                vec![10923, 16383],
                vec![node("master", "fail"), node("replica", "online")],
            ),
            // A master without slots (being added to the cluster).
            shard(vec![], vec![node("master", "online")]),
        ]);
        assert_eq!(
            shard_slots(&reply),
            vec![Slot::new(0).unwrap(), Slot::new(5461).unwrap()]
        );
    }
}
