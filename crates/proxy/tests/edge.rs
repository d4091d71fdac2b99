//! In-process tests of the edge proxy through its public API: an [`Edge`] serving plain HTTP on a
//! loopback port, fake machines (small hyper or raw tokio servers, each on its own loopback
//! address, 127.0.x.y, with one internal port per test process) routed through
//! `edge.routes()`, and a fake [`MachineControl`] that binds a machine's server on `start` and
//! closes it on `stop`/`suspend`, publishing the new state into the routing table as an agent
//! would.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::net::{IpAddr, SocketAddr};
    use std::num::NonZeroUsize;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use aloft_api::{
        Autostop, CatalogEntry, CheckState, CheckStatus, HeaderValue as RuleValue, HttpOptions,
        HttpResponseOptions, MachineId, MachinePort, MachineServiceConcurrency, MachineState,
    };
    use aloft_proxy::{
        ControlError, ControlFuture, DialFuture, Dialer, DirectDialer, Edge, EdgeConfig, MachineControl,
        RoutingTable, UdpFuture, WorkerThreads,
    };
    use bytes::Bytes;
    use http::{HeaderMap, Request, Response, StatusCode, Version};
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Frame, Incoming};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Semaphore, mpsc};
    use tokio::task::JoinHandle;

    use crate::common::{
        Backend, BackendBody, Handler, Ids, Loopback, body, http_entry, metric, serve_backend, until_every,
    };

    // -----------------------------------------------------------------------------------------
    // Addresses and ids.

    /// This file's machines: 127.0.1–199.y.
    static IPS: Loopback = Loopback::new(1, 199);
    static IDS: Ids = Ids::new([0xab, 0xcd]);

    fn next_ip() -> IpAddr {
        IPS.next()
    }

    fn next_id() -> MachineId {
        IDS.next()
    }

    // -----------------------------------------------------------------------------------------
    // Fake machines.

    /// What an echo machine saw, as JSON.
    async fn echo_of(name: &str, req: Request<Incoming>) -> Response<BackendBody> {
        let (parts, incoming) = req.into_parts();
        let got = incoming.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in &parts.headers {
            headers
                .entry(k.as_str().to_owned())
                .or_default()
                .push(v.to_str().unwrap_or("?").to_owned());
        }
        let seen = json!({
            "machine": name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&got),
        });
        Response::builder()
            .header("x-machine", name)
            .header("content-type", "application/json")
            .body(body(seen.to_string()))
            .unwrap()
    }

    /// A machine that answers what it saw.
    fn echo(name: &str) -> Handler {
        let name = name.to_owned();
        Arc::new(move |req| {
            let name = name.clone();
            Box::pin(async move { echo_of(&name, req).await })
        })
    }

    /// Holds requests until released; counts arrivals.
    #[derive(Debug)]
    struct Gate {
        open: Semaphore,
        arrived: AtomicUsize,
    }

    impl Gate {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                open: Semaphore::new(0),
                arrived: AtomicUsize::new(0),
            })
        }
        fn release(&self, n: usize) {
            self.open.add_permits(n);
        }
        fn arrived(&self) -> usize {
            self.arrived.load(Ordering::SeqCst)
        }
    }

    /// An echo machine whose answers wait at `gate`.
    fn held(name: &str, gate: &Arc<Gate>) -> Handler {
        let name = name.to_owned();
        let gate = gate.clone();
        Arc::new(move |req| {
            let name = name.clone();
            let gate = gate.clone();
            Box::pin(async move {
                gate.arrived.fetch_add(1, Ordering::SeqCst);
                gate.open.acquire().await.unwrap().forget();
                echo_of(&name, req).await
            })
        })
    }

    /// A machine answering with a fixed status and headers.
    fn answer(name: &str, status: u16, headers: &[(&str, &str)], text: &str) -> Handler {
        let name = name.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let text = text.to_owned();
        Arc::new(move |_req| {
            let mut b = Response::builder()
                .status(status)
                .header("x-machine", name.as_str());
            for (k, v) in &headers {
                b = b.header(k.as_str(), v.as_str());
            }
            let r = b.body(body(text.clone())).unwrap();
            Box::pin(async move { r })
        })
    }

    // -----------------------------------------------------------------------------------------
    // The fake MachineControl.

    #[derive(Default)]
    struct FakeMachine {
        entry: Option<CatalogEntry>,
        handler: Option<Handler>,
        backend: Option<Backend>,
    }

    #[derive(Default)]
    struct ControlInner {
        table: OnceLock<Arc<RoutingTable>>,
        machines: Mutex<HashMap<MachineId, FakeMachine>>,
        calls: Mutex<Vec<String>>,
        fail_suspend: AtomicBool,
        fail_start: AtomicBool,
        /// Starts refused (the host still suspending the machine) before one is taken.
        refuse_starts: AtomicU32,
        start_delay_ms: AtomicU64,
        /// `start` publishes the machine `starting` (a newer entry) while its server already
        /// runs, as an agent whose start operation is still finishing does.
        publish_starting: AtomicBool,
    }

    /// Records calls; `start` binds the machine's server and publishes it started, `stop` and
    /// `suspend` close it and publish it stopped or suspended.
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

        fn add(&self, entry: &CatalogEntry, handler: Handler) {
            let backend = (entry.state == MachineState::Started)
                .then(|| serve_backend(addr_of(entry), handler.clone()));
            self.0.machines.lock().unwrap().insert(
                entry.id.clone(),
                FakeMachine {
                    entry: Some(entry.clone()),
                    handler: Some(handler),
                    backend,
                },
            );
            self.0.table.get().unwrap().upsert(entry.clone());
        }

        /// Moves a machine to `state`, binding or closing its server.
        fn set_state(&self, id: &MachineId, state: MachineState) -> Option<CatalogEntry> {
            let mut map = self.0.machines.lock().unwrap();
            let m = map.get_mut(id)?;
            let entry = m.entry.as_mut()?;
            entry.state = state;
            if state == MachineState::Started {
                if m.backend.is_none() {
                    m.backend = Some(serve_backend(addr_of(entry), m.handler.clone()?));
                }
            } else {
                m.backend = None;
            }
            Some(entry.clone())
        }

        fn change(&self, op: &'static str, id: &MachineId, state: MachineState) -> ControlFuture {
            self.0.calls.lock().unwrap().push(format!("{op} {id}"));
            let me = self.clone();
            let id = id.clone();
            Box::pin(async move {
                if op == "suspend" && me.0.fail_suspend.load(Ordering::SeqCst) {
                    return Err(ControlError::Failed(
                        "this machine cannot be suspended".to_owned(),
                    ));
                }
                if op == "start" && me.0.fail_start.load(Ordering::SeqCst) {
                    return Err(ControlError::Failed("the host is out of memory".to_owned()));
                }
                if op == "start"
                    && me
                        .0
                        .refuse_starts
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return Err(ControlError::Refused(format!("machine {id} is suspending")));
                }
                let delay = me.0.start_delay_ms.load(Ordering::SeqCst);
                if op == "start" && delay > 0 {
                    // The machine boots for a while.
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let mut entry = me
                    .set_state(&id, state)
                    .ok_or_else(|| ControlError::Refused(format!("no machine {id}")))?;
                if op == "start" && me.0.publish_starting.load(Ordering::SeqCst) {
                    entry.state = MachineState::Starting;
                    entry.updated_at += 1;
                }
                me.0.table.get().unwrap().upsert(entry);
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

    fn addr_of(e: &CatalogEntry) -> SocketAddr {
        let port = e.services.first().and_then(|s| s.internal_port).unwrap();
        SocketAddr::new(e.private_ip.parse().unwrap(), port)
    }

    // -----------------------------------------------------------------------------------------
    // The edge under test.

    fn config() -> EdgeConfig {
        let mut c = EdgeConfig::new("test");
        c.connect_timeout = Duration::from_secs(1);
        c.queue_timeout = Duration::from_millis(300);
        c.wake_timeout = Duration::from_secs(5);
        c.idle_after = Duration::ZERO;
        c.pool_idle_timeout = Duration::from_millis(500);
        c.header_read_timeout = Duration::from_millis(500);
        c
    }

    struct Harness {
        edge: Arc<Edge>,
        addr: SocketAddr,
        control: FakeControl,
        _server: JoinHandle<()>,
    }

    impl Harness {
        async fn new(config: EdgeConfig) -> Self {
            Self::with_dialer(config, Arc::new(DirectDialer)).await
        }

        async fn with_dialer(config: EdgeConfig, dialer: Arc<dyn Dialer>) -> Self {
            let control = FakeControl::default();
            let edge = Edge::new(config, Arc::new(control.clone()), dialer);
            let _ = control.0.table.set(edge.routes().clone());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(edge.clone().serve_http(listener));
            Self {
                edge,
                addr,
                control,
                _server: server,
            }
        }

        /// Publishes a machine (its server runs when the entry says started).
        fn add(&self, entry: &CatalogEntry, handler: Handler) {
            self.control.add(entry, handler);
        }

        async fn get(&self, host: &str, path: &str) -> Resp {
            self.send(
                Request::get(path)
                    .header("host", host)
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        }

        async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
            send(self.addr, req).await.unwrap()
        }
    }

    /// A started machine of `app` with one `http` service on public port 80.
    fn entry(app: &str) -> CatalogEntry {
        http_entry(app, next_id(), next_ip())
    }

    fn with_limits(mut e: CatalogEntry, soft: u32, hard: u32) -> CatalogEntry {
        e.services[0].concurrency = Some(MachineServiceConcurrency {
            soft_limit: Some(soft),
            hard_limit: Some(hard),
            r#type: Some("requests".to_owned()),
        });
        e
    }

    // -----------------------------------------------------------------------------------------
    // Clients.

    #[derive(Debug)]
    struct Resp {
        status: StatusCode,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }
        fn machine(&self) -> &str {
            self.header("x-machine")
                .unwrap_or_else(|| panic!("not a machine's answer: {self:?}"))
        }
        fn code(&self) -> Option<&str> {
            self.header("fly-proxy-error-code")
        }
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
        }
        /// The first value of a request header the echo machine saw.
        fn seen(&self, name: &str) -> Option<String> {
            self.json()["headers"][name][0].as_str().map(str::to_owned)
        }
    }

    /// One HTTP/1.1 request on a new connection.
    async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Resp, hyper::Error> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        let (parts, incoming) = resp.into_parts();
        let body = incoming.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    /// Polls `cond` until it holds (5 s at most).
    async fn until(what: &str, cond: impl Fn() -> bool) {
        until_every(Duration::from_millis(2), what, cond).await;
    }

    /// Reads a raw HTTP/1.1 response head.
    async fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    /// Reads a raw HTTP/1.1 response with a Content-Length body; its head.
    async fn read_response(s: &mut TcpStream) -> String {
        let head = read_head(s).await;
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        head
    }

    /// Whether the proxy closes `s` within `within` (reading and discarding what it sends).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let read_all = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read_all).await.is_ok()
    }

    // -----------------------------------------------------------------------------------------
    // 1. Routing by Host.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_are_routed_by_host_and_custom_domain() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let b = entry("b");
        h.add(&a, echo("a1"));
        h.add(&b, echo("b1"));
        h.edge.routes().set_domain("www.example.com", Some("b"));

        assert_eq!(h.get("a.localhost", "/").await.machine(), "a1");
        assert_eq!(h.get("b.localhost", "/").await.machine(), "b1");
        assert_eq!(
            h.get("A.LOCALHOST:8080", "/").await.machine(),
            "a1",
            "case and port ignored"
        );
        assert_eq!(h.get("www.example.com", "/").await.machine(), "b1");

        for host in ["c.localhost", "localhost", "x.a.localhost", "other.example.com"] {
            let r = h.get(host, "/").await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{host}");
            assert_eq!(r.code(), Some("PR04"), "{host}");
        }
        h.edge.routes().set_domain("www.example.com", None);
        assert_eq!(h.get("www.example.com", "/").await.code(), Some("PR04"));
    }

    // -----------------------------------------------------------------------------------------
    // 2. Headers.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_carry_fly_headers_and_lose_hop_by_hop_ones() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        h.add(&a, echo("a1"));
        let req = Request::get("/x?y=1")
            .header("host", "a.localhost")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.1")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("fly-client-ip", "6.6.6.6")
            .header("fly-replay-src", "instance=00000000000000;region=x")
            .header("fly-replay-failed", "reason=timeout")
            .header("x-custom", "kept")
            .body(Full::default())
            .unwrap();
        let r = h.send(req).await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = |n: &str| r.seen(n);
        assert_eq!(
            seen("fly-client-ip").as_deref(),
            Some("127.0.0.1"),
            "a client cannot forge it"
        );
        assert_eq!(
            seen("x-forwarded-for").as_deref(),
            Some("203.0.113.7, 198.51.100.1, 127.0.0.1")
        );
        assert_eq!(seen("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(seen("x-forwarded-port").as_deref(), Some("80"));
        assert_eq!(seen("x-forwarded-ssl").as_deref(), Some("off"));
        assert_eq!(seen("fly-forwarded-port").as_deref(), Some("80"));
        assert_eq!(seen("fly-region").as_deref(), Some("test"));
        assert_eq!(seen("via").as_deref(), Some("1.1 aloft"));
        assert_eq!(seen("host").as_deref(), Some("a.localhost"));
        assert_eq!(seen("x-custom").as_deref(), Some("kept"));
        assert_eq!(r.json()["uri"], "/x?y=1");
        for hop in ["x-private", "keep-alive", "proxy-connection"] {
            assert_eq!(seen(hop), None, "{hop} was forwarded");
        }
        for forged in ["fly-replay-src", "fly-replay-failed"] {
            assert_eq!(seen(forged), None, "a client's {forged} reached the app");
        }
        let rid = seen("fly-request-id").unwrap();
        // Milliseconds since the epoch (12 hex digits) and a sequence number (8), then the region.
        let (id, region) = rid.split_once('-').unwrap();
        assert_eq!(region, "test", "{rid}");
        assert_eq!(id.len(), 20, "{rid}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{rid}"
        );
        let ms = u64::from_str_radix(&id[..12], 16).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(
            now.abs_diff(u128::from(ms)) < 60_000,
            "{rid} is not now ({now} ms)"
        );
        // The response names the proxy and the same request id.
        assert_eq!(r.header("server"), Some("aloft"));
        assert_eq!(r.header("via"), Some("1.1 aloft"));
        assert_eq!(r.header("fly-request-id"), Some(rid.as_str()));
        // Each request gets its own id.
        let r2 = h.get("a.localhost", "/").await;
        assert_ne!(r2.header("fly-request-id"), Some(rid.as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn response_headers_follow_http_options() {
        let h = Harness::new(config()).await;
        let mut rules = std::collections::BTreeMap::new();
        rules.insert("x-added".to_owned(), RuleValue::One("yes".to_owned()));
        rules.insert(
            "x-many".to_owned(),
            RuleValue::Many(vec!["1".to_owned(), "2".to_owned()]),
        );
        rules.insert("x-remove-me".to_owned(), RuleValue::Bool(false));
        let mut a = entry("a");
        a.services[0].ports[0].http_options = Some(HttpOptions {
            response: Some(HttpResponseOptions {
                headers: rules,
                pristine: None,
            }),
            ..HttpOptions::default()
        });
        h.add(
            &a,
            answer("a1", 200, &[("x-remove-me", "1"), ("x-kept", "1")], "hi"),
        );
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-added"), Some("yes"));
        let many: Vec<_> = r
            .headers
            .get_all("x-many")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(many, ["1", "2"]);
        assert_eq!(r.header("x-remove-me"), None);
        assert_eq!(r.header("x-kept"), Some("1"));
        assert_eq!(r.header("server"), Some("aloft"));

        let mut p = entry("p");
        p.services[0].ports[0].http_options = Some(HttpOptions {
            response: Some(HttpResponseOptions {
                headers: std::collections::BTreeMap::new(),
                pristine: Some(true),
            }),
            ..HttpOptions::default()
        });
        h.add(&p, answer("p1", 200, &[("server", "gunicorn")], "hi"));
        let r = h.get("p.localhost", "/").await;
        assert_eq!(r.machine(), "p1");
        for name in ["via", "fly-request-id"] {
            assert_eq!(r.header(name), None, "pristine response has {name}");
        }
        assert_eq!(
            r.header("server"),
            Some("gunicorn"),
            "pristine keeps the machine's"
        );

        // Pristine with edits: the machine's Server stays too.
        let mut q = entry("q");
        let mut edits = std::collections::BTreeMap::new();
        edits.insert("x-added".to_owned(), RuleValue::One("yes".to_owned()));
        q.services[0].ports[0].http_options = Some(HttpOptions {
            response: Some(HttpResponseOptions {
                headers: edits,
                pristine: Some(true),
            }),
            ..HttpOptions::default()
        });
        h.add(&q, answer("q1", 200, &[("server", "gunicorn")], "hi"));
        let r = h.get("q.localhost", "/").await;
        assert_eq!(r.header("x-added"), Some("yes"));
        assert_eq!(r.header("via"), None);
        assert_eq!(
            r.header("server"),
            Some("gunicorn"),
            "pristine with edits keeps the machine's"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machines_fields_pass_on_with_the_edges_own() {
        let h = Harness::new(config()).await;
        let fields = [
            ("server", "gunicorn"),
            ("x-kept", "1"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("cache-control", "max-age=60"),
        ];
        h.add(&entry("b"), answer("b1", 200, &fields, "hello"));
        h.add(&entry("v"), answer("v1", 200, &[("via", "1.0 cache")], "hi"));
        // Over HTTP/1.1 and HTTP/2 alike.
        let h1 = h.get("b.localhost", "/").await;
        let h2 = send_h2(
            h.addr,
            Request::get("http://b.localhost/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        for r in [h1, h2] {
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(r.machine(), "b1");
            assert_eq!(r.header("x-kept"), Some("1"));
            assert_eq!(r.header("cache-control"), Some("max-age=60"));
            let cookies: Vec<_> = r
                .headers
                .get_all("set-cookie")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(cookies, ["a=1", "b=2"]);
            // The edge's own replace the machine's.
            assert_eq!(r.headers.get_all("server").iter().count(), 1);
            assert_eq!(r.header("server"), Some("aloft"));
            assert_eq!(r.header("via"), Some("1.1 aloft"));
            assert!(r.header("fly-request-id").is_some());
            assert!(r.header("date").is_some());
            assert_eq!(r.header("content-length"), Some("5"));
            assert_eq!(&r.body[..], b"hello");
        }
        // A machine's Via is kept, the edge's token after it.
        let r = h.get("v.localhost", "/").await;
        assert_eq!(r.header("via"), Some("1.0 cache, 1.1 aloft"));
    }

    // -----------------------------------------------------------------------------------------
    // 3. Balancing.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_go_to_the_least_loaded_machine() {
        let h = Arc::new(Harness::new(config()).await);
        let gate = Gate::new();
        let (m1, m2) = (entry("a"), entry("a"));
        h.add(&m1, held("m1", &gate));
        h.add(&m2, held("m2", &gate));
        let mut pending = Vec::new();
        for i in 1..=4 {
            let h2 = h.clone();
            pending.push(tokio::spawn(async move { h2.get("a.localhost", "/").await }));
            until("the request reached a machine", || gate.arrived() == i).await;
        }
        gate.release(4);
        let mut per: HashMap<String, usize> = HashMap::new();
        for p in pending {
            let r = p.await.unwrap();
            *per.entry(r.machine().to_owned()).or_default() += 1;
        }
        assert_eq!(per.get("m1"), Some(&2), "{per:?}");
        assert_eq!(per.get("m2"), Some(&2), "{per:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cordoned_and_failing_machines_get_nothing() {
        let h = Harness::new(config()).await;
        let good = entry("a");
        let cordoned = entry("a");
        let mut failing = entry("a");
        failing.checks = vec![CheckStatus {
            name: "servicecheck-00-tcp-8080".to_owned(),
            status: CheckState::Critical,
            output: "connection refused".to_owned(),
            updated_at: String::new(),
        }];
        h.add(&good, echo("good"));
        h.add(&cordoned, echo("cordoned"));
        h.add(&failing, echo("failing"));
        h.edge.routes().set_cordoned("a", &cordoned.id, true);
        for _ in 0..8 {
            assert_eq!(h.get("a.localhost", "/").await.machine(), "good");
        }
        h.edge.routes().set_cordoned("a", &good.id, true);
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.code(), Some("PR01"));
        // Uncordoned, it serves again.
        h.edge.routes().set_cordoned("a", &cordoned.id, false);
        assert_eq!(h.get("a.localhost", "/").await.machine(), "cordoned");
    }

    // -----------------------------------------------------------------------------------------
    // 4. Limits.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_hard_limit_a_request_waits_for_capacity() {
        let mut c = config();
        c.queue_timeout = Duration::from_secs(3);
        let h = Arc::new(Harness::new(c).await);
        let gate = Gate::new();
        let m = with_limits(entry("a"), 1, 1);
        h.add(&m, held("m1", &gate));
        let h1 = h.clone();
        let first = tokio::spawn(async move { h1.get("a.localhost", "/1").await });
        until("the first request is served", || gate.arrived() == 1).await;
        let h2 = h.clone();
        let second = tokio::spawn(async move { h2.get("a.localhost", "/2").await });
        // The second waits in the queue: the machine does not see it while the first is held.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(gate.arrived(), 1, "the hard limit let a second request through");
        assert!(!second.is_finished());
        gate.release(2);
        let r1 = first.await.unwrap();
        let r2 = second.await.unwrap();
        assert_eq!((r1.status, r2.status), (StatusCode::OK, StatusCode::OK));
        assert_eq!(r2.json()["uri"], "/2");
        assert_eq!(gate.arrived(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_app_answers_pl01_after_the_queue_timeout() {
        let h = Arc::new(Harness::new(config()).await);
        let gate = Gate::new();
        let m = with_limits(entry("a"), 1, 1);
        h.add(&m, held("m1", &gate));
        let h1 = h.clone();
        let first = tokio::spawn(async move { h1.get("a.localhost", "/").await });
        until("the first request is served", || gate.arrived() == 1).await;
        let started = Instant::now();
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.code(), Some("PL01"));
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        gate.release(1);
        assert_eq!(first.await.unwrap().status, StatusCode::OK);
        // Capacity is back.
        gate.release(1);
        assert_eq!(h.get("a.localhost", "/").await.status, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_soft_limit_a_stopped_machine_is_woken() {
        let h = Arc::new(Harness::new(config()).await);
        let gate = Gate::new();
        let running = with_limits(entry("a"), 1, 5);
        let mut sleeping = with_limits(entry("a"), 1, 5);
        sleeping.state = MachineState::Stopped;
        sleeping.services[0].autostart = Some(true);
        h.add(&running, held("running", &gate));
        h.add(&sleeping, echo("sleeping"));
        let h1 = h.clone();
        let first = tokio::spawn(async move { h1.get("a.localhost", "/").await });
        until("the first request is served", || gate.arrived() == 1).await;
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.machine(), "sleeping");
        assert_eq!(h.control.calls(), [format!("start {}", sleeping.id)]);
        gate.release(1);
        assert_eq!(first.await.unwrap().machine(), "running");
    }

    /// Dials like [`DirectDialer`], but every TCP connect completes only `delay` after it was
    /// asked for: a resumed guest under TCG answers its first SYNs that late.
    #[derive(Debug)]
    struct SlowDialer {
        delay: Duration,
        dials: AtomicUsize,
    }

    impl Dialer for SlowDialer {
        fn dial(&self, addr: SocketAddr) -> DialFuture {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                DirectDialer.dial(addr).await
            })
        }
        fn udp(&self, addr: SocketAddr) -> UdpFuture {
            DirectDialer.udp(addr)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_woken_machine_slow_to_answer_its_first_syn_is_reached_without_waiting_for_later_ones() {
        let dialer = Arc::new(SlowDialer {
            delay: Duration::from_millis(150),
            dials: AtomicUsize::new(0),
        });
        let h = Harness::with_dialer(config(), dialer.clone()).await;
        let mut m = entry("a");
        m.state = MachineState::Stopped;
        h.add(&m, echo("m1"));
        let started = Instant::now();
        let r = h.get("a.localhost", "/").await;
        let took = started.elapsed();
        assert_eq!(r.machine(), "m1", "{r:?}");
        // The first attempt connects after 150 ms and carries the request: an edge that gave up
        // attempts after 25–100 ms never connected at all (PM03 after wake_timeout).
        assert!(took < Duration::from_millis(1500), "the wake took {took:?}");
        assert!(
            dialer.dials.load(Ordering::SeqCst) <= 40,
            "attempts are bounded: {}",
            dialer.dials.load(Ordering::SeqCst)
        );
    }

    // -----------------------------------------------------------------------------------------
    // 5. Retries.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusing_machine_is_retried_elsewhere() {
        let h = Harness::new(config()).await;
        let refusing = entry("a");
        let working = entry("a");
        // Published as started, but nothing listens at its address.
        h.edge.routes().upsert(refusing.clone());
        h.add(&working, echo("working"));
        for _ in 0..6 {
            let r = h.get("a.localhost", "/").await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(r.machine(), "working");
        }
        // A POST with a small body is retried with its body.
        let r = h
            .send(
                Request::post("/p")
                    .header("host", "a.localhost")
                    .body(Full::new(Bytes::from_static(b"payload")))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.json()["body"], "payload");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_app_whose_only_machine_refuses_gets_pc01() {
        let h = Harness::new(config()).await;
        h.edge.routes().upsert(entry("a"));
        for _ in 0..3 {
            let r = h.get("a.localhost", "/").await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{r:?}");
            assert_eq!(r.code(), Some("PC01"), "{r:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // 6. Autostart and autostop.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_machine_is_started_once_by_concurrent_first_requests() {
        let h = Arc::new(Harness::new(config()).await);
        h.control.0.start_delay_ms.store(150, Ordering::SeqCst);
        let mut m = entry("a");
        m.state = MachineState::Stopped;
        h.add(&m, echo("m1"));
        let mut pending = Vec::new();
        for i in 0..6 {
            let h2 = h.clone();
            pending.push(tokio::spawn(async move {
                h2.get("a.localhost", &format!("/{i}")).await
            }));
        }
        for p in pending {
            let r = p.await.unwrap();
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(r.machine(), "m1");
        }
        assert_eq!(h.control.calls(), [format!("start {}", m.id)]);
        // Started now: no further start.
        assert_eq!(h.get("a.localhost", "/").await.machine(), "m1");
        assert_eq!(h.control.calls().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_woken_machine_the_catalog_still_calls_starting_is_not_started_twice() {
        let h = Harness::new(config()).await;
        h.control.0.publish_starting.store(true, Ordering::SeqCst);
        let mut m = entry("a");
        m.state = MachineState::Suspended;
        h.add(&m, echo("m1"));
        for _ in 0..3 {
            let r = h.get("a.localhost", "/").await;
            assert_eq!(r.machine(), "m1", "{r:?}");
        }
        assert_eq!(
            h.control.calls(),
            [format!("start {}", m.id)],
            "the edge connected to the machine: `starting` in the catalog is the agent finishing \
             its start, not a reason to start it again"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_refused_while_the_machine_suspends_is_asked_again_until_taken() {
        let h = Harness::new(config()).await;
        h.control.0.refuse_starts.store(4, Ordering::SeqCst);
        let mut m = entry("a");
        m.state = MachineState::Suspended;
        h.add(&m, echo("m1"));
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "m1");
        assert_eq!(
            h.control.calls(),
            vec![format!("start {}", m.id); 5],
            "four refusals, then the start the host took"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_suspended_again_after_a_wake_is_woken_again() {
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.state = MachineState::Stopped;
        h.add(&m, echo("m1"));
        assert_eq!(h.get("a.localhost", "/").await.status, StatusCode::OK);
        // Suspended by someone else (the API), and the agent publishes it: a newer entry.
        let mut e = h.control.set_state(&m.id, MachineState::Suspended).unwrap();
        e.updated_at += 1;
        h.control.0.table.get().unwrap().upsert(e);
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "m1");
        assert_eq!(
            h.control.calls(),
            [format!("start {}", m.id), format!("start {}", m.id)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostart_false_leaves_a_stopped_machine_alone() {
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.state = MachineState::Stopped;
        m.services[0].autostart = Some(false);
        h.add(&m, echo("m1"));
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.code(), Some("PR01"), "{r:?}");
        assert!(h.control.calls().is_empty());
    }

    fn autostopping(app: &str, how: Autostop) -> CatalogEntry {
        let mut e = entry(app);
        e.services[0].autostop = Some(how);
        e
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_stops_or_suspends_idle_machines() {
        let h = Harness::new(config()).await;
        let stop = autostopping("s", Autostop::Stop);
        let mut suspend = autostopping("u", Autostop::Suspend);
        suspend.suspendable = true;
        let unsuspendable = autostopping("n", Autostop::Suspend);
        let off = autostopping("o", Autostop::Off);
        h.add(&stop, echo("s"));
        h.add(&suspend, echo("u"));
        h.add(&unsuspendable, echo("n"));
        h.add(&off, echo("o"));
        let mut acted = aloft_proxy::autostop_pass(&h.edge).await;
        acted.sort();
        let mut want = vec![stop.id.clone(), suspend.id.clone(), unsuspendable.id.clone()];
        want.sort();
        assert_eq!(acted, want);
        let mut calls = h.control.calls();
        calls.sort();
        let mut expected = vec![
            format!("stop {}", stop.id),
            format!("suspend {}", suspend.id),
            format!("stop {}", unsuspendable.id),
        ];
        expected.sort();
        assert_eq!(calls, expected);
        let snap = h.edge.routes().snapshot();
        assert_eq!(
            snap.app("u").unwrap().machines[0].entry.state,
            MachineState::Suspended
        );
        // Nothing left to stop.
        assert!(aloft_proxy::autostop_pass(&h.edge).await.is_empty());
        // A request wakes the suspended one again.
        assert_eq!(h.get("u.localhost", "/").await.machine(), "u");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_falls_back_to_stop_when_suspend_fails() {
        let h = Harness::new(config()).await;
        h.control.0.fail_suspend.store(true, Ordering::SeqCst);
        let mut m = autostopping("u", Autostop::Suspend);
        m.suspendable = true;
        h.add(&m, echo("u"));
        assert_eq!(
            aloft_proxy::autostop_pass(&h.edge).await,
            std::slice::from_ref(&m.id)
        );
        assert_eq!(
            h.control.calls(),
            [format!("suspend {}", m.id), format!("stop {}", m.id)]
        );
        assert_eq!(
            h.edge.routes().snapshot().app("u").unwrap().machines[0]
                .entry
                .state,
            MachineState::Stopped
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_keeps_min_machines_running_in_the_primary_region_only() {
        let h = Harness::new(config()).await;
        let mut primary = autostopping("a", Autostop::Stop);
        primary.services[0].min_machines_running = Some(1);
        primary.primary_region = "test".to_owned();
        let mut elsewhere = autostopping("a", Autostop::Stop);
        elsewhere.services[0].min_machines_running = Some(1);
        elsewhere.primary_region = "test".to_owned();
        elsewhere.region = "far".to_owned();
        h.add(&primary, echo("p"));
        h.add(&elsewhere, echo("e"));
        assert_eq!(
            aloft_proxy::autostop_pass(&h.edge).await,
            std::slice::from_ref(&elsewhere.id)
        );
        assert!(aloft_proxy::autostop_pass(&h.edge).await.is_empty());
        assert_eq!(h.control.calls(), [format!("stop {}", elsewhere.id)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_stops_one_machine_per_region_per_pass() {
        let h = Harness::new(config()).await;
        let ms: Vec<CatalogEntry> = (0..3).map(|_| autostopping("a", Autostop::Stop)).collect();
        for (i, m) in ms.iter().enumerate() {
            h.add(m, echo(&format!("m{i}")));
        }
        let running = || {
            h.edge
                .routes()
                .snapshot()
                .app("a")
                .unwrap()
                .machines
                .iter()
                .filter(|m| m.entry.state == MachineState::Started)
                .count()
        };
        for left in [2, 1, 0] {
            assert_eq!(aloft_proxy::autostop_pass(&h.edge).await.len(), 1);
            assert_eq!(running(), left);
        }
        assert_eq!(h.control.calls().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn autostop_leaves_a_busy_machine_running() {
        let h = Arc::new(Harness::new(config()).await);
        let gate = Gate::new();
        let m = autostopping("a", Autostop::Stop);
        h.add(&m, held("m", &gate));
        let h1 = h.clone();
        let first = tokio::spawn(async move { h1.get("a.localhost", "/").await });
        until("the request is served", || gate.arrived() == 1).await;
        assert!(aloft_proxy::autostop_pass(&h.edge).await.is_empty());
        gate.release(1);
        assert_eq!(first.await.unwrap().status, StatusCode::OK);
        assert_eq!(
            aloft_proxy::autostop_pass(&h.edge).await,
            std::slice::from_ref(&m.id)
        );
    }

    // -----------------------------------------------------------------------------------------
    // 7. fly-replay.

    /// Answers `fly-replay: <value>` unless the request was replayed already (then echoes).
    fn replayer(name: &str, value: String) -> Handler {
        let name = name.to_owned();
        Arc::new(move |req| {
            let name = name.clone();
            let value = value.clone();
            Box::pin(async move {
                if req.headers().contains_key("fly-replay-src") {
                    return echo_of(&name, req).await;
                }
                Response::builder()
                    .header("x-machine", name.as_str())
                    .header("fly-replay", value.as_str())
                    .body(body("replay me"))
                    .unwrap()
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fly_replay_to_an_instance_reaches_it_with_the_source() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let b = entry("a");
        h.add(&a, replayer("A", format!("instance={};state=hello", b.id)));
        h.add(&b, echo("B"));
        // Force the first hop to A.
        let r = h
            .send(
                Request::get("/r")
                    .header("host", "a.localhost")
                    .header("fly-force-instance-id", a.id.as_str())
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "B");
        let src = r.seen("fly-replay-src").unwrap();
        assert!(src.contains(&format!("instance={}", a.id)), "{src}");
        assert!(src.contains("region=test"), "{src}");
        assert!(src.contains("state=hello"), "{src}");
        assert_eq!(
            r.header("fly-replay"),
            None,
            "the replay answer leaked to the client"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fly_replay_elsewhere_avoids_the_replaying_machine() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let b = entry("a");
        h.add(&a, replayer("A", "elsewhere=true".to_owned()));
        h.add(&b, replayer("B", "elsewhere=true".to_owned()));
        for _ in 0..4 {
            let r = h.get("a.localhost", "/").await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            let src = r.seen("fly-replay-src").unwrap();
            let other = if r.machine() == "A" { &b.id } else { &a.id };
            assert!(
                src.contains(&format!("instance={other}")),
                "{} answered, src {src}",
                r.machine()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fly_replay_json_transforms_the_request_but_not_the_proxy_headers() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let b = entry("a");
        let body_json = json!({
            "instance": b.id.as_str(),
            "transform": {
                "path": "/rewritten?q=1",
                "delete_headers": ["x-drop"],
                "set_headers": [
                    {"name": "x-set", "value": "1"},
                    {"name": "fly-client-ip", "value": "6.6.6.6"},
                    {"name": "fly-replay-src", "value": "forged"},
                ],
            },
        })
        .to_string();
        h.add(
            &a,
            answer(
                "A",
                200,
                &[("content-type", "application/vnd.fly.replay+json")],
                &body_json,
            ),
        );
        h.add(&b, echo("B"));
        let r = h
            .send(
                Request::get("/orig")
                    .header("host", "a.localhost")
                    .header("x-drop", "1")
                    .header("fly-force-instance-id", a.id.as_str())
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.machine(), "B", "{r:?}");
        assert_eq!(r.json()["uri"], "/rewritten?q=1");
        assert_eq!(r.seen("x-set").as_deref(), Some("1"));
        assert_eq!(r.seen("x-drop"), None);
        assert_eq!(
            r.seen("fly-client-ip").as_deref(),
            Some("127.0.0.1"),
            "the app forged fly-client-ip"
        );
        let src = r.seen("fly-replay-src").unwrap();
        assert!(
            src.contains(&format!("instance={}", a.id)),
            "the app forged fly-replay-src: {src}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fly_replay_to_another_app() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), replayer("A", "app=b".to_owned()));
        h.add(&entry("b"), echo("B"));
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.machine(), "B", "{r:?}");
        // The target app must exist.
        h.add(&entry("c"), replayer("C", "app=nope".to_owned()));
        let r = h.get("c.localhost", "/").await;
        assert_eq!(r.code(), Some("PA04"), "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_and_endless_replays_are_errors() {
        let h = Harness::new(config()).await;
        h.add(
            &entry("bad"),
            answer("X", 200, &[("fly-replay", "instance=not-an-id")], ""),
        );
        let r = h.get("bad.localhost", "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.code(), Some("PA03"));

        let looping = entry("loop");
        let value = format!("instance={}", looping.id);
        h.add(&looping, answer("L", 200, &[("fly-replay", value.as_str())], ""));
        let r = h.get("loop.localhost", "/").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.code(), Some("PA02"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_post_is_replayed_with_its_body() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let b = entry("a");
        h.add(&a, replayer("A", format!("instance={}", b.id)));
        h.add(&b, echo("B"));
        let r = h
            .send(
                Request::post("/p")
                    .header("host", "a.localhost")
                    .header("fly-force-instance-id", a.id.as_str())
                    .body(Full::new(Bytes::from_static(b"the body")))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.machine(), "B", "{r:?}");
        assert_eq!(r.json()["method"], "POST");
        assert_eq!(r.json()["body"], "the body");
    }

    // -----------------------------------------------------------------------------------------
    // 8. Upgrades.

    fn upgrade_echo() -> Handler {
        Arc::new(|mut req| {
            Box::pin(async move {
                if !req.headers().contains_key("upgrade") {
                    return echo_of("ws", req).await;
                }
                let up = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(u) = up.await {
                        let mut io = TokioIo::new(u);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("x-machine", "ws")
                    .body(body(""))
                    .unwrap()
            })
        })
    }

    /// Asks the edge at `addr` to upgrade `a.localhost/ws` to a WebSocket; the connection and
    /// the answer's head (lower case).
    async fn upgrade(addr: SocketAddr) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        (s, head)
    }

    /// Sends `msg` over an upgraded connection to an echo and checks it comes back.
    async fn echoed(s: &mut TcpStream, msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgraded_connection_carries_bytes_both_ways() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), upgrade_echo());
        let (mut s, head) = upgrade(h.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        for msg in [&b"ping"[..], b"second message"] {
            echoed(&mut s, msg).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgrade_is_retried_on_another_machine_when_a_connect_fails() {
        let h = Harness::new(config()).await;
        // Published as started, but nothing listens at its address.
        let refusing = entry("a");
        h.edge.routes().upsert(refusing.clone());
        h.add(&entry("a"), upgrade_echo());
        // Least loaded then round-robin: of two upgrades at least one picks the refusing
        // machine first.
        for _ in 0..2 {
            let (mut s, head) = upgrade(h.addr).await;
            assert!(head.starts_with("http/1.1 101"), "{head}");
            echoed(&mut s, b"ping").await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http10_request_is_named_so_in_via() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("m1"));
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"GET /old HTTP/1.0\r\nHost: a.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&all);
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let seen: Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["headers"]["via"][0], "1.0 aloft", "{text}");
    }

    // -----------------------------------------------------------------------------------------
    // 9. HTTP/2.

    async fn send_h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        let (parts, incoming) = resp.into_parts();
        Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: incoming.collect().await.unwrap().to_bytes(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_h2_client_reaches_an_http1_backend() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("a1"));
        let r = send_h2(
            h.addr,
            Request::post("http://a.localhost/h2?x=1")
                .body(Full::new(Bytes::from_static(b"over h2")))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.version, Version::HTTP_2);
        let seen = r.json();
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(seen["uri"], "/h2?x=1");
        assert_eq!(seen["body"], "over h2");
        assert_eq!(r.seen("host").as_deref(), Some("a.localhost"));
        assert_eq!(r.seen("via").as_deref(), Some("2 aloft"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn h2_backend_speaks_h2c_to_the_machine() {
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.services[0].ports[0].http_options = Some(HttpOptions {
            h2_backend: Some(true),
            ..HttpOptions::default()
        });
        h.add(&m, echo("a1"));
        let r = h.get("a.localhost", "/grpc").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let seen = r.json();
        assert_eq!(seen["version"], "HTTP/2.0");
        assert_eq!(
            seen["uri"].as_str().map(|u| u.ends_with("/grpc")),
            Some(true),
            "{seen}"
        );
        // The app still learns which host was asked for.
        let authority = seen["uri"].as_str().unwrap().contains("a.localhost")
            || r.seen("host").as_deref() == Some("a.localhost");
        assert!(authority, "the h2 backend lost the host: {seen}");
        // The answer came over h2c: the response's Via says so (the request's says 1.1, the
        // client's protocol).
        assert_eq!(r.header("via"), Some("2 aloft"));
        assert_eq!(r.seen("via").as_deref(), Some("1.1 aloft"));
    }

    // -----------------------------------------------------------------------------------------
    // 10. Bad input.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_malformed_request_gets_400() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("a1"));
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_huge_header_gets_431() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("a1"));
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        let big = "x".repeat(100 * 1024);
        let req = format!("GET / HTTP/1.1\r\nHost: a.localhost\r\nX-Big: {big}\r\n\r\n");
        // The proxy may answer and close before reading everything.
        let _ = s.write_all(req.as_bytes()).await;
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_and_silent_clients_are_disconnected() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("a1"));
        // Half a header, then nothing.
        let mut half = TcpStream::connect(h.addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: a.loc").await.unwrap();
        // Nothing at all.
        let mut silent = TcpStream::connect(h.addr).await.unwrap();
        // Half of the HTTP/2 preface.
        let mut half_h2 = TcpStream::connect(h.addr).await.unwrap();
        half_h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut half, Duration::from_secs(3)).await,
            "half a header"
        );
        assert!(
            closed_within(&mut silent, Duration::from_secs(3)).await,
            "silent client"
        );
        assert!(
            closed_within(&mut half_h2, Duration::from_secs(3)).await,
            "half an h2 preface"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        // A prompt client is served.
        assert_eq!(h.get("a.localhost", "/").await.status, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backend_reset_mid_response_fails_that_request_only() {
        let h = Harness::new(config()).await;
        let m = entry("a");
        let listener = TcpListener::bind(addr_of(&m)).await.unwrap();
        h.edge.routes().upsert(m.clone());
        let _backend = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                if n == 1 {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                        .await;
                    let _ = s.flush().await;
                    let _ = s.set_zero_linger();
                    drop(s);
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nx-machine: raw\r\n\r\nok")
                        .await;
                }
            }
        });
        let first = send(
            h.addr,
            Request::get("/")
                .header("host", "a.localhost")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert!(
            first.is_err(),
            "a cut response reached the client whole: {first:?}"
        );
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_over_its_connection_limit_is_closed() {
        let mut c = config();
        c.max_conns_per_client = 3;
        c.header_read_timeout = Duration::from_secs(5);
        let h = Harness::new(c).await;
        h.add(&entry("a"), echo("a1"));
        let req = b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n";
        let mut open = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(h.addr).await.unwrap();
            s.write_all(req).await.unwrap();
            assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
            open.push(s);
        }
        let mut fourth = TcpStream::connect(h.addr).await.unwrap();
        let _ = fourth.write_all(req).await;
        assert!(
            closed_within(&mut fourth, Duration::from_secs(2)).await,
            "the 4th connection stayed open"
        );
        // The first three still work.
        open[0].write_all(req).await.unwrap();
        assert!(read_response(&mut open[0]).await.starts_with("HTTP/1.1 200"));
        // One closed, a new one is admitted (once the edge saw the close: until then, new ones
        // are refused, and counted).
        drop(open.pop());
        let mut refused = 1;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(h.addr).await.unwrap();
            let _ = s.write_all(req).await;
            let mut b = [0u8; 12];
            if tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                assert_eq!(&b, b"HTTP/1.1 200");
                break;
            }
            refused += 1;
            assert!(Instant::now() < deadline, "the freed slot never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let metrics = h.edge.metrics_text();
        assert!(
            metrics.contains(&format!("aloft_edge_refused_connections_count{{}} {refused}\n")),
            "{refused} refused: {metrics}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // 11. Live routing.

    /// A response body fed from a channel.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl hyper::body::Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_survives_its_machine_leaving_the_table() {
        let h = Harness::new(config()).await;
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let streaming: Handler = Arc::new(move |_req| {
            let rx = rx.lock().unwrap().take();
            Box::pin(async move {
                match rx {
                    Some(rx) => Response::builder()
                        .header("x-machine", "old")
                        .body(ChannelBody(rx).boxed())
                        .unwrap(),
                    None => Response::builder()
                        .header("x-machine", "old")
                        .body(body("again"))
                        .unwrap(),
                }
            })
        });
        let old = entry("a");
        h.add(&old, streaming);
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(
                Request::get("/stream")
                    .header("host", "a.localhost")
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-machine"], "old");
        let mut stream = resp.into_body();
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        let frame = stream.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one");

        // The machine leaves the catalog and a new one arrives.
        h.edge.routes().remove("a", &old.id);
        let new = entry("a");
        h.add(&new, echo("new"));
        for _ in 0..3 {
            assert_eq!(h.get("a.localhost", "/").await.machine(), "new");
        }
        // The old stream keeps flowing to its end.
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        let frame = stream.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "two");
        drop(tx);
        assert!(stream.frame().await.is_none());
    }

    // -----------------------------------------------------------------------------------------
    // 12. force_https.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn force_https_redirects_plain_http() {
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.services[0].ports[0].force_https = Some(true);
        h.add(&m, echo("a1"));
        let r = h.get("a.localhost:80", "/some/path?q=1").await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{r:?}");
        assert_eq!(r.header("location"), Some("https://a.localhost/some/path?q=1"));
        // Without force_https the request is served.
        h.add(&entry("b"), echo("b1"));
        assert_eq!(h.get("b.localhost", "/").await.status, StatusCode::OK);
    }

    // -----------------------------------------------------------------------------------------
    // 13. Metrics.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_count_responses_and_concurrency() {
        let h = Arc::new(Harness::new(config()).await);
        let gate = Gate::new();
        let m = entry("a");
        h.add(&m, held("m1", &gate));
        gate.release(3);
        for _ in 0..3 {
            assert_eq!(h.get("a.localhost", "/").await.status, StatusCode::OK);
        }
        let _ = h.get("zzz.localhost", "/").await;
        let text = h.edge.metrics_text();
        assert!(
            text.contains("fly_edge_http_responses_count{app=\"a\",status=\"200\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("fly_edge_http_responses_count{app=\"\",status=\"404\"} 1\n"),
            "{text}"
        );
        let gauge = |n: u32| {
            format!(
                "fly_app_concurrency{{app=\"a\",instance=\"{}\",region=\"test\"}} {n}\n",
                m.id
            )
        };
        assert!(text.contains(&gauge(0)), "{text}");
        // Every family has its HELP and TYPE, HELP first, as scrapers expect.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let family = rest.split(' ').next().unwrap();
                let help = format!("# HELP {family} ");
                assert!(
                    i > 0 && lines[i - 1].starts_with(&help),
                    "{family} has no HELP line before its TYPE"
                );
            }
        }
        let h1 = h.clone();
        let pending = tokio::spawn(async move { h1.get("a.localhost", "/").await });
        until("the request is served", || gate.arrived() == 4).await;
        assert!(
            h.edge.metrics_text().contains(&gauge(1)),
            "{}",
            h.edge.metrics_text()
        );
        gate.release(1);
        assert_eq!(pending.await.unwrap().status, StatusCode::OK);
        until("the gauge drops", || h.edge.metrics_text().contains(&gauge(0))).await;
        assert!(
            h.edge
                .metrics_text()
                .contains("fly_edge_http_responses_count{app=\"a\",status=\"200\"} 4\n")
        );
    }

    // -----------------------------------------------------------------------------------------
    // More: wake failures, hints, replay fallback, big bodies, upgrades' load.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_that_cannot_be_woken_gets_pm07_or_pm03() {
        let mut c = config();
        c.wake_timeout = Duration::from_millis(300);
        let h = Harness::new(c).await;
        h.control.0.fail_start.store(true, Ordering::SeqCst);
        let mut m = entry("a");
        m.state = MachineState::Stopped;
        h.add(&m, echo("m1"));
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
        assert_eq!(r.code(), Some("PM07"), "{r:?}");
        // Its host accepts the start but nothing ever listens.
        let mut ghost = entry("g");
        ghost.state = MachineState::Stopped;
        h.edge.routes().upsert(ghost);
        h.control.0.fail_start.store(false, Ordering::SeqCst);
        let started = Instant::now();
        let r = h.get("g.localhost", "/").await;
        assert_eq!(r.code(), Some("PM03"), "{r:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        let text = h.edge.metrics_text();
        assert!(
            text.contains("aloft_edge_autostart_count{result=\"failed\"} 2"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routing_hints_force_an_instance() {
        let h = Harness::new(config()).await;
        let (m1, m2) = (entry("a"), entry("a"));
        h.add(&m1, echo("m1"));
        h.add(&m2, echo("m2"));
        let forced = |id: &str| {
            Request::get("/")
                .header("host", "a.localhost")
                .header("fly-force-instance-id", id)
                .body(Full::default())
                .unwrap()
        };
        for (id, name) in [(&m1.id, "m1"), (&m2.id, "m2"), (&m1.id, "m1")] {
            assert_eq!(h.send(forced(id.as_str())).await.machine(), name);
        }
        let r = h.send(forced(next_id().as_str())).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
        assert_eq!(r.code(), Some("PR02"));
        let r = h.send(forced("not an id")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
        let text = h.edge.metrics_text();
        assert!(
            text.contains("fly_edge_http_responses_count{app=\"a\",status=\"400\"} 1\n"),
            "a bad routing hint is counted: {text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_that_cannot_be_served_falls_back_to_its_source() {
        let h = Harness::new(config()).await;
        let a = entry("a");
        let missing = next_id();
        let value = format!("instance={missing};fallback=prefer_self");
        let handler: Handler = Arc::new(move |req| {
            let value = value.clone();
            Box::pin(async move {
                if req.headers().contains_key("fly-replay-failed") {
                    return echo_of("A", req).await;
                }
                Response::builder()
                    .header("fly-replay", value.as_str())
                    .body(body(""))
                    .unwrap()
            })
        });
        h.add(&a, handler);
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "A");
        let failed = r.seen("fly-replay-failed").unwrap();
        assert!(failed.contains(&format!("instance={missing}")), "{failed}");
        assert!(failed.contains(&format!("replay_source={}", a.id)), "{failed}");
        assert!(failed.contains("reason=no_candidate"), "{failed}");
        // Without a fallback the client gets the error.
        let b = entry("b");
        let value = format!("instance={missing}");
        h.add(&b, answer("B", 200, &[("fly-replay", value.as_str())], ""));
        assert_eq!(h.get("b.localhost", "/").await.code(), Some("PR02"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_bodies_stream_through_but_cannot_be_replayed() {
        let h = Harness::new(config()).await;
        h.add(&entry("a"), echo("a1"));
        let big = "y".repeat(3 << 20);
        let post = |host: &str, force: Option<&MachineId>, body: &str| {
            let mut b = Request::post("/big").header("host", host);
            if let Some(id) = force {
                b = b.header("fly-force-instance-id", id.as_str());
            }
            b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
        };
        let r = h.send(post("a.localhost", None, &big)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["body"].as_str().map(str::len), Some(big.len()));
        let a = entry("r");
        let b = entry("r");
        // A reads the body before answering (hyper's client reports a broken pipe, PU02, when a
        // machine answers and closes while the upload is still going).
        let value = format!("instance={}", b.id);
        let reading: Handler = Arc::new(move |req| {
            let value = value.clone();
            Box::pin(async move {
                let _ = req.into_body().collect().await;
                Response::builder()
                    .header("fly-replay", value.as_str())
                    .body(body(""))
                    .unwrap()
            })
        });
        h.add(&a, reading);
        h.add(&b, echo("B"));
        let r = h.send(post("r.localhost", Some(&a.id), &big)).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r:?}");
        assert_eq!(r.code(), Some("PA01"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgraded_connection_counts_as_load_until_it_closes() {
        let h = Harness::new(config()).await;
        let m = autostopping("a", Autostop::Stop);
        h.add(&m, upgrade_echo());
        let gauge = |n: u32| {
            format!(
                "fly_app_concurrency{{app=\"a\",instance=\"{}\",region=\"test\"}} {n}\n",
                m.id
            )
        };
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        assert!(
            h.edge.metrics_text().contains(&gauge(1)),
            "{}",
            h.edge.metrics_text()
        );
        assert!(
            aloft_proxy::autostop_pass(&h.edge).await.is_empty(),
            "a machine with an open websocket was stopped"
        );
        drop(s);
        until("the upgraded connection's load is released", || {
            h.edge.metrics_text().contains(&gauge(0))
        })
        .await;
    }
    // -----------------------------------------------------------------------------------------
    // HTTPS.

    /// Serves HTTPS for `h` with the local CA's leaves; the CA's root.
    async fn https_edge(
        h: &Harness,
        dir: &std::path::Path,
    ) -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
        let ca = Arc::new(aloft_proxy::tls::LocalCa::open(dir).unwrap());
        let resolver = Arc::new(aloft_proxy::tls::SniResolver::new("localhost", ca.clone()));
        let server = aloft_proxy::tls::server_config(resolver).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(h.edge.clone().serve_https(listener, server));
        (addr, ca.root_der().clone())
    }

    /// A TLS connection to `addr` for `name`, offering `alpn`.
    async fn tls_connect(
        addr: SocketAddr,
        root: &rustls::pki_types::CertificateDer<'static>,
        alpn: &[u8],
        name: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let mut client =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
    }

    /// GET https://`host``path` over HTTP/2 or HTTP/1.1.
    async fn https_get(
        addr: SocketAddr,
        root: &rustls::pki_types::CertificateDer<'static>,
        h2: bool,
        host: &str,
        path: &str,
    ) -> Resp {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let stream = tls_connect(addr, root, alpn, host).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("https://{host}{path}"))
                .body(Full::<Bytes>::default())
                .unwrap();
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", host)
                .body(Full::<Bytes>::default())
                .unwrap();
            sender.send_request(req).await.unwrap()
        };
        let (parts, incoming) = resp.into_parts();
        Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: incoming.collect().await.unwrap().to_bytes(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_requests_are_served_over_h1_and_h2_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.services[0].ports[0].force_https = Some(true);
        m.services[0].ports.push(MachinePort {
            port: Some(443),
            handlers: vec!["tls".to_owned(), "http".to_owned()],
            ..MachinePort::default()
        });
        h.add(&m, echo("a1"));
        let (addr, root) = https_edge(&h, dir.path()).await;
        // force_https: a client that named a port reaches the listeners directly and goes to the
        // HTTPS listener's own port; one that named none goes to the public 443.
        let r = h.get("a.localhost:8080", "/p?q").await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{r:?}");
        let direct = format!("https://a.localhost:{}/p?q", addr.port());
        assert_eq!(r.header("location"), Some(direct.as_str()));
        let r = h.get("a.localhost", "/p").await;
        assert_eq!(r.header("location"), Some("https://a.localhost/p"));
        for h2 in [false, true] {
            let r = https_get(addr, &root, h2, "a.localhost", "/secure").await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "force_https must not redirect https: {r:?}"
            );
            assert_eq!(r.version, if h2 { Version::HTTP_2 } else { Version::HTTP_11 });
            assert_eq!(r.machine(), "a1");
            assert_eq!(r.json()["uri"], "/secure");
            assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("https"));
            assert_eq!(r.seen("x-forwarded-ssl").as_deref(), Some("on"));
            assert_eq!(r.seen("x-forwarded-port").as_deref(), Some("443"));
            assert_eq!(r.seen("fly-forwarded-port").as_deref(), Some("443"));
            assert_eq!(r.seen("host").as_deref(), Some("a.localhost"));
        }
        let text = h.edge.metrics_text();
        assert!(
            text.contains("fly_edge_tls_handshake_count{result=\"ok\"} 2"),
            "{text}"
        );
        // Plain HTTP to the same app is redirected.
        assert_eq!(
            h.get("a.localhost", "/secure").await.status,
            StatusCode::MOVED_PERMANENTLY
        );
        // A name outside the base domain and no custom domain: no certificate.
        assert!(tls_connect(addr, &root, b"h2", "nope.example.com").await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_that_woke_a_machine_respect_its_hard_limit() {
        let mut c = config();
        c.queue_timeout = Duration::from_secs(3);
        let h = Arc::new(Harness::new(c).await);
        h.control.0.start_delay_ms.store(100, Ordering::SeqCst);
        let gate = Gate::new();
        let mut m = with_limits(entry("a"), 1, 1);
        m.state = MachineState::Stopped;
        h.add(&m, held("m1", &gate));
        let mut pending = Vec::new();
        for _ in 0..3 {
            let h2 = h.clone();
            pending.push(tokio::spawn(async move { h2.get("a.localhost", "/").await }));
        }
        until("the machine is woken and serves", || gate.arrived() >= 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            gate.arrived(),
            1,
            "the woken machine got more than its hard limit"
        );
        gate.release(3);
        for p in pending {
            assert_eq!(p.await.unwrap().status, StatusCode::OK);
        }
        assert_eq!(gate.arrived(), 3);
        assert_eq!(h.control.calls().len(), 1);
    }

    /// Sends a chunked POST over raw TCP; the response head and body.
    async fn chunked_post(addr: SocketAddr, host: &str, extra: &str, chunks: &[&str]) -> (String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "POST /chunked HTTP/1.1\r\nHost: {host}\r\n{extra}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        for c in chunks {
            req.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
        }
        req.push_str("0\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        (head, String::from_utf8_lossy(&rest).into_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_chunked_body_is_retried_and_replayed() {
        let h = Harness::new(config()).await;
        // Replayed: A sends it on to B, body and all.
        let a = entry("a");
        let b = entry("a");
        h.add(&a, replayer("A", format!("instance={}", b.id)));
        h.add(&b, echo("B"));
        let force = format!("fly-force-instance-id: {}\r\n", a.id);
        let (head, body) = chunked_post(h.addr, "a.localhost", &force, &["hello ", "chunked"]).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
        assert!(head.to_ascii_lowercase().contains("x-machine: b"), "{head}");
        assert!(body.contains("\"body\":\"hello chunked\""), "{body}");
        // Retried: the first machine refuses, the second gets the whole body.
        let refusing = entry("r");
        let working = entry("r");
        h.edge.routes().upsert(refusing);
        h.add(&working, echo("W"));
        for _ in 0..4 {
            let (head, body) = chunked_post(h.addr, "r.localhost", "", &["a", "b", "c"]).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}{body}");
            assert!(body.contains("\"body\":\"abc\""), "{body}");
        }
        // A chunked body over the limit still streams through whole.
        let big = "z".repeat(700 * 1024);
        let (head, body) = chunked_post(h.addr, "r.localhost", "", &[&big, &big]).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            body.contains(&format!("\"body\":\"{big}{big}\"")),
            "the big body was cut"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Keep-alive connections to machines.

    /// A machine serving `echo` that counts the connections it accepted and those that ended
    /// (the edge closed them, or `close_after` of idleness passed on the machine's side).
    fn counting_backend(
        m: &CatalogEntry,
        name: &str,
        close_after: Option<Duration>,
    ) -> (Arc<AtomicUsize>, Arc<AtomicUsize>, JoinHandle<()>) {
        let std = std::net::TcpListener::bind(addr_of(m)).unwrap();
        std.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, e) = (accepted.clone(), ended.clone());
        let handler = echo(name);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (handler, e) = (handler.clone(), e.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    // HTTP/1.1, or h2c with prior knowledge.
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    match close_after {
                        // Idle for `d` after an answer: close, as servers with a short
                        // keep-alive timeout do (hyper ends the connection when dropped).
                        Some(d) => {
                            let _ = tokio::time::timeout(d, conn.as_mut()).await;
                        }
                        None => {
                            let _ = conn.await;
                        }
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (accepted, ended, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_alive_connections_to_a_machine_are_reused_then_closed_when_idle() {
        let h = Harness::new(config()).await;
        let m = entry("a");
        let (accepted, ended, _backend) = counting_backend(&m, "m1", None);
        h.edge.routes().upsert(m);
        for i in 0..5 {
            let r = h
                .send(
                    Request::post(format!("/p?i={i}"))
                        .header("host", "a.localhost")
                        .body(Full::from(format!("body {i}")))
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            let seen = r.json();
            // HTTP/1.1 in origin form, with the client's Host.
            assert_eq!(seen["uri"], format!("/p?i={i}"));
            assert_eq!(seen["headers"]["host"][0], "a.localhost");
            assert_eq!(seen["body"], format!("body {i}"));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "five requests one after the other should share one connection to the machine"
        );
        // pool_idle_timeout is 500 ms in these tests.
        until("the edge closes its idle connection to the machine", || {
            ended.load(Ordering::SeqCst) == 1
        })
        .await;
        let r = h.get("a.localhost", "/again").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edge_on_two_worker_threads_serves_on_both_and_stops_with_them() {
        let control = FakeControl::default();
        let edge = Edge::new(config(), Arc::new(control.clone()), Arc::new(DirectDialer));
        let _ = control.0.table.set(edge.routes().clone());
        let m = entry("a");
        control.add(&m, echo("m1"));
        let threads = WorkerThreads::start(NonZeroUsize::new(2), "edge-test").unwrap();
        let workers = threads.workers();
        let listeners = workers.bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let _served = workers.spawn_each(listeners, |l| edge.clone().serve_http(l));

        // 32 keep-alive clients, five requests each: the kernel spreads the connections over
        // both workers' listeners, and every request is answered by the machine, whichever
        // worker's idle pool the machine connection came from.
        let clients: Vec<_> = (0..32)
            .map(|c| {
                tokio::spawn(async move {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    for i in 0..5 {
                        let req = Request::get(format!("/c{c}/r{i}"))
                            .header("host", "a.localhost")
                            .body(Full::<Bytes>::default())
                            .unwrap();
                        let resp = sender.send_request(req).await.unwrap();
                        assert_eq!(resp.status(), StatusCode::OK, "client {c} request {i}");
                        let body = resp.into_body().collect().await.unwrap().to_bytes();
                        assert!(
                            !body.is_empty(),
                            "client {c} request {i} has the machine's answer"
                        );
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        let text = edge.metrics_text();
        let on0 = metric(&text, "aloft_edge_accepted_connections_count{worker=\"0\"}");
        let on1 = metric(&text, "aloft_edge_accepted_connections_count{worker=\"1\"}");
        assert_eq!(on0 + on1, 32, "{text}");
        assert!(on0 > 0 && on1 > 0, "both workers accepted: {on0} and {on1}");
        assert_eq!(
            metric(&text, "fly_edge_http_responses_count{app=\"a\",status=\"200\"}"),
            160
        );

        // Stopping the workers closes their listeners.
        drop(threads);
        let refused = TcpStream::connect(addr)
            .await
            .expect_err("nothing listens any more");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    /// Connects to `port` on loopback, writes `msg`, and reads until the far end closes.
    async fn exchange(port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(msg).await?;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .map_err(|_| std::io::Error::other("no end within 5 s"))??;
        Ok(got)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_apps_own_tcp_ports_are_served_raw_and_with_proxy_proto_on_every_worker() {
        let h = Harness::new(config()).await;
        let threads = WorkerThreads::start(NonZeroUsize::new(2), "edge-test").unwrap();
        let _tcp = tokio::spawn(
            h.edge
                .clone()
                .serve_tcp_services(IpAddr::from([127, 0, 0, 1]), threads.workers().clone()),
        );
        let raw = aloft_testkit::free_port().unwrap();
        let pp = aloft_testkit::free_port().unwrap();
        let mut m = entry("a");
        m.services[0].ports = vec![
            MachinePort {
                port: Some(raw),
                ..MachinePort::default()
            },
            MachinePort {
                port: Some(pp),
                handlers: vec!["proxy_proto".to_owned()],
                ..MachinePort::default()
            },
        ];
        // The machine echoes what it got up to the first "\n" after the PROXY header, then closes.
        let listener = TcpListener::bind(addr_of(&m)).await.unwrap();
        let _machine = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut b = [0u8; 1];
                    while got.iter().filter(|&&c| c == b'\n').count() < 1
                        || (got.starts_with(b"PROXY ") && got.iter().filter(|&&c| c == b'\n').count() < 2)
                    {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            break;
                        }
                        got.push(b[0]);
                    }
                    let _ = s.write_all(&got).await;
                });
            }
        });
        h.edge.routes().upsert(m.clone());
        let start = Instant::now();
        while exchange(raw, b"ready?\n").await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "port {raw} never opened"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Raw TCP, many connections: the kernel spreads them over both workers' listeners.
        for i in 0..16 {
            let msg = format!("hello {i}\n");
            assert_eq!(exchange(raw, msg.as_bytes()).await.unwrap(), msg.as_bytes());
        }
        let text = h.edge.metrics_text();
        assert!(
            metric(&text, "aloft_edge_accepted_connections_count{worker=\"1\"}") > 0,
            "the second worker accepted none of 17 connections: {text}"
        );
        // proxy_proto: the machine hears who the client is first (v1 by default).
        let got = String::from_utf8(exchange(pp, b"hi\n").await.unwrap()).unwrap();
        let (header, rest) = got.split_once("\r\n").unwrap();
        assert!(header.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "), "{got:?}");
        assert!(header.ends_with(&format!(" {pp}")), "{got:?}");
        assert_eq!(rest, "hi\n");

        // The machine leaves: its ports close on every worker.
        h.edge.routes().remove("a", &m.id);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", raw)).await.is_ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "port {raw} stayed open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..16 {
            assert!(
                TcpStream::connect(("127.0.0.1", raw)).await.is_err(),
                "a worker still listens on {raw}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_h2c_connection_to_a_machine_is_closed_and_a_new_one_made_when_needed() {
        let h = Harness::new(config()).await;
        let mut m = entry("a");
        m.services[0].ports[0].http_options = Some(HttpOptions {
            h2_backend: Some(true),
            ..HttpOptions::default()
        });
        let (accepted, ended, _backend) = counting_backend(&m, "m1", None);
        h.edge.routes().upsert(m);
        for _ in 0..3 {
            let r = h.get("a.localhost", "/").await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(r.json()["version"], "HTTP/2.0");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one multiplexed connection");
        // pool_idle_timeout is 500 ms in these tests.
        until("the edge lets the idle h2c connection go", || {
            ended.load(Ordering::SeqCst) == 1
        })
        .await;
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_closing_an_idle_connection_costs_no_request() {
        let h = Harness::new(config()).await;
        let m = entry("a");
        let (accepted, ended, _backend) = counting_backend(&m, "m1", Some(Duration::from_millis(50)));
        h.edge.routes().upsert(m);
        let r = h.get("a.localhost", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        until("the machine closes its idle connection", || {
            ended.load(Ordering::SeqCst) == 1
        })
        .await;
        // A POST is not retried on another machine once sent: the edge must not send it over
        // the connection the machine closed.
        for _ in 0..3 {
            let r = h
                .send(
                    Request::post("/")
                        .header("host", "a.localhost")
                        .body(Full::from("x"))
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(r.json()["body"], "x");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }
}
