//! The publishing side of the service catalog: one [`CatalogEntry`] per machine of this host,
//! kept up to date in a [`CatalogSink`] (aloftd's writes them into the control store under
//! `/catalog/{app}/{id}`, where edges watch them).
//!
//! - [`Agent::catalog`]: the entries of this host's machines now (destroyed ones have none).
//! - [`Agent::publish_catalog`]: one thread that hands the sink only what changed —
//!   [`CatalogChange::Upsert`] for a new or changed entry (ignoring `updated_at`),
//!   [`CatalogChange::Remove`] for a machine destroyed (or, on the first pass, one the sink
//!   still lists from before but that no longer exists). Its first pass publishes every machine.
//!
//! Cost: the thread wakes on the agent's change notifications (its generation counter, so a
//! change made while it was busy is never missed) and re-reads the records of the machines that
//! changed (the agent notes which machine each change was about); the first pass, a change about
//! no machine in particular, and every [`CatalogOptions::resync`] read them all (1000 records:
//! ~75 ms in a debug build). Reads are spaced by [`CatalogOptions::min_scan_gap`] or four times
//! the last one's duration, whichever is longer, so a burst of changes is published together.
//! Check statuses change without notifications, so it also looks every
//! [`CatalogOptions::interval`] — at one counter (the checks' epoch) that tells whether any
//! status changed, re-reading statuses only then. An idle host with 1000 machines costs a lock and
//! an atomic load per interval, and one full read per resync. No thread per machine.
//!
//! Failures: a sink error is logged and the same changes are offered again after a backoff
//! (doubling up to [`CatalogOptions::max_retry`]); what the sink accepted is never sent twice.
//! The thread ends when the agent is dropped (which joins it) or the [`CatalogPublisher`] is
//! stopped or dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use aloft_api::{CatalogEntry, MachineConfig, MachineId};

use crate::agent::{Agent, Inner};
use crate::error::AgentError;
use crate::ids::now_ms;
use crate::model::MachineRecord;
use crate::plan;

/// Largest memory (MiB) of a machine that can be suspended (Fly's 2 GB).
pub const SUSPEND_MAX_MEMORY_MB: u32 = 2048;

/// Changes handed to the sink in one call, at most.
const MAX_BATCH: usize = 256;

/// One change of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogChange {
    /// A machine's entry is new or changed: write it.
    Upsert(Box<CatalogEntry>),
    /// The machine is gone: delete its entry.
    Remove {
        /// Its app.
        app: String,
        /// The machine.
        id: MachineId,
    },
}

/// Where a publisher puts the catalog. Any `FnMut(&[CatalogChange]) -> Result<(), E>` is one
/// (with nothing published before).
pub trait CatalogSink: Send + 'static {
    /// Why a call failed (logged; the call is retried).
    type Error: fmt::Display;

    /// The entries (app, machine) the sink holds for `host` from before this publisher: those
    /// whose machine does not exist are removed by the first pass. Called once, retried until it
    /// succeeds.
    fn previous(&mut self, host: &str) -> Result<Vec<(String, MachineId)>, Self::Error> {
        let _ = host;
        Ok(Vec::new())
    }

    /// Applies `changes` (in order), all or none: after an error all of them are offered again.
    fn apply(&mut self, changes: &[CatalogChange]) -> Result<(), Self::Error>;
}

impl<F, E> CatalogSink for F
where
    F: FnMut(&[CatalogChange]) -> Result<(), E> + Send + 'static,
    E: fmt::Display,
{
    type Error = E;

    fn apply(&mut self, changes: &[CatalogChange]) -> Result<(), E> {
        self(changes)
    }
}

/// How a publisher runs. [`CatalogOptions::new`] has the production values.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    /// This host's name, as placement knows it (`CatalogEntry::host`).
    pub host: String,
    /// How often check statuses are looked at (they change without notifications); also the
    /// first retry delay after a sink error. 250 ms.
    pub interval: Duration,
    /// Shortest time between two reads of the machine records (and at least four times what
    /// the last read took): a burst of changes is published together. 50 ms.
    pub min_scan_gap: Duration,
    /// Records are read again this often even without a notification (a safety net). 30 s.
    pub resync: Duration,
    /// Longest wait between retries of a failing sink. 5 s.
    pub max_retry: Duration,
}

