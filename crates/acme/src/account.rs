//! An ACME account and what it does: register (or find) itself, order, validate, finalize and
//! download a certificate.

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cert::{key_and_csr, not_after, tls_alpn01_certificate};
use crate::challenge::{Challenge, ChallengeKind, ChallengeSolver};
use crate::error::{Identifier, Problem};
use crate::jws::AccountKey;
use crate::{AcmeClient, AcmeError};

/// An account registered with a CA, ready to order certificates.
#[derive(Debug)]
pub struct Account {
    client: AcmeClient,
    key: AccountKey,
    url: String,
}

/// A certificate the CA issued.
#[derive(Clone)]
pub struct Issued {
    /// The chain as the CA sent it, PEM: the leaf first, then the intermediates.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM (ECDSA P-256, generated for this certificate).
    pub key_pem: String,
    /// The leaf's notAfter: renew well before it (e.g. at two thirds of its lifetime).
    pub not_after: SystemTime,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("chain_pem", &self.chain_pem)
            .field("key_pem", &"<redacted>")
            .field("not_after", &self.not_after)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct AccountObject {
    #[serde(default)]
    status: String,
}

#[derive(Debug, Deserialize)]
struct Order {
    status: String,
    #[serde(default)]
    authorizations: Vec<String>,
    finalize: String,
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    error: Option<Problem>,
}

#[derive(Debug, Deserialize)]
struct Authorization {
    identifier: Identifier,
    status: String,
    #[serde(default)]
    challenges: Vec<ChallengeObject>,
}

#[derive(Debug, Deserialize)]
struct ChallengeObject {
    #[serde(rename = "type")]
    kind: String,
    url: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    error: Option<Problem>,
}

impl Account {
    /// The account of `key_pkcs8` (PKCS#8 DER or PEM, as returned before) or, with `None`, a new
    /// account under a new key. Registering agrees to the CA's terms of service
    /// ([`AcmeClient::terms_of_service`]); `contact` are `mailto:` URIs (a bare address gets
    /// `mailto:` prepended). An existing key finds its account again (RFC 8555 §7.3.1) rather
    /// than creating a second one. Returns the account and its key as PKCS#8 DER, for the
    /// caller to persist (it is the account: keep it secret).
    pub async fn load_or_register(
        client: &AcmeClient,
        key_pkcs8: Option<&[u8]>,
        contact: &[String],
    ) -> Result<(Self, Vec<u8>), AcmeError> {
        let key = match key_pkcs8 {
            Some(bytes) => AccountKey::from_pkcs8(bytes)?,
            None => AccountKey::generate()?,
        };
        let contact: Vec<String> = contact
            .iter()
            .map(|c| {
                if c.contains(':') {
                    c.clone()
                } else {
                    format!("mailto:{c}")
                }
            })
            .collect();
        let mut payload = json!({"termsOfServiceAgreed": true});
        if !contact.is_empty() {
            payload["contact"] = json!(contact);
        }
        let new_account = client.directory().new_account.clone();
        let response = client
            .post(&new_account, &key, None, Some(&payload), None)
            .await?;
        let url = response.location()?;
        let object: AccountObject = response.json()?;
        if object.status != "valid" {
            return Err(AcmeError::Protocol {
                url,
                what: format!(
                    "the account is {:?}, not valid; register a new account (pass no key)",
                    object.status
                ),
            });
        }
        let der = key.pkcs8_der().to_vec();
        Ok((
            Self {
                client: client.clone(),
                key,
                url,
            },
            der,
        ))
    }

    /// The account's URL at the CA (its `kid`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The account key.
    pub fn key(&self) -> &AccountKey {
        &self.key
    }

    /// Orders a certificate for `domains` (the first also its CN), has `solver` present a `kind`
    /// challenge for each domain the CA wants validated, finalizes with a CSR for a fresh P-256
    /// key and downloads the chain. Waits as the CA asks (`Retry-After`) up to the client's poll
    /// timeout per step. Domains are validated one after another; each challenge is cleaned up
    /// once the CA is done with it (not when this future is dropped midway).
    pub async fn issue<S: ChallengeSolver>(
        &self,
        domains: &[impl AsRef<str>],
        kind: ChallengeKind,
        solver: &S,
    ) -> Result<Issued, AcmeError> {
        let domains = normalize(domains)?;
        let names = domains.join(", ");
        let identifiers: Vec<Value> = domains
            .iter()
            .map(|d| json!({"type": "dns", "value": d}))
            .collect();
        let new_order = self.client.directory().new_order.clone();
        let response = self
            .post(&new_order, Some(&json!({"identifiers": identifiers})))
            .await?;
        let order_url = response.location()?;
        let order: Order = response.json()?;

        for authz_url in &order.authorizations {
            self.authorize(authz_url, kind, solver).await?;
        }

        let order: Order = self
            .client
            .poll(
                &order_url,
                &self.key,
                &self.url,
                &format!("validating {names}"),
                |o: &Order| o.status != "pending",
            )
            .await?;
        if order.status != "ready" {
            return Err(order_failed(&names, order));
        }

        let (cert_key, csr) = key_and_csr(&domains)?;
        let response = self
            .post(
                &order.finalize,
                Some(&json!({"csr": URL_SAFE_NO_PAD.encode(csr)})),
            )
            .await?;
        let mut order: Order = response.json()?;
        if order.status == "processing" {
            order = self
                .client
                .poll(
                    &order_url,
                    &self.key,
                    &self.url,
                    &format!("issuing {names}"),
                    |o: &Order| o.status != "processing",
                )
                .await?;
        }
        if order.status != "valid" {
            return Err(order_failed(&names, order));
        }
        let cert_url = order.certificate.ok_or_else(|| AcmeError::Protocol {
            url: order_url.clone(),
            what: "a valid order without a certificate URL".into(),
        })?;
        let response = self
            .client
            .post(
                &cert_url,
                &self.key,
                Some(&self.url),
                None,
                Some("application/pem-certificate-chain"),
            )
            .await?;
        let chain_pem = String::from_utf8(response.body).map_err(|_| AcmeError::Protocol {
            url: cert_url.clone(),
            what: "the certificate chain is not text (PEM)".into(),
        })?;
        let leaf = {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject as _;
            CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()
        };
        let not_after = leaf
            .and_then(Result::ok)
            .and_then(|leaf| not_after(&leaf))
            .ok_or_else(|| AcmeError::Protocol {
                url: cert_url.clone(),
                what: "the certificate chain holds no readable PEM certificate".into(),
            })?;
        Ok(Issued {
            chain_pem,
            key_pem: cert_key.serialize_pem(),
            not_after,
        })
    }

