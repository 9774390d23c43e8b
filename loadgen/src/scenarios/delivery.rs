//! The engine shared by `fanout` and `publish-api`: one process's share of the room members,
//! set up once, then one or more publishing windows (steps), each drained and tallied on its
//! own, then closed and added up. `fanout.rs` drives one engine, or several in worker
//! processes; `publish-api` drives one with gRPC lanes as publishers.
//!
//! Expected deliveries come from the acknowledged publishes: each one should reach every
//! member of its room that joined, less the sender when the sender is itself a member.
//! Deliveries are counted in the step their message was published in (a `--steps` run tags
//! each payload with it), so a step's loss is exact even when its last messages arrive after
//! the next step began.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{CommonArgs, Placement, RoomArgs};
use crate::client::Dialer;
use crate::progress::Progress;
use crate::report::{
    Latency, Reasons, add_reasons, histogram_buckets, histogram_from_buckets, new_histogram,
    per_second, round3,
};
use crate::scenarios::api_lane::{self, ApiTarget, LaneResult};
use crate::scenarios::context::{Ctx, Shared, Window};
use crate::scenarios::member::{self, MemberResult, MemberSpec, PublisherSlot};
use crate::scenarios::{Pacer, unix_ns};

/// Who publishes.
pub enum Publishers {
    /// WebSocket connections that joined their room: this many in the whole run.
    WebSocket(u32),
    /// Lanes calling RoomService.ServerPublish.
    Api { target: Box<ApiTarget>, lanes: u32 },
}

/// Which part of the run this process takes, and how.
pub struct Plan {
    /// Room names are `<prefix>-<run_id>-<n>`; every process of a run uses the same id.
    pub run_id: String,
    /// The rooms whose members (subscribers and publishers) this process holds.
    pub rooms: Range<u32>,
    pub placement: Placement,
    /// Steps the run may take (slots for their counters).
    pub steps: usize,
    pub tag_steps: bool,
    /// This process's share of the set-up rate and handshake concurrency.
    pub connect_rate: f64,
    pub concurrency: u32,
    /// Show a progress bar (the parent of worker processes draws its own).
    pub progress: bool,
}

/// Set-up, as one process saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetupTally {
    pub members: u64,
    pub failures: Reasons,
    pub seconds: f64,
}

impl SetupTally {
    pub fn merge(&mut self, o: &SetupTally) {
        self.members += o.members;
        add_reasons(&mut self.failures, &o.failures);
        self.seconds = self.seconds.max(o.seconds);
    }
}

/// One step, as one or more processes saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepTally {
    pub sent: u64,
    pub acked: u64,
    pub errors: Reasons,
    pub expected: u64,
    pub received: u64,
    pub out_of_order: u64,
    /// Members disconnected so far (whole run).
    pub disconnects: u64,
    /// Latest delivery, ns since the Unix epoch (0: none).
    pub last_delivery_ns: u64,
    pub drain_seconds: f64,
    pub latency_us: Vec<(u64, u64)>,
    pub ack_latency_us: Vec<(u64, u64)>,
}

impl StepTally {
    pub fn merge(&mut self, o: &StepTally) {
        self.sent += o.sent;
        self.acked += o.acked;
        add_reasons(&mut self.errors, &o.errors);
        self.expected += o.expected;
        self.received += o.received;
        self.out_of_order += o.out_of_order;
        self.disconnects += o.disconnects;
        self.last_delivery_ns = self.last_delivery_ns.max(o.last_delivery_ns);
        self.drain_seconds = self.drain_seconds.max(o.drain_seconds);
        self.latency_us.extend_from_slice(&o.latency_us);
        self.ack_latency_us.extend_from_slice(&o.ack_latency_us);
    }

    pub fn unacked(&self) -> u64 {
        self.sent
            .saturating_sub(self.acked + self.errors.values().sum::<u64>())
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        histogram_from_buckets(&mut h, &self.latency_us);
        h
    }

