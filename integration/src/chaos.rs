//! The load-and-fault harness of the chaos tests (`integration/tests/chaos.rs`): clients that
//! join, publish, reconnect with backoff and re-join with `since` while a fault is injected
//! mid-run, and the checks that every client saw each room's history exactly, in order.

/// Large enough that a room's history holds every message of a run.
pub const HISTORY_SIZE: u64 = 10_000;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{CloseInfo, Incoming, System, TestClient, http, token};
use anyhow::{Context, Result, bail, ensure};
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_proto::{HistoryRequest, InfoRequest, ServerPublishRequest};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

// -----------------------------------------------------------------------------------------
// What runs

/// The failure injected mid-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL gateway `i`.
    KillGateway(usize),
    /// SIGTERM gateway `i`: it drains (1001) and exits.
    DrainGateway(usize),
    /// SIGKILL room-service `i`.
    KillRoomService(usize),
    /// SIGKILL redis-server, keep it down a few seconds, start an empty one on the same
    /// port.
    RestartRedis,
    /// On a Redis Cluster: a manual failover (`CLUSTER FAILOVER` on a replica) of the master
    /// serving the first room.
    FailoverRedisMaster,
    /// On a Redis Cluster: SIGKILL the master serving the first room; its replica takes over
    /// when the cluster notices (`cluster-node-timeout`).
    KillRedisMaster,
}

impl Fault {
    fn gateway(self) -> Option<usize> {
        match self {
            Fault::KillGateway(g) | Fault::DrainGateway(g) => Some(g),
            _ => None,
        }
    }
}

/// One run: clients, rooms, publish load, and the fault.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub clients: usize,
    pub rooms: usize,
    /// Messages per second through the server API (both room-services, round robin).
    pub api_rate: f64,
    /// Messages per second per gateway publisher (a WebSocket client on a gateway that is
    /// not faulted, joined to every room).
    pub ws_rate: f64,
    pub ws_publishers: usize,
    pub publish_for: Duration,
    /// When the fault strikes, from the start of publishing.
    pub fault_at: Duration,
    /// How long Redis stays down.
    pub outage: Duration,
    pub fault: Fault,
}

impl LoadPlan {
    /// 120 clients in 6 rooms (each in 1 or 2), ~150 msg/s for 7 s (100 through the server
    /// API, 2 x 25 through gateways), the fault 2.5 s in. Redis restarts use the server
    /// API only, whose acknowledgements carry the epoch.
    pub fn standard(fault: Fault) -> Self {
        let redis = fault == Fault::RestartRedis;
        LoadPlan {
            clients: 120,
            rooms: 6,
            api_rate: if redis { 150.0 } else { 100.0 },
            ws_rate: 25.0,
            ws_publishers: if redis { 0 } else { 2 },
            publish_for: Duration::from_secs(if redis { 9 } else { 7 }),
            fault_at: Duration::from_millis(2500),
            outage: Duration::from_secs(3),
            fault,
        }
    }

    pub async fn run(self, sys: &mut System) -> Result<()> {
        run_plan(self, sys).await
    }
}

#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub index: usize,
    pub user: String,
    /// The gateway it connects to first.
    pub home: usize,
    pub rooms: Vec<String>,
}

pub fn room_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("chaos-{i}")).collect()
}

/// Client `i` joins room `i % R` and, two times in three, one more room; homes are spread
/// so every room has members on every gateway.
pub fn spread(clients: usize, rooms: &[String], gateways: usize) -> Vec<ClientSpec> {
    let r = rooms.len();
    (0..clients)
        .map(|i| {
            let first = i % r;
            let mut mine = vec![rooms[first].clone()];
            if i % 3 != 0 && r > 1 {
                let second = (first + 1 + (i / r) % (r - 1)) % r;
                mine.push(rooms[second].clone());
            }
            ClientSpec {
                index: i,
                user: format!("user-{i}"),
                home: (i / r) % gateways,
                rooms: mine,
            }
        })
        .collect()
}

// -----------------------------------------------------------------------------------------
// Clients

/// A message as the client holds it.
#[derive(Debug, Clone)]
pub struct Held {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
    /// Came in `joined.missed` rather than live.
    pub missed: bool,
    /// Index of the join it followed.
    pub join: usize,
}

#[derive(Debug, Clone)]
pub struct JoinRecord {
    pub gateway: usize,
    pub since: Option<(String, u64)>,
    pub epoch: String,
    pub offset: u64,
    pub recovered: Option<bool>,
    pub missed: usize,
    pub at: Duration,
}

#[derive(Debug, Default)]
pub struct RoomLog {
    pub joins: Vec<JoinRecord>,
    pub held: Vec<Held>,
}

impl RoomLog {
    /// Where the client stands: its last message, else its last join.
    pub fn position(&self) -> Option<(String, u64)> {
        let join = self.joins.last()?;
        match self.held.last() {
            Some(h) if h.join + 1 == self.joins.len() => Some((h.epoch.clone(), h.offset)),
            _ => Some((join.epoch.clone(), join.offset)),
        }
    }
}

#[derive(Debug)]
pub struct ClientReport {
    pub spec: ClientSpec,
    pub rooms: BTreeMap<String, RoomLog>,
    /// (gateway, when) of each established connection.
    pub connects: Vec<(usize, Duration)>,
    /// Refused or failed connection attempts.
    pub refused: Vec<String>,
    /// (gateway, close, when) of each connection the server ended.
    pub closes: Vec<(usize, CloseInfo, Duration)>,
    /// Protocol surprises: unexpected frames, failed joins.
    pub problems: Vec<String>,
    pub presence_events: usize,
}

impl ClientReport {
    fn new(spec: ClientSpec) -> Self {
        ClientReport {
            rooms: spec
                .rooms
                .iter()
                .map(|r| (r.clone(), RoomLog::default()))
                .collect(),
            spec,
            connects: Vec::new(),
            refused: Vec::new(),
            closes: Vec::new(),
            problems: Vec::new(),
            presence_events: 0,
        }
    }

    fn describe(&self) -> String {
        let connects: Vec<String> = self
            .connects
            .iter()
            .map(|(g, at)| format!("gw{g}@{:.2}s", at.as_secs_f64()))
            .collect();
        let closes: Vec<String> = self
            .closes
            .iter()
            .map(|(g, c, at)| format!("gw{g} {c} @{:.2}s", at.as_secs_f64()))
            .collect();
        format!(
            "{} (home gw{}, connects [{}], closes [{}])",
            self.spec.user,
            self.spec.home,
            connects.join(", "),
            closes.join("; ")
        )
    }
}

/// What every client task shares.
pub struct Shared {
    pub urls: Vec<String>,
    pub start: Instant,
    /// (client, room) -> position, for waiting until everyone caught up.
    pub progress: Mutex<HashMap<(usize, String), (String, u64)>>,
}

