//! Service health checks run by the edge itself (Fly's proxy runs them too): the edge's view of a
//! machine, from where the users' requests come, rather than its host's.
//!
//! - **What**: every machine of the routing table that is started, has a private address and
//!   whose services define checks has its service checks run, as [`aloft_api::checks`] resolves
//!   them from the catalog entry's `services` (the same names, defaults and semantics as the
//!   agent's): tcp passes when a connection opens within the timeout; http sends one HTTP/1.1
//!   request (`Connection: close`, the check's method, path and headers) and passes on a 2xx
//!   status line within the timeout (a 3xx or anything else is critical); https the same over
//!   TLS (tokio-rustls, set up by [`aloft_tls::check`] as the agent's: the edge host's trust
//!   store for `tls_server_name`, sent as SNI, or else the machine's address, unless
//!   `tls_skip_verify`; a failed handshake is critical, its output saying what to change).
//!   Connections go through the edge's [`Dialer`], so they leave from where the machines'
//!   network lives.
//! - **When**: first once the check's grace period has passed since the edge saw the machine
//!   started, then every interval after a run ends. A machine that stops, leaves the table, or
//!   changes version or address (a restart into an update) or services has its checks forgotten
//!   (and a run in flight aborted); seen started again, its checks start over with a new grace
//!   period.
//! - **Verdicts** ([`Verdicts`], per machine, keyed by id outside the routing snapshots like the
//!   load counters): the balancer reads them for every new request or connection
//!   ([`crate::routes::MachineRoute::checks_verdict`]): the edge's result governs a check once the
//!   edge has one; until then (the edge just started, the grace period) the catalog's status (the
//!   agent's) stands in. A critical check takes the machine out of the pool; an undecided one
//!   ranks it after decided ones. Open connections are never touched.
//! - **Bounds**: one task drives every check (a timer queue, the table's change notifications
//!   and the probes in flight); at most one run per check in flight and at most [`MAX_INFLIGHT`]
//!   in all; state only for the machines being checked (and a timer per check, plus ones left
//!   by forgotten checks until they come due). A table change costs a look at the apps whose view
//!   changed only. The task ends when the edge is dropped.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use aloft_api::checks::{
    CheckSpec, MAX_STATUS_LINE, Probe, Tls, has_service_checks, http_request, http_state, parse_status_line,
    service_specs,
};
use aloft_api::{CheckState, MachineId, MachineService};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::dial::Dialer;
use crate::routes::{AppRoutes, ChecksVerdict, MachineRoute, RoutingTable, Snapshot};
use crate::workers::OwnerId;

/// Most check runs in flight at once; further due runs wait for one to end.
pub(crate) const MAX_INFLIGHT: usize = 256;

const UNDECIDED: u8 = 0;
const PASSING: u8 = 1;
const CRITICAL: u8 = 2;

/// The edge's verdicts on one started machine's service checks.
#[derive(Debug)]
pub(crate) struct Verdicts {
    /// The version the machine ran when the edge began checking it.
    version: String,
    /// The address the edge checks.
    ip: IpAddr,
    /// The checks' names, in config order.
    names: Vec<String>,
    /// Each check's verdict (`UNDECIDED`, `PASSING`, `CRITICAL`).
    states: Vec<AtomicU8>,
}

impl Verdicts {
    fn new(version: String, ip: IpAddr, specs: &[Arc<CheckSpec>]) -> Self {
        Self {
            version,
            ip,
            names: specs.iter().map(|s| s.name.clone()).collect(),
            states: specs.iter().map(|_| AtomicU8::new(UNDECIDED)).collect(),
        }
    }

    /// Whether these are about the machine as `version` at `ip` (not an earlier run of it).
    pub(crate) fn about(&self, version: &str, ip: Option<IpAddr>) -> bool {
        self.version == version && ip == Some(self.ip)
    }

