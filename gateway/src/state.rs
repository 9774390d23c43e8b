//! What every connection of one gateway shares: its id, the hub, the broker subscriptions,
//! the backends, the settings and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, header};
use roomcast_common::broker::Publisher;
use roomcast_common::namespace::Namespaces;
use roomcast_common::ops::Readiness;

use crate::backend::Backends;
use crate::config::ConnectionSettings;
use crate::hub::Hub;
use crate::limits::UserConnections;
use crate::subscriptions::Subscriptions;

/// Everything the connections of this gateway share.
pub struct Gateway {
    /// Unique id; prefix of every client id issued here.
    pub id: String,
    pub hub: Arc<Hub>,
    pub subscriptions: Subscriptions,
    /// The broker's sending side: SSE commands posted to another gateway reach this one's
    /// sessions through it, and this one forwards commands for sessions held elsewhere.
    pub publisher: Arc<dyn Publisher>,
    pub backends: Backends,
    pub settings: ConnectionSettings,
    /// Parsed `ALLOWED_ORIGINS`; empty allows any.
    origins: Vec<String>,
    pub readiness: Readiness,
    /// Open connections per user, for `MAX_CONNECTIONS_PER_USER`.
    pub(crate) users: UserConnections,
    next_client: AtomicU64,
    /// `NAMESPACES_FILE`: which client commands each room's namespace allows.
    pub namespaces: Arc<Namespaces>,
}

impl Gateway {
    pub fn new(
        id: String,
        hub: Arc<Hub>,
        subscriptions: Subscriptions,
        publisher: Arc<dyn Publisher>,
        backends: Backends,
        settings: ConnectionSettings,
        readiness: Readiness,
    ) -> Self {
        Self {
            id,
            hub,
            subscriptions,
            publisher,
            backends,
            origins: settings.origins(),
            settings,
            readiness,
            users: UserConnections::default(),
            next_client: AtomicU64::new(1),
            namespaces: Arc::default(),
        }
    }

    /// Applies `namespaces` to client commands (publish, presence).
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    /// Connections accepted so far (client ids issued).
    pub fn connections_opened(&self) -> u64 {
        self.next_client.load(Ordering::Relaxed) - 1
    }

    /// A client id unique in the cluster: this gateway's id and a sequence number.
    pub fn next_client_id(&self) -> String {
        format!(
            "{}-{}",
            self.id,
            self.next_client.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(crate) fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        // Non-browser clients send no Origin; the check exists against cross-site browser use.
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        self.origins.iter().any(|o| o == origin)
    }
}
