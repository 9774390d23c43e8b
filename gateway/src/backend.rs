//! gRPC clients for the room and auth services, each over a list of endpoints.
//!
//! Requests go round-robin over the endpoints. When one answers UNAVAILABLE (down, refused,
//! timed out) it is skipped for a moment and the request is tried on the next one, so killing
//! one instance of a service does not stop the gateway. A request the dead instance may already
//! have applied can thus be applied twice (a publish could be duplicated); that is the price of
//! not losing it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use roomcast_common::unix_millis;
use roomcast_proto::auth_service_client::AuthServiceClient;
use roomcast_proto::room_service_client::RoomServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

/// How long an endpoint that answered UNAVAILABLE is skipped.
const SKIP_MS: u64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    #[error("no endpoint in {0:?}")]
    Empty(String),
    #[error("bad endpoint {url:?}: {source}")]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
}

/// One client per endpoint, with failover.
pub struct Pool<C> {
    clients: Vec<C>,
    /// Per endpoint: unix ms until which it is skipped.
    skip_until: Vec<AtomicU64>,
    next: AtomicUsize,
}

impl<C: Clone> Pool<C> {
    /// `urls`: one URL or a comma-separated list.
    pub fn new(urls: &str, make: impl Fn(Channel) -> C) -> Result<Self, BackendConfigError> {
        let mut clients = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let endpoint = Endpoint::from_shared(url.to_owned())
                .map_err(|source| BackendConfigError::BadUrl {
                    url: url.to_owned(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            clients.push(make(endpoint.connect_lazy()));
        }
        if clients.is_empty() {
            return Err(BackendConfigError::Empty(urls.to_owned()));
        }
        let skip_until = clients.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self {
            clients,
            skip_until,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `call` on an endpoint, failing over to the others on UNAVAILABLE.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let count = self.clients.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = unix_millis();
        // Healthy endpoints first, then the skipped ones as a last resort. Decided up front:
        // the calls below change which endpoints are skipped.
        let (mut order, skipped): (Vec<usize>, Vec<usize>) = (0..count)
            .map(|i| (start + i) % count)
            .partition(|&i| self.skip_until[i].load(Ordering::Relaxed) <= now);
        order.extend(skipped);
        let mut last = Status::unavailable("no endpoint");
        for index in order {
            match call(self.clients[index].clone()).await {
                Ok(response) => {
                    self.skip_until[index].store(0, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Err(status) if status.code() == Code::Unavailable => {
                    self.skip_until[index].store(unix_millis() + SKIP_MS, Ordering::Relaxed);
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

/// The services this gateway forwards to.
pub struct Backends {
    pub room: Pool<RoomServiceClient<Channel>>,
    pub auth: Pool<AuthServiceClient<Channel>>,
}

impl Backends {
    pub fn new(room_urls: &str, auth_urls: &str) -> Result<Self, BackendConfigError> {
        Ok(Self {
            room: Pool::new(room_urls, RoomServiceClient::new)?,
            auth: Pool::new(auth_urls, AuthServiceClient::new)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fails_over_on_unavailable_and_not_on_other_errors() {
        let pool = Pool::new("http://127.0.0.1:1, http://127.0.0.1:2", |c| c).unwrap();
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

    #[test]
    fn rejects_empty_and_bad_lists() {
        assert!(Pool::new(" , ", |c| c).is_err());
        assert!(Pool::new("not a url\u{0}", |c| c).is_err());
    }
}
