//! NATS as the pub/sub leg, the alternative to Redis pub/sub (`BROKER_URL=nats://…`).
//!
//! Channels map to subjects one to one. A NATS subject cannot hold an empty token (`a..b`) and
//! room names may contain dots, so a channel's dots become `~` (never part of a room name):
//! every channel is a single-token subject.
//!
//! Ordering: NATS keeps one publisher connection's order, not a global one. With several
//! room-service instances publishing to one room, a gateway can receive offset 6 before 5; the
//! gateway treats that as a gap, holds 6, fills 5 from history and drops the late 5 as a
//! duplicate, so clients still see offset order. The Redis broker never needs that repair.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::{BrokerError, BrokerEvent, Publisher, Sink, Subscriber};

/// How long a health check or a subscription waits for the server.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(1);

/// The subject of a channel.
pub fn subject(channel: &str) -> String {
    channel.replace('.', "~")
}

/// The channel of a subject.
pub fn channel(subject: &str) -> String {
    subject.replace('~', ".")
}

fn unavailable(error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Nats(error.to_string())
}

async fn connect_client(url: &str, sink: Option<Sink>) -> Result<async_nats::Client, BrokerError> {
    // Retry in the background when the server is not up yet: the caller starts, reports not
    // ready, and publishes fail until it is.
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("nats link lost");
                        if let Some(sink) = sink {
                            sink(BrokerEvent::Disconnected);
                        }
                    }
                    async_nats::Event::Connected => tracing::info!("nats link up"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            }
        });
    options.connect(url).await.map_err(unavailable)
}

/// Round trip to the server: once it returns, everything sent before was processed.
async fn round_trip(client: &async_nats::Client) -> Result<(), BrokerError> {
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, client.flush()).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(BrokerError::Timeout),
    }
}

/// A gateway's NATS subscriptions: one task per subscribed subject feeds the sink.
#[derive(Clone)]
pub struct NatsSubscriber {
    client: async_nats::Client,
    sink: Sink,
    /// The reading task of each subscribed channel; aborting it drops (unsubscribes) it.
    tasks: Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

impl NatsSubscriber {
    pub async fn connect(url: &str, sink: Sink) -> Result<Self, BrokerError> {
        let client = connect_client(url, Some(sink.clone())).await?;
        Ok(Self {
            client,
            sink,
            tasks: Arc::default(),
        })
    }

    /// Subscribes; returns once the server has the subscription.
    async fn add(&self, channel: &str) -> Result<(), BrokerError> {
        if self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(channel)
        {
            return Ok(());
        }
        let mut subscription = self
            .client
            .subscribe(subject(channel))
            .await
            .map_err(unavailable)?;
        round_trip(&self.client).await?;
        let sink = self.sink.clone();
        let name: Arc<str> = Arc::from(channel);
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                sink(BrokerEvent::Message {
                    channel: name.clone(),
                    payload: message.payload,
                });
            }
        });
        if let Some(previous) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel.to_owned(), task)
        {
            previous.abort();
        }
        Ok(())
    }

    fn remove(&self, channel: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(channel);
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl Subscriber for NatsSubscriber {
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.add(channel))
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.remove(channel);
        Box::pin(async { Ok(()) })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(round_trip(&self.client))
    }
}

/// room-service's side: publishes payloads on channels.
#[derive(Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
}

impl NatsPublisher {
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        Ok(Self {
            client: connect_client(url, None).await?,
        })
    }
}

impl Publisher for NatsPublisher {
    /// Hands the payload to the client, which sends it in order with the others.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, BrokerError>> {
        Box::pin(async move {
            self.client
                .publish(subject(channel), payload)
                .await
                .map_err(unavailable)?;
            Ok(None)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(round_trip(&self.client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_single_tokens_and_map_back() {
        for channel in ["rc:room:a.b", "rc:room:..x..", "rc:ctl", "rc:room:a:b-c_d"] {
            let s = subject(channel);
            assert!(!s.contains('.'), "{s}");
            assert!(!s.contains(' ') && !s.contains('*') && !s.contains('>'));
            assert_eq!(super::channel(&s), channel);
        }
    }
}
