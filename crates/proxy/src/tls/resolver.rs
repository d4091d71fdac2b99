//! Picking the certificate for a TLS handshake by SNI, and the ACME challenges the edge answers.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ca::LocalCa;
use super::manager::CertManager;

/// The ALPN protocol of ACME's TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Whether a handshake negotiated `acme-tls/1`: the listener must close such a connection right
/// after the handshake (RFC 8737), never proxy it.
pub fn is_acme_tls(negotiated_alpn: Option<&[u8]>) -> bool {
    negotiated_alpn == Some(ACME_TLS_ALPN)
}

/// ACME challenges in progress, filled by an ACME issuer and answered by the edge:
/// TLS-ALPN-01 certificates by hostname (served by [`SniResolver`]) and HTTP-01 key
/// authorizations by token (the HTTP listener answers `GET /.well-known/acme-challenge/{token}`
/// with [`Challenges::http_response`]). Share it as `Arc<Challenges>`.
#[derive(Debug, Default)]
pub struct Challenges {
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    http: RwLock<HashMap<String, String>>,
}

/// The path prefix of HTTP-01 challenges.
pub const HTTP_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

impl Challenges {
    /// No challenges.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Serves `cert` (with the `acmeIdentifier` extension) to TLS-ALPN-01 validation of `hostname`.
    pub fn set_alpn(&self, hostname: &str, cert: Arc<CertifiedKey>) {
        self.alpn
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hostname.to_ascii_lowercase(), cert);
    }

    /// Stops serving `hostname`'s TLS-ALPN-01 certificate.
    pub fn remove_alpn(&self, hostname: &str) {
        self.alpn
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&hostname.to_ascii_lowercase());
    }

    /// The TLS-ALPN-01 certificate of `hostname`.
    pub fn alpn_cert(&self, hostname: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hostname.to_ascii_lowercase())
            .cloned()
    }

    /// Answers HTTP-01 validation of `token` with `key_authorization`.
    pub fn set_http(&self, token: &str, key_authorization: &str) {
        self.http
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Stops answering `token`.
    pub fn remove_http(&self, token: &str) {
        self.http
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }

    /// The key authorization of `token`.
    pub fn http_token(&self, token: &str) -> Option<String> {
        self.http
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// The body to answer a plain-HTTP request for `path` with, when it is a known HTTP-01
    /// challenge (`/.well-known/acme-challenge/{token}`); serve it as `200 text/plain`.
    pub fn http_response(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP_CHALLENGE_PREFIX)?;
        if token.is_empty() || token.contains('/') {
            return None;
        }
        self.http_token(token)
    }
}

/// Tells whether a name under the base domain deserves a local-CA leaf (e.g. "is `<app>` an
/// app?"), so that handshakes for random names cannot make the CA sign endlessly.
pub type NameFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The edge's [`ResolvesServerCert`]: for a ClientHello's SNI, in order,
///
/// 1. with ALPN `acme-tls/1` offered: the TLS-ALPN-01 challenge certificate of that name, or
///    nothing;
/// 2. the custom domain's certificate from the [`CertManager`], when it is `ready`;
/// 3. a local-CA leaf for the base domain and names under it (issued on first use, cached);
/// 4. nothing: the handshake fails (counted in [`SniResolver::unknown_names`]).
pub struct SniResolver {
    base_domain: String,
    ca: Arc<LocalCa>,
    manager: Option<Arc<CertManager>>,
    challenges: Arc<Challenges>,
    filter: Option<NameFilter>,
    unknown: AtomicU64,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("base_domain", &self.base_domain)
            .field("ca", &self.ca)
            .field("manager", &self.manager.is_some())
            .field("unknown", &self.unknown)
            .finish_non_exhaustive()
    }
}

impl SniResolver {
    /// A resolver for `<app>.<base_domain>` names signed by `ca`, with no custom domains and no
    /// name filter.
    pub fn new(base_domain: &str, ca: Arc<LocalCa>) -> Self {
        Self {
            base_domain: base_domain.trim_end_matches('.').to_ascii_lowercase(),
            ca,
            manager: None,
            challenges: Challenges::new(),
            filter: None,
            unknown: AtomicU64::new(0),
        }
    }

