//! [`HttpError`]: an [`ApiError`] as an HTTP response, and running store calls off the reactor.

use std::fmt;

use aloft_api::ApiError;
use aloft_store::ControlError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to an API client: Fly's status code and `{"error", "status"}` body.
///
/// For server-side failures (5xx) it also carries the detail that belongs in the server's log;
/// the access log prints it on the request's line, the client only sees a safe message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    api: ApiError,
    detail: Option<String>,
}

/// The server-side detail of a failed request, handed from the response to the access log.
#[derive(Debug, Clone)]
pub(crate) struct LogDetail(pub(crate) String);

impl HttpError {
    /// A 500 whose `detail` goes to the server's log only.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self {
            api: ApiError::internal(),
            detail: Some(detail.to_string()),
        }
    }

    /// The API error the client sees.
    pub fn api(&self) -> &ApiError {
        &self.api
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{}: {d}", self.api),
            None => self.api.fmt(f),
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(api: ApiError) -> Self {
        Self { api, detail: None }
    }
}

impl From<ControlError> for HttpError {
    fn from(e: ControlError) -> Self {
        let api = e.to_api();
        let detail = (api.status() >= 500).then(|| aloft_api::error_chain(&e));
        Self { api, detail }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.api.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.api.into_body())).into_response();
        if let Some(detail) = self.detail {
            response.extensions_mut().insert(LogDetail(detail));
        }
        response
    }
}

/// Runs `f` (store calls, which block) on tokio's blocking pool. A panic in `f` becomes a 500.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, HttpError>
where
    F: FnOnce() -> Result<T, HttpError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HttpError::internal(format!("store call did not finish: {e}")))?
}

#[cfg(test)]
mod tests {
    use aloft_store::StoreError;

    use super::*;

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let e = HttpError::from(ControlError::Store(StoreError::Locked {
            path: "/var/lib/aloft/control.db".into(),
        }));
        assert_eq!(e.api().status(), 500);
        assert!(!e.api().message().contains("/var/lib"));
        let response = e.into_response();
        let detail = response.extensions().get::<LogDetail>().unwrap();
        assert!(detail.0.contains("/var/lib/aloft/control.db"), "{}", detail.0);
    }

    #[test]
    fn client_errors_carry_no_detail() {
        let e = HttpError::from(ControlError::AppExists { name: "web".into() });
        assert_eq!(e.api().status(), 422);
        assert!(e.into_response().extensions().get::<LogDetail>().is_none());
    }
}
