//! `/v1/apps`: create, list, show and destroy apps.
//!
//! App names are one namespace across organizations (as on Fly): a name held by another
//! organization is "taken" on create and 403 on read, so clients can tell taken from free.

use aloft_api::{
    ApiError, App, AppOrganizationInfo, CreateAppRequest, ListAppsQuery, ListAppsResponse, validate_app_name,
};
use aloft_store::ControlStore;
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;

use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{AppName, JsonBody};
use crate::ids::random;
use crate::{ApiState, HttpError};

/// The network of an app created without one.
const DEFAULT_NETWORK: &str = "default";
/// How long `apps destroy` waits for a machine being destroyed to let go of its volume.
const VOLUME_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// The status of an app without machines (never deployed, or all its machines destroyed).
const STATUS_PENDING: &str = "pending";
/// The status of an app with machines, whatever their states: an app scaled to zero by the
/// edge is still deployed (flyctl counts `deployed` and `suspended` as deployed; aloft has no
/// app-wide suspension, so it never answers `suspended`).
const STATUS_DEPLOYED: &str = "deployed";

/// The app as the API shows it: the stored record with its live machine count and the status
/// that follows from it.
fn with_counts(state: &ApiState, mut app: App) -> Result<App, HttpError> {
    app.machine_count = crate::machines::live_count(state, state.control(), &app.name)?;
    app.volume_count = state.control().list_volumes(&app.name)?.len() as u64;
    app.status = if app.machine_count > 0 {
        STATUS_DEPLOYED
    } else {
        STATUS_PENDING
    }
    .to_owned();
    Ok(app)
}

/// `GET /v1/apps?org_slug=…[&app_role=…]` → `{total_apps, apps}`.
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Json<ListAppsResponse>, HttpError> {
    let query = query.unwrap_or_default();
    let query = ListAppsQuery::from_query(form_urlencoded::parse(query.as_bytes()))?;
    caller.require_org(&query.org_slug)?;
    let apps = blocking(move || {
        let mut apps = Vec::new();
        for app in state.control().list_apps()? {
            let app = app.value;
            let role_matches = query.app_role.as_ref().is_none_or(|r| *r == app.app_role);
            if app.organization.slug == query.org_slug && role_matches {
                apps.push(with_counts(&state, app)?);
            }
        }
        Ok(apps)
    })
    .await?;
    Ok(Json(ListAppsResponse {
        total_apps: u64::try_from(apps.len()).unwrap_or(u64::MAX),
        apps,
    }))
}

/// Checks a network name: like an app name, a DNS label.
fn network_name(network: Option<&str>) -> Result<String, ApiError> {
    let network = network.map(str::trim).unwrap_or_default();
    if network.is_empty() {
        return Ok(DEFAULT_NETWORK.to_owned());
    }
    validate_app_name(network).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid network {network:?}: use 1 to 63 lowercase letters, digits and hyphens, \
             not starting or ending with a hyphen (or leave it out for \"{DEFAULT_NETWORK}\")"
        ))
    })?;
    Ok(network.to_owned())
}

/// A numeric id that fits the 32-bit signed integer fly-go decodes it into.
fn numeric_id() -> Result<u64, HttpError> {
    let bytes = random::<4>().map_err(|e| HttpError::internal(format!("read random bytes: {e}")))?;
    Ok(u64::from(u32::from_le_bytes(bytes) & 0x7fff_ffff).max(1))
}

/// `POST /v1/apps` (`?wait=true` from fly-go is accepted and means nothing here: the app exists
/// when the answer comes) → 201 with the app.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(mut req): JsonBody<CreateAppRequest>,
) -> Result<(StatusCode, Json<App>), HttpError> {
    if req.name.trim().is_empty() {
        return Err(ApiError::bad_request(
            "name is required: give the app a name, e.g. {\"name\": \"my-app\"}",
        )
        .into());
    }
    if req.org_slug.trim().is_empty() {
        req.org_slug.clone_from(&caller.org_slug);
    }
    req.validate()?;
    let network = network_name(req.network.as_deref())?;
    caller.require_org(&req.org_slug)?;
    let app = App {
        id: req.name.clone(),
        name: req.name.clone(),
        internal_numeric_id: numeric_id()?,
        machine_count: 0,
        volume_count: 0,
        network,
        status: STATUS_PENDING.to_owned(),
        organization: AppOrganizationInfo {
            name: req.org_slug.clone(),
            slug: req.org_slug.clone(),
            internal_numeric_id: 0,
        },
        cname_target: String::new(),
        app_role: req.app_role_id.clone().unwrap_or_default(),
    };
    let control = state.control().clone();
    let stored = app.clone();
    // A taken name is 422 `name_taken` (ControlError::to_api).
    blocking(move || Ok(control.create_app(&stored).map(drop)?)).await?;
    Ok((StatusCode::CREATED, Json(app)))
}

/// The app `name` if the caller may see it: 404 if there is none, 403 if another organization
/// holds it (both worded exactly as fly-go's app-name probe expects).
pub(crate) fn visible_app(control: &ControlStore, caller: &Caller, name: &str) -> Result<App, HttpError> {
    let app = control.get_app(name)?.ok_or_else(ApiError::app_not_found)?.value;
    if app.organization.slug != caller.org_slug {
        return Err(ApiError::app_in_other_org().into());
    }
    Ok(app)
}

/// `GET /v1/apps/{app_name}` → the app.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(name): AppName,
) -> Result<Json<App>, HttpError> {
    let app = blocking(move || {
        let app = visible_app(state.control(), &caller, &name)?;
        with_counts(&state, app)
    })
    .await?;
    Ok(Json(app))
}

/// `DELETE /v1/apps/{app_name}` → 202. As on Fly, the app's machines are destroyed (forcibly)
/// first, then its volumes and its volumes' snapshots (on their hosts, then their records); then
/// the app, its placement records, events and leases go in one store transaction.
/// A host that cannot destroy a machine stops the delete, so nothing is left running unowned.
pub(crate) async fn destroy(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(name): AppName,
) -> Result<StatusCode, HttpError> {
    blocking(move || {
        let control = state.control();
        visible_app(control, &caller, &name)?;
        crate::machines::destroy_all(&state, control, &name)?;
        crate::volumes::destroy_all(&state, &name, VOLUME_WAIT)?;
        crate::snapshots::destroy_all(&state, &name)?;
        if control.delete_app(&name)? {
            Ok(())
        } else {
            Err(ApiError::app_not_found().into())
        }
    })
    .await?;
    Ok(StatusCode::ACCEPTED)
}
