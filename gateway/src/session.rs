//! The connection core, whatever carries it: a session handles its client's commands one at a
//! time (so a `publish` sent after a `join` sees the join; publishes alone are pipelined), owns
//! the connection's one timer (heartbeat timeout, token expiry, server pings) and, at the end,
//! removes every trace of the connection. Transports (`websocket.rs`, `sse.rs`) are edges: they
//! turn their input into [`Inbound`] items and start a [`writer`](crate::writer) on their
//! output.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use roomcast_common::close_code::CloseCode;
use roomcast_common::error_code::ErrorCode;
use roomcast_common::telemetry::TRACING_ONLY;
use roomcast_proto as pb;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::Instrument as _;

use crate::limits::{TokenBucket, UserSlot};
use crate::outbound::{ConnHandle, Local, Outbound, ServerCommand};
use crate::ping::{self, Due};
use crate::pipeline::Publishes;
use crate::protocol::{self, Command, Heartbeat, Member, Position, ServerFrame};
use crate::socket;
use crate::state::Gateway;

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

/// What a transport hands the session from its client.
#[derive(Debug)]
pub enum Inbound {
    /// A text frame: one client command (JSON).
    Text(Utf8Bytes),
    /// A binary frame: refused with an error, the connection stays.
    Binary,
    /// Something that only shows the client is alive (a pong).
    Alive,
    /// The client closed; the transport answered its close.
    Closed,
    /// The transport failed; `Some` when the client is still there to be told why.
    Failed(Option<(CloseCode, &'static str)>),
}

/// A transport's input side.
pub trait Source: Send {
    fn next(&mut self) -> impl Future<Output = Inbound> + Send;

    /// Whether the client proves it is alive by sending (WebSocket pongs). An SSE client sends
    /// nothing on its own; its stream's failing write ends it instead.
    fn expects_heartbeats(&self) -> bool {
        true
    }

    /// Whether frames posted with `secret` by `user` are this connection's own (SSE);
    /// a WebSocket takes its frames from its socket only.
    fn accepts_posted(&self, _secret: &str, _user: &str) -> bool {
        false
    }
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

/// One connection's command handling.
pub struct Session {
    gateway: Arc<Gateway>,
    conn: Arc<ConnHandle>,
    rooms: HashMap<Arc<str>, Joined, foldhash::fast::RandomState>,
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

/// Whether a token that expires at `secs` (unix seconds) has expired.
fn token_expired(secs: i64) -> bool {
    let now = i64::try_from(roomcast_common::unix_millis()).unwrap_or(i64::MAX);
    now >= secs.saturating_mul(1000)
}

/// `at`, rounded up to the gateway's heartbeat tick: a five-hundredth of the ping interval, at
/// most 20 ms. Every connection's pings land on the same ticks, so one wake-up of
/// a runtime worker sends a batch of pings (and reads the batch of pongs that follows) instead
/// of one wake-up and thread switch per connection: with 50,000 idle connections on three
/// gateways, 4x fewer thread switches. Longer ticks (250 ms) saved more CPU but made each
/// batch a burst that showed in the p99 of messages behind it. A ping goes at most a tick late.
fn on_heartbeat_tick(at: Instant, interval: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let tick = (interval / 500).clamp(Duration::from_millis(1), Duration::from_millis(20));
    let tick_ns = tick.as_nanos();
    let since = at.saturating_duration_since(origin).as_nanos();
    let ticks = since.div_ceil(tick_ns);
    let rounded = u64::try_from(ticks.saturating_mul(tick_ns)).unwrap_or(u64::MAX);
    origin + Duration::from_nanos(rounded)
}

impl Session {
    /// Registers the connection with the hub and queues its `connected` frame (`session`:
    /// the SSE session name). The transport then starts the writer and calls [`Session::serve`].
    /// `head` goes out before the `connected` frame, as it is: the 101 of a handshake answered
    /// by hand ([`crate::handshake`]), so both leave in one write.
    pub async fn open(
        gateway: Arc<Gateway>,
        auth: Authenticated,
        session: Option<&str>,
        head: Option<Bytes>,
    ) -> Self {
        let user: Arc<str> = Arc::from(auth.user.as_str());
        let conn = Arc::new(ConnHandle::new(
            auth.client_id.clone(),
            user.clone(),
            gateway.settings.outbound_queue_len,
        ));
        // Queued before the hub knows the connection: nothing it sends (a close on drain or
        // `Disconnect`) can go out ahead of the 101.
        if let Some(head) = head {
            conn.reply(Outbound::local(Local::Raw(head))).await;
        }
        gateway.hub.add_connection(conn.clone());
        metrics::gauge!("roomcast_gateway_connections").increment(1);
        let connected = ServerFrame::Connected {
            client_id: &auth.client_id,
            user: &user,
            gateway: &gateway.id,
            heartbeat: Heartbeat {
                interval_ms: gateway.settings.heartbeat_interval_ms,
                timeout_ms: gateway.settings.heartbeat_timeout_ms,
            },
            session,
        };
        conn.reply(Outbound::frame(connected.to_json())).await;
        let settings = &gateway.settings;
        Session {
            publish_bucket: TokenBucket::new(
                settings.publish_rate,
                f64::from(settings.publish_burst),
            ),
            read_bucket: TokenBucket::new(settings.read_rate, f64::from(settings.read_burst)),
            gateway: gateway.clone(),
            conn,
            rooms: HashMap::default(),
            token: auth.token,
            expires_at: auth.expires_at,
            refused_in_a_row: 0,
            publish_count: 0,
            counted: auth.counted,
            publishes: Publishes::default(),
            _slot: auth.slot,
        }
    }

    /// The connection's shared face (its queue).
    pub fn conn(&self) -> &Arc<ConnHandle> {
        &self.conn
    }

    /// Handles the client's commands until the connection ends, then removes every trace of
    /// it once `writer` finished. By reference: the caller's future holds the session once
    /// (moved into this future it would keep its space twice, per connection).
    pub async fn serve(&mut self, source: &mut impl Source, writer: tokio::task::JoinHandle<()>) {
        self.read_loop(source).await;
        // Publishes already read are stored and answered before the close (bounded like any
        // command in flight).
        let _ = tokio::time::timeout(FLUSH_LIMIT, Box::pin(self.flush_publishes())).await;
        self.conn.shut();
        self.conn.reader_finished();
        self.cleanup().await;
        let _ = writer.await;
        self.gateway.hub.remove_connection(&self.conn.client_id);
        metrics::gauge!("roomcast_gateway_connections").decrement(1);
    }

    async fn read_loop(&mut self, source: &mut impl Source) {
        // The settings are read where needed rather than kept in locals: this future lives
        // as long as the connection, and 32 bytes less puts its task in a smaller size class.
        // One timer for the three deadlines (the token's expiry, the heartbeat timeout, the
        // next server ping), re-armed rather than made anew: a timer is 112 bytes, kept for
        // as long as the connection is open.
        let timer = tokio::time::sleep(
            self.gateway
                .settings
                .heartbeat_interval()
                .min(self.gateway.settings.heartbeat_timeout()),
        );
        tokio::pin!(timer);
        let mut silent_until = Instant::now() + self.gateway.settings.heartbeat_timeout();
        let mut next_ping = self.next_ping(Instant::now());
        // A WebSocket's writes may carry its pings; an SSE stream's pings are comments that
        // no client answers, sent by the timer alone.
        if source.expects_heartbeats() {
            let interval = self.gateway.settings.heartbeat_interval();
            self.conn
                .pings
                .open(ping::window_start(Instant::now(), interval));
        }
        loop {
            let expiry = instant_of_unix(self.expires_at);
            if !source.expects_heartbeats() {
                silent_until = expiry.max(next_ping) + self.gateway.settings.heartbeat_timeout();
            }
            // Only pings are on the tick: a timeout is rare, and this runs for every frame.
            timer
                .as_mut()
                .reset(expiry.min(silent_until).min(next_ping));
            let next = tokio::select! {
                biased;
                () = self.conn.attention() => {
                    if self.conn.is_closed() {
                        return;
                    }
                    // Boxed, like every command: an idle connection should not carry the
                    // space of this loop's state.
                    Box::pin(self.server_commands(source)).await;
                    continue;
                }
                done = self.publishes.next_done(), if self.publishes.has_in_flight() => {
                    Box::pin(self.publishes.finish(done, &self.conn, &self.gateway)).await;
                    continue;
                }
                next = source.next() => next,
                () = &mut timer => {
                    let now = Instant::now();
                    // Not an `Instant` kept across the wait: 16 bytes less in a future kept
                    // for as long as the connection is open.
                    if token_expired(self.expires_at) {
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
                        next_ping = self.ping(now, source.expects_heartbeats());
                    }
                    continue;
                }
            };
            // Anything the client sends, a pong included, shows it is alive.
            silent_until = Instant::now() + self.gateway.settings.heartbeat_timeout();
            match next {
                // Boxed: the command futures (gRPC calls) are large, and an idle connection
                // should not carry their space.
                Inbound::Text(text) => Box::pin(self.handle_text(&text)).await,
                Inbound::Binary => {
                    Box::pin(self.send_error(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported",
                    ))
                    .await
                }
                Inbound::Alive => {}
                Inbound::Closed => return,
                Inbound::Failed(close) => {
                    if let Some((code, reason)) = close {
                        tracing::debug!(client = %self.conn.client_id, code = code.get(), reason, "closing");
                        self.conn.close(code, reason);
                    }
                    return;
                }
            }
        }
    }

    /// Carries out the server commands waiting, in order.
    async fn server_commands(&mut self, source: &mut impl Source) {
        for command in self.conn.take_server_commands() {
            if let ServerCommand::Frames {
                secret,
                user,
                frames,
            } = command
            {
                if source.accepts_posted(&secret, &user) {
                    for frame in frames {
                        Box::pin(self.handle_text(&frame)).await;
                    }
                }
                continue;
            }
            self.server_command(command).await;
        }
    }

    /// At the ping deadline `now`: sends the ping unless a write carried it already (where
    /// writes may carry pings: `may_ride`), and returns the next deadline, an interval after
    /// the ping.
    fn ping(&self, now: Instant, may_ride: bool) -> Instant {
        if may_ride {
            let interval = self.gateway.settings.heartbeat_interval();
            if let Due::Carried(went) = self.conn.pings.settle(now, interval) {
                return self.next_ping(went);
            }
        }
        self.conn.send_raw(socket::ping());
        self.next_ping(now)
    }

    /// When to ping after `now`: an interval later, on the heartbeat tick.
    fn next_ping(&self, now: Instant) -> Instant {
        let interval = self.gateway.settings.heartbeat_interval();
        on_heartbeat_tick(now + interval, interval)
    }

    async fn send(&self, frame: ServerFrame<'_>) {
        self.conn.reply(Outbound::frame(frame.to_json())).await;
    }

    async fn send_error(&self, id: Option<u64>, code: ErrorCode, message: &str) {
        self.send(ServerFrame::Error { id, code, message }).await;
    }

    fn error_frame(id: Option<u64>, status: &tonic::Status) -> Utf8Bytes {
        protocol::error_frame(id, status).into()
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
            // Handled by the read loop, which knows the transport.
            ServerCommand::Frames { .. } => {}
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
        if let Err(refusal) = self.may_join(&room) {
            return self.send_error(id, refusal.0, &refusal.1).await;
        }
        let can_publish = match self.authorize(id, &room, by).await {
            Ok(can_publish) => can_publish,
            Err(reply) => return self.conn.reply(Outbound::frame(reply)).await,
        };
        // Hold the room's messages from now on, register, subscribe, and only then ask the
        // room-service for the latest offset: nothing published after that offset can slip by.
        let room_name = match self.enter(id, &room).await {
            Some(room_name) => room_name,
            None => return,
        };
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
        let joined = match self.gateway.backends.join_recovering(request).await {
            Ok(joined) => joined,
            Err(status) => {
                let reply = Self::error_frame(id, &status);
                return self
                    .exit(
                        &room_name,
                        Local::JoinFailed {
                            room: room_name.clone(),
                            reply,
                        },
                    )
                    .await;
            }
        };
        // From here the room stream filters what this member's reply covers.
        self.gateway
            .hub
            .joined(&room, &self.conn.client_id, &joined.epoch, joined.offset);
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
        self.rooms.insert(room_name.clone(), Joined { can_publish });
        self.conn
            .reply(Outbound::local(Local::JoinDone {
                room: room_name,
                epoch: Arc::from(joined.epoch.as_str()),
                offset: joined.offset,
                reply: reply.to_json().into(),
            }))
            .await;
    }

    /// Why the connection may not join `room` now, if it may not.
    fn may_join(&self, room: &str) -> Result<(), (ErrorCode, String)> {
        if self.rooms.contains_key(room) {
            return Err((ErrorCode::BadRequest, "already joined".into()));
        }
        let max_rooms = self.gateway.settings.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms {
            let message =
                format!("room limit reached ({max_rooms} per connection); leave one first");
            return Err((ErrorCode::RateLimited, message));
        }
        Ok(())
    }

    /// Asks auth-service whether the token may join `room`; returns whether it may publish
    /// there, or the error frame to send. A backend's subscription stands without auth-service
    /// (publishing then waits for a join that can ask it).
    async fn authorize(&self, id: Option<u64>, room: &str, by: Joining) -> Result<bool, String> {
        let request = pb::AuthorizeRequest {
            token: self.token.clone(),
            room: room.to_owned(),
        };
        let access = match (self.gateway.backends.authorize(request).await, by) {
            (Ok(access), _) => access,
            (Err(status), Joining::Server) => {
                tracing::warn!(%room, %status, "server subscription: publish rights unknown");
                pb::AuthorizeResponse::default()
            }
            (Err(status), Joining::Client) => return Err(protocol::error_frame(id, &status)),
        };
        if !access.can_join && by == Joining::Client {
            let frame = ServerFrame::Error {
                id,
                code: ErrorCode::Forbidden,
                message: "the token does not allow this room",
            };
            return Err(frame.to_json());
        }
        Ok(access.can_publish)
    }

    /// Starts holding `room` in the writer, adds the connection to the hub and makes sure the
    /// gateway is subscribed. `None`: the broker refused, the error is sent.
    async fn enter(&mut self, id: Option<u64>, room: &str) -> Option<Arc<str>> {
        let held: Arc<str> = Arc::from(room);
        self.conn
            .reply(Outbound::local(Local::JoinStart { room: held.clone() }))
            .await;
        let room_name = self.gateway.hub.add_member(room, self.conn.clone());
        let Err(error) = self.gateway.subscriptions.acquire(room_name.clone()).await else {
            return Some(room_name);
        };
        tracing::warn!(%room, %error, "join failed: cannot subscribe");
        self.gateway.hub.remove_member(room, &self.conn.client_id);
        let reply = ServerFrame::Error {
            id,
            code: ErrorCode::Unavailable,
            message: "broker unavailable; retry",
        };
        let failed = Local::JoinFailed {
            room: held,
            reply: reply.to_json().into(),
        };
        self.conn.reply(Outbound::local(failed)).await;
        None
    }

    /// Undoes [`Session::enter`] and queues `last` (the failure or the `left` reply).
    async fn exit(&mut self, room: &Arc<str>, last: Local) {
        self.gateway.hub.remove_member(room, &self.conn.client_id);
        self.gateway.subscriptions.release(room.clone());
        self.conn.reply(Outbound::local(last)).await;
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
            // A key the gateway numbers itself was never used: nothing for room-service to
            // look up unless this is a retry (the backend pool clears it then).
            first_try: key.is_none(),
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
pub(crate) fn report_closed(
    gateway: &Arc<Gateway>,
    client_id: &str,
    user: &str,
    rooms: Vec<String>,
) {
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
#[cfg(test)]
mod tests {
    use super::*;

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
    fn expiry_is_read_off_the_clock() {
        let now = i64::try_from(roomcast_common::unix_millis() / 1000).unwrap();
        for past in [i64::MIN, 0, now - 1, now] {
            assert!(token_expired(past), "{past}");
        }
        for future in [now + 2, i64::MAX / 1000, i64::MAX] {
            assert!(!token_expired(future), "{future}");
        }
    }

    #[test]
    fn heartbeat_deadlines_share_ticks() {
        let interval = Duration::from_secs(10);
        let tick = Duration::from_millis(20);
        let start = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u64 {
            let at = start + Duration::from_micros(i * 997);
            let rounded = on_heartbeat_tick(at, interval);
            assert!(rounded >= at && rounded < at + tick, "{i}");
            assert_eq!(on_heartbeat_tick(rounded, interval), rounded, "{i}");
            seen.insert(rounded);
        }
        // 1 s of deadlines falls on at most 51 ticks of 20 ms.
        assert!(seen.len() <= 51, "{}", seen.len());
        // Short intervals (tests) get short ticks, down to 1 ms.
        let short = on_heartbeat_tick(start, Duration::from_millis(100));
        assert!(short <= start + Duration::from_millis(1));
    }
}
