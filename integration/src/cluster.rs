//! A whole Roomcast cluster as real processes: redis-server, auth-service, N room-services and
//! M gateways, each on its own port, every gateway given every room-service.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use futures_util::future::try_join_all;

use crate::logs::LogDir;
use crate::ports::{PortPlan, PortRole};
use crate::process::{ChildProcess, Spawn, binary};
use crate::redis::RedisServer;
use crate::tls;

/// Settings of a system. Standalone mode (`roomcast`) uses the client-visible subset (heartbeats,
/// frame limit, secret, origins).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub gateways: usize,
    pub room_services: usize,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub max_frame_bytes: usize,
    /// The room-service server API key.
    pub api_key: String,
    /// `INTERNAL_TOKEN` of every process; made up per cluster.
    pub internal_token: String,
    /// HS256 secret shared by auth-service (or standalone mode) and the token helpers.
    pub secret: String,
    pub history_size: u64,
    pub history_ttl_seconds: u64,
    /// `ALLOWED_ORIGINS` for gateways; `None` leaves it unset (any origin).
    pub allowed_origins: Option<String>,
    /// Extra environment for every gateway (tuning a limit, say).
    pub gateway_env: Vec<(String, String)>,
    /// Extra environment for every room-service.
    pub room_env: Vec<(String, String)>,
    /// Extra environment for auth-service. When it names another key source (`JWKS_URL` or
    /// `JWT_PUBLIC_KEY_FILE`), auth-service gets no `JWT_SECRET`, and [`ClusterOptions::secret`]
    /// no longer signs valid tokens.
    pub auth_env: Vec<(String, String)>,
    pub ports: PortPlan,
    /// How long each process gets to become ready.
    pub ready_timeout: Duration,
    /// Redis serves TLS only (`rediss://`); room-services and gateways trust the test CA
    /// through `REDIS_CA_FILE`.
    pub redis_tls: bool,
    /// room-service and auth-service serve gRPC over mTLS with the test certificates; gateways
    /// reach them at `https://localhost:P` with the test client certificate.
    pub grpc_mtls: bool,
    /// Gateways terminate TLS: `wss://localhost:P/ws`, `https://localhost:P/readyz`.
    pub gateway_tls: bool,
    /// Scenario clients connect over SSE instead of WebSocket (see `Flavor::ClusterSse`).
    pub sse_clients: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            gateways: 2,
            room_services: 2,
            // The contract's defaults.
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            max_frame_bytes: 65_536,
            api_key: "roomcast-test-api-key".into(),
            internal_token: roomcast_common::credential::generate(),
            secret: "roomcast-test-secret".into(),
            history_size: 1000,
            history_ttl_seconds: 3600,
            allowed_origins: None,
            gateway_env: Vec::new(),
            room_env: Vec::new(),
            auth_env: Vec::new(),
            ports: PortPlan::Free,
            ready_timeout: Duration::from_secs(15),
            redis_tls: false,
            grpc_mtls: false,
            gateway_tls: false,
            sse_clients: false,
        }
    }
}

impl ClusterOptions {
    pub fn heartbeat(mut self, interval_ms: u64, timeout_ms: u64) -> Self {
        self.heartbeat_interval_ms = interval_ms;
        self.heartbeat_timeout_ms = timeout_ms;
        self
    }

    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    pub fn allowed_origins(mut self, origins: impl Into<String>) -> Self {
        self.allowed_origins = Some(origins.into());
        self
    }

    pub fn history(mut self, size: u64, ttl_seconds: u64) -> Self {
        self.history_size = size;
        self.history_ttl_seconds = ttl_seconds;
        self
    }

    pub fn gateway_env(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.gateway_env.push((key.into(), value.to_string()));
        self
    }

    pub fn auth_env(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.auth_env.push((key.into(), value.to_string()));
        self
    }

    pub fn room_env(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.room_env.push((key.into(), value.to_string()));
        self
    }