impl Shared {
    fn note(&self, client: usize, room: &str, pos: Option<(String, u64)>) {
        if let Some(pos) = pos {
            let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            progress.insert((client, room.to_owned()), pos);
        }
    }
}

/// Exponential backoff with a per-client jitter: 50 ms, 100 ms, ... up to 1.6 s.
fn backoff(failures: u32, client: usize) -> Duration {
    let base = 50u64 << failures.min(5);
    let jitter = (client as u64 * 37 + u64::from(failures) * 11) % 50;
    Duration::from_millis(base + jitter)
}

enum Interrupted {
    /// The connection ended; the session must start over.
    Closed(CloseInfo),
    Stop,
}

/// One simulated client: connects (home gateway first), joins its rooms, records every
/// message; when the server ends the connection it reconnects to another gateway with
/// exponential backoff and re-joins each room with `since` = the last message it holds.
pub async fn client_task(
    shared: Arc<Shared>,
    spec: ClientSpec,
    token: String,
    ready: mpsc::UnboundedSender<usize>,
    mut stop: watch::Receiver<bool>,
) -> ClientReport {
    let mut report = ClientReport::new(spec.clone());
    let gateways = shared.urls.len();
    let mut gateway = spec.home;
    let mut failures = 0u32;
    let mut pause: Option<Duration> = None;
    let mut announced = false;
    'session: loop {
        if *stop.borrow() {
            break;
        }
        if let Some(wait) = pause.take() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => break,
            }
        }
        let mut client = match TestClient::connect(&shared.urls[gateway], &token).await {
            Ok(c) => c,
            Err(e) => {
                report.refused.push(format!(
                    "gw{gateway} @{:.2}s: {e}",
                    shared.start.elapsed().as_secs_f64()
                ));
                failures += 1;
                pause = Some(backoff(failures, spec.index));
                gateway = (gateway + 1) % gateways;
                continue;
            }
        };
        report.connects.push((gateway, shared.start.elapsed()));
        let mut outcome = None;
        for room in &spec.rooms {
            if let Err(why) = join_room(&mut client, room, gateway, &mut report, &shared).await {
                outcome = Some(why);
                break;
            }
        }
        if outcome.is_none() {
            failures = 0;
            if !announced {
                announced = true;
                let _ = ready.send(spec.index);
            }
            outcome = Some(loop {
                let item = tokio::select! {
                    _ = stop.changed() => break Interrupted::Stop,
                    item = client.recv(Duration::from_secs(3600)) => item,
                };
                match item {
                    Ok(Incoming::Json(v)) => handle_frame(&v, &mut report, &shared),
                    Ok(Incoming::Closed(close)) => break Interrupted::Closed(close),
                    Ok(other) => report.problems.push(format!("unexpected {other}")),
                    Err(e) => {
                        report.problems.push(format!("reading: {e:#}"));
                        break Interrupted::Stop;
                    }
                }
            });
        }
        match outcome {
            Some(Interrupted::Closed(close)) => {
                report.closes.push((gateway, close, shared.start.elapsed()));
                // Elsewhere: spread the clients of a lost gateway over the others.
                let step = 1 + spec.index % (gateways - 1).max(1);
                gateway = (gateway + step) % gateways;
                pause = Some(backoff(0, spec.index));
                continue 'session;
            }
            _ => break 'session,
        }
    }
    report
}

/// Joins `room` (with `since` when the client held a position) and records the reply.
/// `unavailable` is retried with backoff. A close in the middle ends the session; frames
/// read before it are recorded first.
async fn join_room(
    client: &mut TestClient,
    room: &str,
    gateway: usize,
    report: &mut ClientReport,
    shared: &Shared,
) -> Result<(), Interrupted> {
    let since = report.rooms.get(room).and_then(RoomLog::position);
    let mut tries = 0u32;
    loop {
        let mut cmd = json!({"type": "join", "room": room});
        if let Some((epoch, offset)) = &since {
            cmd["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let reply = match client.send_command(cmd).await {
            Ok(id) => client.reply_to(id, Duration::from_secs(5)).await,
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                // Closed, or no reply: record what was read, then start over.
                let close = absorb(client, report, shared).await;
                return Err(Interrupted::Closed(close.unwrap_or_else(|| {
                    report
                        .problems
                        .push(format!("join {room} on gw{gateway}: {e:#}"));
                    CloseInfo {
                        code: None,
                        reason: "join timed out; dropped by the client".into(),
                    }
                })));
            }
        };
        if reply["type"] == "joined" {
            record_join(&reply, room, gateway, since, report, shared);
            return Ok(());
        }
        if reply["code"] == "unavailable" && tries < 30 {
            tries += 1;
            tokio::time::sleep(backoff(tries, report.spec.index)).await;
            continue;
        }
        report
            .problems
            .push(format!("join {room} on gw{gateway}: {reply}"));
        let close = absorb(client, report, shared).await;
        return Err(Interrupted::Closed(close.unwrap_or(CloseInfo {
            code: None,
            reason: format!("join refused: {reply}"),
        })));
    }
}

/// Records every frame already read; returns the close if the connection has ended.
async fn absorb(
    client: &mut TestClient,
    report: &mut ClientReport,
    shared: &Shared,
) -> Option<CloseInfo> {
    loop {
        match client.recv(Duration::from_millis(50)).await {
            Ok(Incoming::Json(v)) => handle_frame(&v, report, shared),
            Ok(Incoming::Closed(close)) => return Some(close),
            Ok(other) => report.problems.push(format!("unexpected {other}")),
            Err(_) => return None,
        }
    }
}

fn record_join(
    reply: &Value,
    room: &str,
    gateway: usize,
    since: Option<(String, u64)>,
    report: &mut ClientReport,
    shared: &Shared,
) {
    let index = report.spec.index;
    let Some(log) = report.rooms.get_mut(room) else {
        report
            .problems
            .push(format!("joined a room not planned: {reply}"));
        return;
    };
    let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
    let offset = reply["offset"].as_u64().unwrap_or(0);
    let recovered = reply["recovered"].as_bool();
    let missed = reply["missed"].as_array().cloned().unwrap_or_default();
    if reply["room"] != room || epoch.is_empty() || reply["offset"].as_u64().is_none() {
        report.problems.push(format!("malformed joined: {reply}"));
    }
    if since.is_some() && recovered.is_none() {
        report.problems.push(format!(
            "joined after a join with since lacks `recovered`: {reply}"
        ));
    }
    let join = log.joins.len();
    log.joins.push(JoinRecord {
        gateway,
        since,
        epoch: epoch.clone(),
        offset,
        recovered,
        missed: missed.len(),
        at: shared.start.elapsed(),
    });
    if recovered == Some(true) {
        for m in &missed {
            log.held.push(Held {
                epoch: m["epoch"].as_str().unwrap_or_default().to_owned(),
                offset: m["offset"].as_u64().unwrap_or(0),
                data: m["data"].clone(),
                missed: true,
                join,
            });
        }
    } else if !missed.is_empty() {
        report
            .problems
            .push(format!("`missed` without recovered: true: {reply}"));
    }
    let pos = log.position();
    shared.note(index, room, pos);
}

