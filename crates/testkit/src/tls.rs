//! TLS servers for tests: a rustls server configuration with a fresh self-signed certificate.

use std::sync::Arc;

use crate::FixtureError;

/// A rustls server configuration (ring) whose certificate is self-signed for `names` (DNS names
/// or IP addresses), with a key made for it.
pub fn self_signed_server(names: &[&str]) -> Result<Arc<rustls::ServerConfig>, FixtureError> {
    let tls = |e: &dyn std::fmt::Display| FixtureError::Tls(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(|e| tls(&e))?;
    let cert = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .map_err(|e| tls(&e))?
        .self_signed(&key)
        .map_err(|e| tls(&e))?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| tls(&e))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .map_err(|e| tls(&e))?;
    Ok(Arc::new(config))
}
