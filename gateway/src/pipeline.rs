//! A connection's publishes, pipelined. The reader does not wait for each publish's round
//! trip to the room-service before reading the next frame: publishes accepted while a call is
//! in flight queue up and go together as one ordered `PublishBatch` when it returns. So one
//! connection's publish rate is bounded by batch size / round trip, not 1 / round trip, and
//! its messages are still stored in the order it sent them (one batch at a time, each stored
//! in order). Batches of different connections that are ready at the same moment go to the
//! room-service as one call (the gateway's publish batcher, `backend.rs`).
//!
//! Replies keep the order of the commands: a publish the gateway refuses itself (not joined,
//! rate limit) while others are pending is answered in its place in the queue. Any other
//! command waits until the pipeline is empty ([`Publishes::flush`]), so "a publish sent after
//! a join sees the join" and "a read sent after a publish sees it" hold as before.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use roomcast_common::telemetry::TRACING_ONLY;
use roomcast_proto as pb;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tonic::Status;

use crate::batcher::Pending;
use crate::outbound::ConnHandle;
use crate::protocol::ServerFrame;
use crate::socket;
use crate::state::Gateway;

/// Most publishes in one batch (the room-service accepts up to 1024).
const MAX_BATCH: usize = 256;
/// Most payload bytes in one batch: well inside a 4 MiB gRPC message.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most publishes a connection may have queued or in flight; past it the reader waits for the
/// batch in flight before reading on, so a client that sends faster than its publishes are
/// stored is slowed down by TCP rather than held in memory.
pub const MAX_OWED: usize = 1024;

/// One publish in the queue: to be stored, or already answered by the gateway.
enum Entry {
    Publish {
        id: Option<u64>,
        room: Arc<str>,
        request: pb::PublishRequest,
    },
    Answered(Utf8Bytes),
}

/// What a batch answers, in order: the `id` and room of each publish sent, or a reply that was
/// already decided.
enum Slot {
    Sent { id: Option<u64>, room: Arc<str> },
    Answered(Utf8Bytes),
}

type BatchResult = Result<pb::PublishBatchResponse, Status>;

/// A returned batch, for [`Publishes::finish`].
pub struct Done(Vec<Slot>, BatchResult);

/// The queue and the batch in flight. Idle, it holds no heap memory.
#[derive(Default)]
pub struct Publishes {
    /// Replies owed: entries queued or in flight.
    owed: usize,
    queued: VecDeque<Entry>,
    /// What the batch in flight answers, and its call: handed to the gateway's publish
    /// batcher, which finishes storing what it carries even if the connection ends.
    in_flight: Option<(Vec<Slot>, Pending<pb::PublishBatchResponse>)>,
}

impl Publishes {
    /// Nothing queued and nothing in flight: a reply may go out directly.
    pub fn is_idle(&self) -> bool {
        self.queued.is_empty() && self.in_flight.is_none()
    }

    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// As many replies owed as a connection may have: wait for the batch in flight.
    pub fn is_full(&self) -> bool {
        self.owed >= MAX_OWED
    }

    /// Queues a publish; starts a batch when none is in flight.
    pub fn push(
        &mut self,
        gateway: &Arc<Gateway>,
        id: Option<u64>,
        room: Arc<str>,
        request: pb::PublishRequest,
    ) {
        self.queued.push_back(Entry::Publish { id, room, request });
        self.owed += 1;
        if self.in_flight.is_none() {
            self.start(gateway, false);
        }
    }

    /// Queues a reply the gateway decided itself, to go out in its place.
    pub fn push_answered(&mut self, reply: Utf8Bytes) {
        self.queued.push_back(Entry::Answered(reply));
        self.owed += 1;
    }

    /// Resolves when the batch in flight returns; never resolves when none is. Cancel-safe:
    /// dropped before it resolves, the batch stays in flight.
    pub async fn next_done(&mut self) -> Done {
        let Some((_, call)) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let result = match call.await {
            Ok(result) => result,
            // The call was dropped: nothing can say which of its publishes were stored.
            Err(_) => Err(Status::internal("publish call dropped")),
        };
        let slots = self
            .in_flight
            .take()
            .map(|(slots, _)| slots)
            .unwrap_or_default();
        Done(slots, result)
    }