impl CatalogOptions {
    /// Production values for host `host`.
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            interval: Duration::from_millis(250),
            min_scan_gap: Duration::from_millis(50),
            resync: Duration::from_secs(30),
            max_retry: Duration::from_secs(5),
        }
    }
}

/// Counters of a publisher (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CatalogStats {
    /// Full reads of the machine records.
    pub scans: u64,
    /// Records read one by one (the machines a change was about).
    pub records: u64,
    /// Sink calls that succeeded.
    pub batches: u64,
    /// Changes the sink accepted.
    pub changes: u64,
    /// Sink calls that failed.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    scans: AtomicU64,
    records: AtomicU64,
    batches: AtomicU64,
    changes: AtomicU64,
    errors: AtomicU64,
}

/// A running publisher ([`Agent::publish_catalog`]). Stopping or dropping it ends its thread
/// (the agent joins it when dropped); so does dropping the agent.
#[derive(Debug)]
pub struct CatalogPublisher {
    stop: Arc<AtomicBool>,
    inner: Weak<Inner>,
    counters: Arc<Counters>,
}

impl CatalogPublisher {
    /// Its counters so far.
    pub fn stats(&self) -> CatalogStats {
        let c = &self.counters;
        CatalogStats {
            scans: c.scans.load(Ordering::SeqCst),
            records: c.records.load(Ordering::SeqCst),
            batches: c.batches.load(Ordering::SeqCst),
            changes: c.changes.load(Ordering::SeqCst),
            errors: c.errors.load(Ordering::SeqCst),
        }
    }

    /// Stops publishing (a sink call in progress finishes first).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for CatalogPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(inner) = self.inner.upgrade() {
            inner.notify();
        }
    }
}

/// Whether a machine with `config` can be suspended: at most [`SUSPEND_MAX_MEMORY_MB`] of
/// memory, no swap, no `schedule` (both drivers can snapshot; a driver that cannot would make
/// this false).
pub(crate) fn suspendable(config: &MachineConfig) -> bool {
    let small = plan::guest_size(config).is_ok_and(|(_, memory)| memory <= SUSPEND_MAX_MEMORY_MB);
    let scheduled = config.schedule.as_deref().is_some_and(|s| !s.trim().is_empty());
    let swap = config
        .init
        .as_ref()
        .and_then(|i| i.swap_size_mb)
        .is_some_and(|mb| mb > 0);
    small && !scheduled && !swap
}

/// A machine's entry with `checks`, `updated_at` 0.
pub(crate) fn entry(rec: &MachineRecord, checks: Vec<aloft_api::CheckStatus>, host: &str) -> CatalogEntry {
    CatalogEntry {
        id: rec.id.clone(),
        app: rec.app.clone(),
        host: host.to_owned(),
        region: rec.region.clone(),
        state: rec.state,
        version: rec.version.clone(),
        private_ip: rec
            .resources
            .net
            .as_ref()
            .map(|n| n.private_ip.clone())
            .unwrap_or_default(),
        services: rec.config.services.clone(),
        checks,
        suspendable: suspendable(&rec.config),
        process_group: rec
            .config
            .metadata
            .get("fly_process_group")
            .cloned()
            .unwrap_or_default(),
        primary_region: rec.config.env.get("PRIMARY_REGION").cloned().unwrap_or_default(),
        updated_at: 0,
    }
}

/// The entries of every machine that is not destroyed, with their check statuses.
fn entries(inner: &Inner, host: &str) -> Result<Vec<CatalogEntry>, AgentError> {
    Ok(inner
        .all_machines()?
        .iter()
        .filter(|m| !m.state.is_terminal())
        .map(|m| entry(m, inner.check_statuses(&m.id), host))
        .collect())
}

/// What the sink holds for one machine, as far as this publisher knows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    app: String,
    /// `None`: listed by [`CatalogSink::previous`], content unknown.
    entry: Option<CatalogEntry>,
}

