//! Leaves' private keys sealed in their store records (`aloft-secretbox`, ADR 0014).
//!
//! A sealed `key_pem` is `aloft-secretbox:v2:{key id}:{nonce}:{ciphertext}` (nonce and ciphertext
//! base64, the key id hex: which edge key sealed it), sealed under the edges' current key with
//! the associated data `aloft-edge-cert\0{hostname}`: a sealed key copied into another hostname's
//! record does not open. `aloft-secretbox:v1:{nonce}:{ciphertext}` was written before key ids were
//! recorded: it opens with whichever of the edge's keys opens it, and the manager seals it again.
//! A `key_pem` without either prefix is a plaintext PEM written before keys were sealed; the
//! certificate manager still serves it and seals it.

use aloft_secretbox::{Keyring, Sealed, SecretboxError};

/// What starts every sealed `key_pem`.
const SEALED: &str = "aloft-secretbox:";
/// What starts a sealed `key_pem` without a key id (before rotation).
const SEALED_V1: &str = "aloft-secretbox:v1:";
/// What starts a sealed `key_pem` with the sealing key's id.
const SEALED_V2: &str = "aloft-secretbox:v2:";

/// The associated data a hostname's key is sealed with.
fn associated_data(hostname: &str) -> Vec<u8> {
    format!("aloft-edge-cert\0{}", hostname.to_ascii_lowercase()).into_bytes()
}

/// Whether a record's `key_pem` is sealed (else it is a plaintext PEM from before sealing).
pub fn is_sealed_key(stored: &str) -> bool {
    stored.starts_with(SEALED)
}

/// Seals `hostname`'s private key (PEM) for its record's `key_pem`, with the ring's current key.
pub fn seal_key_pem(keys: &Keyring, hostname: &str, key_pem: &str) -> Result<String, SecretboxError> {
    let sealed = keys.seal(key_pem.as_bytes(), &associated_data(hostname))?;
    let key_id = sealed.key_id.unwrap_or_else(|| keys.current().id().to_string());
    Ok(format!(
        "{SEALED_V2}{key_id}:{}:{}",
        sealed.nonce, sealed.ciphertext
    ))
}

/// A stored sealed key, parsed.
fn parse(stored: &str) -> Result<Sealed, SecretboxError> {
    let malformed = SecretboxError::Malformed(
        "a sealed certificate key is not aloft-secretbox:v2:KEY_ID:NONCE:CIPHERTEXT (or v1:NONCE:CIPHERTEXT)",
    );
    if let Some(rest) = stored.strip_prefix(SEALED_V2) {
        let mut parts = rest.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(key_id), Some(nonce), Some(ciphertext)) => Ok(Sealed {
                nonce: nonce.to_owned(),
                ciphertext: ciphertext.to_owned(),
                key_id: Some(key_id.to_owned()),
            }),
            _ => Err(malformed),
        }
    } else if let Some(rest) = stored.strip_prefix(SEALED_V1) {
        let (nonce, ciphertext) = rest.split_once(':').ok_or(malformed)?;
        Ok(Sealed {
            nonce: nonce.to_owned(),
            ciphertext: ciphertext.to_owned(),
            key_id: None,
        })
    } else {
        Err(malformed)
    }
}

/// Opens what [`seal_key_pem`] made for `hostname` with the ring's key that sealed it (any that
/// opens it, for a `v1` value): the private key, PEM.
pub fn open_key_pem(keys: &Keyring, hostname: &str, stored: &str) -> Result<String, SecretboxError> {
    let plain = keys.open(&parse(stored)?, &associated_data(hostname))?;
    String::from_utf8(plain).map_err(|_| SecretboxError::Malformed("a sealed certificate key is not text"))
}

/// Whether a sealed `key_pem` should be sealed again with the ring's current key: it was sealed
/// with a previous key, or before key ids were recorded (`v1`). A malformed one is not (it does
/// not open either).
pub fn needs_reseal(keys: &Keyring, stored: &str) -> bool {
    parse(stored).is_ok_and(|s| keys.needs_reseal(&s))
}

#[cfg(test)]
mod tests {
    use aloft_secretbox::Key;