    /// Sends the replies of a returned batch, then starts the next one.
    pub async fn finish(&mut self, done: Done, conn: &ConnHandle, gateway: &Arc<Gateway>) {
        let Done(slots, result) = done;
        let mut results = match result {
            Ok(response) => Ok(response.results.into_iter()),
            Err(status) => Err(status),
        };
        // A batch's replies go out together: one write when the writer is idle.
        let mut replies = Vec::with_capacity(slots.len());
        for slot in slots {
            let reply = match slot {
                Slot::Answered(reply) => reply,
                Slot::Sent { id, room } => {
                    let outcome = match &mut results {
                        Ok(results) => results.next().and_then(|r| r.outcome),
                        Err(status) => Some(pb::publish_result::Outcome::Error(pb::PublishError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })),
                    };
                    reply_for(id, &room, outcome)
                }
            };
            replies.push(reply);
        }
        // Replies decided while nothing was left to store go out now.
        while let Some(Entry::Answered(_)) = self.queued.front() {
            if let Some(Entry::Answered(reply)) = self.queued.pop_front() {
                replies.push(reply);
            }
        }
        self.owed = self.owed.saturating_sub(replies.len());
        conn.reply_texts(replies, socket::text, MAX_OWED);
        if !self.queued.is_empty() {
            // These waited for the batch just returned: their call is not paced again.
            self.start(gateway, true);
        }
    }

    /// Waits until everything queued is stored and answered.
    pub async fn flush(&mut self, conn: &ConnHandle, gateway: &Arc<Gateway>) {
        while self.in_flight.is_some() {
            let done = self.next_done().await;
            self.finish(done, conn, gateway).await;
        }
    }

    /// Sends the front of the queue as one batch; `next` when it waited for the batch before.
    fn start(&mut self, gateway: &Arc<Gateway>, next: bool) {
        let mut slots = Vec::new();
        let mut publishes = Vec::new();
        let mut bytes = 0usize;
        while let Some(entry) = self.queued.front() {
            if let Entry::Publish { request, .. } = entry {
                let size = request.data_json.len();
                if !publishes.is_empty()
                    && (publishes.len() >= MAX_BATCH || bytes + size > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += size;
            }
            match self.queued.pop_front() {
                Some(Entry::Publish { id, room, request }) => {
                    slots.push(Slot::Sent { id, room });
                    publishes.push(request);
                }
                Some(Entry::Answered(reply)) => slots.push(Slot::Answered(reply)),
                None => break,
            }
        }
        if publishes.is_empty() {
            // Only decided replies: nothing to send (finish() emits them).
            self.queued
                .extend(slots.into_iter().filter_map(|slot| match slot {
                    Slot::Answered(reply) => Some(Entry::Answered(reply)),
                    Slot::Sent { .. } => None,
                }));
            return;
        }
        static BATCH_SIZE: OnceLock<metrics::Histogram> = OnceLock::new();
        roomcast_common::ops::cached(&BATCH_SIZE, || {
            metrics::histogram!("roomcast_gateway_publish_batch_size")
        })
        .record(publishes.len() as f64);
        // One trace per batch (its own root, whatever the reader was doing), the room-service's
        // `PublishBatch` its child. Disabled, as without an exporter, it costs nothing here.
        let span = tracing::info_span!(
            target: TRACING_ONLY,
            parent: None,
            "gateway.publish",
            publishes = publishes.len(),
            user = %publishes[0].user,
        );
        let call =
            gateway
                .backends
                .submit_publishes(pb::PublishBatchRequest { publishes }, span, next);
        self.in_flight = Some((slots, call));
    }
}

/// The reply to one publish of a batch.
fn reply_for(
    id: Option<u64>,
    room: &str,
    outcome: Option<pb::publish_result::Outcome>,
) -> Utf8Bytes {
    match outcome {
        Some(pb::publish_result::Outcome::Published(published)) => ServerFrame::Published {
            id,
            room,
            offset: published.offset,
        }
        .to_json()
        .into(),
        Some(pb::publish_result::Outcome::Error(error)) => {
            let status = Status::new(tonic::Code::from_i32(error.code), error.message);
            crate::protocol::error_frame(id, &status).into()
        }
        None => crate::protocol::error_frame(
            id,
            &Status::internal("the room service gave no result for this publish"),
        )
        .into(),
    }
}
