//! Apps' public UDP ports (`[[services]]` with `protocol = "udp"`): one socket per public port,
//! following the routing table as the TCP ports do, and per client address a **flow** stuck to
//! one machine.
//!
//! A flow is picked like a raw TCP connection ([`balance::choose_for`]: started, healthy, least
//! loaded then closest, soft and hard limits; a stopped machine is woken through
//! [`scale::wake_udp`] while the flow holds its first datagrams) and counts as one connection on
//! its machine until it ends, so autostop leaves a machine with live flows alone. It relays
//! through a socket of its own connected to the machine's `private_ip:internal_port` (opened by
//! the [`crate::Dialer`], i.e. where the machines' network lives); the machine's answers go back
//! to the client from the public socket. A flow ends after
//! [`crate::EdgeConfig::udp_flow_idle_timeout`] without traffic, or when its machine leaves the
//! pool or refuses (ICMP port unreachable): then the client's next datagram picks again.
//!
//! Everything is bounded: flows in total and per client address, datagrams held per flow, and
//! datagram size; what does not fit is dropped and counted (`aloft_edge_udp_dropped_count`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use aloft_api::MachineId;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::Edge;
use crate::balance::{self, Choice, Want};
use crate::clients::ClientSlot;
use crate::load::LoadGuard;
use crate::metrics::{FlowCount, UdpDrop, UdpFigures};
use crate::routes::{MachineRoute, Protocol};
use crate::scale;
use crate::tcp::{desired_ports, ports_gone};

/// The largest UDP payload there is (IPv4's is 65 507, IPv6's without jumbograms 65 527).
const MAX_DATAGRAM: usize = 65_535;

/// The longest pause between resends of a woken machine's held datagrams.
const WARM_RESEND_MAX: Duration = Duration::from_millis(200);

thread_local! {
    /// Where flows receive their machine's answers: one buffer per thread instead of 64 KiB
    /// per flow.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM + 1]);
}

/// Open UDP flows over all ports: the edge-wide limit.
#[derive(Debug, Default)]
pub(crate) struct FlowTotal {
    open: Arc<AtomicUsize>,
}

/// One flow in [`FlowTotal`]; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct TotalSlot(Arc<AtomicUsize>);

impl FlowTotal {
    fn admit(&self, max: usize) -> Option<TotalSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(TotalSlot(self.open.clone()))
    }
}

impl Drop for TotalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One public UDP port being served.
#[derive(Debug)]
struct UdpPort {
    socket: UdpSocket,
    app: String,
    port: u16,
    figures: Arc<UdpFigures>,
    flows: Mutex<HashMap<SocketAddr, FlowEntry>>,
}

#[derive(Debug)]
struct FlowEntry {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    task: AbortHandle,
}

impl UdpPort {
    fn flows(&self) -> MutexGuard<'_, HashMap<SocketAddr, FlowEntry>> {
        self.flows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for UdpPort {
    /// The port is no longer served: its flows end with it.
    fn drop(&mut self) {
        let flows = self.flows.get_mut().unwrap_or_else(PoisonError::into_inner);
        for f in flows.values() {
            f.task.abort();
        }
    }
}

/// What a flow holds for its whole life; its `Drop` takes it out of its port's table.
#[derive(Debug)]
struct Flow {
    id: u64,
    port: Weak<UdpPort>,
    app: String,
    public_port: u16,
    client: SocketAddr,
    figures: Arc<UdpFigures>,
    _client_slot: ClientSlot,
    _total_slot: TotalSlot,
    _count: FlowCount,
}

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some(port) = self.port.upgrade() {
            let mut flows = port.flows();
            if flows.get(&self.client).is_some_and(|e| e.id == self.id) {
                flows.remove(&self.client);
            }
        }
    }
}

