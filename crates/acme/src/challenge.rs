//! Challenges and who answers them: the caller, through [`ChallengeSolver`]. [`ChallengeStore`]
//! is a ready solver for a server that answers both kinds itself (the edge proxy).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::server::ClientHello;
use rustls::sign::CertifiedKey;

use crate::cert::ACME_TLS_ALPN_PROTOCOL;
use crate::error::SolverError;

/// The path prefix of HTTP-01 answers (RFC 8555 §8.3).
pub const HTTP01_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenge types this client answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChallengeKind {
    /// HTTP-01 (RFC 8555 §8.3): the CA fetches
    /// `http://{domain}/.well-known/acme-challenge/{token}` on port 80 and expects the key
    /// authorization as the body.
    Http01,
    /// TLS-ALPN-01 (RFC 8737): the CA connects to `{domain}:443` offering only the ALPN protocol
    /// `acme-tls/1` and expects the challenge certificate.
    TlsAlpn01,
}

impl ChallengeKind {
    /// The ACME type string: `http-01` or `tls-alpn-01`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One challenge to present: what the caller's server must answer while
/// [`Account::issue`](crate::Account::issue) waits for the CA.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// HTTP-01 or TLS-ALPN-01.
    pub kind: ChallengeKind,
    /// The domain being validated (lowercase, no trailing dot).
    pub domain: String,
    /// The CA's token.
    pub token: String,
    /// `token.thumbprint`: the HTTP-01 response body (as `text/plain` or
    /// `application/octet-stream`), and what the TLS-ALPN-01 certificate commits to.
    pub key_authorization: String,
    /// For TLS-ALPN-01: the certificate to serve for `domain` when the ClientHello offers
    /// [`ACME_TLS_ALPN_PROTOCOL`](crate::ACME_TLS_ALPN_PROTOCOL); `None` for HTTP-01.
    pub tls_alpn01_certificate: Option<Arc<CertifiedKey>>,
}

/// Publishes challenges where the CA will look for them. [`Account::issue`](crate::Account::issue)
/// calls `present` before telling the CA to validate and `cleanup` once the CA is done with that
/// challenge, whether it succeeded or not.
///
/// - HTTP-01: serve `challenge.key_authorization` at
///   `http://{challenge.domain}/.well-known/acme-challenge/{challenge.token}` (port 80).
/// - TLS-ALPN-01: on `{challenge.domain}:443`, answer handshakes whose SNI is the domain and whose
///   ALPN offers `acme-tls/1` with `challenge.tls_alpn01_certificate`, negotiating `acme-tls/1`.
///
/// Implement it with `async fn` in the impl; the futures must be `Send`.
pub trait ChallengeSolver: Send + Sync {
    /// Starts answering `challenge`; returns once it is served.
    fn present(&self, challenge: &Challenge) -> impl Future<Output = Result<(), SolverError>> + Send;
    /// Stops answering `challenge`.
    fn cleanup(&self, challenge: &Challenge) -> impl Future<Output = ()> + Send;
}

/// A [`ChallengeSolver`] that keeps pending challenges in memory for a server to look up: HTTP-01
/// answers by token, TLS-ALPN-01 certificates by domain. Share it (`Arc`) between the issuing task
/// and the HTTP and TLS listeners. One TLS-ALPN-01 challenge per domain at a time: a second
/// issuance for the same domain replaces the first one's certificate.
#[derive(Debug, Default)]
pub struct ChallengeStore {
    http01: RwLock<HashMap<String, String>>,
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl ChallengeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The HTTP-01 response body for a request path
    /// (`/.well-known/acme-challenge/{token}`), or `None` when the path is no pending challenge.
    pub fn http01_response(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PATH_PREFIX)?;
        self.http01
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// The TLS-ALPN-01 certificate pending for `domain` (case-insensitive, trailing dot ignored).
    pub fn tls_alpn01_certificate(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.tls_alpn01
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&domain)
            .cloned()
    }

    /// For a rustls `ResolvesServerCert`: the challenge certificate when the ClientHello offers
    /// `acme-tls/1` and names a domain with a pending TLS-ALPN-01 challenge; `None` otherwise
    /// (serve the normal certificate, or refuse when it offered `acme-tls/1`).
    pub fn resolve_tls_alpn01(&self, client_hello: &ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !offers_acme_tls(client_hello) {
            return None;
        }
        self.tls_alpn01_certificate(client_hello.server_name()?)
    }
}

