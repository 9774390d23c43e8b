//! Logging and trace export shared by every binary.
//!
//! - `RUST_LOG` filters (default `info`); it applies to log lines and exported spans alike.
//! - `LOG_FORMAT=json` switches to one JSON object per line on stderr.
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), e.g.
//!   `http://otel-collector:4317`, turns on span export over OTLP/gRPC (plain HTTP/2, no TLS).
//!   Unset or empty: no export, nothing else starts. `OTEL_EXPORTER_OTLP_TIMEOUT`,
//!   `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_RESOURCE_ATTRIBUTES` are honoured as the OpenTelemetry
//!   SDK defines them.
//! - `service.name` is `OTEL_SERVICE_NAME` when set, else the name given to
//!   [`init_with_service`], else (for [`init`]) the executable's file name: `gateway`,
//!   `room-service`, `auth-service`.
//!
//! Spans are batched (every 5 s or 512 spans, at most 2048 queued) and sent from a background
//! thread; the gRPC connection runs on a small runtime of its own ("otel-export", one thread), so
//! export works whether or not the caller is inside a tokio runtime, and never competes with a
//! current-thread runtime. When the collector cannot be reached the batch is dropped after the
//! exporter's timeout (10 s by default): requests never wait on it, one warning is logged when
//! export starts failing and one info line when it works again.
//!
//! While export is on, W3C trace context crosses gRPC calls ([`crate::propagation`]), so a
//! request that goes through several processes is one trace.
//!
//! Spans with the target [`TRACING_ONLY`] exist for export alone (the gateway's per-request
//! spans): with export off they are switched off where they are written, so they cost a
//! cached check, no allocation; with export on they are logged like any span too.
//!
//! Binaries call [`shutdown`] last thing before exiting so the spans of the final seconds are
//! sent; it waits at most [`SHUTDOWN_TIMEOUT`] and does nothing when export is off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Metadata;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterFn, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// Target of spans that are only worth creating when they are exported (see the module).
/// Defined beside the gRPC span that uses it too, so that propagation does not import this
/// module, which switches it on.
pub use crate::propagation::TRACING_ONLY;

/// Longest [`shutdown`] waits for the last spans to be sent.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Used when neither a name nor the executable's name is available.
const FALLBACK_SERVICE_NAME: &str = "roomcast";

/// The provider behind the installed subscriber, while export is on.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Carries the exporter's gRPC connection; lives as long as the process.
static EXPORT_RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// Sets up logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, span export, with
/// `service.name` taken from `OTEL_SERVICE_NAME` or else the executable's file name.
pub fn init() {
    init_with_service(&executable_name().unwrap_or_else(|| FALLBACK_SERVICE_NAME.to_owned()));
}

/// Like [`init`], with `service_name` as the `service.name` unless `OTEL_SERVICE_NAME` is set.
///
/// A second call (tests, standalone) keeps the first subscriber and exports nothing new.
pub fn init_with_service(service_name: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text_layer = (!json).then(|| fmt::layer().with_ansi(ansi).with_writer(std::io::stderr));
    let json_layer = json.then(|| {
        fmt::layer()
            .json()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });

    let service_name = resolve_service_name(service_name);
    let endpoint = export_endpoint();
    let (provider, build_error) = match &endpoint {
        None => (None, None),
        Some(endpoint) => match build_provider(endpoint, &service_name) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
    };
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("roomcast"))
            .with_filter(filter_fn(|metadata| exported_target(metadata.target())))
    });

    // Without an exporter, spans that exist only for it are disabled at their call sites.
    let tracing_only_off = otel_layer.is_none().then(tracing_only_off);

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_only_off)
        .with(text_layer)
        .with(json_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();

    match (provider, endpoint) {
        (Some(provider), Some(endpoint)) if installed => {
            tracing::info!(%endpoint, service.name = %service_name, "exporting spans over OTLP/gRPC");
            *lock_provider() = Some(provider);
            crate::propagation::enable();
        }
        // Another subscriber was installed first; this provider has no span to send.
        (Some(provider), _) => {
            let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        }
        (None, Some(endpoint)) => {
            if let Some(error) = build_error {
                tracing::warn!(%endpoint, %error, "OTLP span export is off: cannot set up the exporter");
            }
        }
        (None, None) => {}
    }
}

/// Sends the spans still queued and stops export; waits at most [`SHUTDOWN_TIMEOUT`]. Call it
/// once, last thing before the process exits (after the servers have stopped). Does nothing
/// when export is off or already shut down; spans ended afterwards are not exported.
pub fn shutdown() {
    let Some(provider) = lock_provider().take() else {
        return;
    };
    if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
        tracing::warn!(%error, "OTLP span export: the last spans may be lost");
    }
}

fn lock_provider() -> std::sync::MutexGuard<'static, Option<SdkTracerProvider>> {
    PROVIDER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A global filter that turns off everything with the target [`TRACING_ONLY`].
fn tracing_only_off() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    filter_fn(|metadata| metadata.target() != TRACING_ONLY)
}

/// The configured OTLP endpoint, if any (the trace-specific variable wins, as in the SDK).
fn export_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .map(|value| value.trim().to_owned())
    .find(|value| !value.is_empty())
}

