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
//!
//! Several edges may share one store. Before issuing, an edge claims the hostname
//! (`ControlStore::claim_cert`: `/cert-claims/{hostname}` on a store lease of
//! [`CLAIM_TTL`], taken only while the record is at the revision the edge read), so one edge runs
//! the issuer for it; the others skip it and look again every [`CLAIM_RETRY_INTERVAL`]
//! (a claim of an edge that died expires). While the issuer runs, a thread beside it renews the
//! claim every [`CLAIM_RENEWALS_PER_TTL`]th of its TTL (`ControlStore::renew_cert_claim`: the
//! lease kept alive, the claim rewritten while still this edge's), so an issuance may take longer
//! than the TTL. Once a renewal finds the claim gone (removed, or taken by another edge after it
//! expired), or the store fails to answer until the claim may have expired, the issuer is told
//! ([`ClaimWatch`], through [`Issuer::issue_claimed`]) and nothing is written for that issuance
//! ([`ProcessReport::claim_lost`]). The result is written in one transaction that compares both
//! the record's revision and the claim's, so an edge never writes while another holds the claim.
//! The claim is released once the result is written.
//!
//! Private keys are sealed in the records (`seal.rs`: `aloft-secretbox` under the edges' current
//! key, bound to the hostname, recording the key's id). A record written before that, with a
//! plaintext PEM key, is served and sealed in place (compare-and-swap) by the next pass; so is one
//! sealed with a previous key of the edge's [`Keyring`] (a key rotation) or before key ids were
//! recorded: after one pass every key this edge can open is sealed with its current key, and the
//! previous key file can be dropped. A record whose key does not open with any of this edge's
//! keys is not served; it is logged and marked `failed` with a message naming the key id it needs,
//! which key files to configure, or how to re-issue it, and every other hostname keeps being
//! served. None of this runs on the request path: [`CertManager::cert_for`] only reads the map.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aloft_api::{CertificateRecord, CertificateSource, CertificateStatus};
use aloft_secretbox::Keyring;
use aloft_store::{
    CertClaimOutcome, ControlError, ControlStore, EventKind, Expect, HeldCertClaim, KeyValue, Op,
    RangeOptions, Revision, Store, StoreError, Txn, keys,
};
use rustls::sign::CertifiedKey;

use super::ca::{LocalCa, RENEW_BEFORE_SECS};
use super::pem::served_cert;
use super::seal::{is_sealed_key, needs_reseal, open_key_pem, seal_key_pem};

/// A freshly issued certificate: the chain (leaf first) and its key, PEM. Its `Debug` leaves the
/// key out.
#[derive(Clone)]
pub struct Issued {
    /// The chain, leaf first, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
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

    /// Issues a certificate for `hostname` while this edge holds its issuance claim: `claim`
    /// tells once the claim is lost, and then the result will not be written. An issuer with
    /// several steps (an ACME order: authorizations, challenges, finalize, download) checks
    /// [`ClaimWatch::lost`] between them, or races its future against
    /// [`ClaimWatch::until_lost`], and stops. The manager calls this one; the default runs
    /// [`Self::issue`] to its end.
    fn issue_claimed(&self, hostname: &str, claim: &ClaimWatch) -> Result<Issued, IssueError> {
        let _ = claim;
        self.issue(hostname)
    }
}

/// Whether the edge still holds the issuance claim an [`Issuer`] runs under
/// ([`Issuer::issue_claimed`]). The manager renews the claim while the issuer runs and sets this
/// once a renewal finds the claim gone (expired, removed, taken by another edge) or the store
/// stayed unreachable until the claim could have expired.
#[derive(Debug, Clone)]
pub struct ClaimWatch {
    rx: tokio::sync::watch::Receiver<Option<String>>,
}

impl ClaimWatch {
    fn new() -> (tokio::sync::watch::Sender<Option<String>>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (tx, Self { rx })
    }

    /// A claim that is never lost: for running an issuer outside the manager (tests, tools).
    pub fn held() -> Self {
        Self::new().1
    }

    /// A claim already lost, for `why`: for testing how an issuer stops.
    pub fn lost_already(why: impl Into<String>) -> Self {
        let (tx, watch) = Self::new();
        tx.send_replace(Some(why.into()));
        watch
    }

    /// Why the claim was lost, once it was: stop issuing, the result would not be written.
    pub fn lost(&self) -> Option<String> {
        self.rx.borrow().clone()
    }

    /// Resolves once the claim is lost, with why; never while it is held (race the issuing
    /// future against it).
    pub async fn until_lost(&self) -> String {
        let mut rx = self.rx.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The manager is done with this claim: nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }
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
    /// Claiming a hostname for issuing failed (the store failed).
    #[error("certificate issuance claim: {0}")]
    Claim(#[from] ControlError),
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
    /// The record's key is a plaintext PEM (written before keys were sealed): seal it.
    plaintext_key: bool,
    /// The record's key opened, but not with the current key's id (a previous key, or sealed
    /// before ids were recorded): seal it again with the current key.
    stale_seal: bool,
    /// Why the record's key cannot be used by this edge (it does not open with its key).
    unreadable: Option<String>,
}

/// What one [`CertManager::process_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Certificates issued and stored `ready`.
    pub issued: usize,
    /// Attempts that failed (stored `failed`, or renewal errors kept in `error`).
    pub failed: usize,
    /// Due hostnames skipped because another edge holds their issuance claim.
    pub claimed_elsewhere: usize,
    /// Issuances stopped, their result not written, because this edge lost the claim meanwhile
    /// (taken by another edge after it expired, removed, or the store unreachable for too long).
    pub claim_lost: usize,
    /// Records whose plaintext private key was sealed in place.
    pub sealed: usize,
    /// Records whose private key, sealed with a previous key (or before key ids were recorded),
    /// was sealed again with the current key.
    pub resealed: usize,
    /// Records marked `failed` because their key does not open with this edge's key.
    pub unreadable: usize,
}

