//! The TLS client configuration every aloft HTTP client uses (the registry client in
//! `aloft-image`, the API client in `aloft-client`): rustls with the ring provider, safe default
//! protocol versions, and certificates checked against the platform's trust store. One place, so
//! the policy cannot drift between clients.
//!
//! A host whose trust store cannot be loaded still gets a configuration: plain-HTTP endpoints keep
//! working and every certificate is refused with the reason, so HTTPS fails at the handshake saying
//! why instead of at start-up.
//!
//! [`check`] holds the TLS of `https` health checks, shared by the agent's runner and the edge's
//! prober: the same policy, plus `tls_skip_verify` and the server name.
//!
//! Depends on rustls only; no other aloft crate, no HTTP client.

use std::sync::Arc;

pub mod check;

/// rustls with the ring provider and the platform's trust store (see the crate doc).
pub fn client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
        match rustls_platform_verifier::Verifier::new(provider.clone()) {
            Ok(verifier) => Arc::new(verifier),
            Err(e) => Arc::new(NoTrustStore {
                reason: e.to_string(),
                schemes: provider.signature_verification_algorithms.supported_schemes(),
            }),
        };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Stands in for the platform verifier when the host's trust store cannot be loaded: every
/// certificate is refused with the reason.
#[derive(Debug)]
struct NoTrustStore {
    reason: String,
    schemes: Vec<rustls::SignatureScheme>,
}

impl NoTrustStore {
    fn refuse(&self) -> rustls::Error {
        rustls::Error::General(format!("cannot verify TLS certificates: {}", self.reason))
    }
}

impl rustls::client::danger::ServerCertVerifier for NoTrustStore {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Err(self.refuse())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(self.refuse())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(self.refuse())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;

    #[test]
    fn a_config_is_built() {
        assert!(client_config().is_ok());
    }

    #[test]
    fn without_a_trust_store_every_certificate_is_refused_with_the_reason() {
        let v = NoTrustStore {
            reason: "no CA bundle".to_owned(),
            schemes: vec![rustls::SignatureScheme::ED25519],
        };
        let name = rustls::pki_types::ServerName::try_from("example.com").unwrap();
        let err = v
            .verify_server_cert(
                &rustls::pki_types::CertificateDer::from(vec![0u8; 4]),
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("no CA bundle"), "{err}");
        assert_eq!(v.supported_verify_schemes(), [rustls::SignatureScheme::ED25519]);
    }
}
