//! One connection's publishes are pipelined (the gateway keeps reading while they are stored)
//! and still stored in the order sent, answered in the order sent, and a command after them
//! sees them; and what they cost Redis, counted by command.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use roomcast_integration::{ClusterOptions, Flavor, Incoming, System, run};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

async fn pipelined_publishes_keep_their_order(sys: &mut System) -> Result<()> {
    let room = "pipe";
    let n = 2000u64;
    let mut publisher = sys.client(0, "host").await?;
    let mut member = sys.client(1, "member").await?;
    publisher.join(room).await?;
    member.join(room).await?;
    // Everything sent before reading anything back.
    let mut ids = Vec::new();
    for seq in 1..=n {
        ids.push(
            publisher
                .send_command(json!({"type": "publish", "room": room, "data": {"seq": seq}}))
                .await?,
        );
    }
    // A read sent right behind them is answered after them and sees all of them.
    let history_id = publisher
        .send_command(json!({"type": "history", "room": room, "since": n - 5, "limit": 10}))
        .await?;
    let mut acked = Vec::new();
    let history = loop {
        match publisher.recv(T).await? {
            Incoming::Json(v) if v["type"] == "published" => {
                let id = v["id"].as_u64().context("id")?;
                let offset = v["offset"].as_u64().context("offset")?;
                acked.push((id, offset));
            }
            Incoming::Json(v) if v["id"] == json!(history_id) => break v,
            Incoming::Json(v) if v["type"] == "error" => anyhow::bail!("error: {v}"),
            Incoming::Json(_) => {}
            other => anyhow::bail!("publisher: {other}"),
        }
    };
    ensure!(
        acked.len() as u64 == n,
        "{} acks before the history reply",
        acked.len()
    );
    let expected: Vec<(u64, u64)> = ids.iter().copied().zip(1..=n).collect();
    ensure!(
        acked == expected,
        "acks out of order or offsets not in send order: first differences {:?}",
        acked
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .take(3)
            .collect::<Vec<_>>()
    );
    ensure!(
        history["offset"] == json!(n) && history["messages"].as_array().map(Vec::len) == Some(5),
        "history after the publishes: {history}"
    );
    // The member gets them in send order.
    for seq in 1..=n {
        let m = member.expect("message", T).await?;
        ensure!(
            m["data"]["seq"] == json!(seq) && m["offset"] == json!(seq),
            "member got {m} where seq {seq} was due"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_keep_their_order_cluster() {
    let opts = ClusterOptions::default()
        .gateway_env("PUBLISH_RATE", 100_000)
        .gateway_env("PUBLISH_BURST", 100_000);
    run(
        "pipelined_publishes",
        Flavor::Cluster,
        opts,
        pipelined_publishes_keep_their_order,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_keep_their_order_standalone() {
    let opts = ClusterOptions::default()
        .gateway_env("PUBLISH_RATE", 100_000)
        .gateway_env("PUBLISH_BURST", 100_000);
    run(
        "pipelined_publishes",
        Flavor::Standalone,
        opts,
        pipelined_publishes_keep_their_order,
    )
    .await;
}

/// What one connection's publishes cost Redis, counted by command: each reads the room's epoch
/// once (`GETEX` when its room-service refreshes the room, a plain `GET` for a fifth of a TTL
/// after that), none looks up its retry record, which only a retry can find, and none writes
/// one: the history entry is the record.
async fn client_publishes_read_the_epoch_once_and_look_up_nothing(sys: &mut System) -> Result<()> {
    use roomcast_integration::redis_cluster::{cli, command_calls};
    let room = "cost";
    let n = 400u64;
    let port = sys.cluster().context("needs a cluster")?.redis().port();
    let mut publisher = sys.client(0, "host").await?;
    publisher.join(room).await?;
    cli(port, &["CONFIG", "RESETSTAT"])?;
    for seq in 1..=n {
        publisher
            .send_command(json!({"type": "publish", "room": room, "data": {"seq": seq}}))
            .await?;
    }
    let mut acked = 0;
    while acked < n {
        match publisher.recv(T).await? {
            Incoming::Json(v) if v["type"] == "published" => acked += 1,
            Incoming::Json(v) if v["type"] == "error" => anyhow::bail!("error: {v}"),
            Incoming::Json(_) => {}
            other => anyhow::bail!("publisher: {other}"),
        }
    }
    let stats = cli(port, &["INFO", "commandstats"])?;
    let calls = |command| command_calls(&stats, command);
    let (get, getex, incr, set) = (calls("get"), calls("getex"), calls("incr"), calls("set"));
    ensure!(
        incr == n && set == 0,
        "{n} publishes: {incr} INCR, {set} SET (retry records are history entries)\n{stats}"
    );
    ensure!(
        get + getex == n,
        "{n} publishes read the epoch {getex} + {get} times: a retry record was looked up\n{stats}"
    );
    // The first batch of each room-service refreshes; the rest are within a fifth of a TTL.
    ensure!(
        getex < n / 4,
        "{getex} of {n} publishes refreshed the room\n{stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publishes_read_the_epoch_once_and_look_up_nothing_cluster() {
    let opts = ClusterOptions::default()
        .gateway_env("PUBLISH_RATE", 100_000)
        .gateway_env("PUBLISH_BURST", 100_000);
    run(
        "publish_redis_calls",
        Flavor::Cluster,
        opts,
        client_publishes_read_the_epoch_once_and_look_up_nothing,
    )
    .await;
}
