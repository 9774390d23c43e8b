//! HS256 tokens minted the way an application backend would, with the system's secret.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

/// The claims of the contract (§1.1). `None` leaves a claim out of the token.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

impl Claims {
    /// A token for `sub`, valid for an hour, every room allowed.
    pub fn new(sub: impl Into<String>) -> Self {
        Claims {
            sub: sub.into(),
            exp: now() + 3600,
            rooms: None,
            publish: None,
        }
    }

    pub fn rooms<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.rooms = Some(patterns.into_iter().map(Into::into).collect());
        self
    }

    pub fn publish<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.publish = Some(patterns.into_iter().map(Into::into).collect());
        self
    }

    /// Expires `seconds` from now (negative: already expired).
    pub fn expires_in(mut self, seconds: i64) -> Self {
        self.exp = now() + seconds;
        self
    }
}

/// Unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signs `claims` with HS256 and `secret`.
pub fn mint(secret: &str, claims: &Claims) -> Result<String> {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a test token")
}

/// Signs arbitrary claims, for tokens the [`Claims`] type cannot express (no `sub`, say).
pub fn mint_value(secret: &str, claims: &serde_json::Value) -> Result<String> {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("signing a test token")
}

/// A token for `sub` that expired an hour ago, well past any clock-skew leeway.
pub fn expired(secret: &str, sub: &str) -> Result<String> {
    mint(secret, &Claims::new(sub).expires_in(-3600))
}

/// A well-formed token signed with the wrong secret.
pub fn badly_signed(secret: &str, sub: &str) -> Result<String> {
    mint(&format!("not-{secret}"), &Claims::new(sub))
}

/// Not a JWT at all.
pub const MALFORMED: &str = "this-is-not-a-jwt";

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};

    fn claims_of(token: &str, secret: &str) -> serde_json::Value {
        let key = DecodingKey::from_secret(secret.as_bytes());
        decode::<serde_json::Value>(token, &key, &Validation::new(Algorithm::HS256))
            .unwrap()
            .claims
    }

    #[test]
    fn optional_claims_are_left_out() {
        let token = mint("s", &Claims::new("alice")).unwrap();
        let claims = claims_of(&token, "s");
        assert_eq!(claims["sub"], "alice");
        assert!(claims.get("rooms").is_none() && claims.get("publish").is_none());
        let token = mint(
            "s",
            &Claims::new("bob").rooms(["chat:*"]).publish(["chat:a"]),
        )
        .unwrap();
        let claims = claims_of(&token, "s");
        assert_eq!(claims["rooms"][0], "chat:*");
        assert_eq!(claims["publish"][0], "chat:a");
    }

    #[test]
    fn bad_tokens_fail_verification() {
        let key = DecodingKey::from_secret(b"s");
        let v = Validation::new(Algorithm::HS256);
        assert!(decode::<serde_json::Value>(&expired("s", "a").unwrap(), &key, &v).is_err());
        assert!(decode::<serde_json::Value>(&badly_signed("s", "a").unwrap(), &key, &v).is_err());
        assert!(decode::<serde_json::Value>(MALFORMED, &key, &v).is_err());
    }
}
