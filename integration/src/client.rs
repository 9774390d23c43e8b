//! A WebSocket test client speaking the Roomcast JSON protocol.
//!
//! A background task reads the socket all the time, so the client answers server pings (which
//! tungstenite does only while the stream is polled) and frames are never lost between calls.
//! [`TestClient::stop_answering_pings`] pauses that task to simulate a client that hangs.
//!
//! Frames a call was not looking for are kept in a backlog, in arrival order, for later calls:
//! nothing is skipped silently.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::incoming::truncate;
pub use crate::incoming::{CloseInfo, ConnectError, Incoming};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Default wait for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to present the token and what else goes into the handshake.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub token: Option<String>,
    /// `Authorization: Bearer` instead of `?token=`.
    pub bearer_header: bool,
    /// An `Origin` header, as a browser sends.
    pub origin: Option<String>,
}

impl ConnectOptions {
    pub fn token(token: impl Into<String>) -> Self {
        ConnectOptions {
            token: Some(token.into()),
            ..Default::default()
        }
    }
}

/// Where the client's frames go.
enum Outgoing {
    WebSocket(Box<SplitSink<Ws, Message>>),
    /// Posted to `/sse/send` (on a gateway other than the stream's, in the SSE scenarios).
    Sse(crate::sse::Poster),
}

pub struct TestClient {
    name: String,
    sink: Outgoing,
    /// SSE: tokens of `refresh` commands sent, by command id, until their answer.
    refreshing: Vec<(Value, String)>,
    frames: mpsc::UnboundedReceiver<Incoming>,
    backlog: VecDeque<Incoming>,
    closed: Option<CloseInfo>,
    paused: watch::Sender<bool>,
    pings: Arc<AtomicU64>,
    next_id: u64,
    connected: Value,
    reader: JoinHandle<()>,
}

impl fmt::Debug for TestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("name", &self.name)
            .finish()
    }
}

impl TestClient {
    /// Connects with `?token=` and reads the first frame, which must be `connected`.
    pub async fn connect(url: &str, token: &str) -> Result<TestClient, ConnectError> {
        let mut client = Self::connect_raw(url, &ConnectOptions::token(token)).await?;
        let first = client
            .recv(REPLY_TIMEOUT)
            .await
            .map_err(ConnectError::Other)?;
        match &first {
            Incoming::Json(v) if v["type"] == "connected" => {
                client.connected = v.clone();
                if let Some(user) = v["user"].as_str() {
                    client.name = format!("{user}@{}", v["gateway"].as_str().unwrap_or("?"));
                }
                Ok(client)
            }
            other => Err(ConnectError::Other(anyhow!(
                "first frame after the upgrade is not `connected`: {other}"
            ))),
        }
    }

    /// Connects over SSE: the stream from the gateway at `stream_base` (`http://host:port`),
    /// commands posted to the one at `post_base`. Reads the `connected` frame, which names the
    /// session.
    pub async fn connect_sse(
        stream_base: &str,
        post_base: &str,
        token: &str,
    ) -> Result<TestClient, ConnectError> {
        let reader = crate::sse::open(stream_base, token).await?;
        let (tx, frames) = mpsc::unbounded_channel();
        let (paused, paused_rx) = watch::channel(false);
        let pings = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(crate::sse::read_loop(reader, tx, paused_rx, pings.clone()));
        let mut client = TestClient {
            name: "sse client".into(),
            sink: Outgoing::Sse(crate::sse::Poster {
                base: post_base.to_owned(),
                token: token.to_owned(),
                session: String::new(),
            }),
            refreshing: Vec::new(),
            frames,
            backlog: VecDeque::new(),
            closed: None,
            paused,
            pings,
            next_id: 1,
            connected: Value::Null,
            reader,
        };
        let first = client
            .recv_json(REPLY_TIMEOUT)
            .await
            .map_err(ConnectError::Other)?;
        let Some(session) = first["session"]
            .as_str()
            .filter(|_| first["type"] == "connected")
        else {
            return Err(ConnectError::Other(anyhow!(
                "first event is not `connected` with a session: {first}"
            )));
        };
        if let Outgoing::Sse(poster) = &mut client.sink {
            poster.session = session.to_owned();
        }
        if let Some(user) = first["user"].as_str() {
            client.name = format!("{user}@{} (sse)", first["gateway"].as_str().unwrap_or("?"));
        }
        client.connected = first;
        Ok(client)
    }

