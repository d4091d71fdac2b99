//! The OCI distribution protocol over HTTP: configuration, authentication, retries, and the
//! requests pulls and pushes are made of.
//!
//! - **Transport.** One `reqwest` client (hyper, rustls with the ring provider and the platform's
//!   trust store; no OpenSSL). Registries on loopback and registries listed as insecure are spoken
//!   to over plain HTTP; every other one over HTTPS. Loopback requests never go through a proxy.
//! - **Authentication.** Anonymous first. On `401` the `WWW-Authenticate` challenge decides:
//!   `Bearer` → a token from the realm (with the registry's basic credentials, if configured) for
//!   `repository:REPO:pull` (or `pull,push`), cached per registry and repository; `Basic` → the
//!   configured username and password. A static token credential is sent as `Bearer` from the start.
//! - **Retries.** Connection failures, timeouts, `408`, `429`, `5xx` and bodies that break off are
//!   retried with exponential backoff (with jitter, `Retry-After` honoured up to the maximum
//!   backoff); everything else fails at once. The last failure becomes the error.
//! - **Limits.** Manifests are read into memory only up to a cap (4 MiB by default), checked
//!   against `Content-Length` first and while streaming; blobs stream to the cache under their own
//!   limit (see [`crate::blobs`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use crate::blobs::{BlobError, BlobStore};
use crate::digest::Digest;
use crate::manifest::{self, Descriptor, ManifestError};
use crate::progress::{PROGRESS_STEP, Progress, PullEvent};
use crate::reference::{Reference, ReferenceError, is_loopback_registry};

