//! One load connection: TCP from a chosen 127.0.0.x source address, WebSocket upgrade with the
//! token in the query, and the `connected` frame. Buffers are kept small because the load
//! generator shares the machine's cores and memory with the servers it measures.

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

use crate::args::{CommonArgs, WsUrl};
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
        })
    }

    /// Connection number `n` (also its user, `load-<n>`). The error is a short failure reason
    /// for the report.
    pub async fn connect(&self, n: u64) -> Result<Connected, String> {
        let url = &self.urls[(n % self.urls.len() as u64) as usize];
        let source = self.sources[(n % self.sources.len() as u64) as usize];
        let token = self
            .tokens
            .for_connection(n)
            .map_err(|_| "token_signing".to_owned())?;
        let start = Instant::now();
        match tokio::time::timeout(self.timeout, open(url, source, &token)).await {
            Ok(Ok(ws)) => Ok(Connected {
                ws,
                elapsed: start.elapsed(),
            }),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err("timeout".to_owned()),
        }
    }
}

async fn open(url: &WsUrl, source: IpAddr, token: &str) -> Result<Ws, String> {
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
    let (mut ws, _response) = tokio_tungstenite::client_async_with_config(
        url.with_token(token),
        stream,
        Some(ws_config()),
    )
    .await
    .map_err(|e| ws_reason(&e))?;
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

/// The data each published message carries: send time (ns since the Unix epoch) and the
/// publisher's sequence number; the filler `p` is skipped unread.
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub t: u64,
    pub q: u64,
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
    fn io_reasons() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&e), "connection_refused");
        assert_eq!(
            io_reason(&std::io::Error::from_raw_os_error(24)),
            "too_many_open_files"
        );
    }
}
