//! One load connection: TCP from a chosen 127.0.0.x source address, WebSocket upgrade with the
//! token in the query, and the `connected` frame. Buffers are kept small because the load
//! generator shares the machine's cores and memory with the servers it measures.
//!
//! The same connection can speak the Socket.IO reference's protocol instead (`Protocol::Socketio`,
//! bench/socketio/server.js): Engine.IO 4 packets over the WebSocket transport, the token in the
//! namespace CONNECT packet's auth, `join` and `publish` events with acknowledgements, and
//! `message` events in. [`Incoming`] reads either protocol's frames into one shape.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::IpBindAddressNoPort;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::args::{CommonArgs, Protocol, WsUrl};
use crate::token::Tokens;

pub type Ws = WebSocketStream<TcpStream>;

/// tungstenite reserves 128 KiB read and write buffers per connection by default; frames here
/// are small, and tens of thousands of idle connections must fit in one process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// Opens connections round-robin over the gateways and the source addresses.
pub struct Dialer {
    urls: Vec<WsUrl>,
    sources: Vec<IpAddr>,
    tokens: Tokens,
    timeout: Duration,
    protocol: Protocol,
}

/// An open connection that received its `connected` frame.
pub struct Connected {
    pub ws: Ws,
    /// TCP connect to `connected` frame.
    pub elapsed: Duration,
}

impl Dialer {
    pub fn new(common: &CommonArgs) -> anyhow::Result<Dialer> {
        let sources = (1..=common.source_ips)
            .map(|x| IpAddr::V4(Ipv4Addr::new(127, 0, 0, x)))
            .collect();
        Ok(Dialer {
            urls: common.urls.clone(),
            sources,
            tokens: Tokens::new(common.secret.as_deref(), common.token.as_deref())?,
            timeout: common.connect_timeout,
            protocol: Protocol::Roomcast,
        })
    }

    /// The same, speaking `protocol`.
    pub fn with_protocol(mut self, protocol: Protocol) -> Dialer {
        self.protocol = protocol;
        self
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn url_count(&self) -> usize {
        self.urls.len()
    }

    /// Connection number `n` (also its user, `load-<n>`), to URL n mod U. The error is a short
    /// failure reason for the report.
    pub async fn connect(&self, n: u64) -> Result<Connected, String> {
        self.connect_to(n, (n % self.urls.len() as u64) as usize)
            .await
    }

    /// Connection number `n` to URL number `url` (mod U).
    pub async fn connect_to(&self, n: u64, url: usize) -> Result<Connected, String> {
        let url = &self.urls[url % self.urls.len()];
        let source = self.sources[(n % self.sources.len() as u64) as usize];
        let token = self
            .tokens
            .for_connection(n)
            .map_err(|_| "token_signing".to_owned())?;
        let start = Instant::now();
        let opened = async {
            match self.protocol {
                Protocol::Roomcast => open(url, source, &token).await,
                Protocol::Socketio => open_socketio(url, source, &token).await,
            }
        };
        match tokio::time::timeout(self.timeout, opened).await {
            Ok(Ok(ws)) => Ok(Connected {
                ws,
                elapsed: start.elapsed(),
            }),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err("timeout".to_owned()),
        }
    }
}

/// TCP from `source` to the URL's address, without Nagle's delay.
async fn dial(url: &WsUrl, source: IpAddr) -> Result<TcpStream, String> {
    let socket = TcpSocket::new_v4().map_err(|e| io_reason(&e))?;
    // Lets a source port still in TIME_WAIT from an earlier run be bound again.
    socket.set_reuseaddr(true).map_err(|e| io_reason(&e))?;
    // Pick the source port at connect time, by the whole 4-tuple: bind() alone would reserve
    // a port of the source address for every destination, and search for it, each time.
    setsockopt(&socket, IpBindAddressNoPort, &true).map_err(|e| io_reason(&e.into()))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| io_reason(&e))?;
    let stream = socket.connect(url.addr).await.map_err(|e| io_reason(&e))?;
    // Publishers send small frames and latency is what is measured: no Nagle delay.
    stream.set_nodelay(true).map_err(|e| io_reason(&e))?;
    Ok(stream)
}

