//! The gateway's lease with the room-service: while it is renewed, the gateway's members
//! count as present; once it runs out, the room-services sweep them.

use std::sync::Arc;

use roomcast_proto as pb;

use crate::state::Gateway;

/// Renews this gateway's lease with the room-service and reports its connection count. The
/// lease lasts one heartbeat timeout, renewed three times per lease: when a gateway dies, its
/// connections leave presence within the same bound as a dead connection (plus the
/// room-service's sweep interval).
pub async fn heartbeat_loop(gateway: Arc<Gateway>) {
    let lease = gateway.settings.heartbeat_timeout();
    let mut tick = tokio::time::interval(lease / 3);
    loop {
        tick.tick().await;
        let request = pb::GatewayHeartbeatRequest {
            gateway_id: gateway.id.clone(),
            connections: gateway.hub.connection_count() as u64,
            lease_ms: lease.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        if let Err(status) = gateway.backends.gateway_heartbeat(request).await {
            tracing::debug!(%status, "gateway heartbeat not recorded");
        }
    }
}
