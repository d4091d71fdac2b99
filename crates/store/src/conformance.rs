//! The behaviour every [`Store`] implementation owes its callers, as checks that any backend's
//! tests run against fresh stores of that backend (cargo feature `conformance`).
//!
//! Each check is a function taking a [`Factory`]: something that opens a fresh, empty store
//! (with its own history) and whatever keeps it alive (a temporary directory, an etcd process).
//! Revisions are counted from the fresh store's own [`Store::revision`], so a backend whose
//! history does not start at 0 (etcd starts at 1) passes the same checks. Checks panic on the
//! first difference, like tests; [`conformance_tests!`](crate::conformance_tests) turns every
//! check into one `#[test]`:
//!
//! ```
//! use aloft_store::conformance::{Fresh, Subject};
//! use aloft_store::{SqliteOptions, SqliteStore};
//!
//! fn fresh(options: &Fresh) -> Subject {
//!     let dir = tempfile::tempdir().unwrap();
//!     let options = SqliteOptions { watch_capacity: options.watch_capacity, ..Default::default() };
//!     let store = SqliteStore::open_with(dir.path().join("store.db"), options).unwrap();
//!     Subject::new(store, dir)
//! }
//! aloft_store::conformance::revisions_count_write_transactions(&fresh);
//! // In a test module, every check as a #[test]: aloft_store::conformance_tests!(fresh);
//! ```
//!
//! What is deliberately not here, because it belongs to one backend: SQLite's lock file, damaged
//! files, restarts, and leases on a manual clock (`crates/store/tests/sqlite.rs`); etcd's
//! endpoints and connection failures (`crates/etcd/tests`). One transaction writing the same key
//! twice (or putting and deleting it) is not portable either: SQLite applies both in order, etcd
//! refuses the transaction.

#![allow(
    clippy::unwrap_used,
    reason = "checks: a failed step fails the test that runs the check"
)]

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::{
    Clock, CmpOp, Compare, EventKind, Expect, LeaseId, Op, OpResult, RangeOptions, Revision, Store,
    StoreError, Target, Txn, WatchBatch, WatchError, Watcher,
};

/// What a check asks of the fresh store it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fresh {
    /// Revisions a watcher buffers before it is cut off as lagging (the backend's option of
    /// that name).
    pub watch_capacity: usize,
}

impl Default for Fresh {
    fn default() -> Self {
        Self { watch_capacity: 1024 }
    }
}

/// A fresh store for one check, and what keeps it alive while the check runs.
pub struct Subject {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Dropped after the store: a temporary directory, a test etcd, …
    pub guard: Box<dyn Any>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Subject {
    /// A subject of `store`, keeping `guard` until after the store is dropped.
    pub fn new(store: impl Store + 'static, guard: impl Any) -> Self {
        Self {
            store: Arc::new(store),
            guard: Box::new(guard),
        }
    }
}

/// Opens a fresh, empty store: no key, no lease, no other writer.
pub type Factory<'a> = &'a dyn Fn(&Fresh) -> Subject;

/// Every check as a `#[test]` of the calling module, given a factory (a function or closure
/// `Fn(&Fresh) -> Subject`).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@each $factory;
            revisions_count_write_transactions,
            compare_and_swap_conflicts,
            transactions_are_all_or_nothing,
            comparisons_on_an_absent_key_see_zero_values,
            reads_in_a_transaction_see_its_writes,
            ranges_page_in_both_directions,
            bad_keys_are_errors,
            watch_delivers_in_order_and_resumes_from_a_revision,
            compaction_limits_history,
            compact_history_keeps_the_newest_revisions,
            slow_watchers_are_cut_off_and_resume_without_gaps,
            dropping_the_store_closes_watchers,
            watchers_can_be_awaited,
            leases_are_kept_alive_and_revoked_with_their_keys,
            leases_expire_by_themselves,
            a_watcher_sees_concurrent_writers_in_one_order_without_gaps,
            concurrent_writers_never_lose_an_update,
            store_agrees_with_a_model,
        );
    };
    (@each $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::conformance::$check(&$factory);
            }
        )*
    };
}

/// How long a check waits for a change to arrive (etcd delivers watch events asynchronously).
const PATIENCE: Duration = Duration::from_secs(10);

fn fresh(new: Factory<'_>) -> (Arc<dyn Store>, Box<dyn Any>, i64) {
    let Subject { store, guard } = new(&Fresh::default());
    let base = store.revision().unwrap().get();
    (store, guard, base)
}

/// The next batch, waiting up to [`PATIENCE`].
fn next(w: &mut Watcher) -> WatchBatch {
    match w.recv_timeout(PATIENCE) {
        Ok(Some(b)) => b,
        Ok(None) => panic!("no change arrived within {PATIENCE:?}"),
        Err(e) => panic!("watcher ended: {e}"),
    }
}

/// Whether nothing more arrives for a moment.
fn quiet(w: &mut Watcher) -> bool {
    matches!(w.recv_timeout(Duration::from_millis(200)), Ok(None))
}

