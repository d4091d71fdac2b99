//! The edge's local certificate authority: a root made on first use and kept on disk, and the
//! leaf certificates it signs for the base domain's names (and any hostname when no ACME issuer
//! is configured).
//!
//! The root is ECDSA P-256, valid for ten years, named `aloft local CA <key id>` (the key id is
//! the first four bytes of its key's identifier, so two installations' roots never share a
//! name). It is stored as `ca.pem` (mode 0644) and `ca.key` (PKCS#8, mode 0600) in the directory
//! the caller gives (aloftd: `<data dir>/edge/ca/`). Leaves are ECDSA P-256 too, valid 90 days,
//! re-issued when fewer than 30 days remain. Users trust the root with `aloft certs root`.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::pem::{KeyError, certified_key};

/// How long a leaf is valid.
pub const LEAF_LIFETIME_SECS: i64 = 90 * 86_400;
/// A certificate with less than this left is renewed.
pub const RENEW_BEFORE_SECS: i64 = 30 * 86_400;
/// How long the root is valid.
const ROOT_LIFETIME_SECS: i64 = 10 * 365 * 86_400;
/// Leaves kept in memory at most (a flood of names under the base domain cannot grow it further).
const MAX_CACHED_LEAVES: usize = 4096;

/// Why the local CA cannot be opened or cannot issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA directory or a file in it cannot be read or written.
    #[error("local CA {path}: {op}: check that the directory is writable by aloftd")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `ca.pem` or `ca.key` is damaged, or they do not belong together.
    #[error(
        "local CA in {dir} is damaged ({reason}); move ca.pem and ca.key away to make a new root \
         (clients that trusted the old root must trust the new one)"
    )]
    Damaged {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rcgen refused to make a certificate (e.g. a name it cannot encode).
    #[error("local CA cannot issue a certificate for {names}: {source}")]
    Issue {
        /// The names asked for.
        names: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A fresh leaf could not be loaded into rustls.
    #[error("local CA made a certificate rustls cannot use: {0}")]
    Key(#[from] KeyError),
}

/// A leaf certificate the CA signed. Its `Debug` leaves the key out.
#[derive(Clone)]
pub struct IssuedCert {
    /// The chain, PEM: the leaf (the root is not included: clients have it).
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after_unix: i64,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("chain_pem", &self.chain_pem)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

struct CachedLeaf {
    key: Arc<CertifiedKey>,
    not_after_unix: i64,
}

/// The local CA (see the module doc). Thread-safe; share it as `Arc<LocalCa>`.
pub struct LocalCa {
    dir: PathBuf,
    name: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, CachedLeaf>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn time_at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The root's parameters for the key `key`, and its name (which derives from the key, so the same
/// key gives the same issuer name when the CA is loaded again).
fn root_params(key: &KeyPair, now: i64) -> (CertificateParams, String) {
    let mut params = CertificateParams::default();
    let id = params.key_identifier(key);
    let hex: String = id.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "aloft");
    let name = format!("aloft local CA {hex}");
    dn.push(DnType::CommonName, name.clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time_at(now - 86_400);
    params.not_after = time_at(now + ROOT_LIFETIME_SECS);
    (params, name)
}

impl LocalCa {
    /// Opens the CA kept in `dir`, making `dir` and a new root there if it has none yet.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let io = |path: &Path, op: &'static str| {
            let path = path.to_owned();
            move |source| CaError::Io { path, op, source }
        };
        let damaged = |reason: String| CaError::Damaged {
            dir: dir.to_owned(),
            reason,
        };
        let (root_pem, key) = if key_path.exists() || cert_path.exists() {
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path, "read the root's key"))?;
            let root_pem =
                fs::read_to_string(&cert_path).map_err(io(&cert_path, "read the root certificate"))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| damaged(format!("ca.key: {e}")))?;
            (root_pem, key)
        } else {
            fs::create_dir_all(dir).map_err(io(dir, "create the directory"))?;
            let key =
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| CaError::Issue {
                    names: "the root".to_owned(),
                    source,
                })?;
            let cert = root_params(&key, now_unix())
                .0
                .self_signed(&key)
                .map_err(|source| CaError::Issue {
                    names: "the root".to_owned(),
                    source,
                })?;
            let root_pem = cert.pem();
            // The key first: a root without its key would be useless, a key without its root is
            // replaced on the next start.
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io(&key_path, "write the root's key"))?;
            write_file(&cert_path, root_pem.as_bytes(), 0o644)
                .map_err(io(&cert_path, "write the root certificate"))?;
            (root_pem, key)
        };
        let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| damaged(format!("ca.pem: {e}")))?;
        // The stored root must carry this key (its public point appears in the certificate).
        let public = key.public_key_raw();
        if !root_der.windows(public.len()).any(|w| w == public) {
            return Err(damaged("ca.pem was not made with ca.key".to_owned()));
        }
        let (params, name) = root_params(&key, now_unix());
        Ok(Self {
            dir: dir.to_owned(),
            name,
            root_pem,
            root_der,
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The root certificate, PEM: what clients trust (`curl --cacert`, a browser's authorities).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The root's name (`aloft local CA 1a2b3c4d`): the `issuer` of its certificates' records.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Signs a leaf for `names` (DNS names, `*.` wildcards allowed), valid from an hour before
    /// `now_unix` for 90 days.
    pub fn issue_at(&self, names: &[&str], now_unix: i64) -> Result<IssuedCert, CaError> {
        let err = |source| CaError::Issue {
            names: names.join(", "),
            source,
        };
        let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(owned).map_err(err)?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, *first);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = time_at(now_unix - 3600);
        let not_after_unix = now_unix + LEAF_LIFETIME_SECS;
        params.not_after = time_at(not_after_unix);
        // No serial given: rcgen derives it from the (fresh) key, unique per leaf.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(IssuedCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after_unix,
        })
    }

    /// Signs a leaf for `names`, valid from now for 90 days.
    pub fn issue(&self, names: &[&str]) -> Result<IssuedCert, CaError> {
        self.issue_at(names, now_unix())
    }

    /// A leaf for `hostname` to serve now: from the cache while it has more than 30 days left,
    /// else freshly signed (and cached).
    pub fn leaf_for(&self, hostname: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let hostname = hostname.to_ascii_lowercase();
        let now = now_unix();
        {
            let leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = leaves.get(&hostname)
                && c.not_after_unix - now > RENEW_BEFORE_SECS
            {
                return Ok(c.key.clone());
            }
        }
        let issued = self.issue_at(&[&hostname], now)?;
        let chain = vec![
            CertificateDer::from_pem_slice(issued.chain_pem.as_bytes())
                .map_err(|e| KeyError::Chain(e.to_string()))?,
        ];
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
            .map_err(|e| KeyError::Key(e.to_string()))?;
        let key = Arc::new(certified_key(chain, key)?);
        let mut leaves = self.leaves.lock().unwrap_or_else(PoisonError::into_inner);
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.retain(|_, c| c.not_after_unix - now > RENEW_BEFORE_SECS);
            if leaves.len() >= MAX_CACHED_LEAVES {
                leaves.clear();
            }
        }
        leaves.insert(
            hostname,
            CachedLeaf {
                key: key.clone(),
                not_after_unix: issued.not_after_unix,
            },
        );
        Ok(key)
    }

    /// How many leaves are cached.
    pub fn cached_leaves(&self) -> usize {
        self.leaves.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Writes `path` with `mode` through a temporary file renamed into place.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{ServerName, UnixTime};

    use super::*;

    fn verify(ca: &LocalCa, chain_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(chain_pem.as_bytes()).unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(drop)
    }

    #[test]
    fn root_persists_and_leaves_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("edge/ca");
        let ca = LocalCa::open(&ca_dir).unwrap();
        let meta = |f: &str| fs::metadata(ca_dir.join(f)).unwrap().mode() & 0o777;
        assert_eq!(meta("ca.key"), 0o600);
        assert_eq!(meta("ca.pem"), 0o644);
        assert!(ca.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.name().starts_with("aloft local CA "), "{}", ca.name());

        let again = LocalCa::open(&ca_dir).unwrap();
        assert_eq!(again.root_pem(), ca.root_pem());
        assert_eq!(again.name(), ca.name());

        // A leaf signed after reopening verifies against the root written before.
        let leaf = again.issue(&["web.localhost"]).unwrap();
        verify(&ca, &leaf.chain_pem, "web.localhost").unwrap();
        assert!(verify(&ca, &leaf.chain_pem, "other.localhost").is_err());
        let wild = again
            .issue(&["apps.example.test", "*.apps.example.test"])
            .unwrap();
        verify(&ca, &wild.chain_pem, "web.apps.example.test").unwrap();

        // Its validity is 90 days, as the DER says.
        let der = CertificateDer::from_pem_slice(leaf.chain_pem.as_bytes()).unwrap();
        assert_eq!(super::super::der::not_after_unix(&der), Some(leaf.not_after_unix));
        assert!((leaf.not_after_unix - now_unix() - LEAF_LIFETIME_SECS).abs() < 5);

        // Another CA's root does not verify this one's leaves.
        let other = LocalCa::open(&dir.path().join("other")).unwrap();
        assert_ne!(other.name(), ca.name());
        assert!(verify(&other, &leaf.chain_pem, "web.localhost").is_err());
    }

    #[test]
    fn leaves_are_cached_and_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open(dir.path()).unwrap();
        let a = ca.leaf_for("Web.localhost").unwrap();
        let b = ca.leaf_for("web.localhost").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ca.cached_leaves(), 1);
        // A leaf with less than 30 days left is replaced.
        ca.leaves
            .lock()
            .unwrap()
            .get_mut("web.localhost")
            .unwrap()
            .not_after_unix = now_unix() + 86_400;
        let c = ca.leaf_for("web.localhost").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn mismatched_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        LocalCa::open(&a).unwrap();
        LocalCa::open(&b).unwrap();
        fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
        let err = LocalCa::open(&a).unwrap_err();
        assert!(matches!(err, CaError::Damaged { .. }), "{err}");
        fs::write(a.join("ca.key"), "junk").unwrap();
        assert!(matches!(LocalCa::open(&a), Err(CaError::Damaged { .. })));
    }
}
