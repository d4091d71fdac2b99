//! PEM chains and keys to what rustls serves.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::der;

/// Why a PEM certificate chain and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The chain holds no certificate, or a PEM block is damaged.
    #[error(
        "the certificate chain is not PEM certificates ({0}); give the leaf first, then its intermediates"
    )]
    Chain(String),
    /// The key is not a PEM private key.
    #[error("the private key is not a PEM private key ({0}); give a PKCS#8, SEC1 or PKCS#1 key")]
    Key(String),
    /// rustls cannot sign with the key (unsupported algorithm) or it does not match the leaf.
    #[error("the private key cannot be used with the certificate: {0}")]
    Unusable(String),
    /// The leaf's validity cannot be read.
    #[error("the leaf certificate's validity cannot be read; is it an X.509 certificate?")]
    Validity,
}

/// A chain and key ready to serve, and when the leaf expires.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// What the resolver hands rustls.
    pub key: Arc<CertifiedKey>,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after_unix: i64,
}

/// Parses a PEM chain (leaf first) and its PEM private key into a [`ServedCert`] (ring provider).
pub fn served_cert(chain_pem: &str, key_pem: &str) -> Result<ServedCert, KeyError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KeyError::Chain(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| KeyError::Chain("no certificate".to_owned()))?;
    let not_after_unix = der::not_after_unix(leaf).ok_or(KeyError::Validity)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| KeyError::Key(e.to_string()))?;
    let key = certified_key(chain, key)?;
    Ok(ServedCert {
        key: Arc::new(key),
        not_after_unix,
    })
}

/// A [`CertifiedKey`] of DER parts, checked that the key matches the leaf.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, KeyError> {
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| KeyError::Unusable(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| KeyError::Unusable(e.to_string()))?;
    Ok(ck)
}
