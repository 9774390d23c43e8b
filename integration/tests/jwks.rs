//! auth-service with `JWKS_URL`, in a real cluster: the test serves the key set itself (an RSA
//! and an EC key, then a rotated set), and clients connect through a gateway with RS256 and
//! ES256 tokens chosen by `kid`. Also: start-up fails clearly when the key set cannot be had.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast_integration::logs::LogDir;
use roomcast_integration::process::{ChildProcess, Spawn, binary};
use roomcast_integration::token::now;
use roomcast_integration::{Cluster, ClusterOptions, TestClient};
use roomcast_proto::VerifyTokenRequest;
use roomcast_proto::auth_service_client::AuthServiceClient;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

const RSA_PRIVATE: &[u8] = include_bytes!("../../auth-service/testdata/rsa.key.pem");
const EC_PRIVATE: &[u8] = include_bytes!("../../auth-service/testdata/ec.key.pem");
const EC2_PRIVATE: &[u8] = include_bytes!("../../auth-service/testdata/ec2.key.pem");
const WAIT: Duration = Duration::from_secs(5);
/// A test CA, and a certificate it issued for `localhost` / 127.0.0.1 (see testdata/README.md).
const TEST_CA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/jwks-ca.pem");
const LOCALHOST_CERT: &[u8] = include_bytes!("../testdata/jwks-localhost.pem");
const LOCALHOST_KEY: &[u8] = include_bytes!("../testdata/jwks-localhost.key.pem");

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap()
}

fn ec() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE).unwrap()
}

fn ec2() -> EncodingKey {
    EncodingKey::from_ec_pem(EC2_PRIVATE).unwrap()
}

/// A JWKS document with the public half of each `(private key, algorithm, kid)`.
fn key_set(keys: &[(EncodingKey, Algorithm, &str)]) -> Vec<u8> {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(key, alg, kid)| {
            let mut jwk = Jwk::from_encoding_key(key, *alg).unwrap();
            jwk.common.key_id = Some((*kid).to_owned());
            serde_json::to_value(jwk).unwrap()
        })
        .collect();
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

