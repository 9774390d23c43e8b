//! The gRPC `RoomService`: validation, API-key checks for the server API, and mapping between
//! proto messages and the store.

use std::sync::Arc;
use std::time::Duration;

use roomcast_common::envelope::{Control, encode_control};
use roomcast_common::error_code::ErrorCode;
use roomcast_common::room::validate_room_name;
use roomcast_proto as pb;
use roomcast_proto::room_service_server::RoomService;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

use crate::store::{Joiner, Position, Store, StoreError, StoredMessage};

/// Longest accepted client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Longest accepted user id, in bytes.
pub const MAX_USER_LEN: usize = 256;
/// Longest accepted gateway id, in bytes.
pub const MAX_GATEWAY_ID_LEN: usize = 256;
/// Most rooms one `Broadcast` may name.
pub const MAX_BROADCAST_ROOMS: usize = 1000;
/// Lease used when a heartbeat does not say.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Longest lease a heartbeat may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest WebSocket close reason, in bytes (a close frame's payload is at most 125 bytes,
/// two of them for the code).
pub const MAX_CLOSE_REASON_LEN: usize = 123;
/// The close code a `Disconnect` without one uses (policy violation).
pub const DEFAULT_CLOSE_CODE: u16 = 1008;

/// Settings of the service itself (the store has its own).
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The key the server API requires; `None` (or empty) disables the server API.
    pub api_key: Option<String>,
    /// Largest accepted `data_json`, in bytes.
    pub max_data_bytes: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            api_key: None,
            max_data_bytes: 64 * 1024,
        }
    }
}

/// The `RoomService` implementation; cheap to clone.
#[derive(Clone)]
pub struct RoomServiceImpl {
    store: Store,
    options: Arc<ServiceOptions>,
}

impl RoomServiceImpl {
    pub fn new(store: Store, options: ServiceOptions) -> Self {
        RoomServiceImpl {
            store,
            options: Arc::new(options),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Checks the server API key: `authorization: Bearer <API_KEY>`.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = self.options.api_key.as_deref().filter(|k| !k.is_empty()) else {
            return Err(Status::permission_denied(
                "server API disabled: API_KEY not set",
            ));
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| {
                Status::unauthenticated("missing API key (authorization: Bearer <key>)")
            })?;
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid API key"))
        }
    }

    /// Validates `data_json`: at most `max_data_bytes`, and valid JSON. Returns it without
    /// surrounding whitespace, ready to embed in a frame.
    fn check_data<'a>(&self, data_json: &'a str) -> Result<&'a str, Status> {
        if data_json.len() > self.options.max_data_bytes {
            return Err(ErrorCode::TooLarge.status(format!(
                "data is {} bytes, more than the limit of {}",
                data_json.len(),
                self.options.max_data_bytes
            )));
        }
        serde_json::from_str::<&RawValue>(data_json)
            .map(RawValue::get)
            .map_err(|e| Status::invalid_argument(format!("data is not valid JSON: {e}")))
    }

    async fn publish_checked(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
    ) -> Result<pb::PublishResponse, Status> {
        let published = self
            .store
            .publish(room, user, client_id, data_json)
            .await
            .map_err(store_status)?;
        metrics::counter!("roomcast_room_published_total").increment(1);
        Ok(pb::PublishResponse {
            epoch: published.epoch,
            offset: published.offset,
        })
    }

    async fn presence_of(
        &self,
        request: pb::PresenceRequest,
    ) -> Result<pb::PresenceResponse, Status> {
        check_room(&request.room)?;
        let members = self
            .store
            .presence(&request.room)
            .await
            .map_err(store_status)?;
        Ok(pb::PresenceResponse {
            members: members
                .into_iter()
                .map(|m| pb::Member {
                    user: m.user,
                    client_id: m.client_id,
                })
                .collect(),
        })
    }

    async fn history_of(&self, request: pb::HistoryRequest) -> Result<pb::HistoryResponse, Status> {
        check_room(&request.room)?;
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let page = self
            .store
            .history(&request.room, request.since, limit)
            .await
            .map_err(store_status)?;
        Ok(pb::HistoryResponse {
            epoch: page.epoch,
            offset: page.offset,
            publications: page.messages.into_iter().map(publication).collect(),
        })
    }
}

/// The token of an `authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without an early exit, so the time taken does not reveal how much of the key a
/// guess got right (only its length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_room(room: &str) -> Result<(), Status> {
    validate_room_name(room).map_err(|e| Status::invalid_argument(format!("room {room:?}: {e}")))
}

