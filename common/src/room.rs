//! Room-name rules: `^[A-Za-z0-9_.:-]{1,128}$`.

/// Longest accepted room name, in bytes.
pub const MAX_ROOM_NAME_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_NAME_LEN} bytes")]
    TooLong,
    #[error("room name may only contain A-Z a-z 0-9 _ . : -")]
    BadCharacter,
}

/// Checks a room name against the protocol's rule.
pub fn validate_room_name(name: &str) -> Result<(), RoomNameError> {
    if name.is_empty() {
        return Err(RoomNameError::Empty);
    }
    if name.len() > MAX_ROOM_NAME_LEN {
        return Err(RoomNameError::TooLong);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err(RoomNameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["a", "chat:general", "A-b_c.d:e", &"x".repeat(128)] {
            assert_eq!(validate_room_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_invalid_names() {
        assert_eq!(validate_room_name(""), Err(RoomNameError::Empty));
        assert_eq!(
            validate_room_name(&"x".repeat(129)),
            Err(RoomNameError::TooLong)
        );
        for name in ["a b", "a/b", "é", "a*", "room\n", "{x}"] {
            assert_eq!(
                validate_room_name(name),
                Err(RoomNameError::BadCharacter),
                "{name}"
            );
        }
    }
}
