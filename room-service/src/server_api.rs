//! The gRPC `ServerApi`: what other backends call, under the API key (checked before any
//! handler runs, see [`crate::serve`]). Built on the same validation and store calls as the
//! internal service.

use std::collections::HashSet;

use roomcast_common::close_code::CloseCode;
use roomcast_common::envelope::{Control, encode_control};
use roomcast_proto as pb;
use roomcast_proto::server_api_server::ServerApi;
use tonic::{Request, Response, Status};

use crate::service::{
    MAX_CLIENT_ID_LEN, RoomServiceImpl, check_batch_len, check_id, check_room, check_user,
    publish_result, store_status,
};
use crate::store::PublishItem;

/// Most rooms one `Broadcast` may name.
pub const MAX_BROADCAST_ROOMS: usize = 1000;
/// Longest WebSocket close reason, in bytes (a close frame's payload is at most 125 bytes,
/// two of them for the code).
pub const MAX_CLOSE_REASON_LEN: usize = 123;
/// The close code a `Disconnect` without one uses (policy violation).
pub const DEFAULT_CLOSE_CODE: CloseCode = CloseCode::POLICY_VIOLATION;
/// Longest idempotency key a backend may give, in bytes.
pub const MAX_SERVER_IDEMPOTENCY_KEY_LEN: usize = 256;
/// Rooms listed when `RoomsRequest.limit` is 0, and at most.
pub const DEFAULT_ROOMS_LIMIT: usize = 1000;
pub const MAX_ROOMS_LIMIT: usize = 10_000;

/// The `ServerApi` implementation; cheap to clone.
#[derive(Clone)]
pub struct ServerApiImpl {
    rooms: RoomServiceImpl,
}

impl ServerApiImpl {
    pub fn new(rooms: RoomServiceImpl) -> Self {
        ServerApiImpl { rooms }
    }

    fn publisher(user: &str) -> &str {
        if user.is_empty() { "server" } else { user }
    }

