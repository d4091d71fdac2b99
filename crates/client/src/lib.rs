//! `aloft-client`: the typed async client of aloftd's Fly-compatible API.
//!
//! The `aloft` CLI (and anything else that drives the platform) talks to `aloftd` only through
//! this crate: `cli → client → api`. It speaks HTTP with the wire types of `aloft-api` and must
//! not depend on any server crate (`aloft-control`, `aloft-store`, `aloftd`, the agent …): what
//! it knows of the server is the API, nothing more.
//!
//! Endpoints: apps (`apps_*`, `app_*`), every machine endpoint of Fly's Machines API under the
//! same paths (`machines_list`, `machine_*`, `lease_*`, `metadata_*`; see `machines.rs`), and
//! aloft's log endpoint as a stream of [`aloft_api::LogEntry`] ([`Client::logs`]), and releases
//! (`release_create`, `releases_list`, `release_get`, `release_events` as a stream of
//! [`aloft_api::ReleaseEvent`], `release_rollback`; see `releases.rs`), secrets, certificates
//! and volumes (`volumes_list`, `volume_create`, `volume_get`, `volume_update`, `volume_extend`,
//! `volume_delete`, and a volume's snapshots: `volume_snapshots`, `create_volume_snapshot`; see
//! `volumes.rs`), interactive sessions ([`Client::console`]: an HTTP/1.1 upgrade to console
//! frames; see `console.rs`) and TCP connections to a machine's port ([`Client::proxy`]: an
//! upgrade to the raw stream; see `proxy.rs`). A lease's nonce goes with every request of
//! [`Client::with_lease_nonce`]'s client.
//!
//! Errors: a Fly error body (`{"error": "..."}`) becomes [`ClientError::Api`] with the HTTP status
//! and the server's message; a refused or failed connection becomes [`ClientError::Unreachable`],
//! which tells the user to start `aloftd`.
//!
//! Transport: one `reqwest` client (hyper, rustls with the ring provider and the platform's
//! verifier for `https` URLs), no proxy (aloftd is usually on loopback), a 5 s connect timeout and
//! a 60 s overall timeout per request, longer for waits and execs (what the server may hold them
//! plus some) and for requests that copy a volume's disk (snapshots, restores, forks: 30 min),
//! and none worth the name for followed logs.

use std::sync::Arc;
use std::time::Duration;

use aloft_api::{App, CreateAppRequest, ErrorResponse, LEASE_NONCE_HEADER, ListAppsResponse};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod certs;
mod console;
mod logs;
mod machines;
mod platform;
mod proxy;
mod releases;
mod secrets;
mod volumes;

pub use console::{ConsoleConnection, ConsoleError, ConsoleReader, ConsoleWriter};
pub use logs::{LogStream, LogsQuery, NdjsonStream};
pub use machines::{ListMachinesParams, RestartParams, WaitParams};
pub use proxy::ProxyStream;
pub use releases::ReleaseEventStream;

/// Longest a single request may take unless it says otherwise (waits, execs and log streams do).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What can go wrong talking to aloftd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error status; `message` is the server's (Fly error body).
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status code.
        status: u16,
        /// The server's message, or the status's reason when the body had none.
        message: String,
    },
    /// Nothing answered at the API URL.
    #[error("aloftd is not reachable at {url} (is it running? start it with `aloftd`)")]
    Unreachable {
        /// The API base URL.
        url: String,
        /// The connection error.
        #[source]
        source: reqwest::Error,
    },
    /// The connection was made but the request failed (timeout, reset, …).
    #[error("request to aloftd at {url} failed")]
    Transport {
        /// The API base URL.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// A success status with a body that is not what the API promises.
    #[error("unexpected answer from aloftd at {url} (HTTP {status}): {source}")]
    Decode {
        /// The API base URL.
        url: String,
        /// HTTP status code.
        status: u16,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// An upgrade request (a console, a TCP proxy) was answered with a success status instead
    /// of `101 Switching Protocols` (something between the CLI and aloftd does not pass upgrades
    /// on).
    #[error(
        "aloftd at {url} answered HTTP {status} instead of switching the connection to {protocol}: \
         something between here and aloftd does not pass HTTP upgrades on; talk to aloftd directly"
    )]
    Upgrade {
        /// The API base URL.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The `Upgrade` token asked for (`aloft-console`, `aloft-tcp`).
        protocol: &'static str,
    },
    /// The base URL is not an `http://` or `https://` URL.
    #[error("invalid API URL {url:?}: {reason}")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The token cannot be sent in an HTTP header.
    #[error("invalid API token: it is empty or contains whitespace or control characters")]
    InvalidToken,
    /// TLS could not be set up.
    #[error("set up TLS")]
    Tls(#[source] rustls::Error),
    /// The HTTP client could not be set up.
    #[error("set up the HTTP client")]
    Setup(#[source] reqwest::Error),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the API said 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether the API said 408: a `wait` whose time ran out before the state was reached
    /// ("not yet", not a failure).
    pub fn is_wait_timeout(&self) -> bool {
        self.status() == Some(408)
    }
}

/// A client of one aloftd API, acting with one token. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
    token: Arc<str>,
    /// Sent as `fly-machine-lease-nonce` on every request (see [`Client::with_lease_nonce`]).
    nonce: Option<Arc<str>>,
}

