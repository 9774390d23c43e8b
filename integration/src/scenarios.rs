//! The end-to-end checks of the contract (`docs/protocol.md`). Client-visible ones take any
//! [`System`] and run against both the cluster and the standalone gateway; the `cluster_*` ones
//! need separate processes to kill or a store to restart.
//!
//! Every check fails with the frame it expected and the frame it got.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use roomcast_proto::publish_result::Outcome;
use roomcast_proto::server_api_client::ServerApiClient;
use roomcast_proto::{
    BroadcastRequest, DisconnectRequest, HistoryRequest, PresenceRequest, PublishResponse,
    ServerPublishBatchRequest, ServerPublishRequest, SubscribeRequest, UnsubscribeRequest,
};
use serde_json::{Value, json};

use crate::client::{ConnectError, ConnectOptions, TestClient};
use crate::http;
use crate::system::System;
use crate::token::{self, Claims};

/// Wait for a reply or an event that should come at once.
const T: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched.
const SILENCE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Helpers

/// `frame` is an `error` with `code` (and `id`, when given).
fn check_error(frame: &Value, code: &str, id: Option<u64>, what: &str) -> Result<()> {
    ensure!(
        frame["type"] == "error" && frame["code"] == code,
        "{what}: expected an `error` with code `{code}`, got {frame}"
    );
    if let Some(id) = id {
        ensure!(
            frame["id"] == id,
            "{what}: the error should carry id {id}, got {frame}"
        );
    }
    ensure!(
        frame["message"].is_string(),
        "{what}: the error has no `message` string: {frame}"
    );
    Ok(())
}

fn u64_field(frame: &Value, key: &str) -> Result<u64> {
    frame[key]
        .as_u64()
        .with_context(|| format!("`{key}` is not an unsigned integer in {frame}"))
}

fn str_field<'a>(frame: &'a Value, key: &str) -> Result<&'a str> {
    frame[key]
        .as_str()
        .with_context(|| format!("`{key}` is not a string in {frame}"))
}

/// A `message` frame (live, or inside `joined.missed` / `history.messages`) has every field
/// with the expected values.
fn check_message(
    frame: &Value,
    room: &str,
    offset: u64,
    epoch: &str,
    sender: &TestClient,
    data: &Value,
) -> Result<()> {
    let expected = json!({
        "type": "message", "room": room, "offset": offset, "epoch": epoch,
        "user": sender.user(), "clientId": sender.client_id(), "data": data,
    });
    ensure!(
        *frame == expected,
        "message frame mismatch:\n expected {expected}\n      got {frame}"
    );
    Ok(())
}

/// The offsets of a `history` reply's messages.
fn message_offsets(history: &Value) -> Result<Vec<u64>> {
    history["messages"]
        .as_array()
        .with_context(|| format!("`messages` is not an array in {history}"))?
        .iter()
        .map(|m| u64_field(m, "offset"))
        .collect()
}

/// `(user, clientId)` of every member in a `presence` reply.
fn members(frame: &Value) -> Result<BTreeSet<(String, String)>> {
    let list = frame["members"]
        .as_array()
        .with_context(|| format!("`members` is not an array in {frame}"))?;
    list.iter()
        .map(|m| {
            Ok((
                str_field(m, "user")?.to_owned(),
                str_field(m, "clientId")?.to_owned(),
            ))
        })
        .collect()
}

fn member_of(c: &TestClient) -> (String, String) {
    (c.user().to_owned(), c.client_id().to_owned())
}

async fn presence(c: &mut TestClient, room: &str) -> Result<BTreeSet<(String, String)>> {
    let reply = c
        .request_ok(json!({"type": "presence", "room": room}), "presence")
        .await?;
    ensure!(
        reply["room"] == room,
        "presence reply for another room: {reply}"
    );
    members(&reply)
}

/// Joins and returns `(epoch, offset)` of the `joined` reply.
async fn join(c: &mut TestClient, room: &str) -> Result<(String, u64)> {
    let joined = c.join(room).await?;
    ensure!(
        joined["room"] == room,
        "joined names another room: {joined}"
    );
    Ok((
        str_field(&joined, "epoch")?.to_owned(),
        u64_field(&joined, "offset")?,
    ))
}

/// Waits for the `member_joined` / `member_left` event about `who` in `room`.
async fn expect_presence_event(
    observer: &mut TestClient,
    kind: &str,
    room: &str,
    who: (&str, &str),
    timeout: Duration,
) -> Result<Value> {
    let frame = observer
        .expect_match(&format!("`{kind}` of {}", who.1), timeout, |v| {
            v["type"] == kind && v["clientId"] == who.1
        })
        .await?;
    ensure!(
        frame["room"] == room && frame["user"] == who.0,
        "{kind} has the wrong room or user: {frame}"
    );
    Ok(frame)
}

/// Publishes, retrying `unavailable` errors and timeouts until `deadline`: what a client does
/// while a backend fails over. Returns the offset.
async fn publish_retrying(
    c: &mut TestClient,
    room: &str,
    data: &Value,
    deadline: Instant,
) -> Result<u64> {
    let mut attempts = Vec::new();
    loop {
        let id = c
            .send_command(json!({"type": "publish", "room": room, "data": data}))
            .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        match c.reply_to(id, left.min(T)).await {
            Ok(reply) if reply["type"] == "published" => return u64_field(&reply, "offset"),
            Ok(reply) if reply["code"] == "unavailable" => attempts.push(reply.to_string()),
            Ok(reply) => bail!("publish {data}: unexpected reply {reply}"),
            Err(e) => attempts.push(format!("{e:#}")),
        }
        if Instant::now() >= deadline {
            bail!("publish {data}: no success before the deadline; attempts: {attempts:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Client-visible scenarios (cluster and standalone)

/// 1. The first frame is `connected` with clientId, user, gateway and the heartbeat settings.
pub async fn connected_frame_first(sys: &mut System) -> Result<()> {
    let opts = ConnectOptions::token(sys.token("alice")?);
    let mut c = TestClient::connect_raw(&sys.ws_url(0), &opts).await?;
    let first = c.recv_json(T).await.context("reading the first frame")?;
    ensure!(
        first["type"] == "connected",
        "first frame is not `connected`: {first}"
    );
    let client_id = str_field(&first, "clientId")?;
    ensure!(!client_id.is_empty(), "empty clientId: {first}");
    ensure!(
        first["user"] == "alice",
        "user should be the token's sub: {first}"
    );
    let gateway = str_field(&first, "gateway")?;
    ensure!(!gateway.is_empty(), "empty gateway: {first}");
    let hb = &first["heartbeat"];
    let (interval, timeout) = (
        sys.options().heartbeat_interval_ms,
        sys.options().heartbeat_timeout_ms,
    );
    ensure!(
        hb["intervalMs"] == interval && hb["timeoutMs"] == timeout,
        "heartbeat should be {{intervalMs: {interval}, timeoutMs: {timeout}}}: {first}"
    );

    // Every connection has its own id, even for the same user; each gateway its own name.
    let other = sys.client(1, "alice").await?;
    ensure!(
        other.client_id() != client_id,
        "two connections share clientId {client_id}"
    );
    if sys.gateways() > 1 {
        ensure!(
            other.connected()["gateway"] != gateway,
            "gateways 0 and 1 both call themselves {gateway:?}"
        );
    }
    Ok(())
}

/// 2. A publish reaches the other members on every gateway, not the sender, who gets
///    `published`.
pub async fn cross_gateway_delivery(sys: &mut System) -> Result<()> {
    let room = "chat:cross";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    let mut c = sys.client(1, "carol").await?;
    let (epoch, base) = join(&mut a, room).await?;
    for rx in [&mut b, &mut c] {
        let (e, _) = join(rx, room).await?;
        ensure!(
            e == epoch,
            "{} joined epoch {e}, alice got {epoch}",
            rx.name()
        );
    }

    let delivered_before = gateway_counter(sys, 1, "roomcast_gateway_deliveries_total").await?;
    let published_before = published_total(sys).await?;
    let data = json!({"text": "hello", "n": 1, "nested": {"ok": true, "list": [1, "two"]}});
    let id = a
        .send_command(json!({"type": "publish", "room": room, "data": data}))
        .await?;
    let reply = a.reply_to(id, T).await?;
    ensure!(
        reply["type"] == "published" && reply["room"] == room,
        "expected `published` for {room} with id {id}, got {reply}"
    );
    let offset = u64_field(&reply, "offset")?;
    ensure!(
        offset == base + 1,
        "first publish after joining at offset {base} got offset {offset}"
    );
    for rx in [&mut b, &mut c] {
        let m = rx.expect("message", T).await?;
        check_message(&m, room, offset, &epoch, &a, &data)
            .with_context(|| format!("at {}", rx.name()))?;
    }
    a.expect_none(Some("message"), SILENCE)
        .await
        .context("the sender must not get its own message")?;

    // `data` is any JSON value, delivered as sent.
    let values = [
        json!(null),
        json!(0),
        json!(-1.5),
        json!("héllo ✓ \"quoted\" \n"),
        json!([1, [2, [3]], {}]),
        json!({"a": {"b": null}, "": ""}),
        json!(true),
    ];
    for data in values {
        let offset = a.publish(room, data.clone()).await?;
        for rx in [&mut b, &mut c] {
            let m = rx.expect("message", T).await?;
            check_message(&m, room, offset, &epoch, &a, &data)
                .with_context(|| format!("data {data} at {}", rx.name()))?;
        }
    }
    // The metrics count them (their handles are registered once, with the process's recorder).
    let delivered =
        gateway_counter(sys, 1, "roomcast_gateway_deliveries_total").await? - delivered_before;
    let published = published_total(sys).await? - published_before;
    ensure!(
        delivered >= 16.0 && published >= 8.0,
        "8 publishes to 2 members on gateway 1: it counted {delivered} deliveries, \
         room-service {published} publishes"
    );
    Ok(())
}

/// With `WRITE_DELAY_MS` (set to [`WRITE_DELAY`] by the test): broadcasts are held for the
/// delay and arrive together, in order; a reply to the client's own command is not held, and
/// releases what was held before it.
pub const WRITE_DELAY: Duration = Duration::from_millis(400);

pub async fn write_delay_batches_broadcasts(sys: &mut System) -> Result<()> {
    let room = "delay";
    let mut sender = sys.client(0, "sender").await?;
    let mut rx = sys.client(0, "rx").await?;
    join(&mut sender, room).await?;
    let (_, base) = join(&mut rx, room).await?;

    // Five publishes in quick succession: held, then delivered together and in order.
    let started = Instant::now();
    for n in 0..5 {
        sender.publish(room, json!({"n": n})).await?;
    }
    let mut offsets = Vec::new();
    let mut first_after = None;
    while offsets.len() < 5 {
        let m = rx.expect("message", T).await?;
        first_after.get_or_insert_with(|| started.elapsed());
        offsets.push(u64_field(&m, "offset")?);
    }
    let first_after = first_after.unwrap_or_default();
    ensure!(
        offsets == (base + 1..=base + 5).collect::<Vec<_>>(),
        "expected offsets {}..={} in order, got {offsets:?}",
        base + 1,
        base + 5
    );
    ensure!(
        first_after >= WRITE_DELAY * 3 / 4,
        "the first broadcast came after {first_after:?}: not held for the {WRITE_DELAY:?} write delay"
    );

    // A broadcast is held; the receiver's own ping is answered at once, and the held message
    // comes with it, before it.
    sender.publish(room, json!({"n": "held"})).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = Instant::now();
    let id = rx.send_command(json!({"type": "ping"})).await?;
    let pong = rx.reply_to(id, T).await?;
    let waited = asked.elapsed();
    ensure!(pong["type"] == "pong", "expected pong, got {pong}");
    ensure!(
        waited < WRITE_DELAY / 2,
        "a reply waited {waited:?} behind held broadcasts (write delay {WRITE_DELAY:?})"
    );
    let held = rx.expect("message", Duration::from_millis(10)).await?;
    ensure!(
        held["data"]["n"] == "held",
        "the held message should have arrived with the pong, got {held}"
    );
    Ok(())
}

/// Sends `request` on a new TCP connection to gateway 0 and returns what came back within
/// `wait` (the connection may stay open).
async fn raw_exchange(sys: &System, request: &[u8], wait: Duration) -> Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let http = sys.http_url(0);
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request).await?;
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return Ok(got),
        }
    }
}