fn handle_frame(v: &Value, report: &mut ClientReport, shared: &Shared) {
    match v["type"].as_str() {
        Some("message") => {
            let room = v["room"].as_str().unwrap_or_default();
            let index = report.spec.index;
            let Some(log) = report.rooms.get_mut(room) else {
                report
                    .problems
                    .push(format!("message for a room not joined: {v}"));
                return;
            };
            let (Some(epoch), Some(offset)) = (v["epoch"].as_str(), v["offset"].as_u64()) else {
                report.problems.push(format!("malformed message: {v}"));
                return;
            };
            if log.joins.is_empty() {
                report.problems.push(format!("message before joined: {v}"));
                return;
            }
            log.held.push(Held {
                epoch: epoch.to_owned(),
                offset,
                data: v["data"].clone(),
                missed: false,
                join: log.joins.len() - 1,
            });
            shared.note(index, room, Some((epoch.to_owned(), offset)));
        }
        Some("member_joined" | "member_left") => report.presence_events += 1,
        _ => report.problems.push(format!("unexpected frame {v}")),
    }
}

// -----------------------------------------------------------------------------------------
// Publishers

/// An acknowledged publish.
#[derive(Debug, Clone)]
pub struct Ack {
    pub room: String,
    /// Known for server-API publishes; a gateway's `published` carries no epoch.
    pub epoch: Option<String>,
    pub offset: u64,
    pub data: Value,
    pub at: Duration,
}

#[derive(Debug, Default)]
pub struct PublishStats {
    pub name: String,
    pub acks: Vec<Ack>,
    /// (room, data) of every attempt, acknowledged or not.
    pub attempts: Vec<(String, Value)>,
    /// (error, how long the attempt took, when).
    pub failures: Vec<(String, Duration, Duration)>,
    pub gave_up: usize,
    pub fatal: Option<String>,
}

/// The server API of every room-service, round robin; a failed attempt's retry goes to the
/// next one.
#[derive(Clone)]
pub struct ApiPublisher {
    pub name: String,
    clients: Vec<ServerApiClient<Channel>>,
    key: String,
    next: usize,
}

fn keyed<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

impl ApiPublisher {
    pub fn new(name: &str, urls: &[String], key: &str) -> Result<Self> {
        let clients = urls
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone())
                    .with_context(|| format!("endpoint {url}"))?
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(4));
                Ok(ServerApiClient::new(endpoint.connect_lazy()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ApiPublisher {
            name: name.to_owned(),
            clients,
            key: key.to_owned(),
            next: 0,
        })
    }

    pub fn clone_named(&self, name: &str) -> Self {
        let mut p = self.clone();
        p.name = name.to_owned();
        p
    }

    fn client(&mut self) -> ServerApiClient<Channel> {
        let c = self.clients[self.next % self.clients.len()].clone();
        self.next += 1;
        c
    }

    /// One `ServerPublish`; `(epoch, offset)` or why it failed.
    pub async fn publish_once(
        &mut self,
        room: &str,
        data: &Value,
    ) -> Result<(String, u64), String> {
        let request = ServerPublishRequest {
            room: room.to_owned(),
            data_json: data.to_string(),
            user: String::new(),
            idempotency_key: String::new(),
        };
        let mut client = self.client();
        let call = client.publish(keyed(request, &self.key));
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((r.epoch, r.offset))
            }
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }

    /// A room's current epoch and its whole history.
    pub async fn history(&mut self, room: &str) -> Result<roomcast_proto::HistoryResponse> {
        let request = HistoryRequest {
            room: room.to_owned(),
            since: None,
            limit: 0,
        };
        let mut last = None;
        for _ in 0..2 * self.clients.len() {
            let mut client = self.client();
            match client.history(keyed(request.clone(), &self.key)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) => last = Some(status),
            }
        }
        bail!("ServerHistory {room}: {last:?}")
    }

    /// Gateways with a live lease, from `Info`.
    pub async fn cluster_gateways(&mut self) -> Result<BTreeSet<String>> {
        let mut client = self.client();
        let stats = client
            .info(keyed(InfoRequest {}, &self.key))
            .await
            .context("Info")?
            .into_inner();
        Ok(stats.gateways.into_iter().map(|g| g.gateway_id).collect())
    }
}

/// `(user, clientId)` set of a presence reply, as client ids.
pub async fn presence_ids(c: &mut TestClient, room: &str) -> Result<BTreeSet<String>> {
    let reply = c
        .request_ok(json!({"type": "presence", "room": room}), "presence")
        .await?;
    Ok(reply["members"]
        .as_array()
        .context("presence without members")?
        .iter()
        .filter_map(|m| m["clientId"].as_str().map(str::to_owned))
        .collect())
}

pub enum Publisher {
    Api(ApiPublisher),
    /// A WebSocket client joined to every room.
    Ws {
        name: String,
        client: TestClient,
    },
}

enum Attempt {
    Acked(Option<String>, u64),
    Failed(String),
    Fatal(String),
}

impl Publisher {
    fn name(&self) -> &str {
        match self {
            Publisher::Api(p) => &p.name,
            Publisher::Ws { name, .. } => name,
        }
    }

    async fn attempt(&mut self, room: &str, data: &Value) -> Attempt {
        match self {
            Publisher::Api(p) => match p.publish_once(room, data).await {
                Ok((epoch, offset)) => Attempt::Acked(Some(epoch), offset),
                Err(e) => Attempt::Failed(e),
            },
            Publisher::Ws { client, .. } => {
                // What other members published is of no interest here.
                let _ = client.drain(Duration::ZERO).await;
                let cmd = json!({"type": "publish", "room": room, "data": data});
                let id = match client.send_command(cmd).await {
                    Ok(id) => id,
                    Err(e) => return Attempt::Fatal(format!("{e:#}")),
                };
                match client.reply_to(id, Duration::from_secs(5)).await {
                    Ok(r) if r["type"] == "published" => match r["offset"].as_u64() {
                        Some(offset) => Attempt::Acked(None, offset),
                        None => Attempt::Fatal(format!("published without offset: {r}")),
                    },
                    Ok(r) if r["code"] == "unavailable" || r["code"] == "rate_limited" => {
                        Attempt::Failed(r.to_string())
                    }
                    Ok(r) => Attempt::Fatal(format!("unexpected reply {r}")),
                    Err(e) => {
                        if client.close_code().is_some() {
                            Attempt::Fatal(format!("{e:#}"))
                        } else {
                            Attempt::Failed(format!("{e:#}"))
                        }
                    }
                }
            }
        }
    }
}

