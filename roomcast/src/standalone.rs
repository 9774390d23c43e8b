//! Standalone mode: auth-service, room-service (in-memory store and broker) and a gateway in
//! one process, for trying Roomcast on a laptop. The services run as their real gRPC servers
//! on loopback ports, so every client-visible rule is the cluster's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use roomcast_common::broker::{Broker, MemoryBroker};
use roomcast_gateway::RunConfig;
use roomcast_gateway::backend::Backends;
use roomcast_gateway::config::{ConnectionSettings, gateway_id};

#[derive(Debug, Clone, Args)]
pub struct StandaloneConfig {
    /// HTTP + WebSocket listen address.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// HS256 secret for client tokens; default: a random one, printed with a dev token.
    #[arg(long, env = "JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// Where the room-service's gRPC server API listens (other backends call it).
    #[arg(long, env = "ROOM_SERVICE_ADDR", default_value = "127.0.0.1:50051")]
    pub room_service_addr: SocketAddr,
    /// Key for the server API; unset refuses it.
    #[arg(long, env = "API_KEY")]
    pub api_key: Option<String>,
    /// Messages kept per room.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,
    /// Age after which history messages are dropped.
    #[arg(long, env = "HISTORY_TTL_SECONDS", default_value_t = 3600)]
    pub history_ttl_seconds: u64,
    /// User of the printed development token.
    #[arg(long, default_value = "dev")]
    pub dev_user: String,
    #[command(flatten)]
    pub connection: ConnectionSettings,
}

pub async fn run(
    config: StandaloneConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.connection.validate()?;
    let namespaces = config.connection.namespaces()?;
    let secret = config
        .jwt_secret
        .clone()
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    // The services listen on ports others can reach (ROOM_SERVICE_ADDR for the server API), so
    // internal calls need a credential here too; nothing outside this process needs it.
    let internal_token = roomcast_common::credential::generate();
    let broker = MemoryBroker::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };

    // auth-service, on a loopback port of its own.
    let auth_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let auth_addr = auth_listener.local_addr()?;
    let verifier = roomcast_auth::Verifier::hs256(secret.as_bytes())?;
    tokio::spawn(roomcast_auth::serve(
        auth_listener,
        verifier,
        internal_token.clone(),
        stop_signal(),
    ));

    // room-service with the in-memory store, on ROOM_SERVICE_ADDR.
    let room_listener = tokio::net::TcpListener::bind(config.room_service_addr)
        .await
        .with_context(|| format!("binding ROOM_SERVICE_ADDR {}", config.room_service_addr))?;
    let room_addr = room_listener.local_addr()?;
    let store = roomcast_room::store::Store::memory(
        broker.clone(),
        roomcast_room::store::HistoryLimits {
            size: config.history_size,
            ttl: Duration::from_secs(config.history_ttl_seconds),
        },
    )
    .with_namespaces(namespaces.clone());
    let service = roomcast_room::service::RoomServiceImpl::new(
        store,
        roomcast_room::service::ServiceOptions {
            api_key: config.api_key.clone(),
            internal_token: Some(internal_token.clone()),
            ..Default::default()
        },
    );
    tokio::spawn(roomcast_room::serve(room_listener, service, stop_signal()));

    // The gateway, subscribed to the in-memory broker.
    let backends = Backends::new(
        &format!("http://{room_addr}"),
        &format!("http://{auth_addr}"),
        &internal_token,
        None,
    )?;
    let run = RunConfig {
        id: gateway_id(None)?,
        addr: config.addr,
        connection: config.connection.clone(),
        drain_window: Duration::from_millis(500),
        tls: None,
        namespaces,
    };
    let connect = async |sink| {
        Ok(Broker {
            subscriber: Arc::new(broker.subscriber(sink)),
            publisher: Arc::new(broker.clone()),
        })
    };
    let gateway = roomcast_gateway::bind(run, connect, backends).await?;
    let addr = gateway.local_addr()?;
    let token =
        roomcast_auth::mint_hs256(secret.as_bytes(), &config.dev_user, 24 * 3600, None, None)?;
    println!("Roomcast standalone is running.");
    println!("  demo page:  http://{addr}/?token={token}");
    println!("  WebSocket:  ws://{addr}/ws?token=<jwt>");
    println!("  server API: grpc://{room_addr} (roomcast.v1.ServerApi, API_KEY)");
    println!("  dev token ({}; 24 h): {token}", config.dev_user);
    if config.jwt_secret.is_none() {
        println!("  JWT_SECRET was not set; this run's secret: {secret}");
    }
    gateway.serve(shutdown).await?;
    let _ = stop.send(true);
    Ok(())
}
