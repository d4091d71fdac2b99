//! Custom domains get real ACME certificates through aloftd's edge, end to end: the real
//! `aloftd` binary (fake driver, no network) with `--acme-directory` pointed at a real Pebble
//! (`aloft_testkit::Pebble`) whose validator reaches aloftd's own edge listeners (Pebble's
//! `httpPort` is the edge's HTTP port, its `tlsPort` the edge's HTTPS port, its DNS answers
//! 127.0.0.1). A hostname added through the API becomes `ready` (source `acme`) and the edge then
//! serves a chain that verifies against Pebble's issuing root alone, with HTTP-01 and with
//! TLS-ALPN-01; the account key is stored owner-only and reused after a restart, and the leaves'
//! private keys are sealed in the control store (`<data dir>/edge/cert-seal.key`); a validation
//! that cannot reach the edge leaves the record `failed` with the CA's reason. Each test kills
//! only the processes it started. Without the `pebble` binary the tests skip, unless `CI` is set.

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::net::{Ipv4Addr, TcpStream};
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use aloft_testkit::{Pebble, PebbleOptions, free_port};
    use rustix::process::{Pid, Signal, kill_process};
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use serde_json::{Value, json};

    /// A running aloftd (this test's child) and what it printed to stderr.
    struct Daemon {
        child: Child,
        stderr: Arc<Mutex<String>>,
        reader: Option<JoinHandle<()>>,
    }

    impl Daemon {
        fn stderr(&self) -> String {
            self.stderr.lock().unwrap().clone()
        }

        /// SIGTERM, then SIGKILL if it has not exited within 10 s.
        fn stop(&mut self) {
            if let Ok(None) = self.child.try_wait() {
                let pid = Pid::from_child(&self.child);
                let _ = kill_process(pid, Signal::TERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
            if let Some(r) = self.reader.take() {
                let _ = r.join();
            }
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            self.stop();
            if std::thread::panicking() {
                eprintln!("---- aloftd's stderr ----\n{}---- end ----", self.stderr());
            }
        }
    }

    /// Pebble and an aloftd using it, with their ports and this test's directories.
    struct Setup {
        dir: tempfile::TempDir,
        pebble: Pebble,
        daemon: Option<Daemon>,
        challenge: &'static str,
        listen: u16,
        edge_http: u16,
        edge_https: u16,
        api: String,
        token: String,
        http: reqwest::Client,
    }

    impl Setup {
        /// Pebble validating against the edge's ports (at `dns_answer`), and aloftd with
        /// `--acme-challenge challenge`. `None`: Pebble is not installed (skip).
        fn start(challenge: &'static str, dns_answer: Ipv4Addr) -> Option<Self> {
            let (listen, edge_http, edge_https) =
                (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
            // reqwest (plain HTTP to the API here) wants a process-wide rustls provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut options = PebbleOptions::new(edge_http, edge_https);
            options.dns_answer = dns_answer;
            let pebble = Pebble::start(&options).unwrap()?;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("pebble-api-ca.pem"), pebble.api_root_pem()).unwrap();
            std::fs::create_dir(dir.path().join("home")).unwrap();
            let mut setup = Self {
                dir,
                pebble,
                daemon: None,
                challenge,
                listen,
                edge_http,
                edge_https,
                api: String::new(),
                token: String::new(),
                http: reqwest::Client::builder().no_proxy().build().unwrap(),
            };
            setup.start_daemon();
            let table: toml::Table =
                std::fs::read_to_string(setup.dir.path().join("config").join("aloft").join("config.toml"))
                    .unwrap()
                    .parse()
                    .unwrap();
            setup.api = table["api_url"].as_str().unwrap().to_owned();
            setup.token = table["token"].as_str().unwrap().to_owned();
            Some(setup)
        }

        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }

        /// Starts aloftd (again) and waits until its API and edge listen.
        fn start_daemon(&mut self) {
            let mut child = Command::new(env!("CARGO_BIN_EXE_aloftd"))
                .args(["--driver", "fake", "--network", "none", "--no-access-log"])
                .arg("--data-dir")
                .arg(self.data())
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.listen))
                .arg("--edge-http")
                .arg(format!("127.0.0.1:{}", self.edge_http))
                .arg("--edge-https")
                .arg(format!("127.0.0.1:{}", self.edge_https))
                .args(["--edge-metrics", "off", "--base-domain", "localhost"])
                .args(["--acme-directory", self.pebble.directory_url()])
                .arg("--acme-ca-root")
                .arg(self.dir.path().join("pebble-api-ca.pem"))
                .args([
                    "--acme-email",
                    "ops@aloft.test",
                    "--acme-challenge",
                    self.challenge,
                ])
                .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
                .env("HOME", self.dir.path().join("home"))
                .env_remove("ALOFT_DATA_DIR")
                .env_remove("ALOFT_LISTEN")
                .env_remove("ALOFT_REGION")
                .env_remove("ALOFT_ACME_DIRECTORY")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = Arc::new(Mutex::new(String::new()));
            let mut from = child.stderr.take().unwrap();
            let into = stderr.clone();
            let reader = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            let mut daemon = Daemon {
                child,
                stderr,
                reader: Some(reader),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while !(daemon.stderr().contains("aloftd: listening on")
                && [self.listen, self.edge_http, self.edge_https]
                    .iter()
                    .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok()))
            {
                if let Ok(Some(status)) = daemon.child.try_wait() {
                    panic!("aloftd exited with {status}:\n{}", daemon.stderr());
                }
                assert!(
                    Instant::now() < deadline,
                    "aloftd did not listen in time:\n{}",
                    daemon.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            self.daemon = Some(daemon);
        }

        async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.api))
                .bearer_auth(&self.token);
            if let Some(body) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.unwrap();
            (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }

        async fn add_hostname(&self, app: &str, hostname: &str) {
            let (s, body) = self
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/apps/{app}/certificates"),
                    Some(json!({"hostname": hostname})),
                )
                .await;
            assert_eq!(s, 201, "{body}");
            assert_eq!(body["status"], "pending", "{body}");
        }

        async fn create_app(&self, app: &str) {
            let (s, body) = self
                .call(
                    reqwest::Method::POST,
                    "/v1/apps",
                    Some(json!({"name": app, "org_slug": "personal"})),
                )
                .await;
            assert!((200..300).contains(&s), "{s} {body}");
        }

        /// Polls the certificate until it is no longer `pending` (at most 60 s).
        async fn settled(&self, app: &str, hostname: &str) -> Value {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (s, body) = self
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/apps/{app}/certificates/{hostname}"),
                        None,
                    )
                    .await;
                assert_eq!(s, 200, "{body}");
                if body["status"] != "pending" {
                    return body;
                }
                assert!(Instant::now() < deadline, "still pending after 60 s: {body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// A TLS handshake to the edge's HTTPS port with SNI `name`, trusting only Pebble's
        /// issuing root; returns the chain the edge served.
        fn handshake(&self, name: &str) -> Result<Vec<CertificateDer<'static>>, std::io::Error> {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.pebble.roots().unwrap())
            .with_no_client_auth();
            let mut conn = rustls::ClientConnection::new(
                Arc::new(config),
                ServerName::try_from(name.to_owned()).unwrap(),
            )
            .unwrap();
            let mut sock = TcpStream::connect(("127.0.0.1", self.edge_https))?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            Ok(conn.peer_certificates().unwrap().to_vec())
        }

        /// Whether `chain` verifies for `name` against Pebble's issuing root.
        fn verifies_for(&self, chain: &[CertificateDer<'static>], name: &str) -> bool {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(self.pebble.roots().unwrap()),
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
                .is_ok()
        }

        fn account_key(&self) -> PathBuf {
            self.data().join("edge").join("acme").join("account.key")
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            // aloftd first, then Pebble (the field order would drop Pebble first).
            self.daemon.take();
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Adds `hostname` to app `shop`, waits for `ready` from ACME, and checks what the edge
    /// serves for it.
    async fn issues_and_serves(setup: &Setup, hostname: &str) {
        setup.add_hostname("shop", hostname).await;
        let cert = setup.settled("shop", hostname).await;
        assert_eq!(cert["status"], "ready", "{cert}\n{}", setup.pebble.log());
        assert_eq!(cert["source"], "acme", "{cert}");
        assert_eq!(
            cert["issuer"],
            setup
                .pebble
                .directory_url()
                .trim_start_matches("https://")
                .trim_end_matches("/dir"),
            "{cert}"
        );
        assert!(cert["error"].is_null(), "{cert}");

        let chain = tokio::task::block_in_place(|| setup.handshake(hostname)).unwrap();
        assert!(chain.len() >= 2, "leaf and Pebble's intermediate");
        assert!(setup.verifies_for(&chain, hostname));
        assert!(
            !setup.verifies_for(&chain, "other.aloft.test"),
            "the leaf is for {hostname} only"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http01_a_custom_domain_gets_a_pebble_certificate_and_the_account_is_reused_after_a_restart() {
        let Some(mut setup) = tokio::task::block_in_place(|| Setup::start("http-01", Ipv4Addr::LOCALHOST))
        else {
            return;
        };
        setup.create_app("shop").await;
        assert!(!setup.account_key().exists(), "the account is registered lazily");
        issues_and_serves(&setup, "shop.aloft.test").await;

        // The account key: owner-only, and the same account after a restart.
        let key_path = setup.account_key();
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(key_path.parent().unwrap()), 0o700);
        let key = std::fs::read(&key_path).unwrap();
        assert!(String::from_utf8_lossy(&key).contains("PRIVATE KEY"));
        tokio::task::block_in_place(|| {
            setup.daemon.take();
            setup.start_daemon();
        });
        issues_and_serves(&setup, "www.shop.aloft.test").await;
        assert_eq!(std::fs::read(&key_path).unwrap(), key, "the stored key is reused");
        // Pebble registered one account (a second newAccount with the same key finds it again).
        let log = setup.pebble.log();
        assert_eq!(
            log.matches("There are now 1 accounts in memory").count()
                + log.matches("There are now 2 accounts in memory").count(),
            1,
            "{log}"
        );
        // The first certificate is still served after the restart: its private key, sealed in
        // the store, opens with the edge's key file.
        let chain = tokio::task::block_in_place(|| setup.handshake("shop.aloft.test")).unwrap();
        assert!(setup.verifies_for(&chain, "shop.aloft.test"));
        let seal_key = setup.data().join("edge").join("cert-seal.key");
        assert_eq!(mode(&seal_key), 0o600);
        // The store holds no plaintext private key.
        tokio::task::block_in_place(|| {
            setup.daemon.take();
            let store = aloft_store::SqliteStore::open(setup.data().join("control.db")).unwrap();
            for host in ["shop.aloft.test", "www.shop.aloft.test"] {
                let kv = aloft_store::Store::get(&store, &format!("/certs/{host}"))
                    .unwrap()
                    .unwrap();
                let text = String::from_utf8(kv.value).unwrap();
                assert!(!text.contains("PRIVATE KEY"), "{text}");
                assert!(text.contains("aloft-secretbox:v2:"), "{text}");
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_alpn01_a_custom_domain_gets_a_pebble_certificate() {
        let Some(setup) = tokio::task::block_in_place(|| Setup::start("tls-alpn-01", Ipv4Addr::LOCALHOST))
        else {
            return;
        };
        setup.create_app("shop").await;
        issues_and_serves(&setup, "shop.aloft.test").await;
        assert!(
            !setup.pebble.log().contains("Attempting to validate w/ HTTP"),
            "Pebble validated with TLS-ALPN-01, not HTTP-01"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_validation_that_cannot_reach_the_edge_fails_with_the_cas_reason() {
        // Pebble's DNS sends it to 127.0.0.2, where nothing listens on the edge's ports.
        let Some(setup) =
            tokio::task::block_in_place(|| Setup::start("http-01", Ipv4Addr::new(127, 0, 0, 2)))
        else {
            return;
        };
        setup.create_app("shop").await;
        setup.add_hostname("shop", "shop.aloft.test").await;
        let cert = setup.settled("shop", "shop.aloft.test").await;
        assert_eq!(cert["status"], "failed", "{cert}");
        let error = cert["error"].as_str().unwrap();
        eprintln!("the failure as users see it: {error}");
        assert!(error.contains("shop.aloft.test"), "{error}");
        assert!(error.contains("http-01"), "{error}");
        assert!(error.contains("the CA said"), "{error}");
        assert!(
            error.contains("127.0.0.2"),
            "Pebble's detail names where it looked: {error}"
        );
        // Nothing is served for it.
        assert!(tokio::task::block_in_place(|| setup.handshake("shop.aloft.test")).is_err());
    }
}
