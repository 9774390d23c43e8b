//! Token verification: signature, algorithm, expiry, and the claims Roomcast needs.
//!
//! Every key accepts exactly one algorithm, fixed by the key (HS256 for a secret, RS256 for an
//! RSA public key, ES256 for a P-256 public key). The token header cannot choose another one,
//! which closes the classic "HS256 signed with the RSA public key" confusion. With a JWKS the
//! token's `kid` header picks the key, and the key still fixes the algorithm.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::claims::{Claims, valid_subject};
use crate::jwks::{Jwks, JwksError, JwksSettings, Selected};

/// Where the verification key comes from; mirrors the service's settings.
#[derive(Debug, Clone, Default)]
pub struct VerifierConfig {
    /// `JWT_SECRET`: shared HS256 secret.
    pub jwt_secret: Option<String>,
    /// `JWT_PUBLIC_KEY_FILE`: PEM public key, RSA (RS256) or EC P-256 (ES256).
    pub jwt_public_key_file: Option<PathBuf>,
    /// `JWKS_URL`: a JSON Web Key Set, fetched at start-up and refreshed.
    pub jwks_url: Option<String>,
    /// `JWKS_REFRESH_SECONDS`: how often the key set is fetched again (default 300).
    pub jwks_refresh: Option<Duration>,
    /// `JWKS_MIN_REFRESH_SECONDS`: the least time between a fetch and one caused by a token
    /// with an unknown `kid` (default 10).
    pub jwks_min_refresh: Option<Duration>,
    /// `JWT_AUDIENCE`: when set, tokens must carry this `aud`. When unset, tokens that carry an
    /// `aud` are refused, since they were meant for someone else.
    pub audience: Option<String>,
    /// `JWT_ISSUER`: when set, tokens must carry this `iss`.
    pub issuer: Option<String>,
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no token key configured: set JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWKS_URL")]
    NoKey,
    #[error("set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE and JWKS_URL")]
    SeveralKeys,
    #[error(transparent)]
    Jwks(#[from] JwksError),
    #[error("JWT secret is empty")]
    EmptySecret,
    #[error("cannot read JWT_PUBLIC_KEY_FILE {path}: {error}")]
    ReadKeyFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("JWT_PUBLIC_KEY_FILE {path}: {error}")]
    BadKeyFile { path: PathBuf, error: KeyError },
}

/// Why a PEM public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("holds a private key; give the public key")]
    PrivateKey,
    #[error("not an RSA or EC public key in PEM format")]
    Unsupported,
    #[error("EC key is not a P-256 key (only ES256 is supported)")]
    NotP256,
}

/// Why a token was refused. The messages are short and plain: the gateway sends them to the
/// client as the body of its 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unexpected token algorithm")]
    WrongAlgorithm,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token audience not accepted")]
    BadAudience,
    #[error("token issuer not accepted")]
    BadIssuer,
    #[error("token has no {0} claim")]
    MissingClaim(&'static str),
    #[error("token has an invalid {0} claim")]
    InvalidClaim(&'static str),
    #[error("unknown token key")]
    UnknownKey,
    #[error("token has no kid")]
    MissingKeyId,
    #[error("invalid token")]
    Invalid,
}

/// Verifies tokens with one key and one algorithm, or with the keys of a JWKS.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    /// One per algorithm the keys use, each accepting only that algorithm.
    validations: Vec<Validation>,
}

#[derive(Clone)]
enum Keys {
    Fixed {
        key: DecodingKey,
        algorithm: Algorithm,
    },
    Jwks(Arc<Jwks>),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key: for HS256 it is the shared secret.
        let mut d = f.debug_struct("Verifier");
        match &self.keys {
            Keys::Fixed { algorithm, .. } => d.field("algorithm", algorithm),
            Keys::Jwks(jwks) => d.field("jwks", jwks),
        };
        d.finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier the settings describe. Exactly one key source must be set; empty
    /// values count as unset. With `JWKS_URL` this fetches the key set (and fails when it
    /// cannot get a usable one) and starts its periodic refresh.
    pub async fn from_config(config: &VerifierConfig) -> Result<Self, ConfigError> {
        let secret = config.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let key_file = config
            .jwt_public_key_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty());
        let jwks = config.jwks_url.as_deref().filter(|s| !s.is_empty());