/// How long an issuance claim lasts unless released or renewed: an edge that dies while issuing
/// holds its hostname up this long at most. An edge renews its claim every
/// [`CLAIM_RENEWALS_PER_TTL`]th of it while it issues.
pub const CLAIM_TTL: Duration = Duration::from_secs(600);

/// How many times per claim TTL an issuing edge renews its claim (every 200 s for
/// [`CLAIM_TTL`]): a renewal that fails on a store error is tried again at the next one, as long
/// as the claim cannot have expired before it.
pub const CLAIM_RENEWALS_PER_TTL: u32 = 3;

/// How soon [`CertManager::run`] looks again after skipping hostnames other edges claimed (or
/// after a failed pass).
pub const CLAIM_RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// Who runs a [`CertManager`] and how it keeps private keys in the store.
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// This edge's name, unique among the edges sharing the store: issuance claims carry it, and
    /// a claim of the same name (an earlier run of this edge) is taken over.
    pub edge_name: String,
    /// The keys leaves' private keys are sealed with in their records: the current one seals
    /// (every edge sharing the store needs it), previous ones only open (during a rotation).
    /// store needs the same one.
    pub seal_keys: Arc<Keyring>,
    /// Where the current key of [`Self::seal_keys`] lives, for messages.
    pub seal_key_file: PathBuf,
    /// How long an issuance claim lasts ([`CLAIM_TTL`] by default).
    pub claim_ttl: Duration,
}

impl CertManagerConfig {
    /// Edge `edge_name` sealing with `seal_keys` (the current one read from `seal_key_file`),
    /// claims of [`CLAIM_TTL`].
    pub fn new(
        edge_name: impl Into<String>,
        seal_keys: Arc<Keyring>,
        seal_key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            edge_name: edge_name.into(),
            seal_keys,
            seal_key_file: seal_key_file.into(),
            claim_ttl: CLAIM_TTL,
        }
    }
}

/// The certificate manager (see the module doc). Share it as `Arc<CertManager>`.
pub struct CertManager {
    store: Arc<dyn Store>,
    control: ControlStore,
    issuer: Arc<dyn Issuer>,
    config: CertManagerConfig,
    entries: RwLock<HashMap<String, Entry>>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("edge", &self.config.edge_name)
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
    keys::cert(&hostname.to_ascii_lowercase())
}

/// How often [`CertManager::run`] looks for certificates to renew even when nothing changed.
const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

