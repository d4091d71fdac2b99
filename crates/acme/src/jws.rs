//! The account key (ECDSA P-256), its JWK and RFC 7638 thumbprint, and ES256 flattened JWS
//! (RFC 7515) as RFC 8555 §6.2 wants them.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use crate::AcmeError;

/// An ACME account key: ECDSA P-256 (JWS `ES256`), kept as PKCS#8 so the caller can persist it.
pub struct AccountKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountKey")
            .field("thumbprint", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

impl AccountKey {
    /// A new random key.
    pub fn generate() -> Result<Self, AcmeError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| AcmeError::AccountKey("the system's random generator failed".into()))?;
        Self::from_pkcs8_der(pkcs8.as_ref().to_vec())
    }

    /// A key from PKCS#8 bytes, DER or PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8(bytes: &[u8]) -> Result<Self, AcmeError> {
        if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            use rustls::pki_types::PrivatePkcs8KeyDer;
            use rustls::pki_types::pem::PemObject as _;
            let der = PrivatePkcs8KeyDer::from_pem_slice(bytes)
                .map_err(|e| AcmeError::AccountKey(format!("not a PKCS#8 PEM: {e}")))?;
            Self::from_pkcs8_der(der.secret_pkcs8_der().to_vec())
        } else {
            Self::from_pkcs8_der(bytes.to_vec())
        }
    }

    fn from_pkcs8_der(pkcs8: Vec<u8>) -> Result<Self, AcmeError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| AcmeError::AccountKey(format!("not an ECDSA P-256 PKCS#8 key ({e})")))?;
        Ok(Self { pair, pkcs8, rng })
    }

    /// The key as PKCS#8 DER, to persist.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), to persist.
    pub fn to_pem(&self) -> String {
        pem("PRIVATE KEY", &self.pkcs8)
    }

    /// The public key as a JWK (RFC 7517) with the members RFC 7638 orders for the thumbprint.
    pub fn jwk(&self) -> Value {
        let (x, y) = self.coordinates();
        json!({"crv": "P-256", "kty": "EC", "x": x, "y": y})
    }

    /// The JWK thumbprint (RFC 7638, SHA-256, base64url): the second half of every key
    /// authorization.
    pub fn thumbprint(&self) -> String {
        let (x, y) = self.coordinates();
        // RFC 7638 §3: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()))
    }

    /// The key authorization for a challenge token (RFC 8555 §8.1): `token.thumbprint`.
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint())
    }

    /// base64url x and y of the uncompressed point (0x04 || x || y).
    fn coordinates(&self) -> (String, String) {
        let point = self.pair.public_key().as_ref();
        let (x, y) = point
            .get(1..)
            .unwrap_or_default()
            .split_at(point.len().saturating_sub(1) / 2);
        (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y))
    }

    /// A flattened JWS of `payload` (`None`: the empty payload of a POST-as-GET) under the given
    /// protected header.
    pub(crate) fn sign(&self, protected: &Value, payload: Option<&Value>) -> Result<Value, AcmeError> {
        let protected = URL_SAFE_NO_PAD.encode(protected.to_string());
        let payload = payload.map_or_else(String::new, |p| URL_SAFE_NO_PAD.encode(p.to_string()));
        let signing_input = format!("{protected}.{payload}");
        let signature = self
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| AcmeError::AccountKey("signing failed".into()))?;
        Ok(json!({
            "protected": protected,
            "payload": payload,
            "signature": URL_SAFE_NO_PAD.encode(signature.as_ref()),
        }))
    }
}

/// PEM armour with 64-column base64 lines.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn a_key_survives_der_and_pem_round_trips() {
        let key = AccountKey::generate().unwrap();
        let from_der = AccountKey::from_pkcs8(key.pkcs8_der()).unwrap();
        let from_pem = AccountKey::from_pkcs8(key.to_pem().as_bytes()).unwrap();
        assert_eq!(from_der.thumbprint(), key.thumbprint());
        assert_eq!(from_pem.thumbprint(), key.thumbprint());
        assert!(key.to_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let other = AccountKey::generate().unwrap();
        assert_ne!(other.thumbprint(), key.thumbprint());
    }

    #[test]
    fn garbage_is_refused_with_what_to_pass() {
        let err = AccountKey::from_pkcs8(b"not a key").unwrap_err();
        assert!(err.to_string().contains("Account::load_or_register"), "{err}");
        let err = AccountKey::from_pkcs8(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert!(matches!(err, AcmeError::AccountKey(_)), "{err}");
    }

    #[test]
    fn the_jwk_holds_the_public_point_and_the_thumbprint_hashes_its_canonical_form() {
        let key = AccountKey::generate().unwrap();
        let jwk = key.jwk();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        assert_eq!((x.len(), y.len()), (32, 32));
        let mut point = vec![4u8];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        assert_eq!(point, key.pair.public_key().as_ref());
        // serde_json sorts object keys, so its compact form is RFC 7638's canonical one.
        let canonical = serde_json::to_string(&jwk).unwrap();
        assert!(
            canonical.starts_with(r#"{"crv":"P-256","kty":"EC","x":""#),
            "{canonical}"
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        assert_eq!(key.thumbprint(), URL_SAFE_NO_PAD.encode(digest));
        assert_eq!(key.key_authorization("tok"), format!("tok.{}", key.thumbprint()));
    }

    #[test]
    fn a_jws_verifies_with_the_public_key_and_carries_header_and_payload() {
        let key = AccountKey::generate().unwrap();
        let protected = json!({"alg": "ES256", "nonce": "n1", "url": "https://ca/x", "kid": "k"});
        let jws = key.sign(&protected, Some(&json!({"a": 1}))).unwrap();
        let p = jws["protected"].as_str().unwrap();
        let body = jws["payload"].as_str().unwrap();
        let sig = URL_SAFE_NO_PAD
            .decode(jws["signature"].as_str().unwrap())
            .unwrap();
        assert_eq!(sig.len(), 64, "ES256 signatures are r || s, 32 bytes each");
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.pair.public_key().as_ref());
        public.verify(format!("{p}.{body}").as_bytes(), &sig).unwrap();
        assert!(public.verify(format!("{p}.x{body}").as_bytes(), &sig).is_err());
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        assert_eq!(header, protected);
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap(), br#"{"a":1}"#);
        let get = key.sign(&protected, None).unwrap();
        assert_eq!(get["payload"], "", "POST-as-GET has an empty payload");
    }
}
