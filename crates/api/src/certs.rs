//! TLS certificates of the edge for an app's custom domains (`/v1/apps/{app}/certificates…`).
//!
//! A user adds a hostname to an app ([`CreateCertificateRequest`]); the control plane records it
//! as `pending` ([`CertificateRecord`], stored at `/certs/{hostname}`); the edge's certificate
//! manager issues a certificate for it (ACME when configured, else the edge's local CA) and
//! writes the record back `ready` with its chain and key, or `failed` with the reason. The API
//! answers [`Certificate`], the record without its key and chain, plus the DNS records the user
//! should create ([`DnsRequirements`]). Fly's shapes where they exist (`hostname`, `status`,
//! `configured`, `acme_requested`, `dns_requirements`), aloft's own fields beside them.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Where a certificate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CertificateStatus {
    /// Waiting for the edge to issue it (new, re-checked, or failed before).
    Pending,
    /// Issued and served.
    Ready,
    /// The last attempt failed (`error` says why); `check` queues another.
    Failed,
}

impl CertificateStatus {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

/// Who issued a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CertificateSource {
    /// An ACME certificate authority (Let's Encrypt, or any ACME server the edge is configured with).
    Acme,
    /// The edge's local CA: trusted only by clients that trust its root (`aloft certs root`).
    Local,
}

impl CertificateSource {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acme => "acme",
            Self::Local => "local",
        }
    }
}

/// `POST /v1/apps/{app}/certificates` (and Fly's `POST …/certificates/acme`) body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateCertificateRequest {
    /// The custom domain, e.g. `www.example.com`.
    pub hostname: String,
}

/// DNS records the user creates so that the hostname reaches the edge (Fly's `dns_requirements`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DnsRequirements {
    /// IPv4 addresses of the edge for an `A` record (empty when the edge has none configured).
    #[serde(default)]
    pub a: Vec<String>,
    /// IPv6 addresses of the edge for an `AAAA` record.
    #[serde(default)]
    pub aaaa: Vec<String>,
    /// The name to point a `CNAME` at instead: `<app>.<base domain>`.
    #[serde(default)]
    pub cname: String,
}

impl DnsRequirements {
    /// One sentence per record to create, for people.
    pub fn hints(&self, hostname: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !self.cname.is_empty() {
            out.push(format!("CNAME {hostname} -> {}", self.cname));
        }
        for a in &self.a {
            out.push(format!("A {hostname} -> {a}"));
        }
        for a in &self.aaaa {
            out.push(format!("AAAA {hostname} -> {a}"));
        }
        out
    }
}

/// A certificate as the API answers it: the stored record without its key and chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Certificate {
    /// The custom domain.
    pub hostname: String,
    /// The app it routes to.
    pub app: String,
    /// `pending`, `ready` or `failed`.
    pub status: CertificateStatus,
    /// Fly's flag: a certificate is issued and served (`status` is `ready`).
    pub configured: bool,
    /// Fly's flag: an ACME certificate was asked for (always true: the edge uses ACME when it
    /// is configured, its local CA otherwise).
    pub acme_requested: bool,
    /// Who issued the current certificate; absent until one was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CertificateSource>,
    /// The issuer's name (e.g. `aloft local CA 1a2b3c4d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// When the current certificate expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the hostname was added (RFC 3339).
    pub created_at: String,
    /// When the record last changed (RFC 3339).
    pub updated_at: String,
    /// The DNS records to create.
    pub dns_requirements: DnsRequirements,
    /// The same as sentences (`CNAME www.example.com -> web.example.net`).
    #[serde(default)]
    pub check_hints: Vec<String>,
}

/// `GET /v1/apps/{app}/certificates` answer (Fly's `listCertificatesResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ListCertificatesResponse {
    /// The app's certificates, by hostname.
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    /// How many there are.
    #[serde(default)]
    pub total_count: u64,
}

/// `GET /v1/platform/edge-ca` answer: the root certificate of the edge's local CA.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EdgeCaResponse {
    /// The root certificate, PEM.
    pub pem: String,
}

/// The stored certificate of one hostname, at `/certs/{hostname}` in the control store.
///
/// Written by the control plane (created `pending`, re-queued by `check`) and by the edge's
/// certificate manager (`ready` with `chain_pem` and `key_pem`, or `failed`). Never answered by
/// the API: [`CertificateRecord::view`] is its public form. The edge seals the key with its key
/// file (`docs/adr/0014-edge-certificates.md`); records written before that hold a plaintext PEM.
/// `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// The hostname (lowercase).
    pub hostname: String,
    /// The app it routes to.
    pub app: String,
    /// `pending`, `ready` or `failed`.
    pub status: CertificateStatus,
    /// Who issued the current certificate.
    #[serde(default)]
    pub source: Option<CertificateSource>,
    /// The issuer's name.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When the current certificate expires (Unix milliseconds).
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// Why the last attempt failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When the hostname was added (Unix milliseconds).
    pub created_at_ms: i64,
    /// When the record last changed (Unix milliseconds).
    pub updated_at_ms: i64,
    /// The certificate chain, leaf first, PEM.
    #[serde(default)]
    pub chain_pem: Option<String>,
    /// The leaf's private key: sealed by the edge (`aloft-secretbox:v2:{key id}:…`; `v1:…`
    /// before key ids were recorded), or a PKCS#8 PEM in records written before keys were sealed.
    #[serde(default)]
    pub key_pem: Option<String>,
}

