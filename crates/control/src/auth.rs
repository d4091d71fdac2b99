//! API tokens: minting, verification and the middleware every route sits behind.
//!
//! A token reads `aloft_<id>_<secret>`: 16 hex digits of id (the key of its [`TokenRecord`])
//! and 64 hex digits (32 random bytes) of secret. The store keeps only the secret's SHA-256,
//! so a copy of the database does not give API access. Tokens are org-wide for now: a
//! [`Caller`] may touch its own organization's apps and gets 403 for any other.

use aloft_api::{ApiError, parse_authorization};
use aloft_store::{ControlError, ControlStore, TokenRecord};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::HeaderValue;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::blocking;
use aloft_api::rfc3339;

use crate::ids::{hex, now_ms, random};
use crate::{ApiState, HttpError};

/// What every aloft token starts with.
pub const TOKEN_PREFIX: &str = "aloft_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// The scope of an org-wide token.
const SCOPE_ORG: &str = "org";

/// Who is calling: the token that authenticated the request and the organization it acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id (safe to log).
    pub token_id: String,
    /// The organization the token acts for.
    pub org_slug: String,
}

impl Caller {
    /// 403 unless the caller acts for `org_slug`.
    pub(crate) fn require_org(&self, org_slug: &str) -> Result<(), ApiError> {
        if self.org_slug == org_slug {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "unauthorized: this token is for organization {:?}, not {org_slug:?}; use a token of that organization",
                self.org_slug
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| HttpError::internal("route reached without the authentication layer"))
    }
}

/// A freshly minted token: the record as stored, and the token itself (shown once, never
/// stored).
#[derive(Debug, Clone)]
pub struct NewToken {
    /// What the store keeps.
    pub record: TokenRecord,
    /// `aloft_<id>_<secret>`: what the client sends as `Authorization: Bearer …`.
    pub token: String,
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The kernel's random number generator failed.
    #[error("read random bytes for a new token from the kernel (getrandom); check /dev/urandom")]
    Random(#[source] getrandom::Error),
    /// The store refused the record.
    #[error("store the new token")]
    Store(#[source] ControlError),
}

fn secret_sha256(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

impl NewToken {
    /// A new org-wide token for `org_slug` named `name`, not stored yet (store
    /// [`NewToken::record`] with [`ControlStore::create_token`]).
    pub fn generate(org_slug: &str, name: &str) -> Result<Self, TokenError> {
        let id = hex(&random::<ID_BYTES>().map_err(TokenError::Random)?);
        let secret = hex(&random::<SECRET_BYTES>().map_err(TokenError::Random)?);
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_owned(),
            org_slug: org_slug.to_owned(),
            scope: SCOPE_ORG.to_owned(),
            secret_sha256: secret_sha256(&secret),
            created_at: rfc3339(now_ms()),
            expires_at_ms: None,
        };
        Ok(Self {
            record,
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        })
    }
}

/// Mints an org-wide token for `org_slug` named `name` and stores its record.
pub fn create_token(control: &ControlStore, org_slug: &str, name: &str) -> Result<NewToken, TokenError> {
    let new = NewToken::generate(org_slug, name)?;
    control.create_token(&new.record).map_err(TokenError::Store)?;
    Ok(new)
}

/// Splits `aloft_<id>_<secret>`; `None` for anything else.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
    let hex_of = |s: &str, bytes: usize| s.len() == bytes * 2 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(id, ID_BYTES) && hex_of(secret, SECRET_BYTES)).then_some((id, secret))
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a presented token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Invalid,
    Expired,
}

/// Checks one token against the store.
fn verify(control: &ControlStore, token: &str, now_ms: i64) -> Result<Result<Caller, Refused>, ControlError> {
    let Some((id, secret)) = split_token(token) else {
        return Ok(Err(Refused::Invalid));
    };
    let Some(record) = control.get_token(&id.to_ascii_lowercase())? else {
        return Ok(Err(Refused::Invalid));
    };
    if !same(
        secret_sha256(&secret.to_ascii_lowercase()).as_bytes(),
        record.secret_sha256.as_bytes(),
    ) {
        return Ok(Err(Refused::Invalid));
    }
    if record.expires_at_ms.is_some_and(|t| t <= now_ms) {
        return Ok(Err(Refused::Expired));
    }
    Ok(Ok(Caller {
        token_id: record.id,
        org_slug: record.org_slug,
    }))
}

