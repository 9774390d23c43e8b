//! Publishers that are another backend: lanes publishing through the server API
//! (`ServerApi.Publish`, or `PublishBatch` with `--batch`). Calls are pipelined (up to
//! --max-in-flight publishes at once over one HTTP/2 connection), so concurrent calls may be
//! ordered either way by the server.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use roomcast_proto::publish_result::Outcome;
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_proto::{RoomStatsRequest, ServerPublishBatchRequest, ServerPublishRequest};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::report::Reasons;
use crate::scenarios::context::{Ctx, Window, step_done};
use crate::scenarios::{Pacer, unix_ns};

/// The room-service server API, reachable and accepting our key.
#[derive(Clone)]
pub struct ApiTarget {
    client: ServerApiClient<Channel>,
    auth: AsciiMetadataValue,
    in_flight: Arc<Semaphore>,
    /// Set with `--batch` above 1: where the lanes' publishes go instead of `Publish`.
    batcher: Option<Batcher>,
}

/// What a publish came to: `Err` holds the reason counted in the report.
type CallOutcome = Result<(), String>;

/// Hands publishes to the task that gathers them into `PublishBatch` calls.
#[derive(Clone)]
struct Batcher {
    queue: mpsc::UnboundedSender<(ServerPublishRequest, oneshot::Sender<CallOutcome>)>,
}

impl Batcher {
    /// Starts the gathering task: a call takes whatever piled up (up to `max`) once one of its
    /// `calls` slots is free, so batches grow with the load and a lone publish goes at once.
    fn start(
        client: ServerApiClient<Channel>,
        auth: AsciiMetadataValue,
        max: usize,
        calls: usize,
    ) -> Self {
        let (queue, mut pending) =
            mpsc::unbounded_channel::<(ServerPublishRequest, oneshot::Sender<CallOutcome>)>();
        let slots = Arc::new(Semaphore::new(calls.max(1)));
        tokio::spawn(async move {
            while let Some(first) = pending.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match pending.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let (publishes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let mut request = tonic::Request::new(ServerPublishBatchRequest { publishes });
                request.metadata_mut().insert("authorization", auth.clone());
                let mut client = client.clone();
                tokio::spawn(async move {
                    let outcomes: Vec<CallOutcome> = match client.publish_batch(request).await {
                        Ok(response) => response
                            .into_inner()
                            .results
                            .into_iter()
                            .map(|result| match result.outcome {
                                Some(Outcome::Published(_)) => Ok(()),
                                Some(Outcome::Error(error)) => {
                                    Err(grpc_reason(tonic::Code::from(error.code)))
                                }
                                None => Err("no_outcome".into()),
                            })
                            .collect(),
                        Err(status) => vec![Err(grpc_reason(status.code())); replies.len()],
                    };
                    drop(slot);
                    let mut outcomes = outcomes.into_iter();
                    for reply in replies {
                        let outcome = outcomes.next().unwrap_or(Err("no_outcome".into()));
                        let _ = reply.send(outcome);
                    }
                });
            }
        });
        Batcher { queue }
    }

    async fn publish(&self, request: ServerPublishRequest) -> CallOutcome {
        let (reply, outcome) = oneshot::channel();
        if self.queue.send((request, reply)).is_err() {
            return Err("batcher_gone".into());
        }
        outcome.await.unwrap_or(Err("batcher_gone".into()))
    }
}

/// What one lane did.
#[derive(Debug, Default)]
pub struct LaneResult {
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub errors: Reasons,
}

/// Connects and makes one cheap server-API call, so a wrong address or key is reported
/// before any subscriber connects.
///
/// With `batch` above 1, publishes go out as `PublishBatch` calls of up to `batch`, with as
/// many calls in flight as `max_in_flight` publishes allow.
pub async fn connect(
    url: &str,
    key: &str,
    max_in_flight: u32,
    batch: u32,
    timeout: Duration,
) -> Result<ApiTarget> {
    let mut target = connect_plain(url, key, max_in_flight, timeout).await?;
    if batch > 1 {
        let calls = (max_in_flight / batch).max(1) as usize;
        target.batcher = Some(Batcher::start(
            target.client.clone(),
            target.auth.clone(),
            batch as usize,
            calls,
        ));
    }
    Ok(target)
}