/// A client text frame (masked, as RFC 6455 requires of clients).
fn masked_text(payload: &str) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let bytes = payload.as_bytes();
    assert!(bytes.len() < 126, "short frames only");
    let mut frame = vec![0x81, 0x80 | bytes.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(bytes.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Handshakes that are not proper WebSocket upgrades get a clear HTTP error, and a client that
/// sends its first frame right behind the handshake request (without waiting for the 101) is
/// served: the bytes the HTTP layer read ahead reach the WebSocket.
pub async fn raw_handshakes(sys: &mut System) -> Result<()> {
    let token = sys.token("alice")?;
    let head =
        |extra: &str| format!("GET /ws?token={token} HTTP/1.1\r\nHost: roomcast\r\n{extra}\r\n");
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        ("no upgrade headers", head(""), "HTTP/1.1 400"),
        (
            "no Sec-WebSocket-Key",
            head(&format!("{upgrade}Sec-WebSocket-Version: 13\r\n")),
            "HTTP/1.1 400",
        ),
        (
            "version 8",
            head(&format!("{upgrade}{key}Sec-WebSocket-Version: 8\r\n")),
            "HTTP/1.1 426",
        ),
    ];
    for (case, request, status) in cases {
        let reply = raw_exchange(sys, request.as_bytes(), Duration::from_millis(500)).await?;
        let reply = String::from_utf8_lossy(&reply);
        ensure!(
            reply.starts_with(status),
            "{case}: expected {status}, got {reply:?}"
        );
        if status.ends_with("426") {
            ensure!(
                reply
                    .to_ascii_lowercase()
                    .contains("sec-websocket-version: 13"),
                "{case}: 426 should name version 13: {reply:?}"
            );
        }
    }

    let mut eager = head(&format!("{upgrade}{key}Sec-WebSocket-Version: 13\r\n")).into_bytes();
    eager.extend(masked_text(r#"{"type":"ping","id":7}"#));
    let reply = raw_exchange(sys, &eager, Duration::from_millis(1500)).await?;
    let text = String::from_utf8_lossy(&reply);
    ensure!(
        text.starts_with("HTTP/1.1 101"),
        "eager client: expected 101, got {text:?}"
    );
    ensure!(
        text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "eager client: wrong Sec-WebSocket-Accept: {text:?}"
    );
    ensure!(
        text.contains(r#""type":"connected""#) && text.contains(r#"{"type":"pong","id":7}"#),
        "eager client: the ping sent with the handshake was not answered: {text:?}"
    );
    Ok(())
}

/// 3. Bad tokens are refused with HTTP 401 before the upgrade; the header form works too.
pub async fn unauthorized_handshakes(sys: &mut System) -> Result<()> {
    let url = sys.ws_url(0);
    let secret = sys.secret().to_owned();
    let no_sub = token::mint_value(&secret, &json!({"exp": token::now() + 3600}))?;
    let cases = [
        ("missing token", None, false),
        ("malformed token", Some(token::MALFORMED.to_owned()), false),
        (
            "badly signed token",
            Some(token::badly_signed(&secret, "mallory")?),
            false,
        ),
        (
            "expired token",
            Some(token::expired(&secret, "mallory")?),
            false,
        ),
        ("token without sub", Some(no_sub), false),
        (
            "badly signed bearer header",
            Some(token::badly_signed(&secret, "mallory")?),
            true,
        ),
        (
            "expired bearer header",
            Some(token::expired(&secret, "mallory")?),
            true,
        ),
    ];
    for (case, token, bearer_header) in cases {
        let opts = ConnectOptions {
            token,
            bearer_header,
            origin: None,
        };
        match TestClient::connect_raw(&url, &opts).await {
            Ok(_) => bail!("{case}: the WebSocket was opened; expected HTTP 401"),
            Err(ConnectError::Http { status: 401, body }) => ensure!(
                !body.trim().is_empty(),
                "{case}: 401 without a reason in the body"
            ),
            Err(e) => bail!("{case}: expected HTTP 401, got {e}"),
        }
    }

    let opts = ConnectOptions {
        token: Some(sys.token("alice")?),
        bearer_header: true,
        origin: None,
    };
    let mut c = TestClient::connect_raw(&url, &opts)
        .await
        .context("a valid token in `Authorization: Bearer` must be accepted")?;
    let first = c.recv_json(T).await?;
    ensure!(
        first["type"] == "connected" && first["user"] == "alice",
        "expected `connected` for alice, got {first}"
    );
    Ok(())
}

/// 4. `rooms` and `publish` claims are enforced: `forbidden`; publishing unjoined: `not_joined`.
pub async fn forbidden_and_not_joined(sys: &mut System) -> Result<()> {
    let claims = Claims::new("dave")
        .rooms(["chat:*", "news"])
        .publish(["chat:ann*"]);
    let mut d = sys.client_with(0, &claims).await?;

    for room in ["secret", "newsroom", "cha"] {
        let r = d
            .request(json!({"type": "join", "room": room, "id": 11}))
            .await?;
        check_error(
            &r,
            "forbidden",
            Some(11),
            &format!("join {room} outside rooms"),
        )?;
    }
    join(&mut d, "chat:general").await?;
    join(&mut d, "news").await?;

    let r = d
        .request(json!({"type": "publish", "room": "chat:general", "data": 1, "id": 12}))
        .await?;
    check_error(
        &r,
        "forbidden",
        Some(12),
        "publish outside `publish` patterns",
    )?;
    let r = d
        .request(json!({"type": "publish", "room": "chat:announce", "data": 1, "id": 13}))
        .await?;
    check_error(
        &r,
        "not_joined",
        Some(13),
        "publish to an allowed room not joined",
    )?;
    join(&mut d, "chat:announce").await?;
    d.publish("chat:announce", json!("ok")).await?;

    // Without a `publish` claim, `rooms` applies to publishing too.
    let mut e = sys
        .client_with(1, &Claims::new("erin").rooms(["chat:*"]))
        .await?;
    join(&mut e, "chat:general").await?;
    e.publish("chat:general", json!("hi")).await?;
    let r = e
        .request(json!({"type": "publish", "room": "elsewhere", "data": 1, "id": 14}))
        .await?;
    ensure!(
        r["type"] == "error" && (r["code"] == "forbidden" || r["code"] == "not_joined"),
        "publish to a room outside `rooms`: expected forbidden/not_joined, got {r}"
    );

    // After leaving, publishing is `not_joined` again.
    let left = e
        .request_ok(json!({"type": "leave", "room": "chat:general"}), "left")
        .await?;
    ensure!(
        left["room"] == "chat:general",
        "left names another room: {left}"
    );
    let r = e
        .request(json!({"type": "publish", "room": "chat:general", "data": 1, "id": 15}))
        .await?;
    check_error(&r, "not_joined", Some(15), "publish after leave")?;
    Ok(())
}

/// 5. Two publishers on two gateways fire 100 messages each; every member sees all 200 in
///    consecutive offset order, each publisher's messages in its sending order.
pub async fn ordering_under_concurrent_publishers(sys: &mut System) -> Result<()> {
    const N: u64 = 100;
    let room = "order";
    let mut p1 = sys.client(0, "p1").await?;
    let mut p2 = sys.client(1, "p2").await?;
    let mut members = Vec::new();
    for i in 0..4 {
        members.push(sys.client(i, &format!("m{i}")).await?);
    }
    let (epoch, base) = join(&mut p1, room).await?;
    join(&mut p2, room).await?;
    for m in &mut members {
        join(m, room).await?;
    }

    async fn fire(p: &mut TestClient, room: &str, tag: &str) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for seq in 0..N {
            let cmd = json!({"type": "publish", "room": room, "data": {"from": tag, "seq": seq}});
            ids.push(p.send_command(cmd).await?);
        }
        Ok(ids)
    }
    let (ids1, ids2) = tokio::join!(fire(&mut p1, room, "p1"), fire(&mut p2, room, "p2"));
    let sent = [(&mut p1, ids1?), (&mut p2, ids2?)];

    // Replies: all `published`, offsets increasing in sending order.
    for (p, ids) in sent {
        let mut last = 0;
        for (seq, id) in ids.into_iter().enumerate() {
            let reply = p.reply_to(id, T).await?;
            ensure!(
                reply["type"] == "published",
                "{} publish #{seq}: expected `published`, got {reply}",
                p.name()
            );
            let offset = u64_field(&reply, "offset")?;
            ensure!(
                offset > last,
                "{}: publish #{seq} got offset {offset} after {last}",
                p.name()
            );
            last = offset;
        }
    }

    let senders = [
        ("p1", p1.client_id().to_owned()),
        ("p2", p2.client_id().to_owned()),
    ];
    for m in &mut members {
        let frames = m
            .expect_n("message", 2 * N as usize, Duration::from_secs(15))
            .await?;
        let mut next_seq = [0u64; 2];
        for (i, f) in frames.iter().enumerate() {
            let want = base + 1 + i as u64;
            ensure!(
                f["offset"] == want && f["epoch"] == epoch.as_str(),
                "{}: message #{i} should have offset {want} (epoch {epoch}); got {f}",
                m.name()
            );
            let from = str_field(&f["data"], "from")?;
            let k = usize::from(from == "p2");
            ensure!(
                f["clientId"] == senders[k].1.as_str() && f["user"] == senders[k].0,
                "{}: sender fields do not match data.from {from}: {f}",
                m.name()
            );
            ensure!(
                f["data"]["seq"] == next_seq[k],
                "{}: {from}'s message #{} arrived as {f}",
                m.name(),
                next_seq[k]
            );
            next_seq[k] += 1;
        }
        m.expect_none(Some("message"), Duration::from_millis(100))
            .await
            .context("more than 200 messages")?;
    }

    // Each publisher gets the other's 100, in order, and none of its own.
    for (p, other) in [(&mut p1, "p2"), (&mut p2, "p1")] {
        let frames = p
            .expect_n("message", N as usize, Duration::from_secs(10))
            .await?;
        let mut last = base;
        for (seq, f) in frames.iter().enumerate() {
            let offset = u64_field(f, "offset")?;
            ensure!(
                f["data"]["from"] == other && f["data"]["seq"] == seq && offset > last,
                "{}: message #{seq} should be {other}'s #{seq} after offset {last}: {f}",
                p.name()
            );
            last = offset;
        }
        p.expect_none(Some("message"), SILENCE)
            .await
            .context("a publisher received its own message")?;
    }
    Ok(())
}

/// A member joining while messages flow gets, live, exactly the messages after its `joined`
/// offset: none at or before it (already part of the position it was given), no gap after it.
pub async fn late_join_during_traffic(sys: &mut System) -> Result<()> {
    const N: u64 = 150;
    let room = "busy";
    let mut p = sys.client(0, "talker").await?;
    let mut late = sys.client(1, "late").await?;
    join(&mut p, room).await?;

    let publish_all = async {
        let mut ids = Vec::new();
        for n in 0..N {
            let cmd = json!({"type": "publish", "room": room, "data": n});
            ids.push(p.send_command(cmd).await?);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut last = 0;
        for id in ids {
            let r = p.reply_to(id, T).await?;
            ensure!(r["type"] == "published", "publish: {r}");
            last = u64_field(&r, "offset")?;
        }
        anyhow::Ok(last)
    };
    let join_midway = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        join(&mut late, room).await
    };
    let (last, joined) = tokio::join!(publish_all, join_midway);
    let (last, (_, at)) = (last?, joined?);
    ensure!(
        at < last,
        "the join did not land during the traffic (joined at {at}, last offset {last})"
    );
    let want = usize::try_from(last - at)?;
    let frames = late
        .expect_n("message", want, Duration::from_secs(10))
        .await?;
    for (i, f) in frames.iter().enumerate() {
        let expected = at + 1 + i as u64;
        ensure!(
            f["offset"] == expected,
            "joined at offset {at}: live message #{i} should have offset {expected}, got {f}"
        );
    }
    late.expect_none(Some("message"), SILENCE)
        .await
        .context("messages beyond the last publish")?;
    Ok(())
}

/// 6. Bad frames get `bad_request` (with their id) and the connection stays usable.
pub async fn bad_requests_keep_connection(sys: &mut System) -> Result<()> {
    let mut c = sys.client(0, "fuzzy").await?;
    let long_room = "x".repeat(129);
    let cases: Vec<(&str, String, Option<u64>)> = vec![
        ("invalid JSON", "this is {not json".into(), None),
        ("a JSON array", "[1,2,3]".into(), None),
        ("a JSON number", "42".into(), None),
        ("no type", json!({"id": 1}).to_string(), Some(1)),
        (
            "unknown type",
            json!({"type": "no_such", "id": 2}).to_string(),
            Some(2),
        ),
        (
            "join without room",
            json!({"type": "join", "id": 3}).to_string(),
            Some(3),
        ),
        (
            "room with a space",
            json!({"type": "join", "id": 4, "room": "bad room!"}).to_string(),
            Some(4),
        ),
        (
            "empty room",
            json!({"type": "join", "id": 5, "room": ""}).to_string(),
            Some(5),
        ),
        (
            "room of 129 bytes",
            json!({"type": "join", "id": 6, "room": long_room}).to_string(),
            Some(6),
        ),
        (
            "room not a string",
            json!({"type": "join", "id": 7, "room": 42}).to_string(),
            Some(7),
        ),
        (
            "publish without room",
            json!({"type": "publish", "id": 8, "data": 1}).to_string(),
            Some(8),
        ),
        (
            "since not an object",
            json!({"type": "join", "id": 9, "room": "ok", "since": "yesterday"}).to_string(),
            Some(9),
        ),
        (
            "type not a string",
            json!({"type": 5, "id": 10}).to_string(),
            Some(10),
        ),
    ];
    for (case, text, id) in cases {
        c.send_raw_text(text.clone()).await?;
        let frame = c
            .expect("error", T)
            .await
            .with_context(|| format!("{case}: sent {text}"))?;
        check_error(&frame, "bad_request", id, case)?;
    }
    let pong = c
        .request_ok(json!({"type": "ping", "id": 100}), "pong")
        .await?;
    ensure!(pong["id"] == 100, "pong should carry id 100: {pong}");
    c.send_json(&json!({"type": "ping"})).await?;
    let pong = c.expect("pong", T).await?;
    ensure!(
        pong.get("id").is_none_or(Value::is_null),
        "unasked id in {pong}"
    );
    join(&mut c, "ok")
        .await
        .context("join after the bad frames")?;
    ensure!(c.close_code().is_none(), "the connection was closed");
    Ok(())
}

/// 7. A frame over MAX_FRAME_BYTES closes the connection with 1009; one below passes.
pub async fn oversized_frame_closes_1009(sys: &mut System) -> Result<()> {
    let limit = sys.options().max_frame_bytes;
    let mut c = sys.client(0, "big").await?;
    join(&mut c, "big").await?;
    c.publish("big", json!("x".repeat(limit / 2))).await?;
    let frame = json!({"type": "publish", "room": "big", "data": "x".repeat(limit + 100)});
    c.send_raw_text(frame.to_string()).await?;
    let close = c.expect_close(T).await?;
    ensure!(
        close.code == Some(1009),
        "a {} byte frame (limit {limit}) should close with 1009, got {close}",
        frame.to_string().len()
    );
    Ok(())
}

/// 8. A client that stops answering pings is dropped (and its presence removed) within ~2 s;
///    a normal client over the same period stays.
pub async fn heartbeat_drops_silent_client(sys: &mut System) -> Result<()> {
    let room = "hb";
    let mut observer = sys.client(0, "observer").await?;
    let mut normal = sys.client(1, "normal").await?;
    let mut silent = sys.client(1, "silent").await?;
    let hb = &silent.connected()["heartbeat"];
    ensure!(
        hb["intervalMs"] == sys.options().heartbeat_interval_ms,
        "heartbeat settings not applied: {hb}"
    );
    for c in [&mut observer, &mut normal, &mut silent] {
        join(c, room).await?;
    }
    expect_presence_event(
        &mut observer,
        "member_joined",
        room,
        (silent.user(), silent.client_id()),
        T,
    )
    .await?;

    let start = Instant::now();
    silent.stop_answering_pings();
    let silent_id = silent.client_id().to_owned();
    expect_presence_event(
        &mut observer,
        "member_left",
        room,
        ("silent", &silent_id),
        Duration::from_millis(2500),
    )
    .await
    .context("the silent client's presence should go within ~2 s")?;

    // The normal client lived through the same period (its pings were answered).
    tokio::time::sleep_until((start + Duration::from_secs(2)).into()).await;
    let pong = normal.request_ok(json!({"type": "ping"}), "pong").await;
    pong.context("the normal client should still be connected")?;
    ensure!(
        normal.pings_received() >= 3,
        "the server sent {} WebSocket pings in over 2 s at a 200 ms interval",
        normal.pings_received()
    );
    let now = presence(&mut observer, room).await?;
    let want: BTreeSet<_> = [member_of(&observer), member_of(&normal)].into();
    ensure!(now == want, "presence should be {want:?}, is {now:?}");

    silent.resume_reading();
    let close = silent
        .expect_close(Duration::from_secs(2))
        .await
        .context("the silent client's socket should be closed")?;
    ensure!(
        close.code != Some(1000),
        "a heartbeat timeout is not a normal close: {close}"
    );
    Ok(())
}

/// 8b. With traffic going out anyway, the server's pings ride along with it: each comes in the
///     same write as a message (read here in the same chunk, right behind it), in the last
///     quarter of its interval, so never later than the interval and never more often than
///     one per three quarters of it. Run with a 200 ms interval. A raw socket, because a
///     WebSocket library hides how frames arrived.
pub async fn pings_ride_along_with_deliveries(sys: &mut System) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let room = "ride";
    let interval = Duration::from_millis(sys.options().heartbeat_interval_ms);
    let mut publisher = sys.client(0, "alice").await?;
    join(&mut publisher, room).await?;

    let token = sys.token("bob")?;
    let http = sys.http_url(0);
    let addr = http.trim_start_matches("http://").trim_end_matches('/');
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: roomcast\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut stream = ServerFrames::default();
    let mut buf = vec![0u8; 1 << 16];
    // The 101's head, then frames.
    let head_end = loop {
        let n = tokio::time::timeout(T, tcp.read(&mut buf)).await??;
        ensure!(
            n > 0,
            "the gateway closed the connection during the handshake"
        );
        stream.pending.extend_from_slice(&buf[..n]);
        if let Some(at) = stream.pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    ensure!(
        stream.pending.starts_with(b"HTTP/1.1 101"),
        "expected 101, got {:?}",
        String::from_utf8_lossy(&stream.pending)
    );
    stream.pending.drain(..head_end);
    tcp.write_all(&masked_text(&format!(
        r#"{{"type":"join","room":"{room}","id":1}}"#
    )))
    .await?;
    let joined = Instant::now() + T;
    'join: loop {
        let left = joined.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut buf))
            .await
            .context("no join reply")??;
        ensure!(
            n > 0,
            "the gateway closed the connection before the join reply"
        );
        for (opcode, payload, _) in stream.push(&buf[..n]) {
            if opcode == 0x1 && payload.windows(8).any(|w| w == b"\"joined\"") {
                break 'join;
            }
        }
    }

    // Messages every 10 ms for 8 intervals, read as they come.
    let send_for = interval * 8;
    let sender = tokio::spawn(async move {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < send_for {
            publisher
                .send_command(json!({"type": "publish", "room": room, "data": {"n": n}}))
                .await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(n)
    });
    let until = Instant::now() + send_for;
    let mut pings: Vec<(Instant, bool)> = Vec::new();
    let mut messages = 0;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(read) = tokio::time::timeout(left, tcp.read(&mut buf)).await else {
            break;
        };
        let n = read?;
        ensure!(n > 0, "the gateway closed the connection");
        let at = Instant::now();
        for (opcode, _, behind_text) in stream.push(&buf[..n]) {
            match opcode {
                0x1 => messages += 1,
                0x9 => {
                    pings.push((at, behind_text));
                    // Answered, as every client does.
                    tcp.write_all(&[0x8a, 0x80, 1, 2, 3, 4]).await?;
                }
                _ => {}
            }
        }
    }
    let sent = sender.await??;
    ensure!(messages > 0, "no message arrived of the {sent} published");
    ensure!(
        pings.len() >= 5,
        "{} pings in {send_for:?} at a {interval:?} interval",
        pings.len()
    );
    let carried = pings.iter().filter(|(_, behind)| *behind).count();
    ensure!(
        carried * 5 >= pings.len() * 4,
        "only {carried} of {} pings came in the same write as a message ({messages} messages \
         arrived)",
        pings.len()
    );
    // Lateness of a loaded test machine: the bound is the interval, give or take its half.
    for pair in pings.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        ensure!(
            gap <= interval + interval / 2 && gap >= interval / 2,
            "pings {gap:?} apart at a {interval:?} interval"
        );
    }
    Ok(())
}

