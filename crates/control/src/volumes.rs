//! `/v1/apps/{app}/volumes…`: an app's persistent disks, and the mounts that use them.
//!
//! The control plane keeps a [`VolumeRecord`] per volume under `/volumes/{app}/{id}` (name, size,
//! settings, the host holding its disk) and asks that host's agent to make, grow and delete the
//! disk ([`MachineHost::create_volume`] …). Which machine a volume is attached to is never stored
//! here: the host answers it from the configs of its machines that are not destroyed, so a
//! machine destroyed any way (its agent's `auto_destroy`, a release, `apps destroy`) frees its
//! volume without a record to mend, and the host, which sees every machine that could mount its
//! disk, refuses a second one.
//!
//! A machine mounts a volume with `config.mounts = [{volume, path}]`: [`resolve_mount`] fills the
//! mount's name and size from the record and places the machine on the volume's host. Releases
//! describe mounts by name (`[[mounts]].source`) and get a volume per machine from
//! [`volume_for_release`]: the machine's own, an unattached one of that name, or a new one.
//!
//! A create with `snapshot_id` restores a snapshot of the app (`snapshots.rs`) and one with
//! `source_volume_id` forks one of its volumes: either way the new disk is made from the source on
//! the host that holds it ([`HostVolume::source`]), so the new volume is placed there, in the
//! source's region.

use std::time::Duration;

use aloft_api::{
    ApiError, CreateVolumeRequest, DEFAULT_SNAPSHOT_RETENTION_DAYS, DEFAULT_VOLUME_SIZE_GB,
    ExtendVolumeRequest, ExtendVolumeResponse, HostStatus, HostVolume, HostWait, MachineConfig, SnapshotId,
    UpdateVolumeRequest, VOLUME_FSTYPE, Volume, VolumeId, VolumeSource, VolumeState, WaitState,
};
use aloft_store::{ControlError, Expect, SnapshotState, StoreError, Versioned, VolumeRecord};
use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::{get, put};

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{AppName, JsonBody, validate_path_app};
use crate::hosts::HostHandle;
use crate::ids::random;
use crate::{ApiState, HttpError};

/// Bytes in a GB as volume sizes count them (GiB).
const GB: u64 = 1 << 30;
/// Attempts of a record change that lost a race with another change of the same volume.
const ATTEMPTS: usize = 8;

/// The volume routes (merged into [`crate::router`] inside authentication).
pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/apps/{app_name}/volumes", get(list).post(create))
        .route(
            "/v1/apps/{app_name}/volumes/{volume_id}",
            get(show).put(update).delete(destroy),
        )
        .route("/v1/apps/{app_name}/volumes/{volume_id}/extend", put(extend))
}

/// `{app_name}` and `{volume_id}`; a malformed id is a 404 naming it, as for machines.
#[derive(Debug, Clone)]
pub(crate) struct VolumePath {
    pub(crate) app: String,
    pub(crate) id: VolumeId,
}

impl<S: Send + Sync> FromRequestParts<S> for VolumePath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((app, raw)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
        validate_path_app(&app)?;
        let id = raw
            .parse::<VolumeId>()
            .map_err(|_| ApiError::not_found(format_args!("volume {raw}")))?;
        Ok(Self { app, id })
    }
}

/// `GET /v1/apps/{app}/volumes` → the app's volumes, oldest id first, each with its attachment
/// and usage as its host answers them.
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
) -> Result<Json<Vec<Volume>>, HttpError> {
    let volumes = blocking(move || {
        let control = state.control();
        visible_app(control, &caller, &app)?;
        Ok(control
            .list_volumes(&app)?
            .into_iter()
            .map(|r| decorate(&state, r.value))
            .collect())
    })
    .await?;
    Ok(Json(volumes))
}

/// `GET /v1/apps/{app}/volumes/{id}` → the volume.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
) -> Result<Json<Volume>, HttpError> {
    let v = blocking(move || {
        let record = visible_volume(&state, &caller, &path)?;
        Ok(decorate(&state, record.value))
    })
    .await?;
    Ok(Json(v))
}

/// `POST /v1/apps/{app}/volumes` → the new volume, its disk made on a host of the region; with
/// `snapshot_id` or `source_volume_id`, made from that source on its host ([`source_of`]).
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    JsonBody(mut req): JsonBody<CreateVolumeRequest>,
) -> Result<Json<Volume>, HttpError> {
    let from_source = req.snapshot_id.is_some() || req.source_volume_id.is_some();
    if !from_source {
        req.validate()?;
    }
    let v = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        // A source fills the name and size the request left out, so the checks come after it.
        let source = source_of(&state, &app, &mut req)?;
        req.validate()?;
        let (host, source) = match source {
            Some((host, source)) => (host, Some(source)),
            None => (place(&state, &app, req.region.as_deref(), &req)?, None),
        };
        let record = create_on(&state, &app, &host, &req, source)?;
        Ok(decorate(&state, record))
    })
    .await?;
    Ok(Json(v))
}

