//! The contract against a real cluster: redis-server, auth-service, two room-services and two
//! gateways. The client-visible tests spread clients over both gateways; the rest kill
//! processes, restart the store and check origins.

#[macro_use]
mod common;

use roomcast_integration::{ClusterOptions, Flavor, run, scenarios};

client_visible_tests!(Flavor::Cluster);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_service_failover() {
    let opts = ClusterOptions::default();
    run(
        "room_service_failover",
        Flavor::Cluster,
        opts,
        scenarios::cluster_room_service_failover,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_room_services_down() {
    let opts = ClusterOptions::default();
    run(
        "all_room_services_down",
        Flavor::Cluster,
        opts,
        scenarios::cluster_all_room_services_down,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_restart_changes_epoch() {
    let opts = ClusterOptions::default();
    let scenario = scenarios::cluster_store_restart_changes_epoch;
    run(
        "store_restart_changes_epoch",
        Flavor::Cluster,
        opts,
        scenario,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_store_stalled() {
    run(
        "publish_batch_store_stalled",
        Flavor::Cluster,
        ClusterOptions::default(),
        scenarios::cluster_publish_batch_store_stalled,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_check() {
    let opts = ClusterOptions::default().allowed_origins("http://allowed.example");
    run(
        "origin_check",
        Flavor::Cluster,
        opts,
        scenarios::cluster_origin_check,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_drain() {
    let opts = ClusterOptions::default();
    run(
        "gateway_drain",
        Flavor::Cluster,
        opts,
        scenarios::cluster_gateway_drain,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_crash() {
    // A 3 s heartbeat timeout makes the dead gateway's lease 3 s.
    let opts = ClusterOptions::default().heartbeat(1_000, 3_000);
    run(
        "gateway_crash",
        Flavor::Cluster,
        opts,
        scenarios::cluster_gateway_crash,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_loss_is_repaired() {
    run(
        "broker_link_loss_is_repaired",
        Flavor::Cluster,
        ClusterOptions::default(),
        scenarios::cluster_broker_link_loss_is_repaired,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_service_down() {
    run(
        "auth_service_down",
        Flavor::Cluster,
        ClusterOptions::default(),
        scenarios::cluster_auth_service_down,
    )
    .await;
}