/// A flow's machine: its unit of load and the socket connected to it.
#[derive(Debug)]
struct Conn {
    machine: Arc<MachineRoute>,
    _guard: LoadGuard,
    socket: UdpSocket,
    /// Until then the machine's app may still be coming up (the flow woke the machine): a
    /// refusal resends the datagrams sent so far instead of failing the machine.
    warm_until: Option<Instant>,
}

/// How relaying to one machine ended.
enum Relay {
    /// The flow is over (idle, or its port closed).
    End,
    /// The machine left the pool or refused: the next datagram (in `held`, if any) picks again.
    Repick,
}

impl Edge {
    /// Listens on apps' own public UDP ports on `ip`, following the routing table: ports appear
    /// and disappear with the UDP services that ask for them (a port's flows end with it). Runs
    /// until the task is dropped.
    pub async fn serve_udp_services(self: Arc<Self>, ip: IpAddr) {
        let mut listening: HashMap<u16, (String, JoinHandle<()>)> = HashMap::new();
        let mut failed: HashSet<(u16, String)> = HashSet::new();
        loop {
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let want = desired_ports(&self.routes.snapshot(), &[], Protocol::Udp);
            for port in ports_gone(&listening, &want) {
                if let Some((_, task)) = listening.remove(&port) {
                    task.abort();
                    // The socket is closed once the task is gone: only then may another app
                    // bind the port.
                    let _ = task.await;
                }
            }
            failed.retain(|(port, app)| want.get(port) == Some(app));
            for (port, app) in &want {
                if listening.contains_key(port) {
                    continue;
                }
                match UdpSocket::bind(SocketAddr::new(ip, *port)).await {
                    Ok(socket) => {
                        failed.remove(&(*port, app.clone()));
                        let served = UdpPort {
                            socket,
                            app: app.clone(),
                            port: *port,
                            figures: self.metrics.udp(app),
                            flows: Mutex::default(),
                        };
                        let task = tokio::spawn(Arc::clone(&self).serve_udp_port(served));
                        listening.insert(*port, (app.clone(), task));
                    }
                    Err(e) => {
                        if failed.insert((*port, app.clone())) {
                            eprintln!("edge: cannot listen on udp {ip}:{port} for app {app}: {e}");
                        }
                    }
                }
            }
            // Retry failed binds now and then; otherwise wait for the table to change.
            let _ = tokio::time::timeout(Duration::from_secs(30), changed).await;
        }
    }

    /// Receives clients' datagrams on one public port and hands each to its client's flow.
    async fn serve_udp_port(self: Arc<Self>, port: UdpPort) {
        let port = Arc::new(port);
        let max = self.config.udp_max_datagram.clamp(1, MAX_DATAGRAM);
        let mut buf = vec![0u8; max + 1];
        let mut next_id = 0u64;
        let mut last_error = None;
        loop {
            let (n, client) = match port.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    // Once per kind of error in a row, not every 50 ms.
                    if last_error.replace(e.kind()) != Some(e.kind()) {
                        eprintln!(
                            "edge: udp port {} of app {}: receive failed: {e}",
                            port.port, port.app
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            last_error = None;
            if n > max {
                port.figures.dropped(UdpDrop::Oversize, 1);
                continue;
            }
            next_id += 1;
            self.udp_deliver(&port, client, Bytes::copy_from_slice(&buf[..n]), next_id);
        }
    }

    /// Gives `datagram` to `client`'s flow, opening one (under the limits) when it has none.
    fn udp_deliver(self: &Arc<Self>, port: &Arc<UdpPort>, client: SocketAddr, datagram: Bytes, id: u64) {
        let mut flows = port.flows();
        let datagram = match flows.get(&client) {
            None => datagram,
            Some(f) => match f.tx.try_send(datagram) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    port.figures.dropped(UdpDrop::QueueFull, 1);
                    return;
                }
                // The flow just ended: this datagram opens a new one.
                Err(TrySendError::Closed(d)) => {
                    flows.remove(&client);
                    d
                }
            },
        };
        let Some(client_slot) = self
            .udp_clients
            .admit(client.ip(), self.config.udp_max_flows_per_client)
        else {
            port.figures.dropped(UdpDrop::FlowLimit, 1);
            return;
        };
        let Some(total_slot) = self.udp_flows.admit(self.config.udp_max_flows) else {
            port.figures.dropped(UdpDrop::FlowLimit, 1);
            return;
        };
        let (tx, rx) = mpsc::channel(self.config.udp_flow_queue.max(1));
        let _ = tx.try_send(datagram);
        let flow = Flow {
            id,
            port: Arc::downgrade(port),
            app: port.app.clone(),
            public_port: port.port,
            client,
            figures: port.figures.clone(),
            _client_slot: client_slot,
            _total_slot: total_slot,
            _count: port.figures.flow_opened(),
        };
        let task = tokio::spawn(Arc::clone(self).run_flow(flow, rx));
        flows.insert(
            client,
            FlowEntry {
                id,
                tx,
                task: task.abort_handle(),
            },
        );
    }

