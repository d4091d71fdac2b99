//! Scale to zero and back (platform reference §5.2): waking a stopped or suspended machine for a
//! request, and the autostop loop that stops or suspends excess idle ones.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use aloft_api::{Autostop, MachineId};
use tokio::sync::watch;

use crate::Edge;
use crate::error::ProxyCode;
use crate::routes::MachineRoute;

/// A machine lifecycle call in progress.
pub type ControlFuture = Pin<Box<dyn Future<Output = Result<(), ControlError>> + Send>>;

/// Why a lifecycle call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The machine's host refused (e.g. the machine is being replaced or destroyed).
    #[error("the machine's host refused: {0}")]
    Refused(String),
    /// The host could not be reached or failed.
    #[error("the machine's host failed: {0}")]
    Failed(String),
}

/// Starting and idling machines on behalf of the edge. The daemon implements it by asking the
/// machine's agent; the edge never creates or destroys machines.
pub trait MachineControl: Send + Sync + fmt::Debug + 'static {
    /// Starts (or resumes) a stopped or suspended machine. Resolves once the host accepted.
    fn start(&self, app: &str, id: &MachineId) -> ControlFuture;
    /// Stops a started machine (with its `stop_config`).
    fn stop(&self, app: &str, id: &MachineId) -> ControlFuture;
    /// Suspends a started machine.
    fn suspend(&self, app: &str, id: &MachineId) -> ControlFuture;
}

/// How long at most a machine the edge woke counts as started while the catalog still shows it
/// asleep.
const WOKEN_HOLD_MS: u64 = 10_000;

type WakeResult = Option<Result<(), (ProxyCode, String)>>;

/// Wakes in progress, one per machine: concurrent requests for the same sleeping machine share it.
#[derive(Debug, Default)]
pub(crate) struct Wakes {
    inflight: Mutex<HashMap<MachineId, watch::Receiver<WakeResult>>>,
}

impl Wakes {
    fn lock(&self) -> MutexGuard<'_, HashMap<MachineId, watch::Receiver<WakeResult>>> {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes `m` (or joins a wake in progress) and resolves once it accepts connections on
/// `internal_port`, or with the proxy error to answer.
pub(crate) async fn wake(
    edge: &Arc<Edge>,
    m: &MachineRoute,
    internal_port: u16,
) -> Result<(), (ProxyCode, String)> {
    wake_with(edge, m, Some(internal_port)).await
}

/// Wakes `m` for a UDP flow (or joins a wake in progress): resolves once its host took the
/// start. Nothing tells whether a UDP port is bound without sending the app a datagram, so no
/// port is polled and the machine is not marked woken: the caller waits for the catalog to say
/// `started`, and resends what the machine refused while its app was still coming up.
pub(crate) async fn wake_udp(edge: &Arc<Edge>, m: &MachineRoute) -> Result<(), (ProxyCode, String)> {
    wake_with(edge, m, None).await
}

/// With `probe`, the wake ends once a TCP connect to that internal port succeeds (and the machine
/// counts as started from then on); without, once the host accepted the start.
async fn wake_with(
    edge: &Arc<Edge>,
    m: &MachineRoute,
    probe: Option<u16>,
) -> Result<(), (ProxyCode, String)> {
    let id = m.entry.id.clone();
    let mut rx = {
        let mut map = edge.wakes.lock();
        match map.get(&id) {
            Some(rx) => rx.clone(),
            // A wake that just finished (between this request's choice and now) marked the
            // machine woken before leaving the map: don't start it a second time.
            None if edge.loads.recently_woken(&edge.loads.machine(&id), &m.entry) => {
                return Ok(());
            }
            None => {
                let (tx, rx) = watch::channel(None);
                map.insert(id.clone(), rx.clone());
                let edge2 = edge.clone();
                let app = m.entry.app.clone();
                let ip = m.ip;
                let from_entry = m.entry.updated_at;
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = match ip {
                        Some(ip) => {
                            let probe = probe.map(|port| SocketAddr::new(ip, port));
                            do_wake(&edge2, &app, &id, probe).await
                        }
                        None => Err((ProxyCode::PM07, "the machine has no private address".to_owned())),
                    };
                    edge2.metrics.wake(result.is_ok(), started.elapsed());
                    if result.is_ok() && probe.is_some() {
                        let load = edge2.loads.machine(&id);
                        // Until the catalog publishes anything newer about it (`started`,
                        // within ~250 ms): then the catalog rules again, so a machine
                        // suspended later is woken again rather than dialled while it sleeps.
                        edge2.loads.mark_woken(&load, WOKEN_HOLD_MS, from_entry);
                    }
                    edge2.wakes.lock().remove(&id);
                    let _ = tx.send(Some(result));
                });
                rx
            }
        }
    };
    let waited = tokio::time::timeout(edge.config.wake_timeout + Duration::from_secs(1), async {
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return Err((ProxyCode::PM07, "the wake was abandoned".to_owned()));
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| Err((ProxyCode::PM03, "the machine did not start in time".to_owned())))
}

