//! Leaves' private keys sealed in their store records (`aloft-secretbox`, ADR 0014).
//!
//! A sealed `key_pem` is `aloft-secretbox:v1:{nonce}:{ciphertext}` (both base64), sealed under
//! the edges' key with the associated data `aloft-edge-cert\0{hostname}`: a sealed key copied
//! into another hostname's record does not open. A `key_pem` without that prefix is a plaintext
//! PEM written before keys were sealed; the certificate manager still serves it and seals it.

use aloft_secretbox::{Key, Sealed, SecretboxError};

/// What starts a sealed `key_pem`.
const SEALED_PREFIX: &str = "aloft-secretbox:v1:";

/// The associated data a hostname's key is sealed with.
fn associated_data(hostname: &str) -> Vec<u8> {
    format!("aloft-edge-cert\0{}", hostname.to_ascii_lowercase()).into_bytes()
}

/// Whether a record's `key_pem` is sealed (else it is a plaintext PEM from before sealing).
pub fn is_sealed_key(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// Seals `hostname`'s private key (PEM) for its record's `key_pem`.
pub fn seal_key_pem(key: &Key, hostname: &str, key_pem: &str) -> Result<String, SecretboxError> {
    let sealed = key.seal(key_pem.as_bytes(), &associated_data(hostname))?;
    Ok(format!("{SEALED_PREFIX}{}:{}", sealed.nonce, sealed.ciphertext))
}

/// Opens what [`seal_key_pem`] made for `hostname`: the private key, PEM.
pub fn open_key_pem(key: &Key, hostname: &str, stored: &str) -> Result<String, SecretboxError> {
    let (nonce, ciphertext) = stored
        .strip_prefix(SEALED_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or(SecretboxError::Malformed(
            "a sealed certificate key is not aloft-secretbox:v1:NONCE:CIPHERTEXT",
        ))?;
    let sealed = Sealed {
        nonce: nonce.to_owned(),
        ciphertext: ciphertext.to_owned(),
        key_id: None,
    };
    let plain = key.open(&sealed, &associated_data(hostname))?;
    String::from_utf8(plain).map_err(|_| SecretboxError::Malformed("a sealed certificate key is not text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";

    #[test]
    fn sealed_keys_open_only_for_their_hostname_and_key() {
        let key = Key::generate().unwrap();
        let sealed = seal_key_pem(&key, "www.example.com", PEM).unwrap();
        assert!(is_sealed_key(&sealed));
        assert!(!is_sealed_key(PEM));
        assert!(!sealed.contains("PRIVATE KEY"), "{sealed}");
        assert_eq!(open_key_pem(&key, "WWW.example.com", &sealed).unwrap(), PEM);
        assert!(matches!(
            open_key_pem(&key, "shop.example.com", &sealed),
            Err(SecretboxError::Open)
        ));
        let other = Key::generate().unwrap();
        assert!(matches!(
            open_key_pem(&other, "www.example.com", &sealed),
            Err(SecretboxError::Open)
        ));
        assert!(matches!(
            open_key_pem(&key, "www.example.com", "aloft-secretbox:v1:nocolon"),
            Err(SecretboxError::Malformed(_))
        ));
    }
}