fn resolve_service_name(given: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| Some(given.trim().to_owned()).filter(|name| !name.is_empty()))
        .unwrap_or_else(|| FALLBACK_SERVICE_NAME.to_owned())
}

/// The running executable's file name without extension, e.g. `room-service`.
fn executable_name() -> Option<String> {
    let path = std::env::current_exe().ok()?;
    let stem = path.file_stem()?.to_str()?;
    (!stem.is_empty()).then(|| stem.to_owned())
}

/// Spans of the transport crates are not exported: the exporter's own gRPC client would
/// otherwise report on itself, batch after batch, under `RUST_LOG=trace`.
fn exported_target(target: &str) -> bool {
    const INTERNAL: [&str; 6] = [
        "h2",
        "hyper",
        "hyper_util",
        "tonic",
        "tower",
        "opentelemetry",
    ];
    let crate_name = target.split("::").next().unwrap_or(target);
    !INTERNAL
        .iter()
        .any(|internal| crate_name == *internal || crate_name.starts_with("opentelemetry"))
}

fn export_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    if let Some(runtime) = EXPORT_RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()?;
    // A racing caller's runtime may win; ours is then dropped here, outside any runtime.
    Ok(EXPORT_RUNTIME.get_or_init(|| runtime))
}

/// A batch exporter to `endpoint` (resolved by the OTLP crate from the same variables) with
/// `service.name` set.
fn build_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, String> {
    let runtime = export_runtime().map_err(|e| format!("cannot start the export runtime: {e}"))?;
    // The channel is lazy: nothing connects until the first batch, and it reconnects by itself.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| e.to_string())?
    };
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(WarnOnce::new(exporter, endpoint))
        .with_resource(resource)
        .build())
}

/// Passes batches through and turns a run of failed exports into one warning (and one info
/// line when export works again), instead of one message per batch.
#[derive(Debug)]
struct WarnOnce<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E> WarnOnce<E> {
    fn new(inner: E, endpoint: &str) -> Self {
        Self {
            inner,
            endpoint: endpoint.to_owned(),
            failing: AtomicBool::new(false),
        }
    }
}

impl<E: SpanExporter> SpanExporter for WarnOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "OTLP span export works again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        %error,
                        spans,
                        "OTLP span export failed; spans are dropped until the collector answers"
                    );
                } else {
                    tracing::debug!(endpoint = %self.endpoint, %error, spans, "OTLP span export failed");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig as _;

    use super::*;

    #[test]
    fn transport_crates_are_not_exported() {
        for target in [
            "h2",
            "h2::proto::connection",
            "hyper_util::client",
            "tonic::transport",
            "tower::buffer::worker",
            "opentelemetry_sdk",
            "opentelemetry-otlp",
        ] {
            assert!(!exported_target(target), "{target}");
        }
        for target in [
            "roomcast_room::service",
            "room_service",
            "tonicity",
            "hyperloop",
        ] {
            assert!(exported_target(target), "{target}");
        }
    }

    #[test]
    fn tracing_only_spans_are_off_without_an_exporter() {
        use tracing::Subscriber as _;
        use tracing::level_filters::LevelFilter;

        // As `init` assembles it without an exporter.
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(Some(tracing_only_off()))
            .with(fmt::layer().with_writer(std::io::sink));
        // The filter keeps the level's fast path: `debug!` stays a cached no.
        assert_eq!(subscriber.max_level_hint(), Some(LevelFilter::INFO));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::info_span!(target: TRACING_ONLY, "gateway.publish").is_disabled());
            assert!(!tracing::info_span!("roomcast.v1.RoomService/Join").is_disabled());
            assert!(tracing::enabled!(tracing::Level::INFO));
        });
    }

    #[test]
    fn the_given_name_is_kept_and_blank_names_fall_back() {
        // OTEL_SERVICE_NAME is not set by the test runner.
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            assert_eq!(resolve_service_name("room-service"), "room-service");
            assert_eq!(resolve_service_name("  "), FALLBACK_SERVICE_NAME);
        }
        assert!(executable_name().is_some_and(|name| !name.is_empty()));
    }

    #[test]
    fn a_silent_collector_neither_blocks_nor_panics() {
        // Takes TCP connections (the kernel's backlog) but never answers: the worst case, a
        // refused connection fails faster.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let exporter = {
            let _entered = export_runtime().unwrap().enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(&endpoint)
                .with_timeout(Duration::from_secs(1))
                .build()
                .unwrap()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(WarnOnce::new(exporter, &endpoint))
            .build();
        let tracer = provider.tracer("test");

        // Two batches (512 spans each) while the exports hang.
        let started = Instant::now();
        for _ in 0..1_000 {
            tracer.in_span("unsent", |_| {});
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ending spans waited on the collector: {:?}",
            started.elapsed()
        );

        // Each hung export gives up after its 1 s timeout; the batch is dropped.
        let started = Instant::now();
        let _ = provider.force_flush();
        let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "flush and shutdown took {:?}",
            started.elapsed()
        );
        drop(silent);
    }
}