/// Batches until they hold `events` events in total.
fn batches_with(w: &mut Watcher, events: usize) -> Vec<WatchBatch> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < events {
        let b = next(w);
        n += b.events.len();
        out.push(b);
    }
    out
}

/// Revisions count write transactions that change something, and keys remember theirs.
pub fn revisions_count_write_transactions(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let rev = |n: i64| Revision(base + n);
    assert_eq!(s.put("/a", b"1".to_vec()).unwrap(), rev(1));
    assert_eq!(s.put("/a", b"2".to_vec()).unwrap(), rev(2));
    let kv = s.get("/a").unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (rev(1), rev(2), 2)
    );
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.lease, None);
    // Two keys in one transaction share one revision.
    let r = s
        .txn(Txn::new().then(Op::put("/b", "x")).then(Op::put("/c", "y")))
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, rev(3));
    assert_eq!(s.get("/c").unwrap().unwrap().mod_revision, rev(3));
    // Writing nothing does not advance the revision.
    assert!(!s.delete("/nope").unwrap());
    assert_eq!(s.revision().unwrap(), rev(3));
    let read_only = s.txn(Txn::new().then(Op::get("/a"))).unwrap();
    assert_eq!(read_only.revision, rev(3));
    assert!(s.delete("/a").unwrap());
    assert_eq!(s.revision().unwrap(), rev(4));
    assert_eq!(s.get("/a").unwrap(), None);
    // Recreated keys start a new life.
    s.put("/a", b"3".to_vec()).unwrap();
    let kv = s.get("/a").unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (rev(5), 1));
    // Empty values are values.
    s.put("/empty", Vec::new()).unwrap();
    assert_eq!(s.get("/empty").unwrap().unwrap().value, b"");
}

/// `put_if`/`delete_if` fail with a conflict naming the revision found.
pub fn compare_and_swap_conflicts(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
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
    s.put_if("/k", b"d".to_vec(), Expect::Present, None).unwrap();
    let r3 = s.get("/k").unwrap().unwrap().mod_revision;
    assert!(s.delete_if("/k", Expect::Revision(r3)).unwrap());
    assert!(!s.delete_if("/k", Expect::Any).unwrap());
}

/// Comparisons pick the branch; the branch runs whole or not at all; puts report what they
/// replaced.
pub fn transactions_are_all_or_nothing(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    let first = s.put("/x", b"1".to_vec()).unwrap();
    let t = Txn::new()
        .when(Compare::new("/x", Target::Value(b"1".to_vec()), CmpOp::Equal))
        .when(Compare::absent("/y"))
        .then(Op::put("/y", "new"))
        .then(Op::delete("/x"))
        .then(Op::get("/y"))
        .or_else(Op::get("/x"));
    let r = s.txn(t.clone()).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.results.len(), 3);
    assert_eq!(r.results[0], OpResult::Put { prev: None });
    assert_eq!(r.results[1], OpResult::Delete { deleted: 1 });
    assert!(
        matches!(&r.results[2], OpResult::Get(Some(kv)) if kv.value == b"new" && kv.mod_revision == r.revision)
    );
    // Second time the comparisons fail: the failure branch runs and nothing is written.
    let before = s.revision().unwrap();
    let r = s.txn(t).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.results, [OpResult::Get(None)]);
    assert_eq!(r.revision, before);
    assert_eq!(s.revision().unwrap(), before);
    // A put reports the key it replaced.
    let r = s.txn(Txn::new().then(Op::put("/y", "newer"))).unwrap();
    match &r.results[..] {
        [OpResult::Put { prev: Some(prev) }] => {
            assert_eq!(prev.value, b"new");
            assert_eq!(prev.version, 1);
            assert!(prev.mod_revision > first);
        }
        other => panic!("{other:?}"),
    }
    // Every comparison must hold.
    let r = s
        .txn(
            Txn::new()
                .when(Compare::new("/y", Target::Version(2), CmpOp::Equal))
                .when(Compare::new(
                    "/y",
                    Target::ModRevision(Revision(0)),
                    CmpOp::Greater,
                ))
                .when(Compare::new("/y", Target::Value(b"zzz".to_vec()), CmpOp::Less))
                .when(Compare::new(
                    "/y",
                    Target::CreateRevision(Revision(0)),
                    CmpOp::NotEqual,
                ))
                .when(Compare::new("/y", Target::Lease(None), CmpOp::Equal))
                .then(Op::get("/y")),
        )
        .unwrap();
    assert!(r.succeeded);
    let r = s
        .txn(
            Txn::new()
                .when(Compare::new("/y", Target::Version(2), CmpOp::Equal))
                .when(Compare::new("/y", Target::Version(2), CmpOp::Greater))
                .then(Op::put("/never", "x")),
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(s.get("/never").unwrap(), None);
    // A put on a dead lease fails the whole transaction.
    let before = s.revision().unwrap();
    let lease = s.grant_lease(Duration::from_secs(60)).unwrap();
    assert!(s.revoke_lease(lease.id).unwrap());
    let err = s
        .txn(Txn::new().then(Op::put("/z", "1")).then(Op::Put {
            key: "/w".into(),
            value: vec![],
            lease: Some(lease.id),
        }))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseNotFound { id } if id == lease.id),
        "{err}"
    );
    assert_eq!(s.get("/z").unwrap(), None);
    assert_eq!(s.revision().unwrap(), before);
}