    /// Backend keys live in their own scope, apart from the keys gateways send for clients.
    fn scoped_key(key: &str) -> Result<String, Status> {
        if key.len() > MAX_SERVER_IDEMPOTENCY_KEY_LEN {
            return Err(Status::invalid_argument(format!(
                "idempotency_key is longer than {MAX_SERVER_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
        Ok(if key.is_empty() {
            String::new()
        } else {
            format!("s:{key}")
        })
    }

    async fn control(&self, control: Control) -> Result<(), Status> {
        self.rooms
            .store()
            .publish_control(encode_control(&control))
            .await
            .map_err(store_status)
    }
}

/// A target of a server-side command: a user or one connection.
fn check_target(user: &str, client_id: &str) -> Result<(), Status> {
    if user.is_empty() && client_id.is_empty() {
        return Err(Status::invalid_argument("user or client_id is required"));
    }
    check_user(user, false)?;
    check_id("client_id", client_id, MAX_CLIENT_ID_LEN, false)
}

#[tonic::async_trait]
impl ServerApi for ServerApiImpl {
    async fn publish(
        &self,
        request: Request<pb::ServerPublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_user(&request.user, false)?;
        let data = self.rooms.check_data(&request.data_json)?;
        let key = Self::scoped_key(&request.idempotency_key)?;
        let user = Self::publisher(&request.user);
        self.rooms
            .publish_checked(&request.room, user, "", data, &key, false)
            .await
            .map(Response::new)
    }

    async fn publish_batch(
        &self,
        request: Request<pb::ServerPublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let publishes = request.into_inner().publishes;
        check_batch_len(publishes.len())?;
        let keys: Vec<_> = publishes
            .iter()
            .map(|publish| Self::scoped_key(&publish.idempotency_key))
            .collect();
        let checked = publishes
            .iter()
            .zip(&keys)
            .map(|(publish, key)| {
                check_room(&publish.room)?;
                check_user(&publish.user, false)?;
                let data_json = self.rooms.check_data(&publish.data_json)?;
                let key = key.as_ref().map_err(Clone::clone)?;
                Ok(PublishItem {
                    room: &publish.room,
                    user: Self::publisher(&publish.user),
                    client_id: "",
                    data_json,
                    once: self.rooms.once(key, false)?,
                })
            })
            .collect();
        let outcomes = self.rooms.publish_items(checked).await;
        Ok(Response::new(pb::PublishBatchResponse {
            results: outcomes.into_iter().map(publish_result).collect(),
        }))
    }

    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        let request = request.into_inner();
        if request.rooms.is_empty() {
            return Err(Status::invalid_argument("rooms is empty"));
        }
        if request.rooms.len() > MAX_BROADCAST_ROOMS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BROADCAST_ROOMS} rooms per broadcast"
            )));
        }
        check_user(&request.user, false)?;
        let data_json = self.rooms.check_data(&request.data_json)?;
        let key = Self::scoped_key(&request.idempotency_key)?;
        let once = self.rooms.once(&key, false)?;
        let user = Self::publisher(&request.user);
        // One ordered store call for every room, as a batch.
        let checked = request
            .rooms
            .iter()
            .map(|room| {
                check_room(room)?;
                Ok(PublishItem {
                    room,
                    user,
                    client_id: "",
                    data_json,
                    once,
                })
            })
            .collect();
        let outcomes = self.rooms.publish_items(checked).await;
        let results = request
            .rooms
            .iter()
            .zip(outcomes)
            .map(|(room, outcome)| match outcome {
                Ok(published) => pb::BroadcastResult {
                    room: room.clone(),
                    published: Some(published),
                    error: String::new(),
                },
                Err(status) => pb::BroadcastResult {
                    room: room.clone(),
                    published: None,
                    error: status.message().to_owned(),
                },
            })
            .collect();
        Ok(Response::new(pb::BroadcastResponse { results }))
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        self.rooms
            .presence_of(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn presence_stats(
        &self,
        request: Request<pb::PresenceStatsRequest>,
    ) -> Result<Response<pb::PresenceStatsResponse>, Status> {
        let room = request.into_inner().room;
        let members = self
            .rooms
            .presence_of(pb::PresenceRequest { room })
            .await?
            .members;
        let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
        Ok(Response::new(pb::PresenceStatsResponse {
            connections: members.len() as u64,
            users: users.len() as u64,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.rooms
            .history_of(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn history_remove(
        &self,
        request: Request<pb::HistoryRemoveRequest>,
    ) -> Result<Response<pb::HistoryRemoveResponse>, Status> {
        let room = request.into_inner().room;
        check_room(&room)?;
        self.rooms
            .store()
            .remove_history(&room)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::HistoryRemoveResponse {}))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let request = request.into_inner();
        check_target(&request.user, &request.client_id)?;
        let code = match request.code {
            0 => DEFAULT_CLOSE_CODE,
            // Only codes an endpoint may send (see `CloseCode`): RFC 6455's and 3000-4999.
            code => u16::try_from(code)
                .ok()
                .and_then(CloseCode::new)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("{code} is not a usable WebSocket close code"))
                })?,
        };
        if request.reason.len() > MAX_CLOSE_REASON_LEN {
            return Err(Status::invalid_argument(format!(
                "reason is longer than {MAX_CLOSE_REASON_LEN} bytes"
            )));
        }
        self.control(Control::Disconnect {
            user: request.user,
            client_id: request.client_id,
            code,
            reason: request.reason,
        })
        .await?;
        Ok(Response::new(pb::DisconnectResponse {}))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_target(&request.user, &request.client_id)?;
        self.control(Control::Subscribe {
            room: request.room,
            user: request.user,
            client_id: request.client_id,
        })
        .await?;
        Ok(Response::new(pb::SubscribeResponse {}))
    }

    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_target(&request.user, &request.client_id)?;
        self.control(Control::Unsubscribe {
            room: request.room,
            user: request.user,
            client_id: request.client_id,
        })
        .await?;
        Ok(Response::new(pb::UnsubscribeResponse {}))
    }

    async fn rooms(
        &self,
        request: Request<pb::RoomsRequest>,
    ) -> Result<Response<pb::RoomsResponse>, Status> {
        let request = request.into_inner();
        // The prefix is matched literally; it must itself be a valid start of a room name.
        if !request.prefix.is_empty() {
            check_room(&request.prefix)?;
        }
        let limit = match request.limit {
            0 => DEFAULT_ROOMS_LIMIT,
            n => usize::try_from(n)
                .unwrap_or(MAX_ROOMS_LIMIT)
                .min(MAX_ROOMS_LIMIT),
        };
        let rooms = self
            .rooms
            .store()
            .rooms(&request.prefix, limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RoomsResponse {
            rooms: rooms
                .into_iter()
                .map(|r| pb::RoomInfo {
                    room: r.room,
                    members: r.members,
                    offset: r.offset,
                })
                .collect(),
        }))
    }

    async fn room_stats(
        &self,
        request: Request<pb::RoomStatsRequest>,
    ) -> Result<Response<pb::RoomStatsResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        let stats = self
            .rooms
            .store()
            .room_stats(&request.room)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RoomStatsResponse {
            room: request.room,
            members: stats.members,
            epoch: stats.epoch,
            offset: stats.offset,
            history_len: stats.history_len,
        }))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let store = self.rooms.store();
        let gateways = store.gateways().await.map_err(store_status)?;
        let rooms = store
            .rooms("", MAX_ROOMS_LIMIT)
            .await
            .map_err(store_status)?;
        let connections = gateways
            .iter()
            .map(|g| g.connections)
            .fold(0u64, u64::saturating_add);
        Ok(Response::new(pb::InfoResponse {
            gateways: gateways
                .into_iter()
                .map(|g| pb::GatewayInfo {
                    gateway_id: g.gateway_id,
                    connections: g.connections,
                    last_seen_ms: g.last_seen_ms,
                    version: g.version,
                })
                .collect(),
            connections,
            rooms: rooms.iter().filter(|r| r.members > 0).count() as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use roomcast_common::envelope::{CONTROL_CHANNEL, Envelope};
    use tonic::Code;
    use tonic::Request;

    use std::time::Duration;

    use super::*;
    use crate::service::tests::{listen, service as internal};

    fn service(_key: Option<&str>) -> (ServerApiImpl, roomcast_common::broker::MemoryBroker) {
        let (rooms, broker) = internal(None);
        (ServerApiImpl::new(rooms), broker)
    }

    fn authed<T>(message: T) -> Request<T> {
        Request::new(message)
    }

    #[tokio::test]
    async fn server_publish_broadcast_and_stats() {
        let (service, broker) = service(None);
        let (_sub, seen) = listen(&broker, "rc:room:a").await;
        let request = pb::ServerPublishRequest {
            room: "a".into(),
            data_json: "{}".into(),
            user: String::new(),
            idempotency_key: String::new(),
        };
        let published = service.publish(authed(request)).await.unwrap().into_inner();
        assert_eq!(published.offset, 1);
        let Envelope::Message { sender, frame, .. } = seen.lock().unwrap()[0].clone() else {
            panic!("not a message")
        };
        assert_eq!(sender, "");
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            (v["user"].as_str(), v["clientId"].as_str()),
            (Some("server"), Some(""))
        );

        let request = pb::BroadcastRequest {
            rooms: vec!["a".into(), "b c".into(), "b".into()],
            data_json: "[1]".into(),
            user: "ops".into(),
            idempotency_key: String::new(),
        };
        let results = service
            .broadcast(authed(request))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].published.as_ref().map(|p| p.offset), Some(2));
        assert!(results[1].published.is_none() && !results[1].error.is_empty());
        assert_eq!(results[2].published.as_ref().map(|p| p.offset), Some(1));
        let request = pb::BroadcastRequest {
            rooms: vec![],
            data_json: "1".into(),
            user: String::new(),
            idempotency_key: String::new(),
        };
        assert_eq!(
            service.broadcast(authed(request)).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let request = pb::BroadcastRequest {
            rooms: vec!["a".into()],
            data_json: "nope".into(),
            user: String::new(),
            idempotency_key: String::new(),
        };
        assert_eq!(
            service.broadcast(authed(request)).await.unwrap_err().code(),
            Code::InvalidArgument
        );

        let stats = service
            .room_stats(authed(pb::RoomStatsRequest { room: "a".into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                stats.room.as_str(),
                stats.offset,
                stats.history_len,
                stats.members
            ),
            ("a", 2, 2, 0)
        );

        for (gateway_id, connections) in [("gw1", 3), ("gw2", 4)] {
            service
                .rooms
                .store()
                .gateway_heartbeat(gateway_id, connections, Duration::from_secs(30), "v1")
                .await
                .unwrap();
        }
        let cluster = service
            .info(authed(pb::InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((cluster.gateways.len(), cluster.connections), (2, 7));
    }

    #[tokio::test]
    async fn disconnect_publishes_a_control_command() {
        let (service, broker) = service(None);
        let (_sub, seen) = listen(&broker, CONTROL_CHANNEL).await;
        let request = pb::DisconnectRequest {
            user: "u1".into(),
            client_id: String::new(),
            code: 0,
            reason: "bye".into(),
        };
        service.disconnect(authed(request)).await.unwrap();
        let request = pb::DisconnectRequest {
            user: String::new(),
            client_id: "c9".into(),
            code: 4001,
            reason: String::new(),
        };
        service.disconnect(authed(request)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                Envelope::Control(Control::Disconnect {
                    user: "u1".into(),
                    client_id: String::new(),
                    code: CloseCode::POLICY_VIOLATION,
                    reason: "bye".into()
                }),
                Envelope::Control(Control::Disconnect {
                    user: String::new(),
                    client_id: "c9".into(),
                    code: CloseCode::TOKEN_EXPIRED,
                    reason: String::new()
                }),
            ]
        );
        for request in [
            pb::DisconnectRequest::default(),
            pb::DisconnectRequest {
                user: "u".into(),
                code: 1005,
                ..Default::default()
            },
            pb::DisconnectRequest {
                user: "u".into(),
                code: 70000,
                ..Default::default()
            },
            pb::DisconnectRequest {
                user: "u".into(),
                reason: "r".repeat(124),
                ..Default::default()
            },
        ] {
            assert_eq!(
                service
                    .disconnect(authed(request))
                    .await
                    .unwrap_err()
                    .code(),
                Code::InvalidArgument
            );
        }
    }
}