    /// Each check's name and the edge's verdict (`None`: undecided).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, Option<CheckState>)> {
        self.names.iter().zip(&self.states).map(|(n, s)| {
            let state = match s.load(Ordering::Acquire) {
                PASSING => Some(CheckState::Passing),
                CRITICAL => Some(CheckState::Critical),
                _ => None,
            };
            (n.as_str(), state)
        })
    }

    /// The edge's verdict on check `name` (`None`: undecided, or no such check).
    pub(crate) fn state_of(&self, name: &str) -> Option<CheckState> {
        self.iter().find(|(n, _)| *n == name).and_then(|(_, s)| s)
    }

    /// Records check `idx`'s verdict; the previous one.
    fn set(&self, idx: usize, state: CheckState) -> u8 {
        let v = if state == CheckState::Passing {
            PASSING
        } else {
            CRITICAL
        };
        self.states
            .get(idx)
            .map_or(UNDECIDED, |s| s.swap(v, Ordering::AcqRel))
    }
}

/// A worker thread's handles on one edge's verdicts, as of `changes` (see [`Health::verdict`]).
struct LocalVerdicts {
    owner: OwnerId,
    changes: u64,
    by_machine: HashMap<MachineId, Option<Arc<Verdicts>>>,
}

thread_local! {
    static LOCAL_VERDICTS: RefCell<Option<LocalVerdicts>> = const { RefCell::new(None) };
}

/// The verdicts, locked for a change; unlocking counts the change (after it, so a worker that
/// sees the new count finds the change in the map).
struct VerdictsMut<'a> {
    map: std::sync::RwLockWriteGuard<'a, HashMap<MachineId, Arc<Verdicts>>>,
    changes: &'a AtomicU64,
}

impl std::ops::Deref for VerdictsMut<'_> {
    type Target = HashMap<MachineId, Arc<Verdicts>>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for VerdictsMut<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Drop for VerdictsMut<'_> {
    fn drop(&mut self) {
        self.changes.fetch_add(1, Ordering::Release);
    }
}

/// What the prober shares with the routing and the metrics.
#[derive(Debug, Default)]
struct Shared {
    /// Tells this edge's verdicts in [`LOCAL_VERDICTS`] from another's.
    id: OwnerId,
    verdicts: RwLock<HashMap<MachineId, Arc<Verdicts>>>,
    /// Bumped after every change to `verdicts` (machines checked or forgotten, not results).
    changes: AtomicU64,
    runs_passing: AtomicU64,
    runs_critical: AtomicU64,
    /// Machines being checked now.
    machines: AtomicUsize,
    /// Check runs in flight now.
    inflight: AtomicUsize,
}

/// The edge's health-check state. See the module docs.
#[derive(Debug)]
pub(crate) struct Health {
    shared: Arc<Shared>,
    /// Dropped with the edge: the prober sees its receiver close and ends.
    alive: watch::Sender<()>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            shared: Arc::default(),
            alive: watch::Sender::new(()),
        }
    }
}

/// Figures for the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthFigures {
    pub(crate) runs_passing: u64,
    pub(crate) runs_critical: u64,
    pub(crate) machines: usize,
    pub(crate) inflight: usize,
}

