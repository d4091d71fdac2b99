//! SqliteStore: the Store contract (`aloft_store::conformance`, shared with the etcd store), and
//! what only SQLite has: compaction that survives a reopen and is clamped past the present,
//! leases on a manual clock and across a restart, the lock file, busy, corrupt and missing files.

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use aloft_store::conformance::{Fresh, Subject};
    use aloft_store::{
        EventKind, Expect, ManualClock, Revision, SqliteOptions, SqliteStore, Store, StoreError,
    };

    /// A fresh store in a temporary directory, for the conformance checks.
    fn fresh(options: &Fresh) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with(
            dir.path().join("store.db"),
            SqliteOptions {
                watch_capacity: options.watch_capacity,
                ..SqliteOptions::default()
            },
        )
        .unwrap();
        Subject::new(store, dir)
    }

    aloft_store::conformance_tests!(fresh);

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(dir.path().join("store.db")).unwrap()
    }

    fn manual(dir: &tempfile::TempDir) -> (SqliteStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = SqliteStore::open_with(
            dir.path().join("store.db"),
            SqliteOptions {
                clock: clock.clone(),
                reaper_interval: None,
                ..SqliteOptions::default()
            },
        )
        .unwrap();
        (store, clock)
    }

    #[test]
    fn compaction_survives_a_reopen_and_is_clamped_past_the_present() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        for i in 0..5u8 {
            s.put("/c", vec![i]).unwrap();
        }
        s.compact(Revision(4)).unwrap();
        // SQLite compacts up to the next revision (etcd only up to the current one).
        s.compact(Revision(100)).unwrap();
        drop(s);
        let s = open(&dir);
        assert!(matches!(
            s.watch("/c", Some(Revision(5))),
            Err(StoreError::Compacted {
                compacted: Revision(6),
                ..
            })
        ));
        let mut w = s.watch("/c", Some(Revision(6))).unwrap();
        s.put("/c", vec![5]).unwrap();
        assert_eq!(w.recv().unwrap().revision, Revision(6));
    }

    #[test]
    fn leases_expire_and_take_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (s, clock) = manual(&dir);
        let lease = s.grant_lease(Duration::from_secs(10)).unwrap();
        assert_eq!(lease.expires_at_ms, 1_010_000);
        s.put_if("/l/a", b"1".to_vec(), Expect::Absent, Some(lease.id))
            .unwrap();
        s.put("/l/b", b"2".to_vec()).unwrap();
        let mut w = s.watch("/l/", None).unwrap();

        clock.advance(Duration::from_secs(9));
        let kept = s.keep_alive(lease.id).unwrap();
        assert_eq!(kept.expires_at_ms, 1_019_000);
        clock.advance(Duration::from_secs(9));
        assert!(s.get("/l/a").unwrap().is_some(), "kept alive");

        clock.advance(Duration::from_secs(1));
        // Reads never see a key whose lease has run out, reaper or not.
        assert_eq!(s.get("/l/a").unwrap(), None);
        assert!(s.get("/l/b").unwrap().is_some(), "keys without lease stay");
        let del = w.recv_timeout(Duration::from_secs(2)).unwrap().unwrap();
        assert_eq!(del.events[0].kind, EventKind::Delete);
        assert_eq!(del.events[0].kv.key, "/l/a");
        assert!(matches!(
            s.keep_alive(lease.id),
            Err(StoreError::LeaseNotFound { .. })
        ));
        assert!(matches!(
            s.put_if("/l/c", vec![], Expect::Any, Some(lease.id)),
            Err(StoreError::LeaseNotFound { .. })
        ));

        // Revoke deletes now; a second revoke says it was gone.
        let l2 = s.grant_lease(Duration::from_secs(60)).unwrap();
        s.put_if("/l/d", vec![], Expect::Any, Some(l2.id)).unwrap();
        assert!(s.revoke_lease(l2.id).unwrap());
        assert!(!s.revoke_lease(l2.id).unwrap());
        assert_eq!(s.get("/l/d").unwrap(), None);
        assert!(matches!(
            s.grant_lease(Duration::ZERO),
            Err(StoreError::InvalidTtl { .. })
        ));
    }

    #[test]
    fn leases_outlive_a_restart_and_expire_while_closed() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(5_000));
        let options = SqliteOptions {
            clock: clock.clone(),
            reaper_interval: None,
            ..Default::default()
        };
        let path = dir.path().join("store.db");
        let (short, long) = {
            let s = SqliteStore::open_with(&path, options.clone()).unwrap();
            let short = s.grant_lease(Duration::from_secs(10)).unwrap();
            let long = s.grant_lease(Duration::from_secs(60)).unwrap();
            s.put_if("/short", vec![], Expect::Any, Some(short.id)).unwrap();
            s.put_if("/long", vec![], Expect::Any, Some(long.id)).unwrap();
            (short, long)
        };
        clock.advance(Duration::from_secs(30));
        let s = SqliteStore::open_with(&path, options).unwrap();
        assert_eq!(s.get("/short").unwrap(), None, "expired while closed");
        assert!(s.get("/long").unwrap().is_some());
        assert!(matches!(
            s.keep_alive(short.id),
            Err(StoreError::LeaseNotFound { .. })
        ));
        s.keep_alive(long.id).unwrap();
        // Lease ids are never reused.
        assert!(s.grant_lease(Duration::from_secs(1)).unwrap().id > long.id);
    }

    #[test]
    fn a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _s = open(&dir);
        let err = SqliteStore::open(dir.path().join("store.db")).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"), "{err}");
    }

    #[test]
    fn a_locked_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let s = SqliteStore::open_with(
            &path,
            SqliteOptions {
                busy_timeout: Duration::from_millis(100),
                ..Default::default()
            },
        )
        .unwrap();
        s.put("/a", vec![]).unwrap();
        // Another program (say an sqlite3 shell) holds the write lock.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = s.put("/b", vec![]).unwrap_err();
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("locked by another connection"), "{err}");
        // Reads still work (WAL).
        assert!(s.get("/a").unwrap().is_some());
        other.execute_batch("ROLLBACK").unwrap();
        s.put("/b", vec![]).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        std::fs::write(
            &path,
            b"this is not a database, just some text that is long enough........",
        )
        .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move it away"), "{err}");

        // A real database with a damaged page.
        let path = dir.path().join("damaged.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            for i in 0..200 {
                s.put(&format!("/k/{i:04}"), vec![7; 500]).unwrap();
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 3 * 4096, "checkpointed into the main file");
        for b in &mut bytes[4096 + 100..3 * 4096] {
            *b = 0xa5;
        }
        std::fs::write(&path, bytes).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteStore::open(dir.path().join("no/such/dir/store.db")).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
    }
}
