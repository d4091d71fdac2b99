//! The routing table: apps, their machines as the catalog last described them, cordons and
//! custom domains. Readers take an immutable [`Snapshot`] (one `Arc` clone under a short lock);
//! every change builds the changed app's view anew and swaps the snapshot, so requests in flight
//! keep the view they started with and open connections are never dropped by an update.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use aloft_api::checks::is_service_check;
use aloft_api::{CatalogEntry, CheckState, MachineId, MachineService, MachineState};
use tokio::sync::Notify;

use crate::health::Verdicts;

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
    apps: HashMap<String, Arc<AppRoutes>>,
    domains: HashMap<String, String>,
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
pub(crate) fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        return None; // an IPv6 literal names no app
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let h = without_port.strip_suffix('.').unwrap_or(without_port);
    let valid = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return None;
    }
    // Hosts are almost always lower case already: no copy then (this runs for every request).
    Some(if h.bytes().any(|b| b.is_ascii_uppercase()) {
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
    domains: HashMap<String, String>,
    generation: u64,
}

/// The live routing table. See the module docs.
#[derive(Debug, Default)]
pub struct RoutingTable {
    sources: Mutex<Sources>,
    current: RwLock<Arc<Snapshot>>,
    changed: Notify,
}

impl RoutingTable {
    /// The table now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
            apps: HashMap::new(),
            domains: s.domains.clone(),
            generation: s.generation,
        };
        let old = self.snapshot();
        for name in s.entries.keys() {
            let since = old.app(name).map_or(s.generation, |a| a.since);
            if let Some(a) = build_app(&s, name, since) {
                snap.apps.insert(name.clone(), Arc::new(a));
            }
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        self.changed.notify_waiters();
    }

    fn publish(&self, s: &mut Sources, app: Option<&str>) {
        s.generation += 1;
        let mut snap = (*self.snapshot()).clone();
        snap.generation = s.generation;
        if let Some(app) = app {
            let since = snap.apps.get(app).map_or(s.generation, |a| a.since);
            match build_app(s, app, since) {
                Some(a) => snap.apps.insert(app.to_owned(), Arc::new(a)),
                None => snap.apps.remove(app),
            };
        }
        snap.domains = s.domains.clone();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        self.changed.notify_waiters();
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
