//! Tokens for the load connections: minted per connection from the HS256 secret (so each
//! connection is its own user, `load-<n>`, as real traffic would be), or one fixed token.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

/// Long enough that no run sees its tokens expire (the gateway closes with 4001 at `exp`).
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

pub enum Tokens {
    Mint(Box<Minter>),
    Fixed(String),
}

pub struct Minter {
    key: EncodingKey,
    header: Header,
    exp: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

impl Tokens {
    /// `token` wins over `secret`; the arguments module makes sure one of them is there.
    pub fn new(secret: Option<&str>, token: Option<&str>) -> Result<Tokens> {
        if let Some(token) = token {
            return Ok(Tokens::Fixed(token.to_owned()));
        }
        let secret = secret.context("no --secret and no --token")?;
        Ok(Tokens::Mint(Box::new(Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(),
            exp: unix_seconds() + TOKEN_LIFETIME_SECS,
        })))
    }

    /// The token of connection number `n`.
    pub fn for_connection(&self, n: u64) -> Result<String> {
        match self {
            Tokens::Fixed(t) => Ok(t.clone()),
            Tokens::Mint(m) => {
                let sub = format!("load-{n}");
                let claims = Claims {
                    sub: &sub,
                    exp: m.exp,
                };
                encode(&m.header, &claims, &m.key).context("signing a token")
            }
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};

    #[test]
    fn minted_tokens_carry_the_connection_number() {
        let tokens = Tokens::new(Some("s3cret"), None).unwrap();
        let t = tokens.for_connection(42).unwrap();
        let claims = decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap()
        .claims;
        assert_eq!(claims["sub"], "load-42");
        assert!(claims["exp"].as_u64().unwrap() > unix_seconds() + 3600);
    }

    #[test]
    fn fixed_token_wins() {
        let tokens = Tokens::new(Some("s"), Some("abc")).unwrap();
        assert_eq!(tokens.for_connection(1).unwrap(), "abc");
    }
}
