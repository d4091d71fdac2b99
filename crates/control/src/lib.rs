//! aloft's control-plane API: the Fly Machines API served over HTTP.
//!
//! [`router`] builds the axum [`Router`] that serves Fly's paths under `/v1` with Fly's JSON
//! shapes and status codes (`docs/api-compat.md` lists which operations exist so far). Around
//! every route sit two layers: an access log that gives each request a `fly-request-id`
//! (`<ULID>-<region>`) and writes one line per request to stderr, and token authentication
//! (`Authorization: Bearer <token>` or `FlyV1 <token>`; tokens are org-scoped and stored hashed,
//! see [`create_token`]). Every error, including unknown routes, malformed JSON and missing
//! tokens, answers with Fly's `{"error": "...", "status": "..."}` body ([`HttpError`]).
//!
//! `GET …/machines/{id}/console` (`console.rs`) and `GET …/machines/{id}/proxy` (`tunnel.rs`)
//! are the routes that take over their connection (an HTTP/1.1 upgrade to `aloft-console`, to
//! `aloft-tcp`; `upgrade.rs` has what they share); they need a server that serves upgrades, as
//! `axum::serve` does.
//!
//! Threading: handlers run on the caller's tokio runtime; every call into the synchronous
//! [`aloft_store::Store`] goes through `spawn_blocking`, so SQLite never blocks the reactor.
//! Design notes: `docs/adr/0009-api-server.md`.
//!
//! Depends on `aloft-api` (wire types) and `aloft-store` (state). It must never link the VM,
//! image, network or agent crates: machines will be reached through the agent's interface, not
//! its implementation.

#![warn(missing_docs)]

mod apps;
mod auth;
mod certs;
mod compat;
mod console;
mod error;
mod extract;
mod hosts;
mod ids;
mod log;
mod logs;
mod machines;
mod openapi;
mod releases;
mod secrets;
mod snapshots;
mod tunnel;
mod upgrade;
mod volumes;

use std::sync::Arc;

use aloft_store::{ControlStore, Store};
use axum::Router;
use axum::http::{Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};

pub use auth::{Caller, NewToken, TOKEN_PREFIX, TokenError, create_token};
pub use certs::EdgeSettings;
pub use error::HttpError;
pub use extract::JsonBody;
pub use hosts::HostHandle;
pub use releases::resume as resume_releases;
pub use secrets::{ResealError, ResealReport, reseal_secrets};
pub use snapshots::{
    PENDING_TIMEOUT_MS, SNAPSHOT_INTERVAL_MS, ScheduleReport, ScheduledSnapshot, run_snapshot_schedule,
};

/// Settings of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// This server's region, the suffix of every `fly-request-id`.
    pub region: String,
    /// Write one line per request to stderr.
    pub access_log: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            region: "local".to_owned(),
            access_log: true,
        }
    }
}

/// What every handler shares: the control store, the hosts that run machines and the server's
/// settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    control: ControlStore,
    hosts: hosts::Hosts,
    config: ApiConfig,
    /// Seals app secrets at rest (`<data dir>/secrets.key`, and previous keys while rotating);
    /// without it the secrets endpoints answer 503.
    secrets_keys: Option<Arc<aloft_secretbox::Keyring>>,
    /// The edge's base domain, addresses and CA root, for the certificate endpoints.
    edge: EdgeSettings,
    /// Console sessions that may run at once; each holds a permit while it lives.
    consoles: Arc<tokio::sync::Semaphore>,
    /// Proxied connections (`…/proxy`) that may be open at once; each holds a permit until
    /// both its sides are closed.
    proxies: Arc<tokio::sync::Semaphore>,
}

