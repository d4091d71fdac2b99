//! What the in-process API tests share: the real router (`aloft-control`) over the real agent
//! (`aloft-agent`) on its in-memory `FakeDriver`, with an admin token, called as a tower service
//! — every layer but the socket and the VMs.

#![allow(dead_code, reason = "each test file uses part of it")]
#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

use std::sync::Arc;
use std::time::Duration;

use aloft_agent::{Agent, AgentConfig, FakeDriver};
use aloft_control::{ApiConfig, ApiState, HostHandle, create_token, router};
use aloft_store::{ControlStore, SqliteStore, Store};
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

pub(crate) mod upgrade;

/// One control plane and one host (`host-1` in region `local`) in a temporary directory.
pub(crate) struct Harness {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) router: axum::Router,
    pub(crate) token: String,
    pub(crate) control: ControlStore,
    pub(crate) fake: FakeDriver,
    pub(crate) agent: Arc<Agent>,
}

impl Harness {
    /// A harness whose agent has short waits and a host of 4 vCPUs and 4 GiB; `tune` changes
    /// the agent's config further. App secrets are sealed with a key in the directory.
    pub(crate) fn new(tune: impl FnOnce(&mut AgentConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("control.db")).unwrap());
        let control = ControlStore::new(store.clone());
        let token = create_token(&control, "personal", "admin").unwrap().token;
        let fake = FakeDriver::new();
        let mut config = AgentConfig {
            retry_delay: Duration::from_millis(10),
            stop_timeout: Duration::from_millis(200),
            poll: Duration::from_millis(20),
            host_memory_mb: 4096,
            host_cpus: 4,
            ..AgentConfig::new(dir.path().join("agent").join("agent.db"))
        };
        tune(&mut config);
        let agent = Arc::new(Agent::open(config, Arc::new(fake.clone())).unwrap());
        let key = aloft_secretbox::Key::load_or_create(&dir.path().join("secrets.key")).unwrap();
        let router = Self::router(store, &agent, Arc::new(aloft_secretbox::Keyring::new(key)));
        Self {
            dir,
            router,
            token,
            control,
            fake,
            agent,
        }
    }

    fn router(
        store: Arc<dyn Store>,
        agent: &Arc<Agent>,
        keys: Arc<aloft_secretbox::Keyring>,
    ) -> axum::Router {
        Self::router_with(store, agent, keys, |s| s)
    }

    fn router_with(
        store: Arc<dyn Store>,
        agent: &Arc<Agent>,
        keys: Arc<aloft_secretbox::Keyring>,
        tune: impl FnOnce(ApiState) -> ApiState,
    ) -> axum::Router {
        let state = ApiState::with_hosts(
            store,
            ApiConfig {
                region: "local".into(),
                access_log: false,
            },
            vec![HostHandle {
                name: "host-1".into(),
                region: "local".into(),
                agent: agent.clone(),
            }],
        )
        .with_secrets_keys(keys);
        router(tune(state))
    }

    /// Serves from now on with the API state changed by `tune` (e.g. a lower console limit),
    /// over the same store, host and secrets key.
    pub(crate) fn tune_state(&mut self, tune: impl FnOnce(ApiState) -> ApiState) {
        let key = aloft_secretbox::Key::load_or_create(&self.dir.path().join("secrets.key")).unwrap();
        let keys = Arc::new(aloft_secretbox::Keyring::new(key));
        self.router = Self::router_with(Arc::clone(self.control.store()), &self.agent, keys, tune);
    }

    /// Serves the router on a real socket (`127.0.0.1`, a free port) until the test ends: what
    /// upgraded connections (`…/console`) need, which a tower `oneshot` cannot give.
    pub(crate) async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = self.router.clone();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    /// Serves from now on with `keys` sealing and opening app secrets, over the same store and
    /// host: what restarting aloftd with other secrets key files gives.
    pub(crate) fn use_secrets_keys(&mut self, keys: Arc<aloft_secretbox::Keyring>) {
        self.router = Self::router(Arc::clone(self.control.store()), &self.agent, keys);
    }

    /// One request with `token` and `headers`; the status and the whole body.
    pub(crate) async fn request(
        &self,
        method: &str,
        uri: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (StatusCode, Bytes) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// A JSON request with the admin token; the status and the body as JSON (`Null` when empty,
    /// a string when it is not JSON).
    pub(crate) async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map_or_else(Body::empty, |b| Body::from(serde_json::to_vec(&b).unwrap()));
        let (status, bytes) = self.request(method, uri, &self.token, &[], body).await;
        (status, json(&bytes))
    }

    /// Waits (up to 10 s) until machine `id` of `app` is in `state`; the wait's answer.
    pub(crate) async fn wait(&self, app: &str, id: &str, state: &str) -> Value {
        let (s, w) = self
            .call(
                "GET",
                &format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=10"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "waiting for {state}: {w}");
        assert_eq!(w["ok"], true);
        w
    }

    /// Creates app `app` with one busybox machine and waits until it is started; its id.
    pub(crate) async fn started_machine(&self, app: &str) -> String {
        let (s, _) = self.call("POST", "/v1/apps", Some(json!({"name": app}))).await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, m) = self
            .call(
                "POST",
                &format!("/v1/apps/{app}/machines"),
                Some(json!({"config": {"image": "busybox:latest"}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{m}");
        let id = m["id"].as_str().unwrap().to_owned();
        self.wait(app, &id, "started").await;
        id
    }
}

/// A body as JSON: `Null` when empty, a string when it is not JSON.
pub(crate) fn json(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    }
}
