//! Real-VM tests of the agent with [`VmDriver`]: a busybox image pushed to a test registry is
//! created as a machine, started, stopped, started again and destroyed with nothing left behind;
//! an agent killed with SIGKILL while its machine runs is reopened and finds the machine
//! running and controllable; a volume keeps its data across boots and machines and grows.

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::net::{IpAddr, SocketAddr};
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use aloft_agent::{
        Agent, AgentConfig, AgentError, BaseInfo, CrashPhase, CreateMachine, Driver, DriverError, DriverOp,
        ExecResult, ExitInfo, HostNetwork, ImageInfo, Killswitch, LaunchSpec, MachineRecord, NetInfo,
        Network, NoNetwork, StopOptions, VmDriver, VmDriverConfig, VmStatus, VolumeDisk,
    };
    use aloft_api::{
        ConsoleEvent, ConsoleExit, ConsoleRequest, ConsoleSession, MachineConfig, MachineHost, MachineId,
        MachineInit, MachineState, ProcessStat, Signal, SnapshotId, StopConfig, StopSignal, TtySize,
        VolumeId, WaitState,
    };
    use aloft_image::RegistryConfig;
    use aloft_net::{HostNet, Namespace, Plan, PlanConfig};
    use aloft_testkit::{NetNs, Registry};

    const BOOT: Duration = Duration::from_secs(120);
    const CHILD_ENV: &str = "ALOFT_AGENT_TEST_CHILD_DIR";
    const REGISTRY_ENV: &str = "ALOFT_AGENT_TEST_REGISTRY";

    /// Paths under one private temporary directory.
    fn data(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (dir.join("data"), dir.join("cache"), dir.join("agent.db"))
    }

    fn open_agent(dir: &Path, registry_host: &str) -> Agent {
        open_agent_with(dir, registry_host, Arc::new(NoNetwork))
    }

    fn open_agent_with(dir: &Path, registry_host: &str, network: Arc<dyn Network>) -> Agent {
        open_agent_on(dir, Arc::new(driver(dir, registry_host, network)), None)
    }

    fn open_agent_on(dir: &Path, driver: Arc<dyn Driver>, killswitch: Option<Killswitch>) -> Agent {
        let config = AgentConfig {
            boot_timeout: BOOT,
            stop_timeout: Duration::from_secs(5),
            retry_delay: Duration::from_millis(200),
            killswitch,
            ..AgentConfig::new(data(dir).2)
        };
        Agent::open(config, driver).unwrap()
    }

    fn driver(dir: &Path, registry_host: &str, network: Arc<dyn Network>) -> VmDriver {
        VmDriver::new(driver_config(dir, registry_host, network)).unwrap()
    }

    fn driver_config(dir: &Path, registry_host: &str, network: Arc<dyn Network>) -> VmDriverConfig {
        let (data, cache, _) = data(dir);
        let artifacts = aloft_testkit::guest_artifacts().unwrap();
        let mut cfg = VmDriverConfig::new(data, cache, artifacts.kernel, artifacts.initrd);
        cfg.registry = RegistryConfig {
            insecure: vec![registry_host.to_owned()],
            ..RegistryConfig::default()
        };
        cfg.default_registry = Some(registry_host.to_owned());
        cfg.network = network;
        cfg
    }

    /// A test registry holding `busybox:latest`.
    fn registry() -> Registry {
        let registry = Registry::start().unwrap();
        registry.push_busybox().unwrap();
        registry
    }

    fn tempdir() -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("aloft-agent-vm-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn machine_config() -> MachineConfig {
        MachineConfig {
            image: Some("busybox:latest".into()),
            init: Some(MachineInit {
                exec: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo up > /tmp/up.new && mv /tmp/up.new /tmp/up; while true; do sleep 1; done".into(),
                ],
                ..MachineInit::default()
            }),
            stop_config: Some(StopConfig {
                signal: Some(StopSignal::SIGKILL),
                timeout: None,
            }),
            ..MachineConfig::default()
        }
    }

    /// [`machine_config`] with volume `vol` mounted at `/data`.
    fn config_mounting(vol: &VolumeId) -> MachineConfig {
        MachineConfig {
            mounts: vec![aloft_api::MachineMount {
                volume: Some(vol.to_string()),
                path: Some("/data".into()),
                ..aloft_api::MachineMount::default()
            }],
            ..machine_config()
        }
    }

    fn create(agent: &Agent) -> MachineRecord {
        create_with(agent, machine_config())
    }

    /// A machine of `config`, started.
    fn create_with(agent: &Agent, config: MachineConfig) -> MachineRecord {
        let handle = agent
            .create(CreateMachine {
                app: "agent-test".into(),
                region: "local".into(),
                org: 1,
                config,
                ..CreateMachine::default()
            })
            .unwrap();
        handle.wait(BOOT).unwrap()
    }

    /// What `cat /tmp/up` prints in the guest once the workload wrote it (the workload may still
    /// be getting there when the machine is reported started).
    fn exec_cat_up(agent: &Agent, rec: &MachineRecord) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let argv = ["/bin/cat".to_owned(), "/tmp/up".to_owned()];
        loop {
            match agent.exec(&rec.id, &argv, Duration::from_secs(30)) {
                Ok(out) if out.exit_code == 0 => return String::from_utf8_lossy(&out.stdout).into_owned(),
                Ok(out) => assert!(
                    Instant::now() < deadline,
                    "cat /tmp/up: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => assert!(Instant::now() < deadline, "exec in {}: {e:?}", rec.id),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything a console session sends until its exit (stdout, stderr), and the exit.
    fn console_until_exit(session: &mut dyn ConsoleSession) -> (String, String, ConsoleExit) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            assert!(Instant::now() < deadline, "no exit; so far {out:?} {err:?}");
            match session.next(Duration::from_millis(200)).unwrap() {
                Some(ConsoleEvent::Stdout(d)) => out.extend(d),
                Some(ConsoleEvent::Stderr(d)) => err.extend(d),
                Some(ConsoleEvent::Exit(e)) => {
                    return (
                        String::from_utf8_lossy(&out).into_owned(),
                        String::from_utf8_lossy(&err).into_owned(),
                        e,
                    );
                }
                None => {}
            }
        }
    }

    /// `aloft ssh console` on the busybox machine: a command on pipes, then the default shell
    /// (busybox has no bash: /bin/sh) on a terminal.
    fn console_runs_sh(agent: &Agent, id: &MachineId) {
        let req = ConsoleRequest {
            argv: vec!["sh".into()],
            ..ConsoleRequest::default()
        };
        let mut s = MachineHost::console(agent, id, req).unwrap();
        s.stdin(b"echo out; echo err >&2; exit 3\n").unwrap();
        let (out, err, exit) = console_until_exit(&mut *s);
        assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
        assert_eq!(exit.exit_code, Some(3));
        // Input as it comes, then its end.
        let cat = ConsoleRequest {
            argv: vec!["cat".into()],
            ..ConsoleRequest::default()
        };
        let mut s = MachineHost::console(agent, id, cat).unwrap();
        s.stdin(b"typed\n").unwrap();
        s.stdin(b"more\n").unwrap();
        s.close_stdin().unwrap();
        let (out, _, exit) = console_until_exit(&mut *s);
        assert_eq!(out, "typed\nmore\n");
        assert_eq!(exit.exit_code, Some(0));

        let shell = ConsoleRequest {
            tty: Some(TtySize { rows: 33, cols: 101 }),
            ..ConsoleRequest::default()
        };
        let mut s = MachineHost::console(agent, id, shell).unwrap();
        s.resize(TtySize { rows: 40, cols: 120 }).unwrap();
        s.stdin(b"stty size; echo $((6*7)); exit 5\n").unwrap();
        let (out, err, exit) = console_until_exit(&mut *s);
        assert!(out.contains("40 120"), "{out:?}");
        assert!(out.contains("42"), "{out:?}");
        assert_eq!(err, "", "a terminal has no separate stderr");
        assert_eq!(exit.exit_code, Some(5));

        // Init's refusal is a 400 naming the program.
        let missing = ConsoleRequest {
            argv: vec!["/app/x".into()],
            ..ConsoleRequest::default()
        };
        let e = MachineHost::console(agent, id, missing).err().unwrap();
        assert_eq!(e.status(), 400, "{e}");
        assert!(e.message().contains("/app/x"), "{e}");
    }

    /// No QEMU runs from the directory, and no machine directory, disk or volume is left.
    fn assert_nothing_left(dir: &Path) {
        let (data, _, _) = data(dir);
        let left = aloft_vm::processes_mentioning(&data);
        assert!(left.is_empty(), "processes left behind: {left:?}");
        for sub in ["machines", "disks", "volumes", "volumes/snapshots"] {
            let entries: Vec<_> = match std::fs::read_dir(data.join(sub)) {
                Ok(dir) => dir.flatten().filter(|e| e.file_name() != "snapshots").collect(),
                // Made with the first snapshot.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && sub == "volumes/snapshots" => {
                    continue;
                }
                Err(e) => panic!("{sub}: {e}"),
            };
            assert!(entries.is_empty(), "{sub} left: {entries:?}");
        }
    }

    /// Kills whatever QEMU still runs from the directory (only ever the ones this test started).
    struct Cleanup<'a>(&'a Path, Option<Child>);

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if let Some(child) = &mut self.1 {
                let _ = child.kill();
                let _ = child.wait();
            }
            for pid in aloft_vm::processes_mentioning(&data(self.0).0) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn busybox_machine_lives_and_leaves_nothing_behind() {
        let registry = registry();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let agent = open_agent(dir.path(), &registry.host());
        let rec = create(&agent);
        assert_eq!(rec.state, MachineState::Started);
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        // A command that does not exist is the caller's error, said as init says it.
        let missing = agent
            .exec(&rec.id, &["/app/x".into()], Duration::from_secs(30))
            .unwrap_err();
        let api = missing.to_api();
        assert_eq!(api.status(), 400, "{missing:?}");
        assert!(api.message().contains("/app/x"), "{}", api.message());
        console_runs_sh(&agent, &rec.id);
        let m = agent.machine(&rec.id).unwrap();
        assert_eq!(m.image_ref.as_ref().unwrap().repository, "busybox");
        assert!(m.image_ref.unwrap().digest.starts_with("sha256:"));

        let stopped = agent
            .stop(&rec.id, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        assert_eq!(stopped.state, MachineState::Stopped);
        let left = aloft_vm::processes_mentioning(&data(dir.path()).0);
        assert!(left.is_empty(), "a stopped machine has no qemu: {left:?}");

        let started = agent.start(&rec.id).unwrap().wait(BOOT).unwrap();
        assert_eq!(started.state, MachineState::Started);
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        // The create made its shape's boot template and this start restored it: a restored
        // guest's console never shows init's hello (it was said when the template booted).
        let templates: Vec<_> = std::fs::read_dir(data(dir.path()).1.join("templates"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .collect();
        assert_eq!(templates.len(), 1, "{templates:?}");
        let run_dir = data(dir.path())
            .0
            .join("machines")
            .join(rec.id.as_str())
            .join("run");
        let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap();
        assert!(!console.contains(aloft_guest_proto::CONSOLE_HELLO), "{console}");

        // Suspend writes a snapshot and QEMU exits; start resumes the same guest (its /tmp too).
        let suspended = agent.suspend(&rec.id).unwrap().wait(BOOT).unwrap();
        assert_eq!(suspended.state, MachineState::Suspended);
        let machine_dir = data(dir.path()).0.join("machines").join(rec.id.as_str());
        assert!(machine_dir.join("snapshot").is_file());
        assert!(aloft_vm::processes_mentioning(&data(dir.path()).0).is_empty());
        agent
            .exec(&rec.id, &["/bin/true".into()], Duration::from_secs(5))
            .unwrap_err();
        let resumed = agent.start(&rec.id).unwrap().wait(BOOT).unwrap();
        assert_eq!(resumed.state, MachineState::Started);
        assert!(!machine_dir.join("snapshot").exists());
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");

        let restarted = agent
            .restart(&rec.id, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        assert_eq!(restarted.state, MachineState::Started);
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");

        // Update: a new version with a new env, booted; the old version is replaced.
        let mut config = machine_config();
        config.env.insert("GREETING".into(), "v2".into());
        let updated = agent
            .update(
                &rec.id,
                &aloft_agent::UpdateMachine {
                    config,
                    current_version: Some(rec.version.clone()),
                    ..aloft_agent::UpdateMachine::default()
                },
            )
            .unwrap()
            .wait(BOOT)
            .unwrap();
        assert_eq!(updated.state, MachineState::Started);
        assert_ne!(updated.version, rec.version);
        let out = agent
            .exec(
                &rec.id,
                &[
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo $GREETING $FLY_MACHINE_VERSION".into(),
                ],
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("v2 {}\n", updated.version)
        );
        let old = agent
            .wait(
                &rec.id,
                &[WaitState::Stopped],
                Some(&rec.version),
                None,
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(old.state, MachineState::Replaced);

        let e = agent.destroy(&rec.id, false).unwrap_err();
        assert_eq!(e.to_api().status(), 412, "{e}");
        let gone = agent.destroy(&rec.id, true).unwrap().wait(BOOT).unwrap();
        assert_eq!(gone.state, MachineState::Destroyed);
        assert_nothing_left(dir.path());
        drop(agent);
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn workload_output_lands_in_the_machine_log() {
        use aloft_api::LogStream;
        let registry = registry();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let agent = open_agent(dir.path(), &registry.host());
        let mut config = machine_config();
        config.init = Some(MachineInit {
            exec: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo to-stdout; echo to-stderr >&2; printf 'no '; printf 'newline\\n'; while true; do sleep 1; done"
                    .into(),
            ],
            ..MachineInit::default()
        });
        let rec = agent
            .create(CreateMachine {
                app: "agent-test".into(),
                region: "local".into(),
                org: 1,
                config,
                ..CreateMachine::default()
            })
            .unwrap()
            .wait(BOOT)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let tail = loop {
            let tail = agent.log_tail(&rec.id, 100).unwrap();
            let has = |m: &str| tail.iter().any(|e| e.message == m);
            if has("to-stdout") && has("to-stderr") && has("no newline") {
                break tail;
            }
            assert!(Instant::now() < deadline, "workload output missing: {tail:#?}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let find = |m: &str| tail.iter().find(|e| e.message == m).unwrap();
        let out = find("to-stdout");
        assert_eq!((out.meta.stream, out.level.as_str()), (LogStream::Stdout, "info"));
        assert_eq!(out.meta.event.provider, "app");
        assert_eq!(
            (out.instance.as_str(), out.region.as_str()),
            (rec.id.as_str(), "local")
        );
        let err = find("to-stderr");
        assert_eq!(
            (err.meta.stream, err.level.as_str()),
            (LogStream::Stderr, "error")
        );
        assert!(tail.windows(2).all(|w| w[1].seq > w[0].seq), "{tail:#?}");
        assert!(
            tail.iter()
                .any(|e| e.message == "machine started" && e.meta.stream == LogStream::Platform),
            "{tail:#?}"
        );
        let log_dir = dir.path().join("logs").join(rec.id.as_str());
        assert!(log_dir.join("log.jsonl").is_file());
        agent.destroy(&rec.id, true).unwrap().wait(BOOT).unwrap();
        assert!(!log_dir.exists(), "the log goes with the machine");
        assert_nothing_left(dir.path());
    }

    /// Not a test on its own: the child process of `a_killed_agent_reattaches_its_machine`. It
    /// creates a machine, says so in `<dir>/ready` and waits to be killed.
    #[test]
    #[ignore = "run as a child process by a_killed_agent_reattaches_its_machine"]
    fn agent_child() {
        let (Ok(dir), Ok(host)) = (std::env::var(CHILD_ENV), std::env::var(REGISTRY_ENV)) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let agent = open_agent(&dir, &host);
        let rec = create(&agent);
        std::fs::write(dir.join("ready"), rec.id.as_str()).unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn a_killed_agent_reattaches_its_machine() {
        let registry = registry();
        let dir = tempdir();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::agent_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, dir.path())
            .env(REGISTRY_ENV, registry.host())
            .spawn()
            .unwrap();
        let mut cleanup = Cleanup(dir.path(), Some(child));
        let ready = dir.path().join("ready");
        let deadline = Instant::now() + BOOT;
        while !ready.exists() {
            let child = cleanup.1.as_mut().unwrap();
            assert!(
                child.try_wait().unwrap().is_none(),
                "the child agent exited early"
            );
            assert!(
                Instant::now() < deadline,
                "the child agent did not start its machine"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let id = std::fs::read_to_string(&ready).unwrap().parse().unwrap();
        // SIGKILL: no shutdown of any kind.
        let mut child = cleanup.1.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let run_dir = data(dir.path())
            .0
            .join("machines")
            .join(format!("{id}"))
            .join("run");
        assert!(
            !aloft_vm::processes_mentioning(&run_dir).is_empty(),
            "the machine's qemu outlives its agent"
        );

        let agent = open_agent(dir.path(), &registry.host());
        let rec = agent.get(&id).unwrap();
        assert_eq!(rec.state, MachineState::Started);
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        // The monitor was reattached: a workload killed now is seen and the machine restarts
        // under the default policy (on-failure).
        let boots_before = agent.events(&id, 50).unwrap().len();
        agent.kill(&id).unwrap();
        let deadline = Instant::now() + BOOT;
        loop {
            let rec = agent.get(&id).unwrap();
            let events = agent.events(&id, 50).unwrap();
            if rec.state == MachineState::Started && rec.op_id.is_none() && events.len() >= boots_before + 2 {
                assert!(events.iter().any(|e| e.kind == "exit"), "{events:?}");
                break;
            }
            assert!(Instant::now() < deadline, "no restart after kill: {rec:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        let stopped = agent
            .stop(&id, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        assert_eq!(stopped.state, MachineState::Stopped);
        agent
            .wait(&id, &[WaitState::Stopped], None, None, Duration::ZERO)
            .unwrap();
        agent.destroy(&id, false).unwrap().wait(BOOT).unwrap();
        assert_nothing_left(dir.path());
        drop(agent);
        drop(cleanup);
    }

    /// GET / from inside `ns` to `addr`, retrying until the server answers with something.
    fn http_get(ns: &NetNs, addr: SocketAddr) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ns.http_get(addr, left) {
                Ok(r) if !r.is_empty() => return r,
                Ok(_) => {}
                Err(e) => panic!("no http answer from {addr}: {e}"),
            }
            assert!(Instant::now() < deadline, "empty http answers from {addr}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn a_machine_on_the_host_network_serves_on_its_addresses() {
        let registry = registry();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let ns = NetNs::new().unwrap();
        let host = || {
            HostNet::new(Plan::new(&PlanConfig::new(1)).unwrap()).with_namespace(Namespace::Path(ns.path()))
        };
        let network = HostNetwork::open(host(), &dir.path().join("net.json"), Some(ns.path())).unwrap();
        let agent = open_agent_with(dir.path(), &registry.host(), Arc::new(network));
        let mut config = machine_config();
        config.init = Some(MachineInit {
            exec: vec![
                "/bin/sh".into(),
                "-c".into(),
                "mkdir -p /tmp/www && echo \"hello from $FLY_MACHINE_ID at $FLY_PRIVATE_IP\" > /tmp/www/index.html \
                 && exec /bin/httpd -f -p 8080 -h /tmp/www"
                    .into(),
            ],
            ..MachineInit::default()
        });
        let rec = agent
            .create(CreateMachine {
                app: "agent-test".into(),
                region: "local".into(),
                org: 3,
                config,
                ..CreateMachine::default()
            })
            .unwrap()
            .wait(BOOT)
            .unwrap();
        let net = rec.resources.net.clone().unwrap();
        assert!(net.private_ip.starts_with("fdaa:0:3:"), "{}", net.private_ip);
        assert_eq!(agent.machine(&rec.id).unwrap().private_ip, net.private_ip);
        let tap = net.tap.clone().unwrap();
        assert_eq!(host().taps().unwrap(), [tap]);
        let ip4 = net
            .net_config
            .as_ref()
            .unwrap()
            .addresses
            .iter()
            .find(|a| a.addr.is_ipv4())
            .unwrap()
            .addr;
        let ip6: IpAddr = net.private_ip.parse().unwrap();
        for addr in [ip4, ip6] {
            let page = http_get(&ns, SocketAddr::new(addr, 8080));
            assert!(
                page.contains(&format!("hello from {} at {}", rec.id, net.private_ip)),
                "{page}"
            );
        }
        agent.destroy(&rec.id, true).unwrap().wait(BOOT).unwrap();
        assert!(host().taps().unwrap().is_empty(), "the tap goes with the machine");
        assert_nothing_left(dir.path());
        drop(agent);
        host().remove_all().unwrap();
    }

    /// The real driver, tripping `switch` just before or after `op` acts (once): the agent using
    /// it is "killed" at that step boundary, with real QEMU processes, disks and files.
    #[derive(Debug)]
    struct Crashing {
        inner: VmDriver,
        op: DriverOp,
        phase: CrashPhase,
        switch: Killswitch,
        armed: std::sync::atomic::AtomicBool,
    }

    impl Crashing {
        fn around<T>(
            &self,
            op: DriverOp,
            f: impl FnOnce() -> Result<T, DriverError>,
        ) -> Result<T, DriverError> {
            let hit = op == self.op && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst);
            if hit && self.phase == CrashPhase::Before {
                self.switch.trip();
                return Err(DriverError::Failed {
                    op,
                    message: "crash".into(),
                    retryable: false,
                });
            }
            let out = f();
            if hit {
                self.switch.trip();
            }
            out
        }
    }

    impl Driver for Crashing {
        fn pull_image(&self, image: &str) -> Result<ImageInfo, DriverError> {
            self.around(DriverOp::PullImage, || self.inner.pull_image(image))
        }
        fn build_base(&self, image: &ImageInfo) -> Result<BaseInfo, DriverError> {
            self.around(DriverOp::BuildBase, || self.inner.build_base(image))
        }
        fn create_disk(&self, id: &MachineId, size_mib: u64) -> Result<PathBuf, DriverError> {
            self.around(DriverOp::CreateDisk, || self.inner.create_disk(id, size_mib))
        }
        fn remove_disk(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::RemoveDisk, || self.inner.remove_disk(id))
        }
        fn attach_network(&self, id: &MachineId, org: u32) -> Result<NetInfo, DriverError> {
            self.around(DriverOp::AttachNetwork, || self.inner.attach_network(id, org))
        }
        fn detach_network(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::DetachNetwork, || self.inner.detach_network(id))
        }
        fn write_spec(&self, id: &MachineId, spec: &LaunchSpec) -> Result<(), DriverError> {
            self.around(DriverOp::WriteSpec, || self.inner.write_spec(id, spec))
        }
        fn start_vm(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::StartVm, || self.inner.start_vm(id))
        }
        fn wait_started(&self, id: &MachineId, timeout: Duration) -> Result<(), DriverError> {
            self.around(DriverOp::WaitStarted, || self.inner.wait_started(id, timeout))
        }
        fn stop_vm(
            &self,
            id: &MachineId,
            signal: Option<Signal>,
            timeout: Duration,
        ) -> Result<Option<ExitInfo>, DriverError> {
            self.around(DriverOp::StopVm, || self.inner.stop_vm(id, signal, timeout))
        }
        fn kill_vm(&self, id: &MachineId) -> Result<Option<ExitInfo>, DriverError> {
            self.around(DriverOp::KillVm, || self.inner.kill_vm(id))
        }
        fn suspend_vm(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::SuspendVm, || self.inner.suspend_vm(id))
        }
        fn resume_vm(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::ResumeVm, || self.inner.resume_vm(id))
        }
        fn discard_snapshot(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::DiscardSnapshot, || self.inner.discard_snapshot(id))
        }
        fn vm_status(&self, id: &MachineId) -> Result<VmStatus, DriverError> {
            self.inner.vm_status(id)
        }
        fn wait_exit(&self, id: &MachineId, timeout: Duration) -> Result<Option<ExitInfo>, DriverError> {
            self.inner.wait_exit(id, timeout)
        }
        fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), DriverError> {
            self.inner.signal(id, signal)
        }
        fn exec(
            &self,
            id: &MachineId,
            argv: &[String],
            timeout: Duration,
        ) -> Result<ExecResult, DriverError> {
            self.inner.exec(id, argv, timeout)
        }
        fn exec_session(
            &self,
            id: &MachineId,
            req: &aloft_api::ConsoleRequest,
        ) -> Result<Box<dyn aloft_agent::DriverSession>, DriverError> {
            self.inner.exec_session(id, req)
        }
        fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, DriverError> {
            self.inner.ps(id)
        }
        fn connect(
            &self,
            id: &MachineId,
            net: &NetInfo,
            port: u16,
            timeout: Duration,
        ) -> Result<std::net::TcpStream, DriverError> {
            self.inner.connect(id, net, port, timeout)
        }
        fn logs(&self, id: &MachineId) -> Result<Option<aloft_agent::LogReceiver>, DriverError> {
            self.inner.logs(id)
        }
        fn remove_machine_dir(&self, id: &MachineId) -> Result<(), DriverError> {
            self.around(DriverOp::RemoveMachineDir, || self.inner.remove_machine_dir(id))
        }
        fn residue(&self) -> Result<Vec<MachineId>, DriverError> {
            self.inner.residue()
        }
        fn create_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
            self.around(DriverOp::CreateVolume, || self.inner.create_volume(id, size_gb))
        }
        fn volume_disk(&self, id: &VolumeId) -> Result<Option<VolumeDisk>, DriverError> {
            self.inner.volume_disk(id)
        }
        fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<(), DriverError> {
            self.around(DriverOp::ExtendVolume, || self.inner.extend_volume(id, size_gb))
        }
        fn grow_volume_fs(&self, id: &VolumeId) -> Result<bool, DriverError> {
            self.around(DriverOp::GrowVolumeFs, || self.inner.grow_volume_fs(id))
        }
        fn remove_volume(&self, id: &VolumeId) -> Result<(), DriverError> {
            self.around(DriverOp::RemoveVolume, || self.inner.remove_volume(id))
        }
        fn snapshot_volume(
            &self,
            id: &VolumeId,
            snapshot: &SnapshotId,
            pause: Option<&MachineId>,
        ) -> Result<aloft_agent::SnapshotInfo, DriverError> {
            self.inner.snapshot_volume(id, snapshot, pause)
        }
        fn volume_snapshot(
            &self,
            snapshot: &SnapshotId,
        ) -> Result<Option<aloft_agent::SnapshotInfo>, DriverError> {
            self.inner.volume_snapshot(snapshot)
        }
        fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), DriverError> {
            self.inner.delete_snapshot(snapshot)
        }
        fn restore_volume(
            &self,
            id: &VolumeId,
            snapshot: &SnapshotId,
            size_gb: u32,
        ) -> Result<(), DriverError> {
            self.inner.restore_volume(id, snapshot, size_gb)
        }
        fn fork_volume(
            &self,
            id: &VolumeId,
            source: &VolumeId,
            size_gb: u32,
            pause: Option<&MachineId>,
        ) -> Result<(), DriverError> {
            self.inner.fork_volume(id, source, size_gb, pause)
        }
    }

    type VerbFn = dyn Fn(&Agent, Option<&MachineId>) -> Result<aloft_agent::OpHandle, AgentError>;

    /// Runs `verb` with an agent that dies at `op`/`phase`, reopens a plain one, and checks the
    /// machine ends in `expect` with its QEMU running exactly when it is started.
    fn real_crash(
        dir: &Path,
        host: &str,
        id: Option<&MachineId>,
        verb: &VerbFn,
        (op, phase): (DriverOp, CrashPhase),
        expect: MachineState,
    ) -> MachineId {
        let switch = Killswitch::new();
        let crashing = Crashing {
            inner: driver(dir, host, Arc::new(NoNetwork)),
            op,
            phase,
            switch: switch.clone(),
            armed: std::sync::atomic::AtomicBool::new(true),
        };
        let id = {
            let agent = open_agent_on(dir, Arc::new(crashing), Some(switch.clone()));
            let handle = verb(&agent, id).unwrap();
            let res = handle.wait(BOOT);
            assert!(switch.is_tripped(), "{op} {phase:?} was never reached: {res:?}");
            assert!(matches!(res, Err(AgentError::Halted)), "{op} {phase:?}: {res:?}");
            handle.machine
        };
        let agent = open_agent(dir, host);
        let w = agent.wait(&id, &[WaitState::Settled], None, None, BOOT).unwrap();
        assert_eq!(w.state, expect, "{op} {phase:?}");
        let run_dir = data(dir).0.join("machines").join(id.as_str()).join("run");
        let qemus = aloft_vm::processes_mentioning(&run_dir);
        assert_eq!(
            qemus.len(),
            usize::from(expect == MachineState::Started),
            "{op} {phase:?}: qemu processes {qemus:?}"
        );
        if expect == MachineState::Started {
            assert_eq!(exec_cat_up(&agent, &agent.get(&id).unwrap()), "up\n");
        }
        id
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots real guests; enable feature vm-tests"
    )]
    fn agents_killed_at_step_boundaries_of_create_stop_and_destroy_recover() {
        let registry = registry();
        let host = registry.host();
        let create = |a: &Agent, _: Option<&MachineId>| {
            a.create(CreateMachine {
                app: "agent-test".into(),
                region: "local".into(),
                org: 1,
                config: machine_config(),
                ..CreateMachine::default()
            })
        };
        let stop = |a: &Agent, id: Option<&MachineId>| a.stop(id.unwrap(), StopOptions::default());
        let destroy = |a: &Agent, id: Option<&MachineId>| a.destroy(id.unwrap(), true);
        use CrashPhase::{After, Before};
        use DriverOp as D;
        for op in [
            D::PullImage,
            D::BuildBase,
            D::CreateDisk,
            D::AttachNetwork,
            D::WriteSpec,
            D::StartVm,
            D::WaitStarted,
        ] {
            for phase in [Before, After] {
                let dir = tempdir();
                let _cleanup = Cleanup(dir.path(), None);
                let id = real_crash(
                    dir.path(),
                    &host,
                    None,
                    &create,
                    (op, phase),
                    MachineState::Started,
                );
                // Then stop and destroy, each killed at its own boundaries on the way.
                let stop_at = if phase == Before {
                    (D::StopVm, Before)
                } else {
                    (D::StopVm, After)
                };
                real_crash(
                    dir.path(),
                    &host,
                    Some(&id),
                    &stop,
                    stop_at,
                    MachineState::Stopped,
                );
                let destroy_at = [
                    D::KillVm,
                    D::DiscardSnapshot,
                    D::RemoveMachineDir,
                    D::RemoveDisk,
                    D::DetachNetwork,
                ][(op as usize) % 5];
                real_crash(
                    dir.path(),
                    &host,
                    Some(&id),
                    &destroy,
                    (destroy_at, phase),
                    MachineState::Destroyed,
                );
                assert_nothing_left(dir.path());
            }
        }
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots real guests; enable feature vm-tests"
    )]
    fn crash_loops_follow_the_restart_policy() {
        use aloft_api::{MachineRestart, RestartPolicy};
        let registry = registry();
        let host = registry.host();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let config = AgentConfig {
            boot_timeout: BOOT,
            restart: aloft_agent::RestartBackoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                window: Duration::from_secs(600),
            },
            ..AgentConfig::new(data(dir.path()).2)
        };
        let agent = Agent::open(config, Arc::new(driver(dir.path(), &host, Arc::new(NoNetwork)))).unwrap();
        // (policy, max_retries, exit code, boots expected)
        let cases = [
            (RestartPolicy::No, None, 3, 1),
            (RestartPolicy::OnFailure, Some(2), 3, 3),
            (RestartPolicy::OnFailure, Some(2), 0, 1),
            (RestartPolicy::Always, Some(1), 0, 2),
        ];
        for (policy, max_retries, code, boots) in cases {
            let mut config = machine_config();
            config.init = Some(MachineInit {
                exec: vec!["/bin/sh".into(), "-c".into(), format!("exit {code}")],
                ..MachineInit::default()
            });
            config.restart = Some(MachineRestart {
                policy: Some(policy),
                max_retries,
                gpu_bid_price: None,
            });
            let id = agent
                .create(CreateMachine {
                    app: "agent-test".into(),
                    region: "local".into(),
                    org: 1,
                    config,
                    ..CreateMachine::default()
                })
                .unwrap()
                .machine;
            let deadline = Instant::now() + BOOT;
            let exits = loop {
                let rec = agent.get(&id).unwrap();
                let exits: Vec<_> = agent
                    .events(&id, 50)
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.kind == "exit")
                    .collect();
                if rec.state == MachineState::Stopped && rec.op_id.is_none() {
                    break exits;
                }
                assert!(
                    Instant::now() < deadline,
                    "{policy:?}: still {} after {} exits",
                    rec.state,
                    exits.len()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(exits.len(), boots, "{policy:?} {max_retries:?} exit {code}");
            for e in &exits {
                let exit = e.request.as_ref().unwrap().exit_event.as_ref().unwrap();
                assert_eq!(exit.exit_code, code, "{e:?}");
                assert!(!exit.requested_stop, "{e:?}");
            }
            assert!(aloft_vm::processes_mentioning(&data(dir.path()).0).is_empty());
            agent.destroy(&id, false).unwrap().wait(BOOT).unwrap();
        }
        assert_nothing_left(dir.path());
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots a real guest; enable feature vm-tests"
    )]
    fn a_jailed_machine_lives_and_leaves_nothing_behind() {
        let registry = registry();
        let dir = tempdir();
        // Dropped last: the machine's cgroups and their parent go once its QEMU is gone.
        let cgroups = aloft_testkit::CgroupParent::new();
        let _cleanup = Cleanup(dir.path(), None);
        let mut cfg = driver_config(dir.path(), &registry.host(), Arc::new(NoNetwork));
        cfg.jail = Some(aloft_vm::JailSpec {
            user: "aloft-vm".into(),
            cgroup_parent: cgroups.name().into(),
        });
        let agent = open_agent_on(dir.path(), Arc::new(VmDriver::new(cfg).unwrap()), None);
        // With a volume: a jailed QEMU gets its disk (root's, mode 0600) as descriptors too.
        let vol: VolumeId = "vol_jailed".parse().unwrap();
        agent.create_volume(&vol, 1, None).unwrap();
        let rec = create_with(&agent, config_mounting(&vol));
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        let pid = aloft_vm::processes_mentioning(&data(dir.path()).0)[0];
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_owned();
        assert!(!uid.contains("\t0\t"), "qemu runs as root: {uid}");
        sh(&agent, &rec.id, "echo jailed > /data/f && sync");
        agent.suspend(&rec.id).unwrap().wait(BOOT).unwrap();
        agent.start(&rec.id).unwrap().wait(BOOT).unwrap();
        assert_eq!(exec_cat_up(&agent, &rec), "up\n");
        assert_eq!(sh(&agent, &rec.id, "cat /data/f"), "jailed\n");
        agent
            .stop(&rec.id, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        agent.start(&rec.id).unwrap().wait(BOOT).unwrap();
        assert_eq!(sh(&agent, &rec.id, "cat /data/f"), "jailed\n");
        agent.destroy(&rec.id, true).unwrap().wait(BOOT).unwrap();
        agent.destroy_volume(&vol).unwrap();
        assert_nothing_left(dir.path());
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots real guests; enable feature vm-tests"
    )]
    fn a_snapshot_of_a_running_machine_s_volume_restores_and_forks() {
        use aloft_api::VolumeSource;
        let registry = registry();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let agent = open_agent(dir.path(), &registry.host());
        let mount = |vol: &VolumeId| create_with(&agent, config_mounting(vol));
        let vol: VolumeId = "vol_snapped".parse().unwrap();
        agent.create_volume(&vol, 1, None).unwrap();
        let a = mount(&vol);
        // No `sync`: the snapshot asks the guest to write its page cache back first.
        sh(&agent, &a.id, "echo taken > /data/file");
        let boot_id = sh(&agent, &a.id, "cat /proc/sys/kernel/random/boot_id");

        // Taken while it runs; it runs on, the same boot, its workload's state in memory intact.
        let snapshot: SnapshotId = "vs_0123456789abcdef".parse().unwrap();
        let info = agent.snapshot_volume(&vol, &snapshot).unwrap();
        assert_eq!(info.volume_size, 1 << 30);
        assert!(info.size < 64 << 20, "as sparse as the volume: {}", info.size);
        assert_eq!(agent.get(&a.id).unwrap().state, MachineState::Started);
        assert_eq!(sh(&agent, &a.id, "cat /proc/sys/kernel/random/boot_id"), boot_id);
        assert_eq!(exec_cat_up(&agent, &a), "up\n");
        sh(&agent, &a.id, "echo later > /data/later && sync");
        assert_eq!(
            agent.snapshot_volume(&vol, &snapshot).unwrap(),
            info,
            "idempotent"
        );

        // Restored, bigger, into a volume a second machine mounts: the data as it was taken.
        let restored: VolumeId = "vol_restored".parse().unwrap();
        agent
            .create_volume(&restored, 2, Some(&VolumeSource::Snapshot(snapshot.clone())))
            .unwrap();
        let b = mount(&restored);
        assert_eq!(sh(&agent, &b.id, "cat /data/file"), "taken\n");
        assert_eq!(
            sh(&agent, &b.id, "test -e /data/later && echo yes || echo no"),
            "no\n"
        );
        let kib = data_kib(&agent, &b.id);
        assert!(kib > (1 << 20) * 19 / 10, "grown to 2 GiB: {kib} KiB");
        sh(&agent, &b.id, "echo written > /data/new && sync");

        // A fork of the running machine's volume: as it is now. Checked from the host (grown,
        // so its journal was replayed on the host, where debugfs reads it).
        let fork: VolumeId = "vol_fork".parse().unwrap();
        agent
            .create_volume(&fork, 2, Some(&VolumeSource::Volume(vol.clone())))
            .unwrap();
        assert_eq!(agent.get(&a.id).unwrap().state, MachineState::Started);
        assert_eq!(sh(&agent, &a.id, "cat /proc/sys/kernel/random/boot_id"), boot_id);
        let disk = data(dir.path()).0.join("volumes").join(format!("{fork}.ext4"));
        let cat = Command::new("debugfs")
            .args(["-R", "cat /later"])
            .arg(&disk)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "later\n", "{cat:?}");

        // The snapshot outlives its volume.
        agent.destroy(&a.id, true).unwrap().wait(BOOT).unwrap();
        agent.destroy_volume(&vol).unwrap();
        assert!(agent.volume_snapshot(&snapshot).unwrap().is_some());
        agent.delete_snapshot(&snapshot).unwrap();
        agent.destroy(&b.id, true).unwrap().wait(BOOT).unwrap();
        agent.destroy_volume(&restored).unwrap();
        agent.destroy_volume(&fork).unwrap();
        assert_nothing_left(dir.path());
        drop(agent);
    }

    /// Runs `script` with `sh -c` in a started machine; its stdout. Fails the test unless it
    /// exits 0.
    fn sh(agent: &Agent, id: &MachineId, script: &str) -> String {
        let argv = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let out = agent.exec(id, &argv, Duration::from_secs(60)).unwrap();
        assert_eq!(
            out.exit_code,
            0,
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The size of the filesystem mounted at /data in the guest, KiB (`df`'s total).
    fn data_kib(agent: &Agent, id: &MachineId) -> u64 {
        let out = sh(agent, id, "df -k /data | tail -n 1");
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "boots real guests; enable feature vm-tests"
    )]
    fn a_volume_keeps_its_data_across_boots_and_machines_and_grows() {
        let registry = registry();
        let dir = tempdir();
        let _cleanup = Cleanup(dir.path(), None);
        let agent = open_agent(dir.path(), &registry.host());
        let vol: VolumeId = "vol_0123456789abcdef".parse().unwrap();
        agent.create_volume(&vol, 1, None).unwrap();
        let disk = data(dir.path()).0.join("volumes").join(format!("{vol}.ext4"));
        assert!(disk.is_file());
        let config = config_mounting(&vol);
        let create_on_volume = |config: &MachineConfig| {
            agent.create(CreateMachine {
                app: "agent-test".into(),
                region: "local".into(),
                org: 1,
                config: config.clone(),
                ..CreateMachine::default()
            })
        };
        let a = create_on_volume(&config).unwrap().wait(BOOT).unwrap().id;

        // Mounted read-write as ext4 at /data, the root disks where they always were.
        let mounts = sh(&agent, &a, "grep ' /data ' /proc/mounts");
        assert!(mounts.contains(" /data ext4 rw"), "{mounts}");
        let serials = sh(
            &agent,
            &a,
            "cat /sys/block/vda/serial; echo; cat /sys/block/vdb/serial",
        );
        assert_eq!(serials, "aloft-d0\naloft-d1");
        assert!(mounts.starts_with("/dev/vd"), "{mounts}");
        sh(&agent, &a, "echo kept > /data/file && sync");
        let one_gib = data_kib(&agent, &a);
        assert!(
            (900 << 10..=1 << 20).contains(&one_gib),
            "1 GiB volume: {one_gib} KiB"
        );
        assert_eq!(agent.volume(&vol).unwrap().attached_machine_id, Some(a.clone()));

        // Across a stop and a cold boot, and a suspend and resume.
        agent
            .stop(&a, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        agent.start(&a).unwrap().wait(BOOT).unwrap();
        assert_eq!(sh(&agent, &a, "cat /data/file"), "kept\n");
        agent.suspend(&a).unwrap().wait(BOOT).unwrap();
        agent.start(&a).unwrap().wait(BOOT).unwrap();
        assert_eq!(
            sh(&agent, &a, "cat /data/file && echo more >> /data/file && sync"),
            "kept\n"
        );

        // Extended while started: the guest sees the new size after a restart.
        assert!(agent.extend_volume(&vol, 2).unwrap(), "needs a restart");
        assert_eq!(agent.volume(&vol).unwrap().size_gb, 2);
        assert_eq!(data_kib(&agent, &a), one_gib, "not under the running guest");
        agent
            .restart(&a, StopOptions::default())
            .unwrap()
            .wait(BOOT)
            .unwrap();
        let two_gib = data_kib(&agent, &a);
        assert!(two_gib > one_gib * 19 / 10, "{one_gib} KiB then {two_gib} KiB");
        assert_eq!(sh(&agent, &a, "cat /data/file"), "kept\nmore\n");

        // Mounted, it is not destroyed; the machine goes, the volume stays for the next one.
        assert_eq!(agent.destroy_volume(&vol).unwrap_err().to_api().status(), 412);
        agent.destroy(&a, true).unwrap().wait(BOOT).unwrap();
        let b = create_on_volume(&config).unwrap().wait(BOOT).unwrap().id;
        assert_eq!(sh(&agent, &b, "cat /data/file"), "kept\nmore\n");
        assert_eq!(data_kib(&agent, &b), two_gib);
        let usage = agent.volume(&vol).unwrap().usage.unwrap();
        assert_eq!(usage.blocks * usage.block_size, 2 << 30);
        agent.destroy(&b, true).unwrap().wait(BOOT).unwrap();

        // A volume that does not mount fails the boot with a message naming it.
        use std::os::unix::fs::FileExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .write_all_at(&[0u8; 1024], 1024)
            .unwrap();
        let e = create_on_volume(&config).unwrap().wait(BOOT).unwrap_err();
        let api = e.to_api();
        assert_eq!(api.status(), 422, "{e}");
        assert!(
            api.message().contains(&format!("volume {vol}: mount /dev/vd")),
            "{}",
            api.message()
        );

        for m in agent.list().unwrap() {
            if m.state != MachineState::Destroyed {
                agent.destroy(&m.id, true).unwrap().wait(BOOT).unwrap();
            }
        }
        agent.destroy_volume(&vol).unwrap();
        assert!(!disk.exists());
        assert_nothing_left(dir.path());
        drop(agent);
    }
}