    pub fn ack_latency(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        histogram_from_buckets(&mut h, &self.ack_latency_us);
        h
    }
}

/// The end of the run, as one or more processes saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinalTally {
    pub received: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub order_violations: u64,
    pub disconnected: Reasons,
    /// Indexed by room number, over all rooms of the run.
    pub received_per_room: Vec<u64>,
}

impl FinalTally {
    pub fn merge(&mut self, o: &FinalTally) {
        self.received += o.received;
        self.out_of_order += o.out_of_order;
        self.gaps += o.gaps;
        self.order_violations += o.order_violations;
        add_reasons(&mut self.disconnected, &o.disconnected);
        if self.received_per_room.len() < o.received_per_room.len() {
            self.received_per_room.resize(o.received_per_room.len(), 0);
        }
        for (a, b) in self.received_per_room.iter_mut().zip(&o.received_per_room) {
            *a += b;
        }
    }
}

/// One process's members, set up and ready to publish.
pub struct Engine {
    ctx: Arc<Ctx>,
    window_tx: watch::Sender<Option<Window>>,
    members: JoinSet<MemberResult>,
    api: Option<(ApiTarget, u32)>,
    pub setup: SetupTally,
    interrupt: CancellationToken,
    /// Members that ended during set-up (collected for their failure reasons).
    finished_early: Option<Vec<MemberResult>>,
}

impl Engine {
    /// Connects and joins this process's members: subscribers first, then WebSocket
    /// publishers, all joined before anyone publishes. Fails only when nobody could join.
    pub async fn setup(
        common: &CommonArgs,
        args: &RoomArgs,
        dialer: Dialer,
        publishers: Publishers,
        plan: Plan,
        interrupt: CancellationToken,
    ) -> Result<Engine> {
        let rooms: Vec<String> = (0..args.rooms)
            .map(|r| format!("{}-{}-{r}", args.room_prefix, plan.run_id))
            .collect();
        let (window_tx, window_rx) = watch::channel(None);
        let (ws_publishers, api) = match publishers {
            Publishers::WebSocket(n) => (n, None),
            Publishers::Api { target, lanes } => (0, Some((*target, lanes))),
        };
        let url_count = dialer.url_count() as u64;
        let ctx = Arc::new(Ctx {
            dialer,
            shared: Shared::new(rooms.len(), plan.steps),
            rooms,
            stop: interrupt.child_token(),
            window: window_rx,
            join_timeout: common.connect_timeout,
            filler: "x".repeat(args.payload),
            tag_steps: plan.tag_steps,
        });
        let url_of = |n: u64, room: u32| match plan.placement {
            Placement::Spread => (n % url_count) as usize,
            Placement::Room => (u64::from(room) % url_count) as usize,
        };
        let mine = |room: u32| plan.rooms.contains(&room);
        let mut specs: Vec<MemberSpec> = (0..args.subscribers)
            .map(|i| (i, i % args.rooms))
            .filter(|&(_, room)| mine(room))
            .map(|(i, room)| MemberSpec {
                n: u64::from(i),
                room: room as usize,
                url: url_of(u64::from(i), room),
                publisher: None,
            })
            .collect();
        let own_publishers = (0..ws_publishers)
            .map(|i| (i, i % args.rooms))
            .filter(|&(_, room)| mine(room));
        specs.extend(own_publishers.map(|(i, room)| {
            let n = u64::from(args.subscribers + i);
            MemberSpec {
                n,
                room: room as usize,
                url: url_of(n, room),
                publisher: Some(PublisherSlot {
                    index: i,
                    count: ws_publishers,
                }),
            }
        }));
        if let Some((_, lanes)) = &api {
            ctx.shared
                .publishers_joined
                .store(u64::from(*lanes), SeqCst);
        }

        let total = specs.len() as u64;
        let progress = Progress::new(total, plan.progress);
        let setup_started = Instant::now();
        let semaphore = Arc::new(Semaphore::new(plan.concurrency.max(1) as usize));
        let mut members = JoinSet::new();
        let mut pacer = Pacer::new(setup_started, plan.connect_rate);
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
        progress.finish();
        let seconds = setup_started.elapsed().as_secs_f64();
        let joined: u64 = ctx
            .shared
            .joined_per_room
            .iter()
            .map(|j| j.load(SeqCst))
            .sum();
        let mut engine = Engine {
            ctx,
            window_tx,
            members,
            api,
            setup: SetupTally {
                members: joined,
                failures: Reasons::new(),
                seconds: round3(seconds),
            },
            interrupt,
            finished_early: None,
        };
        if joined < total || engine.interrupt.is_cancelled() {
            // Failures are in the member results: collect them only when some failed (the
            // members keep running otherwise).
            engine.setup.failures = engine.setup_failures_so_far();
        }
        Ok(engine)
    }

