//! Gateway hardening against hostile or broken clients: handshakes that never finish (idle
//! sockets, slowloris), the pending-handshake cap, the read rate limit, invalid frames, and the
//! rule that every reply owed is sent before a close (rate-limit close, drain).
//!
//! Each test starts its own cluster and kills it at the end, pass or fail. Build first:
//! `cargo build --workspace`. Every socket is on loopback and their number is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use roomcast_integration::{ClusterOptions, Flavor, Incoming, System, TestClient, run};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// One gateway, one room-service: enough for what these tests check, and lighter on CPU.
fn small() -> ClusterOptions {
    ClusterOptions {
        gateways: 1,
        room_services: 1,
        ..ClusterOptions::default()
    }
}

fn gateway_addr(sys: &System, i: usize) -> String {
    sys.http_url(i)
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Whether the server has closed `tcp` (EOF or reset), waiting at most `wait`. What it sent
/// before closing is appended to `got`.
async fn closed_within(tcp: &mut TcpStream, wait: Duration, got: &mut Vec<u8>) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The request line and headers of a WebSocket handshake with `token`.
fn handshake_request(token: &str) -> String {
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: roomcast\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Handshake timeout and the pending-handshake cap

const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1000);

fn handshake_options() -> ClusterOptions {
    small().gateway_env("HANDSHAKE_TIMEOUT_MS", HANDSHAKE_TIMEOUT.as_millis())
}

/// A client sending its handshake headers at one byte per second is closed once the handshake
/// timeout has passed, though it keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshake_is_closed() {
    run(
        "slowloris_handshake_is_closed",
        Flavor::Cluster,
        handshake_options(),
        async |sys: &mut System| {
            let request = handshake_request(&sys.token("slow")?);
            let mut tcp = TcpStream::connect(gateway_addr(sys, 0)).await?;
            let opened = Instant::now();
            let mut got = Vec::new();
            for byte in request.as_bytes() {
                if tcp.write_all(&[*byte]).await.is_err() {
                    break;
                }
                if closed_within(&mut tcp, Duration::from_secs(1), &mut got).await {
                    break;
                }
                ensure!(
                    opened.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(3),
                    "a slowloris client is still connected after {:?} (handshake timeout \
                     {HANDSHAKE_TIMEOUT:?})",
                    opened.elapsed()
                );
            }
            let took = opened.elapsed();
            ensure!(
                took >= HANDSHAKE_TIMEOUT * 9 / 10,
                "closed after {took:?}, before the handshake timeout: {:?}",
                String::from_utf8_lossy(&got)
            );
            ensure!(
                took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
                "closed only after {took:?}"
            );
            ensure!(
                got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
                "a timed-out handshake may get a 408 and nothing else, got {:?}",
                String::from_utf8_lossy(&got)
            );
            Ok(())
        },
    )
    .await;
}

/// 200 TCP connections that never send a byte are all closed within the handshake timeout;
/// meanwhile a normal client connects and works, and its WebSocket outlives the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_closed_while_clients_connect() {
    run(
        "idle_sockets_are_closed_while_clients_connect",
        Flavor::Cluster,
        handshake_options(),
        async |sys: &mut System| {
            const IDLE: usize = 200;
            let addr = gateway_addr(sys, 0);
            let opened = Instant::now();
            let mut idle = Vec::with_capacity(IDLE);
            for _ in 0..IDLE {
                idle.push(TcpStream::connect(&addr).await?);
            }

            let mut a = sys
                .client(0, "alice")
                .await
                .context("connect during the flood")?;
            let mut b = sys.client(0, "bob").await?;
            a.join("flood").await?;
            b.join("flood").await?;
            let offset = a.publish("flood", json!("during")).await?;
            let m = b.expect("message", T).await?;
            ensure!(m["offset"] == offset, "expected offset {offset}, got {m}");

            let deadline = opened + HANDSHAKE_TIMEOUT + Duration::from_secs(2);
            let mut still_open = 0;
            for tcp in &mut idle {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut got = Vec::new();
                if !closed_within(tcp, left, &mut got).await {
                    still_open += 1;
                }
            }
            ensure!(
                still_open == 0,
                "{still_open} of {IDLE} idle sockets still open {:?} after opening (handshake \
                 timeout {HANDSHAKE_TIMEOUT:?})",
                opened.elapsed()
            );

            // Upgraded connections are past their handshake: the timeout does not touch them.
            let since_upgrade = opened.elapsed();
            if since_upgrade < HANDSHAKE_TIMEOUT * 2 {
                tokio::time::sleep(HANDSHAKE_TIMEOUT * 2 - since_upgrade).await;
            }
            a.request_ok(json!({"type": "ping"}), "pong")
                .await
                .context("a WebSocket after the handshake timeout")?;
            let offset = b.publish("flood", json!("after")).await?;
            let m = a.expect("message", T).await?;
            ensure!(m["offset"] == offset, "expected offset {offset}, got {m}");
            Ok(())
        },
    )
    .await;
}

