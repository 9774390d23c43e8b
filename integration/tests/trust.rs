//! The trust boundary (contract §2) against a real cluster: an outsider who can reach the
//! services' ports, with no credential, a wrong one, or the API key, calls every internal RPC
//! and changes nothing; the server API opens only with the API key. Also: large recoveries
//! and histories (far above one gRPC message) arrive whole through a gateway.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use roomcast_integration::{ClusterOptions, Flavor, System, run};
use roomcast_proto as pb;
use roomcast_proto::auth_service_client::AuthServiceClient;
use roomcast_proto::room_service_client::RoomServiceClient;
use roomcast_proto::server_api_client::ServerApiClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(10);

fn with_bearer<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(credential) = credential
        && let Ok(value) = format!("Bearer {credential}").parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn channel(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_owned())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// What an outsider could change: presence, history, offsets and the gateways' records.
#[derive(Debug, PartialEq)]
struct Snapshot {
    members: Vec<(String, String)>,
    history: Vec<(u64, String, String)>,
    epoch: String,
    offset: u64,
    gateways: Vec<(String, u64)>,
}

async fn snapshot(api: &mut ServerApiClient<Channel>, key: &str, room: &str) -> Result<Snapshot> {
    let mut members: Vec<(String, String)> = api
        .presence(with_bearer(
            pb::PresenceRequest { room: room.into() },
            Some(key),
        ))
        .await?
        .into_inner()
        .members
        .into_iter()
        .map(|m| (m.user, m.client_id))
        .collect();
    members.sort();
    let history = api
        .history(with_bearer(
            pb::HistoryRequest {
                room: room.into(),
                since: None,
                limit: 0,
            },
            Some(key),
        ))
        .await?
        .into_inner();
    let info = api
        .info(with_bearer(pb::InfoRequest {}, Some(key)))
        .await?
        .into_inner();
    Ok(Snapshot {
        members,
        history: history
            .publications
            .into_iter()
            .map(|p| (p.offset, p.user, p.data_json))
            .collect(),
        epoch: history.epoch,
        offset: history.offset,
        gateways: info
            .gateways
            .into_iter()
            .map(|g| (g.gateway_id, g.connections))
            .collect(),
    })
}

/// Every internal RPC with `credential`; each must be refused with UNAUTHENTICATED.
async fn outsider_calls_everything(
    room_url: &str,
    auth_url: &str,
    credential: Option<&str>,
    room: &str,
    victim: &str,
    token: &str,
) -> Result<()> {
    let mut rooms = RoomServiceClient::new(channel(room_url).await?);
    let mut auth = AuthServiceClient::new(channel(auth_url).await?);
    let mut outcomes: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
    let publish = pb::PublishRequest {
        room: room.into(),
        client_id: victim.into(),
        user: "admin".into(),
        data_json: r#"{"evil":true}"#.into(),
        idempotency_key: String::new(),
        first_try: false,
    };
    outcomes.push((
        "Publish",
        rooms
            .publish(with_bearer(publish, credential))
            .await
            .map(drop),
    ));
    let join = pb::JoinRequest {
        room: room.into(),
        client_id: "fake-client".into(),
        user: "fake-user".into(),
        gateway_id: "gw-0".into(),
        since: None,
    };
    outcomes.push((
        "Join",
        rooms.join(with_bearer(join, credential)).await.map(drop),
    ));
    let leave = pb::LeaveRequest {
        room: room.into(),
        client_id: victim.into(),
        user: "alice".into(),
        gateway_id: "gw-0".into(),
    };
    outcomes.push((
        "Leave",
        rooms.leave(with_bearer(leave, credential)).await.map(drop),
    ));
    let closed = pb::ConnectionClosedRequest {
        client_id: victim.into(),
        user: "alice".into(),
        gateway_id: "gw-0".into(),
        rooms: vec![room.into()],
    };
    outcomes.push((
        "ConnectionClosed",
        rooms
            .connection_closed(with_bearer(closed, credential))
            .await
            .map(drop),
    ));
    let heartbeat = pb::GatewayHeartbeatRequest {
        gateway_id: "fake".into(),
        connections: 999_999,
        lease_ms: 60_000,
        version: "evil".into(),
    };
    outcomes.push((
        "GatewayHeartbeat",
        rooms
            .gateway_heartbeat(with_bearer(heartbeat, credential))
            .await
            .map(drop),
    ));
    outcomes.push((
        "Presence",
        rooms
            .presence(with_bearer(
                pb::PresenceRequest { room: room.into() },
                credential,
            ))
            .await
            .map(drop),
    ));
    let history = pb::HistoryRequest {
        room: room.into(),
        since: None,
        limit: 0,
    };
    outcomes.push((
        "History",
        rooms
            .history(with_bearer(history, credential))
            .await
            .map(drop),
    ));
    let verify = pb::VerifyTokenRequest {
        token: token.into(),
    };
    outcomes.push((
        "VerifyToken",
        auth.verify_token(with_bearer(verify, credential))
            .await
            .map(drop),
    ));
    let authorize = pb::AuthorizeRequest {
        token: token.into(),
        room: room.into(),
    };
    outcomes.push((
        "Authorize",
        auth.authorize(with_bearer(authorize, credential))
            .await
            .map(drop),
    ));
    for (rpc, outcome) in outcomes {
        match outcome {
            Ok(()) => anyhow::bail!("{rpc} with {credential:?} succeeded"),
            Err(status) => ensure!(
                status.code() == Code::Unauthenticated,
                "{rpc} with {credential:?}: expected UNAUTHENTICATED, got {status:?}"
            ),
        }
    }
    Ok(())
}