/// An absent key compares as revisions and version 0, an empty value and no lease.
pub fn comparisons_on_an_absent_key_see_zero_values(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    let holds = |target: Target, op: CmpOp| {
        s.txn(Txn::new().when(Compare::new("/absent", target, op)))
            .unwrap()
            .succeeded
    };
    assert!(holds(Target::CreateRevision(Revision(0)), CmpOp::Equal));
    assert!(holds(Target::ModRevision(Revision(1)), CmpOp::Less));
    assert!(holds(Target::Version(0), CmpOp::Equal));
    assert!(!holds(Target::Version(0), CmpOp::Greater));
    assert!(holds(Target::Lease(None), CmpOp::Equal));
    assert!(holds(Target::Value(Vec::new()), CmpOp::Equal));
    assert!(holds(Target::Value(b"a".to_vec()), CmpOp::NotEqual));
    assert!(holds(Target::Value(b"a".to_vec()), CmpOp::Less));
    assert!(!holds(Target::Value(Vec::new()), CmpOp::NotEqual));
    assert!(!holds(Target::Value(Vec::new()), CmpOp::Greater));
    assert!(!holds(Target::Value(b"a".to_vec()), CmpOp::Equal));
    // The same comparisons on a present key look at its value.
    s.put("/present", b"b".to_vec()).unwrap();
    let on_present = |target: Target, op: CmpOp| {
        s.txn(Txn::new().when(Compare::new("/present", target, op)))
            .unwrap()
            .succeeded
    };
    assert!(!on_present(Target::Value(Vec::new()), CmpOp::Equal));
    assert!(on_present(Target::Value(b"a".to_vec()), CmpOp::Greater));
    assert!(!on_present(Target::Value(b"a".to_vec()), CmpOp::Less));
    // Mixed with other comparisons, in both branches.
    let t = Txn::new()
        .when(Compare::new("/absent", Target::Value(Vec::new()), CmpOp::Equal))
        .when(Compare::new(
            "/present",
            Target::Value(b"b".to_vec()),
            CmpOp::Equal,
        ))
        .then(Op::put("/both", "1"))
        .or_else(Op::get("/present"));
    let r = s.txn(t.clone()).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.results, [OpResult::Put { prev: None }]);
    s.put("/absent", b"now present".to_vec()).unwrap();
    let r = s.txn(t).unwrap();
    assert!(!r.succeeded);
    assert!(matches!(&r.results[..], [OpResult::Get(Some(kv))] if kv.value == b"b"));
}

/// Gets and ranges in a transaction see the writes before them; a range reports the revision
/// before the transaction.
pub fn reads_in_a_transaction_see_its_writes(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    s.put("/t/a", b"1".to_vec()).unwrap();
    s.put("/t/b", b"2".to_vec()).unwrap();
    let before = s.revision().unwrap();
    assert_eq!(before, Revision(base + 2));
    let r = s
        .txn(
            Txn::new()
                .then(Op::put("/t/c", "3"))
                .then(Op::Range("/t/".into(), RangeOptions::default()))
                .then(Op::delete("/t/a"))
                .then(Op::Range(
                    "/t/".into(),
                    RangeOptions {
                        limit: Some(1),
                        ..Default::default()
                    },
                ))
                .then(Op::get("/t/a"))
                .then(Op::get("/t/c"))
                .then(Op::DeletePrefix("/u/".into())),
        )
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, before.next());
    let OpResult::Range(all) = &r.results[1] else {
        panic!("{:?}", r.results)
    };
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b", "/t/c"]);
    assert_eq!(all.revision, before);
    assert!(!all.more);
    assert_eq!(r.results[2], OpResult::Delete { deleted: 1 });
    let OpResult::Range(first) = &r.results[3] else {
        panic!("{:?}", r.results)
    };
    let keys: Vec<_> = first.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/b"]);
    assert!(first.more);
    assert_eq!(r.results[4], OpResult::Get(None));
    assert!(
        matches!(&r.results[5], OpResult::Get(Some(kv)) if kv.value == b"3" && kv.mod_revision == r.revision)
    );
    assert_eq!(r.results[6], OpResult::Delete { deleted: 0 });
    // A transaction that only reads reports the current revision.
    s.put("/t/d", b"4".to_vec()).unwrap();
    let r = s
        .txn(Txn::new().then(Op::Range(
            "/t/".into(),
            RangeOptions {
                descending: true,
                after: Some("/t/c".into()),
                ..Default::default()
            },
        )))
        .unwrap();
    let now = s.revision().unwrap();
    assert_eq!(r.revision, now);
    assert!(
        matches!(&r.results[..], [OpResult::Range(range)] if range.revision == now && range.kvs.len() == 1 && range.kvs[0].key == "/t/b")
    );
}

