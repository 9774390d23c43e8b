//! The pub/sub leg. Two implementations behind one enum, as pairs: in-memory (standalone mode,
//! one process) and Redis (a cluster).
//!
//! Delivery contract: payloads published on one channel reach every subscriber of that channel
//! in publish order. Room-service relies on it for offset order: it assigns an offset and
//! publishes in one atomic step (a Lua script in Redis, one lock in memory), so publish order is
//! offset order.
//!
//! Incoming payloads are handed to a [`Sink`], called inline on the receiving task: it must not
//! block (the gateway's sink only does non-blocking queue pushes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use redis::aio::ConnectionManager;

/// How long a health check waits for the broker.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What a subscriber is told.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A payload arrived on `channel`.
    Message { channel: Arc<str>, payload: Bytes },
    /// The link to the broker dropped; payloads may have been missed until it is back. The
    /// Redis subscriber reconnects and resubscribes by itself.
    Disconnected,
}

/// Receives broker events; called inline, must not block.
pub type Sink = Arc<dyn Fn(BrokerEvent) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("broker did not answer in time")]
    Timeout,
    #[error("nats unavailable: {0}")]
    Nats(String),
    #[error("unsupported broker url {0:?} (expected redis://, rediss:// or nats://)")]
    UnsupportedUrl(String),
}

type Subscribers = HashMap<Arc<str>, Vec<(u64, Sink)>>;

/// In-process broker for standalone mode. Publishing calls every subscriber's sink synchronously,
/// so a publisher that holds its own lock while publishing gets publish order = delivery order.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    subscribers: Arc<Mutex<Subscribers>>,
    next_id: Arc<AtomicU64>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers `payload` to the current subscribers of `channel`; returns how many there were.
    pub fn publish(&self, channel: &str, payload: Bytes) -> usize {
        let subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let Some((name, sinks)) = subscribers.get_key_value(channel) else {
            return 0;
        };
        for (_, sink) in sinks {
            sink(BrokerEvent::Message {
                channel: name.clone(),
                payload: payload.clone(),
            });
        }
        sinks.len()
    }

    pub fn subscriber(&self, sink: Sink) -> MemorySubscriber {
        MemorySubscriber {
            broker: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sink,
        }
    }
}

/// One subscriber of a [`MemoryBroker`]; its subscriptions end when it is dropped.
pub struct MemorySubscriber {
    broker: MemoryBroker,
    id: u64,
    sink: Sink,
}

impl MemorySubscriber {
    fn subscribe(&self, channel: &str) {
        let mut subscribers = self
            .broker
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let sinks = subscribers.entry(Arc::from(channel)).or_default();
        if !sinks.iter().any(|(id, _)| *id == self.id) {
            sinks.push((self.id, self.sink.clone()));
        }
    }

    fn unsubscribe(&self, channel: &str) {
        let mut subscribers = self
            .broker
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(sinks) = subscribers.get_mut(channel) {
            sinks.retain(|(id, _)| *id != self.id);
            if sinks.is_empty() {
                subscribers.remove(channel);
            }
        }
    }
}

impl Drop for MemorySubscriber {
    fn drop(&mut self) {
        let mut subscribers = self
            .broker
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|_, sinks| {
            sinks.retain(|(id, _)| *id != self.id);
            !sinks.is_empty()
        });
    }
}

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

/// Redis subscriber: one multiplexed connection that reconnects with backoff and resubscribes
/// its channels by itself.
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
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_max_delay(std::time::Duration::from_secs(2))
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

/// A gateway's subscription handle, whichever broker is behind it.
pub enum Subscriber {
    Memory(MemorySubscriber),
    Redis(RedisSubscriber),
    Nats(crate::nats::NatsSubscriber),
}

impl Subscriber {
    /// Subscribes; returns once the broker confirmed, so payloads published afterwards arrive.
    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        match self {
            Subscriber::Memory(m) => m.subscribe(channel),
            Subscriber::Redis(r) => r.connection.clone().subscribe(channel).await?,
            Subscriber::Nats(n) => n.subscribe(channel).await?,
        }
        Ok(())
    }

    /// Checks the link to the broker; for Redis this also drives reconnection (and with it the
    /// automatic resubscription) after the link dropped.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        match self {
            Subscriber::Memory(_) => Ok(()),
            Subscriber::Redis(r) => {
                let mut connection = r.connection.clone();
                // While the manager reconnects, commands wait for it: bound the wait.
                let command = redis::cmd("PING");
                let ping = command.query_async::<()>(&mut connection);
                match tokio::time::timeout(PING_TIMEOUT, ping).await {
                    Ok(result) => Ok(result?),
                    Err(_) => Err(BrokerError::Timeout),
                }
            }
            Subscriber::Nats(n) => n.ping().await,
        }
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        match self {
            Subscriber::Memory(m) => m.unsubscribe(channel),
            Subscriber::Redis(r) => r.connection.clone().unsubscribe(channel).await?,
            Subscriber::Nats(n) => n.unsubscribe(channel).await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

    fn collecting_sink() -> (Sink, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let sink: Sink = Arc::new(move |event| {
            if let BrokerEvent::Message { channel, payload } = event {
                seen2.lock().unwrap().push((channel.to_string(), payload));
            }
        });
        (sink, seen)
    }

    #[tokio::test]
    async fn memory_broker_delivers_only_to_subscribers_in_order() {
        let broker = MemoryBroker::new();
        let (sink, seen) = collecting_sink();
        let sub = Subscriber::Memory(broker.subscriber(sink));
        assert_eq!(broker.publish("a", Bytes::from_static(b"0")), 0);
        sub.subscribe("a").await.unwrap();
        sub.subscribe("a").await.unwrap();
        for i in 1..=3 {
            assert_eq!(broker.publish("a", Bytes::from(i.to_string())), 1);
        }
        broker.publish("b", Bytes::from_static(b"other"));
        sub.unsubscribe("a").await.unwrap();
        broker.publish("a", Bytes::from_static(b"late"));
        let seen = seen.lock().unwrap().clone();
        let payloads: Vec<_> = seen.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(payloads, vec!["1", "2", "3"]);
    }

    #[test]
    fn dropping_a_subscriber_removes_it() {
        let broker = MemoryBroker::new();
        let (sink, _) = collecting_sink();
        let sub = broker.subscriber(sink);
        sub.subscribe("a");
        drop(sub);
        assert_eq!(broker.publish("a", Bytes::new()), 0);
    }

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