/// A token for `sub`, valid for an hour, every room allowed.
fn token(sub: &str, alg: Algorithm, kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let claims = json!({"sub": sub, "exp": now() + 3600});
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// Serves one JWKS document (replaceable) at any path over HTTP/1.1, or HTTPS, and counts
/// requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<Vec<u8>>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: Vec<u8>) -> Self {
        Self::start_with(body, None).await
    }

    /// Over HTTPS with the `localhost` certificate; the URL names `localhost`.
    async fn start_tls(body: Vec<u8>) -> Self {
        let certs = CertificateDer::pem_slice_iter(LOCALHOST_CERT)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(LOCALHOST_KEY).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_with(body, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(body: Vec<u8>, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            None => format!("http://127.0.0.1:{port}/jwks.json"),
            Some(_) => format!("https://localhost:{port}/jwks.json"),
        };
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (body, hits, tls) = (b.clone(), h.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => answer(socket, &body, &hits).await,
                        Some(tls) => {
                            if let Ok(socket) = tls.accept(socket).await {
                                answer(socket, &body, &hits).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer {
            url,
            body,
            hits,
            task,
        }
    }

    fn serve(&self, body: Vec<u8>) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads one request head and answers with `body`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    body: &Mutex<Vec<u8>>,
    hits: &AtomicUsize,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let body = body.lock().unwrap().clone();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(&body).await;
    let _ = socket.shutdown().await;
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connecting with `token` is refused with HTTP 401 and a body containing `reason`.
async fn refused(ws: &str, token: &str, reason: &str) {
    match TestClient::connect(ws, token).await {
        Ok(client) => panic!("{} was let in", client.user()),
        Err(e) => {
            assert_eq!(e.status(), Some(401), "{e}");
            assert!(e.to_string().contains(reason), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_tokens_connect_and_keys_rotate_without_restart() {
    let server = JwksServer::start(key_set(&[
        (rsa(), Algorithm::RS256, "rsa-1"),
        (ec(), Algorithm::ES256, "ec-1"),
    ]))
    .await;
    let opts = ClusterOptions {
        gateways: 1,
        room_services: 1,
        ..ClusterOptions::default()
    }
    .auth_env("JWKS_URL", &server.url)
    .auth_env("JWKS_MIN_REFRESH_SECONDS", 1);
    let secret = opts.secret.clone();
    let cluster = Cluster::start(opts).await.unwrap();
    let ws = cluster.ws_url(0);
    assert_eq!(
        server.hits(),
        1,
        "auth-service loads the set once at start-up"
    );

    // An RS256 and an ES256 token, each picked by its kid.
    let rs = token("alice", Algorithm::RS256, "rsa-1", &rsa());
    let es = token("bob", Algorithm::ES256, "ec-1", &ec());
    let mut alice = TestClient::connect(&ws, &rs).await.unwrap();
    let mut bob = TestClient::connect(&ws, &es).await.unwrap();
    assert_eq!((alice.user(), bob.user()), ("alice", "bob"));
    alice.join("keys").await.unwrap();
    bob.join("keys").await.unwrap();
    alice.publish("keys", json!({"n": 1})).await.unwrap();
    let got = bob.expect("message", WAIT).await.unwrap();
    assert_eq!(
        (got["user"].as_str(), got["data"]["n"].as_u64()),
        (Some("alice"), Some(1))
    );
    bob.publish("keys", json!({"n": 2})).await.unwrap();
    let got = alice.expect("message", WAIT).await.unwrap();
    assert_eq!(
        (got["user"].as_str(), got["data"]["n"].as_u64()),
        (Some("bob"), Some(2))
    );

    // A kid the set does not hold, a token of the right key under the other key's kid, and the
    // harness's HS256 secret (auth-service has none with a JWKS).
    refused(
        &ws,
        &token("mallory", Algorithm::RS256, "rsa-9", &rsa()),
        "unknown token key",
    )
    .await;
    refused(
        &ws,
        &token("mallory", Algorithm::ES256, "rsa-1", &ec()),
        "algorithm",
    )
    .await;
    let hs = roomcast_integration::token::mint(&secret, &roomcast_integration::Claims::new("m"))
        .unwrap();
    refused(&ws, &hs, "").await;

    // A sub that cannot be a user id: control characters, or over 256 bytes.
    for sub in ["eve\nadmin".to_owned(), "nul\0".to_owned(), "x".repeat(257)] {
        let t = token(&sub, Algorithm::RS256, "rsa-1", &rsa());
        refused(&ws, &t, "token has an invalid sub claim").await;
    }

    // Rotation: the issuer now publishes only a new key, under a new kid.
    server.serve(key_set(&[(ec2(), Algorithm::ES256, "ec-2")]));
    // The unknown kid above fetched the set; the next fetch for an unknown kid may come one
    // JWKS_MIN_REFRESH_SECONDS later.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = server.hits();
    let mut carol = TestClient::connect(&ws, &token("carol", Algorithm::ES256, "ec-2", &ec2()))
        .await
        .unwrap();
    assert_eq!(carol.user(), "carol");
    assert_eq!(
        server.hits(),
        before + 1,
        "the unknown kid fetched the set once"
    );
    carol.join("keys").await.unwrap();

    // Connections opened with the old keys stay open and keep working in their rooms.
    alice.publish("keys", json!({"n": 3})).await.unwrap();
    for client in [&mut bob, &mut carol] {
        let got = client.expect("message", WAIT).await.unwrap();
        assert_eq!(got["data"]["n"].as_u64(), Some(3), "{}", client.name());
    }
    carol.publish("keys", json!({"n": 4})).await.unwrap();
    for client in [&mut alice, &mut bob] {
        let got = client.expect("message", WAIT).await.unwrap();
        assert_eq!(got["data"]["n"].as_u64(), Some(4), "{}", client.name());
    }
    bob.request_ok(json!({"type": "ping"}), "pong")
        .await
        .unwrap();
    // But a token whose key left the set no longer verifies: a new connection is refused, and
    // an open one cannot join further rooms (each join checks the token again).
    refused(
        &ws,
        &token("alice", Algorithm::RS256, "rsa-1", &rsa()),
        "unknown token key",
    )
    .await;
    let reply = alice
        .request(json!({"type": "join", "room": "other"}))
        .await
        .unwrap();
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    alice
        .request_ok(json!({"type": "ping"}), "pong")
        .await
        .unwrap();
    assert_eq!(alice.close_code(), None);

    // Nothing was restarted.
    assert!(cluster.processes().iter().all(|p| p.is_running()));
    cluster.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// auth-service alone with `JWKS_URL` (and free ports), which must fail to start; returns the
/// process once it exited.
async fn auth_service_alone(dir: &LogDir, name: &str, jwks_url: &str) -> ChildProcess {
    auth_service_alone_with(dir, name, jwks_url, &[]).await
}

async fn auth_service_alone_with(
    dir: &LogDir,
    name: &str,
    jwks_url: &str,
    env: &[(&str, &str)],
) -> ChildProcess {
    let mut spec = Spawn::new(name, binary("auth-service").unwrap(), dir.path())
        .env("JWKS_URL", jwks_url)
        .env("INTERNAL_TOKEN", roomcast_common::credential::generate())
        .env("AUTH_SERVICE_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        spec = spec.env(*k, v);
    }
    let process = ChildProcess::spawn(spec).unwrap();
    let started = Instant::now();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} is still running: {}", process.log_tail(20)));
    assert!(!status.success(), "{name}: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{name} took {:?}",
        started.elapsed()
    );
    process
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_service_refuses_to_start_without_its_key_set() {
    let dir = LogDir::for_test("jwks-start").unwrap();

    // Nothing listens on the port.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let process = auth_service_alone(&dir, "auth-closed-port", &url).await;
    let log = std::fs::read_to_string(process.log_path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with("Error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{log}"));
    assert!(
        line.starts_with(&format!("Error: JWKS_URL {url}: request failed")),
        "{line}"
    );
    assert!(
        line.contains("refused") && line.contains("after 3 tries"),
        "{line}"
    );

    // A server that answers something other than a key set.
    let server = JwksServer::start(b"<html>sign in</html>".to_vec()).await;
    let process = auth_service_alone(&dir, "auth-garbage", &server.url).await;
    let log = std::fs::read_to_string(process.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("Error: JWKS_URL") && l.contains("not a JSON Web Key Set")),
        "{log}"
    );
    assert_eq!(server.hits(), 3);

    // A key set without a key auth-service can use.
    let hmac_only = br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}"#;
    server.serve(hmac_only.to_vec());
    let process = auth_service_alone(&dir, "auth-no-usable-key", &server.url).await;
    let log = std::fs::read_to_string(process.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("Error: JWKS_URL") && l.contains("no usable key")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_url_is_verified_against_the_trust_store() {
    let server = JwksServer::start_tls(key_set(&[(ec(), Algorithm::ES256, "ec-1")])).await;

    // Trusting the test CA (rustls-native-certs reads SSL_CERT_FILE): the set loads over TLS.
    let opts = ClusterOptions {
        gateways: 0,
        room_services: 1,
        ..ClusterOptions::default()
    }
    .auth_env("JWKS_URL", &server.url)
    .auth_env("SSL_CERT_FILE", TEST_CA_FILE);
    let cluster = Cluster::start(opts).await.unwrap();
    assert_eq!(server.hits(), 1);
    let channel = tonic::transport::Endpoint::from_shared(cluster.auth_grpc())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let attach =
        roomcast_common::credential::AttachBearer::new(&cluster.options().internal_token).unwrap();
    let mut auth = AuthServiceClient::with_interceptor(channel, attach);
    let t = token("dora", Algorithm::ES256, "ec-1", &ec());
    let verified = auth
        .verify_token(VerifyTokenRequest { token: t })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verified.claims.unwrap().sub, "dora");
    cluster.shutdown(Duration::from_secs(5)).await.unwrap();

    // With the system's roots only, the test CA is not trusted: start-up fails and says why.
    let dir = LogDir::for_test("jwks-tls").unwrap();
    let before = server.hits();
    let process = auth_service_alone(&dir, "auth-untrusted", &server.url).await;
    let log = std::fs::read_to_string(process.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("Error: JWKS_URL https://localhost")
                && l.to_lowercase().contains("certificate")),
        "{log}"
    );
    assert_eq!(server.hits(), before, "no request got past the handshake");

    // No root certificates at all.
    let process = auth_service_alone_with(
        &dir,
        "auth-no-roots",
        &server.url,
        &[("SSL_CERT_FILE", "/nonexistent/ca.pem")],
    )
    .await;
    let log = std::fs::read_to_string(process.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("Error: JWKS_URL https://localhost")
                && l.contains("cannot set up TLS")),
        "{log}"
    );
}
