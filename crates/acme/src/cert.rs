//! Certificates this crate makes (the order's key and CSR, TLS-ALPN-01 challenge certificates)
//! and reads (the issued chain's expiry).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::AcmeError;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737 §6.2). A TLS server answering the challenge must
/// list it among its `alpn_protocols` (after the real ones) and serve the challenge certificate
/// only to ClientHellos that offer it.
pub const ACME_TLS_ALPN_PROTOCOL: &[u8] = b"acme-tls/1";

fn generate(what: &'static str) -> impl Fn(rcgen::Error) -> AcmeError {
    move |e| AcmeError::Generate {
        what,
        why: e.to_string(),
    }
}

/// A new ECDSA P-256 key for the certificate and a DER CSR naming `domains` (the first one also
/// as the subject's CN when it fits).
pub(crate) fn key_and_csr(domains: &[String]) -> Result<(KeyPair, Vec<u8>), AcmeError> {
    let key = KeyPair::generate().map_err(generate("the certificate's key"))?;
    let mut params = CertificateParams::new(domains.to_vec()).map_err(generate("the certificate request"))?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = domains.first().filter(|d| d.len() <= 64) {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(generate("the certificate request"))?;
    Ok((key, csr.der().to_vec()))
}

/// The self-signed TLS-ALPN-01 certificate for `domain` (RFC 8737 §3): the domain as its only SAN
/// and the critical `acmeIdentifier` extension (1.3.6.1.5.5.7.1.31) holding the SHA-256 of the
/// key authorization, on a fresh P-256 key. Serve it only on handshakes for `domain` that offer
/// [`ACME_TLS_ALPN_PROTOCOL`].
pub fn tls_alpn01_certificate(domain: &str, key_authorization: &str) -> Result<Arc<CertifiedKey>, AcmeError> {
    let what = "the TLS-ALPN-01 challenge certificate";
    let key = KeyPair::generate().map_err(generate(what))?;
    let mut params = CertificateParams::new(vec![domain.to_owned()]).map_err(generate(what))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "ACME TLS-ALPN-01 challenge");
    params.distinguished_name = dn;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest.as_ref())];
    let cert = params.self_signed(&key).map_err(generate(what))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| AcmeError::Generate {
            what,
            why: e.to_string(),
        })?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        signer,
    )))
}

/// The notAfter of a DER X.509 certificate.
pub(crate) fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let mut certificate = Der::new(cert).read(0x30)?;
    let mut tbs = certificate.read(0x30)?;
    if tbs.peek() == Some(0xa0) {
        tbs.read(0xa0)?; // [0] version
    }
    tbs.read(0x02)?; // serialNumber
    tbs.read(0x30)?; // signature
    tbs.read(0x30)?; // issuer
    let mut validity = tbs.read(0x30)?;
    validity.any()?; // notBefore
    let (tag, value) = validity.any()?;
    let text = std::str::from_utf8(value.0).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            // UTCTime YYMMDDHHMMSSZ: 50..99 are 19xx (RFC 5280 §4.1.2.5.1).
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    let secs = days_from_civil(year, month, day)? * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// A minimal DER reader: enough to walk to a certificate's validity.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }

    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element: its tag and contents.
    fn any(&mut self) -> Option<(u8, Der<'a>)> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(n)?;
            rest = after;
            bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        let (value, after) = rest.split_at_checked(len)?;
        self.0 = after;
        Some((tag, Der(value)))
    }

    /// The next element's contents if it has `tag`.
    fn read(&mut self, tag: u8) -> Option<Der<'a>> {
        match self.any()? {
            (t, value) if t == tag => Some(value),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        for (y, m, d, unix) in [
            (2031, 5, 17, 1_936_742_400u64),
            (2051, 1, 2, 2_556_230_400),
            (1999, 12, 31, 946_598_400),
        ] {
            let mut params = CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(
                not_after(cert.der()),
                Some(UNIX_EPOCH + Duration::from_secs(unix)),
                "{y}-{m}-{d}"
            );
        }
        assert_eq!(not_after(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(not_after(b""), None);
    }

    #[test]
    fn the_csr_names_every_domain_and_the_key_is_p256() {
        let (key, csr) = key_and_csr(&["a.example".into(), "b.example".into()]).unwrap();
        assert!(key.serialize_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(std::ptr::eq(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256));
        let find = |needle: &[u8]| csr.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"a.example") && find(b"b.example"));
    }

    #[test]
    fn the_tls_alpn_certificate_carries_the_critical_acme_identifier_with_the_digest() {
        let certified = tls_alpn01_certificate("a.example", "tok.thumb").unwrap();
        let der = certified.cert.first().unwrap().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, b"tok.thumb");
        // Extension: OID 1.3.6.1.5.5.7.1.31, critical TRUE, OCTET STRING { OCTET STRING digest }.
        let mut ext = vec![0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        ext.extend_from_slice(&[0x01, 0x01, 0xff, 0x04, 0x22, 0x04, 0x20]);
        ext.extend_from_slice(digest.as_ref());
        assert!(
            der.windows(ext.len()).any(|w| w == ext),
            "no critical acmeIdentifier with the digest"
        );
        assert!(der.windows(9).any(|w| w == b"a.example"));
        // (keys_match() cannot check it: webpki refuses the unknown critical extension, as it
        // should; the Pebble tests prove a CA accepts the handshake.)
        assert_eq!(certified.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
    }
}