async fn open(url: &WsUrl, source: IpAddr, token: &str) -> Result<Ws, String> {
    let stream = dial(url, source).await?;
    let mut ws = upgrade(url, stream, token).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Frame<'_> = serde_json::from_str(text.as_str())
                    .map_err(|_| "bad_first_frame".to_owned())?;
                if frame.kind != "connected" {
                    return Err(format!("first_frame_{}", frame.kind));
                }
                return Ok(ws);
            }
            Some(Ok(Message::Close(close))) => {
                return Err(match close {
                    Some(c) => format!("closed_{}", u16::from(c.code)),
                    None => "closed".to_owned(),
                });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ws_reason(&e)),
            None => return Err("closed".to_owned()),
        }
    }
}

/// The WebSocket upgrade, written and read by hand: one write, usually one read. The load
/// generator shares the cores with the servers it measures, and tungstenite's client handshake
/// (a `Request`, its own 4 KiB read buffer, a full response parse) cost about as much user CPU
/// as the rest of opening a connection. The `Sec-WebSocket-Accept` check stays.
async fn upgrade(url: &WsUrl, mut stream: TcpStream, token: &str) -> Result<Ws, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::client::generate_key;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let key = generate_key();
    let target = url.with_token(token);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
        request_target(&target),
        url.addr,
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_reason(&e))?;
    let mut buf = Vec::with_capacity(512);
    let head_len = loop {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err("ws_protocol".into());
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.map_err(|e| io_reason(&e))?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "ws_protocol".to_owned())?;
    check_upgrade_response(head, &derive_accept_key(key.as_bytes()))?;
    let rest = buf.split_off(head_len);
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(ws_config())).await)
}

/// A response head longer than this is not a gateway's `101`.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The path and query of a `ws://host:port/path?query` URL.
fn request_target(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme
        .find('/')
        .map_or("/", |slash| &after_scheme[slash..])
}

/// Checks a response head (status line and headers, CRLF-separated): `101` with the expected
/// `Sec-WebSocket-Accept`; another status is the failure `http_<status>`.
fn check_upgrade_response(head: &str, accept: &str) -> Result<(), String> {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "ws_protocol".to_owned())?;
    if status != 101 {
        return Err(format!("http_{status}"));
    }
    let accepted = lines
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
        });
    if accepted {
        Ok(())
    } else {
        Err("ws_protocol".into())
    }
}

/// Engine.IO 4 over WebSocket, then a CONNECT to the main namespace with `{token}` as auth;
/// returns once the server accepted it.
async fn open_socketio(url: &WsUrl, source: IpAddr, token: &str) -> Result<Ws, String> {
    let stream = dial(url, source).await?;
    let sep = if url.url.contains('?') { '&' } else { '?' };
    let (mut ws, _response) = tokio_tungstenite::client_async_with_config(
        format!("{}{sep}EIO=4&transport=websocket", url.url),
        stream,
        Some(ws_config()),
    )
    .await
    .map_err(|e| ws_reason(&e))?;
    let mut connect_sent = false;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let text = text.as_str();
                if text.starts_with('0') && !connect_sent {
                    // The Engine.IO open packet; now the Socket.IO CONNECT with the token.
                    let auth = serde_json::json!({ "token": token });
                    ws.send(Message::text(format!("40{auth}")))
                        .await
                        .map_err(|e| ws_reason(&e))?;
                    connect_sent = true;
                } else if text.starts_with("40") {
                    return Ok(ws);
                } else if text.starts_with("44") {
                    let unauthorized = text.contains("unauthorized");
                    return Err(if unauthorized {
                        "unauthorized".into()
                    } else {
                        "connect_error".into()
                    });
                } else if text == "2" {
                    ws.send(Message::text("3"))
                        .await
                        .map_err(|e| ws_reason(&e))?;
                }
            }
            Some(Ok(Message::Close(close))) => {
                return Err(match close {
                    Some(c) => format!("closed_{}", u16::from(c.code)),
                    None => "closed".to_owned(),
                });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ws_reason(&e)),
            None => return Err("closed".to_owned()),
        }
    }
}

