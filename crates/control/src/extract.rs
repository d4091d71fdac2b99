//! Extractors whose rejections are Fly-shaped JSON errors, never axum's plain-text defaults.

use aloft_api::{ApiError, validate_app_name};
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::HttpError;

/// A JSON request body. A body that does not parse is a 400 that names the field at fault
/// (`invalid request body: at "config.guest.cpus": invalid type: …`). Unknown fields are
/// ignored, as Fly does; a missing `Content-Type` is accepted (curl users forget it), another
/// one than JSON is not.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            let json = essence.eq_ignore_ascii_case("application/json")
                || essence.to_ascii_lowercase().ends_with("+json");
            if !json {
                return Err(ApiError::new(
                    415,
                    format!("unsupported Content-Type {ct:?}: send the body as application/json"),
                )
                .into());
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status().as_u16(),
                format!("read the request body: {}", e.body_text()),
            )
        })?;
        parse(&bytes).map(Self).map_err(HttpError::from)
    }
}

/// A JSON body that may be absent (`POST …/stop` with no body at all): `None` when the body is
/// empty, otherwise as [`JsonBody`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MaybeJson<T>(pub(crate) Option<T>);

impl<T, S> FromRequest<S> for MaybeJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status().as_u16(),
                format!("read the request body: {}", e.body_text()),
            )
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        parse(&bytes).map(|v| Self(Some(v))).map_err(HttpError::from)
    }
}

/// Decodes a JSON body, naming the field at fault when it does not fit `T`.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(ApiError::bad_request("request body is empty: send a JSON object"));
    };
    // Every body of this API is an object; serde would read an array as a struct's fields in
    // order and complain about the first one instead.
    if *first == b'[' {
        return Err(ApiError::bad_request(
            "invalid request body: an array where a JSON object {…} belongs",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        if path == "." {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid request body: at {path:?}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    Ok(value)
}

/// An `{app_name}` path segment that is not a valid app name names no app: 404.
pub(crate) fn validate_path_app(name: &str) -> Result<(), ApiError> {
    validate_app_name(name).map_err(|_| ApiError::app_not_found())
}

/// The `{app_name}` path segment. A name that is not a valid app name cannot exist: 404.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppName(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for AppName {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid app name in the path: {}", e.body_text())))?;
        validate_path_app(&name)?;
        Ok(Self(name))
    }
}

#[cfg(test)]
mod tests {
    use aloft_api::CreateAppRequest;

    use super::*;

    #[test]
    fn field_errors_name_the_field() {
        let e = parse::<CreateAppRequest>(br#"{"name": 5, "org_slug": "personal"}"#).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message().contains("\"name\""), "{}", e.message());
        let e = parse::<CreateAppRequest>(br#"{"name": "a", "enable_subdomains": "yes"}"#).unwrap_err();
        assert!(e.message().contains("\"enable_subdomains\""), "{}", e.message());
    }

    #[test]
    fn syntax_errors_say_where() {
        for body in [&b"{"[..], b"{\"name\": }", b"[1, 2]", b"{} {}", b"  "] {
            let e = parse::<CreateAppRequest>(body).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message().starts_with("invalid request body") || e.message().contains("empty"));
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let r =
            parse::<CreateAppRequest>(br#"{"name": "a", "org_slug": "x", "idempotency_key": "k"}"#).unwrap();
        assert_eq!(r.name, "a");
    }
}
