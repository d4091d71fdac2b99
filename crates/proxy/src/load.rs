//! Load counters: what each machine is serving now, when it last served, and the per-app queue
//! of requests waiting for capacity. Counters outlive routing snapshots (they are keyed by
//! machine id), so a catalog update never resets a machine's load.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use aloft_api::MachineId;
use tokio::sync::Notify;

use crate::FastMap;
use crate::workers::OwnerId;

/// One machine's load.
#[derive(Debug)]
pub(crate) struct MachineLoad {
    /// Requests (or connections) in flight.
    pub(crate) inflight: AtomicU32,
    /// Requests and connections served since the edge started.
    pub(crate) served: AtomicU64,
    /// Milliseconds since the edge's epoch when it last started or finished serving something.
    last_active_ms: AtomicU64,
    /// Skip it until this time (ms since the epoch): a connect to it just failed.
    failed_until_ms: AtomicU64,
    /// Treat it as started until this time (ms since the epoch) even if the catalog still says
    /// otherwise: the edge woke it and saw it accept.
    woken_until_ms: AtomicU64,
    /// The catalog entry (its `updated_at`) the wake started from: the mark holds only while the
    /// catalog still shows that entry; anything it publishes later rules again.
    woken_from: std::sync::atomic::AtomicI64,
}

/// One app's waiting room.
#[derive(Debug, Default)]
pub(crate) struct AppLoad {
    /// Rings when any of the app's machines frees capacity.
    pub(crate) freed: Notify,
    /// Requests waiting.
    pub(crate) queued: AtomicUsize,
}

/// Every machine's and app's load.
#[derive(Debug)]
pub(crate) struct Loads {
    id: OwnerId,
    epoch: Instant,
    machines: Mutex<FastMap<MachineId, Arc<MachineLoad>>>,
    apps: Mutex<FastMap<String, Arc<AppLoad>>>,
    /// Bumped when [`Loads::retain`] drops machines: workers then forget their handles.
    dropped: AtomicU64,
}

impl Default for Loads {
    fn default() -> Self {
        Self {
            id: OwnerId::default(),
            epoch: Instant::now(),
            machines: Mutex::default(),
            apps: Mutex::default(),
            dropped: AtomicU64::new(0),
        }
    }
}

/// A worker thread's handles on one [`Loads`]' counters: finding a machine's or app's counters
/// then takes no lock that every request on every worker takes too. The counters themselves
/// stay shared: limits hold edge-wide.
struct LocalLoads {
    owner: OwnerId,
    dropped: u64,
    machines: FastMap<MachineId, Arc<MachineLoad>>,
    apps: FastMap<String, Arc<AppLoad>>,
}

