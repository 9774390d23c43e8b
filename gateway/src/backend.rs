//! gRPC clients for the room and auth services, each over a list of endpoints.
//!
//! Requests go round-robin over the endpoints. When one answers UNAVAILABLE (down, refused,
//! timed out) it is skipped for a moment and the request is tried on the next one, so killing
//! one instance of a service does not stop the gateway. A request the dead instance may already
//! have applied can thus be applied twice (a publish could be duplicated); that is the price of
//! not losing it.
//!
//! A host name counts as a list: it is resolved, every address becomes an endpoint, and the
//! resolution is refreshed, so a Kubernetes headless Service spreads the load over its pods
//! and follows them as they come and go.
//!
//! `https://` URLs use TLS (`GRPC_TLS_*`: the CA to trust, the client certificate for mTLS).
//! An endpoint made from a resolved address still presents and verifies the configured host
//! name (SNI, certificate check), not the address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::Uri;
use roomcast_common::credential::{AttachBearer, CredentialError};
use roomcast_common::propagation::InjectTraceContext;
use roomcast_common::unix_millis;
use roomcast_proto as pb;
use roomcast_proto::auth_service_client::AuthServiceClient;
use roomcast_proto::room_service_client::RoomServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Response, Status};

use crate::batcher::{Batcher, Pending, Results};

/// Most requests in one batch call (see [`Batcher`]).
const BATCH_MAX: usize = 256;

/// Batch calls of one kind in flight at once: few, so that requests pile up behind them
/// (that is the batching), more than one, so that one slow call does not hold up the others.
const BATCH_IN_FLIGHT: usize = 2;

/// How long an endpoint that answered UNAVAILABLE is skipped.
const SKIP_MS: u64 = 1_000;

/// How often host names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    #[error("no endpoint in {0:?}")]
    Empty(String),
    #[error("bad endpoint {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// A channel whose calls carry the caller's trace context (while span export is on).
pub type Traced = InterceptedService<Channel, InjectTraceContext>;

/// A channel that carries the internal token on every call, and the trace context.
pub type Internal = InterceptedService<Traced, AttachBearer>;

fn internal(channel: Channel, attach: &AttachBearer) -> Internal {
    InterceptedService::new(
        InterceptedService::new(channel, InjectTraceContext),
        attach.clone(),
    )
}

/// One resolved endpoint.
struct Member<C> {
    /// The URL it was built from, with the host resolved: identifies it across refreshes.
    url: String,
    /// Which configured URL it came from.
    origin: usize,
    client: C,
    /// Unix ms until which it is skipped.
    skip_until: AtomicU64,
}

/// One client per endpoint, with failover.
pub struct Pool<C> {
    /// The configured URLs, as given.
    urls: Vec<Uri>,
    /// TLS of `https://` URLs; `None`: the system's roots, no client certificate.
    tls: Option<ClientTlsConfig>,
    make: Box<dyn Fn(Channel) -> C + Send + Sync>,
    /// The current endpoints; replaced whole by a refresh.
    members: RwLock<Arc<Vec<Member<C>>>>,
    next: AtomicUsize,
}

/// The host of `uri` without IPv6 brackets: the name TLS verifies.
fn host_name(uri: &Uri) -> &str {
    uri.host().unwrap_or_default().trim_matches(['[', ']'])
}

/// An error with its sources, on one line (tonic's own text is only "transport error").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        text.push_str(": ");
        text.push_str(&error.to_string());
        source = error.source();
    }
    text
}

