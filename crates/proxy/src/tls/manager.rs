//! The certificate manager: custom domains' certificates from the control store, issued on demand
//! and renewed before they expire.
//!
//! Records live at `/certs/{hostname}` ([`CertificateRecord`]). The manager keeps every record in
//! memory (hostname → app, status, and the served key once `ready`) and follows the store's
//! changes ([`CertManager::run`]). A `pending` record, or a `ready` one with less than 30 days
//! left, is handed to the [`Issuer`]; the result is written back with compare-and-swap on the
//! record's revision (a record changed or deleted meanwhile is left alone): `ready` with the
//! chain, key and expiry, or `failed` with the reason. A failed record stays failed until someone
//! re-queues it (`aloft certs check`); a failed renewal keeps the old certificate served.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aloft_api::{CertificateRecord, CertificateSource, CertificateStatus};
use aloft_store::{EventKind, Expect, KeyValue, RangeOptions, Revision, Store, StoreError, keys};
use rustls::sign::CertifiedKey;

use super::ca::{LocalCa, RENEW_BEFORE_SECS};
use super::pem::served_cert;

/// A freshly issued certificate: the chain (leaf first) and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The chain, leaf first, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PEM.
    pub key_pem: String,
}

/// Why an issuer could not issue a certificate. The message is stored in the record's `error` and
/// shown to the user, so it should say what to fix (e.g. the DNS record the challenge missed).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct IssueError {
    /// What went wrong, for the user.
    pub reason: String,
}

impl IssueError {
    /// An error with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Issues certificates for custom domains: the local CA ([`LocalIssuer`]) or an ACME client
/// (`aloft-acme`, which fills the resolver's [`super::Challenges`] while it proves control).
///
/// [`Issuer::issue`] blocks: the manager calls it on tokio's blocking pool, one hostname at a
/// time. An async implementation runs its future with `tokio::runtime::Handle::block_on` (a
/// handle taken when it was built; blocking-pool threads may block on it).
pub trait Issuer: Send + Sync + std::fmt::Debug {
    /// Who this is, for records' `source`.
    fn source(&self) -> CertificateSource;
    /// The issuer's name for records' `issuer` (e.g. the ACME directory's host).
    fn name(&self) -> String;
    /// Issues a certificate for `hostname`.
    fn issue(&self, hostname: &str) -> Result<Issued, IssueError>;
}

/// The local CA as an [`Issuer`] (source `local`): the default when no ACME is configured.
#[derive(Debug, Clone)]
pub struct LocalIssuer {
    ca: Arc<LocalCa>,
}

impl LocalIssuer {
    /// Issues with `ca`.
    pub fn new(ca: Arc<LocalCa>) -> Self {
        Self { ca }
    }
}

impl Issuer for LocalIssuer {
    fn source(&self) -> CertificateSource {
        CertificateSource::Local
    }

    fn name(&self) -> String {
        self.ca.name().to_owned()
    }

    fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
        let c = self
            .ca
            .issue(&[hostname])
            .map_err(|e| IssueError::new(e.to_string()))?;
        Ok(Issued {
            chain_pem: c.chain_pem,
            key_pem: c.key_pem,
        })
    }
}

/// Why the manager could not read or write the store.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The store failed.
    #[error("certificate store: {0}")]
    Store(#[from] StoreError),
    /// The manager's background work stopped (the runtime is shutting down).
    #[error("certificate manager task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone)]
struct Entry {
    record: CertificateRecord,
    revision: Revision,
    served: Option<Arc<CertifiedKey>>,
    not_after_unix: Option<i64>,
}

/// What one [`CertManager::process_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Certificates issued and stored `ready`.
    pub issued: usize,
    /// Attempts that failed (stored `failed`, or renewal errors kept in `error`).
    pub failed: usize,
}