/// The first of `tokens` that is valid, or why none is.
fn authenticate(control: &ControlStore, tokens: &[String]) -> Result<Caller, HttpError> {
    let now = now_ms();
    let mut expired = false;
    for token in tokens {
        match verify(control, token, now)? {
            Ok(caller) => return Ok(caller),
            Err(Refused::Expired) => expired = true,
            Err(Refused::Invalid) => {}
        }
    }
    Err(ApiError::unauthorized(if expired {
        "token expired: create a new one".to_owned()
    } else {
        format!(
            "invalid token: send an aloft token ({TOKEN_PREFIX}…) as \"Authorization: Bearer <token>\"; \
             aloftd printed one on its first start and wrote it to the aloft CLI's config"
        )
    })
    .into())
}

fn unauthorized(e: impl Into<HttpError>) -> Response {
    let mut response = e.into().into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Middleware: answers 401 unless the request carries a valid token; otherwise the handler
/// finds the [`Caller`] in the request's extensions (and the access log in the response's).
pub(crate) async fn require_token(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let Some(header) = req.headers().get(AUTHORIZATION) else {
        return unauthorized(ApiError::unauthorized(
            "missing Authorization header: send \"Authorization: Bearer <token>\" with an aloft token",
        ));
    };
    let parsed = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII: send \"Bearer <token>\""))
        .and_then(parse_authorization);
    let tokens = match parsed {
        Ok(tokens) => tokens,
        Err(e) => return unauthorized(e),
    };
    let control = state.control().clone();
    let caller = match blocking(move || authenticate(&control, &tokens)).await {
        Ok(caller) => caller,
        Err(e) if e.api().status() == 401 => return unauthorized(e),
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(caller.clone());
    let mut response = next.run(req).await;
    response.extensions_mut().insert(caller);
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aloft_store::SqliteStore;

    use super::*;

    fn control() -> (tempfile::TempDir, ControlStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("control.db")).unwrap();
        (dir, ControlStore::new(Arc::new(store)))
    }

    #[test]
    fn minted_tokens_verify_and_only_the_hash_is_stored() {
        let (_dir, control) = control();
        let new = create_token(&control, "personal", "admin").unwrap();
        assert!(new.token.starts_with(TOKEN_PREFIX));
        let stored = control.get_token(&new.record.id).unwrap().unwrap();
        assert_eq!(stored, new.record);
        assert!(!stored.secret_sha256.is_empty());
        assert!(!new.token.contains(&stored.secret_sha256));
        let caller = verify(&control, &new.token, now_ms()).unwrap().unwrap();
        assert_eq!(caller.org_slug, "personal");
        assert_eq!(caller.token_id, new.record.id);
    }

    #[test]
    fn wrong_secrets_and_shapes_are_invalid() {
        let (_dir, control) = control();
        let new = create_token(&control, "personal", "admin").unwrap();
        let (id, secret) = split_token(&new.token).unwrap();
        let flipped = format!(
            "{TOKEN_PREFIX}{id}_{}{}",
            if secret.starts_with('0') { '1' } else { '0' },
            &secret[1..]
        );
        let other_id = format!("{TOKEN_PREFIX}{}_{secret}", "0".repeat(16));
        for bad in [
            flipped.as_str(),
            other_id.as_str(),
            "aloft_",
            "aloft_x_y",
            "fm2_abc",
            &new.token[..new.token.len() - 1],
        ] {
            assert_eq!(
                verify(&control, bad, now_ms()).unwrap(),
                Err(Refused::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn expired_tokens_say_so() {
        let (_dir, control) = control();
        let new = create_token(&control, "personal", "admin").unwrap();
        let mut record = new.record.clone();
        record.id = "00000000000000aa".into();
        record.expires_at_ms = Some(1000);
        control.create_token(&record).unwrap();
        let (_, secret) = split_token(&new.token).unwrap();
        let token = format!("{TOKEN_PREFIX}{}_{secret}", record.id);
        assert_eq!(
            verify(&control, &token, 999).unwrap().unwrap().token_id,
            record.id
        );
        assert_eq!(verify(&control, &token, 1000).unwrap(), Err(Refused::Expired));
        let e = authenticate(&control, &[token]).unwrap_err();
        assert_eq!(e.api().status(), 401);
        assert!(e.api().message().contains("expired"));
        // One good token in a FlyV1 list is enough.
        assert!(authenticate(&control, &["fm2_x".into(), new.token]).is_ok());
    }
}
