//! The client frames that more than one crate builds, built only here.
//!
//! - `message`: room-service builds it once per publish (both stores; with NATS as the broker,
//!   after the Redis script), and the gateway rebuilds it from history (join recovery,
//!   `history`, gap repair). A live broadcast and its replay are byte-identical. The Redis
//!   publish script must assemble the frame itself, in the same atomic step as the offset: it
//!   gets [`message_frame_sender`] from Rust, prepends room, offset and epoch and appends the
//!   data (which it stores too, so it is sent once) and the closing brace;
//!   `room-service/tests/redis_store.rs` checks what it publishes against [`message_frame`] and
//!   [`crate::envelope::room_message`].
//! - `member_joined` / `member_left`: room-service builds them ([`member_event_frame`]); the
//!   scripts publish the bytes they are given.
//!
//! Frames are written as text, not through serde, so field order and escaping are fixed and a
//! store builds each once. The broker payload around them (the `M`/`E` header) belongs to
//! [`crate::envelope`], next to its decoder. Frames only the gateway sends (`joined`, `error`,
//! …) are its `protocol::ServerFrame`.

use std::fmt::Write;

/// Appends `s` to `out` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping is correct for every input; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// `{"type":"message","room":…,"offset":…,"epoch":…,"user":…,"clientId":…,"data":…}`.
/// `data_json` must already be valid JSON (the gateway validated it).
pub fn message_frame(
    room: &str,
    offset: u64,
    epoch: &str,
    user: &str,
    client_id: &str,
    data_json: &str,
) -> String {
    let mut out = String::with_capacity(message_frame_len(room, epoch, user, client_id, data_json));
    push_message_frame(&mut out, room, offset, epoch, user, client_id, data_json);
    out
}

/// Room enough for a message frame: the fixed text, the offset's digits and some escaping.
pub(crate) fn message_frame_len(
    room: &str,
    epoch: &str,
    user: &str,
    client_id: &str,
    data_json: &str,
) -> usize {
    96 + room.len() + epoch.len() + user.len() + client_id.len() + data_json.len()
}

/// Appends [`message_frame`] to `out`.
pub(crate) fn push_message_frame(
    out: &mut String,
    room: &str,
    offset: u64,
    epoch: &str,
    user: &str,
    client_id: &str,
    data_json: &str,
) {
    out.push_str("{\"type\":\"message\",\"room\":");
    push_json_string(out, room);
    let _ = write!(out, ",\"offset\":{offset},\"epoch\":");
    push_json_string(out, epoch);
    push_message_frame_tail(out, user, client_id, data_json);
}

/// The part of a message frame between the epoch and the data: `,"user":…,"clientId":…,"data":`.
/// The Redis store sends this to its Lua script, which writes
/// `{"type":"message","room":…,"offset":…,"epoch":…` before it and the data and `}` after it.
pub fn message_frame_sender(user: &str, client_id: &str) -> String {
    let mut out = String::with_capacity(32 + user.len() + client_id.len());
    push_message_frame_sender(&mut out, user, client_id);
    out
}

fn push_message_frame_sender(out: &mut String, user: &str, client_id: &str) {
    out.push_str(",\"user\":");
    push_json_string(out, user);
    out.push_str(",\"clientId\":");
    push_json_string(out, client_id);
    out.push_str(",\"data\":");
}

fn push_message_frame_tail(out: &mut String, user: &str, client_id: &str, data_json: &str) {
    push_message_frame_sender(out, user, client_id);
    out.push_str(data_json);
    out.push('}');
}

/// A membership change announced to a room's other members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberEvent {
    Joined,
    Left,
}

impl MemberEvent {
    /// The frame's `type`.
    pub const fn kind(self) -> &'static str {
        match self {
            MemberEvent::Joined => "member_joined",
            MemberEvent::Left => "member_left",
        }
    }
}

/// `{"type":"member_joined"|"member_left","room":…,"user":…,"clientId":…}`.
pub fn member_event_frame(event: MemberEvent, room: &str, user: &str, client_id: &str) -> String {
    let mut out = String::with_capacity(64 + room.len() + user.len() + client_id.len());
    out.push_str("{\"type\":\"");
    out.push_str(event.kind());
    out.push_str("\",\"room\":");
    push_json_string(&mut out, room);
    out.push_str(",\"user\":");
    push_json_string(&mut out, user);
    out.push_str(",\"clientId\":");
    push_json_string(&mut out, client_id);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_valid_json_with_all_fields() {
        let frame = message_frame("r:1", 7, "e1", "al\"ice", "c1", r#"{"x":[1,2]}"#);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "r:1");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["clientId"], "c1");
        assert_eq!(v["data"]["x"][1], 2);
    }

    #[test]
    fn frame_bytes_are_fixed() {
        assert_eq!(
            message_frame("r", u64::MAX, "ab", "u\\", "c\u{1}", "\"\""),
            r#"{"type":"message","room":"r","offset":18446744073709551615,"epoch":"ab","user":"u\\","clientId":"c\u0001","data":""}"#
        );
        assert!(
            message_frame("r", 3, "e", "u", "c", "1")
                .ends_with(&format!("{}1}}", message_frame_sender("u", "c")))
        );
    }

    #[test]
    fn member_event_is_json() {
        let frame = member_event_frame(MemberEvent::Joined, "r", "a\"b", "c\n");
        assert_eq!(
            frame,
            r#"{"type":"member_joined","room":"r","user":"a\"b","clientId":"c\n"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "member_joined");
        assert_eq!(v["user"], "a\"b");
        assert_eq!(v["clientId"], "c\n");
        assert!(
            member_event_frame(MemberEvent::Left, "r", "u", "c")
                .starts_with(r#"{"type":"member_left","#)
        );
    }
}
