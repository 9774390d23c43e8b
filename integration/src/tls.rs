//! The test certificates of `testdata/tls` (see `testdata/README.md`) and TLS clients that
//! trust the test CA: for `rediss://`, `https://` readiness checks and `wss://` clients.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// The path of `testdata/tls/<name>`: `ca.pem`, `server.pem`, `server.key.pem`, `client.pem`,
/// `client.key.pem`, `other-ca.pem`, `other-client.pem`, `other-client.key.pem`.
pub fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

/// `file(name)` as a string, for environment variables.
pub fn path(name: &str) -> String {
    file(name).display().to_string()
}

/// A client configuration trusting only the CA in `testdata/tls/<ca>` (ALPN as given).
pub fn client_config(ca: &str, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(file(ca)).with_context(|| format!("reading {ca}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.context("parsing the test CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS connection to `host:port`, verifying `host` against the test CA.
pub async fn connect(host: &str, port: u16) -> Result<TlsStream<TcpStream>> {
    let config = client_config("ca.pem", &[b"http/1.1"])?;
    let tcp = TcpStream::connect((host, port)).await?;
    let name = ServerName::try_from(host.to_owned())?;
    Ok(TlsConnector::from(config).connect(name, tcp).await?)
}