/// Publishes to `rooms` in turn at `rate` until `until`. A failed attempt is retried with
/// a new attempt number in the data (so a retried publish that the first attempt had in
/// fact applied shows up as a distinct message), for up to 10 s.
pub async fn publish_loop(
    mut publisher: Publisher,
    rooms: Vec<String>,
    rate: f64,
    until: Instant,
    start: Instant,
) -> PublishStats {
    let mut stats = PublishStats {
        name: publisher.name().to_owned(),
        ..Default::default()
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let room = &rooms[n % rooms.len()];
        let give_up_at = Instant::now() + Duration::from_secs(10);
        let mut attempt = 0u32;
        loop {
            let data = json!({"src": stats.name, "n": n, "try": attempt});
            stats.attempts.push((room.clone(), data.clone()));
            let began = Instant::now();
            match publisher.attempt(room, &data).await {
                Attempt::Acked(epoch, offset) => {
                    stats.acks.push(Ack {
                        room: room.clone(),
                        epoch,
                        offset,
                        data,
                        at: start.elapsed(),
                    });
                    break;
                }
                Attempt::Failed(e) => {
                    stats.failures.push((e, began.elapsed(), start.elapsed()));
                    attempt += 1;
                    if Instant::now() >= give_up_at {
                        stats.gave_up += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * u64::from((attempt - 1).min(6))))
                        .await;
                }
                Attempt::Fatal(e) => {
                    stats.fatal = Some(e);
                    return stats;
                }
            }
        }
        n += 1;
    }
    stats
}

// -----------------------------------------------------------------------------------------
// Readiness

