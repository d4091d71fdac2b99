//! `/v1/apps/{app}/certificates…`: custom domains of an app and their TLS certificates, and
//! `/v1/platform/edge-ca`: the root of the edge's local CA.
//!
//! Adding a hostname writes a `pending` [`CertificateRecord`] at `/certs/{hostname}`; the edge's
//! certificate manager (`aloft_proxy::tls`) issues it and writes it back `ready` or `failed`. A
//! hostname belongs to one app at a time, and names under the edge's base domain need no
//! certificate of their own (the edge's local CA serves them). Answers carry the record without
//! its key ([`Certificate`]) and the DNS records the user must create. The edge's CA files are
//! the edge's: control only reads the root's PEM from the path [`EdgeSettings::ca_root`] gives.
//! See `docs/adr/0014-edge-certificates.md`.

use std::net::IpAddr;
use std::path::PathBuf;

use aloft_api::{
    ApiError, Certificate, CertificateRecord, CertificateStatus, CreateCertificateRequest, DnsRequirements,
    EdgeCaResponse, ListCertificatesResponse, is_under_domain, validate_cert_hostname,
};
use aloft_store::{ControlError, Expect, RangeOptions, StoreError, keys};
use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::{AppName, JsonBody, validate_path_app};
use crate::{ApiState, HttpError};

/// What the API needs to know about the edge: its base domain (names under it are the edge's
/// own), the addresses users point DNS at, and where the edge keeps its local CA's root.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// Apps answer at `<app>.<base_domain>` (default `localhost`).
    pub base_domain: String,
    /// The edge's public addresses, for the `A`/`AAAA` records users create (none by default:
    /// then only the `CNAME` is suggested).
    pub addresses: Vec<IpAddr>,
    /// The local CA's root certificate (`<data dir>/edge/ca/ca.pem`); `GET /v1/platform/edge-ca`
    /// answers 503 without it.
    pub ca_root: Option<PathBuf>,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            base_domain: "localhost".to_owned(),
            addresses: Vec::new(),
            ca_root: None,
        }
    }
}

impl EdgeSettings {
    /// The DNS records that make `app`'s custom domain reach the edge.
    fn dns(&self, app: &str) -> DnsRequirements {
        DnsRequirements {
            a: self
                .addresses
                .iter()
                .filter(|a| a.is_ipv4())
                .map(ToString::to_string)
                .collect(),
            aaaa: self
                .addresses
                .iter()
                .filter(|a| a.is_ipv6())
                .map(ToString::to_string)
                .collect(),
            cname: format!("{app}.{}", self.base_domain),
        }
    }
}

/// The certificate routes (merged into [`crate::router`] inside authentication).
pub(crate) fn routes() -> Router<ApiState> {
    const C: &str = "/v1/apps/{app_name}/certificates";
    Router::new()
        .route(C, get(list).post(create))
        .route(&format!("{C}/acme"), post(create))
        .route(&format!("{C}/{{hostname}}"), get(show).delete(destroy))
        .route(&format!("{C}/{{hostname}}/check"), post(check))
        .route("/v1/platform/edge-ca", get(edge_ca))
}

/// `{app_name}` and `{hostname}` (lowercased; an invalid hostname names no certificate: 404).
#[derive(Debug, Clone)]
pub(crate) struct CertPath {
    app: String,
    hostname: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CertPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((app, hostname)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))?;
        validate_path_app(&app)?;
        let hostname = validate_cert_hostname(&hostname)
            .map_err(|_| ApiError::not_found(format_args!("certificate for {hostname}")))?;
        Ok(Self { app, hostname })
    }
}

fn store_error(e: StoreError) -> HttpError {
    ControlError::Store(e).into()
}

fn cert_key(hostname: &str) -> Result<String, HttpError> {
    Ok(format!(
        "{}{}",
        keys::CERTS,
        keys::segment(hostname).map_err(store_error)?
    ))
}

fn decode(hostname: &str, value: &[u8]) -> Result<CertificateRecord, HttpError> {
    serde_json::from_slice(value)
        .map_err(|e| HttpError::internal(format!("certificate record of {hostname} does not decode: {e}")))
}

/// The record of `hostname` with its revision, if any.
fn read(
    state: &ApiState,
    hostname: &str,
) -> Result<Option<(CertificateRecord, aloft_store::Revision)>, HttpError> {
    let kv = state
        .control()
        .store()
        .get(&cert_key(hostname)?)
        .map_err(store_error)?;
    kv.map(|kv| Ok((decode(hostname, &kv.value)?, kv.mod_revision)))
        .transpose()
}

