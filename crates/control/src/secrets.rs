//! `/v1/apps/{app}/secrets…`: app secrets, sealed at rest, never answered in plaintext.
//!
//! Each value is sealed with the server's secrets key ([`aloft_secretbox`], ChaCha20-Poly1305,
//! a random nonce per value, the app and secret name as associated data) and stored under
//! `/secrets/{app}/{name}` with its times; `/secrets/{app}` holds the app's secrets version,
//! bumped by every change in the same transaction. Responses carry names, digests (hex SHA-256
//! of the value, computed from the opened value when asked: the store holds no hash a guess
//! could be checked against), times and versions, never values.
//!
//! Machines get the app's secrets when they are created or updated ([`for_machine`]): decrypted
//! here, handed to the host with the request, which keeps its own sealed copy for later boots.
//! A secret change reaches running machines only when they are updated (`aloft secrets deploy`,
//! or a release).
//!
//! Keys rotate: the server holds a [`Keyring`] (current key seals, previous keys open), every
//! record names the key that sealed it (`key_id`), and [`reseal_secrets`] (aloftd runs it when it
//! starts) seals again with the current key whatever a previous key (or no recorded key) sealed,
//! so the previous key file can be dropped after one run. See `docs/adr/0012-secrets.md`.

use std::collections::BTreeMap;

use aloft_api::{
    ApiError, AppSecret, AppSecrets, AppSecretsUpdateRequest, AppSecretsUpdateResp, DeleteAppSecretResponse,
    SecretEnv, SecretsQuery, SetAppSecretRequest, SetAppSecretResponse, validate_secret_name,
    validate_secret_value,
};
use aloft_secretbox::{Keyring, Sealed, SecretboxError};
use aloft_store::{ControlError, ControlStore, SecretRecord, SecretsSnapshot};
use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::get;

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{AppName, JsonBody, validate_path_app};
use crate::{ApiState, HttpError};

/// Attempts of a change that lost a race with another change of the same app's secrets.
const ATTEMPTS: usize = 8;

/// The secrets routes (merged into [`crate::router`] inside authentication).
pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/apps/{app_name}/secrets", get(list).post(update))
        .route(
            "/v1/apps/{app_name}/secrets/{secret_name}",
            get(show).post(create).delete(destroy),
        )
}

/// `{app_name}` and `{secret_name}`.
#[derive(Debug, Clone)]
pub(crate) struct SecretPath {
    app: String,
    name: String,
}

impl<S: Send + Sync> FromRequestParts<S> for SecretPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((app, name)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
        validate_path_app(&app)?;
        validate_secret_name(&name)?;
        Ok(Self { app, name })
    }
}

/// The associated data a secret is sealed with: a ciphertext opens only as the secret it was.
fn associated_data(app: &str, name: &str) -> Vec<u8> {
    format!("aloft-app-secret\0{app}\0{name}").into_bytes()
}

fn key(state: &ApiState) -> Result<&Keyring, HttpError> {
    state.secrets_keys().ok_or_else(|| {
        ApiError::new(
            503,
            "this server has no secrets key: start aloftd with a data directory (it keeps the key in <data dir>/secrets.key)",
        )
        .into()
    })
}

