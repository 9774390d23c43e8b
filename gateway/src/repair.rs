//! Fills gaps in rooms' offsets from history, so clients never see a gap that history could
//! fill. The hub reports a gap (an offset that skips ahead, a new epoch that does not start at
//! 1, or a lost broker link) and holds the room's later messages; this task fetches the missing
//! ones from the room-service and hands everything back to the hub in offset order.

use std::sync::Arc;

use roomcast_proto as pb;
use tokio::sync::mpsc;

use crate::hub::RepairRequest;
use crate::protocol;
use crate::room_stream::Filled;
use crate::state::Gateway;

/// Serves gap reports until the hub is gone. One at a time: gaps are rare (a broker hiccup),
/// and a burst of them after a lost link is best served without stampeding the room-service.
pub async fn run(gateway: Arc<Gateway>, mut requests: mpsc::UnboundedReceiver<RepairRequest>) {
    while let Some(request) = requests.recv().await {
        match request {
            RepairRequest::Room { room, since } => {
                let filled = fetch(&gateway, &room, since).await;
                gateway.hub.finish_repair(&room, filled);
            }
            RepairRequest::Reregister => reregister(&gateway).await,
        }
    }
}

/// Joins every local membership again. A join of a member the store still has changes
/// nothing (no event); one it lost (Redis restarted empty) is restored, and announced.
async fn reregister(gateway: &Gateway) {
    let memberships = gateway.hub.memberships();
    let mut failed = 0usize;
    for (room, client_id, user) in &memberships {
        let request = pb::JoinRequest {
            room: room.to_string(),
            client_id: client_id.to_string(),
            user: user.to_string(),
            gateway_id: gateway.id.clone(),
            since: None,
        };
        let joined = gateway.backends.join(request).await;
        if joined.is_err() {
            failed += 1;
        }
    }
    tracing::info!(
        memberships = memberships.len(),
        failed,
        "memberships recorded again after a lost broker link"
    );
}

async fn fetch(gateway: &Gateway, room: &Arc<str>, since: u64) -> Option<Filled> {
    let query = pb::HistoryRequest {
        room: room.to_string(),
        since: Some(since),
        limit: 0,
    };
    let history = gateway.backends.history(query).await;
    match history {
        Ok(history) => {
            metrics::counter!("roomcast_gateway_gap_messages_filled_total")
                .increment(history.publications.len() as u64);
            let messages = history
                .publications
                .into_iter()
                .map(|p| {
                    let frame = protocol::stored_message(room, &history.epoch, &p);
                    (p.offset, p.client_id, frame)
                })
                .collect();
            Some(Filled {
                epoch: history.epoch,
                latest: history.offset,
                messages,
            })
        }
        Err(status) => {
            // Deliver what was held anyway: a late, gapped stream beats a stalled one.
            tracing::warn!(%room, %status, "gap not filled: history unavailable");
            None
        }
    }
}
