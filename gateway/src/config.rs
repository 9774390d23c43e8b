//! Settings of the gateway (protocol.md section 3), from flags or environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Above this, a held message would be late by any measure.
pub const MAX_WRITE_DELAY_MS: u64 = 1000;

/// Longer pacing would hold publishes past the latency any client expects.
pub const MAX_PUBLISH_BATCH_MS: u64 = 100;

/// Settings that shape every connection; shared by cluster and standalone mode.
#[derive(Debug, Clone, Args)]
pub struct ConnectionSettings {
    /// Interval between server pings.
    #[arg(long, env = "HEARTBEAT_INTERVAL_MS", default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,
    /// A connection silent for this long (no pong, no frame) is terminated.
    #[arg(long, env = "HEARTBEAT_TIMEOUT_MS", default_value_t = 30_000)]
    pub heartbeat_timeout_ms: u64,
    /// Comma-separated origins allowed for browser handshakes; empty allows any.
    #[arg(long, env = "ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,
    /// JSON file of per-namespace options; the gateway applies `client_publish` and `presence`
    /// to client commands. Unset: every room gets the global settings.
    #[arg(long, env = "NAMESPACES_FILE")]
    pub namespaces_file: Option<std::path::PathBuf>,
    /// Largest client frame; larger ones close the connection with 1009.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it counts as a slow consumer (closed with 4008).
    #[arg(long, env = "OUTBOUND_QUEUE_LEN", default_value_t = 1024)]
    pub outbound_queue_len: usize,
    /// Publishes per second one connection may make (token bucket rate).
    #[arg(long, env = "PUBLISH_RATE", default_value_t = 100.0)]
    pub publish_rate: f64,
    /// Publishes a connection may make in a burst (token bucket size).
    #[arg(long, env = "PUBLISH_BURST", default_value_t = 200)]
    pub publish_burst: u32,
    /// Reads (`join`, `presence`, `history`) per second one connection may make (token bucket
    /// rate). Over it they get `rate_limited`; the connection stays open.
    #[arg(long, env = "READ_RATE", default_value_t = 20.0)]
    pub read_rate: f64,
    /// Reads a connection may make in a burst (token bucket size).
    #[arg(long, env = "READ_BURST", default_value_t = 40)]
    pub read_burst: u32,
    /// Consecutive refused publishes after which the connection is closed with 4029.
    #[arg(long, env = "RATE_LIMIT_CLOSE_AFTER", default_value_t = 50)]
    pub rate_limit_close_after: u32,
    /// Rooms one connection may be in at once.
    #[arg(long, env = "MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,
    /// Connections one user may hold across the cluster (0: no limit); counted in the store,
    /// so a dead gateway's connections stop counting when its lease runs out.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: usize,
    /// How long a connection holds a broadcast before writing it, to write it together with
    /// those that follow (0: write at once). Trades latency for CPU: one system call carries
    /// several messages. Replies to the client's own commands are never held.
    #[arg(long, env = "WRITE_DELAY_MS", default_value_t = 0)]
    pub write_delay_ms: u64,
    /// A TCP connection that has not completed its WebSocket upgrade (or any other HTTP
    /// exchange) within this time is closed, whether it sent nothing or sends slowly.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// TCP connections still in their HTTP phase at once; beyond it new ones are refused with
    /// 503 and closed at once, so idle sockets cannot use up the file descriptors.
    #[arg(long, env = "MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    pub max_pending_handshakes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("HEARTBEAT_TIMEOUT_MS must be greater than HEARTBEAT_INTERVAL_MS")]
    TimeoutNotAboveInterval,
    #[error("WRITE_DELAY_MS may be at most {MAX_WRITE_DELAY_MS} (got {0})")]
    WriteDelay(u64),
    #[error("PUBLISH_BATCH_MS may be at most {MAX_PUBLISH_BATCH_MS} (got {0})")]
    PublishBatch(u64),
    #[error("GATEWAY_ID may only contain A-Z a-z 0-9 _ . : - (got {0:?})")]
    BadGatewayId(String),
}

