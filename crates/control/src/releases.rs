//! Releases: deploys that aloftd executes as durable server-side jobs (an aloft extension; wire
//! types in `aloft_api::release`).
//!
//! `POST /v1/apps/{app}/releases` records release N and starts its job; the CLI only streams the
//! job's events (`GET …/releases/{N}/events?follow=true`), so a laptop that goes away changes
//! nothing. The job:
//! 1. runs the release command, if any, in an ephemeral machine with the new image and config; a
//!    failure ends the release (`failed`) before any machine changes, with the command's last
//!    output lines among its events (the job, not the machine, destroys the machine, once it
//!    has read them);
//! 2. for every process group at once (side by side, as flyctl deploys them; the first group
//!    whose step fails stops the others at their next step), replaces the group's machines by
//!    the strategy — `immediate` (all at once), `rolling` (`max_unavailable` at a time),
//!    `canary` (one, then rolling), `bluegreen` (new machines created cordoned beside the old,
//!    uncordoned once all are healthy, then the old ones destroyed) — creating machines up to
//!    the wanted count and destroying the excess; each machine must be `started` with every check passing within `wait_timeout`, and — for a group
//!    with services — listen on each `internal_port` (not on loopback) within the checks' grace
//!    period, else the step fails at once saying what the app listens on instead. Machines that
//!    are not started ("cold": stopped by the edge when idle, suspended, never launched) are
//!    updated last, all at once, and stay stopped (flyctl's deploy does the same): the edge
//!    starts them on demand, with the new config;
//! 3. when a step fails, puts every machine it changed back (old config, new machines destroyed)
//!    and ends `rolled_back`, with the reason.
//!
//! Only machines with `fly_platform_version` in their metadata (those releases made) are the
//! release's: machines made by hand in the same app are left alone, as flyctl's deploy does.
//!
//! Durability: before it changes a machine the job records what it is about to do (the machine's
//! old config) in the release record; an aloftd that restarts resumes every unfinished release
//! ([`resume`]): machines already at the release are only checked again, the rest are done, and a
//! rollback in progress goes on. The job holds each machine's lease while it changes it, so a
//! user's concurrent change is refused (409) and a leased machine stops the release; its leases
//! carry one nonce per release (in the record), so a resumed job gives back or takes over those
//! its killed run held.
//!
//! Keys: `/releases/{app}/{version:010}` (the record), `/release-events/{app}/{version:010}/{seq:010}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aloft_api::{
    ApiError, CreateReleaseRequest, DeployStrategy, HostCreate, HostUpdate, HostWait, Machine, MachineConfig,
    MachineHost, MachineId, MachineState, Release, ReleaseEvent, ReleaseGroup, ReleaseStatus, RestartPolicy,
    RollbackRequest, WaitState, rfc3339,
};
use aloft_store::{
    Expect, KeyValue, MachineLeaseRequest, MachineRecord, Op, RangeOptions, Store, StoreError, Txn,
};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{AppName, JsonBody, MaybeJson};
use crate::ids::{hex, now_ms, random};
use crate::{ApiState, HostHandle, HttpError};

/// Metadata keys flyctl and the proxy read (fly-platform.md §1.4).
const MD_GROUP: &str = "fly_process_group";
const MD_PLATFORM: &str = "fly_platform_version";
const MD_RELEASE_VERSION: &str = "fly_release_version";
const MD_RELEASE_ID: &str = "fly_release_id";
/// The process group of a release command's machine (flyctl's reserved name).
const RELEASE_COMMAND_GROUP: &str = "fly_app_release_command";
/// The group of machines without one.
const DEFAULT_GROUP: &str = "app";
/// Default time for one machine to be started and healthy.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Longest a release command may run.
const RELEASE_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// How many of a failed release command's last output lines the release keeps as events.
const RELEASE_COMMAND_LINES: usize = 20;
/// How often the job looks at a machine's checks.
const CHECK_POLL: Duration = Duration::from_millis(50);
/// How long a started machine of a group with services has to listen on every `internal_port`
/// when none of the group's checks gives a `grace_period` (else the largest one given).
const LISTEN_GRACE: Duration = Duration::from_secs(10);
/// The least time the app of a started machine gets to listen, whatever the checks' grace.
const MIN_LISTEN_GRACE: Duration = Duration::from_secs(5);

/// A release as stored: what the API shows, what was asked, and the job's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReleaseRecord {
    release: Release,
    max_unavailable: u32,
    wait_timeout_ms: u64,
    #[serde(default)]
    release_command: Option<MachineConfig>,
    /// The job's progress, recorded before each change.
    #[serde(default)]
    job: Job,
}

/// What the job did so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Job {
    /// The release command ran and succeeded.
    #[serde(default)]
    release_command_done: bool,
    /// The machine the release command runs in, recorded before it is made: it does not destroy
    /// itself (its output is read first), so a job resumed after aloftd died destroys it.
    #[serde(default)]
    release_command_machine: Option<String>,
    /// Machines the job changed or is changing, in order.
    #[serde(default)]
    changes: Vec<Change>,
    /// Events written so far.
    #[serde(default)]
    events: u64,
    /// The failure being rolled back.
    #[serde(default)]
    rolling_back: Option<String>,
    /// The nonce of every machine lease the job takes (one per release, kept secret in the
    /// record): a resumed job recognizes the leases its previous run held and takes them over.
    #[serde(default)]
    lease_nonce: Option<String>,
    /// How many machines each group is to have, fixed when the job first gets to the group (a
    /// resumed job must not count the machines it already made as the group's old size).
    #[serde(default)]
    wanted: std::collections::BTreeMap<String, usize>,
}

/// One machine the job touches, recorded before it acts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Change {
    machine: String,
    host: String,
    group: String,
    kind: ChangeKind,
    /// The config to go back to (updates).
    #[serde(default)]
    previous: Option<MachineConfig>,
    /// The change is made and the machine passed its health gate.
    #[serde(default)]
    healthy: bool,
    /// Put back during a rollback.
    #[serde(default)]
    undone: bool,
    /// An update of a machine that was not started ("cold"): made with `skip_launch`, so it
    /// stays stopped, and judged by its config alone, as is its rollback.
    #[serde(default)]
    cold: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChangeKind {
    Update,
    Create,
    /// A new bluegreen machine (created cordoned).
    CreateCordoned,
    Destroy,
}

fn releases_prefix(app: &str) -> Result<String, StoreError> {
    Ok(format!("/releases/{}/", aloft_store::keys::segment(app)?))
}

fn release_key(app: &str, version: u64) -> Result<String, StoreError> {
    Ok(format!("{}{version:010}", releases_prefix(app)?))
}

fn events_prefix(app: &str, version: u64) -> Result<String, StoreError> {
    Ok(format!(
        "/release-events/{}/{version:010}/",
        aloft_store::keys::segment(app)?
    ))
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
        key: kv.key.clone(),
        source,
    })
}

fn load(store: &dyn Store, app: &str, version: u64) -> Result<Option<(ReleaseRecord, i64)>, HttpError> {
    let key = release_key(app, version).map_err(aloft_store::ControlError::from)?;
    Ok(match store.get(&key).map_err(aloft_store::ControlError::from)? {
        Some(kv) => Some((
            decode(&kv).map_err(aloft_store::ControlError::from)?,
            kv.mod_revision.get(),
        )),
        None => None,
    })
}

fn list(store: &dyn Store, app: &str, limit: Option<usize>) -> Result<Vec<ReleaseRecord>, HttpError> {
    let prefix = releases_prefix(app).map_err(aloft_store::ControlError::from)?;
    let range = store
        .range(
            &prefix,
            &RangeOptions {
                limit,
                descending: true,
                after: None,
            },
        )
        .map_err(aloft_store::ControlError::from)?;
    range
        .kvs
        .iter()
        .map(|kv| decode(kv).map_err(|e| aloft_store::ControlError::from(e).into()))
        .collect()
}

fn save(store: &dyn Store, rec: &ReleaseRecord) -> Result<(), HttpError> {
    let key = release_key(&rec.release.app, rec.release.version).map_err(aloft_store::ControlError::from)?;
    store
        .put(&key, encode(&key, rec).map_err(aloft_store::ControlError::from)?)
        .map_err(aloft_store::ControlError::from)?;
    Ok(())
}

