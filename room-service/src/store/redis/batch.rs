//! Publishes reach Redis in batches: one `publish.lua` call carries every publish queued since
//! the previous call, in queue order; calls go at most one per interval (`PUBLISH_BATCH_MS`,
//! [`DEFAULT_INTERVAL`]) and at most [`MAX_IN_FLIGHT`] at a time. Under load a call carries
//! many messages, so Redis pays the script call, the read of the request, the write of the
//! reply and the writes to each subscribed gateway once per batch instead of once per message
//! (docs/benchmarks.md: about 45 µs of Redis CPU per call, 10 per message). A publish waits at
//! most the interval for its batch; one that comes after a quiet spell goes out at once.
//!
//! Order: a caller's messages are queued together and go in one call, in the order given, so
//! they get consecutive offsets in each room. Batches in flight at the same time hold only
//! publishes that were in flight at the same time too (a caller that waits for its answer
//! before publishing again queues after its batch came back), so running them concurrently
//! orders nothing that had an order.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use roomcast_common::broker::Publisher;
use roomcast_common::envelope::{room_channel, room_message};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::super::{Published, StoreError};
use super::lifetimes::Lifetimes;
use super::{Backend, OP_TIMEOUT, Scripts};

/// Most messages in one script call.
const MAX_BATCH_MESSAGES: usize = 256;
/// Least time between two script calls, unless a full batch is waiting.
pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_millis(2);
/// Most script calls out at once: with Redis or the machine slow to answer, the next batches
/// do not wait for the previous ones.
const MAX_IN_FLIGHT: usize = 4;
/// Most message bytes in one script call (a larger single message goes alone).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// One publish, encoded for `publish.lua` (see its header for the arguments).
pub(super) struct Message {
    /// epoch, seq, hist.
    pub keys: Vec<String>,
    /// The idempotency record's key, when the script looks it up or writes it.
    pub record_key: Option<String>,
    pub ttl_ms: u64,
    pub size: usize,
    /// Empty when another broker carries the broadcast.
    pub channel: String,
    pub room_json: String,
    pub client_id: String,
    pub user: String,
    pub data_json: String,
    /// `roomcast_common::frame::message_frame_sender`.
    pub sender: String,
    /// With an idempotency record: how long it is kept.
    pub window_ms: Option<u64>,
    /// Its idempotency key was never used before: nothing to look up (never set where the
    /// client may send a script call again, `Backend::MAY_RESEND`).
    pub key_unused: bool,
    /// A gateway's retry key whose record is the history entry (`publish.lua`, flag 4): the
    /// try's number. Set for rooms with history that outlives the retry window, and not where
    /// the client may send a script call again.
    pub try_number: Option<u64>,
    /// The room, for a broadcast on another broker.
    pub room: String,
}

impl Message {
    fn bytes(&self) -> usize {
        self.data_json.len() + self.sender.len() + self.user.len() + self.room.len() + 64
    }
}

/// A caller's messages and where their results go.
struct Job {
    messages: Vec<Message>,
    reply: oneshot::Sender<Result<Vec<Published>, StoreError>>,
}

/// What the sending task needs, apart from the queue.
pub(super) struct Sender<C> {
    pub connection: C,
    pub scripts: Arc<Scripts>,
    /// Another broker carrying the broadcasts (NATS): the task publishes on it after each
    /// batch, in order.
    pub external: Option<Arc<dyn Publisher>>,
    /// Least time between two script calls, unless a full batch is waiting.
    pub interval: Duration,
    pub lifetimes: Lifetimes,
}

/// The queue of publishes; the sending task ends when the last handle is dropped.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the sending task (on the current Tokio runtime).
    pub fn start<C: Backend>(sender: Sender<C>) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        tokio::spawn(Arc::new(sender).run(jobs));
        Batcher { queue }
    }

    /// Publishes `messages` in order; the results come back in the same order. Bounded like
    /// every store operation, waiting in the queue included: a caller that gave up is dropped
    /// from the queue, unless its batch is already out (then, as with any call that timed out,
    /// the publish may still be stored; its idempotency key makes a retry safe).
    pub async fn publish(&self, messages: Vec<Message>) -> Result<Vec<Published>, StoreError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, result) = oneshot::channel();
        let closed = || StoreError::Malformed("the publish queue is closed".into());
        self.queue
            .send(Job { messages, reply })
            .map_err(|_| closed())?;
        match tokio::time::timeout(OP_TIMEOUT, result).await {
            Ok(answer) => answer.map_err(|_| closed())?,
            Err(_) => Err(StoreError::Timeout(OP_TIMEOUT)),
        }
    }
}