    /// Also serves the custom domains of `manager`.
    #[must_use]
    pub fn with_manager(mut self, manager: Arc<CertManager>) -> Self {
        self.manager = Some(manager);
        self
    }

    /// Serves the ACME challenges of `challenges` (share the same `Arc` with the ACME issuer).
    #[must_use]
    pub fn with_challenges(mut self, challenges: Arc<Challenges>) -> Self {
        self.challenges = challenges;
        self
    }

    /// Issues local leaves only for names under the base domain that `filter` accepts.
    #[must_use]
    pub fn with_filter(mut self, filter: NameFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// The challenges this resolver answers.
    pub fn challenges(&self) -> &Arc<Challenges> {
        &self.challenges
    }

    /// Handshakes that got no certificate (no SNI, an unknown name, a failed issue).
    pub fn unknown_names(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    fn under_base(&self, name: &str) -> bool {
        aloft_api::is_under_domain(name, &self.base_domain)
    }

    /// The certificate for a handshake with SNI `name` (`None` for no SNI) offering ALPN
    /// protocols `alpn`: what [`ResolvesServerCert::resolve`] answers.
    pub fn resolve_name(&self, name: Option<&str>, alpn: &[&[u8]]) -> Option<Arc<CertifiedKey>> {
        let found = name.and_then(|n| self.lookup(&n.to_ascii_lowercase(), alpn));
        if found.is_none() {
            self.unknown.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn lookup(&self, name: &str, alpn: &[&[u8]]) -> Option<Arc<CertifiedKey>> {
        if alpn.contains(&ACME_TLS_ALPN) {
            return self.challenges.alpn_cert(name);
        }
        if let Some(ck) = self.manager.as_ref().and_then(|m| m.cert_for(name)) {
            return Some(ck);
        }
        if self.under_base(name) && self.filter.as_ref().is_none_or(|f| f(name)) {
            return self.ca.leaf_for(name).ok();
        }
        None
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let alpn: Vec<&[u8]> = hello.alpn().map(Iterator::collect).unwrap_or_default();
        self.resolve_name(hello.server_name(), &alpn)
    }
}

/// The edge's TLS server configuration over `resolver`: rustls with the ring provider, TLS 1.2
/// and 1.3, ALPN `h2`, `http/1.1` and `acme-tls/1` (the last only ever negotiated with an ACME
/// validator, see [`is_acme_tls`]).
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use aloft_api::CertificateRecord;
    use aloft_store::{SqliteStore, Store};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::super::manager::{LocalIssuer, cert_key};
    use super::*;

    fn same(a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>) -> bool {
        a.cert == b.cert
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ca: Arc<LocalCa>,
        manager: Arc<CertManager>,
        resolver: Arc<SniResolver>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap());
        let ca = Arc::new(LocalCa::open(&dir.path().join("ca")).unwrap());
        // A custom domain whose certificate is ready (issued by the local CA) and one pending.
        for (h, app) in [("www.example.com", "web"), ("slow.example.com", "web")] {
            let r = CertificateRecord::pending(h, app, 0);
            store
                .put(&cert_key(h).unwrap(), serde_json::to_vec(&r).unwrap())
                .unwrap();
        }
        let manager = CertManager::new(
            store.clone(),
            Arc::new(LocalIssuer::new(ca.clone())),
            super::super::manager::test_config("edge-1"),
        );
        manager.load().unwrap();
        // Issue only www: mark slow as failed so process_due leaves it.
        let mut slow = CertificateRecord::pending("slow.example.com", "web", 0);
        slow.status = aloft_api::CertificateStatus::Failed;
        store
            .put(
                &cert_key("slow.example.com").unwrap(),
                serde_json::to_vec(&slow).unwrap(),
            )
            .unwrap();
        manager.load().unwrap();
        manager.process_due().unwrap();
        let resolver = Arc::new(
            SniResolver::new("localhost", ca.clone())
                .with_manager(manager.clone())
                .with_filter(Arc::new(|n: &str| n != "nope.localhost")),
        );
        Fixture {
            _dir: dir,
            ca,
            manager,
            resolver,
        }
    }

    #[test]
    fn picks_custom_then_base_domain_then_nothing() {
        let f = fixture();
        let r = &f.resolver;
        let custom = r.resolve_name(Some("WWW.example.com"), &[b"h2"]).unwrap();
        assert!(same(&custom, &f.manager.cert_for("www.example.com").unwrap()));
        let local = r.resolve_name(Some("web.localhost"), &[]).unwrap();
        assert!(same(&local, &f.ca.leaf_for("web.localhost").unwrap()));
        assert!(!same(&local, &custom));
        assert_eq!(r.unknown_names(), 0);
        // A pending/failed custom domain, an unknown name, a filtered name, no SNI: nothing.
        assert!(r.resolve_name(Some("slow.example.com"), &[]).is_none());
        assert!(r.resolve_name(Some("example.org"), &[]).is_none());
        assert!(r.resolve_name(Some("nope.localhost"), &[]).is_none());
        assert!(r.resolve_name(None, &[]).is_none());
        assert_eq!(r.unknown_names(), 4);
    }

    #[test]
    fn acme_tls_alpn_gets_only_the_challenge() {
        let f = fixture();
        let challenge = f.ca.leaf_for("challenge.localhost").unwrap();
        assert!(
            f.resolver
                .resolve_name(Some("www.example.com"), &[ACME_TLS_ALPN])
                .is_none()
        );
        f.resolver
            .challenges()
            .set_alpn("www.example.com", challenge.clone());
        let got = f
            .resolver
            .resolve_name(Some("www.example.com"), &[ACME_TLS_ALPN])
            .unwrap();
        assert!(same(&got, &challenge));
        f.resolver.challenges().remove_alpn("www.example.com");
        assert!(
            f.resolver
                .resolve_name(Some("www.example.com"), &[ACME_TLS_ALPN])
                .is_none()
        );
        assert!(is_acme_tls(Some(b"acme-tls/1")));
        assert!(!is_acme_tls(Some(b"h2")));
    }

    #[test]
    fn http_challenges() {
        let c = Challenges::new();
        c.set_http("tok", "tok.thumb");
        assert_eq!(
            c.http_response("/.well-known/acme-challenge/tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(c.http_response("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.http_response("/.well-known/acme-challenge/"), None);
        assert_eq!(c.http_response("/tok"), None);
        c.remove_http("tok");
        assert_eq!(c.http_response("/.well-known/acme-challenge/tok"), None);
    }

    /// A TLS handshake over a duplex pipe with a client trusting only `root`; returns the
    /// negotiated ALPN or the client's error.
    async fn handshake(
        config: Arc<rustls::ServerConfig>,
        root: &rustls::pki_types::CertificateDer<'static>,
        name: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let mut client =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut s = tokio_rustls::TlsAcceptor::from(config).accept(b).await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            s.write_all(&buf).await.ok()?;
            s.shutdown().await.ok()
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let result = async {
            let mut c = connector.connect(name, a).await.map_err(|e| e.to_string())?;
            c.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ping");
            Ok(c.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
        .await;
        let _ = server.await;
        result
    }

    #[tokio::test]
    async fn real_handshakes_trust_only_the_root() {
        let f = fixture();
        let config = server_config(f.resolver.clone()).unwrap();
        let root = f.ca.root_der().clone();
        assert_eq!(
            handshake(config.clone(), &root, "web.localhost").await.unwrap(),
            Some(b"h2".to_vec())
        );
        handshake(config.clone(), &root, "www.example.com").await.unwrap();
        let err = handshake(config.clone(), &root, "unknown.example.org")
            .await
            .unwrap_err();
        assert!(!err.is_empty());
        // A client trusting another root refuses the edge's certificates.
        let dir = tempfile::tempdir().unwrap();
        let other = LocalCa::open(dir.path()).unwrap();
        let err = handshake(config, other.root_der(), "web.localhost")
            .await
            .unwrap_err();
        assert!(err.contains("UnknownIssuer") || err.contains("unknown"), "{err}");
    }
}