impl ConnectionSettings {
    /// The namespaces of `NAMESPACES_FILE`, or the default namespace alone.
    pub fn namespaces(
        &self,
    ) -> Result<
        std::sync::Arc<roomcast_common::namespace::Namespaces>,
        roomcast_common::namespace::NamespaceError,
    > {
        Ok(std::sync::Arc::new(match &self.namespaces_file {
            Some(path) => roomcast_common::namespace::Namespaces::from_file(path)?,
            None => roomcast_common::namespace::Namespaces::default(),
        }))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms == 0 {
            return Err(ConfigError::Zero("HEARTBEAT_INTERVAL_MS"));
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(ConfigError::TimeoutNotAboveInterval);
        }
        if self.max_frame_bytes == 0 {
            return Err(ConfigError::Zero("MAX_FRAME_BYTES"));
        }
        if self.outbound_queue_len == 0 {
            return Err(ConfigError::Zero("OUTBOUND_QUEUE_LEN"));
        }
        if !self.publish_rate.is_finite() || self.publish_rate <= 0.0 {
            return Err(ConfigError::Zero("PUBLISH_RATE"));
        }
        if self.publish_burst == 0 {
            return Err(ConfigError::Zero("PUBLISH_BURST"));
        }
        if !self.read_rate.is_finite() || self.read_rate <= 0.0 {
            return Err(ConfigError::Zero("READ_RATE"));
        }
        if self.read_burst == 0 {
            return Err(ConfigError::Zero("READ_BURST"));
        }
        if self.handshake_timeout_ms == 0 {
            return Err(ConfigError::Zero("HANDSHAKE_TIMEOUT_MS"));
        }
        if self.max_pending_handshakes == 0 {
            return Err(ConfigError::Zero("MAX_PENDING_HANDSHAKES"));
        }
        if self.rate_limit_close_after == 0 {
            return Err(ConfigError::Zero("RATE_LIMIT_CLOSE_AFTER"));
        }
        if self.max_rooms_per_connection == 0 {
            return Err(ConfigError::Zero("MAX_ROOMS_PER_CONNECTION"));
        }
        if self.write_delay_ms > MAX_WRITE_DELAY_MS {
            return Err(ConfigError::WriteDelay(self.write_delay_ms));
        }
        Ok(())
    }

    pub fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }

    /// The allowed origins, parsed; empty means any.
    pub fn origins(&self) -> Vec<String> {
        self.allowed_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect()
    }
}

/// A gateway in a cluster.
#[derive(Debug, Clone, Args)]
pub struct GatewayConfig {
    /// HTTP + WebSocket listen address.
    #[arg(long, env = "GATEWAY_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// Unique id of this gateway; default: hostname + random suffix.
    #[arg(long, env = "GATEWAY_ID")]
    pub id: Option<String>,
    /// Room-service endpoint(s), comma-separated.
    #[arg(
        long,
        env = "ROOM_SERVICE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub room_service_url: String,
    /// Auth-service endpoint(s), comma-separated.
    #[arg(
        long,
        env = "AUTH_SERVICE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub auth_service_url: String,
    /// State store and default broker.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Pub/sub leg; default: REDIS_URL.
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,
    /// Credential of internal calls to room-service and auth-service; required.
    #[arg(long, env = "INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// PEM CA certificate(s) a `rediss://` broker must chain to; default: the system's roots.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM CA certificate(s) `https://` room-service and auth-service URLs must chain to;
    /// default: the system's roots.
    #[arg(long, env = "GRPC_TLS_CA_FILE")]
    pub grpc_tls_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to `https://` services (mTLS).
    #[arg(long, env = "GRPC_TLS_CLIENT_CERT_FILE")]
    pub grpc_tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of GRPC_TLS_CLIENT_CERT_FILE.
    #[arg(long, env = "GRPC_TLS_CLIENT_KEY_FILE")]
    pub grpc_tls_client_key_file: Option<PathBuf>,
    /// PEM certificate chain: with GATEWAY_TLS_KEY_FILE, GATEWAY_ADDR serves TLS only
    /// (`wss://`, `https://`).
    #[arg(long, env = "GATEWAY_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of GATEWAY_TLS_CERT_FILE.
    #[arg(long, env = "GATEWAY_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Least time between two `PublishBatch` calls to the room-service unless a full batch is
    /// waiting: publishes arriving meanwhile share the next call and wait at most this long
    /// (0: a call goes as soon as one of the two call slots is free).
    #[arg(long, env = "PUBLISH_BATCH_MS", default_value_t = 5)]
    pub publish_batch_ms: u64,
    #[command(flatten)]
    pub connection: ConnectionSettings,
}

