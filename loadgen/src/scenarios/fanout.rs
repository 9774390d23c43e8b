//! `fanout`: WebSocket publishers, each a member of its room, publishing at a shared total
//! rate to rooms of WebSocket subscribers.
//!
//! Above what one process may hold open (`--workers auto`: 15,000 members per process), the
//! rooms are split over worker processes, whole rooms each, so a room's deliveries are counted
//! where its publishes are acknowledged. Connection numbers, tokens, URLs and the publishing
//! schedule are those of a one-process run; the parent opens each window for all workers at
//! one wall-clock instant and adds up what they report.
//!
//! With `--steps`, one set-up serves a series of windows at rising rates (a capacity ramp),
//! each drained and reported on its own, with the CPU time the `--measure-pid` processes and
//! `--measure-redis` servers spent in it. Worker protocol, one JSON object per line: the
//! parent writes `{"step":…}` or `"finish"` on a worker's stdin; the worker answers
//! `{"ready":…}` after set-up, `{"step_done":…}` after each window's drain and
//! `{"result":…}` at the end. End of input (a lost parent) finishes the worker.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::args::{FanoutArgs, Workers};
use crate::client::Dialer;
use crate::measure::{Meter, Spent};
use crate::progress::Progress;
use crate::report::{DeliveryReport, Latency, StepReport, per_second, round3};
use crate::scenarios::connections::PER_PROCESS;
use crate::scenarios::delivery::{
    self, Engine, FinalTally, Plan, Publishers, SetupTally, StepTally, instant_at,
};
use crate::scenarios::{run_id, unix_ns};
use crate::sys;

/// Parent → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToWorker {
    Step {
        step: usize,
        rate: f64,
        begin_unix_ns: u64,
        duration_ms: u64,
        drain_ms: u64,
    },
    Finish,
}

/// Worker → parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FromWorker {
    Ready(SetupTally),
    StepDone(StepTally),
    Result(FinalTally),
}

fn emit(line: &FromWorker) {
    if let Ok(s) = serde_json::to_string(line) {
        println!("{s}");
    }
}

/// Counter slots a run needs: every rate, tried up to 1 + retries times.
fn step_slots(args: &FanoutArgs) -> usize {
    if args.steps.steps.is_empty() {
        1
    } else {
        args.steps.steps.len() * (1 + args.steps.step_retries as usize)
    }
}

fn publishers(args: &FanoutArgs) -> u32 {
    args.publishers.unwrap_or(args.rooms.rooms)
}

