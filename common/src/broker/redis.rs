//! Redis pub/sub: one multiplexed RESP3 connection per side that reconnects by itself.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;

use super::{BrokerError, BrokerEvent, Publisher, Sink, Subscriber, bounded};

/// Adds `protocol=resp3` to a Redis URL: pub/sub on a multiplexed, self-reconnecting connection
/// needs RESP3 push messages.
pub fn resp3_url(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
        .set_response_timeout(Some(std::time::Duration::from_secs(2)))
        .set_max_delay(std::time::Duration::from_secs(2))
}

async fn ping(connection: &ConnectionManager) -> Result<(), BrokerError> {
    let mut connection = connection.clone();
    // While the manager reconnects, commands wait for it: bounded.
    bounded(async move {
        Ok(redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await?)
    })
    .await
}

/// Redis subscriber: resubscribes its channels by itself after a reconnection.
#[derive(Clone)]
pub struct RedisSubscriber {
    connection: ConnectionManager,
}

impl RedisSubscriber {
    pub async fn connect(url: &str, sink: Sink) -> Result<Self, BrokerError> {
        Self::connect_client(redis::Client::open(resp3_url(url))?, sink).await
    }

    /// [`RedisSubscriber::connect`] with a client made beforehand (`rediss://` with its own
    /// CA, say: [`crate::tls::redis_client`]); its URL must ask for RESP3 ([`resp3_url`]).
    pub async fn connect_client(client: redis::Client, sink: Sink) -> Result<Self, BrokerError> {
        let config = manager_config()
            .set_automatic_resubscription()
            .set_push_sender(move |push: redis::PushInfo| {
                match push.kind {
                    redis::PushKind::Message => {
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
                    redis::PushKind::Disconnection => sink(BrokerEvent::Disconnected),
                    _ => {}
                }
                Ok::<(), redis::aio::SendError>(())
            });
        let connection = client.get_connection_manager_with_config(config).await?;
        Ok(Self { connection })
    }
}

impl Subscriber for RedisSubscriber {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { Ok(self.connection.clone().subscribe(channel).await?) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { Ok(self.connection.clone().unsubscribe(channel).await?) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(ping(&self.connection))
    }
}

/// Redis publisher: `PUBLISH` on a multiplexed connection, so concurrent publishes share it and
/// one caller's publishes keep their order.
#[derive(Clone)]
pub struct RedisPublisher {
    connection: ConnectionManager,
}

impl RedisPublisher {
    /// `client`: as for [`RedisSubscriber::connect_client`] (RESP2 or RESP3 both work here).
    pub async fn connect_client(client: redis::Client) -> Result<Self, BrokerError> {
        let connection = client
            .get_connection_manager_with_config(manager_config())
            .await?;
        Ok(Self { connection })
    }
}

impl Publisher for RedisPublisher {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, BrokerError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let receivers = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(payload.as_ref())
                .query_async::<i64>(&mut connection)
                .await?;
            Ok(Some(usize::try_from(receivers).unwrap_or(0)))
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
    fn resp3_is_added_once() {
        assert_eq!(resp3_url("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(
            resp3_url("redis://h:1/?db=2"),
            "redis://h:1/?db=2&protocol=resp3"
        );
        assert_eq!(
            resp3_url("redis://h/?protocol=resp3"),
            "redis://h/?protocol=resp3"
        );
    }
}
