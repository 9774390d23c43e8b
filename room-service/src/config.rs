//! Settings, from flags or the environment, checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use roomcast_common::credential::{self, CredentialError};
use roomcast_common::tls::{self, TlsError};

use crate::service::ServiceOptions;
use roomcast_common::namespace::Namespaces;

use crate::store::HistoryLimits;

/// Largest accepted `MAX_DATA_BYTES`: a publish must fit in one gRPC message (4 MiB by
/// default) with room to spare.
pub const MAX_DATA_BYTES_LIMIT: usize = 3 * 1024 * 1024;
/// Largest accepted `HISTORY_SIZE`.
pub const HISTORY_SIZE_LIMIT: usize = 1_000_000;
/// Largest accepted `HISTORY_TTL_SECONDS` (30 days).
pub const HISTORY_TTL_LIMIT_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Debug, Clone, Parser)]
#[command(name = "room-service", version, about = "Roomcast room service (gRPC)")]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "ROOM_SERVICE_ADDR", default_value = "0.0.0.0:50051")]
    pub addr: SocketAddr,
    /// Listen address of /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9101")]
    pub metrics_addr: SocketAddr,
    /// The state store: one Redis (`redis://`, `rediss://`) or a Redis Cluster
    /// (`redis+cluster://host:port,host:port,…`, seed nodes).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The pub/sub leg; must be the Redis of REDIS_URL (the default).
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,
    /// PEM CA certificate(s) a `rediss://` server must chain to; default: the system's roots.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM certificate chain of the gRPC server; with GRPC_TLS_KEY_FILE, gRPC is served over
    /// TLS only.
    #[arg(long, env = "GRPC_TLS_CERT_FILE")]
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of GRPC_TLS_CERT_FILE.
    #[arg(long, env = "GRPC_TLS_KEY_FILE")]
    pub grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate issued by it (mTLS).
    #[arg(long, env = "GRPC_TLS_CLIENT_CA_FILE")]
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    /// Most messages kept per room.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,
    /// Age after which messages leave history; an idle room forgets its history after it.
    #[arg(long, env = "HISTORY_TTL_SECONDS", default_value_t = 3600)]
    pub history_ttl_seconds: u64,
    /// JSON file of per-namespace options (history bounds, presence, member events, client
    /// publish); unset: every room gets the global settings. A bad file stops the start.
    #[arg(long, env = "NAMESPACES_FILE")]
    pub namespaces_file: Option<PathBuf>,
    /// Key of the server API; unset refuses the server API.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest accepted message payload (`data`), in bytes.
    #[arg(long, env = "MAX_DATA_BYTES", default_value_t = 65536)]
    pub max_data_bytes: usize,
    /// Credential of internal calls (gateways); required: the service refuses to start
    /// without it.
    #[arg(long, env = "INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// How long an idempotency key of a publish is remembered.
    #[arg(long, env = "IDEMPOTENCY_WINDOW_SECONDS", default_value_t = 300)]
    pub idempotency_window_seconds: u64,
    /// How often members of gateways whose lease ran out are removed (and announced as left).
    #[arg(long, env = "PRESENCE_SWEEP_MS", default_value_t = 1000)]
    pub presence_sweep_ms: u64,
    /// Least time between two publish calls to Redis: publishes arriving meanwhile go together
    /// in the next call, which costs Redis much less per publish, and wait at most this long
    /// for it. 0: a call goes as soon as the previous one returned.
    #[arg(long, env = "PUBLISH_BATCH_MS", default_value_t = 2)]
    pub publish_batch_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("HISTORY_SIZE must be between 1 and {HISTORY_SIZE_LIMIT}, got {0}")]
    HistorySize(usize),
    #[error("HISTORY_TTL_SECONDS must be between 1 and {HISTORY_TTL_LIMIT_SECONDS}, got {0}")]
    HistoryTtl(u64),
    #[error("MAX_DATA_BYTES must be between 1 and {MAX_DATA_BYTES_LIMIT}, got {0}")]
    MaxDataBytes(usize),
    #[error("REDIS_URL {url:?} is not usable: {reason}")]
    RedisUrl { url: String, reason: String },
    #[error("BROKER_URL {0:?}: expected the Redis of REDIS_URL (redis://, rediss://) or nats://")]
    UnsupportedBroker(String),
    #[error(
        "BROKER_URL {broker:?} names another Redis than REDIS_URL {store:?}: room-service \
         publishes from the store's Redis (atomically with the offset), so the broker must be \
         that Redis; unset BROKER_URL"
    )]
    BrokerNotStore { broker: String, store: String },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(
        "IDEMPOTENCY_WINDOW_SECONDS must be between 1 and {HISTORY_TTL_LIMIT_SECONDS}, got {0}"
    )]
    IdempotencyWindow(u64),
}

