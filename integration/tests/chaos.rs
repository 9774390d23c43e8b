//! Failures under load, with many clients: a gateway killed (SIGKILL) or drained (SIGTERM), a
//! room-service killed and Redis restarted while 120 clients sit in six rooms over three
//! gateways and a steady publish load runs; then every client must hold every message of its
//! rooms exactly once, in offset order, compared with the room's full history and with the
//! publishes the test saw acknowledged. Plus a slow consumer with the gateway's memory measured,
//! and presence cleanup after a gateway crash with many members.
//!
//! The shared machinery (client tasks that reconnect with backoff and re-join with `since`,
//! publishers, the final verification) is the `load` module below. Each test starts its own
//! system and kills it at the end, pass or fail. Build first: `cargo build --workspace`.
//! Numbers are printed with `eprintln!` (`-- --nocapture` shows them for passing tests).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use roomcast_integration::{ClusterOptions, Flavor, Incoming, System, TestClient, run};
use serde_json::json;

use roomcast_integration::chaos::{self as load, Fault, HISTORY_SIZE, LoadPlan};

fn chaos_options() -> ClusterOptions {
    let mut opts = ClusterOptions::default().history(HISTORY_SIZE, 3600);
    opts.gateways = 3;
    opts.room_services = 2;
    opts
}

// ---------------------------------------------------------------------------------------------
// The four runs under load
//
// Each: 3 gateways, 2 room-services, HISTORY_SIZE 10000; 120 clients (40 per gateway) in 6 rooms,
// each client in 1 or 2; ~150 msg/s for 7 s from the server API (both room-services) and from
// two WebSocket publishers on gateways the fault spares; the fault 2.5 s in. At the end every
// client's log of every room is compared with the room's full history (ServerHistory): the
// offsets after its join offset, each once, in order, with the right data; `joined.missed` then
// live messages after a re-join. Every acknowledged publish is in history at its offset, and the
// history holds nothing but attempted publishes, each once.

/// SIGKILL gateway 2: its 36 clients see the connection end, reconnect with backoff to gateways
/// 0 and 1, re-join with `since` and get `recovered: true`; nobody else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_gateway_kill() {
    run(
        "chaos_gateway_kill",
        Flavor::Cluster,
        chaos_options(),
        async |sys: &mut System| LoadPlan::standard(Fault::KillGateway(2)).run(sys).await,
    )
    .await;
}

/// SIGTERM gateway 2: its clients are closed with 1001 over the drain window, recover elsewhere
/// with `recovered: true`, and the gateway exits with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_gateway_drain() {
    run(
        "chaos_gateway_drain",
        Flavor::Cluster,
        chaos_options(),
        async |sys: &mut System| LoadPlan::standard(Fault::DrainGateway(2)).run(sys).await,
    )
    .await;
}

/// SIGKILL room-service 0: no connection is lost; failed publishes are retried by the test
/// (only acknowledged ones are counted), and nobody misses anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_room_service_kill() {
    // Room-service 0 is first in every gateway's endpoint list.
    run(
        "chaos_room_service_kill",
        Flavor::Cluster,
        chaos_options(),
        async |sys: &mut System| LoadPlan::standard(Fault::KillRoomService(0)).run(sys).await,
    )
    .await;
}

