//! [`EtcdStore`]: the synchronous `Store` trait answered by a runtime thread that talks to etcd.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aloft_store::{
    Clock as _, KeyValue, LeaseGrant, LeaseId, Range, RangeOptions, Revision, Store, StoreError, SystemClock,
    Txn, TxnResponse, Watcher, lease_ttl_ms, validate_key, validate_txn_keys,
};
use serde_json::{Value, json};

use crate::client::{Client, Failure};
use crate::txn::{self, TxnRequest};
use crate::wire::{
    self, LeaseGrantResponse, LeaseKeepAliveResponse, RangeResponse, StatusResponse, Streamed, b64,
};
use crate::{EtcdOptions, watch};

/// A call handed to the runtime thread.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The control store on an etcd cluster (v3.4 or newer), through its JSON gateway.
///
/// Every `Store` call is one HTTP request (a transaction is one `/v3/kv/txn`, atomic in etcd),
/// made on the store's own runtime thread while the calling thread waits; each watcher is one
/// streamed `/v3/watch`. Dropping the store stops that thread: its watchers end with
/// `WatchError::Closed`.
///
/// What differs from [`SqliteStore`](aloft_store::SqliteStore), because etcd does it so:
/// - **Revisions are etcd's**: an empty etcd is at revision 1, not 0, and the revision is the
///   whole cluster's, so writes by other clients of the same etcd (other aloftd hosts, other
///   programs) advance it too. Revisions still only grow, one per write transaction.
/// - **Leases are etcd's**: their TTL is whole seconds (rounded up), and etcd may raise it to its
///   minimum (about 1.5 × the election timeout, 2 s with etcd's defaults); the grant reports the
///   TTL etcd gave. etcd's leader expires them by its own clock (and restarts their TTLs after a
///   leader change); `expires_at_ms` is this host's estimate. [`Store::expire_leases`] does
///   nothing. Lease ids are etcd's (large, not sequential).
/// - **Compaction** is clamped to the current revision (SQLite's to the next one), and a key
///   deleted exactly at the compaction revision may be missing from a watch replayed from it.
/// - A transaction may not **write one key twice**, nor put a key it also deletes (etcd refuses
///   it: [`StoreError::Etcd`]), and it holds at most etcd's `--max-txn-ops` operations (128 by
///   default).
/// - **Delete events** carry `create_revision` 0: etcd's tombstones hold only the key and the
///   revision.
#[derive(Debug)]
pub struct EtcdStore {
    client: Arc<Client>,
    jobs: Option<flume::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    watch_capacity: usize,
    version: String,
}

