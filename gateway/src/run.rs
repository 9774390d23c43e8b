//! One gateway's wiring, the same for a cluster gateway and standalone mode: the hub, the
//! broker subscriptions, the backends, the shared [`Gateway`] state, the background loops
//! (lease heartbeat, name resolution, gap repair) and the HTTP server. A caller chooses only
//! the broker (how to subscribe a sink) and the backends (where the services are).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use roomcast_common::broker::{Broker, Sink};
use roomcast_common::envelope::{CONTROL_CHANNEL, gateway_channel};
use roomcast_common::ops::Readiness;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use crate::backend::Backends;
use crate::config::ConnectionSettings;
use crate::hub::{Hub, RepairRequest};
use crate::repair;
use crate::server;
use crate::state::Gateway;
use crate::subscriptions::Subscriptions;

/// What a running gateway is, besides its broker and backends.
pub struct RunConfig {
    /// `GATEWAY_ID`, checked.
    pub id: String,
    /// `GATEWAY_ADDR`: HTTP + WebSocket listen address.
    pub addr: SocketAddr,
    pub connection: ConnectionSettings,
    /// Time over which connections are closed (1001) when draining.
    pub drain_window: Duration,
    /// The listener's TLS (`GATEWAY_TLS_*`); `None` serves plain HTTP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Per-namespace rules (`NAMESPACES_FILE`): client publish and presence.
    pub namespaces: Arc<roomcast_common::namespace::Namespaces>,
}

/// A gateway subscribed to its broker and bound to its address, not serving yet.
pub struct Bound {
    gateway: Arc<Gateway>,
    repairs: mpsc::UnboundedReceiver<RepairRequest>,
    listener: TcpListener,
    drain_window: Duration,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// Subscribes to the broker (`broker` connects both sides of the broker, the subscriber feeding the hub's sink), builds the
/// shared state and binds the listen address.
pub async fn bind<B, F>(config: RunConfig, broker: B, backends: Backends) -> anyhow::Result<Bound>
where
    B: FnOnce(Sink) -> F,
    F: Future<Output = anyhow::Result<Broker>>,
{
    let (hub, repairs) = Hub::new();
    let hub = Arc::new(hub);
    let sink: Sink = {
        let hub = hub.clone();
        Arc::new(move |event| hub.receive(event))
    };
    tokio::spawn(hub.clone().run_fan_out());
    let readiness = Readiness::default();
    let Broker {
        subscriber,
        publisher,
    } = broker(sink).await?;
    subscriber
        .subscribe(CONTROL_CHANNEL)
        .await
        .context("subscribing to the control channel")?;
    subscriber
        .subscribe(&gateway_channel(&config.id))
        .await
        .context("subscribing to the gateway's own channel")?;
    let subscriptions = Subscriptions::start(
        subscriber,
        readiness.clone(),
        Duration::from_secs(1),
        hub.clone(),
    );
    let gateway = Arc::new(
        Gateway::new(
            config.id,
            hub,
            subscriptions,
            publisher,
            backends,
            config.connection,
            readiness,
        )
        .with_namespaces(config.namespaces),
    );
    let listener =
        listen(config.addr).with_context(|| format!("binding GATEWAY_ADDR {}", config.addr))?;
    Ok(Bound {
        gateway,
        repairs,
        listener,
        drain_window: config.drain_window,
        tls: config.tls,
    })
}

/// The gateway's listener, as tokio's `TcpListener::bind` makes it (address reuse, a backlog
/// of 1024) and with `TCP_NODELAY`, which Linux copies to every accepted socket: frames are
/// small and latency matters more than packet count (without it a `published` reply waits for
/// the client's next frame or a delayed ACK), and no connection needs its own system call.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Bound {
    /// The address the listener got (GATEWAY_ADDR with port 0 picks one).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Bound {
            gateway,
            repairs,
            listener,
            drain_window,
            tls,
        } = self;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        tracing::info!(addr = %listener.local_addr()?, gateway = %gateway.id, scheme, "listening");
        tokio::spawn(crate::lease::heartbeat_loop(gateway.clone()));
        let resolving = gateway.clone();
        tokio::spawn(async move { resolving.backends.keep_resolved().await });
        tokio::spawn(repair::run(gateway.clone(), repairs));
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        server::serve(listener, gateway, shutdown, drain_window, acceptor).await?;
        Ok(())
    }
}

/// [`bind`], then [`Bound::serve`] until `shutdown`.
pub async fn run<B, F>(
    config: RunConfig,
    broker: B,
    backends: Backends,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    B: FnOnce(Sink) -> F,
    F: Future<Output = anyhow::Result<Broker>>,
{
    bind(config, broker, backends).await?.serve(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection `set_nodelay` call is gone: accepted sockets must inherit it.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(!client.nodelay().unwrap());
    }
}
