//! `publish-api`: another backend publishing through RoomService.ServerPublish, into rooms of
//! WebSocket subscribers. Calls are pipelined (up to --max-in-flight at once over one HTTP/2
//! connection), so concurrent calls may be ordered either way by the server.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_proto::{RoomStatsRequest, ServerPublishRequest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::args::PublishApiArgs;
use crate::client::Dialer;
use crate::report::{DeliveryReport, Reasons};
use crate::scenarios::delivery::{self, Ctx, Publishers, Window, step_done};
use crate::scenarios::{Pacer, unix_ns};

/// The room-service server API, reachable and accepting our key.
#[derive(Clone)]
pub struct ApiTarget {
    client: ServerApiClient<Channel>,
    auth: AsciiMetadataValue,
    in_flight: Arc<Semaphore>,
}

/// What one lane did.
#[derive(Debug, Default)]
pub struct LaneResult {
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub errors: Reasons,
}

pub async fn run(args: PublishApiArgs, interrupt: CancellationToken) -> Result<DeliveryReport> {
    let key = args.api_key.as_deref().unwrap_or_default();
    let target = connect(
        &args.grpc,
        key,
        args.max_in_flight,
        args.common.connect_timeout,
    )
    .await?;
    let lanes = args.publishers.unwrap_or(args.rooms.rooms);
    delivery::run_once(
        "publish-api",
        &args.common,
        &args.rooms,
        Dialer::new(&args.common)?,
        Publishers::Api {
            target: Box::new(target),
            lanes,
        },
        interrupt,
    )
    .await
}

/// Connects and makes one cheap server-API call, so a wrong address or key is reported
/// before any subscriber connects.
async fn connect(url: &str, key: &str, max_in_flight: u32, timeout: Duration) -> Result<ApiTarget> {
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
                let mut request = tonic::Request::new(ServerPublishRequest {
                    room: ctx.rooms[room].clone(),
                    data_json,
                    user: "loadgen".into(),
                    idempotency_key: String::new(),
                });
                request.metadata_mut().insert("authorization", target.auth.clone());
                let mut client = target.client.clone();
                calls.push(async move {
                    let outcome = client
                        .publish(request)
                        .await
                        .map(|_| ())
                        .map_err(|s| grpc_reason(s.code()));
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