    /// Set-up failure reasons. Members that failed set-up have ended, so their results are
    /// ready; the others are still running and are not waited for.
    fn setup_failures_so_far(&mut self) -> Reasons {
        let mut failures = Reasons::new();
        let mut done = Vec::new();
        while let Some(Ok(r)) = self.members.try_join_next() {
            if let Some(reason) = &r.setup_failure {
                *failures.entry(reason.clone()).or_default() += 1;
            }
            done.push(r);
        }
        // Kept for the final tally.
        self.finished_early
            .get_or_insert_with(Vec::new)
            .extend(done);
        failures
    }

    /// Publishes for one window, then drains: until every publish of the step is answered and
    /// every expected delivery arrived, or `drain` is up. `progress` shows what goes on.
    pub async fn step(
        &mut self,
        k: usize,
        rate: f64,
        begin: Instant,
        duration: Duration,
        drain: Duration,
        progress: Option<&Progress>,
    ) -> StepTally {
        let shared = &self.ctx.shared;
        let Some(st) = shared.open_step(k) else {
            return StepTally::default();
        };
        let end = begin + duration;
        let lanes_stop = self.ctx.stop.child_token();
        let mut lanes: Option<JoinSet<LaneResult>> = self.api.as_ref().map(|(target, lanes)| {
            api_lane::spawn_lanes(
                self.ctx.clone(),
                target.clone(),
                *lanes,
                Window {
                    step: k,
                    begin,
                    end,
                    rate,
                },
                lanes_stop.clone(),
            )
        });
        let sender_is_member = lanes.is_none();
        let _ = self.window_tx.send(Some(Window {
            step: k,
            begin,
            end,
            rate,
        }));
        let tenths = (duration.as_secs_f64() * 10.0).ceil() as u64;
        if let Some(p) = progress {
            p.restart(tenths);
        }
        let status = |ctx: &Ctx| {
            format!(
                "sent {} acked {} received {}/{}",
                st.sent.load(Relaxed),
                st.acked.load(Relaxed),
                st.received.load(Relaxed),
                ctx.shared.expected(k, sender_is_member)
            )
        };
        loop {
            let now = Instant::now();
            if now >= end || self.interrupt.is_cancelled() {
                break;
            }
            if let Some(p) = progress {
                let elapsed = now.saturating_duration_since(begin).as_secs_f64();
                p.set(
                    (elapsed * 10.0) as u64,
                    format!(
                        "{elapsed:.1}/{:.1} s at {rate} msg/s: {}",
                        duration.as_secs_f64(),
                        status(&self.ctx)
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(100).min(end - now)).await;
        }
        let drain_started = Instant::now();
        let drain_end = drain_started + drain;
        loop {
            let publishers_done = st.publishers_done.load(SeqCst)
                + shared.publishers_gone.load(SeqCst)
                >= shared.publishers_joined.load(SeqCst);
            let done =
                publishers_done && st.received.load(SeqCst) >= shared.expected(k, sender_is_member);
            if done || Instant::now() >= drain_end || self.interrupt.is_cancelled() {
                break;
            }
            if let Some(p) = progress {
                p.set(tenths, format!("draining: {}", status(&self.ctx)));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain_seconds = drain_started.elapsed().as_secs_f64();
        let tally = StepTally {
            sent: st.sent.load(SeqCst),
            acked: st.acked.load(SeqCst),
            errors: st.errors(),
            expected: shared.expected(k, sender_is_member),
            received: st.received.load(SeqCst),
            out_of_order: st.out_of_order.load(SeqCst),
            disconnects: shared.disconnects.load(SeqCst),
            last_delivery_ns: st.last_delivery_ns.load(SeqCst),
            drain_seconds: round3(drain_seconds),
            latency_us: histogram_buckets(&st.latency.snapshot()),
            ack_latency_us: histogram_buckets(&st.ack_latency.snapshot()),
        };
        lanes_stop.cancel();
        if let Some(set) = lanes.take() {
            set.join_all().await;
        }
        tally
    }

    /// Closes every member and adds up what they saw.
    pub async fn finish(mut self) -> FinalTally {
        self.ctx.stop.cancel();
        let mut results = self.finished_early.take().unwrap_or_default();
        results.extend(self.members.join_all().await);
        let mut t = FinalTally {
            received_per_room: vec![0; self.ctx.rooms.len()],
            ..FinalTally::default()
        };
        for r in &results {
            if r.setup_failure.is_some() {
                continue;
            }
            let d = &r.deliveries;
            t.received += d.received;
            t.out_of_order += d.out_of_order;
            t.gaps += d.gaps;
            t.order_violations += d.order_violations;
            t.received_per_room[r.room] += d.received;
            if let Some(reason) = &r.disconnected {
                *t.disconnected.entry(reason.clone()).or_default() += 1;
            }
        }
        t
    }
}

/// `unix_ns` as an `Instant` of this process (same clock for every process of the machine).
pub fn instant_at(unix: u64) -> Instant {
    let now_unix = unix_ns();
    let now = Instant::now();
    if unix >= now_unix {
        now + Duration::from_nanos(unix - now_unix)
    } else {
        now.checked_sub(Duration::from_nanos(now_unix - unix))
            .unwrap_or(now)
    }
}

/// Fills a report's delivery fields from a single window's tally (the classic one-window
/// `fanout` and `publish-api` report).
pub fn window_fields(
    r: &mut crate::report::DeliveryReport,
    step: &StepTally,
    begin_unix: u64,
    publish_seconds: f64,
) {
    r.sent = step.sent;
    r.published = step.acked;
    r.publish_errors = step.errors.clone();
    r.unacked = step.unacked();
    r.published_per_sec = per_second(step.acked, publish_seconds);
    r.expected = step.expected;
    r.received = step.received;
    r.loss = step.expected as i64 - step.received as i64;
    r.duration_seconds = round3(publish_seconds);
    r.latency_ms = Latency::of(&step.latency());
    r.ack_latency_ms = Latency::of(&step.ack_latency());
    r.drain_seconds = step.drain_seconds;
    // Deliveries still arriving after publishing stopped extend the window they are
    // counted over.
    let window =
        (step.last_delivery_ns.saturating_sub(begin_unix) as f64 / 1e9).max(publish_seconds);
    r.deliveries_per_sec = per_second(step.received, window);
}

/// A report with the run's shape filled in and every measured field empty.
pub fn empty_report(
    scenario: &str,
    common: &CommonArgs,
    args: &RoomArgs,
    publishers: u32,
    rate: f64,
    setup: &SetupTally,
    sender_is_member: bool,
) -> crate::report::DeliveryReport {
    crate::report::DeliveryReport {
        scenario: scenario.to_owned(),
        urls: common.urls.iter().map(|u| u.url.clone()).collect(),
        rooms: args.rooms,
        subscribers: args.subscribers,
        publishers,
        rate_target: rate,
        payload_bytes: args.payload,
        duration_seconds: 0.0,
        members: setup.members,
        setup_failures: setup.failures.clone(),
        setup_seconds: setup.seconds,
        sent: 0,
        published: 0,
        publish_errors: Reasons::new(),
        unacked: 0,
        published_per_sec: 0.0,
        expected: 0,
        received: 0,
        loss: 0,
        out_of_order: 0,
        gaps: 0,
        publisher_order_violations: sender_is_member.then_some(0),
        deliveries_per_sec: 0.0,
        latency_ms: Latency::default(),
        ack_latency_ms: Latency::default(),
        drain_seconds: 0.0,
        disconnected: Reasons::new(),
        received_per_room: vec![0; args.rooms as usize],
        interrupted: false,
        protocol: None,
        workers: None,
        placement: None,
        steps: None,
    }
}

/// The end-of-run fields.
pub fn final_fields(r: &mut crate::report::DeliveryReport, f: &FinalTally) {
    r.out_of_order = f.out_of_order;
    r.gaps = f.gaps;
    if let Some(v) = r.publisher_order_violations.as_mut() {
        *v = f.order_violations;
    }
    r.disconnected = f.disconnected.clone();
    r.received_per_room = f.received_per_room.clone();
}

/// The classic run: one set-up, one publishing window, in this process (`publish-api`, and
/// `fanout` without --steps in one process).
pub async fn run_once(
    scenario: &str,
    common: &CommonArgs,
    args: &RoomArgs,
    dialer: Dialer,
    publishers: Publishers,
    interrupt: CancellationToken,
) -> Result<crate::report::DeliveryReport> {
    let count = match &publishers {
        Publishers::WebSocket(n) => *n,
        Publishers::Api { lanes, .. } => *lanes,
    };
    let sender_is_member = matches!(publishers, Publishers::WebSocket(_));
    let plan = Plan {
        run_id: crate::scenarios::run_id(),
        rooms: 0..args.rooms,
        placement: Placement::Spread,
        steps: 1,
        tag_steps: false,
        connect_rate: args.connect_rate,
        concurrency: common.concurrency,
        progress: !common.json,
    };
    let mut engine =
        Engine::setup(common, args, dialer, publishers, plan, interrupt.clone()).await?;
    check_setup(&engine.setup, &interrupt)?;
    let duration = common.duration.unwrap_or(crate::args::DEFAULT_DURATION);
    let progress = Progress::new(0, !common.json);
    let begin = Instant::now() + Duration::from_millis(20);
    let begin_unix = unix_ns() + 20_000_000;
    let step = engine
        .step(0, args.rate, begin, duration, args.drain, Some(&progress))
        .await;
    let publish_seconds = Instant::now()
        .min(begin + duration)
        .saturating_duration_since(begin)
        .as_secs_f64()
        .min(duration.as_secs_f64());
    let setup = engine.setup.clone();
    let fin = engine.finish().await;
    progress.finish();
    let mut r = empty_report(
        scenario,
        common,
        args,
        count,
        args.rate,
        &setup,
        sender_is_member,
    );
    window_fields(&mut r, &step, begin_unix, publish_seconds);
    final_fields(&mut r, &fin);
    r.interrupted = interrupt.is_cancelled();
    Ok(r)
}

/// Fails the run when nobody joined, or set-up was interrupted.
pub fn check_setup(setup: &SetupTally, interrupt: &CancellationToken) -> Result<()> {
    if interrupt.is_cancelled() {
        anyhow::bail!("interrupted during set-up");
    }
    if setup.members == 0 {
        anyhow::bail!(
            "set-up failed: no member joined; failures: {:?}",
            setup.failures
        );
    }
    Ok(())
}
