//! In-process tests of the service checks the edge runs itself ([`Edge::run_checks`]): an
//! [`Edge`] serving plain HTTP on a loopback port with its prober running, fake machines (small
//! hyper servers, each on its own loopback address 127.0.230–239.y) whose catalog entries
//! define service checks (100 ms intervals), and a [`Dialer`] that counts (and may redirect) the
//! connections the edge opens. The catalog's statuses say one thing, the machines another: the
//! edge's own results must decide.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use aloft_api::{CatalogEntry, CheckState, CheckStatus, MachineServiceCheck, MachineState};
    use aloft_proxy::{DialFuture, Dialer, DirectDialer, Edge, EdgeConfig, UdpFuture};
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Semaphore;
    use tokio::task::JoinHandle;

    use crate::common::{
        Backend, Handler, Ids, Loopback, NoControl, body, http_entry, internal_port, metric, serve_backend,
        until_every,
    };

    /// This file's machines: 127.0.230–239.y.
    static IPS: Loopback = Loopback::new(230, 239);
    static IDS: Ids = Ids::new([0x4e, 0xa1]);

    /// A second port held on 127.0.0.1 for the whole process: where tcp checks look when they
    /// must not find the service's listener.
    fn check_port() -> u16 {
        static PORT: OnceLock<(std::net::TcpListener, u16)> = OnceLock::new();
        PORT.get_or_init(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let p = l.local_addr().unwrap().port();
            (l, p)
        })
        .1
    }

    /// Dials directly, counting connections per address; an address in `redirect` is dialed at
    /// the address it maps to instead (a machine reachable only through the dialer).
    #[derive(Debug, Default)]
    struct CountingDialer {
        dials: Mutex<HashMap<SocketAddr, usize>>,
        redirect: Mutex<HashMap<SocketAddr, SocketAddr>>,
    }

    impl CountingDialer {
        fn dials(&self, addr: SocketAddr) -> usize {
            self.dials.lock().unwrap().get(&addr).copied().unwrap_or(0)
        }
    }

    impl Dialer for CountingDialer {
        fn dial(&self, addr: SocketAddr) -> DialFuture {
            *self.dials.lock().unwrap().entry(addr).or_default() += 1;
            let to = self.redirect.lock().unwrap().get(&addr).copied().unwrap_or(addr);
            DirectDialer.dial(to)
        }
        fn udp(&self, addr: SocketAddr) -> UdpFuture {
            DirectDialer.udp(addr)
        }
    }

    fn config() -> EdgeConfig {
        let mut c = EdgeConfig::new("test");
        c.connect_timeout = Duration::from_secs(1);
        c.queue_timeout = Duration::from_millis(300);
        c.idle_after = Duration::from_secs(3600);
        c.pool_idle_timeout = Duration::from_millis(500);
        c.header_read_timeout = Duration::from_millis(500);
        c
    }

    struct Harness {
        edge: Arc<Edge>,
        dialer: Arc<CountingDialer>,
        addr: SocketAddr,
        server: JoinHandle<()>,
        prober: JoinHandle<()>,
    }

    impl Harness {
        async fn new() -> Self {
            let dialer = Arc::new(CountingDialer::default());
            let edge = Edge::new(config(), Arc::new(NoControl), dialer.clone());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(edge.clone().serve_http(listener));
            let prober = tokio::spawn(edge.clone().run_checks());
            Self {
                edge,
                dialer,
                addr,
                server,
                prober,
            }
        }

        /// Which machine answered a request to app `a`.
        async fn who(&self) -> String {
            let r = self.get("/").await;
            assert_eq!(r.0, StatusCode::OK, "{r:?}");
            r.1
        }

        /// A request to app `a`: its status and the answering machine (empty when none did).
        async fn get(&self, path: &str) -> (StatusCode, String) {
            let tcp = TcpStream::connect(self.addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", "a.localhost")
                .body(Full::<Bytes>::default())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let machine = resp
                .headers()
                .get("x-machine")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            (status, machine)
        }

        /// Who answered `n` requests.
        async fn tally(&self, n: usize) -> HashMap<String, usize> {
            let mut per = HashMap::new();
            for _ in 0..n {
                *per.entry(self.who().await).or_default() += 1;
            }
            per
        }

        fn metric(&self, name: &str) -> u64 {
            metric(&self.edge.metrics_text(), name)
        }

        /// Waits until gauge `name` is `value`.
        async fn until_metric(&self, name: &str, value: u64) {
            until(&format!("{name} = {value}"), || self.metric(name) == value).await;
        }

        /// Waits until counter `name` reaches `value`.
        async fn until_count(&self, name: &str, value: u64) {
            until(&format!("{name} >= {value}"), || self.metric(name) >= value).await;
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        until_every(Duration::from_millis(5), what, cond).await;
    }

    fn ms(n: u64) -> aloft_api::Duration {
        aloft_api::Duration::from_millis(n)
    }

    /// A machine of app `a` with `check` on its service, its catalog saying that check passes
    /// (as its agent, checking from the host, would).
    fn entry_with(check: MachineServiceCheck, catalog: CheckState) -> CatalogEntry {
        let mut e = http_entry("a", IDS.next(), IPS.next());
        let kind = check.r#type.clone().unwrap_or_else(|| "tcp".to_owned());
        let port = check.port.unwrap_or(internal_port());
        e.services[0].checks = vec![check];
        e.checks = vec![CheckStatus {
            name: format!("servicecheck-00-{kind}-{port}"),
            status: catalog,
            output: String::new(),
            updated_at: String::new(),
        }];
        e
    }

    fn http_check(path: &str, grace_ms: u64) -> MachineServiceCheck {
        MachineServiceCheck {
            r#type: Some("http".to_owned()),
            path: Some(path.to_owned()),
            interval: Some(ms(100)),
            timeout: Some(ms(500)),
            grace_period: Some(ms(grace_ms)),
            ..MachineServiceCheck::default()
        }
    }

    fn tcp_check(port: u16) -> MachineServiceCheck {
        MachineServiceCheck {
            r#type: Some("tcp".to_owned()),
            port: Some(port),
            interval: Some(ms(100)),
            timeout: Some(ms(500)),
            grace_period: Some(ms(0)),
            ..MachineServiceCheck::default()
        }
    }

    fn addr_of(e: &CatalogEntry) -> SocketAddr {
        SocketAddr::new(e.private_ip.parse().unwrap(), internal_port())
    }

    /// Holds `/slow` requests until released; counts their arrivals.
    #[derive(Debug)]
    struct Gate {
        open: Semaphore,
        arrived: AtomicUsize,
    }

    impl Default for Gate {
        fn default() -> Self {
            Self {
                open: Semaphore::new(0),
                arrived: AtomicUsize::new(0),
            }
        }
    }

    /// A machine named `name`: `/health` answers `health`'s status, `/slow` waits at `gate`,
    /// anything else 200.
    fn machine(name: &str, health: Arc<AtomicU16>, gate: Arc<Gate>) -> Handler {
        let name = name.to_owned();
        Arc::new(move |req| {
            let name = name.clone();
            let (health, gate) = (health.clone(), gate.clone());
            Box::pin(async move {
                let status = match req.uri().path() {
                    "/health" => health.load(Ordering::SeqCst),
                    "/slow" => {
                        gate.arrived.fetch_add(1, Ordering::SeqCst);
                        gate.open.acquire().await.unwrap().forget();
                        200
                    }
                    _ => 200,
                };
                Response::builder()
                    .status(status)
                    .header("x-machine", name.as_str())
                    .body(body(name.clone()))
                    .unwrap()
            })
        })
    }

    /// A healthy machine serving `name`.
    fn serve(e: &CatalogEntry, name: &str) -> Backend {
        let health = Arc::new(AtomicU16::new(200));
        serve_backend(addr_of(e), machine(name, health, Arc::default()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_failing_the_edges_http_check_gets_nothing_until_it_recovers() {
        let h = Harness::new().await;
        let good = entry_with(http_check("/health", 0), CheckState::Passing);
        let sick = entry_with(http_check("/health", 0), CheckState::Passing);
        let _good = serve(&good, "good");
        let sick_health = Arc::new(AtomicU16::new(200));
        let gate = Arc::new(Gate::default());
        let _sick = serve_backend(addr_of(&sick), machine("sick", sick_health.clone(), gate.clone()));
        h.edge.routes().upsert(good.clone());
        h.edge.routes().upsert(sick.clone());
        h.until_count("aloft_edge_health_checks_count{result=\"passing\"}", 2)
            .await;
        // Both serve while healthy.
        let per = h.tally(16).await;
        assert!(per.get("sick").is_some_and(|n| *n > 0), "{per:?}");
        // A request in flight on the machine when it turns unhealthy.
        let held = {
            let addr = h.addr;
            let sick = sick.clone();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let req = Request::get("/slow")
                    .header("host", "a.localhost")
                    .header("fly-force-instance-id", sick.id.to_string())
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                (status, resp.into_body().collect().await.unwrap().to_bytes())
            })
        };
        until("the slow request reached the machine", || {
            gate.arrived.load(Ordering::SeqCst) == 1
        })
        .await;
        // Its http check answers 500: the catalog still says passing, the edge knows better.
        sick_health.store(500, Ordering::SeqCst);
        h.until_metric("aloft_edge_unhealthy_machines", 1).await;
        assert!(h.metric("aloft_edge_health_checks_count{result=\"critical\"}") >= 1);
        // The request it was serving finishes.
        gate.open.add_permits(1);
        let (status, got) = held.await.unwrap();
        assert_eq!((status, &got[..]), (StatusCode::OK, &b"sick"[..]));
        // New ones go elsewhere.
        let per = h.tally(12).await;
        assert_eq!(per.get("good"), Some(&12), "{per:?}");
        // Recovered: it serves again.
        sick_health.store(200, Ordering::SeqCst);
        h.until_metric("aloft_edge_unhealthy_machines", 0).await;
        let per = h.tally(16).await;
        assert!(per.get("sick").is_some_and(|n| *n > 0), "{per:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_tcp_check_takes_the_machine_out_until_something_listens() {
        let h = Harness::new().await;
        let good = entry_with(tcp_check(internal_port()), CheckState::Passing);
        // Its service listens; its check's port does not.
        let refusing = entry_with(tcp_check(check_port()), CheckState::Passing);
        let _good = serve(&good, "good");
        let _refusing = serve(&refusing, "refusing");
        h.edge.routes().upsert(good.clone());
        h.edge.routes().upsert(refusing.clone());
        h.until_metric("aloft_edge_unhealthy_machines", 1).await;
        let per = h.tally(10).await;
        assert_eq!(per.get("good"), Some(&10), "{per:?}");
        // Something listens on the check's port: it passes, the machine serves.
        let check_addr = SocketAddr::new(refusing.private_ip.parse().unwrap(), check_port());
        let _listening = std::net::TcpListener::bind(check_addr).unwrap();
        h.until_metric("aloft_edge_unhealthy_machines", 0).await;
        let per = h.tally(16).await;
        assert!(per.get("refusing").is_some_and(|n| *n > 0), "{per:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_catalog_stands_in_until_the_grace_period_ends_and_undecided_ranks_last() {
        let h = Harness::new().await;
        // Decided at once (grace 0), passing.
        let steady = entry_with(http_check("/health", 0), CheckState::Passing);
        // The agent never decided (its status stays a warning); the edge's check passes once
        // its grace period is over.
        let late = entry_with(http_check("/health", 1500), CheckState::Warning);
        let _steady = serve(&steady, "steady");
        let _late = serve(&late, "late");
        h.edge.routes().upsert(steady.clone());
        let t0 = Instant::now();
        h.edge.routes().upsert(late.clone());
        h.until_count("aloft_edge_health_checks_count{result=\"passing\"}", 1)
            .await;
        // In its grace period: undecided, ranked after the decided machine…
        let per = h.tally(6).await;
        assert_eq!(per.get("steady"), Some(&6), "{per:?}");
        // …but not out: with the other one cordoned, it serves (no request is lost).
        h.edge.routes().set_cordoned("a", &steady.id, true);
        let per = h.tally(4).await;
        assert_eq!(per.get("late"), Some(&4), "{per:?}");
        h.edge.routes().set_cordoned("a", &steady.id, false);
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "too slow to test the grace period"
        );
        // After the grace period the edge's passing verdict governs: both share the load.
        tokio::time::sleep_until((t0 + Duration::from_millis(1900)).into()).await;
        let per = h.tally(16).await;
        assert!(per.get("late").is_some_and(|n| *n > 0), "{per:?}");
        // The catalog says critical, the edge has no result yet (grace): the catalog governs.
        let third = entry_with(http_check("/health", 1500), CheckState::Critical);
        let _third = serve(&third, "third");
        h.edge.routes().upsert(third.clone());
        let per = h.tally(6).await;
        assert!(!per.contains_key("third"), "{per:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn machines_that_stop_or_leave_are_no_longer_probed_and_the_prober_ends_with_the_edge() {
        let h = Harness::new().await;
        let m = entry_with(tcp_check(internal_port()), CheckState::Passing);
        let _m = serve(&m, "m");
        let addr = addr_of(&m);
        h.edge.routes().upsert(m.clone());
        h.until_metric("aloft_edge_health_checked_machines", 1).await;
        until("probed twice", || h.dialer.dials(addr) >= 2).await;
        // Stopped: forgotten.
        let mut stopped = m.clone();
        stopped.state = MachineState::Stopped;
        h.edge.routes().upsert(stopped);
        h.until_metric("aloft_edge_health_checked_machines", 0).await;
        h.until_metric("aloft_edge_health_checks_inflight", 0).await;
        let before = h.dialer.dials(addr);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(h.dialer.dials(addr), before, "a stopped machine is still probed");
        // Started again, then gone from the table: probed, then forgotten.
        h.edge.routes().upsert(m.clone());
        until("probed again", || h.dialer.dials(addr) > before).await;
        assert_eq!(h.metric("aloft_edge_health_checked_machines"), 1);
        h.edge.routes().remove("a", &m.id);
        h.until_metric("aloft_edge_health_checked_machines", 0).await;
        h.until_metric("aloft_edge_health_checks_inflight", 0).await;
        let after = h.dialer.dials(addr);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(h.dialer.dials(addr), after, "a removed machine is still probed");
        // The edge goes away: so does its prober.
        let Harness {
            edge, server, prober, ..
        } = h;
        server.abort();
        let _ = server.await;
        drop(edge);
        tokio::time::timeout(Duration::from_secs(2), prober)
            .await
            .expect("the prober outlived the edge")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_version_starts_its_checks_over() {
        let h = Harness::new().await;
        // The catalog says critical; the edge's check passes after a 700 ms grace period.
        let m = entry_with(http_check("/health", 700), CheckState::Critical);
        let _m = serve(&m, "m");
        h.edge.routes().upsert(m.clone());
        assert_eq!(h.get("/").await.0, StatusCode::SERVICE_UNAVAILABLE);
        h.until_count("aloft_edge_health_checks_count{result=\"passing\"}", 1)
            .await;
        assert_eq!(h.who().await, "m");
        // Updated (a new version, the same address): the edge's verdict was about the old one;
        // until its new grace period ends the catalog's critical status stands in again.
        let mut v2 = m.clone();
        v2.version = "v2".to_owned();
        let t0 = Instant::now();
        h.edge.routes().upsert(v2);
        let (status, _) = h.get("/").await;
        assert!(
            t0.elapsed() < Duration::from_millis(700),
            "too slow to test the grace period"
        );
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let passing = h.metric("aloft_edge_health_checks_count{result=\"passing\"}");
        h.until_count("aloft_edge_health_checks_count{result=\"passing\"}", passing + 1)
            .await;
        assert!(
            t0.elapsed() >= Duration::from_millis(700),
            "checked within the grace period"
        );
        assert_eq!(h.who().await, "m");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_go_through_the_dialer() {
        let h = Harness::new().await;
        let m = entry_with(http_check("/health", 0), CheckState::Critical);
        // The machine's address has nothing listening: only the dialer knows where it is.
        let elsewhere = IPS.next();
        let _m = serve_backend(
            SocketAddr::new(elsewhere, internal_port()),
            machine("m", Arc::new(AtomicU16::new(200)), Arc::default()),
        );
        h.dialer
            .redirect
            .lock()
            .unwrap()
            .insert(addr_of(&m), SocketAddr::new(elsewhere, internal_port()));
        h.edge.routes().upsert(m.clone());
        // The catalog says critical; the edge's check, through the dialer, passes and governs.
        h.until_count("aloft_edge_health_checks_count{result=\"passing\"}", 1)
            .await;
        assert!(h.dialer.dials(addr_of(&m)) >= 1);
        assert_eq!(h.metric("aloft_edge_unhealthy_machines"), 0);
        assert_eq!(h.who().await, "m");
    }
}
