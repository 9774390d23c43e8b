//! One WebSocket connection: a reader that handles client commands one at a time (so a
//! `publish` sent after a `join` sees the join), and a writer that owns the socket's sending
//! half, the server pings, and each room's delivery cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use roomcast_common::close_code::CloseCode;
use roomcast_common::error_code::ErrorCode;
use roomcast_common::telemetry::TRACING_ONLY;
use roomcast_proto as pb;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::Instrument as _;

use crate::hub::{ConnHandle, Local, Outbound, ServerCommand};
use crate::limits::{TokenBucket, UserSlot};
use crate::pipeline::Publishes;
use crate::protocol::{self, Command, Heartbeat, Member, Position, ServerFrame};
use crate::socket::{self, ReadSide};
use crate::state::Gateway;

/// Frames written to the socket per flush at most, so one busy connection cannot hog its task.
const MAX_BATCH: usize = 64;

/// How long a closing connection waits for its publishes in flight to be answered.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// What the handshake established about the client.
pub struct Authenticated {
    /// Chosen at the handshake: the cluster-wide per-user count records it.
    pub client_id: Arc<str>,
    pub user: String,
    pub token: String,
    /// Token expiry, unix seconds.
    pub expires_at: i64,
    /// This connection's place in the per-user count; given back when the connection ends.
    pub slot: UserSlot,
    /// Whether the room-service counted it against the user's limit across the cluster; then
    /// its end must be reported even when it joined no room.
    pub counted: bool,
}

/// Read buffer per connection, allocated for every connection: small, since most frames are
/// small and idle connections are the common case (tungstenite's default is 128 KiB; 4 KiB
/// cost 3.2 KB more RSS per idle connection than this, measured with `loadgen connections`).
/// Larger frames still arrive whole: the buffer grows to the frame's announced length.
const READ_BUFFER_BYTES: usize = 256;

/// Runs a connection from its upgrade to its end, then removes every trace of it.
///
/// Most of a connection's memory is this future, held for as long as the connection is open:
/// what only the set-up needs lives in a boxed future freed before the first read, and the
/// arguments sit in one box (an async function's arguments would keep their space for its
/// whole run).
pub fn run(
    on_upgrade: OnUpgrade,
    gateway: Arc<Gateway>,
    auth: Authenticated,
) -> impl Future<Output = ()> + Send + 'static {
    let setup = Box::new((on_upgrade, gateway, auth));
    async move {
        let Some((mut reader, mut stream, writer)) = Box::pin(start(setup)).await else {
            return;
        };
        reader.read_loop(&mut stream).await;
        // Publishes already read are stored and answered before the close (bounded like any
        // command in flight).
        let _ = tokio::time::timeout(FLUSH_LIMIT, Box::pin(reader.flush_publishes())).await;
        reader.conn.shut();
        reader.conn.reader_finished();
        reader.cleanup().await;
        let _ = writer.await;
        reader.gateway.hub.remove_connection(&reader.conn.client_id);
        metrics::gauge!("roomcast_gateway_connections").decrement(1);
        drop(reader);
        Box::pin(linger(stream.into_inner())).await;
    }
}

/// Waits for the upgrade, registers the connection, sends `connected` and starts the writer.
async fn start(
    setup: Box<(OnUpgrade, Arc<Gateway>, Authenticated)>,
) -> Option<(
    Reader,
    WebSocketStream<ReadSide>,
    tokio::task::JoinHandle<()>,
)> {
    let (on_upgrade, gateway, auth) = *setup;
    let (socket, pre_read) = match socket::upgraded(on_upgrade).await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            if auth.counted {
                report_closed(&gateway, &auth.client_id, &auth.user, Vec::new());
            }
            return None;
        }
    };
    let client_id = auth.client_id.clone();
    let user: Arc<str> = Arc::from(auth.user.as_str());
    let conn = Arc::new(ConnHandle::new(
        client_id.clone(),
        user.clone(),
        gateway.settings.outbound_queue_len,
    ));
    gateway.hub.add_connection(conn.clone());
    metrics::gauge!("roomcast_gateway_connections").increment(1);

    let connected = ServerFrame::Connected {
        client_id: &client_id,
        user: &user,
        gateway: &gateway.id,
        heartbeat: Heartbeat {
            interval_ms: gateway.settings.heartbeat_interval_ms,
            timeout_ms: gateway.settings.heartbeat_timeout_ms,
        },
    };
    conn.reply(Outbound::frame(connected.to_json())).await;

    // A copy of just these bytes: `pre_read` is a slice of the HTTP layer's 8 KiB read buffer,
    // which it would keep alive for the connection's lifetime.
    let pre_read_copy = pre_read[..].to_vec();
    drop(pre_read);
    let (read, write) = socket.into_split();
    let max = gateway.settings.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_frame_size(Some(max))
        .max_message_size(Some(max));
    let stream = WebSocketStream::from_partially_read(
        ReadSide::new(read, conn.clone()),
        pre_read_copy,
        Role::Server,
        Some(config),
    )
    .await;
    let writer = tokio::spawn(write_loop(
        write,
        conn.clone(),
        gateway.settings.outbound_queue_len,
        gateway.settings.write_delay(),
    ));
    let settings = &gateway.settings;
    let reader = Reader {
        publish_bucket: TokenBucket::new(settings.publish_rate, f64::from(settings.publish_burst)),
        read_bucket: TokenBucket::new(settings.read_rate, f64::from(settings.read_burst)),
        gateway: gateway.clone(),
        conn,
        rooms: HashMap::new(),
        token: auth.token,
        expires_at: auth.expires_at,
        refused_in_a_row: 0,
        publish_count: 0,
        counted: auth.counted,
        publishes: Publishes::default(),
        _slot: auth.slot,
    };
    Some((reader, stream, writer))
}