impl Config {
    /// Checks every setting; the service refuses to start on the first error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=HISTORY_SIZE_LIMIT).contains(&self.history_size) {
            return Err(ConfigError::HistorySize(self.history_size));
        }
        if !(1..=HISTORY_TTL_LIMIT_SECONDS).contains(&self.history_ttl_seconds) {
            return Err(ConfigError::HistoryTtl(self.history_ttl_seconds));
        }
        if !(1..=MAX_DATA_BYTES_LIMIT).contains(&self.max_data_bytes) {
            return Err(ConfigError::MaxDataBytes(self.max_data_bytes));
        }
        if !(1..=HISTORY_TTL_LIMIT_SECONDS).contains(&self.idempotency_window_seconds) {
            return Err(ConfigError::IdempotencyWindow(
                self.idempotency_window_seconds,
            ));
        }
        credential::validate(
            "INTERNAL_TOKEN",
            self.internal_token.as_deref(),
            "gateways authenticate internal calls with it; give every process the same value",
        )?;
        if let Some(key) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
            credential::validate("API_KEY", Some(key), "")?;
        }
        let store = redis_target(&self.redis_url).map_err(|reason| ConfigError::RedisUrl {
            url: self.redis_url.clone(),
            reason,
        })?;
        if let Some(broker_url) = self
            .broker_url
            .as_ref()
            .filter(|u| !u.starts_with("nats://"))
        {
            let broker = redis_target(broker_url)
                .map_err(|_| ConfigError::UnsupportedBroker(broker_url.clone()))?;
            if broker != store {
                return Err(ConfigError::BrokerNotStore {
                    broker: broker_url.clone(),
                    store: self.redis_url.clone(),
                });
            }
        }
        Ok(())
    }

    /// The seed node URLs when `REDIS_URL` names a Redis Cluster.
    pub fn redis_cluster_nodes(&self) -> Option<Vec<String>> {
        roomcast_common::broker::cluster::node_urls(&self.redis_url)
    }

    /// The NATS URL when NATS is the broker.
    pub fn nats_url(&self) -> Option<&str> {
        self.broker_url
            .as_deref()
            .filter(|url| url.starts_with("nats://"))
    }

    /// The gRPC server's TLS (`None`: plain), from the PEM files, checked.
    pub fn grpc_tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
        tls::grpc_server(
            self.grpc_tls_cert_file.as_deref(),
            self.grpc_tls_key_file.as_deref(),
            self.grpc_tls_client_ca_file.as_deref(),
        )
    }

    /// The client of the store's Redis (`rediss://` with TLS).
    pub fn redis_client(&self) -> Result<redis::Client, TlsError> {
        tls::redis_client("REDIS_URL", &self.redis_url, self.redis_ca_file.as_deref())
    }

    /// The namespaces of `NAMESPACES_FILE`, or the default namespace alone.
    pub fn namespaces(&self) -> anyhow::Result<std::sync::Arc<Namespaces>> {
        Ok(std::sync::Arc::new(match &self.namespaces_file {
            Some(path) => Namespaces::from_file(path)?,
            None => Namespaces::default(),
        }))
    }

    /// See `publish_batch_ms`.
    pub fn publish_batch_interval(&self) -> Duration {
        Duration::from_millis(self.publish_batch_ms)
    }

    pub fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            size: self.history_size,
            ttl: Duration::from_secs(self.history_ttl_seconds),
        }
    }

    pub fn service_options(&self) -> ServiceOptions {
        ServiceOptions {
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            internal_token: self
                .internal_token
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
            max_data_bytes: self.max_data_bytes,
            idempotency_window: Duration::from_secs(self.idempotency_window_seconds),
        }
    }
}

