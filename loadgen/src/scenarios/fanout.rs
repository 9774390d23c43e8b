//! `fanout`: WebSocket publishers, each a member of its room, publishing at a shared total
//! rate to rooms of WebSocket subscribers.

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::args::FanoutArgs;
use crate::report::DeliveryReport;
use crate::scenarios::delivery::{self, Publishers};

pub async fn run(args: FanoutArgs, interrupt: CancellationToken) -> Result<DeliveryReport> {
    let publishers = args.publishers.unwrap_or(args.rooms.rooms);
    delivery::run(
        "fanout",
        &args.common,
        &args.rooms,
        Publishers::WebSocket(publishers),
        interrupt,
    )
    .await
}