/// After the writer sent its last frame and shut its half: read and discard what the client
/// still sends (pongs, its close reply) until it closes too, for at most a second. Closing a
/// socket with unread input makes the kernel send a reset, which can overtake the close frame
/// and the last messages still on their way to the client.
async fn linger(read: ReadSide) {
    use tokio::io::AsyncReadExt;
    let mut read = read.into_inner();
    let mut sink = [0u8; 512];
    let drained = async {
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
}

/// The idempotency key a publish travels with. A client's own key is scoped to its user (two
/// users cannot collide or block each other); without one, the gateway numbers the
/// connection's publishes, so its own retry on another room-service instance (after a
/// transport failure mid-call) cannot store the message twice.
fn idempotency_key(user: &str, client_id: &str, client_key: Option<&str>, nth: u64) -> String {
    match client_key {
        Some(key) => format!("c:{user}:{key}"),
        None => format!("{}{client_id}:{nth}", roomcast_common::RETRY_KEY_PREFIX),
    }
}

/// Who asked for a join: the client, or a backend through the server API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joining {
    Client,
    Server,
}

/// What a connection may do in a room it joined.
struct Joined {
    can_publish: bool,
}

struct Reader {
    gateway: Arc<Gateway>,
    conn: Arc<ConnHandle>,
    rooms: HashMap<Arc<str>, Joined>,
    /// The current token, presented to the auth service on every join.
    token: String,
    expires_at: i64,
    publish_bucket: TokenBucket,
    /// Reads (`join`, `presence`, `history`): each costs the backends a call, so a client
    /// cannot loop them for free. Refused reads never close the connection.
    read_bucket: TokenBucket,
    /// Publishes refused by the rate limit since the last accepted one.
    refused_in_a_row: u32,
    /// Publishes sent on; numbers the idempotency keys the gateway makes up.
    publish_count: u64,
    /// See [`Authenticated::counted`].
    counted: bool,
    /// Publishes on their way to the room-service, in order.
    publishes: Publishes,
    /// This connection's place in the per-user count, given back when the reader is dropped.
    _slot: UserSlot,
}

/// The instant of a unix time, for the expiry timer. Tokens may carry any `exp`: far-future
/// ones are capped (an `Instant` cannot hold them), past ones are now.
fn instant_of_unix(secs: i64) -> Instant {
    const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
    let now = i64::try_from(roomcast_common::unix_millis()).unwrap_or(i64::MAX);
    let left = secs.saturating_mul(1000).saturating_sub(now).max(0);
    let left = Duration::from_millis(u64::try_from(left).unwrap_or(0)).min(MAX_WAIT);
    Instant::now() + left
}

/// The `error` frame for a failed backend call.
pub(crate) fn error_frame(id: Option<u64>, status: &tonic::Status) -> Utf8Bytes {
    let code = ErrorCode::from_grpc(status.code());
    let message = if code == ErrorCode::Unavailable {
        "a backend is unavailable; retry"
    } else {
        status.message()
    };
    ServerFrame::Error { id, code, message }.to_json().into()
}

/// The close frame owed for a read error, if the client is still there to get one.
fn close_for(error: &WsError) -> Option<(CloseCode, &'static str)> {
    match error {
        WsError::Capacity(_) => Some((CloseCode::TOO_BIG, "frame too large")),
        WsError::Utf8(_) => Some((CloseCode::INVALID_PAYLOAD, "text frame is not valid UTF-8")),
        // The client dropped the connection: nobody to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((CloseCode::PROTOCOL_ERROR, "protocol violation")),
        _ => None,
    }
}