/// What a create with `snapshot_id` (a restore) or `source_volume_id` (a fork) starts from, and
/// the host holding it, where the new volume must be made; `None` for an empty volume (and when
/// both are given, which `validate` refuses). Fills the request's defaults from the source: the
/// name (the snapshot's volume's, the source volume's) and the size (the snapshot's volume's
/// size rounded up to GB, the source volume's). Answers 404 when the app has no such snapshot or
/// volume (another app's are not found), 422 for a `region` other than the source's or a size
/// below the source's.
fn source_of(
    state: &ApiState,
    app: &str,
    req: &mut CreateVolumeRequest,
) -> Result<Option<(HostHandle, VolumeSource)>, HttpError> {
    let (kind, name, region, size_gb, host, source) =
        match (req.snapshot_id.as_deref(), req.source_volume_id.as_deref()) {
            (Some(raw), None) => {
                let id: SnapshotId = raw
                    .parse()
                    .map_err(|e| ApiError::bad_request(format!("snapshot_id: {e}")))?;
                let snapshot = state
                    .control()
                    .get_snapshot(app, id.as_str())?
                    .map(|s| s.value)
                    .filter(|s| s.state == SnapshotState::Created)
                    .ok_or_else(|| ApiError::not_found(format_args!("snapshot {id}")))?;
                let size_gb = u32::try_from(snapshot.volume_size.div_ceil(GB))
                    .map_err(|_| {
                        HttpError::internal(format!(
                            "snapshot {id} records a volume size of {} bytes",
                            snapshot.volume_size
                        ))
                    })?
                    .max(1);
                (
                    format!("snapshot {id}"),
                    snapshot.volume_name,
                    snapshot.region,
                    size_gb,
                    snapshot.host,
                    VolumeSource::Snapshot(id),
                )
            }
            (None, Some(raw)) => {
                let id: VolumeId = raw
                    .parse()
                    .map_err(|e| ApiError::bad_request(format!("source_volume_id: {e}")))?;
                let source = state
                    .control()
                    .get_volume(app, id.as_str())?
                    .ok_or_else(|| ApiError::not_found(format_args!("volume {id}")))?
                    .value;
                (
                    format!("volume {id}"),
                    source.volume.name,
                    source.volume.region,
                    source.volume.size_gb,
                    source.host,
                    VolumeSource::Volume(id),
                )
            }
            _ => return Ok(None),
        };
    if let Some(asked) = req.region.as_deref()
        && asked != region
    {
        let what = match source {
            VolumeSource::Snapshot(_) => "snapshots restore in their own region",
            VolumeSource::Volume(_) => "a fork is made in its source's region",
        };
        return Err(ApiError::unprocessable(format!(
            "{kind} is in region {region}, not {asked}: {what} (leave region out)"
        ))
        .into());
    }
    match req.size_gb {
        Some(asked) if asked < size_gb => {
            return Err(ApiError::unprocessable(format!(
                "size_gb {asked} is smaller than {kind}'s {size_gb} GB: a volume made from it is at least as large"
            ))
            .into());
        }
        Some(_) => {}
        None => req.size_gb = Some(size_gb),
    }
    if req.name.is_empty() {
        req.name = name;
    }
    Ok(Some((state.hosts().get(&host)?.clone(), source)))
}

/// `PUT /v1/apps/{app}/volumes/{id}` → the volume with its snapshot settings changed.
pub(crate) async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
    JsonBody(req): JsonBody<UpdateVolumeRequest>,
) -> Result<Json<Volume>, HttpError> {
    req.validate()?;
    let v = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let record = change(&state, &path, |v| {
            if let Some(days) = req.snapshot_retention {
                v.snapshot_retention = Some(days);
            }
            if let Some(on) = req.auto_backup_enabled {
                v.auto_backup_enabled = Some(on);
            }
            Ok(())
        })?;
        Ok(decorate(&state, record))
    })
    .await?;
    Ok(Json(v))
}

