//! aloft-acme against a real Pebble (Let's Encrypt's test CA) on loopback: HTTP-01 and
//! TLS-ALPN-01 issuance end to end (the chain verifies against Pebble's root and matches the
//! key), an account found again by its key, a wrong key authorization refused with the CA's
//! problem detail, a failing solver, and `badNonce` retries under Pebble's nonce rejection.
//! Each test starts its own Pebble (`aloft_testkit::Pebble`) with HTTP-01 and TLS-ALPN-01
//! responders answering from a `ChallengeStore`, and kills it (only it) when done, also on
//! panic. Without the `pebble` binary the tests skip, unless `CI` is set.

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use aloft_acme::{
        Account, AcmeClient, AcmeError, Challenge, ChallengeKind, ChallengeSolver, ChallengeStore,
        SolverError,
    };

    use super::responders::Harness;

    async fn account(h: &Harness) -> (AcmeClient, Account, Vec<u8>) {
        let client = AcmeClient::new(h.pebble.directory_url(), Some(h.pebble.api_root_pem().as_bytes()))
            .await
            .unwrap()
            .with_poll_timeout(Duration::from_secs(30));
        let (account, key) = Account::load_or_register(&client, None, &["ops@aloft.test".to_owned()])
            .await
            .unwrap();
        (client, account, key)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http01_issues_a_chain_that_verifies_and_the_account_is_found_again_by_its_key() {
        let Some(h) = Harness::start(0).await else {
            return;
        };
        let (client, account, key) = account(&h).await;
        assert!(
            client.terms_of_service().is_some(),
            "Pebble's directory names its terms"
        );
        let domains = ["app.aloft.test", "WWW.app.aloft.test."];
        let issued = account
            .issue(&domains, ChallengeKind::Http01, &*h.store)
            .await
            .unwrap();

        h.verify(&issued, "app.aloft.test").await.unwrap();
        h.verify(&issued, "www.app.aloft.test").await.unwrap();
        let other = h.verify(&issued, "other.aloft.test").await.unwrap_err();
        assert!(other.to_string().contains("not valid for name"), "{other}");
        assert!(issued.not_after > SystemTime::now() + Duration::from_secs(86_400));
        assert!(issued.chain_pem.matches("-----BEGIN CERTIFICATE-----").count() >= 2);
        assert!(
            !format!("{issued:?}").contains("PRIVATE KEY"),
            "Debug hides the key"
        );

        let (again, key_again) = Account::load_or_register(&client, Some(&key), &[]).await.unwrap();
        assert_eq!(again.url(), account.url());
        assert_eq!(key_again, key);
        let pem = account.key().to_pem();
        let (from_pem, _) = Account::load_or_register(&client, Some(pem.as_bytes()), &[])
            .await
            .unwrap();
        assert_eq!(from_pem.url(), account.url());
        let (fresh, fresh_key) = Account::load_or_register(&client, None, &[]).await.unwrap();
        assert_ne!(fresh.url(), account.url());
        assert_ne!(fresh_key, key);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_alpn01_issues_a_chain_that_verifies() {
        let Some(h) = Harness::start(0).await else {
            return;
        };
        let (_client, account, _) = account(&h).await;
        // On its own task, as the edge's certificate manager runs it (the future is Send).
        let store = h.store.clone();
        let issued = tokio::spawn(async move {
            account
                .issue(&["tls.aloft.test"], ChallengeKind::TlsAlpn01, &*store)
                .await
        })
        .await
        .unwrap()
        .unwrap();
        h.verify(&issued, "tls.aloft.test").await.unwrap();
        assert!(
            h.store.tls_alpn01_certificate("tls.aloft.test").is_none(),
            "the challenge certificate is cleaned up"
        );
    }

    /// Presents every challenge with a key authorization that is not the account's.
    struct WrongKeyAuthorization<'a>(&'a ChallengeStore);

    impl ChallengeSolver for WrongKeyAuthorization<'_> {
        async fn present(&self, challenge: &Challenge) -> Result<(), SolverError> {
            let mut wrong = challenge.clone();
            wrong.key_authorization = format!("{}.not-the-thumbprint", challenge.token);
            self.0.present(&wrong).await
        }

        async fn cleanup(&self, challenge: &Challenge) {
            self.0.cleanup(challenge).await;
        }
    }

    /// Cannot publish anything.
    struct Broken;

    impl ChallengeSolver for Broken {
        async fn present(&self, _: &Challenge) -> Result<(), SolverError> {
            Err("port 80 is not ours".into())
        }

        async fn cleanup(&self, _: &Challenge) {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_key_authorization_fails_with_the_cas_problem_detail() {
        let Some(h) = Harness::start(0).await else {
            return;
        };
        let (_client, account, _) = account(&h).await;
        let err = account
            .issue(
                &["wrong.aloft.test"],
                ChallengeKind::Http01,
                &WrongKeyAuthorization(&h.store),
            )
            .await
            .unwrap_err();
        let AcmeError::Validation {
            domain,
            kind,
            problem,
        } = &err
        else {
            panic!("expected a validation error, got {err:?}");
        };
        assert_eq!((domain.as_str(), kind.as_str()), ("wrong.aloft.test", "http-01"));
        let problem = problem.as_deref().expect("the CA says why");
        assert_eq!(problem.short_kind(), "unauthorized", "{problem:?}");
        assert!(problem.detail.contains("not-the-thumbprint"), "{problem:?}");
        let msg = err.to_string();
        eprintln!("the refusal as users see it: {msg}");
        assert!(msg.contains("the CA said: "), "{msg}");
        assert!(msg.contains(&problem.detail), "{msg}");

        let err = account
            .issue(&["broken.aloft.test"], ChallengeKind::TlsAlpn01, &Broken)
            .await
            .unwrap_err();
        assert!(matches!(err, AcmeError::Solver { .. }), "{err:?}");
        assert!(err.to_string().contains("port 80 is not ours"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_nonces_are_retried_with_the_cas_fresh_nonce() {
        let Some(h) = Harness::start(50).await else {
            return;
        };
        let (client, account, key) = account(&h).await;
        // About 20 signed requests: without retries one would fail with a probability of
        // 1 - 0.5^20; with them, all pass unless one meets 21 rejections in a row.
        let (again, _) = Account::load_or_register(&client, Some(&key), &[]).await.unwrap();
        assert_eq!(again.url(), account.url());
        let domains = ["nonce.aloft.test", "a.nonce.aloft.test", "b.nonce.aloft.test"];
        let issued = account
            .issue(&domains, ChallengeKind::Http01, &*h.store)
            .await
            .unwrap();
        h.verify(&issued, "b.nonce.aloft.test").await.unwrap();
        assert!(
            client.bad_nonce_retries() > 0,
            "Pebble rejects half the nonces: some requests must have been retried"
        );
    }
}

/// The responders Pebble validates against, answering from one `ChallengeStore`.
#[cfg(test)]
mod responders {
    use std::sync::Arc;

    use aloft_acme::{ACME_TLS_ALPN_PROTOCOL, ChallengeStore, Issued};
    use aloft_testkit::{Pebble, PebbleOptions};
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// A running Pebble and the HTTP-01 and TLS-ALPN-01 responders on the ports it validates
    /// against. Dropping it kills Pebble (see `aloft_testkit::Pebble`) and stops the responders.
    pub(crate) struct Harness {
        pub(crate) pebble: Pebble,
        tasks: Vec<JoinHandle<()>>,
        /// Where the responders look up challenges.
        pub(crate) store: Arc<ChallengeStore>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            for task in &self.tasks {
                task.abort();
            }
        }
    }

    impl Harness {
        /// Starts Pebble rejecting `nonce_reject_percent` of valid nonces as `badNonce`. `None`
        /// (the test skips) when Pebble is not installed and `CI` is not set.
        pub(crate) async fn start(nonce_reject_percent: u8) -> Option<Self> {
            let store = Arc::new(ChallengeStore::new());
            let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut options = PebbleOptions::new(
                http.local_addr().unwrap().port(),
                tls.local_addr().unwrap().port(),
            );
            options.nonce_reject_percent = nonce_reject_percent;
            let tasks = vec![
                tokio::spawn(serve_http01(http, store.clone())),
                tokio::spawn(serve_tls_alpn01(tls, store.clone())),
            ];
            let pebble = tokio::task::spawn_blocking(move || Pebble::start(&options))
                .await
                .unwrap()
                .unwrap()?;
            Some(Self { pebble, tasks, store })
        }

        /// Checks `issued` as a TLS client would: its chain verifies for `name` against Pebble's
        /// issuing root, and its key is the leaf's.
        pub(crate) async fn verify(&self, issued: &Issued, name: &str) -> Result<(), rustls::Error> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let roots = tokio::task::block_in_place(|| self.pebble.roots()).unwrap();
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap();
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let (leaf, intermediates) = chain.split_first().unwrap();
            verifier.verify_server_cert(
                leaf,
                intermediates,
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )?;
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            let signer = provider.key_provider.load_private_key(key)?;
            rustls::sign::CertifiedKey::new(chain, signer).keys_match()
        }
    }

    /// HTTP-01: `GET /.well-known/acme-challenge/{token}` answered from the store, 404 otherwise.
    async fn serve_http01(listener: TcpListener, store: Arc<ChallengeStore>) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request);
                let path = request.split(' ').nth(1).unwrap_or_default();
                let response = match store.http01_response(path) {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    }

    /// The resolver a TLS-ALPN-01 responder uses: the challenge certificate for handshakes
    /// offering `acme-tls/1`, nothing (a failed handshake) otherwise.
    #[derive(Debug)]
    struct AlpnResolver(Arc<ChallengeStore>);

    impl rustls::server::ResolvesServerCert for AlpnResolver {
        fn resolve(
            &self,
            client_hello: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.0.resolve_tls_alpn01(&client_hello)
        }
    }

    /// TLS-ALPN-01: a rustls server negotiating `acme-tls/1` with the store's challenge
    /// certificates.
    async fn serve_tls_alpn01(listener: TcpListener, store: Arc<ChallengeStore>) {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(AlpnResolver(store)));
        config.alpn_protocols = vec![ACME_TLS_ALPN_PROTOCOL.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let _ = tls.shutdown().await;
                }
            });
        }
    }
}
