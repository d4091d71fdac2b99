//! App secrets end to end in process: the real router (with a secrets key) over the real agent
//! on `FakeDriver`. Set, list, unset and update with the version counter; names refused; the app
//! delete takes them along; machines boot with them in their environment (over `[env]`), also
//! after a restart-policy restart and a stop/start (the agent's sealed copy) — and the value
//! never shows in an API answer, event, version, log line or database file.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use aloft_agent::ExitInfo;
    use aloft_api::MachineId;
    use axum::body::Body;
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    use crate::common::{self, Harness};

    /// The secret value every test sets; no answer may ever contain it.
    const VALUE: &str = "s3cr3t-Value-7f1e2d";

    /// The shared harness; every answer is checked for the secret's value.
    struct Api {
        h: Harness,
        responses: AtomicUsize,
    }

    impl std::ops::Deref for Api {
        type Target = Harness;

        fn deref(&self) -> &Harness {
            &self.h
        }
    }

    impl Api {
        fn new() -> Self {
            Self {
                h: Harness::new(|c| {
                    c.restart = aloft_agent::RestartBackoff {
                        initial: Duration::from_millis(10),
                        max: Duration::from_millis(50),
                        window: Duration::from_secs(60),
                    };
                }),
                responses: AtomicUsize::new(0),
            }
        }

        /// [`Harness::call`], and the answer must not hold the secret's value.
        async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
            let body = body.map_or_else(Body::empty, |b| Body::from(serde_json::to_vec(&b).unwrap()));
            let (status, bytes) = self.h.request(method, uri, &self.h.token, &[], body).await;
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(VALUE),
                "{method} {uri} answered with the secret value: {text}"
            );
            self.responses.fetch_add(1, Ordering::Relaxed);
            (status, common::json(&bytes))
        }

        async fn ok(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
            let (s, v) = self.call(method, uri, body).await;
            assert!(s.is_success(), "{method} {uri}: {s} {v}");
            v
        }

        async fn wait(&self, app: &str, id: &str, state: &str) {
            self.ok(
                "GET",
                &format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=10"),
                None,
            )
            .await;
        }

        /// The environment the fake driver last booted machine `id` with.
        fn env(&self, id: &str) -> std::collections::BTreeMap<String, String> {
            let id: MachineId = id.parse().unwrap();
            self.fake.world().specs[&id].run_config.env.clone()
        }

        /// No file under the test's directory (databases, WAL, logs, key files) holds the value,
        /// nor its SHA-256 (the digest the API shows: next to the ciphertext it would let the
        /// database alone check guesses).
        fn assert_no_plaintext_on_disk(&self) {
            fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
                for e in std::fs::read_dir(dir).unwrap().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, out);
                    } else {
                        out.push(p);
                    }
                }
            }
            let mut files = Vec::new();
            walk(self.dir.path(), &mut files);
            assert!(files.len() > 3, "{files:?}");
            let digest = aloft_secretbox::digest(VALUE.as_bytes());
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                assert!(
                    !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                    "{} holds the secret in plaintext",
                    f.display()
                );
                assert!(
                    !bytes.windows(digest.len()).any(|w| w == digest.as_bytes()),
                    "{} holds the secret's digest",
                    f.display()
                );
            }
        }
    }

    fn names(v: &Value) -> Vec<String> {
        v["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn set_list_unset_with_versions() {
        let api = Api::new();
        api.ok("POST", "/v1/apps", Some(json!({"name": "web"}))).await;

        let (s, created) = api
            .call(
                "POST",
                "/v1/apps/web/secrets/DB_PASSWORD",
                Some(json!({"value": VALUE})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{created}");
        assert_eq!(created["name"], "DB_PASSWORD");
        assert_eq!(created["version"], 1);
        assert_eq!(created["Version"], 1);
        assert_eq!(created["digest"], aloft_secretbox::digest(VALUE.as_bytes()));
        assert!(created.get("value").is_none());

        let updated = api
            .ok(
                "POST",
                "/v1/apps/web/secrets",
                Some(json!({"values": {"API_KEY": "k-123", "OTHER": "x"}})),
            )
            .await;
        assert_eq!(updated["version"], 2);
        assert_eq!(names(&updated), ["API_KEY", "DB_PASSWORD", "OTHER"]);

        // Set and unset in one change.
        let updated = api
            .ok(
                "POST",
                "/v1/apps/web/secrets",
                Some(json!({"values": {"OTHER": null, "API_KEY": "k-456"}})),
            )
            .await;
        assert_eq!(updated["version"], 3);
        assert_eq!(names(&updated), ["API_KEY", "DB_PASSWORD"]);

        let list = api.ok("GET", "/v1/apps/web/secrets", None).await;
        assert_eq!(names(&list), ["API_KEY", "DB_PASSWORD"]);
        for s in list["secrets"].as_array().unwrap() {
            assert!(s.get("value").is_none(), "{s}");
            assert_eq!(s["digest"].as_str().unwrap().len(), 64);
        }
        let one = api.ok("GET", "/v1/apps/web/secrets/DB_PASSWORD", None).await;
        assert_eq!(one["digest"], created["digest"]);
        assert_eq!(one["created_at"], created["created_at"]);

        // min_version: answered once reached, 422 before.
        api.ok("GET", "/v1/apps/web/secrets?min_version=3", None).await;
        let (s, _) = api.call("GET", "/v1/apps/web/secrets?min_version=4", None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        let (s, e) = api
            .call("GET", "/v1/apps/web/secrets?show_secrets=true", None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(e["error"].as_str().unwrap().contains("never returns"), "{e}");

        let deleted = api.ok("DELETE", "/v1/apps/web/secrets/API_KEY", None).await;
        assert_eq!(deleted["version"], 4);
        let (s, _) = api.call("DELETE", "/v1/apps/web/secrets/API_KEY", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = api.call("GET", "/v1/apps/web/secrets/API_KEY", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Bad names and values: 400 naming what is wrong, nothing changes.
        for (body, needle) in [
            (json!({"values": {"FLY_REGION": "x"}}), "reserved"),
            (json!({"values": {"1ABC": "x"}}), "environment variable name"),
            (json!({"values": {"A-B": "x"}}), "environment variable name"),
            (json!({"values": {}}), "values is empty"),
            (json!({"values": {"BIG": "x".repeat(64 * 1024 + 1)}}), "64 KiB"),
        ] {
            let (s, e) = api.call("POST", "/v1/apps/web/secrets", Some(body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
            assert!(e["error"].as_str().unwrap().contains(needle), "{e}");
        }
        let (s, _) = api
            .call("POST", "/v1/apps/web/secrets/FLY_X", Some(json!({"value": "v"})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let list = api.ok("GET", "/v1/apps/web/secrets", None).await;
        assert_eq!(names(&list), ["DB_PASSWORD"]);
        let (s, _) = api.call("GET", "/v1/apps/nope/secrets", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // The app delete takes its secrets along: a new app of the same name starts empty.
        let (s, _) = api.call("DELETE", "/v1/apps/web", None).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        api.ok("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        let list = api.ok("GET", "/v1/apps/web/secrets", None).await;
        assert!(names(&list).is_empty(), "{list}");
        let v = api
            .ok(
                "POST",
                "/v1/apps/web/secrets",
                Some(json!({"values": {"A": "1"}})),
            )
            .await;
        assert_eq!(v["version"], 1);
        assert!(api.responses.load(Ordering::Relaxed) > 20);
        api.assert_no_plaintext_on_disk();
    }

    /// The `key_id` stored in app `app`'s secret `name`.
    fn stored_key_id(api: &Api, app: &str, name: &str) -> Option<String> {
        api.control.secrets(app).unwrap().secrets[name].key_id.clone()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn secrets_survive_a_key_rotation_and_are_resealed_with_the_new_key() {
        use std::sync::Arc;

        use aloft_secretbox::{Key, Keyring};

        let mut api = Api::new();
        let dir = api.dir.path().to_owned();
        let (a, b) = (dir.join("secrets.key"), dir.join("b.key"));
        let a_id = Key::load(&a).unwrap().id().to_string();
        let b_id = Key::load_or_create(&b).unwrap().id().to_string();
        let hint = "give aloftd the key file with that id with --secrets-key-previous FILE";
        api.ok("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        api.ok(
            "POST",
            "/v1/apps/web/secrets",
            Some(json!({"values": {"MY_SECRET": VALUE, "OTHER": "o"}})),
        )
        .await;
        assert_eq!(
            stored_key_id(&api, "web", "MY_SECRET").as_deref(),
            Some(a_id.as_str())
        );
        // A record from before key ids: sealed with A, no `key_id`.
        let base = api.control.secrets("web").unwrap();
        let mut old = base.secrets["OTHER"].clone();
        old.key_id = None;
        assert!(api.control.reseal_secrets("web", &base, vec![old]).unwrap());
        let version = api.control.secrets("web").unwrap().version;

        // Rotated: B current, A previous. Machines still get the values, and the sweep seals
        // both with B without changing the secrets version.
        let rotated = Arc::new(
            Keyring::new(Key::load(&b).unwrap())
                .with_previous(Key::load(&a).unwrap())
                .with_hint(hint),
        );
        api.h.use_secrets_keys(Arc::clone(&rotated));
        let config = json!({
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
        });
        let m = api
            .ok("POST", "/v1/apps/web/machines", Some(json!({"config": config})))
            .await;
        let id = m["id"].as_str().unwrap().to_owned();
        api.wait("web", &id, "started").await;
        assert_eq!(api.env(&id)["MY_SECRET"], VALUE);
        assert_eq!(api.env(&id)["OTHER"], "o");
        let report = aloft_control::reseal_secrets(&api.control, &rotated).unwrap();
        assert_eq!(report.resealed, 2, "{report:?}");
        assert_eq!(report.apps, 1);
        assert!(
            report.unreadable.is_empty() && report.busy.is_empty(),
            "{report:?}"
        );
        assert!(!format!("{report:?}").contains(VALUE));
        for name in ["MY_SECRET", "OTHER"] {
            assert_eq!(stored_key_id(&api, "web", name).as_deref(), Some(b_id.as_str()));
        }
        assert_eq!(api.control.secrets("web").unwrap().version, version);
        // A second run finds nothing to do.
        assert_eq!(
            aloft_control::reseal_secrets(&api.control, &rotated).unwrap(),
            aloft_control::ResealReport::default()
        );

        // A record as stored before digests left the store: the sweep rewrites it without its
        // digest, and the API still shows the value's.
        let store = api.control.store().clone();
        let kv = store
            .range("/secrets/web/MY_SECRET", &aloft_store::RangeOptions::default())
            .unwrap()
            .kvs
            .remove(0);
        let mut record: Value = serde_json::from_slice(&kv.value).unwrap();
        let digest = aloft_secretbox::digest(VALUE.as_bytes());
        record["digest"] = json!(digest);
        store.put(&kv.key, serde_json::to_vec(&record).unwrap()).unwrap();
        let report = aloft_control::reseal_secrets(&api.control, &rotated).unwrap();
        assert_eq!(report.resealed, 1, "{report:?}");
        let kv = store
            .range("/secrets/web/MY_SECRET", &aloft_store::RangeOptions::default())
            .unwrap()
            .kvs
            .remove(0);
        assert!(!String::from_utf8_lossy(&kv.value).contains(&digest));
        let shown = api.ok("GET", "/v1/apps/web/secrets/MY_SECRET", None).await;
        assert_eq!(shown["digest"], digest.as_str());

        // A dropped: B alone opens everything.
        api.h
            .use_secrets_keys(Arc::new(Keyring::new(Key::load(&b).unwrap()).with_hint(hint)));
        let m = api
            .ok("POST", "/v1/apps/web/machines", Some(json!({"config": config})))
            .await;
        let id = m["id"].as_str().unwrap().to_owned();
        api.wait("web", &id, "started").await;
        assert_eq!(api.env(&id)["MY_SECRET"], VALUE);

        // A secret still sealed with a key the server does not have: machines are refused, and
        // the sweep names the key id it needs and the flag, never the value.
        let c = dir.join("c.key");
        let c_keys = Keyring::new(Key::load_or_create(&c).unwrap());
        let base = api.control.secrets("web").unwrap();
        let ad = b"aloft-app-secret\0web\0MY_SECRET";
        let sealed = c_keys.seal(VALUE.as_bytes(), ad).unwrap();
        let mut lost = base.secrets["MY_SECRET"].clone();
        lost.nonce = sealed.nonce;
        lost.ciphertext = sealed.ciphertext;
        lost.key_id = sealed.key_id;
        assert!(api.control.reseal_secrets("web", &base, vec![lost]).unwrap());
        let (s, _) = api
            .call("POST", "/v1/apps/web/machines", Some(json!({"config": config})))
            .await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        let b_only = Keyring::new(Key::load(&b).unwrap()).with_hint(hint);
        let report = aloft_control::reseal_secrets(&api.control, &b_only).unwrap();
        assert_eq!(report.resealed, 0);
        assert_eq!(report.unreadable.len(), 1, "{report:?}");
        let problem = &report.unreadable[0];
        let c_id = c_keys.current().id().to_string();
        for part in [
            "web/MY_SECRET",
            c_id.as_str(),
            b_id.as_str(),
            "--secrets-key-previous",
        ] {
            assert!(problem.contains(part), "{part:?} missing from {problem}");
        }
        assert!(!problem.contains(VALUE));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn machines_boot_with_secrets_that_never_leak() {
        let api = Api::new();
        api.ok("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        api.ok(
            "POST",
            "/v1/apps/web/secrets",
            Some(json!({"values": {"MY_SECRET": VALUE, "SHARED": "from-secret"}})),
        )
        .await;

        let config = json!({
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
            "env": {"SHARED": "from-env", "PLAIN": "p"},
            "restart": {"policy": "always"},
        });
        // min_secrets_version newer than the app's: refused before anything is made.
        let (s, e) = api
            .call(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": config, "min_secrets_version": 2})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(
            e["error"].as_str().unwrap().contains("min_secrets_version"),
            "{e}"
        );

        let m = api
            .ok(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": config, "min_secrets_version": 1})),
            )
            .await;
        let id = m["id"].as_str().unwrap().to_owned();
        api.wait("web", &id, "started").await;
        let env = api.env(&id);
        assert_eq!(env["MY_SECRET"], VALUE);
        assert_eq!(env["SHARED"], "from-secret", "secrets override [env]");
        assert_eq!(env["PLAIN"], "p");

        // The API's view: config without secrets, events and versions without values (checked
        // by `call` on every answer).
        let shown = api.ok("GET", &format!("/v1/apps/web/machines/{id}"), None).await;
        assert!(shown["config"]["env"].get("MY_SECRET").is_none(), "{shown}");
        api.ok("GET", &format!("/v1/apps/web/machines/{id}/events"), None)
            .await;
        api.ok("GET", &format!("/v1/apps/web/machines/{id}/versions"), None)
            .await;
        api.ok("GET", "/v1/apps/web/machines", None).await;

        // A restart by the restart policy boots with the agent's sealed copy.
        let mid: MachineId = id.parse().unwrap();
        let booted = api.fake.world().specs.len();
        api.fake.exit_workload(
            &mid,
            ExitInfo {
                exit_code: Some(1),
                ..ExitInfo::default()
            },
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = api
                .ok("GET", &format!("/v1/apps/web/machines/{id}/events"), None)
                .await;
            let restarted = events
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["status"] == "started")
                .count()
                >= 2;
            if restarted {
                break;
            }
            assert!(Instant::now() < deadline, "no restart: {events}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        api.wait("web", &id, "started").await;
        assert_eq!(api.fake.world().specs.len(), booted);
        assert_eq!(api.env(&id)["MY_SECRET"], VALUE);

        // Stop and start: the spec is written again from the sealed copy.
        api.ok("POST", &format!("/v1/apps/web/machines/{id}/stop"), None)
            .await;
        api.wait("web", &id, "stopped").await;
        api.ok("POST", &format!("/v1/apps/web/machines/{id}/start"), None)
            .await;
        api.wait("web", &id, "started").await;
        assert_eq!(api.env(&id)["MY_SECRET"], VALUE);

        // A change reaches the machine with its next update (same config, new version); an
        // unset secret is gone from it.
        api.ok(
            "POST",
            "/v1/apps/web/secrets",
            Some(json!({"values": {"MY_SECRET": "rotated-value", "SHARED": null}})),
        )
        .await;
        assert_eq!(api.env(&id)["MY_SECRET"], VALUE, "not before the update");
        let updated = api
            .ok(
                "POST",
                &format!("/v1/apps/web/machines/{id}"),
                Some(json!({"config": config})),
            )
            .await;
        assert!(updated["config"]["env"].get("MY_SECRET").is_none());
        api.wait("web", &id, "started").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.env(&id)["MY_SECRET"] != "rotated-value" {
            assert!(
                Instant::now() < deadline,
                "the update did not bring the new value"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(api.env(&id)["SHARED"], "from-env");

        // skip_secrets: none injected.
        let bare = api
            .ok(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": config, "skip_secrets": true})),
            )
            .await;
        let bare_id = bare["id"].as_str().unwrap().to_owned();
        api.wait("web", &bare_id, "started").await;
        assert!(!api.env(&bare_id).contains_key("MY_SECRET"));

        // processes[0].secrets maps a secret to another variable; ignore_app_secrets drops the
        // rest; files[].secret_name writes a (base64) secret into a file.
        api.ok(
            "POST",
            "/v1/apps/web/secrets/TLS_KEY",
            Some(json!({"value": "aGVsbG8="})),
        )
        .await;
        let picky = json!({
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
            "processes": [{"ignore_app_secrets": true, "secrets": [{"env_var": "TOKEN", "name": "MY_SECRET"}]}],
            "files": [{"guest_path": "/etc/key.pem", "secret_name": "TLS_KEY"}],
        });
        let p = api
            .ok("POST", "/v1/apps/web/machines", Some(json!({"config": picky})))
            .await;
        let pid = p["id"].as_str().unwrap().to_owned();
        api.wait("web", &pid, "started").await;
        let env = api.env(&pid);
        assert_eq!(env["TOKEN"], "rotated-value");
        assert!(!env.contains_key("MY_SECRET") && !env.contains_key("TLS_KEY"));
        let spec = api.fake.world().specs[&pid.parse::<MachineId>().unwrap()].clone();
        assert_eq!(spec.run_config.files[0].contents, b"hello");
        // A secret the config names but the app lacks: refused, naming it.
        let (s, e) = api
            .call(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": {
                    "image": "busybox:latest",
                    "files": [{"guest_path": "/x", "secret_name": "MISSING"}],
                }})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"].as_str().unwrap().contains("MISSING"), "{e}");

        // Logs (platform lines) carry no value either.
        let (s, logs) = api.call("GET", "/v1/apps/web/logs?no_tail=true", None).await;
        assert!(s.is_success(), "{logs}");
        api.assert_no_plaintext_on_disk();
    }
}
