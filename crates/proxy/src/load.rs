//! Load counters: what each machine is serving now, when it last served, and the per-app queue
//! of requests waiting for capacity. Counters outlive routing snapshots (they are keyed by
//! machine id), so a catalog update never resets a machine's load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use aloft_api::MachineId;
use tokio::sync::Notify;

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
    epoch: Instant,
    machines: Mutex<HashMap<MachineId, Arc<MachineLoad>>>,
    apps: Mutex<HashMap<String, Arc<AppLoad>>>,
}

impl Default for Loads {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            machines: Mutex::default(),
            apps: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Loads {
    /// Milliseconds since the edge started.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn machine(&self, id: &MachineId) -> Arc<MachineLoad> {
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
        if let Some(a) = lock(&self.apps).get(app) {
            return a.clone();
        }
        lock(&self.apps).entry(app.to_owned()).or_default().clone()
    }

    /// Drops counters of machines no longer in the catalog that serve nothing.
    pub(crate) fn retain(&self, keep: impl Fn(&MachineId) -> bool) {
        lock(&self.machines).retain(|id, m| keep(id) || m.inflight.load(Ordering::Relaxed) > 0);
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
        m.failed_until_ms.load(Ordering::Relaxed) > self.now_ms()
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
        m.woken_until_ms.load(Ordering::Relaxed) > self.now_ms()
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
