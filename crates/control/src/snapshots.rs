//! `/v1/apps/{app}/volumes/{id}/snapshots`: copies of a volume's disk at one instant, kept on the
//! volume's host, and the daily pass that takes them and deletes them when their retention ends
//! ([`run_snapshot_schedule`]). Restoring one into a new volume is a volume create with
//! `snapshot_id` (`volumes.rs`).
//!
//! The control plane keeps a [`SnapshotRecord`] per snapshot under
//! `/volume-snapshots/{app}/{id}` (the volume it was taken of, the host holding the copy, the
//! host's size and digest, its retention); the host keeps the copy
//! ([`aloft_api::MachineHost::snapshot_volume`]). Both outlive the volume: a destroyed volume's
//! snapshots are listed under its id and restored until their retention ends.
//!
//! **Crash safety.** Taking one writes the record first, `pending`, then asks the host for the
//! copy, then marks the record `created` (compare-and-swap from the pending revision) with what
//! the host answered. Only `created` records are listed or restored, so a crash never leaves a
//! listed snapshot without a copy; and since the id is recorded before the host is asked, a copy
//! left by a crash is always named by a record: a pending record older than [`PENDING_TIMEOUT_MS`]
//! is discarded by the schedule pass, copy first. Deleting one marks its record `deleting`
//! (compare-and-swap), deletes the copy on its host (idempotent), then the record; a failed step
//! leaves the record `deleting`, which the next pass finishes. A taker whose pending record was
//! marked `deleting` meanwhile (its app destroyed, or a pass that found it stale) deletes the copy
//! it made and answers 409, so the two never leave a record without a copy or a copy without a
//! record.
//!
//! **Retention.** A snapshot keeps the retention its volume had when it was taken
//! (`snapshot_retention`, default [`DEFAULT_SNAPSHOT_RETENTION_DAYS`]); a later `PUT` of the
//! volume's `snapshot_retention` applies to the snapshots taken after it, as on Fly, so the
//! `retention_days` a listing shows is always the one that applies.

use aloft_api::{
    ApiError, DEFAULT_SNAPSHOT_RETENTION_DAYS, SNAPSHOT_CREATED, SnapshotId, VolumeSnapshot, rfc3339,
};
use aloft_store::{ControlError, Expect, SnapshotRecord, SnapshotState, StoreError, Versioned, VolumeRecord};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::ids::{now_ms, parse_rfc3339_ms, random};
use crate::volumes::VolumePath;
use crate::{ApiState, HttpError};

/// A day, milliseconds: the schedule takes a snapshot of a volume when its newest one (or, with
/// none, the volume itself) is at least this old.
pub const SNAPSHOT_INTERVAL_MS: i64 = 24 * 60 * 60 * 1000;
/// How long a snapshot may stay `pending` before the schedule takes its taker for dead and
/// discards it (with the copy, if the host made one). Far longer than a copy takes; a taker still
/// running after it loses its snapshot with a 409, nothing worse.
pub const PENDING_TIMEOUT_MS: i64 = 6 * 60 * 60 * 1000;
/// Rounds of [`destroy_all`] over records that changed while it deleted them.
const ATTEMPTS: usize = 8;

/// The snapshot routes (merged into [`crate::router`] inside authentication).
pub(crate) fn routes() -> Router<ApiState> {
    Router::new().route(
        "/v1/apps/{app_name}/volumes/{volume_id}/snapshots",
        get(list).post(create),
    )
}

