//! The service over a real gRPC connection, memory-backed: what standalone mode (`roomcast`)
//! runs in-process. Checks the trust boundary: each service opens only with its own credential.

use std::sync::Arc;
use std::time::Duration;

use roomcast_common::broker::MemoryBroker;
use roomcast_proto as pb;
use roomcast_proto::room_service_client::RoomServiceClient;
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_room::store::MemoryStore;
use roomcast_room::{HistoryLimits, RoomServiceImpl, ServiceOptions};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const INTERNAL: &str = "internal-token-0123456789";
const API_KEY: &str = "api-key-0123456789abcdef";

fn with_bearer<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    request
}

fn publish(data: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        room: "lobby".into(),
        client_id: "c1".into(),
        user: "alice".into(),
        data_json: data.into(),
        idempotency_key: String::new(),
        first_try: false,
    }
}

fn history() -> pb::HistoryRequest {
    pb::HistoryRequest {
        room: "lobby".into(),
        since: None,
        limit: 0,
    }
}

#[tokio::test]
async fn each_service_opens_with_its_own_credential_only() {
    let store = Arc::new(MemoryStore::new(
        MemoryBroker::new(),
        HistoryLimits::default(),
    ));
    let service = RoomServiceImpl::new(
        store,
        ServiceOptions {
            api_key: Some(API_KEY.into()),
            internal_token: Some(INTERNAL.into()),
            ..ServiceOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(roomcast_room::serve(listener, service, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut internal = RoomServiceClient::new(channel.clone());
    let mut api = ServerApiClient::new(channel.clone());

    // Internal calls: refused without the token, with a wrong one, and with the API key.
    for credential in [None, Some("wrong-token-0123456789"), Some(API_KEY)] {
        let request = match credential {
            Some(c) => with_bearer(publish("1"), c),
            None => tonic::Request::new(publish("1")),
        };
        let status = internal.publish(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{credential:?}");
    }
    let published = internal
        .publish(with_bearer(publish(r#"{"hi":true}"#), INTERNAL))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.offset, 1, "the refused publishes stored nothing");

    // The server API: refused without the key and with the internal token.
    for request in [
        tonic::Request::new(history()),
        with_bearer(history(), INTERNAL),
    ] {
        let status = api.history(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let page = api
        .history(with_bearer(history(), API_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.publications.len(), 1);
    assert_eq!(page.publications[0].data_json, r#"{"hi":true}"#);

    // Health needs no credential: load balancers probe it.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "roomcast.v1.RoomService", "roomcast.v1.ServerApi"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops on shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let store = Arc::new(MemoryStore::new(
        MemoryBroker::new(),
        HistoryLimits::default(),
    ));
    let service = RoomServiceImpl::new(store, ServiceOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(roomcast_room::serve(
        listener,
        service,
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in ["roomcast.v1.RoomService", "roomcast.v1.ServerApi"] {
        assert!(names.iter().any(|n| n == wanted), "{names:?}");
    }
}

#[tokio::test]
async fn health_follows_readiness() {
    let store = Arc::new(MemoryStore::new(
        MemoryBroker::new(),
        HistoryLimits::default(),
    ));
    let service = RoomServiceImpl::new(store, ServiceOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let readiness = roomcast_common::ops::Readiness::default();
    tokio::spawn(roomcast_room::serve_with(
        listener,
        service,
        roomcast_room::ServeOptions {
            tls: None,
            readiness: Some(readiness.clone()),
        },
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let status = |wanted: ServingStatus| {
        let mut health = health.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            loop {
                let got = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: "roomcast.v1.ServerApi".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status;
                if got == wanted as i32 {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "still {got}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    status(ServingStatus::NotServing).await;
    readiness.set(true);
    status(ServingStatus::Serving).await;
    readiness.start_draining();
    status(ServingStatus::NotServing).await;
}
