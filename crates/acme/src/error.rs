//! What can go wrong talking to a CA, and the CA's own words when it refused (RFC 8555 §6.7
//! problem documents).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Boxed error a [`ChallengeSolver`](crate::ChallengeSolver) returns when it cannot publish or
/// serve a challenge.
pub type SolverError = Box<dyn std::error::Error + Send + Sync>;

/// An ACME problem document (RFC 8555 §6.7, RFC 7807): what the CA said when it refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Problem {
    /// The problem's type URN, e.g. `urn:ietf:params:acme:error:unauthorized`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The CA's human-readable explanation.
    #[serde(default)]
    pub detail: String,
    /// The HTTP status the CA gave, when the document says it.
    #[serde(default)]
    pub status: Option<u16>,
    /// Per-identifier problems (RFC 8555 §6.7.1), e.g. one per refused domain.
    #[serde(default)]
    pub subproblems: Vec<Problem>,
    /// The identifier a subproblem is about.
    #[serde(default)]
    pub identifier: Option<Identifier>,
}

/// An ACME identifier: `{"type": "dns", "value": "example.com"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Identifier {
    /// The identifier type, `dns` for domain names.
    #[serde(rename = "type")]
    pub kind: String,
    /// The domain name.
    pub value: String,
}

impl Problem {
    /// The type without the `urn:ietf:params:acme:error:` prefix (`badNonce`, `unauthorized`, …);
    /// the whole type when it is not an ACME one.
    pub fn short_kind(&self) -> &str {
        self.kind
            .strip_prefix("urn:ietf:params:acme:error:")
            .unwrap_or(&self.kind)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = if self.detail.is_empty() {
            "(no detail)"
        } else {
            &self.detail
        };
        if let Some(id) = &self.identifier {
            write!(f, "{}: ", id.value)?;
        }
        write!(f, "{detail}")?;
        if !self.kind.is_empty() {
            write!(f, " [{}]", self.short_kind())?;
        }
        for sub in &self.subproblems {
            write!(f, "; {sub}")?;
        }
        Ok(())
    }
}

/// Everything [`AcmeClient`](crate::AcmeClient) and [`Account`](crate::Account) can fail with.
/// Each message says what happened and what to do; [`AcmeError::problem`] gives the CA's own
/// problem document when there is one.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTPS client for the CA: {0}")]
    Setup(String),
    /// The extra root CA PEM given to [`AcmeClient::new`](crate::AcmeClient::new) is unusable.
    #[error(
        "the extra root CA for the ACME directory is unusable: {0}; pass the CA's certificate in PEM (-----BEGIN CERTIFICATE-----)"
    )]
    ExtraRoot(String),
    /// The CA could not be reached or its answer could not be read.
    #[error("cannot reach the ACME server at {url}: {source}; check the directory URL, DNS and the network")]
    Http {
        /// The URL asked.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The CA refused a request.
    #[error("the CA said: {problem} (HTTP {status} from {url})")]
    Ca {
        /// The URL asked.
        url: String,
        /// The HTTP status of the answer.
        status: u16,
        /// The CA's problem document.
        problem: Box<Problem>,
    },
    /// The CA answered something this client cannot use.
    #[error(
        "the ACME server at {url} answered something this client does not understand: {what}; check that the URL is an ACME (RFC 8555) directory"
    )]
    Protocol {
        /// The URL asked.
        url: String,
        /// What was wrong with the answer.
        what: String,
    },
    /// The account key given is not a PKCS#8 ECDSA P-256 key.
    #[error(
        "the ACME account key is unusable: {0}; pass the PKCS#8 bytes (DER or PEM) that Account::load_or_register returned, or none to register a new account"
    )]
    AccountKey(String),
    /// [`Account::issue`](crate::Account::issue) was called with no domain, or a domain that
    /// cannot be validated with the chosen challenge.
    #[error("cannot order a certificate for {domain:?}: {why}")]
    Domain {
        /// The domain as given.
        domain: String,
        /// Why it cannot be ordered.
        why: String,
    },
    /// The CA offers no challenge of the requested kind for a domain.
    #[error(
        "the CA offers no {kind} challenge for {domain} (it offers: {offered}); use another challenge kind"
    )]
    NoChallenge {
        /// The domain.
        domain: String,
        /// The kind asked for.
        kind: String,
        /// The kinds the CA offered, comma-separated.
        offered: String,
    },
    /// The caller's [`ChallengeSolver`](crate::ChallengeSolver) failed to present a challenge.
    #[error("cannot present the {kind} challenge for {domain}: {source}")]
    Solver {
        /// The domain.
        domain: String,
        /// The challenge kind.
        kind: String,
        /// The solver's error.
        #[source]
        source: SolverError,
    },
    /// The CA tried the challenge and it failed.
    #[error(
        "the CA could not validate {domain} with {kind}: the CA said: {}; check that {domain} resolves to this proxy and that it answers the challenge",
        problem.as_ref().map_or_else(|| "nothing (no error in the challenge)".to_owned(), ToString::to_string)
    )]
    Validation {
        /// The domain.
        domain: String,
        /// The challenge kind.
        kind: String,
        /// The challenge's error, when the CA gave one.
        problem: Option<Box<Problem>>,
    },
    /// The order (or an authorization) ended in a state that cannot lead to a certificate.
    #[error("the order for {domains} is {status}: the CA said: {}; order again", problem.as_ref().map_or_else(|| "nothing".to_owned(), ToString::to_string))]
    Order {
        /// The order's domains, comma-separated.
        domains: String,
        /// The status the order ended in.
        status: String,
        /// The order's error, when the CA gave one.
        problem: Option<Box<Problem>>,
    },
    /// The CA did not finish something within the client's poll timeout.
    #[error(
        "the CA did not finish {what} within {after:?}; try again later (or raise AcmeClient::with_poll_timeout)"
    )]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        after: Duration,
    },
    /// The certificate key, CSR or TLS-ALPN-01 certificate could not be generated.
    #[error("cannot generate {what}: {why}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// Why it failed.
        why: String,
    },
}

impl AcmeError {
    /// The CA's problem document, when the CA said why it refused.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Ca { problem, .. } => Some(problem),
            Self::Validation { problem, .. } | Self::Order { problem, .. } => problem.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_refusal_shows_the_detail_type_and_subproblems() {
        let problem: Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:rejectedIdentifier","detail":"Error creating new order","status":400,
                "subproblems":[{"type":"urn:ietf:params:acme:error:rejectedIdentifier","detail":"bad name","identifier":{"type":"dns","value":"x..y"}}]}"#,
        )
        .unwrap();
        assert_eq!(problem.short_kind(), "rejectedIdentifier");
        let err = AcmeError::Ca {
            url: "https://ca/new-order".into(),
            status: 400,
            problem: Box::new(problem),
        };
        let msg = err.to_string();
        assert!(
            msg.starts_with("the CA said: Error creating new order [rejectedIdentifier]; x..y: bad name"),
            "{msg}"
        );
        assert_eq!(err.problem().map(|p| p.status), Some(Some(400)));
    }

    #[test]
    fn a_validation_without_a_problem_says_so() {
        let err = AcmeError::Validation {
            domain: "a.example".into(),
            kind: "http-01".into(),
            problem: None,
        };
        assert!(
            err.to_string().contains("nothing (no error in the challenge)"),
            "{err}"
        );
        assert!(err.problem().is_none());
    }
}
