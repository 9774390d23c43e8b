//! The test client against a small in-process WebSocket server, so the client's own behaviour
//! (handshake errors, reply matching, backlog, close codes, unanswered pings) is known to be
//! right independently of the gateway.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use roomcast_integration::{ConnectError, ConnectOptions, TestClient};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Accepts `?token=good`; sends `connected`; answers `ping` after an unrelated `event`; closes
/// with 1009 on `"big"`; pings every 100 ms and drops a connection silent for 400 ms.
async fn mock_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    url
}

// The handshake callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn serve(tcp: tokio::net::TcpStream) {
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().query() == Some("token=good") {
            Ok(resp)
        } else {
            let mut err = ErrorResponse::new(Some("bad token".into()));
            *err.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
            Err(err)
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    let connected = json!({"type": "connected", "clientId": "c1", "user": "u", "gateway": "g"});
    let _ = ws.send(Message::text(connected.to_string())).await;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > Duration::from_millis(400) {
                    return; // drop the TCP connection, as a heartbeat timeout does
                }
                let _ = ws.send(Message::Ping(Vec::new().into())).await;
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                last_heard = Instant::now();
                let Message::Text(text) = msg else { continue };
                if text.as_str() == "big" {
                    let frame = CloseFrame { code: CloseCode::Size, reason: "too big".into() };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                    continue;
                }
                let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                if v["type"] == "ping" {
                    let event = json!({"type": "event", "n": 1});
                    let _ = ws.send(Message::text(event.to_string())).await;
                    let pong = json!({"type": "pong", "id": v["id"]});
                    let _ = ws.send(Message::text(pong.to_string())).await;
                }
            }
        }
    }
}

#[tokio::test]
async fn handshake_refusal_carries_status_and_body() {
    let url = mock_server().await;
    match TestClient::connect(&url, "bad").await {
        Err(ConnectError::Http { status, body }) => {
            assert_eq!(status, 401);
            assert_eq!(body, "bad token");
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    let err = TestClient::connect_raw(&url, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
}

#[tokio::test]
async fn requests_match_ids_and_keep_other_frames() {
    let url = mock_server().await;
    let mut c = TestClient::connect(&url, "good").await.unwrap();
    assert_eq!(c.client_id(), "c1");
    let pong = c.request(json!({"type": "ping"})).await.unwrap();
    assert_eq!(pong["type"], "pong");
    let id = pong["id"].as_u64().unwrap();
    let pong = c.request(json!({"type": "ping", "id": 77})).await.unwrap();
    assert_eq!(pong["id"], 77);
    // The two `event`s that came before the pongs were kept, in order.
    let e = c.recv_json(Duration::from_secs(1)).await.unwrap();
    assert_eq!(e["type"], "event");
    c.expect("event", Duration::from_secs(1)).await.unwrap();
    c.expect_none(None, Duration::from_millis(200))
        .await
        .unwrap();
    // Ids keep increasing past an explicit one.
    let next = c.send_command(json!({"type": "ping"})).await.unwrap();
    assert!(next > 77 && next != id);
    let err = c
        .expect("nothing-of-this-type", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("pong"), "{err:#}");
}

#[tokio::test]
async fn close_code_is_reported() {
    let url = mock_server().await;
    let mut c = TestClient::connect(&url, "good").await.unwrap();
    c.send_raw_text("big").await.unwrap();
    let close = c.expect_close(Duration::from_secs(2)).await.unwrap();
    assert_eq!(close.code, Some(1009));
    assert_eq!(c.close_code(), Some(1009));
    let err = c.recv_json(Duration::from_millis(100)).await.unwrap_err();
    assert!(format!("{err:#}").contains("1009"), "{err:#}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_a_reading_one_is_not() {
    let url = mock_server().await;
    let mut alive = TestClient::connect(&url, "good").await.unwrap();
    let mut hung = TestClient::connect(&url, "good").await.unwrap();
    hung.stop_answering_pings();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(alive.pings_received() >= 5, "{}", alive.pings_received());
    alive.request(json!({"type": "ping"})).await.unwrap();
    hung.resume_reading();
    let close = hung.expect_close(Duration::from_secs(2)).await.unwrap();
    assert_eq!(close.code, None, "{close}");
}
