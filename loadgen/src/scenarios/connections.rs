//! `connections`: open N idle connections at a given rate, hold them, and report how fast
//! they opened, what failed, and what they cost the gateways in resident memory. Above what
//! one process can hold, the work is split over worker processes (see `worker.rs`).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::args::{ConnectionsArgs, Workers};
use crate::client::{self, Dialer};
use crate::progress::Progress;
use crate::report::{
    self, ConnectionsReport, GatewayRss, Latency, Reasons, SharedHistogram, add_reasons,
    histogram_buckets, histogram_from_buckets, new_histogram, per_second,
};
use crate::scenarios::Pacer;
use crate::sys;

/// Connections one worker process takes on, at most, under the 20,000 open-file limit these
/// machines have (the rest is headroom for the runtime and stragglers in TIME_WAIT).
pub const PER_PROCESS: u64 = 15_000;

/// How many processes a run of `args` takes: one per [`PER_PROCESS`] connections (or fewer
/// if the open-file limit is lower), unless `--workers` says. Above one, the caller runs
/// `worker::run_parent`; otherwise [`run_single`].
pub fn processes(args: &ConnectionsArgs) -> u32 {
    let limit = sys::raise_nofile_limit();
    let workers = match args.workers {
        Workers::Fixed(n) => n,
        Workers::Auto => {
            let per_process = PER_PROCESS.min(limit.saturating_sub(500)).max(1);
            u32::try_from(args.count.div_ceil(per_process)).unwrap_or(u32::MAX)
        }
    };
    if workers <= 1 && args.count + 100 > limit {
        eprintln!(
            "warning: {} connections in one process, open-file limit {limit}: expect \
             too_many_open_files failures (use --workers)",
            args.count
        );
    }
    workers
}

/// Everything in this process.
pub async fn run_single(
    args: &ConnectionsArgs,
    interrupt: CancellationToken,
) -> Result<ConnectionsReport> {
    let stop = deadline_token(&interrupt, args.common.duration);
    let dialer = Arc::new(Dialer::new(&args.common)?);
    let rss_before: Vec<Option<u64>> = args.gateway_pids.iter().map(|&p| sys::rss_kb(p)).collect();
    let engine = Engine::default();
    let progress = Progress::new(args.count, !args.common.json);
    let ticker = {
        let counters = engine.counters.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let c = counters.counts();
                progress.set(
                    c.connected + c.failed,
                    format!(
                        "connected {} failed {} open {}",
                        c.connected, c.failed, c.open
                    ),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let ramp = engine
        .ramp(
            dialer,
            0,
            args.count,
            args.rate,
            args.common.concurrency,
            &stop,
        )
        .await;
    let hold_started = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(args.hold) => {}
        _ = stop.cancelled() => {}
    }
    let hold_seconds = hold_started.elapsed().as_secs_f64();
    let rss_after: Vec<Option<u64>> = args.gateway_pids.iter().map(|&p| sys::rss_kb(p)).collect();
    let tally = engine.finish(ramp).await;
    stop.cancel();
    let _ = ticker.await;
    let gateways = args
        .gateway_pids
        .iter()
        .zip(rss_before.iter().zip(&rss_after))
        .map(|(&pid, (&before, &after))| GatewayRss {
            pid,
            rss_before_kb: before,
            rss_after_kb: after,
        })
        .collect();
    Ok(build_report(
        args,
        1,
        &[tally],
        gateways,
        hold_seconds,
        interrupt.is_cancelled(),
    ))
}

/// A child of `parent` that also fires after `duration`.
pub fn deadline_token(parent: &CancellationToken, duration: Option<Duration>) -> CancellationToken {
    let token = parent.child_token();
    if let Some(d) = duration {
        let t = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => t.cancel(),
                _ = t.cancelled() => {}
            }
        });
    }
    token
}

/// Live counts of one process's connections.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counts {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub open: u64,
}

/// What one process's connections did, summed up; worker processes send theirs to the parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: Reasons,
    pub held: u64,
    pub dropped: Reasons,
    pub ramp_seconds: f64,
    /// Time to connect in µs, as (value, count) buckets.
    pub connect_us: Vec<(u64, u64)>,
}

#[derive(Default)]
pub struct Counters {
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    failures: Mutex<Reasons>,
    dropped: Mutex<Reasons>,
    connect: SharedHistogram,
}

impl Counters {
    pub fn counts(&self) -> Counts {
        Counts {
            attempted: self.attempted.load(Relaxed),
            connected: self.connected.load(Relaxed),
            failed: self.failed.load(Relaxed),
            open: self.open.load(Relaxed),
        }
    }

    fn count(map: &Mutex<Reasons>, reason: String) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
}

/// Opens, holds and releases one process's connections.
#[derive(Default)]
pub struct Engine {
    pub counters: Arc<Counters>,
    tasks: TaskTracker,
    release: CancellationToken,
}