impl GatewayConfig {
    /// Least time between two `PublishBatch` calls, checked.
    pub fn publish_pacing(&self) -> Result<Duration, ConfigError> {
        if self.publish_batch_ms > MAX_PUBLISH_BATCH_MS {
            return Err(ConfigError::PublishBatch(self.publish_batch_ms));
        }
        Ok(Duration::from_millis(self.publish_batch_ms))
    }
}

/// The id to use: configured, or hostname + random suffix; checked because it becomes part of
/// client ids, which travel in broker headers.
pub fn gateway_id(configured: Option<&str>) -> Result<String, ConfigError> {
    let id = match configured {
        Some(id) => id.to_owned(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let host: String = host
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
                .collect();
            let host = if host.is_empty() {
                "gw".to_owned()
            } else {
                host
            };
            format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
        }
    };
    if roomcast_common::room::validate_room_name(&id).is_err() {
        return Err(ConfigError::BadGatewayId(id));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ConnectionSettings {
        ConnectionSettings {
            heartbeat_interval_ms: 10,
            heartbeat_timeout_ms: 30,
            allowed_origins: " https://a.example/, ,http://b ".into(),
            namespaces_file: None,
            max_frame_bytes: 10,
            outbound_queue_len: 4,
            publish_rate: 1.0,
            publish_burst: 1,
            read_rate: 1.0,
            read_burst: 1,
            rate_limit_close_after: 1,
            max_rooms_per_connection: 1,
            max_connections_per_user: 0,
            write_delay_ms: 0,
            handshake_timeout_ms: 1,
            max_pending_handshakes: 1,
        }
    }

    #[test]
    fn validates_settings() {
        assert!(settings().validate().is_ok());
        let mut s = settings();
        s.heartbeat_timeout_ms = 10;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.outbound_queue_len = 0;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.write_delay_ms = MAX_WRITE_DELAY_MS + 1;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.read_rate = 0.0;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.handshake_timeout_ms = 0;
        assert!(s.validate().is_err());
        let mut s = settings();
        s.max_pending_handshakes = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn publish_pacing_defaults_to_5_ms_and_is_bounded() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            gateway: GatewayConfig,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(
                std::iter::once("gateway").chain(args.iter().copied()),
            )
            .unwrap()
            .gateway
        };
        assert_eq!(
            parse(&[]).publish_pacing().unwrap(),
            Duration::from_millis(5)
        );
        assert_eq!(
            parse(&["--publish-batch-ms", "0"])
                .publish_pacing()
                .unwrap(),
            Duration::ZERO
        );
        assert!(matches!(
            parse(&["--publish-batch-ms", "101"]).publish_pacing(),
            Err(ConfigError::PublishBatch(101))
        ));
    }

    #[test]
    fn parses_origins() {
        assert_eq!(settings().origins(), vec!["https://a.example", "http://b"]);
    }

    #[test]
    fn gateway_ids_are_checked() {
        assert_eq!(gateway_id(Some("gw-1")).unwrap(), "gw-1");
        assert!(gateway_id(Some("gw 1")).is_err());
        assert!(gateway_id(None).is_ok());
    }
}
