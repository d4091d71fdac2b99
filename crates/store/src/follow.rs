//! Following the store: an in-memory view (the edge's routing table, the internal DNS zone)
//! kept in step with some prefixes of the store. The view is loaded whole, then every change
//! under the prefixes is applied in revision order. A watcher that falls behind or loses the
//! store loads everything again and carries on; the view keeps answering from what it last had
//! meanwhile.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::{EventKind, KeyValue, RangeOptions, Revision, Store, WatchError};

/// A view kept in step with prefixes of the store by [`follow`].
pub trait Follower: Send + Sync + 'static {
    /// Replaces the view with `kvs`: every key under the followed prefixes, prefix by prefix
    /// in the order they were given to [`follow`]. Called first, and again whenever the watch
    /// was lost (changes in between may be missing from the events, never from this).
    fn load(&self, kvs: &[KeyValue]);
    /// One change of a key under a followed prefix, in revision order. A change already part
    /// of the last [`Follower::load`] may come again: applying must be idempotent.
    fn apply(&self, kind: EventKind, kv: &KeyValue);
}

/// How long a follower waits before reading the store again after it could not.
const RETRY: Duration = Duration::from_secs(1);

/// Loads `follower` from `prefixes` of `store`, then follows their changes on a thread named
/// `name` until `stop` returns true (checked at least every second). The view is loaded (or the
/// first read failed and was logged, to be retried) when this returns.
pub fn follow(
    store: Arc<dyn Store>,
    prefixes: &[&str],
    follower: Arc<dyn Follower>,
    name: &str,
    stop: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<thread::JoinHandle<()>> {
    let prefixes: Vec<String> = prefixes.iter().map(|p| (*p).to_owned()).collect();
    let label = name.to_owned();
    let mut from = load_all(&*store, &prefixes, &*follower, &label);
    thread::Builder::new().name(name.to_owned()).spawn(move || {
        while !stop() {
            let Some(rev) = from else {
                thread::sleep(RETRY);
                from = load_all(&*store, &prefixes, &*follower, &label);
                continue;
            };
            // One watch over everything: the prefixes are few and share no common root.
            let mut watcher = match store.watch("/", Some(rev)) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("{label}: cannot watch the store ({e}); re-reading it");
                    from = None;
                    continue;
                }
            };
            loop {
                if stop() {
                    return;
                }
                match watcher.recv_timeout(Duration::from_secs(1)) {
                    Ok(Some(batch)) => {
                        for ev in &batch.events {
                            if prefixes.iter().any(|p| ev.kv.key.starts_with(p.as_str())) {
                                follower.apply(ev.kind, &ev.kv);
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(WatchError::Lagged { .. } | WatchError::Closed { .. }) => {
                        from = load_all(&*store, &prefixes, &*follower, &label);
                        break;
                    }
                }
            }
        }
    })
}

/// Reads every prefix and loads the follower; the revision to watch from next, `None` (logged)
/// if a read failed.
fn load_all(
    store: &dyn Store,
    prefixes: &[String],
    follower: &dyn Follower,
    label: &str,
) -> Option<Revision> {
    let mut kvs = Vec::new();
    let mut rev: Option<Revision> = None;
    for prefix in prefixes {
        match store.range(prefix, &RangeOptions::default()) {
            Ok(r) => {
                // Watching from the oldest read revision may replay a change the later reads
                // already hold; applying is idempotent, so that is harmless, and nothing is missed.
                rev = Some(rev.map_or(r.revision, |v| v.min(r.revision)));
                kvs.extend(r.kvs);
            }
            Err(e) => {
                eprintln!("{label}: cannot read {prefix} from the store: {e}");
                return None;
            }
        }
    }
    follower.load(&kvs);
    Some(rev.unwrap_or(Revision::ZERO).next())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::SqliteStore;

    /// Keys and values under the followed prefixes, and how many loads there were.
    #[derive(Default)]
    struct View {
        map: Mutex<std::collections::BTreeMap<String, String>>,
        loads: Mutex<Vec<Vec<String>>>,
    }

    impl Follower for View {
        fn load(&self, kvs: &[KeyValue]) {
            let mut map = self.map.lock().unwrap();
            map.clear();
            for kv in kvs {
                map.insert(kv.key.clone(), String::from_utf8_lossy(&kv.value).into_owned());
            }
            self.loads
                .lock()
                .unwrap()
                .push(kvs.iter().map(|kv| kv.key.clone()).collect());
        }

        fn apply(&self, kind: EventKind, kv: &KeyValue) {
            let mut map = self.map.lock().unwrap();
            match kind {
                EventKind::Put => {
                    map.insert(kv.key.clone(), String::from_utf8_lossy(&kv.value).into_owned());
                }
                EventKind::Delete => {
                    map.remove(&kv.key);
                }
            }
        }
    }

    fn wait_for(view: &View, what: impl Fn(&std::collections::BTreeMap<String, String>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what(&view.map.lock().unwrap()) {
            assert!(Instant::now() < deadline, "{:?}", view.map.lock().unwrap());
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_follower_is_loaded_in_prefix_order_then_gets_only_its_prefixes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap());
        store.put("/b/1", b"b1".to_vec()).unwrap();
        store.put("/a/1", b"a1".to_vec()).unwrap();
        store.put("/c/1", b"c1".to_vec()).unwrap();
        let view = Arc::new(View::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopped);
        let handle = follow(
            Arc::clone(&store),
            &["/b/", "/a/"],
            Arc::clone(&view) as Arc<dyn Follower>,
            "test-follow",
            Arc::new(move || flag.load(Ordering::Relaxed)),
        )
        .unwrap();
        // Loaded before `follow` returns, in the prefixes' order, without the other prefix.
        assert_eq!(
            *view.loads.lock().unwrap(),
            vec![vec!["/b/1".to_owned(), "/a/1".to_owned()]]
        );
        store.put("/a/2", b"a2".to_vec()).unwrap();
        store.put("/c/2", b"c2".to_vec()).unwrap();
        store.delete("/b/1").unwrap();
        wait_for(&view, |m| m.contains_key("/a/2") && !m.contains_key("/b/1"));
        assert!(view.map.lock().unwrap().keys().all(|k| !k.starts_with("/c/")));
        stopped.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }
}