/// `PUT /v1/apps/{app}/volumes/{id}/extend` → the volume at its new size, and whether the machine
/// mounting it must restart to see it.
pub(crate) async fn extend(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
    JsonBody(req): JsonBody<ExtendVolumeRequest>,
) -> Result<Json<ExtendVolumeResponse>, HttpError> {
    let answer = blocking(move || {
        let record = visible_volume(&state, &caller, &path)?;
        let size = req.new_size(record.value.volume.size_gb)?;
        let host = state.hosts().get(&record.value.host)?;
        // The disk first: a record that claimed a size its disk lacks would mislead every
        // reader, while a grown disk under a stale record is mended by the retry.
        let needs_restart = host.agent.extend_volume(&path.id, size)?;
        let record = change(&state, &path, |v| {
            v.size_gb = v.size_gb.max(size);
            Ok(())
        })?;
        Ok(ExtendVolumeResponse {
            needs_restart,
            volume: decorate(&state, record),
        })
    })
    .await?;
    Ok(Json(answer))
}

/// `DELETE /v1/apps/{app}/volumes/{id}` → the volume, `destroyed`: its disk and data are gone.
/// 412 while a machine that is not destroyed mounts it.
pub(crate) async fn destroy(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
) -> Result<Json<Volume>, HttpError> {
    let v = blocking(move || {
        let record = visible_volume(&state, &caller, &path)?;
        destroy_record(&state, &record)?;
        let mut v = record.value.volume;
        v.state = VolumeState::Destroyed;
        Ok(v)
    })
    .await?;
    Ok(Json(v))
}

