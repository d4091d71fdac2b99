//! The typed control-plane records over SqliteStore.

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use aloft_api::{App, Machine, MachineEvent, MachineId, MachineState};
    use aloft_store::{
        CertClaimOutcome, ControlError, ControlStore, Expect, MachineLeaseRequest, MachineRecord,
        ManualClock, Revision, SecretRecord, SnapshotRecord, SnapshotState, SqliteOptions, SqliteStore,
        StoreError, TokenRecord, VolumeRecord,
    };

    fn control(dir: &tempfile::TempDir) -> (ControlStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let store = SqliteStore::open_with(
            dir.path().join("control.db"),
            SqliteOptions {
                clock: clock.clone(),
                reaper_interval: None,
                ..Default::default()
            },
        )
        .unwrap();
        (ControlStore::new(Arc::new(store)), clock)
    }

    fn app(name: &str) -> App {
        App {
            id: name.into(),
            name: name.into(),
            network: "default".into(),
            status: "pending".into(),
            ..Default::default()
        }
    }

    fn machine(app: &str, id: &str) -> MachineRecord {
        MachineRecord {
            app: app.into(),
            host: "local".into(),
            machine: serde_json::from_value(serde_json::json!({
                "id": id, "name": format!("m-{id}"), "state": "created", "region": "local",
                "instance_id": "01HBZ8QEXHS0YR4R1N6S1XGEE2", "config": {"image": "busybox"}
            }))
            .unwrap(),
            cordoned: false,
        }
    }

    #[test]
    fn organizations_get_distinct_network_numbers_that_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        let a = c.org_network("personal").unwrap();
        let b = c.org_network("acme").unwrap();
        assert_eq!(a, 1, "numbers start at 1 (0 is the platform's)");
        assert_eq!(b, 2);
        assert_eq!(c.org_network("personal").unwrap(), a);
        assert_eq!(c.org_network("acme").unwrap(), b);
        assert!(c.org_network("bad/slug").is_err());
    }

    const M1: &str = "3d8d413b29d089";
    const M2: &str = "0e286039f42e86";

    #[test]
    fn apps_are_unique_and_deleting_one_takes_its_machines() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        c.create_app(&app("web")).unwrap();
        c.create_app(&app("webby")).unwrap();
        let dup = c.create_app(&app("web")).unwrap_err();
        assert!(matches!(dup, ControlError::AppExists { .. }));
        assert_eq!(dup.to_api().status(), 422);
        assert_eq!(dup.to_api().body().status, aloft_api::ErrorStatus::NameTaken);
        let names: Vec<_> = c.list_apps().unwrap().into_iter().map(|a| a.value.name).collect();
        assert_eq!(names, ["web", "webby"]);

        c.create_machine(&machine("web", M1)).unwrap();
        c.create_machine(&machine("webby", M2)).unwrap();
        c.append_event("web", M1, &event("01HBZ8QRZ3SMDZBT8KWTJKBFGN", "launch"))
            .unwrap();
        // Custom domains are keyed by hostname, the app inside the record.
        let cert = |host: &str, app: &str| {
            c.store()
                .put(
                    &format!("/certs/{host}"),
                    serde_json::to_vec(&serde_json::json!({"hostname": host, "app": app, "status": "ready"}))
                        .unwrap(),
                )
                .unwrap();
        };
        cert("www.example.com", "web");
        cert("shop.example.com", "webby");
        // An edge is issuing both: the deleted app's claim goes with its record.
        for host in ["www.example.com", "shop.example.com"] {
            let rev = c
                .store()
                .get(&format!("/certs/{host}"))
                .unwrap()
                .unwrap()
                .mod_revision;
            let got = c
                .claim_cert(host, "edge-a", Duration::from_secs(600), rev)
                .unwrap();
            assert!(matches!(got, CertClaimOutcome::Claimed(_)));
        }
        assert!(c.delete_app("web").unwrap());
        assert!(c.cert_claim("www.example.com").unwrap().is_none());
        assert!(c.cert_claim("shop.example.com").unwrap().is_some());
        let certs: Vec<String> = c
            .store()
            .range("/certs/", &aloft_store::RangeOptions::default())
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(
            certs,
            ["/certs/shop.example.com"],
            "the app's domains go with it, no other's"
        );
        assert!(!c.delete_app("web").unwrap());
        assert!(c.get_app("web").unwrap().is_none());
        assert!(c.get_machine("web", M1).unwrap().is_none());
        assert!(c.list_events("web", M1, 10).unwrap().is_empty());
        assert_eq!(
            c.list_machines("webby").unwrap().len(),
            1,
            "the other app is untouched"
        );
    }

    #[test]
    fn machine_updates_are_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        let rec = machine("web", M1);
        let r1 = c.create_machine(&rec).unwrap();
        assert!(matches!(
            c.create_machine(&rec).unwrap_err(),
            ControlError::MachineExists { .. }
        ));
        let got = c.get_machine("web", M1).unwrap().unwrap();
        assert_eq!(got.revision, r1);
        assert_eq!(got.value, rec);

        let mut started = got.value.clone();
        started.machine.state = MachineState::Started;
        let r2 = c.put_machine(&started, Expect::Revision(got.revision)).unwrap();
        // A writer that read before the update loses.
        let mut stale = got.value;
        stale.machine.state = MachineState::Stopped;
        let err = c.put_machine(&stale, Expect::Revision(r1)).unwrap_err();
        assert!(
            matches!(err, ControlError::Store(StoreError::Conflict { .. })),
            "{err}"
        );
        assert_eq!(err.to_api().status(), 409);
        assert_eq!(
            c.get_machine("web", M1).unwrap().unwrap().value.machine.state,
            MachineState::Started
        );
        c.create_machine(&machine("web", M2)).unwrap();
        let ids: Vec<MachineId> = c
            .list_machines("web")
            .unwrap()
            .into_iter()
            .map(|m| m.value.machine.id)
            .collect();
        assert_eq!(ids.iter().map(MachineId::as_str).collect::<Vec<_>>(), [M2, M1]);
        assert!(c.delete_machine("web", M1).unwrap());
        assert!(c.get_machine("web", M1).unwrap().is_none());
        assert!(r2 > r1);
    }

    fn volume(app: &str, id: &str) -> VolumeRecord {
        VolumeRecord {
            app: app.into(),
            host: "host-1".into(),
            volume: serde_json::from_value(serde_json::json!({
                "id": id, "name": "data", "state": "created", "region": "local", "size_gb": 1
            }))
            .unwrap(),
        }
    }

    #[test]
    fn volume_records_are_compare_and_swap_and_go_with_their_app() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        c.create_app(&app("web")).unwrap();
        let rec = volume("web", "vol_aaaaaaaaaaaaaaaa");
        let r1 = c.create_volume(&rec).unwrap();
        let err = c.create_volume(&rec).unwrap_err();
        assert!(matches!(err, ControlError::VolumeExists { .. }), "{err}");
        assert_eq!(err.to_api().status(), 409);
        let mut grown = rec.clone();
        grown.volume.size_gb = 3;
        c.put_volume(&grown, Expect::Revision(r1)).unwrap();
        // A writer that read before the change loses.
        let err = c.put_volume(&rec, Expect::Revision(r1)).unwrap_err();
        assert!(
            matches!(err, ControlError::Store(StoreError::Conflict { .. })),
            "{err}"
        );
        assert_eq!(
            c.get_volume("web", "vol_aaaaaaaaaaaaaaaa")
                .unwrap()
                .unwrap()
                .value
                .volume
                .size_gb,
            3
        );
        c.create_volume(&volume("web", "vol_bbbbbbbbbbbbbbbb")).unwrap();
        c.create_volume(&volume("other", "vol_cccccccccccccccc")).unwrap();
        let ids: Vec<String> = c
            .list_volumes("web")
            .unwrap()
            .into_iter()
            .map(|v| v.value.volume.id.to_string())
            .collect();
        assert_eq!(ids, ["vol_aaaaaaaaaaaaaaaa", "vol_bbbbbbbbbbbbbbbb"]);
        assert!(
            c.delete_volume("web", "vol_bbbbbbbbbbbbbbbb", Expect::Present)
                .unwrap()
        );
        assert!(c.get_volume("web", "vol_bbbbbbbbbbbbbbbb").unwrap().is_none());
        // Deleting the app takes its volume records, not another app's.
        assert!(c.delete_app("web").unwrap());
        assert!(c.list_volumes("web").unwrap().is_empty());
        assert_eq!(c.list_volumes("other").unwrap().len(), 1);
    }

    fn snapshot(app: &str, id: &str, volume: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.parse().unwrap(),
            app: app.into(),
            volume_id: volume.parse().unwrap(),
            volume_name: "data".into(),
            region: "local".into(),
            host: "host-1".into(),
            created_at_ms: 1_700_000_000_000,
            size: 0,
            volume_size: 0,
            digest: String::new(),
            retention_days: 5,
            state: SnapshotState::Pending,
        }
    }

    #[test]
    fn snapshot_records_need_their_volume_outlive_it_and_go_with_their_app() {
        const V: &str = "vol_aaaaaaaaaaaaaaaa";
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        // Neither the app nor the volume exists: nothing is recorded.
        let pending = snapshot("web", "vs_aaaaaaaaaaaaaaaa", V);
        let err = c.create_snapshot(&pending).unwrap_err();
        assert!(matches!(err, ControlError::VolumeNotFound { .. }), "{err}");
        assert_eq!(err.to_api().status(), 404);
        c.create_app(&app("web")).unwrap();
        let err = c.create_snapshot(&pending).unwrap_err();
        assert!(matches!(err, ControlError::VolumeNotFound { .. }), "{err}");
        assert!(c.list_snapshots("web").unwrap().is_empty());

        c.create_volume(&volume("web", V)).unwrap();
        let r1 = c.create_snapshot(&pending).unwrap();
        let err = c.create_snapshot(&pending).unwrap_err();
        assert!(matches!(err, ControlError::SnapshotExists { .. }), "{err}");
        assert_eq!(err.to_api().status(), 409);
        // Taken: compare-and-swap from the pending record's revision.
        let taken = SnapshotRecord {
            state: SnapshotState::Created,
            size: 4096,
            volume_size: 1 << 30,
            digest: "sha256:00".into(),
            ..pending.clone()
        };
        let r2 = c.put_snapshot(&taken, Expect::Revision(r1)).unwrap();
        let err = c.put_snapshot(&taken, Expect::Revision(r1)).unwrap_err();
        assert!(
            matches!(err, ControlError::Store(StoreError::Conflict { .. })),
            "{err}"
        );
        let got = c.get_snapshot("web", "vs_aaaaaaaaaaaaaaaa").unwrap().unwrap();
        assert_eq!((got.value, got.revision), (taken.clone(), r2));
        // The JSON names its state in lowercase.
        let raw = c
            .store()
            .get("/volume-snapshots/web/vs_aaaaaaaaaaaaaaaa")
            .unwrap()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&raw.value).unwrap();
        assert_eq!(json["state"], "created");
        assert_eq!(json["volume_id"], V);

        c.create_snapshot(&snapshot("web", "vs_bbbbbbbbbbbbbbbb", V))
            .unwrap();
        // Its volume's record goes; the snapshots stay, and none is listed with the volumes.
        assert!(c.delete_volume("web", V, Expect::Present).unwrap());
        assert!(c.list_volumes("web").unwrap().is_empty());
        let ids: Vec<String> = c
            .list_snapshots("web")
            .unwrap()
            .into_iter()
            .map(|s| s.value.id.to_string())
            .collect();
        assert_eq!(ids, ["vs_aaaaaaaaaaaaaaaa", "vs_bbbbbbbbbbbbbbbb"]);
        assert!(
            c.delete_snapshot("web", "vs_bbbbbbbbbbbbbbbb", Expect::Present)
                .unwrap()
        );
        assert!(c.get_snapshot("web", "vs_bbbbbbbbbbbbbbbb").unwrap().is_none());
        let err = c
            .delete_snapshot("web", "vs_aaaaaaaaaaaaaaaa", Expect::Revision(r1))
            .unwrap_err();
        assert!(
            matches!(err, ControlError::Store(StoreError::Conflict { .. })),
            "{err}"
        );

        // Another app's snapshots are its own; deleting an app takes its snapshot records.
        c.create_app(&app("webby")).unwrap();
        c.create_volume(&volume("webby", V)).unwrap();
        c.create_snapshot(&snapshot("webby", "vs_cccccccccccccccc", V))
            .unwrap();
        assert!(c.get_snapshot("web", "vs_cccccccccccccccc").unwrap().is_none());
        assert!(c.delete_app("web").unwrap());
        assert!(c.list_snapshots("web").unwrap().is_empty());
        assert_eq!(c.list_snapshots("webby").unwrap().len(), 1);
    }

    fn event(id: &str, kind: &str) -> MachineEvent {
        MachineEvent {
            id: id.into(),
            kind: kind.into(),
            status: "created".into(),
            source: None,
            timestamp: 1,
            request: None,
        }
    }

    #[test]
    fn events_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        for (i, id) in [
            "01HBZ8QEY7Y1V2CNPD8Q5FG6EV",
            "01HBZ8QRZ3SMDZBT8KWTJKBFGN",
            "01HBZ9AAAAAAAAAAAAAAAAAAAA",
        ]
        .iter()
        .enumerate()
        {
            c.append_event("web", M1, &event(id, &format!("e{i}"))).unwrap();
        }
        let kinds: Vec<_> = c
            .list_events("web", M1, 2)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["e2", "e1"]);
        assert!(matches!(
            c.append_event("web", M1, &event("../x", "bad")),
            Err(ControlError::Store(StoreError::InvalidKey { .. }))
        ));
    }

    fn lease_req(nonce: &str, owner: &str, ttl_secs: u64) -> MachineLeaseRequest {
        MachineLeaseRequest {
            nonce: nonce.into(),
            owner: owner.into(),
            description: "deploy".into(),
            ttl: Duration::from_secs(ttl_secs),
            version: "01HBZ8QEXHS0YR4R1N6S1XGEE2".into(),
        }
    }

    #[test]
    fn machine_leases_follow_fly() {
        let dir = tempfile::tempdir().unwrap();
        let (c, clock) = control(&dir);
        let l = c.acquire_lease("web", M1, &lease_req("n1", "alice", 13)).unwrap();
        assert_eq!(l.expires_at, 1_700_000_013);
        c.check_lease("web", M1, Some("n1")).unwrap();
        // Held by someone else: 409 with flyctl's text.
        let held = c
            .acquire_lease("web", M1, &lease_req("n2", "bob", 13))
            .unwrap_err();
        assert!(matches!(&held, ControlError::LeaseHeld { owner, .. } if owner == "alice"));
        let api = held.to_api();
        assert_eq!(api.status(), 409);
        assert!(api.message().contains("lease currently held by alice"));
        assert!(c.check_lease("web", M1, None).is_err());
        assert!(c.check_lease("web", M1, Some("wrong")).is_err());
        assert!(matches!(
            c.release_lease("web", M1, "wrong"),
            Err(ControlError::LeaseHeld { .. })
        ));

        // Refresh moves the expiry; the old store lease ending does not take the record along.
        clock.advance(Duration::from_secs(10));
        let r = c.refresh_lease("web", M1, "n1", Duration::from_secs(13)).unwrap();
        assert_eq!(r.expires_at, 1_700_000_023);
        clock.advance(Duration::from_secs(10));
        assert_eq!(c.get_lease("web", M1).unwrap().unwrap().nonce, "n1");

        // Expiry frees the machine without anyone releasing.
        clock.advance(Duration::from_secs(4));
        assert!(c.get_lease("web", M1).unwrap().is_none());
        c.check_lease("web", M1, None).unwrap();
        assert!(matches!(
            c.refresh_lease("web", M1, "n1", Duration::from_secs(5)),
            Err(ControlError::LeaseNotFound { .. })
        ));
        let b = c.acquire_lease("web", M1, &lease_req("n2", "bob", 30)).unwrap();
        c.release_lease("web", M1, &b.nonce).unwrap();
        let not_found = c.release_lease("web", M1, &b.nonce).unwrap_err();
        assert_eq!(not_found.to_api().status(), 404);
        // Nothing leaks: every store lease granted along the way has ended.
        c.store().expire_leases().unwrap();
    }

    fn put_cert(c: &ControlStore, host: &str) -> Revision {
        c.store()
            .put(
                &format!("/certs/{host}"),
                serde_json::to_vec(&serde_json::json!({"hostname": host, "app": "web", "status": "pending"}))
                    .unwrap(),
            )
            .unwrap()
    }

    #[test]
    fn one_edge_at_a_time_claims_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c, clock) = control(&dir);
        let ttl = Duration::from_secs(600);
        let host = "www.example.com";
        let rev = put_cert(&c, host);
        let CertClaimOutcome::Claimed(a) = c.claim_cert(host, "edge-a", ttl, rev).unwrap() else {
            panic!("the first claim is taken")
        };
        assert_eq!(a.claim.owner, "edge-a");
        assert_eq!(a.claim.expires_at_ms, 1_700_000_600_000);
        assert_eq!(c.cert_claim(host).unwrap(), Some(a.claim.clone()));
        // Another edge sees who holds it.
        assert_eq!(
            c.claim_cert(host, "edge-b", ttl, rev).unwrap(),
            CertClaimOutcome::NotClaimed {
                holder: Some(a.claim.clone())
            }
        );
        // Released after the result is written: the record moved on, so an edge that read the
        // old revision does not claim (and issue) again.
        let written = put_cert(&c, host);
        c.release_cert_claim(&a).unwrap();
        assert!(c.cert_claim(host).unwrap().is_none());
        assert_eq!(
            c.claim_cert(host, "edge-b", ttl, rev).unwrap(),
            CertClaimOutcome::NotClaimed { holder: None }
        );
        // An edge that dies holding a claim blocks the hostname until the claim expires.
        let CertClaimOutcome::Claimed(_) = c.claim_cert(host, "edge-a", ttl, written).unwrap() else {
            panic!("claimed again")
        };
        clock.advance(Duration::from_secs(599));
        assert!(matches!(
            c.claim_cert(host, "edge-b", ttl, written).unwrap(),
            CertClaimOutcome::NotClaimed { holder: Some(_) }
        ));
        clock.advance(Duration::from_secs(1));
        let CertClaimOutcome::Claimed(b) = c.claim_cert(host, "edge-b", ttl, written).unwrap() else {
            panic!("the expired claim is taken over")
        };
        assert_eq!(b.claim.owner, "edge-b");
        // The same edge restarted takes over its own claim at once (a fresh lease).
        let CertClaimOutcome::Claimed(again) = c.claim_cert(host, "edge-b", ttl, written).unwrap() else {
            panic!("an edge's own claim is its own")
        };
        assert_ne!(again.lease, b.lease);
        c.release_cert_claim(&b).unwrap();
        assert_eq!(
            c.cert_claim(host).unwrap().map(|cl| cl.owner).as_deref(),
            Some("edge-b"),
            "ending the old lease leaves the claim that moved to the new one"
        );
        // Removing the certificate removes its claim; a stale revision is a conflict.
        assert!(matches!(
            c.delete_cert(host, Expect::Revision(rev)),
            Err(ControlError::Store(StoreError::Conflict { .. }))
        ));
        assert!(c.delete_cert(host, Expect::Revision(written)).unwrap());
        assert!(c.cert_claim(host).unwrap().is_none());
        assert!(!c.delete_cert(host, Expect::Any).unwrap());
        // Nothing leaks.
        c.release_cert_claim(&again).unwrap();
        c.store().expire_leases().unwrap();
    }

    #[test]
    fn a_renewed_claim_outlives_its_ttl_and_a_lost_one_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (c, clock) = control(&dir);
        let ttl = Duration::from_secs(600);
        let host = "www.example.com";
        let rev = put_cert(&c, host);
        let CertClaimOutcome::Claimed(mut a) = c.claim_cert(host, "edge-a", ttl, rev).unwrap() else {
            panic!("claimed")
        };
        let first = a.revision;
        // Renewed at a fraction of the TTL, it holds well past the first TTL.
        for _ in 0..4 {
            clock.advance(Duration::from_secs(300));
            c.renew_cert_claim(&mut a).unwrap();
            assert_eq!(c.cert_claim(host).unwrap(), Some(a.claim.clone()));
            assert!(matches!(
                c.claim_cert(host, "edge-b", ttl, rev).unwrap(),
                CertClaimOutcome::NotClaimed { holder: Some(ref h) } if h.owner == "edge-a"
            ));
        }
        assert_eq!(a.claim.expires_at_ms, 1_700_000_000_000 + 1_800_000);
        assert!(a.revision > first, "the claim is rewritten with its new expiry");

        // Removed (with its record, or by hand): the next renewal says it is lost.
        c.store().delete(&format!("/cert-claims/{host}")).unwrap();
        let err = c.renew_cert_claim(&mut a).unwrap_err();
        assert!(
            matches!(&err, ControlError::CertClaimLost { hostname, holder: None } if hostname == host),
            "{err}"
        );
        assert!(err.to_string().contains("stops issuing"), "{err}");
        c.release_cert_claim(&a).unwrap();

        // Expired and taken by another edge: lost to it, and the other edge's claim stays.
        let CertClaimOutcome::Claimed(mut a) = c.claim_cert(host, "edge-a", ttl, rev).unwrap() else {
            panic!("claimed again")
        };
        clock.advance(ttl);
        let CertClaimOutcome::Claimed(b) = c.claim_cert(host, "edge-b", ttl, rev).unwrap() else {
            panic!("the expired claim is taken over")
        };
        let err = c.renew_cert_claim(&mut a).unwrap_err();
        assert!(
            matches!(&err, ControlError::CertClaimLost { holder: Some(h), .. } if h == "edge-b"),
            "{err}"
        );
        assert!(err.to_string().contains("edge edge-b holds it now"), "{err}");
        assert_eq!(c.cert_claim(host).unwrap(), Some(b.claim.clone()));

        // A claim whose key was re-put by someone else on a live lease is not ours either.
        let mut b2 = b.clone();
        c.store()
            .put_if(
                &format!("/cert-claims/{host}"),
                serde_json::to_vec(&serde_json::json!({"owner": "edge-c", "expires_at_ms": 0})).unwrap(),
                Expect::Any,
                Some(b.lease),
            )
            .unwrap();
        assert!(matches!(
            c.renew_cert_claim(&mut b2),
            Err(ControlError::CertClaimLost { holder: Some(ref h), .. }) if h == "edge-c"
        ));
        c.release_cert_claim(&b).unwrap();
        assert!(c.cert_claim(host).unwrap().is_none());
    }

    #[test]
    fn tokens_store_only_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        let t = TokenRecord {
            id: "tok_1".into(),
            name: "admin".into(),
            org_slug: "personal".into(),
            scope: "org".into(),
            secret_sha256: "ab".repeat(32),
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at_ms: None,
        };
        c.create_token(&t).unwrap();
        assert!(matches!(
            c.create_token(&t),
            Err(ControlError::TokenExists { .. })
        ));
        assert_eq!(c.get_token("tok_1").unwrap(), Some(t.clone()));
        assert_eq!(c.list_tokens().unwrap(), [t]);
        assert!(c.delete_token("tok_1").unwrap());
        assert!(c.get_token("tok_1").unwrap().is_none());
    }

    #[test]
    fn undecodable_records_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        c.store().put("/apps/broken", b"{not json".to_vec()).unwrap();
        let err = c.get_app("broken").unwrap_err();
        assert!(
            matches!(err, ControlError::Store(StoreError::Decode { .. })),
            "{err}"
        );
        assert_eq!(err.to_api().status(), 500);
        let m: Result<Machine, _> = serde_json::from_str("{}");
        assert!(m.is_err());
    }

    fn secret(name: &str, ciphertext: &str, key_id: Option<&str>) -> SecretRecord {
        SecretRecord {
            name: name.into(),
            nonce: "AAAAAAAAAAAAAAAA".into(),
            ciphertext: ciphertext.into(),
            key_id: key_id.map(str::to_owned),
            legacy_digest: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn resealing_secrets_keeps_the_version_and_loses_to_any_change() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = control(&dir);
        c.create_app(&app("web")).unwrap();
        let base = c.secrets("web").unwrap();
        let v = c
            .apply_secrets("web", &base, vec![("DB".into(), Some(secret("DB", "old", None)))])
            .unwrap();
        assert_eq!(v, Some(1));

        // Sealed again: the records change, the version does not.
        let read = c.secrets("web").unwrap();
        assert!(
            c.reseal_secrets("web", &read, vec![secret("DB", "new", Some("b1"))])
                .unwrap()
        );
        let after = c.secrets("web").unwrap();
        assert_eq!(after.version, 1);
        assert_eq!(after.revision, read.revision);
        assert_eq!(after.secrets["DB"].ciphertext, "new");
        assert_eq!(after.secrets["DB"].key_id.as_deref(), Some("b1"));

        // A change after the read wins: the re-seal writes nothing.
        let stale = c.secrets("web").unwrap();
        c.apply_secrets(
            "web",
            &stale,
            vec![("DB".into(), Some(secret("DB", "set", Some("b1"))))],
        )
        .unwrap();
        assert!(
            !c.reseal_secrets("web", &stale, vec![secret("DB", "resealed", Some("b1"))])
                .unwrap()
        );
        assert_eq!(c.secrets("web").unwrap().secrets["DB"].ciphertext, "set");
        // Nor over a deleted app.
        let gone = c.secrets("web").unwrap();
        c.delete_app("web").unwrap();
        assert!(
            !c.reseal_secrets("web", &gone, vec![secret("DB", "x", None)])
                .unwrap()
        );
        assert!(c.secrets("web").unwrap().secrets.is_empty());
    }
}