impl Health {
    /// The edge's verdicts on machine `id`, if it checks it.
    pub(crate) fn verdicts(&self, id: &MachineId) -> Option<Arc<Verdicts>> {
        self.shared
            .verdicts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Machine `m`'s service checks' verdict for routing: the edge's results where it has them,
    /// the catalog's statuses until then ([`MachineRoute::checks_verdict`]). Costs no lock for
    /// a machine without service checks, nor on an edge worker that already looked it up since
    /// the set of checked machines last changed (the worker keeps handles on the verdicts, whose
    /// results are atomics).
    pub(crate) fn verdict(&self, m: &MachineRoute) -> ChecksVerdict {
        if !has_service_checks(&m.entry.services) {
            return m.checks_verdict(None);
        }
        if !crate::workers::is_worker() {
            return m.checks_verdict(self.verdicts(&m.entry.id).as_deref());
        }
        let changes = self.shared.changes.load(Ordering::Acquire);
        LOCAL_VERDICTS.with_borrow_mut(|local| {
            let local = match local {
                Some(l) if l.owner == self.shared.id && l.changes == changes => l,
                _ => local.insert(LocalVerdicts {
                    owner: self.shared.id,
                    changes,
                    by_machine: HashMap::new(),
                }),
            };
            let v = local
                .by_machine
                .entry(m.entry.id.clone())
                .or_insert_with(|| self.verdicts(&m.entry.id));
            m.checks_verdict(v.as_deref())
        })
    }

    pub(crate) fn figures(&self) -> HealthFigures {
        let s = &self.shared;
        HealthFigures {
            runs_passing: s.runs_passing.load(Ordering::Relaxed),
            runs_critical: s.runs_critical.load(Ordering::Relaxed),
            machines: s.machines.load(Ordering::Relaxed),
            inflight: s.inflight.load(Ordering::Relaxed),
        }
    }

    /// The prober for this edge's table, dialing through `dialer`.
    pub(crate) fn prober(&self, table: Arc<RoutingTable>, dialer: Arc<dyn Dialer>) -> Prober {
        Prober {
            table,
            dialer,
            shared: self.shared.clone(),
            alive: self.alive.subscribe(),
            tracked: HashMap::new(),
            inflight: JoinSet::new(),
            next_instance: 0,
            timers: BinaryHeap::new(),
            last: None,
        }
    }
}

/// One machine being checked.
#[derive(Debug)]
struct Tracked {
    app: String,
    version: String,
    ip: IpAddr,
    services: Vec<MachineService>,
    /// Tells this run of the machine's checks from earlier ones (results of those are dropped).
    instance: u64,
    specs: Vec<Arc<CheckSpec>>,
    verdicts: Arc<Verdicts>,
    /// When each check runs next; `None` while a run is in flight.
    due: Vec<Option<Instant>>,
    /// Each check's run in flight.
    running: Vec<Option<AbortHandle>>,
}

impl Tracked {
    fn abort(&self) {
        for h in self.running.iter().flatten() {
            h.abort();
        }
    }
}

/// A run's result.
#[derive(Debug)]
struct Outcome {
    id: MachineId,
    instance: u64,
    idx: usize,
    state: CheckState,
    output: String,
}

/// The task that runs every check. See the module docs.
#[derive(Debug)]
pub(crate) struct Prober {
    table: Arc<RoutingTable>,
    dialer: Arc<dyn Dialer>,
    shared: Arc<Shared>,
    alive: watch::Receiver<()>,
    tracked: HashMap<MachineId, Tracked>,
    inflight: JoinSet<Outcome>,
    next_instance: u64,
    /// Runs to start, earliest first: (when, instance, check, machine). An entry whose machine
    /// is no longer that instance, or whose check is not due then any more, is skipped.
    timers: BinaryHeap<Reverse<(Instant, u64, usize, MachineId)>>,
    /// The table as last synced: apps whose view is the same `Arc` did not change.
    last: Option<Arc<Snapshot>>,
}

impl Prober {
    /// Runs until the edge is dropped.
    pub(crate) async fn run(mut self) {
        let table = self.table.clone();
        loop {
            let changed = table.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.sync(table.snapshot());
            loop {
                let next = if self.inflight.len() < MAX_INFLIGHT {
                    self.timers.peek().map(|Reverse(t)| t.0)
                } else {
                    None
                };
                tokio::select! {
                    biased;
                    closed = self.alive.changed() => {
                        if closed.is_err() {
                            self.stop();
                            return;
                        }
                    }
                    Some(joined) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                        if let Ok(outcome) = joined {
                            self.record(&outcome);
                        }
                        self.count_inflight();
                    }
                    () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                        self.launch_due();
                    }
                    // Last: a table that changes all the time must not hold up the checks.
                    () = &mut changed => break,
                }
            }
        }
    }

    fn count_inflight(&self) {
        self.shared.inflight.store(self.inflight.len(), Ordering::Relaxed);
    }

    fn verdicts_mut(&self) -> VerdictsMut<'_> {
        VerdictsMut {
            map: self
                .shared
                .verdicts
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            changes: &self.shared.changes,
        }
    }

    /// Aborts every run and forgets every verdict (the edge is gone).
    fn stop(&mut self) {
        for t in self.tracked.values() {
            t.abort();
        }
        self.tracked.clear();
        self.timers.clear();
        self.last = None;
        self.inflight.abort_all();
        self.verdicts_mut().clear();
        self.shared.machines.store(0, Ordering::Relaxed);
        self.count_inflight();
    }

    /// Starts checking machines that started (or changed), forgets those that stopped or left.
    /// Only apps whose view changed since the last sync are looked at.
    fn sync(&mut self, snap: Arc<Snapshot>) {
        let now = Instant::now();
        let last = self.last.take();
        let mut seen: HashSet<&MachineId> = HashSet::new();
        let mut unchanged: HashSet<&str> = HashSet::new();
        for app in snap.apps() {
            let same = last
                .as_ref()
                .and_then(|l| l.app(&app.name))
                .is_some_and(|before: &Arc<AppRoutes>| Arc::ptr_eq(before, app));
            if same {
                unchanged.insert(&app.name);
                continue;
            }
            for m in &app.machines {
                let Some(ip) = m.ip else { continue };
                if !m.is_started() || !has_service_checks(&m.entry.services) {
                    continue;
                }
                seen.insert(&m.entry.id);
                if let Some(t) = self.tracked.get(&m.entry.id)
                    && t.version == m.entry.version
                    && t.ip == ip
                    && t.services == m.entry.services
                {
                    continue;
                }
                if let Some(old) = self.tracked.remove(&m.entry.id) {
                    old.abort();
                }
                let specs: Vec<Arc<CheckSpec>> = service_specs(&m.entry.services)
                    .into_iter()
                    .map(Arc::new)
                    .collect();
                let verdicts = Arc::new(Verdicts::new(m.entry.version.clone(), ip, &specs));
                self.verdicts_mut().insert(m.entry.id.clone(), verdicts.clone());
                self.next_instance += 1;
                for (idx, spec) in specs.iter().enumerate() {
                    self.timers.push(Reverse((
                        now + spec.grace,
                        self.next_instance,
                        idx,
                        m.entry.id.clone(),
                    )));
                }
                self.tracked.insert(
                    m.entry.id.clone(),
                    Tracked {
                        app: app.name.clone(),
                        version: m.entry.version.clone(),
                        ip,
                        services: m.entry.services.clone(),
                        instance: self.next_instance,
                        due: specs.iter().map(|s| Some(now + s.grace)).collect(),
                        running: specs.iter().map(|_| None).collect(),
                        specs,
                        verdicts,
                    },
                );
            }
        }
        let gone: Vec<MachineId> = self
            .tracked
            .iter()
            .filter(|(id, t)| !seen.contains(id) && !unchanged.contains(t.app.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        if !gone.is_empty() {
            let mut verdicts = self.verdicts_mut();
            for id in &gone {
                verdicts.remove(id);
            }
        }
        for id in &gone {
            if let Some(t) = self.tracked.remove(id) {
                t.abort();
            }
        }
        self.shared.machines.store(self.tracked.len(), Ordering::Relaxed);
        drop((seen, unchanged));
        self.last = Some(snap);
    }

    /// Starts the runs that are due (as many as [`MAX_INFLIGHT`] allows).
    fn launch_due(&mut self) {
        let now = Instant::now();
        while self.inflight.len() < MAX_INFLIGHT {
            let Some(Reverse((at, instance, idx, id))) = self.timers.peek().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(t) = self.tracked.get_mut(&id) else {
                continue;
            };
            if t.instance != instance || t.due.get(idx).copied().flatten() != Some(at) {
                continue;
            }
            t.due[idx] = None;
            let spec = t.specs[idx].clone();
            let addr = SocketAddr::new(t.ip, spec.port);
            let dialer = self.dialer.clone();
            t.running[idx] = Some(self.inflight.spawn(async move {
                let (state, output) = run(&*dialer, &spec, addr).await;
                Outcome {
                    id,
                    instance,
                    idx,
                    state,
                    output,
                }
            }));
        }
        self.count_inflight();
    }

    /// Records a run's verdict and schedules the check's next run.
    fn record(&mut self, o: &Outcome) {
        let Some(t) = self.tracked.get_mut(&o.id) else {
            return;
        };
        if t.instance != o.instance {
            return;
        }
        let Some(spec) = t.specs.get(o.idx) else {
            return;
        };
        let at = Instant::now() + spec.interval;
        t.due[o.idx] = Some(at);
        t.running[o.idx] = None;
        self.timers.push(Reverse((at, o.instance, o.idx, o.id.clone())));
        let counter = if o.state == CheckState::Passing {
            &self.shared.runs_passing
        } else {
            &self.shared.runs_critical
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let before = t.verdicts.set(o.idx, o.state);
        let after = if o.state == CheckState::Passing {
            PASSING
        } else {
            CRITICAL
        };
        if before != after && (before != UNDECIDED || after == CRITICAL) {
            eprintln!(
                "edge: check {} of {}/{}: {} ({})",
                spec.name,
                t.app,
                o.id,
                if after == PASSING { "passing" } else { "critical" },
                o.output
            );
        }
    }
}

/// Runs `spec` against `addr` through `dialer`: its verdict and output.
pub(crate) async fn run(dialer: &dyn Dialer, spec: &CheckSpec, addr: SocketAddr) -> (CheckState, String) {
    match &spec.probe {
        Probe::Invalid(why) => (CheckState::Critical, why.clone()),
        Probe::Tcp => match tokio::time::timeout(spec.timeout, dialer.dial(addr)).await {
            Ok(Ok(_)) => (CheckState::Passing, format!("connected to {addr}")),
            Ok(Err(e)) => (CheckState::Critical, format!("connect to {addr}: {e}")),
            Err(_) => (
                CheckState::Critical,
                format!("connect to {addr}: timed out after {:?}", spec.timeout),
            ),
        },
        Probe::Http {
            method,
            path,
            headers,
            tls,
        } => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let what = format!("{method} {scheme}://{addr}{path}");
            let req = http_request(method, path, headers, &addr.to_string());
            match tokio::time::timeout(spec.timeout, http(dialer, addr, &req, tls.as_ref())).await {
                Ok(Ok((code, line))) => (http_state(code), format!("{what}: {line}")),
                Ok(Err(e)) => (CheckState::Critical, format!("{what}: {e}")),
                Err(_) => (
                    CheckState::Critical,
                    format!("{what}: timed out after {:?}", spec.timeout),
                ),
            }
        }
    }
}

/// Sends `req` (over TLS when `tls` is given), reads the status line: (status code, the line
/// after the version).
async fn http(
    dialer: &dyn Dialer,
    addr: SocketAddr,
    req: &str,
    tls: Option<&Tls>,
) -> Result<(u16, String), String> {
    let tcp = dialer.dial(addr).await.map_err(|e| format!("connect: {e}"))?;
    let Some(tls) = tls else {
        return exchange(tcp, req).await;
    };
    let config = aloft_tls::check::config(tls.skip_verify).map_err(|e| format!("TLS setup: {e}"))?;
    let name = aloft_tls::check::server_name(tls.server_name.as_deref(), addr.ip())?;
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| aloft_tls::check::handshake_failure(addr, &name, &e))?;
    exchange(s, req).await
}

