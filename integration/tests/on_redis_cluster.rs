//! The contract on a Redis Cluster: every client-visible scenario, and the cluster-only ones
//! that touch state across shards, with `REDIS_URL=redis+cluster://…` naming a local cluster of
//! 3 masters and 3 replicas (state and broker: room keys and room channels spread over the
//! shards, gateway leases on one of them); then a master fails over under publish load.
//!
//! Each test starts its own Redis Cluster (`redis-server --cluster-enabled yes` on free ports,
//! `redis-cli --cluster create`) and Roomcast processes, and kills them at the end. Build
//! first: `cargo build --workspace`.

#[macro_use]
mod common;

use roomcast_integration::chaos::{Fault, HISTORY_SIZE, LoadPlan};
use roomcast_integration::{ClusterOptions, Flavor, System, run, scenarios};

client_visible_tests!(Flavor::ClusterOnRedisCluster);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_service_failover() {
    run(
        "room_service_failover",
        Flavor::ClusterOnRedisCluster,
        ClusterOptions::default(),
        scenarios::cluster_room_service_failover,
    )
    .await;
}

/// The dead gateway's members are swept: its lease (on the `{gateways}` shard) runs out, its
/// room index (on its own shard) names rooms on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_crash() {
    run(
        "gateway_crash",
        Flavor::ClusterOnRedisCluster,
        ClusterOptions::default().heartbeat(1_000, 3_000),
        scenarios::cluster_gateway_crash,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_drain() {
    run(
        "gateway_drain",
        Flavor::ClusterOnRedisCluster,
        ClusterOptions::default(),
        scenarios::cluster_gateway_drain,
    )
    .await;
}

/// The chaos run of `tests/chaos.rs` (120 clients in 6 rooms over 3 gateways, ~150 msg/s from
/// the server API and two WebSocket publishers) while the master serving the first room fails
/// over to its replica (`CLUSTER FAILOVER`): the store's calls follow the slots to the new
/// master, the gateways' room channels on it are subscribed again and their gaps filled from
/// history. No client loses its connection, and every client holds every message of its rooms
/// exactly once, in offset order, as the room's history has them, with every acknowledged
/// publish in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_under_load() {
    let mut opts = ClusterOptions::default().history(HISTORY_SIZE, 3600);
    opts.gateways = 3;
    opts.room_services = 2;
    run(
        "master_failover_under_load",
        Flavor::ClusterOnRedisCluster,
        opts,
        async |sys: &mut System| {
            LoadPlan::standard(Fault::FailoverRedisMaster)
                .run(sys)
                .await
        },
    )
    .await;
}

/// The same run with the master SIGKILLed: its replica takes over about 2 s later
/// (`cluster-node-timeout` 1000 ms); publishes to its slots fail meanwhile and are retried, and
/// the same checks hold. Ignored: Redis replicates asynchronously, so a write acknowledged in
/// the last moment before the kill may not have reached the replica; the promoted replica then
/// hands its offset out again and clients that got the lost message drop the new one as a
/// duplicate. Rare at this load (it passed every manual run), but not excluded; run it with
/// `cargo test --workspace --test on_redis_cluster -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a SIGKILLed master may lose its last acknowledged writes (asynchronous replication)"]
async fn master_kill_under_load() {
    let mut opts = ClusterOptions::default().history(HISTORY_SIZE, 3600);
    opts.gateways = 3;
    opts.room_services = 2;
    run(
        "master_kill_under_load",
        Flavor::ClusterOnRedisCluster,
        opts,
        async |sys: &mut System| LoadPlan::standard(Fault::KillRedisMaster).run(sys).await,
    )
    .await;
}

