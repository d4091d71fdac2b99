//! Releases end to end in process: the real router and release jobs over the real agent on
//! `FakeDriver`. Strategies, the first deploy's redundancy, health gates that roll back, a
//! release command that aborts before any machine changes, rollback to an earlier release, one
//! release at a time, and the event stream.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::net::{IpAddr, Ipv4Addr, TcpListener};
    use std::time::{Duration, Instant};

    use aloft_agent::{DriverOp, ExitInfo};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use serde_json::{Value, json};
    use tower::ServiceExt as _;

    use crate::common::Harness;

    /// The shared harness with this file's helpers.
    struct Api(Harness);

    impl std::ops::Deref for Api {
        type Target = Harness;

        fn deref(&self) -> &Harness {
            &self.0
        }
    }

    impl Api {
        /// A host of 8 vCPUs and 8 GiB whose machines' checks connect to 127.0.0.1.
        fn new() -> Self {
            let h = Harness::new(|c| {
                c.host_memory_mb = 8192;
                c.host_cpus = 8;
            });
            h.fake.network_address(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            Self(h)
        }

        async fn deploy(&self, body: Value) -> Value {
            let (s, r) = self.call("POST", "/v1/apps/web/releases", Some(body)).await;
            assert_eq!(s, StatusCode::CREATED, "{r}");
            assert_eq!(r["status"], "pending");
            r
        }

        /// Waits until release `v` is final; returns it.
        async fn finished(&self, v: u64) -> Value {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (_, r) = self
                    .call("GET", &format!("/v1/apps/web/releases/{v}"), None)
                    .await;
                if ["complete", "rolled_back", "failed"].contains(&r["status"].as_str().unwrap_or_default()) {
                    return r;
                }
                assert!(Instant::now() < deadline, "release v{v} did not finish: {r}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn events(&self, v: u64) -> Vec<Value> {
            let req = Request::builder()
                .uri(format!("/v1/apps/web/releases/{v}/events?follow=true"))
                .header("authorization", format!("Bearer {}", self.token))
                .body(Body::empty())
                .unwrap();
            let resp = self.router.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            // With follow, the stream ends when the release is over.
            let bytes = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
                .await
                .expect("the event stream did not end with the release")
                .unwrap()
                .to_bytes();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }

        /// The app's live machines.
        async fn machines(&self) -> Vec<Value> {
            let (_, list) = self.call("GET", "/v1/apps/web/machines", None).await;
            list.as_array().unwrap().clone()
        }
    }

    fn group(image: &str, services: bool) -> Value {
        let mut config =
            json!({"image": image, "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"}});
        if services {
            config["services"] = json!([{"protocol": "tcp", "internal_port": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}]);
        }
        json!({"group": "app", "config": config})
    }

    /// `g` with one tcp check on `port` (interval 100 ms) whose grace period is `grace`.
    fn tcp_checked(mut g: Value, port: u16, grace: &str) -> Value {
        g["config"]["checks"] = json!({"alive": {"type": "tcp", "port": port, "interval": "100ms", "timeout": "1s", "grace_period": grace}});
        g
    }

    fn release_of(m: &Value) -> &str {
        m["config"]["metadata"]["fly_release_version"]
            .as_str()
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn strategies_replace_every_machine_and_report_progress() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;

        // First deploy of a group with services: two machines, as Fly does.
        let r = api
            .deploy(json!({"image": "web:1", "groups": [group("web:1", true)]}))
            .await;
        assert_eq!(r["version"], 1);
        let events = api.events(1).await;
        assert_eq!(events.last().unwrap()["status"], "complete", "{events:?}");
        assert!(
            events
                .iter()
                .any(|e| e["message"].as_str().unwrap().contains("created machine"))
        );
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "events in order, none twice"
        );
        let first = api.machines().await;
        assert_eq!(first.len(), 2);
        assert!(
            first
                .iter()
                .all(|m| release_of(m) == "1" && m["config"]["metadata"]["fly_process_group"] == "app")
        );

        for (v, strategy) in [(2, "rolling"), (3, "immediate"), (4, "canary")] {
            let image = format!("web:{v}");
            let r = api
                .deploy(json!({"groups": [group(&image, true)], "image": image, "strategy": strategy}))
                .await;
            assert_eq!(r["strategy"], strategy);
            let done = api.finished(v).await;
            assert_eq!(done["status"], "complete", "{done}");
            let ms = api.machines().await;
            assert_eq!(ms.len(), 2, "{strategy} keeps the count");
            for m in &ms {
                assert_eq!(m["config"]["image"], image.as_str());
                assert_eq!(release_of(m), v.to_string());
                assert_eq!(m["state"], "started");
            }
            // Updated in place: the same machines.
            let mut ids: Vec<&str> = ms.iter().map(|m| m["id"].as_str().unwrap()).collect();
            let mut before: Vec<&str> = first.iter().map(|m| m["id"].as_str().unwrap()).collect();
            ids.sort_unstable();
            before.sort_unstable();
            assert_eq!(ids, before);
        }

        // Bluegreen: new machines, then the old ones go.
        api.deploy(json!({"groups": [group("web:5", true)], "image": "web:5", "strategy": "bluegreen"}))
            .await;
        let done = api.finished(5).await;
        assert_eq!(done["status"], "complete", "{done}");
        let ms = api.machines().await;
        assert_eq!(ms.len(), 2);
        for m in &ms {
            assert!(
                !first.iter().any(|f| f["id"] == m["id"]),
                "bluegreen makes new machines"
            );
            assert_eq!(m["cordoned"], false, "green machines join the pool");
            assert_eq!(m["config"]["image"], "web:5");
        }

        // Scale through a release: count 3.
        let mut g = group("web:6", true);
        g["count"] = json!(3);
        api.deploy(json!({"groups": [g], "image": "web:6"})).await;
        assert_eq!(api.finished(6).await["status"], "complete");
        assert_eq!(api.machines().await.len(), 3);
        let mut g = group("web:7", true);
        g["count"] = json!(1);
        api.deploy(json!({"groups": [g], "image": "web:7"})).await;
        assert_eq!(api.finished(7).await["status"], "complete");
        assert_eq!(api.machines().await.len(), 1);

        let (_, list) = api.call("GET", "/v1/apps/web/releases", None).await;
        let versions: Vec<u64> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, vec![7, 6, 5, 4, 3, 2, 1]);
        let (_, newest) = api.call("GET", "/v1/apps/web/releases?limit=2", None).await;
        let newest: Vec<&Value> = newest.as_array().unwrap().iter().map(|r| &r["version"]).collect();
        assert_eq!(newest, [7, 6]);
        let (s, bad) = api.call("GET", "/v1/apps/web/releases?limit=0", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(bad["error"].as_str().unwrap().contains("limit"), "{bad}");
    }

    /// Stops machine `id` through the API and waits until it is stopped.
    async fn stop(api: &Api, id: &str) {
        let (s, ok) = api
            .call("POST", &format!("/v1/apps/web/machines/{id}/stop"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{ok}");
        api.wait("web", id, "stopped").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn machines_at_rest_are_updated_and_stay_stopped() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        api.deploy(json!({"image": "web:1", "groups": [group("web:1", true)]}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let first = api.machines().await;
        assert_eq!(first.len(), 2);
        // The edge stopped one when it idled.
        let idle = first[0]["id"].as_str().unwrap().to_owned();
        stop(&api, &idle).await;

        for (v, strategy) in [(2, "rolling"), (3, "immediate"), (4, "canary")] {
            let image = format!("web:{v}");
            api.deploy(json!({"groups": [group(&image, true)], "image": image, "strategy": strategy}))
                .await;
            let done = api.finished(v).await;
            assert_eq!(done["status"], "complete", "{strategy}: {done}");
            let ms = api.machines().await;
            assert_eq!(ms.len(), 2, "{strategy}");
            for m in &ms {
                assert_eq!(m["config"]["image"], image.as_str(), "{strategy}: {m}");
                assert_eq!(release_of(m), v.to_string());
                let want = if m["id"] == idle.as_str() {
                    "stopped"
                } else {
                    "started"
                };
                assert_eq!(m["state"], want, "{strategy}: a machine keeps its state: {m}");
            }
            let events = api.events(v).await;
            assert!(
                events.iter().any(|e| {
                    e["machine"] == idle.as_str() && e["message"].as_str().unwrap().contains("stays stopped")
                }),
                "{events:?}"
            );
        }

        // An app scaled to zero: the release updates its machines and boots none.
        let other = first[1]["id"].as_str().unwrap().to_owned();
        stop(&api, &other).await;
        api.deploy(json!({"groups": [group("web:5", true)], "image": "web:5"}))
            .await;
        assert_eq!(api.finished(5).await["status"], "complete");
        for m in api.machines().await {
            assert_eq!(
                (m["state"].as_str(), release_of(&m)),
                (Some("stopped"), "5"),
                "{m}"
            );
        }
        // Started later (by the edge, or here by hand), a machine boots the new release.
        let (s, _) = api
            .call("POST", &format!("/v1/apps/web/machines/{idle}/start"), None)
            .await;
        assert_eq!(s, StatusCode::OK);
        api.wait("web", &idle, "started").await;
        let (_, m) = api
            .call("GET", &format!("/v1/apps/web/machines/{idle}"), None)
            .await;
        assert_eq!(m["config"]["image"], "web:5");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn machines_made_by_hand_are_not_the_releases() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        // `aloft machine run` in the app: no fly_platform_version, group "app" by default.
        let (s, by_hand) = api
            .call(
                "POST",
                "/v1/apps/web/machines",
                Some(json!({"config": {"image": "tool:1", "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"}}})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{by_hand}");
        let by_hand = by_hand["id"].as_str().unwrap().to_owned();
        api.wait("web", &by_hand, "started").await;

        // A first deploy of a group with services makes its own two machines beside it, and
        // a release of count 1 destroys one of those, never the hand-made one.
        api.deploy(json!({"image": "web:1", "groups": [group("web:1", true)]}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let mut g = group("web:2", true);
        g["count"] = json!(1);
        api.deploy(json!({"image": "web:2", "groups": [g]})).await;
        assert_eq!(api.finished(2).await["status"], "complete");
        let ms = api.machines().await;
        assert_eq!(ms.len(), 2, "{ms:?}");
        let hand = ms.iter().find(|m| m["id"] == by_hand.as_str()).unwrap();
        assert_eq!(hand["config"]["image"], "tool:1", "untouched: {hand}");
        assert_eq!(release_of(hand), "");
        let other = ms.iter().find(|m| m["id"] != by_hand.as_str()).unwrap();
        assert_eq!(other["config"]["image"], "web:2");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn process_groups_deploy_side_by_side_and_fail_together() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // `web` is judged only after its check's 1 s grace; `worker` has nothing to wait for.
        let web = |image: &str, port: u16| {
            let mut g = group(image, false);
            g["group"] = json!("web");
            tcp_checked(g, port, "1s")
        };
        let worker = |image: &str| {
            let mut g = group(image, false);
            g["group"] = json!("worker");
            g
        };
        api.deploy(json!({"image": "web:1", "groups": [web("web:1", port), worker("web:1")]}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let events = api.events(1).await;
        let at = |text: &str| {
            events
                .iter()
                .position(|e| e["message"].as_str().unwrap().contains(text))
                .unwrap_or_else(|| panic!("no event {text:?}: {events:?}"))
        };
        let ms = api.machines().await;
        let of = |group: &str| {
            ms.iter()
                .find(|m| m["config"]["metadata"]["fly_process_group"] == group)
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let (web_id, worker_id) = (of("web"), of("worker"));
        assert!(
            at(&format!("machine {worker_id} is started and healthy"))
                < at(&format!("machine {web_id} is started and healthy")),
            "worker's machine is done while web's waits out its grace: {events:?}"
        );

        // web's check fails: the release stops and puts back both groups, worker's too.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        api.deploy(json!({"image": "web:2", "groups": [web("web:2", closed), worker("web:2")], "wait_timeout": "3s"}))
            .await;
        let r = api.finished(2).await;
        assert_eq!(r["status"], "rolled_back", "{r}");
        let why = r["error"].as_str().unwrap();
        assert!(why.starts_with("group web: "), "{why}");
        assert!(!why.contains("stopped"), "{why}");
        for m in api.machines().await {
            assert_eq!(release_of(&m), "1", "{m}");
            assert_eq!(m["config"]["image"], "web:1");
        }
        drop(listener);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_health_check_rolls_back_and_rollback_redeploys() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        // A healthy first release: its check connects to a port that listens.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let good_port = listener.local_addr().unwrap().port();
        let checked = |image: &str, port: u16| tcp_checked(group(image, false), port, "100ms");
        api.deploy(json!({"groups": [checked("web:1", good_port)], "image": "web:1"}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let before = api.machines().await;
        assert_eq!(before.len(), 1);

        // The next one's check fails: rolled back, the machine runs release 1's config again.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        api.deploy(json!({"groups": [checked("web:2", closed)], "image": "web:2", "wait_timeout": "2s"}))
            .await;
        let r = api.finished(2).await;
        assert_eq!(r["status"], "rolled_back", "{r}");
        let why = r["error"].as_str().unwrap();
        assert!(why.contains("alive") && why.contains("did not pass"), "{why}");
        let after = api.machines().await;
        assert_eq!(after.len(), 1);
        assert_eq!(after[0]["id"], before[0]["id"]);
        assert_eq!(after[0]["config"]["image"], "web:1");
        assert_eq!(release_of(&after[0]), "1");
        let events = api.events(2).await;
        assert!(events.iter().any(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("back on its previous config")
        }));

        // A release that passes, then a rollback to release 1.
        api.deploy(json!({"groups": [checked("web:3", good_port)], "image": "web:3"}))
            .await;
        assert_eq!(api.finished(3).await["status"], "complete");
        let (s, rb) = api.call("POST", "/v1/apps/web/releases/rollback", None).await;
        assert_eq!(s, StatusCode::CREATED, "{rb}");
        assert_eq!(
            rb["rollback_of"], 1,
            "the last complete release before the newest"
        );
        let v = rb["version"].as_u64().unwrap();
        assert_eq!(api.finished(v).await["status"], "complete");
        assert_eq!(api.machines().await[0]["config"]["image"], "web:1");
        drop(listener);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_app_that_listens_elsewhere_fails_fast_and_says_where_it_listens() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        // The fake workload listens on 0.0.0.0:8080, the services' internal_port: complete.
        api.deploy(json!({"groups": [group("web:1", true)], "image": "web:1"}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let before = api.machines().await;
        assert_eq!(before.len(), 2);

        // Loopback only: the release fails within the checks' grace period (1 s here, far below
        // its wait_timeout) and says what the app listens on.
        let with_grace = |image: &str| {
            let mut g = group(image, true);
            g["config"]["checks"] =
                json!({"alive": {"type": "tcp", "port": 8080, "interval": "100ms", "grace_period": "1s"}});
            g
        };
        api.fake.listen(&[("tcp", "127.0.0.1:3000")]);
        let started = Instant::now();
        api.deploy(json!({"groups": [with_grace("web:2")], "image": "web:2", "wait_timeout": "60s"}))
            .await;
        let r = api.finished(2).await;
        assert_eq!(r["status"], "rolled_back", "{r}");
        let why = r["error"].as_str().unwrap();
        assert!(
            why.contains("app listens on 127.0.0.1:3000 (tcp), expected 0.0.0.0:8080"),
            "{why}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        let after = api.machines().await;
        assert_eq!(after.len(), 2);
        assert!(after.iter().all(|m| release_of(m) == "1"), "{after:?}");

        // Nothing listening at all says so.
        api.fake.listen(&[]);
        api.deploy(json!({"groups": [with_grace("web:3")], "image": "web:3"}))
            .await;
        let r = api.finished(3).await;
        assert_eq!(r["status"], "rolled_back", "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("nothing listens yet, expected 0.0.0.0:8080"),
            "{r}"
        );

        // The wildcard address of either family passes.
        api.fake
            .listen(&[("tcp", "127.0.0.1:3000"), ("tcp", "[::]:8080")]);
        api.deploy(json!({"groups": [group("web:4", true)], "image": "web:4"}))
            .await;
        assert_eq!(api.finished(4).await["status"], "complete");
        api.fake.listen(&[("tcp", "0.0.0.0:8080")]);
        api.deploy(json!({"groups": [group("web:5", true)], "image": "web:5"}))
            .await;
        assert_eq!(api.finished(5).await["status"], "complete");
        assert!(api.machines().await.iter().all(|m| release_of(m) == "5"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_release_command_changes_no_machine() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        api.deploy(json!({"groups": [group("web:1", false)], "image": "web:1"}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let before = api.machines().await;

        // Every workload started now exits 1: the release command's machine fails first.
        api.fake.exit_on_start(Some(ExitInfo {
            exit_code: Some(1),
            ..ExitInfo::default()
        }));
        let body = json!({
            "groups": [group("web:2", false)], "image": "web:2",
            "release_command": {"init": {"exec": ["/bin/sh", "-c", "migrate"]}},
        });
        api.deploy(body).await;
        let r = api.finished(2).await;
        api.fake.exit_on_start(None);
        assert_eq!(r["status"], "failed", "{r}");
        assert!(r["error"].as_str().unwrap().contains("release command"), "{r}");
        assert!(r["error"].as_str().unwrap().contains("code 1"), "{r}");
        // The command's machine is destroyed by the job; the list learns it from the catalog,
        // which may lag the release's end by a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        let after = loop {
            let after = api.machines().await;
            if after.len() == before.len() || Instant::now() > deadline {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(after.len(), before.len(), "{after:?}");
        assert_eq!(after[0]["instance_id"], before[0]["instance_id"], "untouched");

        // A release command that says why it fails: its machine goes, and its logs with it, so
        // its last lines are kept in the release.
        api.deploy(json!({
            "groups": [group("web:3", false)], "image": "web:3",
            "release_command": {"init": {"exec": ["/bin/sh", "-c", "migrate"]}},
        }))
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        let command = loop {
            let running = api.fake.world().vms.into_iter().find(|(id, vm)| {
                matches!(vm, aloft_agent::FakeVm::Running { .. })
                    && !after.iter().any(|m| m["id"] == id.as_str())
            });
            if let Some((id, _)) = running
                && api.fake.emit_log(
                    &id,
                    aloft_agent::OutputStream::Stderr,
                    b"column x already exists\n",
                )
            {
                break id;
            }
            assert!(Instant::now() < deadline, "the release command never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Written to the machine's log before it ends.
        while !api
            .agent
            .log_tail(&command, 10)
            .unwrap()
            .iter()
            .any(|l| l.message.contains("column x"))
        {
            assert!(Instant::now() < deadline, "the output never reached the log");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        api.fake.exit_workload(
            &command,
            ExitInfo {
                exit_code: Some(3),
                ..ExitInfo::default()
            },
        );
        let r = api.finished(3).await;
        assert_eq!(r["status"], "failed", "{r}");
        let why = r["error"].as_str().unwrap();
        assert!(why.contains("code 3: column x already exists"), "{why}");
        let events = api.events(3).await;
        assert!(
            events
                .iter()
                .any(|e| e["message"] == "release command: column x already exists"),
            "{events:?}"
        );

        // With a release command that succeeds, the release goes through.
        api.deploy(json!({
            "groups": [group("web:4", false)], "image": "web:4",
            "release_command": {"init": {"exec": ["/bin/true"]}},
        }))
        .await;
        // The fake workload runs until stopped: end the release command's run with code 0.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, r) = api.call("GET", "/v1/apps/web/releases/4", None).await;
            if r["status"] != "pending" && r["status"] != "release_command" {
                break;
            }
            for (id, vm) in api.fake.world().vms {
                if matches!(vm, aloft_agent::FakeVm::Running { .. })
                    && !after.iter().any(|m| m["id"] == id.as_str())
                {
                    api.fake.exit_workload(
                        &id,
                        ExitInfo {
                            exit_code: Some(0),
                            ..ExitInfo::default()
                        },
                    );
                }
            }
            assert!(Instant::now() < deadline, "the release command never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(api.finished(4).await["status"], "complete");
        assert_eq!(api.machines().await[0]["config"]["image"], "web:4");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_release_at_a_time_and_bad_requests() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        let (s, e) = api
            .call("POST", "/v1/apps/web/releases", Some(json!({"groups": []})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        let (s, e) = api
            .call(
                "POST",
                "/v1/apps/web/releases",
                Some(json!({"groups": [{"group": "app", "config": {}}]})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(e["error"].as_str().unwrap().contains("no image"), "{e}");
        let (s, _) = api
            .call("POST", "/v1/apps/nope/releases", Some(json!({"groups": []})))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, e) = api.call("POST", "/v1/apps/web/releases/rollback", None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        let (s, _) = api.call("GET", "/v1/apps/web/releases/9", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Hold the first release's boot: a second release is refused while it runs.
        api.fake.block(DriverOp::StartVm);
        api.deploy(json!({"groups": [group("web:1", false)], "image": "web:1"}))
            .await;
        let (s, e) = api
            .call(
                "POST",
                "/v1/apps/web/releases",
                Some(json!({"groups": [group("web:2", false)], "image": "web:2"})),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{e}");
        assert!(e["error"].as_str().unwrap().contains("release v1"), "{e}");
        api.fake.unblock(DriverOp::StartVm);
        assert_eq!(api.finished(1).await["status"], "complete");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_image_that_does_not_exist_leaves_the_running_release_alone() {
        let api = Api::new();
        api.call("POST", "/v1/apps", Some(json!({"name": "web"}))).await;
        api.deploy(json!({"groups": [group("web:1", false)], "image": "web:1"}))
            .await;
        assert_eq!(api.finished(1).await["status"], "complete");
        let before = api.machines().await;
        api.fake.missing_image("web:nope");
        api.deploy(json!({"groups": [group("web:nope", false)], "image": "web:nope"}))
            .await;
        let r = api.finished(2).await;
        assert_eq!(r["status"], "rolled_back", "{r}");
        assert!(r["error"].as_str().unwrap().contains("web:nope"), "{r}");
        let after = api.machines().await;
        assert_eq!(after.len(), 1);
        assert_eq!(after[0]["id"], before[0]["id"]);
        assert_eq!(after[0]["config"]["image"], "web:1");
        assert_eq!(after[0]["state"], "started");
    }
}