/// `hostname`'s record if it belongs to `app`, else 404.
fn read_own(
    state: &ApiState,
    app: &str,
    hostname: &str,
) -> Result<(CertificateRecord, aloft_store::Revision), HttpError> {
    match read(state, hostname)? {
        Some((r, rev)) if r.app == app => Ok((r, rev)),
        _ => Err(ApiError::not_found(format_args!("certificate for {hostname} in app {app}")).into()),
    }
}

fn view(state: &ApiState, r: &CertificateRecord) -> Certificate {
    r.view(state.edge().dns(&r.app))
}

/// `GET /v1/apps/{app}/certificates[?filter=]` → the app's certificates, by hostname (`filter`
/// keeps hostnames containing it).
pub(crate) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    RawQuery(query): RawQuery,
) -> Result<Json<ListCertificatesResponse>, HttpError> {
    let filter = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "filter")
        .map(|(_, v)| v.to_ascii_lowercase());
    let out = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        let mut options = RangeOptions::default();
        let mut certificates = Vec::new();
        loop {
            let range = state
                .control()
                .store()
                .range(keys::CERTS, &options)
                .map_err(store_error)?;
            for kv in &range.kvs {
                let r = decode(&kv.key, &kv.value)?;
                if r.app == app && filter.as_ref().is_none_or(|f| r.hostname.contains(f.as_str())) {
                    certificates.push(view(&state, &r));
                }
            }
            if !range.more {
                break;
            }
            options.after = range.kvs.last().map(|kv| kv.key.clone());
        }
        Ok(ListCertificatesResponse {
            total_count: certificates.len() as u64,
            certificates,
        })
    })
    .await?;
    Ok(Json(out))
}

