//! EtcdStore on a real etcd (one private etcd per test, `aloft_testkit::Etcd`): the Store
//! contract (`aloft_store::conformance`, shared with SQLite), and what only etcd has: endpoints
//! that do not answer, failing over to the next one, watches that survive etcd restarting,
//! another client's writes, the runtime thread from inside tokio.

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use aloft_etcd::{EtcdOptions, EtcdStore};
    use aloft_store::conformance::{Fresh, Subject};
    use aloft_store::{ControlStore, Expect, Op, Revision, Store, StoreError, Txn, WatchError};
    use aloft_testkit::Etcd;

    fn start() -> Etcd {
        Etcd::start().unwrap_or_else(|e| panic!("{e}: install etcd-server (scripts/setup.sh does)"))
    }

    fn connect(etcd: &Etcd) -> EtcdStore {
        EtcdStore::connect(EtcdOptions::new([etcd.url()])).unwrap()
    }

    /// A fresh etcd and a store on it, for the conformance checks.
    fn fresh(options: &Fresh) -> Subject {
        let etcd = start();
        let store = EtcdStore::connect(EtcdOptions {
            watch_capacity: options.watch_capacity,
            ..EtcdOptions::new([etcd.url()])
        })
        .unwrap();
        Subject::new(store, etcd)
    }

    aloft_store::conformance_tests!(fresh);

    /// A loopback URL nothing listens on.
    fn dead_url() -> String {
        format!("http://127.0.0.1:{}", aloft_testkit::free_port().unwrap())
    }

    #[test]
    fn a_wrong_url_is_a_clear_error_at_connect() {
        let url = dead_url();
        let err = EtcdStore::connect(EtcdOptions::new([url.clone()])).unwrap_err();
        assert!(matches!(err, StoreError::EtcdUnavailable { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "etcd at {url}: connection refused; start etcd or fix --etcd"
            )),
            "{msg}"
        );
        // Something that answers HTTP but is not etcd.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = other.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut conn, _) = other.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
            )
            .unwrap();
        });
        let err = EtcdStore::connect(EtcdOptions::new([format!("http://{addr}")])).unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        assert!(err.to_string().contains("is this etcd 3.4 or newer"), "{err}");
        assert!(err.to_string().contains("404"), "{err}");
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        // A server that answers every request with a truncated etcd answer.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let bodies: [&[u8]; 3] = [
                br#"{"header":{"revision":"3"},"version":"3.4.23"}"#,
                br#"{"header":{"revision":"3"},"kvs":[{"key":"L2E=","mod_revision":"#,
                br#"{"header":{"revision":"3"},"succeeded":true,"responses":[]}"#,
            ];
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 8192];
                let _ = conn.read(&mut buf);
                let body = bodies[i.min(2)];
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(body);
            }
        });
        let store = EtcdStore::connect(EtcdOptions::new([format!("http://{addr}")])).unwrap();
        assert_eq!(store.server_version(), "3.4.23");
        let err = store.get("/a").unwrap_err();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        assert!(err.to_string().contains("EOF"), "{err}");
        let err = store.put("/a", b"1".to_vec()).unwrap_err();
        assert!(err.to_string().contains("0 results for 1 operations"), "{err}");
    }

    #[test]
    fn requests_fail_over_to_the_next_endpoint() {
        let etcd = start();
        let (dead, live) = (dead_url(), etcd.url());
        let store = EtcdStore::connect(EtcdOptions::parse(&format!("{dead},{live}")).unwrap()).unwrap();
        assert_eq!(store.endpoints(), [dead.as_str(), live.as_str()]);
        assert!(
            store.server_version().starts_with("3."),
            "{}",
            store.server_version()
        );
        let rev = store.put("/a", b"1".to_vec()).unwrap();
        assert_eq!(store.get("/a").unwrap().unwrap().mod_revision, rev);
        let mut w = store.watch("/", Some(rev)).unwrap();
        assert_eq!(
            w.recv_timeout(Duration::from_secs(10)).unwrap().unwrap().revision,
            rev
        );
        // Both dead: the error names both.
        drop(etcd);
        let err = store.get("/a").unwrap_err();
        assert!(matches!(err, StoreError::EtcdUnavailable { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{dead}, {live}")), "{err}");
        assert!(err.to_string().contains("connection refused"), "{err}");
    }

    #[test]
    fn another_clients_writes_advance_the_revision_and_reach_watchers() {
        let etcd = start();
        let (a, b) = (connect(&etcd), connect(&etcd));
        let mut w = a.watch("/shared/", None).unwrap();
        let rev = b.put("/shared/x", b"from b".to_vec()).unwrap();
        assert_eq!(a.revision().unwrap(), rev);
        let batch = w.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(
            (batch.revision, batch.events[0].kv.value.as_slice()),
            (rev, b"from b".as_slice())
        );
        // Compare-and-swap between the two clients.
        let kv = a.get("/shared/x").unwrap().unwrap();
        b.put_if(
            "/shared/x",
            b"b again".to_vec(),
            Expect::Revision(kv.mod_revision),
            None,
        )
        .unwrap();
        let lost = a.put_if(
            "/shared/x",
            b"a".to_vec(),
            Expect::Revision(kv.mod_revision),
            None,
        );
        assert!(matches!(lost, Err(StoreError::Conflict { .. })), "{lost:?}");
        // A lease granted by one client is the other's too.
        let lease = a.grant_lease(Duration::from_secs(30)).unwrap();
        b.put_if("/shared/leased", vec![], Expect::Absent, Some(lease.id))
            .unwrap();
        assert!(b.revoke_lease(lease.id).unwrap());
        assert!(matches!(
            a.keep_alive(lease.id),
            Err(StoreError::LeaseNotFound { .. })
        ));
    }

    #[test]
    fn etcd_specific_refusals_are_clear_errors() {
        let etcd = start();
        let store = connect(&etcd);
        let err = store
            .txn(Txn::new().then(Op::put("/k", "1")).then(Op::put("/k", "2")))
            .unwrap_err();
        assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
        assert!(err.to_string().contains("writes one key twice"), "{err}");
        let mut many = Txn::new();
        for i in 0..200 {
            many = many.then(Op::put(format!("/many/{i}"), "x"));
        }
        let err = store.txn(many).unwrap_err();
        assert!(err.to_string().contains("--max-txn-ops"), "{err}");
        assert_eq!(store.revision().unwrap(), Revision(1), "nothing was written");
        // Leases are whole seconds, at least etcd's minimum.
        let lease = store.grant_lease(Duration::from_millis(1500)).unwrap();
        assert_eq!(lease.ttl_ms % 1000, 0);
        assert!(lease.ttl_ms >= 2000, "{lease:?}");
    }

    #[test]
    fn a_watch_outlives_a_restart_of_etcd_without_gaps() {
        let mut etcd = start();
        let store = connect(&etcd);
        let mut w = store.watch("/r/", None).unwrap();
        let first = store.put("/r/1", b"1".to_vec()).unwrap();
        assert_eq!(
            w.recv_timeout(Duration::from_secs(10)).unwrap().unwrap().revision,
            first
        );
        // The stream breaks; the watcher opens it again from the next revision, whether the
        // next write comes before or after that.
        etcd.restart().unwrap();
        let second = store.put("/r/2", b"2".to_vec()).unwrap();
        let third = store.put("/r/3", b"3".to_vec()).unwrap();
        let got: Vec<_> = (0..2)
            .map(|_| w.recv_timeout(Duration::from_secs(15)).unwrap().unwrap().revision)
            .collect();
        assert_eq!(got, [second, third]);
        assert_eq!(w.try_recv().unwrap(), None);
        assert_eq!(store.get("/r/1").unwrap().unwrap().mod_revision, first);
    }

    #[test]
    fn the_store_works_from_tokio_blocking_threads_and_async_watchers() {
        let etcd = start();
        let store: Arc<dyn Store> = Arc::new(connect(&etcd));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut w = store.watch("/apps/", None).unwrap();
            let s = Arc::clone(&store);
            let rev = tokio::task::spawn_blocking(move || s.put("/apps/web", b"{}".to_vec()))
                .await
                .unwrap()
                .unwrap();
            let batch = tokio::time::timeout(Duration::from_secs(10), w.recv_async())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(batch.revision, rev);
        });
        // The typed layer on top works unchanged.
        let control = ControlStore::new(Arc::clone(&store));
        assert!(control.list_tokens().unwrap().is_empty());
        drop(runtime);
    }

    #[test]
    fn a_dropped_watcher_lets_its_stream_go() {
        let etcd = start();
        let store = connect(&etcd);
        for _ in 0..20 {
            drop(store.watch("/", None).unwrap());
        }
        // Every stream notices within about a second and closes its connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = connections_to(etcd.addr().port());
            if open <= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{open} connections still open");
            std::thread::sleep(Duration::from_millis(100));
        }
        // A watcher cut off for lagging ends its stream too, and says where to resume.
        let lagging = EtcdStore::connect(EtcdOptions {
            watch_capacity: 1,
            ..EtcdOptions::new([etcd.url()])
        })
        .unwrap();
        let mut w = lagging.watch("/l", None).unwrap();
        let first = lagging.put("/l", vec![1]).unwrap();
        lagging.put("/l", vec![2]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.is_ended() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(w.recv().unwrap().revision, first);
        assert_eq!(
            w.recv().unwrap_err(),
            WatchError::Lagged {
                resume_from: first.next()
            }
        );
    }

    /// Established TCP connections from this process to `port` (from /proc/net/tcp).
    fn connections_to(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let want = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[2].ends_with(&want) && cols[3] == "01"
            })
            .count()
    }
}