        let verifier = match (secret, key_file, jwks) {
            (None, None, None) => return Err(ConfigError::NoKey),
            (Some(secret), None, None) => {
                if secret.len() < 32 {
                    tracing::warn!(
                        "JWT_SECRET is shorter than 32 bytes; tokens are easier to forge"
                    );
                }
                Self::hs256(secret.as_bytes())?
            }
            (None, Some(path), None) => Self::from_public_key_file(path)?,
            (None, None, Some(url)) => {
                let mut settings = JwksSettings::new(url);
                if let Some(every) = config.jwks_refresh {
                    settings.refresh_interval = every;
                }
                if let Some(min) = config.jwks_min_refresh {
                    settings.min_refresh_interval = min;
                }
                Self::from_jwks(Jwks::start(settings).await?)
            }
            _ => return Err(ConfigError::SeveralKeys),
        };

        let verifier = match config.audience.as_deref().filter(|s| !s.is_empty()) {
            Some(aud) => verifier.with_audience(aud),
            None => verifier,
        };
        Ok(match config.issuer.as_deref().filter(|s| !s.is_empty()) {
            Some(iss) => verifier.with_issuer(iss),
            None => verifier,
        })
    }

    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.is_empty() {
            return Err(ConfigError::EmptySecret);
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// RS256 or ES256, chosen by the key in `pem` (an RSA or P-256 public key).
    pub fn from_public_key_pem(pem: &[u8]) -> Result<Self, KeyError> {
        // The PEM parser would take a private key's embedded fields for a public key and every
        // token would then fail with a confusing "bad signature".
        if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err(KeyError::PrivateKey);
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        let key = DecodingKey::from_ec_pem(pem).map_err(|_| KeyError::Unsupported)?;
        // The P-256 verifier parses the point up front, so a dummy check refuses other curves
        // now instead of failing every token later.
        if jsonwebtoken::crypto::verify("", b"", &key, Algorithm::ES256).is_err() {
            return Err(KeyError::NotP256);
        }
        Ok(Self::new(key, Algorithm::ES256))
    }

    fn from_public_key_file(path: &Path) -> Result<Self, ConfigError> {
        let pem = std::fs::read(path).map_err(|error| ConfigError::ReadKeyFile {
            path: path.to_owned(),
            error,
        })?;
        Self::from_public_key_pem(&pem).map_err(|error| ConfigError::BadKeyFile {
            path: path.to_owned(),
            error,
        })
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        Self {
            keys: Keys::Fixed { key, algorithm },
            validations: vec![validation(algorithm)],
        }
    }

    /// Verifies with the keys of a key set, chosen by each token's `kid`.
    pub fn from_jwks(jwks: Arc<Jwks>) -> Self {
        Self {
            keys: Keys::Jwks(jwks),
            validations: vec![validation(Algorithm::RS256), validation(Algorithm::ES256)],
        }
    }

    /// Requires tokens to carry `aud` = `audience` (or list it).
    pub fn with_audience(mut self, audience: &str) -> Self {
        for validation in &mut self.validations {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        self
    }

    /// Requires tokens to carry `iss` = `issuer`.
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        for validation in &mut self.validations {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        self
    }

    /// The one algorithm a fixed key accepts; `None` with a JWKS, where each key fixes its own.
    pub fn algorithm(&self) -> Option<Algorithm> {
        match &self.keys {
            Keys::Fixed { algorithm, .. } => Some(*algorithm),
            Keys::Jwks(_) => None,
        }
    }

    /// The key set, when the keys come from a JWKS.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Fixed { .. } => None,
            Keys::Jwks(jwks) => Some(jwks),
        }
    }

    /// Checks the token with the keys at hand and returns its claims. With a JWKS, a `kid`
    /// missing from the cached set is [`VerifyError::UnknownKey`]; [`verify_fresh`]
    /// (Self::verify_fresh) fetches the set again in that case.
    pub fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        if token.is_empty() {
            return Err(VerifyError::Missing);
        }
        match &self.keys {
            Keys::Fixed { key, algorithm } => self.decode(token, key, *algorithm),
            Keys::Jwks(jwks) => {
                let header =
                    jsonwebtoken::decode_header(token).map_err(|e| map_jwt_error(e.kind()))?;
                match jwks.select(header.kid.as_deref()) {
                    Selected::Key(key) => self.decode(token, &key.decoding, key.algorithm),
                    Selected::Unknown => Err(VerifyError::UnknownKey),
                    Selected::NoKid => Err(VerifyError::MissingKeyId),
                }
            }
        }
    }

    /// [`verify`](Self::verify), and with a JWKS: when the token's `kid` is not in the cached
    /// set (the issuer rotated its keys), fetches the set again, at most once per
    /// `JWKS_MIN_REFRESH_SECONDS`, and tries once more.
    pub async fn verify_fresh(&self, token: &str) -> Result<Claims, VerifyError> {
        let first = self.verify(token);
        if first != Err(VerifyError::UnknownKey) {
            return first;
        }
        let Keys::Jwks(jwks) = &self.keys else {
            return first;
        };
        let kid = jsonwebtoken::decode_header(token)
            .ok()
            .and_then(|header| header.kid);
        match kid {
            Some(kid) if jwks.refresh_for_kid(&kid).await => self.verify(token),
            _ => first,
        }
    }

    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        algorithm: Algorithm,
    ) -> Result<Claims, VerifyError> {
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms == [algorithm])
            .ok_or(VerifyError::WrongAlgorithm)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        let claims = claims_from_json(data.claims)?;
        if claims.exp <= unix_now() {
            return Err(VerifyError::Expired);
        }
        Ok(claims)
    }
}