/// The changes that turn `held` into `desired` (entries compared with `updated_at` 0), removals
/// first, each kind in id order.
fn diff(desired: &HashMap<MachineId, CatalogEntry>, held: &HashMap<MachineId, Held>) -> Vec<CatalogChange> {
    let mut removes: Vec<(&MachineId, &Held)> =
        held.iter().filter(|(id, _)| !desired.contains_key(*id)).collect();
    removes.sort_by(|a, b| a.0.cmp(b.0));
    let mut upserts: Vec<&CatalogEntry> = desired
        .iter()
        .filter(|(id, e)| held.get(*id).and_then(|h| h.entry.as_ref()) != Some(*e))
        .map(|(_, e)| e)
        .collect();
    upserts.sort_by(|a, b| a.id.cmp(&b.id));
    removes
        .into_iter()
        .map(|(id, h)| CatalogChange::Remove {
            app: h.app.clone(),
            id: id.clone(),
        })
        .chain(
            upserts
                .into_iter()
                .map(|e| CatalogChange::Upsert(Box::new(e.clone()))),
        )
        .collect()
}

/// Records in `held` what the sink accepted.
fn accepted(held: &mut HashMap<MachineId, Held>, changes: &[CatalogChange]) {
    for c in changes {
        match c {
            CatalogChange::Upsert(e) => {
                let mut e = (**e).clone();
                e.updated_at = 0;
                held.insert(
                    e.id.clone(),
                    Held {
                        app: e.app.clone(),
                        entry: Some(e),
                    },
                );
            }
            CatalogChange::Remove { id, .. } => {
                held.remove(id);
            }
        }
    }
}

impl Agent {
    /// The catalog entries of this host's machines now (destroyed ones have none), `host` being
    /// this host's name; `updated_at` is now.
    pub fn catalog(&self, host: &str) -> Result<Vec<CatalogEntry>, AgentError> {
        let now = now_ms();
        let mut out = entries(self.shared(), host)?;
        for e in &mut out {
            e.updated_at = now;
        }
        Ok(out)
    }

    /// Starts publishing this host's catalog into `sink` (see the module docs): a first pass
    /// with every machine, then only changes, until the publisher is stopped or the agent
    /// dropped. [`AgentError::Halted`] when the agent is stopping.
    pub fn publish_catalog(
        &self,
        options: CatalogOptions,
        sink: impl CatalogSink,
    ) -> Result<CatalogPublisher, AgentError> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c) = (stop.clone(), counters.clone());
        self.shared().spawn_worker(move |inner| {
            Publisher {
                inner,
                options,
                stop: s,
                counters: c,
            }
            .run(sink);
        })?;
        Ok(CatalogPublisher {
            stop,
            inner: Arc::downgrade(self.shared()),
            counters,
        })
    }
}

/// The publisher's thread.
struct Publisher {
    inner: Arc<Inner>,
    options: CatalogOptions,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Publisher {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.inner.halted()
    }

