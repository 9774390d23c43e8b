//! What a test client reads, over either transport: frames, the end of the connection, and
//! why a connection attempt failed. The WebSocket client (`client.rs`) and the SSE client
//! (`sse.rs`) both produce these.

use std::fmt;

use serde_json::Value;

/// How the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code the server sent; `None` when the connection ended without a close frame.
    pub code: Option<u16>,
    pub reason: String,
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "close {code} {:?}", self.reason),
            None => write!(f, "connection ended without close frame ({})", self.reason),
        }
    }
}

/// One thing read from the socket.
#[derive(Debug, Clone)]
pub enum Incoming {
    Json(Value),
    /// A text frame that is not JSON: a protocol violation by the server.
    NotJson(String),
    /// A binary frame (the protocol has none): its length.
    Binary(usize),
    Closed(CloseInfo),
}

impl Incoming {
    pub(crate) fn json_type(&self) -> Option<&str> {
        match self {
            Incoming::Json(v) => v.get("type").and_then(Value::as_str),
            _ => None,
        }
    }
}

impl fmt::Display for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Incoming::Json(v) => f.write_str(&truncate(&v.to_string(), 300)),
            Incoming::NotJson(t) => write!(f, "non-JSON text {:?}", truncate(t, 300)),
            Incoming::Binary(n) => write!(f, "binary frame of {n} bytes"),
            Incoming::Closed(c) => write!(f, "{c}"),
        }
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade request with a non-101 HTTP response.
    Http {
        status: u16,
        body: String,
    },
    Other(anyhow::Error),
}

impl ConnectError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Http { status, .. } => Some(*status),
            ConnectError::Other(_) => None,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Http { status, body } => {
                write!(
                    f,
                    "upgrade refused: HTTP {status} {:?}",
                    truncate(body, 200)
                )
            }
            ConnectError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ConnectError {}