/// Sends `req` on `s`, reads the status line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &str) -> Result<(u16, String), String> {
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    s.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&String::from_utf8_lossy(&buf[..end]));
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err("no status line in the first 8 KiB of the response".into());
        }
        match s.read(&mut chunk).await {
            Ok(0) => return Err("the connection closed before a response".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::time::Duration;

    use super::*;
    use crate::DirectDialer;

    fn spec(probe: Probe, port: u16) -> CheckSpec {
        CheckSpec {
            name: "servicecheck-00-http-0".into(),
            probe,
            port,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            grace: Duration::ZERO,
        }
    }

    fn get() -> Probe {
        Probe::Http {
            method: "GET".into(),
            path: "/up".into(),
            headers: vec![("X-Probe".into(), "edge".into())],
            tls: None,
        }
    }

    /// Reads a request head from `c`, answers `response`; the head.
    async fn answer<S>(c: &mut S, response: &str) -> String
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        c.write_all(response.as_bytes()).await.unwrap();
        String::from_utf8(head).unwrap()
    }

    /// Answers one connection with `response` after reading the request head; hands the head
    /// back.
    async fn serve_once(response: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            answer(&mut c, response).await
        });
        (port, task)
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_edges_verdict_governs_and_the_catalogs_stands_in() {
        use aloft_api::{CatalogEntry, CheckStatus};
        let status = |name: &str, status| CheckStatus {
            name: name.into(),
            status,
            output: String::new(),
            updated_at: String::new(),
        };
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        let route = |checks: Vec<CheckStatus>| MachineRoute {
            entry: CatalogEntry {
                id: MachineId::from_random([1, 2, 3, 4, 5, 6, 7]),
                app: "a".into(),
                host: "h".into(),
                region: "r".into(),
                state: aloft_api::MachineState::Started,
                version: "v1".into(),
                private_ip: ip.to_string(),
                services: Vec::new(),
                checks,
                suspendable: false,
                process_group: String::new(),
                primary_region: String::new(),
                updated_at: 0,
            },
            ip: Some(ip),
            cordoned: false,
        };
        let specs: Vec<Arc<CheckSpec>> = ["servicecheck-00-tcp-80", "servicecheck-01-http-80"]
            .into_iter()
            .map(|n| {
                let mut s = spec(Probe::Tcp, 80);
                s.name = n.into();
                Arc::new(s)
            })
            .collect();
        let edge = Verdicts::new("v1".into(), ip, &specs);
        let m = route(vec![
            status("servicecheck-00-tcp-80", CheckState::Passing),
            status("servicecheck-01-http-80", CheckState::Warning),
            status("top-level", CheckState::Critical),
        ]);
        // Nothing from the edge yet: the catalog's (top-level checks don't count).
        assert_eq!(m.checks_verdict(Some(&edge)), ChecksVerdict::Undecided);
        edge.set(1, CheckState::Passing);
        assert_eq!(m.checks_verdict(Some(&edge)), ChecksVerdict::Passing);
        edge.set(0, CheckState::Critical);
        assert_eq!(m.checks_verdict(Some(&edge)), ChecksVerdict::Critical);
        assert_eq!(m.checks_verdict(None), ChecksVerdict::Undecided);
        assert_eq!(m.service_checks_passing(), None);
        // Verdicts about another version or address are not applied.
        let mut v2 = route(m.entry.checks.clone());
        v2.entry.version = "v2".into();
        assert_eq!(v2.checks_verdict(Some(&edge)), ChecksVerdict::Undecided);
        let mut moved = route(m.entry.checks.clone());
        moved.ip = "10.0.0.3".parse().ok();
        assert_eq!(moved.checks_verdict(Some(&edge)), ChecksVerdict::Undecided);
        // The catalog carries none (yet): the edge's alone; undecided until it has them all.
        let bare = route(Vec::new());
        assert_eq!(bare.checks_verdict(None), ChecksVerdict::NoChecks);
        assert_eq!(bare.checks_verdict(Some(&edge)), ChecksVerdict::Critical);
        edge.set(0, CheckState::Passing);
        assert_eq!(bare.checks_verdict(Some(&edge)), ChecksVerdict::Passing);
        let fresh = Verdicts::new("v1".into(), ip, &specs);
        assert_eq!(bare.checks_verdict(Some(&fresh)), ChecksVerdict::Undecided);
    }

    #[test]
    fn workers_follow_machines_checked_and_forgotten_and_their_results() {
        use crate::workers::TestWorkers;

        let workers = TestWorkers::start(1, "test-health");
        let entry = crate::routes::test_entry(
            "a",
            9,
            vec![MachineService {
                checks: vec![aloft_api::MachineServiceCheck::default()],
                ..MachineService::default()
            }],
        );
        let ip: IpAddr = entry.private_ip.parse().unwrap();
        let m = Arc::new(MachineRoute {
            entry,
            ip: Some(ip),
            cordoned: false,
        });
        let health = Arc::new(Health::default());
        let prober = health.prober(Arc::new(RoutingTable::default()), Arc::new(DirectDialer));
        let on_worker = || {
            let (health, m) = (health.clone(), m.clone());
            workers.run(0, async move { health.verdict(&m) })
        };
        // Not checked by the edge (yet): the catalog has no status either.
        assert_eq!(on_worker(), ChecksVerdict::NoChecks);
        let specs = vec![Arc::new(spec(Probe::Tcp, 80))];
        let verdicts = Arc::new(Verdicts::new("v1".into(), ip, &specs));
        prober.verdicts_mut().insert(m.entry.id.clone(), verdicts.clone());
        assert_eq!(on_worker(), ChecksVerdict::Undecided, "a newly checked machine");
        verdicts.set(0, CheckState::Critical);
        assert_eq!(on_worker(), ChecksVerdict::Critical, "a result");
        verdicts.set(0, CheckState::Passing);
        assert_eq!(on_worker(), ChecksVerdict::Passing);
        prober.verdicts_mut().remove(&m.entry.id);
        assert_eq!(on_worker(), ChecksVerdict::NoChecks, "a forgotten machine");
        assert_eq!(health.verdict(&m), ChecksVerdict::NoChecks);
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_only() {
        let (port, head) = serve_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        let (state, out) = run(&DirectDialer, &spec(get(), port), local(port)).await;
        assert_eq!(state, CheckState::Passing, "{out}");
        let head = head.await.unwrap();
        assert!(head.starts_with("GET /up HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("X-Probe: edge\r\n"), "{head}");
        assert!(head.contains("Connection: close\r\n"), "{head}");
        for (response, expect) in [
            ("HTTP/1.1 500 Oops\r\n\r\n", "500 Oops"),
            ("HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n", "302 Found"),
            ("SSH-2.0-x\r\n", "not an HTTP response"),
        ] {
            let (port, _head) = serve_once(response).await;
            let (state, out) = run(&DirectDialer, &spec(get(), port), local(port)).await;
            assert_eq!(state, CheckState::Critical, "{out}");
            assert!(out.contains(expect), "{out}");
        }
        // Accepts, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let (state, out) = run(&DirectDialer, &spec(get(), port), local(port)).await;
        assert_eq!(state, CheckState::Critical);
        assert!(out.contains("timed out after 300ms"), "{out}");
    }

    /// An https server with a self-signed certificate for `app.example.com` only, answering one
    /// connection with `response`; hands back the SNI it saw and the request head (empty when
    /// the handshake failed).
    async fn serve_tls_once(
        response: &'static str,
    ) -> (u16, tokio::task::JoinHandle<(Option<String>, String)>) {
        let config = aloft_testkit::tls::self_signed_server(&["app.example.com"]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            let Ok(mut c) = acceptor.accept(c).await else {
                return (None, String::new());
            };
            let sni = c.get_ref().1.server_name().map(str::to_owned);
            let head = answer(&mut c, response).await;
            c.shutdown().await.unwrap();
            (sni, head)
        });
        (port, task)
    }

    fn https(skip_verify: bool, server_name: Option<&str>) -> Probe {
        Probe::Http {
            method: "GET".into(),
            path: "/up".into(),
            headers: Vec::new(),
            tls: Some(Tls {
                skip_verify,
                server_name: server_name.map(Into::into),
            }),
        }
    }

    #[tokio::test]
    async fn https_checks_pass_when_verification_is_skipped_and_send_the_server_name() {
        let (port, seen) = serve_tls_once("HTTP/1.1 204 No Content\r\n\r\n").await;
        let (state, out) = run(&DirectDialer, &spec(https(true, None), port), local(port)).await;
        assert_eq!(state, CheckState::Passing, "{out}");
        assert_eq!(out, format!("GET https://127.0.0.1:{port}/up: 204 No Content"));
        let (sni, head) = seen.await.unwrap();
        assert_eq!(sni, None, "an address is not sent as SNI");
        assert!(head.starts_with("GET /up HTTP/1.1\r\n"), "{head}");

        let (port, seen) = serve_tls_once("HTTP/1.1 200 OK\r\n\r\n").await;
        let probe = https(true, Some("app.example.com"));
        let (state, out) = run(&DirectDialer, &spec(probe, port), local(port)).await;
        assert_eq!(state, CheckState::Passing, "{out}");
        assert_eq!(seen.await.unwrap().0.as_deref(), Some("app.example.com"));
    }

    #[tokio::test]
    async fn https_checks_are_critical_on_an_untrusted_certificate_a_500_or_a_plain_http_server() {
        for name in [None, Some("app.example.com")] {
            let (port, _seen) = serve_tls_once("HTTP/1.1 200 OK\r\n\r\n").await;
            let (state, out) = run(&DirectDialer, &spec(https(false, name), port), local(port)).await;
            assert_eq!(state, CheckState::Critical, "{out}");
            assert!(
                out.contains(&format!("TLS handshake with 127.0.0.1:{port} failed: ")),
                "{out}"
            );
            assert!(out.contains("tls_skip_verify"), "{out}");
        }
        let (port, _seen) = serve_tls_once("HTTP/1.1 500 Oops\r\n\r\n").await;
        let (state, out) = run(&DirectDialer, &spec(https(true, None), port), local(port)).await;
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(out.ends_with(": 500 Oops"), "{out}");
        // A plain http server answers the ClientHello with a 400: not TLS, said so at once.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = plain.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = plain.accept().await.unwrap();
            let mut b = [0u8; 512];
            let _ = c.read(&mut b).await.unwrap();
            c.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
        });
        let (state, out) = run(&DirectDialer, &spec(https(true, None), port), local(port)).await;
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(out.contains("protocol = \"http\""), "{out}");
        // One that waits for more: the timeout ends it.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let t0 = std::time::Instant::now();
        let (state, out) = run(&DirectDialer, &spec(https(true, None), port), local(port)).await;
        assert_eq!(state, CheckState::Critical);
        assert!(out.contains("timed out after 300ms"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(silent);
    }

    #[tokio::test]
    async fn tcp_checks_pass_on_connect_and_invalid_ones_fail() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (state, out) = run(&DirectDialer, &spec(Probe::Tcp, port), local(port)).await;
        assert_eq!(state, CheckState::Passing, "{out}");
        drop(l);
        let (state, out) = run(&DirectDialer, &spec(Probe::Tcp, port), local(port)).await;
        assert_eq!(state, CheckState::Critical, "{out}");
        let (state, out) = run(&DirectDialer, &spec(Probe::Invalid("no".into()), 0), local(port)).await;
        assert_eq!((state, out.as_str()), (CheckState::Critical, "no"));
    }
}
