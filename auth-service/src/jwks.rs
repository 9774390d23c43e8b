//! Keys from a JSON Web Key Set (`JWKS_URL`).
//!
//! The set is fetched once at start-up (a few tries; failing that, the service refuses to
//! start), then again every `JWKS_REFRESH_SECONDS`, and again when a token names a `kid` the
//! cached set does not hold (a key rotation), at most once per `JWKS_MIN_REFRESH_SECONDS` so
//! that tokens with made-up kids cannot make us hammer the key server. A refresh that fails
//! keeps the cached keys.
//!
//! Usable keys are RSA keys (RS256, 2048 to 4096 bits) and EC P-256 keys (ES256); a key whose
//! `alg` names another algorithm, or whose `use` is not `sig`, is skipped. Each key fixes its
//! own algorithm: a token's `alg` header must match the key its `kid` selects.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{ACCEPT, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// The largest key set accepted; a bigger answer is refused, not truncated.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The smallest RSA modulus accepted (RFC 7518 §3.3) and the largest the RSA verifier takes.
const RSA_MODULUS_BYTES: std::ops::RangeInclusive<usize> = 256..=512;

/// How the key set is fetched and refreshed; mirrors the `JWKS_*` settings.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// `JWKS_URL`: `http://` or `https://`.
    pub url: String,
    /// `JWKS_REFRESH_SECONDS`: how often the set is fetched again.
    pub refresh_interval: Duration,
    /// `JWKS_MIN_REFRESH_SECONDS`: the least time between a fetch and one caused by a token
    /// with an unknown `kid`.
    pub min_refresh_interval: Duration,
    /// Limit of one fetch: connecting, the answer's head and its body.
    pub timeout: Duration,
    /// Fetches tried at start-up before giving up.
    pub start_attempts: u32,
    /// Pause between two start-up tries.
    pub start_retry_pause: Duration,
}

impl JwksSettings {
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
    pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(10);
    /// Below the gateway's 5 s deadline for a token check, which may include a fetch.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

    /// `url` with the default intervals and timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            refresh_interval: Self::DEFAULT_REFRESH,
            min_refresh_interval: Self::DEFAULT_MIN_REFRESH,
            timeout: Self::DEFAULT_TIMEOUT,
            start_attempts: 3,
            start_retry_pause: Duration::from_secs(1),
        }
    }
}

/// Why the key set could not be used at start-up. Each message is one line naming the URL.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS_URL {url:?} is not an http:// or https:// URL")]
    BadUrl { url: String },
    #[error("JWKS_URL {url}: cannot set up TLS: {error}")]
    Tls { url: String, error: String },
    #[error("JWKS_URL {url}: {error} (gave up after {tries} tries)")]
    Unavailable {
        url: String,
        tries: u32,
        error: FetchError,
    },
    #[error("JWKS_REFRESH_SECONDS must be at least 1")]
    ZeroRefresh,
}

/// Why one fetch of the key set failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answer is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("answer is not a JSON Web Key Set: {0}")]
    NotJwks(String),
    #[error("the key set holds no usable key (RS256 or ES256 signing keys)")]
    NoUsableKeys,
}

/// One verification key and the algorithm it is used with.
pub struct JwksKey {
    pub(crate) decoding: DecodingKey,
    pub(crate) algorithm: Algorithm,
}

/// What the set holds for a token's `kid`.
pub(crate) enum Selected {
    Key(Arc<JwksKey>),
    /// The token's `kid` is not in the set.
    Unknown,
    /// The token has no `kid` and the set holds several keys.
    NoKid,
}

