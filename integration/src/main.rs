//! `roomcast-cluster`: runs a local Roomcast cluster for development and manual testing.
//!
//! Starts a private redis-server, auth-service, room-services and gateways (from the directory
//! of this binary, e.g. `target/debug`, or `ROOMCAST_BIN_DIR`), prints their URLs and a
//! development token, and stops everything on Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo build --workspace
//! target/debug/roomcast-cluster --base-port 7400
//! ```
//!
//! With `--base-port B`: gateways on B, B+1, …; auth-service gRPC B+10 (metrics B+11);
//! room-services gRPC B+20, B+21, … (metrics B+30, …); redis-server B+40. Without it every
//! process gets a free port.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use roomcast_integration::cluster::{Cluster, ClusterOptions};
use roomcast_integration::logs::LogDir;
use roomcast_integration::ports::PortPlan;
use roomcast_integration::token::{self, Claims};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Run a local Roomcast cluster (redis, auth, room-services, gateways)"
)]
struct Args {
    /// Lay ports out from this base port (see the module docs); default: free ports.
    #[arg(long)]
    base_port: Option<u16>,
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    #[arg(long, default_value_t = 2)]
    room_services: usize,
    /// HS256 secret for auth-service and the printed token.
    #[arg(long, env = "JWT_SECRET", default_value = "roomcast-dev-secret")]
    secret: String,
    /// Key for the room-service server API (`authorization: Bearer <key>`).
    #[arg(long, env = "API_KEY", default_value = "roomcast-dev-api-key")]
    api_key: String,
    /// `sub` of the printed development token.
    #[arg(long, default_value = "dev")]
    user: String,
    /// Lifetime of the printed token.
    #[arg(long, default_value_t = 24)]
    token_hours: i64,
    #[arg(long, default_value_t = 10_000)]
    heartbeat_interval_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    heartbeat_timeout_ms: u64,
    #[arg(long, default_value_t = 65_536)]
    max_frame_bytes: usize,
    /// Comma-separated origins allowed for browser handshakes; default any.
    #[arg(long)]
    allowed_origins: Option<String>,
    /// Where the process logs go (kept); default a new directory under the temp dir.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Extra setting for every gateway, `KEY=VALUE` (e.g. `PUBLISH_RATE=1000`); repeatable.
    /// The processes do not inherit this command's environment.
    #[arg(long = "gateway-env", value_parser = key_value)]
    gateway_env: Vec<(String, String)>,
    /// State and broker on a local Redis Cluster (3 masters + 3 replicas, free ports) instead
    /// of one redis-server.
    #[arg(long)]
    redis_cluster: bool,
    /// Extra setting for every room-service, `KEY=VALUE` (e.g. `BROKER_URL=nats://…`).
    #[arg(long = "room-env", value_parser = key_value)]
    room_env: Vec<(String, String)>,
    /// Runtime worker threads of every gateway, room-service and auth-service
    /// (`WORKER_THREADS`); default one per CPU. Every process of this cluster shares the
    /// machine's cores, so fewer (1 on a small machine) costs less CPU per message.
    #[arg(long)]
    worker_threads: Option<usize>,
}

/// `KEY=VALUE` into its parts.
fn key_value(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// `env` with `WORKER_THREADS` set first (so an explicit `--*-env WORKER_THREADS=` wins).
fn with_workers(env: &[(String, String)], workers: Option<usize>) -> Vec<(String, String)> {
    let threads = workers.map(|n| ("WORKER_THREADS".to_owned(), n.to_string()));
    threads.into_iter().chain(env.iter().cloned()).collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let log_dir = match &args.log_dir {
        Some(dir) => LogDir::at(dir)?,
        None => LogDir::at(
            std::env::temp_dir().join(format!("roomcast-cluster-{}", std::process::id())),
        )?,
    };
    let opts = ClusterOptions {
        gateways: args.gateways,
        room_services: args.room_services,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        heartbeat_timeout_ms: args.heartbeat_timeout_ms,
        max_frame_bytes: args.max_frame_bytes,
        api_key: args.api_key.clone(),
        secret: args.secret.clone(),
        allowed_origins: args.allowed_origins.clone(),
        ports: args.base_port.map_or(PortPlan::Free, PortPlan::Base),
        gateway_env: with_workers(&args.gateway_env, args.worker_threads),
        room_env: with_workers(&args.room_env, args.worker_threads),
        auth_env: with_workers(&[], args.worker_threads),
        redis_cluster: args.redis_cluster,
        ..ClusterOptions::default()
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Ctrl-C during start-up drops the half-started cluster, which kills what was started.
    let cluster = tokio::select! {
        cluster = Cluster::start_in(opts, log_dir) => cluster?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
        _ = sigterm.recv() => return Ok(()),
    };
    let claims = Claims::new(&args.user).expires_in(args.token_hours * 3600);
    let dev_token = token::mint(&args.secret, &claims)?;
    print_summary(&cluster, &args, &dev_token);

    let mut reported_exit = vec![false; cluster.processes().len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                // A crashed process is worth knowing about; the others keep running.
                for (p, reported) in cluster.processes().iter().zip(&mut reported_exit) {
                    if !*reported && let Ok(Some(status)) = p.exit_status() {
                        *reported = true;
                        eprintln!("{} exited ({status}); see {}", p.name(), p.log_path().display());
                    }
                }
            }
        }
    }
    println!("stopping…");
    cluster.shutdown(Duration::from_secs(5)).await?;
    println!("stopped");
    Ok(())
}

fn print_summary(cluster: &Cluster, args: &Args, dev_token: &str) {
    println!(
        "Roomcast cluster is up; logs in {}",
        cluster.log_dir().path().display()
    );
    for i in 0..cluster.gateway_count() {
        println!(
            "  gateway {i}:       {}   (http {}/healthz /readyz /metrics)",
            cluster.ws_url(i),
            cluster.http_url(i)
        );
    }
    for i in 0..cluster.room_service_count() {
        println!(
            "  room-service {i}:  grpc {}   (metrics {})",
            cluster.room_service_grpc(i),
            cluster.room_service(i).http_url
        );
    }
    println!(
        "  auth-service:    grpc {}   (metrics {})",
        cluster.auth_grpc(),
        cluster.auth().http_url
    );
    println!("  redis:           {}", cluster.redis_url());
    if let Some(masters) = cluster.redis_cluster().and_then(|c| c.masters().ok()) {
        let masters: Vec<String> = masters.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        println!("  redis masters:   {}", masters.join(","));
    }
    println!("  API key:         {}", args.api_key);
    println!("  JWT secret:      {}", args.secret);
    println!(
        "development token (sub={}, every room, {} h):\n{dev_token}",
        args.user, args.token_hours
    );
    if cluster.gateway_count() > 0 {
        println!("connect: {}?token={dev_token}", cluster.ws_url(0));
    }
    println!("Ctrl-C or SIGTERM stops everything.");
}