impl Client {
    /// A client of the API at `base_url` (`http://127.0.0.1:4280`) sending `token` as
    /// `Authorization: Bearer <token>`.
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientError> {
        let base = base_url.trim().trim_end_matches('/');
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(base).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("use http://HOST:PORT or https://HOST"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("no query or fragment allowed"));
        }
        let token = token.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ClientError::InvalidToken);
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(aloft_tls::client_config().map_err(ClientError::Tls)?)
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("aloft/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Self {
            http,
            base: base.into(),
            token: token.into(),
            nonce: None,
        })
    }

    /// This client proving a lease: every request carries `fly-machine-lease-nonce: NONCE`
    /// (mutations of a leased machine need it; `None` sends none).
    pub fn with_lease_nonce(&self, nonce: Option<&str>) -> Self {
        Self {
            nonce: nonce.map(str::trim).filter(|n| !n.is_empty()).map(Arc::from),
            ..self.clone()
        }
    }

    /// The API base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/apps?org_slug=ORG`: the apps of an organization.
    pub async fn apps_list(&self, org: &str) -> Result<ListAppsResponse, ClientError> {
        let path = format!("/v1/apps?org_slug={}", encode(org));
        self.json(Method::GET, &path, None).await
    }

    /// `GET /v1/apps/NAME`.
    pub async fn app_get(&self, name: &str) -> Result<App, ClientError> {
        self.json(Method::GET, &format!("/v1/apps/{}", encode(name)), None)
            .await
    }

    /// `POST /v1/apps`: creates an app and returns it.
    pub async fn app_create(&self, request: &CreateAppRequest) -> Result<App, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, "/v1/apps", Some(body)).await
    }

    /// `DELETE /v1/apps/NAME`: destroys an app.
    pub async fn app_delete(&self, name: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/v1/apps/{}", encode(name)), None)
            .await
            .map(drop)
    }

    /// A request body as JSON.
    fn body<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, ClientError> {
        serde_json::to_vec(value).map_err(|source| ClientError::Decode {
            url: self.base.to_string(),
            status: 0,
            source,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.json_within(method, path, body, REQUEST_TIMEOUT).await
    }

    /// [`Client::json`] with its own time limit.
    async fn json_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.send_within(method, path, body, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            url: self.base.to_string(),
            status: status.as_u16(),
            source,
        })
    }

    /// Sends a request; a success status gives the body, any other an [`ClientError::Api`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        self.send_within(method, path, body, REQUEST_TIMEOUT).await
    }

    async fn send_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let response = self
            .start(method, path, body, timeout, "application/json")
            .await?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        Ok((status, bytes.to_vec()))
    }

    /// Sends a request and returns the response once its head is in: a success status leaves
    /// the body to read, any other is read and becomes an [`ClientError::Api`].
    async fn start(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        accept: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", accept);
        if let Some(nonce) = &self.nonce {
            request = request.header(LEASE_NONCE_HEADER, nonce.as_ref());
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            Ok(response)
        } else {
            let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
            Err(api_error(status, &bytes))
        }
    }

    /// `GET path` upgraded to `protocol` (`Connection: upgrade`, `Upgrade: PROTOCOL`): the
    /// connection once the server answered `101 Switching Protocols`. Any error status is an
    /// [`ClientError::Api`]; a success status other than 101 is a [`ClientError::Upgrade`].
    /// The time limit covers the answer's head; the upgraded connection has none.
    async fn upgrade(&self, path: &str, protocol: &'static str) -> Result<reqwest::Upgraded, ClientError> {
        let mut builder = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT)
            .header("authorization", format!("Bearer {}", self.token))
            .header("connection", "upgrade")
            .header("upgrade", protocol);
        if let Some(nonce) = &self.nonce {
            builder = builder.header(LEASE_NONCE_HEADER, nonce.as_ref());
        }
        let response = builder.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return response.upgrade().await.map_err(|e| self.transport(e));
        }
        if status.is_success() {
            return Err(ClientError::Upgrade {
                url: self.base.to_string(),
                status: status.as_u16(),
                protocol,
            });
        }
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        Err(api_error(status, &bytes))
    }

    fn transport(&self, source: reqwest::Error) -> ClientError {
        let url = self.base.to_string();
        if source.is_connect() {
            ClientError::Unreachable { url, source }
        } else {
            ClientError::Transport { url, source }
        }
    }
}

/// The error of a non-success answer: the Fly error body's message, else a short plain-text body,
/// else the status's reason.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let from_json = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .map(|e| e.error)
        .filter(|m| !m.trim().is_empty());
    let message = from_json.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() || text.len() > 300 || text.starts_with('<') {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text.to_owned()
        }
    });
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for path segments and query
/// values alike).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
