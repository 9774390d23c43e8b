//! `gateway`: a cluster gateway. (Standalone mode, the whole system in one process, is the
//! `roomcast` binary.)

use std::time::Duration;

use clap::Parser;
use std::sync::Arc;

use roomcast_common::broker::cluster;
use roomcast_common::broker::nats::{NatsPublisher, NatsSubscriber};
use roomcast_common::broker::{
    Broker, BrokerError, RedisPublisher, RedisSubscriber, Sink, resp3_url,
};
use roomcast_common::tls;
use roomcast_gateway::RunConfig;
use roomcast_gateway::backend::Backends;
use roomcast_gateway::config::{GatewayConfig, gateway_id};

// jemalloc rather than glibc's malloc: a connection's set-up allocates and frees far more than
// the connection keeps, and glibc spent about a fifth of the gateway's CPU there and held freed
// pages between the live ones. Measured with `loadgen connections` (19,000 connections, one
// gateway): set-up CPU 103-118 -> 69-80 µs per connection, idle RSS per connection no higher.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Roomcast gateway: holds WebSockets"
)]
struct Cli {
    #[command(flatten)]
    gateway: GatewayConfig,
    /// Time over which connections are closed (1001) when draining on SIGTERM.
    #[arg(long, env = "DRAIN_WINDOW_MS", default_value_t = 2_000)]
    drain_window_ms: u64,
}

fn main() -> anyhow::Result<()> {
    roomcast_common::runtime::build()?.block_on(gateway_main())
}

async fn gateway_main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("standalone") {
        eprintln!("error: `gateway standalone` is now `roomcast standalone` (the roomcast binary)");
        std::process::exit(2);
    }
    roomcast_common::telemetry::init_with_service("gateway");
    let cli = Cli::parse();
    let drain_window = Duration::from_millis(cli.drain_window_ms);
    let result = run_cluster_gateway(cli.gateway, drain_window).await;
    // Sends the spans still queued; it blocks (bounded), so off the async workers.
    let _ = tokio::task::spawn_blocking(roomcast_common::telemetry::shutdown).await;
    result
}

async fn run_cluster_gateway(config: GatewayConfig, drain_window: Duration) -> anyhow::Result<()> {
    config.connection.validate()?;
    let namespaces = config.connection.namespaces()?;
    let internal_token = roomcast_common::credential::validate(
        "INTERNAL_TOKEN",
        config.internal_token.as_deref(),
        "the gateway authenticates its calls to room-service and auth-service with it",
    )?;
    let id = gateway_id(config.id.as_deref())?;
    let broker_url = config.broker_url.as_deref().unwrap_or(&config.redis_url);
    let supported = ["redis://", "rediss://", "nats://", cluster::SCHEME];
    if !supported
        .iter()
        .any(|scheme| broker_url.starts_with(scheme))
    {
        anyhow::bail!(
            "BROKER_URL {broker_url:?}: expected redis://, rediss://, redis+cluster:// or nats://"
        );
    }
    if broker_url.starts_with(cluster::SCHEME) && cluster::node_urls(broker_url).is_none() {
        anyhow::bail!("BROKER_URL {broker_url:?}: redis+cluster://host:port,host:port expected");
    }
    // Every file is read and checked before anything connects.
    let redis = if broker_url.starts_with("nats://") || broker_url.starts_with(cluster::SCHEME) {
        None
    } else {
        let setting = if config.broker_url.is_some() {
            "BROKER_URL"
        } else {
            "REDIS_URL"
        };
        Some(tls::redis_client(
            setting,
            &resp3_url(broker_url),
            config.redis_ca_file.as_deref(),
        )?)
    };
    let grpc_tls = grpc_client_tls(&config)?;
    let listener_tls = tls::http_server(
        ("GATEWAY_TLS_CERT_FILE", config.tls_cert_file.as_deref()),
        ("GATEWAY_TLS_KEY_FILE", config.tls_key_file.as_deref()),
    )?;
    let backends = Backends::new(
        &config.room_service_url,
        &config.auth_service_url,
        &internal_token,
        grpc_tls,
    )?
    .with_publish_pacing(config.publish_pacing()?);
    let run = RunConfig {
        id,
        addr: config.addr,
        connection: config.connection,
        drain_window,
        tls: listener_tls,
        namespaces,
    };
    let broker = async |sink| Ok(connect_broker(broker_url, redis, sink).await);
    roomcast_gateway::run(run, broker, backends, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The TLS of `https://` service URLs: `None` (the system's roots, no client certificate)
/// unless a `GRPC_TLS_*` setting is given.
fn grpc_client_tls(
    config: &GatewayConfig,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    let ca = config.grpc_tls_ca_file.as_deref();
    let cert = config.grpc_tls_client_cert_file.as_deref();
    let key = config.grpc_tls_client_key_file.as_deref();
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let tls = tls::grpc_client(ca, cert, key)?;
    let urls = [&config.room_service_url, &config.auth_service_url];
    if !urls.iter().any(|urls| urls.contains("https://")) {
        tracing::warn!(
            "GRPC_TLS_* is set but no ROOM_SERVICE_URL / AUTH_SERVICE_URL is https://: unused"
        );
    }
    Ok(Some(tls))
}

/// Connects to the broker (`redis`: the client of a Redis broker), retrying with backoff: a
/// gateway started before its broker waits.
async fn connect_broker(url: &str, redis: Option<redis::Client>, sink: Sink) -> Broker {
    async fn connect(
        url: &str,
        redis: &Option<redis::Client>,
        sink: Sink,
    ) -> Result<Broker, BrokerError> {
        Ok(match redis {
            None if url.starts_with(cluster::SCHEME) => Broker {
                subscriber: Arc::new(cluster::ClusterSubscriber::connect(url, sink).await?),
                publisher: Arc::new(cluster::ClusterPublisher::connect(url).await?),
            },
            None => Broker {
                subscriber: Arc::new(NatsSubscriber::connect(url, sink).await?),
                publisher: Arc::new(NatsPublisher::connect(url).await?),
            },
            Some(client) => Broker {
                subscriber: Arc::new(RedisSubscriber::connect_client(client.clone(), sink).await?),
                publisher: Arc::new(RedisPublisher::connect_client(client.clone()).await?),
            },
        })
    }
    let mut delay = Duration::from_millis(100);
    loop {
        match connect(url, &redis, sink.clone()).await {
            Ok(broker) => return broker,
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker not reachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