    /// One flow, from its first datagram until it is idle for
    /// [`crate::EdgeConfig::udp_flow_idle_timeout`].
    async fn run_flow(self: Arc<Self>, flow: Flow, mut rx: mpsc::Receiver<Bytes>) {
        let idle = self.config.udp_flow_idle_timeout;
        let mut held: VecDeque<Bytes> = VecDeque::new();
        loop {
            if held.is_empty() {
                match tokio::time::timeout(idle, rx.recv()).await {
                    Ok(Some(d)) => held.push_back(d),
                    _ => return,
                }
            }
            let Some(conn) = self.udp_connect(&flow).await else {
                let mut n = held.len();
                while rx.try_recv().is_ok() {
                    n += 1;
                }
                flow.figures.dropped(UdpDrop::NoMachine, n);
                return;
            };
            // What arrived while the machine was picked or woken follows the first ones.
            while let Ok(d) = rx.try_recv() {
                held.push_back(d);
            }
            match self.udp_relay(&flow, conn, &mut rx, &mut held).await {
                Relay::End => return,
                Relay::Repick => {}
            }
        }
    }

    /// A machine for `flow`, with its unit of load and a socket connected to it: chosen by the
    /// balancer, woken when none is started, or `None` when no machine can take it.
    async fn udp_connect(self: &Arc<Self>, flow: &Flow) -> Option<Conn> {
        let mut tried: Vec<MachineId> = Vec::new();
        let mut woke: Option<(MachineId, Instant)> = None;
        loop {
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let app = self.routes.snapshot().app(&flow.app).cloned()?;
            let want = Want {
                port: flow.public_port,
                exclude: &tried,
                ..Want::default()
            };
            match balance::choose_for(self, &app, &want, Protocol::Udp) {
                Choice::Ready(machine, guard) => {
                    let internal = machine
                        .service_for(flow.public_port, Protocol::Udp)
                        .and_then(|s| s.internal_port);
                    let dialed = match (machine.ip, internal) {
                        (Some(ip), Some(internal)) => {
                            let addr = SocketAddr::new(ip, internal);
                            tokio::time::timeout(self.config.connect_timeout, self.dialer.udp(addr))
                                .await
                                .ok()
                                .and_then(Result::ok)
                        }
                        _ => None,
                    };
                    if let Some(socket) = dialed {
                        let load = self.loads.machine(&machine.entry.id);
                        let woken = woke.is_some() || self.loads.recently_woken(&load, &machine.entry);
                        return Some(Conn {
                            machine,
                            _guard: guard,
                            socket,
                            warm_until: woken.then(|| Instant::now() + self.config.wake_timeout),
                        });
                    }
                    self.mark_failed(&machine.entry.id);
                    tried.push(machine.entry.id.clone());
                    if tried.len() >= self.config.connect_attempts.max(1) {
                        return None;
                    }
                }
                Choice::Wake(machine) => match &woke {
                    // Its host took the start: wait for its agent to say it started.
                    Some((id, deadline)) if *id == machine.entry.id => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return None;
                        }
                        let _ = tokio::time::timeout(left, changed).await;
                    }
                    _ => {
                        scale::wake_udp(self, &machine).await.ok()?;
                        woke = Some((
                            machine.entry.id.clone(),
                            Instant::now() + self.config.wake_timeout,
                        ));
                    }
                },
                Choice::Full | Choice::NoneHealthy | Choice::NotFound => return None,
            }
        }
    }

    /// Whether `m` may still carry flows of `port`: in the table, not cordoned, started (or
    /// just woken), still serving the port over UDP.
    fn udp_still_in_pool(&self, app: &str, m: &MachineRoute, port: u16) -> bool {
        let snap = self.routes.snapshot();
        let Some(now) = snap.app(app).and_then(|a| a.machine(m.entry.id.as_str())) else {
            return false;
        };
        let started = now.is_started()
            || self
                .loads
                .recently_woken(&self.loads.machine(&now.entry.id), &now.entry);
        !now.cordoned && started && now.ip == m.ip && now.service_for(port, Protocol::Udp).is_some()
    }

    /// Relays between the flow's client and `conn`'s machine until the flow ends or must pick
    /// another machine.
    async fn udp_relay(
        self: &Arc<Self>,
        flow: &Flow,
        conn: Conn,
        rx: &mut mpsc::Receiver<Bytes>,
        held: &mut VecDeque<Bytes>,
    ) -> Relay {
        let idle = self.config.udp_flow_idle_timeout;
        let max = self.config.udp_max_datagram.clamp(1, MAX_DATAGRAM);
        let keep = self.config.udp_flow_queue.max(1);
        let mut last = Instant::now();
        // While the machine may still be coming up: what was sent to it, to send again if its
        // app was not listening yet.
        let mut warm = conn.warm_until.map(|until| (until, Vec::<Bytes>::new()));
        let mut resend_pause = Duration::from_millis(10);
        let mut refused = false;
        loop {
            if refused {
                refused = false;
                match &warm {
                    Some((until, sent)) if Instant::now() < *until => {
                        tokio::time::sleep(resend_pause).await;
                        resend_pause = (resend_pause * 2).min(WARM_RESEND_MAX);
                        for d in sent.iter().rev() {
                            held.push_front(d.clone());
                        }
                        if let Some((_, sent)) = &mut warm {
                            sent.clear();
                        }
                    }
                    _ => {
                        self.mark_failed(&conn.machine.entry.id);
                        return Relay::Repick;
                    }
                }
            }
            while let Some(d) = held.pop_front() {
                match conn.socket.send(&d).await {
                    Ok(_) => {
                        flow.figures.inbound();
                        if let Some((_, sent)) = &mut warm
                            && sent.len() < keep
                        {
                            sent.push(d);
                        }
                    }
                    // An earlier datagram was refused; this one was not sent.
                    Err(_) => {
                        held.push_front(d);
                        refused = true;
                        break;
                    }
                }
            }
            if refused {
                continue;
            }
            let changed = self.routes.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.udp_still_in_pool(&flow.app, &conn.machine, flow.public_port) {
                return Relay::Repick;
            }
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else {
                        return Relay::End;
                    };
                    last = Instant::now();
                    held.push_back(d);
                }
                ready = conn.socket.readable() => {
                    if ready.is_err() {
                        refused = true;
                        continue;
                    }
                    match try_recv(&conn.socket) {
                        Ok(d) => {
                            last = Instant::now();
                            // It answered: its app is up.
                            warm = None;
                            if d.len() > max {
                                flow.figures.dropped(UdpDrop::Oversize, 1);
                                continue;
                            }
                            let Some(port) = flow.port.upgrade() else {
                                return Relay::End;
                            };
                            match port.socket.send_to(&d, flow.client).await {
                                Ok(_) => flow.figures.outbound(),
                                Err(_) => flow.figures.dropped(UdpDrop::SendFailed, 1),
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // Port unreachable (nothing bound there), host unreachable, …
                        Err(_) => refused = true,
                    }
                }
                () = tokio::time::sleep_until(last + idle) => return Relay::End,
                () = &mut changed => {}
            }
        }
    }
}