pub async fn run(args: FanoutArgs, interrupt: CancellationToken) -> Result<DeliveryReport> {
    let limit = sys::raise_nofile_limit();
    let members = u64::from(args.rooms.subscribers) + u64::from(publishers(&args));
    let workers = match args.workers {
        Workers::Fixed(n) => n,
        Workers::Auto => {
            let per_process = PER_PROCESS.min(limit.saturating_sub(500)).max(1);
            u32::try_from(members.div_ceil(per_process)).unwrap_or(u32::MAX)
        }
    }
    .clamp(1, args.rooms.rooms);
    if workers == 1 && members + 100 > limit {
        eprintln!(
            "warning: {members} members in one process, open-file limit {limit}: expect \
             too_many_open_files failures (use --workers)"
        );
    }
    let run = run_id();
    let mut procs = if workers == 1 {
        let plan = Plan {
            run_id: run.clone(),
            rooms: 0..args.rooms.rooms,
            placement: args.placement,
            steps: step_slots(&args),
            tag_steps: !args.steps.steps.is_empty(),
            connect_rate: args.rooms.connect_rate,
            concurrency: args.common.concurrency,
            progress: !args.common.json,
        };
        let dialer = Dialer::new(&args.common)?.with_protocol(args.protocol);
        let engine = Engine::setup(
            &args.common,
            &args.rooms,
            dialer,
            Publishers::WebSocket(publishers(&args)),
            plan,
            interrupt.clone(),
        )
        .await?;
        Procs::Local(Box::new(engine))
    } else {
        Procs::Workers(WorkerSet::spawn(&args, workers, &run, &interrupt).await?)
    };
    delivery::check_setup(procs.setup(), &interrupt)?;

    let progress = Progress::new(0, !args.common.json);
    let mut report = delivery::empty_report(
        "fanout",
        &args.common,
        &args.rooms,
        publishers(&args),
        args.rooms.rate,
        procs.setup(),
        true,
    );
    report.protocol = Some(format!("{:?}", args.protocol).to_lowercase());
    report.workers = Some(workers);
    report.placement = Some(format!("{:?}", args.placement).to_lowercase());
    // Workers need a moment to get the command before the window opens.
    let lead = if workers == 1 {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(200)
    };

    if args.steps.steps.is_empty() {
        let duration = args
            .common
            .duration
            .unwrap_or(crate::args::DEFAULT_DURATION);
        let begin_unix = unix_ns() + lead.as_nanos() as u64;
        let step = procs
            .step(
                0,
                args.rooms.rate,
                begin_unix,
                duration,
                args.rooms.drain,
                &progress,
            )
            .await?;
        let publish_seconds =
            ((unix_ns().saturating_sub(begin_unix)) as f64 / 1e9).min(duration.as_secs_f64());
        delivery::window_fields(&mut report, &step, begin_unix, publish_seconds);
    } else {
        let meter = Meter {
            pids: args.steps.measure_pids.clone(),
            redis: args.steps.measure_redis.clone(),
            own: procs.pids(),
        };
        let steps = run_steps(&args, &mut procs, &meter, lead, &progress, &interrupt).await?;
        totals(&mut report, &steps);
        report.rate_target = steps.iter().map(|s| s.1.rate_target).fold(0.0, f64::max);
        report.steps = Some(steps.into_iter().map(|(_, s)| s).collect());
    }
    let fin = procs.finish().await?;
    progress.finish();
    delivery::final_fields(&mut report, &fin);
    report.interrupted = interrupt.is_cancelled();
    Ok(report)
}