/// The certificate manager (see the module doc). Share it as `Arc<CertManager>`.
pub struct CertManager {
    store: Arc<dyn Store>,
    issuer: Arc<dyn Issuer>,
    entries: RwLock<HashMap<String, Entry>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("issuer", &self.issuer)
            .field("hostnames", &self.read().len())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The store key of `hostname`'s record.
pub fn cert_key(hostname: &str) -> Result<String, StoreError> {
    Ok(format!(
        "{}{}",
        keys::CERTS,
        keys::segment(&hostname.to_ascii_lowercase())?
    ))
}

/// How often [`CertManager::run`] looks for certificates to renew even when nothing changed.
const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

impl CertManager {
    /// A manager over `store` that issues with `issuer`. It knows nothing until [`Self::load`]
    /// (or [`Self::run`], which loads first).
    pub fn new(store: Arc<dyn Store>, issuer: Arc<dyn Issuer>) -> Arc<Self> {
        Arc::new(Self {
            store,
            issuer,
            entries: RwLock::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The certificate to serve for `hostname` (any case), if its record is `ready` (or is being
    /// renewed and still has one).
    pub fn cert_for(&self, hostname: &str) -> Option<Arc<CertifiedKey>> {
        self.read().get(&hostname.to_ascii_lowercase())?.served.clone()
    }

    /// The app a custom domain routes to, whatever its certificate's status (plain HTTP to a
    /// custom domain works before its certificate is ready).
    pub fn app_for(&self, hostname: &str) -> Option<String> {
        self.read()
            .get(&hostname.to_ascii_lowercase())
            .map(|e| e.record.app.clone())
    }

    /// The status of `hostname`'s certificate, if it has a record.
    pub fn status(&self, hostname: &str) -> Option<CertificateStatus> {
        self.read()
            .get(&hostname.to_ascii_lowercase())
            .map(|e| e.record.status)
    }

    /// How many hostnames have records.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no hostname has a record.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Reads every record (blocking), replacing what the manager knew; returns the store's
    /// revision it read at (watch from the next one).
    pub fn load(&self) -> Result<Revision, CertError> {
        let mut options = RangeOptions::default();
        let mut fresh = HashMap::new();
        let revision = loop {
            let range = self.store.range(keys::CERTS, &options)?;
            for kv in &range.kvs {
                if let Some(e) = entry_of(kv) {
                    fresh.insert(e.record.hostname.clone(), e);
                }
            }
            if !range.more {
                break range.revision;
            }
            options.after = range.kvs.last().map(|kv| kv.key.clone());
        };
        *self.write() = fresh;
        Ok(revision)
    }

    /// Applies one change of a record (from a watch). Returns whether it needs the issuer.
    fn apply(&self, kind: EventKind, kv: &KeyValue) -> bool {
        let Some(hostname) = kv.key.strip_prefix(keys::CERTS) else {
            return false;
        };
        match kind {
            EventKind::Delete => {
                self.write().remove(hostname);
                false
            }
            EventKind::Put => match entry_of(kv) {
                Some(e) => {
                    let due = e.record.status == CertificateStatus::Pending;
                    self.write().insert(hostname.to_owned(), e);
                    due
                }
                None => {
                    self.write().remove(hostname);
                    false
                }
            },
        }
    }

    /// Hostnames that need the issuer now: pending, or ready with less than 30 days left.
    fn due(&self, now_unix: i64) -> Vec<(String, Revision, CertificateRecord)> {
        self.read()
            .iter()
            .filter(|(_, e)| match e.record.status {
                CertificateStatus::Pending => true,
                CertificateStatus::Ready => e.not_after_unix.is_none_or(|t| t - now_unix < RENEW_BEFORE_SECS),
                CertificateStatus::Failed => false,
            })
            .map(|(h, e)| (h.clone(), e.revision, e.record.clone()))
            .collect()
    }

    /// Issues every due certificate (blocking: store calls and the issuer) and writes the results
    /// back. Run it on the blocking pool; [`Self::run`] does.
    pub fn process_due(&self) -> Result<ProcessReport, CertError> {
        let mut report = ProcessReport::default();
        let now_unix = now_ms() / 1000;
        for (hostname, revision, mut record) in self.due(now_unix) {
            let renewing = record.status == CertificateStatus::Ready;
            let result = self.issuer.issue(&hostname).and_then(|i| {
                let served = served_cert(&i.chain_pem, &i.key_pem)
                    .map_err(|e| IssueError::new(format!("the issuer's certificate is unusable: {e}")))?;
                Ok((i, served))
            });
            record.updated_at_ms = now_ms();
            match result {
                Ok((issued, served)) => {
                    report.issued += 1;
                    record.status = CertificateStatus::Ready;
                    record.source = Some(self.issuer.source());
                    record.issuer = Some(self.issuer.name());
                    record.expires_at_ms = Some(served.not_after_unix.saturating_mul(1000));
                    record.error = None;
                    record.chain_pem = Some(issued.chain_pem);
                    record.key_pem = Some(issued.key_pem);
                }
                Err(e) => {
                    report.failed += 1;
                    record.error = Some(e.reason);
                    if !renewing {
                        record.status = CertificateStatus::Failed;
                    }
                }
            }
            let value = serde_json::to_vec(&record).map_err(|e| CertError::Task(e.to_string()))?;
            let key = cert_key(&hostname)?;
            match self.store.put_if(&key, value, Expect::Revision(revision), None) {
                Ok(rev) => {
                    // Apply at once: the watch will deliver the same record again (harmless).
                    let kv = KeyValue {
                        key,
                        value: serde_json::to_vec(&record).map_err(|e| CertError::Task(e.to_string()))?,
                        create_revision: Revision::ZERO,
                        mod_revision: rev,
                        version: 0,
                        lease: None,
                    };
                    self.apply(EventKind::Put, &kv);
                }
                // Changed (re-queued, deleted, or written by another edge) meanwhile: leave it.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }

    /// Follows the store until the runtime shuts down: loads every record, watches `/certs/`,
    /// and issues and renews certificates as they become due (at once for new pending records,
    /// hourly for renewals). Spawn it: `tokio::spawn(manager.clone().run())`.
    pub async fn run(self: Arc<Self>) -> Result<(), CertError> {
        let worker = tokio::spawn(self.clone().work());
        let result = self.follow().await;
        worker.abort();
        result
    }

    /// The watch half of [`Self::run`]: keeps the map current and wakes the worker. Returns only
    /// when the first load fails; later failures are retried every second.
    async fn follow(self: &Arc<Self>) -> Result<(), CertError> {
        let mut first = true;
        loop {
            let me = self.clone();
            let watched = blocking(move || {
                let revision = me.load()?;
                Ok(me.store.watch(keys::CERTS, Some(revision.next()))?)
            })
            .await;
            let mut watcher = match watched {
                Ok(w) => w,
                Err(e) if first => return Err(e),
                // History compacted meanwhile, or the store failing: load again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            first = false;
            self.wake.notify_one();
            // Until the watch ends (lagged, closed): then load everything again.
            while let Ok(batch) = watcher.recv_async().await {
                let mut due = false;
                for ev in &batch.events {
                    due |= self.apply(ev.kind, &ev.kv);
                }
                if due {
                    self.wake.notify_one();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The issuing half of [`Self::run`].
    async fn work(self: Arc<Self>) {
        loop {
            let me = self.clone();
            // Errors (a store hiccup) are retried on the next wake or tick.
            let _ = blocking(move || me.process_due()).await;
            let _ = tokio::time::timeout(RENEW_CHECK_INTERVAL, self.wake.notified()).await;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CertError> + Send + 'static,
) -> Result<T, CertError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CertError::Task(e.to_string()))?
}

/// The entry of a stored record; `None` for a record that does not parse (ignored, as if absent).
fn entry_of(kv: &KeyValue) -> Option<Entry> {
    let record: CertificateRecord = serde_json::from_slice(&kv.value).ok()?;
    let served = match (&record.chain_pem, &record.key_pem) {
        (Some(c), Some(k)) => served_cert(c, k).ok(),
        _ => None,
    };
    Some(Entry {
        revision: kv.mod_revision,
        not_after_unix: served.as_ref().map(|s| s.not_after_unix),
        served: served.map(|s| s.key),
        record,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aloft_store::SqliteStore;

    use super::*;

    #[derive(Debug)]
    struct Failing(AtomicUsize);

    impl Issuer for Failing {
        fn source(&self) -> CertificateSource {
            CertificateSource::Acme
        }
        fn name(&self) -> String {
            "failing".into()
        }
        fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(IssueError::new(format!("no DNS record for {hostname}")))
        }
    }

    fn put_pending(store: &dyn Store, hostname: &str, app: &str) {
        let r = CertificateRecord::pending(hostname, app, now_ms());
        store
            .put(&cert_key(hostname).unwrap(), serde_json::to_vec(&r).unwrap())
            .unwrap();
    }

    fn stored(store: &dyn Store, hostname: &str) -> CertificateRecord {
        let kv = store.get(&cert_key(hostname).unwrap()).unwrap().unwrap();
        serde_json::from_slice(&kv.value).unwrap()
    }

    fn setup() -> (tempfile::TempDir, Arc<dyn Store>, Arc<LocalCa>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap());
        let ca = Arc::new(LocalCa::open(&dir.path().join("ca")).unwrap());
        (dir, store, ca)
    }

    #[test]
    fn pending_becomes_ready_with_the_local_issuer() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let m = CertManager::new(store.clone(), Arc::new(LocalIssuer::new(ca.clone())));
        m.load().unwrap();
        assert_eq!(m.app_for("WWW.example.com").as_deref(), Some("web"));
        assert!(m.cert_for("www.example.com").is_none());
        assert_eq!(m.process_due().unwrap(), ProcessReport { issued: 1, failed: 0 });
        let r = stored(store.as_ref(), "www.example.com");
        assert_eq!(r.status, CertificateStatus::Ready);
        assert_eq!(r.source, Some(CertificateSource::Local));
        assert_eq!(r.issuer.as_deref(), Some(ca.name()));
        assert!(r.expires_at_ms.unwrap() > now_ms() + 80 * 86_400_000);
        assert!(r.key_pem.unwrap().contains("PRIVATE KEY"));
        assert!(m.cert_for("www.example.com").is_some());
        // Nothing is due any more.
        assert_eq!(m.process_due().unwrap(), ProcessReport::default());
    }

    #[test]
    fn failures_are_recorded_and_not_retried_until_requeued() {
        let (_dir, store, _ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let issuer = Arc::new(Failing(AtomicUsize::new(0)));
        let m = CertManager::new(store.clone(), issuer.clone());
        m.load().unwrap();
        assert_eq!(m.process_due().unwrap().failed, 1);
        let r = stored(store.as_ref(), "www.example.com");
        assert_eq!(r.status, CertificateStatus::Failed);
        assert_eq!(r.error.as_deref(), Some("no DNS record for www.example.com"));
        m.process_due().unwrap();
        assert_eq!(issuer.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_record_changed_meanwhile_is_not_overwritten() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let m = CertManager::new(store.clone(), Arc::new(LocalIssuer::new(ca)));
        m.load().unwrap();
        // Someone deletes it after the manager read it.
        store.delete(&cert_key("www.example.com").unwrap()).unwrap();
        m.process_due().unwrap();
        assert!(
            store
                .get(&cert_key("www.example.com").unwrap())
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_manager_follows_the_store() {
        let (_dir, store, ca) = setup();
        let m = CertManager::new(store.clone(), Arc::new(LocalIssuer::new(ca)));
        let task = tokio::spawn(m.clone().run());
        put_pending(store.as_ref(), "api.example.com", "api");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while m.cert_for("api.example.com").is_none() {
            assert!(tokio::time::Instant::now() < deadline, "never issued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(m.status("api.example.com"), Some(CertificateStatus::Ready));
        assert_eq!(
            stored(store.as_ref(), "api.example.com").status,
            CertificateStatus::Ready
        );
        // A deletion reaches it too.
        store.delete(&cert_key("api.example.com").unwrap()).unwrap();
        while m.app_for("api.example.com").is_some() {
            assert!(tokio::time::Instant::now() < deadline, "deletion never seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