impl Engine {
    /// Opens `count` connections numbered from `first` at `rate` per second (0: unpaced),
    /// at most `concurrency` handshakes at once. Returns once every attempt has succeeded or
    /// failed (or `stop` fired), with how long that took. The connections stay open.
    pub async fn ramp(
        &self,
        dialer: Arc<Dialer>,
        first: u64,
        count: u64,
        rate: f64,
        concurrency: u32,
        stop: &CancellationToken,
    ) -> Duration {
        let semaphore = Arc::new(Semaphore::new(concurrency as usize));
        let started = Instant::now();
        let mut pacer = Pacer::new(started, rate);
        for i in 0..count {
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = async {
                    pacer.tick().await;
                    semaphore.clone().acquire_owned().await
                } => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            self.counters.attempted.fetch_add(1, Relaxed);
            self.tasks.spawn(hold(
                dialer.clone(),
                first + i,
                permit,
                self.counters.clone(),
                self.release.clone(),
            ));
        }
        // Every permit back means every attempt has resolved.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = semaphore.acquire_many(concurrency) => {}
        }
        started.elapsed()
    }

    /// Counts what is open, closes everything and sums up.
    pub async fn finish(self, ramp: Duration) -> Tally {
        let held = self.counters.open.load(SeqCst);
        self.release.cancel();
        self.tasks.close();
        // Closing is best effort; a connection that does not finish in time is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
        let c = &self.counters;
        let lock = |m: &Mutex<Reasons>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Tally {
            attempted: c.attempted.load(SeqCst),
            connected: c.connected.load(SeqCst),
            failed: c.failed.load(SeqCst),
            failures: lock(&c.failures),
            held,
            dropped: lock(&c.dropped),
            ramp_seconds: ramp.as_secs_f64(),
            connect_us: histogram_buckets(&c.connect.snapshot()),
        }
    }
}

/// One connection: open it, then read (which answers the gateway's pings) until released or
/// closed by the server.
async fn hold(
    dialer: Arc<Dialer>,
    n: u64,
    permit: OwnedSemaphorePermit,
    counters: Arc<Counters>,
    release: CancellationToken,
) {
    let result = dialer.connect(n).await;
    drop(permit);
    let connected = match result {
        Ok(c) => c,
        Err(reason) => {
            counters.failed.fetch_add(1, Relaxed);
            Counters::count(&counters.failures, reason);
            return;
        }
    };
    counters
        .connect
        .record_all(&[connected.elapsed.as_micros() as u64]);
    counters.open.fetch_add(1, SeqCst);
    counters.connected.fetch_add(1, SeqCst);
    let mut ws = connected.ws;
    let released = release.cancelled();
    tokio::pin!(released);
    loop {
        tokio::select! {
            _ = &mut released => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return;
            }
            item = ws.next() => {
                if let Some(reason) = client::end_reason(item) {
                    counters.open.fetch_sub(1, SeqCst);
                    Counters::count(&counters.dropped, reason);
                    return;
                }
            }
        }
    }
}

/// The report from one or more processes' tallies.
pub fn build_report(
    args: &ConnectionsArgs,
    workers: u32,
    tallies: &[Tally],
    gateways: Vec<GatewayRss>,
    hold_seconds: f64,
    interrupted: bool,
) -> ConnectionsReport {
    let mut connect: Histogram<u64> = new_histogram();
    let mut failures = Reasons::new();
    let mut dropped = Reasons::new();
    let (mut attempted, mut connected, mut failed, mut held) = (0, 0, 0, 0);
    let mut ramp_seconds: f64 = 0.0;
    for t in tallies {
        attempted += t.attempted;
        connected += t.connected;
        failed += t.failed;
        held += t.held;
        add_reasons(&mut failures, &t.failures);
        add_reasons(&mut dropped, &t.dropped);
        ramp_seconds = ramp_seconds.max(t.ramp_seconds);
        histogram_from_buckets(&mut connect, &t.connect_us);
    }
    let measured: Vec<&GatewayRss> = gateways
        .iter()
        .filter(|g| g.rss_before_kb.is_some() && g.rss_after_kb.is_some())
        .collect();
    let rss_delta_kb = (!measured.is_empty()).then(|| {
        measured
            .iter()
            .map(|g| g.rss_after_kb.unwrap_or(0) as i64 - g.rss_before_kb.unwrap_or(0) as i64)
            .sum::<i64>()
    });
    let rss_per_connection_bytes = rss_delta_kb
        .filter(|_| held > 0)
        .map(|kb| (kb as f64 * 1024.0 / held as f64).round());
    ConnectionsReport {
        scenario: "connections".into(),
        urls: args.common.urls.iter().map(|u| u.url.clone()).collect(),
        count: args.count,
        workers,
        source_ips: args.common.source_ips,
        rate_target: args.rate,
        attempted,
        connected,
        failed,
        failures,
        ramp_seconds: report::round3(ramp_seconds),
        connect_rate: per_second(connected, ramp_seconds),
        connect_ms: Latency::of(&connect),
        hold_seconds: report::round3(hold_seconds),
        held,
        dropped,
        gateways,
        rss_delta_kb,
        rss_per_connection_bytes,
        interrupted,
    }
}