    /// Completes the handshake only; nothing is read. For tests of the handshake itself and of
    /// the first frame.
    pub async fn connect_raw(url: &str, opts: &ConnectOptions) -> Result<TestClient, ConnectError> {
        let url = match (&opts.token, opts.bearer_header) {
            (Some(token), false) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}token={token}")
            }
            _ => url.to_owned(),
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Other(anyhow!("bad URL {url}: {e}")))?;
        let header = |v: String| {
            HeaderValue::from_str(&v).map_err(|e| ConnectError::Other(anyhow!("header {v:?}: {e}")))
        };
        if let (Some(token), true) = (&opts.token, opts.bearer_header) {
            request
                .headers_mut()
                .insert("authorization", header(format!("Bearer {token}"))?);
        }
        if let Some(origin) = &opts.origin {
            request
                .headers_mut()
                .insert("origin", header(origin.clone())?);
        }
        // wss:// trusts the test CA (testdata/tls), nothing else.
        let connector = if url.starts_with("wss://") {
            let config =
                crate::tls::client_config("ca.pem", &[b"http/1.1"]).map_err(ConnectError::Other)?;
            Some(tokio_tungstenite::Connector::Rustls(config))
        } else {
            None
        };
        let connect =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                ConnectError::Other(anyhow!(
                    "connecting to {url}: no answer within {CONNECT_TIMEOUT:?}"
                ))
            })?;
        let ws = match connected {
            Ok((ws, _response)) => ws,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ConnectError::Http { status, body });
            }
            Err(e) => return Err(ConnectError::Other(anyhow!("connecting to {url}: {e}"))),
        };
        let (sink, stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let (paused, paused_rx) = watch::channel(false);
        let pings = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_loop(stream, tx, paused_rx, pings.clone()));
        Ok(TestClient {
            name: "client".into(),
            sink: Outgoing::WebSocket(Box::new(sink)),
            refreshing: Vec::new(),
            frames,
            backlog: VecDeque::new(),
            closed: None,
            paused,
            pings,
            next_id: 1,
            connected: Value::Null,
            reader,
        })
    }

    /// The `connected` frame (`Null` for a client made with [`connect_raw`](Self::connect_raw)).
    pub fn connected(&self) -> &Value {
        &self.connected
    }

    pub fn client_id(&self) -> &str {
        self.connected["clientId"].as_str().unwrap_or_default()
    }

    pub fn user(&self) -> &str {
        self.connected["user"].as_str().unwrap_or_default()
    }

    /// Names the client in error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// WebSocket pings received from the server so far.
    pub fn pings_received(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    /// Stops reading the socket: server pings go unanswered, as with a hung client.
    pub fn stop_answering_pings(&self) {
        self.paused.send_replace(true);
    }

    /// Reads the socket again (e.g. to see how the server ended the connection).
    pub fn resume_reading(&self) {
        self.paused.send_replace(false);
    }

    pub async fn send_json(&mut self, value: &Value) -> Result<()> {
        self.send_raw_text(value.to_string()).await
    }

    pub async fn send_raw_text(&mut self, text: impl Into<String>) -> Result<()> {
        let name = self.name.clone();
        match &mut self.sink {
            Outgoing::WebSocket(sink) => sink
                .send(Message::text(text.into()))
                .await
                .with_context(|| format!("{name}: sending a frame")),
            Outgoing::Sse(poster) => {
                let text = text.into();
                let status = poster
                    .post(&text)
                    .await
                    .with_context(|| format!("{name}: posting a frame"))?;
                if status != 202 {
                    bail!("{name}: POST /sse/send answered {status} for {text}");
                }
                // Once refreshed, later posts present the token the connection then holds.
                if let Ok(frame) = serde_json::from_str::<Value>(&text)
                    && frame["type"] == "refresh"
                    && let Some(token) = frame["token"].as_str()
                {
                    self.refreshing
                        .push((frame["id"].clone(), token.to_owned()));
                }
                Ok(())
            }
        }
    }

    /// Whether the client runs over SSE.
    pub fn is_sse(&self) -> bool {
        matches!(self.sink, Outgoing::Sse(_))
    }

    /// Sends `cmd` without waiting; gives it the next `id` when it has none. Returns the id.
    pub async fn send_command(&mut self, mut cmd: Value) -> Result<u64> {
        let id = match cmd.get("id").and_then(Value::as_u64) {
            Some(id) => id,
            None => {
                let id = self.next_id;
                cmd["id"] = json!(id);
                id
            }
        };
        self.next_id = self.next_id.max(id + 1);
        self.send_json(&cmd).await?;
        Ok(id)
    }

    /// Sends `cmd` and returns the frame that carries the same `id` (the reply or an `error`).
    pub async fn request(&mut self, cmd: Value) -> Result<Value> {
        let what = cmd["type"].as_str().unwrap_or("command").to_owned();
        let id = self.send_command(cmd).await?;
        self.reply_to(id, REPLY_TIMEOUT)
            .await
            .with_context(|| format!("waiting for the reply to `{what}` id {id}"))
    }

    /// The frame carrying `id`.
    pub async fn reply_to(&mut self, id: u64, timeout: Duration) -> Result<Value> {
        self.expect_match(&format!("a frame with id {id}"), timeout, |v| {
            v.get("id").and_then(Value::as_u64) == Some(id)
        })
        .await
    }

    /// Like [`request`](Self::request) but the reply must have type `expected`.
    pub async fn request_ok(&mut self, cmd: Value, expected: &str) -> Result<Value> {
        let sent = cmd.to_string();
        let reply = self.request(cmd).await?;
        if reply["type"] != expected {
            bail!(
                "{}: sent {}, expected `{expected}`, got {}",
                self.name,
                truncate(&sent, 200),
                truncate(&reply.to_string(), 300)
            );
        }
        Ok(reply)
    }

    /// `join` and expect `joined`.
    pub async fn join(&mut self, room: &str) -> Result<Value> {
        self.request_ok(json!({"type": "join", "room": room}), "joined")
            .await
    }

    /// `publish` and expect `published`; returns the offset.
    pub async fn publish(&mut self, room: &str, data: Value) -> Result<u64> {
        let reply = self
            .request_ok(
                json!({"type": "publish", "room": room, "data": data}),
                "published",
            )
            .await?;
        reply["offset"]
            .as_u64()
            .with_context(|| format!("`published` without a numeric offset: {reply}"))
    }

    /// The next thing read, from the backlog first.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Incoming> {
        if let Some(item) = self.backlog.pop_front() {
            return Ok(item);
        }
        self.read_one(Instant::now() + timeout)
            .await?
            .ok_or_else(|| anyhow!("{}: nothing received within {timeout:?}", self.name))
    }

    /// The next frame, which must be a JSON text frame.
    pub async fn recv_json(&mut self, timeout: Duration) -> Result<Value> {
        match self.recv(timeout).await? {
            Incoming::Json(v) => Ok(v),
            other => bail!("{}: expected a JSON frame, got {other}", self.name),
        }
    }

    /// The first frame of type `kind`, from the backlog or newly read; others stay in the backlog.
    pub async fn expect(&mut self, kind: &str, timeout: Duration) -> Result<Value> {
        self.expect_match(&format!("a `{kind}` frame"), timeout, |v| v["type"] == kind)
            .await
    }

    /// The first JSON frame for which `pred` holds; others stay in the backlog. Fails with what
    /// arrived instead on timeout or close.
    pub async fn expect_match(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let matches = |item: &Incoming| matches!(item, Incoming::Json(v) if pred(v));
        if let Some(pos) = self.backlog.iter().position(matches)
            && let Some(Incoming::Json(v)) = self.backlog.remove(pos)
        {
            return Ok(v);
        }
        let deadline = Instant::now() + timeout;
        while self.closed.is_none() {
            let Some(item) = self.read_one(deadline).await? else {
                break;
            };
            match item {
                Incoming::Json(v) if pred(&v) => return Ok(v),
                other => self.backlog.push_back(other),
            }
        }
        let state = match &self.closed {
            Some(close) => format!("the connection ended ({close})"),
            None => format!("nothing matching within {timeout:?}"),
        };
        bail!(
            "{}: waiting for {what}: {state}; unconsumed frames: {}",
            self.name,
            self.backlog_summary()
        )
    }

    /// `n` frames of type `kind`, in arrival order, all within `timeout`.
    pub async fn expect_n(
        &mut self,
        kind: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self
                .expect(kind, left)
                .await
                .with_context(|| format!("got {} of {n} `{kind}` frames", out.len()))?;
            out.push(frame);
        }
        Ok(out)
    }

    /// Fails if a frame of type `kind` (any frame, for `None`) is in the backlog or arrives
    /// within `wait`. Other frames are kept.
    pub async fn expect_none(&mut self, kind: Option<&str>, wait: Duration) -> Result<()> {
        let unwanted = |item: &Incoming| match kind {
            None => true,
            Some(k) => item.json_type() == Some(k),
        };
        if let Some(item) = self.backlog.iter().find(|i| unwanted(i)) {
            bail!("{}: unexpected frame {item}", self.name);
        }
        let deadline = Instant::now() + wait;
        while self.closed.is_none() {
            let Some(item) = self.read_one(deadline).await? else {
                break;
            };
            if unwanted(&item) {
                bail!("{}: unexpected frame within {wait:?}: {item}", self.name);
            }
            self.backlog.push_back(item);
        }
        Ok(())
    }

    /// Waits for the end of the connection, keeping the frames before it in the backlog.
    pub async fn expect_close(&mut self, timeout: Duration) -> Result<CloseInfo> {
        let deadline = Instant::now() + timeout;
        while self.closed.is_none() {
            match self.read_one(deadline).await? {
                Some(item) => self.backlog.push_back(item),
                None => bail!(
                    "{}: still open after {timeout:?}; frames received: {}",
                    self.name,
                    self.backlog_summary()
                ),
            }
        }
        self.closed
            .clone()
            .context("connection closed without recording how")
    }

    /// The close code, once the connection has ended (`None` while open or without close frame).
    pub fn close_code(&self) -> Option<u16> {
        self.closed.as_ref().and_then(|c| c.code)
    }

    /// Frames read but not consumed yet.
    pub fn backlog(&self) -> impl Iterator<Item = &Incoming> {
        self.backlog.iter()
    }

    /// Takes every JSON frame read so far, waiting at most `wait` for more.
    pub async fn drain(&mut self, wait: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + wait;
        while self.closed.is_none() {
            let Some(item) = self.read_one(deadline).await? else {
                break;
            };
            self.backlog.push_back(item);
        }
        let mut out = Vec::new();
        self.backlog.retain(|item| match item {
            Incoming::Json(v) => {
                out.push(v.clone());
                false
            }
            _ => true,
        });
        Ok(out)
    }

    /// Sends a normal close (1000) and waits briefly for the server's answer.
    pub async fn close(mut self) -> Result<()> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        let Outgoing::WebSocket(sink) = &mut self.sink else {
            // An SSE client closes by dropping its stream.
            self.reader.abort();
            return Ok(());
        };
        sink.send(Message::Close(Some(frame)))
            .await
            .with_context(|| format!("{}: sending close", self.name))?;
        let _ = self.expect_close(Duration::from_secs(2)).await;
        Ok(())
    }

    /// Reads one item from the reader task, `None` on timeout. Records the close.
    async fn read_one(&mut self, deadline: Instant) -> Result<Option<Incoming>> {
        if let Some(close) = &self.closed {
            // Everything was read; the end repeats rather than hanging.
            return Ok(Some(Incoming::Closed(close.clone())));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.frames.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(item)) => {
                if let Incoming::Closed(close) = &item {
                    self.closed = Some(close.clone());
                }
                if let Incoming::Json(frame) = &item
                    && let Some(at) = self
                        .refreshing
                        .iter()
                        .position(|(id, _)| *id == frame["id"])
                {
                    let (_, token) = self.refreshing.remove(at);
                    if let (Outgoing::Sse(poster), "refreshed") =
                        (&mut self.sink, frame["type"].as_str().unwrap_or_default())
                    {
                        poster.token = token;
                    }
                }
                Ok(Some(item))
            }
            Ok(None) => bail!(
                "{}: the reader task ended without reporting a close",
                self.name
            ),
        }
    }

    fn backlog_summary(&self) -> String {
        if self.backlog.is_empty() {
            return "none".into();
        }
        let shown: Vec<String> = self
            .backlog
            .iter()
            .take(10)
            .map(|i| i.to_string())
            .collect();
        let more = self.backlog.len().saturating_sub(shown.len());
        let mut s = format!("[{}]", shown.join(", "));
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        s
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Forwards everything read to the client; stops touching the socket while paused.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    tx: mpsc::UnboundedSender<Incoming>,
    mut paused: watch::Receiver<bool>,
    pings: Arc<AtomicU64>,
) {
    // Only the first end is reported: after a close frame the stream still ends with an error.
    let mut close_sent = false;
    let report = |item: Incoming, close_sent: &mut bool| {
        if *close_sent {
            return;
        }
        *close_sent = matches!(item, Incoming::Closed(_));
        let _ = tx.send(item);
    };
    loop {
        if *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
            continue;
        }
        let next = tokio::select! {
            changed = paused.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            next = stream.next() => next,
        };
        match next {
            None => {
                let end = CloseInfo {
                    code: None,
                    reason: "stream ended".into(),
                };
                report(Incoming::Closed(end), &mut close_sent);
                return;
            }
            Some(Err(e)) => {
                let end = CloseInfo {
                    code: None,
                    reason: e.to_string(),
                };
                report(Incoming::Closed(end), &mut close_sent);
                return;
            }
            Some(Ok(Message::Text(text))) => {
                let item = match serde_json::from_str(text.as_str()) {
                    Ok(v) => Incoming::Json(v),
                    Err(_) => Incoming::NotJson(text.to_string()),
                };
                report(item, &mut close_sent);
            }
            Some(Ok(Message::Binary(bytes))) => {
                report(Incoming::Binary(bytes.len()), &mut close_sent)
            }
            Some(Ok(Message::Ping(_))) => {
                pings.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
            // Keep reading after a close frame: tungstenite sends the close reply on the next
            // read, and the stream then ends.
            Some(Ok(Message::Close(frame))) => {
                let end = match frame {
                    Some(f) => CloseInfo {
                        code: Some(u16::from(f.code)),
                        reason: f.reason.to_string(),
                    },
                    None => CloseInfo {
                        code: None,
                        reason: "close frame without code".into(),
                    },
                };
                report(Incoming::Closed(end), &mut close_sent);
            }
        }
    }
}
