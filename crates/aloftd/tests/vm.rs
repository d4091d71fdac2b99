//! The real `aloftd` running real machines (QEMU; TCG where KVM is unusable): a busybox httpd
//! image from a local registry, served from the machine's private address; stop, start,
//! suspend, resume, update to a new version, destroy; crash loops under each restart policy; and
//! `SIGKILL` of aloftd in the middle of create, stop and destroy, after which a new aloftd
//! finishes what was in flight and nothing is orphaned (no QEMU, no machine directory).
//!
//! Needs root (taps and nftables in a private network namespace, which the test creates and
//! deletes) and the guest kernel and initramfs (`scripts/setup.sh`). Every process it ends is one
//! it started: its aloftd children, and QEMU processes whose command line names its own
//! temporary directory.

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::net::{Ipv6Addr, SocketAddr, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use aloft_testkit::{CgroupParent, NetNs, Registry};
    use reqwest::{Method, StatusCode};
    use rustix::process::{Pid, Signal, kill_process};
    use serde_json::{Value, json};

    struct Env {
        dir: tempfile::TempDir,
        registry: Registry,
        ns: NetNs,
        port: u16,
        /// Machines are jailed under a cgroup parent of this test's own, removed at the end.
        cgroups: CgroupParent,
    }

    struct Daemon {
        child: Child,
        log: PathBuf,
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    impl Drop for Env {
        fn drop(&mut self) {
            // QEMU processes of this test's machines (their command lines name our directory).
            for pid in aloft_vm::processes_mentioning(self.dir.path()) {
                if let Some(pid) = Pid::from_raw(pid) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
    }

    impl Env {
        fn new() -> Self {
            let dir = tempfile::Builder::new().prefix("aloftd-vm-").tempdir().unwrap();
            let registry = Registry::start().unwrap();
            registry.push_busybox().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            Self {
                dir,
                registry,
                ns: NetNs::new().unwrap(),
                port,
                cgroups: CgroupParent::new(),
            }
        }

        fn start(&self, run: u32) -> Daemon {
            self.start_with(run, &["--no-edge"])
        }

        /// Starts aloftd with `extra` flags (the edge's addresses, or `--no-edge`).
        fn start_with(&self, run: u32, extra: &[&str]) -> Daemon {
            let guest = aloft_testkit::guest_artifacts().unwrap();
            let guest_dir = guest.kernel.parent().unwrap().to_owned();
            let log = self.dir.path().join(format!("aloftd-{run}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_aloftd"))
                .args(["--driver", "vm", "--network", "host", "--no-access-log"])
                .arg("--guest-dir")
                .arg(&guest_dir)
                .arg("--registry")
                .arg(self.registry.host())
                .arg("--machines-netns")
                .arg(self.ns.path())
                .arg("--cgroup-parent")
                .arg(self.cgroups.name())
                .arg("--data-dir")
                .arg(self.dir.path().join("data"))
                .args(extra)
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
                .env("HOME", self.dir.path())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let mut d = Daemon { child, log };
            let deadline = Instant::now() + Duration::from_secs(60);
            // aloftd binds before it writes the CLI config on its first start: wait for both.
            let config = self.dir.path().join("config/aloft/config.toml");
            while TcpStream::connect(("127.0.0.1", self.port)).is_err() || !config.is_file() {
                if let Some(status) = d.child.try_wait().unwrap() {
                    panic!(
                        "aloftd exited with {status}:\n{}",
                        std::fs::read_to_string(&d.log).unwrap()
                    );
                }
                assert!(Instant::now() < deadline, "aloftd did not listen in time");
                std::thread::sleep(Duration::from_millis(50));
            }
            d
        }

        fn client(&self) -> Client {
            let config = std::fs::read_to_string(self.dir.path().join("config/aloft/config.toml")).unwrap();
            let table: toml::Table = config.parse().unwrap();
            let _ = rustls::crypto::ring::default_provider().install_default();
            Client {
                http: reqwest::Client::builder().no_proxy().build().unwrap(),
                base: format!("http://127.0.0.1:{}/v1", self.port),
                token: table["token"].as_str().unwrap().to_owned(),
            }
        }

        /// Where the agent keeps machine `id` (its run dir, spec, QEMU's files).
        fn machine_dir(&self, id: &str) -> PathBuf {
            self.machines_dir().join(id)
        }

        /// The agent's machine directories (`<data dir>/machines` is the agent's, and its
        /// driver keeps machines in `machines/` under it, beside `disks/` and `image/`).
        fn machines_dir(&self) -> PathBuf {
            self.dir.path().join("data/machines/machines")
        }

        /// `id`'s QEMU runs jailed, as aloftd does by default: as the unprivileged `aloft-vm`,
        /// in a cgroup of its own under the test's parent with a memory limit.
        fn assert_jailed(&self, id: &str) {
            let procs = aloft_vm::processes_mentioning(&self.machine_dir(id));
            assert_eq!(procs.len(), 1, "one QEMU for {id}: {procs:?}");
            let status = std::fs::read_to_string(format!("/proc/{}/status", procs[0])).unwrap();
            let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
            let jail_uid = passwd
                .lines()
                .find(|l| l.starts_with("aloft-vm:"))
                .and_then(|l| l.split(':').nth(2))
                .expect("scripts/setup.sh creates user aloft-vm");
            assert!(
                uid.split_whitespace().skip(1).all(|u| u == jail_uid),
                "QEMU is not running as aloft-vm ({jail_uid}): {uid}"
            );
            let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", procs[0])).unwrap();
            let mine = format!("/{}/{id}", self.cgroups.name());
            let memory = cgroups
                .lines()
                .find(|l| l.ends_with(&mine) && (l.contains(":memory:") || l.starts_with("0::")))
                .unwrap_or_else(|| panic!("QEMU is not in a memory cgroup {mine}: {cgroups}"));
            let path = memory.rsplit(':').next().unwrap();
            let limit = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
                .iter()
                .find_map(|root| {
                    std::fs::read_to_string(format!("{root}{path}/memory.limit_in_bytes"))
                        .or_else(|_| std::fs::read_to_string(format!("{root}{path}/memory.max")))
                        .ok()
                })
                .unwrap_or_else(|| panic!("no memory limit file for cgroup {path}"));
            let limit: u64 = limit.trim().parse().unwrap_or(u64::MAX);
            assert!(limit < 4 << 30, "cgroup {path} has no memory limit: {limit}");
        }

        /// Nothing left on the host for `id`: no QEMU process, no machine directory, no cgroup.
        fn assert_gone(&self, id: &str) {
            let machine_dir = self.machine_dir(id);
            let cgroups = self.cgroups.machine_dirs(id);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let procs = aloft_vm::processes_mentioning(&machine_dir);
                let left: Vec<&PathBuf> = cgroups.iter().filter(|c| c.exists()).collect();
                if procs.is_empty() && !machine_dir.exists() && left.is_empty() {
                    return;
                }
                assert!(
                    left.is_empty() || Instant::now() < deadline,
                    "machine {id} left cgroups {left:?}"
                );
                assert!(
                    Instant::now() < deadline,
                    "machine {id} left QEMU {procs:?} or its directory {}",
                    machine_dir.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// `GET path` from machine `id`'s `port` through `…/machines/{id}/proxy` (a raw
        /// HTTP/1.1 upgrade to `aloft-tcp`, then HTTP/1.0 over the tunnel): the answer.
        fn proxied_get(&self, token: &str, id: &str, port: u16, path: &str) -> String {
            use std::io::{BufRead as _, BufReader, Read as _, Write as _};
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            write!(
                stream,
                "GET /v1/apps/web/machines/{id}/proxy?port={port} HTTP/1.1\r\nHost: aloftd\r\n\
                 Authorization: Bearer {token}\r\nConnection: upgrade\r\nUpgrade: aloft-tcp\r\n\r\n"
            )
            .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut status = String::new();
            reader.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 101"), "{status}");
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
            }
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut answer = String::new();
            reader.read_to_string(&mut answer).unwrap();
            answer
        }

        fn page(&self, ip: &str) -> String {
            let ip: Ipv6Addr = ip.parse().unwrap();
            self.ns
                .http_get(SocketAddr::from((ip, 8080)), Duration::from_secs(30))
                .unwrap()
        }
    }

    fn sigkill(d: &mut Daemon) {
        let pid = Pid::from_raw(i32::try_from(d.child.id()).unwrap()).unwrap();
        kill_process(pid, Signal::KILL).unwrap();
        d.child.wait().unwrap();
    }

    fn sigterm(mut d: Daemon) {
        let pid = Pid::from_raw(i32::try_from(d.child.id()).unwrap()).unwrap();
        kill_process(pid, Signal::TERM).unwrap();
        let status = d.child.wait().unwrap();
        assert!(
            status.success(),
            "{status}:\n{}",
            std::fs::read_to_string(&d.log).unwrap()
        );
    }

    struct Client {
        http: reqwest::Client,
        base: String,
        token: String,
    }

    impl Client {
        async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
            let mut req = self
                .http
                .request(method, format!("{}{path}", self.base))
                .header("authorization", format!("Bearer {}", self.token));
            if let Some(body) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body).unwrap());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap();
            (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }

        /// A GET whose answer is text (newline-delimited JSON: logs, release events).
        async fn text(&self, path: &str) -> String {
            let resp = self
                .http
                .get(format!("{}{path}", self.base))
                .header("authorization", format!("Bearer {}", self.token))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            resp.text().await.unwrap()
        }

        /// Waits until release `v` is final; returns it.
        async fn release_final(&self, v: u64) -> Value {
            let deadline = Instant::now() + Duration::from_secs(240);
            loop {
                let r = self
                    .ok(Method::GET, &format!("/apps/web/releases/{v}"), None)
                    .await;
                if ["complete", "rolled_back", "failed"].contains(&r["status"].as_str().unwrap_or_default()) {
                    return r;
                }
                assert!(Instant::now() < deadline, "release v{v} did not finish: {r}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }

        async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
            let (s, v) = self.call(method, path, body).await;
            assert!(s.is_success(), "{path}: {s} {v}");
            v
        }

        /// Waits (in 60 s long-polls, as fly-go does) until the machine is in `state`.
        async fn wait(&self, id: &str, state: &str) -> Value {
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let (s, v) = self
                    .call(
                        Method::GET,
                        &format!("/apps/web/machines/{id}/wait?state={state}&timeout=60"),
                        None,
                    )
                    .await;
                if s == StatusCode::OK {
                    return v;
                }
                assert_eq!(s, StatusCode::REQUEST_TIMEOUT, "waiting for {state}: {v}");
                assert!(Instant::now() < deadline, "machine {id} never reached {state}");
            }
        }

        async fn create(&self, config: Value) -> String {
            let m = self
                .ok(
                    Method::POST,
                    "/apps/web/machines",
                    Some(json!({"config": config})),
                )
                .await;
            m["id"].as_str().unwrap().to_owned()
        }

        async fn machine(&self, id: &str) -> Value {
            self.ok(Method::GET, &format!("/apps/web/machines/{id}"), None)
                .await
        }
    }

    fn httpd(greeting: &str) -> Value {
        json!({
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
            "env": {"GREETING": greeting},
            "init": {"exec": ["/bin/sh", "-c",
                "mkdir -p /tmp/www && echo \"$GREETING from $FLY_MACHINE_ID\" > /tmp/www/index.html && exec /bin/httpd -f -p 8080 -h /tmp/www"]},
            "stop_config": {"signal": "SIGTERM", "timeout": "5s"},
            "checks": {"web": {"type": "http", "port": 8080, "path": "/index.html", "interval": "1s", "timeout": "2s", "grace_period": "1s"}},
        })
    }

    /// A release group `app` of busybox httpd serving on `listen` behind a service on internal
    /// port 8080; the workload first prints the sha256 of the secret `MY_SECRET`.
    /// Without `count`: the machines there are, or two on a first deploy (it has services).
    fn release_group(listen: &str) -> Value {
        let script = format!(
            "echo -n \"$MY_SECRET\" | sha256sum; mkdir -p /tmp/www && echo \"release from $FLY_MACHINE_ID\" > /tmp/www/index.html && exec /bin/httpd -f -p {listen} -h /tmp/www"
        );
        json!({
            "group": "app",
            "config": {
                "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
                "init": {"exec": ["/bin/sh", "-c", script]},
                "stop_config": {"signal": "SIGTERM", "timeout": "5s"},
                "services": [{"protocol": "tcp", "internal_port": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}],
            },
        })
    }

    /// The registry fixture runs its own runtime, so the environment is made outside ours.
    fn run(test: impl AsyncFnOnce(&Env)) {
        let env = Env::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(test(&env));
    }

    #[test]
    fn machines_serve_pages_survive_lifecycle_verbs_and_aloftd_being_killed() {
        run(async |env| {
            let mut d = env.start(1);
            let api = env.client();
            api.ok(Method::POST, "/apps", Some(json!({"name": "web"}))).await;

            // Create, wait started, fetch the page from the private (6PN) address.
            let id = api.create(httpd("hello")).await;
            api.wait(&id, "started").await;
            let m = api.machine(&id).await;
            let ip = m["private_ip"].as_str().unwrap().to_owned();
            assert!(ip.starts_with("fdaa:"), "{m}");
            assert!(env.page(&ip).contains(&format!("hello from {id}")));
            env.assert_jailed(&id);
            // The agent's http check reaches it too (from the namespace the machine's tap is in).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let m = api.machine(&id).await;
                if m["checks"][0]["status"] == "passing" {
                    assert_eq!(m["checks"][0]["name"], "web");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the check never passed: {}",
                    m["checks"]
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }

            // Stop and start (a cold boot), suspend and resume.
            let path = format!("/apps/web/machines/{id}");
            api.ok(Method::POST, &format!("{path}/stop"), None).await;
            api.wait(&id, "stopped").await;
            api.ok(Method::POST, &format!("{path}/start"), None).await;
            api.wait(&id, "started").await;
            assert!(env.page(&ip).contains("hello"));
            api.ok(Method::POST, &format!("{path}/suspend"), None).await;
            api.wait(&id, "suspended").await;
            let started = api.ok(Method::POST, &format!("{path}/start"), None).await;
            assert_eq!(started["previous_state"], "suspended");
            api.wait(&id, "started").await;
            assert!(env.page(&ip).contains("hello"));

            // Update: a new version serves the new page; the old one is replaced.
            let old = m["instance_id"].as_str().unwrap().to_owned();
            let updated = api
                .ok(Method::POST, &path, Some(json!({"config": httpd("v2")})))
                .await;
            let new = updated["instance_id"].as_str().unwrap().to_owned();
            assert_ne!(new, old);
            api.ok(
                Method::GET,
                &format!("{path}/wait?state=stopped&version={old}&timeout=60"),
                None,
            )
            .await;
            api.wait(&id, "started").await;
            assert!(env.page(&ip).contains("v2 from"));
            let versions = api.ok(Method::GET, &format!("{path}/versions"), None).await;
            assert_eq!(versions.as_array().unwrap().len(), 2);

            // SIGKILL during create (the boot is in flight when create answers): a new aloftd
            // finishes it.
            let id2 = api.create(httpd("second")).await;
            sigkill(&mut d);
            let mut d = env.start(2);
            api.wait(&id2, "started").await;
            let ip2 = api.machine(&id2).await["private_ip"].as_str().unwrap().to_owned();
            assert!(env.page(&ip2).contains(&format!("second from {id2}")));
            // The first machine was reattached, not restarted.
            assert_eq!(api.machine(&id).await["state"], "started");

            // SIGKILL during stop.
            api.ok(Method::POST, &format!("/apps/web/machines/{id2}/stop"), None)
                .await;
            sigkill(&mut d);
            let mut d = env.start(3);
            api.wait(&id2, "stopped").await;
            assert!(aloft_vm::processes_mentioning(&env.machine_dir(&id2)).is_empty());

            // SIGKILL during destroy.
            api.ok(Method::DELETE, &format!("{path}?force=true"), None).await;
            sigkill(&mut d);
            let d = env.start(4);
            api.wait(&id, "destroyed").await;
            env.assert_gone(&id);
            api.ok(Method::DELETE, &format!("/apps/web/machines/{id2}"), None)
                .await;
            api.wait(&id2, "destroyed").await;
            env.assert_gone(&id2);
            sigterm(d);
        });
    }

    /// One flow, few boots (4 in all): a secret set, a rolling release of 2 machines during
    /// which aloftd is SIGKILLed (a new aloftd resumes it to `complete`, nothing orphaned); the
    /// machines' logs show the secret's digest and nothing shows its value; then a release whose
    /// app listens on loopback fails fast and rolls back, saying where it listens.
    #[test]
    fn releases_resume_after_aloftd_is_killed_fail_fast_and_keep_secrets() {
        const SECRET: &str = "vm-secret-5f2c9e";
        const DIGEST: &str = "9693d050fcd5230681d20f2ee180ca6130eaa483289f2e06f38dfa33d11036b6";
        run(async |env| {
            let mut d = env.start(1);
            let api = env.client();
            api.ok(Method::POST, "/apps", Some(json!({"name": "web"}))).await;
            api.ok(
                Method::POST,
                "/apps/web/secrets",
                Some(json!({"values": {"MY_SECRET": SECRET}})),
            )
            .await;

            // Release 1: two machines (a first deploy with services), rolling. SIGKILL aloftd as
            // soon as the job created the first (its boot in flight): the resumed job still makes
            // two, not the one it finds.
            let r = api
                .ok(
                    Method::POST,
                    "/apps/web/releases",
                    Some(json!({
                        "image": "busybox:latest",
                        "groups": [release_group("8080")],
                        "strategy": "rolling",
                        "wait_timeout": "120s",
                    })),
                )
                .await;
            assert_eq!(r["version"], 1, "{r}");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let events = api.text("/apps/web/releases/1/events").await;
                if events.contains("created machine") {
                    break;
                }
                assert!(Instant::now() < deadline, "the job created no machine: {events}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sigkill(&mut d);
            let d = env.start(2);
            let r = api.release_final(1).await;
            let events = api.text("/apps/web/releases/1/events").await;
            assert_eq!(r["status"], "complete", "{r}\n{events}");
            assert!(events.contains("resuming the release"), "{events}");
            let machines = api.ok(Method::GET, "/apps/web/machines", None).await;
            let machines = machines.as_array().unwrap();
            assert_eq!(machines.len(), 2, "{machines:?}");
            let ids: Vec<String> = machines
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            for m in machines {
                assert_eq!(m["state"], "started", "{m}");
                assert_eq!(m["config"]["metadata"]["fly_release_version"], "1", "{m}");
                // No lease of the killed job is left behind.
                let (s, l) = api
                    .call(
                        Method::GET,
                        &format!("/apps/web/machines/{}/lease", m["id"].as_str().unwrap()),
                        None,
                    )
                    .await;
                assert_eq!(s, StatusCode::NOT_FOUND, "{l}");
            }
            // Nothing orphaned: every machine directory (and its QEMU) and writable disk belongs
            // to a live machine.
            for entry in std::fs::read_dir(env.machines_dir()).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                if name.parse::<aloft_api::MachineId>().is_ok() && !ids.contains(&name) {
                    env.assert_gone(&name);
                }
            }
            for entry in std::fs::read_dir(env.dir.path().join("data/machines/disks")).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                let id = name.trim_end_matches(".img");
                assert!(ids.iter().any(|i| i == id), "orphaned disk {name}");
            }

            // The secret: its digest in the machines' logs, its value nowhere in the API.
            let deadline = Instant::now() + Duration::from_secs(60);
            let logs = loop {
                let logs = api.text("/apps/web/logs?limit=1000").await;
                if logs.contains(DIGEST) {
                    break logs;
                }
                assert!(Instant::now() < deadline, "no digest in the logs: {logs}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            assert!(!logs.contains(SECRET), "{logs}");
            for id in &ids {
                let m = api.machine(id).await.to_string();
                assert!(!m.contains(SECRET), "{m}");
                let ev = api
                    .ok(
                        Method::GET,
                        &format!("/apps/web/machines/{id}/events?limit=100"),
                        None,
                    )
                    .await
                    .to_string();
                assert!(!ev.contains(SECRET), "{ev}");
            }
            assert!(!events.contains(SECRET), "{events}");

            // Release 2 listens on loopback: it fails within the 10 s listen grace and rolls back
            // — also when aloftd is SIGKILLed while it updates the first machine (under its
            // lease): the resumed job gives back the leases its killed run held.
            let started = Instant::now();
            api.ok(
                Method::POST,
                "/apps/web/releases",
                Some(json!({
                    "image": "busybox:latest",
                    "groups": [release_group("127.0.0.1:3000")],
                    "strategy": "rolling",
                    "wait_timeout": "120s",
                })),
            )
            .await;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let events = api.text("/apps/web/releases/2/events").await;
                if events.contains("updating machine") {
                    break;
                }
                assert!(Instant::now() < deadline, "the job updated no machine: {events}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut d = d;
            sigkill(&mut d);
            let d = env.start(3);
            let r = api.release_final(2).await;
            let events = api.text("/apps/web/releases/2/events").await;
            assert_eq!(r["status"], "rolled_back", "{r}\n{events}");
            assert!(events.contains("resuming the release"), "{events}");
            let why = r["error"].as_str().unwrap();
            assert!(why.contains("listens on 127.0.0.1:3000"), "{why}");
            assert!(why.contains("expected 0.0.0.0:8080"), "{why}");
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{:?}",
                started.elapsed()
            );
            for id in &ids {
                let m = api.wait(id, "started").await;
                assert_eq!(m["state"], "started", "{m}");
                let m = api.machine(id).await;
                assert_eq!(m["config"]["metadata"]["fly_release_version"], "1", "{m}");
                let (s, l) = api
                    .call(Method::GET, &format!("/apps/web/machines/{id}/lease"), None)
                    .await;
                assert_eq!(s, StatusCode::NOT_FOUND, "{l}");
            }

            for id in &ids {
                api.ok(
                    Method::DELETE,
                    &format!("/apps/web/machines/{id}?force=true"),
                    None,
                )
                .await;
                api.wait(id, "destroyed").await;
                env.assert_gone(id);
            }
            sigterm(d);
        });
    }

    #[test]
    fn crash_loops_follow_the_restart_policy() {
        run(async |env| {
            let d = env.start(1);
            let api = env.client();
            api.ok(Method::POST, "/apps", Some(json!({"name": "web"}))).await;
            let crashing = |policy: Value| {
                json!({
                    "image": "busybox:latest",
                    "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
                    "init": {"exec": ["/bin/sh", "-c", "echo crashing; exit 3"]},
                    "restart": policy,
                })
            };
            let exits = |events: &Value| {
                events
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["type"] == "exit" && e["request"]["exit_event"]["exit_code"] == 3)
                    .count()
            };

            // `no`: one run, then stopped.
            let no = api.create(crashing(json!({"policy": "no"}))).await;
            // `on-failure` with one retry: two runs, then it stays down.
            let retry = api
                .create(crashing(json!({"policy": "on-failure", "max_retries": 1})))
                .await;
            // `always`: restarted again and again until destroyed.
            let always = api.create(crashing(json!({"policy": "always"}))).await;

            api.wait(&no, "stopped").await;
            let events = api
                .ok(
                    Method::GET,
                    &format!("/apps/web/machines/{no}/events?limit=50"),
                    None,
                )
                .await;
            assert_eq!(exits(&events), 1, "{events}");

            let w = api.wait(&retry, "stopped,failed").await;
            assert!(w["state"] == "stopped" || w["state"] == "failed", "{w}");
            let events = api
                .ok(
                    Method::GET,
                    &format!("/apps/web/machines/{retry}/events?limit=50"),
                    None,
                )
                .await;
            assert_eq!(exits(&events), 2, "{events}");

            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let events = api
                    .ok(
                        Method::GET,
                        &format!("/apps/web/machines/{always}/events?limit=50"),
                        None,
                    )
                    .await;
                if exits(&events) >= 3 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "policy always did not keep restarting: {events}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for id in [&no, &retry, &always] {
                api.ok(
                    Method::DELETE,
                    &format!("/apps/web/machines/{id}?force=true"),
                    None,
                )
                .await;
                api.wait(id, "destroyed").await;
                env.assert_gone(id);
            }
            sigterm(d);
        });
    }

    /// A resolver standing in for the host's: answers every `A` question with 192.0.2.7 and
    /// counts the questions it got.
    fn fake_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&asked);
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                // Header (12 bytes) and one question: its name, then type and class.
                let Some(end) = buf[12..n].iter().position(|&b| b == 0).map(|p| 12 + p + 5) else {
                    continue;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut answer = buf[..end].to_vec();
                answer[2] = 0x81; // QR, RD
                answer[3] = 0x80; // RA, NOERROR
                let is_a = buf[end - 4..end - 2] == [0, 1];
                answer[6..8].copy_from_slice(&[0, u8::from(is_a)]);
                answer[8..12].fill(0);
                if is_a {
                    // The question's name, A, IN, TTL 60, 4 bytes: 192.0.2.7.
                    answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
                }
                let _ = socket.send_to(&answer, from);
            }
        });
        (addr, asked)
    }

    /// The host's internal DNS, asked from inside real machines (busybox's `nslookup` and
    /// `wget`, the guests' own resolver code): `.internal` names give the app's started
    /// machines (every one, one by id, the TXT lists), a stopped machine drops out, a name of
    /// no app does not exist, and public names are relayed to the host's resolver.
    #[test]
    fn machines_resolve_internal_names_and_public_ones_through_the_hosts_dns() {
        run(async |env| {
            let (upstream, asked) = fake_upstream();
            let upstream = upstream.to_string();
            let d = env.start_with(1, &["--no-edge", "--dns-upstream", &upstream]);
            let api = env.client();
            api.ok(Method::POST, "/apps", Some(json!({"name": "web"}))).await;
            let a = api.create(httpd("alpha")).await;
            let b = api.create(httpd("bravo")).await;
            api.wait(&a, "started").await;
            api.wait(&b, "started").await;
            let ip_a = api.machine(&a).await["private_ip"].as_str().unwrap().to_owned();
            let ip_b = api.machine(&b).await["private_ip"].as_str().unwrap().to_owned();
            let exec = async |id: &str, script: &str| -> (i64, String) {
                let r = api
                    .ok(
                        Method::POST,
                        &format!("/apps/web/machines/{id}/exec"),
                        Some(json!({"command": ["/bin/sh", "-c", script], "timeout": 30})),
                    )
                    .await;
                let out = format!(
                    "{}{}",
                    r["stdout"].as_str().unwrap_or_default(),
                    r["stderr"].as_str().unwrap_or_default()
                );
                (r["exit_code"].as_i64().unwrap_or(-1), out)
            };
            let resolves = async |id: &str, q: &str, want: &[&str], not: &[&str]| {
                // The catalog reaches the resolver within a moment; ask until it has.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let (code, out) = exec(id, &format!("nslookup {q}")).await;
                    if code == 0
                        && want.iter().all(|w| out.contains(w))
                        && not.iter().all(|n| !out.contains(n))
                    {
                        return out;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "nslookup {q} in {id}: exit {code}, want {want:?}, not {not:?}:\n{out}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            let (_, conf) = exec(&a, "cat /etc/resolv.conf").await;
            assert!(conf.contains("nameserver fdaa::3"), "{conf}");

            resolves(&a, "-type=aaaa web.internal", &[&ip_a, &ip_b], &[]).await;
            resolves(&b, &format!("-type=aaaa {a}.vm.web.internal"), &[&ip_a], &[&ip_b]).await;
            let vms = resolves(&a, "-type=txt vms.web.internal", &[&a, &b], &[]).await;
            assert!(vms.contains(&format!("{a} local")), "{vms}");
            // A machine reaches another by name, through the guest's own resolver.
            let (code, page) = exec(
                &a,
                &format!("wget -q -O - http://{b}.vm.web.internal:8080/index.html"),
            )
            .await;
            assert_eq!(code, 0, "{page}");
            assert!(page.contains(&format!("bravo from {b}")), "{page}");
            // No app of that name: the name does not exist (and is not asked upstream).
            let before = asked.load(std::sync::atomic::Ordering::Relaxed);
            let (code, out) = exec(&a, "nslookup -type=aaaa nothing.internal").await;
            assert_ne!(code, 0, "{out}");
            assert!(out.contains("NXDOMAIN"), "{out}");
            assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), before);
            // Public names go to the host's resolver.
            resolves(&a, "-type=a public.example", &["192.0.2.7"], &[]).await;
            assert!(asked.load(std::sync::atomic::Ordering::Relaxed) > before);

            // `aloft proxy`'s path: aloftd connects to the machine's port and the upgraded
            // request carries the bytes (here an HTTP exchange with the guest's httpd).
            let page = env.proxied_get(&api.token, &b, 8080, "/index.html");
            assert!(page.contains(&format!("bravo from {b}")), "{page}");

            // A stopped machine is no longer an address of the app; `all.vms` still lists it.
            api.ok(Method::POST, &format!("/apps/web/machines/{b}/stop"), None)
                .await;
            api.wait(&b, "stopped").await;
            resolves(&a, "-type=aaaa web.internal", &[&ip_a], &[&ip_b]).await;
            resolves(&a, "-type=txt all.vms.web.internal", &[&a, &b], &[]).await;

            for id in [&a, &b] {
                api.ok(
                    Method::DELETE,
                    &format!("/apps/web/machines/{id}?force=true"),
                    None,
                )
                .await;
                api.wait(id, "destroyed").await;
            }
            sigterm(d);
        });
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A release group of busybox httpd saying `greeting` behind the edge: port 80 (http) and
    /// 443 (tls, http), woken on demand and suspended when idle.
    fn edge_group(greeting: &str, count: u32) -> Value {
        let script = format!(
            "mkdir -p /tmp/www && echo \"{greeting} from $FLY_MACHINE_ID\" > /tmp/www/index.html && exec /bin/httpd -f -p 8080 -h /tmp/www"
        );
        json!({
            "group": "app",
            "count": count,
            "config": {
                "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
                "init": {"exec": ["/bin/sh", "-c", script]},
                "stop_config": {"signal": "SIGTERM", "timeout": "5s"},
                "services": [{
                    "protocol": "tcp",
                    "internal_port": 8080,
                    "autostart": true,
                    "autostop": "suspend",
                    "min_machines_running": 0,
                    "ports": [
                        {"port": 80, "handlers": ["http"]},
                        {"port": 443, "handlers": ["tls", "http"]}
                    ],
                }],
            },
        })
    }

    /// `curl` through the edge: (status line, headers and body).
    fn curl(args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--max-time", "60"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The edge in front of real machines: an app deployed by a release answers at
    /// `web.localhost` over HTTP/1.1 and over HTTPS with HTTP/2 (certificate from the edge's local
    /// CA); idle, the autostop loop suspends it; the next request wakes it; a rolling deploy
    /// behind the edge drops no request.
    #[test]
    fn the_edge_serves_wakes_and_sleeps_an_app_and_keeps_serving_through_a_rolling_deploy() {
        run(async |env| {
            let (http, https) = (free_port(), free_port());
            let http_addr = format!("127.0.0.1:{http}");
            let https_addr = format!("127.0.0.1:{https}");
            let d = env.start_with(
                1,
                &[
                    "--edge-http",
                    &http_addr,
                    "--edge-https",
                    &https_addr,
                    "--edge-metrics",
                    "off",
                    "--edge-autostop-interval",
                    "1",
                    "--edge-idle-after",
                    "3",
                ],
            );
            let api = env.client();
            api.ok(Method::POST, "/apps", Some(json!({"name": "web"}))).await;
            let deploy = async |v: u64, greeting: &str, count: u32| {
                let r = api
                    .ok(
                        Method::POST,
                        "/apps/web/releases",
                        Some(json!({
                            "image": "busybox:latest",
                            "groups": [edge_group(greeting, count)],
                            "strategy": "rolling",
                            "wait_timeout": "120s",
                        })),
                    )
                    .await;
                assert_eq!(r["version"], v, "{r}");
                let r = api.release_final(v).await;
                assert_eq!(r["status"], "complete", "{r}");
            };
            deploy(1, "one", 1).await;
            let machines = api.ok(Method::GET, "/apps/web/machines", None).await;
            let id = machines[0]["id"].as_str().unwrap().to_owned();

            // HTTP/1.1 through the edge, once the catalog has reached it.
            let host = format!("web.localhost:{http}:127.0.0.1");
            let url = format!("http://web.localhost:{http}/index.html");
            let deadline = Instant::now() + Duration::from_secs(30);
            let page = loop {
                let page = curl(&["--resolve", &host, &url]);
                if page.starts_with("HTTP/1.1 200") {
                    break page;
                }
                assert!(
                    Instant::now() < deadline,
                    "the edge never routed to the app:\n{page}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert!(page.contains(&format!("one from {id}")), "{page}");
            let lower = page.to_ascii_lowercase();
            assert!(lower.contains("\nfly-request-id: "), "{page}");
            assert!(lower.contains("\nserver: aloft"), "{page}");
            // An unknown app is the edge's 404 with its code.
            let unknown = curl(&[
                "--resolve",
                &format!("nope.localhost:{http}:127.0.0.1"),
                &format!("http://nope.localhost:{http}/"),
            ]);
            assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
            assert!(
                unknown
                    .to_ascii_lowercase()
                    .contains("fly-proxy-error-code: pr04"),
                "{unknown}"
            );

            // HTTPS with HTTP/2, trusting only the edge's local CA.
            let ca = env.dir.path().join("data/edge/ca/ca.pem");
            let secure = curl(&[
                "--http2",
                "--cacert",
                ca.to_str().unwrap(),
                "--resolve",
                &format!("web.localhost:{https}:127.0.0.1"),
                &format!("https://web.localhost:{https}/index.html"),
            ]);
            assert!(secure.starts_with("HTTP/2 200"), "{secure}");
            assert!(secure.contains(&format!("one from {id}")), "{secure}");

            // Idle: the autostop loop suspends it; a request wakes it.
            api.wait(&id, "suspended").await;
            let woke = Instant::now();
            let page = curl(&["--resolve", &host, &url]);
            let took = woke.elapsed();
            assert!(page.starts_with("HTTP/1.1 200"), "{page}");
            assert!(page.contains(&format!("one from {id}")), "{page}");
            eprintln!("woke the suspended machine through the edge in {took:?}");
            // The edge forwards as soon as the guest accepts; the agent may record `started` a
            // moment after the answer (seen on a fast host: still `starting`).
            assert_eq!(api.wait(&id, "started").await["ok"], true);

            // A rolling deploy to two machines while a client keeps asking: nothing fails.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let load = {
                let (stop, host, url) = (stop.clone(), host.clone(), url.clone());
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let page = curl(&["--resolve", &host, &url]);
                        if page.starts_with("HTTP/1.1 200") {
                            ok += 1;
                        } else {
                            failed.push(page.lines().take(12).collect::<Vec<_>>().join("\n"));
                        }
                        // Often enough for a dozen requests within a deploy of two machines, which
                        // takes under a second on aloft's own QEMU.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (ok, failed)
                })
            };
            deploy(2, "two", 2).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !curl(&["--resolve", &host, &url]).contains("two from") {
                assert!(Instant::now() < deadline, "the edge never served the new release");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (ok, failed) = load.join().unwrap();
            assert!(ok > 10, "only {ok} requests went through during the deploy");
            assert!(
                failed.is_empty(),
                "{} of {} requests failed during the deploy:\n{}",
                failed.len(),
                ok as usize + failed.len(),
                failed.join("\n---\n")
            );
            sigterm(d);
        });
    }
}