impl Reader {
    async fn read_loop(&mut self, stream: &mut WebSocketStream<ReadSide>) {
        let timeout = self.gateway.settings.heartbeat_timeout();
        let ping_every = self.gateway.settings.heartbeat_interval();
        // One timer for the three deadlines (the token's expiry, the heartbeat timeout, the
        // next server ping), re-armed rather than made anew: a timer is 112 bytes, kept for
        // as long as the connection is open.
        let timer = tokio::time::sleep(ping_every.min(timeout));
        tokio::pin!(timer);
        let mut silent_until = Instant::now() + timeout;
        let mut next_ping = Instant::now() + ping_every;
        loop {
            let expiry = instant_of_unix(self.expires_at);
            timer
                .as_mut()
                .reset(expiry.min(silent_until).min(next_ping));
            let next = tokio::select! {
                biased;
                () = self.conn.attention() => {
                    if self.conn.is_closed() {
                        return;
                    }
                    for command in self.conn.take_server_commands() {
                        Box::pin(self.server_command(command)).await;
                    }
                    continue;
                }
                done = self.publishes.next_done(), if self.publishes.has_in_flight() => {
                    Box::pin(self.publishes.finish(done, &self.conn, &self.gateway)).await;
                    continue;
                }
                next = stream.next() => next,
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expiry {
                        self.conn.close(CloseCode::TOKEN_EXPIRED, "token expired");
                        return;
                    }
                    if now >= silent_until {
                        // Silent past the timeout: presumed dead, so no close handshake.
                        metrics::counter!("roomcast_gateway_heartbeat_timeouts_total").increment(1);
                        tracing::debug!(client = %self.conn.client_id, "heartbeat timeout");
                        return;
                    }
                    if now >= next_ping {
                        self.conn.send_raw(socket::ping());
                        next_ping = now + ping_every;
                    }
                    continue;
                }
            };
            // Any frame, a pong included, shows the client is alive.
            silent_until = Instant::now() + timeout;
            let message = match next {
                None => return,
                Some(Err(error)) => {
                    if let Some((code, reason)) = close_for(&error) {
                        tracing::debug!(client = %self.conn.client_id, %error, code = code.get(), "closing");
                        self.conn.close(code, reason);
                    }
                    return;
                }
                Some(Ok(message)) => message,
            };
            match message {
                // Boxed: the command futures (gRPC calls) are large, and an idle connection
                // should not carry their space.
                Message::Text(text) => Box::pin(self.handle_text(&text)).await,
                Message::Binary(_) => {
                    Box::pin(self.send_error(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported",
                    ))
                    .await
                }
                Message::Close(_) => {
                    // tungstenite sends its close reply on a flush; it goes to the writer,
                    // which sends it after the replies still owed.
                    let _ = stream.flush().await;
                    return;
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    async fn send(&self, frame: ServerFrame<'_>) {
        self.conn.reply(Outbound::frame(frame.to_json())).await;
    }

    async fn send_error(&self, id: Option<u64>, code: ErrorCode, message: &str) {
        self.send(ServerFrame::Error { id, code, message }).await;
    }

    fn error_frame(id: Option<u64>, status: &tonic::Status) -> Utf8Bytes {
        error_frame(id, status)
    }

    async fn send_status(&self, id: Option<u64>, status: &tonic::Status) {
        self.conn
            .reply(Outbound::frame(Self::error_frame(id, status)))
            .await;
    }

    async fn handle_text(&mut self, text: &str) {
        let request = protocol::parse(text);
        // Only publishes overtake a publish in flight; anything else waits for them, so its
        // reply comes after theirs and it sees what they stored.
        if !matches!(
            request,
            Ok(protocol::Request {
                command: Command::Publish { .. },
                ..
            })
        ) {
            self.flush_publishes().await;
        }
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                metrics::counter!("roomcast_gateway_bad_frames_total").increment(1);
                return self.send_error(error.id, error.code, &error.message).await;
            }
        };
        let id = request.id;
        let is_read = matches!(
            request.command,
            Command::Join { .. } | Command::Presence { .. } | Command::History { .. }
        );
        if is_read && !self.read_bucket.try_take() {
            metrics::counter!("roomcast_gateway_read_rate_limited_total").increment(1);
            let wait = self.read_bucket.wait_hint().as_millis();
            let message = format!("read rate exceeded; retry in {wait} ms");
            return self.send_error(id, ErrorCode::RateLimited, &message).await;
        }
        match request.command {
            Command::Ping => self.send(ServerFrame::Pong { id }).await,
            Command::Join { room, since } => self.join(id, room, since).await,
            Command::Leave { room } => self.leave(id, room).await,
            Command::Publish {
                room,
                data,
                idempotency_key,
            } => {
                self.publish(id, room, data.get(), idempotency_key.as_deref())
                    .await
            }
            Command::Presence { room } => self.presence(id, room).await,
            Command::History { room, since, limit } => self.history(id, room, since, limit).await,
            Command::Refresh { token } => self.refresh(id, token).await,
        }
    }

    /// A server-side subscription change (server API): carried out like the client's own
    /// command, answered with `joined` / `left` without an id. A subscription ignores the
    /// token's room rules (the backend decided); publishing still follows them.
    async fn server_command(&mut self, command: ServerCommand) {
        match command {
            ServerCommand::Subscribe { room } => {
                if !self.rooms.contains_key(room.as_str()) {
                    self.join_as(None, room, None, Joining::Server).await;
                }
            }
            ServerCommand::Unsubscribe { room } => {
                if self.rooms.contains_key(room.as_str()) {
                    self.leave(None, room).await;
                }
            }
        }
    }

    async fn join(&mut self, id: Option<u64>, room: String, since: Option<Position>) {
        self.join_as(id, room, since, Joining::Client).await
    }

    /// A join, as one span when spans are exported: auth-service `Authorize` and room-service
    /// `Join` (and any history pages) are its children.
    async fn join_as(
        &mut self,
        id: Option<u64>,
        room: String,
        since: Option<Position>,
        by: Joining,
    ) {
        let span = tracing::info_span!(
            target: TRACING_ONLY,
            "gateway.join",
            room = %room,
            user = %self.conn.user,
            by = ?by,
        );
        self.join_traced(id, room, since, by).instrument(span).await
    }

    async fn join_traced(
        &mut self,
        id: Option<u64>,
        room: String,
        since: Option<Position>,
        by: Joining,
    ) {
        if self.rooms.contains_key(room.as_str()) {
            return self
                .send_error(id, ErrorCode::BadRequest, "already joined")
                .await;
        }
        let max_rooms = self.gateway.settings.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms {
            let message =
                format!("room limit reached ({max_rooms} per connection); leave one first");
            return self.send_error(id, ErrorCode::RateLimited, &message).await;
        }
        let request = pb::AuthorizeRequest {
            token: self.token.clone(),
            room: room.clone(),
        };
        let access = match (self.gateway.backends.authorize(request).await, by) {
            (Ok(access), _) => access,
            // The backend's subscription stands without the auth service; publishing waits.
            (Err(status), Joining::Server) => {
                tracing::warn!(%room, %status, "server subscription: publish rights unknown");
                pb::AuthorizeResponse::default()
            }
            (Err(status), Joining::Client) => return self.send_status(id, &status).await,
        };
        if !access.can_join && by == Joining::Client {
            return self
                .send_error(
                    id,
                    ErrorCode::Forbidden,
                    "the token does not allow this room",
                )
                .await;
        }

        // Hold the room's messages from now on, register, subscribe, and only then ask the
        // room-service for the latest offset: nothing published after that offset can slip by.
        let room_name: Arc<str> = Arc::from(room.as_str());
        self.conn
            .reply(Outbound::local(Local::JoinStart {
                room: room_name.clone(),
            }))
            .await;
        let room_name = self.gateway.hub.add_member(&room, self.conn.clone());
        if let Err(error) = self.gateway.subscriptions.acquire(room_name.clone()).await {
            tracing::warn!(%room, %error, "join failed: cannot subscribe");
            self.gateway.hub.remove_member(&room, &self.conn.client_id);
            let reply = ServerFrame::Error {
                id,
                code: ErrorCode::Unavailable,
                message: "broker unavailable; retry",
            };
            return self
                .conn
                .reply(Outbound::local(Local::JoinFailed {
                    room: room_name,
                    reply: reply.to_json().into(),
                }))
                .await;
        }
        let request = pb::JoinRequest {
            room: room.clone(),
            client_id: self.conn.client_id.to_string(),
            user: self.conn.user.to_string(),
            gateway_id: self.gateway.id.clone(),
            since: since.map(|p| pb::Position {
                epoch: p.epoch,
                offset: p.offset,
            }),
        };
        let joined = self.gateway.backends.join_recovering(request).await;
        let joined = match joined {
            Ok(joined) => joined,
            Err(status) => {
                self.gateway.hub.remove_member(&room, &self.conn.client_id);
                self.gateway.subscriptions.release(room_name.clone());
                return self
                    .conn
                    .reply(Outbound::local(Local::JoinFailed {
                        room: room_name,
                        reply: Self::error_frame(id, &status),
                    }))
                    .await;
            }
        };
        self.gateway
            .hub
            .set_base(&room, &joined.epoch, joined.offset);
        let missed = joined
            .recovered
            .map(|_| protocol::stored_messages(&room, &joined.epoch, &joined.missed));
        let reply = ServerFrame::Joined {
            id,
            room: &room,
            epoch: &joined.epoch,
            offset: joined.offset,
            recovered: joined.recovered,
            missed,
        };
        self.rooms.insert(
            room_name.clone(),
            Joined {
                can_publish: access.can_publish,
            },
        );
        self.conn
            .reply(Outbound::local(Local::JoinDone {
                room: room_name,
                epoch: Arc::from(joined.epoch.as_str()),
                offset: joined.offset,
                reply: reply.to_json().into(),
            }))
            .await;
    }

    async fn leave(&mut self, id: Option<u64>, room: String) {
        let Some((room_name, _)) = self.rooms.remove_entry(room.as_str()) else {
            return self
                .send_error(id, ErrorCode::NotJoined, "not joined to this room")
                .await;
        };
        self.gateway.hub.remove_member(&room, &self.conn.client_id);
        self.gateway.subscriptions.release(room_name.clone());
        let request = pb::LeaveRequest {
            room: room.clone(),
            client_id: self.conn.client_id.to_string(),
            user: self.conn.user.to_string(),
            gateway_id: self.gateway.id.clone(),
        };
        if let Err(status) = self.gateway.backends.leave(request).await {
            // Locally the connection has left; the stale entry goes with the connection's
            // close (or its gateway's lease).
            tracing::warn!(%room, %status, "leave not recorded by the room service");
        }
        let reply = ServerFrame::Left { id, room: &room };
        self.conn
            .reply(Outbound::local(Local::Left {
                room: room_name,
                reply: reply.to_json().into(),
            }))
            .await;
    }

    fn joined(&self, room: &str) -> Option<&Joined> {
        self.rooms.get(room)
    }

    async fn publish(&mut self, id: Option<u64>, room: String, data: &str, key: Option<&str>) {
        let Some(joined) = self.joined(&room) else {
            return self
                .refuse_publish(id, ErrorCode::NotJoined, "join the room before publishing")
                .await;
        };
        if !joined.can_publish {
            return self
                .refuse_publish(
                    id,
                    ErrorCode::Forbidden,
                    "the token does not allow publishing here",
                )
                .await;
        }
        if !self.gateway.namespaces.of(&room).client_publish {
            return self
                .refuse_publish(
                    id,
                    ErrorCode::Forbidden,
                    "clients may not publish in this room's namespace",
                )
                .await;
        }
        if !self.publish_bucket.try_take() {
            metrics::counter!("roomcast_gateway_rate_limited_total").increment(1);
            self.refused_in_a_row += 1;
            let wait = self.publish_bucket.wait_hint().as_millis();
            let message = format!("publish rate exceeded; retry in {wait} ms");
            // Answered even when it ends the connection: the error precedes the close frame.
            self.refuse_publish(id, ErrorCode::RateLimited, &message)
                .await;
            if self.refused_in_a_row >= self.gateway.settings.rate_limit_close_after {
                self.conn
                    .close(CloseCode::RATE_LIMITED, "publish rate exceeded repeatedly");
            }
            return;
        }
        self.refused_in_a_row = 0;
        self.publish_count += 1;
        let request = pb::PublishRequest {
            room: room.clone(),
            client_id: self.conn.client_id.to_string(),
            user: self.conn.user.to_string(),
            data_json: data.to_owned(),
            idempotency_key: idempotency_key(
                &self.conn.user,
                &self.conn.client_id,
                key,
                self.publish_count,
            ),
        };
        // The reader goes on reading (unless the connection owes too many replies already);
        // the reply comes when the batch returns.
        self.wait_while_owing_too_much().await;
        let room = self
            .rooms
            .get_key_value(room.as_str())
            .map_or_else(|| Arc::from(room.as_str()), |(name, _)| name.clone());
        self.publishes.push(&self.gateway, id, room, request);
    }

    /// Answers a publish the gateway refuses itself, after the publishes before it.
    async fn refuse_publish(&mut self, id: Option<u64>, code: ErrorCode, message: &str) {
        let reply: Utf8Bytes = ServerFrame::Error { id, code, message }.to_json().into();
        if self.publishes.is_idle() {
            self.conn.reply(Outbound::frame(reply)).await;
        } else {
            self.wait_while_owing_too_much().await;
            self.publishes.push_answered(reply);
        }
    }

    /// Holds the reader (and so, through TCP, the client) while the connection owes as many
    /// publish replies as it may.
    async fn wait_while_owing_too_much(&mut self) {
        while self.publishes.is_full() && self.publishes.has_in_flight() {
            let done = self.publishes.next_done().await;
            self.publishes.finish(done, &self.conn, &self.gateway).await;
        }
    }

    /// Waits until every publish read so far is stored and answered.
    async fn flush_publishes(&mut self) {
        self.publishes.flush(&self.conn, &self.gateway).await;
    }

    async fn presence(&mut self, id: Option<u64>, room: String) {
        if self.joined(&room).is_none() {
            return self
                .send_error(id, ErrorCode::NotJoined, "not joined to this room")
                .await;
        }
        if !self.gateway.namespaces.of(&room).presence {
            return self
                .send_error(
                    id,
                    ErrorCode::Forbidden,
                    "presence is off in this room's namespace",
                )
                .await;
        }
        let request = pb::PresenceRequest { room: room.clone() };
        match self.gateway.backends.presence(request).await {
            Ok(presence) => {
                let members = presence
                    .members
                    .into_iter()
                    .map(|m| Member {
                        user: m.user,
                        client_id: m.client_id,
                    })
                    .collect();
                self.send(ServerFrame::Presence {
                    id,
                    room: &room,
                    members,
                })
                .await
            }
            Err(status) => self.send_status(id, &status).await,
        }
    }

    async fn history(&mut self, id: Option<u64>, room: String, since: Option<u64>, limit: u32) {
        if self.joined(&room).is_none() {
            return self
                .send_error(id, ErrorCode::NotJoined, "not joined to this room")
                .await;
        }
        let request = pb::HistoryRequest {
            room: room.clone(),
            since,
            limit,
        };
        match self.gateway.backends.history_pages(request).await {
            Ok(history) => {
                let messages =
                    protocol::stored_messages(&room, &history.epoch, &history.publications);
                self.send(ServerFrame::History {
                    id,
                    room: &room,
                    epoch: &history.epoch,
                    offset: history.offset,
                    messages,
                })
                .await
            }
            Err(status) => self.send_status(id, &status).await,
        }
    }

    async fn refresh(&mut self, id: Option<u64>, token: String) {
        let request = pb::VerifyTokenRequest {
            token: token.clone(),
        };
        let claims = match self.gateway.backends.verify_token(request).await {
            Ok(verified) => verified.claims.unwrap_or_default(),
            Err(status) => return self.send_status(id, &status).await,
        };
        if claims.sub != *self.conn.user {
            return self
                .send_error(
                    id,
                    ErrorCode::Forbidden,
                    "the new token is for another user",
                )
                .await;
        }
        self.token = token;
        self.expires_at = claims.exp;
        self.send(ServerFrame::Refreshed {
            id,
            expires_at: claims.exp,
        })
        .await;
    }

    /// Leaves every room locally and tells the room-service the connection is gone.
    async fn cleanup(&mut self) {
        let rooms: Vec<Arc<str>> = self.rooms.drain().map(|(room, _)| room).collect();
        for room in &rooms {
            self.gateway.hub.remove_member(room, &self.conn.client_id);
            self.gateway.subscriptions.release(room.clone());
        }
        if rooms.is_empty() && !self.counted {
            return;
        }
        let rooms = rooms.iter().map(|r| r.to_string()).collect();
        report_closed(&self.gateway, &self.conn.client_id, &self.conn.user, rooms);
    }
}

/// Tells the room-service that a connection ended: it leaves `rooms` and its user's count.
/// Not awaited by the connection: its socket is already done.
fn report_closed(gateway: &Arc<Gateway>, client_id: &str, user: &str, rooms: Vec<String>) {
    let request = pb::ConnectionClosedRequest {
        client_id: client_id.to_owned(),
        user: user.to_owned(),
        gateway_id: gateway.id.clone(),
        rooms,
    };
    let gateway = gateway.clone();
    tokio::spawn(async move {
        if let Err(status) = gateway.backends.connection_closed(request).await {
            tracing::warn!(%status, "connection close not recorded by the room service");
        }
    });
}

/// Per-room delivery state kept by the writer.
enum Cursor {
    /// Join in flight: hold what arrives until the join reply is out.
    Pending(Vec<Outbound>),
    /// Joined: the epoch and last offset delivered (or known to the client from the join
    /// reply).
    Active { epoch: Arc<str>, last: u64 },
}

/// The writer's cursors, one per room. A connection is in few rooms, so a vector searched by
/// the shared room name (pointer first: deliveries carry the hub's `Arc` of the name) beats
/// hashing the name for every delivery.
#[derive(Default)]
struct Cursors {
    rooms: Vec<(Arc<str>, Cursor)>,
}

impl Cursors {
    fn get_mut(&mut self, room: &Arc<str>) -> Option<&mut Cursor> {
        let index = match self
            .rooms
            .iter()
            .position(|(name, _)| Arc::ptr_eq(name, room))
        {
            Some(index) => index,
            None => {
                let index = self.rooms.iter().position(|(name, _)| name == room)?;
                // Keep the caller's `Arc` (the hub's): the next lookup is a pointer compare.
                self.rooms[index].0 = room.clone();
                index
            }
        };
        Some(&mut self.rooms[index].1)
    }

