//! The internal gRPC `RoomService` (called by gateways): validation and mapping between proto
//! messages and the store. Its credential is checked before any handler runs (see
//! [`crate::serve`]).

use std::sync::Arc;
use std::time::Duration;

use roomcast_common::error_code::ErrorCode;
use roomcast_common::room::validate_room_name;
use roomcast_proto as pb;
use roomcast_proto::room_service_server::RoomService;
use serde_json::value::RawValue;
use tonic::{Request, Response, Status};

use crate::store::{
    ConnectionOpening, Joiner, Once, Position, PublishItem, SharedStore, Store, StoreError,
    StoredMessage,
};

/// Longest accepted client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Longest accepted user id, in bytes.
pub const MAX_USER_LEN: usize = 256;
/// Longest accepted gateway id, in bytes.
pub const MAX_GATEWAY_ID_LEN: usize = 256;
/// Lease used when a heartbeat does not say.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Longest lease a heartbeat may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

/// Largest answer of one paged call (history, recovery), in bytes of message content: well
/// inside tonic's default 4 MiB message limit, which stays in force on both ends. A page holds
/// at least one message, and one message is at most `MAX_DATA_BYTES` (3 MiB at most).
pub const PAGE_BYTES: usize = 1024 * 1024;
/// Longest accepted idempotency key as the caller scoped it, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 512;
/// Most publishes in one `PublishBatch`.
pub const MAX_BATCH_LEN: usize = 1024;

/// Settings of the service itself (the store has its own).
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The key the server API requires; `None` (or empty) switches the server API off.
    pub api_key: Option<String>,
    /// The credential of internal calls (`RoomService`); `None` refuses every internal call.
    pub internal_token: Option<String>,
    /// Largest accepted `data_json`, in bytes.
    pub max_data_bytes: usize,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            api_key: None,
            internal_token: None,
            max_data_bytes: 64 * 1024,
            idempotency_window: Duration::from_secs(300),
        }
    }
}

/// The checks of one `ConnectionOpened`, before the store counts it.
fn check_connection_opened(request: &pb::ConnectionOpenedRequest) -> Result<(), Status> {
    check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, true)?;
    check_user(&request.user, true)?;
    check_id("gateway_id", &request.gateway_id, MAX_GATEWAY_ID_LEN, true)
}

/// The answer to one `ConnectionOpened` from the store's count.
fn connection_counted(
    counted: Result<Result<u64, u64>, StoreError>,
) -> Result<pb::ConnectionOpenedResponse, Status> {
    match counted.map_err(store_status)? {
        Ok(connections) => Ok(pb::ConnectionOpenedResponse { connections }),
        Err(held) => Err(ErrorCode::RateLimited.status(format!(
            "user holds {held} connections, the limit across the cluster"
        ))),
    }
}

/// The internal `RoomService` implementation; cheap to clone. The server API
/// ([`crate::server_api::ServerApiImpl`]) is built on the same parts.
#[derive(Clone)]
pub struct RoomServiceImpl {
    store: SharedStore,
    options: Arc<ServiceOptions>,
}

impl RoomServiceImpl {
    async fn connection_opened_one(
        &self,
        request: pb::ConnectionOpenedRequest,
    ) -> Result<pb::ConnectionOpenedResponse, Status> {
        check_connection_opened(&request)?;
        let counted = self
            .store
            .connection_opened(
                &request.user,
                &request.client_id,
                &request.gateway_id,
                request.max_per_user,
            )
            .await;
        connection_counted(counted)
    }