/// Ranges select by prefix, page with a limit and a cursor, in both orders.
pub fn ranges_page_in_both_directions(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    for i in 0..10 {
        s.put(&format!("/r/{i:02}"), vec![i]).unwrap();
    }
    s.put("/r0", b"outside".to_vec()).unwrap();
    s.put("/q", b"outside".to_vec()).unwrap();
    let all = s.range("/r/", &RangeOptions::default()).unwrap();
    assert_eq!(all.kvs.len(), 10);
    assert!(!all.more);
    assert_eq!(all.revision, Revision(base + 12));
    assert_eq!(all.kvs[3].value, [3]);
    let page = |limit, descending, after: Option<&str>| {
        s.range(
            "/r/",
            &RangeOptions {
                limit,
                descending,
                after: after.map(str::to_owned),
            },
        )
        .unwrap()
    };
    let keys = |r: &crate::Range| r.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>();
    let first = page(Some(4), false, None);
    assert!(first.more);
    assert_eq!(keys(&first), ["/r/00", "/r/01", "/r/02", "/r/03"]);
    let next = page(Some(4), false, Some("/r/03"));
    assert_eq!(keys(&next), ["/r/04", "/r/05", "/r/06", "/r/07"]);
    assert!(next.more);
    let last = page(Some(4), false, Some("/r/07"));
    assert_eq!(keys(&last), ["/r/08", "/r/09"]);
    assert!(!last.more);
    let exact = page(Some(2), false, Some("/r/07"));
    assert_eq!(keys(&exact), ["/r/08", "/r/09"]);
    assert!(!exact.more, "no key beyond the limit");
    let newest = page(Some(2), true, None);
    assert_eq!(keys(&newest), ["/r/09", "/r/08"]);
    assert!(newest.more);
    let older = page(Some(3), true, Some("/r/08"));
    assert_eq!(keys(&older), ["/r/07", "/r/06", "/r/05"]);
    let oldest = page(None, true, Some("/r/02"));
    assert_eq!(keys(&oldest), ["/r/01", "/r/00"]);
    assert!(!oldest.more);
    // A cursor outside the prefix, a cursor that is not a key, an empty page.
    assert_eq!(page(None, false, Some("/a")).kvs.len(), 10);
    assert_eq!(page(None, false, Some("/z")).kvs.len(), 0);
    assert_eq!(page(None, true, Some("/z")).kvs.len(), 10);
    assert_eq!(page(None, true, Some("/a")).kvs.len(), 0);
    assert_eq!(page(None, true, Some("")).kvs.len(), 0);
    assert_eq!(
        keys(&page(None, false, Some("/r/05x"))),
        ["/r/06", "/r/07", "/r/08", "/r/09"]
    );
    let zero = page(Some(0), false, None);
    assert!(zero.kvs.is_empty() && zero.more);
    let empty = s.range("/nothing/", &RangeOptions::default()).unwrap();
    assert!(empty.kvs.is_empty() && !empty.more);
    assert_eq!(empty.revision, Revision(base + 12));
    // `/` is every key.
    assert_eq!(s.range("/", &RangeOptions::default()).unwrap().kvs.len(), 12);
    let deleted = s.txn(Txn::new().then(Op::DeletePrefix("/r/".into()))).unwrap();
    assert_eq!(deleted.results, [OpResult::Delete { deleted: 10 }]);
    assert!(s.get("/r0").unwrap().is_some());
}

/// Keys that are not absolute, too long or hold control characters are refused everywhere.
pub fn bad_keys_are_errors(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let long = format!("/{}", "x".repeat(2000));
    for bad in ["", "relative", "/nul\0", "/tab\t", long.as_str()] {
        let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidKey { .. }));
        assert!(invalid(s.put(bad, vec![]).map(drop)), "{bad:?}");
        assert!(invalid(s.get(bad).map(drop)), "{bad:?}");
        assert!(
            invalid(s.range(bad, &RangeOptions::default()).map(drop)),
            "{bad:?}"
        );
        assert!(invalid(s.watch(bad, None).map(drop)), "{bad:?}");
        assert!(
            invalid(
                s.txn(Txn::new().then(Op::put("/fine", "x")).then(Op::delete(bad)))
                    .map(drop)
            ),
            "{bad:?}"
        );
        assert!(
            invalid(s.txn(Txn::new().when(Compare::absent(bad))).map(drop)),
            "{bad:?}"
        );
    }
    assert_eq!(s.revision().unwrap(), Revision(base), "nothing was written");
    // Unicode is fine.
    s.put("/ünïcode/✓", b"ok".to_vec()).unwrap();
    assert_eq!(s.get("/ünïcode/✓").unwrap().unwrap().value, b"ok");
}