/// The server and database a Redis URL points at, e.g. `"127.0.0.1:6379/0"`; for a Redis
/// Cluster, its seed nodes.
fn redis_target(url: &str) -> Result<String, String> {
    if let Some(nodes) = roomcast_common::broker::cluster::node_urls(url) {
        let mut nodes = nodes
            .iter()
            .map(|node| redis_target(node))
            .collect::<Result<Vec<_>, _>>()?;
        nodes.sort();
        return Ok(format!("cluster {}", nodes.join(",")));
    }
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let info = client.get_connection_info();
    Ok(format!("{}/{}", info.addr(), info.redis_settings().db()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123";

    fn parse(args: &[&str]) -> Config {
        let mut argv = vec!["room-service"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        // Flags win over the environment, so the defaults are checked with explicit values
        // that a stray environment cannot change.
        let config = parse(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--internal-token",
            TOKEN,
        ]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.history_limits().size, config.history_size);
    }

    #[test]
    fn bad_values_are_refused() {
        let base = [
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--internal-token",
            TOKEN,
        ];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args).validate()
        };
        assert_eq!(
            with(&["--history-size", "0"]),
            Err(ConfigError::HistorySize(0))
        );
        assert_eq!(
            with(&["--history-ttl-seconds", "0"]),
            Err(ConfigError::HistoryTtl(0))
        );
        assert_eq!(
            with(&["--max-data-bytes", "0"]),
            Err(ConfigError::MaxDataBytes(0))
        );
        assert_eq!(with(&["--broker-url", "nats://127.0.0.1:4222"]), Ok(()));
        assert!(matches!(
            with(&["--broker-url", "kafka://127.0.0.1:9092"]),
            Err(ConfigError::UnsupportedBroker(_))
        ));
        assert!(matches!(
            with(&["--broker-url", "redis://other-host:6379"]),
            Err(ConfigError::BrokerNotStore { .. })
        ));
        assert_eq!(with(&["--broker-url", "redis://127.0.0.1:6379/0"]), Ok(()));
        assert!(matches!(
            parse(&["--redis-url", "http://x", "--internal-token", TOKEN]).validate(),
            Err(ConfigError::RedisUrl { .. })
        ));
        assert!(matches!(
            with(&["--api-key", "short"]),
            Err(ConfigError::Credential(CredentialError::TooShort { .. }))
        ));
        assert!(matches!(
            with(&["--idempotency-window-seconds", "0"]),
            Err(ConfigError::IdempotencyWindow(0))
        ));
    }

    #[test]
    fn a_redis_cluster_url() {
        let cluster = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000";
        let config = parse(&["--redis-url", cluster, "--internal-token", TOKEN]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            config.redis_cluster_nodes(),
            Some(vec![
                "redis://10.0.0.1:7000".to_owned(),
                "redis://10.0.0.2:7000".to_owned()
            ])
        );
        let with_broker = |broker: &str| {
            parse(&[
                "--redis-url",
                cluster,
                "--internal-token",
                TOKEN,
                "--broker-url",
                broker,
            ])
            .validate()
        };
        // The same cluster, seeds in another order, is the store.
        assert_eq!(
            with_broker("redis+cluster://10.0.0.2:7000,10.0.0.1:7000"),
            Ok(())
        );
        assert_eq!(with_broker("nats://127.0.0.1:4222"), Ok(()));
        assert!(matches!(
            with_broker("redis://10.0.0.1:7000"),
            Err(ConfigError::BrokerNotStore { .. })
        ));
        assert!(matches!(
            parse(&["--redis-url", "redis+cluster://", "--internal-token", TOKEN]).validate(),
            Err(ConfigError::RedisUrl { .. })
        ));
        assert_eq!(
            parse(&["--redis-url", "redis://h:1", "--internal-token", TOKEN]).redis_cluster_nodes(),
            None
        );
    }

    #[test]
    fn the_internal_token_is_required() {
        let config = parse(&["--redis-url", "redis://127.0.0.1:6379"]);
        if std::env::var_os("INTERNAL_TOKEN").is_none() {
            assert!(matches!(
                config.validate(),
                Err(ConfigError::Credential(CredentialError::Missing { .. }))
            ));
        }
        let config = parse(&["--internal-token", "  "]);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Credential(CredentialError::Missing { .. }))
        ));
    }

    #[test]
    fn empty_api_key_disables_the_server_api() {
        let config = parse(&["--api-key", ""]);
        assert_eq!(config.service_options().api_key, None);
    }
}
