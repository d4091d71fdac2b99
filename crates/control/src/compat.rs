//! Where aloft stands against Fly's Machines API: the operations it serves and the ones it does
//! not serve yet. Those answer 501 with a JSON body, so a client learns "not implemented" rather
//! than a 404 it could take for "no such app". `docs/api-compat.md` is the human-readable list;
//! a test keeps both in step with the spec's operations (`tests/fixtures/fly_operations.txt`).

use aloft_api::ApiError;
use axum::Router;
use axum::http::{Method, Uri};
use axum::routing::{MethodFilter, MethodRouter};

use crate::{ApiState, HttpError};

/// Operations of Fly's spec that aloft serves (paths relative to `/v1`); the routes themselves
/// are in [`crate::router`], the test checks both agree. Each needs a description in
/// `openapi::OPERATIONS` (a test says which one is missing); aloftd's OpenAPI document holds
/// exactly these and [`EXTENSIONS`].
pub(crate) const IMPLEMENTED: &[(MethodFilter, &str)] = &[
    (MethodFilter::GET, "/apps"),
    (MethodFilter::POST, "/apps"),
    (MethodFilter::GET, "/apps/{app_name}"),
    (MethodFilter::DELETE, "/apps/{app_name}"),
    (MethodFilter::GET, "/apps/{app_name}/certificates"),
    (MethodFilter::POST, "/apps/{app_name}/certificates/acme"),
    (MethodFilter::GET, "/apps/{app_name}/certificates/{hostname}"),
    (MethodFilter::DELETE, "/apps/{app_name}/certificates/{hostname}"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/certificates/{hostname}/check",
    ),
    (MethodFilter::GET, "/apps/{app_name}/machines"),
    (MethodFilter::POST, "/apps/{app_name}/machines"),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}"),
    (MethodFilter::POST, "/apps/{app_name}/machines/{machine_id}"),
    (MethodFilter::DELETE, "/apps/{app_name}/machines/{machine_id}"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/cordon",
    ),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/events"),
    (MethodFilter::POST, "/apps/{app_name}/machines/{machine_id}/exec"),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/lease"),
    (MethodFilter::POST, "/apps/{app_name}/machines/{machine_id}/lease"),
    (
        MethodFilter::DELETE,
        "/apps/{app_name}/machines/{machine_id}/lease",
    ),
    (
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/metadata",
    ),
    (
        MethodFilter::PUT,
        "/apps/{app_name}/machines/{machine_id}/metadata",
    ),
    (
        MethodFilter::PATCH,
        "/apps/{app_name}/machines/{machine_id}/metadata",
    ),
    (
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
    ),
    (
        MethodFilter::DELETE,
        "/apps/{app_name}/machines/{machine_id}/metadata/{key}",
    ),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/ps"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/restart",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/signal",
    ),
    (MethodFilter::POST, "/apps/{app_name}/machines/{machine_id}/start"),
    (MethodFilter::POST, "/apps/{app_name}/machines/{machine_id}/stop"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/suspend",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/uncordon",
    ),
    (
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/versions",
    ),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/wait"),
    (MethodFilter::GET, "/apps/{app_name}/secrets"),
    (MethodFilter::POST, "/apps/{app_name}/secrets"),
    (MethodFilter::GET, "/apps/{app_name}/secrets/{secret_name}"),
    (MethodFilter::POST, "/apps/{app_name}/secrets/{secret_name}"),
    (MethodFilter::DELETE, "/apps/{app_name}/secrets/{secret_name}"),
    (MethodFilter::GET, "/platform/regions"),
    (MethodFilter::GET, "/apps/{app_name}/volumes"),
    (MethodFilter::POST, "/apps/{app_name}/volumes"),
    (MethodFilter::GET, "/apps/{app_name}/volumes/{volume_id}"),
    (MethodFilter::PUT, "/apps/{app_name}/volumes/{volume_id}"),
    (MethodFilter::DELETE, "/apps/{app_name}/volumes/{volume_id}"),
    (MethodFilter::PUT, "/apps/{app_name}/volumes/{volume_id}/extend"),
    (
        MethodFilter::GET,
        "/apps/{app_name}/volumes/{volume_id}/snapshots",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/volumes/{volume_id}/snapshots",
    ),
];