/// One datagram from a flow's machine socket, if one is there.
fn try_recv(socket: &UdpSocket) -> io::Result<Bytes> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = socket.try_recv(buf)?;
        Ok(Bytes::copy_from_slice(&buf[..n]))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use aloft_api::{CatalogEntry, MachinePort, MachineService};

    use crate::RoutingTable;
    use crate::routes::{MachineRoute, Protocol};
    use crate::tcp::desired_ports;

    fn service(
        protocol: Option<&str>,
        internal: u16,
        port: Option<u16>,
        range: Option<(u16, u16)>,
    ) -> MachineService {
        MachineService {
            protocol: protocol.map(str::to_owned),
            internal_port: Some(internal),
            ports: vec![MachinePort {
                port,
                start_port: range.map(|r| r.0),
                end_port: range.map(|r| r.1),
                ..MachinePort::default()
            }],
            ..MachineService::default()
        }
    }

    fn entry(app: &str, n: u8, services: Vec<MachineService>) -> CatalogEntry {
        crate::routes::test_entry(app, n, services)
    }

    #[test]
    fn a_port_served_over_tcp_and_udp_has_a_service_for_each() {
        // DNS: TCP and UDP on 53, to different internal ports; something the edge does not
        // serve on 99.
        let e = entry(
            "dns",
            1,
            vec![
                service(None, 5353, Some(53), None),
                service(Some("udp"), 5354, Some(53), None),
                service(Some("UDP"), 6000, None, Some((6000, 6010))),
                service(Some("sctp"), 99, Some(99), None),
            ],
        );
        let m = MachineRoute {
            entry: e.clone(),
            ip: None,
            cordoned: false,
        };
        assert_eq!(m.service_for_port(53).unwrap().internal_port, Some(5353));
        assert_eq!(
            m.service_for(53, Protocol::Udp).unwrap().internal_port,
            Some(5354)
        );
        assert_eq!(
            m.service_for(6005, Protocol::Udp).unwrap().internal_port,
            Some(6000)
        );
        assert!(m.service_for_port(6005).is_none(), "a UDP range is no TCP port");
        assert!(m.service_for_port(99).is_none() && m.service_for(99, Protocol::Udp).is_none());
        assert_eq!(Protocol::of(&e.services[0]), Some(Protocol::Tcp));
        assert_eq!(Protocol::of(&e.services[3]), None);
    }

    #[test]
    fn udp_ports_follow_udp_services_only() {
        let table = RoutingTable::default();
        table.upsert(entry(
            "b-app",
            1,
            vec![
                service(None, 1, Some(5000), None),
                service(Some("udp"), 2, Some(5000), None),
                service(Some("udp"), 3, None, Some((6000, 6001))),
                // A typo must not bind every port.
                service(Some("udp"), 4, None, Some((1, 65535))),
                service(Some("udp"), 5, Some(7000), None),
            ],
        ));
        table.upsert(entry("a-app", 2, vec![service(Some("udp"), 6, Some(7000), None)]));
        let snap = table.snapshot();
        let udp = desired_ports(&snap, &[], Protocol::Udp);
        let ports: Vec<u16> = udp.keys().copied().collect();
        assert_eq!(ports, vec![5000, 6000, 6001, 7000]);
        assert_eq!(
            udp[&7000], "a-app",
            "a port two apps claim goes to the first by name"
        );
        assert_eq!(udp[&5000], "b-app");
        let tcp = desired_ports(&snap, &[], Protocol::Tcp);
        assert_eq!(tcp.keys().copied().collect::<Vec<_>>(), vec![5000]);
    }
}
