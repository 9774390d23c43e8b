//! A namespace without member events keeps filling a large room linear: 1000 members join
//! one room across two gateways and nobody receives a `member_joined`, where a room with the
//! events on delivers one per pair of members (n(n-1)/2: quadratic).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use roomcast_integration::{ClusterOptions, Flavor, System, TestClient};
use roomcast_proto::ServerPublishRequest;
use roomcast_proto::server_api_client::ServerApiClient;

const T: Duration = Duration::from_secs(10);

/// What filling a room cost its members.
struct Fill {
    members: usize,
    /// `member_joined` / `member_left` frames all members received for the room.
    member_events: usize,
    took: Duration,
}

/// Connects `n` clients (spread over the gateways), joins them to `room` one after the other,
/// then publishes a marker from the server API: on each gateway the room's channel carries it
/// after every member event of the joins, so a member has all its events once the marker is in.
async fn fill(sys: &System, room: &str, n: usize) -> Result<Fill> {
    let started = Instant::now();
    let mut clients: Vec<TestClient> = stream::iter(0..n)
        .map(|i| sys.client(i, format!("{room}-u{i}").leak()))
        .buffered(32)
        .try_collect()
        .await?;
    for c in &mut clients {
        let joined = c.join(room).await?;
        ensure!(joined["room"] == room, "join answered {joined}");
    }
    let took = started.elapsed();
    let key = sys.options().api_key.clone();
    let mut api = ServerApiClient::connect(sys.server_api_url(0)).await?;
    let mut request = tonic::Request::new(ServerPublishRequest {
        room: room.into(),
        data_json: r#""marker""#.into(),
        user: String::new(),
        idempotency_key: String::new(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    api.publish(request).await.context("marker publish")?;
    let mut member_events = 0;
    for c in &mut clients {
        c.expect("message", T)
            .await
            .with_context(|| format!("{}: marker", c.name()))?;
        member_events += c
            .drain(Duration::ZERO)
            .await?
            .iter()
            .filter(|f| {
                f["room"] == room && (f["type"] == "member_joined" || f["type"] == "member_left")
            })
            .count();
    }
    Ok(Fill {
        members: n,
        member_events,
        took,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_without_member_events_fills_linearly() {
    let opts = ClusterOptions::default()
        .namespaces(r#"{"namespaces": {"crowd": {"member_events": false}}}"#);
    roomcast_integration::run(
        "a_room_without_member_events_fills_linearly",
        Flavor::Cluster,
        opts,
        async |sys: &mut System| {
            // The default namespace announces every join to every member already there.
            let open = fill(sys, "open", 100).await?;
            let pairs = open.members * (open.members - 1) / 2;
            ensure!(
                (pairs..=pairs + open.members).contains(&open.member_events),
                "100 members with events on: {} member events, expected about {pairs}",
                open.member_events
            );
            // Without member events: none, for 100 or 1000 members.
            let small = fill(sys, "crowd:small", 100).await?;
            let large = fill(sys, "crowd:large", 1000).await?;
            for f in [&small, &large] {
                ensure!(
                    f.member_events == 0,
                    "{} members in a namespace without member events received {} member events",
                    f.members,
                    f.member_events
                );
            }
            for (name, f) in [("open", &open), ("crowd", &small), ("crowd", &large)] {
                println!(
                    "{name}: {} members, {} member events ({:.2} per member), set-up {:?} ({:?} per member)",
                    f.members,
                    f.member_events,
                    f.member_events as f64 / f.members as f64,
                    f.took,
                    f.took / u32::try_from(f.members).unwrap_or(u32::MAX),
                );
            }
            Ok(())
        },
    )
    .await;
}
