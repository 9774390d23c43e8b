//! The two kinds of Redis the store runs on: one Redis (a [`ConnectionManager`]) or a Redis
//! Cluster (a [`ClusterConnection`], `REDIS_URL=redis+cluster://…`). Every key of one script
//! call shares a hash slot (a room's keys share the `{<room>}` tag, a user's and a gateway's
//! theirs, the gateway leases `{gateways}`), and no call mixes slots, so the store's code is
//! the same on both; what differs is here.

use std::collections::HashMap;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{RedisError, RedisResult};
use roomcast_common::envelope::{cluster_channel, room_channel};

/// What the store needs of its connection beyond sending commands.
pub trait Backend: ConnectionLike + Clone + Send + Sync + 'static {
    /// The command the scripts broadcast with: `PUBLISH`, or `SPUBLISH` on a cluster (the
    /// room channel then lives in the room's slot).
    const BROADCAST: &'static str;

    /// The channel the scripts broadcast `room`'s messages and member events on.
    fn room_channel(room: &str) -> String;

    /// The script calls a batch of publishes splits into: indices into `rooms`, in order,
    /// one group per call. One Redis takes them all in one call; a cluster needs one call
    /// per hash slot.
    fn call_groups(rooms: &[&str]) -> Vec<Vec<usize>>;

    /// Every key matching `pattern`, from every master.
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
        for (host, port) in masters(self).await? {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let mut cursor = 0u64;
            loop {
                let reply = connection
                    .route_command(scan_step(cursor, pattern), node.clone())
                    .await?;
                let (next, batch): (u64, Vec<String>) =
                    redis::from_redis_value(reply).map_err(RedisError::from)?;
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

/// The masters of the cluster now, as `CLUSTER SHARDS` tells them: (host, port).
async fn masters(connection: &ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let reply = connection
        .clone()
        .route_command(redis::cmd("CLUSTER").arg("SHARDS").to_owned(), any)
        .await?;
    Ok(shard_masters(&reply))
}

/// The (host, port) of each shard's master in a `CLUSTER SHARDS` reply.
fn shard_masters(reply: &redis::Value) -> Vec<(String, u16)> {
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
        let Some(redis::Value::Array(nodes)) = field(shard, "nodes") else {
            continue;
        };
        for node in nodes {
            let role = field(node, "role").and_then(text);
            let health = field(node, "health").and_then(text);
            let host = field(node, "ip")
                .or_else(|| field(node, "endpoint"))
                .and_then(text);
            let port = field(node, "port").and_then(|p| redis::from_redis_value_ref::<u16>(p).ok());
            if role.as_deref() == Some("master")
                && health.as_deref() != Some("fail")
                && let (Some(host), Some(port)) = (host, port)
            {
                out.push((host, port));
            }
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
}
