//! The edge's figures in Prometheus's text format, named after Fly's (`fly_edge_*`, `fly_app_*`)
//! where Fly has one, `aloft_edge_*` otherwise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::StatusCode;

use crate::FastMap;
use crate::health::Health;
use crate::routes::{ChecksVerdict, Snapshot};
use crate::workers::OwnerId;

/// Upper bounds of the response-time histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        #[allow(
            clippy::cast_precision_loss,
            reason = "a sum of microseconds shown as seconds"
        )]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

#[derive(Debug)]
struct AppFigures {
    /// Responses by status code (index: code − 100).
    statuses: [AtomicU64; 500],
    time: Histogram,
}

impl Default for AppFigures {
    fn default() -> Self {
        Self {
            statuses: std::array::from_fn(|_| AtomicU64::new(0)),
            time: Histogram::default(),
        }
    }
}

/// Why a UDP datagram was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UdpDrop {
    /// It would have opened a flow over the edge's or its client's flow limit.
    FlowLimit,
    /// Its flow already held as many datagrams as it may while its machine was picked or woken.
    QueueFull,
    /// Longer than `udp_max_datagram`.
    Oversize,
    /// No machine could take its flow (none healthy, all at their hard limit, a failed wake).
    NoMachine,
    /// Sending it on failed (to the machine, or back to the client).
    SendFailed,
}

impl UdpDrop {
    const ALL: [Self; 5] = [
        Self::FlowLimit,
        Self::QueueFull,
        Self::Oversize,
        Self::NoMachine,
        Self::SendFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::FlowLimit => "flow_limit",
            Self::QueueFull => "queue_full",
            Self::Oversize => "oversize",
            Self::NoMachine => "no_machine",
            Self::SendFailed => "send_failed",
        }
    }
}

/// One app's UDP figures; a port's listener and its flows hold it, so counting takes no lock.
#[derive(Debug, Default)]
pub(crate) struct UdpFigures {
    /// Datagrams from clients relayed to machines.
    inbound: AtomicU64,
    /// Datagrams from machines relayed back to clients.
    outbound: AtomicU64,
    dropped: [AtomicU64; UdpDrop::ALL.len()],
    /// Open flows (a gauge).
    flows: AtomicU64,
}

