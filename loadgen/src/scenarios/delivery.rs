//! The run shared by `fanout` and `publish-api`: set up the room members, start the
//! publishers together, drain, then add up what every member saw into one report.
//!
//! Expected deliveries come from the acknowledged publishes: each one should reach every
//! member of its room that joined, less the sender when the sender is itself a member.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{CommonArgs, DEFAULT_DURATION, RoomArgs};
use crate::client::Dialer;
use crate::progress::Progress;
use crate::report::{
    DeliveryReport, Latency, Reasons, SharedHistogram, add_reasons, per_second, round3,
};
use crate::scenarios::member::{self, MemberResult, MemberSpec, PublisherSlot};
use crate::scenarios::publish_api::{self, ApiTarget, LaneResult};
use crate::scenarios::{Pacer, run_id};

/// What every task of a run shares.
pub struct Ctx {
    pub dialer: Dialer,
    pub rooms: Vec<String>,
    pub shared: Shared,
    /// Cancelled when the run ends (after the drain, or on interrupt).
    pub stop: CancellationToken,
    /// Set once set-up is done: when publishing starts and ends.
    pub start: watch::Receiver<Option<(Instant, Instant)>>,
    pub join_timeout: Duration,
    /// Total publish rate, messages per second.
    pub rate: f64,
    /// The `p` string of every payload.
    pub filler: String,
}

/// Live counters, read by the progress bar and the drain.
pub struct Shared {
    pub latency: SharedHistogram,
    pub ack_latency: SharedHistogram,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub acked_per_room: Vec<AtomicU64>,
    pub joined_per_room: Vec<AtomicU64>,
    pub setup_resolved: AtomicU64,
    pub publishers_done: AtomicU64,
}

