//! `roomcast`: the composition root of standalone mode. It wires the in-memory store and
//! broker, auth-service, room-service and a gateway into one process, for trying Roomcast on
//! a laptop. `roomcast` and `roomcast standalone` are the same.

mod standalone;

use clap::{Parser, Subcommand};
use standalone::StandaloneConfig;

// jemalloc rather than glibc's malloc: a connection's set-up allocates and frees far more than
// the connection keeps, and glibc spent about a fifth of the gateway's CPU there and held freed
// pages between the live ones. Measured with `loadgen connections` (19,000 connections, one
// gateway): set-up CPU 103-118 -> 69-80 µs per connection, idle RSS per connection no higher.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "roomcast",
    version,
    about = "Roomcast in one process: gateway, room-service and auth-service, in memory",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    standalone: StandaloneConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process with an in-memory store and broker: for trying Roomcast.
    Standalone(StandaloneConfig),
}

fn main() -> anyhow::Result<()> {
    roomcast_common::runtime::build()?.block_on(standalone_main())
}

async fn standalone_main() -> anyhow::Result<()> {
    // The embedded services' spans carry service.name "gateway", as they always have.
    roomcast_common::telemetry::init_with_service("gateway");
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Standalone(config)) => config,
        None => cli.standalone,
    };
    let result = standalone::run(config, shutdown_signal()).await;
    // Sends the spans still queued; it blocks (bounded), so off the async workers.
    let _ = tokio::task::spawn_blocking(roomcast_common::telemetry::shutdown).await;
    result
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
