//! ACME as the certificate manager's [`Issuer`]: `aloft-acme` orders the certificate and this
//! edge answers its challenges through the resolver's [`Challenges`] (HTTP-01 tokens for the HTTP
//! listener, TLS-ALPN-01 certificates for handshakes offering `acme-tls/1`).

use std::sync::Arc;

use aloft_acme::{Account, Challenge, ChallengeKind, ChallengeSolver, SolverError};
use aloft_api::CertificateSource;

use super::manager::{IssueError, Issued, Issuer};
use super::resolver::Challenges;

/// [`Challenges`] as `aloft-acme`'s [`ChallengeSolver`]: `present` publishes a challenge where
/// the edge answers it, `cleanup` withdraws it (a TLS-ALPN-01 certificate only if it is still
/// this challenge's).
#[derive(Debug, Clone)]
pub struct ChallengeBridge(pub Arc<Challenges>);

impl ChallengeSolver for ChallengeBridge {
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
            ChallengeKind::TlsAlpn01 => {
                let ours = challenge.tls_alpn01_certificate.as_ref();
                let current = self.0.alpn_cert(&challenge.domain);
                if let (Some(ours), Some(current)) = (ours, current)
                    && Arc::ptr_eq(ours, &current)
                {
                    self.0.remove_alpn(&challenge.domain);
                }
            }
        }
    }
}

/// Issues custom domains' certificates with an ACME account (source `acme`).
///
/// [`Issuer::issue`] blocks on the runtime `handle` it was built with: the manager calls it on
/// tokio's blocking pool, where that is allowed (never call it from async code).
#[derive(Debug)]
pub struct AcmeIssuer {
    account: Arc<Account>,
    kind: ChallengeKind,
    bridge: ChallengeBridge,
    handle: tokio::runtime::Handle,
    name: String,
}

impl AcmeIssuer {
    /// Issues with `account`, proving control with `kind` challenges published in `challenges`
    /// (the same `Arc` the [`super::SniResolver`] and the HTTP listener answer from). `name` is
    /// what records show as their issuer (e.g. the ACME directory's URL).
    pub fn new(
        account: Arc<Account>,
        kind: ChallengeKind,
        challenges: Arc<Challenges>,
        handle: tokio::runtime::Handle,
        name: impl Into<String>,
    ) -> Self {
        Self {
            account,
            kind,
            bridge: ChallengeBridge(challenges),
            handle,
            name: name.into(),
        }
    }
}

impl Issuer for AcmeIssuer {
    fn source(&self) -> CertificateSource {
        CertificateSource::Acme
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn issue(&self, hostname: &str) -> Result<Issued, IssueError> {
        let issued = self
            .handle
            .block_on(self.account.issue(&[hostname], self.kind, &self.bridge))
            .map_err(|e| IssueError::new(e.to_string()))?;
        Ok(Issued {
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{ACME_TLS_ALPN, LocalCa, SniResolver};

    fn challenge(kind: ChallengeKind, cert: Option<Arc<rustls::sign::CertifiedKey>>) -> Challenge {
        Challenge {
            kind,
            domain: "www.example.com".into(),
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
            tls_alpn01_certificate: cert,
        }
    }

    #[tokio::test]
    async fn challenges_are_served_while_presented() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(LocalCa::open(dir.path()).unwrap());
        let challenges = Challenges::new();
        let resolver = SniResolver::new("localhost", ca.clone()).with_challenges(challenges.clone());
        let bridge = ChallengeBridge(challenges.clone());

        let http = challenge(ChallengeKind::Http01, None);
        bridge.present(&http).await.unwrap();
        assert_eq!(
            challenges
                .http_response("/.well-known/acme-challenge/tok")
                .as_deref(),
            Some("tok.thumb")
        );
        bridge.cleanup(&http).await;
        assert_eq!(challenges.http_response("/.well-known/acme-challenge/tok"), None);

        // A challenge certificate (any certificate will do here) is served to acme-tls/1 only.
        let cert = aloft_acme::tls_alpn01_certificate("www.example.com", "tok.thumb").unwrap();
        let alpn = challenge(ChallengeKind::TlsAlpn01, Some(cert.clone()));
        bridge.present(&alpn).await.unwrap();
        let got = resolver
            .resolve_name(Some("www.example.com"), &[ACME_TLS_ALPN])
            .unwrap();
        assert!(Arc::ptr_eq(&got, &cert));
        assert!(resolver.resolve_name(Some("www.example.com"), &[b"h2"]).is_none());
        // A newer challenge for the domain is not withdrawn by the older one's cleanup.
        let newer = aloft_acme::tls_alpn01_certificate("www.example.com", "tok2.thumb").unwrap();
        bridge
            .present(&challenge(ChallengeKind::TlsAlpn01, Some(newer.clone())))
            .await
            .unwrap();
        bridge.cleanup(&alpn).await;
        assert!(Arc::ptr_eq(
            &challenges.alpn_cert("www.example.com").unwrap(),
            &newer
        ));
        bridge
            .cleanup(&challenge(ChallengeKind::TlsAlpn01, Some(newer)))
            .await;
        assert!(challenges.alpn_cert("www.example.com").is_none());
        // Without its certificate, a TLS-ALPN-01 challenge is refused.
        assert!(
            bridge
                .present(&challenge(ChallengeKind::TlsAlpn01, None))
                .await
                .is_err()
        );
    }
}
