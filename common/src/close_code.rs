//! WebSocket close codes: the ones Roomcast sends, the ones a backend may ask for in a
//! server-API `Disconnect`, and what each tells a client about reconnecting.
//!
//! A [`CloseCode`] is always one an endpoint may put in a close frame (RFC 6455 §7.4): the
//! protocol codes 1000-1003 and 1007-1014, and the application range 3000-4999. 1004-1006 and
//! 1015 are reserved (1005 and 1006 mean "no close frame": a client sees 1006 when the
//! connection just dropped) and cannot be built.
//!
//! Reconnecting ([`CloseCode::reconnect`], docs/protocol.md §1.4):
//! - the server's own transient conditions (1001 going away, 1011-1012, 1014, 4008 slow
//!   consumer) and a dropped connection (1006): reconnect with the usual jittered backoff and
//!   re-join with `since`;
//! - 1013 try again later, 4029 rate limited, 4000-4499 otherwise: reconnect, not before a
//!   backoff;
//! - 4001 token expired: only with a new token (the client's token callback); without one, stop;
//! - everything else is terminal: 1000 (the session was ended on purpose), 1008 (policy), the
//!   client's protocol faults (1002, 1003, 1007, 1009, 1010: reconnecting would repeat them),
//!   3000-3999 and 4500-4999. A client does not retry these on its own.
//!
//! Backends choosing a code for `Disconnect` pick from 4000-4499 for "come back later" and
//! 4500-4999 for "stay away"; Roomcast's own codes are in 4000-4099.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A WebSocket close code an endpoint may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct CloseCode(u16);

/// What a client should do after the server closed its connection with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Reconnect (jittered exponential backoff, as for a dropped connection) and re-join with
    /// `since`.
    Yes,
    /// Reconnect, but not before a backoff: the server asked the client to slow down.
    AfterBackoff,
    /// Reconnect only with a fresh token; a client that cannot get one stops.
    WithNewToken,
    /// Terminal: do not reconnect on its own; the application decides.
    No,
}

impl CloseCode {
    /// 1000: the session ended normally (a backend's `Disconnect` may ask for it).
    pub const NORMAL: Self = Self(1000);
    /// 1001: the gateway is draining; reconnect (to another gateway).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: a frame broke RFC 6455 (e.g. unmasked).
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1007: a text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: policy violation; the default of a server-API `Disconnect`.
    pub const POLICY_VIOLATION: Self = Self(1008);
    /// 1009: a frame above `MAX_FRAME_BYTES`.
    pub const TOO_BIG: Self = Self(1009);
    /// 1011: the server failed.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 4001: the token expired without a `refresh`.
    pub const TOKEN_EXPIRED: Self = Self(4001);
    /// 4008: the connection's outbound queue overflowed (slow consumer).
    pub const SLOW_CONSUMER: Self = Self(4008);
    /// 4029: publishes over the rate, repeatedly.
    pub const RATE_LIMITED: Self = Self(4029);

    /// `code` if an endpoint may send it in a close frame.
    pub const fn new(code: u16) -> Option<Self> {
        match code {
            1000..=1003 | 1007..=1014 | 3000..=4999 => Some(Self(code)),
            _ => None,
        }
    }

    /// The number on the wire.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether, and how, a client should reconnect after the server closed with this code.
    pub const fn reconnect(self) -> Reconnect {
        match self.0 {
            1001 | 1011 | 1012 | 1014 | 4008 => Reconnect::Yes,
            4001 => Reconnect::WithNewToken,
            1013 | 4000..=4499 => Reconnect::AfterBackoff,
            _ => Reconnect::No,
        }
    }
}

/// A number that is not a [`CloseCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a usable WebSocket close code")]
pub struct InvalidCloseCode(pub u16);

impl TryFrom<u16> for CloseCode {
    type Error = InvalidCloseCode;

    fn try_from(code: u16) -> Result<Self, Self::Error> {
        Self::new(code).ok_or(InvalidCloseCode(code))
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.0
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes_only() {
        for code in [1000, 1003, 1007, 1014, 3000, 4001, 4999] {
            assert_eq!(CloseCode::new(code).map(CloseCode::get), Some(code));
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            assert_eq!(CloseCode::new(code), None, "{code}");
            assert_eq!(CloseCode::try_from(code), Err(InvalidCloseCode(code)));
        }
    }

    #[test]
    fn named_codes_keep_their_wire_values() {
        let named = [
            (CloseCode::NORMAL, 1000),
            (CloseCode::GOING_AWAY, 1001),
            (CloseCode::PROTOCOL_ERROR, 1002),
            (CloseCode::INVALID_PAYLOAD, 1007),
            (CloseCode::POLICY_VIOLATION, 1008),
            (CloseCode::TOO_BIG, 1009),
            (CloseCode::INTERNAL_ERROR, 1011),
            (CloseCode::TOKEN_EXPIRED, 4001),
            (CloseCode::SLOW_CONSUMER, 4008),
            (CloseCode::RATE_LIMITED, 4029),
        ];
        for (code, wire) in named {
            assert_eq!(code.get(), wire);
            assert_eq!(CloseCode::new(wire), Some(code));
        }
    }

    #[test]
    fn reconnect_policy() {
        use Reconnect::*;
        let cases = [
            (1000, No),
            (1001, Yes),
            (1002, No),
            (1003, No),
            (1007, No),
            (1008, No),
            (1009, No),
            (1010, No),
            (1011, Yes),
            (1012, Yes),
            (1013, AfterBackoff),
            (1014, Yes),
            (3000, No),
            (3999, No),
            (4000, AfterBackoff),
            (4001, WithNewToken),
            (4008, Yes),
            (4029, AfterBackoff),
            (4499, AfterBackoff),
            (4500, No),
            (4999, No),
        ];
        for (code, want) in cases {
            assert_eq!(CloseCode::new(code).unwrap().reconnect(), want, "{code}");
        }
    }

    #[test]
    fn serde_is_the_number_and_refuses_unusable_codes() {
        assert_eq!(
            serde_json::to_string(&CloseCode::POLICY_VIOLATION).unwrap(),
            "1008"
        );
        assert_eq!(
            serde_json::from_str::<CloseCode>("4029").unwrap(),
            CloseCode::RATE_LIMITED
        );
        assert!(serde_json::from_str::<CloseCode>("1005").is_err());
    }
}