/// The rates of --steps in turn, each failing one retried up to --step-retries times, until
/// one fails for good. Returns each step's tally and report.
async fn run_steps(
    args: &FanoutArgs,
    procs: &mut Procs,
    meter: &Meter,
    lead: Duration,
    progress: &Progress,
    interrupt: &CancellationToken,
) -> Result<Vec<(StepTally, StepReport)>> {
    let s = &args.steps;
    let mut out: Vec<(StepTally, StepReport)> = Vec::new();
    let mut slot = 0usize;
    let mut disconnects = 0u64;
    'rates: for &rate in &s.steps {
        for attempt in 0..=s.step_retries {
            if interrupt.is_cancelled() {
                break 'rates;
            }
            let begin_unix = unix_ns() + lead.as_nanos() as u64;
            let begin = instant_at(begin_unix);
            let before = async {
                tokio::time::sleep_until(begin.into()).await;
                meter.read().await
            };
            let (before, tally) = tokio::join!(
                before,
                procs.step(
                    slot,
                    rate,
                    begin_unix,
                    s.step_duration,
                    args.rooms.drain,
                    progress
                )
            );
            let tally = tally?;
            let after = meter.read().await;
            let end_unix = unix_ns();
            slot += 1;
            let spent = Spent::between(&before, &after);
            let step = step_report(
                args,
                rate,
                attempt,
                &tally,
                begin_unix,
                end_unix,
                &spent,
                disconnects,
            );
            disconnects = tally.disconnects;
            let passed = step.passed;
            out.push((tally, step));
            if !passed && attempt == s.step_retries {
                break 'rates;
            }
            tokio::time::sleep(s.step_pause).await;
            if passed {
                break;
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn step_report(
    args: &FanoutArgs,
    rate: f64,
    attempt: u32,
    t: &StepTally,
    begin_unix: u64,
    end_unix: u64,
    spent: &Spent,
    disconnects_before: u64,
) -> StepReport {
    let duration = args.steps.step_duration.as_secs_f64();
    let latency = Latency::of(&t.latency());
    let window = (t.last_delivery_ns.saturating_sub(begin_unix) as f64 / 1e9).max(duration);
    let loss = t.expected as i64 - t.received as i64;
    let disconnected = t.disconnects.saturating_sub(disconnects_before);
    let passed = loss == 0
        && t.received > 0
        && t.unacked() == 0
        && t.errors.is_empty()
        && disconnected == 0
        && latency.p99 <= args.steps.max_p99;
    StepReport {
        rate_target: rate,
        attempt,
        duration_seconds: round3(duration),
        sent: t.sent,
        published: t.acked,
        publish_errors: t.errors.clone(),
        unacked: t.unacked(),
        published_per_sec: per_second(t.acked, duration),
        expected: t.expected,
        received: t.received,
        loss,
        out_of_order: t.out_of_order,
        deliveries_per_sec: per_second(t.received, window),
        latency_ms: latency,
        ack_latency_ms: Latency::of(&t.ack_latency()),
        drain_seconds: t.drain_seconds,
        disconnected,
        passed,
        begin_unix_ms: round3(begin_unix as f64 / 1e6),
        end_unix_ms: round3(end_unix as f64 / 1e6),
        cpu_seconds: spent.cpu.clone(),
        cpu_user_seconds: spent.user.clone(),
        redis_cpu_seconds: spent.redis.clone(),
        loadgen_cpu_seconds: spent.own,
    }
}

/// The report's delivery fields as totals over the steps.
fn totals(r: &mut DeliveryReport, steps: &[(StepTally, StepReport)]) {
    let mut all = StepTally::default();
    let mut seconds = 0.0;
    for (t, s) in steps {
        all.merge(t);
        seconds += s.duration_seconds;
    }
    r.sent = all.sent;
    r.published = all.acked;
    r.publish_errors = all.errors.clone();
    r.unacked = all.unacked();
    r.published_per_sec = per_second(all.acked, seconds);
    r.expected = all.expected;
    r.received = all.received;
    r.loss = all.expected as i64 - all.received as i64;
    r.duration_seconds = round3(seconds);
    r.latency_ms = Latency::of(&all.latency());
    r.ack_latency_ms = Latency::of(&all.ack_latency());
    r.drain_seconds = round3(steps.iter().map(|(_, s)| s.drain_seconds).sum());
    r.deliveries_per_sec = per_second(all.received, seconds);
}

/// The processes holding the members: this one, or worker processes.
enum Procs {
    Local(Box<Engine>),
    Workers(WorkerSet),
}

impl Procs {
    fn setup(&self) -> &SetupTally {
        match self {
            Procs::Local(e) => &e.setup,
            Procs::Workers(w) => &w.setup,
        }
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![std::process::id()];
        if let Procs::Workers(w) = self {
            pids.extend(w.children.iter().filter_map(Child::id));
        }
        pids
    }

    async fn step(
        &mut self,
        step: usize,
        rate: f64,
        begin_unix: u64,
        duration: Duration,
        drain: Duration,
        progress: &Progress,
    ) -> Result<StepTally> {
        match self {
            Procs::Local(e) => Ok(e
                .step(
                    step,
                    rate,
                    instant_at(begin_unix),
                    duration,
                    drain,
                    Some(progress),
                )
                .await),
            Procs::Workers(w) => {
                progress.set(
                    0,
                    format!(
                        "{rate} msg/s for {:.1} s in {} workers",
                        duration.as_secs_f64(),
                        w.children.len()
                    ),
                );
                w.step(step, rate, begin_unix, duration, drain).await
            }
        }
    }

    async fn finish(self) -> Result<FinalTally> {
        match self {
            Procs::Local(e) => Ok(e.finish().await),
            Procs::Workers(w) => w.finish().await,
        }
    }
}

/// Worker processes, each holding the members of a range of rooms.
struct WorkerSet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, Option<FromWorker>)>,
    setup: SetupTally,
    interrupt: CancellationToken,
}

impl WorkerSet {
    async fn spawn(
        args: &FanoutArgs,
        workers: u32,
        run: &str,
        interrupt: &CancellationToken,
    ) -> Result<WorkerSet> {
        let exe = std::env::current_exe().context("locating the loadgen executable")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let rooms = args.rooms.rooms;
        for index in 0..workers {
            let first = rooms * index / workers;
            let end = rooms * (index + 1) / workers;
            let mut child = worker_command(&exe, args, workers, (first, end), run)
                .spawn()
                .with_context(|| format!("starting worker process {index}"))?;
            stdins.push(child.stdin.take().context("worker stdin")?);
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            let i = index as usize;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(parsed) = serde_json::from_str::<FromWorker>(&line) {
                        let _ = tx.send((i, Some(parsed)));
                    }
                }
                let _ = tx.send((i, None));
            });
            children.push(child);
        }
        let mut set = WorkerSet {
            children,
            stdins,
            lines: rx,
            setup: SetupTally::default(),
            interrupt: interrupt.clone(),
        };
        // Set-up has no fixed length; the workers' own time bounds (connect timeouts) end it.
        let ready = set
            .collect(
                |m| match m {
                    FromWorker::Ready(s) => Some(s),
                    _ => None,
                },
                None,
            )
            .await?;
        for s in &ready {
            set.setup.merge(s);
        }
        Ok(set)
    }

    /// One message of the wanted kind from every worker.
    async fn collect<T>(
        &mut self,
        want: impl Fn(FromWorker) -> Option<T>,
        bound: Option<Duration>,
    ) -> Result<Vec<T>> {
        let n = self.children.len();
        let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let deadline = bound.map(|b| tokio::time::Instant::now() + b);
        let (lines, interrupt) = (&mut self.lines, &self.interrupt);
        while got.iter().any(Option::is_none) {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, lines.recv()).await.ok(),
                    None => Some(lines.recv().await),
                }
            };
            let msg = tokio::select! {
                m = next => m,
                _ = interrupt.cancelled() => bail!("interrupted"),
            };
            match msg {
                None => bail!("worker processes did not answer in time"),
                Some(None) => bail!("all worker processes ended"),
                Some(Some((i, None))) => {
                    if got[i].is_none() {
                        bail!("worker process {i} ended early (see its messages above)");
                    }
                }
                Some(Some((i, Some(m)))) => {
                    if let Some(v) = want(m) {
                        got[i] = Some(v);
                    }
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    async fn send(&mut self, cmd: &ToWorker) -> Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            stdin
                .write_all(line.as_bytes())
                .await
                .with_context(|| format!("writing to worker process {i}"))?;
        }
        Ok(())
    }

    async fn step(
        &mut self,
        step: usize,
        rate: f64,
        begin_unix_ns: u64,
        duration: Duration,
        drain: Duration,
    ) -> Result<StepTally> {
        self.send(&ToWorker::Step {
            step,
            rate,
            begin_unix_ns,
            duration_ms: duration.as_millis() as u64,
            drain_ms: drain.as_millis() as u64,
        })
        .await?;
        let bound = duration + drain + Duration::from_secs(60);
        let tallies = self
            .collect(
                |m| match m {
                    FromWorker::StepDone(t) => Some(t),
                    _ => None,
                },
                Some(bound),
            )
            .await?;
        let mut all = StepTally::default();
        for t in &tallies {
            all.merge(t);
        }
        Ok(all)
    }

    async fn finish(mut self) -> Result<FinalTally> {
        let _ = self.send(&ToWorker::Finish).await;
        let results = self
            .collect(
                |m| match m {
                    FromWorker::Result(t) => Some(t),
                    _ => None,
                },
                Some(Duration::from_secs(60)),
            )
            .await?;
        for child in self.children.iter_mut() {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        let mut all = FinalTally::default();
        for r in &results {
            all.merge(r);
        }
        Ok(all)
    }
}

