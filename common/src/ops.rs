//! Operational HTTP endpoints: `/healthz` (alive), `/readyz` (ready for traffic), `/metrics`
//! (Prometheus text). The services serve them on their own address; the gateway merges the same
//! routes into its HTTP router.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Readiness: false while starting, while a required backend is unreachable (the owner's
/// health check flips it), and for good once draining started.
#[derive(Clone, Default)]
pub struct Readiness {
    healthy: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Set by health checks.
    pub fn set(&self, ready: bool) {
        self.healthy.store(ready, Ordering::Relaxed);
    }
    /// Not ready from now on, whatever health checks say.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    pub fn get(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.is_draining()
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; the handle still renders ours.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// A metric handle registered once, with the process's recorder ([`prometheus`], installed
/// first if need be). The `counter!` and `histogram!` macros look their key up in the registry
/// on every call (hashing and cloning it: about 0.5% of a gateway's and of a room-service's
/// CPU in many small rooms), which paths taken once per message should not pay.
pub fn cached<T>(cell: &'static OnceLock<T>, register: impl FnOnce() -> T) -> &'static T {
    cell.get_or_init(|| {
        prometheus();
        register()
    })
}

/// Router with the three endpoints.
pub fn router(readiness: Readiness) -> Router {
    prometheus();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { prometheus().render() }))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}
