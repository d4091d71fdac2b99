//! Custom domains' certificates from an ACME CA (`--acme-directory`): aloft-acme's client as the
//! edge's [`Issuer`], proving control through the edge's own listeners ([`Challenges`]: the HTTP
//! listener answers HTTP-01 tokens, the HTTPS listener TLS-ALPN-01 handshakes).
//!
//! The account is registered on first use, not at startup, so an unreachable CA never stops
//! aloftd: the certificate record gets `failed` with the reason. Its key lives at
//! `<data dir>/edge/acme/account.key` (PKCS#8 PEM, mode 0600, directory 0700) and is reused on
//! every later start (the same key finds the same account at the CA).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aloft_acme::{Account, AcmeClient, Challenge, ChallengeKind, ChallengeSolver, SolverError};
use aloft_api::CertificateSource;
use aloft_proxy::tls::{Challenges, ClaimWatch, IssueError, Issued, Issuer};
use anyhow::Context as _;

/// The challenge type the edge answers (`--acme-challenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AcmeChallenge {
    /// HTTP-01: the CA fetches `http://{domain}/.well-known/acme-challenge/…` (port 80 must reach
    /// the edge's HTTP listener).
    #[value(name = "http-01")]
    Http01,
    /// TLS-ALPN-01: the CA makes a TLS handshake to `{domain}:443` (port 443 must reach the edge's
    /// HTTPS listener).
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
}

impl AcmeChallenge {
    fn kind(self) -> ChallengeKind {
        match self {
            Self::Http01 => ChallengeKind::Http01,
            Self::TlsAlpn01 => ChallengeKind::TlsAlpn01,
        }
    }
}

/// ACME as configured by aloftd's `--acme-*` flags.
#[derive(Debug, Clone)]
pub(crate) struct AcmeSettings {
    /// The CA's directory URL.
    pub(crate) directory: String,
    /// A PEM file with an extra trusted root for the CA's API (a private CA such as Pebble).
    pub(crate) ca_root: Option<PathBuf>,
    /// The account's contact address.
    pub(crate) email: Option<String>,
    /// How domains are validated.
    pub(crate) challenge: AcmeChallenge,
}

/// Presents challenges through the edge's listeners.
#[derive(Debug, Clone)]
struct EdgeSolver(Arc<Challenges>);

impl ChallengeSolver for EdgeSolver {
    async fn present(&self, challenge: &Challenge) -> Result<(), SolverError> {
        match challenge.kind {
            ChallengeKind::Http01 => self.0.set_http(&challenge.token, &challenge.key_authorization),
            ChallengeKind::TlsAlpn01 => {
                let cert = challenge
                    .tls_alpn01_certificate
                    .clone()
                    .ok_or("a TLS-ALPN-01 challenge came without its certificate")?;
                self.0.set_alpn(&challenge.domain, cert);
            }
        }
        Ok(())
    }

    async fn cleanup(&self, challenge: &Challenge) {
        match challenge.kind {
            ChallengeKind::Http01 => self.0.remove_http(&challenge.token),
            ChallengeKind::TlsAlpn01 => self.0.remove_alpn(&challenge.domain),
        }
    }
}

/// The edge's [`Issuer`] for custom domains when `--acme-directory` is given (source `acme`).
#[derive(Debug)]
pub(crate) struct AcmeIssuer {
    directory: String,
    extra_root: Option<Vec<u8>>,
    contact: Vec<String>,
    kind: ChallengeKind,
    key_path: PathBuf,
    solver: EdgeSolver,
    handle: tokio::runtime::Handle,
    /// The account, once registered (or found again by the stored key).
    account: tokio::sync::Mutex<Option<Arc<Account>>>,
}

impl AcmeIssuer {
    /// An issuer for `settings`, keeping the account key under `data_dir`, presenting challenges
    /// in `challenges` and running on `handle`'s runtime. Reads `--acme-ca-root` now (a missing
    /// file is a configuration error); talks to the CA only when the first certificate is due.
    pub(crate) fn new(
        settings: &AcmeSettings,
        data_dir: &Path,
        challenges: Arc<Challenges>,
        handle: tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let extra_root = match &settings.ca_root {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| {
                    format!(
                        "read --acme-ca-root {}: give a PEM file with the CA's root",
                        path.display()
                    )
                })?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    anyhow::bail!(
                        "--acme-ca-root {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    );
                }
                Some(pem)
            }
            None => None,
        };
        Ok(Self {
            directory: settings.directory.clone(),
            extra_root,
            contact: settings.email.iter().cloned().collect(),
            kind: settings.challenge.kind(),
            key_path: data_dir.join("edge").join("acme").join("account.key"),
            solver: EdgeSolver(challenges),
            handle,
            account: tokio::sync::Mutex::new(None),
        })
    }

    /// The account: cached, else found again by the stored key or registered (and its key
    /// stored).
    async fn account(&self) -> Result<Arc<Account>, IssueError> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(Arc::clone(account));
        }
        let client = AcmeClient::new(&self.directory, self.extra_root.as_deref())
            .await
            .map_err(|e| IssueError::new(format!("the ACME CA at {}: {e}", self.directory)))?;
        let stored = read_key(&self.key_path)?;
        let (account, _key_der) = Account::load_or_register(&client, stored.as_deref(), &self.contact)
            .await
            .map_err(|e| IssueError::new(format!("the ACME account at {}: {e}", self.directory)))?;
        if stored.is_none() {
            write_key(&self.key_path, account.key().to_pem().as_bytes()).map_err(|e| {
                IssueError::new(format!(
                    "store the ACME account key {}: {e}; check that aloftd may write its data directory",
                    self.key_path.display()
                ))
            })?;
        }
        let account = Arc::new(account);
        *cached = Some(Arc::clone(&account));
        Ok(account)
    }
}