/// The checks every token gets, for tokens of `algorithm` only.
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    // `exp` and `sub` are checked below with our own messages and no leeway: an expired
    // token is refused, as the gateway closes connections on expiry at the same instant.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = true;
    validation.leeway = 0;
    validation
}

fn map_jwt_error(kind: &ErrorKind) -> VerifyError {
    match kind {
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => VerifyError::Malformed,
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => VerifyError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidAudience => VerifyError::BadAudience,
        ErrorKind::InvalidIssuer => VerifyError::BadIssuer,
        ErrorKind::MissingRequiredClaim(claim) => VerifyError::MissingClaim(claim_name(claim)),
        ErrorKind::InvalidClaimFormat(claim) => VerifyError::InvalidClaim(claim_name(claim)),
        _ => VerifyError::Invalid,
    }
}

/// The library names claims with owned strings; ours are `&'static str`.
fn claim_name(claim: &str) -> &'static str {
    match claim {
        "aud" => "aud",
        "iss" => "iss",
        "nbf" => "nbf",
        "exp" => "exp",
        "sub" => "sub",
        _ => "required",
    }
}

/// Reads Roomcast's claims from the verified payload, naming the claim that is wrong.
fn claims_from_json(mut map: Map<String, Value>) -> Result<Claims, VerifyError> {
    let sub = match map.remove("sub") {
        None | Some(Value::Null) => return Err(VerifyError::MissingClaim("sub")),
        Some(Value::String(s)) if s.is_empty() => return Err(VerifyError::MissingClaim("sub")),
        // The user id is echoed to other members and written to logs.
        Some(Value::String(s)) if !valid_subject(&s) => {
            return Err(VerifyError::InvalidClaim("sub"));
        }
        Some(Value::String(s)) => s,
        Some(_) => return Err(VerifyError::InvalidClaim("sub")),
    };
    let exp = match map.get("exp") {
        None | Some(Value::Null) => return Err(VerifyError::MissingClaim("exp")),
        Some(v) => numeric_date(v).ok_or(VerifyError::InvalidClaim("exp"))?,
    };
    Ok(Claims {
        sub,
        exp,
        rooms: patterns(map.remove("rooms"), "rooms")?,
        publish: patterns(map.remove("publish"), "publish")?,
    })
}

/// A JWT NumericDate: integer seconds, though RFC 7519 allows fractions.
fn numeric_date(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && f.abs() < 9.0e18)
            .map(|f| f.floor() as i64)
    })
}