    /// Writes `json` to a file of its own and names it in `NAMESPACES_FILE` for every gateway
    /// (the standalone gateway included) and room-service.
    pub fn namespaces(self, json: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "roomcast-namespaces-{}-{n}.json",
            std::process::id()
        ));
        std::fs::write(&path, json).expect("writing the namespaces file");
        let path = path.display().to_string();
        self.gateway_env("NAMESPACES_FILE", &path)
            .room_env("NAMESPACES_FILE", &path)
    }

    /// See [`ClusterOptions::redis_tls`].
    pub fn redis_tls(mut self) -> Self {
        self.redis_tls = true;
        self
    }

    /// See [`ClusterOptions::grpc_mtls`].
    pub fn grpc_mtls(mut self) -> Self {
        self.grpc_mtls = true;
        self
    }

    /// See [`ClusterOptions::gateway_tls`].
    pub fn gateway_tls(mut self) -> Self {
        self.gateway_tls = true;
        self
    }

    /// `http`, or `https` with gRPC over TLS.
    fn grpc_scheme(&self) -> &'static str {
        if self.grpc_mtls { "https" } else { "http" }
    }

    /// The gRPC server settings of room-service and auth-service for [`Self::grpc_mtls`].
    fn grpc_server_tls(&self, spec: Spawn) -> Spawn {
        if !self.grpc_mtls {
            return spec;
        }
        spec.env("GRPC_TLS_CERT_FILE", tls::path("server.pem"))
            .env("GRPC_TLS_KEY_FILE", tls::path("server.key.pem"))
            .env("GRPC_TLS_CLIENT_CA_FILE", tls::path("ca.pem"))
    }

    /// The gateway settings shared by cluster and standalone mode.
    pub(crate) fn gateway_spec(&self, spec: Spawn, addr: &str) -> Spawn {
        let mut spec = spec
            .env("GATEWAY_ADDR", addr)
            .env("HEARTBEAT_INTERVAL_MS", self.heartbeat_interval_ms)
            .env("HEARTBEAT_TIMEOUT_MS", self.heartbeat_timeout_ms)
            .env("MAX_FRAME_BYTES", self.max_frame_bytes);
        if self.gateway_tls {
            spec = spec
                .env("GATEWAY_TLS_CERT_FILE", tls::path("server.pem"))
                .env("GATEWAY_TLS_KEY_FILE", tls::path("server.key.pem"));
        }
        if let Some(origins) = &self.allowed_origins {
            spec = spec.env("ALLOWED_ORIGINS", origins);
        }
        for (k, v) in &self.gateway_env {
            spec = spec.env(k.clone(), v);
        }
        spec
    }
}

/// A service process with its addresses.
#[derive(Debug)]
pub struct Service {
    pub process: ChildProcess,
    /// `http://127.0.0.1:P` for gRPC, where the service has one.
    pub grpc_url: Option<String>,
    /// `http://127.0.0.1:P`: the gateway's main address, a service's metrics address.
    pub http_url: String,
}

impl Service {
    async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.process
            .wait_ready(&format!("{}/readyz", self.http_url), timeout)
            .await
    }
}

/// A running cluster. Dropping it SIGKILLs everything; [`Cluster::shutdown`] stops it gently.
#[derive(Debug)]
pub struct Cluster {
    opts: ClusterOptions,
    // Declaration order is drop order: gateways first, so they are not left logging about
    // vanished backends; the log directory last, after every process has closed its log.
    gateways: Vec<Service>,
    room_services: Vec<Service>,
    auth: Service,
    redis: RedisServer,
    log_dir: LogDir,
}