/// `GET /v1/apps/{app}/volumes/{id}/snapshots` → the volume's snapshots, newest first; also after
/// the volume was destroyed, while its snapshots are kept. 404 when the app has neither a volume
/// of that id nor a snapshot of one.
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
) -> Result<Json<Vec<VolumeSnapshot>>, HttpError> {
    let snapshots = blocking(move || {
        let control = state.control();
        visible_app(control, &caller, &path.app)?;
        let volume = control.get_volume(&path.app, path.id.as_str())?;
        let mut records: Vec<SnapshotRecord> = control
            .list_snapshots(&path.app)?
            .into_iter()
            .map(|v| v.value)
            .filter(|s| s.volume_id == path.id)
            .collect();
        if volume.is_none() && records.is_empty() {
            return Err(ApiError::not_found(format_args!("volume {}", path.id)).into());
        }
        records.retain(|s| s.state == SnapshotState::Created);
        records.sort_by(|a, b| (b.created_at_ms, &b.id).cmp(&(a.created_at_ms, &a.id)));
        Ok(records.iter().map(to_api).collect())
    })
    .await?;
    Ok(Json(snapshots))
}

/// `POST /v1/apps/{app}/volumes/{id}/snapshots` → 200 with the snapshot, taken now on the
/// volume's host (a started machine mounting it is paused while its disk is copied). Fly answers
/// 200 with an empty body; fly-go reads none (`CreateVolumeSnapshot` decodes nothing), so the
/// snapshot in the body costs it nothing and tells other clients its id.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    path: VolumePath,
) -> Result<Json<VolumeSnapshot>, HttpError> {
    let snapshot = blocking(move || {
        let control = state.control();
        visible_app(control, &caller, &path.app)?;
        let volume = control
            .get_volume(&path.app, path.id.as_str())?
            .ok_or_else(|| ApiError::not_found(format_args!("volume {}", path.id)))?;
        let taken = take(&state, &volume.value, now_ms())?;
        Ok(to_api(&taken))
    })
    .await?;
    Ok(Json(snapshot))
}

/// The API object of a record.
fn to_api(r: &SnapshotRecord) -> VolumeSnapshot {
    VolumeSnapshot {
        id: r.id.clone(),
        created_at: rfc3339(r.created_at_ms),
        digest: r.digest.clone(),
        retention_days: r.retention_days,
        size: r.size,
        status: SNAPSHOT_CREATED.to_owned(),
        volume_size: r.volume_size,
    }
}

/// Takes a snapshot of `volume` on its host, recorded as taken at `created_at_ms`, with the
/// volume's retention; see the module docs for the order of the steps.
pub(crate) fn take(
    state: &ApiState,
    volume: &VolumeRecord,
    created_at_ms: i64,
) -> Result<SnapshotRecord, HttpError> {
    let host = state.hosts().get(&volume.host)?;
    let bytes = random::<16>().map_err(|e| HttpError::internal(format!("read random bytes: {e}")))?;
    let mut record = SnapshotRecord {
        id: SnapshotId::from_random(bytes),
        app: volume.app.clone(),
        volume_id: volume.volume.id.clone(),
        volume_name: volume.volume.name.clone(),
        region: volume.volume.region.clone(),
        host: volume.host.clone(),
        created_at_ms,
        size: 0,
        volume_size: 0,
        digest: String::new(),
        retention_days: volume
            .volume
            .snapshot_retention
            .unwrap_or(DEFAULT_SNAPSHOT_RETENTION_DAYS),
        state: SnapshotState::Pending,
    };
    let control = state.control();
    let pending = control.create_snapshot(&record)?;
    let copy = match host.agent.snapshot_volume(&record.volume_id, &record.id) {
        Ok(copy) => copy,
        Err(e) => {
            // No snapshot: the copy the host may have left goes, then the record of the intent.
            // If either step fails, the record stays pending and a later pass discards both.
            if host.agent.delete_snapshot(&record.id).is_ok() {
                let _ = control.delete_snapshot(&record.app, record.id.as_str(), Expect::Revision(pending));
            }
            return Err(e.into());
        }
    };
    record.size = copy.size;
    record.volume_size = copy.volume_size;
    record.digest = copy.digest;
    record.state = SnapshotState::Created;
    match control.put_snapshot(&record, Expect::Revision(pending)) {
        Ok(_) => Ok(record),
        Err(ControlError::Store(StoreError::Conflict { .. })) => {
            // Discarded while the host copied (the app is being destroyed, or a pass took the
            // taker for dead): the copy is nobody's, it goes too.
            let _ = host.agent.delete_snapshot(&record.id);
            Err(ApiError::conflict(format!(
                "snapshot {} of volume {} was discarded while it was taken (its app is being destroyed?); take another",
                record.id, record.volume_id
            ))
            .into())
        }
        // Left pending: a later pass discards it with its copy.
        Err(e) => Err(e.into()),
    }
}

