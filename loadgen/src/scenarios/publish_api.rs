//! `publish-api`: another backend publishing through the server API (`ServerApi.Publish`, or
//! `PublishBatch` with `--batch`), into rooms of WebSocket subscribers; the lanes that call it
//! are in `api_lane.rs`.

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::args::PublishApiArgs;
use crate::client::Dialer;
use crate::report::DeliveryReport;
use crate::scenarios::api_lane;
use crate::scenarios::delivery::{self, Publishers};

pub async fn run(args: PublishApiArgs, interrupt: CancellationToken) -> Result<DeliveryReport> {
    let key = args.api_key.as_deref().unwrap_or_default();
    let target = api_lane::connect(
        &args.grpc,
        key,
        args.max_in_flight,
        args.batch,
        args.common.connect_timeout,
    )
    .await?;
    let lanes = args.publishers.unwrap_or(args.rooms.rooms);
    delivery::run_once(
        "publish-api",
        &args.common,
        &args.rooms,
        Dialer::new(&args.common)?,
        Publishers::Api {
            target: Box::new(target),
            lanes,
        },
        interrupt,
    )
    .await
}