/// Joins `room` in the dialer's protocol: for Roomcast the room's offset at the join, for
/// Socket.IO (no offsets) 0.
pub async fn join_as(
    protocol: Protocol,
    ws: &mut Ws,
    room: &str,
    timeout: Duration,
) -> Result<u64, String> {
    match protocol {
        Protocol::Roomcast => join(ws, room, timeout).await,
        Protocol::Socketio => join_socketio(ws, room, timeout).await,
    }
}

async fn join_socketio(ws: &mut Ws, room: &str, timeout: Duration) -> Result<u64, String> {
    let room_json = serde_json::to_string(room).unwrap_or_default();
    ws.send(Message::text(format!("420[\"join\",{room_json}]")))
        .await
        .map_err(|e| ws_reason(&e))?;
    let wait = async {
        loop {
            let item = ws.next().await;
            let text = match item {
                Some(Ok(Message::Text(text))) => text,
                other => match end_reason(other) {
                    Some(reason) => return Err(reason),
                    None => continue,
                },
            };
            match Incoming::parse(Protocol::Socketio, text.as_str()) {
                Some(Incoming::Reply {
                    id: 0, ok: true, ..
                }) => return Ok(0),
                Some(Incoming::Reply { id: 0, code: c, .. }) => {
                    return Err(format!("join_{}", c.unwrap_or("error")));
                }
                Some(Incoming::Ping) => ws
                    .send(Message::text("3"))
                    .await
                    .map_err(|e| ws_reason(&e))?,
                _ => continue,
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| Err("join_timeout".to_owned()))
}

/// A frame from the server, in either protocol.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A room message: Roomcast gives its offset and the sender's client id; Socket.IO gives
    /// no offset, and the sender's user.
    Message {
        room: Option<&'a str>,
        offset: Option<u64>,
        sender: Option<&'a str>,
        data: Option<&'a RawValue>,
    },
    /// The answer to a command with an id: `published`/`joined` (ok), `error` (a code).
    Reply {
        id: u64,
        ok: bool,
        offset: Option<u64>,
        code: Option<&'a str>,
    },
    /// An Engine.IO ping, to be answered with a pong ("3").
    Ping,
    Other,
}

/// What a Socket.IO `message` event carries (bench/socketio/server.js).
#[derive(Debug, Deserialize)]
struct SioMessage<'a> {
    room: Option<&'a str>,
    user: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// What a Socket.IO acknowledgement carries: `{ok: true}` or `{error}`.
#[derive(Debug, Deserialize)]
struct SioAck<'a> {
    ok: Option<bool>,
    error: Option<&'a str>,
}