/// Server frames (unmasked) parsed from a byte stream read in chunks.
#[derive(Default)]
struct ServerFrames {
    pending: Vec<u8>,
}

impl ServerFrames {
    /// The whole frames that `chunk` completes: opcode, payload, and whether a text frame came
    /// right before it in the same chunk.
    fn push(&mut self, chunk: &[u8]) -> Vec<(u8, Vec<u8>, bool)> {
        let first_new = self.pending.len();
        self.pending.extend_from_slice(chunk);
        let mut frames = Vec::new();
        let mut at = 0;
        let mut last_text_end = None;
        while self.pending.len() >= at + 2 {
            let opcode = self.pending[at] & 0x0f;
            let (len, header) = match self.pending[at + 1] & 0x7f {
                126 if self.pending.len() >= at + 4 => (
                    u16::from_be_bytes([self.pending[at + 2], self.pending[at + 3]]) as usize,
                    4,
                ),
                127 if self.pending.len() >= at + 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.pending[at + 2..at + 10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                126 | 127 => break,
                len => (len as usize, 2),
            };
            let end = at + header + len;
            if self.pending.len() < end {
                break;
            }
            // Right behind a text frame whose end was read in this chunk.
            let behind_text = last_text_end == Some(at) && at >= first_new;
            frames.push((opcode, self.pending[at + header..end].to_vec(), behind_text));
            if opcode == 0x1 && end > first_new {
                last_text_end = Some(end);
            }
            at = end;
        }
        self.pending.drain(..at);
        frames
    }
}

/// 10a. Presence lists members; joins and leaves (and disconnects) reach the other members.
pub async fn presence_and_member_events(sys: &mut System) -> Result<()> {
    let room = "lobby";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    expect_presence_event(&mut a, "member_joined", room, (b.user(), b.client_id()), T).await?;
    let want: BTreeSet<_> = [member_of(&a), member_of(&b)].into();
    for c in [&mut a, &mut b] {
        let now = presence(c, room).await?;
        ensure!(
            now == want,
            "{}: presence should be {want:?}, is {now:?}",
            c.name()
        );
    }

    let left = b
        .request_ok(json!({"type": "leave", "room": room}), "left")
        .await?;
    ensure!(left["room"] == room, "left names another room: {left}");
    expect_presence_event(&mut a, "member_left", room, (b.user(), b.client_id()), T).await?;
    let now = presence(&mut a, room).await?;
    ensure!(
        now == [member_of(&a)].into(),
        "after bob left: presence is {now:?}"
    );

    // A closed connection leaves its rooms too.
    join(&mut b, room).await?;
    expect_presence_event(&mut a, "member_joined", room, (b.user(), b.client_id()), T).await?;
    let bob = member_of(&b);
    b.close().await?;
    expect_presence_event(&mut a, "member_left", room, (&bob.0, &bob.1), T)
        .await
        .context("after bob's connection closed")?;
    let now = presence(&mut a, room).await?;
    ensure!(
        now == [member_of(&a)].into(),
        "after bob disconnected: presence is {now:?}"
    );
    Ok(())
}

/// 10b. `history` returns the held messages oldest first; `since` and `limit` narrow it.
pub async fn history_oldest_first(sys: &mut System) -> Result<()> {
    let room = "hist";
    let mut a = sys.client(0, "alice").await?;
    let (epoch, _) = join(&mut a, room).await?;
    let mut offsets = Vec::new();
    for n in 0..5 {
        offsets.push(a.publish(room, json!({"n": n})).await?);
    }
    let last = offsets[4];

    // Asked from another gateway by a member who joined later.
    let mut b = sys.client(1, "bob").await?;
    join(&mut b, room).await?;
    let h = b
        .request_ok(json!({"type": "history", "room": room}), "history")
        .await?;
    ensure!(
        h["room"] == room && h["epoch"] == epoch.as_str() && h["offset"] == last,
        "history header should be room {room}, epoch {epoch}, offset {last}: {h}"
    );
    let messages = h["messages"]
        .as_array()
        .context("`messages` is not an array")?;
    ensure!(messages.len() == 5, "expected 5 messages, got {h}");
    for (n, (m, offset)) in messages.iter().zip(&offsets).enumerate() {
        check_message(m, room, *offset, &epoch, &a, &json!({"n": n}))
            .with_context(|| format!("history message #{n}"))?;
    }

    let h = b
        .request_ok(
            json!({"type": "history", "room": room, "since": offsets[1]}),
            "history",
        )
        .await?;
    let got = message_offsets(&h)?;
    ensure!(
        got == offsets[2..],
        "history since {} should hold offsets {:?}: {h}",
        offsets[1],
        &offsets[2..]
    );

    let h = b
        .request_ok(
            json!({"type": "history", "room": room, "limit": 2}),
            "history",
        )
        .await?;
    let got = message_offsets(&h)?;
    ensure!(
        got.len() == 2 && got[1] == got[0] + 1 && offsets.contains(&got[0]),
        "history limit 2 should be two consecutive held messages, oldest first: {h}"
    );
    Ok(())
}

/// History is bounded by count and age (HISTORY_SIZE=3, HISTORY_TTL_SECONDS=2): only what is
/// held is returned or recovered, and a `since` before the window says `recovered: false`.
pub async fn history_window_bounds(sys: &mut System) -> Result<()> {
    let room = "window";
    let mut a = sys.client(0, "alice").await?;
    let (epoch, _) = join(&mut a, room).await?;
    let mut offsets = Vec::new();
    for n in 0..6 {
        offsets.push(a.publish(room, json!(n)).await?);
    }
    let h = a
        .request_ok(json!({"type": "history", "room": room}), "history")
        .await?;
    ensure!(
        message_offsets(&h)? == offsets[3..],
        "with HISTORY_SIZE=3, history should hold the last 3 offsets {:?}: {h}",
        &offsets[3..]
    );

    let rejoin = |since: u64| json!({"type": "join", "room": room, "since": {"epoch": epoch, "offset": since}});
    let mut b = sys.client(1, "bob").await?;
    let joined = b.request_ok(rejoin(offsets[2]), "joined").await?;
    let missed: Vec<u64> = joined["missed"]
        .as_array()
        .with_context(|| format!("no `missed` array: {joined}"))?
        .iter()
        .map(|m| u64_field(m, "offset"))
        .collect::<Result<_>>()?;
    ensure!(
        joined["recovered"] == true && missed == offsets[3..],
        "since {} (inside the window): expected recovered with {:?}: {joined}",
        offsets[2],
        &offsets[3..]
    );
    let mut c = sys.client(0, "carol").await?;
    let joined = c.request_ok(rejoin(offsets[0]), "joined").await?;
    ensure!(
        joined["recovered"] == false,
        "since {}: offsets {:?} left the window, so recovery is impossible: {joined}",
        offsets[0],
        &offsets[1..3]
    );

    // After the TTL the messages are gone.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let h = a
        .request_ok(json!({"type": "history", "room": room}), "history")
        .await?;
    ensure!(
        message_offsets(&h)?.is_empty(),
        "with HISTORY_TTL_SECONDS=2, nothing should be held after 2.6 s: {h}"
    );
    let mut d = sys.client(1, "dan").await?;
    let joined = d.request_ok(rejoin(offsets[4]), "joined").await?;
    ensure!(
        joined["recovered"] == false,
        "since {}: offset {} aged out, so recovery is impossible: {joined}",
        offsets[4],
        offsets[5]
    );
    Ok(())
}

/// 10c. Rejoining with `since` (on another gateway) recovers exactly the missed messages.
pub async fn recovery_with_since(sys: &mut System) -> Result<()> {
    let room = "recover";
    let mut a = sys.client(0, "alice").await?;
    join(&mut a, room).await?;
    a.publish(room, json!("before-1")).await?;
    a.publish(room, json!("before-2")).await?;

    let mut c = sys.client(1, "carol").await?;
    let (epoch, seen) = join(&mut c, room).await?;
    c.close().await?;

    let mut missed = Vec::new();
    for n in 0..3 {
        let data = json!({"missed": n});
        missed.push((a.publish(room, data.clone()).await?, data));
    }

    let mut c = sys.client(0, "carol").await?;
    let since = json!({"epoch": epoch, "offset": seen});
    let joined = c
        .request_ok(
            json!({"type": "join", "room": room, "since": since}),
            "joined",
        )
        .await?;
    ensure!(
        joined["recovered"] == true && joined["epoch"] == epoch.as_str(),
        "join with since {since} should recover in epoch {epoch}: {joined}"
    );
    let got = joined["missed"]
        .as_array()
        .context("`missed` is not an array")?;
    ensure!(
        got.len() == missed.len(),
        "expected exactly {} missed messages: {joined}",
        missed.len()
    );
    for (frame, (offset, data)) in got.iter().zip(&missed) {
        check_message(frame, room, *offset, &epoch, &a, data)?;
    }
    // Live delivery continues after the recovered ones, without duplicates.
    let next = a.publish(room, json!("after")).await?;
    let m = c.expect("message", T).await?;
    check_message(&m, room, next, &epoch, &a, &json!("after"))?;

    // Nothing missed: recovered, empty.
    let mut d = sys.client(1, "dan").await?;
    let since = json!({"epoch": epoch, "offset": next});
    let joined = d
        .request_ok(
            json!({"type": "join", "room": room, "since": since}),
            "joined",
        )
        .await?;
    ensure!(
        joined["recovered"] == true && joined["missed"].as_array().is_none_or(|m| m.is_empty()),
        "join at the latest offset should recover nothing: {joined}"
    );

    // Another epoch: the history does not apply.
    let mut e = sys.client(0, "erin").await?;
    let since = json!({"epoch": "not-this-epoch", "offset": 1});
    let joined = e
        .request_ok(
            json!({"type": "join", "room": room, "since": since}),
            "joined",
        )
        .await?;
    ensure!(
        joined["recovered"] == false && joined["epoch"] == epoch.as_str(),
        "join with a foreign epoch should say recovered: false and the current epoch: {joined}"
    );
    Ok(())
}

/// 11. Ops endpoints answer 200 on every gateway (and every service of a cluster).
pub async fn ops_endpoints(sys: &mut System) -> Result<()> {
    let mut bases: Vec<String> = (0..sys.gateways()).map(|i| sys.http_url(i)).collect();
    if let Some(cluster) = sys.cluster() {
        bases.push(cluster.auth().http_url.clone());
        for i in 0..cluster.room_service_count() {
            bases.push(cluster.room_service(i).http_url.clone());
        }
    }
    for base in bases {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let url = format!("{base}{path}");
            let r = http::get(&url, T).await?;
            ensure!(r.status == 200, "GET {url}: HTTP {} {:?}", r.status, r.body);
        }
    }
    Ok(())
}

