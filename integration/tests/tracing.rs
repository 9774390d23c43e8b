//! Tracing end to end: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the gateway exports its own
//! spans (handshake, join, publish) and W3C trace context travels with its gRPC calls, so the
//! room-service and auth-service handler spans are children of the gateway span that made the
//! call: one client command is one trace across the processes.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use roomcast_integration::otlp::{Collector, ReceivedSpan};
use roomcast_integration::{ClusterOptions, Flavor, System, run};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

/// The `service.name` each part exports under.
struct Services {
    gateway: &'static str,
    room: &'static str,
    auth: &'static str,
}

const CLUSTER: Services = Services {
    gateway: "gateway",
    room: "room-service",
    auth: "auth-service",
};

/// Standalone: one process, the gateway binary.
const STANDALONE: Services = Services {
    gateway: "gateway",
    room: "gateway",
    auth: "gateway",
};

const HANDSHAKE: &str = "gateway.handshake";
const JOIN: &str = "gateway.join";
const PUBLISH: &str = "gateway.publish";
const VERIFY_TOKEN: &str = "roomcast.v1.AuthService/VerifyToken";
const AUTHORIZE: &str = "roomcast.v1.AuthService/Authorize";
const ROOM_JOIN: &str = "roomcast.v1.RoomService/Join";
const PUBLISH_BATCH: &str = "roomcast.v1.RoomService/PublishBatch";

fn options(collector: &Collector) -> ClusterOptions {
    let mut opts = ClusterOptions {
        gateways: 1,
        room_services: 1,
        ..ClusterOptions::default()
    };
    for (key, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        // Batches go out every 100 ms instead of 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("RUST_LOG", "info"),
    ] {
        opts = opts
            .gateway_env(key, value)
            .room_env(key, value)
            .auth_env(key, value);
    }
    opts
}

/// The one span called `name` exported by `service`.
fn the<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Result<&'a ReceivedSpan> {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.name() == name)
        .collect();
    match found[..] {
        [one] => Ok(one),
        _ => bail!(
            "expected one span {name:?} from {service:?}, got {}: {}",
            found.len(),
            found
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

fn ensure_child(child: &ReceivedSpan, parent: &ReceivedSpan) -> Result<()> {
    ensure!(
        child.is_child_of(parent),
        "{child}\n  is not a child of\n{parent}"
    );
    Ok(())
}

fn ensure_root(span: &ReceivedSpan) -> Result<()> {
    ensure!(
        span.span.parent_span_id.is_empty(),
        "{span} is not a trace's root"
    );
    Ok(())
}

async fn one_command_is_one_trace(
    sys: &mut System,
    collector: &Collector,
    names: &Services,
) -> Result<()> {
    let room = "traced";
    let mut client = sys.client(0, "tracer").await?;
    client.join(room).await?;
    client.publish(room, json!({"n": 1})).await?;

    let wanted = [
        HANDSHAKE,
        JOIN,
        PUBLISH,
        VERIFY_TOKEN,
        AUTHORIZE,
        ROOM_JOIN,
        PUBLISH_BATCH,
    ];
    let spans = collector
        .wait_for(T, |spans| {
            wanted
                .iter()
                .all(|name| spans.iter().any(|s| s.name() == *name))
                .then(|| spans.to_vec())
        })
        .await?;

    // The publish: gateway span → room-service PublishBatch, one trace of its own.
    let publish = the(&spans, names.gateway, PUBLISH)?;
    let batch = the(&spans, names.room, PUBLISH_BATCH)?;
    ensure_root(publish)?;
    ensure_child(batch, publish)?;
    ensure!(
        publish.attribute("publishes").as_deref() == Some("1")
            && publish.attribute("user").as_deref() == Some("tracer"),
        "{publish} attributes: {:?}",
        publish.span.attributes
    );

    // The join: gateway span → auth-service Authorize and room-service Join.
    let join = the(&spans, names.gateway, JOIN)?;
    ensure_root(join)?;
    ensure_child(the(&spans, names.auth, AUTHORIZE)?, join)?;
    ensure_child(the(&spans, names.room, ROOM_JOIN)?, join)?;
    ensure!(
        join.attribute("room").as_deref() == Some(room)
            && join.attribute("user").as_deref() == Some("tracer"),
        "{join} attributes: {:?}",
        join.span.attributes
    );

    // The handshake: gateway span (with the user) → auth-service VerifyToken.
    let handshake = the(&spans, names.gateway, HANDSHAKE)?;
    ensure_root(handshake)?;
    ensure_child(the(&spans, names.auth, VERIFY_TOKEN)?, handshake)?;
    ensure!(
        handshake.attribute("user").as_deref() == Some("tracer"),
        "{handshake} attributes: {:?}",
        handshake.span.attributes
    );

    let traces = [handshake, join, publish].map(|s| s.span.trace_id.clone());
    ensure!(
        traces[0] != traces[1] && traces[1] != traces[2] && traces[0] != traces[2],
        "handshake, join and publish share a trace: {handshake}; {join}; {publish}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_is_one_trace_across_the_cluster() {
    let collector = Collector::start().await.unwrap();
    run(
        "tracing",
        Flavor::Cluster,
        options(&collector),
        async |sys: &mut System| one_command_is_one_trace(sys, &collector, &CLUSTER).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_is_one_trace_standalone() {
    let collector = Collector::start().await.unwrap();
    run(
        "tracing",
        Flavor::Standalone,
        options(&collector),
        async |sys: &mut System| one_command_is_one_trace(sys, &collector, &STANDALONE).await,
    )
    .await;
}