/// `/readyz` answers of every URL, sampled every 100 ms: (when, url index, status; 0 for
/// no answer).
async fn watch_ready(
    urls: Vec<String>,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<(Duration, usize, u16)> {
    let mut seen = Vec::new();
    loop {
        for (i, url) in urls.iter().enumerate() {
            let status = match http::get(url, Duration::from_millis(800)).await {
                Ok(r) => r.status,
                Err(_) => 0,
            };
            seen.push((start.elapsed(), i, status));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return seen,
        }
    }
}

// -----------------------------------------------------------------------------------------
// The run

async fn run_plan(plan: LoadPlan, sys: &mut System) -> Result<()> {
    let name = format!("{:?}", plan.fault);
    let cluster = sys.cluster().context("needs a cluster")?;
    let gateways = cluster.gateway_count();
    let key = sys.options().api_key.clone();
    let api_urls: Vec<String> = (0..cluster.room_service_count())
        .map(|i| cluster.room_service_grpc(i))
        .collect();
    let gateway_ready_urls: Vec<String> = (0..gateways)
        .map(|g| format!("{}/readyz", cluster.http_url(g)))
        .collect();
    let room_ready_urls: Vec<String> = (0..cluster.room_service_count())
        .map(|i| format!("{}/readyz", cluster.room_service(i).http_url))
        .collect();
    let rooms = room_names(plan.rooms);
    let specs = spread(plan.clients, &rooms, gateways);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        urls: (0..gateways).map(|g| cluster.ws_url(g)).collect(),
        start,
        progress: Mutex::new(HashMap::new()),
    });

    // Clients.
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for spec in &specs {
        let token = token::mint(sys.secret(), &crate::Claims::new(&spec.user))?;
        tasks.push(tokio::spawn(client_task(
            shared.clone(),
            spec.clone(),
            token,
            ready_tx.clone(),
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    let ready_by = Instant::now() + Duration::from_secs(20);
    while ready < specs.len() {
        let left = ready_by.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            _ => bail!(
                "only {ready} of {} clients connected and joined",
                specs.len()
            ),
        }
    }
    let setup = start.elapsed();

    // Publishers: the server API, and WebSocket clients on gateways the fault spares.
    let spared: Vec<usize> = (0..gateways)
        .filter(|g| Some(*g) != plan.fault.gateway())
        .collect();
    let mut publishers = vec![Publisher::Api(ApiPublisher::new("api", &api_urls, &key)?)];
    for p in 0..plan.ws_publishers {
        let g = spared[p % spared.len()];
        let mut client = sys.client(g, &format!("publisher-{p}")).await?;
        for room in &rooms {
            client.join(room).await?;
        }
        publishers.push(Publisher::Ws {
            name: format!("ws{p}"),
            client,
        });
    }
    let publish_start = Instant::now();
    let until = publish_start + plan.publish_for;
    let mut publish_tasks = Vec::new();
    for p in publishers {
        let rate = match p {
            Publisher::Api(_) => plan.api_rate,
            Publisher::Ws { .. } => plan.ws_rate,
        };
        publish_tasks.push(tokio::spawn(publish_loop(
            p,
            rooms.clone(),
            rate,
            until,
            start,
        )));
    }
    let (ready_stop_tx, ready_stop_rx) = watch::channel(false);
    let ready_urls: Vec<String> = gateway_ready_urls
        .iter()
        .chain(&room_ready_urls)
        .cloned()
        .collect();
    let ready_watch = tokio::spawn(watch_ready(ready_urls, start, ready_stop_rx));

    // The fault.
    tokio::time::sleep(plan.fault_at).await;
    let fault_at = start.elapsed();
    let mut restarted_at = None;
    let mut drained_exit = None;
    let processes_before: Vec<(String, u32)> = sys
        .processes()
        .iter()
        .map(|p| (p.name().to_owned(), p.pid()))
        .collect();
    match plan.fault {
        Fault::KillGateway(g) => sys
            .cluster()
            .context("cluster")?
            .gateway(g)
            .process
            .kill9()?,
        Fault::DrainGateway(g) => sys
            .cluster()
            .context("cluster")?
            .gateway(g)
            .process
            .terminate()?,
        Fault::KillRoomService(i) => sys
            .cluster()
            .context("cluster")?
            .room_service(i)
            .process
            .kill9()?,
        Fault::RestartRedis => {
            let cluster = sys.cluster_mut().context("cluster")?;
            cluster.redis().process().kill9()?;
            tokio::time::sleep(plan.outage).await;
            cluster.redis_mut().restart_empty().await?;
            restarted_at = Some(start.elapsed());
        }
        Fault::FailoverRedisMaster | Fault::KillRedisMaster => {
            let redis = sys
                .cluster()
                .and_then(|c| c.redis_cluster())
                .context("a system on a Redis Cluster")?;
            let channel = roomcast_common::envelope::room_channel(&rooms[0]);
            let master = redis.master_of(&roomcast_common::envelope::cluster_channel(&channel))?;
            let took = Instant::now();
            if plan.fault == Fault::KillRedisMaster {
                redis.kill_master(master)?;
            } else {
                redis.failover(master)?;
            }
            eprintln!(
                "{name}: the master of {} (:{master}) failed over in {:?}, now :{}",
                rooms[0],
                took.elapsed(),
                redis.master_of(&roomcast_common::envelope::cluster_channel(&channel))?
            );
        }
    }
    if let Fault::DrainGateway(g) = plan.fault {
        let process = &sys.cluster().context("cluster")?.gateway(g).process;
        drained_exit = Some(process.wait_exit(Duration::from_secs(12)).await?);
    }

    // Publishing ends; then everyone must catch up with the rooms' histories.
    let mut stats = Vec::new();
    for t in publish_tasks {
        stats.push(t.await.context("publisher task")?);
    }
    let published_for = publish_start.elapsed();
    let mut api = ApiPublisher::new("verify", &api_urls, &key)?;
    let mut truths = BTreeMap::new();
    for room in &rooms {
        truths.insert(room.clone(), Truth::fetch(&mut api, room).await?);
    }
    let caught_up = wait_caught_up(&shared, &specs, &truths, Duration::from_secs(8)).await;
    let drain_pause = publish_start.elapsed() - published_for;
    stop_tx.send_replace(true);
    let mut reports = Vec::new();
    for t in tasks {
        let report = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .context("a client task did not stop")?
            .context("client task")?;
        reports.push(report);
    }
    ready_stop_tx.send_replace(true);
    let ready_log = ready_watch.await.context("readiness task")?;

    // ---- What happened
    let total_acks: usize = stats.iter().map(|s| s.acks.len()).sum();
    let total_attempts: usize = stats.iter().map(|s| s.attempts.len()).sum();
    let total_failures: usize = stats.iter().map(|s| s.failures.len()).sum();
    let history_total: u64 = truths.values().map(|t| t.last).sum();
    let max_fail = stats
        .iter()
        .flat_map(|s| s.failures.iter().map(|f| f.1))
        .max()
        .unwrap_or_default();
    let delivered: usize = reports
        .iter()
        .flat_map(|r| r.rooms.values().map(|l| l.held.len()))
        .sum();
    let rejoins: Vec<&JoinRecord> = reports
        .iter()
        .flat_map(|r| r.rooms.values().flat_map(|l| l.joins.iter().skip(1)))
        .collect();
    let recovered_msgs: usize = rejoins.iter().map(|j| j.missed).sum();
    let closed: Vec<&ClientReport> = reports.iter().filter(|r| !r.closes.is_empty()).collect();
    let last_rejoin = rejoins.iter().map(|j| j.at).max();
    eprintln!(
        "{name}: {} clients ready in {:.2} s; published {:.2} s: {total_acks} acknowledged of \
         {total_attempts} attempts ({total_failures} failed, slowest failure {:.2} s, gave up \
         {}); history holds {history_total} messages over {} rooms; fault at {:.2} s{}; \
         {} clients closed, {} re-joins ({} recovered, {recovered_msgs} messages in \
         joined.missed), last re-join at {}; {delivered} messages held by clients, caught \
         up: {caught_up:?} after a {:.2} s drain pause",
        specs.len(),
        setup.as_secs_f64(),
        published_for.as_secs_f64(),
        max_fail.as_secs_f64(),
        stats.iter().map(|s| s.gave_up).sum::<usize>(),
        rooms.len(),
        fault_at.as_secs_f64(),
        restarted_at
            .map(|t| format!(", redis back at {:.2} s", t.as_secs_f64()))
            .unwrap_or_default(),
        closed.len(),
        rejoins.len(),
        rejoins.iter().filter(|j| j.recovered == Some(true)).count(),
        last_rejoin
            .map(|t| format!("{:.2} s", t.as_secs_f64()))
            .unwrap_or_else(|| "-".into()),
        drain_pause.as_secs_f64(),
    );
    for s in &stats {
        eprintln!(
            "{name}: publisher {}: {} acknowledged, {} failed attempts{}",
            s.name,
            s.acks.len(),
            s.failures.len(),
            s.failures
                .first()
                .map(|(e, took, at)| format!(
                    " (first at {:.2} s after {:.3} s: {e})",
                    at.as_secs_f64(),
                    took.as_secs_f64()
                ))
                .unwrap_or_default()
        );
    }
    let refused: Vec<&String> = reports.iter().flat_map(|r| r.refused.iter()).collect();
    if !refused.is_empty() {
        eprintln!(
            "{name}: {} connection attempts failed during reconnection, e.g. {}",
            refused.len(),
            refused[0]
        );
    }
    // How long the clients of a lost gateway took to be back in all their rooms.
    let mut recovery: Vec<Duration> = reports
        .iter()
        .filter(|r| !r.closes.is_empty())
        .filter_map(|r| {
            r.rooms
                .values()
                .filter_map(|l| l.joins.last().map(|j| j.at))
                .max()
        })
        .map(|t| t.saturating_sub(fault_at))
        .collect();
    recovery.sort();
    if let (Some(first), Some(last)) = (recovery.first(), recovery.last()) {
        eprintln!(
            "{name}: closed clients back in all their rooms {:.2} s .. {:.2} s (median \
             {:.2} s) after the fault",
            first.as_secs_f64(),
            last.as_secs_f64(),
            recovery[recovery.len() / 2].as_secs_f64()
        );
    }
    for s in &stats {
        if let Some(e) = &s.fatal {
            bail!("publisher {} stopped: {e}", s.name);
        }
        ensure!(
            s.gave_up == 0,
            "publisher {} gave up on {} messages; failures: {:?}",
            s.name,
            s.gave_up,
            s.failures.iter().take(5).collect::<Vec<_>>()
        );
    }
    for r in &reports {
        ensure!(
            r.problems.is_empty(),
            "{}: {}",
            r.describe(),
            r.problems
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // ---- Fault-specific expectations
    match plan.fault {
        Fault::KillGateway(g) | Fault::DrainGateway(g) => {
            let want_code = match plan.fault {
                Fault::DrainGateway(_) => Some(1001),
                _ => None,
            };
            for r in &reports {
                if r.spec.home == g {
                    ensure!(
                        r.closes.len() == 1
                            && r.closes[0].0 == g
                            && r.closes[0].1.code == want_code,
                        "{}: expected exactly one close by gw{g} with code {want_code:?}",
                        r.describe()
                    );
                    let (gw_now, _) = *r.connects.last().context("no connection")?;
                    ensure!(
                        r.connects.len() == 2 && gw_now != g,
                        "{}: should have reconnected once, to another gateway",
                        r.describe()
                    );
                    for (room, log) in &r.rooms {
                        ensure!(
                            log.joins.len() == 2
                                && log.joins[1].since.is_some()
                                && log.joins[1].recovered == Some(true),
                            "{}: {room}: the re-join should carry since and say recovered: \
                             true: {:?}",
                            r.describe(),
                            log.joins
                        );
                    }
                } else {
                    ensure!(
                        r.closes.is_empty(),
                        "{}: a client of a surviving gateway was closed",
                        r.describe()
                    );
                }
            }
            let affected = reports.iter().filter(|r| r.spec.home == g).count();
            ensure!(affected > 0, "no client was homed on gw{g}");
            if let Fault::DrainGateway(_) = plan.fault {
                let exit = drained_exit.flatten();
                eprintln!("{name}: drained gateway exited with {exit:?}");
                ensure!(
                    exit.is_some_and(|s| s.success()),
                    "the drained gateway should exit cleanly: {exit:?}"
                );
            }
        }
        Fault::KillRoomService(_)
        | Fault::RestartRedis
        | Fault::FailoverRedisMaster
        | Fault::KillRedisMaster => {
            for r in &reports {
                ensure!(
                    r.closes.is_empty() && r.connects.len() == 1,
                    "{}: no client should lose its connection",
                    r.describe()
                );
            }
        }
    }
    if plan.fault == Fault::RestartRedis {
        let restarted_at = restarted_at.context("redis restart time")?;
        check_readiness(
            &name,
            &ready_log,
            gateways,
            room_ready_urls.len(),
            fault_at,
            restarted_at,
        )?;
        for p in sys.processes() {
            if p.name().starts_with("redis") {
                continue;
            }
            ensure!(
                p.is_running()
                    && processes_before
                        .iter()
                        .any(|(n, pid)| n == p.name() && *pid == p.pid()),
                "{} was restarted or died during the Redis outage",
                p.name()
            );
        }
        check_new_epoch(sys, &mut api, &rooms, &truths, &stats, &reports).await?;
    }

    // ---- Every client holds every message of its rooms exactly once, in order
    let mut checked = 0usize;
    let old_epochs = if plan.fault == Fault::RestartRedis {
        Some(old_epoch_truth(&stats, &truths, &reports, fault_at)?)
    } else {
        None
    };
    let mut wrong = Vec::new();
    let mut client_rooms = 0;
    for r in &reports {
        for (room, log) in &r.rooms {
            client_rooms += 1;
            match check_room_log(room, log, &truths[room], old_epochs.as_ref()) {
                Ok(n) => checked += n,
                Err(e) => wrong.push(format!("client {}: {e:#}", r.describe())),
            }
        }
    }
    if let Some(old) = &old_epochs {
        let mut short = 0;
        let mut worst = 0;
        for r in &reports {
            for (room, log) in &r.rooms {
                let o = &old[room];
                let last = log
                    .held
                    .iter()
                    .filter(|h| h.epoch == o.epoch)
                    .map(|h| h.offset)
                    .max()
                    .unwrap_or(0);
                if last < o.last_acked {
                    short += 1;
                    worst = worst.max(o.last_acked - last);
                }
            }
        }
        eprintln!(
            "{name}: {short} of {client_rooms} (client, room) logs end the old epoch short of \
             its last acknowledged publish (by up to {worst}: acknowledged in the instant \
             before SIGKILL, lost with the dead server)"
        );
    }
    if !wrong.is_empty() {
        bail!(
            "{} of {client_rooms} (client, room) logs are wrong ({checked} messages in the \
             others were right); the first ones:\n{}",
            wrong.len(),
            wrong.iter().take(4).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    let acked = check_acks(&stats, &truths, plan.fault == Fault::RestartRedis)?;
    eprintln!(
        "{name}: verified {checked} messages held by {} clients against the histories; \
         {acked} acknowledged publishes found at their offsets",
        reports.len()
    );
    ensure!(
        caught_up.is_ok(),
        "clients did not catch up with the histories: {}",
        caught_up.err().unwrap_or_default()
    );
    Ok(())
}

/// A room's current epoch and every message of it, from `ServerHistory`.
#[derive(Debug)]
pub struct Truth {
    pub epoch: String,
    pub last: u64,
    pub data: BTreeMap<u64, Value>,
}

impl Truth {
    async fn fetch(api: &mut ApiPublisher, room: &str) -> Result<Truth> {
        let h = api.history(room).await?;
        let mut data = BTreeMap::new();
        for (i, p) in h.publications.iter().enumerate() {
            ensure!(
                p.offset == i as u64 + 1,
                "history of {room} is not contiguous from 1: position {i} holds offset {} \
                 (latest {}, {} messages)",
                p.offset,
                h.offset,
                h.publications.len()
            );
            let value: Value = serde_json::from_str(&p.data_json)
                .with_context(|| format!("history of {room}: data {:?}", p.data_json))?;
            data.insert(p.offset, value);
        }
        ensure!(
            h.offset == h.publications.len() as u64,
            "history of {room} holds {} messages but the room's latest offset is {} \
             (HISTORY_SIZE {})",
            h.publications.len(),
            h.offset,
            HISTORY_SIZE
        );
        Ok(Truth {
            epoch: h.epoch,
            last: h.offset,
            data,
        })
    }
}

/// Waits until every client's position in each of its rooms is the room's last message.
async fn wait_caught_up(
    shared: &Shared,
    specs: &[ClientSpec],
    truths: &BTreeMap<String, Truth>,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let behind: Vec<String> = {
            let progress = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            specs
                .iter()
                .flat_map(|s| s.rooms.iter().map(move |r| (s, r)))
                .filter_map(|(s, room)| {
                    let t = &truths[room];
                    match progress.get(&(s.index, room.clone())) {
                        Some((e, o)) if *e == t.epoch && *o == t.last => None,
                        other => Some(format!(
                            "{} in {room} at {other:?} of ({}, {})",
                            s.user, t.epoch, t.last
                        )),
                    }
                })
                .collect()
        };
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            return Err(format!(
                "{} positions behind after {limit:?}, e.g. {}",
                behind.len(),
                behind
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The messages of the epoch a restart ended, per room: offset -> data, from what the
/// clients received (agreeing among themselves and with the acknowledged publishes), the
/// last acknowledged offset, and the last one acknowledged a while before the crash.
///
/// Only the latter must have reached every member: Redis pub/sub is at most once, and a
/// publish acknowledged in the last instant before SIGKILL can die in the dead server's
/// socket buffers along with the history that could have filled it (the new epoch tells
/// the clients so).
pub struct OldEpoch {
    pub epoch: String,
    pub data: BTreeMap<u64, Value>,
    pub last_acked: u64,
    pub settled: u64,
}

/// How long before the crash an acknowledged publish must have reached everyone.
const SETTLED: Duration = Duration::from_millis(300);

fn old_epoch_truth(
    stats: &[PublishStats],
    truths: &BTreeMap<String, Truth>,
    reports: &[ClientReport],
    crash: Duration,
) -> Result<BTreeMap<String, OldEpoch>> {
    let mut old: BTreeMap<String, OldEpoch> = BTreeMap::new();
    for r in reports {
        for (room, log) in &r.rooms {
            let first = log.joins.first().context("never joined")?;
            ensure!(
                first.epoch != truths[room].epoch,
                "{}: {room}: joined before the restart with epoch {}, which the room still \
                 has afterwards",
                r.describe(),
                first.epoch
            );
            let entry = old.entry(room.clone()).or_insert_with(|| OldEpoch {
                epoch: first.epoch.clone(),
                data: BTreeMap::new(),
                last_acked: 0,
                settled: 0,
            });
            ensure!(
                entry.epoch == first.epoch,
                "{room}: clients joined with different epochs before the restart: {} and {}",
                entry.epoch,
                first.epoch
            );
            for h in log.held.iter().filter(|h| h.epoch == entry.epoch) {
                if let Some(other) = entry.data.insert(h.offset, h.data.clone()) {
                    ensure!(
                        other == h.data,
                        "{room}: epoch {} offset {} carried {other} to one client and {} \
                         to {}",
                        entry.epoch,
                        h.offset,
                        h.data,
                        r.spec.user
                    );
                }
            }
        }
    }
    for s in stats {
        for a in &s.acks {
            let Some(o) = old.get_mut(&a.room) else {
                continue;
            };
            if a.epoch.as_deref() == Some(o.epoch.as_str()) {
                o.last_acked = o.last_acked.max(a.offset);
                if a.at + SETTLED <= crash {
                    o.settled = o.settled.max(a.offset);
                }
                if let Some(d) = o.data.get(&a.offset) {
                    ensure!(
                        *d == a.data,
                        "{}: old epoch offset {} was acknowledged for {} but clients got {d}",
                        a.room,
                        a.offset,
                        a.data
                    );
                }
            }
        }
    }
    Ok(old)
}

/// One client's messages of one room: after its first join, offsets join+1 ..= last,
/// each once, in order, with the data history holds. With a Redis restart: first the old
/// epoch's messages (contiguous from the join, up to at least the last acknowledged one),
/// then the new epoch's, from 1 to the end.
fn check_room_log(
    room: &str,
    log: &RoomLog,
    truth: &Truth,
    old: Option<&BTreeMap<String, OldEpoch>>,
) -> Result<usize> {
    let first = log.joins.first().context("never joined")?;
    let ctx = room.to_owned();
    let held = &log.held[..];
    match old {
        None => {
            for j in &log.joins {
                ensure!(
                    j.epoch == truth.epoch,
                    "{ctx}: joined with epoch {} but the room's epoch is {}: {j:?}",
                    j.epoch,
                    truth.epoch
                );
                if j.since.is_some() {
                    ensure!(
                        j.recovered == Some(true),
                        "{ctx}: re-join within the history window not recovered: {j:?}"
                    );
                }
            }
            check_sequence(
                &ctx,
                log,
                held,
                &truth.epoch,
                first.offset + 1,
                truth.last,
                &truth.data,
                true,
            )?;
            Ok(held.len())
        }
        Some(old) => {
            let o = &old[room];
            let split = held
                .iter()
                .position(|h| h.epoch != o.epoch)
                .unwrap_or(held.len());
            let (before, after) = held.split_at(split);
            let last_old = before.last().map_or(first.offset, |h| h.offset);
            check_sequence(
                &ctx,
                log,
                before,
                &o.epoch,
                first.offset + 1,
                last_old,
                &o.data,
                false,
            )?;
            ensure!(
                last_old >= o.settled,
                "{ctx}: the old epoch's messages stop at offset {last_old}, but offset {} \
                 was acknowledged {SETTLED:?} before Redis was killed (last acknowledged: \
                 {})",
                o.settled,
                o.last_acked
            );
            check_sequence(
                &ctx,
                log,
                after,
                &truth.epoch,
                1,
                truth.last,
                &truth.data,
                true,
            )?;
            Ok(held.len())
        }
    }
}

/// `held` must be exactly offsets `first..=last` of `epoch`, in order, each with the data
/// `data` has for it (every offset must be in `data` when `complete`).
#[allow(clippy::too_many_arguments)]
fn check_sequence(
    ctx: &str,
    log: &RoomLog,
    held: &[Held],
    epoch: &str,
    first: u64,
    last: u64,
    data: &BTreeMap<u64, Value>,
    complete: bool,
) -> Result<()> {
    let mut expected = first;
    for (i, h) in held.iter().enumerate() {
        let around = || neighbours(held, i);
        ensure!(
            h.epoch == epoch,
            "{ctx}: message from epoch {} where epoch {epoch} was expected ({}); around: {}",
            h.epoch,
            describe(log, h),
            around()
        );
        if h.offset != expected {
            let kind = if h.offset < expected {
                "duplicate or out of order"
            } else {
                "gap"
            };
            bail!(
                "{ctx}: {kind}: expected offset {expected}, got {} ({}); around: {}; joins: \
                 {:?}",
                h.offset,
                describe(log, h),
                around(),
                log.joins
            );
        }
        match data.get(&h.offset) {
            Some(want) => ensure!(
                *want == h.data,
                "{ctx}: offset {} carries {} but history has {want}",
                h.offset,
                h.data
            ),
            None if complete => bail!("{ctx}: offset {} is not in history", h.offset),
            None => {}
        }
        expected += 1;
    }
    if expected != last + 1 {
        bail!(
            "{ctx}: holds epoch {epoch} offsets {first}..{expected} (exclusive) but the last \
             is {last}: {} missing at the end; joins: {:?}; last held: {}",
            (last + 1).saturating_sub(expected),
            log.joins,
            held.last().map(|h| describe(log, h)).unwrap_or_default()
        );
    }
    Ok(())
}

fn describe(log: &RoomLog, h: &Held) -> String {
    let join = &log.joins[h.join];
    format!(
        "{} after join #{} on gw{} (since {:?}, joined at offset {}, recovered {:?}, {} \
         missed)",
        if h.missed { "in joined.missed" } else { "live" },
        h.join,
        join.gateway,
        join.since,
        join.offset,
        join.recovered,
        join.missed
    )
}

fn neighbours(held: &[Held], i: usize) -> String {
    let from = i.saturating_sub(3);
    let to = (i + 3).min(held.len());
    let mut s = String::new();
    for h in &held[from..to] {
        let _ = write!(
            s,
            "{}{}{} ",
            h.offset,
            if h.missed { "m" } else { "" },
            if h.join > 0 {
                format!("/j{}", h.join)
            } else {
                String::new()
            }
        );
    }
    s
}

/// Every acknowledged publish is in its room's history at its offset (for a Redis restart:
/// those of the new epoch); the history holds nothing but attempted publishes, each once;
/// and no more messages than attempts nor fewer than acknowledgements.
fn check_acks(
    stats: &[PublishStats],
    truths: &BTreeMap<String, Truth>,
    restarted: bool,
) -> Result<usize> {
    let mut found = 0;
    let mut acked_per_room: BTreeMap<&str, u64> = BTreeMap::new();
    let mut attempts: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for s in stats {
        for (room, data) in &s.attempts {
            attempts.entry(room).or_default().insert(data.to_string());
        }
        for a in &s.acks {
            let t = &truths[&a.room];
            match &a.epoch {
                Some(e) if *e != t.epoch => {
                    ensure!(
                        restarted,
                        "{}: publish acknowledged with epoch {e}, but the room's epoch is {}",
                        a.room,
                        t.epoch
                    );
                    continue;
                }
                None if restarted => continue,
                _ => {}
            }
            *acked_per_room.entry(&a.room).or_default() += 1;
            let held = t.data.get(&a.offset);
            ensure!(
                held == Some(&a.data),
                "{}: publish {} acknowledged at offset {} ({:.2} s), history has {held:?}",
                a.room,
                a.data,
                a.offset,
                a.at.as_secs_f64()
            );
            found += 1;
        }
    }
    for (room, t) in truths {
        let tried = attempts.get(room.as_str()).map_or(0, BTreeSet::len) as u64;
        let acked = acked_per_room.get(room.as_str()).copied().unwrap_or(0);
        ensure!(
            acked <= t.last && t.last <= tried,
            "{room}: {} messages in history, {acked} acknowledged, {tried} attempted",
            t.last
        );
        let mut seen = BTreeSet::new();
        for (offset, d) in &t.data {
            let d = d.to_string();
            ensure!(
                attempts.get(room.as_str()).is_some_and(|a| a.contains(&d)),
                "{room}: offset {offset} holds {d}, which no publisher sent"
            );
            ensure!(seen.insert(d.clone()), "{room}: {d} is in history twice");
        }
    }
    Ok(found)
}

/// Gateways: ready before, 503 during the outage (within 2.5 s of the kill), 200 again
/// within 5 s of the restart. Room-services likewise (they check every 2 s).
fn check_readiness(
    name: &str,
    log: &[(Duration, usize, u16)],
    gateways: usize,
    room_services: usize,
    killed: Duration,
    restarted: Duration,
) -> Result<()> {
    for i in 0..gateways + room_services {
        let what = if i < gateways {
            format!("gateway {i}")
        } else {
            format!("room-service {}", i - gateways)
        };
        let mine: Vec<(Duration, u16)> = log
            .iter()
            .filter(|(_, j, _)| *j == i)
            .map(|(t, _, s)| (*t, *s))
            .collect();
        let before = mine
            .iter()
            .filter(|(t, _)| *t < killed)
            .map(|(_, s)| *s)
            .next_back();
        let down = mine
            .iter()
            .find(|(t, s)| *t >= killed && *s == 503)
            .map(|(t, _)| *t);
        let up = mine
            .iter()
            .find(|(t, s)| *t >= restarted && *s == 200)
            .map(|(t, _)| *t);
        let during: BTreeSet<u16> = mine
            .iter()
            .filter(|(t, _)| *t >= killed && *t < restarted)
            .map(|(_, s)| *s)
            .collect();
        eprintln!(
            "{name}: /readyz of {what}: {before:?} before the kill, 503 after {}, statuses \
             during the outage {during:?}, 200 again {} after the restart",
            down.map(|t| format!("{:.2} s", (t - killed).as_secs_f64()))
                .unwrap_or_else(|| "never".into()),
            up.map(|t| format!("{:.2} s", (t - restarted).as_secs_f64()))
                .unwrap_or_else(|| "never".into()),
        );
        ensure!(
            before == Some(200),
            "{what}: /readyz was {before:?} before the kill"
        );
        let bound = if i < gateways { 2.5 } else { 3.5 };
        ensure!(
            down.is_some_and(|t| (t - killed).as_secs_f64() <= bound),
            "{what}: /readyz did not answer 503 within {bound} s of Redis going down: {mine:?}"
        );
        ensure!(
            up.is_some_and(|t| (t - restarted).as_secs_f64() <= 5.0),
            "{what}: /readyz not 200 again within 5 s of the restart"
        );
    }
    Ok(())
}

/// After the restart: every room has a new epoch, offsets from 1; a client re-joining with
/// a position of the old epoch is told `recovered: false` with the new epoch, then gets
/// live messages of the new epoch; and publishes failed fast during the outage.
async fn check_new_epoch(
    sys: &System,
    api: &mut ApiPublisher,
    rooms: &[String],
    truths: &BTreeMap<String, Truth>,
    stats: &[PublishStats],
    reports: &[ClientReport],
) -> Result<()> {
    let slowest = stats
        .iter()
        .flat_map(|s| s.failures.iter())
        .max_by_key(|f| f.1);
    let failed = stats.iter().map(|s| s.failures.len()).sum::<usize>();
    ensure!(failed > 0, "no publish failed while Redis was down");
    if let Some((e, took, _)) = slowest {
        ensure!(
            took.as_secs_f64() <= 3.0,
            "a publish took {:.2} s to fail during the outage ({e}); expected a fast \
             `unavailable`",
            took.as_secs_f64()
        );
    }
    for room in rooms {
        let old = reports
            .iter()
            .find_map(|r| r.rooms.get(room).and_then(|l| l.joins.first()))
            .context("no client in the room")?;
        let t = &truths[room];
        ensure!(
            t.epoch != old.epoch && t.last >= 1,
            "{room}: epoch {} before the restart, {} after with {} messages",
            old.epoch,
            t.epoch,
            t.last
        );
    }
    // Re-joins with the old position, on each gateway, while messages keep coming.
    for (g, room) in rooms.iter().take(3).enumerate() {
        let old_epoch = reports
            .iter()
            .find_map(|r| r.rooms.get(room).and_then(|l| l.joins.first()))
            .map(|j| j.epoch.clone())
            .context("no client in the room")?;
        let mut c = sys.client(g, &format!("rejoiner-{g}")).await?;
        let since = json!({"epoch": old_epoch, "offset": 3});
        let joined = c
            .request_ok(
                json!({"type": "join", "room": room, "since": since}),
                "joined",
            )
            .await?;
        let epoch = joined["epoch"].as_str().unwrap_or_default().to_owned();
        ensure!(
            joined["recovered"] == false
                && epoch != old_epoch
                && joined["missed"].as_array().is_none_or(Vec::is_empty),
            "{room}: a join since the old epoch {old_epoch} should say recovered: false \
             with the new epoch: {joined}"
        );
        let offset = joined["offset"].as_u64().unwrap_or(0);
        let data = json!({"src": "rejoin-check", "g": g});
        let (pub_epoch, pub_offset) = api
            .publish_once(room, &data)
            .await
            .map_err(|e| anyhow::anyhow!("publish after the re-join: {e}"))?;
        let m = c.expect("message", Duration::from_secs(5)).await?;
        ensure!(
            m["epoch"] == epoch.as_str()
                && pub_epoch == epoch
                && m["offset"] == pub_offset
                && pub_offset == offset + 1
                && m["data"] == data,
            "{room}: after re-joining at offset {offset} of epoch {epoch}, expected the \
             next message {data} at {} (epoch {pub_epoch}), got {m}",
            offset + 1
        );
    }
    Ok(())
}
