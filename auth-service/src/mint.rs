//! HS256 token minting for development: the `mint-token` command, standalone mode and tests.
//! Production tokens come from the application's own login backend.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast_common::room::RoomNameError;

use crate::claims::{Claims, MAX_SUBJECT_BYTES, valid_subject, validate_pattern};
use crate::verifier::unix_now;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("JWT secret is empty")]
    EmptySecret,
    #[error("sub is empty")]
    EmptySubject,
    #[error("sub is longer than {MAX_SUBJECT_BYTES} bytes or holds control characters")]
    BadSubject,
    #[error("bad room pattern {pattern:?}: {error}")]
    BadPattern {
        pattern: String,
        error: RoomNameError,
    },
    #[error("cannot sign token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// A token for `sub` valid for `ttl_secs` from now. `rooms` / `publish`: `None` leaves the claim
/// out (every room / same as `rooms`); patterns are checked so typos fail here, not at join.
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    ttl_secs: u64,
    rooms: Option<Vec<String>>,
    publish: Option<Vec<String>>,
) -> Result<String, MintError> {
    if sub.is_empty() {
        return Err(MintError::EmptySubject);
    }
    if !valid_subject(sub) {
        return Err(MintError::BadSubject);
    }
    for pattern in rooms.iter().chain(publish.iter()).flatten() {
        validate_pattern(pattern).map_err(|error| MintError::BadPattern {
            pattern: pattern.clone(),
            error,
        })?;
    }
    let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
    let claims = Claims {
        sub: sub.to_owned(),
        exp: unix_now().saturating_add(ttl),
        rooms,
        publish,
    };
    encode_hs256(secret, &claims)
}

/// Signs `claims` as they are, e.g. an already expired token for a test.
pub fn encode_hs256(secret: &[u8], claims: &Claims) -> Result<String, MintError> {
    if secret.is_empty() {
        return Err(MintError::EmptySecret);
    }
    let key = EncodingKey::from_secret(secret);
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::{Verifier, VerifyError};

    const SECRET: &[u8] = b"mint-test-secret-mint-test-secret";

    #[test]
    fn minted_tokens_verify_with_the_same_claims() {
        let rooms = Some(vec!["chat:*".to_owned(), "lobby".to_owned()]);
        let publish = Some(vec!["chat:*".to_owned()]);
        let token = mint_hs256(SECRET, "alice", 3600, rooms.clone(), publish.clone()).unwrap();
        let claims = Verifier::hs256(SECRET).unwrap().verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.rooms, rooms);
        assert_eq!(claims.publish, publish);
        let ttl = claims.exp - unix_now();
        assert!((3590..=3600).contains(&ttl), "{ttl}");
        assert!(claims.can_publish("chat:x"));
        assert!(claims.can_join("lobby"));
        assert!(!claims.can_publish("lobby"));
    }

    #[test]
    fn absent_lists_stay_absent() {
        let token = mint_hs256(SECRET, "bob", 60, None, None).unwrap();
        let claims = Verifier::hs256(SECRET).unwrap().verify(&token).unwrap();
        assert_eq!((claims.rooms, claims.publish), (None, None));
    }

    #[test]
    fn other_secret_does_not_verify() {
        let token = mint_hs256(SECRET, "alice", 60, None, None).unwrap();
        let other = Verifier::hs256(b"some other secret").unwrap();
        assert_eq!(other.verify(&token), Err(VerifyError::BadSignature));
    }

    #[test]
    fn huge_ttl_saturates_instead_of_overflowing() {
        let token = mint_hs256(SECRET, "alice", u64::MAX, None, None).unwrap();
        let claims = Verifier::hs256(SECRET).unwrap().verify(&token).unwrap();
        assert_eq!(claims.exp, i64::MAX);
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            mint_hs256(b"", "a", 60, None, None),
            Err(MintError::EmptySecret)
        ));
        assert!(matches!(
            mint_hs256(SECRET, "", 60, None, None),
            Err(MintError::EmptySubject)
        ));
        assert!(matches!(
            mint_hs256(SECRET, "a\nb", 60, None, None),
            Err(MintError::BadSubject)
        ));
        let err = mint_hs256(SECRET, "a", 60, None, Some(vec!["bad room".into()])).unwrap_err();
        assert!(matches!(err, MintError::BadPattern { ref pattern, .. } if pattern == "bad room"));
    }
}