impl EtcdStore {
    /// Starts the store's runtime thread and checks that the cluster answers
    /// (`/v3/maintenance/status`): a wrong URL or a stopped etcd is
    /// [`StoreError::EtcdUnavailable`] here, not at the first write.
    pub fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        let EtcdOptions {
            endpoints,
            timeout,
            watch_capacity,
        } = options;
        let client = Arc::new(Client::new(&endpoints, timeout)?);
        let start_error = |e: std::io::Error| StoreError::Etcd {
            endpoint: client.endpoint_list(),
            op: "start the etcd client's thread",
            detail: e.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(start_error)?;
        let (jobs, queue) = flume::unbounded::<Job>();
        let thread = std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Ok(job) = queue.recv_async().await {
                        tokio::spawn(job);
                    }
                });
                // The store was dropped: dropping the runtime cancels every watch stream, and
                // their watchers see the store closed.
                drop(runtime);
            })
            .map_err(start_error)?;
        let mut store = Self {
            client,
            jobs: Some(jobs),
            thread: Some(thread),
            watch_capacity,
            version: String::new(),
        };
        store.version = store.status()?;
        Ok(store)
    }

    /// The etcd version the cluster reported when connecting (e.g. `3.4.23`).
    pub fn server_version(&self) -> &str {
        &self.version
    }

    /// The endpoints (normalised).
    pub fn endpoints(&self) -> &[String] {
        self.client.endpoints()
    }

    fn status(&self) -> Result<String, StoreError> {
        self.call("check the cluster", |client| async move {
            let answer = client.post("/v3/maintenance/status", &json!({})).await?;
            let status: StatusResponse = answer.decode()?;
            status.header.revision().map_err(|d| answer.malformed(d))?;
            Ok(status.version)
        })
    }

    /// Runs `f` on the runtime thread and waits for its answer; a failure is told as the error
    /// of `op`.
    fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let client = Arc::clone(&self.client);
        let fut = f(Arc::clone(&client));
        self.run(op, async move {
            fut.await.map_err(|failure| client.error(op, failure))
        })
    }

    /// Runs `fut` on the runtime thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::Etcd {
            endpoint: self.client.endpoint_list(),
            op,
            detail: "the store's client thread has stopped".to_owned(),
        };
        let (reply, answer) = flume::bounded(1);
        let job: Job = Box::pin(async move {
            let _ = reply.send(fut.await);
        });
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }

    /// One `/v3/kv/range` request; the answer and the revision it was read at.
    fn range_request(
        &self,
        op: &'static str,
        request: Value,
    ) -> Result<(RangeResponse, Revision), StoreError> {
        self.call(op, |client| async move {
            let answer = client.post("/v3/kv/range", &request).await?;
            let resp: RangeResponse = answer.decode()?;
            let revision = resp.header.revision().map_err(|d| answer.malformed(d))?;
            Ok((resp, revision))
        })
    }

    /// Which of `leases` etcd no longer has (the first, if it cannot tell).
    fn dead_lease(&self, leases: &[LeaseId]) -> LeaseId {
        let [first, rest @ ..] = leases else {
            return LeaseId(0);
        };
        if rest.is_empty() {
            return *first;
        }
        let alive = |id: LeaseId| {
            self.call("look up a lease", move |client| async move {
                let answer = client
                    .post("/v3/kv/lease/timetolive", &json!({"ID": id.0.to_string()}))
                    .await?;
                Ok(answer.decode::<LeaseKeepAliveResponse>()?.ttl > 0)
            })
        };
        leases
            .iter()
            .copied()
            .find(|id| matches!(alive(*id), Ok(false)))
            .unwrap_or(*first)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Closing the queue ends the runtime thread's loop; the runtime goes with it.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

impl Store for EtcdStore {
    fn revision(&self) -> Result<Revision, StoreError> {
        let probe = json!({"key": b64(b"/"), "count_only": true});
        Ok(self.range_request("read the revision", probe)?.1)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        validate_key(key)?;
        const OP: &str = "get a key";
        let (resp, _) = self.range_request(OP, json!({"key": b64(key.as_bytes())}))?;
        txn::get_result(resp, key).map_err(|detail| self.malformed(OP, detail))
    }

    fn range(&self, prefix: &str, options: &RangeOptions) -> Result<Range, StoreError> {
        validate_key(prefix)?;
        const OP: &str = "read a range";
        let Some(request) = txn::range_request(prefix, options) else {
            return Ok(Range {
                kvs: Vec::new(),
                more: false,
                revision: self.revision()?,
            });
        };
        let (resp, revision) = self.range_request(OP, request)?;
        txn::range_result(resp, options, revision).map_err(|detail| self.malformed(OP, detail))
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        const OP: &str = "run a transaction";
        validate_txn_keys(&txn)?;
        let mut request = TxnRequest::new(&txn)?;
        let body = std::mem::take(&mut request.body);
        let answer = self.call(OP, move |client| async move {
            match client.post("/v3/kv/txn", &body).await {
                Ok(answer) => Ok(Some(answer)),
                Err(f) if f.is_lease_not_found() => Ok(None),
                Err(f) => Err(f),
            }
        })?;
        let Some(answer) = answer else {
            return Err(StoreError::LeaseNotFound {
                id: self.dead_lease(&request.leases),
            });
        };
        let resp: wire::TxnResponse = answer.decode().map_err(|f| self.client.error(OP, f))?;
        request
            .response(resp)
            .map_err(|detail| self.client.error(OP, answer.malformed(detail)))
    }

    fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watcher, StoreError> {
        validate_key(prefix)?;
        let (client, prefix, capacity) = (Arc::clone(&self.client), prefix.to_owned(), self.watch_capacity);
        self.run("start a watch", watch::open(client, prefix, from, capacity))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, StoreError> {
        const OP: &str = "grant a lease";
        let seconds = (lease_ttl_ms(ttl)? + 999) / 1000;
        let grant = self.call(OP, move |client| async move {
            let answer = client
                .post("/v3/lease/grant", &json!({ "TTL": seconds.to_string() }))
                .await?;
            let grant: LeaseGrantResponse = answer.decode()?;
            if !grant.error.is_empty() {
                return Err(Failure::Status {
                    endpoint: answer.endpoint,
                    code: 0,
                    message: grant.error,
                });
            }
            if grant.id == 0 || grant.ttl <= 0 {
                return Err(answer.malformed(format!("lease {} with TTL {}", grant.id, grant.ttl)));
            }
            Ok(grant)
        })?;
        let ttl_ms = grant.ttl.saturating_mul(1000);
        Ok(LeaseGrant {
            id: LeaseId(grant.id),
            ttl_ms,
            expires_at_ms: now_ms().saturating_add(ttl_ms),
        })
    }

    fn keep_alive(&self, id: LeaseId) -> Result<LeaseGrant, StoreError> {
        let ttl = self.call("keep a lease alive", move |client| async move {
            // A stream of one request: etcd answers it once and the stream ends.
            let answer = match client
                .post("/v3/lease/keepalive", &json!({"ID": id.0.to_string()}))
                .await
            {
                Ok(a) => a,
                Err(f) if f.is_lease_not_found() => return Ok(0),
                Err(f) => return Err(f),
            };
            let first = first_message(&answer.body);
            let msg: Streamed<LeaseKeepAliveResponse> =
                wire::decode(first).map_err(|d| answer.malformed(d))?;
            match msg {
                Streamed { result: Some(r), .. } => Ok(r.ttl),
                Streamed { error: Some(e), .. } if e.message.contains("lease not found") => Ok(0),
                Streamed { error: Some(e), .. } => Err(Failure::Status {
                    endpoint: answer.endpoint,
                    code: e.grpc_code,
                    message: e.message,
                }),
                Streamed { .. } => Err(answer.malformed("an empty keep-alive answer")),
            }
        })?;
        if ttl <= 0 {
            return Err(StoreError::LeaseNotFound { id });
        }
        let ttl_ms = ttl.saturating_mul(1000);
        Ok(LeaseGrant {
            id,
            ttl_ms,
            expires_at_ms: now_ms().saturating_add(ttl_ms),
        })
    }

    fn revoke_lease(&self, id: LeaseId) -> Result<bool, StoreError> {
        self.call("revoke a lease", move |client| async move {
            match client
                .post("/v3/lease/revoke", &json!({"ID": id.0.to_string()}))
                .await
            {
                Ok(_) => Ok(true),
                Err(f) if f.is_lease_not_found() => Ok(false),
                Err(f) => Err(f),
            }
        })
    }

    /// Nothing to do: etcd's leader expires leases (and deletes their keys) by itself.
    fn expire_leases(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let target = revision.min(self.revision()?);
        if target.0 < 1 {
            return Ok(());
        }
        self.call("compact history", move |client| async move {
            match client
                .post("/v3/kv/compaction", &json!({"revision": target.0.to_string()}))
                .await
            {
                Ok(_) => Ok(()),
                // Already compacted at or past it: compaction never goes backwards.
                Err(f) if f.is_compacted() => Ok(()),
                Err(f) => Err(f),
            }
        })
    }
}

impl EtcdStore {
    fn malformed(&self, op: &'static str, detail: String) -> StoreError {
        self.client.error(
            op,
            Failure::Malformed {
                endpoint: self.client.endpoint_list(),
                detail,
            },
        )
    }
}

/// The first JSON value of a streamed answer's body (the rest, if any, is ignored).
fn first_message(body: &[u8]) -> &[u8] {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde::de::IgnoredAny>();
    match values.next() {
        Some(Ok(_)) => body.get(..values.byte_offset()).unwrap_or(body),
        _ => body,
    }
}