/// `refresh` swaps the token; a bad one is refused and the connection stays.
pub async fn refresh_token(sys: &mut System) -> Result<()> {
    let mut c = sys
        .client_with(0, &Claims::new("alice").expires_in(60))
        .await?;
    let claims = Claims::new("alice").expires_in(7200);
    let token = sys.mint(&claims)?;
    let r = c
        .request_ok(json!({"type": "refresh", "token": token}), "refreshed")
        .await?;
    ensure!(
        r["expiresAt"] == claims.exp,
        "expiresAt should be the new token's exp {}: {r}",
        claims.exp
    );
    let bad = token::badly_signed(sys.secret(), "alice")?;
    let r = c
        .request(json!({"type": "refresh", "token": bad, "id": 7}))
        .await?;
    check_error(
        &r,
        "unauthorized",
        Some(7),
        "refresh with a badly signed token",
    )?;
    c.request_ok(json!({"type": "ping"}), "pong").await?;
    Ok(())
}

/// A server API client for room-service `i` (without credentials: see `with_key`).
async fn server_api_client(
    sys: &System,
    i: usize,
) -> Result<ServerApiClient<tonic::transport::Channel>> {
    let url = sys.server_api_url(i);
    ServerApiClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to the server API at {url}"))
}

fn with_key<T>(message: T, key: &str) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {key}")
        .parse()
        .context("API key is not valid metadata")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// The server API: refused without the API key; with it, a publish reaches the room's
