//! The client wire format: parsing and validating client frames, and building server frames.
//! Only the gateway knows WebSocket frames; everything behind it speaks gRPC.

use std::borrow::Cow;

use roomcast_common::error_code::ErrorCode;
use roomcast_common::frame::message_frame;
use roomcast_common::room::validate_room_name;
use roomcast_proto as pb;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Largest `history.limit` a client may ask for; the room-service caps it further.
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// Longest `publish.idempotencyKey`, in bytes (contract §1.2).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

/// A validated client command.
#[derive(Debug, PartialEq)]
pub enum Command {
    Ping,
    Join {
        room: String,
        since: Option<Position>,
    },
    Leave {
        room: String,
    },
    Publish {
        room: String,
        /// The payload exactly as the client sent it (already valid JSON).
        data: RawJson,
        /// A retry with the same key in the same room within the idempotency window gets the
        /// first publish's offset and is not stored twice.
        idempotency_key: Option<String>,
    },
    Presence {
        room: String,
    },
    History {
        room: String,
        since: Option<u64>,
        limit: u32,
    },
    Refresh {
        token: String,
    },
}

/// Raw JSON passed through untouched; compared by its text.
#[derive(Debug)]
pub struct RawJson(pub Box<RawValue>);

impl RawJson {
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// A client's place in a room's stream (`join.since`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// A command with the `id` its reply must carry.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub id: Option<u64>,
    pub command: Command,
}

/// A frame that could not be turned into a command; it becomes an `error` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The frame's `id`, when it could still be read, so the client can match the error.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    fn bad(id: Option<u64>, message: impl Into<String>) -> Self {
        Self {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// Every field any command may carry, borrowed from the frame; validated per type afterwards.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, `null` included (a plain `Option` would turn
    /// `"data": null` into a missing field).
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    limit: Option<u32>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(rename = "idempotencyKey", borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Parses one text frame into a command.
pub fn parse(text: &str) -> Result<Request, FrameError> {
    let raw: RawFrame = serde_json::from_str(text).map_err(|e| {
        // Still try to find the id so the error can be matched to the command.
        let id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_u64()));
        let message = if id.is_none() && serde_json::from_str::<serde_json::Value>(text).is_err() {
            format!("frame is not valid JSON: {e}")
        } else {
            format!("invalid frame: {e}")
        };
        FrameError::bad(id, message)
    })?;
    let id = raw.id;
    let room = || -> Result<String, FrameError> {
        let room = raw
            .room
            .as_deref()
            .ok_or_else(|| FrameError::bad(id, "missing field `room`"))?;
        validate_room_name(room).map_err(|e| FrameError::bad(id, format!("bad room name: {e}")))?;
        Ok(room.to_owned())
    };
    let command = match raw.kind.as_ref() {
        "ping" => Command::Ping,
        "join" => {
            let since = match raw.since {
                None => None,
                Some(v) if v.get() == "null" => None,
                Some(v) => Some(serde_json::from_str::<Position>(v.get()).map_err(|e| {
                    FrameError::bad(id, format!("`since` must be {{epoch, offset}}: {e}"))
                })?),
            };
            Command::Join {
                room: room()?,
                since,
            }
        }
        "leave" => Command::Leave { room: room()? },
        "publish" => {
            let data = raw
                .data
                .ok_or_else(|| FrameError::bad(id, "missing field `data`"))?;
            let idempotency_key = match raw.idempotency_key.as_deref() {
                None => None,
                Some(key)
                    if key.is_empty()
                        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
                        || key.chars().any(char::is_control) =>
                {
                    return Err(FrameError::bad(
                        id,
                        format!(
                            "`idempotencyKey` must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes \
                             without control characters"
                        ),
                    ));
                }
                Some(key) => Some(key.to_owned()),
            };
            Command::Publish {
                room: room()?,
                data: RawJson(data.to_owned()),
                idempotency_key,
            }
        }
        "presence" => Command::Presence { room: room()? },
        "history" => {
            let since = match raw.since {
                None => None,
                Some(v) if v.get() == "null" => None,
                Some(v) => Some(v.get().parse::<u64>().map_err(|_| {
                    FrameError::bad(id, "`since` must be an offset (unsigned integer)")
                })?),
            };
            let limit = raw.limit.unwrap_or(MAX_HISTORY_LIMIT);
            if limit == 0 || limit > MAX_HISTORY_LIMIT {
                return Err(FrameError::bad(
                    id,
                    format!("`limit` must be between 1 and {MAX_HISTORY_LIMIT}"),
                ));
            }
            Command::History {
                room: room()?,
                since,
                limit,
            }
        }
        "refresh" => {
            let token = raw
                .token
                .as_deref()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| FrameError::bad(id, "missing field `token`"))?;
            Command::Refresh {
                token: token.to_owned(),
            }
        }
        other => {
            return Err(FrameError::bad(
                id,
                format!("unknown frame type {:?}", truncate(other, 64)),
            ));
        }
    };
    Ok(Request { id, command })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Frames the gateway sends. Field order is the wire order.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Connected {
        #[serde(rename = "clientId")]
        client_id: &'a str,
        user: &'a str,
        gateway: &'a str,
        heartbeat: Heartbeat,
        /// The SSE session's name (SSE only): what `POST /sse/send` names.
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Joined {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
        epoch: &'a str,
        offset: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<Vec<Box<RawValue>>>,
    },
    Left {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
    },
    Published {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
        offset: u64,
    },
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
        members: Vec<Member>,
    },
    History {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
        epoch: &'a str,
        offset: u64,
        messages: Vec<Box<RawValue>>,
    },
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(rename = "expiresAt")]
        expires_at: i64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
}