/// An id that travels in broker envelope headers: non-empty when `required`, bounded, and free
/// of whitespace and control characters (a newline would break the envelope).
fn check_id(what: &str, id: &str, max: usize, required: bool) -> Result<(), Status> {
    if required && id.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    if id.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Status::invalid_argument(format!(
            "{what} may not contain whitespace or control characters"
        )));
    }
    Ok(())
}

fn check_user(user: &str, required: bool) -> Result<(), Status> {
    if required && user.is_empty() {
        return Err(Status::invalid_argument("user is required"));
    }
    if user.len() > MAX_USER_LEN {
        return Err(Status::invalid_argument(format!(
            "user is longer than {MAX_USER_LEN} bytes"
        )));
    }
    Ok(())
}

fn store_status(error: StoreError) -> Status {
    let kind = match &error {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Config(_) | StoreError::Internal(_) => "internal",
    };
    metrics::counter!("roomcast_room_store_errors_total", "kind" => kind).increment(1);
    match &error {
        StoreError::Unavailable(_) => {
            tracing::warn!(%error, "store unavailable");
            Status::unavailable(error.to_string())
        }
        StoreError::Config(_) | StoreError::Internal(_) => {
            tracing::error!(%error, "store error");
            Status::internal(error.to_string())
        }
    }
}

fn publication(message: StoredMessage) -> pb::Publication {
    pb::Publication {
        offset: message.offset,
        user: message.user,
        client_id: message.client_id,
        data_json: message.data_json,
    }
}