async fn do_wake(
    edge: &Edge,
    app: &str,
    id: &MachineId,
    probe: Option<SocketAddr>,
) -> Result<(), (ProxyCode, String)> {
    let deadline = Instant::now() + edge.config.wake_timeout;
    // The host refuses a start while the machine is still stopping or suspending (or already
    // starting): ask again until it takes it, polling the port meanwhile. A suspend or stop ends
    // tens of milliseconds after it began, so the first retries come soon (5 ms, doubling up to
    // 100 ms): a request that arrives while its machine is being put to sleep waits for that,
    // not for a fixed retry period on top of it. A refusal is one in-process call to the host.
    let mut start_again = Some(Instant::now());
    let mut refusal_pause = Duration::from_millis(5);
    let mut last_refusal = String::new();
    // Poll until the workload accepts: the catalog may lag; the connection is the truth.
    let mut probes = Probes::default();
    let began = Instant::now();
    let mut started_after = Duration::ZERO;
    loop {
        if start_again.is_some_and(|at| Instant::now() >= at) {
            match edge.control.start(app, id).await {
                Ok(()) => {
                    start_again = None;
                    started_after = began.elapsed();
                }
                Err(ControlError::Failed(e)) => return Err((ProxyCode::PM07, e)),
                Err(ControlError::Refused(e)) => {
                    last_refusal = e;
                    start_again = Some(Instant::now() + refusal_pause);
                    refusal_pause = (refusal_pause * 2).min(Duration::from_millis(100));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let why = match (start_again, probe) {
                (Some(_), _) => format!("its host kept refusing to start it: {last_refusal}"),
                (None, Some(addr)) => {
                    format!("it started but nothing accepted connections on {addr} in time")
                }
                (None, None) => "it did not start in time".to_owned(),
            };
            return Err((ProxyCode::PM03, why));
        }
        let Some(addr) = probe else {
            let Some(at) = start_again else {
                return Ok(());
            };
            tokio::time::sleep(at.saturating_duration_since(Instant::now()).min(left)).await;
            continue;
        };
        if let Some(stream) = probes.next(edge, addr, left).await {
            // The request that woke the machine goes over this very connection.
            edge.client.offer(addr, stream);
            eprintln!(
                "edge: woke {app}/{id}: accepting after {} ms (its host took the start in {} ms)",
                began.elapsed().as_millis(),
                started_after.as_millis()
            );
            return Ok(());
        }
    }
}

/// Connect attempts to a machine that is waking, overlapping: a new one every few milliseconds
/// while the earlier ones stay in flight. A SYN sent while the machine was still paused is lost
/// (the kernel would resend it only after a second), so attempts must be fresh; but a SYN the
/// resumed guest received may take a while to be answered (~80 ms under TCG, with a cold
/// translation cache), so attempts must not be given up early either. The first to connect wins;
/// the others are dropped with the set.
#[derive(Default)]
struct Probes {
    inflight: tokio::task::JoinSet<std::io::Result<tokio::net::TcpStream>>,
    /// The pause before the next attempt (grows from 2 to 20 ms).
    pause: Duration,
}

impl Probes {
    /// At most this many attempts in flight.
    const MAX_INFLIGHT: usize = 32;
    /// An attempt is given up after this long.
    const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

    /// Starts an attempt, then waits up to the pause (at most `left`) for any attempt to
    /// connect.
    async fn next(&mut self, edge: &Edge, addr: SocketAddr, left: Duration) -> Option<tokio::net::TcpStream> {
        if self.inflight.len() < Self::MAX_INFLIGHT {
            let dial = edge.dialer.dial(addr);
            self.inflight.spawn(async move {
                match tokio::time::timeout(Self::ATTEMPT_TIMEOUT, dial).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
            });
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(2), Duration::from_millis(20));
        let until = tokio::time::Instant::now() + self.pause.min(left);
        loop {
            tokio::select! {
                joined = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    // Refused (the guest is up, its app not listening yet) or timed out: the
                    // next attempt is due soon anyway.
                    if let Some(Ok(Ok(stream))) = joined {
                        return Some(stream);
                    }
                }
                () = tokio::time::sleep_until(until) => return None,
            }
        }
    }
}

/// The autostop loop: every `autostop_interval`, per app and region, stops or suspends at most
/// one excess idle machine. Runs until the edge is dropped by everyone else.
pub async fn autostop_loop(edge: Arc<Edge>) {
    let mut tick = tokio::time::interval(edge.config.autostop_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        autostop_pass(&edge).await;
    }
}

/// One pass of the autostop loop; returns the machines it stopped or suspended.
pub async fn autostop_pass(edge: &Arc<Edge>) -> Vec<MachineId> {
    let snap = edge.routes.snapshot();
    // Forget the counters of machines that left the catalog.
    edge.loads
        .retain(|id| snap.apps().any(|a| a.machine(id.as_str()).is_some()));
    let mut acted = Vec::new();
    for app in snap.apps() {
        let mut regions: HashMap<&str, Vec<&Arc<MachineRoute>>> = HashMap::new();
        for m in &app.machines {
            if m.is_started() {
                regions.entry(m.entry.region.as_str()).or_default().push(m);
            }
        }
        for (region, running) in regions {
            if let Some((m, how)) = pick_idle(edge, region, &running) {
                let id = m.entry.id.clone();
                let result = match how {
                    Autostop::Suspend => match edge.control.suspend(&app.name, &id).await {
                        Ok(()) => Ok(()),
                        // Suspension is not always possible: stop instead.
                        Err(_) => edge.control.stop(&app.name, &id).await,
                    },
                    _ => edge.control.stop(&app.name, &id).await,
                };
                let load = edge.loads.machine(&id);
                edge.loads.clear_woken(&load);
                edge.metrics.autostop(result.is_ok());
                if result.is_ok() {
                    acted.push(id);
                }
            }
        }
    }
    acted
}

/// Fly's rule: with more than one machine running, `excess = running − (over_soft + 1)`, and one
/// idle machine goes when `excess ≥ 1`; a lone machine goes when idle. `min_machines_running`
/// holds in the primary region.
fn pick_idle<'a>(
    edge: &Edge,
    region: &str,
    running: &[&'a Arc<MachineRoute>],
) -> Option<(&'a Arc<MachineRoute>, Autostop)> {
    let idle_ms = u64::try_from(edge.config.idle_after.as_millis()).unwrap_or(u64::MAX);
    let mut over_soft = 0usize;
    let mut idle: Vec<(u64, &'a Arc<MachineRoute>, Autostop, u32)> = Vec::new();
    for m in running {
        let load = edge.loads.machine(&m.entry.id);
        let inflight = load.inflight();
        // The strongest autostop among the machine's services decides; none: never.
        let mut how = Autostop::Off;
        let mut soft = u32::MAX;
        let mut min_running = 0u32;
        for s in &m.entry.services {
            match s.autostop {
                Some(Autostop::Suspend) => how = Autostop::Suspend,
                Some(Autostop::Stop) if how == Autostop::Off => how = Autostop::Stop,
                _ => {}
            }
            soft = soft.min(crate::balance::limits(edge, s).0);
            min_running = min_running.max(s.min_machines_running.unwrap_or(0));
        }
        if inflight >= soft {
            over_soft += 1;
        }
        if how == Autostop::Off || inflight > 0 {
            continue;
        }
        let quiet = edge.loads.idle_ms(&load);
        if quiet < idle_ms {
            continue;
        }
        let how = if how == Autostop::Suspend && !m.entry.suspendable {
            Autostop::Stop
        } else {
            how
        };
        idle.push((quiet, m, how, min_running));
    }
    let running_n = running.len();
    if running_n > 1 && running_n.saturating_sub(over_soft + 1) == 0 {
        return None;
    }
    idle.sort_by_key(|i| std::cmp::Reverse(i.0));
    let (_, m, how, min_running) = idle.into_iter().next()?;
    let primary = if m.entry.primary_region.is_empty() {
        edge.config.region.as_str()
    } else {
        m.entry.primary_region.as_str()
    };
    if region == primary && running_n <= usize::try_from(min_running).unwrap_or(usize::MAX) {
        return None;
    }
    Some((m, how))
}
