//! The cluster with NATS as the broker (`BROKER_URL=nats://…` for gateways and room-services;
//! state stays in Redis). NATS does not order publishes from several room-service instances,
//! so these runs also exercise the gateways' gap repair: clients must still see every room in
//! offset order.

use roomcast_integration::nats::NatsServer;
use roomcast_integration::{ClusterOptions, Flavor, System, run, scenarios};

/// Starts a private nats-server and runs `scenario` on a cluster that uses it.
async fn on_nats(test: &str, scenario: impl AsyncFnOnce(&mut System) -> anyhow::Result<()>) {
    let log_dir = std::env::temp_dir().join(format!("roomcast-nats-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let nats = NatsServer::start(&log_dir)
        .await
        .expect("nats-server starts");
    let mut opts = ClusterOptions::default().gateway_env("BROKER_URL", nats.url());
    opts.room_env.push(("BROKER_URL".into(), nats.url()));
    run(test, Flavor::Cluster, opts, scenario).await;
    drop(nats);
    let _ = std::fs::remove_dir_all(&log_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cross_gateway_delivery() {
    on_nats(
        "nats_cross_gateway_delivery",
        scenarios::cross_gateway_delivery,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ordering_under_concurrent_publishers() {
    on_nats(
        "nats_ordering_under_concurrent_publishers",
        scenarios::ordering_under_concurrent_publishers,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_presence_and_member_events() {
    on_nats(
        "nats_presence_and_member_events",
        scenarios::presence_and_member_events,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_late_join_during_traffic() {
    on_nats(
        "nats_late_join_during_traffic",
        scenarios::late_join_during_traffic,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_api_disconnect() {
    on_nats(
        "nats_server_api_disconnect",
        scenarios::server_api_disconnect,
    )
    .await;
}