impl CertManager {
    /// A manager over `store` that issues with `issuer`, as the edge `config` describes. It
    /// knows nothing until [`Self::load`] (or [`Self::run`], which loads first).
    pub fn new(store: Arc<dyn Store>, issuer: Arc<dyn Issuer>, config: CertManagerConfig) -> Arc<Self> {
        Arc::new(Self {
            control: ControlStore::new(Arc::clone(&store)),
            store,
            issuer,
            config,
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

    /// Why `hostname`'s certificate cannot be served by this edge although it has one: its
    /// private key does not open with this edge's key (the message says what to do).
    pub fn key_problem(&self, hostname: &str) -> Option<String> {
        self.read()
            .get(&hostname.to_ascii_lowercase())?
            .unreadable
            .clone()
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
                if let Some(e) = self.entry_of(kv) {
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
            EventKind::Put => match self.entry_of(kv) {
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
                // A key this edge cannot open is reported (`tidy`), not renewed over.
                CertificateStatus::Ready => {
                    e.unreadable.is_none()
                        && e.not_after_unix.is_none_or(|t| t - now_unix < RENEW_BEFORE_SECS)
                }
                CertificateStatus::Failed => false,
            })
            .map(|(h, e)| (h.clone(), e.revision, e.record.clone()))
            .collect()
    }

    /// Issues every due certificate (blocking: store calls and the issuer) and writes the results
    /// back; first seals plaintext keys and marks records whose key does not open. Run it on the
    /// blocking pool; [`Self::run`] does.
    pub fn process_due(&self) -> Result<ProcessReport, CertError> {
        let mut report = ProcessReport::default();
        self.tidy(&mut report)?;
        let now_unix = now_ms() / 1000;
        for (hostname, revision, record) in self.due(now_unix) {
            let asked = Instant::now();
            let claimed = self.control.claim_cert(
                &hostname,
                &self.config.edge_name,
                self.config.claim_ttl,
                revision,
            )?;
            let held = match claimed {
                CertClaimOutcome::Claimed(held) => held,
                // Another edge is issuing it: its result arrives through the watch, or its claim
                // expires and a later pass takes over.
                CertClaimOutcome::NotClaimed { holder: Some(_) } => {
                    report.claimed_elsewhere += 1;
                    continue;
                }
                // The record changed since it was read (another edge wrote it): the watch brings it.
                CertClaimOutcome::NotClaimed { holder: None } => continue,
            };
            let (held, written) = self.issue_one(&hostname, revision, record, held, asked, &mut report);
            let released = self.control.release_cert_claim(&held);
            written?;
            released?;
        }
        Ok(report)
    }

    /// Runs the issuer for `hostname` under the claim `held` (taken at `claimed_at` or later),
    /// renewing it meanwhile, and writes the result over `revision` if the claim is still this
    /// edge's. Returns the claim as last renewed, for releasing it.
    fn issue_one(
        &self,
        hostname: &str,
        revision: Revision,
        record: CertificateRecord,
        held: HeldCertClaim,
        claimed_at: Instant,
        report: &mut ProcessReport,
    ) -> (HeldCertClaim, Result<(), CertError>) {
        let (lost_tx, claim) = ClaimWatch::new();
        let stop = Stop::default();
        let fallback = held.clone();
        let (result, kept) = std::thread::scope(|s| {
            let keeper = s.spawn(|| self.keep_claim(held, claimed_at, &lost_tx, &stop));
            let result = {
                // Stops the keeper however the issuer ends (a panic too: the scope joins it).
                let _stop = StopOnDrop(&stop);
                self.issuer.issue_claimed(hostname, &claim)
            };
            (result, keeper.join().ok())
        });
        let Some(held) = kept else {
            return (
                fallback,
                Err(CertError::Task(format!(
                    "the task renewing the issuance claim of {hostname} failed; nothing was written"
                ))),
            );
        };
        if let Some(why) = claim.lost() {
            // Another edge may be issuing it now: its result (or a later pass) settles the record.
            eprintln!("edge {}: {why}", self.config.edge_name);
            report.claim_lost += 1;
            return (held, Ok(()));
        }
        let written = self.write_result(hostname, revision, record, result, &held, report);
        (held, written)
    }

    /// Renews `held` every [`CLAIM_RENEWALS_PER_TTL`]th of the TTL until `stop`; tells `lost`
    /// once the claim is no longer this edge's, or once the store failed to answer until the
    /// claim may have expired (it was last known good until `claimed_at` + TTL, or a renewal's
    /// start + TTL). Returns the claim as last renewed.
    fn keep_claim(
        &self,
        mut held: HeldCertClaim,
        claimed_at: Instant,
        lost: &tokio::sync::watch::Sender<Option<String>>,
        stop: &Stop,
    ) -> HeldCertClaim {
        let ttl = self.config.claim_ttl;
        let every = ttl / CLAIM_RENEWALS_PER_TTL;
        let mut good_until = claimed_at + ttl;
        while !stop.wait(every) {
            let asked = Instant::now();
            match self.control.renew_cert_claim(&mut held) {
                Ok(()) => good_until = asked + ttl,
                Err(e @ ControlError::CertClaimLost { .. }) => {
                    lost.send_replace(Some(e.to_string()));
                    break;
                }
                Err(e) if Instant::now() + every >= good_until => {
                    lost.send_replace(Some(format!(
                        "the claim on issuing {}'s certificate could not be renewed before it expires ({e}); \
                         this edge stops issuing it, and a later pass claims it again once the store answers",
                        held.hostname
                    )));
                    break;
                }
                Err(e) => eprintln!(
                    "edge {}: renewing the claim on issuing {}'s certificate: {e}; trying again in {}s",
                    self.config.edge_name,
                    held.hostname,
                    every.as_secs_f64()
                ),
            }
        }
        held
    }

    /// Writes the issuer's `result` for `hostname` into `record` over `revision`, only while
    /// `held` is still this edge's claim.
    fn write_result(
        &self,
        hostname: &str,
        revision: Revision,
        mut record: CertificateRecord,
        result: Result<Issued, IssueError>,
        held: &HeldCertClaim,
        report: &mut ProcessReport,
    ) -> Result<(), CertError> {
        let renewing = record.status == CertificateStatus::Ready;
        let result = result.and_then(|i| {
            let served = served_cert(&i.chain_pem, &i.key_pem)
                .map_err(|e| IssueError::new(format!("the issuer's certificate is unusable: {e}")))?;
            let sealed = seal_key_pem(&self.config.seal_keys, hostname, &i.key_pem).map_err(|e| {
                IssueError::new(format!("the certificate's private key could not be sealed: {e}"))
            })?;
            Ok((i.chain_pem, sealed, served))
        });
        record.updated_at_ms = now_ms();
        let issued = result.is_ok();
        match result {
            Ok((chain_pem, sealed_key, served)) => {
                record.status = CertificateStatus::Ready;
                record.source = Some(self.issuer.source());
                record.issuer = Some(self.issuer.name());
                record.expires_at_ms = Some(served.not_after_unix.saturating_mul(1000));
                record.error = None;
                record.chain_pem = Some(chain_pem);
                record.key_pem = Some(sealed_key);
            }
            Err(e) => {
                record.error = Some(e.reason);
                if !renewing {
                    record.status = CertificateStatus::Failed;
                }
            }
        }
        // Not written: the record changed meanwhile, or the claim went at the last moment.
        if self.write_back(hostname, revision, &record, Some(held))? {
            if issued {
                report.issued += 1;
            } else {
                report.failed += 1;
            }
        }
        Ok(())
    }

    /// Seals plaintext keys in place, seals keys sealed with a previous key (or without a key
    /// id) again with the current key, and marks `ready` records whose key does not open as
    /// `failed`, so `aloft certs check` re-issues them (a record already failed or re-queued is
    /// left alone: edges with different keys must not fight over it).
    fn tidy(&self, report: &mut ProcessReport) -> Result<(), CertError> {
        let work: Vec<(String, Revision, CertificateRecord, bool, bool)> = self
            .read()
            .iter()
            .filter(|(_, e)| {
                e.plaintext_key
                    || e.stale_seal
                    || (e.unreadable.is_some() && e.record.status == CertificateStatus::Ready)
            })
            .map(|(h, e)| {
                (
                    h.clone(),
                    e.revision,
                    e.record.clone(),
                    e.plaintext_key,
                    e.stale_seal,
                )
            })
            .collect();
        let seal = |hostname: &str, pem: &str| {
            seal_key_pem(&self.config.seal_keys, hostname, pem).map_err(|e| {
                CertError::Task(format!("seal the private key of {hostname}'s certificate: {e}"))
            })
        };
        for (hostname, revision, mut record, plaintext, stale) in work {
            if plaintext {
                let Some(pem) = record.key_pem.as_deref() else {
                    continue;
                };
                record.key_pem = Some(seal(&hostname, pem)?);
                if self.write_back(&hostname, revision, &record, None)? {
                    report.sealed += 1;
                }
            } else if stale {
                // Opened when loaded; opened again here so no plaintext key stays in the map.
                let Some(Ok(pem)) = record
                    .key_pem
                    .as_deref()
                    .map(|stored| open_key_pem(&self.config.seal_keys, &hostname, stored))
                else {
                    continue;
                };
                record.key_pem = Some(seal(&hostname, &pem)?);
                if self.write_back(&hostname, revision, &record, None)? {
                    report.resealed += 1;
                }
            } else {
                let Some(problem) = self.key_problem(&hostname) else {
                    continue;
                };
                record.status = CertificateStatus::Failed;
                record.error = Some(problem);
                record.updated_at_ms = now_ms();
                if self.write_back(&hostname, revision, &record, None)? {
                    report.unreadable += 1;
                }
            }
        }
        Ok(())
    }

    /// Writes `record` over `revision` and applies it at once; `false` (and nothing written) if
    /// the record changed or went meanwhile (re-queued, deleted, written by another edge), or,
    /// with `claim`, if that issuance claim is no longer at the revision this edge last wrote it
    /// (lost): both are compared in the transaction that writes.
    fn write_back(
        &self,
        hostname: &str,
        revision: Revision,
        record: &CertificateRecord,
        claim: Option<&HeldCertClaim>,
    ) -> Result<bool, CertError> {
        let value = serde_json::to_vec(record).map_err(|e| CertError::Task(e.to_string()))?;
        let key = cert_key(hostname)?;
        let mut txn = Txn::new().expect(&key, Expect::Revision(revision));
        if let Some(held) = claim {
            txn = txn.expect(
                &keys::cert_claim(&held.hostname)?,
                Expect::Revision(held.revision),
            );
        }
        let txn = txn.then(Op::Put {
            key: key.clone(),
            value: value.clone(),
            lease: None,
        });
        match self.store.txn(txn) {
            Ok(resp) if !resp.succeeded => Ok(false),
            Ok(resp) => {
                let rev = resp.revision;
                // Apply at once: the watch will deliver the same record again (harmless).
                let kv = KeyValue {
                    key,
                    value,
                    create_revision: Revision::ZERO,
                    mod_revision: rev,
                    version: 0,
                    lease: None,
                };
                self.apply(EventKind::Put, &kv);
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Follows the store until the runtime shuts down: loads every record, watches `/certs/`,
    /// and issues and renews certificates as they become due (at once for new pending records,
    /// hourly for renewals, every [`CLAIM_RETRY_INTERVAL`] while other edges hold claims or a
    /// pass failed). Spawn it: `tokio::spawn(manager.clone().run())`.
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
            let next = match blocking(move || me.process_due()).await {
                Ok(r) => {
                    self.log_sealed(&r);
                    if r.claimed_elsewhere > 0 || r.claim_lost > 0 {
                        CLAIM_RETRY_INTERVAL
                    } else {
                        RENEW_CHECK_INTERVAL
                    }
                }
                // A store hiccup: retried soon.
                Err(e) => {
                    eprintln!("edge: certificates: {e}; trying again shortly");
                    CLAIM_RETRY_INTERVAL
                }
            };
            let _ = tokio::time::timeout(next, self.wake.notified()).await;
        }
    }
}

/// Tells the claim keeper to stop ([`CertManager::keep_claim`]).
#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Waits up to `timeout`; whether it was told to stop.
    fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, timeout, |s| !*s)
            .unwrap_or_else(PoisonError::into_inner);
        *stopped
    }

    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }
}