impl<C: Backend> Sender<C> {
    async fn run(self: Arc<Self>, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let mut next: Option<Job> = None;
        let mut last_sent: Option<Instant> = None;
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            // While every slot is taken, publishes pile up for the next batch.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let first = match next.take() {
                Some(job) => job,
                None => match jobs.recv().await {
                    Some(job) => job,
                    None => return,
                },
            };
            if first.reply.is_closed() {
                continue;
            }
            let mut batch = Batch::new(first);
            while batch.take(&mut jobs, &mut next) {}
            // Close behind the previous call: let the batch fill up to the pacing interval.
            if let Some(due) = last_sent.map(|at| at + self.interval)
                && next.is_none()
                && batch.has_room()
                && Instant::now() < due
            {
                tokio::time::sleep_until(due).await;
                while batch.take(&mut jobs, &mut next) {}
            }
            last_sent = Some(Instant::now());
            let sender = self.clone();
            tokio::spawn(async move {
                let result = sender.send(&batch.jobs).await;
                sender.answer(batch.jobs, result).await;
                drop(slot);
            });
        }
    }

    /// The batch's script calls (one, or one per hash slot on a cluster), all out at once
    /// and bounded together like every store operation. One result per message.
    async fn send(&self, batch: &[Job]) -> Vec<Result<(Published, bool), StoreError>> {
        let messages: Vec<&Message> = batch.iter().flat_map(|job| &job.messages).collect();
        let rooms: Vec<&str> = messages.iter().map(|m| m.room.as_str()).collect();
        let groups = C::call_groups(&rooms);
        let sent_at = Instant::now();
        let lasting = self.lifetimes.lasting(
            messages.iter().map(|m| (m.room.as_str(), m.ttl_ms)),
            sent_at,
        );
        let calls = groups.iter().map(|group| {
            let group: Vec<(&Message, bool)> =
                group.iter().map(|&i| (messages[i], lasting[i])).collect();
            self.call(group)
        });
        let replies =
            match tokio::time::timeout(OP_TIMEOUT, futures_util::future::join_all(calls)).await {
                Ok(replies) => replies,
                Err(_) => {
                    return messages
                        .iter()
                        .map(|_| Err(StoreError::Timeout(OP_TIMEOUT)))
                        .collect();
                }
            };
        let mut results: Vec<Option<Result<(Published, bool), StoreError>>> =
            messages.iter().map(|_| None).collect();
        for (group, reply) in groups.iter().zip(replies) {
            match reply.and_then(|values| parse_reply(values, group.len())) {
                Ok(published) => {
                    for (&i, p) in group.iter().zip(published) {
                        results[i] = Some(Ok(p));
                    }
                }
                Err(error) => {
                    for &i in group {
                        results[i] = Some(Err(error.clone()));
                    }
                }
            }
        }
        // A message stored by a call that was not `lasting` refreshed its room.
        self.lifetimes.refreshed(
            messages
                .iter()
                .zip(&lasting)
                .zip(&results)
                .filter(|((_, lasting), result)| {
                    !**lasting && matches!(result, Some(Ok((_, true))))
                })
                .map(|((m, _), _)| (m.room.as_str(), m.ttl_ms)),
            sent_at,
        );
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Malformed("publish reply".into()))))
            .collect()
    }

    /// One script call for `messages` (each with whether it is `lasting`), whose keys share a
    /// slot on a cluster.
    async fn call(&self, messages: Vec<(&Message, bool)>) -> Result<Vec<Value>, StoreError> {
        let mut invocation = self.scripts.publish.prepare_invoke();
        let flags: String = messages
            .iter()
            .map(|&(message, lasting)| {
                char::from(
                    b'0' + u8::from(lasting)
                        + 2 * u8::from(message.key_unused)
                        + 4 * u8::from(message.try_number.is_some()),
                )
            })
            .collect();
        let retry_window = messages
            .iter()
            .filter(|(message, _)| message.try_number.is_some())
            .filter_map(|(message, _)| message.window_ms)
            .max()
            .unwrap_or(0);
        invocation
            .arg(messages.len())
            .arg(super::super::new_epoch())
            .arg(C::BROADCAST)
            .arg(flags)
            .arg(retry_window);
        for (message, _) in &messages {
            for key in &message.keys {
                invocation.key(key);
            }
            if let Some(key) = &message.record_key {
                invocation.key(key);
            }
            invocation
                .arg(message.ttl_ms)
                .arg(message.size)
                .arg(&message.channel)
                .arg(&message.room_json)
                .arg(&message.client_id)
                .arg(&message.user)
                .arg(&message.data_json)
                .arg(&message.sender);
            match (message.try_number, message.window_ms) {
                (Some(n), _) => invocation.arg(n),
                (None, Some(window)) => invocation.arg(window),
                (None, None) => invocation.arg(""),
            };
        }
        let mut connection = self.connection.clone();
        invocation
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::from_redis)
    }

    /// Broadcasts on the other broker (in order), then hands each caller its results: all of
    /// them, or the first error among its messages (a message in another failed call may
    /// still be stored; idempotency keys make the retry safe).
    async fn answer(&self, batch: Vec<Job>, results: Vec<Result<(Published, bool), StoreError>>) {
        let mut results = results.into_iter();
        for job in batch {
            let mut answer = Ok(Vec::with_capacity(job.messages.len()));
            for message in &job.messages {
                let result = results
                    .next()
                    .unwrap_or_else(|| Err(StoreError::Malformed("publish reply".into())));
                match result {
                    Ok((p, fresh)) => {
                        if fresh && let Some(external) = &self.external {
                            broadcast(external.as_ref(), message, &p).await;
                        }
                        if let Ok(published) = &mut answer {
                            published.push(p);
                        }
                    }
                    Err(error) => {
                        if answer.is_ok() {
                            answer = Err(error);
                        }
                    }
                }
            }
            let _ = job.reply.send(answer);
        }
    }
}