/// The usable keys of one fetched set.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<JwksKey>>,
    without_kid: Vec<Arc<JwksKey>>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the usable keys. Keys that cannot be used (another
    /// algorithm, an encryption key, bad parameters, a repeated `kid`) are skipped with a
    /// warning; a set without any usable key is an error.
    pub fn from_json(body: &[u8]) -> Result<Self, FetchError> {
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        // Each key on its own: one key of a kind this library does not know must not make the
        // whole set unreadable.
        let raw: RawSet = serde_json::from_slice(body).map_err(|e| {
            let mut text = e.to_string();
            text.truncate(200);
            FetchError::NotJwks(text)
        })?;
        let mut set = KeySet::default();
        for (index, value) in raw.keys.into_iter().enumerate() {
            let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
            let key = serde_json::from_value::<Jwk>(value)
                .map_err(|_| "not a JSON Web Key this service can read")
                .and_then(|jwk| usable_key(&jwk));
            let key = match key {
                Ok(key) => Arc::new(key),
                Err(reason) => {
                    tracing::warn!(index, kid = kid.as_deref(), reason, "JWKS key skipped");
                    continue;
                }
            };
            match kid {
                None => set.without_kid.push(key),
                Some(kid) => match set.by_kid.entry(kid) {
                    Entry::Vacant(slot) => {
                        slot.insert(key);
                    }
                    Entry::Occupied(slot) => {
                        tracing::warn!(index, kid = slot.key(), "JWKS key skipped: repeated kid");
                    }
                },
            }
        }
        if set.is_empty() {
            return Err(FetchError::NoUsableKeys);
        }
        Ok(set)
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    /// Whether the set holds no key (only the empty set before the first fetch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kids of the set, sorted (for logs).
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.by_kid.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    /// The key for a token's `kid`. A token without a `kid` is only accepted when the set
    /// holds exactly one key; a key without a `kid` is only used by such tokens.
    pub(crate) fn select(&self, kid: Option<&str>) -> Selected {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .map_or(Selected::Unknown, |k| Selected::Key(k.clone())),
            None if self.len() == 1 => {
                let only = self.by_kid.values().chain(&self.without_kid).next();
                only.map_or(Selected::NoKid, |k| Selected::Key(k.clone()))
            }
            None => Selected::NoKid,
        }
    }
}

/// The key a JWK describes, if it is one we verify signatures with.
fn usable_key(jwk: &Jwk) -> Result<JwksKey, &'static str> {
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("not a signing key (use is not \"sig\")"),
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(rsa), None | Some(KeyAlgorithm::RS256)) => {
            // Unpadded base64url; RFC 7518 forbids leading zero bytes in `n`.
            let bytes = rsa.n.trim_end_matches('=').len() * 3 / 4;
            if !RSA_MODULUS_BYTES.contains(&bytes) {
                return Err("RSA key is not 2048 to 4096 bits long");
            }
            Algorithm::RS256
        }
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256)) => {
            if ec.curve != EllipticCurve::P256 {
                return Err("EC key is not a P-256 key (only ES256 is supported)");
            }
            Algorithm::ES256
        }
        _ => return Err("not an RS256 or ES256 key"),
    };
    let decoding = DecodingKey::from_jwk(jwk).map_err(|_| "bad key parameters")?;
    if algorithm == Algorithm::ES256
        && jsonwebtoken::crypto::verify("", b"", &decoding, algorithm).is_err()
    {
        // The P-256 verifier parses the point up front: this refuses a point off the curve now
        // instead of failing every token later.
        return Err("EC key is not a valid P-256 point");
    }
    Ok(JwksKey {
        decoding,
        algorithm,
    })
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The cached key set of one `JWKS_URL` and what keeps it fresh. Shared by every clone of the
/// verifier that uses it.
pub struct Jwks {
    settings: JwksSettings,
    uri: Uri,
    client: HttpClient,
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching, so concurrent triggers share one fetch; holds when the last fetch
    /// ended.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    fetches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.settings.url)
            .field("kids", &self.current().kids())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Fetches the set (by default up to three tries, a second apart) and starts the periodic refresh,
    /// which stops when the last handle is dropped. An unreachable URL, or one that does not
    /// answer a key set with a usable key, is an error: the service must not start without
    /// keys.
    pub async fn start(settings: JwksSettings) -> Result<Arc<Self>, JwksError> {
        let jwks = Arc::new(Self::new(settings)?);
        let mut tries = 0;
        let set = loop {
            tries += 1;
            match jwks.fetch().await {
                Ok(set) => break set,
                Err(error) if tries >= jwks.settings.start_attempts => {
                    return Err(JwksError::Unavailable {
                        url: jwks.settings.url.clone(),
                        tries,
                        error,
                    });
                }
                Err(error) => {
                    tracing::warn!(url = %jwks.settings.url, %error, "JWKS fetch failed; trying again");
                    tokio::time::sleep(jwks.settings.start_retry_pause).await;
                }
            }
        };
        tracing::info!(url = %jwks.settings.url, kids = ?set.kids(), keys = set.len(), "JWKS loaded");
        *jwks.last_fetch.lock().await = Some(Instant::now());
        jwks.store(set);
        jwks.spawn_refresh();
        Ok(jwks)
    }