/// Watches replay history from a revision, then deliver live changes, one batch per revision,
/// without gap or duplicate.
pub fn watch_delivers_in_order_and_resumes_from_a_revision(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let rev = |n: i64| Revision(base + n);
    s.put("/w/a", b"1".to_vec()).unwrap(); // 1
    s.put("/other", b"x".to_vec()).unwrap(); // 2
    s.put("/w/b", b"2".to_vec()).unwrap(); // 3
    // From revision 1: history first, then live changes, no gap.
    let mut w = s.watch("/w/", Some(rev(1))).unwrap();
    let mut live = s.watch("/w/", None).unwrap();
    assert_eq!(live.next_revision(), rev(4));
    s.txn(Txn::new().then(Op::put("/w/c", "3")).then(Op::delete("/w/a")))
        .unwrap(); // 4
    s.put("/w/b", b"22".to_vec()).unwrap(); // 5
    let got: Vec<_> = (0..4).map(|_| next(&mut w)).collect();
    let revs: Vec<_> = got.iter().map(|b| b.revision).collect();
    assert_eq!(revs, [rev(1), rev(3), rev(4), rev(5)]);
    let first = &got[0].events[0];
    assert_eq!((first.kind, first.kv.key.as_str()), (EventKind::Put, "/w/a"));
    assert_eq!(
        (
            first.kv.value.as_slice(),
            first.kv.create_revision,
            first.kv.mod_revision,
            first.kv.version
        ),
        (b"1".as_slice(), rev(1), rev(1), 1)
    );
    let four: Vec<_> = got[2]
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str()))
        .collect();
    assert_eq!(four, [(EventKind::Put, "/w/c"), (EventKind::Delete, "/w/a")]);
    let deleted = &got[2].events[1].kv;
    assert_eq!(
        (deleted.mod_revision, deleted.version, deleted.value.len()),
        (rev(4), 0, 0)
    );
    assert_eq!(got[3].events[0].kv.value, b"22");
    assert_eq!(got[3].events[0].kv.version, 2);
    assert_eq!(w.next_revision(), rev(6));

    // A watch from "now" sees only later changes.
    assert_eq!(next(&mut live).revision, rev(4));

    // Resume where the first watcher stopped: nothing is delivered twice.
    let mut resumed = s.watch("/w/", Some(w.next_revision())).unwrap();
    assert!(quiet(&mut resumed));
    s.put("/w/d", b"4".to_vec()).unwrap(); // 6
    assert_eq!(next(&mut resumed).revision, rev(6));

    // A watch that starts in the future waits for its revision.
    let mut future = s.watch("/w/", Some(rev(8))).unwrap();
    assert_eq!(future.next_revision(), rev(8));
    s.put("/w/e", b"5".to_vec()).unwrap(); // 7
    s.put("/w/f", b"6".to_vec()).unwrap(); // 8
    assert_eq!(next(&mut future).revision, rev(8));
    // A watch on one key's prefix selects nothing else.
    let mut one = s.watch("/w/f", Some(rev(1))).unwrap();
    let b = next(&mut one);
    assert_eq!((b.revision, b.events.len()), (rev(8), 1));
    assert!(quiet(&mut one));
}

/// Compaction drops history before a revision; watches from before it fail with `Compacted`.
pub fn compaction_limits_history(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let rev = |n: i64| Revision(base + n);
    for i in 0..5u8 {
        s.put("/c", vec![i]).unwrap();
    }
    s.compact(rev(4)).unwrap();
    let err = s.watch("/c", Some(rev(2))).unwrap_err();
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == rev(2) && compacted == rev(4)),
        "{err}"
    );
    assert!(err.to_string().contains("compacted"), "{err}");
    let mut w = s.watch("/c", Some(rev(4))).unwrap();
    assert_eq!(next(&mut w).revision, rev(4));
    assert_eq!(next(&mut w).revision, rev(5));
    assert_eq!(s.get("/c").unwrap().unwrap().value, [4]);
    // Compacting never goes backwards and is clamped to the present.
    s.compact(rev(2)).unwrap();
    s.watch("/c", Some(rev(4))).unwrap();
    s.compact(rev(100)).unwrap();
    assert!(matches!(
        s.watch("/c", Some(rev(4))),
        Err(StoreError::Compacted { .. })
    ));
    let mut w = s.watch("/c", None).unwrap();
    s.put("/c", vec![5]).unwrap();
    assert_eq!(next(&mut w).revision, rev(6));
    assert_eq!(s.get("/c").unwrap().unwrap().version, 6);
}

/// `compact_history` keeps the newest revisions.
pub fn compact_history_keeps_the_newest_revisions(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    assert_eq!(
        crate::compact_history(&*s, 10_000).unwrap(),
        None,
        "nothing to compact yet"
    );
    for i in 0..30 {
        s.put("/k", format!("{i}").into_bytes()).unwrap();
    }
    let now = s.revision().unwrap().get();
    let to = crate::compact_history(&*s, 10).unwrap().unwrap();
    assert_eq!(to.get(), now - 10);
    assert!(matches!(
        s.watch("/", Some(Revision(to.get() - 1))),
        Err(StoreError::Compacted { .. })
    ));
    s.watch("/", Some(Revision(to.get() + 1))).unwrap();
    assert_eq!(s.get("/k").unwrap().unwrap().value, b"29");
}

