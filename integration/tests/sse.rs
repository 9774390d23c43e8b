//! The SSE transport (contract §1.5): the client-visible scenarios with every client on SSE,
//! its stream on one gateway and its commands posted to another (the scenarios that test
//! WebSocket framing itself are left out: raw text frames, 1009, pings), and the HTTP answers,
//! drain and crash of SSE sessions.

#[macro_use]
mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use roomcast_integration::client::{ConnectError, TestClient};
use roomcast_integration::sse::{self, Poster};
use roomcast_integration::token::Claims;
use roomcast_integration::{ClusterOptions, Flavor, System, run};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

client_visible_tests!(@tests Flavor::ClusterSse;
    connected_frame_first => ClusterOptions::default(),
    cross_gateway_delivery => ClusterOptions::default(),
    forbidden_and_not_joined => ClusterOptions::default(),
    ordering_under_concurrent_publishers => ClusterOptions::default(),
    late_join_during_traffic => ClusterOptions::default(),
    presence_and_member_events => ClusterOptions::default(),
    history_oldest_first => ClusterOptions::default(),
    history_window_bounds => ClusterOptions::default().history(3, 2),
    recovery_with_since => ClusterOptions::default(),
    refresh_token => ClusterOptions::default(),
    server_api => ClusterOptions::default(),
    server_api_disconnect => ClusterOptions::default(),
    server_api_subscribe => ClusterOptions::default(),
    idempotent_client_publish => ClusterOptions::default(),
    token_expiry_closes_4001 => ClusterOptions::default(),
    publish_rate_limit => ClusterOptions::default()
        .gateway_env("PUBLISH_RATE", 2)
        .gateway_env("PUBLISH_BURST", 5)
        .gateway_env("RATE_LIMIT_CLOSE_AFTER", 3),
    connection_limits => ClusterOptions::default()
        .gateway_env("MAX_ROOMS_PER_CONNECTION", 3)
        .gateway_env("MAX_CONNECTIONS_PER_USER", 2),
    write_delay_batches_broadcasts => ClusterOptions::default().gateway_env(
        "WRITE_DELAY_MS",
        roomcast_integration::scenarios::WRITE_DELAY.as_millis(),
    ),
    namespaces => ClusterOptions::default()
        .namespaces(roomcast_integration::scenarios::NAMESPACES),
    slow_consumer_closes_4008 => ClusterOptions::default()
        .gateway_env("OUTBOUND_QUEUE_LEN", 8)
        .gateway_env("PUBLISH_RATE", 100_000)
        .gateway_env("PUBLISH_BURST", 100_000),
);

/// Standalone: one gateway, so posts are handed over in-process rather than over the broker.
mod standalone {
    use super::*;

    client_visible_tests!(@tests Flavor::StandaloneSse;
        cross_gateway_delivery => ClusterOptions::default(),
        presence_and_member_events => ClusterOptions::default(),
        recovery_with_since => ClusterOptions::default(),
        ordering_under_concurrent_publishers => ClusterOptions::default(),
        server_api_subscribe => ClusterOptions::default(),
    );
}

fn status(result: Result<TestClient, ConnectError>) -> Option<u16> {
    result.err().and_then(|e| e.status())
}

