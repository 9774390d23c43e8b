//! What travels on the broker, and on which channel.
//!
//! Channel layout: one channel per room (`rc:room:<name>`), subscribed by a gateway only while
//! it holds at least one member of the room, plus one control channel (`rc:ctl`) that every
//! gateway subscribes to for rare cluster-wide commands (disconnects, server-side
//! subscriptions).
//!
//! A payload is a short text header and the ready-to-send client frame, so a gateway reads the
//! offset and sender without parsing JSON and forwards the frame bytes untouched:
//! - `M<offset> <epoch> <senderClientId>\n<message frame>`: a room message (the epoch lets a
//!   gateway tell a restart of the room's offsets from a duplicate);
//! - `E<excludedClientId>\n<event frame>`: a presence event (`member_joined`/`member_left`),
//!   not part of the room's offset sequence; the excluded client may be empty;
//! - `C<control json>`: a [`Control`] command.

use std::fmt::Write;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::close_code::CloseCode;
use crate::frame::{self, MemberEvent};

/// Prefix of every room channel.
pub const ROOM_CHANNEL_PREFIX: &str = "rc:room:";
/// The control channel every gateway listens on.
pub const CONTROL_CHANNEL: &str = "rc:ctl";

/// The channel of one gateway: commands for connections it holds (SSE commands posted to
/// another gateway).
pub fn gateway_channel(gateway_id: &str) -> String {
    format!("rc:gw:{gateway_id}")
}

pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{room}")
}

/// The room of a room channel, `None` for other channels.
pub fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix(ROOM_CHANNEL_PREFIX)
}

/// A cluster-wide command for gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Close every connection of `user` (when set) or the connection `client_id`.
    Disconnect {
        #[serde(default)]
        user: String,
        #[serde(default)]
        client_id: String,
        code: CloseCode,
        reason: String,
    },
    /// Join every connection of `user` (when set) or the connection `client_id` to `room`,
    /// whatever its token's room rules say: a backend decided.
    Subscribe {
        room: String,
        #[serde(default)]
        user: String,
        #[serde(default)]
        client_id: String,
    },
    /// Make every connection of `user` (or the connection `client_id`) leave `room`.
    Unsubscribe {
        room: String,
        #[serde(default)]
        user: String,
        #[serde(default)]
        client_id: String,
    },
    /// Client frames posted for the SSE session of `client_id` (`POST /sse/send` on another
    /// gateway), in order. `secret` and `user` are checked by the session itself.
    Post {
        client_id: String,
        secret: String,
        user: String,
        frames: Vec<String>,
    },
}

/// A decoded payload. Frames are slices of the received bytes: no copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    Message {
        offset: u64,
        epoch: String,
        sender: String,
        frame: Bytes,
    },
    Event {
        exclude: String,
        frame: Bytes,
    },
    Control(Control),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed broker payload: {0}")]
