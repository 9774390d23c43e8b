//! `telemetry::init` with `OTEL_EXPORTER_OTLP_ENDPOINT` set sends spans over OTLP/gRPC: a
//! collector in the test (loopback) receives them with the span names, fields, parent links and
//! `service.name`.
//!
//! One test in this file: the subscriber and the environment are process-wide.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Hands every export request to the test.
struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let _ = self.0.send(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

#[allow(unsafe_code)]
fn set_env(pairs: &[(&str, Option<&str>)]) {
    for (name, value) in pairs {
        // SAFETY: this file holds one test, which sets the variables before telemetry starts
        // any thread; no other thread of this process reads the environment meanwhile.
        unsafe {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
}

#[tokio::test]
async fn spans_reach_an_otlp_grpc_collector_with_the_service_name() {
    tokio::time::timeout(Duration::from_secs(10), run())
        .await
        .expect("the test took more than 10 s");
}

async fn run() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut exports) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let endpoint = format!("http://{addr}");
    set_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", Some(&endpoint)),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None),
        ("OTEL_SERVICE_NAME", None),
        ("OTEL_RESOURCE_ATTRIBUTES", None),
        ("RUST_LOG", Some("info")),
    ]);
    // What the binaries call: service.name comes from the executable, `otlp_export-<hash>`.
    roomcast_common::telemetry::init();

    {
        let request = tracing::info_span!("RoomService/Join", room = "lobby");
        let _entered = request.enter();
        tracing::info_span!("store.join").in_scope(|| tracing::info!("joined"));
    }
    // A debug span is below RUST_LOG=info: not exported.
    tracing::debug_span!("filtered-out").in_scope(|| {});

    // Flushes; it blocks, and the collector runs on this (current-thread) runtime.
    tokio::task::spawn_blocking(roomcast_common::telemetry::shutdown)
        .await
        .unwrap();

    let mut spans: Vec<(String, Span)> = Vec::new();
    while let Ok(request) = exports.try_recv() {
        for resource_spans in request.resource_spans {
            let attributes = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            let service = string_attribute(&attributes, "service.name").unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
    }

    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let find = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name)
            .unwrap_or_else(|| panic!("no span {name:?} among {names:?}"))
    };
    let (service, request) = find("RoomService/Join");
    assert!(
        service.starts_with("otlp_export"),
        "service.name is {service:?}"
    );
    assert_eq!(
        string_attribute(&request.attributes, "room").as_deref(),
        Some("lobby")
    );
    assert!(
        request.parent_span_id.is_empty(),
        "the request span is a root"
    );

    let (_, inner) = find("store.join");
    assert_eq!(inner.trace_id, request.trace_id);
    assert_eq!(inner.parent_span_id, request.span_id);
    assert!(
        inner.events.iter().any(|e| e.name == "joined"),
        "the log line inside is a span event"
    );

    assert!(!names.contains(&"filtered-out"), "{names:?}");
}