thread_local! {
    static LOCAL: RefCell<Option<LocalLoads>> = const { RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Loads {
    /// Milliseconds since the edge started.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The handles this worker thread keeps (made anew for another `Loads`, or once machines
    /// were dropped).
    fn with_local<R>(&self, f: impl FnOnce(&mut LocalLoads) -> R) -> R {
        let dropped = self.dropped.load(Ordering::Acquire);
        LOCAL.with_borrow_mut(|local| {
            let local = match local {
                Some(l) if l.owner == self.id && l.dropped == dropped => l,
                _ => local.insert(LocalLoads {
                    owner: self.id,
                    dropped,
                    machines: FastMap::default(),
                    apps: FastMap::default(),
                }),
            };
            f(local)
        })
    }

    pub(crate) fn machine(&self, id: &MachineId) -> Arc<MachineLoad> {
        if !crate::workers::is_worker() {
            return self.shared_machine(id);
        }
        self.with_local(|l| {
            if let Some(m) = l.machines.get(id) {
                return m.clone();
            }
            let m = self.shared_machine(id);
            l.machines.insert(id.clone(), m.clone());
            m
        })
    }

    fn shared_machine(&self, id: &MachineId) -> Arc<MachineLoad> {
        if let Some(m) = lock(&self.machines).get(id) {
            return m.clone();
        }
        let now = self.now_ms();
        lock(&self.machines)
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(MachineLoad {
                    inflight: AtomicU32::new(0),
                    served: AtomicU64::new(0),
                    last_active_ms: AtomicU64::new(now),
                    failed_until_ms: AtomicU64::new(0),
                    woken_until_ms: AtomicU64::new(0),
                    woken_from: std::sync::atomic::AtomicI64::new(0),
                })
            })
            .clone()
    }

    /// The machine's load if the edge has seen it.
    pub(crate) fn peek(&self, id: &MachineId) -> Option<Arc<MachineLoad>> {
        lock(&self.machines).get(id).cloned()
    }

    pub(crate) fn app(&self, app: &str) -> Arc<AppLoad> {
        if !crate::workers::is_worker() {
            return self.shared_app(app);
        }
        self.with_local(|l| {
            if let Some(a) = l.apps.get(app) {
                return a.clone();
            }
            let a = self.shared_app(app);
            l.apps.insert(app.to_owned(), a.clone());
            a
        })
    }

    fn shared_app(&self, app: &str) -> Arc<AppLoad> {
        if let Some(a) = lock(&self.apps).get(app) {
            return a.clone();
        }
        lock(&self.apps).entry(app.to_owned()).or_default().clone()
    }

    /// Drops counters of machines no longer in the catalog that serve nothing.
    pub(crate) fn retain(&self, keep: impl Fn(&MachineId) -> bool) {
        let mut machines = lock(&self.machines);
        let before = machines.len();
        machines.retain(|id, m| keep(id) || m.inflight.load(Ordering::Relaxed) > 0);
        if machines.len() != before {
            self.dropped.fetch_add(1, Ordering::Release);
        }
    }

    /// Counts one unit on `machine` only if that keeps it under `hard`.
    pub(crate) fn try_acquire(
        &self,
        machine: Arc<MachineLoad>,
        app: Arc<AppLoad>,
        hard: u32,
    ) -> Option<LoadGuard> {
        machine
            .inflight
            // SeqCst: a request that finds the machine full has counted itself in its app's
            // `queued` before this read, and [`LoadGuard`]'s drop reads `queued` after freeing
            // its unit: one of the two sees the other (see the drop).
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < hard).then_some(n + 1)
            })
            .ok()?;
        machine.served.fetch_add(1, Ordering::Relaxed);
        machine.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
        Some(LoadGuard {
            machine,
            app,
            epoch: self.epoch,
        })
    }

    /// Skips `m` for `backoff` (passive health: a connect to it just failed).
    pub(crate) fn mark_failed(&self, m: &MachineLoad, backoff: std::time::Duration) {
        let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
        m.failed_until_ms
            .store(self.now_ms().saturating_add(ms), Ordering::Relaxed);
    }

    pub(crate) fn recently_failed(&self, m: &MachineLoad) -> bool {
        Self::until(&m.failed_until_ms, || self.now_ms())
    }

    /// Whether the moment `until` holds (0: none) is still ahead; one past is set back to 0, so
    /// that the machines that never failed, nearly all, cost no clock read.
    fn until(until: &AtomicU64, now: impl FnOnce() -> u64) -> bool {
        let at = until.load(Ordering::Relaxed);
        if at == 0 {
            return false;
        }
        if at > now() {
            return true;
        }
        // Unless set anew meanwhile.
        let _ = until.compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    pub(crate) fn mark_woken(&self, m: &MachineLoad, for_ms: u64, from_entry: i64) {
        m.failed_until_ms.store(0, Ordering::Relaxed);
        m.woken_from.store(from_entry, Ordering::Relaxed);
        m.woken_until_ms.store(self.now_ms() + for_ms, Ordering::Relaxed);
        m.last_active_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Woken by the edge lately, and the catalog still shows the entry the wake started from, or
    /// one that says the machine is `starting` (the agent's start, still in progress when the
    /// edge already connected): anything else newer (suspending, stopped, …) means it went down
    /// again, and the catalog rules.
    pub(crate) fn recently_woken(&self, m: &MachineLoad, entry: &aloft_api::CatalogEntry) -> bool {
        Self::until(&m.woken_until_ms, || self.now_ms())
            && (m.woken_from.load(Ordering::Relaxed) == entry.updated_at
                || entry.state == aloft_api::MachineState::Starting)
    }

    pub(crate) fn clear_woken(&self, m: &MachineLoad) {
        m.woken_until_ms.store(0, Ordering::Relaxed);
    }

    /// Milliseconds since the machine last started or finished serving something.
    pub(crate) fn idle_ms(&self, m: &MachineLoad) -> u64 {
        self.now_ms()
            .saturating_sub(m.last_active_ms.load(Ordering::Relaxed))
    }
}

impl MachineLoad {
    pub(crate) fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Acquire)
    }
}