    fn new(settings: JwksSettings) -> Result<Self, JwksError> {
        if settings.refresh_interval.is_zero() {
            return Err(JwksError::ZeroRefresh);
        }
        let bad_url = || JwksError::BadUrl {
            url: settings.url.clone(),
        };
        let uri: Uri = settings.url.parse().map_err(|_| bad_url())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad_url()),
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad_url());
        }
        let connector = connector(https).map_err(|error| JwksError::Tls {
            url: settings.url.clone(),
            error,
        })?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            settings,
            uri,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            last_fetch: tokio::sync::Mutex::new(None),
            fetches: Default::default(),
        })
    }

    /// The key set in use.
    pub fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn store(&self, set: KeySet) {
        let set = Arc::new(set);
        match self.keys.write() {
            Ok(mut keys) => *keys = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }

    /// How many fetches were started (start-up tries included).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    pub(crate) fn select(&self, kid: Option<&str>) -> Selected {
        self.current().select(kid)
    }

    /// Fetches the set again because a token named `kid`, which the cached set lacks, unless
    /// the last fetch ended less than the minimum refresh interval ago. Concurrent callers
    /// wait for the same fetch. Returns whether the set now holds `kid`.
    pub async fn refresh_for_kid(&self, kid: &str) -> bool {
        let mut last = self.last_fetch.lock().await;
        // Someone else's fetch may have brought it while we waited.
        if matches!(self.select(Some(kid)), Selected::Key(_)) {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < self.settings.min_refresh_interval) {
            tracing::debug!(kid, "unknown kid; JWKS fetched too recently to fetch again");
            return false;
        }
        self.refresh_locked(&mut last, "unknown kid").await;
        matches!(self.select(Some(kid)), Selected::Key(_))
    }

    /// Fetches now and replaces the cached set, or keeps it and logs a warning.
    async fn refresh_locked(&self, last: &mut Option<Instant>, reason: &'static str) {
        let fetched = self.fetch().await;
        // Counted from the end: callers that waited for this fetch must not start another.
        *last = Some(Instant::now());
        match fetched {
            Ok(set) => {
                tracing::info!(url = %self.settings.url, reason, kids = ?set.kids(), keys = set.len(), "JWKS refreshed");
                self.store(set);
            }
            Err(error) => {
                tracing::warn!(url = %self.settings.url, reason, %error, "JWKS refresh failed; keeping the cached keys");
            }
        }
    }

    fn spawn_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.settings.refresh_interval;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(jwks) = weak.upgrade() else { break };
                let mut last = jwks.last_fetch.lock().await;
                jwks.refresh_locked(&mut last, "periodic").await;
            }
        });
    }

    /// One GET of the URL, bounded in time and size.
    async fn fetch(&self) -> Result<KeySet, FetchError> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.settings.timeout;
        let body = tokio::time::timeout(timeout, self.get())
            .await
            .map_err(|_| FetchError::Timeout(timeout))??;
        KeySet::from_json(&body)
    }

    async fn get(&self) -> Result<Bytes, FetchError> {
        let request = Request::get(self.uri.clone())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(
                USER_AGENT,
                concat!("roomcast-auth/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| FetchError::Request(error_chain(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    FetchError::TooLarge
                } else {
                    FetchError::Request(error_chain(e.as_ref()))
                }
            })?;
        Ok(body.to_bytes())
    }
}

/// Plain HTTP, and HTTPS with the system's root certificates (ring as the crypto provider, the
/// one already in the build).
fn connector(https: bool) -> Result<HttpsConnector<HttpConnector>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = HttpsConnectorBuilder::new();
    let builder = if https {
        builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| e.to_string())?
    } else {
        // Never used for an http:// URL; an empty trust store keeps start-up independent of
        // the system's certificates.
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(config)
    };
    Ok(builder.https_or_http().enable_http1().build())
}

