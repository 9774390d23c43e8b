//! The backend half of a cluster (redis-server, auth-service, room-services; no gateway):
//! the harness starts it, and its tokens and API key are the ones the services accept.

use roomcast_integration::cluster::{Cluster, ClusterOptions};
use roomcast_integration::token::{self, Claims};
use roomcast_proto::auth_service_client::AuthServiceClient;
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_proto::{ServerPublishRequest, VerifyTokenRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_start_and_accept_the_harness_credentials() {
    let opts = ClusterOptions {
        gateways: 0,
        ..ClusterOptions::default()
    };
    let secret = opts.secret.clone();
    let key = opts.api_key.clone();
    let internal = opts.internal_token.clone();
    let cluster = Cluster::start(opts).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(cluster.auth_grpc())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let attach = roomcast_common::credential::AttachBearer::new(&internal).unwrap();
    let mut auth = AuthServiceClient::with_interceptor(channel, attach);
    let claims = Claims::new("alice").rooms(["chat:*"]);
    let good = token::mint(&secret, &claims).unwrap();
    let verified = auth
        .verify_token(VerifyTokenRequest { token: good })
        .await
        .unwrap()
        .into_inner();
    let got = verified.claims.unwrap();
    assert_eq!((got.sub.as_str(), got.exp), ("alice", claims.exp));
    assert_eq!(got.rooms.unwrap().patterns, vec!["chat:*".to_owned()]);
    for bad in [
        token::expired(&secret, "alice").unwrap(),
        token::badly_signed(&secret, "alice").unwrap(),
        token::MALFORMED.to_owned(),
    ] {
        let status = auth
            .verify_token(VerifyTokenRequest { token: bad })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }

    for i in 0..cluster.room_service_count() {
        let mut rooms = ServerApiClient::connect(cluster.room_service_grpc(i))
            .await
            .unwrap();
        let mut request = tonic::Request::new(ServerPublishRequest {
            room: "backends".into(),
            data_json: "{}".into(),
            user: String::new(),
            idempotency_key: String::new(),
        });
        let value = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        let published = rooms.publish(request).await.unwrap().into_inner();
        // Both instances share the store: offsets continue across them.
        assert_eq!(published.offset, i as u64 + 1);
    }
}