/// A worker's command line: the run as given, its rooms, and its share of the set-up rate and
/// handshake concurrency. Credentials go through the environment, out of sight of `ps`.
fn worker_command(
    exe: &std::path::Path,
    args: &FanoutArgs,
    workers: u32,
    rooms: (u32, u32),
    run: &str,
) -> Command {
    let common = &args.common;
    let r = &args.rooms;
    let urls: Vec<&str> = common.urls.iter().map(|u| u.url.as_str()).collect();
    let millis = |d: Duration| format!("{}ms", d.as_millis());
    let mut cmd = Command::new(exe);
    cmd.arg("fanout")
        .arg("--json")
        .args(["--url", &urls.join(",")])
        .args(["--subscribers", &r.subscribers.to_string()])
        .args(["--rooms", &r.rooms.to_string()])
        .args(["--publishers", &publishers(args).to_string()])
        .args(["--payload", &r.payload.to_string()])
        .args(["--drain", &millis(r.drain)])
        .args([
            "--connect-rate",
            &(r.connect_rate / f64::from(workers)).to_string(),
        ])
        .args(["--room-prefix", &r.room_prefix])
        .args(["--source-ips", &common.source_ips.to_string()])
        .args(["--connect-timeout", &millis(common.connect_timeout)])
        .args([
            "--concurrency",
            &(common.concurrency / workers).max(1).to_string(),
        ])
        .args(["--protocol", &format!("{:?}", args.protocol).to_lowercase()])
        .args([
            "--placement",
            &format!("{:?}", args.placement).to_lowercase(),
        ])
        .args(["--workers", "1"])
        .args(["--worker-rooms", &format!("{}:{}", rooms.0, rooms.1)])
        .args(["--run-id", run])
        .env_remove("JWT_SECRET")
        .env_remove("LOADGEN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if !args.steps.steps.is_empty() {
        let steps: Vec<String> = args.steps.steps.iter().map(f64::to_string).collect();
        cmd.args(["--steps", &steps.join(",")])
            .args(["--step-retries", &args.steps.step_retries.to_string()]);
    }
    if let Some(secret) = &common.secret {
        cmd.env("JWT_SECRET", secret);
    }
    if let Some(token) = &common.token {
        cmd.env("LOADGEN_TOKEN", token);
    }
    cmd
}

