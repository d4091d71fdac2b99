//! TLS at the edge: certificates (a local CA for the base domain, ACME or the local CA for custom
//! domains) and the SNI resolver the HTTPS and `tls` listeners use.
//!
//! The pieces, and how aloftd's edge role puts them together:
//!
//! ```no_run
//! # async fn edge(store: std::sync::Arc<dyn aloft_store::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use aloft_proxy::tls::{
//!     CertManager, CertManagerConfig, Challenges, LocalCa, LocalIssuer, SniResolver, server_config,
//! };
//!
//! // 1. The local CA: made on first use under <data dir>/edge/ca/, loaded on later starts.
//! let ca = Arc::new(LocalCa::open(std::path::Path::new("/var/lib/aloft/edge/ca"))?);
//! // 2. Custom domains' certificates, from the control store's /certs/ records. The issuer is
//! //    the local CA unless an ACME issuer (aloft-acme) is configured; that one shares
//! //    `challenges` with the resolver.
//! //    Their private keys are sealed in the store with the edges' key (the same file on every
//! //    edge sharing the store; previous keys, while rotating, only open); issuance claims
//! //    carry this edge's name.
//! let challenges = Challenges::new();
//! let key_file = std::path::Path::new("/var/lib/aloft/edge/cert-seal.key");
//! let seal_keys = Arc::new(aloft_secretbox::Keyring::new(
//!     aloft_secretbox::Key::load_or_create(key_file)?,
//! ));
//! let config = CertManagerConfig::new("host-1", seal_keys, key_file);
//! let manager = CertManager::new(store, Arc::new(LocalIssuer::new(ca.clone())), config);
//! tokio::spawn(manager.clone().run());
//! // 3. The resolver and the rustls config for the HTTPS listener and `tls` handlers.
//! let resolver = Arc::new(
//!     SniResolver::new("localhost", ca.clone())
//!         .with_manager(manager.clone())
//!         .with_challenges(challenges.clone()),
//! );
//! let config = server_config(resolver.clone())?;
//! // Routing: a Host that is a custom domain goes to `manager.app_for(host)`; the HTTP listener
//! // answers `challenges.http_response(path)` for /.well-known/acme-challenge/…; a connection
//! // whose ALPN is acme-tls/1 (`is_acme_tls`) is closed right after its handshake.
//! # let _ = config; Ok(()) }
//! ```
//!
//! - [`LocalCa`] (`ca.rs`): the root (`ca.pem`, `ca.key`) and leaves for any name, 90 days,
//!   renewed with 30 left; [`LocalCa::root_pem`] is what `aloft certs root` prints.
//! - [`CertManager`] (`manager.rs`): follows `/certs/{hostname}`, hands `pending` records (and
//!   those near expiry) to an [`Issuer`] and writes back `ready` or `failed`; answers
//!   [`CertManager::cert_for`] and [`CertManager::app_for`]. Several edges may share a store:
//!   a per-hostname claim (`/cert-claims/{hostname}`) lets one of them issue.
//! - Private keys at rest (`seal.rs`): sealed in the records with `aloft-secretbox` under the
//!   edges' current key, bound to the hostname, recording the key's id ([`seal_key_pem`],
//!   [`open_key_pem`]); the manager seals again with the current key what a previous key sealed
//!   ([`needs_reseal`]), so a key can be rotated.
//! - ACME: aloftd's `acme_issuer.rs` implements [`Issuer`] with `aloft-acme`, answering its
//!   challenges through the same [`Challenges`] as the resolver (this crate does not link the
//!   ACME client).
//! - [`SniResolver`] (`resolver.rs`): custom domain's certificate, else a local leaf for names under
//!   the base domain, else none (counted); TLS-ALPN-01 challenge certificates when the client
//!   offers `acme-tls/1`. [`Challenges`] holds those and HTTP-01 tokens.
//!
//! Design notes: `docs/adr/0014-edge-certificates.md`.

mod ca;
mod der;
mod manager;
mod pem;
mod resolver;
mod seal;

pub use ca::{CaError, IssuedCert, LEAF_LIFETIME_SECS, LocalCa, RENEW_BEFORE_SECS};
pub use manager::{
    CLAIM_RENEWALS_PER_TTL, CLAIM_RETRY_INTERVAL, CLAIM_TTL, CertError, CertManager, CertManagerConfig,
    ClaimWatch, IssueError, Issued, Issuer, LocalIssuer, ProcessReport, cert_key,
};
pub use pem::{KeyError, ServedCert, served_cert};
pub use resolver::{
    ACME_TLS_ALPN, Challenges, HTTP_CHALLENGE_PREFIX, NameFilter, SniResolver, is_acme_tls, server_config,
};
pub use seal::{is_sealed_key, needs_reseal, open_key_pem, seal_key_pem};