/// Stops the keeper when dropped.
struct StopOnDrop<'a>(&'a Stop);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CertError> + Send + 'static,
) -> Result<T, CertError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CertError::Task(e.to_string()))?
}

impl CertManager {
    /// The entry of a stored record; `None` for a record that does not parse (ignored, as if
    /// absent). A sealed key is opened with this edge's key; one that does not open is noted
    /// (`unreadable`, logged while the record is `ready`), and the record is not served.
    fn entry_of(&self, kv: &KeyValue) -> Option<Entry> {
        let hostname = kv.key.strip_prefix(keys::CERTS)?;
        let record: CertificateRecord = serde_json::from_slice(&kv.value).ok()?;
        let mut plaintext_key = false;
        let mut stale_seal = false;
        let mut unreadable = None;
        let key_pem = match record.key_pem.as_deref() {
            Some(stored) if is_sealed_key(stored) => {
                match open_key_pem(&self.config.seal_keys, hostname, stored) {
                    Ok(pem) => {
                        stale_seal = needs_reseal(&self.config.seal_keys, stored);
                        Some(pem)
                    }
                    Err(e) => {
                        let problem = self.unreadable_message(hostname, &record.app, &e);
                        // Once: the next pass records it in the record (`failed`).
                        if record.status == CertificateStatus::Ready {
                            eprintln!("edge: {problem}");
                        }
                        unreadable = Some(problem);
                        None
                    }
                }
            }
            Some(plain) => {
                plaintext_key = true;
                Some(plain.to_owned())
            }
            None => None,
        };
        let served = match (&record.chain_pem, &key_pem) {
            (Some(c), Some(k)) => served_cert(c, k).ok(),
            _ => None,
        };
        Some(Entry {
            revision: kv.mod_revision,
            not_after_unix: served.as_ref().map(|s| s.not_after_unix),
            served: served.map(|s| s.key),
            record,
            plaintext_key,
            stale_seal,
            unreadable,
        })
    }

    /// Logs how many private keys a pass sealed or sealed again (counts only, never a key).
    fn log_sealed(&self, report: &ProcessReport) {
        if report.sealed > 0 || report.resealed > 0 {
            eprintln!(
                "edge {}: certificate private keys sealed with the current edge key {}: {} re-sealed \
                 (sealed with a previous key or without a key id), {} plaintext sealed",
                self.config.edge_name,
                self.config.seal_keys.current().id(),
                report.resealed,
                report.sealed,
            );
        }
    }

    /// What to tell the user about a key that does not open here.
    fn unreadable_message(&self, hostname: &str, app: &str, e: &aloft_secretbox::SecretboxError) -> String {
        format!(
            "edge {}: the private key of {hostname}'s certificate does not open with this edge's key file {} ({e}); \
             it was sealed with another edge key. Give every edge sharing the control store the same key file \
             (aloftd --edge-cert-key; while rotating, the old one with --edge-cert-key-previous), \
             or re-issue the certificate with `aloft certs check {hostname} -a {app}`",
            self.config.edge_name,
            self.config.seal_key_file.display(),
        )
    }
}