/// A watcher whose buffer fills up is cut off with `Lagged` at the first revision that did not
/// fit, and resumes from there without a gap.
pub fn slow_watchers_are_cut_off_and_resume_without_gaps(new: Factory<'_>) {
    let Subject {
        store: s,
        guard: _guard,
    } = new(&Fresh { watch_capacity: 3 });
    let base = s.revision().unwrap().get();
    let mut w = s.watch("/k", None).unwrap();
    for i in 0..10u8 {
        s.put("/k", vec![i]).unwrap();
        // Changes the watcher does not select do not count against it.
        s.put("/other", vec![i]).unwrap();
    }
    // The store cuts it off once the fourth change does not fit (etcd: when it arrives).
    let deadline = Instant::now() + PATIENCE;
    while !w.is_ended() {
        assert!(Instant::now() < deadline, "the watcher was not cut off");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(w.buffered(), 3);
    let mut seen = Vec::new();
    let resume = loop {
        match w.recv() {
            Ok(b) => seen.push(b.revision.0 - base),
            Err(WatchError::Lagged { resume_from }) => break resume_from,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(seen, [1, 3, 5]);
    assert_eq!(resume, Revision(base + 7), "the first revision that did not fit");
    let mut again = s.watch("/k", Some(resume)).unwrap();
    for expect in (7..=19).step_by(2) {
        assert_eq!(next(&mut again).revision.0 - base, expect);
    }
    assert!(quiet(&mut again));
}

/// Dropping the store ends its watchers with `Closed`.
pub fn dropping_the_store_closes_watchers(new: Factory<'_>) {
    let Subject { store: s, guard } = new(&Fresh::default());
    let mut w = s.watch("/", None).unwrap();
    s.put("/before", vec![]).unwrap();
    let before = next(&mut w).revision;
    drop(s);
    let deadline = Instant::now() + PATIENCE;
    let err = loop {
        match w.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(b)) => panic!("a change after the store was dropped: {b:?}"),
            Ok(None) => assert!(Instant::now() < deadline, "the watcher did not end"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        err,
        WatchError::Closed {
            resume_from: before.next()
        }
    );
    drop(guard);
}

/// Watchers can be awaited, on any executor.
pub fn watchers_can_be_awaited(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let mut w = s.watch("/a", None).unwrap();
    let writer = {
        let s = s.clone();
        thread::spawn(move || s.put("/a", b"x".to_vec()).unwrap())
    };
    let batch = block_on(w.recv_async()).unwrap();
    assert_eq!(batch.revision, Revision(base + 1));
    writer.join().unwrap();
}

/// A minimal executor: the store is runtime-agnostic, so the check needs none.
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

/// Leases: keys put on one go with it when it is revoked, at one revision; an ended lease can
/// be neither kept alive nor written on.
pub fn leases_are_kept_alive_and_revoked_with_their_keys(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    let before = crate::SystemClock.now_ms();
    let lease = s.grant_lease(Duration::from_secs(60)).unwrap();
    assert!(lease.ttl_ms >= 60_000, "{lease:?}");
    assert!(lease.expires_at_ms >= before + 60_000, "{lease:?}");
    let other = s.grant_lease(Duration::from_secs(60)).unwrap();
    assert_ne!(lease.id, other.id);
    s.put_if("/l/a", b"1".to_vec(), Expect::Absent, Some(lease.id))
        .unwrap();
    s.txn(Txn::new().then(Op::Put {
        key: "/l/b".into(),
        value: b"2".to_vec(),
        lease: Some(lease.id),
    }))
    .unwrap();
    s.put("/l/c", b"3".to_vec()).unwrap();
    assert_eq!(s.get("/l/a").unwrap().unwrap().lease, Some(lease.id));
    let held = s
        .txn(Txn::new().when(Compare::new("/l/a", Target::Lease(Some(lease.id)), CmpOp::Equal)))
        .unwrap();
    assert!(held.succeeded);
    let kept = s.keep_alive(lease.id).unwrap();
    assert_eq!(kept.id, lease.id);
    assert!(
        kept.ttl_ms >= 60_000 && kept.expires_at_ms >= lease.expires_at_ms,
        "{kept:?}"
    );

    let mut w = s.watch("/l/", None).unwrap();
    let at = s.revision().unwrap();
    assert!(s.revoke_lease(lease.id).unwrap());
    assert_eq!(
        s.revision().unwrap(),
        at.next(),
        "one revision for every key of the lease"
    );
    let b = next(&mut w);
    assert_eq!(b.revision, at.next());
    assert!(b.events.iter().all(|e| e.kind == EventKind::Delete), "{b:?}");
    let mut deleted: Vec<_> = b.events.iter().map(|e| e.kv.key.as_str()).collect();
    deleted.sort_unstable();
    assert_eq!(deleted, ["/l/a", "/l/b"]);
    assert_eq!(s.get("/l/a").unwrap(), None);
    assert!(s.get("/l/c").unwrap().is_some(), "keys without lease stay");
    assert!(!s.revoke_lease(lease.id).unwrap(), "already ended");
    assert!(matches!(
        s.keep_alive(lease.id),
        Err(StoreError::LeaseNotFound { id }) if id == lease.id
    ));
    let now = s.revision().unwrap();
    assert!(matches!(
        s.put_if("/l/d", vec![], Expect::Any, Some(lease.id)),
        Err(StoreError::LeaseNotFound { .. })
    ));
    assert_eq!(s.revision().unwrap(), now);
    // Revoking a lease without keys changes nothing else.
    assert!(s.revoke_lease(other.id).unwrap());
    assert!(matches!(
        s.grant_lease(Duration::ZERO),
        Err(StoreError::InvalidTtl { .. })
    ));
    assert!(matches!(
        s.grant_lease(Duration::from_secs(400 * 24 * 3600)),
        Err(StoreError::InvalidTtl { .. })
    ));
    assert!(!s.revoke_lease(LeaseId(0x7eed_0000_0000_0001)).unwrap());
    s.expire_leases().unwrap();
}

/// Leases end by themselves when not kept alive, and their keys' deletes reach watchers.
pub fn leases_expire_by_themselves(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    let l = s.grant_lease(Duration::from_secs(1)).unwrap();
    s.put_if("/bg", vec![], Expect::Any, Some(l.id)).unwrap();
    s.put("/stays", vec![]).unwrap();
    let mut w = s.watch("/bg", None).unwrap();
    // Nobody calls the store: the store ends the lease and the watcher hears of it.
    let b = next(&mut w);
    assert_eq!(b.events.len(), 1);
    assert_eq!(b.events[0].kind, EventKind::Delete);
    assert_eq!(b.events[0].kv.key, "/bg");
    assert_eq!(s.get("/bg").unwrap(), None);
    assert!(s.get("/stays").unwrap().is_some());
    assert!(matches!(
        s.keep_alive(l.id),
        Err(StoreError::LeaseNotFound { .. })
    ));
}

/// Writers on many threads: one order of revisions without gaps, each writer's order kept.
pub fn a_watcher_sees_concurrent_writers_in_one_order_without_gaps(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    let mut w = s.watch("/", Some(Revision(base + 1))).unwrap();
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
    for b in batches_with(&mut w, 200) {
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].kv.mod_revision, b.revision);
        revisions.push(b.revision.0 - base);
    }
    assert_eq!(revisions, (1..=200).collect::<Vec<_>>());
    assert!(quiet(&mut w));
    // Each writer's own puts appear in the order it made them.
    for t in 0..4 {
        let mut replay = s.watch(&format!("/t{t}/"), Some(Revision(base + 1))).unwrap();
        let keys: Vec<String> = batches_with(&mut replay, 50)
            .into_iter()
            .map(|b| b.events[0].kv.key.clone())
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("/t{t}/{i}")).collect();
        assert_eq!(keys, want);
    }
}