impl<'a> Incoming<'a> {
    /// `None` for a frame that does not parse.
    pub fn parse(protocol: Protocol, text: &'a str) -> Option<Incoming<'a>> {
        match protocol {
            Protocol::Roomcast => {
                let f: Frame<'a> = serde_json::from_str(text).ok()?;
                Some(match f.kind {
                    "message" => Incoming::Message {
                        room: f.room,
                        offset: f.offset,
                        sender: f.client_id,
                        data: f.data,
                    },
                    "published" | "joined" | "error" if f.id.is_some() => Incoming::Reply {
                        id: f.id.unwrap_or(0),
                        ok: f.kind != "error",
                        offset: f.offset,
                        code: f.code,
                    },
                    _ => Incoming::Other,
                })
            }
            Protocol::Socketio => {
                if text == "2" {
                    return Some(Incoming::Ping);
                }
                if let Some(event) = text.strip_prefix("42") {
                    let (name, m): (&str, SioMessage<'a>) = serde_json::from_str(event).ok()?;
                    return Some(if name == "message" {
                        Incoming::Message {
                            room: m.room,
                            offset: None,
                            sender: m.user,
                            data: m.data,
                        }
                    } else {
                        Incoming::Other
                    });
                }
                if let Some(ack) = text.strip_prefix("43") {
                    let digits = ack.bytes().take_while(u8::is_ascii_digit).count();
                    let id = ack[..digits].parse().ok()?;
                    let (a,): (SioAck<'a>,) = serde_json::from_str(&ack[digits..]).ok()?;
                    let ok = a.ok == Some(true);
                    return Some(Incoming::Reply {
                        id,
                        ok,
                        offset: None,
                        code: if ok {
                            None
                        } else {
                            Some(a.error.unwrap_or("error"))
                        },
                    });
                }
                Some(Incoming::Other)
            }
        }
    }
}

/// The text of a publish with `id` of `data` (a JSON object) to the room whose name is
/// `room_json` (already a JSON string).
pub fn publish_frame(protocol: Protocol, room_json: &str, id: u64, data: &str) -> String {
    match protocol {
        Protocol::Roomcast => {
            format!(r#"{{"type":"publish","room":{room_json},"id":{id},"data":{data}}}"#)
        }
        Protocol::Socketio => {
            format!(r#"42{id}["publish",{{"room":{room_json},"data":{data}}}]"#)
        }
    }
}

/// Sends a `join` and waits for its `joined` reply; returns the room's offset at the join.
/// Other frames before the reply (presence of earlier members) are skipped.
pub async fn join(ws: &mut Ws, room: &str, timeout: Duration) -> Result<u64, String> {
    let frame = serde_json::json!({"type": "join", "id": 0, "room": room}).to_string();
    ws.send(Message::text(frame))
        .await
        .map_err(|e| ws_reason(&e))?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
                        continue;
                    };
                    match (frame.kind, frame.id) {
                        ("joined", Some(0)) => return Ok(frame.offset.unwrap_or(0)),
                        ("error", Some(0)) => {
                            return Err(format!("join_{}", frame.code.unwrap_or("error")));
                        }
                        _ => continue,
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    return Err(match close {
                        Some(c) => format!("closed_{}", u16::from(c.code)),
                        None => "closed".to_owned(),
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ws_reason(&e)),
                None => return Err("closed".to_owned()),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| Err("join_timeout".to_owned()))
}

/// The fields of a server frame the load generator looks at, borrowed from the text.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub id: Option<u64>,
    pub room: Option<&'a str>,
    pub offset: Option<u64>,
    #[serde(rename = "clientId")]
    pub client_id: Option<&'a str>,
    pub code: Option<&'a str>,
    #[serde(borrow)]
    pub data: Option<&'a RawValue>,
}

/// The data each published message carries: send time (ns since the Unix epoch), the
/// publisher's sequence number and, in a `--steps` run, the step it was published in; the
/// filler `p` is skipped unread.
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub t: u64,
    pub q: u64,
    #[serde(default)]
    pub s: usize,
}

/// A short reason for an I/O failure.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(24) => return "too_many_open_files".into(),
        Some(23) => return "system_file_table_full".into(),
        _ => {}
    }
    match e.kind() {
        K::ConnectionRefused => "connection_refused".into(),
        K::ConnectionReset => "connection_reset".into(),
        K::AddrInUse => "addr_in_use".into(),
        K::AddrNotAvailable => "addr_not_available".into(),
        K::TimedOut => "timeout".into(),
        K::BrokenPipe => "broken_pipe".into(),
        K::UnexpectedEof => "unexpected_eof".into(),
        kind => format!("io_{kind:?}").to_lowercase(),
    }
}

/// A short reason for a WebSocket failure.
pub fn ws_reason(e: &WsError) -> String {
    match e {
        WsError::Http(response) => format!("http_{}", response.status().as_u16()),
        WsError::Io(e) => io_reason(e),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(_) => "ws_protocol".into(),
        WsError::Capacity(_) => "ws_capacity".into(),
        WsError::Url(_) => "bad_url".into(),
        _ => "ws_error".into(),
    }
}

/// The reason a held connection ended: its close code, or the error.
pub fn end_reason(item: Option<Result<Message, WsError>>) -> Option<String> {
    match item {
        None => Some("closed".into()),
        Some(Ok(Message::Close(Some(c)))) => Some(format!("closed_{}", u16::from(c.code))),
        Some(Ok(Message::Close(None))) => Some("closed".into()),
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(ws_reason(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_borrowed() {
        let text = r#"{"type":"message","room":"r","offset":7,"epoch":"e","user":"u","clientId":"c1","data":{"t":5,"q":2,"p":"xx"}}"#;
        let f: Frame<'_> = serde_json::from_str(text).unwrap();
        assert_eq!((f.kind, f.room, f.offset), ("message", Some("r"), Some(7)));
        let p: Payload = serde_json::from_str(f.data.unwrap().get()).unwrap();
        assert_eq!((p.t, p.q), (5, 2));
        let f: Frame<'_> =
            serde_json::from_str(r#"{"type":"published","id":3,"room":"r","offset":9}"#).unwrap();
        assert_eq!((f.kind, f.id), ("published", Some(3)));
    }

    #[test]
    fn both_protocols_parse_into_one_shape() {
        let m = Incoming::parse(
            Protocol::Roomcast,
            r#"{"type":"message","room":"r","offset":3,"clientId":"c1","data":{"t":1,"q":2}}"#,
        );
        assert!(matches!(
            m,
            Some(Incoming::Message {
                room: Some("r"),
                offset: Some(3),
                sender: Some("c1"),
                data: Some(_)
            })
        ));
        let m = Incoming::parse(
            Protocol::Socketio,
            r#"42["message",{"room":"r","user":"load-4","data":{"t":1,"q":2,"p":"x"}}]"#,
        );
        assert!(matches!(
            m,
            Some(Incoming::Message {
                room: Some("r"),
                offset: None,
                sender: Some("load-4"),
                data: Some(_)
            })
        ));
        let r = Incoming::parse(Protocol::Socketio, r#"4317[{"ok":true}]"#);
        assert!(matches!(
            r,
            Some(Incoming::Reply {
                id: 17,
                ok: true,
                ..
            })
        ));
        let r = Incoming::parse(Protocol::Socketio, r#"435[{"error":"not_joined"}]"#);
        assert!(matches!(
            r,
            Some(Incoming::Reply {
                id: 5,
                ok: false,
                code: Some("not_joined"),
                ..
            })
        ));
        let r = Incoming::parse(
            Protocol::Roomcast,
            r#"{"type":"error","id":9,"code":"rate_limited"}"#,
        );
        assert!(matches!(
            r,
            Some(Incoming::Reply {
                id: 9,
                ok: false,
                code: Some("rate_limited"),
                ..
            })
        ));
        assert!(matches!(
            Incoming::parse(Protocol::Socketio, "2"),
            Some(Incoming::Ping)
        ));
        assert_eq!(
            publish_frame(Protocol::Socketio, "\"r\"", 4, "{}"),
            r#"424["publish",{"room":"r","data":{}}]"#
        );
    }

    #[test]
    fn the_upgrade_response_is_checked() {
        let accept = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {accept}\r\n\r\n"
        );
        assert_eq!(check_upgrade_response(&ok, accept), Ok(()));
        assert_eq!(
            check_upgrade_response(&ok, "something else"),
            Err("ws_protocol".into())
        );
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            check_upgrade_response(refused, accept),
            Err("http_401".into())
        );
        assert_eq!(
            check_upgrade_response("garbage\r\n\r\n", accept),
            Err("ws_protocol".into())
        );
        assert_eq!(
            request_target("ws://127.0.0.1:9000/ws?token=t"),
            "/ws?token=t"
        );
        assert_eq!(request_target("ws://127.0.0.1:9000"), "/");
    }

    #[test]
    fn io_reasons() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&e), "connection_refused");
        assert_eq!(
            io_reason(&std::io::Error::from_raw_os_error(24)),
            "too_many_open_files"
        );
    }
}