/// How to reach registries: which may use plain HTTP, credentials, retries, limits.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Registries (`HOST[:PORT]`, as in references) spoken to over plain HTTP. Loopback registries
    /// always are.
    pub insecure: Vec<String>,
    /// Credentials by registry (`HOST[:PORT]`).
    pub credentials: BTreeMap<String, Credentials>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Size limits.
    pub limits: Limits,
    /// Layers downloaded at the same time by one pull (at least 1).
    pub max_concurrent_downloads: usize,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for a response to go silent (per read, not per transfer).
    pub read_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            credentials: BTreeMap::new(),
            retry: RetryPolicy::default(),
            limits: Limits::default(),
            max_concurrent_downloads: 3,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password: HTTP basic auth, or exchanged for a bearer token at the realm.
    Basic { username: String, password: String },
    /// A ready bearer token, sent as is.
    Token(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// Exponential backoff: `initial_backoff × 2^(n-1)` after the n-th failure, at most
/// `max_backoff`, scaled by a random factor in [0.5, 1].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total (at least 1).
    pub attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failed`-th failed attempt (1-based).
    pub fn backoff(&self, failed: u32) -> Duration {
        let factor = 1u32 << failed.saturating_sub(1).min(20);
        let base = self.initial_backoff.saturating_mul(factor).min(self.max_backoff);
        // Jitter in [0.5, 1] so that many agents retrying the same registry spread out.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let jitter = 0.5 + (random % 1000) as f64 / 2000.0;
        base.mul_f64(jitter)
    }
}

/// Size limits that keep a hostile or broken registry from exhausting memory or disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest or index read (into memory).
    pub max_manifest_bytes: u64,
    /// Largest image config read (into memory).
    pub max_config_bytes: u64,
    /// Largest single blob (streamed to disk).
    pub max_blob_bytes: u64,
    /// Most layers in one image.
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 8 << 20,
            max_blob_bytes: 16 << 30,
            max_layers: 256,
        }
    }
}

/// What went wrong talking to a registry, pulling or pushing. Messages are for users.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The repository, tag or digest does not exist in the registry.
    #[error("image not found: {image} in {registry}")]
    NotFound { image: String, registry: String },
    /// A blob the manifest names is missing from the registry.
    #[error("blob {digest} of {repository} not found in {registry}")]
    BlobNotFound {
        digest: Digest,
        repository: String,
        registry: String,
    },
    /// No connection could be made (or kept) for any attempt.
    #[error("registry {registry} unreachable after {attempts} attempts")]
    Unreachable {
        registry: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status (after retries, if the status is transient).
    #[error("registry {registry} answered HTTP {status} to {what} after {attempts} attempts")]
    Status {
        registry: String,
        status: u16,
        what: String,
        attempts: u32,
    },
    /// Authentication failed or access is denied.
    #[error("registry {registry} denied access to {image}: {reason}")]
    Unauthorized {
        registry: String,
        image: String,
        reason: String,
    },
    /// A blob's body ended before all its bytes arrived, on every attempt.
    #[error("blob {digest} truncated: got {got} of {expected} bytes after {attempts} attempts")]
    Truncated {
        digest: Digest,
        got: u64,
        expected: u64,
        attempts: u32,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// A manifest larger than [`Limits::max_manifest_bytes`].
    #[error("manifest of {image} exceeds the size limit of {limit} bytes")]
    ManifestTooLarge { image: String, limit: u64 },
    /// A manifest fetched by digest hashes to another digest.
    #[error("digest mismatch for manifest {expected}: got {actual}")]
    ManifestDigestMismatch { expected: Digest, actual: Digest },
    /// A media type aloft does not handle.
    #[error("unsupported media type {media_type} for {what}")]
    UnsupportedMediaType { media_type: String, what: String },
    /// An index without a linux/amd64 image.
    #[error("no linux/amd64 image in the index for {image}")]
    NoPlatform { image: String },
    /// A single-platform image built for another platform.
    #[error("image {image} is for {platform}, not linux/amd64")]
    WrongPlatform { image: String, platform: String },
    /// A manifest or config that cannot be parsed or used.
    #[error("bad manifest or config for {image}")]
    Manifest {
        image: String,
        #[source]
        source: ManifestError,
    },
    /// A blob failed verification or could not be stored.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// An invalid reference.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The registry broke the protocol (missing header, bad token response, …).
    #[error("registry {registry} broke the protocol: {reason}")]
    Protocol { registry: String, reason: String },
    /// The local image records could not be read or written.
    #[error("image records: {what} {path}")]
    Records {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An OCI layout directory (push source) is not usable.
    #[error("OCI layout {path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    /// The HTTP client could not be built.
    #[error("set up the HTTP client")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A background task died.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl RegistryError {
    /// Converts a manifest parsing error, naming the image.
    pub(crate) fn manifest(image: &Reference, e: ManifestError) -> Self {
        match e {
            ManifestError::UnsupportedMediaType { media_type, what } => Self::UnsupportedMediaType {
                media_type,
                what: format!("{what} of {image}"),
            },
            other => Self::Manifest {
                image: image.to_string(),
                source: other,
            },
        }
    }
}

/// Why one attempt failed: retry, or give up.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another attempt.
    Transient(Transient),
    /// Final.
    Fatal(RegistryError),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Self::Fatal(e)
    }
}

impl From<BlobError> for Failure {
    fn from(e: BlobError) -> Self {
        Self::Fatal(RegistryError::Blob(e))
    }
}

#[derive(Debug)]
pub(crate) enum Transient {
    /// No usable response.
    Connect(reqwest::Error),
    /// A transient status.
    Status {
        status: StatusCode,
        what: String,
        retry_after: Option<Duration>,
    },
    /// The body ended early.
    Truncated {
        digest: Digest,
        got: u64,
        expected: u64,
        source: Option<reqwest::Error>,
    },
}

impl Transient {
    fn into_error(self, registry: &str, attempts: u32) -> RegistryError {
        match self {
            Self::Connect(source) => RegistryError::Unreachable {
                registry: registry.to_owned(),
                attempts,
                source,
            },
            Self::Status { status, what, .. } => RegistryError::Status {
                registry: registry.to_owned(),
                status: status.as_u16(),
                what,
                attempts,
            },
            Self::Truncated {
                digest,
                got,
                expected,
                source,
            } => RegistryError::Truncated {
                digest,
                got,
                expected,
                attempts,
                source,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Connect(e) => error_chain(e),
            Self::Status { status, what, .. } => format!("HTTP {status} to {what}"),
            Self::Truncated { got, expected, .. } => {
                format!("body ended after {got} of {expected} bytes")
            }
        }
    }
}

/// `error: cause: cause…` on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn transient_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An HTTP method and URL in messages: `GET /v2/repo/manifests/tag`.
fn what(method: &Method, url: &Url) -> String {
    format!("{method} {}", url.path())
}

/// A request to send (and possibly send again after authenticating).
struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

/// Registry client shared by pulls and pushes. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    proxied: reqwest::Client,
    direct: reqwest::Client,
    config: RegistryConfig,
    /// `Authorization` values by (registry, repository, push?).
    auth: Mutex<HashMap<(String, String, bool), HeaderValue>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let build = |proxy: bool| -> Result<reqwest::Client, RegistryError> {
            let tls = aloft_tls::client_config().map_err(|e| RegistryError::Client(Box::new(e)))?;
            let mut builder = reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .connect_timeout(config.connect_timeout)
                .read_timeout(config.read_timeout)
                .user_agent(concat!("aloft/", env!("CARGO_PKG_VERSION")));
            if !proxy {
                builder = builder.no_proxy();
            }
            builder.build().map_err(|e| RegistryError::Client(Box::new(e)))
        };
        Ok(Self {
            inner: Arc::new(ClientInner {
                proxied: build(true)?,
                direct: build(false)?,
                config,
                auth: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub(crate) fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// `http(s)://HOST/v2/REPO/` + `rest`.
    pub(crate) fn url(&self, image: &Reference, rest: &str) -> Result<Url, RegistryError> {
        let plain = image.is_loopback()
            || self
                .inner
                .config
                .insecure
                .iter()
                .any(|r| r.eq_ignore_ascii_case(image.registry()));
        let scheme = if plain { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/{}/{rest}", image.api_host(), image.repository());
        Url::parse(&url).map_err(|e| RegistryError::Protocol {
            registry: image.registry().to_owned(),
            reason: format!("bad URL {url}: {e}"),
        })
    }

    fn http(&self, url: &Url) -> &reqwest::Client {
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        if is_loopback_registry(&host) {
            &self.inner.direct
        } else {
            &self.inner.proxied
        }
    }

    fn unauthorized(image: &Reference, reason: impl Into<String>) -> Failure {
        Failure::Fatal(RegistryError::Unauthorized {
            registry: image.registry().to_owned(),
            image: image.name_in_registry(),
            reason: reason.into(),
        })
    }

    /// Sends `req`, authenticating on a `401` challenge and sending it once more. Returns any
    /// response but a `401`.
    async fn send(&self, image: &Reference, push: bool, req: &Request) -> Result<reqwest::Response, Failure> {
        let key = (image.registry().to_owned(), image.repository().to_owned(), push);
        let credentials = self.inner.config.credentials.get(image.registry()).cloned();
        let cached = {
            let auth = self.inner.auth.lock().unwrap_or_else(|e| e.into_inner());
            auth.get(&key).cloned()
        };
        let mut authorization = cached.or_else(|| match &credentials {
            Some(Credentials::Token(token)) => HeaderValue::from_str(&format!("Bearer {token}")).ok(),
            _ => None,
        });
        let mut authenticated = false;
        loop {
            let mut builder = self
                .http(&req.url)
                .request(req.method.clone(), req.url.clone())
                .headers(req.headers.clone());
            if let Some(value) = &authorization {
                builder = builder.header(header::AUTHORIZATION, value.clone());
            }
            if let Some(body) = &req.body {
                builder = builder.body(body.clone());
            }
            let response = builder.send().await.map_err(classify_send_error)?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            if authenticated {
                return Err(Self::unauthorized(
                    image,
                    if credentials.is_some() {
                        "the credentials were rejected"
                    } else {
                        "authentication required: configure credentials for this registry"
                    },
                ));
            }
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(parse_challenge);
            let value = match challenge {
                Some(Challenge::Bearer(params)) => {
                    self.fetch_token(image, push, &params, credentials.as_ref())
                        .await?
                }
                Some(Challenge::Basic) => match &credentials {
                    Some(Credentials::Basic { username, password }) => basic_auth(username, password),
                    _ => {
                        return Err(Self::unauthorized(
                            image,
                            "basic authentication required: configure credentials for this registry",
                        ));
                    }
                },
                _ => {
                    return Err(Self::unauthorized(
                        image,
                        "unsupported or missing authentication challenge",
                    ));
                }
            };
            {
                let mut auth = self.inner.auth.lock().unwrap_or_else(|e| e.into_inner());
                auth.insert(key.clone(), value.clone());
            }
            authorization = Some(value);
            authenticated = true;
        }
    }

    async fn fetch_token(
        &self,
        image: &Reference,
        push: bool,
        params: &HashMap<String, String>,
        credentials: Option<&Credentials>,
    ) -> Result<HeaderValue, Failure> {
        let registry = image.registry().to_owned();
        let protocol = |reason: String| {
            Failure::Fatal(RegistryError::Protocol {
                registry: registry.clone(),
                reason,
            })
        };
        let realm = params
            .get("realm")
            .ok_or_else(|| protocol("bearer challenge without a realm".to_owned()))?;
        let mut url =
            Url::parse(realm).map_err(|e| protocol(format!("bearer realm {realm:?} is not a URL: {e}")))?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(protocol(format!("bearer realm {realm:?} is not HTTP(S)")));
        }
        let actions = if push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", image.repository());
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", &scope);
        }
        let mut builder = self.http(&url).get(url.clone());
        if let Some(Credentials::Basic { username, password }) = credentials {
            builder = builder.basic_auth(username, Some(password));
        }
        let response = builder.send().await.map_err(classify_send_error)?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Self::unauthorized(
                image,
                format!("the token service answered HTTP {status}"),
            ));
        }
        if transient_status(status) {
            return Err(Failure::Transient(Transient::Status {
                status,
                what: what(&Method::GET, &url),
                retry_after: retry_after(response.headers()),
            }));
        }
        if !status.is_success() {
            return Err(protocol(format!("token service answered HTTP {status}")));
        }
        let body = read_capped(response, 1 << 20)
            .await?
            .ok_or_else(|| protocol("token response over 1 MiB".to_owned()))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| protocol(format!("token response is not JSON: {e}")))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| protocol("token response without a token".to_owned()))?;
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| protocol("token with characters not allowed in a header".to_owned()))
    }

    /// Runs `op` until it succeeds, fails fatally, or the attempts run out.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        registry: &str,
        what: &str,
        progress: &Progress,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let policy = &self.inner.config.retry;
        let attempts = policy.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(t)) => {
                    if attempt >= attempts {
                        return Err(t.into_error(registry, attempt));
                    }
                    let retry_after = match &t {
                        Transient::Status { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let delay = retry_after
                        .unwrap_or_else(|| policy.backoff(attempt))
                        .min(policy.max_backoff);
                    progress.emit(PullEvent::Retrying {
                        what: what.to_owned(),
                        attempt,
                        delay,
                        error: t.describe(),
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Fetches a manifest (by tag or digest) into memory: body, `Content-Type`, and the digest of
    /// the body (checked against the reference's digest when it has one).
    pub(crate) async fn get_manifest(
        &self,
        image: &Reference,
        progress: &Progress,
    ) -> Result<(Vec<u8>, Option<String>, Digest), RegistryError> {
        let url = self.url(image, &format!("manifests/{}", image.api_reference()))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.manifest.v1+json, \
                 application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
            ),
        );
        let req = Request {
            method: Method::GET,
            url,
            headers,
            body: None,
        };
        let limit = self.inner.config.limits.max_manifest_bytes;
        let (body, content_type) = self
            .retry(
                image.registry(),
                &what(&req.method, &req.url),
                progress,
                || async {
                    let response = self.send(image, false, &req).await?;
                    let status = response.status();
                    if status == StatusCode::NOT_FOUND {
                        return Err(Failure::Fatal(RegistryError::NotFound {
                            image: image.name_in_registry(),
                            registry: image.registry().to_owned(),
                        }));
                    }
                    check_status(image, &req, &response)?;
                    let content_type = response
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body = read_capped(response, limit).await?.ok_or_else(|| {
                        Failure::Fatal(RegistryError::ManifestTooLarge {
                            image: image.to_string(),
                            limit,
                        })
                    })?;
                    Ok((body, content_type))
                },
            )
            .await?;
        let digest = Digest::of(&body);
        if let Some(expected) = image.digest()
            && expected != &digest
        {
            return Err(RegistryError::ManifestDigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        Ok((body, content_type, digest))
    }

    /// Downloads the blob `desc` into the cache, verifying size and digest while streaming;
    /// returns its path. `limit` caps the size whatever the descriptor says.
    pub(crate) async fn fetch_blob(
        &self,
        image: &Reference,
        desc: &Descriptor,
        limit: u64,
        store: &BlobStore,
        progress: &Progress,
    ) -> Result<PathBuf, RegistryError> {
        if store.contains(&desc.digest, desc.size) {
            progress.emit(PullEvent::BlobCached {
                digest: desc.digest.clone(),
                size: desc.size,
            });
            return Ok(store.path(&desc.digest));
        }
        if desc.size > limit {
            return Err(BlobError::TooLarge {
                digest: desc.digest.clone(),
                size: desc.size,
                limit,
            }
            .into());
        }
        let req = Request {
            method: Method::GET,
            url: self.url(image, &format!("blobs/{}", desc.digest))?,
            headers: HeaderMap::new(),
            body: None,
        };
        let label = format!("blob {}", desc.digest);
        let path = self
            .retry(image.registry(), &label, progress, || {
                self.fetch_blob_once(image, desc, limit, store, progress, &req)
            })
            .await?;
        progress.emit(PullEvent::BlobDone {
            digest: desc.digest.clone(),
            size: desc.size,
        });
        Ok(path)
    }

    async fn fetch_blob_once(
        &self,
        image: &Reference,
        desc: &Descriptor,
        limit: u64,
        store: &BlobStore,
        progress: &Progress,
        req: &Request,
    ) -> Result<PathBuf, Failure> {
        let mut response = self.send(image, false, req).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(Failure::Fatal(RegistryError::BlobNotFound {
                digest: desc.digest.clone(),
                repository: image.repository().to_owned(),
                registry: image.registry().to_owned(),
            }));
        }
        check_status(image, req, &response)?;
        if let Some(length) = response.content_length()
            && length > desc.size
        {
            return Err(BlobError::Oversized {
                digest: desc.digest.clone(),
                expected: desc.size,
            }
            .into());
        }

        // Hashing and writing happen on a blocking thread, fed through a small channel.
        enum Chunk {
            Data(Bytes),
            End,
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(16);
        let writer_store = store.clone();
        let (digest, size) = (desc.digest.clone(), desc.size);
        let writer = tokio::task::spawn_blocking(move || -> Result<PathBuf, Option<BlobError>> {
            let mut w = writer_store.writer(&digest, Some(size), limit)?;
            while let Some(chunk) = rx.blocking_recv() {
                match chunk {
                    Chunk::Data(data) => w.write_chunk(&data)?,
                    Chunk::End => return Ok(w.commit()?),
                }
            }
            // The sender went away without finishing: abandon (the writer cleans up).
            Err(None)
        });

        let mut received: u64 = 0;
        let mut reported: u64 = 0;
        let mut body_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(data)) => {
                    received = received.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                    if tx.send(Chunk::Data(data)).await.is_err() {
                        break; // the writer failed; its error is below
                    }
                    if received - reported >= PROGRESS_STEP {
                        reported = received;
                        progress.emit(PullEvent::BlobProgress {
                            digest: desc.digest.clone(),
                            transferred: received,
                            size: desc.size,
                        });
                    }
                }
                Ok(None) => {
                    // A short body is a transfer problem (retried); a wrong one is not.
                    if received < desc.size {
                        break;
                    }
                    if received > reported {
                        progress.emit(PullEvent::BlobProgress {
                            digest: desc.digest.clone(),
                            transferred: received,
                            size: desc.size,
                        });
                    }
                    let _ = tx.send(Chunk::End).await;
                    break;
                }
                Err(e) => {
                    body_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| Failure::Fatal(RegistryError::Task(e)))?;
        match written {
            Ok(path) => Ok(path),
            Err(Some(e)) => Err(e.into()),
            Err(None) => Err(Failure::Transient(Transient::Truncated {
                digest: desc.digest.clone(),
                got: received,
                expected: desc.size,
                source: body_error,
            })),
        }
    }

    /// Fetches a small blob (a config) into memory, stores it in the cache, and returns it.
    pub(crate) async fn fetch_small_blob(
        &self,
        image: &Reference,
        desc: &Descriptor,
        limit: u64,
        store: &BlobStore,
        progress: &Progress,
    ) -> Result<Vec<u8>, RegistryError> {
        if store.contains(&desc.digest, desc.size)
            && let Ok(data) = store.read(&desc.digest, limit)
        {
            progress.emit(PullEvent::BlobCached {
                digest: desc.digest.clone(),
                size: desc.size,
            });
            return Ok(data);
        }
        self.fetch_blob(image, desc, limit, store, progress).await?;
        let store = store.clone();
        let digest = desc.digest.clone();
        let data = tokio::task::spawn_blocking(move || store.read(&digest, limit))
            .await
            .map_err(RegistryError::Task)??;
        Ok(data)
    }

    /// Whether the registry has the blob `digest` in `image`'s repository.
    pub(crate) async fn blob_exists(
        &self,
        image: &Reference,
        digest: &Digest,
        progress: &Progress,
    ) -> Result<bool, RegistryError> {
        let req = Request {
            method: Method::HEAD,
            url: self.url(image, &format!("blobs/{digest}"))?,
            headers: HeaderMap::new(),
            body: None,
        };
        self.retry(
            image.registry(),
            &what(&req.method, &req.url),
            progress,
            || async {
                let response = self.send(image, true, &req).await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Ok(false);
                }
                check_status(image, &req, &response)?;
                Ok(true)
            },
        )
        .await
    }

    /// Uploads a blob read by `read(offset, len)` (size `size`) as `digest`: monolithically when
    /// it fits in one chunk, else in `PATCH` chunks of `chunk_size` and a closing `PUT`.
    pub(crate) async fn upload_blob<R, Fut>(
        &self,
        image: &Reference,
        digest: &Digest,
        size: u64,
        chunk_size: u64,
        read: R,
        progress: &Progress,
    ) -> Result<(), RegistryError>
    where
        R: Fn(u64, u64) -> Fut,
        Fut: Future<Output = Result<Bytes, RegistryError>>,
    {
        let label = format!("upload of blob {digest}");
        self.retry(image.registry(), &label, progress, || async {
            let start = Request {
                method: Method::POST,
                url: self.url(image, "blobs/uploads/")?,
                headers: HeaderMap::new(),
                body: None,
            };
            let response = self.send(image, true, &start).await?;
            check_status(image, &start, &response)?;
            let mut location = location(image, &start.url, &response)?;
            let chunk_size = chunk_size.max(1);
            let mut offset = 0;
            let mut last: Option<Bytes> = None;
            if size <= chunk_size {
                last = Some(read(0, size).await?);
            } else {
                while offset < size {
                    let len = chunk_size.min(size - offset);
                    let data = read(offset, len).await?;
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    if let Ok(range) = HeaderValue::from_str(&format!("{offset}-{}", offset + len - 1)) {
                        headers.insert(header::CONTENT_RANGE, range);
                    }
                    let patch = Request {
                        method: Method::PATCH,
                        url: location.clone(),
                        headers,
                        body: Some(data),
                    };
                    let response = self.send(image, true, &patch).await?;
                    check_status(image, &patch, &response)?;
                    location = self::location(image, &patch.url, &response)?;
                    offset += len;
                    progress.emit(PullEvent::BlobProgress {
                        digest: digest.clone(),
                        transferred: offset,
                        size,
                    });
                }
            }
            location
                .query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let put = Request {
                method: Method::PUT,
                url: location,
                headers,
                body: Some(last.unwrap_or_default()),
            };
            let response = self.send(image, true, &put).await?;
            check_status(image, &put, &response)?;
            Ok(())
        })
        .await?;
        progress.emit(PullEvent::BlobDone {
            digest: digest.clone(),
            size,
        });
        Ok(())
    }

    /// Stores a manifest under `image`'s tag (or digest); returns the manifest's digest.
    pub(crate) async fn put_manifest(
        &self,
        image: &Reference,
        media_type: &str,
        body: Bytes,
        progress: &Progress,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&body);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::UnsupportedMediaType {
                media_type: media_type.to_owned(),
                what: format!("manifest of {image}"),
            })?,
        );
        let req = Request {
            method: Method::PUT,
            url: self.url(image, &format!("manifests/{}", image.api_reference()))?,
            headers,
            body: Some(body),
        };
        self.retry(
            image.registry(),
            &what(&req.method, &req.url),
            progress,
            || async {
                let response = self.send(image, true, &req).await?;
                check_status(image, &req, &response)?;
                Ok(())
            },
        )
        .await?;
        Ok(digest)
    }
}

