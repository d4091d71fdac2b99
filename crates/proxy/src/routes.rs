//! The routing table: apps, their machines as the catalog last described them, cordons and
//! custom domains. Readers take an immutable [`Snapshot`] (one `Arc` clone under a short lock);
//! every change builds the changed app's view anew and swaps the snapshot, so requests in flight
//! keep the view they started with and open connections are never dropped by an update.
//!
//! The edge's worker threads each read their own copy of the snapshot (see
//! [`RoutingTable::snapshot`]): a request then touches no lock and no reference count that
//! another core writes too, which on a busy edge costs more than the request's own work.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use aloft_api::checks::is_service_check;
use aloft_api::{CatalogEntry, CheckState, MachineId, MachineService, MachineState};
use tokio::sync::Notify;

use crate::FastMap;
use crate::health::Verdicts;
use crate::workers::OwnerId;

/// One machine as the edge routes to it.
#[derive(Debug, Clone)]
pub struct MachineRoute {
    /// What its agent published.
    pub entry: CatalogEntry,
    /// Its private address, parsed (`None`: it has none the edge can reach).
    pub ip: Option<IpAddr>,
    /// Kept out of the pool by a cordon.
    pub cordoned: bool,
}

/// A service's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `protocol = "tcp"`, or none given.
    Tcp,
    /// `protocol = "udp"`.
    Udp,
}

impl Protocol {
    /// The transport `service` asks for; `None` for one the edge does not serve.
    pub(crate) fn of(service: &MachineService) -> Option<Self> {
        match service.protocol.as_deref() {
            None => Some(Self::Tcp),
            Some(p) if p.eq_ignore_ascii_case("tcp") => Some(Self::Tcp),
            Some(p) if p.eq_ignore_ascii_case("udp") => Some(Self::Udp),
            Some(_) => None,
        }
    }
}

impl MachineRoute {
    /// The machine's TCP service that has public `port`, if any (a UDP service on the same port,
    /// e.g. DNS or QUIC beside TCP, is not it).
    pub fn service_for_port(&self, port: u16) -> Option<&MachineService> {
        self.service_for(port, Protocol::Tcp)
    }

    /// The machine's service of transport `proto` that has public `port`, if any.
    pub(crate) fn service_for(&self, port: u16, proto: Protocol) -> Option<&MachineService> {
        self.entry.services.iter().find(|s| {
            Protocol::of(s) == Some(proto)
                && s.ports.iter().any(|p| match (p.port, p.start_port, p.end_port) {
                    (Some(p), _, _) => p == port,
                    (None, Some(a), Some(b)) => (a..=b).contains(&port),
                    _ => false,
                })
        })
    }

    /// Started, by its agent's account.
    pub fn is_started(&self) -> bool {
        self.entry.state == MachineState::Started
    }

    /// Can be woken by a request: stopped, suspended, created and never started, or failed.
    ///
    /// Machines on their way to a resting state (`stopping`, `suspending`, `restarting`) and
    /// those starting already count too: a wake asks again until the machine takes the start,
    /// so a request that arrives mid-transition waits for it instead of failing.
    pub fn is_wakeable(&self) -> bool {
        matches!(
            self.entry.state,
            MachineState::Stopped
                | MachineState::Suspended
                | MachineState::Created
                | MachineState::Failed
                | MachineState::Stopping
                | MachineState::Suspending
                | MachineState::Starting
                | MachineState::Restarting
        )
    }

    /// Its service checks' verdict as its agent reports them (the catalog's statuses only):
    /// `Some(false)` when one is critical, `Some(true)` when all pass, `None` while any is still
    /// undecided (grace period) or when it has none. Routing uses [`Self::checks_verdict`], where
    /// the edge's own results take precedence.
    pub fn service_checks_passing(&self) -> Option<bool> {
        match self.checks_verdict(None) {
            ChecksVerdict::Critical => Some(false),
            ChecksVerdict::Passing => Some(true),
            ChecksVerdict::Undecided | ChecksVerdict::NoChecks => None,
        }
    }