/// Compare-and-swap from many threads never loses an update; failed attempts write nothing.
pub fn concurrent_writers_never_lose_an_update(new: Factory<'_>) {
    let (s, _guard, base) = fresh(new);
    s.put("/counter", b"0".to_vec()).unwrap();
    let threads = 4;
    let per_thread = 25;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let s = s.clone();
            thread::spawn(move || {
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
                            Err(StoreError::Conflict { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let kv = s.get("/counter").unwrap().unwrap();
    assert_eq!(kv.value, (threads * per_thread).to_string().into_bytes());
    assert_eq!(kv.version, threads * per_thread + 1);
    // Every successful CAS was one revision; failed ones wrote nothing.
    assert_eq!(s.revision().unwrap(), Revision(base + threads * per_thread + 1));
}

#[derive(Debug, Clone)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    DeletePrefix(u8),
    /// Compare-and-swap with the key's current revision (`true`) or a stale one.
    Cas(u8, u8, bool),
    /// Puts of two different keys in one transaction.
    PutPair(u8, u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        (0u8..6).prop_map(Step::Delete),
        (0u8..2).prop_map(Step::DeletePrefix),
        (0u8..6, any::<u8>(), any::<bool>()).prop_map(|(k, v, c)| Step::Cas(k, v, c)),
        (0u8..6, 1u8..6, any::<u8>()).prop_map(|(a, d, v)| Step::PutPair(a, (a + d) % 6, v)),
    ]
}

/// A plain in-memory key space with revisions counted from 0.
#[derive(Debug, Default)]
struct Model {
    revision: i64,
    /// key → (value, create_revision, mod_revision, version)
    kv: BTreeMap<String, (Vec<u8>, i64, i64, i64)>,
    /// Every change: (revision, kind, key, value)
    log: Vec<(i64, EventKind, String, Vec<u8>)>,
}

impl Model {
    fn put(&mut self, rev: i64, k: &str, v: Vec<u8>) {
        let entry = match self.kv.get(k) {
            Some((_, create, _, version)) => (v.clone(), *create, rev, version + 1),
            None => (v.clone(), rev, rev, 1),
        };
        self.kv.insert(k.to_owned(), entry);
        self.log.push((rev, EventKind::Put, k.to_owned(), v));
    }

    fn delete(&mut self, rev: i64, k: &str) -> bool {
        let existed = self.kv.remove(k).is_some();
        if existed {
            self.log.push((rev, EventKind::Delete, k.to_owned(), Vec::new()));
        }
        existed
    }

    /// Runs `f` at the next revision; the revision advances only if it changed something.
    fn write(&mut self, f: impl FnOnce(&mut Self, i64)) {
        let before = self.log.len();
        let rev = self.revision + 1;
        f(self, rev);
        if self.log.len() > before {
            self.revision = rev;
        }
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Random operation sequences applied to the store and to a plain in-memory model agree on
/// every key, revision and version, and a watch replays exactly the changes the model recorded.
/// Each case runs under its own prefix of one store, with revisions counted from where it began.
pub fn store_agrees_with_a_model(new: Factory<'_>) {
    let (s, _guard, _) = fresh(new);
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(step(), 1..40), |steps| {
        let n = case.fetch_add(1, Ordering::Relaxed);
        let root = format!("/m{n}/");
        let key = |k: u8| format!("{root}{}/{k}", k % 2);
        let base = s.revision().map_err(fail)?.get();
        let mut m = Model::default();
        for st in steps {
            match st {
                Step::Put(k, v) => {
                    s.put(&key(k), vec![v]).map_err(fail)?;
                    m.write(|m, r| m.put(r, &key(k), vec![v]));
                }
                Step::Delete(k) => {
                    let existed = s.delete(&key(k)).map_err(fail)?;
                    let mut model_existed = false;
                    m.write(|m, r| model_existed = m.delete(r, &key(k)));
                    prop_assert_eq!(existed, model_existed);
                }
                Step::DeletePrefix(p) => {
                    let prefix = format!("{root}{p}/");
                    s.txn(Txn::new().then(Op::DeletePrefix(prefix.clone())))
                        .map_err(fail)?;
                    let keys: Vec<String> = m.kv.keys().filter(|k| k.starts_with(&prefix)).cloned().collect();
                    m.write(|m, r| {
                        for k in &keys {
                            m.delete(r, k);
                        }
                    });
                }
                Step::Cas(k, v, current) => {
                    let found = m.kv.get(&key(k)).map_or(0, |e| e.2);
                    let expect = match (current, found) {
                        (true, 0) => Expect::Absent,
                        (true, f) => Expect::Revision(Revision(base + f)),
                        (false, f) => Expect::Revision(Revision(base + f + 1000)),
                    };
                    match s.put_if(&key(k), vec![v], expect, None) {
                        Ok(r) => {
                            prop_assert!(current);
                            m.write(|m, rev| m.put(rev, &key(k), vec![v]));
                            prop_assert_eq!(r, Revision(base + m.revision));
                        }
                        Err(StoreError::Conflict { found: f, .. }) => {
                            prop_assert!(!current);
                            prop_assert_eq!(f, Revision(if found == 0 { 0 } else { base + found }));
                        }
                        Err(e) => return Err(fail(e)),
                    }
                }
                Step::PutPair(a, b, v) => {
                    s.txn(
                        Txn::new()
                            .then(Op::put(key(a), vec![v]))
                            .then(Op::put(key(b), vec![v, v])),
                    )
                    .map_err(fail)?;
                    m.write(|m, r| {
                        m.put(r, &key(a), vec![v]);
                        m.put(r, &key(b), vec![v, v]);
                    });
                }
            }
            prop_assert_eq!(s.revision().map_err(fail)?, Revision(base + m.revision));
        }
        // Every key agrees.
        let all = s.range(&root, &RangeOptions::default()).map_err(fail)?;
        let got: BTreeMap<String, (Vec<u8>, i64, i64, i64)> = all
            .kvs
            .into_iter()
            .map(|kv| {
                let at = (kv.create_revision.0 - base, kv.mod_revision.0 - base);
                (kv.key, (kv.value, at.0, at.1, kv.version))
            })
            .collect();
        prop_assert_eq!(&got, &m.kv);
        // The history replays exactly.
        let mut w = s.watch(&root, Some(Revision(base + 1))).map_err(fail)?;
        let mut replay = Vec::new();
        while replay.len() < m.log.len() {
            let Some(b) = w.recv_timeout(PATIENCE).map_err(fail)? else {
                break;
            };
            for e in b.events {
                prop_assert_eq!(e.kv.mod_revision, b.revision);
                replay.push((b.revision.0 - base, e.kind, e.kv.key, e.kv.value));
            }
        }
        prop_assert!(quiet(&mut w), "more changes than the model made");
        prop_assert_eq!(replay, m.log.clone());
        Ok(())
    });
    if let Err(e) = result {
        panic!("the store disagrees with the model: {e}");
    }
}