/// The `Location` of an upload response, resolved against the request URL.
fn location(image: &Reference, base: &Url, response: &reqwest::Response) -> Result<Url, Failure> {
    let value = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Failure::Fatal(RegistryError::Protocol {
                registry: image.registry().to_owned(),
                reason: format!("no Location in the answer to {}", what(&Method::POST, base)),
            })
        })?;
    base.join(value).map_err(|e| {
        Failure::Fatal(RegistryError::Protocol {
            registry: image.registry().to_owned(),
            reason: format!("bad Location {value:?}: {e}"),
        })
    })
}

/// Maps a non-success status to a failure (transient or not).
fn check_status(image: &Reference, req: &Request, response: &reqwest::Response) -> Result<(), Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::FORBIDDEN {
        return Err(Client::unauthorized(image, "HTTP 403 forbidden"));
    }
    if transient_status(status) {
        return Err(Failure::Transient(Transient::Status {
            status,
            what: what(&req.method, &req.url),
            retry_after: retry_after(response.headers()),
        }));
    }
    Err(Failure::Fatal(RegistryError::Status {
        registry: image.registry().to_owned(),
        status: status.as_u16(),
        what: what(&req.method, &req.url),
        attempts: 1,
    }))
}

fn classify_send_error(e: reqwest::Error) -> Failure {
    if e.is_builder() || e.is_redirect() {
        // Our own bad request or a redirect loop: trying again cannot help.
        Failure::Fatal(RegistryError::Client(Box::new(e)))
    } else {
        Failure::Transient(Transient::Connect(e))
    }
}

