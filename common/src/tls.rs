//! TLS material from PEM files, for every binary. Files are read and checked once, at start-up,
//! so a missing file, a certificate without its key or a key that does not match its
//! certificate stops the binary with one clear line instead of failing the first connection.
//!
//! - [`grpc_server`]: a gRPC server's certificate, and the CA its clients' certificates must
//!   chain to (mTLS) — `GRPC_TLS_CERT_FILE`, `GRPC_TLS_KEY_FILE`, `GRPC_TLS_CLIENT_CA_FILE`.
//! - [`grpc_client`]: what a gRPC client trusts for `https://` endpoints and the certificate it
//!   presents — `GRPC_TLS_CA_FILE`, `GRPC_TLS_CLIENT_CERT_FILE`, `GRPC_TLS_CLIENT_KEY_FILE`.
//!   The server name to verify is set per endpoint by the caller.
//! - [`http_server`]: a rustls configuration for a listener serving HTTP/1.1 (the gateway's
//!   `wss://`) — `GATEWAY_TLS_CERT_FILE`, `GATEWAY_TLS_KEY_FILE`.
//! - [`redis_client`]: a Redis client for `redis://` or `rediss://`, trusting the system's
//!   roots or the CA of `REDIS_CA_FILE`.
//!
//! Crypto is rustls with the `ring` provider throughout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long a gRPC server waits for a client's TLS handshake.
pub const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{setting}: cannot read {}: {error}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{setting}: {} holds no PEM certificate", path.display())]
    NoCertificate {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting}: {} holds no PEM private key", path.display())]
    NoKey {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting}: {}: {reason}", path.display())]
    Invalid {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{setting} is set without {missing}: set both or neither")]
    Incomplete {
        setting: &'static str,
        missing: &'static str,
    },
    #[error("{setting} needs {needs}")]
    Requires {
        setting: &'static str,
        needs: &'static str,
    },
    #[error("{what}: {reason}")]
    Config { what: &'static str, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        setting,
        path: path.to_path_buf(),
        error,
    })
}

/// A PEM file of certificates: its text and the parsed certificates (at least one).
struct Certificates {
    pem: Vec<u8>,
    der: Vec<CertificateDer<'static>>,
}

fn certificates(setting: &'static str, path: &Path) -> Result<Certificates, TlsError> {
    let pem = read(setting, path)?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            setting,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if der.is_empty() {
        return Err(TlsError::NoCertificate {
            setting,
            path: path.to_path_buf(),
        });
    }
    Ok(Certificates { pem, der })
}

/// A CA bundle: certificates that each must be usable as a trust anchor.
fn trust(setting: &'static str, path: &Path) -> Result<Certificates, TlsError> {
    let certs = certificates(setting, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs.der {
        roots.add(cert.clone()).map_err(|e| TlsError::Invalid {
            setting,
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(certs)
}

/// A certificate chain and its private key, checked to belong together.
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The identity named by two settings (`(name, value)` each): both set, or neither (`None`).
pub fn identity(
    cert: (&'static str, Option<&Path>),
    key: (&'static str, Option<&Path>),
) -> Result<Option<Identity>, TlsError> {
    let (cert_setting, cert_path) = cert;
    let (key_setting, key_path) = key;
    let (cert_path, key_path) = match (cert_path, key_path) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(TlsError::Incomplete {
                setting: cert_setting,
                missing: key_setting,
            });
        }
        (None, Some(_)) => {
            return Err(TlsError::Incomplete {
                setting: key_setting,
                missing: cert_setting,
            });
        }
        (Some(c), Some(k)) => (c, k),
    };
    let certs = certificates(cert_setting, cert_path)?;
    let key_pem = read(key_setting, key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            setting: key_setting,
            path: key_path.to_path_buf(),
        },
        e => TlsError::Invalid {
            setting: key_setting,
            path: key_path.to_path_buf(),
            reason: e.to_string(),
        },
    })?;
    // Parses the key and checks that it is the certificate's.
    rustls::sign::CertifiedKey::from_der(certs.der.clone(), key.clone_key(), &provider()).map_err(
        |e| TlsError::Invalid {
            setting: key_setting,
            path: key_path.to_path_buf(),
            reason: format!("not the key of {cert_setting}: {e}"),
        },
    )?;
    Ok(Some(Identity {
        cert_pem: certs.pem,
        key_pem,
        chain: certs.der,
        key,
    }))
}

/// A gRPC server's TLS: `None` when neither certificate nor key is set (plain HTTP/2). With
/// `client_ca`, clients must present a certificate that chains to it (mTLS).
pub fn grpc_server(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
    let identity = identity(("GRPC_TLS_CERT_FILE", cert), ("GRPC_TLS_KEY_FILE", key))?;
    let Some(identity) = identity else {
        if client_ca.is_some() {
            return Err(TlsError::Requires {
                setting: "GRPC_TLS_CLIENT_CA_FILE",
                needs: "GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE (client certificates are \
                        checked in a TLS handshake)",
            });
        }
        return Ok(None);
    };
    let mut config = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            identity.cert_pem,
            identity.key_pem,
        ))
        .timeout(GRPC_HANDSHAKE_TIMEOUT);
    if let Some(path) = client_ca {
        let ca = trust("GRPC_TLS_CLIENT_CA_FILE", path)?;
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca.pem));
    }
    Ok(Some(config))
}

