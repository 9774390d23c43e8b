//! `room-service`: the gRPC room service backed by Redis.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use roomcast_common::broker::nats::NatsPublisher;
use roomcast_common::namespace::Namespaces;
use roomcast_common::ops::{self, Readiness};
use roomcast_room::config::Config;
use roomcast_room::store::{Backend, RedisStore};
use roomcast_room::{RoomServiceImpl, SharedStore};
use tokio::sync::watch;

// jemalloc, as in the gateway: a gRPC call allocates and frees many small buffers, which
// glibc's malloc serves more slowly.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often readiness re-checks that Redis answers.
const READINESS_CHECK_EVERY: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    roomcast_common::telemetry::init_with_service("room-service");
    let config = Config::parse();
    let runtime = match roomcast_common::runtime::build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("room-service: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // A plain one-line reason, without the backtrace `anyhow` would print from `main`.
    let code = match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    };
    // Outside the runtime: sends the spans still queued (bounded wait).
    roomcast_common::telemetry::shutdown();
    code
}

async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let namespaces = config.namespaces()?;
    let grpc_tls = config.grpc_tls()?;

    let nats = match config.nats_url() {
        Some(nats_url) => Some(
            NatsPublisher::connect(nats_url)
                .await
                .with_context(|| format!("connecting to BROKER_URL {nats_url}"))?,
        ),
        None => None,
    };
    /// The settings every kind of Redis store takes.
    fn configured<C: Backend>(
        store: RedisStore<C>,
        config: &Config,
        nats: Option<NatsPublisher>,
        namespaces: Arc<Namespaces>,
    ) -> SharedStore {
        let mut store = store
            .with_batch_interval(config.publish_batch_interval())
            .with_namespaces(namespaces);
        if let Some(nats) = nats {
            store = store.with_broker(Arc::new(nats));
        }
        Arc::new(store)
    }
    let limits = config.history_limits();
    let store = if config.redis_cluster_nodes().is_some() {
        configured(
            RedisStore::cluster(&config.redis_url, limits)?,
            &config,
            nats,
            namespaces,
        )
    } else {
        configured(
            RedisStore::from_client(config.redis_client()?, limits)?,
            &config,
            nats,
            namespaces,
        )
    };
    let service = RoomServiceImpl::new(store.clone(), config.service_options());
    let readiness = Readiness::default();

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // Start without Redis if need be: readiness stays false until it answers.
    tokio::spawn(watch_store(store.clone(), readiness.clone(), stopped()));
    let sweep_every = Duration::from_millis(config.presence_sweep_ms.max(50));
    tokio::spawn(sweep_dead_gateways(store, sweep_every, stopped()));

    let ops_listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {}", config.metrics_addr))?;
    let grpc_listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding ROOM_SERVICE_ADDR {}", config.addr))?;
    let tls = match (&grpc_tls, &config.grpc_tls_client_ca_file) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    tracing::info!(addr = %grpc_listener.local_addr()?, metrics_addr = %ops_listener.local_addr()?, tls, "listening");

    let ops_task = tokio::spawn(ops::serve(ops_listener, readiness.clone(), stopped()));
    let grpc_task = tokio::spawn(roomcast_room::serve_with(
        grpc_listener,
        service,
        roomcast_room::ServeOptions {
            tls: grpc_tls,
            readiness: Some(readiness.clone()),
        },
        stopped(),
    ));

    shutdown_signal().await;
    tracing::info!("shutting down");
    readiness.set(false);
    let _ = stop_tx.send(true);

    grpc_task.await?.context("gRPC server")?;
    ops_task.await?.context("ops server")?;
    Ok(())
}

/// Removes the members of dead gateways, so presence and `member_left` follow a gateway
/// crash within its lease plus one sweep interval.
async fn sweep_dead_gateways(
    store: SharedStore,
    every: Duration,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = store.sweep_dead_gateways().await {
            tracing::debug!(%error, "presence sweep failed");
        }
    }
}

/// Keeps readiness in line with whether Redis answers a PING.
async fn watch_store(store: SharedStore, readiness: Readiness, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut ticker = tokio::time::interval(READINESS_CHECK_EVERY);
    // A slow PING (Redis down) must not be followed by a burst of catch-up checks.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ready = None;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = ticker.tick() => {}
        }
        let result = store.ping().await;
        let ready = result.is_ok();
        readiness.set(ready);
        if was_ready != Some(ready) {
            match result {
                Ok(()) => tracing::info!("store reachable: ready"),
                Err(error) => tracing::warn!(%error, "store unreachable: not ready"),
            }
            was_ready = Some(ready);
        }
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the service");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