    fn insert(&mut self, room: Arc<str>, cursor: Cursor) -> Option<Cursor> {
        match self.get_mut(&room) {
            Some(slot) => Some(std::mem::replace(slot, cursor)),
            None => {
                self.rooms.push((room, cursor));
                None
            }
        }
    }

    fn remove(&mut self, room: &Arc<str>) {
        self.rooms.retain(|(name, _)| name != room);
    }

    /// Turns one queue item into frames to write (in `out`). Returns false when a pending
    /// buffer grew past `limit`: the client is too slow.
    fn apply(&mut self, item: Outbound, out: &mut Vec<Bytes>, limit: usize) -> bool {
        match item {
            Outbound::Message(ref delivery) => match self.get_mut(&delivery.room) {
                None => {}
                Some(Cursor::Pending(held)) => {
                    held.push(item);
                    return held.len() <= limit;
                }
                Some(Cursor::Active { epoch, last }) => {
                    if !Arc::ptr_eq(epoch, &delivery.epoch) {
                        if *epoch != delivery.epoch {
                            // The room's history was lost and its offsets restarted.
                            *last = 0;
                        }
                        // The hub shares one epoch per room: the next compare is a pointer's.
                        *epoch = delivery.epoch.clone();
                    }
                    if delivery.offset <= *last {
                        // Already delivered, or covered by the join reply: a duplicate.
                        return true;
                    }
                    if delivery.offset > *last + 1 && *last > 0 {
                        metrics::counter!("roomcast_gateway_offset_gaps_total").increment(1);
                    }
                    *last = delivery.offset;
                    out.push(delivery.wire.clone());
                }
            },
            Outbound::Event(ref event) => match self.get_mut(&event.room) {
                None => {}
                Some(Cursor::Pending(held)) => {
                    held.push(item);
                    return held.len() <= limit;
                }
                Some(Cursor::Active { .. }) => out.push(event.wire.clone()),
            },
            Outbound::Local(local) => match *local {
                Local::Frame(frame) => out.push(socket::text(frame.as_bytes())),
                Local::Raw(bytes) => out.push(bytes),
                Local::JoinStart { room } => {
                    self.insert(room, Cursor::Pending(Vec::new()));
                }
                Local::JoinDone {
                    room,
                    epoch,
                    offset,
                    reply,
                } => {
                    out.push(socket::text(reply.as_bytes()));
                    let active = Cursor::Active {
                        epoch,
                        last: offset,
                    };
                    let held = match self.insert(room, active) {
                        Some(Cursor::Pending(held)) => held,
                        _ => Vec::new(),
                    };
                    for item in held {
                        self.apply(item, out, limit);
                    }
                }
                Local::JoinFailed { room, reply } | Local::Left { room, reply } => {
                    self.remove(&room);
                    out.push(socket::text(reply.as_bytes()));
                }
            },
        }
        true
    }
}

/// `frames` (whole WebSocket frames) as one buffer, so they go out in one system call: a lone
/// frame is its shared bytes as they are, several are copied together.
fn concat(frames: &mut Vec<Bytes>) -> Bytes {
    if frames.len() == 1 {
        return frames.pop().unwrap_or_default();
    }
    let mut buffer = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
    for frame in frames.drain(..) {
        buffer.extend_from_slice(&frame);
    }
    buffer.into()
}

/// The connection's only writer to the socket. Pings come from the reader (it owns the
/// connection's one timer) through the queue, like every other frame.
async fn write_loop(
    mut socket: socket::WriteHalf,
    conn: Arc<ConnHandle>,
    limit: usize,
    delay: Duration,
) {
    let mut cursors = Cursors::default();
    let mut batch = Vec::new();
    let mut out = Vec::new();
    // What the socket has not taken yet. Kept across a close, so the close frame never lands
    // in the middle of a half-written frame.
    let mut pending = Bytes::new();
    // Whether the broadcasts now queued were already held for the write delay.
    let mut held = false;
    'serve: loop {
        // With a write delay, broadcasts wait for the ones that follow, whether they arrived
        // while the writer was idle or while it was writing; the connection's own traffic (a
        // reply) ends the wait.
        if !delay.is_zero() && !held && conn.holds_only_broadcasts() {
            // Boxed: a timer is only needed while holding.
            let mut hold = Box::pin(tokio::time::sleep(delay));
            loop {
                tokio::select! {
                    biased;
                    () = std::future::poll_fn(|cx| conn.poll_writer_closed(cx)) => break 'serve,
                    () = &mut hold => break,
                    () = std::future::poll_fn(|cx| conn.poll_writer_woken(cx)) => {
                        if !conn.holds_only_broadcasts() {
                            break;
                        }
                    }
                }
            }
            held = true;
            continue;
        }
        // Whatever is queued goes out in one write, MAX_BATCH items at a time.
        if conn.take_batch(&mut batch, MAX_BATCH) == 0 {
            if conn.is_closed() {
                break;
            }
            std::future::poll_fn(|cx| conn.poll_writer_woken(cx)).await;
            held = false;
            continue;
        }
        held = false;
        if conn.is_closed() {
            break;
        }
        let mut ok = true;
        for item in batch.drain(..) {
            ok &= cursors.apply(item, &mut out, limit);
        }
        if !ok {
            conn.close(
                CloseCode::SLOW_CONSUMER,
                "slow consumer: outbound queue overflowed",
            );
            // This batch may hold replies: it goes out before the close frame, like the rest.
            pending = concat(&mut out);
            break;
        }
        if out.is_empty() {
            continue;
        }
        pending = concat(&mut out);
        while !pending.is_empty() {
            // Biased: a write that completes at once (the usual case) never looks at closing.
            // `write` is cancel-safe: on close, `pending` holds exactly what is left.
            let written = tokio::select! {
                biased;
                written = socket.write(&pending) => written,
                () = std::future::poll_fn(|cx| conn.poll_writer_closed(cx)) => break 'serve,
            };
            match written {
                Ok(n) if n > 0 => pending.advance(n),
                _ => {
                    conn.shut();
                    return;
                }
            }
        }
        if socket.buffers() {
            // TLS: what the stream took may still sit in its record buffer.
            let flushed = tokio::select! {
                biased;
                flushed = socket.flush() => flushed,
                () = std::future::poll_fn(|cx| conn.poll_writer_closed(cx)) => break 'serve,
            };
            if flushed.is_err() {
                conn.shut();
                return;
            }
        }
    }
    // Closing. Every reply owed goes out before the close frame: wait for the reader to finish
    // the command it may be running (a publish being stored, say), so its reply is queued,
    // then send the replies still queued. Bounded, in case a backend hangs.
    let reader_done = std::future::poll_fn(|cx| conn.poll_reader_finished(cx));
    let _ = tokio::time::timeout(OWED_REPLY_WAIT, reader_done).await;
    conn.take_batch(&mut batch, usize::MAX);
    let (owed, close_reply) = owed_replies(batch.drain(..));
    let last = match conn.close_reason.get() {
        Some((code, reason)) => socket::close(*code, reason),
        // Closed by the client or the socket: tungstenite's reply to a close, if any.
        None => close_reply.unwrap_or_default(),
    };
    // Boxed: only a closing connection needs this future's space.
    let finish = Box::pin(async move {
        socket.write_all(&pending).await?;
        for reply in &owed {
            socket.write_all(reply).await?;
        }
        socket.write_all(&last).await?;
        // Flushes (TLS: and sends close_notify), then ends the sending direction.
        socket.shutdown().await
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), finish).await;
}