/// Every refusal of the two endpoints, with its status.
async fn http_answers(sys: &mut System) -> Result<()> {
    let (gw0, gw1) = (sys.http_url(0), sys.http_url(1));
    let alice = sys.token("alice")?;
    let bob = sys.token("bob")?;
    let expired = sys.mint(&Claims::new("alice").expires_in(-60))?;
    ensure!(status(TestClient::connect_sse(&gw0, &gw1, "garbage").await) == Some(401));
    ensure!(status(TestClient::connect_sse(&gw0, &gw1, &expired).await) == Some(401));

    let mut a = TestClient::connect_sse(&gw0, &gw1, &alice).await?;
    let session = a.connected()["session"]
        .as_str()
        .context("session")?
        .to_owned();
    let poster = |base: &str, token: &str, session: &str| Poster {
        base: base.to_owned(),
        token: token.to_owned(),
        session: session.to_owned(),
    };
    let ping = r#"{"type":"ping","id":7}"#;
    let cases = [
        (
            "no token",
            sse::post(&gw1, None, Some(&session), ping).await?,
            401,
        ),
        (
            "bad token",
            poster(&gw1, "garbage", &session).post(ping).await?,
            401,
        ),
        (
            "another user",
            poster(&gw1, &bob, &session).post(ping).await?,
            403,
        ),
        (
            "no session header",
            sse::post(&gw1, Some(&alice), None, ping).await?,
            404,
        ),
        (
            "unknown session",
            poster(&gw1, &alice, "gw-0-99~x~0123").post(ping).await?,
            404,
        ),
        (
            "not json",
            poster(&gw1, &alice, &session).post("ping").await?,
            400,
        ),
        (
            "a number",
            poster(&gw1, &alice, &session).post("[1]").await?,
            400,
        ),
        (
            "too large",
            poster(&gw1, &alice, &session)
                .post(&format!(
                    r#"{{"type":"ping","pad":"{}"}}"#,
                    "x".repeat(70_000)
                ))
                .await?,
            413,
        ),
        (
            "empty batch",
            poster(&gw1, &alice, &session).post("[]").await?,
            202,
        ),
        (
            "more frames than may wait",
            poster(&gw0, &alice, &session)
                .post(&format!("[{}]", vec!["{}"; 1025].join(",")))
                .await?,
            429,
        ),
    ];
    for (what, got, want) in cases {
        ensure!(
            got == want,
            "{what}: POST /sse/send answered {got}, expected {want}"
        );
    }
    // A post's connection is closed after its answer (a browser would keep it alive otherwise,
    // and the handshake timeout would cut it later, perhaps mid-post).
    let authority = gw1.trim_start_matches("http://");
    let body = r#"{"type":"ping","id":5}"#;
    let kept_alive = format!(
        "POST /sse/send HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {alice}\r\nX-Roomcast-Session: {session}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw(authority, &kept_alive).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 202")
            && answer.to_ascii_lowercase().contains("connection: close"),
        "keep-alive post: {answer}"
    );
    a.expect_match("the pong of id 5", T, |f| {
        f["type"] == "pong" && f["id"] == 5
    })
    .await?;
    // Nothing refused reached the session; a batch runs in order, replies on the stream.
    let batch =
        r#"[{"type":"ping","id":1},{"type":"join","room":"s","id":2},{"type":"ping","id":3}]"#;
    ensure!(poster(&gw1, &alice, &session).post(batch).await? == 202);
    let frames = a.drain(Duration::from_millis(500)).await?;
    let ids: Vec<_> = frames
        .iter()
        .map(|f| (f["type"].clone(), f["id"].clone()))
        .collect();
    ensure!(
        ids == [
            (json!("pong"), json!(1)),
            (json!("joined"), json!(2)),
            (json!("pong"), json!(3))
        ],
        "the batch's replies, in order and nothing else: {frames:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_of_both_endpoints() {
    run(
        "sse_http_answers",
        Flavor::Cluster,
        ClusterOptions::default(),
        http_answers,
    )
    .await;
}

