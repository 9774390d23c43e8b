//! An OTLP/gRPC trace collector in the test process: the processes under test export their
//! spans to it (`OTEL_EXPORTER_OTLP_ENDPOINT`), and the test reads them back with the
//! `service.name` of the process that sent each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};

/// One received span and the `service.name` of its sender.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// A string attribute of the span.
    pub fn attribute(&self, key: &str) -> Option<String> {
        string_attribute(&self.span.attributes, key)
    }

    /// Hex trace id, for messages.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// Whether `self` is `parent`'s direct child (same trace, parent span id).
    pub fn is_child_of(&self, parent: &ReceivedSpan) -> bool {
        self.span.trace_id == parent.span.trace_id
            && self.span.parent_span_id == parent.span.span_id
    }
}

impl std::fmt::Display for ReceivedSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} trace {} span {} parent {}",
            self.service,
            self.span.name,
            hex(&self.span.trace_id),
            hex(&self.span.span_id),
            hex(&self.span.parent_span_id),
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let attributes = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            let service = string_attribute(&attributes, "service.name").unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The collector; it stops when dropped.
pub struct Collector {
    endpoint: String,
    received: Received,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on a free loopback port.
    pub async fn start() -> Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let received = Received::default();
        let service = TraceServiceServer::new(received.clone());
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Collector {
            endpoint,
            received,
            server,
        })
    }

    /// `http://127.0.0.1:P`, the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Polls the received spans until `check` returns `Some`, for at most `timeout`; the error
    /// lists what was received.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[ReceivedSpan]) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if let Some(found) = check(&spans) {
                return Ok(found);
            }
            if tokio::time::Instant::now() >= deadline {
                let listed: Vec<String> = spans.iter().map(ToString::to_string).collect();
                bail!(
                    "not received within {timeout:?}; {} spans:\n  {}",
                    spans.len(),
                    listed.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}