impl UdpFigures {
    pub(crate) fn inbound(&self) {
        self.inbound.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn outbound(&self) {
        self.outbound.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, why: UdpDrop, n: usize) {
        let i = UdpDrop::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.dropped[i].fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts an open flow until the returned guard is dropped.
    pub(crate) fn flow_opened(self: &Arc<Self>) -> FlowCount {
        self.flows.fetch_add(1, Ordering::Relaxed);
        FlowCount(self.clone())
    }
}

/// One open UDP flow in [`UdpFigures`]'s gauge.
#[derive(Debug)]
pub(crate) struct FlowCount(Arc<UdpFigures>);

impl Drop for FlowCount {
    fn drop(&mut self) {
        self.0.flows.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Worker threads counted apart in `aloft_edge_accepted_connections_count`; later ones are
/// counted with the last.
const WORKER_FIGURES: usize = 1024;

/// Client connections accepted, by the worker that accepted them (`workers.rs`).
#[derive(Debug)]
struct Accepted(Box<[AtomicU64]>);

impl Default for Accepted {
    fn default() -> Self {
        Self((0..WORKER_FIGURES).map(|_| AtomicU64::new(0)).collect())
    }
}

/// Counters; cheap to update from any task.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Tells this one's handles in [`LOCAL_APPS`] from another's.
    id: OwnerId,
    accepted: Accepted,
    apps: RwLock<FastMap<String, Arc<AppFigures>>>,
    udp: RwLock<HashMap<String, Arc<UdpFigures>>>,
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    tls_time: Histogram,
    wakes_ok: AtomicU64,
    wakes_failed: AtomicU64,
    wake_time: Histogram,
    autostops_ok: AtomicU64,
    autostops_failed: AtomicU64,
    refused: AtomicU64,
}

/// The app label for requests that matched no app.
const NO_APP: &str = "";

thread_local! {
    /// A worker thread's handles on one [`Metrics`]' app figures (apps are never dropped from
    /// them): a response is counted without the read lock every request on every worker would
    /// take, and without touching the figures' reference count.
    static LOCAL_APPS: RefCell<Option<(OwnerId, AppHandles)>> = const { RefCell::new(None) };
}

/// Handles on app figures, by app.
type AppHandles = FastMap<String, Arc<AppFigures>>;

impl Metrics {
    fn app(&self, app: &str) -> Arc<AppFigures> {
        if let Some(a) = self.apps.read().unwrap_or_else(PoisonError::into_inner).get(app) {
            return a.clone();
        }
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(app.to_owned())
            .or_default()
            .clone()
    }

    /// `app`'s UDP figures.
    pub(crate) fn udp(&self, app: &str) -> Arc<UdpFigures> {
        if let Some(a) = self.udp.read().unwrap_or_else(PoisonError::into_inner).get(app) {
            return a.clone();
        }
        self.udp
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(app.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn response(&self, app: Option<&str>, status: StatusCode, took: Duration) {
        let count = |a: &AppFigures| {
            let i = usize::from(status.as_u16()).saturating_sub(100).min(499);
            a.statuses[i].fetch_add(1, Ordering::Relaxed);
            a.time.observe(took);
        };
        let app = app.unwrap_or(NO_APP);
        if !crate::workers::is_worker() {
            return count(&self.app(app));
        }
        LOCAL_APPS.with_borrow_mut(|local| {
            let apps = match local {
                Some((owner, apps)) if *owner == self.id => apps,
                _ => &mut local.insert((self.id, FastMap::default())).1,
            };
            if let Some(a) = apps.get(app) {
                return count(a);
            }
            let a = self.app(app);
            count(&a);
            apps.insert(app.to_owned(), a);
        });
    }

    pub(crate) fn tls_handshake(&self, ok: bool, took: Duration) {
        if ok {
            self.tls_ok.fetch_add(1, Ordering::Relaxed);
            self.tls_time.observe(took);
        } else {
            self.tls_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn wake(&self, ok: bool, took: Duration) {
        if ok {
            self.wakes_ok.fetch_add(1, Ordering::Relaxed);
            self.wake_time.observe(took);
        } else {
            self.wakes_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn autostop(&self, ok: bool) {
        let c = if ok {
            &self.autostops_ok
        } else {
            &self.autostops_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection accepted (and admitted) on this thread's worker.
    pub(crate) fn accepted_connection(&self) {
        let i = crate::workers::current().min(WORKER_FIGURES - 1);
        self.accepted.0[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused_connection(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub(crate) fn render(&self, edge: &crate::Edge) -> String {
        let (snap, loads, health) = (&edge.routes.snapshot(), &edge.loads, &edge.health);
        let mut out = String::new();
        out.push_str("# HELP fly_edge_http_responses_count Responses by app and status.\n");
        out.push_str("# TYPE fly_edge_http_responses_count counter\n");
        let apps: Vec<(String, Arc<AppFigures>)> = {
            let map = self.apps.read().unwrap_or_else(PoisonError::into_inner);
            let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        for (app, f) in &apps {
            for (i, c) in f.statuses.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "fly_edge_http_responses_count{{app=\"{}\",status=\"{}\"}} {n}",
                        label(app),
                        i + 100
                    );
                }
            }
        }
        out.push_str("# HELP fly_edge_http_response_time_seconds Time to the response head, by app.\n");
        out.push_str("# TYPE fly_edge_http_response_time_seconds histogram\n");
        for (app, f) in &apps {
            f.time.render(
                &mut out,
                "fly_edge_http_response_time_seconds",
                &format!("app=\"{}\"", label(app)),
            );
        }
        out.push_str("# HELP fly_app_concurrency Requests or connections in flight per machine.\n");
        out.push_str("# TYPE fly_app_concurrency gauge\n");
        let mut apps_now: Vec<_> = snap.apps().collect();
        apps_now.sort_by(|a, b| a.name.cmp(&b.name));
        for app in apps_now {
            for m in &app.machines {
                let n = loads.peek(&m.entry.id).map_or(0, |l| l.inflight());
                let _ = writeln!(
                    out,
                    "fly_app_concurrency{{app=\"{}\",instance=\"{}\",region=\"{}\"}} {n}",
                    label(&app.name),
                    m.entry.id,
                    label(&m.entry.region)
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, pairs: &[(&str, &AtomicU64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, c) in pairs {
                let _ = writeln!(out, "{name}{{{labels}}} {}", c.load(Ordering::Relaxed));
            }
        };
        counter(
            &mut out,
            "fly_edge_tls_handshake_count",
            "TLS handshakes by outcome.",
            &[
                ("result=\"ok\"", &self.tls_ok),
                ("result=\"failed\"", &self.tls_failed),
            ],
        );
        out.push_str(
            "# HELP fly_edge_tls_handshake_time_seconds Time a TLS handshake took.\n\
             # TYPE fly_edge_tls_handshake_time_seconds histogram\n",
        );
        self.tls_time
            .render(&mut out, "fly_edge_tls_handshake_time_seconds", "");
        counter(
            &mut out,
            "aloft_edge_autostart_count",
            "Machines woken for a request, by outcome.",
            &[
                ("result=\"ok\"", &self.wakes_ok),
                ("result=\"failed\"", &self.wakes_failed),
            ],
        );
        out.push_str(
            "# HELP aloft_edge_autostart_time_seconds Time from a wake's start call until the \
             machine accepted.\n\
             # TYPE aloft_edge_autostart_time_seconds histogram\n",
        );
        self.wake_time
            .render(&mut out, "aloft_edge_autostart_time_seconds", "");
        counter(
            &mut out,
            "aloft_edge_autostop_count",
            "Idle machines stopped or suspended, by outcome.",
            &[
                ("result=\"ok\"", &self.autostops_ok),
                ("result=\"failed\"", &self.autostops_failed),
            ],
        );
        counter(
            &mut out,
            "aloft_edge_refused_connections_count",
            "Client connections closed at once: the client had too many open.",
            &[("", &self.refused)],
        );
        out.push_str(
            "# HELP aloft_edge_accepted_connections_count Client connections accepted, by the edge \
             worker thread that serves them.\n# TYPE aloft_edge_accepted_connections_count counter\n",
        );
        for (worker, c) in self.accepted.0.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "aloft_edge_accepted_connections_count{{worker=\"{worker}\"}} {n}"
                );
            }
        }
        render_health(&mut out, snap, health);
        self.render_udp(&mut out);
        edge.replay_cache.render(&mut out);
        out
    }

    fn render_udp(&self, out: &mut String) {
        let udp: Vec<(String, Arc<UdpFigures>)> = {
            let map = self.udp.read().unwrap_or_else(PoisonError::into_inner);
            let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        out.push_str(
            "# HELP aloft_edge_udp_datagrams_count UDP datagrams relayed, by app and direction \
             (in: client to machine, out: machine to client).\n\
             # TYPE aloft_edge_udp_datagrams_count counter\n",
        );
        for (app, f) in &udp {
            for (dir, c) in [("in", &f.inbound), ("out", &f.outbound)] {
                let _ = writeln!(
                    out,
                    "aloft_edge_udp_datagrams_count{{app=\"{}\",direction=\"{dir}\"}} {}",
                    label(app),
                    c.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str(
            "# HELP aloft_edge_udp_dropped_count UDP datagrams dropped, by app and reason.\n\
             # TYPE aloft_edge_udp_dropped_count counter\n",
        );
        for (app, f) in &udp {
            for (why, c) in UdpDrop::ALL.iter().zip(&f.dropped) {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "aloft_edge_udp_dropped_count{{app=\"{}\",reason=\"{}\"}} {n}",
                        label(app),
                        why.label()
                    );
                }
            }
        }
        out.push_str(
            "# HELP aloft_edge_udp_flows UDP flows open (client address to machine), by app.\n\
             # TYPE aloft_edge_udp_flows gauge\n",
        );
        for (app, f) in &udp {
            let _ = writeln!(
                out,
                "aloft_edge_udp_flows{{app=\"{}\"}} {}",
                label(app),
                f.flows.load(Ordering::Relaxed)
            );
        }
    }
}

/// The edge's own service checks: runs by result, machines checked, runs in flight, and started
/// machines held out of the pool by a critical check (the edge's verdict, or the catalog's
/// until the edge has one).
fn render_health(out: &mut String, snap: &Snapshot, health: &Health) {
    let f = health.figures();
    let _ = writeln!(
        out,
        "# HELP aloft_edge_health_checks_count Service checks the edge ran, by result.\n\
         # TYPE aloft_edge_health_checks_count counter\n\
         aloft_edge_health_checks_count{{result=\"passing\"}} {}\n\
         aloft_edge_health_checks_count{{result=\"critical\"}} {}",
        f.runs_passing, f.runs_critical
    );
    let _ = writeln!(
        out,
        "# HELP aloft_edge_health_checked_machines Machines whose service checks the edge runs.\n\
         # TYPE aloft_edge_health_checked_machines gauge\n\
         aloft_edge_health_checked_machines {}\n\
         # HELP aloft_edge_health_checks_inflight Service check runs in flight.\n\
         # TYPE aloft_edge_health_checks_inflight gauge\n\
         aloft_edge_health_checks_inflight {}",
        f.machines, f.inflight
    );
    let mut unhealthy = 0u64;
    for app in snap.apps() {
        for m in app.machines.iter().filter(|m| m.is_started()) {
            if health.verdict(m) == ChecksVerdict::Critical {
                unhealthy += 1;
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP aloft_edge_unhealthy_machines Started machines that get nothing: a service check \
         is critical.\n\
         # TYPE aloft_edge_unhealthy_machines gauge\n\
         aloft_edge_unhealthy_machines {unhealthy}"
    );
}

/// A label value with `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::workers::TestWorkers;

    #[test]
    fn responses_counted_on_workers_land_in_their_own_metrics() {
        let workers = TestWorkers::start(2, "test-metrics");
        let (one, two) = (Arc::new(Metrics::default()), Arc::new(Metrics::default()));
        let count = |m: &Arc<Metrics>, worker: usize, app: &'static str, n: usize| {
            let m = m.clone();
            workers.run(worker, async move {
                for _ in 0..n {
                    m.response(Some(app), StatusCode::OK, Duration::from_millis(1));
                }
            });
        };
        count(&one, 0, "a", 3);
        count(&one, 1, "a", 2);
        count(&two, 0, "a", 5);
        count(&one, 0, "b", 1);
        one.response(Some("a"), StatusCode::OK, Duration::from_millis(1));
        let ok = |m: &Metrics, app: &str| m.app(app).statuses[100].load(Ordering::Relaxed);
        assert_eq!(ok(&one, "a"), 6);
        assert_eq!(ok(&two, "a"), 5);
        assert_eq!(ok(&one, "b"), 1);
        assert_eq!(ok(&two, "b"), 0);
    }
}