/// How long a closing connection waits for the reply to the command in flight.
const OWED_REPLY_WAIT: Duration = Duration::from_secs(5);

/// What a closing connection still sends of its queue: the replies to the client's commands,
/// in order (broadcasts are dropped: a client recovers them with `since`), and tungstenite's
/// reply to a client's close frame, if one is queued.
fn owed_replies(items: impl Iterator<Item = Outbound>) -> (Vec<Bytes>, Option<Bytes>) {
    let mut owed = Vec::new();
    let mut close_reply = None;
    for item in items {
        let Outbound::Local(local) = item else {
            continue;
        };
        match *local {
            Local::Frame(frame) => owed.push(socket::text(frame.as_bytes())),
            Local::JoinDone { reply, .. }
            | Local::JoinFailed { reply, .. }
            | Local::Left { reply, .. } => owed.push(socket::text(reply.as_bytes())),
            // Pings and pongs are moot now; a close frame (opcode 8) is the client's answer.
            Local::Raw(bytes) if bytes.first() == Some(&0x88) => close_reply = Some(bytes),
            Local::Raw(_) | Local::JoinStart { .. } => {}
        }
    }
    (owed, close_reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Delivery;

    fn message(room: &Arc<str>, offset: u64) -> Outbound {
        Outbound::Message(Arc::new(Delivery {
            room: room.clone(),
            epoch: Arc::from("e"),
            offset,
            wire: socket::text(offset.to_string().as_bytes()),
        }))
    }

    fn texts(out: &[Bytes]) -> Vec<&str> {
        out.iter()
            .map(|f| std::str::from_utf8(socket::payload_of(f)).unwrap())
            .collect()
    }

    #[test]
    fn join_holds_messages_and_drops_those_the_reply_covers() {
        let room: Arc<str> = Arc::from("r");
        let mut cursors = Cursors::default();
        let mut out = Vec::new();
        cursors.apply(message(&room, 1), &mut out, 10);
        assert!(out.is_empty(), "not joined: dropped");
        cursors.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            10,
        );
        for offset in [4, 5, 6] {
            cursors.apply(message(&room, offset), &mut out, 10);
        }
        assert!(out.is_empty(), "held while the join is in flight");
        cursors.apply(
            Outbound::local(Local::JoinDone {
                room: room.clone(),
                epoch: Arc::from("e"),
                offset: 5,
                reply: "joined".into(),
            }),
            &mut out,
            10,
        );
        assert_eq!(texts(&out), ["joined", "6"]);
        out.clear();
        for offset in [6, 7, 7, 8] {
            cursors.apply(message(&room, offset), &mut out, 10);
        }
        assert_eq!(texts(&out), ["7", "8"], "duplicates dropped");
        out.clear();
        cursors.apply(
            Outbound::local(Local::Left {
                room: room.clone(),
                reply: "left".into(),
            }),
            &mut out,
            10,
        );
        cursors.apply(message(&room, 9), &mut out, 10);
        assert_eq!(texts(&out), ["left"]);
    }

    #[test]
    fn a_new_epoch_restarts_offsets() {
        let room: Arc<str> = Arc::from("r");
        let mut cursors = Cursors::default();
        let mut out = Vec::new();
        cursors.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            10,
        );
        cursors.apply(
            Outbound::local(Local::JoinDone {
                room: room.clone(),
                epoch: Arc::from("e"),
                offset: 8,
                reply: "joined".into(),
            }),
            &mut out,
            10,
        );
        out.clear();
        let restarted = Outbound::Message(Arc::new(Delivery {
            room: room.clone(),
            epoch: Arc::from("f"),
            offset: 1,
            wire: socket::text(b"f1"),
        }));
        cursors.apply(restarted, &mut out, 10);
        cursors.apply(message(&room, 2), &mut out, 10);
        assert_eq!(texts(&out), ["f1", "2"]);
    }

    #[test]
    fn a_closing_connection_sends_replies_in_order_and_no_broadcasts() {
        let room: Arc<str> = Arc::from("r");
        let items = vec![
            Outbound::frame("a"),
            message(&room, 1),
            Outbound::local(Local::Raw(socket::ping())),
            Outbound::local(Local::JoinStart { room: room.clone() }),
            Outbound::local(Local::JoinDone {
                room: room.clone(),
                epoch: Arc::from("e"),
                offset: 1,
                reply: "joined".into(),
            }),
            Outbound::local(Local::Raw(socket::close(CloseCode::NORMAL, ""))),
            Outbound::frame("b"),
        ];
        let (owed, close_reply) = owed_replies(items.into_iter());
        assert_eq!(texts(&owed), ["a", "joined", "b"]);
        assert_eq!(close_reply.unwrap(), socket::close(CloseCode::NORMAL, ""));
    }

    #[test]
    fn read_errors_map_to_close_codes() {
        use tokio_tungstenite::tungstenite::error::CapacityError;
        let too_big = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert_eq!(close_for(&too_big).unwrap().0, CloseCode::TOO_BIG);
        let utf8 = WsError::Utf8("invalid".into());
        assert_eq!(close_for(&utf8).unwrap().0, CloseCode::INVALID_PAYLOAD);
        let unmasked = WsError::Protocol(ProtocolError::UnmaskedFrameFromClient);
        assert_eq!(close_for(&unmasked).unwrap().0, CloseCode::PROTOCOL_ERROR);
        let reset = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert!(close_for(&reset).is_none(), "nobody left to tell");
        assert!(close_for(&WsError::ConnectionClosed).is_none());
    }

    #[test]
    fn any_expiry_gives_an_instant() {
        let now = Instant::now();
        for exp in [i64::MIN, -1, 0, 1_700_000_000, i64::MAX / 1000, i64::MAX] {
            let at = instant_of_unix(exp);
            assert!(
                at <= now + Duration::from_secs(11 * 365 * 24 * 3600),
                "{exp}"
            );
        }
        assert!(instant_of_unix(0) <= Instant::now());
    }

    #[test]
    fn pending_buffer_is_bounded() {
        let room: Arc<str> = Arc::from("r");
        let mut cursors = Cursors::default();
        let mut out = Vec::new();
        cursors.apply(
            Outbound::local(Local::JoinStart { room: room.clone() }),
            &mut out,
            2,
        );
        assert!(cursors.apply(message(&room, 1), &mut out, 2));
        assert!(cursors.apply(message(&room, 2), &mut out, 2));
        assert!(!cursors.apply(message(&room, 3), &mut out, 2));
    }
}
