//! aloft-acme against a real Pebble (Let's Encrypt's test CA) on loopback: HTTP-01 and
//! TLS-ALPN-01 issuance end to end (the chain verifies against Pebble's root and matches the
//! key), an account found again by its key, a wrong key authorization refused with the CA's
//! problem detail, a failing solver, and `badNonce` retries under Pebble's nonce rejection.
//! Each test starts its own Pebble and kills it (only it) when done, also on panic. Without the
//! `pebble` binary the tests skip, unless `CI` is set.

#[cfg(test)]
mod support;

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use aloft_acme::{
        Account, AcmeClient, AcmeError, Challenge, ChallengeKind, ChallengeSolver, ChallengeStore,
        SolverError,
    };

    use crate::support::Harness;

    async fn account(h: &Harness) -> (AcmeClient, Account, Vec<u8>) {
        let client = AcmeClient::new(&h.directory_url, Some(&h.api_root_pem))
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