/// aloft's own operations (not in Fly's spec) that aloftd serves, paths relative to `/v1`; each
/// needs a description in `openapi::OPERATIONS` too.
pub(crate) const EXTENSIONS: &[(MethodFilter, &str)] = &[
    (MethodFilter::POST, "/apps/{app_name}/certificates"),
    (MethodFilter::GET, "/platform/edge-ca"),
    (MethodFilter::GET, "/apps/{app_name}/logs"),
    (
        MethodFilter::GET,
        "/apps/{app_name}/machines/{machine_id}/console",
    ),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/proxy"),
    (MethodFilter::GET, "/apps/{app_name}/releases"),
    (MethodFilter::POST, "/apps/{app_name}/releases"),
    (MethodFilter::POST, "/apps/{app_name}/releases/rollback"),
    (MethodFilter::GET, "/apps/{app_name}/releases/{version}"),
    (MethodFilter::GET, "/apps/{app_name}/releases/{version}/events"),
    (MethodFilter::GET, "/openapi.json"),
];

/// Operations of Fly's spec that aloft does not serve yet.
pub(crate) const NOT_YET: &[(MethodFilter, &str)] = &[
    (MethodFilter::POST, "/apps/{app_name}/certificates/custom"),
    (
        MethodFilter::DELETE,
        "/apps/{app_name}/certificates/{hostname}/acme",
    ),
    (
        MethodFilter::DELETE,
        "/apps/{app_name}/certificates/{hostname}/custom",
    ),
    (MethodFilter::POST, "/apps/{app_name}/deploy_token"),
    (MethodFilter::GET, "/apps/{app_name}/ip_assignments"),
    (MethodFilter::POST, "/apps/{app_name}/ip_assignments"),
    (MethodFilter::DELETE, "/apps/{app_name}/ip_assignments/{ip}"),
    (MethodFilter::GET, "/apps/{app_name}/machines/{machine_id}/memory"),
    (MethodFilter::PUT, "/apps/{app_name}/machines/{machine_id}/memory"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/machines/{machine_id}/memory/reclaim",
    ),
    (MethodFilter::GET, "/apps/{app_name}/secretkeys"),
    (MethodFilter::GET, "/apps/{app_name}/secretkeys/{secret_name}"),
    (MethodFilter::POST, "/apps/{app_name}/secretkeys/{secret_name}"),
    (MethodFilter::DELETE, "/apps/{app_name}/secretkeys/{secret_name}"),
    (
        MethodFilter::POST,
        "/apps/{app_name}/secretkeys/{secret_name}/decrypt",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/secretkeys/{secret_name}/encrypt",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/secretkeys/{secret_name}/generate",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/secretkeys/{secret_name}/sign",
    ),
    (
        MethodFilter::POST,
        "/apps/{app_name}/secretkeys/{secret_name}/verify",
    ),
    (MethodFilter::GET, "/orgs/{org_slug}/volumes"),
    (MethodFilter::POST, "/platform/placements"),
    (MethodFilter::POST, "/tokens/authenticate"),
    (MethodFilter::POST, "/tokens/authorize"),
    (MethodFilter::GET, "/tokens/current"),
    (MethodFilter::POST, "/tokens/kms"),
    (MethodFilter::POST, "/tokens/oidc"),
    (MethodFilter::GET, "/orgs/{org_slug}/machines"),
];