/// The Redis store itself on the cluster: rooms spread over every shard, each room's offsets in
/// order through batches that mix rooms of every slot, the script's broadcasts on the room's
/// sharded channel (`rc:room:{<room>}`, in the room's slot) reaching a cluster subscriber, room
/// listing by `SCAN` on every master, and the dead-gateway sweep across shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_on_a_cluster() -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{Context, ensure};
    use roomcast_common::broker::cluster::ClusterSubscriber;
    use roomcast_common::broker::{BrokerEvent, Sink, Subscriber};
    use roomcast_common::envelope::{Envelope, decode, room_channel};
    use roomcast_integration::logs::LogDir;
    use roomcast_integration::redis_cluster::{RedisCluster, cli, command_calls};
    use roomcast_room::store::{
        ConnectionOpening, HistoryLimits, Joiner, Once, PublishItem, RedisStore, Store,
    };

    let logs = LogDir::for_test("redis-cluster-store")?;
    let cluster = RedisCluster::start(logs.path(), 3, 1).await?;
    let store = RedisStore::cluster(
        &cluster.url(),
        HistoryLimits {
            size: 100,
            ttl: Duration::from_secs(3600),
        },
    )?;
    let rooms: Vec<String> = (0..30).map(|i| format!("cl-{i}")).collect();

    let seen: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let into = seen.clone();
    let sink: Sink = Arc::new(move |event| {
        if let BrokerEvent::Message { channel, payload } = event
            && let Ok(Envelope::Message { offset, .. }) = decode(payload)
        {
            into.lock()
                .unwrap()
                .entry(channel.to_string())
                .or_default()
                .push(offset);
        }
    });
    let subscriber = ClusterSubscriber::connect(&cluster.url(), sink).await?;
    for room in &rooms {
        subscriber.subscribe(&room_channel(room)).await?;
    }

    // Ten rounds of one batch holding every room twice.
    let data: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    for round in 0..10 {
        let items: Vec<PublishItem<'_>> = rooms
            .iter()
            .flat_map(|room| [room, room])
            .zip(data.iter().cycle())
            .map(|(room, data_json)| PublishItem {
                room,
                user: "u",
                client_id: "c",
                data_json,
                once: None,
            })
            .collect();
        let published = store.publish_many(&items).await?;
        for (pair, room) in published.chunks(2).zip(&rooms) {
            let want = [2 * round + 1, 2 * round + 2];
            ensure!(
                [pair[0].offset, pair[1].offset] == want,
                "{room}, round {round}: {:?}",
                pair
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = seen.lock().unwrap().clone();
        let done = rooms
            .iter()
            .all(|room| got.get(&room_channel(room)).map(Vec::len) == Some(20));
        if done {
            for room in &rooms {
                ensure!(
                    got[&room_channel(room)] == (1..=20).collect::<Vec<u64>>(),
                    "{room}: broadcasts out of order: {:?}",
                    got[&room_channel(room)]
                );
            }
            break;
        }
        ensure!(Instant::now() < deadline, "broadcasts missing: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every master holds rooms.
    for master in cluster.masters()? {
        let keys: u64 = cli(master, &["DBSIZE"])?.trim().parse()?;
        ensure!(keys > 0, "master :{master} holds no key");
    }
    let listed = store.rooms("cl-", 1000).await?;
    ensure!(listed.len() == rooms.len(), "listed {} rooms", listed.len());
    ensure!(listed.iter().all(|r| r.offset == 20), "{listed:?}");
    let page = store.history("cl-7", Some(15), 0).await?;
    ensure!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>() == vec![16, 17, 18, 19, 20]);

    // A gateway with members in every room dies: its lease (on the {gateways} shard) runs
    // out and the sweep removes its members from rooms on every shard.
    store
        .gateway_heartbeat("gw-dead", 1, Duration::from_millis(300), "")
        .await?;
    store
        .gateway_heartbeat("gw-live", 1, Duration::from_secs(60), "")
        .await?;
    for room in &rooms {
        for (client_id, gateway_id) in [("c-dead", "gw-dead"), ("c-live", "gw-live")] {
            let joiner = Joiner {
                client_id,
                user: client_id,
                gateway_id,
            };
            store.join(room, joiner, None).await?;
        }
    }
    ensure!(
        store
            .connection_opened("c-dead", "c-dead", "gw-dead", 1)
            .await?
            .is_ok()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(store.sweep_dead_gateways().await? == 1);
    for room in &rooms {
        let members = store.presence(room).await?;
        ensure!(
            members.len() == 1 && members[0].client_id == "c-live",
            "{room}: {members:?}"
        );
    }
    let gateways = store.gateways().await?;
    ensure!(
        gateways
            .iter()
            .map(|g| g.gateway_id.as_str())
            .collect::<Vec<_>>()
            == ["gw-live"],
        "{gateways:?}"
    );
    // The dead gateway's connection no longer counts against its user's limit.
    ensure!(
        store
            .connection_opened("c-dead", "c-new", "gw-live", 1)
            .await?
            .is_ok(),
        "the dead gateway's connection still counts"
    );
    // A batch of connections whose users live on different shards: one script call per slot.
    let users: Vec<String> = (0..12).map(|i| format!("batch-user-{i}")).collect();
    let openings: Vec<ConnectionOpening<'_>> = users
        .iter()
        .flat_map(|user| {
            ["x", "y"].map(|client| ConnectionOpening {
                user,
                client_id: client,
                gateway: "gw-live",
                limit: 1,
            })
        })
        .collect();
    let counted: Vec<Result<u64, u64>> = store
        .connections_opened(&openings)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(
        counted == [Ok(1), Err(1)].repeat(users.len()),
        "batch counts: {counted:?}"
    );

    // The cluster client sends a command again after losing its connection (a failover), so
    // a script may run twice: even the gateway's first try looks its retry record up here.
    let master = cluster.master_of("rc:{cl-once}:seq")?;
    cli(master, &["CONFIG", "RESETSTAT"])?;
    let once = Once {
        key: "retry:c:1",
        window: Duration::from_secs(30),
        unused: true,
    };
    let item = |data_json| PublishItem {
        room: "cl-once",
        user: "u",
        client_id: "c",
        data_json,
        once: Some(once),
    };
    let first = store.publish_many(&[item("1")]).await?;
    let stats = cli(master, &["INFO", "commandstats"])?;
    ensure!(
        command_calls(&stats, "get") == 1,
        "the record was not looked up:\n{stats}"
    );
    let again = store.publish_many(&[item("1")]).await?;
    ensure!(
        again == first,
        "a script run twice stored twice: {first:?}, {again:?}"
    );
    store.ping().await.context("ping")?;
    Ok(())
}