/// A gRPC client's TLS, used for `https://` endpoints: trusts `ca` (else the system's roots)
/// and presents the client certificate when both its files are set. The caller sets the
/// server name per endpoint ([`tonic::transport::ClientTlsConfig::domain_name`]).
pub fn grpc_client(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let mut config = tonic::transport::ClientTlsConfig::new();
    config = match ca {
        Some(path) => {
            let ca = trust("GRPC_TLS_CA_FILE", path)?;
            config.ca_certificate(tonic::transport::Certificate::from_pem(ca.pem))
        }
        None => config.with_native_roots(),
    };
    let identity = identity(
        ("GRPC_TLS_CLIENT_CERT_FILE", cert),
        ("GRPC_TLS_CLIENT_KEY_FILE", key),
    )?;
    if let Some(identity) = identity {
        config = config.identity(tonic::transport::Identity::from_pem(
            identity.cert_pem,
            identity.key_pem,
        ));
    }
    Ok(config)
}

/// A rustls server configuration for an HTTP/1.1 listener (ALPN `http/1.1`) from the
/// identity of two settings; `None` when neither is set.
pub fn http_server(
    cert: (&'static str, Option<&Path>),
    key: (&'static str, Option<&Path>),
) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let Some(identity) = identity(cert, key)? else {
        return Ok(None);
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            what: cert.0,
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config {
            what: cert.0,
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A Redis client for `url` (`url_setting` names it in errors). `rediss://` verifies the
/// server against the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured), or
/// only against the CA in `ca` (`REDIS_CA_FILE`), which needs a `rediss://` URL.
pub fn redis_client(
    url_setting: &'static str,
    url: &str,
    ca: Option<&Path>,
) -> Result<redis::Client, TlsError> {
    let invalid = |e: redis::RedisError| TlsError::Config {
        what: url_setting,
        reason: e.to_string(),
    };
    let Some(path) = ca else {
        return redis::Client::open(url).map_err(invalid);
    };
    if !url.starts_with("rediss://") {
        return Err(TlsError::Requires {
            setting: "REDIS_CA_FILE",
            needs: "a rediss:// URL",
        });
    }
    let ca = trust("REDIS_CA_FILE", path)?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem),
        },
    )
    .map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../integration/testdata/tls")
            .join(name)
    }

    #[test]
    fn a_certificate_and_its_key_load() {
        let cert = testdata("server.pem");
        let key = testdata("server.key.pem");
        let loaded = identity(("CERT", Some(&cert)), ("KEY", Some(&key))).unwrap();
        assert!(loaded.is_some());
        assert!(identity(("CERT", None), ("KEY", None)).unwrap().is_none());
        let server = grpc_server(Some(&cert), Some(&key), Some(&testdata("ca.pem"))).unwrap();
        assert!(server.is_some());
        assert!(http_server(("CERT", Some(&cert)), ("KEY", Some(&key))).is_ok());
        assert!(grpc_client(Some(&testdata("ca.pem")), None, None).is_ok());
    }

    #[test]
    fn misconfigurations_are_named() {
        let cert = testdata("server.pem");
        let key = testdata("server.key.pem");
        let missing = testdata("no-such-file.pem");
        let error = identity(("CERT", Some(&cert)), ("KEY", None)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "CERT is set without KEY: set both or neither"
        );
        let error = identity(("CERT", Some(&missing)), ("KEY", Some(&key))).unwrap_err();
        assert!(
            matches!(
                error,
                TlsError::Read {
                    setting: "CERT",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("no-such-file.pem"), "{error}");
        // A key file given as the certificate, and the other way round.
        let error = identity(("CERT", Some(&key)), ("KEY", Some(&key))).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        let error = identity(("CERT", Some(&cert)), ("KEY", Some(&cert))).unwrap_err();
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");
        // Another certificate's key.
        let other_key = testdata("client.key.pem");
        let error = identity(("CERT", Some(&cert)), ("KEY", Some(&other_key))).unwrap_err();
        assert!(error.to_string().contains("not the key of CERT"), "{error}");
        // Client certificates need a server certificate.
        let error = grpc_server(None, None, Some(&testdata("ca.pem"))).unwrap_err();
        assert!(matches!(error, TlsError::Requires { .. }), "{error}");
        let error = grpc_client(Some(&key), None, None).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    }

    #[test]
    fn redis_urls_with_and_without_tls() {
        let ca = testdata("ca.pem");
        assert!(redis_client("REDIS_URL", "redis://127.0.0.1:6379", None).is_ok());
        assert!(redis_client("REDIS_URL", "rediss://localhost:6380", None).is_ok());
        assert!(redis_client("REDIS_URL", "rediss://localhost:6380", Some(&ca)).is_ok());
        let error = redis_client("REDIS_URL", "redis://127.0.0.1:6379", Some(&ca)).unwrap_err();
        assert!(matches!(error, TlsError::Requires { .. }), "{error}");
        let error = redis_client("REDIS_URL", "nope://x", None).unwrap_err();
        assert!(error.to_string().starts_with("REDIS_URL: "), "{error}");
    }
}
