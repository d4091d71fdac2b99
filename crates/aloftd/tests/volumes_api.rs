//! Volumes end to end in process: the real router over the real agent on `FakeDriver`, whose
//! volume disks are in memory (the real ones, ext4 files, are `aloft-agent`'s volume tests and its
//! VM test's). Create, list, show,
//! update, extend and destroy with Fly's shapes and errors; one machine at a time per volume;
//! `apps destroy` takes the volumes along; releases give each machine of a group with
//! `[[mounts]]` a volume, reuse unattached ones of the name and keep each machine's own.
//! Snapshots: taken, listed (also after their volume is gone), restored into new volumes, forks,
//! the daily schedule and retention, `apps destroy` deleting them with their hosts' copies.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use aloft_api::{SnapshotId, VolumeId};
    use aloft_control::ApiState;
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    use crate::common::Harness;

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;
    const GIB: u64 = 1 << 30;

    struct Api(Harness);

    impl std::ops::Deref for Api {
        type Target = Harness;

        fn deref(&self) -> &Harness {
            &self.0
        }
    }

    impl Api {
        async fn new(app: &str) -> Self {
            let h = Harness::new(|c| {
                c.host_memory_mb = 8192;
                c.host_cpus = 8;
            });
            let (s, v) = h.call("POST", "/v1/apps", Some(json!({"name": app}))).await;
            assert!(s.is_success(), "{v}");
            Self(h)
        }

        async fn ok(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
            let (s, v) = self.call(method, uri, body).await;
            assert!(s.is_success(), "{method} {uri}: {s} {v}");
            v
        }

        /// The status and Fly's error text of a request that must fail.
        async fn err(&self, method: &str, uri: &str, body: Option<Value>) -> (u16, String) {
            let (s, v) = self.call(method, uri, body).await;
            assert!(!s.is_success(), "{method} {uri} succeeded: {v}");
            (s.as_u16(), v["error"].as_str().unwrap_or_default().to_owned())
        }

        async fn volume(&self, app: &str, name: &str, size: Option<u32>) -> Value {
            let mut body = json!({"name": name});
            if let Some(s) = size {
                body["size_gb"] = json!(s);
            }
            self.ok("POST", &format!("/v1/apps/{app}/volumes"), Some(body))
                .await
        }

        async fn machine(&self, app: &str, mounts: Value) -> (StatusCode, Value) {
            self.call(
                "POST",
                &format!("/v1/apps/{app}/machines"),
                Some(json!({"config": {"image": "busybox", "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"}, "mounts": mounts}})),
            )
            .await
        }

        /// The API state the router serves, for calls a test makes directly (the schedule).
        fn state(&mut self) -> ApiState {
            let mut out = None;
            self.0.tune_state(|s| {
                out = Some(s.clone());
                s
            });
            out.unwrap()
        }

        async fn snapshot(&self, app: &str, volume: &str) -> Value {
            self.ok(
                "POST",
                &format!("/v1/apps/{app}/volumes/{volume}/snapshots"),
                None,
            )
            .await
        }

        /// The ids of a volume's snapshots as listed (newest first).
        async fn snapshots(&self, app: &str, volume: &str) -> Vec<String> {
            self.ok("GET", &format!("/v1/apps/{app}/volumes/{volume}/snapshots"), None)
                .await
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect()
        }

        /// The fake host's copy of snapshot `id`, if it holds one.
        fn host_copy(&self, id: &str) -> Option<aloft_agent::FakeSnapshot> {
            let id: SnapshotId = id.parse().unwrap();
            self.fake.world().volume_snapshots.get(&id).cloned()
        }

        /// The fake host's disk of volume `id`.
        fn disk(&self, id: &str) -> aloft_agent::FakeVolume {
            let id: VolumeId = id.parse().unwrap();
            self.fake.world().volumes[&id]
        }

        async fn wait(&self, app: &str, id: &str, state: &str) {
            self.ok(
                "GET",
                &format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=10"),
                None,
            )
            .await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn volumes_are_created_listed_changed_and_destroyed() {
        let api = Api::new("db").await;
        let v = api.volume("db", "pg_data", None).await;
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("vol_") && id.len() == 20, "{id}");
        assert_eq!(v["name"], "pg_data");
        assert_eq!(v["state"], "created");
        assert_eq!(v["size_gb"], 1, "Fly's default size");
        assert_eq!(v["region"], "local");
        assert_eq!(v["zone"], "host-1");
        assert_eq!(v["encrypted"], false);
        assert_eq!(v["fstype"], "ext4");
        assert_eq!(v["host_status"], "ok");
        assert_eq!(v["snapshot_retention"], 5);
        assert_eq!(v["auto_backup_enabled"], true);
        assert!(v.get("attached_machine_id").is_none(), "{v}");
        // The host read the new filesystem's superblock: 1 GiB of 4 KiB blocks, nearly all free.
        assert_eq!(v["block_size"], 4096, "{v}");
        assert_eq!(v["bytes_total"], 1 << 30, "{v}");
        assert!(v["bytes_used"].as_u64().unwrap() < 64 << 20, "{v}");

        let other = api.volume("db", "pg_data", Some(3)).await;
        assert_eq!(other["size_gb"], 3);
        let list = api.ok("GET", "/v1/apps/db/volumes", None).await;
        let ids: BTreeSet<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, BTreeSet::from([id.as_str(), other["id"].as_str().unwrap()]));
        assert_eq!(
            api.ok("GET", &format!("/v1/apps/db/volumes/{id}"), None).await["name"],
            "pg_data"
        );
        assert_eq!(api.ok("GET", "/v1/apps/db", None).await["volume_count"], 2);

        let updated = api
            .ok(
                "PUT",
                &format!("/v1/apps/db/volumes/{id}"),
                Some(json!({"snapshot_retention": 14, "auto_backup_enabled": false})),
            )
            .await;
        assert_eq!(updated["snapshot_retention"], 14);
        assert_eq!(updated["auto_backup_enabled"], false);

        let grown = api
            .ok(
                "PUT",
                &format!("/v1/apps/db/volumes/{id}/extend"),
                Some(json!({"size_gb": 2})),
            )
            .await;
        assert_eq!(grown["needs_restart"], false, "no machine mounts it");
        assert_eq!(grown["volume"]["size_gb"], 2);
        assert_eq!(
            grown["volume"]["bytes_total"],
            2u64 << 30,
            "the filesystem grew too"
        );
        let (s, e) = api
            .err(
                "PUT",
                &format!("/v1/apps/db/volumes/{id}/extend"),
                Some(json!({"size_gb": 2})),
            )
            .await;
        assert_eq!((s, e.contains("can only grow")), (422, true), "{e}");

        let gone = api.ok("DELETE", &format!("/v1/apps/db/volumes/{id}"), None).await;
        assert_eq!(gone["state"], "destroyed");
        let (s, e) = api.err("GET", &format!("/v1/apps/db/volumes/{id}"), None).await;
        assert_eq!(s, 404, "{e}");
        assert!(e.contains(&id), "{e}");
        let (s, _) = api
            .err("DELETE", &format!("/v1/apps/db/volumes/{id}"), None)
            .await;
        assert_eq!(s, 404);
        assert_eq!(
            api.ok("GET", "/v1/apps/db/volumes", None)
                .await
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // Bad input, each named.
        for (body, status, words) in [
            (json!({"name": "Bad-Name"}), 400, "invalid volume name"),
            (json!({"name": "data", "size_gb": 0}), 422, "out of range"),
            (json!({"name": "data", "size_gb": 501}), 422, "out of range"),
            (json!({"name": "data", "encrypted": true}), 422, "not encrypted"),
            (json!({"name": "data", "fstype": "xfs"}), 422, "ext4"),
            (
                json!({"name": "data", "region": "mars"}),
                422,
                "no host in region",
            ),
            (
                json!({"name": "data", "snapshot_id": "vs_x"}),
                404,
                "snapshot vs_x not found",
            ),
            (
                json!({"name": "data", "snapshot_id": "vol_x"}),
                400,
                "snapshot_id",
            ),
            (
                json!({"name": "data", "snapshot_id": "vs_x", "source_volume_id": "vol_x"}),
                422,
                "not both",
            ),
        ] {
            let (s, e) = api.err("POST", "/v1/apps/db/volumes", Some(body.clone())).await;
            assert_eq!(s, status, "{body}: {e}");
            assert!(e.contains(words), "{body}: {e}");
        }
        let (s, _) = api.err("GET", "/v1/apps/db/volumes/not-an-id", None).await;
        assert_eq!(s, 404);
        let (s, _) = api.err("GET", "/v1/apps/nope/volumes", None).await;
        assert_eq!(s, 404);
        let (s, _) = api
            .err("POST", "/v1/apps/db/volumes", Some(json!({"name": 7})))
            .await;
        assert_eq!(s, 400);
        assert_eq!(
            api.ok("GET", "/v1/apps/db/volumes", None)
                .await
                .as_array()
                .unwrap()
                .len(),
            1,
            "no refused create left a volume"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_volume_is_mounted_by_one_machine_at_a_time() {
        let api = Api::new("db").await;
        let v = api.volume("db", "data", Some(2)).await;
        let id = v["id"].as_str().unwrap().to_owned();

        let (s, m) = api.machine("db", json!([{"volume": id, "path": "/data"}])).await;
        assert!(s.is_success(), "{m}");
        let machine = m["id"].as_str().unwrap().to_owned();
        // The server filled the mount from the volume's record.
        let mount = &m["config"]["mounts"][0];
        assert_eq!(mount["volume"], id.as_str());
        assert_eq!(mount["name"], "data");
        assert_eq!(mount["size_gb"], 2);
        assert_eq!(mount["path"], "/data");
        api.wait("db", &machine, "started").await;
        let shown = api.ok("GET", &format!("/v1/apps/db/volumes/{id}"), None).await;
        assert_eq!(shown["attached_machine_id"], machine.as_str());

        // A second machine can't mount it, nor can the volume go.
        let (s, e) = api.machine("db", json!([{"volume": id, "path": "/data"}])).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(
            e["error"].as_str().unwrap().contains(&machine),
            "names the machine: {e}"
        );
        let (s, e) = api
            .err("DELETE", &format!("/v1/apps/db/volumes/{id}"), None)
            .await;
        assert_eq!(s, 412, "{e}");
        assert!(e.contains(&machine), "{e}");

        // Growing it under a started machine takes a restart to show.
        let grown = api
            .ok(
                "PUT",
                &format!("/v1/apps/db/volumes/{id}/extend"),
                Some(json!({"size_gb": 3})),
            )
            .await;
        assert_eq!(grown["needs_restart"], true);
        assert_eq!(grown["volume"]["size_gb"], 3);

        // Bad mounts, each named.
        let other = api.volume("db", "data", None).await;
        let other_id = other["id"].as_str().unwrap();
        for (mounts, words) in [
            (
                json!([{"volume": "vol_doesnotexist00", "path": "/data"}]),
                "has no volume",
            ),
            (json!([{"volume": "nope", "path": "/data"}]), "mounts[0].volume"),
            (json!([{"path": "/data"}]), "volume is required"),
            (json!([{"volume": other_id}]), "path is required"),
            (json!([{"volume": other_id, "path": "/"}]), "path"),
            (
                json!([{"volume": other_id, "path": "/a"}, {"volume": id, "path": "/b"}]),
                "at most one volume",
            ),
        ] {
            let (s, e) = api.machine("db", mounts.clone()).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{mounts}: {e}");
            let text = e["error"].as_str().unwrap();
            assert!(text.contains(words), "{mounts}: {text}");
        }
        let (s, e) = api
            .call(
                "POST",
                "/v1/apps/db/machines",
                Some(json!({"region": "elsewhere", "config": {"image": "busybox", "mounts": [{"volume": other_id, "path": "/data"}]}})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(e["error"].as_str().unwrap().contains("region"), "{e}");

        // Once the machine is destroyed, the volume is free: for another machine, or to go.
        api.ok(
            "DELETE",
            &format!("/v1/apps/db/machines/{machine}?force=true"),
            None,
        )
        .await;
        api.wait("db", &machine, "destroyed").await;
        let shown = api.ok("GET", &format!("/v1/apps/db/volumes/{id}"), None).await;
        assert!(shown.get("attached_machine_id").is_none(), "{shown}");
        let (s, m2) = api
            .machine("db", json!([{"volume": id, "path": "/var/lib/data"}]))
            .await;
        assert!(s.is_success(), "{m2}");
        let m2 = m2["id"].as_str().unwrap().to_owned();
        api.ok("DELETE", &format!("/v1/apps/db/machines/{m2}?force=true"), None)
            .await;
        api.wait("db", &m2, "destroyed").await;
        api.ok("DELETE", &format!("/v1/apps/db/volumes/{id}"), None).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn destroying_an_app_destroys_its_volumes() {
        let api = Api::new("db").await;
        let v = api.volume("db", "data", None).await;
        let id = v["id"].as_str().unwrap().to_owned();
        let (s, m) = api.machine("db", json!([{"volume": id, "path": "/data"}])).await;
        assert!(s.is_success(), "{m}");
        api.wait("db", m["id"].as_str().unwrap(), "started").await;
        api.volume("db", "spare", None).await;

        let (s, e) = api.call("DELETE", "/v1/apps/db", None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{e}");
        assert!(api.control.list_volumes("db").unwrap().is_empty());
        let host = aloft_api::MachineHost::volume(api.agent.as_ref(), &id.parse().unwrap());
        assert_eq!(host.unwrap_err().status(), 404, "the disk is gone too");
        // The name is free again, with no volume left over.
        api.ok("POST", "/v1/apps", Some(json!({"name": "db"}))).await;
        assert_eq!(
            api.ok("GET", "/v1/apps/db/volumes", None)
                .await
                .as_array()
                .unwrap()
                .len(),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn snapshots_are_taken_listed_and_restored_and_volumes_forked() {
        let api = Api::new("db").await;
        let v = api.volume("db", "pg_data", Some(2)).await;
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(api.fake.write_volume(&id.parse().unwrap(), 7));

        // Fly's shape, and nothing else.
        let first = api.snapshot("db", &id).await;
        let keys: BTreeSet<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "id",
                "created_at",
                "digest",
                "retention_days",
                "size",
                "status",
                "volume_size"
            ]),
            "{first}"
        );
        let first_id = first["id"].as_str().unwrap().to_owned();
        assert!(first_id.starts_with("vs_") && first_id.len() == 19, "{first}");
        assert_eq!(first["status"], "created");
        assert_eq!(first["retention_days"], 5, "the volume's retention");
        assert_eq!(first["volume_size"], 2 * GIB);
        assert_eq!(first["size"], 8u64 << 20, "what the host's copy takes");
        let copy = api.host_copy(&first_id).expect("the host holds the copy");
        assert_eq!(first["digest"], copy.digest.as_str());
        assert_eq!(copy.disk.data, 7);
        let created = first["created_at"].as_str().unwrap();
        assert!(created.len() == 20 && created.ends_with('Z'), "{created}");

        // A retention change applies to the snapshots taken after it.
        api.ok(
            "PUT",
            &format!("/v1/apps/db/volumes/{id}"),
            Some(json!({"snapshot_retention": 14})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(api.fake.write_volume(&id.parse().unwrap(), 9));
        let second = api.snapshot("db", &id).await;
        assert_eq!(second["retention_days"], 14);
        let second_id = second["id"].as_str().unwrap().to_owned();
        let list = api
            .ok("GET", &format!("/v1/apps/db/volumes/{id}/snapshots"), None)
            .await;
        assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
        assert_eq!(list[0], second, "newest first");
        assert_eq!(list[1], first, "kept its retention");
        // Another volume's list holds none of them.
        let other = api.volume("db", "other", None).await;
        let other_id = other["id"].as_str().unwrap().to_owned();
        assert!(api.snapshots("db", &other_id).await.is_empty());

        // Restore: the snapshot's data, its size by default, on its host.
        let restored = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"name": "restored", "snapshot_id": first_id})),
            )
            .await;
        let restored_id = restored["id"].as_str().unwrap();
        assert_ne!(restored_id, id);
        assert_eq!(restored["name"], "restored");
        assert_eq!(restored["size_gb"], 2);
        assert_eq!(restored["zone"], "host-1");
        assert_eq!(restored["region"], "local");
        assert_eq!(restored["snapshot_retention"], 5);
        assert_eq!(api.disk(restored_id).data, 7, "the data as it was then");
        assert_eq!(api.disk(&id).data, 9, "the source is untouched");
        // Bigger, with the volume's name by default.
        let bigger = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"snapshot_id": second_id, "size_gb": 5, "region": "local"})),
            )
            .await;
        assert_eq!(bigger["name"], "pg_data");
        assert_eq!(bigger["size_gb"], 5);
        let disk = api.disk(bigger["id"].as_str().unwrap());
        assert_eq!((disk.data, disk.size_gb, disk.fs_gb), (9, 5, 5));

        // Fork: a copy of the volume as it is now, its name and size by default.
        assert!(api.fake.write_volume(&id.parse().unwrap(), 11));
        let fork = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"source_volume_id": id})),
            )
            .await;
        assert_eq!(fork["name"], "pg_data");
        assert_eq!(fork["size_gb"], 2);
        assert_eq!(fork["zone"], "host-1");
        assert_eq!(api.disk(fork["id"].as_str().unwrap()).data, 11);
        let fork3 = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"source_volume_id": id, "name": "copy", "size_gb": 3})),
            )
            .await;
        assert_eq!((&fork3["name"], &fork3["size_gb"]), (&json!("copy"), &json!(3)));

        // Refusals, each named; none leaves a volume behind.
        let before = api
            .ok("GET", "/v1/apps/db/volumes", None)
            .await
            .as_array()
            .unwrap()
            .len();
        api.ok("POST", "/v1/apps", Some(json!({"name": "other"}))).await;
        let foreign = api.volume("other", "theirs", None).await;
        let foreign_id = foreign["id"].as_str().unwrap().to_owned();
        let foreign_snapshot = api.snapshot("other", &foreign_id).await;
        for (body, status, words) in [
            (json!({"snapshot_id": first_id, "size_gb": 1}), 422, "smaller"),
            (
                json!({"snapshot_id": first_id, "region": "mars"}),
                422,
                "snapshots restore in their own region",
            ),
            (json!({"snapshot_id": foreign_snapshot["id"]}), 404, "snapshot"),
            (
                json!({"snapshot_id": "vs_doesnotexist0000"}),
                404,
                "snapshot vs_doesnotexist0000",
            ),
            (json!({"snapshot_id": "nope"}), 400, "snapshot_id"),
            (json!({"source_volume_id": id, "size_gb": 1}), 422, "smaller"),
            (
                json!({"source_volume_id": id, "region": "mars"}),
                422,
                "source's region",
            ),
            (json!({"source_volume_id": foreign_id}), 404, "volume"),
            (
                json!({"source_volume_id": id, "name": "Bad-Name"}),
                400,
                "invalid volume name",
            ),
        ] {
            let (s, e) = api.err("POST", "/v1/apps/db/volumes", Some(body.clone())).await;
            assert_eq!(s, status, "{body}: {e}");
            assert!(e.contains(words), "{body}: {e}");
        }
        let after = api.ok("GET", "/v1/apps/db/volumes", None).await;
        assert_eq!(after.as_array().unwrap().len(), before, "{after}");
        // Another app's snapshots are not listed under its volume id here.
        let (s, _) = api
            .err(
                "GET",
                &format!("/v1/apps/db/volumes/{foreign_id}/snapshots"),
                None,
            )
            .await;
        assert_eq!(s, 404);
        for method in ["GET", "POST"] {
            let (s, e) = api
                .err(method, "/v1/apps/db/volumes/vol_doesnotexist00/snapshots", None)
                .await;
            assert_eq!(
                (s, e.contains("vol_doesnotexist00")),
                (404, true),
                "{method}: {e}"
            );
        }

        // The volume goes; its snapshots stay, listed under its id and restorable.
        api.ok("DELETE", &format!("/v1/apps/db/volumes/{id}"), None).await;
        assert_eq!(
            api.snapshots("db", &id).await,
            [second_id.clone(), first_id.clone()]
        );
        assert!(api.host_copy(&first_id).is_some());
        let (s, _) = api
            .err("POST", &format!("/v1/apps/db/volumes/{id}/snapshots"), None)
            .await;
        assert_eq!(s, 404, "no snapshot of a volume that is gone");
        let late = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"snapshot_id": first_id})),
            )
            .await;
        assert_eq!(api.disk(late["id"].as_str().unwrap()).data, 7);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_schedule_takes_daily_snapshots_and_deletes_expired_ones() {
        let mut api = Api::new("db").await;
        let state = api.state();
        let auto = api.volume("db", "auto", None).await;
        let auto = auto["id"].as_str().unwrap().to_owned();
        let manual = api
            .ok(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"name": "manual", "auto_backup_enabled": false, "snapshot_retention": 1})),
            )
            .await;
        let manual = manual["id"].as_str().unwrap().to_owned();
        let t0 = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        let pass = |now: i64| aloft_control::run_snapshot_schedule(&state, now);

        // Under a day old, with no snapshot: not yet.
        let report = pass(t0 + DAY_MS - 60_000);
        assert!(
            report.taken.is_empty() && report.failures.is_empty(),
            "{report:?}"
        );
        assert!(api.snapshots("db", &auto).await.is_empty());

        // A day old: the first, of the volume with scheduled snapshots only.
        let day1 = t0 + DAY_MS + 60_000;
        let report = pass(day1);
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(report.taken.len(), 1, "{report:?}");
        assert_eq!(report.taken[0].volume.as_str(), auto);
        assert_eq!(report.taken[0].app, "db");
        let listed = api
            .ok("GET", &format!("/v1/apps/db/volumes/{auto}/snapshots"), None)
            .await;
        assert_eq!(listed[0]["id"], report.taken[0].snapshot.as_str());
        assert_eq!(
            listed[0]["created_at"],
            aloft_api::rfc3339(day1),
            "taken at the pass's time"
        );
        assert_eq!(listed[0]["retention_days"], 5);
        let first = report.taken[0].snapshot.to_string();
        assert!(api.host_copy(&first).is_some());
        assert!(
            api.snapshots("db", &manual).await.is_empty(),
            "auto_backup_enabled: false"
        );

        // Not twice within a day, however often the pass runs.
        for hours in [1, 12, 23] {
            let report = pass(day1 + hours * 3_600_000);
            assert!(report.taken.is_empty() && report.deleted.is_empty(), "{report:?}");
        }
        let day2 = day1 + DAY_MS;
        assert_eq!(pass(day2).taken.len(), 1);
        assert_eq!(api.snapshots("db", &auto).await.len(), 2);

        // A snapshot of the other volume, taken by hand (now, about t0), expires after its 1 day.
        let by_hand = api.snapshot("db", &manual).await;
        let by_hand = by_hand["id"].as_str().unwrap().to_owned();
        let report = pass(t0 + DAY_MS - 3_600_000);
        assert_eq!(report, aloft_control::ScheduleReport::default(), "within its day");
        assert_eq!(api.snapshots("db", &manual).await, [by_hand.as_str()]);
        let report = pass(t0 + DAY_MS + 3_600_000);
        assert_eq!(report.deleted.len(), 1, "{report:?}");
        assert_eq!(report.deleted[0].snapshot.as_str(), by_hand);
        assert!(api.host_copy(&by_hand).is_none(), "the host's copy is gone");
        assert!(api.snapshots("db", &manual).await.is_empty());

        // Five days after the first: it goes, copy first; the second stays; a new one is taken.
        let report = pass(day1 + 5 * DAY_MS);
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(report.deleted.len(), 1, "{report:?}");
        assert_eq!(report.deleted[0].snapshot.as_str(), first);
        assert_eq!(report.taken.len(), 1, "{report:?}");
        assert!(api.host_copy(&first).is_none(), "the host's copy is gone");
        let left = api.snapshots("db", &auto).await;
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!left.contains(&first));
        assert!(api.snapshots("db", &manual).await.is_empty());
        let (s, e) = api
            .err("POST", "/v1/apps/db/volumes", Some(json!({"snapshot_id": first})))
            .await;
        assert_eq!(s, 404, "an expired snapshot can't be restored: {e}");

        // Turning scheduled snapshots off stops them; the existing ones keep their retention.
        api.ok(
            "PUT",
            &format!("/v1/apps/db/volumes/{auto}"),
            Some(json!({"auto_backup_enabled": false, "snapshot_retention": 30})),
        )
        .await;
        let report = pass(day1 + 8 * DAY_MS);
        assert!(report.taken.is_empty(), "{report:?}");
        assert_eq!(
            report.deleted.len(),
            1,
            "the day-2 one, after its 5 days: {report:?}"
        );

        // A destroyed volume's snapshots still expire.
        api.ok("DELETE", &format!("/v1/apps/db/volumes/{auto}"), None)
            .await;
        assert_eq!(api.snapshots("db", &auto).await.len(), 1);
        let report = pass(day1 + 20 * DAY_MS);
        assert_eq!(report.deleted.len(), 1, "{report:?}");
        assert!(report.failures.is_empty(), "{report:?}");
        let (s, _) = api
            .err("GET", &format!("/v1/apps/db/volumes/{auto}/snapshots"), None)
            .await;
        assert_eq!(s, 404, "neither the volume nor a snapshot of it");
        assert!(api.fake.world().volume_snapshots.is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn destroying_an_app_destroys_its_snapshots() {
        let api = Api::new("db").await;
        let gone = api.volume("db", "gone", None).await;
        let gone = gone["id"].as_str().unwrap().to_owned();
        let kept = api.snapshot("db", &gone).await;
        api.ok("DELETE", &format!("/v1/apps/db/volumes/{gone}"), None)
            .await;
        let live = api.volume("db", "live", None).await;
        let live = live["id"].as_str().unwrap().to_owned();
        let (s, m) = api
            .machine("db", json!([{"volume": live, "path": "/data"}]))
            .await;
        assert!(s.is_success(), "{m}");
        api.wait("db", m["id"].as_str().unwrap(), "started").await;
        let mounted = api.snapshot("db", &live).await;
        // Another app's snapshot stays.
        api.ok("POST", "/v1/apps", Some(json!({"name": "other"}))).await;
        let theirs = api.volume("other", "data", None).await;
        let theirs = api.snapshot("other", theirs["id"].as_str().unwrap()).await;

        let (s, e) = api.call("DELETE", "/v1/apps/db", None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{e}");
        assert!(api.control.list_snapshots("db").unwrap().is_empty());
        for s in [&kept, &mounted] {
            assert!(api.host_copy(s["id"].as_str().unwrap()).is_none(), "{s}");
        }
        assert!(api.host_copy(theirs["id"].as_str().unwrap()).is_some());
        assert_eq!(api.control.list_snapshots("other").unwrap().len(), 1);
        // A new app of the name finds none of them.
        api.ok("POST", "/v1/apps", Some(json!({"name": "db"}))).await;
        let (s, _) = api
            .err(
                "POST",
                "/v1/apps/db/volumes",
                Some(json!({"name": "data", "snapshot_id": kept["id"]})),
            )
            .await;
        assert_eq!(s, 404);
        let (s, _) = api
            .err("GET", &format!("/v1/apps/db/volumes/{gone}/snapshots"), None)
            .await;
        assert_eq!(s, 404);
    }

    /// Waits until release `v` of `app` is final; returns it.
    async fn finished(api: &Api, app: &str, v: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = api.ok("GET", &format!("/v1/apps/{app}/releases/{v}"), None).await;
            if ["complete", "rolled_back", "failed"].contains(&r["status"].as_str().unwrap_or_default()) {
                return r;
            }
            assert!(Instant::now() < deadline, "release v{v} did not finish: {r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Release `v` of app `web` (image `web:v`, one mounted group of `count` machines), waited
    /// for until it is complete.
    async fn release(api: &Api, v: u64, count: u32) {
        let image = format!("web:{v}");
        let (s, r) = api
            .call(
                "POST",
                "/v1/apps/web/releases",
                Some(json!({"image": image, "groups": [mounted_group(&image, count)]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        assert_eq!(finished(api, "web", v).await["status"], "complete");
    }

    fn mounted_group(image: &str, count: u32) -> Value {
        json!({"group": "app", "count": count, "config": {
            "image": image,
            "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
            "mounts": [{"name": "data", "path": "/data", "size_gb": 2}],
        }})
    }

    /// `(machine id, volume id)` of each live machine of the app, sorted.
    async fn mounts_of(api: &Api, app: &str) -> Vec<(String, String)> {
        let list = api.ok("GET", &format!("/v1/apps/{app}/machines"), None).await;
        let mut out: Vec<(String, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let mount = &m["config"]["mounts"][0];
                assert_eq!(mount["path"], "/data", "{m}");
                (
                    m["id"].as_str().unwrap().to_owned(),
                    mount["volume"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn releases_give_each_machine_a_volume_and_keep_it() {
        let api = Api::new("web").await;
        // One unattached volume of the name exists: the release takes it before making any.
        let spare = api.volume("web", "data", Some(1)).await;
        let spare = spare["id"].as_str().unwrap().to_owned();
        // Another name is not taken.
        api.volume("web", "other", None).await;

        release(&api, 1, 2).await;
        let first = mounts_of(&api, "web").await;
        assert_eq!(first.len(), 2);
        let vols: BTreeSet<&str> = first.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(vols.len(), 2, "one volume per machine: {first:?}");
        assert!(
            vols.contains(spare.as_str()),
            "the unattached volume was used: {first:?}"
        );
        let list = api.ok("GET", "/v1/apps/web/volumes", None).await;
        let data: Vec<&Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == "data")
            .collect();
        assert_eq!(data.len(), 2, "one new volume made: {list}");
        for v in &data {
            let expected = if v["id"] == spare.as_str() { 1 } else { 2 };
            assert_eq!(v["size_gb"], expected, "a new one has initial_size: {v}");
            assert!(v["attached_machine_id"].is_string(), "{v}");
        }

        // The next release updates the machines in place; each keeps its own volume.
        release(&api, 2, 2).await;
        assert_eq!(mounts_of(&api, "web").await, first);

        // Scaling to 3 adds a machine with a third volume; the app's volumes stay otherwise.
        release(&api, 3, 3).await;
        let third = mounts_of(&api, "web").await;
        assert_eq!(third.len(), 3);
        assert_eq!(third.iter().map(|(_, v)| v).collect::<BTreeSet<_>>().len(), 3);
        for pair in &first {
            assert!(third.contains(pair), "{pair:?} kept: {third:?}");
        }

        // Strategies that run two machines of a slot at once are refused with mounts.
        for strategy in ["canary", "bluegreen"] {
            let (s, e) = api
                .call(
                    "POST",
                    "/v1/apps/web/releases",
                    Some(json!({"image": "web:4", "strategy": strategy, "groups": [mounted_group("web:4", 3)]})),
                )
                .await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
            assert!(e["error"].as_str().unwrap().contains(strategy), "{e}");
        }
    }
}