/// Browsers post from the page's origin: allowed origins get CORS headers, others 403.
async fn cors(sys: &mut System) -> Result<()> {
    let authority = sys.http_url(0).trim_start_matches("http://").to_owned();
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /sse/send HTTP/1.1\r\nHost: {authority}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, x-roomcast-session, content-type\r\nConnection: close\r\n\r\n"
        )
    };
    let allowed = raw(&authority, &preflight("http://allowed.example")).await?;
    let lower = allowed.to_ascii_lowercase();
    ensure!(allowed.starts_with("HTTP/1.1 204"), "preflight: {allowed}");
    for header in [
        "access-control-allow-origin: http://allowed.example",
        "access-control-allow-methods: post",
        "access-control-allow-headers: authorization, x-roomcast-session, content-type",
    ] {
        ensure!(
            lower.contains(header),
            "preflight lacks {header:?}: {allowed}"
        );
    }
    let refused = raw(&authority, &preflight("http://evil.example")).await?;
    ensure!(
        refused.starts_with("HTTP/1.1 403"),
        "foreign preflight: {refused}"
    );
    let token = sys.token("alice")?;
    let stream = format!(
        "GET /sse?token={token} HTTP/1.1\r\nHost: {authority}\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n"
    );
    let refused = raw(&authority, &stream).await?;
    ensure!(
        refused.starts_with("HTTP/1.1 403"),
        "foreign stream: {refused}"
    );
    Ok(())
}

async fn raw(authority: &str, request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(authority).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_allowed_origins_only() {
    let opts = ClusterOptions::default().allowed_origins("http://allowed.example");
    run("sse_cors", Flavor::Cluster, opts, cors).await;
}

/// A draining gateway ends its streams with a `disconnect` event (1001); a crashed one's
/// sessions answer 404 on every other gateway, and recovery works as over WebSocket.
async fn drain_and_crash(sys: &mut System) -> Result<()> {
    let (gw0, gw1, gw2) = (sys.http_url(0), sys.http_url(1), sys.http_url(2));
    let room = "lifecycle";
    let mut a = TestClient::connect_sse(&gw0, &gw1, &sys.token("alice")?).await?;
    let mut b = TestClient::connect_sse(&gw1, &gw0, &sys.token("bob")?).await?;
    let mut c = TestClient::connect_sse(&gw2, &gw0, &sys.token("carol")?).await?;
    for client in [&mut a, &mut b, &mut c] {
        client.join(room).await?;
    }
    let first = a.publish(room, json!("before")).await?;
    b.expect("message", T).await?;
    c.expect("message", T).await?;

    let cluster = sys.cluster().context("a cluster")?;
    cluster.gateway(1).process.terminate()?;
    let close = b.expect_close(Duration::from_secs(10)).await?;
    ensure!(close.code == Some(1001), "drain: {close}");

    let c_session = c.connected()["session"]
        .as_str()
        .context("session")?
        .to_owned();
    cluster.gateway(2).process.kill9()?;
    let missed = a.publish(room, json!("while away")).await?;
    let dead = Poster {
        base: gw0.clone(),
        token: sys.token("carol")?,
        session: c_session,
    };
    let answered = dead.post(r#"{"type":"ping"}"#).await?;
    ensure!(
        answered == 404,
        "a post for a dead gateway's session: {answered}"
    );

    let mut c2 = TestClient::connect_sse(&gw0, &gw0, &sys.token("carol")?).await?;
    let joined = c2
        .request_ok(
            json!({"type": "join", "room": room, "since": {"epoch": a_epoch(&mut a, room).await?, "offset": first}}),
            "joined",
        )
        .await?;
    ensure!(
        joined["recovered"] == true && joined["missed"][0]["offset"] == missed,
        "recovered over SSE: {joined}"
    );
    Ok(())
}

/// The room's epoch, from a `history` request.
async fn a_epoch(c: &mut TestClient, room: &str) -> Result<String> {
    let history = c
        .request_ok(
            json!({"type": "history", "room": room, "limit": 1}),
            "history",
        )
        .await?;
    history["epoch"]
        .as_str()
        .map(str::to_owned)
        .context("history without epoch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_crash_of_sse_gateways() {
    let opts = ClusterOptions {
        gateways: 3,
        ..Default::default()
    };
    run(
        "sse_drain_and_crash",
        Flavor::Cluster,
        opts,
        drain_and_crash,
    )
    .await;
}