/// A config with a fresh random key, for tests.
#[cfg(test)]
pub(crate) fn test_config(edge: &str) -> CertManagerConfig {
    let key = aloft_secretbox::Key::generate().expect("a random key");
    CertManagerConfig::new(edge, Arc::new(Keyring::new(key)), "/test/edge/cert-seal.key")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aloft_store::SqliteStore;

    use aloft_secretbox::Key;

    use super::super::seal::{is_sealed_key, open_key_pem, seal_key_pem};
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
        let m = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca.clone())),
            test_config("edge-1"),
        );
        m.load().unwrap();
        assert_eq!(m.app_for("WWW.example.com").as_deref(), Some("web"));
        assert!(m.cert_for("www.example.com").is_none());
        assert_eq!(
            m.process_due().unwrap(),
            ProcessReport {
                issued: 1,
                ..ProcessReport::default()
            }
        );
        let r = stored(store.as_ref(), "www.example.com");
        assert_eq!(r.status, CertificateStatus::Ready);
        assert_eq!(r.source, Some(CertificateSource::Local));
        assert_eq!(r.issuer.as_deref(), Some(ca.name()));
        assert!(r.expires_at_ms.unwrap() > now_ms() + 80 * 86_400_000);
        assert!(m.cert_for("www.example.com").is_some());
        // Nothing is due any more.
        assert_eq!(m.process_due().unwrap(), ProcessReport::default());
    }

    #[derive(Debug)]
    struct Counting {
        inner: LocalIssuer,
        calls: AtomicUsize,
        delay: Duration,
    }

    impl Counting {
        fn new(ca: Arc<LocalCa>, delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                inner: LocalIssuer::new(ca),
                calls: AtomicUsize::new(0),
                delay,
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Issuer for Counting {
        fn source(&self) -> CertificateSource {
            self.inner.source()
        }
        fn name(&self) -> String {
            self.inner.name()
        }
        fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.inner.issue(hostname)
        }
    }

    fn with_key(edge: &str, key: &Arc<Keyring>) -> CertManagerConfig {
        CertManagerConfig::new(edge, key.clone(), format!("/test/{edge}/cert-seal.key"))
    }

    #[test]
    fn private_keys_are_sealed_in_the_store_and_served() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let key = Arc::new(Keyring::new(Key::generate().unwrap()));
        let m = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca.clone())),
            with_key("edge-1", &key),
        );
        m.load().unwrap();
        assert_eq!(m.process_due().unwrap().issued, 1);
        // The record holds no PEM private key, only the sealed one.
        let raw = store.get(&cert_key("www.example.com").unwrap()).unwrap().unwrap();
        let text = String::from_utf8(raw.value).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        let stored_key = stored(store.as_ref(), "www.example.com").key_pem.unwrap();
        assert!(is_sealed_key(&stored_key), "{stored_key}");
        let pem = open_key_pem(&key, "www.example.com", &stored_key).unwrap();
        assert!(pem.contains("PRIVATE KEY"));
        // Served here, and by another edge with the same key that reads the store afresh; the
        // served key matches the leaf.
        let served = m.cert_for("www.example.com").unwrap();
        served.keys_match().unwrap();
        let other = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca)),
            with_key("edge-2", &key),
        );
        other.load().unwrap();
        let again = other.cert_for("www.example.com").unwrap();
        again.keys_match().unwrap();
        assert_eq!(again.cert, served.cert);
        assert!(other.key_problem("www.example.com").is_none());
        assert_eq!(other.process_due().unwrap(), ProcessReport::default());
    }

    #[test]
    fn a_record_from_before_sealing_still_serves_and_is_sealed() {
        let (_dir, store, ca) = setup();
        // What an older edge wrote: a ready record with the key in plaintext.
        let leaf = ca.issue(&["old.example.com"]).unwrap();
        let mut r = CertificateRecord::pending("old.example.com", "web", now_ms());
        r.status = CertificateStatus::Ready;
        r.source = Some(CertificateSource::Local);
        r.expires_at_ms = Some(leaf.not_after_unix * 1000);
        r.chain_pem = Some(leaf.chain_pem.clone());
        r.key_pem = Some(leaf.key_pem.clone());
        store
            .put(
                &cert_key("old.example.com").unwrap(),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        let key = Arc::new(Keyring::new(Key::generate().unwrap()));
        let issuer = Counting::new(ca, Duration::ZERO);
        let m = CertManager::new(store.clone(), issuer.clone(), with_key("edge-1", &key));
        m.load().unwrap();
        let served = m.cert_for("old.example.com").unwrap();
        // The next pass seals it in place, without issuing anew.
        assert_eq!(
            m.process_due().unwrap(),
            ProcessReport {
                sealed: 1,
                ..ProcessReport::default()
            }
        );
        assert_eq!(issuer.calls(), 0);
        let now = stored(store.as_ref(), "old.example.com");
        let sealed = now.key_pem.clone().unwrap();
        assert!(is_sealed_key(&sealed));
        assert_eq!(
            open_key_pem(&key, "old.example.com", &sealed).unwrap(),
            leaf.key_pem
        );
        assert_eq!(now.chain_pem, r.chain_pem);
        assert_eq!(now.status, CertificateStatus::Ready);
        assert_eq!(m.cert_for("old.example.com").unwrap().cert, served.cert);
        assert_eq!(m.process_due().unwrap(), ProcessReport::default());
    }

    /// A `ready` record of `hostname` with a fresh leaf whose key is stored as `key_pem(pem)`;
    /// the leaf's key PEM.
    fn put_ready(
        store: &dyn Store,
        ca: &LocalCa,
        hostname: &str,
        key_pem: impl FnOnce(&str) -> String,
    ) -> String {
        let leaf = ca.issue(&[hostname]).unwrap();
        let mut r = CertificateRecord::pending(hostname, "web", now_ms());
        r.status = CertificateStatus::Ready;
        r.source = Some(CertificateSource::Local);
        r.expires_at_ms = Some(leaf.not_after_unix * 1000);
        r.chain_pem = Some(leaf.chain_pem.clone());
        r.key_pem = Some(key_pem(&leaf.key_pem));
        store
            .put(&cert_key(hostname).unwrap(), serde_json::to_vec(&r).unwrap())
            .unwrap();
        leaf.key_pem
    }

    #[test]
    fn a_rotated_edge_key_serves_old_records_reseals_them_and_then_the_old_key_can_go() {
        let (_dir, store, ca) = setup();
        let key_a = || Key::from_bytes(&[0xa; 32]).unwrap();
        let key_b = || Key::from_bytes(&[0xb; 32]).unwrap();
        let a_id = key_a().id().to_string();
        let b_id = key_b().id().to_string();
        let before = Keyring::new(key_a());
        let pem = put_ready(store.as_ref(), &ca, "www.example.com", |p| {
            seal_key_pem(&before, "www.example.com", p).unwrap()
        });
        let issuer = Counting::new(ca, Duration::ZERO);

        // Rotated: B current, A previous. Served at once; the next pass seals it with B.
        let rotated = Arc::new(Keyring::new(key_b()).with_previous(key_a()));
        let m = CertManager::new(store.clone(), issuer.clone(), with_key("edge-1", &rotated));
        m.load().unwrap();
        let served = m.cert_for("www.example.com").unwrap();
        assert_eq!(
            m.process_due().unwrap(),
            ProcessReport {
                resealed: 1,
                ..ProcessReport::default()
            }
        );
        assert_eq!(issuer.calls(), 0, "re-sealed, not re-issued");
        let now = stored(store.as_ref(), "www.example.com").key_pem.unwrap();
        assert!(now.starts_with(&format!("aloft-secretbox:v2:{b_id}:")), "{now}");
        assert_eq!(m.cert_for("www.example.com").unwrap().cert, served.cert);
        assert_eq!(m.process_due().unwrap(), ProcessReport::default());

        // A dropped: B alone serves it.
        let b_only = Arc::new(Keyring::new(key_b()));
        let m = CertManager::new(store.clone(), issuer.clone(), with_key("edge-1", &b_only));
        m.load().unwrap();
        assert_eq!(m.cert_for("www.example.com").unwrap().cert, served.cert);
        assert!(m.key_problem("www.example.com").is_none());
        assert_eq!(open_key_pem(&b_only, "www.example.com", &now).unwrap(), pem);

        // A record still sealed with A, on an edge with B alone: not served, and the message
        // names the key id it needs and the flag that configures it.
        let (_dir2, store2, ca2) = setup();
        put_ready(store2.as_ref(), &ca2, "shop.example.com", |p| {
            seal_key_pem(&before, "shop.example.com", p).unwrap()
        });
        let m = CertManager::new(store2, issuer, with_key("edge-1", &b_only));
        m.load().unwrap();
        assert!(m.cert_for("shop.example.com").is_none());
        let problem = m.key_problem("shop.example.com").unwrap();
        for part in [a_id.as_str(), b_id.as_str(), "--edge-cert-key-previous"] {
            assert!(problem.contains(part), "{part:?} missing from: {problem}");
        }
    }

    #[test]
    fn a_key_sealed_before_key_ids_serves_and_is_sealed_again_with_the_id() {
        let (_dir, store, ca) = setup();
        let key = Arc::new(Keyring::new(Key::from_bytes(&[0xc; 32]).unwrap()));
        // What an edge wrote before key ids: `v1`, no id.
        put_ready(store.as_ref(), &ca, "old.example.com", |p| {
            let s = key
                .current()
                .seal(p.as_bytes(), b"aloft-edge-cert\0old.example.com")
                .unwrap();
            format!("aloft-secretbox:v1:{}:{}", s.nonce, s.ciphertext)
        });
        let issuer = Counting::new(ca, Duration::ZERO);
        let m = CertManager::new(store.clone(), issuer.clone(), with_key("edge-1", &key));
        m.load().unwrap();
        assert!(m.cert_for("old.example.com").is_some());
        assert_eq!(
            m.process_due().unwrap(),
            ProcessReport {
                resealed: 1,
                ..ProcessReport::default()
            }
        );
        let now = stored(store.as_ref(), "old.example.com").key_pem.unwrap();
        assert!(
            now.starts_with(&format!("aloft-secretbox:v2:{}:", key.current().id())),
            "{now}"
        );
        assert_eq!(issuer.calls(), 0);
    }

    #[test]
    fn a_key_sealed_under_another_key_is_reported_and_the_rest_serves() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "shop.example.com", "shop");
        // www was issued by an edge with another key file.
        let theirs = Keyring::new(Key::generate().unwrap());
        let leaf = ca.issue(&["www.example.com"]).unwrap();
        let mut r = CertificateRecord::pending("www.example.com", "web", now_ms());
        r.status = CertificateStatus::Ready;
        r.expires_at_ms = Some(leaf.not_after_unix * 1000);
        r.chain_pem = Some(leaf.chain_pem);
        r.key_pem = Some(seal_key_pem(&theirs, "www.example.com", &leaf.key_pem).unwrap());
        store
            .put(
                &cert_key("www.example.com").unwrap(),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        let ours = Arc::new(Keyring::new(Key::generate().unwrap()));
        let issuer = Counting::new(ca, Duration::ZERO);
        let m = CertManager::new(store.clone(), issuer.clone(), with_key("edge-1", &ours));
        m.load().unwrap();

        assert!(m.cert_for("www.example.com").is_none());
        assert_eq!(m.app_for("www.example.com").as_deref(), Some("web"));
        let problem = m.key_problem("www.example.com").unwrap();
        for part in [
            "www.example.com",
            "/test/edge-1/cert-seal.key",
            "--edge-cert-key",
            "aloft certs check www.example.com -a web",
        ] {
            assert!(problem.contains(part), "{part:?} missing from: {problem}");
        }
        // Recorded in the record (failed, so `aloft certs check` re-issues it), not renewed over;
        // the other hostname is issued and served all the same.
        assert_eq!(
            m.process_due().unwrap(),
            ProcessReport {
                issued: 1,
                unreadable: 1,
                ..ProcessReport::default()
            }
        );
        assert_eq!(issuer.calls(), 1);
        let r = stored(store.as_ref(), "www.example.com");
        assert_eq!(r.status, CertificateStatus::Failed);
        assert_eq!(r.error.as_deref(), Some(problem.as_str()));
        assert!(
            m.cert_for("shop.example.com").is_some(),
            "the others keep serving"
        );
        assert_eq!(m.process_due().unwrap(), ProcessReport::default());
        // `aloft certs check`: pending again; this edge issues it with its own key.
        let mut r = stored(store.as_ref(), "www.example.com");
        r.status = CertificateStatus::Pending;
        r.error = None;
        store
            .put(
                &cert_key("www.example.com").unwrap(),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        m.load().unwrap();
        assert_eq!(m.process_due().unwrap().issued, 1);
        assert!(m.cert_for("www.example.com").is_some());
        assert!(m.key_problem("www.example.com").is_none());
    }

    #[test]
    fn two_edges_issue_a_pending_hostname_once() {
        let (_dir, store, ca) = setup();
        let key = Arc::new(Keyring::new(Key::generate().unwrap()));
        let issuer = Counting::new(ca, Duration::from_millis(300));
        let a = CertManager::new(store.clone(), issuer.clone(), with_key("edge-a", &key));
        let b = CertManager::new(store.clone(), issuer.clone(), with_key("edge-b", &key));

        // At the same time: one claims it, the other skips it.
        put_pending(store.as_ref(), "www.example.com", "web");
        a.load().unwrap();
        b.load().unwrap();
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.process_due().unwrap());
            let tb = s.spawn(|| b.process_due().unwrap());
            (ta.join().unwrap(), tb.join().unwrap())
        });
        assert_eq!(issuer.calls(), 1, "{ra:?} {rb:?}");
        assert_eq!(ra.issued + rb.issued, 1);
        assert_eq!(
            stored(store.as_ref(), "www.example.com").status,
            CertificateStatus::Ready
        );
        let control = ControlStore::new(store.clone());
        assert!(
            control.cert_claim("www.example.com").unwrap().is_none(),
            "released once written"
        );

        // One after the other: the second edge read the record before the first wrote it.
        put_pending(store.as_ref(), "shop.example.com", "shop");
        a.load().unwrap();
        b.load().unwrap();
        assert_eq!(a.process_due().unwrap().issued, 1);
        assert_eq!(b.process_due().unwrap(), ProcessReport::default());
        assert_eq!(issuer.calls(), 2);
        b.load().unwrap();
        assert!(b.cert_for("shop.example.com").is_some());
        assert!(b.cert_for("www.example.com").is_some());
    }

    #[test]
    fn a_claim_left_by_a_crashed_edge_is_taken_over_once_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(aloft_store::ManualClock::new(now_ms()));
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open_with(
                dir.path().join("control.db"),
                aloft_store::SqliteOptions {
                    clock: clock.clone(),
                    reaper_interval: None,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let ca = Arc::new(LocalCa::open(&dir.path().join("ca")).unwrap());
        let control = ControlStore::new(store.clone());
        let key = Arc::new(Keyring::new(Key::generate().unwrap()));
        let issuer = Counting::new(ca, Duration::ZERO);
        let b = CertManager::new(store.clone(), issuer.clone(), with_key("edge-b", &key));

        // Edge a claimed www and died while issuing.
        put_pending(store.as_ref(), "www.example.com", "web");
        let rev = store
            .get(&cert_key("www.example.com").unwrap())
            .unwrap()
            .unwrap()
            .mod_revision;
        let claimed = control
            .claim_cert("www.example.com", "edge-a", CLAIM_TTL, rev)
            .unwrap();
        assert!(matches!(claimed, CertClaimOutcome::Claimed(_)));
        b.load().unwrap();
        assert_eq!(
            b.process_due().unwrap(),
            ProcessReport {
                claimed_elsewhere: 1,
                ..ProcessReport::default()
            }
        );
        assert_eq!(issuer.calls(), 0);
        clock.advance(CLAIM_TTL - Duration::from_secs(1));
        assert_eq!(b.process_due().unwrap().claimed_elsewhere, 1);
        // Expired: edge b takes over.
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.process_due().unwrap().issued, 1);
        assert_eq!(issuer.calls(), 1);
        assert!(b.cert_for("www.example.com").is_some());
        assert!(control.cert_claim("www.example.com").unwrap().is_none());

        // Edge a restarted under its name takes over its own claim at once.
        put_pending(store.as_ref(), "shop.example.com", "shop");
        let rev = store
            .get(&cert_key("shop.example.com").unwrap())
            .unwrap()
            .unwrap()
            .mod_revision;
        control
            .claim_cert("shop.example.com", "edge-a", CLAIM_TTL, rev)
            .unwrap();
        let a = CertManager::new(store.clone(), issuer.clone(), with_key("edge-a", &key));
        a.load().unwrap();
        assert_eq!(a.process_due().unwrap().issued, 1);
        assert!(control.cert_claim("shop.example.com").unwrap().is_none());
    }

    /// An issuer that runs `script` (with the claim it runs under) before issuing, and stops
    /// with an error once the claim is lost, as a careful ACME client would at its next step.
    struct Scripted {
        inner: LocalIssuer,
        script: Box<dyn Fn(&ClaimWatch) + Send + Sync>,
    }

    impl std::fmt::Debug for Scripted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Scripted")
        }
    }

    impl Issuer for Scripted {
        fn source(&self) -> CertificateSource {
            self.inner.source()
        }
        fn name(&self) -> String {
            self.inner.name()
        }
        fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
            self.issue_claimed(hostname, &ClaimWatch::held())
        }
        fn issue_claimed(&self, hostname: &str, claim: &ClaimWatch) -> Result<Issued, IssueError> {
            (self.script)(claim);
            if let Some(why) = claim.lost() {
                return Err(IssueError::new(format!("stopped: {why}")));
            }
            self.inner.issue(hostname)
        }
    }

    fn record_revision(store: &dyn Store, hostname: &str) -> Revision {
        store
            .get(&cert_key(hostname).unwrap())
            .unwrap()
            .unwrap()
            .mod_revision
    }

    #[test]
    fn an_issuer_slower_than_the_claim_ttl_keeps_the_claim_and_writes_its_result() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let rev = record_revision(store.as_ref(), "www.example.com");
        let ttl = Duration::from_millis(900);
        let control = ControlStore::new(store.clone());
        let attempts = Arc::new(AtomicUsize::new(0));
        let tries = attempts.clone();
        let issuer = Arc::new(Scripted {
            inner: LocalIssuer::new(ca),
            // Four TTLs, while edge b tries to claim the hostname all along.
            script: Box::new(move |claim| {
                let start = Instant::now();
                while start.elapsed() < ttl * 4 {
                    let outcome = control.claim_cert("www.example.com", "edge-b", ttl, rev).unwrap();
                    assert!(
                        matches!(&outcome, CertClaimOutcome::NotClaimed { holder: Some(h) } if h.owner == "edge-a"),
                        "after {:?}: {outcome:?}",
                        start.elapsed()
                    );
                    assert_eq!(claim.lost(), None);
                    tries.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(ttl / 10);
                }
            }),
        });
        let mut config = test_config("edge-a");
        config.claim_ttl = ttl;
        let a = CertManager::new(store.clone(), issuer, config);
        a.load().unwrap();
        assert_eq!(
            a.process_due().unwrap(),
            ProcessReport {
                issued: 1,
                ..ProcessReport::default()
            }
        );
        assert!(attempts.load(Ordering::SeqCst) >= 20);
        assert_eq!(
            stored(store.as_ref(), "www.example.com").status,
            CertificateStatus::Ready
        );
        let control = ControlStore::new(store.clone());
        assert!(
            control.cert_claim("www.example.com").unwrap().is_none(),
            "released"
        );
    }

    #[test]
    fn an_issuer_that_loses_its_claim_stops_and_leaves_the_record_to_the_new_holder() {
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let rev = record_revision(store.as_ref(), "www.example.com");
        let ttl = Duration::from_millis(600);
        let control = ControlStore::new(store.clone());
        let taken = store.clone();
        let seen = Arc::new(Mutex::new(None));
        let saw = seen.clone();
        let issuer = Arc::new(Scripted {
            inner: LocalIssuer::new(ca.clone()),
            script: Box::new(move |claim| {
                // Mid-way the claim goes (as if it had expired) and edge b claims the hostname.
                taken.delete("/cert-claims/www.example.com").unwrap();
                let outcome = control
                    .claim_cert("www.example.com", "edge-b", CLAIM_TTL, rev)
                    .unwrap();
                assert!(matches!(outcome, CertClaimOutcome::Claimed(_)), "{outcome:?}");
                // The next renewal finds it gone: the issuer is told before its next step.
                let deadline = Instant::now() + ttl * 10;
                while claim.lost().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                *saw.lock().unwrap() = claim.lost();
            }),
        });
        let mut config = test_config("edge-a");
        config.claim_ttl = ttl;
        let a = CertManager::new(store.clone(), issuer, config);
        a.load().unwrap();
        assert_eq!(
            a.process_due().unwrap(),
            ProcessReport {
                claim_lost: 1,
                ..ProcessReport::default()
            }
        );
        let why = seen.lock().unwrap().clone().expect("the issuer was told");
        assert!(why.contains("edge edge-b holds it now"), "{why}");
        // Edge a wrote nothing, neither a certificate nor its failure, and left b's claim alone.
        let r = stored(store.as_ref(), "www.example.com");
        assert_eq!(r.status, CertificateStatus::Pending);
        assert_eq!(r.error, None);
        let control = ControlStore::new(store.clone());
        assert_eq!(
            control
                .cert_claim("www.example.com")
                .unwrap()
                .map(|c| c.owner)
                .as_deref(),
            Some("edge-b")
        );
        // Edge b (its claim its own) writes its result.
        let b = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca)),
            test_config("edge-b"),
        );
        b.load().unwrap();
        assert_eq!(b.process_due().unwrap().issued, 1);
        assert_eq!(
            stored(store.as_ref(), "www.example.com").status,
            CertificateStatus::Ready
        );
    }

    #[test]
    fn a_result_is_not_written_once_the_claim_changed_even_unnoticed() {
        // The write itself compares the claim: an issuer finishing between a lost claim and the
        // renewal that would notice writes nothing.
        let (_dir, store, ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let rev = record_revision(store.as_ref(), "www.example.com");
        let control = ControlStore::new(store.clone());
        let taken = store.clone();
        let issuer = Arc::new(Scripted {
            inner: LocalIssuer::new(ca),
            script: Box::new(move |_| {
                taken.delete("/cert-claims/www.example.com").unwrap();
                let outcome = control
                    .claim_cert("www.example.com", "edge-b", CLAIM_TTL, rev)
                    .unwrap();
                assert!(matches!(outcome, CertClaimOutcome::Claimed(_)), "{outcome:?}");
            }),
        });
        // The default TTL: no renewal happens while it runs.
        let a = CertManager::new(store.clone(), issuer, test_config("edge-a"));
        a.load().unwrap();
        assert_eq!(a.process_due().unwrap(), ProcessReport::default());
        assert_eq!(
            stored(store.as_ref(), "www.example.com").status,
            CertificateStatus::Pending
        );
    }

    #[test]
    fn failures_are_recorded_and_not_retried_until_requeued() {
        let (_dir, store, _ca) = setup();
        put_pending(store.as_ref(), "www.example.com", "web");
        let issuer = Arc::new(Failing(AtomicUsize::new(0)));
        let m = CertManager::new(store.clone(), issuer.clone(), test_config("edge-1"));
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
        let m = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca)),
            test_config("edge-1"),
        );
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
        let m = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca)),
            test_config("edge-1"),
        );
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
