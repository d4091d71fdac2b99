//! `/v1/apps/{app}/machines…`: the machine endpoints of Fly's Machines API.
//!
//! The control plane checks the caller, the app, the machine's placement and its lease, then asks
//! the machine's host ([`aloft_api::MachineHost`]) to act. The host is authoritative for the
//! machine's state, config, events and versions; the control store holds what spans hosts: which
//! host has the machine (its placement record), whether it is cordoned, and its lease.
//!
//! Verbs answer once the host has accepted them; clients wait for a state with `…/wait`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aloft_api::{
    ApiError, CreateLeaseRequest, CreateMachineRequest, DestroyQuery, EventsQuery, ExecRequest, ExecResponse,
    HostCreate, HostStop, HostUpdate, HostWait, LEASE_NONCE_HEADER, Lease, LeaseEnvelope, ListMachinesQuery,
    Machine, MachineEvent, MachineHost, MachineId, MachineVersion, MetadataValueResponse, OkResponse,
    ProcessStat, RestartQuery, Signal, SignalRequest, StartResponse, StopRequest, UpdateMachineRequest,
    UpdateMetadataRequest, UpsertMetadataKeyRequest, WaitQuery, WaitResponse,
};
use aloft_store::{ControlStore, Expect, MachineLeaseRequest, MachineRecord, Versioned};
use axum::Json;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{JsonBody, MaybeJson, validate_path_app};
use crate::hosts::HostHandle;
use crate::ids::{hex, random};
use crate::{ApiState, HttpError};

/// Longest `exec` a request may ask for; the default when it names none.
const EXEC_MAX: Duration = Duration::from_secs(300);
const EXEC_DEFAULT: Duration = Duration::from_secs(30);

/// `{app_name}` and `{machine_id}`: an id that cannot be a machine id is a 404.
#[derive(Debug, Clone)]
pub(crate) struct MachinePath {
    app: String,
    id: MachineId,
}

impl<S: Send + Sync> FromRequestParts<S> for MachinePath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
        let app = params.get("app_name").cloned().unwrap_or_default();
        validate_path_app(&app)?;
        let raw = params.get("machine_id").map(String::as_str).unwrap_or_default();
        let id = raw
            .parse::<MachineId>()
            .map_err(|_| ApiError::not_found(format_args!("machine {raw}")))?;
        Ok(Self { app, id })
    }
}

/// A located machine: its placement record and the host that has it.
pub(crate) struct Target {
    app: String,
    pub(crate) id: MachineId,
    placement: Versioned<MachineRecord>,
    pub(crate) host: Arc<dyn MachineHost>,
}

impl Target {
    /// The machine as the API shows it: the host's answer plus what the control plane keeps.
    fn decorate(&self, mut m: Machine) -> Machine {
        m.cordoned = Some(self.placement.value.cordoned);
        m
    }
}

/// Finds the machine: the app must be the caller's (404/403 as for apps), the machine must be
/// placed in it (404), its host must be known (503).
pub(crate) fn locate(state: &ApiState, caller: &Caller, path: &MachinePath) -> Result<Target, HttpError> {
    let control = state.control();
    visible_app(control, caller, &path.app)?;
    let placement = control
        .get_machine(&path.app, path.id.as_str())?
        .ok_or_else(|| ApiError::not_found(format_args!("machine {}", path.id)))?;
    let host = state.hosts().get(&placement.value.host)?.agent.clone();
    Ok(Target {
        app: path.app.clone(),
        id: path.id.clone(),
        placement,
        host,
    })
}