/// SIGKILL redis-server for 3 s, then an empty one on the same port, publishing through the
/// server API all along: publishes fail fast while it is down, every gateway's and
/// room-service's /readyz goes 503 and comes back to 200, no Roomcast process restarts, every
/// room gets a new epoch, a re-join with an old-epoch `since` says `recovered: false` and then
/// gets the next message, and each client holds the old epoch's messages up to the last
/// acknowledged one, then the new epoch's from offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_under_load() {
    run(
        "redis_restart_under_load",
        Flavor::Cluster,
        chaos_options(),
        async |sys: &mut System| LoadPlan::standard(Fault::RestartRedis).run(sys).await,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Slow consumer: 4008 and the gateway's memory

/// Frames a gateway queues per connection before 4008 (its default, set explicitly so the bound
/// below follows it).
const SLOW_QUEUE_LEN: u64 = 1024;
/// 5000 messages of 10 KiB: ~49 MiB, well above the memory bound below, so a gateway that kept
/// queueing for the stalled client could not stay under it.
const SLOW_MESSAGES: u64 = 5000;
const SLOW_DATA_BYTES: usize = 10 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_memory_bounded() {
    let opts = ClusterOptions::default().gateway_env("OUTBOUND_QUEUE_LEN", SLOW_QUEUE_LEN);
    run(
        "slow_consumer_memory_bounded",
        Flavor::Cluster,
        opts,
        slow_consumer_scenario,
    )
    .await;
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad line {line:?}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// One member that stops reading while 5000 messages of 10 KiB (49 MiB) go into its room, with
/// three members on the same gateway that keep reading. The stalled one must be closed with
/// 4008, the others must get everything, and the gateway's resident memory must stay within
/// what its bounded queue explains.
async fn slow_consumer_scenario(sys: &mut System) -> Result<()> {
    let room = "busy";
    let cluster = sys.cluster().context("needs a cluster")?;
    let pid = cluster.gateway(0).process.pid();
    let key = sys.options().api_key.clone();
    let mut api = load::ApiPublisher::new(
        "bulk",
        &[sys.server_api_url(0), sys.server_api_url(1)],
        &key,
    )?;

    let mut slow = sys.client(0, "sloth").await?;
    let joined = slow.join(room).await?;
    let base = joined["offset"].as_u64().context("joined.offset")?;
    let sloth = slow.client_id().to_owned();
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut r = sys.client(0, &format!("reader-{i}")).await?;
        r.join(room).await?;
        readers.push(r);
    }
    // Let the joins' events settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, hwm_before) = memory_kib(pid)?;

    slow.stop_answering_pings();

    let (left_tx, left_rx) = tokio::sync::watch::channel(false);
    let mut reader_tasks = Vec::new();
    for (i, mut r) in readers.into_iter().enumerate() {
        let left_tx = left_tx.clone();
        let sloth = sloth.clone();
        reader_tasks.push(tokio::spawn(async move {
            // Offsets must be base+1 ..= base+SLOW_MESSAGES, in order.
            let mut next = base + 1;
            let deadline = Instant::now() + Duration::from_secs(25);
            while next <= base + SLOW_MESSAGES {
                let left = deadline.saturating_duration_since(Instant::now());
                match r.recv(left).await {
                    Ok(Incoming::Json(v)) if v["type"] == "message" => {
                        let offset = v["offset"].as_u64().unwrap_or(0);
                        if offset != next {
                            bail!("reader-{i}: expected offset {next}, got {offset}");
                        }
                        next += 1;
                    }
                    Ok(Incoming::Json(v))
                        if v["type"] == "member_left" && v["clientId"] == sloth.as_str() =>
                    {
                        left_tx.send_replace(true);
                    }
                    Ok(Incoming::Json(_)) => {}
                    Ok(other) => bail!("reader-{i}: {other} after offset {}", next - 1),
                    Err(e) => bail!("reader-{i}: {e:#} after offset {}", next - 1),
                }
            }
            Ok(next - 1 - base)
        }));
    }
    drop(left_tx);

    // Sample the gateway's memory while the load runs.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        let mut samples = 0u32;
        loop {
            if let Ok((rss, _)) = memory_kib(pid) {
                peak = peak.max(rss);
                samples += 1;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop_rx.changed() => break,
            }
        }
        (peak, samples)
    });

    // The load: four concurrent server-API publishers (no per-connection rate limit there).
    let started = Instant::now();
    let data = "x".repeat(SLOW_DATA_BYTES);
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let mut api = api.clone_named(&format!("bulk-{p}"));
        let data = data.clone();
        publishers.push(tokio::spawn(async move {
            let mut acked = 0u64;
            for n in 0..SLOW_MESSAGES / 4 {
                let payload = json!({"p": p, "n": n, "pad": data});
                api.publish_once(room, &payload)
                    .await
                    .map_err(|e| anyhow::anyhow!("publish {p}/{n}: {e}"))?;
                acked += 1;
            }
            anyhow::Ok(acked)
        }));
    }
    // Resume the stalled client as soon as it is reported gone, and read how it was closed.
    let mut left_rx = left_rx;
    // The guard `wait_for` returns is a read lock on the channel: drop it at once, or the
    // readers' `send_replace` would block on it.
    let announced = tokio::time::timeout(Duration::from_secs(25), left_rx.wait_for(|gone| *gone))
        .await
        .is_ok_and(|r| r.is_ok());
    let detected_after = started.elapsed();
    slow.resume_reading();
    let close = slow.expect_close(Duration::from_secs(10)).await;
    let mut acked = 0;
    for p in publishers {
        acked += p.await.context("publisher task")??;
    }
    let publish_time = started.elapsed();
    let mut delivered = Vec::new();
    for r in reader_tasks {
        delivered.push(r.await.context("reader task")??);
    }
    stop_tx.send_replace(true);
    let (peak_sampled, samples) = sampler.await.context("sampler task")?;
    let (rss_after, hwm_after) = memory_kib(pid)?;
    let _ = api.publish_once(room, &json!("done")).await;

    // The bound: the stalled connection's queue holds at most OUTBOUND_QUEUE_LEN frames of
    // ~10 KiB (10 MiB); the readers' queues hold the same frame bytes (reference-counted), but
    // may still hold up to half a queue of frames the stalled queue already let go of; plus
    // 12 MiB for the writers' batches (64 frames each), broker and socket buffers and
    // allocator slack. 1.5 x queue + 12 MiB = 27 MiB. A gateway that kept queueing for the
    // stalled client would hold nearly all of the 49 MiB sent (less ~4 MiB of kernel socket
    // buffers, which RSS does not count).
    let frame_kib = (SLOW_DATA_BYTES as u64 + 100) / 1024;
    let queue_kib = SLOW_QUEUE_LEN * frame_kib;
    let bound_kib = queue_kib + queue_kib / 2 + 12 * 1024;
    let peak = peak_sampled.max(if hwm_after > hwm_before { hwm_after } else { 0 });
    let growth = peak.saturating_sub(rss_before);
    eprintln!(
        "slow_consumer_memory_bounded: published {acked} x {} KiB = {:.1} MiB in {:.2} s; \
         stalled client reported gone after {:.2} s, close {close:?}; readers got {delivered:?}; \
         gateway RSS before {} KiB, sampled peak {} KiB ({samples} samples), VmHWM {} -> {} KiB, \
         after {} KiB; growth {} KiB, bound {} KiB (queue {} KiB)",
        SLOW_DATA_BYTES / 1024,
        (acked as f64 * SLOW_DATA_BYTES as f64) / (1024.0 * 1024.0),
        publish_time.as_secs_f64(),
        detected_after.as_secs_f64(),
        rss_before,
        peak_sampled,
        hwm_before,
        hwm_after,
        rss_after,
        growth,
        bound_kib,
        queue_kib,
    );
    ensure!(
        acked == SLOW_MESSAGES,
        "only {acked} of {SLOW_MESSAGES} publishes acknowledged"
    );
    ensure!(
        announced,
        "no member_left for the stalled client within 25 s (it was never dropped)"
    );
    let close = close.context("the stalled client's connection")?;
    ensure!(
        close.code == Some(4008),
        "the stalled client should be closed with 4008, got {close}"
    );
    ensure!(
        delivered.iter().all(|&n| n == SLOW_MESSAGES),
        "the readers that kept reading should get all {SLOW_MESSAGES} messages: {delivered:?}"
    );
    ensure!(
        growth < bound_kib,
        "gateway RSS grew by {growth} KiB (from {rss_before} to {peak} KiB) with one stalled \
         client; bound {bound_kib} KiB"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Presence after a gateway crash, many members

/// Heartbeat settings of the presence test: the lease is one heartbeat timeout.
const PRESENCE_HEARTBEAT: (u64, u64) = (2_000, 6_000);
/// `PRESENCE_SWEEP_MS` (room-service default).
const PRESENCE_SWEEP_MS: u64 = 1_000;
const VICTIMS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_cleanup_after_gateway_kill() {
    let mut opts = ClusterOptions::default().heartbeat(PRESENCE_HEARTBEAT.0, PRESENCE_HEARTBEAT.1);
    opts.gateways = 3;
    opts.room_env
        .push(("PRESENCE_SWEEP_MS".into(), PRESENCE_SWEEP_MS.to_string()));
    run(
        "presence_cleanup_after_gateway_kill",
        Flavor::Cluster,
        opts,
        presence_cleanup_scenario,
    )
    .await;
}

/// 30 members on gateway 2, observers on gateways 0 and 1, all in one room; SIGKILL gateway 2.
/// docs/protocol.md: a dead gateway's connections leave presence, with `member_left` to the
/// other members, within HEARTBEAT_TIMEOUT_MS + PRESENCE_SWEEP_MS (target: <= 2 x heartbeat
/// timeout). The observers only listen (a presence read would clean up by itself; the sweep
/// must do it unprompted), then presence is read once.
async fn presence_cleanup_scenario(sys: &mut System) -> Result<()> {
    let room = "lease";
    let key = sys.options().api_key.clone();
    let mut api = load::ApiPublisher::new("stats", &[sys.server_api_url(0)], &key)?;
    let mut observers = Vec::new();
    for g in 0..2 {
        let mut o = sys.client(g, &format!("observer-{g}")).await?;
        o.join(room).await?;
        observers.push(o);
    }
    let mut connecting = Vec::new();
    for i in 0..VICTIMS {
        let url = sys.ws_url(2);
        let token = sys.token(&format!("victim-{i}"))?;
        connecting.push(tokio::spawn(async move {
            let mut c = TestClient::connect(&url, &token)
                .await
                .map_err(|e| anyhow::anyhow!("victim-{i}: {e}"))?;
            c.join(room).await?;
            anyhow::Ok(c)
        }));
    }
    let mut victims = Vec::new();
    for c in connecting {
        victims.push(c.await.context("victim task")??);
    }
    let victim_ids: BTreeSet<String> = victims.iter().map(|c| c.client_id().to_owned()).collect();
    ensure!(
        victim_ids.len() == VICTIMS,
        "duplicate client ids: {victim_ids:?}"
    );
    // Every observer sees every victim arrive.
    for o in &mut observers {
        let mut seen = BTreeSet::new();
        while seen.len() < VICTIMS {
            let f = o
                .expect_match("member_joined of a victim", Duration::from_secs(10), |v| {
                    v["type"] == "member_joined"
                        && v["clientId"]
                            .as_str()
                            .is_some_and(|id| victim_ids.contains(id))
                })
                .await?;
            seen.insert(f["clientId"].as_str().unwrap_or_default().to_owned());
        }
    }
    let members = load::presence_ids(&mut observers[0], room).await?;
    ensure!(
        members.len() == VICTIMS + 2 && victim_ids.is_subset(&members),
        "before the crash presence should list 30 victims and 2 observers: {members:?}"
    );
    let gateways = api.cluster_gateways().await?;
    ensure!(
        gateways.contains("gw-2"),
        "gateway 2 has no live lease before the crash: {gateways:?}"
    );

    sys.cluster()
        .context("needs a cluster")?
        .gateway(2)
        .process
        .kill9()?;
    let killed = Instant::now();
    let documented = Duration::from_millis(PRESENCE_HEARTBEAT.1 + PRESENCE_SWEEP_MS);
    let target = Duration::from_millis(2 * PRESENCE_HEARTBEAT.1);
    // Small allowance for the event to cross room-service -> Redis -> gateway -> client.
    let allowance = Duration::from_millis(1000);
    let watch_until = killed + documented + Duration::from_secs(4);

    let mut last_left = Vec::new();
    for (g, o) in observers.iter_mut().enumerate() {
        let mut left: BTreeMap<String, Duration> = BTreeMap::new();
        while left.len() < VICTIMS {
            let wait = watch_until.saturating_duration_since(Instant::now());
            let f = match o
                .expect_match("member_left", wait, |v| v["type"] == "member_left")
                .await
            {
                Ok(f) => f,
                Err(e) => bail!(
                    "observer on gateway {g}: {} of {VICTIMS} member_left after {:.1} s: {e:#}",
                    left.len(),
                    killed.elapsed().as_secs_f64()
                ),
            };
            let id = f["clientId"].as_str().unwrap_or_default().to_owned();
            ensure!(
                victim_ids.contains(&id) && f["room"] == room,
                "observer on gateway {g}: member_left for a member that did not die: {f}"
            );
            ensure!(
                f["user"].as_str().is_some_and(|u| u.starts_with("victim-")),
                "member_left with the wrong user: {f}"
            );
            ensure!(
                left.insert(id, killed.elapsed()).is_none(),
                "observer on gateway {g}: member_left twice: {f}"
            );
        }
        let first = left.values().min().copied().unwrap_or_default();
        let last = left.values().max().copied().unwrap_or_default();
        eprintln!(
            "presence_cleanup_after_gateway_kill: observer on gateway {g}: {VICTIMS} member_left \
             between {:.2} s and {:.2} s after the kill",
            first.as_secs_f64(),
            last.as_secs_f64()
        );
        last_left.push(last);
    }
    let members = load::presence_ids(&mut observers[0], room).await?;
    let gone_by = killed.elapsed();
    ensure!(
        members.is_disjoint(&victim_ids) && members.len() == 2,
        "after every member_left, presence still lists {members:?}"
    );
    let gateways = api.cluster_gateways().await?;
    ensure!(
        !gateways.contains("gw-2"),
        "the dead gateway is still listed as live: {gateways:?}"
    );
    let worst = last_left.iter().max().copied().unwrap_or_default();
    eprintln!(
        "presence_cleanup_after_gateway_kill: all {VICTIMS} gone from presence within {:.2} s \
         (last member_left {:.2} s); documented bound HEARTBEAT_TIMEOUT_MS {} + \
         PRESENCE_SWEEP_MS {} = {:.1} s, target 2 x heartbeat timeout = {:.1} s",
        gone_by.as_secs_f64(),
        worst.as_secs_f64(),
        PRESENCE_HEARTBEAT.1,
        PRESENCE_SWEEP_MS,
        documented.as_secs_f64(),
        target.as_secs_f64()
    );
    ensure!(
        worst <= documented + allowance && worst <= target,
        "the last member_left came {:.2} s after the kill; documented bound {:.1} s \
         (+{:.1} s delivery allowance), target {:.1} s",
        worst.as_secs_f64(),
        documented.as_secs_f64(),
        allowance.as_secs_f64(),
        target.as_secs_f64()
    );
    drop(victims);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The load machinery shared by the four runs under load