/// Resolves and checks a request into the groups the release deploys.
fn resolve_groups(
    req: &CreateReleaseRequest,
    version: u64,
    release_id: &str,
) -> Result<(String, Vec<ReleaseGroup>), ApiError> {
    if req.groups.is_empty() {
        return Err(ApiError::bad_request(
            "a release needs at least one process group: give groups: [{group, config}]",
        ));
    }
    let mut image = req.image.clone().unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let mut groups = Vec::new();
    for g in &req.groups {
        let name = if g.group.trim().is_empty() {
            DEFAULT_GROUP
        } else {
            g.group.trim()
        };
        if !seen.insert(name.to_owned()) {
            return Err(ApiError::bad_request(format!(
                "process group {name:?} is given twice"
            )));
        }
        if name == RELEASE_COMMAND_GROUP {
            return Err(ApiError::bad_request(format!(
                "{RELEASE_COMMAND_GROUP} is reserved for the release command: give it as release_command"
            )));
        }
        let mut config = g.config.clone();
        if !image.is_empty() {
            config.image = Some(image.clone());
        }
        let this_image = config.image.clone().unwrap_or_default();
        if this_image.trim().is_empty() {
            return Err(ApiError::bad_request(format!(
                "group {name:?} has no image: give the release an image or set config.image"
            )));
        }
        if image.is_empty() {
            image = this_image;
        }
        check_mounts(name, &config, req.strategy)?;
        config.metadata.insert(MD_GROUP.to_owned(), name.to_owned());
        config.metadata.insert(MD_PLATFORM.to_owned(), "v2".to_owned());
        config
            .metadata
            .insert(MD_RELEASE_VERSION.to_owned(), version.to_string());
        config
            .metadata
            .insert(MD_RELEASE_ID.to_owned(), release_id.to_owned());
        groups.push(ReleaseGroup {
            group: name.to_owned(),
            config,
            count: g.count,
        });
    }
    Ok((image, groups))
}

/// A group's mounts as a release can resolve them: at most one, naming a volume (`source`) or a
/// volume id, with a path, and never with a strategy that runs two machines of a slot at once
/// (a volume is mounted by one machine at a time).
fn check_mounts(group: &str, config: &MachineConfig, strategy: DeployStrategy) -> Result<(), ApiError> {
    let mount = match config.mounts.as_slice() {
        [] => return Ok(()),
        [mount] => mount,
        _ => {
            return Err(ApiError::unprocessable(format!(
                "group {group:?}: a machine mounts at most one volume; keep one [[mounts]] for the group"
            )));
        }
    };
    if mount.volume.is_none() {
        let Some(name) = mount.name.as_deref() else {
            return Err(ApiError::unprocessable(format!(
                "group {group:?}: the mount names no volume: give [[mounts]] a source"
            )));
        };
        aloft_api::validate_volume_name(name).map_err(|e| {
            ApiError::unprocessable(format!("group {group:?}: [[mounts]] source: {}", e.message()))
        })?;
    }
    if mount.path.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::unprocessable(format!(
            "group {group:?}: the mount has no path: give [[mounts]] a destination"
        )));
    }
    if matches!(strategy, DeployStrategy::Canary | DeployStrategy::Bluegreen) {
        return Err(ApiError::unprocessable(format!(
            "group {group:?} mounts a volume, and the {} strategy runs a new machine beside the one it replaces, which a volume can't follow: use rolling or immediate",
            strategy.as_str()
        )));
    }
    Ok(())
}

/// The group a machine belongs to.
fn group_of(m: &Machine) -> String {
    m.config
        .as_ref()
        .and_then(|c| {
            c.metadata
                .get(MD_GROUP)
                .or_else(|| c.metadata.get("process_group"))
        })
        .filter(|g| !g.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_GROUP.to_owned())
}

/// Whether releases manage `m`: its config carries `fly_platform_version` (every machine a
/// release creates does).
fn managed(m: &Machine) -> bool {
    m.config
        .as_ref()
        .and_then(|c| c.metadata.get(MD_PLATFORM))
        .is_some_and(|v| !v.trim().is_empty())
}

fn release_version_of(m: &Machine) -> Option<u64> {
    m.config
        .as_ref()
        .and_then(|c| c.metadata.get(MD_RELEASE_VERSION))
        .and_then(|v| v.parse().ok())
}

/// `POST /v1/apps/{app}/releases` → 201 with the release; its job runs in the background.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    JsonBody(req): JsonBody<CreateReleaseRequest>,
) -> Result<(StatusCode, Json<Release>), HttpError> {
    let rec = blocking(move || start_release(&state, &caller, &app, &req, None)).await?;
    Ok((StatusCode::CREATED, Json(rec.release)))
}

/// Records release N+1 and starts its job.
fn start_release(
    state: &ApiState,
    caller: &Caller,
    app: &str,
    req: &CreateReleaseRequest,
    rollback_of: Option<u64>,
) -> Result<ReleaseRecord, HttpError> {
    let control = state.control();
    visible_app(control, caller, app)?;
    if state.hosts().all().is_empty() {
        return Err(ApiError::new(503, "this server runs no machines (no agent role)").into());
    }
    let store = control.store().as_ref();
    let max_unavailable = req.max_unavailable.unwrap_or(1);
    if max_unavailable == 0 {
        return Err(ApiError::bad_request("max_unavailable must be at least 1").into());
    }
    let wait = req.wait_timeout.map_or(DEFAULT_WAIT, aloft_api::Duration::get);
    if wait.is_zero() || wait > Duration::from_secs(3600) {
        return Err(ApiError::bad_request("wait_timeout must be between 1s and 1h").into());
    }
    loop {
        let latest = list(store, app, Some(1))?;
        if let Some(l) = latest.first()
            && !l.release.status.is_final()
        {
            return Err(ApiError::conflict(format!(
                "release v{} of {app} is still {}; wait for it to finish (aloft releases) and deploy again",
                l.release.version,
                serde_json::to_value(l.release.status)
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or("running")
            ))
            .into());
        }
        let version = latest.first().map_or(1, |l| l.release.version + 1);
        let release_id = hex(&random::<8>().map_err(|e| HttpError::internal(format!("random: {e}")))?);
        let (image, groups) = resolve_groups(req, version, &release_id)?;
        let release_command = req.release_command.clone().map(|mut c| {
            c.image = Some(image.clone());
            c.metadata
                .insert(MD_GROUP.to_owned(), RELEASE_COMMAND_GROUP.to_owned());
            c.metadata
                .insert(MD_RELEASE_VERSION.to_owned(), version.to_string());
            c.restart = Some(aloft_api::MachineRestart {
                policy: Some(RestartPolicy::No),
                ..Default::default()
            });
            // The job destroys it once it has read the exit and the output (a machine that
            // destroys itself takes its logs along).
            c.auto_destroy = Some(false);
            c.services.clear();
            // Fly's rule: the release command runs with no volume (it would take one from a
            // machine of the release, which mounts it).
            c.mounts.clear();
            c
        });
        let rec = ReleaseRecord {
            release: Release {
                version,
                app: app.to_owned(),
                status: ReleaseStatus::Pending,
                image,
                strategy: req.strategy,
                groups,
                user: caller.token_id.clone(),
                created_at: rfc3339(now_ms()),
                finished_at: None,
                error: None,
                rollback_of,
                metadata: req.metadata.clone(),
            },
            max_unavailable,
            wait_timeout_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            release_command,
            job: Job::default(),
        };
        let key = release_key(app, version).map_err(aloft_store::ControlError::from)?;
        let put = store.txn(Txn::new().expect(&key, Expect::Absent).then(Op::put(
            key.clone(),
            encode(&key, &rec).map_err(aloft_store::ControlError::from)?,
        )));
        match put {
            Ok(r) if r.succeeded => {
                spawn_job(state.clone(), app.to_owned(), version);
                return Ok(rec);
            }
            // Another release took this version at the same time: look again.
            Ok(_) => continue,
            Err(e) => return Err(aloft_store::ControlError::from(e).into()),
        }
    }
}

/// `GET /v1/apps/{app}/releases[?limit=N]` → releases, newest first (the newest `N`).
pub(crate) async fn index(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Release>>, HttpError> {
    let mut limit = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "limit" {
            let n = v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a positive number of releases, not {v:?}"))
            })?;
            limit = Some(n);
        }
    }
    let out = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        Ok(list(state.control().store().as_ref(), &app, limit)?
            .into_iter()
            .map(|r| r.release)
            .collect())
    })
    .await?;
    Ok(Json(out))
}

