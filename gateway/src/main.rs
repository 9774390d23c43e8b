//! `gateway`: a cluster gateway (default) or, with `standalone`, the whole system in one
//! process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use roomcast_common::broker::{RedisSubscriber, Sink, Subscriber, resp3_url};
use roomcast_common::envelope::CONTROL_CHANNEL;
use roomcast_common::nats::NatsSubscriber;
use roomcast_common::ops::Readiness;
use roomcast_common::tls;
use roomcast_gateway::backend::Backends;
use roomcast_gateway::config::{GatewayConfig, gateway_id};
use roomcast_gateway::hub::Hub;
use roomcast_gateway::repair;
use roomcast_gateway::server::{self, Gateway};
use roomcast_gateway::standalone::{self, StandaloneConfig};
use roomcast_gateway::subscriptions::Subscriptions;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Roomcast gateway: holds WebSockets"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    gateway: GatewayConfig,
    /// Time over which connections are closed (1001) when draining on SIGTERM.
    #[arg(long, env = "DRAIN_WINDOW_MS", default_value_t = 2_000)]
    drain_window_ms: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process with an in-memory store and broker: for trying Roomcast.
    Standalone(StandaloneConfig),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Standalone too: the embedded services' spans then carry service.name "gateway".
    roomcast_common::telemetry::init_with_service("gateway");
    let cli = Cli::parse();
    let drain_window = Duration::from_millis(cli.drain_window_ms);
    let result = match cli.command {
        Some(Command::Standalone(config)) => standalone::run(config, shutdown_signal()).await,
        None => run_cluster_gateway(cli.gateway, drain_window).await,
    };
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
    let supported = ["redis://", "rediss://", "nats://"];
    if !supported
        .iter()
        .any(|scheme| broker_url.starts_with(scheme))
    {
        anyhow::bail!("BROKER_URL {broker_url:?}: expected redis://, rediss:// or nats://");
    }
    // Every file is read and checked before anything connects.
    let redis = if broker_url.starts_with("nats://") {
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
    let (hub, repairs) = Hub::new();
    let hub = Arc::new(hub);
    let sink: Sink = {
        let hub = hub.clone();
        Arc::new(move |event| hub.dispatch(event))
    };
    let readiness = Readiness::default();
    let subscriber = connect_broker(broker_url, redis, sink).await;
    subscriber
        .subscribe(CONTROL_CHANNEL)
        .await
        .context("subscribing to the control channel")?;
    let backends = Backends::new(
        &config.room_service_url,
        &config.auth_service_url,
        &internal_token,
        grpc_tls,
    )?;
    let subscriptions = Subscriptions::start(
        subscriber,
        readiness.clone(),
        Duration::from_secs(1),
        hub.clone(),
    );
    let gateway = Arc::new(
        Gateway::new(
            id,
            hub,
            subscriptions,
            backends,
            config.connection,
            readiness.clone(),
        )
        .with_namespaces(namespaces),
    );
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding {}", config.addr))?;
    let scheme = if listener_tls.is_some() { "wss" } else { "ws" };
    tracing::info!(addr = %listener.local_addr()?, gateway = %gateway.id, scheme, "listening");
    tokio::spawn(server::heartbeat_loop(gateway.clone()));
    let resolving = gateway.clone();
    tokio::spawn(async move { resolving.backends.keep_resolved().await });
    tokio::spawn(repair::run(gateway.clone(), repairs));
    let acceptor = listener_tls.map(tokio_rustls::TlsAcceptor::from);
    server::serve(listener, gateway, shutdown_signal(), drain_window, acceptor).await?;
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
async fn connect_broker(url: &str, redis: Option<redis::Client>, sink: Sink) -> Subscriber {
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = match &redis {
            None => NatsSubscriber::connect(url, sink.clone())
                .await
                .map(Subscriber::Nats),
            Some(client) => RedisSubscriber::connect_client(client.clone(), sink.clone())
                .await
                .map(Subscriber::Redis),
        };
        match connected {
            Ok(subscriber) => return subscriber,
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
