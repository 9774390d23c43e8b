//! The pub/sub leg: [`Publisher`] and [`Subscriber`], implemented in memory (standalone mode,
//! one process), on Redis pub/sub, on Redis Cluster's sharded pub/sub and on NATS.
//!
//! Guarantees every implementation keeps (the gateway relies on them):
//! - **Per-channel order, per publisher.** Payloads one publisher publishes on one channel reach
//!   every subscriber of that channel in publish order. Room-service assigns a room's offset and
//!   publishes in one atomic step (a Lua script in Redis, one lock in memory), so with Redis and
//!   memory publish order is offset order. NATS keeps it per publisher connection only: the
//!   gateway treats an offset that arrives early as a gap and repairs it from history.
//! - **Confirmed subscriptions.** [`Subscriber::subscribe`] returns once the broker has the
//!   subscription: a payload published after it returns is delivered.
//! - **Loss is announced, never silent.** When a link drops, the subscriber's sink gets
//!   [`BrokerEvent::Disconnected`]; payloads may have been missed until a later
//!   [`Subscriber::ping`] succeeds, by then every subscription is restored.
//! - **At most once.** A payload is delivered to a subscription once or (after a reported
//!   disconnection) not at all; nothing is redelivered.
//!
//! Incoming payloads are handed to a [`Sink`], called inline on the receiving task: it must not
//! block (the gateway's sink only does non-blocking queue pushes).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

pub mod cluster;
mod memory;
pub mod nats;
mod redis;

pub use memory::{MemoryBroker, MemorySubscriber};
pub use redis::{RedisPublisher, RedisSubscriber, resp3_url};

/// How long a health check waits for the broker.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What a subscriber is told.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A payload arrived on `channel`.
    Message { channel: Arc<str>, payload: Bytes },
    /// The link to the broker dropped; payloads may have been missed until it is back. The
    /// Redis and NATS subscribers reconnect and resubscribe by themselves.
    Disconnected,
}

/// Receives broker events; called inline, must not block.
pub type Sink = Arc<dyn Fn(BrokerEvent) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(#[from] ::redis::RedisError),
    #[error("broker did not answer in time")]
    Timeout,
    #[error("nats unavailable: {0}")]
    Nats(String),
    #[error(
        "unsupported broker url {0:?} (expected redis://, rediss://, redis+cluster:// or nats://)"
    )]
    UnsupportedUrl(String),
}

/// The receiving side, one per gateway: the sink it was made with gets the payloads of every
/// channel subscribed.
pub trait Subscriber: Send + Sync + 'static {
    /// Subscribes; returns once the broker confirmed (subscribing twice is one subscription).
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Checks the link, bounded in time; for Redis this also drives reconnection (and with it
    /// the resubscription) after the link dropped.
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// The sending side.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `payload` on `channel`; returns once the broker took it (Redis, memory) or the
    /// client queued it in order with the others (NATS). `Some(n)`: it reached `n` subscribers
    /// (Redis and memory know; NATS does not say).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Option<usize>, BrokerError>>;

    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// Both sides of one broker, as a gateway holds them.
#[derive(Clone)]
pub struct Broker {
    pub subscriber: Arc<dyn Subscriber>,
    pub publisher: Arc<dyn Publisher>,
}

/// Bounds a broker round trip by [`PING_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(PING_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(BrokerError::Timeout),
    }
}