/// The lease nonce a request carries.
fn nonce(headers: &HeaderMap) -> Option<String> {
    headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// [`locate`], then 409 unless no lease is held or `nonce` is its nonce.
fn locate_unleased(
    state: &ApiState,
    caller: &Caller,
    path: &MachinePath,
    nonce: Option<&str>,
) -> Result<Target, HttpError> {
    let target = locate(state, caller, path)?;
    state
        .control()
        .check_lease(&target.app, target.id.as_str(), nonce)?;
    Ok(target)
}

/// Runs `f` on the blocking pool with the machine [`locate`]d.
async fn on_machine<T, F>(state: ApiState, caller: Caller, path: MachinePath, f: F) -> Result<T, HttpError>
where
    T: Send + 'static,
    F: FnOnce(&ApiState, &Target) -> Result<T, HttpError> + Send + 'static,
{
    blocking(move || {
        let t = locate(&state, &caller, &path)?;
        f(&state, &t)
    })
    .await
}

/// [`on_machine`] for a change: refused (409) while someone else holds the machine's lease,
/// unless `headers` carry its nonce.
async fn on_unleased<T, F>(
    state: ApiState,
    caller: Caller,
    path: MachinePath,
    headers: &HeaderMap,
    f: F,
) -> Result<T, HttpError>
where
    T: Send + 'static,
    F: FnOnce(&ApiState, &Target) -> Result<T, HttpError> + Send + 'static,
{
    let nonce = nonce(headers);
    blocking(move || {
        let t = locate_unleased(&state, &caller, &path, nonce.as_deref())?;
        f(&state, &t)
    })
    .await
}

pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// A fresh machine id (56 random bits, as Fly's).
pub(crate) fn new_machine_id() -> Result<MachineId, HttpError> {
    let bytes = random::<7>().map_err(|e| HttpError::internal(format!("read random bytes: {e}")))?;
    Ok(MachineId::from_random(bytes))
}

/// A lease nonce: 16 random bytes, hex.
fn new_nonce() -> Result<String, HttpError> {
    let bytes = random::<16>().map_err(|e| HttpError::internal(format!("read random bytes: {e}")))?;
    Ok(hex(&bytes))
}

/// `GET /v1/apps/{app}/machines` → the app's machines, filtered (`include_deleted`, `region`,
/// `state`, `metadata.<key>`) and optionally summarized.
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    crate::extract::AppName(app): crate::extract::AppName,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Machine>>, HttpError> {
    let query = ListMachinesQuery::from_query(query_pairs(query.as_deref()))?;
    let machines = blocking(move || {
        let control = state.control();
        visible_app(control, &caller, &app)?;
        let cordoned: HashMap<String, bool> = control
            .list_machines(&app)?
            .into_iter()
            .map(|p| (p.value.machine.id.to_string(), p.value.cordoned))
            .collect();
        let mut out = Vec::new();
        for host in state.hosts().all() {
            for mut m in host.agent.list(&app)? {
                // Only machines the control plane placed in this app are its machines.
                let Some(c) = cordoned.get(m.id.as_str()) else {
                    continue;
                };
                if !query.matches(&m) {
                    continue;
                }
                m.cordoned = Some(*c);
                out.push(if query.summary { m.summary() } else { m });
            }
        }
        Ok(out)
    })
    .await?;
    Ok(Json(machines))
}

/// `POST /v1/apps/{app}/machines` → the new machine. The control plane picks the id and the host,
/// records the placement (and the lease, with `lease_ttl`) before the host creates anything, so a
/// retried or interrupted create never makes a machine nobody knows.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    crate::extract::AppName(app): crate::extract::AppName,
    JsonBody(req): JsonBody<CreateMachineRequest>,
) -> Result<Json<Machine>, HttpError> {
    req.validate()?;
    let mut req = req;
    let machine = blocking(move || {
        let control = state.control();
        let app_record = visible_app(control, &caller, &app)?;
        // A machine mounting a volume runs on the volume's host.
        let host = match crate::volumes::resolve_mount(&state, &app, &mut req.config)? {
            Some(host) => {
                if let Some(region) = req.region.as_deref().filter(|r| *r != host.region) {
                    return Err(ApiError::unprocessable(format!(
                        "the volume in config.mounts is in region {}, not {region}: create the machine in {} or use a volume of {region}",
                        host.region, host.region
                    ))
                    .into());
                }
                host
            }
            None => state.hosts().place(req.region.as_deref())?.clone(),
        };
        let org = control.org_network(&app_record.organization.slug)?;
        let secrets = crate::secrets::for_machine(
            &state,
            &app,
            req.skip_secrets.unwrap_or(false),
            req.min_secrets_version,
        )?;
        let id = new_machine_id()?;
        let name = req.name.clone().unwrap_or_else(|| id.to_string());
        let placement = placement_record(&app, &host, &id, &name);
        let placement = MachineRecord {
            cordoned: req.skip_service_registration.unwrap_or(false),
            ..placement
        };
        control.create_machine(&placement)?;
        let lease = match req.lease_ttl.filter(|t| *t > 0) {
            Some(ttl) => {
                let ttl = CreateLeaseRequest {
                    ttl: Some(ttl),
                    description: None,
                }
                .ttl_secs(None)?;
                let lease = MachineLeaseRequest {
                    nonce: new_nonce()?,
                    owner: caller.token_id.clone(),
                    description: "lease taken by create".to_owned(),
                    ttl: Duration::from_secs(ttl),
                    version: String::new(),
                };
                Some(control.acquire_lease(&app, id.as_str(), &lease)?)
            }
            None => None,
        };
        let created = host.agent.create(HostCreate {
            id: id.clone(),
            app: app.clone(),
            name,
            region: host.region.clone(),
            org,
            config: req.config,
            skip_launch: req.skip_launch.unwrap_or(false),
            secrets,
        });
        let mut machine = match created {
            Ok(m) => m,
            Err(e) => {
                // The host made nothing it keeps (or is rolling it back): forget the placement
                // unless the host still knows the machine.
                if host.agent.get(&id).is_err() {
                    let _ = control.delete_machine(&app, id.as_str());
                }
                return Err(e.into());
            }
        };
        // Keep the host's first answer in the placement record (name, region, instance id).
        let record = MachineRecord {
            machine: machine.clone(),
            ..placement
        };
        if let Ok(Some(current)) = control.get_machine(&app, id.as_str()) {
            let _ = control.put_machine(&record, Expect::Revision(current.revision));
        }
        machine.cordoned = Some(record.cordoned);
        machine.nonce = lease.map(|l| l.nonce);
        Ok(machine)
    })
    .await?;
    Ok(Json(machine))
}

