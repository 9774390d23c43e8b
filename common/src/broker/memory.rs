//! The in-process broker of standalone mode.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{BrokerError, BrokerEvent, Publisher, Sink, Subscriber};

type Subscribers = HashMap<Arc<str>, Vec<(u64, Sink)>>;

/// Publishing calls every subscriber's sink synchronously, so a publisher that holds its own
/// lock while publishing gets publish order = delivery order.
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
        let subscribers = self.lock();
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Publisher for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, BrokerError>> {
        let receivers = MemoryBroker::publish(self, channel, payload);
        Box::pin(async move { Ok(Some(receivers)) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// One subscriber of a [`MemoryBroker`]; its subscriptions end when it is dropped.
pub struct MemorySubscriber {
    broker: MemoryBroker,
    id: u64,
    sink: Sink,
}

impl MemorySubscriber {
    fn add(&self, channel: &str) {
        let mut subscribers = self.broker.lock();
        let sinks = subscribers.entry(Arc::from(channel)).or_default();
        if !sinks.iter().any(|(id, _)| *id == self.id) {
            sinks.push((self.id, self.sink.clone()));
        }
    }

    fn remove(&self, channel: &str) {
        let mut subscribers = self.broker.lock();
        if let Some(sinks) = subscribers.get_mut(channel) {
            sinks.retain(|(id, _)| *id != self.id);
            if sinks.is_empty() {
                subscribers.remove(channel);
            }
        }
    }
}

impl Subscriber for MemorySubscriber {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.add(channel);
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.remove(channel);
        Box::pin(async { Ok(()) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Drop for MemorySubscriber {
    fn drop(&mut self) {
        self.broker.lock().retain(|_, sinks| {
            sinks.retain(|(id, _)| *id != self.id);
            !sinks.is_empty()
        });
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
        let sub: Box<dyn Subscriber> = Box::new(broker.subscriber(sink));
        assert_eq!(broker.publish("a", Bytes::from_static(b"0")), 0);
        sub.subscribe("a").await.unwrap();
        sub.subscribe("a").await.unwrap();
        for i in 1..=3 {
            assert_eq!(broker.publish("a", Bytes::from(i.to_string())), 1);
        }
        broker.publish("b", Bytes::from_static(b"other"));
        Publisher::publish(&broker, "a", Bytes::from_static(b"4"))
            .await
            .unwrap();
        sub.unsubscribe("a").await.unwrap();
        broker.publish("a", Bytes::from_static(b"late"));
        let seen = seen.lock().unwrap().clone();
        let payloads: Vec<_> = seen.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(payloads, vec!["1", "2", "3", "4"]);
    }

    #[test]
    fn dropping_a_subscriber_removes_it() {
        let broker = MemoryBroker::new();
        let (sink, _) = collecting_sink();
        let sub = broker.subscriber(sink);
        sub.add("a");
        drop(sub);
        assert_eq!(broker.publish("a", Bytes::new()), 0);
    }
}