    /// Its service checks' verdict for routing: each check's state is the edge's own result
    /// (`edge`, when it is about this run of the machine and has one for the check), else the
    /// catalog's status for it (the agent's), else undecided. Critical when any is critical,
    /// undecided when any is, passing when all pass.
    pub(crate) fn checks_verdict(&self, edge: Option<&Verdicts>) -> ChecksVerdict {
        let edge = edge.filter(|v| v.about(&self.entry.version, self.ip));
        let mut any = false;
        let mut undecided = false;
        let mut tally = |state: CheckState| {
            any = true;
            match state {
                CheckState::Critical => return true,
                CheckState::Warning => undecided = true,
                CheckState::Passing => {}
            }
            false
        };
        for c in self.entry.checks.iter().filter(|c| is_service_check(&c.name)) {
            let state = edge.and_then(|v| v.state_of(&c.name)).unwrap_or(c.status);
            if tally(state) {
                return ChecksVerdict::Critical;
            }
        }
        // Checks the catalog does not carry (yet): the edge's verdict alone.
        for (name, state) in edge.iter().flat_map(|v| v.iter()) {
            if self.entry.checks.iter().any(|c| c.name == name) {
                continue;
            }
            if tally(state.unwrap_or(CheckState::Warning)) {
                return ChecksVerdict::Critical;
            }
        }
        match (any, undecided) {
            (false, _) => ChecksVerdict::NoChecks,
            (true, true) => ChecksVerdict::Undecided,
            (true, false) => ChecksVerdict::Passing,
        }
    }
}

/// What a machine's service checks say, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChecksVerdict {
    /// It has none.
    NoChecks,
    /// All pass.
    Passing,
    /// None is critical, some are not decided yet (grace period): ranked after decided ones.
    Undecided,
    /// One is critical: it gets nothing.
    Critical,
}

/// An app's machines, in a stable order (by id).
#[derive(Debug, Clone, Default)]
pub struct AppRoutes {
    /// The app.
    pub name: String,
    /// Its organization (slug), when the store told it.
    pub org: Option<String>,
    /// Its machines.
    pub machines: Vec<Arc<MachineRoute>>,
    /// The table generation at which the app last entered the table (it had left it before,
    /// or never was in it): what it remembers about the app from before is stale.
    pub(crate) since: u64,
}

impl AppRoutes {
    /// The machine `id`.
    pub fn machine(&self, id: &str) -> Option<&Arc<MachineRoute>> {
        self.machines.iter().find(|m| m.entry.id.as_str() == id)
    }
}

/// The routing table at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    apps: FastMap<String, Arc<AppRoutes>>,
    domains: FastMap<String, String>,
    /// Bumped on every change.
    pub generation: u64,
}

impl Snapshot {
    /// The app `name`.
    pub fn app(&self, name: &str) -> Option<&Arc<AppRoutes>> {
        self.apps.get(name)
    }

    /// Every app.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppRoutes>> {
        self.apps.values()
    }

    /// The app that answers at `host` (a Host header or SNI name, port and trailing dot
    /// ignored, case-insensitive): `<app>.<base_domain>` or a custom domain.
    pub fn app_for_host(&self, host: &str, base_domain: &str) -> Option<&Arc<AppRoutes>> {
        let host = normalize_host(host)?;
        if let Some(app) = self.domains.get(host.as_ref()) {
            return self.apps.get(app);
        }
        let name = host.strip_suffix(base_domain)?.strip_suffix('.')?;
        if name.is_empty() || name.contains('.') {
            return None;
        }
        self.apps.get(name)
    }
}

/// Lower-cased host without port or trailing dot; `None` when it is empty or not a hostname.
/// One pass over the bytes: this runs for every request.
pub(crate) fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    let host = host.trim_ascii();
    let (mut colon, mut colons, mut upper) = (host.len(), 0, false);
    for (i, b) in host.bytes().enumerate() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {}
            b'A'..=b'Z' => upper = true,
            b':' => (colon, colons) = (i, colons + 1),
            // Anything else, an IPv6 literal's `[` among them, names no app.
            _ => return None,
        }
    }
    let (h, port) = host.split_at(colon);
    if colons > 1 || !port.bytes().skip(1).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.is_empty() || h.len() > 253 {
        return None;
    }
    // Hosts are almost always lower case already: no copy then.
    Some(if upper {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    })
}