/// The jobs of one script call.
struct Batch {
    jobs: Vec<Job>,
    count: usize,
    bytes: usize,
}

impl Batch {
    fn new(first: Job) -> Self {
        let mut batch = Batch {
            jobs: Vec::new(),
            count: 0,
            bytes: 0,
        };
        batch.add(first);
        batch
    }

    fn add(&mut self, job: Job) {
        self.count += job.messages.len();
        self.bytes += job.messages.iter().map(Message::bytes).sum::<usize>();
        self.jobs.push(job);
    }

    fn has_room(&self) -> bool {
        self.count < MAX_BATCH_MESSAGES && self.bytes < MAX_BATCH_BYTES
    }

    /// Adds the next queued job if it fits; one that does not is left in `next` for the
    /// following batch. Returns whether to try again.
    fn take(&mut self, jobs: &mut mpsc::UnboundedReceiver<Job>, next: &mut Option<Job>) -> bool {
        if !self.has_room() || next.is_some() {
            return false;
        }
        let Ok(job) = jobs.try_recv() else {
            return false;
        };
        if job.reply.is_closed() {
            // Its caller gave up waiting.
            return true;
        }
        let bytes: usize = job.messages.iter().map(Message::bytes).sum();
        if self.count + job.messages.len() > MAX_BATCH_MESSAGES
            || self.bytes + bytes > MAX_BATCH_BYTES
        {
            *next = Some(job);
            return false;
        }
        self.add(job);
        true
    }
}

/// With another broker, room-service publishes after the script. A failure loses only the live
/// broadcast: the message is in history, and gateways fill the gap when the next one arrives.
async fn broadcast(external: &dyn Publisher, message: &Message, published: &Published) {
    let payload = room_message(
        &message.room,
        published.offset,
        &published.epoch,
        &message.user,
        &message.client_id,
        &message.data_json,
    );
    let channel = room_channel(&message.room);
    if let Err(error) = external.publish(&channel, payload).await {
        tracing::warn!(channel, %error, "broadcast not published on the broker");
    }
}

/// `{epoch, offset, fresh}` per message, for `count` messages.
fn parse_reply(reply: Vec<Value>, count: usize) -> Result<Vec<(Published, bool)>, StoreError> {
    if reply.len() != count * 3 {
        return Err(StoreError::Malformed("publish reply".into()));
    }
    reply
        .chunks(3)
        .map(|triple| {
            let malformed =
                |e: redis::ParsingError| StoreError::Malformed(format!("publish reply: {e}"));
            let epoch: String = redis::from_redis_value_ref(&triple[0]).map_err(malformed)?;
            let offset: u64 = redis::from_redis_value_ref(&triple[1]).map_err(malformed)?;
            let fresh: i64 = redis::from_redis_value_ref(&triple[2]).map_err(malformed)?;
            if fresh == 2 {
                return Err(StoreError::Unsure);
            }
            Ok((Published { epoch, offset }, fresh == 1))
        })
        .collect()
}
