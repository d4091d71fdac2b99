//! The real `aloftd` binary on a free port with a temporary data directory and CLI config
//! directory: the first start writes the CLI's config, apps are created, listed and deleted over
//! HTTP with that token, SIGTERM stops it with exit code 0 within a second, and a restart keeps
//! both the token and the apps. Key rotations (app secrets, the agent's secrets, edge
//! certificate keys) with previous keys, and `aloftd key-id`. With `--etcd`, the control store
//! lives in a (test) etcd across restarts, and a wrong URL stops aloftd with a clear message.

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use reqwest::StatusCode;
    use rustix::process::{Pid, Signal, kill_process};
    use serde_json::{Value, json};

    /// A running aloftd and what it printed so far.
    struct Daemon {
        child: Child,
        stdout: Arc<Mutex<String>>,
        stderr: Arc<Mutex<String>>,
        readers: Vec<JoinHandle<()>>,
    }

    fn drain(mut from: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    }

    struct Env {
        _dir: tempfile::TempDir,
        data: PathBuf,
        config_home: PathBuf,
        home: PathBuf,
    }

    impl Env {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (data, config_home, home) = (
                dir.path().join("data"),
                dir.path().join("config"),
                dir.path().join("home"),
            );
            std::fs::create_dir(&home).unwrap();
            Self {
                _dir: dir,
                data,
                config_home,
                home,
            }
        }

        fn config_path(&self) -> PathBuf {
            self.config_home.join("aloft").join("config.toml")
        }

        /// A client of aloftd's API with the admin token its first start wrote.
        fn api(&self) -> Client {
            let (api_url, token) = read_config(&self.config_path());
            Client::new(&api_url, Some(&token))
        }

        /// Starts aloftd on `port`, pointed only at this test's directories.
        fn start(&self, port: u16) -> Daemon {
            self.start_with(port, &[])
        }

        /// … with more flags.
        fn start_with(&self, port: u16, flags: &[&str]) -> Daemon {
            self.spawn(port, &[flags, &["--no-edge"]].concat())
        }

        /// … with `flags` only (the edge runs unless they say `--no-edge`).
        fn spawn(&self, port: u16, flags: &[&str]) -> Daemon {
            self.spawn_env(port, flags, &[])
        }

        /// … and `vars` in its environment.
        fn spawn_env(&self, port: u16, flags: &[&str], vars: &[(&str, &Path)]) -> Daemon {
            let mut child = Command::new(env!("CARGO_BIN_EXE_aloftd"))
                // Only what the test gives: not the developer's etcd.
                .env_remove("ALOFT_ETCD")
                .args(flags)
                .envs(vars.iter().copied())
                .args(["--driver", "fake"])
                .arg("--data-dir")
                .arg(&self.data)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .env("XDG_CONFIG_HOME", &self.config_home)
                .env("HOME", &self.home)
                .env_remove("ALOFT_DATA_DIR")
                .env_remove("ALOFT_LISTEN")
                .env_remove("ALOFT_REGION")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = Arc::new(Mutex::new(String::new()));
            let stderr = Arc::new(Mutex::new(String::new()));
            let readers = vec![
                drain(child.stdout.take().unwrap(), stdout.clone()),
                drain(child.stderr.take().unwrap(), stderr.clone()),
            ];
            Daemon {
                child,
                stdout,
                stderr,
                readers,
            }
        }
    }

    impl Daemon {
        /// Waits until it says it is listening (after the first-start setup) and the port answers.
        fn wait_ready(&mut self, port: u16) {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if self.stderr().contains("aloftd: listening on")
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return;
                }
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("aloftd exited with {status} before listening:\n{}", self.stderr());
                }
                assert!(
                    Instant::now() < deadline,
                    "aloftd did not listen in time:\n{}",
                    self.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Waits for it to exit, at most `limit`; returns its status and how long that took.
        fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
            let start = Instant::now();
            while start.elapsed() < limit {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return Some((status, start.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        }

        fn terminate(&self) {
            let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
            kill_process(pid, Signal::TERM).unwrap();
        }

        fn finish(mut self) -> (String, String) {
            for r in self.readers.drain(..) {
                r.join().unwrap();
            }
            (self.stdout(), self.stderr())
        }

        fn stdout(&self) -> String {
            self.stdout.lock().unwrap().clone()
        }

        fn stderr(&self) -> String {
            self.stderr.lock().unwrap().clone()
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            // Only the child this test started, and only if a failed assertion left it running.
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn read_config(path: &Path) -> (String, String) {
        let table: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
        (
            table["api_url"].as_str().unwrap().to_owned(),
            table["token"].as_str().unwrap().to_owned(),
        )
    }

    /// An HTTP client for one aloftd, with or without a token.
    struct Client {
        http: reqwest::Client,
        base: String,
        token: Option<String>,
    }

    impl Client {
        fn new(base: &str, token: Option<&str>) -> Self {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Self {
                http: reqwest::Client::builder().no_proxy().build().unwrap(),
                base: base.to_owned(),
                token: token.map(str::to_owned),
            }
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let mut req = self.http.request(method, format!("{}{path}", self.base));
            if let Some(token) = &self.token {
                req = req.header("authorization", format!("Bearer {token}"));
            }
            if let Some(body) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap();
            let value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (status, value)
        }

        async fn get(&self, path: &str) -> (StatusCode, Value) {
            self.call(reqwest::Method::GET, path, None).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_start_serves_apps_stops_on_sigterm_and_restarts_with_the_same_token() {
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);

        // The first start wrote the CLI config, owner-only, and printed the same token.
        let (api_url, token) = read_config(&env.config_path());
        assert_eq!(api_url, format!("http://127.0.0.1:{port}"));
        assert!(token.starts_with("aloft_"), "{token}");
        let mode = std::fs::metadata(env.config_path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            daemon.stdout().contains(&token),
            "token not printed:\n{}",
            daemon.stdout()
        );
        assert!(
            !env.home.join(".config").exists(),
            "wrote under HOME despite XDG_CONFIG_HOME"
        );

        let anonymous = Client::new(&api_url, None);
        let (s, body) = anonymous.get("/v1/apps?org_slug=personal").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["error"].as_str().unwrap().contains("Authorization"));
        let api = Client::new(&api_url, Some(&token));
        for name in ["keep-me", "drop-me"] {
            let body = json!({"name": name, "org_slug": "personal"});
            let (s, body) = api
                .call(reqwest::Method::POST, "/v1/apps?wait=true", Some(body))
                .await;
            assert_eq!(s, StatusCode::CREATED, "{body}");
            assert_eq!(body["name"], name);
        }
        let (s, list) = api.get("/v1/apps?org_slug=personal").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(list["total_apps"], 2, "{list}");
        let (s, _) = api.call(reqwest::Method::DELETE, "/v1/apps/drop-me", None).await;
        assert_eq!(s, StatusCode::ACCEPTED);

        // A second aloftd on the same data directory refuses to start.
        let other_port = free_port();
        let mut second = env.start(other_port);
        let (status, _) = second
            .wait_exit(Duration::from_secs(20))
            .expect("a second aloftd on the same data dir kept running");
        assert!(!status.success());
        let (_, second_err) = second.finish();
        assert!(second_err.contains("in use by another process"), "{second_err}");

        // SIGTERM: exit code 0 within a second, with the keep-alive connection still open.
        daemon.terminate();
        let (status, took) = daemon
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("aloftd ignored SIGTERM:\n{}", daemon.stderr()));
        assert!(status.success(), "{status}:\n{}", daemon.stderr());
        assert!(took < Duration::from_secs(1), "took {took:?} to stop");
        let (_, stderr) = daemon.finish();
        assert!(stderr.contains("SIGTERM"), "{stderr}");
        assert!(
            stderr.contains("POST /v1/apps 201"),
            "no access log line:\n{stderr}"
        );
        assert!(
            !stderr.contains(&token["aloft_".len() + 17..]),
            "the token's secret reached the log"
        );

        // The restart mints nothing and rewrites nothing; the token and the kept app are there.
        let config_before = std::fs::read_to_string(env.config_path()).unwrap();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let api = Client::new(&api_url, Some(&token));
        let (s, app) = api.get("/v1/apps/keep-me").await;
        assert_eq!(s, StatusCode::OK, "{app}");
        assert_eq!(app["organization"]["slug"], "personal");
        assert_eq!(api.get("/v1/apps/drop-me").await.0, StatusCode::NOT_FOUND);
        let (_, list) = api.get("/v1/apps?org_slug=personal").await;
        assert_eq!(list["total_apps"], 1, "{list}");
        assert_eq!(std::fs::read_to_string(env.config_path()).unwrap(), config_before);
        daemon.terminate();
        let (status, _) = daemon
            .wait_exit(Duration::from_secs(5))
            .expect("aloftd ignored SIGTERM");
        assert!(status.success());
        let (stdout, _) = daemon.finish();
        assert!(!stdout.contains("aloft_"), "a restart printed a token:\n{stdout}");
    }

    /// Stops `daemon` with SIGTERM; what it wrote to stderr.
    fn stop(daemon: Daemon) -> String {
        daemon.terminate();
        let mut daemon = daemon;
        let (status, _) = daemon
            .wait_exit(Duration::from_secs(5))
            .expect("aloftd ignored SIGTERM");
        assert!(status.success(), "{status}:\n{}", daemon.stderr());
        daemon.finish().1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_secrets_key_reseals_secrets_at_start_and_then_the_old_key_can_go() {
        const VALUE: &str = "rotate-me-5a9c";
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let api = env.api();
        let (s, body) = api
            .call(
                reqwest::Method::POST,
                "/v1/apps?wait=true",
                Some(json!({"name": "web", "org_slug": "personal"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let (s, body) = api
            .call(
                reqwest::Method::POST,
                "/v1/apps/web/secrets",
                Some(json!({"values": {"DB": VALUE, "API": "a"}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        stop(daemon);

        // Rotate: the old key moves aside, aloftd makes a new one and is given the old as
        // previous. It re-seals both secrets when it starts and says so (counts, no values).
        let key = env.data.join("secrets.key");
        let old = env.data.join("secrets.key.old");
        std::fs::rename(&key, &old).unwrap();
        let old_arg = old.to_str().unwrap();
        let mut daemon = env.start_with(port, &["--secrets-key-previous", old_arg]);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        assert!(
            stderr.contains("re-sealed 2 secret(s) of 1 app(s) with the current secrets key"),
            "{stderr}"
        );
        assert!(
            stderr.contains("the previous key files can be dropped"),
            "{stderr}"
        );
        assert!(!stderr.contains(VALUE), "{stderr}");
        // A second start with both keys finds nothing left to re-seal.
        let mut daemon = env.start_with(port, &["--secrets-key-previous", old_arg]);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        assert!(!stderr.contains("re-sealed"), "{stderr}");
        assert!(stderr.contains("can be dropped"), "{stderr}");

        // The new key alone: nothing it cannot open.
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        assert!(!stderr.contains("cannot open"), "{stderr}");

        // A key that sealed none of them: aloftd still starts, and names each secret, the key
        // id it needs and the flag that gives it.
        let rotated = env.data.join("secrets.key.rotated");
        std::fs::rename(&key, &rotated).unwrap();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        for part in [
            "cannot open web/DB",
            "cannot open web/API",
            "--secrets-key-previous",
        ] {
            assert!(stderr.contains(part), "{part:?} missing:\n{stderr}");
        }
        assert!(!stderr.contains(VALUE), "{stderr}");
        // A previous key file that does not exist is refused (never created).
        let mut daemon = env.start_with(port, &["--secrets-key-previous", "/nonexistent/old.key"]);
        let (status, _) = daemon
            .wait_exit(Duration::from_secs(20))
            .expect("aloftd started with a missing previous key");
        assert!(!status.success());
        let (_, stderr) = daemon.finish();
        assert!(stderr.contains("--secrets-key-previous"), "{stderr}");
    }

    /// `aloftd key-id FILE…`: its exit status, stdout and stderr.
    fn key_id(files: &[&Path]) -> (ExitStatus, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_aloftd"))
            .arg("key-id")
            .args(files)
            .env_remove("ALOFT_DATA_DIR")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    #[test]
    fn key_id_prints_each_key_files_id() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let a_id = aloft_secretbox::Key::load_or_create(&a).unwrap().id();
        let b_id = aloft_secretbox::Key::load_or_create(&b).unwrap().id();
        let (status, stdout, _) = key_id(&[&a, &b]);
        assert!(status.success());
        assert_eq!(
            stdout,
            format!("{a_id}  {}\n{b_id}  {}\n", a.display(), b.display())
        );
        // A file that is no key file: said on stderr, the others still printed, exit code 1.
        let missing = dir.path().join("missing.key");
        let (status, stdout, stderr) = key_id(&[&missing, &a]);
        assert!(!status.success());
        assert_eq!(stdout, format!("{a_id}  {}\n", a.display()));
        assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_agent_secrets_key_reseals_machines_secrets_and_key_id_names_the_missing_key() {
        const VALUE: &str = "agent-rotate-77d1";
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let api = env.api();
        let body = json!({"name": "web", "org_slug": "personal"});
        let (s, body) = api
            .call(reqwest::Method::POST, "/v1/apps?wait=true", Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let body = json!({"values": {"DB": VALUE}});
        let (s, body) = api
            .call(reqwest::Method::POST, "/v1/apps/web/secrets", Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let body = json!({"config": {"image": "busybox"}});
        let (s, body) = api
            .call(reqwest::Method::POST, "/v1/apps/web/machines", Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let machine = body["id"].as_str().unwrap().to_owned();
        stop(daemon);

        // The agent's key moved aside and not given: aloftd starts, and names the machine, the
        // key id it needs (the one `aloftd key-id` prints for the old file) and the flag.
        let key = env.data.join("agent-secrets.key");
        let old = env.data.join("agent-secrets.key.old");
        std::fs::rename(&key, &old).unwrap();
        let (status, line, _) = key_id(&[&old]);
        assert!(status.success());
        let old_id = line.split_whitespace().next().unwrap().to_owned();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        let cannot = stderr
            .lines()
            .find(|l| l.starts_with("aloftd: agent secrets: cannot open"))
            .unwrap_or_else(|| panic!("no cannot-open line:\n{stderr}"));
        for part in [
            machine.as_str(),
            &format!("sealed with key {old_id}"),
            "--agent-secrets-key-previous",
            "aloftd key-id",
        ] {
            assert!(cannot.contains(part), "{part:?} missing: {cannot}");
        }

        // Given as previous key (through the environment, as a service file would): re-sealed.
        let mut daemon = env.spawn_env(
            port,
            &["--no-edge"],
            &[("ALOFT_AGENT_SECRETS_KEY_PREVIOUS", &old)],
        );
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        let new_id = aloft_secretbox::Key::load(&key).unwrap().id().to_string();
        for part in [
            format!("agent secrets keys: current {new_id}"),
            format!("previous {old_id} ({})", old.display()),
            format!(
                "re-sealed 1 sealed value(s) of 1 machine(s) with the current agent secrets key {new_id}"
            ),
            "the previous key files can be dropped".to_owned(),
        ] {
            assert!(stderr.contains(&part), "{part:?} missing:\n{stderr}");
        }
        assert!(!stderr.contains(VALUE), "{stderr}");

        // The new key alone opens everything.
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let stderr = stop(daemon);
        assert!(!stderr.contains("agent secrets: cannot open"), "{stderr}");
    }

    /// Waits (at most 20 s) until `daemon`'s stderr contains `needle`.
    fn wait_log(daemon: &Daemon, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                daemon.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The stored `key_pem` of `hostname`'s certificate (aloftd stopped).
    fn stored_key_pem(data: &Path, hostname: &str) -> String {
        let store = aloft_store::SqliteStore::open(data.join("control.db")).unwrap();
        let kv = aloft_store::Store::get(&store, &format!("/certs/{hostname}"))
            .unwrap()
            .unwrap();
        let record: Value = serde_json::from_slice(&kv.value).unwrap();
        record["key_pem"].as_str().unwrap().to_owned()
    }

    /// A TLS handshake with the edge on `port` for `name`, trusting only the edge's local CA.
    fn handshake(data: &Path, port: u16, name: &str) -> Result<(), std::io::Error> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName};
        let root = std::fs::read(data.join("edge").join("ca").join("ca.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(&root).unwrap()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(name.to_owned()).unwrap())
                .unwrap();
        let mut sock = TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(())
    }

    /// [`handshake`], retried for up to 10 s: a daemon answers its API before its edge has loaded
    /// the certificates from the store, and until then it refuses the name.
    fn handshake_soon(data: &Path, port: u16, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match handshake(data, port, name) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("no TLS handshake for {name}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_edge_key_reseals_certificate_keys_and_then_the_old_key_can_go() {
        const HOST: &str = "www.rotate.test";
        let env = Env::new();
        let (port, http, https) = (free_port(), free_port(), free_port());
        let edge = |extra: &[&str]| -> Vec<String> {
            let mut flags: Vec<String> = [
                "--network",
                "none",
                "--no-access-log",
                "--edge-metrics",
                "off",
                "--edge-http",
                &format!("127.0.0.1:{http}"),
                "--edge-https",
                &format!("127.0.0.1:{https}"),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            flags.extend(extra.iter().map(|s| (*s).to_owned()));
            flags
        };
        let start = |extra: &[&str]| {
            let flags = edge(extra);
            let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
            let mut d = env.spawn(port, &refs);
            d.wait_ready(port);
            d
        };

        // A custom domain, issued by the local CA, its key sealed with key A.
        let daemon = start(&[]);
        let api = env.api();
        let body = json!({"name": "web", "org_slug": "personal"});
        let (s, body) = api.call(reqwest::Method::POST, "/v1/apps", Some(body)).await;
        assert!(s.is_success(), "{body}");
        let (s, body) = api
            .call(
                reqwest::Method::POST,
                "/v1/apps/web/certificates",
                Some(json!({"hostname": HOST})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, c) = api.get(&format!("/v1/apps/web/certificates/{HOST}")).await;
            if c["status"] == "ready" {
                break;
            }
            assert!(Instant::now() < deadline, "not ready: {c}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop(daemon);
        let old = env.data.join("edge").join("cert-seal.key");
        let a_id = aloft_secretbox::Key::load(&old).unwrap().id().to_string();
        assert!(
            stored_key_pem(&env.data, HOST).starts_with(&format!("aloft-secretbox:v2:{a_id}:")),
            "{}",
            stored_key_pem(&env.data, HOST)
        );

        // Rotated: B current, A previous. Served, and re-sealed with B on the first pass.
        let new = env.data.join("edge").join("cert-seal.new");
        let b_id = aloft_secretbox::Key::load_or_create(&new)
            .unwrap()
            .id()
            .to_string();
        let (old_arg, new_arg) = (old.to_str().unwrap(), new.to_str().unwrap());
        let daemon = start(&["--edge-cert-key", new_arg, "--edge-cert-key-previous", old_arg]);
        wait_log(&daemon, "1 re-sealed");
        tokio::task::block_in_place(|| handshake_soon(&env.data, https, HOST));
        let stderr = stop(daemon);
        assert!(stderr.contains(&format!("current {b_id}")), "{stderr}");
        assert!(
            stored_key_pem(&env.data, HOST).starts_with(&format!("aloft-secretbox:v2:{b_id}:")),
            "{}",
            stored_key_pem(&env.data, HOST)
        );

        // B alone serves it.
        let daemon = start(&["--edge-cert-key", new_arg]);
        tokio::task::block_in_place(|| handshake_soon(&env.data, https, HOST));
        let stderr = stop(daemon);
        assert!(!stderr.contains("does not open"), "{stderr}");

        // A alone (the new key lost): not served; the log names B's id and the flag.
        let daemon = start(&[]);
        wait_log(&daemon, "does not open");
        assert!(tokio::task::block_in_place(|| handshake(&env.data, https, HOST)).is_err());
        let stderr = stop(daemon);
        for part in [b_id.as_str(), "--edge-cert-key-previous"] {
            assert!(stderr.contains(part), "{part:?} missing:\n{stderr}");
        }
    }

    /// Starts `POST /v1/apps` with `body` but sends only its first 10 bytes: the handler is left
    /// waiting for the rest.
    fn half_sent_create(port: u16, token: &str, body: &[u8]) -> TcpStream {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            conn,
            "POST /v1/apps HTTP/1.1\r\nHost: aloftd\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        conn.write_all(&body[..10]).unwrap();
        conn
    }

    #[test]
    fn requests_still_running_after_the_shutdown_timeout_are_cut_off() {
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start_with(port, &["--shutdown-timeout", "1"]);
        daemon.wait_ready(port);
        let (_, token) = read_config(&env.config_path());
        let _conn = half_sent_create(port, &token, br#"{"name": "never-finished"}"#);
        std::thread::sleep(Duration::from_millis(300));
        daemon.terminate();
        let (status, took) = daemon
            .wait_exit(Duration::from_secs(10))
            .expect("aloftd waited for a hung request past its shutdown timeout");
        assert!(status.success(), "{status}:\n{}", daemon.stderr());
        assert!(
            took >= Duration::from_millis(900),
            "stopped after {took:?}, before the timeout"
        );
        assert!(took < Duration::from_secs(4), "stopped after {took:?}");
        let (_, stderr) = daemon.finish();
        assert!(stderr.contains("cut off"), "{stderr}");
    }

    #[test]
    fn sigterm_lets_a_request_in_flight_finish() {
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start(port);
        daemon.wait_ready(port);
        let (_, token) = read_config(&env.config_path());

        let body = br#"{"name": "in-flight", "org_slug": "personal"}"#;
        let mut conn = half_sent_create(port, &token, body);
        std::thread::sleep(Duration::from_millis(300));
        daemon.terminate();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "aloftd exited with a request in flight:\n{}",
            daemon.stderr()
        );
        // New connections are no longer accepted.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

        conn.write_all(&body[10..]).unwrap();
        let mut response = String::new();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 201"), "{response}");
        assert!(response.contains("\"in-flight\""), "{response}");
        let (status, _) = daemon
            .wait_exit(Duration::from_secs(5))
            .expect("aloftd kept running after its last request");
        assert!(status.success(), "{status}:\n{}", daemon.stderr());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_etcd_the_control_store_lives_in_etcd_across_a_restart() {
        let etcd = aloft_testkit::Etcd::start()
            .unwrap_or_else(|e| panic!("{e}: install etcd-server (scripts/setup.sh does)"));
        let url = etcd.url();
        let env = Env::new();
        let port = free_port();
        let mut daemon = env.start_with(port, &["--etcd", &url]);
        daemon.wait_ready(port);
        assert!(
            daemon.stderr().contains("aloftd: control store: etcd 3."),
            "{}",
            daemon.stderr()
        );
        let (_, token) = read_config(&env.config_path());
        assert!(
            daemon.stdout().contains(&token),
            "the first start printed no token"
        );
        let api = env.api();
        let body = json!({"name": "on-etcd", "org_slug": "personal"});
        let (s, body) = api
            .call(reqwest::Method::POST, "/v1/apps?wait=true", Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let body = json!({"config": {"image": "busybox"}});
        let (s, machine) = api
            .call(reqwest::Method::POST, "/v1/apps/on-etcd/machines", Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{machine}");
        let id = machine["id"].as_str().unwrap().to_owned();
        let (s, waited) = api
            .get(&format!(
                "/v1/apps/on-etcd/machines/{id}/wait?state=started&timeout=10"
            ))
            .await;
        assert_eq!(s, StatusCode::OK, "{waited}");
        let stderr = stop(daemon);
        assert!(stderr.contains("POST /v1/apps 201"), "{stderr}");

        // The records are in etcd, not in a control.db; this host's agent.db stays local.
        assert!(!env.data.join("control.db").exists(), "a control.db was created");
        assert!(env.data.join("agent.db").exists() || env.data.join("agent").exists());
        let direct = aloft_etcd::EtcdStore::connect(aloft_etcd::EtcdOptions::new([url.clone()])).unwrap();
        let app = aloft_store::Store::get(&direct, "/apps/on-etcd").unwrap();
        assert!(app.is_some(), "the app record is not in etcd");
        let machine_key = format!("/machines/on-etcd/{id}");
        assert!(aloft_store::Store::get(&direct, &machine_key).unwrap().is_some());
        drop(direct);

        // The same data directory and etcd (ALOFT_ETCD this time): the token, the app and the
        // machine are all still there, and nothing new was minted.
        let config_before = std::fs::read_to_string(env.config_path()).unwrap();
        let mut daemon = env.spawn_env(port, &["--no-edge"], &[("ALOFT_ETCD", Path::new(&url))]);
        daemon.wait_ready(port);
        assert!(
            !daemon.stdout().contains("aloft_"),
            "a restart minted a token:\n{}",
            daemon.stdout()
        );
        assert_eq!(std::fs::read_to_string(env.config_path()).unwrap(), config_before);
        // The first start's admin token, from the CLI config it wrote.
        let api = env.api();
        let (s, app) = api.get("/v1/apps/on-etcd").await;
        assert_eq!(s, StatusCode::OK, "{app}");
        assert_eq!(app["organization"]["slug"], "personal");
        let (s, m) = api.get(&format!("/v1/apps/on-etcd/machines/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{m}");
        assert_eq!(m["config"]["image"], "busybox", "{m}");
        // The fake driver's machines do not outlive aloftd: its restart policy starts it again.
        let (s, waited) = api
            .get(&format!(
                "/v1/apps/on-etcd/machines/{id}/wait?state=started&timeout=10"
            ))
            .await;
        assert_eq!(s, StatusCode::OK, "{waited}");
        let (s, list) = api.get("/v1/apps/on-etcd/machines").await;
        assert_eq!(s, StatusCode::OK, "{list}");
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
        let (s, _) = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/apps/on-etcd/machines/{id}/stop"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        let stderr = stop(daemon);
        assert!(stderr.contains("control store: etcd"), "{stderr}");
        assert!(!env.data.join("control.db").exists());
        drop(etcd);
    }

    #[test]
    fn a_wrong_etcd_url_stops_aloftd_with_a_clear_message() {
        let env = Env::new();
        let url = format!("http://127.0.0.1:{}", free_port());
        let mut daemon = env.start_with(free_port(), &["--etcd", &url]);
        let (status, _) = daemon
            .wait_exit(Duration::from_secs(20))
            .expect("aloftd kept running without its etcd");
        assert!(!status.success());
        let (_, stderr) = daemon.finish();
        assert!(
            stderr.contains(&format!(
                "etcd at {url}: connection refused; start etcd or fix --etcd"
            )),
            "{stderr}"
        );
        assert!(!env.data.join("control.db").exists());
        // Not a URL at all.
        let mut daemon = env.start_with(free_port(), &["--etcd", "localhost:2379"]);
        let (status, _) = daemon.wait_exit(Duration::from_secs(20)).expect("kept running");
        assert!(!status.success());
        let (_, stderr) = daemon.finish();
        assert!(
            stderr.contains("invalid etcd endpoint \"localhost:2379\""),
            "{stderr}"
        );
    }
}
