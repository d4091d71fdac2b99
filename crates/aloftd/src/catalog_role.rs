//! The catalog role: publishes this host's service catalog (one `aloft_api::CatalogEntry` per
//! machine, see `aloft_agent::CatalogPublisher`) into the control store under
//! `/catalog/{app}/{machine_id}` as JSON, where edges watch it.
//!
//! On start it reconciles: entries of this host whose machine no longer exists are deleted and
//! every current machine is written once; from then on only changes are written, each batch in
//! store transactions of at most 64 operations. Store errors are logged and retried by the publisher (with a backoff);
//! they never stop aloftd. Entries of other hosts are never touched.
//!
//! Self-contained (no `crate::` paths): the integration tests include this file.

use std::sync::Arc;

use aloft_agent::{Agent, CatalogChange, CatalogOptions, CatalogPublisher, CatalogSink};
use aloft_api::MachineId;
use aloft_store::{Op, RangeOptions, Store, Txn, keys};
use anyhow::Context as _;

/// Keys read per page when listing the catalog.
const PAGE: usize = 500;

/// Most operations in one catalog transaction (etcd's `--max-txn-ops` is 128 by default).
const TXN_OPS: usize = 64;

/// Writes catalog changes into the control store.
#[derive(Debug)]
pub(crate) struct StoreSink {
    store: Arc<dyn Store>,
}

impl StoreSink {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

/// `(app, id)` of a key `/catalog/{app}/{id}`.
fn parse_key(key: &str) -> Option<(String, MachineId)> {
    let rest = key.strip_prefix(keys::CATALOG)?;
    let (app, id) = rest.split_once('/')?;
    Some((app.to_owned(), id.parse().ok()?))
}

impl CatalogSink for StoreSink {
    type Error = anyhow::Error;

    fn previous(&mut self, host: &str) -> anyhow::Result<Vec<(String, MachineId)>> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .range(
                    keys::CATALOG,
                    &RangeOptions {
                        limit: Some(PAGE),
                        after: after.take(),
                        ..RangeOptions::default()
                    },
                )
                .context("list the service catalog in the control store")?;
            for kv in &page.kvs {
                // Only the owner is read: an entry written by an older or newer aloft still counts.
                let owned = serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .is_ok_and(|v| v.get("host").and_then(serde_json::Value::as_str) == Some(host));
                match parse_key(&kv.key) {
                    Some(k) if owned => out.push(k),
                    Some(_) => {}
                    None => eprintln!("aloftd: catalog: ignoring the malformed key {:?}", kv.key),
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => after = Some(last.key.clone()),
                _ => return Ok(out),
            }
        }
    }

    fn apply(&mut self, changes: &[CatalogChange]) -> anyhow::Result<()> {
        // One operation per key, the last change winning: etcd refuses a transaction that writes
        // a key twice.
        let mut ops: Vec<(String, Op)> = Vec::new();
        for change in changes {
            let op = match change {
                CatalogChange::Upsert(entry) => keys::catalog_entry(&entry.app, entry.id.as_str())
                    .map_err(anyhow::Error::from)
                    .and_then(|key| Ok((key.clone(), Op::put(key, serde_json::to_vec(entry)?)))),
                CatalogChange::Remove { app, id } => keys::catalog_entry(app, id.as_str())
                    .map(|key| (key.clone(), Op::delete(key)))
                    .map_err(anyhow::Error::from),
            };
            match op {
                Ok((key, op)) => {
                    ops.retain(|(k, _)| *k != key);
                    ops.push((key, op));
                }
                // Retrying cannot fix it, and it must not hold up the others.
                Err(e) => eprintln!("aloftd: catalog: skipping a change that cannot be stored: {e:#}"),
            }
        }
        // Entries are independent, so a large batch (a host's first publication) goes in
        // transactions of at most TXN_OPS operations: etcd caps a transaction's (128 by default).
        let mut ops = ops.into_iter().map(|(_, op)| op).peekable();
        while ops.peek().is_some() {
            let txn = ops.by_ref().take(TXN_OPS).fold(Txn::new(), Txn::then);
            self.store
                .txn(txn)
                .context("write the service catalog into the control store")?;
        }
        Ok(())
    }
}

