//! Custom domains end to end in one process: the control API (`aloft-control`) records a
//! hostname, the edge's certificate manager (`aloft-proxy`) issues it with the local CA over the
//! same store, and the certificate the edge would serve verifies against the root that
//! `GET /v1/platform/edge-ca` hands out.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use crate::common;

    use std::sync::Arc;
    use std::time::Duration;

    use aloft_control::{ApiConfig, ApiState, EdgeSettings, create_token, router};
    use aloft_proxy::tls::{CertManager, CertManagerConfig, LocalCa, LocalIssuer};
    use aloft_store::{SqliteStore, Store};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    struct Edge {
        _dir: tempfile::TempDir,
        router: axum::Router,
        token: String,
        ca: Arc<LocalCa>,
        manager: Arc<CertManager>,
    }

    impl Edge {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap());
            let ca_dir = dir.path().join("edge").join("ca");
            let ca = Arc::new(LocalCa::open(&ca_dir).unwrap());
            let state = ApiState::new(
                store.clone(),
                ApiConfig {
                    region: "local".into(),
                    access_log: false,
                },
            )
            .with_edge(EdgeSettings {
                base_domain: "localhost".into(),
                addresses: vec!["127.0.0.1".parse().unwrap()],
                ca_root: Some(ca_dir.join("ca.pem")),
            });
            let token = create_token(state.control(), "personal", "admin").unwrap().token;
            let key_file = dir.path().join("edge").join("cert-seal.key");
            let seal_key = Arc::new(aloft_secretbox::Keyring::new(
                aloft_secretbox::Key::load_or_create(&key_file).unwrap(),
            ));
            let manager = CertManager::new(
                store,
                Arc::new(LocalIssuer::new(ca.clone())),
                CertManagerConfig::new("host-1", seal_key, key_file),
            );
            Self {
                _dir: dir,
                router: router(state),
                token,
                ca,
                manager,
            }
        }

        async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {}", self.token))
                .header("content-type", "application/json")
                .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
                .unwrap();
            let resp = self.router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            (
                status,
                common::json(&resp.into_body().collect().await.unwrap().to_bytes()),
            )
        }

        /// Polls `GET …/certificates/{hostname}` until `done` holds (at most 20 s).
        async fn wait_for(&self, uri: &str, done: impl Fn(&Value) -> bool) -> Value {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (_, body) = self.call("GET", uri, None).await;
                if done(&body) {
                    return body;
                }
                assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {body}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    fn verify(root_pem: &str, chain: &[CertificateDer<'static>], name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(drop)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_custom_domain_is_issued_by_the_edge_and_trusted_through_the_root() {
        let edge = Edge::new();
        let (s, body) = edge
            .call(
                "POST",
                "/v1/apps",
                Some(json!({"name": "web", "org_slug": "personal"})),
            )
            .await;
        assert!(s.is_success(), "{body}");
        let runner = tokio::spawn(edge.manager.clone().run());

        let (s, body) = edge
            .call(
                "POST",
                "/v1/apps/web/certificates",
                Some(json!({"hostname": "www.example.test"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["status"], "pending");
        assert_eq!(
            body["check_hints"],
            json!([
                "CNAME www.example.test -> web.localhost",
                "A www.example.test -> 127.0.0.1"
            ])
        );

        // The edge issues it; the API reports it ready, issued by the local CA.
        let uri = "/v1/apps/web/certificates/www.example.test";
        let ready = edge.wait_for(uri, |b| b["status"] == "ready").await;
        assert_eq!(ready["source"], "local");
        assert_eq!(ready["issuer"], edge.ca.name());
        assert!(ready["expires_at"].as_str().unwrap().ends_with('Z'), "{ready}");
        assert_eq!(edge.manager.app_for("www.example.test").as_deref(), Some("web"));

        // What the edge serves for that name verifies against the root the API hands out, and only
        // for that name.
        let (s, ca) = edge.call("GET", "/v1/platform/edge-ca", None).await;
        assert_eq!(s, StatusCode::OK);
        let root = ca["pem"].as_str().unwrap();
        assert_eq!(root, edge.ca.root_pem());
        let served = edge.manager.cert_for("www.example.test").unwrap();
        verify(root, &served.cert, "www.example.test").unwrap();
        assert!(verify(root, &served.cert, "other.example.test").is_err());

        // Removed: the edge forgets it.
        let (s, _) = edge.call("DELETE", uri, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while edge.manager.app_for("www.example.test").is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the edge kept the removed hostname"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(edge.manager.cert_for("www.example.test").is_none());
        runner.abort();
    }
}