    async fn connection_closed_one(
        &self,
        request: pb::ConnectionClosedRequest,
    ) -> Result<pb::ConnectionClosedResponse, Status> {
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, true)?;
        check_user(&request.user, false)?;
        // Try every room even when one fails; leaving is idempotent, so the caller may retry.
        let mut first_error = None;
        if !request.user.is_empty()
            && let Err(error) = self
                .store
                .connection_closed(&request.user, &request.client_id)
                .await
        {
            first_error = Some(error);
        }
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
            None => Ok(pb::ConnectionClosedResponse {}),
        }
    }

    pub fn new(store: SharedStore, options: ServiceOptions) -> Self {
        RoomServiceImpl {
            store,
            options: Arc::new(options),
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// Validates `data_json`: at most `max_data_bytes`, and valid JSON. Returns it without
    /// surrounding whitespace, ready to embed in a frame.
    pub(crate) fn check_data<'a>(&self, data_json: &'a str) -> Result<&'a str, Status> {
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

    /// Publishes; with a non-empty `idempotency_key` (already scoped by the caller), at most
    /// once per key within the idempotency window.
    pub(crate) async fn publish_checked(
        &self,
        room: &str,
        user: &str,
        client_id: &str,
        data_json: &str,
        idempotency_key: &str,
        first_try: bool,
    ) -> Result<pb::PublishResponse, Status> {
        let once = self.once(idempotency_key, first_try)?;
        let published = self
            .store
            .publish_once(room, user, client_id, data_json, once)
            .await
            .map_err(store_status)?;
        published_total().increment(1);
        Ok(pb::PublishResponse {
            epoch: published.epoch,
            offset: published.offset,
        })
    }

    /// Stores a batch's valid publishes in one ordered store call. `checked` holds, for each
    /// publish in order, its item or why it was refused; one outcome each comes back, in order.
    pub(crate) async fn publish_items(
        &self,
        checked: Vec<Result<PublishItem<'_>, Status>>,
    ) -> Vec<Result<pb::PublishResponse, Status>> {
        let items: Vec<PublishItem<'_>> = checked.iter().filter_map(|c| c.clone().ok()).collect();
        let stored = if items.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.publish_many(&items).await.map_err(store_status)
        };
        if stored.is_ok() {
            published_total().increment(items.len() as u64);
        }
        let mut stored = stored.map(Vec::into_iter);
        checked
            .into_iter()
            .map(|check| match (check, &mut stored) {
                (Err(status), _) => Err(status),
                (Ok(_), Err(status)) => Err(status.clone()),
                (Ok(_), Ok(stored)) => stored
                    .next()
                    .map(|p| pb::PublishResponse {
                        epoch: p.epoch,
                        offset: p.offset,
                    })
                    .ok_or_else(|| Status::internal("the store gave fewer results")),
            })
            .collect()
    }

    /// The idempotency of a publish with `key` (none when empty). Keys a gateway made up for
    /// its own retries are kept only as long as such a retry can come; on its `first_try` such
    /// a key was never used, so there is nothing to look up.
    pub(crate) fn once<'k>(
        &self,
        key: &'k str,
        first_try: bool,
    ) -> Result<Option<Once<'k>>, Status> {
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(Status::invalid_argument(format!(
                "idempotency key is longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
        let retry_key = key.starts_with(roomcast_common::RETRY_KEY_PREFIX);
        let window = if retry_key {
            self.options
                .idempotency_window
                .min(roomcast_common::RETRY_KEY_WINDOW)
        } else {
            self.options.idempotency_window
        };
        Ok((!key.is_empty()).then_some(Once {
            key,
            window,
            unused: retry_key && first_try,
        }))
    }

    pub(crate) async fn presence_of(
        &self,
        request: pb::PresenceRequest,
    ) -> Result<pb::PresenceResponse, Status> {
        check_room(&request.room)?;
        if !self.store.namespaces().of(&request.room).presence {
            return Err(ErrorCode::Forbidden.status("presence is off in this room's namespace"));
        }
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

    /// One page of history: at most `limit` messages and about [`PAGE_BYTES`]; `more` says
    /// the page stopped short of `limit` for size.
    pub(crate) async fn history_of(
        &self,
        request: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, Status> {
        check_room(&request.room)?;
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let page = self
            .store
            .history(&request.room, request.since, limit)
            .await
            .map_err(store_status)?;
        let (publications, more) = paged(page.messages);
        Ok(pb::HistoryResponse {
            epoch: page.epoch,
            offset: page.offset,
            publications,
            more,
        })
    }
}

impl RoomServiceImpl {
    /// One client publish, validated.
    async fn publish_one(
        &self,
        request: &pb::PublishRequest,
    ) -> Result<pb::PublishResponse, Status> {
        let data = self.check_publish(request)?;
        self.publish_checked(
            &request.room,
            &request.user,
            &request.client_id,
            data,
            &request.idempotency_key,
            request.first_try,
        )
        .await
    }

    /// Validates a client publish; returns its data, trimmed.
    fn check_publish<'a>(&self, request: &'a pb::PublishRequest) -> Result<&'a str, Status> {
        check_room(&request.room)?;
        check_id("client_id", &request.client_id, MAX_CLIENT_ID_LEN, false)?;
        check_user(&request.user, false)?;
        if !self.store.namespaces().of(&request.room).client_publish {
            return Err(ErrorCode::Forbidden.status(
                "clients may not publish in this room's namespace; only the server API does",
            ));
        }
        self.check_data(&request.data_json)
    }
}

/// Cuts `messages` to one transport-safe page: whole messages up to [`PAGE_BYTES`], at least
/// one. Returns the page and whether messages were left out.
pub(crate) fn paged(messages: Vec<StoredMessage>) -> (Vec<pb::Publication>, bool) {
    let mut bytes = 0usize;
    let mut page = Vec::new();
    let total = messages.len();
    for message in messages {
        // Field tags, lengths and the offset: a generous per-message allowance.
        let size = message.data_json.len() + message.user.len() + message.client_id.len() + 32;
        if !page.is_empty() && bytes + size > PAGE_BYTES {
            break;
        }
        bytes += size;
        page.push(publication(message));
    }
    let more = page.len() < total;
    (page, more)
}

/// One outcome of a batch as `PublishBatchResponse` carries it.
pub(crate) fn publish_result(outcome: Result<pb::PublishResponse, Status>) -> pb::PublishResult {
    pb::PublishResult {
        outcome: Some(match outcome {
            Ok(published) => pb::publish_result::Outcome::Published(published),
            Err(status) => pb::publish_result::Outcome::Error(pb::PublishError {
                code: status.code() as i32,
                message: status.message().to_owned(),
            }),
        }),
    }
}

/// A publish batch holds at most [`MAX_BATCH_LEN`] publishes.
pub(crate) fn check_batch_len(len: usize) -> Result<(), Status> {
    if len > MAX_BATCH_LEN {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH_LEN} publishes per batch"
        )));
    }
    Ok(())
}

