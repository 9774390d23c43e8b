//! TLS where a deployment needs it, against real processes: Redis over `rediss://` (store and
//! broker), gRPC over mTLS between the gateway and the services (and outsiders without the
//! right certificate refused), the gateway terminating `wss://` itself, and start-up refusing
//! TLS settings that cannot work. Certificates: `testdata/tls` (see `testdata/README.md`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use roomcast_integration::logs::LogDir;
use roomcast_integration::process::{ChildProcess, Spawn, binary};
use roomcast_integration::{ClusterOptions, Flavor, System, TestClient, run, tls};
use roomcast_proto as pb;
use roomcast_proto::server_api_client::ServerApiClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const T: Duration = Duration::from_secs(5);

fn small() -> ClusterOptions {
    ClusterOptions {
        gateways: 1,
        room_services: 1,
        ..ClusterOptions::default()
    }
}

/// Two clients (on gateways `a` and `b`) join a room; a publish reaches the other, in order,
/// and is acknowledged to the sender.
async fn publish_and_receive(sys: &System, a: usize, b: usize) -> Result<()> {
    let mut alice = sys.client(a, "alice").await?;
    let mut bob = sys.client(b, "bob").await?;
    alice.join("tls:room").await?;
    bob.join("tls:room").await?;
    for n in 1..=3 {
        let offset = alice.publish("tls:room", json!({ "n": n })).await?;
        ensure!(offset == n, "offset {offset}, expected {n}");
    }
    for n in 1..=3u64 {
        let message = bob.expect("message", T).await?;
        ensure!(
            message["offset"] == n && message["data"]["n"] == n && message["user"] == "alice",
            "unexpected message {message}"
        );
    }
    let history = bob
        .request_ok(json!({"type": "history", "room": "tls:room"}), "history")
        .await?;
    ensure!(
        history["messages"].as_array().map(Vec::len) == Some(3),
        "history {history}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_carries_the_store_and_the_broker() {
    let opts = ClusterOptions {
        gateways: 2,
        room_services: 1,
        ..ClusterOptions::default()
    }
    .redis_tls();
    run("rediss", Flavor::Cluster, opts, async |sys| {
        let cluster = sys.cluster().context("a cluster")?;
        let url = cluster.redis().url();
        ensure!(url.starts_with("rediss://"), "{url}");
        // The port speaks TLS only: a plain PING gets no PONG.
        let port = cluster.redis().port();
        let mut plain = TcpStream::connect(("127.0.0.1", port)).await?;
        plain.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(T, plain.read(&mut buf)).await;
        if let Ok(Ok(n)) = read {
            ensure!(!buf[..n].starts_with(b"+PONG"), "plain PING answered");
        }
        // Across gateways: room-service stores and publishes over rediss://, each gateway
        // subscribes over rediss://.
        publish_and_receive(sys, 0, 1).await
    })
    .await;
}

/// The server API's `Presence` on `url` with the API key, over `tls` (`None`: plain HTTP/2).
async fn presence(url: &str, tls: Option<ClientTlsConfig>, api_key: &str) -> Result<()> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?.connect_timeout(T);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = tokio::time::timeout(T, endpoint.connect())
        .await
        .context("connect timed out")??;
    let mut api = ServerApiClient::new(channel);
    let mut request = tonic::Request::new(pb::PresenceRequest {
        room: "tls:room".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {api_key}").parse()?);
    tokio::time::timeout(T, api.presence(request))
        .await
        .context("call timed out")??;
    Ok(())
}

fn pem(name: &str) -> Result<Vec<u8>> {
    std::fs::read(tls::file(name)).with_context(|| format!("reading {name}"))
}

/// Trusts `ca`, presents `client` (a `<name>.pem` / `<name>.key.pem` pair) if given.
fn client_tls(ca: &str, client: Option<&str>) -> Result<ClientTlsConfig> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(ca)?))
        .domain_name("localhost");
    if let Some(name) = client {
        config = config.identity(Identity::from_pem(
            pem(&format!("{name}.pem"))?,
            pem(&format!("{name}.key.pem"))?,
        ));
    }
    Ok(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mtls_and_outsiders_refused() {
    run(
        "grpc-mtls",
        Flavor::Cluster,
        small().grpc_mtls(),
        async |sys| {
            // The gateway reaches both services over mTLS: a token is verified (auth-service),
            // joins and publishes go through (room-service).
            let room_url = sys.server_api_url(0);
            ensure!(room_url.starts_with("https://localhost:"), "{room_url}");
            let mut alice = sys.client(0, "alice").await?;
            let mut bob = sys.client(0, "bob").await?;
            alice.join("tls:room").await?;
            bob.join("tls:room").await?;
            alice.publish("tls:room", json!("over mTLS")).await?;
            let message = bob.expect("message", T).await?;
            ensure!(message["data"] == "over mTLS", "{message}");

            let key = sys.options().api_key.clone();
            // With the CA's client certificate: answered (so the refusals below are about TLS).
            presence(&room_url, Some(client_tls("ca.pem", Some("client"))?), &key)
                .await
                .context("a client with a certificate of the CA")?;
            // No client certificate.
            let refused = presence(&room_url, Some(client_tls("ca.pem", None)?), &key).await;
            ensure!(
                refused.is_err(),
                "a client without a certificate was served"
            );
            // A certificate of another CA.
            let other = client_tls("ca.pem", Some("other-client"))?;
            let refused = presence(&room_url, Some(other), &key).await;
            ensure!(refused.is_err(), "a certificate of another CA was accepted");
            // A client that trusts another CA refuses the server's certificate.
            let distrust = client_tls("other-ca.pem", Some("client"))?;
            let refused = presence(&room_url, Some(distrust), &key).await;
            ensure!(refused.is_err(), "a client trusting another CA was served");
            // Plain HTTP/2 to the TLS port.
            let plain = room_url.replacen("https://", "http://", 1);
            ensure!(
                presence(&plain, None, &key).await.is_err(),
                "plain HTTP/2 was served"
            );
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_terminates_wss() {
    // Everything over TLS at once: wss:// clients, mTLS to the services, rediss://.
    let opts = small()
        .gateway_tls()
        .grpc_mtls()
        .redis_tls()
        .gateway_env("HANDSHAKE_TIMEOUT_MS", 1000);
    run("wss", Flavor::Cluster, opts, async |sys| {
        let url = sys.ws_url(0);
        ensure!(url.starts_with("wss://localhost:"), "{url}");
        publish_and_receive(sys, 0, 0).await?;

        // Frames larger than a TLS record, and a burst that the writer batches.
        let mut alice = sys.client(0, "alice2").await?;
        let mut bob = sys.client(0, "bob2").await?;
        alice.join("tls:big").await?;
        bob.join("tls:big").await?;
        let big = "x".repeat(50_000);
        alice.publish("tls:big", json!(big)).await?;
        let message = bob.expect("message", T).await?;
        ensure!(
            message["data"] == big.as_str(),
            "the large message arrived damaged"
        );
        let chunk = "y".repeat(2_000);
        for n in 0..100 {
            alice
                .send_command(json!({"type": "publish", "room": "tls:big", "data": [n, chunk]}))
                .await?;
        }
        for n in 0..100 {
            let message = bob.expect("message", T).await?;
            ensure!(
                message["data"][0] == n,
                "message {n} out of order: {}",
                message["offset"]
            );
        }

        // Plain ws:// to the TLS port is no WebSocket.
        let plain = url.replacen("wss://localhost", "ws://127.0.0.1", 1);
        let token = sys.token("mallory")?;
        if TestClient::connect(&plain, &token).await.is_ok() {
            bail!("a plain ws:// connection to the TLS port was upgraded");
        }

        // The handshake timeout covers the TLS handshake: a connection that never sends its
        // ClientHello is closed after about HANDSHAKE_TIMEOUT_MS.
        let port = url
            .trim_start_matches("wss://localhost:")
            .trim_end_matches("/ws");
        let mut idle = TcpStream::connect(format!("127.0.0.1:{port}")).await?;
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
        let elapsed = started.elapsed();
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => bail!("the gateway sent {n} bytes to a silent client"),
            Err(_) => bail!("a silent TLS client was kept for over 5 s"),
        }
        ensure!(
            elapsed >= Duration::from_millis(800),
            "closed after {elapsed:?}, before the handshake timeout"
        );
        Ok(())
    })
    .await;
}

/// Runs `binary` with `env` (free ports, an internal token), which must exit at start-up with
/// a log line containing `expected`.
async fn refuses_to_start(dir: &LogDir, name: &str, env: &[(&str, String)], expected: &str) {
    let program = match name {
        n if n.starts_with("gateway") => "gateway",
        n if n.starts_with("auth") => "auth-service",
        _ => "room-service",
    };
    let mut spec = Spawn::new(name, binary(program).unwrap(), dir.path())
        .env("INTERNAL_TOKEN", "0123456789abcdef0123")
        .env("JWT_SECRET", "a-test-secret-a-test-secret")
        .env("GATEWAY_ADDR", "127.0.0.1:0")
        .env("ROOM_SERVICE_ADDR", "127.0.0.1:0")
        .env("AUTH_SERVICE_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "127.0.0.1:0")
        // Nothing listens there: a binary that got past its checks would wait, not exit.
        .env("REDIS_URL", "redis://127.0.0.1:1");
    for (k, v) in env {
        spec = spec.env(*k, v);
    }
    let process = ChildProcess::spawn(spec).unwrap();
    let status = process
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} is still running: {}", process.log_tail(20)));
    assert!(!status.success(), "{name}: {status}");
    let log = process.log_tail(20);
    assert!(
        log.contains(expected),
        "{name}: expected {expected:?} in:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_settings_stop_the_binaries_at_start_up() {
    let dir = LogDir::for_test("tls-start").unwrap();
    let missing = tls::path("no-such-file.pem");
    refuses_to_start(
        &dir,
        "room-service-cert-without-key",
        &[("GRPC_TLS_CERT_FILE", tls::path("server.pem"))],
        "GRPC_TLS_CERT_FILE is set without GRPC_TLS_KEY_FILE",
    )
    .await;
    refuses_to_start(
        &dir,
        "room-service-client-ca-without-cert",
        &[("GRPC_TLS_CLIENT_CA_FILE", tls::path("ca.pem"))],
        "GRPC_TLS_CLIENT_CA_FILE needs GRPC_TLS_CERT_FILE",
    )
    .await;
    refuses_to_start(
        &dir,
        "auth-service-missing-file",
        &[
            ("GRPC_TLS_CERT_FILE", missing.clone()),
            ("GRPC_TLS_KEY_FILE", tls::path("server.key.pem")),
        ],
        "GRPC_TLS_CERT_FILE: cannot read",
    )
    .await;
    refuses_to_start(
        &dir,
        "gateway-key-of-another-certificate",
        &[
            ("GATEWAY_TLS_CERT_FILE", tls::path("server.pem")),
            ("GATEWAY_TLS_KEY_FILE", tls::path("client.key.pem")),
        ],
        "not the key of GATEWAY_TLS_CERT_FILE",
    )
    .await;
    refuses_to_start(
        &dir,
        "gateway-client-cert-without-key",
        &[
            ("ROOM_SERVICE_URL", "https://localhost:1".to_owned()),
            ("GRPC_TLS_CLIENT_CERT_FILE", tls::path("client.pem")),
        ],
        "GRPC_TLS_CLIENT_CERT_FILE is set without GRPC_TLS_CLIENT_KEY_FILE",
    )
    .await;
    refuses_to_start(
        &dir,
        "gateway-redis-ca-without-rediss",
        &[("REDIS_CA_FILE", tls::path("ca.pem"))],
        "REDIS_CA_FILE needs a rediss:// URL",
    )
    .await;
    refuses_to_start(
        &dir,
        "room-service-redis-ca-missing",
        &[
            ("REDIS_URL", "rediss://localhost:1".to_owned()),
            ("REDIS_CA_FILE", missing),
        ],
        "REDIS_CA_FILE: cannot read",
    )
    .await;
}
