//! In-process tests of fly-replay caching through the edge's public API: an [`Edge`] serving
//! plain HTTP on a loopback port and fake machines (small hyper servers, each on its own loopback
//! address 127.0.220–229.y, so they never meet `edge.rs`'s or `udp.rs`'s) routed through
//! `edge.routes()`. Each fake machine counts the requests it saw, so a test tells whether the
//! replaying machine was asked again.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use aloft_api::{CatalogEntry, HttpOptions, ReplayCache, ReplayCacheType};
    use aloft_proxy::{DirectDialer, Edge, EdgeConfig};
    use bytes::Bytes;
    use http::{HeaderMap, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use crate::common::{
        Backend, BackendBody, Handler, Ids, Loopback, NoControl, body, has_metric, http_entry, internal_port,
        metric, serve_counting,
    };

    // -----------------------------------------------------------------------------------------
    // Addresses and ids.

    /// This file's machines: 127.0.220–229.y.
    static IPS: Loopback = Loopback::new(220, 229);
    static IDS: Ids = Ids::new([0xca, 0xce]);

    // -----------------------------------------------------------------------------------------
    // Fake machines.

    /// What an echo machine saw, as JSON; `close` asks for the connection to be closed (so the
    /// edge keeps none to it in its pool).
    async fn echo_of(name: &str, req: Request<Incoming>, close: bool) -> Response<BackendBody> {
        let (parts, _incoming) = req.into_parts();
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in &parts.headers {
            headers
                .entry(k.as_str().to_owned())
                .or_default()
                .push(v.to_str().unwrap_or("?").to_owned());
        }
        let seen = json!({"machine": name, "uri": parts.uri.to_string(), "headers": headers});
        let mut b = Response::builder()
            .header("x-machine", name)
            .header("content-type", "application/json");
        if close {
            b = b.header("connection", "close");
        }
        b.body(body(seen.to_string())).unwrap()
    }

    /// A machine that answers what it saw.
    fn echo(name: &str) -> Handler {
        let name = name.to_owned();
        Arc::new(move |req| {
            let name = name.clone();
            Box::pin(async move { echo_of(&name, req, false).await })
        })
    }

    /// An echo machine that closes every connection after its answer.
    fn echo_closing(name: &str) -> Handler {
        let name = name.to_owned();
        Arc::new(move |req| {
            let name = name.clone();
            Box::pin(async move { echo_of(&name, req, true).await })
        })
    }

    /// Answers a replay with the headers `answer` gives for the request (its `fly-replay`
    /// first, then cache headers), or echoes when `answer` gives none.
    fn replayer(
        name: &str,
        answer: impl Fn(&Request<Incoming>) -> Vec<(String, String)> + Send + Sync + 'static,
    ) -> Handler {
        let name = name.to_owned();
        let answer = Arc::new(answer);
        Arc::new(move |req| {
            let name = name.clone();
            let headers = answer(&req);
            Box::pin(async move {
                if headers.is_empty() {
                    return echo_of(&name, req, false).await;
                }
                let mut b = Response::builder().header("x-machine", name.as_str());
                for (k, v) in &headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                b.body(body("replay me")).unwrap()
            })
        })
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // The edge under test.

    fn config() -> EdgeConfig {
        let mut c = EdgeConfig::new("test");
        c.connect_timeout = Duration::from_secs(1);
        c.queue_timeout = Duration::from_millis(300);
        c.idle_after = Duration::ZERO;
        c.pool_idle_timeout = Duration::from_millis(500);
        c.header_read_timeout = Duration::from_millis(500);
        c
    }

    /// A fake machine: its entry, how many requests it saw, its server.
    struct Machine {
        entry: CatalogEntry,
        seen: Arc<AtomicUsize>,
        backend: Mutex<Option<Backend>>,
    }

    impl Machine {
        fn seen(&self) -> usize {
            self.seen.load(Ordering::SeqCst)
        }
        fn id(&self) -> &str {
            self.entry.id.as_str()
        }
        /// Closes its listener (the catalog still shows it started).
        fn close(&self) {
            self.backend.lock().unwrap().take();
        }
    }

    struct Harness {
        edge: Arc<Edge>,
        addr: SocketAddr,
        _server: JoinHandle<()>,
    }

    impl Harness {
        async fn new() -> Self {
            let edge = Edge::new(config(), Arc::new(NoControl), Arc::new(DirectDialer));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(edge.clone().serve_http(listener));
            Self {
                edge,
                addr,
                _server: server,
            }
        }

        /// Starts a machine of `app` serving `handler` and publishes it.
        fn add(&self, entry: CatalogEntry, handler: Handler) -> Machine {
            let seen = Arc::new(AtomicUsize::new(0));
            let backend = serve_counting(addr_of(&entry), handler, seen.clone());
            self.edge.routes().upsert(entry.clone());
            Machine {
                entry,
                seen,
                backend: Mutex::new(Some(backend)),
            }
        }

        async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
            let mut b = Request::get(path).header("host", "a.localhost");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            send(self.addr, b.body(Full::default()).unwrap()).await
        }
    }

    fn addr_of(e: &CatalogEntry) -> SocketAddr {
        SocketAddr::new(e.private_ip.parse().unwrap(), internal_port())
    }

    /// A started machine of `app` with one `http` service on public port 80.
    fn entry(app: &str) -> CatalogEntry {
        http_entry(app, IDS.next(), IPS.next())
    }

    /// `entry` with session-based replay caching rules on its port.
    fn with_rules(mut e: CatalogEntry, rules: Vec<ReplayCache>) -> CatalogEntry {
        e.services[0].ports[0].http_options = Some(HttpOptions {
            replay_cache: rules,
            ..HttpOptions::default()
        });
        e
    }

    // -----------------------------------------------------------------------------------------
    // Clients.

    #[derive(Debug)]
    struct Resp {
        status: StatusCode,
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
        fn cache_status(&self) -> Option<&str> {
            self.header("fly-replay-cache-status")
        }
        /// The first value of a request header the echo machine saw.
        fn seen(&self, name: &str) -> Option<String> {
            let v: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"));
            v["headers"][name][0].as_str().map(str::to_owned)
        }
    }

    /// One HTTP/1.1 request on a new connection.
    async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        let (parts, incoming) = resp.into_parts();
        let body = incoming.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Path-based.

    /// App `a`'s machine replays to app `b`'s machine `target`, caching `/p/*` for `ttl`
    /// seconds (with `extra` headers).
    fn path_replayer(target: &str, ttl: &str, extra: &[(&str, &str)]) -> Handler {
        let mut headers = pairs(&[
            ("fly-replay", &format!("app=b;instance={target}")),
            ("fly-replay-cache", "/p/*"),
            ("fly-replay-cache-ttl-secs", ttl),
        ]);
        headers.extend(pairs(extra));
        replayer("A", move |req| {
            if req.uri().path().starts_with("/p/") {
                headers.clone()
            } else {
                Vec::new()
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_replay_skips_the_replaying_machine() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(entry("a"), path_replayer(b.id(), "30", &[]));

        let r = h.get("/p/one", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!((a.seen(), b.seen()), (1, 1));

        let r = h.get("/p/two?q=1", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("hit"));
        assert_eq!(
            (a.seen(), b.seen()),
            (1, 2),
            "the replaying machine was asked again"
        );
        // As for a live replay, the target learns where it would have come from.
        let src = r.seen("fly-replay-src").unwrap();
        assert!(src.contains(&format!("instance={}", a.id())), "{src}");
        assert!(r.seen("fly-replay-cache-control").is_none());

        // Outside the pattern: the app answers itself, no cache status.
        let r = h.get("/other", &[]).await;
        assert_eq!(r.machine(), "A");
        assert_eq!(r.cache_status(), None);
        assert_eq!(a.seen(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cache_figures_move_as_it_is_used() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(
            entry("a"),
            path_replayer(b.id(), "30", &[("fly-replay-cache-allow-bypass", "yes")]),
        );
        let figures = || {
            let text = h.edge.metrics_text();
            [
                "aloft_edge_replay_cache_entries",
                "aloft_edge_replay_cache_requests_count{status=\"hit\"}",
                "aloft_edge_replay_cache_requests_count{status=\"miss\"}",
                "aloft_edge_replay_cache_requests_count{status=\"bypass\"}",
                "aloft_edge_replay_cache_stores_count",
                "aloft_edge_replay_cache_evictions_count{cap=\"app\"}",
                "aloft_edge_replay_cache_evictions_count{cap=\"edge\"}",
            ]
            .map(|name| {
                assert!(has_metric(&text, name), "{name} missing from:\n{text}");
                metric(&text, name)
            })
        };
        // entries, hit, miss, bypass, stores, evicted (app cap), evicted (edge cap)
        assert_eq!(figures(), [0, 0, 0, 0, 0, 0, 0]);
        // Not cached for this path: no status, no figure moves.
        assert_eq!(h.get("/other", &[]).await.cache_status(), None);
        assert_eq!(figures(), [0, 0, 0, 0, 0, 0, 0]);

        assert_eq!(h.get("/p/one", &[]).await.cache_status(), Some("miss"));
        assert_eq!(figures(), [1, 0, 1, 0, 1, 0, 0]);
        assert_eq!(h.get("/p/two", &[]).await.cache_status(), Some("hit"));
        assert_eq!(h.get("/p/three", &[]).await.cache_status(), Some("hit"));
        assert_eq!(figures(), [1, 2, 1, 0, 1, 0, 0]);
        // A bypass asks the app, whose replay stores the entry again (one entry still).
        let r = h.get("/p/four", &[("fly-replay-cache-control", "skip")]).await;
        assert_eq!(r.cache_status(), Some("bypass"));
        assert_eq!(figures(), [1, 2, 1, 1, 2, 0, 0]);
        assert_eq!(a.seen(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_json_form_caches_too() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let answer = json!({
            "app": "b",
            "instance": b.id(),
            "cache": {"prefix": "/j/*", "ttl": 30}
        })
        .to_string();
        let a = h.add(
            entry("a"),
            Arc::new(move |_req| {
                let r = Response::builder()
                    .header("x-machine", "A")
                    .header("content-type", "application/vnd.fly.replay+json")
                    .body(body(answer.clone()))
                    .unwrap();
                Box::pin(async move { r })
            }),
        );
        let r = h.get("/j/1", &[]).await;
        assert_eq!((r.machine(), r.cache_status()), ("B", Some("miss")), "{r:?}");
        let r = h.get("/j/2", &[]).await;
        assert_eq!((r.machine(), r.cache_status()), ("B", Some("hit")), "{r:?}");
        assert_eq!(a.seen(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ttl_under_ten_seconds_caches_nothing() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(entry("a"), path_replayer(b.id(), "9", &[]));
        for _ in 0..2 {
            let r = h.get("/p/x", &[]).await;
            assert_eq!(r.machine(), "B");
            assert_eq!(r.cache_status(), Some("miss"));
        }
        assert_eq!(a.seen(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_entry_asks_the_app_again() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(entry("a"), path_replayer(b.id(), "10", &[]));
        assert_eq!(h.get("/p/x", &[]).await.cache_status(), Some("miss"));
        assert_eq!(h.get("/p/x", &[]).await.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 1);
        // Fly's shortest TTL is 10 s.
        tokio::time::sleep(Duration::from_millis(10_100)).await;
        let r = h.get("/p/x", &[]).await;
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bypass_where_allowed_only() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(
            entry("a"),
            replayer("A", {
                let target = b.id().to_owned();
                move |req| {
                    let path = req.uri().path();
                    let (pattern, bypass) = if path.starts_with("/open/") {
                        ("/open/*", "yes")
                    } else {
                        ("/closed/*", "no")
                    };
                    pairs(&[
                        ("fly-replay", &format!("app=b;instance={target}")),
                        ("fly-replay-cache", pattern),
                        ("fly-replay-cache-ttl-secs", "60"),
                        ("fly-replay-cache-allow-bypass", bypass),
                    ])
                }
            }),
        );
        let skip = [("fly-replay-cache-control", "skip")];
        assert_eq!(h.get("/open/1", &[]).await.cache_status(), Some("miss"));
        assert_eq!(h.get("/closed/1", &[]).await.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 2);

        let r = h.get("/open/1", &skip).await;
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("bypass"));
        assert_eq!(a.seen(), 3, "a bypass asks the app");

        let r = h.get("/closed/1", &skip).await;
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("hit"), "this entry does not allow bypass");
        assert_eq!(a.seen(), 3);

        // Without the header the open entry is used.
        assert_eq!(h.get("/open/2", &[]).await.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalidate_from_the_replaying_machine_drops_its_entries() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let invalidating = Arc::new(AtomicUsize::new(0));
        let a = h.add(
            entry("a"),
            replayer("A", {
                let target = b.id().to_owned();
                let invalidating = invalidating.clone();
                move |_req| {
                    let replay = ("fly-replay", format!("app=b;instance={target}"));
                    if invalidating.load(Ordering::SeqCst) == 1 {
                        return pairs(&[(replay.0, &replay.1), ("fly-replay-cache", "invalidate")]);
                    }
                    pairs(&[
                        (replay.0, &replay.1),
                        ("fly-replay-cache", "/p/*"),
                        ("fly-replay-cache-ttl-secs", "60"),
                        ("fly-replay-cache-allow-bypass", "yes"),
                    ])
                }
            }),
        );
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("miss"));
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 1);
        // The app changes its mind; a bypassing request reaches it and it says so.
        invalidating.store(1, Ordering::SeqCst);
        let r = h.get("/p/1", &[("fly-replay-cache-control", "skip")]).await;
        assert_eq!(r.cache_status(), Some("bypass"));
        assert_eq!(r.machine(), "B");
        assert_eq!(a.seen(), 2);
        // The entry is gone: the app is asked again.
        let r = h.get("/p/1", &[]).await;
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 3);
        // It cached nothing either.
        h.get("/p/1", &[]).await;
        assert_eq!(a.seen(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalidate_from_the_cached_target_drops_the_entry_used() {
        let h = Harness::new().await;
        let invalidate = Arc::new(AtomicUsize::new(0));
        let b = h.add(
            entry("b"),
            replayer("B", {
                let invalidate = invalidate.clone();
                // A plain answer (no fly-replay) carrying only the invalidation when asked to.
                move |_req| {
                    if invalidate.load(Ordering::SeqCst) == 1 {
                        pairs(&[("fly-replay-cache", "invalidate")])
                    } else {
                        Vec::new()
                    }
                }
            }),
        );
        let a = h.add(entry("a"), path_replayer(b.id(), "60", &[]));
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("miss"));
        invalidate.store(1, Ordering::SeqCst);
        let r = h.get("/p/1", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "B");
        assert_eq!(r.cache_status(), Some("hit"));
        assert_eq!(
            r.header("fly-replay-cache"),
            None,
            "the cache header leaked to the client"
        );
        assert_eq!(a.seen(), 1);
        invalidate.store(0, Ordering::SeqCst);
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_cached_target_falls_back_to_asking_the_app() {
        let h = Harness::new().await;
        // B closes its connections after each answer, so the edge keeps none open to it.
        let b = h.add(entry("b"), echo_closing("B"));
        let b2 = h.add(entry("b"), echo("B2"));
        let target = Arc::new(Mutex::new(b.id().to_owned()));
        let a = h.add(
            entry("a"),
            replayer("A", {
                let target = target.clone();
                move |_req| {
                    let t = target.lock().unwrap().clone();
                    pairs(&[
                        ("fly-replay", &format!("app=b;instance={t}")),
                        ("fly-replay-cache", "/p/*"),
                        ("fly-replay-cache-ttl-secs", "60"),
                    ])
                }
            }),
        );
        assert_eq!(h.get("/p/1", &[]).await.machine(), "B");
        b.close();
        *target.lock().unwrap() = b2.id().to_owned();
        let r = h.get("/p/1", &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.machine(), "B2");
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 2, "the app was asked again");
        // The source is the app's machine, not a stale entry.
        let src = r.seen("fly-replay-src").unwrap();
        assert!(src.contains(&format!("instance={}", a.id())), "{src}");
        // The new answer is cached.
        let r = h.get("/p/1", &[]).await;
        assert_eq!(r.machine(), "B2");
        assert_eq!(r.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_go_when_the_app_leaves_the_table() {
        let h = Harness::new().await;
        let b = h.add(entry("b"), echo("B"));
        let a = h.add(entry("a"), path_replayer(b.id(), "60", &[]));
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("miss"));
        assert_eq!(h.get("/p/1", &[]).await.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 1);
        h.edge.routes().remove("a", &a.entry.id);
        assert_eq!(h.get("/p/1", &[]).await.status, StatusCode::NOT_FOUND);
        h.edge.routes().upsert(a.entry.clone());
        let r = h.get("/p/1", &[]).await;
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 2);
    }

    // -----------------------------------------------------------------------------------------
    // Session-based.

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_cookies_are_cached_apart() {
        let h = Harness::new().await;
        let b1 = h.add(entry("b"), echo("B1"));
        let b2 = h.add(entry("b"), echo("B2"));
        let targets: HashMap<String, String> = [
            ("sid=one".to_owned(), b1.id().to_owned()),
            ("sid=two".to_owned(), b2.id().to_owned()),
        ]
        .into();
        let rules = vec![
            ReplayCache {
                allow_bypass: Some(false),
                name: Some("sid".to_owned()),
                path_prefix: Some("/".to_owned()),
                ttl_seconds: Some(60),
                r#type: Some(ReplayCacheType::Cookie),
            },
            // A longer prefix keyed on a header the requests don't carry: no session caching.
            ReplayCache {
                allow_bypass: Some(false),
                name: Some("x-tenant".to_owned()),
                path_prefix: Some("/api".to_owned()),
                ttl_seconds: Some(60),
                r#type: Some(ReplayCacheType::Header),
            },
        ];
        let a = h.add(
            with_rules(entry("a"), rules),
            replayer("A", move |req| {
                let cookie = req
                    .headers()
                    .get("cookie")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let target = targets.get(cookie).cloned().unwrap_or_else(|| {
                    // Unknown session: some machine of b.
                    targets.values().next().cloned().unwrap_or_default()
                });
                pairs(&[("fly-replay", &format!("app=b;instance={target}"))])
            }),
        );
        let one = [("cookie", "sid=one")];
        let two = [("cookie", "sid=two")];
        let r = h.get("/page", &one).await;
        assert_eq!((r.machine(), r.cache_status()), ("B1", Some("miss")));
        let r = h.get("/page", &two).await;
        assert_eq!((r.machine(), r.cache_status()), ("B2", Some("miss")));
        assert_eq!(a.seen(), 2);
        for _ in 0..2 {
            let r = h.get("/other", &one).await;
            assert_eq!((r.machine(), r.cache_status()), ("B1", Some("hit")));
            let r = h.get("/page", &two).await;
            assert_eq!((r.machine(), r.cache_status()), ("B2", Some("hit")));
        }
        assert_eq!(a.seen(), 2);
        // Without the cookie, or under the rule keyed on a missing header, the app is asked.
        let r = h.get("/page", &[]).await;
        assert_eq!(r.cache_status(), Some("miss"));
        let r = h.get("/api/x", &one).await;
        assert_eq!(r.cache_status(), Some("miss"));
        assert_eq!(a.seen(), 4);
        // No bypass: the rule does not allow it.
        let r = h
            .get(
                "/page",
                &[("cookie", "sid=one"), ("fly-replay-cache-control", "skip")],
            )
            .await;
        assert_eq!(r.cache_status(), Some("hit"));
        assert_eq!(a.seen(), 4);
    }
}