impl ApiState {
    /// State over `store` (usually an `Arc<SqliteStore>`), with no hosts: machine endpoints
    /// answer 503 until [`ApiState::with_hosts`] gives some.
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self::with_hosts(store, config, Vec::new())
    }

    /// State over `store` whose machines run on `hosts` (new machines go to the first host of
    /// the region asked for, else to the first host).
    pub fn with_hosts(store: Arc<dyn Store>, config: ApiConfig, hosts: Vec<HostHandle>) -> Self {
        Self {
            inner: Arc::new(Inner {
                control: ControlStore::new(store),
                hosts: hosts::Hosts::new(hosts),
                config,
                secrets_keys: None,
                edge: EdgeSettings::default(),
                consoles: Arc::new(tokio::sync::Semaphore::new(console::MAX_CONSOLES)),
                proxies: Arc::new(tokio::sync::Semaphore::new(tunnel::MAX_PROXIES)),
            }),
        }
    }

    /// This state with `keys` sealing app secrets (the current key, `<data dir>/secrets.key`,
    /// kept apart from the store; previous keys open what they sealed until [`reseal_secrets`]
    /// sealed it again). Call it before the state is shared (cloned); a shared state is returned
    /// unchanged.
    #[must_use]
    pub fn with_secrets_keys(mut self, keys: Arc<aloft_secretbox::Keyring>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.secrets_keys = Some(keys);
        }
        self
    }

    /// This state with the edge's `settings` (base domain, addresses, local CA root) for the
    /// certificate endpoints. Call it before the state is shared (cloned); a shared state is
    /// returned unchanged.
    #[must_use]
    pub fn with_edge(mut self, settings: EdgeSettings) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.edge = settings;
        }
        self
    }

    /// This state with at most `max` console sessions at once (default 64; one more is refused
    /// with 503). Call it before the state is shared (cloned); a shared state is returned
    /// unchanged.
    #[must_use]
    pub fn with_max_consoles(mut self, max: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.consoles = Arc::new(tokio::sync::Semaphore::new(max));
        }
        self
    }

    /// The permits of running console sessions.
    pub(crate) fn consoles(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.consoles
    }

    /// This state with at most `max` proxied connections (`…/proxy`) at once (default 256; one
    /// more is refused with 503). Call it before the state is shared (cloned); a shared state is
    /// returned unchanged.
    #[must_use]
    pub fn with_max_proxies(mut self, max: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.proxies = Arc::new(tokio::sync::Semaphore::new(max));
        }
        self
    }

    /// The permits of open proxied connections.
    pub(crate) fn proxies(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.proxies
    }

    /// The edge's settings.
    pub(crate) fn edge(&self) -> &EdgeSettings {
        &self.inner.edge
    }

    /// The keys that seal and open app secrets, if the server has them.
    pub(crate) fn secrets_keys(&self) -> Option<&aloft_secretbox::Keyring> {
        self.inner.secrets_keys.as_deref()
    }

    pub(crate) fn hosts(&self) -> &hosts::Hosts {
        &self.inner.hosts
    }

    /// The typed control-plane records.
    pub fn control(&self) -> &ControlStore {
        &self.inner.control
    }

    /// The server's settings.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }
}

/// The API server's routes with authentication and the access log, ready for `axum::serve`.
pub fn router(state: ApiState) -> Router {
    const M: &str = "/v1/apps/{app_name}/machines/{machine_id}";
    let served = Router::new()
        .route("/v1/apps", get(apps::list).post(apps::create))
        .route("/v1/apps/{app_name}", get(apps::show).delete(apps::destroy))
        .route("/v1/apps/{app_name}/logs", get(logs::logs))
        .route("/v1/platform/regions", get(hosts::regions))
        .route(
            "/v1/apps/{app_name}/releases",
            get(releases::index).post(releases::create),
        )
        .route("/v1/apps/{app_name}/releases/rollback", post(releases::rollback))
        .route("/v1/apps/{app_name}/releases/{version}", get(releases::show))
        .route(
            "/v1/apps/{app_name}/releases/{version}/events",
            get(releases::events),
        )
        .route(
            "/v1/apps/{app_name}/machines",
            get(machines::list).post(machines::create),
        )
        .route(
            M,
            get(machines::show)
                .post(machines::update)
                .delete(machines::destroy),
        )
        .route(&format!("{M}/start"), post(machines::start))
        .route(&format!("{M}/stop"), post(machines::stop))
        .route(&format!("{M}/suspend"), post(machines::suspend))
        .route(&format!("{M}/restart"), post(machines::restart))
        .route(&format!("{M}/signal"), post(machines::signal))
        .route(&format!("{M}/wait"), get(machines::wait))
        .route(&format!("{M}/cordon"), post(machines::cordon))
        .route(&format!("{M}/uncordon"), post(machines::uncordon))
        .route(&format!("{M}/events"), get(machines::events))
        .route(&format!("{M}/versions"), get(machines::versions))
        .route(&format!("{M}/ps"), get(machines::ps))
        .route(&format!("{M}/exec"), post(machines::exec))
        .route(&format!("{M}/console"), get(console::console))
        .route(&format!("{M}/proxy"), get(tunnel::proxy))
        .route(
            &format!("{M}/lease"),
            get(machines::show_lease)
                .post(machines::create_lease)
                .delete(machines::release_lease),
        )
        .route(
            &format!("{M}/metadata"),
            get(machines::metadata)
                .put(machines::update_metadata)
                .patch(machines::update_metadata),
        )
        .route(
            &format!("{M}/metadata/{{key}}"),
            get(machines::metadata_key)
                .post(machines::set_metadata_key)
                .delete(machines::delete_metadata_key),
        )
        .merge(secrets::routes())
        .merge(certs::routes())
        .merge(volumes::routes())
        .merge(snapshots::routes());
    compat::not_yet(served)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), auth::require_token))
        // Public, as Fly's spec is: added after the authentication layer, which wraps only the
        // routes before it.
        .route("/v1/openapi.json", get(openapi::serve))
        .layer(from_fn_with_state(state.clone(), log::access_log))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> HttpError {
    aloft_api::ApiError::new(
        404,
        format!(
            "no route for {method} {}: aloft does not serve it (docs/api-compat.md lists the endpoints it does)",
            uri.path()
        ),
    )
    .into()
}

async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    aloft_api::ApiError::new(405, format!("method {method} is not allowed on {}", uri.path())).into()
}