fn version_param(raw: &str) -> Result<u64, ApiError> {
    raw.trim_start_matches('v')
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::not_found(format_args!("release {raw}")))
}

/// `GET /v1/apps/{app}/releases/{version}` → the release.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app, version)): Path<(String, String)>,
) -> Result<Json<Release>, HttpError> {
    crate::extract::validate_path_app(&app)?;
    let version = version_param(&version)?;
    let rec = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        load(state.control().store().as_ref(), &app, version)?
            .map(|(r, _)| r)
            .ok_or_else(|| ApiError::not_found(format_args!("release v{version} of {app}")).into())
    })
    .await?;
    Ok(Json(rec.release))
}

/// `POST /v1/apps/{app}/releases/rollback` with `{version?}` → 201 with the new release, which
/// redeploys that one (default: the last complete release before the newest).
pub(crate) async fn rollback(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    MaybeJson(req): MaybeJson<RollbackRequest>,
) -> Result<(StatusCode, Json<Release>), HttpError> {
    let req = req.unwrap_or_default();
    let rec = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        let all = list(state.control().store().as_ref(), &app, None)?;
        let target = match req.version {
            Some(v) => all
                .iter()
                .find(|r| r.release.version == v)
                .ok_or_else(|| ApiError::not_found(format_args!("release v{v} of {app}")))?,
            None => all
                .iter()
                .skip(1)
                .find(|r| r.release.status == ReleaseStatus::Complete)
                .ok_or_else(|| {
                    ApiError::unprocessable(format!(
                        "{app} has no earlier complete release to roll back to; name one with a version"
                    ))
                })?,
        };
        let again = CreateReleaseRequest {
            image: Some(target.release.image.clone()),
            groups: target.release.groups.clone(),
            strategy: target.release.strategy,
            max_unavailable: Some(target.max_unavailable),
            wait_timeout: Some(aloft_api::Duration(Duration::from_millis(target.wait_timeout_ms))),
            release_command: None,
            metadata: target.release.metadata.clone(),
        };
        start_release(&state, &caller, &app, &again, Some(target.release.version))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(rec.release)))
}

/// `GET /v1/apps/{app}/releases/{version}/events[?follow=true]` → newline-delimited
/// [`ReleaseEvent`]s; with `follow`, open until the release is final.
pub(crate) async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    Path((app, version)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    crate::extract::validate_path_app(&app)?;
    let version = version_param(&version)?;
    let follow = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "follow" && matches!(&*v, "" | "1" | "true"));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let first = {
        let (state, app) = (state.clone(), app.clone());
        blocking(move || {
            visible_app(state.control(), &caller, &app)?;
            load(state.control().store().as_ref(), &app, version)?
                .ok_or_else(|| {
                    HttpError::from(ApiError::not_found(format_args!("release v{version} of {app}")))
                })
                .map(drop)
        })
        .await
    };
    first?;
    tokio::task::spawn_blocking(move || stream_events(&state, &app, version, follow, &tx));
    let mut response = (StatusCode::OK, Body::from_stream(crate::logs::Lines(rx))).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// Sends a release's events from the first; with `follow`, waits for new ones (a store watch)
