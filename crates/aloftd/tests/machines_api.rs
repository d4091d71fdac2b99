//! The machine endpoints end to end in process: the real router (`aloft-control`) over the real
//! agent (`aloft-agent`) on its in-memory `FakeDriver`, called as a tower service — every layer
//! but the socket and the VMs. Fast; the VM-backed path is in `tests/daemon_vm.rs`.

mod common;

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]
    #![allow(
        clippy::needless_pass_by_value,
        reason = "assertions take what the calls return"
    )]

    use std::time::Duration;

    use aloft_agent::ExitInfo;
    use aloft_api::MachineId;
    use aloft_control::create_token;
    use axum::body::Body;
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    use crate::common::{self, Harness};

    /// The shared harness with this file's helpers.
    pub(crate) struct Api(Harness);

    impl std::ops::Deref for Api {
        type Target = Harness;

        fn deref(&self) -> &Harness {
            &self.0
        }
    }

    impl Api {
        pub(crate) fn new() -> Self {
            Self(Harness::new(|_| {}))
        }

        async fn send(
            &self,
            method: &str,
            uri: &str,
            token: &str,
            headers: &[(&str, &str)],
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let body = body.map_or_else(Body::empty, |b| Body::from(serde_json::to_vec(&b).unwrap()));
            let (status, bytes) = self.request(method, uri, token, headers, body).await;
            (status, common::json(&bytes))
        }

        async fn raw(&self, method: &str, uri: &str, body: &'static str) -> (StatusCode, Value) {
            let (status, bytes) = self
                .request(method, uri, &self.token, &[], Body::from(body))
                .await;
            (status, common::json(&bytes))
        }

        /// `GET` with the token; the raw body.
        pub(crate) async fn raw_get(&self, uri: &str) -> (StatusCode, Vec<u8>) {
            let (status, bytes) = self.request("GET", uri, &self.token, &[], Body::empty()).await;
            (status, bytes.to_vec())
        }

        pub(crate) async fn app(&self, name: &str) {
            let (s, _) = self.call("POST", "/v1/apps", Some(json!({"name": name}))).await;
            assert_eq!(s, StatusCode::CREATED);
        }

        /// Creates a machine and waits until it is started.
        pub(crate) async fn started(&self, app: &str, config: Value) -> String {
            let (s, m) = self
                .call(
                    "POST",
                    &format!("/v1/apps/{app}/machines"),
                    Some(json!({"config": config})),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{m}");
            let id = m["id"].as_str().unwrap().to_owned();
            self.wait(app, &id, "started").await;
            id
        }
    }

    pub(crate) fn busybox() -> Value {
        json!({"image": "busybox:latest", "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"}})
    }

    fn assert_err(got: (StatusCode, Value), status: u16, needle: &str) {
        assert_eq!(got.0.as_u16(), status, "{}", got.1);
        let msg = got.1["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {}", got.1));
        assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn lifecycle_through_the_api() {
        let api = Api::new();
        api.app("web").await;
        let id = api.started("web", busybox()).await;
        let m = format!("/v1/apps/web/machines/{id}");

        let (s, got) = api.call("GET", &m, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got["state"], "started");
        assert_eq!(got["region"], "local");
        assert_eq!(got["config"]["image"], "busybox:latest");
        assert_eq!(got["cordoned"], false);
        assert!(
            got["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "launch"),
            "{got}"
        );

        let (_, list) = api.call("GET", "/v1/apps/web/machines", None).await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        let (_, list) = api.call("GET", "/v1/apps/web/machines?state=stopped", None).await;
        assert!(list.as_array().unwrap().is_empty());
        let (_, list) = api.call("GET", "/v1/apps/web/machines?summary=true", None).await;
        assert!(list[0].get("config").is_none(), "{list}");
        let (_, app) = api.call("GET", "/v1/apps/web", None).await;
        assert_eq!(app["machine_count"], 1);
        assert_eq!(app["status"], "deployed", "{app}");

        // Stop (no body, as curl sends it), then start again.
        let (s, ok) = api.call("POST", &format!("{m}/stop"), None).await;
        assert_eq!((s, ok), (StatusCode::OK, json!({"ok": true})));
        api.wait("web", &id, "stopped").await;
        let (s, started) = api.call("POST", &format!("{m}/start"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(started["previous_state"], "stopped");
        api.wait("web", &id, "started").await;

        // Suspend and resume.
        assert_eq!(
            api.call("POST", &format!("{m}/suspend"), None).await.0,
            StatusCode::OK
        );
        api.wait("web", &id, "suspended").await;
        assert_eq!(
            api.call("POST", &format!("{m}/start"), None).await.1["previous_state"],
            "suspended"
        );
        api.wait("web", &id, "started").await;

        // Restart with fly-go's query.
        let (s, _) = api
            .call(
                "POST",
                &format!("{m}/restart?signal=SIGTERM&timeout=1s&force_stop=false"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        api.wait("web", &id, "started").await;

        // Stop with a body.
        let (s, _) = api
            .call(
                "POST",
                &format!("{m}/stop"),
                Some(json!({"signal": "SIGTERM", "timeout": "2s"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        api.wait("web", &id, "stopped").await;

        // A verb the state does not allow is 412 naming the state.
        assert_err(
            api.call("POST", &format!("{m}/suspend"), None).await,
            412,
            "stopped",
        );
        assert_err(
            api.call("POST", &format!("{m}/signal"), Some(json!({"signal": 9})))
                .await,
            412,
            "stopped",
        );

        let (s, events) = api.call("GET", &format!("{m}/events?limit=3"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(events.as_array().unwrap().len(), 3);

        // Destroy; the destroyed machine is listed only with include_deleted.
        let (s, ok) = api.call("DELETE", &m, None).await;
        assert_eq!((s, ok), (StatusCode::OK, json!({"ok": true})));
        api.wait("web", &id, "destroyed").await;
        let (_, list) = api.call("GET", "/v1/apps/web/machines", None).await;
        assert!(list.as_array().unwrap().is_empty(), "{list}");
        let (_, list) = api
            .call("GET", "/v1/apps/web/machines?include_deleted=true", None)
            .await;
        assert_eq!(list[0]["state"], "destroyed");
        let (_, app) = api.call("GET", "/v1/apps/web", None).await;
        assert_eq!(app["machine_count"], 0);
        assert_eq!(app["status"], "pending", "no machines left: {app}");
        assert!(api.fake.world().residue().is_empty(), "nothing left on the host");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn update_makes_a_new_version_and_replaces_the_old() {
        let api = Api::new();
        api.app("web").await;
        let id = api.started("web", busybox()).await;
        let m = format!("/v1/apps/web/machines/{id}");
        let (_, before) = api.call("GET", &m, None).await;
        let old = before["instance_id"].as_str().unwrap().to_owned();

        let mut config = busybox();
        config["env"] = json!({"GREETING": "hi"});
        // A stale current_version is 412.
        assert_err(
            api.call(
                "POST",
                &m,
                Some(json!({"config": config, "current_version": "01HBZ8QEXHS0YR4R1N6S1XGEE2"})),
            )
            .await,
            412,
            "fetch the machine again",
        );
        // Name and region cannot change.
        assert_err(
            api.call("POST", &m, Some(json!({"config": config, "region": "ams"})))
                .await,
            400,
            "region",
        );
        // Hold the update in the middle (its stop) to see the new version before it is installed.
        api.fake.block(aloft_agent::DriverOp::StopVm);
        let (s, updated) = api
            .call(
                "POST",
                &m,
                Some(json!({"config": config, "current_version": old})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{updated}");
        let new = updated["instance_id"].as_str().unwrap().to_owned();
        // Waiting for the version the update answered with is "not yet" (408), never "no such
        // version" (404), while the update runs.
        assert_err(
            api.call(
                "GET",
                &format!("{m}/wait?state=started&version={new}&timeout=1"),
                None,
            )
            .await,
            408,
            "did not reach",
        );
        api.fake.unblock(aloft_agent::DriverOp::StopVm);
        let (s, w) = api
            .call(
                "GET",
                &format!("{m}/wait?state=started&version={new}&timeout=10"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{w}");
        assert_ne!(new, old);
        // The old version is replaced: a wait scoped to it for `stopped` is satisfied.
        let (s, w) = api
            .call(
                "GET",
                &format!("{m}/wait?state=stopped&version={old}&timeout=5"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{w}");
        api.wait("web", &id, "started").await;
        let (_, got) = api.call("GET", &m, None).await;
        assert_eq!(got["config"]["env"]["GREETING"], "hi");
        let (_, versions) = api.call("GET", &format!("{m}/versions"), None).await;
        let versions = versions.as_array().unwrap();
        assert_eq!(versions.len(), 2);
        assert_eq!(versions[0]["version"], new.as_str());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn leases_guard_mutations() {
        let api = Api::new();
        api.app("web").await;
        let id = api.started("web", busybox()).await;
        let m = format!("/v1/apps/web/machines/{id}");
        assert_err(api.call("GET", &format!("{m}/lease"), None).await, 404, "lease");

        let (s, lease) = api
            .call(
                "POST",
                &format!("{m}/lease?ttl=30"),
                Some(json!({"description": "deploy"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{lease}");
        assert_eq!(lease["status"], "success");
        let nonce = lease["data"]["nonce"].as_str().unwrap().to_owned();
        assert_eq!(lease["data"]["description"], "deploy");

        // Someone else: 409 naming the holder.
        assert_err(
            api.call("POST", &format!("{m}/stop"), None).await,
            409,
            "lease currently held by",
        );
        assert_err(
            api.call("POST", &format!("{m}/lease"), None).await,
            409,
            "lease currently held by",
        );
        assert_err(api.call("DELETE", &m, None).await, 409, "lease currently held by");
        // The holder: fine, and the nonce refreshes.
        let with = [("fly-machine-lease-nonce", nonce.as_str())];
        let (s, refreshed) = api
            .send(
                "POST",
                &format!("{m}/lease"),
                &api.token,
                &with,
                Some(json!({"ttl": 60})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{refreshed}");
        assert_eq!(refreshed["data"]["nonce"], nonce.as_str());
        let (s, _) = api
            .send("POST", &format!("{m}/cordon"), &api.token, &with, None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(api.call("GET", &m, None).await.1["cordoned"], true);
        let (s, _) = api
            .send("POST", &format!("{m}/uncordon"), &api.token, &with, None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(api.call("GET", &m, None).await.1["cordoned"], false);

        // Releasing needs the nonce.
        assert_err(
            api.call("DELETE", &format!("{m}/lease"), None).await,
            400,
            "fly-machine-lease-nonce",
        );
        let wrong = [("fly-machine-lease-nonce", "not-it")];
        assert_err(
            api.send("DELETE", &format!("{m}/lease"), &api.token, &wrong, None)
                .await,
            409,
            "held by",
        );
        let (s, _) = api
            .send("DELETE", &format!("{m}/lease"), &api.token, &with, None)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            api.call("POST", &format!("{m}/stop"), None).await.0,
            StatusCode::OK
        );

        // A create with lease_ttl comes back holding the lease.
        let (s, created) = api
            .call(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": busybox(), "lease_ttl": 30})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        let nonce = created["nonce"].as_str().unwrap();
        let (_, held) = api
            .call(
                "GET",
                &format!("/v1/apps/web/machines/{}/lease", created["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(held["data"]["nonce"], nonce);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn metadata_round_trips_with_a_version_precondition() {
        let api = Api::new();
        api.app("web").await;
        let mut config = busybox();
        config["metadata"] = json!({"fly_platform_version": "v2", "fly_process_group": "app"});
        let id = api.started("web", config).await;
        let m = format!("/v1/apps/web/machines/{id}");
        let (_, md) = api.call("GET", &format!("{m}/metadata"), None).await;
        assert_eq!(
            md,
            json!({"fly_platform_version": "v2", "fly_process_group": "app"})
        );

        assert_err(
            api.call(
                "PUT",
                &format!("{m}/metadata"),
                Some(json!({"metadata": {"a": "1"}, "machine_version": "stale"})),
            )
            .await,
            412,
            "stale",
        );
        let version = api.call("GET", &m, None).await.1["instance_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (s, _) = api
            .call(
                "PATCH",
                &format!("{m}/metadata"),
                Some(json!({"metadata": {"a": "1", "fly_process_group": null}, "machine_version": version})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_eq!(
            api.call("GET", &format!("{m}/metadata/a"), None).await.1,
            json!({"value": "1"})
        );
        assert_err(
            api.call("GET", &format!("{m}/metadata/fly_process_group"), None)
                .await,
            404,
            "metadata key",
        );
        let (s, _) = api
            .call("POST", &format!("{m}/metadata/b"), Some(json!({"value": "2"})))
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (_, list) = api.call("GET", "/v1/apps/web/machines?metadata.b=2", None).await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        let (_, list) = api.call("GET", "/v1/apps/web/machines?metadata.b=3", None).await;
        assert!(list.as_array().unwrap().is_empty());
        assert_eq!(
            api.call("DELETE", &format!("{m}/metadata/b"), None).await.0,
            StatusCode::NO_CONTENT
        );
        assert_err(
            api.call("GET", &format!("{m}/metadata/b"), None).await,
            404,
            "metadata key",
        );
        assert_err(
            api.call("GET", &format!("{m}/metadata/bad%20key"), None).await,
            400,
            "invalid metadata key",
        );
        // Metadata is no new version.
        assert_eq!(api.call("GET", &m, None).await.1["instance_id"], version.as_str());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn signals_exec_ps_and_kill() {
        let api = Api::new();
        api.app("web").await;
        let mut config = busybox();
        config["restart"] = json!({"policy": "no"});
        let id = api.started("web", config).await;
        let m = format!("/v1/apps/web/machines/{id}");
        let (s, r) = api
            .call(
                "POST",
                &format!("{m}/exec"),
                Some(json!({"command": ["echo", "hi"]})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["stdout"], "echo hi\n");
        let (_, r) = api
            .call("POST", &format!("{m}/exec"), Some(json!({"cmd": "uname -a"})))
            .await;
        assert_eq!(r["stdout"], "uname -a\n");
        assert_err(
            api.call("POST", &format!("{m}/exec"), Some(json!({"command": []})))
                .await,
            400,
            "exec needs a command",
        );
        assert_err(
            api.call(
                "POST",
                &format!("{m}/exec"),
                Some(json!({"command": ["cat"], "stdin": "x"})),
            )
            .await,
            422,
            "stdin",
        );
        let (s, ps) = api.call("GET", &format!("{m}/ps"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(ps[0]["pid"], 1);
        assert_err(
            api.call("POST", &format!("{m}/signal"), Some(json!({"signal": "SIGWHAT"})))
                .await,
            400,
            "signal",
        );
        // fly-go's kill: the number 9. With restart policy "no" the machine ends up stopped.
        assert_eq!(
            api.call("POST", &format!("{m}/signal"), Some(json!({"signal": 9})))
                .await
                .0,
            StatusCode::OK
        );
        api.wait("web", &id, "stopped").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn destroy_needs_force_for_a_started_machine_and_app_delete_takes_all() {
        let api = Api::new();
        api.app("web").await;
        let a = api.started("web", busybox()).await;
        let b = api.started("web", busybox()).await;
        let (s, m) = api
            .call(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": busybox(), "skip_launch": true})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(m["state"], "created");
        assert_err(
            api.call("DELETE", &format!("/v1/apps/web/machines/{a}"), None)
                .await,
            412,
            "started",
        );
        assert_eq!(
            api.call("DELETE", &format!("/v1/apps/web/machines/{a}?kill=true"), None)
                .await
                .0,
            StatusCode::OK
        );
        api.wait("web", &a, "destroyed").await;
        assert_eq!(api.call("GET", "/v1/apps/web", None).await.1["machine_count"], 2);
        // Deleting the app destroys what is left (b started, the created one).
        assert_eq!(
            api.call("DELETE", "/v1/apps/web", None).await.0,
            StatusCode::ACCEPTED
        );
        assert_err(api.call("GET", "/v1/apps/web", None).await, 404, "app not found");
        let id: MachineId = b.parse().unwrap();
        let gone = api
            .agent
            .wait_until(&id, Duration::from_secs(10), |r| {
                r.state == aloft_api::MachineState::Destroyed
            })
            .unwrap();
        assert_eq!(gone.state, aloft_api::MachineState::Destroyed);
        assert!(api.control.list_machines("web").unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_input_gets_fly_errors_never_a_500() {
        let api = Api::new();
        api.app("web").await;
        let base = "/v1/apps/web/machines";
        assert_err(
            api.raw("POST", base, r#"{"config": {"image": 5}}"#).await,
            400,
            "config.image",
        );
        assert_err(api.raw("POST", base, "{").await, 400, "invalid request body");
        assert_err(
            api.call("POST", base, Some(json!({"config": {}}))).await,
            400,
            "image",
        );
        assert_err(
            api.call("POST", base, Some(json!({"config": {"image": "busybox", "guest": {"cpus": 8, "memory_mb": 16384, "cpu_kind": "performance"}}})))
                .await,
            422,
            "more than this host has",
        );
        let (s, body) = api
            .call("POST", base, Some(json!({"config": {"image": "busybox", "guest": {"cpus": 8, "memory_mb": 16384, "cpu_kind": "performance"}}})))
            .await;
        assert_eq!(
            (s.as_u16(), body["status"].as_str()),
            (422, Some("insufficient_capacity"))
        );
        assert_err(
            api.call("POST", base, Some(json!({"config": busybox(), "region": "ams"})))
                .await,
            422,
            "no host in region \"ams\"",
        );
        assert_err(
            api.call(
                "POST",
                base,
                Some(
                    json!({"config": {"image": "busybox", "mounts": [{"volume": "vol_1", "path": "/data"}]}}),
                ),
            )
            .await,
            422,
            "volumes",
        );
        api.fake.missing_image("nope:latest");
        assert_err(
            api.call("POST", base, Some(json!({"config": {"image": "nope:latest"}})))
                .await,
            422,
            "nope",
        );
        assert_err(
            api.call("GET", "/v1/apps/nope/machines", None).await,
            404,
            "app not found",
        );
        assert_err(
            api.call("GET", &format!("{base}/3d8d413b29d089"), None).await,
            404,
            "machine 3d8d413b29d089",
        );
        assert_err(
            api.call("GET", &format!("{base}/not-an-id"), None).await,
            404,
            "not-an-id",
        );
        assert_err(
            api.call("GET", &format!("{base}?state=bogus"), None).await,
            400,
            "bogus",
        );
        let id = api.started("web", busybox()).await;
        let m = format!("{base}/{id}");
        assert_err(
            api.call("GET", &format!("{m}/wait?timeout=0"), None).await,
            400,
            "timeout",
        );
        assert_err(
            api.call("GET", &format!("{m}/wait?state=nap"), None).await,
            400,
            "nap",
        );
        assert_err(
            api.call("GET", &format!("{m}/wait?state=stopped&timeout=1"), None)
                .await,
            408,
            "did not reach",
        );
        assert_err(
            api.call(
                "GET",
                &format!("{m}/wait?from_event_id=01HBZ8QEXHS0YR4R1N6S1XGEE2"),
                None,
            )
            .await,
            400,
            "no event",
        );
        assert_err(
            api.call("POST", &format!("{m}/lease?ttl=0"), None).await,
            400,
            "ttl",
        );
        assert_err(
            api.call("GET", &format!("{m}/events?limit=x"), None).await,
            400,
            "limit",
        );
        assert_err(
            api.call("DELETE", &format!("{m}?force=maybe"), None).await,
            400,
            "force",
        );
        assert_err(
            api.call("POST", &format!("{m}/restart?timeout=soon"), None).await,
            400,
            "timeout",
        );

        // Another organization sees 403 for the app, not its machines.
        let other = create_token(&api.control, "acme", "x").unwrap().token;
        assert_err(api.send("GET", &m, &other, &[], None).await, 403, "unauthorized");
        assert_err(
            api.send("GET", base, &other, &[], None).await,
            403,
            "unauthorized",
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn restart_policy_acts_on_exits_reported_by_the_workload() {
        let api = Api::new();
        api.app("web").await;
        let mut config = busybox();
        config["restart"] = json!({"policy": "on-failure", "max_retries": 1});
        let id = api.started("web", config).await;
        let mid: MachineId = id.parse().unwrap();
        let crash = ExitInfo {
            exit_code: Some(3),
            ..ExitInfo::default()
        };
        api.fake.exit_workload(&mid, crash.clone());
        // Restarted once …
        let restarted = api
            .agent
            .wait_until(&mid, Duration::from_secs(10), |r| {
                r.restart_count == 1 && r.state == aloft_api::MachineState::Started
            })
            .unwrap();
        assert_eq!(restarted.restart_count, 1);
        // … and after the second failure it stays down, with the exit in its events.
        api.fake.exit_workload(&mid, crash);
        let w = api.wait("web", &id, "stopped,failed").await;
        assert!(w["state"] == "stopped" || w["state"] == "failed", "{w}");
        let (_, events) = api
            .call("GET", &format!("/v1/apps/web/machines/{id}/events"), None)
            .await;
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "exit" && e["request"]["exit_event"]["exit_code"] == 3),
            "{events}"
        );
    }
}

#[cfg(test)]
mod logs {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::time::{Duration, Instant};

    use aloft_agent::OutputStream;
    use aloft_api::MachineId;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::tests::{Api, busybox};

    fn lines(bytes: &[u8]) -> Vec<Value> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Emits until the capture thread (started with the VM) takes the output.
    fn emit(api: &Api, id: &MachineId, stream: OutputStream, data: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !api.fake.emit_log(id, stream, data) {
            assert!(Instant::now() < deadline, "nobody captures the machine's output");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tail_and_follow_an_apps_output() {
        let api = Api::new();
        api.app("web").await;
        let a = api.started("web", busybox()).await;
        let b = api.started("web", busybox()).await;
        let (ida, idb): (MachineId, MachineId) = (a.parse().unwrap(), b.parse().unwrap());
        emit(&api, &ida, OutputStream::Stdout, b"one\ntwo\n");
        emit(&api, &idb, OutputStream::Stderr, b"oops\n");

        // The tail: both machines, app lines with their streams and levels.
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            let (s, body) = api.raw_get("/v1/apps/web/logs?limit=100").await;
            assert_eq!(s, StatusCode::OK);
            let got: Vec<Value> = lines(&body)
                .into_iter()
                .filter(|l| l["meta"]["event"]["provider"] == "app")
                .collect();
            if got.len() == 3 || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let texts: Vec<&str> = got.iter().map(|l| l["message"].as_str().unwrap()).collect();
        assert!(
            texts.contains(&"one") && texts.contains(&"two") && texts.contains(&"oops"),
            "{got:?}"
        );
        let oops = got.iter().find(|l| l["message"] == "oops").unwrap();
        assert_eq!(oops["level"], "error");
        assert_eq!(oops["instance"], b.as_str());
        assert_eq!(oops["region"], "local");
        assert_eq!(oops["meta"]["stream"], "stderr");

        // One machine only.
        let (_, body) = api.raw_get(&format!("/v1/apps/web/logs?instance={a}")).await;
        assert!(lines(&body).iter().all(|l| l["instance"] == a.as_str()));
        let (s, _) = api.raw_get("/v1/apps/web/logs?instance=3d8d413b29d089").await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Follow: the tail (limit 0: none), then what is written afterwards.
        let req = Request::builder()
            .uri(format!("/v1/apps/web/logs?instance={a}&limit=0&follow=true"))
            .header("authorization", format!("Bearer {}", api.token))
            .body(Body::empty())
            .unwrap();
        let resp = api.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let mut body = resp.into_body();
        emit(&api, &ida, OutputStream::Stdout, b"live\n");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.iter().any(|l: &Value| l["message"] == "live") {
            let frame = tokio::time::timeout_at(deadline.into(), body.frame()).await;
            let frame = frame.expect("no live line within 10 s").unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                seen.extend(lines(&data));
            }
        }
        assert!(seen.iter().all(|l| l["instance"] == a.as_str()), "{seen:?}");
        drop(body);
    }
}