/// Past MAX_PENDING_HANDSHAKES connections in their HTTP phase, new ones are refused at once
/// (503 or a plain close), long before the handshake timeout; once the idle ones are gone,
/// clients connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_are_capped() {
    const CAP: usize = 16;
    run(
        "pending_handshakes_are_capped",
        Flavor::Cluster,
        small()
            .gateway_env("MAX_PENDING_HANDSHAKES", CAP)
            .gateway_env("HANDSHAKE_TIMEOUT_MS", 20_000),
        async |sys: &mut System| {
            let addr = gateway_addr(sys, 0);
            let mut idle = Vec::with_capacity(CAP);
            for _ in 0..CAP {
                idle.push(TcpStream::connect(&addr).await?);
            }
            // Let the gateway accept them all.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for n in 0..3 {
                let mut extra = TcpStream::connect(&addr).await?;
                let mut got = Vec::new();
                ensure!(
                    closed_within(&mut extra, Duration::from_secs(2), &mut got).await,
                    "connection #{} over a cap of {CAP} pending handshakes was not closed",
                    CAP + 1 + n
                );
                ensure!(
                    got.is_empty() || got.starts_with(b"HTTP/1.1 503"),
                    "over the cap: expected 503 or a plain close, got {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            for tcp in &mut idle {
                let mut got = Vec::new();
                ensure!(
                    !closed_within(tcp, Duration::ZERO, &mut got).await,
                    "an idle socket within the cap was closed before the handshake timeout"
                );
            }
            drop(idle);
            // The gateway sees them close and gives their places back.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut c = sys
                .client(0, "after")
                .await
                .context("connect once the idle sockets are gone")?;
            c.request_ok(json!({"type": "ping"}), "pong").await?;
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Read rate limit

/// A burst of `history` and `presence` requests beyond the read bucket (defaults: 20/s, burst
/// 40) gets `rate_limited` errors carrying the commands' ids; the connection stays open and
/// reads work again once the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_rate_limited_without_closing() {
    run(
        "reads_are_rate_limited_without_closing",
        Flavor::Cluster,
        small(),
        async |sys: &mut System| {
            const BURST: u64 = 120;
            let room = "reads";
            let mut c = sys.client(0, "reader").await?;
            c.join(room).await?;
            let mut ids = BTreeMap::new();
            for n in 0..BURST {
                let kind = if n % 3 == 0 { "presence" } else { "history" };
                let id = c.send_command(json!({"type": kind, "room": room})).await?;
                ids.insert(id, kind);
            }
            let mut limited = 0;
            let mut served = 0;
            for (&id, &kind) in &ids {
                let reply = c.reply_to(id, T).await?;
                match reply["type"].as_str() {
                    Some(t) if t == kind => served += 1,
                    Some("error") if reply["code"] == "rate_limited" => limited += 1,
                    _ => bail!("reply to `{kind}` id {id}: unexpected {reply}"),
                }
            }
            ensure!(
                limited > 0,
                "{BURST} reads in a burst: none was rate limited ({served} served)"
            );
            // The join took one of the 40.
            ensure!(
                served >= 39,
                "only {served} of {BURST} reads served: the burst is 40"
            );
            ensure!(c.close_code().is_none(), "the connection was closed");

            // A join over the limit is refused the same way.
            let mut refused_join = false;
            for n in 0..60 {
                let r = c
                    .request(json!({"type": "join", "room": format!("more-{n}")}))
                    .await?;
                if r["type"] == "error" && r["code"] == "rate_limited" {
                    refused_join = true;
                    break;
                }
            }
            ensure!(refused_join, "joins are reads too: none was rate limited");

            tokio::time::sleep(Duration::from_millis(500)).await;
            c.request_ok(json!({"type": "history", "room": room}), "history")
                .await
                .context("a read after the bucket refilled")?;
            c.publish(room, json!("still open")).await?;
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Invalid frames

/// Reads from `tcp` until the `connected` frame and a pong have arrived (the 101 first);
/// returns the server frames.
async fn connected_and_pong(tcp: &mut TcpStream) -> Result<Vec<ServerFrame>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            ensure!(
                got.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"),
                "expected 101, got {:?}",
                String::from_utf8_lossy(&got)
            );
            let frames = parse_frames(&got[end + 4..]);
            let text = |prefix: &[u8]| {
                frames
                    .iter()
                    .any(|f| f.opcode == 1 && f.payload.starts_with(prefix))
            };
            if text(br#"{"type":"connected""#) && text(br#"{"type":"pong""#) {
                return Ok(frames);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut buf))
            .await
            .with_context(|| {
                format!(
                    "no connected + pong in time: {:?}",
                    String::from_utf8_lossy(&got)
                )
            })??;
        ensure!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// A handshake is upgraded however its bytes arrive: whole, in pieces (the head split over
/// segments goes through the HTTP server), or with the client's first frame right behind the
/// head in the same segment (that frame is read, not lost with the head). A refused one gets
/// its status and reason, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_work_however_their_bytes_arrive() {
    run(
        "handshakes_work_however_their_bytes_arrive",
        Flavor::Cluster,
        small(),
        async |sys: &mut System| {
            let ping = masked_frame(0x1, br#"{"type":"ping","id":1}"#);
            let addr = gateway_addr(sys, 0);

            // The head and a frame in one write.
            let mut tcp = TcpStream::connect(&addr).await?;
            let mut bytes = handshake_request(&sys.token("eager")?).into_bytes();
            bytes.extend_from_slice(&ping);
            tcp.write_all(&bytes).await?;
            let frames = connected_and_pong(&mut tcp).await.context("head + frame")?;
            ensure!(
                frames[0].payload.starts_with(br#"{"type":"connected""#),
                "the connected frame comes first: {frames:?}"
            );

            // The head in three pieces, apart in time, then a frame.
            let mut tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let head = handshake_request(&sys.token("trickle")?);
            let (a, rest) = head.split_at(9);
            let (b, c) = rest.split_at(rest.len() / 2);
            for piece in [a, b, c] {
                tcp.write_all(piece.as_bytes()).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tcp.write_all(&ping).await?;
            connected_and_pong(&mut tcp)
                .await
                .context("head in pieces")?;

            // A bad token, with a frame behind the head: 401 with the reason, then the close.
            let mut tcp = TcpStream::connect(&addr).await?;
            let mut bytes = handshake_request("not-a-jwt").into_bytes();
            bytes.extend_from_slice(&ping);
            tcp.write_all(&bytes).await?;
            let mut got = Vec::new();
            ensure!(
                closed_within(&mut tcp, T, &mut got).await,
                "a refused handshake's connection stays open"
            );
            let got = String::from_utf8_lossy(&got);
            let (head, body) = got.split_once("\r\n\r\n").context("no response head")?;
            ensure!(
                head.starts_with("HTTP/1.1 401 "),
                "expected 401, got {got:?}"
            );
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .context("no content-length")?;
            ensure!(
                length.parse::<usize>()? == body.len() && body.ends_with('\n') && body.len() > 1,
                "the reason is the body: {got:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// A client frame with `opcode` around `payload`, masked as RFC 6455 requires of clients.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    assert!(payload.len() < 126, "short frames only");
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A server frame: opcode and payload (server frames are not masked).
#[derive(Debug)]
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
}

/// The complete server frames at the start of `bytes`.
fn parse_frames(mut bytes: &[u8]) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    loop {
        if bytes.len() < 2 {
            break;
        }
        let opcode = bytes[0] & 0x0f;
        let (len, head) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if bytes.len() < head + len {
            break;
        }
        frames.push(ServerFrame {
            opcode,
            payload: bytes[head..head + len].to_vec(),
        });
        bytes = &bytes[head + len..];
    }
    frames
}

/// Opens a WebSocket by hand on gateway 0 and reads up to the `connected` frame. Returns the
/// socket.
async fn raw_websocket(sys: &System, user: &str) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect(gateway_addr(sys, 0)).await?;
    tcp.write_all(handshake_request(&sys.token(user)?).as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut buf))
            .await
            .context("no `connected` frame in time")??;
        ensure!(
            n > 0,
            "closed during the handshake: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        ensure!(
            got.starts_with(b"HTTP/1.1 101"),
            "expected 101, got {:?}",
            String::from_utf8_lossy(&got)
        );
        let frames = parse_frames(&got[end + 4..]);
        if frames.iter().any(|f| f.opcode == 1) {
            return Ok(tcp);
        }
    }
}

/// Reads server frames from `tcp` until a close frame; returns its code.
async fn read_until_close(tcp: &mut TcpStream, wait: Duration) -> Result<u16> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        let frames = parse_frames(&got);
        if let Some(close) = frames.iter().find(|f| f.opcode == 8) {
            ensure!(close.payload.len() >= 2, "close frame without code");
            return Ok(u16::from_be_bytes([close.payload[0], close.payload[1]]));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => bail!("no close frame within {wait:?}; frames: {frames:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => {
                bail!("the connection ended without a close frame; frames: {frames:?}")
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A text frame that is not valid UTF-8 closes the connection with 1007, with a close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007() {
    run(
        "invalid_utf8_closes_1007",
        Flavor::Cluster,
        small(),
        async |sys: &mut System| {
            let mut tcp = raw_websocket(sys, "mojibake").await?;
            tcp.write_all(&masked_frame(
                0x1,
                b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}",
            ))
            .await?;
            let code = read_until_close(&mut tcp, T).await?;
            ensure!(
                code == 1007,
                "invalid UTF-8: expected close 1007, got {code}"
            );

            // An unmasked client frame breaks RFC 6455: 1002.
            let mut tcp = raw_websocket(sys, "unmasked").await?;
            let payload = br#"{"type":"ping"}"#;
            let mut frame = vec![0x81, payload.len() as u8];
            frame.extend_from_slice(payload);
            tcp.write_all(&frame).await?;
            let code = read_until_close(&mut tcp, T).await?;
            ensure!(
                code == 1002,
                "unmasked frame: expected close 1002, got {code}"
            );
            Ok(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Replies owed before a close

/// The frame with `id` among `frames`, each id at most once.
fn replies_by_id(frames: &[Value]) -> Result<BTreeMap<u64, Value>> {
    let mut by_id = BTreeMap::new();
    for frame in frames {
        if let Some(id) = frame.get("id").and_then(Value::as_u64)
            && by_id.insert(id, frame.clone()).is_some()
        {
            bail!("two replies for id {id}");
        }
    }
    Ok(by_id)
}

/// Every message of `room` still in history, oldest first (paged).
async fn full_history(c: &mut TestClient, room: &str) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut since = 0u64;
    loop {
        let h = c
            .request_ok(
                json!({"type": "history", "room": room, "since": since, "limit": 1000}),
                "history",
            )
            .await?;
        let page = h["messages"]
            .as_array()
            .context("`messages` not an array")?;
        let Some(last) = page.last() else {
            return Ok(all);
        };
        since = last["offset"].as_u64().context("message without offset")?;
        all.extend(page.iter().cloned());
    }
}

/// A client's close frame is answered with a close frame (RFC 6455), after the replies owed:
/// a ping sent right before the close still gets its pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_answered() {
    run(
        "client_close_is_answered",
        Flavor::Cluster,
        small(),
        async |sys: &mut System| {
            let mut tcp = raw_websocket(sys, "polite").await?;
            let mut frames = masked_frame(0x1, br#"{"type":"ping","id":9}"#);
            frames.extend(masked_frame(0x8, &1000u16.to_be_bytes()));
            tcp.write_all(&frames).await?;
            let mut got = Vec::new();
            ensure!(
                closed_within(&mut tcp, T, &mut got).await,
                "the server did not end the connection after the client's close"
            );
            let frames = parse_frames(&got);
            let pong = frames
                .iter()
                .position(|f| f.opcode == 1 && f.payload.starts_with(br#"{"type":"pong""#));
            let close = frames.iter().position(|f| f.opcode == 8);
            let (Some(pong), Some(close)) = (pong, close) else {
                bail!("expected a pong and a close frame, got {frames:?}");
            };
            ensure!(
                pong < close,
                "the pong came after the close frame: {frames:?}"
            );
            let code = &frames[close].payload;
            ensure!(
                code.len() >= 2 && u16::from_be_bytes([code[0], code[1]]) == 1000,
                "the close reply should echo 1000: {frames:?}"
            );
            Ok(())
        },
    )
    .await;
}

/// A burst of 400 publishes with the default limits (100/s, burst 200, close after 50
/// refusals in a row): every publish the gateway handled is answered, `published` or
/// `rate_limited` with its id, before the 4029 close frame; the refusal that triggers the close
/// is answered too; and the room holds exactly the acknowledged publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_answered_before_4029() {
    run(
        "refused_publishes_are_answered_before_4029",
        Flavor::Cluster,
        small(),
        async |sys: &mut System| {
            const N: u64 = 400;
            // The default RATE_LIMIT_CLOSE_AFTER.
            const CLOSE_AFTER: usize = 50;
            let room = "burst";
            let mut c = sys.client(0, "burster").await?;
            c.join(room).await?;
            let first = c
                .send_command(json!({"type": "publish", "room": room, "data": 0}))
                .await?;
            for n in 1..N {
                let cmd = json!({"type": "publish", "room": room, "data": n});
                if c.send_command(cmd).await.is_err() {
                    break; // closed already
                }
            }
            let close = c.expect_close(Duration::from_secs(15)).await?;
            ensure!(close.code == Some(4029), "expected close 4029, got {close}");
            let frames = c.drain(Duration::ZERO).await?;
            let replies = replies_by_id(&frames)?;
            let Some((&last_id, last)) = replies.last_key_value() else {
                bail!("no reply at all before the close");
            };
            ensure!(
                last["type"] == "error" && last["code"] == "rate_limited",
                "the refusal that closed the connection should be answered before the close: \
                 last reply is {last}"
            );
            let mut acked = BTreeSet::new();
            for id in first..=last_id {
                let reply = replies.get(&id).with_context(|| {
                    format!(
                        "publish id {id} got no reply before the close, though id {last_id} \
                         did ({} replies)",
                        replies.len()
                    )
                })?;
                match reply["type"].as_str() {
                    Some("published") => {
                        acked.insert(reply["offset"].as_u64().context("offset")?);
                    }
                    Some("error") if reply["code"] == "rate_limited" => {}
                    _ => bail!("publish id {id}: unexpected reply {reply}"),
                }
            }

            // The close comes with the RATE_LIMIT_CLOSE_AFTER-th refusal in a row, which is
            // answered like the ones before it.
            let refused_in_a_row = replies
                .values()
                .rev()
                .take_while(|r| r["type"] == "error")
                .count();
            ensure!(
                refused_in_a_row == CLOSE_AFTER,
                "expected the last {CLOSE_AFTER} replies before the close to be refusals, got \
                 {refused_in_a_row}"
            );

            let mut other = sys.client(0, "counter").await?;
            let joined = other.join(room).await?;
            let offset = joined["offset"].as_u64().context("joined.offset")?;
            ensure!(
                acked.len() as u64 == offset,
                "{} publishes acknowledged but the room's offset is {offset}",
                acked.len()
            );
            ensure!(
                acked == (1..=offset).collect(),
                "acknowledged offsets are not 1..={offset}"
            );
            Ok(())
        },
    )
    .await;
}

/// A client publishes continuously (8 in flight) to a gateway that is then drained (SIGTERM):
/// it is closed with 1001, and the publishes it saw acknowledged are exactly its messages in
/// the room's history: a publish stored while the drain began was answered before the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_publishes_in_flight() {
    let mut opts = ClusterOptions::default()
        .history(10_000, 3600)
        .gateway_env("PUBLISH_RATE", 100_000)
        .gateway_env("PUBLISH_BURST", 100_000);
    opts.room_services = 1;
    run(
        "drain_answers_publishes_in_flight",
        Flavor::Cluster,
        opts,
        async |sys: &mut System| {
            const IN_FLIGHT: usize = 8;
            let room = "drained";
            let mut observer = sys.client(0, "observer").await?;
            observer.join(room).await?;
            let mut p = sys.client(1, "publisher").await?;
            p.join(room).await?;
            let publisher_id = p.client_id().to_owned();

            let started = Instant::now();
            let mut signalled = false;
            let mut can_send = true;
            let mut outstanding = 0;
            let mut acked = BTreeSet::new();
            let close = loop {
                while can_send && outstanding < IN_FLIGHT {
                    let cmd = json!({"type": "publish", "room": room, "data": "x"});
                    match p.send_command(cmd).await {
                        Ok(_) => outstanding += 1,
                        Err(_) => can_send = false,
                    }
                }
                if !signalled && started.elapsed() >= Duration::from_millis(300) {
                    let cluster = sys.cluster().context("a cluster")?;
                    cluster.gateway(1).process.terminate()?;
                    signalled = true;
                }
                match p.recv(T).await? {
                    Incoming::Json(v) if v["type"] == "published" => {
                        acked.insert(v["offset"].as_u64().context("offset")?);
                        outstanding -= 1;
                    }
                    Incoming::Json(v) if v["type"] == "error" => {
                        bail!("publisher: a publish failed: {v}")
                    }
                    // Presence events and the like.
                    Incoming::Json(_) => {}
                    Incoming::Closed(close) => break close,
                    other => bail!("publisher: unexpected {other}"),
                }
            };
            ensure!(close.code == Some(1001), "expected close 1001, got {close}");
            ensure!(!acked.is_empty(), "nothing was published before the drain");

            let stored: BTreeSet<u64> = full_history(&mut observer, room)
                .await?
                .iter()
                .filter(|m| m["clientId"] == publisher_id.as_str())
                .filter_map(|m| m["offset"].as_u64())
                .collect();
            let unacked: Vec<_> = stored.difference(&acked).collect();
            let phantom: Vec<_> = acked.difference(&stored).collect();
            ensure!(
                unacked.is_empty() && phantom.is_empty(),
                "{} acknowledged, {} stored: stored without an ack before the close: {unacked:?}; \
                 acknowledged but not stored: {phantom:?}",
                acked.len(),
                stored.len()
            );
            Ok(())
        },
    )
    .await;
}
