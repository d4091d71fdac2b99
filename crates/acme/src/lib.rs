//! An ACME (RFC 8555) client: how the edge proxy gets certificates for users' custom domains from
//! a CA such as Let's Encrypt, validating them with HTTP-01 (RFC 8555 §8.3) or TLS-ALPN-01
//! (RFC 8737).
//!
//! ```text
//! let client = AcmeClient::new(directory_url, extra_root_pem).await?;
//! let (account, key_der) = Account::load_or_register(&client, stored_key, &contacts).await?;
//! // persist key_der (it is the account)
//! let store = Arc::new(ChallengeStore::new());   // the proxy's HTTP and TLS listeners look here
//! let issued = account.issue(&["app.example.com"], ChallengeKind::Http01, &*store).await?;
//! // issued.chain_pem, issued.key_pem, issued.not_after
//! ```
//!
//! The account key is ECDSA P-256 (JWS `ES256`, on ring); certificate keys are fresh P-256 keys;
//! CSRs and TLS-ALPN-01 certificates are made with rcgen. Presenting challenges is the caller's
//! job, through [`ChallengeSolver`] ([`ChallengeStore`] is a ready in-memory one). Errors carry
//! the CA's problem document ("the CA said: …").
//!
//! Depends on `aloft-tls` (the TLS client policy) only among aloft crates: it knows nothing of
//! apps, routes, the store or the proxy, and runs no server.

mod account;
mod cert;
mod challenge;
mod client;
mod error;
mod jws;

pub use account::{Account, Issued};
pub use cert::{ACME_TLS_ALPN_PROTOCOL, tls_alpn01_certificate};
pub use challenge::{
    Challenge, ChallengeKind, ChallengeSolver, ChallengeStore, HTTP01_PATH_PREFIX, offers_acme_tls,
};
pub use client::{AcmeClient, LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING};
pub use error::{AcmeError, Identifier, Problem, SolverError};
pub use jws::AccountKey;