/// The secret as the API shows it. Its digest is the hex SHA-256 of the value, opened here;
/// empty when no key in the ring opens it (aloftd's start says which keys are missing).
fn shown(keys: &Keyring, app: &str, r: &SecretRecord) -> AppSecret {
    let digest = keys
        .open(&sealed_of(r), &associated_data(app, &r.name))
        .map(|plain| aloft_secretbox::digest(&plain))
        .unwrap_or_default();
    AppSecret {
        name: r.name.clone(),
        digest,
        created_at: r.created_at.clone(),
        updated_at: r.updated_at.clone(),
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// 422 unless the app's secrets reached `min`.
fn require_version(app: &str, have: u64, min: Option<u64>, field: &str) -> Result<(), HttpError> {
    match min {
        Some(min) if min > have => Err(ApiError::unprocessable(format!(
            "{field} {min} is newer than app {app}'s secrets version {have}: set the secrets first, or ask for version {have}"
        ))
        .into()),
        _ => Ok(()),
    }
}

/// Seals `value` as the record of secret `name` (keeping `created_at` of the record it replaces).
fn seal(
    key: &Keyring,
    app: &str,
    name: &str,
    value: &str,
    old: Option<&SecretRecord>,
    now: &str,
) -> Result<SecretRecord, HttpError> {
    let Sealed {
        nonce,
        ciphertext,
        key_id,
    } = key
        .seal(value.as_bytes(), &associated_data(app, name))
        .map_err(|e| HttpError::internal(format!("seal secret {name} of app {app}: {e}")))?;
    Ok(SecretRecord {
        name: name.to_owned(),
        nonce,
        ciphertext,
        key_id,
        legacy_digest: None,
        created_at: old.map_or_else(|| now.to_owned(), |o| o.created_at.clone()),
        updated_at: now.to_owned(),
    })
}

/// Applies `values` (name → value, `None` to remove) to the app's secrets in one transaction,
/// retrying when another change won a race. Returns the secrets afterwards and the new version
/// (unchanged when nothing changed). With `missing_is_error`, removing a secret that does not
/// exist is a 404.
fn change(
    state: &ApiState,
    app: &str,
    values: &BTreeMap<String, Option<String>>,
    missing_is_error: bool,
) -> Result<(BTreeMap<String, SecretRecord>, u64), HttpError> {
    let key = key(state)?;
    let control = state.control();
    for _ in 0..ATTEMPTS {
        let base: SecretsSnapshot = control.secrets(app)?;
        let now = aloft_api::rfc3339(crate::ids::now_ms());
        let mut after = base.secrets.clone();
        let mut changes = Vec::with_capacity(values.len());
        for (name, value) in values {
            match value {
                Some(v) => {
                    let record = seal(key, app, name, v, base.secrets.get(name), &now)?;
                    after.insert(name.clone(), record.clone());
                    changes.push((name.clone(), Some(record)));
                }
                None => {
                    if after.remove(name).is_some() {
                        changes.push((name.clone(), None));
                    } else if missing_is_error {
                        return Err(ApiError::not_found(format_args!("secret {name}")).into());
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok((after, base.version));
        }
        if let Some(version) = control.apply_secrets(app, &base, changes)? {
            return Ok((after, version));
        }
        // The secrets (or the app) changed meanwhile; the app check below answers 404 if it went.
        visible_app_exists(state, app)?;
    }
    Err(ApiError::conflict("the app's secrets were changed by other requests at the same time; retry").into())
}

fn visible_app_exists(state: &ApiState, app: &str) -> Result<(), HttpError> {
    state
        .control()
        .get_app(app)?
        .map(drop)
        .ok_or_else(|| ApiError::app_not_found().into())
}

/// The app's secrets for a machine being created or updated: decrypted (none with
/// `skip_secrets`), with the app's secrets version; 422 if `min_secrets_version` is newer.
pub(crate) fn for_machine(
    state: &ApiState,
    app: &str,
    skip: bool,
    min_version: Option<u64>,
) -> Result<SecretEnv, HttpError> {
    let snapshot = state.control().secrets(app)?;
    require_version(app, snapshot.version, min_version, "min_secrets_version")?;
    let mut env = SecretEnv {
        version: snapshot.version,
        values: BTreeMap::new(),
    };
    if skip || snapshot.secrets.is_empty() {
        return Ok(env);
    }
    let key = state.secrets_keys().ok_or_else(|| {
        HttpError::internal(format!(
            "app {app} has secrets but this server has no secrets key to open them"
        ))
    })?;
    for (name, r) in snapshot.secrets {
        let plain = key
            .open(&sealed_of(&r), &associated_data(app, &name))
            .map_err(|e| HttpError::internal(format!("open secret {name} of app {app}: {e}")))?;
        let value = String::from_utf8(plain)
            .map_err(|_| HttpError::internal(format!("secret {name} of app {app} is not UTF-8")))?;
        env.values.insert(name, value);
    }
    Ok(env)
}

/// A record's sealed value.
fn sealed_of(r: &SecretRecord) -> Sealed {
    Sealed {
        nonce: r.nonce.clone(),
        ciphertext: r.ciphertext.clone(),
        key_id: r.key_id.clone(),
    }
}

/// What [`reseal_secrets`] did. Counts and names only: never a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Secrets sealed again with the current key (they were sealed with a previous key, or
    /// before key ids were recorded).
    pub resealed: usize,
    /// Apps at least one of whose secrets was sealed again.
    pub apps: usize,
    /// Secrets that open with no configured key, each as `app/NAME: why` (the reason names the
    /// key id they need): left as they are.
    pub unreadable: Vec<String>,
    /// Apps whose secrets kept changing while they were sealed again: left for the next run.
    pub busy: Vec<String>,
}

/// Why [`reseal_secrets`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResealError {
    /// Reading or writing the control store failed.
    #[error("re-seal app secrets: {0}")]
    Store(#[from] ControlError),
    /// Sealing with the current key failed.
    #[error("re-seal secret {name} of app {app}")]
    Seal {
        /// The app.
        app: String,
        /// The secret.
        name: String,
        /// Why.
        #[source]
        source: SecretboxError,
    },
}

/// Seals again with `keys`' current key every app secret sealed with a previous key or before
/// key ids were recorded (blocking: run it on the blocking pool). Each app's re-sealed records
/// are written in one transaction over the snapshot they were read from, without bumping its
/// secrets version (the values are the same); an app whose secrets change meanwhile is read
/// again. A secret no configured key opens is reported and left alone. After a run with nothing
/// unreadable or busy, the previous keys open nothing any more and can be dropped.
pub fn reseal_secrets(control: &ControlStore, keys: &Keyring) -> Result<ResealReport, ResealError> {
    let mut report = ResealReport::default();
    for app in control.list_apps()? {
        let app = app.value.name;
        let mut done = false;
        for _ in 0..ATTEMPTS {
            let base = control.secrets(&app)?;
            let mut records = Vec::new();
            let mut unreadable = Vec::new();
            for (name, r) in &base.secrets {
                let sealed = sealed_of(r);
                // Also a record still carrying the digest older records were stored with.
                if !keys.needs_reseal(&sealed) && r.legacy_digest.is_none() {
                    continue;
                }
                let ad = associated_data(&app, name);
                let plain = match keys.open(&sealed, &ad) {
                    Ok(p) => p,
                    Err(e) => {
                        unreadable.push(format!("{app}/{name}: {e}"));
                        continue;
                    }
                };
                let again = keys.seal(&plain, &ad).map_err(|source| ResealError::Seal {
                    app: app.clone(),
                    name: name.clone(),
                    source,
                })?;
                records.push(SecretRecord {
                    nonce: again.nonce,
                    ciphertext: again.ciphertext,
                    key_id: again.key_id,
                    legacy_digest: None,
                    ..r.clone()
                });
            }
            let count = records.len();
            if count == 0 || control.reseal_secrets(&app, &base, records)? {
                report.resealed += count;
                report.apps += usize::from(count > 0);
                report.unreadable.extend(unreadable);
                done = true;
                break;
            }
        }
        if !done {
            report.busy.push(app);
        }
    }
    Ok(report)
}

/// `GET /v1/apps/{app}/secrets[?min_version=]` → `{secrets: [{name, digest, created_at,
/// updated_at}]}` (never values).
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    RawQuery(query): RawQuery,
) -> Result<Json<AppSecrets>, HttpError> {
    let q = SecretsQuery::from_query(query_pairs(query.as_deref()))?;
    let out = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        let snapshot = state.control().secrets(&app)?;
        require_version(&app, snapshot.version, q.min_version, "min_version")?;
        let keys = key(&state)?;
        Ok(AppSecrets {
            secrets: snapshot.secrets.values().map(|r| shown(keys, &app, r)).collect(),
        })
    })
    .await?;
    Ok(Json(out))
}

/// `POST /v1/apps/{app}/secrets` `{values: {NAME: value | null}}` → the secrets afterwards and
/// the new version. Every name and value is checked before anything changes; the sets and unsets
/// happen in one transaction.
pub(crate) async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    JsonBody(req): JsonBody<AppSecretsUpdateRequest>,
) -> Result<Json<AppSecretsUpdateResp>, HttpError> {
    if req.values.is_empty() {
        return Err(ApiError::bad_request(
            "values is empty: send {\"values\": {\"NAME\": \"value\"}} (null removes a secret)",
        )
        .into());
    }
    for (name, value) in &req.values {
        validate_secret_name(name)?;
        if let Some(v) = value {
            validate_secret_value(name, v)?;
        }
    }
    blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        let (after, version) = change(&state, &app, &req.values, false)?;
        let keys = key(&state)?;
        Ok(Json(AppSecretsUpdateResp {
            secrets: after.values().map(|r| shown(keys, &app, r)).collect(),
            version,
            version_deprecated: version,
        }))
    })
    .await
}

