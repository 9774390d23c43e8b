//! What a verified token grants: the user and the rooms it may join and publish to.
//!
//! A room pattern is an exact room name or a prefix ending in `*` (`"chat:*"` matches
//! `chat:general`, `"*"` matches every room). An absent `rooms` claim grants every room; an
//! absent `publish` claim means "the same as `rooms`". An empty list grants nothing.

use roomcast_common::room::{RoomNameError, validate_room_name};
use serde::{Deserialize, Serialize};

/// The claims Roomcast reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Patterns of the rooms the user may join; `None` means every room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Patterns of the rooms the user may publish to; `None` means the same as `rooms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

impl Claims {
    /// Whether the token allows joining `room`.
    pub fn can_join(&self, room: &str) -> bool {
        self.rooms
            .as_deref()
            .is_none_or(|patterns| any_matches(patterns, room))
    }

    /// Whether the token allows publishing to `room`. Publishing needs the right to join too:
    /// a publish pattern never widens what `rooms` allows.
    pub fn can_publish(&self, room: &str) -> bool {
        let allowed = match (&self.publish, &self.rooms) {
            (Some(publish), _) => any_matches(publish, room),
            (None, Some(rooms)) => any_matches(rooms, room),
            (None, None) => true,
        };
        allowed && self.can_join(room)
    }
}

/// The longest user id (`sub`) accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Whether `sub` can be a user id: not empty, at most [`MAX_SUBJECT_BYTES`] bytes, and free of
/// control characters (it is shown to other members and written to logs).
pub fn valid_subject(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= MAX_SUBJECT_BYTES && !sub.chars().any(char::is_control)
}

/// Whether `pattern` (an exact name, or a prefix ending in `*`) matches `room`.
pub fn pattern_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

fn any_matches(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| pattern_matches(p, room))
}

/// Checks that a pattern can match at least one valid room name. Tokens from elsewhere are not
/// checked (a bad pattern just matches nothing); this catches typos when minting.
pub fn validate_pattern(pattern: &str) -> Result<(), RoomNameError> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => validate_room_name(prefix),
        None => validate_room_name(pattern),
    }
}

// The proto marks presence with `optional Patterns`, so "absent" and "empty list" survive the
// round trip.

impl From<Claims> for roomcast_proto::Claims {
    fn from(c: Claims) -> Self {
        let patterns =
            |p: Option<Vec<String>>| p.map(|patterns| roomcast_proto::Patterns { patterns });
        roomcast_proto::Claims {
            sub: c.sub,
            exp: c.exp,
            rooms: patterns(c.rooms),
            publish: patterns(c.publish),
        }
    }
}

impl From<roomcast_proto::Claims> for Claims {
    fn from(c: roomcast_proto::Claims) -> Self {
        Claims {
            sub: c.sub,
            exp: c.exp,
            rooms: c.rooms.map(|p| p.patterns),
            publish: c.publish.map(|p| p.patterns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(rooms: Option<&[&str]>, publish: Option<&[&str]>) -> Claims {
        let owned = |p: &[&str]| p.iter().map(|s| s.to_string()).collect();
        Claims {
            sub: "alice".into(),
            exp: 0,
            rooms: rooms.map(owned),
            publish: publish.map(owned),
        }
    }

    #[test]
    fn exact_and_prefix_patterns() {
        assert!(pattern_matches("lobby", "lobby"));
        assert!(!pattern_matches("lobby", "lobby2"));
        assert!(!pattern_matches("lobby", "lobb"));
        assert!(pattern_matches("chat:*", "chat:general"));
        assert!(pattern_matches("chat:*", "chat:"));
        assert!(!pattern_matches("chat:*", "chat"));
        assert!(!pattern_matches("chat:*", "xchat:a"));
        assert!(pattern_matches("*", "anything"));
        // Only a trailing star is special.
        assert!(!pattern_matches("c*t", "cat"));
    }

    #[test]
    fn absent_rooms_allow_everything_empty_list_denies() {
        let all = claims(None, None);
        assert!(all.can_join("x"));
        assert!(all.can_publish("x"));

        let none = claims(Some(&[]), None);
        assert!(!none.can_join("x"));
        assert!(!none.can_publish("x"));
    }

    #[test]
    fn join_follows_room_patterns() {
        let c = claims(Some(&["chat:*", "lobby"]), None);
        assert!(c.can_join("chat:a"));
        assert!(c.can_join("lobby"));
        assert!(!c.can_join("admin"));
    }

    #[test]
    fn publish_falls_back_to_rooms() {
        let c = claims(Some(&["chat:*", "lobby"]), None);
        assert!(c.can_publish("chat:a"));
        assert!(c.can_publish("lobby"));
        assert!(!c.can_publish("admin"));
    }

    #[test]
    fn publish_patterns_narrow_but_never_widen() {
        let c = claims(Some(&["chat:*", "lobby"]), Some(&["chat:*", "admin"]));
        assert!(c.can_publish("chat:a"));
        assert!(!c.can_publish("lobby"), "joinable but not in publish");
        assert!(!c.can_publish("admin"), "in publish but not joinable");

        let read_only = claims(None, Some(&[]));
        assert!(read_only.can_join("news"));
        assert!(!read_only.can_publish("news"));

        let publish_only_some = claims(None, Some(&["chat:*"]));
        assert!(publish_only_some.can_publish("chat:x"));
        assert!(!publish_only_some.can_publish("news"));
    }

    #[test]
    fn proto_round_trip_keeps_absent_and_empty_apart() {
        for c in [
            claims(None, None),
            claims(Some(&[]), None),
            claims(Some(&["a", "b:*"]), Some(&[])),
            claims(None, Some(&["x"])),
        ] {
            let proto = roomcast_proto::Claims::from(c.clone());
            assert_eq!(proto.rooms.is_some(), c.rooms.is_some());
            assert_eq!(Claims::from(proto), c);
        }
    }

    #[test]
    fn json_omits_absent_lists() {
        let json = serde_json::to_value(claims(None, Some(&["a"]))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"sub": "alice", "exp": 0, "publish": ["a"]})
        );
    }

    #[test]
    fn subjects() {
        for ok in [
            "alice",
            "user@example.com",
            "ünïcødé 用户",
            &"x".repeat(256),
        ] {
            assert!(valid_subject(ok), "{ok}");
        }
        for bad in [
            "",
            "a\nb",
            "a\0b",
            "\r",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
            &"x".repeat(257),
            // 256 bytes is the limit, not 256 characters.
            &"é".repeat(129),
        ] {
            assert!(!valid_subject(bad), "{bad:?}");
        }
    }

    #[test]
    fn pattern_validation() {
        for ok in ["*", "chat:*", "lobby", "a.b-c_d:e"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_pattern(""), Err(RoomNameError::Empty));
        assert_eq!(validate_pattern("a b*"), Err(RoomNameError::BadCharacter));
        assert_eq!(validate_pattern("a**"), Err(RoomNameError::BadCharacter));
    }
}