/// Deletes a volume's disk on its host, then its record.
fn destroy_record(state: &ApiState, record: &Versioned<VolumeRecord>) -> Result<(), HttpError> {
    let r = &record.value;
    state.hosts().get(&r.host)?.agent.destroy_volume(&r.volume.id)?;
    match state
        .control()
        .delete_volume(&r.app, r.volume.id.as_str(), Expect::Present)
    {
        Ok(_) | Err(ControlError::Store(StoreError::Conflict { .. })) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Destroys every volume of `app` (`apps destroy`), after [`crate::machines::destroy_all`]: a
/// volume still mounted by a machine being destroyed waits for that machine, up to `wait`.
pub(crate) fn destroy_all(state: &ApiState, app: &str, wait: Duration) -> Result<(), HttpError> {
    for record in state.control().list_volumes(app)? {
        let host = state.hosts().get(&record.value.host)?;
        if let Ok(status) = host.agent.volume(&record.value.volume.id)
            && let Some(machine) = status.attached_machine_id
        {
            let waited = host.agent.wait(
                &machine,
                &HostWait {
                    states: vec![WaitState::Destroyed],
                    version: None,
                    from_event_id: None,
                    timeout: wait,
                },
            );
            if let Err(e) = waited
                && e.status() != 404
            {
                return Err(e.into());
            }
        }
        destroy_record(state, &record)?;
    }
    Ok(())
}

/// The volume record at `path` if the caller may see its app; 404 naming the volume otherwise.
fn visible_volume(
    state: &ApiState,
    caller: &Caller,
    path: &VolumePath,
) -> Result<Versioned<VolumeRecord>, HttpError> {
    let control = state.control();
    visible_app(control, caller, &path.app)?;
    Ok(control
        .get_volume(&path.app, path.id.as_str())?
        .ok_or_else(|| ApiError::not_found(format_args!("volume {}", path.id)))?)
}

/// Reads the volume's record, applies `edit` and writes it back, again on a lost race.
fn change(
    state: &ApiState,
    path: &VolumePath,
    mut edit: impl FnMut(&mut Volume) -> Result<(), HttpError>,
) -> Result<VolumeRecord, HttpError> {
    let control = state.control();
    for _ in 0..ATTEMPTS {
        let Some(current) = control.get_volume(&path.app, path.id.as_str())? else {
            return Err(ApiError::not_found(format_args!("volume {}", path.id)).into());
        };
        let mut record = current.value;
        edit(&mut record.volume)?;
        match control.put_volume(&record, Expect::Revision(current.revision)) {
            Ok(_) => return Ok(record),
            Err(ControlError::Store(StoreError::Conflict { .. })) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict("the volume is being changed by other requests; retry").into())
}

/// The host a new volume goes to: one in `region` (the server's own when none) holding no other
/// volume of the same name if there is such a host, else any of the region's. Fly's
/// `require_unique_zone` (which flyctl sets by default) asks for the former; with one host per
/// region, the common self-hosted case, insisting on it would refuse the second volume of a name
/// and with it every process group of two machines with a mount, so aloft treats it as a
/// preference.
fn place(
    state: &ApiState,
    app: &str,
    region: Option<&str>,
    req: &CreateVolumeRequest,
) -> Result<HostHandle, HttpError> {
    let first = state.hosts().place(region)?.clone();
    let region = first.region.clone();
    let used: Vec<String> = state
        .control()
        .list_volumes(app)?
        .into_iter()
        .filter(|r| r.value.volume.name == req.name || req.unique_zone_app_wide == Some(true))
        .map(|r| r.value.host)
        .collect();
    Ok(state
        .hosts()
        .all()
        .iter()
        .find(|h| h.region == region && !used.contains(&h.name))
        .cloned()
        .unwrap_or(first))
}

/// Records a volume on `host` and makes its disk there (from `source`, which `host` holds); the
/// record goes if the disk can't be made.
fn create_on(
    state: &ApiState,
    app: &str,
    host: &HostHandle,
    req: &CreateVolumeRequest,
    source: Option<VolumeSource>,
) -> Result<VolumeRecord, HttpError> {
    let bytes = random::<16>().map_err(|e| HttpError::internal(format!("read random bytes: {e}")))?;
    let volume = Volume {
        id: VolumeId::from_random(bytes),
        name: req.name.clone(),
        state: VolumeState::Created,
        region: host.region.clone(),
        zone: host.name.clone(),
        size_gb: req.size_gb.unwrap_or(DEFAULT_VOLUME_SIZE_GB),
        encrypted: false,
        fstype: VOLUME_FSTYPE.to_owned(),
        attached_machine_id: None,
        attached_alloc_id: None,
        created_at: aloft_api::rfc3339(crate::ids::now_ms()),
        host_status: None,
        snapshot_retention: Some(req.snapshot_retention.unwrap_or(DEFAULT_SNAPSHOT_RETENTION_DAYS)),
        auto_backup_enabled: Some(req.auto_backup_enabled.unwrap_or(true)),
        block_size: None,
        blocks: None,
        blocks_avail: None,
        blocks_free: None,
        bytes_total: None,
        bytes_used: None,
        kind: Some("local".to_owned()),
    };
    let record = VolumeRecord {
        app: app.to_owned(),
        host: host.name.clone(),
        volume,
    };
    // The record first, so that a crash between the two leaves a record whose disk is missing
    // (its host answers 404; `DELETE` clears it), never a disk nobody knows.
    state.control().create_volume(&record)?;
    let made = host.agent.create_volume(&HostVolume {
        id: record.volume.id.clone(),
        app: app.to_owned(),
        size_gb: record.volume.size_gb,
        source,
    });
    if let Err(e) = made {
        let _ = state
            .control()
            .delete_volume(app, record.volume.id.as_str(), Expect::Present);
        return Err(e.into());
    }
    Ok(record)
}

/// The API object: the record's volume with what its host says of it now (attachment, usage);
/// `host_status` says whether the host answered.
fn decorate(state: &ApiState, record: VolumeRecord) -> Volume {
    let mut v = record.volume;
    let status = state
        .hosts()
        .get(&record.host)
        .map_err(|_| HostStatus::Unreachable)
        .and_then(|h| {
            h.agent.volume(&v.id).map_err(|e| match e.status() {
                404 => HostStatus::Unknown,
                _ => HostStatus::Unreachable,
            })
        });
    match status {
        Ok(s) => {
            v.host_status = Some(HostStatus::Ok);
            v.attached_machine_id = s.attached_machine_id.map(|m| m.to_string());
            if let Some(u) = s.usage {
                v.block_size = Some(u.block_size);
                v.blocks = Some(u.blocks);
                v.blocks_free = Some(u.blocks_free);
                v.blocks_avail = Some(u.blocks_avail);
                v.bytes_total = Some(u.blocks.saturating_mul(u.block_size));
                v.bytes_used = Some(
                    u.blocks
                        .saturating_sub(u.blocks_free)
                        .saturating_mul(u.block_size),
                );
            }
        }
        Err(status) => v.host_status = Some(status),
    }
    v
}

/// A machine create or update asks to mount a volume (`config.mounts`): checks the mount names a
/// volume of the app, fills the mount's name and size from its record, and answers the host
/// holding it, where the machine must run. `None` when the config mounts nothing. The host
/// itself refuses a volume another machine mounts.
pub(crate) fn resolve_mount(
    state: &ApiState,
    app: &str,
    config: &mut MachineConfig,
) -> Result<Option<HostHandle>, HttpError> {
    let mount = match config.mounts.as_mut_slice() {
        [] => return Ok(None),
        [mount] => mount,
        _ => {
            return Err(ApiError::unprocessable(
                "config.mounts: a machine mounts at most one volume; keep one mount",
            )
            .into());
        }
    };
    let Some(raw) = mount.volume.as_deref() else {
        return Err(ApiError::unprocessable(
            "config.mounts[0].volume is required: the id of one of the app's volumes (aloft volumes list)",
        )
        .into());
    };
    let id: VolumeId = raw.parse().map_err(|e: aloft_api::ParseIdError| {
        ApiError::unprocessable(format!("config.mounts[0].volume: {e}"))
    })?;
    if mount.path.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::unprocessable(
            "config.mounts[0].path is required: where the volume appears in the machine, e.g. /data",
        )
        .into());
    }
    let record = state.control().get_volume(app, id.as_str())?.ok_or_else(|| {
        ApiError::unprocessable(format!(
            "config.mounts[0].volume: app {app} has no volume {id}; create one with aloft volumes create"
        ))
    })?;
    let v = &record.value.volume;
    mount.name = Some(v.name.clone());
    mount.size_gb = Some(v.size_gb);
    mount.encrypted = Some(v.encrypted);
    Ok(Some(state.hosts().get(&record.value.host)?.clone()))
}

/// A release's machine of a group whose config describes a mount by volume name (`mounts[0].name`,
/// from `[[mounts]].source`, with `size_gb` from `initial_size`): fills in the volume it mounts
/// and answers the host holding it. `machine` is the machine being updated, whose own volume of
/// that name it keeps; `host` the host it runs on (an update can't move it) or, for a new
/// machine, `None`: any unattached volume of the name in `region` will do, else a new one is
/// made. Mounts already naming a volume id are resolved as for the API.
pub(crate) fn volume_for_release(
    state: &ApiState,
    app: &str,
    config: &mut MachineConfig,
    machine: Option<(&MachineConfig, &str)>,
    region: Option<&str>,
) -> Result<Option<HostHandle>, HttpError> {
    let Some(mount) = config.mounts.first() else {
        return Ok(None);
    };
    if config.mounts.len() > 1 || mount.volume.is_some() {
        return resolve_mount(state, app, config);
    }
    let Some(name) = mount.name.clone() else {
        return Err(ApiError::unprocessable("a mount names neither a volume id nor a volume name").into());
    };
    // The machine's own volume of that name.
    if let Some((current, host)) = machine
        && let Some(own) = current
            .mounts
            .first()
            .filter(|m| m.name.as_deref() == Some(name.as_str()))
            .and_then(|m| m.volume.clone())
    {
        config.mounts[0].volume = Some(own);
        let placed = resolve_mount(state, app, config)?;
        if placed.as_ref().is_some_and(|h| h.name != host) {
            return Err(ApiError::unprocessable(format!(
                "the machine's volume is on host {}, not on the machine's host {host}",
                placed.map(|h| h.name).unwrap_or_default()
            ))
            .into());
        }
        return Ok(placed);
    }
    let on_host = machine.map(|(_, h)| h);
    let region = match on_host {
        Some(h) => Some(state.hosts().get(h)?.region.clone()),
        None => region.map(str::to_owned),
    };
    let region = region.unwrap_or_else(|| {
        state
            .hosts()
            .place(None)
            .map(|h| h.region.clone())
            .unwrap_or_default()
    });
    // An unattached volume of that name in the region (on the machine's host for an update).
    for record in state.control().list_volumes(app)? {
        let r = &record.value;
        if r.volume.name != name || r.volume.region != region || on_host.is_some_and(|h| h != r.host) {
            continue;
        }
        let Ok(host) = state.hosts().get(&r.host) else {
            continue;
        };
        if host
            .agent
            .volume(&r.volume.id)
            .is_ok_and(|s| s.attached_machine_id.is_none())
        {
            config.mounts[0].volume = Some(r.volume.id.to_string());
            return resolve_mount(state, app, config);
        }
    }
    // None: a new one, of `initial_size`.
    let req = CreateVolumeRequest {
        name: name.clone(),
        region: Some(region.clone()),
        size_gb: mount.size_gb,
        ..CreateVolumeRequest::default()
    };
    req.validate()?;
    let host = match on_host {
        Some(h) => state.hosts().get(h)?.clone(),
        None => place(state, app, Some(&region), &req)?,
    };
    let record = create_on(state, app, &host, &req, None)?;
    config.mounts[0].volume = Some(record.volume.id.to_string());
    resolve_mount(state, app, config)
}
