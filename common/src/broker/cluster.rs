//! Redis Cluster as the pub/sub leg (`redis+cluster://host:port,host:port`), on sharded
//! pub/sub: a room's channel lives on the shard that owns its slot, so a message travels only
//! inside that shard and the cluster's pub/sub traffic grows with shards instead of being
//! copied to every node.
//!
//! Sharded: room channels and the per-gateway channels (`SSUBSCRIBE` / `SPUBLISH`; the latter
//! counts the subscribers that got it, which SSE forwarding relies on). Not sharded: the
//! cluster-wide control channel `rc:ctl`, which every gateway must get wherever it was
//! published (`SUBSCRIBE` / `PUBLISH`).
//!
//! One cluster connection per side; it keeps a connection per node it needs, follows the slot
//! map (MOVED, failovers) and subscribes again on a slot's new owner by itself. A lost node
//! link is reported as [`BrokerEvent::Disconnected`], so the gateway checks its rooms against
//! history once [`Subscriber::ping`] succeeds again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};

use super::{BrokerError, BrokerEvent, Publisher, Sink, Subscriber, bounded};
use crate::envelope::CONTROL_CHANNEL;

/// How long restoring the subscriptions after a lost link may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL scheme of a Redis Cluster.
pub const SCHEME: &str = "redis+cluster://";

/// The node URLs of a `redis+cluster://a:1,b:2/?opts` URL (`redis://a:1/?opts`, …); `None`
/// for another scheme or no node.
pub fn node_urls(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix(SCHEME)?;
    let (hosts, tail) = match rest.find(['/', '?']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{h}{tail}"))
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Whether `channel` is published and subscribed as a sharded channel.
fn sharded(channel: &str) -> bool {
    channel != CONTROL_CHANNEL
}

fn builder(url: &str) -> Result<ClusterClientBuilder, BrokerError> {
    let nodes = node_urls(url).ok_or_else(|| BrokerError::UnsupportedUrl(url.to_owned()))?;
    Ok(ClusterClientBuilder::new(nodes)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2)))
}

/// PING on every master: a master that is gone fails it, which makes the connection read
/// the slot map again and move the subscriptions of the slots it lost to their new owner.
/// (A PING to any one node would succeed and leave them pointing at the dead one.)
async fn ping(connection: &ClusterConnection) -> Result<(), BrokerError> {
    let mut connection = connection.clone();
    let all_masters = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    bounded(async move {
        connection
            .route_command(redis::cmd("PING"), all_masters)
            .await?;
        Ok(())
    })
    .await
}

/// The receiving side on a Redis Cluster.
#[derive(Clone)]
pub struct ClusterSubscriber {
    connection: ClusterConnection,
    /// The channels subscribed, to subscribe again after a lost node link.
    channels: Arc<Mutex<BTreeSet<String>>>,
    /// Set when a node link dropped; cleared by the ping that restored the subscriptions.
    lost: Arc<AtomicBool>,
}

impl ClusterSubscriber {
    pub async fn connect(url: &str, sink: Sink) -> Result<Self, BrokerError> {
        let lost = Arc::new(AtomicBool::new(false));
        let lost_link = lost.clone();
        let client = builder(url)?
            .push_sender(move |push: redis::PushInfo| {
                match push.kind {
                    redis::PushKind::Message | redis::PushKind::SMessage => {
                        if let [
                            redis::Value::BulkString(channel),
                            redis::Value::BulkString(payload),
                        ] = &push.data[..]
                            && let Ok(channel) = std::str::from_utf8(channel)
                        {
                            sink(BrokerEvent::Message {
                                channel: Arc::from(channel),
                                payload: Bytes::copy_from_slice(payload),
                            });
                        }
                    }
                    redis::PushKind::Disconnection => {
                        lost_link.store(true, Ordering::Release);
                        sink(BrokerEvent::Disconnected);
                    }
                    _ => {}
                }
                Ok::<(), redis::aio::SendError>(())
            })
            .build()?;
        Ok(Self {
            connection: client.get_async_connection().await?,
            channels: Arc::default(),
            lost,
        })
    }

    async fn add(&self, channel: &str) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        if sharded(channel) {
            connection.ssubscribe(channel).await?;
        } else {
            connection.subscribe(channel).await?;
        }
        Ok(())
    }

    /// After a lost node link: every channel subscribed again, each on the node that owns its
    /// slot now (the connection read the slot map again when the ping failed over there).
    /// Subscribing again where the subscription survived changes nothing.
    async fn restore(&self) -> Result<(), BrokerError> {
        let channels: Vec<String> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        for channel in &channels {
            self.add(channel).await?;
        }
        Ok(())
    }
}

impl Subscriber for ClusterSubscriber {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.add(channel).await?;
            self.channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(channel.to_owned());
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.channels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(channel);
            let mut connection = self.connection.clone();
            if sharded(channel) {
                connection.sunsubscribe(channel).await?;
            } else {
                connection.unsubscribe(channel).await?;
            }
            Ok(())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            ping(&self.connection).await?;
            if self.lost.swap(false, Ordering::AcqRel) {
                // One round trip per channel: bounded by more than a ping.
                let restored = tokio::time::timeout(RESTORE_TIMEOUT, self.restore()).await;
                let result = restored.unwrap_or(Err(BrokerError::Timeout));
                if result.is_err() {
                    self.lost.store(true, Ordering::Release);
                }
                result?;
            }
            Ok(())
        })
    }
}

/// The sending side on a Redis Cluster.
#[derive(Clone)]
pub struct ClusterPublisher {
    connection: ClusterConnection,
}

impl ClusterPublisher {
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let client = builder(url)?.build()?;
        Ok(Self {
            connection: client.get_async_connection().await?,
        })
    }
}

impl Publisher for ClusterPublisher {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, BrokerError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let command = if sharded(channel) {
                "SPUBLISH"
            } else {
                "PUBLISH"
            };
            let receivers = redis::cmd(command)
                .arg(channel)
                .arg(payload.as_ref())
                .query_async::<i64>(&mut connection)
                .await?;
            // A shard counts its own subscribers: the count means something for sharded
            // channels only (a cluster-wide PUBLISH counts those of the node it reached).
            Ok(sharded(channel).then(|| usize::try_from(receivers).unwrap_or(0)))
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(ping(&self.connection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_of_a_cluster_url() {
        assert_eq!(
            node_urls("redis+cluster://a:1,b:2").unwrap(),
            ["redis://a:1", "redis://b:2"]
        );
        assert_eq!(
            node_urls("redis+cluster://a:1, b:2/?protocol=resp3").unwrap(),
            ["redis://a:1/?protocol=resp3", "redis://b:2/?protocol=resp3"]
        );
        assert!(node_urls("redis://a:1").is_none());
        assert!(node_urls("redis+cluster://").is_none());
        assert!(!sharded(CONTROL_CHANNEL));
        assert!(sharded("rc:room:x") && sharded("rc:gw:g"));
    }
}