/// One unit of load on a machine; dropping it frees the capacity and wakes queued requests.
#[derive(Debug)]
pub(crate) struct LoadGuard {
    machine: Arc<MachineLoad>,
    app: Arc<AppLoad>,
    epoch: Instant,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.machine.inflight.fetch_sub(1, Ordering::SeqCst);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.machine.last_active_ms.store(now, Ordering::Relaxed);
        // Rung only when someone waits: ringing takes the Notify's lock, which every request
        // on every worker would otherwise take. No waiter is missed: a request that finds the
        // app full counts itself in `queued` and arms its `Notified` *before* it looks at the
        // machines' counts again (`Edge::pick`), all SeqCst, as is the decrement above. Either
        // its look sees this unit freed, or this read sees it queued.
        if self.app.queued.load(Ordering::SeqCst) > 0 {
            self.app.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::workers::TestWorkers;

    #[test]
    fn a_backoff_holds_until_its_time_and_is_then_forgotten() {
        let loads = Loads::default();
        let m = loads.machine(&MachineId::from_random([0x0c, 0, 0, 0, 0, 0, 2]));
        assert!(!loads.recently_failed(&m));
        loads.mark_failed(&m, std::time::Duration::from_secs(60));
        assert!(loads.recently_failed(&m));
        assert!(loads.recently_failed(&m), "still within it");
        // Past: reset, so that the next look reads no clock.
        std::thread::sleep(std::time::Duration::from_millis(3));
        m.failed_until_ms.store(1, Ordering::Relaxed);
        assert!(!loads.recently_failed(&m));
        assert_eq!(m.failed_until_ms.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn workers_count_on_the_shared_counters_and_forget_dropped_machines() {
        let workers = TestWorkers::start(1, "test-loads");
        let loads = Arc::new(Loads::default());
        let id = MachineId::from_random([0x0c, 0, 0, 0, 0, 0, 1]);
        let on_worker = |loads: &Arc<Loads>| {
            let (loads, id) = (loads.clone(), id.clone());
            workers.run(0, async move {
                let m = loads.machine(&id);
                let again = loads.machine(&id);
                assert!(Arc::ptr_eq(&m, &again));
                (m, loads.app("a"))
            })
        };

        let (m, app) = on_worker(&loads);
        assert!(
            Arc::ptr_eq(&m, &loads.machine(&id)),
            "the worker's handle is the shared counter"
        );
        assert!(Arc::ptr_eq(&app, &loads.app("a")));
        let guard = loads.try_acquire(m.clone(), app, 1).expect("a unit");
        assert_eq!(loads.machine(&id).inflight(), 1);
        drop(guard);

        // Dropped, then seen again: the worker counts on the new counter, not its old handle.
        loads.retain(|_| false);
        let fresh = loads.machine(&id);
        assert!(!Arc::ptr_eq(&fresh, &m));
        let (m2, _) = on_worker(&loads);
        assert!(
            Arc::ptr_eq(&m2, &fresh),
            "the worker kept a dropped machine's counter"
        );

        // Another Loads on the same worker has counters of its own.
        let other = Arc::new(Loads::default());
        let (m3, _) = on_worker(&other);
        assert!(!Arc::ptr_eq(&m3, &fresh));
        assert!(Arc::ptr_eq(&m3, &other.machine(&id)));
    }
}