/// The placement record written before the host creates the machine.
pub(crate) fn placement_record(app: &str, host: &HostHandle, id: &MachineId, name: &str) -> MachineRecord {
    MachineRecord {
        app: app.to_owned(),
        host: host.name.clone(),
        machine: Machine {
            id: id.clone(),
            name: name.to_owned(),
            state: aloft_api::MachineState::Creating,
            region: host.region.clone(),
            instance_id: String::new(),
            version: None,
            private_ip: String::new(),
            config: None,
            incomplete_config: None,
            image_ref: None,
            created_at: aloft_api::rfc3339(crate::ids::now_ms()),
            updated_at: aloft_api::rfc3339(crate::ids::now_ms()),
            events: Vec::new(),
            checks: Vec::new(),
            nonce: None,
            host_status: None,
            cordoned: None,
            containers: Vec::new(),
        },
        cordoned: false,
    }
}

/// `GET /v1/apps/{app}/machines/{id}` → the machine.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
) -> Result<Json<Machine>, HttpError> {
    let m = on_machine(
        state,
        caller,
        path,
        move |_, t| Ok(t.decorate(t.host.get(&t.id)?)),
    )
    .await?;
    Ok(Json(m))
}

/// `POST /v1/apps/{app}/machines/{id}` → the machine with its new config and version (a full
/// replacement; `name` and `region` cannot change).
pub(crate) async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    JsonBody(req): JsonBody<UpdateMachineRequest>,
) -> Result<Json<Machine>, HttpError> {
    let m = on_unleased(state, caller, path, &headers, move |state, t| {
        let current = t.host.get(&t.id)?;
        req.validate(&current.name, &current.region)?;
        let mut req = req;
        if let Some(host) = crate::volumes::resolve_mount(state, &t.app, &mut req.config)?
            && host.name != t.placement.value.host
        {
            return Err(ApiError::unprocessable(format!(
                "the volume in config.mounts is on host {}, and the machine runs on {}: a machine can't move to its volume; create a new machine with it",
                host.name, t.placement.value.host
            ))
            .into());
        }
        let secrets = crate::secrets::for_machine(
            state,
            &t.app,
            req.skip_secrets.unwrap_or(false),
            req.min_secrets_version,
        )?;
        let m = t.host.update(
            &t.id,
            HostUpdate {
                config: req.config,
                skip_launch: req.skip_launch.unwrap_or(false),
                current_version: req.current_version,
                secrets,
            },
        )?;
        Ok(t.decorate(m))
    })
    .await?;
    Ok(Json(m))
}

