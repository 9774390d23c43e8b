//! The SSE side of the test client (contract §1.5): a stream read from one gateway, commands
//! posted to another. Plain HTTP/1.1 over a TCP socket, as a browser's EventSource speaks it
//! (the server notices a client that goes away only on a keep-alive connection), and each POST
//! is its own connection, answered before the next is sent (so posted frames keep their order).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::incoming::{CloseInfo, ConnectError, Incoming};

/// `host:port` and the path prefix of an `http://` URL.
fn authority(url: &str) -> Result<&str> {
    let rest = url
        .strip_prefix("http://")
        .context("SSE test clients speak http:// only")?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

/// Where and how a session's commands are posted.
#[derive(Debug, Clone)]
pub struct Poster {
    /// `http://host:port` of the gateway the commands go to.
    pub base: String,
    pub token: String,
    pub session: String,
}

impl Poster {
    /// `POST /sse/send` with `body`; returns the status.
    pub async fn post(&self, body: &str) -> Result<u16> {
        post(&self.base, Some(&self.token), Some(&self.session), body).await
    }
}

/// One `POST /sse/send`; returns the status code.
pub async fn post(
    base: &str,
    token: Option<&str>,
    session: Option<&str>,
    body: &str,
) -> Result<u16> {
    let authority = authority(base)?;
    let mut request = format!(
        "POST /sse/send HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(session) = session {
        request.push_str(&format!("X-Roomcast-Session: {session}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let mut tcp = TcpStream::connect(authority).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("POST /sse/send: no answer within 5 s")??;
    status_of(&String::from_utf8_lossy(&answer))
}

fn status_of(head: &str) -> Result<u16> {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {head:?}"))
}

/// An event stream's body: chunked (HTTP/1.1) or up to EOF.
pub struct Body {
    reader: BufReader<TcpStream>,
    chunked: bool,
    decoded: Vec<u8>,
    done: bool,
}

impl Body {
    /// The next line of the body, `None` at its end.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(at) = self.decoded.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.decoded.drain(..=at).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.done {
                return Ok(None);
            }
            if !self.chunked {
                let mut buffer = [0u8; 4096];
                let n = self.reader.read(&mut buffer).await?;
                self.done = n == 0;
                self.decoded.extend_from_slice(&buffer[..n]);
                continue;
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).await? == 0 {
                self.done = true;
                continue;
            }
            let size = size.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).map_err(std::io::Error::other)?;
            if size == 0 {
                self.done = true;
                continue;
            }
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk).await?;
            self.decoded.extend_from_slice(&chunk[..size]);
        }
    }
}

/// Opens `GET /sse?token=` on `base`. Returns the event stream's body, or the refusal.
pub async fn open(base: &str, token: &str) -> Result<Body, ConnectError> {
    let authority = authority(base).map_err(ConnectError::Other)?;
    let request = format!("GET /sse?token={token} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let opened = async {
        let mut tcp = TcpStream::connect(authority).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut reader = BufReader::new(tcp);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                bail!("the stream ended in its head: {head:?}");
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        anyhow::Ok((reader, head))
    };
    let (mut reader, head) = tokio::time::timeout(Duration::from_secs(5), opened)
        .await
        .map_err(|_| ConnectError::Other(anyhow::anyhow!("GET /sse: no answer within 5 s")))?
        .map_err(ConnectError::Other)?;
    let status = status_of(&head).map_err(ConnectError::Other)?;
    let lower = head.to_ascii_lowercase();
    let chunked = lower.contains("transfer-encoding: chunked");
    if status != 200 {
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|l| l.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        let _ = reader.read_exact(&mut body).await;
        let body = String::from_utf8_lossy(&body).into_owned();
        return Err(ConnectError::Http { status, body });
    }
    if !lower.contains("content-type: text/event-stream") {
        return Err(ConnectError::Other(anyhow::anyhow!(
            "GET /sse answered without text/event-stream: {head:?}"
        )));
    }
    Ok(Body {
        reader,
        chunked,
        decoded: Vec::new(),
        done: false,
    })
}

/// Reads events until the stream ends: each `data` event as a JSON frame, `: ping` comments
/// counted, the `disconnect` event and the end as the close.
pub async fn read_loop(
    mut body: Body,
    tx: mpsc::UnboundedSender<Incoming>,
    mut paused: watch::Receiver<bool>,
    pings: Arc<AtomicU64>,
) {
    let mut data = String::new();
    let end = loop {
        // A paused client reads nothing, like a hung one: the server's writes back up.
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        let line = match body.read_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                break CloseInfo {
                    code: None,
                    reason: "stream ended".into(),
                };
            }
            Err(error) => {
                break CloseInfo {
                    code: None,
                    reason: error.to_string(),
                };
            }
        };
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if data.is_empty() {
                continue;
            }
            let event = std::mem::take(&mut data);
            let item = match serde_json::from_str::<Value>(&event) {
                Ok(v) if v["type"] == "disconnect" => {
                    break CloseInfo {
                        code: v["code"].as_u64().and_then(|c| u16::try_from(c).ok()),
                        reason: v["reason"].as_str().unwrap_or_default().to_owned(),
                    };
                }
                Ok(v) => Incoming::Json(v),
                Err(_) => Incoming::NotJson(event),
            };
            if tx.send(item).is_err() {
                return;
            }
        } else if let Some(comment) = line.strip_prefix(':') {
            if comment.trim() == "ping" {
                pings.fetch_add(1, Ordering::Relaxed);
            }
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    };
    let _ = tx.send(Incoming::Closed(end));
}