    async fn post(&self, url: &str, payload: Option<&Value>) -> Result<crate::client::Response, AcmeError> {
        self.client
            .post(url, &self.key, Some(&self.url), payload, None)
            .await
    }

    /// Gets one authorization validated with a `kind` challenge (nothing to do when it already
    /// is).
    async fn authorize<S: ChallengeSolver>(
        &self,
        authz_url: &str,
        kind: ChallengeKind,
        solver: &S,
    ) -> Result<(), AcmeError> {
        let authz: Authorization = self.post(authz_url, None).await?.json()?;
        let domain = authz.identifier.value.clone();
        match authz.status.as_str() {
            "valid" => return Ok(()),
            "pending" => {}
            _ => {
                return Err(AcmeError::Validation {
                    domain,
                    kind: kind.to_string(),
                    problem: authz.challenges.into_iter().find_map(|c| c.error).map(Box::new),
                });
            }
        }
        let Some(offered) = authz.challenges.iter().find(|c| c.kind == kind.as_str()) else {
            return Err(AcmeError::NoChallenge {
                domain,
                kind: kind.to_string(),
                offered: authz
                    .challenges
                    .iter()
                    .map(|c| c.kind.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let key_authorization = self.key.key_authorization(&offered.token);
        let tls_alpn01_certificate = match kind {
            ChallengeKind::TlsAlpn01 => Some(tls_alpn01_certificate(&domain, &key_authorization)?),
            ChallengeKind::Http01 => None,
        };
        let challenge = Challenge {
            kind,
            domain: domain.clone(),
            token: offered.token.clone(),
            key_authorization,
            tls_alpn01_certificate,
        };
        solver
            .present(&challenge)
            .await
            .map_err(|source| AcmeError::Solver {
                domain: domain.clone(),
                kind: kind.to_string(),
                source,
            })?;
        let outcome = self.validate(authz_url, &offered.url, &challenge).await;
        solver.cleanup(&challenge).await;
        outcome
    }

    /// Tells the CA the challenge is ready and waits for its verdict.
    async fn validate(
        &self,
        authz_url: &str,
        challenge_url: &str,
        challenge: &Challenge,
    ) -> Result<(), AcmeError> {
        self.post(challenge_url, Some(&json!({}))).await?;
        let authz: Authorization = self
            .client
            .poll(
                authz_url,
                &self.key,
                &self.url,
                &format!("validating {}", challenge.domain),
                |a: &Authorization| a.status != "pending",
            )
            .await?;
        if authz.status == "valid" {
            return Ok(());
        }
        let problem = authz
            .challenges
            .into_iter()
            .filter(|c| c.url == challenge_url)
            .find_map(|c| c.error)
            .map(Box::new);
        Err(AcmeError::Validation {
            domain: challenge.domain.clone(),
            kind: challenge.kind.to_string(),
            problem,
        })
    }
}

fn order_failed(names: &str, order: Order) -> AcmeError {
    AcmeError::Order {
        domains: names.to_owned(),
        status: order.status,
        problem: order.error.map(Box::new),
    }
}

/// Lowercase, without a trailing dot, without duplicates, in the given order; no wildcard
/// (HTTP-01 and TLS-ALPN-01 cannot validate one).
fn normalize(domains: &[impl AsRef<str>]) -> Result<Vec<String>, AcmeError> {
    let mut out: Vec<String> = Vec::new();
    for domain in domains {
        let raw = domain.as_ref();
        let d = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        let why = if d.is_empty() {
            Some("an empty domain")
        } else if d.starts_with("*.") {
            Some("wildcards need the dns-01 challenge, which this client does not answer")
        } else if d
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            Some("not a domain name (letters, digits, '-' and '.'; IDNs in their xn-- form)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(AcmeError::Domain {
                domain: raw.to_owned(),
                why: why.into(),
            });
        }
        if !out.contains(&d) {
            out.push(d);
        }
    }
    if out.is_empty() {
        return Err(AcmeError::Domain {
            domain: String::new(),
            why: "no domain given".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalized_and_deduplicated() {
        assert_eq!(
            normalize(&["A.Example.", "a.example", " b.example "]).unwrap(),
            ["a.example", "b.example"]
        );
    }

    #[test]
    fn wildcards_empty_lists_and_odd_names_are_refused_with_why() {
        let err = normalize(&["*.example.com"]).unwrap_err();
        assert!(err.to_string().contains("dns-01"), "{err}");
        let none: [&str; 0] = [];
        assert!(
            normalize(&none)
                .unwrap_err()
                .to_string()
                .contains("no domain given")
        );
        assert!(normalize(&["a b.example"]).is_err());
        assert!(normalize(&["a/b"]).is_err());
    }
}