/// `DELETE /v1/apps/{app}/machines/{id}[?force=true|kill=true]` → `{"ok": true}`. The lease goes
/// with the machine.
pub(crate) async fn destroy(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<OkResponse>, HttpError> {
    let q = DestroyQuery::from_query(query_pairs(query.as_deref()))?;
    let held = nonce(&headers);
    on_unleased(state, caller, path, &headers, move |state, t| {
        t.host.destroy(&t.id, q.force)?;
        if let Some(n) = held {
            let _ = state.control().release_lease(&t.app, t.id.as_str(), &n);
        }
        Ok(())
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `POST …/start` → `{previous_state, …}`.
pub(crate) async fn start(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
) -> Result<Json<StartResponse>, HttpError> {
    let previous_state = on_unleased(state, caller, path, &headers, move |_, t| {
        Ok(t.host.start(&t.id)?)
    })
    .await?;
    Ok(Json(StartResponse {
        previous_state,
        migrated: false,
        new_host: String::new(),
        message: String::new(),
        status: String::new(),
    }))
}

/// `POST …/stop` with an optional `{signal, timeout}` → `{"ok": true}`.
pub(crate) async fn stop(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    MaybeJson(req): MaybeJson<StopRequest>,
) -> Result<Json<OkResponse>, HttpError> {
    let req = req.unwrap_or_default();
    on_unleased(state, caller, path, &headers, move |_, t| {
        let how = HostStop {
            signal: req.signal.map(Signal::from),
            timeout: req.timeout.map(aloft_api::Duration::get),
        };
        Ok(t.host.stop(&t.id, how)?)
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `POST …/suspend` → `{"ok": true}`.
pub(crate) async fn suspend(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, HttpError> {
    on_unleased(state, caller, path, &headers, move |_, t| {
        Ok(t.host.suspend(&t.id)?)
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `POST …/restart[?signal=&timeout=&force_stop=]` → `{"ok": true}`.
pub(crate) async fn restart(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<OkResponse>, HttpError> {
    let q = RestartQuery::from_query(query_pairs(query.as_deref()))?;
    on_unleased(state, caller, path, &headers, move |_, t| {
        let how = if q.force_stop {
            HostStop {
                signal: Some(Signal::SIGKILL),
                timeout: Some(Duration::ZERO),
            }
        } else {
            HostStop {
                signal: q.signal.map(Signal::from),
                timeout: q.timeout,
            }
        };
        Ok(t.host.restart(&t.id, how)?)
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `POST …/signal` with `{"signal": "SIGHUP"}` (or a number, as fly-go's kill sends) →
/// `{"ok": true}`.
pub(crate) async fn signal(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SignalRequest>,
) -> Result<Json<OkResponse>, HttpError> {
    on_unleased(state, caller, path, &headers, move |_, t| {
        Ok(t.host.signal(&t.id, req.signal)?)
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `GET …/wait?state=…&timeout=…&version=…&from_event_id=…` → `{ok, state, version, event_id}`,
/// 408 when the state was not reached in time.
pub(crate) async fn wait(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    RawQuery(query): RawQuery,
) -> Result<Json<WaitResponse>, HttpError> {
    let q = WaitQuery::from_query(query_pairs(query.as_deref()))?;
    let r = on_machine(state, caller, path, move |_, t| {
        let wait = HostWait {
            states: q.states,
            version: q.version,
            from_event_id: q.from_event_id,
            timeout: q.timeout,
        };
        Ok(t.host.wait(&t.id, &wait)?)
    })
    .await?;
    Ok(Json(r))
}

/// Sets or clears `cordoned` in the placement record.
async fn set_cordon(
    state: ApiState,
    caller: Caller,
    path: MachinePath,
    headers: &HeaderMap,
    cordoned: bool,
) -> Result<Json<OkResponse>, HttpError> {
    on_unleased(state, caller, path, headers, move |state, t| {
        let record = MachineRecord {
            cordoned,
            ..t.placement.value.clone()
        };
        state
            .control()
            .put_machine(&record, Expect::Revision(t.placement.revision))?;
        Ok(())
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// `POST …/cordon`: the proxy stops routing to the machine → `{"ok": true}`.
pub(crate) async fn cordon(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, HttpError> {
    set_cordon(state, caller, path, &headers, true).await
}

/// `POST …/uncordon` → `{"ok": true}`.
pub(crate) async fn uncordon(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, HttpError> {
    set_cordon(state, caller, path, &headers, false).await
}

/// `GET …/events[?limit=]` → events, newest first.
pub(crate) async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<MachineEvent>>, HttpError> {
    let q = EventsQuery::from_query(query_pairs(query.as_deref()))?;
    let events = on_machine(state, caller, path, move |_, t| {
        Ok(t.host.events(&t.id, q.limit)?)
    })
    .await?;
    Ok(Json(events))
}

/// `GET …/versions` → versions, newest first.
pub(crate) async fn versions(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
) -> Result<Json<Vec<MachineVersion>>, HttpError> {
    let versions = on_machine(state, caller, path, move |_, t| Ok(t.host.versions(&t.id)?)).await?;
    Ok(Json(versions))
}

/// `GET …/ps` → the machine's processes.
pub(crate) async fn ps(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
) -> Result<Json<Vec<ProcessStat>>, HttpError> {
    let ps = on_machine(state, caller, path, move |_, t| Ok(t.host.ps(&t.id)?)).await?;
    Ok(Json(ps))
}

/// `POST …/exec` with `{command: […]}` (or the deprecated `cmd` string) →
/// `{exit_code, exit_signal, stdout, stderr}`.
pub(crate) async fn exec(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Json<ExecResponse>, HttpError> {
    let argv = req.argv()?;
    if req.stdin.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unprocessable(
            "exec: stdin is not supported by aloft yet; run the command without it",
        )
        .into());
    }
    if req.container.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(ApiError::unprocessable(
            "exec: aloft machines have one container; leave `container` out",
        )
        .into());
    }
    let timeout = match req.timeout {
        None | Some(0) => EXEC_DEFAULT,
        Some(secs) => Duration::from_secs(secs),
    };
    if timeout > EXEC_MAX {
        return Err(ApiError::bad_request(format!(
            "exec timeout of {}s is too long: at most {}s",
            timeout.as_secs(),
            EXEC_MAX.as_secs()
        ))
        .into());
    }
    let r = on_machine(state, caller, path, move |_, t| {
        Ok(t.host.exec(&t.id, &argv, timeout)?)
    })
    .await?;
    Ok(Json(r))
}

/// `GET …/metadata` → `{key: value}`.
pub(crate) async fn metadata(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
) -> Result<Json<std::collections::BTreeMap<String, String>>, HttpError> {
    let md = on_machine(state, caller, path, move |_, t| {
        Ok(t.host.get(&t.id)?.config.map(|c| c.metadata).unwrap_or_default())
    })
    .await?;
    Ok(Json(md))
}

/// `PUT`/`PATCH …/metadata` with `{metadata: {k: v|null}, machine_version}` → 204; 412 when
/// `machine_version` is stale.
pub(crate) async fn update_metadata(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    JsonBody(req): JsonBody<UpdateMetadataRequest>,
) -> Result<StatusCode, HttpError> {
    for key in req.metadata.keys() {
        check_metadata_key(key)?;
    }
    on_machine(state, caller, path, move |_, t| {
        t.host.update_metadata(&t.id, &req)?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `{key}` of the metadata paths, and keys of a metadata update.
fn check_metadata_key(key: &str) -> Result<(), ApiError> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid metadata key {key:?}: use 1 to 256 letters, digits, '_', '-' or '.'"
        )))
    }
}

/// `…/metadata/{key}` path.
#[derive(Debug, Clone)]
pub(crate) struct MetadataKeyPath {
    machine: MachinePath,
    key: String,
}

impl<S: Send + Sync> FromRequestParts<S> for MetadataKeyPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let machine = MachinePath::from_request_parts(parts, state).await?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
        let key = params.get("key").cloned().unwrap_or_default();
        check_metadata_key(&key)?;
        Ok(Self { machine, key })
    }
}

/// `GET …/metadata/{key}` → `{value}`, 404 without the key.
pub(crate) async fn metadata_key(
    State(state): State<ApiState>,
    caller: Caller,
    path: MetadataKeyPath,
) -> Result<Json<MetadataValueResponse>, HttpError> {
    let value = on_machine(state, caller, path.machine, move |_, t| {
        let md = t.host.get(&t.id)?.config.map(|c| c.metadata).unwrap_or_default();
        md.get(&path.key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format_args!("metadata key {:?}", path.key)).into())
    })
    .await?;
    Ok(Json(MetadataValueResponse { value }))
}

/// `POST …/metadata/{key}` with `{value}` → 204.
pub(crate) async fn set_metadata_key(
    State(state): State<ApiState>,
    caller: Caller,
    path: MetadataKeyPath,
    JsonBody(req): JsonBody<UpsertMetadataKeyRequest>,
) -> Result<StatusCode, HttpError> {
    let change = UpdateMetadataRequest {
        metadata: [(path.key.clone(), Some(req.value))].into_iter().collect(),
        machine_version: None,
        updated_at: req.updated_at,
    };
    on_machine(state, caller, path.machine, move |_, t| {
        t.host.update_metadata(&t.id, &change)?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE …/metadata/{key}` → 204 (also when the key was not there).
pub(crate) async fn delete_metadata_key(
    State(state): State<ApiState>,
    caller: Caller,
    path: MetadataKeyPath,
) -> Result<StatusCode, HttpError> {
    let change = UpdateMetadataRequest {
        metadata: [(path.key.clone(), None)].into_iter().collect(),
        machine_version: None,
        updated_at: None,
    };
    on_machine(state, caller, path.machine, move |_, t| {
        t.host.update_metadata(&t.id, &change)?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET …/lease` → the lease envelope, 404 when none is held.
pub(crate) async fn show_lease(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
) -> Result<Json<LeaseEnvelope>, HttpError> {
    let lease = on_machine(state, caller, path, move |state, t| {
        state
            .control()
            .get_lease(&t.app, t.id.as_str())?
            .ok_or_else(|| ApiError::not_found(format_args!("lease on machine {}", t.id)).into())
    })
    .await?;
    Ok(Json(LeaseEnvelope::success(lease)))
}

/// `POST …/lease` with `{ttl, description}` (or `?ttl=`) → 201 with the envelope. With the
/// `fly-machine-lease-nonce` header it refreshes that lease instead; 409 while another holds one.
pub(crate) async fn create_lease(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    MaybeJson(req): MaybeJson<CreateLeaseRequest>,
) -> Result<(StatusCode, Json<LeaseEnvelope>), HttpError> {
    let req = req.unwrap_or_default();
    let pairs = query_pairs(query.as_deref());
    let query_ttl = pairs.iter().find(|(k, _)| k == "ttl").map(|(_, v)| v.as_str());
    let ttl = Duration::from_secs(req.ttl_secs(query_ttl)?);
    let nonce = nonce(&headers);
    let owner = caller.token_id.clone();
    let lease = on_machine(state, caller, path, move |state, t| -> Result<Lease, HttpError> {
        let control = state.control();
        if let Some(n) = nonce {
            return Ok(control.refresh_lease(&t.app, t.id.as_str(), &n, ttl)?);
        }
        let version = t.host.get(&t.id)?.instance_id;
        let lease = MachineLeaseRequest {
            nonce: new_nonce()?,
            owner,
            description: req.description.unwrap_or_default(),
            ttl,
            version,
        };
        Ok(control.acquire_lease(&t.app, t.id.as_str(), &lease)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(LeaseEnvelope::success(lease))))
}

/// `DELETE …/lease` with the nonce header → `{"ok": true}`.
pub(crate) async fn release_lease(
    State(state): State<ApiState>,
    caller: Caller,
    path: MachinePath,
    headers: HeaderMap,
) -> Result<Json<OkResponse>, HttpError> {
    let nonce = nonce(&headers).ok_or_else(|| {
        ApiError::bad_request(format!(
            "releasing a lease needs its nonce in the {LEASE_NONCE_HEADER} header"
        ))
    })?;
    on_machine(state, caller, path, move |state, t| {
        state.control().release_lease(&t.app, t.id.as_str(), &nonce)?;
        Ok(())
    })
    .await?;
    Ok(Json(OkResponse::OK))
}

/// Destroys every machine of `app` (forcibly) on every host: the first half of an app delete.
/// Machines already destroyed are skipped; a host that fails stops the delete.
pub(crate) fn destroy_all(state: &ApiState, control: &ControlStore, app: &str) -> Result<(), HttpError> {
    let placed: HashMap<String, String> = control
        .list_machines(app)?
        .into_iter()
        .map(|p| (p.value.machine.id.to_string(), p.value.host))
        .collect();
    for host in state.hosts().all() {
        for m in host.agent.list(app)? {
            if placed.get(m.id.as_str()) != Some(&host.name) || m.state.is_terminal() {
                continue;
            }
            match host.agent.destroy(&m.id, true) {
                Ok(()) => {}
                Err(e) if e.status() == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Machines of `app` that still exist (not destroyed, replaced or migrated), as their hosts say.
pub(crate) fn live_count(state: &ApiState, control: &ControlStore, app: &str) -> Result<u64, HttpError> {
    let placed: HashMap<String, String> = control
        .list_machines(app)?
        .into_iter()
        .map(|p| (p.value.machine.id.to_string(), p.value.host))
        .collect();
    if placed.is_empty() {
        return Ok(0);
    }
    let mut n = 0u64;
    for host in state.hosts().all() {
        n += host
            .agent
            .list(app)?
            .iter()
            .filter(|m| placed.get(m.id.as_str()) == Some(&host.name) && !m.state.is_terminal())
            .count() as u64;
    }
    Ok(n)
}
