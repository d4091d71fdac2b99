//! The Store contract on SqliteStore: revisions, compare-and-swap, ranges, watches, leases,
//! concurrency and bad files.

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use aloft_store::{
        CmpOp, Compare, EventKind, Expect, ManualClock, Op, OpResult, RangeOptions, Revision, SqliteOptions,
        SqliteStore, Store, StoreError, Target, Txn, WatchError,
    };

    #[test]
    fn compact_history_keeps_the_newest_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(
            aloft_store::compact_history(&store, 10).unwrap(),
            None,
            "nothing to compact yet"
        );
        for i in 0..30 {
            store.put("/k", format!("{i}").into_bytes()).unwrap();
        }
        let now = store.revision().unwrap().get();
        let to = aloft_store::compact_history(&store, 10).unwrap().unwrap();
        assert_eq!(to.get(), now - 10);
        assert!(matches!(
            store.watch("/", Some(aloft_store::Revision(to.get() - 1))),
            Err(aloft_store::StoreError::Compacted { .. })
        ));
        store
            .watch("/", Some(aloft_store::Revision(to.get() + 1)))
            .unwrap();
        assert_eq!(store.get("/k").unwrap().unwrap().value, b"29");
    }

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
    fn revisions_count_write_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        assert_eq!(s.revision().unwrap(), Revision(0));
        assert_eq!(s.put("/a", b"1".to_vec()).unwrap(), Revision(1));
        assert_eq!(s.put("/a", b"2".to_vec()).unwrap(), Revision(2));
        let kv = s.get("/a").unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.mod_revision, kv.version),
            (Revision(1), Revision(2), 2)
        );
        assert_eq!(kv.value, b"2");
        // Two keys in one transaction share one revision.
        let r = s
            .txn(Txn::new().then(Op::put("/b", "x")).then(Op::put("/c", "y")))
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, Revision(3));
        assert_eq!(s.get("/c").unwrap().unwrap().mod_revision, Revision(3));
        // Writing nothing does not advance the revision.
        assert!(!s.delete("/nope").unwrap());
        assert_eq!(s.revision().unwrap(), Revision(3));
        assert!(s.delete("/a").unwrap());
        assert_eq!(s.revision().unwrap(), Revision(4));
        assert_eq!(s.get("/a").unwrap(), None);
        // Recreated keys start a new life.
        s.put("/a", b"3".to_vec()).unwrap();
        let kv = s.get("/a").unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.version), (Revision(5), 1));
    }

    #[test]
    fn compare_and_swap_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let r1 = s.put_if("/k", b"a".to_vec(), Expect::Absent, None).unwrap();
        let err = s.put_if("/k", b"b".to_vec(), Expect::Absent, None).unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict { found, .. } if *found == r1),
            "{err}"
        );
        assert!(err.to_string().contains("retry"), "{err}");
        let r2 = s.put_if("/k", b"b".to_vec(), Expect::Revision(r1), None).unwrap();
        // A stale revision loses.
        let stale = s
            .put_if("/k", b"c".to_vec(), Expect::Revision(r1), None)
            .unwrap_err();
        assert!(matches!(stale, StoreError::Conflict { found, .. } if found == r2));
        assert_eq!(s.get("/k").unwrap().unwrap().value, b"b");
        assert!(matches!(
            s.delete_if("/k", Expect::Revision(r1)),
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            s.put_if("/other", vec![], Expect::Present, None),
            Err(StoreError::Conflict {
                found: Revision(0),
                ..
            })
        ));
        assert!(s.delete_if("/k", Expect::Revision(r2)).unwrap());
    }

    #[test]
    fn transactions_are_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.put("/x", b"1".to_vec()).unwrap();
        let t = Txn::new()
            .when(Compare::new("/x", Target::Value(b"1".to_vec()), CmpOp::Equal))
            .when(Compare::absent("/y"))
            .then(Op::put("/y", "new"))
            .then(Op::delete("/x"))
            .then(Op::get("/y"))
            .or_else(Op::get("/x"));
        let r = s.txn(t.clone()).unwrap();
        assert!(r.succeeded);
        assert!(matches!(&r.results[2], OpResult::Get(Some(kv)) if kv.value == b"new"));
        // Second time the comparisons fail: the failure branch runs and nothing is written.
        let before = s.revision().unwrap();
        let r = s.txn(t).unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.results, [OpResult::Get(None)]);
        assert_eq!(s.revision().unwrap(), before);
        // A put on a dead lease fails the whole transaction.
        let err = s
            .txn(Txn::new().then(Op::put("/z", "1")).then(Op::Put {
                key: "/w".into(),
                value: vec![],
                lease: Some(aloft_store::LeaseId(999)),
            }))
            .unwrap_err();
        assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err}");
        assert_eq!(s.get("/z").unwrap(), None);
        assert_eq!(s.revision().unwrap(), before);
    }

    #[test]
    fn ranges_page_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        for i in 0..10 {
            s.put(&format!("/r/{i:02}"), vec![i]).unwrap();
        }
        s.put("/r0", b"outside".to_vec()).unwrap();
        s.put("/q", b"outside".to_vec()).unwrap();
        let all = s.range("/r/", &RangeOptions::default()).unwrap();
        assert_eq!(all.kvs.len(), 10);
        assert!(!all.more);
        assert_eq!(all.revision, Revision(12));
        let page = s
            .range(
                "/r/",
                &RangeOptions {
                    limit: Some(4),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(page.more);
        let next = s
            .range(
                "/r/",
                &RangeOptions {
                    limit: Some(4),
                    after: Some(page.kvs[3].key.clone()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(next.kvs[0].key, "/r/04");
        let newest = s
            .range(
                "/r/",
                &RangeOptions {
                    limit: Some(2),
                    descending: true,
                    ..Default::default()
                },
            )
            .unwrap();
        let keys: Vec<_> = newest.kvs.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["/r/09", "/r/08"]);
        let deleted = s.txn(Txn::new().then(Op::DeletePrefix("/r/".into()))).unwrap();
        assert_eq!(deleted.results, [OpResult::Delete { deleted: 10 }]);
        assert!(s.get("/r0").unwrap().is_some());
    }

    #[test]
    fn bad_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        for bad in ["", "relative", "/nul\0", &format!("/{}", "x".repeat(2000))] {
            assert!(
                matches!(s.put(bad, vec![]), Err(StoreError::InvalidKey { .. })),
                "{bad:?}"
            );
            assert!(
                matches!(s.get(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn watch_delivers_in_order_and_resumes_from_a_revision() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        s.put("/w/a", b"1".to_vec()).unwrap(); // 1
        s.put("/other", b"x".to_vec()).unwrap(); // 2
        s.put("/w/b", b"2".to_vec()).unwrap(); // 3
        // From revision 1: history first, then live changes, no gap.
        let mut w = s.watch("/w/", Some(Revision(1))).unwrap();
        let live = s.watch("/w/", None).unwrap();
        s.txn(Txn::new().then(Op::put("/w/c", "3")).then(Op::delete("/w/a")))
            .unwrap(); // 4
        s.put("/w/b", b"22".to_vec()).unwrap(); // 5
        let mut got = Vec::new();
        while let Some(b) = w.recv_timeout(Duration::from_secs(2)).unwrap() {
            got.push(b);
            if got.len() == 4 {
                break;
            }
        }
        let revs: Vec<_> = got.iter().map(|b| b.revision.0).collect();
        assert_eq!(revs, [1, 3, 4, 5]);
        let four: Vec<_> = got[2]
            .events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str()))
            .collect();
        assert_eq!(four, [(EventKind::Put, "/w/c"), (EventKind::Delete, "/w/a")]);
        assert_eq!(got[3].events[0].kv.value, b"22");
        assert_eq!(w.next_revision(), Revision(6));

        // A watch from "now" sees only later changes.
        let mut live = live;
        let first = live.recv_timeout(Duration::from_secs(2)).unwrap().unwrap();
        assert_eq!(first.revision, Revision(4));

        // Resume where the first watcher stopped: nothing is delivered twice.
        let mut resumed = s.watch("/w/", Some(w.next_revision())).unwrap();
        assert_eq!(resumed.try_recv().unwrap(), None);
        s.put("/w/d", b"4".to_vec()).unwrap();
        assert_eq!(resumed.recv().unwrap().revision, Revision(6));

        // A watch that starts in the future waits for its revision.
        let mut future = s.watch("/w/", Some(Revision(8))).unwrap();
        s.put("/w/e", b"5".to_vec()).unwrap(); // 7
        s.put("/w/f", b"6".to_vec()).unwrap(); // 8
        assert_eq!(future.recv().unwrap().revision, Revision(8));
    }

    #[test]
    fn compaction_limits_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        for i in 0..5u8 {
            s.put("/c", vec![i]).unwrap();
        }
        s.compact(Revision(4)).unwrap();
        let err = s.watch("/c", Some(Revision(2))).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Compacted {
                    requested: Revision(2),
                    compacted: Revision(4)
                }
            ),
            "{err}"
        );
        let mut w = s.watch("/c", Some(Revision(4))).unwrap();
        assert_eq!(w.recv().unwrap().revision, Revision(4));
        assert_eq!(s.get("/c").unwrap().unwrap().value, [4]);
        // Compacting never goes backwards, is clamped to the present, and survives a reopen.
        s.compact(Revision(2)).unwrap();
        s.compact(Revision(100)).unwrap();
        drop((w, s));
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
    fn slow_watchers_are_cut_off_and_resume_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open_with(
            dir.path().join("store.db"),
            SqliteOptions {
                watch_capacity: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut w = s.watch("/k", None).unwrap();
        for i in 0..10u8 {
            s.put("/k", vec![i]).unwrap();
            // Changes the watcher does not select do not count against it.
            s.put("/other", vec![i]).unwrap();
        }
        let mut seen = Vec::new();
        let resume = loop {
            match w.recv() {
                Ok(b) => seen.push(b.revision.0),
                Err(WatchError::Lagged { resume_from }) => break resume_from,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(seen, [1, 3, 5]);
        assert_eq!(resume, Revision(7), "the first revision that did not fit");
        let mut again = s.watch("/k", Some(resume)).unwrap();
        for expect in (7..=19).step_by(2) {
            assert_eq!(again.recv().unwrap().revision.0, expect);
        }
        assert_eq!(again.try_recv().unwrap(), None);
    }

    #[test]
    fn dropping_the_store_closes_watchers() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir);
        let mut w = s.watch("/", None).unwrap();
        drop(s);
        assert!(matches!(w.recv(), Err(WatchError::Closed { .. })));
    }

    #[test]
    fn watchers_can_be_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir));
        let mut w = s.watch("/a", None).unwrap();
        let writer = {
            let s = s.clone();
            thread::spawn(move || s.put("/a", b"x".to_vec()).unwrap())
        };
        let batch = block_on(w.recv_async()).unwrap();
        assert_eq!(batch.revision, Revision(1));
        writer.join().unwrap();
    }

    /// A minimal executor: the store is runtime-agnostic, so the test needs none.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
            thread::park_timeout(Duration::from_millis(100));
        }
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
    fn leases_expire_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open_with(
            dir.path().join("store.db"),
            SqliteOptions {
                reaper_interval: Some(Duration::from_millis(20)),
                ..Default::default()
            },
        )
        .unwrap();
        let l = s.grant_lease(Duration::from_secs(1)).unwrap();
        s.put_if("/bg", vec![], Expect::Any, Some(l.id)).unwrap();
        let mut w = s.watch("/bg", None).unwrap();
        // Nobody calls the store: the reaper ends the lease and the watcher hears of it.
        let b = w
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("expiry event");
        assert_eq!(b.events[0].kind, EventKind::Delete);
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
    fn a_watcher_sees_concurrent_writers_in_one_order_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir));
        let mut w = s.watch("/", Some(Revision(1))).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                thread::spawn(move || {
                    for i in 0..50 {
                        s.put(&format!("/t{t}/{i}"), vec![t]).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut revisions = Vec::new();
        while let Some(b) = w.try_recv().unwrap() {
            assert_eq!(b.events.len(), 1);
            assert_eq!(b.events[0].kv.mod_revision, b.revision);
            revisions.push(b.revision.0);
        }
        assert_eq!(revisions, (1..=200).collect::<Vec<_>>());
        // Each writer's own puts appear in the order it made them.
        for t in 0..4 {
            let mut replay = s.watch(&format!("/t{t}/"), Some(Revision(1))).unwrap();
            let keys: Vec<String> = std::iter::from_fn(|| replay.try_recv().unwrap())
                .map(|b| b.events[0].kv.key.clone())
                .collect();
            let want: Vec<String> = (0..50).map(|i| format!("/t{t}/{i}")).collect();
            assert_eq!(keys, want);
        }
    }

    #[test]
    fn concurrent_writers_never_lose_an_update() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(open(&dir));
        s.put("/counter", b"0".to_vec()).unwrap();
        let threads = 4;
        let per_thread = 25;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut conflicts = 0;
                    for _ in 0..per_thread {
                        loop {
                            let kv = s.get("/counter").unwrap().unwrap();
                            let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                            match s.put_if(
                                "/counter",
                                (n + 1).to_string().into_bytes(),
                                Expect::Revision(kv.mod_revision),
                                None,
                            ) {
                                Ok(_) => break,
                                Err(StoreError::Conflict { .. }) => conflicts += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        let conflicts: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let kv = s.get("/counter").unwrap().unwrap();
        assert_eq!(kv.value, (threads * per_thread).to_string().into_bytes());
        assert_eq!(kv.version, threads * per_thread + 1);
        // Every successful CAS was one revision; failed ones wrote nothing.
        assert_eq!(s.revision().unwrap(), Revision(threads * per_thread + 1));
        eprintln!("{conflicts} conflicts retried");
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