/// The stored account key, `None` when there is none yet.
fn read_key(path: &Path) -> Result<Option<Vec<u8>>, IssueError> {
    match std::fs::read(path) {
        Ok(key) => Ok(Some(key)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IssueError::new(format!(
            "read the ACME account key {}: {e}; check its permissions (aloftd's user, mode 0600)",
            path.display()
        ))),
    }
}

/// Writes the account key owner-only: the directory 0700, the file created 0600 (a temporary
/// name, then renamed into place).
fn write_key(path: &Path, pem: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(pem)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Issuer for AcmeIssuer {
    fn source(&self) -> CertificateSource {
        CertificateSource::Acme
    }

    /// The directory's host (e.g. `acme-v02.api.letsencrypt.org`).
    fn name(&self) -> String {
        let rest = self
            .directory
            .split_once("://")
            .map_or(self.directory.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }

    fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
        self.handle.block_on(self.order(hostname))
    }

    /// Stops the order at its next step (its next await: a request to the CA, a poll's wait)
    /// once the edge lost its claim on issuing `hostname`.
    fn issue_claimed(&self, hostname: &str, claim: &ClaimWatch) -> Result<Issued, IssueError> {
        self.handle.block_on(async {
            tokio::select! {
                issued = self.order(hostname) => issued,
                why = claim.until_lost() => Err(IssueError::new(format!("the ACME order was stopped: {why}"))),
            }
        })
    }
}

impl AcmeIssuer {
    /// One ACME order for `hostname`, to its certificate.
    async fn order(&self, hostname: &str) -> Result<Issued, IssueError> {
        let account = self.account().await?;
        let issued = account
            .issue(&[hostname], self.kind, &self.solver)
            .await
            .map_err(|e| IssueError::new(e.to_string()))?;
        Ok(Issued {
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn settings(directory: &str) -> AcmeSettings {
        AcmeSettings {
            directory: directory.to_owned(),
            ca_root: None,
            email: Some("ops@example.test".into()),
            challenge: AcmeChallenge::TlsAlpn01,
        }
    }

    #[test]
    fn an_unreachable_ca_fails_the_issue_not_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Port 1 on loopback: nothing listens.
        let issuer = AcmeIssuer::new(
            &settings("https://127.0.0.1:1/dir"),
            dir.path(),
            Challenges::new(),
            runtime.handle().clone(),
        )
        .unwrap();
        assert_eq!(issuer.source(), CertificateSource::Acme);
        assert_eq!(issuer.name(), "127.0.0.1:1");
        let err = issuer.issue("shop.example.test").unwrap_err();
        assert!(err.reason.contains("https://127.0.0.1:1/dir"), "{err}");
        assert!(
            !dir.path().join("edge").exists(),
            "no account key without an account"
        );
    }

    #[test]
    fn an_order_stops_once_the_claim_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // A CA that accepts connections and never answers: the order would wait on it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let issuer = AcmeIssuer::new(
            &settings(&format!("https://{addr}/dir")),
            dir.path(),
            Challenges::new(),
            runtime.handle().clone(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let claim = ClaimWatch::lost_already("edge edge-b holds it now");
            let _ = tx.send(issuer.issue_claimed("shop.example.test", &claim));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the order stopped")
            .unwrap_err();
        assert!(err.reason.contains("stopped"), "{err}");
        assert!(err.reason.contains("edge edge-b holds it now"), "{err}");
        drop(silent);
    }

    #[test]
    fn a_missing_or_empty_ca_root_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut s = settings("https://ca.example.test/dir");
        s.ca_root = Some(dir.path().join("missing.pem"));
        let err = AcmeIssuer::new(&s, dir.path(), Challenges::new(), runtime.handle().clone()).unwrap_err();
        assert!(format!("{err:#}").contains("--acme-ca-root"), "{err:#}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        s.ca_root = Some(empty);
        let err = AcmeIssuer::new(&s, dir.path(), Challenges::new(), runtime.handle().clone()).unwrap_err();
        assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
    }

    #[test]
    fn the_account_key_is_written_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge").join("acme").join("account.key");
        write_key(&path, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(
            read_key(&path).unwrap().unwrap(),
            b"-----BEGIN PRIVATE KEY-----\n"
        );
        assert!(read_key(&dir.path().join("none")).unwrap().is_none());
        // Replaced in place, still owner-only.
        write_key(&path, b"second").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
    }
}
