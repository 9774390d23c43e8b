//! `loadgen`: drives a running Roomcast over loopback and reports what it measured.
//!
//! - [`args`]: the command line.
//! - [`client`]: one load connection (source address, token, small buffers).
//! - [`token`]: per-connection tokens.
//! - [`scenarios`]: `connections`, `fanout`, `publish-api`.
//! - [`worker`]: multi-process `connections` runs (`fanout` has its own, in its module).
//! - [`measure`]: CPU time of the processes under test, per step of a `--steps` run.
//! - [`report`]: JSON and human output, latency histograms.
//! - [`progress`], [`sys`]: progress bar; open-file limit and RSS.

mod args;
mod client;
mod measure;
mod progress;
mod report;
mod scenarios;
mod sys;
mod token;
mod worker;

use std::process::ExitCode;

use args::Scenario;
use tokio_util::sync::CancellationToken;

// jemalloc, as in the services: the load generator shares the cores with what it measures, and
// under glibc's malloc a `publish-api` run spent about a quarter of its user time allocating
// (each gRPC call and frame allocates and frees many small buffers).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.scenario)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(scenario: Scenario) -> anyhow::Result<()> {
    // Ctrl-C ends the run early with what was measured so far; a second one exits at once.
    let interrupt = CancellationToken::new();
    {
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupt.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }
    let json = scenario.common().json;
    match scenario {
        Scenario::Connections(a) => {
            if let Some(first) = a.worker_first {
                return worker::serve(a, first, interrupt).await;
            }
            let r = match scenarios::connections::processes(&a) {
                n if n > 1 => worker::run_parent(&a, n, interrupt).await?,
                _ => scenarios::connections::run_single(&a, interrupt).await?,
            };
            report::print(&r, &r.human(), json)
        }
        Scenario::Fanout(a) => {
            if a.worker_rooms.is_some() {
                return scenarios::fanout::serve_worker(&a, interrupt).await;
            }
            let r = scenarios::fanout::run(a, interrupt).await?;
            report::print(&r, &r.human(), json)
        }
        Scenario::PublishApi(a) => {
            let r = scenarios::publish_api::run(a, interrupt).await?;
            report::print(&r, &r.human(), json)
        }
    }
}