pub(crate) fn check_room(room: &str) -> Result<(), Status> {
    validate_room_name(room).map_err(|e| Status::invalid_argument(format!("room {room:?}: {e}")))
}

/// An id that travels in broker envelope headers: non-empty when `required`, bounded, and free
/// of whitespace and control characters (a newline would break the envelope).
pub(crate) fn check_id(what: &str, id: &str, max: usize, required: bool) -> Result<(), Status> {
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

pub(crate) fn check_user(user: &str, required: bool) -> Result<(), Status> {
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

/// `roomcast_room_published_total`, counted once per call.
fn published_total() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    roomcast_common::ops::cached(&COUNTER, || {
        metrics::counter!("roomcast_room_published_total")
    })
}

pub(crate) fn store_status(error: StoreError) -> Status {
    if matches!(error, StoreError::Unsure) {
        // Not retried by the gateway (a transport failure is): the client hears `unavailable`,
        // as when every try failed, and the outcome is unknown either way.
        tracing::warn!(%error, "publish not retried");
        Status::aborted(error.to_string())
    } else if error.is_transient() {
        metrics::counter!("roomcast_room_store_errors_total", "kind" => "unavailable").increment(1);
        tracing::warn!(%error, "store unavailable");
        Status::unavailable(error.to_string())
    } else {
        metrics::counter!("roomcast_room_store_errors_total", "kind" => "internal").increment(1);
        tracing::error!(%error, "store error");
        Status::internal(error.to_string())
    }
}

pub(crate) fn publication(message: StoredMessage) -> pb::Publication {
    pb::Publication {
        offset: message.offset,
        user: message.user,
        client_id: message.client_id,
        data_json: message.data_json,
    }
}

/// A batch call carries at most [`pb::MAX_BATCH`] requests.
fn check_batch(len: usize) -> Result<(), Status> {
    if len > pb::MAX_BATCH {
        return Err(ErrorCode::BadRequest.status(format!(
            "{len} requests in one call; at most {}",
            pb::MAX_BATCH
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl RoomService for RoomServiceImpl {
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
        let (missed, more) = paged(joined.missed);
        Ok(Response::new(pb::JoinResponse {
            epoch: joined.epoch,
            offset: joined.offset,
            recovered: joined.recovered,
            missed,
            more,
        }))
    }

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

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.publish_one(request.get_ref()).await.map(Response::new)
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let publishes = request.into_inner().publishes;
        check_batch_len(publishes.len())?;
        let keys: Vec<_> = publishes
            .iter()
            .map(|publish| self.once(&publish.idempotency_key, publish.first_try))
            .collect();
        let checked = publishes
            .iter()
            .zip(keys)
            .map(|(publish, once)| {
                let data_json = self.check_publish(publish)?;
                Ok(PublishItem {
                    room: &publish.room,
                    user: &publish.user,
                    client_id: &publish.client_id,
                    data_json,
                    once: once?,
                })
            })
            .collect();
        let outcomes = self.publish_items(checked).await;
        Ok(Response::new(pb::PublishBatchResponse {
            results: outcomes.into_iter().map(publish_result).collect(),
        }))
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        self.presence_of(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.history_of(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn connection_opened(
        &self,
        request: Request<pb::ConnectionOpenedRequest>,
    ) -> Result<Response<pb::ConnectionOpenedResponse>, Status> {
        self.connection_opened_one(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn connection_closed(
        &self,
        request: Request<pb::ConnectionClosedRequest>,
    ) -> Result<Response<pb::ConnectionClosedResponse>, Status> {
        self.connection_closed_one(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn connections_opened(
        &self,
        request: Request<pb::ConnectionsOpenedRequest>,
    ) -> Result<Response<pb::ConnectionsOpenedResponse>, Status> {
        let connections = request.into_inner().connections;
        check_batch(connections.len())?;
        // The valid ones are counted together: one round trip to the store for the batch.
        let checked: Vec<Result<(), Status>> =
            connections.iter().map(check_connection_opened).collect();
        let openings: Vec<ConnectionOpening<'_>> = connections
            .iter()
            .zip(&checked)
            .filter(|(_, check)| check.is_ok())
            .map(|(c, _)| ConnectionOpening {
                user: &c.user,
                client_id: &c.client_id,
                gateway: &c.gateway_id,
                limit: c.max_per_user,
            })
            .collect();
        let mut counted = self.store.connections_opened(&openings).await.into_iter();
        let results: Vec<Result<pb::ConnectionOpenedResponse, Status>> = checked
            .into_iter()
            .map(|check| {
                check?;
                connection_counted(
                    counted
                        .next()
                        .unwrap_or_else(|| Err(StoreError::Malformed("a count short".into()))),
                )
            })
            .collect();
        let outcomes = results
            .into_iter()
            .map(|result| pb::ConnectionOpenedOutcome {
                status: Some(pb::ItemStatus::of(&result)),
                connections: result.map_or(0, |r| r.connections),
            })
            .collect();
        Ok(Response::new(pb::ConnectionsOpenedResponse { outcomes }))
    }

    async fn connections_closed(
        &self,
        request: Request<pb::ConnectionsClosedRequest>,
    ) -> Result<Response<pb::ConnectionsClosedResponse>, Status> {
        let connections = request.into_inner().connections;
        check_batch(connections.len())?;
        let results = futures_util::future::join_all(
            connections
                .into_iter()
                .map(|c| self.connection_closed_one(c)),
        )
        .await;
        let outcomes = results.iter().map(pb::ItemStatus::of).collect();
        Ok(Response::new(pb::ConnectionsClosedResponse { outcomes }))
    }

    async fn gateway_heartbeat(
        &self,
        request: Request<pb::GatewayHeartbeatRequest>,
    ) -> Result<Response<pb::GatewayHeartbeatResponse>, Status> {
        let request = request.into_inner();
        check_id("gateway_id", &request.gateway_id, MAX_GATEWAY_ID_LEN, true)?;
        check_id("version", &request.version, MAX_GATEWAY_ID_LEN, false)?;
        let lease = match request.lease_ms {
            0 => DEFAULT_LEASE,
            ms => Duration::from_millis(ms).min(MAX_LEASE),
        };
        self.store
            .gateway_heartbeat(
                &request.gateway_id,
                request.connections,
                lease,
                &request.version,
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::GatewayHeartbeatResponse {}))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use roomcast_common::broker::{BrokerEvent, MemoryBroker, Sink, Subscriber};
    use roomcast_common::envelope::{Envelope, decode};
    use tonic::Code;

    use super::*;
    use crate::store::{HistoryLimits, MemoryStore, RedisStore};

    /// A publish history cannot settle is not retried by the gateway (ABORTED is not a
    /// transport failure) and reaches the client as `unavailable`.
    #[test]
    fn an_unsure_retry_is_aborted() {
        let status = store_status(StoreError::Unsure);
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(ErrorCode::from_grpc(status.code()), ErrorCode::Unavailable);
    }

    pub(crate) fn service(api_key: Option<&str>) -> (RoomServiceImpl, MemoryBroker) {
        let broker = MemoryBroker::new();
        let store = Arc::new(MemoryStore::new(broker.clone(), HistoryLimits::default()));
        let options = ServiceOptions {
            api_key: api_key.map(str::to_owned),
            max_data_bytes: 32,
            ..Default::default()
        };
        (RoomServiceImpl::new(store, options), broker)
    }

    /// The error code of a call, `None` when it succeeded.
    pub(crate) fn code<T>(result: Result<T, Status>) -> Option<Code> {
        result.err().map(|s| s.code())
    }

    fn publish_request(room: &str, data_json: &str) -> Request<pb::PublishRequest> {
        Request::new(pb::PublishRequest {
            room: room.into(),
            client_id: "c1".into(),
            user: "alice".into(),
            data_json: data_json.into(),
            idempotency_key: String::new(),
            first_try: false,
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

    pub(crate) async fn listen(
        broker: &MemoryBroker,
        channel: &str,
    ) -> (Box<dyn Subscriber>, Arc<Mutex<Vec<Envelope>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let sink: Sink = Arc::new(move |event| {
            if let BrokerEvent::Message { payload, .. } = event {
                seen2.lock().unwrap().push(decode(payload).unwrap());
            }
        });
        let subscriber: Box<dyn Subscriber> = Box::new(broker.subscriber(sink));
        subscriber.subscribe(channel).await.unwrap();
        (subscriber, seen)
    }

    #[tokio::test]
    async fn batched_connection_calls_answer_each_request_as_alone() {
        let (service, _) = service(None);
        let opened = |client: &str, user: &str| pb::ConnectionOpenedRequest {
            client_id: client.into(),
            user: user.into(),
            gateway_id: "gw1".into(),
            max_per_user: 2,
        };
        let batch = vec![
            opened("c1", "alice"),
            opened("c2", "alice"),
            opened("c3", "alice"),
            opened("bad id", "bob"),
            opened("c4", "bob"),
        ];
        let outcomes = service
            .connections_opened(Request::new(pb::ConnectionsOpenedRequest {
                connections: batch,
            }))
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        let codes: Vec<Code> = outcomes
            .iter()
            .map(|o| Code::from_i32(o.status.as_ref().unwrap().code))
            .collect();
        // alice's third connection is over her limit of 2: only it fails, and the bad id.
        assert_eq!(
            codes,
            [
                Code::Ok,
                Code::Ok,
                Code::ResourceExhausted,
                Code::InvalidArgument,
                Code::Ok
            ]
        );
        assert_eq!(outcomes[1].connections, 2);
        assert_eq!(outcomes[4].connections, 1);

        let closed = |client: &str| pb::ConnectionClosedRequest {
            client_id: client.into(),
            user: "alice".into(),
            gateway_id: "gw1".into(),
            rooms: vec![],
        };
        let outcomes = service
            .connections_closed(Request::new(pb::ConnectionsClosedRequest {
                connections: vec![closed("c1"), closed("a b")],
            }))
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes[0].clone().into_result().is_ok());
        assert_eq!(
            outcomes[1].clone().into_result().unwrap_err().code(),
            Code::InvalidArgument
        );
        // c1 is gone: alice has room for one more.
        let again = service
            .connection_opened(Request::new(opened("c5", "alice")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.connections, 2);

        let too_many = vec![opened("c", "alice"); pb::MAX_BATCH + 1];
        let status = service
            .connections_opened(Request::new(pb::ConnectionsOpenedRequest {
                connections: too_many,
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
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
            version: String::new(),
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
    async fn an_unreachable_store_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = Arc::new(
            RedisStore::new(
                &format!("redis://127.0.0.1:{port}"),
                HistoryLimits::default(),
            )
            .unwrap(),
        );
        let service = RoomServiceImpl::new(store, ServiceOptions::default());
        let status = service
            .publish(publish_request("r", "1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn a_repeated_idempotency_key_is_stored_once() {
        let (service, broker) = service(None);
        let (_sub, seen) = listen(&broker, "rc:room:r").await;
        let keyed = |data: &str, key: &str| {
            let mut request = publish_request("r", data);
            request.get_mut().idempotency_key = key.into();
            request
        };
        let first = service
            .publish(keyed("1", "k1"))
            .await
            .unwrap()
            .into_inner();
        let again = service
            .publish(keyed("1", "k1"))
            .await
            .unwrap()
            .into_inner();
        let other = service
            .publish(keyed("2", "k2"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((first.offset, again.offset, other.offset), (1, 1, 2));
        assert_eq!(first.epoch, again.epoch);
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "the repeat was not broadcast"
        );
        let too_long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
        assert_eq!(
            code(service.publish(keyed("3", &too_long)).await),
            Some(Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn large_recovery_and_history_come_in_pages() {
        let broker = MemoryBroker::new();
        let store = Arc::new(MemoryStore::new(broker, HistoryLimits::default()));
        let options = ServiceOptions {
            max_data_bytes: 20 * 1024,
            ..Default::default()
        };
        let service = RoomServiceImpl::new(store, options);
        let data = format!("\"{}\"", "x".repeat(10 * 1024));
        for _ in 0..300 {
            service.publish(publish_request("r", &data)).await.unwrap();
        }
        let mut request = join_request("r", "c2");
        let epoch = service
            .history(Request::new(pb::HistoryRequest {
                room: "r".into(),
                since: Some(300),
                limit: 0,
            }))
            .await
            .unwrap()
            .into_inner()
            .epoch;
        request.since = Some(pb::Position { epoch, offset: 0 });
        let joined = service
            .join(Request::new(request))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(joined.recovered, Some(true));
        assert!(joined.more);
        let mut got: Vec<u64> = joined.missed.iter().map(|p| p.offset).collect();
        assert!(got.len() < 300 && !got.is_empty());
        let mut pages = 1;
        let mut more = true;
        while more {
            let page = service
                .history(Request::new(pb::HistoryRequest {
                    room: "r".into(),
                    since: got.last().copied(),
                    limit: 0,
                }))
                .await
                .unwrap()
                .into_inner();
            let bytes: usize = page.publications.iter().map(|p| p.data_json.len()).sum();
            assert!(bytes <= PAGE_BYTES, "{bytes}");
            got.extend(page.publications.iter().map(|p| p.offset));
            more = page.more;
            pages += 1;
        }
        assert_eq!(got, (1..=300).collect::<Vec<_>>());
        assert!(pages >= 3, "{pages}");
    }

    #[tokio::test]
    async fn a_batch_is_stored_in_order_with_a_result_each() {
        let (service, broker) = service(None);
        let (_sub, seen) = listen(&broker, "rc:room:r").await;
        let publishes = ["1", "{", "2", "3"]
            .into_iter()
            .map(|data| publish_request("r", data).into_inner())
            .collect();
        let results = service
            .publish_batch(Request::new(pb::PublishBatchRequest { publishes }))
            .await
            .unwrap()
            .into_inner()
            .results;
        let outcomes: Vec<Result<u64, i32>> = results
            .into_iter()
            .map(|r| match r.outcome.unwrap() {
                pb::publish_result::Outcome::Published(p) => Ok(p.offset),
                pb::publish_result::Outcome::Error(e) => Err(e.code),
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![Ok(1), Err(Code::InvalidArgument as i32), Ok(2), Ok(3)]
        );
        let data: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Envelope::Message { frame, .. } => {
                    let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
                    Some(v["data"].to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(data, ["1", "2", "3"]);
        let too_many = (0..=MAX_BATCH_LEN)
            .map(|_| publish_request("r", "1").into_inner())
            .collect();
        assert_eq!(
            code(
                service
                    .publish_batch(Request::new(pb::PublishBatchRequest {
                        publishes: too_many
                    }))
                    .await
            ),
            Some(Code::InvalidArgument)
        );
    }
}