impl std::fmt::Debug for CertificateRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRecord")
            .field("hostname", &self.hostname)
            .field("app", &self.app)
            .field("status", &self.status)
            .field("source", &self.source)
            .field("issuer", &self.issuer)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("error", &self.error)
            .field("created_at_ms", &self.created_at_ms)
            .field("updated_at_ms", &self.updated_at_ms)
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

impl CertificateRecord {
    /// A new `pending` record of `hostname` for `app`, made at `now_ms`.
    pub fn pending(hostname: &str, app: &str, now_ms: i64) -> Self {
        Self {
            hostname: hostname.to_owned(),
            app: app.to_owned(),
            status: CertificateStatus::Pending,
            source: None,
            issuer: None,
            expires_at_ms: None,
            error: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            chain_pem: None,
            key_pem: None,
        }
    }

    /// The API's view of the record, with the DNS records to create.
    pub fn view(&self, dns: DnsRequirements) -> Certificate {
        Certificate {
            hostname: self.hostname.clone(),
            app: self.app.clone(),
            status: self.status,
            configured: self.status == CertificateStatus::Ready,
            acme_requested: true,
            source: self.source,
            issuer: self.issuer.clone(),
            expires_at: self.expires_at_ms.map(crate::rfc3339),
            error: self.error.clone(),
            created_at: crate::rfc3339(self.created_at_ms),
            updated_at: crate::rfc3339(self.updated_at_ms),
            check_hints: dns.hints(&self.hostname),
            dns_requirements: dns,
        }
    }
}

/// Checks a certificate hostname and returns it lowercased: a DNS name of at least two labels,
/// each 1–63 letters, digits and hyphens (not at either end), at most 253 bytes, no trailing dot,
/// no wildcard, not an IP address.
pub fn validate_cert_hostname(hostname: &str) -> Result<String, ApiError> {
    let h = hostname.to_ascii_lowercase();
    let bad = |why: &str| {
        Err(ApiError::bad_request(format!(
            "invalid hostname {hostname:?}: {why}; give a DNS name such as www.example.com"
        )))
    };
    if h.is_empty() || h.len() > 253 {
        return bad("a hostname has 1 to 253 characters");
    }
    if h.contains('*') {
        return bad("wildcard certificates are not supported");
    }
    let labels: Vec<&str> = h.split('.').collect();
    if labels.len() < 2 {
        return bad("a custom domain has at least two labels");
    }
    for l in &labels {
        let ok = (1..=63).contains(&l.len())
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return bad(
                "each label has 1 to 63 letters, digits or hyphens, not starting or ending with a hyphen",
            );
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|c| c.is_ascii_digit()))
    {
        return bad("IP addresses cannot have certificates here");
    }
    Ok(h)
}

/// Whether `hostname` is `base` or a name under it (`web.localhost` under `localhost`),
/// case-insensitively.
pub fn is_under_domain(hostname: &str, base: &str) -> bool {
    let (h, b) = (hostname.to_ascii_lowercase(), base.to_ascii_lowercase());
    let b = b.trim_end_matches('.');
    let h = h.trim_end_matches('.');
    h == b || h.strip_suffix(b).is_some_and(|rest| rest.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert_eq!(
            validate_cert_hostname("WWW.Example.com").unwrap(),
            "www.example.com"
        );
        assert!(validate_cert_hostname("a-b.example.co.uk").is_ok());
        for bad in [
            "",
            "localhost",
            "*.example.com",
            "-a.example.com",
            "a..example.com",
            "example.com.",
            "a_b.example.com",
            "10.0.0.1",
            "exa mple.com",
        ] {
            assert!(validate_cert_hostname(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(validate_cert_hostname(&long).is_err());
    }

    #[test]
    fn under_domain() {
        assert!(is_under_domain("web.localhost", "localhost"));
        assert!(is_under_domain("LOCALHOST", "localhost"));
        assert!(is_under_domain("a.b.apps.example.com", "apps.example.com"));
        assert!(!is_under_domain("evillocalhost", "localhost"));
        assert!(!is_under_domain("example.com", "apps.example.com"));
    }

    #[test]
    fn view_hides_the_key_and_gives_hints() {
        let mut r = CertificateRecord::pending("www.example.com", "web", 0);
        r.key_pem = Some("SECRET".into());
        r.status = CertificateStatus::Ready;
        r.expires_at_ms = Some(86_400_000);
        let v = r.view(DnsRequirements {
            a: vec!["192.0.2.1".into()],
            aaaa: vec![],
            cname: "web.apps.example.net".into(),
        });
        let json = serde_json::to_string(&v).unwrap();
        assert!(!json.contains("SECRET"), "{json}");
        assert!(!format!("{r:?}").contains("SECRET"));
        assert!(v.configured);
        assert_eq!(v.expires_at.as_deref(), Some("1970-01-02T00:00:00Z"));
        assert_eq!(
            v.check_hints,
            [
                "CNAME www.example.com -> web.apps.example.net",
                "A www.example.com -> 192.0.2.1"
            ]
        );
        let status: CertificateStatus = serde_json::from_str("\"failed\"").unwrap();
        assert_eq!(status, CertificateStatus::Failed);
    }
}