/// members, and presence and history answer.
pub async fn server_api(sys: &mut System) -> Result<()> {
    let room = "srv";
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 0).await?;
    let mut a = sys.client(1, "alice").await?;
    join(&mut a, room).await?;

    let publish = || ServerPublishRequest {
        room: room.into(),
        data_json: r#"{"hello":"world"}"#.into(),
        user: String::new(),
        idempotency_key: String::new(),
    };
    for (case, request) in [
        ("no API key", tonic::Request::new(publish())),
        ("a wrong API key", with_key(publish(), "wrong-key")?),
        (
            "the internal token",
            with_key(publish(), &sys.options().internal_token.clone())?,
        ),
    ] {
        match api.publish(request).await {
            Ok(r) => bail!("ServerPublish with {case} succeeded: {r:?}"),
            Err(s) => ensure!(
                matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ),
                "ServerPublish with {case}: expected PERMISSION_DENIED/UNAUTHENTICATED, got {s:?}"
            ),
        }
    }
    a.expect_none(Some("message"), SILENCE)
        .await
        .context("a refused server publish was delivered")?;

    let published = api
        .publish(with_key(publish(), &key)?)
        .await
        .context("ServerPublish with the API key")?
        .into_inner();
    let m = a.expect("message", T).await?;
    let want = json!({
        "type": "message", "room": room, "offset": published.offset, "epoch": published.epoch,
        "user": "server", "data": {"hello": "world"},
    });
    let mut got = m.clone();
    if let Some(obj) = got.as_object_mut() {
        // The server has no connection; whatever clientId it reports is fine.
        obj.remove("clientId");
    }
    ensure!(
        got == want,
        "server message: expected {want} (+ clientId), got {m}"
    );

    let presence = api
        .presence(with_key(PresenceRequest { room: room.into() }, &key)?)
        .await
        .context("ServerPresence")?
        .into_inner();
    ensure!(
        presence
            .members
            .iter()
            .any(|m| m.client_id == a.client_id()),
        "ServerPresence should list alice: {presence:?}"
    );
    let history = api
        .history(with_key(
            HistoryRequest {
                room: room.into(),
                since: None,
                limit: 0,
            },
            &key,
        )?)
        .await
        .context("ServerHistory")?
        .into_inner();
    ensure!(
        history
            .publications
            .iter()
            .any(|p| p.offset == published.offset),
        "ServerHistory should hold offset {}: {history:?}",
        published.offset
    );
    Ok(())
}