/// Adds a 501 route for every operation of [`NOT_YET`].
pub(crate) fn not_yet(mut router: Router<ApiState>) -> Router<ApiState> {
    let mut paths: Vec<&str> = NOT_YET.iter().map(|(_, p)| *p).collect();
    paths.sort_unstable();
    paths.dedup();
    for path in paths {
        let methods = NOT_YET
            .iter()
            .filter(|(_, p)| *p == path)
            .fold(MethodRouter::new(), |route, (filter, _)| {
                route.on(*filter, not_implemented)
            });
        router = router.route(&format!("/v1{path}"), methods);
    }
    router
}

async fn not_implemented(method: Method, uri: Uri) -> HttpError {
    ApiError::new(
        501,
        format!(
            "{method} {} is not implemented in aloft yet; docs/api-compat.md lists what is",
            uri.path()
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use aloft_store::SqliteStore;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{ApiConfig, create_token, router};

    const SPEC_OPERATIONS: &str = include_str!("../tests/fixtures/fly_operations.txt");
    const COMPAT_DOC: &str = include_str!("../../../docs/api-compat.md");

    fn spec_operations() -> BTreeSet<(String, String)> {
        SPEC_OPERATIONS
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (m, p) = l.split_once(' ').unwrap();
                (m.to_owned(), p.to_owned())
            })
            .collect()
    }

    fn name(filter: MethodFilter) -> &'static str {
        [
            (MethodFilter::GET, "GET"),
            (MethodFilter::POST, "POST"),
            (MethodFilter::PUT, "PUT"),
            (MethodFilter::PATCH, "PATCH"),
            (MethodFilter::DELETE, "DELETE"),
        ]
        .into_iter()
        .find(|(f, _)| *f == filter)
        .unwrap()
        .1
    }

    fn ours(list: &[(MethodFilter, &str)]) -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(f, p)| (name(*f).to_owned(), (*p).to_owned()))
            .collect()
    }

    #[test]
    fn every_spec_operation_is_listed_once() {
        let (implemented, not_yet) = (ours(IMPLEMENTED), ours(NOT_YET));
        assert_eq!(
            implemented.len() + not_yet.len(),
            IMPLEMENTED.len() + NOT_YET.len(),
            "duplicates"
        );
        assert!(implemented.is_disjoint(&not_yet));
        let all: BTreeSet<_> = implemented.union(&not_yet).cloned().collect();
        assert_eq!(all, spec_operations());
    }

    #[test]
    fn the_compat_doc_says_the_same() {
        for (list, status) in [(IMPLEMENTED, "implemented"), (NOT_YET, "not yet")] {
            for (method, path) in ours(list) {
                let row = format!("| {method} | `{path}` |");
                let line = COMPAT_DOC
                    .lines()
                    .find(|l| l.starts_with(&row))
                    .unwrap_or_else(|| panic!("docs/api-compat.md has no row {row}"));
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                assert_eq!(cells.get(4), Some(&status), "{line}");
            }
        }
    }

    #[tokio::test]
    async fn not_yet_answers_501_and_implemented_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let state = ApiState::new(
            Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap()),
            ApiConfig {
                region: "test".into(),
                access_log: false,
            },
        );
        let token = create_token(state.control(), "personal", "t").unwrap().token;
        for (list, implemented) in [(IMPLEMENTED, true), (NOT_YET, false)] {
            for (method, path) in ours(list) {
                let uri = format!("/v1{path}")
                    .replace("{app_name}", "web")
                    .replace("{machine_id}", "3d8d413b29d089")
                    .replace("{org_slug}", "personal")
                    .replace(['{', '}'], "");
                let req = Request::builder()
                    .method(method.as_str())
                    .uri(&uri)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(Body::empty())
                    .unwrap();
                let status = router(state.clone()).oneshot(req).await.unwrap().status();
                if implemented {
                    assert_ne!(status, StatusCode::NOT_IMPLEMENTED, "{method} {uri}");
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
                } else {
                    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{method} {uri}");
                }
            }
        }
    }
}
