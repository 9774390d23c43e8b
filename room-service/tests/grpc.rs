//! The service over a real gRPC connection, memory-backed: what the gateway's standalone mode
//! runs in-process.

use std::time::Duration;

use roomcast_common::broker::MemoryBroker;
use roomcast_proto as pb;
use roomcast_proto::room_service_client::RoomServiceClient;
use roomcast_room::{HistoryLimits, RoomServiceImpl, ServiceOptions, Store};
use tokio::sync::oneshot;
use tonic::Code;

#[tokio::test]
async fn serves_internal_and_server_api_until_shutdown() {
    let store = Store::memory(MemoryBroker::new(), HistoryLimits::default());
    let service = RoomServiceImpl::new(
        store,
        ServiceOptions {
            api_key: Some("k".into()),
            ..ServiceOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(roomcast_room::serve(listener, service, async {
        let _ = stopped.await;
    }));

    let mut client = RoomServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let joined = client
        .join(pb::JoinRequest {
            room: "lobby".into(),
            client_id: "c1".into(),
            user: "alice".into(),
            gateway_id: "gw".into(),
            since: None,
        })
        .await
        .unwrap()
        .into_inner();
    let published = client
        .publish(pb::PublishRequest {
            room: "lobby".into(),
            client_id: "c1".into(),
            user: "alice".into(),
            data_json: r#"{"hi":true}"#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((published.epoch, published.offset), (joined.epoch, 1));

    let status = client
        .server_history(pb::HistoryRequest {
            room: "lobby".into(),
            since: None,
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(pb::HistoryRequest {
        room: "lobby".into(),
        since: None,
        limit: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer k".parse().unwrap());
    let history = client.server_history(request).await.unwrap().into_inner();
    assert_eq!(history.publications.len(), 1);
    assert_eq!(history.publications[0].data_json, r#"{"hi":true}"#);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops on shutdown")
        .unwrap()
        .unwrap();
}