/// Reads a response body into memory; `None` when it is (or announces itself) longer than
/// `limit` bytes. A body that breaks off is a transient failure.
async fn read_capped(mut response: reqwest::Response, limit: u64) -> Result<Option<Vec<u8>>, Failure> {
    if response.content_length().is_some_and(|len| len > limit) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::Transient(Transient::Connect(e)))?
    {
        if u64::try_from(body.len() + chunk.len()).unwrap_or(u64::MAX) > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn basic_auth(username: &str, password: &str) -> HeaderValue {
    let encoded = BASE64.encode(format!("{username}:{password}").as_bytes());
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Bearer(HashMap<String, String>),
    Basic,
    Other,
}

/// Parses a `WWW-Authenticate` value: a scheme, then `key="value"` (or bare) pairs separated by
/// commas; quoted values may hold commas and `\"` escapes.
fn parse_challenge(value: &str) -> Challenge {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Other;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                val.push(escaped);
                            }
                        }
                        '"' => break,
                        c => val.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    val.push(c);
                    chars.next();
                }
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    Challenge::Bearer(params)
}

/// Checks a manifest's media type is one a push can send.
pub(crate) fn pushable_manifest(media_type: &str) -> bool {
    manifest::ACCEPTED_MANIFESTS.contains(&media_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        let Challenge::Bearer(p) = c else { panic!("{c:?}") };
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert_eq!(parse_challenge(r#"Basic realm="x""#), Challenge::Basic);
        assert_eq!(parse_challenge("Negotiate"), Challenge::Other);
        let Challenge::Bearer(p) = parse_challenge(r#"bearer realm="a\"b", error=invalid_token"#) else {
            panic!()
        };
        assert_eq!(p["realm"], "a\"b");
        assert_eq!(p["error"], "invalid_token");
        assert_eq!(parse_challenge("Bearer"), Challenge::Bearer(HashMap::new()));
        // Garbage never panics.
        for junk in [
            "",
            "Bearer ,,,=",
            "Bearer \"",
            "Bearer a=\"unterminated",
            "Bearer =x",
        ] {
            let _ = parse_challenge(junk);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for (n, max) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (30, 1000)] {
            let d = p.backoff(n);
            assert!(d <= Duration::from_millis(max), "{n}: {d:?}");
            assert!(d >= Duration::from_millis(max / 2), "{n}: {d:?}");
        }
    }

    #[test]
    fn credentials_are_redacted() {
        let c = Credentials::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Token("t0k".into())).contains("t0k"));
    }

    #[test]
    fn urls_use_http_only_for_loopback_and_insecure_registries() {
        let client = Client::new(RegistryConfig {
            insecure: vec!["registry.lan:5000".into()],
            ..RegistryConfig::default()
        })
        .unwrap();
        let url = |r: &str| {
            client
                .url(&Reference::parse(r).unwrap(), "manifests/x")
                .unwrap()
                .to_string()
        };
        assert_eq!(url("127.0.0.1:5000/a"), "http://127.0.0.1:5000/v2/a/manifests/x");
        assert_eq!(url("localhost/a"), "http://localhost/v2/a/manifests/x");
        assert_eq!(
            url("registry.lan:5000/a/b"),
            "http://registry.lan:5000/v2/a/b/manifests/x"
        );
        assert_eq!(url("registry.lan/a"), "https://registry.lan/v2/a/manifests/x");
        assert_eq!(
            url("debian"),
            "https://registry-1.docker.io/v2/library/debian/manifests/x"
        );
    }
}
