//! In-process tests of the edge's UDP services through its public API, in the style of
//! `edge.rs`: an [`Edge`] serving apps' UDP ports on a loopback address of its own, fake machines
//! (UDP echo sockets answering `<machine>:<datagram>`, each on its own loopback address
//! 127.0.20x.y, so they never meet `edge.rs`'s 127.0.1–3.y) routed through `edge.routes()`, and a
//! fake [`MachineControl`] that binds a machine's echo socket on `start` (optionally late, as an
//! app still booting) and publishes it started, as an agent would.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use aloft_api::{
        Autostop, CatalogEntry, MachineId, MachinePort, MachineService, MachineServiceConcurrency,
        MachineState,
    };
    use aloft_proxy::{
        ControlError, ControlFuture, DirectDialer, Edge, EdgeConfig, MachineControl, RoutingTable,
    };
    use tokio::net::UdpSocket;
    use tokio::task::JoinHandle;

    use crate::common::{Ids, Loopback, metric, until_every};

    // -----------------------------------------------------------------------------------------
    // Addresses and ids.

    /// A UDP port held on 127.0.0.1 for the whole process (so no other process picks it for
    /// 127.0.x.y): the fake machines' internal port.
    fn internal_port() -> u16 {
        static PORT: OnceLock<(std::net::UdpSocket, u16)> = OnceLock::new();
        PORT.get_or_init(reserve).1
    }

    /// A UDP port held on 127.0.0.1 while the returned socket lives.
    fn reserve() -> (std::net::UdpSocket, u16) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        (s, p)
    }

    /// A loopback address of its own for a new machine: 127.0.200–209.y.
    fn next_ip() -> IpAddr {
        static IPS: Loopback = Loopback::new(200, 209);
        IPS.next()
    }

    /// A loopback address of its own for a new edge: 127.0.210.2 onwards.
    fn next_edge_ip() -> IpAddr {
        static N: AtomicU32 = AtomicU32::new(2);
        let [_, _, _, lo] = N.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(127, 0, 210, lo))
    }

    fn next_id() -> MachineId {
        static IDS: Ids = Ids::new([0xfe, 0xed]);
        IDS.next()
    }

    // -----------------------------------------------------------------------------------------
    // Fake machines.

    /// A UDP echo machine answering `<name>:<datagram>`; dropping it closes the socket.
    struct Echo {
        task: JoinHandle<()>,
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Echo {
        /// Closes the socket and waits until it is gone (so the address can be bound again).
        async fn close(mut self) {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    /// Counts what it receives in `got`.
    fn serve_echo(name: &str, addr: SocketAddr, got: Arc<AtomicUsize>) -> Echo {
        let std = std::net::UdpSocket::bind(addr).unwrap();
        std.set_nonblocking(true).unwrap();
        let socket = UdpSocket::from_std(std).unwrap();
        let name = name.to_owned();
        let counter = got;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut answer = format!("{name}:").into_bytes();
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, from).await;
            }
        });
        Echo { task }
    }

    #[derive(Default)]
    struct FakeMachine {
        entry: Option<CatalogEntry>,
        echo: Option<Echo>,
        got: Arc<AtomicUsize>,
    }

    #[derive(Default)]
    struct ControlInner {
        table: OnceLock<Arc<RoutingTable>>,
        machines: Mutex<HashMap<MachineId, FakeMachine>>,
        calls: Mutex<Vec<String>>,
        /// After a start, the machine's app binds its socket this much later (it says started
        /// at once, as an agent does when the VM runs).
        bind_late_ms: AtomicU64,
        /// A start takes this long (the machine boots).
        start_delay_ms: AtomicU64,
    }

    /// Records calls; `start` publishes the machine started and binds its echo socket (at once
    /// or `bind_late_ms` later), `stop` closes it.
    #[derive(Clone, Default)]
    struct FakeControl(Arc<ControlInner>);

    impl std::fmt::Debug for FakeControl {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FakeControl")
        }
    }

    impl FakeControl {
        fn calls(&self) -> Vec<String> {
            self.0.calls.lock().unwrap().clone()
        }

        fn table(&self) -> &Arc<RoutingTable> {
            self.0.table.get().unwrap()
        }

        /// Publishes `entry`; its echo runs when it is started, unless `listening` is false (a
        /// machine whose app listens on nothing: it refuses).
        fn add(&self, entry: &CatalogEntry, listening: bool) {
            let got = Arc::new(AtomicUsize::new(0));
            let echo = (listening && entry.state == MachineState::Started)
                .then(|| serve_echo(&entry.id.to_string(), addr_of(entry), got.clone()));
            self.0.machines.lock().unwrap().insert(
                entry.id.clone(),
                FakeMachine {
                    entry: Some(entry.clone()),
                    echo,
                    got,
                },
            );
            self.table().upsert(entry.clone());
        }

        /// Datagrams machine `id` received.
        fn got(&self, id: &MachineId) -> usize {
            let map = self.0.machines.lock().unwrap();
            map.get(id).map_or(0, |m| m.got.load(Ordering::SeqCst))
        }

        fn change(&self, op: &'static str, id: &MachineId, state: MachineState) -> ControlFuture {
            self.0.calls.lock().unwrap().push(format!("{op} {id}"));
            let me = self.clone();
            let id = id.clone();
            Box::pin(async move {
                let late = me.0.bind_late_ms.load(Ordering::SeqCst);
                let delay = me.0.start_delay_ms.load(Ordering::SeqCst);
                if state == MachineState::Started && delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let closed = if state == MachineState::Started {
                    None
                } else {
                    let mut map = me.0.machines.lock().unwrap();
                    map.get_mut(&id).and_then(|m| m.echo.take())
                };
                if let Some(echo) = closed {
                    echo.close().await;
                }
                let entry = {
                    let mut map = me.0.machines.lock().unwrap();
                    let m = map
                        .get_mut(&id)
                        .ok_or_else(|| ControlError::Refused(format!("no machine {id}")))?;
                    let entry = m.entry.as_mut().unwrap();
                    entry.state = state;
                    entry.updated_at += 1;
                    if state == MachineState::Started && late == 0 && m.echo.is_none() {
                        m.echo = Some(serve_echo(&id.to_string(), addr_of(entry), m.got.clone()));
                    }
                    entry.clone()
                };
                if state == MachineState::Started && late > 0 {
                    let me = me.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(late)).await;
                        let mut map = me.0.machines.lock().unwrap();
                        let m = map.get_mut(&id).unwrap();
                        let addr = addr_of(m.entry.as_ref().unwrap());
                        m.echo = Some(serve_echo(&id.to_string(), addr, m.got.clone()));
                    });
                }
                me.table().upsert(entry);
                Ok(())
            })
        }
    }

    impl MachineControl for FakeControl {
        fn start(&self, _app: &str, id: &MachineId) -> ControlFuture {
            self.change("start", id, MachineState::Started)
        }
        fn stop(&self, _app: &str, id: &MachineId) -> ControlFuture {
            self.change("stop", id, MachineState::Stopped)
        }
        fn suspend(&self, _app: &str, id: &MachineId) -> ControlFuture {
            self.change("suspend", id, MachineState::Suspended)
        }
    }

    /// Where the machine's UDP service listens.
    fn addr_of(e: &CatalogEntry) -> SocketAddr {
        let port = e
            .services
            .iter()
            .find(|s| s.protocol.as_deref() == Some("udp"))
            .and_then(|s| s.internal_port)
            .unwrap();
        SocketAddr::new(e.private_ip.parse().unwrap(), port)
    }

    // -----------------------------------------------------------------------------------------
    // The edge under test.

    fn config() -> EdgeConfig {
        let mut c = EdgeConfig::new("test");
        c.connect_timeout = Duration::from_secs(1);
        c.wake_timeout = Duration::from_secs(5);
        c.idle_after = Duration::ZERO;
        c
    }

    struct Harness {
        edge: Arc<Edge>,
        control: FakeControl,
        /// Where the edge serves UDP.
        ip: IpAddr,
        /// The public UDP port the tests' services ask for.
        port: u16,
        _hold: std::net::UdpSocket,
        _server: JoinHandle<()>,
    }

    impl Harness {
        async fn new(config: EdgeConfig) -> Self {
            let control = FakeControl::default();
            let edge = Edge::new(config, Arc::new(control.clone()), Arc::new(DirectDialer));
            let _ = control.0.table.set(edge.routes().clone());
            let ip = next_edge_ip();
            let (hold, port) = reserve();
            let server = tokio::spawn(edge.clone().serve_udp_services(ip));
            Self {
                edge,
                control,
                ip,
                port,
                _hold: hold,
                _server: server,
            }
        }

        /// A machine of `app` in `state` with one UDP service on the harness's public port.
        fn entry(&self, app: &str, state: MachineState) -> CatalogEntry {
            entry(app, state, self.port)
        }

        /// Publishes `entry` (its echo runs when it is started) and waits for the edge to listen
        /// for its app.
        async fn add(&self, entry: &CatalogEntry) {
            self.control.add(entry, true);
            self.wait_listening(&entry.app).await;
        }

        /// The edge's public address.
        fn public(&self) -> SocketAddr {
            SocketAddr::new(self.ip, self.port)
        }

        /// Waits until the edge has bound a port for `app` (its UDP figures appear then).
        /// Probing with a bind of our own would race the edge's bind and could make it fail.
        async fn wait_listening(&self, app: &str) {
            let line = format!("aloft_edge_udp_flows{{app=\"{app}\"}}");
            until("the edge listens", || self.edge.metrics_text().contains(&line)).await;
        }

        fn metric(&self, name_and_labels: &str) -> u64 {
            metric(&self.edge.metrics_text(), name_and_labels)
        }
    }

    /// A started (or not) machine of `app` with one UDP service on public `port`.
    fn entry(app: &str, state: MachineState, port: u16) -> CatalogEntry {
        CatalogEntry {
            id: next_id(),
            app: app.to_owned(),
            host: "host1".to_owned(),
            region: "test".to_owned(),
            state,
            version: "v1".to_owned(),
            private_ip: next_ip().to_string(),
            services: vec![MachineService {
                protocol: Some("udp".to_owned()),
                internal_port: Some(internal_port()),
                ports: vec![MachinePort {
                    port: Some(port),
                    ..MachinePort::default()
                }],
                ..MachineService::default()
            }],
            checks: Vec::new(),
            suspendable: false,
            process_group: String::new(),
            primary_region: String::new(),
            updated_at: 0,
        }
    }

    /// Polls `cond` until it holds (5 s at most).
    async fn until(what: &str, cond: impl Fn() -> bool) {
        until_every(Duration::from_millis(5), what, cond).await;
    }

    // -----------------------------------------------------------------------------------------
    // Clients.

    /// A client socket on 127.0.0.1.
    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    /// Sends `msg` once; the answer within `within`, if any.
    async fn ask_once(c: &UdpSocket, to: SocketAddr, msg: &[u8], within: Duration) -> Option<String> {
        c.send_to(msg, to).await.unwrap();
        answer(c, within).await
    }

    /// The next datagram `c` receives within `within`.
    async fn answer(c: &UdpSocket, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(within, c.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Sends `msg` every 200 ms until an answer comes (5 s at most): `(machine, echoed)`.
    async fn ask(c: &UdpSocket, to: SocketAddr, msg: &str) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(a) = ask_once(c, to, msg.as_bytes(), Duration::from_millis(200)).await {
                let (m, echoed) = a.split_once(':').unwrap();
                return (m.to_owned(), echoed.to_owned());
            }
            assert!(Instant::now() < deadline, "no answer to {msg:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Relaying and balancing.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_datagram_reaches_a_machine_and_its_answer_returns() {
        let h = Harness::new(config()).await;
        let m = h.entry("dns", MachineState::Started);
        h.add(&m).await;
        let c = client().await;
        let got = ask_once(&c, h.public(), b"hello", Duration::from_secs(2)).await;
        assert_eq!(got.as_deref(), Some(format!("{}:hello", m.id).as_str()));
        // The answer may overtake its count.
        until("the answer is counted", || {
            h.metric("aloft_edge_udp_datagrams_count{app=\"dns\",direction=\"out\"}") == 1
        })
        .await;
        let text = h.edge.metrics_text();
        assert_eq!(
            metric(
                &text,
                "aloft_edge_udp_datagrams_count{app=\"dns\",direction=\"in\"}"
            ),
            1
        );
        assert_eq!(metric(&text, "aloft_edge_udp_flows{app=\"dns\"}"), 1);
        // A big datagram (under the limit) goes through whole.
        let big = vec![b'x'; 60_000];
        let got = ask_once(&c, h.public(), &big, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(got.len(), m.id.to_string().len() + 1 + 60_000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_clients_are_balanced_over_two_machines_and_keep_them() {
        let h = Harness::new(config()).await;
        let a = h.entry("game", MachineState::Started);
        let b = h.entry("game", MachineState::Started);
        h.add(&a).await;
        h.add(&b).await;
        let (c1, c2) = (client().await, client().await);
        let (m1, _) = ask(&c1, h.public(), "one").await;
        // c1's flow counts on its machine: the least loaded one is the other.
        let (m2, _) = ask(&c2, h.public(), "two").await;
        assert_ne!(m1, m2, "two flows on one machine while the other was idle");
        for i in 0..5 {
            let (m, echoed) = ask(&c1, h.public(), &format!("c1-{i}")).await;
            assert_eq!((m.as_str(), echoed), (m1.as_str(), format!("c1-{i}")));
            let (m, _) = ask(&c2, h.public(), &format!("c2-{i}")).await;
            assert_eq!(m, m2, "a client moved to another machine");
        }
        let text = h.edge.metrics_text();
        for id in [&a.id, &b.id] {
            let line = format!("fly_app_concurrency{{app=\"game\",instance=\"{id}\",region=\"test\"}}");
            assert_eq!(metric(&text, &line), 1, "{text}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_flow_ends_and_its_load_returns_to_zero() {
        let mut config = config();
        config.udp_flow_idle_timeout = Duration::from_millis(300);
        let h = Harness::new(config).await;
        let m = h.entry("idle", MachineState::Started);
        h.add(&m).await;
        let c = client().await;
        ask(&c, h.public(), "x").await;
        let load = format!(
            "fly_app_concurrency{{app=\"idle\",instance=\"{}\",region=\"test\"}}",
            m.id
        );
        assert_eq!(h.metric(&load), 1);
        assert_eq!(h.metric("aloft_edge_udp_flows{app=\"idle\"}"), 1);
        until("the flow ends", || {
            h.metric(&load) == 0 && h.metric("aloft_edge_udp_flows{app=\"idle\"}") == 0
        })
        .await;
        // Not before its idle timeout, though: a flow in use stays (checked by the next ask
        // reaching the same machine with a fresh flow).
        let (again, _) = ask(&c, h.public(), "y").await;
        assert_eq!(again, m.id.to_string());
        assert_eq!(h.metric(&load), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_machine_takes_no_more_flows() {
        let h = Harness::new(config()).await;
        let mut m = h.entry("full", MachineState::Started);
        m.services[0].concurrency = Some(MachineServiceConcurrency {
            soft_limit: Some(1),
            hard_limit: Some(1),
            r#type: Some("connections".to_owned()),
        });
        h.add(&m).await;
        let (c1, c2) = (client().await, client().await);
        ask(&c1, h.public(), "first").await;
        let refused = ask_once(&c2, h.public(), b"second", Duration::from_millis(300)).await;
        assert_eq!(refused, None, "a flow beyond the hard limit was relayed");
        assert_eq!(
            h.metric("aloft_edge_udp_dropped_count{app=\"full\",reason=\"no_machine\"}"),
            1
        );
        // The first client still gets through.
        ask(&c1, h.public(), "again").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_served_over_tcp_too_relays_to_the_udp_service() {
        let h = Harness::new(config()).await;
        let mut m = h.entry("both", MachineState::Started);
        // A TCP service on the same public port, listed first, to another internal port (held
        // here, so nothing answers UDP there either).
        let (_held, tcp_internal) = reserve();
        m.services.insert(
            0,
            MachineService {
                internal_port: Some(tcp_internal),
                ports: vec![MachinePort {
                    port: Some(h.port),
                    ..MachinePort::default()
                }],
                ..MachineService::default()
            },
        );
        h.add(&m).await;
        let c = client().await;
        let got = ask_once(&c, h.public(), b"udp", Duration::from_secs(2)).await;
        assert_eq!(got.as_deref(), Some(format!("{}:udp", m.id).as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_leaves_a_machine_with_a_live_flow_alone() {
        let mut config = config();
        config.udp_flow_idle_timeout = Duration::from_millis(400);
        let h = Harness::new(config).await;
        let mut m = h.entry("stopme", MachineState::Started);
        m.services[0].autostop = Some(Autostop::Stop);
        h.add(&m).await;
        let c = client().await;
        ask(&c, h.public(), "busy").await;
        assert_eq!(aloft_proxy::autostop_pass(&h.edge).await, Vec::<MachineId>::new());
        assert!(h.control.calls().is_empty());
        // Once the flow is idle and gone, the machine is idle too.
        until("the flow ends", || {
            h.metric("aloft_edge_udp_flows{app=\"stopme\"}") == 0
        })
        .await;
        assert_eq!(aloft_proxy::autostop_pass(&h.edge).await, vec![m.id.clone()]);
        // And the next datagram wakes it again.
        let (who, _) = ask(&c, h.public(), "back").await;
        assert_eq!(who, m.id.to_string());
        assert_eq!(
            h.control.calls(),
            vec![format!("stop {}", m.id), format!("start {}", m.id)]
        );
    }

    // -----------------------------------------------------------------------------------------
    // Waking, refusing, leaving.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_datagram_wakes_a_stopped_machine_and_is_delivered() {
        let h = Harness::new(config()).await;
        let m = h.entry("wake", MachineState::Stopped);
        h.add(&m).await;
        let c = client().await;
        let got = ask_once(&c, h.public(), b"wake up", Duration::from_secs(3)).await;
        assert_eq!(got.as_deref(), Some(format!("{}:wake up", m.id).as_str()));
        assert_eq!(h.control.calls(), vec![format!("start {}", m.id)]);
        assert_eq!(h.metric("aloft_edge_autostart_count{result=\"ok\"}"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn datagrams_held_for_a_wake_reach_an_app_that_binds_late() {
        let h = Harness::new(config()).await;
        h.control.0.bind_late_ms.store(300, Ordering::SeqCst);
        let m = h.entry("late", MachineState::Stopped);
        h.add(&m).await;
        let c = client().await;
        for msg in ["a", "b", "c"] {
            c.send_to(msg.as_bytes(), h.public()).await.unwrap();
        }
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(answer(&c, Duration::from_secs(3)).await.unwrap());
        }
        let id = m.id.to_string();
        assert_eq!(
            answers,
            vec![format!("{id}:a"), format!("{id}:b"), format!("{id}:c")]
        );
        assert_eq!(h.control.got(&m.id), 3, "each datagram reaches the app once");
        // The refusals while the app was coming up did not fail the machine.
        let (again, _) = ask(&c, h.public(), "d").await;
        assert_eq!(again, id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flow_holds_a_bounded_number_of_datagrams_while_its_machine_wakes() {
        let mut config = config();
        config.udp_flow_queue = 2;
        let h = Harness::new(config).await;
        h.control.0.start_delay_ms.store(300, Ordering::SeqCst);
        let m = h.entry("hold", MachineState::Stopped);
        h.add(&m).await;
        let c = client().await;
        for i in 0..6 {
            c.send_to(format!("{i}").as_bytes(), h.public()).await.unwrap();
        }
        let mut answers = Vec::new();
        while let Some(a) = answer(&c, Duration::from_secs(2)).await {
            answers.push(a);
        }
        let dropped = h.metric("aloft_edge_udp_dropped_count{app=\"hold\",reason=\"queue_full\"}");
        // The first datagram opens the flow; its queue holds 2 more while the machine boots
        // (3 when the flow took the first out before the next arrived).
        assert!((2..=3).contains(&answers.len()), "{answers:?}");
        assert_eq!(usize::try_from(dropped).unwrap(), 6 - answers.len());
        assert_eq!(
            answers[0],
            format!("{}:0", m.id),
            "the first datagram is delivered first"
        );
        assert_eq!(h.control.got(&m.id), answers.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusing_machine_is_skipped() {
        let mut config = config();
        config.failed_backoff = Duration::from_secs(60);
        let h = Harness::new(config).await;
        let refuser = h.entry("refuse", MachineState::Started);
        let good = h.entry("refuse", MachineState::Started);
        h.control.add(&refuser, false);
        h.add(&good).await;
        // Two flows at least: the second goes to the least loaded machine, the refuser, if the
        // first did not.
        for i in 0..4 {
            let c = client().await;
            let (m, _) = ask(&c, h.public(), &format!("q{i}")).await;
            assert_eq!(m, good.id.to_string());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flow_whose_machine_leaves_picks_another() {
        let h = Harness::new(config()).await;
        let a = h.entry("move", MachineState::Started);
        let b = h.entry("move", MachineState::Started);
        h.add(&a).await;
        h.add(&b).await;
        let c = client().await;
        let (first, _) = ask(&c, h.public(), "1").await;
        let leaving = if first == a.id.to_string() { &a } else { &b };
        h.edge.routes().set_cordoned("move", &leaving.id, true);
        let (second, _) = ask(&c, h.public(), "2").await;
        assert_ne!(second, first, "the flow stayed on a cordoned machine");
        let load = format!(
            "fly_app_concurrency{{app=\"move\",instance=\"{}\",region=\"test\"}}",
            leaving.id
        );
        until("the old machine's load is freed", || h.metric(&load) == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_removed_from_the_table_is_no_longer_listened_on() {
        let h = Harness::new(config()).await;
        let m = h.entry("gone", MachineState::Started);
        h.add(&m).await;
        let c = client().await;
        ask(&c, h.public(), "x").await;
        h.edge.routes().remove("gone", &m.id);
        let addr = h.public();
        until("the port is closed", || std::net::UdpSocket::bind(addr).is_ok()).await;
        // The port's flows end with it (aborted as the port closes, gone a moment later).
        until("the port's flows end", || {
            h.metric("aloft_edge_udp_flows{app=\"gone\"}") == 0
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_that_cannot_be_bound_is_taken_once_it_is_free() {
        let h = Harness::new(config()).await;
        let squatter = std::net::UdpSocket::bind(h.public()).unwrap();
        let m = h.entry("late-port", MachineState::Started);
        h.control.add(&m, true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(squatter);
        // The next change of the table tries again (else 30 s later).
        let mut other = h.entry("other", MachineState::Started);
        other.services.clear();
        h.control.add(&other, false);
        h.wait_listening("late-port").await;
        let c = client().await;
        let (who, _) = ask(&c, h.public(), "x").await;
        assert_eq!(who, m.id.to_string());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_two_apps_claim_goes_to_the_first_by_name() {
        let h = Harness::new(config()).await;
        let b = h.entry("b-app", MachineState::Started);
        let a = h.entry("a-app", MachineState::Started);
        h.add(&b).await;
        h.add(&a).await;
        let c = client().await;
        let (m, _) = ask(&c, h.public(), "x").await;
        assert_eq!(m, a.id.to_string());
    }

    // -----------------------------------------------------------------------------------------
    // Limits.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversize_datagrams_and_excess_flows_are_dropped_and_counted() {
        let mut config = config();
        config.udp_max_datagram = 1000;
        config.udp_max_flows_per_client = 2;
        let h = Harness::new(config).await;
        let m = h.entry("limits", MachineState::Started);
        h.add(&m).await;
        let c1 = client().await;
        let big = vec![b'x'; 2000];
        assert_eq!(
            ask_once(&c1, h.public(), &big, Duration::from_millis(300)).await,
            None
        );
        assert_eq!(
            h.metric("aloft_edge_udp_dropped_count{app=\"limits\",reason=\"oversize\"}"),
            1
        );
        assert_eq!(h.control.got(&m.id), 0);
        // Exactly the limit still reaches the machine; its answer, longer, does not come back.
        let edge_size = vec![b'y'; 1000];
        assert_eq!(
            ask_once(&c1, h.public(), &edge_size, Duration::from_millis(300)).await,
            None
        );
        assert_eq!(h.control.got(&m.id), 1);
        assert_eq!(
            h.metric("aloft_edge_udp_dropped_count{app=\"limits\",reason=\"oversize\"}"),
            2
        );
        let c2 = client().await;
        ask(&c2, h.public(), "two").await;
        // A third flow from the same address is over its limit.
        let c3 = client().await;
        assert_eq!(
            ask_once(&c3, h.public(), b"three", Duration::from_millis(300)).await,
            None
        );
        assert_eq!(
            h.metric("aloft_edge_udp_dropped_count{app=\"limits\",reason=\"flow_limit\"}"),
            1
        );
        assert_eq!(h.metric("aloft_edge_udp_flows{app=\"limits\"}"), 2);
        // The edge carries on.
        let (who, echoed) = ask(&c1, h.public(), "still here").await;
        assert_eq!((who, echoed.as_str()), (m.id.to_string(), "still here"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_edge_wide_flow_limit_holds() {
        let mut config = config();
        config.udp_max_flows = 3;
        let h = Harness::new(config).await;
        let m = h.entry("total", MachineState::Started);
        h.add(&m).await;
        let mut clients = Vec::new();
        for i in 0..3 {
            let c = client().await;
            ask(&c, h.public(), &format!("{i}")).await;
            clients.push(c);
        }
        let extra = client().await;
        assert_eq!(
            ask_once(&extra, h.public(), b"4", Duration::from_millis(300)).await,
            None
        );
        assert_eq!(
            h.metric("aloft_edge_udp_dropped_count{app=\"total\",reason=\"flow_limit\"}"),
            1
        );
    }
}