/// until the release is final and its last event sent, or the client goes away.
fn stream_events(
    state: &ApiState,
    app: &str,
    version: u64,
    follow: bool,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
) {
    let store = state.control().store().clone();
    let Ok(prefix) = events_prefix(app, version) else {
        return;
    };
    let mut after: Option<String> = None;
    let mut watcher = None;
    loop {
        let Ok(range) = store.range(
            &prefix,
            &RangeOptions {
                limit: None,
                descending: false,
                after: after.clone(),
            },
        ) else {
            return;
        };
        for kv in &range.kvs {
            let mut line = kv.value.clone();
            line.push(b'\n');
            if tx.blocking_send(Bytes::from(line)).is_err() {
                return;
            }
            after = Some(kv.key.clone());
        }
        if !follow {
            return;
        }
        let done = load(store.as_ref(), app, version)
            .ok()
            .flatten()
            .is_none_or(|(r, _)| r.release.status.is_final());
        if done {
            // The final event is written before the status: anything left is in the next range.
            if let Ok(rest) = store.range(
                &prefix,
                &RangeOptions {
                    limit: None,
                    descending: false,
                    after: after.clone(),
                },
            ) {
                for kv in &rest.kvs {
                    let mut line = kv.value.clone();
                    line.push(b'\n');
                    let _ = tx.blocking_send(Bytes::from(line));
                }
            }
            return;
        }
        if watcher.is_none() {
            watcher = store.watch(&prefix, Some(range.revision.next())).ok();
        }
        match watcher.as_mut() {
            Some(w) => {
                if w.recv_timeout(Duration::from_secs(1)).is_err() {
                    watcher = None;
                }
            }
            None => std::thread::sleep(Duration::from_millis(250)),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Starts the job of every release that is not final (after aloftd restarted).
pub fn resume(state: &ApiState) {
    let control = state.control();
    let Ok(apps) = control.list_apps() else {
        return;
    };
    for app in apps {
        let name = app.value.name;
        if let Ok(latest) = list(control.store().as_ref(), &name, Some(1))
            && let Some(r) = latest.first()
            && !r.release.status.is_final()
        {
            spawn_job(state.clone(), name, r.release.version);
        }
    }
}

fn spawn_job(state: ApiState, app: String, version: u64) {
    let spawned = std::thread::Builder::new()
        .name(format!("release-{app}-v{version}"))
        .spawn(move || {
            let mut job = Runner { state, app, version };
            if let Err(e) = job.run() {
                eprintln!("aloftd: release v{} of {}: {e}", job.version, job.app);
            }
        });
    if let Err(e) = spawned {
        eprintln!("aloftd: could not start the job of a release: {e}");
    }
}

/// One release's job. Every method blocks.
struct Runner {
    state: ApiState,
    app: String,
    version: u64,
}

/// Why a step failed: the message for the release's error.
type StepResult<T> = Result<T, String>;

impl Runner {
    fn store(&self) -> &dyn Store {
        self.state.control().store().as_ref()
    }

    fn record(&self) -> Result<ReleaseRecord, HttpError> {
        load(self.store(), &self.app, self.version)?
            .map(|(r, _)| r)
            .ok_or_else(|| ApiError::not_found(format_args!("release v{}", self.version)).into())
    }

    /// Appends an event and saves the record with `status`.
    fn event(
        &self,
        rec: &mut ReleaseRecord,
        level: &str,
        machine: Option<&str>,
        message: String,
    ) -> Result<(), HttpError> {
        rec.job.events += 1;
        let ev = ReleaseEvent {
            seq: rec.job.events,
            timestamp: rfc3339_ms(now_ms()),
            level: level.to_owned(),
            machine: machine.map(str::to_owned),
            message,
            status: rec.release.status,
        };
        let prefix = events_prefix(&self.app, self.version).map_err(aloft_store::ControlError::from)?;
        let key = format!("{prefix}{:010}", ev.seq);
        let release_key = release_key(&self.app, self.version).map_err(aloft_store::ControlError::from)?;
        self.store()
            .txn(
                Txn::new()
                    .then(Op::put(
                        key.clone(),
                        encode(&key, &ev).map_err(aloft_store::ControlError::from)?,
                    ))
                    .then(Op::put(
                        release_key.clone(),
                        encode(&release_key, rec).map_err(aloft_store::ControlError::from)?,
                    )),
            )
            .map_err(aloft_store::ControlError::from)?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), HttpError> {
        let mut rec = self.record()?;
        if rec.release.status.is_final() {
            return Ok(());
        }
        match rec.job.lease_nonce.clone() {
            None => {
                rec.job.lease_nonce = Some(hex(
                    &random::<16>().map_err(|e| HttpError::internal(format!("random: {e}")))?
                ));
            }
            // A previous run of this job (aloftd was killed) may have died holding leases: give
            // them back (only leases with the job's own nonce go).
            Some(nonce) => {
                for c in &rec.job.changes {
                    self.unlease(&c.machine, &nonce);
                }
            }
        }
        if rec.release.status == ReleaseStatus::Pending {
            let msg = format!(
                "release v{} of {}: image {}, strategy {}",
                rec.release.version,
                self.app,
                rec.release.image,
                rec.release.strategy.as_str()
            );
            self.event(&mut rec, "info", None, msg)?;
        } else {
            self.event(
                &mut rec,
                "info",
                None,
                "aloftd restarted: resuming the release".into(),
            )?;
        }
        if let Some(reason) = rec.job.rolling_back.clone() {
            return self.roll_back(&mut rec, &reason);
        }
        if let Some(cmd) = rec.release_command.clone()
            && !rec.job.release_command_done
        {
            rec.release.status = ReleaseStatus::ReleaseCommand;
            self.event(&mut rec, "info", None, "running the release command".into())?;
            if let Err(why) = self.release_command(&mut rec, cmd) {
                return self.finish(
                    &mut rec,
                    ReleaseStatus::Failed,
                    Some(format!(
                        "the release command failed, no machine was changed: {why}"
                    )),
                );
            }
            rec.job.release_command_done = true;
            self.event(&mut rec, "info", None, "release command succeeded".into())?;
        }
        rec.release.status = ReleaseStatus::Running;
        self.event(&mut rec, "info", None, "replacing machines".into())?;
        // Process groups deploy side by side (as flyctl's do); the first failure stops the
        // others at their next step, then everything the release changed is put back.
        let groups = rec.release.groups.clone();
        let shared = Mutex::new(rec);
        let stop = AtomicBool::new(false);
        let this = &*self;
        let failures: Vec<String> = std::thread::scope(|scope| {
            let jobs: Vec<_> = groups
                .iter()
                .map(|g| {
                    let (shared, stop) = (&shared, &stop);
                    scope.spawn(move || {
                        let r = this.deploy_group(shared, stop, g);
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        r.map_err(|why| (g.group.clone(), why))
                    })
                })
                .collect();
            jobs.into_iter()
                .filter_map(|j| match j.join() {
                    Ok(Ok(())) => None,
                    Ok(Err((_, why))) if why == STOPPED => None,
                    Ok(Err((group, why))) => Some(format!("group {group}: {why}")),
                    Err(_) => Some("a group's deploy panicked".to_owned()),
                })
                .collect()
        });
        let mut rec = shared
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !failures.is_empty() {
            let reason = failures.join("; ");
            rec.job.rolling_back = Some(reason.clone());
            self.event(&mut rec, "error", None, format!("{reason}; rolling back"))?;
            return self.roll_back(&mut rec, &reason);
        }
        self.finish(&mut rec, ReleaseStatus::Complete, None)
    }

    fn finish(
        &self,
        rec: &mut ReleaseRecord,
        status: ReleaseStatus,
        error: Option<String>,
    ) -> Result<(), HttpError> {
        let message = match (&status, &error) {
            (ReleaseStatus::Complete, _) => format!("release v{} is complete", rec.release.version),
            (_, Some(e)) => e.clone(),
            (_, None) => "release ended".to_owned(),
        };
        rec.release.status = status;
        rec.release.error = error;
        rec.release.finished_at = Some(rfc3339(now_ms()));
        let level = if status == ReleaseStatus::Complete {
            "info"
        } else {
            "error"
        };
        self.event(rec, level, None, message)
    }

    fn host(&self, name: &str) -> StepResult<Arc<dyn MachineHost>> {
        self.state
            .hosts()
            .get(name)
            .map(|h| h.agent.clone())
            .map_err(|e| e.message().to_owned())
    }

    /// The app's live machines of `group` that releases manage, with their hosts. A machine
    /// without `fly_platform_version` (made by hand: `aloft machine run`, the Machines API) is
    /// not the release's to update or destroy, as flyctl's deploy leaves such machines alone.
    fn machines_of(&self, group: &str) -> StepResult<Vec<(String, Machine)>> {
        let placed: HashMap<String, MachineRecord> = self
            .state
            .control()
            .list_machines(&self.app)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|p| (p.value.machine.id.to_string(), p.value))
            .collect();
        let mut out = Vec::new();
        for h in self.state.hosts().all() {
            for m in h.agent.list(&self.app).map_err(|e| e.message().to_owned())? {
                if placed.get(m.id.as_str()).is_some_and(|p| p.host == h.name)
                    && !m.state.is_terminal()
                    && !matches!(m.state, MachineState::Destroying)
                    && managed(&m)
                    && group_of(&m) == group
                {
                    out.push((h.name.clone(), m));
                }
            }
        }
        Ok(out)
    }

    fn release_command(&self, rec: &mut ReleaseRecord, config: MachineConfig) -> StepResult<()> {
        let host = self
            .state
            .hosts()
            .place(None)
            .map_err(|e| e.message().to_owned())?
            .clone();
        let id = new_machine_id()?;
        if let Some(left) = rec.job.release_command_machine.replace(id.to_string()) {
            self.destroy_anywhere(&left);
        }
        save(self.store(), rec).map_err(|e| e.to_string())?;
        let result = self.run_release_command(rec, &host, &id, config);
        let _ = host.agent.destroy(&id, true);
        rec.job.release_command_machine = None;
        save(self.store(), rec).map_err(|e| e.to_string())?;
        result
    }

    /// Destroys machine `id` of the app on whichever host has it (a leftover: errors are moot).
    fn destroy_anywhere(&self, id: &str) {
        if let Ok(id) = id.parse::<MachineId>() {
            for h in self.state.hosts().all() {
                let _ = h.agent.destroy(&id, true);
            }
        }
    }

    /// Runs the release command in machine `id` until it exits; its exit code 0 is success.
    fn run_release_command(
        &self,
        rec: &mut ReleaseRecord,
        host: &HostHandle,
        id: &MachineId,
        config: MachineConfig,
    ) -> StepResult<()> {
        self.create_machine(&host.name, id, config, false)?;
        let agent = host.agent.clone();
        let _ = self.event(
            rec,
            "info",
            Some(id.as_str()),
            format!("release command runs in machine {id}"),
        );
        let deadline = Instant::now() + RELEASE_COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.command_output(rec, agent.as_ref(), id);
                return Err(format!(
                    "it did not finish within {}s",
                    RELEASE_COMMAND_TIMEOUT.as_secs()
                ));
            }
            let w = agent.wait(
                id,
                &HostWait {
                    states: vec![WaitState::Stopped, WaitState::Destroyed, WaitState::Failed],
                    version: None,
                    from_event_id: None,
                    timeout: left.min(Duration::from_secs(60)),
                },
            );
            match w {
                Ok(_) => break,
                Err(e) if e.status() == 408 => {}
                Err(e) => return Err(e.message().to_owned()),
            }
        }
        let events = agent.events(id, 50).map_err(|e| e.message().to_owned())?;
        let exit = events
            .iter()
            .find(|e| e.kind == "exit")
            .and_then(|e| e.request.as_ref())
            .and_then(|r| r.exit_event.as_ref())
            .map(|x| x.exit_code);
        // The machine goes, and its logs with it: a failure's output goes into the release.
        let last = if exit == Some(0) {
            None
        } else {
            self.command_output(rec, agent.as_ref(), id)
        };
        let said = last.map_or_else(String::new, |l| format!(": {l}"));
        match exit {
            Some(0) => Ok(()),
            Some(code) => Err(format!("it exited with code {code}{said}")),
            None => Err(format!("machine {id} ended without an exit status{said}")),
        }
    }

    /// The release command's output (its last [`RELEASE_COMMAND_LINES`] lines) as the release's
    /// events, before its machine is destroyed; the last line, to quote in the error.
    fn command_output(
        &self,
        rec: &mut ReleaseRecord,
        agent: &dyn MachineHost,
        id: &MachineId,
    ) -> Option<String> {
        let lines: Vec<_> = agent
            .log_tail(id, RELEASE_COMMAND_LINES * 4)
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.meta.event.provider == "app")
            .collect();
        let shown = &lines[lines.len().saturating_sub(RELEASE_COMMAND_LINES)..];
        for line in shown {
            // stdout lines are `info`, stderr lines `error`, as in the machine's log.
            let message = format!("release command: {}", line.message);
            let _ = self.event(rec, &line.level, Some(id.as_str()), message);
        }
        shown.last().map(|l| l.message.clone())
    }

    /// Creates machine `id` of the app on `host` (placement first, as the API does).
    fn create_machine(
        &self,
        host: &str,
        id: &MachineId,
        config: MachineConfig,
        cordoned: bool,
    ) -> StepResult<()> {
        let control = self.state.control();
        let handle = self
            .state
            .hosts()
            .get(host)
            .map_err(|e| e.message().to_owned())?
            .clone();
        let app = control
            .get_app(&self.app)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("app {} was deleted", self.app))?
            .value;
        let org = control
            .org_network(&app.organization.slug)
            .map_err(|e| e.to_string())?;
        let placement = crate::machines::placement_record(&self.app, &handle, id, id.as_str());
        control
            .create_machine(&MachineRecord {
                cordoned,
                ..placement
            })
            .map_err(|e| e.to_string())?;
        let secrets = self.secrets()?;
        let created = handle.agent.create(HostCreate {
            id: id.clone(),
            app: self.app.clone(),
            name: id.to_string(),
            region: handle.region.clone(),
            org,
            config,
            skip_launch: false,
            secrets,
        });
        if let Err(e) = created {
            if handle.agent.get(id).is_err() {
                let _ = control.delete_machine(&self.app, id.as_str());
            }
            return Err(e.message().to_owned());
        }
        Ok(())
    }

    /// The app's secrets as they are now: every machine the release makes or changes boots
    /// with them (this is how a secrets change reaches the machines).
    fn secrets(&self) -> StepResult<aloft_api::SecretEnv> {
        crate::secrets::for_machine(&self.state, &self.app, false, None)
            .map_err(|e| e.api().message().to_owned())
    }

    /// Takes the machine's lease for the job (refused when someone else holds it). A lease with
    /// the job's own nonce is one an earlier run of the job held (aloftd restarted): taken over.
    fn lease(&self, rec: &ReleaseRecord, machine: &str, wait: Duration) -> StepResult<String> {
        let nonce = rec
            .job
            .lease_nonce
            .clone()
            .ok_or_else(|| "the release job has no lease nonce".to_owned())?;
        let req = MachineLeaseRequest {
            nonce: nonce.clone(),
            owner: format!("release v{}", self.version),
            description: format!("deploying release v{}", self.version),
            ttl: wait + Duration::from_secs(60),
            version: String::new(),
        };
        let control = self.state.control();
        match control.acquire_lease(&self.app, machine, &req) {
            Ok(_) => Ok(nonce),
            Err(e) => {
                let ours = control
                    .get_lease(&self.app, machine)
                    .ok()
                    .flatten()
                    .is_some_and(|l| l.nonce == nonce);
                if !ours {
                    return Err(format!("machine {machine}: {}", e.to_api().message()));
                }
                let _ = control.release_lease(&self.app, machine, &nonce);
                control
                    .acquire_lease(&self.app, machine, &req)
                    .map_err(|e| format!("machine {machine}: {}", e.to_api().message()))?;
                Ok(nonce)
            }
        }
    }

    fn unlease(&self, machine: &str, nonce: &str) {
        let _ = self.state.control().release_lease(&self.app, machine, nonce);
    }

    /// Waits until the machine runs `version`'s config started, with every check passing. With
    /// `listen` (a deploy step, not a rollback), the app must also listen on every service's
    /// `internal_port` within the checks' grace period ([`Runner::listening`]).
    fn healthy(
        &self,
        agent: &dyn MachineHost,
        id: &MachineId,
        wait: Duration,
        listen: Option<&MachineConfig>,
    ) -> StepResult<()> {
        self.healthy_on(agent, id, wait, listen, listen)
    }

    /// [`Runner::healthy`], and the machine must run `expect` (its release version and image):
    /// a change the host could not make leaves the machine started on its old config, which is
    /// not success.
    fn healthy_on(
        &self,
        agent: &dyn MachineHost,
        id: &MachineId,
        wait: Duration,
        listen: Option<&MachineConfig>,
        expect: Option<&MachineConfig>,
    ) -> StepResult<()> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("machine {id} was not started within {}s", wait.as_secs()));
            }
            let w = agent.wait(
                id,
                &HostWait {
                    states: vec![
                        WaitState::Started,
                        WaitState::Failed,
                        WaitState::Stopped,
                        WaitState::Destroyed,
                    ],
                    version: None,
                    from_event_id: None,
                    timeout: left.min(Duration::from_secs(60)),
                },
            );
            match w {
                Ok(r) if r.state == MachineState::Started => break,
                Ok(r) => {
                    return Err(format!(
                        "machine {id} is {} instead of started (see aloft logs -i {id})",
                        r.state
                    ));
                }
                Err(e) if e.status() == 408 => {}
                Err(e) => return Err(e.message().to_owned()),
            }
        }
        if let Some(want) = expect {
            self.runs_config(agent, &agent.get(id).map_err(|e| e.message().to_owned())?, want)?;
        }
        if let Some(config) = listen {
            self.listening(agent, id, config, deadline)?;
        }
        loop {
            let m = agent.get(id).map_err(|e| e.message().to_owned())?;
            if m.state != MachineState::Started {
                return Err(format!(
                    "machine {id} left started ({}) (see aloft logs -i {id})",
                    m.state
                ));
            }
            let failing: Vec<String> = m
                .checks
                .iter()
                .filter(|c| c.status != aloft_api::CheckState::Passing)
                .map(|c| {
                    format!(
                        "{} is {}: {}",
                        c.name,
                        serde_json::to_value(c.status)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or("?"),
                        c.output
                    )
                })
                .collect();
            if failing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "machine {id}'s checks did not pass within {}s: {}",
                    wait.as_secs(),
                    failing.join("; ")
                ));
            }
            std::thread::sleep(CHECK_POLL);
        }
    }

    /// Fail fast: a started machine of a group with services must listen on each service's
    /// `internal_port` (its protocol) on an address the proxy reaches — not loopback — within
    /// the grace period ([`listen_grace`]); init's process list (`ps`) tells. When it does not,
    /// the step fails saying what the app listens on instead. A host that cannot list the
    /// machine's processes at all leaves the decision to the checks.
    fn listening(
        &self,
        agent: &dyn MachineHost,
        id: &MachineId,
        config: &MachineConfig,
        deadline: Instant,
    ) -> StepResult<()> {
        let mut wanted: Vec<(u16, String)> = Vec::new();
        for s in &config.services {
            if let Some(port) = s.internal_port {
                let proto = s.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase();
                if !wanted.contains(&(port, proto.clone())) {
                    wanted.push((port, proto));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let until = (start + listen_grace(config)).min(deadline);
        let window = until.saturating_duration_since(start);
        let mut sockets: Option<Vec<aloft_api::ListenSocket>> = None;
        loop {
            match agent.ps(id) {
                Ok(ps) => {
                    let all = || ps.iter().flat_map(|p| p.listen_sockets.iter());
                    if wanted
                        .iter()
                        .all(|(port, proto)| all().any(|s| reachable(s, *port, proto)))
                    {
                        return Ok(());
                    }
                    let mut unique = std::collections::HashSet::new();
                    sockets = Some(
                        all()
                            .filter(|s| unique.insert((s.proto.as_str(), s.address.as_str())))
                            .cloned()
                            .collect(),
                    );
                }
                Err(e) => {
                    let m = agent.get(id).map_err(|e| e.message().to_owned())?;
                    if m.state != MachineState::Started {
                        return Err(format!(
                            "machine {id} left started ({}) (see aloft logs -i {id})",
                            m.state
                        ));
                    }
                    if e.status() == 404 {
                        return Err(e.message().to_owned());
                    }
                }
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(CHECK_POLL);
        }
        let Some(seen) = sockets else {
            return Ok(());
        };
        const SHOWN: usize = 10;
        let listens = if seen.is_empty() {
            "nothing listens yet".to_owned()
        } else {
            let mut shown: Vec<String> = seen
                .iter()
                .take(SHOWN)
                .map(|s| format!("{} ({})", s.address, s.proto))
                .collect();
            if seen.len() > SHOWN {
                shown.push(format!("and {} more", seen.len() - SHOWN));
            }
            format!("app listens on {}", shown.join(", "))
        };
        let expected = wanted
            .iter()
            .filter(|(port, proto)| !seen.iter().any(|s| reachable(s, *port, proto)))
            .map(|(port, proto)| {
                if proto == "tcp" {
                    format!("0.0.0.0:{port}")
                } else {
                    format!("0.0.0.0:{port} ({proto})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "machine {id} does not listen on its services' internal_port within {:?}: {listens}, expected {expected} (see aloft logs -i {id})",
            window
        ))
    }

    /// The machine `m` runs `want` (its release version and image): a change the host could not
    /// make leaves the machine on its old config, which is not success.
    fn runs_config(&self, agent: &dyn MachineHost, m: &Machine, want: &MachineConfig) -> StepResult<()> {
        let runs = m.config.as_ref();
        let same = runs.and_then(|c| c.metadata.get(MD_RELEASE_VERSION))
            == want.metadata.get(MD_RELEASE_VERSION)
            && runs.and_then(|c| c.image.as_deref()) == want.image.as_deref();
        if same {
            return Ok(());
        }
        // The host's operation failed and the machine stayed on its config: say why.
        let why = agent
            .log_tail(&m.id, 20)
            .unwrap_or_default()
            .into_iter()
            .rev()
            .find(|l| l.meta.event.provider == "runner" && l.message.contains("failed"))
            .map_or_else(|| "the host could not apply it".to_owned(), |l| l.message);
        Err(format!(
            "machine {} did not take the new config ({}): {why}",
            m.id,
            want.image.as_deref().unwrap_or("-")
        ))
    }

    /// The verdict on a machine the job changed: a cold one by [`Runner::cold_updated`], any
    /// other as started and healthy ([`Runner::healthy`]).
    fn judge(
        &self,
        agent: &dyn MachineHost,
        id: &MachineId,
        wait: Duration,
        cold: bool,
        want: Option<&MachineConfig>,
    ) -> StepResult<()> {
        if cold {
            self.cold_updated(agent, id, wait, want)
        } else {
            self.healthy(agent, id, wait, want)
        }
    }

    /// Waits until a cold machine's update is over: it rests as it was (stopped) on `want`.
    /// One the edge woke meanwhile is judged as a started one ([`Runner::healthy`]).
    fn cold_updated(
        &self,
        agent: &dyn MachineHost,
        id: &MachineId,
        wait: Duration,
        want: Option<&MachineConfig>,
    ) -> StepResult<()> {
        match self.settle(agent, id, wait)? {
            None => Err(format!("machine {id} is gone")),
            Some(m) if m.state == MachineState::Started => self.healthy(agent, id, wait, want),
            Some(m) if is_cold(&m) => want.map_or(Ok(()), |want| self.runs_config(agent, &m, want)),
            Some(m) => Err(format!(
                "machine {id} is {} after its update (see aloft logs -i {id})",
                m.state
            )),
        }
    }

    /// Waits until the machine rests in a state (`started`, `stopped`, … or gone): an operation
    /// in flight — one a killed aloftd's agent resumes, or a user's — finishes first. Returns the
    /// machine as it is then; `None` when the host does not know it.
    fn settle(&self, agent: &dyn MachineHost, id: &MachineId, wait: Duration) -> StepResult<Option<Machine>> {
        let deadline = Instant::now() + wait;
        loop {
            let m = match agent.get(id) {
                Ok(m) => m,
                Err(e) if e.status() == 404 => return Ok(None),
                Err(e) => return Err(e.message().to_owned()),
            };
            if m.state.is_settled() || m.state.is_terminal() {
                return Ok(Some(m));
            }
            if Instant::now() >= deadline {
                return Err(format!("machine {id} stayed {} for {}s", m.state, wait.as_secs()));
            }
            std::thread::sleep(CHECK_POLL);
        }
    }

    /// Records a change before it is made. An update of a machine the job began and did not
    /// finish (a resumed job) keeps its first record, with the config to go back to.
    fn begin(&self, rec: &mut ReleaseRecord, change: Change) -> Result<usize, String> {
        if change.kind == ChangeKind::Update
            && let Some(i) = rec.job.changes.iter().position(|c| {
                c.machine == change.machine && c.kind == ChangeKind::Update && !c.healthy && !c.undone
            })
        {
            return Ok(i);
        }
        rec.job.changes.push(change);
        save(self.store(), rec).map_err(|e| e.to_string())?;
        Ok(rec.job.changes.len() - 1)
    }

    fn done(&self, rec: &mut ReleaseRecord, idx: usize, message: String) -> Result<(), String> {
        if let Some(c) = rec.job.changes.get_mut(idx) {
            c.healthy = true;
        }
        let machine = rec.job.changes.get(idx).map(|c| c.machine.clone());
        self.event(rec, "info", machine.as_deref(), message)
            .map_err(|e| e.to_string())
    }

    fn deploy_group(&self, rec: &Shared, stop: &AtomicBool, g: &ReleaseGroup) -> StepResult<()> {
        let wait = Duration::from_millis(locked(rec).wait_timeout_ms);
        let mut existing = self.machines_of(&g.group)?;
        // A machine in the middle of an operation (say, an update a killed aloftd began and its
        // agent resumed) is looked at once that is over: its config may be the release's by then.
        let mut settled = Vec::with_capacity(existing.len());
        for (host, m) in existing.drain(..) {
            if m.state.is_settled() {
                settled.push((host, m));
                continue;
            }
            let agent = self.host(&host)?;
            if let Some(m) = self.settle(agent.as_ref(), &m.id, wait)?
                && !m.state.is_terminal()
            {
                settled.push((host, m));
            }
        }
        let existing = settled;
        let wanted = locked(rec).job.wanted.get(&g.group).copied();
        let want = match wanted {
            Some(n) => n,
            None => {
                let n = match g.count {
                    Some(n) => n as usize,
                    None if existing.is_empty() => {
                        if g.config.services.is_empty() {
                            1
                        } else {
                            2
                        }
                    }
                    None => existing.len(),
                };
                let mut r = locked(rec);
                r.job.wanted.insert(g.group.clone(), n);
                save(self.store(), &r).map_err(|e| e.to_string())?;
                n
            }
        };
        // Machines this release already handled (resumed job): only check them again.
        let (version, strategy, max_unavailable) = {
            let r = locked(rec);
            (r.release.version, r.release.strategy, r.max_unavailable)
        };
        let (current, stale): (Vec<_>, Vec<_>) = existing
            .into_iter()
            .partition(|(_, m)| release_version_of(m) == Some(version));
        for (host, m) in &current {
            let agent = self.host(host)?;
            let cold = locked(rec)
                .job
                .changes
                .iter()
                .any(|c| c.machine == m.id.as_str() && c.cold);
            self.judge(agent.as_ref(), &m.id, wait, cold, Some(&g.config))?;
        }
        let have = current.len();
        if strategy == DeployStrategy::Bluegreen {
            return self.bluegreen(rec, stop, g, stale, &current, want.saturating_sub(have), wait);
        }
        let keep = want.saturating_sub(have);
        let (to_update, to_destroy): (Vec<_>, Vec<_>) = {
            let mut it = stale.into_iter();
            let upd: Vec<_> = it.by_ref().take(keep).collect();
            (upd, it.collect())
        };
        let to_create = keep.saturating_sub(to_update.len());
        // Machines that are not started (stopped by the edge when idle, suspended, never
        // launched) are "cold": updated after the started ones, all at once, and left as they
        // were, not booted (flyctl's deploy does the same); the edge starts them on demand.
        let (cold, warm): (Vec<_>, Vec<_>) = to_update.into_iter().partition(|(_, m)| is_cold(m));
        let mut work: Vec<Work> = warm
            .into_iter()
            .map(|(h, m)| Work::Update(h, Box::new(m), false))
            .collect();
        for _ in 0..to_create {
            work.push(Work::Create);
        }
        let batch = match strategy {
            DeployStrategy::Immediate => work.len().max(1),
            _ => max_unavailable as usize,
        };
        let mut first = strategy == DeployStrategy::Canary;
        while !work.is_empty() {
            stopped(stop)?;
            let n = if first { 1 } else { batch.min(work.len()) };
            first = false;
            let chunk: Vec<Work> = work.drain(..n).collect();
            self.apply_batch(rec, g, chunk, wait)?;
        }
        if !cold.is_empty() {
            stopped(stop)?;
            let chunk = cold
                .into_iter()
                .map(|(h, m)| Work::Update(h, Box::new(m), true))
                .collect();
            self.apply_batch(rec, g, chunk, wait)?;
        }
        for (host, m) in to_destroy {
            stopped(stop)?;
            self.destroy_machine(rec, &g.group, &host, &m, wait)?;
        }
        Ok(())
    }

    /// Changes a batch of machines at once and waits until all are healthy.
    fn apply_batch(
        &self,
        rec: &Shared,
        g: &ReleaseGroup,
        chunk: Vec<Work>,
        wait: Duration,
    ) -> StepResult<()> {
        let mut started = Vec::new();
        let launched = self.launch_batch(rec, g, chunk, wait, &mut started);
        let mut failure = launched.err();
        for (idx, agent, id, nonce) in started {
            let cold = locked(rec).job.changes.get(idx).is_some_and(|c| c.cold);
            let ok = if failure.is_some() {
                Ok(())
            } else {
                self.judge(agent.as_ref(), &id, wait, cold, Some(&g.config))
            };
            if let Some(n) = nonce {
                self.unlease(id.as_str(), &n);
            }
            match ok {
                Ok(()) if failure.is_none() => {
                    let message = if cold {
                        format!(
                            "machine {id} is updated and stays stopped, as it was (not started, so not checked)"
                        )
                    } else {
                        format!("machine {id} is started and healthy")
                    };
                    self.done(&mut locked(rec), idx, message)?
                }
                Ok(()) => {}
                Err(e) => failure = Some(e),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Starts the changes of a batch; `started` gets each one made (with its lease, which the
    /// caller gives back, also when a later change of the batch fails).
    #[allow(clippy::type_complexity, reason = "one private list")]
    fn launch_batch(
        &self,
        rec: &Shared,
        g: &ReleaseGroup,
        chunk: Vec<Work>,
        wait: Duration,
        started: &mut Vec<(usize, Arc<dyn MachineHost>, MachineId, Option<String>)>,
    ) -> StepResult<()> {
        for w in chunk {
            match w {
                Work::Update(host, m, cold) => {
                    let nonce = self.lease(&locked(rec), m.id.as_str(), wait)?;
                    // Cold only if it still is: the edge may have woken it since it was listed.
                    let cold = cold
                        && self
                            .host(&host)
                            .and_then(|a| a.get(&m.id).map_err(|e| e.message().to_owned()))
                            .is_ok_and(|now| is_cold(&now));
                    let begun = self.begin(
                        &mut locked(rec),
                        Change {
                            machine: m.id.to_string(),
                            host: host.clone(),
                            group: g.group.clone(),
                            kind: ChangeKind::Update,
                            previous: m.config.clone(),
                            healthy: false,
                            undone: false,
                            cold,
                        },
                    );
                    let updated = begun.and_then(|idx| {
                        let agent = self.host(&host)?;
                        let mut config = g.config.clone();
                        let current = m.config.clone().unwrap_or_default();
                        crate::volumes::volume_for_release(
                            &self.state,
                            &self.app,
                            &mut config,
                            Some((&current, host.as_str())),
                            None,
                        )
                        .map_err(|e| format!("update machine {}: {}", m.id, e.api().message()))?;
                        agent
                            .update(
                                &m.id,
                                HostUpdate {
                                    config,
                                    skip_launch: cold,
                                    current_version: None,
                                    secrets: self.secrets()?,
                                },
                            )
                            .map_err(|e| format!("update machine {}: {}", m.id, e.message()))?;
                        Ok((idx, agent))
                    });
                    let (idx, agent) = match updated {
                        Ok(v) => v,
                        Err(e) => {
                            self.unlease(m.id.as_str(), &nonce);
                            return Err(e);
                        }
                    };
                    let _ = self.event(
                        &mut locked(rec),
                        "info",
                        Some(m.id.as_str()),
                        format!("updating machine {}", m.id),
                    );
                    started.push((idx, agent, m.id.clone(), Some(nonce)));
                }
                Work::Create => {
                    let (idx, host, id) = self.create_recorded(rec, g, ChangeKind::Create)?;
                    let _ = self.event(
                        &mut locked(rec),
                        "info",
                        Some(id.as_str()),
                        format!("created machine {id}"),
                    );
                    // Held until the machine is healthy, like the machines the job updates: the
                    // edge's autostop must not idle a machine the release is still judging.
                    let nonce = self.lease(&locked(rec), id.as_str(), wait).ok();
                    started.push((idx, host.agent.clone(), id, nonce));
                }
            }
        }
        Ok(())
    }

    /// Creates a machine of group `g` on the host placement picks, recording the change (with
    /// the id chosen first) before the machine exists, so a job killed in between finds it to
    /// undo. `kind` is [`ChangeKind::Create`], or [`ChangeKind::CreateCordoned`] for a bluegreen
    /// machine kept out of the pool.
    fn create_recorded(
        &self,
        rec: &Shared,
        g: &ReleaseGroup,
        kind: ChangeKind,
    ) -> StepResult<(usize, HostHandle, MachineId)> {
        // A group with a mount gets its volume first (an unattached one of the name, or a new
        // one), and the machine goes to the volume's host.
        let mut config = g.config.clone();
        let volume_host = crate::volumes::volume_for_release(&self.state, &self.app, &mut config, None, None)
            .map_err(|e| {
                format!(
                    "volume for a new machine of group {}: {}",
                    g.group,
                    e.api().message()
                )
            })?;
        let host = match volume_host {
            Some(h) => h,
            None => self
                .state
                .hosts()
                .place(None)
                .map_err(|e| e.message().to_owned())?
                .clone(),
        };
        let id = new_machine_id()?;
        let idx = self.begin(
            &mut locked(rec),
            Change {
                machine: id.to_string(),
                host: host.name.clone(),
                group: g.group.clone(),
                kind,
                previous: None,
                healthy: false,
                undone: false,
                cold: false,
            },
        )?;
        self.create_machine(&host.name, &id, config, kind == ChangeKind::CreateCordoned)?;
        Ok((idx, host, id))
    }

    fn destroy_machine(
        &self,
        rec: &Shared,
        group: &str,
        host: &str,
        m: &Machine,
        wait: Duration,
    ) -> StepResult<()> {
        let nonce = self.lease(&locked(rec), m.id.as_str(), wait)?;
        let idx = self.begin(
            &mut locked(rec),
            Change {
                machine: m.id.to_string(),
                host: host.to_owned(),
                group: group.to_owned(),
                kind: ChangeKind::Destroy,
                previous: m.config.clone(),
                healthy: false,
                undone: false,
                cold: false,
            },
        )?;
        let agent = self.host(host)?;
        let r = agent.destroy(&m.id, true).and_then(|()| {
            // Complete means gone: wait until the host has destroyed it.
            agent.wait(
                &m.id,
                &HostWait {
                    states: vec![WaitState::Destroyed],
                    version: None,
                    from_event_id: None,
                    timeout: wait.min(Duration::from_secs(60)),
                },
            )
        });
        self.unlease(m.id.as_str(), &nonce);
        r.map_err(|e| format!("destroy machine {}: {}", m.id, e.message()))?;
        self.done(
            &mut locked(rec),
            idx,
            format!("destroyed machine {} (the group has fewer now)", m.id),
        )
    }

    #[allow(clippy::too_many_arguments, reason = "one private step of deploy_group")]
    fn bluegreen(
        &self,
        rec: &Shared,
        stop: &AtomicBool,
        g: &ReleaseGroup,
        old: Vec<(String, Machine)>,
        resumed: &[(String, Machine)],
        want: usize,
        wait: Duration,
    ) -> StepResult<()> {
        // Green: new machines beside the old ones, out of the proxy's pool until all are healthy.
        let mut green = Vec::new();
        for _ in 0..want {
            stopped(stop)?;
            let (idx, host, id) = self.create_recorded(rec, g, ChangeKind::CreateCordoned)?;
            let _ = self.event(
                &mut locked(rec),
                "info",
                Some(id.as_str()),
                format!("created green machine {id} (cordoned)"),
            );
            green.push((idx, host, id));
        }
        for (idx, host, id) in &green {
            self.healthy(host.agent.as_ref(), id, wait, Some(&g.config))?;
            self.done(&mut locked(rec), *idx, format!("green machine {id} is healthy"))?;
        }
        // Swap: green into the pool (with those an earlier run of the job made), blue out.
        for id in green
            .iter()
            .map(|(_, _, id)| id)
            .chain(resumed.iter().map(|(_, m)| &m.id))
        {
            self.set_cordoned(id.as_str(), false)?;
        }
        stopped(stop)?;
        let _ = self.event(
            &mut locked(rec),
            "info",
            None,
            "green machines are in the pool; destroying the blue ones".into(),
        );
        for (host, m) in old {
            self.destroy_machine(rec, &g.group, &host, &m, wait)?;
        }
        Ok(())
    }

    fn set_cordoned(&self, machine: &str, cordoned: bool) -> StepResult<()> {
        let control = self.state.control();
        let p = control
            .get_machine(&self.app, machine)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("machine {machine} has no placement record"))?;
        control
            .put_machine(
                &MachineRecord { cordoned, ..p.value },
                Expect::Revision(p.revision),
            )
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Puts back every change the job made (newest first): updated machines get their old
    /// config, created ones are destroyed; destroyed ones cannot come back (the group keeps the
    /// machines it has). Ends `rolled_back` (or `failed` if putting back failed too).
    fn roll_back(&self, rec: &mut ReleaseRecord, reason: &str) -> Result<(), HttpError> {
        let wait = Duration::from_millis(rec.wait_timeout_ms);
        let mut trouble = Vec::new();
        for i in (0..rec.job.changes.len()).rev() {
            let c = rec.job.changes[i].clone();
            if c.undone {
                continue;
            }
            let agent = match self.host(&c.host) {
                Ok(a) => a,
                Err(e) => {
                    trouble.push(e);
                    continue;
                }
            };
            let id: MachineId = match c.machine.parse() {
                Ok(id) => id,
                Err(_) => continue,
            };
            // An operation in flight (a resumed rollback) ends first.
            if let Err(e) = self.settle(agent.as_ref(), &id, wait) {
                trouble.push(e);
                continue;
            }
            // A cold machine goes back without being booted, unless the edge woke it since.
            let cold = c.cold && agent.get(&id).is_ok_and(|m| is_cold(&m));
            let result: StepResult<String> = match c.kind {
                ChangeKind::Update => match c.previous.clone() {
                    Some(prev) => self
                        .secrets()
                        .and_then(|secrets| {
                            agent
                                .update(
                                    &id,
                                    HostUpdate {
                                        config: prev,
                                        skip_launch: cold,
                                        current_version: None,
                                        secrets,
                                    },
                                )
                                .map_err(|e| e.message().to_owned())
                        })
                        .and_then(|_| self.judge(agent.as_ref(), &id, wait, cold, None))
                        .map(|()| format!("machine {id} is back on its previous config")),
                    None => Ok(format!("machine {id} had no previous config to go back to")),
                },
                ChangeKind::Create | ChangeKind::CreateCordoned => match agent.destroy(&id, true) {
                    Ok(()) => Ok(format!("destroyed machine {id}, which this release created")),
                    Err(e) if e.status() == 404 => Ok(format!("machine {id} is already gone")),
                    Err(e) => Err(e.message().to_owned()),
                },
                ChangeKind::Destroy => Ok(format!("machine {id} was destroyed by this release and stays so")),
            };
            match result {
                Ok(msg) => {
                    rec.job.changes[i].undone = true;
                    self.event(rec, "info", Some(id.as_str()), msg)?;
                }
                Err(e) => {
                    self.event(
                        rec,
                        "error",
                        Some(id.as_str()),
                        format!("could not put machine {id} back: {e}"),
                    )?;
                    trouble.push(e);
                }
            }
        }
        rec.job.rolling_back = None;
        if trouble.is_empty() {
            self.finish(
                rec,
                ReleaseStatus::RolledBack,
                Some(format!("{reason}; rolled back")),
            )
        } else {
            self.finish(
                rec,
                ReleaseStatus::Failed,
                Some(format!(
                    "{reason}; rolling back failed too: {}",
                    trouble.join("; ")
                )),
            )
        }
    }
}

/// How long the app of a started machine has to listen on its services' ports: the largest
/// `grace_period` of the config's checks (top-level and service checks) — the time its owner
/// says it needs to start — but at least [`MIN_LISTEN_GRACE`] (a grace of `0s` means "check at
/// once", not "the app starts in no time"), else [`LISTEN_GRACE`].
fn listen_grace(config: &MachineConfig) -> Duration {
    config
        .checks
        .values()
        .filter_map(|c| c.grace_period.as_ref())
        .chain(
            config
                .services
                .iter()
                .flat_map(|s| s.checks.iter())
                .filter_map(|c| c.grace_period.as_ref()),
        )
        .map(|d| d.get())
        .max()
        .map_or(LISTEN_GRACE, |g| g.max(MIN_LISTEN_GRACE))
}

/// Whether `socket` serves `port`/`proto` from outside the machine: bound to any address but
/// loopback (the unspecified `0.0.0.0`/`::`, or one of the machine's own).
fn reachable(socket: &aloft_api::ListenSocket, port: u16, proto: &str) -> bool {
    socket.proto.eq_ignore_ascii_case(proto)
        && socket
            .address
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse() == Ok(port))
        && socket
            .address
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() == port && !a.ip().is_loopback())
}

/// The release record the jobs of its process groups share.
type Shared = Mutex<ReleaseRecord>;

/// The shared record, for a short change or read (never held across a wait).
fn locked(rec: &Shared) -> MutexGuard<'_, ReleaseRecord> {
    rec.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a group's job ends with when another group's step failed first: not a failure of its
/// own (the release's error names the one that was).
const STOPPED: &str = "stopped: another process group failed";

fn stopped(stop: &AtomicBool) -> StepResult<()> {
    if stop.load(Ordering::Relaxed) {
        Err(STOPPED.to_owned())
    } else {
        Ok(())
    }
}

/// A machine that is not started and rests so: a release updates it without booting it.
fn is_cold(m: &Machine) -> bool {
    matches!(
        m.state,
        MachineState::Stopped | MachineState::Suspended | MachineState::Created
    )
}

fn new_machine_id() -> StepResult<MachineId> {
    crate::machines::new_machine_id().map_err(|e| e.to_string())
}

/// A machine to change in a batch.
enum Work {
    /// An update of an existing machine on a host; `true` when it was not started (cold).
    Update(String, Box<Machine>, bool),
    Create,
}

fn rfc3339_ms(ms: i64) -> String {
    let base = rfc3339(ms);
    // `2026-12-02T07:33:43Z` → with milliseconds.
    match base.strip_suffix('Z') {
        Some(b) => format!("{b}.{:03}Z", ms.rem_euclid(1000)),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(groups: Vec<(&str, Option<&str>)>) -> CreateReleaseRequest {
        CreateReleaseRequest {
            groups: groups
                .into_iter()
                .map(|(g, image)| ReleaseGroup {
                    group: g.to_owned(),
                    config: MachineConfig {
                        image: image.map(str::to_owned),
                        ..MachineConfig::default()
                    },
                    count: None,
                })
                .collect(),
            ..CreateReleaseRequest::default()
        }
    }

    #[test]
    fn groups_get_the_image_and_platform_metadata() {
        let mut r = req(vec![("", None), ("worker", None)]);
        r.image = Some("registry.local/web:2".into());
        let (image, groups) = resolve_groups(&r, 7, "abc").unwrap();
        assert_eq!(image, "registry.local/web:2");
        assert_eq!(groups[0].group, "app");
        for g in &groups {
            assert_eq!(g.config.image.as_deref(), Some("registry.local/web:2"));
            assert_eq!(g.config.metadata[MD_RELEASE_VERSION], "7");
            assert_eq!(g.config.metadata[MD_GROUP], g.group);
            assert_eq!(g.config.metadata[MD_PLATFORM], "v2");
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(
            resolve_groups(&req(vec![]), 1, "x")
                .unwrap_err()
                .message()
                .contains("at least one")
        );
        assert!(
            resolve_groups(&req(vec![("app", None)]), 1, "x")
                .unwrap_err()
                .message()
                .contains("no image")
        );
        assert!(
            resolve_groups(&req(vec![("app", Some("a")), ("app", Some("a"))]), 1, "x")
                .unwrap_err()
                .message()
                .contains("twice")
        );
        assert!(
            resolve_groups(&req(vec![(RELEASE_COMMAND_GROUP, Some("a"))]), 1, "x")
                .unwrap_err()
                .message()
                .contains("reserved")
        );
    }

    #[test]
    fn the_listen_window_is_the_largest_grace_but_never_nothing() {
        let mut c = MachineConfig::default();
        assert_eq!(listen_grace(&c), LISTEN_GRACE);
        let check = |grace: u64| aloft_api::MachineCheck {
            grace_period: Some(aloft_api::Duration(Duration::from_secs(grace))),
            ..Default::default()
        };
        c.checks.insert("a".into(), check(0));
        assert_eq!(
            listen_grace(&c),
            MIN_LISTEN_GRACE,
            "grace 0 still lets the app start"
        );
        c.checks.insert("b".into(), check(30));
        assert_eq!(listen_grace(&c), Duration::from_secs(30));
    }

    #[test]
    fn event_timestamps_have_milliseconds() {
        assert_eq!(rfc3339_ms(1_796_196_230_421), "2026-12-02T07:23:50.421Z");
    }
}
