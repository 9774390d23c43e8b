//! Multi-process `connections` runs. One process may hold at most 20,000 open files here, so
//! above that the parent re-executes itself as worker processes, each opening its share.
//!
//! Protocol, one JSON object per line on the worker's stdout:
//! `{"progress":{counts}}` every 250 ms, `{"ready":{counts}}` once its ramp is over, and at the
//! end `{"result":{tally}}`. The parent writes `release` on the worker's stdin once every worker
//! is ready, the hold is over and the gateways' RSS is sampled; the worker then closes its
//! connections and sends its result. A worker also releases by itself at its `--duration`, so
//! nothing outlives a lost parent for long.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::args::ConnectionsArgs;
use crate::client::Dialer;
use crate::progress::Progress;
use crate::report::{ConnectionsReport, GatewayRss};
use crate::scenarios::connections::{Counts, Engine, Tally, build_report, deadline_token};
use crate::sys;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Progress(Counts),
    Ready(Counts),
    Result(Tally),
}

fn emit(line: &Line) {
    if let Ok(s) = serde_json::to_string(line) {
        println!("{s}");
    }
}

/// The worker side: `loadgen connections --worker-first F …`, spawned by [`run_parent`].
pub async fn serve(args: ConnectionsArgs, first: u64, interrupt: CancellationToken) -> Result<()> {
    sys::raise_nofile_limit();
    let stop = deadline_token(&interrupt, args.common.duration);
    let dialer = Arc::new(Dialer::new(&args.common)?);
    let engine = Engine::default();
    let reporter = {
        let counters = engine.counters.clone();
        let done = CancellationToken::new();
        let d = done.clone();
        let task = tokio::spawn(async move {
            while !d.is_cancelled() {
                emit(&Line::Progress(counters.counts()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = d.cancelled() => {}
                }
            }
        });
        (done, task)
    };
    let ramp = engine
        .ramp(
            dialer,
            first,
            args.count,
            args.rate,
            args.common.concurrency,
            &stop,
        )
        .await;
    emit(&Line::Ready(engine.counters.counts()));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    tokio::select! {
        // A `release` line, or end of input (the parent is gone): either way, release.
        _ = stdin.next_line() => {}
        _ = stop.cancelled() => {}
    }
    let tally = engine.finish(ramp).await;
    reporter.0.cancel();
    let _ = reporter.1.await;
    emit(&Line::Result(tally));
    Ok(())
}

/// The parent side: splits the run over `workers` processes, samples the gateways' RSS
/// around the hold, and adds up the workers' results.
pub async fn run_parent(
    args: &ConnectionsArgs,
    workers: u32,
    interrupt: CancellationToken,
) -> Result<ConnectionsReport> {
    let common = &args.common;
    let ramp_estimate = if args.rate > 0.0 {
        Duration::from_secs_f64(args.count as f64 / args.rate)
    } else {
        Duration::ZERO
    };
    // Workers must outlive the parent's ramp + hold, but never run unbounded.
    let bound = common.duration.unwrap_or(
        ramp_estimate * 2 + common.connect_timeout * 2 + args.hold + Duration::from_secs(60),
    );
    let deadline = Instant::now() + bound;
    let rss_before: Vec<Option<u64>> = args.gateway_pids.iter().map(|&p| sys::rss_kb(p)).collect();

    let exe = std::env::current_exe().context("locating the loadgen executable")?;
    let shares = shares(args.count, workers);
    let spawned = shares.len() as u32;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<Line>)>();
    let mut children: Vec<Child> = Vec::new();
    let mut stdins: Vec<Option<ChildStdin>> = Vec::new();
    let mut first = 0u64;
    for (index, count) in shares.into_iter().enumerate() {
        let mut child = worker_command(&exe, args, spawned, first, count, bound)
            .spawn()
            .with_context(|| format!("starting worker process {index}"))?;
        first += count;
        stdins.push(child.stdin.take());
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(parsed) = serde_json::from_str::<Line>(&line) {
                    let _ = tx.send((index, Some(parsed)));
                }
            }
            let _ = tx.send((index, None));
        });
        children.push(child);
    }
    drop(tx);

    let mut state = State::new(children.len());
    let progress = Progress::new(args.count, !common.json);
    let until = |t: Instant| tokio::time::sleep_until(t.into());

    // Ramp, until every worker is ready (or gone); then the hold.
    let mut hold_started: Option<Instant> = None;
    loop {
        if hold_started.is_none() && state.all_ready() {
            hold_started = Some(Instant::now());
        }
        let wake = hold_started.map_or(deadline, |t| (t + args.hold).min(deadline));
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((i, line)) => state.on_line(i, line),
                None => break,
            },
            _ = until(wake) => break,
            _ = interrupt.cancelled() => break,
        }
        let c = state.totals();
        progress.set(
            c.connected + c.failed,
            format!(
                "connected {} failed {} open {} ({spawned} workers)",
                c.connected, c.failed, c.open
            ),
        );
    }
    let hold_seconds = hold_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let rss_after: Vec<Option<u64>> = args.gateway_pids.iter().map(|&p| sys::rss_kb(p)).collect();

    // Release and collect.
    for stdin in stdins.iter_mut() {
        if let Some(mut s) = stdin.take() {
            let _ = s.write_all(b"release\n").await;
        }
    }
    let collect_by = Instant::now() + Duration::from_secs(30);
    while !state.ended.iter().all(|&e| e) {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((i, line)) => state.on_line(i, line),
                None => break,
            },
            _ = until(collect_by) => break,
        }
    }
    progress.finish();
    for child in children.iter_mut() {
        // Whatever has not exited by now is not coming back with a result.
        if tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    let results = state.results;
    let n = results.len();
    let missing: Vec<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
    if !missing.is_empty() {
        bail!("worker process(es) {missing:?} ended without a result (see their messages above)");
    }
    let tallies: Vec<Tally> = results.into_iter().flatten().collect();
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
        spawned,
        &tallies,
        gateways,
        hold_seconds,
        interrupt.is_cancelled(),
    ))
}