/// `POST /v1/apps/{app}/certificates` (and Fly's `…/certificates/acme`) `{hostname}` → 201 with
/// the new `pending` certificate (or the app's existing one for that hostname). 400 for a
/// hostname that is not a DNS name, 422 for one under the edge's base domain, 409 for one
/// another app has.
pub(crate) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    JsonBody(req): JsonBody<CreateCertificateRequest>,
) -> Result<(StatusCode, Json<Certificate>), HttpError> {
    let hostname = validate_cert_hostname(&req.hostname)?;
    let base = state.edge().base_domain.clone();
    if is_under_domain(&hostname, &base) {
        return Err(ApiError::unprocessable(format!(
            "{hostname} is under the edge's base domain {base}: apps answer there already \
             (https://<app>.{base}) with the edge's own certificate; add a domain of your own instead"
        ))
        .into());
    }
    let out = blocking(move || {
        visible_app(state.control(), &caller, &app)?;
        let key = cert_key(&hostname)?;
        let record = CertificateRecord::pending(&hostname, &app, crate::ids::now_ms());
        let value = serde_json::to_vec(&record).map_err(HttpError::internal)?;
        match state.control().store().put_if(&key, value, Expect::Absent, None) {
            Ok(_) => Ok(view(&state, &record)),
            Err(StoreError::Conflict { .. }) => match read(&state, &hostname)? {
                Some((existing, _)) if existing.app == app => Ok(view(&state, &existing)),
                Some(_) => Err(ApiError::conflict(format!(
                    "{hostname} is already added to another app; remove it there first \
                     (aloft certs remove {hostname} -a <that app>)"
                ))
                .into()),
                None => Err(ApiError::conflict(format!(
                    "{hostname} was removed while it was being added; retry"
                ))
                .into()),
            },
            Err(e) => Err(store_error(e)),
        }
    })
    .await?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /v1/apps/{app}/certificates/{hostname}` → the certificate; 404 if the app has no such
/// hostname.
pub(crate) async fn show(
    State(state): State<ApiState>,
    caller: Caller,
    path: CertPath,
) -> Result<Json<Certificate>, HttpError> {
    let out = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let (r, _) = read_own(&state, &path.app, &path.hostname)?;
        Ok(view(&state, &r))
    })
    .await?;
    Ok(Json(out))
}

/// `POST /v1/apps/{app}/certificates/{hostname}/check` → the certificate; a `failed` one is
/// queued again (`pending`, its error cleared), others are answered as they are.
pub(crate) async fn check(
    State(state): State<ApiState>,
    caller: Caller,
    path: CertPath,
) -> Result<Json<Certificate>, HttpError> {
    let out = blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let (mut r, rev) = read_own(&state, &path.app, &path.hostname)?;
        if r.status == CertificateStatus::Failed {
            r.status = CertificateStatus::Pending;
            r.error = None;
            r.updated_at_ms = crate::ids::now_ms();
            let value = serde_json::to_vec(&r).map_err(HttpError::internal)?;
            match state.control().store().put_if(
                &cert_key(&path.hostname)?,
                value,
                Expect::Revision(rev),
                None,
            ) {
                Ok(_) => {}
                // The edge (or another check) changed it meanwhile: answer what it is now.
                Err(StoreError::Conflict { .. }) => {
                    r = read_own(&state, &path.app, &path.hostname)?.0;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(view(&state, &r))
    })
    .await?;
    Ok(Json(out))
}

/// `DELETE /v1/apps/{app}/certificates/{hostname}` → 204; the edge stops serving it.
pub(crate) async fn destroy(
    State(state): State<ApiState>,
    caller: Caller,
    path: CertPath,
) -> Result<StatusCode, HttpError> {
    blocking(move || {
        visible_app(state.control(), &caller, &path.app)?;
        let (_, rev) = read_own(&state, &path.app, &path.hostname)?;
        // With any edge's claim on issuing it: the hostname is free for its next owner at once.
        match state.control().delete_cert(&path.hostname, Expect::Revision(rev)) {
            Ok(_) => Ok(()),
            Err(ControlError::Store(StoreError::Conflict { .. })) => Err(ApiError::conflict(
                "the certificate changed while it was being removed (the edge just issued it?); retry",
            )
            .into()),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/platform/edge-ca` → `{pem}`: the root of the edge's local CA, for clients to trust
/// (`aloft certs root > ca.pem; curl --cacert ca.pem https://web.localhost`).
pub(crate) async fn edge_ca(
    State(state): State<ApiState>,
    _caller: Caller,
) -> Result<Json<EdgeCaResponse>, HttpError> {
    let Some(path) = state.edge().ca_root.clone() else {
        return Err(ApiError::new(503, "this server runs no edge, so it has no local CA").into());
    };
    let pem = tokio::task::spawn_blocking(move || std::fs::read_to_string(path))
        .await
        .map_err(HttpError::internal)?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                HttpError::from(ApiError::new(
                    503,
                    "the edge has not made its local CA yet: it does on its first start; retry in a moment",
                ))
            } else {
                HttpError::internal(format!("read the edge's CA root: {e}"))
            }
        })?;
    Ok(Json(EdgeCaResponse { pem }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aloft_api::CertificateSource;
    use aloft_store::SqliteStore;
    use axum::body::Body;
    use axum::http::{Request, header};
    use http_body_util::BodyExt as _;
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{ApiConfig, create_token, router};

    struct T {
        _dir: tempfile::TempDir,
        state: ApiState,
        token: String,
    }

    impl T {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("ca.pem");
            std::fs::write(
                &ca,
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            )
            .unwrap();
            let config = ApiConfig {
                region: "test".into(),
                access_log: false,
            };
            let state = ApiState::new(
                Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap()),
                config,
            )
            .with_edge(EdgeSettings {
                base_domain: "apps.example.net".into(),
                addresses: vec!["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()],
                ca_root: Some(ca),
            });
            let token = create_token(state.control(), "personal", "t").unwrap().token;
            Self {
                _dir: dir,
                state,
                token,
            }
        }

        async fn with_apps() -> Self {
            let t = Self::new();
            for name in ["web", "api"] {
                let (s, body) = t
                    .call(
                        "POST",
                        "/v1/apps",
                        Some(json!({"name": name, "org_slug": "personal"})),
                    )
                    .await;
                assert!(s.is_success(), "{body}");
            }
            t
        }

        async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
                .unwrap();
            let resp = router(self.state.clone()).oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }

        fn record(&self, hostname: &str) -> Option<CertificateRecord> {
            read(&self.state, hostname).unwrap().map(|(r, _)| r)
        }

        fn put(&self, r: &CertificateRecord) {
            self.state
                .control()
                .store()
                .put(&cert_key(&r.hostname).unwrap(), serde_json::to_vec(r).unwrap())
                .unwrap();
        }
    }

    #[tokio::test]
    async fn add_show_list_check_remove() {
        let t = T::with_apps().await;
        let (s, body) = t
            .call(
                "POST",
                "/v1/apps/web/certificates",
                Some(json!({"hostname": "WWW.Example.com"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["hostname"], "www.example.com");
        assert_eq!(body["status"], "pending");
        assert_eq!(body["configured"], false);
        assert_eq!(body["dns_requirements"]["cname"], "web.apps.example.net");
        assert_eq!(body["dns_requirements"]["a"], json!(["192.0.2.7"]));
        assert_eq!(body["dns_requirements"]["aaaa"], json!(["2001:db8::7"]));
        assert!(body.get("key_pem").is_none());
        assert_eq!(
            t.record("www.example.com").unwrap().status,
            CertificateStatus::Pending
        );

        // Adding it again to the same app is idempotent (Fly's path too); another app gets 409.
        let (s, _) = t
            .call(
                "POST",
                "/v1/apps/web/certificates/acme",
                Some(json!({"hostname": "www.example.com"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, body) = t
            .call(
                "POST",
                "/v1/apps/api/certificates",
                Some(json!({"hostname": "www.example.com"})),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{body}");
        assert!(body["error"].as_str().unwrap().contains("another app"), "{body}");

        // The edge issues it: show reports ready, never the key.
        let mut r = t.record("www.example.com").unwrap();
        r.status = CertificateStatus::Failed;
        r.error = Some("no A record".into());
        r.key_pem = Some("PRIVATE".into());
        t.put(&r);
        let (s, body) = t
            .call("GET", "/v1/apps/web/certificates/www.example.com", None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["status"], "failed");
        assert_eq!(body["error"], "no A record");
        assert!(!body.to_string().contains("PRIVATE"));
        // Another app does not see it.
        let (s, _) = t
            .call("GET", "/v1/apps/api/certificates/www.example.com", None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // check re-queues a failed one.
        let (s, body) = t
            .call("POST", "/v1/apps/web/certificates/www.example.com/check", None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "pending");
        assert!(body.get("error").is_none(), "{body}");
        let stored = t.record("www.example.com").unwrap();
        assert_eq!(stored.status, CertificateStatus::Pending);
        // A ready one is left as it is.
        let mut ready = stored;
        ready.status = CertificateStatus::Ready;
        ready.source = Some(CertificateSource::Local);
        t.put(&ready);
        let (_, body) = t
            .call("POST", "/v1/apps/web/certificates/www.example.com/check", None)
            .await;
        assert_eq!(body["status"], "ready");
        assert_eq!(body["source"], "local");

        t.call(
            "POST",
            "/v1/apps/web/certificates",
            Some(json!({"hostname": "b.example.org"})),
        )
        .await;
        let (s, body) = t.call("GET", "/v1/apps/web/certificates", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["total_count"], 2);
        assert_eq!(body["certificates"][0]["hostname"], "b.example.org");
        let (_, body) = t.call("GET", "/v1/apps/web/certificates?filter=www", None).await;
        assert_eq!(body["total_count"], 1);
        let (_, body) = t.call("GET", "/v1/apps/api/certificates", None).await;
        assert_eq!(body["total_count"], 0);

        // Another app cannot remove it; its own can, with an edge's claim on issuing it.
        let control = t.state.control();
        let rev = read(&t.state, "www.example.com").unwrap().unwrap().1;
        let claimed = control
            .claim_cert(
                "www.example.com",
                "host-1",
                std::time::Duration::from_secs(600),
                rev,
            )
            .unwrap();
        assert!(matches!(claimed, aloft_store::CertClaimOutcome::Claimed(_)));
        let (s, _) = t
            .call("DELETE", "/v1/apps/api/certificates/www.example.com", None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = t
            .call("DELETE", "/v1/apps/web/certificates/www.example.com", None)
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert!(t.record("www.example.com").is_none());
        assert!(control.cert_claim("www.example.com").unwrap().is_none());
        let (s, _) = t
            .call("GET", "/v1/apps/web/certificates/www.example.com", None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn bad_hostnames_are_refused() {
        let t = T::with_apps().await;
        for (hostname, status) in [
            ("not a name", StatusCode::BAD_REQUEST),
            ("*.example.com", StatusCode::BAD_REQUEST),
            ("localhost", StatusCode::BAD_REQUEST),
            ("web.apps.example.net", StatusCode::UNPROCESSABLE_ENTITY),
            ("APPS.example.net", StatusCode::UNPROCESSABLE_ENTITY),
        ] {
            let (s, body) = t
                .call(
                    "POST",
                    "/v1/apps/web/certificates",
                    Some(json!({"hostname": hostname})),
                )
                .await;
            assert_eq!(s, status, "{hostname}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains(&hostname.to_ascii_lowercase())
                    || s == StatusCode::BAD_REQUEST
            );
        }
        let (s, _) = t
            .call(
                "POST",
                "/v1/apps/nope/certificates",
                Some(json!({"hostname": "a.example.com"})),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = t.call("POST", "/v1/apps/web/certificates", Some(json!({}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn edge_ca_serves_the_root_file() {
        let t = T::new();
        let (s, body) = t.call("GET", "/v1/platform/edge-ca", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            body["pem"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        // No edge: 503.
        let dir = tempfile::tempdir().unwrap();
        let state = ApiState::new(
            Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap()),
            ApiConfig::default(),
        );
        let token = create_token(state.control(), "personal", "t").unwrap().token;
        let req = Request::builder()
            .uri("/v1/platform/edge-ca")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = router(state).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