/// A lazily connecting channel to `url`; over TLS for `https://`, verifying `domain`.
fn endpoint(
    url: &str,
    domain: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, BackendConfigError> {
    let bad = |reason: String| BackendConfigError::BadUrl {
        url: url.to_owned(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().scheme_str() == Some("https") {
        let config = tls
            .cloned()
            .unwrap_or_else(|| ClientTlsConfig::new().with_native_roots())
            .domain_name(domain);
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| bad(error_chain(&e)))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// `url` with its host replaced by `addr`.
fn with_address(url: &Uri, addr: std::net::SocketAddr) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let path = url.path_and_query().map_or("", |p| p.as_str());
    let path = if path == "/" { "" } else { path };
    format!("{scheme}://{addr}{path}")
}

impl<C: Clone> Pool<C> {
    /// `urls`: one URL or a comma-separated list. Host names are used as they are until the
    /// first [`Pool::refresh`]. `tls` applies to `https://` URLs.
    pub fn new(
        urls: &str,
        tls: Option<ClientTlsConfig>,
        make: impl Fn(Channel) -> C + Send + Sync + 'static,
    ) -> Result<Self, BackendConfigError> {
        let mut parsed = Vec::new();
        let mut members = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let uri: Uri =
                url.parse()
                    .map_err(|e: http::uri::InvalidUri| BackendConfigError::BadUrl {
                        url: url.to_owned(),
                        reason: e.to_string(),
                    })?;
            if uri.host().is_none() {
                return Err(BackendConfigError::BadUrl {
                    url: url.to_owned(),
                    reason: "no host".to_owned(),
                });
            }
            members.push(Member {
                url: url.to_owned(),
                origin: parsed.len(),
                client: make(endpoint(url, host_name(&uri), tls.as_ref())?),
                skip_until: AtomicU64::new(0),
            });
            parsed.push(uri);
        }
        if members.is_empty() {
            return Err(BackendConfigError::Empty(urls.to_owned()));
        }
        Ok(Self {
            urls: parsed,
            tls,
            make: Box::new(make),
            members: RwLock::new(Arc::new(members)),
            next: AtomicUsize::new(0),
        })
    }

    fn snapshot(&self) -> Arc<Vec<Member<C>>> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current endpoint URLs (host names resolved).
    pub fn endpoints(&self) -> Vec<String> {
        self.snapshot().iter().map(|m| m.url.clone()).collect()
    }

    /// Resolves host names again: every address is an endpoint. Endpoints that stay keep
    /// their connection; a name that does not resolve keeps what it had (or itself).
    pub async fn refresh(&self) {
        let current = self.snapshot();
        let mut wanted: Vec<(String, usize)> = Vec::new();
        for (origin, uri) in self.urls.iter().enumerate() {
            let host = uri.host().unwrap_or_default();
            let is_literal = host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok();
            let resolved: Vec<String> = if is_literal {
                Vec::new()
            } else {
                let default_port = if uri.scheme_str() == Some("https") {
                    443
                } else {
                    80
                };
                let port = uri.port_u16().unwrap_or(default_port);
                match tokio::net::lookup_host((host, port)).await {
                    Ok(addrs) => addrs.map(|addr| with_address(uri, addr)).collect(),
                    Err(error) => {
                        tracing::debug!(%uri, %error, "backend name does not resolve (yet)");
                        Vec::new()
                    }
                }
            };
            if !resolved.is_empty() {
                wanted.extend(resolved.into_iter().map(|url| (url, origin)));
                continue;
            }
            // Unresolved (or an address already): keep what this URL had.
            wanted.extend(
                current
                    .iter()
                    .filter(|m| m.origin == origin)
                    .map(|m| (m.url.clone(), origin)),
            );
        }
        wanted.sort();
        wanted.dedup_by(|a, b| a.0 == b.0);
        let old: HashMap<&str, &Member<C>> = current.iter().map(|m| (m.url.as_str(), m)).collect();
        let mut members = Vec::with_capacity(wanted.len());
        for (url, origin) in &wanted {
            let member = match old.get(url.as_str()) {
                Some(member) => Member {
                    url: url.clone(),
                    origin: *origin,
                    client: member.client.clone(),
                    skip_until: AtomicU64::new(member.skip_until.load(Ordering::Relaxed)),
                },
                None => match endpoint(url, host_name(&self.urls[*origin]), self.tls.as_ref()) {
                    Ok(channel) => Member {
                        url: url.clone(),
                        origin: *origin,
                        client: (self.make)(channel),
                        skip_until: AtomicU64::new(0),
                    },
                    Err(error) => {
                        tracing::warn!(%url, %error, "skipping endpoint");
                        continue;
                    }
                },
            };
            members.push(member);
        }
        if members.is_empty() {
            return;
        }
        let mut before: Vec<&str> = current.iter().map(|m| m.url.as_str()).collect();
        before.sort_unstable();
        let after: Vec<&str> = members.iter().map(|m| m.url.as_str()).collect();
        if before != after {
            tracing::info!(endpoints = ?after, "backend endpoints");
            *self.members.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(members);
        }
    }

    /// Runs `call` on an endpoint, failing over to the others on UNAVAILABLE.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let members = self.snapshot();
        let count = members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = unix_millis();
        // Healthy endpoints first, then the skipped ones as a last resort. Decided up front:
        // the calls below change which endpoints are skipped.
        let (mut order, skipped): (Vec<usize>, Vec<usize>) = (0..count)
            .map(|i| (start + i) % count)
            .partition(|&i| members[i].skip_until.load(Ordering::Relaxed) <= now);
        order.extend(skipped);
        let mut last = Status::unavailable("no endpoint");
        for index in order {
            let member = &members[index];
            match call(member.client.clone()).await {
                Ok(response) => {
                    member.skip_until.store(0, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Err(status) if is_transport_failure(&status) => {
                    member
                        .skip_until
                        .store(unix_millis() + SKIP_MS, Ordering::Relaxed);
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(Status::unavailable(format!(
            "no instance answered: {}",
            last.message()
        )))
    }
}

/// Whether a call failed in transport (the instance is down, was killed mid-call, or timed
/// out) rather than being answered. Such a call may be tried on another instance: every RPC
/// the gateway makes is idempotent (publishes carry an idempotency key). A connection cut
/// mid-call surfaces as UNKNOWN or INTERNAL carrying the h2/hyper/io error; an answer from a
/// handler never carries a source.
fn is_transport_failure(status: &Status) -> bool {
    use std::error::Error as _;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
        Code::Unknown | Code::Internal => {
            let mut source = status.source();
            while let Some(error) = source {
                if error.is::<hyper::Error>()
                    || error.is::<std::io::Error>()
                    || error.is::<tonic::transport::Error>()
                    || error.to_string().starts_with("h2 protocol error")
                {
                    return true;
                }
                source = error.source();
            }
            false
        }
        _ => false,
    }
}

/// One typed RPC of a pool, with its failover.
macro_rules! rpc {
    ($pool:ident . $name:ident ($request:ty) -> $response:ty) => {
        rpc!(pub $pool.$name($request) -> $response);
    };
    ($vis:vis $pool:ident . $name:ident ($request:ty) -> $response:ty) => {
        $vis async fn $name(&self, request: $request) -> Result<$response, Status> {
            self.$pool
                .call(|mut client| {
                    let request = request.clone();
                    async move { client.$name(request).await }
                })
                .await
        }
    };
}

/// The services this gateway forwards to.
pub struct Backends {
    pub room: Arc<Pool<RoomServiceClient<Internal>>>,
    pub auth: Arc<Pool<AuthServiceClient<Internal>>>,
    verify: Batcher<pb::VerifyTokenRequest, pb::VerifyTokenResponse>,
    opened: Batcher<pb::ConnectionOpenedRequest, pb::ConnectionOpenedResponse>,
    closed: Batcher<pb::ConnectionClosedRequest, pb::ConnectionClosedResponse>,
    publishes: Batcher<pb::PublishBatchRequest, pb::PublishBatchResponse>,
}

/// A batch of one goes as the single call (the same trace as without batching; services of
/// an earlier version); more go as the batch call, or as single calls if the service does
/// not know the batch call yet (a rolling upgrade).
async fn one_or_batch<Req, Resp, One, OneFut, Many, ManyFut>(
    batch: Vec<Req>,
    one: One,
    many: Many,
) -> Results<Resp>
where
    One: Fn(Req) -> OneFut,
    OneFut: Future<Output = Result<Resp, Status>>,
    Many: FnOnce(&[Req]) -> ManyFut,
    ManyFut: Future<Output = Result<Results<Resp>, Status>>,
{
    if batch.len() == 1 {
        let request = batch.into_iter().next().expect("one request");
        return vec![one(request).await];
    }
    match many(&batch).await {
        Ok(results) => results,
        Err(status) if status.code() == Code::Unimplemented => {
            futures_util::future::join_all(batch.into_iter().map(one)).await
        }
        Err(status) => batch.iter().map(|_| Err(status.clone())).collect(),
    }
}

/// A batcher of one kind of call on `pool`: `one` is the single RPC, `many` the batch RPC,
/// `gather` builds the batch request and `spread` splits its answer, one result per request.
fn batcher<C, Req, Resp, BatchReq, BatchResp, One, OneFut, Many, ManyFut>(
    name: &'static str,
    pool: Arc<Pool<C>>,
    one: One,
    many: Many,
    gather: fn(&[Req]) -> BatchReq,
    spread: fn(BatchResp) -> Results<Resp>,
) -> Batcher<Req, Resp>
where
    C: Clone + Send + Sync + 'static,
    Req: Clone + Send + Sync + 'static,
    Resp: Send + 'static,
    BatchReq: Clone + Send + Sync + 'static,
    BatchResp: Send + 'static,
    One: Fn(C, Req) -> OneFut + Copy + Send + Sync + 'static,
    OneFut: Future<Output = Result<Response<Resp>, Status>> + Send,
    Many: Fn(C, BatchReq) -> ManyFut + Copy + Send + Sync + 'static,
    ManyFut: Future<Output = Result<Response<BatchResp>, Status>> + Send,
{
    Batcher::new(name, BATCH_MAX, BATCH_IN_FLIGHT, move |batch| {
        let pool = pool.clone();
        async move {
            let pool = &pool;
            let single = |request: Req| async move {
                pool.call(|client| one(client, request.clone())).await
            };
            let batched = |batch: &[Req]| {
                let request = gather(batch);
                async move {
                    let response = pool.call(|client| many(client, request.clone())).await?;
                    Ok(spread(response))
                }
            };
            one_or_batch(batch, single, batched).await
        }
    })
}

fn verify_batcher(
    pool: Arc<Pool<AuthServiceClient<Internal>>>,
) -> Batcher<pb::VerifyTokenRequest, pb::VerifyTokenResponse> {
    batcher(
        "verify_token",
        pool,
        |mut client, request| async move { client.verify_token(request).await },
        |mut client, request| async move { client.verify_tokens(request).await },
        |batch| pb::VerifyTokensRequest {
            tokens: batch.iter().map(|r| r.token.clone()).collect(),
        },
        |response| {
            let results = response.results.into_iter();
            results
                .map(|verified| {
                    verified.status.unwrap_or_default().into_result()?;
                    Ok(pb::VerifyTokenResponse {
                        claims: verified.claims,
                    })
                })
                .collect()
        },
    )
}

fn opened_batcher(
    pool: Arc<Pool<RoomServiceClient<Internal>>>,
) -> Batcher<pb::ConnectionOpenedRequest, pb::ConnectionOpenedResponse> {
    batcher(
        "connection_opened",
        pool,
        |mut client, request| async move { client.connection_opened(request).await },
        |mut client, request| async move { client.connections_opened(request).await },
        |batch| pb::ConnectionsOpenedRequest {
            connections: batch.to_vec(),
        },
        |response| {
            let outcomes = response.outcomes.into_iter();
            outcomes
                .map(|outcome| {
                    outcome.status.unwrap_or_default().into_result()?;
                    Ok(pb::ConnectionOpenedResponse {
                        connections: outcome.connections,
                    })
                })
                .collect()
        },
    )
}

fn closed_batcher(
    pool: Arc<Pool<RoomServiceClient<Internal>>>,
) -> Batcher<pb::ConnectionClosedRequest, pb::ConnectionClosedResponse> {
    batcher(
        "connection_closed",
        pool,
        |mut client, request| async move { client.connection_closed(request).await },
        |mut client, request| async move { client.connections_closed(request).await },
        |batch| pb::ConnectionsClosedRequest {
            connections: batch.to_vec(),
        },
        |response| {
            let outcomes = response.outcomes.into_iter();
            outcomes
                .map(|status| {
                    status
                        .into_result()
                        .map(|()| pb::ConnectionClosedResponse {})
                })
                .collect()
        },
    )
}

/// Most publishes, and payload bytes / 1 KiB, in one `PublishBatch` (the room-service takes
/// up to 1024 publishes, and 1 MiB keeps a call well inside a 4 MiB gRPC message). One
/// connection's batch never weighs more (`pipeline.rs`), so it always fits alone.
const PUBLISH_BATCH_WEIGHT: usize = 1024;

/// `PublishBatch` calls in flight at once. Two, like the other batched calls: with four, many
/// small rooms (10,000 × 5 members, 3 gateways, 2 room-services) sent one call per publish up
/// to 6,000 publishes/s, and the calls' writes and wake-ups were most of the room-services' CPU
/// (42 µs per publish at 6,000/s; 35 with two, 24-31 with one), and the ramp failed at 6,000/s
/// instead of passing 8,000-10,000. Two rather than one so that a slow call (an instance being
/// killed, a call waiting out its timeout) does not hold up all of a gateway's publishes.
const PUBLISH_IN_FLIGHT: usize = 2;

/// Least time between two `PublishBatch` calls of a gateway unless a full one is waiting
/// (`PUBLISH_BATCH_MS`). A gRPC call costs the gateway and the room-service tens of µs each
/// whatever it carries: with many small rooms (10,000 × 5 members, 3 gateways, 2
/// room-services) calls carried 1.6 publishes at 3,000 publishes/s and 6 with 5 ms pacing,
/// which cut all servers' CPU per publish, Redis included, from 279 to 206 µs (p50 +1.8 ms).
pub const DEFAULT_PUBLISH_PACING: Duration = Duration::from_millis(5);

/// How much of a combined `PublishBatch` a connection's batch takes.
fn publish_weight(request: &pb::PublishBatchRequest) -> usize {
    let bytes: usize = request.publishes.iter().map(|p| p.data_json.len()).sum();
    request.publishes.len().max(bytes.div_ceil(1024))
}

/// `request` as the next try sends it (`tries` counts them): a try after the first may find
/// the first one's results stored, so it must not say `first_try`.
fn publish_try(request: &pb::PublishBatchRequest, tries: &AtomicUsize) -> pb::PublishBatchRequest {
    let mut request = request.clone();
    if tries.fetch_add(1, Ordering::Relaxed) > 0 {
        for publish in &mut request.publishes {
            publish.first_try = false;
        }
    }
    request
}

/// Connections' publish batches of the moment as one `PublishBatch` call. Each connection's
/// publishes stay together and in order in it (the room-service stores a batch in order), and
/// a connection has one batch in flight at a time, so its order holds across calls too.
fn publish_batcher(
    pool: Arc<Pool<RoomServiceClient<Internal>>>,
) -> Batcher<pb::PublishBatchRequest, pb::PublishBatchResponse> {
    Batcher::weighted(
        "publish_batch",
        publish_weight,
        PUBLISH_BATCH_WEIGHT,
        PUBLISH_IN_FLIGHT,
        move |batch: Vec<pb::PublishBatchRequest>| {
            let pool = pool.clone();
            async move {
                let counts: Vec<usize> = batch.iter().map(|r| r.publishes.len()).collect();
                let request = pb::PublishBatchRequest {
                    publishes: batch.into_iter().flat_map(|r| r.publishes).collect(),
                };
                let tries = AtomicUsize::new(0);
                let response = pool
                    .call(|mut client| {
                        let request = publish_try(&request, &tries);
                        async move { client.publish_batch(request).await }
                    })
                    .await;
                match response {
                    Ok(response) => {
                        // Each connection gets its own slice of the answer, in order; one the
                        // answer falls short of reports the missing results itself.
                        let mut results = response.results.into_iter();
                        counts
                            .iter()
                            .map(|&n| {
                                Ok(pb::PublishBatchResponse {
                                    results: results.by_ref().take(n).collect(),
                                })
                            })
                            .collect()
                    }
                    Err(status) => counts.iter().map(|_| Err(status.clone())).collect(),
                }
            }
        },
    )
    .paced(DEFAULT_PUBLISH_PACING)
}

impl Backends {
    /// Every call carries `internal_token`, the credential the services require. `tls`
    /// applies to `https://` URLs (default: the system's roots, no client certificate).
    pub fn new(
        room_urls: &str,
        auth_urls: &str,
        internal_token: &str,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, BackendConfigError> {
        let attach = AttachBearer::new(internal_token)?;
        let room_attach = attach.clone();
        let room = Arc::new(Pool::new(room_urls, tls.clone(), move |channel| {
            RoomServiceClient::new(internal(channel, &room_attach))
        })?);
        let auth = Arc::new(Pool::new(auth_urls, tls, move |channel| {
            AuthServiceClient::new(internal(channel, &attach))
        })?);
        Ok(Self {
            verify: verify_batcher(auth.clone()),
            opened: opened_batcher(room.clone()),
            closed: closed_batcher(room.clone()),
            publishes: publish_batcher(room.clone()),
            room,
            auth,
        })
    }

    /// Spaces `PublishBatch` calls at least `pacing` apart (default
    /// [`DEFAULT_PUBLISH_PACING`]; zero: a call goes as soon as a slot is free).
    pub fn with_publish_pacing(mut self, pacing: Duration) -> Self {
        self.publishes = self.publishes.paced(pacing);
        self
    }

    /// `VerifyToken`, batched with the other handshakes of the moment.
    pub async fn verify_token(
        &self,
        request: pb::VerifyTokenRequest,
    ) -> Result<pb::VerifyTokenResponse, Status> {
        self.verify.call(request).await
    }

    /// `ConnectionOpened`, batched with the other handshakes of the moment.
    pub async fn connection_opened(
        &self,
        request: pb::ConnectionOpenedRequest,
    ) -> Result<pb::ConnectionOpenedResponse, Status> {
        self.opened.call(request).await
    }

    /// `ConnectionClosed`, batched with the other closes of the moment.
    pub async fn connection_closed(
        &self,
        request: pb::ConnectionClosedRequest,
    ) -> Result<pb::ConnectionClosedResponse, Status> {
        self.closed.call(request).await
    }

    rpc!(auth.authorize(pb::AuthorizeRequest) -> pb::AuthorizeResponse);
    rpc!(room.join(pb::JoinRequest) -> pb::JoinResponse);
    rpc!(room.leave(pb::LeaveRequest) -> pb::LeaveResponse);
    rpc!(room.publish(pb::PublishRequest) -> pb::PublishResponse);

    /// One connection's ordered `PublishBatch`, sent together with other connections' batches
    /// of the moment: the call is made even if the receiver is dropped.
    /// `next`: the connection's previous batch was in flight when these publishes came, so
    /// they do not wait out the call pacing as well ([`crate::batcher::Batcher::submit_next`]).
    pub fn submit_publishes(
        &self,
        request: pb::PublishBatchRequest,
        span: tracing::Span,
        next: bool,
    ) -> Pending<pb::PublishBatchResponse> {
        if next {
            self.publishes.submit_next(request, span)
        } else {
            self.publishes.submit(request, span)
        }
    }
    rpc!(room.presence(pb::PresenceRequest) -> pb::PresenceResponse);
    rpc!(room.history(pb::HistoryRequest) -> pb::HistoryResponse);
    rpc!(room.gateway_heartbeat(pb::GatewayHeartbeatRequest) -> pb::GatewayHeartbeatResponse);

    /// `Join`, with a recovery larger than one transport message completed from history
    /// pages: `missed` then holds every message up to the join's offset. If the history moved
    /// on meanwhile (new epoch, or trimmed past the cursor), the join says `recovered: false`.
    pub async fn join_recovering(
        &self,
        request: pb::JoinRequest,
    ) -> Result<pb::JoinResponse, Status> {
        let room = request.room.clone();
        let mut joined = self.join(request).await?;
        while joined.more {
            let Some(cursor) = joined.missed.last().map(|p| p.offset) else {
                break;
            };
            if cursor >= joined.offset {
                break;
            }
            let page = self
                .history(pb::HistoryRequest {
                    room: room.clone(),
                    since: Some(cursor),
                    limit: 0,
                })
                .await?;
            let contiguous = page.publications.first().map(|p| p.offset) == Some(cursor + 1);
            if page.epoch != joined.epoch || !contiguous {
                joined.recovered = Some(false);
                joined.missed.clear();
                break;
            }
            joined.more = page.more;
            joined.missed.extend(
                page.publications
                    .into_iter()
                    .take_while(|p| p.offset <= joined.offset),
            );
        }
        joined.more = false;
        Ok(joined)
    }

    /// `History` for up to `request.limit` messages however large: pages are fetched until
    /// the limit or the end of the history.
    pub async fn history_pages(
        &self,
        request: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, Status> {
        let limit = request.limit as usize;
        let mut history = self.history(request.clone()).await?;
        while history.more && history.publications.len() < limit {
            let Some(cursor) = history.publications.last().map(|p| p.offset) else {
                break;
            };
            let left = limit - history.publications.len();
            let page = self
                .history(pb::HistoryRequest {
                    room: request.room.clone(),
                    since: Some(cursor),
                    limit: u32::try_from(left).unwrap_or(u32::MAX),
                })
                .await?;
            if page.epoch != history.epoch || page.publications.is_empty() {
                break;
            }
            history.more = page.more;
            history.publications.extend(page.publications);
        }
        Ok(history)
    }

    /// Resolves the services' host names now and then every [`RESOLVE_EVERY`].
    pub async fn keep_resolved(&self) {
        let mut tick = tokio::time::interval(RESOLVE_EVERY);
        loop {
            tick.tick().await;
            self.room.refresh().await;
            self.auth.refresh().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fails_over_on_unavailable_and_not_on_other_errors() {
        let pool = Pool::new("http://127.0.0.1:1, http://127.0.0.1:2", None, |c| c).unwrap();
        let calls = std::sync::Mutex::new(Vec::new());
        let result: Result<(), Status> = pool
            .call(|_c| {
                calls.lock().unwrap().push(());
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.lock().unwrap().len(), 2);
        let result: Result<(), Status> = pool
            .call(|_c| async { Err(Status::invalid_argument("bad")) })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_publish_failed_over_is_no_longer_a_first_try() {
        let pool = Pool::new("http://127.0.0.1:1, http://127.0.0.1:2", None, |c| c).unwrap();
        let request = pb::PublishBatchRequest {
            publishes: vec![pb::PublishRequest {
                idempotency_key: "retry:c:1".into(),
                first_try: true,
                ..Default::default()
            }],
        };
        let tries = AtomicUsize::new(0);
        let sent = std::sync::Mutex::new(Vec::new());
        let result: Result<(), Status> = pool
            .call(|_c| {
                let request = publish_try(&request, &tries);
                sent.lock().unwrap().push(request.publishes[0].first_try);
                async { Err(Status::unavailable("down")) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(*sent.lock().unwrap(), [true, false]);
    }

    #[test]
    fn rejects_empty_and_bad_lists() {
        assert!(Pool::new(" , ", None, |c| c).is_err());
        assert!(Pool::new("not a url\u{0}", None, |c| c).is_err());
        assert!(Pool::new("/path-only", None, |c| c).is_err());
    }

    #[tokio::test]
    async fn a_host_name_becomes_one_endpoint_per_address() {
        let pool = Pool::new("http://localhost:50051,http://127.0.0.1:7", None, |c| c).unwrap();
        pool.refresh().await;
        let endpoints = pool.endpoints();
        assert!(
            endpoints.contains(&"http://127.0.0.1:7".to_owned()),
            "{endpoints:?}"
        );
        assert!(
            endpoints.contains(&"http://127.0.0.1:50051".to_owned()),
            "localhost resolved to its addresses: {endpoints:?}"
        );
        assert!(
            !endpoints.iter().any(|e| e.contains("localhost")),
            "{endpoints:?}"
        );
        // A second refresh with the same answer keeps the same endpoints.
        pool.refresh().await;
        assert_eq!(pool.endpoints(), endpoints);
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_kept_as_is() {
        let pool = Pool::new("http://no-such-host.invalid:50051", None, |c| c).unwrap();
        pool.refresh().await;
        assert_eq!(pool.endpoints(), ["http://no-such-host.invalid:50051"]);
    }
}
