//! Request ids and the access log: one line per request on stderr.
//!
//! `2026-12-02T05:25:46Z 01JNRQ9VVKJ7HZFMJWJB3M3RYN-local POST /v1/apps 201 3ms token=6f1c…`,
//! followed by `error="…"` when the server failed (the detail the client does not see). The
//! same id goes back to the client in `fly-request-id`, so a user's report points at the line.

use std::io::Write as _;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use crate::ApiState;
use crate::auth::Caller;
use crate::error::LogDetail;
use aloft_api::rfc3339;

use crate::ids::{now_ms, ulid};

/// The response header carrying the request id (Fly's name; fly-go puts it in its errors).
pub(crate) const REQUEST_ID_HEADER: &str = "fly-request-id";

/// Middleware: gives the request its id and logs it when the response is ready.
pub(crate) async fn access_log(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = format!("{}-{}", ulid(), state.config().region);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if state.config().access_log {
        let token = response
            .extensions()
            .get::<Caller>()
            .map_or("-", |c| c.token_id.as_str());
        let mut line = format!(
            "{} {id} {method} {path} {} {}ms token={token}",
            rfc3339(now_ms()),
            response.status().as_u16(),
            start.elapsed().as_millis(),
        );
        if let Some(LogDetail(detail)) = response.extensions().get::<LogDetail>() {
            line.push_str(&format!(" error={detail:?}"));
        }
        line.push('\n');
        // A full or closed stderr must not fail the request.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    response
}