/// `PublishBatch` and `Broadcast`: one call, many publishes, each stored and delivered as a
/// `Publish` would be, in the call's order; an invalid one fails alone, a repeated idempotency
/// key answers the first position, and more than 1024 publishes (or 4 MiB) are refused.
pub async fn server_api_batches(sys: &mut System) -> Result<()> {
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 1).await?;
    let mut a = sys.client(0, "alice").await?;
    join(&mut a, "batch-1").await?;
    join(&mut a, "batch-2").await?;
    let publish = |room: &str, data: &str, idempotency_key: &str| ServerPublishRequest {
        room: room.into(),
        data_json: data.into(),
        user: String::new(),
        idempotency_key: idempotency_key.into(),
    };
    let batch = ServerPublishBatchRequest {
        publishes: vec![
            publish("batch-1", r#"{"n":1}"#, ""),
            publish("batch-2", r#"{"n":2}"#, ""),
            publish("bad room", r#"{"n":0}"#, ""),
            publish("batch-1", r#"{"n":"#, ""),
            publish("batch-1", r#"{"n":3}"#, "k"),
            publish("batch-1", r#"{"n":4}"#, "k"),
        ],
    };
    match api.publish_batch(tonic::Request::new(batch.clone())).await {
        Ok(r) => bail!("PublishBatch without the API key succeeded: {r:?}"),
        Err(s) => ensure!(
            matches!(
                s.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ),
            "PublishBatch without the API key: got {s:?}"
        ),
    }
    let results = api
        .publish_batch(with_key(batch, &key)?)
        .await
        .context("PublishBatch")?
        .into_inner()
        .results;
    ensure!(results.len() == 6, "6 results expected: {results:?}");
    let published = |i: usize| -> Result<PublishResponse> {
        match &results[i].outcome {
            Some(Outcome::Published(p)) => Ok(p.clone()),
            other => bail!("publish {i} of the batch: expected published, got {other:?}"),
        }
    };
    for i in [2, 3] {
        match &results[i].outcome {
            Some(Outcome::Error(e)) if e.code == tonic::Code::InvalidArgument as i32 => {}
            other => bail!("publish {i} of the batch: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    let (first, third, repeat) = (published(0)?, published(4)?, published(5)?);
    ensure!(
        third.epoch == first.epoch && third.offset == first.offset + 1,
        "batch-1 offsets out of the call's order: {first:?} then {third:?}"
    );
    ensure!(
        repeat == third,
        "a repeated idempotency key got {repeat:?}, not the first position {third:?}"
    );
    let second = published(1)?;

    // Delivered in the call's order, each once; the repeat and the refused ones not at all.
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = a.expect("message", T).await?;
        got.push((
            m["room"].as_str().unwrap_or_default().to_owned(),
            m["offset"].as_u64().unwrap_or_default(),
            m["data"]["n"].clone(),
            m["user"].clone(),
        ));
    }
    got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    let want = vec![
        (
            "batch-1".to_owned(),
            first.offset,
            json!(1),
            json!("server"),
        ),
        (
            "batch-1".to_owned(),
            third.offset,
            json!(3),
            json!("server"),
        ),
        (
            "batch-2".to_owned(),
            second.offset,
            json!(2),
            json!("server"),
        ),
    ];
    ensure!(
        got == want,
        "batch deliveries: expected {want:?}, got {got:?}"
    );

    // A call above gRPC's 4 MiB message limit is refused whole, with a clear status.
    let big = format!("\"{}\"", "x".repeat(60_000));
    let huge = ServerPublishBatchRequest {
        publishes: vec![publish("batch-1", &big, ""); 80],
    };
    match api.publish_batch(with_key(huge, &key)?).await {
        Ok(r) => bail!(
            "a 4.8 MB batch succeeded: {:?}",
            r.into_inner().results.len()
        ),
        Err(s) => ensure!(
            matches!(
                s.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "a 4.8 MB batch: expected OUT_OF_RANGE or RESOURCE_EXHAUSTED, got {s:?}"
        ),
    }
    a.expect_none(Some("message"), SILENCE)
        .await
        .context("a refused or repeated publish of the batch was delivered")?;

    let too_many = ServerPublishBatchRequest {
        publishes: vec![publish("batch-1", "1", ""); 1025],
    };
    match api.publish_batch(with_key(too_many, &key)?).await {
        Ok(r) => bail!(
            "a batch of 1025 publishes succeeded: {} results",
            r.into_inner().results.len()
        ),
        Err(s) => ensure!(
            s.code() == tonic::Code::InvalidArgument,
            "a batch of 1025 publishes: expected INVALID_ARGUMENT, got {s:?}"
        ),
    }

    // Broadcast goes the same way: one result per room, a bad room failing alone.
    let broadcast = BroadcastRequest {
        rooms: vec!["batch-1".into(), "bad room".into(), "batch-2".into()],
        data_json: r#"{"all":true}"#.into(),
        user: "ops".into(),
        idempotency_key: String::new(),
    };
    let results = api
        .broadcast(with_key(broadcast, &key)?)
        .await
        .context("Broadcast")?
        .into_inner()
        .results;
    let rooms: Vec<_> = results.iter().map(|r| r.room.as_str()).collect();
    ensure!(
        rooms == ["batch-1", "bad room", "batch-2"],
        "broadcast results out of order: {results:?}"
    );
    ensure!(
        results[1].published.is_none() && !results[1].error.is_empty(),
        "a bad room in a broadcast: expected an error, got {:?}",
        results[1]
    );
    let offsets = [
        results[0].published.as_ref().map(|p| p.offset),
        results[2].published.as_ref().map(|p| p.offset),
    ];
    ensure!(
        offsets == [Some(third.offset + 1), Some(second.offset + 1)],
        "broadcast offsets: expected the rooms' next ones, got {results:?}"
    );
    for _ in 0..2 {
        let m = a.expect("message", T).await?;
        ensure!(
            m["data"] == json!({"all": true}) && m["user"] == "ops",
            "broadcast delivery: got {m}"
        );
    }
    Ok(())
}

/// `Disconnect` of a user closes its connections on every gateway (code 0 → 1008).
pub async fn server_api_disconnect(sys: &mut System) -> Result<()> {
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 1).await?;
    let mut b0 = sys.client(0, "bob").await?;
    let mut b1 = sys.client(1, "bob").await?;
    let mut a = sys.client(0, "alice").await?;
    let request = DisconnectRequest {
        user: "bob".into(),
        client_id: String::new(),
        code: 0,
        reason: "test".into(),
    };
    api.disconnect(with_key(request, &key)?)
        .await
        .context("Disconnect")?;
    for b in [&mut b0, &mut b1] {
        let close = b.expect_close(T).await?;
        ensure!(
            close.code == Some(1008),
            "{}: expected close 1008, got {close}",
            b.name()
        );
    }
    a.request_ok(json!({"type": "ping"}), "pong")
        .await
        .context("alice must stay connected")?;
    Ok(())
}

/// Server-side subscriptions: `Subscribe` joins every connection of a user (on every gateway)
/// to a room its token does not even allow, with a `joined` frame without an id; they then
/// receive the room's messages and appear in presence. `Unsubscribe` makes them leave.
pub async fn server_api_subscribe(sys: &mut System) -> Result<()> {
    let room = "news";
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 0).await?;
    let only_chat = Claims::new("carol").rooms(["chat:*"]);
    let mut c0 = sys.client_with(0, &only_chat).await?;
    let mut c1 = sys.client_with(1, &only_chat).await?;
    let mut other = sys.client(0, "dave").await?;
    let request = SubscribeRequest {
        room: room.into(),
        user: "carol".into(),
        client_id: String::new(),
    };
    api.subscribe(with_key(request, &key)?)
        .await
        .context("Subscribe")?;
    for c in [&mut c0, &mut c1] {
        let joined = c.expect("joined", T).await?;
        ensure!(
            joined["room"] == json!(room) && joined.get("id").is_none(),
            "{}: {joined}",
            c.name()
        );
    }
    other
        .expect_none(Some("joined"), SILENCE)
        .await
        .context("another user was subscribed")?;
    let publish = ServerPublishRequest {
        room: room.into(),
        data_json: r#"{"headline":1}"#.into(),
        user: String::new(),
        idempotency_key: String::new(),
    };
    api.publish(with_key(publish.clone(), &key)?).await?;
    for c in [&mut c0, &mut c1] {
        let m = c.expect("message", T).await?;
        ensure!(m["data"] == json!({"headline": 1}), "{m}");
    }
    let presence = c0
        .request_ok(json!({"type": "presence", "room": room}), "presence")
        .await?;
    let members = presence["members"].as_array().context("members")?;
    ensure!(members.len() == 2, "presence: {presence}");

    let request = UnsubscribeRequest {
        room: room.into(),
        user: String::new(),
        client_id: c1.client_id().to_owned(),
    };
    api.unsubscribe(with_key(request, &key)?)
        .await
        .context("Unsubscribe")?;
    let left = c1.expect("left", T).await?;
    ensure!(left["room"] == json!(room), "{left}");
    api.publish(with_key(publish, &key)?).await?;
    c0.expect("message", T).await?;
    c1.expect_none(Some("message"), SILENCE)
        .await
        .context("an unsubscribed connection still received the room")?;
    Ok(())
}

/// `publish.idempotencyKey`: a client repeating a publish (as after a reconnect, from another
/// gateway) gets the first one's offset, and members get the message once. Keys are per user:
/// another user's identical key is a new message.
pub async fn idempotent_client_publish(sys: &mut System) -> Result<()> {
    let room = "idem";
    let mut a = sys.client(0, "alice").await?;
    let mut again = sys.client(1, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    let mut member = sys.client(0, "member").await?;
    for c in [&mut a, &mut again, &mut b, &mut member] {
        join(c, room).await?;
    }
    member.drain(SILENCE).await?;
    let publish = |key: &str| json!({"type": "publish", "room": room, "data": {"n": 1}, "idempotencyKey": key});
    let first = a.request_ok(publish("k-1"), "published").await?;
    let repeated = again.request_ok(publish("k-1"), "published").await?;
    ensure!(
        first["offset"] == repeated["offset"],
        "a repeated key was stored again: {first} then {repeated}"
    );
    let other_user = b.request_ok(publish("k-1"), "published").await?;
    ensure!(
        other_user["offset"] != first["offset"],
        "another user's key must not collide: {other_user}"
    );
    let got = member.drain(Duration::from_millis(500)).await?;
    let messages = got.iter().filter(|m| m["type"] == "message").count();
    ensure!(messages == 2, "member got {messages} messages: {got:?}");
    let bad = a
        .request(json!({"type": "publish", "room": room, "data": 1, "idempotencyKey": "x".repeat(65), "id": 77}))
        .await?;
    check_error(&bad, "bad_request", Some(77), "a 65-byte idempotency key")?;
    Ok(())
}

/// A connection whose token expires is closed with 4001; one that refreshed in time stays.
pub async fn token_expiry_closes_4001(sys: &mut System) -> Result<()> {
    let short = Claims::new("brief").expires_in(2);
    let mut expiring = sys.client_with(0, &short).await?;
    let mut refreshed = sys.client_with(1, &short).await?;
    let token = sys.mint(&Claims::new("brief").expires_in(3600))?;
    refreshed
        .request_ok(json!({"type": "refresh", "token": token}), "refreshed")
        .await?;
    let close = expiring.expect_close(Duration::from_secs(6)).await?;
    ensure!(
        close.code == Some(4001),
        "a connection past its token's exp should close with 4001, got {close}"
    );
    refreshed
        .request_ok(json!({"type": "ping"}), "pong")
        .await
        .context("the refreshed connection must outlive the first token")?;
    Ok(())
}

/// Publishing faster than the token bucket allows gets `rate_limited`; refusals in a row close
/// the connection with 4029. Gateway settings: PUBLISH_RATE=2, PUBLISH_BURST=5,
/// RATE_LIMIT_CLOSE_AFTER=3.
pub async fn publish_rate_limit(sys: &mut System) -> Result<()> {
    let room = "rl";
    let mut c = sys.client(0, "spammer").await?;
    join(&mut c, room).await?;
    for n in 0..5 {
        c.publish(room, json!(n))
            .await
            .with_context(|| format!("publish #{n} is within the burst of 5"))?;
    }
    let r = c
        .request(json!({"type": "publish", "room": room, "data": 5, "id": 100}))
        .await?;
    check_error(&r, "rate_limited", Some(100), "publish #5, past the burst")?;
    // The next refusals in a row end the connection; sends may fail once it is closed.
    for n in 6..12 {
        let cmd = json!({"type": "publish", "room": room, "data": n});
        if c.send_command(cmd).await.is_err() {
            break;
        }
    }
    let close = c.expect_close(T).await?;
    ensure!(
        close.code == Some(4029),
        "repeated rate-limit refusals should close with 4029, got {close}"
    );
    Ok(())
}

/// Rooms per connection and connections per user are bounded. Gateway settings:
/// MAX_ROOMS_PER_CONNECTION=3, MAX_CONNECTIONS_PER_USER=2.
pub async fn connection_limits(sys: &mut System) -> Result<()> {
    let mut c = sys.client(0, "roomy").await?;
    for room in ["r1", "r2", "r3"] {
        join(&mut c, room).await?;
    }
    let r = c
        .request(json!({"type": "join", "room": "r4", "id": 40}))
        .await?;
    check_error(&r, "rate_limited", Some(40), "a 4th room with a limit of 3")?;
    c.request_ok(json!({"type": "leave", "room": "r1"}), "left")
        .await?;
    join(&mut c, "r4").await.context("join after leaving one")?;

    // The limit holds across the cluster: one connection on each gateway fills it, and a
    // third is refused on either.
    let first = sys.client(0, "limited").await?;
    let _second = sys.client(1, "limited").await?;
    let opts = ConnectOptions::token(sys.token("limited")?);
    for gateway in [0, 1] {
        match TestClient::connect_raw(&sys.ws_url(gateway), &opts).await {
            Ok(_) => bail!(
                "a third connection of one user was accepted on gateway {gateway} with a limit \
                 of 2"
            ),
            Err(ConnectError::Http { status, body }) => ensure!(
                status == 429 && !body.trim().is_empty(),
                "over the per-user limit: expected 429 with a reason, got {status} {body:?}"
            ),
            Err(e) => bail!("over the per-user limit: expected an HTTP refusal, got {e}"),
        }
    }
    sys.client(0, "someone-else")
        .await
        .context("another user is not limited")?;
    first.close().await?;
    // The slot is released when the gateway notices the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match sys.client(1, "limited").await {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context("a slot freed by a closed connection should be reusable"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

/// A burst of handshakes at once: the gateway sends the token checks and per-user counts of
/// the moment together (batch calls), and each handshake still gets its own answer. Then they
/// all close at once (batched too) and every slot is free again, across the cluster. Gateway
/// setting: MAX_CONNECTIONS_PER_USER=2.
pub async fn handshake_burst(sys: &mut System) -> Result<()> {
    const USERS: usize = 15;
    const CROWD: usize = 8;
    const JUNK: usize = 8;
    let calls_before = gateway_counter(sys, 0, "roomcast_gateway_batched_calls_total").await?;
    let requests_before =
        gateway_counter(sys, 0, "roomcast_gateway_batched_requests_total").await?;
    let url = sys.ws_url(0);
    let mut attempts = Vec::new();
    for user in 0..USERS {
        for _ in 0..2 {
            attempts.push(("ok", sys.token(&format!("burst-{user}"))?));
        }
    }
    for _ in 0..CROWD {
        attempts.push(("crowd", sys.token("crowd")?));
    }
    for i in 0..JUNK {
        attempts.push(("junk", format!("junk.{i}.token")));
    }
    let results = futures_util::future::join_all(attempts.iter().map(|(_, token)| {
        let opts = ConnectOptions::token(token.clone());
        let url = url.clone();
        async move { TestClient::connect_raw(&url, &opts).await }
    }))
    .await;
    let mut open = Vec::new();
    let (mut crowd_in, mut crowd_429) = (0, 0);
    for ((kind, _), result) in attempts.iter().zip(results) {
        match (*kind, result) {
            ("ok", Ok(client)) => open.push(client),
            ("ok", Err(e)) => bail!("a valid handshake in the burst failed: {e}"),
            ("crowd", Ok(client)) => {
                crowd_in += 1;
                open.push(client);
            }
            ("crowd", Err(ConnectError::Http { status: 429, .. })) => crowd_429 += 1,
            ("junk", Err(ConnectError::Http { status: 401, body })) => {
                ensure!(!body.trim().is_empty(), "a refused token gets a reason")
            }
            (kind, Ok(_)) => bail!("{kind} handshake accepted"),
            (kind, Err(e)) => bail!("{kind} handshake: unexpected answer {e}"),
        }
    }
    ensure!(
        crowd_in == 2 && crowd_429 == CROWD - 2,
        "one user's {CROWD} handshakes at once with a limit of 2: {crowd_in} accepted, \
         {crowd_429} refused with 429"
    );
    let calls =
        gateway_counter(sys, 0, "roomcast_gateway_batched_calls_total").await? - calls_before;
    let requests =
        gateway_counter(sys, 0, "roomcast_gateway_batched_requests_total").await? - requests_before;
    let total = attempts.len() as f64;
    ensure!(
        requests >= total && calls < requests,
        "{total} handshakes made {requests} backend requests in {calls} calls: none batched"
    );

    // All at once, closed: the per-user counts across the cluster drop back, so every user
    // can open two connections again, on any gateway.
    futures_util::future::join_all(open.into_iter().map(|c| c.close())).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    for user in (0..USERS)
        .map(|u| format!("burst-{u}"))
        .chain(["crowd".to_owned()])
    {
        let mut again = Vec::new();
        for gateway in 0..2 {
            loop {
                match sys.client(gateway + 1, &user).await {
                    Ok(client) => {
                        again.push(client);
                        break;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e.context(format!(
                            "{user}: slots freed by the burst's closes should be reusable"
                        )));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
    }
    Ok(())
}

/// A member that stops reading while messages pour in overflows its outbound queue and is
/// closed with 4008; its presence goes. Gateway settings: OUTBOUND_QUEUE_LEN=8 and a publish
/// rate that does not get in the way.
pub async fn slow_consumer_closes_4008(sys: &mut System) -> Result<()> {
    let room = "slow";
    let mut publisher = sys.client(0, "firehose").await?;
    let mut slow = sys.client(1, "sloth").await?;
    join(&mut publisher, room).await?;
    join(&mut slow, room).await?;
    let sloth = member_of(&slow);
    slow.stop_answering_pings();

    // 32 KiB messages: the socket buffers fill after a few MB, then the queue overflows.
    let data = json!("x".repeat(32 * 1024));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sent = 0;
    let left = loop {
        let mut ids = Vec::new();
        for _ in 0..25 {
            let cmd = json!({"type": "publish", "room": room, "data": data});
            ids.push(publisher.send_command(cmd).await?);
        }
        for id in ids {
            let r = publisher.reply_to(id, T).await?;
            ensure!(r["type"] == "published", "publish #{sent}: {r}");
            sent += 1;
        }
        let gone = publisher
            .expect_match(
                "member_left of the slow client",
                Duration::from_millis(20),
                |v| v["type"] == "member_left" && v["clientId"] == sloth.1.as_str(),
            )
            .await;
        if let Ok(frame) = gone {
            break frame;
        }
        if Instant::now() >= deadline {
            bail!("the slow client was not dropped after {sent} messages of 32 KiB");
        }
    };
    ensure!(left["room"] == room, "member_left for another room: {left}");
    slow.resume_reading();
    let close = slow.expect_close(T).await?;
    ensure!(
        close.code == Some(4008),
        "a slow consumer should be closed with 4008 (after {sent} messages), got {close}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cluster-only scenarios

fn cluster(sys: &System) -> Result<&crate::Cluster> {
    sys.cluster().context("this scenario needs a cluster")
}

/// 9. SIGKILL one of two room-services mid-test: publishing (with retries) and delivery go on.
pub async fn cluster_room_service_failover(sys: &mut System) -> Result<()> {
    let room = "failover";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    let (epoch, _) = join(&mut a, room).await?;
    join(&mut b, room).await?;
    for n in 0..3 {
        let data = json!({"before": n});
        let offset = a.publish(room, data.clone()).await?;
        check_message(
            &b.expect("message", T).await?,
            room,
            offset,
            &epoch,
            &a,
            &data,
        )?;
    }

    cluster(sys)?.room_service(0).process.kill9()?;

    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0..10 {
        let data = json!({"after": n});
        let offset = publish_retrying(&mut a, room, &data, deadline).await?;
        let m = b.expect("message", T).await?;
        check_message(&m, room, offset, &epoch, &a, &data)
            .with_context(|| format!("message #{n} after the kill"))?;
    }
    // New connections and joins work too.
    let mut c = sys.client(1, "carol").await?;
    join(&mut c, room).await?;
    let offset = publish_retrying(&mut b, room, &json!("last"), deadline).await?;
    for rx in [&mut a, &mut c] {
        let m = rx.expect("message", T).await?;
        check_message(&m, room, offset, &epoch, &b, &json!("last"))?;
    }
    Ok(())
}

/// With every room-service down, commands fail fast with `unavailable`, and the connection
/// stays.
pub async fn cluster_all_room_services_down(sys: &mut System) -> Result<()> {
    let mut a = sys.client(0, "alice").await?;
    join(&mut a, "down").await?;
    let cluster = cluster(sys)?;
    for i in 0..cluster.room_service_count() {
        cluster.room_service(i).process.kill9()?;
    }
    let id = a
        .send_command(json!({"type": "publish", "room": "down", "data": 1}))
        .await?;
    let r = a.reply_to(id, Duration::from_secs(10)).await?;
    check_error(&r, "unavailable", Some(id), "publish with no room-service")?;
    a.request_ok(json!({"type": "ping"}), "pong").await?;
    Ok(())
}

/// The auth-service dies: open connections stay and keep publishing to rooms they joined,
/// commands that need it answer `unavailable`, and new handshakes get 503 (not 401: the token
/// may be fine).
pub async fn cluster_auth_service_down(sys: &mut System) -> Result<()> {
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    join(&mut a, "authdown").await?;
    join(&mut b, "authdown").await?;
    cluster(sys)?.auth().process.kill9()?;
    let id = a
        .send_command(json!({"type": "join", "room": "other"}))
        .await?;
    let r = a.reply_to(id, Duration::from_secs(10)).await?;
    check_error(&r, "unavailable", Some(id), "join with no auth-service")?;
    let offset = a.publish("authdown", json!("still here")).await?;
    let m = b.expect("message", T).await?;
    ensure!(
        m["offset"] == offset,
        "delivery without auth-service: expected offset {offset}, got {m}"
    );
    let opts = ConnectOptions {
        token: Some(sys.mint(&Claims::new("carol"))?),
        bearer_header: false,
        origin: None,
    };
    match TestClient::connect_raw(&sys.ws_url(1), &opts).await {
        Err(ConnectError::Http { status: 503, .. }) => {}
        Err(e) => bail!("handshake with no auth-service: expected HTTP 503, got {e}"),
        Ok(_) => bail!("a handshake succeeded with no auth-service to verify its token"),
    }
    Ok(())
}

/// A `PublishBatch` while the store is stalled (redis-server stopped with SIGSTOP): each valid
/// publish gets UNAVAILABLE and the invalid one its own error. Retried with the same
/// idempotency keys once Redis resumes, the batch is stored in its order and the member gets
/// each message exactly once. (Whether the stalled call reached Redis before the stop, and so
/// was stored anyway, is a race this test does not force; the keys cover both cases.)
pub async fn cluster_publish_batch_store_stalled(sys: &mut System) -> Result<()> {
    let room = "stalled";
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 0).await?;
    let mut a = sys.client(1, "alice").await?;
    join(&mut a, room).await?;
    let publish = |n: u32| ServerPublishRequest {
        room: room.into(),
        data_json: format!(r#"{{"n":{n}}}"#),
        user: String::new(),
        idempotency_key: format!("stalled-{n}"),
    };
    let batch = ServerPublishBatchRequest {
        publishes: vec![
            publish(1),
            publish(2),
            ServerPublishRequest {
                data_json: "not json".into(),
                ..publish(9)
            },
            publish(3),
        ],
    };
    let pid = sys
        .cluster()
        .context("this scenario needs a cluster")?
        .redis()
        .process()
        .pid()
        .to_string();
    let signal = |sig: &str| -> Result<()> {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill {sig} {pid}: {status}");
        Ok(())
    };
    signal("-STOP")?;
    let stalled = api.publish_batch(with_key(batch.clone(), &key)?).await;
    signal("-CONT")?;
    let results = stalled
        .context("PublishBatch with the store stalled")?
        .into_inner()
        .results;
    let codes: Vec<_> = results
        .iter()
        .map(|r| match &r.outcome {
            Some(Outcome::Error(e)) => tonic::Code::from(e.code),
            _ => tonic::Code::Ok,
        })
        .collect();
    let unavailable = tonic::Code::Unavailable;
    ensure!(
        codes
            == [
                unavailable,
                unavailable,
                tonic::Code::InvalidArgument,
                unavailable
            ],
        "with the store stalled: expected UNAVAILABLE but for the bad JSON, got {results:?}"
    );

    // Retried with the same keys until the store answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    let offsets = loop {
        let results = api
            .publish_batch(with_key(batch.clone(), &key)?)
            .await
            .context("PublishBatch retried")?
            .into_inner()
            .results;
        let offsets: Vec<Option<u64>> = results
            .iter()
            .map(|r| match &r.outcome {
                Some(Outcome::Published(p)) => Some(p.offset),
                _ => None,
            })
            .collect();
        if [0, 1, 3].iter().all(|&i| offsets[i].is_some()) {
            break [offsets[0], offsets[1], offsets[3]].map(Option::unwrap_or_default);
        }
        ensure!(
            Instant::now() < deadline,
            "the retried batch still fails: {results:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        offsets[1] == offsets[0] + 1 && offsets[2] == offsets[1] + 1,
        "the batch's offsets are not consecutive in its order: {offsets:?}"
    );
    for (n, offset) in (1..=3).zip(offsets) {
        let m = a
            .expect_match(&format!("message {n}"), T, |v| {
                v["type"] == "message" && v["room"] == room
            })
            .await?;
        ensure!(
            m["offset"] == offset && m["data"]["n"] == n,
            "message {n}: expected offset {offset}, got {m}"
        );
    }
    a.expect_none(Some("message"), SILENCE)
        .await
        .context("a retried publish was delivered twice")?;
    Ok(())
}

/// The store restarts empty: the epoch changes, a join with the old position says
/// `recovered: false`, and publishing works again.
pub async fn cluster_store_restart_changes_epoch(sys: &mut System) -> Result<()> {
    let room = "epoch";
    let mut a = sys.client(0, "alice").await?;
    let (old_epoch, _) = join(&mut a, room).await?;
    let seen = a.publish(room, json!("before")).await?;

    sys.cluster_mut()
        .context("this scenario needs a cluster")?
        .redis_mut()
        .restart_empty()
        .await?;

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut b = loop {
        // The gateway may briefly refuse or fail joins while it reconnects to the store.
        match sys.client(1, "bob").await {
            Ok(b) => break b,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let since = json!({"epoch": old_epoch, "offset": seen});
    let joined = loop {
        let r = b
            .request(json!({"type": "join", "room": room, "since": since}))
            .await?;
        if r["type"] == "joined" || Instant::now() >= deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        joined["type"] == "joined"
            && joined["recovered"] == false
            && joined["epoch"] != old_epoch.as_str(),
        "after the store lost everything, a join since epoch {old_epoch} should say \
         recovered: false with a new epoch: {joined}"
    );
    let new_epoch = str_field(&joined, "epoch")?.to_owned();
    let offset = publish_retrying(&mut b, room, &json!("after"), deadline).await?;
    let m = a
        .expect_match("the message published after the restart", T, |v| {
            v["type"] == "message" && v["offset"] == offset
        })
        .await?;
    ensure!(
        m["epoch"] == new_epoch.as_str(),
        "old epoch after the restart: {m}"
    );
    // The store forgot every membership; the gateways record theirs again.
    let want: BTreeSet<_> = [member_of(&a), member_of(&b)].into();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = presence(&mut b, room).await?;
        if now == want {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after the store restart, presence is {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// One raw connection to Redis for inline commands: it stays usable while Redis refuses new
/// connections.
struct RawRedis {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl RawRedis {
    async fn connect(port: u16) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (read, write) = stream.into_split();
        Ok(Self {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        })
    }

    /// Sends one inline command; returns the first line of the reply.
    async fn command(&mut self, command: &str) -> Result<String> {
        use tokio::io::AsyncWriteExt;
        self.write
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        tokio::time::timeout(T, self.lines.next_line())
            .await
            .context("redis reply")??
            .context("redis closed the connection")
    }
}

/// `roomcast_room_published_total` over the room-services of a cluster, or of the standalone
/// process (whose /metrics is the gateway's).
async fn published_total(sys: &System) -> Result<f64> {
    const NAME: &str = "roomcast_room_published_total";
    let Some(cluster) = sys.cluster() else {
        return gateway_counter(sys, 0, NAME).await;
    };
    let mut sum = 0.0;
    for i in 0..cluster.room_service_count() {
        let url = format!("{}/metrics", cluster.room_service(i).http_url);
        sum += counter_sum(&http::get(&url, T).await?.body, NAME);
    }
    Ok(sum)
}

/// The sum of a Prometheus counter's samples in a /metrics text.
fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of a Prometheus counter on a gateway's /metrics (0 when absent).
async fn gateway_counter(sys: &System, gateway: usize, name: &str) -> Result<f64> {
    let metrics = http::get(&format!("{}/metrics", sys.http_url(gateway)), T).await?;
    Ok(counter_sum(&metrics.body, name))
}

/// The gateways lose their broker link and cannot get it back for a while (Redis refuses new
/// connections), while messages keep being published: once the link is back, each gateway
/// fills the gap from history, so members see every offset once, in order.
pub async fn cluster_broker_link_loss_is_repaired(sys: &mut System) -> Result<()> {
    let room = "linkloss";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    let first = a.publish(room, json!(0)).await?;
    b.expect("message", T).await?;

    let mut redis = RawRedis::connect(cluster(sys)?.redis().port()).await?;
    let reply = redis.command("CONFIG SET maxclients 1").await?;
    ensure!(reply == "+OK", "CONFIG SET maxclients: {reply}");
    redis.command("CLIENT KILL TYPE pubsub").await?;
    // Published while no gateway can hear the room.
    let mut last = first;
    for n in 1..=10 {
        last = a.publish(room, json!(n)).await?;
    }
    let reply = redis.command("CONFIG SET maxclients 10000").await?;
    ensure!(reply == "+OK", "restoring maxclients: {reply}");
    for n in 11..=15 {
        last = a.publish(room, json!(n)).await?;
    }
    let mut offsets = Vec::new();
    while offsets.last() != Some(&last) {
        let message = b
            .expect("message", Duration::from_secs(10))
            .await
            .with_context(|| format!("after offsets {offsets:?}"))?;
        offsets.push(u64_field(&message, "offset")?);
    }
    let want: Vec<u64> = (first + 1..=last).collect();
    ensure!(
        offsets == want,
        "after the lost link, expected offsets {want:?}, got {offsets:?}"
    );
    let filled = gateway_counter(sys, 1, "roomcast_gateway_gap_messages_filled_total").await?;
    ensure!(
        filled >= 1.0,
        "the messages should have come from history (gap_messages_filled_total = {filled})"
    );
    Ok(())
}

/// Browser handshakes from an origin outside ALLOWED_ORIGINS get 403.
pub async fn cluster_origin_check(sys: &mut System) -> Result<()> {
    let url = sys.ws_url(0);
    let token = sys.token("alice")?;
    let with_origin = |origin: Option<&str>| ConnectOptions {
        token: Some(token.clone()),
        bearer_header: false,
        origin: origin.map(str::to_owned),
    };
    match TestClient::connect_raw(&url, &with_origin(Some("http://evil.example"))).await {
        Ok(_) => bail!("a handshake from http://evil.example was accepted"),
        Err(ConnectError::Http { status: 403, .. }) => {}
        Err(e) => bail!("origin http://evil.example: expected HTTP 403, got {e}"),
    }
    for origin in [Some("http://allowed.example"), None] {
        TestClient::connect_raw(&url, &with_origin(origin))
            .await
            .with_context(|| format!("origin {origin:?} should be accepted"))?;
    }
    Ok(())
}

/// SIGKILL on a gateway: its clients reconnect to the other one and recover what they missed;
/// their old presence goes when the dead gateway's lease runs out: the lease lasts one
/// heartbeat timeout and the room-service sweeps every second, so within 2 x HEARTBEAT_TIMEOUT
/// (run with a 3 s timeout: 6 s).
pub async fn cluster_gateway_crash(sys: &mut System) -> Result<()> {
    let room = "crash";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    let (epoch, _) = join(&mut a, room).await?;
    join(&mut b, room).await?;
    let mut seen = 0;
    for n in 0..2 {
        seen = a.publish(room, json!({"before": n})).await?;
        b.expect("message", T).await?;
    }
    let old_bob = member_of(&b);
    cluster(sys)?.gateway(1).process.kill9()?;
    let killed_at = Instant::now();
    let mut missed = Vec::new();
    for n in 0..3 {
        let data = json!({"missed": n});
        missed.push((a.publish(room, data.clone()).await?, data));
    }

    let mut b2 = sys
        .client(0, "bob")
        .await
        .context("reconnecting elsewhere")?;
    let since = json!({"epoch": epoch, "offset": seen});
    let joined = b2
        .request_ok(
            json!({"type": "join", "room": room, "since": since}),
            "joined",
        )
        .await?;
    let got = joined["missed"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(
        joined["recovered"] == true && got == missed.len(),
        "rejoin after the crash with since {since}: expected {} recovered messages: {joined}",
        missed.len()
    );
    for (frame, (offset, data)) in joined["missed"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(&missed)
    {
        check_message(frame, room, *offset, &epoch, &a, data)?;
    }

    let want: BTreeSet<_> = [member_of(&a), member_of(&b2)].into();
    let bound = Duration::from_secs(6);
    let deadline = killed_at + bound;
    loop {
        let now = presence(&mut a, room).await?;
        if now == want {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{bound:?} after the crash, presence is still {now:?}, expected {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The others are told, too.
    expect_presence_event(&mut a, "member_left", room, (&old_bob.0, &old_bob.1), T).await?;
    Ok(())
}

/// SIGTERM on a gateway: its clients get 1001 (reconnect elsewhere); the rest goes on.
pub async fn cluster_gateway_drain(sys: &mut System) -> Result<()> {
    let room = "drain";
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    let bob = member_of(&b);
    cluster(sys)?.gateway(1).process.terminate()?;
    let close = b.expect_close(Duration::from_secs(10)).await?;
    ensure!(
        close.code == Some(1001),
        "draining gateway should close with 1001, got {close}"
    );
    expect_presence_event(&mut a, "member_left", room, (&bob.0, &bob.1), T).await?;
    let mut b = sys
        .client(0, "bob")
        .await
        .context("reconnecting elsewhere")?;
    join(&mut b, room).await?;
    let offset = a.publish(room, json!("still here")).await?;
    let m = b.expect("message", T).await?;
    ensure!(m["offset"] == offset, "expected offset {offset}: {m}");
    Ok(())
}

/// The namespaces [`namespaces`] runs with (`NAMESPACES_FILE`, see
/// `ClusterOptions::namespaces`).
pub const NAMESPACES: &str = r#"{
  "namespaces": {
    "feed": { "client_publish": false },
    "quiet": { "presence": false },
    "ephemeral": { "history_size": 0 },
    "crowd": { "member_events": false }
  }
}"#;

/// Fails if `c` got or gets (within [`SILENCE`]) a `member_joined` / `member_left` of
/// `room`; takes every frame read so far.
async fn no_member_events(c: &mut TestClient, room: &str, why: &str) -> Result<()> {
    let frames = c.drain(SILENCE).await?;
    if let Some(event) = frames
        .iter()
        .find(|f| f["room"] == room && (f["type"] == "member_joined" || f["type"] == "member_left"))
    {
        bail!("{}: {why}, yet {event} arrived", c.name());
    }
    Ok(())
}

/// Namespaces (§1.6): client publish off (`forbidden`, the server API still publishes),
/// presence off (`forbidden`, no member events), no history (no recovery, empty history),
/// member events off (presence still answers); other rooms keep the global settings.
pub async fn namespaces(sys: &mut System) -> Result<()> {
    let key = sys.options().api_key.clone();
    let mut api = server_api_client(sys, 0).await?;
    let mut a = sys.client(0, "alice").await?;
    let mut b = sys.client(1, "bob").await?;

    // Client publish off: refused for clients, delivered from the server API.
    let room = "feed:news";
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    let reply = a
        .request(json!({"type": "publish", "room": room, "data": "hi"}))
        .await?;
    check_error(&reply, "forbidden", None, "client publish in feed:")?;
    b.expect_none(Some("message"), SILENCE)
        .await
        .context("a refused client publish was delivered")?;
    let published = api
        .publish(with_key(
            ServerPublishRequest {
                room: room.into(),
                data_json: r#"{"headline":1}"#.into(),
                user: String::new(),
                idempotency_key: String::new(),
            },
            &key,
        )?)
        .await
        .context("ServerPublish into feed:")?
        .into_inner();
    for c in [&mut a, &mut b] {
        let m = c.expect("message", T).await?;
        ensure!(
            m["offset"] == published.offset && m["data"] == json!({"headline": 1}),
            "{}: the server publish arrived as {m}",
            c.name()
        );
    }

    // Presence off: `presence` is forbidden and members are not announced.
    let room = "quiet:room";
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    let reply = a.request(json!({"type": "presence", "room": room})).await?;
    check_error(&reply, "forbidden", None, "presence in quiet:")?;
    b.request_ok(json!({"type": "leave", "room": room}), "left")
        .await?;
    no_member_events(&mut a, room, "presence off").await?;

    // No history: messages are delivered but not kept; `since` is never recovered.
    let room = "ephemeral:room";
    let (epoch, before) = join(&mut a, room).await?;
    join(&mut b, room).await?;
    let offset = a.publish(room, json!("gone")).await?;
    ensure!(
        offset == before + 1,
        "offsets still count: {offset} after {before}"
    );
    b.expect("message", T).await?;
    let h = b
        .request_ok(json!({"type": "history", "room": room}), "history")
        .await?;
    ensure!(
        h["messages"] == json!([]) && h["offset"] == offset,
        "a room without history answered {h}"
    );
    let mut c = sys.client(1, "carol").await?;
    for since in [before, offset] {
        let since = json!({"epoch": epoch, "offset": since});
        let joined = c
            .request_ok(
                json!({"type": "join", "room": room, "since": since}),
                "joined",
            )
            .await?;
        ensure!(
            joined["recovered"] == false && joined["missed"].as_array().is_none_or(Vec::is_empty),
            "join with since {since} in a room without history: {joined}"
        );
        c.request_ok(json!({"type": "leave", "room": room}), "left")
            .await?;
    }

    // Member events off: joins and leaves are silent, presence still lists members.
    let room = "crowd:room";
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    let now = presence(&mut a, room).await?;
    let want: BTreeSet<_> = [member_of(&a), member_of(&b)].into();
    ensure!(now == want, "presence in crowd: is {now:?}, want {want:?}");
    b.request_ok(json!({"type": "leave", "room": room}), "left")
        .await?;
    no_member_events(&mut a, room, "member events off").await?;

    // A room outside the namespaces keeps the global behaviour.
    let room = "feed";
    join(&mut a, room).await?;
    join(&mut b, room).await?;
    expect_presence_event(&mut a, "member_joined", room, (b.user(), b.client_id()), T).await?;
    a.publish(room, json!("allowed")).await?;
    b.expect("message", T).await?;
    Ok(())
}
