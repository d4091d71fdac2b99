//! Platform endpoints: `GET /v1/platform/regions` (Fly's `{nearest, regions: […]}`).

use reqwest::Method;

use crate::{Client, ClientError};

impl Client {
    /// The region `GET /v1/platform/regions` calls nearest; `None` when aloftd does not serve
    /// the endpoint yet (404, 501) or names none.
    pub async fn nearest_region(&self) -> Result<Option<String>, ClientError> {
        match self
            .json::<serde_json::Value>(Method::GET, "/v1/platform/regions", None)
            .await
        {
            Ok(v) => Ok(v
                .get("nearest")
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)),
            Err(e) if matches!(e.status(), Some(404 | 501)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