#[derive(Serialize)]
pub struct Heartbeat {
    #[serde(rename = "intervalMs")]
    pub interval_ms: u64,
    #[serde(rename = "timeoutMs")]
    pub timeout_ms: u64,
}

#[derive(Serialize)]
pub struct Member {
    pub user: String,
    #[serde(rename = "clientId")]
    pub client_id: String,
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Wraps an already-serialized frame so it can sit inside another frame without re-parsing.
pub fn raw(frame: String) -> Box<RawValue> {
    RawValue::from_string(frame)
        .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("null is valid JSON"))
}

/// The `message` frame of a stored message (join recovery, `history`, gap repair): the same
/// bytes as its live broadcast.
pub fn stored_message(room: &str, epoch: &str, message: &pb::Publication) -> String {
    message_frame(
        room,
        message.offset,
        epoch,
        &message.user,
        &message.client_id,
        &message.data_json,
    )
}

/// [`stored_message`] for each message, for `joined.missed` and `history.messages`.
pub fn stored_messages(
    room: &str,
    epoch: &str,
    messages: &[pb::Publication],
) -> Vec<Box<RawValue>> {
    messages
        .iter()
        .map(|message| raw(stored_message(room, epoch, message)))
        .collect()
}

/// The `error` frame for a failed backend call.
pub fn error_frame(id: Option<u64>, status: &tonic::Status) -> String {
    let code = ErrorCode::from_grpc(status.code());
    let message = if code == ErrorCode::Unavailable {
        "a backend is unavailable; retry"
    } else {
        status.message()
    };
    ServerFrame::Error { id, code, message }.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Request {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    fn err(text: &str) -> FrameError {
        parse(text).expect_err(text)
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(ok(r#"{"type":"ping"}"#).command, Command::Ping);
        assert_eq!(ok(r#"{"type":"ping","id":7}"#).id, Some(7));
        assert_eq!(
            ok(r#"{"type":"join","room":"a:b","since":{"epoch":"e","offset":3}}"#).command,
            Command::Join {
                room: "a:b".into(),
                since: Some(Position {
                    epoch: "e".into(),
                    offset: 3
                })
            }
        );
        assert_eq!(
            ok(r#"{"type":"join","room":"r","since":null}"#).command,
            Command::Join {
                room: "r".into(),
                since: None
            }
        );
        assert_eq!(
            ok(r#"{"type":"leave","room":"r"}"#).command,
            Command::Leave { room: "r".into() }
        );
        match ok(r#"{"type":"publish","room":"r","data":{"a": [1, "x"]}}"#).command {
            Command::Publish {
                room,
                data,
                idempotency_key,
            } => {
                assert_eq!(room, "r");
                assert_eq!(data.get(), r#"{"a": [1, "x"]}"#);
                assert_eq!(idempotency_key, None);
            }
            other => panic!("{other:?}"),
        }
        match ok(r#"{"type":"publish","room":"r","data":1,"idempotencyKey":"k-1"}"#).command {
            Command::Publish {
                idempotency_key, ..
            } => assert_eq!(idempotency_key.as_deref(), Some("k-1")),
            other => panic!("{other:?}"),
        }
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1);
        for key in ["\"\"", "\"a\\nb\"", "1", &format!("\"{long}\"")] {
            let frame = format!(
                r#"{{"type":"publish","id":3,"room":"r","data":1,"idempotencyKey":{key}}}"#
            );
            let error = parse(&frame).unwrap_err();
            assert_eq!(
                (error.id, error.code),
                (Some(3), ErrorCode::BadRequest),
                "{key}"
            );
        }
        assert_eq!(
            ok(r#"{"type":"history","room":"r","since":5,"limit":10}"#).command,
            Command::History {
                room: "r".into(),
                since: Some(5),
                limit: 10
            }
        );
        assert_eq!(
            ok(r#"{"type":"refresh","token":"t"}"#).command,
            Command::Refresh { token: "t".into() }
        );
    }

    #[test]
    fn publish_keeps_null_and_scalar_data() {
        for data in ["null", "1", "\"s\"", "[]"] {
            match ok(&format!(r#"{{"type":"publish","room":"r","data":{data}}}"#)).command {
                Command::Publish { data: d, .. } => assert_eq!(d.get(), data),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_frames_with_bad_request() {
        for text in [
            "not json",
            "[1,2]",
            "42",
            "{}",
            r#"{"type":5}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":"bad room"}"#,
            r#"{"type":"join","room":""}"#,
            r#"{"type":"join","room":7}"#,
            r#"{"type":"join","room":"r","since":5}"#,
            r#"{"type":"publish","room":"r"}"#,
            r#"{"type":"history","room":"r","since":"x"}"#,
            r#"{"type":"history","room":"r","limit":0}"#,
            r#"{"type":"refresh"}"#,
            r#"{"type":"ping","id":-1}"#,
        ] {
            assert_eq!(err(text).code, ErrorCode::BadRequest, "{text}");
        }
    }

    #[test]
    fn errors_keep_the_id_when_readable() {
        assert_eq!(err(r#"{"type":"nope","id":3}"#).id, Some(3));
        assert_eq!(err(r#"{"type":"join","id":4,"room":7}"#).id, Some(4));
        assert_eq!(err("{oops").id, None);
    }

    #[test]
    fn room_name_longer_than_128_is_rejected() {
        let long = "x".repeat(129);
        let e = err(&format!(r#"{{"type":"join","room":"{long}"}}"#));
        assert!(e.message.contains("room"), "{}", e.message);
    }

    #[test]
    fn server_frames_have_the_contract_shape() {
        let f = ServerFrame::Published {
            id: Some(1),
            room: "r",
            offset: 9,
        }
        .to_json();
        assert_eq!(f, r#"{"type":"published","id":1,"room":"r","offset":9}"#);
        let f = ServerFrame::Error {
            id: None,
            code: ErrorCode::NotJoined,
            message: "m",
        }
        .to_json();
        assert_eq!(f, r#"{"type":"error","code":"not_joined","message":"m"}"#);
        let f = ServerFrame::Joined {
            id: None,
            room: "r",
            epoch: "e",
            offset: 2,
            recovered: Some(true),
            missed: Some(vec![raw(r#"{"type":"message"}"#.into())]),
        }
        .to_json();
        assert_eq!(
            f,
            r#"{"type":"joined","room":"r","epoch":"e","offset":2,"recovered":true,"missed":[{"type":"message"}]}"#
        );
    }
}
