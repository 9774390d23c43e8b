//! The broker on a real local Redis Cluster (3 masters + 3 replicas): sharded pub/sub keeps each
//! room's order, spreads rooms over the shards, reaches gateways on the control channel from
//! any node, and follows a master's failover (reported as a lost link, subscriptions restored
//! on the promoted replica).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use roomcast_common::broker::cluster::{ClusterPublisher, ClusterSubscriber};
use roomcast_common::broker::{BrokerEvent, Publisher, Sink, Subscriber};
use roomcast_common::envelope::{CONTROL_CHANNEL, gateway_channel, room_channel};
use roomcast_integration::logs::LogDir;
use roomcast_integration::redis_cluster::RedisCluster;

#[derive(Default)]
struct Seen {
    messages: Vec<(String, Bytes)>,
    disconnections: usize,
}

fn collector() -> (Sink, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let into = seen.clone();
    let sink: Sink = Arc::new(move |event| {
        let mut seen = into.lock().unwrap();
        match event {
            BrokerEvent::Message { channel, payload } => {
                seen.messages.push((channel.to_string(), payload))
            }
            BrokerEvent::Disconnected => seen.disconnections += 1,
        }
    });
    (sink, seen)
}

async fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Payloads per channel, in arrival order.
fn by_channel(seen: &Mutex<Seen>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (channel, payload) in &seen.lock().unwrap().messages {
        out.entry(channel.clone())
            .or_default()
            .push(String::from_utf8_lossy(payload).into_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_keeps_room_order_and_spreads_rooms_over_shards() -> Result<()> {
    let logs = LogDir::for_test("redis-cluster-pubsub")?;
    let cluster = RedisCluster::start(logs.path(), 3, 1).await?;
    let (sink, seen) = collector();
    let subscriber = ClusterSubscriber::connect(&cluster.url(), sink).await?;
    let publisher = ClusterPublisher::connect(&cluster.url()).await?;
    let rooms: Vec<String> = (0..30)
        .map(|i| room_channel(&format!("room-{i}")))
        .collect();
    let mut shards = BTreeSet::new();
    for room in &rooms {
        subscriber.subscribe(room).await?;
        shards.insert(cluster.master_of(room)?);
    }
    ensure!(
        shards.len() == 3,
        "30 rooms should cover every shard: {shards:?}"
    );
    subscriber.subscribe(CONTROL_CHANNEL).await?;
    let own = gateway_channel("gw-a");
    subscriber.subscribe(&own).await?;

    for n in 0..50 {
        for room in &rooms {
            let receivers = publisher.publish(room, Bytes::from(n.to_string())).await?;
            ensure!(
                receivers == Some(1),
                "{room}: SPUBLISH reached {receivers:?}"
            );
        }
    }
    let nobody = publisher
        .publish(&room_channel("nobody-here"), Bytes::from_static(b"x"))
        .await?;
    ensure!(nobody == Some(0), "a room nobody subscribed: {nobody:?}");
    ensure!(
        publisher.publish(&own, Bytes::from_static(b"post")).await? == Some(1),
        "a gateway's own channel counts its subscriber"
    );
    publisher
        .publish(CONTROL_CHANNEL, Bytes::from_static(b"ctl"))
        .await?;
    let want = 30 * 50 + 2;
    wait_for("every payload", Duration::from_secs(10), || {
        seen.lock().unwrap().messages.len() >= want
    })
    .await?;
    let got = by_channel(&seen);
    let expected: Vec<String> = (0..50).map(|n| n.to_string()).collect();
    for room in &rooms {
        ensure!(
            got.get(room) == Some(&expected),
            "{room}: {:?}",
            got.get(room)
        );
    }
    ensure!(got.get(CONTROL_CHANNEL) == Some(&vec!["ctl".to_owned()]));
    ensure!(got.get(&own) == Some(&vec!["post".to_owned()]));

    subscriber.unsubscribe(&rooms[0]).await?;
    let after = publisher
        .publish(&rooms[0], Bytes::from_static(b"late"))
        .await?;
    ensure!(after == Some(0), "unsubscribed, yet it reached {after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_is_reported_and_its_rooms_follow_the_promoted_replica() -> Result<()> {
    let logs = LogDir::for_test("redis-cluster-failover")?;
    let cluster = RedisCluster::start(logs.path(), 3, 1).await?;
    let (sink, seen) = collector();
    let subscriber = ClusterSubscriber::connect(&cluster.url(), sink).await?;
    let publisher = ClusterPublisher::connect(&cluster.url()).await?;
    let rooms: Vec<String> = (0..12).map(|i| room_channel(&format!("f-{i}"))).collect();
    for room in &rooms {
        subscriber.subscribe(room).await?;
    }
    let victim = cluster.master_of(&rooms[0])?;
    let on_victim: Vec<&String> = rooms
        .iter()
        .filter(|r| cluster.master_of(r).ok() == Some(victim))
        .collect();
    for room in &rooms {
        publisher
            .publish(room, Bytes::from_static(b"before"))
            .await?;
    }
    wait_for("the first round", Duration::from_secs(5), || {
        seen.lock().unwrap().messages.len() >= rooms.len()
    })
    .await?;

    cluster.kill_master(victim).context("failing over")?;
    wait_for("the lost link reported", Duration::from_secs(10), || {
        seen.lock().unwrap().disconnections > 0
    })
    .await?;
    // Once a ping succeeds the subscriptions are back (the gateway's rule, and its repair
    // starts then): publish again until the victim's rooms get through, bounded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last;
        let pinged = subscriber.ping().await;
        if pinged.is_ok() {
            let mut all = true;
            let mut results = Vec::new();
            for room in &on_victim {
                let published = publisher.publish(room, Bytes::from_static(b"after")).await;
                all &= matches!(published, Ok(Some(1)));
                results.push(format!("{published:?}"));
            }
            if all {
                break;
            }
            last = format!("publishes: {results:?}");
        } else {
            last = format!("ping: {pinged:?}");
        }
        if Instant::now() >= deadline {
            bail!("the victim's rooms were not subscribed again on the promoted replica ({last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for(
        "the victim's rooms after the failover",
        Duration::from_secs(5),
        || {
            let got = by_channel(&seen);
            on_victim.iter().all(|room| {
                got.get(*room)
                    .is_some_and(|p| p.last().map(String::as_str) == Some("after"))
            })
        },
    )
    .await?;
    // Rooms on the other shards never stopped.
    for room in rooms.iter().filter(|r| !on_victim.contains(r)) {
        ensure!(publisher.publish(room, Bytes::from_static(b"x")).await? == Some(1));
    }
    Ok(())
}