/// Whether a ClientHello offers the `acme-tls/1` ALPN protocol (a TLS-ALPN-01 validation).
pub fn offers_acme_tls(client_hello: &ClientHello<'_>) -> bool {
    client_hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN_PROTOCOL))
}

impl ChallengeSolver for ChallengeStore {
    async fn present(&self, challenge: &Challenge) -> Result<(), SolverError> {
        match challenge.kind {
            ChallengeKind::Http01 => {
                self.http01
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(challenge.token.clone(), challenge.key_authorization.clone());
            }
            ChallengeKind::TlsAlpn01 => {
                let cert = challenge
                    .tls_alpn01_certificate
                    .clone()
                    .ok_or("a TLS-ALPN-01 challenge without its certificate")?;
                self.tls_alpn01
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(challenge.domain.clone(), cert);
            }
        }
        Ok(())
    }

    async fn cleanup(&self, challenge: &Challenge) {
        match challenge.kind {
            ChallengeKind::Http01 => {
                self.http01
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&challenge.token);
            }
            ChallengeKind::TlsAlpn01 => {
                let mut map = self.tls_alpn01.write().unwrap_or_else(PoisonError::into_inner);
                // Only this challenge's certificate: a newer issuance may have replaced it.
                let ours = challenge.tls_alpn01_certificate.as_ref();
                if map
                    .get(&challenge.domain)
                    .is_some_and(|c| ours.is_some_and(|o| Arc::ptr_eq(c, o)))
                {
                    map.remove(&challenge.domain);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(token: &str) -> Challenge {
        Challenge {
            kind: ChallengeKind::Http01,
            domain: "a.example".into(),
            token: token.into(),
            key_authorization: format!("{token}.thumb"),
            tls_alpn01_certificate: None,
        }
    }

    #[tokio::test]
    async fn the_store_serves_http01_tokens_between_present_and_cleanup() {
        let store = ChallengeStore::new();
        let c = http("tok1");
        assert_eq!(store.http01_response("/.well-known/acme-challenge/tok1"), None);
        store.present(&c).await.unwrap();
        assert_eq!(
            store
                .http01_response("/.well-known/acme-challenge/tok1")
                .as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(store.http01_response("/tok1"), None);
        assert_eq!(store.http01_response("/.well-known/acme-challenge/tok2"), None);
        store.cleanup(&c).await;
        assert_eq!(store.http01_response("/.well-known/acme-challenge/tok1"), None);
    }

    #[tokio::test]
    async fn the_store_serves_tls_alpn_certificates_by_domain_and_cleanup_keeps_a_newer_one() {
        let store = ChallengeStore::new();
        let first = Challenge {
            kind: ChallengeKind::TlsAlpn01,
            tls_alpn01_certificate: Some(crate::tls_alpn01_certificate("a.example", "t.x").unwrap()),
            ..http("t")
        };
        let second = Challenge {
            tls_alpn01_certificate: Some(crate::tls_alpn01_certificate("a.example", "u.x").unwrap()),
            ..first.clone()
        };
        store.present(&first).await.unwrap();
        assert!(store.tls_alpn01_certificate("A.Example.").is_some());
        assert!(store.tls_alpn01_certificate("b.example").is_none());
        store.present(&second).await.unwrap();
        store.cleanup(&first).await;
        let served = store.tls_alpn01_certificate("a.example").unwrap();
        assert!(Arc::ptr_eq(
            &served,
            second.tls_alpn01_certificate.as_ref().unwrap()
        ));
        store.cleanup(&second).await;
        assert!(store.tls_alpn01_certificate("a.example").is_none());
        let missing = Challenge {
            tls_alpn01_certificate: None,
            ..first
        };
        assert!(store.present(&missing).await.is_err());
    }
}