/// The worker side (`--worker-rooms`): set up the members of those rooms, then run the windows
/// the parent opens. Its output is its protocol lines only.
pub async fn serve_worker(args: &FanoutArgs, interrupt: CancellationToken) -> Result<()> {
    let rooms = args.worker_rooms.context("not a worker")?;
    sys::raise_nofile_limit();
    let plan = Plan {
        run_id: args.run_id.clone().unwrap_or_else(run_id),
        rooms: rooms.0..rooms.1,
        placement: args.placement,
        steps: step_slots(args),
        tag_steps: !args.steps.steps.is_empty(),
        connect_rate: args.rooms.connect_rate,
        concurrency: args.common.concurrency,
        progress: false,
    };
    let dialer = Dialer::new(&args.common)?.with_protocol(args.protocol);
    let mut engine = Engine::setup(
        &args.common,
        &args.rooms,
        dialer,
        Publishers::WebSocket(publishers(args)),
        plan,
        interrupt.clone(),
    )
    .await?;
    emit(&FromWorker::Ready(engine.setup.clone()));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            l = stdin.next_line() => l,
            _ = interrupt.cancelled() => break,
        };
        let Ok(Some(line)) = line else { break };
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Step {
                step,
                rate,
                begin_unix_ns,
                duration_ms,
                drain_ms,
            }) => {
                let tally = engine
                    .step(
                        step,
                        rate,
                        instant_at(begin_unix_ns),
                        Duration::from_millis(duration_ms),
                        Duration::from_millis(drain_ms),
                        None,
                    )
                    .await;
                emit(&FromWorker::StepDone(tally));
            }
            Ok(ToWorker::Finish) | Err(_) => break,
        }
    }
    let fin = engine.finish().await;
    emit(&FromWorker::Result(fin));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_round_trip() {
        let s = serde_json::to_string(&ToWorker::Step {
            step: 2,
            rate: 500.0,
            begin_unix_ns: 7,
            duration_ms: 5000,
            drain_ms: 5000,
        })
        .unwrap();
        assert!(s.starts_with("{\"step\":"), "{s}");
        assert!(matches!(
            serde_json::from_str::<ToWorker>(&s).unwrap(),
            ToWorker::Step { step: 2, .. }
        ));
        assert_eq!(
            serde_json::to_string(&ToWorker::Finish).unwrap(),
            "\"finish\""
        );
        let s = serde_json::to_string(&FromWorker::StepDone(StepTally {
            received: 3,
            ..StepTally::default()
        }))
        .unwrap();
        assert!(matches!(
            serde_json::from_str::<FromWorker>(&s).unwrap(),
            FromWorker::StepDone(t) if t.received == 3
        ));
    }
}