/// An error and its causes on one line ("client error (Connect): tcp connect error: ...").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::{Verifier, VerifyError, unix_now};
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const RSA_PRIVATE: &[u8] = include_bytes!("../testdata/rsa.key.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../testdata/ec.key.pem");
    const EC2_PRIVATE: &[u8] = include_bytes!("../testdata/ec2.key.pem");

    fn rsa() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap()
    }

    fn ec() -> EncodingKey {
        EncodingKey::from_ec_pem(EC_PRIVATE).unwrap()
    }

    fn ec2() -> EncodingKey {
        EncodingKey::from_ec_pem(EC2_PRIVATE).unwrap()
    }

    /// The public JWK of a private key, under `kid`.
    fn jwk(key: &EncodingKey, alg: Algorithm, kid: Option<&str>) -> Value {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = kid.map(str::to_owned);
        serde_json::to_value(jwk).unwrap()
    }

    fn set_json(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    /// The first set of the tests: an RSA key and an EC key.
    fn first_set() -> Vec<u8> {
        set_json(&[
            jwk(&rsa(), Algorithm::RS256, Some("rsa-1")),
            jwk(&ec(), Algorithm::ES256, Some("ec-1")),
        ])
    }

    fn token(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let claims = json!({"sub": "alice", "exp": unix_now() + 600});
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[derive(Clone)]
    enum Reply {
        Body(Vec<u8>),
        Status(u16),
        /// Accepts the connection and never answers.
        Hang,
    }

    /// A minimal HTTP/1.1 server answering every request with the current [`Reply`] and
    /// counting requests.
    struct JwksServer {
        url: String,
        reply: Arc<Mutex<Reply>>,
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(reply: Reply) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!(
                "http://{}/.well-known/jwks.json",
                listener.local_addr().unwrap()
            );
            let reply = Arc::new(Mutex::new(reply));
            let hits = Arc::new(AtomicUsize::new(0));
            let (r, h) = (reply.clone(), hits.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let (reply, hits) = (r.clone(), h.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = reply.lock().unwrap().clone();
                        let (status, body) = match reply {
                            Reply::Body(body) => (200, body),
                            Reply::Status(status) => (status, b"nope".to_vec()),
                            Reply::Hang => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                return;
                            }
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = socket.write_all(head.as_bytes()).await;
                        let _ = socket.write_all(&body).await;
                        let _ = socket.shutdown().await;
                    });
                }
            });
            JwksServer {
                url,
                reply,
                hits,
                task,
            }
        }

        fn set(&self, reply: Reply) {
            *self.reply.lock().unwrap() = reply;
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn settings(url: &str) -> JwksSettings {
        JwksSettings {
            start_retry_pause: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
            ..JwksSettings::new(url)
        }
    }

    async fn verifier(settings: JwksSettings) -> Verifier {
        Verifier::from_jwks(Jwks::start(settings).await.unwrap())
    }

    #[tokio::test]
    async fn the_kid_selects_the_key_and_the_key_fixes_the_algorithm() {
        let server = JwksServer::start(Reply::Body(first_set())).await;
        let v = verifier(settings(&server.url)).await;
        assert_eq!(v.algorithm(), None);

        let rs = token(Algorithm::RS256, Some("rsa-1"), &rsa());
        assert_eq!(v.verify(&rs).unwrap().sub, "alice");
        let es = token(Algorithm::ES256, Some("ec-1"), &ec());
        assert_eq!(v.verify_fresh(&es).await.unwrap().sub, "alice");

        // A kid naming a key of the other family, or an HS256 token naming an RSA key.
        let es_as_rsa = token(Algorithm::ES256, Some("rsa-1"), &ec());
        assert_eq!(v.verify(&es_as_rsa), Err(VerifyError::WrongAlgorithm));
        let hs = token(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(b"guess"),
        );
        assert_eq!(v.verify(&hs), Err(VerifyError::WrongAlgorithm));
        // The right family, another key.
        let other_ec = token(Algorithm::ES256, Some("ec-1"), &ec2());
        assert_eq!(v.verify(&other_ec), Err(VerifyError::BadSignature));
        // Several keys: a token must say which.
        let no_kid = token(Algorithm::RS256, None, &rsa());
        assert_eq!(
            v.verify_fresh(&no_kid).await,
            Err(VerifyError::MissingKeyId)
        );
        assert_eq!(v.verify("a.b.c"), Err(VerifyError::Malformed));
        // None of these fetched the set again.
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn a_lone_key_also_verifies_tokens_without_kid() {
        let set = set_json(&[jwk(&ec(), Algorithm::ES256, None)]);
        let server = JwksServer::start(Reply::Body(set)).await;
        let v = verifier(settings(&server.url)).await;
        let no_kid = token(Algorithm::ES256, None, &ec());
        assert_eq!(v.verify(&no_kid).unwrap().sub, "alice");
        // A key without kid is not picked by a token naming some kid.
        let named = token(Algorithm::ES256, Some("ec-1"), &ec());
        assert_eq!(v.verify(&named), Err(VerifyError::UnknownKey));
    }

    #[tokio::test]
    async fn an_unknown_kid_fetches_again_at_most_once_per_interval() {
        let server = JwksServer::start(Reply::Body(first_set())).await;
        let v = verifier(JwksSettings {
            min_refresh_interval: Duration::from_secs(1),
            ..settings(&server.url)
        })
        .await;
        assert_eq!(server.hits(), 1);
        // The start-up fetch counts too.
        let early = token(Algorithm::ES256, Some("early"), &ec());
        assert_eq!(v.verify_fresh(&early).await, Err(VerifyError::UnknownKey));
        assert_eq!(server.hits(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;

        // A burst of made-up kids, all at once: one fetch between them.
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let v = v.clone();
                let t = token(Algorithm::ES256, Some(&format!("junk-{i}")), &ec());
                tokio::spawn(async move { v.verify_fresh(&t).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Err(VerifyError::UnknownKey));
        }
        assert_eq!(server.hits(), 2);
        let t = token(Algorithm::ES256, Some("junk-again"), &ec());
        assert_eq!(v.verify_fresh(&t).await, Err(VerifyError::UnknownKey));
        assert_eq!(server.hits(), 2, "fetched again within the interval");

        // Once the interval has passed, an unknown kid may fetch again: the rotated set.
        server.set(Reply::Body(set_json(&[jwk(
            &ec2(),
            Algorithm::ES256,
            Some("ec-2"),
        )])));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let rotated = token(Algorithm::ES256, Some("ec-2"), &ec2());
        assert_eq!(v.verify(&rotated), Err(VerifyError::UnknownKey));
        assert_eq!(v.verify_fresh(&rotated).await.unwrap().sub, "alice");
        assert_eq!(server.hits(), 3);
        // The old keys left with the old set.
        let old = token(Algorithm::ES256, Some("ec-1"), &ec());
        assert_eq!(v.verify_fresh(&old).await, Err(VerifyError::UnknownKey));
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test]
    async fn periodic_refresh_rotates_keys_and_a_failed_refresh_keeps_them() {
        let server = JwksServer::start(Reply::Body(first_set())).await;
        let jwks = Jwks::start(JwksSettings {
            refresh_interval: Duration::from_millis(200),
            min_refresh_interval: Duration::ZERO,
            ..settings(&server.url)
        })
        .await
        .unwrap();
        let v = Verifier::from_jwks(jwks.clone());
        let rs = token(Algorithm::RS256, Some("rsa-1"), &rsa());

        // Failing refreshes (an error status, then garbage) keep the keys.
        server.set(Reply::Status(503));
        let hits = server.hits();
        wait_until(|| server.hits() >= hits + 2).await;
        server.set(Reply::Body(b"<html>login</html>".to_vec()));
        let hits = server.hits();
        wait_until(|| server.hits() >= hits + 2).await;
        assert_eq!(v.verify(&rs).unwrap().sub, "alice");
        // So does a failing refresh for an unknown kid.
        let unknown = token(Algorithm::RS256, Some("rsa-9"), &rsa());
        assert_eq!(v.verify_fresh(&unknown).await, Err(VerifyError::UnknownKey));
        assert_eq!(v.verify(&rs).unwrap().sub, "alice");

        // The next good answer replaces the set without any token asking.
        server.set(Reply::Body(set_json(&[jwk(
            &ec2(),
            Algorithm::ES256,
            Some("ec-2"),
        )])));
        wait_until(|| jwks.current().kids() == ["ec-2"]).await;
        let rotated = token(Algorithm::ES256, Some("ec-2"), &ec2());
        assert_eq!(v.verify(&rotated).unwrap().sub, "alice");
        assert_eq!(v.verify(&rs), Err(VerifyError::UnknownKey));

        // The refresh task ends with the last handle.
        drop((v, jwks));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hits = server.hits();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(server.hits(), hits);
    }

    async fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_error(settings: JwksSettings) -> (JwksError, String) {
        let err = Jwks::start(settings).await.unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        (err, text)
    }

    #[tokio::test]
    async fn start_up_fails_clearly_after_a_few_tries() {
        // Nothing listens.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/jwks.json");
        let (err, text) = start_error(settings(&url)).await;
        assert!(
            matches!(
                err,
                JwksError::Unavailable {
                    tries: 3,
                    error: FetchError::Request(_),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            text.starts_with(&format!("JWKS_URL {url}: request failed")),
            "{text}"
        );
        assert!(text.contains("refused"), "{text}");

        let cases = [
            (Reply::Status(404), FetchError::Status(404)),
            (
                Reply::Body(b"not json".to_vec()),
                FetchError::NotJwks(String::new()),
            ),
            (
                Reply::Body(br#"{"keys": []}"#.to_vec()),
                FetchError::NoUsableKeys,
            ),
            (
                Reply::Body(set_json(&[
                    json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"}),
                ])),
                FetchError::NoUsableKeys,
            ),
            (
                Reply::Body(vec![b' '; MAX_JWKS_BYTES + 1]),
                FetchError::TooLarge,
            ),
            (Reply::Hang, FetchError::Timeout(Duration::from_millis(300))),
        ];
        for (reply, expected) in cases {
            let server = JwksServer::start(reply).await;
            let (err, text) = start_error(JwksSettings {
                timeout: Duration::from_millis(300),
                ..settings(&server.url)
            })
            .await;
            let JwksError::Unavailable { error, tries, .. } = err else {
                panic!("{err:?}");
            };
            assert_eq!(tries, 3);
            assert_eq!(server.hits(), 3, "{text}");
            match expected {
                FetchError::NotJwks(_) => {
                    assert!(matches!(error, FetchError::NotJwks(_)), "{text}")
                }
                expected => assert_eq!(error, expected, "{text}"),
            }
        }

        for bad in ["", "jwks.json", "ftp://h/jwks", "http://", "http:///x"] {
            assert!(
                matches!(
                    Jwks::start(settings(bad)).await,
                    Err(JwksError::BadUrl { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_set_is_read_key_by_key() {
        let rsa_jwk = jwk(&rsa(), Algorithm::RS256, Some("rsa-1"));
        let mut small_rsa = rsa_jwk.clone();
        small_rsa["kid"] = json!("small");
        small_rsa["n"] = json!("AQAB".repeat(40));
        let mut rs512 = rsa_jwk.clone();
        rs512["kid"] = json!("rs512");
        rs512["alg"] = json!("RS512");
        let mut enc = rsa_jwk.clone();
        enc["kid"] = json!("enc");
        enc["use"] = json!("enc");
        let mut off_curve = jwk(&ec(), Algorithm::ES256, Some("off-curve"));
        off_curve["y"] = off_curve["x"].clone();
        let mut duplicate = jwk(&ec(), Algorithm::ES256, Some("rsa-1"));
        duplicate["use"] = json!("sig");
        let body = set_json(&[
            json!({"kty": "unheard-of", "kid": "odd"}),
            json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}),
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}),
            json!("not even an object"),
            small_rsa,
            rs512,
            enc,
            off_curve,
            rsa_jwk,
            duplicate,
            jwk(&ec(), Algorithm::ES256, Some("ec-1")),
        ]);
        let set = KeySet::from_json(&body).unwrap();
        assert_eq!(set.kids(), ["ec-1", "rsa-1"]);
        // The first of two keys with one kid wins.
        match set.select(Some("rsa-1")) {
            Selected::Key(key) => assert_eq!(key.algorithm, Algorithm::RS256),
            _ => panic!("rsa-1 not selected"),
        }
        assert!(matches!(set.select(Some("p384")), Selected::Unknown));
        assert!(matches!(set.select(None), Selected::NoKid));

        // A JwkSet as the library writes it reads back.
        let mut library = JwkSet { keys: Vec::new() };
        let mut key = Jwk::from_encoding_key(&ec2(), Algorithm::ES256).unwrap();
        key.common.key_id = Some("ec-2".into());
        library.keys.push(key);
        let set = KeySet::from_json(&serde_json::to_vec(&library).unwrap()).unwrap();
        assert_eq!(set.kids(), ["ec-2"]);

        assert!(matches!(
            KeySet::from_json(br#"{"nokeys": 1}"#),
            Err(FetchError::NotJwks(_))
        ));
    }
}