/// Starts publishing `agent`'s machines as host `host` (the name placement uses for it) into
/// `store`. The publisher runs until it is dropped or the agent stops. `None` (logged) when the
/// agent is already stopping: aloftd goes on without.
pub(crate) fn start(agent: &Agent, store: Arc<dyn Store>, host: &str) -> Option<CatalogPublisher> {
    match agent.publish_catalog(CatalogOptions::new(host), StoreSink::new(store)) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!(
                "aloftd: warning: could not start publishing the service catalog ({e}); \
                 edges will not see this host's machines until aloftd restarts"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use aloft_agent::{AgentConfig, CreateMachine, FakeDriver};
    use aloft_api::{CatalogEntry, MachineConfig, MachineState};
    use aloft_store::{
        KeyValue, LeaseGrant, LeaseId, Range, Revision, SqliteStore, StoreError, TxnResponse, Watcher,
    };

    use super::*;

    /// A store whose transactions fail while `down` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: SqliteStore,
        down: AtomicBool,
    }

    impl Store for Flaky {
        fn revision(&self) -> Result<Revision, StoreError> {
            self.inner.revision()
        }
        fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.inner.get(key)
        }
        fn range(&self, prefix: &str, options: &RangeOptions) -> Result<Range, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(busy());
            }
            self.inner.range(prefix, options)
        }
        fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(busy());
            }
            self.inner.txn(txn)
        }
        fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watcher, StoreError> {
            self.inner.watch(prefix, from)
        }
        fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, StoreError> {
            self.inner.grant_lease(ttl)
        }
        fn keep_alive(&self, id: LeaseId) -> Result<LeaseGrant, StoreError> {
            self.inner.keep_alive(id)
        }
        fn revoke_lease(&self, id: LeaseId) -> Result<bool, StoreError> {
            self.inner.revoke_lease(id)
        }
        fn expire_leases(&self) -> Result<(), StoreError> {
            self.inner.expire_leases()
        }
        fn compact(&self, revision: Revision) -> Result<(), StoreError> {
            self.inner.compact(revision)
        }
    }

    fn busy() -> StoreError {
        StoreError::Busy {
            path: "flaky".into(),
            op: "test",
            timeout_ms: 0,
        }
    }

    fn entry_json(app: &str, id: &MachineId, host: &str) -> Vec<u8> {
        serde_json::to_vec(&CatalogEntry {
            id: id.clone(),
            app: app.into(),
            host: host.into(),
            region: "local".into(),
            state: MachineState::Started,
            version: "v".into(),
            private_ip: String::new(),
            services: Vec::new(),
            checks: Vec::new(),
            suspendable: false,
            process_group: String::new(),
            primary_region: String::new(),
            updated_at: 1,
        })
        .unwrap()
    }

    /// Polls `key` until `done` holds for what is there, for at most 2 s.
    fn wait_key(store: &dyn Store, key: &str, what: &str, done: impl Fn(Option<CatalogEntry>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let got = store
                .get(key)
                .unwrap()
                .map(|kv| serde_json::from_slice::<CatalogEntry>(&kv.value).unwrap());
            if done(got.clone()) {
                return;
            }
            assert!(Instant::now() < deadline, "{key} never {what}: {got:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_host_s_many_changes_fit_etcd_s_transactions() {
        // etcd refuses a transaction of more than 128 operations or one that writes a key twice.
        let etcd = aloft_testkit::Etcd::start().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(aloft_etcd::EtcdStore::connect(aloft_etcd::EtcdOptions::new([etcd.url()])).unwrap());
        let mut sink = StoreSink::new(Arc::clone(&store));
        let entry = |n: u8| -> CatalogEntry {
            let id = MachineId::from_random([n; 7]);
            serde_json::from_slice(&entry_json("web", &id, "host-1")).unwrap()
        };
        let mut changes: Vec<CatalogChange> = (0..=250)
            .map(|n| CatalogChange::Upsert(Box::new(entry(n))))
            .collect();
        // The same machine again in one batch: published, then removed.
        changes.push(CatalogChange::Remove {
            app: "web".into(),
            id: MachineId::from_random([7; 7]),
        });
        sink.apply(&changes).unwrap();
        let listed = store.range(keys::CATALOG, &RangeOptions::default()).unwrap();
        assert_eq!(listed.kvs.len(), 250, "251 published, one of them removed again");
        assert!(
            store
                .get(&keys::catalog_entry("web", MachineId::from_random([7; 7]).as_str()).unwrap())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn machines_are_published_reconciled_and_survive_store_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            inner: SqliteStore::open(dir.path().join("control.db")).unwrap(),
            down: AtomicBool::new(true),
        });
        let stale = MachineId::from_random([1; 7]);
        let other = MachineId::from_random([2; 7]);
        let stale_key = keys::catalog_entry("old", stale.as_str()).unwrap();
        let other_key = keys::catalog_entry("old", other.as_str()).unwrap();
        store
            .inner
            .put(&stale_key, entry_json("old", &stale, "host-1"))
            .unwrap();
        store
            .inner
            .put(&other_key, entry_json("old", &other, "host-2"))
            .unwrap();
        let agent = Agent::open(
            AgentConfig {
                poll: Duration::from_millis(10),
                stop_timeout: Duration::from_millis(100),
                ..AgentConfig::new(dir.path().join("agent.db"))
            },
            Arc::new(FakeDriver::new()),
        )
        .unwrap();
        let h = agent
            .create(CreateMachine {
                app: "web".into(),
                region: "local".into(),
                org: 1,
                config: MachineConfig {
                    image: Some("busybox".into()),
                    ..MachineConfig::default()
                },
                ..CreateMachine::default()
            })
            .unwrap();
        let id = h.machine.clone();
        h.wait(Duration::from_secs(10)).unwrap();
        let publisher = start(&agent, store.clone(), "host-1").unwrap();
        let key = keys::catalog_entry("web", id.as_str()).unwrap();
        // The store is down: nothing is written, aloftd goes on, the publisher retries.
        std::thread::sleep(Duration::from_millis(400));
        assert!(store.inner.get(&key).unwrap().is_none());
        assert!(publisher.stats().errors >= 1);
        store.down.store(false, Ordering::SeqCst);
        wait_key(&*store, &key, "was published", |e| {
            e.is_some_and(|e| e.state == MachineState::Started && e.host == "host-1" && e.app == "web")
        });
        // This host's entry of a machine that no longer exists is gone; another host's stays.
        wait_key(&*store, &stale_key, "was removed", |e| e.is_none());
        assert!(store.get(&other_key).unwrap().is_some());
        // Stopped, then destroyed.
        agent
            .stop(&id, aloft_agent::StopOptions::default())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        wait_key(&*store, &key, "showed stopped", |e| {
            e.is_some_and(|e| e.state == MachineState::Stopped)
        });
        agent
            .destroy(&id, false)
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        wait_key(&*store, &key, "was removed", |e| e.is_none());
        assert!(store.get(&other_key).unwrap().is_some());
    }

    /// Through the real API (`aloft-control`'s router over the agent, as aloftd serves it): a
    /// machine created there is in the catalog, and gone from it once destroyed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_created_through_the_api_is_in_the_catalog() {
        use aloft_control::{ApiConfig, ApiState, HostHandle, create_token, router};
        use aloft_store::ControlStore;
        use axum::body::Body;
        use axum::http::{Request, StatusCode};
        use http_body_util::BodyExt as _;
        use serde_json::{Value, json};
        use tower::ServiceExt as _;

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap());
        let token = create_token(&ControlStore::new(store.clone()), "personal", "admin")
            .unwrap()
            .token;
        let agent = Arc::new(
            Agent::open(
                AgentConfig {
                    poll: Duration::from_millis(10),
                    stop_timeout: Duration::from_millis(100),
                    host_memory_mb: 4096,
                    host_cpus: 4,
                    ..AgentConfig::new(dir.path().join("agent.db"))
                },
                Arc::new(FakeDriver::new()),
            )
            .unwrap(),
        );
        let _publisher = start(&agent, store.clone(), "host-1").unwrap();
        let api = router(ApiState::with_hosts(
            store.clone(),
            ApiConfig {
                region: "local".into(),
                access_log: false,
            },
            vec![HostHandle {
                name: "host-1".into(),
                region: "local".into(),
                agent: agent.clone(),
            }],
        ));
        let call = |method: &'static str, uri: String, body: Option<Value>| {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
                .unwrap();
            let api = api.clone();
            async move {
                let resp = api.oneshot(req).await.unwrap();
                let status = resp.status();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    status,
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
                )
            }
        };
        let (s, b) = call("POST", "/v1/apps".into(), Some(json!({"name": "web"}))).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, m) = call(
            "POST",
            "/v1/apps/web/machines".into(),
            Some(json!({"config": {"image": "busybox", "services": [{"internal_port": 8080, "protocol": "tcp"}]}})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{m}");
        let id = m["id"].as_str().unwrap().to_owned();
        let key = keys::catalog_entry("web", &id).unwrap();
        tokio::task::block_in_place(|| {
            wait_key(&*store, &key, "showed the started machine", |e| {
                e.is_some_and(|e| {
                    e.state == MachineState::Started
                        && e.host == "host-1"
                        && e.services.first().and_then(|s| s.internal_port) == Some(8080)
                })
            });
        });
        let (s, b) = call("DELETE", format!("/v1/apps/web/machines/{id}?force=true"), None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        tokio::task::block_in_place(|| wait_key(&*store, &key, "was removed", |e| e.is_none()));
    }

    #[test]
    fn keys_parse_back() {
        let id = MachineId::from_random([3; 7]);
        let key = keys::catalog_entry("web", id.as_str()).unwrap();
        assert_eq!(parse_key(&key), Some(("web".to_owned(), id)));
        assert_eq!(parse_key("/catalog/web"), None);
        assert_eq!(parse_key("/machines/web/0101010101010a"), None);
        assert_eq!(parse_key("/catalog/web/not-an-id"), None);
    }
}