#[derive(Debug, Default)]
struct Sources {
    entries: HashMap<String, HashMap<MachineId, CatalogEntry>>,
    cordoned: HashSet<(String, MachineId)>,
    orgs: HashMap<String, String>,
    domains: FastMap<String, String>,
    generation: u64,
}

/// The live routing table. See the module docs.
#[derive(Debug)]
pub struct RoutingTable {
    /// Tells this table's copies in [`LOCAL`] from other tables'.
    id: OwnerId,
    sources: Mutex<Sources>,
    current: RwLock<Arc<Snapshot>>,
    /// The generation of `current`, stored after it: a worker compares its copy with it.
    published: AtomicU64,
    changed: Notify,
}

impl Default for RoutingTable {
    fn default() -> Self {
        Self {
            id: OwnerId::default(),
            sources: Mutex::default(),
            current: RwLock::default(),
            published: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }
}

/// A worker thread's copy of one table's snapshot.
struct LocalCopy {
    table: OwnerId,
    snap: Arc<Snapshot>,
    /// The shared views each app of `snap` was copied from: an app whose shared view is still
    /// the same object is not copied again.
    from: HashMap<String, Arc<AppRoutes>>,
}

/// Tables a worker keeps copies of at most (an edge has one; tests make more).
const LOCAL_COPIES: usize = 4;

thread_local! {
    /// This worker thread's snapshot copies, by table.
    static LOCAL: RefCell<Vec<LocalCopy>> = const { RefCell::new(Vec::new()) };
}

impl RoutingTable {
    /// The table now.
    ///
    /// On an edge worker thread this is the worker's own copy, made again (only its changed
    /// apps) when the table has changed since: its `Arc`s are counted by this thread alone, and
    /// finding it reads one atomic that only a change writes. Elsewhere (the edge's loops,
    /// tests) it is the shared snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        if !crate::workers::is_worker() {
            return self.shared();
        }
        let generation = self.published.load(Ordering::Acquire);
        LOCAL.with_borrow_mut(|copies| {
            let at = copies.iter().position(|c| c.table == self.id);
            if let Some(i) = at
                && copies[i].snap.generation == generation
            {
                return copies[i].snap.clone();
            }
            let shared = self.shared();
            let old = at.map(|i| copies.swap_remove(i));
            let copy = local_copy(self.id, &shared, old);
            let snap = copy.snap.clone();
            if copies.len() >= LOCAL_COPIES {
                copies.remove(0);
            }
            copies.push(copy);
            snap
        })
    }

    /// The snapshot every thread shares.
    fn shared(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `snap` the table's snapshot.
    fn install(&self, snap: Snapshot) {
        let generation = snap.generation;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        self.published.store(generation, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Resolves when the table changes after this future was made (or `enable`d, for a
    /// check-then-wait without missing a change).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds or replaces a machine's entry.
    pub fn upsert(&self, entry: CatalogEntry) {
        let app = entry.app.clone();
        let mut s = self.sources();
        s.entries
            .entry(app.clone())
            .or_default()
            .insert(entry.id.clone(), entry);
        self.publish(&mut s, Some(&app));
    }

    /// Forgets a machine (destroyed).
    pub fn remove(&self, app: &str, id: &MachineId) {
        let mut s = self.sources();
        if let Some(m) = s.entries.get_mut(app) {
            m.remove(id);
            if m.is_empty() {
                s.entries.remove(app);
            }
        }
        self.publish(&mut s, Some(app));
    }

    /// Cordons or uncordons a machine (kept out of the pool while cordoned).
    pub fn set_cordoned(&self, app: &str, id: &MachineId, cordoned: bool) {
        let mut s = self.sources();
        let key = (app.to_owned(), id.clone());
        let changed = if cordoned {
            s.cordoned.insert(key)
        } else {
            s.cordoned.remove(&key)
        };
        if changed {
            self.publish(&mut s, Some(app));
        }
    }

    /// Records an app's organization (`None`: the app is gone).
    pub fn set_org(&self, app: &str, org: Option<String>) {
        let mut s = self.sources();
        match org {
            Some(o) => s.orgs.insert(app.to_owned(), o),
            None => s.orgs.remove(app),
        };
        self.publish(&mut s, Some(app));
    }

    /// Routes a custom domain to an app (`None`: stop routing it).
    pub fn set_domain(&self, hostname: &str, app: Option<&str>) {
        let Some(host) = normalize_host(hostname) else {
            return;
        };
        let mut s = self.sources();
        match app {
            Some(a) => s.domains.insert(host.into_owned(), a.to_owned()),
            None => s.domains.remove(host.as_ref()),
        };
        self.publish(&mut s, None);
    }

    /// Replaces everything (a fresh read of the store after a watch was lost).
    pub fn reset(&self, entries: Vec<CatalogEntry>) {
        let mut s = self.sources();
        s.entries.clear();
        for e in entries {
            s.entries
                .entry(e.app.clone())
                .or_default()
                .insert(e.id.clone(), e);
        }
        s.generation += 1;
        let mut snap = Snapshot {
            apps: FastMap::default(),
            domains: s.domains.clone(),
            generation: s.generation,
        };
        let old = self.shared();
        for name in s.entries.keys() {
            let since = old.app(name).map_or(s.generation, |a| a.since);
            if let Some(a) = build_app(&s, name, since) {
                snap.apps.insert(name.clone(), Arc::new(a));
            }
        }
        self.install(snap);
    }

    fn publish(&self, s: &mut Sources, app: Option<&str>) {
        s.generation += 1;
        let mut snap = (*self.shared()).clone();
        snap.generation = s.generation;
        if let Some(app) = app {
            let since = snap.apps.get(app).map_or(s.generation, |a| a.since);
            match build_app(s, app, since) {
                Some(a) => snap.apps.insert(app.to_owned(), Arc::new(a)),
                None => snap.apps.remove(app),
            };
        }
        snap.domains = s.domains.clone();
        self.install(snap);
    }
}

/// A worker's copy of `shared`: apps whose shared view is the one `old` was copied from keep
/// their copy; the others are copied anew, machines and all.
fn local_copy(table: OwnerId, shared: &Snapshot, old: Option<LocalCopy>) -> LocalCopy {
    let (old_snap, mut old_from) = match old {
        Some(c) => (Some(c.snap), c.from),
        None => (None, HashMap::new()),
    };
    let mut apps = FastMap::with_capacity_and_hasher(shared.apps.len(), Default::default());
    let mut from = HashMap::with_capacity(shared.apps.len());
    for (name, app) in &shared.apps {
        let kept = old_from
            .remove(name)
            .filter(|before| Arc::ptr_eq(before, app))
            .and_then(|_| old_snap.as_ref()?.apps.get(name).cloned());
        let copy = kept.unwrap_or_else(|| {
            Arc::new(AppRoutes {
                name: app.name.clone(),
                org: app.org.clone(),
                machines: app
                    .machines
                    .iter()
                    .map(|m| Arc::new(MachineRoute::clone(m)))
                    .collect(),
                since: app.since,
            })
        });
        apps.insert(name.clone(), copy);
        from.insert(name.clone(), app.clone());
    }
    LocalCopy {
        table,
        snap: Arc::new(Snapshot {
            apps,
            domains: shared.domains.clone(),
            generation: shared.generation,
        }),
        from,
    }
}

fn build_app(s: &Sources, app: &str, since: u64) -> Option<AppRoutes> {
    let entries = s.entries.get(app)?;
    let mut machines: Vec<Arc<MachineRoute>> = entries
        .values()
        .map(|e| {
            Arc::new(MachineRoute {
                ip: e.private_ip.parse().ok(),
                cordoned: s.cordoned.contains(&(app.to_owned(), e.id.clone())),
                entry: e.clone(),
            })
        })
        .collect();
    machines.sort_by(|a, b| a.entry.id.as_str().cmp(b.entry.id.as_str()));
    Some(AppRoutes {
        name: app.to_owned(),
        org: s.orgs.get(app).cloned(),
        machines,
        since,
    })
}

/// For the crate's tests: machine `n` of `app`, started, at `fdaa::n`, with `services`.
#[cfg(test)]
pub(crate) fn test_entry(app: &str, n: u8, services: Vec<MachineService>) -> CatalogEntry {
    CatalogEntry {
        id: MachineId::from_random([0x0a, 0x0b, 0, 0, 0, 0, n]),
        app: app.to_owned(),
        host: "h".to_owned(),
        region: "r".to_owned(),
        state: MachineState::Started,
        version: "v1".to_owned(),
        private_ip: format!("fdaa::{n}"),
        services,
        checks: Vec::new(),
        suspendable: false,
        process_group: String::new(),
        primary_region: String::new(),
        updated_at: 0,
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::workers::TestWorkers;

    fn entry(app: &str, n: u8) -> CatalogEntry {
        test_entry(app, n, Vec::new())
    }

    #[test]
    fn hosts_are_normalized_or_refused() {
        for (host, want) in [
            ("a.localhost", Some("a.localhost")),
            ("A.LocalHost", Some("a.localhost")),
            (" a.localhost:8080 ", Some("a.localhost")),
            ("a.localhost.", Some("a.localhost")),
            ("a.localhost.:80", Some("a.localhost")),
            ("a.localhost:", Some("a.localhost")),
            ("my_app.example.com", Some("my_app.example.com")),
            ("", None),
            (":80", None),
            (".", None),
            ("a.localhost:8o", None),
            ("a:b:80", None),
            ("[::1]:80", None),
            ("a b.localhost", None),
            ("a/b", None),
            ("ä.localhost", None),
        ] {
            assert_eq!(normalize_host(host).as_deref(), want, "{host:?}");
        }
        let long = "a".repeat(254);
        assert_eq!(normalize_host(&long), None);
        assert!(normalize_host(&long[1..]).is_some());
        assert!(matches!(normalize_host("a.localhost:80"), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn workers_read_their_own_copy_which_follows_every_change() {
        let workers = TestWorkers::start(2, "test-routes");
        let table = Arc::new(RoutingTable::default());
        table.upsert(entry("a", 1));
        table.upsert(entry("b", 2));
        let on = |worker: usize| {
            let table = table.clone();
            workers.run(worker, async move { (table.snapshot(), table.snapshot()) })
        };

        let shared = table.snapshot();
        let (w0, again) = on(0);
        assert!(Arc::ptr_eq(&w0, &again), "an unchanged table is not copied again");
        assert!(!Arc::ptr_eq(&w0, &shared), "a worker reads its own copy");
        let (a, shared_a) = (w0.app("a").expect("a"), shared.app("a").expect("a"));
        assert!(!Arc::ptr_eq(a, shared_a));
        assert!(!Arc::ptr_eq(&a.machines[0], &shared_a.machines[0]));
        assert_eq!(a.machines[0].entry.id, shared_a.machines[0].entry.id);
        assert_eq!(w0.generation, shared.generation);
        let (w1, _) = on(1);
        assert!(!Arc::ptr_eq(&w0, &w1), "each worker has its own");
        assert!(!Arc::ptr_eq(w0.app("a").expect("a"), w1.app("a").expect("a")));

        // A change shows at once; only the changed app is copied again.
        table.upsert(entry("a", 3));
        let (w0_next, _) = on(0);
        assert_eq!(w0_next.app("a").expect("a").machines.len(), 2);
        assert!(Arc::ptr_eq(w0_next.app("b").expect("b"), w0.app("b").expect("b")));
        assert!(w0_next.generation > w0.generation);
        table.set_domain("example.com", Some("b"));
        let (w0_domain, _) = on(0);
        assert_eq!(
            w0_domain
                .app_for_host("example.com", "localhost")
                .map(|a| a.name.as_str()),
            Some("b")
        );
        table.remove("a", &entry("a", 1).id);
        table.remove("a", &entry("a", 3).id);
        let (w0_gone, _) = on(0);
        assert!(
            w0_gone.app("a").is_none(),
            "an app that left is gone from the copy too"
        );
    }
}