async fn outsiders_change_nothing(sys: &mut System) -> Result<()> {
    let room = "secure";
    let cluster = sys.cluster().context("needs a cluster")?;
    let key = cluster.options().api_key.clone();
    let room_url = cluster.room_service_grpc(0);
    let auth_url = cluster.auth_grpc();
    let mut alice = sys.client(0, "alice").await?;
    alice.join(room).await?;
    alice.publish(room, json!({"n": 1})).await?;
    alice.publish(room, json!({"n": 2})).await?;
    let mut bob = sys.client(0, "bob").await?;
    bob.join(room).await?;
    alice.drain(Duration::from_millis(300)).await?;
    let token = sys.mint(&roomcast_integration::Claims::new("alice"))?;

    let mut api = ServerApiClient::new(channel(&room_url).await?);
    let before = snapshot(&mut api, &key, room).await?;
    ensure!(
        before.members.len() == 2 && before.offset == 2,
        "{before:?}"
    );
    for credential in [
        None,
        Some("not-the-internal-token-0123"),
        Some(key.as_str()),
    ] {
        outsider_calls_everything(
            &room_url,
            &auth_url,
            credential,
            room,
            alice.client_id(),
            &token,
        )
        .await?;
    }
    let after = snapshot(&mut api, &key, room).await?;
    ensure!(before == after, "state changed:\n{before:?}\n{after:?}");
    bob.expect_none(Some("message"), Duration::from_millis(500))
        .await
        .context("an outsider's publish was delivered")?;
    bob.expect_none(Some("member_left"), Duration::from_millis(10))
        .await
        .context("an outsider evicted alice")?;
    // Alice's connection still works end to end.
    let offset = alice.publish(room, json!({"n": 3})).await?;
    ensure!(offset == 3, "offset {offset}");
    bob.expect("message", T).await?;

    // The server API opens with the API key only: not with the internal token.
    let internal = cluster.options().internal_token.clone();
    for credential in [None, Some(internal.as_str())] {
        let status = api
            .info(with_bearer(pb::InfoRequest {}, credential))
            .await
            .unwrap_err();
        ensure!(
            status.code() == Code::Unauthenticated,
            "Info with {credential:?}: {status:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_without_the_internal_token_change_nothing() {
    let opts = ClusterOptions {
        gateways: 1,
        room_services: 1,
        ..ClusterOptions::default()
    };
    run(
        "outsiders_change_nothing",
        Flavor::Cluster,
        opts,
        outsiders_change_nothing,
    )
    .await;
}

/// 1000 messages of 10 KB (10 MB, more than twice tonic's 4 MiB message limit) published on
/// one gateway; a client that saw none of them recovers all of them on the other gateway,
/// and `history` with `limit: 1000` answers all of them too.
async fn large_recovery(sys: &mut System) -> Result<()> {
    let room = "busy";
    let filler = "x".repeat(10 * 1024);
    let mut reader = sys.client(1, "reader").await?;
    let joined = reader.join(room).await?;
    let epoch = joined["epoch"].as_str().context("epoch")?.to_owned();
    reader.close().await?;

    let key = sys.options().api_key.clone();
    let mut api = ServerApiClient::connect(sys.server_api_url(0)).await?;
    for n in 1..=1000u64 {
        let request = pb::ServerPublishRequest {
            room: room.into(),
            data_json: json!({"n": n, "filler": filler}).to_string(),
            user: String::new(),
            idempotency_key: String::new(),
        };
        api.publish(with_bearer(request, Some(&key))).await?;
    }

    let mut back = sys.client(0, "reader").await?;
    let joined = back
        .request_ok(
            json!({"type": "join", "room": room, "since": {"epoch": epoch, "offset": 0}}),
            "joined",
        )
        .await?;
    ensure!(joined["recovered"] == json!(true), "not recovered");
    let missed = joined["missed"].as_array().context("missed")?;
    let offsets: Vec<u64> = missed.iter().filter_map(|m| m["offset"].as_u64()).collect();
    ensure!(
        offsets == (1..=1000).collect::<Vec<_>>(),
        "recovered {} messages, first {:?} last {:?}",
        offsets.len(),
        offsets.first(),
        offsets.last()
    );
    ensure!(missed[999]["data"]["n"] == json!(1000));

    let history = back
        .request_ok(
            json!({"type": "history", "room": room, "since": 0, "limit": 1000}),
            "history",
        )
        .await?;
    let messages: &Vec<Value> = history["messages"].as_array().context("messages")?;
    ensure!(messages.len() == 1000, "history gave {}", messages.len());
    ensure!(messages[0]["offset"] == json!(1) && messages[999]["offset"] == json!(1000));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_large_messages_recover_on_another_gateway() {
    let opts = ClusterOptions {
        gateways: 2,
        room_services: 1,
        ..ClusterOptions::default()
    }
    // The 10 MB answers are single frames to the client.
    .gateway_env("OUTBOUND_QUEUE_LEN", 1024);
    run("large_recovery", Flavor::Cluster, opts, large_recovery).await;
}

/// The per-user limit counts across the cluster and a killed gateway's connections stop
/// counting when its lease runs out (here 3 s), without anyone closing them.
async fn dead_gateway_connections_stop_counting(sys: &mut System) -> Result<()> {
    use roomcast_integration::{ConnectError, ConnectOptions, TestClient};
    let _held = sys.client(0, "ghost").await?;
    let opts = ConnectOptions::token(sys.token("ghost")?);
    match TestClient::connect_raw(&sys.ws_url(1), &opts).await {
        Err(ConnectError::Http { status: 429, .. }) => {}
        Ok(_) => anyhow::bail!("a second connection was accepted with a limit of 1"),
        Err(e) => anyhow::bail!("expected 429 on the other gateway, got {e}"),
    }
    let cluster = sys.cluster().context("needs a cluster")?;
    cluster.gateway(0).process.kill9()?;
    let killed = std::time::Instant::now();
    let deadline = killed + Duration::from_secs(15);
    loop {
        match TestClient::connect_raw(&sys.ws_url(1), &opts).await {
            Ok(_) => break,
            Err(ConnectError::Http { status: 429, .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "{e}: still refused {:?} after the gateway died",
                    killed.elapsed()
                ));
            }
        }
    }
    ensure!(
        killed.elapsed() >= Duration::from_secs(1),
        "accepted after {:?}: before the dead gateway's lease could run out",
        killed.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_spans_gateways_and_follows_leases() {
    let opts = ClusterOptions {
        gateways: 2,
        room_services: 1,
        ..ClusterOptions::default()
    }
    .heartbeat(1_000, 3_000)
    .gateway_env("MAX_CONNECTIONS_PER_USER", 1);
    run(
        "dead_gateway_connections_stop_counting",
        Flavor::Cluster,
        opts,
        dead_gateway_connections_stop_counting,
    )
    .await;
}

/// A room-service killed while publishes are in flight: the gateway fails each call over to
/// the other instance, so no client sees `internal`, and its own retries carry idempotency
/// keys, so nothing is stored (or delivered) twice.
async fn room_service_killed_mid_call(sys: &mut System) -> Result<()> {
    use roomcast_integration::Incoming;
    let room = "failover";
    let mut publisher = sys.client(0, "pub").await?;
    let mut member = sys.client(0, "member").await?;
    publisher.join(room).await?;
    member.join(room).await?;
    let started = std::time::Instant::now();
    let mut killed = false;
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let mut acked = 0u64;
    let mut unavailable = 0u64;
    while started.elapsed() < Duration::from_secs(4) || in_flight > 0 {
        if !killed && started.elapsed() > Duration::from_millis(1500) {
            sys.cluster()
                .context("needs a cluster")?
                .room_service(0)
                .process
                .kill9()?;
            killed = true;
        }
        while in_flight < 16 && started.elapsed() < Duration::from_secs(4) {
            seq += 1;
            publisher
                .send_command(json!({"type": "publish", "room": room, "data": {"seq": seq}}))
                .await?;
            in_flight += 1;
        }
        match publisher.recv(T).await? {
            Incoming::Json(reply) if reply["type"] == "published" => {
                acked += 1;
                in_flight -= 1;
            }
            Incoming::Json(reply) if reply["type"] == "error" => {
                ensure!(
                    reply["code"] == "unavailable",
                    "a publish failed with {reply} (a transport failure is `unavailable`)"
                );
                unavailable += 1;
                in_flight -= 1;
            }
            Incoming::Json(_) => {}
            other => anyhow::bail!("publisher: {other}"),
        }
    }
    ensure!(killed && acked > 0, "acked {acked}");
    // Every stored message is stored once: the member sees each seq at most once, in offsets
    // that increase by one.
    let frames = member.drain(Duration::from_secs(2)).await?;
    let mut seen = std::collections::BTreeSet::new();
    let mut last = 0u64;
    for m in frames.iter().filter(|m| m["type"] == "message") {
        let offset = m["offset"].as_u64().context("offset")?;
        ensure!(offset == last + 1, "offset {offset} after {last}");
        last = offset;
        let n = m["data"]["seq"].as_u64().context("seq")?;
        ensure!(seen.insert(n), "seq {n} was stored twice (offset {offset})");
    }
    ensure!(
        last >= acked,
        "{acked} acknowledged but the room holds {last}"
    );
    eprintln!("{seq} sent, {acked} acked, {unavailable} unavailable, {last} stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_service_killed_mid_call_loses_and_duplicates_nothing() {
    let opts = ClusterOptions {
        gateways: 1,
        room_services: 2,
        ..ClusterOptions::default()
    }
    .gateway_env("PUBLISH_RATE", 100_000)
    .gateway_env("PUBLISH_BURST", 100_000);
    run(
        "room_service_killed_mid_call",
        Flavor::Cluster,
        opts,
        room_service_killed_mid_call,
    )
    .await;
}

/// The cluster binaries refuse to start without `INTERNAL_TOKEN` (or with a short one), with
/// one line that names it, instead of serving an open internal API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_binaries_refuse_to_start_without_the_internal_token() {
    use roomcast_integration::logs::LogDir;
    use roomcast_integration::process::{ChildProcess, Spawn, binary};
    let dir = LogDir::for_test("no-internal-token").unwrap();
    for (name, token) in [
        ("gateway", None),
        ("room-service", None),
        ("auth-service", None),
        ("room-service", Some("short")),
    ] {
        let mut spec = Spawn::new(
            format!("{name}-{}", token.unwrap_or("none")),
            binary(name).unwrap(),
            dir.path(),
        )
        .env("GATEWAY_ADDR", "127.0.0.1:0")
        .env("ROOM_SERVICE_ADDR", "127.0.0.1:0")
        .env("AUTH_SERVICE_ADDR", "127.0.0.1:0")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", "a-secret-for-this-test-only")
        .env("REDIS_URL", "redis://127.0.0.1:1");
        if let Some(token) = token {
            spec = spec.env("INTERNAL_TOKEN", token);
        }
        let process = ChildProcess::spawn(spec).unwrap();
        let status = process
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{name} started without a usable INTERNAL_TOKEN"));
        assert!(!status.success(), "{name}: {status}");
        let log = std::fs::read_to_string(process.log_path()).unwrap();
        assert!(
            log.lines().any(|l| l.contains("INTERNAL_TOKEN")),
            "{name} did not say why:\n{log}"
        );
    }
}