async fn connect_plain(
    url: &str,
    key: &str,
    max_in_flight: u32,
    timeout: Duration,
) -> Result<ApiTarget> {
    let channel = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad gRPC URL {url}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the room-service at {url}"))?;
    let auth: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {key}"))
        .context("the API key must be printable ASCII")?;
    let target = ApiTarget {
        client: ServerApiClient::new(channel),
        auth,
        in_flight: Arc::new(Semaphore::new(max_in_flight as usize)),
        batcher: None,
    };
    let mut request = tonic::Request::new(RoomStatsRequest {
        room: "loadgen-probe".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", target.auth.clone());
    target
        .client
        .clone()
        .room_stats(request)
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
        .with_context(|| format!("checking the server API at {url} (RoomStats)"))?;
    Ok(target)
}

/// Starts `lanes` publishing lanes for one window; lane i publishes into room i mod R. They
/// end when their window's calls are answered, or at `stop`.
pub fn spawn_lanes(
    ctx: Arc<Ctx>,
    target: ApiTarget,
    lanes: u32,
    window: Window,
    stop: CancellationToken,
) -> JoinSet<LaneResult> {
    let mut set = JoinSet::new();
    for index in 0..lanes {
        let room = index as usize % ctx.rooms.len();
        let phase = Duration::from_secs_f64(f64::from(index) / window.rate);
        let pacer = Pacer::new(window.begin + phase, window.rate / f64::from(lanes));
        set.spawn(lane(
            ctx.clone(),
            target.clone(),
            room,
            pacer,
            window,
            stop.clone(),
        ));
    }
    set
}

async fn lane(
    ctx: Arc<Ctx>,
    target: ApiTarget,
    room: usize,
    mut pacer: Pacer,
    window: Window,
    stop: CancellationToken,
) -> LaneResult {
    let shared = &ctx.shared;
    let mut result = LaneResult::default();
    let Some(st) = shared.step(window.step) else {
        return result;
    };
    let mut calls = FuturesUnordered::new();
    let mut seq = 0u64;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // Set once the window is over by the clock: a lane that fell behind its schedule does not
    // send the rest after the window (counted as published in it, they would overstate the
    // rate the servers kept up with); they are never sent, which `sent` shows.
    let mut over = false;
    loop {
        let due = pacer.due();
        let publishing = !over && due < window.end;
        if !publishing && calls.is_empty() {
            break;
        }
        tokio::select! {
            _ = &mut stopped => break,
            Some((sent_at, outcome)) = calls.next(), if !calls.is_empty() => {
                match outcome {
                    Ok(()) => {
                        result.acked += 1;
                        shared.acked.fetch_add(1, Relaxed);
                        st.acked.fetch_add(1, Relaxed);
                        st.acked_per_room[room].fetch_add(1, Relaxed);
                        st.ack_latency.record(room as u64, unix_ns().saturating_sub(sent_at) / 1000);
                    }
                    Err(code) => {
                        let code: String = code;
                        st.error(&code);
                        *result.errors.entry(code).or_default() += 1;
                    }
                }
            }
            permit = async {
                tokio::time::sleep_until(due.into()).await;
                target.in_flight.clone().acquire_owned().await
            }, if publishing => {
                let Ok(permit) = permit else { break };
                if Instant::now() >= window.end {
                    over = true;
                    continue;
                }
                seq += 1;
                let t = unix_ns();
                let data_json = if ctx.tag_steps {
                    format!("{{\"t\":{t},\"q\":{seq},\"s\":{},\"p\":\"{}\"}}", window.step, ctx.filler)
                } else {
                    format!("{{\"t\":{t},\"q\":{seq},\"p\":\"{}\"}}", ctx.filler)
                };
                let publish = ServerPublishRequest {
                    room: ctx.rooms[room].clone(),
                    data_json,
                    user: "loadgen".into(),
                    idempotency_key: String::new(),
                };
                let mut client = target.client.clone();
                let auth = target.auth.clone();
                let batcher = target.batcher.clone();
                calls.push(async move {
                    let outcome = match batcher {
                        Some(batcher) => batcher.publish(publish).await,
                        None => {
                            let mut request = tonic::Request::new(publish);
                            request.metadata_mut().insert("authorization", auth);
                            client
                                .publish(request)
                                .await
                                .map(|_| ())
                                .map_err(|s| grpc_reason(s.code()))
                        }
                    };
                    drop(permit);
                    (t, outcome)
                });
                pacer.advance();
                result.sent += 1;
                shared.sent.fetch_add(1, Relaxed);
                st.sent.fetch_add(1, Relaxed);
            }
        }
    }
    result.unacked = calls.len() as u64;
    step_done(shared, window.step);
    result
}

fn grpc_reason(code: tonic::Code) -> String {
    format!("grpc_{code:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_status() {
        assert_eq!(grpc_reason(tonic::Code::Unavailable), "grpc_unavailable");
        assert_eq!(
            grpc_reason(tonic::Code::PermissionDenied),
            "grpc_permissiondenied"
        );
    }
}