impl Shared {
    pub fn new(rooms: usize) -> Shared {
        let counters = || (0..rooms).map(|_| AtomicU64::new(0)).collect();
        Shared {
            latency: SharedHistogram::default(),
            ack_latency: SharedHistogram::default(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_per_room: counters(),
            joined_per_room: counters(),
            setup_resolved: AtomicU64::new(0),
            publishers_done: AtomicU64::new(0),
        }
    }

    /// Deliveries the acknowledged publishes so far call for.
    fn expected(&self, sender_is_member: bool) -> u64 {
        self.acked_per_room
            .iter()
            .zip(&self.joined_per_room)
            .map(|(acked, joined)| {
                let members = joined.load(SeqCst);
                let recipients = if sender_is_member {
                    members.saturating_sub(1)
                } else {
                    members
                };
                acked.load(SeqCst) * recipients
            })
            .sum()
    }
}

/// Who publishes.
pub enum Publishers {
    /// WebSocket connections that joined their room.
    WebSocket(u32),
    /// Lanes calling RoomService.ServerPublish.
    Api { target: Box<ApiTarget>, lanes: u32 },
}

impl Publishers {
    fn count(&self) -> u32 {
        match self {
            Publishers::WebSocket(n) => *n,
            Publishers::Api { lanes, .. } => *lanes,
        }
    }
}

pub async fn run(
    scenario: &str,
    common: &CommonArgs,
    args: &RoomArgs,
    publishers: Publishers,
    interrupt: CancellationToken,
) -> Result<DeliveryReport> {
    let duration = common.duration.unwrap_or(DEFAULT_DURATION);
    let run = run_id();
    let rooms: Vec<String> = (0..args.rooms)
        .map(|r| format!("{}-{run}-{r}", args.room_prefix))
        .collect();
    let (start_tx, start_rx) = watch::channel(None);
    let ctx = Arc::new(Ctx {
        dialer: Dialer::new(common)?,
        shared: Shared::new(rooms.len()),
        rooms,
        stop: interrupt.child_token(),
        start: start_rx,
        join_timeout: common.connect_timeout,
        rate: args.rate,
        filler: "x".repeat(args.payload),
    });
    let publisher_count = publishers.count();
    let ws_publishers = match publishers {
        Publishers::WebSocket(n) => n,
        Publishers::Api { .. } => 0,
    };

    // Set-up: subscribers first, then WebSocket publishers, all joining before anyone
    // publishes.
    let mut specs: Vec<MemberSpec> = (0..args.subscribers)
        .map(|i| MemberSpec {
            n: u64::from(i),
            room: (i % args.rooms) as usize,
            publisher: None,
        })
        .collect();
    specs.extend((0..ws_publishers).map(|i| MemberSpec {
        n: u64::from(args.subscribers + i),
        room: (i % args.rooms) as usize,
        publisher: Some(PublisherSlot {
            index: i,
            count: ws_publishers,
        }),
    }));
    let total = specs.len() as u64;
    let progress = Progress::new(total, !common.json);
    let setup_started = Instant::now();
    let semaphore = Arc::new(Semaphore::new(common.concurrency as usize));
    let mut members = JoinSet::new();
    let mut pacer = Pacer::new(setup_started, args.connect_rate);
    for spec in specs {
        let permit = tokio::select! {
            _ = interrupt.cancelled() => break,
            permit = async {
                pacer.tick().await;
                semaphore.clone().acquire_owned().await
            } => permit?,
        };
        members.spawn(member::run(ctx.clone(), spec, permit));
        let resolved = ctx.shared.setup_resolved.load(Relaxed);
        progress.set(resolved, format!("set-up: {resolved}/{total} members"));
    }
    let spawned = members.len() as u64;
    while ctx.shared.setup_resolved.load(SeqCst) < spawned && !interrupt.is_cancelled() {
        let resolved = ctx.shared.setup_resolved.load(Relaxed);
        progress.set(resolved, format!("set-up: {resolved}/{total} members"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let joined: u64 = ctx
        .shared
        .joined_per_room
        .iter()
        .map(|j| j.load(SeqCst))
        .sum();
    if joined == 0 || interrupt.is_cancelled() {
        ctx.stop.cancel();
        let results = members.join_all().await;
        let mut failures = Reasons::new();
        for r in &results {
            if let Some(reason) = &r.setup_failure {
                *failures.entry(reason.clone()).or_default() += 1;
            }
        }
        if interrupt.is_cancelled() {
            bail!("interrupted during set-up");
        }
        bail!("set-up failed: {joined} of {total} members joined; failures: {failures:?}");
    }

    // Publish.
    let begin = Instant::now() + Duration::from_millis(20);
    let end = begin + duration;
    let lanes = match publishers {
        Publishers::Api { target, lanes } => Some(publish_api::spawn_lanes(
            ctx.clone(),
            *target,
            lanes,
            begin,
            end,
        )),
        Publishers::WebSocket(_) => None,
    };
    let sender_is_member = lanes.is_none();
    let _ = start_tx.send(Some((begin, end)));
    let tenths = (duration.as_secs_f64() * 10.0).ceil() as u64;
    progress.restart(tenths);
    let status = |ctx: &Ctx| {
        let s = &ctx.shared;
        format!(
            "sent {} acked {} received {}/{}",
            s.sent.load(Relaxed),
            s.acked.load(Relaxed),
            s.received.load(Relaxed),
            s.expected(sender_is_member)
        )
    };
    loop {
        let now = Instant::now();
        if now >= end || interrupt.is_cancelled() {
            break;
        }
        let elapsed = now.saturating_duration_since(begin).as_secs_f64();
        progress.set(
            (elapsed * 10.0) as u64,
            format!(
                "{elapsed:.1}/{:.1} s: {}",
                duration.as_secs_f64(),
                status(&ctx)
            ),
        );
        tokio::time::sleep(Duration::from_millis(100).min(end - now)).await;
    }

    let publish_seconds = Instant::now()
        .min(end)
        .saturating_duration_since(begin)
        .as_secs_f64();

    // Drain: until every publisher is done and every expected delivery arrived, or the drain
    // time is up.
    let drain_started = Instant::now();
    let drain_end = drain_started + args.drain;
    loop {
        let s = &ctx.shared;
        let done = s.publishers_done.load(SeqCst) >= u64::from(publisher_count)
            && s.received.load(SeqCst) >= s.expected(sender_is_member);
        if done || Instant::now() >= drain_end || interrupt.is_cancelled() {
            break;
        }
        progress.set(tenths, format!("draining: {}", status(&ctx)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let expected = ctx.shared.expected(sender_is_member);
    ctx.stop.cancel();
    let lane_results: Vec<LaneResult> = match lanes {
        Some(lanes) => lanes.join_all().await,
        None => Vec::new(),
    };
    let results = members.join_all().await;
    progress.finish();

    let latency = ctx.shared.latency.snapshot();
    let ack_latency = ctx.shared.ack_latency.snapshot();
    let mut report = DeliveryReport {
        scenario: scenario.to_owned(),
        urls: common.urls.iter().map(|u| u.url.clone()).collect(),
        rooms: args.rooms,
        subscribers: args.subscribers,
        publishers: publisher_count,
        rate_target: args.rate,
        payload_bytes: args.payload,
        duration_seconds: round3(publish_seconds),
        members: joined,
        setup_failures: Reasons::new(),
        setup_seconds: round3(setup_seconds),
        sent: 0,
        published: 0,
        publish_errors: Reasons::new(),
        unacked: 0,
        published_per_sec: 0.0,
        expected,
        received: 0,
        loss: 0,
        out_of_order: 0,
        gaps: 0,
        publisher_order_violations: sender_is_member.then_some(0),
        deliveries_per_sec: 0.0,
        latency_ms: Latency::of(&latency),
        ack_latency_ms: Latency::of(&ack_latency),
        drain_seconds: round3(drain_seconds),
        disconnected: Reasons::new(),
        received_per_room: vec![0; args.rooms as usize],
        interrupted: interrupt.is_cancelled(),
    };
    let mut last_delivery = end;
    for r in &results {
        merge_member(&mut report, r);
        if let Some(t) = r.deliveries.last_delivery {
            last_delivery = last_delivery.max(t);
        }
    }
    for lane in &lane_results {
        report.sent += lane.sent;
        report.published += lane.acked;
        report.unacked += lane.unacked;
        add_reasons(&mut report.publish_errors, &lane.errors);
    }
    report.loss = report.expected as i64 - report.received as i64;
    report.published_per_sec = per_second(report.published, publish_seconds);
    // Deliveries still arriving after publishing stopped extend the window they are
    // counted over.
    let window = last_delivery.saturating_duration_since(begin).as_secs_f64();
    report.deliveries_per_sec = per_second(report.received, window);
    Ok(report)
}

fn merge_member(report: &mut DeliveryReport, r: &MemberResult) {
    if let Some(reason) = &r.setup_failure {
        *report.setup_failures.entry(reason.clone()).or_default() += 1;
        return;
    }
    let d = &r.deliveries;
    report.received += d.received;
    report.out_of_order += d.out_of_order;
    report.gaps += d.gaps;
    report.received_per_room[r.room] += d.received;
    if let Some(v) = report.publisher_order_violations.as_mut() {
        *v += d.order_violations;
    }
    if let Some(reason) = &r.disconnected {
        *report.disconnected.entry(reason.clone()).or_default() += 1;
    }
    report.sent += r.sent;
    report.published += r.acked;
    report.unacked += r.unacked;
    add_reasons(&mut report.publish_errors, &r.publish_errors);
}
