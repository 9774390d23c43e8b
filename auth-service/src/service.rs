//! The gRPC `AuthService`: stateless, so any number of instances can share one address list.

use roomcast_common::error_code::ErrorCode;
use roomcast_common::room::validate_room_name;
use roomcast_proto::auth_service_server::{AuthService, AuthServiceServer};
use roomcast_proto::{
    AuthorizeRequest, AuthorizeResponse, ItemStatus, MAX_BATCH, VerifiedToken, VerifyTokenRequest,
    VerifyTokenResponse, VerifyTokensRequest, VerifyTokensResponse,
};
use tonic::{Request, Response, Status};

use crate::claims::Claims;
use crate::verifier::Verifier;

/// Answers `AuthService` calls with one [`Verifier`].
#[derive(Debug, Clone)]
pub struct AuthHandler {
    verifier: Verifier,
}

impl AuthHandler {
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }

    /// The handler wrapped as a tonic service, ready for `Server::add_service`.
    pub fn into_server(self) -> AuthServiceServer<Self> {
        AuthServiceServer::new(self)
    }

    async fn verify(&self, token: &str) -> Result<Claims, Status> {
        self.verifier.verify_fresh(token).await.map_err(|e| {
            tracing::debug!(reason = %e, "token refused");
            ErrorCode::Unauthorized.status(e.to_string())
        })
    }
}

#[tonic::async_trait]
impl AuthService for AuthHandler {
    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let claims = self.verify(&request.get_ref().token).await?;
        Ok(Response::new(VerifyTokenResponse {
            claims: Some(claims.into()),
        }))
    }

    async fn verify_tokens(
        &self,
        request: Request<VerifyTokensRequest>,
    ) -> Result<Response<VerifyTokensResponse>, Status> {
        let tokens = request.into_inner().tokens;
        if tokens.len() > MAX_BATCH {
            return Err(ErrorCode::BadRequest.status(format!(
                "{} tokens in one call; at most {MAX_BATCH}",
                tokens.len()
            )));
        }
        // One after the other: an HS256 check is a few microseconds, and a key a JWKS
        // verifier has to fetch is fetched once for all the tokens that name it.
        let mut results = Vec::with_capacity(tokens.len());
        for token in &tokens {
            let verified = self.verify(token).await;
            results.push(VerifiedToken {
                status: Some(ItemStatus::of(&verified)),
                claims: verified.ok().map(Into::into),
            });
        }
        Ok(Response::new(VerifyTokensResponse { results }))
    }

    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let request = request.get_ref();
        let claims = self.verify(&request.token).await?;
        validate_room_name(&request.room)
            .map_err(|e| ErrorCode::BadRequest.status(e.to_string()))?;
        Ok(Response::new(AuthorizeResponse {
            can_join: claims.can_join(&request.room),
            can_publish: claims.can_publish(&request.room),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::{encode_hs256, mint_hs256};
    use crate::verifier::unix_now;
    use tonic::Code;

    const SECRET: &[u8] = b"service-test-secret-service-test";

    fn handler() -> AuthHandler {
        AuthHandler::new(Verifier::hs256(SECRET).unwrap())
    }

    fn token(rooms: Option<&[&str]>, publish: Option<&[&str]>) -> String {
        let owned = |p: &[&str]| p.iter().map(|s| s.to_string()).collect();
        mint_hs256(SECRET, "alice", 600, rooms.map(owned), publish.map(owned)).unwrap()
    }

    async fn authorize(token: &str, room: &str) -> Result<(bool, bool), Status> {
        let request = Request::new(AuthorizeRequest {
            token: token.to_owned(),
            room: room.to_owned(),
        });
        let response = handler().authorize(request).await?.into_inner();
        Ok((response.can_join, response.can_publish))
    }

    #[tokio::test]
    async fn verify_token_returns_the_claims() {
        let token = token(Some(&["chat:*"]), Some(&[]));
        let request = Request::new(VerifyTokenRequest { token });
        let claims = handler()
            .verify_token(request)
            .await
            .unwrap()
            .into_inner()
            .claims
            .unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.rooms.unwrap().patterns, vec!["chat:*"]);
        assert_eq!(claims.publish.unwrap().patterns, Vec::<String>::new());
        assert!(claims.exp > unix_now());
    }

    #[tokio::test]
    async fn verify_token_refuses_with_unauthenticated_and_a_reason() {
        let expired = encode_hs256(
            SECRET,
            &Claims {
                sub: "alice".into(),
                exp: unix_now() - 10,
                rooms: None,
                publish: None,
            },
        )
        .unwrap();
        let status = handler()
            .verify_token(Request::new(VerifyTokenRequest { token: expired }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "token expired");

        let status = handler()
            .verify_token(Request::new(VerifyTokenRequest {
                token: "junk".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "malformed token");
    }

    #[tokio::test]
    async fn verify_tokens_answers_each_token_as_verify_token_would() {
        let good = token(None, None);
        let tokens = vec![good.clone(), "junk".into(), good];
        let results = handler()
            .verify_tokens(Request::new(VerifyTokensRequest { tokens }))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), 3);
        for at in [0, 2] {
            let result = &results[at];
            assert!(result.status.clone().unwrap().into_result().is_ok());
            assert_eq!(result.claims.as_ref().unwrap().sub, "alice");
        }
        let refused = results[1]
            .status
            .clone()
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert_eq!(refused.message(), "malformed token");
        assert!(results[1].claims.is_none());

        let too_many = vec![String::new(); MAX_BATCH + 1];
        let status = handler()
            .verify_tokens(Request::new(VerifyTokensRequest { tokens: too_many }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn authorize_applies_the_patterns() {
        let t = token(Some(&["chat:*", "lobby"]), Some(&["chat:*"]));
        assert_eq!(authorize(&t, "chat:general").await.unwrap(), (true, true));
        assert_eq!(authorize(&t, "lobby").await.unwrap(), (true, false));
        assert_eq!(authorize(&t, "admin").await.unwrap(), (false, false));

        let everything = token(None, None);
        assert_eq!(
            authorize(&everything, "anything").await.unwrap(),
            (true, true)
        );
    }

    #[tokio::test]
    async fn authorize_refuses_bad_rooms_and_bad_tokens() {
        let t = token(None, None);
        let status = authorize(&t, "bad room").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = authorize(&t, "").await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        let other = mint_hs256(b"not the service secret", "eve", 600, None, None).unwrap();
        let status = authorize(&other, "lobby").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "bad token signature");
    }
}