/// `null` counts as absent: serializers commonly write a missing list that way.
fn patterns(value: Option<Value>, claim: &'static str) -> Result<Option<Vec<String>>, VerifyError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(VerifyError::InvalidClaim(claim)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(VerifyError::InvalidClaim(claim)),
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::{encode_hs256, mint_hs256};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const RSA_PRIVATE: &[u8] = include_bytes!("../testdata/rsa.key.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../testdata/rsa.pub.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../testdata/ec.key.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../testdata/ec.pub.pem");
    const EC384_PUBLIC: &[u8] = include_bytes!("../testdata/ec384.pub.pem");

    fn hs() -> Verifier {
        Verifier::hs256(SECRET).unwrap()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn sign_hs(claims: &Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
    }

    fn in_an_hour() -> i64 {
        unix_now() + 3600
    }

    #[test]
    fn accepts_a_valid_token() {
        let token = sign_hs(&json!({"sub": "alice", "exp": in_an_hour(), "rooms": ["chat:*"]}));
        let claims = hs().verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.rooms, Some(vec!["chat:*".to_owned()]));
        assert_eq!(claims.publish, None);
    }

    #[test]
    fn refuses_subjects_that_cannot_be_user_ids() {
        for bad in [
            "alice\nmallory",
            "nul\0",
            "bell\u{7}",
            "esc\u{1b}[31m",
            "c1\u{9b}",
        ] {
            let token = sign_hs(&json!({"sub": bad, "exp": in_an_hour()}));
            assert_eq!(
                hs().verify(&token),
                Err(VerifyError::InvalidClaim("sub")),
                "{bad:?}"
            );
        }
        let long = "u".repeat(257);
        let token = sign_hs(&json!({"sub": long, "exp": in_an_hour()}));
        assert_eq!(hs().verify(&token), Err(VerifyError::InvalidClaim("sub")));
        assert_eq!(
            VerifyError::InvalidClaim("sub").to_string(),
            "token has an invalid sub claim"
        );

        let longest = "u".repeat(256);
        let token = sign_hs(&json!({"sub": longest, "exp": in_an_hour()}));
        assert_eq!(hs().verify(&token).unwrap().sub, longest);
        let unicode = "Zoë 日本";
        let token = sign_hs(&json!({"sub": unicode, "exp": in_an_hour()}));
        assert_eq!(hs().verify(&token).unwrap().sub, unicode);
    }

    #[test]
    fn refuses_expired_tokens_without_leeway() {
        let past = sign_hs(&json!({"sub": "alice", "exp": unix_now() - 1}));
        assert_eq!(hs().verify(&past), Err(VerifyError::Expired));
        // Expiry is exclusive: a token is no longer valid at its `exp` second.
        let now = sign_hs(&json!({"sub": "alice", "exp": unix_now()}));
        assert_eq!(hs().verify(&now), Err(VerifyError::Expired));
    }

    #[test]
    fn refuses_a_bad_signature() {
        let other = EncodingKey::from_secret(b"another secret, also 32 bytes long!");
        let token = sign(
            Algorithm::HS256,
            &other,
            &json!({"sub": "a", "exp": in_an_hour()}),
        );
        assert_eq!(hs().verify(&token), Err(VerifyError::BadSignature));

        // A tampered payload with the original signature.
        let good = sign_hs(&json!({"sub": "a", "exp": in_an_hour()}));
        let forged = sign_hs(&json!({"sub": "admin", "exp": in_an_hour()}));
        let parts: Vec<&str> = good.split('.').collect();
        let forged_parts: Vec<&str> = forged.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged_parts[1], parts[2]);
        assert_eq!(hs().verify(&tampered), Err(VerifyError::BadSignature));
    }

    #[test]
    fn refuses_malformed_tokens() {
        for bad in ["x", "a.b", "a.b.c", "a.b.c.d", "....", "%%.%%.%%"] {
            assert_eq!(hs().verify(bad), Err(VerifyError::Malformed), "{bad}");
        }
        assert_eq!(hs().verify(""), Err(VerifyError::Missing));

        // Correctly signed, but the payload is not JSON.
        let message = format!("{}.{}", b64(br#"{"alg":"HS256"}"#), b64(b"not json"));
        let key = EncodingKey::from_secret(SECRET);
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        let token = format!("{message}.{signature}");
        assert_eq!(hs().verify(&token), Err(VerifyError::Malformed));
    }

    #[test]
    fn requires_sub_and_exp() {
        let v = hs();
        let no_sub = sign_hs(&json!({"exp": in_an_hour()}));
        assert_eq!(v.verify(&no_sub), Err(VerifyError::MissingClaim("sub")));
        let empty_sub = sign_hs(&json!({"sub": "", "exp": in_an_hour()}));
        assert_eq!(v.verify(&empty_sub), Err(VerifyError::MissingClaim("sub")));
        let no_exp = sign_hs(&json!({"sub": "alice"}));
        assert_eq!(v.verify(&no_exp), Err(VerifyError::MissingClaim("exp")));
        let bad_sub = sign_hs(&json!({"sub": 7, "exp": in_an_hour()}));
        assert_eq!(v.verify(&bad_sub), Err(VerifyError::InvalidClaim("sub")));
        let bad_exp = sign_hs(&json!({"sub": "a", "exp": "soon"}));
        assert_eq!(v.verify(&bad_exp), Err(VerifyError::InvalidClaim("exp")));
        let bad_rooms = sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "rooms": "chat:*"}));
        assert_eq!(
            v.verify(&bad_rooms),
            Err(VerifyError::InvalidClaim("rooms"))
        );
        let bad_publish = sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "publish": [1]}));
        assert_eq!(
            v.verify(&bad_publish),
            Err(VerifyError::InvalidClaim("publish"))
        );
    }

    #[test]
    fn honours_nbf() {
        let later = sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "nbf": unix_now() + 600}));
        assert_eq!(hs().verify(&later), Err(VerifyError::NotYetValid));
    }

    #[test]
    fn refuses_other_algorithms() {
        let hs512 = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET),
            &json!({"sub": "a", "exp": in_an_hour()}),
        );
        assert_eq!(hs().verify(&hs512), Err(VerifyError::WrongAlgorithm));

        // Algorithm confusion: an HS256 token keyed with the RSA public key must not pass an
        // RS256 verifier.
        let rs = Verifier::from_public_key_pem(RSA_PUBLIC).unwrap();
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUBLIC),
            &json!({"sub": "a", "exp": in_an_hour()}),
        );
        assert_eq!(rs.verify(&confused), Err(VerifyError::WrongAlgorithm));

        // `alg: none` is not even a known algorithm.
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"sub":"a","exp":{}}}"#, in_an_hour()).as_bytes())
        );
        assert_eq!(hs().verify(&none), Err(VerifyError::Malformed));
    }

    /// Base64url without padding, enough for hand-made tokens.
    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn rs256_and_es256_from_pem() {
        let claims = json!({"sub": "bob", "exp": in_an_hour(), "publish": []});

        let rs = Verifier::from_public_key_pem(RSA_PUBLIC).unwrap();
        assert_eq!(rs.algorithm(), Some(Algorithm::RS256));
        let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        let token = sign(Algorithm::RS256, &rsa_key, &claims);
        let verified = rs.verify(&token).unwrap();
        assert_eq!(verified.sub, "bob");
        assert_eq!(verified.publish, Some(vec![]));

        let es = Verifier::from_public_key_pem(EC_PUBLIC).unwrap();
        assert_eq!(es.algorithm(), Some(Algorithm::ES256));
        let ec_key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        let token = sign(Algorithm::ES256, &ec_key, &claims);
        assert_eq!(es.verify(&token).unwrap().sub, "bob");

        // Each key only accepts its own signatures.
        assert_eq!(rs.verify(&token), Err(VerifyError::WrongAlgorithm));
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(es.verify(&tampered), Err(VerifyError::BadSignature));
    }

    #[test]
    fn refuses_unusable_keys() {
        assert_eq!(
            Verifier::from_public_key_pem(RSA_PRIVATE).unwrap_err(),
            KeyError::PrivateKey
        );
        assert_eq!(
            Verifier::from_public_key_pem(EC384_PUBLIC).unwrap_err(),
            KeyError::NotP256
        );
        assert_eq!(
            Verifier::from_public_key_pem(b"hello").unwrap_err(),
            KeyError::Unsupported
        );
        assert!(matches!(
            Verifier::hs256(b""),
            Err(ConfigError::EmptySecret)
        ));
    }

    #[tokio::test]
    async fn config_needs_exactly_one_supported_key() {
        let err = Verifier::from_config(&VerifierConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ConfigError::NoKey));

        let empty = VerifierConfig {
            jwt_secret: Some(String::new()),
            ..Default::default()
        };
        assert!(matches!(
            Verifier::from_config(&empty).await,
            Err(ConfigError::NoKey)
        ));

        let jwks = VerifierConfig {
            jwks_url: Some("ftp://example.com/jwks.json".into()),
            ..Default::default()
        };
        let err = Verifier::from_config(&jwks).await.unwrap_err();
        assert!(matches!(err, ConfigError::Jwks(JwksError::BadUrl { .. })));
        assert!(err.to_string().contains("JWKS_URL"), "{err}");

        let secret_and_jwks = VerifierConfig {
            jwt_secret: Some("s".into()),
            jwks_url: Some("http://127.0.0.1:1/jwks.json".into()),
            ..Default::default()
        };
        assert!(matches!(
            Verifier::from_config(&secret_and_jwks).await,
            Err(ConfigError::SeveralKeys)
        ));

        let both = VerifierConfig {
            jwt_secret: Some("s".into()),
            jwt_public_key_file: Some("k.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            Verifier::from_config(&both).await,
            Err(ConfigError::SeveralKeys)
        ));

        let missing_file = VerifierConfig {
            jwt_public_key_file: Some("/nonexistent/key.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            Verifier::from_config(&missing_file).await,
            Err(ConfigError::ReadKeyFile { .. })
        ));

        let from_file = VerifierConfig {
            jwt_public_key_file: Some(
                concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/ec.pub.pem").into(),
            ),
            ..Default::default()
        };
        assert_eq!(
            Verifier::from_config(&from_file).await.unwrap().algorithm(),
            Some(Algorithm::ES256)
        );

        let secret = VerifierConfig {
            jwt_secret: Some(String::from_utf8(SECRET.to_vec()).unwrap()),
            ..Default::default()
        };
        let v = Verifier::from_config(&secret).await.unwrap();
        let token = mint_hs256(SECRET, "alice", 60, None, None).unwrap();
        assert_eq!(v.verify(&token).unwrap().sub, "alice");
    }

    #[test]
    fn audience_and_issuer() {
        let plain = hs();
        let with_aud = sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "aud": "roomcast"}));
        assert_eq!(plain.verify(&with_aud), Err(VerifyError::BadAudience));

        let strict = hs().with_audience("roomcast").with_issuer("https://idp");
        let good = sign_hs(
            &json!({"sub": "a", "exp": in_an_hour(), "aud": ["x", "roomcast"], "iss": "https://idp"}),
        );
        assert_eq!(strict.verify(&good).unwrap().sub, "a");
        let no_aud = sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "iss": "https://idp"}));
        assert_eq!(
            strict.verify(&no_aud),
            Err(VerifyError::MissingClaim("aud"))
        );
        let wrong_iss =
            sign_hs(&json!({"sub": "a", "exp": in_an_hour(), "aud": "roomcast", "iss": "evil"}));
        assert_eq!(strict.verify(&wrong_iss), Err(VerifyError::BadIssuer));
    }

    #[test]
    fn typed_claims_round_trip_through_encode() {
        let claims = Claims {
            sub: "carol".into(),
            exp: in_an_hour(),
            rooms: Some(vec!["lobby".into()]),
            publish: None,
        };
        let token = encode_hs256(SECRET, &claims).unwrap();
        assert_eq!(hs().verify(&token).unwrap(), claims);
    }

    #[test]
    fn debug_output_hides_the_key() {
        let printed = format!("{:?}", hs());
        assert!(!printed.contains("0123456789abcdef"), "{printed}");
        assert!(printed.contains("HS256"));
    }
}