    /// Sleeps until `until`, waking early when stopped; false when stopped.
    fn pause(&self, until: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            if Instant::now() >= until {
                return true;
            }
            let seen = self.inner.generation();
            self.inner.wait_change(seen, until);
        }
    }

    fn next_delay(&self, delay: Duration) -> Duration {
        (delay * 2).min(self.options.max_retry.max(self.options.interval))
    }

    fn run(&self, mut sink: impl CatalogSink) {
        let host = self.options.host.clone();
        let mut held: HashMap<MachineId, Held> = HashMap::new();
        let mut delay = self.options.interval;
        loop {
            if self.stopped() {
                return;
            }
            match sink.previous(&host) {
                Ok(prev) => {
                    for (app, id) in prev {
                        held.insert(id, Held { app, entry: None });
                    }
                    break;
                }
                Err(e) => {
                    self.counters.errors.fetch_add(1, Ordering::SeqCst);
                    eprintln!(
                        "aloft-agent: catalog: listing what was published before failed: {e}; retrying in {delay:?}"
                    );
                    if !self.pause(Instant::now() + delay) {
                        return;
                    }
                    delay = self.next_delay(delay);
                }
            }
        }
        let mut desired: HashMap<MachineId, CatalogEntry> = HashMap::new();
        let mut seen_gen: Option<u64> = None;
        let mut seen_epoch = 0;
        let mut last_scan: Option<Instant> = None;
        let mut dirty = false;
        let mut retry_at: Option<Instant> = None;
        let mut delay = self.options.interval;
        loop {
            if self.stopped() {
                return;
            }
            let now = Instant::now();
            let epoch = self.inner.checks_epoch();
            let (generation, touched) = self.inner.changed_since(seen_gen.unwrap_or(0));
            let resync_due = last_scan.is_none_or(|t| now >= t + self.options.resync);
            let mut scanned = None;
            if seen_gen.is_none() || resync_due || (touched.is_none() && seen_gen != Some(generation)) {
                // Everything: the first pass, the periodic resync, or a change not tied to one
                // machine.
                let started = Instant::now();
                match entries(&self.inner, &host) {
                    Ok(list) => {
                        desired = list.into_iter().map(|e| (e.id.clone(), e)).collect();
                        seen_gen = Some(generation);
                        seen_epoch = epoch;
                        dirty = true;
                        scanned = Some(started.elapsed());
                        self.counters.scans.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(AgentError::Halted) => return,
                    Err(e) => eprintln!("aloft-agent: catalog: reading the machines failed: {e}"),
                }
                last_scan = Some(now);
            } else {
                if seen_gen != Some(generation) {
                    // Only the machines that changed.
                    let started = Instant::now();
                    match self.reread(&host, touched.unwrap_or_default(), &mut desired) {
                        Ok(()) => seen_gen = Some(generation),
                        Err(AgentError::Halted) => return,
                        Err(e) => {
                            eprintln!("aloft-agent: catalog: reading a machine failed: {e}");
                            // The next pass reads everything.
                            seen_gen = None;
                        }
                    }
                    dirty = true;
                    scanned = Some(started.elapsed());
                }
                if epoch != seen_epoch {
                    for (id, e) in &mut desired {
                        let checks = self.inner.check_statuses(id);
                        if e.checks != checks {
                            e.checks = checks;
                            dirty = true;
                        }
                    }
                    seen_epoch = epoch;
                }
            }
            if dirty && retry_at.is_none_or(|t| now >= t) {
                match self.publish(&mut sink, &desired, &mut held) {
                    Ok(()) => {
                        dirty = false;
                        retry_at = None;
                        delay = self.options.interval;
                    }
                    Err(e) => {
                        self.counters.errors.fetch_add(1, Ordering::SeqCst);
                        eprintln!("aloft-agent: catalog: publishing failed: {e}; retrying in {delay:?}");
                        retry_at = Some(Instant::now() + delay);
                        delay = self.next_delay(delay);
                    }
                }
            }
            // Reads of many records are not free (1000 machines: ~75 ms in a debug build): while
            // changes keep coming, reading takes at most a fifth of a core.
            if let Some(cost) = scanned
                && !self.pause(Instant::now() + self.options.min_scan_gap.max(cost * 4))
            {
                return;
            }
            let mut deadline = Instant::now() + self.options.interval;
            if let Some(t) = retry_at {
                deadline = deadline.min(t);
            }
            self.inner.wait_change(generation, deadline);
        }
    }

    /// Reads the records of `ids` again into `desired` (gone or destroyed: out).
    fn reread(
        &self,
        host: &str,
        ids: Vec<MachineId>,
        desired: &mut HashMap<MachineId, CatalogEntry>,
    ) -> Result<(), AgentError> {
        for id in ids {
            self.counters.records.fetch_add(1, Ordering::SeqCst);
            match self.inner.machine_record(&id)? {
                Some(rec) if !rec.state.is_terminal() => {
                    let e = entry(&rec, self.inner.check_statuses(&id), host);
                    desired.insert(id, e);
                }
                _ => {
                    desired.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Hands the sink what changed, in batches; `held` follows what it accepted.
    fn publish<S: CatalogSink>(
        &self,
        sink: &mut S,
        desired: &HashMap<MachineId, CatalogEntry>,
        held: &mut HashMap<MachineId, Held>,
    ) -> Result<(), S::Error> {
        let mut changes = diff(desired, held);
        if changes.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        for c in &mut changes {
            if let CatalogChange::Upsert(e) = c {
                e.updated_at = now;
            }
        }
        for batch in changes.chunks(MAX_BATCH) {
            sink.apply(batch)?;
            accepted(held, batch);
            self.counters.batches.fetch_add(1, Ordering::SeqCst);
            self.counters
                .changes
                .fetch_add(batch.len() as u64, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use aloft_api::{MachineGuest, MachineInit, MachineService, MachineState};

    use super::*;

    fn mid(n: u8) -> MachineId {
        MachineId::from_random([n; 7])
    }

    fn rec(n: u8) -> MachineRecord {
        MachineRecord {
            id: mid(n),
            app: "web".into(),
            name: n.to_string(),
            region: "local".into(),
            org: 1,
            state: MachineState::Started,
            version: "v1".into(),
            config: MachineConfig::default(),
            resources: crate::Resources::default(),
            restart_count: 0,
            op_id: None,
            created_at: 0,
            updated_at: 0,
            checks: Vec::new(),
        }
    }

    #[test]
    fn entries_carry_what_the_edge_needs() {
        let mut r = rec(1);
        r.config.services = vec![MachineService {
            internal_port: Some(8080),
            ..MachineService::default()
        }];
        r.config.metadata.insert("fly_process_group".into(), "app".into());
        r.config.env.insert("PRIMARY_REGION".into(), "ams".into());
        r.resources.net = Some(crate::NetInfo {
            private_ip: "fdaa::2".into(),
            ..crate::NetInfo::default()
        });
        let e = entry(&r, Vec::new(), "host-1");
        assert_eq!(e.host, "host-1");
        assert_eq!(e.private_ip, "fdaa::2");
        assert_eq!(e.process_group, "app");
        assert_eq!(e.primary_region, "ams");
        assert_eq!(e.services.len(), 1);
        assert!(e.suspendable);
        assert_eq!(entry(&rec(2), Vec::new(), "h").private_ip, "");
    }

    #[test]
    fn big_scheduled_or_swapping_machines_are_not_suspendable() {
        let guest = |mb| MachineGuest {
            memory_mb: Some(mb),
            cpus: Some(1),
            ..MachineGuest::default()
        };
        let mut c = MachineConfig {
            guest: Some(guest(2048)),
            ..MachineConfig::default()
        };
        assert!(suspendable(&c));
        c.guest = Some(guest(4096));
        assert!(!suspendable(&c));
        c.guest = Some(guest(512));
        c.schedule = Some("hourly".into());
        assert!(!suspendable(&c));
        c.schedule = Some(String::new());
        assert!(suspendable(&c));
        c.init = Some(MachineInit {
            swap_size_mb: Some(512),
            ..MachineInit::default()
        });
        assert!(!suspendable(&c));
    }

    #[test]
    fn diff_sends_only_what_changed_ignoring_updated_at() {
        let a = entry(&rec(1), Vec::new(), "h");
        let b = entry(&rec(2), Vec::new(), "h");
        let mut desired: HashMap<_, _> = [(a.id.clone(), a.clone()), (b.id.clone(), b.clone())].into();
        let mut held = HashMap::new();
        held.insert(
            mid(9),
            Held {
                app: "old".into(),
                entry: None,
            },
        );
        let changes = diff(&desired, &held);
        assert_eq!(
            changes,
            vec![
                CatalogChange::Remove {
                    app: "old".into(),
                    id: mid(9)
                },
                CatalogChange::Upsert(Box::new(a.clone())),
                CatalogChange::Upsert(Box::new(b.clone())),
            ]
        );
        // Accepted with a timestamp: nothing left to send.
        let stamped: Vec<CatalogChange> = changes
            .into_iter()
            .map(|c| match c {
                CatalogChange::Upsert(mut e) => {
                    e.updated_at = 42;
                    CatalogChange::Upsert(e)
                }
                other => other,
            })
            .collect();
        accepted(&mut held, &stamped);
        assert!(diff(&desired, &held).is_empty());
        // One field changes: one upsert.
        desired.get_mut(&b.id).unwrap().state = MachineState::Stopped;
        let changes = diff(&desired, &held);
        assert_eq!(changes.len(), 1);
        assert!(
            matches!(&changes[0], CatalogChange::Upsert(e) if e.id == b.id && e.state == MachineState::Stopped)
        );
        // A machine no longer there: removed.
        desired.remove(&a.id);
        let changes = diff(&desired, &held);
        assert!(changes.contains(&CatalogChange::Remove {
            app: "web".into(),
            id: a.id.clone()
        }));
    }

    #[test]
    fn a_closure_is_a_sink() {
        let (tx, rx) = mpsc::channel();
        let mut sink =
            move |c: &[CatalogChange]| -> Result<(), String> { tx.send(c.len()).map_err(|e| e.to_string()) };
        assert!(CatalogSink::previous(&mut sink, "h").unwrap().is_empty());
        sink.apply(&[]).unwrap();
        assert_eq!(rx.recv().unwrap(), 0);
    }

    /// The publisher against a real agent on the fake driver.
    mod live {
        use std::net::{Ipv4Addr, TcpListener};
        use std::sync::Mutex;

        use aloft_api::{CheckState, MachineCheck, WaitState};

        use super::*;
        use crate::{AgentConfig, CreateMachine, FakeDriver, StopOptions};

        const T: Duration = Duration::from_secs(10);
        /// How soon a change must be published.
        const SOON: Duration = Duration::from_secs(1);

        struct Setup {
            _dir: tempfile::TempDir,
            fake: FakeDriver,
            agent: Agent,
        }

        fn setup() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let fake = FakeDriver::new();
            fake.network_address(Some(Ipv4Addr::LOCALHOST.into()));
            let config = AgentConfig {
                retry_delay: Duration::from_millis(1),
                stop_timeout: Duration::from_millis(100),
                poll: Duration::from_millis(10),
                ..AgentConfig::new(dir.path().join("agent.db"))
            };
            let agent = Agent::open(config, Arc::new(fake.clone())).unwrap();
            Setup {
                _dir: dir,
                fake,
                agent,
            }
        }

        fn channel_sink() -> (
            impl FnMut(&[CatalogChange]) -> Result<(), String> + Send + 'static,
            mpsc::Receiver<CatalogChange>,
        ) {
            let (tx, rx) = mpsc::channel();
            let sink = move |changes: &[CatalogChange]| -> Result<(), String> {
                for c in changes {
                    tx.send(c.clone()).map_err(|e| e.to_string())?;
                }
                Ok(())
            };
            (sink, rx)
        }

        /// The catalog as the changes received so far build it.
        struct View {
            rx: mpsc::Receiver<CatalogChange>,
            entries: HashMap<MachineId, CatalogEntry>,
            removed: Vec<(String, MachineId)>,
        }

        impl View {
            fn new(rx: mpsc::Receiver<CatalogChange>) -> Self {
                Self {
                    rx,
                    entries: HashMap::new(),
                    removed: Vec::new(),
                }
            }

            fn take(&mut self, c: CatalogChange) {
                match c {
                    CatalogChange::Upsert(e) => {
                        self.entries.insert(e.id.clone(), *e);
                    }
                    CatalogChange::Remove { app, id } => {
                        self.entries.remove(&id);
                        self.removed.push((app, id));
                    }
                }
            }

            /// Waits at most [`SOON`] until `done` holds for the view.
            fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
                let deadline = Instant::now() + SOON;
                while !done(self) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(left) {
                        Ok(c) => self.take(c),
                        Err(e) => panic!(
                            "not {what} within {SOON:?} ({e}): {:#?}, removed {:?}",
                            self.entries, self.removed
                        ),
                    }
                }
            }

            /// Waits until `id`'s entry satisfies `done`; returns it.
            fn entry(
                &mut self,
                id: &MachineId,
                what: &str,
                done: impl Fn(&CatalogEntry) -> bool,
            ) -> CatalogEntry {
                self.until(what, |v| v.entries.get(id).is_some_and(&done));
                self.entries[id].clone()
            }
        }

        fn upsert_of<'a>(c: &'a CatalogChange, id: &MachineId) -> Option<&'a CatalogEntry> {
            match c {
                CatalogChange::Upsert(e) if e.id == *id => Some(e),
                _ => None,
            }
        }

        fn check_state(e: &CatalogEntry) -> Option<CheckState> {
            e.checks.first().map(|c| c.status)
        }

        #[test]
        fn lifecycle_and_checks_are_published_within_a_second() {
            let s = setup();
            let (sink, rx) = channel_sink();
            let mut view = View::new(rx);
            let publisher = s
                .agent
                .publish_catalog(CatalogOptions::new("host-1"), sink)
                .unwrap();
            let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let mut config = MachineConfig {
                image: Some("busybox".into()),
                ..MachineConfig::default()
            };
            config.services = vec![MachineService {
                internal_port: Some(8080),
                protocol: Some("tcp".into()),
                ..MachineService::default()
            }];
            config.metadata.insert("fly_process_group".into(), "web".into());
            config.checks.insert(
                "up".into(),
                MachineCheck {
                    r#type: Some("tcp".into()),
                    port: Some(up.local_addr().unwrap().port()),
                    interval: Some(aloft_api::Duration(Duration::from_millis(100))),
                    grace_period: Some(aloft_api::Duration(Duration::ZERO)),
                    ..MachineCheck::default()
                },
            );
            let h = s
                .agent
                .create(CreateMachine {
                    app: "app1".into(),
                    region: "local".into(),
                    org: 1,
                    config,
                    ..CreateMachine::default()
                })
                .unwrap();
            let id = h.machine.clone();
            let rec = h.wait(T).unwrap();
            // Created and started: the entry has what the edge routes with.
            let e = view.entry(&id, "started", |e| e.state == MachineState::Started);
            assert_eq!(e.app, "app1");
            assert_eq!(e.host, "host-1");
            assert_eq!(e.region, "local");
            assert_eq!(e.version, rec.version);
            assert_eq!(e.services.len(), 1);
            assert_eq!(e.services[0].internal_port, Some(8080));
            assert_eq!(e.process_group, "web");
            assert!(e.private_ip.starts_with("fdaa:"), "{e:?}");
            assert!(e.suspendable);
            assert!(e.updated_at > 0);
            // Check statuses change without the agent's notifications and still arrive.
            view.entry(&id, "with a passing check", |e| {
                check_state(e) == Some(CheckState::Passing)
            });
            drop(up);
            view.entry(&id, "with a critical check", |e| {
                check_state(e) == Some(CheckState::Critical)
            });
            // Stopped.
            s.agent
                .stop(&id, StopOptions::default())
                .unwrap()
                .wait(T)
                .unwrap();
            let e = view.entry(&id, "stopped", |e| e.state == MachineState::Stopped);
            assert!(e.checks.is_empty(), "{e:?}");
            // Destroyed: removed.
            s.agent.destroy(&id, false).unwrap().wait(T).unwrap();
            view.until("removed", |v| !v.removed.is_empty());
            assert_eq!(view.removed, vec![("app1".to_owned(), id.clone())]);
            assert!(view.entries.is_empty());
            // Nothing changes any more: nothing more is sent.
            assert!(
                view.rx.recv_timeout(Duration::from_millis(600)).is_err(),
                "changes were sent with nothing changing"
            );
            assert!(publisher.stats().scans >= 1);
            assert!(s.agent.catalog("host-1").unwrap().is_empty());
        }

        #[test]
        fn the_first_pass_publishes_everything_and_removes_what_is_gone() {
            let s = setup();
            let h = s
                .agent
                .create(CreateMachine {
                    app: "app1".into(),
                    region: "local".into(),
                    org: 1,
                    config: MachineConfig {
                        image: Some("busybox".into()),
                        ..MachineConfig::default()
                    },
                    skip_launch: true,
                    ..CreateMachine::default()
                })
                .unwrap();
            let id = h.machine.clone();
            h.wait(T).unwrap();
            let now = s.agent.catalog("host-1").unwrap();
            assert_eq!(now.len(), 1);
            assert_eq!(now[0].state, MachineState::Created);
            // The sink still lists a machine from before that no longer exists, and the one that
            // does; it fails twice before it accepts anything.
            struct Sink {
                failures: u32,
                tx: mpsc::Sender<CatalogChange>,
                gone: MachineId,
                kept: MachineId,
            }
            impl CatalogSink for Sink {
                type Error = String;
                fn previous(&mut self, host: &str) -> Result<Vec<(String, MachineId)>, String> {
                    assert_eq!(host, "host-1");
                    Ok(vec![
                        ("old".into(), self.gone.clone()),
                        ("app1".into(), self.kept.clone()),
                    ])
                }
                fn apply(&mut self, changes: &[CatalogChange]) -> Result<(), String> {
                    if self.failures > 0 {
                        self.failures -= 1;
                        return Err("the store is down".into());
                    }
                    for c in changes {
                        self.tx.send(c.clone()).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                }
            }
            let (tx, rx) = mpsc::channel();
            let gone = MachineId::from_random([7; 7]);
            let options = CatalogOptions {
                interval: Duration::from_millis(20),
                ..CatalogOptions::new("host-1")
            };
            let publisher = s
                .agent
                .publish_catalog(
                    options,
                    Sink {
                        failures: 2,
                        tx,
                        gone: gone.clone(),
                        kept: id.clone(),
                    },
                )
                .unwrap();
            let first: Vec<CatalogChange> = (0..2).map(|_| rx.recv_timeout(T).unwrap()).collect();
            assert_eq!(
                first[0],
                CatalogChange::Remove {
                    app: "old".into(),
                    id: gone
                }
            );
            assert!(upsert_of(&first[1], &id).is_some_and(|e| e.state == MachineState::Created));
            assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
            let stats = publisher.stats();
            assert_eq!(stats.errors, 2, "{stats:?}");
            assert_eq!(stats.changes, 2, "{stats:?}");
            // Started: one more upsert.
            s.agent.start(&id).unwrap().wait(T).unwrap();
            let mut view = View::new(rx);
            view.entry(&id, "started", |e| e.state == MachineState::Started);
        }

        #[test]
        fn the_publisher_ends_with_the_agent_or_its_handle() {
            let s = setup();
            let (sink, rx) = channel_sink();
            let publisher = s.agent.publish_catalog(CatalogOptions::new("h"), sink).unwrap();
            // The thread owns the sink: once it ended, the channel is closed.
            drop(s.agent);
            assert_eq!(
                rx.recv_timeout(T),
                Err(mpsc::RecvTimeoutError::Disconnected),
                "the publisher outlived its agent"
            );
            drop(publisher);
            // Stopping the handle ends it too, the agent living on.
            let s = setup();
            let (sink, rx) = channel_sink();
            let publisher = s.agent.publish_catalog(CatalogOptions::new("h"), sink).unwrap();
            publisher.stop();
            assert_eq!(rx.recv_timeout(T), Err(mpsc::RecvTimeoutError::Disconnected));
            drop(s.fake);
        }

        #[test]
        fn idle_machines_cost_no_reads_and_no_writes() {
            let s = setup();
            let n = 100;
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    s.agent
                        .create(CreateMachine {
                            app: "idle".into(),
                            region: "local".into(),
                            org: 1,
                            config: MachineConfig {
                                image: Some("busybox".into()),
                                ..MachineConfig::default()
                            },
                            skip_launch: true,
                            ..CreateMachine::default()
                        })
                        .unwrap()
                })
                .collect();
            for h in &handles {
                h.wait(T).unwrap();
            }
            let sent: Arc<Mutex<Vec<MachineId>>> = Arc::default();
            let c = sent.clone();
            let options = CatalogOptions {
                interval: Duration::from_millis(10),
                ..CatalogOptions::new("h")
            };
            let publisher = s
                .agent
                .publish_catalog(options, move |changes: &[CatalogChange]| -> Result<(), String> {
                    c.lock().unwrap().extend(changes.iter().map(|c| match c {
                        CatalogChange::Upsert(e) => e.id.clone(),
                        CatalogChange::Remove { id, .. } => id.clone(),
                    }));
                    Ok(())
                })
                .unwrap();
            let deadline = Instant::now() + T;
            while sent.lock().unwrap().len() < n {
                assert!(
                    Instant::now() < deadline,
                    "the first pass did not publish {n} machines"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // The creates' last notifications may come after their handles returned.
            std::thread::sleep(Duration::from_millis(300));
            let before = publisher.stats();
            // A hundred intervals with nothing changing: no read of the records, no sink call.
            std::thread::sleep(Duration::from_secs(1));
            let after = publisher.stats();
            assert_eq!(after, before, "idle machines cost work");
            assert_eq!(sent.lock().unwrap().len(), n);
            // One machine changes: only its entry is sent (starting, started), read alone.
            let id = handles[0].machine.clone();
            s.agent.start(&id).unwrap().wait(T).unwrap();
            s.agent.wait(&id, &[WaitState::Started], None, None, T).unwrap();
            let deadline = Instant::now() + SOON;
            while publisher.stats().changes == after.changes {
                assert!(Instant::now() < deadline, "the start was not published");
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            let last = publisher.stats();
            assert_eq!(
                last.scans, after.scans,
                "a change of one machine read them all: {last:?}"
            );
            assert!(last.records > after.records, "{last:?}");
            let sent = sent.lock().unwrap();
            assert!(
                sent[n..].iter().all(|m| *m == id) && sent.len() - n <= 2,
                "{:?}",
                &sent[n..]
            );
        }
    }
}
