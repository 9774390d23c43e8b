//! Bearer credentials on gRPC calls: the internal token between Roomcast's own processes, and
//! the API key of the server API (contract §2).
//!
//! Servers check them once per call in a tonic interceptor ([`RequireBearer`]), before any
//! handler runs, so a call without the right credential changes nothing. Clients attach them
//! with [`AttachBearer`].

use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest accepted credential: a guessable one would make the boundary decorative.
pub const MIN_CREDENTIAL_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{name} is not set: {why}")]
    Missing {
        name: &'static str,
        why: &'static str,
    },
    #[error("{name} must be at least {MIN_CREDENTIAL_LEN} characters")]
    TooShort { name: &'static str },
    #[error("{name} must be printable ASCII without spaces")]
    NotPrintable { name: &'static str },
}

/// Checks a credential from the environment: present, long enough, and usable in a header.
pub fn validate(
    name: &'static str,
    value: Option<&str>,
    why: &'static str,
) -> Result<String, CredentialError> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(CredentialError::Missing { name, why })?;
    if value.len() < MIN_CREDENTIAL_LEN {
        return Err(CredentialError::TooShort { name });
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CredentialError::NotPrintable { name });
    }
    Ok(value.to_owned())
}

/// A fresh random credential, for standalone mode and local clusters.
pub fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Server side: refuses a call whose `authorization` is not `Bearer <expected>`.
#[derive(Clone)]
pub struct RequireBearer {
    /// `None`: the service is switched off (PERMISSION_DENIED for every call).
    expected: Option<Arc<[u8]>>,
    /// Named in the refusal, so a caller knows which credential is wrong.
    what: &'static str,
}

impl RequireBearer {
    pub fn new(expected: Option<&str>, what: &'static str) -> Self {
        RequireBearer {
            expected: expected
                .filter(|e| !e.is_empty())
                .map(|e| Arc::from(e.as_bytes())),
            what,
        }
    }

    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Err(Status::permission_denied(format!(
                "{} is not configured on this server",
                self.what
            )));
        };
        let presented = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "missing {} (authorization: Bearer <credential>)",
                    self.what
                ))
            })?;
        if constant_time_eq(presented.as_bytes(), expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("invalid {}", self.what)))
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Client side: adds `authorization: Bearer <credential>` to every call.
#[derive(Clone)]
pub struct AttachBearer {
    value: AsciiMetadataValue,
}

impl AttachBearer {
    /// Fails on a credential that cannot be a header value (see [`validate`]).
    pub fn new(credential: &str) -> Result<Self, CredentialError> {
        let value = format!("Bearer {credential}")
            .parse()
            .map_err(|_| CredentialError::NotPrintable { name: "credential" })?;
        Ok(AttachBearer { value })
    }
}

impl Interceptor for AttachBearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` value (scheme case-insensitive).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without an early exit, so the time taken does not reveal how much of the secret a
/// guess got right (only its length).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_auth(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
        request
    }

    #[test]
    fn require_bearer_accepts_only_the_credential() {
        let mut check = RequireBearer::new(Some("0123456789abcdef"), "internal token");
        assert!(check.call(with_auth("Bearer 0123456789abcdef")).is_ok());
        assert!(check.call(with_auth("bearer  0123456789abcdef ")).is_ok());
        for bad in [
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer ",
        ] {
            let status = check.call(with_auth(bad)).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
        }
        let status = check.call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("internal token"));
    }

    #[test]
    fn an_unconfigured_service_is_switched_off() {
        for expected in [None, Some("")] {
            let mut check = RequireBearer::new(expected, "API key");
            let status = check.call(with_auth("Bearer anything")).unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied);
        }
    }

    #[test]
    fn attach_then_require_round_trips() {
        let mut attach = AttachBearer::new("0123456789abcdef").unwrap();
        let request = attach.call(Request::new(())).unwrap();
        let mut check = RequireBearer::new(Some("0123456789abcdef"), "internal token");
        assert!(check.call(request).is_ok());
    }

    #[test]
    fn validation_names_the_setting() {
        assert_eq!(
            validate("INTERNAL_TOKEN", None, "x"),
            Err(CredentialError::Missing {
                name: "INTERNAL_TOKEN",
                why: "x"
            })
        );
        assert_eq!(
            validate("INTERNAL_TOKEN", Some("short"), "x"),
            Err(CredentialError::TooShort {
                name: "INTERNAL_TOKEN"
            })
        );
        assert_eq!(
            validate("INTERNAL_TOKEN", Some("0123456789 abcdef"), "x"),
            Err(CredentialError::NotPrintable {
                name: "INTERNAL_TOKEN"
            })
        );
        assert_eq!(
            validate("INTERNAL_TOKEN", Some(" 0123456789abcdef\n"), "x").unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(generate().len(), 32);
        assert_ne!(generate(), generate());
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