    use super::*;

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";

    fn ring() -> Keyring {
        Keyring::new(Key::generate().unwrap())
    }

    #[test]
    fn sealed_keys_open_only_for_their_hostname_and_key() {
        let key = ring();
        let sealed = seal_key_pem(&key, "www.example.com", PEM).unwrap();
        assert!(is_sealed_key(&sealed));
        assert!(!is_sealed_key(PEM));
        assert!(!sealed.contains("PRIVATE KEY"), "{sealed}");
        assert_eq!(open_key_pem(&key, "WWW.example.com", &sealed).unwrap(), PEM);
        assert!(matches!(
            open_key_pem(&key, "shop.example.com", &sealed),
            Err(SecretboxError::Open)
        ));
        let other = ring();
        assert!(matches!(
            open_key_pem(&other, "www.example.com", &sealed),
            Err(SecretboxError::UnknownKey { .. })
        ));
        assert!(matches!(
            open_key_pem(&key, "www.example.com", "aloft-secretbox:v1:nocolon"),
            Err(SecretboxError::Malformed(_))
        ));
        assert!(matches!(
            open_key_pem(&key, "www.example.com", "aloft-secretbox:v2:id:nonce"),
            Err(SecretboxError::Malformed(_))
        ));
    }

    #[test]
    fn sealed_keys_record_the_key_id_and_rotate() {
        let a = Key::from_bytes(&[1; 32]).unwrap();
        let a_id = a.id().to_string();
        let before = Keyring::new(a);
        let sealed_a = seal_key_pem(&before, "www.example.com", PEM).unwrap();
        assert!(
            sealed_a.starts_with(&format!("aloft-secretbox:v2:{a_id}:")),
            "{sealed_a}"
        );
        assert!(!needs_reseal(&before, &sealed_a));

        // Rotated to B with A previous: A's value opens, and is due for re-sealing.
        let rotated = Keyring::new(Key::from_bytes(&[2; 32]).unwrap())
            .with_previous(Key::from_bytes(&[1; 32]).unwrap());
        assert_eq!(open_key_pem(&rotated, "www.example.com", &sealed_a).unwrap(), PEM);
        assert!(needs_reseal(&rotated, &sealed_a));
        let sealed_b = seal_key_pem(&rotated, "www.example.com", PEM).unwrap();
        assert!(!needs_reseal(&rotated, &sealed_b));

        // B alone: B's value opens, A's names A's id.
        let after =
            Keyring::new(Key::from_bytes(&[2; 32]).unwrap()).with_hint("use --edge-cert-key-previous");
        assert_eq!(open_key_pem(&after, "www.example.com", &sealed_b).unwrap(), PEM);
        let e = open_key_pem(&after, "www.example.com", &sealed_a).unwrap_err();
        assert!(e.to_string().contains(&a_id), "{e}");
        assert!(e.to_string().contains("--edge-cert-key-previous"), "{e}");
    }

    #[test]
    fn v1_keys_from_before_key_ids_open_with_any_key_and_are_resealed() {
        let a = Key::from_bytes(&[1; 32]).unwrap();
        let s = a
            .seal(PEM.as_bytes(), &associated_data("www.example.com"))
            .unwrap();
        let v1 = format!("aloft-secretbox:v1:{}:{}", s.nonce, s.ciphertext);
        assert!(is_sealed_key(&v1));
        let same = Keyring::new(Key::from_bytes(&[1; 32]).unwrap());
        assert_eq!(open_key_pem(&same, "www.example.com", &v1).unwrap(), PEM);
        assert!(needs_reseal(&same, &v1), "sealed again to record the key id");
        let rotated = Keyring::new(Key::from_bytes(&[2; 32]).unwrap())
            .with_previous(Key::from_bytes(&[1; 32]).unwrap());
        assert_eq!(open_key_pem(&rotated, "www.example.com", &v1).unwrap(), PEM);
        let other = Keyring::new(Key::from_bytes(&[3; 32]).unwrap());
        assert!(matches!(
            open_key_pem(&other, "www.example.com", &v1),
            Err(SecretboxError::NoKeyOpens { .. })
        ));
    }
}