/// Deletes the snapshot `current` (as read at its revision): marks the record `deleting`, deletes
/// the copy on its host, then the record. `Ok(false)` when the record changed since it was read
/// (a taker marked it created, another pass deleted it): read it again to decide. An error leaves
/// the record `deleting` (or as it was), for the next pass.
pub(crate) fn discard(state: &ApiState, current: &Versioned<SnapshotRecord>) -> Result<bool, HttpError> {
    let control = state.control();
    let record = &current.value;
    let revision = if record.state == SnapshotState::Deleting {
        current.revision
    } else {
        let marked = SnapshotRecord {
            state: SnapshotState::Deleting,
            ..record.clone()
        };
        match control.put_snapshot(&marked, Expect::Revision(current.revision)) {
            Ok(revision) => revision,
            Err(ControlError::Store(StoreError::Conflict { .. })) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    };
    state
        .hosts()
        .get(&record.host)?
        .agent
        .delete_snapshot(&record.id)?;
    match control.delete_snapshot(&record.app, record.id.as_str(), Expect::Revision(revision)) {
        Ok(_) => Ok(true),
        Err(ControlError::Store(StoreError::Conflict { .. })) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every snapshot of `app`, copies and records (`apps destroy`, after its volumes). A
/// host that cannot delete a copy stops the destroy, as for machines, so no copy is left that no
/// record names.
pub(crate) fn destroy_all(state: &ApiState, app: &str) -> Result<(), HttpError> {
    for _ in 0..ATTEMPTS {
        let records = state.control().list_snapshots(app)?;
        if records.is_empty() {
            return Ok(());
        }
        for record in &records {
            discard(state, record)?;
        }
    }
    Err(ApiError::conflict(format!(
        "the snapshots of app {app} kept changing while they were deleted (a snapshot being taken?); retry"
    ))
    .into())
}

/// What one pass of [`run_snapshot_schedule`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleReport {
    /// Snapshots taken, with their app and volume.
    pub taken: Vec<ScheduledSnapshot>,
    /// Snapshots deleted: past their retention, or discarded (left pending by a taker that died,
    /// left being deleted by an earlier pass that failed).
    pub deleted: Vec<ScheduledSnapshot>,
    /// What failed, one line each naming the app and the volume or snapshot; the pass went on.
    pub failures: Vec<String>,
}

/// A snapshot the pass took or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSnapshot {
    /// Its app.
    pub app: String,
    /// The volume it is (was) of.
    pub volume: aloft_api::VolumeId,
    /// The snapshot.
    pub snapshot: SnapshotId,
}

/// One pass of the snapshot schedule at `now_ms` (unix milliseconds; aloftd runs it hourly on the
/// clock, tests give any instant). For every app:
///
/// 1. Takes a snapshot of every volume whose `auto_backup_enabled` is not `false` and whose
///    newest snapshot (pending ones count: being taken) was taken at least
///    [`SNAPSHOT_INTERVAL_MS`] before `now_ms`; a volume without snapshots gets its first once it
///    is that old, so none goes more than a day (plus a pass) without one, its first day included
///    (Fly takes the first daily snapshot within a day of creation). The snapshot is recorded as
///    taken at `now_ms`.
/// 2. Deletes every snapshot past its retention (`created_at + retention_days` at or before
///    `now_ms`), copy first, then record, also of volumes destroyed since; and finishes what
///    crashes left: pending records older than [`PENDING_TIMEOUT_MS`] and deleting ones.
///
/// A failure (a host that does not answer, a store error) is reported and the pass goes on with
/// the next volume or snapshot. Blocking: call it from a blocking thread. One control plane runs
/// it; two running it at once could each take a volume's daily snapshot.
pub fn run_snapshot_schedule(state: &ApiState, now_ms: i64) -> ScheduleReport {
    let mut report = ScheduleReport::default();
    let apps = match state.control().list_apps() {
        Ok(apps) => apps,
        Err(e) => {
            report
                .failures
                .push(format!("list the apps: {}", HttpError::from(e)));
            return report;
        }
    };
    for app in apps {
        schedule_app(state, &app.value.name, now_ms, &mut report);
    }
    report
}

/// [`run_snapshot_schedule`] for one app.
fn schedule_app(state: &ApiState, app: &str, now_ms: i64, report: &mut ScheduleReport) {
    let control = state.control();
    let (volumes, snapshots) = match (control.list_volumes(app), control.list_snapshots(app)) {
        (Ok(v), Ok(s)) => (v, s),
        (Err(e), _) | (_, Err(e)) => {
            report.failures.push(format!(
                "app {app}: list its volumes and snapshots: {}",
                HttpError::from(e)
            ));
            return;
        }
    };
    for volume in volumes {
        let v = &volume.value.volume;
        if v.auto_backup_enabled == Some(false) {
            continue;
        }
        let newest = snapshots
            .iter()
            .filter(|s| s.value.volume_id == v.id && s.value.state != SnapshotState::Deleting)
            .map(|s| s.value.created_at_ms)
            .max();
        let since = match newest {
            Some(ms) => ms,
            None => match parse_rfc3339_ms(&v.created_at) {
                Some(ms) => ms,
                None => {
                    report.failures.push(format!(
                        "app {app}, volume {}: its created_at {:?} is not a time; no snapshot taken",
                        v.id, v.created_at
                    ));
                    continue;
                }
            },
        };
        if now_ms.saturating_sub(since) < SNAPSHOT_INTERVAL_MS {
            continue;
        }
        match take(state, &volume.value, now_ms) {
            Ok(taken) => report.taken.push(ScheduledSnapshot {
                app: app.to_owned(),
                volume: v.id.clone(),
                snapshot: taken.id,
            }),
            Err(e) => report
                .failures
                .push(format!("app {app}, volume {}: take a snapshot: {e}", v.id)),
        }
    }
    for snapshot in &snapshots {
        let s = &snapshot.value;
        let due = match s.state {
            SnapshotState::Created => {
                let kept = i64::from(s.retention_days).saturating_mul(SNAPSHOT_INTERVAL_MS);
                s.created_at_ms.saturating_add(kept) <= now_ms
            }
            SnapshotState::Pending => now_ms.saturating_sub(s.created_at_ms) >= PENDING_TIMEOUT_MS,
            SnapshotState::Deleting => true,
        };
        if !due {
            continue;
        }
        match discard(state, snapshot) {
            Ok(true) => report.deleted.push(ScheduledSnapshot {
                app: app.to_owned(),
                volume: s.volume_id.clone(),
                snapshot: s.id.clone(),
            }),
            // Changed meanwhile: the next pass looks again.
            Ok(false) => {}
            Err(e) => report.failures.push(format!(
                "app {app}, snapshot {} of volume {}: delete it: {e}",
                s.id, s.volume_id
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The crash and race paths, against a host that keeps snapshot copies in a map and can be
    //! told to fail (the happy paths run over the real agent in aloftd's `volumes_api` tests).

    use std::collections::BTreeSet;
    use std::fmt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use aloft_api::{
        ConsoleRequest, ConsoleSession, ExecResponse, HostCreate, HostSnapshot, HostStop, HostUpdate,
        HostVolume, HostVolumeStatus, HostWait, LogEntry, LogFollower, Machine, MachineEvent, MachineHost,
        MachineId, MachineState, MachineVersion, ProcessStat, Signal, UpdateMetadataRequest, Volume,
        VolumeId, WaitResponse,
    };
    use aloft_store::{ControlStore, SqliteStore};

    use super::*;
    use crate::{ApiConfig, HostHandle};

    const DAY: i64 = SNAPSHOT_INTERVAL_MS;
    const T0: i64 = 1_800_000_000_000;

    type Hook = Box<dyn FnOnce() + Send>;

    /// A host whose volumes all exist and whose snapshot copies are a set of ids.
    #[derive(Default)]
    struct Copies {
        copies: Mutex<BTreeSet<SnapshotId>>,
        fail_snapshot: Mutex<bool>,
        fail_delete: Mutex<bool>,
        /// Runs while the host "copies" (after the pending record, before it is marked taken).
        during_snapshot: Mutex<Option<Hook>>,
    }

    impl fmt::Debug for Copies {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Copies").field("copies", &self.copies).finish()
        }
    }

    impl Copies {
        fn held(&self) -> BTreeSet<SnapshotId> {
            self.copies.lock().unwrap().clone()
        }
    }

    fn no() -> ApiError {
        ApiError::new(501, "not in this fake")
    }

    impl MachineHost for Copies {
        fn create(&self, _: HostCreate) -> Result<Machine, ApiError> {
            Err(no())
        }
        fn get(&self, _: &MachineId) -> Result<Machine, ApiError> {
            Err(no())
        }
        fn list(&self, _: &str) -> Result<Vec<Machine>, ApiError> {
            Err(no())
        }
        fn start(&self, _: &MachineId) -> Result<MachineState, ApiError> {
            Err(no())
        }
        fn stop(&self, _: &MachineId, _: HostStop) -> Result<(), ApiError> {
            Err(no())
        }
        fn suspend(&self, _: &MachineId) -> Result<(), ApiError> {
            Err(no())
        }
        fn restart(&self, _: &MachineId, _: HostStop) -> Result<(), ApiError> {
            Err(no())
        }
        fn update(&self, _: &MachineId, _: HostUpdate) -> Result<Machine, ApiError> {
            Err(no())
        }
        fn destroy(&self, _: &MachineId, _: bool) -> Result<(), ApiError> {
            Err(no())
        }
        fn signal(&self, _: &MachineId, _: Signal) -> Result<(), ApiError> {
            Err(no())
        }
        fn exec(&self, _: &MachineId, _: &[String], _: Duration) -> Result<ExecResponse, ApiError> {
            Err(no())
        }
        fn ps(&self, _: &MachineId) -> Result<Vec<ProcessStat>, ApiError> {
            Err(no())
        }
        fn events(&self, _: &MachineId, _: usize) -> Result<Vec<MachineEvent>, ApiError> {
            Err(no())
        }
        fn versions(&self, _: &MachineId) -> Result<Vec<MachineVersion>, ApiError> {
            Err(no())
        }
        fn wait(&self, _: &MachineId, _: &HostWait) -> Result<WaitResponse, ApiError> {
            Err(no())
        }
        fn update_metadata(&self, _: &MachineId, _: &UpdateMetadataRequest) -> Result<Machine, ApiError> {
            Err(no())
        }
        fn log_tail(&self, _: &MachineId, _: usize) -> Result<Vec<LogEntry>, ApiError> {
            Err(no())
        }
        fn follow_logs(&self, _: &MachineId, _: Option<u64>) -> Result<Box<dyn LogFollower>, ApiError> {
            Err(no())
        }
        fn console(&self, _: &MachineId, _: ConsoleRequest) -> Result<Box<dyn ConsoleSession>, ApiError> {
            Err(no())
        }
        fn connect(&self, _: &MachineId, _: u16) -> Result<std::net::TcpStream, ApiError> {
            Err(no())
        }
        fn create_volume(&self, _: &HostVolume) -> Result<(), ApiError> {
            Err(no())
        }
        fn volume(&self, _: &VolumeId) -> Result<HostVolumeStatus, ApiError> {
            Err(no())
        }
        fn extend_volume(&self, _: &VolumeId, _: u32) -> Result<bool, ApiError> {
            Err(no())
        }
        fn destroy_volume(&self, _: &VolumeId) -> Result<(), ApiError> {
            Err(no())
        }
        fn snapshot_volume(&self, _: &VolumeId, snapshot: &SnapshotId) -> Result<HostSnapshot, ApiError> {
            // A failing host may still leave a partial copy behind.
            self.copies.lock().unwrap().insert(snapshot.clone());
            if *self.fail_snapshot.lock().unwrap() {
                return Err(ApiError::new(500, "copy failed"));
            }
            if let Some(hook) = self.during_snapshot.lock().unwrap().take() {
                hook();
            }
            Ok(HostSnapshot {
                size: 4096,
                volume_size: 3 << 30,
                digest: "sha256:00".into(),
            })
        }
        fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), ApiError> {
            if *self.fail_delete.lock().unwrap() {
                return Err(ApiError::new(503, "host unreachable"));
            }
            self.copies.lock().unwrap().remove(snapshot);
            Ok(())
        }
    }

    struct World {
        _dir: tempfile::TempDir,
        state: ApiState,
        host: Arc<Copies>,
        volume: VolumeRecord,
    }

    impl World {
        /// App `db` with volume `vol_aaaaaaaaaaaaaaaa` created at `T0`, on a [`Copies`] host.
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let host = Arc::new(Copies::default());
            let state = ApiState::with_hosts(
                Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap()),
                ApiConfig {
                    region: "local".into(),
                    access_log: false,
                },
                vec![HostHandle {
                    name: "host-1".into(),
                    region: "local".into(),
                    agent: host.clone(),
                }],
            );
            state
                .control()
                .create_app(&aloft_api::App {
                    name: "db".into(),
                    ..Default::default()
                })
                .unwrap();
            let volume = VolumeRecord {
                app: "db".into(),
                host: "host-1".into(),
                volume: serde_json::from_value::<Volume>(serde_json::json!({
                    "id": "vol_aaaaaaaaaaaaaaaa", "name": "data", "state": "created", "region": "local",
                    "size_gb": 3, "created_at": rfc3339(T0), "snapshot_retention": 2,
                }))
                .unwrap(),
            };
            state.control().create_volume(&volume).unwrap();
            Self {
                _dir: dir,
                state,
                host,
                volume,
            }
        }

        fn control(&self) -> &ControlStore {
            self.state.control()
        }

        fn records(&self) -> Vec<SnapshotRecord> {
            self.control()
                .list_snapshots("db")
                .unwrap()
                .into_iter()
                .map(|v| v.value)
                .collect()
        }
    }

    #[test]
    fn a_snapshot_the_host_fails_to_take_leaves_no_record_and_no_copy() {
        let w = World::new();
        *w.host.fail_snapshot.lock().unwrap() = true;
        let err = take(&w.state, &w.volume, T0).unwrap_err();
        assert_eq!(err.api().status(), 500, "{err}");
        assert!(w.records().is_empty());
        assert!(w.host.held().is_empty(), "the partial copy was deleted");

        // When the copy can't be deleted either, the record stays pending, naming it; a pass
        // past the timeout deletes both.
        *w.host.fail_delete.lock().unwrap() = true;
        take(&w.state, &w.volume, T0).unwrap_err();
        let left = w.records();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].state, SnapshotState::Pending);
        assert!(w.host.held().contains(&left[0].id));
        *w.host.fail_snapshot.lock().unwrap() = false;
        *w.host.fail_delete.lock().unwrap() = false;
        // Within the timeout it is left alone (a taker may still be copying) and counts as the
        // volume's newest: no second snapshot is started.
        let report = run_snapshot_schedule(&w.state, T0 + PENDING_TIMEOUT_MS - 1);
        assert_eq!(report, ScheduleReport::default());
        let report = run_snapshot_schedule(&w.state, T0 + PENDING_TIMEOUT_MS);
        assert_eq!(report.deleted.len(), 1, "{report:?}");
        assert_eq!(report.deleted[0].snapshot, left[0].id);
        assert!(report.failures.is_empty(), "{report:?}");
        assert!(w.records().is_empty());
        assert!(w.host.held().is_empty());
    }

    #[test]
    fn a_snapshot_discarded_while_it_is_taken_deletes_its_copy() {
        let w = World::new();
        // The app is destroyed while the host copies: its snapshots are discarded.
        let state = w.state.clone();
        *w.host.during_snapshot.lock().unwrap() = Some(Box::new(move || {
            destroy_all(&state, "db").unwrap();
        }));
        let err = take(&w.state, &w.volume, T0).unwrap_err();
        assert_eq!(err.api().status(), 409, "{err}");
        assert!(err.api().message().contains("discarded"), "{err}");
        assert!(w.records().is_empty());
        assert!(w.host.held().is_empty(), "no copy left that no record names");
    }

    #[test]
    fn a_delete_the_host_refuses_is_finished_by_the_next_pass() {
        let w = World::new();
        let taken = take(&w.state, &w.volume, T0).unwrap();
        assert_eq!(taken.state, SnapshotState::Created);
        assert_eq!(taken.retention_days, 2, "the volume's retention");
        assert_eq!((taken.size, taken.volume_size), (4096, 3 << 30));
        // Not due yet: taken less than a day ago, kept for two.
        assert_eq!(
            run_snapshot_schedule(&w.state, T0 + DAY - 1),
            ScheduleReport::default()
        );

        *w.host.fail_delete.lock().unwrap() = true;
        let expired = T0 + 2 * DAY;
        w.control()
            .put_volume(
                &VolumeRecord {
                    volume: Volume {
                        auto_backup_enabled: Some(false),
                        ..w.volume.volume.clone()
                    },
                    ..w.volume.clone()
                },
                Expect::Present,
            )
            .unwrap();
        let report = run_snapshot_schedule(&w.state, expired);
        assert!(report.deleted.is_empty() && report.taken.is_empty(), "{report:?}");
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert!(
            report.failures[0].contains(taken.id.as_str()) && report.failures[0].contains("unreachable"),
            "{report:?}"
        );
        // Marked: no longer listed or restorable, still naming the copy.
        let left = w.records();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].state, SnapshotState::Deleting);
        assert!(w.host.held().contains(&taken.id));

        *w.host.fail_delete.lock().unwrap() = false;
        let report = run_snapshot_schedule(&w.state, expired);
        assert_eq!(report.deleted.len(), 1, "{report:?}");
        assert!(w.records().is_empty());
        assert!(w.host.held().is_empty());
    }

    #[test]
    fn a_pass_reports_an_unknown_host_and_goes_on() {
        let w = World::new();
        let mut elsewhere = w.volume.clone();
        elsewhere.host = "gone".into();
        elsewhere.volume.id = "vol_bbbbbbbbbbbbbbbb".parse().unwrap();
        w.control().create_volume(&elsewhere).unwrap();
        let report = run_snapshot_schedule(&w.state, T0 + DAY);
        assert_eq!(report.taken.len(), 1, "{report:?}");
        assert_eq!(report.taken[0].volume, w.volume.volume.id);
        assert_eq!(report.failures.len(), 1, "{report:?}");
        assert!(report.failures[0].contains("vol_bbbbbbbbbbbbbbbb"), "{report:?}");
        assert_eq!(w.records().len(), 1, "nothing recorded for the unknown host");
    }
}