impl Cluster {
    /// Starts every process and waits until all are ready; logs go to a fresh directory under
    /// `$TMPDIR/roomcast-it/`, removed on drop unless start-up or the test failed.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        Self::start_in(opts, LogDir::for_test("cluster")?).await
    }

    /// [`start`](Self::start) with the logs in `log_dir`.
    pub async fn start_in(opts: ClusterOptions, mut log_dir: LogDir) -> Result<Cluster> {
        match Self::spawn_all(&opts, log_dir.path()).await {
            Ok((gateways, room_services, auth, redis)) => Ok(Cluster {
                opts,
                gateways,
                room_services,
                auth,
                redis,
                log_dir,
            }),
            // Whatever started is killed on return; its logs say why the rest did not.
            Err(e) => {
                log_dir.keep();
                Err(e.context(format!(
                    "starting the cluster (logs kept in {})",
                    log_dir.path().display()
                )))
            }
        }
    }

    async fn spawn_all(
        opts: &ClusterOptions,
        dir: &Path,
    ) -> Result<(Vec<Service>, Vec<Service>, Service, RedisServer)> {
        let plan = opts.ports;
        let redis_port = plan.port(PortRole::Redis)?;
        let redis = if opts.redis_tls {
            RedisServer::start_tls_on(redis_port, dir).await?
        } else {
            RedisServer::start_on(redis_port, dir).await?
        };
        let redis_env = |spec: Spawn| {
            let spec = spec.env("REDIS_URL", redis.url());
            if opts.redis_tls {
                spec.env("REDIS_CA_FILE", tls::path("ca.pem"))
            } else {
                spec
            }
        };
        // A certificate is for `localhost`: TLS URLs name it rather than the address.
        let grpc_host = if opts.grpc_mtls {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let scheme = opts.grpc_scheme();

        let auth_grpc = plan.port(PortRole::AuthGrpc)?;
        let auth_http = plan.port(PortRole::AuthMetrics)?;
        let auth_spec = Spawn::new("auth-service", binary("auth-service")?, dir)
            .env("AUTH_SERVICE_ADDR", format!("127.0.0.1:{auth_grpc}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{auth_http}"))
            .env("JWT_SECRET", &opts.secret)
            .env("INTERNAL_TOKEN", &opts.internal_token);
        let mut auth_spec = opts.grpc_server_tls(auth_spec);
        for (k, v) in &opts.auth_env {
            if k == "JWKS_URL" || k == "JWT_PUBLIC_KEY_FILE" {
                // auth-service refuses to start with two key sources.
                auth_spec.env.retain(|(k, _)| k != "JWT_SECRET");
            }
            auth_spec = auth_spec.env(k.clone(), v);
        }
        let auth = Service {
            process: ChildProcess::spawn(auth_spec)?,
            grpc_url: Some(format!("{scheme}://{grpc_host}:{auth_grpc}")),
            http_url: format!("http://127.0.0.1:{auth_http}"),
        };

        let mut room_services = Vec::new();
        for i in 0..opts.room_services {
            let grpc = plan.port(PortRole::RoomGrpc(i))?;
            let http = plan.port(PortRole::RoomMetrics(i))?;
            let spec = Spawn::new(format!("room-service-{i}"), binary("room-service")?, dir)
                .env("ROOM_SERVICE_ADDR", format!("127.0.0.1:{grpc}"))
                .env("METRICS_ADDR", format!("127.0.0.1:{http}"));
            let mut spec = opts
                .grpc_server_tls(redis_env(spec))
                .env("HISTORY_SIZE", opts.history_size)
                .env("HISTORY_TTL_SECONDS", opts.history_ttl_seconds)
                .env("API_KEY", &opts.api_key)
                .env("INTERNAL_TOKEN", &opts.internal_token);
            for (k, v) in &opts.room_env {
                spec = spec.env(k.clone(), v);
            }
            room_services.push(Service {
                process: ChildProcess::spawn(spec)?,
                grpc_url: Some(format!("{scheme}://{grpc_host}:{grpc}")),
                http_url: format!("http://127.0.0.1:{http}"),
            });
        }
        let backends = std::iter::once(&auth).chain(&room_services);
        try_join_all(backends.map(|s| s.wait_ready(opts.ready_timeout))).await?;

        let room_urls = join_urls(&room_services);
        let auth_url = join_urls(std::slice::from_ref(&auth));
        let mut gateways = Vec::new();
        for i in 0..opts.gateways {
            let port = plan.port(PortRole::Gateway(i))?;
            let spec = Spawn::new(format!("gateway-{i}"), binary("gateway")?, dir)
                .env("GATEWAY_ID", format!("gw-{i}"))
                .env("ROOM_SERVICE_URL", &room_urls)
                .env("AUTH_SERVICE_URL", &auth_url)
                .env("INTERNAL_TOKEN", &opts.internal_token);
            let mut spec = opts.gateway_spec(redis_env(spec), &format!("127.0.0.1:{port}"));
            if opts.grpc_mtls {
                spec = spec
                    .env("GRPC_TLS_CA_FILE", tls::path("ca.pem"))
                    .env("GRPC_TLS_CLIENT_CERT_FILE", tls::path("client.pem"))
                    .env("GRPC_TLS_CLIENT_KEY_FILE", tls::path("client.key.pem"));
            }
            let http_url = if opts.gateway_tls {
                format!("https://localhost:{port}")
            } else {
                format!("http://127.0.0.1:{port}")
            };
            gateways.push(Service {
                process: ChildProcess::spawn(spec)?,
                grpc_url: None,
                http_url,
            });
        }
        try_join_all(gateways.iter().map(|s| s.wait_ready(opts.ready_timeout))).await?;
        Ok((gateways, room_services, auth, redis))
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    pub fn log_dir(&self) -> &LogDir {
        &self.log_dir
    }

    pub fn log_dir_mut(&mut self) -> &mut LogDir {
        &mut self.log_dir
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// `ws://127.0.0.1:P/ws` of gateway `i` (`wss://localhost:P/ws` with TLS).
    pub fn ws_url(&self, i: usize) -> String {
        let http = &self.gateways[i].http_url;
        let ws = match http.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => http.replacen("http://", "ws://", 1),
        };
        format!("{ws}/ws")
    }

    /// `http://127.0.0.1:P` of gateway `i` (`https://localhost:P` with TLS).
    pub fn http_url(&self, i: usize) -> String {
        self.gateways[i].http_url.clone()
    }

    /// `http://127.0.0.1:P` (gRPC) of room-service `i` (`https://localhost:P` with TLS).
    pub fn room_service_grpc(&self, i: usize) -> String {
        self.room_services[i].grpc_url.clone().unwrap_or_default()
    }

    pub fn auth_grpc(&self) -> String {
        self.auth.grpc_url.clone().unwrap_or_default()
    }

    pub fn gateway(&self, i: usize) -> &Service {
        &self.gateways[i]
    }

    pub fn room_service(&self, i: usize) -> &Service {
        &self.room_services[i]
    }

    pub fn room_service_count(&self) -> usize {
        self.room_services.len()
    }

    pub fn auth(&self) -> &Service {
        &self.auth
    }

    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    /// Every process, gateways first.
    pub fn processes(&self) -> Vec<&ChildProcess> {
        let services = self.gateways.iter().chain(&self.room_services);
        let mut all: Vec<&ChildProcess> = services.map(|s| &s.process).collect();
        all.push(&self.auth.process);
        all.push(self.redis.process());
        all
    }

    /// Stops gently, in dependency order: gateways drain first, then the services, then Redis.
    pub async fn shutdown(self, grace: Duration) -> Result<()> {
        try_join_all(self.gateways.iter().map(|s| s.process.stop(grace))).await?;
        let services = self.room_services.iter().chain(std::iter::once(&self.auth));
        try_join_all(services.map(|s| s.process.stop(grace))).await?;
        self.redis.process().stop(grace).await
    }
}

fn join_urls(services: &[Service]) -> String {
    let urls: Vec<&str> = services
        .iter()
        .filter_map(|s| s.grpc_url.as_deref())
        .collect();
    urls.join(",")
}