pub struct EnvelopeError(&'static str);

/// The payload of a room message carrying `frame`.
pub fn encode_message(offset: u64, epoch: &str, sender: &str, frame: &str) -> Bytes {
    let mut out = String::with_capacity(32 + epoch.len() + sender.len() + frame.len());
    push_message_header(&mut out, offset, epoch, sender);
    out.push_str(frame);
    Bytes::from(out)
}

/// The payload of a published room message: header and [`frame::message_frame`], written
/// into one buffer. The Redis publish script builds the same bytes (checked by
/// `room-service/tests/redis_store.rs`).
pub fn room_message(
    room: &str,
    offset: u64,
    epoch: &str,
    user: &str,
    client_id: &str,
    data_json: &str,
) -> Bytes {
    let mut out = String::with_capacity(
        32 + epoch.len()
            + client_id.len()
            + frame::message_frame_len(room, epoch, user, client_id, data_json),
    );
    push_message_header(&mut out, offset, epoch, client_id);
    frame::push_message_frame(&mut out, room, offset, epoch, user, client_id, data_json);
    Bytes::from(out)
}

fn push_message_header(out: &mut String, offset: u64, epoch: &str, sender: &str) {
    let _ = writeln!(out, "M{offset} {epoch} {sender}");
}

pub fn encode_event(exclude: &str, frame: &str) -> Bytes {
    let mut out = String::with_capacity(2 + exclude.len() + frame.len());
    out.push('E');
    out.push_str(exclude);
    out.push('\n');
    out.push_str(frame);
    Bytes::from(out)
}

/// The payload announcing a membership change: [`frame::member_event_frame`], not sent to the
/// member itself.
pub fn member_event(event: MemberEvent, room: &str, user: &str, client_id: &str) -> Bytes {
    encode_event(
        client_id,
        &frame::member_event_frame(event, room, user, client_id),
    )
}

pub fn encode_control(control: &Control) -> Bytes {
    let json = serde_json::to_string(control).unwrap_or_default();
    Bytes::from(format!("C{json}"))
}

/// Splits `payload[1..]` at the first newline into a header and the frame.
fn header_and_frame(payload: &Bytes) -> Result<(&str, Bytes), EnvelopeError> {
    let newline = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(EnvelopeError("no header line"))?;
    let header =
        std::str::from_utf8(&payload[1..newline]).map_err(|_| EnvelopeError("header not utf-8"))?;
    Ok((header, payload.slice(newline + 1..)))
}

pub fn decode(payload: Bytes) -> Result<Envelope, EnvelopeError> {
    match payload.first() {
        Some(b'M') => {
            let (header, frame) = header_and_frame(&payload)?;
            let mut fields = header.splitn(3, ' ');
            let (Some(offset), Some(epoch), Some(sender)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(EnvelopeError("message header needs offset, epoch, sender"));
            };
            let offset = offset.parse().map_err(|_| EnvelopeError("bad offset"))?;
            Ok(Envelope::Message {
                offset,
                epoch: epoch.to_owned(),
                sender: sender.to_owned(),
                frame,
            })
        }
        Some(b'E') => {
            let (header, frame) = header_and_frame(&payload)?;
            Ok(Envelope::Event {
                exclude: header.to_owned(),
                frame,
            })
        }
        Some(b'C') => serde_json::from_slice(&payload[1..])
            .map(Envelope::Control)
            .map_err(|_| EnvelopeError("bad control json")),
        _ => Err(EnvelopeError("unknown kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posted_frames_round_trip() {
        let control = Control::Post {
            client_id: "gw-1".into(),
            secret: "s".into(),
            user: "alice".into(),
            frames: vec!["{\"type\":\"ping\"}".into(), "x\ny".into()],
        };
        assert_eq!(
            decode(encode_control(&control)).unwrap(),
            Envelope::Control(control)
        );
        assert_eq!(gateway_channel("gw"), "rc:gw:gw");
    }

    #[test]
    fn message_round_trip() {
        let payload = encode_message(42, "e1", "gw1-7", "{\"a\":\"x\\ny\"}");
        assert_eq!(
            decode(payload).unwrap(),
            Envelope::Message {
                offset: 42,
                epoch: "e1".into(),
                sender: "gw1-7".into(),
                frame: Bytes::from_static(b"{\"a\":\"x\\ny\"}"),
            }
        );
    }

    #[test]
    fn room_message_is_header_and_message_frame() {
        let data = r#"{"t":"\u00e9 \"q\" \\"}"#;
        let frame = frame::message_frame("r", 9, "ab", "u", "c\"1", data);
        assert_eq!(
            room_message("r", 9, "ab", "u", "c\"1", data),
            encode_message(9, "ab", "c\"1", &frame)
        );
        assert_eq!(
            encode_message(9, "ab", "c", "{}"),
            Bytes::from_static(b"M9 ab c\n{}")
        );
    }

    #[test]
    fn member_event_excludes_the_member() {
        let payload = member_event(MemberEvent::Left, "r", "u", "c1");
        assert!(payload.starts_with(b"Ec1\n{\"type\":\"member_left\""));
        assert_eq!(
            decode(payload).unwrap(),
            Envelope::Event {
                exclude: "c1".into(),
                frame: Bytes::from(frame::member_event_frame(MemberEvent::Left, "r", "u", "c1")),
            }
        );
    }

    #[test]
    fn event_and_control_round_trip() {
        assert_eq!(
            decode(encode_event("", "{}")).unwrap(),
            Envelope::Event {
                exclude: String::new(),
                frame: Bytes::from_static(b"{}"),
            }
        );
        let control = Control::Disconnect {
            user: "u".into(),
            client_id: String::new(),
            code: CloseCode::POLICY_VIOLATION,
            reason: "bye".into(),
        };
        assert_eq!(
            decode(encode_control(&control)).unwrap(),
            Envelope::Control(control)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"X",
            b"M",
            b"M12",
            b"Mx y\n{}",
            b"M1\n{}",
            b"M1 e\n{}",
            b"C{",
            b"E",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn channels() {
        assert_eq!(room_of_channel(&room_channel("a:b")), Some("a:b"));
        assert_eq!(room_of_channel(CONTROL_CHANNEL), None);
    }
}