/// What the parent knows of its workers.
struct State {
    counts: Vec<Counts>,
    ready: Vec<bool>,
    ended: Vec<bool>,
    results: Vec<Option<Tally>>,
}

impl State {
    fn new(n: usize) -> State {
        State {
            counts: vec![Counts::default(); n],
            ready: vec![false; n],
            ended: vec![false; n],
            results: vec![None; n],
        }
    }

    fn on_line(&mut self, index: usize, line: Option<Line>) {
        match line {
            Some(Line::Progress(c)) => self.counts[index] = c,
            Some(Line::Ready(c)) => {
                self.counts[index] = c;
                self.ready[index] = true;
            }
            Some(Line::Result(t)) => self.results[index] = Some(t),
            None => self.ended[index] = true,
        }
    }

    /// Every worker has finished its ramp, or has gone.
    fn all_ready(&self) -> bool {
        self.ready.iter().zip(&self.ended).all(|(&r, &e)| r || e)
    }

    fn totals(&self) -> Counts {
        self.counts.iter().fold(Counts::default(), |a, c| Counts {
            attempted: a.attempted + c.attempted,
            connected: a.connected + c.connected,
            failed: a.failed + c.failed,
            open: a.open + c.open,
        })
    }
}

/// `count` split over `workers`, the remainder going to the first ones.
fn shares(count: u64, workers: u32) -> Vec<u64> {
    let w = u64::from(workers);
    (0..w)
        .map(|i| count / w + u64::from(i < count % w))
        .filter(|&c| c > 0)
        .collect()
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The worker's command line: its share of count, rate and handshake concurrency. Credentials
/// go through the environment, out of sight of `ps`.
fn worker_command(
    exe: &std::path::Path,
    args: &ConnectionsArgs,
    workers: u32,
    first: u64,
    count: u64,
    bound: Duration,
) -> Command {
    let common = &args.common;
    let urls: Vec<&str> = common.urls.iter().map(|u| u.url.as_str()).collect();
    let mut cmd = Command::new(exe);
    cmd.arg("connections")
        .arg("--json")
        .args(["--url", &urls.join(",")])
        .args(["--count", &count.to_string()])
        .args(["--rate", &(args.rate / f64::from(workers)).to_string()])
        .args(["--hold", &millis(args.hold)])
        .args(["--workers", "1"])
        .args(["--worker-first", &first.to_string()])
        .args(["--source-ips", &common.source_ips.to_string()])
        .args(["--connect-timeout", &millis(common.connect_timeout)])
        .args([
            "--concurrency",
            &(common.concurrency / workers).max(1).to_string(),
        ])
        .args(["--duration", &millis(bound)])
        .env_remove("JWT_SECRET")
        .env_remove("LOADGEN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(secret) = &common.secret {
        cmd.env("JWT_SECRET", secret);
    }
    if let Some(token) = &common.token {
        cmd.env("LOADGEN_TOKEN", token);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(30_000, 2), vec![15_000, 15_000]);
        assert_eq!(shares(2, 4), vec![1, 1]);
        assert_eq!(shares(100_000, 7).iter().sum::<u64>(), 100_000);
    }

    #[test]
    fn lines_round_trip() {
        let s = serde_json::to_string(&Line::Ready(Counts {
            attempted: 3,
            connected: 2,
            failed: 1,
            open: 2,
        }))
        .unwrap();
        assert!(s.starts_with("{\"ready\":"), "{s}");
        assert!(matches!(
            serde_json::from_str::<Line>(&s).unwrap(),
            Line::Ready(c) if c.connected == 2
        ));
    }
}
