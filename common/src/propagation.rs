//! W3C trace context (`traceparent`, `tracestate`) across gRPC calls, so a request that crosses
//! processes is one trace.
//!
//! - Clients: [`InjectTraceContext`], a tonic interceptor, writes the caller's current span
//!   into the call's metadata.
//! - Servers: [`ExtractTraceContextLayer`], a tower layer on the whole server
//!   (`Server::builder().layer(..)`), reads it from the request headers and runs every call in
//!   a server span named by its RPC (`roomcast.v1.RoomService/Join`), the caller's child.
//!   Handlers do nothing themselves.
//!
//! Both are switched on by [`enable`], which [`crate::telemetry`] calls when span export is on.
//! Until then they do nothing beyond one atomic load per call: no header is written, read or
//! parsed, and the call's future is not wrapped.
//!
//! This is independent of the credentials in [`crate::credential`]: a client stacks both
//! interceptors, a server runs this layer around the services and their credential checks.

use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};

use futures_util::future::Either;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

/// Target of spans that are only worth creating when they are exported
/// ([`crate::telemetry`]). `RUST_LOG` applies to them as to any target, e.g.
/// `info,roomcast::trace=off`.
pub const TRACING_ONLY: &str = "roomcast::trace";

/// Set once export is on; `None`: propagation is off.
static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();

/// Switches propagation on for the rest of the process.
pub fn enable() {
    let _ = PROPAGATOR.set(TraceContextPropagator::new());
}

/// Whether [`enable`] was called.
pub fn is_enabled() -> bool {
    PROPAGATOR.get().is_some()
}

/// Writes the current span's context into `metadata`, when propagation is on and a span is
/// current.
pub fn inject(metadata: &mut MetadataMap) {
    let Some(propagator) = PROPAGATOR.get() else {
        return;
    };
    let cx = Context::current();
    if !cx.span().span_context().is_valid() {
        return;
    }
    propagator.inject_context(&cx, &mut MetadataInjector(metadata));
}

/// The remote context carried by `headers`, when propagation is on and they hold a valid one.
pub fn extract(headers: &http::HeaderMap) -> Option<Context> {
    let propagator = PROPAGATOR.get()?;
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = propagator.extract_with_context(&Context::new(), &HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Client side: adds the current span's `traceparent` / `tracestate` to every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectTraceContext;

impl Interceptor for InjectTraceContext {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

/// Server side: runs each call under the trace context its headers carry (see the module).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractTraceContextLayer;

impl<S> tower_layer::Layer<S> for ExtractTraceContextLayer {
    type Service = ExtractTraceContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ExtractTraceContext { inner }
    }
}

/// The service of [`ExtractTraceContextLayer`].
#[derive(Debug, Clone)]
pub struct ExtractTraceContext<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for ExtractTraceContext<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !is_enabled() {
            return Either::Left(self.inner.call(request));
        }
        let parent = extract(request.headers()).unwrap_or_default();
        let rpc = request.uri().path().trim_start_matches('/');
        // Made while the caller's context is current: that is the span's parent.
        let span = {
            let _current = parent.attach();
            tracing::info_span!(target: TRACING_ONLY, "grpc.server", otel.name = %rpc, otel.kind = "server")
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Either::Right(future.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn remote() -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    /// One test: [`enable`] is process-wide (other tests in this crate neither enable it nor
    /// depend on it being off).
    #[test]
    fn off_until_enabled_then_round_trips_through_metadata_and_headers() {
        let mut metadata = MetadataMap::new();
        if !is_enabled() {
            let _current = remote().attach();
            inject(&mut metadata);
            assert!(metadata.is_empty(), "injected while off: {metadata:?}");
        }

        enable();
        // No current span: nothing to send.
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());

        {
            let _current = remote().attach();
            let request = InjectTraceContext.call(Request::new(())).unwrap();
            metadata = request.metadata().clone();
        }
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );

        let headers = metadata.into_headers();
        let extracted = extract(&headers).expect("a context");
        let span = extracted.span();
        assert_eq!(
            span.span_context().trace_id(),
            remote().span().span_context().trace_id()
        );
        assert_eq!(
            span.span_context().span_id(),
            remote().span().span_context().span_id()
        );
        assert!(span.span_context().is_remote());

        let mut bad = http::HeaderMap::new();
        bad.insert("traceparent", "00-not-a-trace".parse().unwrap());
        assert!(extract(&bad).is_none());
        assert!(extract(&http::HeaderMap::new()).is_none());
    }
}
