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

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Prefix of every room channel.
pub const ROOM_CHANNEL_PREFIX: &str = "rc:room:";
/// The control channel every gateway listens on.
pub const CONTROL_CHANNEL: &str = "rc:ctl";

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
        code: u16,
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

/// The payload of a room message; the Lua script in room-service builds the same bytes.
pub fn encode_message(offset: u64, epoch: &str, sender: &str, frame: &str) -> Bytes {
    Bytes::from(format!("M{offset} {epoch} {sender}\n{frame}"))
}

pub fn encode_event(exclude: &str, frame: &str) -> Bytes {
    Bytes::from(format!("E{exclude}\n{frame}"))
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
            code: 1008,
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
