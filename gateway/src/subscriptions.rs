//! Keeps this gateway subscribed to exactly the rooms it has members in.
//!
//! One task owns the reference counts and issues SUBSCRIBE/UNSUBSCRIBE one at a time, in the
//! order requests arrive. That serialization is what makes it correct: a join that finds the
//! room already counted returns only after the earlier SUBSCRIBE was confirmed, and an
//! UNSUBSCRIBE can never overtake a later SUBSCRIBE of the same room.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use roomcast_common::broker::{BrokerError, Subscriber};
use roomcast_common::envelope::room_channel;
use roomcast_common::ops::Readiness;

use crate::hub::Hub;
use tokio::sync::{mpsc, oneshot};

enum Request {
    Acquire {
        room: Arc<str>,
        done: oneshot::Sender<Result<(), Arc<BrokerError>>>,
    },
    Release {
        room: Arc<str>,
    },
}

/// Handle to the subscription task; cheap to clone.
#[derive(Clone)]
pub struct Subscriptions {
    tx: mpsc::UnboundedSender<Request>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("broker unavailable: {0}")]
    Broker(Arc<BrokerError>),
    #[error("subscription task stopped")]
    Stopped,
}

impl Subscriptions {
    /// Starts the task. It also pings the broker every `health_every` and reports the result
    /// in `readiness`.
    /// After a lost link, the first successful ping means the link is back with every
    /// subscription restored; then the hub checks its rooms against history.
    pub fn start(
        subscriber: Arc<dyn Subscriber>,
        readiness: Readiness,
        health_every: Duration,
        hub: Arc<Hub>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(subscriber, rx, readiness, health_every, hub));
        Self { tx }
    }

    /// Counts one more local member of `room`; returns once the gateway is subscribed to it.
    pub async fn acquire(&self, room: Arc<str>) -> Result<(), SubscribeError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request::Acquire { room, done })
            .map_err(|_| SubscribeError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SubscribeError::Broker(error)),
            Err(_) => Err(SubscribeError::Stopped),
        }
    }

    /// Counts one member less; the last one out unsubscribes.
    pub fn release(&self, room: Arc<str>) {
        let _ = self.tx.send(Request::Release { room });
    }
}

async fn run(
    subscriber: Arc<dyn Subscriber>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    readiness: Readiness,
    health_every: Duration,
    hub: Arc<Hub>,
) {
    let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
    let mut health = tokio::time::interval(health_every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = None;
    loop {
        let request = tokio::select! {
            request = rx.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = health.tick() => {
                // Read before the ping: a ping sent after the loss succeeds only on the new link.
                let lost = hub.link_was_lost();
                let result = subscriber.ping().await;
                let healthy = result.is_ok();
                if healthy && lost {
                    hub.check_after_link_loss();
                }
                readiness.set(healthy);
                if was_healthy != Some(healthy) {
                    match result {
                        Ok(()) => tracing::info!("broker reachable: ready"),
                        Err(error) => tracing::warn!(%error, "broker unreachable: not ready"),
                    }
                    was_healthy = Some(healthy);
                }
                continue;
            }
        };
        match request {
            Request::Acquire { room, done } => {
                if let Some(count) = counts.get_mut(&room) {
                    *count += 1;
                    let _ = done.send(Ok(()));
                    continue;
                }
                match subscriber.subscribe(&room_channel(&room)).await {
                    Ok(()) => {
                        counts.insert(room, 1);
                        metrics::gauge!("roomcast_gateway_subscribed_rooms").increment(1);
                        let _ = done.send(Ok(()));
                    }
                    Err(error) => {
                        tracing::warn!(%room, %error, "subscribe failed");
                        let _ = done.send(Err(Arc::new(error)));
                    }
                }
            }
            Request::Release { room } => {
                let Some(count) = counts.get_mut(&room) else {
                    continue;
                };
                *count -= 1;
                if *count > 0 {
                    continue;
                }
                counts.remove(&room);
                metrics::gauge!("roomcast_gateway_subscribed_rooms").decrement(1);
                if let Err(error) = subscriber.unsubscribe(&room_channel(&room)).await {
                    // Only costs traffic: the hub drops payloads for rooms without members.
                    tracing::warn!(%room, %error, "unsubscribe failed");
                }
            }
        }
    }
}