/// Accepted WebSocket close codes: the ones an endpoint may send, and the application range.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[tonic::async_trait]
impl RoomService for RoomServiceImpl {
    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Join",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, true)?;
        check_user(&request.user, true)?;
        check_id("gateway_id", &request.gateway_id, MAX_GATEWAY_ID_LEN, false)?;
        let since = request.since.map(|p| Position {
            epoch: p.epoch,
            offset: p.offset,
        });
        let joiner = Joiner {
            client_id: &request.client_id,
            user: &request.user,
            gateway_id: &request.gateway_id,
        };
        let joined = self
            .store
            .join(&request.room, joiner, since.as_ref())
            .await
            .map_err(store_status)?;
        metrics::counter!("roomcast_room_joins_total").increment(1);
        if let Some(recovered) = joined.recovered {
            let result = if recovered { "recovered" } else { "lost" };
            metrics::counter!("roomcast_room_recoveries_total", "result" => result).increment(1);
        }
        Ok(Response::new(pb::JoinResponse {
            epoch: joined.epoch,
            offset: joined.offset,
            recovered: joined.recovered,
            missed: joined.missed.into_iter().map(publication).collect(),
        }))
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Leave",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, true)?;
        check_user(&request.user, false)?;
        self.store
            .leave(&request.room, &request.client_id, &request.user)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Publish",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let request = request.into_inner();
        check_room(&request.room)?;
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, false)?;
        check_user(&request.user, false)?;
        let data = self.check_data(&request.data_json)?;
        self.publish_checked(&request.room, &request.user, &request.client_id, data)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Presence",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        self.presence_of(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/History",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.history_of(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/ConnectionClosed",
        skip_all,
        fields(otel.kind = "server", rooms = request.get_ref().rooms.len())
    )]
    async fn connection_closed(
        &self,
        request: Request<pb::ConnectionClosedRequest>,
    ) -> Result<Response<pb::ConnectionClosedResponse>, Status> {
        let request = request.into_inner();
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, true)?;
        check_user(&request.user, false)?;
        // Try every room even when one fails; leaving is idempotent, so the caller may retry.
        let mut first_error = None;
        for room in &request.rooms {
            if validate_room_name(room).is_err() {
                continue;
            }
            if let Err(error) = self
                .store
                .leave(room, &request.client_id, &request.user)
                .await
            {
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            Some(error) => Err(store_status(error)),
            None => Ok(Response::new(pb::ConnectionClosedResponse {})),
        }
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/GatewayHeartbeat",
        skip_all,
        fields(otel.kind = "server", gateway_id = %request.get_ref().gateway_id)
    )]
    async fn gateway_heartbeat(
        &self,
        request: Request<pb::GatewayHeartbeatRequest>,
    ) -> Result<Response<pb::GatewayHeartbeatResponse>, Status> {
        let request = request.into_inner();
        check_id("gateway_id", &request.gateway_id, MAX_GATEWAY_ID_LEN, true)?;
        let lease = match request.lease_ms {
            0 => DEFAULT_LEASE,
            ms => Duration::from_millis(ms).min(MAX_LEASE),
        };
        self.store
            .gateway_heartbeat(&request.gateway_id, request.connections, lease)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::GatewayHeartbeatResponse {}))
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/ServerPublish",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn server_publish(
        &self,
        request: Request<pb::ServerPublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        check_room(&request.room)?;
        check_user(&request.user, false)?;
        let data = self.check_data(&request.data_json)?;
        let user = if request.user.is_empty() {
            "server"
        } else {
            &request.user
        };
        self.publish_checked(&request.room, user, "", data)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Broadcast",
        skip_all,
        fields(otel.kind = "server", rooms = request.get_ref().rooms.len())
    )]
    async fn broadcast(
        &self,
        request: Request<pb::BroadcastRequest>,
    ) -> Result<Response<pb::BroadcastResponse>, Status> {
        self.authorize(&request)?;
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
        let data = self.check_data(&request.data_json)?;
        let user = if request.user.is_empty() {
            "server"
        } else {
            &request.user
        };
        let mut results = Vec::with_capacity(request.rooms.len());
        for room in &request.rooms {
            let outcome = match check_room(room) {
                Ok(()) => self.publish_checked(room, user, "", data).await,
                Err(status) => Err(status),
            };
            results.push(match outcome {
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
            });
        }
        Ok(Response::new(pb::BroadcastResponse { results }))
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/ServerPresence",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn server_presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        self.authorize(&request)?;
        self.presence_of(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/ServerHistory",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn server_history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.authorize(&request)?;
        self.history_of(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/Disconnect",
        skip_all,
        fields(otel.kind = "server")
    )]
    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        if request.user.is_empty() && request.client_id.is_empty() {
            return Err(Status::invalid_argument("user or client_id is required"));
        }
        check_user(&request.user, false)?;
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, false)?;
        let code = match request.code {
            0 => DEFAULT_CLOSE_CODE,
            code => u16::try_from(code)
                .ok()
                .filter(|c| valid_close_code(*c))
                .ok_or_else(|| {
                    Status::invalid_argument(format!("{code} is not a usable WebSocket close code"))
                })?,
        };
        if request.reason.len() > MAX_CLOSE_REASON_LEN {
            return Err(Status::invalid_argument(format!(
                "reason is longer than {MAX_CLOSE_REASON_LEN} bytes"
            )));
        }
        let control = Control::Disconnect {
            user: request.user,
            client_id: request.client_id,
            code,
            reason: request.reason,
        };
        self.store
            .publish_control(encode_control(&control))
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DisconnectResponse {}))
    }

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/RoomStats",
        skip_all,
        fields(otel.kind = "server", room = %request.get_ref().room)
    )]
    async fn room_stats(
        &self,
        request: Request<pb::RoomStatsRequest>,
    ) -> Result<Response<pb::RoomStatsResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        check_room(&request.room)?;
        let stats = self
            .store
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

    #[tracing::instrument(
        name = "roomcast.v1.RoomService/ClusterStats",
        skip_all,
        fields(otel.kind = "server")
    )]
    async fn cluster_stats(
        &self,
        request: Request<pb::ClusterStatsRequest>,
    ) -> Result<Response<pb::ClusterStatsResponse>, Status> {
        self.authorize(&request)?;
        let gateways = self.store.gateways().await.map_err(store_status)?;
        let connections = gateways
            .iter()
            .map(|g| g.connections)
            .fold(0u64, u64::saturating_add);
        Ok(Response::new(pb::ClusterStatsResponse {
            gateways: gateways
                .into_iter()
                .map(|g| pb::GatewayInfo {
                    gateway_id: g.gateway_id,
                    connections: g.connections,
                    last_seen_ms: g.last_seen_ms,
                })
                .collect(),
            connections,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use roomcast_common::broker::{BrokerEvent, MemoryBroker, Sink, Subscriber};
    use roomcast_common::envelope::{CONTROL_CHANNEL, Envelope, decode};
    use tonic::Code;

    use super::*;
    use crate::store::HistoryLimits;

    const KEY: &str = "s3cret-key";

    fn service(api_key: Option<&str>) -> (RoomServiceImpl, MemoryBroker) {
        let broker = MemoryBroker::new();
        let store = Store::memory(broker.clone(), HistoryLimits::default());
        let options = ServiceOptions {
            api_key: api_key.map(str::to_owned),
            max_data_bytes: 32,
        };
        (RoomServiceImpl::new(store, options), broker)
    }

    fn with_key<T>(message: T, authorization: &str) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", authorization.parse().unwrap());
        request
    }

    /// The error code of a call, `None` when it succeeded.
    fn code<T>(result: Result<T, Status>) -> Option<Code> {
        result.err().map(|s| s.code())
    }

    fn authed<T>(message: T) -> Request<T> {
        with_key(message, &format!("Bearer {KEY}"))
    }

    fn publish_request(room: &str, data_json: &str) -> Request<pb::PublishRequest> {
        Request::new(pb::PublishRequest {
            room: room.into(),
            client_id: "c1".into(),
            user: "alice".into(),
            data_json: data_json.into(),
        })
    }

    fn join_request(room: &str, client_id: &str) -> pb::JoinRequest {
        pb::JoinRequest {
            room: room.into(),
            client_id: client_id.into(),
            user: "alice".into(),
            gateway_id: "gw1".into(),
            since: None,
        }
    }

    async fn listen(
        broker: &MemoryBroker,
        channel: &str,
    ) -> (Subscriber, Arc<Mutex<Vec<Envelope>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let sink: Sink = Arc::new(move |event| {
            if let BrokerEvent::Message { payload, .. } = event {
                seen2.lock().unwrap().push(decode(payload).unwrap());
            }
        });
        let subscriber = Subscriber::Memory(broker.subscriber(sink));
        subscriber.subscribe(channel).await.unwrap();
        (subscriber, seen)
    }

    #[tokio::test]
    async fn bad_rooms_ids_and_data_are_refused() {
        let (service, _) = service(None);
        assert_eq!(
            code(service.publish(publish_request("a b", "1")).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(service.publish(publish_request("", "1")).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(service.publish(publish_request("r", "{")).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(service.publish(publish_request("r", "")).await),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            code(service.publish(publish_request("r", "1 2")).await),
            Some(Code::InvalidArgument)
        );
        let big = format!("\"{}\"", "x".repeat(40));
        assert_eq!(
            code(service.publish(publish_request("r", &big)).await),
            Some(Code::OutOfRange)
        );
        for client_id in ["", "a\nb", "a b", &"c".repeat(MAX_CLIENT_ID_LEN + 1)] {
            let request = Request::new(join_request("r", client_id));
            assert_eq!(
                code(service.join(request).await),
                Some(Code::InvalidArgument),
                "{client_id:?}"
            );
        }
        let mut request = join_request("r", "c1");
        request.user = String::new();
        assert_eq!(
            code(service.join(Request::new(request)).await),
            Some(Code::InvalidArgument)
        );
        let request = pb::HistoryRequest {
            room: "bad/room".into(),
            since: None,
            limit: 0,
        };
        assert_eq!(
            code(service.history(Request::new(request)).await),
            Some(Code::InvalidArgument)
        );
        let request = pb::GatewayHeartbeatRequest {
            gateway_id: String::new(),
            connections: 1,
            lease_ms: 0,
        };
        assert_eq!(
            code(service.gateway_heartbeat(Request::new(request)).await),
            Some(Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn publish_join_history_and_close() {
        let (service, broker) = service(None);
        let (_sub, seen) = listen(&broker, "rc:room:r").await;
        let joined = service
            .join(Request::new(join_request("r", "c1")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((joined.offset, joined.recovered), (0, None));
        // Surrounding whitespace is dropped so the frame stays compact.
        let published = service
            .publish(publish_request("r", " {\"a\": 1} "))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (published.offset, published.epoch.as_str()),
            (1, joined.epoch.as_str())
        );
        service.publish(publish_request("r", "2")).await.unwrap();
        let mut request = join_request("r", "c2");
        request.since = Some(pb::Position {
            epoch: joined.epoch.clone(),
            offset: 0,
        });
        let rejoined = service
            .join(Request::new(request))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rejoined.recovered, Some(true));
        assert_eq!(
            rejoined.missed.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(rejoined.missed[0].data_json, "{\"a\": 1}");
        let history = service
            .history(Request::new(pb::HistoryRequest {
                room: "r".into(),
                since: Some(1),
                limit: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((history.offset, history.publications.len()), (2, 1));
        let presence = service
            .presence(Request::new(pb::PresenceRequest { room: "r".into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(presence.members.len(), 2);
        let closed = pb::ConnectionClosedRequest {
            client_id: "c1".into(),
            user: "alice".into(),
            gateway_id: "gw1".into(),
            rooms: vec!["r".into(), "not a room".into(), "other".into()],
        };
        service
            .connection_closed(Request::new(closed))
            .await
            .unwrap();
        let presence = service
            .presence(Request::new(pb::PresenceRequest { room: "r".into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            presence
                .members
                .iter()
                .map(|m| m.client_id.as_str())
                .collect::<Vec<_>>(),
            vec!["c2"]
        );
        let kinds: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                Envelope::Message { .. } => "message".to_owned(),
                Envelope::Event { frame, .. } => {
                    let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
                    v["type"].as_str().unwrap().to_owned()
                }
                Envelope::Control(_) => "control".to_owned(),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                "member_joined",
                "message",
                "message",
                "member_joined",
                "member_left"
            ]
        );
    }

    #[tokio::test]
    async fn server_api_requires_the_key() {
        let stats = || pb::ClusterStatsRequest {};
        let (disabled, _) = service(None);
        let status = disabled.cluster_stats(authed(stats())).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "server API disabled: API_KEY not set");
        let (empty, _) = service(Some(""));
        assert_eq!(
            empty
                .cluster_stats(authed(stats()))
                .await
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );

        let (service, _) = service(Some(KEY));
        assert_eq!(
            code(service.cluster_stats(Request::new(stats())).await),
            Some(Code::Unauthenticated)
        );
        for bad in [
            "Bearer wrong",
            "Bearer s3cret-ke",
            "Bearer s3cret-key2",
            "Basic s3cret-key",
            "s3cret-key",
            "Bearer ",
        ] {
            assert_eq!(
                code(service.cluster_stats(with_key(stats(), bad)).await),
                Some(Code::Unauthenticated),
                "{bad}"
            );
        }
        assert!(
            service
                .cluster_stats(with_key(stats(), &format!("bearer  {KEY} ")))
                .await
                .is_ok()
        );
        assert!(service.cluster_stats(authed(stats())).await.is_ok());
        let request = pb::ServerPublishRequest {
            room: "r".into(),
            data_json: "1".into(),
            user: String::new(),
        };
        assert_eq!(
            code(service.server_publish(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
        let request = pb::PresenceRequest { room: "r".into() };
        assert_eq!(
            code(service.server_presence(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
        let request = pb::HistoryRequest {
            room: "r".into(),
            since: None,
            limit: 0,
        };
        assert_eq!(
            code(service.server_history(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
        let request = pb::RoomStatsRequest { room: "r".into() };
        assert_eq!(
            code(service.room_stats(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
        let request = pb::DisconnectRequest {
            user: "u".into(),
            ..Default::default()
        };
        assert_eq!(
            code(service.disconnect(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
        let request = pb::BroadcastRequest {
            rooms: vec!["r".into()],
            data_json: "1".into(),
            user: String::new(),
        };
        assert_eq!(
            code(service.broadcast(Request::new(request)).await),
            Some(Code::Unauthenticated)
        );
    }

    #[tokio::test]
    async fn server_publish_broadcast_and_stats() {
        let (service, broker) = service(Some(KEY));
        let (_sub, seen) = listen(&broker, "rc:room:a").await;
        let request = pb::ServerPublishRequest {
            room: "a".into(),
            data_json: "{}".into(),
            user: String::new(),
        };
        let published = service
            .server_publish(authed(request))
            .await
            .unwrap()
            .into_inner();
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
        };
        assert_eq!(
            service.broadcast(authed(request)).await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let request = pb::BroadcastRequest {
            rooms: vec!["a".into()],
            data_json: "nope".into(),
            user: String::new(),
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
            let request = pb::GatewayHeartbeatRequest {
                gateway_id: gateway_id.into(),
                connections,
                lease_ms: 0,
            };
            service
                .gateway_heartbeat(Request::new(request))
                .await
                .unwrap();
        }
        let cluster = service
            .cluster_stats(authed(pb::ClusterStatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((cluster.gateways.len(), cluster.connections), (2, 7));
    }

    #[tokio::test]
    async fn disconnect_publishes_a_control_command() {
        let (service, broker) = service(Some(KEY));
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
                    code: 1008,
                    reason: "bye".into()
                }),
                Envelope::Control(Control::Disconnect {
                    user: String::new(),
                    client_id: "c9".into(),
                    code: 4001,
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

    #[tokio::test]
    async fn an_unreachable_store_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = Store::redis(
            &format!("redis://127.0.0.1:{port}"),
            HistoryLimits::default(),
        )
        .unwrap();
        let service = RoomServiceImpl::new(store, ServiceOptions::default());
        let status = service
            .publish(publish_request("r", "1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn bearer_and_constant_time_compare() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc "), Some("abc"));
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Token abc"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