/// `GET /v1/apps/{app}/secrets/{name}` → `{name, digest, created_at, updated_at}`.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    path: SecretPath,
    RawQuery(query): RawQuery,
) -> Result<Json<AppSecret>, HttpError> {
    let q = SecretsQuery::from_query(query_pairs(query.as_deref()))?;
    let out = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let snapshot = state.control().secrets(&path.app)?;
        require_version(&path.app, snapshot.version, q.min_version, "min_version")?;
        let keys = key(&state)?;
        snapshot
            .secrets
            .get(&path.name)
            .map(|r| shown(keys, &path.app, r))
            .ok_or_else(|| ApiError::not_found(format_args!("secret {}", path.name)).into())
    })
    .await?;
    Ok(Json(out))
}

/// `POST /v1/apps/{app}/secrets/{name}` `{value}` → 201 with the secret (no value) and the new
/// version.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    path: SecretPath,
    JsonBody(req): JsonBody<SetAppSecretRequest>,
) -> Result<(StatusCode, Json<SetAppSecretResponse>), HttpError> {
    validate_secret_value(&path.name, &req.value)?;
    let out = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let values = BTreeMap::from([(path.name.clone(), Some(req.value))]);
        let (after, version) = change(&state, &path.app, &values, false)?;
        let r = after
            .get(&path.name)
            .ok_or_else(|| HttpError::internal("a secret just set is missing"))?;
        let shown = shown(key(&state)?, &path.app, r);
        Ok(SetAppSecretResponse {
            name: shown.name,
            digest: shown.digest,
            created_at: shown.created_at,
            updated_at: shown.updated_at,
            version,
            version_deprecated: version,
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// `DELETE /v1/apps/{app}/secrets/{name}` → `{version}`; 404 if there is no such secret.
pub(crate) async fn destroy(
    State(state): State<ApiState>,
    caller: Caller,
    path: SecretPath,
) -> Result<Json<DeleteAppSecretResponse>, HttpError> {
    let version = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let values = BTreeMap::from([(path.name.clone(), None)]);
        Ok(change(&state, &path.app, &values, true)?.1)
    })
    .await?;
    Ok(Json(DeleteAppSecretResponse {
        version,
        version_deprecated: version,
    }))
}
